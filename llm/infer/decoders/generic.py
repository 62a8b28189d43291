"""Generic runner: the paddlenlp model's own forward with its own ``past_key_values`` inside our decode loop.

Works for every family (and is the only dynamic path for chatglm and glm). The cache is the model's
(concatenated each step, not preallocated); positions come from the padding mask, so left-padded rows
see the same positions as when they run alone. For a prefix-tuned model the prefix key/values are the
initial cache and the mask gets ``P`` leading ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
from paddlenlp.peft import PrefixModelForCausalLM

from llm.model import family_of, unwrap_model


@dataclass(frozen=True)
class _Convention:
    cache_kwarg: str  # "past_key_values" or "cache"
    batch_axis: int  # batch axis of every cache tensor
    positions: bool  # pass explicit position_ids


_CONVENTIONS = {
    "llama": _Convention("past_key_values", 0, True),
    "mixtral": _Convention("past_key_values", 0, True),
    "qwen": _Convention("past_key_values", 0, True),
    "gpt": _Convention("past_key_values", 0, True),
    "chatglm_v2": _Convention("past_key_values", 1, True),
    "chatglm": _Convention("cache", 1, True),
    "glm": _Convention("cache", 0, True),
    "bloom": _Convention("cache", 0, False),  # alibi positions come from the mask
    "opt": _Convention("cache", 0, False),  # learned positions come from the mask
}


def max_positions(config: Any) -> int:
    """The model's position limit (``max_position_embeddings``/``max_sequence_length``/``seq_length``)."""
    for name in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return 2048


def prompt_positions(mask: np.ndarray) -> np.ndarray:
    """Left-padding-aware positions: ``cumsum(mask) - 1`` clipped at 0."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def map_cache(cache: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor of a nested cache (tuples, lists, namedtuples)."""
    if isinstance(cache, paddle.Tensor):
        return fn(cache)
    if isinstance(cache, tuple) and hasattr(cache, "_fields"):
        return type(cache)(*(map_cache(c, fn) for c in cache))
    if isinstance(cache, list | tuple):
        return type(cache)(map_cache(c, fn) for c in cache)
    return cache


class GenericRunner:
    """Runs ``model(...)`` with ``use_cache=True``; works for all nine families."""

    kind = "dynamic/generic"

    def __init__(self, model: paddle.nn.Layer, max_seq_len: int | None = None) -> None:
        self.prefix_model = model if isinstance(model, PrefixModelForCausalLM) else None
        self.model = unwrap_model(model)
        self.model.eval()
        self.spec = family_of(self.model)
        self.conv = _CONVENTIONS[self.spec.name]
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.prefix_len = int(self.prefix_model.prefix_config.num_prefix_tokens) if self.prefix_model else 0
        self.shift = self.prefix_len if self.spec.prefix_shifts_positions else 0
        limit = max_positions(config) - (self.prefix_len if self.spec.name in ("gpt", "opt") else 0)
        self.max_seq_len = int(min(max_seq_len or limit, limit))
        self._reset()

    def _reset(self) -> None:
        self.cache: Any = None
        self.mask: np.ndarray | None = None
        self.next_pos: np.ndarray | None = None

    def _forward(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cache = self.cache
        if self.spec.name == "glm" and cache is not None:
            cache = list(cache)  # GLM updates its memories in place and indexes them by assignment
        kwargs: dict[str, Any] = {
            "input_ids": paddle.to_tensor(ids),
            "attention_mask": paddle.to_tensor(self.mask),
            self.conv.cache_kwarg: cache,
            "use_cache": True,
            "return_dict": True,
        }
        if self.conv.positions:
            kwargs["position_ids"] = paddle.to_tensor(positions + self.shift)
        with paddle.no_grad():
            out = self.model(**kwargs)
        logits = out["logits"] if "logits" in out else out[0]
        self.cache = out["past_key_values"] if "past_key_values" in out else out[1]
        return logits[:, -1].astype("float32").numpy()

    def begin(self, input_ids: np.ndarray, mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Prefill the batch (the prefix, if any, is the initial cache)."""
        batch = input_ids.shape[0]
        self.mask = mask.astype(np.int64)
        self.cache = None
        if self.prefix_model is not None:
            with paddle.no_grad():
                self.cache = self.prefix_model._get_past_key_values(batch)
            self.mask = np.concatenate([np.ones((batch, self.prefix_len), np.int64), self.mask], axis=1)
        positions = prompt_positions(mask)
        self.next_pos = positions[:, -1] + 1
        return self._forward(input_ids, positions)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row."""
        assert self.mask is not None and self.next_pos is not None
        self.mask = np.concatenate([self.mask, np.ones((len(tokens), 1), np.int64)], axis=1)
        positions = self.next_pos[:, None].copy()
        self.next_pos = self.next_pos + 1
        return self._forward(tokens.reshape(-1, 1).astype(np.int64), positions)

    def select(self, rows: np.ndarray) -> None:
        """Keep ``rows`` of the batch in the cache, mask and positions."""
        index = paddle.to_tensor(np.asarray(rows, dtype=np.int64))
        axis = self.conv.batch_axis
        self.cache = map_cache(self.cache, lambda t: paddle.index_select(t, index, axis=axis))
        self.mask = self.mask[rows]
        self.next_pos = self.next_pos[rows]

    def end(self) -> None:
        """Drop the cache."""
        self._reset()
