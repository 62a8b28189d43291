"""Loading a float model as a low-bit base for PEFT: each decoder linear quantized as its weight is read.

The model is built with its decoder linears deferred (:func:`llm.quant.model.deferred_linears`: no float weight is
allocated for them), :class:`~llm.lowbit.layers.LowBitLinear` shells take their place, and the checkpoint is read
tensor by tensor (safetensors, single or sharded): a linear's float weight exists only while it is quantized. The
other tensors (embeddings, norms, the LM head, a MoE router) load as they are. ``config.quantization_config``
records the algorithm the way PaddleNLP does (``weight_quantize_algo``, ``weight_blocksize``, ...), so an adapter
saved from this model names the base it was trained on (:mod:`llm.merge.lora` reads it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import paddle
from tqdm import tqdm

from llm.errors import ConfigError, ModelError
from llm.fileio import read_json
from llm.lowbit.layers import LOW_BIT_ALGOS, LowBitLinear
from llm.quant.model import _DeferredLinear, deferred_linears, quant_targets, resolve_deferred


@dataclass(frozen=True)
class LowBitSpec:
    """How the base is quantized: ``weight_quantize_algo`` and the nf4 / fp4 block settings."""

    algo: str
    blocksize: int = 64
    double_quant: bool = False
    double_blocksize: int = 256

    @classmethod
    def from_args(cls, model_args: object) -> LowBitSpec | None:
        """The spec of a ``ModelArgument`` (None without ``weight_quantize_algo``)."""
        algo = getattr(model_args, "weight_quantize_algo", None)
        if not algo:
            return None
        algo = str(algo).lower()
        if algo not in LOW_BIT_ALGOS:
            raise ConfigError(
                f"weight_quantize_algo {algo!r} is not supported; use one of {', '.join(LOW_BIT_ALGOS)}"
            )
        return cls(
            algo,
            int(getattr(model_args, "weight_blocksize", 64)),
            bool(getattr(model_args, "weight_double_quant", False)),
            int(getattr(model_args, "weight_double_quant_block_size", 256)),
        )

    def quantization_config(self) -> object:
        """paddlenlp's ``QuantizationConfig`` for this spec (saved in ``config.json``)."""
        from paddlenlp.quantization.quantization_config import QuantizationConfig

        return QuantizationConfig(
            weight_quantize_algo=self.algo,
            weight_blocksize=self.blocksize,
            weight_double_quant=self.double_quant,
            weight_double_quant_block_size=self.double_blocksize,
        )


def load_low_bit_model(path: str, spec: LowBitSpec, dtype: str = "float32") -> paddle.nn.Layer:
    """The float model in ``path`` (paddlenlp or Hugging Face layout) with every decoder linear a
    :class:`LowBitLinear` of ``spec``, quantized tensor by tensor while loading (see the module docstring)."""
    from llm.convert.cache import ensure_paddle_dir
    from llm.convert.checkpoint import open_checkpoint
    from llm.convert.tensors import to_float32
    from llm.model.families import family_of
    from llm.model.loading import apply_family_fixes
    from llm.outputs import require_complete
    from llm.quant.io import assign_array, is_quantized_dir

    if not path or not os.path.isdir(path):
        raise ModelError(f"model directory not found: '{path}'")
    require_complete(path)
    if is_quantized_dir(path) is not None:
        raise ConfigError(
            f"{path} is already quantized (post-training); weight_quantize_algo quantizes a float base as it "
            "loads: point model_name_or_path at the float model"
        )
    path = ensure_paddle_dir(path, dtype="float32")
    family = family_of(read_json(os.path.join(path, "config.json"), "config"))
    config = family.config_class.from_pretrained(path)
    config.dtype = dtype
    ckpt = open_checkpoint(path, paddle_layout=True)
    try:
        keys = set(ckpt.keys())

        def make(name: str, layer: _DeferredLinear) -> LowBitLinear:
            return LowBitLinear(
                layer.in_features,
                layer.out_features,
                spec.algo,
                has_bias=f"{name}.bias" in keys,
                blocksize=spec.blocksize,
                double_quant=spec.double_quant,
                double_blocksize=spec.double_blocksize,
            )

        default = paddle.get_default_dtype()
        paddle.set_default_dtype(dtype if dtype != "bfloat16" else "float32")
        try:
            with deferred_linears():
                model = family.model_class(config)
            if not quant_targets(model):
                raise ConfigError(
                    f"this {family.name} model has no linear layers inside decoder layers to quantize"
                )
            resolve_deferred(model, make)
        finally:
            paddle.set_default_dtype(default)
        low_bit = {name: layer for name, layer in model.named_sublayers() if isinstance(layer, LowBitLinear)}
        # the other tensors, each once: a tied one (e.g. an LM head sharing the embedding) is stored under one name
        tensors: dict[int, list[str]] = {}
        for key, target in model.state_dict().items():
            if key.rsplit(".", 1)[0] not in low_bit:
                tensors.setdefault(id(target), []).append(key)
        stored = {ident: next((k for k in names if k in keys), names[0]) for ident, names in tensors.items()}
        needed = [f"{name}.weight" for name in low_bit] + list(stored.values())
        missing = sorted(k for k in needed if k not in keys)
        if missing:
            raise ModelError(
                f"{path}: missing tensors {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        for name, layer in tqdm(low_bit.items(), desc=f"quantize base ({spec.algo})", leave=False):
            weight = to_float32(ckpt.get(f"{name}.weight"))
            if list(weight.shape) != [layer.in_features, layer.out_features]:
                raise ModelError(
                    f"{path}: {name}.weight has shape {list(weight.shape)}, the model needs "
                    f"{[layer.in_features, layer.out_features]}"
                )
            bias = to_float32(ckpt.get(f"{name}.bias")) if layer.bias is not None else None
            layer.quantize_from(weight, bias)
            del weight
        state = model.state_dict()
        for key in stored.values():
            target = state[key]
            value = to_float32(ckpt.get(key))  # the stored dtype widened; assign_array casts to the model's
            if list(value.shape) != list(target.shape):
                raise ModelError(
                    f"{path}: {key} has shape {list(value.shape)}, the model needs {list(target.shape)}"
                )
            assign_array(target, value)
    finally:
        ckpt.close()
    model.config.quantization_config = spec.quantization_config()
    return apply_family_fixes(model, fresh_init=False)
