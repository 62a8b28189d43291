"""Post-training quantization (``do_ptq``) in the toolkit's own math, in PaddleNLP's order:

1. refuse LoRA models and bad options (:class:`~llm.errors.ConfigError`), put the model in eval mode;
2. group the target linears by shared input (one forward, :func:`llm.quant.calibrate.find_groups`);
3. optional Shift over ``shift_step`` batches (:mod:`llm.quant.shift`);
4. optional SmoothQuant / PieceWiseSearch over ``smooth_step`` batches (:mod:`llm.quant.smooth`);
5. ``ptq_step`` batches with an AVG observer (mean over batches of the per-tensor ``max |x|`` of each
   group's shifted, smoothed input): ``act_scale = avg / 127``, one per group (a8w8 only);
6. optional ``auto_clip`` (AWQ-style): per output channel, the clip ratio of 1.0, 0.95, ..., 0.5 of its
   abs max minimising the mean squared output error ``|x @ W - x @ q(clip(W))|^2`` on up to
   :data:`CLIP_ROWS` rows of the group's (transformed, float) input from the first PTQ batch;
7. abs-max channel-wise weights -> round to nearest (:func:`llm.quant.formats.rtn`, 8 bits for a8w8 /
   wint8, 4 for wint4); each target becomes a :class:`~llm.quant.layers.QuantLinear` carrying its
   ``act_scale`` and, if transformed, its ``shift`` / ``smooth`` vectors.

Returned scales are the stored grid steps: ``weight_scales[name]`` the per-output-channel ``absmax / qmax``,
``act_scales[name]`` the layer's ``act_scale`` (empty for weight-only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
from paddlenlp.utils.log import logger
from tqdm import tqdm

from llm.errors import ConfigError
from llm.quant.calibrate import (
    AvgAbsMaxObserver,
    LinearGroup,
    ShiftSmoothLinear,
    calibrate,
    decoder_of,
    find_groups,
    refuse_lora,
)
from llm.quant.formats import WEIGHT_BITS, canonical_quant_type, rtn
from llm.quant.layers import ACT_QMAX, QuantLinear
from llm.quant.model import QuantizationConfig, check_quantizable, get_layer, set_layer, set_model_config
from llm.quant.shift import SAMPLERS as SHIFT_SAMPLERS
from llm.quant.shift import apply_shift
from llm.quant.smooth import SAMPLERS as SMOOTH_SAMPLERS
from llm.quant.smooth import SearchSettings, apply_smooth, fake_quant_weight

CLIP_RATIOS = np.round(np.arange(1.0, 0.5 - 1e-9, -0.05), 2)
CLIP_ROWS = 512
DEFAULTS: dict[str, Any] = {  # QuantArgument's defaults, for objects that lack a field
    "quant_type": "a8w8",
    "ptq_step": 32,
    "shift": False,
    "shift_all_linears": False,
    "shift_sampler": "ema",
    "shift_step": 32,
    "smooth": False,
    "smooth_all_linears": False,
    "smooth_sampler": "none",
    "smooth_step": 32,
    "smooth_piecewise_search": False,
    "smooth_k_piece": 3,
    "smooth_search_piece": False,
    "auto_clip": False,
    "quant_group_size": -1,
}


@dataclass
class PTQSettings:
    """Checked PTQ options."""

    quant_type: str
    bits: int
    ptq_step: int
    shift: bool
    shift_all_linears: bool
    shift_sampler: str
    shift_step: int
    smooth: bool
    smooth_all_linears: bool
    smooth_sampler: str
    smooth_step: int
    search: SearchSettings | None
    auto_clip: bool
    group_size: int = -1  # weight-only (wint8 / wint4) round-to-nearest groups; a8w8 is per channel

    @property
    def act_quant(self) -> bool:
        return self.quant_type == "a8w8"


def _steps(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _choice(name: str, value: Any, choices: Sequence[str]) -> str:
    key = "none" if value is None else str(value).strip().lower()
    if key not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return key


def check_ptq_args(args: Any) -> PTQSettings:
    """Read and check QuantArgument-like ``args`` (missing fields take QuantArgument's defaults)."""
    get = {k: getattr(args, k, v) for k, v in DEFAULTS.items()}
    quant_type = canonical_quant_type(get["quant_type"])
    k_piece = get["smooth_k_piece"]
    k_piece = 1 if k_piece is True else k_piece  # chatglm2's ptq_argument.json has "smooth_k_piece": true
    group_size = int(get["quant_group_size"])
    if group_size != -1 and quant_type == "a8w8":
        raise ConfigError(
            "quant_group_size applies to weight-only wint8 / wint4; a8w8 weights are per channel"
        )
    search = None
    if get["smooth"] and get["smooth_piecewise_search"]:
        search = SearchSettings(_steps("smooth_k_piece", k_piece), bool(get["smooth_search_piece"]))
    return PTQSettings(
        quant_type=quant_type,
        bits=WEIGHT_BITS[quant_type],
        ptq_step=_steps("ptq_step", get["ptq_step"]),
        shift=bool(get["shift"]),
        shift_all_linears=bool(get["shift_all_linears"]),
        shift_sampler=_choice("shift_sampler", get["shift_sampler"], SHIFT_SAMPLERS),
        shift_step=_steps("shift_step", get["shift_step"]),
        smooth=bool(get["smooth"]),
        smooth_all_linears=bool(get["smooth_all_linears"]),
        smooth_sampler=_choice("smooth_sampler", get["smooth_sampler"], SMOOTH_SAMPLERS),
        smooth_step=_steps("smooth_step", get["smooth_step"]),
        search=search,
        auto_clip=bool(get["auto_clip"]),
        group_size=group_size,
    )


def auto_clip_weight(w_kn: np.ndarray, x: np.ndarray, bits: int) -> np.ndarray:
    """``w_kn`` clipped per output channel to the ratio of :data:`CLIP_RATIOS` (times its abs max) that
    minimises the channel's mean squared output error on rows ``x`` after ``bits``-bit RTN."""
    w = np.asarray(w_kn, np.float32)
    x = np.asarray(x, np.float32)
    ref = x @ w
    absmax = np.abs(w).max(axis=0)
    best_err = np.full(w.shape[1], np.inf)
    best = np.ones(w.shape[1], np.float32)
    for ratio in CLIP_RATIOS:
        limit = absmax * ratio
        err = np.mean((x @ fake_quant_weight(np.clip(w, -limit, limit), bits) - ref) ** 2, axis=0)
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, ratio, best)
    limit = absmax * best
    return np.clip(w, -limit, limit)


def _quant_layer(
    layer: nn.Linear, bits: int, act_scale: float | None, clip_rows: np.ndarray | None, group_size: int = -1
) -> QuantLinear:
    weight = layer.weight.astype("float32").numpy()
    if clip_rows is not None and len(clip_rows):
        weight = auto_clip_weight(weight, clip_rows, bits)
    bias = None if layer.bias is None else layer.bias.astype("float32").numpy()
    moved = isinstance(layer, ShiftSmoothLinear)
    return QuantLinear.from_weight(
        rtn(weight, bits, group_size),
        bias,
        act_scale=act_scale,
        smooth=layer.smooth.numpy() if moved and layer.has_smooth else None,
        shift=layer.shift.numpy() if moved and layer.has_shift else None,
    )


def _act_scales(groups: Sequence[LinearGroup], observers: dict[str, AvgAbsMaxObserver]) -> dict[str, float]:
    """``{leader: avg absmax / 127}``; a group that saw no token takes the largest scale of the model."""
    scales = {g.leader: observers[g.leader].value() / ACT_QMAX for g in groups if observers[g.leader].seen}
    if not scales:
        raise ConfigError("PTQ: no target linear layer saw a calibration token")
    fallback = max(scales.values())
    for g in groups:
        if g.leader not in scales:
            logger.warning(f"ptq: {g.leader} saw no calibration tokens; using the largest act scale")
            scales[g.leader] = fallback
    return {k: float(np.float32(max(v, 1e-8))) for k, v in scales.items()}


def ptq_model(
    model: nn.Layer, batches: Sequence[dict[str, Any]], args: Any, *, progress: bool = True
) -> tuple[QuantizationConfig, dict[str, list[Any]], dict[str, float]]:
    """Quantize ``model`` in place (see the module docstring); returns ``(config, weight_scales,
    act_scales)``, the config already recorded in ``model.config``."""
    settings = check_ptq_args(args)
    refuse_lora(model)
    names = check_quantizable(model, settings.quant_type, -1)
    if any(isinstance(get_layer(model, name), QuantLinear) for name in names):
        raise ConfigError("PTQ: the model is already quantized; start from a float model")
    batches = list(batches)
    if not batches:
        raise ConfigError("PTQ needs at least one calibration batch")
    model.eval()
    with paddle.no_grad():
        groups = find_groups(model, batches[0])
        first = [g for g in groups if decoder_of(g.leader) == decoder_of(groups[0].leader)]
        logger.info("ptq groups of the first decoder layer: " + "; ".join("+".join(g.names) for g in first))
        if settings.shift:
            apply_shift(
                model,
                batches[: settings.shift_step],
                groups,
                sampler=settings.shift_sampler,
                all_linears=settings.shift_all_linears,
                progress=progress,
            )
        if settings.smooth:
            apply_smooth(
                model,
                batches[: settings.smooth_step],
                groups,
                sampler=settings.smooth_sampler,
                all_linears=settings.smooth_all_linears,
                search=settings.search,
                weight_bits=settings.bits,
                act_quant=settings.act_quant,
                progress=progress,
            )
        observers: dict[str, AvgAbsMaxObserver] = {}
        if settings.act_quant or settings.auto_clip:
            observers = calibrate(
                model,
                batches[: settings.ptq_step],
                groups,
                lambda _g: AvgAbsMaxObserver(CLIP_ROWS if settings.auto_clip else 0),
                desc="ptq",
                progress=progress,
            )
        group_scales = _act_scales(groups, observers) if settings.act_quant else {}
        weight_scales: dict[str, list[Any]] = {}
        act_scales: dict[str, float] = {}
        members = [(g, name) for g in groups for name in g.names]
        for group, name in tqdm(members, desc="ptq convert", disable=not progress, leave=False):
            act_scale = group_scales.get(group.leader)
            clip_rows = observers[group.leader].sample if settings.auto_clip else None
            layer = _quant_layer(
                get_layer(model, name), settings.bits, act_scale, clip_rows, settings.group_size
            )
            set_layer(model, name, layer)
            scales = layer.scales.numpy()  # [N, G]: one scale per output channel, or a row of group scales
            weight_scales[name] = scales[:, 0].tolist() if scales.shape[1] == 1 else scales.tolist()
            if act_scale is not None:
                act_scales[name] = float(act_scale)
    config = QuantizationConfig(
        quant_type=settings.quant_type,
        algorithm="ptq",
        group_size=settings.group_size,
        bits=settings.bits,
        modules=names,
        smooth=settings.smooth,
        shift=settings.shift,
        shift_smooth_all_linears=settings.shift_all_linears or settings.smooth_all_linears,
    )
    set_model_config(model, config)
    logger.info(f"ptq: {len(names)} linear layers quantized ({settings.quant_type})")
    return config, weight_scales, act_scales
