"""Trainer callbacks: a JSONL training log, the loss-curve PNG, and checkpoint-complete markers."""

from __future__ import annotations

import json
import os
from typing import Any

from paddlenlp.trainer import TrainerCallback

from llm.outputs import mark_complete

from .checkpoint import rotate_checkpoints

LOG_NAME = "training_log.jsonl"
PLOT_NAME = "loss_curve.png"


class MetricsLogCallback(TrainerCallback):
    """Append every log record to ``output_dir/training_log.jsonl`` and plot the loss curve at the end."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if _is_number(v)}}
        with open(os.path.join(args.output_dir, LOG_NAME), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Drop records past the starting step: a resumed (or restarted) run re-logs those steps."""
        path = os.path.join(args.output_dir, LOG_NAME)
        if not state.is_world_process_zero or not os.path.isfile(path):
            return
        kept = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:  # e.g. a line cut short by the crash we are resuming from
                    continue
                if isinstance(record, dict) and record.get("step", 0) <= state.global_step:
                    kept.append(json.dumps(record) + "\n")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(kept)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            plot_loss(state.log_history, os.path.join(args.output_dir, PLOT_NAME))


class CheckpointMarkerCallback(TrainerCallback):
    """Mark ``checkpoint-N`` complete once the Trainer has finished writing it (resume only trusts marked ones),
    recording the run's ``settings`` (see :func:`llm.train.checkpoint.run_settings`), then apply
    ``save_total_limit`` (see :func:`rotate_checkpoints`; :class:`CausalLMTrainer` leaves it to us).
    """

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        self.settings = settings or {}

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if os.path.isdir(path):
                mark_complete(path, "training checkpoint", global_step=state.global_step, run=self.settings)
                rotate_checkpoints(args.output_dir, args.save_total_limit, path, state.best_model_checkpoint)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_loss(log_history: list[dict], path: str) -> str | None:
    """Plot training loss (and eval loss points) against the step; returns the PNG path or None if no data."""
    train = [(r["step"], r["loss"]) for r in log_history if "loss" in r and "step" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_history if "eval_loss" in r and "step" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
