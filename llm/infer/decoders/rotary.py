"""Fast kernel for the rotary pre-norm families: llama, mixtral, qwen, chatglm_v2.

Per layer: norm -> one fused QKV matmul -> RoPE (precomputed tables, ``rotate_half`` done with one
``flip``) -> grouped attention over the cache buffer -> output matmul -> residual -> norm -> one fused
gate/up matmul -> SiLU gate -> down matmul -> residual. Mixtral's experts run densely (every expert on
every token, weighted by the top-k routing weights; unselected experts get weight 0), which is exact and
keeps the graph free of data-dependent shapes. ChatGLM2's interleaved partial rotary is turned into the
same ``rotate_half`` form by permuting the query/key columns of each head once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F

from llm.errors import ModelError
from llm.infer.decoders import fastmm
from llm.infer.decoders.base import (
    LayerWeights,
    StepKernel,
    StepState,
    column_blocks,
    fold_rows,
    half_split_order,
    heads_first,
    mlp_blocks,
    norm,
    partial_tables,
    qk_column_index,
    rope,
    rope_factors,
    rope_tables,
    unblock,
)
from llm.infer.decoders.quant import (
    concat_bias,
    concat_out,
    has_quant_layers,
    is_quant,
    is_quant_ref,
    out_index,
    reorder_out,
    weight_of,
)

ROTARY_FAMILIES = ("llama", "mixtral", "qwen", "chatglm_v2")


@dataclass
class _Layer(LayerWeights):
    gate_up: list[tuple[Any, Any]]  # one per expert (one for dense MLPs)
    down: list[tuple[Any, Any]]
    router: Any = None


def _cat(*tensors: Any) -> Any:
    """Weights (float ``[K, N]`` or low-bit) or biases concatenated along the outputs (None if any is None)."""
    if any(t is None for t in tensors):
        return None
    if any(is_quant(t) for t in tensors):
        return concat_out(*tensors)
    return paddle.concat(list(tensors), axis=-1)


def _bias(layer: Any) -> paddle.Tensor | None:
    return getattr(layer, "bias", None)


def _lin(layer: Any) -> tuple[Any, paddle.Tensor | None]:
    return weight_of(layer), _bias(layer)


class RotaryKernel(StepKernel):
    """Step kernel for llama / mixtral / qwen / chatglm_v2 (see module docstring)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        from llm.model import family_of, unwrap_model

        model = unwrap_model(model)
        self.family = family_of(model).name
        if self.family not in ROTARY_FAMILIES:
            raise ModelError(f"no rotary kernel for family '{self.family}'")
        self.config = model.config
        self.quantized = has_quant_layers(model)
        getattr(self, f"_load_{self.family}")(model)
        self.vocab_size = int(self._head.shape[-1])
        self._set_dtypes(self._embed)
        self._fold()
        self._register()
        self.__dict__["_step_slots"] = self._decode_step_slots()

    # ------------------------------------------------------------------------------------------
    # weight extraction
    # ------------------------------------------------------------------------------------------
    def _rope_tables(self, cos: paddle.Tensor, sin: paddle.Tensor) -> None:
        """``cos``/``sin`` ``[max_pos, head_dim]`` in rotate_half layout -> stored tables (sin sign-folded)."""
        self._cos, self._sin = rope_tables(cos, sin)
        self.max_positions = int(cos.shape[0])

    def _load_llama(self, model: Any) -> None:
        cfg = model.config
        base = model.llama if self.family == "llama" else model.mixtral
        if self.family == "llama" and (not getattr(cfg, "rope", True) or getattr(cfg, "alibi", False)):
            raise ModelError("llama without RoPE (alibi) has no fast kernel")
        if getattr(cfg, "tensor_parallel_degree", 1) > 1:
            raise ModelError("tensor-parallel models have no fast kernel")
        act = getattr(cfg, "hidden_act", "silu") or "silu"
        if act not in ("silu", "swish"):
            raise ModelError(f"hidden_act {act!r} has no fast kernel")
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.eps = float(cfg.rms_norm_eps)
        self.num_layers = len(base.layers)
        rot = base.layers[0].self_attn.rotary_emb
        self._rope_tables(rot.cos_cached[0, :, 0, :], rot.sin_cached[0, :, 0, :])
        self.max_positions = min(self.max_positions, int(cfg.max_position_embeddings))
        layers = []
        for blk in base.layers:
            att = blk.self_attn
            # biases: none in float llama/mixtral, but a Shift-quantized (A8W8) linear carries one
            if getattr(att, "fuse_attention_qkv", False):
                qkv = self._split_fused_qkv(*_lin(att.qkv_proj))
            else:
                projs = (att.q_proj, att.k_proj, att.v_proj)
                qkv = (_cat(*(weight_of(p) for p in projs)), concat_bias(*projs))
            if self.family == "mixtral":
                moe = blk.block_sparse_moe
                gate_up = [
                    (_cat(weight_of(e.w1), weight_of(e.w3)), concat_bias(e.w1, e.w3)) for e in moe.experts
                ]
                down = [_lin(e.w2) for e in moe.experts]
                router, self.top_k = moe.gate.weight, int(moe.top_k)
            else:
                mlp = blk.mlp
                if getattr(mlp, "fuse_attention_ffn", False):
                    gu = _lin(mlp.gate_up_fused_proj)
                else:
                    gu = (
                        _cat(weight_of(mlp.gate_proj), weight_of(mlp.up_proj)),
                        concat_bias(mlp.gate_proj, mlp.up_proj),
                    )
                gate_up, down, router = [gu], [_lin(mlp.down_proj)], None
            layers.append(
                _Layer(
                    (blk.input_layernorm.weight, None),
                    qkv,
                    _lin(att.o_proj),
                    (blk.post_attention_layernorm.weight, None),
                    gate_up,
                    down,
                    router,
                )
            )
        self.layers_w = layers
        self._embed, self._final, self._head = (
            base.embed_tokens.weight,
            (base.norm.weight, None),
            model.lm_head.weight,
        )

    _load_mixtral = _load_llama

    def _split_fused_qkv(self, weight: Any, bias: Any) -> tuple[Any, Any]:
        """paddlenlp's fused ``qkv_proj`` (per KV group ``[q_g | k | v]``) -> ``[q | k | v]`` columns."""
        g, d = self.heads // self.kv_heads, self.head_dim

        def split(w: paddle.Tensor) -> paddle.Tensor:
            w = w.reshape([0, self.kv_heads, (g + 2) * d])
            q, k, v = paddle.split(w, [g * d, d, d], axis=-1)
            return paddle.concat([t.reshape([0, -1]) for t in (q, k, v)], axis=-1)

        def split_vector(v: paddle.Tensor) -> paddle.Tensor:
            return split(v.reshape([1, -1]))[0]

        bias = None if bias is None else split_vector(bias)
        if is_quant(weight):  # the same reorder as a row selection of the low-bit storage
            return reorder_out(weight, out_index(split_vector, weight.out_features)), bias
        return split(weight), bias

    def _load_qwen(self, model: Any) -> None:
        cfg, base = model.config, model.qwen
        if float(getattr(cfg, "rotary_pct", 1.0)) != 1.0:
            raise ModelError("qwen with rotary_pct != 1 has no fast kernel")
        self.heads = self.kv_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.eps = float(cfg.layer_norm_epsilon)
        self.num_layers = len(base.h)
        # dynamic NTK and logn scaling are identities up to seq_length, which bounds max_positions
        limit = int(getattr(cfg, "seq_length", None) or cfg.max_position_embeddings)
        rot = base.h[0].attn.rotary_emb
        rot.update_cos_sin_cache(limit)
        self._rope_tables(rot.cos_cached[0, :limit, 0, :], rot.sin_cached[0, :limit, 0, :])
        layers = []
        for blk in base.h:
            mlp = blk.mlp
            layers.append(
                _Layer(
                    (blk.ln_1.weight, None),
                    _lin(blk.attn.c_attn),
                    _lin(blk.attn.c_proj),
                    (blk.ln_2.weight, None),
                    [(_cat(weight_of(mlp.w2), weight_of(mlp.w1)), concat_bias(mlp.w2, mlp.w1))],
                    [_lin(mlp.c_proj)],
                )
            )
        self.layers_w = layers
        self._embed, self._final, self._head = base.wte.weight, (base.ln_f.weight, None), model.lm_head.weight

    def _load_chatglm_v2(self, model: Any) -> None:
        cfg, base = model.config, model.chatglm_v2
        if getattr(cfg, "apply_residual_connection_post_layernorm", False):
            raise ModelError("chatglm_v2 with post-layernorm residuals has no fast kernel")
        if getattr(cfg, "use_long_sequence_strategies", False):
            raise ModelError("chatglm_v2 with long-sequence strategies has no fast kernel")
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.multi_query_group_num) if cfg.multi_query_attention else self.heads
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.eps = float(cfg.layernorm_epsilon)
        self.num_layers = len(base.encoder.layers)
        limit = int(cfg.max_sequence_length)
        rotary, default_dtype = base.rotary_pos_emb, base.rotary_pos_emb.default_dtype
        rotary.default_dtype = (
            paddle.float32
        )  # the tables in float32 (a half-precision cos has no CPU kernel)
        try:
            cache = rotary(limit)  # [limit, rot/2, 2]: GLM rotates interleaved pairs (2i, 2i+1)
        finally:
            rotary.default_dtype = default_dtype
        rot_dim = int(cache.shape[1]) * 2
        self._cos, self._sin = partial_tables(cache[..., 0], cache[..., 1], self.head_dim)
        self.max_positions = limit
        self.dim_order = half_split_order(self.head_dim, np.arange(0, rot_dim, 2), np.arange(1, rot_dim, 2))
        self.prefix_perm = (1, 2, 0, 3)  # its prefix caches are [P, b, kv, d]
        index = qk_column_index(self.heads, self.kv_heads, self.head_dim, self.dim_order)
        layers = []
        for blk in base.encoder.layers:
            att, mlp = blk.self_attention, blk.mlp
            w, b = _lin(att.query_key_value)
            w = reorder_out(w, index)
            b = None if b is None else paddle.index_select(b, index)
            ln = (lambda m: (m.weight, None)) if cfg.rmsnorm else _lin
            layers.append(
                _Layer(
                    ln(blk.input_layernorm),
                    (w, b),
                    _lin(att.dense),
                    ln(blk.post_attention_layernorm),
                    [_lin(mlp.dense_h_to_4h)],
                    [_lin(mlp.dense_4h_to_h)],
                )
            )
        self.layers_w = layers
        final = base.encoder.final_layernorm if cfg.post_layer_norm else None
        self._final = None if final is None else (final.weight, _bias(final) if not cfg.rmsnorm else None)
        self._embed, self._head = base.embedding.word_embeddings.weight, base.output_layer.weight

    def _fold(self) -> None:
        """Fold the RMSNorm weights into the following matmuls and ``1/sqrt(d)`` into the query columns (not for
        half-precision weights on CPU, nor for low-bit models: see :meth:`StepKernel._fold_q`). Float gate/up
        weights are split into column blocks for paddle's matmul (not with the custom ops, :attr:`fast_mm`); low-bit
        ones stay ``[2 * inter, K]`` (plain path in :meth:`_swiglu`)."""
        q_cols = self.heads * self.head_dim
        for lw in self.layers_w:
            qkv_w, qkv_b = lw.qkv
            # RMSNorm: (x_hat * w) @ W == x_hat @ (w[:, None] * W)
            if lw.ln1[1] is None and not self.keep_weights:
                qkv_w, lw.ln1 = fold_rows(qkv_w, lw.ln1[0]), (None, None)
            lw.qkv = self._fold_q(qkv_w, qkv_b, q_cols)
            if lw.ln2[1] is None and not self.keep_weights:
                w2, lw.ln2 = lw.ln2[0], (None, None)
                lw.gate_up = [(fold_rows(w, w2), b) for w, b in lw.gate_up]
                lw.router = None if lw.router is None else fold_rows(lw.router, w2)
            if not self.fast_mm:  # the custom ops read the plain [K, 2 * inter] weight (decoders.fastmm)
                lw.gate_up = [
                    (w, b) if is_quant(w) else column_blocks(w, b, 2 * mlp_blocks(w.shape[1] // 2))
                    for w, b in lw.gate_up
                ]
            else:  # the fused projections are the kernel's own copies: stored [N, K] (see StepKernel.out_major)
                lw.qkv = (self.out_major(lw.qkv[0]), lw.qkv[1])
                lw.gate_up = [(self.out_major(w), b) for w, b in lw.gate_up]

    def _register(self) -> None:
        """Register every tensor (see :meth:`StepKernel._reg`); ``layers_w`` then holds names."""
        self.w_embed, self.w_head = self._reg("embed", self._embed), self._reg("lm_head", self._head)
        self._reg("cos_table", self._cos)
        self._reg("sin_table", self._sin)
        self.final_norm = None if self._final is None else self._pair("final", self._final)
        del self._embed, self._head, self._cos, self._sin, self._final
        for i, lw in enumerate(self.layers_w):
            for key in ("ln1", "qkv", "out", "ln2"):
                setattr(lw, key, self._pair(f"l{i}_{key}", getattr(lw, key)))
            lw.gate_up = [self._pair(f"l{i}_e{e}_gu", wb) for e, wb in enumerate(lw.gate_up)]
            lw.down = [self._pair(f"l{i}_e{e}_down", wb) for e, wb in enumerate(lw.down)]
            lw.router = self._reg(f"l{i}_router", lw.router)

    def _decode_step_slots(self) -> list[fastmm.StepSlots] | None:
        """Per layer the registered names :func:`fastmm.decode_step` reads (None: a layer it does not run --
        routed experts, LayerNorm)."""
        if not self.fast_mm:
            return None
        slots = []
        for lw in self.layers_w:
            if (
                lw.router is not None
                or lw.ln1[1] is not None
                or lw.ln2[1] is not None
                or len(lw.gate_up) != 1
            ):
                return None
            (gu_w, gu_b), (dn_w, dn_b) = lw.gate_up[0], lw.down[0]
            slots.append((lw.ln1[0], *lw.qkv, *lw.out, lw.ln2[0], gu_w, gu_b, dn_w, dn_b))
        return slots

    # ------------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------------
    def _swiglu(self, x: paddle.Tensor, gate_up: tuple, down: tuple) -> paddle.Tensor:
        """``down(silu(gate) * up)`` with the gate/up projection in :func:`column_blocks` layout (a low-bit one
        as one ``[..., 2 * inter]`` product, and so is a plain float one, :attr:`fast_mm`)."""
        if self.fast_mm or is_quant_ref(gate_up[0]):
            gu = self._linear(x, gate_up)
            act = fastmm.swiglu(gu) if self.fast_mm else None
            if act is None:
                g, u = paddle.chunk(gu, 2, axis=-1)
                act = F.silu(g) * u
            return self._linear(act, down)
        gu = self._blocked_linear(x, gate_up)  # [2n, rows, width]: n gate blocks, then n up blocks
        n = gu.shape[0] // 2
        return self._linear(unblock(F.silu(gu[:n]) * gu[n:], x), down)

    def _mlp(self, x: paddle.Tensor, lw: _Layer) -> paddle.Tensor:
        if lw.router is None:
            return self._swiglu(x, lw.gate_up[0], lw.down[0])
        probs = F.softmax(self._matmul(x, lw.router).astype("float32"), axis=-1)  # [b, s, E]
        top, _ = paddle.topk(probs, self.top_k, axis=-1)
        weights = paddle.where(probs >= top[:, :, -1:], probs, paddle.zeros_like(probs))
        weights = weights / top.sum(axis=-1, keepdim=True)
        out = None
        for e, (gu, dn) in enumerate(zip(lw.gate_up, lw.down)):
            y = self._swiglu(x, gu, dn) * weights[:, :, e : e + 1]
            out = y if out is None else out + y
        return out

    def forward(self, input_ids, positions, new_bias, past_bias, past_keypos, caches, inplace_col=-1, span=0):
        """One step; see :mod:`llm.infer.decoders.base`."""
        st = StepState(
            caches,
            new_bias,
            past_bias,
            inplace_col,
            span,
            groups=self.heads // self.kv_heads,
            kv_heads=self.kv_heads,
        )
        hidden = self._rows(input_ids, self.w_embed)
        heads = self.heads + self.kv_heads
        cos, sin = rope_factors(positions, self._t("cos_table"), self._t("sin_table"), heads)
        q_cols, kv_cols = self.heads * self.head_dim, self.kv_heads * self.head_dim
        layers = self.layers_w
        if (
            self._step_slots is not None and st.inplace and st.new_bias is not None
        ):  # decode: one custom operator
            fused_step = fastmm.decode_step(
                self, self._step_slots, hidden, cos, sin, st.new_bias, caches, inplace_col, span
            )
            if fused_step is not None:
                hidden, layers = fused_step, []
        for i, lw in enumerate(layers):
            x = norm(hidden, *self._wb(lw.ln1), self.eps)
            qkv = self._linear(x, lw.qkv)
            fused = fastmm.rope_qkv(qkv, cos, sin, self.heads, self.q_scale) if self.fast_mm else None
            if fused is not None:
                q, k, v = fused
            else:
                qk, v = paddle.split(qkv, [q_cols + kv_cols, kv_cols], axis=-1)
                qk = rope(paddle.reshape(qk, [0, 0, self.heads + self.kv_heads, self.head_dim]), cos, sin)
                q, k = paddle.split(qk, [self.heads, self.kv_heads], axis=2)
                q = self._scale_q(q)
                k, v = (
                    heads_first(k, self.kv_heads, self.head_dim),
                    heads_first(v, self.kv_heads, self.head_dim),
                )
            ctx = st.attend(i, q, k, v)
            hidden = hidden + self._linear(ctx, lw.out)
            hidden = hidden + self._mlp(norm(hidden, *self._wb(lw.ln2), self.eps), lw)
        last = hidden[:, -1, :]
        if self.final_norm is not None:
            last = norm(last, *self._wb(self.final_norm), self.eps)
        return [self._logits(last, self.w_head, False), *st.outputs]

    def head_layout(self) -> tuple[str, bool]:
        """The LM head is stored ``[hidden, V]``."""
        return self.w_head, False
