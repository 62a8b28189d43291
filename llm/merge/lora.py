"""Merge a LoRA adapter into its base model, verify the result, and only then publish it.

``W' = T(W) + A @ B * scaling`` for every LoRA-wrapped linear layer, where ``scaling`` is ``alpha / r``
(plain LoRA), ``alpha / sqrt(r)`` (rsLoRA) or 1 (PiSSA, whose base is first replaced by its SVD residual,
exactly as paddlenlp does at the start of training) and ``T`` is the **base transform** registered for the
base's ``weight_quantize_algo``: identity for a float base; a QLoRA / weight-only base must be
quantized-dequantized the way training saw it (see :func:`register_base_transform`).

After merging, three checks must pass before the temporary output directory is renamed into place: the
merged model (reloaded from disk) gives the unmerged LoRA model's logits on a probe input, no ``lora`` keys
remain, and at least one weight changed. Any failure raises :class:`~llm.errors.ModelError`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle

from llm.convert.checkpoint import read_json
from llm.convert.core import check_not_source, copy_tokenizer_files, new_tmp_dir, publish
from llm.convert.tensors import PdparamsFile, Pending, SafetensorsFile, from_numpy, write_safetensors
from llm.errors import ConfigError, ModelError

LORA_CONFIG = "lora_config.json"
LORA_PDPARAMS = "lora_model_state.pdparams"
LORA_SAFETENSORS = "lora_model_state.safetensors"

BaseTransform = Callable[[paddle.Tensor, dict[str, Any]], paddle.Tensor]
BASE_TRANSFORMS: dict[str | None, BaseTransform] = {None: lambda weight, qconfig: weight}


def register_base_transform(algo: str, fn: BaseTransform) -> None:
    """Register ``fn(weight, quantization_config) -> weight`` for bases trained with ``weight_quantize_algo=algo``.

    ``fn`` must return the float weight the quantized training forward saw (quantize, then dequantize).
    """
    BASE_TRANSFORMS[algo] = fn


def base_transform_for(algo: str | None) -> BaseTransform:
    """The registered transform for ``algo`` (``None`` = float base); unknown algorithms raise ModelError."""
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


# --------------------------------------------------------------------------------------------------
# reading and checking the adapter
# --------------------------------------------------------------------------------------------------
def read_lora_state(lora_path: str) -> dict[str, np.ndarray]:
    """The adapter's weights: ``lora_model_state.safetensors`` (preferred) or ``.pdparams`` (a pickle)."""
    st = os.path.join(lora_path, LORA_SAFETENSORS)
    if os.path.isfile(st):
        reader = SafetensorsFile(st, u16_is_bf16=True)
        return {k: _float32(reader.get(k).array, reader.info(k)[1]) for k in reader.keys()}
    pd = os.path.join(lora_path, LORA_PDPARAMS)
    if os.path.isfile(pd):
        reader = PdparamsFile(pd)
        return {k: _float32(reader.get(k).array, reader.get(k).dtype) for k in reader.keys()}
    tp = sorted(f for f in os.listdir(lora_path) if f.startswith("lora_model_state.tp"))
    hint = f" (found tensor-parallel shards such as {tp[0]}: merge them first)" if tp else ""
    raise ModelError(f"{lora_path}: no {LORA_PDPARAMS} or {LORA_SAFETENSORS}{hint}")


def _float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    from llm.convert.tensors import Tensor, cast

    return cast(Tensor(arr, dtype), "float32").array if dtype in ("float16", "bfloat16") else np.asarray(arr)


def check_adapter(model_state: dict[str, Any], lora_state: dict[str, np.ndarray], lora_path: str) -> None:
    """Every saved weight must exist in the LoRA-wrapped model with the same shape, and every LoRA weight of
    the model must be saved; otherwise raise one :class:`ModelError` naming the first offender."""
    unknown = [k for k in lora_state if k not in model_state]
    if unknown:
        raise ModelError(
            f"{lora_path}: {len(unknown)} adapter weights do not exist in the base model (e.g. '{unknown[0]}'); "
            "was the adapter trained on another base?"
        )
    for key, value in lora_state.items():
        want = list(model_state[key].shape)
        if list(value.shape) != want:
            raise ModelError(
                f"{lora_path}: adapter weight '{key}' has shape {list(value.shape)} but the base model needs "
                f"{want}; was the adapter trained on another base?"
            )
    missing = [k for k in model_state if ("lora_A" in k or "lora_B" in k) and k not in lora_state]
    if missing:
        raise ModelError(f"{lora_path}: the adapter lacks {len(missing)} LoRA weights (e.g. '{missing[0]}')")


def _quant_algo(*config_files: str) -> tuple[str | None, dict[str, Any]]:
    for path in config_files:
        if os.path.isfile(path):
            qconfig = read_json(path).get("quantization_config") or {}
            algo = qconfig.get("weight_quantize_algo")
            if algo:
                return str(algo), qconfig
    return None, {}


def _lora_layers(model: paddle.nn.Layer) -> list[tuple[str, Any]]:
    from paddlenlp.peft.lora.lora_layers import LoRALinear

    layers = []
    for name, layer in model.named_sublayers():
        if hasattr(layer, "lora_A") and hasattr(layer, "lora_B"):
            if type(layer) is not LoRALinear:
                raise ModelError(f"cannot merge LoRA layer '{name}' of type {type(layer).__name__} on CPU")
            layers.append((name, layer))
    return layers


def probe_ids(vocab_size: int, length: int = 16) -> np.ndarray:
    """A fixed ``[2, length]`` probe batch drawn from the vocabulary."""
    return np.random.RandomState(1234).randint(0, int(vocab_size), size=(2, length)).astype("int64")


def _logits(model: paddle.nn.Layer, ids: np.ndarray) -> np.ndarray:
    from llm.model import forward_logits

    with paddle.no_grad():
        return forward_logits(model, {"input_ids": ids}).astype("float32").numpy()


def _delta(layer: Any) -> paddle.Tensor:
    return layer.lora_A @ layer.lora_B * layer.scaling


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def _write_model(model: paddle.nn.Layer, out: str, safe: bool) -> list[str]:
    state = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    if safe:
        items = [
            Pending(
                k,
                tuple(v.shape),
                str(v.dtype).replace("paddle.", ""),
                lambda v=v: from_numpy(v.numpy(), True),
            )
            for k, v in state.items()
        ]
        write_safetensors(os.path.join(out, "model.safetensors"), items, {"format": "np"})
    else:
        paddle.save({k: v.numpy() for k, v in state.items()}, os.path.join(out, "model_state.pdparams"))
    return list(state)


def _saved_keys(out: str) -> list[str]:
    path = os.path.join(out, "model.safetensors")
    if os.path.isfile(path):
        return SafetensorsFile(path).keys()
    return PdparamsFile(os.path.join(out, "model_state.pdparams")).keys()


# --------------------------------------------------------------------------------------------------
# the merge
# --------------------------------------------------------------------------------------------------
def merge_lora_checkpoint(
    lora_path: str,
    output_path: str,
    model_name_or_path: str | None = None,
    safe_serialization: bool = True,
    tolerance: float = 1e-5,
    probe: np.ndarray | None = None,
) -> MergeReport:
    """Merge the adapter in ``lora_path`` into its base and write a full model directory to ``output_path``.

    The base defaults to ``base_model_name_or_path`` in ``lora_config.json`` and may be a Hugging Face
    directory. The merge runs in float32. Verification (see the module docstring) compares logits with
    ``max |merged - unmerged| <= tolerance * max(1, max |unmerged|)``.
    """
    from paddlenlp.peft import LoRAConfig, LoRAModel
    from paddlenlp.quantization.quantization_config import QuantizationConfig

    from llm.model import load_model

    if not os.path.isfile(os.path.join(lora_path or "", LORA_CONFIG)):
        raise ModelError(f"LoRA directory '{lora_path}' has no {LORA_CONFIG}")
    lora_config = LoRAConfig.from_pretrained(lora_path)
    base = model_name_or_path or lora_config.base_model_name_or_path
    if not base:
        raise ConfigError(f"{lora_path}/{LORA_CONFIG} names no base model; pass --model_name_or_path")
    check_not_source(output_path, lora_path, base)
    lora_state = read_lora_state(lora_path)
    algo, qconfig = _quant_algo(os.path.join(lora_path, "config.json"), os.path.join(base, "config.json"))
    transform = base_transform_for(algo)

    model = load_model(base, dtype="float32")
    lora_config.merge_weights = False
    lora_model = LoRAModel(model, lora_config)
    layers = _lora_layers(lora_model.model)
    if not layers:
        raise ModelError(
            f"{lora_path}: the adapter's target_modules match no layer of the base model '{base}'"
        )
    check_adapter(lora_model.model.state_dict(), lora_state, lora_path)
    with paddle.no_grad():
        for _, layer in layers:
            layer.weight.set_value(transform(layer.weight, qconfig))
            if getattr(layer, "pissa", False):
                layer.pissa_init(layer.r)  # the base becomes its SVD residual, as in training
                layer.apply_pissa = True
    model_state = lora_model.model.state_dict()
    with paddle.no_grad():
        for key, value in lora_state.items():
            model_state[key].set_value(value.astype(np.float32) if value.dtype.kind == "f" else value)
    del model_state
    lora_model.eval()
    ids = probe if probe is not None else probe_ids(model.config.vocab_size)
    unmerged = _logits(lora_model, ids)

    changed = 0
    with paddle.no_grad():
        for _, layer in layers:
            old = layer.weight.numpy().copy()
            layer.weight.set_value(layer.weight + _delta(layer))
            layer.merged = True
            changed += int(not np.array_equal(old, layer.weight.numpy()))
            del old
    config = model.config
    config.quantization_config = QuantizationConfig()  # the merged model is a plain float model
    config.dtype = "float32"
    tmp = new_tmp_dir(output_path)
    try:
        _write_model(lora_model.model, tmp, safe_serialization)
        config.save_pretrained(tmp)
        for source in (base, lora_path):
            copy_tokenizer_files(source, tmp)
        del lora_model, model
        gc.collect()
        report = _verify(tmp, ids, unmerged, changed, len(layers), tolerance)
        with open(os.path.join(tmp, "merge_report.json"), "w", encoding="utf-8") as f:
            json.dump({"base_model": base, "lora_path": os.path.abspath(lora_path), **report}, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = publish(tmp, output_path, overwrite=True)
    return MergeReport(out, base, len(layers), changed, report["max_abs_diff"], tolerance)


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
