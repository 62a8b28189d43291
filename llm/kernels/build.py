"""Just-in-time build and loading of the custom C++ operators in ``llm/kernels/csrc``.

The operators are compiled once per machine with ``paddle.utils.cpp_extension.load`` into a cache directory
keyed by a hash of the sources, the flags and the paddle / Python versions:
``$LLM_KERNEL_CACHE/<hash>`` or ``~/.cache/llm-toolkit/kernels/<hash>`` (a temporary directory when the home
directory is not writable). The build runs in a child process whose output goes to ``build.log`` in that
directory, under a file lock so that parallel processes (pytest workers, the server, distributed ranks) build
once; every later process only loads the library (a few ms). A failed build is remembered (``failed`` in the
cache directory, with its reason) so that processes do not retry it; ``python -m llm.kernels`` retries.

No ``-march`` flag is used: each instruction-set file carries its own target pragma and the operators pick
AVX-512 / AVX2 / scalar code at run time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

NAME = "llm_kernels_ops"
CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("ops.cc", "fused.cc", "train.cc", "step.cc", "pool.cc", "avx512.cc", "avx2.cc", "scalar.cc")
HEADERS = ("kernels.h", "dispatch.h", "elementwise.h", "impl.h", "pool.h", "tensor_checks.h")
CXXFLAGS = [
    "-O3",
    "-g0",
    "-std=c++17",
    "-pthread",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-Wno-unused-parameter",
]
OPS = (
    "llm_linear_kn",
    "llm_linear_nk",
    "llm_linear_int8",
    "llm_linear_int4",
    "llm_rms_norm",
    "llm_swiglu",
    "llm_rope_qkv",
    "llm_rms_norm_train",
    "llm_swiglu_train",
    "llm_softmax_ce",
    "llm_rope_train",
    "llm_softmax_mask_train",
    "llm_attend_decode",
    "llm_decode_step",
    "llm_kernels_config",
)
ISA_CODES = {"auto": 0, "scalar": 1, "avx2": 2, "avx512": 3}
ISA_NAMES = {v: k for k, v in ISA_CODES.items()}


class BuildError(RuntimeError):
    """The operators could not be built or loaded (the message is the one-line reason)."""


def cache_root() -> Path:
    """Parent of the per-hash build directories."""
    env = os.environ.get("LLM_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    home = Path.home() / ".cache" / "llm-toolkit" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"llm-toolkit-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"


def source_hash() -> str:
    """Hash of everything the library depends on: sources, flags, paddle, Python, platform."""
    import paddle

    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes() + b"\0")
    commit = getattr(paddle.version, "commit", "")
    for part in (CXXFLAGS, paddle.__version__, commit, sys.version, platform.machine(), NAME):
        h.update(repr(part).encode() + b"\0")
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """The cache directory of this source version."""
    return cache_root() / source_hash()


def library_path(directory: Path) -> Path:
    return directory / NAME / f"{NAME}.so"


def compiler() -> str | None:
    """The C++ compiler paddle's build would use (``CXX`` or c++ / g++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++"):
        if name and shutil.which(name):
            return name
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _last_error(log: str) -> str:
    """The most telling line of a failed build log."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for line in lines:
        if "error" in line.lower() and "warning" not in line.lower():
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def build(directory: Path, force: bool = False) -> float:
    """Compile the library into ``directory`` (in a child process, output to ``build.log``) unless it is built.

    Returns the build time in seconds (0 when it was cached); raises :class:`BuildError`.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ok, failed = directory / "ok", directory / "failed"
    with _locked(directory.parent / f"{directory.name}.lock"):
        if ok.exists() and library_path(directory).exists():
            return 0.0
        if failed.exists() and not force:
            raise BuildError(failed.read_text().strip() or "an earlier build failed")
        if compiler() is None:
            raise BuildError("no C++ compiler (install g++)")
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "llm.kernels.build", "--child", str(directory)]
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH")) if p),
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log = proc.stdout + proc.stderr
        (directory / "build.log").write_text(log)
        if proc.returncode != 0 or not library_path(directory).exists():
            reason = f"build failed: {_last_error(log)}; log: {directory / 'build.log'}"
            failed.write_text(reason)
            raise BuildError(reason)
        failed.unlink(missing_ok=True)
        ok.write_text(f"{time.perf_counter() - start:.1f}\n")
        return time.perf_counter() - start


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _child_build(directory: str) -> None:
    """Run by the build child: paddle's JIT build (verbose: the log is the parent's build.log)."""
    from paddle.utils.cpp_extension import load

    load(
        name=NAME,
        sources=[str(CSRC / s) for s in SOURCES],
        extra_cxx_cflags=CXXFLAGS,
        extra_include_paths=[str(CSRC)],
        build_directory=directory,
        verbose=True,
    )


class Ops:
    """The loaded operators, called through paddle's eager custom-op entry point."""

    def __init__(self, library: Path) -> None:
        from paddle.base import core
        from paddle.utils.cpp_extension import load_op_meta_info_and_register_op

        names = load_op_meta_info_and_register_op(str(library))
        missing = [op for op in OPS if op not in names]
        if missing:
            raise BuildError(f"{library} lacks the operators {missing}")
        self.library = library
        self._run = core.eager._run_custom_op

    def llm_linear_kn(self, x: Any, w: Any) -> Any:
        return self._run("llm_linear_kn", x, w)[0]

    def llm_linear_nk(self, x: Any, w: Any) -> Any:
        return self._run("llm_linear_nk", x, w)[0]

    def llm_linear_int8(self, x: Any, q: Any, s: Any) -> Any:
        return self._run("llm_linear_int8", x, q, s)[0]

    def llm_linear_int4(self, x: Any, q: Any, s: Any) -> Any:
        return self._run("llm_linear_int4", x, q, s)[0]

    def llm_rms_norm(self, x: Any, w: Any, eps: float) -> Any:
        return self._run("llm_rms_norm", x, w, float(eps))[0]

    def llm_swiglu(self, x: Any) -> Any:
        return self._run("llm_swiglu", x)[0]

    def llm_rope_qkv(self, qkv: Any, cos: Any, sin: Any, heads: int, q_scale: float) -> list[Any]:
        return self._run("llm_rope_qkv", qkv, cos, sin, int(heads), float(q_scale))

    def llm_rms_norm_train(self, x: Any, w: Any, eps: float) -> Any:
        return self._run("llm_rms_norm_train", x, w, float(eps))[0]

    def llm_swiglu_train(self, g: Any, u: Any) -> Any:
        return self._run("llm_swiglu_train", g, u)[0]

    def llm_softmax_ce(self, logits: Any, labels: Any, scale: float) -> list[Any]:
        return self._run("llm_softmax_ce", logits, labels, float(scale))

    def llm_rope_train(self, x: Any, cos: Any, sin: Any) -> Any:
        return self._run("llm_rope_train", x, cos, sin)[0]

    def llm_softmax_mask_train(self, x: Any, mask: Any, scale: float) -> Any:
        return self._run("llm_softmax_mask_train", x, mask, float(scale))[0]

    def llm_attend_decode(
        self, q: Any, k: Any, v: Any, pk: Any, pv: Any, bias: Any, col: int, span: int
    ) -> Any:
        return self._run("llm_attend_decode", q, k, v, pk, pv, bias, int(col), int(span))[0]

    def llm_decode_step(
        self,
        x: Any,
        cos: Any,
        sin: Any,
        bias: Any,
        weights: list[Any],
        caches: list[Any],
        slots: list[int],
        heads: int,
        col: int,
        span: int,
        eps: float,
        q_scale: float,
    ) -> Any:
        return self._run(
            "llm_decode_step", x, cos, sin, bias, weights, caches, slots, heads, col, span, eps, q_scale
        )[0]

    def config(self, isa: int = -1, threads: int = -1, spin_us: int = -1) -> dict[str, Any]:
        """Set / read the dispatch state (see ops.cc: ``llm_kernels_config``)."""
        import paddle

        out = self._run("llm_kernels_config", paddle.zeros([1]), int(isa), int(threads), int(spin_us))[0]
        v = [int(i) for i in out.numpy()]
        return {
            "isa": ISA_NAMES.get(v[0], "?"),
            "threads": v[1],
            "spin_us": v[2],
            "cpu_avx512": bool(v[3]),
            "cpu_avx2": bool(v[4]),
            "best": ISA_NAMES.get(v[5], "?"),
        }


def load(force: bool = False) -> Ops:
    """Build (once, cached) and load the operators; raises :class:`BuildError` with a one-line reason."""
    directory = build_dir()
    build(directory, force=force)
    ops = Ops(library_path(directory))
    isa = os.environ.get("LLM_KERNELS_ISA", "").strip().lower()
    if isa:
        if isa not in ISA_CODES:
            raise BuildError(f"LLM_KERNELS_ISA={isa!r}: use one of {sorted(ISA_CODES)}")
        ops.config(isa=ISA_CODES[isa])
    return ops


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        _child_build(sys.argv[2])
    else:
        sys.exit("usage: python -m llm.kernels   (builds and reports the kernels)")
