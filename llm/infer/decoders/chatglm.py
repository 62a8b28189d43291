"""Fast kernel for ChatGLM (v1): 2-D rotary, LayerNorm, GELU MLP, ``alpha``-scaled residuals.

The toolkit runs ChatGLM as a plain causal LM (see :mod:`llm.model.loading`): position ids
``cumsum(mask) - 1`` and block position 0. With block position 0 the second half of every query/key head
is not rotated, and the first half gets ``rotate_half`` RoPE over ``head_dim / 2`` dims; one column
permutation per head turns that into the same single-``flip`` RoPE the other kernels use. Each block is
``x = LN1(h); h1 = alpha * x + Attn(x); m = LN2(h1); h = alpha * m + MLP(m)`` with
``alpha = sqrt(2 * layers)``. The LM head is the tied word embedding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F

from llm.errors import ModelError
from llm.infer.decoders.base import (
    StepKernel,
    StepState,
    half_split_order,
    heads_first,
    partial_tables,
    qk_column_index,
    rope,
    rope_factors,
    rope_tables,
)
from llm.infer.decoders.classic import _per_head_to_blocks, _per_head_weight
from llm.infer.decoders.quant import has_quant_layers, reorder_out, weight_of


def _lin(layer: Any) -> tuple[Any, Any]:
    return weight_of(layer), getattr(layer, "bias", None)


class ChatGLMKernel(StepKernel):
    """Step kernel for chatglm (v1)."""

    family = "chatglm"
    prefix_perm = (1, 2, 0, 3)  # its prefix caches are [P, b, h, d]

    def __init__(self, model: Any) -> None:
        super().__init__()
        from llm.model import unwrap_model

        model = unwrap_model(model)
        cfg, stack = model.config, model.chatglm.transformer
        if getattr(cfg, "tensor_parallel_degree", 1) > 1 or getattr(
            cfg, "use_long_sequence_strategies", False
        ):
            raise ModelError("chatglm with tensor parallelism or long-sequence strategies has no fast kernel")
        self.quantized = has_quant_layers(model)
        self.heads = self.kv_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.heads
        self.num_layers = len(stack.layers)
        self.eps = float(cfg.layernorm_epsilon)
        self.alpha = math.sqrt(2 * int(cfg.num_hidden_layers))
        self.geglu = getattr(cfg, "activation", "gelu") == "geglu"
        self.max_positions = int(cfg.max_sequence_length)
        rot = self.head_dim // 2 if cfg.position_encoding_2d else self.head_dim
        inv_freq = 1.0 / (10000.0 ** (paddle.arange(0, rot, 2).astype("float32") / rot))
        freqs = paddle.einsum("i,j->ij", paddle.arange(self.max_positions, dtype="float32"), inv_freq)
        if cfg.position_encoding_2d:  # rotate pairs (i, i + rot/2) of the first half; second half fixed
            quarter = rot // 2
            self.dim_order = half_split_order(self.head_dim, np.arange(quarter), np.arange(quarter, rot))
            cos, sin = partial_tables(freqs.cos(), freqs.sin(), self.head_dim)
        else:
            self.dim_order = np.arange(self.head_dim)
            emb = paddle.concat([freqs, freqs], axis=-1)
            cos, sin = rope_tables(emb.cos(), emb.sin())
        index = qk_column_index(self.heads, self.heads, self.head_dim, self.dim_order)
        self._set_dtypes(stack.word_embeddings.weight)
        self.vocab_size = int(stack.word_embeddings.weight.shape[0])
        self.w_embed = self._reg("embed", stack.word_embeddings.weight)
        self.w_head = self._reg("lm_head", model.lm_head.decoder_weight)
        self._reg("cos_table", cos)
        self._reg("sin_table", sin)
        self.final = self._pair("final", _lin(stack.final_layernorm))
        self.blocks = []
        for i, blk in enumerate(stack.layers):
            w, b = _lin(blk.attention.query_key_value)
            w = reorder_out(_per_head_weight(w, self.heads, self.head_dim), index)
            b = (
                None
                if b is None
                else paddle.index_select(_per_head_to_blocks(b, self.heads, self.head_dim), index)
            )
            w, b = self._fold_q(w, b, self.heads * self.head_dim)
            self.blocks.append(
                {
                    "ln1": self._pair(f"l{i}_ln1", _lin(blk.input_layernorm)),
                    "qkv": self._pair(f"l{i}_qkv", (w, b)),
                    "out": self._pair(f"l{i}_out", _lin(blk.attention.dense)),
                    "ln2": self._pair(f"l{i}_ln2", _lin(blk.post_attention_layernorm)),
                    "fc1": self._pair(f"l{i}_fc1", _lin(blk.mlp.dense_h_to_4h)),
                    "fc2": self._pair(f"l{i}_fc2", _lin(blk.mlp.dense_4h_to_h)),
                }
            )

    def _ln(self, x: paddle.Tensor, names: tuple) -> paddle.Tensor:
        w, b = self._wb(names)
        return F.layer_norm(x, x.shape[-1:], weight=w, bias=b, epsilon=self.eps)

    def forward(self, input_ids, positions, new_bias, past_bias, past_keypos, caches, inplace_col=-1, span=0):
        """One step; see :mod:`llm.infer.decoders.base`."""
        st = StepState(caches, new_bias, past_bias, inplace_col, span, kv_heads=self.heads)
        hidden = self._rows(input_ids, self.w_embed)
        cos, sin = rope_factors(positions, self._t("cos_table"), self._t("sin_table"), 2 * self.heads)
        cols = self.heads * self.head_dim
        for i, blk in enumerate(self.blocks):
            x = self._ln(hidden, blk["ln1"])
            qk, v = paddle.split(self._linear(x, blk["qkv"]), [2 * cols, cols], axis=-1)
            qk = rope(paddle.reshape(qk, [0, 0, 2 * self.heads, self.head_dim]), cos, sin)
            q, k = paddle.split(qk, 2, axis=2)
            q = self._scale_q(q)
            k, v = heads_first(k, self.heads, self.head_dim), heads_first(v, self.heads, self.head_dim)
            ctx = st.attend(i, q, k, v)
            mid = self._ln(x * self.alpha + self._linear(ctx, blk["out"]), blk["ln2"])
            inner = self._linear(mid, blk["fc1"])
            if self.geglu:
                a, g = paddle.chunk(inner, 2, axis=-1)
                inner = a * F.gelu(g)
            else:
                inner = F.gelu(inner, approximate=True)
            hidden = mid * self.alpha + self._linear(inner, blk["fc2"])
        last = self._ln(hidden[:, -1, :], self.final)
        return [self._logits(last, self.w_head, True), *st.outputs]

    def head_layout(self) -> tuple[str, bool]:
        """The tied LM head, stored ``[V, hidden]``."""
        return self.w_head, True
