"""Continuous batching scheduler: batch invariance, per-request settings, joins, cancel, errors, bounded KV.

The runner is instrumented (:class:`Spy`), never timed: hooks run inside the loop thread at a given decode
step, so "submitted while others run" and "cancelled during a step" happen at known step boundaries.
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from helpers_infer import EOS, prefix_model, tiny

import llm.infer.decoders.runner as runner_module
from llm.errors import ConfigError
from llm.infer import GenerationConfig, create_engine
from llm.infer.decoders import GenericRunner, KernelRunner
from llm.infer.engine import Engine
from llm.infer.static import export_engine, load_static_engine
from llm.serve.scheduler import QueueFull, Scheduler, SchedulerStopped


class Spy:
    """Wraps a runner's methods on the instance: records every top-level call and the batch it ran on,
    runs ``hooks[n]`` inside the n-th ``step`` (after it), raises where ``fail`` says."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.rows = 0  # rows of the running batch, as the calls left it
        self.events: list[tuple[str, int, int]] = []  # (method, rows before the call, rows of the call)
        self.steps = 0
        self.hooks: dict[int, Callable[[], None]] = {}
        self.fail: dict[tuple[str, int], Exception] = {}  # (method, n-th call) -> raised instead
        self.after: Callable[[str], None] | None = None  # called after every top-level call
        self._calls: dict[str, int] = {}
        self._depth = 0
        for name in ("begin", "join", "step", "select", "end"):
            if hasattr(runner, name):
                setattr(runner, name, self._wrap(name, getattr(runner, name)))

    def _wrap(self, name: str, real: Callable) -> Callable:
        def call(*args: Any) -> Any:
            if self._depth:  # join -> begin: part of the join
                return real(*args)
            count = self._calls[name] = self._calls.get(name, 0) + 1
            size = 0 if name == "end" else len(args[0])
            if name == "step":
                assert size == self.rows, "step on a batch of another size than the runner holds"
            if (name, count) in self.fail:
                raise self.fail[(name, count)]
            self.events.append((name, self.rows, size))
            self._depth += 1
            try:
                out = real(*args)
            finally:
                self._depth -= 1
            self.rows = {"begin": size, "join": self.rows + size, "select": size, "end": 0}.get(
                name, self.rows
            )
            if self.after is not None and name != "end":
                self.after(name)
            if name == "step":
                self.steps += 1
                if self.steps in self.hooks:
                    self.hooks[self.steps]()
            return out

        return call

    def batch_sizes(self) -> list[int]:
        return [size for name, _, size in self.events if name == "step"]

    def joins(self) -> list[tuple[int, int]]:
        """``(running rows, new rows)`` of every prefill merged into a running batch."""
        return [(before, size) for name, before, size in self.events if name == "join" and before > 0]


def greedy(n: int, **kwargs: Any) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, **kwargs)


def sampling(n: int, seed: int, **kwargs: Any) -> GenerationConfig:
    base = dict(decode_strategy="sampling", temperature=1.3, top_k=40, top_p=0.95, seed=seed)
    return GenerationConfig(max_new_tokens=n, **{**base, **kwargs})


def alone(engine: Engine, prompt: list[int], cfg: GenerationConfig) -> list[int]:
    return engine.generate([prompt], cfg)[0]


def finish_reason(cfg: GenerationConfig, tokens: list[int]) -> str:
    """How a run that produced ``tokens`` ended (only a stop id ends one before ``max_new_tokens``)."""
    return "stop" if len(tokens) < cfg.max_new_tokens else "length"


def make_engine(kind: str, tmp_path: Any) -> Engine:
    if kind == "llama-static":
        export_engine(tiny("llama"), str(tmp_path), max_seq_len=48)
        return load_static_engine(str(tmp_path))
    if kind.startswith("prefix-"):
        return create_engine(prefix_model(kind.split("-", 1)[1]))
    family, backend = kind.split("-")
    return create_engine(tiny(family), backend=backend)


def mixed_requests(
    engine: Engine, count: int = 16, seed: int = 0
) -> list[tuple[list[int], GenerationConfig]]:
    """``count`` requests: prompt lengths 1-14, 2-18 new tokens (30 for the first, which keeps the batch
    running past step 20), every 4th sampled with its own seed, some with a repetition penalty, some ending
    early at a stop id taken from their own free run."""
    rng = np.random.RandomState(seed)
    out = []
    for i in range(count):
        prompt = rng.randint(5, EOS, size=int(rng.randint(1, 15))).tolist()
        n = 30 if i == 0 else int(rng.randint(2, 19))
        penalty = 1.3 if i % 5 == 2 else 1.0
        if i % 4 == 3:
            cfg = sampling(n, seed=100 + i, repetition_penalty=penalty)
        else:
            cfg = greedy(n, repetition_penalty=penalty)
        if i % 3 == 1 and cfg.decode_strategy == "greedy_search":
            free = alone(engine, prompt, cfg)
            cfg = greedy(n, repetition_penalty=penalty, eos_token_ids=(free[n // 2],))
        out.append((prompt, cfg))
    return out


def run_mixed(engine: Engine, max_batch_size: int = 6) -> tuple[Spy, Scheduler]:
    """16 mixed requests: 10 waiting at start, 6 more submitted at decode steps 2, 4, 7, 11, 15 and 20. Every
    request must produce what ``Engine.generate`` gives it alone, and end with the same reason."""
    requests = mixed_requests(engine)
    refs = [alone(engine, p, c) for p, c in requests]
    sched = Scheduler(engine, max_batch_size=max_batch_size, max_queue=16)
    spy = Spy(engine.runner)
    handles: list[Any] = [None] * len(requests)

    def submit(i: int) -> None:
        handles[i] = sched.submit(*requests[i])

    for i in range(10):
        submit(i)
    for i, step in zip(range(10, 16), (2, 4, 7, 11, 15, 20)):
        spy.hooks[step] = lambda i=i: submit(i)
    sched.start()
    try:
        assert sched.wait_idle(120)  # request 0 runs past step 20, so every hook has submitted by then
        got = [list(h) for h in handles]
    finally:
        sched.shutdown()
    assert sum(cfg.decode_strategy == "sampling" for _, cfg in requests) == 4
    assert sum(finish_reason(cfg, ref) == "stop" for (_, cfg), ref in zip(requests, refs)) >= 2
    for i, ((_, cfg), ref, handle) in enumerate(zip(requests, refs, handles)):
        assert got[i] == ref, f"request {i} ({cfg.decode_strategy}) differs from its run alone"
        assert handle.finish_reason == finish_reason(cfg, ref), i
        assert handle.completion_tokens == len(ref) and handle.prompt_tokens == len(requests[i][0])
    assert max(spy.batch_sizes()) > 1 and max(spy.batch_sizes()) <= max_batch_size
    return spy, sched


@pytest.mark.parametrize(
    "kind", ["llama-fast", "bloom-fast", "gpt-fast", "llama-static", "prefix-llama", "prefix-bloom"]
)
def test_batched_requests_equal_their_runs_alone(kind: str, tmp_path) -> None:
    """Rows join (at steps 2-20 and whenever a row frees) and leave (stop id, length) a running batch; every
    request's tokens are those it gets alone."""
    engine = make_engine(kind, tmp_path)
    assert isinstance(engine.runner, KernelRunner)
    spy, sched = run_mixed(engine)
    assert sched.continuous and len(spy.joins()) >= 4  # prefills merged into a running batch
    assert any(name == "select" for name, _, _ in spy.events)


def test_generic_runner_batches_only_when_idle() -> None:
    """The generic path cannot merge caches: new requests start only when the batch is empty, still batched."""
    engine = create_engine(tiny("llama"), backend="generic")
    assert isinstance(engine.runner, GenericRunner)
    spy, sched = run_mixed(engine)
    assert not sched.continuous and sched.stats()["batching"] == "when idle"
    assert [e for e in spy.events if e[0] == "begin" and e[1] != 0] == []  # nothing started beside a batch
    assert sum(1 for e in spy.events if e[0] == "begin") >= 2


def test_seeded_sampling_is_the_same_alone_and_in_a_busy_batch() -> None:
    engine = create_engine(tiny("llama"))
    prompt = [7, 99, 12, 140, 33]
    cfg = sampling(16, seed=11, repetition_penalty=1.2)
    expected = alone(engine, prompt, cfg)
    other_seed = alone(engine, prompt, sampling(16, seed=12, repetition_penalty=1.2))
    assert expected != other_seed
    sched = Scheduler(engine, max_batch_size=8).start()
    try:
        assert list(sched.submit(prompt, cfg)) == expected  # alone in the scheduler
    finally:
        sched.shutdown()
    sched = Scheduler(engine, max_batch_size=8)
    spy = Spy(engine.runner)
    busy = [sched.submit([5 + i] * (i + 2), greedy(12 + i)) for i in range(5)]
    busy.append(sched.submit(prompt, sampling(14, seed=3)))  # a neighbour that samples too
    late: list[Any] = []
    spy.hooks[3] = lambda: late.append(sched.submit(prompt, cfg))  # joins the running batch
    sched.start()
    try:
        assert sched.wait_idle(60)
    finally:
        sched.shutdown()
    assert list(late[0]) == expected
    assert spy.joins() == [(6, 1)]
    expected_busy = [alone(engine, [5 + i] * (i + 2), greedy(12 + i)) for i in range(5)]
    assert [list(h) for h in busy[:5]] == expected_busy


def test_requests_run_concurrently() -> None:
    """max_batch_size 4 with 8 waiting: the first prefill takes 4 rows, steps run on up to 4, freed rows are
    refilled from the queue, and a request submitted while others decode joins and finishes before them."""
    engine = create_engine(tiny("llama"))
    sched = Scheduler(engine, max_batch_size=4, max_queue=16)
    spy = Spy(engine.runner)
    handles = [sched.submit([10 + i, 20, 30 + i], greedy(6 + 4 * i)) for i in range(8)]
    late: list[Any] = []
    spy.hooks[2] = lambda: late.append(sched.submit([9, 8, 7], greedy(3)))
    running_when_late_done: list[list[bool]] = []

    def watch(_: str) -> None:
        if late and late[0].done and not running_when_late_done:
            running_when_late_done.append([not h.done for h in handles])

    spy.after = watch
    sched.start()
    try:
        assert sched.wait_idle(60)
    finally:
        sched.shutdown()
    assert spy.events[0] == ("begin", 0, 4)  # 4 of the 8 waiting requests prefilled together
    sizes = spy.batch_sizes()
    assert sizes[0] == 4 and max(sizes) == 4
    joins = spy.joins()
    assert len(joins) >= 5 and all(before + new <= 4 for before, new in joins)
    assert all(h.finish_reason == "length" for h in handles + late) and late[0].completion_tokens == 3
    # the late request joined a running batch and was done while requests admitted before it still ran
    assert running_when_late_done and sum(running_when_late_done[0]) >= 2


def test_cancel_frees_the_row_within_one_step() -> None:
    engine = create_engine(tiny("llama"))
    sched = Scheduler(engine, max_batch_size=4)
    spy = Spy(engine.runner)
    handles = [sched.submit([11 + i, 40, 41], greedy(30)) for i in range(3)]
    queued_then_cancelled = sched.submit([12, 13], greedy(30))
    queued_then_cancelled.cancel()  # cancelled while waiting: never prefilled
    spy.hooks[3] = handles[1].cancel  # during the 3rd decode step
    consumed: list[list[int]] = []
    reader = threading.Thread(target=lambda: consumed.append(list(handles[1])))
    reader.start()
    sched.start()
    try:
        assert sched.wait_idle(60)
    finally:
        sched.shutdown()
    reader.join(10)
    assert not reader.is_alive() and consumed == [alone(engine, handles[1].prompt_ids, greedy(30))[:3]]
    assert handles[1].finish_reason == "cancelled" and handles[1].completion_tokens == 3
    assert queued_then_cancelled.finish_reason == "cancelled" and queued_then_cancelled.completion_tokens == 0
    sizes = spy.batch_sizes()
    assert sizes[:3] == [3, 3, 3] and sizes[3] == 2  # the row is gone at the very next step
    assert ("select", 3, 2) in spy.events
    assert spy.events[0] == ("begin", 0, 3)  # the cancelled waiting request was never prefilled
    for h in (handles[0], handles[2]):
        assert h.finish_reason == "length" and list(h) == alone(engine, h.prompt_ids, greedy(30))


def test_bounded_queue_and_bad_requests() -> None:
    engine = create_engine(tiny("llama"))
    sched = Scheduler(engine, max_batch_size=2, max_queue=2)  # not started: requests stay queued
    waiting = [sched.submit([5, 6], greedy(4)), sched.submit([7], greedy(4))]
    with pytest.raises(QueueFull, match="2 requests"):
        sched.submit([8], greedy(4))
    assert sched.queued == 2 and sched.active_rows == 0
    with pytest.raises(ConfigError, match="beam search"):
        sched.submit([5], GenerationConfig(decode_strategy="beam_search", num_beams=2))
    with pytest.raises(ConfigError, match="empty"):
        sched.submit([], greedy(4))
    with pytest.raises(ConfigError, match="max_seq_len"):
        sched.submit([5] * 250, greedy(10))
    with pytest.raises(ConfigError, match="max_batch_size"):
        Scheduler(engine, max_batch_size=0)
    sched.shutdown()
    assert [h.finish_reason for h in waiting] == ["cancelled", "cancelled"]
    assert [list(h) for h in waiting] == [[], []]
    with pytest.raises(SchedulerStopped):
        sched.submit([5], greedy(4))
    assert sched.wait_idle(0)


def test_runner_errors_fail_the_affected_requests_and_the_loop_goes_on() -> None:
    engine = create_engine(tiny("llama"))
    runner = engine.runner
    sched = Scheduler(engine, max_batch_size=4)
    spy = Spy(runner)
    spy.fail[("step", 3)] = RuntimeError("boom in step")
    failed = [sched.submit([20 + i, 21], greedy(10)) for i in range(2)]
    sched.start()
    try:
        assert sched.wait_idle(60)
        assert [h.finish_reason for h in failed] == ["error", "error"]
        assert all("RuntimeError: boom in step" in h.error for h in failed)
        assert [h.completion_tokens for h in failed] == [3, 3]
        with pytest.raises(RuntimeError, match="boom in step"):
            list(failed[0])
        assert runner.rows == 0  # the runner was reset
        after = sched.submit([30, 31, 32], greedy(12))
        assert list(after) == alone(engine, [30, 31, 32], greedy(12)) and after.finish_reason == "length"

        # a failing prefill of a joining request fails only that request; the running batch goes on
        real_fn = runner.step_fn
        joined: list[Any] = []

        def fail_next_prefill() -> None:
            def broken(ids, *args):
                if ids.shape[1] > 1:
                    raise ValueError("bad prefill")
                return real_fn(ids, *args)

            broken.inplace = real_fn.inplace  # type: ignore[attr-defined]
            runner.step_fn = broken
            joined.append(sched.submit([50, 51, 52, 53], greedy(5)))

        spy.hooks[spy.steps + 2] = fail_next_prefill  # the loop is idle: steps stand still until the submit
        running = sched.submit([40, 41, 42], greedy(12))
        assert sched.wait_idle(60)
        runner.step_fn = real_fn
        assert joined[0].finish_reason == "error" and "ValueError: bad prefill" in joined[0].error
        assert list(running) == alone(engine, [40, 41, 42], greedy(12)) and running.finish_reason == "length"
        assert sched.running
    finally:
        sched.shutdown()


def test_shutdown_cancels_running_and_waiting_requests_and_joins_the_thread() -> None:
    engine = create_engine(tiny("llama"))
    sched = Scheduler(engine, max_batch_size=2)
    spy = Spy(engine.runner)
    handles = [sched.submit([60 + i, 61], greedy(40)) for i in range(5)]
    stopper = threading.Thread(target=sched.shutdown, kwargs={"timeout": 60})

    def stop_during_step() -> None:
        stopper.start()
        while not sched.stopping:  # shutdown has flagged the stop; the loop notices at the step boundary
            time.sleep(0.001)

    spy.hooks[3] = stop_during_step
    sched.start()
    for h in handles:
        list(h)  # iteration ends for every handle
    stopper.join(60)
    assert not stopper.is_alive() and not sched.running
    assert [h.finish_reason for h in handles] == ["cancelled"] * 5
    assert [h.completion_tokens for h in handles] == [3, 3, 0, 0, 0]
    assert engine.runner.rows == 0 and spy.steps == 3
    with pytest.raises(SchedulerStopped):
        sched.submit([5], greedy(2))


@pytest.mark.parametrize("kind", ["llama-fast", "prefix-bloom"])
def test_kv_span_stays_bounded_over_many_joins_and_leaves(kind: str, monkeypatch, tmp_path) -> None:
    """60 requests through 4 rows: after every runner call the buffer holds at most prefix + longest live row
    + GROW columns and no leading column that no row uses, although the batch runs far longer."""
    monkeypatch.setattr(runner_module, "GROW", 4)
    engine = make_engine(kind, tmp_path)
    runner = engine.runner
    prefix = runner.prefix_len
    sched = Scheduler(engine, max_batch_size=4, max_queue=64)
    spy = Spy(runner)
    seen: list[tuple[int, int]] = []

    def check(_: str) -> None:
        longest = int(runner.next_pos.max()) - (prefix if runner.after_prefix else 0)  # tokens of the row
        assert runner.col == prefix + longest, "a leading column no row uses was kept"
        assert runner.capacity <= prefix + longest + 4
        seen.append((runner.capacity, longest))

    spy.after = check
    rng = np.random.RandomState(7)
    handles = [
        sched.submit(
            rng.randint(5, EOS, size=int(rng.randint(1, 17))).tolist(), greedy(int(rng.randint(1, 25)))
        )
        for _ in range(60)
    ]
    sched.start()
    try:
        assert sched.wait_idle(120)
    finally:
        sched.shutdown()
    assert all(h.finish_reason == "length" for h in handles)
    assert spy.rows == 0 and len(spy.joins()) >= 30
    # one batch ran from the first prefill to the end: without trimming its span would be the run time
    assert [e[0] for e in spy.events].count("begin") == 1
    assert spy.steps > 3 * max(cap for cap, _ in seen)
