"""Activation recompute on CPU: paddle 2.6's non-reentrant recompute with the CPU RNG state preserved.

paddlenlp models call ``paddle.distributed.fleet.utils.recompute(..., use_reentrant=False)`` (the
``recompute_use_reentrant`` default), and paddle 2.6.2's non-reentrant path refuses CPU when
``preserve_rng_state`` is on (``Recompute with RNG perserve is not support current device: cpu``) although
``paddle.get_rng_state`` / ``paddle.set_rng_state`` handle the CPU generator (the reentrant path already
uses them on CPU). :func:`enable_cpu_recompute` wraps that path so that on CPU the generator and the
model-parallel RNG tracker states are saved before the forward and restored while the block is
recomputed in the backward: dropout then draws the same mask twice and gradients equal a run without
recompute. GPU/XPU/custom devices keep paddle's own code.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import paddle
from paddlenlp.utils.log import logger

# the package re-exports the ``recompute`` function under the submodule's name, so import the module by path
_recompute_module = importlib.import_module("paddle.distributed.fleet.recompute.recompute")

_PATCH_FLAG = "_llm_cpu_rng_preserving"


def _cpu_rng_preserving(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def recompute_without_reentrant(
        function: Callable[..., Any], preserve_rng_state: bool = True, *args: Any, **kwargs: Any
    ) -> Any:
        if not preserve_rng_state or paddle.get_device() != "cpu":
            return original(function, preserve_rng_state, *args, **kwargs)
        rng_state = paddle.get_rng_state()
        tracker = _recompute_module.get_rng_state_tracker().get_states_tracker()
        calls = 0

        def replay(*inner_args: Any, **inner_kwargs: Any) -> Any:
            """The first call is the forward; later ones are the backward's recompute, with the forward's RNG."""
            nonlocal calls
            calls += 1
            if calls == 1:
                return function(*inner_args, **inner_kwargs)
            with _recompute_module.swith_rng_state_tracker(rng_state, tracker):
                return function(*inner_args, **inner_kwargs)

        return original(replay, False, *args, **kwargs)

    setattr(recompute_without_reentrant, _PATCH_FLAG, True)
    return recompute_without_reentrant


def enable_cpu_recompute() -> None:
    """Let non-reentrant recompute preserve the RNG state on CPU (idempotent, process-wide)."""
    current = _recompute_module._recompute_without_reentrant
    if not getattr(current, _PATCH_FLAG, False):
        _recompute_module._recompute_without_reentrant = _cpu_rng_preserving(current)


def supports_recompute(model: paddle.nn.Layer) -> bool:
    """True if some layer of ``model`` has paddlenlp's ``enable_recompute`` switch (OPT has none).

    Looks at the layers' own attributes: OPT's ``__getattr__`` answers ``None`` for any unknown name.
    """
    return any("enable_recompute" in vars(layer) for layer in model.sublayers(include_self=True))


def prepare_recompute(model: paddle.nn.Layer, training_args: Any) -> None:
    """Make ``--recompute`` work for ``model``: CPU RNG preservation, or off with a warning if unsupported.

    Call after paddlenlp's ``Trainer.__init__`` (which switched ``enable_recompute`` on). A model without
    recompute layers would otherwise take paddlenlp's recompute-only ``model.no_sync()`` path, which
    fails for OPT (``'NoneType' object is not callable``).
    """
    if not getattr(training_args, "recompute", False):
        return
    if not supports_recompute(model):
        logger.warning(
            f"{type(model).__name__} has no activation recompute in paddlenlp; --recompute is ignored"
        )
        training_args.recompute = False
        return
    enable_cpu_recompute()
