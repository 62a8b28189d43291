"""``finetune_generation.py`` as a user runs it: bad configs and bad data end with exit code 2 and one
``error:`` line on stderr naming the problem (no traceback).

Every subprocess pays the ~5 s paddle import, so two cases run the script plainly and the rest run in one
batch: a single interpreter imports paddle once, then forks one child per case which executes the real
``finetune_generation.py`` as ``__main__`` (``runpy``) with its own ``sys.argv``, stderr file and exit code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA, ROOT

SCRIPT = "finetune_generation.py"
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "FLAGS_call_stack_level": "0"}

# Runs each case ``[argv, stderr_path]`` of sys.argv[1] in a forked child; prints the exit codes as JSON.
BATCH_RUNNER = r"""
import json, os, runpy, sys, traceback
import llm, llm.train.finetune  # the expensive paddle/paddlenlp import, paid once
codes = []
for argv, err_path in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.dup2(os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.argv = ["finetune_generation.py", *argv]
            try:
                runpy.run_path("finetune_generation.py", run_name="__main__")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def error_line(stderr: str) -> str:
    """The single ``error:`` line of ``stderr``; fails on a traceback or on zero / several error lines."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def write_config(path: Path, base: dict, **changes: object) -> str:
    """Write ``base`` updated with ``changes`` as a JSON argument file; returns its path."""
    path.write_text(json.dumps({**base, **changes}, indent=2), encoding="utf-8")
    return str(path)


def write_dataset(directory: Path, train: str) -> str:
    """A dataset directory whose train.json holds ``train`` verbatim."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.json").write_text(train, encoding="utf-8")
    return str(directory)


@pytest.fixture
def base_config(tiny_model_factory, tmp_path: Path) -> dict:
    """A valid LoRA training config on the tiny llama; each case breaks one thing."""
    return {
        "model_name_or_path": str(tiny_model_factory("llama")),
        "dataset_name_or_path": str(FIXTURE_DATA),
        "output_dir": str(tmp_path / "out"),
        "lora": True,
        "do_train": True,
        "max_steps": 1,
        "src_length": 32,
        "max_length": 64,
        "report_to": "none",
    }


def run_script(*args: str) -> subprocess.CompletedProcess:
    """``python finetune_generation.py ARGS`` from the repository root."""
    cmd = [sys.executable, SCRIPT, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=ENV)


def test_unknown_key_real_script(base_config: dict, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "lora_argument.json", base_config, lerning_rate=3e-4)
    proc = run_script(cfg)
    assert proc.returncode == 2
    assert error_line(proc.stderr) == (
        f"error: unknown argument 'lerning_rate' in {cfg} (did you mean 'learning_rate'?)"
    )
    assert not (tmp_path / "out").exists()


def test_malformed_json_line_real_script(base_config: dict, tmp_path: Path) -> None:
    good = '{"src": "spell: 451", "tgt": "four hundred fifty one"}\n'
    data = write_dataset(tmp_path / "data", good + "\n" + good + '{"src": "spell: 7", tgt}\n' + good)
    cfg = write_config(tmp_path / "c.json", base_config, dataset_name_or_path=data)
    proc = run_script(cfg)
    assert proc.returncode == 2
    line = error_line(proc.stderr)
    assert line.startswith(f"error: {data}/train.json:4: invalid JSON"), line


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the batch runner forks one child per case")
def test_bad_config_and_data_cases_batched(base_config: dict, tiny_model_factory, tmp_path: Path) -> None:
    ok = '{"src": "spell: 451", "tgt": "four hundred fifty one"}\n'
    dev_only = tmp_path / "dev_only"
    dev_only.mkdir()
    (dev_only / "dev.json").write_text(ok, encoding="utf-8")
    datasets = {
        "missing_field": write_dataset(tmp_path / "d1", ok + '{"src": "spell: 12"}\n'),
        "turns": write_dataset(tmp_path / "d2", ok + ok + '{"src": ["a", "b"], "tgt": ["c"]}\n'),
        "empty": write_dataset(tmp_path / "d3", ""),
        "not_object": write_dataset(tmp_path / "d4", "[1, 2]\n"),
    }
    # name -> (argv, pieces the one error line must contain, in order)
    cases: dict[str, tuple[list[str], list[str]]] = {}

    def case(name: str, expected: list[str], *cli: str, **changes: object) -> None:
        cfg = write_config(tmp_path / f"{name}.json", base_config, **changes)
        cases[name] = ([cfg, *cli], [p.replace("{cfg}", cfg) for p in expected])

    case("wrong_type_json", ["'learning_rate' in {cfg} expects float, got 'fast'"], learning_rate="fast")
    case("wrong_type_cli", ["'max_steps' on the command line expects int, got 'ten'"], "--max_steps", "ten")
    case("wrong_bool", ["'lora' in {cfg} expects bool, got 'yes please'"], lora="yes please")
    case("lora_and_prefix", ["lora and prefix_tuning are both enabled"], prefix_tuning=True)
    case("train_and_ptq", ["do_train and do_ptq are enabled together", "at most one of"], do_ptq=True)
    case("gptq_and_qat", ["do_gptq and do_qat", "at most one of"], do_train=False, do_gptq=True, do_qat=True)
    case("o2_without_half", ["fp16_opt_level O2 needs --fp16 or --bf16"], fp16_opt_level="O2")
    case(
        "zero_padding_opt",
        ["zero_padding is not supported for model type 'opt'", "--zero_padding false"],
        model_name_or_path=str(tiny_model_factory("opt")),
        zero_padding=True,
    )
    case("no_train_file", [f"{dev_only}/train.json not found"], dataset_name_or_path=str(dev_only))
    case(
        "no_dataset_dir",
        [f"dataset directory not found: {tmp_path}/nowhere"],
        dataset_name_or_path=str(tmp_path / "nowhere"),
    )
    case(
        "no_test_file",
        [f"{datasets['turns']}/test.json not found"],
        dataset_name_or_path=datasets["turns"],
        do_train=False,
        do_predict=True,
    )
    missing = f"{datasets['missing_field']}/train.json:2: missing field 'tgt'"
    case("missing_field", [missing], dataset_name_or_path=datasets["missing_field"])
    turns = f"{datasets['turns']}/train.json:3: 'src' has 2 turns but 'tgt' has 1"
    case("turn_mismatch", [turns], dataset_name_or_path=datasets["turns"])
    empty = f"{datasets['empty']}/train.json: no examples (the file is empty)"
    case("empty_file", [empty], dataset_name_or_path=datasets["empty"])
    not_object = f"{datasets['not_object']}/train.json:1: expected a JSON object"
    case("not_object", [not_object], dataset_name_or_path=datasets["not_object"])

    names = list(cases)
    batch = [[cases[n][0], str(tmp_path / f"{n}.err")] for n in names]
    proc = subprocess.run(
        [sys.executable, "-c", BATCH_RUNNER, json.dumps(batch)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = dict(zip(names, json.loads(proc.stdout.strip().splitlines()[-1])))
    for name in names:
        stderr = (tmp_path / f"{name}.err").read_text(encoding="utf-8")
        assert codes[name] == 2, (name, stderr[-2000:])
        line = error_line(stderr)
        for piece in cases[name][1]:
            assert piece in line, (name, line)
    assert not (tmp_path / "out").exists()  # no case got as far as writing output
