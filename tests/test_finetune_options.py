"""Fine-tuning options end to end through ``run()`` on the tiny llama: zero padding, generation eval,
NEFTune, chat template selection, LoRA continuation and prediction; plus the metrics JSON and loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import paddle
import pytest
from conftest import FIXTURE_DATA
from helpers_model import finetune_argv

import llm  # noqa: F401
import llm.train.finetune as finetune
from llm.data import DataCollator
from llm.model import forward_logits, load_model
from llm.tokenizer import load_tokenizer
from llm.train.callbacks import LOG_NAME, PLOT_NAME
from llm.train.finetune import run
from llm.train.trainer import CausalLMTrainer

GENERATION_METRICS = ("eval_rouge1", "eval_rouge2", "eval_rougel", "eval_bleu4", "eval_exact_match")
SYSTEM, USER, ASSISTANT = 4, 5, 6  # <|system|>, <|user|>, <|assistant|> in the demo tokenizer


def _argv(model_dir: Path, out: Path, *extra: str, steps: int = 3, data: Path = FIXTURE_DATA) -> list[str]:
    # eval_steps/save_steps beyond max_steps: a single evaluation at the end, no checkpoints
    return finetune_argv(
        model_dir, out, data, *extra, max_steps=steps, learning_rate="1e-2", eval_steps=1000, save_steps=1000
    )


def _losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _assert_outputs(out: Path, metrics: dict[str, float], steps: int) -> None:
    """Training wrote the per-step metrics log, metrics.json (= the returned metrics) and the loss PNG."""
    losses = _losses(out)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    png = (out / PLOT_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.fixture
def llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture
def loaded_splits(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records what the workflow's ``load_split`` returned per split, with the template it was given."""
    seen: dict[str, Any] = {}
    original = finetune.load_split

    def spy(dataset_dir: str, split: str, tokenizer: Any, template: Any, **kw: Any) -> list[dict]:
        features = original(dataset_dir, split, tokenizer, template, **kw)
        seen[split] = {"template": template, "features": features, **kw}
        return features

    monkeypatch.setattr(finetune, "load_split", spy)
    return seen


def test_zero_padding_end_to_end(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loaded_splits: dict
) -> None:
    batches: list[tuple[int, bool]] = []
    original = CausalLMTrainer.compute_loss

    def spy(self: CausalLMTrainer, model: Any, inputs: dict, return_outputs: bool = False) -> Any:
        batches.append((len(inputs["attention_mask"].shape), "position_ids" in inputs))
        return original(self, model, inputs, return_outputs)

    monkeypatch.setattr(CausalLMTrainer, "compute_loss", spy)
    out = tmp_path / "out"
    argv = _argv(llama, out, "--zero_padding", "true", "--per_device_train_batch_size", "2", "--do_eval")
    metrics = run(argv)
    _assert_outputs(out, metrics, 3)
    # 48 examples packed into fewer max_length sequences, each with positions restarting per example
    packed = loaded_splits["train"]["features"]
    assert loaded_splits["train"]["zero_padding"] and len(packed) < 48
    assert all(len(f["input_ids"]) <= 64 and f["position_ids"].count(0) >= 1 for f in packed)
    assert sum(f["position_ids"].count(0) for f in packed) == 48
    assert batches == [(4, True)] * 3  # every training batch: 4-D block mask + position ids
    assert loaded_splits["dev"]["zero_padding"]  # eval is packed too (no generation eval)
    assert math.isfinite(metrics["eval_loss"])
    # eval_accuracy is the saved model's argmax accuracy over the packed dev rows' supervised tokens
    packed_dev, collate = loaded_splits["dev"]["features"], DataCollator(load_tokenizer(str(llama)))
    assert len(packed_dev) < 16  # the 16 dev examples were packed
    model = load_model(str(out))
    model.eval()
    correct = supervised = 0
    with paddle.no_grad():
        for i in range(0, len(packed_dev), 8):
            batch = collate(packed_dev[i : i + 8])
            preds, mask = forward_logits(model, batch).numpy().argmax(-1), batch["labels"] != -100
            correct += int((preds[mask] == batch["labels"][mask]).sum())
            supervised += int(mask.sum())
    assert metrics["eval_accuracy"] == pytest.approx(correct / supervised, abs=1e-9)


def test_eval_with_do_generation(llama: Path, tmp_path: Path) -> None:
    # every answer is the same 4-token phrase, so a few steps teach it and greedy decoding can reproduce it
    data = tmp_path / "data"
    data.mkdir()
    for split, n in (("train", 32), ("dev", 4)):
        rows = [{"src": f"spell: {100 + 37 * i}", "tgt": "seven hundred seventy seven"} for i in range(n)]
        (data / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    extra = ("--chat_template", "none", "--eval_with_do_generation", "true", "--do_eval")
    metrics = run(_argv(llama, out, *extra, "--save_generation_output", "true", steps=20, data=data))
    _assert_outputs(out, metrics, 20)
    assert set(GENERATION_METRICS) <= set(metrics)
    assert "eval_accuracy" not in metrics
    # measured: the answer is learnt after 6 steps; a generation equal to its reference scores 1 on every metric
    assert {k: metrics[k] for k in GENERATION_METRICS} == pytest.approx({k: 1.0 for k in GENERATION_METRICS})
    assert set(GENERATION_METRICS) <= set(json.loads((out / "eval_results.json").read_text()))
    rows = [json.loads(line) for line in (out / "generated_output.json").read_text().splitlines()]
    assert rows == [{"output": "seven hundred seventy seven", "tgt": "seven hundred seventy seven"}] * 4


def test_generation_eval_is_turned_off_by_a_chat_template(
    llama: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, loaded_splits: dict
) -> None:
    # the demo tokenizer ships a chat template: like PaddleNLP, generation eval is switched off
    argv = [*_argv(llama, tmp_path / "out", "--eval_with_do_generation", "true", "--do_eval")]
    argv[argv.index("--do_train")] = "--do_train=false"
    from paddlenlp.utils.log import logger as paddlenlp_logger  # the workflow logs through paddlenlp's logger

    paddlenlp_logger.logger.addHandler(caplog.handler)
    try:
        metrics = run(argv)
    finally:
        paddlenlp_logger.logger.removeHandler(caplog.handler)
    assert "eval_with_do_generation is turned off because a chat template is active" in caplog.text
    assert "eval_accuracy" in metrics and "eval_loss" in metrics
    assert not set(GENERATION_METRICS) & set(metrics)
    assert loaded_splits["dev"]["for_generation"] is False and loaded_splits["dev"]["template"] is not None


def test_neftune_adds_noise_in_training_only(llama: Path, tmp_path: Path) -> None:
    plain = run(_argv(llama, tmp_path / "plain", "--do_eval"))
    noisy = run(
        _argv(llama, tmp_path / "noisy", "--do_eval", "--neftune", "true", "--neftune_noise_alpha", "5")
    )
    _assert_outputs(tmp_path / "noisy", noisy, 3)
    first_plain, first_noisy = _losses(tmp_path / "plain")[0], _losses(tmp_path / "noisy")[0]
    # same weights and batch at step 1: only the embedding noise differs, and it is small
    assert first_noisy != first_plain and abs(first_noisy - first_plain) < 0.5
    # evaluating the saved NEFTune result again (eval mode, hook removed) reproduces its eval loss
    again = tmp_path / "again"
    argv = _argv(tmp_path / "noisy", again, "--do_eval")
    argv[argv.index("--do_train")] = "--do_train=false"
    assert run(argv)["eval_loss"] == pytest.approx(noisy["eval_loss"], abs=1e-5)
    assert noisy["eval_loss"] != plain["eval_loss"]


def test_chat_template_none_and_file(llama: Path, tmp_path: Path, loaded_splits: dict) -> None:
    out = tmp_path / "none"
    metrics = run(_argv(llama, out, "--chat_template", "none", steps=2))
    _assert_outputs(out, metrics, 2)
    assert loaded_splits["train"]["template"] is None
    assert not any({USER, ASSISTANT} & set(f["input_ids"]) for f in loaded_splits["train"]["features"])
    assert load_tokenizer(str(out)).chat_template is None  # the saved tokenizer matches training

    template_file = tmp_path / "my_template.json"
    source = {"system": "<|system|>Q", "conversation": ["<|user|>{{user}}<|assistant|>", "{{bot}}"]}
    template_file.write_text(json.dumps(source))
    out = tmp_path / "file"
    metrics = run(_argv(llama, out, "--chat_template", str(template_file), steps=2))
    _assert_outputs(out, metrics, 2)
    template = loaded_splits["train"]["template"]
    assert template.kind == "paddlenlp" and template.origin == str(template_file)
    system = [SYSTEM, *load_tokenizer(str(llama)).encode("Q", add_special_tokens=False)]
    assert all(f["input_ids"][: len(system)] == system for f in loaded_splits["train"]["features"])
    assert all(
        USER in f["input_ids"] and ASSISTANT in f["input_ids"] for f in loaded_splits["train"]["features"]
    )
    saved = load_tokenizer(str(out)).chat_template
    assert saved is not None and saved.kind == "paddlenlp" and saved.source == source


def test_lora_path_continuation(llama: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    lora = ("--lora", "true", "--lora_rank", "4")
    trained = run(_argv(llama, first, *lora, "--do_eval", "--learning_rate", "3e-2", steps=4))
    assert (first / "lora_config.json").is_file() and (first / "lora_model_state.pdparams").is_file()

    # evaluation only, adapter loaded from lora_path: exactly the first run's final eval loss
    argv = _argv(llama, tmp_path / "eval", *lora, "--lora_path", str(first), "--do_eval")
    argv[argv.index("--do_train")] = "--do_train=false"
    assert run(argv)["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-5)

    # training continues from the adapter: it starts where the first run ended, not from scratch
    second = tmp_path / "second"
    run(_argv(llama, second, *lora, "--lora_path", str(first), "--learning_rate", "3e-2", steps=2))
    first_losses, second_losses = _losses(first), _losses(second)
    assert second_losses[0] < first_losses[0] - 0.05
    config = json.loads((second / "lora_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == str(llama)


def test_do_predict_writes_test_metrics(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    metrics = run(_argv(llama, out, "--do_predict", "true", steps=2))
    _assert_outputs(out, metrics, 2)
    test = json.loads((out / "test_results.json").read_text())
    assert {"test_loss", "test_ppl", "test_accuracy"} <= set(test)
    assert test["test_ppl"] == pytest.approx(math.exp(test["test_loss"]))
    assert {"test_loss", "test_accuracy", "train_loss"} <= set(metrics)
    assert "eval_loss" not in metrics  # no --do_eval
