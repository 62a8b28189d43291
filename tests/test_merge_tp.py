"""merge_tp_params.py: split tiny models into tp/pp shards with the class mappings, merge back exactly."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix: must be imported before paddle)

# isort: split
import json
import os
import shutil

import numpy as np
import paddle
import pytest

from llm.convert.tensors import open_weight_file
from llm.errors import ConfigError, ModelError
from llm.merge import find_shards, merge_tensor_parallel, split_tensor_parallel
from llm.merge.cli import merge_tp_main
from llm.model import build_model, forward_logits, load_model, tiny_config
from llm.outputs import COMPLETE_MARKER

IDS = np.random.RandomState(0).randint(3, 256, size=(2, 10)).astype("int64")
# (column-parallel key, axis it is split on, row-parallel key) per family
SPLIT = {
    "llama": ("llama.layers.0.self_attn.q_proj.weight", 1, "llama.layers.0.mlp.down_proj.weight"),
    "qwen": ("qwen.h.0.attn.c_attn.weight", 1, "qwen.h.0.mlp.c_proj.weight"),
    "chatglm_v2": (
        "chatglm_v2.encoder.layers.0.mlp.dense_h_to_4h.weight",
        1,
        "chatglm_v2.encoder.layers.0.self_attention.dense.weight",
    ),
    "bloom": ("bloom.h.0.self_attention.query_key_value.weight", 1, "bloom.h.0.mlp.dense_4h_to_h.weight"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for family in SPLIT:
        path = str(tmp_path_factory.mktemp(f"full-{family}"))
        with paddle.utils.unique_name.guard():
            model = build_model(tiny_config(family), seed=1)
        model.eval()
        model.save_pretrained(path, safe_serialization=True)
        out[family] = (path, forward_logits(model, {"input_ids": IDS}).numpy())
    return out


def _state(path: str, name: str) -> dict[str, np.ndarray]:
    reader = open_weight_file(os.path.join(path, name), paddle_layout=True)
    return {k: np.array(reader.get(k).array) for k in reader.keys()}


@pytest.mark.parametrize("family", list(SPLIT))
@pytest.mark.parametrize("tp, pp, safe", [(2, 1, True), (4, 1, False), (2, 2, True), (1, 2, False)])
def test_split_and_merge_back_exactly(family: str, tp: int, pp: int, safe: bool, models, tmp_path) -> None:
    full, ref = models[family]
    shards_dir = split_tensor_parallel(full, str(tmp_path / "shards"), tp, pp, safe_serialization=safe)
    shards = find_shards(shards_dir)
    assert sorted(shards) == [(t, p) for t in range(tp) for p in range(pp)]
    assert json.load(open(os.path.join(shards_dir, "config.json")))["tensor_parallel_degree"] == tp
    column, axis, row = SPLIT[family]
    original = _state(full, "model.safetensors")
    for key, ax in ((column, axis), (row, 0)) if tp > 1 else ():
        rank0 = {}
        for p in range(pp):
            rank0.update(_state(shards_dir, shards[(0, p)]))
        assert rank0[key].shape[ax] * tp == original[key].shape[ax], key
    merged_dir = merge_tensor_parallel(shards_dir, safe_serialization=safe)
    merged = _state(merged_dir, "model.safetensors" if safe else "model_state.pdparams")
    assert sorted(merged) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(merged[key], original[key], err_msg=key)
    model = load_model(merged_dir)
    model.eval()
    np.testing.assert_array_equal(forward_logits(model, {"input_ids": IDS}).numpy(), ref)


def test_refuses_missing_and_inconsistent_shards(models, tmp_path) -> None:
    full, _ = models["llama"]
    shards_dir = split_tensor_parallel(full, str(tmp_path / "s"), 2, 2)
    broken = str(tmp_path / "missing")
    shutil.copytree(shards_dir, broken)
    os.remove(os.path.join(broken, "model.tp01_pp00.safetensors"))
    with pytest.raises(
        ModelError, match="incomplete model directory: 'model.tp01_pp00.safetensors' is missing"
    ):
        merge_tensor_parallel(broken)  # the split's completion marker lists every shard
    os.remove(os.path.join(broken, COMPLETE_MARKER))  # as a directory written by paddlenlp would be
    with pytest.raises(
        ModelError, match=r"1 shards are missing for tp=2 x pp=2 \(e.g. tp rank 1, pp rank 0\)"
    ):
        merge_tensor_parallel(broken)
    # a replicated tensor (layer norm) that differs between ranks
    bad = str(tmp_path / "bad")
    shutil.copytree(shards_dir, bad)
    os.remove(os.path.join(bad, COMPLETE_MARKER))  # the shard is replaced by hand below
    shards = {k: v for k, v in find_shards(bad).items()}
    state = _state(bad, shards[(1, 0)])
    state["llama.layers.0.input_layernorm.weight"] = state["llama.layers.0.input_layernorm.weight"] + 1
    os.remove(os.path.join(bad, shards[(1, 0)]))
    paddle.save(state, os.path.join(bad, "model_state.tp01_pp00.pdparams"))
    with pytest.raises(ModelError, match="replicated tensor 'llama.layers.0.input_layernorm.weight' differs"):
        merge_tensor_parallel(bad)
    with pytest.raises(ModelError, match="no tensor/pipeline-parallel shards found"):
        merge_tensor_parallel(full)
    with pytest.raises(ConfigError, match="is the input"):
        split_tensor_parallel(full, full, 2)
    cfg_path = os.path.join(shards_dir, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["tensor_parallel_degree"] = 4
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelError, match="config.json says tensor_parallel_degree=4 but the shards give 2"):
        merge_tensor_parallel(shards_dir)


def test_cli_split_merge_and_errors(models, tmp_path, capsys) -> None:
    full, ref = models["qwen"]
    out = str(tmp_path / "tp2")
    merge_tp_main(
        [
            "--model_name_or_path",
            full,
            "--action",
            "split",
            "--tensor_parallel_degree",
            "2",
            "--output_path",
            out,
        ]
    )
    merged = merge_tp_main(["--model_name_or_path", out, "--output_path", str(tmp_path / "merged")])
    assert sorted(os.listdir(merged)) == [
        COMPLETE_MARKER,
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    model = load_model(merged)
    model.eval()
    np.testing.assert_array_equal(forward_logits(model, {"input_ids": IDS}).numpy(), ref)
    capsys.readouterr()
    for argv, message in (
        (["--model_name_or_path", out, "--tensor_parallel_degree", "4"], "does not match the 2 shard(s)"),
        (["--model_name_or_path", str(tmp_path / "nope")], "model directory not found"),
        (["--model_name_or_path", out, "--tensor_parallel", "2"], "did you mean 'tensor_parallel_degree'"),
    ):
        with pytest.raises(SystemExit) as exc:
            merge_tp_main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# shards written the way paddlenlp itself lays out a tensor-parallel checkpoint
# --------------------------------------------------------------------------------------------------
# Families whose paddlenlp 2.8.1 class ships ``_get_tensor_parallel_mappings`` (ChatGLMv2's raises).
PADDLENLP_TP = [
    "llama",
    "qwen",
    "bloom",
    "opt",
    "mixtral",
    "chatglm",
    "glm",
    "gpt",  # mapping keys "layers.N..." resolve under "gpt.decoder." by suffix, as in paddlenlp
]


@pytest.fixture(scope="module")
def paddlenlp_models(tmp_path_factory):
    """``factory(family) -> (saved full model dir, model, reference logits)``, built once per family."""
    cache: dict[str, tuple[str, paddle.nn.Layer, np.ndarray]] = {}

    def factory(family: str) -> tuple[str, paddle.nn.Layer, np.ndarray]:
        if family not in cache:
            path = str(tmp_path_factory.mktemp(f"pnlp-full-{family}"))
            with paddle.utils.unique_name.guard():
                model = build_model(tiny_config(family), seed=1)
            model.eval()
            model.save_pretrained(path, safe_serialization=True)
            cache[family] = (path, model, forward_logits(model, {"input_ids": IDS}).numpy())
        return cache[family]

    return factory


def _paddlenlp_shards(model: paddle.nn.Layer, out: str, tp: int, safe: bool) -> list[str]:
    """Split ``model`` with paddlenlp's own ``convert_tensor_parallel`` (the class's
    ``_get_tensor_parallel_mappings(config, is_split=True)`` applied with ``config.tensor_parallel_rank`` set,
    as paddlenlp does when it loads a full checkpoint into a tensor-parallel model) and write each rank with
    paddlenlp's ``save_pretrained(variant=...)``, the variant being ``weight_name_suffix()``'s ``tp{rank:0>2d}``
    (so the files are ``model_state.tp00.pdparams`` / ``model.tp00.safetensors``, named by paddlenlp's
    ``_add_variant``)."""
    from paddlenlp.transformers.model_utils import _add_variant
    from paddlenlp.utils.env import PADDLE_WEIGHTS_NAME, SAFE_WEIGHTS_NAME

    full = {k: v.numpy() for k, v in model.state_dict().items()}
    saved_config = (model.config.tensor_parallel_degree, model.config.tensor_parallel_rank)
    names = []
    try:
        for rank in range(tp):
            model.config.tensor_parallel_degree, model.config.tensor_parallel_rank = tp, rank
            config = model.config.__class__.from_dict(model.config.to_dict())
            config.tensor_parallel_degree, config.tensor_parallel_rank = tp, rank
            state = {k: paddle.to_tensor(v) for k, v in full.items()}
            shard = type(model).convert_tensor_parallel(None, config, state_dict=state)
            variant = f"tp{rank:0>2d}"
            model.save_pretrained(out, state_dict=shard, variant=variant, safe_serialization=safe)
            names.append(_add_variant(SAFE_WEIGHTS_NAME if safe else PADDLE_WEIGHTS_NAME, variant))
    finally:
        model.config.tensor_parallel_degree, model.config.tensor_parallel_rank = saved_config
    return names


@pytest.mark.parametrize("family", PADDLENLP_TP)
@pytest.mark.parametrize("tp, safe", [(2, True), (4, False)])
def test_merges_shards_split_by_paddlenlp(family, tp, safe, paddlenlp_models, tmp_path) -> None:
    full_dir, model, ref = paddlenlp_models(family)
    shards_dir = str(tmp_path / "paddlenlp-tp")
    names = _paddlenlp_shards(model, shards_dir, tp, safe)
    assert names == [
        f"model.tp0{r}.safetensors" if safe else f"model_state.tp0{r}.pdparams" for r in range(tp)
    ]
    assert json.load(open(os.path.join(shards_dir, "config.json")))["tensor_parallel_degree"] == tp
    original = _state(full_dir, "model.safetensors")
    rank_states = [_state(shards_dir, name) for name in names]
    split_keys = [k for k in original if rank_states[0][k].shape != original[k].shape]
    assert split_keys, "paddlenlp split nothing: the comparison below would be trivial"

    # the merge behind merge_tp_params.py restores the original weights and logits exactly
    merged_dir = merge_tensor_parallel(shards_dir, str(tmp_path / "merged"), safe_serialization=safe)
    merged = _state(merged_dir, "model.safetensors" if safe else "model_state.pdparams")
    assert sorted(merged) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(merged[key], original[key], err_msg=key)
    assert json.load(open(os.path.join(merged_dir, "config.json"))).get("tensor_parallel_degree", 1) == 1
    reloaded = load_model(merged_dir)
    reloaded.eval()
    np.testing.assert_array_equal(forward_logits(reloaded, {"input_ids": IDS}).numpy(), ref)

    # the toolkit's own split gives the same shards, bit for bit
    own_dir = split_tensor_parallel(full_dir, str(tmp_path / "own-tp"), tp, safe_serialization=safe)
    own = find_shards(own_dir)
    for rank, state in enumerate(rank_states):
        own_state = _state(own_dir, own[(rank, 0)])
        assert sorted(own_state) == sorted(state)
        for key in state:
            np.testing.assert_array_equal(own_state[key], state[key], err_msg=f"rank {rank}: {key}")


def test_merge_tp_params_script_on_paddlenlp_shards(paddlenlp_models, tmp_path) -> None:
    """The shipped script itself (a fresh process) merges paddlenlp-split llama shards in place."""
    import subprocess
    import sys

    from conftest import ROOT

    full_dir, model, ref = paddlenlp_models("llama")
    shards_dir = str(tmp_path / "ckpt")
    _paddlenlp_shards(model, shards_dir, 2, safe=False)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "merge_tp_params.py"), "--model_name_or_path", shards_dir],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"merged 2 shards into {os.path.abspath(shards_dir)}" in proc.stdout
    merged = _state(shards_dir, "model.safetensors")
    original = _state(full_dir, "model.safetensors")
    assert sorted(merged) == sorted(original)
    for key in original:
        np.testing.assert_array_equal(merged[key], original[key], err_msg=key)
    reloaded = load_model(shards_dir)
    reloaded.eval()
    np.testing.assert_array_equal(forward_logits(reloaded, {"input_ids": IDS}).numpy(), ref)
