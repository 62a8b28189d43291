"""Low-bit PEFT: LoRA and Prefix tuning on a base whose decoder linears are stored in 4 or 8 bits.

``weight_quantize_algo`` (``nf4``, ``fp4``, ``weight_only_int8``, ``weight_only_int4``) with ``weight_blocksize``,
``weight_double_quant`` and ``weight_double_quant_block_size`` (spec §3.1): :func:`load_low_bit_model` quantizes
the base as it loads (:mod:`llm.lowbit.loading`), :class:`LowBitLinear` keeps only the low-bit storage and
dequantizes per product, forward and backward (:mod:`llm.lowbit.layers`), :class:`LowBitLoRAModel` puts LoRA on it
(:mod:`llm.lowbit.lora`). Merging an adapter trained this way quantizes and dequantizes the float base the same way
(:func:`dequantized_like_training`, registered with :mod:`llm.merge.lora`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import paddle

from llm.lowbit.layers import LOW_BIT_ALGOS, LowBitLinear, LowBitLoRALinear
from llm.lowbit.loading import LowBitSpec, load_low_bit_model
from llm.lowbit.lora import LowBitLoRAModel, has_low_bit_layers

__all__ = [
    "LOW_BIT_ALGOS",
    "LowBitLinear",
    "LowBitLoRALinear",
    "LowBitLoRAModel",
    "LowBitSpec",
    "adapter_base_spec",
    "check_low_bit_training",
    "dequantized_like_training",
    "has_low_bit_layers",
    "load_low_bit_model",
    "write_base_quantization",
]

#: written next to a Prefix adapter trained on a low-bit base (a LoRA adapter's config.json already records it)
QUANTIZATION_FILE = "quantization_config.json"


def write_base_quantization(model: paddle.nn.Layer, directory: str) -> None:
    """Record the low-bit base of a saved adapter in ``directory`` unless its ``config.json`` does (no-op for a
    float base)."""
    if not has_low_bit_layers(model) or adapter_base_spec(directory) is not None:
        return
    config = getattr(model, "config", None) or model.model.config  # PrefixModel / LoRAModel wrap the model
    with open(os.path.join(directory, QUANTIZATION_FILE), "w", encoding="utf-8") as f:
        json.dump(config.quantization_config.to_dict(), f, indent=2)


def adapter_base_spec(directory: str) -> LowBitSpec | None:
    """The low-bit base an adapter in ``directory`` was trained on (its ``config.json``'s
    ``quantization_config``, or ``quantization_config.json``), or None for a float base."""
    for name, key in (("config.json", "quantization_config"), (QUANTIZATION_FILE, None)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            qconfig = data.get(key) if key else data
            if isinstance(qconfig, dict) and qconfig.get("weight_quantize_algo") in LOW_BIT_ALGOS:
                return LowBitSpec.from_args(_Args(qconfig))
    return None


def check_low_bit_training(model_args: Any) -> None:
    """Refuse, before any weight loads, what a low-bit base cannot train: full fine-tuning (the base has no float
    weights to update) and PiSSA (it needs the float base's SVD)."""
    from llm.errors import ConfigError

    algo = model_args.weight_quantize_algo
    if not (getattr(model_args, "lora", False) or getattr(model_args, "prefix_tuning", False)):
        raise ConfigError(
            f"weight_quantize_algo {algo!r} trains LoRA or Prefix adapters on a low-bit base: set lora or "
            "prefix_tuning (full fine-tuning updates the base weights, which must then stay float)"
        )
    if getattr(model_args, "lora", False) and getattr(model_args, "pissa", False):
        raise ConfigError(
            f"pissa needs the float base weights (their SVD); it cannot run with weight_quantize_algo {algo!r}"
        )


def dequantized_like_training(weight: paddle.Tensor, qconfig: dict[str, Any]) -> paddle.Tensor:
    """The float ``[K, N]`` weight a :class:`LowBitLinear` of ``qconfig`` (a saved ``quantization_config``)
    multiplies by when built from ``weight``: what training saw."""
    spec = LowBitSpec.from_args(_Args(qconfig))
    layer = LowBitLinear(
        int(weight.shape[0]),
        int(weight.shape[1]),
        spec.algo,
        blocksize=spec.blocksize,
        double_quant=spec.double_quant,
        double_blocksize=spec.double_blocksize,
    )
    layer.quantize_from(weight.astype("float32").numpy())
    return layer.dequantized_weight().astype(weight.dtype)


class _Args:
    """A saved ``quantization_config`` read like a ``ModelArgument``."""

    def __init__(self, qconfig: dict[str, Any]) -> None:
        self.__dict__.update(qconfig)
