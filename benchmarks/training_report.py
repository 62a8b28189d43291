"""Report of ``bench_training.py``: the first-loss checks, the targets of issue 14 and the markdown table."""

from __future__ import annotations

LOSS_TOL = 1e-4  # first-step losses of the two systems must agree this closely


def checks_and_targets(results: dict) -> tuple[dict, dict]:
    checks, goals = {}, {}
    for name, rows in results.items():
        ours, hf = rows.get("toolkit"), rows.get("transformers")
        if ours and hf and "error" not in ours and "error" not in hf:
            diff = abs(ours["first_loss"] - hf["first_loss"])
            checks[name] = {
                "loss_toolkit": ours["first_loss"],
                "loss_transformers": hf["first_loss"],
                "abs_diff": diff,
                "loss_match": diff <= LOSS_TOL,
            }
            if name.split()[0] in ("lora", "sft"):
                ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
                goals[f"{name}: toolkit tokens/s >= 1.2x transformers"] = {
                    "value": ratio,
                    "met": ratio >= 1.2,
                }
            ratio = ours["peak_mb"] / hf["peak_mb"]
            goals[f"{name}: toolkit peak RSS <= 1.0x transformers"] = {"value": ratio, "met": ratio <= 1.0}
        if "step_s" in rows.get("packed", {}) and "step_s" in rows.get("padded", {}):
            ratio = rows["packed"]["tokens_per_s"] / rows["padded"]["tokens_per_s"]
            goals[f"{name}: zero_padding effective tokens/s >= 1.5x padded"] = {
                "value": ratio,
                "met": ratio >= 1.5,
            }
    return checks, goals


def table(results: dict, checks: dict, peak_gflops: float) -> str:
    heads = [
        "case",
        "B x SEQ",
        "system",
        "step (s)",
        "tokens/s (x transformers)",
        "peak RSS MB (x transformers)",
    ]
    heads += ["first loss", f"model GFLOP/s (share of {peak_gflops:.0f} matmul peak)"]
    lines = ["| " + " | ".join(heads) + " |", "|---" * len(heads) + "|"]
    for name, rows in results.items():
        case, shape = name.split()
        ref = rows.get("transformers") or rows.get("padded")
        ref = None if ref is None or "error" in ref else ref
        for system, r in rows.items():
            if system.startswith("_"):
                continue
            label = system
            if case == "zero_padding":
                label = f"toolkit {system} (zero_padding {str(system == 'packed').lower()})"
            if "error" in r:
                reason = r["error"].strip().splitlines()[-1][:80]
                lines.append(f"| {case} | {shape} | {label} | failed: {reason} |" + " |" * (len(heads) - 4))
                continue
            speed = "" if ref is None or r is ref else f" ({r['tokens_per_s'] / ref['tokens_per_s']:.2f}x)"
            rss = "" if ref is None or r is ref else f" ({r['peak_mb'] / ref['peak_mb']:.2f}x)"
            loss = f"{r['first_loss']:.6f}"
            if system == "toolkit" and name in checks:
                c = checks[name]
                loss += f" (diff {c['abs_diff']:.1e}, {'match' if c['loss_match'] else 'MISMATCH'})"
            flops = "-"
            if "achieved_gflops" in r:
                flops = f"{r['achieved_gflops']:.1f} ({r['achieved_gflops'] / peak_gflops:.0%})"
            tps = f"{r['tokens_per_s']:.0f}" + (" non-pad" if case == "zero_padding" else "")
            lines.append(
                f"| {case} | {shape} | {label} | {r['step_s']:.2f} | {tps}{speed} | {r['peak_mb']:.0f}{rss} | "
                f"{loss} | {flops} |"
            )
    return "\n".join(lines)
