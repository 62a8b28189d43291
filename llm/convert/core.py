"""Hugging Face <-> paddlenlp checkpoint conversion (library entry points).

Both directions read the source lazily and write safetensors **one source shard at a time**, computing each
output tensor just before it is written, so peak memory is about one shard (plus, for pickle-based inputs,
that shard's file). Output goes to a temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from typing import Any

import numpy as np
from tqdm import tqdm

from llm.convert.checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint
from llm.convert.rules import Step, apply, expected_targets, out_shape, plan
from llm.convert.shapes import check_tensors
from llm.convert.specs import ConvSpec, hf_ties, spec_for_hf, spec_for_paddle
from llm.convert.tensors import FLOAT_DTYPES, Pending, Tensor, cast, itemsize, to_float32, write_safetensors
from llm.errors import ModelError
from llm.fileio import read_json, write_json
from llm.outputs import check_output_path, staged_output

CONVERTER_VERSION = "llm-convert-v1"
DEFAULT_SHARD_SIZE = "10GB"  # paddlenlp's save_pretrained default
PROVENANCE_FILE = "conversion.json"


# --------------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------------
def check_dtype(dtype: str | None, allow_none: bool = False) -> str | None:
    if dtype is None and allow_none:
        return None
    dtype = str(dtype).replace("paddle.", "").replace("torch.", "")
    if dtype not in FLOAT_DTYPES:
        raise ModelError(f"unsupported dtype '{dtype}'; expected one of {', '.join(FLOAT_DTYPES)}")
    return dtype


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
    """Copy tokenizer / generation-config files (never code or weights) from ``src`` to ``dst``."""
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(dst, name))
            copied.append(name)
    return copied


def _zero_check(ckpt: Checkpoint, step: Step, source_name: str, spec: ConvSpec) -> None:
    tensor = ckpt.get(step.sources[0])
    if (to_float32(tensor) != 0).any():
        raise ModelError(
            f"cannot convert this {spec.name} checkpoint: '{source_name}' is non-zero, but paddlenlp 2.8.1 "
            f"{spec.family} attention/MLP layers have no bias (bias_attr=False), so the result would not be "
            "numerically exact" + (" (qwen2 needs paddlenlp >= 2.9)" if spec.name == "qwen2" else "")
        )


def parse_size(size: int | str) -> int:
    """``10GB`` / ``500MB`` / ``4KB`` / bytes -> bytes."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def _write_shards(
    ckpt: Checkpoint,
    steps: list[Step],
    dst: str,
    dtype: str | None,
    metadata: dict[str, str],
    progress: bool,
    desc: str,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> list[str]:
    """Write ``steps`` in source-file order into safetensors files of at most ``max_shard_size`` bytes.

    Each output tensor is computed just before it is written; a source file is released as soon as the
    writer moves past it, so only one source shard is ever loaded. Returns the written file names.
    """
    order = {name: i for i, name in enumerate(ckpt.files)}
    steps = sorted(steps, key=lambda s: order[ckpt.key_file[s.sources[0]]])
    limit = parse_size(max_shard_size)
    files: list[list[Pending]] = [[]]
    used = 0
    bar = tqdm(total=len(steps), desc=desc, unit="tensor", disable=not progress, leave=False)
    current: list[str | None] = [None]

    def make(step: Step, out_dtype: str) -> Tensor:
        src_file = ckpt.key_file[step.sources[0]]
        if current[0] not in (None, src_file):
            ckpt.release(str(current[0]))
        current[0] = src_file
        result = cast(apply(step, [ckpt.get(s) for s in step.sources]), out_dtype)
        bar.update(1)
        return result

    for step in steps:
        infos = [ckpt.info(s) for s in step.sources]
        src_dtype = infos[0][1]
        out_dtype = dtype if (dtype and src_dtype in (*FLOAT_DTYPES, "float64")) else src_dtype
        out_dtype = "float32" if out_dtype == "float64" else out_dtype
        shape = out_shape(step, [i[0] for i in infos])
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize(out_dtype)
        if files[-1] and used + nbytes > limit:
            files.append([])
            used = 0
        files[-1].append(Pending(step.target, shape, out_dtype, partial(make, step, out_dtype)))
        used += nbytes
    n = len(files)
    names = (
        ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    weight_map: dict[str, str] = {}
    total = 0
    try:
        for name, items in zip(names, files):
            total += write_safetensors(os.path.join(dst, name), items, metadata)
            weight_map.update({item.name: name for item in items})
    finally:
        bar.close()
        ckpt.close()
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(os.path.join(dst, "model.safetensors.index.json"), index)
    return names


# --------------------------------------------------------------------------------------------------
# Hugging Face -> paddlenlp
# --------------------------------------------------------------------------------------------------
def paddle_config_for(hf: dict[str, Any], dtype: str) -> tuple[ConvSpec, Any]:
    """(spec, paddlenlp config) for an HF ``config.json`` dict; refusals raise :class:`ModelError`."""
    from llm.model.families import get_family

    spec = spec_for_hf(hf)
    family = get_family(spec.family)
    config = family.config_class(**spec.to_paddle(hf))
    config.architectures = [family.model_class.__name__]
    config.dtype = dtype
    return spec, config


def convert_hf_to_paddle(
    src: str,
    dst: str,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
    cache: bool = False,
) -> str:
    """Convert the Hugging Face model directory ``src`` into a paddlenlp model directory ``dst``.

    Reads ``model.safetensors`` / ``pytorch_model.bin`` or their sharded forms (with the index JSON),
    writes ``config.json``, ``model.safetensors`` (sharded above ``max_shard_size``), tokenizer files and a
    ``conversion.json`` provenance record. Returns ``dst``. Unsupported architectures or settings, missing
    or unexpected tensors raise :class:`ModelError`. ``cache``: ``dst`` is the conversion cache, which may
    live inside ``src`` (see :mod:`llm.convert.cache`).
    """
    dtype = check_dtype(dtype)
    inputs = () if cache else (src,)
    check_output_path(dst, inputs=inputs, overwrite=overwrite)
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ModelError(f"{src}: no config.json (expected a Hugging Face model directory)")
    hf = read_json(os.path.join(src, "config.json"))
    spec, config = paddle_config_for(hf, dtype)
    tie = hf_ties(spec, hf)
    ckpt = open_checkpoint(src, paddle_layout=False)
    try:
        originals = {spec.normalize_hf(k): k for k in ckpt.keys()}
        ruleset = spec.ruleset("to_pd", tie)
        steps, unknown = plan(ruleset, list(originals), "to_pd", config)
        if unknown:
            raise ModelError(
                f"{src}: {len(unknown)} tensors do not belong to a {spec.name} model as paddlenlp 2.8.1 implements "
                f"it (e.g. '{originals[unknown[0]]}')"
            )
        layers, experts = spec.layers(config)
        produced = {s.target for s in steps}
        missing = [
            h for p, h in expected_targets(ruleset, config, layers, experts).items() if p not in produced
        ]
        if missing:
            raise ModelError(
                f"{src}: the checkpoint lacks {len(missing)} tensors of a {layers}-layer {spec.name} model "
                f"(e.g. '{missing[0]}'); is it complete?"
            )
        for step in steps:
            step.sources = [originals[s] for s in step.sources]
        check_tensors(ckpt, steps, spec.name, config, "to_pd", src)
        checks = [s for s in steps if s.op == "zero"]
        for step in checks:
            _zero_check(ckpt, step, step.sources[0], spec)
        with staged_output(dst, writer="convert", inputs=inputs, overwrite=overwrite) as tmp:
            _write_shards(
                ckpt,
                [s for s in steps if s.op != "zero"],
                tmp,
                dtype,
                {"format": "np"},
                progress,
                "hf->paddle",
                max_shard_size,
            )
            config.save_pretrained(tmp)
            copy_tokenizer_files(src, tmp)
            provenance = {"converter": CONVERTER_VERSION, "source": os.path.abspath(src), "spec": spec.name}
            provenance.update(dtype=dtype, tied_lm_head=tie, files=ckpt.files)
            write_json(os.path.join(tmp, PROVENANCE_FILE), provenance)
    finally:
        ckpt.close()
    return os.path.abspath(dst)


# --------------------------------------------------------------------------------------------------
# paddlenlp -> Hugging Face
# --------------------------------------------------------------------------------------------------
def export_paddle_to_hf(
    src: str,
    dst: str,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    max_shard_size: int | str = DEFAULT_SHARD_SIZE,
) -> str:
    """Export the paddlenlp model directory ``src`` (e.g. after SFT or a LoRA merge) to a Hugging Face
    directory ``dst``: ``model.safetensors`` (torch ``pt`` metadata, sharded above ``max_shard_size``), an HF
    ``config.json`` and the tokenizer files. ``dtype`` ``None`` keeps the stored dtype.

    qwen and chatglm2 exports need the original repository's ``*.py`` files (``trust_remote_code``).
    """
    from llm.model.families import family_of

    dtype = check_dtype(dtype, allow_none=True)
    check_output_path(dst, inputs=(src,), overwrite=overwrite)
    config_file = os.path.join(src, "config.json")
    if not os.path.isfile(config_file):
        raise ModelError(f"{src}: no config.json (expected a paddlenlp model directory)")
    raw = read_json(config_file)
    family = family_of(raw)
    spec = spec_for_paddle(family.name)
    config = family.config_class.from_pretrained(src)
    hf_config = spec.to_hf(config)
    ckpt = open_checkpoint(src, paddle_layout=True)
    try:
        ruleset = spec.ruleset("to_hf")
        keys = ckpt.keys()
        steps, unknown = plan(ruleset, keys, "to_hf", config)
        if unknown:
            raise ModelError(
                f"{src}: {len(unknown)} tensors have no Hugging Face {spec.name} counterpart (e.g. '{unknown[0]}')"
                + ("; merge LoRA weights first" if any("lora" in k for k in unknown) else "")
            )
        layers, experts = spec.layers(config)
        have = set(keys)
        missing = [p for p in expected_targets(ruleset, config, layers, experts, "to_hf") if p not in have]
        if missing:
            raise ModelError(f"{src}: the checkpoint lacks {len(missing)} tensors (e.g. '{missing[0]}')")
        check_tensors(ckpt, steps, spec.name, config, "to_hf", src)
        stored = ckpt.info(keys[0])[1]
        hf_config["torch_dtype"] = dtype or (stored if stored in FLOAT_DTYPES else "float32")
        with staged_output(dst, writer="convert", inputs=(src,), overwrite=overwrite) as tmp:
            _write_shards(ckpt, steps, tmp, dtype, {"format": "pt"}, progress, "paddle->hf", max_shard_size)
            write_json(os.path.join(tmp, "config.json"), hf_config, sort_keys=True)
            copy_tokenizer_files(src, tmp)
    finally:
        ckpt.close()
    return os.path.abspath(dst)
