"""Shift (Outlier Suppression+, https://arxiv.org/abs/2304.09145) in the toolkit's own float32 math.

Each shifted group's common input gets a per-channel zero point ``z = (max + min) / 2`` from ``shift_step``
calibration batches (``shift_sampler="ema"``: an EMA of the per-batch min / max; ``"none"``: the global
min / max). Each linear of the group then computes ``(x - z) @ W + (b + z @ W)`` — the float model is
unchanged, and the quantized input ``x - z`` is centred. PaddleSlim folds ``-z`` into the preceding
LayerNorm's bias; the toolkit keeps ``z`` on the linear (``QuantLinear.shift``), which also works after an
RMSNorm (no bias) and for any linear (``shift_all_linears``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle.nn as nn
from paddlenlp.utils.log import logger

from llm.errors import ConfigError
from llm.quant.calibrate import (
    LinearGroup,
    MinMaxObserver,
    ShiftSmoothLinear,
    assign,
    calibrate,
    wrap_linear,
)

SAMPLERS = ("ema", "none")


def select_groups(groups: Sequence[LinearGroup], all_linears: bool) -> list[LinearGroup]:
    """Groups to transform: the norm-fed ones, or every group with ``all_linears``; unobserved ones never."""
    return [g for g in groups if g.observed and (all_linears or g.norm_fed)]


def shift_layer(layer: ShiftSmoothLinear, z: np.ndarray) -> None:
    """Make ``layer`` compute ``(x - z) @ W + (b + z @ W)`` (before any smoothing)."""
    if layer.has_shift or layer.has_smooth:
        raise ValueError("shift_layer: Shift must come first and only once")
    weight = layer.weight.astype("float32").numpy().astype(np.float64)
    bias = layer.ensure_bias()
    new_bias = bias.astype("float32").numpy().astype(np.float64) + z.astype(np.float64) @ weight
    assign(bias, new_bias)
    layer.shift.set_value(z.astype(np.float32))
    layer.has_shift = True


def apply_shift(
    model: nn.Layer,
    batches: Sequence[dict[str, Any]],
    groups: Sequence[LinearGroup],
    *,
    sampler: str = "ema",
    all_linears: bool = False,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Collect min / max over ``batches`` and shift the selected groups in place; returns
    ``{group leader: z}``."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"shift_sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    chosen = select_groups(groups, all_linears)
    observers = calibrate(
        model,
        batches,
        chosen,
        lambda _g: MinMaxObserver(ema=sampler == "ema"),
        desc="shift",
        progress=progress,
    )
    shifts: dict[str, np.ndarray] = {}
    for group in chosen:
        obs = observers[group.leader]
        if not obs.seen:
            logger.warning(f"shift: {group.leader} saw no calibration tokens; not shifted")
            continue
        z = obs.center()
        for name in group.names:
            shift_layer(wrap_linear(model, name), z)
        shifts[group.leader] = z
    logger.info(f"shift: {sum(len(g.names) for g in chosen)} linear layers in {len(shifts)} groups")
    return shifts
