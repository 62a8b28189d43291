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
        ModelError, match=r"1 shards are missing for tp=2 x pp=2 \(e.g. tp rank 1, pp rank 0\)"
    ):
        merge_tensor_parallel(broken)
    # a replicated tensor (layer norm) that differs between ranks
    bad = str(tmp_path / "bad")
    shutil.copytree(shards_dir, bad)
    shards = {k: v for k, v in find_shards(bad).items()}
    state = _state(bad, shards[(1, 0)])
    state["llama.layers.0.input_layernorm.weight"] = state["llama.layers.0.input_layernorm.weight"] + 1
    os.remove(os.path.join(bad, shards[(1, 0)]))
    paddle.save(state, os.path.join(bad, "model_state.tp01_pp00.pdparams"))
    with pytest.raises(ModelError, match="replicated tensor 'llama.layers.0.input_layernorm.weight' differs"):
        merge_tensor_parallel(bad)
    with pytest.raises(ModelError, match="no tensor/pipeline-parallel shards found"):
        merge_tensor_parallel(full)
    with pytest.raises(ConfigError, match="overlaps the input"):
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
    assert sorted(os.listdir(merged)) == ["config.json", "generation_config.json", "model.safetensors"]
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
