"""Zero padding: packed batches give a tiny paddlenlp Llama the same per-example losses as unpacked ones."""

from __future__ import annotations

import numpy as np
import pytest

import llm  # noqa: F401  (zlib fix before paddle)
from llm.data import DataCollator, Example, block_causal_mask, encode_example, pack_features, segment_lengths
from llm.templates import ChatTemplate
from llm.tokenizer import load_tokenizer

try:
    import helpers_tokenizer as h
except ImportError:  # tests/ imported as a package
    from tests import helpers_tokenizer as h


def test_packing_rules():
    feats = [{"input_ids": [n] * n, "labels": [n] * n} for n in (5, 4, 3, 6, 12, 2)]
    packs = pack_features(feats, 10)
    assert [segment_lengths(p["position_ids"]) for p in packs] == [[5, 4], [3, 6], [12], [2]]
    assert packs[0]["input_ids"] == [5] * 5 + [4] * 4
    assert packs[0]["position_ids"] == list(range(5)) + list(range(4))
    assert packs[2]["attention_mask"].shape == (1, 12, 12)  # longer than max_length: kept alone
    mask = packs[0]["attention_mask"][0]
    assert mask.dtype == bool and np.array_equal(mask, block_causal_mask([5, 4]))
    assert mask[:5, :5].sum() == 15 and not mask[5:, :5].any() and not mask[:5, 5:].any()
    assert np.array_equal(mask[5:, 5:], np.tri(4, dtype=bool))
    # best fit: 2 goes to the open pack with the least room that fits it (7 has 3 left, 6 has 4), 3 to the
    # pack of 6, and 1 to the first of the two packs with 1 left; greedy in order: [7] [6, 2] [3, 1, 4]
    feats = [{"input_ids": [n] * n, "labels": [n] * n} for n in (7, 6, 2, 3, 1, 4)]
    packs = pack_features(feats, 10)
    assert [segment_lengths(p["position_ids"]) for p in packs] == [[7, 2, 1], [6, 3], [4]]
    with pytest.raises(ValueError, match="training features"):
        pack_features([{"input_ids": [1, 2], "labels": [3]}], 10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paddle = pytest.importorskip("paddle")
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(h.make_tokenizer_dir(tmp_path_factory.mktemp("tok")))
    paddle.seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    tmpl = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    examples = [
        (Example(["hello world"], ["the quick brown fox"], None, "m", 1), None),
        (Example(["你好"], ["今天天气很好。"], None, "m", 2), None),
        (Example(["hi", "capital of France?"], ["hello!", "Paris."], {"system": "brief"}, "m", 3), tmpl),
        (Example(["what is 1+1?"], ["2"], None, "m", 4), tmpl),
        (Example(["PaddleNLP zero padding"], ["packs examples"], None, "m", 5), None),
    ]
    feats = [encode_example(e, tok, t, src_length=64, max_length=128) for e, t in examples]
    return paddle, model, tok, feats


def _token_ce_sum(paddle, logits, labels) -> float:
    logp = paddle.nn.functional.log_softmax(logits.astype("float32"), axis=-1).numpy()
    labels = np.asarray(labels)
    idx = np.flatnonzero(labels != -100)
    return float(-logp[idx, labels[idx]].sum())


def _unpacked_losses(paddle, model, feats):
    out = []
    with paddle.no_grad():
        for f in feats:
            logits = model(input_ids=paddle.to_tensor([f["input_ids"]]), return_dict=True).logits[0]
            out.append(_token_ce_sum(paddle, logits, f["labels"]))
    return np.array(out)


def _packed_losses(paddle, model, batch, feats_per_row, **drop):
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels" and k not in drop}
    with paddle.no_grad():
        logits = model(**inputs, return_dict=True).logits
    out = []
    for row, row_feats in enumerate(feats_per_row):
        start = 0
        for f in row_feats:
            n = len(f["input_ids"])
            out.append(_token_ce_sum(paddle, logits[row, start : start + n], f["labels"]))
            start += n
    return np.array(out)


def test_packed_loss_matches_unpacked(setup):
    paddle, model, tok, feats = setup
    ref = _unpacked_losses(paddle, model, feats)
    max_length = max(len(f["input_ids"]) for f in feats) + 20
    packs = pack_features(feats, max_length)
    assert 1 < len(packs) < len(feats)  # at least one pack holds several examples, and rows need padding
    rows, order = [], []  # the features of each pack, found by their tokens (best fit may skip ahead)
    for p in packs:
        row, start = [], 0
        for n in segment_lengths(p["position_ids"]):
            index = next(
                i
                for i, f in enumerate(feats)
                if i not in order and f["input_ids"] == p["input_ids"][start : start + n]
            )
            order.append(index)
            row.append(feats[index])
            start += n
        rows.append(row)
    assert sorted(order) == list(range(len(feats)))
    batch = DataCollator(tok, pad_to_multiple_of=8)(packs)
    assert batch["attention_mask"].ndim == 4 and batch["attention_mask"].dtype == bool
    got = _packed_losses(paddle, model, batch, rows)
    np.testing.assert_allclose(got, ref[order], rtol=0, atol=1e-5)
    # the model's own loss on the packed batch (padding rows add nothing) is the token mean of the
    # unpacked per-example CE sums
    with paddle.no_grad():
        loss = model(**{k: paddle.to_tensor(v) for k, v in batch.items()}, return_dict=True).loss
    supervised = sum(int(np.sum(np.asarray(f["labels"]) != -100)) for f in feats)
    assert float(loss) == pytest.approx(ref.sum() / supervised, rel=1e-5)
    # left padding gives the same numbers
    tok.padding_side = "left"
    try:
        left = DataCollator(tok, pad_to_multiple_of=8)(packs)
    finally:
        tok.padding_side = "right"
    pad = [left["input_ids"].shape[1] - sum(len(f["input_ids"]) for f in r) for r in rows]
    logits_inputs = {k: paddle.to_tensor(v) for k, v in left.items() if k != "labels"}
    with paddle.no_grad():
        logits = model(**logits_inputs, return_dict=True).logits
    out = []
    for row, row_feats in enumerate(rows):
        start = pad[row]
        for f in row_feats:
            n = len(f["input_ids"])
            out.append(_token_ce_sum(paddle, logits[row, start : start + n], f["labels"]))
            start += n
    np.testing.assert_allclose(np.array(out), ref[order], rtol=0, atol=1e-5)


def _example_logits(paddle, model, batch, lengths, **drop):
    inputs = {k: paddle.to_tensor(v) for k, v in batch.items() if k != "labels" and k not in drop}
    with paddle.no_grad():
        logits = model(**inputs, return_dict=True).logits[0].numpy()
    starts = np.cumsum([0] + lengths)
    return [logits[a:b] for a, b in zip(starts[:-1], starts[1:])]


def test_llama_uses_position_ids_and_the_mask(setup):
    paddle, model, tok, feats = setup
    pair = feats[:2]
    with paddle.no_grad():
        ref = [
            model(input_ids=paddle.to_tensor([f["input_ids"]]), return_dict=True).logits[0].numpy()
            for f in pair
        ]
    batch = DataCollator(tok)(pack_features(pair, 1000))
    lengths = [len(f["input_ids"]) for f in pair]

    def max_diff(got):
        return max(float(np.abs(g - r).max()) for g, r in zip(got, ref))

    assert max_diff(_example_logits(paddle, model, batch, lengths)) < 1e-5
    # llama's forward uses position_ids when passed: all-zero positions change the logits...
    zeros = dict(batch, position_ids=np.zeros_like(batch["position_ids"]))
    assert max_diff(_example_logits(paddle, model, zeros, lengths)) > 1e-4
    # ...but RoPE is relative, so with the block mask the restart is numerically redundant for llama
    # (it matters for absolute-position models): without position_ids the logits still match
    assert max_diff(_example_logits(paddle, model, batch, lengths, position_ids=True)) < 1e-5
    # without the block mask the second example attends to the first one
    assert max_diff(_example_logits(paddle, model, batch, lengths, attention_mask=True)) > 1e-4


def test_llama_mask_preparation_passes_bool_masks_through(setup):
    paddle, model, _, _ = setup
    from paddlenlp.transformers.llama.modeling import LlamaModel

    mask = block_causal_mask([2, 3])
    m4 = paddle.to_tensor(mask[None, None])
    m3 = paddle.to_tensor(mask[None])
    expected = np.where(mask, 0.0, np.finfo(np.float32).min)[None, None]
    for m in (m4, m3):
        out = LlamaModel._prepare_decoder_attention_mask(m, (1, 5), 0, paddle.float32).numpy()
        np.testing.assert_array_equal(out, expected)
