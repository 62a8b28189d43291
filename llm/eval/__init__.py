"""Evaluation tools: perplexity of a text or of src/tgt data (``python -m llm.eval.ppl``).

The names are loaded lazily so ``python -m llm.eval.ppl`` does not import :mod:`llm.eval.ppl` twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PplResult", "data_perplexity", "perplexity", "score_features", "sliding_windows"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from llm.eval import ppl

        return getattr(ppl, name)
    raise AttributeError(f"module 'llm.eval' has no attribute {name!r}")
