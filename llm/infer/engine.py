"""The decode loop shared by every backend: batching, left padding, stop ids, greedy/sampling/beam search.

A *runner* owns the model and its KV cache for one batch at a time (see :class:`Runner`); the
:class:`Engine` turns prompts into left-padded batches, drives ``begin`` (batched prefill) and ``step``
(one token per row), chooses tokens (:mod:`llm.infer.sampling`), stops each row at any eos id, and drops
finished rows from the running batch. Runners: :mod:`llm.infer.decoders` (dynamic) and
:mod:`llm.infer.static` (``paddle.inference``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from llm.errors import ConfigError
from llm.infer.sampling import (
    GenerationConfig,
    TokenChooser,
    apply_repetition_penalty,
    log_softmax,
    seen_matrix,
    top_indices,
)

NEG_INF = -1e9


class Runner(Protocol):
    """One model + KV cache. Rows are left padded; ``mask`` is 1 for real tokens.

    A runner that can take new rows into a running batch (continuous batching, :mod:`llm.serve.scheduler`)
    also has ``join(input_ids, mask, max_new_tokens) -> logits`` (arguments as :meth:`begin`, per-row
    ``max_new_tokens`` allowed; the new rows are appended; on failure the running batch is unchanged), as
    :class:`~llm.infer.decoders.runner.KernelRunner` does.
    """

    vocab_size: int
    max_seq_len: int  # longest prompt + new tokens one row may reach
    kind: str  # short description for logs/benchmarks

    def begin(self, input_ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Prefill ``[b, s]`` prompts (room for ``max_new_tokens`` more); return last-position logits ``[b, V]``."""
        ...

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row (``[b]``) and return the next logits ``[b, V]``."""
        ...

    def select(self, rows: np.ndarray) -> None:
        """Keep only (and reorder to) ``rows`` of the running batch (cache included)."""
        ...

    def end(self) -> None:
        """Release the batch's cache."""
        ...


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` int64 ``[b, longest]`` with the prompts right-aligned."""
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), int(pad_token_id), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
    return ids, mask


class Engine:
    """``generate``/``stream`` over a :class:`Runner` (dynamic or static)."""

    def __init__(self, runner: Runner, *, max_batch_size: int = 8) -> None:
        if int(max_batch_size) < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.runner = runner
        self.max_batch_size = int(max_batch_size)

    @property
    def max_seq_len(self) -> int:
        """Longest prompt + new tokens the engine accepts."""
        return int(self.runner.max_seq_len)

    # ------------------------------------------------------------------------------------------
    def _check(self, prompts: list[list[int]], config: GenerationConfig) -> None:
        config.validate()
        vocab = self.runner.vocab_size
        for i, prompt in enumerate(prompts):
            if len(prompt) == 0:
                raise ConfigError(f"prompt {i} is empty; every prompt needs at least one token")
            if len(prompt) + int(config.max_new_tokens) > self.max_seq_len:
                raise ConfigError(
                    f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={config.max_new_tokens} that "
                    f"exceeds max_seq_len={self.max_seq_len}"
                )
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise ConfigError(f"prompt {i} has a token id outside [0, {vocab})")

    def generate(self, prompts: list[list[int]], config: GenerationConfig) -> list[list[int]]:
        """New tokens for every prompt (stop id excluded); prompts are batched by length internally."""
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts:
            return []
        self._check(prompts, config)
        if int(config.max_new_tokens) == 0:
            return [[] for _ in prompts]
        beams = int(config.num_beams) if config.decode_strategy == "beam_search" else 1
        per_batch = max(1, self.max_batch_size // beams)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        results: list[list[int]] = [[] for _ in prompts]
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            batch = [prompts[i] for i in chunk]
            if beams > 1:
                outs = self._beam_search(batch, config, beams)
            else:
                outs = [list(o) for o in _collect(self._decode(batch, config), len(batch))]
            for i, out in zip(chunk, outs):
                results[i] = out
        return results

    def stream(self, prompt: list[int], config: GenerationConfig) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are produced (beam search yields at the end)."""
        prompt = [int(t) for t in prompt]
        self._check([prompt], config)
        if int(config.max_new_tokens) == 0:
            return
        if config.decode_strategy == "beam_search" and int(config.num_beams) > 1:
            yield from self._beam_search([prompt], config, int(config.num_beams))[0]
            return
        for _, token in self._decode([prompt], config):
            yield token

    # ------------------------------------------------------------------------------------------
    def _decode(self, prompts: list[list[int]], config: GenerationConfig) -> Iterator[tuple[int, int]]:
        """Greedy/sampling loop yielding ``(prompt index, token)``; finished rows leave the batch."""
        runner = self.runner
        ids, mask = left_pad(prompts, config.pad_token_id)
        stop = config.stop_ids
        chooser = TokenChooser(config, len(prompts))
        seen = seen_matrix(prompts, runner.vocab_size) if config.repetition_penalty != 1.0 else None
        alive = np.arange(len(prompts))  # prompt index of every running row
        max_new = int(config.max_new_tokens)
        try:
            logits = runner.begin(ids, mask, max_new)
            for step in range(max_new):
                tokens = chooser(logits, seen)
                done = np.zeros(len(alive), dtype=bool)
                for row, token in enumerate(tokens.tolist()):
                    if token in stop:
                        done[row] = True
                    else:
                        yield int(alive[row]), token
                if step == max_new - 1 or done.all():
                    return
                if seen is not None:
                    seen[np.arange(len(tokens)), tokens] = True
                if done.any():
                    keep = np.flatnonzero(~done)
                    runner.select(keep)
                    chooser.select(keep)
                    alive, tokens = alive[keep], tokens[keep]
                    seen = seen[keep] if seen is not None else None
                logits = runner.step(tokens)
        finally:
            runner.end()

    def _beam_search(self, prompts: list[list[int]], config: GenerationConfig, beams: int) -> list[list[int]]:
        """paddlenlp-style beam search (2*beams candidates, GNMT length normalisation)."""
        runner = self.runner
        batch = len(prompts)
        expanded = [p for p in prompts for _ in range(beams)]
        ids, mask = left_pad(expanded, config.pad_token_id)
        stop = config.stop_ids
        seen = seen_matrix(expanded, runner.vocab_size) if config.repetition_penalty != 1.0 else None
        lp = float(config.length_penalty)
        max_new = int(config.max_new_tokens)
        scores = np.zeros((batch, beams), dtype=np.float32)
        scores[:, 1:] = NEG_INF
        scores = scores.reshape(-1)
        history: list[list[int]] = [[] for _ in expanded]
        hyps: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch

        def norm(total: float, length: int) -> float:
            return total / (((length + 5) / 6) ** lp)

        def add(b: int, tokens: list[int], total: float) -> None:
            hyps[b].append((norm(total, len(tokens)), tokens))
            hyps[b].sort(key=lambda h: -h[0])
            del hyps[b][beams:]

        try:
            logits = runner.begin(ids, mask, max_new)
            vocab = logits.shape[-1]
            for step in range(max_new):
                logp = log_softmax(logits)
                if seen is not None:
                    logp = apply_repetition_penalty(logp, seen, float(config.repetition_penalty))
                cand = (logp + scores[:, None]).reshape(batch, beams * vocab)
                top = top_indices(cand, 2 * beams + len(stop))
                next_scores = np.zeros(batch * beams, dtype=np.float32)
                next_tokens = np.full(batch * beams, int(config.pad_token_id), dtype=np.int64)
                next_rows = np.arange(batch * beams, dtype=np.int64)
                for b in range(batch):
                    if done[b]:
                        continue
                    filled = 0
                    for rank, flat in enumerate(top[b].tolist()):
                        beam, token = divmod(flat, vocab)
                        row = b * beams + beam
                        score = float(cand[b, flat])
                        if token in stop:
                            if rank < beams:
                                add(b, list(history[row]), score)
                        else:
                            slot = b * beams + filled
                            next_scores[slot], next_tokens[slot], next_rows[slot] = score, token, row
                            filled += 1
                        if filled == beams:
                            break
                    best = float(cand[b, top[b, 0]])
                    if len(hyps[b]) >= beams and hyps[b][-1][0] >= norm(best, step):
                        done[b] = True
                history = [history[r] + [int(t)] for r, t in zip(next_rows.tolist(), next_tokens.tolist())]
                scores = next_scores
                if all(done) or step == max_new - 1:
                    break
                if seen is not None:
                    seen = seen[next_rows]
                    seen[np.arange(len(next_tokens)), next_tokens] = True
                if not np.array_equal(next_rows, np.arange(len(next_rows))):
                    runner.select(next_rows)  # reorder the cache to the surviving beams
                logits = runner.step(next_tokens)
        finally:
            runner.end()
        for b in range(batch):
            if not done[b]:
                for beam in range(beams):
                    row = b * beams + beam
                    add(b, history[row], float(scores[row]))
        return [hyps[b][0][1] for b in range(batch)]


def _collect(events: Iterator[tuple[int, int]], n: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in range(n)]
    for index, token in events:
        out[index].append(token)
    return out


def create_engine(
    model: object,
    *,
    max_batch_size: int = 8,
    max_seq_len: int | None = None,
    dtype: str = "float32",
    backend: str = "auto",
    quant_lm_head: bool = False,
) -> Engine:
    """A dynamic-graph :class:`Engine` for a loaded CausalLM (LoRA merged) or a ``PrefixModel``.

    ``backend``: ``auto`` (the family's fast step kernel with a preallocated cache; models outside a
    kernel's configuration fall back to the generic path), ``fast`` (refuse such models) or ``generic``
    (the model's own forward and ``past_key_values``). ``max_seq_len`` caps prompt + new tokens (default:
    the model's position limit). ``dtype`` must be the model's dtype. On CPU: float32, or bfloat16 (weights
    stay bfloat16, each is widened to float32 where it is used, activations and KV cache are float32: paddle
    2.6 has no CPU bfloat16 matmul/norm/softmax kernels); float16 is refused (no CPU float16 kernels).
    ``quant_lm_head``: the fast kernel reads the LM head from an int8 per-channel copy (the generic path keeps
    the model's head).
    """
    from llm.infer.decoders import make_runner

    runner = make_runner(
        model, backend=backend, max_seq_len=max_seq_len, dtype=dtype, quant_lm_head=quant_lm_head
    )
    return Engine(runner, max_batch_size=max_batch_size)
