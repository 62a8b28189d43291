"""The fused training forward (llm.model.fused, llm/kernels/csrc/train.cc): same losses and gradients as
paddlenlp's own forward on tiny LLaMA models (full SFT, LoRA, zero-padding batches, chunked LM-head loss), and
the original forward wherever the fused one does not apply."""

from __future__ import annotations

import types

import numpy as np
import paddle
import pytest

import llm.model.fused as fused
from llm import kernels
from llm.model import apply_lora, build_model, tiled_attention, tiny_config

pytestmark = pytest.mark.skipif(not kernels.available(), reason="llm kernels could not be built here")

VOCAB = 300


def _model(lora: bool = False, seed: int = 0) -> paddle.nn.Layer:
    model = build_model(tiny_config("llama", vocab_size=VOCAB, rms_norm_eps=1e-5), seed=seed)
    for param in model.parameters():  # norm weights away from 1 so their gradients are exercised
        if len(param.shape) == 1:
            param.set_value(paddle.uniform(param.shape, min=0.5, max=1.5, seed=seed + 1))
    if lora:
        model = apply_lora(model, types.SimpleNamespace(lora_rank=4))
        for name, param in model.named_parameters():  # B = 0 at init would hide the LoRA path
            if "lora_" in name:
                param.set_value(
                    paddle.to_tensor(np.random.RandomState(3).randn(*param.shape).astype("float32") * 0.1)
                )
    model.train()
    return model


def _batch(batch: int = 2, seq: int = 24, prompt: int = 7) -> dict[str, paddle.Tensor]:
    rng = np.random.RandomState(0)
    ids = rng.randint(3, VOCAB, size=(batch, seq)).astype("int64")
    labels = np.roll(ids, -1, axis=1)
    labels[:, -1] = -100
    labels[:, :prompt] = -100  # the prompt is not supervised
    return {"input_ids": paddle.to_tensor(ids), "labels": paddle.to_tensor(labels)}


def _loss_and_grads(model: paddle.nn.Layer, batch: dict) -> tuple[float, dict[str, np.ndarray]]:
    out = model(**batch)
    loss = out[0] if isinstance(out, tuple) else out["loss"]
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _assert_same(reference: tuple, got: tuple) -> None:
    (loss0, grads0), (loss1, grads1) = reference, got
    assert abs(loss0 - loss1) < 1e-5
    assert grads0.keys() == grads1.keys() and grads0
    for name, g0 in grads0.items():
        np.testing.assert_allclose(grads1[name], g0, rtol=1e-4, atol=1e-6, err_msg=name)


def test_training_ops_match_paddle() -> None:
    ops = kernels.training_ops()
    x = paddle.randn([3, 5, 64])
    w = paddle.uniform([64], min=0.5, max=1.5)
    x.stop_gradient = w.stop_gradient = False
    x2, w2 = x.detach(), w.detach()
    x2.stop_gradient = w2.stop_gradient = False
    g = paddle.randn([3, 5, 64])
    (ops.llm_rms_norm_train(x, w, 1e-5) * g).sum().backward()
    ref = paddle.rsqrt(x2.pow(2).mean(-1, keepdim=True) + 1e-5) * x2 * w2
    (ref * g).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), x2.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(w.grad.numpy(), w2.grad.numpy(), rtol=1e-4, atol=1e-5)

    gate, up = paddle.randn([40, 33]) * 4, paddle.randn([40, 33])
    gate.stop_gradient = up.stop_gradient = False
    gate2, up2 = gate.detach(), up.detach()
    gate2.stop_gradient = up2.stop_gradient = False
    dy = paddle.randn([40, 33])
    y = ops.llm_swiglu_train(gate, up)
    ref = paddle.nn.functional.silu(gate2) * up2
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    (y * dy).sum().backward()
    (ref * dy).sum().backward()
    np.testing.assert_allclose(gate.grad.numpy(), gate2.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(up.grad.numpy(), up2.grad.numpy(), rtol=1e-4, atol=1e-5)

    logits = paddle.randn([6, 2500]) * 5
    labels = paddle.to_tensor([3, 0, 2499, -100, 17, 1024], dtype="int64")
    loss, dlogits = ops.llm_softmax_ce(logits, labels, 0.25)
    leaf = logits.detach()
    leaf.stop_gradient = False
    ref = paddle.nn.functional.cross_entropy(leaf, labels.unsqueeze(1), reduction="none").reshape([-1])
    (ref.sum() * 0.25).backward()
    np.testing.assert_allclose(loss.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dlogits.numpy(), leaf.grad.numpy(), rtol=1e-4, atol=1e-7)
    assert float(loss[3]) == 0.0 and not dlogits[3].numpy().any()  # ignored row


def test_full_sft_loss_and_gradients_match_paddlenlp() -> None:
    reference = _loss_and_grads(_model(), _batch())
    model = _model()
    counts = fused.enable_fused_training(model)
    assert counts == {"attention": 2, "head_loss": 1, "rms_norm": 5, "swiglu_mlp": 2}
    _assert_same(reference, _loss_and_grads(model, _batch()))


def test_mixtral_rms_norms_match_paddlenlp() -> None:
    """Other families' RMSNorm layers of the same form are fused too (mixtral: only those)."""

    def model() -> paddle.nn.Layer:
        m = build_model(tiny_config("mixtral", vocab_size=VOCAB), seed=0)
        m.train()
        return m

    reference = _loss_and_grads(model(), _batch())
    fused_model = model()
    assert fused.enable_fused_training(fused_model) == {"rms_norm": 5}
    _assert_same(reference, _loss_and_grads(fused_model, _batch()))


def test_lora_loss_and_gradients_match_paddlenlp() -> None:
    reference = _loss_and_grads(_model(lora=True), _batch())
    model = _model(lora=True)
    counts = fused.enable_fused_training(model)
    assert counts["lora_linear"] == 14 and counts["head_loss"] == 1  # 7 linears x 2 layers
    assert fused.enable_fused_training(model) == {}  # idempotent
    got = _loss_and_grads(model, _batch())
    _assert_same(reference, got)
    assert all("lora_" in name for name in got[1])  # the base stays frozen


@pytest.mark.parametrize("trainable_head", [True, False])
def test_chunked_head_loss_matches(monkeypatch, trainable_head: bool) -> None:
    monkeypatch.setattr(fused, "CHUNK_BYTES", 4 * VOCAB * 5)  # 5 rows per chunk: several chunks
    monkeypatch.setattr(fused, "TRAINABLE_CHUNK_BYTES", 4 * VOCAB * 5)
    models = [_model(), _model()]
    for model in models:
        model.lm_head.weight.stop_gradient = not trainable_head
    reference = _loss_and_grads(models[0], _batch(batch=3, seq=20, prompt=2))
    fused.enable_fused_training(models[1])
    _assert_same(reference, _loss_and_grads(models[1], _batch(batch=3, seq=20, prompt=2)))


def _packed_batch() -> dict[str, paddle.Tensor]:
    """Two rows of 24 tokens: examples of 9 + 15 and 5 + 11 tokens, the second row ending in 8 padding tokens
    (position 0, label -100, each seeing only itself: as the zero-padding collator pads)."""
    batch = _batch(batch=2, seq=24, prompt=3)
    mask = np.zeros((2, 1, 24, 24), dtype=bool)
    positions = np.zeros((2, 24), dtype="int64")
    for row, cuts in ((0, (0, 9, 24)), (1, (0, 5, 16))):
        for lo, hi in zip(cuts, cuts[1:]):
            mask[row, 0, lo:hi, lo:hi] = np.tril(np.ones((hi - lo, hi - lo), dtype=bool))
            positions[row, lo:hi] = np.arange(hi - lo)
    mask[1, 0, range(16, 24), range(16, 24)] = True  # padding attends to itself, as the collator has it
    labels = batch["labels"].numpy()
    labels[1, 16:] = -100
    batch.update(
        attention_mask=paddle.to_tensor(mask),
        position_ids=paddle.to_tensor(positions),
        labels=paddle.to_tensor(labels),
    )
    return batch


def test_scaled_loss_gradients_scale() -> None:
    """A loss multiplied before backward (loss scaling, gradient accumulation) scales the fused gradients."""
    model = _model()
    fused.enable_fused_training(model)
    (model(**_batch())[0] * 3.0).backward()
    scaled = {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}
    reference = _loss_and_grads(_model(), _batch())[1]
    for name, grad in reference.items():
        np.testing.assert_allclose(scaled[name], 3.0 * grad, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("tile", [256, 4])
def test_zero_padding_batch_matches(monkeypatch, tile: int) -> None:
    monkeypatch.setattr(tiled_attention.tile_plan, "__defaults__", (tile,))
    batch = _packed_batch()
    reference = _loss_and_grads(_model(), batch)
    model = _model()
    fused.enable_fused_training(model)
    _assert_same(reference, _loss_and_grads(model, batch))


@pytest.mark.parametrize("rows", [1, 2])
def test_causal_rows_in_query_tiles_match(monkeypatch, rows: int) -> None:
    monkeypatch.setattr(tiled_attention.tile_plan, "__defaults__", (5,))  # 24 tokens: tiles of 5 queries
    batch = _batch(batch=rows)
    reference = _loss_and_grads(_model(), batch)
    model = _model()
    fused.enable_fused_training(model)
    _assert_same(reference, _loss_and_grads(model, batch))
    plan = tiled_attention._cache["plan"]
    assert plan is not None and [t[:2] for t in plan[0]] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 24)]
    assert all(k0 == 0 for _, _, k0 in plan[0])


def test_tile_plan_segments_and_refusal() -> None:
    positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0]])
    assert tiled_attention.segments(positions[0]) == [(0, 3), (3, 5), (5, 8)]  # the padding run stays one
    causal = np.where(np.tril(np.ones((8, 8), dtype=bool)), 0.0, np.finfo("float32").min)[None, None]
    plan = tiled_attention.tile_plan(causal.astype("float32"), positions, tile=2)
    assert plan is None  # a plain causal mask lets keys of earlier segments through: not block diagonal
    plan = tiled_attention.tile_plan(causal.astype("float32"), np.arange(8)[None], tile=3)
    assert plan == [[(0, 3, 0), (3, 6, 0), (6, 8, 0)]]


def test_left_padded_batch_matches() -> None:
    """Left padding (generation-style eval sets pad training batches on the left too): the padding rows'
    queries see no key at all, and softmax gives them the uniform distribution, not NaN."""
    batch = _batch()
    mask = np.ones((2, 24), dtype="int64")
    mask[0, :6] = 0
    labels = batch["labels"].numpy()
    labels[0, :6] = -100
    batch.update(attention_mask=paddle.to_tensor(mask), labels=paddle.to_tensor(labels))
    reference = _loss_and_grads(_model(), batch)
    model = _model()
    fused.enable_fused_training(model)
    got = _loss_and_grads(model, batch)
    assert all(np.isfinite(g).all() for g in got[1].values())
    _assert_same(reference, got)


def test_return_dict_is_honoured() -> None:
    model = _model()
    fused.enable_fused_training(model)
    assert isinstance(model(**_batch(), return_dict=False), tuple)
    assert model(**_batch(), return_dict=True)["loss"].shape == []


def test_original_forward_outside_training() -> None:
    batch = _batch()
    reference, model = _model(), _model()
    fused.enable_fused_training(model)
    for m in (reference, model):
        m.eval()
    with paddle.no_grad():
        ref, got = reference(**batch), model(**batch)
    ref_logits = ref[1] if isinstance(ref, tuple) else ref["logits"]
    got_logits = got[1] if isinstance(got, tuple) else got["logits"]
    np.testing.assert_allclose(got_logits.numpy(), ref_logits.numpy(), rtol=1e-5, atol=1e-5)
    model.train()  # no labels: logits, through the original forward
    out = model(input_ids=batch["input_ids"])
    logits = out[0] if isinstance(out, tuple) else out["logits"]
    assert logits.shape == [2, 24, VOCAB]


def test_no_fusing_without_the_kernels() -> None:
    model = _model()
    with kernels.fallback():
        assert fused.enable_fused_training(model) == {}
    assert not any(getattr(layer, "_llm_fused", False) for layer in model.sublayers(include_self=True))
