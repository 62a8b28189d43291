"""Every shipped argument JSON (per-model folders and demo/) parses and passes check_static.

Runtime checks are not run: the model names in these files are hub ids, not local directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llm  # noqa: F401  (zlib fix before paddle)
from llm.config import FINETUNE_ARGUMENT_TYPES, check_static, parse_arguments

REPO = Path(__file__).resolve().parents[1]
MODEL_DIRS = ("llama", "qwen", "chatglm", "chatglm2", "bloom", "gpt-3", "opt", "glm", "mixtral")
REQUIRED = ("sft_argument.json", "lora_argument.json", "pt_argument.json")


def _is_finetune_config(path: Path) -> bool:
    """demo/*.json may also hold other files (chat templates, pretrain configs); keep argument files."""
    if path.name.startswith("pretrain"):
        return False
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # let the test report the broken file
    return isinstance(data, dict) and "model_name_or_path" in data and "output_dir" in data


def shipped_configs() -> list[Path]:
    files = [
        p
        for d in MODEL_DIRS
        for p in sorted((REPO / d).glob("*_argument.json"))
        if not p.name.startswith("pretrain")
    ]
    files += [p for p in sorted((REPO / "demo").glob("*.json")) if _is_finetune_config(p)]
    return files


def test_every_model_folder_ships_the_three_files() -> None:
    missing = [f"{d}/{name}" for d in MODEL_DIRS for name in REQUIRED if not (REPO / d / name).is_file()]
    assert not missing, f"missing argument files: {missing}"


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_is_valid(path: Path) -> None:
    gen, quant, model, data, train = parse_arguments(FINETUNE_ARGUMENT_TYPES, [str(path)])
    check_static(model, data, quant, train)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert "tgt_length" not in raw
    assert raw.get("dataset_name_or_path")
    assert raw.get("output_dir")


@pytest.mark.parametrize("folder", MODEL_DIRS)
def test_modes_and_spec_values(folder: str) -> None:
    cfg = {name: json.loads((REPO / folder / name).read_text(encoding="utf-8")) for name in REQUIRED}
    sft, lora, pt = cfg["sft_argument.json"], cfg["lora_argument.json"], cfg["pt_argument.json"]
    assert not sft.get("lora") and not sft.get("prefix_tuning")
    assert lora["lora"] is True and not lora.get("prefix_tuning")
    assert pt["prefix_tuning"] is True and not pt.get("lora")
    assert (sft["learning_rate"], lora["learning_rate"], pt["learning_rate"]) == (3e-05, 3e-04, 3e-02)
    for mode, data in (("sft", sft), ("lora", lora), ("pt", pt)):
        assert data["dataset_name_or_path"] == "./data"
        assert data["output_dir"].startswith("./checkpoints/") and data["output_dir"].endswith(
            f"_{mode}_ckpts"
        )
        assert data["do_train"] is True and data["evaluation_strategy"] == "epoch"


def test_known_model_names() -> None:
    names = {
        d: json.loads((REPO / d / "sft_argument.json").read_text())["model_name_or_path"] for d in MODEL_DIRS
    }
    assert names["llama"] == "facebook/llama-7b"
    assert names["qwen"] == "qwen/qwen-7b"
    assert names["chatglm2"] == "THUDM/chatglm2-6b"
    assert names["chatglm"] == "THUDM/chatglm-6b"
    assert names["mixtral"] == "mistralai/Mixtral-8x7B-Instruct-v0.1"


PRETRAIN_FOLDERS = ("llama", "qwen", "gpt-3", "demo")


def pretrain_configs() -> list[Path]:
    return [p for d in PRETRAIN_FOLDERS for p in sorted((REPO / d).glob("pretrain*.json"))]


def test_pretrain_families_ship_pretrain_configs() -> None:
    names = {p.relative_to(REPO).as_posix() for p in pretrain_configs()}
    for expected in (
        "llama/pretrain-llama_7b-tp2sd4_stage2.json",
        "llama/pretrain-llama_13b-pp4tp2sd2_stage1.json",
        "qwen/pretrain_argument_stage2.json",
        "gpt-3/pretrain_argument.json",
        "demo/pretrain_argument.json",
    ):
        assert expected in names


@pytest.mark.parametrize("path", pretrain_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_pretrain_config_is_valid(path: Path) -> None:
    from llm.pretrain.arguments import PRETRAIN_ARGUMENT_TYPES

    model, data, train = parse_arguments(PRETRAIN_ARGUMENT_TYPES, [str(path)])
    check_static(model, None, None, train)
    assert data.input_dir and train.output_dir.startswith("./checkpoints/")
    assert train.max_steps > 0 and train.do_train
