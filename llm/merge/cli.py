"""Command lines of ``merge_lora_params.py`` and ``merge_tp_params.py`` (PaddleNLP 2.8 flag names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import paddle

from llm.config.parser import parse_arguments
from llm.errors import ConfigError, exit_on_user_error


def _set_device(device: str) -> None:
    if device == "gpu" and not paddle.is_compiled_with_cuda():
        raise ConfigError("--device gpu needs a CUDA build of paddle; use --device cpu")
    paddle.set_device(device)


@dataclasses.dataclass
class MergeLoraArguments:
    """``merge_lora_params.py`` arguments."""

    lora_path: str = dataclasses.field(metadata={"help": "directory with lora_config.json + lora weights"})
    merge_lora_model_path: str | None = dataclasses.field(
        default=None, metadata={"help": "output directory for the merged model"}
    )
    merge_model_path: str | None = dataclasses.field(
        default=None, metadata={"help": "old (v2.7) name of --merge_lora_model_path"}
    )
    model_name_or_path: str | None = dataclasses.field(
        default=None, metadata={"help": "base model (default: base_model_name_or_path in lora_config.json)"}
    )
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or gpu", "choices": ["cpu", "gpu"]})
    safe_serialization: bool = dataclasses.field(
        default=True, metadata={"help": "write model.safetensors (true) or model_state.pdparams (false)"}
    )
    low_gpu_mem: bool = dataclasses.field(
        default=False, metadata={"help": "accepted for compatibility; the merge always works layer by layer"}
    )
    verify_tolerance: float = dataclasses.field(
        default=1e-5, metadata={"help": "max |merged - unmerged| logits, relative to max(1, max |logit|)"}
    )
    overwrite: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "write into an existing non-empty output (only files this toolkit wrote are replaced)"
        },
    )

    def __post_init__(self) -> None:
        new, old = self.merge_lora_model_path, self.merge_model_path
        if new and old and new != old:
            raise ConfigError("--merge_lora_model_path and its alias --merge_model_path disagree; pass one")
        self.merge_lora_model_path = new or old
        if not self.merge_lora_model_path:
            raise ConfigError(
                "missing required argument 'merge_lora_model_path' (or its alias 'merge_model_path')"
            )


@exit_on_user_error
def merge_lora_main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``merge_lora_params.py``."""
    import llm.merge.lora as lora

    (args,) = parse_arguments(MergeLoraArguments, argv)
    _set_device(args.device)
    report = lora.merge_lora_checkpoint(
        lora_path=args.lora_path,
        output_path=str(args.merge_lora_model_path),
        model_name_or_path=args.model_name_or_path,
        safe_serialization=args.safe_serialization,
        tolerance=args.verify_tolerance,
        overwrite=args.overwrite,
    )
    print(
        f"merged {report.merged_layers} LoRA layers of {report.base_model} into {report.output_path} "
        f"(verified: max |logits diff| {report.max_abs_diff:.2e}, {report.changed_weights} weights changed)"
    )


@dataclasses.dataclass
class MergeTPArguments:
    """``merge_tp_params.py`` arguments."""

    model_name_or_path: str = dataclasses.field(metadata={"help": "checkpoint directory with the shards"})
    output_path: str | None = dataclasses.field(
        default=None, metadata={"help": "output directory (default: write next to the shards)"}
    )
    action: str = dataclasses.field(
        default="merge", metadata={"help": "merge shards or split a model", "choices": ["merge", "split"]}
    )
    tensor_parallel_degree: int = dataclasses.field(
        default=0, metadata={"help": "merge: checked against the shards if > 0; split: number of tp shards"}
    )
    pipeline_parallel_degree: int = dataclasses.field(
        default=0, metadata={"help": "merge: checked against the shards if > 0; split: number of pp stages"}
    )
    device: str = dataclasses.field(default="cpu", metadata={"help": "cpu or gpu", "choices": ["cpu", "gpu"]})
    safe_serialization: bool = dataclasses.field(
        default=True, metadata={"help": "write safetensors (true) or .pdparams (false)"}
    )
    overwrite: bool = dataclasses.field(
        default=False,
        metadata={"help": "replace an existing output (only files this toolkit wrote are replaced)"},
    )


@exit_on_user_error
def merge_tp_main(argv: Sequence[str] | None = None) -> str:
    """Entry point of ``merge_tp_params.py``."""
    from llm.merge.tp import find_shards, merge_tensor_parallel, split_tensor_parallel

    (args,) = parse_arguments(MergeTPArguments, argv)
    _set_device(args.device)
    src = args.model_name_or_path
    if args.action == "split":
        if not args.output_path:
            raise ConfigError("--action split needs --output_path")
        out = split_tensor_parallel(
            src,
            args.output_path,
            max(args.tensor_parallel_degree, 1),
            max(args.pipeline_parallel_degree, 1),
            args.safe_serialization,
            overwrite=args.overwrite,
        )
        print(f"wrote shards to {out}")
        return out
    shards = find_shards(src) if _is_dir(src) else {}
    for flag, index in (("tensor_parallel_degree", 0), ("pipeline_parallel_degree", 1)):
        want = getattr(args, flag)
        found = max((k[index] for k in shards), default=-1) + 1
        if want > 0 and shards and want != found:
            raise ConfigError(f"--{flag} {want} does not match the {found} shard(s) found in {src}")
    out = merge_tensor_parallel(src, args.output_path, args.safe_serialization, overwrite=args.overwrite)
    print(f"merged {len(shards)} shards into {out}")
    return out


def _is_dir(path: str) -> bool:
    import os

    if not os.path.isdir(path):
        raise ConfigError(f"model directory not found: '{path}'")
    return True
