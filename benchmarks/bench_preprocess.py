"""Throughput of the pretraining-data preprocessing CLI (``python -m llm.tools.preprocess``), 1 vs 2 workers, CPU.

Usage::

    python benchmarks/bench_preprocess.py [--mb 50] [--workers 1,2] [--rounds 2] [--model demo/model]

Generates a deterministic JSONL corpus of at least ``--mb`` MiB in a temp dir (documents of 1-30 sentences of
4-18 words drawn from a fixed word list with ``random.Random(0)``), then runs the CLI with ``--append_eos`` once per
worker count per round, each in its own subprocess, alternating the worker counts. Reported per worker count (median
over rounds): documents/s, tokens/s and input MiB/s over the subprocess's wall time (interpreter start and tokenizer
load included), wall seconds, speed-up over the first worker count, and the peak RSS of the main process and of the
largest worker. Also checks that every run wrote byte-identical files. Writes ``preprocess.json`` /
``preprocess.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = (
    "the of and to in is was for on that with as by at from his her an which or be are this had not but it "
    "were they have one all new first two been their has its would who more after time year other into some "
    "people city state world many most also only over such made these three work between years under being "
    "water river school music family during history system number north south small early national public "
    "government century known part called later several before large place since group found against while "
    "language million around until second became including night market station season island village"
).split()
# Runs the CLI in-process and reports peak RSS of itself and of its largest (already reaped) child.
_RUNNER = (
    "import resource, sys, json\n"
    "from llm.tools.preprocess import main\n"
    "main(sys.argv[1:])\n"
    "me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print('RSS ' + json.dumps([me.ru_maxrss / 1024, kids.ru_maxrss / 1024]), file=sys.stderr)\n"
)


def make_corpus(path: Path, mib: float, seed: int = 0) -> dict:
    """Write the JSONL corpus; returns its size, document and character counts."""
    rng = random.Random(seed)
    target = int(mib * 2**20)
    docs = written = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            sentences = []
            for _ in range(rng.randint(1, 30)):
                words = rng.choices(WORDS, k=rng.randint(4, 18))
                sentences.append(" ".join(words).capitalize() + rng.choice(".!?."))
            line = json.dumps({"text": " ".join(sentences), "id": docs}) + "\n"
            fh.write(line)
            written += len(line)
            docs += 1
    return {"bytes": written, "documents": docs}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run_cli(model: str, corpus: Path, prefix: Path, workers: int) -> dict:
    cmd = [sys.executable, "-c", _RUNNER, "--model_name", model, "--input_path", str(corpus)]
    cmd += [
        "--output_prefix",
        str(prefix),
        "--append_eos",
        "--workers",
        str(workers),
        "--log_interval",
        "100000000",
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"workers={workers} failed:\n{proc.stderr[-3000:]}")
    rss = json.loads(next(ln for ln in proc.stderr.splitlines() if ln.startswith("RSS "))[4:])
    return {
        "wall_s": wall,
        "summary": proc.stdout.strip().splitlines()[-1],
        "peak_rss_mb": rss[0],
        "worker_peak_rss_mb": rss[1],
        "bin_sha256": sha256(prefix.with_suffix(".bin")),
        "idx_sha256": sha256(prefix.with_suffix(".idx")),
    }


def table(results: dict[int, dict]) -> str:
    heads = ["workers", "docs/s", "tokens/s", "MiB/s", "wall (s)", "speed-up", "peak RSS main / worker (MB)"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    base = next(iter(results.values()))["wall_s"]
    for workers, r in results.items():
        worker_rss = f"{r['worker_peak_rss_mb']:.0f}" if workers > 1 else "—"
        lines.append(
            f"| {workers} | {r['docs_per_s']:,.0f} | {r['tokens_per_s']:,.0f} | {r['mib_per_s']:.2f} | "
            f"{r['wall_s']:.1f} | {base / r['wall_s']:.2f}x | {r['peak_rss_mb']:.0f} / {worker_rss} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MiB")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default=str(ROOT / "demo" / "model"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",") if w]
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs: dict[int, list[dict]] = {w: [] for w in counts}
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        t = time.perf_counter()
        info = make_corpus(corpus, args.mb)
        print(
            f"corpus: {info['bytes'] / 2**20:.1f} MiB, {info['documents']} documents ({time.perf_counter() - t:.1f} s)"
        )
        for round_ in range(args.rounds):
            order = counts if round_ % 2 == 0 else counts[::-1]
            for workers in order:
                print(f"round {round_ + 1}/{args.rounds}: workers={workers} ...", file=sys.stderr, flush=True)
                r = run_cli(args.model, corpus, Path(tmp) / f"out_w{workers}_r{round_}", workers)
                print(f"  {r['wall_s']:.1f} s: {r['summary']}", file=sys.stderr, flush=True)
                runs[workers].append(r)
        from llm.data.mmap import MMapTokens

        out = MMapTokens(Path(tmp) / f"out_w{counts[0]}_r0")
        docs, tokens, dtype = len(out), out.num_tokens, str(out.dtype)
    model_name = (
        os.path.relpath(args.model, ROOT) if Path(args.model).resolve().is_relative_to(ROOT) else args.model
    )
    hashes = {(r["bin_sha256"], r["idx_sha256"]) for rs in runs.values() for r in rs}
    results: dict[int, dict] = {}
    for workers, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        results[workers] = {
            "wall_s": wall,
            "docs_per_s": docs / wall,
            "tokens_per_s": tokens / wall,
            "mib_per_s": info["bytes"] / 2**20 / wall,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "worker_peak_rss_mb": max(r["worker_peak_rss_mb"] for r in rs),
        }
    load_after = os.getloadavg()
    md = table(results)
    payload = {
        "started": started,
        "machine": {"cpus": os.cpu_count(), "load_avg_before": load_before, "load_avg_after": load_after},
        "corpus": {
            **info,
            "mib": info["bytes"] / 2**20,
            "tokens": tokens,
            "dtype": dtype,
            "tokenizer": model_name,
        },
        "settings": {"workers": counts, "rounds": args.rounds, "append_eos": True},
        "identical_outputs": len(hashes) == 1,
        "results": results,
        "rounds": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps(payload, indent=2))
    lines = [
        md,
        "",
        f"Corpus {info['bytes'] / 2**20:.1f} MiB, {docs} documents, {tokens} tokens ({dtype}), tokenizer "
        f"{model_name}; median of {args.rounds} rounds, wall time of the whole subprocess. "
        f"Outputs identical across runs: {'yes' if len(hashes) == 1 else 'NO'}.",
        f"Run of {started} on {os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after.",
    ]
    (args.out / "preprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
