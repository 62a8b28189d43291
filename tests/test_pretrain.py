"""run_pretrain.py: GPT-style samples over mmap token files, the index cache, the workflow for the Pretrain
families (llama, qwen, gpt), automatic resume after ``kill -9``, and the errors a user can hit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import paddle
import pytest
from conftest import DEMO_MODEL, ROOT

import llm  # noqa: F401
from llm.data.mmap import MMapTokens, MMapWriter
from llm.errors import ConfigError, DataError
from llm.outputs import COMPLETE_MARKER
from llm.pretrain import dataset as ds
from llm.pretrain.run import run
from llm.tokenizer import load_tokenizer
from llm.train.callbacks import LOG_NAME, PLOT_NAME

SEQ = 32


def _write_tokens(prefix: Path, n_docs: int, seed: int = 0) -> list[np.ndarray]:
    """Random documents of 5..60 tokens (ids 4..159: no special tokens) written as one token file."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(4, 160, size=int(rng.integers(5, 60))).astype(np.uint16) for _ in range(n_docs)]
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with MMapWriter(str(prefix), dtype=np.uint16) as writer:
        for doc in docs:
            writer.add_document(doc)
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with one token file of 300 documents of demo-tokenizer text (learnable: loss must fall)."""
    folder = tmp_path_factory.mktemp("corpus")
    tokenizer = load_tokenizer(str(DEMO_MODEL))
    words = "one two three four five six seven eight nine ten".split()
    with MMapWriter(str(folder / "text"), dtype=np.uint16) as writer:
        for i in range(300):
            start = i % 7
            text = " ".join(words[(start + k) % 10] for k in range(12)) + "."
            writer.add_document(tokenizer.encode(text) + [tokenizer.eos_token_id])
    return folder


def _argv(model_dir: Path, input_dir: Path | str, out: Path, **values: object) -> list[str]:
    flags: dict[str, object] = {
        "model_name_or_path": model_dir,
        "input_dir": input_dir,
        "output_dir": out,
        "split": "90,10,0",
        "max_seq_length": SEQ,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 12,
        "learning_rate": "3e-3",
        "min_learning_rate": "3e-4",
        "warmup_steps": 2,
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "eval_steps": 6,
        "evaluation_strategy": "steps",
        "save_steps": 6,
        "do_train": "true",
        "do_eval": "true",
        "disable_tqdm": "true",
        "report_to": "none",
        "seed": 3,
    }
    flags.update(values)
    return [part for key, value in flags.items() for part in (f"--{key}", str(value))]


# ----------------------------------------------------------------------------- samples


def test_split_ranges_follow_the_ratio() -> None:
    assert ds.split_ranges("949,50,1", 1000) == [(0, 949), (949, 999), (999, 1000)]
    assert ds.split_ranges("98,2,0", 50) == [(0, 49), (49, 50), (50, 50)]
    assert ds.split_ranges("1", 7) == [(0, 7), (7, 7), (7, 7)]
    with pytest.raises(ConfigError, match="949,50,1"):
        ds.parse_split("a,b")


def test_samples_are_overlapping_windows_of_the_shuffled_stream(tmp_path: Path) -> None:
    docs = _write_tokens(tmp_path / "t", 40)
    tokens = MMapTokens(str(tmp_path / "t"))
    index = ds.build_sample_index(tokens.sizes, (5, 35), num_samples=100, seq_length=SEQ, seed=7)
    assert set(index["doc_idx"].tolist()) == set(range(5, 35))  # only the split's documents
    stream = np.concatenate([docs[d] for d in index["doc_idx"]]).astype(np.int64)
    dataset = ds.GPTDataset(tokens, index, SEQ, "train")
    assert len(dataset) >= 100
    order = index["shuffle_idx"]
    assert sorted(order.tolist()) == list(range(len(dataset)))
    for idx in (0, 1, 17, len(dataset) - 1):
        start = int(order[idx]) * SEQ
        item = dataset[idx]
        np.testing.assert_array_equal(item["input_ids"], stream[start : start + SEQ])
        np.testing.assert_array_equal(item["labels"], stream[start + 1 : start + SEQ + 1])
    again = ds.build_sample_index(tokens.sizes, (5, 35), num_samples=100, seq_length=SEQ, seed=7)
    assert all(np.array_equal(index[k], again[k]) for k in index)


def test_blending_follows_the_weights() -> None:
    dataset_index, sample_index = ds.blend_index([3.0, 1.0], 400)
    counts = np.bincount(dataset_index)
    assert counts.tolist() == [300, 100]
    for d in (0, 1):  # each dataset is read in order, from its first sample
        assert sample_index[dataset_index == d].tolist() == list(range(counts[d]))


def test_index_cache_is_built_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_tokens(tmp_path / "data" / "a", 30, seed=1)
    _write_tokens(tmp_path / "data" / "b", 30, seed=2)
    options = ds.BuildOptions(input_dir=str(tmp_path / "data"), split="80,20,0", max_seq_length=SEQ, seed=1)
    first = ds.build_datasets(options, [50, 10, 0])
    assert isinstance(first[0], ds.BlendedDataset) and first[2] is None
    cache = tmp_path / "data" / "index-cache"
    kinds = sorted(p.name.rsplit("_", 2)[0] for p in cache.glob("*_desc.json"))
    assert kinds == ["train", "train", "train_blend", "validation", "validation", "validation_blend"]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("index rebuilt")

    monkeypatch.setattr(ds, "build_sample_index", fail)
    monkeypatch.setattr(ds, "blend_index", fail)
    second = ds.build_datasets(options, [50, 10, 0])
    for a, b in zip(first[:2], second[:2]):
        assert len(a) == len(b)
        np.testing.assert_array_equal(a.window(len(a) - 1), b.window(len(b) - 1))


def test_weighted_input_dir_and_errors(tmp_path: Path) -> None:
    _write_tokens(tmp_path / "a", 20)
    assert ds.parse_input_dir(f"2 {tmp_path / 'a'} 1 {tmp_path / 'a'}") == [
        (2.0, str(tmp_path / "a")),
        (1.0, str(tmp_path / "a")),
    ]
    with pytest.raises(ConfigError, match="pairs"):
        ds.parse_input_dir(f"2 {tmp_path / 'a'} 1")
    with pytest.raises(DataError, match="input_dir not found"):
        ds.parse_input_dir(str(tmp_path / "missing"))
    tokens = MMapTokens(str(tmp_path / "a"))
    with pytest.raises(DataError, match="max_seq_length"):
        ds.build_sample_index(tokens.sizes, (0, 1), num_samples=1, seq_length=10_000, seed=0)


# ----------------------------------------------------------------------------- workflow


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.parametrize("family", ["llama", "qwen", "gpt"])
def test_pretraining_learns_and_writes_the_outputs(
    family: str, corpus: Path, tiny_model_factory, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    extra = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if family == "gpt" else {}
    metrics = run(_argv(tiny_model_factory(family), corpus, out, **extra))
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 13))
    assert np.mean([losses[s] for s in (10, 11, 12)]) < losses[1] - 0.6
    assert metrics["eval_loss"] < losses[1] and "train_tokens_per_second" in metrics
    records = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert any("interval_tokens_per_second" in r for r in records)
    assert [r["step"] for r in records if "eval_loss" in r][:2] == [6, 12]
    for name in ("metrics.json", PLOT_NAME, COMPLETE_MARKER, "config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-12" / COMPLETE_MARKER).is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] % 128 == 0 and config["seq_length"] == SEQ
    from llm.model import load_model

    model = load_model(str(out))
    assert sum(int(np.prod(p.shape)) for p in model.parameters()) > 0


def test_continue_training_starts_from_the_weights(corpus: Path, tiny_model_factory, tmp_path: Path) -> None:
    """``continue_training`` loads the weights: the first loss equals the loaded model's loss on that batch,
    while a from-config run (same seed) starts elsewhere."""
    first = tmp_path / "first"
    run(_argv(tiny_model_factory("llama"), corpus, first, max_steps=12, do_eval="false"))
    cont = tmp_path / "cont"
    run(_argv(first, corpus, cont, max_steps=1, continue_training="true", do_eval="false"))
    scratch = tmp_path / "scratch"
    run(_argv(first, corpus, scratch, max_steps=1, do_eval="false"))
    assert _losses(cont)[1] < _losses(first)[1] - 1.0
    assert _losses(scratch)[1] > _losses(cont)[1] + 1.0


def test_config_errors_before_any_work(corpus: Path, tiny_model_factory, tmp_path: Path) -> None:
    model = tiny_model_factory("llama")
    with pytest.raises(ConfigError, match="max_steps"):
        run(_argv(model, corpus, tmp_path / "o", max_steps=-1))
    with pytest.raises(ConfigError, match="trains llama, qwen, gpt"):
        run(_argv(tiny_model_factory("bloom"), corpus, tmp_path / "o"))
    with pytest.raises(DataError, match="input_dir not found"):
        run(_argv(model, tmp_path / "nowhere", tmp_path / "o"))
    with pytest.raises(ConfigError, match="did you mean"):
        run([*_argv(model, corpus, tmp_path / "o"), "--max_seq_lenght", "8"])
    assert not (tmp_path / "o").exists()


def test_kill_9_then_rerun_resumes_to_the_same_losses(
    corpus: Path, tiny_model_factory, tmp_path: Path
) -> None:
    """A real ``kill -9`` after the first checkpoint; rerunning the same command resumes from it and logs the
    same per-step losses (and the same final eval loss) as a run that was never interrupted."""
    model = tiny_model_factory("llama")
    values = {"max_steps": 60, "save_steps": 5, "eval_steps": 30, "disable_tqdm": "true"}
    reference = tmp_path / "reference"
    reference_metrics = run(_argv(model, corpus, reference, **values))

    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "run_pretrain.py"), *_argv(model, corpus, out, **values)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoint-5" / COMPLETE_MARKER).exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / COMPLETE_MARKER).exists()

    resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Continuing training from checkpoint" in resumed.stderr + resumed.stdout
    assert _losses(out) == _losses(reference)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] == pytest.approx(reference_metrics["eval_loss"], abs=0, rel=0)
    final = paddle.load(str(out / "model_state.pdparams"), return_numpy=True)
    expected = paddle.load(str(reference / "model_state.pdparams"), return_numpy=True)
    assert all(np.array_equal(final[k], expected[k]) for k in expected)
