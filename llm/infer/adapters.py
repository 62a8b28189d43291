"""LoRA / prefix adapters for inference: check them against the model, merge LoRA in memory.

paddlenlp's ``LoRAModel.from_pretrained`` silently skips weights whose names or shapes do not match the
model (``set_state_dict`` only warns), so an adapter trained on another base would "load" and produce
garbage. :func:`merge_lora` compares every saved weight with the model first and raises one
:class:`ModelError` naming the mismatch; then it merges ``W += A @ B * scaling`` with paddlenlp's own
layer code and swaps the plain ``LoRALinear`` layers back to ``nn.Linear``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import paddle

from llm.errors import ModelError
from llm.model import family_of, load_lora, load_prefix, prefix_geometry

LORA_WEIGHTS = "lora_model_state.pdparams"
LORA_INDEX = "lora_model_state.safetensors.index.json"


def _saved_shapes(path: str, weights: str, index: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of an adapter's saved weights (pdparams, or a safetensors index with shards)."""
    pd_file = os.path.join(path, weights)
    if os.path.isfile(pd_file):
        state = paddle.load(pd_file, return_numpy=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    index_file = os.path.join(path, index)
    with open(index_file, encoding="utf-8") as f:
        weight_map = json.load(f).get("weight_map", {})
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, shard), framework="np") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _base_hint(path: str, config_name: str) -> str:
    try:
        with open(os.path.join(path, config_name), encoding="utf-8") as f:
            base = json.load(f).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        base = None
    return f" (its {config_name} names base model '{base}')" if base else ""


def check_lora_matches(lora_model: Any, lora_path: str) -> None:
    """Raise :class:`ModelError` unless every saved LoRA weight exists in the model with the same shape."""
    model = lora_model.model
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" in k}
    saved = {k: v for k, v in _saved_shapes(lora_path, LORA_WEIGHTS, LORA_INDEX).items() if ".lora_" in k}
    family = family_of(model).name
    hint = _base_hint(lora_path, "lora_config.json")
    unknown = sorted(set(saved) - set(expected))
    if unknown:
        raise ModelError(
            f"{lora_path}: the LoRA adapter does not match this {family} model{hint}: {len(unknown)} of its "
            f"{len(saved)} weights do not exist in the model (e.g. '{unknown[0]}')"
        )
    wrong = [k for k in sorted(saved) if saved[k] != expected[k]]
    if wrong:
        k = wrong[0]
        raise ModelError(
            f"{lora_path}: the LoRA adapter does not match this {family} model{hint}: weight '{k}' has shape "
            f"{list(saved[k])} in the adapter but {list(expected[k])} in the model"
        )
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise ModelError(
            f"{lora_path}: the LoRA adapter does not match this {family} model{hint}: {len(missing)} LoRA "
            f"weights of the model are not in the adapter (e.g. '{missing[0]}')"
        )


def _swap_lora_linears(model: paddle.nn.Layer) -> int:
    """Replace merged plain ``LoRALinear`` layers by ``nn.Linear`` sharing the weights; return the count."""
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    swapped = 0
    for name, layer in list(model.named_sublayers()):
        if type(layer) is not LoRALinear or not layer.merged:
            continue
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            parent = getattr(parent, part)
        in_features, out_features = layer.weight.shape
        plain = paddle.nn.Linear(in_features, out_features, bias_attr=False if layer.bias is None else None)
        plain.weight = layer.weight
        if layer.bias is not None:
            plain.bias = layer.bias
        setattr(parent, leaf, plain)
        swapped += 1
    return swapped


def merge_lora(model: paddle.nn.Layer, lora_path: str) -> paddle.nn.Layer:
    """Load ``lora_path`` onto ``model``, check it matches, merge it and return the plain CausalLM."""
    lora_model = load_lora(model, lora_path)
    check_lora_matches(lora_model, lora_path)
    for layer in lora_model.model.sublayers():
        if hasattr(layer, "merge_weights") and hasattr(layer, "lora_A"):
            layer.merge_weights = True
    with paddle.no_grad():
        lora_model.eval()  # each LoRA layer's eval() merges W += A @ B * scaling
    base = lora_model.model
    _swap_lora_linears(base)
    base.eval()
    return base


def load_checked_prefix(model: paddle.nn.Layer, prefix_path: str) -> Any:
    """``load_prefix`` after checking the adapter's geometry (layers, heads, hidden size) against the model."""
    config_file = os.path.join(prefix_path, "prefix_config.json")
    if os.path.isfile(config_file):
        try:
            with open(config_file, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, ValueError) as err:
            raise ModelError(f"{config_file}: cannot read JSON ({err})") from None
        spec = family_of(model)
        wanted = prefix_geometry(spec.name, model.config)
        for key, value in wanted.items():
            if value is not None and saved.get(key) is not None and int(saved[key]) != int(value):
                raise ModelError(
                    f"{prefix_path}: the prefix adapter does not match this {spec.name} model"
                    f"{_base_hint(prefix_path, 'prefix_config.json')}: {key} is {saved[key]} in the adapter but "
                    f"{value} in the model"
                )
    prefix_model = load_prefix(model, prefix_path)
    prefix_model.eval()
    return prefix_model
