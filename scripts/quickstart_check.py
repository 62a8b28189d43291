"""Reproduce the README's quick-start table: fine-tune the demo model, then greedy-predict the dev set.

    python scripts/quickstart_check.py --output_dir /tmp/quickstart            # the full quick start
    python scripts/quickstart_check.py --output_dir /tmp/qs --num_train_epochs 1 --skip_base   # short form

Runs exactly the README's commands (as subprocesses, from the repository root):

1. ``python finetune_generation.py demo/sft_argument.json --output_dir OUT/demo_sft [overrides]``, timed;
   the dev token accuracy (teacher forced) is ``eval_accuracy`` of its ``metrics.json``;
2. ``python predictor.py --model_name_or_path OUT/demo_sft --data_file demo/data/dev.json
   --decode_strategy greedy_search --batch_size 16 --max_length 16``; the dev exact match is the share of
   rows whose ``output`` equals the last ``tgt`` (the answer to the final turn);

and the same two measurements for the untrained base model (``--do_train false``; skipped with
``--skip_base``). Everything is written under ``--output_dir``; the checkout is not touched. Prints the table
rows in the README's form, then one ``RESULT {json}`` line for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS_FILE = "demo/sft_argument.json"
DEV = "demo/data/dev.json"
PREDICT = ["--decode_strategy", "greedy_search", "--batch_size", "16", "--max_length", "16"]


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repo root with output to ``log``; returns the wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        sys.exit(f"error: {' '.join(cmd)} exited with {proc.returncode} (log {log}):\n{tail}")
    return elapsed


def exact_match(output_file: Path) -> float:
    """Share of rows whose generated ``output`` equals the last ``tgt``."""
    rows = [json.loads(line) for line in output_file.read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        sys.exit(f"error: {output_file} has no rows")
    last = [r["tgt"][-1] if isinstance(r["tgt"], list) else r["tgt"] for r in rows]
    return sum(r["output"] == t for r, t in zip(rows, last)) / len(rows)


def measure(out: Path, train: bool, overrides: list[str]) -> dict[str, float]:
    """Fine-tune (or, with ``train`` off, only evaluate the base model) into ``out``, then predict the dev set
    with the result (the base model itself when not training)."""
    out.mkdir(parents=True, exist_ok=True)
    finetune = [sys.executable, "finetune_generation.py", ARGS_FILE, "--output_dir", str(out / "model")]
    if not train:
        finetune += ["--do_train", "false"]
    seconds = _run([*finetune, *overrides], out / "finetune.log")
    metrics = json.loads((out / "model" / "metrics.json").read_text(encoding="utf-8"))
    state = json.loads((out / "model" / "trainer_state.json").read_text()) if train else {}
    output_file = out / "output.json"
    model_dir = (
        str(out / "model") if train else json.loads((ROOT / ARGS_FILE).read_text())["model_name_or_path"]
    )
    predictor = [sys.executable, "predictor.py", "--model_name_or_path", model_dir]
    _run([*predictor, "--data_file", DEV, *PREDICT, "--output_file", str(output_file)], out / "predict.log")
    return {
        "token_accuracy": float(metrics["eval_accuracy"]),
        "exact_match": exact_match(output_file),
        "steps": int(state.get("global_step", 0)),
        "epochs": float(state.get("epoch", 0.0)),
        "finetune_seconds": seconds,
    }


def _wall(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True, help="where models, logs and predictions go")
    parser.add_argument("--num_train_epochs", type=float, default=None, help="override (short form)")
    parser.add_argument("--max_steps", type=int, default=None, help="override (short form)")
    parser.add_argument("--skip_base", action="store_true", help="do not measure the untrained base model")
    args = parser.parse_args(argv)

    out = Path(args.output_dir).resolve()
    if out == ROOT or ROOT in out.parents:
        sys.exit(f"error: --output_dir {out} is inside the checkout; use a directory outside it")
    overrides: list[str] = []
    if args.num_train_epochs is not None:
        overrides += ["--num_train_epochs", str(args.num_train_epochs)]
    if args.max_steps is not None:
        overrides += ["--max_steps", str(args.max_steps)]
    # overrides change the training, not the evaluation: the base row always uses the shipped file
    results: dict[str, dict[str, float]] = {}
    if not args.skip_base:
        results["base"] = measure(out / "base", train=False, overrides=[])
    results["sft"] = measure(out / "demo_sft", train=True, overrides=overrides)

    print("| | dev token accuracy (teacher forced) | dev exact match (greedy generation) | wall time |")
    print("|---|---|---|---|")
    if "base" in results:
        base = results["base"]
        print(
            f"| demo base model (pretrained, no fine-tuning) | {base['token_accuracy']:.3f} | {base['exact_match']:.2f} | — |"
        )
    sft = results["sft"]
    label = f"after `{ARGS_FILE}` ({sft['epochs']:g} epochs, {sft['steps']} steps)"
    if overrides:
        label += f" with {' '.join(overrides)}"
    print(
        f"| {label} | {sft['token_accuracy']:.3f} | {sft['exact_match']:.2f} | {_wall(sft['finetune_seconds'])} |"
    )
    print("RESULT " + json.dumps(results, sort_keys=True))
    return results


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
