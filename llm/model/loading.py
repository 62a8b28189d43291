"""Build, load and run the nine families uniformly (with the CPU/paddlenlp-2.8.1 fixes applied).

Fixes applied by :func:`apply_family_fixes` (per model instance, never globally):

* **bloom** (fresh init only): ``BloomPreTrainedModel._init_weights`` zeroes the *weight* of every
  biased Linear, so the blocks get no gradient; those weights are re-drawn from N(0, initializer_range).
* **gpt**: ``GPTPretrainingCriterion`` ignores ``config.ignore_index`` (default 0, i.e. the pad id) and
  crashes on -100 labels; it is replaced by a masked mean cross-entropy that ignores -100.
* **chatglm** (v1): the model only takes a 4-D bool mask and ``[b, 2, s]`` position ids; a forward
  adapter turns 2-D padding masks / missing or 2-D position ids into that form.
* **glm**: same adapter (GLM's own 1-D/2-D mask handling is dead code: it compares the ``dim`` method to
  an int), plus a mean loss over ``labels != -100`` (GLM otherwise returns an unreduced loss vector).
* **opt**: ``OPTForCausalLM.__getattr__`` answers ``None`` for any unknown name, so paddlenlp's Trainer sees a
  ``no_sync`` and calls ``None()`` with ``gradient_accumulation_steps > 1``; the model gets a no-op ``no_sync``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import types
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlenlp.transformers import PretrainedConfig, PretrainedModel
from safetensors import SafetensorError

from llm.convert.cache import ensure_paddle_dir
from llm.convert.checkpoint import check_weight_files
from llm.errors import ConfigError, ModelError
from llm.fileio import read_json
from llm.model.families import FamilySpec, family_of
from llm.outputs import require_complete, unfinished_training_hint

IGNORE_INDEX = -100
WEIGHT_FILES = (
    "model_state.pdparams",
    "model.safetensors",
    "model_state.pdparams.index.json",
    "model.safetensors.index.json",
)
TORCH_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
DTYPES = ("float32", "float16", "bfloat16")
_FROM_PRETRAINED_KWARGS = ("convert_from_torch", "low_cpu_mem_usage", "variant", "subfolder")


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------
def causal_lm_loss(
    logits: paddle.Tensor, labels: paddle.Tensor, ignore_index: int = IGNORE_INDEX
) -> paddle.Tensor:
    """Mean cross-entropy over positions whose (already shifted) label is not ``ignore_index``."""
    logits = logits.astype("float32")
    labels = labels.astype("int64")
    per_token = F.cross_entropy(
        logits.reshape([-1, logits.shape[-1]]),
        labels.reshape([-1, 1]),
        reduction="none",
        ignore_index=ignore_index,
    ).reshape([-1])
    valid = (labels.reshape([-1]) != ignore_index).astype("float32")
    return (per_token * valid).sum() / paddle.clip(valid.sum(), min=1.0)


class MaskedCausalLMCriterion(paddle.nn.Layer):
    """Drop-in criterion ``(logits, labels) -> mean CE`` ignoring -100 (replaces GPT's)."""

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor, loss_mask: Any = None) -> paddle.Tensor:
        with paddle.amp.auto_cast(False):
            return causal_lm_loss(logits, labels, self.ignore_index)


# --------------------------------------------------------------------------------------------------
# forward adapters for chatglm (v1) and glm
# --------------------------------------------------------------------------------------------------
def expand_causal_mask(
    mask: paddle.Tensor | None, batch: int, q_len: int, kv_len: int | None = None
) -> paddle.Tensor:
    """A 2-D key-padding mask ``[b, K]`` (or None) -> bool ``[b, 1, q_len, K]``, causal over the last ``q_len`` keys.

    Keys before the last ``q_len`` (a prefix or a cache) are visible to every query.
    """
    if mask is None:
        total = kv_len if kv_len is not None else q_len
        keep = paddle.ones([batch, total], dtype="bool")
    else:
        keep = mask.astype("bool")
        total = keep.shape[-1]
    offset = total - q_len
    rows = paddle.arange(q_len, dtype="int64").unsqueeze(1)
    cols = paddle.arange(total, dtype="int64").unsqueeze(0)
    causal = cols <= rows + offset
    return paddle.logical_and(keep.unsqueeze([1, 2]), causal.unsqueeze([0, 1]))


def _two_d_positions(position_ids: paddle.Tensor | None, batch: int, seq: int) -> paddle.Tensor:
    """None / ``[b, s]`` -> ``[b, 2, s]`` (position, block position 0), the ChatGLM/GLM layout."""
    if position_ids is None:
        position_ids = paddle.arange(seq, dtype="int64").unsqueeze(0).expand([batch, seq])
    if position_ids.ndim == 3:
        return position_ids
    position_ids = position_ids.astype("int64")
    return paddle.stack([position_ids, paddle.zeros_like(position_ids)], axis=1)


def _batch_seq(input_ids: Any, inputs_embeds: Any) -> tuple[int, int]:
    ref = input_ids if input_ids is not None else inputs_embeds
    return int(ref.shape[0]), int(ref.shape[1])


def _chatglm_forward(
    self,
    input_ids=None,
    position_ids=None,
    attention_mask=None,
    cache=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    return_dict=False,
):
    """ChatGLM (v1) forward that also takes 2-D padding masks and ``[b, s]`` / missing position ids."""
    batch, seq = _batch_seq(input_ids, inputs_embeds)
    if attention_mask is None or attention_mask.ndim == 2:
        past = 0
        if cache is not None and len(cache) and cache[0] is not None:
            past = int(cache[0][0].shape[0])  # chatglm caches are [s, b, h, d]
        attention_mask = expand_causal_mask(attention_mask, batch, seq, seq + past)
    return type(self).forward(
        self,
        input_ids=input_ids,
        position_ids=_two_d_positions(position_ids, batch, seq),
        attention_mask=attention_mask,
        cache=cache,
        inputs_embeds=inputs_embeds,
        labels=labels,
        use_cache=use_cache,
        return_dict=return_dict,
    )


def _glm_forward(
    self,
    input_ids=None,
    position_ids=None,
    attention_mask=None,
    labels=None,
    cache=None,
    return_dict=None,
    loss_mask=None,
    use_cache=True,
):
    """GLM forward taking 2-D/4-D bool masks and ``[b, s]`` position ids, returning a mean loss over labels != -100."""
    batch, seq = _batch_seq(input_ids, None)
    if attention_mask is None or attention_mask.ndim == 2:
        past = int(cache[0].shape[1]) if cache else 0  # glm memories are [b, m, hidden]
        attention_mask = expand_causal_mask(attention_mask, batch, seq, seq + past)
    if attention_mask.ndim == 4:
        attention_mask = attention_mask.astype(paddle.get_default_dtype())
    if labels is not None and loss_mask is None:
        loss_mask = (labels != IGNORE_INDEX).astype("float32")
    return type(self).forward(
        self,
        input_ids=input_ids,
        position_ids=_two_d_positions(position_ids, batch, seq),
        attention_mask=attention_mask,
        labels=labels,
        cache=cache,
        return_dict=return_dict,
        loss_mask=loss_mask,
        use_cache=use_cache,
    )


def _reinit_bloom_linears(model: PretrainedModel) -> int:
    std = float(getattr(model.config, "initializer_range", 0.02))
    fixed = 0
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.Linear) and not bool(paddle.any(layer.weight != 0)):
            layer.weight.set_value(
                paddle.normal(mean=0.0, std=std, shape=layer.weight.shape).astype(layer.weight.dtype)
            )
            fixed += 1
    return fixed


def apply_family_fixes(model: PretrainedModel, fresh_init: bool = False) -> PretrainedModel:
    """Apply the per-family fixes described in the module docstring to ``model`` (idempotent)."""
    spec = family_of(model)
    if fresh_init and spec.name == "bloom":
        _reinit_bloom_linears(model)
    if getattr(model, "_llm_fixes_applied", False):
        return model
    if spec.name == "gpt":
        model.config.ignore_index = IGNORE_INDEX
        model.criterion = MaskedCausalLMCriterion()
    elif spec.input_style == "chatglm":
        # bound per instance (types.MethodType) so deepcopy rebinds it to the copy
        model.forward = types.MethodType(_chatglm_forward, model)
    elif spec.input_style == "glm":
        model.forward = types.MethodType(_glm_forward, model)
    elif spec.name == "opt":
        model.no_sync = contextlib.nullcontext  # single process: nothing to sync (DataParallel has its own)
    model._llm_fixes_applied = True
    return model


# --------------------------------------------------------------------------------------------------
# build / load
# --------------------------------------------------------------------------------------------------
def build_model(config: PretrainedConfig, seed: int = 0) -> PretrainedModel:
    """Randomly initialise the family's CausalLM for ``config`` (deterministic in ``seed``), fixes applied."""
    spec = family_of(config)
    paddle.seed(seed)
    np.random.seed(seed)
    model = spec.model_class(config)
    return apply_family_fixes(model, fresh_init=True)


def _check_dtype(dtype: str) -> str:
    dtype = str(dtype).replace("paddle.", "")
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype '{dtype}'; expected one of {', '.join(DTYPES)}")
    return dtype


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


#: dtypes a model can run in on CPU: paddle 2.6 has no CPU float16 kernels for basic ops (matmul, unsqueeze,
#: index_select); bfloat16 weights are stored as such and computed in float32 (see llm.infer.decoders.base)
CPU_DTYPES = ("float32", "bfloat16")


def device_dtypes(device: str | None = None) -> tuple[str, ...]:
    """The model dtypes that run on ``device`` (default: paddle's current device)."""
    device = str(device or paddle.get_device()).lower()
    if device.startswith("cpu"):
        return CPU_DTYPES
    if device.startswith("gpu"):
        try:
            supported = (paddle.amp.is_float16_supported(), paddle.amp.is_bfloat16_supported())
        except Exception:  # noqa: BLE001 - query failures mean "unknown": allow and let paddle decide
            return DTYPES
        return ("float32",) + tuple(d for d, ok in zip(("float16", "bfloat16"), supported) if ok)
    return DTYPES


def check_device_dtype(dtype: str, device: str | None = None) -> None:
    """Refuse a model dtype ``device`` cannot run (one :class:`ConfigError` line naming the dtypes it can)."""
    device = str(device or paddle.get_device())
    allowed = device_dtypes(device)
    if dtype not in allowed:
        why = " (paddle 2.6 has no CPU float16 kernels)" if device.startswith("cpu") else ""
        raise ConfigError(
            f"dtype {dtype} does not run on {device}{why}; dtypes that run on this device: {', '.join(allowed)}"
        )


def is_cpu_half(dtype: str) -> bool:
    """A half-precision dtype on the CPU (stored in that dtype, computed in float32)."""
    return dtype in ("float16", "bfloat16") and str(paddle.get_device()).startswith("cpu")


#: what paddlenlp's loaders raise for truncated or corrupt weight files
_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    RuntimeError,
    KeyError,
    AssertionError,
    EOFError,
    pickle.UnpicklingError,
    zipfile.BadZipFile,
    struct.error,
    SafetensorError,
)


def load_model(model_name_or_path: str, dtype: str = "float32", **kwargs: Any) -> PretrainedModel:
    """Load a local model dir: paddlenlp layout (``config.json`` + ``model_state.pdparams`` or ``model.safetensors``)
    or a Hugging Face checkpoint, which is converted on the fly and cached (see :mod:`llm.convert.cache`),
    or a quantized directory written by :mod:`llm.quant` (see :func:`llm.quant.io.load_quantized`).

    ``convert_from_torch``/``low_cpu_mem_usage``/``variant``/``subfolder`` go to ``from_pretrained``; every
    other keyword overrides a config field (e.g. ``use_flash_attention=False``). Missing dirs, configs or
    weights raise :class:`ModelError` naming the directory and the expected files.
    """
    dtype = _check_dtype(dtype)
    check_device_dtype(dtype)  # before anything is converted or cached
    path = os.fspath(model_name_or_path) if model_name_or_path is not None else ""
    expected = "config.json plus model_state.pdparams or model.safetensors (or a sharded *.index.json)"
    if not path or not os.path.isdir(path):
        raise ModelError(f"model directory not found: '{path}' (expected a local directory with {expected})")
    require_complete(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ModelError(f"{path}: no config.json (expected {expected}){unfinished_training_hint(path)}")
    from llm.quant.io import is_quantized_dir, load_quantized

    if is_quantized_dir(path) is not None:  # low-bit weights: built without a float copy of the linears
        return load_quantized(path, dtype=dtype)
    load_kwargs = {k: kwargs.pop(k) for k in _FROM_PRETRAINED_KWARGS if k in kwargs}
    converted = ensure_paddle_dir(path, dtype=dtype)
    if converted != path:  # a Hugging Face directory, converted once and cached
        path, config_file = converted, os.path.join(converted, "config.json")
        load_kwargs.pop("convert_from_torch", None)
    has_weights = any(os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES)
    has_torch = any(os.path.isfile(os.path.join(path, f)) for f in TORCH_WEIGHT_FILES)
    if not has_weights and not (has_torch and load_kwargs.get("convert_from_torch")):
        hint = " (found pytorch_model.bin: pass convert_from_torch=True)" if has_torch else ""
        hint = hint or unfinished_training_hint(path)
        raise ModelError(f"{path}: no model weights found; expected one of {', '.join(WEIGHT_FILES)}{hint}")
    spec = family_of(read_json(config_file, "config"))
    check_weight_files(path)  # truncated or corrupt: one line naming the file, before paddlenlp reads it
    config = spec.config_class.from_pretrained(path)
    for key, value in kwargs.items():
        setattr(config, key, value)
    config.dtype = dtype
    if is_cpu_half(dtype):  # random init in bfloat16 has no CPU kernel: build lazily, load straight into it
        load_kwargs.setdefault("low_cpu_mem_usage", True)
    try:
        model = spec.model_class.from_pretrained(path, config=config, dtype=dtype, **load_kwargs)
    except _LOAD_ERRORS as err:
        raise ModelError(
            f"{path}: cannot load {spec.model_class.__name__} weights ({_first_line(err)})"
        ) from None
    return apply_family_fixes(model, fresh_init=False)


# --------------------------------------------------------------------------------------------------
# one forward for every family
# --------------------------------------------------------------------------------------------------
def batch_to_tensors(batch: Mapping[str, Any]) -> dict[str, paddle.Tensor]:
    """numpy/list batch -> paddle tensors (ids/labels/positions int64, 4-D masks bool, 2-D masks int64)."""
    out: dict[str, paddle.Tensor] = {}
    for key, value in batch.items():
        if value is None:
            continue
        if isinstance(value, paddle.Tensor):
            out[key] = value
            continue
        arr = np.asarray(value)
        if key == "attention_mask":
            arr = arr.astype(bool) if arr.ndim >= 3 else arr.astype("int64")
        elif arr.dtype.kind in "iub":
            arr = arr.astype("int64")
        out[key] = paddle.to_tensor(arr)
    return out


def _extract_loss(outputs: Any) -> paddle.Tensor:
    if isinstance(outputs, Mapping) and outputs.get("loss") is not None:
        loss = outputs["loss"]
    elif isinstance(outputs, tuple | list) and len(outputs) and isinstance(outputs[0], paddle.Tensor):
        loss = outputs[0]
    else:
        raise ModelError("model forward returned no loss; were labels passed?")
    if loss.size != 1:
        raise ModelError(f"model returned a non-scalar loss of shape {list(loss.shape)}")
    return loss.reshape([])


def forward_loss(model: paddle.nn.Layer, batch: Mapping[str, Any]) -> paddle.Tensor:
    """Mean CE over ``labels != -100`` for a training batch (plain or zero-padding format), any family/wrapper.

    Zero-padding batches (4-D mask + ``position_ids``) are refused with :class:`ConfigError` for families
    that cannot take them.
    """
    spec: FamilySpec = family_of(model)
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None and len(attention_mask.shape) == 4:
        spec.check("zero_padding")
    if batch.get("labels") is None:
        raise ConfigError("forward_loss needs a batch with 'labels'")
    outputs = model(**batch_to_tensors(batch))
    return _extract_loss(outputs)


def forward_logits(model: paddle.nn.Layer, batch: Mapping[str, Any]) -> paddle.Tensor:
    """``[b, s, vocab]`` logits for a batch (labels are ignored), any family/wrapper."""
    inputs = batch_to_tensors({k: v for k, v in batch.items() if k != "labels"})
    outputs = model(**inputs, return_dict=True)
    if isinstance(outputs, paddle.Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs["logits"]
    return outputs[0]
