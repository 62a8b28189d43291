"""Every input is checked before work starts: tensor shapes and dtypes against the target config (both
directions, every family), truncated or corrupt weight files (one ``error:`` line naming the file, through
``python -m llm.convert``, ``load_model`` and ``predictor.py``), and a failed on-the-fly conversion leaves
nothing behind in the Hugging Face directory."""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix: must be imported before paddle)

# isort: split
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import paddle
import pytest
from safetensors.numpy import load_file, save_file

from llm.convert import convert_hf_to_paddle, export_paddle_to_hf
from llm.convert.__main__ import main as convert_main
from llm.convert.cache import CACHE_DIR_NAME
from llm.convert.rules import plan
from llm.convert.shapes import _pd_template, resolve, sizes
from llm.convert.specs import spec_for_paddle
from llm.convert.tensors import read_safetensors_header
from llm.errors import ModelError
from llm.infer.predictor import main as predictor_main
from llm.model import build_model, load_model, tiny_config
from llm.outputs import COMPLETE_MARKER

try:
    from test_convert import V, _hf_model, _paddle_model_dir, _save_hf
except ImportError:  # tests/ imported as a package
    from tests.test_convert import V, _hf_model, _paddle_model_dir, _save_hf

ROOT = Path(__file__).resolve().parents[1]
PADDLE_FAMILIES = ("llama", "mixtral", "qwen", "chatglm_v2", "bloom", "gpt", "opt")
HF_FAMILIES = ("llama", "qwen2", "mixtral", "gpt", "opt", "bloom")


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _rewrite(path: str, edit) -> None:
    """Apply ``edit(tensors)`` to a single-file safetensors checkpoint, keeping its metadata."""
    metadata = read_safetensors_header(path)[1]
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def _first_non_square(path: str) -> str:
    """The first (by name) non-square layer-0 matrix of a safetensors file."""
    tensors = load_file(path)
    names = [n for n, t in sorted(tensors.items()) if ".0." in n and t.ndim == 2 and t.shape[0] != t.shape[1]]
    return names[0]


def _transpose(path: str, name: str) -> tuple[int, int]:
    """Transpose one matrix of a safetensors file in place (same size, so a completion marker still holds)."""
    entries, metadata, offset = read_safetensors_header(path)
    entry = entries[name]
    rows, cols = entry["shape"]
    begin, end = (offset + x for x in entry["data_offsets"])
    data = bytearray(Path(path).read_bytes())
    dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U16": np.uint16}[entry["dtype"]]
    block = np.frombuffer(bytes(data[begin:end]), dtype=dtype).reshape(rows, cols)
    data[begin:end] = np.ascontiguousarray(block.T).tobytes()
    entry["shape"] = [cols, rows]
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    assert len(header) <= offset - 8
    data[8:offset] = header + b" " * (offset - 8 - len(header))
    Path(path).write_bytes(bytes(data))
    return rows, cols


def _transposed_message(name: str, shape: tuple[int, int]) -> str:
    a, b = shape
    return rf"{re.escape(name)}: expected \[{a}, {b}\] \([^)]+ x [^)]+\), found \[{b}, {a}\] \(transposed\?\)"


def _cli(argv: list[str], capsys: pytest.CaptureFixture, main=convert_main) -> str:
    """Run a script main that must fail with exit code 2 and one ``error:`` line; returns that line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _truncate(path: str, keep: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def _convert_argv(src: str, dst: str) -> list[str]:
    return ["--model_name_or_path", src, "--output_path", dst, "--progress", "false"]


# --------------------------------------------------------------------------------------------------
# 1. shapes and dtypes, before anything is written
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_wrong_shape_and_transposed_hf_tensors_are_refused(layout: str, tmp_path, capsys) -> None:
    import torch

    model = _hf_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight = torch.nn.Parameter(
            model.model.layers[0].mlp.gate_proj.weight.T
        )
    src = _save_hf(model, str(tmp_path / "hf"), layout)
    line = _cli(_convert_argv(src, str(tmp_path / "pd")), capsys)
    want = (
        r"model\.layers\.0\.mlp\.gate_proj\.weight: expected \[64, 32\] \(intermediate_size x hidden_size\), "
    )
    assert re.search(want + r"found \[32, 64\] \(transposed\?\)", line), line
    model = _hf_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight = torch.nn.Parameter(torch.zeros(24, 32))
    src = _save_hf(model, str(tmp_path / "hf2"), layout)
    line = _cli(_convert_argv(src, str(tmp_path / "pd")), capsys)
    assert (
        "model.layers.1.self_attn.q_proj.weight: expected [32, 32] (hidden_size x hidden_size), found [24, 32]"
        in line
    )
    assert sorted(os.listdir(tmp_path)) == ["hf", "hf2"]  # nothing written, not even a staging directory


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_transposed_tensor_of_every_hf_family_is_refused(family: str, tmp_path) -> None:
    src = _save_hf(_hf_model(family), str(tmp_path / "hf"), "safetensors")
    path = os.path.join(src, "model.safetensors")
    name = _first_non_square(path)
    shape = _transpose(path, name)
    with pytest.raises(ModelError, match=_transposed_message(name, shape)):
        convert_hf_to_paddle(src, str(tmp_path / "pd"), progress=False)
    assert not os.path.exists(tmp_path / "pd")


@pytest.mark.parametrize("family", PADDLE_FAMILIES)
def test_transposed_tensor_is_refused_in_both_directions(family: str, tmp_path) -> None:
    src = _paddle_model_dir(family, str(tmp_path / "pd"))
    hf = export_paddle_to_hf(src, str(tmp_path / "hf"), progress=False)
    # HF -> paddle (qwen and chatglm2 checkpoints come from the export: their HF code is remote)
    hf_file = os.path.join(hf, "model.safetensors")
    name = _first_non_square(hf_file)
    shape = _transpose(hf_file, name)
    with pytest.raises(ModelError, match=_transposed_message(name, shape)):
        convert_hf_to_paddle(hf, str(tmp_path / "pd2"), progress=False)
    # paddle -> HF
    pd_file = os.path.join(src, "model.safetensors")
    name = _first_non_square(pd_file)
    shape = _transpose(pd_file, name)
    with pytest.raises(ModelError, match=_transposed_message(name, shape)):
        export_paddle_to_hf(src, str(tmp_path / "hf2"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf", "pd"]


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("llama", {"num_key_value_heads": 4}),
        ("mixtral", {}),
        ("qwen", {}),
        ("chatglm_v2", {}),
        ("chatglm_v2", {"multi_query_group_num": 4}),
        ("bloom", {}),
        ("gpt", {}),
        ("opt", {}),
    ],
)
def test_every_tensor_has_the_shape_paddlenlp_builds(family: str, overrides: dict) -> None:
    """The shape templates of the rules resolve, for every tensor, to the shape of paddlenlp's own layer."""
    config = tiny_config(family, vocab_size=V, **overrides)
    with paddle.utils.unique_name.guard():
        state = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    spec = spec_for_paddle(family)
    steps, unknown = plan(spec.ruleset("to_hf"), [k for k in state if "inv_freq" not in k], "to_hf", config)
    assert steps and not unknown
    table = sizes(spec.name, config)
    for step in steps:
        want = resolve(_pd_template(step), table)
        assert want is not None, f"no shape template for {step.sources}"
        for source in step.sources:
            assert want[0] == state[source], (source, want, state[source])


def test_integer_tensor_is_refused(tmp_path) -> None:
    src = _save_hf(_hf_model("llama"), str(tmp_path / "hf"), "safetensors")
    name = "model.layers.0.post_attention_layernorm.weight"
    _rewrite(os.path.join(src, "model.safetensors"), lambda t: t.update({name: np.ones(32, np.int64)}))
    with pytest.raises(
        ModelError, match=rf"{re.escape(name)}: expected a floating-point tensor .*found int64"
    ):
        convert_hf_to_paddle(src, str(tmp_path / "pd"), progress=False)


# --------------------------------------------------------------------------------------------------
# 2. truncated and corrupt files: one line naming the file
# --------------------------------------------------------------------------------------------------
def test_truncated_hf_files_through_the_cli(tmp_path, capsys) -> None:
    model = _hf_model("llama")
    src = _save_hf(model, str(tmp_path / "hf"), "safetensors")
    path = os.path.join(src, "model.safetensors")
    size = os.path.getsize(path)
    header_end = read_safetensors_header(path)[2]
    _truncate(path, 0.6)
    line = _cli(_convert_argv(src, str(tmp_path / "pd")), capsys)
    data = int(size * 0.6) - header_end
    assert f"{path}: data section is {data} bytes, the header needs {size - header_end}" in line
    assert "(truncated download?)" in line
    shard_dir = _save_hf(model, str(tmp_path / "hf-sharded"), "sharded_safetensors")
    shard = sorted(f for f in os.listdir(shard_dir) if f.endswith(".safetensors"))[1]
    _truncate(os.path.join(shard_dir, shard), 0.3)
    assert shard in _cli(_convert_argv(shard_dir, str(tmp_path / "pd")), capsys)
    for keep, message in ((0.5, "zip archive without its end record"), (0.0, "empty file (0 bytes")):
        bin_dir = _save_hf(model, str(tmp_path / f"hf-bin-{keep}"), "bin")
        _truncate(os.path.join(bin_dir, "pytorch_model.bin"), keep)
        line = _cli(_convert_argv(bin_dir, str(tmp_path / "pd")), capsys)
        assert f"{bin_dir}/pytorch_model.bin: {message}" in line
    assert not os.path.exists(tmp_path / "pd")


def _pdparams_dir(path: Path) -> str:
    with paddle.utils.unique_name.guard():
        model = build_model(tiny_config("llama", vocab_size=V), seed=1)
    model.save_pretrained(str(path), safe_serialization=False)
    return str(path)


def test_truncated_paddle_files_through_the_cli_and_load_model(tmp_path, capsys) -> None:
    cases = []
    for keep in (0.0, 0.5):
        src = _pdparams_dir(tmp_path / f"pdparams-{keep}")
        _truncate(os.path.join(src, "model_state.pdparams"), keep)
        cases.append(
            (src, "model_state.pdparams", "empty file (0 bytes" if keep == 0 else "the pickle is cut off")
        )
    src = _paddle_model_dir("llama", str(tmp_path / "st"))
    _truncate(os.path.join(src, "model.safetensors"), 0.7)
    cases.append((src, "model.safetensors", "data section is"))
    for src, name, message in cases:
        line = _cli(_convert_argv(src, str(tmp_path / "hf")), capsys)
        assert f"{os.path.join(src, name)}: {message}" in line, line
        with pytest.raises(ModelError) as exc:
            load_model(src)
        assert str(exc.value).startswith(f"{os.path.join(src, name)}: {message}"), exc.value
        assert "\n" not in str(exc.value)
    assert not os.path.exists(tmp_path / "hf")


def test_corrupt_pickle_is_one_line_from_load_model(tmp_path) -> None:
    """A complete-looking pickle that still fails inside paddlenlp is caught there too (one line)."""
    src = _pdparams_dir(tmp_path / "pd")
    path = os.path.join(src, "model_state.pdparams")
    data = bytearray(Path(path).read_bytes())
    data[2:40] = b"\xff" * 38  # garbage after the protocol header, the STOP byte intact
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"cannot load LlamaForCausalLM weights \(\w+"):
        load_model(src)


# --------------------------------------------------------------------------------------------------
# 3. a failed on-the-fly conversion leaves nothing in the Hugging Face directory
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_chat_dir(tmp_path) -> str:
    """The demo model exported to a Hugging Face directory (tokenizer files included), without the toolkit's
    completion marker: as downloaded from a hub."""
    out = export_paddle_to_hf(str(ROOT / "demo" / "model"), str(tmp_path / "hf"), progress=False)
    os.remove(os.path.join(out, COMPLETE_MARKER))
    return out


def _predict_argv(model: str, tmp_path, *extra: str) -> list[str]:
    out = str(tmp_path / "out.json")
    return ["--model_name_or_path", model, "--max_length", "4", "--src_length", "16", "--batch_size", "1",
            "--decode_strategy", "greedy_search", "--output_file", out, *extra]  # fmt: skip


def test_predictor_on_broken_hf_dir_leaves_nothing_behind(hf_chat_dir: str, tmp_path, capsys) -> None:
    before = sorted(os.listdir(hf_chat_dir))
    path = os.path.join(hf_chat_dir, "model.safetensors")
    _truncate(path, 0.5)
    line = _cli(_predict_argv(hf_chat_dir, tmp_path), capsys, main=predictor_main)
    assert line.startswith(f"error: {path}: data section is") and "(truncated download?)" in line
    assert sorted(os.listdir(hf_chat_dir)) == before  # no .paddle_converted, empty or not
    with pytest.raises(ModelError, match="data section is"):
        load_model(hf_chat_dir)
    assert sorted(os.listdir(hf_chat_dir)) == before


def test_failure_while_writing_the_cache_leaves_nothing_behind(hf_chat_dir: str, monkeypatch) -> None:
    import llm.convert.core as core

    before = sorted(os.listdir(hf_chat_dir))

    def disk_full(*args: object, **kwargs: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(core, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        load_model(hf_chat_dir)
    assert sorted(os.listdir(hf_chat_dir)) == before
    monkeypatch.undo()
    load_model(hf_chat_dir)  # the next run converts normally
    assert os.listdir(os.path.join(hf_chat_dir, CACHE_DIR_NAME))[0].startswith("float32-")


def test_existing_cache_dir_is_kept_after_a_failure(hf_chat_dir: str, tmp_path) -> None:
    """Only directories the failed conversion created are removed (another dtype's entry stays)."""
    load_model(hf_chat_dir)
    cache = os.path.join(hf_chat_dir, CACHE_DIR_NAME)
    entries = os.listdir(cache)
    shutil.copy(os.path.join(hf_chat_dir, "config.json"), tmp_path / "config.json")
    _truncate(os.path.join(hf_chat_dir, "model.safetensors"), 0.5)
    with pytest.raises(ModelError, match="data section is"):
        load_model(hf_chat_dir, dtype="bfloat16")
    assert os.listdir(cache) == entries
