"""The toolkit's CPU kernels for decode-shaped matmuls ``y[M, N] = x[M, K] @ W`` (M up to :data:`MAX_ROWS`).

Public API (every function takes float32 ``x [..., K]`` and returns float32 ``[..., N]``; no bias: callers add it):

* :func:`linear_kn` -- ``w [K, N]`` float32 / bfloat16 (paddle ``nn.Linear`` layout);
* :func:`linear_nk` -- ``w [N, K]`` float32 / bfloat16 (e.g. a tied embedding used as LM head);
* :func:`linear_int8` -- ``qweight int8 [N, K]``, ``scales float32 [N, G]``;
* :func:`linear_int4` -- ``qweight uint8 [N, K / 2]`` (low nibble: even k, each ``q + 8``), ``scales [N, G]``.

The low-bit formats are those of :mod:`llm.quant.formats`. When :func:`available` (the custom C++ operators of
``llm/kernels/csrc`` built and loaded, see :mod:`llm.kernels.build`), the functions run them; otherwise they run
equivalent paddle ops (the fallback, also selected by ``LLM_KERNELS=0``). Callers should use the kernels when ``x``
has at most :data:`MAX_ROWS` rows; larger M is better served by paddle's GEMM.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import paddle

#: callers use these kernels when x has at most this many rows (decode); larger M keeps paddle's GEMM
MAX_ROWS = 32

_state: dict[str, Any] = {"ops": None, "tried": False, "forced": None, "reason": None}


def enabled_by_env() -> bool:
    """False when ``LLM_KERNELS`` is ``0`` / ``false`` / ``off`` / ``no``."""
    return os.environ.get("LLM_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def _load() -> Any:
    """Build / load the custom ops once per process; a failure prints one notice line and returns None."""
    if not _state["tried"]:
        _state["tried"] = True
        if not enabled_by_env():
            _state["reason"] = "LLM_KERNELS=0"
            return None
        try:
            from llm.kernels import build

            _state["ops"] = build.load()
        except Exception as exc:  # noqa: BLE001  (contract: never raise, fall back to paddle ops)
            reason = " ".join(str(exc).split()) or type(exc).__name__
            _state["reason"] = reason
            print(
                f"notice: llm kernels unavailable ({reason}); using paddle ops", file=sys.stderr, flush=True
            )
    return _state["ops"]


def _ops() -> Any:
    """The custom ops for this call, or None for the paddle-op fallback (also in static-graph mode, so that
    exported programs stay free of custom operators)."""
    if _state["forced"] is False or not paddle.in_dynamic_mode():
        return None
    return _state["ops"] if _state["tried"] else _load()


def training_ops() -> Any:
    """The custom ops for the fused training forward (:mod:`llm.model.fused`), or None (not built / loaded,
    ``LLM_KERNELS=0``, forced fallback, static-graph mode)."""
    return _ops()


def available() -> bool:
    """Whether the custom ops are built and loaded (builds them on first call; never raises)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return None if _state["ops"] is not None else _state["reason"]


def use_fallback(flag: bool = True) -> None:
    """Force the paddle-op fallback (``True``) or go back to the custom ops when available (``False``)."""
    _state["forced"] = False if flag else None


@contextlib.contextmanager
def fallback() -> Iterator[None]:
    """Run the block with the paddle-op fallback (e.g. to compare, or to trace a portable graph)."""
    before = _state["forced"]
    _state["forced"] = False
    try:
        yield
    finally:
        _state["forced"] = before


def configure(
    isa: str | None = None, threads: int | None = None, spin_us: int | None = None
) -> dict[str, Any]:
    """Set (and return) the custom ops' dispatch state: ``isa`` one of ``auto`` / ``avx512`` / ``avx2`` /
    ``scalar`` (tests force every path), ``threads`` (default: ``OMP_NUM_THREADS``, else the CPUs available),
    ``spin_us`` (how long idle workers spin before sleeping, default 500 or ``LLM_KERNELS_SPIN_US``).
    Returns ``{}`` when the custom ops are unavailable."""
    ops = _load()
    if ops is None:
        return {}
    from llm.kernels.build import ISA_CODES

    if isa is not None and isa not in ISA_CODES:
        raise ValueError(f"isa must be one of {sorted(ISA_CODES)}, got {isa!r}")
    return ops.config(
        ISA_CODES[isa] if isa is not None else -1,
        -1 if threads is None else int(threads),
        -1 if spin_us is None else int(spin_us),
    )


def isa() -> str:
    """The code path the custom ops dispatch to (``avx512`` / ``avx2`` / ``scalar``), or ``paddle``."""
    return configure().get("isa", "paddle")


# ------------------------------------------------------------------------------------------ fallbacks
def _widen(w: paddle.Tensor) -> paddle.Tensor:
    if w.dtype == paddle.float32:
        return w
    if w.dtype == paddle.bfloat16:
        from llm.infer.decoders.half import widen

        return widen(w)
    raise TypeError(f"llm.kernels: weight must be float32 or bfloat16, got {w.dtype}")


def _check_x(x: paddle.Tensor, k: int, what: str) -> None:
    if x.dtype != paddle.float32:
        raise TypeError(f"llm.kernels.{what}: x must be float32, got {x.dtype}")
    if int(x.shape[-1]) != k:
        raise ValueError(f"llm.kernels.{what}: x has K={int(x.shape[-1])} but the weight has K={k}")


def _check_scales(scales: paddle.Tensor, n: int, k: int, what: str) -> None:
    if scales.dtype != paddle.float32 or len(scales.shape) != 2 or int(scales.shape[0]) != n:
        raise ValueError(
            f"llm.kernels.{what}: scales must be float32 [N={n}, G], got {scales.dtype} {list(scales.shape)}"
        )
    g = int(scales.shape[1])
    if g < 1 or k % g:
        raise ValueError(f"llm.kernels.{what}: K={k} is not a multiple of G={g} scale groups")


def _scaled(w_nk: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    n, k = w_nk.shape
    g = scales.shape[1]
    return paddle.reshape(paddle.reshape(w_nk, [n, g, k // g]) * paddle.unsqueeze(scales, -1), [n, k])


def _fb_int8(x: paddle.Tensor, q: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    return paddle.matmul(x, _scaled(q.astype("float32"), scales), transpose_y=True)


def _fb_int4(x: paddle.Tensor, q: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    # even k in the low nibbles, odd k in the high ones: two half-K matmuls, no interleaving copy
    b = q.astype("float32")  # 0 .. 255
    hi = paddle.floor(paddle.scale(b, 0.0625, -8.0))  # high nibble - 8
    lo = b + paddle.scale(hi, -16.0, -136.0)  # low nibble - 8
    if scales.shape[1] > 1:
        lo, hi = _scaled(lo, scales), _scaled(hi, scales)
    out = paddle.matmul(x[..., 0::2], lo, transpose_y=True) + paddle.matmul(
        x[..., 1::2], hi, transpose_y=True
    )
    return out if scales.shape[1] > 1 else out * paddle.reshape(scales, [-1])


# ------------------------------------------------------------------------------------------ public API
def _native(x: paddle.Tensor, *weights: paddle.Tensor) -> Any:
    """The custom ops when they apply to this call: loaded, dynamic mode, no gradient needed (they have no
    backward), CPU tensors."""
    ops = _ops()
    if ops is None:
        return None
    if paddle.is_grad_enabled() and (not x.stop_gradient or any(not w.stop_gradient for w in weights)):
        return None
    if not x.place.is_cpu_place():
        return None
    return ops


def linear_kn(x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
    """``x [..., K] @ w [K, N]``; ``w`` float32 or bfloat16. float32 ``[..., N]``."""
    if len(w.shape) != 2:
        raise ValueError(f"llm.kernels.linear_kn: w must be 2-D [K, N], got shape {list(w.shape)}")
    _check_x(x, int(w.shape[0]), "linear_kn")
    ops = _native(x, w)
    if ops is None:
        return paddle.matmul(x, _widen(w))
    return ops.llm_linear_kn(x, w)


def linear_nk(x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
    """``x [..., K] @ w[N, K]^T``; ``w`` float32 or bfloat16. float32 ``[..., N]``."""
    if len(w.shape) != 2:
        raise ValueError(f"llm.kernels.linear_nk: w must be 2-D [N, K], got shape {list(w.shape)}")
    _check_x(x, int(w.shape[1]), "linear_nk")
    ops = _native(x, w)
    if ops is None:
        return paddle.matmul(x, _widen(w), transpose_y=True)
    return ops.llm_linear_nk(x, w)


def linear_int8(x: paddle.Tensor, qweight: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    """``x [..., K] @ (q * scale)^T`` for ``qweight int8 [N, K]``, ``scales float32 [N, G]``."""
    if qweight.dtype != paddle.int8 or len(qweight.shape) != 2:
        raise TypeError(
            f"llm.kernels.linear_int8: qweight must be int8 [N, K], got {qweight.dtype} {list(qweight.shape)}"
        )
    n, k = int(qweight.shape[0]), int(qweight.shape[1])
    _check_x(x, k, "linear_int8")
    _check_scales(scales, n, k, "linear_int8")
    ops = _native(x, scales)
    if ops is None:
        return _fb_int8(x, qweight, scales)
    return ops.llm_linear_int8(x, qweight, scales)


def linear_int4(x: paddle.Tensor, qweight: paddle.Tensor, scales: paddle.Tensor) -> paddle.Tensor:
    """``x [..., K] @ (q * scale)^T`` for packed ``qweight uint8 [N, K / 2]``, ``scales float32 [N, G]``."""
    if qweight.dtype != paddle.uint8 or len(qweight.shape) != 2:
        raise TypeError(
            f"llm.kernels.linear_int4: qweight must be uint8 [N, K / 2] (two int4 values per byte), "
            f"got {qweight.dtype} {list(qweight.shape)}"
        )
    n, k = int(qweight.shape[0]), 2 * int(qweight.shape[1])
    if int(x.shape[-1]) != k:
        raise ValueError(
            f"llm.kernels.linear_int4: x has K={int(x.shape[-1])} but the packed weight holds K={k} "
            "(int4 needs an even K: two values per byte)"
        )
    _check_x(x, k, "linear_int4")
    _check_scales(scales, n, k, "linear_int4")
    if (k // int(scales.shape[1])) % 2:
        raise ValueError(
            f"llm.kernels.linear_int4: the group size K / G = {k // int(scales.shape[1])} is odd: a packed byte "
            "would straddle two scale groups"
        )
    ops = _native(x, scales)
    if ops is None:
        return _fb_int4(x, qweight, scales)
    return ops.llm_linear_int4(x, qweight, scales)


def rms_norm(x: paddle.Tensor, w: paddle.Tensor, eps: float) -> paddle.Tensor:
    """``rsqrt(mean(x^2, -1) + eps) * x * w`` for float32 ``x [..., D]``, ``w [D]`` (one operator)."""
    ops = _native(x, w)
    if ops is None:
        return paddle.rsqrt((x * x).mean(-1, keepdim=True) + eps) * x * w
    return ops.llm_rms_norm(x, w, eps)


def swiglu(x: paddle.Tensor) -> paddle.Tensor:
    """``silu(gate) * up`` for float32 ``x [..., 2I] = [gate | up]`` -> ``[..., I]`` (one operator)."""
    ops = _native(x)
    if ops is None:
        g, u = paddle.chunk(x, 2, axis=-1)
        return paddle.nn.functional.silu(g) * u
    return ops.llm_swiglu(x)


__all__ = [
    "MAX_ROWS",
    "available",
    "configure",
    "fallback",
    "isa",
    "linear_int4",
    "linear_int8",
    "linear_kn",
    "linear_nk",
    "rms_norm",
    "swiglu",
    "unavailable_reason",
    "use_fallback",
]
