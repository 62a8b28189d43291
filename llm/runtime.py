"""Process-level CPU tuning applied once when :mod:`llm` is imported (before paddle loads).

* ``OMP_NUM_THREADS`` defaults to the CPUs this process may use: paddle's CPU kernels run single-threaded
  without it.
* ``MKL_DEBUG_CPU_TYPE=5`` on AMD processors only: the MKL bundled with paddle takes a slow generic code path
  there unless told to use its AVX2 kernels (about 3x on the matmuls measured on an EPYC). On Intel processors
  it is left unset: forcing the AVX2 path there loses MKL's AVX-512 kernels (measured on a 2-core Xeon with
  AVX-512: fp32 GEMM 1024 x 576 x 1536 at 327-355 GFLOP/s unset, 190-205 with ``=5``).
* glibc ``malloc`` keeps freed blocks up to 32 MB in its heap instead of returning them to the kernel:
  paddle allocates a fresh buffer for every op output, and with the default thresholds each large one
  comes from a new ``mmap`` whose page faults cost more than the op (measured: ``Tensor.numpy()`` of a
  3 MB tensor 1.3 ms -> 0.07 ms, a 3 MB ``concat`` 1.7 ms -> 0.1 ms). Set ``LLM_NO_MALLOPT=1`` to skip.
* ``OMP_WAIT_POLICY=PASSIVE``: OpenMP threads (paddle's MKL / oneDNN) sleep after a parallel region instead of
  spinning for 200 ms. A decode step alternates paddle ops with the toolkit's own kernels (:mod:`llm.kernels`,
  their own thread pool), and spinning OpenMP threads take the cores from them: measured on 2 cores, batch-1
  decode of a 135M LLaMA 29 -> 45 tok/s (fp32), 33 -> 66 (int8), 44 -> 71 (int4); 512-token prefill 697 -> 671
  tok/s, a demo LoRA run 52 -> 55 s (within noise of each other). ``OMP_WAIT_POLICY=ACTIVE`` restores spinning.
* ``FLAGS_use_stride_kernel=0``: paddle 2.6 makes ``transpose``/slices strided views by default, and the
  kernel that later copies a view into contiguous memory is slow on CPU (a 3 MB transpose + reshape:
  4.6 ms as a view, 0.09 ms as a plain transpose). Copy semantics are what paddle <= 2.5 had.

Every setting is a default: values already in the environment win.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit for this setting on 64-bit systems
TRIM_THRESHOLD = 1 << 30


def cpu_count() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def tune_malloc() -> bool:
    """Raise glibc's mmap/trim thresholds (see the module docstring); False where there is no glibc."""
    if os.environ.get("LLM_NO_MALLOPT") == "1" or not os.name == "posix":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc symbols
    except (OSError, AttributeError):  # musl / macOS: no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The ``vendor_id`` of the first processor (``GenuineIntel``, ``AuthenticAMD`` ...), None when unknown."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        pass
    return None


def mkl_cpu_type(vendor: str | None) -> str | None:
    """The ``MKL_DEBUG_CPU_TYPE`` default for a CPU vendor: ``5`` (AVX2 kernels) on AMD, None (MKL's own
    dispatch) elsewhere."""
    return "5" if vendor == "AuthenticAMD" else None


def apply() -> None:
    """Set the environment defaults and tune ``malloc`` (idempotent)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(cpu_count()))
    mkl_type = mkl_cpu_type(cpu_vendor())
    if mkl_type is not None:
        os.environ.setdefault("MKL_DEBUG_CPU_TYPE", mkl_type)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "FLAGS_use_stride_kernel" not in os.environ:
        os.environ["FLAGS_use_stride_kernel"] = "0"
        if "paddle" in sys.modules:  # imported before llm: the flag was read already, set it directly
            sys.modules["paddle"].set_flags({"FLAGS_use_stride_kernel": False})
    tune_malloc()
