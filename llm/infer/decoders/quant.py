"""Low-bit linears (:class:`llm.quant.layers.QuantLinear`) inside the step kernels.

A kernel reads a quantized projection as a :class:`QWeight` (the layer's own ``qweight`` / ``scales`` buffers,
out-major ``[N, K]``, see :mod:`llm.quant.formats`) instead of a float ``[K, N]`` weight. Fusing QKV or gate/up
concatenates the low-bit rows along N (axis 0 of ``qweight`` and ``scales``) when the parts share ``bits``,
``group_size`` and, for A8W8, the same ``act_scale`` / ``smooth`` / ``shift``; otherwise the parts stay
separate (:class:`QParts`) and their outputs are concatenated. Column reorders of a fused projection (per-head
``[q k v]`` interleaving, ChatGLM's rotary column order) become row selections of the low-bit storage.

Every quantized product goes through :func:`quant_linear`. Decode-shaped calls (dygraph, at most
``llm.kernels.MAX_ROWS`` rows, custom ops loaded: :mod:`llm.infer.decoders.fastmm`) run the native int8 / int4
kernels on the storage as it is; otherwise (long prefills, the exported graph, ``LLM_KERNELS=0``) it dequantizes one
layer's weight at a time with paddle ops (no float copy of the model):

* int8: ``cast`` to float32, ``x @ W^T``;
* int4: the packed bytes ``b`` are cast to float32 once; ``hi = floor(b / 16) - 8`` and
  ``lo = b - 16 * hi - 136`` (exact small integers), and ``x @ W^T = x[..., 0::2] @ lo^T + x[..., 1::2] @ hi^T``
  (low nibbles hold the even k): no interleaving copy (paddle's ``stack`` on the last axis costs ~40x a cast);
* per-channel scales multiply the ``[M, N]`` output; group scales multiply the dequantized weight.

A8W8 inputs are shifted, smoothed and put on the activation grid exactly as ``QuantLinear.prepare_input`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle

from llm.errors import ModelError
from llm.infer.decoders import fastmm
from llm.quant.layers import QuantLinear, fake_quant_act

Weight = Any  # paddle.Tensor ([K, N] float) | QWeight | QParts


@dataclass
class QWeight:
    """A (possibly fused) low-bit projection while a kernel loads it."""

    qweight: paddle.Tensor  # int8 [N, K] | uint8 [N, K / 2]
    scales: paddle.Tensor  # float32 [N, G]
    bits: int
    group_size: int = -1
    act_scale: paddle.Tensor | None = None  # A8W8: [1]
    smooth: paddle.Tensor | None = None  # [K]
    shift: paddle.Tensor | None = None  # [K]

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1]) * (2 if self.bits == 4 else 1)

    def take_rows(self, index: paddle.Tensor) -> QWeight:
        """The projection with its outputs reordered/selected by ``index`` (rows of the storage)."""
        rows = index.numpy().astype(np.int64)  # paddle 2.6 has no CPU index_select for int8 / uint8
        return QWeight(
            paddle.to_tensor(np.ascontiguousarray(self.qweight.numpy()[rows])),
            paddle.to_tensor(np.ascontiguousarray(self.scales.numpy()[rows])),
            self.bits,
            self.group_size,
            self.act_scale,
            self.smooth,
            self.shift,
        )


@dataclass
class QParts:
    """Projections of the same input whose outputs are concatenated (they could not be fused)."""

    parts: list[Weight] = field(default_factory=list)


@dataclass(frozen=True)
class QRef:
    """A registered :class:`QWeight`: buffer names on the kernel and the storage format."""

    qweight: str
    scales: str
    bits: int
    group_size: int
    act_scale: str | None = None
    smooth: str | None = None
    shift: str | None = None


@dataclass(frozen=True)
class PartsRef:
    """A registered :class:`QParts`: a :class:`QRef` or a float weight name per part."""

    parts: tuple[Any, ...]


# ------------------------------------------------------------------------------------------ loading
def is_quant(weight: Any) -> bool:
    """Whether a kernel weight is (partly) low-bit."""
    return isinstance(weight, QWeight | QParts)


def is_quant_ref(name: Any) -> bool:
    """Whether a registered name refers to a low-bit projection."""
    return isinstance(name, QRef | PartsRef)


def has_quant_layers(model: paddle.nn.Layer) -> bool:
    """Whether ``model`` holds any :class:`QuantLinear`."""
    return any(isinstance(layer, QuantLinear) for layer in model.sublayers())


def weight_of(layer: Any) -> Weight:
    """A linear layer's weight for a kernel: the float ``[K, N]`` tensor, or a :class:`QWeight`."""
    if isinstance(layer, QuantLinear):
        return QWeight(
            layer.qweight,
            layer.scales,
            layer.bits,
            layer.group_size,
            layer.act_scale,
            layer.smooth,
            layer.shift,
        )
    return layer.weight


def concat_bias(*layers: Any) -> paddle.Tensor | None:
    """The biases of linears whose outputs are concatenated (zeros for a layer without one; None if none has
    one): a Shift-quantized layer carries a bias its float original lacked."""
    biases = [getattr(layer, "bias", None) for layer in layers]
    present = [b for b in biases if b is not None]
    if not present:
        return None
    widths = [
        layer.out_features if isinstance(layer, QuantLinear) else int(layer.weight.shape[-1])
        for layer in layers
    ]
    return paddle.concat(
        [b if b is not None else paddle.zeros([n], present[0].dtype) for b, n in zip(biases, widths)], axis=-1
    )


def _same(a: paddle.Tensor | None, b: paddle.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.shape == b.shape and bool(np.array_equal(a.numpy(), b.numpy())))


def fusable(a: QWeight, b: QWeight) -> bool:
    """Same storage format and input, and (A8W8) the same activation scale, smoothing and shift."""
    return (
        a.bits == b.bits
        and a.group_size == b.group_size
        and a.in_features == b.in_features
        and all(_same(getattr(a, n), getattr(b, n)) for n in ("act_scale", "smooth", "shift"))
    )


def concat_out(*weights: Weight) -> Weight | None:
    """Weights of projections of one input, concatenated along the outputs (None if any is None).

    Float weights concatenate as ``[K, N]`` (axis -1), low-bit ones along their rows when :func:`fusable`;
    anything else becomes a :class:`QParts`.
    """
    if any(w is None for w in weights):
        return None
    if not any(is_quant(w) for w in weights):
        return paddle.concat(list(weights), axis=-1)
    first = weights[0]
    if all(isinstance(w, QWeight) for w in weights) and all(fusable(first, w) for w in weights[1:]):
        return QWeight(
            paddle.concat([w.qweight for w in weights], axis=0),
            paddle.concat([w.scales for w in weights], axis=0),
            first.bits,
            first.group_size,
            first.act_scale,
            first.smooth,
            first.shift,
        )
    parts: list[Weight] = []
    for w in weights:
        parts += w.parts if isinstance(w, QParts) else [w]
    return QParts(parts)


def reorder_out(weight: Weight, index: paddle.Tensor) -> Weight:
    """``weight`` with its output columns taken in ``index`` order (a low-bit one: its rows)."""
    if isinstance(weight, QWeight):
        return weight.take_rows(index)
    if isinstance(weight, QParts):
        raise ModelError("the output columns of unfused low-bit projections cannot be reordered")
    return paddle.index_select(weight, index, axis=1)


def out_index(fn: Any, width: int) -> paddle.Tensor:
    """The column order a reshaping ``fn`` (applied to a 1-D bias-like tensor) produces, as an index."""
    return fn(paddle.arange(width, dtype="int64"))


def register(kernel: Any, name: str, weight: Weight) -> QRef | PartsRef:
    """Register ``weight``'s tensors on ``kernel`` (``StepKernel._reg``: low-bit buffers stay int8/uint8
    persistables in an export) and return the reference ``forward`` reads them by."""
    if isinstance(weight, QParts):
        refs = []
        for i, part in enumerate(weight.parts):
            refs.append(
                register(kernel, f"{name}_p{i}", part)
                if is_quant(part)
                else kernel._reg(f"{name}_p{i}_w", part)
            )
        return PartsRef(tuple(refs))
    return QRef(
        kernel._reg(f"{name}_qw", weight.qweight),
        kernel._reg(f"{name}_qs", weight.scales),
        weight.bits,
        weight.group_size,
        kernel._reg(f"{name}_act", weight.act_scale),
        kernel._reg(f"{name}_smooth", weight.smooth),
        kernel._reg(f"{name}_shift", weight.shift),
    )


# ------------------------------------------------------------------------------------------ compute
def _int4_halves(packed: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``uint8 [N, K / 2]`` -> float32 grid values of the even and of the odd k, each ``[N, K / 2]``."""
    b = packed.astype("float32")  # 0 .. 255
    hi = paddle.floor(paddle.scale(b, 0.0625, -8.0))  # high nibble - 8
    lo = b + paddle.scale(hi, -16.0, -136.0)  # b - 16 * (hi + 8) - 8: low nibble - 8
    return lo, hi


def _group_scaled(w: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    """``w [N, C]`` (C columns of G equal groups) times the group scales ``[N, G]``."""
    n, cols = w.shape
    g = scales.shape[1]
    return paddle.reshape(paddle.reshape(w, [n, g, cols // g]) * paddle.unsqueeze(scales, -1), [n, cols])


def quant_linear(
    x: paddle.Tensor,
    qweight: paddle.Tensor,
    scales: paddle.Tensor,
    bits: int,
    group_size: int = -1,
    bias: paddle.Tensor | None = None,
    act_scale: paddle.Tensor | None = None,
    smooth: paddle.Tensor | None = None,
    shift: paddle.Tensor | None = None,
    kernels: bool | None = None,
) -> paddle.Tensor:
    """``x [..., K] @ deq(W)^T (+ bias)`` for a low-bit ``W`` (see the module docstring): the single entry
    point of quantized products in the step kernels (dygraph and the exported graph). A decode-shaped call
    (:func:`fastmm.small`) on CPU runs the int8 / int4 custom kernel on the storage as it is (shift, smoothing,
    activation fake-quant and bias around it as here); otherwise the weight is dequantized with paddle ops.
    ``kernels``: False never uses them, True skips the CPU-placement check (a kernel built for them)."""
    if x.dtype != paddle.float32:
        x = x.astype("float32")
    if shift is not None:  # the order of QuantLinear.prepare_input
        x = x - shift
    if smooth is not None:
        x = x / smooth
    if act_scale is not None:
        x = fake_quant_act(x, act_scale)
    fast = None if kernels is False else fastmm.low_bit_product(x, qweight, scales, bits, kernels)
    if fast is not None:
        return fast if bias is None else fast + bias
    grouped = scales.shape[1] > 1
    if bits == 4:
        lo, hi = _int4_halves(qweight)
        if grouped:
            lo, hi = _group_scaled(lo, scales), _group_scaled(hi, scales)
        out = paddle.matmul(x[..., 0::2], lo, transpose_y=True) + paddle.matmul(
            x[..., 1::2], hi, transpose_y=True
        )
    else:
        w = qweight.astype("float32")
        out = paddle.matmul(x, _group_scaled(w, scales) if grouped else w, transpose_y=True)
    if not grouped:
        out = out * paddle.reshape(scales, [-1])
    return out if bias is None else out + bias


def kernel_linear(kernel: Any, x: paddle.Tensor, ref: QRef | PartsRef) -> paddle.Tensor:
    """``x`` through the registered low-bit projection ``ref`` of ``kernel`` (no bias)."""
    if isinstance(ref, PartsRef):
        outs = [
            kernel_linear(kernel, x, part) if is_quant_ref(part) else kernel._matmul(x, part)
            for part in ref.parts
        ]
        return paddle.concat(outs, axis=-1)

    def get(name: str | None) -> paddle.Tensor | None:
        return None if name is None else getattr(kernel, name)

    return quant_linear(
        x,
        get(ref.qweight),
        get(ref.scales),
        ref.bits,
        ref.group_size,
        act_scale=get(ref.act_scale),
        smooth=get(ref.smooth),
        shift=get(ref.shift),
        kernels=kernel.fast_mm,
    )


def quantize_head(kernel: Any, name: str, transposed: bool) -> QRef:
    """Register an int8 per-channel (per vocabulary row, round-to-nearest: :func:`llm.quant.formats.rtn`) copy
    of the LM head ``name`` (stored ``[V, hidden]`` when ``transposed``, else ``[hidden, V]``) as
    ``lm_head_q_qw`` / ``lm_head_q_qs`` and return its reference; the head is then read as 1 byte per weight
    (:func:`quant_linear`), which llama.cpp's quantized files do too (their head is Q6_K / Q8_0)."""
    from llm.quant.formats import rtn

    head = kernel._t(name).astype("float32").numpy()
    stored = rtn(head.T if transposed else head, 8, -1)
    weight = QWeight(paddle.to_tensor(stored.data), paddle.to_tensor(stored.scales), 8, -1)
    return register(kernel, "lm_head_q", weight)
