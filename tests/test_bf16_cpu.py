"""bfloat16 on CPU: weights stored (and cached) in bfloat16, computed in float32; float16 refused up front.

paddle 2.6.2 has no CPU bfloat16 kernels for random init, matmul, add, norms or softmax. ``load_model`` builds
the model without random init and loads the weights straight into bfloat16; the decode kernels widen each
weight to float32 where it is used (exactly: a bfloat16 is the top half of a float32).
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix: must be imported before paddle)

# isort: split
import json
import os
import types
from pathlib import Path

import numpy as np
import paddle
import pytest

from llm.config.checks import check_training_dtype
from llm.convert import export_paddle_to_hf
from llm.convert.cache import CACHE_DIR_NAME
from llm.convert.tensors import SafetensorsFile
from llm.errors import ConfigError
from llm.infer import GenerationConfig, create_engine
from llm.infer.decoders import build_kernel
from llm.infer.decoders.half import widen
from llm.infer.predictor import main as predictor_main
from llm.model import load_model
from llm.outputs import COMPLETE_MARKER

try:
    from helpers_infer import FAST, prompts, tiny
except ImportError:  # tests/ imported as a package
    from tests.helpers_infer import FAST, prompts, tiny

ROOT = Path(__file__).resolve().parents[1]
NEW = 6


def test_widen_is_exact_for_every_bfloat16_value() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    tensor = paddle.to_tensor(bits)  # numpy uint16 is paddle's bfloat16
    assert tensor.dtype == paddle.bfloat16
    wide = widen(tensor).numpy()
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(wide.view(np.uint32), bits.astype(np.uint32) << 16)  # NaN/inf bits too


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """``saved(family)``: a spiced tiny model (clear greedy margins) saved as a float32 paddle directory."""
    cache: dict[str, str] = {}

    def factory(family: str) -> str:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"bf16-{family}")
            tiny(family).save_pretrained(str(path), safe_serialization=True)
            cache[family] = str(path)
        return cache[family]

    return factory


def _logits_along(engine, batch: list[list[int]], tokens: np.ndarray) -> np.ndarray:
    """``[b, steps, V]`` next-token logits while feeding the given tokens (teacher forcing)."""
    runner = engine.runner
    ids = np.asarray(batch, dtype=np.int64)
    out = [runner.begin(ids, np.ones_like(ids), NEW)]
    for i in range(NEW - 1):
        out.append(runner.step(tokens[:, i]))
    runner.end()
    return np.stack(out, axis=1)


GREEDY = GenerationConfig(max_new_tokens=NEW, eos_token_ids=())


@pytest.mark.parametrize("family", FAST)
def test_bf16_engine_is_float32_math_on_the_bf16_weights(family: str, saved) -> None:
    """The bfloat16 fast path computes what float32 computes on the same (rounded) weights."""
    model = load_model(saved(family), dtype="bfloat16")
    assert {str(p.dtype) for p in model.parameters()} == {"paddle.bfloat16"}
    bf16 = create_engine(model, dtype="bfloat16")
    assert bf16.runner.kind == "dynamic/fast" and bf16.runner.dtype == "float32"  # float32 activations/cache
    rounded = load_model(saved(family), dtype="bfloat16")
    rounded.to(dtype="float32")
    fp32 = create_engine(rounded, dtype="float32")
    batch = prompts(3, 6)
    tokens = np.asarray(fp32.generate(batch, GREEDY))
    ref, got = _logits_along(fp32, batch, tokens), _logits_along(bf16, batch, tokens)
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()  # measured <= 1.4e-6
    assert bf16.generate(batch, GREEDY) == tokens.tolist()


@pytest.mark.parametrize("family", FAST)
def test_bf16_greedy_matches_float32(family: str, saved) -> None:
    """Against the original float32 weights: logits within bfloat16 tolerance, and the same greedy tokens on
    the two of 64 prompts whose float32 greedy path has the clearest margins."""
    fp32 = create_engine(load_model(saved(family)), dtype="float32", max_batch_size=64)
    candidates = prompts(64, 6)
    tokens = np.asarray(fp32.generate(candidates, GREEDY))
    ref = _logits_along(fp32, candidates, tokens)
    top2 = np.sort(ref, axis=-1)[..., -2:]
    margin = (top2[..., 1] - top2[..., 0]) / np.abs(ref).max(-1)  # [prompt, step], relative
    rows = np.argsort(-margin.min(-1))[:2]
    batch, tokens, ref = [candidates[i] for i in rows], tokens[rows], ref[rows]
    bf16 = create_engine(load_model(saved(family), dtype="bfloat16"), dtype="bfloat16")
    got = _logits_along(bf16, batch, tokens)
    err = np.abs(ref - got).max(-1) / np.abs(ref).max(-1)  # [row, step], relative to the largest logit
    # bfloat16 keeps 8 significant bits; on these random models (weights of std 0.3) measured at most 3.5%
    # of the largest logit, 7% for mixtral (its router and experts amplify the rounding)
    assert err.max() <= 0.1, err
    assert bf16.generate(batch, GREEDY) == tokens.tolist()


@pytest.mark.parametrize("family", ["llama", "gpt", "chatglm"])
def test_chunked_widening_is_exact(family: str, saved, monkeypatch) -> None:
    """Large weights are widened in row chunks (summed partial products, concatenated blocks): same logits."""
    import llm.infer.decoders.base as base

    batch = prompts(2, 5)
    whole = create_engine(load_model(saved(family), dtype="bfloat16"), dtype="bfloat16")
    monkeypatch.setattr(base, "WIDEN_BYTES", 1024)  # every matrix of the tiny model in several chunks
    chunked = create_engine(load_model(saved(family), dtype="bfloat16"), dtype="bfloat16")
    tokens = np.asarray(whole.generate(batch, GREEDY))
    ref, got = _logits_along(whole, batch, tokens), _logits_along(chunked, batch, tokens)
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()
    assert chunked.generate(batch, GREEDY) == tokens.tolist()


def test_bf16_kernel_keeps_weights_in_bfloat16(saved) -> None:
    kernel = build_kernel(load_model(saved("llama"), dtype="bfloat16"))
    assert (kernel.weight_dtype, kernel.dtype_name, kernel.upcast) == ("bfloat16", "float32", True)
    matrices = {n: str(t.dtype) for n, t in kernel.named_parameters() if t.ndim == 2}
    matrices.update({n: str(t.dtype) for n, t in kernel.named_buffers() if t.ndim == 2 and "table" not in n})
    assert matrices and set(matrices.values()) == {"paddle.bfloat16"}, matrices


def test_generic_path_runs_bf16_in_float32(saved) -> None:
    batch = prompts(2, 5)
    config = GenerationConfig(max_new_tokens=NEW, eos_token_ids=())
    fast = create_engine(load_model(saved("llama"), dtype="bfloat16"), dtype="bfloat16")
    generic = create_engine(load_model(saved("llama"), dtype="bfloat16"), dtype="bfloat16", backend="generic")
    assert generic.runner.kind == "dynamic/generic"
    assert generic.generate(batch, config) == fast.generate(batch, config)


# --------------------------------------------------------------------------------------------------
# predictor.py on a Hugging Face directory: bf16 works (cached in bf16), float16 refused before caching
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_chat_dir(tmp_path) -> str:
    out = export_paddle_to_hf(str(ROOT / "demo" / "model"), str(tmp_path / "hf"), progress=False)
    os.remove(os.path.join(out, COMPLETE_MARKER))  # as downloaded from a hub
    return out


def _predict(model: str, out: Path, dtype: str) -> list[str]:
    return ["--model_name_or_path", model, "--dtype", dtype, "--max_length", "4", "--src_length", "16",
            "--batch_size", "1", "--decode_strategy", "greedy_search", "--output_file", str(out)]  # fmt: skip


def test_predictor_bf16_on_hf_dir(hf_chat_dir: str, tmp_path) -> None:
    predictor_main(_predict(hf_chat_dir, tmp_path / "bf16.json", "bfloat16"))
    (entry,) = os.listdir(os.path.join(hf_chat_dir, CACHE_DIR_NAME))
    assert entry.startswith("bfloat16-")
    cached = os.path.join(hf_chat_dir, CACHE_DIR_NAME, entry)
    assert json.load(open(os.path.join(cached, "config.json")))["dtype"] == "bfloat16"
    st = SafetensorsFile(os.path.join(cached, "model.safetensors"), u16_is_bf16=True)
    assert {st.info(k)[1] for k in st.keys()} == {"bfloat16"}  # half the size of the float32 cache
    rows = [json.loads(line) for line in open(tmp_path / "bf16.json")]
    assert len(rows) == 1 and isinstance(rows[0]["output"], str)


def test_float16_is_refused_before_anything_is_cached(hf_chat_dir: str, tmp_path, capsys) -> None:
    before = sorted(os.listdir(hf_chat_dir))
    with pytest.raises(SystemExit) as exc:
        predictor_main(_predict(hf_chat_dir, tmp_path / "f16.json", "float16"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [
        "error: dtype float16 does not run on cpu (paddle 2.6 has no CPU float16 kernels); dtypes that run on "
        "this device: float32, bfloat16"
    ], err
    with pytest.raises(ConfigError, match="dtype float16 does not run on cpu"):
        load_model(hf_chat_dir, dtype="float16")
    assert sorted(os.listdir(hf_chat_dir)) == before  # nothing converted, nothing cached


# --------------------------------------------------------------------------------------------------
# fine-tuning
# --------------------------------------------------------------------------------------------------
def test_pure_bf16_training_is_refused_on_cpu() -> None:
    args = types.SimpleNamespace(bf16=True, fp16_opt_level="O2", requested={})
    with pytest.raises(ConfigError, match=r"--bf16 with --fp16_opt_level O2 .* needs a GPU"):
        check_training_dtype(args, cuda_available=False)
    check_training_dtype(args, cuda_available=True)
    check_training_dtype(
        types.SimpleNamespace(bf16=True, fp16_opt_level="O1", requested={}), cuda_available=False
    )


def test_finetune_refuses_bf16_o2_before_loading(tmp_path, monkeypatch) -> None:
    import llm.train.finetune as finetune

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(finetune, "load_model", must_not_load)
    argv = [str(ROOT / "demo" / "sft_argument.json"), "--bf16", "true", "--fp16_opt_level", "O2"]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    with pytest.raises(ConfigError, match="--bf16 with --fp16_opt_level O2"):
        finetune.run(argv)
