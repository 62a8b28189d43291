"""``--recompute`` on CPU: gradients equal a run without recompute (dropout included), and models without
recompute layers (OPT) train with it switched off instead of crashing."""

from __future__ import annotations

import importlib
import types

import numpy as np
import paddle
import pytest
from paddle.distributed.fleet.meta_parallel import get_rng_state_tracker

import llm  # noqa: F401  (zlib fix before paddle)
from llm.model import build_model, forward_loss, tiny_config
from llm.model.recompute import enable_cpu_recompute, prepare_recompute, supports_recompute

RECOMPUTE = importlib.import_module("paddle.distributed.fleet.recompute.recompute")

#: Config overrides with dropout on, so a recompute that redraws the mask would change the gradients.
#: GPT only recomputes for ``core_attn``/``full_attn`` in paddlenlp 2.8.1 (``full`` is a no-op there).
DROPOUT = {
    "llama": {},  # no dropout in paddlenlp's llama: recompute without RNG concerns
    "qwen": dict(attn_dropout_prob=0.3, hidden_dropout_prob=0.3),
    "chatglm_v2": dict(hidden_dropout=0.3, attention_dropout=0.3),
    "bloom": dict(hidden_dropout=0.3, attention_dropout=0.3),
    "gpt": dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3, recompute_granularity="core_attn"),
    "mixtral": {},
    "chatglm": {},
    # GLM calls paddle's reentrant recompute, which already restores the CPU RNG state
    "glm": dict(embedding_dropout_prob=0.3, attention_dropout_prob=0.3, output_dropout_prob=0.3),
}


def _gradients(family: str, recompute: bool) -> tuple[float, dict[str, np.ndarray]]:
    with paddle.utils.unique_name.guard():
        model = build_model(tiny_config(family, vocab_size=64, **DROPOUT[family]), seed=0)
    model.train()
    if recompute:  # what paddlenlp's Trainer does for --recompute
        for layer in model.sublayers(include_self=True):
            if "enable_recompute" in vars(layer):
                layer.enable_recompute = True
    ids = paddle.to_tensor(np.random.default_rng(0).integers(5, 60, (2, 12)), dtype="int64")
    paddle.seed(123)  # same dropout stream for both runs ...
    get_rng_state_tracker().reset()  # ... also where a layer draws from the (model-parallel) tracker's states
    loss = forward_loss(model, {"input_ids": ids, "labels": ids, "attention_mask": paddle.ones_like(ids)})
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


@pytest.fixture
def counted_recompute(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the models' recompute calls (``fleet.utils.recompute`` looks ``fleet.recompute.recompute`` up
    per call) after :func:`enable_cpu_recompute`."""
    enable_cpu_recompute()
    calls = {"n": 0}
    package = paddle.distributed.fleet.recompute
    original = package.recompute

    def counting(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(package, "recompute", counting)
    return calls


@pytest.mark.parametrize("family", sorted(DROPOUT))
def test_recompute_gradients_equal_plain_backward(family: str, counted_recompute: dict[str, int]) -> None:
    ref_loss, ref = _gradients(family, recompute=False)
    assert counted_recompute["n"] == 0
    loss, got = _gradients(family, recompute=True)
    assert counted_recompute["n"] > 0, "the model did not recompute anything"
    assert loss == ref_loss and got.keys() == ref.keys() and len(ref) > 5
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-6, err_msg=name)


def test_without_rng_preservation_dropout_gradients_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shows the test above can fail: a recompute that redraws the dropout mask changes the gradients."""
    enable_cpu_recompute()
    original = RECOMPUTE._recompute_without_reentrant.__wrapped__
    _, ref = _gradients("chatglm_v2", recompute=False)
    monkeypatch.setattr(
        RECOMPUTE, "_recompute_without_reentrant", lambda f, _p, *a, **k: original(f, False, *a, **k)
    )
    _, got = _gradients("chatglm_v2", recompute=True)
    assert max(float(np.abs(got[n] - ref[n]).max()) for n in ref) > 1e-3


def test_enable_is_idempotent_and_keeps_paddles_function() -> None:
    enable_cpu_recompute()
    first = RECOMPUTE._recompute_without_reentrant
    enable_cpu_recompute()
    assert RECOMPUTE._recompute_without_reentrant is first
    assert first.__wrapped__.__module__ == "paddle.distributed.fleet.recompute.recompute"


def test_prepare_recompute_switches_it_off_for_models_without_recompute_layers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with paddle.utils.unique_name.guard():
        opt = build_model(tiny_config("opt", vocab_size=64), seed=0)
        llama = build_model(tiny_config("llama", vocab_size=64), seed=0)
    assert not supports_recompute(opt) and hasattr(opt, "enable_recompute")  # OPT answers None for any name
    assert supports_recompute(llama)
    args = types.SimpleNamespace(recompute=True)
    prepare_recompute(opt, args)
    assert args.recompute is False
    args = types.SimpleNamespace(recompute=True)
    prepare_recompute(llama, args)
    assert args.recompute is True and hasattr(RECOMPUTE._recompute_without_reentrant, "__wrapped__")
