"""NF4 / FP4 code books, block-wise quantization and double quantization (llm.quant.codebooks)."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import numpy as np
import pytest
from scipy.stats import norm

from llm.errors import ConfigError
from llm.quant.codebooks import (
    FP4,
    NF4,
    dequantize_blockwise,
    nearest_index,
    quantize_blockwise,
    unpack_indices,
)

RNG = np.random.default_rng(0)


def test_nf4_is_the_qlora_construction() -> None:
    """QLoRA appendix E: 8 positive quantiles of N(0,1) over (0.5, offset], 7 negative ones, an exact zero,
    normalised by the largest magnitude (offset = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2 = 0.9677)."""
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    values = np.sort(np.concatenate([positive, [0.0], negative]))
    np.testing.assert_allclose(NF4, values / values.max(), atol=1e-6)
    assert NF4[7] == 0.0 and NF4[0] == -1.0 and NF4[-1] == 1.0


def test_fp4_is_e2m1_with_bitsandbytes_scaling() -> None:
    """bitsandbytes' FP4: index bit 3 is the sign; the other magnitudes are the e2m1 numbers 1, 1.5, 2, 3, 4, 6
    divided by the largest, and 0b001 is bitsandbytes' tabulated subnormal 1/192."""
    magnitudes = FP4[:8]
    assert magnitudes[0] == 0.0 and np.isclose(magnitudes[1], 1 / 192)
    np.testing.assert_allclose(sorted(magnitudes[2:]), np.array([1, 1.5, 2, 3, 4, 6]) / 6, rtol=1e-6)
    np.testing.assert_array_equal(FP4[8:], -FP4[:8])


@pytest.mark.parametrize("code", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 32])
def test_blockwise_error_is_within_half_the_code_step(code: str, blocksize: int) -> None:
    w = RNG.normal(size=(128, 48)).astype(np.float32)
    bq = quantize_blockwise(w, code, blocksize)
    back = dequantize_blockwise(bq)
    assert back.shape == w.shape and bq.packed.dtype == np.uint8 and bq.packed.size == w.size // 2
    table = np.sort(NF4 if code == "nf4" else np.unique(FP4))
    blocks, got = w.reshape(-1, blocksize), back.reshape(-1, blocksize)
    absmax = np.abs(blocks).max(1, keepdims=True)
    normalised = blocks / absmax
    # the chosen value is the nearest: error <= half the gap around it, in each block's scale
    pos = np.clip(np.searchsorted(table, normalised), 1, len(table) - 1)
    gap = table[pos] - table[pos - 1]
    assert (np.abs(got - blocks) <= gap * absmax / 2 + 1e-6).all()
    assert np.allclose(np.abs(got).max(1, keepdims=True), absmax)  # each block's absmax is exact
    idx = unpack_indices(bq.packed)
    assert np.array_equal(idx, nearest_index(normalised.ravel(), NF4 if code == "nf4" else FP4))


def test_double_quantization_round_trip_and_size() -> None:
    w = RNG.normal(size=(256, 256)).astype(np.float32)
    plain = quantize_blockwise(w, "nf4", 64)
    double = quantize_blockwise(w, "nf4", 64, double_quant=True, double_blocksize=256)
    step = np.abs(plain.absmax - plain.absmax.mean()).max() / 127
    assert np.abs(double.block_absmax() - plain.absmax).max() <= step / 2 + 1e-6
    assert np.array_equal(double.packed, plain.packed)
    assert double.absmax_q.dtype == np.int8 and double.nbytes < plain.nbytes
    bits_per_weight = 8 * double.nbytes / w.size
    assert bits_per_weight < 4.2  # 4 bits + ~8/64 for the int8 absmax + a float32 per 256 blocks
    err = np.abs(dequantize_blockwise(double) - w).max()
    assert err < 1.05 * np.abs(dequantize_blockwise(plain) - w).max() + 1e-3


def test_bad_block_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="blocks of 64"):
        quantize_blockwise(np.ones((3, 7), np.float32), "nf4", 64)
    with pytest.raises(ConfigError, match="even number"):
        quantize_blockwise(np.ones((4, 4), np.float32), "nf4", 3)
    with pytest.raises(ConfigError, match="unknown 4-bit code book"):
        quantize_blockwise(np.ones((4, 4), np.float32), "nf3", 4)
