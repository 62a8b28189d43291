"""On-the-fly conversion for ``load_model``: a Hugging Face directory is converted once and cached.

The cache entry is ``<hf_dir>/.paddle_converted/<dtype>-<fingerprint>/`` (or, when ``<hf_dir>`` is not
writable, ``$LLM_CONVERT_CACHE`` / ``~/.cache/llm-toolkit/converted/<path-hash>-<dtype>-<fingerprint>/``).
The fingerprint covers ``config.json`` and the weight files' names, sizes and modification times, so an
edited checkpoint is converted again; older entries for the same dtype are removed afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

from llm.convert.checkpoint import detect_layout, fingerprint
from llm.convert.core import CONVERTER_VERSION, PROVENANCE_FILE, check_dtype, convert_hf_to_paddle
from llm.errors import ModelError

logger = logging.getLogger(__name__)
CACHE_DIR_NAME = ".paddle_converted"


def cache_root() -> str:
    """``$LLM_CONVERT_CACHE`` or ``~/.cache/llm-toolkit/converted``."""
    return os.environ.get("LLM_CONVERT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llm-toolkit", "converted"
    )


def _complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (PROVENANCE_FILE, "config.json"))


def cache_candidates(src: str, dtype: str) -> list[str]:
    """Where a conversion of ``src`` may live, preferred first."""
    key = f"{dtype}-{fingerprint(src, {'dtype': dtype, 'converter': CONVERTER_VERSION})}"
    where_hash = hashlib.sha256(os.path.abspath(src).encode()).hexdigest()[:12]
    out = [os.path.join(cache_root(), f"{where_hash}-{key}")]
    if os.access(src, os.W_OK):
        out.insert(0, os.path.join(src, CACHE_DIR_NAME, key))
    return out


def _drop_stale(entry: str, dtype: str) -> None:
    parent, name = os.path.split(entry)
    for other in os.listdir(parent):
        path = os.path.join(parent, other)
        if other != name and other.startswith(f"{dtype}-") and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _missing_parents(path: str) -> list[str]:
    """The ancestors of ``path`` that do not exist yet, deepest first (what a conversion would create)."""
    out = []
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        out.append(parent)
        parent = os.path.dirname(parent)
    return out


def _remove_empty(paths: list[str]) -> None:
    for path in paths:
        try:
            os.rmdir(path)  # only if empty: another process may have put its own entry there
        except OSError:
            pass


def ensure_paddle_dir(path: str, dtype: str = "float32", progress: bool = True) -> str:
    """``path`` itself for a paddlenlp directory; for a Hugging Face one, its cached conversion (made now if
    missing, written to a temp dir and renamed into place, so a half-written conversion is never used).

    A failed conversion leaves nothing behind: no cache entry and no (empty) cache directory it created.
    """
    if detect_layout(path) != "hf":
        return path
    dtype = check_dtype(dtype) or "float32"
    candidates = cache_candidates(path, dtype)
    for entry in candidates:
        if _complete(entry):
            return entry
    target = candidates[0]
    created = _missing_parents(target)
    logger.warning(
        "converting the Hugging Face checkpoint %s to paddle (%s), cached in %s", path, dtype, target
    )
    try:
        convert_hf_to_paddle(path, target, dtype=dtype, overwrite=False, progress=progress, cache=True)
    except ModelError:
        if _complete(target):  # another process finished the same conversion first
            return target
        _remove_empty(created)
        raise
    except BaseException:
        _remove_empty(created)
        raise
    if os.path.basename(os.path.dirname(target)) == CACHE_DIR_NAME:
        _drop_stale(target, dtype)
    return target
