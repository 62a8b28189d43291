"""The preallocated-cache runner shared by the dynamic fast path and the ``paddle.inference`` path.

Per batch it keeps one ``[b, kv_heads, C, head_dim]`` key and value buffer per layer; the prefix (if any)
fills the first ``P`` columns. Rows are left padded and share one write column ``col``; ``valid`` (which
columns hold a row's real keys), ``keypos`` (their positions, for ALiBi) and ``next_pos`` are per row, so rows
of different lengths coexist. The capacity ``C`` starts at the prompt plus :data:`GROW` columns and grows
by :data:`GROW` (one ``concat`` per buffer), never past the last column a live row can still write
(``end_col``: prompt + its ``max_new_tokens`` - 1): every step attends over the whole buffer (free columns
masked), so a buffer sized for the last step from the start would make early steps read up to twice the
keys they need.
Each call's new key/value entries go into the buffers in place at ``col``: a *split* step function (the
exported graph) returns them and the runner writes them; an *in-place* one (the dygraph kernels) writes
them itself and attends over the buffer directly.

Rows leave with :meth:`select` and join with :meth:`join` (continuous batching, :mod:`llm.serve.scheduler`):
the new rows are prefilled as a group of their own, then the two groups' used columns are right-aligned (the
shorter group gets invalid columns on its left) and concatenated along the batch axis. After rows leave,
leading columns (after the prefix) that no row uses any more are dropped, so ``C`` stays within the longest
live row + prefix + :data:`GROW`, however long the batch has been running.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import paddle

from llm.infer.decoders.base import NEG, StepKernel, prompt_biases
from llm.infer.decoders.generic import prompt_positions

Prefix = list[tuple[paddle.Tensor, paddle.Tensor]]
# split:    (input_ids, positions, new_bias, past_bias, past_keypos, past_k, past_v) -> (logits, k_new, v_new)
# in-place: (input_ids, positions, bias, keypos, keys, values, col, span) -> logits   (fn.inplace = True)
StepFn = Callable[..., object]
GROW = 32  # KV-buffer columns added at a time
_STATE = ("keys", "values", "valid", "keypos", "next_pos", "end_col", "col", "capacity")


class KernelRunner:
    """Drives a step function over preallocated per-layer KV buffers; rows can leave and join."""

    def __init__(
        self,
        step_fn: StepFn,
        geometry: dict,
        *,
        prefix: Prefix | None = None,
        max_seq_len: int | None = None,
        dtype: str = "float32",
        kind: str = "dynamic/fast",
    ) -> None:
        self.step_fn = step_fn
        self.inplace = bool(getattr(step_fn, "inplace", False))
        self.kind = kind
        self.dtype = dtype
        self.num_layers = int(geometry["num_layers"])
        self.kv_heads = int(geometry["kv_heads"])
        self.head_dim = int(geometry["head_dim"])
        self.vocab_size = int(geometry["vocab_size"])
        self.after_prefix = bool(geometry["positions_after_prefix"])
        self.prefix = prefix
        self.prefix_len = int(prefix[0][0].shape[2]) if prefix else 0
        limit = int(geometry["max_positions"]) - (self.prefix_len if self.after_prefix else 0)
        self.max_seq_len = int(min(max_seq_len or limit, limit))
        self._clear()

    def _clear(self) -> None:
        self.keys: list[paddle.Tensor] = []
        self.values: list[paddle.Tensor] = []
        self.valid: np.ndarray | None = None  # [b, C] bool
        self.keypos: np.ndarray | None = None  # [b, C] float32
        self.next_pos: np.ndarray | None = None  # [b]
        self.end_col: np.ndarray | None = None  # [b]: columns a row may still need (exclusive end)
        self.col = 0
        self.capacity = 0

    @property
    def rows(self) -> int:
        """Rows of the running batch (0 when none is running)."""
        return 0 if self.valid is None else len(self.valid)

    def _take(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _STATE}

    def _put(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def _zeros(self, batch: int, length: int) -> paddle.Tensor:
        return paddle.zeros([batch, self.kv_heads, length, self.head_dim], dtype=self.dtype)

    def _alloc(self, batch: int, capacity: int) -> None:
        self.keys = [self._zeros(batch, capacity) for _ in range(self.num_layers)]
        self.values = [self._zeros(batch, capacity) for _ in range(self.num_layers)]
        self.valid = np.zeros((batch, capacity), dtype=bool)
        self.keypos = np.zeros((batch, capacity), dtype=np.float32)
        self.capacity = capacity

    def _reserve(self, columns: int) -> None:
        """Make room for ``columns`` buffer columns (grown :data:`GROW` at a time, never past the last column
        a live row can still write)."""
        assert self.valid is not None and self.end_col is not None
        if columns <= self.capacity:
            return
        new = max(columns, min(int(self.end_col.max()), self.capacity + GROW))
        batch, extra = self.valid.shape[0], new - self.capacity
        pad = self._zeros(batch, extra)
        self.keys = [paddle.concat([t, pad], axis=2) for t in self.keys]
        self.values = [paddle.concat([t, pad], axis=2) for t in self.values]
        self.valid = np.concatenate([self.valid, np.zeros((batch, extra), dtype=bool)], axis=1)
        self.keypos = np.concatenate([self.keypos, np.zeros((batch, extra), dtype=np.float32)], axis=1)
        self.capacity = new

    def _write(self, new_k: Sequence[paddle.Tensor], new_v: Sequence[paddle.Tensor], width: int) -> None:
        start, stop = self.col, self.col + width
        for layer in range(self.num_layers):
            self.keys[layer][:, :, start:stop, :] = new_k[layer]
            self.values[layer][:, :, start:stop, :] = new_v[layer]
        self.col = stop

    def begin(self, input_ids: np.ndarray, mask: np.ndarray, max_new_tokens: int | np.ndarray) -> np.ndarray:
        """Allocate the buffers, prefill the prompts, return the last logits.

        ``max_new_tokens`` is one number for the batch or one per row (``[b]``); it bounds buffer growth."""
        batch, width = input_ids.shape
        prefix_len = self.prefix_len
        span = prefix_len + width
        new_tokens = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (batch,))
        self.end_col = span + np.maximum(new_tokens - 1, 0)
        self._alloc(batch, min(int(self.end_col.max()), span + GROW))
        assert self.valid is not None and self.keypos is not None
        positions = prompt_positions(mask) + (prefix_len if self.after_prefix else 0)
        self.next_pos = positions[:, -1] + 1
        ids = input_ids.astype(np.int64)
        self.keypos[:, :prefix_len] = np.arange(prefix_len, dtype=np.float32)
        self.keypos[:, prefix_len:span] = positions
        self.valid[:, :prefix_len] = True
        self.valid[:, prefix_len:span] = mask.astype(bool)
        past_k: list[paddle.Tensor] = []
        past_v: list[paddle.Tensor] = []
        for layer, (k, v) in enumerate(self.prefix or []):
            k, v = paddle.expand(k, [batch, -1, -1, -1]), paddle.expand(v, [batch, -1, -1, -1])
            self.keys[layer][:, :, :prefix_len, :] = k
            self.values[layer][:, :, :prefix_len, :] = v
            past_k.append(k)
            past_v.append(v)
        self.col = prefix_len
        causal = prompt_biases(mask)
        if self.inplace:
            bias = np.concatenate([np.zeros((batch, 1, width, prefix_len), np.float32), causal], axis=-1)
            logits = self.step_fn(
                ids, positions, bias, self.keypos[:, :span], self.keys, self.values, prefix_len, span
            )
            self.col = span
            return logits
        if not self.prefix:  # one masked dummy column keeps every shape non-empty
            past_k = past_v = [self._zeros(batch, 1)] * self.num_layers
            past_bias = np.full((batch, 1, 1, 1), NEG, dtype=np.float32)
            keypos = np.zeros((batch, 1), dtype=np.float32)
        else:
            past_bias = np.zeros((batch, 1, 1, prefix_len), dtype=np.float32)
            keypos = self.keypos[:, :prefix_len]
        logits, new_k, new_v = self.step_fn(ids, positions, causal, past_bias, keypos, past_k, past_v)
        self._write(new_k, new_v, width)
        return logits

    def join(self, input_ids: np.ndarray, mask: np.ndarray, max_new_tokens: int | np.ndarray) -> np.ndarray:
        """Prefill new rows (as :meth:`begin`) and append them to the running batch; return their logits.

        The new group's used columns and the running batch's are right-aligned and concatenated along the
        batch axis. If anything fails, the running batch is left as it was and the error propagates.
        """
        if self.rows == 0:
            return self.begin(input_ids, mask, max_new_tokens)
        running = self._take()
        try:
            self._clear()
            logits = self.begin(input_ids, mask, max_new_tokens)
            self._merge(running)
        except BaseException:
            self._put(running)
            raise
        return logits

    def _merge(self, old: dict[str, Any]) -> None:
        """Make one batch of the running batch ``old`` (rows first) and the current, just prefilled group."""
        new = self._take()
        prefix_len = self.prefix_len
        col = max(old["col"], new["col"])
        rows_a = len(old["valid"])
        rows = rows_a + len(new["valid"])
        end_col = np.concatenate([old["end_col"] + col - old["col"], new["end_col"] + col - new["col"]])
        capacity = max(col, min(int(end_col.max()), col + GROW))
        groups = ((slice(0, rows_a), old), (slice(rows_a, rows), new))

        def place(fresh: Any, parts: tuple[Any, Any]) -> Any:
            """Copy each group's prefix and used columns (right-aligned at ``col``) into ``fresh``."""
            for (where, state), part in zip(groups, parts):
                used, dest = slice(prefix_len, state["col"]), slice(prefix_len + col - state["col"], col)
                if isinstance(fresh, paddle.Tensor):
                    if prefix_len:
                        fresh[where, :, :prefix_len] = part[:, :, :prefix_len]
                    fresh[where, :, dest] = part[:, :, used]
                else:
                    fresh[where, :prefix_len] = part[:, :prefix_len]
                    fresh[where, dest] = part[:, used]
            return fresh

        self.keys = [place(self._zeros(rows, capacity), pair) for pair in zip(old["keys"], new["keys"])]
        self.values = [place(self._zeros(rows, capacity), pair) for pair in zip(old["values"], new["values"])]
        self.valid = place(np.zeros((rows, capacity), dtype=bool), (old["valid"], new["valid"]))
        self.keypos = place(np.zeros((rows, capacity), dtype=np.float32), (old["keypos"], new["keypos"]))
        self.next_pos = np.concatenate([old["next_pos"], new["next_pos"]])
        self.end_col, self.col, self.capacity = end_col, col, capacity

    def _trim(self) -> None:
        """Drop the leading columns (after the prefix) that no row uses any more."""
        assert self.valid is not None and self.keypos is not None and self.end_col is not None
        prefix_len = self.prefix_len
        used = self.valid[:, prefix_len : self.col].any(axis=0)
        dead = int(np.argmax(used)) if used.any() else 0
        if dead == 0:
            return
        start = prefix_len + dead

        def cut(t: paddle.Tensor) -> paddle.Tensor:
            if prefix_len:
                return paddle.concat([t[:, :, :prefix_len], t[:, :, start:]], axis=2)
            return t[:, :, start:].contiguous()

        self.keys = [cut(t) for t in self.keys]
        self.values = [cut(t) for t in self.values]
        self.valid = np.concatenate([self.valid[:, :prefix_len], self.valid[:, start:]], axis=1)
        self.keypos = np.concatenate([self.keypos[:, :prefix_len], self.keypos[:, start:]], axis=1)
        self.col -= dead
        self.capacity -= dead
        self.end_col = self.end_col - dead

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Decode one token per row against the whole buffer (free columns are masked)."""
        assert self.next_pos is not None
        batch, col = len(tokens), self.col
        self._reserve(col + 1)
        assert self.valid is not None and self.keypos is not None
        ids = tokens.reshape(batch, 1).astype(np.int64)
        positions = self.next_pos[:, None].copy()
        self.next_pos = self.next_pos + 1
        valid, keypos = self.valid, self.keypos
        if self.inplace:
            valid[:, col] = True
            keypos[:, col] = positions[:, 0]
            bias = np.where(valid, 0.0, NEG).astype(np.float32)[:, None, None, :]
            logits = self.step_fn(ids, positions, bias, keypos, self.keys, self.values, col, self.capacity)
            self.col = col + 1
            return logits
        past_bias = np.where(valid, 0.0, NEG).astype(np.float32)[:, None, None, :]
        new_bias = np.zeros((batch, 1, 1, 1), dtype=np.float32)
        logits, new_k, new_v = self.step_fn(
            ids, positions, new_bias, past_bias, keypos, self.keys, self.values
        )
        self._write(new_k, new_v, 1)
        valid[:, col] = True
        keypos[:, col] = positions[:, 0]
        return logits

    def select(self, rows: np.ndarray) -> None:
        """Keep ``rows`` (buffers are gathered into new, smaller ones), then drop columns no row uses."""
        assert self.valid is not None and self.keypos is not None
        assert self.next_pos is not None and self.end_col is not None
        rows = np.asarray(rows, dtype=np.int64)
        index = paddle.to_tensor(rows)
        self.keys = [paddle.index_select(t, index, axis=0) for t in self.keys]
        self.values = [paddle.index_select(t, index, axis=0) for t in self.values]
        self.valid = self.valid[rows]
        self.keypos = self.keypos[rows]
        self.next_pos = self.next_pos[rows]
        self.end_col = self.end_col[rows]
        if len(rows):
            self._trim()

    def end(self) -> None:
        """Free the buffers."""
        self._clear()


def kernel_step_fn(kernel: StepKernel) -> StepFn:
    """Adapt a dygraph :class:`StepKernel` to the runner's in-place step-function signature."""

    def run(ids, positions, bias, keypos, keys, values, col, span):
        caches = [t for pair in zip(keys, values) for t in pair]
        with paddle.no_grad():
            outs = kernel(
                paddle.to_tensor(ids),
                paddle.to_tensor(positions.astype(np.int64)),
                paddle.to_tensor(bias),
                None,
                paddle.to_tensor(np.ascontiguousarray(keypos, dtype=np.float32)),
                caches,
                inplace_col=int(col),
                span=int(span),
            )
        logits = outs[0]
        return (logits if logits.dtype == paddle.float32 else logits.astype("float32")).numpy()

    run.inplace = True  # type: ignore[attr-defined]
    return run
