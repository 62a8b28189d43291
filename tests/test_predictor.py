"""The Predictor API (in process): lengths, sampling defaults, prompts, batching, stop ids, streaming, LoRA, prefix."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import dataclasses
import json
from pathlib import Path

import numpy as np
import paddle
import pytest

from llm.errors import ConfigError, ModelError
from llm.infer import GenerationConfig
from llm.infer.arguments import (
    PredictorArgument,
    read_generation_defaults,
    resolve_lengths,
    sampling_settings,
)
from llm.infer.predictor import Predictor, benchmark, predict_file, split_conversation
from llm.infer.streaming import IncrementalDecoder, stream_text
from llm.model import load_model
from llm.tokenizer import load_tokenizer

try:
    import helpers_model as hm
    import helpers_tokenizer as h
except ImportError:  # tests/ imported as a package
    from tests import helpers_model as hm
    from tests import helpers_tokenizer as h

MULTIBYTE = "你好😀龘🦙 ok"


def _args(model: Path, **kw: object) -> PredictorArgument:
    base = {
        "model_name_or_path": str(model),
        "decode_strategy": "greedy_search",
        "max_length": 8,
        "device": "cpu",
    }
    return PredictorArgument(**{**base, **kw})


def _save_model(path: Path, tok_dir: Path, family: str = "llama", seed: int = 0, **overrides: object) -> Path:
    tok = load_tokenizer(str(tok_dir))
    hm.save_tiny_model(path, family, tok, seed=seed, **overrides)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny llama over a byte-level BPE trained in the test (CJK/emoji chars span several tokens)."""
    tok_dir = Path(
        h.make_tokenizer_dir(tmp_path_factory.mktemp("bpe-tok"), generation_config={"eos_token_id": [2]})
    )
    return _save_model(tmp_path_factory.mktemp("bpe-llama"), tok_dir)


@pytest.fixture(scope="module")
def predictor(bpe_model: Path) -> Predictor:
    return Predictor.from_pretrained(
        str(bpe_model), decode_strategy="greedy_search", max_length=8, device="cpu", batch_size=4
    )


# ------------------------------------------------------------------------------------ arguments
def test_resolve_lengths() -> None:
    assert resolve_lengths(None, None, 256) == (192, 64)
    assert resolve_lengths(None, 56, 256) == (200, 56)
    assert resolve_lengths(100, None, 256) == (100, 156)
    assert resolve_lengths(100, 100, 256) == (100, 100)
    assert resolve_lengths(None, 20, 256, reserved=16) == (220, 20)
    with pytest.raises(ConfigError, match=r"src_length \(200\) \+ max_length \(100\) = 300 exceeds .*256"):
        resolve_lengths(200, 100, 256)
    with pytest.raises(ConfigError, match="exceeds"):
        resolve_lengths(None, 300, 256)


def test_sampling_settings_from_generation_config(tmp_path: Path) -> None:
    gen = {"do_sample": True, "top_p": 0.8, "temperature": 0.6, "top_k": 5, "eos_token_id": [2, 3]}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    assert read_generation_defaults(str(tmp_path))["decode_strategy"] == "sampling"
    settings = sampling_settings(PredictorArgument(temperature=0.3), str(tmp_path))
    assert settings == {
        "decode_strategy": "sampling",
        "top_k": 5,
        "top_p": 0.8,
        "temperature": 0.3,
        "repetition_penalty": 1.0,
        "num_beams": 1,
    }
    assert sampling_settings(PredictorArgument(), str(tmp_path / "nowhere"))["top_p"] == 0.7  # spec default
    with pytest.raises(ConfigError, match="num_beams"):
        sampling_settings(PredictorArgument(decode_strategy="beam_search"), str(tmp_path))


def test_reserved_arguments_fail_clearly() -> None:
    assert PredictorArgument(quant_type="Weight_Only_INT8").quant_type == "weight_only_int8"
    with pytest.raises(ConfigError, match="quant_type 'int3' is not supported"):
        PredictorArgument(quant_type="int3")
    assert PredictorArgument(quant_type="None").quant_type is None
    assert PredictorArgument(inference_model=True).inference_model  # the toolkit's own engine
    with pytest.raises(ConfigError, match="block_attn is not available"):
        PredictorArgument(block_attn=True)
    with pytest.raises(ConfigError, match="cachekv_int8_type 'dynamic' is not available"):
        PredictorArgument(cachekv_int8_type="dynamic")
    with pytest.raises(ConfigError, match="together"):
        PredictorArgument(lora_path="a", prefix_path="b")


def test_split_conversation() -> None:
    assert split_conversation("hi") == ([], "hi")
    assert split_conversation([["u1", "b1"], ["q"]]) == ([("u1", "b1")], "q")
    for bad in ([], [["u1"], ["q"]], [["u", "b"], ["q", "x"]], [[1, 2]]):
        with pytest.raises(ConfigError, match="conversation"):
            split_conversation(bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ streaming text
def test_incremental_decoder_never_splits_characters(bpe_model: Path) -> None:
    tok = load_tokenizer(str(bpe_model))
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs characters spanning several tokens"
    decoder = IncrementalDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "" in pieces[:-1]  # something was held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    # invalid bytes at the very end are flushed as-is (never lost)
    byte_ids = tok.encode("😀", add_special_tokens=False)
    assert "".join(stream_text(tok, ids + byte_ids[:2])) == tok.decode(ids + byte_ids[:2])


class _ScriptedEngine:
    """Stands in for the engine: streams fixed ids (a stop id, then junk that must not appear)."""

    max_seq_len = 256

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def stream(self, prompt: list[int], config: GenerationConfig):
        yield from self.ids

    def generate(self, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        return [list(self.ids) for _ in prompts]


def test_predictor_stream_multibyte_pieces(bpe_model: Path) -> None:
    tok = load_tokenizer(str(bpe_model))
    ids = tok.encode(MULTIBYTE, add_special_tokens=False)
    engine = _ScriptedEngine(ids + [tok.eos_token_id] + tok.encode("junk", add_special_tokens=False))
    config = GenerationConfig(eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    pred = Predictor(engine, tok, src_length=32, max_length=32, generation=config)
    pieces = list(pred.stream("hi"))
    assert len(pieces) > 1 and all(p and "\ufffd" not in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE == pred.predict(["hi"])[0]


# ------------------------------------------------------------------------------------ real engine
def test_batch_equals_single_and_stream(predictor: Predictor) -> None:
    prompts = [
        "hello",
        "The quick brown fox jumps over the lazy dog.",
        "你好",
        [["hi", "hello"], ["why?"]],
        "a",
    ]
    batched = predictor.predict(prompts)
    single = [predictor.predict([p])[0] for p in prompts]
    assert batched == single
    assert "".join(predictor.stream(prompts[1])) == batched[1]
    texts, tokens = predictor.predict(prompts[:2], return_tokens=True)
    assert texts == batched[:2] and all(0 < len(t) <= predictor.max_length for t in tokens)


def test_conversation_uses_the_training_encoding(predictor: Predictor) -> None:
    tok = predictor.tokenizer
    ids = predictor.prompt_ids([["u1", "b1"], ["q"]])
    assert ids == tok.chat_template.encode_prompt(tok, [("u1", "b1")], "q")
    assert predictor.prompt_ids("x" * 2000)[-3:] == tok.chat_template.encode_prompt(tok, [], "x" * 2000)[-3:]
    assert len(predictor.prompt_ids("x" * 2000)) <= predictor.src_length


def test_stops_at_any_eos_id(bpe_model: Path, tmp_path: Path) -> None:
    base = Predictor.from_args(_args(bpe_model, max_length=12, chat_template="none"))
    _, (tokens,) = base.predict(["hello there"], return_tokens=True)
    stop = next(t for t in tokens[2:] if t != tokens[0])  # an id generated after a few steps
    model = _copy_model(bpe_model, tmp_path / "model", {"eos_token_id": [2, stop]})
    stopped = Predictor.from_args(_args(model, max_length=12, chat_template="none"))
    assert stop in stopped.tokenizer.eos_token_ids
    _, (cut,) = stopped.predict(["hello there"], return_tokens=True)
    assert cut == tokens[: tokens.index(stop)]


def _copy_model(src: Path, dst: Path, generation_config: dict) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    (dst / "generation_config.json").write_text(json.dumps(generation_config))
    return dst


def test_sampling_defaults_from_generation_config(bpe_model: Path, tmp_path: Path) -> None:
    greedy = Predictor.from_args(_args(bpe_model)).predict(["hello"])
    model = _copy_model(bpe_model, tmp_path / "m", {"eos_token_id": 2, "do_sample": True, "top_k": 1})
    args = _args(model, decode_strategy=None, seed=1)
    pred = Predictor.from_args(args)
    assert (pred.generation.decode_strategy, pred.generation.top_k) == ("sampling", 1)
    assert pred.predict(["hello"]) == greedy  # top_k=1 sampling is greedy
    wide_args = dataclasses.replace(args, top_k=0, top_p=1.0, temperature=1.5, seed=7)
    wide = Predictor.from_args(wide_args)
    first = wide.predict(["hello", "hi"], return_tokens=True)[1]
    # seeded sampling is reproducible: again on the same predictor and on a fresh one with the same seed
    assert wide.predict(["hello", "hi"], return_tokens=True)[1] == first
    assert Predictor.from_args(wide_args).predict(["hello", "hi"], return_tokens=True)[1] == first
    # ... and really samples: another seed draws other tokens, and the draws are not the greedy ones
    other = Predictor.from_args(dataclasses.replace(wide_args, seed=8))
    assert other.predict(["hello", "hi"], return_tokens=True)[1] != first
    greedy_tokens = Predictor.from_args(_args(model)).predict(["hello", "hi"], return_tokens=True)[1]
    assert first != greedy_tokens


def test_predict_file_and_benchmark(
    predictor: Predictor, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from llm.data import encode_example, read_examples

    rows = [{"src": "hello", "tgt": "world"}, {"src": ["a", "b"], "tgt": ["c", "d"]}, {"src": "no target"}]
    data = h.write_jsonl(tmp_path / "dev.json", rows)
    out = tmp_path / "out" / "pred.json"
    predict_file(predictor, data, str(out))
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [(x["src"], x["tgt"]) for x in lines] == [
        ("hello", "world"),
        (["a", "b"], ["c", "d"]),
        ("no target", ""),
    ]
    printed = capsys.readouterr().out
    assert printed.count("***********Source**********") == 3 and "***********Output**********" in printed
    tok = predictor.tokenizer
    ex = read_examples(data, require_tgt=False)[1]  # multi-turn: history (a, c), query b
    prompt = encode_example(ex, tok, tok.chat_template, predictor.src_length, predictor.max_length, True)[
        "input_ids"
    ]
    assert prompt == tok.chat_template.encode_prompt(tok, [("a", "c")], "b")
    assert lines[1]["output"] == tok.decode(predictor.generate_ids([prompt])[0])

    small = dataclasses.replace(predictor.generation)
    fast = Predictor(predictor.engine, tok, src_length=8, max_length=4, generation=small, batch_size=2)
    fast.generation.max_new_tokens = 4
    stats = benchmark(fast, warmup=0, repeat=1)
    printed = capsys.readouterr().out
    assert "IPS:" in printed and "QPS:" in printed and "Input length is: 8" in printed
    assert stats["output_tokens"] == 8  # eos ignored: exactly max_length tokens per prompt


# ------------------------------------------------------------------------------------ adapters
@pytest.fixture(scope="module")
def lora_dir(bpe_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hm.save_lora_adapter(bpe_model, tmp_path_factory.mktemp("lora"))


def test_lora_is_merged_in_memory(bpe_model: Path, lora_dir: Path) -> None:
    from paddlenlp.peft import LoRAModel

    from llm.infer.adapters import merge_lora
    from llm.model import forward_logits

    batch = {"input_ids": np.array([[5, 6, 7, 8]]), "attention_mask": np.ones((1, 4), dtype="int64")}
    unmerged = LoRAModel.from_pretrained(load_model(str(bpe_model)), str(lora_dir))
    unmerged.eval()
    merged = merge_lora(load_model(str(bpe_model)), str(lora_dir))
    assert not any("lora" in type(layer).__name__.lower() for layer in merged.sublayers())
    want = forward_logits(unmerged, batch).numpy()
    np.testing.assert_allclose(forward_logits(merged, batch).numpy(), want, rtol=1e-4, atol=1e-4)
    base = forward_logits(load_model(str(bpe_model)), batch).numpy()
    assert np.abs(base - want).max() > 1e-3  # the adapter really changes the model

    pred = Predictor.from_args(_args(bpe_model, lora_path=str(lora_dir), chat_template="none", max_length=5))
    _, (tokens,) = pred.predict(["hello"], return_tokens=True)
    ids = pred.prompt_ids("hello")
    for _ in range(len(tokens)):  # greedy by hand on the unmerged adapter model
        logits = forward_logits(unmerged, {"input_ids": np.array([ids])}).numpy()
        ids.append(int(logits[0, -1].argmax()))
    assert ids[-len(tokens) :] == tokens


def test_lora_for_another_model_is_refused(bpe_model: Path, lora_dir: Path, tmp_path: Path) -> None:
    from llm.infer.adapters import merge_lora

    other = _save_model(tmp_path / "wide", bpe_model, hidden_size=64, intermediate_size=96)
    with pytest.raises(
        ModelError,
        match=r"does not match this llama model: weight .* has shape \[\d+, 4\] in the adapter but",
    ):
        merge_lora(load_model(str(other)), str(lora_dir))
    gpt = _save_model(tmp_path / "gpt", bpe_model, family="gpt")
    with pytest.raises(ModelError, match=r"does not match this gpt model.*do not exist in the model"):
        merge_lora(load_model(str(gpt)), str(lora_dir))


def test_prefix_model(bpe_model: Path, tmp_path: Path) -> None:
    hm.save_prefix_adapter(bpe_model, tmp_path / "prefix")
    pred = Predictor.from_args(_args(bpe_model, prefix_path=str(tmp_path / "prefix"), batch_size=2))
    outs = pred.predict(["hello", "a longer prompt here"])
    assert outs == [pred.predict(["hello"])[0], pred.predict(["a longer prompt here"])[0]]

    other = _save_model(tmp_path / "deep", bpe_model, num_hidden_layers=3)
    with pytest.raises(
        ModelError, match="prefix adapter does not match.*num_hidden_layers is 2 in the adapter"
    ):
        Predictor.from_args(_args(other, prefix_path=str(tmp_path / "prefix")))


def test_device_and_length_errors(bpe_model: Path) -> None:
    if not paddle.is_compiled_with_cuda():
        with pytest.raises(ConfigError, match="CUDA build"):
            Predictor.from_args(_args(bpe_model, device="gpu"))
    with pytest.raises(ConfigError, match="exceeds the model's position limit 256"):
        Predictor.from_args(_args(bpe_model, src_length=250, max_length=10))
    with pytest.raises(ModelError, match="model directory not found"):
        Predictor.from_args(_args(bpe_model / "missing"))
