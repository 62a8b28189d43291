"""Evaluation metrics: teacher-forced token accuracy and generation metrics (BLEU-4, ROUGE, exact match)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100


def token_accuracy(eval_pred: Any) -> dict[str, float]:
    """Share of supervised positions (label != -100) where the argmax prediction equals the label."""
    preds, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(preds, (tuple, list)):
        preds = preds[0]
    preds, labels = np.asarray(preds), np.asarray(labels)
    width = min(preds.shape[-1], labels.shape[-1])
    preds, labels = preds[..., :width], labels[..., :width]
    mask = labels != IGNORE_INDEX
    total = int(mask.sum())
    return {"accuracy": float((preds[mask] == labels[mask]).sum() / total) if total else 0.0}


def _strip(ids: Sequence[int], stop_ids: set[int]) -> list[int]:
    out = []
    for i in ids:
        i = int(i)
        if i == IGNORE_INDEX or i in stop_ids:
            if i in stop_ids:
                break
            continue
        out.append(i)
    return out


def _ngrams(tokens: Sequence[int], n: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for i in range(len(tokens) - n + 1):
        key = tuple(tokens[i : i + n])
        counts[key] = counts.get(key, 0) + 1
    return counts


def bleu4(candidates: list[list[int]], references: list[list[int]]) -> float:
    """Corpus BLEU-4 with brevity penalty over token ids (uniform weights, no smoothing)."""
    matches, totals = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references):
        cand_len, ref_len = cand_len + len(cand), ref_len + len(ref)
        for n in range(1, 5):
            c, r = _ngrams(cand, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(v, r.get(k, 0)) for k, v in c.items())
            totals[n - 1] += max(len(cand) - n + 1, 0)
    if min(totals) == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(np.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if cand_len > ref_len else float(np.exp(1 - ref_len / max(cand_len, 1)))
    return float(brevity * np.exp(log_precision))


def rouge_n(candidates: list[list[int]], references: list[list[int]], n: int) -> float:
    """Mean ROUGE-N recall-oriented F1 over examples."""
    scores = []
    for cand, ref in zip(candidates, references):
        c, r = _ngrams(cand, n), _ngrams(ref, n)
        overlap = sum(min(v, r.get(k, 0)) for k, v in c.items())
        rc, cc = sum(r.values()), sum(c.values())
        if overlap == 0 or rc == 0 or cc == 0:
            scores.append(0.0)
            continue
        p, rec = overlap / cc, overlap / rc
        scores.append(2 * p * rec / (p + rec))
    return float(np.mean(scores)) if scores else 0.0


def _lcs(a: Sequence[int], b: Sequence[int]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: list[list[int]], references: list[list[int]]) -> float:
    """Mean ROUGE-L F1 (longest common subsequence) over examples."""
    scores = []
    for cand, ref in zip(candidates, references):
        lcs = _lcs(cand, ref)
        if lcs == 0:
            scores.append(0.0)
            continue
        p, r = lcs / len(cand), lcs / len(ref)
        scores.append(2 * p * r / (p + r))
    return float(np.mean(scores)) if scores else 0.0


def make_generation_metrics(stop_ids: set[int]) -> Callable[[Any], dict[str, float]]:
    """``compute_metrics`` for generation eval: predictions are generated ids, labels the target ids."""

    def compute(eval_pred: Any) -> dict[str, float]:
        preds = (
            eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        )
        cands = [_strip(p, stop_ids) for p in np.asarray(preds)]
        refs = [_strip(r, stop_ids) for r in np.asarray(eval_pred.label_ids)]
        return {
            "rouge1": rouge_n(cands, refs, 1),
            "rouge2": rouge_n(cands, refs, 2),
            "rougel": rouge_l(cands, refs),
            "bleu4": bleu4(cands, refs),
            "exact_match": float(np.mean([c == r for c, r in zip(cands, refs)])) if refs else 0.0,
        }

    return compute
