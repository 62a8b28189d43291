"""What a resumed run needs to replay an uninterrupted one exactly: the epoch's data order and the RNG streams.

* Data order. paddlenlp's single-process sampler is ``paddle.io.BatchSampler(shuffle=True)``: each epoch draws its
  order from the *global* numpy RNG when the epoch's iterator starts. A resumed process starts epoch k with a fresh
  RNG (the state epoch 1 started from), so it trains the rest of epoch k on epoch 1's order.
  :class:`EpochShuffleBatchSampler` draws epoch k's order from ``default_rng([seed, k])``; as a
  ``paddle.io.DistributedBatchSampler`` it gets ``set_epoch(epoch)`` from paddlenlp's loop before every epoch.
* Paddle's CPU generator. paddle 2.6 pickles a ``GeneratorState`` as ``(device, seed, offset)``; the CPU generator's
  mt19937 position is not in it and ``offset`` stays 0, so the ``rng_state.pth`` of a checkpoint restores the
  generator as it was right after seeding. :func:`step_seed` gives every optimizer step its own seed instead, so
  the noise a step draws (NEFTune, dropout) depends only on (seed, step).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import paddle
from paddle.io import DistributedBatchSampler


class EpochShuffleBatchSampler(DistributedBatchSampler):
    """Single-process shuffled batches; epoch ``e`` uses the permutation ``default_rng([seed, e])`` draws."""

    def __init__(self, dataset: Sized, batch_size: int, seed: int, drop_last: bool = False) -> None:
        super().__init__(
            dataset, batch_size=batch_size, num_replicas=1, rank=0, shuffle=True, drop_last=drop_last
        )
        self.seed = int(seed) % 2**32

    def epoch_order(self, epoch: int) -> list[int]:
        """The sample indices of ``epoch`` in training order."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(len(self.dataset)).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self.epoch_order(self.epoch)
        self.epoch += 1  # like the parent: iterating again without set_epoch moves on to the next order
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) < self.batch_size and self.drop_last:
                return
            yield batch


def step_seed(base_seed: int, global_step: int) -> int:
    """The CPU generator seed for the optimizer step that follows ``global_step`` (a 63-bit hash of both)."""
    words = np.random.SeedSequence([int(base_seed) % 2**64, int(global_step)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def cpu_generator_seed() -> int:
    """The seed paddle's CPU generator was last seeded with."""
    return int(paddle.framework.core.default_cpu_generator().initial_seed())


def seed_cpu_generator(seed: int) -> None:
    """Re-seed paddle's CPU generator (CUDA generators, whose saved state restores exactly, are left alone)."""
    paddle.framework.core.default_cpu_generator().manual_seed(int(seed))
