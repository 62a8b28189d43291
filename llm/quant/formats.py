"""Low-bit weight storage and its math (numpy): the grid, round-to-nearest, int4 packing, dequantization.

The layout is chosen for a decode kernel computing ``x[M, K] @ W[K, N]`` multithreaded over N: weights are
stored **out-major**, ``[N, K]`` (paddle's ``nn.Linear`` keeps ``[K, N]``), so each output column's K values
are contiguous, and its group scales sit in one row beside them:

* ``int8``: ``int8 [N, K]``, values in ``[-128, 127]``;
* ``int4``: ``uint8 [N, K / 2]``; byte ``j`` of row ``n`` holds ``k = 2j`` in its low nibble and ``k = 2j + 1``
  in its high nibble, each stored as ``q + 8`` (``q`` in ``[-8, 7]``);
* ``scales``: ``float32 [N, G]``, ``G = 1`` per output channel (``group_size = -1``) or ``K / group_size``
  for groups of ``group_size`` consecutive k.

Quantization is symmetric: ``w ~= q * scale`` with ``scale = absmax / qmax`` (``qmax`` 127 or 7) over the
channel or group, and ``q = clip(round(w / scale), -qmax - 1, qmax)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm.errors import ConfigError

#: quant_type -> weight bits (PaddleNLP's predictor names; ``wint8`` / ``wint4`` are QuantArgument's)
WEIGHT_BITS = {"weight_only_int8": 8, "weight_only_int4": 4, "a8w8": 8}
ALIASES = {"wint8": "weight_only_int8", "wint4": "weight_only_int4", "a8w8": "a8w8"}


def canonical_quant_type(name: str) -> str:
    """``weight_only_int8`` / ``weight_only_int4`` / ``a8w8`` for any accepted spelling (case-insensitive)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in WEIGHT_BITS:
        raise ConfigError(
            f"quant_type {name!r} is not supported; use weight_only_int8 (wint8), weight_only_int4 (wint4) or a8w8"
        )
    return key


def qmax(bits: int) -> int:
    """Largest grid value: 127 for int8, 7 for int4."""
    return (1 << (bits - 1)) - 1


def check_group(in_features: int, bits: int, group_size: int) -> None:
    """Refuse shapes the storage format cannot hold (``K`` odd for int4, ``K`` not a multiple of the group)."""
    if group_size != -1 and (group_size <= 0 or group_size % 2):
        raise ConfigError(
            f"group_size must be -1 (per channel) or a positive even number such as 64 or 128, got {group_size}"
        )
    if group_size > 0 and in_features % group_size:
        raise ConfigError(
            f"a layer with {in_features} input features cannot be split into groups of {group_size}; "
            "use group_size -1 (per channel) or a divisor of the layer width"
        )
    if bits == 4 and in_features % 2:
        raise ConfigError(f"int4 packs two values per byte: a layer with {in_features} input features is odd")


def groups(in_features: int, group_size: int) -> int:
    """Number of scale columns ``G``."""
    return 1 if group_size <= 0 else in_features // group_size


def grouped(w_nk: np.ndarray, group_size: int) -> np.ndarray:
    """``[N, K] -> [N, G, K / G]`` (a view)."""
    n, k = w_nk.shape
    g = groups(k, group_size)
    return w_nk.reshape(n, g, k // g)


def compute_scales(w_nk: np.ndarray, bits: int, group_size: int = -1) -> np.ndarray:
    """``float32 [N, G]``: ``absmax / qmax`` per channel or group (an all-zero group gets scale 1)."""
    absmax = np.abs(grouped(np.asarray(w_nk, np.float32), group_size)).max(axis=-1)
    scales = absmax / qmax(bits)
    return np.where(scales > 0, scales, 1.0).astype(np.float32)


def expand_scales(scales: np.ndarray, in_features: int) -> np.ndarray:
    """``[N, G] -> [N, K]`` (each group's scale repeated over its columns)."""
    return np.repeat(scales, in_features // scales.shape[1], axis=1)


def quantize(w_nk: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """``int8 [N, K]`` grid values of ``w_nk`` for the given ``[N, G]`` scales."""
    k = w_nk.shape[1]
    q = np.rint(np.asarray(w_nk, np.float32) / expand_scales(scales, k))
    return np.clip(q, -qmax(bits) - 1, qmax(bits)).astype(np.int8)


def dequantize(q_nk: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``float32 [N, K]`` values of grid values ``q_nk`` with ``[N, G]`` scales."""
    return q_nk.astype(np.float32) * expand_scales(scales.astype(np.float32), q_nk.shape[1])


def pack_int4(q_nk: np.ndarray) -> np.ndarray:
    """``int8 [N, K]`` values in ``[-8, 7]`` -> ``uint8 [N, K / 2]`` (low nibble: even k)."""
    if q_nk.min(initial=0) < -8 or q_nk.max(initial=0) > 7:
        raise ValueError("int4 values must lie in [-8, 7]")
    u = (q_nk.astype(np.int16) + 8).astype(np.uint8)
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``uint8 [N, K / 2]`` -> ``int8 [N, K]``."""
    low = (packed & 0x0F).astype(np.int8) - 8
    high = (packed >> 4).astype(np.int8) - 8
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.int8)
    out[:, 0::2], out[:, 1::2] = low, high
    return out


@dataclass
class QuantizedWeight:
    """One linear layer's stored weight: ``data`` (int8 ``[N, K]`` or packed uint8 ``[N, K / 2]``) and
    ``scales`` (float32 ``[N, G]``)."""

    data: np.ndarray
    scales: np.ndarray
    bits: int
    group_size: int = -1

    @property
    def out_features(self) -> int:
        return int(self.data.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.data.shape[1] * (2 if self.bits == 4 else 1))

    def values(self) -> np.ndarray:
        """Grid values, ``int8 [N, K]``."""
        return unpack_int4(self.data) if self.bits == 4 else self.data

    def dequantize(self) -> np.ndarray:
        """``float32 [N, K]``."""
        return dequantize(self.values(), self.scales)

    @classmethod
    def from_values(cls, q_nk: np.ndarray, scales: np.ndarray, bits: int, group_size: int) -> QuantizedWeight:
        """Store grid values (packing int4)."""
        check_group(q_nk.shape[1], bits, group_size)
        data = pack_int4(q_nk) if bits == 4 else np.ascontiguousarray(q_nk, np.int8)
        return cls(
            data=data, scales=np.ascontiguousarray(scales, np.float32), bits=bits, group_size=group_size
        )


def rtn(w_kn: np.ndarray, bits: int, group_size: int = -1) -> QuantizedWeight:
    """Round-to-nearest of a paddle ``[K, N]`` weight (per channel or per group)."""
    w_nk = np.ascontiguousarray(np.asarray(w_kn, np.float32).T)
    check_group(w_nk.shape[1], bits, group_size)
    scales = compute_scales(w_nk, bits, group_size)
    return QuantizedWeight.from_values(quantize(w_nk, scales, bits), scales, bits, group_size)
