"""Every shipped per-model argument JSON runs on CPU with exactly the README's override line (the fine-tuning
files through finetune_generation's workflow, the pretraining files through run_pretrain's).

Test-only overrides on top: the tiny model of the folder's family, the fixture dataset, a temporary
output directory, ``--max_steps 1`` (two calibration steps for PTQ / GPTQ) and short lengths. Files the
toolkit refuses (quantization-aware training; GLM prefix tuning) must stop with a ConfigError before any weights
load. The low-bit PEFT files (QLoRA, WINT8-LoRA) run on the base quantized as it loads (llm.lowbit).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA

import llm  # noqa: F401  (zlib fix before paddle)
import llm.train.finetune as finetune
from llm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FAMILY = {
    "llama": "llama",
    "qwen": "qwen",
    "chatglm": "chatglm",
    "chatglm2": "chatglm_v2",
    "bloom": "bloom",
    "gpt-3": "gpt",
    "opt": "opt",
    "glm": "glm",
    "mixtral": "mixtral",
}
REFUSED = {"glm/pt_argument.json": "prefix_tuning is not supported for model type 'glm'"}
QAT = "quantization-aware training (do_qat) is not part of this release yet"
CALIBRATION_STEPS = ["--ptq_step", "2", "--shift_step", "2", "--smooth_step", "2", "--gptq_step", "2"]


def readme_cpu_overrides() -> list[str]:
    """The override line documented in README.md (the test fails if it is reworded away)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"on a CPU add these overrides[^`]*`([^`]+)`", text)
    assert match, "README.md no longer documents the CPU override line"
    return shlex.split(match.group(1))


def shipped_files() -> list[str]:
    """The fine-tuning argument files (``pretrain*.json`` are run_pretrain's, tested below)."""
    return [
        str(p.relative_to(REPO))
        for d in FAMILY
        for p in sorted((REPO / d).glob("*_argument.json"))
        if not p.name.startswith("pretrain")
    ]


def pretrain_files() -> list[str]:
    return [str(p.relative_to(REPO)) for d in FAMILY for p in sorted((REPO / d).glob("pretrain*.json"))]


def _expected_refusal(rel: str) -> str | None:
    raw = json.loads((REPO / rel).read_text(encoding="utf-8"))
    if raw.get("do_qat"):
        return QAT
    return REFUSED.get(rel)


def _saved_model_files(raw: dict) -> tuple[str, ...]:
    if raw.get("lora"):
        return ("lora_config.json", "lora_model_state.pdparams")
    if raw.get("prefix_tuning"):
        return ("prefix_config.json", "prefix_model_state.pdparams")
    return ("config.json", "model_state.pdparams")


def test_readme_line_and_matrix() -> None:
    assert readme_cpu_overrides() == [
        *("--fp16", "false", "--fp16_opt_level", "O1", "--tensor_parallel_degree", "1"),
        *("--pipeline_parallel_degree", "1", "--sharding", ""),
    ]
    files = shipped_files()
    assert set(REFUSED) <= set(files)
    runnable = [rel for rel in files if not _expected_refusal(rel)]
    assert {rel.split("/")[0] for rel in runnable} == set(FAMILY)
    training = [rel for rel in runnable if not re.search(r"/g?ptq_argument", rel)]
    assert all(json.loads((REPO / rel).read_text())["recompute"] is True for rel in training)
    assert {rel.split("/")[0] for rel in runnable if rel.endswith("/ptq_argument.json")} >= {
        "llama",
        "qwen",
        "chatglm2",
        "bloom",
    }


@pytest.mark.parametrize("rel", shipped_files())
def test_shipped_config_runs_on_cpu(
    rel: str, tiny_model_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tiny_model_factory(FAMILY[rel.split("/")[0]])
    out = tmp_path / "out"
    argv = [str(REPO / rel), *readme_cpu_overrides()]
    argv += ["--model_name_or_path", str(model_dir), "--dataset_name_or_path", str(FIXTURE_DATA)]
    argv += ["--output_dir", str(out), "--max_steps", "1", "--src_length", "16", "--max_length", "32"]
    refusal = _expected_refusal(rel)
    if refusal:

        def must_not_load(*args: object, **kwargs: object) -> None:
            raise AssertionError("weights were loaded before the refusal")

        monkeypatch.setattr(finetune, "load_model", must_not_load)
        monkeypatch.setattr(finetune, "load_low_bit_model", must_not_load)
        with pytest.raises(ConfigError) as exc:
            finetune.run(argv)
        assert str(exc.value).startswith(refusal) and "\n" not in str(exc.value)
        return
    raw = json.loads((REPO / rel).read_text(encoding="utf-8"))
    if raw.get("do_ptq") or raw.get("do_gptq"):
        metrics = finetune.run(argv + CALIBRATION_STEPS)
        quantization = json.loads((out / "config.json").read_text())["llm_quantization"]
        assert quantization["algorithm"] == ("ptq" if raw.get("do_ptq") else "gptq")
        assert (out / "model.safetensors").is_file() and (out / "checkpoint_complete.json").is_file()
        assert (out / "act_scales.json").is_file() == bool(raw.get("do_ptq"))
        assert metrics["eval_loss"] > 0  # the files' do_eval ran on the quantized model
        return
    metrics = finetune.run(argv)
    for name in _saved_model_files(raw):
        assert (out / name).is_file(), f"{rel}: {name} not written"
    if raw.get("weight_quantize_algo"):  # the adapter names the low-bit base it was trained on
        saved = json.loads((out / "config.json").read_text())["quantization_config"]
        assert saved["weight_quantize_algo"] == raw["weight_quantize_algo"]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics  # the files' do_eval ran too


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from llm.data.mmap import MMapWriter

    folder = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    with MMapWriter(str(folder / "random"), dtype=np.uint16) as writer:
        for _ in range(1000):  # "949,50,1" leaves the test split one document
            writer.add_document(rng.integers(4, 160, size=40))
    return folder


@pytest.mark.parametrize("rel", pretrain_files())
def test_shipped_pretrain_config_runs_on_cpu(
    rel: str, tiny_model_factory, token_dir: Path, tmp_path: Path
) -> None:
    from llm.pretrain.run import run

    model_dir = tiny_model_factory(FAMILY[rel.split("/")[0]])
    out = tmp_path / "out"
    argv = [str(REPO / rel), *readme_cpu_overrides(), "--model_name_or_path", str(model_dir)]
    argv += [
        "--tokenizer_name_or_path",
        str(model_dir),
        "--input_dir",
        str(token_dir),
        "--output_dir",
        str(out),
    ]
    argv += ["--max_steps", "1", "--max_seq_length", "16"]
    metrics = run(argv)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 1
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics and "test_loss" in metrics
