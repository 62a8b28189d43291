"""Quantized inference: the step kernels on ``QuantLinear`` models (weight-only int8/int4, A8W8), static export
keeping low-bit weights, reloading, ``load_quantized_for_eval`` and ``predictor.py --quant_type``."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import json
import os
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import paddle
import pytest
from helpers_infer import EOS, VOCAB, spice

try:
    import helpers_cli as hc
except ImportError:  # tests/ imported as a package
    from tests import helpers_cli as hc

from llm.errors import ConfigError
from llm.infer import GenerationConfig, create_engine, export_engine, load_static_engine
from llm.infer.decoders import KernelRunner, build_kernel
from llm.infer.decoders.quant import quant_linear
from llm.infer.quantized import load_quantized_for_eval
from llm.model import FAMILIES, build_model, forward_logits, load_model, tiny_config
from llm.quant.formats import WEIGHT_BITS, dequantize, rtn
from llm.quant.io import save_quantized
from llm.quant.layers import QuantLinear
from llm.quant.model import get_layer, linear_weight, quant_targets, quantize_model

ROOT = Path(__file__).resolve().parents[1]
QUANTS = [("weight_only_int8", -1), ("weight_only_int4", -1), ("weight_only_int4", 16)]
QUANT_IDS = ["int8", "int4", "int4-g16"]
LOW_BIT = (paddle.int8, paddle.uint8)
CFG = GenerationConfig(max_new_tokens=8)


def fresh(family: str) -> paddle.nn.Layer:
    """A tiny spiced float model whose greedy output is not one repeated token (post-norm families: larger std)."""
    with paddle.utils.unique_name.guard():
        model = build_model(tiny_config(family, vocab_size=VOCAB, eos_token_id=EOS), seed=2)
    model.eval()
    return spice(model, std=0.6 if family in ("chatglm", "bloom", "glm") else 0.3, seed=2)


def quantized(family: str, quant_type: str, group_size: int = -1, **kwargs) -> paddle.nn.Layer:
    model = fresh(family)
    quantize_model(model, quant_type, group_size, progress=False, **kwargs)
    return model


def batch() -> list[list[int]]:
    rng = np.random.RandomState(2)
    return [rng.randint(5, EOS, size=n).tolist() for n in (6, 2, 9)]


def low_bit_elements(tensors) -> int:
    return sum(int(np.prod(t.shape)) for t in tensors if t.dtype in LOW_BIT)


def model_low_bit(model: paddle.nn.Layer) -> int:
    return sum(int(np.prod(m.qweight.shape)) for m in model.sublayers() if isinstance(m, QuantLinear))


SHARED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}


def a8w8_quantizer(differ: bool = False):
    """Made-up A8W8 layers: RTN int8 weights of the smoothed weight, a bias absorbing the shift, and an activation
    scale; linears of one input share smooth/shift/act_scale (as the PTQ helper writes them) unless ``differ``
    (then ``k_proj`` gets its own, so q/k/v cannot be fused)."""

    def make(name: str, layer: paddle.nn.Layer, bits: int, group_size: int) -> QuantLinear:
        w, b = linear_weight(layer)
        w = w.numpy()
        parent, _, leaf = name.rpartition(".")
        key = name if differ and leaf == "k_proj" else f"{parent}.{SHARED.get(leaf, leaf)}"
        rng = np.random.RandomState(zlib.crc32(key.encode()))
        smooth = rng.uniform(0.5, 2.0, w.shape[0]).astype(np.float32)
        shift = rng.uniform(-0.1, 0.1, w.shape[0]).astype(np.float32)
        bias = shift @ w + (0.0 if b is None else b.numpy())
        qw = rtn(w * smooth[:, None], bits, group_size)
        return QuantLinear.from_weight(
            qw, bias, act_scale=float(rng.uniform(3, 5) / 127), smooth=smooth, shift=shift
        )

    return make


def static_engine(model: paddle.nn.Layer, path: Path):
    export_engine(model, str(path), max_seq_len=32)
    return load_static_engine(str(path), max_batch_size=4)


def saved_low_bit(path: Path) -> int:
    """int8/uint8 elements among the exported program's persistable tensors."""
    return low_bit_elements(paddle.jit.load(str(path / "model")).state_dict().values())


# ------------------------------------------------------------------------------------------ kernels
def mixed_formats(name: str, layer: paddle.nn.Layer, bits: int, group_size: int) -> QuantLinear:
    """Every weight-only format in one tiny model (one static export covers them all): per decoder layer ``i``,
    attention projections get ``QUANTS[2i % 3]`` and MLP ones ``QUANTS[(2i + 1) % 3]`` (linears of one input
    share a format, so fusion applies)."""
    index = int(re.search(r"\.(?:layers|h)\.(\d+)\.", f".{name}").group(1))
    mlp = any(part in name for part in ("mlp", "block_sparse_moe", "linear1", "linear2"))
    quant_type, group = QUANTS[(2 * index + mlp) % 3]
    w, b = linear_weight(layer)
    qw = rtn(w.numpy(), WEIGHT_BITS[quant_type], group)
    return QuantLinear.from_weight(qw, None if b is None else b.numpy())


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_engine_greedy_equals_generic(family: str, quant: tuple[str, int]) -> None:
    """The fast path on low-bit weights gives the generic path's (QuantLinear.forward) tokens."""
    model = quantized(family, *quant)
    kernel = build_kernel(model)
    assert kernel.quantized and kernel.q_scale != 1.0  # queries scaled at run time, nothing folded
    assert low_bit_elements(kernel.buffers()) == model_low_bit(model)  # every projection stays low-bit
    expected = create_engine(model, backend="generic").generate(batch(), CFG)
    engine = create_engine(model, max_batch_size=4)
    assert isinstance(engine.runner, KernelRunner)
    assert engine.generate(batch(), CFG) == expected


@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_greedy_equals_generic(family: str, tmp_path: Path) -> None:
    """The exported graph (int8, int4 and int4-g16 layers in one model) keeps the low-bit weights as int8/uint8
    persistables and gives the generic path's tokens."""
    model = quantized(family, "weight_only_int8", quantizer=mixed_formats)
    assert {(m.bits, m.group_size) for m in model.sublayers() if isinstance(m, QuantLinear)} == {
        (8, -1),
        (4, -1),
        (4, 16),
    }
    expected = create_engine(model, backend="generic").generate(batch(), CFG)
    assert create_engine(model).generate(batch(), CFG) == expected
    assert static_engine(model, tmp_path).generate(batch(), CFG) == expected
    assert saved_low_bit(tmp_path) == model_low_bit(model)


@pytest.mark.parametrize("differ", [False, True], ids=["shared", "differ"])
@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_a8w8_greedy_equals_generic(family: str, differ: bool, tmp_path: Path) -> None:
    """A8W8 (act_scale, smooth, shift; biases added to bias-free llama): fused when the vectors are shared,
    separate projections when they differ."""
    model = quantized(family, "a8w8", quantizer=a8w8_quantizer(differ), algorithm="ptq")
    kernel = build_kernel(model)
    qkv_weights = [n for n, t in kernel.named_buffers() if n.startswith("l0_qkv") and t.dtype == paddle.int8]
    assert len(qkv_weights) == (3 if differ and family == "llama" else 1)
    expected = create_engine(model, backend="generic").generate(batch(), CFG)
    assert create_engine(model).generate(batch(), CFG) == expected
    assert static_engine(model, tmp_path).generate(batch(), CFG) == expected


@pytest.mark.parametrize("group_size", [-1, 16], ids=["channel", "g16"])
@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_int4_logits_equal_float_with_dequantized_weights(family: str, group_size: int) -> None:
    """The packed int4 kernel path == a float model holding the dequantized weights (<= 1e-4)."""
    model = quantized(family, "weight_only_int4", group_size)
    reference = fresh(family)
    for name in quant_targets(reference):
        get_layer(reference, name).weight.set_value(get_layer(model, name).dequantized_weight())
    ids = np.asarray([[0, 0, 7, 8, 9, 10], [5, 6, 7, 8, 9, 10]], dtype="int64")
    mask = (np.arange(6)[None] >= np.asarray([[2], [0]])).astype("int64")
    runner = create_engine(model).runner
    got = runner.begin(ids, mask, 4)
    runner.end()
    for row in range(2):
        real = ids[row : row + 1, mask[row] == 1]
        ref = forward_logits(reference, {"input_ids": real, "attention_mask": np.ones_like(real)}).numpy()[
            0, -1
        ]
        np.testing.assert_allclose(got[row], ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits,group_size", [(8, -1), (8, 16), (4, -1), (4, 16)])
def test_quant_linear_matches_numpy(bits: int, group_size: int) -> None:
    rng = np.random.RandomState(0)
    w = rng.randn(64, 48).astype(np.float32)  # paddle [K, N]
    qw = rtn(w, bits, group_size)
    x = rng.randn(2, 3, 64).astype(np.float32)
    bias = rng.randn(48).astype(np.float32)
    got = quant_linear(
        paddle.to_tensor(x), paddle.to_tensor(qw.data), paddle.to_tensor(qw.scales), bits, group_size,
        bias=paddle.to_tensor(bias),
    )  # fmt: skip
    np.testing.assert_allclose(got.numpy(), x @ dequantize(qw.values(), qw.scales).T + bias, atol=1e-4)


# ------------------------------------------------------------------------------------------ files
def test_reloaded_quantized_model_gives_identical_logits(tmp_path: Path) -> None:
    model = quantized("qwen", "weight_only_int4", 16)
    save_quantized(model, str(tmp_path / "q"))
    reloaded = load_model(str(tmp_path / "q"))
    ids = {"input_ids": np.asarray([batch()[2]]), "attention_mask": np.ones((1, 9), "int64")}
    np.testing.assert_array_equal(forward_logits(reloaded, ids).numpy(), forward_logits(model, ids).numpy())
    ids_np, mask = np.asarray([batch()[2]]), np.ones((1, 9), "int64")
    first, second = create_engine(model).runner, create_engine(reloaded).runner
    np.testing.assert_array_equal(first.begin(ids_np, mask, 4), second.begin(ids_np, mask, 4))
    assert create_engine(reloaded).generate(batch(), CFG) == create_engine(model).generate(batch(), CFG)


def test_load_quantized_for_eval(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    float_dir, q_dir = tmp_path / "float", tmp_path / "q"
    fresh("llama").save_pretrained(str(float_dir), safe_serialization=True)
    save_quantized(quantized("llama", "weight_only_int8"), str(q_dir))
    loaded = load_quantized_for_eval(str(q_dir), "Weight_Only_Int8", "float32")
    assert model_low_bit(loaded) > 0 and not loaded.training
    assert model_low_bit(load_quantized_for_eval(str(q_dir), None, "float32")) > 0
    with pytest.raises(ConfigError, match="already quantized as weight_only_int8"):
        load_quantized_for_eval(str(q_dir), "weight_only_int4", "float32")
    with pytest.raises(ConfigError, match="a8w8 needs calibration"):
        load_quantized_for_eval(str(float_dir), "a8w8", "float32")
    with caplog.at_level("WARNING", logger="llm.infer.quantized"):
        rtn_model = load_quantized_for_eval(str(float_dir), "weight_only_int4", "float32", group_size=16)
    assert (
        "quantized 14 linear layers to weight_only_int4 at load (round-to-nearest, groups of 16)"
        in caplog.text
    )
    assert {m.bits for m in rtn_model.sublayers() if isinstance(m, QuantLinear)} == {4}
    assert model_low_bit(load_quantized_for_eval(str(float_dir), None, "float32")) == 0


# ------------------------------------------------------------------------------------------ CLI
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("FLAGS_call_stack_level", "0")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _linear_bytes(model: paddle.nn.Layer) -> tuple[int, int]:
    """(float32 bytes, stored low-bit + scale bytes) of the quantized linears of ``model``."""
    layers = [m for m in model.sublayers() if isinstance(m, QuantLinear)]
    float_bytes = sum(4 * m.in_features * m.out_features for m in layers)
    return float_bytes, sum(m.qweight.numel().item() + 4 * m.scales.numel().item() for m in layers)


def test_predictor_and_export_cli(tiny_model_factory, tmp_path: Path) -> None:
    model_dir = tiny_model_factory("llama")
    q_dir = tmp_path / "q-int4"
    q_model = load_model(str(model_dir))
    quantize_model(q_model, "weight_only_int4", 16, progress=False)
    save_quantized(q_model, str(q_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(model_dir / name, q_dir / name)
    data = tmp_path / "dev.json"
    data.write_text('{"src": "spell: 12", "tgt": "twelve"}\n{"src": "hi", "tgt": "yo"}\n', encoding="utf-8")
    out = {k: str(tmp_path / f"{k}.json") for k in ("rtn", "dyn", "static")}
    gen = [
        "--data_file",
        str(data),
        "--max_length",
        "6",
        "--decode_strategy",
        "greedy_search",
        "--device",
        "cpu",
    ]
    pred, export = str(ROOT / "predictor.py"), str(ROOT / "export_model.py")
    m, q, exp, exp_rtn = str(model_dir), str(q_dir), str(tmp_path / "exp"), str(tmp_path / "exp-rtn")
    cases = [
        (pred, ["--model_name_or_path", q, "--quant_type", "weight_only_int8"], 2, "already quantized as weight_only_int4"),
        (pred, ["--model_name_or_path", m, "--quant_type", "A8W8"], 2, "a8w8 needs calibration: run finetune_generation.py with do_ptq, see llama/ptq_argument.json"),
        (pred, ["--model_name_or_path", m, "--block_attn"], 2, "block_attn is not available"),
        (pred, ["--model_name_or_path", m, "--quant_type", "weight_only_int8", *gen, "--output_file", out["rtn"]], 0, ""),
        (pred, ["--model_name_or_path", q, "--quant_type", "WEIGHT_ONLY_INT4", "--inference_model", *gen, "--output_file", out["dyn"]], 0, ""),
        (export, ["--model_name_or_path", q, "--output_path", exp], 0, "weight_only_int4 weights kept low-bit"),
        (pred, ["--model_name_or_path", exp, "--mode", "static", "--inference_model", *gen, "--output_file", out["static"]], 0, ""),
        (pred, ["--model_name_or_path", exp, "--mode", "static", "--quant_type", "weight_only_int8"], 2, "already quantized as weight_only_int4"),
        (export, ["--model_name_or_path", m, "--quant_type", "weight_only_int4", "--quant_group_size", "16", "--output_path", exp_rtn], 0, "kept low-bit"),
    ]  # fmt: skip
    results = hc.run_scripts([(c[0], c[1]) for c in cases], _env(), cwd=str(tmp_path))
    for (script, argv, code, text), got in zip(cases, results):
        label = f"{os.path.basename(script)} {' '.join(argv)}"
        assert got["code"] == code, f"{label}: {got['err'][-1500:]}"
        if code:
            errors = [line for line in got["err"].splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and text in errors[0], f"{label}: {got['err'][-800:]}"
        else:
            assert text in got["out"], f"{label}: {got['out'][-500:]}"

    def outputs(name: str) -> list[str]:
        return [json.loads(line)["output"] for line in Path(out[name]).read_text().splitlines()]

    assert len(outputs("rtn")) == 2
    assert outputs("static") == outputs("dyn")  # static predictor on the low-bit export == dynamic
    # the export keeps the low-bit weights: int8/uint8 persistables, and a file smaller by what they save
    assert saved_low_bit(Path(exp)) == model_low_bit(q_model)
    assert saved_low_bit(Path(exp_rtn)) == model_low_bit(q_model)  # RTN at export = the same int4 g16 format
    float_dir = tmp_path / "exp-float"
    export_engine(load_model(m), str(float_dir), max_seq_len=64)
    float_bytes, quant_bytes = _linear_bytes(q_model)
    saved = os.path.getsize(float_dir / "model.pdiparams") - os.path.getsize(Path(exp) / "model.pdiparams")
    assert abs(saved - (float_bytes - quant_bytes)) < 0.05 * float_bytes
