"""Data parallel LoRA fine-tuning on CPU: ``paddle.distributed.launch --nproc_per_node 2`` over gloo.

Gradient synchronisation is checked against a single-process reference. Why the comparison is exact up to
float rounding:

* paddlenlp's Trainer gives each rank ``paddle.io.DistributedBatchSampler(shuffle=True, num_replicas=2)``,
  which shuffles ``arange(N)`` with ``np.random.RandomState(epoch)`` and hands rank ``r`` the slice
  ``[2Bk + rB, 2Bk + (r+1)B)`` at step ``k``. The reference (tests/dp_worker.py, one process) draws from the same
  sampler with ``num_replicas=1`` and batch ``2B``, i.e. the slice ``[2Bk, 2Bk + 2B)``: the union. ``N`` is even
  so neither sampler pads. The recorded batch rows are compared below rather than trusted.
* The loss is the mean over supervised tokens; every example here has exactly 4 (3 digits + EOS), so the
  average of the two ranks' mean gradients (what DataParallel's all-reduce gives) equals the union's mean.
* Constant learning rate, no warmup, no dropout in the tiny llama or in LoRA; both runs use the same seed and
  the recorded initial LoRA weights are compared too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from conftest import ROOT

from llm.train.callbacks import LOG_NAME, PLOT_NAME

WORKER = ROOT / "tests" / "dp_worker.py"
BATCH, STEPS, EXAMPLES = 4, 5, 48  # 2 ranks x 4 rows x 5 steps = 40 of 48 examples, all within epoch 0


def _digits_data(path: Path) -> Path:
    """48 distinct single-turn ``digits: <words>`` -> 3-digit examples from the demo data (4 supervised tokens
    each)."""
    rows = []
    for line in (ROOT / "demo" / "data" / "train.json").read_text().splitlines():
        row = json.loads(line)
        if isinstance(row["src"], str) and row["src"].startswith("digits:") and len(row["tgt"]) == 3:
            if line not in rows:
                rows.append(line)
    path.mkdir()
    (path / "train.json").write_text("\n".join(rows[:EXAMPLES]) + "\n")
    return path


def _load(path: Path) -> dict[str, np.ndarray]:
    return paddle.load(str(path), return_numpy=True)


def _rows(batch: list[dict]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(tuple(r["input_ids"]), tuple(r["labels"])) for r in batch]


def _run(cmd: list[str], log_dir: Path | None = None) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FLAGS_call_stack_level": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    logs = sorted(log_dir.glob("workerlog.*")) if log_dir else []
    tails = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + tails


def _logged_losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / LOG_NAME).read_text().splitlines()) if "loss" in r]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "algo, sharding", [(None, None), ("nf4", None), (None, "stage1")], ids=["dp", "dp-nf4", "sharding1"]
)
def test_data_parallel_lora_synchronises_gradients(
    algo: str | None, sharding: str | None, tiny_model_factory, tmp_path: Path
) -> None:
    """Also on a QLoRA base (``weight_quantize_algo nf4``: each rank quantizes the base as it loads), and with
    sharding stage 1 (the optimizer state split over the 2 ranks, which still read different data)."""
    out, log_dir, dp_rec, ref_rec = (tmp_path / n for n in ("out", "logs", "dp_rec", "ref_rec"))
    dp_rec.mkdir()
    ref_rec.mkdir()
    config = {
        "model_name_or_path": str(tiny_model_factory("llama")),
        "dataset_name_or_path": str(_digits_data(tmp_path / "data")),
        "output_dir": str(out),
        "lora": True,
        "lora_rank": 4,
        "max_steps": STEPS,
        "per_device_train_batch_size": BATCH,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_steps": 2,
        "src_length": 32,
        "max_length": 64,
        "do_train": True,
        "disable_tqdm": True,
        "report_to": "none",
        "seed": 1,
    }
    if algo:
        config["weight_quantize_algo"] = algo
    if sharding:
        config.update(sharding=sharding, sharding_parallel_degree=2)
    cfg = tmp_path / "lora_dp.json"
    cfg.write_text(json.dumps(config, indent=2))
    # No CPU-specific settings needed: on a CPU build the launcher picks the gloo backend itself
    # (PADDLE_DISTRI_BACKEND=gloo in each worker's environment).
    launch = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir"]
    _run([*launch, str(log_dir), str(WORKER), str(dp_rec), str(cfg)], log_dir)
    reference = ["--per_device_train_batch_size", str(2 * BATCH), "--output_dir", str(tmp_path / "ref")]
    _run([sys.executable, str(WORKER), str(ref_rec), str(cfg), *reference])

    # the data: each rank trained on its own rows, and the two together are exactly the reference's batch
    batches = [json.loads((dp_rec / f"batches.rank{r}.json").read_text()) for r in (0, 1)]
    ref_batches = json.loads((ref_rec / "batches.rank0.json").read_text())
    assert [len(b) for b in (*batches, ref_batches)] == [STEPS] * 3
    for step in range(STEPS):
        rank0, rank1, union = _rows(batches[0][step]), _rows(batches[1][step]), _rows(ref_batches[step])
        assert len(rank0) == len(rank1) == BATCH and len(union) == 2 * BATCH
        assert not set(rank0) & set(rank1), f"step {step}: the ranks share rows"
        assert rank0 + rank1 == union, f"step {step}: rank 0 + rank 1 rows are not the reference batch"
        # equal supervised-token counts: the mean of per-rank mean losses is the union's mean loss
        assert {sum(t != -100 for t in labels) for _, labels in union} == {4}
    seen = [row for b in batches for batch in b for row in _rows(batch)]
    assert len(set(seen)) == 2 * BATCH * STEPS  # no row trained twice: different data at every step

    # the weights: same start, identical on both ranks afterwards, equal to the union-batch reference
    init = [_load(dp_rec / f"init.rank{r}.pdparams") for r in (0, 1)]
    final = [_load(dp_rec / f"final.rank{r}.pdparams") for r in (0, 1)]
    ref_init, ref_final = _load(ref_rec / "init.rank0.pdparams"), _load(ref_rec / "final.rank0.pdparams")
    keys = sorted(ref_final)
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys), keys  # only LoRA weights train
    assert sorted(final[0]) == sorted(final[1]) == keys
    for key in keys:
        np.testing.assert_array_equal(init[0][key], ref_init[key], err_msg=key)
        np.testing.assert_array_equal(final[0][key], final[1][key], err_msg=f"ranks differ: {key}")
        np.testing.assert_allclose(final[0][key], ref_final[key], rtol=0, atol=1e-5, err_msg=key)
        # every tensor moved by far more than the tolerance, so the comparison above has teeth
        assert np.abs(final[0][key] - init[0][key]).max() > 1e-3, key

    logs = {rank: (log_dir / f"workerlog.{rank}") for rank in (0, 1)}
    for rank, path in logs.items():
        text = path.read_text(errors="replace")
        assert "Traceback" not in text and not any(line.startswith("error:") for line in text.splitlines())
        # each rank is one data-parallel replica, or one sharding rank (which reads its own data too)
        replica = "sharding_parallel_rank        :" if sharding else "data_parallel_rank            :"
        assert f"{replica} {rank}" in text
        assert "dataset_world_size            : 2" in text and "world_size                    : 2" in text
        env_dump = (log_dir / f"envlog.{rank}").read_text()
        assert "PADDLE_DISTRI_BACKEND=gloo" in env_dump and f"PADDLE_TRAINER_ID={rank}" in env_dump
        assert "Training completed." in text
    assert "loss: " in logs[0].read_text()  # rank 0 logs the training loss

    # rank 0 alone saves: the LoRA adapter, the checkpoint at step 2, metrics and the loss curve
    assert json.loads((out / "lora_config.json").read_text())["r"] == 4
    saved = _load(out / "lora_model_state.pdparams")  # rank 0's trained LoRA weights, "model." prefix dropped
    assert sorted(f"model.{k}" for k in saved) == keys
    for key, value in saved.items():
        np.testing.assert_array_equal(value, final[0][f"model.{key}"], err_msg=key)
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / LOG_NAME).read_text().splitlines()]
    assert steps[:3] == [1, 2, 3]
    assert (out / PLOT_NAME).stat().st_size > 1000
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == STEPS
    # the losses rank 0 logs (averaged over the ranks) equal the one-process run's on the union batches
    np.testing.assert_allclose(_logged_losses(out), _logged_losses(tmp_path / "ref"), rtol=0, atol=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("sharding", [None, "stage1"], ids=["dp", "sharding1"])
def test_pretraining_two_processes_equal_one_with_twice_the_batch(
    sharding: str | None, tiny_model_factory, tmp_path: Path
) -> None:
    """run_pretrain.py: 2 processes x batch 2 log the same 5 losses as 1 process x batch 4 (<= 1e-5), and save
    the same weights: the ranks read interleaved batches of the one (unshuffled) sample order."""
    from llm.data.mmap import MMapWriter

    rng = np.random.default_rng(0)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with MMapWriter(str(corpus / "random"), dtype=np.uint16) as writer:
        for _ in range(200):
            writer.add_document(rng.integers(4, 160, size=int(rng.integers(10, 40))))
    flags = {
        "model_name_or_path": tiny_model_factory("llama"),
        "input_dir": corpus,
        "split": "100,0,0",
        "max_seq_length": 32,
        "max_steps": 5,
        "learning_rate": 1e-2,
        "min_learning_rate": 1e-3,
        "warmup_steps": 1,
        "logging_steps": 1,
        "save_steps": 5,
        "do_train": True,
        "disable_tqdm": True,
        "report_to": "none",
        "seed": 2,
    }
    if sharding:
        flags.update(sharding=sharding, sharding_parallel_degree=2)
    argv = [part for key, value in flags.items() for part in (f"--{key}", str(value))]
    script, out, ref, log_dir = (
        str(ROOT / "run_pretrain.py"),
        tmp_path / "out",
        tmp_path / "ref",
        tmp_path / "logs",
    )
    launch = [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        "2",
        "--log_dir",
        str(log_dir),
    ]
    _run([*launch, script, *argv, "--per_device_train_batch_size", "2", "--output_dir", str(out)], log_dir)
    _run([sys.executable, script, *argv, "--per_device_train_batch_size", "4", "--output_dir", str(ref)])

    losses, expected = _logged_losses(out), _logged_losses(ref)
    assert len(losses) == len(expected) == 5
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-5)
    assert expected[-1] < expected[0]
    final, ref_final = _load(out / "model_state.pdparams"), _load(ref / "model_state.pdparams")
    for key in ref_final:
        np.testing.assert_allclose(final[key], ref_final[key], rtol=0, atol=1e-5, err_msg=key)
    text = (log_dir / "workerlog.1").read_text(errors="replace")
    assert "dataset_world_size            : 2" in text and "Training completed." in text
