"""``do_ptq`` / ``do_gptq`` through ``finetune_generation``: the demo files end to end, and bad input.

The demo folder's CPU-sized ``ptq_argument.json`` / ``gptq_argument.json`` run on the embedded demo model
(random init: this checks the workflow, docs/quantization.md has the accuracy on the trained one). Bad input
stops with one line, exit 2, before weights load and with nothing written.
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest
from conftest import FIXTURE_DATA

import llm.train.finetune as finetune
from llm.errors import UserError
from llm.model import FAMILIES, forward_logits, load_model
from llm.quant.layers import QuantLinear
from llm.quant.model import get_layer

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "demo" / "model"
FAST = ["--ptq_step", "2", "--smooth_step", "2", "--gptq_step", "2", "--per_device_eval_batch_size", "50"]
IDS = {"input_ids": np.array([[1, 30, 31, 40, 41, 50]], np.int64)}


def demo_argv(name: str, out: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "demo" / name),
        "--model_name_or_path",
        str(DEMO_MODEL),
        "--output_dir",
        str(out),
        *FAST,
        *extra,
    ]


@pytest.mark.parametrize("name, algorithm", [("ptq_argument.json", "ptq"), ("gptq_argument.json", "gptq")])
def test_demo_file_quantizes_saves_and_evaluates(name: str, algorithm: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")  # a user's file in output_dir survives the publish
    metrics = finetune.run(demo_argv(name, out))
    saved = json.loads((out / "config.json").read_text())["llm_quantization"]
    assert saved["algorithm"] == algorithm and saved["modules"]
    assert saved["quant_type"] == ("a8w8" if algorithm == "ptq" else "weight_only_int4")
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoint_complete.json").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(metrics)
    assert np.isfinite(metrics["eval_loss"]) and "eval_accuracy" in metrics
    if algorithm == "ptq":
        act = json.loads((out / "act_scales.json").read_text())
        weight = json.loads((out / "weight_scales.json").read_text())
        assert set(act) == set(weight) == set(saved["modules"])
    model = load_model(str(out))
    assert isinstance(get_layer(model, saved["modules"][0]), QuantLinear)
    float_model = load_model(str(DEMO_MODEL))
    with paddle.no_grad():
        got, want = forward_logits(model, IDS).numpy(), forward_logits(float_model, IDS).numpy()
    assert np.isfinite(got).all() and np.abs(got - want).max() < 0.5 * np.abs(want).max()


def test_calibration_falls_back_to_train_json(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    metrics = finetune.run(
        demo_argv(
            "gptq_argument.json", out, "--dataset_name_or_path", str(FIXTURE_DATA), "--do_eval", "false"
        )
    )
    assert metrics == {} and (out / "model.safetensors").is_file()


def _refused(argv: list[str], words: str, out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(finetune, "load_model", must_not_load)
    monkeypatch.setattr("llm.model.load_model", must_not_load)
    with pytest.raises(UserError) as err:
        finetune.run(argv)
    assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not out.exists()


def test_bad_requests_are_refused_before_weights_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    no_calib = tmp_path / "only_dev"
    no_calib.mkdir()
    shutil.copy(FIXTURE_DATA / "dev.json", no_calib / "dev.json")
    cases = [
        (
            demo_argv("ptq_argument.json", out, "--dataset_name_or_path", str(no_calib)),
            "no train data to calibrate",
        ),
        (demo_argv("ptq_argument.json", out, "--quant_type", "int3"), "quant_type 'int3' is not supported"),
        (demo_argv("gptq_argument.json", out, "--lora", "true"), "merge lora parameters first"),
        (demo_argv("gptq_argument.json", out, "--gptq_bits", "5"), "gptq_bits must be 4 or 8"),
        (demo_argv("gptq_argument.json", out, "--gptq_group_size", "0"), "gptq_group_size must be"),
        (demo_argv("ptq_argument.json", out, "--do_train", "true"), "at most one of"),
    ]
    for argv, words in cases:
        _refused(argv, words, out, monkeypatch)


def test_quantized_model_is_not_quantized_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "first"
    finetune.run(demo_argv("gptq_argument.json", first, "--do_eval", "false"))
    out = tmp_path / "again"
    _refused(
        demo_argv("ptq_argument.json", out, "--model_name_or_path", str(first)),
        "is already quantized",
        out,
        monkeypatch,
    )


def test_a_failed_quantization_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import llm.quant.io as qio

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(qio, "save_quantized", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        finetune.run(demo_argv("gptq_argument.json", out, "--do_eval", "false"))
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"]  # no staging dir left


def test_cli_exit_code_and_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "finetune_generation.py"),
            *demo_argv("ptq_argument.json", out, "--shift_sampler", "x"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "shift_sampler" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


def test_weight_only_ptq_is_round_to_nearest_with_groups(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = demo_argv(
        "ptq_argument.json", out, "--quant_type", "wint4", "--quant_group_size", "64", "--smooth", "false"
    )
    finetune.run([*argv, "--do_eval", "false"])
    saved = json.loads((out / "config.json").read_text())["llm_quantization"]
    assert (saved["quant_type"], saved["group_size"], saved["bits"]) == ("weight_only_int4", 64, 4)
    from llm.quant.formats import rtn

    name = saved["modules"][0]
    float_weight = get_layer(load_model(str(DEMO_MODEL)), name).weight.numpy()
    stored = get_layer(load_model(str(out)), name).quantized_weight()
    want = rtn(float_weight, 4, 64)
    assert np.array_equal(stored.data, want.data) and np.array_equal(stored.scales, want.scales)
    scales = json.loads((out / "weight_scales.json").read_text())[name]
    assert np.allclose(scales, want.scales)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", ["ptq_argument.json", "gptq_argument.json"])
def test_every_family_quantizes(family: str, name: str, tiny_model_factory, tmp_path: Path) -> None:
    out = tmp_path / "out"
    extra = [
        "--model_name_or_path",
        str(tiny_model_factory(family)),
        "--dataset_name_or_path",
        str(FIXTURE_DATA),
    ]
    extra += ["--src_length", "16", "--max_length", "32", "--shift", "true"]
    metrics = finetune.run(demo_argv(name, out, *extra))
    saved = json.loads((out / "config.json").read_text())["llm_quantization"]
    model = load_model(str(out))
    assert all(isinstance(get_layer(model, n), QuantLinear) for n in saved["modules"])
    assert np.isfinite(metrics["eval_loss"])
