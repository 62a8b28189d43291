"""Weight memory and decode speed of float32 vs round-to-nearest low-bit weights (same random ~135M LLaMA).

Usage::

    python benchmarks/bench_quant.py [--variants fp32,int8,int4,int4-g64] [--new 64] [--reps 2] [--rounds 2]

Builds the random LLaMA checkpoint of ``bench_generation.py`` (hidden 576, 30 layers, 9 / 3 heads, intermediate
1536, vocab 49152) as the float32 paddle directory of ``bench_dtype.py`` (untied ``lm_head``), quantizes it once
per variant with ``llm.quant.model.quantize_model`` (RTN; weight_only_int8 per channel, weight_only_int4 per
channel and in groups of 64 -- groups of 128 do not divide the 576 inputs of the attention projections) and saves
each with ``llm.quant.io.save_quantized``. Then, alternating variants for ``--rounds`` rounds, each in its own
subprocess: ``load_model(dir)`` (a quantized directory never allocates float linears) + ``create_engine`` (the
``predictor.py`` path), and times greedy decoding after a 32-token prompt, best of ``--reps``:

* batch 1: ``(new - 1) / (T(new tokens) - T(1 token))``;
* batch 16: ``16 * (new - 1) / (T(new) - T(1))`` for 16 prompts.

Memory: bytes of the decoder linears as stored (``qweight`` + ``scales`` (+ bias) against float32 weights), of
the whole model (every parameter and buffer), and the process RSS after ``load_model`` and after the engine is
built (the engine adds fused QKV / gate-up copies and the blocked LM head, for every variant). Prints a markdown
table and writes ``quant.json`` / ``quant.md`` into ``--out``.
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

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: variant -> (quant_type, group_size); fp32 is the float model
VARIANTS = {
    "fp32": (None, -1),
    "int8": ("weight_only_int8", -1),
    "int4": ("weight_only_int4", -1),
    "int4-g64": ("weight_only_int4", 64),
}
TARGETS = {"int8": 0.27, "int4": 0.15, "int4-g64": 0.15}  # linear bytes / fp32 linear bytes


def _rss_mb() -> float:
    """Resident set size of this process (``VmRSS``), MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_dirs(weights: str, root: str, variants: list[str]) -> None:
    """The float32 model directory (``root/fp32``) and one quantized directory per low-bit variant."""
    import bench_dtype

    bench_dtype.save_model_dir(Path(weights), Path(root) / "fp32")  # sets the thread env, imports llm
    from llm.model import load_model
    from llm.quant.io import save_quantized
    from llm.quant.model import quantize_model

    for name in variants:
        quant_type, group_size = VARIANTS[name]
        if quant_type is None:
            continue
        model = load_model(os.path.join(root, "fp32"))
        quantize_model(model, quant_type, group_size, progress=False)
        save_quantized(model, os.path.join(root, name))
        del model


def _nbytes(t) -> int:
    import numpy as np

    return int(np.prod(t.shape)) * {"float32": 4, "int8": 1, "uint8": 1}.get(
        str(t.dtype).replace("paddle.", ""), 2
    )


def linear_bytes(model) -> tuple[int, int]:
    """(stored bytes, float32 bytes) of the decoder linears (weights, scales, bias)."""
    from llm.quant.layers import QuantLinear
    from llm.quant.model import get_layer, quant_targets

    stored = dense = 0
    for name in quant_targets(model):
        layer = get_layer(model, name)
        tensors = [t for t in layer.state_dict().values()]
        stored += sum(_nbytes(t) for t in tensors)
        if isinstance(layer, QuantLinear):
            dense += 4 * layer.in_features * layer.out_features + (
                4 * layer.out_features if layer.bias is not None else 0
            )
        else:
            dense += sum(_nbytes(t) for t in tensors)
    return stored, dense


def worker(model_dir: str, new: int, reps: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
    import llm  # noqa: F401, I001

    # isort: split
    from llm.infer import GenerationConfig, create_engine
    from llm.model import load_model

    rss_start = _rss_mb()
    start = time.perf_counter()
    model = load_model(model_dir)
    load_s = time.perf_counter() - start
    rss_load = _rss_mb()
    stored, dense = linear_bytes(model)
    model_bytes = sum(_nbytes(t) for t in model.state_dict().values())
    engine = create_engine(model, max_batch_size=bg.BATCH)
    rss_engine = _rss_mb()

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
        "linear_mb": stored / 1e6,
        "linear_fp32_mb": dense / 1e6,
        "model_mb": model_bytes / 1e6,
        "rss_start_mb": rss_start,
        "rss_load_mb": rss_load,
        "rss_engine_mb": rss_engine,
        "load_s": load_s,
        "runner": engine.runner.kind,
        "tokens_b1": tokens1[0],
        "tokens_b16": tokens16,
    }


def run_worker(model_dir: Path, new: int, reps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(bg.THREADS), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", str(model_dir), "--new", str(new), "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {model_dir} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def table(results: dict[str, dict], new: int) -> str:
    base = results.get("fp32") or next(iter(results.values()))
    lines = [
        "| weights | decoder linears (MB, x fp32) | whole model (MB) | RSS after load / after engine (MB) "
        "| decode batch 1 (tok/s) | decode batch 16 (generated tok/s) | greedy tokens equal to fp32: batch 1 "
        "prefix / batch 16 rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():

        def ratio(key: str, r: dict = r) -> str:
            return "" if r is base else f" ({r[key] / base[key]:.2f}x)"

        share = r["linear_mb"] / r["linear_fp32_mb"]
        target = f", target <= {TARGETS[name]}" if name in TARGETS else ""
        rows = sum(a == b for a, b in zip(r["tokens_b16"], base["tokens_b16"]))
        lines.append(
            f"| {name} | {r['linear_mb']:.1f} ({share:.3f}x{target}) | {r['model_mb']:.0f} | "
            f"{r['rss_load_mb']:.0f} / {r['rss_engine_mb']:.0f} | {r['decode_b1_tps']:.1f}{ratio('decode_b1_tps')} | "
            f"{r['decode_b16_tps']:.1f}{ratio('decode_b16_tps')} | "
            f"{_same_prefix(r['tokens_b1'], base['tokens_b1'])}/{new} / {rows}/{bg.BATCH} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--make_dirs", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--new", type=int, default=64, help="new tokens per decode measurement")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.new, args.reps)))
        return
    if args.make_dirs:
        make_dirs(*args.make_dirs, variants)
        return
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "llama135m.npz"
        bg.build_weights(weights)
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{HERE}", OMP_NUM_THREADS=str(bg.THREADS))
        cmd = [sys.executable, __file__, "--make_dirs", str(weights), tmp, "--variants", ",".join(variants)]
        made = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise RuntimeError(f"building the model directories failed:\n{made.stderr[-3000:]}")
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for round_ in range(args.rounds):
            for name in variants:
                print(f"round {round_ + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                runs[name].append(run_worker(Path(tmp) / name, args.new, args.reps))
    results = {}
    for name, rs in runs.items():
        best = dict(rs[0])
        for key in ("decode_b1_tps", "decode_b16_tps"):
            best[key] = max(r[key] for r in rs)
            best[f"{key}_rounds"] = [round(r[key], 2) for r in rs]
        results[name] = best
    md = table(results, args.new)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": os.cpu_count(), "threads": bg.THREADS, "load_avg_before": load_before},
        "settings": {"new": args.new, "reps": args.reps, "rounds": args.rounds, "prompt": bg.DECODE_PROMPT},
        "variants": {
            name: {"quant_type": VARIANTS[name][0], "group_size": VARIANTS[name][1]} for name in variants
        },
        "results": {
            k: {kk: vv for kk, vv in v.items() if not kk.startswith("tokens")} for k, v in results.items()
        },
    }
    (args.out / "quant.json").write_text(json.dumps(payload, indent=2))
    (args.out / "quant.md").write_text(md + "\n")
    print(md)
    for name, r in results.items():
        print(f"{name}: per round b1 {r['decode_b1_tps_rounds']}, b16 {r['decode_b16_tps_rounds']}")


if __name__ == "__main__":
    main()
