"""The output-path policy and completion markers of ``llm.outputs``, on plain directories (no models).

Real kills: a child process is SIGKILLed inside a staged write and inside a publish, and the directory is
checked afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llm import outputs
from llm.errors import ConfigError, ModelError
from llm.outputs import (
    COMPLETE_MARKER,
    IN_PROGRESS,
    check_output_path,
    is_complete,
    mark_complete,
    mark_in_progress,
    read_marker,
    remove_output,
    require_complete,
    staged_output,
)
from llm.train.checkpoint import find_last_checkpoint, rotate_checkpoints


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _write(path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize(
    ("dst", "match"),
    [
        ("model", "is the input"),
        ("model/inference", "lies inside the input"),
        (".", "contains the input"),
        ("a_file", "exists and is not a directory"),
        ("busy", "already exists and is not empty; pass --overwrite"),
    ],
)
def test_check_output_path_refusals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dst: str, match: str
) -> None:
    monkeypatch.chdir(tmp_path)
    _write(tmp_path, {"model/config.json": "{}", "a_file": "x", "busy/notes.txt": "mine"})
    with pytest.raises(ConfigError, match=match):
        check_output_path(dst, inputs=["model"])
    assert check_output_path("busy", inputs=["model"], overwrite=True) == str(tmp_path / "busy")
    assert check_output_path("new", inputs=["model"]) == str(tmp_path / "new")


def test_publish_keeps_foreign_files_and_drops_only_our_old_ones(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with staged_output(str(dst), writer="test") as tmp:
        _write(Path(tmp), {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"})
        _write(Path(tmp), {"model.safetensors.index.json": "{}", "config.json": "old"})
    assert sorted(read_marker(str(dst))["files"]) == sorted(
        ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        + ["model.safetensors.index.json"]
    )
    _write(dst, {"notes.txt": "the user's", "runs/log.txt": "also the user's"})
    notes_inode = (dst / "notes.txt").stat().st_ino

    with pytest.raises(ConfigError, match="pass --overwrite"):
        with staged_output(str(dst), writer="test"):
            pass
    with staged_output(str(dst), writer="test", overwrite=True) as tmp:
        _write(Path(tmp), {"model.safetensors": "new", "config.json": "new"})
    assert _tree(dst) == {
        COMPLETE_MARKER: (dst / COMPLETE_MARKER).read_bytes(),
        "config.json": b"new",
        "model.safetensors": b"new",
        "notes.txt": b"the user's",
        "runs/log.txt": b"also the user's",
    }
    assert (dst / "notes.txt").stat().st_ino == notes_inode  # carried over as a hard link, not a copy
    assert read_marker(str(dst))["files"] == {"config.json": 3, "model.safetensors": 3}
    assert _siblings(dst) == []  # no staging leftovers


def test_publish_refuses_model_files_it_did_not_write(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    _write(dst, {"model_state.pdparams": "someone else's"})
    with pytest.raises(
        ConfigError, match=r"holds model files this toolkit did not write \(model_state.pdparams"
    ):
        check_output_path(str(dst), overwrite=True)
    with pytest.raises(ConfigError, match="did not write"):
        check_output_path(str(dst), allow_existing=True)


def test_failed_write_leaves_previous_content_and_no_leftovers(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    with staged_output(str(dst), writer="test") as tmp:
        _write(Path(tmp), {"model.safetensors": "v1"})
    before = _tree(dst)
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_output(str(dst), writer="test", overwrite=True) as tmp:
            _write(Path(tmp), {"model.safetensors": "half"})
            raise RuntimeError("disk full")
    assert _tree(dst) == before and _siblings(dst) == []


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from llm import outputs
    dst, where = sys.argv[1], sys.argv[2]
    if where == "exchange":  # die right after the staged tree is complete, before the swap
        outputs._exchange = lambda a, b: os.kill(os.getpid(), signal.SIGKILL)
    with outputs.staged_output(dst, writer="killed", overwrite=True) as tmp:
        open(os.path.join(tmp, "model.safetensors"), "w").write("v2-partial")
        if where == "write":
            os.kill(os.getpid(), signal.SIGKILL)
        open(os.path.join(tmp, "config.json"), "w").write("v2")
    """
)


@pytest.mark.parametrize("where", ["write", "exchange"])
def test_kill_during_a_write_keeps_the_old_directory_whole(tmp_path: Path, where: str) -> None:
    dst = tmp_path / "out"
    with staged_output(str(dst), writer="test") as tmp:
        _write(Path(tmp), {"model.safetensors": "v1", "config.json": "v1"})
    _write(dst, {"notes.txt": "mine"})
    before = _tree(dst)
    proc = subprocess.run([sys.executable, "-c", KILLER, str(dst), where], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert _tree(dst) == before
    require_complete(str(dst))
    assert len(_siblings(dst)) == 1  # the dead writer's staging directory, hidden ...
    with staged_output(str(dst), writer="test", overwrite=True) as tmp:
        _write(Path(tmp), {"model.safetensors": "v3", "config.json": "v3"})
    assert _siblings(dst) == []  # ... and swept by the next write
    assert (dst / "model.safetensors").read_text() == "v3" and (dst / "notes.txt").read_text() == "mine"


def test_fallback_swap_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dst = tmp_path / "out"
    with staged_output(str(dst), writer="test") as tmp:
        _write(Path(tmp), {"model.safetensors": "v1"})
    _write(dst, {"notes.txt": "mine"})
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    with staged_output(str(dst), writer="test", overwrite=True) as tmp:
        _write(Path(tmp), {"model.safetensors": "v2"})
    assert (dst / "model.safetensors").read_text() == "v2" and (dst / "notes.txt").read_text() == "mine"
    assert _siblings(dst) == []


def test_require_complete(tmp_path: Path) -> None:
    path = tmp_path / "m"
    _write(path, {"config.json": "{}", "model.safetensors": "12345"})
    require_complete(str(path))  # no marker at all: a Hugging Face / PaddleNLP directory is accepted
    mark_in_progress(str(path), "a training checkpoint save")
    with pytest.raises(ModelError, match="incomplete model directory \\(a training checkpoint save was"):
        require_complete(str(path))
    mark_complete(str(path), "test")
    assert not (path / IN_PROGRESS).exists() and is_complete(str(path))
    require_complete(str(path))
    (path / "model.safetensors").write_text("123")  # truncated after it was written
    with pytest.raises(ModelError, match="'model.safetensors' has 3 bytes, 5 when it was written"):
        require_complete(str(path))
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="'model.safetensors' is missing"):
        require_complete(str(path))


def test_rotation_marks_incomplete_before_deleting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for step in (2, 4):
        _write(tmp_path / f"checkpoint-{step}", {"model_state.pdparams": "w" * step})
        mark_complete(str(tmp_path / f"checkpoint-{step}"), "test", global_step=step)

    def killed_rename(src: str, dst: str) -> None:  # the process dies as the files start to go
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", killed_rename)
    with pytest.raises(KeyboardInterrupt):
        rotate_checkpoints(str(tmp_path), 1, str(tmp_path / "checkpoint-4"))
    monkeypatch.undo()
    old = tmp_path / "checkpoint-2"
    assert old.is_dir() and not is_complete(str(old))
    with pytest.raises(ModelError, match="incomplete model directory \\(deletion was interrupted"):
        require_complete(str(old))
    assert find_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-4")
    remove_output(str(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4"]
