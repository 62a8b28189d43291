"""LoRA and prefix tuning the way PaddleNLP 2.8's ``finetune_generation.py`` sets them up (spec §3.9).

* LoRA: ``LoRAConfig(target_modules=<family regexes>, r=lora_rank, lora_alpha=2r (4 with rslora),
  rslora, lora_plus_scale, pissa, merge_weights=False, dtype, base_model_name_or_path)``, or
  ``LoRAModel.from_pretrained(model, lora_path)`` to continue from a saved adapter.
* Prefix: ``PrefixConfig(num_prefix_tokens, heads, layers, hidden, multi_query_group_num, dtype)`` with the
  family's ``postprocess_past_key_value``, or ``from_pretrained(model, prefix_path)``.

:class:`PrefixModel` subclasses paddlenlp's ``PrefixModelForCausalLM`` to make generation work for
families whose ``prepare_inputs_for_generation`` drops the attention mask (gpt). For gpt and opt the
prefix occupies position slots (their positions continue after the cache), so
``num_prefix_tokens + max_length`` must fit in ``max_position_embeddings``.
"""

from __future__ import annotations

import os
from typing import Any

import paddle
from paddlenlp.peft import LoRAConfig, LoRAModel, PrefixConfig, PrefixModelForCausalLM
from paddlenlp.peft.lora.lora_layers import LoRALinear
from paddlenlp.utils.log import logger

from llm.errors import ConfigError, ModelError
from llm.fileio import try_read_json
from llm.model.families import FamilySpec, family_of, prefix_geometry

LORA_FILES = ("lora_model_state.pdparams", "lora_model_state.safetensors.index.json")
PREFIX_FILES = ("prefix_model_state.pdparams", "prefix_model_state.safetensors.index.json")


class PrefixModel(PrefixModelForCausalLM):
    """``PrefixModelForCausalLM`` fixed for gpt/opt.

    Generation works when the base model drops the attention mask (gpt), and explicit ``position_ids``
    (zero-padding batches) are shifted by the prefix length for families whose default positions continue
    after the cache (gpt), so packed and unpacked batches see the same positions.
    """

    def __init__(
        self, model: paddle.nn.Layer, prefix_config: PrefixConfig, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(model, prefix_config, *args, **kwargs)
        self._shift_positions = family_of(model).prefix_shifts_positions

    def _shifted(self, position_ids: paddle.Tensor | None) -> paddle.Tensor | None:
        if position_ids is None or not self._shift_positions:
            return position_ids
        return position_ids + self.prefix_config.num_prefix_tokens

    def forward(
        self, input_ids: paddle.Tensor, attention_mask: paddle.Tensor | None = None, **kwargs: Any
    ) -> Any:
        """Run the base model with the prefix as its past key/values."""
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = self._shifted(kwargs["position_ids"])
        return super().forward(input_ids, attention_mask=attention_mask, **kwargs)

    def _prefix_mask(self, attention_mask: paddle.Tensor, input_shape: list[int]) -> paddle.Tensor:
        n = self.prefix_config.num_prefix_tokens
        if self.pad_attention_mask is not None:
            return self.pad_attention_mask(input_shape, n, attention_mask)
        shape = list(attention_mask.shape)
        if len(shape) not in (2, 3, 4):
            raise ValueError(f"Unexpected attention_mask shape: {shape}")
        shape[-1] = n
        ones = paddle.ones(shape, dtype=attention_mask.dtype)
        return paddle.concat([ones, attention_mask], axis=-1)

    def _prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        model_kwargs = self.model_prepare_inputs_for_generation(*args, **kwargs)
        batch_size = model_kwargs["input_ids"].shape[0]
        if model_kwargs.get("attention_mask") is not None:
            input_shape = list(model_kwargs["input_ids"].shape)
            model_kwargs["attention_mask"] = self._prefix_mask(model_kwargs["attention_mask"], input_shape)
        if model_kwargs.get("position_ids") is not None:
            model_kwargs["position_ids"] = self._shifted(model_kwargs["position_ids"])
        key = "past_key_values" if "past_key_values" in self.forward_keys else "cache"
        if model_kwargs.get(key) is None:
            model_kwargs[key] = self._get_past_key_values(batch_size)
        return model_kwargs


# --------------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------------
def count_parameters(model: paddle.nn.Layer) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter is trainable when ``stop_gradient`` is False."""
    trainable = total = 0
    for param in model.parameters():
        n = int(param.size)
        total += n
        if not param.stop_gradient:
            trainable += n
    return trainable, total


def print_trainable_parameters(model: paddle.nn.Layer) -> tuple[int, int]:
    """Log ``Frozen / Trainable / Total`` parameter counts (PaddleNLP's format) and return (trainable, total)."""
    trainable, total = count_parameters(model)
    frozen = total - trainable
    share = trainable / total if total else 0.0
    logger.info(
        f"Frozen parameters: {frozen:.2e} || Trainable parameters:{trainable:.2e} || "
        f"Total parameters:{total:.2e}|| Trainable:{share:.2%}"
    )
    return trainable, total


# --------------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------------
def lora_alpha_for(rank: int, rslora: bool) -> int:
    """PaddleNLP's rule: ``lora_alpha = 2 * r``, or 4 with rsLoRA."""
    return 4 if rslora else 2 * int(rank)


def make_lora_config(model: paddle.nn.Layer, model_args: Any, dtype: str = "float32") -> LoRAConfig:
    """The ``LoRAConfig`` finetune_generation.py would build for ``model`` and ``model_args``."""
    spec = family_of(model)
    rank = int(getattr(model_args, "lora_rank", 8))
    if rank <= 0:
        raise ConfigError(f"lora_rank must be a positive integer, got {rank}")
    rslora = bool(getattr(model_args, "rslora", False))
    return LoRAConfig(
        target_modules=list(spec.lora_target_modules),
        r=rank,
        lora_alpha=lora_alpha_for(rank, rslora),
        rslora=rslora,
        lora_plus_scale=float(getattr(model_args, "lora_plus_scale", 1.0)),
        pissa=bool(getattr(model_args, "pissa", False)),
        merge_weights=False,
        tensor_parallel_degree=int(getattr(model_args, "tensor_parallel_degree", -1) or -1),
        dtype=dtype,
        base_model_name_or_path=getattr(model_args, "model_name_or_path", None),
        use_quick_lora=bool(getattr(model_args, "use_quick_lora", False)),
    )


def _require_files(path: str | None, what: str, config_name: str, weight_files: tuple[str, ...]) -> str:
    if not path or not os.path.isdir(path):
        raise ModelError(
            f"{what} directory not found: '{path}' (expected {config_name} and {weight_files[0]})"
        )
    if not os.path.isfile(os.path.join(path, config_name)):
        raise ModelError(f"{path}: no {config_name} (expected {config_name} and {weight_files[0]})")
    if not any(os.path.isfile(os.path.join(path, f)) for f in weight_files):
        raise ModelError(f"{path}: no {what} weights (expected {' or '.join(weight_files)})")
    return path


def adapter_base_hint(path: str, config_name: str) -> str:
    """`` (its CONFIG names base model 'X')`` from an adapter's config, for mismatch errors (else ``""``)."""
    base = try_read_json(os.path.join(path, config_name)).get("base_model_name_or_path")
    return f" (its {config_name} names base model '{base}')" if base else ""


def _lora_layer_count(model: paddle.nn.Layer) -> int:
    from llm.lowbit import LowBitLoRALinear

    return sum(1 for layer in model.sublayers() if isinstance(layer, LoRALinear | LowBitLoRALinear))


def _lora_model_class(model: paddle.nn.Layer) -> type[LoRAModel]:
    """paddlenlp's ``LoRAModel``, or :class:`llm.lowbit.LowBitLoRAModel` for a low-bit base."""
    from llm.lowbit import LowBitLoRAModel, has_low_bit_layers

    return LowBitLoRAModel if has_low_bit_layers(model) else LoRAModel


def load_lora(model: paddle.nn.Layer, lora_path: str) -> LoRAModel:
    """``LoRAModel.from_pretrained`` with clear errors for missing files or an adapter for another family."""
    family_of(model).check("lora")
    _require_files(lora_path, "LoRA", "lora_config.json", LORA_FILES)
    lora_model = _lora_model_class(model).from_pretrained(model=model, lora_path=lora_path)
    if _lora_layer_count(lora_model) == 0:
        raise ModelError(
            f"{lora_path}: the adapter's target_modules match no layer of this {family_of(model).name} model"
        )
    return lora_model


def apply_lora(model: paddle.nn.Layer, model_args: Any, dtype: str = "float32") -> LoRAModel:
    """Wrap ``model`` in a new or loaded (``model_args.lora_path``) ``LoRAModel``."""
    family_of(model).check("lora")
    lora_path = getattr(model_args, "lora_path", None)
    if lora_path:
        return load_lora(model, lora_path)
    lora_model = _lora_model_class(model)(model, make_lora_config(model, model_args, dtype))
    if _lora_layer_count(lora_model) == 0:
        raise ConfigError(f"no LoRA target module matched in the {family_of(model).name} model")
    return lora_model


# --------------------------------------------------------------------------------------------------
# prefix tuning
# --------------------------------------------------------------------------------------------------
def make_prefix_config(
    model: paddle.nn.Layer, num_prefix_tokens: int = 128, dtype: str = "float32"
) -> PrefixConfig:
    """The ``PrefixConfig`` for ``model`` (GQA-aware: KV-group count for llama/mixtral/chatglm_v2)."""
    spec = family_of(model)
    if int(num_prefix_tokens) <= 0:
        raise ConfigError(f"num_prefix_tokens must be a positive integer, got {num_prefix_tokens}")
    geometry = prefix_geometry(spec.name, model.config)
    return PrefixConfig(num_prefix_tokens=int(num_prefix_tokens), dtype=dtype, **geometry)


def load_prefix(model: paddle.nn.Layer, prefix_path: str) -> PrefixModel:
    """``PrefixModel.from_pretrained`` with the family's post-processing and clear file errors."""
    spec: FamilySpec = family_of(model)
    spec.check("prefix")
    _require_files(prefix_path, "prefix", "prefix_config.json", PREFIX_FILES)
    return PrefixModel.from_pretrained(
        model=model, prefix_path=prefix_path, postprocess_past_key_value=spec.prefix_postprocess
    )


def apply_prefix(model: paddle.nn.Layer, model_args: Any, dtype: str = "float32") -> PrefixModel:
    """Wrap ``model`` in a new or loaded (``model_args.prefix_path``) :class:`PrefixModel`."""
    spec = family_of(model)
    spec.check("prefix")
    prefix_path = getattr(model_args, "prefix_path", None)
    if prefix_path:
        return load_prefix(model, prefix_path)
    config = make_prefix_config(model, getattr(model_args, "num_prefix_tokens", 128), dtype)
    return PrefixModel(model=model, prefix_config=config, postprocess_past_key_value=spec.prefix_postprocess)


def apply_peft(model: paddle.nn.Layer, model_args: Any, dtype: str = "float32") -> paddle.nn.Layer:
    """Apply LoRA or prefix tuning as ``model_args`` asks (or nothing), log the trainable counts, return the model.

    Unsupported family/mode pairs and asking for both LoRA and prefix tuning raise :class:`ConfigError`.
    """
    lora = bool(getattr(model_args, "lora", False))
    prefix = bool(getattr(model_args, "prefix_tuning", False))
    if lora and prefix:
        raise ConfigError("lora and prefix_tuning cannot be enabled together; choose one")
    if lora:
        model = apply_lora(model, model_args, dtype)
    elif prefix:
        model = apply_prefix(model, model_args, dtype)
    else:
        family_of(model).check("sft")
    print_trainable_parameters(model)
    return model
