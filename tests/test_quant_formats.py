"""The low-bit storage format (llm.quant.formats / layers / io): grid, packing, scales, save and load."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import json
import os
from pathlib import Path

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from llm.errors import ConfigError, ModelError
from llm.model import FAMILIES, build_model, forward_logits, load_model, tiny_config
from llm.quant.formats import (
    QuantizedWeight,
    canonical_quant_type,
    compute_scales,
    dequantize,
    pack_int4,
    quantize,
    rtn,
    unpack_int4,
)
from llm.quant.io import WEIGHTS_NAME, load_quantized, save_quantized
from llm.quant.layers import QuantLinear
from llm.quant.model import get_layer, quant_targets, quantize_model

RNG = np.random.default_rng(0)
IDS = {"input_ids": np.array([[1, 5, 7, 9, 11, 3, 20, 2]], np.int64)}


def test_int4_pack_unpack_round_trip_and_nibble_order() -> None:
    q = RNG.integers(-8, 8, size=(5, 12)).astype(np.int8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == (5, 6)
    np.testing.assert_array_equal(unpack_int4(packed), q)
    # byte j of a row: k = 2j in the low nibble, k = 2j + 1 in the high one, each stored as q + 8
    assert packed[0, 0] == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)
    with pytest.raises(ValueError):
        pack_int4(np.array([[9, 0]], np.int8))


@pytest.mark.parametrize("bits, group", [(8, -1), (4, -1), (8, 16), (4, 16)])
def test_round_to_nearest_per_channel_and_group(bits: int, group: int) -> None:
    w_kn = RNG.normal(size=(64, 24)).astype(np.float32)
    w_kn[:, 3] = 0.0  # an all-zero output channel keeps scale 1 and values 0
    qw = rtn(w_kn, bits, group)
    qmax = (1 << (bits - 1)) - 1
    w_nk = w_kn.T
    g = 1 if group == -1 else 64 // group
    assert qw.scales.shape == (24, g) and qw.scales.dtype == np.float32
    absmax = np.abs(w_nk.reshape(24, g, -1)).max(-1)
    np.testing.assert_allclose(qw.scales, np.where(absmax > 0, absmax / qmax, 1.0), rtol=1e-6)
    values = qw.values()
    assert values.min() >= -qmax - 1 and values.max() <= qmax
    assert np.abs(values).max() == qmax  # the absmax of each channel/group lands on the grid's edge
    err = np.abs(qw.dequantize() - w_nk)
    assert (err <= np.repeat(qw.scales, 64 // g, axis=1) / 2 + 1e-6).all()  # round to nearest
    assert qw.data.nbytes == 24 * 64 * bits // 8
    np.testing.assert_array_equal(values, quantize(w_nk, compute_scales(w_nk, bits, group), bits))
    assert (values[3] == 0).all() and (qw.scales[3] == 1).all()


def test_format_refuses_shapes_it_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="groups of 32"):
        rtn(np.ones((48, 4), np.float32), 4, 32)
    with pytest.raises(ConfigError, match="odd"):
        rtn(np.ones((7, 4), np.float32), 4, -1)
    with pytest.raises(ConfigError, match="group_size must be -1"):
        rtn(np.ones((8, 4), np.float32), 8, 0)
    with pytest.raises(ConfigError, match="quant_type 'int3'"):
        canonical_quant_type("int3")
    assert canonical_quant_type("WINT4") == "weight_only_int4"


@pytest.mark.parametrize("bits, group", [(8, -1), (4, -1), (4, 8)])
def test_quant_linear_matches_numpy_on_the_dequantized_weight(bits: int, group: int) -> None:
    w_kn = RNG.normal(size=(32, 20)).astype(np.float32)
    bias = RNG.normal(size=20).astype(np.float32)
    qw = rtn(w_kn, bits, group)
    layer = QuantLinear.from_weight(qw, bias)
    x = RNG.normal(size=(3, 5, 32)).astype(np.float32)
    want = x @ dequantize(unpack_int4(qw.data) if bits == 4 else qw.data, qw.scales).T + bias
    np.testing.assert_allclose(layer(paddle.to_tensor(x)).numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.dequantized_weight().numpy(), qw.dequantize().T, rtol=0, atol=0)
    back = layer.quantized_weight()
    assert isinstance(back, QuantizedWeight) and np.array_equal(back.data, qw.data)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rtn_model_saves_real_low_bit_tensors_and_reloads_identically(family: str, tmp_path: Path) -> None:
    model = build_model(tiny_config(family), seed=1)
    model.eval()
    with paddle.no_grad():
        ref = forward_logits(model, IDS).numpy()
    config = quantize_model(model, "weight_only_int4", -1, progress=False)
    assert config.modules == quant_targets(model) and config.modules
    with paddle.no_grad():
        quantized = forward_logits(model, IDS).numpy()
    assert np.isfinite(quantized).all() and 0 < np.abs(quantized - ref).max() < 0.5 * np.abs(ref).max()
    save_quantized(model, str(tmp_path))
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    first = config.modules[0]
    assert tensors[f"{first}.qweight"].dtype == np.uint8 and f"{first}.weight" not in tensors
    assert tensors[f"{first}.scales"].dtype == np.float32
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["llm_quantization"]["quant_type"] == "weight_only_int4"
    assert saved["quantization_config"]["quant_type"] == "weight_only_int4"
    assert not saved["quantization_config"].get("weight_quantize_algo")  # paddlenlp never re-quantizes it
    reloaded = load_model(str(tmp_path))  # load_model routes quantized directories
    assert all(isinstance(get_layer(reloaded, n), QuantLinear) for n in config.modules)
    assert not any(type(layer).__name__ == "_DeferredLinear" for layer in reloaded.sublayers())
    with paddle.no_grad():
        np.testing.assert_array_equal(forward_logits(reloaded, IDS).numpy(), quantized)


def test_loading_never_allocates_float_weights_for_the_quantized_linears(tmp_path: Path) -> None:
    config = tiny_config(
        "llama", vocab_size=300, hidden_size=256, intermediate_size=1024, num_hidden_layers=2
    )
    model = build_model(config, seed=0)
    quantize_model(model, "weight_only_int8", -1, progress=False)
    save_quantized(model, str(tmp_path))
    created: list[list[int]] = []
    original = paddle.nn.Layer.create_parameter

    def spy(self: paddle.nn.Layer, shape: list[int], *args: object, **kwargs: object) -> paddle.Tensor:
        created.append(list(shape))
        return original(self, shape, *args, **kwargs)

    paddle.nn.Layer.create_parameter = spy  # type: ignore[method-assign]
    try:
        load_quantized(str(tmp_path))
    finally:
        paddle.nn.Layer.create_parameter = original  # type: ignore[method-assign]
    linear_shapes = [[256, 256], [256, 1024], [1024, 256]]
    assert created and not [s for s in created if s in linear_shapes], created


def test_broken_quantized_directories_are_refused(tmp_path: Path) -> None:
    model = build_model(tiny_config("llama"), seed=0)
    quantize_model(model, "weight_only_int8", -1, progress=False)
    save_quantized(model, str(tmp_path))
    weights = str(tmp_path / WEIGHTS_NAME)
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith(".qweight"))
    save_file({k: v for k, v in tensors.items() if k != name}, weights)
    with pytest.raises(ModelError, match=f"missing tensors {name}"):
        load_quantized(str(tmp_path))
    tensors[name] = tensors[name][:, :-2]
    save_file(tensors, weights)
    with pytest.raises(ModelError, match=f"{name} has shape"):
        load_quantized(str(tmp_path))
    os.remove(weights)
    with pytest.raises(ModelError, match="without model.safetensors"):
        load_quantized(str(tmp_path))
