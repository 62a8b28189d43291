"""Decode speed of the toolkit's engine with float32 vs bfloat16 weights on CPU (same random ~135M LLaMA).

Usage::

    python benchmarks/bench_dtype.py [--dtypes float32,bfloat16] [--new 64] [--reps 2] [--rounds 2]

Builds the random LLaMA checkpoint of ``bench_generation.py`` (hidden 576, 30 layers, vocab 49152, tied
embeddings), saves it once as a float32 paddle model directory, then, alternating dtypes for ``--rounds``
rounds, each in its own subprocess: ``load_model(dir, dtype)`` + ``create_engine`` (the path ``predictor.py
--dtype`` takes) and times greedy decoding, best of ``--reps``:

* batch 1: ``(new - 1) / (T(new tokens) - T(1 token))`` for a 32-token prompt;
* batch 16: ``16 * (new - 1) / (T(new) - T(1))`` for 16 prompts of 32 tokens.

It prints one table: tok/s per dtype with the ratio to the first dtype measured in the same run, the bytes of
weights held in memory, and how many greedy tokens each dtype shares with the first (batch 1, and all 16
rows). Writes ``dtype.json`` / ``dtype.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_generation as bg  # shared geometry, weights and prompts (benchmarks/ is the script's own dir)
import numpy as np

HERE = Path(__file__).resolve().parent

ROOT = HERE.parent
DTYPES = ("float32", "bfloat16")


def save_model_dir(weights: Path, out: Path) -> None:
    """The random weights as a float32 paddle model directory (``model.safetensors`` + ``config.json``)."""
    os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
    import llm  # noqa: F401, I001  (zlib fix, MKL/OMP env before paddle)

    # isort: split
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    arrays = dict(np.load(weights))
    config = LlamaConfig(**bg.GEOMETRY, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    state = {}
    for name, value in arrays.items():
        key = name.replace("model.", "llama.", 1)
        state[key] = paddle.to_tensor(
            np.ascontiguousarray(value.T if value.ndim == 2 and "embed" not in key else value)
        )
    state["lm_head.weight"] = paddle.to_tensor(np.ascontiguousarray(arrays["model.embed_tokens.weight"].T))
    model.set_state_dict(state)
    model.save_pretrained(str(out), safe_serialization=True)


def worker(model_dir: str, dtype: str, new: int, reps: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
    import llm  # noqa: F401, I001

    # isort: split
    from llm.infer import GenerationConfig, create_engine
    from llm.model import load_model

    start = time.perf_counter()
    model = load_model(model_dir, dtype=dtype)
    weight_bytes = sum(
        int(np.prod(p.shape)) * (4 if str(p.dtype) == "paddle.float32" else 2) for p in model.parameters()
    )
    engine = create_engine(model, max_batch_size=bg.BATCH, dtype=dtype)
    del model
    load_s = time.perf_counter() - start

    def gen(batch: list[list[int]], count: int) -> list[list[int]]:
        return engine.generate(batch, GenerationConfig(max_new_tokens=count, eos_token_ids=()))

    one, batch = bg.prompt_ids(2, 1, bg.DECODE_PROMPT), bg.prompt_ids(3, bg.BATCH, bg.BATCH_PROMPT)
    t1_first, _ = bg.best_of(lambda: gen(one, 1), reps)
    t1, tokens1 = bg.best_of(lambda: gen(one, new), reps)
    t16_first, _ = bg.best_of(lambda: gen(batch, 1), reps)
    t16, tokens16 = bg.best_of(lambda: gen(batch, new), reps)
    return {
        "decode_b1_tps": (new - 1) / (t1 - t1_first),
        "decode_b16_tps": bg.BATCH * (new - 1) / (t16 - t16_first),
        "weight_mb": weight_bytes / 1e6,
        "load_s": load_s,
        "runner": engine.runner.kind,
        "tokens_b1": tokens1[0],
        "tokens_b16": tokens16,
    }


def run_worker(model_dir: Path, dtype: str, new: int, reps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(bg.THREADS), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", dtype, "--model", str(model_dir), "--new", str(new)]
    out = subprocess.run([*cmd, "--reps", str(reps)], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{dtype} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(results: dict[str, dict], new: int) -> str:
    base_name = next(iter(results))
    base = results[base_name]
    lines = [
        "| dtype (weights) | Decode, batch 1 (tok/s) | Decode, batch 16 (generated tok/s) | weights in memory (MB) "
        f"| greedy tokens equal to {base_name}: batch 1 prefix / batch 16 rows |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():

        def ratio(key: str, name: str = name, r: dict = r) -> str:
            return "" if name == base_name else f" ({r[key] / base[key]:.2f}x)"

        rows = sum(a == b for a, b in zip(r["tokens_b16"], base["tokens_b16"]))
        same = f"{_same_prefix(r['tokens_b1'], base['tokens_b1'])}/{new} / {rows}/{bg.BATCH}"
        lines.append(
            f"| {name} | {r['decode_b1_tps']:.1f}{ratio('decode_b1_tps')} | {r['decode_b16_tps']:.1f}"
            f"{ratio('decode_b16_tps')} | {r['weight_mb']:.0f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=("float32", "bfloat16"))
    parser.add_argument("--model", type=Path)
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--new", type=int, default=64, help="new tokens per decode measurement")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(str(args.model), args.worker, args.new, args.reps)))
        return
    dtypes = [d for d in args.dtypes.split(",") if d]
    with tempfile.TemporaryDirectory() as tmp:
        weights, model_dir = Path(tmp) / "llama135m.npz", Path(tmp) / "model"
        bg.build_weights(weights)
        subprocess.run(
            [sys.executable, "-c", f"import bench_dtype as b; b.save_model_dir({str(weights)!r}, {str(model_dir)!r})"],
            cwd=HERE, env=dict(os.environ, PYTHONPATH=f"{ROOT}:{HERE}"), check=True, capture_output=True,
        )  # fmt: skip
        runs: dict[str, list[dict]] = {d: [] for d in dtypes}
        for round_ in range(args.rounds):
            for dtype in dtypes:
                print(f"round {round_ + 1}/{args.rounds}: {dtype} ...", file=sys.stderr, flush=True)
                runs[dtype].append(run_worker(model_dir, dtype, args.new, args.reps))
    results = {}
    for dtype, rs in runs.items():
        best = dict(rs[0])
        for key in ("decode_b1_tps", "decode_b16_tps"):
            best[key] = max(r[key] for r in rs)
            best[f"{key}_rounds"] = [round(r[key], 2) for r in rs]
        results[dtype] = best
    md = table(results, args.new)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": os.cpu_count(), "threads": bg.THREADS, "load_avg": os.getloadavg()},
        "settings": {"new": args.new, "reps": args.reps, "rounds": args.rounds},
        "results": {
            k: {kk: vv for kk, vv in v.items() if not kk.startswith("tokens")} for k, v in results.items()
        },
    }
    (args.out / "dtype.json").write_text(json.dumps(payload, indent=2))
    (args.out / "dtype.md").write_text(md + "\n")
    print(md)
    for dtype, r in results.items():
        print(f"{dtype}: per round b1 {r['decode_b1_tps_rounds']}, b16 {r['decode_b16_tps_rounds']}")


if __name__ == "__main__":
    main()
