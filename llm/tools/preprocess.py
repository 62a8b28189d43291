"""JSONL corpus -> pretraining token files ``<prefix>.bin`` / ``<prefix>.idx`` (PaddleNLP's create_pretraining_data).

Usage::

    python -m llm.tools.preprocess --model_name demo/model --input_path corpus/ --output_prefix data/corpus \\
        --append_eos --workers 2

One JSON object per line; the ``--json_key`` string of each line is stripped and tokenized without special tokens
(as PaddleNLP does: ``tokenize`` + ``convert_tokens_to_ids``), ``--append_eos`` appends the eos id, and every
non-empty line becomes one document. Blank lines and documents that tokenize to nothing are skipped. The input is
streamed: lines are read lazily in chunks, tokenized by ``--workers`` processes with a bounded number of chunks in
flight, and written in input order, so the output is byte-identical for any worker count. Output goes to
temporary files that are renamed at the end; a failed or interrupted run leaves no ``<prefix>.bin/.idx``.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import glob
import json
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

import llm  # noqa: F401  (zlib fix before paddle)
from llm.data.mmap import BIN_SUFFIX, IDX_SUFFIX, MMapWriter, best_fitting_dtype
from llm.errors import ConfigError, DataError, exit_on_user_error

INPUT_SUFFIXES = (".json", ".jsonl")
DEFAULT_CHUNK_SIZE = 128


class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (PaddleNLP 2.8 ``create_pretraining_data.py`` names)."""
    p = _Parser(
        prog="python -m llm.tools.preprocess",
        description="Tokenize a JSONL corpus into Megatron/PaddleNLP mmap token files (<prefix>.bin/.idx).",
        allow_abbrev=False,
    )
    p.add_argument("--model_name", help="local model/tokenizer directory (tokenizer.json or paddlenlp files)")
    p.add_argument(
        "--tokenizer_name",
        help="tokenizer directory; PaddleNLP's class names (e.g. LlamaTokenizer) are accepted and ignored",
    )
    io = p.add_argument_group("data input/output")
    io.add_argument(
        "--input_path", required=True, help="a JSONL file, a folder (*.json/*.jsonl inside) or a glob"
    )
    io.add_argument(
        "--output_prefix", required=True, help="writes <output_prefix>.bin and <output_prefix>.idx"
    )
    io.add_argument("--data_format", default="JSON", help="only JSON: one object per line")
    io.add_argument("--json_key", default="text", help="key of the text in every JSON object")
    io.add_argument(
        "--split_sentences", action="store_true", help="not supported (one sequence per document)"
    )
    io.add_argument("--data_impl", default="mmap", help="only mmap")
    cn = p.add_argument_group(
        "chinese words (accepted for compatibility; whole-word segmentation unsupported)"
    )
    cn.add_argument("--chinese", action="store_true")
    cn.add_argument("--cn_whole_word_segment", action="store_true")
    cn.add_argument("--cn_seg_func", default="jieba")
    cn.add_argument("--cn_splited", action="store_true")
    cn.add_argument("--cn_split_dimer", default=" ")
    common = p.add_argument_group("common config")
    common.add_argument(
        "--append_eos", action="store_true", help="append the tokenizer's eos id to every document"
    )
    common.add_argument(
        "--add_special_tokens",
        action="store_true",
        help="encode with the tokenizer's BOS/EOS rules (not PaddleNLP's)",
    )
    common.add_argument("--log_interval", type=int, default=100, help="log a progress line every N documents")
    common.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    common.add_argument("--chunk_size", type=int, default=DEFAULT_CHUNK_SIZE, help="lines per worker task")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; ConfigError (with a "did you mean") for anything wrong."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(
            flag.split("=", 1)[0].replace("-", "_").lstrip("_"), [f[2:] for f in flags]
        )
        hint = f" (did you mean '--{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown argument {flag!r}{hint}")
    if args.data_format.upper() != "JSON":
        raise ConfigError(
            f"--data_format {args.data_format!r} is not supported: only JSON (one object per line)"
        )
    if args.data_impl != "mmap":
        raise ConfigError(f"--data_impl {args.data_impl!r} is not supported: only mmap (<prefix>.bin/.idx)")
    if args.split_sentences:
        raise ConfigError("--split_sentences is not supported: every document is written as one sequence")
    if args.cn_whole_word_segment:
        raise ConfigError("--cn_whole_word_segment (Chinese whole-word masking) is not supported")
    for name in ("workers", "log_interval", "chunk_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not os.path.basename(args.output_prefix) or os.path.isdir(args.output_prefix):
        raise ConfigError(f"--output_prefix {args.output_prefix!r} must name files, not a directory")
    args.tokenizer_dir = tokenizer_dir(args.model_name, args.tokenizer_name)
    return args


def tokenizer_dir(model_name: str | None, tokenizer_name: str | None) -> str:
    """``--tokenizer_name`` when it is a directory, else ``--model_name`` (PaddleNLP passes a class name there)."""
    if tokenizer_name and os.path.isdir(tokenizer_name):
        return tokenizer_name
    if not model_name:
        raise ConfigError("--model_name (the model or tokenizer directory) is required")
    return model_name


def resolve_inputs(input_path: str) -> list[str]:
    """Input files: the file itself, every *.json/*.jsonl under a folder (sorted), or a glob's matches (sorted)."""
    if os.path.isfile(input_path):
        return [input_path]
    if os.path.isdir(input_path):
        found = []
        for root, dirs, files in os.walk(input_path):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            found += [
                os.path.join(root, f) for f in files if f.endswith(INPUT_SUFFIXES) and not f.startswith(".")
            ]
        if not found:
            raise DataError(
                f"no {' / '.join('*' + s for s in INPUT_SUFFIXES)} files in this folder", input_path
            )
        return sorted(found)
    if glob.has_magic(input_path):
        found = sorted(p for p in glob.glob(input_path, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataError("the pattern matches no files", input_path)
        return found
    raise DataError("no such file or directory", input_path)


# ---------------------------------------------------------------------------------------------- tokenizing
@dataclass(frozen=True)
class EncodeSettings:
    """What a worker needs to turn lines into token ids."""

    tokenizer_dir: str
    json_key: str
    append_eos: bool
    add_special_tokens: bool
    dtype: str


@dataclass
class ChunkResult:
    """Tokens of one chunk of lines: concatenated ids, per-line lengths (0 = skipped), or an error message."""

    tokens: np.ndarray
    lengths: list[int]
    blank: int
    error: str | None = None


_WORKER: dict[str, Any] = {}


def init_worker(settings: EncodeSettings, ignore_sigint: bool = True) -> None:
    """Pool initializer: load the tokenizer once per process (errors are reported by the first chunk)."""
    if ignore_sigint:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and terminates the pool
        signal.signal(
            signal.SIGTERM, signal.SIG_DFL
        )  # not the parent's handler: Pool.terminate() uses SIGTERM
    _WORKER.clear()
    _WORKER["settings"] = settings
    try:
        from llm.tokenizer import load_tokenizer

        _WORKER["tokenizer"] = load_tokenizer(settings.tokenizer_dir)
    except Exception as err:  # noqa: BLE001 - a crashing initializer makes Pool respawn workers forever
        _WORKER["error"] = f"worker could not load the tokenizer: {err}"


def _line_text(raw: bytes, key: str) -> str:
    """The text of one JSONL line; ValueError with a short reason when malformed."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"not UTF-8 ({err.reason} at byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"missing key {key!r} (keys: {', '.join(map(repr, list(obj)[:8]))})")
    text = obj[key]
    if not isinstance(text, str):
        raise ValueError(f"{key!r} must be a string, got {type(text).__name__}")
    return text


def encode_chunk(chunk: tuple[str, int, list[bytes]]) -> ChunkResult:
    """Tokenize ``(path, first_line_number, lines)`` with the process's tokenizer (see :func:`init_worker`)."""
    settings: EncodeSettings = _WORKER["settings"]
    dtype = np.dtype(settings.dtype)
    if "error" in _WORKER:
        return ChunkResult(np.zeros(0, dtype), [], 0, _WORKER["error"])
    tok = _WORKER["tokenizer"]
    path, first, lines = chunk
    flat: list[int] = []
    lengths: list[int] = []
    blank = 0
    for number, raw in enumerate(lines, start=first):
        if not raw.strip():
            blank += 1
            continue
        try:
            text = _line_text(raw, settings.json_key).strip()
        except ValueError as err:
            return ChunkResult(np.zeros(0, dtype), [], 0, f"{path}:{number}: {err}")
        ids = tok.encode(text, add_special_tokens=settings.add_special_tokens) if text else []
        if ids and settings.append_eos:
            ids.append(tok.eos_token_id)
        flat.extend(ids)
        lengths.append(len(ids))
    arr = np.array(flat, dtype=np.int64)
    info = np.iinfo(dtype)
    if arr.size and (int(arr.min()) < info.min or int(arr.max()) > info.max):
        return ChunkResult(arr[:0], [], 0, f"{path}:{first}: token ids exceed the output dtype {dtype}")
    return ChunkResult(arr.astype(dtype), lengths, blank)


def read_chunks(paths: Iterable[str], chunk_size: int) -> Iterator[tuple[str, int, list[bytes]]]:
    """Lazily yield ``(path, first_line_number, raw_lines)`` of at most ``chunk_size`` lines, file by file."""
    for path in paths:
        try:
            fh = open(path, "rb")  # noqa: SIM115 - closed below, generator may stop early
        except OSError as err:
            raise DataError(f"cannot read: {err.strerror}", path) from None
        with fh:
            lines: list[bytes] = []
            first = 1
            for number, raw in enumerate(fh, start=1):
                lines.append(raw)
                if len(lines) == chunk_size:
                    yield path, first, lines
                    lines, first = [], number + 1
            if lines:
                yield path, first, lines


def ordered_map(
    func: Callable[[Any], Any], items: Iterable[Any], pool: Any | None, max_pending: int
) -> Iterator[tuple[Any, Any]]:
    """``(item, func(item))`` in input order; with a pool at most ``max_pending`` tasks are in flight.

    (``Pool.imap`` would read the whole input ahead of the workers; this keeps memory bounded.)
    """
    if pool is None:
        for item in items:
            yield item, func(item)
        return
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append((item, pool.apply_async(func, (item,))))
        if len(pending) >= max_pending:
            done, result = pending.popleft()
            yield done, result.get()
    while pending:
        done, result = pending.popleft()
        yield done, result.get()


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """tqdm bar over input bytes with docs/s and tokens/s, plus a log line every ``log_interval`` documents."""

    def __init__(self, total_bytes: int, log_interval: int, enabled: bool | None = None):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="tokenize",
            file=sys.stderr,
            disable=enabled is False or (enabled is None and not sys.stderr.isatty()),
            mininterval=0.5,
        )
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.docs = self.tokens = self.bytes = 0
        self._next_log = log_interval

    def rates(self) -> tuple[float, float, float, float]:
        """Seconds elapsed, docs/s, tokens/s, MiB/s of input."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return elapsed, self.docs / elapsed, self.tokens / elapsed, self.bytes / elapsed / 2**20

    def update(self, docs: int, tokens: int, nbytes: int) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        _, dps, tps, _ = self.rates()
        self.bar.set_postfix_str(f"{self.docs} docs, {dps:.0f} docs/s, {tps:.0f} tok/s", refresh=False)
        self.bar.update(nbytes)
        if self.docs >= self._next_log:
            elapsed, dps, tps, mbs = self.rates()
            self._tqdm.write(
                f"processed {self.docs} documents, {self.tokens} tokens in {elapsed:.1f} s "
                f"({dps:.1f} docs/s, {tps:.0f} tokens/s, {mbs:.2f} MiB/s)",
                file=sys.stderr,
            )
            self._next_log = (self.docs // self.log_interval + 1) * self.log_interval

    def close(self) -> None:
        self.bar.close()


# ---------------------------------------------------------------------------------------------- driver
def run(args: argparse.Namespace, progress: bool | None = None) -> dict[str, Any]:
    """Tokenize ``args.input_path`` into ``args.output_prefix``.bin/.idx; returns the run's statistics."""
    from llm.tokenizer import load_tokenizer

    paths = resolve_inputs(args.input_path)
    tok = load_tokenizer(args.tokenizer_dir)
    if args.append_eos and tok.eos_token_id is None:
        raise ConfigError(f"--append_eos: the tokenizer in {args.tokenizer_dir} has no eos token")
    dtype = np.dtype(best_fitting_dtype(len(tok)))
    settings = EncodeSettings(
        args.tokenizer_dir, args.json_key, args.append_eos, args.add_special_tokens, dtype.name
    )
    prefix = args.output_prefix
    existing = [prefix + s for s in (BIN_SUFFIX, IDX_SUFFIX) if os.path.exists(prefix + s)]
    if existing:
        print(f"warning: overwriting {' and '.join(existing)} when the run completes", file=sys.stderr)
    total_bytes = sum(os.path.getsize(p) for p in paths)
    stats = {"files": len(paths), "input_bytes": total_bytes, "dtype": dtype.name, "workers": args.workers}
    empty = blank = 0
    pool = None
    try:
        if args.workers > 1:  # fork before the progress bar's monitor thread exists
            pool = multiprocessing.Pool(args.workers, initializer=init_worker, initargs=(settings,))
        else:
            _WORKER.update(settings=settings, tokenizer=tok)
        bar = Progress(total_bytes, args.log_interval, progress)
        try:
            with MMapWriter(prefix, dtype) as writer:
                chunks = read_chunks(paths, args.chunk_size)
                for chunk, res in ordered_map(encode_chunk, chunks, pool, max_pending=4 * args.workers):
                    if res.error:
                        raise DataError(res.error)
                    writer.add_documents(res.tokens, res.lengths)
                    written = sum(1 for n in res.lengths if n)
                    empty += len(res.lengths) - written
                    blank += res.blank
                    bar.update(written, int(res.tokens.size), sum(len(line) for line in chunk[2]))
        finally:
            bar.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        _WORKER.clear()
    elapsed, dps, tps, mbs = bar.rates()
    stats.update(
        documents=writer.num_documents,
        tokens=writer.num_tokens,
        empty_documents=empty,
        blank_lines=blank,
        seconds=elapsed,
        docs_per_s=dps,
        tokens_per_s=tps,
        mib_per_s=mbs,
    )
    return stats


def summary(prefix: str, stats: dict[str, Any]) -> str:
    """The one-line report printed at the end of a run."""
    return (
        f"wrote {prefix}{BIN_SUFFIX} and {prefix}{IDX_SUFFIX}: {stats['documents']} documents, {stats['tokens']} "
        f"tokens ({stats['dtype']}) from {stats['files']} file(s), {stats['input_bytes'] / 2**20:.2f} MiB in "
        f"{stats['seconds']:.1f} s ({stats['docs_per_s']:.1f} docs/s, {stats['tokens_per_s']:.0f} tokens/s, "
        f"{stats['mib_per_s']:.2f} MiB/s); skipped {stats['empty_documents']} empty documents and "
        f"{stats['blank_lines']} blank lines"
    )


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (exit code 2 with one ``error:`` line for bad flags or data)."""
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # kill <pid> cleans up like Ctrl-C
    try:
        stats = run(args)
    except KeyboardInterrupt:
        print(f"interrupted: no {args.output_prefix}{BIN_SUFFIX} or {IDX_SUFFIX} written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(summary(args.output_prefix, stats), flush=True)


if __name__ == "__main__":
    # Run the importable module's main, so pool tasks pickle as llm.tools.preprocess.* (not __main__.*).
    from llm.tools.preprocess import main as _main

    _main()
