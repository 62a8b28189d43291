"""Training speed: this toolkit vs Hugging Face transformers (+ peft) on the same random ~135M LLaMA (CPU, fp32).

Usage::

    python benchmarks/bench_training.py [--cases lora,sft,pretrain,zero_padding] [--shapes 4x256,1x1024]
                                        [--steps 3] [--warmup 2] [--rounds 1] [--max_grad_norm 1.0]
                                        [--zp_max_length 1024] [--out benchmarks/results]

Model: the random LLaMA of ``bench_generation.py`` (hidden 576, 30 layers, 9 / 3 heads, intermediate 1536, vocab
49152) with an untied ``lm_head`` (a copy of the embedding) in both systems, so full training updates the same
parameters: the float32 paddle directory of ``bench_dtype.py`` (plus the demo tokenizer files, ids < 160) for the
toolkit, ``LlamaForCausalLM(LlamaConfig(..., tie_word_embeddings=False))`` loaded from the same ``.npz`` for
transformers. Each run is its own subprocess (2 threads: ``OMP_NUM_THREADS``, ``torch.set_num_threads``); every
round runs both systems per case and shape, alternating which goes first; the best run over the rounds is reported.

Cases, each at batch x sequence ``4x256`` and ``1x1024``:

* ``lora``: LoRA rank 8, alpha 16, dropout 0 on q/k/v/o/gate/up/down (the toolkit's default targets), AdamW on
  the LoRA weights; ``sft``: full fine-tuning, AdamW on every parameter. Data: SFT examples of digits (one token
  each) truncated by ``src_length = SEQ/2 + 1`` / ``max_length = SEQ + 1`` so that every feature is exactly SEQ
  tokens, the first half prompt (label -100), the second half answer.
* ``pretrain``: full training on token streams (every position a label): ``llm.data.mmap`` token files, windows of
  ``max_seq_length = SEQ``, ``continue_training`` (the same weights).
* ``zero_padding`` (toolkit only, LoRA, 4 rows, ``max_length`` ``--zp_max_length`` = 1024): SFT examples of 32-512
  tokens (uniform), once packed (``zero_padding: true``) and once padded per batch; effective tokens/s = non-pad
  tokens per second over the timed steps. The packed 4 x 1024 run peaks at about 22 GB RSS here (a failed run is
  recorded in the table, the others go on).

Toolkit side: the real entry points in-process, ``llm.train.finetune.run`` (finetune_generation.py) and
``llm.pretrain.run.run`` (run_pretrain.py), from a JSON argument file (lr 1e-4 constant, no warmup, weight decay 0,
AdamW betas 0.9 / 0.999, eps 1e-8, global-norm clip ``--max_grad_norm`` as paddlenlp's default; ``logging_steps``
1, no eval, no checkpoints). Step time = paddlenlp's ``interval_runtime`` of each step's record in
``output_dir/training_log.jsonl``; the logged loss is rounded to 8 decimals by paddlenlp. Peak RSS (``VmHWM``) is
read when training ends, before the final save (``save_final_model`` is wrapped in the worker; the peak including
the save is in the JSON). A paddle-side prep subprocess computes the first batch the toolkit trains on with the
toolkit's own functions (``load_split`` + ``EpochShuffleBatchSampler(seed)`` + ``DataCollator``; for pretrain
``build_datasets`` in its unshuffled sampler order) and checks the shapes.

transformers side: a plain loop, ``model(input_ids, labels).loss.backward()``, ``clip_grad_norm_`` (same max
norm), ``torch.optim.AdamW`` (same hyper-parameters), ``zero_grad``; for LoRA ``peft.get_peft_model`` with the same
rank / alpha / targets. It gets the toolkit's first batch every step. The toolkit's labels are pre-shifted (label i
is the target of position i); transformers shifts internally (label i+1 is the target of position i), so it is fed
the unshifted sequence: ``input_ids + [labels[-1]]`` (SEQ + 1 tokens: 0.4% / 0.1% more work, not credited) and
``[-100] + labels``: the same positions predict the same targets, and the first-step losses must agree to 1e-4.

Model FLOPs per step (SEQ tokens per row credited to both): forward ``F = 2 T P + A`` with T = B x SEQ tokens,
P = decoder linear weights + lm_head (134.5M), ``A = 4 B SEQ^2 hidden layers`` (QK^T and AV as full S x S
products); full training (sft, pretrain) ``3 F``; LoRA ``F + Fl + (2 T P + 2 A + 2 Fl)``: the linears' backward
is the input gradient only, the attention products need both operand gradients, and the LoRA terms
``Fl = 2 T sum r (in + out)`` have a full backward. ``achieved`` divides by the step time, and the share is of the
faster of the two measured 2048^3 fp32 matmul rates (paddle, torch; 2 threads, best of 5, at the start and the
end).

Targets: toolkit tokens/s >= 1.2x transformers (lora, sft, both shapes); toolkit peak RSS <= 1.0x transformers;
zero-padding effective tokens/s >= 1.5x padded (checks, targets and table: ``training_report.py``). Writes ``training.json`` / ``training.md`` into ``--out`` and
prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bench_generation as bg  # shared geometry and weights (benchmarks/ is the script's own dir)
import numpy as np
from training_report import LOSS_TOL, checks_and_targets, table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHAPES = {"4x256": (4, 256), "1x1024": (1, 1024)}
CASES = ("lora", "sft", "pretrain", "zero_padding")
SYSTEMS = ("toolkit", "transformers")
ZP_SYSTEMS = ("packed", "padded")  # zero_padding true / false
ZP_ROWS, ZP_SRC_LENGTH, ZP_LENGTHS = 4, 256, (32, 512)  # prompts are at most 256 tokens
LORA_RANK, LORA_ALPHA = 8, 16
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED, LR, BETAS, EPS = 42, 1e-4, (0.9, 0.999), 1e-8
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _digits(rng: np.random.RandomState, n: int) -> str:
    return "".join(map(str, rng.randint(0, 10, size=n)))


# ----------------------------------------------------------------------------------------------
# paddle side: model directory, data + the toolkit's first batch, the toolkit run
# ----------------------------------------------------------------------------------------------
def make_model(npz: Path, model_dir: Path) -> None:
    import bench_dtype

    bench_dtype.save_model_dir(npz, model_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(ROOT / "demo" / "model" / name, model_dir / name)


def write_data(spec: dict) -> None:
    """``train.json`` (SFT cases) or mmap token files (pretrain) in ``spec["job"]``."""
    job = Path(spec["job"])
    case, batch, seq, steps = (spec[k] for k in ("case", "batch", "seq", "max_steps"))
    rng = np.random.RandomState(SEED)  # SFT rows: longer than src_length / max_length, both parts cut, no EOS
    if case == "pretrain":
        from llm.data.mmap import MMapWriter

        need = int(1.2 * batch * steps * seq) + 2 * seq
        with MMapWriter(job / "tokens" / "stream", dtype=np.uint16) as writer:
            while writer.num_tokens < need:  # documents of 100-2000 ids the tokenizer knows (4..159)
                writer.add_document(rng.randint(4, 160, size=int(rng.randint(100, 2000))))
        return
    rows = [{"src": _digits(rng, seq // 2 + 16), "tgt": _digits(rng, seq + 16)} for _ in range(batch * steps)]
    if case == "zero_padding":  # feature length L = BOS + prompt + answer + EOS - 1 (the shift)
        rows = []
        for length in rng.randint(ZP_LENGTHS[0], ZP_LENGTHS[1] + 1, size=16 * steps + 16):
            prompt = (int(length) - 1) // 2
            rows.append({"src": _digits(rng, prompt), "tgt": _digits(rng, int(length) - 1 - prompt)})
    (job / "data").mkdir(parents=True, exist_ok=True)
    with open(job / "data" / "train.json", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)


def toolkit_args(spec: dict, system: str, out: Path) -> dict:
    """The JSON argument file of one toolkit run."""
    job, case = Path(spec["job"]), spec["case"]
    args = dict(model_name_or_path=spec["model_dir"], output_dir=str(out), seed=SEED, report_to="none")
    args.update(per_device_train_batch_size=spec["batch"], max_steps=spec["max_steps"], logging_steps=1)
    args.update(learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0)
    args.update(
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=spec["max_grad_norm"]
    )
    args.update(do_train=True, do_eval=False, save_strategy="no", evaluation_strategy="no", disable_tqdm=True)
    if case == "pretrain":
        args.update(
            tokenizer_name_or_path=spec["model_dir"],
            continue_training=True,
            input_dir=str(job / "tokens"),
            split="1,0,0",
            max_seq_length=spec["seq"],
        )
        return args
    args.update(dataset_name_or_path=str(job / "data"), chat_template="none", cache_dir=str(job / "cache"))
    args.update(lora=case in ("lora", "zero_padding"), lora_rank=LORA_RANK)
    if case == "zero_padding":
        args.update(src_length=ZP_SRC_LENGTH, max_length=spec["seq"], zero_padding=system == "packed")
    else:
        args.update(src_length=spec["seq"] // 2 + 1, max_length=spec["seq"] + 1, zero_padding=False)
    return args


def worker_prep(spec: dict) -> dict:
    """Write the data, then the toolkit's batches as its Trainer will draw them (first batch in full)."""
    os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
    import llm  # noqa: F401, I001  (zlib fix, thread env before paddle)

    # isort: split
    write_data(spec)
    job = Path(spec["job"])
    case, batch, seq, steps = (spec[k] for k in ("case", "batch", "seq", "max_steps"))
    if case == "pretrain":
        from llm.pretrain.dataset import BuildOptions, build_datasets
        from llm.pretrain.trainer import collate_tokens

        options = BuildOptions(str(job / "tokens"), "1,0,0", seq, SEED, data_cache=str(job / "prep-cache"))
        train = build_datasets(options, [batch * steps, 0, 0])[0]
        first = collate_tokens([train[i] for i in range(batch)])  # unshuffled DistributedBatchSampler order
        sizes = {"toolkit": [batch * seq] * steps}
    else:
        from llm.data import DataCollator, load_split
        from llm.templates import resolve_chat_template
        from llm.tokenizer import load_tokenizer
        from llm.train.reproducible import EpochShuffleBatchSampler

        tokenizer = load_tokenizer(spec["model_dir"])
        template = resolve_chat_template(tokenizer, spec["model_dir"], "none")
        sizes, first = {}, None
        for system in ZP_SYSTEMS if case == "zero_padding" else ("toolkit",):
            a = toolkit_args(spec, system, job)
            feats = load_split(
                a["dataset_name_or_path"], "train", tokenizer, template, src_length=a["src_length"],
                max_length=a["max_length"], zero_padding=a["zero_padding"], use_cache=False,
            )  # fmt: skip
            lengths = [len(f["input_ids"]) for f in feats]
            if system == "toolkit" and {len(f[k]) for f in feats for k in ("input_ids", "labels")} != {seq}:
                raise RuntimeError(f"{case}: feature lengths {sorted(set(lengths))}, not all {seq}")
            if system == "padded" and not ZP_LENGTHS[0] <= min(lengths) <= max(lengths) <= ZP_LENGTHS[1]:
                raise RuntimeError(
                    f"zero_padding: example lengths {min(lengths)}..{max(lengths)}, not {ZP_LENGTHS}"
                )
            order = EpochShuffleBatchSampler(feats, batch, SEED).epoch_order(0)
            if len(order) < batch * steps:
                raise RuntimeError(
                    f"{case}/{system}: {len(order)} features, {steps} steps of {batch} need more"
                )
            picked = [[feats[i] for i in order[k * batch : (k + 1) * batch]] for k in range(steps)]
            sizes[system] = [sum(len(f["input_ids"]) for f in b) for b in picked]
            sizes[system + "_padded"] = [len(b) * max(len(f["input_ids"]) for f in b) for b in picked]
            if first is None:
                first = DataCollator(tokenizer)(picked[0])
    ids, labels = np.asarray(first["input_ids"]), np.asarray(first["labels"])
    if case != "zero_padding" and (ids.shape != (batch, seq) or labels.shape != (batch, seq)):
        raise RuntimeError(f"{case}: first batch is {ids.shape} / {labels.shape}, expected {(batch, seq)}")
    supervised = int((labels != -100).sum())
    if case in ("lora", "sft") and supervised != batch * seq // 2:
        raise RuntimeError(f"{case}: {supervised} supervised tokens, expected half of {batch * seq}")
    with open(job / "batch.json", "w", encoding="utf-8") as fh:
        json.dump({"input_ids": ids.tolist(), "labels": labels.tolist()}, fh)
    return {
        "tokens_per_step": sizes,
        "supervised_first_batch": supervised,
        "first_batch_shape": list(ids.shape),
    }


def worker_toolkit(spec: dict, system: str) -> dict:
    os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
    import llm  # noqa: F401, I001

    # isort: split
    import paddle

    from llm.pretrain import run as pretrain_run
    from llm.train import finetune

    paddle.set_device("cpu")
    job = Path(spec["job"])
    out = job / f"run-{system}"
    shutil.rmtree(out, ignore_errors=True)
    args_file = job / f"args-{system}.json"
    args_file.write_text(json.dumps(toolkit_args(spec, system, out), indent=1))
    module = pretrain_run if spec["case"] == "pretrain" else finetune
    original, seen = module.save_final_model, {}

    def save_final_model(*args, **kwargs):  # training is over: the peak so far is training's
        seen["peak_train_mb"], seen["train_end"] = _status_mb("VmHWM"), time.perf_counter()
        return original(*args, **kwargs)

    module.save_final_model = save_final_model
    start = time.perf_counter()
    module.run([str(args_file)])
    end = time.perf_counter()
    with open(out / "training_log.jsonl", encoding="utf-8") as fh:
        records = [r for r in map(json.loads, fh) if "loss" in r and "interval_runtime" in r]
    shutil.rmtree(out, ignore_errors=True)
    return {
        "step_times": [r["interval_runtime"] for r in records],
        "losses": [r["loss"] for r in records],
        "learning_rates": sorted({r["learning_rate"] for r in records}),
        "log_fields": sorted(records[0]) if records else [],
        "peak_mb": seen.get("peak_train_mb", float("nan")),
        "peak_with_save_mb": _status_mb("VmHWM"),
        "run_s": end - start,
        "save_s": end - seen.get("train_end", end),
    }


# ----------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------
def worker_transformers(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(bg.THREADS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**bg.GEOMETRY, tie_word_embeddings=False))
    params = dict(model.named_parameters())
    with np.load(spec["npz"]) as arrays, torch.no_grad():
        if set(arrays.files) | {"lm_head.weight"} != set(params):
            raise RuntimeError("the .npz does not cover the model's parameters")
        for name in arrays.files:  # one tensor at a time: no second copy of the weights
            params[name].copy_(torch.from_numpy(arrays[name]))
        params["lm_head.weight"].copy_(torch.from_numpy(arrays["model.embed_tokens.weight"]))
    if spec["case"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = dict(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=PEFT_TARGETS)
        model = get_peft_model(model, LoraConfig(**lora, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)
    batch = json.loads((Path(spec["job"]) / "batch.json").read_text())
    # pre-shifted labels -> the unshifted sequence (see the module docstring)
    ids = torch.tensor(
        [row + [lab[-1] if lab[-1] != -100 else 0] for row, lab in zip(batch["input_ids"], batch["labels"])]
    )
    labels = torch.tensor([[-100] + lab for lab in batch["labels"]])
    losses, times = [], []
    for _ in range(spec["max_steps"]):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        if spec["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(trainable, spec["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        times.append(time.perf_counter() - start)
    return {
        "step_times": times,
        "losses": losses,
        "trainable": int(sum(p.numel() for p in trainable)),
        "attn_implementation": model.config._attn_implementation,
        "peak_mb": _status_mb("VmHWM"),
    }


def worker_matmul(system: str, n: int = 2048, reps: int = 5) -> dict:
    """GFLOP/s of an n^3 fp32 matmul, best of ``reps`` (after one warm-up)."""
    if system == "paddle":
        os.environ["OMP_NUM_THREADS"] = str(bg.THREADS)
        import llm  # noqa: F401, I001

        # isort: split
        import paddle

        paddle.set_device("cpu")
        x, y = paddle.rand([n, n]), paddle.rand([n, n])
        run = lambda: paddle.matmul(x, y).numpy()  # noqa: E731
    else:
        import torch

        torch.set_num_threads(bg.THREADS)
        x, y = torch.rand(n, n), torch.rand(n, n)
        run = lambda: torch.mm(x, y)  # noqa: E731
    best, _ = bg.best_of(run, reps)
    return {"gflops": 2 * n**3 / best / 1e9, "seconds": best}


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------
def run_worker(kind: str, spec: dict, system: str = "") -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(bg.THREADS), PYTHONPATH=f"{ROOT}:{HERE}")
    cmd = [sys.executable, __file__, "--worker", kind, "--system", system, "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {system} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_flops(case: str, batch: int, seq: int) -> float:
    """Model FLOPs of one training step (formula in the module docstring)."""
    g = bg.GEOMETRY
    hidden, layers, inter = g["hidden_size"], g["num_hidden_layers"], g["intermediate_size"]
    kv = hidden // g["num_attention_heads"] * g["num_key_value_heads"]
    # q k v o gate up down as (in, out)
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)] + [(hidden, inter)] * 2
    shapes.append((inter, hidden))
    tokens = batch * seq
    linear = 2 * tokens * (layers * sum(a * b for a, b in shapes) + hidden * g["vocab_size"])
    attention = 4 * batch * seq * seq * hidden * layers
    if case in ("sft", "pretrain"):
        return 3.0 * (linear + attention)
    lora = 2 * tokens * layers * sum(LORA_RANK * (a + b) for a, b in shapes)
    return float(linear + attention + lora + linear + 2 * attention + 2 * lora)


def summarize(case: str, system: str, raw: dict, prep: dict, batch: int, seq: int, warmup: int) -> dict:
    times = raw["step_times"][warmup:] or raw["step_times"][-1:]
    step = float(np.median(times))
    out = {k: v for k, v in raw.items() if k != "losses"}
    out.update(step_s=step, best_step_s=min(times), first_loss=raw["losses"][0], losses=raw["losses"])
    if case == "zero_padding":
        tokens = prep["tokens_per_step"][system][warmup : len(raw["step_times"])]
        tokens = tokens or prep["tokens_per_step"][system][-1:]
        out["tokens_per_s"] = sum(tokens) / sum(times[: len(tokens)])  # non-pad tokens per second
        padded = prep["tokens_per_step"][system + "_padded"][warmup : len(raw["step_times"])]
        out["pad_share"] = 1 - sum(tokens) / max(sum(padded), 1)
    else:
        out["tokens_per_s"] = batch * seq / step
        out["flops_per_step"] = step_flops(case, batch, seq)
        out["achieved_gflops"] = out["flops_per_step"] / step / 1e9
    return out


def run_all(
    args: argparse.Namespace, cases: list[str], shapes: list[str], tmp: Path
) -> tuple[dict, dict, dict]:
    npz, model_dir = tmp / "llama135m.npz", tmp / "fp32"
    bg.build_weights(npz)
    base = {"npz": str(npz), "model_dir": str(model_dir), "max_steps": args.warmup + args.steps}
    base["max_grad_norm"] = args.max_grad_norm
    run_worker("make_model", base)
    peaks = {system: [run_worker("matmul", base, system)["gflops"]] for system in ("paddle", "torch")}
    jobs: dict[str, tuple[dict, tuple[str, ...]]] = {}
    for case in cases:
        for shape in [f"{ZP_ROWS}x{args.zp_max_length}"] if case == "zero_padding" else shapes:
            batch, seq = (ZP_ROWS, args.zp_max_length) if case == "zero_padding" else SHAPES[shape]
            job = tmp / f"{case}-{shape}"
            job.mkdir()
            spec = dict(base, case=case, batch=batch, seq=seq, job=str(job))
            jobs[f"{case} {shape}"] = (spec, ZP_SYSTEMS if case == "zero_padding" else SYSTEMS)
    preps = {}
    for name, (spec, _) in jobs.items():
        print(f"prep: {name} ...", file=sys.stderr, flush=True)
        preps[name] = run_worker("prep", spec)
    runs: dict[str, dict[str, list[dict]]] = {name: {s: [] for s in job[1]} for name, job in jobs.items()}
    for round_ in range(args.rounds):
        for name, (spec, systems) in jobs.items():
            for system in systems if round_ % 2 == 0 else systems[::-1]:
                print(f"round {round_ + 1}/{args.rounds}: {name} {system} ...", file=sys.stderr, flush=True)
                kind = "transformers" if system == "transformers" else "toolkit"
                try:
                    raw = run_worker(kind, spec, system)
                except RuntimeError as err:  # e.g. killed for memory: recorded, the other runs go on
                    print(str(err)[-1500:], file=sys.stderr, flush=True)
                    runs[name][system].append({"error": str(err)[-1500:]})
                    continue
                runs[name][system].append(
                    summarize(spec["case"], system, raw, preps[name], spec["batch"], spec["seq"], args.warmup)
                )
    results = {name: {s: best(rs) for s, rs in by_system.items()} for name, by_system in runs.items()}
    for name, (spec, _) in jobs.items():
        results[name]["_prep"] = preps[name] | {"batch": spec["batch"], "seq": spec["seq"]}
    for system, rates in peaks.items():  # again at the end: the best of both is the peak (less noise)
        rates.append(run_worker("matmul", base, system)["gflops"])
    return results, runs, {system: max(rates) for system, rates in peaks.items()}


def git_state() -> dict:
    """The toolkit's commit and its uncommitted files under ``llm/`` (the code the toolkit rows ran)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "llm_uncommitted": git("status", "--porcelain", "llm"),
    }


def best(runs: list[dict]) -> dict:
    """The fastest successful run (or the first failure)."""
    ok = [r for r in runs if "error" not in r]
    return min(ok, key=lambda r: r["step_s"]) if ok else runs[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--system", default="", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {tuple(SHAPES)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="global-norm clip in both (0: off)")
    parser.add_argument("--zp_max_length", type=int, default=1024, help="zero_padding: max_length (> 512)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.spec)
        workers = {
            "make_model": lambda: make_model(Path(spec["npz"]), Path(spec["model_dir"])) or {},
            "prep": lambda: worker_prep(spec),
            "toolkit": lambda: worker_toolkit(spec, args.system),
            "transformers": lambda: worker_transformers(spec),
            "matmul": lambda: worker_matmul(args.system),
        }
        print(json.dumps(workers[args.worker]()))
        return
    cases = [c for c in args.cases.split(",") if c]
    shapes = [s for s in args.shapes.split(",") if s]
    if set(cases) - set(CASES) or set(shapes) - set(SHAPES):
        parser.error(f"cases from {CASES}, shapes from {tuple(SHAPES)}")
    if args.zp_max_length <= ZP_LENGTHS[1]:
        parser.error(f"--zp_max_length must exceed the longest example, {ZP_LENGTHS[1]} (+ EOS)")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    wall, code = time.perf_counter(), git_state()
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        results, runs, peaks = run_all(args, cases, shapes, Path(tmp))
    peak = max(peaks.values())
    for rows in results.values():
        for r in rows.values():
            if "achieved_gflops" in r:
                r["share_of_matmul_peak"] = r["achieved_gflops"] / peak
    checks, goals = checks_and_targets(results)
    md = table(results, checks, peak)
    machine = dict(cpus=os.cpu_count(), threads=bg.THREADS, load_avg_before=load_before)
    machine.update(load_avg_after=os.getloadavg(), matmul_2048_fp32_gflops=peaks)
    settings = {k: getattr(args, k) for k in ("steps", "warmup", "rounds", "max_grad_norm", "zp_max_length")}
    settings.update(cases=cases, shapes=shapes, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0, seed=SEED)
    settings["lora"] = {"r": LORA_RANK, "alpha": LORA_ALPHA, "dropout": 0.0, "targets": PEFT_TARGETS}
    settings.update(toolkit_loss_rounding="paddlenlp logs round(loss, 8)", zp_example_lengths=ZP_LENGTHS)
    payload = {
        "started": started,
        "wall_s": time.perf_counter() - wall,
        "machine": machine,
        "toolkit_code": code,
        "settings": settings,
        "targets": goals,
        "loss_checks": checks,
        "results": results,
        "rounds": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(payload, indent=2))
    matmul = ", ".join(f"{k} {v:.1f}" for k, v in peaks.items())
    lines = [
        md,
        "",
        f"Run of {started}, load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
        f"toolkit at {code['commit']} (+{len(code['llm_uncommitted'].splitlines())} uncommitted files under llm/); "
        f"{args.warmup} warm-up + {args.steps} timed steps (median), best of {args.rounds} round(s); "
        f"2048^3 fp32 matmul GFLOP/s: {matmul}. Toolkit losses are paddlenlp's log, rounded to 8 decimals; "
        f"loss match = |toolkit - transformers| <= {LOSS_TOL:g} on the first step.",
    ]
    lines.append(
        "Targets: "
        + "; ".join(f"{k}: {v['value']:.2f} ({'met' if v['met'] else 'NOT met'})" for k, v in goals.items())
    )
    (args.out / "training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
