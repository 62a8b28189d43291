"""LoRA merge (:mod:`llm.merge.lora`) and tensor/pipeline-parallel split and merge (:mod:`llm.merge.tp`)."""

from llm.merge.lora import (
    BASE_TRANSFORMS,
    MergeReport,
    base_transform_for,
    merge_lora_checkpoint,
    register_base_transform,
)
from llm.merge.tp import find_shards, merge_tensor_parallel, split_tensor_parallel

__all__ = [
    "BASE_TRANSFORMS",
    "MergeReport",
    "base_transform_for",
    "find_shards",
    "merge_lora_checkpoint",
    "merge_tensor_parallel",
    "register_base_transform",
    "split_tensor_parallel",
]
