"""Shared fixtures: repo paths, tiny per-family model directories, GPU-marker skipping."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import paddle
import pytest

import llm  # noqa: F401  (zlib fix before paddle)

try:
    from helpers_model import save_tiny_model
except ImportError:  # tests/ imported as a package
    from tests.helpers_model import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "model"
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "sft"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests cleanly on a CPU-only paddle build."""
    if paddle.is_compiled_with_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA build of paddle and a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_tiny_model_dir(path: Path, family: str, seed: int = 0) -> Path:
    """Save a tiny random ``family`` model in paddlenlp layout with the demo's HF tokenizer files."""
    from llm.tokenizer import load_tokenizer

    save_tiny_model(path, family, load_tokenizer(str(DEMO_MODEL)), seed=seed)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """``factory(family) -> Path`` of a cached tiny model directory for that family."""
    cache: dict[str, Path] = {}

    def factory(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model_dir(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return factory


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tokenized-dataset caches out of the user's home during tests."""
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dataset-cache"))
    os.environ.setdefault("FLAGS_call_stack_level", "0")
