"""Serving throughput: concurrent streaming clients against requests sent one at a time, on one server.

Usage::

    python benchmarks/bench_serving.py [--new 128] [--requests 16] [--levels 4,16] [--max_batch_size 16]

Builds the random ~135M LLaMA weights of ``bench_generation.py`` (hidden 576, 30 layers, vocab 49152) as a
paddle model directory with a word-level tokenizer over the same 49152 ids (``w0 ... w49150``, eos ``</s>``),
starts ``flask_server.py --no_ui`` on it once, and sends ``--requests`` streaming ``/v1/completions`` requests
of a 32-word prompt and ``--new`` new tokens each (greedy), first from one client, one at a time (PaddleNLP's
server answers one request at a time), then from 4 and 16 concurrent clients sharing the same requests. Per level it reports the
generated tokens/s over the whole level (tokens counted from ``usage``), the time to first token (p50/p95) and
the time per output token (mean over requests). Writes ``serving.json`` / ``serving.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench_generation as bg  # shared geometry and weights (benchmarks/ is the script's own dir)
import numpy as np
import requests
from bench_dtype import save_model_dir

ROOT = Path(__file__).resolve().parents[1]
PROMPT_WORDS = 32


def build_model_dir(out: Path) -> Path:
    """Random weights (``bench_generation.build_weights``) + a word-level tokenizer over their vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    weights = out / "weights.npz"
    if not weights.exists():
        bg.build_weights(weights)
    model_dir = out / "model"
    if not (model_dir / "config.json").exists():
        save_model_dir(weights, model_dir)
    vocab_size = int(bg.GEOMETRY["vocab_size"])
    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["</s>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["</s>"])
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"eos_token": "</s>", "pad_token": "</s>", "bos_token": None, "add_bos_token": False}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model_dir: Path, max_batch_size: int, new: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [
        sys.executable,
        str(ROOT / "flask_server.py"),
        *("--model_name_or_path", str(model_dir), "--flask_port", str(port), "--no_ui", "true"),
        *("--src_length", str(PROMPT_WORDS + 8), "--max_length", str(new)),
        *("--max_batch_size", str(max_batch_size), "--max_queue", "256"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(bg.THREADS))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: the server exited with {proc.returncode}; see {log}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit(f"error: the server did not come up in 300 s; see {log}")


def prompt(seed: int) -> str:
    ids = np.random.default_rng(seed).integers(1, int(bg.GEOMETRY["vocab_size"]) - 1, PROMPT_WORDS)
    return " ".join(f"w{i}" for i in ids)


def one_request(url: str, seed: int, new: int, model: str) -> dict[str, float]:
    """One streaming completion; returns its TTFT, time per output token and completion tokens."""
    body = {
        "model": model,
        "prompt": prompt(seed),
        "max_tokens": new,
        "temperature": 1.0,
        "top_k": 1,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                first = first if first is not None else now
                last = now
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    first, last = first or time.perf_counter(), last or time.perf_counter()
    tpot = (last - first) / max(tokens - 1, 1)
    return {"ttft": first - start, "tpot": tpot, "tokens": tokens}


def run_level(url: str, clients: int, seeds: list[int], new: int, model: str) -> dict[str, float]:
    """``clients`` threads share the requests ``seeds`` (each takes the next one when it is done)."""
    results: list[dict[str, float]] = []
    lock = threading.Lock()
    pending = list(seeds)

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                seed = pending.pop(0)
            out = one_request(url, seed, new, model)
            with lock:
                results.append(out)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))],
        "tpot_ms": 1000 * statistics.mean(r["tpot"] for r in results),
    }


def table(levels: list[dict[str, float]], new: int) -> str:
    base = levels[0]["tokens_per_s"]
    lines = [
        f"| clients ({levels[0]['requests']} streaming requests x {new} new tokens) | generated tok/s | "
        "TTFT p50 (s) | TTFT p95 (s) | time per output token (ms) |",
        "|---|---|---|---|---|",
    ]
    for i, r in enumerate(levels):
        name = "1 (one request at a time)" if i == 0 else f"{r['clients']} concurrent"
        ratio = "" if i == 0 else f" ({r['tokens_per_s'] / base:.2f}x)"
        lines.append(
            f"| {name} | {r['tokens_per_s']:.1f}{ratio} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | "
            f"{r['tpot_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new", type=int, default=128, help="new tokens per request")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--levels", default="4,16", help="concurrent clients after the one-at-a-time run")
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "llm-bench-serving")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = build_model_dir(args.work)
    proc, url = start_server(model_dir, args.max_batch_size, args.new, args.work / "server.log")
    try:
        model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        seeds = list(range(args.requests))
        one_request(url, 10_000, 4, model)  # warm-up
        levels = [run_level(url, 1, seeds, args.new, model)]  # the one-at-a-time baseline
        for clients in (int(c) for c in args.levels.split(",")):
            levels.append(run_level(url, clients, seeds, args.new, model))
    finally:
        proc.terminate()
        proc.wait(60)
    text = table(levels, args.new)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(levels, indent=2))
    (args.out / "serving.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
