"""Dataset discovery (spec §3.6) and the SFT JSON-lines reader (spec §4.1)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Any

from llm.errors import DataError


@dataclass
class Example:
    """One SFT sample: ``src``/``tgt`` are equal-length lists of turns (a single turn is a 1-element list)."""

    src: list[str]
    tgt: list[str]
    context: dict[str, Any] | None
    path: str
    line: int


def find_split_files(dataset_dir: str, split: str) -> list[str]:
    """``dir/<split>.json`` if it exists, else the sorted ``dir/<split>/*.json`` files, else ``[]``."""
    single = os.path.join(dataset_dir, f"{split}.json")
    if os.path.isfile(single):
        return [single]
    sub = os.path.join(dataset_dir, split)
    if os.path.isdir(sub):
        return sorted(p for p in glob.glob(os.path.join(sub, "*.json")) if os.path.isfile(p))
    return []


def _turns(value: Any, field: str, path: str, line: int) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if not value:
            raise DataError(f"'{field}' is an empty list", path, line)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise DataError(f"'{field}'[{i}] must be a string, got {type(item).__name__}", path, line)
        return list(value)
    raise DataError(
        f"'{field}' must be a string or a list of strings, got {type(value).__name__}", path, line
    )


def parse_example(obj: Any, path: str, line: int, require_tgt: bool = True) -> Example:
    """Validate one decoded JSON line and normalise it to an :class:`Example`."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object with 'src' and 'tgt', got {type(obj).__name__}", path, line)
    if "src" not in obj:
        raise DataError("missing field 'src'", path, line)
    src = _turns(obj["src"], "src", path, line)
    if "tgt" in obj:
        tgt = _turns(obj["tgt"], "tgt", path, line)
    elif require_tgt:
        raise DataError("missing field 'tgt'", path, line)
    else:
        tgt = [""] * len(src)
    if len(src) != len(tgt):
        raise DataError(f"'src' has {len(src)} turns but 'tgt' has {len(tgt)}", path, line)
    context = obj.get("context")
    if context is not None and not isinstance(context, dict):
        raise DataError(f"'context' must be a JSON object, got {type(context).__name__}", path, line)
    return Example(src=src, tgt=tgt, context=context, path=path, line=line)


def read_examples(path: str, require_tgt: bool = True) -> list[Example]:
    """Read a JSON-lines SFT file; blank lines are skipped, anything malformed raises ``DataError``.

    ``require_tgt=False`` (prediction input) allows lines without ``tgt`` (treated as empty answers).
    """
    if not os.path.isfile(path):
        raise DataError("file not found", path)
    examples = []
    try:
        with open(path, "rb") as f:
            for lineno, raw_bytes in enumerate(f, start=1):
                try:
                    raw = raw_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"not UTF-8 text ({err.reason} at byte {err.start})", path, lineno
                    ) from None
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except ValueError as err:
                    raise DataError(f"invalid JSON ({err})", path, lineno) from None
                examples.append(parse_example(obj, path, lineno, require_tgt))
    except OSError as err:
        raise DataError(f"cannot read file ({err.strerror})", path) from None
    if not examples:
        raise DataError("no examples (the file is empty)", path)
    return examples
