"""Dynamic-graph runners: per-family fast kernels and the generic paddlenlp-forward path."""

from __future__ import annotations

import logging
from typing import Any

from paddlenlp.peft import PrefixModelForCausalLM

from llm.errors import ConfigError, ModelError
from llm.infer.decoders.base import StepKernel
from llm.infer.decoders.chatglm import ChatGLMKernel
from llm.infer.decoders.classic import CLASSIC_FAMILIES, ClassicKernel
from llm.infer.decoders.generic import GenericRunner
from llm.infer.decoders.rotary import ROTARY_FAMILIES, RotaryKernel
from llm.infer.decoders.runner import KernelRunner, kernel_step_fn
from llm.model.loading import check_device_dtype, is_cpu_half

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "fast", "generic")
FAST_FAMILIES = ROTARY_FAMILIES + CLASSIC_FAMILIES + ("chatglm",)


def build_kernel(model: Any) -> StepKernel:
    """The family's fast step kernel for ``model`` (:class:`ModelError` when there is none).

    Kernels read the layers' ``weight`` tensors, so unmerged LoRA layers are refused (merge them first;
    :func:`make_runner` then falls back to the generic path, which runs the LoRA forward).
    """
    from llm.model import family_of, unwrap_model

    family = family_of(model).name
    unmerged = [
        name
        for name, layer in unwrap_model(model).named_sublayers()
        if hasattr(layer, "lora_A") and not getattr(layer, "merged", False)
    ]
    if unmerged:
        raise ModelError(f"{len(unmerged)} LoRA layers are not merged (e.g. {unmerged[0]}); merge LoRA first")
    from llm.lowbit import has_low_bit_layers

    if has_low_bit_layers(model):
        raise ModelError("a low-bit PEFT base (weight_quantize_algo) runs through the model's own forward")
    if family in ROTARY_FAMILIES:
        return RotaryKernel(model)
    if family in CLASSIC_FAMILIES:
        return ClassicKernel(model)
    if family == "chatglm":
        return ChatGLMKernel(model)
    raise ModelError(f"no fast kernel for model family '{family}' (fast kernels: {', '.join(FAST_FAMILIES)})")


def model_dtype(model: Any) -> str:
    """The dtype name of the model's first parameter (``float32`` when it has none)."""
    for param in model.parameters():
        return str(param.dtype).replace("paddle.", "")
    return "float32"


def make_runner(
    model: Any,
    *,
    backend: str = "auto",
    max_seq_len: int | None = None,
    dtype: str = "float32",
    quant_lm_head: bool = False,
) -> KernelRunner | GenericRunner:
    """Pick the runner for ``model``: see :func:`llm.infer.create_engine`."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ConfigError(f"unsupported dtype {dtype!r}")
    if model_dtype(model) != dtype:
        raise ConfigError(
            f"the model is {model_dtype(model)} but dtype={dtype!r} was asked for; load it in {dtype}"
        )
    if max_seq_len is not None and int(max_seq_len) < 2:
        raise ConfigError(f"max_seq_len must be >= 2, got {max_seq_len}")
    check_device_dtype(dtype)
    if backend != "generic":
        try:
            kernel = build_kernel(model)
        except ModelError:
            if backend == "fast":
                raise
        else:
            kernel.eval()
            if quant_lm_head:
                kernel.quantize_head()
            kernel.enable_blocked_head(*kernel.head_layout())
            kernel.keep_bits()
            prefix = kernel.prefix_cache(model) if isinstance(model, PrefixModelForCausalLM) else None
            return KernelRunner(
                kernel_step_fn(kernel),
                kernel.describe(),
                prefix=prefix,
                max_seq_len=max_seq_len,
                dtype=kernel.dtype_name,
            )
    if is_cpu_half(dtype):
        # the model's own forward needs half-precision CPU kernels paddle 2.6 lacks: run it in float32
        logger.warning(
            "the generic path runs this %s model in float32 on CPU (no CPU %s kernels)", dtype, dtype
        )
        model.to(dtype="float32")
    return GenericRunner(model, max_seq_len=max_seq_len)
