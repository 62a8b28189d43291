"""LoRA on a low-bit base: paddlenlp's ``LoRAModel`` with :class:`~llm.lowbit.layers.LowBitLinear` targets.

:class:`LowBitLoRAModel` wraps every target :class:`LowBitLinear` in a :class:`LowBitLoRALinear` (paddlenlp's
``LoRAModel`` only knows float and its own GPU-only quantized linears) and defers to paddlenlp for everything else:
saving (only the trainable LoRA weights, plus the model config with its ``quantization_config``), loading an
adapter (``from_pretrained``), trainable-parameter marking.
"""

from __future__ import annotations

from typing import Any

from paddlenlp.peft import LoRAModel

from llm.errors import ConfigError
from llm.lowbit.layers import LowBitLinear, LowBitLoRALinear
from llm.quant.model import get_layer, set_layer


class LowBitLoRAModel(LoRAModel):
    """``LoRAModel`` that also wraps :class:`LowBitLinear` layers (see the module docstring)."""

    def _find_and_replace_module(
        self, model: Any, module_name: str, lora_config: Any, enable_lora: Any
    ) -> None:
        parent_name = module_name.rpartition(".")[0]
        parent = get_layer(model, parent_name) if parent_name else model
        module = get_layer(model, module_name)
        if isinstance(parent, LowBitLoRALinear) or isinstance(module, LowBitLoRALinear):
            return  # the base inside a wrapped layer (target regexes match "q_proj.base" too)
        if not isinstance(module, LowBitLinear):
            super()._find_and_replace_module(model, module_name, lora_config, enable_lora)
            return
        if enable_lora is not None:
            raise ConfigError("enable_lora_list (merged QKV LoRA) is not available on a low-bit base")
        if lora_config.pissa:
            raise ConfigError(
                "pissa needs the float base weights (their SVD); it cannot run on a low-bit base"
            )
        layer = LowBitLoRALinear(
            module,
            r=lora_config.r,
            lora_alpha=lora_config.lora_alpha,
            lora_dropout=lora_config.lora_dropout,
            rslora=lora_config.rslora,
            lora_plus_scale=lora_config.lora_plus_scale,
        )
        set_layer(model, module_name, layer)
        self.quantized = True

    def mark_only_lora_as_trainable(self) -> None:
        """paddlenlp's marking, then the LoRA weights of the low-bit layers (paddlenlp freezes unknown layers)."""
        super().mark_only_lora_as_trainable()
        for layer in self.model.sublayers():
            if isinstance(layer, LowBitLoRALinear):
                layer.lora_A.stop_gradient = False
                layer.lora_B.stop_gradient = False
                if layer.bias is not None and self.lora_config.trainable_bias in ("lora", "all"):
                    layer.bias.stop_gradient = False


def has_low_bit_layers(model: Any) -> bool:
    """Whether ``model`` holds :class:`LowBitLinear` layers (a base loaded with ``weight_quantize_algo``)."""
    return any(isinstance(layer, LowBitLinear) for layer in model.sublayers())
