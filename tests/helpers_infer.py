"""Test helpers for the generation engine: tiny random models with non-degenerate greedy output."""

from __future__ import annotations

import functools

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import numpy as np
import paddle

from llm.model import (
    FAMILIES,
    PrefixModel,
    build_model,
    family_of,
    forward_logits,
    make_prefix_config,
    tiny_config,
)

VOCAB = 256
EOS = VOCAB - 1
FAST = tuple(FAMILIES)  # every family has a step kernel


def spice(model: paddle.nn.Layer, std: float = 0.3, seed: int = 0) -> paddle.nn.Layer:
    """Redraw every matrix with a larger std so tiny random models stop repeating one token."""
    paddle.seed(seed)
    with paddle.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if param.ndim >= 2:
                param.set_value((paddle.randn(param.shape) * std).astype(param.dtype))
    return model


@functools.cache
def tiny(family: str, seed: int = 0) -> paddle.nn.Layer:
    """A cached, spiced, eval-mode tiny model of ``family`` (vocab 256, eos 255)."""
    with paddle.utils.unique_name.guard():
        model = build_model(tiny_config(family, vocab_size=VOCAB, eos_token_id=EOS), seed=seed)
    model.eval()
    return spice(model, seed=seed)


def prefix_model(family: str) -> PrefixModel:
    """A tiny spiced ``family`` model with a 4-token prefix whose encoder weights are large enough to matter."""
    with paddle.utils.unique_name.guard():
        base = build_model(tiny_config(family, vocab_size=VOCAB, eos_token_id=EOS), seed=5)
    base.eval()
    spice(base, seed=5)
    config = make_prefix_config(base, num_prefix_tokens=4)
    model = PrefixModel(
        model=base, prefix_config=config, postprocess_past_key_value=family_of(base).prefix_postprocess
    )
    paddle.seed(2)
    with paddle.no_grad():
        for p in model.prefix_encoder.parameters():
            p.set_value(paddle.randn(p.shape) * 0.5)
    model.eval()
    return model


def prompts(batch: int, length: int, seed: int = 1) -> list[list[int]]:
    """Random prompts avoiding the special ids 0-4 and eos."""
    rng = np.random.RandomState(seed)
    return rng.randint(5, EOS, size=(batch, length)).tolist()


def argmax_reference(model: paddle.nn.Layer, batch: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens from full (no-cache) forwards, one token at a time (equal-length prompts)."""
    cur = np.asarray(batch, dtype="int64")
    out = []
    for _ in range(steps):
        logits = forward_logits(model, {"input_ids": cur, "attention_mask": np.ones_like(cur)}).numpy()
        nxt = logits[:, -1].argmax(-1)
        out.append(nxt)
        cur = np.concatenate([cur, nxt[:, None]], axis=1)
    return np.stack(out, axis=1).tolist()


def paddlenlp_generate(
    model: paddle.nn.Layer, batch: list[list[int]], steps: int, **kwargs
) -> list[list[int]]:
    """paddlenlp's own ``generate`` on equal-length prompts (qwen gets explicit position ids: without them
    paddlenlp 2.8.1 rotates every decoded token as position 0)."""
    ids = paddle.to_tensor(np.asarray(batch, dtype="int64"))
    extra = {}
    if type(model).__name__.startswith("QWen"):
        extra["position_ids"] = paddle.arange(ids.shape[1]).expand(ids.shape)
    out = model.generate(
        input_ids=ids,
        attention_mask=paddle.ones(ids.shape, "int64"),
        max_new_tokens=steps,
        decode_strategy=kwargs.pop("decode_strategy", "greedy_search"),
        **extra,
        **kwargs,
    )[0]
    return out.numpy().tolist()
