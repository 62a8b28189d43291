"""predictor.py / export_model.py as scripts: export (LoRA merged) -> static predict, and one-line errors.

Each fresh interpreter pays ~4 s for the paddle import, so the error cases run in ONE subprocess: a
driver executes the real script files with ``runpy`` once per case (``sys.argv`` set, stdout/stderr
captured) and reports the exit code and output of each. Two real invocations check the process-level
behaviour (exit status 2 with a single ``error:`` line, and the export -> static round trip).
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import helpers_cli as hc
    import helpers_model as hm
except ImportError:  # tests/ imported as a package
    from tests import helpers_cli as hc
    from tests import helpers_model as hm

ROOT = Path(__file__).resolve().parents[1]
PREDICTOR = str(ROOT / "predictor.py")
EXPORT = str(ROOT / "export_model.py")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLAGS_call_stack_level", "0")
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="module")
def setup(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llm.model import build_model, tiny_config

    root = tmp_path_factory.mktemp("cli")
    model = tiny_model_factory("llama")
    other = root / "other-llama"
    wide = build_model(tiny_config("llama", vocab_size=160, hidden_size=64, intermediate_size=96))
    wide.save_pretrained(str(other), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((model / name).read_bytes())
    data = root / "dev.json"
    data.write_text(
        '{"src": "spell: 12", "tgt": "twelve"}\n{"src": ["hi", "more"], "tgt": ["yo", "ok"]}\n',
        encoding="utf-8",
    )
    bad = root / "bad.json"
    bad.write_text('{"src": "ok", "tgt": "x"}\n{"src": "broken", "tgt": \n', encoding="utf-8")
    nosrc = root / "nosrc.json"
    nosrc.write_text('{"src": "ok"}\n\n{"tgt": "x"}\n', encoding="utf-8")
    empty_static = root / "static-empty"
    empty_static.mkdir()
    (empty_static / "config.json").write_text((model / "config.json").read_text())
    return {
        "model": model,
        "other": other,
        "lora": hm.save_lora_adapter(model, root / "lora"),
        "prefix": hm.save_prefix_adapter(model, root / "prefix"),
        "data": data,
        "bad": bad,
        "nosrc": nosrc,
        "static_empty": empty_static,
        "root": root,
    }


def test_missing_model_dir_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, PREDICTOR, "--model_name_or_path", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: model directory not found: '{tmp_path / 'nope'}'"]
    assert "Traceback" not in proc.stderr


def test_scripts_in_one_interpreter(setup: dict[str, Path]) -> None:
    s = {k: str(v) for k, v in setup.items()}
    root = setup["root"]
    out = {
        name: str(root / "out" / f"{name}.json")
        for name in ("dyn", "default", "lora", "lora_static", "px", "px_static")
    }
    common = ["--decode_strategy", "greedy_search", "--device", "cpu"]
    gen = ["--data_file", s["data"], "--max_length", "6", "--batch_size", "2", *common]
    lora_out, px_out = str(root / "exported-lora"), str(root / "exported-prefix")
    cases: list[tuple[str, list[str], int, str]] = [
        # (script, argv, expected exit code, text expected in stdout (exit 0) or in the one error line)
        (PREDICTOR, ["--model_name_or_path", s["model"], "--output_file", out["dyn"], *gen], 0, "**Output**"),
        (
            PREDICTOR,
            [
                "--model_name_or_path",
                s["model"],
                "--max_length",
                "3",
                "--batch_size",
                "2",
                "--output_file",
                out["default"],
                *common,
            ],
            0,
            "你好",
        ),
        (
            PREDICTOR,
            [
                "--model_name_or_path",
                s["model"],
                "--max_length",
                "2",
                "--src_length",
                "4",
                "--benchmark",
                "--benchmark_warmup",
                "0",
                "--benchmark_repeat",
                "1",
                *common,
            ],
            0,
            "IPS:",
        ),
        # LoRA: dynamic (merged in memory) vs export (merged before export) + static
        (
            PREDICTOR,
            [
                "--model_name_or_path",
                s["model"],
                "--lora_path",
                s["lora"],
                "--output_file",
                out["lora"],
                *gen,
            ],
            0,
            "**Output**",
        ),
        (
            EXPORT,
            [
                "--model_name_or_path",
                s["model"],
                "--lora_path",
                s["lora"],
                "--output_path",
                lora_out,
                "--src_length",
                "48",
                "--max_length",
                "16",
                "--dtype",
                "float32",
            ],
            0,
            "exported static model",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", lora_out, "--mode", "static", "--output_file", out["lora_static"], *gen],
            0,
            "**Output**",
        ),
        # prefix tuning: the engine exports the prefix key/values too
        (
            PREDICTOR,
            [
                "--model_name_or_path",
                s["model"],
                "--prefix_path",
                s["prefix"],
                "--output_file",
                out["px"],
                *gen,
            ],
            0,
            "**Output**",
        ),
        (
            EXPORT,
            [
                "--model_name_or_path",
                s["model"],
                "--prefix_path",
                s["prefix"],
                "--output_path",
                px_out,
                "--src_length",
                "48",
                "--max_length",
                "16",
                "--model_prefix",
                "llama_px",
            ],
            0,
            "exported static model",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", px_out, "--mode", "static", "--output_file", out["px_static"], *gen],
            0,
            "**Output**",
        ),
        # one-line errors
        (
            PREDICTOR,
            ["--model_name_or_path", px_out, "--mode", "static", "--model_prefix", "other", *gen],
            2,
            "was exported with model_prefix 'llama_px', not 'other'; pass --model_prefix llama_px",
        ),
        (
            EXPORT,
            ["--model_name_or_path", s["model"], "--output_path", str(root / "x"), "--model_prefix", "a/b"],
            2,
            "model_prefix must be a plain file stem such as 'model', got 'a/b'",
        ),
        (
            PREDICTOR,
            [
                "--model_name_or_path",
                lora_out,
                "--mode",
                "static",
                "--src_length",
                "60",
                "--max_length",
                "16",
                *common,
            ],
            2,
            "src_length (60) + max_length (16) = 76 exceeds the exported model's position limit 64",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", lora_out, "--mode", "static", "--quant_lm_head", *gen],
            2,
            "was exported with the float LM head (the head's format is fixed at export); export it again",
        ),
        (PREDICTOR, ["--model_name_or_path", s["model"], "--quant_lm_head", *gen], 0, "**Output**"),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--lora_path", s["lora"], "--merge_lora", "false", *gen],
            0,
            "**Output**",
        ),
        (
            PREDICTOR,
            [
                *("--model_name_or_path", s["model"], "--lora_path", s["lora"], "--merge_lora", "false"),
                *("--quant_type", "weight_only_int8", *common),
            ],
            2,
            "--quant_type quantizes the merged model: it cannot be combined with --merge_lora false",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--data_file", s["bad"], *common],
            2,
            f"{s['bad']}:2: invalid JSON",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--data_file", s["nosrc"], *common],
            2,
            f"{s['nosrc']}:3: missing field 'src'",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--data_file", s["root"] + "/none.json", *common],
            2,
            "none.json: file not found",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--src_length", "250", "--max_length", "10", *common],
            2,
            "src_length (250) + max_length (10) = 260 exceeds the model's position limit 256",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["other"], "--lora_path", s["lora"], *common],
            2,
            "the LoRA adapter does not match this llama model",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["static_empty"], "--mode", "static", *common],
            2,
            "not a complete static model, missing model.pdmodel, model.pdiparams, engine.json, tokenizer files",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--quant_type", "a8w8"],
            2,
            "a8w8 needs calibration: run finetune_generation.py with do_ptq",
        ),
        (
            PREDICTOR,
            ["--model_name_or_path", s["model"], "--max_lenght", "3"],
            2,
            "did you mean 'max_length'",
        ),
        (
            EXPORT,
            ["--model_name_or_path", s["model"], "--output_path", s["root"] + "/half", "--dtype", "float16"],
            2,
            "float32",
        ),
        (
            EXPORT,
            ["--model_name_or_path", s["root"] + "/missing", "--output_path", s["root"] + "/x"],
            2,
            "model directory not found",
        ),
    ]
    results = hc.run_scripts([(c[0], c[1]) for c in cases], _env(), cwd=str(root))
    for (script, argv, code, text), got in zip(cases, results):
        label = f"{os.path.basename(script)} {' '.join(argv)}"
        assert got["code"] == code, f"{label}: {got}"
        if code == 0:
            assert text in got["out"], f"{label}: {got['out'][-500:]}"
            continue
        errors = [line for line in got["err"].splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and text in errors[0], f"{label}: {got['err'][-800:]}"
        assert "Traceback" not in got["err"]

    def rows(name: str) -> list[dict]:
        return [json.loads(x) for x in Path(out[name]).read_text(encoding="utf-8").splitlines()]

    assert [(x["src"], x["tgt"]) for x in rows("dyn")] == [
        ("spell: 12", "twelve"),
        (["hi", "more"], ["yo", "ok"]),
    ]
    assert len(rows("default")) == 2 and rows("default")[0]["src"] == "你好，请问你是谁?"
    assert rows("lora") != rows("dyn")  # the adapter changes the outputs ...
    assert rows("lora_static") == rows("lora")  # ... and the exported (merged) model agrees with dynamic LoRA
    assert rows("px_static") == rows("px")
    # the exported directory is self-contained: a fresh process runs it the same way
    fresh = str(root / "out" / "fresh.json")
    proc = subprocess.run(
        [
            sys.executable,
            PREDICTOR,
            "--model_name_or_path",
            lora_out,
            "--mode",
            "static",
            "--output_file",
            fresh,
            *gen,
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
        cwd=str(root),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [json.loads(x) for x in Path(fresh).read_text(encoding="utf-8").splitlines()] == rows("lora")
    exported = sorted(p.name for p in Path(lora_out).iterdir())
    for name in (
        "config.json",
        "engine.json",
        "export_info.json",
        "generation_config.json",
        "model.pdiparams",
        "model.pdmodel",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert name in exported
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers == [] and not (root / "half").exists() and not (root / "x").exists()
