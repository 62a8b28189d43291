"""One generation loop for every request of the server, continuously batched.

HTTP handler threads call :meth:`Scheduler.submit` with prompt ids and a per-request
:class:`~llm.infer.GenerationConfig`; they get a :class:`Handle` to iterate over the new token ids as they are
produced, and to :meth:`Handle.cancel` (client gone, stop string seen). One background thread owns the
engine's runner (do not call ``engine.generate`` while the scheduler runs).

Continuous (iteration-level) batching: between two decode steps the loop

1. frees the rows of cancelled requests (``runner.select``);
2. admits waiting requests up to ``max_batch_size`` rows: their prompts are prefilled together as one
   left-padded group and ``runner.join`` merges that group's KV entries into the running batch
   (:class:`~llm.infer.decoders.runner.KernelRunner`, dynamic fast path and ``paddle.inference`` alike);
3. chooses one token per row, each request with its own settings (greedy rows without repetition penalty in
   one vectorised argmax; sampling or penalised rows through their own
   :class:`~llm.infer.sampling.TokenChooser` and seen-token row, so a seeded request draws the same tokens
   alone or in a batch);
4. hands the tokens to the handles; rows that hit a stop id, their ``max_new_tokens`` or a cancel leave at
   once;
5. runs one ``runner.step`` for the remaining rows.

Runners without ``join`` (:class:`~llm.infer.decoders.generic.GenericRunner`, the fallback for models without
a fast kernel, or any custom runner) cannot take rows into a running batch: the loop then batches only the
requests that are waiting when the running batch is empty (rows still leave as they finish; nobody joins
until the batch is done).

Errors: a failed prefill of newcomers fails only those requests (``join`` leaves the running batch intact);
any other exception in the loop fails every request of the batch with ``"error"`` (message kept), resets the
runner and the loop goes on with the next requests. :meth:`Scheduler.shutdown` ends running and waiting
requests as ``"cancelled"`` and joins the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm.errors import ConfigError
from llm.infer.engine import left_pad
from llm.infer.sampling import GenerationConfig, TokenChooser, seen_matrix

logger = logging.getLogger(__name__)

_DONE = object()
IDLE_WAIT = 0.05  # seconds an idle loop waits for a request before it looks at the stop flag again


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        """True once the request has finished (its iteration will end)."""
        return self.finish_reason is not None

    def cancel(self) -> None:
        """Ask the loop to free this request's row (within one decode step); iteration then ends."""
        self._cancelled.set()

    # ----------------------------------------------------------- used by the loop
    def put(self, token: int) -> None:
        self.completion_tokens += 1
        self._tokens.put(int(token))

    def finish(self, reason: str, error: str | None = None) -> bool:
        """Record the end (first call wins); returns whether this call finished the request."""
        with self._lock:
            if self.finish_reason is not None:
                return False
            self.finish_reason, self.error = reason, error
        self._tokens.put(_DONE)
        return True

    # ----------------------------------------------------------- used by the handler
    def __iter__(self) -> Iterator[int]:
        while True:
            item = self._tokens.get()
            if item is _DONE:
                if self.finish_reason == "error":
                    raise RuntimeError(self.error or "generation failed")
                return
            yield item


@dataclass
class _Row:
    """A running request: one row of the runner's batch."""

    handle: Handle
    chooser: TokenChooser | None  # None: plain greedy, chosen in the batch-wide argmax
    seen: np.ndarray | None  # [vocab] bool, only with a repetition penalty
    stop: frozenset[int]
    max_new: int
    produced: int = 0


def _message(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


class Scheduler:
    """Owns the engine's runner; runs submitted requests continuously batched (see the module docstring)."""

    def __init__(self, engine: Any, *, max_batch_size: int = 8, max_queue: int = 64) -> None:
        if int(max_batch_size) < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if int(max_queue) < 1:
            raise ConfigError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.runner = engine.runner
        self.max_batch_size = int(max_batch_size)
        self.max_queue = int(max_queue)
        self.continuous = callable(getattr(self.runner, "join", None))  # rows can join a running batch
        self._waiting: queue.Queue[Handle] = queue.Queue(maxsize=self.max_queue)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # submit vs shutdown: nothing is queued once stopping
        self._idle = threading.Condition()
        self._unfinished = 0  # submitted and not yet finished
        self._thread: threading.Thread | None = None
        self._rows: list[_Row] = []  # the running batch, in the runner's row order (loop thread only)
        self._incoming: list[Handle] = []  # taken from the queue, not yet rows
        self._logits: np.ndarray | None = None  # [rows, vocab] not yet consumed
        self.steps = 0  # decode steps run
        self.prefills = 0  # prefill calls (begin or join)
        self.joins = 0  # prefills merged into a running batch
        self.generated = 0  # tokens handed to requests

    # ----------------------------------------------------------- public
    @property
    def max_seq_len(self) -> int:
        return int(self.engine.max_seq_len)

    @property
    def active_rows(self) -> int:
        """Requests in the running batch."""
        return len(self._rows)

    @property
    def queued(self) -> int:
        """Requests waiting for a row."""
        return self._waiting.qsize()

    @property
    def stopping(self) -> bool:
        """True once :meth:`shutdown` was called."""
        return self._stop.is_set()

    @property
    def running(self) -> bool:
        """True while the loop thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """Counters for a health endpoint."""
        return {
            "running": self.running,
            "stopping": self.stopping,
            "batching": "continuous" if self.continuous else "when idle",
            "active_rows": self.active_rows,
            "queued": self.queued,
            "max_batch_size": self.max_batch_size,
            "max_queue": self.max_queue,
            "steps": self.steps,
            "prefills": self.prefills,
            "joins": self.joins,
            "generated_tokens": self.generated,
        }

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted request has finished; False if ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unfinished == 0, timeout)

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
        with self._lock:
            if self._stop.is_set():
                raise SchedulerStopped("the server is shutting down")
            with self._idle:
                self._unfinished += 1
            try:
                self._waiting.put_nowait(handle)
            except queue.Full:
                self._count_finished()
                raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        return handle

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop taking requests, end every waiting and running one as ``cancelled``, join the thread."""
        with self._lock:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self.running:  # stuck in a long step: end the handles from here, the loop drops its rows later
            logger.warning("scheduler thread still busy after %.1f s; cancelling its requests", timeout)
            for handle in [row.handle for row in self._rows] + self._incoming:
                self._finish(handle, "cancelled")
        self._drain()

    # ----------------------------------------------------------- bookkeeping
    def _count_finished(self) -> None:
        with self._idle:
            self._unfinished -= 1
            if self._unfinished == 0:
                self._idle.notify_all()

    def _finish(self, handle: Handle, reason: str, error: str | None = None) -> None:
        if handle.finish(reason, error):
            self._count_finished()

    def _drain(self) -> None:
        while True:
            try:
                self._finish(self._waiting.get_nowait(), "cancelled")
            except queue.Empty:
                return

    def _reset(self) -> None:
        """Drop the running batch and the runner's cache (after an error or at the end)."""
        self._rows, self._logits, self._incoming = [], None, []
        try:
            self.runner.end()
        except Exception:  # noqa: BLE001 - a broken runner must not kill the loop
            logger.exception("runner.end() failed")

    # ----------------------------------------------------------- the loop
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self._iterate()
                except Exception as err:  # noqa: BLE001 - reported to the clients, the loop goes on
                    logger.exception("generation step failed; failing %d requests", len(self._rows))
                    handles = [row.handle for row in self._rows] + self._incoming
                    self._reset()  # before the clients hear of it: the next request finds a clean runner
                    for handle in handles:
                        self._finish(handle, "error", _message(err))
        finally:
            handles = [row.handle for row in self._rows] + self._incoming
            self._reset()
            for handle in handles:
                self._finish(handle, "cancelled")
            self._drain()

    def _iterate(self) -> None:
        """One step boundary: free cancelled rows, admit newcomers, choose and hand out tokens, step."""
        if any(row.handle.cancelled for row in self._rows):
            for row in self._rows:
                if row.handle.cancelled:
                    self._finish(row.handle, "cancelled")
            self._keep([i for i, row in enumerate(self._rows) if not row.handle.done])
        self._incoming = self._admit(block=not self._rows)
        if self._incoming:
            self._prefill(self._incoming)
            self._incoming = []
        if not self._rows:
            return
        tokens = self._choose()
        self._logits = None
        keep = self._emit(tokens)
        self._keep(keep)
        if self._rows:
            self._logits = self.runner.step(tokens[keep])
            self.steps += 1

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (in order) of the batch and the runner."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        self.runner.select(np.asarray(keep, dtype=np.int64))
        self._rows = [self._rows[i] for i in keep]
        if self._logits is not None:
            self._logits = self._logits[keep]

    def _admit(self, block: bool) -> list[Handle]:
        """Waiting requests for the free rows (none while a batch runs on a runner that cannot join)."""
        if self._rows and not self.continuous:
            return []
        out: list[Handle] = []
        while len(self._rows) + len(out) < self.max_batch_size and not self._stop.is_set():
            try:
                if block and not out:
                    handle = self._waiting.get(timeout=IDLE_WAIT)
                else:
                    handle = self._waiting.get_nowait()
            except queue.Empty:
                break
            if handle.cancelled:
                self._finish(handle, "cancelled")
            elif int(handle.config.max_new_tokens) == 0:
                self._finish(handle, "length")
            else:
                out.append(handle)
        return out

    def _prefill(self, handles: list[Handle]) -> None:
        """Prefill ``handles`` as one group and append their rows (alone if no batch is running)."""
        joining = bool(self._rows)
        try:
            rows = [self._row(h) for h in handles]
            ids, mask = left_pad([h.prompt_ids for h in handles], 0)
            max_new = np.asarray([row.max_new for row in rows], dtype=np.int64)
            if joining:
                logits = self.runner.join(ids, mask, max_new)
            else:
                logits = self.runner.begin(ids, mask, max_new if self.continuous else int(max_new.max()))
        except Exception as err:  # noqa: BLE001 - only the newcomers fail: join keeps the running batch
            logger.exception("prefill of %d requests failed", len(handles))
            if not joining:
                self._reset()
            for handle in handles:
                self._finish(handle, "error", _message(err))
            return
        self.prefills += 1
        self.joins += int(joining)
        logits = np.asarray(logits, dtype=np.float32)
        self._logits = logits if self._logits is None else np.concatenate([self._logits, logits])
        self._rows = self._rows + rows

    def _row(self, handle: Handle) -> _Row:
        cfg = handle.config
        penalty = float(cfg.repetition_penalty) != 1.0
        plain = cfg.decode_strategy != "sampling" and not penalty
        seen = seen_matrix([handle.prompt_ids], self.runner.vocab_size)[0] if penalty else None
        chooser = None if plain else TokenChooser(cfg, 1)
        return _Row(handle, chooser, seen, cfg.stop_ids, int(cfg.max_new_tokens))

    def _choose(self) -> np.ndarray:
        """One token per row: plain greedy rows in one argmax, the others through their own chooser."""
        logits, rows = self._logits, self._rows
        assert logits is not None and len(logits) == len(rows)
        special = [i for i, row in enumerate(rows) if row.chooser is not None]
        if not special:
            return logits.argmax(axis=-1).astype(np.int64)
        tokens = np.zeros(len(rows), dtype=np.int64)
        if len(special) < len(rows):
            plain = np.setdiff1d(np.arange(len(rows)), special)
            tokens[plain] = logits[plain].argmax(axis=-1)
        for i in special:
            row = rows[i]
            assert row.chooser is not None
            seen = None if row.seen is None else row.seen[None]
            tokens[i] = row.chooser(logits[i : i + 1], seen)[0]
        return tokens

    def _emit(self, tokens: np.ndarray) -> list[int]:
        """Hand each row its token; finish rows that are done. Returns the rows that go on."""
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(self._rows, tokens.tolist())):
            handle = row.handle
            if handle.cancelled:
                self._finish(handle, "cancelled")
            elif token in row.stop:
                self._finish(handle, "stop")
            else:
                handle.put(token)
                row.produced += 1
                self.generated += 1
                if row.produced >= row.max_new:
                    self._finish(handle, "length")
                else:
                    if row.seen is not None:
                        row.seen[token] = True
                    keep.append(i)
        return keep
