"""Decode-shaped products of the step kernels through the toolkit's own CPU kernels (:mod:`llm.kernels`).

Every weight product of a step kernel has one entry point (:meth:`StepKernel._matmul` for float weights,
:meth:`StepKernel._logits` for the LM head, :func:`llm.infer.decoders.quant.quant_linear` for low-bit ones);
each asks :func:`small` whether the call is *decode shaped* -- dygraph, the custom ops loaded
(:func:`llm.kernels.available`), at most :data:`llm.kernels.MAX_ROWS` rows of activations -- and then runs
:func:`kn` / :func:`nk` / :func:`int8` / :func:`int4` instead of paddle's matmul (float32 or bfloat16 weights
read as stored: a bfloat16 weight is never widened). Larger M (long prefills) keeps paddle's GEMM, whose
blocking wins once the weights are re-used across many rows.

Layouts (:func:`layout_for_kernels`, decided when a kernel is built): with the custom ops the weights stay in the
plain ``[K, N]`` / ``[N, K]`` layouts they read. The column-blocked gate/up projection and the blocked LM-head
copy (``column_blocks``, ``enable_blocked_head``) only help paddle/MKL at 1-16 rows, so they are not made: gate/up
is one ``[K, 2 * inter]`` weight (large M: one paddle matmul) and the LM head is read in place (any batch: the
kernel over chunks of :data:`MAX_ROWS` rows), which saves the head's second copy. ``LLM_KERNELS=0`` (or
:func:`llm.kernels.use_fallback`) restores the paddle paths and layouts exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paddle
from paddle.base.layer_helper import LayerHelper

from llm import kernels as lk

MAX_ROWS = lk.MAX_ROWS
_FLOAT_WEIGHTS = (paddle.float32, paddle.bfloat16)
_mode = {"paddle_layouts": 0, "graph": 0}  # > 0 inside paddle_layouts() / graph_kernels()


def enabled() -> bool:
    """Whether dygraph calls would run the custom ops now: built and loaded, not forced off (``LLM_KERNELS=0``,
    :func:`llm.kernels.use_fallback` / :func:`llm.kernels.fallback`). Never raises."""
    return lk.available() and (not paddle.in_dynamic_mode() or lk._ops() is not None)


@contextmanager
def paddle_layouts() -> Iterator[None]:
    """Kernels built inside keep the paddle layouts (blocked gate/up and LM head) even with the custom ops."""
    _mode["paddle_layouts"] += 1
    try:
        yield
    finally:
        _mode["paddle_layouts"] -= 1


@contextmanager
def graph_kernels() -> Iterator[None]:
    """Programs traced inside (``paddle.jit.to_static`` of a :attr:`fast_mm` kernel) call the custom ops for every
    weight product, at any number of rows (static export, :mod:`llm.infer.static`)."""
    _mode["graph"] += 1
    try:
        yield
    finally:
        _mode["graph"] -= 1


def layout_for_kernels(weight: paddle.Tensor) -> bool:
    """Whether a step kernel whose weights look like ``weight`` should keep plain layouts for the custom ops."""
    return (
        not _mode["paddle_layouts"] and paddle.in_dynamic_mode() and weight.place.is_cpu_place() and enabled()
    )


def rows(x: paddle.Tensor) -> int:
    """Rows of ``x [..., K]`` (the product of the leading dims; dygraph shapes)."""
    m = 1
    for d in x.shape[:-1]:
        m *= d
    return m


def active() -> bool:
    """Whether custom ops may run: in dygraph when :func:`enabled`; while tracing, inside :func:`graph_kernels`."""
    if not paddle.in_dynamic_mode():
        return _mode["graph"] > 0
    return enabled()


def small(x: paddle.Tensor) -> bool:
    """Whether a product with input ``x`` runs a custom op: :func:`active`, and in dygraph at most
    :data:`MAX_ROWS` rows (decode steps, short prefills; the graph has dynamic shapes and uses them for any M)."""
    if not paddle.in_dynamic_mode():
        return _mode["graph"] > 0
    return enabled() and rows(x) <= MAX_ROWS


def float_weight(w: paddle.Tensor) -> bool:
    """A 2-D float32 / bfloat16 weight the float kernels read (3-D blocks and float16 keep paddle)."""
    return len(w.shape) == 2 and w.dtype in _FLOAT_WEIGHTS


def _f32(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.dtype == paddle.float32 else x.astype("float32")


def _graph_op(
    op: str, inputs: dict[str, paddle.Tensor], attrs: dict[str, Any] | None = None
) -> paddle.Tensor:
    """Append the custom operator ``op`` to the program being traced (float32 output; inputs cast to float32)."""
    inputs["X"] = _f32(inputs["X"])
    helper = LayerHelper(op)
    out = helper.create_variable_for_type_inference("float32")
    helper.append_op(type=op, inputs=inputs, outputs={"Out": out}, attrs=attrs or {})
    return out


# In dygraph the operators are called directly, without the checks of the public llm.kernels wrappers (a few
# microseconds each, ~120 calls per decode step): the step kernels' shapes and dtypes are right by construction,
# and the operators check their inputs again (PD_CHECK).
def _run(op: str, *args: Any) -> paddle.Tensor:
    return getattr(lk._ops(), op)(*args)


def kn(x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
    """``x [..., K] @ w [K, N]`` (float32 / bfloat16 ``w``) -> float32 ``[..., N]``."""
    if not paddle.in_dynamic_mode():
        return _graph_op("llm_linear_kn", {"X": x, "W": w})
    return _run("llm_linear_kn", x, w)


def nk(x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
    """``x [..., K] @ w [N, K]^T`` -> float32 ``[..., N]``."""
    if not paddle.in_dynamic_mode():
        return _graph_op("llm_linear_nk", {"X": x, "W": w})
    return _run("llm_linear_nk", x, w)


def int8(x: paddle.Tensor, qweight: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    """``x @ (q * scales)^T`` for ``int8 [N, K]`` storage."""
    if not paddle.in_dynamic_mode():
        return _graph_op("llm_linear_int8", {"X": x, "Q": qweight, "S": scales})
    return _run("llm_linear_int8", x, qweight, scales)


def int4(x: paddle.Tensor, qweight: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    """``x @ (q * scales)^T`` for packed ``uint8 [N, K / 2]`` storage."""
    if not paddle.in_dynamic_mode():
        return _graph_op("llm_linear_int4", {"X": x, "Q": qweight, "S": scales})
    return _run("llm_linear_int4", x, qweight, scales)


_ONES: dict[int, paddle.Tensor] = {}


@paddle.jit.not_to_static
def rms_norm(x: paddle.Tensor, weight: paddle.Tensor | None, eps: float) -> paddle.Tensor | None:
    """``rsqrt(mean(x^2) + eps) * x * weight`` (weightless: ``weight`` None) as one custom operator when they are
    :func:`active` (any number of rows) and ``x`` / ``weight`` are float32; None otherwise."""
    if not active() or x.dtype != paddle.float32 or (weight is not None and weight.dtype != paddle.float32):
        return None
    if weight is None:
        d = int(x.shape[-1])
        if paddle.in_dynamic_mode():
            weight = _ONES.get(d)
            if weight is None:
                weight = _ONES[d] = paddle.ones([d], dtype="float32")
        else:
            weight = paddle.ones([d], dtype="float32")
    if not paddle.in_dynamic_mode():
        return _graph_op("llm_rms_norm", {"X": x, "W": weight}, {"eps": float(eps)})
    return _run("llm_rms_norm", x, weight, eps)


@paddle.jit.not_to_static
def rope_qkv(
    qkv: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor, heads: int, q_scale: float
) -> list[paddle.Tensor] | None:
    """Dygraph: ``qkv [b, s, (h + 2 kv) d]`` -> rotated and scaled ``q [b, s, h, d]``, rotated ``k`` and ``v``
    ``[b, kv, s, d]`` in one custom operator (replaces ~10 paddle ops per layer); None when it does not apply."""
    if not paddle.in_dynamic_mode() or not enabled() or qkv.dtype != paddle.float32 or len(qkv.shape) != 3:
        return None
    return _run("llm_rope_qkv", qkv, cos, sin, heads, q_scale)


@paddle.jit.not_to_static
def attend_decode(
    q: paddle.Tensor,
    k: paddle.Tensor,
    v: paddle.Tensor,
    past_k: paddle.Tensor,
    past_v: paddle.Tensor,
    bias: paddle.Tensor,
    col: int,
    span: int,
) -> paddle.Tensor | None:
    """Dygraph decode step (one query row): writes ``k, v [b, kv, 1, d]`` into the cache buffers at ``col`` and
    attends ``q [b, 1, h, d]`` over their first ``span`` columns with ``bias [b, kv, h / kv, span]`` -> ``[b, 1, h d]``
    in one custom operator; None when it does not apply (the caller then runs the paddle ops)."""
    if not paddle.in_dynamic_mode() or not enabled() or len(q.shape) != 4 or q.shape[1] != 1:
        return None
    b, _, h, d = q.shape
    kv = k.shape[1]
    if (
        q.dtype != paddle.float32
        or past_k.dtype != paddle.float32
        or k.shape != [b, kv, 1, d]
        or bias.shape != [b, kv, h // kv, span]
    ):
        return None
    return _run("llm_attend_decode", q, k, v, past_k, past_v, bias, col, span)


@paddle.jit.not_to_static
def swiglu(x: paddle.Tensor) -> paddle.Tensor | None:
    """``silu(gate) * up`` of ``x [..., 2I] = [gate | up]`` as one custom operator when they are :func:`active`
    and ``x`` is float32; None otherwise."""
    if not active() or x.dtype != paddle.float32:
        return None
    if not paddle.in_dynamic_mode():
        return _graph_op("llm_swiglu", {"X": x})
    return _run("llm_swiglu", x)


def _float_weight_of(kernel: Any, name: str) -> paddle.Tensor | None:
    """The kernel's tensor ``name`` if the float kernels read it (dygraph: cached per name), else None."""
    if not paddle.in_dynamic_mode():
        w = getattr(kernel, name)
        return w if float_weight(w) else None
    cache = kernel.__dict__.setdefault("_fast_weights", {})
    if name not in cache:
        w = getattr(kernel, name)
        cache[name] = w if float_weight(w) else None
    return cache[name]


# The dispatchers below are plain Python under ``paddle.jit.to_static`` (not converted): they either append a
# custom op or return None, and the caller's paddle path follows.
@paddle.jit.not_to_static
def product(kernel: Any, x: paddle.Tensor, name: str) -> paddle.Tensor | None:
    """``x @ W`` for the weight ``name`` of a step kernel through :func:`kn` when the call runs a custom op
    (:func:`small`) and the weight is a 2-D float32 / bfloat16 one; None otherwise."""
    if not small(x):
        return None
    w = _float_weight_of(kernel, name)
    if w is None:
        return None
    return nk(x, w) if kernel.is_out_major(name) else kn(x, w)


@paddle.jit.not_to_static
def low_bit_product(
    x: paddle.Tensor, qweight: paddle.Tensor, scales: paddle.Tensor, bits: int, cpu: bool | None = None
) -> paddle.Tensor | None:
    """``x @ (q * scales)^T`` through :func:`int8` / :func:`int4` when the call runs a custom op (:func:`small`)
    on CPU storage (``cpu``: known by the caller; None: looked up); None otherwise."""
    if not small(x):
        return None
    if cpu is False or (cpu is None and paddle.in_dynamic_mode() and not qweight.place.is_cpu_place()):
        return None
    return int4(x, qweight, scales) if bits == 4 else int8(x, qweight, scales)


@paddle.jit.not_to_static
def head(kernel: Any, last: paddle.Tensor, name: str, transposed: bool) -> paddle.Tensor | None:
    """``last [b, hidden]`` through the LM head ``name`` stored ``[V, hidden]`` (``transposed``) or ``[hidden, V]``;
    in dygraph in chunks of at most :data:`MAX_ROWS` rows (the head is read once per chunk; any batch size).
    None when the custom ops are not :func:`active` or the head is not a 2-D float32 / bfloat16 weight."""
    if not active():
        return None
    w = _float_weight_of(kernel, name)
    if w is None:
        return None
    fn = nk if transposed else kn
    if not paddle.in_dynamic_mode() or int(last.shape[0]) <= MAX_ROWS:
        return fn(last, w)
    b = int(last.shape[0])
    return paddle.concat([fn(last[s : s + MAX_ROWS], w) for s in range(0, b, MAX_ROWS)], axis=0)


@paddle.jit.not_to_static
def quant_head_chunks(kernel: Any, last: paddle.Tensor, ref: Any) -> paddle.Tensor | None:
    """Dygraph with the custom ops and more than :data:`MAX_ROWS` rows: ``last`` through the int8 LM head ``ref``
    in chunks of :data:`MAX_ROWS` rows (each a kernel call; the head is read once per chunk); None otherwise."""
    if not paddle.in_dynamic_mode() or not enabled() or int(last.shape[0]) <= MAX_ROWS:
        return None
    b = int(last.shape[0])
    return paddle.concat(
        [kernel._qmatmul(last[s : s + MAX_ROWS], ref) for s in range(0, b, MAX_ROWS)], axis=0
    )


# ------------------------------------------------------------------------------------------ whole decode step
# per layer: ln1, qkv, qkv_b, out, out_b, ln2, gate_up, gate_up_b, down, down_b (registered names or None)
StepSlots = tuple[Any, ...]
_VECTOR_SLOTS = (0, 2, 4, 5, 7, 9)  # norm weights and biases (registered names or None); the rest: weights


def _slot_tensors(kernel: Any, index: int, entry: Any) -> list[paddle.Tensor] | None:
    """The tensors of one ``llm_decode_step`` slot, or None when the operator cannot take it."""
    from llm.infer.decoders.quant import QRef, is_quant_ref

    if entry is None:
        return [] if index in _VECTOR_SLOTS else None
    if index in _VECTOR_SLOTS:
        t = kernel._t(entry)  # widened when the kernel upcasts half-precision storage
        return [t] if t.dtype == paddle.float32 and len(t.shape) == 1 else None
    if is_quant_ref(entry):
        ok = (
            isinstance(entry, QRef)
            and entry.act_scale is None
            and entry.smooth is None
            and entry.shift is None
        )
        return [getattr(kernel, entry.qweight), getattr(kernel, entry.scales)] if ok else None
    w = _float_weight_of(kernel, entry)
    return None if w is None else [w]


def step_plan(kernel: Any, layers: list[StepSlots]) -> tuple[list[paddle.Tensor], list[int]] | None:
    """The flat weight list and slot counts :func:`decode_step` passes for ``layers`` (registered names per slot,
    see :data:`StepSlots`), or None when a layer has something the operator does not run (A8W8 inputs, unfused
    low-bit parts, 3-D blocked weights). Built once per kernel (cached)."""
    cache = kernel.__dict__.get("_step_plan")
    if cache is None:
        tensors: list[paddle.Tensor] = []
        slots: list[int] = []
        for layer in layers:
            for index, entry in enumerate(layer):
                found = _slot_tensors(kernel, index, entry)
                if found is None:
                    kernel.__dict__["_step_plan"] = cache = (None,)
                    return None
                tensors += found
                out_major = index not in _VECTOR_SLOTS and len(found) == 1 and kernel.is_out_major(entry)
                slots.append(3 if out_major else len(found))  # 3: one float [N, K] weight
        cache = kernel.__dict__["_step_plan"] = (tensors, slots)
    return None if cache[0] is None else cache


@paddle.jit.not_to_static
def decode_step(
    kernel: Any,
    layers: list[StepSlots],
    hidden: paddle.Tensor,
    cos: paddle.Tensor,
    sin: paddle.Tensor,
    bias: paddle.Tensor,
    caches: list[paddle.Tensor],
    col: int,
    span: int,
) -> paddle.Tensor | None:
    """Every decoder layer of a rotary pre-norm kernel for one decode step (``hidden [b, 1, hidden]``, caches
    written at ``col`` in place, attention over ``span`` columns with ``bias [b, kv, g, span]``) in one custom
    operator, bitwise equal to the per-op path; None when it does not apply (the caller runs the layers)."""
    if (
        not paddle.in_dynamic_mode()
        or not enabled()
        or len(hidden.shape) != 3
        or hidden.shape[1] != 1
        or hidden.shape[0] > MAX_ROWS
        or hidden.dtype != paddle.float32
        or caches[0].dtype != paddle.float32
    ):
        return None
    plan = step_plan(kernel, layers)
    if plan is None:
        return None
    tensors, slots = plan
    return lk._ops().llm_decode_step(
        hidden, cos, sin, bias, tensors, caches, slots, kernel.heads, col, span, kernel.eps, kernel.q_scale
    )
