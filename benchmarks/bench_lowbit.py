"""Memory and speed of LoRA training on a float32 base vs low-bit bases (``weight_quantize_algo``), CPU.

Usage::

    python benchmarks/bench_lowbit.py [--bases fp32,nf4,weight_only_int8] [--steps 4] [--warmup 1] [--rounds 1]

Builds the random ~135M LLaMA checkpoint of ``bench_generation.py`` (hidden 576, 30 layers, 9 / 3 heads,
intermediate 1536, vocab 49152) as the float32 paddle directory of ``bench_dtype.py`` (untied ``lm_head``). Then
each base in its own subprocess: the base is loaded (``load_model`` for fp32; ``llm.lowbit.load_low_bit_model`` for
the others, which quantizes each decoder linear as it is read), LoRA rank 8 on the toolkit's default target modules
(every decoder linear), AdamW on the LoRA weights, one batch of 4 x 256 random token ids; ``--warmup`` steps, then
``--steps`` timed steps. Reported per base: bytes of the base's decoder linears as stored, peak RSS of the whole
process (``VmHWM``: loading included), training tokens/s and the first loss.

Targets (issue 12): the nf4 run's peak RSS is below the fp32 run's by at least 80% of the bytes quantization removes
from the linear weights; its step time is at most 1.5x fp32 LoRA's. Writes ``lowbit.json`` / ``lowbit.md`` into
``--out`` and prints the table.
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

import bench_generation as bg  # shared geometry and weights (benchmarks/ is the script's own dir)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASES = ("fp32", "nf4", "weight_only_int8", "weight_only_int4", "fp4")
BATCH, SEQ = 4, 256


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(model_dir: str, base: str, steps: int, warmup: int) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
    import types

    import llm  # noqa: F401, I001  (zlib fix, thread env before paddle)

    # isort: split
    import numpy as np
    import paddle

    from llm.lowbit import LowBitLinear, LowBitSpec, load_low_bit_model
    from llm.model import apply_lora, load_model
    from llm.quant.model import get_layer, quant_targets

    start = time.perf_counter()
    if base == "fp32":
        model = load_model(model_dir)
        base_bytes = sum(4 * int(np.prod(get_layer(model, n).weight.shape)) for n in quant_targets(model))
    else:
        model = load_low_bit_model(model_dir, LowBitSpec(base))
        base_bytes = sum(layer.nbytes() for layer in model.sublayers() if isinstance(layer, LowBitLinear))
    load_s = time.perf_counter() - start
    rss_loaded, peak_loaded = _status_mb("VmRSS"), _status_mb("VmHWM")
    model = apply_lora(model, types.SimpleNamespace(lora_rank=8))
    model.train()
    params = [p for p in model.parameters() if not p.stop_gradient]
    opt = paddle.optimizer.AdamW(learning_rate=1e-4, parameters=params)
    ids = paddle.to_tensor(np.random.RandomState(0).randint(3, 49152, size=(BATCH, SEQ)).astype("int64"))
    losses, times = [], []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        loss = out[0] if isinstance(out, tuple) else out.loss
        loss.backward()
        opt.step()
        opt.clear_grad()
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times[warmup:]))
    return {
        "base_bytes": base_bytes,
        "trainable": int(sum(int(np.prod(p.shape)) for p in params)),
        "load_s": load_s,
        "rss_loaded_mb": rss_loaded,
        "peak_loaded_mb": peak_loaded,
        "peak_mb": _status_mb("VmHWM"),
        "step_s": step_s,
        "tokens_per_s": BATCH * SEQ / step_s,
        "first_loss": losses[0],
        "step_times": [round(x, 3) for x in times],
    }


def run_worker(model_dir: Path, base: str, steps: int, warmup: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(bg.THREADS), PYTHONPATH=f"{ROOT}:{HERE}")
    cmd = [sys.executable, __file__, "--worker", str(model_dir), "--bases", base]
    cmd += ["--steps", str(steps), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{base} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict]) -> str:
    base = results.get("fp32")
    heads = ["base", "decoder linears as stored (MB, x fp32)", "peak RSS (MB)", "RSS after load (MB)"]
    heads += ["load (s)", "train tokens/s (x fp32)", "step (s)", "first loss"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for name, r in results.items():
        share = "" if base is None else f" ({r['base_bytes'] / base['base_bytes']:.3f}x)"
        speed = "" if base is None or r is base else f" ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x)"
        lines.append(
            f"| {name} | {r['base_bytes'] / 1e6:.1f}{share} | {r['peak_mb']:.0f} | {r['rss_loaded_mb']:.0f} | "
            f"{r['load_s']:.1f} | {r['tokens_per_s']:.0f}{speed} | {r['step_s']:.2f} | {r['first_loss']:.4f} |"
        )
    return "\n".join(lines)


def targets(results: dict[str, dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    fp32, nf4 = results.get("fp32"), results.get("nf4")
    if fp32 and nf4:
        removed = (fp32["base_bytes"] - nf4["base_bytes"]) / 2**20
        saved = fp32["peak_mb"] - nf4["peak_mb"]
        out["nf4 peak RSS saving >= 80% of the bytes removed from the linears"] = {
            "value": saved / removed,
            "saved_mb": saved,
            "removed_mb": removed,
            "met": saved >= 0.8 * removed,
        }
        ratio = nf4["step_s"] / fp32["step_s"]
        out["nf4 step time <= 1.5x fp32 LoRA"] = {"value": ratio, "met": ratio <= 1.5}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bases", default="fp32,nf4,weight_only_int8")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    bases = [b for b in args.bases.split(",") if b]
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        parser.error(f"unknown bases {unknown}; choose from {', '.join(BASES)}")
    if args.worker:
        print(json.dumps(worker(args.worker, bases[0], args.steps, args.warmup)))
        return
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "llama135m.npz"
        bg.build_weights(weights)
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{HERE}", OMP_NUM_THREADS=str(bg.THREADS))
        code = "import sys, bench_dtype; from pathlib import Path; bench_dtype.save_model_dir(Path(sys.argv[1]), Path(sys.argv[2]))"
        made = subprocess.run(
            [sys.executable, "-c", code, str(weights), str(Path(tmp) / "fp32")],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise RuntimeError(f"building the model directory failed:\n{made.stderr[-3000:]}")
        runs: dict[str, list[dict]] = {b: [] for b in bases}
        for round_ in range(args.rounds):
            for base in bases:
                print(f"round {round_ + 1}/{args.rounds}: {base} ...", file=sys.stderr, flush=True)
                runs[base].append(run_worker(Path(tmp) / "fp32", base, args.steps, args.warmup))
    results = {b: min(rs, key=lambda r: r["step_s"]) for b, rs in runs.items()}
    md, goals = table(results), targets(results)
    payload = {
        "started": started,
        "machine": {"cpus": os.cpu_count(), "threads": bg.THREADS, "load_avg_before": load_before},
        "settings": {
            "batch": BATCH,
            "seq": SEQ,
            "steps": args.steps,
            "warmup": args.warmup,
            "rounds": args.rounds,
        },
        "targets": goals,
        "results": results,
        "rounds": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lowbit.json").write_text(json.dumps(payload, indent=2))
    lines = [md, "", f"Run of {started}, load average before {load_before[0]:.2f}."]
    lines.append(
        "Targets: "
        + "; ".join(f"{k}: {v['value']:.2f} ({'met' if v['met'] else 'NOT met'})" for k, v in goals.items())
    )
    (args.out / "lowbit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
