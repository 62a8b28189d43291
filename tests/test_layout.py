"""The parallel layout: rank coordinates as paddle's fleet topology, the checks run before any weights load,
the parameter counts of the dry-run report, and ``--dry_run`` through both training scripts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT, make_tiny_model_dir
from paddle.distributed.fleet.base.topology import CommunicateTopology

import llm  # noqa: F401
from llm.distributed import check_layout, plan_layout
from llm.distributed.layout import _parameter_counts, format_layout
from llm.errors import ConfigError


def _args(**requested: object) -> SimpleNamespace:
    base = {
        "tensor_parallel_degree": -1,
        "pipeline_parallel_degree": -1,
        "sharding_parallel_degree": -1,
        "sharding": "",
    }
    base.update(requested)
    return SimpleNamespace(
        requested=base, gradient_accumulation_steps=8, per_device_train_batch_size=2, fp16_opt_level="O1"
    )


@pytest.mark.parametrize(
    "world, degrees",
    [
        (8, {"tensor_parallel_degree": 2, "pipeline_parallel_degree": 2}),
        (
            16,
            {
                "tensor_parallel_degree": 2,
                "pipeline_parallel_degree": 2,
                "sharding": "stage1",
                "sharding_parallel_degree": 2,
            },
        ),
    ],  # fmt: skip
)
def test_ranks_and_groups_match_paddles_topology(world: int, degrees: dict) -> None:
    layout = plan_layout(_args(**degrees), world_size=world)
    topo = CommunicateTopology(["data", "pipe", "sharding", "model"], list(layout.dims))
    for rank in range(world):
        coord = topo.get_coord(rank)
        assert layout.coords(rank) == {
            "dp": coord.data,
            "pp": coord.pipe,
            "sharding": coord.sharding,
            "tp": coord.model,
        }
    for axis, name in (("dp", "data"), ("pp", "pipe"), ("sharding", "sharding"), ("tp", "model")):
        assert sorted(layout.groups(axis)) == sorted(topo.get_comm_list(name))
    assert layout.dp * layout.pp * layout.sharding * layout.tp == world


def test_degrees_follow_paddlenlp() -> None:
    layout = plan_layout(_args(sharding="stage1"), world_size=4)  # sharding degree -1: the rest of the world
    assert (layout.dp, layout.sharding, layout.stage) == (1, 4, "stage1")
    layout = plan_layout(_args(tensor_parallel_degree=2), world_size=4)
    assert (layout.dp, layout.tp, layout.stage) == (2, 2, None)
    with pytest.raises(
        ConfigError, match="not divisible by tensor_parallel_degree 2 x pipeline_parallel_degree 2"
    ):
        plan_layout(_args(tensor_parallel_degree=2, pipeline_parallel_degree=2), world_size=6)
    with pytest.raises(ConfigError, match="sharding 4"):
        plan_layout(_args(sharding="stage1", sharding_parallel_degree=4), world_size=6)


@pytest.mark.parametrize("family", ["llama", "qwen", "gpt"])
def test_parameter_counts_equal_the_model(family: str, tiny_model_factory) -> None:
    from llm.model import load_model

    config = json.loads((tiny_model_factory(family) / "config.json").read_text())
    parts, layers = _parameter_counts(config)
    model = load_model(str(tiny_model_factory(family)))
    actual = sum(int(np.prod(p.shape)) for p in model.parameters())
    assert parts["embedding"] + parts["head"] + parts["layer"] * layers == actual
    assert parts["layer"] > 0 and parts["embedding"] > 0


def _config(**overrides: object) -> dict:
    config = {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 64,
              "vocab_size": 256, "num_hidden_layers": 4, "hidden_size": 32}  # fmt: skip
    config.update(overrides)
    return config


@pytest.mark.parametrize(
    "degrees, config, model_args, message",
    [
        (
            {"tensor_parallel_degree": 3},
            _config(num_attention_heads=6, num_key_value_heads=6),
            {},
            "FFN width 64",
        ),
        ({"tensor_parallel_degree": 4}, _config(num_attention_heads=6), {}, "num_attention_heads 6"),
        ({"tensor_parallel_degree": 8}, _config(num_key_value_heads=3), {}, "3 key/value heads"),
        (
            {"tensor_parallel_degree": 8},
            _config(),
            {"fuse_attention_qkv": True},
            "without fuse_attention_qkv",
        ),
        ({"pipeline_parallel_degree": 3}, _config(), {}, "num_hidden_layers 4 is not divisible"),
        ({"pipeline_parallel_degree": 2}, _config(), {"virtual_pp_degree": 4}, "virtual_pp_degree 4"),
        (
            {"pipeline_parallel_degree": 2},
            _config(model_type="bloom"),
            {},
            "pipeline parallel is not available",
        ),
        (
            {"pipeline_parallel_degree": 2, "sharding": "stage2", "sharding_parallel_degree": 2},
            _config(),
            {},
            "not compatible with sharding stage2",
        ),  # fmt: skip
        ({}, _config(), {"sequence_parallel": True}, "sequence_parallel needs tensor parallel"),
    ],
)
def test_each_violation_is_one_clear_error(
    degrees: dict, config: dict, model_args: dict, message: str
) -> None:
    args = _args(**degrees)
    world = max(1, degrees.get("tensor_parallel_degree", 1)) * max(
        1, degrees.get("pipeline_parallel_degree", 1)
    )
    world *= max(1, degrees.get("sharding_parallel_degree", 1))
    layout = plan_layout(args, world_size=world)
    with pytest.raises(ConfigError, match=message):
        check_layout(layout, config, args, SimpleNamespace(**model_args))


def test_kv_heads_replicated_and_vocab_unsplit_are_allowed() -> None:
    args = _args(tensor_parallel_degree=8)
    check_layout(plan_layout(args, world_size=8), _config(vocab_size=250), args, SimpleNamespace())


def _dry(script: str, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), *argv, "--dry_run", "true"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def no_weights_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama config with 4 layers and 8 heads, and no weights file: a dry run never loads weights."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("noweights"), "llama")
    config = json.loads((path / "config.json").read_text())
    config.update(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, hidden_size=64)
    (path / "config.json").write_text(json.dumps(config))
    for weights in path.glob("model*"):
        weights.unlink()
    return path


def test_dry_run_of_a_shipped_gpu_config_prints_the_layout(no_weights_model: Path, tmp_path: Path) -> None:
    from llm.data.mmap import MMapWriter

    with MMapWriter(str(tmp_path / "tokens"), dtype=np.uint16) as writer:
        writer.add_document(np.arange(4, 100))
    proc = _dry(
        "run_pretrain.py", "llama/pretrain-llama_13b-pp4tp2sd2_stage1.json", "--model_name_or_path",
        str(no_weights_model), "--input_dir", str(tmp_path), "--fp16", "false", "--fp16_opt_level", "O1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "world size 16 = dp 1 x pp 4 x sharding 2 (stage1) x tp 2" in out
    assert "(planned for 16 ranks" in out and "| 15 | 0 | 3 | 1 | 1 |" in out
    assert "tp groups: [[0, 1], [2, 3]" in out and "| pp stage |" in out
    assert "needs GPUs" in out
    assert not (ROOT / "checkpoints" / "llama_pretrain_ckpts").exists()


def test_dry_run_refuses_a_bad_layout_with_exit_2(no_weights_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(ROOT / "demo" / "data", data)
    proc = _dry(
        "finetune_generation.py", "llama/sft_argument.json", "--model_name_or_path", str(no_weights_model),
        "--dataset_name_or_path", str(data), "--tensor_parallel_degree", "3", "--fp16", "false",
        "--fp16_opt_level", "O1",
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error: num_attention_heads 8 is not divisible by tensor_parallel_degree 3" in proc.stderr
    ok = _dry(
        "finetune_generation.py", "llama/sft_argument.json", "--model_name_or_path", str(no_weights_model),
        "--dataset_name_or_path", str(data), "--fp16", "false", "--fp16_opt_level", "O1",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "world size 4 = dp 1 x pp 1 x sharding 1 x tp 4" in ok.stdout


def test_format_layout_memory_divides_by_the_sharding_stage() -> None:
    config = _config()
    rows = {}
    for stage in ("stage1", "stage2", "stage3"):
        args = _args(sharding=stage, sharding_parallel_degree=4)
        text = format_layout(plan_layout(args, world_size=4), config, args)
        rows[stage] = [line for line in text.splitlines() if line.startswith("| 0 |")][-1]  # pp stage 0
    assert len(set(rows.values())) == 3
