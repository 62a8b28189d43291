"""Fast kernel for the LayerNorm/bias families: gpt, opt, glm (learned positions) and bloom (ALiBi).

Per layer: (pre- or post-) LayerNorm, one fused QKV matmul with bias, attention over the cache buffer
(ALiBi as a per-head bias from each key's position for bloom), output projection, MLP with GELU (tanh) or
ReLU. Fused QKV layouts interleaved per head (gpt/opt ``qkv_proj``, bloom ``query_key_value``) are
reordered once to ``[q | k | v]``. The LM head is the (tied) embedding, read with ``transpose_y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F

from llm.errors import ModelError
from llm.infer.decoders.base import (
    LayerWeights,
    StepKernel,
    StepState,
    heads_first,
)
from llm.infer.decoders.half import HALF, widen
from llm.infer.decoders.quant import (
    concat_bias,
    concat_out,
    has_quant_layers,
    is_quant,
    out_index,
    reorder_out,
    weight_of,
)

CLASSIC_FAMILIES = ("gpt", "opt", "bloom", "glm")


@dataclass
class _Block(LayerWeights):
    fc1: tuple[Any, Any]
    fc2: tuple[Any, Any]


def _lin(layer: Any) -> tuple[Any, Any]:
    return weight_of(layer), getattr(layer, "bias", None)


def _per_head_weight(weight: Any, heads: int, head_dim: int) -> Any:
    """:func:`_per_head_to_blocks` of a float ``[K, N]`` weight, or the same reorder of a low-bit one's rows."""
    if is_quant(weight):
        index = out_index(lambda t: _per_head_to_blocks(t, heads, head_dim), weight.out_features)
        return reorder_out(weight, index)
    return _per_head_to_blocks(weight, heads, head_dim)


def _per_head_to_blocks(weight: paddle.Tensor, heads: int, head_dim: int) -> paddle.Tensor:
    """Columns ``[h0: q k v, h1: q k v, ...]`` -> ``[q (all heads) | k | v]`` (works for 1-D biases too)."""
    lead = list(weight.shape[:-1])
    w = paddle.reshape(weight, lead + [heads, 3, head_dim])
    perm = list(range(len(lead))) + [len(lead) + 1, len(lead), len(lead) + 2]
    return paddle.reshape(paddle.transpose(w, perm), lead + [3 * heads * head_dim])


def alibi_slopes(heads: int) -> np.ndarray:
    """BLOOM's ALiBi slopes (same formula as paddlenlp's ``build_alibi_tensor``)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base**p for p in range(1, closest + 1)]
    if closest != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra**p for p in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return np.asarray(slopes, dtype=np.float32)


class ClassicKernel(StepKernel):
    """Step kernel for gpt / opt / bloom (see module docstring)."""

    positions_after_prefix = True

    def __init__(self, model: Any) -> None:
        super().__init__()
        from llm.model import family_of, unwrap_model

        model = unwrap_model(model)
        self.family = family_of(model).name
        if self.family not in CLASSIC_FAMILIES:
            raise ModelError(f"no classic kernel for family '{self.family}'")
        cfg = model.config
        if getattr(cfg, "tensor_parallel_degree", 1) > 1:
            raise ModelError("tensor-parallel models have no fast kernel")
        self.quantized = has_quant_layers(model)
        self.heads = self.kv_heads = int(getattr(cfg, "n_head", None) or cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.eps = 1e-5
        self.pos_offset = 0
        self.uses_keypos = self.family == "bloom"
        if self.family == "opt":  # opt's prefix Cache is already [b, h, P, d] (gpt/bloom: [b, P, h, d])
            self.prefix_perm = None
        t: dict[str, Any] = {"pos": None, "proj_in": None, "proj_out": None, "emb_ln": None, "final": None}
        getattr(self, f"_load_{self.family}")(model, cfg, t)
        self.num_layers = len(self.blocks)
        self.vocab_size = int(t["embed"].shape[0])
        self._set_dtypes(t["embed"])
        self.w = {k: (self._pair(k, v) if isinstance(v, tuple) else self._reg(k, v)) for k, v in t.items()}
        for i, blk in enumerate(self.blocks):
            blk.qkv = self._fold_q(*blk.qkv, self.heads * self.head_dim)
            for key in ("ln1", "qkv", "out", "ln2", "fc1", "fc2"):
                setattr(blk, key, self._pair(f"l{i}_{key}", getattr(blk, key)))
        if self.uses_keypos:
            self._reg("slopes", paddle.to_tensor(alibi_slopes(self.heads)).reshape([1, self.heads, 1, 1]))

    # ------------------------------------------------------------------------------------------
    def _qkv(self, att: Any) -> tuple[paddle.Tensor, paddle.Tensor | None]:
        if getattr(att, "qkv_proj", None) is not None:  # fused, per-head interleaved
            w, b = _lin(att.qkv_proj)
            return _per_head_weight(w, self.heads, self.head_dim), (
                None if b is None else _per_head_to_blocks(b, self.heads, self.head_dim)
            )
        projs = (att.q_proj, att.k_proj, att.v_proj)
        return concat_out(*(weight_of(p) for p in projs)), concat_bias(*projs)

    def _load_gpt(self, model: Any, cfg: Any, t: dict) -> None:
        act = getattr(cfg, "hidden_activation", "gelu")
        if act not in ("gelu", "gelu_new"):
            raise ModelError(f"gpt hidden_activation {act!r} has no fast kernel")
        if float(getattr(cfg, "scale_qk_coeff", 1.0)) != 1.0:
            raise ModelError("gpt with scale_qk_coeff != 1 has no fast kernel")
        self.pre_norm, self.act = bool(cfg.normalize_before), "gelu"
        emb, dec = model.gpt.embeddings, model.gpt.decoder
        t.update(embed=emb.word_embeddings.weight, pos=emb.position_embeddings.weight, final=_lin(dec.norm))
        self.max_positions = int(emb.position_embeddings.weight.shape[0])
        self.head_transposed = bool(getattr(model.lm_head, "transpose_y", True))
        t["head"] = model.lm_head.weight
        self.blocks = self._gpt_style_blocks(dec.layers)

    def _gpt_style_blocks(self, layers: Any) -> list[_Block]:
        """GPT and OPT decoder layers share attribute names: norm1/self_attn/norm2/linear1/linear2."""
        return [
            _Block(
                _lin(b.norm1),
                self._qkv(b.self_attn),
                _lin(b.self_attn.out_proj),
                _lin(b.norm2),
                _lin(b.linear1),
                _lin(b.linear2),
            )
            for b in layers
        ]

    def _load_opt(self, model: Any, cfg: Any, t: dict) -> None:
        act = cfg.hidden_act
        if act not in ("relu", "gelu"):
            raise ModelError(f"opt hidden_act {act!r} has no fast kernel")
        self.pre_norm, self.act = bool(cfg.normalize_before), act
        emb, dec = model.opt.embeddings, model.opt.decoder
        self.pos_offset = int(emb.position_embeddings.offset)
        t.update(embed=emb.word_embeddings.weight, pos=emb.position_embeddings.weight)
        t["proj_in"] = None if emb.project_in is None else emb.project_in.weight
        t["proj_out"] = None if dec.project_out is None else dec.project_out.weight
        t["final"] = None if dec.final_layer_norm is None else _lin(dec.final_layer_norm)
        self.max_positions = int(emb.position_embeddings.weight.shape[0]) - self.pos_offset
        self.head_transposed = True
        t["head"] = model.lm_head.decoder_weight
        self.blocks = self._gpt_style_blocks(dec.layers)

    def _load_bloom(self, model: Any, cfg: Any, t: dict) -> None:
        if getattr(cfg, "apply_residual_connection_post_layernorm", False):
            raise ModelError("bloom with post-layernorm residuals has no fast kernel")
        if int(getattr(cfg, "pretraining_tp", 1)) > 1 and getattr(cfg, "slow_but_exact", False):
            raise ModelError("bloom with slow_but_exact tensor-parallel slices has no fast kernel")
        self.pre_norm, self.act = True, "gelu"
        self.eps = float(cfg.layer_norm_epsilon)
        base = model.bloom
        t.update(
            embed=base.word_embeddings.weight,
            emb_ln=_lin(base.word_embeddings_layernorm),
            final=_lin(base.ln_f),
        )
        self.max_positions = 1 << 20  # ALiBi has no position table
        self.head_transposed = True
        t["head"] = (
            model.lm_head.decoder_weight
            if hasattr(model.lm_head, "decoder_weight")
            else base.word_embeddings.weight
        )
        blocks = []
        for b in base.h:
            att = b.self_attention
            w, bias = _lin(att.query_key_value)
            qkv = (
                _per_head_weight(w, self.heads, self.head_dim),
                None if bias is None else _per_head_to_blocks(bias, self.heads, self.head_dim),
            )
            blocks.append(
                _Block(
                    _lin(b.input_layernorm),
                    qkv,
                    _lin(att.dense),
                    _lin(b.post_attention_layernorm),
                    _lin(b.mlp.dense_h_to_4h),
                    _lin(b.mlp.dense_4h_to_h),
                )
            )
        self.blocks = blocks

    def _load_glm(self, model: Any, cfg: Any, t: dict) -> None:
        if float(getattr(cfg, "attention_scale", 1.0)) != 1.0:
            raise ModelError("glm with attention_scale != 1 has no fast kernel")
        self.pre_norm, self.act = True, "gelu"
        self.eps = float(cfg.layernorm_epsilon)
        stack, words = model.glm.transformer, model.glm.word_embeddings.weight
        pos = stack.position_embeddings.weight
        if getattr(cfg, "block_position_encoding", False):  # block position is always 0 here
            extra = stack.block_position_embeddings.weight[0:1]
            cpu_half = pos.dtype in HALF and pos.place.is_cpu_place()
            pos = widen(pos) + widen(extra) if cpu_half else pos + extra  # (a small float32 table)
        t.update(embed=words, pos=pos, final=_lin(stack.final_layernorm), head=words)
        self.max_positions = int(cfg.max_sequence_length)
        self.head_transposed = True
        self.blocks = [
            _Block(
                _lin(b.input_layernorm),
                _lin(b.attention.query_key_value),
                _lin(b.attention.dense),
                _lin(b.post_attention_layernorm),
                _lin(b.mlp.dense_h_to_4h),
                _lin(b.mlp.dense_4h_to_h),
            )
            for b in stack.layers
        ]

    # ------------------------------------------------------------------------------------------
    def _ln(self, x: paddle.Tensor, names: tuple) -> paddle.Tensor:
        w, b = self._wb(names)
        return F.layer_norm(x, x.shape[-1:], weight=w, bias=b, epsilon=self.eps)

    def _activation(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.relu(x) if self.act == "relu" else F.gelu(x, approximate=True)

    def forward(self, input_ids, positions, new_bias, past_bias, past_keypos, caches, inplace_col=-1, span=0):
        """One step; see :mod:`llm.infer.decoders.base`."""
        w = self.w
        hidden = self._rows(input_ids, w["embed"])
        if w["proj_in"] is not None:
            hidden = self._matmul(hidden, w["proj_in"])
        if w["pos"] is not None:
            hidden = hidden + self._rows(positions + self.pos_offset, w["pos"])
        if w["emb_ln"] is not None:
            hidden = self._ln(hidden, w["emb_ln"])
        head_bias = None
        if self.uses_keypos:  # ALiBi: slope_h * key position (softmax is shift invariant per query)
            slopes = self._t("slopes")
            head_bias = slopes * paddle.unsqueeze(past_keypos, [1, 2])
            if inplace_col < 0:
                head_bias = (head_bias, slopes * paddle.unsqueeze(positions.astype("float32"), [1, 2]))
        st = StepState(caches, new_bias, past_bias, inplace_col, span, head_bias, kv_heads=self.heads)
        cols = self.heads * self.head_dim
        for i, blk in enumerate(self.blocks):
            x = self._ln(hidden, blk.ln1) if self.pre_norm else hidden
            q, k, v = paddle.split(self._linear(x, blk.qkv), [cols, cols, cols], axis=-1)
            q = self._scale_q(paddle.reshape(q, [0, 0, self.heads, self.head_dim]))
            k, v = heads_first(k, self.heads, self.head_dim), heads_first(v, self.heads, self.head_dim)
            ctx = st.attend(i, q, k, v)
            hidden = hidden + self._linear(ctx, blk.out)
            if not self.pre_norm:
                hidden = self._ln(hidden, blk.ln1)
            x = self._ln(hidden, blk.ln2) if self.pre_norm else hidden
            hidden = hidden + self._linear(self._activation(self._linear(x, blk.fc1)), blk.fc2)
            if not self.pre_norm:
                hidden = self._ln(hidden, blk.ln2)
        last = hidden[:, -1, :]
        if w["final"] is not None:
            last = self._ln(last, w["final"])
        if w["proj_out"] is not None:
            last = self._matmul(last, w["proj_out"])
        return [self._logits(last, w["head"], self.head_transposed), *st.outputs]

    def head_layout(self) -> tuple[str, bool]:
        """The (tied) LM head, usually stored ``[V, hidden]``."""
        return self.w["head"], self.head_transposed
