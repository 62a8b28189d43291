"""``QuantLinear``: a drop-in for ``nn.Linear`` that keeps a :class:`~llm.quant.formats.QuantizedWeight`.

Weight-only (``weight_only_int8`` / ``weight_only_int4``): ``y = x @ deq(W) + b``, the dequantized weight made
for one layer at a time inside ``forward`` (never a float copy of the whole model). A8W8 adds a static
per-tensor activation scale: the input is first shifted and smoothed (``x' = (x - shift) / smooth``; both
optional, from Shift / SmoothQuant), then put on the int8 grid ``round(x' / act_scale)`` clipped to
``[-127, 127]`` — the product equals the int8 x int8 matmul rescaled by ``act_scale * scale``.

On CPU the product runs as a float32 matmul over the dequantized weight (paddle 2.6 has no CPU low-bit
kernels). On a CUDA build, per-channel weight-only layers on the GPU use paddle's ``weight_only_linear``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
import paddle.nn as nn

from llm.quant.formats import QuantizedWeight, groups

ACT_QMAX = 127.0


def dequantize_tensor(data: paddle.Tensor, scales: paddle.Tensor, bits: int) -> paddle.Tensor:
    """``float32 [N, K]`` from stored ``data`` (int8 ``[N, K]`` / packed uint8 ``[N, K / 2]``) and ``scales``."""
    if bits == 4:
        u = data.astype("int32")
        high = paddle.floor_divide(u, paddle.full([], 16, "int32"))
        low = u - high * 16
        values = paddle.reshape(paddle.stack([low, high], axis=-1), [data.shape[0], -1]) - 8
    else:
        values = data
    n, k = values.shape
    g = scales.shape[1]
    w = paddle.reshape(values.astype("float32"), [n, g, k // g]) * paddle.unsqueeze(scales, -1)
    return paddle.reshape(w, [n, k])


def fake_quant_act(x: paddle.Tensor, act_scale: paddle.Tensor) -> paddle.Tensor:
    """``x`` on the symmetric int8 grid of step ``act_scale`` (float values)."""
    return paddle.clip(paddle.round(x / act_scale), -ACT_QMAX, ACT_QMAX) * act_scale


class QuantLinear(nn.Layer):
    """A linear layer with low-bit weights (buffers ``qweight``, ``scales``; A8W8 also ``act_scale`` and
    optional ``smooth`` / ``shift``). ``weight`` is not kept; :meth:`dequantized_weight` gives ``[K, N]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int = -1,
        has_bias: bool = False,
        act_quant: bool = False,
        smooth: bool = False,
        shift: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.act_quant = int(bits), int(group_size), bool(act_quant)
        cols = self.in_features // 2 if bits == 4 else self.in_features
        dtype = "uint8" if bits == 4 else "int8"
        self.register_buffer("qweight", paddle.zeros([self.out_features, cols], dtype), persistable=True)
        g = groups(self.in_features, self.group_size)
        self.register_buffer("scales", paddle.ones([self.out_features, g], "float32"), persistable=True)
        self.bias = (
            self.create_parameter([self.out_features], dtype="float32", is_bias=True) if has_bias else None
        )
        for name, on, shape in (("act_scale", act_quant, [1]), ("smooth", smooth, [self.in_features])):
            self._optional_buffer(name, on, shape, 1.0)
        self._optional_buffer("shift", shift, [self.in_features], 0.0)
        self._gpu: tuple[paddle.Tensor, paddle.Tensor] | None = None

    def _optional_buffer(self, name: str, on: bool, shape: list[int], value: float) -> None:
        if on:
            self.register_buffer(name, paddle.full(shape, value, "float32"), persistable=True)
        else:
            setattr(self, name, None)

    @classmethod
    def from_weight(
        cls,
        qw: QuantizedWeight,
        bias: Any = None,
        *,
        act_scale: float | None = None,
        smooth: np.ndarray | None = None,
        shift: np.ndarray | None = None,
    ) -> QuantLinear:
        """A layer holding ``qw`` (and the A8W8 fields when ``act_scale`` is given)."""
        layer = cls(
            qw.in_features,
            qw.out_features,
            bits=qw.bits,
            group_size=qw.group_size,
            has_bias=bias is not None,
            act_quant=act_scale is not None,
            smooth=smooth is not None,
            shift=shift is not None,
        )
        layer.qweight.set_value(qw.data)
        layer.scales.set_value(qw.scales)
        if bias is not None:
            layer.bias.set_value(np.asarray(bias, np.float32))
        if act_scale is not None:
            layer.act_scale.set_value(np.asarray([act_scale], np.float32))
        if smooth is not None:
            layer.smooth.set_value(np.asarray(smooth, np.float32))
        if shift is not None:
            layer.shift.set_value(np.asarray(shift, np.float32))
        return layer

    def quantized_weight(self) -> QuantizedWeight:
        """The stored weight as numpy."""
        return QuantizedWeight(self.qweight.numpy(), self.scales.numpy(), self.bits, self.group_size)

    def dequantized_weight(self) -> paddle.Tensor:
        """``float32 [K, N]`` (paddle's ``nn.Linear`` layout)."""
        return paddle.transpose(dequantize_tensor(self.qweight, self.scales, self.bits), [1, 0])

    def prepare_input(self, x: paddle.Tensor) -> paddle.Tensor:
        """Shift, smooth and (A8W8) activation-quantize the input, in float32."""
        if x.dtype != paddle.float32:
            x = x.astype("float32")
        if self.shift is not None:
            x = x - self.shift
        if self.smooth is not None:
            x = x / self.smooth
        if self.act_quant:
            x = fake_quant_act(x, self.act_scale)
        return x

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        dtype = x.dtype
        if self._use_gpu_kernel(x):
            out = self._gpu_forward(x)
        else:
            w = dequantize_tensor(self.qweight, self.scales, self.bits)
            out = paddle.matmul(self.prepare_input(x), w, transpose_y=True)
            if self.bias is not None:
                out = out + self.bias
        return out if out.dtype == dtype else out.astype(dtype)

    # -------------------------------------------------------------------------------- CUDA builds
    def _use_gpu_kernel(self, x: paddle.Tensor) -> bool:
        return (
            paddle.is_compiled_with_cuda()
            and paddle.in_dynamic_mode()
            and not x.place.is_cpu_place()
            and not self.act_quant
            and self.group_size == -1
        )

    def _gpu_forward(self, x: paddle.Tensor) -> paddle.Tensor:  # pragma: no cover - needs a GPU
        from paddle.nn.quant import weight_only_linear, weight_quantize

        algo = "weight_only_int4" if self.bits == 4 else "weight_only_int8"
        if self._gpu is None:  # paddle's own (arch-specific) layout, made once from the stored grid
            self._gpu = weight_quantize(self.dequantized_weight().astype("float16"), algo=algo)
        weight, scale = self._gpu
        out = weight_only_linear(
            x.astype("float16"), weight, bias=self.bias, weight_scale=scale, weight_dtype=algo[-4:]
        )
        return out

    def extra_repr(self) -> str:
        kind = "a8w8" if self.act_quant else f"w{self.bits}"
        return f"in={self.in_features}, out={self.out_features}, {kind}, group_size={self.group_size}"
