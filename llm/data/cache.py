"""On-disk cache of tokenized features and ``load_split``.

Cache key: sha256 over a code version constant, the bytes of every data file, the tokenizer identity (hash
of its files' bytes and resolved special tokens), the chat template source text, and
``src_length``/``max_length``/``zero_padding``/``for_generation``. The unpacked features are stored as
``.npz`` (per key a flat int32 array plus int64 offsets, loaded with ``allow_pickle=False``); packing and
its masks are rebuilt from the lengths after loading. Files are written to a temp file and renamed
atomically, so concurrent ranks never see a partial cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import numpy as np

from llm.data.encode import encode_example, has_supervision
from llm.data.packing import pack_features
from llm.data.reader import find_split_files, read_examples
from llm.errors import DataError

logger = logging.getLogger(__name__)

CACHE_VERSION = "llm-data-v1"  # bump whenever encoding rules change
PROGRESS_MIN_EXAMPLES = 1000


def default_cache_dir() -> str:
    """``$LLM_CACHE_DIR`` or ``~/.cache/llm-toolkit/datasets``."""
    return os.environ.get("LLM_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm-toolkit", "datasets"
    )


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tokenizer_identity(tokenizer: Any) -> str:
    """The tokenizer's ``fingerprint()`` if it has one, else a description of its special tokens."""
    if hasattr(tokenizer, "fingerprint"):
        return str(tokenizer.fingerprint())
    desc = [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer)]
    desc += [getattr(tokenizer, n, None) for n in ("bos_token_id", "eos_token_id", "pad_token_id")]
    return json.dumps(desc, default=str)


def cache_key(files: list[str], tokenizer: Any, template: Any, **params: Any) -> str:
    """Hex sha256 identifying the tokenized features of ``files`` under these settings."""
    h = hashlib.sha256()
    parts = {
        "version": CACHE_VERSION,
        "data": [_file_digest(p) for p in files],
        "tokenizer": tokenizer_identity(tokenizer),
        "template": None if template is None else [template.kind, template.source_text],
        "params": params,
    }
    h.update(json.dumps(parts, sort_keys=True, default=str).encode())
    return h.hexdigest()


def save_features(path: str, features: list[dict[str, list[int]]]) -> None:
    """Write features as flat int32 arrays + offsets (no pickling), atomically."""
    keys = sorted(features[0]) if features else []
    arrays: dict[str, np.ndarray] = {"keys": np.array(keys, dtype=np.str_)}
    for key in keys:
        rows = [feat[key] for feat in features]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        arrays[f"{key}.data"], arrays[f"{key}.offsets"] = flat, offsets
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_features(path: str) -> list[dict[str, list[int]]] | None:
    """Features saved by :func:`save_features`, or None if the file is missing or unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = [str(k) for k in npz["keys"]]
            columns = {}
            for key in keys:
                flat, offsets = npz[f"{key}.data"].tolist(), npz[f"{key}.offsets"].tolist()
                columns[key] = [flat[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    except Exception as err:  # noqa: BLE001 - a corrupt cache is just a miss
        logger.warning("ignoring unreadable dataset cache %s (%s)", path, err)
        return None
    n = len(next(iter(columns.values()))) if columns else 0
    return [{key: columns[key][i] for key in keys} for i in range(n)]


def _tokenize(
    files: list[str], tokenizer: Any, template: Any, src_length: int, max_length: int, for_generation: bool
) -> list[dict[str, list[int]]]:
    examples = [ex for path in files for ex in read_examples(path)]
    from tqdm import tqdm

    features, dropped = [], 0
    bar = tqdm(examples, desc="tokenizing", unit="ex", disable=len(examples) < PROGRESS_MIN_EXAMPLES)
    for ex in bar:
        feat = encode_example(ex, tokenizer, template, src_length, max_length, for_generation)
        if not for_generation and not has_supervision(feat):
            dropped += 1
            continue
        features.append(feat)
    if dropped:
        logger.warning("dropped %d example(s) with no target tokens left after truncation", dropped)
    if not features:
        raise DataError(
            "no usable examples (every target was truncated away; check src_length/max_length)", files[0]
        )
    return features


def load_split(
    dataset_dir: str,
    split: str,
    tokenizer: Any,
    template: Any,
    *,
    src_length: int,
    max_length: int,
    zero_padding: bool,
    for_generation: bool = False,
    cache_dir: str | None = None,
    use_cache: bool = True,
) -> list[dict[str, Any]]:
    """Tokenized (and, with ``zero_padding``, packed) features of ``dataset_dir``'s ``split``.

    Training examples left without any target token are dropped (with a warning). Generation-eval
    features (``for_generation``) are never packed.
    """
    files = find_split_files(dataset_dir, split)
    if not files:
        raise DataError(f"no '{split}' data (expected {split}.json or {split}/*.json)", dataset_dir)
    features = None
    path = None
    if use_cache:
        params = dict(
            src_length=src_length,
            max_length=max_length,
            zero_padding=zero_padding,
            for_generation=for_generation,
        )
        key = cache_key(files, tokenizer, template, **params)
        path = os.path.join(cache_dir or default_cache_dir(), f"{split}-{key[:40]}.npz")
        features = load_features(path)
        if features is not None:
            logger.info("loaded %d cached %s features from %s", len(features), split, path)
    if features is None:
        features = _tokenize(files, tokenizer, template, src_length, max_length, for_generation)
        if path is not None:
            try:
                save_features(path, features)
            except OSError as err:
                logger.warning("could not write dataset cache %s (%s)", path, err)
    if zero_padding and not for_generation:
        logger.info("Creating Zero Padding Data Stream. This may take a few minutes.")
        features = pack_features(features, max_length)
    elif zero_padding:
        logger.warning("zero_padding is ignored for generation evaluation features")
    return features
