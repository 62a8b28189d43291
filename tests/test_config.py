"""Tests for llm.config: parser, argument dataclasses, static and runtime checks (CPU, fast)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import llm  # noqa: F401  (zlib fix before paddle)
from llm.config import (
    FINETUNE_ARGUMENT_TYPES,
    PREFIX_TUNING_MODEL_TYPES,
    ZERO_PADDING_MODEL_TYPES,
    FinetuneArguments,
    check_runtime,
    check_static,
    parse_arguments,
    parse_finetune_arguments,
    read_model_type,
)
from llm.errors import ConfigError, DataError, ModelError, UserError, exit_on_user_error

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, data: dict) -> str:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return str(path)


def parse(argv: list[str]):
    """Parse with the fine-tuning dataclasses; returns (gen, quant, model, data, training)."""
    return parse_arguments(FINETUNE_ARGUMENT_TYPES, argv)


def ft(*extra: str, output_dir: str = "out"):
    return parse(["--output_dir", output_dir, *extra])


def static(*extra: str) -> None:
    gen, quant, model, data, train = ft("--model_name_or_path", "m", "--dataset_name_or_path", "d", *extra)
    check_static(model, data, quant, train)


# ----------------------------------------------------------------------------- parser: happy paths


def test_json_then_cli_overrides(tmp_path: Path) -> None:
    values = {"model_name_or_path": "facebook/llama-7b", "dataset_name_or_path": "./data", "lora": True}
    values |= {
        "output_dir": str(tmp_path / "o"),
        "lora_rank": 8,
        "learning_rate": 3e-4,
        "num_train_epochs": 3,
    }
    values |= {"evaluation_strategy": "epoch", "save_strategy": "epoch"}
    cfg = write_json(tmp_path / "lora_argument.json", values)
    argv = [cfg, *"--lora_rank 16 --learning_rate=1e-3 --do_train --src_length 64 --max_length=128".split()]
    gen, quant, model, data, train = parse(argv)
    assert model.lora is True and model.lora_rank == 16
    assert train.learning_rate == pytest.approx(1e-3)
    assert train.do_train is True
    assert train.do_eval is True  # paddlenlp turns it on for a non-"no" evaluation_strategy
    assert train.evaluation_strategy.value == "epoch"
    assert (data.src_length, data.max_length) == (64, 128)
    assert train.num_train_epochs == 3.0 and isinstance(train.num_train_epochs, float)
    assert (gen.top_k, gen.top_p) == (1, 1.0)
    assert quant.quant_type == "a8w8"
    assert train.decay_steps == 0


def test_cli_value_replaces_a_bad_json_value(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "c.json", {"output_dir": str(tmp_path / "o"), "learning_rate": "fast"})
    with pytest.raises(ConfigError, match="learning_rate"):
        parse([cfg])
    train = parse([cfg, "--learning_rate", "1e-3"])[-1]
    assert train.learning_rate == pytest.approx(1e-3)


def test_cli_only_and_bool_forms() -> None:
    _, _, model, data, train = ft(
        "--lora", "--zero_padding", "false", "--do_train=yes", "--do_eval", "0", "--max_steps", "-1"
    )
    assert model.lora is True and data.zero_padding is False and train.max_steps == -1
    assert train.do_train is True and train.do_eval is False


def test_predictor_style_dataclass_cli_only() -> None:
    @dataclass
    class PredictorArgument:
        model_name_or_path: str | None = field(default=None, metadata={"help": "model"})
        top_p: float = field(default=0.7, metadata={"help": "p"})
        batch_size: int = field(default=1, metadata={"help": "bs"})
        dtype: str | None = field(default=None, metadata={"help": "dtype"})
        mode: str = field(default="dynamic", metadata={"help": "mode", "choices": ["dynamic", "static"]})

    (args,) = parse_arguments(
        PredictorArgument, ["--model_name_or_path", "./m", "--top_p", "1", "--dtype", "None"]
    )
    assert args.top_p == 1.0 and args.dtype is None and args.batch_size == 1
    with pytest.raises(ConfigError, match=r"argument 'mode' on the command line expects one of"):
        parse_arguments([PredictorArgument], ["--mode", "eager"])
    with pytest.raises(
        ConfigError, match=r"unknown argument 'topp' on the command line \(did you mean 'top_p'\?\)"
    ):
        parse_arguments([PredictorArgument], ["--topp", "0.5"])


def test_optional_none_and_literal_none_strings() -> None:
    _, _, _, data, train = ft("--chat_template", "none", "--report_to", "none", "--eval_steps", "None")
    assert data.chat_template == "none"  # "none" means "remove the template", keep it
    assert train.report_to == []  # paddlenlp maps ["none"] to no integrations
    assert train.eval_steps is None
    _, _, _, data, _ = ft("--chat_template", "None")
    assert data.chat_template is None


def test_json_null_and_lists(tmp_path: Path) -> None:
    values = {"output_dir": "o", "lora_path": None, "report_to": ["visualdl"], "no_recompute_layers": [1, 2]}
    cfg = write_json(tmp_path / "a.json", values)
    _, _, model, _, train = parse([cfg])
    assert model.lora_path is None and train.report_to == ["visualdl"] and model.no_recompute_layers == [1, 2]
    _, _, model, _, _ = parse([cfg, "--no_recompute_layers", "3,4"])
    assert model.no_recompute_layers == [3, 4]
    _, _, model, _, _ = parse([cfg, "--no_recompute_layers", "5", "6", "--lora"])
    assert model.no_recompute_layers == [5, 6] and model.lora is True


def test_json_int_bools_and_integral_floats(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "a.json", {"output_dir": "o", "recompute": 1, "lora_rank": 4.0, "top_p": 1})
    gen, _, model, _, train = parse([cfg])
    assert train.recompute is True and model.lora_rank == 4 and gen.top_p == 1.0


def test_deprecated_aliases(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="llm.config.arguments"):
        _, _, _, data, _ = ft("--task_name_or_path", "./old", "--intokens", "true")
    assert data.dataset_name_or_path == "./old" and data.zero_padding is True
    assert "deprecated" in caplog.text


def test_device_defaults_to_cpu_without_cuda() -> None:
    import paddle

    *_, train = ft()
    assert train.device == ("gpu" if paddle.is_compiled_with_cuda() else "cpu")
    *_, train = ft("--device", "CPU")
    assert train.device == "cpu"
    direct = FinetuneArguments(output_dir="o", decay_steps=5)
    assert direct.decay_steps == 5 and direct.device == ("gpu" if paddle.is_compiled_with_cuda() else "cpu")


def test_paddlenlp_resets_parallel_degrees_but_request_is_kept() -> None:
    *_, train = ft("--tensor_parallel_degree", "4", "--sharding", "stage3", "--sharding_parallel_degree", "4")
    assert train.tensor_parallel_degree == -1 and train.sharding == []  # single process
    assert train.requested["tensor_parallel_degree"] == 4 and train.requested["sharding"] == "stage3"


def test_help_exits_zero(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--help"])
    assert exc.value.code == 0
    assert "--lora_rank int [default: 8]" in capsys.readouterr().out


def test_parse_finetune_arguments_runs_static_checks() -> None:
    with pytest.raises(ConfigError, match="lora and prefix_tuning"):
        parse_finetune_arguments(
            ["--output_dir", "o", "--model_name_or_path", "m", "--lora", "--prefix_tuning"]
        )


# ----------------------------------------------------------------------------- parser: errors


def test_unknown_key_in_json_names_file_and_suggestion(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "lora_argument.json", {"output_dir": "o", "lora_rnak": 8})
    with pytest.raises(ConfigError) as exc:
        parse([cfg])
    assert str(exc.value) == f"unknown argument 'lora_rnak' in {cfg} (did you mean 'lora_rank'?)"


def test_unknown_key_without_close_match() -> None:
    with pytest.raises(ConfigError) as exc:
        ft("--zzzqqq", "1")
    assert str(exc.value) == "unknown argument 'zzzqqq' on the command line"


def test_stale_tgt_length_key_is_rejected(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "ptq_argument.json", {"output_dir": "o", "tgt_length": 1024})
    with pytest.raises(ConfigError, match=r"unknown argument 'tgt_length' in .*ptq_argument.json"):
        parse([cfg])


@pytest.mark.parametrize(
    ("argv_tail", "message"),
    [
        (["--lora_rank", "abc"], "argument 'lora_rank' on the command line expects int, got 'abc'"),
        (["--lora_rank", "2.5"], "argument 'lora_rank' on the command line expects int, got '2.5'"),
        (
            ["--learning_rate", "fast"],
            "argument 'learning_rate' on the command line expects float, got 'fast'",
        ),
        (["--lora", "maybe"], "argument 'lora' on the command line expects bool, got 'maybe'"),
        (["--eval_steps", "x"], "argument 'eval_steps' on the command line expects int or null, got 'x'"),
        (
            ["--evaluation_strategy", "sometimes"],
            "argument 'evaluation_strategy' on the command line expects one of ['no', 'steps', 'epoch'], "
            "got 'sometimes'",
        ),
        (["--lr_scheduler_type", "cos"], "argument 'lr_scheduler_type' on the command line expects one of"),
        (["--sharding", "stage4"], "argument 'sharding' on the command line expects space-separated words"),
        (["--fp16_opt_level", "O3"], "argument 'fp16_opt_level' on the command line expects one of"),
        (["--smooth_sampler", "ema"], "argument 'smooth_sampler' on the command line expects one of"),
        (["--lora_rank"], "argument 'lora_rank' on the command line expects a value"),
        (["stray"], "unexpected argument 'stray' on the command line"),
        (
            ["x.json"],
            "unexpected argument 'x.json' on the command line (a .json config file must be the first",
        ),
    ],
)
def test_cli_type_errors(argv_tail: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        ft(*argv_tail)
    assert str(exc.value).startswith(message)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("lora_rank", "abc", "expects int, got 'abc'"),
        ("lora_rank", True, "expects int, got true"),
        ("lora", "maybe", "expects bool, got 'maybe'"),
        ("lora", 2, "expects bool, got 2"),
        ("fp16_opt_level", 2, "expects str, got 2"),
        ("top_p", None, "expects float, got null"),
        ("report_to", 5, "expects a list of str or null, got 5"),
    ],
)
def test_json_type_errors(tmp_path: Path, key: str, value: object, expected: str) -> None:
    cfg = write_json(tmp_path / "cfg.json", {"output_dir": "o", key: value})
    with pytest.raises(ConfigError) as exc:
        parse([cfg])
    assert str(exc.value) == f"argument '{key}' in {cfg} {expected}"


def test_missing_and_invalid_json_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError, match=f"config file not found: {missing}"):
        parse([missing])
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "output_dir": "o",\n  "lora": tru\n}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        parse([str(bad)])
    assert str(exc.value).startswith(f"invalid JSON in {bad}:3:11: ")
    arr = tmp_path / "arr.json"
    arr.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        parse([str(arr)])


def test_missing_required_output_dir() -> None:
    with pytest.raises(ConfigError, match="missing required argument 'output_dir'"):
        parse(["--lora"])


def test_post_init_errors_become_config_errors() -> None:
    with pytest.raises(
        ConfigError, match="invalid FinetuneArguments: At most one of fp16 and bf16 can be True for full"
    ):
        ft("--fp16_full_eval", "--bf16_full_eval")
    with pytest.raises(ConfigError) as exc:
        ft("--load_best_model_at_end", "--evaluation_strategy", "epoch", "--save_strategy", "steps")
    assert "requires the save and eval strategy to match" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="fp16 and bf16 are both enabled"):
        ft("--fp16", "--bf16")


# ----------------------------------------------------------------------------- static checks


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora", "--prefix_tuning"], "lora and prefix_tuning are both enabled"),
        (["--do_train", "--do_ptq"], "do_train and do_ptq are enabled together, but at most one"),
        (["--do_gptq", "--do_qat"], "do_gptq and do_qat are enabled together"),
        (["--fp16_opt_level", "O2"], "fp16_opt_level O2 needs --fp16 or --bf16"),
        (
            ["--src_length", "2048", "--max_length", "2048"],
            r"src_length \(2048\) must be smaller than max_length",
        ),
        (["--src_length", "0"], "src_length must be >= 1, got 0"),
        (["--max_length", "-5", "--src_length", "-9"], "src_length must be >= 1, got -9"),
        (["--lora", "--lora_rank", "0"], "lora_rank must be >= 1 when lora is true, got 0"),
        (
            ["--prefix_tuning", "--num_prefix_tokens", "-1"],
            "num_prefix_tokens must be >= 1 when prefix_tuning",
        ),
        (["--lazy"], "--max_steps must be set to a positive number"),
        (["--weight_quantize_algo", "int3"], "weight_quantize_algo 'int3' is not supported"),
        (["--quant_type", "w3a3"], "quant_type 'w3a3' is not supported"),
        (["--prefix_tuning", "--pipeline_parallel_degree", "2"], "prefix_tuning does not support pipeline"),
    ],
)
def test_static_errors(extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        static(*extra)


def test_static_fp16_bf16_on_mutated_args() -> None:
    gen, quant, model, data, train = ft("--model_name_or_path", "m")
    train.fp16 = train.bf16 = True
    with pytest.raises(ConfigError, match="fp16 and bf16 are both enabled"):
        check_static(model, data, quant, train)


def test_static_accepts_valid_combinations(caplog: pytest.LogCaptureFixture) -> None:
    static("--lora", "--bf16", "--fp16_opt_level", "O2", "--weight_quantize_algo", "nf4")
    static("--quant_type", "WINT4", "--do_ptq")
    static("--lazy", "--max_steps", "10")
    with caplog.at_level(logging.WARNING, logger="llm.config.checks"):
        static("--zero_padding", "--eval_with_do_generation", "--per_device_train_batch_size", "1")
    assert "will not be packed" in caplog.text


def test_static_requires_model_and_dataset() -> None:
    gen, quant, model, data, train = ft("--do_train", "--model_name_or_path", "m")
    with pytest.raises(ConfigError, match="dataset_name_or_path is required"):
        check_static(model, data, quant, train)
    gen, quant, model, data, train = ft()
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        check_static(model, data, quant, train)


# ----------------------------------------------------------------------------- runtime checks


def make_model(root: Path, config: dict) -> str:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(root)


def make_data(root: Path, files: list[str]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for name in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"src": "a", "tgt": "b"}\n', encoding="utf-8")
    return str(root)


@pytest.fixture()
def model_dir(tmp_path: Path) -> str:
    return make_model(tmp_path / "model", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def runtime(model: str, data: str, *extra: str, cuda: bool = False, output_dir: str = "out") -> str | None:
    gen, quant, m, d, t = ft("--model_name_or_path", model, "--dataset_name_or_path", data, *extra)
    check_static(m, d, quant, t)
    return check_runtime(m, d, quant, t, cuda_available=cuda)


def test_read_model_type(tmp_path: Path) -> None:
    assert read_model_type(make_model(tmp_path / "a", {"model_type": "qwen"})) == "qwen"
    assert (
        read_model_type(make_model(tmp_path / "b", {"architectures": ["ChatGLMv2ForCausalLM"]}))
        == "chatglm_v2"
    )
    assert read_model_type(make_model(tmp_path / "c", {"architectures": ["BloomForCausalLM"]})) == "bloom"
    with pytest.raises(ModelError, match="neither 'model_type' nor 'architectures'"):
        read_model_type(make_model(tmp_path / "d", {"hidden_size": 8}))
    (tmp_path / "e").mkdir()
    with pytest.raises(ModelError, match="config.json not found"):
        read_model_type(str(tmp_path / "e"))


def test_runtime_ok_returns_model_type(tmp_path: Path, model_dir: str) -> None:
    data = make_data(tmp_path / "data", ["train.json", "dev.json"])
    assert runtime(model_dir, data, "--do_train", "--do_eval", "--zero_padding") == "llama"


def test_runtime_missing_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_data(tmp_path / "data", ["train.json"])
    missing = str(tmp_path / "no_model")
    with pytest.raises(ModelError) as exc:
        runtime(missing, data, "--do_train")
    assert str(exc.value) == f"model directory not found: {missing}"
    import paddlenlp.utils.env

    monkeypatch.setattr(paddlenlp.utils.env, "MODEL_HOME", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="model directory not found: facebook/llama-7b .*PaddleNLP cache"):
        runtime("facebook/llama-7b", data, "--do_train")
    make_model(tmp_path / "cache" / "facebook" / "llama-7b", {"model_type": "llama"})
    assert runtime("facebook/llama-7b", data, "--do_train") == "llama"


def test_zero_padding_unsupported_model_type(tmp_path: Path) -> None:
    model = make_model(tmp_path / "opt", {"model_type": "opt"})
    data = make_data(tmp_path / "data", ["train.json"])
    with pytest.raises(ConfigError) as exc:
        runtime(model, data, "--do_train", "--zero_padding")
    assert "zero_padding is not supported for model type 'opt'" in str(exc.value)
    assert ", ".join(sorted(ZERO_PADDING_MODEL_TYPES)) in str(exc.value)
    assert runtime(model, data, "--do_train") == "opt"


def test_prefix_tuning_unsupported_model_type(tmp_path: Path) -> None:
    model = make_model(tmp_path / "glm", {"model_type": "glm"})
    data = make_data(tmp_path / "data", ["train.json"])
    with pytest.raises(ConfigError) as exc:
        runtime(model, data, "--do_train", "--prefix_tuning")
    assert str(exc.value) == (
        "prefix_tuning is not supported for model type 'glm' (supported: "
        f"{', '.join(sorted(PREFIX_TUNING_MODEL_TYPES))}); use --lora true or full fine-tuning instead"
    )
    assert runtime(model, data, "--do_train", "--lora") == "glm"
    llama = make_model(tmp_path / "llama", {"model_type": "llama"})
    assert runtime(llama, data, "--do_train", "--prefix_tuning") == "llama"


@pytest.mark.parametrize(
    ("files", "extra", "message"),
    [
        (["dev.json"], ["--do_train"], "train.json not found"),
        (["train.json"], ["--do_eval"], "dev.json not found"),
        (["train/a.json"], ["--do_eval"], "dev/ not found"),
        (["train/readme.txt"], ["--do_train"], "train/ holds no *.json files"),
        (["dev.json"], ["--do_ptq"], "quant.json not found (and no train data"),
        (["train.json"], ["--do_predict"], "test.json not found"),
        ([], ["--do_train"], "train.json not found"),
    ],
)
def test_dataset_discovery_errors(
    tmp_path: Path, model_dir: str, files: list[str], extra: list[str], message: str
) -> None:
    data = make_data(tmp_path / "data", files)
    with pytest.raises(DataError) as exc:
        runtime(model_dir, data, *extra)
    assert message in str(exc.value)


def test_dataset_discovery_ok(tmp_path: Path, model_dir: str) -> None:
    from llm.config import required_dataset_files

    data = make_data(tmp_path / "d1", ["train.json"])
    runtime(model_dir, data, "--do_gptq")  # calibration falls back to train.json
    data = make_data(tmp_path / "d2", ["train/a.json", "train/b.json", "dev/c.json"])
    runtime(model_dir, data, "--do_train", "--do_eval")
    _, quant, _, d, t = ft("--dataset_name_or_path", data, "--do_train", "--do_eval")
    files = required_dataset_files(d, quant, t)
    assert [os.path.basename(p) for p in files["train"]] == ["a.json", "b.json"]
    with pytest.raises(DataError, match="dataset directory not found"):
        runtime(model_dir, str(tmp_path / "nodata"), "--do_train")


def test_adapter_dirs(tmp_path: Path, model_dir: str) -> None:
    data = make_data(tmp_path / "data", ["train.json"])
    lora = tmp_path / "lora"
    lora.mkdir()
    with pytest.raises(ModelError, match="lora_config.json not found"):
        runtime(model_dir, data, "--do_train", "--lora", "--lora_path", str(lora))
    (lora / "lora_config.json").write_text("{}", encoding="utf-8")
    runtime(model_dir, data, "--do_train", "--lora", "--lora_path", str(lora))
    with pytest.raises(ModelError, match="prefix_path directory not found"):
        runtime(model_dir, data, "--prefix_tuning", "--prefix_path", str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="prefix_config.json not found"):
        runtime(model_dir, data, "--prefix_tuning", "--prefix_path", str(lora))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tensor_parallel_degree", "2"], "tensor_parallel_degree=2 (tensor parallelism) needs a GPU"),
        (
            ["--pipeline_parallel_degree", "4"],
            "pipeline_parallel_degree=4 (pipeline parallelism) needs a GPU",
        ),
        (["--sharding", "stage3"], "sharding stage3 needs a GPU"),
        (["--sharding", "stage2 offload"], "sharding stage2 needs a GPU"),
        (["--fp16"], "fp16 training needs a GPU"),
        (["--device", "gpu"], "--device gpu needs a GPU"),
    ],
)
def test_cpu_only_settings(tmp_path: Path, model_dir: str, extra: list[str], message: str) -> None:
    data = make_data(tmp_path / "data", ["train.json"])
    with pytest.raises(ConfigError) as exc:
        runtime(model_dir, data, "--do_train", *extra)
    assert message in str(exc.value)
    runtime(model_dir, data, "--do_train", *extra, cuda=True)  # fine with a CUDA build


def test_cpu_alternatives_are_accepted(tmp_path: Path, model_dir: str) -> None:
    data = make_data(tmp_path / "data", ["train.json"])
    runtime(model_dir, data, "--do_train", "--sharding", "stage1", "--bf16", "--fp16_opt_level", "O1")


# ----------------------------------------------------------------------------- exit codes


def test_exit_on_user_error_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = write_json(tmp_path / "c.json", {"output_dir": "o", "lora_rank": "abc"})

    @exit_on_user_error
    def main() -> None:
        parse([cfg])

    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2 == UserError.exit_code
    assert capsys.readouterr().err == f"error: argument 'lora_rank' in {cfg} expects int, got 'abc'\n"


def test_subprocess_exit_code_and_one_line_stderr(tmp_path: Path) -> None:
    cfg = write_json(tmp_path / "lora_argument.json", {"output_dir": str(tmp_path / "o"), "lora_rnak": 8})
    script = "import llm; from llm.config import parse_finetune_arguments as p; from llm.errors import exit_on_user_error as e; e(p)()"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-c", script, cfg, "--do_train"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: unknown argument 'lora_rnak' in {cfg} (did you mean 'lora_rank'?)"]
    assert "Traceback" not in proc.stderr


def test_zero_padding_and_prefix_model_types_match_the_family_table() -> None:
    from llm.model import FAMILIES

    assert {
        name for name, spec in FAMILIES.items() if spec.supports["zero_padding"]
    } == ZERO_PADDING_MODEL_TYPES
    assert {name for name, spec in FAMILIES.items() if spec.supports["prefix"]} == PREFIX_TUNING_MODEL_TYPES
