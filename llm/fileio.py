"""File helpers shared by convert, merge, export, inference and the readers: JSON files and atomic output.

Everything that writes a model directory stages it with :func:`staged_dir` (a temporary sibling directory
that is renamed into place only when complete), and single files with :func:`staged_file`, so an interrupted
run never leaves a half-written output behind.

(Named ``fileio`` rather than ``io`` so that running a file of this package as a script can never shadow
the standard library's ``io``.)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llm.errors import ConfigError, ModelError, UserError


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


def new_tmp_dir(dst: str) -> str:
    """An empty temporary directory next to ``dst`` (same filesystem, so the final rename is atomic)."""
    tmp = _tmp_sibling(dst)
    os.makedirs(tmp)
    return tmp


def check_not_source(dst: str, *sources: str | None) -> None:
    """Refuse an output directory that is or contains one of the input directories (replacing it would
    delete the input)."""
    out = os.path.realpath(dst)
    for src in sources:
        if not src or not os.path.exists(src):
            continue
        inp = os.path.realpath(src)
        if out == inp or inp.startswith(out + os.sep):
            raise ConfigError(
                f"the output directory '{dst}' overlaps the input '{src}'; choose another output path"
            )


def check_output(dst: str, overwrite: bool) -> None:
    """Fail early when ``dst`` exists, is not empty and may not be replaced."""
    if not overwrite and os.path.lexists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise ModelError(f"output '{dst}' already exists and is not empty (pass --overwrite to replace it)")


def publish(tmp: str, dst: str, overwrite: bool) -> str:
    """Rename the finished ``tmp`` directory to ``dst`` (replacing an existing ``dst`` only with ``overwrite``)."""
    dst = os.path.abspath(dst)
    if os.path.isdir(dst) and not os.path.islink(dst) and not os.listdir(dst):
        os.rmdir(dst)
    if os.path.lexists(dst):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelError(
                f"output '{dst}' already exists and is not empty (pass --overwrite to replace it)"
            )
        old = f"{tmp}.old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.remove(old)
    else:
        os.rename(tmp, dst)
    return dst


@contextmanager
def staged_dir(dst: str, overwrite: bool = True) -> Iterator[str]:
    """Yield an empty temporary directory next to ``dst``; when the block completes it is renamed to ``dst``
    (:func:`publish`), and if anything fails it is deleted and ``dst`` is left untouched."""
    tmp = new_tmp_dir(dst)
    try:
        yield tmp
        publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
