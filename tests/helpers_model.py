"""Test helpers: ``ModelArgument`` stand-ins, tiny saved models and saved LoRA / prefix adapters."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import numpy as np
import paddle

import llm  # noqa: F401  (zlib fix before anything else)


def model_args(mode: str = "sft", **overrides: object) -> types.SimpleNamespace:
    """ModelArgument stand-in with the spec defaults (num_prefix_tokens shrunk for speed)."""
    args = dict(
        model_name_or_path="tiny",
        lora=mode == "lora",
        lora_path=None,
        lora_rank=8,
        rslora=False,
        lora_plus_scale=1.0,
        pissa=False,
        use_quick_lora=False,
        prefix_tuning=mode == "prefix",
        prefix_path=None,
        num_prefix_tokens=8,
        neftune=False,
        neftune_noise_alpha=5.0,
    )
    args.update(overrides)
    return types.SimpleNamespace(**args)


def save_tiny_model(path: Path, family: str, tokenizer: Any, seed: int = 0, **overrides: object) -> Path:
    """Save a tiny random ``family`` model (safetensors) sized and with special ids for ``tokenizer``.

    Only weights and ``config.json`` are written; the caller adds the tokenizer files it wants.
    """
    from llm.model import build_model, tiny_config

    config = tiny_config(
        family,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    with paddle.utils.unique_name.guard():
        model = build_model(config, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


def save_lora_adapter(model_dir: Path, out: Path, rank: int = 4) -> Path:
    """A rank-``rank`` LoRA adapter for the model in ``model_dir`` whose ``B`` is random (so it changes logits)."""
    from paddlenlp.peft import LoRAModel

    from llm.model import load_model, make_lora_config

    model = load_model(str(model_dir))
    lora = LoRAModel(model, make_lora_config(model, types.SimpleNamespace(lora_rank=rank)))
    rng = np.random.default_rng(0)
    for name, param in lora.model.named_parameters():
        if "lora_B" in name:
            param.set_value(rng.normal(0, 0.5, param.shape).astype("float32"))
    lora.save_pretrained(str(out))
    return out


def save_prefix_adapter(model_dir: Path, out: Path, num_prefix_tokens: int = 4) -> Path:
    """An (untrained) prefix adapter for the llama model in ``model_dir``."""
    from llm.model import PrefixModel, get_family, load_model, make_prefix_config

    model = load_model(str(model_dir))
    prefix = PrefixModel(
        model=model,
        prefix_config=make_prefix_config(model, num_prefix_tokens),
        postprocess_past_key_value=get_family("llama").prefix_postprocess,
    )
    prefix.save_pretrained(str(out))
    return out


def finetune_argv(model_dir: Path, out: Path, data: Path, *extra: str, **values: object) -> list[str]:
    """CLI argv for ``llm.train.finetune.run`` on a tiny model: quiet, seeded, short lengths, ``--do_train``.

    ``values`` override or add ``--key value`` pairs; ``extra`` is appended as given.
    """
    flags: dict[str, object] = {
        "model_name_or_path": model_dir,
        "dataset_name_or_path": data,
        "output_dir": out,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 8,
        "warmup_steps": 0,
        "logging_steps": 1,
        "src_length": 32,
        "max_length": 64,
        "disable_tqdm": "true",
        "report_to": "none",
        "seed": 1,
    }
    flags.update(values)
    argv = [part for key, value in flags.items() for part in (f"--{key}", str(value))]
    return [*argv, "--do_train", *extra]
