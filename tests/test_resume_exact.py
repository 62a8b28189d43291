"""Resuming is exact at any step: a run killed after checkpoint N and resumed from it trains on the same batches
with the same LR and RNG, so its per-step losses, final weights and eval metrics equal an uninterrupted run's.

Settings that matter are the quick start's: shuffled data over 3 epochs, cosine schedule with warmup, evaluation
every epoch; NEFTune is on so the paddle RNG feeds the training step too. 48 examples / batch 8 = 6 steps per
epoch, 18 steps. Resume points: step 12 (end of epoch 2, i.e. the resumed run starts at an epoch boundary) and
step 15 (mid epoch 3).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import pytest
from conftest import FIXTURE_DATA
from helpers_model import finetune_argv

import llm  # noqa: F401
from llm.train.finetune import run
from llm.train.reproducible import EpochShuffleBatchSampler
from llm.train.trainer import CausalLMTrainer

STEPS_PER_EPOCH, EPOCHS = 6, 3
Record = tuple[str, float, float, float]  # (batch digest, learning rate, global RNG draws, loss)
_TRAINING_STEP = CausalLMTrainer.training_step


class _Killed(Exception):
    """Stands in for the process dying right after a checkpoint was written."""


def _argv(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return finetune_argv(
        model_dir,
        out,
        FIXTURE_DATA,
        *extra,
        num_train_epochs=EPOCHS,
        learning_rate="3e-3",
        lr_scheduler_type="cosine",
        warmup_steps=3,
        evaluation_strategy="epoch",
        save_steps=3,
        neftune="true",
        neftune_noise_alpha=5,
    )


def _recording(monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None) -> dict[int, Record]:
    """Record (batch, lr, RNG draws, loss) per global step; with ``kill_at``, die when that step is about to train.

    Each step also draws from Python's and numpy's global RNGs, as a collator with random augmentation would:
    a resumed run must continue those streams too (the checkpoint's ``rng_state.pth`` holds them).
    """
    records: dict[int, Record] = {}

    def spy(self: CausalLMTrainer, model: paddle.nn.Layer, inputs: dict[str, Any]) -> paddle.Tensor:
        step = self.state.global_step + 1
        if step == kill_at:
            raise _Killed(step)
        digest = hashlib.sha1(np.ascontiguousarray(inputs["input_ids"].numpy()).tobytes()).hexdigest()
        lr = float(self.optimizer.get_lr())
        draws = random.random() + float(np.random.random())
        loss = _TRAINING_STEP(self, model, inputs)
        records[step] = (digest, lr, draws, float(loss.item()))
        return loss

    monkeypatch.setattr(CausalLMTrainer, "training_step", spy)
    return records


def _weights(out: Path) -> dict[str, np.ndarray]:
    return {
        k: np.asarray(v) for k, v in paddle.load(str(out / "model_state.pdparams"), return_numpy=True).items()
    }


@pytest.fixture(scope="module")
def uninterrupted(
    tiny_model_factory: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, dict[int, Record], dict[str, float]]]:
    """The reference: all 18 steps in one go."""
    model_dir = tiny_model_factory("llama")
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as monkeypatch:
        records = _recording(monkeypatch)
        metrics = run(_argv(model_dir, out))
    assert sorted(records) == list(range(1, STEPS_PER_EPOCH * EPOCHS + 1))
    yield out, records, metrics


@pytest.mark.parametrize("stop", [12, 15], ids=["epoch-boundary", "mid-epoch"])
def test_resume_in_a_later_epoch_is_exact(
    stop: int,
    uninterrupted: tuple[Path, dict[int, Record], dict[str, float]],
    tiny_model_factory: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference_out, reference, reference_metrics = uninterrupted
    model_dir, out = tiny_model_factory("llama"), tmp_path / "out"

    killed = _recording(monkeypatch, kill_at=stop + 1)
    with pytest.raises(_Killed):
        run(_argv(model_dir, out))
    assert killed == {s: reference[s] for s in range(1, stop + 1)}  # same run up to the kill

    resumed = _recording(monkeypatch)
    metrics = run(_argv(model_dir, out, "--resume_from_checkpoint", str(out / f"checkpoint-{stop}")))
    steps = list(range(stop + 1, STEPS_PER_EPOCH * EPOCHS + 1))
    assert sorted(resumed) == steps
    # data order first (the clearest message), then LR and RNG, then the losses themselves: all bit-identical
    assert [resumed[s][0] for s in steps] == [reference[s][0] for s in steps], "batches differ after resume"
    assert [resumed[s][1] for s in steps] == [reference[s][1] for s in steps], "learning rates differ"
    assert [resumed[s][2] for s in steps] == [reference[s][2] for s in steps], "global RNG streams differ"
    assert [resumed[s][3] for s in steps] == [reference[s][3] for s in steps], "losses differ"

    final, expected = _weights(out), _weights(reference_out)
    assert sorted(final) == sorted(expected)
    different = [k for k in expected if not np.array_equal(final[k], expected[k])]
    assert not different, f"final weights differ: {different[:5]}"
    assert metrics["eval_loss"] == reference_metrics["eval_loss"]


def test_epoch_order_depends_only_on_seed_and_epoch() -> None:
    """The shuffle of epoch e is a function of (seed, e): not of the global numpy RNG nor of earlier epochs."""
    data = list(range(20))

    def order(seed: int, epoch: int, global_seed: int) -> list[int]:
        sampler = EpochShuffleBatchSampler(data, batch_size=6, seed=seed)
        saved = np.random.get_state()
        np.random.seed(global_seed)
        try:
            sampler.set_epoch(epoch)
            return [i for batch in sampler for i in batch]
        finally:
            np.random.set_state(saved)

    assert order(1, 2, global_seed=0) == order(1, 2, global_seed=1)
    assert sorted(order(1, 2, 0)) == data
    assert len({tuple(order(1, e, 0)) for e in range(3)} | {tuple(order(2, 0, 0))}) == 4

    sampler = EpochShuffleBatchSampler(data, batch_size=6, seed=1)
    epochs = []
    for epoch in range(3):  # paddlenlp's loop calls set_epoch(epoch) before each epoch
        sampler.set_epoch(epoch)
        epochs.append([i for batch in sampler for i in batch])
    sampler.set_epoch(2)  # a resumed run starting in epoch 2
    assert [i for batch in sampler for i in batch] == epochs[2] == order(1, 2, 5)
    assert [len(b) for b in sampler] == [6, 6, 6, 2] and len(sampler) == 4
    dropped = EpochShuffleBatchSampler(data, batch_size=6, seed=1, drop_last=True)
    assert [len(b) for b in dropped] == [6, 6, 6] and len(dropped) == 3
