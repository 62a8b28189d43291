"""Shared pieces of the fast path: the step-kernel contract, attention over a preallocated cache, the runner.

A *kernel* is an ``nn.Layer`` computing one model step in plain paddle ops from the model's own parameter
tensors (fused where that saves ops). Its ``forward`` is the same for prefill and decode, and is what
:mod:`llm.infer.static` exports::

    forward(input_ids [b,s], positions [b,s], new_bias [b,1,s,s], past_bias [b,1,1,T], past_keypos [b,T],
            caches=[k_0, v_0, ..., k_{L-1}, v_{L-1}])   # past cache, each [b, kv_heads, T, head_dim]
        -> [logits [b, vocab] of the last position, k_new_0, v_new_0, ...]   # new entries [b, kv_heads, s, d]

Biases are additive (0 or ``NEG``). Attention is split into a *past* part (the cache buffer, read in
place, no concat) and a *new* part (the step's own keys), joined only at the softmax, so the runner can
keep one preallocated buffer per layer and write the returned entries into it in place. In dygraph the
kernels are called with ``inplace_col >= 0`` instead: they write the new entries into the buffers
themselves and attend over the buffer (fewer ops per step; see :class:`StepState`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F

from llm.infer.decoders import fastmm
from llm.infer.decoders.half import HALF, WIDEN_BYTES, bf16_bits, stride_kernels, widen, widen_bits
from llm.infer.decoders.quant import is_quant, is_quant_ref, kernel_linear, quantize_head, register

NEG = -1e9
HEAD_BLOCK = 768  # LM-head columns per block in dygraph (see StepKernel.enable_blocked_head)
MLP_BLOCK = 768  # minimum gate/up columns per block (see column_blocks)


@dataclass
class LayerWeights:
    """One decoder layer's norm / attention ``(weight, bias)`` pairs: tensors while a kernel loads them,
    buffer names once registered. Kernels add their MLP fields."""

    ln1: tuple[Any, Any]
    qkv: tuple[Any, Any]
    out: tuple[Any, Any]
    ln2: tuple[Any, Any]


def rms(x: paddle.Tensor, eps: float) -> paddle.Tensor:
    """RMS normalisation without the weight (kernels fold the weight into the next matmul)."""
    return x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps)


def rms_norm(x: paddle.Tensor, weight: paddle.Tensor, eps: float) -> paddle.Tensor:
    """paddlenlp's RMSNorm (same op order)."""
    return paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps) * x * weight


def norm(
    x: paddle.Tensor, weight: paddle.Tensor | None, bias: paddle.Tensor | None, eps: float
) -> paddle.Tensor:
    """LayerNorm when ``bias`` is given, else RMSNorm (weightless when ``weight`` is None)."""
    if bias is not None:
        return F.layer_norm(x, x.shape[-1:], weight=weight, bias=bias, epsilon=eps)
    fast = fastmm.rms_norm(x, weight, eps)  # one custom operator with the toolkit's kernels
    if fast is not None:
        return fast
    return rms(x, eps) if weight is None else rms_norm(x, weight, eps)


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None = None) -> paddle.Tensor:
    """``x @ weight (+ bias)`` with paddle's ``[in, out]`` weight layout."""
    out = paddle.matmul(x, weight)
    return out if bias is None else out + bias


def mlp_blocks(width: int) -> int:
    """Blocks per half of a fused gate/up projection: the most that divide ``width`` into blocks of at least
    :data:`MLP_BLOCK` columns (1 for small models)."""
    return max([n for n in range(1, width // MLP_BLOCK + 1) if width % n == 0] or [1])


def column_blocks(
    weight: paddle.Tensor, bias: paddle.Tensor | None, blocks: int
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """``[in, out]`` weight -> ``[blocks, in, out / blocks]`` (bias -> ``[blocks, 1, out / blocks]``).

    With the paddle/MKL matmul here, 16 rows times a 576 x 3072 projection whose weights are not in cache
    take 0.65 ms as one matmul and 0.40 ms as four 768-column blocks in one batched matmul.
    """
    rows, cols = weight.shape
    w = paddle.transpose(paddle.reshape(weight, [rows, blocks, cols // blocks]), [1, 0, 2]).contiguous()
    return w, (None if bias is None else paddle.reshape(bias, [blocks, 1, cols // blocks]))


def blocked_linear(x: paddle.Tensor, weight: paddle.Tensor, bias: paddle.Tensor | None) -> paddle.Tensor:
    """``x [..., in]`` through a :func:`column_blocks` weight -> ``[blocks, rows, out / blocks]``."""
    out = paddle.matmul(paddle.reshape(x, [1, -1, x.shape[-1]]), weight)
    return out if bias is None else out + bias


def unblock(x: paddle.Tensor, like: paddle.Tensor) -> paddle.Tensor:
    """``[blocks, rows, width]`` -> ``like.shape[:-1] + [blocks * width]`` (the inverse of the blocking)."""
    cols = x.shape[0] * x.shape[2]
    if x.shape[0] > 1:
        x = paddle.transpose(x, [1, 0, 2])
    if paddle.in_dynamic_mode():
        return paddle.reshape(x, like.shape[:-1] + [cols])
    if len(like.shape) == 2:
        return paddle.reshape(x, [-1, cols])
    return paddle.reshape(x, [size_of(like, 0), -1, cols])


def size_of(x: paddle.Tensor, axis: int) -> int | paddle.Tensor:
    """``x.shape[axis]``, or a shape tensor when tracing for ``to_static`` (dynamic dims)."""
    if paddle.in_dynamic_mode():
        return x.shape[axis]
    return paddle.shape(x)[axis]


def _one_row(x: paddle.Tensor) -> bool:
    """A dygraph decode step (one query row): head transposes are then plain reshapes."""
    return paddle.in_dynamic_mode() and x.shape[1] == 1


def heads_first(x: paddle.Tensor, heads: int, dim: int) -> paddle.Tensor:
    """``[b, s, heads * dim]`` (or ``[b, s, heads, dim]``) -> ``[b, heads, s, dim]``."""
    if _one_row(x):
        return paddle.reshape(x, [0, heads, 1, dim])
    return paddle.transpose(paddle.reshape(x, [0, 0, heads, dim]), [0, 2, 1, 3])


def _grouped_q(q: paddle.Tensor, kv_heads: int) -> paddle.Tensor:
    """``q [b, s, h, d] -> [b, kv, g*s, d]``: the ``g`` query heads of a KV group stacked along rows."""
    if _one_row(q):
        return paddle.reshape(q, [0, kv_heads, -1, q.shape[-1]])
    return paddle.reshape(paddle.transpose(q, [0, 2, 1, 3]), [0, kv_heads, -1, q.shape[-1]])


def _merge_heads(out: paddle.Tensor, heads: int, one_row: bool) -> paddle.Tensor:
    """``[b, kv, g*s, d] -> [b, s, h*d]``."""
    dim = out.shape[-1]
    if one_row:
        return paddle.reshape(out, [0, 1, heads * dim])
    out = paddle.transpose(paddle.reshape(out, [0, heads, -1, dim]), [0, 2, 1, 3])
    return paddle.reshape(out, [0, 0, heads * dim])


def attend(
    q: paddle.Tensor,
    keys: paddle.Tensor,
    values: paddle.Tensor,
    bias: paddle.Tensor,
    head_bias: paddle.Tensor | None = None,
) -> paddle.Tensor:
    """Attention of pre-scaled ``q [b,s,h,d]`` over ``keys/values [b,kv,T,d]`` with an additive ``bias``
    (``[b,kv,g*s,T]``) and optional per-head ``head_bias [b,h,1,T]`` (ALiBi, ``h == kv``).

    GQA without repeating K/V: a group's query heads are stacked along the row axis. Returns ``[b,s,h*d]``.
    """
    heads, one_row = q.shape[2], _one_row(q)
    scores = paddle.matmul(_grouped_q(q, keys.shape[1]), keys, transpose_y=True) + bias
    if head_bias is not None:
        scores = scores + head_bias
    return _merge_heads(paddle.matmul(F.softmax(scores, axis=-1), values), heads, one_row)


def attend_split(
    q: paddle.Tensor,
    k_new: paddle.Tensor,
    v_new: paddle.Tensor,
    past_k: paddle.Tensor,
    past_v: paddle.Tensor,
    new_bias: paddle.Tensor,
    past_bias: paddle.Tensor,
    head_bias: tuple[paddle.Tensor, paddle.Tensor] | None = None,
) -> paddle.Tensor:
    """Like :func:`attend` over ``past + new`` without concatenating K/V (the exported-graph form): the two
    score blocks meet only at the softmax. ``head_bias`` is ``(past [b,h,1,T], new [b,h,1,s])``."""
    heads, one_row = q.shape[2], _one_row(q)
    q = _grouped_q(q, k_new.shape[1])
    s_past = paddle.matmul(q, past_k, transpose_y=True) + past_bias
    s_new = paddle.matmul(q, k_new, transpose_y=True) + new_bias
    if head_bias is not None:
        s_past = s_past + head_bias[0]
        s_new = s_new + head_bias[1]
    t_past = size_of(past_k, 2)
    probs = F.softmax(paddle.concat([s_past, s_new], axis=-1), axis=-1)
    out = paddle.matmul(probs[:, :, :, :t_past], past_v) + paddle.matmul(probs[:, :, :, t_past:], v_new)
    return _merge_heads(out, heads, one_row)


PREFILL_CHUNK = 128  # query rows per block in a long dygraph prefill (causal blocks skip masked keys)


class StepState:
    """Per-call attention inputs shared by a kernel's layers.

    *Split* mode (``col < 0``, the exported graph): ``caches`` are the past K/V, the step's new K/V are
    collected in ``outputs``. *In-place* mode (dygraph): the new K/V are written into the ``caches``
    buffers at column ``col`` and attention reads the first ``span`` buffer columns (``bias`` covers them);
    a long prefill runs in blocks of :data:`PREFILL_CHUNK` query rows, each reading only the keys up to
    its last row (about 40% less attention work for 512 tokens).
    """

    def __init__(
        self, caches, new_bias, past_bias, col=-1, span=0, head_bias=None, groups: int = 1, kv_heads: int = 1
    ):
        self.caches, self.col, self.span, self.head_bias = caches, col, span, head_bias
        self.inplace = col >= 0
        self.groups, self.kv_heads = groups, kv_heads
        self.past_bias, self.outputs, self.blocks = past_bias, [], []
        rows = new_bias.shape[2] if paddle.in_dynamic_mode() else -1
        if self.inplace and rows > PREFILL_CHUNK:
            prefix = span - rows
            for start in range(0, rows, PREFILL_CHUNK):
                stop = min(rows, start + PREFILL_CHUNK)
                hb = None if head_bias is None else head_bias[:, :, :, : prefix + stop]
                block_bias = self._expand(new_bias[:, :, start:stop, : prefix + stop])
                self.blocks.append((start, stop, prefix + stop, block_bias, hb))
            self.new_bias = None
        else:
            self.new_bias = self._expand(new_bias)
        if not self.inplace and not paddle.in_dynamic_mode():  # the graph's [b,1,1,T] past bias
            rows = size_of(new_bias, 2) * groups
            self.past_bias = paddle.expand(past_bias, [-1, kv_heads, rows, -1])

    def _expand(self, bias: paddle.Tensor) -> paddle.Tensor:
        """Match a ``[b,1,s,T]`` bias to the scores' ``[b,kv,g*s,T]`` rows, materialised once per call: a
        broadcasting add costs ~120 us per layer at batch 16, a same-shape one ~4 us."""
        if not paddle.in_dynamic_mode():
            bias = paddle.tile(bias, [1, 1, self.groups, 1]) if self.groups > 1 else bias
            return paddle.expand(bias, [-1, self.kv_heads, -1, -1])
        rows = bias.shape[2]
        if rows > 1 and self.groups > 1:  # causal rows must follow q's [g, s] row order
            bias = paddle.tile(bias, [1, 1, self.groups, 1])
            rows = bias.shape[2]
        elif rows == 1:
            rows = self.groups
        return paddle.expand(bias, [-1, self.kv_heads, rows, -1]).contiguous()

    def attend(self, layer: int, q: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> paddle.Tensor:
        """Attention for one layer (and the cache write / output bookkeeping)."""
        past_k, past_v = self.caches[2 * layer], self.caches[2 * layer + 1]
        if not self.inplace:
            self.outputs += [k, v]
            return attend_split(q, k, v, past_k, past_v, self.new_bias, self.past_bias, self.head_bias)
        width, col, span = k.shape[2], self.col, self.span
        if width == 1 and not self.blocks and self.head_bias is None:  # decode: one custom operator
            fast = fastmm.attend_decode(q, k, v, past_k, past_v, self.new_bias, col, span)
            if fast is not None:
                return fast
        past_k[:, :, col : col + width, :] = k
        past_v[:, :, col : col + width, :] = v
        if col == 0 and span == width:  # prefill without prefix: the new entries are all there is
            keys, values = k, v
        elif span == past_k.shape[2]:
            keys, values = past_k, past_v
        else:
            keys, values = past_k[:, :, :span], past_v[:, :, :span]
        if not self.blocks:
            return attend(q, keys, values, self.new_bias, self.head_bias)
        outs = [
            attend(q[:, start:stop], keys[:, :, :end], values[:, :, :end], bias, hb)
            for start, stop, end, bias, hb in self.blocks
        ]
        return paddle.concat(outs, axis=1)


def fold_rows(weight: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """``diag(scale) @ weight`` as a new tensor (folds a norm weight into the next ``[in, out]`` matmul)."""
    return weight * paddle.unsqueeze(scale.astype(weight.dtype), 1)


def fold_q_scale(
    weight: paddle.Tensor, bias: paddle.Tensor | None, q_cols: int, factor: float
) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """New ``[q | k | v]`` weight/bias with the first ``q_cols`` columns multiplied by ``factor``."""
    scale = paddle.concat([paddle.full([q_cols], factor), paddle.ones([weight.shape[-1] - q_cols])])
    scale = scale.astype(weight.dtype)
    return weight * scale, (None if bias is None else bias * scale)


def rope(x: paddle.Tensor, cos: paddle.Tensor, sin_signed: paddle.Tensor) -> paddle.Tensor:
    """``x * cos + rotate_half(x) * sin`` for ``x [b, s, heads, d]``; ``rotate_half`` is a ``roll`` by half a
    head (the cheapest swap of the two halves on CPU), its sign folded into ``sin_signed``."""
    return x * cos + paddle.roll(x, x.shape[-1] // 2, axis=-1) * sin_signed


def rope_factors(
    positions: paddle.Tensor, cos_table: paddle.Tensor, sin_table: paddle.Tensor, heads: int
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``cos``/``sin`` rows for ``positions [b, s]`` expanded to ``[b, s, heads, d]`` once per call, so every
    layer's RoPE multiplies same-shape tensors (paddle's CPU kernels broadcasting over a middle axis are
    ~20x slower: 64 us instead of 3 us at batch 16)."""
    cos = paddle.expand(paddle.unsqueeze(F.embedding(positions, cos_table), 2), [-1, -1, heads, -1])
    sin = paddle.expand(paddle.unsqueeze(F.embedding(positions, sin_table), 2), [-1, -1, heads, -1])
    if paddle.in_dynamic_mode():
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


def rope_tables(cos: paddle.Tensor, sin: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``[max_pos, d]`` rotate_half-layout tables -> ``(cos, sin with the first half negated)``, float32."""
    half = cos.shape[-1] // 2
    sign = paddle.concat([-paddle.ones([half]), paddle.ones([cos.shape[-1] - half])])
    return cos.astype("float32"), (sin * sign).astype("float32")


def half_split_order(head_dim: int, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per-head column order ``[first, pass1 | second, pass2]`` so a rotation pairing ``first[i]`` with
    ``second[i]`` becomes a plain ``rotate_half`` (the other columns pass through, cos 1 / sin 0)."""
    half = head_dim // 2
    rest = np.setdiff1d(np.arange(head_dim), np.concatenate([first, second]))
    n = half - len(first)
    return np.concatenate([first, rest[:n], second, rest[n:]]).astype(np.int64)


def partial_tables(
    cos_r: paddle.Tensor, sin_r: paddle.Tensor, head_dim: int
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Tables for :func:`half_split_order` layouts from per-pair ``cos_r/sin_r [max_pos, n_pairs]``."""
    pad = head_dim // 2 - cos_r.shape[-1]
    ones, zeros = paddle.ones([cos_r.shape[0], pad]), paddle.zeros([cos_r.shape[0], pad])
    return rope_tables(paddle.concat([cos_r, ones] * 2, axis=-1), paddle.concat([sin_r, zeros] * 2, axis=-1))


def qk_column_index(heads: int, kv_heads: int, head_dim: int, order: np.ndarray) -> paddle.Tensor:
    """Column index applying ``order`` inside every query and key head of a ``[q | k | v]`` projection."""
    qk = heads + kv_heads
    cols = (np.arange(qk)[:, None] * head_dim + order).reshape(-1)
    tail = np.arange(qk * head_dim, (qk + kv_heads) * head_dim)
    return paddle.to_tensor(np.concatenate([cols, tail]))


class StepKernel(paddle.nn.Layer):
    """Base of the per-family kernels (see the module docstring for the ``forward`` contract)."""

    family: str = ""
    positions_after_prefix: bool = False  # positions/ALiBi continue after a prefix (gpt, opt, bloom)
    uses_keypos: bool = False  # reads ``past_keypos`` (ALiBi)
    # how the family's prefix cache maps to ``[b, kv, P, d]`` (None: already that layout)
    prefix_perm: tuple[int, ...] | None = (0, 2, 1, 3)  # paddlenlp's usual ``[b, P, kv, d]``
    dim_order: np.ndarray | None = None  # per-head key column order the kernel uses (ChatGLM families)

    num_layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    dtype_name: str = "float32"  # what the kernel computes in (activations, KV cache)
    weight_dtype: str = "float32"  # what its weights are stored in
    upcast: bool = False  # half-precision weights on CPU: each is widened to float32 where it is used
    q_scale: float = 1.0  # applied to the queries at run time when it is not folded into the weights
    quantized: bool = False  # low-bit decoder linears (llm.quant): nothing folded, see decoders.quant
    fast_mm: bool = False  # plain weight layouts for the llm.kernels custom ops (see decoders.fastmm)

    def _set_dtypes(self, weight: paddle.Tensor) -> None:
        """Storage and compute dtypes from a weight: paddle 2.6 has no CPU kernels for half-precision matmul,
        norms or softmax, so on CPU such weights stay half (half the memory) and are computed in float32.
        Also decides the weight layouts (:func:`fastmm.layout_for_kernels`)."""
        self.weight_dtype = str(weight.dtype).replace("paddle.", "")
        self.upcast = weight.dtype in HALF and weight.place.is_cpu_place()
        self.dtype_name = "float32" if self.upcast else self.weight_dtype
        self.fast_mm = fastmm.layout_for_kernels(weight)

    def _fold_q(
        self, weight: paddle.Tensor, bias: paddle.Tensor | None, q_cols: int
    ) -> tuple[paddle.Tensor, paddle.Tensor | None]:
        """Fold ``1/sqrt(head_dim)`` into the query columns; half-precision weights on CPU are kept as stored
        (a fold would round them a second time), and so are low-bit ones (:attr:`quantized`); the queries are then
        scaled at run time instead."""
        factor = 1.0 / math.sqrt(self.head_dim)
        if self.keep_weights:
            self.q_scale = factor
            return weight, bias
        return fold_q_scale(weight, bias, q_cols, factor)

    @property
    def keep_weights(self) -> bool:
        """Weights are used as stored: no norm or query-scale folding (half precision on CPU, or low-bit)."""
        return self.upcast or self.quantized

    def out_major(self, weight: Any) -> Any:
        """``weight`` [K, N] as a contiguous ``[N, K]`` copy when the custom ops read it (:attr:`fast_mm`, a 2-D
        float32 tensor that is not a model parameter, i.e. already the kernel's own copy: fused or folded), else
        as it is. The products then stream each output's weights contiguously (measured with the fp32 kernels on
        the step's shapes: 40 GB/s against 33 GB/s for ``[K, N]``). Marked for :meth:`_matmul` by identity until
        :meth:`_reg` names it."""
        if (
            not self.fast_mm
            or not isinstance(weight, paddle.Tensor)
            or weight.dtype != paddle.float32
            or len(weight.shape) != 2
            or isinstance(weight, paddle.base.framework.EagerParamBase)
        ):
            return weight
        out = paddle.transpose(weight, [1, 0]).contiguous()
        self.__dict__.setdefault("_nk_ids", set()).add(id(out))
        return out

    def is_out_major(self, name: str | None) -> bool:
        """Whether the tensor registered as ``name`` is stored ``[N, K]`` (:meth:`out_major`)."""
        return name in self.__dict__.get("_nk", ())

    def _scale_q(self, q: paddle.Tensor) -> paddle.Tensor:
        return q if self.q_scale == 1.0 else q * self.q_scale

    def _reg(self, name: str, tensor: paddle.Tensor | None) -> str | None:
        """Register ``tensor`` (once, however often it is shared) and return the name to read it by.

        ``forward`` reads weights through ``getattr(self, name)`` so ``paddle.jit.to_static`` sees them as the
        layer's persistable variables and ``jit.save`` stores each tensor once. The model's own parameters
        are shared, not copied.
        """
        if tensor is None:
            return None
        names = self.__dict__.setdefault("_tensor_names", {})
        uses = self.__dict__.setdefault("_tensor_uses", {})
        uses[id(tensor)] = uses.get(id(tensor), 0) + 1
        if id(tensor) not in names:
            names[id(tensor)] = name
            if id(tensor) in self.__dict__.get("_nk_ids", ()):
                self.__dict__.setdefault("_nk", set()).add(name)
            if isinstance(tensor, paddle.base.framework.EagerParamBase):
                self.add_parameter(name, tensor)
            else:
                self.register_buffer(name, tensor, persistable=True)
        return names[id(tensor)]

    def _pair(self, name: str, wb: tuple) -> tuple[Any, str | None]:
        """Register a ``(weight, bias)`` pair; a low-bit weight registers its buffers (:func:`register`)."""
        weight = register(self, name, wb[0]) if is_quant(wb[0]) else self._reg(f"{name}_w", wb[0])
        return weight, self._reg(f"{name}_b", wb[1])

    def _t(self, name: str | None) -> paddle.Tensor | None:
        """The tensor registered as ``name`` in the compute dtype (widened when :attr:`upcast`)."""
        if name is None:
            return None
        tensor = getattr(self, name)
        if self.upcast and tensor.dtype in HALF:
            parts = self.__dict__.get("_bits", {}).get(name)
            if parts is None:
                return widen(tensor)
            wide = [widen_bits(bits) for _, _, bits in parts]
            return wide[0] if len(wide) == 1 else paddle.concat(wide, axis=0)
        return tensor

    def _wb(self, names: tuple[str | None, str | None]) -> tuple[paddle.Tensor, paddle.Tensor | None]:
        return self._t(names[0]), self._t(names[1])

    def _matmul(self, x: paddle.Tensor, name: str) -> paddle.Tensor:
        """``x @ W`` for the weight registered as ``name``: a decode-shaped call on a 2-D float32 / bfloat16 weight
        runs the custom kernel (:func:`fastmm.kn`, bfloat16 read as stored). Otherwise paddle's matmul; a bfloat16
        weight on CPU is then widened in row chunks of at most :data:`WIDEN_BYTES` (2-D ``[in, out]``: partial
        products over the input rows are summed; 3-D blocks: the blocks' products are concatenated), so no float32
        copy of a large matrix is ever made."""
        fast = fastmm.product(self, x, name) if self.fast_mm else None
        if fast is not None:
            return fast
        if self.is_out_major(name):
            return paddle.matmul(x, self._t(name), transpose_y=True)
        parts = self.__dict__.get("_bits", {}).get(name) if self.upcast else None
        if parts is None or not paddle.in_dynamic_mode():
            return paddle.matmul(x, self._t(name))
        if len(parts) == 1:
            return paddle.matmul(x, widen_bits(parts[0][2]))
        if len(parts[0][2].shape) == 3:
            return paddle.concat([paddle.matmul(x, widen_bits(bits)) for _, _, bits in parts], axis=0)
        out = None
        for start, stop, bits in parts:
            part = paddle.matmul(x[..., start:stop], widen_bits(bits))
            out = part if out is None else out + part
        return out

    def _linear(self, x: paddle.Tensor, names: tuple[str | None, str | None]) -> paddle.Tensor:
        """:func:`linear` through :meth:`_matmul` (a low-bit weight through :meth:`_qmatmul`)."""
        out = self._qmatmul(x, names[0]) if is_quant_ref(names[0]) else self._matmul(x, names[0])
        bias = self._t(names[1])
        return out if bias is None else out + bias

    def _qmatmul(self, x: paddle.Tensor, ref: Any) -> paddle.Tensor:
        """``x @ W`` for a registered low-bit weight (:func:`llm.infer.decoders.quant.quant_linear`, which runs
        the int8 / int4 custom kernels for decode-shaped calls)."""
        return kernel_linear(self, x, ref)

    def _blocked_linear(self, x: paddle.Tensor, names: tuple[str | None, str | None]) -> paddle.Tensor:
        """:func:`blocked_linear` through :meth:`_matmul`."""
        out = self._matmul(paddle.reshape(x, [1, -1, x.shape[-1]]), names[0])
        bias = self._t(names[1])
        return out if bias is None else out + bias

    def _rows(self, ids: paddle.Tensor, name: str) -> paddle.Tensor:
        """Embedding lookup of ``ids`` in the table ``name``: gathered in the storage dtype, then widened (a
        half-precision table is never widened whole)."""
        out = F.embedding(ids, getattr(self, name))
        return widen(out) if self.upcast and out.dtype in HALF else out

    def keep_bits(self) -> None:
        """Cache int16 bit views of the bfloat16 tensors, split along the first axis into chunks of at most
        :data:`WIDEN_BYTES` once widened (views: no copies), for :meth:`_t` and :meth:`_matmul`."""
        if not (self.upcast and paddle.in_dynamic_mode()):
            return
        tensors = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        parts: dict[str, list[tuple[int, int, paddle.Tensor]]] = {}
        for name, tensor in tensors.items():
            if tensor.dtype != paddle.bfloat16 or tensor.ndim == 0:
                continue
            bits, rows = bf16_bits(tensor), int(tensor.shape[0])
            chunks = min(rows, -(-4 * int(np.prod(tensor.shape)) // WIDEN_BYTES))
            step = -(-rows // max(1, chunks))  # equal chunks
            with stride_kernels():
                parts[name] = [(s, min(rows, s + step), bits[s : s + step]) for s in range(0, rows, step)]
        self.__dict__["_bits"] = parts

    def enable_blocked_head(self, name: str, transposed: bool, block: int = HEAD_BLOCK) -> None:
        """Add a copy of the LM head as ``[n, hidden, block]`` column blocks (vocab zero-padded to
        ``n * block``, buffer ``lm_head_blocks``); :meth:`_logits` then runs one batched matmul over the blocks
        (the exported graph too, which then stores the blocked copy instead of the head).

        Measured on this CPU (hidden 576, vocab 49152, head not in cache): 16 rows 12.3 ms through a
        ``[V, hidden]`` head (``transpose_y``) and 17.2 ms through ``[hidden, V]``, 6.3 ms blocked; one row
        4.3 ms / 8.5 ms / 4.0 ms.

        Not made when the kernel uses the custom ops (:attr:`fast_mm`): they read the head in place at any batch.
        """
        if self.fast_mm or "_head_q" in self.__dict__:
            return
        head = self._t(name)
        if transposed:
            head = paddle.transpose(head, [1, 0])
        hidden, vocab = head.shape
        blocks = -(-vocab // block)
        if blocks * block > vocab:
            head = paddle.concat([head, paddle.zeros([hidden, blocks * block - vocab], head.dtype)], axis=1)
        blocked = paddle.transpose(paddle.reshape(head, [hidden, blocks, block]), [1, 0, 2])
        self.register_buffer("lm_head_blocks", blocked.contiguous(), persistable=True)
        self.__dict__["_head_vocab"] = vocab

    def quantize_head(self) -> None:
        """Read the LM head from an int8 per-channel copy from now on (``quant_lm_head``; see
        :func:`llm.infer.decoders.quant.quantize_head`); the float head is no longer registered unless the
        embedding shares it. Call before :meth:`enable_blocked_head` (which it replaces)."""
        name, transposed = self.head_layout()
        self.__dict__["_head_q"] = quantize_head(self, name, transposed)
        head = getattr(self, name)
        if self.__dict__["_tensor_uses"].get(id(head)) == 1:  # registered for the head only
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)

    def _logits(self, last: paddle.Tensor, name: str, transposed: bool) -> paddle.Tensor:
        """``last [b, hidden] -> [b, V]`` through the head stored as ``name`` (or its blocked copy, or its int8
        copy: :meth:`quantize_head`)."""
        head_q = self.__dict__.get("_head_q")
        if head_q is not None:
            chunked = fastmm.quant_head_chunks(self, last, head_q)
            return self._qmatmul(last, head_q) if chunked is None else chunked
        vocab = self.__dict__.get("_head_vocab")
        fast = fastmm.head(self, last, name, transposed) if self.fast_mm and vocab is None else None
        if fast is not None:
            return fast
        if vocab is None:
            return paddle.matmul(last, self._t(name), transpose_y=transposed)
        head = self.lm_head_blocks
        out = self._matmul(paddle.unsqueeze(last, 0), "lm_head_blocks")  # [n, b, block]
        if not (paddle.in_dynamic_mode() and last.shape[0] == 1):
            out = paddle.transpose(out, [1, 0, 2])
        out = paddle.reshape(out, [-1, head.shape[0] * head.shape[2]])
        return out if head.shape[0] * head.shape[2] == vocab else out[:, :vocab]

    def prefix_cache(self, prefix_model: Any, batch: int = 1) -> list[tuple[paddle.Tensor, paddle.Tensor]]:
        """The prefix as ``[(k, v)]`` per layer, each ``[batch, kv_heads, P, head_dim]`` in kernel layout
        (:attr:`prefix_perm` applied, keys in :attr:`dim_order`)."""
        with paddle.no_grad():
            past = prefix_model._get_past_key_values(batch)
        order = None if self.dim_order is None else paddle.to_tensor(self.dim_order)
        out = []
        for item in past:
            k, v = (item.k, item.v) if hasattr(item, "k") else (item[0], item[1])  # opt: a Cache tuple
            if self.prefix_perm is not None:
                k, v = (
                    paddle.transpose(k, list(self.prefix_perm)),
                    paddle.transpose(v, list(self.prefix_perm)),
                )
            if order is not None:
                k = paddle.index_select(k, order, axis=3)
            out.append((k.astype(self.dtype_name), v.astype(self.dtype_name)))
        return out

    def head_layout(self) -> tuple[str, bool]:
        """``(buffer name, transposed)`` of the LM head (``transposed``: stored ``[V, hidden]``)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Geometry for the static-export metadata."""
        return {
            "family": self.family,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_positions": self.max_positions,
            "positions_after_prefix": self.positions_after_prefix,
            "uses_keypos": self.uses_keypos,
        }


def prompt_biases(mask: np.ndarray) -> np.ndarray:
    """Causal + key-padding additive bias ``[b, 1, s, s]`` for a left-padded prompt."""
    s = mask.shape[1]
    causal = np.tril(np.ones((s, s), dtype=bool))
    keep = causal[None] & mask.astype(bool)[:, None, :]
    return np.where(keep, 0.0, NEG).astype(np.float32)[:, None]
