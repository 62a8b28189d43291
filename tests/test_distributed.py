"""Data parallel LoRA fine-tuning on CPU: ``paddle.distributed.launch --nproc_per_node 2`` over gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA, ROOT

from llm.train.callbacks import LOG_NAME, PLOT_NAME


@pytest.mark.distributed
def test_data_parallel_lora_two_processes(tiny_model_factory, tmp_path: Path) -> None:
    out, log_dir = tmp_path / "out", tmp_path / "logs"
    config = {
        "model_name_or_path": str(tiny_model_factory("llama")),
        "dataset_name_or_path": str(FIXTURE_DATA),
        "output_dir": str(out),
        "lora": True,
        "lora_rank": 4,
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 2,
        "src_length": 32,
        "max_length": 64,
        "do_train": True,
        "disable_tqdm": True,
        "report_to": "none",
        "seed": 1,
    }
    cfg = tmp_path / "lora_dp.json"
    cfg.write_text(json.dumps(config, indent=2))
    # No CPU-specific settings needed: on a CPU build the launcher picks the gloo backend itself
    # (PADDLE_DISTRI_BACKEND=gloo in each worker's environment).
    cmd = [
        sys.executable,
        "-m",
        "paddle.distributed.launch",
        "--nproc_per_node",
        "2",
        "--log_dir",
        str(log_dir),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FLAGS_call_stack_level": "0"}
    proc = subprocess.run(
        [*cmd, "finetune_generation.py", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    logs = {rank: (log_dir / f"workerlog.{rank}") for rank in (0, 1)}
    tails = "\n".join(p.read_text(errors="replace")[-2000:] for p in logs.values() if p.is_file())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + tails

    for rank, path in logs.items():
        text = path.read_text(errors="replace")
        assert "Traceback" not in text and not any(line.startswith("error:") for line in text.splitlines())
        assert f"data_parallel_rank            : {rank}" in text  # each rank is one data-parallel replica
        assert "dataset_world_size            : 2" in text and "world_size                    : 2" in text
        env_dump = (log_dir / f"envlog.{rank}").read_text()
        assert "PADDLE_DISTRI_BACKEND=gloo" in env_dump and f"PADDLE_TRAINER_ID={rank}" in env_dump
        assert "Training completed." in text
    assert "loss: " in logs[0].read_text()  # rank 0 logs the training loss

    # rank 0 alone saves: the LoRA adapter, the checkpoint at step 2, metrics and the loss curve
    assert json.loads((out / "lora_config.json").read_text())["r"] == 4
    assert (out / "lora_model_state.pdparams").stat().st_size > 0
    assert (out / "checkpoint-2" / "checkpoint_complete.json").is_file()
    steps = [json.loads(line)["step"] for line in (out / LOG_NAME).read_text().splitlines()]
    assert steps[:3] == [1, 2, 3]
    assert (out / PLOT_NAME).stat().st_size > 1000
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
