"""Hugging Face <-> paddlenlp weight conversion (``python -m llm.convert``), see ``docs/weights.md``."""

from llm.convert.cache import ensure_paddle_dir
from llm.convert.checkpoint import detect_layout, open_checkpoint
from llm.convert.core import convert_hf_to_paddle, export_paddle_to_hf
from llm.convert.specs import SPECS, spec_for_hf, spec_for_paddle

__all__ = [
    "SPECS",
    "convert_hf_to_paddle",
    "detect_layout",
    "ensure_paddle_dir",
    "export_paddle_to_hf",
    "open_checkpoint",
    "spec_for_hf",
    "spec_for_paddle",
]
