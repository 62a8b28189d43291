"""Model loading, per-family support, PEFT (LoRA / prefix tuning) and NEFTune."""

from llm.model.families import (
    FAMILIES,
    FamilySpec,
    family_of,
    get_family,
    prefix_geometry,
    tiny_config,
    unwrap_model,
)
from llm.model.loading import (
    apply_family_fixes,
    batch_to_tensors,
    build_model,
    causal_lm_loss,
    forward_logits,
    forward_loss,
    load_model,
)
from llm.model.neftune import NEFTuneHandle, enable_neftune
from llm.model.peft import (
    PrefixModel,
    apply_lora,
    apply_peft,
    apply_prefix,
    count_parameters,
    load_lora,
    load_prefix,
    make_lora_config,
    make_prefix_config,
    print_trainable_parameters,
)

__all__ = [
    "FAMILIES",
    "NEFTuneHandle",
    "PrefixModel",
    "apply_lora",
    "apply_peft",
    "apply_prefix",
    "count_parameters",
    "enable_neftune",
    "load_lora",
    "load_prefix",
    "make_lora_config",
    "make_prefix_config",
    "print_trainable_parameters",
    "unwrap_model",
    "FamilySpec",
    "apply_family_fixes",
    "batch_to_tensors",
    "build_model",
    "causal_lm_loss",
    "family_of",
    "forward_logits",
    "forward_loss",
    "get_family",
    "load_model",
    "prefix_geometry",
    "tiny_config",
]
