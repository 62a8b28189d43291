"""Linear layers with a low-bit base weight for PEFT training, and the LoRA layer on top of them.

:class:`LowBitLinear` keeps only the quantized storage of a ``[K, N]`` weight as buffers (no float copy):

* ``nf4`` / ``fp4`` (QLoRA): block-wise 4-bit code-book indices with one absmax per block, or double-quantized
  absmax values (:mod:`llm.quant.codebooks`). The indices are packed two per byte with element ``i`` in the low
  nibble and element ``i + numel / 2`` in the high nibble of byte ``i`` ("halves" order), so dequantizing is two
  lookups and one concatenation, without an interleaving copy.
* ``weight_only_int8`` / ``weight_only_int4``: the out-major int8 / packed int4 storage with per-channel scales
  of :mod:`llm.quant.formats` (round-to-nearest), the same as post-training quantization stores.

The forward dequantizes the weight for the product and drops it; the backward dequantizes it again for the input
gradient (:class:`_LowBitMatmul`), so autograd never holds a float copy of a layer's base weight. The base gets no
gradient: only the LoRA weights (:class:`LowBitLoRALinear`) and, for Prefix tuning, the prefix train.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
from paddle.autograd import PyLayer

from llm.errors import ConfigError
from llm.quant.codebooks import CODEBOOKS, quantize_blockwise, unpack_indices
from llm.quant.formats import WEIGHT_BITS, rtn
from llm.quant.layers import dequantize_tensor

#: the ``weight_quantize_algo`` values this package trains on (spec §3.1)
LOW_BIT_ALGOS = ("nf4", "fp4", "weight_only_int8", "weight_only_int4")


class LowBitLinear(nn.Layer):
    """``y = x @ W + b`` with ``W`` stored low-bit (see the module docstring); built empty, filled by
    :meth:`quantize_from` (tensor by tensor while a model loads)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        algo: str,
        *,
        has_bias: bool = False,
        blocksize: int = 64,
        double_quant: bool = False,
        double_blocksize: int = 256,
    ) -> None:
        super().__init__()
        if algo not in LOW_BIT_ALGOS:
            raise ConfigError(f"weight_quantize_algo {algo!r} is not one of {', '.join(LOW_BIT_ALGOS)}")
        self.in_features, self.out_features, self.algo = int(in_features), int(out_features), algo
        self.blocksize, self.double_quant, self.double_blocksize = (
            int(blocksize),
            bool(double_quant),
            int(double_blocksize),
        )
        numel = self.in_features * self.out_features
        if algo in CODEBOOKS:
            if numel % 2 or numel % self.blocksize:
                raise ConfigError(
                    f"a {self.in_features} x {self.out_features} weight cannot be cut into blocks of {self.blocksize}"
                )
            blocks = numel // self.blocksize
            self.register_buffer("packed", paddle.zeros([numel // 2], "uint8"), persistable=True)
            self.register_buffer("code", paddle.to_tensor(CODEBOOKS[algo]), persistable=False)
            if self.double_quant:
                scales = -(-blocks // self.double_blocksize)
                self.register_buffer("absmax_q", paddle.zeros([blocks], "int8"), persistable=True)
                self.register_buffer("absmax_scale", paddle.ones([scales], "float32"), persistable=True)
                self.register_buffer("absmax_mean", paddle.zeros([1], "float32"), persistable=True)
            else:
                self.register_buffer("absmax", paddle.ones([blocks], "float32"), persistable=True)
        else:
            bits = WEIGHT_BITS[algo]
            cols = self.in_features // 2 if bits == 4 else self.in_features
            self.register_buffer(
                "qweight",
                paddle.zeros([self.out_features, cols], "uint8" if bits == 4 else "int8"),
                persistable=True,
            )
            self.register_buffer("scales", paddle.ones([self.out_features, 1], "float32"), persistable=True)
        self.bias = (
            self.create_parameter([self.out_features], dtype="float32", is_bias=True) if has_bias else None
        )
        if self.bias is not None:
            self.bias.stop_gradient = True  # the base is frozen (paddlenlp's LoRA freezes base biases too)

    # ------------------------------------------------------------------------------ storage
    def quantize_from(self, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
        """Fill the storage from a float ``[K, N]`` weight (numpy; freed by the caller afterwards)."""
        weight = np.asarray(weight, np.float32)
        if list(weight.shape) != [self.in_features, self.out_features]:
            raise ConfigError(
                f"weight of shape {list(weight.shape)} for a {self.in_features} x {self.out_features} layer"
            )
        if self.algo in CODEBOOKS:
            bq = quantize_blockwise(
                weight, self.algo, self.blocksize, self.double_quant, self.double_blocksize
            )
            idx = unpack_indices(bq.packed)
            half = idx.size // 2
            self.packed.set_value((idx[:half] | (idx[half:] << 4)).astype(np.uint8))
            if self.double_quant:
                self.absmax_q.set_value(bq.absmax_q)
                self.absmax_scale.set_value(bq.absmax_scale)
                self.absmax_mean.set_value(np.asarray([bq.absmax_mean], np.float32))
            else:
                self.absmax.set_value(bq.absmax)
        else:
            qw = rtn(weight, WEIGHT_BITS[self.algo], -1)
            self.qweight.set_value(qw.data)
            self.scales.set_value(qw.scales)
        if bias is not None:
            self.bias.set_value(np.asarray(bias, np.float32))

    def block_absmax(self) -> paddle.Tensor:
        """float32 absmax per block (decoded when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        scales = paddle.repeat_interleave(self.absmax_scale, self.double_blocksize)[: self.absmax_q.shape[0]]
        return self.absmax_q.astype("float32") * scales + self.absmax_mean

    def dequantized_weight(self) -> paddle.Tensor:
        """float32 ``[K, N]``: the weight the forward multiplies by."""
        with paddle.no_grad():
            if self.algo not in CODEBOOKS:
                w = dequantize_tensor(self.qweight, self.scales, WEIGHT_BITS[self.algo])
                return paddle.transpose(w, [1, 0])
            u = self.packed.astype("int32")
            high = paddle.floor_divide(u, paddle.full([], 16, "int32"))
            idx = paddle.concat([u - high * 16, high])
            values = paddle.gather(self.code, idx)
            w = paddle.reshape(values, [-1, self.blocksize]) * paddle.unsqueeze(self.block_absmax(), -1)
            return paddle.reshape(w, [self.in_features, self.out_features])

    def nbytes(self) -> int:
        """Bytes of the stored base weight (packed values and scales; bias excluded)."""
        names = ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_mean", "qweight", "scales")
        total = 0
        for name in names:
            t = self._buffers.get(name)
            if t is not None:
                total += int(np.prod(t.shape)) * t.element_size()
        return total

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = _LowBitMatmul.apply(x, self)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        dq = f", double_quant {self.double_blocksize}" if self.double_quant else ""
        block = f", blocksize={self.blocksize}{dq}" if self.algo in CODEBOOKS else ""
        return f"in={self.in_features}, out={self.out_features}, {self.algo}{block}"


class _LowBitMatmul(PyLayer):
    """``x @ dequant(W)`` whose backward dequantizes ``W`` again instead of keeping it (nothing but ``x``'s
    shape is saved): a float copy of each base weight exists only while its product runs."""

    @staticmethod
    def forward(ctx: Any, x: paddle.Tensor, layer: LowBitLinear) -> paddle.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        w = layer.dequantized_weight()
        out = paddle.matmul(x.astype("float32") if x.dtype != paddle.float32 else x, w)
        return out if out.dtype == x.dtype else out.astype(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: paddle.Tensor) -> paddle.Tensor:
        w = ctx.layer.dequantized_weight()
        g = paddle.matmul(
            grad.astype("float32") if grad.dtype != paddle.float32 else grad, w, transpose_y=True
        )
        return g if g.dtype == ctx.dtype else g.astype(ctx.dtype)


class LowBitLoRALinear(nn.Layer):
    """LoRA on a :class:`LowBitLinear` base: ``base(x) + dropout(x) @ lora_A @ lora_B * scaling`` (paddlenlp's
    ``LoRALinear`` parameter names, initialisation and scaling, so adapters save, load and merge the same way)."""

    def __init__(
        self,
        base: LowBitLinear,
        r: int,
        lora_alpha: int,
        lora_dropout: float = 0.0,
        rslora: bool = False,
        lora_plus_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ConfigError(f"lora_rank must be a positive integer, got {r!r}")
        self.base, self.r, self.lora_alpha = base, r, lora_alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        self.merged = False
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else (lambda x: x)
        self.scaling = lora_alpha / math.sqrt(r) if rslora else lora_alpha / r
        self.lora_A = self.create_parameter(
            shape=[self.in_features, r],
            dtype="float32",
            is_bias=False,
            default_initializer=nn.initializer.KaimingUniform(
                negative_slope=math.sqrt(5), nonlinearity="leaky_relu"
            ),
        )
        self.lora_B = self.create_parameter(
            shape=[r, self.out_features],
            dtype="float32",
            is_bias=False,
            attr=paddle.ParamAttr(
                initializer=nn.initializer.Constant(value=0.0), learning_rate=lora_plus_scale
            ),
        )

    @property
    def bias(self) -> paddle.Tensor | None:
        return self.base.bias

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        out = self.base(x)
        delta = paddle.matmul(paddle.matmul(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling
        return out + delta.astype(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"
