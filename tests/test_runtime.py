"""Process defaults applied by ``import llm`` (llm/runtime.py): environment defaults that the user's
environment overrides, and the glibc malloc tuning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import llm  # noqa: F401  (zlib fix before paddle)
from llm import runtime

PROBE = (
    "import json, os, {first}, {second}; print(json.dumps({{"
    "'stride': paddle.get_flags(['FLAGS_use_stride_kernel'])['FLAGS_use_stride_kernel'], "
    "'omp': os.environ['OMP_NUM_THREADS'], 'mkl': os.environ.get('MKL_DEBUG_CPU_TYPE'), "
    "'wait': os.environ['OMP_WAIT_POLICY']}}))"
)


def _probe(order: tuple[str, str] = ("llm", "paddle"), **env: str) -> dict:
    unset = ("FLAGS_use_stride_kernel", "OMP_NUM_THREADS", "MKL_DEBUG_CPU_TYPE", "OMP_WAIT_POLICY")
    clean = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(first=order[0], second=order[1])],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_defaults_are_set_before_paddle_loads() -> None:
    got = _probe()
    mkl = runtime.mkl_cpu_type(runtime.cpu_vendor())
    assert got == {"stride": False, "omp": str(runtime.cpu_count()), "mkl": mkl, "wait": "PASSIVE"}


def test_mkl_avx2_path_is_forced_on_amd_only(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n")
    assert runtime.cpu_vendor(str(info)) == "AuthenticAMD"
    assert runtime.mkl_cpu_type("AuthenticAMD") == "5"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert runtime.cpu_vendor(str(info)) == "GenuineIntel"
    assert runtime.mkl_cpu_type("GenuineIntel") is None
    assert runtime.cpu_vendor(str(tmp_path / "missing")) is None
    assert runtime.mkl_cpu_type(None) is None


def test_stride_default_applies_when_paddle_was_imported_first() -> None:
    assert _probe(("paddle", "llm"))["stride"] is False


def test_environment_values_win() -> None:
    got = _probe(
        FLAGS_use_stride_kernel="1", OMP_NUM_THREADS="1", MKL_DEBUG_CPU_TYPE="0", OMP_WAIT_POLICY="ACTIVE"
    )
    assert got == {"stride": True, "omp": "1", "mkl": "0", "wait": "ACTIVE"}


def test_malloc_tuning_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setenv("LLM_NO_MALLOPT", "1")
    assert runtime.tune_malloc() is False
    monkeypatch.delenv("LLM_NO_MALLOPT")
    expected = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    assert runtime.tune_malloc() is expected
