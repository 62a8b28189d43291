"""Merge a LoRA adapter into its base model: in memory (predictor, exporter) or into a verified checkpoint.

``W' = T(W) + A @ B * scaling`` for every LoRA-wrapped linear layer, where ``scaling`` is ``alpha / r``
(plain LoRA), ``alpha / sqrt(r)`` (rsLoRA) or 1 (PiSSA, whose base is first replaced by its SVD residual,
exactly as paddlenlp does at the start of training) and ``T`` is the **base transform** registered for the
base's ``weight_quantize_algo``: identity for a float base; a QLoRA / weight-only base must be
quantized-dequantized the way training saw it (see :func:`register_base_transform`).

Both paths share every step: :func:`read_adapter` (config, weights, base transform), :func:`attach_adapter`
(wrap, check every saved weight against the model with :func:`check_adapter`, transform the base, load the
weights) and :func:`merge_layers`. paddlenlp's ``LoRAModel.from_pretrained`` would instead skip weights whose
names or shapes do not match (``set_state_dict`` only warns), so an adapter trained on another base would
"load" and produce garbage; here that raises one :class:`~llm.errors.ModelError` naming the mismatch.

:func:`merge_lora` merges in memory and swaps the merged ``LoRALinear`` layers back to ``nn.Linear``.
:func:`merge_lora_checkpoint` writes a model directory; three checks must pass before its temporary output
directory is renamed into place: the merged model (reloaded from disk) gives the unmerged LoRA model's logits
on a probe input, no ``lora`` keys remain, and at least one weight changed.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle

from llm.convert.checkpoint import open_checkpoint
from llm.convert.core import copy_tokenizer_files
from llm.convert.tensors import Pending, from_numpy, to_float32, write_state
from llm.errors import ConfigError, ModelError
from llm.fileio import read_json, write_json
from llm.outputs import check_output_path, staged_output

LORA_CONFIG = "lora_config.json"
LORA_PDPARAMS = "lora_model_state.pdparams"
LORA_SAFETENSORS = "lora_model_state.safetensors"
#: (index, single file) pairs of a saved adapter, preferred first (see ``open_checkpoint``)
LORA_LAYOUTS = (
    (f"{LORA_SAFETENSORS}.index.json", LORA_SAFETENSORS),
    (f"{LORA_PDPARAMS}.index.json", LORA_PDPARAMS),
)

BaseTransform = Callable[[paddle.Tensor, dict[str, Any]], paddle.Tensor]
BASE_TRANSFORMS: dict[str | None, BaseTransform] = {None: lambda weight, qconfig: weight}


def register_base_transform(algo: str, fn: BaseTransform) -> None:
    """Register ``fn(weight, quantization_config) -> weight`` for bases trained with ``weight_quantize_algo=algo``.

    ``fn`` must return the float weight the quantized training forward saw (quantize, then dequantize).
    """
    BASE_TRANSFORMS[algo] = fn


def base_transform_for(algo: str | None) -> BaseTransform:
    """The registered transform for ``algo`` (``None`` = float base); unknown algorithms raise ModelError."""
    if algo not in BASE_TRANSFORMS:
        from llm.lowbit import LOW_BIT_ALGOS, dequantized_like_training

        if algo in LOW_BIT_ALGOS:  # bases trained with weight_quantize_algo (llm.lowbit)
            register_base_transform(algo, dequantized_like_training)
    if algo in BASE_TRANSFORMS:
        return BASE_TRANSFORMS[algo]
    raise ModelError(
        f"merging over a '{algo}' quantized base is not supported yet: the base must be quantized and "
        f"dequantized the way training saw it, and no transform is registered for '{algo}' "
        f"(known: {', '.join(str(k) for k in BASE_TRANSFORMS)})"
    )


@dataclass
class MergeReport:
    """What :func:`merge_lora_checkpoint` did and measured."""

    output_path: str
    base_model: str
    merged_layers: int
    changed_weights: int
    max_abs_diff: float
    tolerance: float


@dataclass
class Adapter:
    """A saved LoRA adapter, read and ready to attach: see :func:`read_adapter`."""

    path: str
    config: Any  # paddlenlp LoRAConfig
    state: dict[str, np.ndarray]
    transform: BaseTransform
    qconfig: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# reading and checking the adapter
# --------------------------------------------------------------------------------------------------
def read_lora_state(lora_path: str) -> dict[str, np.ndarray]:
    """The adapter's weights (half precision as float32): ``lora_model_state.safetensors`` (preferred, single
    or sharded with an index) or ``.pdparams`` (a pickle)."""
    if not any(os.path.isfile(os.path.join(lora_path, f)) for pair in LORA_LAYOUTS for f in pair):
        tp = sorted(f for f in os.listdir(lora_path) if f.startswith("lora_model_state.tp"))
        hint = f" (found tensor-parallel shards such as {tp[0]}: merge them first)" if tp else ""
        raise ModelError(f"{lora_path}: no {LORA_PDPARAMS} or {LORA_SAFETENSORS}{hint}")
    ckpt = open_checkpoint(lora_path, paddle_layout=True, layouts=LORA_LAYOUTS)
    try:
        return {k: to_float32(ckpt.get(k)) for k in ckpt.keys()}
    finally:
        ckpt.close()


def _quant_config(source: str | Any) -> dict[str, Any]:
    """``quantization_config`` of a ``config.json`` path (``{}`` if absent) or of a loaded model config."""
    if isinstance(source, str):
        return (read_json(source).get("quantization_config") or {}) if os.path.isfile(source) else {}
    qconfig = getattr(source, "quantization_config", None)
    return qconfig.to_dict() if hasattr(qconfig, "to_dict") else dict(qconfig or {})


def _quant_algo(*sources: str | Any) -> tuple[str | None, dict[str, Any]]:
    for source in sources:
        qconfig = _quant_config(source)
        algo = qconfig.get("weight_quantize_algo")
        if algo:
            return str(algo), qconfig
    return None, {}


def read_adapter(lora_path: str, base_config: str | Any) -> Adapter:
    """Read the adapter in ``lora_path``: its ``LoRAConfig``, weights, and the base transform for the
    ``weight_quantize_algo`` named by the adapter's ``config.json`` or else by ``base_config`` (the base's
    ``config.json`` path, or the loaded model's config). Raises before any model is touched."""
    from paddlenlp.peft import LoRAConfig

    if not lora_path or not os.path.isdir(lora_path):
        raise ModelError(f"LoRA directory not found: '{lora_path}'")
    if not os.path.isfile(os.path.join(lora_path, LORA_CONFIG)):
        raise ModelError(f"LoRA directory '{lora_path}' has no {LORA_CONFIG}")
    config = LoRAConfig.from_pretrained(lora_path)
    state = read_lora_state(lora_path)
    algo, qconfig = _quant_algo(os.path.join(lora_path, "config.json"), base_config)
    return Adapter(lora_path, config, state, base_transform_for(algo), qconfig)


def check_adapter(model: paddle.nn.Layer, lora_state: dict[str, np.ndarray], lora_path: str) -> None:
    """Every saved weight must exist in the LoRA-wrapped ``model`` with the same shape, and every LoRA weight
    of the model must be saved; otherwise raise one :class:`ModelError` naming the first offender."""
    from llm.model import family_of
    from llm.model.peft import adapter_base_hint

    model_state = model.state_dict()
    what = (
        f"{lora_path}: the LoRA adapter does not match this {family_of(model).name} model"
        f"{adapter_base_hint(lora_path, LORA_CONFIG)}"
    )
    unknown = [k for k in lora_state if k not in model_state]
    if unknown:
        raise ModelError(
            f"{what}: {len(unknown)} of its {len(lora_state)} weights do not exist in the model "
            f"(e.g. '{unknown[0]}')"
        )
    for key, value in lora_state.items():
        want = list(model_state[key].shape)
        if list(value.shape) != want:
            raise ModelError(
                f"{what}: weight '{key}' has shape {list(value.shape)} in the adapter but {want} in the model"
            )
    missing = [k for k in model_state if ".lora_" in k and k not in lora_state]
    if missing:
        raise ModelError(
            f"{what}: {len(missing)} LoRA weights of the model are not in the adapter (e.g. '{missing[0]}')"
        )


def _lora_layers(model: paddle.nn.Layer) -> list[tuple[str, Any]]:
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    layers = []
    for name, layer in model.named_sublayers():
        if hasattr(layer, "lora_A") and hasattr(layer, "lora_B"):
            if type(layer) is not LoRALinear:
                raise ModelError(f"cannot merge LoRA layer '{name}' of type {type(layer).__name__} on CPU")
            layers.append((name, layer))
    return layers


def _assign(param: paddle.Tensor, value: np.ndarray) -> None:
    tensor = paddle.to_tensor(value)
    param.set_value(tensor if tensor.dtype == param.dtype else tensor.astype(param.dtype))


def attach_adapter(adapter: Adapter, model: paddle.nn.Layer) -> tuple[Any, list[tuple[str, Any]]]:
    """Wrap ``model`` in the adapter's (unmerged) LoRA layers, check the saved weights against them, replace
    each wrapped base weight by its base transform (then by its SVD residual for PiSSA, as in training) and
    load the adapter's weights. Returns ``(lora_model, [(name, LoRALinear), ...])``."""
    from paddlenlp.peft import LoRAModel

    from llm.model import family_of

    adapter.config.merge_weights = False
    lora_model = LoRAModel(model, adapter.config)
    layers = _lora_layers(lora_model.model)
    if not layers:
        raise ModelError(
            f"{adapter.path}: the adapter's target_modules match no layer of this "
            f"{family_of(lora_model.model).name} model"
        )
    check_adapter(lora_model.model, adapter.state, adapter.path)
    with paddle.no_grad():
        for _, layer in layers:
            layer.weight.set_value(adapter.transform(layer.weight, adapter.qconfig))
            if getattr(layer, "pissa", False):
                layer.pissa_init(layer.r)  # the base becomes its SVD residual, as in training
                layer.apply_pissa = True
        if adapter.qconfig.get(
            "weight_quantize_algo"
        ):  # training saw every decoder linear low-bit, not only these
            from llm.quant.model import get_layer, quant_targets

            wrapped = {id(layer) for _, layer in layers}
            for name in quant_targets(lora_model.model):
                layer = get_layer(lora_model.model, name)
                if id(layer) not in wrapped:
                    layer.weight.set_value(adapter.transform(layer.weight, adapter.qconfig))
        model_state = lora_model.model.state_dict()
        for key, value in adapter.state.items():
            _assign(model_state[key], value)
    return lora_model, layers


def _delta(layer: Any) -> paddle.Tensor:
    """``A @ B * scaling`` in float32 (paddle 2.6 has no CPU matmul/add for half precision)."""
    return layer.lora_A.astype("float32") @ layer.lora_B.astype("float32") * layer.scaling


def merge_layers(layers: list[tuple[str, Any]]) -> int:
    """``W += A @ B * scaling`` on every (unmerged) layer, marking it merged; returns how many weights changed.

    The sum is formed in float32 and stored in the weight's dtype (a bfloat16 model merges on CPU too)."""
    changed = 0
    with paddle.no_grad():
        for _, layer in layers:
            old = layer.weight.numpy().copy()
            merged = layer.weight.astype("float32") + _delta(layer)
            layer.weight.set_value(merged.astype(layer.weight.dtype))
            layer.merged = True
            changed += int(not np.array_equal(old, layer.weight.numpy()))
            del old
    return changed


# --------------------------------------------------------------------------------------------------
# in memory
# --------------------------------------------------------------------------------------------------
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
    """Merge the adapter in ``lora_path`` into ``model`` in memory (checked and scaled exactly as
    :func:`merge_lora_checkpoint` does) and return the plain CausalLM, in eval mode."""
    from llm.model import family_of

    family_of(model).check("lora")
    adapter = read_adapter(lora_path, model.config)
    lora_model, layers = attach_adapter(adapter, model)
    merge_layers(layers)
    base = lora_model.model
    _swap_lora_linears(base)
    base.eval()
    return base


# --------------------------------------------------------------------------------------------------
# into a checkpoint
# --------------------------------------------------------------------------------------------------
def probe_ids(vocab_size: int, length: int = 16) -> np.ndarray:
    """A fixed ``[2, length]`` probe batch drawn from the vocabulary."""
    return np.random.RandomState(1234).randint(0, int(vocab_size), size=(2, length)).astype("int64")


def _logits(model: paddle.nn.Layer, ids: np.ndarray) -> np.ndarray:
    from llm.model import forward_logits

    with paddle.no_grad():
        return forward_logits(model, {"input_ids": ids}).astype("float32").numpy()


def _write_model(model: paddle.nn.Layer, out: str, safe: bool) -> list[str]:
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    items = [
        Pending(
            k, tuple(v.shape), str(v.dtype).replace("paddle.", ""), lambda v=v: from_numpy(v.numpy(), True)
        )
        for k, v in state.items()
    ]
    write_state(os.path.join(out, "model.safetensors" if safe else "model_state.pdparams"), items, safe)
    return list(state)


def _saved_keys(out: str) -> list[str]:
    ckpt = open_checkpoint(out, paddle_layout=True)
    try:
        return ckpt.keys()
    finally:
        ckpt.close()


def merge_lora_checkpoint(
    lora_path: str,
    output_path: str,
    model_name_or_path: str | None = None,
    safe_serialization: bool = True,
    tolerance: float = 1e-5,
    probe: np.ndarray | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Merge the adapter in ``lora_path`` into its base and write a full model directory to ``output_path``.

    The base defaults to ``base_model_name_or_path`` in ``lora_config.json`` and may be a Hugging Face
    directory. The merge runs in float32. Verification (see the module docstring) compares logits with
    ``max |merged - unmerged| <= tolerance * max(1, max |unmerged|)``. ``output_path`` follows the output-path
    policy of :mod:`llm.outputs` (an existing non-empty directory needs ``overwrite``).
    """
    from paddlenlp.quantization.quantization_config import QuantizationConfig

    from llm.model import load_model

    if not os.path.isfile(os.path.join(lora_path or "", LORA_CONFIG)):
        raise ModelError(f"LoRA directory '{lora_path}' has no {LORA_CONFIG}")
    base = model_name_or_path or read_json(os.path.join(lora_path, LORA_CONFIG)).get(
        "base_model_name_or_path"
    )
    if not base:
        raise ConfigError(f"{lora_path}/{LORA_CONFIG} names no base model; pass --model_name_or_path")
    inputs = (lora_path, base)
    check_output_path(output_path, inputs=inputs, overwrite=overwrite, what="merge_lora_model_path")
    adapter = read_adapter(lora_path, os.path.join(base, "config.json"))

    model = load_model(base, dtype="float32")
    lora_model, layers = attach_adapter(adapter, model)
    lora_model.eval()
    ids = probe if probe is not None else probe_ids(model.config.vocab_size)
    unmerged = _logits(lora_model, ids)
    changed = merge_layers(layers)
    config = model.config
    config.quantization_config = QuantizationConfig()  # the merged model is a plain float model
    config.dtype = "float32"
    with staged_output(output_path, writer="merge_lora_params", inputs=inputs, overwrite=overwrite) as tmp:
        _write_model(lora_model.model, tmp, safe_serialization)
        config.save_pretrained(tmp)
        for source in (base, lora_path):
            copy_tokenizer_files(source, tmp)
        del lora_model, model
        gc.collect()
        report = _verify(tmp, ids, unmerged, changed, len(layers), tolerance)
        write_json(
            os.path.join(tmp, "merge_report.json"),
            {"base_model": base, "lora_path": os.path.abspath(lora_path), **report},
        )
    return MergeReport(
        os.path.abspath(output_path), base, len(layers), changed, report["max_abs_diff"], tolerance
    )


def _verify(
    tmp: str, ids: np.ndarray, unmerged: np.ndarray, changed: int, layers: int, tolerance: float
) -> dict[str, Any]:
    from llm.model import load_model

    lora_keys = [k for k in _saved_keys(tmp) if "lora" in k.lower()]
    if lora_keys:
        raise ModelError(
            f"merge verification failed: LoRA weights remain in the merged model (e.g. '{lora_keys[0]}')"
        )
    if changed == 0:
        raise ModelError(
            f"merge verification failed: none of the {layers} LoRA-wrapped weights changed (the adapter's "
            "delta A @ B is zero: an untrained or empty adapter?)"
        )
    merged = load_model(tmp, dtype="float32")
    merged.eval()
    diff = float(np.abs(_logits(merged, ids) - unmerged).max())
    bound = tolerance * max(1.0, float(np.abs(unmerged).max()))
    if not np.isfinite(diff) or diff > bound:
        raise ModelError(
            f"merge verification failed: merged logits differ from the unmerged LoRA model's by {diff:.3g} "
            f"(allowed {bound:.3g}); nothing was written"
        )
    return {"merged_layers": layers, "changed_weights": changed, "max_abs_diff": diff, "allowed": bound}
