"""Evaluation metrics on hand-computed cases."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

import llm  # noqa: F401  # isort: split
from llm.train.metrics import bleu4, make_generation_metrics, rouge_l, rouge_n, token_accuracy


def test_token_accuracy_ignores_masked_positions() -> None:
    preds = np.array([[5, 6, 7, 8]])
    labels = np.array([[-100, 6, 0, 8]])  # 3 supervised positions, 2 correct
    assert token_accuracy(SimpleNamespace(predictions=preds, label_ids=labels))["accuracy"] == pytest.approx(
        2 / 3
    )


def test_rouge_by_hand() -> None:
    # unigram overlap 2 of 3 both ways -> F1 2/3; LCS (1, 3, 4) of length 3 in 4 and 4 -> 0.75
    assert rouge_n([[1, 2, 3]], [[1, 2, 4]], 1) == pytest.approx(2 / 3)
    assert rouge_n([[1, 2, 3]], [[1, 2, 4]], 2) == pytest.approx(1 / 2)
    assert rouge_l([[1, 2, 3, 4]], [[1, 3, 4, 5]]) == pytest.approx(0.75)


def test_bleu4_by_hand() -> None:
    assert bleu4([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]]) == pytest.approx(1.0)
    assert bleu4([[9, 9, 9, 9]], [[1, 2, 3, 4]]) == 0.0
    # every n-gram of the candidate is in the reference (precisions 1); brevity penalty exp(1 - 8/4)
    assert bleu4([[1, 2, 3, 4]], [[1, 2, 3, 4, 5, 6, 7, 8]]) == pytest.approx(math.exp(-1))


def test_generation_metrics_cut_at_stop_id_and_padding() -> None:
    compute = make_generation_metrics({2})
    preds = np.array([[7, 8, 2, 9, 9], [7, 8, 9, -100, -100]])
    labels = np.array([[7, 8, -100, -100, -100], [7, 8, -100, -100, -100]])
    out = compute(SimpleNamespace(predictions=preds, label_ids=labels))
    assert out["exact_match"] == pytest.approx(0.5)  # row 0 stops at id 2 -> [7, 8]; row 1 is [7, 8, 9]
    assert out["rouge1"] == pytest.approx((1.0 + 0.8) / 2)  # row 1: P 2/3, R 1 -> F1 0.8
