"""The checkout stays clean: what the scripts write by default is git-ignored, and install files point at
files that exist."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess

import pytest
from conftest import ROOT

from llm.convert.cache import CACHE_DIR_NAME
from llm.infer.arguments import ModelArgument


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_default_outputs_are_git_ignored() -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(ModelArgument)}
    written = [
        defaults["output_file"],  # predictor.py --data_file without --output_file
        "inference/model.pdmodel",  # the README's export example
        "log/workerlog.0",  # paddle.distributed.launch's default --log_dir
        f"demo/model/{CACHE_DIR_NAME}/float32-0123/model.safetensors",  # on-the-fly HF conversion cache
        "checkpoints/demo_sft/model_state.pdparams",  # the demo argument files' output_dir
    ]
    proc = subprocess.run(["git", "check-ignore", *written], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.split() == written


def test_requirement_files_reference_existing_files() -> None:
    for name in ("requirements.txt", "requirements-dev.txt"):
        text = (ROOT / name).read_text()
        for ref in re.findall(r"[\w./-]+\.(?:md|txt)\b", text):
            assert (ROOT / ref).is_file(), f"{name} mentions {ref}, which does not exist"
