"""Static export (``paddle.jit.save``) + ``paddle.inference`` engine: token-for-token equal to dynamic mode."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import json
import os

import numpy as np
import paddle
import pytest
from helpers_infer import EOS, VOCAB, prompts, tiny

from llm.errors import ConfigError, ModelError
from llm.infer import GenerationConfig, create_engine
from llm.infer.static import META_FILE, PREFIX_FILE, export_engine, load_static_engine
from llm.model import FAMILIES, PrefixModel, build_model, family_of, make_prefix_config, tiny_config


def mixed_batch(seed: int = 2) -> list[list[int]]:
    rng = np.random.RandomState(seed)
    return [rng.randint(5, EOS, size=n).tolist() for n in (6, 2, 9)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_greedy_equals_dynamic(family: str, tmp_path) -> None:
    model = tiny(family)
    export_engine(model, str(tmp_path), max_seq_len=48)
    assert {"model.pdmodel", "model.pdiparams", META_FILE} <= set(os.listdir(tmp_path))
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["family"] == family and meta["max_seq_len"] == 48
    assert (
        meta["inputs"][:2] == ["input_ids", "positions"]
        and len(meta["outputs"]) == 1 + 2 * meta["geometry"]["num_layers"]
    )
    static = load_static_engine(str(tmp_path), max_batch_size=4)
    dynamic = create_engine(model, max_batch_size=4)
    batch = mixed_batch()
    cfg = GenerationConfig(max_new_tokens=8)
    out = static.generate(batch, cfg)
    assert out == dynamic.generate(batch, cfg)
    assert [static.generate([p], cfg)[0] for p in batch] == out  # batch invariance in static mode too
    assert list(static.stream(batch[1], cfg)) == out[1]


def test_static_sampling_beam_and_stops_equal_dynamic(tmp_path) -> None:
    model = tiny("llama")
    export_engine(model, str(tmp_path), max_seq_len=48)
    static, dynamic = load_static_engine(str(tmp_path)), create_engine(model)
    batch = prompts(2, 5)
    stop = dynamic.generate(batch, GenerationConfig(max_new_tokens=6))[0][2]
    configs = [
        GenerationConfig(
            max_new_tokens=10, decode_strategy="sampling", top_k=20, top_p=0.9, temperature=1.3, seed=3
        ),
        GenerationConfig(max_new_tokens=6, decode_strategy="beam_search", num_beams=3, eos_token_ids=(stop,)),
        GenerationConfig(max_new_tokens=10, eos_token_ids=(stop,), repetition_penalty=1.2),
    ]
    for cfg in configs:
        assert static.generate(batch, cfg) == dynamic.generate(batch, cfg), cfg.decode_strategy


def test_static_kv_buffers_grow(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Growing KV buffers (every 4 columns here) are fed to the predictor as they grow."""
    import llm.infer.decoders.runner as runner_module

    model = tiny("chatglm_v2")
    export_engine(model, str(tmp_path), max_seq_len=48)
    monkeypatch.setattr(runner_module, "GROW", 4)
    cfg = GenerationConfig(max_new_tokens=24)
    expected = create_engine(model, backend="generic").generate(mixed_batch(), cfg)
    assert load_static_engine(str(tmp_path)).generate(mixed_batch(), cfg) == expected


def test_model_prefix_names_the_static_files(tmp_path) -> None:
    model = tiny("gpt")
    export_engine(model, str(tmp_path), max_seq_len=32, model_prefix="gpt_step")
    assert {"gpt_step.pdmodel", "gpt_step.pdiparams"} <= set(os.listdir(tmp_path))
    assert "model.pdmodel" not in os.listdir(tmp_path)
    cfg = GenerationConfig(max_new_tokens=5)
    expected = create_engine(model).generate(mixed_batch(), cfg)
    for prefix in ("gpt_step", None, "model"):  # the stem is read from engine.json; the default defers to it
        assert load_static_engine(str(tmp_path), model_prefix=prefix).generate(mixed_batch(), cfg) == expected
    with pytest.raises(ConfigError, match="exported with model_prefix 'gpt_step', not 'other'"):
        load_static_engine(str(tmp_path), model_prefix="other")
    (tmp_path / "gpt_step.pdiparams").unlink()
    with pytest.raises(ModelError, match="missing gpt_step.pdiparams"):
        load_static_engine(str(tmp_path))
    with pytest.raises(ConfigError, match="plain file stem"):
        export_engine(model, str(tmp_path / "x"), max_seq_len=32, model_prefix="../up")


@pytest.mark.parametrize("mkldnn", [True, "prefill"])
def test_static_with_mkldnn_equals_dynamic(mkldnn, tmp_path) -> None:
    model = tiny("qwen")
    export_engine(model, str(tmp_path), max_seq_len=48)
    static = load_static_engine(str(tmp_path), mkldnn=mkldnn)
    assert "mkldnn" in static.runner.kind
    cfg = GenerationConfig(max_new_tokens=8)
    assert static.generate(mixed_batch(), cfg) == create_engine(model).generate(mixed_batch(), cfg)


@pytest.mark.parametrize("family", ["llama", "chatglm_v2", "bloom"])
def test_static_prefix_model(family: str, tmp_path) -> None:
    with paddle.utils.unique_name.guard():
        base = build_model(tiny_config(family, vocab_size=VOCAB, eos_token_id=EOS), seed=3)
    base.eval()
    config = make_prefix_config(base, num_prefix_tokens=3)
    model = PrefixModel(
        model=base, prefix_config=config, postprocess_past_key_value=family_of(base).prefix_postprocess
    )
    paddle.seed(4)
    with paddle.no_grad():
        for p in model.prefix_encoder.parameters():
            p.set_value(paddle.randn(p.shape) * 0.5)
    model.eval()
    export_engine(model, str(tmp_path), max_seq_len=40)
    assert (tmp_path / PREFIX_FILE).is_file()
    static = load_static_engine(str(tmp_path))
    assert static.runner.prefix_len == 3
    cfg = GenerationConfig(max_new_tokens=6)
    assert static.generate(mixed_batch(), cfg) == create_engine(model, backend="generic").generate(
        mixed_batch(), cfg
    )


def test_export_and_load_errors(tmp_path) -> None:
    with paddle.utils.unique_name.guard():
        alibi_llama = build_model(tiny_config("llama", vocab_size=VOCAB, alibi=True), seed=0)
    with pytest.raises(ModelError, match="cannot export this llama model"):
        export_engine(alibi_llama, str(tmp_path / "a"), max_seq_len=32)
    with pytest.raises(ConfigError, match="float32"):
        export_engine(tiny("llama"), str(tmp_path / "b"), max_seq_len=32, dtype="float16")
    with pytest.raises(ConfigError, match="max_seq_len"):
        export_engine(tiny("gpt"), str(tmp_path / "c"), max_seq_len=10_000)
    with pytest.raises(ModelError, match="not an exported engine"):
        load_static_engine(str(tmp_path / "missing"))
    export_engine(tiny("opt"), str(tmp_path / "d"), max_seq_len=16)
    with pytest.raises(ConfigError, match="cpu"):
        load_static_engine(str(tmp_path / "d"), device="gpu")
    with pytest.raises(ConfigError, match="mkldnn"):
        load_static_engine(str(tmp_path / "d"), mkldnn="always")
    engine = load_static_engine(str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="max_seq_len=16"):
        engine.generate([[5] * 10], GenerationConfig(max_new_tokens=8))
