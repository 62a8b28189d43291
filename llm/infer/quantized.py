"""``--quant_type`` at load time: check a quantized directory, or round-to-nearest quantize a float model.

* A quantized directory (``config.json`` with the toolkit's ``llm_quantization``, written by :mod:`llm.quant`)
  loads as it is; a ``--quant_type`` naming another type (or an explicit ``--quant_group_size`` naming another
  grouping) is one :class:`ConfigError` before any weight is read.
* A float model with ``weight_only_int8`` / ``weight_only_int4`` is quantized right after it loads, per channel
  or per ``group_size`` (:func:`llm.quant.model.quantize_model`, round-to-nearest), with one log line.
* ``a8w8`` on a float model is refused: its activation scales need calibration data (PTQ).

:func:`check_request` runs before loading, :func:`apply_request` after; :func:`load_quantized_for_eval` does
both (the loader of ``python -m llm.eval.ppl --quant_type``).
"""

from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

from llm.errors import ConfigError
from llm.fileio import read_json
from llm.quant.formats import canonical_quant_type

logger = logging.getLogger(__name__)

A8W8_NEEDS_PTQ = (
    "a8w8 needs calibration: run finetune_generation.py with do_ptq, see llama/ptq_argument.json "
    "(the float model has no activation scales; --quant_type weight_only_int8 / weight_only_int4 quantize it "
    "at load)"
)


class QuantRequest(NamedTuple):
    """What :func:`apply_request` does after loading: ``rtn`` a float model into ``quant_type``, or nothing."""

    quant_type: str | None  # canonical name, None when no --quant_type was given
    group_size: int
    stored: Any  # the directory's llm.quant.model.QuantizationConfig, or None for a float model
    rtn: bool


def normalize_quant_type(quant_type: str | None) -> str | None:
    """``weight_only_int8`` / ``weight_only_int4`` / ``a8w8`` for any accepted spelling, None for unset
    (``None``, ``""``, ``"none"``)."""
    if quant_type is None or str(quant_type).strip().lower() in ("", "none"):
        return None
    return canonical_quant_type(quant_type)


def check_group_size(group_size: int) -> int:
    """-1 (per channel) or a positive even group size."""
    group_size = int(group_size)
    if group_size != -1 and (group_size <= 0 or group_size % 2):
        raise ConfigError(
            f"quant_group_size must be -1 (per channel) or a positive even number such as 64 or 128, got {group_size}"
        )
    return group_size


def check_request(
    config: dict[str, Any], quant_type: str | None, group_size: int = -1, where: str = "the model"
) -> QuantRequest:
    """Check ``--quant_type`` / ``--quant_group_size`` against a model's ``config.json`` (before loading)."""
    from llm.quant.model import read_quantization_config

    requested = normalize_quant_type(quant_type)
    group_size = check_group_size(group_size)
    stored = read_quantization_config(config)
    if stored is not None:
        if requested is not None and requested != stored.quant_type:
            raise ConfigError(
                f"{where} is already quantized as {stored.quant_type} ({stored.algorithm}, group_size "
                f"{stored.group_size}), not {requested}: pass --quant_type {stored.quant_type} or leave it unset"
            )
        if group_size != -1 and group_size != stored.group_size:
            raise ConfigError(
                f"{where} is quantized with group_size {stored.group_size}, not {group_size}: drop "
                "--quant_group_size (a quantized model cannot be regrouped)"
            )
        return QuantRequest(stored.quant_type, stored.group_size, stored, rtn=False)
    if requested is None:
        if group_size != -1:
            raise ConfigError("--quant_group_size needs --quant_type weight_only_int8 or weight_only_int4")
        return QuantRequest(None, -1, None, rtn=False)
    if requested == "a8w8":
        raise ConfigError(A8W8_NEEDS_PTQ)
    return QuantRequest(requested, group_size, None, rtn=True)


def check_request_dir(path: str, quant_type: str | None, group_size: int = -1) -> QuantRequest:
    """:func:`check_request` for a model directory's ``config.json``."""
    config = read_json(os.path.join(path, "config.json"), "config.json")
    return check_request(config, quant_type, group_size, where=path)


def apply_request(model: Any, request: QuantRequest) -> Any:
    """Round-to-nearest quantize ``model`` in place when ``request.rtn`` (a float model + weight-only type)."""
    if not request.rtn:
        return model
    from llm.quant.model import quantize_model

    what = "per channel" if request.group_size == -1 else f"groups of {request.group_size}"
    config = quantize_model(model, request.quant_type, request.group_size, progress=False)
    logger.warning(
        "quantized %d linear layers to %s at load (round-to-nearest, %s); save a quantized model with "
        "finetune_generation.py do_ptq / do_gptq to load it without this step",
        len(config.modules),
        request.quant_type,
        what,
    )
    return model


def load_quantized_for_eval(
    model_dir: str, quant_type: str | None, dtype: str = "float32", group_size: int = -1
) -> Any:
    """Load ``model_dir`` in eval mode for ``quant_type``: a quantized directory as it is (its type must match),
    a float one round-to-nearest quantized (weight-only types; ``a8w8`` is refused). Errors are
    :class:`ConfigError` / :class:`ModelError`, raised before any weight loads where possible."""
    from llm.model import load_model

    request = check_request_dir(model_dir, quant_type, group_size)
    model = load_model(model_dir, dtype=dtype)
    model.eval()
    return apply_request(model, request)
