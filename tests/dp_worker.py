"""Test-only wrapper around ``llm.train.finetune.run`` for tests/test_distributed.py.

python [-m paddle.distributed.launch --nproc_per_node 2] tests/dp_worker.py RECORD_DIR cfg.json [--flag v ...]

Runs the fine-tuning workflow unchanged except that the Trainer is a recording subclass, and writes to
``RECORD_DIR``, per rank ``r``:

* ``init.rank{r}.pdparams`` / ``final.rank{r}.pdparams``: the trainable parameters (numpy) when the Trainer
  is built and after ``run`` returns (each rank keeps its own copy of the trained weights);
* ``batches.rank{r}.json``: per optimizer step, the rows of the batch that rank trained on (input ids and
  labels with padding removed).

A single-process run (world size 1) draws its batches with ``paddle.io.DistributedBatchSampler(num_replicas=1,
shuffle=True)`` instead of the Trainer's own single-process sampler: that is the sampler the data-parallel ranks
get from paddlenlp (with ``num_replicas=2``), so with twice the batch size its step-``k`` batch is the union of
the ranks' step-``k`` batches (the test checks this on the recorded rows).
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import json
import os
import sys

import numpy as np
import paddle

import llm.train.finetune as finetune

RECORD_DIR = sys.argv[1]
RANK = int(os.environ.get("PADDLE_TRAINER_ID", "0"))
captured: dict[str, object] = {}


def _trainable(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    return {n: p.numpy().copy() for n, p in model.named_parameters() if not p.stop_gradient}


class RecordingTrainer(finetune.CausalLMTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        captured["trainer"] = self
        self.recorded_batches: list[list[dict[str, list[int]]]] = []
        paddle.save(_trainable(self.model), os.path.join(RECORD_DIR, f"init.rank{RANK}.pdparams"))

    def _get_train_sampler(self):
        if self.args.world_size > 1:
            return super()._get_train_sampler()
        return paddle.io.DistributedBatchSampler(
            self.train_dataset,
            batch_size=self.args.per_device_train_batch_size,
            num_replicas=1,
            rank=0,
            shuffle=True,
            drop_last=self.args.dataloader_drop_last,
        )

    def training_step(self, model, inputs):
        mask = np.asarray(inputs["attention_mask"]).astype(bool)
        ids, labels = np.asarray(inputs["input_ids"]), np.asarray(inputs["labels"])
        self.recorded_batches.append(
            [
                {"input_ids": ids[i][mask[i]].tolist(), "labels": labels[i][mask[i]].tolist()}
                for i in range(ids.shape[0])
            ]
        )
        return super().training_step(model, inputs)


finetune.CausalLMTrainer = RecordingTrainer
if not paddle.is_compiled_with_cuda():
    paddle.set_device("cpu")
finetune.run(sys.argv[2:])
trainer = captured["trainer"]
paddle.save(_trainable(trainer.model), os.path.join(RECORD_DIR, f"final.rank{RANK}.pdparams"))
with open(os.path.join(RECORD_DIR, f"batches.rank{RANK}.json"), "w") as f:
    json.dump(trainer.recorded_batches, f)
