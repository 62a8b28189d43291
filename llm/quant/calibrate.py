"""Calibration plumbing for PTQ: which target linears share an input, the float Shift/Smooth wrapper, and
forward hooks feeding per-linear input statistics (observers) over calibration batches.

Grouping is generic: one forward on a calibration batch records, for every target linear, the tensor it
received; linears that got the *same tensor object* (or, failing that, an equal tensor inside the same
decoder layer) form one group — q/k/v, gate/up, Mixtral's expert w1/w3 — so they share one shift, one
smoothing vector and one activation scale (a kernel can fuse them). A group is *norm-fed* when that tensor
is (or equals) the output of a ``*Norm*`` layer of the same decoder layer: the LN -> Linear pairs
PaddleSlim's Shift / Smooth handle when ``*_all_linears`` is off. A linear that did not run on that batch
(an MoE expert no token was routed to) is a group of its own, marked unobserved: never shifted or smoothed.

Statistics are taken on the input *as the layer transforms it* (``(x - shift) / smooth``) over the real
tokens only: rows a 2-D ``attention_mask`` marks as padding are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F
from tqdm import tqdm

from llm.errors import ConfigError
from llm.quant.model import get_layer, quant_targets, set_layer

SEQ_FIRST = ("chatglm", "chatglm_v2")  # families whose hidden states are [seq, batch, hidden]
MERGE_LORA = (
    "PTQ cannot quantize a LoRA model: merge lora parameters first (python merge_lora_params.py "
    "--model_name_or_path BASE --lora_path LORA --merge_lora_model_path MERGED), then quantize MERGED"
)


def refuse_lora(model: nn.Layer) -> None:
    """Raise :class:`ConfigError` for a ``LoRAModel`` or any model holding ``lora_A`` weights."""
    from paddlenlp.peft import LoRAModel

    if isinstance(model, LoRAModel) or any(hasattr(layer, "lora_A") for layer in model.sublayers()):
        raise ConfigError(MERGE_LORA)


@dataclass
class LinearGroup:
    """Target linears fed one input tensor (model order); ``observed`` is False if none ran on the batch."""

    names: list[str]
    norm_fed: bool
    observed: bool = True

    @property
    def leader(self) -> str:
        return self.names[0]


class ShiftSmoothLinear(nn.Linear):
    """A float ``nn.Linear`` computing ``((x - shift) / smooth) @ weight + bias`` (same parameter names, so
    the model's state dict and :func:`~llm.quant.model.quant_targets` are unchanged)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Layer.__init__(self)
        k, n = linear.weight.shape
        self._dtype = linear.weight.dtype
        self._name = getattr(linear, "_name", None)
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("shift", paddle.zeros([k], "float32"), persistable=False)
        self.register_buffer("smooth", paddle.ones([k], "float32"), persistable=False)
        self.has_shift = self.has_smooth = False

    def ensure_bias(self) -> paddle.Tensor:
        """The bias, created as zeros if the linear had none (Shift folds ``shift @ W`` into it)."""
        if self.bias is None:
            self.bias = self.create_parameter([self.weight.shape[1]], dtype=self._dtype, is_bias=True)
            self.bias.set_value(paddle.zeros([self.weight.shape[1]], self._dtype))
        return self.bias

    def transform(self, x: paddle.Tensor) -> paddle.Tensor:
        """``(x - shift) / smooth`` (only the parts that were applied)."""
        if self.has_shift:
            x = x - self.shift.astype(x.dtype)
        if self.has_smooth:
            x = x / self.smooth.astype(x.dtype)
        return x

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return F.linear(self.transform(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.weight.shape[0]}, out={self.weight.shape[1]}, shift={self.has_shift}, smooth={self.has_smooth}"


def assign(t: paddle.Tensor, value: np.ndarray) -> None:
    """Write a float numpy array into a parameter of any float dtype."""
    t.set_value(paddle.to_tensor(np.asarray(value, np.float32)).astype(t.dtype))


def wrap_linear(model: nn.Layer, name: str) -> ShiftSmoothLinear:
    """The target ``name`` as a :class:`ShiftSmoothLinear` (wrapped in place on first use)."""
    layer = get_layer(model, name)
    if not isinstance(layer, ShiftSmoothLinear):
        layer = ShiftSmoothLinear(layer)
        set_layer(model, name, layer)
    return layer


def weight_of(model: nn.Layer, name: str) -> np.ndarray:
    """``float32 [K, N]`` weight of a target linear."""
    return get_layer(model, name).weight.astype("float32").numpy()


def group_weight(model: nn.Layer, group: LinearGroup) -> np.ndarray:
    """The group's weights side by side, ``float32 [K, sum N]``."""
    return np.concatenate([weight_of(model, name) for name in group.names], axis=1)


def decoder_of(name: str) -> str:
    """``prefix.layers.N`` / ``prefix.h.N`` of a sublayer name ("" outside the decoder layers)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in ("layers", "h") and i + 1 < len(parts) and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return ""


def _same(a: paddle.Tensor, b: paddle.Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and bool(paddle.equal_all(a, b)))


class _GroupFinder:
    """Forward hooks grouping linears by input as they run, holding one decoder layer's tensors at a time."""

    def __init__(self, names: list[str]) -> None:
        self.order = {name: i for i, name in enumerate(names)}
        self.groups: dict[str, LinearGroup] = {}
        self.layer: str | None = None
        self.norms: list[paddle.Tensor] = []
        self.inputs: list[tuple[paddle.Tensor, LinearGroup]] = []

    def _enter(self, decoder: str) -> None:
        if decoder != self.layer:
            self.layer, self.norms, self.inputs = decoder, [], []

    def norm_hook(self, name: str) -> Callable[..., None]:
        def hook(_layer: nn.Layer, _args: tuple, out: Any) -> None:
            if isinstance(out, paddle.Tensor) and decoder_of(name):
                self._enter(decoder_of(name))
                self.norms.append(out)

        return hook

    def linear_hook(self, name: str) -> Callable[..., None]:
        def hook(_layer: nn.Layer, args: tuple) -> None:
            if name in self.groups:
                return  # called twice in one forward: the first call decides
            x = args[0]
            self._enter(decoder_of(name))
            group = next((g for t, g in self.inputs if _same(t, x)), None)
            if group is None:
                fed = any(out is x for out in self.norms) or any(_same(out, x) for out in self.norms)
                group = LinearGroup([], norm_fed=fed)
                self.inputs.append((x, group))
            group.names.append(name)
            self.groups[name] = group

        return hook

    def result(self) -> list[LinearGroup]:
        """Groups in model order (members too); a linear that never ran is a group of its own."""
        out: list[LinearGroup] = []
        for name in self.order:
            group = self.groups.get(name)
            if group is None:  # an MoE expert no token was routed to
                out.append(LinearGroup([name], norm_fed=False, observed=False))
            elif group.names and min(group.names, key=self.order.__getitem__) == name:
                group.names.sort(key=self.order.__getitem__)
                out.append(group)
        return out


def find_groups(model: nn.Layer, batch: dict[str, Any]) -> list[LinearGroup]:
    """Group the target linears by identical input (see the module docstring) with one forward of ``batch``."""
    from llm.model import forward_logits

    finder = _GroupFinder(quant_targets(model))
    hooks = [
        layer.register_forward_post_hook(finder.norm_hook(name))
        for name, layer in model.named_sublayers()
        if "norm" in type(layer).__name__.lower()
    ]
    hooks += [
        get_layer(model, name).register_forward_pre_hook(finder.linear_hook(name)) for name in finder.order
    ]
    try:
        with paddle.no_grad():
            forward_logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return finder.result()


# ----------------------------------------------------------------------------------------------- observers
class Observer:
    """Base: ``update`` gets one batch's transformed input rows ``[T, K]`` (float32, ``T > 0``)."""

    def update(self, x: paddle.Tensor) -> None:
        raise NotImplementedError

    @property
    def seen(self) -> bool:
        return getattr(self, "count", 0) > 0


class MinMaxObserver(Observer):
    """Per-channel min / max: global over steps, or (``ema``) an EMA of the per-batch min / max (beta 0.98,
    bias-corrected, as PaddleSlim's ``EMASampler``)."""

    BETA = 0.98

    def __init__(self, ema: bool) -> None:
        self.ema, self.count = ema, 0
        self.lo = self.hi = None

    def update(self, x: paddle.Tensor) -> None:
        lo, hi = x.min(axis=0).numpy(), x.max(axis=0).numpy()
        self.count += 1
        if self.lo is None:
            self.lo, self.hi = (lo * (1 - self.BETA), hi * (1 - self.BETA)) if self.ema else (lo, hi)
        elif self.ema:
            self.lo = self.BETA * self.lo + (1 - self.BETA) * lo
            self.hi = self.BETA * self.hi + (1 - self.BETA) * hi
        else:
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)

    def center(self) -> np.ndarray:
        """``(max + min) / 2`` per channel (the Shift vector)."""
        corr = 1.0 - self.BETA**self.count if self.ema else 1.0
        return ((self.lo + self.hi) / (2.0 * corr)).astype(np.float32)


class AbsMaxObserver(Observer):
    """Per-channel ``max |x|`` over steps; keeps calibration rows for a search: the last step's
    (``keep="last"``) or every step's (``keep="all"``, PaddleSlim's ``multi_step``), ``max_rows`` in all."""

    def __init__(self, keep: str = "last", max_rows: int = 1024, steps: int = 1) -> None:
        self.keep, self.count, self.absmax = keep, 0, None
        self.rows = max_rows if keep == "last" else max(1, -(-max_rows // max(1, steps)))
        self.samples: list[np.ndarray] = []

    def update(self, x: paddle.Tensor) -> None:
        cur = x.abs().max(axis=0).numpy()
        self.absmax = cur if self.absmax is None else np.maximum(self.absmax, cur)
        self.count += 1
        if self.keep == "none":
            return
        sample = _subsample(x, self.rows)
        self.samples = [sample] if self.keep == "last" else self.samples + [sample]


class AvgAbsMaxObserver(Observer):
    """PaddleSlim's ``AVGObserver``: the mean over batches of the per-tensor ``max |x|``; optionally keeps
    ``sample_rows`` rows of the first batch (for auto-clip)."""

    def __init__(self, sample_rows: int = 0) -> None:
        self.total, self.count, self.sample_rows = 0.0, 0, sample_rows
        self.sample: np.ndarray | None = None

    def update(self, x: paddle.Tensor) -> None:
        self.total += float(x.abs().max())
        self.count += 1
        if self.sample_rows and self.sample is None:
            self.sample = _subsample(x, self.sample_rows)

    def value(self) -> float:
        return self.total / max(1, self.count)


def _subsample(x: paddle.Tensor, rows: int) -> np.ndarray:
    """At most ``rows`` evenly strided rows of ``x`` (float32 numpy)."""
    if x.shape[0] > rows:
        x = x[:: -(-x.shape[0] // rows)][:rows]
    return np.array(x.numpy(), np.float32)


# ---------------------------------------------------------------------------------------------- the runner
def _valid_rows(x: paddle.Tensor, mask: np.ndarray | None, seq_first: bool) -> paddle.Tensor:
    """``[T, K]`` float32 rows of ``x``, padding rows dropped when a 2-D mask lines up with ``x``."""
    k = x.shape[-1]
    x = x.astype("float32")
    if mask is not None and x.ndim == 3 and not mask.all():
        m = mask.T if (seq_first or tuple(x.shape[:2]) != mask.shape) else mask
        if tuple(x.shape[:2]) == m.shape:
            idx = np.nonzero(m.reshape(-1))[0]
            return paddle.gather(x.reshape([-1, k]), paddle.to_tensor(idx, "int64"))
    return x.reshape([-1, k])


def calibrate(
    model: nn.Layer,
    batches: Sequence[dict[str, Any]],
    groups: Sequence[LinearGroup],
    make_observer: Callable[[LinearGroup], Observer],
    *,
    desc: str,
    progress: bool = True,
) -> dict[str, Observer]:
    """Forward every batch (no grad) with a pre-hook on each group's leader feeding the transformed input to
    the group's observer; returns ``{leader name: observer}``."""
    from llm.model import family_of, forward_logits

    seq_first = family_of(model).name in SEQ_FIRST
    observers = {g.leader: make_observer(g) for g in groups}
    state: dict[str, np.ndarray | None] = {"mask": None}

    def make_hook(obs: Observer) -> Callable[..., None]:
        def hook(layer: nn.Layer, args: tuple) -> None:
            x = args[0]
            if isinstance(layer, ShiftSmoothLinear):
                x = layer.transform(x)
            rows = _valid_rows(x, state["mask"], seq_first)
            if rows.shape[0]:
                obs.update(rows)

        return hook

    hooks = [get_layer(model, name).register_forward_pre_hook(make_hook(o)) for name, o in observers.items()]
    try:
        with paddle.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                mask = batch.get("attention_mask")
                mask = None if mask is None else np.asarray(mask)
                state["mask"] = mask.astype(bool) if mask is not None and mask.ndim == 2 else None
                forward_logits(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    return observers
