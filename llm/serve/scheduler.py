"""One generation loop for every request of the server.

HTTP handler threads call :meth:`Scheduler.submit` with prompt ids and a per-request
:class:`~llm.infer.GenerationConfig`; they get a :class:`Handle` to iterate over the new token ids as they are
produced, and to :meth:`Handle.cancel` (client gone, stop string seen). One background thread owns the engine.

This module fixes the interface the API layer uses. The loop below runs one request at a time (the baseline);
the continuously batched loop replaces :meth:`Scheduler._loop` behind the same interface.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from llm.errors import ConfigError
from llm.infer.sampling import GenerationConfig

_DONE = object()


class QueueFull(Exception):
    """The bounded queue of waiting requests is full (the API answers 503 with ``Retry-After``)."""


class SchedulerStopped(Exception):
    """The scheduler is shutting down or has stopped; no new requests are taken."""


@dataclass
class Handle:
    """One submitted request: iterate for its new token ids (blocking); the stop id is never yielded.

    After the iteration ends, :attr:`finish_reason` is ``"stop"`` (a stop id), ``"length"``
    (``max_new_tokens`` reached), ``"cancelled"`` (:meth:`cancel` or shutdown) or ``"error"`` (then
    :attr:`error` holds the message, and iterating raises :class:`RuntimeError` with it).
    """

    prompt_ids: list[int]
    config: GenerationConfig
    finish_reason: str | None = None
    error: str | None = None
    completion_tokens: int = 0
    _tokens: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Ask the loop to free this request's row (within one decode step); iteration then ends."""
        self._cancelled.set()

    # ----------------------------------------------------------- used by the loop
    def put(self, token: int) -> None:
        self.completion_tokens += 1
        self._tokens.put(int(token))

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self._tokens.put(_DONE)

    # ----------------------------------------------------------- used by the handler
    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._tokens.get()
            if item is _DONE:
                if self.finish_reason == "error":
                    raise RuntimeError(self.error or "generation failed")
                return
            yield item


class Scheduler:
    """Owns the engine; runs submitted requests in a background thread (see the module docstring)."""

    def __init__(self, engine: Any, *, max_batch_size: int = 8, max_queue: int = 64) -> None:
        if int(max_batch_size) < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if int(max_queue) < 1:
            raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self._waiting: queue.Queue[Handle] = queue.Queue(maxsize=self.max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def max_seq_len(self) -> int:
        return int(self.engine.max_seq_len)

    def start(self) -> Scheduler:
        """Start the loop thread (idempotent); returns ``self``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)
            self._thread.start()
        return self

    def submit(self, prompt_ids: list[int], config: GenerationConfig) -> Handle:
        """Queue a request; :class:`ConfigError` for bad input, :class:`QueueFull` when the queue is full."""
        if self._stop.is_set():
            raise SchedulerStopped("the server is shutting down")
        config.validate()
        if config.decode_strategy == "beam_search":
            raise ConfigError("beam search is not served; use greedy_search or sampling")
        ids = [int(t) for t in prompt_ids]
        self.engine._check([ids], config)  # empty prompt, ids outside the vocabulary, over the length limit
        handle = Handle(ids, config)
        try:
            self._waiting.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        return handle

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, end every waiting and running one as ``cancelled``, join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                self._waiting.get_nowait().finish("cancelled")
            except queue.Empty:
                break

    # ----------------------------------------------------------- the loop
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                handle = self._waiting.get(timeout=0.1)
            except queue.Empty:
                continue
            self._loop_one(handle)

    def _loop_one(self, handle: Handle) -> None:
        """Baseline: run one request to its end."""
        if handle.cancelled:
            handle.finish("cancelled")
            return
        try:
            for token in self.engine.stream(handle.prompt_ids, handle.config):
                if handle.cancelled or self._stop.is_set():
                    handle.finish("cancelled")
                    return
                handle.put(token)
        except Exception as err:  # noqa: BLE001 - reported to the client as an error, never a traceback
            handle.finish("error", f"{type(err).__name__}: {err}")
            return
        reason = "length" if handle.completion_tokens >= int(handle.config.max_new_tokens) else "stop"
        handle.finish(reason)
