"""Low-bit PEFT (``llm.lowbit``): the base's decoder linears stored nf4 / fp4 / int8 / int4 while LoRA trains.

The layer dequantizes exactly as the code book / RTN references; a QLoRA forward and a few training steps equal
LoRA on the dequantized float base; the stored base is a fraction of fp32; the merge of such an adapter gives the
QLoRA model's logits.
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix before paddle)

# isort: split
import types
from pathlib import Path

import numpy as np
import paddle
import pytest

from llm.errors import ConfigError
from llm.lowbit import (
    LowBitLinear,
    LowBitLoRALinear,
    LowBitSpec,
    dequantized_like_training,
    load_low_bit_model,
)
from llm.model import apply_lora, build_model, forward_logits, load_model, tiny_config
from llm.quant.codebooks import dequantize_blockwise, quantize_blockwise
from llm.quant.formats import WEIGHT_BITS, rtn
from llm.quant.model import get_layer, quant_targets

SPECS = {
    "nf4": LowBitSpec("nf4"),
    "nf4-dq": LowBitSpec("nf4", double_quant=True, double_blocksize=8),
    "fp4": LowBitSpec("fp4", blocksize=32),
    "fp4-dq": LowBitSpec("fp4", double_quant=True),
    "int8": LowBitSpec("weight_only_int8"),
    "int4": LowBitSpec("weight_only_int4"),
}


def _reference(w: np.ndarray, spec: LowBitSpec) -> np.ndarray:
    """The float weight the storage stands for, from the reference implementations in ``llm.quant``."""
    if spec.algo in ("nf4", "fp4"):
        bq = quantize_blockwise(w, spec.algo, spec.blocksize, spec.double_quant, spec.double_blocksize)
        return dequantize_blockwise(bq)
    return rtn(w, WEIGHT_BITS[spec.algo], -1).dequantize().T


def _layer(spec: LowBitSpec, k: int, n: int, bias: bool = True) -> LowBitLinear:
    return LowBitLinear(
        k,
        n,
        spec.algo,
        has_bias=bias,
        blocksize=spec.blocksize,
        double_quant=spec.double_quant,
        double_blocksize=spec.double_blocksize,
    )


@pytest.mark.parametrize("kind", list(SPECS))
def test_layer_forward_and_backward_use_the_dequantized_weight(kind: str) -> None:
    spec = SPECS[kind]
    rng = np.random.RandomState(0)
    w, b = rng.randn(96, 80).astype("float32") * 0.1, rng.randn(80).astype("float32")
    layer = _layer(spec, 96, 80)
    layer.quantize_from(w, b)
    expected_w = _reference(w, spec)
    np.testing.assert_allclose(layer.dequantized_weight().numpy(), expected_w, rtol=0, atol=1e-6)
    x = paddle.to_tensor(rng.randn(3, 5, 96).astype("float32"), stop_gradient=False)
    y = layer(x)
    ref_x = paddle.to_tensor(x.numpy(), stop_gradient=False)
    ref = paddle.matmul(ref_x, paddle.to_tensor(expected_w)) + paddle.to_tensor(b)
    np.testing.assert_allclose(y.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    (y * y).sum().backward()
    (ref * ref).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), ref_x.grad.numpy(), rtol=1e-5, atol=1e-4)
    assert all(t.stop_gradient for t in layer.parameters())  # the base never trains


def test_layer_refuses_shapes_the_format_cannot_hold() -> None:
    with pytest.raises(ConfigError, match="cannot be cut into blocks of 64"):
        LowBitLinear(10, 6, "nf4")
    with pytest.raises(ConfigError, match="weight_quantize_algo 'int3'"):
        LowBitLinear(64, 64, "int3")


def _float_dir(tmp_path: Path, family: str = "llama", **overrides: object) -> str:
    with paddle.utils.unique_name.guard():
        paddle.seed(5)
        model = build_model(tiny_config(family, **overrides))
    path = str(tmp_path / f"float-{family}")
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("kind", ["nf4", "fp4-dq", "int8", "int4"])
def test_stored_base_is_a_fraction_of_fp32(kind: str, tmp_path: Path) -> None:
    """Resident bytes of the base's decoder linears: <= 0.15x fp32 (4-bit), <= 0.27x (int8); no float copy."""
    path = _float_dir(
        tmp_path, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    fp32 = load_model(path)
    fp32_bytes = sum(4 * int(np.prod(get_layer(fp32, n).weight.shape)) for n in quant_targets(fp32))
    model = load_low_bit_model(path, SPECS[kind])
    layers = [layer for layer in model.sublayers() if isinstance(layer, LowBitLinear)]
    assert len(layers) == len(quant_targets(fp32))
    ratio = sum(layer.nbytes() for layer in layers) / fp32_bytes
    assert ratio <= (0.27 if kind == "int8" else 0.15), ratio
    floats = [
        k
        for k, t in model.state_dict().items()
        if t.dtype == paddle.float32 and len(t.shape) == 2 and min(t.shape) > 1
    ]
    assert not any(".layers." in k for k in floats), floats  # embeddings / head only
    assert model.config.quantization_config.weight_quantize_algo == SPECS[kind].algo


def _lora(model: paddle.nn.Layer) -> paddle.nn.Layer:
    with paddle.utils.unique_name.guard():
        return apply_lora(model, types.SimpleNamespace(lora_rank=4))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "int4"])
def test_qlora_equals_lora_on_the_dequantized_base(kind: str, tmp_path: Path) -> None:
    """Same logits (1e-5) and the same losses over a few AdamW steps (1e-4) as LoRA on the float model whose
    decoder linears hold the dequantized weights."""
    spec = SPECS[kind]
    path = _float_dir(tmp_path)
    qlora = _lora(load_low_bit_model(path, spec))
    assert any(isinstance(layer, LowBitLoRALinear) for layer in qlora.sublayers())
    reference = load_model(path)
    qconfig = spec.quantization_config().to_dict()
    with paddle.no_grad():
        for name in quant_targets(reference):
            layer = get_layer(reference, name)
            layer.weight.set_value(dequantized_like_training(layer.weight, qconfig))
    lora = _lora(reference)
    trainable = {k: v for k, v in qlora.get_trainable_state_dict().items()}
    assert trainable and set(trainable) == set(lora.get_trainable_state_dict())
    lora.model.set_state_dict({k: paddle.to_tensor(v.numpy()) for k, v in trainable.items()})
    ids = paddle.to_tensor(np.random.RandomState(1).randint(3, 250, size=(2, 12)).astype("int64"))
    for m in (qlora, lora):
        m.train()
    np.testing.assert_allclose(
        forward_logits(qlora, {"input_ids": ids}).numpy(),
        forward_logits(lora, {"input_ids": ids}).numpy(),
        rtol=0,
        atol=1e-5,
    )
    losses = []
    for m in (qlora, lora):
        params = [p for p in m.parameters() if not p.stop_gradient]
        opt = paddle.optimizer.AdamW(learning_rate=1e-2, parameters=params)
        run = []
        for _ in range(4):
            out = m(input_ids=ids, labels=ids)
            loss = out[0] if isinstance(out, tuple) else out.loss
            loss.backward()
            opt.step()
            opt.clear_grad()
            run.append(float(loss))
        losses.append(run)
    np.testing.assert_allclose(losses[0], losses[1], rtol=0, atol=1e-4)
    assert losses[0][-1] < losses[0][0]


def _finetune_argv(model_dir: Path, out: Path, algo: str, *extra: str) -> list[str]:
    from conftest import FIXTURE_DATA

    return [
        *("--model_name_or_path", str(model_dir), "--dataset_name_or_path", str(FIXTURE_DATA)),
        *("--output_dir", str(out), "--lora", "--lora_rank", "4", "--weight_quantize_algo", algo),
        *("--do_train", "--max_steps", "12", "--learning_rate", "1e-2", "--logging_steps", "1"),
        *("--per_device_train_batch_size", "4", "--src_length", "16", "--max_length", "32", "--seed", "7"),
        *("--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true"),
        *extra,
    ]


@pytest.mark.parametrize("algo", ["nf4", "weight_only_int4"])
def test_finetune_merge_and_predict_on_a_low_bit_base(algo: str, tiny_model_factory, tmp_path: Path) -> None:
    """finetune_generation with ``weight_quantize_algo``: the loss goes down, the adapter names its base, the
    merged model (float base quantized-dequantized like training + LoRA) gives the QLoRA model's logits."""
    import json

    import llm.train.finetune as finetune
    from llm.infer import GenerationConfig, create_engine
    from llm.merge import merge_lora_checkpoint
    from llm.merge.lora import merge_lora
    from llm.model import load_lora

    model_dir = tiny_model_factory("llama")
    out = tmp_path / "adapter"
    finetune.run(_finetune_argv(model_dir, out, algo))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) >= 10 and np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["weight_quantize_algo"] == algo
    )
    saved = paddle.load(str(out / "lora_model_state.pdparams"))
    assert saved and all("lora_" in k for k in saved)  # only the trainable weights
    spec = LowBitSpec.from_args(types.SimpleNamespace(weight_quantize_algo=algo))
    with paddle.utils.unique_name.guard():
        qlora = load_lora(load_low_bit_model(str(model_dir), spec), str(out))
    qlora.eval()
    ids = paddle.to_tensor(np.random.RandomState(2).randint(3, 150, size=(2, 10)).astype("int64"))
    trained = forward_logits(qlora, {"input_ids": ids}).numpy()
    report = merge_lora_checkpoint(str(out), str(tmp_path / "merged"))
    assert report.merged_layers > 0
    merged = load_model(str(tmp_path / "merged"))
    merged.eval()
    np.testing.assert_allclose(forward_logits(merged, {"input_ids": ids}).numpy(), trained, rtol=0, atol=1e-4)
    in_memory = merge_lora(load_model(str(model_dir)), str(out))  # what predictor.py --lora_path runs
    in_memory.eval()
    np.testing.assert_allclose(
        forward_logits(in_memory, {"input_ids": ids}).numpy(), trained, rtol=0, atol=1e-4
    )
    config = GenerationConfig(max_new_tokens=4, eos_token_ids=())
    tokens = create_engine(in_memory, max_batch_size=2).generate([[5, 6, 7]], config)
    assert tokens == create_engine(merged, max_batch_size=2).generate([[5, 6, 7]], config)
    # predictor --merge_lora false: the adapter unmerged on the low-bit base it names, the model's own forward
    from llm.infer.predictor import build_model

    with paddle.utils.unique_name.guard():
        unmerged = build_model(str(model_dir), "float32", lora_path=str(out), merge=False)
    assert sum(isinstance(layer, LowBitLinear) for layer in unmerged.sublayers()) > 0
    np.testing.assert_allclose(
        forward_logits(unmerged, {"input_ids": ids}).numpy(), trained, rtol=0, atol=1e-5
    )
    engine = create_engine(unmerged, max_batch_size=2)
    assert "generic" in str(engine.runner.kind)
    assert engine.generate([[5, 6, 7]], config) == tokens


def test_low_bit_training_refusals_come_before_any_weight(
    tiny_model_factory, tmp_path: Path, monkeypatch
) -> None:
    import llm.train.finetune as finetune

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(finetune, "load_low_bit_model", must_not_load)
    monkeypatch.setattr(finetune, "load_model", must_not_load)
    argv = _finetune_argv(tiny_model_factory("llama"), tmp_path / "o", "nf4")
    full = [a for a in argv if a != "--lora"]
    with pytest.raises(ConfigError, match="trains LoRA or Prefix adapters on a low-bit base"):
        finetune.run(full)
    with pytest.raises(ConfigError, match="pissa needs the float base weights"):
        finetune.run([*argv, "--pissa"])


FAMILY_DIRS = ("llama", "qwen", "chatglm", "chatglm_v2", "bloom", "gpt", "opt", "mixtral", "glm")


@pytest.mark.parametrize("mode", ["lora-nf4", "lora-weight_only_int8", "prefix-nf4"])
@pytest.mark.parametrize("family", FAMILY_DIRS)
def test_family_matrix(family: str, mode: str, tiny_model_factory, tmp_path: Path) -> None:
    """Every family x algorithm through finetune_generation on a tiny model: the loss goes down, the adapter is
    saved; LoRA merges into a float model with the low-bit model's logits; Prefix reloads on the low-bit base."""
    import json

    import llm.train.finetune as finetune
    from llm.merge import merge_lora_checkpoint
    from llm.model import load_lora, load_prefix

    kind, algo = mode.split("-", 1)
    model_dir, out = tiny_model_factory(family), tmp_path / "adapter"
    argv = _finetune_argv(model_dir, out, algo)
    if kind == "prefix":
        argv = [a for a in argv if a != "--lora"] + ["--prefix_tuning", "--num_prefix_tokens", "4"]
        if family == "glm":
            with pytest.raises(ConfigError, match="prefix_tuning is not supported for model type 'glm'"):
                finetune.run(argv)
            return
    finetune.run(argv)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    spec = LowBitSpec.from_args(types.SimpleNamespace(weight_quantize_algo=algo))
    ids = paddle.to_tensor(np.random.RandomState(2).randint(3, 150, size=(2, 10)).astype("int64"))
    with paddle.utils.unique_name.guard():
        base = load_low_bit_model(str(model_dir), spec)
        tuned = load_prefix(base, str(out)) if kind == "prefix" else load_lora(base, str(out))
    tuned.eval()
    logits = forward_logits(tuned, {"input_ids": ids}).numpy()
    assert np.isfinite(logits).all()
    if kind == "prefix":  # the predictor's model: the prefix on the base quantized the way it trained against
        from llm.infer.predictor import build_model

        assert (out / "quantization_config.json").is_file()
        with paddle.utils.unique_name.guard():
            served = build_model(str(model_dir), "float32", prefix_path=str(out))
        np.testing.assert_allclose(
            forward_logits(served, {"input_ids": ids}).numpy(), logits, rtol=0, atol=1e-5
        )
        from llm.infer import GenerationConfig, create_engine

        engine = create_engine(
            served, max_batch_size=2
        )  # the model's own forward: no fast kernel for LowBitLinear
        assert "generic" in str(engine.runner.kind)
        assert len(engine.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=3, eos_token_ids=()))[0]) == 3
    else:
        merge_lora_checkpoint(str(out), str(tmp_path / "merged"))
        merged = load_model(str(tmp_path / "merged"))
        merged.eval()
        np.testing.assert_allclose(
            forward_logits(merged, {"input_ids": ids}).numpy(), logits, rtol=0, atol=1e-4
        )


def test_resume_on_a_low_bit_base_is_exact(tiny_model_factory, tmp_path: Path, monkeypatch) -> None:
    """Killed after checkpoint 4 and resumed: steps 5-8 have the uninterrupted run's losses, bit for bit, and the
    adapters are equal."""
    import llm.train.finetune as finetune
    from llm.train.trainer import CausalLMTrainer

    original = CausalLMTrainer.training_step
    model_dir = tiny_model_factory("llama")

    def argv(out: Path, *extra: str) -> list[str]:
        return _finetune_argv(
            model_dir, out, "nf4", "--max_steps", "8", "--save_strategy", "steps", *extra
        ) + [
            "--save_steps",
            "2",
        ]

    def record(kill_at: int | None = None) -> dict[int, float]:
        losses: dict[int, float] = {}

        def spy(self: CausalLMTrainer, model: paddle.nn.Layer, inputs: dict) -> paddle.Tensor:
            step = self.state.global_step + 1
            if step == kill_at:
                raise KeyboardInterrupt  # stands in for the process dying after checkpoint 4
            loss = original(self, model, inputs)
            losses[step] = float(loss.item())
            return loss

        monkeypatch.setattr(CausalLMTrainer, "training_step", spy)
        return losses

    reference = record()
    finetune.run(argv(tmp_path / "ref"))
    killed = record(kill_at=5)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(argv(tmp_path / "out"))
    assert killed == {s: reference[s] for s in range(1, 5)}
    resumed = record()
    finetune.run(argv(tmp_path / "out", "--resume_from_checkpoint", str(tmp_path / "out" / "checkpoint-4")))
    assert resumed == {s: reference[s] for s in range(5, 9)}
    final, expected = (
        paddle.load(str(p / "lora_model_state.pdparams")) for p in (tmp_path / "out", tmp_path / "ref")
    )
    assert sorted(final) == sorted(expected)
    assert all(np.array_equal(final[k].numpy(), expected[k].numpy()) for k in expected)
