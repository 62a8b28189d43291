"""File helpers shared by convert, merge, export, inference and the readers: JSON files and atomic single files.

Single files are written with :func:`staged_file` (a temporary sibling renamed into place), so an interrupted
run never leaves a half-written file behind. Model directories follow the output-path policy of
:mod:`llm.outputs`.

(Named ``fileio`` rather than ``io`` so that running a file of this package as a script can never shadow
the standard library's ``io``.)
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llm.errors import ModelError, UserError


# --------------------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------------------
def load_json(path: str, what: str = "JSON", *, error: type[UserError] = ModelError) -> Any:
    """The parsed content of ``path``; ``error`` (a :class:`UserError` class) if missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except (OSError, ValueError) as err:
        raise error(f"{path}: cannot read {what} ({err})") from None


def read_json(
    path: str, what: str = "JSON", *, missing_ok: bool = False, error: type[UserError] = ModelError
) -> dict[str, Any]:
    """The JSON object in ``path`` (``{}`` for a missing file with ``missing_ok``), else ``error``."""
    if missing_ok and not os.path.isfile(path):
        return {}
    data = load_json(path, what, error=error)
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


def try_read_json(path: str) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object."""
    try:
        return read_json(path)
    except UserError:
        return {}


def write_json(path: str, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``data`` as JSON to ``path`` atomically (see :func:`staged_file`)."""
    with staged_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=indent, sort_keys=sort_keys)


# --------------------------------------------------------------------------------------------------
# atomic output
# --------------------------------------------------------------------------------------------------
def _tmp_sibling(path: str) -> str:
    """A fresh name next to ``path`` (same filesystem, so the final rename is atomic)."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def staged_file(path: str) -> Iterator[str]:
    """Yield a temporary path next to ``path`` to write; it replaces ``path`` when the block completes and
    is removed if anything fails."""
    tmp = _tmp_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
