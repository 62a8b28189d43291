"""Helpers shared by the per-family config translations."""

from __future__ import annotations

from typing import Any

from llm.errors import ModelError

_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


def refuse(family: str, why: str) -> None:
    """Raise the one-line conversion refusal."""
    raise ModelError(f"cannot convert this {family} checkpoint: {why}")


def _ids(src: Any) -> dict[str, Any]:
    """pad/bos/eos ids present in an HF dict or a paddle config."""
    values = {k: (src.get(k) if isinstance(src, dict) else getattr(src, k, None)) for k in _IDS}
    return {k: v for k, v in values.items() if v is not None}


def _g(cfg: Any, key: str, default: Any = None) -> Any:
    value = getattr(cfg, key, None)
    return default if value is None else value


def _expect(family: str, hf: dict[str, Any], key: str, allowed: tuple[Any, ...], why: str) -> None:
    if key in hf and hf[key] not in allowed:
        refuse(family, f"{key}={hf[key]!r} {why}")
