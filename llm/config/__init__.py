"""Configuration: argument dataclasses, the JSON/CLI parser and pre-flight checks.

Exports are resolved lazily so that ``llm.config.parser`` (used by CLI-only scripts) can be
imported without pulling in paddlenlp's ``TrainingArguments``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelArgument": "arguments",
    "DataArgument": "arguments",
    "QuantArgument": "arguments",
    "GenerateArgument": "arguments",
    "FinetuneArguments": "arguments",
    "FINETUNE_ARGUMENT_TYPES": "arguments",
    "parse_arguments": "parser",
    "load_json_config": "parser",
    "format_help": "parser",
    "check_static": "checks",
    "check_runtime": "checks",
    "check_device_support": "checks",
    "read_model_type": "checks",
    "resolve_model_dir": "checks",
    "required_dataset_files": "checks",
    "ZERO_PADDING_MODEL_TYPES": "checks",
    "PREFIX_TUNING_MODEL_TYPES": "checks",
    "RANGES": "ranges",
    "UNCHECKED": "ranges",
    "check_ranges": "ranges",
    "WEIGHT_QUANTIZE_ALGOS": "checks",
    "QUANT_TYPES": "checks",
}

__all__ = sorted([*_EXPORTS, "parse_finetune_arguments"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_finetune_arguments(argv: list[str] | None = None) -> tuple:
    """Parse the fine-tuning script's arguments and run :func:`check_static`.

    Returns ``(gen_args, quant_args, model_args, data_args, training_args)``.
    """
    from .arguments import FINETUNE_ARGUMENT_TYPES
    from .checks import check_static
    from .parser import parse_arguments

    gen_args, quant_args, model_args, data_args, training_args = parse_arguments(
        FINETUNE_ARGUMENT_TYPES, argv
    )
    check_static(model_args, data_args, quant_args, training_args)
    return gen_args, quant_args, model_args, data_args, training_args
