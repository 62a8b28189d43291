"""LoRA / prefix construction details, parameter counts, continuation, NEFTune and the Bloom init fix."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix: must be imported before paddle)

# isort: split
import math
import re

import numpy as np
import paddle
import pytest
from paddlenlp.peft import LoRAModel
from paddlenlp.peft.lora.lora_layers import LoRALinear
from paddlenlp.transformers import BloomForCausalLM

from llm.errors import ConfigError, ModelError
from llm.model import (
    FAMILIES,
    PrefixModel,
    apply_peft,
    build_model,
    count_parameters,
    enable_neftune,
    forward_logits,
    forward_loss,
    prefix_geometry,
    tiny_config,
    unwrap_model,
)
from llm.model.neftune import neftune_magnitude

try:
    from helpers_model import model_args
except ImportError:  # tests/ imported as a package
    from tests.helpers_model import model_args

FAMILY_NAMES = list(FAMILIES)
VOCAB = 256

# spec §3.9 / PaddleNLP 2.8 llm/utils.py get_lora_target_modules
SPEC_LORA = {
    "llama": ["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
    "qwen": ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"],
    "chatglm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "chatglm_v2": ["query", "key", "value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt": ["qkv_proj", "q_proj", "k_proj", "v_proj", "linear1", "linear2", "out_proj"],
    "opt": [
        "project_in",
        "project_out",
        "q_proj",
        "k_proj",
        "v_proj",
        "qkv_proj",
        "out_proj",
        "linear1",
        "linear2",
    ],
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"],
    "glm": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}
# Linear layers that must stay un-adapted: output heads and the MoE router
NOT_ADAPTED = re.compile(r"(^|\.)(lm_head|output_layer|gate)$")


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(seed)
    tokens = rng.randint(5, VOCAB, size=(2, 11)).astype("int64")
    labels = tokens[:, 1:].copy()
    labels[:, :2] = -100
    return {"input_ids": tokens[:, :-1], "labels": labels, "attention_mask": np.ones((2, 10), "int64")}


def train_steps(model: paddle.nn.Layer, steps: int = 3, lr: float = 5e-2) -> None:
    opt = paddle.optimizer.AdamW(
        learning_rate=lr, parameters=[p for p in model.parameters() if not p.stop_gradient]
    )
    model.train()
    for _ in range(steps):
        forward_loss(model, make_batch()).backward()
        opt.step()
        opt.clear_grad()
    model.eval()


def lora_layers(model: paddle.nn.Layer) -> dict[str, LoRALinear]:
    base = unwrap_model(model)
    return {n: layer for n, layer in base.named_sublayers() if isinstance(layer, LoRALinear)}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_targets_match_spec_and_cover_all_linears(family: str) -> None:
    spec = FAMILIES[family]
    assert {f".*{m}.*" for m in SPEC_LORA[family]} <= set(spec.lora_target_modules)
    base = build_model(tiny_config(family))
    linears = {n for n, layer in base.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    expected = {n for n in linears if not NOT_ADAPTED.search(n)}
    model = apply_peft(base, model_args("lora", lora_rank=4))
    assert isinstance(model, LoRAModel)
    wrapped = set(lora_layers(model))
    assert wrapped == expected
    # trainable parameters are exactly the LoRA matrices: r * (in + out) per wrapped layer
    lora_numel = sum(
        4 * (layer.weight.shape[0] + layer.weight.shape[1]) for layer in lora_layers(model).values()
    )
    trainable, total = count_parameters(model)
    assert trainable == lora_numel
    assert all(("lora_A" in n or "lora_B" in n) for n, p in model.named_parameters() if not p.stop_gradient)
    assert total == count_parameters(build_model(tiny_config(family)))[1] + lora_numel


@pytest.mark.parametrize(
    ("rslora", "rank", "alpha", "scaling"), [(False, 16, 32, 2.0), (True, 16, 4, 1.0), (True, 4, 4, 2.0)]
)
def test_lora_alpha_and_rslora_scaling(rslora: bool, rank: int, alpha: int, scaling: float) -> None:
    model = apply_peft(build_model(tiny_config("llama")), model_args("lora", lora_rank=rank, rslora=rslora))
    assert model.lora_config.lora_alpha == alpha and model.lora_config.r == rank
    assert model.lora_config.scaling == pytest.approx(scaling)
    for layer in lora_layers(model).values():
        assert layer.r == rank and layer.scaling == pytest.approx(
            alpha / (math.sqrt(rank) if rslora else rank)
        )
        assert layer.merge_weights is False


def test_lora_plus_scale_sets_b_learning_rate() -> None:
    model = apply_peft(build_model(tiny_config("qwen")), model_args("lora", lora_plus_scale=4.0))
    assert model.lora_config.lora_plus_scale == 4.0
    for layer in lora_layers(model).values():
        assert layer.lora_B.optimize_attr["learning_rate"] == 4.0
        assert layer.lora_A.optimize_attr["learning_rate"] == 1.0


def test_pissa_keeps_the_function_at_start() -> None:
    batch = make_batch()
    base = build_model(tiny_config("llama"), seed=2)
    base.eval()
    ref = forward_logits(base, batch).numpy()
    weights = {
        n: layer.weight.numpy().copy()
        for n, layer in base.named_sublayers()
        if isinstance(layer, paddle.nn.Linear)
    }
    model = apply_peft(base, model_args("lora", pissa=True, lora_rank=4))
    model.eval()
    np.testing.assert_allclose(forward_logits(model, batch).numpy(), ref, atol=1e-4)
    for name, layer in lora_layers(model).items():
        assert layer.scaling == 1.0
        rebuilt = layer.weight.numpy() + layer.lora_A.numpy() @ layer.lora_B.numpy()
        np.testing.assert_allclose(rebuilt, weights[name], atol=1e-5)


def test_lora_path_continues_from_saved_adapter(tmp_path) -> None:
    config = tiny_config("chatglm_v2")
    first = apply_peft(build_model(config, seed=0), model_args("lora"))
    train_steps(first)
    first.save_pretrained(str(tmp_path))
    saved = {k: v.numpy() for k, v in first.get_trainable_state_dict().items()}
    assert any(np.abs(v).sum() > 0 for k, v in saved.items() if "lora_B" in k)

    resumed = apply_peft(
        build_model(config, seed=0), model_args("lora", lora_rank=2, lora_path=str(tmp_path))
    )
    assert resumed.lora_config.r == 8  # the adapter's own config wins
    loaded = {k: v.numpy() for k, v in resumed.get_trainable_state_dict().items()}
    assert loaded.keys() == saved.keys()
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key])
    np.testing.assert_allclose(
        forward_logits(resumed, make_batch(1)).numpy(),
        forward_logits(first, make_batch(1)).numpy(),
        atol=1e-6,
    )
    train_steps(resumed, steps=1)  # still trainable


def test_lora_path_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="LoRA directory not found"):
        apply_peft(build_model(tiny_config("llama")), model_args("lora", lora_path=str(tmp_path / "missing")))
    glm_adapter = apply_peft(build_model(tiny_config("chatglm")), model_args("lora"))
    glm_adapter.save_pretrained(str(tmp_path / "glm"))
    with pytest.raises(ModelError, match="match no layer of this llama model"):
        apply_peft(build_model(tiny_config("llama")), model_args("lora", lora_path=str(tmp_path / "glm")))
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "glm" / "lora_config.json").rename(tmp_path / "cfg_only" / "lora_config.json")
    with pytest.raises(ModelError, match="no LoRA weights"):
        apply_peft(
            build_model(tiny_config("llama")), model_args("lora", lora_path=str(tmp_path / "cfg_only"))
        )


@pytest.mark.parametrize("family", [n for n in FAMILY_NAMES if FAMILIES[n].supports["prefix"]])
def test_prefix_parameter_count_is_gqa_aware(family: str) -> None:
    config = tiny_config(family)
    model = apply_peft(build_model(config), model_args("prefix", num_prefix_tokens=6))
    assert isinstance(model, PrefixModel)
    geo = prefix_geometry(family, config)
    kv_heads = geo["multi_query_group_num"] or geo["num_attention_heads"]
    head_dim = geo["hidden_size"] // geo["num_attention_heads"]
    trainable, total = count_parameters(model)
    assert trainable == 6 * geo["num_hidden_layers"] * 2 * kv_heads * head_dim
    assert total == trainable + count_parameters(unwrap_model(model))[1]
    if family in ("llama", "mixtral", "chatglm_v2"):
        assert kv_heads == 2  # tiny configs use GQA with 2 KV groups


def test_prefix_path_continues_and_errors(tmp_path) -> None:
    config = tiny_config("gpt")
    first = apply_peft(build_model(config), model_args("prefix"))
    train_steps(first)
    first.save_pretrained(str(tmp_path / "p"))
    resumed = apply_peft(build_model(config), model_args("prefix", prefix_path=str(tmp_path / "p")))
    for (name, a), (_, b) in zip(
        first.prefix_encoder.named_parameters(), resumed.prefix_encoder.named_parameters()
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    with pytest.raises(ModelError, match="prefix directory not found"):
        apply_peft(build_model(config), model_args("prefix", prefix_path=str(tmp_path / "none")))


def test_sft_counts_refusals_and_exclusive_modes() -> None:
    model = build_model(tiny_config("opt"))
    assert apply_peft(model, model_args("sft")) is model
    trainable, total = count_parameters(model)
    assert trainable == total > 0
    with pytest.raises(ConfigError, match="lora and prefix_tuning cannot be enabled together"):
        apply_peft(build_model(tiny_config("llama")), model_args("lora", prefix_tuning=True))
    with pytest.raises(ConfigError, match="prefix is not supported for model family 'glm'"):
        apply_peft(build_model(tiny_config("glm")), model_args("prefix"))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_neftune_train_only_and_removable(family: str) -> None:
    model = build_model(tiny_config(family))
    embeddings = unwrap_model(model).get_input_embeddings()
    ids = paddle.to_tensor(make_batch()["input_ids"])
    clean = embeddings(ids).numpy()
    assert clean.shape[:2] == (2, 10)  # [b, s, h]: magnitude uses s * h
    handle = enable_neftune(model, 5.0)
    model.eval()
    np.testing.assert_array_equal(embeddings(ids).numpy(), clean)
    model.train()
    noisy = embeddings(ids).numpy()
    bound = neftune_magnitude(5.0, clean.shape[1], clean.shape[2])
    assert bound == pytest.approx(5.0 / math.sqrt(10 * clean.shape[2]))
    delta = np.abs(noisy - clean)
    assert delta.max() <= bound * (1 + 1e-4) and delta.max() > bound * 0.5
    handle.remove()
    handle.remove()
    np.testing.assert_array_equal(embeddings(ids).numpy(), clean)


def test_neftune_through_lora_changes_training_loss_only() -> None:
    model = apply_peft(build_model(tiny_config("llama")), model_args("lora"))
    batch = make_batch()
    model.eval()
    ref = float(forward_loss(model, batch))
    handle = enable_neftune(model, 50.0)
    assert float(forward_loss(model, batch)) == pytest.approx(ref, abs=1e-7)
    model.train()
    assert float(forward_loss(model, batch)) != pytest.approx(ref, abs=1e-6)
    handle.remove()
    assert float(forward_loss(model, batch)) == pytest.approx(ref, abs=1e-6)
    with pytest.raises(ConfigError, match="neftune_noise_alpha must be > 0"):
        enable_neftune(model, 0.0)


def _zero_linears(model: paddle.nn.Layer) -> list[str]:
    return [
        n
        for n, layer in model.named_sublayers()
        if isinstance(layer, paddle.nn.Linear) and not np.any(layer.weight.numpy())
    ]


def test_bloom_init_fix() -> None:
    config = tiny_config("bloom")
    paddle.seed(0)
    assert _zero_linears(BloomForCausalLM(config))  # the paddlenlp 2.8.1 bug this works around
    model = build_model(config)
    assert _zero_linears(model) == []
    std = float(
        np.concatenate(
            [
                layer.weight.numpy().ravel()
                for layer in model.sublayers()
                if isinstance(layer, paddle.nn.Linear)
            ]
        ).std()
    )
    assert std == pytest.approx(config.initializer_range, rel=0.2)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_no_family_has_zero_linear_weights(family: str) -> None:
    assert _zero_linears(build_model(tiny_config(family))) == []
