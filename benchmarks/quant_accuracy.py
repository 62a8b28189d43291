"""Accuracy of every quantization method: dev perplexity and token accuracy against fp32, in one table.

Usage::

    python benchmarks/quant_accuracy.py [--sft_model checkpoints/demo_sft] [--out benchmarks/results]

Models: (a) the demo model after the quick-start SFT (``--sft_model``; trained with ``demo/sft_argument.json``
into ``--work`` when it does not exist), and (b) the same model with activation outliers: in every decoder
layer a few hidden channels of both RMSNorm weights are scaled up x50 and the matching input rows of the
following q/k/v and gate/up weights are divided by 50, so the float model computes the same function (its
logits are compared) while the activations feeding those linears carry the outliers that motivate SmoothQuant.

Methods: fp32; RTN W8; RTN W4 per channel, g128, g64; GPTQ W4 with the same group sizes; A8W8 naive; A8W8 +
SmoothQuant; A8W8 + Shift + SmoothQuant; A8W8 + Shift + SmoothQuant + PieceWiseSearch. Calibration: 8 batches
of 8 rows x 96 tokens from ``train.json`` (as ``finetune_generation.py`` builds them). Metrics on ``dev.json``:
perplexity of the target tokens (:func:`llm.eval.ppl.data_perplexity`, encoded as in training) and teacher-forced
token accuracy (argmax == target); "NLL lost" is the method's mean target NLL minus fp32's (nats per token).
Writes ``quant_accuracy.{md,json}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import llm  # noqa: F401  (zlib fix first)

# isort: split
import numpy as np
import paddle

from llm.config import QuantArgument
from llm.data import encode_example, has_supervision, read_examples
from llm.eval.ppl import data_perplexity
from llm.model import forward_logits, load_model
from llm.outputs import is_complete
from llm.quant.gptq import gptq_model
from llm.quant.model import quantize_model
from llm.quant.ptq import ptq_model
from llm.templates import resolve_chat_template
from llm.tokenizer import load_tokenizer
from llm.train.quantize import calibration_batches

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "demo" / "data"
OUTLIER_CHANNELS = (3, 17, 64, 101)
OUTLIER_FACTOR = 50.0
SRC, MAX = 48, 96

METHODS: list[tuple[str, dict[str, Any]]] = [
    ("fp32", {}),
    ("RTN W8", {"rtn": ("weight_only_int8", -1)}),
    ("RTN W4 per channel", {"rtn": ("weight_only_int4", -1)}),
    ("RTN W4 g128", {"rtn": ("weight_only_int4", 128)}),
    ("RTN W4 g64", {"rtn": ("weight_only_int4", 64)}),
    ("GPTQ W4 per channel", {"gptq": -1}),
    ("GPTQ W4 g128", {"gptq": 128}),
    ("GPTQ W4 g64", {"gptq": 64}),
    ("A8W8 naive", {"ptq": {}}),
    ("A8W8 + SmoothQuant", {"ptq": {"smooth": True, "smooth_all_linears": True}}),
    ("A8W8 + Shift + SmoothQuant", {"ptq": {"shift": True, "smooth": True, "smooth_all_linears": True}}),
    (
        "A8W8 + Shift + SmoothQuant + PieceWiseSearch",
        {"ptq": {"shift": True, "smooth": True, "smooth_all_linears": True, "smooth_piecewise_search": True}},
    ),
]


def ensure_sft_model(path: Path) -> Path:
    """``path`` if it holds a finished model, else the quick-start SFT trained into it (~1 min)."""
    if is_complete(str(path)):
        return path
    cmd = [sys.executable, str(ROOT / "finetune_generation.py"), str(ROOT / "demo" / "sft_argument.json")]
    subprocess.run(cmd + ["--output_dir", str(path), "--disable_tqdm", "true"], check=True, cwd=ROOT)
    return path


def add_outliers(model: paddle.nn.Layer) -> None:
    """Scale a few hidden channels of the RMSNorm weights x50, divide the next weights' rows: same function."""
    idx = list(OUTLIER_CHANNELS)
    with paddle.no_grad():
        for layer in model.llama.layers:
            pairs = (
                (
                    layer.input_layernorm,
                    (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                ),
                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)),
            )
            for norm, linears in pairs:
                w = norm.weight.numpy()
                w[idx] *= OUTLIER_FACTOR
                norm.weight.set_value(w)
                for lin in linears:
                    v = lin.weight.numpy()
                    v[idx, :] /= OUTLIER_FACTOR
                    lin.weight.set_value(v)


def token_accuracy(model: paddle.nn.Layer, feats: list[dict], pad: int, batch: int = 50) -> float:
    """Teacher-forced accuracy of the target tokens."""
    right = total = 0
    for start in range(0, len(feats), batch):
        rows = feats[start : start + batch]
        length = max(len(f["input_ids"]) for f in rows)
        ids = np.full((len(rows), length), pad, np.int64)
        labels = np.full((len(rows), length), -100, np.int64)
        for i, f in enumerate(rows):
            ids[i, : len(f["input_ids"])] = f["input_ids"]
            labels[i, : len(f["labels"])] = f["labels"]
        with paddle.no_grad():
            pred = forward_logits(model, {"input_ids": ids}).numpy().argmax(-1)
        mask = labels != -100
        right += int((pred[mask] == labels[mask]).sum())
        total += int(mask.sum())
    return right / total


def quantized(base: paddle.nn.Layer, spec: dict[str, Any], batches: list[dict]) -> paddle.nn.Layer:
    model = copy.deepcopy(base)
    model.eval()
    with paddle.no_grad():
        if "rtn" in spec:
            quantize_model(model, *spec["rtn"], progress=False)
        elif "gptq" in spec:
            gptq_model(
                model, batches, bits=4, group_size=spec["gptq"], act_order=True, damp=0.1, progress=False
            )
        elif "ptq" in spec:
            args = QuantArgument(do_ptq=True, quant_type="a8w8", ptq_step=len(batches), **spec["ptq"])
            args.shift_step = args.smooth_step = len(batches)
            ptq_model(model, batches, args)
    return model


def evaluate(sft: Path) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(str(sft))
    tokenizer.chat_template = resolve_chat_template(tokenizer, str(sft), None)
    template = tokenizer.chat_template
    train = [
        encode_example(e, tokenizer, template, SRC, MAX) for e in read_examples(str(DATA / "train.json"))
    ]
    batches = calibration_batches([f for f in train if has_supervision(f)], 8, MAX, 8, seed=42)
    dev_examples = list(read_examples(str(DATA / "dev.json")))
    dev = [
        f
        for f in (encode_example(e, tokenizer, template, SRC, MAX) for e in dev_examples)
        if has_supervision(f)
    ]
    pad = tokenizer.pad_token_id or 0
    rows = []
    for label in ("(a) demo SFT", "(b) demo SFT + outliers"):
        base = load_model(str(sft))
        base.eval()
        if label.startswith("(b)"):
            with paddle.no_grad():
                before = forward_logits(base, batches[0]).numpy()
                add_outliers(base)
                after = forward_logits(base, batches[0]).numpy()
            print(f"outlier model: float logits change by {np.abs(after - before).max():.2e} (max abs)")
        for name, spec in METHODS:
            began = time.perf_counter()
            model = base if not spec else quantized(base, spec, batches)
            ppl = data_perplexity(model, tokenizer, dev_examples, MAX, SRC, batch_size=50).perplexity
            acc = token_accuracy(model, dev, pad)
            rows.append(
                {
                    "model": label,
                    "method": name,
                    "ppl": ppl,
                    "accuracy": acc,
                    "seconds": time.perf_counter() - began,
                }
            )
            print(f"{label:26s} {name:46s} ppl {ppl:8.4f}  acc {acc:.4f}", flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    fp = {r["model"]: r for r in rows if r["method"] == "fp32"}
    out = [
        "| method | (a) ppl | (a) NLL lost | (a) dev token acc | (b) outliers: ppl | (b) NLL lost | (b) dev token acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, _ in METHODS:
        cells = []
        for label in fp:
            r = next(x for x in rows if x["model"] == label and x["method"] == name)
            lost = math.log(r["ppl"]) - math.log(fp[label]["ppl"])  # mean NLL over fp32's, nats per token
            cells += [f"{r['ppl']:.4f}", f"{lost * 1e3:+.2f}e-3", f"{r['accuracy']:.4f}"]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    from paddlenlp.utils.log import logger

    logger.set_level("INFO")  # the search's per-layer DEBUG lines
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sft_model", default=str(ROOT / "checkpoints" / "demo_sft"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    sft = ensure_sft_model(Path(args.sft_model))
    rows = evaluate(sft)
    md = table(rows)
    print("\n" + md)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "quant_accuracy.md").write_text(md + "\n")
    Path(args.out, "quant_accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
