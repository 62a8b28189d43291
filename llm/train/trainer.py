"""``CausalLMTrainer``: paddlenlp's Trainer plus ppl logging, token-accuracy and generation evaluation."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import paddle
from paddle.io import Dataset
from paddlenlp.trainer import Trainer
from paddlenlp.trainer.trainer_utils import PREFIX_CHECKPOINT_DIR

from llm.model import forward_loss

from .checkpoint import clear_marker
from .metrics import IGNORE_INDEX


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
        self.do_generation = do_generation
        self.gen_kwargs = gen_kwargs or {}

    def _save_checkpoint(self, model: paddle.nn.Layer, metrics: dict | None = None) -> None:
        # Re-saving a step that already has a checkpoint (resume from an older one): its old marker must not
        # vouch for half-rewritten files. CheckpointMarkerCallback.on_save writes the new marker.
        if self.args.should_save:
            clear_marker(
                os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            )
        super()._save_checkpoint(model, metrics=metrics)

    def _rotate_checkpoints(self, use_mtime: bool = False, output_dir: str | None = None) -> None:
        """Disabled: paddlenlp rotates by mtime before the completion marker exists, and only when
        ``local_rank == 0`` (never in a single-process run). ``CheckpointMarkerCallback`` rotates instead."""

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
