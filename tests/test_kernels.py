"""The toolkit's CPU decode kernels (``llm.kernels``): every kernel on every instruction-set path against a float64
NumPy reference over shapes with tails, the input checks of the Python wrappers and of the C++ operators, the
paddle-op fallback, and the build's fallback when no compiler is found."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paddle
import pytest

from llm import kernels
from llm.kernels import build
from llm.quant.formats import pack_int4

ROOT = Path(__file__).resolve().parents[1]
# (M, K, N): M = 1, 3, 16, 33; K and N off the vector widths (8 / 16) and the 128-column block; one shape large
# enough (> 32 KB of weights) to be split over the thread pool
SHAPES = [(1, 64, 48), (3, 70, 37), (16, 130, 129), (33, 18, 19), (1, 576, 1536), (4, 1536, 200), (2, 2, 1)]
SHAPE_IDS = ["1x64x48", "3x70x37", "16x130x129", "33x18x19", "1x576x1536", "4x1536x200", "2x2x1"]
FP32_RTOL = 1e-5  # float32 accumulation, relative to sum_k |x w|
LOW_BIT_RTOL = 1e-4  # against the float64 product with the dequantized weight


def _paths() -> list[str]:
    if not kernels.available():
        return ["auto"]
    state = kernels.configure()
    return (
        ["auto", "scalar"]
        + (["avx2"] if state["cpu_avx2"] else [])
        + (["avx512"] if state["cpu_avx512"] else [])
    )


@pytest.fixture(scope="module", autouse=True)
def _require_kernels() -> None:
    """The kernels must build here (CI installs a compiler); elsewhere the module is skipped with the reason."""
    if kernels.available():
        return
    message = f"llm kernels unavailable: {kernels.unavailable_reason()}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(params=_paths())
def isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each instruction-set path this CPU has (``auto`` is the one run-time dispatch picks)."""
    kernels.configure(isa=request.param)
    try:
        yield request.param
    finally:
        kernels.configure(isa="auto")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _check(out: paddle.Tensor, x: np.ndarray, w_kn: np.ndarray, rtol: float) -> None:
    """``out`` equals ``x @ w_kn`` in float64, elementwise within ``rtol * (|x| @ |w|)``."""
    x64, w64 = x.astype(np.float64), w_kn.astype(np.float64)
    ref = x64 @ w64
    bound = rtol * (np.abs(x64) @ np.abs(w64)) + 1e-30
    got = out.numpy().astype(np.float64)
    assert got.shape == ref.shape
    worst = float(np.max(np.abs(got - ref) / bound))
    assert worst <= 1.0, f"error {worst:.2f}x the bound {rtol}"


def _bf16(a: np.ndarray) -> tuple[paddle.Tensor, np.ndarray]:
    """A bfloat16 tensor of ``a`` and the exact float values it holds."""
    t = paddle.to_tensor(a).astype("bfloat16")
    return t, t.astype("float32").numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_float_kernels_match_float64(isa: str, shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    rng = _rng(m, k, n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    xt = paddle.to_tensor(x)
    _check(kernels.linear_kn(xt, paddle.to_tensor(w)), x, w, FP32_RTOL)
    _check(kernels.linear_nk(xt, paddle.to_tensor(np.ascontiguousarray(w.T))), x, w, FP32_RTOL)
    w16, w16_values = _bf16(w)
    _check(kernels.linear_kn(xt, w16), x, w16_values, FP32_RTOL)
    w16t, w16t_values = _bf16(np.ascontiguousarray(w.T))
    _check(kernels.linear_nk(xt, w16t), x, w16t_values.T, FP32_RTOL)


def _groups(k: int, even: bool) -> list[int]:
    """Scale groups per row to test: per channel, and grouped where K allows (even group sizes for int4)."""
    out = [1]
    for g in (2, k // 32, k // 16):
        if g > 1 and k % g == 0 and (not even or (k // g) % 2 == 0) and g not in out:
            out.append(g)
    return out


def _dequantized(q_nk: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[K, N]`` float64 weight of ``q [N, K]`` with ``scales [N, G]``."""
    n, k = q_nk.shape
    g = scales.shape[1]
    w = q_nk.astype(np.float64).reshape(n, g, k // g) * scales.astype(np.float64)[..., None]
    return w.reshape(n, k).T


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_int8_kernel_matches_dequantized_matmul(isa: str, shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    rng = _rng(m, k, n, 8)
    x = rng.standard_normal((m, k)).astype(np.float32)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    for g in _groups(k, even=False):
        s = (rng.random((n, g)) * 0.02 + 1e-3).astype(np.float32)
        out = kernels.linear_int8(paddle.to_tensor(x), paddle.to_tensor(q), paddle.to_tensor(s))
        _check(out, x, _dequantized(q, s), LOW_BIT_RTOL)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_int4_kernel_matches_dequantized_matmul(isa: str, shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    rng = _rng(m, k, n, 4)
    x = rng.standard_normal((m, k)).astype(np.float32)
    q = rng.integers(-8, 8, (n, k)).astype(np.int8)
    packed = paddle.to_tensor(pack_int4(q))
    for g in _groups(k, even=True):
        s = (rng.random((n, g)) * 0.2 + 1e-3).astype(np.float32)
        out = kernels.linear_int4(paddle.to_tensor(x), packed, paddle.to_tensor(s))
        _check(out, x, _dequantized(q, s), LOW_BIT_RTOL)


@pytest.mark.parametrize(
    "shape", [(1, 576), (3, 17), (33, 1536), (2, 1)], ids=["1x576", "3x17", "33x1536", "2x1"]
)
def test_fused_elementwise_ops_match_float64(shape: tuple[int, int]) -> None:
    """``rms_norm`` (paddlenlp's RMSNorm) and ``swiglu`` (``silu(gate) * up``) against float64 NumPy."""
    m, d = shape
    rng = _rng(m, d, 3)
    x = rng.standard_normal((m, d)).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6) * w
    got = kernels.rms_norm(paddle.to_tensor(x), paddle.to_tensor(w), 1e-6).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    gu = rng.standard_normal((m, 2 * d)).astype(np.float64) * 4
    ref = gu[:, :d] / (1 + np.exp(-gu[:, :d])) * gu[:, d:]
    got = kernels.swiglu(paddle.to_tensor(gu.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with kernels.fallback():
        np.testing.assert_allclose(
            kernels.swiglu(paddle.to_tensor(gu.astype(np.float32))).numpy(), ref, rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("b,s,heads,kv,d", [(1, 1, 9, 3, 64), (2, 3, 4, 4, 6), (3, 1, 6, 2, 5)])
def test_rope_qkv_matches_float64(b: int, s: int, heads: int, kv: int, d: int) -> None:
    """``llm_rope_qkv``: split ``[q | k | v]``, rotate q and k (``x cos + roll(x, d/2) sin``), scale q, K/V heads
    first -- the paddle ops it replaces in the rotary step kernel."""
    rng = _rng(b, s, heads, kv, d)
    qkv = rng.standard_normal((b, s, (heads + 2 * kv) * d)).astype(np.float32)
    cos = rng.standard_normal((b, s, heads + kv, d)).astype(np.float32)
    sin = rng.standard_normal((b, s, heads + kv, d)).astype(np.float32)
    q, k, v = kernels._load().llm_rope_qkv(*map(paddle.to_tensor, (qkv, cos, sin)), heads, 0.125)
    x = qkv.astype(np.float64)
    qk = x[:, :, : (heads + kv) * d].reshape(b, s, heads + kv, d)
    rot = qk * cos + np.roll(qk, d // 2, axis=-1) * sin
    np.testing.assert_allclose(q.numpy(), rot[:, :, :heads] * 0.125, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k.numpy(), rot[:, :, heads:].transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-6)
    v_ref = x[:, :, (heads + kv) * d :].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
    np.testing.assert_array_equal(v.numpy(), v_ref.astype(np.float32))


@pytest.mark.parametrize("b,heads,kv,d,span", [(1, 9, 3, 64, 40), (2, 4, 4, 17, 5), (16, 6, 2, 64, 300)])
def test_attend_decode_matches_float64(isa: str, b: int, heads: int, kv: int, d: int, span: int) -> None:
    """``llm_attend_decode``: writes the step's K/V into the caches at ``col`` and attends over ``span`` columns
    (GQA groups, additive mask) like softmax attention in float64; cache columns past ``span`` are not read."""
    rng = _rng(b, heads, kv, d, span)
    t, col, g = span + 7, span - 1, heads // kv
    q = rng.standard_normal((b, 1, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, kv, 1, d)).astype(np.float32) for _ in range(2))
    caches = [rng.standard_normal((b, kv, t, d)).astype(np.float32) for _ in range(2)]
    bias = np.where(rng.random((b, kv, g, span)) < 0.2, -1e9, 0.0).astype(np.float32)
    bias[..., col] = 0.0
    pk, pv = paddle.to_tensor(caches[0]), paddle.to_tensor(caches[1])
    out = kernels._load().llm_attend_decode(
        *map(paddle.to_tensor, (q, k, v)), pk, pv, paddle.to_tensor(bias), col, span
    )
    for cache, new, got in ((caches[0], k, pk), (caches[1], v, pv)):
        cache[:, :, col : col + 1] = new
        np.testing.assert_array_equal(got.numpy(), cache)  # written in place, nothing else touched
    keys, values = caches[0][:, :, :span].astype(np.float64), caches[1][:, :, :span].astype(np.float64)
    qg = q.astype(np.float64).reshape(b, kv, g, d)
    scores = np.einsum("bkgd,bktd->bkgt", qg, keys) + bias
    p = np.exp(scores - scores.max(-1, keepdims=True))
    ref = np.einsum("bkgt,bktd->bkgd", p / p.sum(-1, keepdims=True), values).reshape(b, 1, heads * d)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


def test_leading_dims_and_thread_count_do_not_change_results() -> None:
    """``x [b, s, K]`` gives ``[b, s, N]``; one thread and two threads give bitwise equal outputs (N is split
    between threads, each output's sum runs in the same order)."""
    rng = _rng(7)
    x = paddle.to_tensor(rng.standard_normal((2, 3, 576)).astype(np.float32))
    w = paddle.to_tensor(rng.standard_normal((576, 1536)).astype(np.float32))
    q = paddle.to_tensor(rng.integers(-8, 8, (1536, 576)).astype(np.int8))
    packed = paddle.to_tensor(pack_int4(q.numpy()))
    s = paddle.to_tensor(rng.random((1536, 9)).astype(np.float32))
    threads = kernels.configure()["threads"]
    outs = []
    try:
        for n in (1, 2):
            kernels.configure(threads=n)
            outs.append(
                [
                    kernels.linear_kn(x, w).numpy(),
                    kernels.linear_int8(x, q, s).numpy(),
                    kernels.linear_int4(x, packed, s).numpy(),
                ]
            )
    finally:
        kernels.configure(threads=threads)
    assert outs[0][0].shape == (2, 3, 1536)
    for one, two in zip(*outs):
        np.testing.assert_array_equal(one, two)


def test_fallback_equals_kernels() -> None:
    """The paddle-op fallback (``LLM_KERNELS=0``, :func:`kernels.fallback`) computes the same products."""
    rng = _rng(11)
    x = paddle.to_tensor(rng.standard_normal((3, 96)).astype(np.float32))
    w = paddle.to_tensor(rng.standard_normal((96, 40)).astype(np.float32))
    q8 = paddle.to_tensor(rng.integers(-127, 128, (40, 96)).astype(np.int8))
    q4 = paddle.to_tensor(pack_int4(rng.integers(-8, 8, (40, 96)).astype(np.int8)))
    s = paddle.to_tensor(rng.random((40, 3)).astype(np.float32))
    calls = [
        lambda: kernels.linear_kn(x, w),
        lambda: kernels.linear_kn(x, w.astype("bfloat16")),
        lambda: kernels.linear_nk(x, paddle.transpose(w, [1, 0])),
        lambda: kernels.linear_int8(x, q8, s),
        lambda: kernels.linear_int4(x, q4, s),
    ]
    for call in calls:
        native = call().numpy()
        with kernels.fallback():
            paddle_ops = call().numpy()
        np.testing.assert_allclose(native, paddle_ops, rtol=1e-5, atol=1e-5)


def test_inputs_that_need_a_gradient_use_paddle_ops() -> None:
    """The custom ops have no backward: with a gradient wanted the wrappers run paddle ops, so training works."""
    rng = _rng(12)
    x = paddle.to_tensor(rng.standard_normal((2, 32)).astype(np.float32), stop_gradient=False)
    w = paddle.to_tensor(rng.standard_normal((32, 8)).astype(np.float32))
    kernels.linear_kn(x, w).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.tile(w.numpy().sum(axis=1), (2, 1)), rtol=1e-5)


def test_wrapper_input_checks() -> None:
    x = paddle.ones([2, 8])
    with pytest.raises(TypeError, match="x must be float32"):
        kernels.linear_kn(x.astype("float64"), paddle.ones([8, 4]))
    with pytest.raises(ValueError, match="x has K=8 but the weight has K=6"):
        kernels.linear_kn(x, paddle.ones([6, 4]))
    with pytest.raises(TypeError, match="weight must be float32 or bfloat16"):
        with kernels.fallback():
            kernels.linear_nk(x, paddle.ones([4, 8], dtype="float64"))
    with pytest.raises(TypeError, match="qweight must be int8"):
        kernels.linear_int8(x, paddle.ones([4, 8], dtype="int32"), paddle.ones([4, 1]))
    with pytest.raises(ValueError, match="not a multiple of G=3"):
        kernels.linear_int8(x, paddle.ones([4, 8], dtype="int8"), paddle.ones([4, 3]))
    with pytest.raises(ValueError, match=r"scales must be float32 \[N=4, G\]"):
        kernels.linear_int8(x, paddle.ones([4, 8], dtype="int8"), paddle.ones([5, 1]))
    with pytest.raises(ValueError, match="packed weight holds K=6"):
        kernels.linear_int4(x, paddle.ones([4, 3], dtype="uint8"), paddle.ones([4, 1]))
    odd = paddle.ones([2, 12])
    with pytest.raises(ValueError, match="group size K / G = 3 is odd"):
        kernels.linear_int4(odd, paddle.ones([4, 6], dtype="uint8"), paddle.ones([4, 4]))
    with pytest.raises(ValueError, match="isa must be one of"):
        kernels.configure(isa="sse9")


def test_operator_checks_give_clear_errors() -> None:
    """Called directly, the C++ operators check their inputs too (paddle raises with the operator's message)."""
    ops = kernels._load()
    x = paddle.ones([2, 8])
    with pytest.raises(Exception, match="llm_linear_kn: x has K=8 input features but the weight has K=6"):
        ops.llm_linear_kn(x, paddle.ones([6, 4]))
    with pytest.raises(Exception, match="llm_linear_nk: w must be float32 or bfloat16, got int32"):
        ops.llm_linear_nk(x, paddle.ones([4, 8], dtype="int32"))
    with pytest.raises(Exception, match="llm_linear_int8: scales have 5 rows but the weight has N=4"):
        ops.llm_linear_int8(x, paddle.ones([4, 8], dtype="int8"), paddle.ones([5, 1]))
    with pytest.raises(Exception, match="llm_linear_int4: the group size K / G = 1 is odd"):
        ops.llm_linear_int4(x, paddle.ones([4, 4], dtype="uint8"), paddle.ones([4, 8]))


def test_failed_build_is_remembered(tmp_path: Path) -> None:
    """A build that failed once is not retried by every process: its reason is raised from the marker."""
    (tmp_path / "failed").write_text("build failed: example reason; log: build.log")
    with pytest.raises(build.BuildError, match="example reason"):
        build.build(tmp_path)


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


PROBE = (
    "import llm, paddle\n"
    "from llm import kernels\n"
    "x = paddle.ones([1, 4]); w = paddle.ones([4, 3])\n"
    "print(kernels.available(), kernels.linear_kn(x, w).numpy().tolist())\n"
    "print(kernels.available())\n"
)


def test_no_compiler_falls_back_with_one_notice(tmp_path: Path) -> None:
    """Without a C++ compiler the products run on paddle ops, after one notice line (never an error)."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CXX"}
    env.update(PATH=str(empty), LLM_KERNEL_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    proc = _python(PROBE, env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["False [[4.0, 4.0, 4.0]]", "False"]
    notices = [ln for ln in proc.stderr.splitlines() if ln.startswith("notice: llm kernels unavailable")]
    assert notices == ["notice: llm kernels unavailable (no C++ compiler (install g++)); using paddle ops"]
    for strict, rc in (
        (False, 0),
        (True, 1),
    ):  # the install's build step: a notice, an error only with --strict
        cmd = [sys.executable, "-m", "llm.kernels"] + (["--strict"] if strict else [])
        proc = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == rc, proc.stderr[-2000:]
        assert "llm kernels unavailable (no C++ compiler (install g++)); paddle ops are used" in proc.stdout


def test_disabled_by_env_is_silent() -> None:
    env = dict(os.environ, LLM_KERNELS="0", PYTHONPATH=str(ROOT))
    proc = _python(PROBE + "print(kernels.unavailable_reason())\n", env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["False [[4.0, 4.0, 4.0]]", "False", "LLM_KERNELS=0"]
    assert "notice" not in proc.stderr


def test_prebuild_command_reports_dispatch() -> None:
    """``python -m llm.kernels`` (the install's build step) loads the cached library and names the code path."""
    proc = subprocess.run(
        [sys.executable, "-m", "llm.kernels"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"isa: {kernels.isa()}" in proc.stdout
    assert "llm kernels:" in proc.stdout
