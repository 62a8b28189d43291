"""Batch collation to numpy arrays (int64 ids, bool 4-D masks)."""

from __future__ import annotations

from typing import Any

import numpy as np

from llm.data.packing import block_causal_mask, segment_lengths

IGNORE_INDEX = -100


class DataCollator:
    """Pad a list of features into a batch dict of numpy arrays.

    Unpacked features -> ``input_ids``/``labels`` ``[b, L]`` int64 and a 2-D int64 ``attention_mask``
    (1 = token, 0 = padding). Packed features (they carry ``position_ids``) -> additionally
    ``position_ids`` ``[b, L]`` (padded with 0) and a bool ``attention_mask`` ``[b, 1, L, L]``; padding is
    False except on the diagonal of padding rows, so no softmax row is fully masked (those positions have
    label -100 and no real token attends to them). A packed feature without a mask gets one rebuilt from
    its ``position_ids``.

    Padding goes on ``tokenizer.padding_side`` (default right). ``padding="max_length"`` pads to at least
    ``max_length``; ``pad_to_multiple_of`` rounds the length up. Labels of generation-eval features
    (target ids, a different length than the prompt) are padded on their own.
    """

    def __init__(
        self,
        tokenizer: Any,
        pad_to_multiple_of: int | None = None,
        max_length: int | None = None,
        padding: str = "longest",
        label_pad_token_id: int = IGNORE_INDEX,
    ):
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if padding == "max_length" and not max_length:
            raise ValueError("padding='max_length' needs max_length")
        self.tokenizer = tokenizer
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length
        self.padding = padding
        self.label_pad_token_id = label_pad_token_id

    def _target_len(self, longest: int) -> int:
        n = longest
        if self.padding == "max_length" and self.max_length:
            n = max(n, self.max_length)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        return n

    def _pad(self, rows: list[Any], length: int, value: int, left: bool) -> np.ndarray:
        out = np.full((len(rows), length), value, dtype=np.int64)
        for i, row in enumerate(rows):
            row = np.asarray(row, dtype=np.int64).reshape(-1)
            if left:
                out[i, length - row.size :] = row
            else:
                out[i, : row.size] = row
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """Collate ``features`` (dicts with ``input_ids``, optional ``labels``/``position_ids``/mask)."""
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        lengths = [len(f["input_ids"]) for f in features]
        length = self._target_len(max(lengths))
        batch = {"input_ids": self._pad([f["input_ids"] for f in features], length, pad_id, left)}

        if "labels" in features[0]:
            labels = [f["labels"] for f in features]
            same = all(len(lab) == n for lab, n in zip(labels, lengths))
            label_len = length if same else self._target_len(max(len(lab) for lab in labels))
            batch["labels"] = self._pad(labels, label_len, self.label_pad_token_id, left)

        packed = any("position_ids" in f or np.ndim(f.get("attention_mask", [])) >= 2 for f in features)
        if not packed:
            mask = np.zeros((len(features), length), dtype=np.int64)
            for i, n in enumerate(lengths):
                if left:
                    mask[i, length - n :] = 1
                else:
                    mask[i, :n] = 1
            batch["attention_mask"] = mask
            return batch

        positions = [f.get("position_ids", list(range(n))) for f, n in zip(features, lengths)]
        batch["position_ids"] = self._pad(positions, length, 0, left)
        masks = np.zeros((len(features), 1, length, length), dtype=bool)
        for i, (feat, n) in enumerate(zip(features, lengths)):
            block = feat.get("attention_mask")
            if block is None:
                block = block_causal_mask(segment_lengths(positions[i]))
            block = np.asarray(block, dtype=bool).reshape(n, n)
            start = length - n if left else 0
            masks[i, 0, start : start + n, start : start + n] = block
            pad_rows = np.r_[0:start, start + n : length]
            masks[i, 0, pad_rows, pad_rows] = True
        batch["attention_mask"] = masks
        return batch
