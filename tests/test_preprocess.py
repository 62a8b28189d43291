"""Pretraining token files (llm.data.mmap) and the JSONL -> .bin/.idx preprocessing CLI (llm.tools.preprocess)."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from llm.data.mmap import MMapTokens, MMapWriter, best_fitting_dtype, find_token_prefixes
from llm.errors import DataError
from llm.tokenizer import load_tokenizer
from llm.tools import preprocess

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "demo" / "model"
WORDS = "spell digits one two three four five six seven eight nine ten hundred forty seventy".split()


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_MODEL))


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(1, 12))
        out.append(" ".join(words) + (f": {rng.randint(0, 999)}" if rng.random() < 0.5 else ""))
    return out


def _write_jsonl(path: Path, texts: list[str], blank_every: int = 0) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"text": text, "id": i}, ensure_ascii=False) + "\n")
            if blank_every and i % blank_every == 0:
                fh.write("\n")


def _docs(prefix: Path) -> list[list[int]]:
    t = MMapTokens(prefix)
    return [t.get(i).tolist() for i in range(len(t))]


def _cli(*args: str) -> list[str]:
    return ["--model_name", str(DEMO_MODEL), *args]


def _leftovers(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_round_trip_matches_paddlenlp(tmp_path: Path, dtype: type) -> None:
    from paddlenlp.data.indexed_dataset import MMapIndexedDataset, MMapIndexedDatasetBuilder, make_dataset

    rng = np.random.RandomState(0)
    high = 60000 if dtype is np.uint16 else 200000
    docs = [rng.randint(0, high, size=rng.randint(0, 50)).tolist() for _ in range(40)]
    docs[3] = []  # empty documents are skipped
    kept = [d for d in docs if d]
    with MMapWriter(tmp_path / "ours", dtype=dtype) as w:
        for i, d in enumerate(docs):
            w.add_document(np.asarray(d, dtype=np.int64) if i % 2 else d)
    t = MMapTokens(tmp_path / "ours")
    assert len(t) == len(kept) and t.dtype == np.dtype(dtype) and t.format == "mmap"
    assert t.sizes.dtype == np.int32 and t.sizes.tolist() == [len(d) for d in kept]
    assert t.num_tokens == sum(map(len, kept))
    assert [t.get(i).tolist() for i in range(len(t))] == kept
    assert t.get(1, offset=2, length=3).tolist() == kept[1][2:5] and t.get(-1).tolist() == kept[-1]
    assert t.doc_idx.tolist() == list(range(len(kept) + 1))
    again = pickle.loads(pickle.dumps(t))  # DataLoader workers reopen by prefix
    assert again.get(4).tolist() == kept[4] and isinstance(t.get(4), np.ndarray)

    theirs = MMapIndexedDataset(str(tmp_path / "ours"), skip_warmup=True)
    assert theirs.sizes.tolist() == t.sizes.tolist() and theirs.doc_idx.tolist() == t.doc_idx.tolist()
    assert [theirs.get(i)[0].tolist() for i in range(len(theirs))] == kept
    made = make_dataset(
        str(tmp_path / "ours"), "mmap", skip_warmup=True
    )  # keep it: its __del__ unmaps the file
    assert made[5].tolist() == kept[5]

    # byte-identical to paddlenlp's own builder (add_item + end_document per document)
    builder = MMapIndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=dtype)
    for d in kept:
        builder.add_item(d)
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"ref{suffix}").read_bytes()


def test_writer_exception_leaves_nothing_and_overwrite_replaces(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), MMapWriter(tmp_path / "x") as w:
        w.add_document([1, 2, 3])
        assert any(name.endswith(".tmp-data") for name in _leftovers(tmp_path))  # writing under a temp name
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []

    with MMapWriter(tmp_path / "x") as w:
        w.add_document([1, 2, 3])
    with MMapWriter(tmp_path / "x") as w:
        w.add_documents(np.array([7, 8, 9, 10]), [1, 0, 3])
    assert _docs(tmp_path / "x") == [[7], [8, 9, 10]]
    assert _leftovers(tmp_path) == ["x.bin", "x.idx"]

    with pytest.raises(ValueError, match="does not fit"), MMapWriter(tmp_path / "y", dtype=np.uint16) as w:
        w.add_document([70000])
    assert _leftovers(tmp_path) == ["x.bin", "x.idx"]
    assert best_fitting_dtype(160) is np.uint16 and best_fitting_dtype(65500) is np.int32


def test_writer_interrupted_between_renames_leaves_no_half_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.replace

    def replace(src: str, dst: str) -> None:
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt), MMapWriter(tmp_path / "x") as w:
        w.add_document([1, 2])
    assert _leftovers(tmp_path) == []


def test_legacy_npy_npz_format(tmp_path: Path) -> None:
    from paddlenlp.data.indexed_dataset import CompatibleIndexedDataset

    docs = [[5, 6, 7], [8], [9, 10, 11, 12]]
    np.save(tmp_path / "old_ids.npy", np.array(sum(docs, []), dtype=np.int32))
    np.savez(tmp_path / "old_idx.npz", lens=np.array([3, 1, 4], dtype=np.int64), docs=np.array([0, 2, 3]))
    t = MMapTokens(tmp_path / "old")
    assert t.format == "legacy" and len(t) == 3 and t.sizes.dtype == np.int32 and t.num_tokens == 8
    assert _docs(tmp_path / "old") == docs and t.doc_idx.tolist() == [0, 2, 3]
    assert t.get(2, offset=1, length=2).tolist() == [10, 11]
    ref = CompatibleIndexedDataset(str(tmp_path / "old"))
    assert [ref.get(i)[0].tolist() for i in range(3)] == docs

    np.save(tmp_path / "nodocs_ids.npy", np.array([1, 2, 3], dtype=np.int64))
    np.savez(tmp_path / "nodocs_idx.npz", lens=np.array([2, 1]))
    assert MMapTokens(tmp_path / "nodocs").doc_idx.tolist() == [0, 1, 2]


def test_find_token_prefixes(tmp_path: Path) -> None:
    with MMapWriter(tmp_path / "b_new") as w:
        w.add_document([1])
    np.save(tmp_path / "a_old_ids.npy", np.array([1, 2], dtype=np.int32))
    np.savez(tmp_path / "a_old_idx.npz", lens=np.array([2]))
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.idx").mkdir()  # folders are ignored
    unfinished = MMapWriter(tmp_path / "c_running")  # a writer in progress: its temp files are not listed
    unfinished.add_document([3])
    try:
        prefixes = find_token_prefixes(tmp_path)
    finally:
        unfinished.abort()
    assert prefixes == [str(tmp_path / "a_old"), str(tmp_path / "b_new")]
    assert [len(MMapTokens(p)) for p in prefixes] == [1, 1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no token files"):
        find_token_prefixes(empty)
    with pytest.raises(DataError, match="not a directory"):
        find_token_prefixes(tmp_path / "missing")


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[:-3]
    elif how == "magic":
        data[:4] = b"XXXX"
    elif how == "dtype":
        data[17] = 42
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("target", "how", "message"),
    [
        (".bin", "truncate", "truncated data file"),
        (".idx", "truncate", "truncated index"),
        (".idx", "magic", "not an MMapIndexedDataset index"),
        (".idx", "dtype", "unknown dtype code 42"),
        (".bin", "delete", "missing file"),
        (".idx", "delete", "missing file"),
    ],
)
def test_damaged_files_raise_data_error(tmp_path: Path, target: str, how: str, message: str) -> None:
    with MMapWriter(tmp_path / "d") as w:
        w.add_document(list(range(10)))
        w.add_document([4, 5])
    path = tmp_path / f"d{target}"
    if how == "delete":
        path.unlink()
    else:
        _corrupt(path, how)
    with pytest.raises(DataError, match=message) as err:
        MMapTokens(tmp_path / "d")
    assert str(path) in str(err.value)


def test_damaged_legacy_and_missing_prefix(tmp_path: Path) -> None:
    np.save(tmp_path / "l_ids.npy", np.arange(100, dtype=np.int32))
    np.savez(tmp_path / "l_idx.npz", lens=np.array([60, 40]))
    ids = tmp_path / "l_ids.npy"
    ids.write_bytes(ids.read_bytes()[:-40])
    with pytest.raises(DataError, match="l_ids.npy"):
        MMapTokens(tmp_path / "l")
    np.save(tmp_path / "k_ids.npy", np.arange(5, dtype=np.int32))
    np.savez(tmp_path / "k_idx.npz", sizes=np.array([5]))
    with pytest.raises(DataError, match="no 'lens' array"):
        MMapTokens(tmp_path / "k")
    np.savez(tmp_path / "k_idx.npz", lens=np.array([2, 2]))
    with pytest.raises(DataError, match="inconsistent token array"):
        MMapTokens(tmp_path / "k")
    with pytest.raises(DataError, match="no token files for prefix"):
        MMapTokens(tmp_path / "nothing")


# ------------------------------------------------------------------------------------------- CLI
def test_cli_file_folder_glob_and_workers(tmp_path: Path, tok, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    texts_a, texts_b, texts_c = _texts(300, 1), _texts(120, 2), _texts(50, 3)
    texts_a[7] = "   "  # tokenizes to nothing: skipped, no eos
    _write_jsonl(src / "a.jsonl", texts_a, blank_every=25)
    _write_jsonl(src / "b.json", texts_b)
    _write_jsonl(src / "nested" / "c.jsonl", texts_c)
    (src / "ignored.txt").write_text("not json\n")
    eos = tok.eos_token_id

    def expected(texts: list[str], special: bool = False) -> list[list[int]]:
        ids = [tok.encode(t.strip(), add_special_tokens=special) for t in texts]
        return [i + [eos] for i in ids if i]

    out = tmp_path / "out"
    preprocess.main(
        _cli("--input_path", str(src / "a.jsonl"), "--output_prefix", str(out / "file"), "--append_eos")
    )
    line = capsys.readouterr().out
    assert "299 documents" in line and "skipped 1 empty documents and 12 blank lines" in line
    assert _docs(out / "file") == expected(texts_a)

    preprocess.main(_cli("--input_path", str(src), "--output_prefix", str(out / "folder"), "--append_eos"))
    assert _docs(out / "folder") == expected(texts_a + texts_b + texts_c)  # sorted: a.jsonl, b.json, nested/c

    preprocess.main(_cli("--input_path", str(src / "*.json*"), "--output_prefix", str(out / "glob")))
    assert _docs(out / "glob") == [d[:-1] for d in expected(texts_a + texts_b)]

    preprocess.main(
        _cli("--input_path", str(src / "b.json"), "--output_prefix", str(out / "bos"), "--append_eos")
        + ["--add_special_tokens"]
    )
    assert (
        _docs(out / "bos") == expected(texts_b, special=True) and _docs(out / "bos")[0][0] == tok.bos_token_id
    )

    # --workers 2 (real processes, small chunks so many tasks are in flight) gives byte-identical files
    cmd = [sys.executable, "-m", "llm.tools.preprocess", *_cli("--input_path", str(src), "--append_eos")]
    cmd += [
        "--output_prefix",
        str(out / "w2"),
        "--workers",
        "2",
        "--chunk_size",
        "7",
        "--log_interval",
        "100",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "processed 100 documents" in proc.stderr and "docs/s" in proc.stderr and "MiB/s" in proc.stderr
    for suffix in (".bin", ".idx"):
        assert (out / f"w2{suffix}").read_bytes() == (out / f"folder{suffix}").read_bytes()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "one two"', "invalid JSON"),
        ('["text"]', "expected a JSON object, got list"),
        ('{"body": "one"}', "missing key 'text'"),
        ('{"text": 5}', "'text' must be a string, got int"),
    ],
)
def test_cli_malformed_line(
    tmp_path: Path, line: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "one"}\n\n{"text": "two"}\n' + line + "\n" + '{"text": "three"}\n')
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SystemExit) as exc:
        preprocess.main(
            _cli("--input_path", str(src), "--output_prefix", str(out / "x"), "--chunk_size", "2")
        )
    assert exc.value.code == 2
    assert f"{src}:4: {message}" in capsys.readouterr().err
    assert _leftovers(out) == []


def test_cli_malformed_line_with_workers_and_previous_output(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, _texts(40, 5))
    with open(src, "a") as fh:
        fh.write("not json\n")
    with MMapWriter(tmp_path / "x") as w:  # an older complete output stays untouched by a failed run
        w.add_document([1, 2])
    cmd = [sys.executable, "-m", "llm.tools.preprocess", *_cli("--input_path", str(src))]
    cmd += ["--output_prefix", str(tmp_path / "x"), "--workers", "2", "--chunk_size", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and f"{src}:41: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _leftovers(tmp_path) == ["in.jsonl", "x.bin", "x.idx"] and _docs(tmp_path / "x") == [[1, 2]]


def test_cli_interrupted_run_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, _texts(50, 6))
    out = tmp_path / "out"
    calls = []
    real = MMapWriter.add_documents

    def interrupt(self: MMapWriter, tokens: np.ndarray, lengths: list[int]) -> None:
        calls.append(len(lengths))
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, tokens, lengths)

    monkeypatch.setattr(MMapWriter, "add_documents", interrupt)
    with pytest.raises(SystemExit) as exc:
        preprocess.main(
            _cli("--input_path", str(src), "--output_prefix", str(out / "x"), "--chunk_size", "10")
        )
    assert exc.value.code == 130 and "interrupted: no " in capsys.readouterr().err
    assert calls == [10, 10, 10] and _leftovers(out) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_signal_with_workers_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, _texts(30000, 8))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "llm.tools.preprocess", *_cli("--input_path", str(src))]
    cmd += [
        "--output_prefix",
        str(out / "x"),
        "--workers",
        "2",
        "--chunk_size",
        "16",
        "--log_interval",
        "100",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    first = proc.stderr.readline()  # the first progress line: the run is under way
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert first.startswith("processed ") and proc.returncode == 130, stderr
    assert "interrupted: no " in stderr and "wrote" not in stdout and "Traceback" not in stderr
    assert _leftovers(out) == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--modle_name", "x"], "unknown argument '--modle_name' (did you mean '--model_name'?)"),
        (["--append-eos"], "did you mean '--append_eos'?"),
        (["--data_format", "text"], "--data_format 'text' is not supported: only JSON"),
        (["--data_impl", "lazy"], "--data_impl 'lazy' is not supported: only mmap"),
        (["--split_sentences"], "--split_sentences is not supported"),
        (["--workers", "0"], "--workers must be >= 1"),
    ],
)
def test_cli_flag_errors(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, ["one"])
    with pytest.raises(SystemExit) as exc:
        preprocess.main(_cli("--input_path", str(src), "--output_prefix", str(tmp_path / "x"), *extra))
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert _leftovers(tmp_path) == ["in.jsonl"]


def test_cli_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for path, message in [
        (tmp_path / "missing.jsonl", "no such file or directory"),
        (tmp_path / "empty", "no *.json / *.jsonl files"),
        (tmp_path / "*.jsonl", "the pattern matches no files"),
    ]:
        with pytest.raises(SystemExit) as exc:
            preprocess.main(_cli("--input_path", str(path), "--output_prefix", str(tmp_path / "x")))
        assert exc.value.code == 2
        assert f"{path}: {message}" in capsys.readouterr().err


def test_shell_script_runs(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    _write_jsonl(src, ["one two", "three"])
    script = ROOT / "tools" / "preprocess" / "create_pretraining_data.py"
    cmd = [sys.executable, str(script), *_cli("--tokenizer_name", "LlamaTokenizer", "--input_path", str(src))]
    proc = subprocess.run(
        cmd + ["--output_prefix", str(tmp_path / "x")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 documents" in proc.stdout and len(MMapTokens(tmp_path / "x")) == 2
    header = (tmp_path / "x.idx").read_bytes()[:34]
    assert struct.unpack("<9sQBQQ", header) == (b"MMIDIDX\x00\x00", 1, 8, 2, 3)  # uint16 = code 8
