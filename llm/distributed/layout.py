"""The parallel layout of a training run, checked before any weights load, and the ``--dry_run`` report.

World size = dp x pp x sharding x tp (sequence parallel reuses the tp group). Ranks are laid out as paddle 2.6
fleet's hybrid topology with paddlenlp's default order ``["dp", "pp", "sharding", "mp"]`` (the last axis varies
fastest: tensor-parallel peers are adjacent ranks). The checks mirror what paddlenlp 2.8.1 / paddle 2.6 would
otherwise fail on deep inside ``fleet.init`` or the model's parallel layers.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.errors import ConfigError

logger = logging.getLogger(__name__)

AXES = ("dp", "pp", "sharding", "tp")
#: paddlenlp 2.8.1 model families with a ``*ForCausalLMPipe`` class (pipeline parallel)
PIPELINE_FAMILIES = ("llama", "qwen", "gpt")
#: families whose paddlenlp model has tensor-parallel mappings (``_get_tensor_parallel_mappings``)
TENSOR_PARALLEL_FAMILIES = ("llama", "qwen", "chatglm", "bloom", "gpt", "opt", "mixtral", "glm")


def _requested(training_args: Any, name: str, default: Any = None) -> Any:
    req = dict(getattr(training_args, "requested", None) or {})
    return req[name] if name in req else getattr(training_args, name, default)


def _stage(training_args: Any) -> str | None:
    value = _requested(training_args, "sharding", "")
    if isinstance(value, list | tuple):
        names = [str(getattr(v, "value", v)) for v in value]
    else:
        names = str(value or "").split()
    stages = sorted(n for n in names if n in ("stage1", "stage2", "stage3"))
    return stages[-1] if stages else None


@dataclass(frozen=True)
class ParallelLayout:
    """Degrees of every axis; ``planned`` when the run was not launched with that many processes."""

    world_size: int
    dp: int
    pp: int
    sharding: int
    tp: int
    stage: str | None
    planned: bool = False

    @property
    def dims(self) -> tuple[int, int, int, int]:
        return (self.dp, self.pp, self.sharding, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """The (dp, pp, sharding, tp) coordinates of ``rank``."""
        return dict(zip(AXES, (int(c) for c in np.unravel_index(rank, self.dims))))

    def groups(self, axis: str) -> list[list[int]]:
        """The rank groups that communicate along ``axis`` (all other coordinates fixed)."""
        ranks = np.arange(self.world_size).reshape(self.dims)
        moved = np.moveaxis(ranks, AXES.index(axis), -1)
        return [list(map(int, row)) for row in moved.reshape(-1, moved.shape[-1])]


def plan_layout(training_args: Any, world_size: int | None = None) -> ParallelLayout:
    """The layout the requested degrees give on ``world_size`` ranks (default: the launched world).

    A dry run in one process plans for the product of the requested degrees (data parallel 1).
    """
    tp = max(int(_requested(training_args, "tensor_parallel_degree", -1) or -1), 1)
    pp = max(int(_requested(training_args, "pipeline_parallel_degree", -1) or -1), 1)
    stage = _stage(training_args)
    sharding_req = int(_requested(training_args, "sharding_parallel_degree", -1) or -1)
    planned = False
    if world_size is None:
        import paddle

        world_size = paddle.distributed.get_world_size()
        if world_size == 1 and getattr(training_args, "dry_run", False):
            world_size = tp * pp * max(sharding_req, 1)
            planned = world_size > 1
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor_parallel_degree {tp} x pipeline_parallel_degree "
            f"{pp}; launch a multiple of {tp * pp} processes or change the degrees"
        )
    sharding = sharding_req if sharding_req > 0 else (world_size // (tp * pp) if stage else 1)
    if world_size % (tp * pp * sharding):
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor {tp} x pipeline {pp} x sharding {sharding} "
            f"parallel degrees (data parallel takes the rest); launch a multiple of {tp * pp * sharding} "
            "processes or change sharding_parallel_degree"
        )
    if stage and sharding == 1:
        logger.warning(
            "sharding %s with sharding_parallel_degree 1 shards nothing (paddlenlp drops it)", stage
        )
        stage = None
    return ParallelLayout(world_size, world_size // (tp * pp * sharding), pp, sharding, tp, stage, planned)


def _config_value(config: dict, *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_geometry(config: dict) -> dict[str, int | None]:
    """Heads, KV heads, FFN width, vocab and layers from a config.json (each family's own key names)."""
    heads = _config_value(config, "num_attention_heads", "n_head", "num_heads")
    kv = _config_value(config, "num_key_value_heads", "multi_query_group_num") or heads
    if config.get("multi_query_attention") is False:
        kv = heads
    return {
        "heads": heads,
        "kv_heads": kv,
        "ffn": _config_value(config, "intermediate_size", "ffn_hidden_size", "ffn_dim", "n_inner"),
        "vocab": _config_value(config, "vocab_size", "padded_vocab_size"),
        "layers": _config_value(config, "num_hidden_layers", "num_layers", "n_layer"),
    }


def check_layout(
    layout: ParallelLayout, model_config: dict, training_args: Any, model_args: Any = None
) -> None:
    """Refuse layouts the model cannot be split into; one :class:`ConfigError` sentence with the fix."""
    from llm.model import family_of

    family = family_of(model_config).name
    geo = model_geometry(model_config)
    tp, pp = layout.tp, layout.pp
    if tp > 1:
        if family not in TENSOR_PARALLEL_FAMILIES:
            raise ConfigError(
                f"tensor parallel is not available for {family} in paddlenlp 2.8.1 (it is for "
                f"{', '.join(TENSOR_PARALLEL_FAMILIES)}); set --tensor_parallel_degree 1"
            )
        for key, what in (("heads", "num_attention_heads"), ("ffn", "FFN width")):
            if geo[key] and geo[key] % tp:
                raise ConfigError(
                    f"{what} {geo[key]} is not divisible by tensor_parallel_degree {tp}: each rank holds a "
                    f"1/{tp} slice; choose a tensor_parallel_degree dividing {geo[key]}"
                )
        kv = geo["kv_heads"]
        if kv and kv % tp:  # paddlenlp replicates the key/value heads when tp is a multiple of their number
            if tp % kv or getattr(model_args, "fuse_attention_qkv", False):
                raise ConfigError(
                    f"{kv} key/value heads can neither be split over tensor_parallel_degree {tp} nor replicated "
                    "(tp must divide them, or be a multiple of them without fuse_attention_qkv); choose "
                    f"a tensor_parallel_degree that divides {kv} or is a multiple of it"
                )
            logger.warning(
                "%d key/value heads < tensor_parallel_degree %d: ranks keep copies of them", kv, tp
            )
        if geo["vocab"] and geo["vocab"] % tp:
            logger.warning(
                "vocab_size %d is not divisible by tensor_parallel_degree %d: paddlenlp then keeps the whole "
                "embedding and LM head on every rank (pad vocab_size to a multiple of %d to split them)",
                geo["vocab"],
                tp,
                tp,
            )
    if getattr(model_args, "sequence_parallel", False) and tp == 1:
        raise ConfigError(
            "sequence_parallel needs tensor parallel; set --tensor_parallel_degree > 1 or drop it"
        )
    if pp > 1:
        if family not in PIPELINE_FAMILIES:
            raise ConfigError(
                f"pipeline parallel is not available for {family} in paddlenlp 2.8.1 (it is for "
                f"{', '.join(PIPELINE_FAMILIES)}); set --pipeline_parallel_degree 1"
            )
        vpp = max(int(getattr(model_args, "virtual_pp_degree", 1) or 1), 1)
        if geo["layers"] and geo["layers"] % (pp * vpp):
            raise ConfigError(
                f"num_hidden_layers {geo['layers']} is not divisible by pipeline_parallel_degree {pp}"
                + (f" x virtual_pp_degree {vpp}" if vpp > 1 else "")
                + "; every stage needs the same number of layers"
            )
        if layout.stage in ("stage2", "stage3"):
            raise ConfigError(
                f"pipeline parallel is not compatible with sharding {layout.stage} (paddlenlp 2.8.1); use "
                "--sharding stage1"
            )
        if getattr(training_args, "gradient_accumulation_steps", 1) < pp:
            logger.warning(
                "gradient_accumulation_steps %s < pipeline_parallel_degree %s: the pipeline is never full",
                training_args.gradient_accumulation_steps,
                pp,
            )


def _parameter_counts(model_config: dict) -> tuple[dict[str, int], int]:
    """Parameters per part ('embedding', 'layer', 'head') of the family's model, built lazily (no memory)."""
    import paddle

    from llm.model import family_of

    spec = family_of(model_config)
    config = spec.config_class.from_dict(dict(model_config))
    with paddle.LazyGuard():
        model = spec.model_class(config)
    layers = model_geometry(model_config)["layers"] or 1
    parts = {"embedding": 0, "layer": 0, "head": 0}
    for name, param in model.named_parameters():
        size = int(np.prod(param.shape))
        pieces = name.split(".")
        if any(p.isdigit() for p in pieces):
            parts["layer"] += size
        elif any(key in name for key in ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")):
            parts["embedding"] += size
        else:
            parts["head"] += size
    parts["layer"] //= layers
    return parts, layers


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.2f} MiB"


def format_layout(
    layout: ParallelLayout, model_config: dict, training_args: Any, model_args: Any = None
) -> str:
    """The dry-run report: degrees, rank coordinates, groups, per-rank parameters and memory estimate."""
    lines = [
        f"parallel layout: world size {layout.world_size} = dp {layout.dp} x pp {layout.pp} x sharding "
        f"{layout.sharding}{' (' + layout.stage + ')' if layout.stage else ''} x tp {layout.tp}"
    ]
    if layout.planned:
        lines.append(
            f"(planned for {layout.world_size} ranks; launch with --nproc_per_node / --gpus {layout.world_size})"
        )
    batch = getattr(training_args, "per_device_train_batch_size", 1)
    accumulation = getattr(training_args, "gradient_accumulation_steps", 1)
    lines.append(
        f"global batch = {batch} per device x {accumulation} accumulation x {layout.dp * layout.sharding} "
        f"data ranks (dp x sharding) = {batch * accumulation * layout.dp * layout.sharding} sequences per step"
    )
    lines += ["", "| rank | dp | pp | sharding | tp |", "|---|---|---|---|---|"]
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        lines.append(f"| {rank} | {c['dp']} | {c['pp']} | {c['sharding']} | {c['tp']} |")
    lines.append("")
    for axis in AXES:
        if layout.dims[AXES.index(axis)] > 1:
            lines.append(f"{axis} groups: {layout.groups(axis)}")

    parts, layers = _parameter_counts(model_config)
    total = parts["embedding"] + parts["head"] + parts["layer"] * layers
    half = getattr(training_args, "fp16_opt_level", "O1") == "O2" and (
        getattr(training_args, "bf16", False) or getattr(training_args, "fp16", False)
    )
    width = 2 if half else 4
    trainable_note = "full training"
    if getattr(model_args, "lora", False) or getattr(model_args, "prefix_tuning", False):
        trainable_note = "full training (LoRA / Prefix train far fewer: this is an upper bound)"
    lines += [
        "",
        f"parameters: {total:,} ({layers} layers); memory estimate per rank, {trainable_note}, no activations:",
    ]
    lines += [
        "| pp stage | parameters per tp rank | weights | grads | optimizer (AdamW) | total |",
        "|---|---|---|---|---|---|",
    ]
    per_stage = layers // layout.pp
    for stage in range(layout.pp):
        count = parts["layer"] * per_stage
        count += parts["embedding"] if stage == 0 else 0
        count += parts["head"] if stage == layout.pp - 1 else 0
        count = math.ceil(count / layout.tp)
        weights, grads = count * width, count * width
        optimizer = count * (8 + (4 if half else 0))  # two fp32 moments (+ fp32 master weights)
        optimizer /= layout.sharding if layout.stage else 1
        grads /= layout.sharding if layout.stage in ("stage2", "stage3") else 1
        weights /= layout.sharding if layout.stage == "stage3" else 1
        lines.append(
            f"| {stage} | {count:,} | {_gib(weights)} | {_gib(grads)} | {_gib(optimizer)} | "
            f"{_gib(weights + grads + optimizer)} |"
        )
    return "\n".join(lines)


def read_model_config(model_name_or_path: str) -> dict:
    """The model's config.json (never its weights)."""
    from llm.config.checks import resolve_model_dir
    from llm.fileio import read_json

    return read_json(os.path.join(resolve_model_dir(model_name_or_path), "config.json"), "config")


def check_parallel(training_args: Any, model_args: Any) -> ParallelLayout | None:
    """Plan and check the layout of a launched (or dry) run; prints the report and returns it for a dry run.

    A single process that is not a dry run has nothing to check (paddlenlp resets the degrees there; on CPU
    :func:`llm.config.checks.check_device_support` has already refused GPU-only degrees).
    """
    import paddle

    dry = bool(getattr(training_args, "dry_run", False))
    if paddle.distributed.get_world_size() == 1 and not dry:
        return None
    config = read_model_config(model_args.model_name_or_path)
    layout = plan_layout(training_args)
    check_layout(layout, config, training_args, model_args)
    if dry:
        print(format_layout(layout, config, training_args, model_args))
        if not paddle.is_compiled_with_cuda() and (
            layout.tp > 1 or layout.pp > 1 or layout.stage in ("stage2", "stage3")
        ):
            print(
                "note: this layout needs GPUs (paddle 2.6 runs only data parallel and sharding stage1 on CPU)"
            )
    return layout
