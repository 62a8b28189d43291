"""LoRA / prefix adapters for inference: check them against the model; LoRA is merged in memory.

The LoRA merge is :func:`llm.merge.lora.merge_lora`: the same reading, shape check, base transform and
``W += A @ B * scaling`` (plain, rsLoRA or PiSSA scaling) as ``merge_lora_params.py``, without writing a
checkpoint. A prefix adapter's geometry is compared with the model before paddlenlp loads it.
"""

from __future__ import annotations

import os
from typing import Any

import paddle

from llm.errors import ModelError
from llm.fileio import read_json
from llm.merge.lora import merge_lora
from llm.model import family_of, load_prefix, prefix_geometry
from llm.model.peft import adapter_base_hint

__all__ = ["load_checked_prefix", "merge_lora"]


def load_checked_prefix(model: paddle.nn.Layer, prefix_path: str) -> Any:
    """``load_prefix`` after checking the adapter's geometry (layers, heads, hidden size) against the model."""
    config_file = os.path.join(prefix_path, "prefix_config.json")
    if os.path.isfile(config_file):
        saved = read_json(config_file)
        spec = family_of(model)
        wanted = prefix_geometry(spec.name, model.config)
        for key, value in wanted.items():
            if value is not None and saved.get(key) is not None and int(saved[key]) != int(value):
                raise ModelError(
                    f"{prefix_path}: the prefix adapter does not match this {spec.name} model"
                    f"{adapter_base_hint(prefix_path, 'prefix_config.json')}: {key} is {saved[key]} in the "
                    f"adapter but {value} in the model"
                )
    prefix_model = load_prefix(model, prefix_path)
    prefix_model.eval()
    return prefix_model
