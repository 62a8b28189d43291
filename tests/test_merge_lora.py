"""merge_lora_params.py: exact LoRA / rsLoRA scaling, the three verification checks, atomic output."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix: must be imported before paddle)

# isort: split
import json
import math
import os
import types

import numpy as np
import paddle
import pytest

import llm.merge.lora as lora_mod
from llm.convert.tensors import SafetensorsFile
from llm.errors import ModelError
from llm.merge import merge_lora_checkpoint, register_base_transform
from llm.merge.cli import merge_lora_main
from llm.model import apply_lora, build_model, forward_logits, load_model, tiny_config

LAYER = {
    "llama": "llama.layers.1.self_attn.q_proj",
    "chatglm_v2": "chatglm_v2.encoder.layers.1.self_attention.query_key_value",
}


def _base(path: str, family: str = "llama", **overrides: object) -> str:
    with paddle.utils.unique_name.guard():
        build_model(tiny_config(family, **overrides), seed=0).save_pretrained(path, safe_serialization=True)
    return path


def _adapter(base: str, path: str, rslora: bool = False, zero: bool = False) -> str:
    with paddle.utils.unique_name.guard():
        args = types.SimpleNamespace(lora_rank=4, rslora=rslora, model_name_or_path=base)
        lora_model = apply_lora(load_model(base), args)
    if not zero:
        paddle.seed(7)
        with paddle.no_grad():
            for name, p in lora_model.model.named_parameters():
                if "lora_B" in name:
                    p.set_value(paddle.normal(0.0, 0.1, p.shape))
    lora_model.save_pretrained(path)
    return path


def _leftovers(parent: str) -> list[str]:
    return [f for f in os.listdir(parent) if ".tmp-" in f]


@pytest.mark.parametrize("family, rslora", [("llama", False), ("llama", True), ("chatglm_v2", False)])
def test_merge_scaling_and_checks(family: str, rslora: bool, tmp_path) -> None:
    base = _base(str(tmp_path / "base"), family)
    adapter = _adapter(base, str(tmp_path / "lora"), rslora=rslora)
    report = merge_lora_checkpoint(adapter, str(tmp_path / "merged"))  # base from lora_config.json
    state = paddle.load(str(tmp_path / "lora" / "lora_model_state.pdparams"), return_numpy=True)
    adapted = sum(k.endswith(".lora_A") for k in state)  # one per LoRA-wrapped linear, all with B != 0
    assert adapted >= 2 * 2  # 2 layers x at least 2 target modules
    assert report.base_model == base and report.changed_weights == report.merged_layers == adapted
    assert report.max_abs_diff <= 1e-5
    merged = SafetensorsFile(str(tmp_path / "merged" / "model.safetensors"))
    assert not [k for k in merged.keys() if "lora" in k]
    cfg = json.load(open(tmp_path / "lora" / "lora_config.json"))
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if rslora else cfg["r"])
    name = LAYER[family]
    w = SafetensorsFile(str(tmp_path / "base" / "model.safetensors")).get(f"{name}.weight").array
    want = w + state[f"{name}.lora_A"] @ state[f"{name}.lora_B"] * scale
    np.testing.assert_allclose(merged.get(f"{name}.weight").array, want, rtol=0, atol=1e-6)
    assert (
        json.load(open(tmp_path / "merged" / "merge_report.json"))["changed_weights"]
        == report.changed_weights
    )
    assert not _leftovers(str(tmp_path))


def test_cli_alias_pdparams_and_errors(tmp_path, capsys) -> None:
    base = _base(str(tmp_path / "base"))
    adapter = _adapter(base, str(tmp_path / "lora"))
    out = tmp_path / "merged"
    merge_lora_main(["--lora_path", adapter, "--merge_model_path", str(out), "--safe_serialization", "false"])
    assert (out / "model_state.pdparams").is_file() and "verified" in capsys.readouterr().out
    load_model(str(out))
    for argv, message in (
        (["--lora_path", adapter, "--merge_model_path", "a", "--merge_lora_model_path", "b"], "disagree"),
        (["--lora_path", adapter], "missing required argument 'merge_lora_model_path'"),
        (["--lora_path", str(tmp_path), "--merge_lora_model_path", "x"], "has no lora_config.json"),
        (["--lora_path", adapter, "--merge_lora_model_path", adapter], "is the input"),
        (["--lora_path", adapter, "--merge_lora_model_path", str(tmp_path)], "contains the input"),
    ):
        with pytest.raises(SystemExit) as exc:
            merge_lora_main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_untrained_adapter_fails_and_writes_nothing(tmp_path, capsys) -> None:
    base = _base(str(tmp_path / "base"))
    adapter = _adapter(base, str(tmp_path / "lora"), zero=True)
    with pytest.raises(SystemExit) as exc:
        merge_lora_main(["--lora_path", adapter, "--merge_lora_model_path", str(tmp_path / "merged")])
    assert exc.value.code == 2
    assert "none of the 14 LoRA-wrapped weights changed" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not _leftovers(str(tmp_path))


def test_adapter_for_another_base_is_refused(tmp_path) -> None:
    adapter = _adapter(_base(str(tmp_path / "base")), str(tmp_path / "lora"))
    other = _base(str(tmp_path / "other"), intermediate_size=48)
    with pytest.raises(
        ModelError,
        match=r"does not match this llama model.*: weight '.*mlp.gate_proj.lora_B' has shape \[4, 64\] in the "
        r"adapter but \[4, 48\] in the model",
    ):
        merge_lora_checkpoint(adapter, str(tmp_path / "merged"), model_name_or_path=other)
    assert not (tmp_path / "merged").exists()


def test_logits_mismatch_fails(tmp_path, monkeypatch) -> None:
    adapter = _adapter(_base(str(tmp_path / "base")), str(tmp_path / "lora"))
    monkeypatch.setattr(lora_mod, "_delta", lambda layer: layer.lora_A @ layer.lora_B * layer.scaling * 2)
    with pytest.raises(ModelError, match="merged logits differ from the unmerged LoRA model's"):
        merge_lora_checkpoint(adapter, str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists() and not _leftovers(str(tmp_path))


def test_leftover_lora_keys_fail(tmp_path, monkeypatch) -> None:
    adapter = _adapter(_base(str(tmp_path / "base")), str(tmp_path / "lora"))
    real = lora_mod._saved_keys
    monkeypatch.setattr(
        lora_mod, "_saved_keys", lambda out: [*real(out), "llama.layers.0.mlp.up_proj.lora_A"]
    )
    with pytest.raises(ModelError, match="LoRA weights remain in the merged model"):
        merge_lora_checkpoint(adapter, str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_base_transform_registry(tmp_path, monkeypatch) -> None:
    base = _base(str(tmp_path / "base"))
    adapter = _adapter(base, str(tmp_path / "lora"))
    cfg_path = tmp_path / "lora" / "config.json"
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = {"weight_quantize_algo": "llm.int8"}
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelError, match="'llm.int8' quantized base is not supported yet"):
        merge_lora_checkpoint(adapter, str(tmp_path / "merged"))
    # a stand-in quantizer: round to 1/8; the merge must see the rounded base, like training did
    monkeypatch.setattr(lora_mod, "BASE_TRANSFORMS", dict(lora_mod.BASE_TRANSFORMS))
    register_base_transform("llm.int8", lambda w, qconfig: paddle.round(w * 8) / 8)
    report = merge_lora_checkpoint(adapter, str(tmp_path / "merged"))
    assert report.max_abs_diff <= 1e-5
    name = LAYER["llama"]
    w = SafetensorsFile(str(tmp_path / "base" / "model.safetensors")).get(f"{name}.weight").array
    state = paddle.load(str(tmp_path / "lora" / "lora_model_state.pdparams"), return_numpy=True)
    want = np.round(w * 8) / 8 + state[f"{name}.lora_A"] @ state[f"{name}.lora_B"] * 2.0  # alpha 2r / r
    got = SafetensorsFile(str(tmp_path / "merged" / "model.safetensors")).get(f"{name}.weight").array
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert "weight_quantize_algo" not in json.dumps(json.load(open(tmp_path / "merged" / "config.json")))


def test_pissa_merge_matches_the_trained_adapter(tmp_path) -> None:
    base = _base(str(tmp_path / "base"))
    ids = np.random.RandomState(3).randint(3, 256, size=(2, 9)).astype("int64")
    with paddle.utils.unique_name.guard():
        args = types.SimpleNamespace(lora_rank=4, pissa=True, model_name_or_path=base)
        lora_model = apply_lora(load_model(base), args)
    lora_model.eval()
    forward_logits(lora_model, {"input_ids": ids})  # the first forward replaces W by its SVD residual
    paddle.seed(11)
    with paddle.no_grad():  # "training" moves A and B away from their SVD initialisation
        for name, p in lora_model.model.named_parameters():
            if "lora_" in name:
                p.set_value(p + paddle.normal(0.0, 0.05, p.shape))
    trained = forward_logits(lora_model, {"input_ids": ids}).numpy()
    lora_model.save_pretrained(str(tmp_path / "lora"))
    merge_lora_checkpoint(str(tmp_path / "lora"), str(tmp_path / "merged"))
    merged = load_model(str(tmp_path / "merged"))
    merged.eval()
    got = forward_logits(merged, {"input_ids": ids}).numpy()
    np.testing.assert_allclose(got, trained, rtol=0, atol=1e-4)


def test_in_memory_merge_shares_the_checkpoint_merge(tmp_path, monkeypatch) -> None:
    """predictor/export_model merge in memory with the same check, base transform and rsLoRA scaling."""
    from llm.infer.adapters import merge_lora

    base = _base(str(tmp_path / "base"))
    adapter = _adapter(base, str(tmp_path / "lora"), rslora=True)
    cfg_path = tmp_path / "lora" / "config.json"
    cfg = json.load(open(cfg_path))
    cfg["quantization_config"] = {"weight_quantize_algo": "llm.int8"}
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelError, match="'llm.int8' quantized base is not supported yet"):
        merge_lora(load_model(base), adapter)
    monkeypatch.setattr(lora_mod, "BASE_TRANSFORMS", dict(lora_mod.BASE_TRANSFORMS))
    register_base_transform("llm.int8", lambda w, qconfig: paddle.round(w * 8) / 8)
    merge_lora_checkpoint(adapter, str(tmp_path / "merged"))
    on_disk = SafetensorsFile(str(tmp_path / "merged" / "model.safetensors"))
    in_memory = merge_lora(load_model(base), adapter).state_dict()
    assert sorted(in_memory) == sorted(on_disk.keys())
    for key, value in in_memory.items():
        np.testing.assert_allclose(value.numpy(), on_disk.get(key).array, rtol=0, atol=1e-6, err_msg=key)
    other = _base(str(tmp_path / "other"), intermediate_size=48)
    with pytest.raises(
        ModelError, match=r"gate_proj.lora_B' has shape \[4, 64\] in the adapter but \[4, 48\]"
    ):
        merge_lora(load_model(other), adapter)


def test_in_memory_merge_into_a_bfloat16_model_on_cpu(tmp_path) -> None:
    """``predictor.py --dtype bfloat16 --lora_path``: the sum is formed in float32 (paddle 2.6 has no CPU bf16
    matmul/add), so each merged weight is ``bf16(widen(W) + A @ B * s)`` with the bf16 base W and the adapter's
    float32 A, B (equal up to one bf16 ulp: the summation order of A @ B may differ)."""
    from llm.convert.tensors import bf16_to_f32, f32_to_bf16
    from llm.infer.adapters import merge_lora

    base = _base(str(tmp_path / "base"))
    adapter = _adapter(base, str(tmp_path / "lora"))
    config = json.load(open(os.path.join(adapter, "lora_config.json")))
    scaling = config["lora_alpha"] / config["r"]
    lora = lora_mod.read_lora_state(adapter)
    base16 = {k: bf16_to_f32(v.numpy()) for k, v in load_model(base, dtype="bfloat16").state_dict().items()}
    merged16 = merge_lora(load_model(base, dtype="bfloat16"), adapter).state_dict()
    assert sorted(merged16) == sorted(base16)
    merged_layers = {k.rsplit(".lora_", 1)[0] for k in lora}
    for key, value in merged16.items():
        assert value.dtype == paddle.bfloat16, key
        got, want = bf16_to_f32(value.numpy()), base16[key]
        layer = key.rsplit(".", 1)[0]
        if layer in merged_layers and key.endswith(".weight"):
            delta = lora[f"{layer}.lora_A"] @ lora[f"{layer}.lora_B"] * scaling
            want = bf16_to_f32(f32_to_bf16(want + delta))
            assert not np.array_equal(got, base16[key]), key
        assert (np.abs(got - want) <= 2**-7 * np.abs(want)).all(), key
