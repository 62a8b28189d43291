"""End-to-end fine-tuning through the real workflow: every family x SFT / LoRA / Prefix / packed SFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import paddle
import pytest
from conftest import FIXTURE_DATA
from helpers_model import finetune_argv

import llm  # noqa: F401
from llm.errors import UserError
from llm.model import FAMILIES, apply_peft, forward_loss, load_model
from llm.train.finetune import run

MODES = {
    "sft": ([], "3e-3"),
    "lora": (["--lora", "true", "--lora_rank", "8"], "1e-2"),
    "prefix": (["--prefix_tuning", "true", "--num_prefix_tokens", "4"], "1e-1"),
    "zero_padding": (["--zero_padding", "true"], "3e-3"),
}


def _argv(model_dir: Path, out: Path, mode: str, steps: int = 8) -> list[str]:
    extra, lr = MODES[mode]
    return finetune_argv(
        model_dir, out, FIXTURE_DATA, "--do_eval", *extra, max_steps=steps, learning_rate=lr, save_steps=4
    )


def _logged_losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _reloaded_eval(model_dir: Path, out: Path, mode: str) -> tuple[float, float]:
    """Eval loss and teacher-forced token accuracy of the saved result, recomputed from disk independently
    of the trainer (accuracy: argmax == label over all supervised dev tokens)."""
    from types import SimpleNamespace

    from llm.data import DataCollator, load_split
    from llm.model import forward_logits
    from llm.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    feats = load_split(
        str(FIXTURE_DATA), "dev", tok, tok.chat_template, src_length=32, max_length=64, zero_padding=False
    )
    with paddle.utils.unique_name.guard():
        if mode in ("sft", "zero_padding"):  # full-parameter runs save the whole model
            model = load_model(str(out))
        else:
            args = SimpleNamespace(
                model_name_or_path=str(model_dir), lora=mode == "lora", lora_path=str(out) if mode == "lora" else None,
                prefix_tuning=mode == "prefix", prefix_path=str(out) if mode == "prefix" else None,
                lora_rank=8, rslora=False, lora_plus_scale=1.0, pissa=False, num_prefix_tokens=4,
            )  # fmt: skip
            model = apply_peft(load_model(str(model_dir)), args)
    model.eval()
    collate = DataCollator(tok)
    total, count, correct, supervised = 0.0, 0, 0, 0
    with paddle.no_grad():
        for i in range(0, len(feats), 8):
            batch = collate(feats[i : i + 8])
            n = len(batch["input_ids"])  # the Trainer averages batch-mean losses weighted by batch size
            total += float(forward_loss(model, batch)) * n
            count += n
            preds = forward_logits(model, batch).numpy().argmax(-1)
            mask = batch["labels"] != -100
            correct += int((preds[mask] == batch["labels"][mask]).sum())
            supervised += int(mask.sum())
    return total / count, correct / supervised


CASES = [(f, m) for f in sorted(FAMILIES) for m in MODES]


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_finetune_family_mode(family: str, mode: str, tiny_model_factory, tmp_path: Path) -> None:
    spec = FAMILIES[family]
    model_dir = tiny_model_factory(family)
    out = tmp_path / "out"
    if not spec.supports.get(mode, False):
        with pytest.raises(UserError, match=family):
            run(_argv(model_dir, out, mode))
        return
    with paddle.utils.unique_name.guard():
        metrics = run(_argv(model_dir, out, mode))
    losses = _logged_losses(out)
    assert len(losses) == 8 and all(np.isfinite(losses))
    # training helped: the dev loss of the result is below the untouched base model's
    assert metrics["eval_loss"] < _reloaded_eval(model_dir, model_dir, "sft")[0] - 1e-3
    assert (out / "loss_curve.png").stat().st_size > 1000
    for name in ("train_results.json", "eval_results.json", "metrics.json"):
        assert (out / name).is_file()
    expected = {"lora": "lora_config.json", "prefix": "prefix_config.json"}.get(mode, "config.json")
    assert (out / expected).is_file()
    # the saved result reproduces the trainer's final eval accuracy (micro-averaged over tokens, so packing
    # does not change it) and, unpacked, its eval loss when reloaded from disk
    loss, accuracy = _reloaded_eval(model_dir, out, mode)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    if mode == "zero_padding":  # packed eval batches average the loss differently
        return
    assert abs(loss - metrics["eval_loss"]) < 1e-4
