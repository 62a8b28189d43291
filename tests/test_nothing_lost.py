"""Every writer refuses to destroy data, and kills leave nothing that a reader takes for a model.

Each case comes from trying the scripts as a new user would (export onto its own input, merges into busy
directories, kill -9 during saves, re-running the README's override example on a finished LoRA run ...).
Kills are real: a child process running the real workflow SIGKILLs itself in the middle of a weights file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA, ROOT
from helpers_model import finetune_argv, save_lora_adapter

import llm  # noqa: F401
from llm.errors import ModelError
from llm.model import load_model
from llm.outputs import COMPLETE_MARKER, IN_PROGRESS, is_complete
from llm.train.checkpoint import find_last_checkpoint
from llm.train.finetune import main as finetune_main
from llm.train.finetune import run


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FLAGS_call_stack_level": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / name), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )


def _one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def chat_model(tiny_model_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose tokenizer files carry more than the four specials (as real chat models do)."""
    src = tiny_model_factory("llama")
    path = tmp_path_factory.mktemp("chat") / "model"
    path.mkdir()
    for item in src.iterdir():
        (path / item.name).write_bytes(item.read_bytes())
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<tool>"],
    }
    (path / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (path / "added_tokens.json").write_text(json.dumps({"<tool>": 5}))
    return path


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def test_export_and_merge_refuse_their_input_and_busy_outputs(chat_model: Path, tmp_path: Path) -> None:
    model_before = _tree(chat_model)
    lora = save_lora_adapter(chat_model, tmp_path / "lora")
    # the static predictor's old hint suggested exactly this command: it deleted model.safetensors
    proc = _script(
        "export_model.py", "--model_name_or_path", str(chat_model), "--output_path", str(chat_model)
    )
    assert "is the input" in _one_error(proc)
    proc = _script(
        "export_model.py",
        "--model_name_or_path",
        str(chat_model),
        "--output_path",
        str(chat_model / "static"),
    )
    assert "lies inside the input" in _one_error(proc)
    proc = _script("predictor.py", "--model_name_or_path", str(chat_model), "--mode", "static")
    assert (
        f"export it first: export_model.py --model_name_or_path {chat_model} --output_path {chat_model}_static"
        in (_one_error(proc))
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("my notes")
    for script, flags in (
        ("export_model.py", ["--model_name_or_path", str(chat_model), "--output_path", str(busy)]),
        ("merge_lora_params.py", ["--lora_path", str(lora), "--merge_lora_model_path", str(busy)]),
    ):
        assert "pass --overwrite" in _one_error(
            _script(script, *flags, "--model_name_or_path", str(chat_model))
        )
    assert _tree(chat_model) == model_before and _tree(busy) == {"notes.txt": b"my notes"}

    # with --overwrite only the toolkit's files are replaced; the user's notes stay
    proc = _script(
        "merge_lora_params.py",
        *("--lora_path", str(lora), "--merge_lora_model_path", str(busy), "--overwrite"),
        *("--model_name_or_path", str(chat_model)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (busy / "notes.txt").read_text() == "my notes" and is_complete(str(busy))
    for name in TOKENIZER_FILES:  # carried over whole, additional_special_tokens included
        assert (busy / name).read_bytes() == (chat_model / name).read_bytes(), name
    proc = _script(
        "export_model.py", "--model_name_or_path", str(busy), "--output_path", str(tmp_path / "static")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in TOKENIZER_FILES:
        assert (tmp_path / "static" / name).read_bytes() == (chat_model / name).read_bytes(), name
    assert _tree(chat_model) == model_before


def test_finetune_output_dir_refusals_name_the_path(
    chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr("llm.train.finetune.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text((FIXTURE_DATA / "train.json").read_text())
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, message in (
        (a_file, "exists and is not a directory"),
        (chat_model, "is the input"),
        (data / "out", "lies inside the input"),
    ):
        with pytest.raises(SystemExit) as exc:
            finetune_main(finetune_argv(chat_model, out, data, max_steps=1))
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and f"output_dir '{out}' {message}" in err[0], err
    assert a_file.read_text() == "x"


def _lora_argv(model: Path, out: Path, **values: object) -> list[str]:
    flags = {"lora": "true", "lora_rank": 8, "learning_rate": "1e-2", "save_steps": 2, "max_steps": 4}
    return finetune_argv(model, out, FIXTURE_DATA, **{**flags, **values})


def test_readme_override_example_refuses_to_resume_another_run(
    chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "lora"
    run(_lora_argv(chat_model, out))
    assert is_complete(str(out)) and find_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    for where in (out, out / "checkpoint-4"):  # tokenizer files carried over whole
        for name in TOKENIZER_FILES:
            assert (where / name).read_bytes() == (chat_model / name).read_bytes(), (where, name)
    finished = _tree(out)
    monkeypatch.setattr("llm.train.finetune.load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    # the README's override example on top of a finished run: a rank-4 model must not resume rank-16 state
    with pytest.raises(SystemExit) as exc:
        finetune_main(_lora_argv(chat_model, out, lora_rank=4, max_steps=50))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "checkpoint-4 of a different run (lora_rank=8 (this run: 4))" in err[0]
    # the same settings with max_steps already reached: nothing to train, nothing overwritten
    with pytest.raises(SystemExit) as exc:
        finetune_main(_lora_argv(chat_model, out, max_steps=3))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and "at or past max_steps 3: there is nothing to train" in err[0], err
    assert _tree(out) == finished


def test_zero_step_resume_keeps_the_finished_model(chat_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    run(_lora_argv(chat_model, out))
    finished = {n: b for n, b in _tree(out).items() if "/" not in n and not n.endswith(".jsonl")}
    # an explicit resume from the last checkpoint with max_steps reached trains nothing
    run([*_lora_argv(chat_model, out), "--resume_from_checkpoint", str(out / "checkpoint-4")])
    assert {n: (out / n).read_bytes() for n in finished} == finished


KILL_HOOK = textwrap.dedent(
    """
    import os, signal, sys
    import llm, paddle
    marker = sys.argv[1]
    real_save = paddle.save
    def save(obj, path, *args, **kwargs):
        if marker in str(path) and str(path).endswith("model_state.pdparams"):
            with open(path, "wb") as f:
                f.write(b"half a pickle")
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, path, *args, **kwargs)
    paddle.save = save
    from llm.train.finetune import main
    main(sys.argv[2:])
    """
)


def _killed_run(marker: str, argv: list[str]) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FLAGS_call_stack_level": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_HOOK, marker, *argv], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


def test_kill_during_final_save_and_checkpoint_save(chat_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "sft"
    argv = [str(a) for a in finetune_argv(chat_model, out, FIXTURE_DATA, max_steps=4, save_steps=2)]
    _killed_run(".tmp-final-", argv)  # SIGKILL while the final model_state.pdparams is half written
    assert not (out / "model_state.pdparams").exists() and not is_complete(str(out))
    error = _one_error(_script("predictor.py", "--model_name_or_path", str(out), "--max_length", "2"))
    assert "holds training checkpoints but no final model" in error and "checkpoint-4" in error
    # the same command again resumes checkpoint-4, has nothing left to train, and writes the final model
    run(argv)
    assert is_complete(str(out)) and not [p for p in out.parent.iterdir() if ".tmp-" in p.name]
    load_model(str(out))

    # SIGKILL inside a checkpoint (written in place): readers and resume refuse it; the final model stays
    before = {n: (out / n).read_bytes() for n in ("model_state.pdparams", COMPLETE_MARKER)}
    _killed_run(
        "checkpoint-6",
        [str(a) for a in finetune_argv(chat_model, out, FIXTURE_DATA, max_steps=8, save_steps=2)],
    )
    ckpt = out / "checkpoint-6"
    assert (ckpt / IN_PROGRESS).is_file() and not is_complete(str(ckpt))
    assert find_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    with pytest.raises(ModelError, match="incomplete model directory"):
        load_model(str(ckpt))
    assert "incomplete model directory" in _one_error(
        _script("predictor.py", "--model_name_or_path", str(ckpt), "--max_length", "2")
    )
    assert {n: (out / n).read_bytes() for n in before} == before
