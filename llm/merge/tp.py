"""Merge tensor-/pipeline-parallel shards into one model, and split a model into such shards.

Shard names follow paddlenlp: ``model_state.tp{NN}.pdparams``, ``model_state.pp{MM}.pdparams``,
``model_state.tp{NN}_pp{MM}.pdparams`` and the safetensors forms ``model.tp{NN}[_pp{MM}].safetensors``.
Sharded tensors are concatenated / split with the model class's ``_get_tensor_parallel_mappings(config,
is_split=...)``; every other tensor must be identical on all tensor-parallel ranks. Pipeline shards hold
disjoint parts of the state dict (a tensor present on two stages must be identical there).

paddlenlp 2.8.1's ChatGLMv2 has no tensor-parallel support (its mapping raises NotImplementedError), so this
module supplies one for its fused ``query_key_value`` layout, following the llama convention: q heads are
split; k/v groups are split when their count divides the degree and replicated otherwise.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from llm.convert.checkpoint import open_checkpoint
from llm.convert.core import copy_tokenizer_files
from llm.convert.tensors import Pending, Tensor, open_weight_file, write_state
from llm.errors import ConfigError, ModelError
from llm.fileio import read_json, staged_file, write_json
from llm.outputs import (
    check_output_path,
    is_complete,
    mark_complete,
    mark_in_progress,
    require_complete,
    staged_output,
)

logger = logging.getLogger(__name__)
SHARD_RE = re.compile(
    r"^(?:model_state|model)\.(?:tp(?P<tp>\d+))?_?(?:pp(?P<pp>\d+))?\.(?P<ext>pdparams|safetensors)$"
)
_LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_FIRST_STAGE = ("embed_tokens", "word_embeddings", "wte.", "embeddings.", "embedding.")


# --------------------------------------------------------------------------------------------------
# finding and validating shards
# --------------------------------------------------------------------------------------------------
def find_shards(directory: str) -> dict[tuple[int, int], str]:
    """``{(tp_rank, pp_rank): file name}`` of the parallel shards in ``directory`` (``{}`` if none)."""
    found: dict[tuple[int, int], str] = {}
    for name in sorted(os.listdir(directory)):
        m = SHARD_RE.match(name)
        if not m or (m["tp"] is None and m["pp"] is None):
            continue
        key = (int(m["tp"] or 0), int(m["pp"] or 0))
        if key in found:
            raise ModelError(f"{directory}: both {found[key]} and {name} hold the same shard; remove one")
        found[key] = name
    return found


def shard_grid(directory: str, shards: dict[tuple[int, int], str], config: Any) -> tuple[int, int]:
    """(tp degree, pp degree) after checking that no shard is missing and the config agrees."""
    if not shards:
        raise ModelError(
            f"{directory}: no tensor/pipeline-parallel shards found (expected model_state.tp00.pdparams, "
            "model_state.tp00_pp00.pdparams, model.tp00.safetensors, ...)"
        )
    tp = max(t for t, _ in shards) + 1
    pp = max(p for _, p in shards) + 1
    missing = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in shards]
    if missing:
        t, p = missing[0]
        raise ModelError(
            f"{directory}: {len(missing)} shards are missing for tp={tp} x pp={pp} (e.g. tp rank {t}, pp rank {p})"
        )
    for attr, found in (("tensor_parallel_degree", tp), ("pipeline_parallel_degree", pp)):
        want = int(getattr(config, attr, 1) or 1)
        if want > 1 and want != found:
            raise ModelError(f"{directory}: config.json says {attr}={want} but the shards give {found}")
    return tp, pp


# --------------------------------------------------------------------------------------------------
# mappings
# --------------------------------------------------------------------------------------------------
def _chatglm_v2_qkv(config: Any, is_split: bool) -> Callable[[Any], np.ndarray]:
    degree, rank = int(config.tensor_parallel_degree), int(config.tensor_parallel_rank)
    hd = int(config.kv_channels)
    q, kv = int(config.num_attention_heads) * hd, int(config.multi_query_group_num) * hd
    split_kv = int(config.multi_query_group_num) % degree == 0

    def split(x: np.ndarray) -> np.ndarray:
        xq, xk, xv = np.split(x, [q, q + kv], axis=-1)
        parts = [np.split(xq, degree, axis=-1)[rank]]
        parts += [np.split(a, degree, axis=-1)[rank] for a in (xk, xv)] if split_kv else [xk, xv]
        return np.concatenate(parts, axis=-1)

    def merge(xs: list[np.ndarray]) -> np.ndarray:
        qt, kvt = q // degree, (kv // degree if split_kv else kv)
        qs = [x[..., :qt] for x in xs]
        ks = [x[..., qt : qt + kvt] for x in xs]
        vs = [x[..., qt + kvt :] for x in xs]
        if not split_kv:
            if any(not np.array_equal(k, ks[0]) or not np.array_equal(v, vs[0]) for k, v in zip(ks, vs)):
                raise ModelError("inconsistent shards: replicated key/value projections differ between ranks")
            ks, vs = ks[:1], vs[:1]
        return np.concatenate([np.concatenate(p, axis=-1) for p in (qs, ks, vs)], axis=-1)

    return split if is_split else merge


def chatglm_v2_mappings(config: Any, is_split: bool) -> dict[str, Callable[..., Any]]:
    """Tensor-parallel actions for paddlenlp 2.8.1 ChatGLMv2 (which ships none), keys without prefix."""
    from paddlenlp.transformers.conversion_utils import split_or_merge_func

    fn = split_or_merge_func(
        is_split, config.tensor_parallel_degree, config.tensor_parallel_rank, config.num_attention_heads
    )
    qkv = _chatglm_v2_qkv(config, is_split)
    base = {
        "embedding.word_embeddings.weight": partial(fn, is_column=False),
        "output_layer.weight": partial(fn, is_column=True),
    }
    for i in range(int(config.num_hidden_layers)):
        p = f"encoder.layers.{i}."
        base[p + "self_attention.query_key_value.weight"] = qkv
        base[p + "self_attention.query_key_value.bias"] = qkv
        base[p + "self_attention.dense.weight"] = partial(fn, is_column=False)
        base[p + "mlp.dense_h_to_4h.weight"] = partial(fn, is_column=True, is_naive_2fuse=True)
        base[p + "mlp.dense_4h_to_h.weight"] = partial(fn, is_column=False)
    return base


def tp_actions(
    model_class: type, config: Any, keys: list[str], is_split: bool
) -> dict[str, Callable[..., Any]]:
    """``{state-dict key: action}`` from the class's mappings (or the toolkit's, for ChatGLMv2)."""
    try:
        mappings = model_class._get_tensor_parallel_mappings(config, is_split=is_split)
    except NotImplementedError:
        if model_class.__name__ != "ChatGLMv2ForCausalLM":
            raise ModelError(
                f"{model_class.__name__} has no tensor-parallel mappings in paddlenlp 2.8.1"
            ) from None
        mappings = chatglm_v2_mappings(config, is_split)
    actions: dict[str, Callable[..., Any]] = {}
    unresolved = []
    for name, action in mappings.items():
        # as paddlenlp's _resolve_prefix_keys: the mapping key is a suffix of the stored one (GPT maps
        # "layers.0.linear1.weight" onto "gpt.decoder.layers.0.linear1.weight"), here on a dot boundary
        found = [k for k in keys if k == name or k.endswith("." + name)]
        if len(found) > 1:
            raise ModelError(f"tensor-parallel mapping key '{name}' matches several tensors: {found[:3]}")
        if found:
            actions[found[0]] = action
        else:
            unresolved.append(name)
    if unresolved:
        logger.warning(
            "%d tensor-parallel mapping keys are not in the state dict, e.g. %s",
            len(unresolved),
            unresolved[0],
        )
    return actions


# --------------------------------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------------------------------
def _load_rank(directory: str, files: list[str]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for name in files:
        reader = open_weight_file(os.path.join(directory, name), paddle_layout=True)
        for key in reader.keys():
            tensor = reader.get(key)
            tensor = Tensor(np.array(tensor.array), tensor.dtype)  # own the memory (mmap/pickle closed below)
            if key in state and not np.array_equal(state[key].array, tensor.array):
                raise ModelError(f"inconsistent shards: '{key}' differs between pipeline stages ({name})")
            state[key] = tensor
        reader.close()
    return state


def _model_class_and_config(directory: str) -> tuple[type, Any]:
    from llm.model.families import family_of

    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise ModelError(f"{directory}: no config.json")
    spec = family_of(read_json(os.path.join(directory, "config.json")))
    return spec.model_class, spec.config_class.from_pretrained(directory)


def merge_tensor_parallel(
    directory: str, output_path: str | None = None, safe_serialization: bool = True, overwrite: bool = False
) -> str:
    """Merge the shards in ``directory`` into one model; returns the directory written.

    Without ``output_path`` (PaddleNLP's behaviour) the merged ``model.safetensors`` (or
    ``model_state.pdparams``) is added next to the shards (atomically, via a temporary file; an existing merged
    file needs ``overwrite``) and ``config.json`` is updated to degree 1. Another ``output_path`` follows the
    output-path policy of :mod:`llm.outputs`.
    """
    require_complete(directory)
    shards = find_shards(directory)
    model_class, config = _model_class_and_config(directory)
    tp, pp = shard_grid(directory, shards, config)
    in_place = output_path is None or os.path.realpath(output_path) == os.path.realpath(directory)
    if in_place:
        merged_file = os.path.join(directory, _merged_name(safe_serialization))
        if os.path.exists(merged_file) and not overwrite:
            raise ConfigError(
                f"{merged_file} already exists; pass --overwrite to merge again, or --output_path DIR"
            )
    else:
        check_output_path(str(output_path), inputs=(directory,), overwrite=overwrite)
    if tp == 1 and pp == 1:
        logger.warning("only one shard in %s: nothing to merge, rewriting it as one model file", directory)
    states = [_load_rank(directory, [shards[(t, p)] for p in range(pp)]) for t in range(tp)]
    keys = list(states[0])
    for t, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            odd = sorted(set(state) ^ set(keys))[0]
            raise ModelError(f"inconsistent shards: '{odd}' is on tensor-parallel rank 0 or {t} but not both")
    config.tensor_parallel_degree, config.tensor_parallel_rank = tp, 0
    actions = tp_actions(model_class, config, keys, is_split=False) if tp > 1 else {}
    merged: dict[str, Tensor] = {}
    for key in keys:
        parts = [s[key] for s in states]
        if key in actions:
            shapes = {p.array.shape for p in parts}
            if len(shapes) != 1:
                raise ModelError(f"inconsistent shards: '{key}' has shapes {sorted(shapes)} across ranks")
            merged[key] = Tensor(np.asarray(actions[key]([p.array for p in parts])), parts[0].dtype)
        else:
            if any(not np.array_equal(p.array, parts[0].array) for p in parts[1:]):
                raise ModelError(f"inconsistent shards: replicated tensor '{key}' differs between ranks")
            merged[key] = parts[0]
        for s in states:
            del s[key]
        logger.info("merged %s %s %s", key, list(merged[key].array.shape), merged[key].dtype)
    config.tensor_parallel_degree, config.pipeline_parallel_degree = 1, 1
    return _save(merged, config, directory, output_path, safe_serialization, overwrite)


def _write_state(state: dict[str, Tensor], path: str, safe: bool) -> None:
    write_state(
        path, [Pending(k, tuple(t.array.shape), t.dtype, lambda t=t: t) for k, t in state.items()], safe
    )


def _merged_name(safe: bool) -> str:
    return "model.safetensors" if safe else "model_state.pdparams"


def _save(
    state: dict[str, Tensor], config: Any, src: str, output_path: str | None, safe: bool, overwrite: bool
) -> str:
    name = _merged_name(safe)
    if output_path is None or os.path.abspath(output_path) == os.path.abspath(src):
        # readers refuse the directory while it holds shards and a half-updated config
        marked = is_complete(src)
        mark_in_progress(src, "merge_tp_params")
        with staged_file(os.path.join(src, name)) as tmp_file:
            _write_state(state, tmp_file, safe)
        cfg = read_json(os.path.join(src, "config.json"))
        cfg.update(tensor_parallel_degree=1, pipeline_parallel_degree=1)
        write_json(os.path.join(src, "config.json"), cfg, sort_keys=True)
        mark_complete(src, "merge_tp_params", was_complete=marked)
        return src
    with staged_output(output_path, writer="merge_tp_params", inputs=(src,), overwrite=overwrite) as tmp:
        _write_state(state, os.path.join(tmp, name), safe)
        config.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
    return os.path.abspath(output_path)


# --------------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------------
def stage_of(key: str, layers: int, stages: int) -> int:
    """Pipeline stage of a tensor: decoder layers evenly, embeddings first, the rest (norm, head) last."""
    m = _LAYER_RE.search(key)
    if m:
        return min(int(m.group(1)) * stages // max(layers, 1), stages - 1)
    return 0 if any(s in key for s in _FIRST_STAGE) else stages - 1


def shard_name(tp_rank: int | None, pp_rank: int | None, safe: bool) -> str:
    """paddlenlp's shard file name for a (tp, pp) rank (``None`` = that kind of parallelism is off)."""
    parts = [
        f"tp{tp_rank:02d}" if tp_rank is not None else "",
        f"pp{pp_rank:02d}" if pp_rank is not None else "",
    ]
    variant = "_".join(p for p in parts if p)
    return f"model.{variant}.safetensors" if safe else f"model_state.{variant}.pdparams"


def split_tensor_parallel(
    directory: str,
    output_path: str,
    tensor_parallel_degree: int,
    pipeline_parallel_degree: int = 1,
    safe_serialization: bool = True,
    overwrite: bool = False,
) -> str:
    """Split the model in ``directory`` into ``tp x pp`` shards written to ``output_path`` (the inverse of
    :func:`merge_tensor_parallel`, with the same mappings)."""
    tp, pp = int(tensor_parallel_degree), int(pipeline_parallel_degree)
    if tp < 1 or pp < 1 or tp * pp < 2:
        raise ModelError(f"nothing to split: tensor_parallel_degree={tp}, pipeline_parallel_degree={pp}")
    check_output_path(output_path, inputs=(directory,), overwrite=overwrite)
    model_class, config = _model_class_and_config(directory)
    ckpt = open_checkpoint(directory, paddle_layout=True)
    full = {k: ckpt.get(k) for k in ckpt.keys()}
    layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 1))
    try:
        with staged_output(
            output_path, writer="merge_tp_params", inputs=(directory,), overwrite=overwrite
        ) as tmp:
            config.tensor_parallel_degree = tp
            for t in range(tp):
                config.tensor_parallel_rank = t
                actions = tp_actions(model_class, config, list(full), is_split=True) if tp > 1 else {}
                for p in range(pp):
                    part = {
                        k: Tensor(np.ascontiguousarray(actions[k](v.array)), v.dtype) if k in actions else v
                        for k, v in full.items()
                        if stage_of(k, layers, pp) == p
                    }
                    name = shard_name(t if tp > 1 else None, p if pp > 1 else None, safe_serialization)
                    _write_state(part, os.path.join(tmp, name), safe_serialization)
            config.tensor_parallel_rank = 0
            config.pipeline_parallel_degree = pp
            config.save_pretrained(tmp)
            copy_tokenizer_files(directory, tmp)
    finally:
        ckpt.close()
    return os.path.abspath(output_path)
