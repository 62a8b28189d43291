"""Saving and loading quantized models: real low-bit tensors in ``model.safetensors`` + ``quantization_config``.

A quantized directory is a paddle model directory whose ``config.json`` holds the toolkit's
``quantization_config`` (:class:`~llm.quant.model.QuantizationConfig`) and whose ``model.safetensors`` holds,
for every quantized layer ``L``, ``L.qweight`` (int8 ``[N, K]`` or packed uint8 ``[N, K / 2]``) and
``L.scales`` (float32 ``[N, G]``), plus ``L.bias``, and for A8W8 ``L.act_scale`` / ``L.smooth`` / ``L.shift``;
every other tensor is stored as it is in the float model.

:func:`load_quantized` builds the model with its decoder linears deferred (no float weight is ever allocated
for them), puts :class:`QuantLinear` layers in their place and loads every tensor straight from the file.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import paddle
from safetensors import safe_open
from safetensors.numpy import save_file

from llm.errors import ModelError
from llm.fileio import read_json
from llm.quant.formats import WEIGHT_BITS
from llm.quant.layers import QuantLinear
from llm.quant.model import (
    QuantizationConfig,
    _DeferredLinear,
    deferred_linears,
    read_quantization_config,
    resolve_deferred,
)

WEIGHTS_NAME = "model.safetensors"


def _numpy(t: paddle.Tensor) -> np.ndarray:
    if t.dtype in (paddle.bfloat16, paddle.float16):
        t = t.astype("float32")
    return t.numpy()


def save_quantized(model: paddle.nn.Layer, directory: str) -> list[str]:
    """Write ``config.json`` (with ``quantization_config``) and ``model.safetensors`` of a quantized model into
    ``directory`` (the caller publishes it, see :mod:`llm.outputs`); returns the files written."""
    if read_quantization_config(model.config) is None:
        raise ModelError("save_quantized: the model carries no quantization_config (quantize it first)")
    os.makedirs(directory, exist_ok=True)
    state = {name: np.ascontiguousarray(_numpy(t)) for name, t in model.state_dict().items()}
    save_file(state, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "np"})
    model.config.save_pretrained(directory)
    return ["config.json", WEIGHTS_NAME]


def is_quantized_dir(path: str) -> QuantizationConfig | None:
    """The quantization config of a model directory, else None."""
    file = os.path.join(path, "config.json")
    return read_quantization_config(read_json(file, "config")) if os.path.isfile(file) else None


def load_quantized(path: str, dtype: str = "float32") -> paddle.nn.Layer:
    """Load a quantized model directory (see the module docstring) in eval mode."""
    from llm.model.families import family_of
    from llm.model.loading import apply_family_fixes
    from llm.outputs import require_complete

    require_complete(path)
    qconfig = is_quantized_dir(path)
    if qconfig is None:
        raise ModelError(f"{path}: not a quantized model (config.json has no toolkit quantization_config)")
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise ModelError(f"{path}: quantized model without {WEIGHTS_NAME}")
    spec = family_of(read_json(os.path.join(path, "config.json"), "config"))
    config = spec.config_class.from_pretrained(path)
    config.dtype = dtype
    bits = WEIGHT_BITS[qconfig.quant_type]
    with safe_open(weights, framework="np") as f:
        keys = set(f.keys())

        def make(name: str, layer: _DeferredLinear) -> QuantLinear:
            return QuantLinear(
                layer.in_features,
                layer.out_features,
                bits=bits,
                group_size=qconfig.group_size,
                has_bias=f"{name}.bias" in keys,
                act_quant=f"{name}.act_scale" in keys,
                smooth=f"{name}.smooth" in keys,
                shift=f"{name}.shift" in keys,
            )

        default = paddle.get_default_dtype()
        paddle.set_default_dtype(dtype if dtype != "bfloat16" else "float32")
        try:
            with deferred_linears():
                model = spec.model_class(config)
            resolve_deferred(model, make)
        finally:
            paddle.set_default_dtype(default)
        state = model.state_dict()
        missing = sorted(set(state) - keys)
        if missing:
            raise ModelError(
                f"{weights}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        for name, target in state.items():
            value = f.get_tensor(name)
            if list(value.shape) != list(target.shape):
                raise ModelError(
                    f"{weights}: {name} has shape {list(value.shape)}, the model needs {list(target.shape)}"
                )
            assign_array(target, value)
    model.eval()
    return apply_family_fixes(model, fresh_init=False)


def assign_array(target: paddle.Tensor, value: np.ndarray) -> None:
    """Copy ``value`` into ``target`` in its dtype (bfloat16 through float32)."""
    if target.dtype == paddle.bfloat16:
        target.set_value(paddle.to_tensor(value.astype(np.float32)).astype("bfloat16"))
    else:
        target.set_value(value.astype(_np_dtype(target)))


def _np_dtype(t: paddle.Tensor) -> Any:
    return {
        paddle.float32: np.float32,
        paddle.float16: np.float16,
        paddle.int8: np.int8,
        paddle.uint8: np.uint8,
    }.get(t.dtype, np.float32)
