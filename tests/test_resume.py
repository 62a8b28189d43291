"""Checkpoints every ``save_steps``, ``save_total_limit`` and automatic resume from the newest *complete*
checkpoint, through the real workflow (``run()`` builds everything in its own ``unique_name`` scope, so
several runs and a resume can share this process)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA
from helpers_model import finetune_argv
from paddlenlp.trainer import Trainer

import llm  # noqa: F401
from llm.errors import ModelError
from llm.model import load_model
from llm.outputs import COMPLETE_MARKER, is_complete, mark_complete
from llm.train.callbacks import LOG_NAME, PLOT_NAME
from llm.train.checkpoint import find_last_checkpoint, rotate_checkpoints
from llm.train.finetune import run
from llm.train.trainer import CausalLMTrainer


def _argv(model_dir: Path, out: Path, steps: int) -> list[str]:
    # constant LR: the schedule must not depend on max_steps, so 6-then-8 steps equals 8 steps
    return finetune_argv(
        model_dir,
        out,
        FIXTURE_DATA,
        max_steps=steps,
        learning_rate="3e-3",
        lr_scheduler_type="constant",
        save_steps=2,
        save_total_limit=2,
    )


def _state_losses(out: Path) -> dict[int, float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return {r["step"]: r["loss"] for r in state["log_history"] if "loss" in r}


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def test_resume_from_newest_complete_checkpoint(
    tiny_model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    model_dir = tiny_model_factory("llama")
    out, reference = tmp_path / "out", tmp_path / "reference"

    run(_argv(model_dir, out, 6))
    # save_steps=2 -> checkpoints 2, 4, 6; save_total_limit=2 keeps the newest two, all marked complete
    assert _checkpoints(out) == ["checkpoint-4", "checkpoint-6"]
    assert all(is_complete(str(out / c)) for c in _checkpoints(out))
    marker = json.loads((out / "checkpoint-6" / COMPLETE_MARKER).read_text())
    assert marker["global_step"] == 6 and marker["run"]["model_name_or_path"] == str(model_dir.resolve())
    assert (
        marker["files"]["trainer_state.json"] == (out / "checkpoint-6" / "trainer_state.json").stat().st_size
    )

    # crash while writing checkpoint-6: its files are there but the marker is not (and the metrics log
    # ends in a half-written line)
    (out / "checkpoint-6" / COMPLETE_MARKER).unlink()
    with open(out / LOG_NAME, "a", encoding="utf-8") as f:
        f.write('{"step": 7, "loss": 4.')
    assert find_last_checkpoint(str(out)) == str(out / "checkpoint-4")

    resumed_from: list[object] = []
    original_train = CausalLMTrainer.train

    def spy(self: CausalLMTrainer, *args: object, **kwargs: object) -> object:
        resumed_from.append(kwargs.get("resume_from_checkpoint"))
        return original_train(self, *args, **kwargs)

    monkeypatch.setattr(CausalLMTrainer, "train", spy)
    from paddlenlp.utils.log import logger as paddlenlp_logger  # the workflow logs through paddlenlp's logger

    paddlenlp_logger.logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO):
            run(_argv(model_dir, out, 8))
    finally:
        paddlenlp_logger.logger.removeHandler(caplog.handler)
    assert resumed_from == [str(out / "checkpoint-4")]
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-6" in caplog.text
    assert "resuming from the newest complete checkpoint" in caplog.text

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    assert _checkpoints(out) == ["checkpoint-6", "checkpoint-8"]  # 6 re-saved, 4 rotated away
    assert all(is_complete(str(out / c)) for c in _checkpoints(out))
    assert json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["global_step"] == 8

    # an uninterrupted 8-step run: the same loss at every step, i.e. weights, optimizer, RNG and data order
    # were all restored at step 4
    run(_argv(model_dir, reference, 8))
    resumed, straight = _state_losses(out), _state_losses(reference)
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-6), step

    # the metrics log holds each step once (steps 5-6 of the crashed run were dropped on resume)
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["loss"] for r in records if "loss" in r] == [resumed[s] for s in range(1, 9)]
    assert (out / PLOT_NAME).stat().st_size > 1000
    assert is_complete(str(out))  # the final model is marked too


def test_resaving_a_checkpoint_drops_its_stale_marker_first(
    tiny_model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, out = tiny_model_factory("llama"), tmp_path / "out"
    run(_argv(model_dir, out, 4))
    assert find_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    final = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".jsonl"}

    def crash(self: Trainer, model: object, metrics: object = None) -> None:
        raise RuntimeError("disk full")

    # going back to checkpoint-2 and crashing while checkpoint-4 is rewritten: its files are now a mix of
    # two runs, so its old marker must not survive
    monkeypatch.setattr(Trainer, "_save_checkpoint", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run([*_argv(model_dir, out, 4), "--resume_from_checkpoint", str(out / "checkpoint-2")])
    assert not is_complete(str(out / "checkpoint-4"))
    with pytest.raises(ModelError, match="incomplete model directory"):
        load_model(str(out / "checkpoint-4"))
    assert find_last_checkpoint(str(out)) == str(out / "checkpoint-2")
    # the crash came before the final save: the previous run's final model is still there, whole and marked
    assert is_complete(str(out)) and {n: (out / n).read_bytes() for n in final} == final


def test_rotation_keeps_newest_complete_and_drops_interrupted(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    for step in (2, 6, 8):
        mark_complete(str(tmp_path / f"checkpoint-{step}"), "test", global_step=step)
    # 4 is an interrupted save; 10 is left by an earlier, longer run and is not ours to judge
    deleted = rotate_checkpoints(str(tmp_path), 2, str(tmp_path / "checkpoint-8"))
    assert sorted(Path(p).name for p in deleted) == ["checkpoint-2", "checkpoint-4"]
    assert _checkpoints(tmp_path) == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]
    # the best-model checkpoint survives the limit; no limit keeps everything
    rotate_checkpoints(str(tmp_path), 1, str(tmp_path / "checkpoint-8"), keep=str(tmp_path / "checkpoint-6"))
    assert _checkpoints(tmp_path) == ["checkpoint-10", "checkpoint-6", "checkpoint-8"]
    assert rotate_checkpoints(str(tmp_path), None, str(tmp_path / "checkpoint-8")) == []
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-8")
