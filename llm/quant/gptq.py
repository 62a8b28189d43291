"""GPTQ weight-only quantization (Frantar et al. 2022, https://arxiv.org/abs/2210.17323).

:func:`gptq_quantize` quantizes one weight given the Hessian ``H = 2 / n * sum x x^T`` of its inputs: columns
(input features) are rounded one at a time onto the symmetric grid of :mod:`llm.quant.formats` and each
rounding error is spread over the not yet quantized columns through the upper Cholesky factor of ``H^-1``
(lazy batch updates in blocks of ``block_size`` columns). With ``act_order`` columns are processed by
decreasing ``diag(H)``; group scales are then computed up front from the (original order) groups of the
weight ("static groups"), so the stored ``[N, G]`` scales keep belonging to consecutive original columns.
Without ``act_order`` a group's scale is computed when its first column is reached, over the group's current
(error-updated) weights, as in the reference implementation.

:func:`gptq_model` calibrates a model decoder layer by decoder layer: each layer's Hessians are collected on
the outputs of the already quantized earlier layers (the forward stops after the layer), its linears are
quantized and swapped for :class:`~llm.quant.layers.QuantLinear`, then the next layer follows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import paddle
import paddle.nn as nn
from tqdm import tqdm

from llm.errors import ConfigError
from llm.quant.formats import QuantizedWeight, check_group, compute_scales, qmax, rtn
from llm.quant.layers import QuantLinear
from llm.quant.model import (
    QuantizationConfig,
    check_quantizable,
    decoder_layers,
    get_layer,
    linear_weight,
    set_layer,
    set_model_config,
)

DEFAULT_DAMP = 0.1  # PaddleNLP's percdamp
SEQ_FIRST_FAMILIES = ("chatglm", "chatglm_v2")  # hidden states are [seq, batch, hidden]


def _upper_cholesky_inverse(h: np.ndarray) -> np.ndarray:
    """Upper ``U`` with ``H^-1 = U^T U`` (``h`` already damped; damping raised tenfold if not SPD)."""
    extra = 0.0
    for _ in range(6):
        try:
            hd = h + extra * np.eye(len(h)) if extra else h
            hinv = np.linalg.inv(hd)
            return np.linalg.cholesky((hinv + hinv.T) / 2).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))) or 1e-6)
    raise ValueError("gptq: the Hessian is not positive definite even after extra damping")


def _grid(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """Grid values (float64) of one column ``w [N]`` for per-row ``scale [N]``."""
    return np.clip(np.rint(w / scale), -qmax(bits) - 1, qmax(bits))


def gptq_quantize(
    w_kn: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    group_size: int = -1,
    act_order: bool = True,
    damp: float = DEFAULT_DAMP,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ of a paddle ``[K, N]`` weight with input Hessian ``[K, K]`` (see the module docstring);
    ``damp * mean(diag(H))`` is added to the diagonal. Returns the stored (original column order) weight."""
    w_nk = np.array(np.asarray(w_kn, np.float32).T, np.float64)  # [N, K], a copy
    n, k = w_nk.shape
    check_group(k, bits, group_size)
    h = np.array(hessian, np.float64)
    if h.shape != (k, k):
        raise ValueError(f"gptq: hessian shape {h.shape} does not match {k} input features")
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w_nk[:, dead] = 0.0
    grouped = group_size > 0
    static = grouped and act_order
    if grouped and not static:  # filled in as each group is reached
        scales = np.ones((n, k // group_size), np.float32)
    else:  # per channel or static groups: from the (dead-zeroed) weights before any update
        scales = compute_scales(w_nk, bits, group_size)
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w = w_nk[:, perm]
    h = h[np.ix_(perm, perm)]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    u = _upper_cholesky_inverse(h)

    q = np.zeros((n, k), np.float64)  # grid values, processing order
    scale = scales[:, 0].astype(np.float64)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            if static:
                scale = scales[:, col // group_size].astype(np.float64)
            elif grouped and col % group_size == 0:
                current = _current_columns(w, w1, err1, u, i1, i2, i, group_size)
                scales[:, col // group_size] = compute_scales(current, bits, -1)[:, 0]
                scale = scales[:, col // group_size].astype(np.float64)
            col_w = w1[:, i]
            q[:, i1 + i] = _grid(col_w, scale, bits)
            e = (col_w - q[:, i1 + i] * scale) / u1[i, i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    values = np.empty_like(q)
    values[:, perm] = q
    return QuantizedWeight.from_values(values.astype(np.int8), scales, bits, group_size)


def _current_columns(
    w: np.ndarray, w1: np.ndarray, err1: np.ndarray, u: np.ndarray, i1: int, i2: int, i: int, size: int
) -> np.ndarray:
    """The up-to-date weights of columns ``[i1 + i, i1 + i + size)`` (no act_order): inside the block from
    ``w1``, beyond it from ``w`` with the block's pending lazy updates applied."""
    j2 = i1 + i + size
    inside = w1[:, i : min(j2, i2) - i1]
    if j2 <= i2:
        return inside
    beyond = w[:, i2:j2] - err1[:, :i] @ u[i1 : i1 + i, i2:j2]
    return np.concatenate([inside, beyond], axis=1)


# ------------------------------------------------------------------------------------------ calibration
class _StopForward(Exception):
    """Raised after the decoder layer being calibrated, so later layers are not computed."""


class _Hessian:
    """Running ``sum x x^T`` (float64) and token count of one linear's inputs."""

    def __init__(self, k: int) -> None:
        self.sum = np.zeros((k, k), np.float64)
        self.tokens = 0

    def add(self, xtx: np.ndarray, tokens: int) -> None:
        self.sum += xtx
        self.tokens += tokens

    def value(self) -> np.ndarray:
        return 2.0 * self.sum / self.tokens


def _padding_mask(batch: Mapping[str, Any]) -> np.ndarray | None:
    """``bool [b, s]`` of real tokens, when the batch has a 2-D ``attention_mask`` shaped like its ids."""
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    if mask is None or ids is None:
        return None
    mask = mask.numpy() if isinstance(mask, paddle.Tensor) else np.asarray(mask)
    shape = tuple(ids.shape) if isinstance(ids, paddle.Tensor) else np.shape(ids)
    return mask.astype(bool) if mask.ndim == 2 and mask.shape == tuple(shape) else None


def _token_rows(x: np.ndarray, mask: np.ndarray | None, seq_first: bool) -> np.ndarray:
    """``[tokens, K]`` input rows, padded positions dropped (3-D inputs ``[b, s, K]`` / ``[s, b, K]``; the
    gathered 2-D inputs of MoE experts are kept whole)."""
    if mask is not None and x.ndim == 3:
        b, s = mask.shape
        if x.shape[:2] == (s, b) and (seq_first or b != s):
            return x.transpose(1, 0, 2)[mask]
        if x.shape[:2] == (b, s):
            return x[mask]
    return x.reshape(-1, x.shape[-1])


def _is_seq_first(model: nn.Layer) -> bool:
    from llm.model import family_of

    try:
        return family_of(model).name in SEQ_FIRST_FAMILIES
    except ConfigError:
        return False


def _in_features(layer: nn.Layer) -> int:
    return int(layer.in_features if isinstance(layer, QuantLinear) else layer.weight.shape[0])


def collect_hessians(
    model: nn.Layer, decoder_layer: nn.Layer, names: Sequence[str], batches: Sequence[Mapping[str, Any]]
) -> dict[str, _Hessian]:
    """Input Hessian accumulators of the linears ``names`` (inside ``decoder_layer``), from forwards over
    ``batches`` that stop right after ``decoder_layer``."""
    from llm.model import forward_logits

    seq_first = _is_seq_first(model)
    accs = {name: _Hessian(_in_features(get_layer(model, name))) for name in names}
    state: dict[str, Any] = {"mask": None, "x": None}

    def pre_hook(name: str):
        def hook(layer: nn.Layer, inputs: tuple) -> None:
            x = inputs[0]
            if state["x"] is not x:  # q/k/v projections share one input: computed once
                rows = _token_rows(x.astype("float32").numpy().astype(np.float64), state["mask"], seq_first)
                state.update(x=x, xtx=rows.T @ rows, tokens=int(rows.shape[0]))
            accs[name].add(state["xtx"], state["tokens"])

        return hook

    def stop(layer: nn.Layer, inputs: tuple, outputs: Any) -> None:
        raise _StopForward

    handles = [get_layer(model, name).register_forward_pre_hook(pre_hook(name)) for name in names]
    handles.append(decoder_layer.register_forward_post_hook(stop))
    try:
        for batch in batches:
            state.update(mask=_padding_mask(batch), x=None)
            try:
                forward_logits(model, batch)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        state.clear()
    return accs


def gptq_model(
    model: nn.Layer,
    batches: Sequence[Mapping[str, Any]],
    bits: int = 4,
    group_size: int = -1,
    act_order: bool = True,
    damp: float = DEFAULT_DAMP,
    steps: int | None = None,
    progress: bool = True,
    block_size: int = 128,
) -> QuantizationConfig:
    """GPTQ every decoder linear of ``model`` in place, layer by layer, on at most ``steps`` calibration
    ``batches`` (dicts for :func:`llm.model.forward_logits`); returns the config recorded in the model."""
    from paddlenlp.utils.log import logger

    if bits not in (4, 8):
        raise ConfigError(f"gptq bits must be 4 or 8, got {bits}")
    quant_type = "weight_only_int4" if bits == 4 else "weight_only_int8"
    names = check_quantizable(model, quant_type, group_size)
    batches = list(batches)[:steps] if steps else list(batches)
    if not batches:
        raise ConfigError("gptq needs at least one calibration batch")
    layers = [
        (lname, layer, [n for n in names if n.startswith(f"{lname}.")])
        for lname, layer in decoder_layers(model)
    ]
    outside = sorted(set(names) - {n for _, _, targets in layers for n in targets})
    if outside:
        raise ConfigError(f"gptq: linear layers outside any decoder layer: {', '.join(outside[:3])}")
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            for _, layer, targets in tqdm(layers, desc="gptq", disable=not progress, leave=False):
                if not targets:
                    continue
                hessians = collect_hessians(model, layer, targets, batches)
                for name in targets:
                    weight, bias = linear_weight(get_layer(model, name))
                    w = weight.astype("float32").numpy()
                    acc = hessians[name]
                    if acc.tokens == 0:
                        logger.info(
                            f"gptq: {name} received no calibration tokens; quantized with RTN instead"
                        )
                        qw = rtn(w, bits, group_size)
                    else:
                        qw = gptq_quantize(w, acc.value(), bits, group_size, act_order, damp, block_size)
                    b = None if bias is None else bias.astype("float32").numpy()
                    set_layer(model, name, QuantLinear.from_weight(qw, b))
                del hessians
    finally:
        if was_training:
            model.train()
    config = QuantizationConfig(
        quant_type=quant_type, algorithm="gptq", group_size=group_size, bits=bits, modules=names
    )
    set_model_config(model, config)
    return config
