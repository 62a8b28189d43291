"""Checkpoint discovery that never resumes from a half-written ``checkpoint-N`` directory."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil

COMPLETE_MARKER = "checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
logger = logging.getLogger(__name__)


def mark_complete(path: str, step: int) -> None:
    """Write the completion marker atomically (temp file + rename)."""
    tmp = os.path.join(path, COMPLETE_MARKER + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"global_step": step}, f)
    os.replace(tmp, os.path.join(path, COMPLETE_MARKER))


def clear_marker(path: str) -> None:
    """Remove a (stale) completion marker before ``path`` is written again."""
    try:
        os.remove(os.path.join(path, COMPLETE_MARKER))
    except FileNotFoundError:
        pass


def is_complete(path: str) -> bool:
    """True when ``path`` holds the completion marker."""
    return os.path.isfile(os.path.join(path, COMPLETE_MARKER))


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """All ``checkpoint-N`` sub-directories as (N, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_last_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint in ``output_dir``; incomplete ones are skipped with a warning."""
    for _step, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s)", path, COMPLETE_MARKER)
    return None


def rotate_checkpoints(
    output_dir: str, limit: int | None, current: str, keep: str | None = None
) -> list[str]:
    """Apply ``save_total_limit`` once ``current`` is marked complete; returns the deleted paths.

    Among the checkpoints up to ``current``'s step, the newest ``limit`` complete ones survive (``keep``, the
    best-model checkpoint, always does) and incomplete ones (interrupted saves) are deleted. Checkpoints of a
    later step, left by an earlier longer run, are not touched. ``limit`` None or <= 0 keeps everything.
    """
    if not limit or limit <= 0:
        return []
    found = list_checkpoints(output_dir)
    current_step = next((step for step, path in found if os.path.samefile(path, current)), None)
    if current_step is None:
        return []
    older = [(step, path) for step, path in found if step <= current_step]
    complete = [path for _step, path in older if is_complete(path)]
    survivors = set(complete[-limit:])
    if keep and os.path.isdir(keep):
        survivors |= {path for _step, path in older if os.path.samefile(path, keep)}
    deleted = []
    for _step, path in older:
        if path not in survivors:
            logger.info("deleting checkpoint %s (save_total_limit=%d)", path, limit)
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(path)
    return deleted
