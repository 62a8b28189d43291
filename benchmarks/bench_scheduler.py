"""Sanity check of the continuously batched serving loop (:mod:`llm.serve.scheduler`) on a small model.

Usage::

    python benchmarks/bench_scheduler.py [--hidden 64] [--layers 2] [--vocab 49152] [--new 64] [--reps 2]

Builds a random LLaMA (``tiny_config`` with the given hidden size, layers and vocabulary; 49152 is the
vocabulary of the 135M model in ``bench_generation.py``, so the per-row token choice costs what it costs
there), then measures generated tokens per second, best of ``--reps``, from the first submit until every
request is done:

* ``engine batch N``: ``Engine.generate`` on N prompts at once (the static batch, for reference);
* ``scheduler N greedy``: N greedy requests submitted at once to a :class:`Scheduler` (``max_batch_size`` 16);
* ``scheduler 16 mixed``: 16 requests with different ``max_new_tokens`` (new/4 to new), every other one
  sampled (top-k 50, top-p 0.9, its own seed), so rows leave and the queue refills the batch;
* ``runner share``: the part of the wall time spent inside the runner (prefill, join, step, select); the
  rest is the loop's own work (token choice, bookkeeping, handing out tokens).

Prints one table. Not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import llm  # noqa: F401  (process defaults and the zlib fix before paddle)

# isort: split
import numpy as np

from llm.infer import GenerationConfig, create_engine
from llm.model import build_model, tiny_config
from llm.serve.scheduler import Scheduler

PROMPT = 32


class Timer:
    """Adds up the time spent in the runner's methods (wrapped on the instance)."""

    def __init__(self, runner: Any) -> None:
        self.total = 0.0
        for name in ("begin", "join", "step", "select"):
            if hasattr(runner, name):
                setattr(runner, name, self._wrap(getattr(runner, name)))

    def _wrap(self, real: Any) -> Any:
        def call(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return real(*args)
            finally:
                self.total += time.perf_counter() - start

        return call


def prompts(count: int, vocab: int, seed: int = 0) -> list[list[int]]:
    return np.random.RandomState(seed).randint(5, vocab, size=(count, PROMPT)).tolist()


def run_engine(engine: Any, count: int, new: int, vocab: int) -> tuple[float, float]:
    batch = prompts(count, vocab)
    start = time.perf_counter()
    out = engine.generate(batch, GenerationConfig(max_new_tokens=new))
    return sum(len(o) for o in out) / (time.perf_counter() - start), float("nan")


def run_scheduler(engine: Any, configs: list[GenerationConfig], vocab: int) -> tuple[float, float]:
    timer = Timer(engine.runner)
    sched = Scheduler(engine, max_batch_size=16, max_queue=64)
    sched.start()
    try:
        start = time.perf_counter()
        handles = [sched.submit(p, c) for p, c in zip(prompts(len(configs), vocab), configs)]
        sched.wait_idle()
        wall = time.perf_counter() - start
    finally:
        sched.shutdown()
        for name in ("begin", "join", "step", "select"):
            engine.runner.__dict__.pop(name, None)  # unwrap
    return sum(h.completion_tokens for h in handles) / wall, timer.total / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    config = tiny_config(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        max_position_embeddings=PROMPT + args.new + 8,
    )
    model = build_model(config, seed=0)
    model.eval()
    engine = create_engine(model, max_batch_size=16)
    new = args.new
    greedy = GenerationConfig(max_new_tokens=new, eos_token_ids=())
    mixed = [
        GenerationConfig(
            max_new_tokens=max(1, new // 4 + (3 * new // 4) * i // 15),
            decode_strategy="sampling" if i % 2 else "greedy_search",
            top_k=50,
            top_p=0.9,
            seed=i,
        )
        for i in range(16)
    ]
    cases = {
        "engine batch 1": lambda: run_engine(engine, 1, new, args.vocab),
        "engine batch 16": lambda: run_engine(engine, 16, new, args.vocab),
        "scheduler 1 greedy": lambda: run_scheduler(engine, [greedy], args.vocab),
        "scheduler 16 greedy": lambda: run_scheduler(engine, [greedy] * 16, args.vocab),
        "scheduler 16 mixed": lambda: run_scheduler(engine, mixed, args.vocab),
    }
    run_scheduler(engine, [greedy] * 2, args.vocab)  # warm-up
    print(f"llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; prompt {PROMPT}, new {new}")
    print(f"| {'case':<22} | {'tokens/s':>9} | {'runner share':>12} |")
    print(f"|{'-' * 24}|{'-' * 10}:|{'-' * 13}:|")
    for name, case in cases.items():
        best = max((case() for _ in range(args.reps)), key=lambda r: r[0])
        share = "" if np.isnan(best[1]) else f"{100 * best[1]:.0f}%"
        print(f"| {name:<22} | {best[0]:>9.0f} | {share:>12} |")


if __name__ == "__main__":
    main()
