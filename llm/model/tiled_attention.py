"""Attention core of the fused training forward (:mod:`llm.model.fused`): only the score tiles the mask lets through.

A causal mask hides the upper half of every ``S x S`` score matrix, and a zero-padding (packed) row is block
diagonal: each packed example only sees itself. paddlenlp still computes (and keeps for the backward) every score.
Here each row is cut into its segments (a segment starts where ``position_ids`` restarts at 0) and each segment
into query tiles of :data:`QUERY_TILE`: the tile of queries ``[a, e)`` of a segment starting at ``s0`` is
multiplied with the keys ``[s0, e)`` only, its slice of the additive mask applied. The plan is checked against
the mask (every unmasked entry must lie in a tile; otherwise the full product is used), so results equal the
full computation for every real token. A row whose every key is masked (padding) attends uniformly to its tile
instead of to the whole row: such positions carry no label and no other position sees them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import paddle

#: query rows per tile
QUERY_TILE = 256
#: additive-mask entries at or below this are "masked" (paddlenlp uses finfo(float32).min)
MASKED = -1e30

Tile = tuple[int, int, int]  # (q_lo, q_hi, k_lo): queries [q_lo, q_hi) see keys [k_lo, q_hi)

_cache: dict[str, Any] = {"mask": None, "positions": None, "plan": None}


def segments(positions: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of the packed examples of one row: a segment starts at 0 and wherever the positions
    restart at 0 after a non-zero one (a run of zeros, e.g. padding, stays one segment)."""
    starts = [0] + [i for i in range(1, len(positions)) if positions[i] == 0 and positions[i - 1] != 0]
    return list(zip(starts, starts[1:] + [len(positions)]))


def tile_plan(mask: np.ndarray, positions: np.ndarray, tile: int = QUERY_TILE) -> list[list[Tile]] | None:
    """Per row, the tiles covering every unmasked score of ``mask [B or 1, 1, S, S]``; None when some unmasked
    entry falls outside them (a mask that is not causal within the segments)."""
    batch, seq = positions.shape
    plans = []
    for b in range(batch):
        allowed = np.zeros((seq, seq), dtype=bool)
        tiles = []
        for s0, s1 in segments(positions[b]):
            for a in range(s0, s1, tile):
                e = min(s1, a + tile)
                tiles.append((a, e, s0))
                allowed[a:e, s0:e] = True
        if np.any((mask[b if mask.shape[0] > 1 else 0, 0] > MASKED) & ~allowed):
            return None
        plans.append(tiles)
    return plans


def plan_for(mask: paddle.Tensor, position_ids: paddle.Tensor) -> list[list[Tile]] | None:
    """:func:`tile_plan` for this forward's mask, computed once per mask (every layer gets the same tensors)."""
    if _cache["mask"] is not mask or _cache["positions"] is not position_ids:
        plan = tile_plan(mask.numpy(), position_ids.numpy())
        _cache.update(mask=mask, positions=position_ids, plan=plan)
    return _cache["plan"]


def full_attention(
    ops: Any,
    query: paddle.Tensor,
    key: paddle.Tensor,
    value: paddle.Tensor,
    mask: paddle.Tensor,
    scale: float,
) -> paddle.Tensor:
    """``softmax(q k^T * scale + mask) v`` for ``query [B, H, S, D]``, ``key`` / ``value [B, KV, S, D]``; the
    query heads of each KV head in one matmul (no repeated K / V). Returns ``[B, H, S, D]``."""
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads  # query heads h = kv * group + g share KV head kv
    scores = paddle.matmul(query.reshape([batch, kv_heads, group * seq, dim]), key, transpose_y=True)
    probs = ops.llm_softmax_mask_train(scores.reshape([batch, heads, seq, -1]), mask, scale)
    out = paddle.matmul(probs.reshape([batch, kv_heads, group * seq, -1]), value)
    return out.reshape([batch, heads, seq, dim])


def tiled_attention(
    ops: Any,
    query: paddle.Tensor,
    key: paddle.Tensor,
    value: paddle.Tensor,
    mask: paddle.Tensor,
    scale: float,
    plans: list[list[Tile]],
) -> paddle.Tensor:
    """:func:`full_attention` over the tiles of ``plans`` only (see the module docstring)."""
    heads, dim = int(query.shape[1]), int(query.shape[3])
    kv_heads = int(key.shape[1])
    group = heads // kv_heads
    rows = []
    split = (lambda t: [t[0]]) if len(plans) == 1 else paddle.unbind  # batch 1: no unbind / stack
    for b, (q_row, k_row, v_row, tiles) in enumerate(zip(split(query), split(key), split(value), plans)):
        mask_row = mask[b : b + 1] if mask.shape[0] > 1 else mask
        q_tiles = paddle.split(q_row, [e - a for a, e, _ in tiles], axis=1)  # tiles partition the queries
        outs = []
        for q, (a, e, k0) in zip(q_tiles, tiles):
            n, m = e - a, e - k0
            k, v = k_row[:, k0:e], v_row[:, k0:e]
            scores = paddle.matmul(q.reshape([kv_heads, group * n, dim]), k, transpose_y=True)
            probs = ops.llm_softmax_mask_train(
                scores.reshape([1, heads, n, m]), mask_row[:, :, a:e, k0:e], scale
            )
            outs.append(paddle.matmul(probs.reshape([kv_heads, group * n, m]), v).reshape([heads, n, dim]))
        rows.append(paddle.concat(outs, axis=1) if len(outs) > 1 else outs[0])
    return rows[0].unsqueeze(0) if len(rows) == 1 else paddle.stack(rows)
