"""Generation engine (dynamic): parity with paddlenlp, batching, stop ids, sampling, beam search, prefix."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import numpy as np
import paddle
import pytest
from helpers_infer import (
    EOS,
    FAST,
    VOCAB,
    argmax_reference,
    paddlenlp_generate,
    prefix_model,
    prompts,
    tiny,
)
from paddlenlp.generation.logits_process import TopKProcess, TopPProcess

from llm.errors import ConfigError, ModelError
from llm.infer import GenerationConfig, create_engine
from llm.infer.decoders import GenericRunner, KernelRunner
from llm.infer.sampling import top_k_filter, top_p_filter
from llm.model import (
    FAMILIES,
    build_model,
    forward_logits,
    tiny_config,
)

CASES = [(f, "fast") for f in FAST] + [(f, "generic") for f in FAMILIES]
BROKEN_PADDLENLP_GENERATE = ("chatglm", "glm")  # paddlenlp 2.8.1 generate raises for these on CPU
STEPS = 8


def greedy(steps: int = STEPS, **kwargs) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=steps, **kwargs)


@pytest.mark.parametrize("family,backend", CASES)
def test_greedy_matches_paddlenlp(family: str, backend: str) -> None:
    """Token-for-token equal to paddlenlp's greedy generate (argmax of full forwards where generate is broken)."""
    model = tiny(family)
    engine = create_engine(model, backend=backend)
    expected_kind = KernelRunner if backend == "fast" else GenericRunner
    assert isinstance(engine.runner, expected_kind)
    batch = prompts(2, 6)
    out = engine.generate(batch, greedy())
    if family in BROKEN_PADDLENLP_GENERATE:
        assert out == argmax_reference(model, batch, STEPS)
    else:
        assert out == paddlenlp_generate(model, batch, STEPS)


@pytest.mark.parametrize("family", FAST)
def test_fast_prefill_logits_match_model(family: str) -> None:
    """The fast kernel's last-position logits equal the model's forward on a left-padded batch."""
    model = tiny(family)
    runner = create_engine(model, backend="fast").runner
    ids = np.asarray([[0, 0, 7, 8, 9], [5, 6, 7, 8, 9]], dtype="int64")
    mask = (np.arange(5)[None] >= np.asarray([[2], [0]])).astype("int64")
    got = runner.begin(ids, mask, 4)
    runner.end()
    for row in range(2):
        real = ids[row : row + 1, mask[row] == 1]
        ref = forward_logits(model, {"input_ids": real, "attention_mask": np.ones_like(real)}).numpy()[0, -1]
        np.testing.assert_allclose(got[row], ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family,backend", CASES)
def test_batch_of_mixed_lengths_equals_alone(family: str, backend: str) -> None:
    engine = create_engine(tiny(family), backend=backend, max_batch_size=4)
    rng = np.random.RandomState(3)
    batch = [rng.randint(5, EOS, size=n).tolist() for n in (3, 9, 5, 1)]
    together = engine.generate(batch, greedy(6))
    alone = [engine.generate([p], greedy(6))[0] for p in batch]
    assert together == alone


@pytest.mark.parametrize("family", ["llama", "bloom", "chatglm", "prefix-gpt"])
def test_long_prefill_in_query_blocks(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block-wise causal prefill (forced with tiny blocks) gives the generic path's tokens."""
    import llm.infer.decoders.base as base

    model = prefix_model("gpt") if family == "prefix-gpt" else tiny(family)
    rng = np.random.RandomState(9)
    batch = [rng.randint(5, EOS, size=n).tolist() for n in (11, 7)]
    expected = create_engine(model, backend="generic").generate(batch, greedy(5))
    monkeypatch.setattr(base, "PREFILL_CHUNK", 4)
    assert create_engine(model, backend="fast").generate(batch, greedy(5)) == expected


@pytest.mark.parametrize("family", ["llama", "mixtral", "bloom", "chatglm", "prefix-gpt"])
def test_kv_buffers_grow_during_decode(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The KV buffers grow (forced every 3 columns here) while rows stop and leave the batch: same tokens
    as the generic path, which keeps paddlenlp's own cache."""
    import llm.infer.decoders.runner as runner_module

    model = prefix_model("gpt") if family == "prefix-gpt" else tiny(family)
    rng = np.random.RandomState(5)
    batch = [rng.randint(5, EOS, size=n).tolist() for n in (4, 9, 2)]
    generic = create_engine(model, backend="generic")
    free = generic.generate(batch, greedy(20))
    stop = free[0][7]  # ends (at least) the first row early
    expected = generic.generate(batch, greedy(20, eos_token_ids=(stop,)))
    monkeypatch.setattr(runner_module, "GROW", 3)
    grown = []
    real = KernelRunner._reserve

    def spy(self, columns):
        before = self.capacity
        real(self, columns)
        if before and self.capacity > before:
            grown.append((before, self.capacity, len(self.keys[0])))

    monkeypatch.setattr(KernelRunner, "_reserve", spy)
    assert create_engine(model, backend="fast").generate(batch, greedy(20, eos_token_ids=(stop,))) == expected
    assert len(grown) >= 5 and all(0 < new - old <= 3 for old, new, _ in grown)
    assert min(rows for _, _, rows in grown) < len(batch)  # some growth happened after a row left


@pytest.mark.parametrize("vocab", [1536, 1000])
def test_blocked_head_and_gate_up_equal_plain_matmuls(vocab: int) -> None:
    """The dygraph LM head in 768-column blocks (vocab padded or not) and the blocked gate/up projection
    give the plain matmuls' results, for one row and for several."""
    from llm.infer.decoders.base import (
        StepKernel,
        blocked_linear,
        column_blocks,
        mlp_blocks,
        unblock,
    )

    paddle.seed(0)
    head = paddle.randn([vocab, 32])  # stored [V, hidden] (transposed)
    kernel = StepKernel()
    kernel.register_buffer("lm_head", head)
    kernel.enable_blocked_head("lm_head", True)
    for rows in (1, 3):
        last = paddle.randn([rows, 32])
        got = kernel._logits(last, "lm_head", True)
        assert got.shape == [rows, vocab]
        np.testing.assert_allclose(got.numpy(), (last @ head.T).numpy(), rtol=1e-5, atol=1e-5)
    assert [mlp_blocks(w) for w in (64, 1536, 4864, 11008)] == [1, 2, 4, 8]
    weight, bias = paddle.randn([32, 3072]), paddle.randn([3072])
    x = paddle.randn([2, 5, 32])
    w_blocks, b_blocks = column_blocks(weight, bias, 4)
    out = unblock(blocked_linear(x, w_blocks, b_blocks), x)
    np.testing.assert_allclose(out.numpy(), (x @ weight + bias).numpy(), rtol=1e-5, atol=1e-4)


def test_max_batch_size_splits_and_keeps_order() -> None:
    engine = create_engine(tiny("llama"), max_batch_size=2)
    rng = np.random.RandomState(4)
    batch = [rng.randint(5, EOS, size=n).tolist() for n in (2, 6, 4, 3, 5)]
    assert engine.generate(batch, greedy(4)) == [engine.generate([p], greedy(4))[0] for p in batch]


@pytest.mark.parametrize("backend", ["fast", "generic"])
def test_stop_ids_end_each_row_and_are_excluded(backend: str) -> None:
    engine = create_engine(tiny("llama"), backend=backend)
    batch = prompts(2, 6)
    free = engine.generate(batch, greedy(10))
    stop = free[0][3]
    cut = [row[: row.index(stop)] if stop in row else row for row in free]
    assert engine.generate(batch, greedy(10, eos_token_ids=(stop,))) == cut
    second = free[1][2]
    both = [row[: min(row.index(t) for t in (stop, second) if t in row)] for row in free]
    assert engine.generate(batch, greedy(10, eos_token_ids=(stop, second))) == both
    assert list(engine.stream(batch[0], greedy(10, eos_token_ids=(stop,)))) == cut[0]


@pytest.mark.parametrize("family", ["llama", "gpt", "chatglm"])
def test_stream_yields_the_generated_tokens(family: str) -> None:
    engine = create_engine(tiny(family))
    prompt = prompts(1, 5)[0]
    assert list(engine.stream(prompt, greedy(7))) == engine.generate([prompt], greedy(7))[0]


def test_sampling_is_seeded_and_degenerate_settings_equal_greedy() -> None:
    engine = create_engine(tiny("llama"))
    batch = prompts(2, 5)
    base = greedy(12)
    sample = GenerationConfig(max_new_tokens=12, decode_strategy="sampling", temperature=1.5, seed=7)
    first = engine.generate(batch, sample)
    assert engine.generate(batch, sample) == first
    assert first != engine.generate(batch, GenerationConfig(**{**sample.__dict__, "seed": 8}))
    for extra in ({"top_k": 1}, {"top_p": 1e-6}, {"top_k": 3, "temperature": 1e-4}):
        cfg = GenerationConfig(max_new_tokens=12, decode_strategy="sampling", seed=1, **extra)
        assert engine.generate(batch, cfg) == engine.generate(batch, base)
    generic = create_engine(tiny("llama"), backend="generic")
    assert generic.generate(batch, sample) == first  # same logits + same seed -> same draws
    streamed = list(engine.stream(batch[0], GenerationConfig(**{**sample.__dict__, "seed": 7})))
    assert streamed == first[0]


def test_top_k_top_p_filters_match_paddlenlp() -> None:
    rng = np.random.RandomState(0)
    probs = rng.dirichlet(np.ones(50) * 0.3, size=4).astype("float32")
    for k in (1, 5, 20):
        ref = TopKProcess(paddle.to_tensor(probs), k, 1).numpy()
        np.testing.assert_allclose(top_k_filter(probs, k), ref)
    for p in (0.1, 0.5, 0.9):
        ref = TopPProcess(paddle.to_tensor(probs), p, 1).numpy()
        np.testing.assert_allclose(top_p_filter(probs, p), ref, atol=1e-7)


def test_head_first_filters_equal_whole_row_sorts() -> None:
    """top-k / top-p look at each row's high-probability head first; the cut must be the one a stable
    sort (partition) of the whole row gives: peaked, flat, tied and underflowing rows."""
    from llm.infer.sampling import _top_k_sorted, _top_p_sorted, softmax

    rng = np.random.RandomState(0)
    checked = 0
    for trial in range(120):
        vocab = int(rng.choice([7, 300, 5000]))
        logits = rng.randn(3, vocab) * float(rng.choice([0.01, 1.0, 4.0, 40.0]))
        if trial % 3 == 0:
            logits = np.round(logits)  # ties, also at the cut
        probs = softmax(logits.astype(np.float32))
        for top_p in (0.05, 0.5, 0.7, 0.95, 1 - 1e-12):
            assert np.array_equal(top_p_filter(probs, top_p), _top_p_sorted(probs, top_p))
            checked += 1
        for top_k in (1, 3, 40, 299):
            if top_k < vocab:
                assert np.array_equal(top_k_filter(probs, top_k), _top_k_sorted(probs, top_k))
                checked += 1
    assert checked > 900


def test_top_indices_equal_a_stable_sort() -> None:
    from llm.infer.sampling import top_indices

    rng = np.random.RandomState(1)
    for trial in range(60):
        scores = rng.randn(3, int(rng.choice([5, 40, 3000]))).astype(np.float32)
        if trial % 2:
            scores = np.round(scores * 2) / 2  # many ties, also at the cut
        for count in (1, 4, 9, 7000):
            expected = np.argsort(-scores, axis=-1, kind="stable")[:, :count]
            assert np.array_equal(top_indices(scores, count), expected)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_repetition_penalty_matches_paddlenlp(family: str) -> None:
    model = tiny(family)
    batch = prompts(2, 6)
    out = create_engine(model).generate(batch, greedy(repetition_penalty=1.5))
    assert out == paddlenlp_generate(model, batch, STEPS, repetition_penalty=1.5)


@pytest.mark.parametrize("family,beams", [("llama", 2), ("llama", 3), ("bloom", 3), ("qwen", 2)])
def test_beam_search_matches_paddlenlp(family: str, beams: int) -> None:
    model = tiny(family)
    batch = prompts(2, 6)
    engine = create_engine(model, max_batch_size=2 * beams)
    # a stop id the beams actually produce, to exercise finished hypotheses
    stop = engine.generate(batch, greedy(6))[0][2]
    cfg = GenerationConfig(
        max_new_tokens=6, decode_strategy="beam_search", num_beams=beams, eos_token_ids=(stop,)
    )
    ref = paddlenlp_generate(
        model, batch, 6, decode_strategy="beam_search", num_beams=beams, eos_token_id=stop, pad_token_id=0
    )
    ref = [row[: row.index(stop)] if stop in row else row for row in ref]
    assert engine.generate(batch, cfg) == ref
    single = GenerationConfig(max_new_tokens=6, decode_strategy="beam_search", num_beams=1)
    assert engine.generate(batch, single) == engine.generate(batch, greedy(6))


@pytest.mark.parametrize("family", [f for f, s in FAMILIES.items() if s.supports["prefix"]])
def test_prefix_becomes_the_first_cache_entries(family: str) -> None:
    model = prefix_model(family)
    batch = prompts(2, 5, seed=6)
    ref = argmax_reference(model, batch, 6)
    backends = ["auto", "generic"] if family in FAST else ["generic"]
    for backend in backends:
        engine = create_engine(model, backend=backend)
        assert engine.runner.prefix_len == 4
        assert isinstance(engine.runner, KernelRunner if backend == "auto" else GenericRunner)
        assert engine.generate(batch, greedy(6)) == ref, backend
        mixed = [batch[0][2:], batch[1]]
        assert engine.generate(mixed, greedy(6))[0] == engine.generate([mixed[0]], greedy(6))[0]


def test_unmerged_lora_uses_the_generic_path() -> None:
    from paddlenlp.peft import LoRAConfig, LoRAModel

    with paddle.utils.unique_name.guard():
        base = build_model(tiny_config("llama", vocab_size=VOCAB, eos_token_id=EOS), seed=4)
    lora = LoRAModel(base, LoRAConfig(target_modules=[".*q_proj.*", ".*v_proj.*"], r=4, lora_alpha=8))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            p.set_value(paddle.randn(p.shape) * 0.5)
    lora.eval()
    with pytest.raises(ModelError, match="not merged"):
        create_engine(lora, backend="fast")
    engine = create_engine(lora)
    assert isinstance(engine.runner, GenericRunner)
    batch = prompts(2, 5)
    assert engine.generate(batch, greedy(5)) == argmax_reference(lora, batch, 5)


def test_errors_are_clear() -> None:
    engine = create_engine(tiny("llama"))
    with pytest.raises(ConfigError, match="empty"):
        engine.generate([[]], greedy())
    with pytest.raises(ConfigError, match="max_seq_len"):
        engine.generate([[5] * 250], greedy(10))
    with pytest.raises(ConfigError, match="decode_strategy"):
        engine.generate([[5]], GenerationConfig(decode_strategy="nucleus"))
    with pytest.raises(ConfigError, match="outside"):
        engine.generate([[VOCAB + 3]], greedy())
    with pytest.raises(ConfigError, match="backend"):
        create_engine(tiny("llama"), backend="cuda")
    with pytest.raises(ConfigError, match="the model is float32"):
        create_engine(tiny("llama"), dtype="bfloat16")
    with paddle.utils.unique_name.guard():
        alibi_llama = build_model(tiny_config("llama", vocab_size=VOCAB, alibi=True), seed=0)
    with pytest.raises(ModelError, match="no fast kernel"):
        create_engine(alibi_llama, backend="fast")
    fallback = create_engine(alibi_llama)  # auto falls back to the generic path
    assert isinstance(fallback.runner, GenericRunner)
    assert fallback.generate([[5, 6, 7]], greedy(3)) == argmax_reference(alibi_llama, [[5, 6, 7]], 3)
    assert engine.generate([[5, 6]], greedy(0)) == [[]]
    assert engine.generate([], greedy()) == []
    assert create_engine(tiny("llama"), max_seq_len=32).max_seq_len == 32
