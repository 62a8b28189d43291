"""Generation speed: this toolkit vs Hugging Face transformers on the same random ~135M LLaMA weights (CPU).

Usage::

    python benchmarks/bench_generation.py [--weights fp32,bf16,int8,int4] [--systems ...] [--reps 2] [--rounds 2]
                                          [--out benchmarks/results] [--quick]

Builds one random-initialised LLaMA-architecture checkpoint with torch (hidden 576, 30 layers, 9 heads, 3 KV
heads, intermediate 1536, vocab 49152, tied embeddings), saves it as a float32 paddle directory (linear weights
transposed, ``lm_head`` = embedding transposed) and, for ``int8`` / ``int4``, as round-to-nearest per-channel
quantized directories (``weight_only_int8`` / ``weight_only_int4``, ``llm.quant``); ``bf16`` is the float32
directory loaded with ``load_model(dir, "bfloat16")``. Then it times each system in its own subprocess (so the two
OpenMP runtimes never compete), alternating systems for ``--rounds`` rounds and keeping the best of ``--reps``
repetitions per measure:

* prefill tokens/s for one 512-token prompt (time to the first token);
* decode tokens/s at batch 1: ``127 / (T(128 new) - T(1 new))`` for a 32-token prompt;
* batch 16 (16 prompts of 32 tokens, 128 new tokens each): decode-phase generated tokens/s
  ``16 * 127 / (T(128) - T(1))`` and end-to-end generated tokens/s ``16 * 128 / T(128)``.

Systems: ``transformers`` (fp32, ``torch.set_num_threads(2)``, ``generate``); this toolkit's engine per weight type
in dynamic mode (``toolkit-dynamic``: ``load_model`` + ``create_engine``, the decode products on the toolkit's own
CPU kernels, :mod:`llm.kernels`), the same with ``LLM_KERNELS=0`` (``toolkit-dynamic-paddle``: paddle's matmul, the
engine before the kernels) and static mode (``toolkit-static``: ``export_engine`` + ``paddle.inference``; the
``-mkldnn-prefill`` / ``-mkldnn`` variants add oneDNN). ``--llama_cpp_python PYTHON`` adds llama.cpp (a Python
with ``llama-cpp-python`` and ``gguf``, not a dependency of the toolkit: ``benchmarks/llama_cpp_worker.py`` writes
the same weights as GGUF F32 / Q8_0 / Q4_0 for fp32 / int8 / int4, batch 1 only); without it the table lists
llama.cpp's reference numbers. fp32 greedy tokens must equal transformers', and every weight type's static tokens
its dynamic ones (checked and reported). The bandwidth bound of each row is the bytes of weights one decode step
reads (every tensor but the embedding table, of which a step reads a few rows) divided by the memory read
bandwidth measured here with NumPy. ``BENCH_THREADS`` (default 2) sets every system's threads. Writes
``generation.json`` and ``generation.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS = int(os.environ.get("BENCH_THREADS", "2"))  # threads of every system (OMP, torch, the kernels' pool)
GEOMETRY = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
)
PREFILL_LEN, DECODE_PROMPT, BATCH, BATCH_PROMPT, NEW = 512, 32, 16, 32, 128
SYSTEMS = (
    "transformers",
    "toolkit-dynamic",
    "toolkit-dynamic-paddle",
    "toolkit-static",
    "toolkit-static-mkldnn-prefill",
    "toolkit-static-mkldnn",
)
DEFAULT_SYSTEMS = ("transformers", "toolkit-dynamic", "toolkit-dynamic-paddle", "toolkit-static")
STATIC_MKLDNN = {"static": False, "static-mkldnn": True, "static-mkldnn-prefill": "prefill"}
#: weight type -> (load dtype, quant_type, int8 LM head); int8 / int4 are RTN per output channel; ``-h8``: the same
#: directory with the engine reading the LM head as int8 per channel (``quant_lm_head``, as llama.cpp's files do)
WEIGHTS = {
    "fp32": ("float32", None, False),
    "bf16": ("bfloat16", None, False),
    "int8": ("float32", "weight_only_int8", False),
    "int4": ("float32", "weight_only_int4", False),
    "int8-h8": ("float32", "weight_only_int8", True),
    "int4-h8": ("float32", "weight_only_int4", True),
}
METRICS = {
    "prefill_tps": "Prefill, 512-token prompt (tok/s)",
    "decode_b1_tps": "Decode, batch 1 (tok/s)",
    "decode_b16_tps": "Decode, batch 16 (generated tok/s)",
    "batch16_tps": "Batch 16 x 128 new, end to end (generated tok/s)",
}
#: llama.cpp on this VM (2 threads, batch 1; docs/performance.md): not run here
LLAMA_CPP_REFERENCE = {"fp32": "41-51", "int4": "104-120 (Q4_1)"}


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def prompt_ids(seed: int, batch: int, length: int) -> list[list[int]]:
    """Deterministic random prompts (ids 10 .. vocab-1)."""
    rng = np.random.RandomState(seed)
    return rng.randint(10, GEOMETRY["vocab_size"], size=(batch, length)).tolist()


def best_of(fn, reps: int) -> tuple[float, object]:
    """Minimum wall time of ``reps`` calls (after one warm-up) and the last result."""
    fn()
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def import_transformers():
    """``transformers`` (LlamaConfig, LlamaForCausalLM)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaConfig, LlamaForCausalLM


def build_weights(path: Path) -> None:
    """Random-initialise the HF LLaMA checkpoint once (torch, seed 0) and save it as .npz."""
    import torch

    LlamaConfig, LlamaForCausalLM = import_transformers()

    torch.manual_seed(0)
    config = LlamaConfig(**GEOMETRY, tie_word_embeddings=True, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    np.savez(path, **state)


def make_dirs(weights: Path, root: Path, kinds: list[str]) -> None:
    """``root/fp32`` (float32 paddle directory) and a quantized directory per low-bit weight type."""
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import llm  # noqa: F401, I001  (zlib fix, MKL/OMP env before paddle)

    # isort: split
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from llm.model import load_model
    from llm.quant.io import save_quantized
    from llm.quant.model import quantize_model

    arrays = dict(np.load(weights))
    config = LlamaConfig(**GEOMETRY, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    state = {}
    for name, value in arrays.items():
        key = name.replace("model.", "llama.", 1)
        value = (
            value.T if value.ndim == 2 and "embed_tokens" not in key else value
        )  # torch [out, in] -> [in, out]
        state[key] = paddle.to_tensor(np.ascontiguousarray(value))
    state["lm_head.weight"] = paddle.to_tensor(np.ascontiguousarray(arrays["model.embed_tokens.weight"].T))
    model.set_state_dict(state)
    model.save_pretrained(str(root / "fp32"), safe_serialization=True)
    del model, state
    for kind in dict.fromkeys(model_dir(root, k).name for k in kinds):  # each directory once
        quant_type = WEIGHTS[kind][1]
        if quant_type is not None:
            model = load_model(str(root / "fp32"))
            quantize_model(model, quant_type, -1, progress=False)
            save_quantized(model, str(root / kind))
            del model


def model_dir(root: Path, kind: str) -> Path:
    return root / (kind.split("-")[0] if WEIGHTS[kind][1] else "fp32")


def memory_bandwidth() -> dict[str, float]:
    """GB/s of a 512 MB NumPy copy (read + write) and sum (read) on one thread, and the sum split over
    :data:`THREADS` threads (NumPy releases the GIL in reductions) -- the read bandwidth a decode step can use,
    which the bound column divides by. Best of 5."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(64 * 1024 * 1024, dtype=np.float64)  # 512 MB
    b = np.empty_like(a)
    copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    read1 = min(_timed(lambda: a.sum()) for _ in range(5))
    parts = np.array_split(a, THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        read = min(_timed(lambda: list(pool.map(np.sum, parts))) for _ in range(5))
    return {
        "copy_gbps": 2 * a.nbytes / copy / 1e9,
        "read_1_thread_gbps": a.nbytes / read1 / 1e9,
        "read_gbps": a.nbytes / read / 1e9,
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_mb() -> float:
    """Resident set size of this process (``VmRSS``), MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def step_bytes(model, int8_head: bool = False) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer as stored, except the embedding table
    (a step gathers a few of its rows; the LM head is its own tensor here, 1 byte per weight plus a float32 scale
    per row with ``int8_head``)."""
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}
    total = 0
    for name, t in model.state_dict().items():
        if "embed_tokens" in name:
            continue
        if int8_head and name.startswith("lm_head"):
            total += int(np.prod(t.shape)) + 4 * int(t.shape[-1])
        else:
            total += int(np.prod(t.shape)) * sizes.get(str(t.dtype).replace("paddle.", ""), 4)
    return total


# ----------------------------------------------------------------------------------------------
# workers
# ----------------------------------------------------------------------------------------------
def worker_transformers(weights: Path, reps: int) -> dict:
    import torch

    LlamaConfig, LlamaForCausalLM = import_transformers()
    torch.set_num_threads(THREADS)
    config = LlamaConfig(**GEOMETRY, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    state = {k: torch.from_numpy(v) for k, v in np.load(weights).items()}
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    rss = _rss_mb()

    def gen(batch: list[list[int]], new: int) -> list[list[int]]:
        ids = torch.tensor(batch)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :].tolist()

    result = measure(gen, reps)
    result["rss_mb"] = rss
    return result


def worker_toolkit(root: Path, kind: str, reps: int, mode: str) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import llm  # noqa: F401, I001  (zlib fix, MKL/OMP env before paddle)

    # isort: split
    from llm import kernels
    from llm.infer import GenerationConfig, create_engine, export_engine, load_static_engine
    from llm.model import load_model

    dtype, _, int8_head = WEIGHTS[kind]
    rss_start = _rss_mb()
    model = load_model(str(model_dir(root, kind)), dtype=dtype)
    read_bytes = step_bytes(model, int8_head)
    if mode.startswith("dynamic"):
        engine = create_engine(model, dtype=dtype, max_batch_size=BATCH, quant_lm_head=int8_head)
    else:
        export_dir = tempfile.mkdtemp(prefix="bench-static-")
        export_engine(model, export_dir, max_seq_len=PREFILL_LEN + NEW, quant_lm_head=int8_head)
        del model
        gc.collect()
        engine = load_static_engine(export_dir, max_batch_size=BATCH, mkldnn=STATIC_MKLDNN[mode])
    rss = _rss_mb()

    def gen(batch: list[list[int]], new: int) -> list[list[int]]:
        return engine.generate(batch, GenerationConfig(max_new_tokens=new, eos_token_ids=()))

    result = measure(gen, reps)
    state = kernels.configure() if kernels.available() and kernels.enabled_by_env() else {}
    result.update(
        runner=engine.runner.kind,
        kernels=f"{state['isa']}, {state['threads']} threads" if state else "paddle ops",
        rss_mb=rss,
        rss_start_mb=rss_start,
        step_bytes=read_bytes,
    )
    return result


def measure(gen, reps: int, batched: bool = True) -> dict:
    """Every metric of :data:`METRICS` for ``gen(prompts, new_tokens) -> tokens`` (the batch-16 ones None when not
    ``batched``)."""
    prefill_prompt = prompt_ids(1, 1, PREFILL_LEN)
    decode_prompt = prompt_ids(2, 1, DECODE_PROMPT)
    batch = prompt_ids(3, BATCH, BATCH_PROMPT)
    t_prefill, _ = best_of(lambda: gen(prefill_prompt, 1), reps)
    t_first, _ = best_of(lambda: gen(decode_prompt, 1), reps)
    t_decode, tokens = best_of(lambda: gen(decode_prompt, NEW), reps)
    t_first16 = t_batch = batch_tokens = None
    if batched:
        t_first16, _ = best_of(lambda: gen(batch, 1), reps)
        t_batch, batch_tokens = best_of(lambda: gen(batch, NEW), max(1, reps - 1))
    return {
        "prefill_tps": PREFILL_LEN / t_prefill,
        "decode_b1_tps": (NEW - 1) / (t_decode - t_first),
        "decode_b16_tps": BATCH * (NEW - 1) / (t_batch - t_first16) if batched else None,
        "batch16_tps": BATCH * NEW / t_batch if batched else None,
        "seconds": {
            "prefill": t_prefill,
            "first_b1": t_first,
            "decode_b1": t_decode,
            "first_b16": t_first16,
            "batch16": t_batch,
        },
        "tokens_b1": tokens[0],
        "tokens_b16": batch_tokens,
    }


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------
def run_worker(
    system: str, kind: str, weights: Path, root: Path, reps: int, llama_python: str | None
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))
    if system == "toolkit-dynamic-paddle":
        env["LLM_KERNELS"] = "0"
    if system == "llama.cpp":
        env.pop("PYTHONPATH")
        cmd = [llama_python, str(Path(__file__).with_name("llama_cpp_worker.py")), "--npz", str(weights)]
        cmd += ["--workdir", str(root), "--weights", kind, "--reps", str(reps)]
    else:
        cmd = [sys.executable, __file__, "--worker", system, "--npz", str(weights), "--root", str(root)]
        cmd += ["--weights", kind, "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{system} {kind} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge(runs: list[dict]) -> dict:
    """Best value of every metric over the rounds (plus each round's values under ``rounds``)."""
    best = dict(runs[0])
    for key in METRICS:
        best[key] = None if runs[0][key] is None else max(r[key] for r in runs)
    best["rounds"] = [{key: r[key] and round(r[key], 2) for key in METRICS} for r in runs]
    return best


def row_name(system: str, kind: str) -> str:
    return system if system == "transformers" else f"{system} {kind}"


def bound_cell(r: dict, read_gbps: float) -> str:
    """``MB per step -> tok/s bound (share reached at batch 1)``."""
    if "step_bytes" not in r:
        return "-"
    tps = read_gbps * 1e9 / r["step_bytes"]
    return f"{r['step_bytes'] / 1e6:.0f} MB -> {tps:.0f} ({r['decode_b1_tps'] / tps:.0%})"


def table(results: dict, bandwidth: dict) -> str:
    """Markdown table: every row with the ratio to transformers in brackets, RSS and the bandwidth bound."""
    base = results.get("transformers")
    heads = list(METRICS.values()) + [
        "RSS (MB)",
        f"bound, batch 1: weights per step -> tok/s at {bandwidth['read_gbps']:.1f} GB/s",
    ]
    lines = ["| System | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for key in METRICS:
            if r[key] is None:
                cells.append("-")
                continue
            ratio = "" if base is None or r is base else f" ({r[key] / base[key]:.2f}x)"
            cells.append(f"{r[key]:.1f}{ratio}")
        cells += [f"{r['rss_mb']:.0f}", bound_cell(r, bandwidth["read_gbps"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if not any(name.startswith("llama.cpp") for name in results):
        ref = ", ".join(f"{k} {v}" for k, v in LLAMA_CPP_REFERENCE.items())
        lines.append(f"| llama.cpp (reference, not run) | - | {ref} | - | - | - | - |")
    return "\n".join(lines)


def targets(results: dict) -> dict[str, dict]:
    """The decode targets of issue 11 against the rows of this run."""
    out: dict[str, dict] = {}
    fp32 = results.get("toolkit-dynamic fp32")
    hf = results.get("transformers")
    if fp32 is not None:
        out["fp32 batch 1 >= 41 tok/s (llama.cpp F32)"] = {
            "value": fp32["decode_b1_tps"],
            "met": fp32["decode_b1_tps"] >= 41,
        }
        for kind, goal in (("int8", 1.7), ("int8-h8", 1.7), ("int4", 2.5), ("int4-h8", 2.5)):
            r = results.get(f"toolkit-dynamic {kind}")
            if r is not None:
                ratio = r["decode_b1_tps"] / fp32["decode_b1_tps"]
                out[f"{kind} batch 1 >= {goal}x our fp32"] = {"value": ratio, "met": ratio >= goal}
    if fp32 is not None and hf is not None:
        ratio = fp32["decode_b16_tps"] / hf["decode_b16_tps"]
        out["batch-16 decode >= 2.5x transformers"] = {"value": ratio, "met": ratio >= 2.5}
    for kind, ggml in (("fp32", "F32"), ("int4", "Q4_0"), ("int4-h8", "Q4_0")):
        ours, theirs = results.get(f"toolkit-dynamic {kind}"), results.get(f"llama.cpp {kind.split('-')[0]}")
        if ours is not None and theirs is not None:
            ratio = ours["decode_b1_tps"] / theirs["decode_b1_tps"]
            out[f"{kind} batch 1 >= 1.0x llama.cpp {ggml}"] = {"value": ratio, "met": ratio >= 1.0}
    return out


def checks(results: dict) -> dict[str, dict]:
    """Greedy tokens: fp32 rows against transformers, and every row against its weight type's dynamic row."""
    out: dict[str, dict] = {}
    hf = results.get("transformers")
    for name, r in results.items():
        if name == "transformers":
            continue
        kind = name.rsplit(" ", 1)[1]
        ref = hf if kind == "fp32" else results.get(f"toolkit-dynamic {kind}")
        if ref is None or ref is r:
            continue
        same = sum(a == b for a, b in zip(r["tokens_b16"] or [], ref["tokens_b16"] or []))
        against = "transformers" if ref is hf else f"toolkit-dynamic {kind}"
        out[name] = {
            "against": against,
            "b1_identical": r["tokens_b1"] == ref["tokens_b1"],
            "b16_rows_identical": same,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=SYSTEMS)
    parser.add_argument("--make_dirs", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--npz", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=",".join(WEIGHTS), help=f"comma list of {tuple(WEIGHTS)}")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {SYSTEMS}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 rep (smoke run)")
    parser.add_argument(
        "--llama_cpp_python",
        help="a Python with llama-cpp-python and gguf installed: adds llama.cpp (GGUF F32 / Q8_0 / Q4_0) as a system",
    )
    args = parser.parse_args()
    kinds = [k for k in args.weights.split(",") if k]
    unknown = [k for k in kinds if k not in WEIGHTS]
    if unknown:
        parser.error(f"unknown weight types {unknown}; choose from {', '.join(WEIGHTS)}")
    if args.make_dirs:
        make_dirs(args.npz, args.root, kinds)
        return
    if args.worker:
        if args.worker == "transformers":
            result = worker_transformers(args.npz, args.reps)
        else:
            result = worker_toolkit(args.root, kinds[0], args.reps, args.worker.replace("toolkit-", ""))
        print(json.dumps(result))
        return
    if args.quick:
        args.rounds, args.reps = 1, 1
    systems = [s for s in args.systems.split(",") if s]
    if args.llama_cpp_python:
        systems.append("llama.cpp")
    jobs = [
        (s, k)
        for s in systems
        for k in (["fp32"] if s == "transformers" else kinds)
        # static export and the GGUF rows: no bf16; -h8 (a kernel-engine option): not for llama.cpp, whose quantized
        # files have their own head, nor the paddle-op engine
        if not (k == "bf16" and (s == "llama.cpp" or "static" in s))
        and not ("-h8" in k and s in ("llama.cpp", "toolkit-dynamic-paddle"))
    ]
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        weights, root = Path(tmp) / "llama135m.npz", Path(tmp)
        build_weights(weights)
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))
        cmd = [
            sys.executable,
            __file__,
            "--make_dirs",
            "--npz",
            str(weights),
            "--root",
            tmp,
            "--weights",
            ",".join(kinds),
        ]
        made = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if made.returncode != 0:
            raise RuntimeError(f"building the model directories failed:\n{made.stderr[-3000:]}")
        bandwidth = memory_bandwidth()
        runs: dict[str, list[dict]] = {row_name(s, k): [] for s, k in jobs}
        for round_ in range(args.rounds):
            for system, kind in jobs:
                print(
                    f"round {round_ + 1}/{args.rounds}: {row_name(system, kind)} ...",
                    file=sys.stderr,
                    flush=True,
                )
                runs[row_name(system, kind)].append(
                    run_worker(system, kind, weights, root, args.reps, args.llama_cpp_python)
                )
    results = {name: merge(r) for name, r in runs.items()}
    md = table(results, bandwidth)
    goals, greedy = targets(results), checks(results)
    machine = {
        "cpus": os.cpu_count(),
        "threads": THREADS,
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
    }
    payload = {
        "started": started,
        "machine": {**machine, **bandwidth},
        "targets": goals,
        "greedy_checks": greedy,
        "results": {
            k: {kk: vv for kk, vv in v.items() if not kk.startswith("tokens")} for k, v in results.items()
        },
        "settings": {"reps": args.reps, "rounds": args.rounds, "weights": kinds, "systems": systems},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(json.dumps(payload, indent=2))
    lines = [
        md,
        "",
        f"Run of {started}, load average before {load_before[0]:.2f}, after {machine['load_avg_after'][0]:.2f}.",
    ]
    lines.append(
        "Targets: "
        + "; ".join(f"{k}: {v['value']:.2f} ({'met' if v['met'] else 'NOT met'})" for k, v in goals.items())
    )
    lines.append("Greedy tokens: " + json.dumps(greedy))
    (args.out / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
