"""Which layers of a model are quantized, swapping them for :class:`QuantLinear`, and ``quantization_config``.

Quantized: every ``nn.Linear`` inside the decoder layers (attention and MLP projections, MoE experts).
Kept in float: embeddings, norms, the LM head / output layer and a MoE router (small, and the most
sensitive to rounding).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import paddle
import paddle.nn as nn
from tqdm import tqdm

from llm.errors import ConfigError
from llm.quant.formats import WEIGHT_BITS, canonical_quant_type, check_group, rtn
from llm.quant.layers import QuantLinear

QUANT_METHOD = "llm-toolkit"
CONFIG_KEY = "llm_quantization"  # config.json key of the toolkit's QuantizationConfig
FORMAT = "nk-int8|nk-int4-packed-k"  # see llm.quant.formats
_IN_DECODER = re.compile(r"\.(layers|h)\.\d+\.")
_KEEP_FLOAT = re.compile(r"(^|\.)(lm_head|output_layer)$|block_sparse_moe\.gate$")


@dataclass
class QuantizationConfig:
    """The ``quantization_config`` written into ``config.json``."""

    quant_type: str  # weight_only_int8 | weight_only_int4 | a8w8
    algorithm: str = "rtn"  # rtn | gptq | ptq
    group_size: int = -1
    bits: int = 8
    modules: list[str] = field(default_factory=list)
    smooth: bool = False
    shift: bool = False
    shift_smooth_all_linears: bool = False
    quant_method: str = QUANT_METHOD
    format: str = FORMAT
    sym: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def read_quantization_config(config: Any) -> QuantizationConfig | None:
    """The toolkit's quantization config of a model config (object or ``config.json`` dict), else None."""
    raw = config.get(CONFIG_KEY) if isinstance(config, dict) else getattr(config, CONFIG_KEY, None)
    if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD:
        return None
    return QuantizationConfig.from_dict(raw)


def quant_targets(model: nn.Layer) -> list[str]:
    """Names of the ``nn.Linear`` (or already quantized) layers inside the decoder layers, in model order."""
    return [
        name
        for name, layer in model.named_sublayers()
        if isinstance(layer, nn.Linear | QuantLinear | _DeferredLinear)
        and _IN_DECODER.search(f".{name}.")
        and not _KEEP_FLOAT.search(name)
    ]


def decoder_layers(model: nn.Layer) -> list[tuple[str, nn.Layer]]:
    """``(name, layer)`` of the model's decoder layers (``...layers.N`` / ``...h.N``), in order."""
    pattern = re.compile(r"(^|\.)(layers|h)\.\d+$")
    return [(name, layer) for name, layer in model.named_sublayers() if pattern.search(name)]


def get_layer(model: nn.Layer, name: str) -> nn.Layer:
    layer = model
    for part in name.split("."):
        layer = getattr(layer, part) if not part.isdigit() else layer[int(part)]
    return layer


def set_layer(model: nn.Layer, name: str, new: nn.Layer) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = get_layer(model, parent_name) if parent_name else model
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def linear_weight(layer: nn.Layer) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """``([K, N] float weight, bias)`` of a float or quantized linear layer."""
    if isinstance(layer, QuantLinear):
        return layer.dequantized_weight(), layer.bias
    return layer.weight, layer.bias


def check_quantizable(model: nn.Layer, quant_type: str, group_size: int) -> list[str]:
    """The targets, after checking every one fits the format (before anything is changed)."""
    bits = WEIGHT_BITS[canonical_quant_type(quant_type)]
    names = quant_targets(model)
    if not names:
        raise ConfigError("this model has no linear layers inside decoder layers to quantize")
    for name in names:
        layer = get_layer(model, name)
        in_features = layer.in_features if isinstance(layer, QuantLinear) else layer.weight.shape[0]
        try:
            check_group(int(in_features), bits, group_size)
        except ConfigError as err:
            raise ConfigError(f"{name}: {err}") from None
    return names


def quantize_model(
    model: nn.Layer,
    quant_type: str,
    group_size: int = -1,
    *,
    quantizer: Callable[[str, nn.Layer, int, int], QuantLinear] | None = None,
    algorithm: str = "rtn",
    progress: bool = True,
) -> QuantizationConfig:
    """Replace every target linear by a :class:`QuantLinear` (``quantizer(name, layer, bits, group_size)``,
    default round-to-nearest), one layer at a time; returns the config to save with the model."""
    quant_type = canonical_quant_type(quant_type)
    bits = WEIGHT_BITS[quant_type]
    names = check_quantizable(model, quant_type, group_size)
    make = quantizer or _rtn_layer
    for name in tqdm(names, desc=f"quantize ({algorithm} {quant_type})", disable=not progress, leave=False):
        set_layer(model, name, make(name, get_layer(model, name), bits, group_size))
    config = QuantizationConfig(
        quant_type=quant_type, algorithm=algorithm, group_size=group_size, bits=bits, modules=names
    )
    set_model_config(model, config)
    return config


def _rtn_layer(name: str, layer: nn.Layer, bits: int, group_size: int) -> QuantLinear:
    weight, bias = linear_weight(layer)
    qw = rtn(weight.astype("float32").numpy(), bits, group_size)
    return QuantLinear.from_weight(qw, None if bias is None else bias.astype("float32").numpy())


def set_model_config(model: nn.Layer, config: QuantizationConfig) -> None:
    """Record ``config`` in the model config (saved into ``config.json``): PaddleNLP's ``quantization_config``
    fields (``quant_type``, ``shift``, ``smooth``, ``shift_smooth_all_linears``, as its PTQ writes them; its
    ``weight_quantize_algo`` stays unset so paddlenlp never re-quantizes at load) and the toolkit's whole
    config under ``llm_quantization``."""
    from paddlenlp.quantization.quantization_config import QuantizationConfig as PaddleNLPQuantConfig

    model.config.quantization_config = PaddleNLPQuantConfig(
        quant_type=config.quant_type,
        shift=config.shift,
        smooth=config.smooth,
        shift_smooth_all_linears=config.shift_smooth_all_linears,
        weight_quant_method="abs_max_channel_wise" if config.group_size == -1 else "groupwise",
    )
    setattr(model.config, CONFIG_KEY, config.to_dict())


# ------------------------------------------------------------------------------------------ building lazily
class _DeferredLinear(nn.Layer):
    """Stands in for ``nn.Linear`` while a quantized model is built: shapes only, no weight allocated."""

    weight = None  # weight initialisers skip it (``isinstance(layer.weight, paddle.Tensor)``)
    bias = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_attr: Any = None,
        bias_attr: Any = None,
        name: Any = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.has_bias = bias_attr is not False
        self.args = (in_features, out_features, weight_attr, bias_attr, name)


@contextmanager
def deferred_linears() -> Iterator[None]:
    """While active, ``paddle.nn.Linear(...)`` builds a :class:`_DeferredLinear` (resolve with
    :func:`resolve_deferred`) and paddlenlp models skip their random weight init."""
    original = paddle.nn.Linear
    # paddle.nn itself, and paddlenlp modules that bound the class at import (``linear_utils.Linear``)
    owners = [paddle.nn] + [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("paddlenlp.transformers") and getattr(m, "Linear", None) is original
    ]
    from paddlenlp.transformers.model_utils import PretrainedModel

    init_weights = PretrainedModel.init_weights
    PretrainedModel.init_weights = lambda self: None  # every tensor is loaded next: no random init
    for owner in owners:
        owner.Linear = _DeferredLinear
    try:
        yield
    finally:
        for owner in owners:
            owner.Linear = original
        PretrainedModel.init_weights = init_weights


def resolve_deferred(model: nn.Layer, make_quantized: Callable[[str, _DeferredLinear], QuantLinear]) -> None:
    """Swap each deferred linear for ``make_quantized(name, layer)`` (a quant target) or a real ``nn.Linear``."""
    targets = set(quant_targets(model))
    for name, layer in list(model.named_sublayers()):
        if isinstance(layer, _DeferredLinear):
            set_layer(model, name, make_quantized(name, layer) if name in targets else nn.Linear(*layer.args))
