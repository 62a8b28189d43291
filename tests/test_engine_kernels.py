"""The engine on the toolkit's CPU decode kernels (``llm.kernels``): greedy tokens equal the paddle-op engine's for
every family and weight type, the exported graph calls the same custom operators and gives the dynamic engine's
tokens, and an export that needs the operators says so where they are missing."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest
from helpers_infer import EOS, VOCAB, tiny

from llm import kernels
from llm.infer import GenerationConfig, create_engine, export_engine, load_static_engine
from llm.infer.decoders import build_kernel, fastmm
from llm.infer.decoders.base import NEG
from llm.model import FAMILIES, build_model, load_model, tiny_config
from llm.quant.model import quantize_model

ROOT = Path(__file__).resolve().parents[1]
CFG = GenerationConfig(max_new_tokens=8, eos_token_ids=())
WEIGHT_TYPES = {
    "int8": ("weight_only_int8", -1),
    "int4": ("weight_only_int4", -1),
    "int4-g16": ("weight_only_int4", 16),
}
STEP_FAMILIES = ("llama", "qwen", "chatglm_v2")  # decode steps through llm_decode_step (decoders.fastmm)


@pytest.fixture(scope="module", autouse=True)
def _require_kernels() -> None:
    if kernels.available():
        return
    message = f"llm kernels unavailable: {kernels.unavailable_reason()}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def prompts() -> list[list[int]]:
    """Three prompts, one longer than ``llm.kernels.MAX_ROWS`` (its prefill keeps paddle's GEMM)."""
    rng = np.random.RandomState(3)
    return [rng.randint(5, EOS, size=n).tolist() for n in (6, 2, kernels.MAX_ROWS + 8)]


class CountingOps:
    """The loaded operators, counting the calls per operator (delegates every call)."""

    def __init__(self, ops: Any) -> None:
        self.ops, self.calls = ops, Counter()

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.ops, name)

        def call(*args: Any) -> Any:
            self.calls[name] += 1
            return fn(*args)

        return call


def generate_counting(model: paddle.nn.Layer, monkeypatch: pytest.MonkeyPatch, dtype: str = "float32"):
    """Greedy tokens of the kernel engine and the operator calls it made."""
    counting = CountingOps(kernels._load())
    monkeypatch.setitem(kernels._state, "ops", counting)
    tokens = create_engine(model, dtype=dtype, max_batch_size=4).generate(prompts(), CFG)
    monkeypatch.setitem(kernels._state, "ops", counting.ops)
    return tokens, counting.calls


def generate_paddle_ops(model: paddle.nn.Layer, dtype: str = "float32") -> list[list[int]]:
    """Greedy tokens of the engine as it was before the kernels (``LLM_KERNELS=0``: paddle ops and layouts)."""
    with kernels.fallback():
        engine = create_engine(model, dtype=dtype, max_batch_size=4)
        return engine.generate(prompts(), CFG)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_tokens_unchanged_by_the_kernels(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(family)
    assert build_kernel(model).fast_mm
    with kernels.fallback():
        assert not build_kernel(model).fast_mm  # paddle layouts (blocked gate/up and head) as before
    tokens, calls = generate_counting(model, monkeypatch)
    assert calls["llm_linear_kn"] > 0  # prefill products
    if family in STEP_FAMILIES:  # every decode step is one operator
        assert calls["llm_decode_step"] >= CFG.max_new_tokens - 1, calls
    else:
        assert calls["llm_decode_step"] == 0 and calls["llm_linear_kn"] + calls["llm_linear_nk"] >= 8 * 2
    assert tokens == generate_paddle_ops(model)


@pytest.mark.parametrize("family", ["llama", "gpt", "chatglm2"])
def test_bfloat16_weights_read_as_stored(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bfloat16 weights go to the kernels as they are (no widened copy) and give the paddle-op engine's tokens."""
    tiny(family).save_pretrained(str(tmp_path), safe_serialization=True)
    model = load_model(str(tmp_path), dtype="bfloat16")
    tokens, calls = generate_counting(model, monkeypatch, dtype="bfloat16")
    assert calls["llm_linear_kn"] > 0
    assert tokens == generate_paddle_ops(model, dtype="bfloat16")


def low_bit(family: str, kind: str) -> paddle.nn.Layer:
    """A fresh quantized copy of the cached tiny model (quantization replaces its linears in place)."""
    with paddle.utils.unique_name.guard():
        model = build_model(tiny_config(family, vocab_size=VOCAB, eos_token_id=EOS))
    model.set_state_dict(tiny(family, seed=4).state_dict())
    model.eval()
    quantize_model(model, *WEIGHT_TYPES[kind], progress=False)
    return model


@pytest.mark.parametrize("kind", list(WEIGHT_TYPES))
@pytest.mark.parametrize("family", ["llama", "qwen", "bloom", "chatglm"])
def test_low_bit_tokens_unchanged_by_the_kernels(
    family: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = low_bit(family, kind)
    tokens, calls = generate_counting(model, monkeypatch)
    if family in STEP_FAMILIES:  # rotary RMSNorm + SwiGLU families: the decode steps run as one operator each
        assert calls["llm_decode_step"] >= CFG.max_new_tokens - 1, calls
    else:
        assert calls["llm_linear_int8" if kind == "int8" else "llm_linear_int4"] > 0
    assert tokens == generate_paddle_ops(model)


def _two_steps(kernel: Any, batch: int = 3) -> list[np.ndarray]:
    """Logits and caches of a 4-token prefill and one decode step through ``kernel`` (in-place cache mode)."""
    rng = np.random.RandomState(0)
    shape = [batch, kernel.kv_heads, 8, kernel.head_dim]
    caches = [paddle.zeros(shape) for _ in range(2 * kernel.num_layers)]
    ids = paddle.to_tensor(rng.randint(5, EOS, size=(batch, 4)))
    pos = paddle.to_tensor(np.tile(np.arange(4), (batch, 1)))
    causal = np.where(np.tril(np.ones((4, 4))) > 0, 0.0, NEG).astype("float32")
    bias = paddle.to_tensor(np.broadcast_to(causal, (batch, 1, 4, 4)).copy())
    none = paddle.zeros([batch, 1, 1, 1])
    keypos = paddle.zeros([batch, 1], dtype="int64")
    with paddle.no_grad():
        first = kernel(ids, pos, bias, none, keypos, caches, 0, 4)[0]
        ids, pos = paddle.to_tensor(rng.randint(5, EOS, size=(batch, 1))), paddle.full([batch, 1], 4, "int64")
        second = kernel(ids, pos, paddle.zeros([batch, 1, 1, 5]), none, keypos, caches, 4, 5)[0]
    return [t.numpy() for t in (first, second, *caches)]


@pytest.mark.parametrize(
    "family, kind",
    [
        ("llama", "fp32"),
        ("llama", "bf16"),
        ("llama", "int8"),
        ("llama", "int4-g16"),
        ("qwen", "int4"),
        ("qwen", "fp32"),
        ("chatglm_v2", "fp32"),
    ],
)
def test_decode_step_operator_is_bitwise_the_per_op_path(
    family: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``llm_decode_step`` (all layers in one operator) gives bitwise the logits and cache entries of the same
    kernels called per operator."""
    if kind == "bf16":
        tiny(family).save_pretrained(str(tmp_path), safe_serialization=True)
        model = load_model(str(tmp_path), dtype="bfloat16")
    else:
        model = tiny(family, seed=4) if kind == "fp32" else low_bit(family, kind)
    kernel = build_kernel(model)
    counting = CountingOps(kernels._load())
    monkeypatch.setitem(kernels._state, "ops", counting)
    fused = _two_steps(kernel)
    assert counting.calls["llm_decode_step"] == 1
    monkeypatch.setattr(fastmm, "decode_step", lambda *args: None)
    per_op = _two_steps(kernel)
    assert counting.calls["llm_decode_step"] == 1 and counting.calls["llm_attend_decode"] > 0
    for a, b in zip(fused, per_op):
        np.testing.assert_array_equal(a, b)


def _export(model: paddle.nn.Layer, path: Path, **kwargs: Any) -> dict:
    export_engine(model, str(path), max_seq_len=64, **kwargs)
    return json.loads((path / "engine.json").read_text())


def _graph_ops(path: Path) -> set[str]:
    program = paddle.jit.load(str(path / "model")).program()
    return {op.type for block in program.blocks for op in block.ops}


@pytest.mark.parametrize("kind", ["fp32", *WEIGHT_TYPES])
@pytest.mark.parametrize("family", ["llama", "gpt", "chatglm2"])
def test_static_equals_dynamic_per_weight_type(family: str, kind: str, tmp_path: Path) -> None:
    """The exported graph runs the custom operators for every weight product (any number of rows) and gives the
    dynamic engine's tokens; exported with ``kernels=False`` it holds paddle operators only, same tokens."""
    model = tiny(family, seed=4) if kind == "fp32" else low_bit(family, kind)
    expected = create_engine(model, max_batch_size=4).generate(prompts(), CFG)
    meta = _export(model, tmp_path / "ops")
    assert meta["custom_ops"] == "llm.kernels"
    used = {op for op in _graph_ops(tmp_path / "ops") if op.startswith("llm_")}
    assert used >= (
        {"llm_linear_kn"} if kind == "fp32" else {"llm_linear_int8" if kind == "int8" else "llm_linear_int4"}
    )
    engine = load_static_engine(str(tmp_path / "ops"), max_batch_size=4)
    assert "+llm-kernels" in engine.runner.kind
    assert engine.generate(prompts(), CFG) == expected
    meta = _export(model, tmp_path / "plain", kernels=False)
    assert meta["custom_ops"] == [] and not any(
        op.startswith("llm_") for op in _graph_ops(tmp_path / "plain")
    )
    assert load_static_engine(str(tmp_path / "plain"), max_batch_size=4).generate(prompts(), CFG) == expected


def test_export_with_kernels_needs_them_to_load(tmp_path: Path) -> None:
    """Loading a custom-operator export where the kernels are off fails with the reason and the way out."""
    _export(tiny("llama"), tmp_path)
    code = (
        "import llm, sys\n"
        "from llm.infer import load_static_engine\n"
        "from llm.errors import ModelError\n"
        "try:\n"
        f"    load_static_engine({str(tmp_path)!r})\n"
        "except ModelError as err:\n"
        "    print(err); sys.exit(3)\n"
    )
    env = dict(os.environ, LLM_KERNELS="0", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "exported with the toolkit's CPU kernels" in proc.stdout
    assert (
        "unavailable here (LLM_KERNELS=0)" in proc.stdout
        and "export the model again with LLM_KERNELS=0" in proc.stdout
    )


@pytest.mark.parametrize("family", ["llama", "gpt", "chatglm"])
def test_int8_lm_head(family: str, tmp_path: Path) -> None:
    """``quant_lm_head``: logits equal the float ones computed through the dequantized int8 head (1e-4), the float
    head leaves the kernel (unless the embedding shares it), and the exported graph gives the dynamic tokens."""
    from llm.infer.decoders.quant import quant_linear

    model = tiny(family, seed=4)
    kernel = build_kernel(model)
    name, transposed = kernel.head_layout()
    last = paddle.randn([3, int(kernel._t(name).shape[1 if transposed else 0])])
    kernel.quantize_head()
    ref = kernel._head_q
    q, s = getattr(kernel, ref.qweight), getattr(kernel, ref.scales)
    assert q.dtype == paddle.int8 and q.shape[0] == kernel.vocab_size
    dequantized = q.numpy().astype(np.float64) * s.numpy().astype(np.float64)  # [V, hidden]
    expected = last.numpy().astype(np.float64) @ dequantized.T
    for rows in (last, paddle.concat([last] * 12)):  # one kernel call, and chunks of MAX_ROWS rows
        got = kernel._logits(rows, name, transposed).numpy()
        np.testing.assert_allclose(got[:3], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with kernels.fallback():
        plain = quant_linear(last, q, s, 8, -1).numpy()
    np.testing.assert_allclose(plain, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    registered = {**dict(kernel.named_parameters()), **dict(kernel.named_buffers())}
    assert (name in registered) == (family != "llama")  # the tiny llama's head is not tied to the embedding
    expected_tokens = create_engine(model, max_batch_size=4, quant_lm_head=True).generate(prompts(), CFG)
    export_engine(model, str(tmp_path), max_seq_len=64, quant_lm_head=True)
    assert "llm_linear_int8" in _graph_ops(tmp_path)
    assert load_static_engine(str(tmp_path), max_batch_size=4).generate(prompts(), CFG) == expected_tokens
