"""``PretrainingTrainer``: the fine-tuning Trainer with pretraining's data order, schedule and evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle
from paddle.io import DistributedBatchSampler, Subset
from paddlenlp.transformers import CosineAnnealingWithWarmupDecay, LinearAnnealingWithWarmupDecay

from llm.train.trainer import CausalLMTrainer

from .dataset import EVAL_ITERS

_SCHEDULES = {"cosine": CosineAnnealingWithWarmupDecay, "linear": LinearAnnealingWithWarmupDecay}


def collate_tokens(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack samples: ``input_ids`` and ``labels`` ([batch, max_seq_length] int64; no mask, causal is implicit)."""
    return {key: np.stack([row[key] for row in rows]) for key in ("input_ids", "labels")}


class PretrainingTrainer(CausalLMTrainer):
    """* batches in dataset order (the dataset is shuffled once, when its index is built), split over the
      data-parallel ranks by ``DistributedBatchSampler`` — identical on resume;
    * ``cosine`` / ``linear`` schedules warm up then decay to ``min_learning_rate`` by ``decay_steps``;
    * each evaluation reads the next ``EVAL_ITERS`` batches of the validation set (the ``k``-th evaluation of a
      run, ``k = global_step // eval_steps``, always reads the same ones, resumed or not);
    * logs ``interval_tokens_per_second`` and ``consumed_samples`` next to the loss.
    """

    def __init__(self, *args: Any, seq_length: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seq_length = seq_length
        self.is_pretraining = True  # paddlenlp then logs interval_tokens_per_second_per_device

    def _get_train_sampler(self) -> paddle.io.BatchSampler | None:
        if self.train_dataset is None:
            return None
        return DistributedBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            shuffle=False,
            num_replicas=self.args.dataset_world_size,
            rank=self.args.dataset_rank,
            drop_last=self.args.dataloader_drop_last,
        )

    def create_scheduler(self, num_training_steps: int) -> Any:
        schedule = _SCHEDULES.get(
            str(getattr(self.args.lr_scheduler_type, "value", self.args.lr_scheduler_type))
        )
        if self.lr_scheduler is None and schedule is not None:
            args = self.args
            warmup = (
                args.warmup_steps if args.warmup_steps > 0 else int(args.warmup_ratio * num_training_steps)
            )
            decay = args.decay_steps if args.decay_steps and args.decay_steps > 0 else num_training_steps
            self.lr_scheduler = schedule(
                max_lr=args.learning_rate, min_lr=args.min_learning_rate, warmup_step=warmup, decay_step=decay
            )
        return super().create_scheduler(num_training_steps)

    def eval_window(self, dataset: Any) -> Subset:
        """The validation samples the current evaluation reads."""
        size = EVAL_ITERS * self.args.per_device_eval_batch_size * self.args.dataset_world_size
        steps = max(int(self.args.eval_steps or 0), 1)
        count = max(len(dataset) // size, 1)
        start = (self.state.global_step // steps % count) * size
        return Subset(dataset, list(range(start, min(start + size, len(dataset)))))

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        if eval_dataset is None and self.eval_dataset is not None:
            eval_dataset = self.eval_window(self.eval_dataset)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        if "loss" in logs:
            args = self.args
            global_batch = (
                args.per_device_train_batch_size * args.gradient_accumulation_steps * args.dataset_world_size
            )
            logs["consumed_samples"] = self.state.global_step * global_batch
            if "interval_samples_per_second" in logs:
                logs["interval_tokens_per_second"] = round(
                    logs["interval_samples_per_second"] * self.seq_length, 2
                )
        super().log(logs, **kwargs)
