"""The preallocated-cache runner shared by the dynamic fast path and the ``paddle.inference`` path.

Per batch it keeps one ``[b, kv_heads, C, head_dim]`` key and value buffer per layer; the prefix (if any)
fills the first ``P`` columns. The capacity ``C`` starts at the prompt plus :data:`GROW` columns and grows
by :data:`GROW` (one ``concat`` per buffer) up to ``prefix + longest prompt + max_new_tokens - 1``: every
step attends over the whole buffer (free columns masked), so a buffer sized for the last step from the
start would make early steps read up to twice the keys they need.
Each call's new key/value entries go into the buffers in place at the next free column (all rows share
the column because the batch is left padded): a *split* step function (the exported graph) returns them
and the runner writes them; an *in-place* one (the dygraph kernels) writes them itself and attends over
the buffer directly. Finished rows are dropped with :meth:`select`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import paddle

from llm.infer.decoders.base import NEG, StepKernel, prompt_biases
from llm.infer.decoders.generic import prompt_positions

Prefix = list[tuple[paddle.Tensor, paddle.Tensor]]
# split:    (input_ids, positions, new_bias, past_bias, past_keypos, past_k, past_v) -> (logits, k_new, v_new)
# in-place: (input_ids, positions, bias, keypos, keys, values, col, span) -> logits   (fn.inplace = True)
StepFn = Callable[..., object]
GROW = 32  # KV-buffer columns added at a time


class KernelRunner:
    """Drives a step function over preallocated per-layer KV buffers."""

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
        self.valid: np.ndarray | None = None
        self.keypos: np.ndarray | None = None
        self.next_pos: np.ndarray | None = None
        self.col = 0
        self.capacity = 0

    def _reserve(self, columns: int) -> None:
        """Make room for ``columns`` buffer columns (grown :data:`GROW` at a time, never past the batch's
        total)."""
        assert self.valid is not None
        total = self.valid.shape[1]
        if columns <= self.capacity:
            return
        new = min(total, max(columns, self.capacity + GROW))
        batch = self.valid.shape[0]
        if self.capacity == 0:
            self.keys = [self._zeros(batch, new) for _ in range(self.num_layers)]
            self.values = [self._zeros(batch, new) for _ in range(self.num_layers)]
        else:
            pad = self._zeros(batch, new - self.capacity)
            self.keys = [paddle.concat([t, pad], axis=2) for t in self.keys]
            self.values = [paddle.concat([t, pad], axis=2) for t in self.values]
        self.capacity = new

    def _zeros(self, batch: int, length: int) -> paddle.Tensor:
        return paddle.zeros([batch, self.kv_heads, length, self.head_dim], dtype=self.dtype)

    def _write(self, new_k: Sequence[paddle.Tensor], new_v: Sequence[paddle.Tensor], width: int) -> None:
        start, stop = self.col, self.col + width
        for layer in range(self.num_layers):
            self.keys[layer][:, :, start:stop, :] = new_k[layer]
            self.values[layer][:, :, start:stop, :] = new_v[layer]
        self.col = stop

    def begin(self, input_ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Allocate the buffers, prefill the prompts, return the last logits."""
        batch, width = input_ids.shape
        prefix_len = self.prefix_len
        total = prefix_len + width + max(int(max_new_tokens) - 1, 0)
        self.valid = np.zeros((batch, total), dtype=bool)
        self.keypos = np.zeros((batch, total), dtype=np.float32)
        self.capacity = 0
        self._reserve(prefix_len + width + GROW)
        positions = prompt_positions(mask) + (prefix_len if self.after_prefix else 0)
        self.next_pos = positions[:, -1] + 1
        ids = input_ids.astype(np.int64)
        span = prefix_len + width
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

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Decode one token per row against the whole buffer (free columns are masked)."""
        assert self.valid is not None and self.keypos is not None and self.next_pos is not None
        batch, col = len(tokens), self.col
        self._reserve(col + 1)
        ids = tokens.reshape(batch, 1).astype(np.int64)
        positions = self.next_pos[:, None].copy()
        self.next_pos = self.next_pos + 1
        valid, keypos = self.valid[:, : self.capacity], self.keypos[:, : self.capacity]
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
        """Keep ``rows`` (buffers are gathered into new, smaller ones)."""
        index = paddle.to_tensor(np.asarray(rows, dtype=np.int64))
        self.keys = [paddle.index_select(t, index, axis=0) for t in self.keys]
        self.values = [paddle.index_select(t, index, axis=0) for t in self.values]
        self.valid = self.valid[rows]
        self.keypos = self.keypos[rows]
        self.next_pos = self.next_pos[rows]

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
