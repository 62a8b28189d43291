"""Where every command writes: the one output-path policy and the completion marker.

Every writer of a model directory uses this module: ``export_model.py``, ``merge_lora_params.py``,
``merge_tp_params.py``, ``python -m llm.convert`` (and the Hugging Face conversion cache), and fine-tuning's
final save and checkpoints.

**Policy** (:func:`check_output_path`, run before any weights load): the output is not a file, is not one of
the inputs, does not lie inside an input and does not contain one; an existing non-empty output needs
``--overwrite``. Even then only files this toolkit wrote are replaced: files listed in the previous output's
marker are dropped, everything else in the directory (a user's notes, checkpoints, logs) is carried over.

**Staging** (:func:`staged_output`): work happens in an empty hidden sibling directory. When it is finished,
the completion marker is written into it and it is published (:func:`publish`): a new or empty output is a
rename; an existing one is swapped in one atomic exchange (``renameat2(RENAME_EXCHANGE)``; two renames where
the kernel lacks it) after the files to keep were hard-linked into the staged tree. A failure or a kill at any
moment leaves either the old or the new directory at the output path, whole, plus at worst a hidden staging
directory that the next write to the same path removes.

**Marker**: ``checkpoint_complete.json`` is written last into every finished output (final models and
``checkpoint-N`` alike) and lists each file with its size. In-place writers (the Trainer's checkpoints) first
write ``write_in_progress.json``; deletion (checkpoint rotation) writes it and removes the marker before any file
goes. :func:`require_complete` is what every reader calls: an in-progress directory, or a marked one whose
weight files are missing or have changed size, is refused with one line.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from llm.errors import ConfigError, ModelError
from llm.fileio import write_json

COMPLETE_MARKER = "checkpoint_complete.json"
IN_PROGRESS = "write_in_progress.json"
#: files that make a directory a model (a stale one left next to a new model could be loaded instead of it)
MODEL_FILE_SUFFIXES = (".safetensors", ".pdparams", ".index.json", ".pdmodel", ".pdiparams", ".bin")
_STAGE, _OLD = ".tmp-", ".old-"


# --------------------------------------------------------------------------------------------------
# the policy (no weights touched)
# --------------------------------------------------------------------------------------------------
def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_path(
    dst: str | None,
    *,
    inputs: Iterable[str | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
    what: str = "output path",
    allow_existing: bool = False,
) -> str:
    """Refuse an output path that would destroy data; returns its absolute path.

    ``inputs`` are the directories the command reads (model, adapter, dataset). ``allow_existing`` (fine-tuning's
    ``output_dir``, which normally holds checkpoints to resume) skips the non-empty check, but an output that
    holds model files this toolkit did not write is refused either way when they could be mixed with new ones.
    """
    if not dst:
        raise ConfigError(f"missing {what}")
    out = _real(dst)
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise ConfigError(f"{what} '{dst}' exists and is not a directory; choose another path")
    for src in inputs:
        if not src or not os.path.exists(os.path.expanduser(src)):
            continue
        inp = _real(src)
        if out == inp:
            raise ConfigError(f"{what} '{dst}' is the input '{src}'; writing there would destroy it")
        if _inside(out, inp):
            raise ConfigError(f"{what} '{dst}' lies inside the input '{src}'; choose a path outside it")
        if _inside(inp, out):
            raise ConfigError(f"{what} '{dst}' contains the input '{src}'; choose a path that does not")
    if not os.path.isdir(dst) or not _entries(dst):
        return out
    if not (overwrite or allow_existing):
        raise ConfigError(
            f"{what} '{dst}' already exists and is not empty; pass {flag} to replace the files this toolkit "
            "wrote there (other files are kept), or choose another path"
        )
    foreign = foreign_model_files(dst)
    if foreign:
        raise ConfigError(
            f"{what} '{dst}' holds model files this toolkit did not write ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}: no {COMPLETE_MARKER} lists them); they would be mixed "
            "with the new model, so move them away or choose another path"
        )
    return out


def _entries(path: str) -> list[str]:
    """The entries of ``path`` that are not this module's own staging leftovers."""
    return [n for n in os.listdir(path) if not _is_staging_name(n)]


def _is_staging_name(name: str) -> bool:
    return name.startswith(".") and (_STAGE in name or _OLD in name)


def read_marker(path: str) -> dict[str, Any] | None:
    """The completion marker of ``path`` (``None`` if absent or unreadable)."""
    try:
        with open(os.path.join(path, COMPLETE_MARKER), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def toolkit_files(path: str) -> set[str]:
    """Top-level names the marker of ``path`` says this toolkit wrote (empty without a marker)."""
    marker = read_marker(path) or {}
    return {name.split("/", 1)[0] for name in marker.get("files", {})} | {COMPLETE_MARKER, IN_PROGRESS}


def foreign_model_files(path: str) -> list[str]:
    """Model files at the top of ``path`` that no marker of this toolkit lists."""
    ours = toolkit_files(path)
    return sorted(
        n
        for n in _entries(path)
        if n.endswith(MODEL_FILE_SUFFIXES) and n not in ours and os.path.isfile(os.path.join(path, n))
    )


# --------------------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------------------
def _listing(path: str) -> dict[str, int]:
    files = {}
    for root, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not _is_staging_name(d)]
        for name in names:
            if name in (COMPLETE_MARKER, IN_PROGRESS) and root == path:
                continue
            full = os.path.join(root, name)
            files[os.path.relpath(full, path).replace(os.sep, "/")] = os.path.getsize(full)
    return dict(sorted(files.items()))


def mark_complete(path: str, writer: str, files: dict[str, int] | None = None, **extra: Any) -> None:
    """Write the completion marker (every file under ``path`` with its size, unless ``files`` is given) and
    remove an in-progress sentinel. The marker is written atomically and last."""
    record = {"writer": writer, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    record["files"] = _listing(path) if files is None else files
    write_json(os.path.join(path, COMPLETE_MARKER), record, sort_keys=True)
    _remove(os.path.join(path, IN_PROGRESS))


def mark_in_progress(path: str, writer: str) -> None:
    """Say that ``path`` is being written in place (readers refuse it) and drop a stale completion marker."""
    os.makedirs(path, exist_ok=True)
    write_json(os.path.join(path, IN_PROGRESS), {"writer": writer, "pid": os.getpid()})
    _remove(os.path.join(path, COMPLETE_MARKER))


def is_complete(path: str) -> bool:
    """True when ``path`` holds the completion marker and no in-progress sentinel."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER)) and not os.path.exists(
        os.path.join(path, IN_PROGRESS)
    )


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def require_complete(path: str) -> None:
    """Refuse a model directory whose write was interrupted (one :class:`ModelError` line).

    A directory without any marker was not written by this toolkit (a Hugging Face or PaddleNLP model) and is
    accepted; its files are checked by the loaders.
    """
    sentinel = os.path.join(path, IN_PROGRESS)
    if os.path.exists(sentinel):
        writer = "a write"
        try:
            with open(sentinel, encoding="utf-8") as f:
                writer = str(json.load(f).get("writer", writer))
        except (OSError, ValueError, AttributeError):
            pass
        raise ModelError(
            f"{path}: incomplete model directory ({writer} was interrupted before it finished); "
            "re-run the command that writes it, or use another checkpoint"
        )
    marker = read_marker(path)
    if marker is None:
        return
    for name, size in (marker.get("files") or {}).items():
        if not name.endswith(MODEL_FILE_SUFFIXES):
            continue  # configs and tokenizer files may be edited by hand; weights may not be cut short
        full = os.path.join(path, *name.split("/"))
        if not os.path.isfile(full):
            raise ModelError(f"{path}: incomplete model directory: '{name}' is missing")
        if isinstance(size, int) and os.path.getsize(full) != size:
            raise ModelError(
                f"{path}: incomplete or altered model directory: '{name}' has {os.path.getsize(full)} bytes, "
                f"{size} when it was written"
            )


def unfinished_training_hint(path: str) -> str:
    """For a fine-tuning ``output_dir`` without a final model: a hint naming its newest complete checkpoint."""
    if not os.path.isdir(path):
        return ""
    steps = sorted(
        (int(n.split("-", 1)[1]), n)
        for n in os.listdir(path)
        if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit() and is_complete(os.path.join(path, n))
    )
    if not steps:
        return ""
    return (
        f" (it holds training checkpoints but no final model: the run did not finish; resume it, or use "
        f"{os.path.join(path, steps[-1][1])})"
    )


def remove_output(path: str) -> None:
    """Delete a toolkit-written directory so that no reader can see it half-deleted: in-progress sentinel and
    marker removal first, then an atomic rename to a hidden name, then the files."""
    if not os.path.isdir(path):
        return
    mark_in_progress(path, "deletion")
    trash = _sibling(path, _OLD)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# staging and publishing
# --------------------------------------------------------------------------------------------------
def _sibling(dst: str, kind: str, key: str | None = None) -> str:
    dst = _real(dst)
    parent, base = os.path.split(dst.rstrip(os.sep))
    tag = key or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return os.path.join(parent, f".{base}{kind}{tag}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(dst: str) -> None:
    """Remove staging leftovers of killed writers next to ``dst`` (and restore ``dst`` if a kill fell between
    the two renames of the fallback swap)."""
    dst = _real(dst)
    parent, base = os.path.split(dst.rstrip(os.sep))
    if not os.path.isdir(parent):
        return
    for name in os.listdir(parent):
        for kind in (_STAGE, _OLD):
            prefix = f".{base}{kind}"
            if not name.startswith(prefix):
                continue
            pid = name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and _pid_alive(int(pid)) and int(pid) != os.getpid():
                continue
            path = os.path.join(parent, name)
            if (
                kind == _OLD
                and not os.path.lexists(dst)
                and not os.path.exists(os.path.join(path, IN_PROGRESS))
            ):
                os.rename(path, dst)
            else:
                shutil.rmtree(path, ignore_errors=True)


def staging_path(dst: str, key: str) -> str:
    """The name :func:`new_staging_dir` gives for ``key`` (what the other ranks of a distributed job write to)."""
    return _sibling(dst, _STAGE, key)


def new_staging_dir(dst: str, key: str | None = None) -> str:
    """An empty hidden directory next to ``dst`` (same filesystem, so publishing is a rename). A ``key`` gives a
    name every rank of a distributed job computes alike; an existing directory of that name is emptied."""
    sweep_stale(dst)
    tmp = _sibling(dst, _STAGE, key)
    if key is not None and os.path.lexists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _link_tree(src: str, dst: str) -> None:
    """Recreate ``src`` at ``dst`` with hard links (copies where the filesystem refuses links)."""
    if os.path.islink(src) or not os.path.isdir(src):
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
            return
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        return
    os.makedirs(dst)
    for name in os.listdir(src):
        _link_tree(os.path.join(src, name), os.path.join(dst, name))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def publish(tmp: str, dst: str, writer: str, **extra: Any) -> str:
    """Mark the finished staging directory ``tmp`` complete and put it at ``dst`` (see the module docstring).

    Entries of an existing ``dst`` that ``tmp`` does not hold and that its previous marker does not list are
    carried over; a stale model file of unknown origin is refused (it could be loaded instead of the new one).
    A symlinked ``dst`` is published at its target.
    """
    dst = _real(dst)
    if os.path.isdir(dst) and not os.path.islink(dst) and _entries(dst):
        ours, new = toolkit_files(dst), set(os.listdir(tmp))
        stale = [n for n in foreign_model_files(dst) if n not in new]
        if stale:
            raise ModelError(
                f"{dst}: holds model files this toolkit did not write ({', '.join(stale[:3])}); nothing was "
                "replaced. Move them away or choose another output path"
            )
        mark_complete(tmp, writer, **extra)
        for name in _entries(dst):
            if name not in new and name not in ours:
                _link_tree(os.path.join(dst, name), os.path.join(tmp, name))
        if _exchange(tmp, dst):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old content
        else:
            old = _sibling(dst, _OLD)
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        return dst
    mark_complete(tmp, writer, **extra)
    if os.path.isdir(dst) and not os.path.islink(dst):
        os.rmdir(dst)  # empty (or only staging leftovers, removed by sweep_stale before)
    os.rename(tmp, dst)
    return dst


@contextmanager
def staged_output(
    dst: str,
    *,
    writer: str,
    inputs: Iterable[str | None] = (),
    overwrite: bool = False,
    flag: str = "--overwrite",
    **extra: Any,
) -> Iterator[str]:
    """Yield an empty staging directory for ``dst``; when the block completes it is published (:func:`publish`)
    and if anything fails it is deleted and ``dst`` is untouched. The policy is checked again first."""
    check_output_path(dst, inputs=inputs, overwrite=overwrite, flag=flag)
    tmp = new_staging_dir(dst)
    try:
        yield tmp
        publish(tmp, dst, writer, **extra)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
