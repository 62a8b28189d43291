"""SmoothQuant (https://arxiv.org/abs/2211.10438) and PaddleSlim-style PieceWiseSearch, in float32 numpy.

Statistics: over ``smooth_step`` calibration batches, the per-channel ``max |x_j|`` of each smoothed group's
common input (after Shift, if it ran) — always the max over all steps, as PaddleSlim. ``smooth_sampler``
only decides which calibration rows the search objective sees: ``none`` keeps the last step's rows,
``multi_step`` every step's (PaddleSlim's ``MultiStepSampler`` concatenates them); at most
:data:`MAX_ROWS` rows, evenly strided.

Factor: ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` with ``alpha = 0.5``, ``max|W_j|`` over row ``j`` of
every weight of the group (``[K, N]`` layout), ``s_j >= 1e-5`` (1 where either max is 0). Each linear then
computes ``(x / s) @ (diag(s) W)``: the float model is unchanged. PaddleSlim folds ``1/s`` into the
preceding norm; the toolkit keeps ``s`` on the linear (``QuantLinear.smooth``), so every group can be
smoothed, including linears not fed by a norm (``smooth_all_linears``).

PieceWiseSearch (``smooth_piecewise_search``): the channels are split by a 1-D k-means of their act absmax
(deterministic init evenly spaced between min and max; the pieces are ranges of the channels sorted by act
absmax) into ``smooth_k_piece`` pieces. Starting from the plain SmoothQuant factors, the pieces are visited
from the smallest centroid up; each piece tries every candidate of the grid — ``s = a^alpha / w^(1-alpha)``
for alpha in 0.20, 0.25, ..., 0.80 (:data:`SEARCH_ALPHAS`) and the constants 1.0, 1.5, ..., 5.0
(:data:`SEARCH_SCALES`), as PaddleSlim's ``search_alpha_*`` / ``search_scale_*`` ranges (PaddleSlim steps
alpha by 0.01 and starts from ``s = 1``) — keeping the others fixed, and keeps the best. Objective: the
mean squared error between the float output ``X @ W`` and the fake-quantized layer's output on the kept
rows — activation per tensor on ``[-127, 127]`` with the AVG scale (mean over steps of ``max |x / s|``)
for A8W8, weight per output channel (abs-max, the PTQ's bits). Since plain SmoothQuant is the starting
point, the result is never worse than it on that objective. ``smooth_search_piece`` repeats the search for
every piece count 1 .. ``smooth_k_piece`` and keeps the best.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle.nn as nn
from paddlenlp.utils.log import logger

from llm.errors import ConfigError
from llm.quant.calibrate import (
    AbsMaxObserver,
    LinearGroup,
    ShiftSmoothLinear,
    assign,
    calibrate,
    group_weight,
    wrap_linear,
)
from llm.quant.formats import compute_scales, dequantize, quantize
from llm.quant.layers import ACT_QMAX
from llm.quant.shift import select_groups

ALPHA = 0.5
SEARCH_ALPHAS = np.round(np.arange(0.2, 0.8 + 1e-9, 0.05), 2)
SEARCH_SCALES = np.round(np.arange(1.0, 5.0 + 1e-9, 0.5), 2)
SAMPLERS = ("none", "multi_step")
MAX_ROWS = 1024


@dataclass
class SearchSettings:
    """PieceWiseSearch options (QuantArgument's ``smooth_k_piece`` / ``smooth_search_piece``)."""

    k_piece: int = 3
    search_piece: bool = False


def smoothing_factors(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """``max|X_j|^alpha / max|W_j|^(1 - alpha)``, at least 1e-5; 1 where either max is 0."""
    a, w = np.asarray(act_absmax, np.float64), np.asarray(w_absmax, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.where(ok, np.power(np.where(ok, a, 1.0), alpha) / np.power(np.where(ok, w, 1.0), 1 - alpha), 1.0)
    return np.maximum(s, 1e-5).astype(np.float32)


def fake_quant_weight(w_kn: np.ndarray, bits: int) -> np.ndarray:
    """``w_kn`` on the per-output-channel abs-max grid of ``bits`` (float values, ``[K, N]``)."""
    w_nk = np.ascontiguousarray(w_kn.T, np.float32)
    scales = compute_scales(w_nk, bits)
    return dequantize(quantize(w_nk, scales, bits), scales).T


def fake_quant_act(x: np.ndarray, scale: float) -> np.ndarray:
    """``x`` on the symmetric int8 grid of step ``scale`` (as :func:`llm.quant.layers.fake_quant_act`)."""
    q = np.sign(x) * np.floor(np.abs(x) / scale + 0.5)  # paddle.round: half away from zero
    return np.clip(q, -ACT_QMAX, ACT_QMAX) * scale


class SmoothObjective:
    """Output MSE of the fake-quantized, smoothed layer vs the float layer on calibration rows."""

    def __init__(self, chunks: Sequence[np.ndarray], weight: np.ndarray, weight_bits: int, act_quant: bool):
        self.x = np.concatenate([np.asarray(c, np.float32) for c in chunks], axis=0)
        self.bounds = np.cumsum([0] + [len(c) for c in chunks])
        self.w = np.asarray(weight, np.float32)
        self.ref = self.x @ self.w
        self.bits, self.act_quant = weight_bits, act_quant

    def __call__(self, s: np.ndarray) -> float:
        xs = self.x / s
        if self.act_quant:
            peaks = [np.abs(xs[a:b]).max() for a, b in zip(self.bounds[:-1], self.bounds[1:], strict=True)]
            scale = max(float(np.mean(peaks)), 1e-8) / ACT_QMAX
            xs = fake_quant_act(xs, scale)
        out = xs @ fake_quant_weight(self.w * s[:, None], self.bits)
        return float(np.mean((out - self.ref) ** 2))


def kmeans_1d(values: np.ndarray, k: int, iters: int = 100) -> list[np.ndarray]:
    """Channel indices of up to ``k`` clusters of ``values`` (Lloyd, init evenly spaced min..max), ordered
    by ascending centroid; empty clusters are dropped."""
    v = np.asarray(values, np.float64)
    k = max(1, min(int(k), len(np.unique(v))))
    cent = np.linspace(v.min(), v.max(), k)
    labels = np.zeros(len(v), np.int64)
    for _ in range(iters):
        labels = np.abs(v[:, None] - cent[None, :]).argmin(axis=1)
        new = np.array([v[labels == j].mean() if (labels == j).any() else cent[j] for j in range(k)])
        if np.allclose(new, cent):
            break
        cent = new
    return [np.nonzero(labels == j)[0] for j in np.argsort(cent) if (labels == j).any()]


def piecewise_search(
    chunks: Sequence[np.ndarray],
    act_absmax: np.ndarray,
    weight: np.ndarray,
    *,
    k_piece: int = 3,
    search_piece: bool = False,
    weight_bits: int = 8,
    act_quant: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:
    """The searched smoothing vector (see the module docstring) and ``{loss, base_loss, k_piece}``."""
    w_absmax = np.abs(np.asarray(weight, np.float32)).max(axis=1)
    base = smoothing_factors(act_absmax, w_absmax)
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        return base, {"loss": float("nan"), "base_loss": float("nan"), "k_piece": 0.0}
    objective = SmoothObjective(chunks, weight, weight_bits, act_quant)
    base_loss = objective(base)
    best, best_loss, best_k = base, base_loss, 0
    for k in range(1, k_piece + 1) if search_piece else [k_piece]:
        s, loss = base.copy(), base_loss
        for idx in kmeans_1d(act_absmax, k):
            candidates = [smoothing_factors(act_absmax[idx], w_absmax[idx], a) for a in SEARCH_ALPHAS]
            candidates += [np.full(len(idx), c, np.float32) for c in SEARCH_SCALES]
            for cand in candidates:
                trial = s.copy()
                trial[idx] = cand
                trial_loss = objective(trial)
                if trial_loss < loss:
                    s, loss = trial, trial_loss
        if loss < best_loss:
            best, best_loss, best_k = s, loss, k
    return best, {"loss": best_loss, "base_loss": base_loss, "k_piece": float(best_k)}


def smooth_layer(layer: ShiftSmoothLinear, s: np.ndarray) -> None:
    """Make ``layer`` compute ``(x / s) @ (diag(s) W)`` (after any shift)."""
    if layer.has_smooth:
        raise ValueError("smooth_layer: already smoothed")
    weight = layer.weight.astype("float32").numpy()
    assign(layer.weight, weight * s[:, None].astype(np.float32))
    layer.smooth.set_value(np.asarray(s, np.float32))
    layer.has_smooth = True


def apply_smooth(
    model: nn.Layer,
    batches: Sequence[dict[str, Any]],
    groups: Sequence[LinearGroup],
    *,
    sampler: str = "none",
    all_linears: bool = False,
    search: SearchSettings | None = None,
    weight_bits: int = 8,
    act_quant: bool = True,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Collect act absmax over ``batches`` and smooth the selected groups in place (PieceWiseSearch when
    ``search`` is given); returns ``{group leader: s}``."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"smooth_sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    chosen = select_groups(groups, all_linears)
    keep = "none" if search is None else ("all" if sampler == "multi_step" else "last")
    observers = calibrate(
        model,
        batches,
        chosen,
        lambda _g: AbsMaxObserver(keep, MAX_ROWS, steps=len(batches)),
        desc="smooth",
        progress=progress,
    )
    factors: dict[str, np.ndarray] = {}
    for group in chosen:
        obs = observers[group.leader]
        if not obs.seen:
            logger.warning(f"smooth: {group.leader} saw no calibration tokens; not smoothed")
            continue
        weight = group_weight(model, group)
        if search is None:
            s = smoothing_factors(obs.absmax, np.abs(weight).max(axis=1))
        else:
            s, info = piecewise_search(
                obs.samples,
                obs.absmax,
                weight,
                k_piece=search.k_piece,
                search_piece=search.search_piece,
                weight_bits=weight_bits,
                act_quant=act_quant,
            )
            logger.debug(f"smooth search {group.leader}: {info}")
        for name in group.names:
            smooth_layer(wrap_linear(model, name), s)
        factors[group.leader] = s
    logger.info(f"smooth: {sum(len(g.names) for g in chosen)} linear layers in {len(factors)} groups")
    return factors
