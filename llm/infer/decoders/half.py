"""bfloat16 weights on CPU: exact, fast widening to float32 (paddle 2.6 has no CPU bfloat16 compute kernels).

A bfloat16 number is the top half of a float32. paddle's own CPU ``cast`` from bfloat16 is ~50x slower than a
streaming copy (8 ms for 885K values), so :func:`widen_bits` reinterprets the bits instead: ``int16 -> int32``,
``* 2**16``, reinterpreted as float32. paddle's dtype reinterpretation (``view``) exists only as a strided kernel,
enabled for that one call (:func:`stride_kernels`); views that change the element size crash in paddle 2.6.2, so
only same-size views are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import paddle

HALF = (paddle.bfloat16, paddle.float16)
#: float32 bytes of a bfloat16 weight widened at once. Whole large matrices page-fault (a 113 MB LM head: 70-100 ms
#: instead of 8 ms in 8 MB chunks: glibc maps temporaries above 32 MB afresh); chunks of 1-2 MB also keep the
#: temporaries in cache (135M-parameter decode step, batch 1: ~90 ms with 8 MB chunks, ~50-55 ms with 2 MB)
WIDEN_BYTES = 2 << 20


@contextmanager
def stride_kernels() -> Iterator[None]:
    """Enable paddle's strided kernels for one call (``llm.runtime`` turns them off by default, see
    docs/performance.md)."""
    if paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]:
        yield
        return
    paddle.set_flags({"FLAGS_use_stride_kernel": True})
    try:
        yield
    finally:
        paddle.set_flags({"FLAGS_use_stride_kernel": False})


def bf16_bits(t: paddle.Tensor) -> paddle.Tensor:
    """The bits of a bfloat16 tensor as int16 (a view: no copy)."""
    with stride_kernels():
        return paddle.view(t, "int16")


def widen_bits(bits: paddle.Tensor) -> paddle.Tensor:
    """float32 values of bfloat16 ``bits`` (int16), exactly: ``bits * 2**16`` (no overflow: ``|bits| <= 2**15``)
    reinterpreted as float32."""
    wide = bits.astype("int32") * 65536
    with stride_kernels():
        return paddle.view(wide, "float32")


def widen(t: paddle.Tensor) -> paddle.Tensor:
    """A float32 copy of a half-precision tensor (CPU bfloat16 via :func:`widen_bits`); float32 is returned as is."""
    if t.dtype == paddle.bfloat16 and paddle.in_dynamic_mode() and t.place.is_cpu_place():
        return widen_bits(bf16_bits(t))
    return t if t.dtype == paddle.float32 else t.astype("float32")
