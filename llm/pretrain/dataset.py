"""GPT-style pretraining datasets over mmap token files (spec §2.2), with a built-once index cache.

A split is a contiguous range of documents (``split="949,50,1"``). Its documents are shuffled per epoch, laid end
to end, and cut into samples of ``max_seq_length + 1`` tokens that overlap by one (the last token of a sample is
the first of the next), across document boundaries; the sample order is shuffled once more. Several datasets
(``input_dir="w1 prefix1 w2 prefix2"`` or a folder of several token files) are blended by weight, each sample
drawn from the dataset furthest below its share so far (Megatron's greedy blending).

The index arrays depend only on (token file, document range, sample count, length, seed): they are built by one
process (global rank 0 with ``share_folder``, else each node's local rank 0), written under temporary names and
renamed, then loaded memory-mapped by every rank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llm.data.mmap import MMapTokens, find_token_prefixes
from llm.errors import ConfigError, DataError
from llm.fileio import staged_file

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "validation", "test")
#: evaluation batches per evaluation and test batches (PaddleNLP's hard-coded ``eval_iters`` / ``test_iters``)
EVAL_ITERS, TEST_ITERS = 10, 100
_CACHE_VERSION = 1


def parse_split(split: str) -> list[float]:
    """``"949,50,1"`` (or ``"949/50/1"``) -> three fractions summing to 1."""
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(
            f"split {split!r} must be numbers like '949,50,1' (train,validation,test)"
        ) from None
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"split {split!r} must be 1 to 3 non-negative numbers like '949,50,1' with a positive sum"
        )
    values += [0.0] * (3 - len(values))
    total = sum(values)
    return [v / total for v in values]


def split_ranges(split: str, num_docs: int) -> list[tuple[int, int]]:
    """Document ranges [start, end) of the train / validation / test splits of ``num_docs`` documents."""
    fractions = parse_split(split)
    bounds = [0]
    for fraction in fractions:
        bounds.append(bounds[-1] + int(round(fraction * num_docs)))
    excess = bounds[-1] - num_docs
    bounds = [bounds[0]] + [max(0, b - excess) for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def parse_input_dir(input_dir: str) -> list[tuple[float, str]]:
    """(weight, prefix) pairs: ``"w1 p1 w2 p2"``, or every token file of a folder (weight 1.0 each)."""
    words = str(input_dir).split()
    if len(words) > 1:
        if len(words) % 2:
            raise ConfigError(
                f"input_dir {input_dir!r}: a weighted list needs pairs 'weight prefix weight prefix ...'"
            )
        pairs = []
        for weight, prefix in zip(words[::2], words[1::2]):
            try:
                value = float(weight)
            except ValueError:
                raise ConfigError(f"input_dir: weight {weight!r} before {prefix!r} is not a number") from None
            if value <= 0:
                raise ConfigError(f"input_dir: weight {weight} of {prefix!r} must be positive")
            pairs.append((value, prefix))
        return pairs
    if not os.path.isdir(input_dir):
        raise DataError(
            f"input_dir not found: {input_dir} (a folder of <prefix>.bin/.idx token files, or "
            "'w1 prefix1 w2 prefix2'); make them with python -m llm.tools.preprocess"
        )
    prefixes = find_token_prefixes(input_dir)
    if len(prefixes) > 1:
        logger.info("You are using multi-dataset: %s", ", ".join(os.path.basename(p) for p in prefixes))
    return [(1.0, p) for p in prefixes]


def _cache_dir(prefix: str, data_cache: str | None) -> str:
    """``<folder of the token files>/index-cache`` if it exists, else ``data_cache``, else that folder."""
    default = os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")
    if os.path.isdir(default) or not data_cache:
        return default
    return data_cache


def _save_arrays(path: str, arrays: dict[str, np.ndarray], desc: dict) -> None:
    """Write the index arrays then their description: a cache entry counts only once ``desc`` exists."""
    for name, array in arrays.items():
        with staged_file(f"{path}_{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
    with staged_file(f"{path}_desc.json") as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(desc, f, indent=1, sort_keys=True)


def _load_arrays(path: str, names: Sequence[str]) -> dict[str, np.ndarray] | None:
    if not os.path.isfile(f"{path}_desc.json"):
        return None
    return {name: np.load(f"{path}_{name}.npy", mmap_mode="r", allow_pickle=False) for name in names}


def cached_arrays(
    key: dict,
    cache_dir: str,
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
    builder: bool,
    barrier: Callable[[], None],
) -> dict[str, np.ndarray]:
    """The arrays cached under ``key``: built by the ``builder`` process (if absent), then loaded by all."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{key['kind']}_{digest}")
    if builder and _load_arrays(path, names) is None:
        os.makedirs(cache_dir, exist_ok=True)
        logger.info("building the %s index (%s) in %s", key["kind"], key.get("split", ""), cache_dir)
        _save_arrays(path, build(), key)
    barrier()
    arrays = _load_arrays(path, names)
    if arrays is None:
        raise DataError(
            f"{path}_desc.json not found after the index was built; with several nodes and no shared disk set "
            "--share_folder false, with a shared disk --share_folder true"
        )
    return arrays


def build_sample_index(
    sizes: np.ndarray, doc_range: tuple[int, int], num_samples: int, seq_length: int, seed: int
) -> dict[str, np.ndarray]:
    """Shuffled documents over enough epochs for ``num_samples`` windows of ``seq_length + 1`` tokens.

    Returns ``doc_idx`` (documents in reading order), ``sample_idx`` ([n + 1, 2]: position in ``doc_idx`` and
    token offset where each sample starts) and ``shuffle_idx`` (the sample order).
    """
    start, end = doc_range
    docs = np.arange(start, end, dtype=np.int64)
    tokens_per_epoch = int(np.asarray(sizes[start:end], dtype=np.int64).sum())
    if tokens_per_epoch <= seq_length:
        raise DataError(
            f"the documents {start}..{end} hold {tokens_per_epoch} tokens, not enough for one sample of "
            f"max_seq_length {seq_length} + 1; use more data, a smaller --max_seq_length or another --split"
        )
    epochs = max(1, math.ceil((num_samples * seq_length + 1) / tokens_per_epoch))
    rng = np.random.RandomState(seed)
    doc_idx = np.concatenate([rng.permutation(docs) for _ in range(epochs)])
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64)[doc_idx])
    total = (int(ends[-1]) - 1) // seq_length
    starts = np.arange(total + 1, dtype=np.int64) * seq_length
    position = np.searchsorted(ends, starts, side="right")  # first document ending after the start
    offsets = starts - np.concatenate([[0], ends])[position]
    sample_idx = np.stack([position, offsets], axis=1)
    shuffle_idx = rng.permutation(total).astype(np.int64)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


class GPTDataset:
    """Samples of ``seq_length + 1`` tokens of one split of one token file: ``{input_ids, labels}`` (shifted)."""

    def __init__(self, tokens: MMapTokens, index: dict[str, np.ndarray], seq_length: int, name: str) -> None:
        self.tokens, self.seq_length, self.name = tokens, seq_length, name
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            index["doc_idx"],
            index["sample_idx"],
            index["shuffle_idx"],
        )

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def window(self, idx: int) -> np.ndarray:
        """The ``seq_length + 1`` tokens of sample ``idx`` (after shuffling)."""
        i = int(self.shuffle_idx[idx])
        position, offset = (int(v) for v in self.sample_idx[i])
        need, parts = self.seq_length + 1, []
        while need > 0:
            doc = int(self.doc_idx[position])
            part = self.tokens.get(doc, offset=offset, length=min(need, int(self.tokens.sizes[doc]) - offset))
            parts.append(part)
            need -= len(part)
            position, offset = position + 1, 0
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        window = self.window(idx)
        return {"input_ids": window[:-1], "labels": window[1:]}


def blend_index(weights: Sequence[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset, sample-within-dataset) for each blended sample: the dataset furthest below its share first."""
    weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    counts = np.zeros(len(weights), dtype=np.int64)
    dataset_index = np.empty(num_samples, dtype=np.int64)
    sample_index = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        choice = int(np.argmax(weights * (i + 1) - counts))
        dataset_index[i], sample_index[i] = choice, counts[choice]
        counts[choice] += 1
    return dataset_index, sample_index


class BlendedDataset:
    """Several :class:`GPTDataset` mixed by weight (see :func:`blend_index`)."""

    def __init__(self, datasets: Sequence[GPTDataset], index: dict[str, np.ndarray], name: str) -> None:
        self.datasets, self.name = list(datasets), name
        self.dataset_index, self.sample_index = index["dataset_index"], index["sample_index"]

    def __len__(self) -> int:
        return len(self.dataset_index)

    def window(self, idx: int) -> np.ndarray:
        """The tokens of blended sample ``idx``."""
        return self.datasets[int(self.dataset_index[idx])].window(int(self.sample_index[idx]))

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        return self.datasets[int(self.dataset_index[idx])][int(self.sample_index[idx])]


@dataclass
class BuildOptions:
    """What the datasets are built from (see :func:`build_datasets`)."""

    input_dir: str
    split: str = "949,50,1"
    max_seq_length: int = 1024
    seed: int = 1234
    data_cache: str | None = None
    builder: bool = True
    barrier: Callable[[], None] = lambda: None


def build_datasets(
    options: BuildOptions, num_samples: Sequence[int]
) -> list[GPTDataset | BlendedDataset | None]:
    """Train / validation / test datasets with at least ``num_samples[i]`` samples (None for an empty split)."""
    pairs = parse_input_dir(options.input_dir)
    files = [(w, p, MMapTokens(p)) for w, p in pairs]
    weights = np.array([w for w, _p, _t in files]) / sum(w for w, _p, _t in files)
    out: list[GPTDataset | BlendedDataset | None] = []
    for split_id, name in enumerate(SPLIT_NAMES):
        wanted = int(num_samples[split_id])
        parts = []
        for weight, (_w, prefix, tokens) in zip(weights, files):
            doc_range = split_ranges(options.split, len(tokens))[split_id]
            if wanted <= 0 or doc_range[1] <= doc_range[0]:
                continue
            share = wanted if len(files) == 1 else math.ceil(wanted * weight * 1.005)
            key = {
                "kind": name,
                "version": _CACHE_VERSION,
                "prefix": os.path.abspath(prefix),
                "num_docs": len(tokens),
                "num_tokens": int(tokens.num_tokens),
                "split": options.split,
                "doc_range": list(doc_range),
                "num_samples": share,
                "seq_length": options.max_seq_length,
                "seed": options.seed,
            }
            index = cached_arrays(
                key,
                _cache_dir(prefix, options.data_cache),
                ("doc_idx", "sample_idx", "shuffle_idx"),
                lambda t=tokens, r=doc_range, n=share: build_sample_index(
                    t.sizes, r, n, options.max_seq_length, options.seed
                ),
                options.builder,
                options.barrier,
            )
            parts.append((weight, GPTDataset(tokens, index, options.max_seq_length, name)))
        if not parts:
            out.append(None)
        elif len(parts) == 1 and len(files) == 1:
            out.append(parts[0][1])
        else:
            key = {
                "kind": f"{name}_blend",
                "version": _CACHE_VERSION,
                "prefixes": [os.path.abspath(p) for _w, p, _t in files],
                "weights": [float(w) for w, _d in parts],
                "num_samples": wanted,
                "parts": [len(d) for _w, d in parts],
            }
            index = cached_arrays(
                key,
                _cache_dir(files[0][1], options.data_cache),
                ("dataset_index", "sample_index"),
                lambda p=parts, n=wanted: dict(
                    zip(("dataset_index", "sample_index"), blend_index([w for w, _d in p], n))
                ),
                options.builder,
                options.barrier,
            )
            out.append(BlendedDataset([d for _w, d in parts], index, name))
    return out


def target_sample_counts(
    micro_batch: int, eval_batch: int, data_world: int, max_steps: int, grad_acc: int, eval_steps: int
) -> list[int]:
    """PaddleNLP's target sizes: train = micro_bs x dp x max_steps x grad_acc; valid = eval_bs x dp x 10 x
    (max_steps // eval_steps + 1); test = eval_bs x dp x 100."""
    train = micro_batch * data_world * max_steps * grad_acc
    valid = eval_batch * data_world * EVAL_ITERS * (max_steps // max(eval_steps, 1) + 1)
    test = eval_batch * data_world * TEST_ITERS
    return [train, valid, test]
