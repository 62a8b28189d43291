"""Generation speed: this toolkit vs Hugging Face transformers on the same random ~135M LLaMA weights (CPU, fp32).

Usage::

    python benchmarks/bench_generation.py [--reps 3] [--rounds 2] [--out benchmarks/results] [--quick]

Builds one random-initialised LLaMA-architecture checkpoint with torch (hidden 576, 30 layers, 9 heads, 3 KV
heads, intermediate 1536, vocab 49152, tied embeddings), converts it to paddle (linear weights transposed,
``lm_head`` = embedding transposed), then times each system in its own subprocess (so the two OpenMP
runtimes never compete), alternating systems for ``--rounds`` rounds and keeping the best of ``--reps``
repetitions per measure:

* prefill tokens/s for one 512-token prompt (time to the first token);
* decode tokens/s at batch 1: ``127 / (T(128 new) - T(1 new))`` for a 32-token prompt;
* batch 16 (16 prompts of 32 tokens, 128 new tokens each): decode-phase generated tokens/s
  ``16 * 127 / (T(128) - T(1))`` and end-to-end generated tokens/s ``16 * 128 / T(128)``.

Systems: ``transformers`` (``torch.set_num_threads(2)``, ``generate``), and this toolkit's engine in
dynamic mode (``llm.infer.create_engine``) and static mode (``export_engine`` + ``paddle.inference``;
plain CPU kernels, oneDNN for the prefill only, or oneDNN throughout). Both systems must produce the same greedy tokens (checked). The physical bound
is the bytes of weights read per decode step divided by the memory bandwidth measured here with NumPy.
Writes ``generation.json`` and ``generation.md`` into ``--out`` and prints the table.
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
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
    "toolkit-static",
    "toolkit-static-mkldnn-prefill",
    "toolkit-static-mkldnn",
)
DEFAULT_SYSTEMS = ("transformers", "toolkit-dynamic", "toolkit-static", "toolkit-static-mkldnn-prefill")
STATIC_MKLDNN = {"static": False, "static-mkldnn": True, "static-mkldnn-prefill": "prefill"}
METRICS = {
    "prefill_tps": "Prefill, 512-token prompt (tok/s)",
    "decode_b1_tps": "Decode, batch 1 (tok/s)",
    "decode_b16_tps": "Decode, batch 16 (generated tok/s)",
    "batch16_tps": "Batch 16 x 128 new, end to end (generated tok/s)",
}


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


def memory_bandwidth() -> dict[str, float]:
    """GB/s of a 512 MB NumPy copy (read + write) and sum (read), best of 5."""
    a = np.ones(64 * 1024 * 1024, dtype=np.float64)  # 512 MB
    b = np.empty_like(a)
    copy = min(_timed(lambda: np.copyto(b, a)) for _ in range(5))
    read = min(_timed(lambda: a.sum()) for _ in range(5))
    return {"copy_gbps": 2 * a.nbytes / copy / 1e9, "read_gbps": a.nbytes / read / 1e9}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


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

    return _measure(gen, reps)


def worker_toolkit(weights: Path, reps: int, mode: str) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import llm  # noqa: F401, I001  (zlib fix, MKL/OMP env before paddle)

    # isort: split
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    from llm.infer import GenerationConfig, create_engine, export_engine, load_static_engine

    config = LlamaConfig(**GEOMETRY, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    state = {}
    for name, value in np.load(weights).items():
        key = name.replace("model.", "llama.", 1)
        if value.ndim == 2 and "embed_tokens" not in key:
            value = value.T  # torch Linear [out, in] -> paddle [in, out]
        state[key] = paddle.to_tensor(np.ascontiguousarray(value))
    state["lm_head.weight"] = paddle.to_tensor(
        np.ascontiguousarray(np.load(weights)["model.embed_tokens.weight"].T)
    )
    model.set_state_dict(state)
    model.eval()
    if mode == "dynamic":
        engine = create_engine(model, max_batch_size=BATCH)
    else:
        export_dir = tempfile.mkdtemp(prefix="bench-static-")
        export_engine(model, export_dir, max_seq_len=PREFILL_LEN + NEW)
        del model
        engine = load_static_engine(export_dir, max_batch_size=BATCH, mkldnn=STATIC_MKLDNN[mode])

    def gen(batch: list[list[int]], new: int) -> list[list[int]]:
        return engine.generate(batch, GenerationConfig(max_new_tokens=new))

    result = _measure(gen, reps)
    result["runner"] = engine.runner.kind
    return result


def _measure(gen, reps: int) -> dict:
    prefill_prompt = prompt_ids(1, 1, PREFILL_LEN)
    decode_prompt = prompt_ids(2, 1, DECODE_PROMPT)
    batch = prompt_ids(3, BATCH, BATCH_PROMPT)
    t_prefill, _ = best_of(lambda: gen(prefill_prompt, 1), reps)
    t_first, _ = best_of(lambda: gen(decode_prompt, 1), reps)
    t_decode, tokens = best_of(lambda: gen(decode_prompt, NEW), reps)
    t_first16, _ = best_of(lambda: gen(batch, 1), reps)
    t_batch, batch_tokens = best_of(lambda: gen(batch, NEW), max(1, reps - 1))
    return {
        "prefill_tps": PREFILL_LEN / t_prefill,
        "decode_b1_tps": (NEW - 1) / (t_decode - t_first),
        "decode_b16_tps": BATCH * (NEW - 1) / (t_batch - t_first16),
        "batch16_tps": BATCH * NEW / t_batch,
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
def run_worker(system: str, weights: Path, reps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", system, "--weights", str(weights), "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def merge(runs: list[dict]) -> dict:
    """Best value of every metric over the rounds (plus each round's values under ``rounds``)."""
    best = dict(runs[0])
    for key in METRICS:
        best[key] = max(r[key] for r in runs)
    best["rounds"] = [{key: round(r[key], 2) for key in METRICS} for r in runs]
    return best


def table(results: dict, bound: dict) -> str:
    """Markdown table: every system, with the ratio to transformers in brackets."""
    base = results["transformers"]
    lines = ["| System | " + " | ".join(METRICS.values()) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name, r in results.items():
        cells = []
        for key in METRICS:
            ratio = "" if name == "transformers" else f" ({r[key] / base[key]:.2f}x)"
            cells.append(f"{r[key]:.1f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"| bound: {bound['weight_mb']:.0f} MB of weights per step / {bound['read_gbps']:.1f} GB/s "
        f"| - | {bound['decode_bound_tps']:.1f} | - | - |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", choices=SYSTEMS)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS), help=f"comma list of {SYSTEMS}")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 rep (smoke run)")
    args = parser.parse_args()
    if args.worker:
        if args.worker == "transformers":
            result = worker_transformers(args.weights, args.reps)
        else:
            result = worker_toolkit(args.weights, args.reps, args.worker.replace("toolkit-", ""))
        print(json.dumps(result))
        return
    if args.quick:
        args.rounds, args.reps = 1, 1
    systems = [s for s in args.systems.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "llama135m.npz"
        build_weights(weights)
        bandwidth = memory_bandwidth()
        runs: dict[str, list[dict]] = {s: [] for s in systems}
        for round_ in range(args.rounds):
            for system in systems:
                print(f"round {round_ + 1}/{args.rounds}: {system} ...", file=sys.stderr, flush=True)
                runs[system].append(run_worker(system, weights, args.reps))
    results = {s: merge(r) for s, r in runs.items()}
    n_params = _weight_params()
    weight_bytes = 4 * n_params
    bound = {
        "weight_mb": weight_bytes / 1e6,
        "read_gbps": bandwidth["read_gbps"],
        "copy_gbps": bandwidth["copy_gbps"],
        "decode_bound_tps": bandwidth["read_gbps"] * 1e9 / weight_bytes,
    }
    ref = results.get("transformers")
    checks = {}
    for name, r in results.items():
        if ref is not None and name != "transformers":
            same_b16 = sum(a == b for a, b in zip(r["tokens_b16"], ref["tokens_b16"]))
            checks[name] = {
                "b1_identical": r["tokens_b1"] == ref["tokens_b1"],
                "b16_rows_identical": same_b16,
            }
    md = table(results, bound) if ref is not None else json.dumps(results, indent=1)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"cpus": os.cpu_count(), "threads": THREADS, "load_avg": os.getloadavg(), **bandwidth},
        "bound": bound,
        "greedy_checks": checks,
        "results": {
            k: {kk: vv for kk, vv in v.items() if not kk.startswith("tokens")} for k, v in results.items()
        },
        "settings": {"reps": args.reps, "rounds": args.rounds, "n_params": n_params},
    }
    (args.out / "generation.json").write_text(json.dumps(payload, indent=2))
    (args.out / "generation.md").write_text(
        md + "\n\nGreedy tokens identical to transformers: " + json.dumps(checks) + "\n"
    )
    print(md)
    print("greedy tokens identical to transformers:", json.dumps(checks))


def _weight_params() -> int:
    """Parameters read per decode step: all weights, the tied embedding counted once (as the LM head)."""
    g = GEOMETRY
    h, inter, layers, vocab = (
        g["hidden_size"],
        g["intermediate_size"],
        g["num_hidden_layers"],
        g["vocab_size"],
    )
    kv = h // g["num_attention_heads"] * g["num_key_value_heads"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * inter + 2 * h
    return layers * per_layer + vocab * h + h


if __name__ == "__main__":
    main()
