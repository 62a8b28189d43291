"""PTQ (Shift, SmoothQuant, PieceWiseSearch, A8W8 / weight-only RTN, auto-clip) on tiny models, CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import paddle
import pytest

import llm  # noqa: F401  (zlib fix before paddle)

try:
    from helpers_infer import spice
except ImportError:  # tests/ imported as a package
    from tests.helpers_infer import spice

from llm.errors import ConfigError
from llm.model import apply_lora, build_model, forward_logits, tiny_config
from llm.quant.calibrate import AbsMaxObserver, calibrate, find_groups, group_weight
from llm.quant.io import load_quantized, save_quantized
from llm.quant.layers import QuantLinear
from llm.quant.model import get_layer, quant_targets, read_quantization_config
from llm.quant.ptq import DEFAULTS, auto_clip_weight, ptq_model
from llm.quant.shift import apply_shift
from llm.quant.smooth import SmoothObjective, apply_smooth, fake_quant_weight, piecewise_search

OUTLIERS = [3, 17, 29]  # hidden channels of the tiny llama (hidden 32) made 50x larger


def batches(n: int = 4, rows: int = 4, length: int = 16, seed: int = 0, pad: bool = False) -> list[dict]:
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        ids = rng.randint(5, 250, (rows, length))
        mask = np.ones_like(ids)
        if pad:
            mask[0, -5:] = 0  # padding rows are left out of the statistics
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def args(**overrides: object) -> SimpleNamespace:
    values = dict(DEFAULTS, ptq_step=4, shift_step=4, smooth_step=4)
    values.update(overrides)
    return SimpleNamespace(**values)


def tiny(family: str, seed: int = 0, std: float = 0.3) -> paddle.nn.Layer:
    with paddle.utils.unique_name.guard():
        model = build_model(tiny_config(family), seed=seed)
    model.eval()
    return spice(model, std=std, seed=seed)


def logits(model: paddle.nn.Layer, data: list[dict]) -> np.ndarray:
    with paddle.no_grad():
        return np.concatenate([forward_logits(model, b).numpy() for b in data])


def outlier_llama(seed: int = 0, factor: float = 50.0) -> paddle.nn.Layer:
    """A tiny llama whose norm outputs have a few 50x channels, compensated in the next weights' rows (the
    float model is unchanged)."""
    model = tiny("llama", seed)
    pairs = {
        "input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
    }
    with paddle.no_grad():
        for i in range(2):
            for norm, linears in pairs.items():
                weight = get_layer(model, f"llama.layers.{i}.{norm}").weight
                value = weight.numpy()
                value[OUTLIERS] *= factor
                weight.set_value(value)
                for name in linears:
                    weight = get_layer(model, f"llama.layers.{i}.{name}").weight
                    value = weight.numpy()
                    value[OUTLIERS, :] /= factor
                    weight.set_value(value)
    return model


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# ------------------------------------------------------------------------------------------- the transforms
@pytest.mark.parametrize("family", ["llama", "bloom", "chatglm_v2"])
@pytest.mark.parametrize("steps", ["shift", "smooth", "shift+smooth"])
def test_shift_and_smooth_leave_the_float_model_unchanged(family: str, steps: str) -> None:
    model = tiny(family, std=0.1)
    cal, held_out = batches(pad=True), batches(2, seed=9)
    want = logits(model, held_out)
    groups = find_groups(model, cal[0])
    every = steps == "shift+smooth"  # the combined run also transforms the linears not fed by a norm
    if "shift" in steps:
        zs = apply_shift(model, cal, groups, sampler="ema", all_linears=every, progress=False)
        assert zs and max(np.abs(z).max() for z in zs.values()) > 1e-3
    if "smooth" in steps:
        factors = apply_smooth(model, cal, groups, all_linears=every, progress=False)
        assert factors and max(np.abs(np.log(s)).max() for s in factors.values()) > 0.1
    got = logits(model, held_out)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_groups_follow_shared_inputs() -> None:
    cal = batches(1)
    llama = [(g.names, g.norm_fed) for g in find_groups(tiny("llama"), cal[0])]
    head = "llama.layers.0."
    assert llama[:4] == [
        ([head + "self_attn.q_proj", head + "self_attn.k_proj", head + "self_attn.v_proj"], True),
        ([head + "self_attn.o_proj"], False),
        ([head + "mlp.gate_proj", head + "mlp.up_proj"], True),
        ([head + "mlp.down_proj"], False),
    ]
    bloom = [
        (g.names[0].rsplit(".", 1)[-1], len(g.names), g.norm_fed) for g in find_groups(tiny("bloom"), cal[0])
    ]
    assert bloom[:4] == [
        ("query_key_value", 1, True),
        ("dense", 1, False),
        ("dense_h_to_4h", 1, True),
        ("dense_4h_to_h", 1, False),
    ]
    experts = [g.names for g in find_groups(tiny("mixtral"), cal[0]) if "experts.0." in g.leader]
    assert [n.rsplit(".", 1)[-1] for n in experts[0]] == ["w1", "w3"]


def test_padding_rows_are_left_out_of_the_statistics() -> None:
    model = tiny("llama")
    groups = find_groups(model, batches(1)[0])
    first, second = batches(1, pad=True), batches(1, pad=True)
    second[0]["input_ids"][0, -5:] = 7  # other ids at the padded positions only
    stats = [
        calibrate(model, b, groups, lambda _g: AbsMaxObserver("none"), desc="t", progress=False)
        for b in (first, second)
    ]
    for group in groups:
        np.testing.assert_array_equal(stats[0][group.leader].absmax, stats[1][group.leader].absmax)


def test_moe_experts_are_quantized_with_their_own_groups() -> None:
    model = tiny("mixtral")
    config, _, act = ptq_model(model, batches(), args(smooth=True, smooth_all_linears=True), progress=False)
    experts = [n for n in config.modules if ".experts." in n]
    assert experts and set(experts) <= set(act)
    w1, w3 = (get_layer(model, "mixtral.layers.0.block_sparse_moe.experts.0." + p) for p in ("w1", "w3"))
    assert np.array_equal(w1.smooth.numpy(), w3.smooth.numpy()) and act[experts[0]] > 0
    assert np.isfinite(logits(model, batches(1, seed=3))).all()


def test_shared_inputs_share_shift_smooth_and_act_scale() -> None:
    model = tiny("llama")
    _, _, act = ptq_model(
        model, batches(), args(shift=True, smooth=True, shift_all_linears=True), progress=False
    )
    names = [f"llama.layers.1.self_attn.{p}_proj" for p in "qkv"]
    layers = [get_layer(model, n) for n in names]
    assert len({act[n] for n in names}) == 1
    for attr in ("smooth", "shift", "act_scale"):
        values = [getattr(layer, attr).numpy() for layer in layers]
        assert all(np.array_equal(values[0], v) for v in values[1:])
    o_proj = get_layer(model, "llama.layers.1.self_attn.o_proj")
    assert o_proj.shift is not None and o_proj.smooth is None  # shift_all_linears only


# ------------------------------------------------------------------------------------------ the outlier model
def test_smoothquant_recovers_the_outlier_model() -> None:
    cal, held_out = batches(8), batches(8, seed=7)
    want = logits(tiny("llama"), held_out)
    assert rel_error(logits(outlier_llama(), held_out), want) < 1e-5
    errors = {}
    for name, options in {
        "naive": {},
        "smooth": {"smooth": True},
        "piecewise": {"smooth": True, "smooth_piecewise_search": True},
    }.items():
        model = outlier_llama()
        ptq_model(model, cal, args(**options, ptq_step=8, smooth_step=8), progress=False)
        errors[name] = rel_error(logits(model, held_out), want)
    print(errors)  # measured: naive 0.89, smooth 0.068, piecewise 0.069 (relative logit error)
    assert errors["naive"] > 0.5
    assert errors["smooth"] < 0.15 * errors["naive"]
    assert errors["piecewise"] < 0.15 * errors["naive"] and errors["piecewise"] < 1.3 * errors["smooth"]


def test_piecewise_search_is_never_worse_than_smoothquant_on_its_objective() -> None:
    model = outlier_llama()
    groups = [g for g in find_groups(model, batches(1)[0]) if g.norm_fed]
    observers = calibrate(
        model, batches(4), groups, lambda _g: AbsMaxObserver("all", 1024, 4), desc="t", progress=False
    )
    gains = []
    for group in groups:
        weight, obs = group_weight(model, group), observers[group.leader]
        s, info = piecewise_search(obs.samples, obs.absmax, weight, k_piece=3, search_piece=True)
        base = np.sqrt(obs.absmax) / np.sqrt(np.abs(weight).max(axis=1))  # plain SmoothQuant, alpha 0.5
        objective = SmoothObjective(obs.samples, weight, 8, True)
        assert objective(s) == pytest.approx(info["loss"]) and info["loss"] <= info["base_loss"]
        assert info["base_loss"] == pytest.approx(objective(base), rel=1e-4)
        gains.append(info["base_loss"] / info["loss"])
    assert max(gains) > 1.02  # the search finds something better than alpha 0.5 somewhere


# --------------------------------------------------------------------------------------------- the A8W8 math
def test_a8w8_layer_is_an_integer_matmul() -> None:
    model = tiny("llama")
    _, weight_scales, act_scales = ptq_model(
        model,
        batches(),
        args(shift=True, smooth=True, shift_all_linears=True, smooth_all_linears=True),
        progress=False,
    )
    rng = np.random.RandomState(3)
    for name in ("llama.layers.0.self_attn.k_proj", "llama.layers.1.mlp.down_proj"):
        layer = get_layer(model, name)
        assert isinstance(layer, QuantLinear) and layer.act_quant
        x = rng.randn(2, 5, layer.in_features).astype(np.float32)
        with paddle.no_grad():
            got = layer(paddle.to_tensor(x)).numpy()
        act_scale = np.float32(act_scales[name])
        assert layer.act_scale.numpy()[0] == act_scale
        xs = (x - layer.shift.numpy()) / layer.smooth.numpy()
        qx = np.clip(np.sign(xs) * np.floor(np.abs(xs) / act_scale + 0.5), -127, 127).astype(np.int64)
        qw = layer.qweight.numpy().astype(np.int64)  # int8 [N, K]
        acc = qx @ qw.T  # integer accumulation
        scales = np.asarray(weight_scales[name], np.float32)
        want = acc.astype(np.float64) * float(act_scale) * scales + layer.bias.numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("quant_type, bits", [("wint8", 8), ("wint4", 4)])
def test_weight_only_ptq(quant_type: str, bits: int) -> None:
    model = tiny("llama")
    config, weight_scales, act_scales = ptq_model(
        model, batches(), args(quant_type=quant_type), progress=False
    )
    assert config.quant_type == f"weight_only_int{bits}" and config.bits == bits and act_scales == {}
    layer = get_layer(model, config.modules[0])
    assert isinstance(layer, QuantLinear) and not layer.act_quant and layer.bits == bits
    assert set(weight_scales) == set(config.modules)


def test_auto_clip_lowers_the_output_error() -> None:
    rng = np.random.RandomState(0)
    w = rng.standard_t(2, size=(64, 16)).astype(np.float32)  # heavy tails: clipping pays off
    x = rng.randn(256, 64).astype(np.float32)
    clipped = auto_clip_weight(w, x, 4)
    ref = x @ w
    err_plain = np.mean((x @ fake_quant_weight(w, 4) - ref) ** 2, axis=0)
    err_clip = np.mean((x @ fake_quant_weight(clipped, 4) - ref) ** 2, axis=0)
    assert (err_clip <= err_plain + 1e-12).all() and err_clip.mean() < err_plain.mean()
    model = tiny("llama")
    config, _, _ = ptq_model(model, batches(), args(quant_type="wint4", auto_clip=True), progress=False)
    assert np.isfinite(logits(model, batches(1, seed=5))).all() and config.algorithm == "ptq"


# ------------------------------------------------------------------------------------------- saving, config
def test_saved_ptq_model_reloads_with_identical_logits(tmp_path: Path) -> None:
    model = tiny("bloom")
    options = args(shift=True, smooth=True, smooth_piecewise_search=True, smooth_sampler="multi_step")
    config, weight_scales, act_scales = ptq_model(model, batches(pad=True), options, progress=False)
    targets = quant_targets(model)
    assert config.modules == targets and set(weight_scales) == set(act_scales) == set(targets)
    assert all(len(weight_scales[n]) == get_layer(model, n).out_features for n in targets)
    saved = read_quantization_config(model.config)
    assert (saved.algorithm, saved.quant_type, saved.smooth, saved.shift) == ("ptq", "a8w8", True, True)
    assert not saved.shift_smooth_all_linears
    assert model.config.quantization_config.quant_type == "a8w8"
    save_quantized(model, str(tmp_path / "q"))
    loaded = load_quantized(str(tmp_path / "q"))
    layer = get_layer(loaded, "bloom.h.0.self_attention.query_key_value")
    assert layer.act_scale is not None and layer.smooth is not None and layer.shift is not None
    data = batches(2, seed=4)
    np.testing.assert_array_equal(logits(loaded, data), logits(model, data))


# ------------------------------------------------------------------------------------------------- refusals
def test_lora_model_is_refused() -> None:
    lora = apply_lora(tiny("llama"), SimpleNamespace(lora_rank=4, lora_path=None))
    with pytest.raises(ConfigError, match=r"merge lora parameters first \(python merge_lora_params.py"):
        ptq_model(lora, batches(1), args(), progress=False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"shift": True, "shift_sampler": "median"}, "shift_sampler must be one of ema, none"),
        ({"smooth": True, "smooth_sampler": "all"}, "smooth_sampler must be one of none, multi_step"),
        ({"quant_type": "int3"}, "quant_type 'int3' is not supported"),
        ({"ptq_step": 0}, "ptq_step must be a positive integer"),
        ({"smooth": True, "smooth_piecewise_search": True, "smooth_k_piece": 0}, "smooth_k_piece must be"),
    ],
)
def test_bad_arguments_are_refused(options: dict, message: str) -> None:
    model = tiny("llama")
    with pytest.raises(ConfigError, match=message):
        ptq_model(model, batches(1), args(**options), progress=False)
    assert not any(isinstance(layer, QuantLinear) for layer in model.sublayers())  # nothing changed
