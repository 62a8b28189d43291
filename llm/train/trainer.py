"""``CausalLMTrainer``: paddlenlp's Trainer plus ppl logging, token-accuracy and generation evaluation."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import paddle
from paddle.io import Dataset
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer import TRAINER_STATE_NAME
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from paddlenlp.trainer.utils.helper import distributed_isfile
from paddlenlp.utils.log import logger

from llm.model import forward_loss
from llm.model.fused import enable_fused_training
from llm.model.recompute import prepare_recompute
from llm.outputs import mark_in_progress

from .metrics import IGNORE_INDEX
from .reproducible import EpochShuffleBatchSampler, cpu_generator_seed, seed_cpu_generator, step_seed


class ListDataset(Dataset):
    """A map-style dataset over a list of feature dicts."""

    def __init__(self, features: list[dict]):
        super().__init__()
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, idx: int) -> dict:
        return self.features[idx]


def model_loss(model: paddle.nn.Layer, inputs: dict[str, Any]) -> tuple[paddle.Tensor, Any]:
    """Run one forward and return (loss, outputs) whatever container the family returns."""
    outputs = model(**inputs)
    loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
    return loss.reshape([]), outputs


def _logits_of(outputs: Any) -> paddle.Tensor:
    if isinstance(outputs, dict):
        return outputs["logits"]
    if isinstance(outputs, (tuple, list)):
        return outputs[1]
    return outputs.logits


class CausalLMTrainer(Trainer):
    """Trainer for causal LMs fed pre-shifted labels (paddlenlp CausalLM losses do not shift).

    * logs ``ppl = exp(loss)`` and ``eval_ppl`` next to every loss;
    * evaluation returns argmax ids (not logits) so token accuracy is cheap;
    * with ``do_generation`` the eval set holds prompts and evaluation generates answers
      (for BLEU / ROUGE / exact match).
    """

    def __init__(
        self, *args: Any, do_generation: bool = False, gen_kwargs: dict | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        prepare_recompute(self.model, self.args)  # CPU RNG-preserving recompute; off for models without it
        fused = enable_fused_training(
            self.model
        )  # CPU float32 LLaMA pieces on the toolkit's training kernels
        if fused:
            logger.info(f"fused training forward: {fused}")
        self.do_generation = do_generation
        self.gen_kwargs = gen_kwargs or {}

    def _save_checkpoint(self, model: paddle.nn.Layer, metrics: dict | None = None) -> None:
        # The checkpoint is written in place: readers refuse it until CheckpointMarkerCallback.on_save marks it
        # complete (re-saving a step that already has a checkpoint drops its old marker first).
        if self.args.should_save:
            path = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            mark_in_progress(path, "a training checkpoint save")
        super()._save_checkpoint(model, metrics=metrics)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """Disabled: paddlenlp rotates by mtime before the completion marker exists, and only when
        ``local_rank == 0`` (never in a single-process run). ``CheckpointMarkerCallback`` rotates instead."""

    def _get_train_sampler(self) -> paddle.io.BatchSampler | None:
        """Single process: shuffle by (seed, epoch) (:class:`EpochShuffleBatchSampler`) instead of the global numpy
        RNG, so a run resumed in epoch k replays epoch k's order. Several processes keep paddlenlp's
        ``DistributedBatchSampler``, already shuffled by epoch."""
        if self.args.world_size > 1 or self.train_dataset is None or not has_length(self.train_dataset):
            return super()._get_train_sampler()
        return EpochShuffleBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            seed=self.args.seed,
            drop_last=self.args.dataloader_drop_last,
        )

    def _inner_training_loop(
        self,
        args: Any,
        model: paddle.nn.Layer,
        train_dataloader: Any,
        len_dataloader: int | None,
        max_steps: int,
        num_train_epochs: int,
        num_update_steps_per_epoch: int,
        num_train_samples: int,
        resume_from_checkpoint: str | None,
        ignore_keys_for_eval: list[str] | None,
    ) -> Any:
        """Fix the per-step seed base, and restore the checkpoint's RNG state before the loop starts.

        paddlenlp restores it only after skipping the first batches of the resumed epoch, i.e. never when the
        checkpoint is at an epoch boundary (nothing to skip); restoring here covers that case, and the mid-epoch
        restore after the skip sets the same state again.
        """
        if getattr(self, "_rng_base_seed", None) is None:
            self._rng_base_seed = cpu_generator_seed()  # as Trainer.__init__ seeded it; nothing restored yet
        self._rng_seeded_step: int | None = None
        if (
            resume_from_checkpoint is not None
            and not args.ignore_load_lr_and_optim
            and distributed_isfile(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME))
        ):
            self._load_rng_state(resume_from_checkpoint)
        return super()._inner_training_loop(
            args,
            model,
            train_dataloader,
            len_dataloader,
            max_steps,
            num_train_epochs,
            num_update_steps_per_epoch,
            num_train_samples,
            resume_from_checkpoint,
            ignore_keys_for_eval,
        )

    def training_step(self, model: paddle.nn.Layer, inputs: dict[str, Any]) -> paddle.Tensor:
        """Seed paddle's CPU generator from (seed, global step) at each optimizer step's first micro-batch: its
        checkpointed state does not survive pickling (see :mod:`llm.train.reproducible`), a seed does."""
        base = getattr(self, "_rng_base_seed", None)
        if base is not None and self._rng_seeded_step != self.state.global_step:
            self._rng_seeded_step = self.state.global_step
            seed_cpu_generator(step_seed(base, self.state.global_step))
        return super().training_step(model, inputs)

    def compute_loss(self, model: paddle.nn.Layer, inputs: dict, return_outputs: bool = False) -> Any:
        if return_outputs:
            return model_loss(model, inputs)
        # family checks (e.g. zero-padding support) see through DataParallel; the forward runs through the
        # wrapper so gradients are all-reduced
        return forward_loss(model, inputs)

    def log(self, logs: dict[str, float], **kwargs: Any) -> None:
        for key in ("loss", "eval_loss", "test_loss"):
            if key in logs:
                logs[key.replace("loss", "ppl")] = math.exp(min(logs[key], 50.0))
        super().log(logs, **kwargs)

    def prediction_step(
        self,
        model: paddle.nn.Layer,
        inputs: dict,
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[Any, Any, Any]:
        inputs = self._prepare_inputs(inputs)
        if self.do_generation and not prediction_loss_only:
            return self._generation_step(model, inputs)
        with paddle.no_grad():
            loss, outputs = model_loss(model, inputs)
        if prediction_loss_only:
            return loss.detach(), None, None
        preds = _logits_of(outputs).argmax(axis=-1)
        return loss.detach(), preds, inputs["labels"]

    def _generation_step(self, model: paddle.nn.Layer, inputs: dict) -> tuple[Any, Any, Any]:
        labels = inputs.pop("labels")
        kwargs = dict(self.gen_kwargs)
        top_k, top_p = kwargs.pop("top_k", 1), kwargs.pop("top_p", 1.0)
        strategy = "greedy_search" if top_k == 1 and top_p >= 1.0 else "sampling"
        extra = {} if strategy == "greedy_search" else {"top_k": top_k, "top_p": top_p}
        with paddle.no_grad():
            generated = model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs.get("attention_mask"),
                decode_strategy=strategy,
                **extra,
                **kwargs,
            )[0]
        preds = generated.numpy()
        eos = kwargs.get("eos_token_id")
        stop = set(eos) if isinstance(eos, list | tuple | set) else {eos} if eos is not None else set()
        pad = np.full_like(preds, IGNORE_INDEX)
        for i, row in enumerate(preds):  # cut at the first stop id so padding does not count
            for j, tok in enumerate(row):
                pad[i, j] = tok
                if tok in stop:
                    break
        return None, paddle.to_tensor(pad), labels
