"""NF4 / FP4 block-wise quantization (QLoRA) with optional double quantization of the block absmax values.

A weight is flattened (row-major, paddle's ``[K, N]``) and cut into blocks of ``blocksize`` consecutive values;
each block stores its absmax and 4-bit indices into a 16-value code book, two per byte (low nibble first, as in
:mod:`llm.quant.formats`). The code books are the published ones:

* **NF4** (Dettmers et al. 2023, "QLoRA", appendix E; bitsandbytes ``nf4``): quantiles of N(0, 1) scaled to
  [-1, 1], with an exact zero;
* **FP4** (bitsandbytes ``fp4``): 1 sign, 2 exponent, 1 mantissa bit; index bit 3 is the sign.

**Double quantization** (QLoRA): the float32 absmax values are quantized again in blocks of
``double_blocksize``: their mean is subtracted, each block keeps a float32 scale and int8 values
(``absmax ~= mean + q * scale``), so the scale overhead drops from 32 to about 8 bits per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm.errors import ConfigError

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_FP4_MAGNITUDES = [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25]
FP4 = np.array(_FP4_MAGNITUDES + [-m for m in _FP4_MAGNITUDES], np.float32)
CODEBOOKS = {"nf4": NF4, "fp4": FP4}


def codebook(name: str) -> np.ndarray:
    """The 16 values of ``nf4`` or ``fp4``."""
    if name not in CODEBOOKS:
        raise ConfigError(f"unknown 4-bit code book {name!r}; use nf4 or fp4")
    return CODEBOOKS[name]


@dataclass
class BlockQuantized:
    """A block-quantized tensor: packed indices, absmax per block (plain or double-quantized), its shape."""

    packed: np.ndarray  # uint8 [numel / 2]
    shape: tuple[int, ...]
    blocksize: int
    code: str
    absmax: np.ndarray | None = None  # float32 [blocks] (no double quantization)
    absmax_q: np.ndarray | None = None  # int8 [blocks] (double quantization)
    absmax_scale: np.ndarray | None = None  # float32 [blocks / double_blocksize]
    absmax_mean: float = 0.0
    double_blocksize: int = 256

    @property
    def nbytes(self) -> int:
        parts = (self.packed, self.absmax, self.absmax_q, self.absmax_scale)
        return sum(p.nbytes for p in parts if p is not None)

    def block_absmax(self) -> np.ndarray:
        """float32 absmax per block (decoded when double-quantized)."""
        if self.absmax is not None:
            return self.absmax
        scales = np.repeat(self.absmax_scale, self.double_blocksize)[: len(self.absmax_q)]
        return (self.absmax_q.astype(np.float32) * scales + np.float32(self.absmax_mean)).astype(np.float32)


def check_blocks(numel: int, blocksize: int, double_quant: bool, double_blocksize: int) -> None:
    """Refuse block sizes the format cannot hold."""
    if blocksize < 2 or blocksize % 2:
        raise ConfigError(f"weight_blocksize must be an even number >= 2, got {blocksize}")
    if numel % blocksize:
        raise ConfigError(f"a weight of {numel} values cannot be cut into blocks of {blocksize}")
    if double_quant and double_blocksize < 1:
        raise ConfigError(f"weight_double_quant_block_size must be >= 1, got {double_blocksize}")


def nearest_index(values: np.ndarray, code: np.ndarray) -> np.ndarray:
    """Index of the nearest code book value for each of ``values`` (ties: the lower value)."""
    order = np.argsort(code, kind="stable")
    sorted_code = code[order]
    mids = (sorted_code[1:] + sorted_code[:-1]) / 2
    return order[np.searchsorted(mids, values, side="left")].astype(np.uint8)


def quantize_blockwise(
    w: np.ndarray,
    code: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = False,
    double_blocksize: int = 256,
) -> BlockQuantized:
    """Block-wise 4-bit quantization of ``w`` (see the module docstring)."""
    w = np.asarray(w, np.float32)
    check_blocks(w.size, blocksize, double_quant, double_blocksize)
    blocks = w.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(np.float32)
    safe = np.where(absmax > 0, absmax, 1.0)[:, None]
    idx = nearest_index((blocks / safe).ravel(), codebook(code))
    packed = (idx[0::2] | (idx[1::2] << 4)).astype(np.uint8)
    out = BlockQuantized(packed=packed, shape=tuple(w.shape), blocksize=blocksize, code=code)
    if not double_quant:
        out.absmax = absmax
        return out
    mean = float(absmax.mean())
    centred = absmax - mean
    pad = (-len(centred)) % double_blocksize
    groups = np.concatenate([centred, np.zeros(pad, np.float32)]).reshape(-1, double_blocksize)
    scale = np.abs(groups).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(groups / scale[:, None]), -127, 127).astype(np.int8).ravel()[: len(centred)]
    out.absmax_q, out.absmax_scale, out.absmax_mean = q, scale, mean
    out.double_blocksize = double_blocksize
    return out


def unpack_indices(packed: np.ndarray) -> np.ndarray:
    """uint8 ``[n / 2]`` -> indices ``[n]`` (low nibble first)."""
    out = np.empty(packed.size * 2, np.uint8)
    out[0::2], out[1::2] = packed & 0x0F, packed >> 4
    return out


def dequantize_blockwise(bq: BlockQuantized) -> np.ndarray:
    """float32 values of a :class:`BlockQuantized`, in its shape."""
    values = codebook(bq.code)[unpack_indices(bq.packed)].reshape(-1, bq.blocksize)
    return (values * bq.block_absmax()[:, None]).reshape(bq.shape).astype(np.float32)
