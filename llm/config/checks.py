"""Cross-field checks that run before any weights load.

* :func:`check_static` looks only at the argument values (no filesystem, no device); it is
  also used to validate the shipped JSON files.
* :func:`check_runtime` looks at the model directory's ``config.json`` (never the weights),
  the dataset directory, adapter directories and the device paddle was built for.

Every failure raises a :class:`~llm.errors.UserError` subclass with one sentence and a fix.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Any

from llm.config.ranges import check_ranges
from llm.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)

#: Model types whose example converter supports zero padding (packed sequences).
# kept import-light (no paddle); tests assert it equals the families whose FamilySpec supports zero_padding
ZERO_PADDING_MODEL_TYPES = frozenset(
    {"llama", "qwen", "chatglm", "chatglm_v2", "bloom", "gpt", "mixtral", "glm"}
)
#: Model types that support prefix tuning (tests assert it equals the families whose FamilySpec supports prefix).
PREFIX_TUNING_MODEL_TYPES = frozenset(
    {"llama", "qwen", "chatglm", "chatglm_v2", "bloom", "gpt", "opt", "mixtral"}
)
#: Allowed ``ModelArgument.weight_quantize_algo`` values (None = no base-weight quantization).
WEIGHT_QUANTIZE_ALGOS = ("nf4", "fp4", "weight_only_int8", "weight_only_int4")
#: Allowed ``QuantArgument.quant_type`` values (compared case-insensitively).
QUANT_TYPES = ("a8w8", "wint4", "wint8", "a8w4")

_MODES = ("do_train", "do_ptq", "do_gptq", "do_qat")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return getattr(obj, name, default) if obj is not None else default


def _strategy(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


# ----------------------------------------------------------------------------- static


def check_static(model_args: Any, data_args: Any, quant_args: Any, training_args: Any) -> None:
    """Validate argument combinations without touching files or devices; raises ConfigError.

    Any argument may be None (e.g. a script without quantization passes ``quant_args=None``). Numeric
    options are checked against :data:`llm.config.ranges.RANGES` first (again: the values paddlenlp's
    ``__post_init__`` settled on, e.g. ``evaluation_strategy`` turned to ``steps`` by ``do_eval``).
    """
    check_ranges(model_args, data_args, quant_args, training_args)
    if _get(model_args, "lora") and _get(model_args, "prefix_tuning"):
        raise ConfigError("lora and prefix_tuning are both enabled; choose one of --lora or --prefix_tuning")

    requested = dict(_get(training_args, "requested", None) or {})
    pp_degree = requested.get("pipeline_parallel_degree", _get(training_args, "pipeline_parallel_degree", -1))
    if _get(model_args, "prefix_tuning") and (pp_degree or -1) > 1:
        raise ConfigError(
            "prefix_tuning does not support pipeline parallelism; set --pipeline_parallel_degree 1"
        )

    modes = [m for m in _MODES if _get(training_args, m) or _get(quant_args, m)]
    if len(modes) > 1:
        raise ConfigError(
            f"{' and '.join(modes)} are enabled together, but at most one of do_train/do_ptq/do_gptq/do_qat may be "
            "true; run them as separate jobs"
        )

    fp16, bf16 = bool(_get(training_args, "fp16")), bool(_get(training_args, "bf16"))
    if fp16 and bf16:
        raise ConfigError("fp16 and bf16 are both enabled; choose one of --fp16 or --bf16")
    if _get(training_args, "fp16_opt_level") == "O2" and not (fp16 or bf16):
        raise ConfigError(
            "fp16_opt_level O2 needs --fp16 or --bf16 (O2 loads the model in half precision); "
            "add --bf16 true or set --fp16_opt_level O1"
        )

    src_length, max_length = _get(data_args, "src_length"), _get(data_args, "max_length")
    if src_length is not None and max_length is not None and src_length >= max_length:
        raise ConfigError(
            f"src_length ({src_length}) must be smaller than max_length ({max_length}), which bounds prompt + "
            "answer; raise --max_length or lower --src_length"
        )

    if _get(data_args, "zero_padding"):
        if _get(data_args, "eval_with_do_generation"):
            logger.warning("zero_padding with eval_with_do_generation: the eval set will not be packed")
        if (_get(training_args, "per_device_train_batch_size") or 1) > 1:
            logger.warning(
                "zero_padding packs examples into max_length sequences; per_device_train_batch_size 1 is usual"
            )

    if _get(data_args, "lazy"):
        if (_get(training_args, "max_steps") or -1) <= 0:
            raise ConfigError(
                "lazy (streaming) datasets have no length, so --max_steps must be set to a positive number"
            )
        for name in ("evaluation_strategy", "save_strategy"):
            if _strategy(_get(training_args, name)) == "epoch":
                logger.warning("lazy datasets have no epochs; use --%s steps", name)

    algo = _get(model_args, "weight_quantize_algo")
    if algo is not None and algo not in WEIGHT_QUANTIZE_ALGOS:
        raise ConfigError(
            f"weight_quantize_algo {algo!r} is not supported; use one of {', '.join(WEIGHT_QUANTIZE_ALGOS)} "
            "or leave it unset"
        )

    quant_type = _get(quant_args, "quant_type")
    if quant_args is not None and (not isinstance(quant_type, str) or quant_type.lower() not in QUANT_TYPES):
        raise ConfigError(f"quant_type {quant_type!r} is not supported; use one of {', '.join(QUANT_TYPES)}")

    needs_data = modes or _get(training_args, "do_eval") or _get(training_args, "do_predict")
    if data_args is not None and needs_data and not _get(data_args, "dataset_name_or_path"):
        raise ConfigError("dataset_name_or_path is required; pass --dataset_name_or_path DIR")
    if model_args is not None and not _get(model_args, "model_name_or_path"):
        raise ConfigError("model_name_or_path is required; pass --model_name_or_path NAME_OR_DIR")


# ----------------------------------------------------------------------------- model directory


def _looks_local(name: str) -> bool:
    """True for explicit filesystem paths (./x, ../x, /x, ~/x, a/b/c, x\\y); False for hub ids (org/name)."""
    if name.startswith((".", "/", "~")) or "\\" in name or os.path.isabs(name):
        return True
    return name.count("/") >= 2 or name.endswith("/")


def resolve_model_dir(model_name_or_path: str) -> str:
    """Return the local directory for a model path or a hub id already in the PaddleNLP cache.

    Raises ModelError ``model directory not found: X`` otherwise (no hub is reachable here).
    """
    expanded = os.path.expanduser(model_name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise ModelError(f"model directory not found: {model_name_or_path} is a file, not a model directory")
    if not _looks_local(model_name_or_path):
        from paddlenlp.utils.env import MODEL_HOME

        cached = os.path.join(MODEL_HOME, model_name_or_path)
        if os.path.isfile(os.path.join(cached, "config.json")):
            return cached
        raise ModelError(
            f"model directory not found: {model_name_or_path} (not a local directory and not in the PaddleNLP "
            f"cache {MODEL_HOME}); pass --model_name_or_path with a local model directory"
        )
    raise ModelError(f"model directory not found: {model_name_or_path}")


_ARCHITECTURE_TYPES = {
    "chatglmv2": "chatglm_v2",
    "chatglm": "chatglm",
    "qwen": "qwen",
    "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe",
    "llama": "llama",
    "baichuan": "llama",
    "bloom": "bloom",
    "mixtral": "mixtral",
    "mistral": "mistral",
    "opt": "opt",
    "gpt": "gpt",
    "gpt2": "gpt",
    "glm": "glm",
    "gemma": "gemma",
}


def guess_model_type(architecture: str) -> str:
    """Guess a model type from a class name, e.g. ``ChatGLMv2ForCausalLM`` -> ``chatglm_v2``."""
    stem = re.sub(r"(For\w+|LMHeadModel|PretrainedModel|PreTrainedModel|Model)$", "", architecture)
    key = stem.lower()
    return _ARCHITECTURE_TYPES.get(key, key)


def read_model_type(model_name_or_path: str) -> str:
    """Read ``model_type`` from the model's ``config.json`` (no weights), else guess it from ``architectures[0]``."""
    model_dir = resolve_model_dir(model_name_or_path)
    for name in ("config.json", "model_config.json"):
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            break
    else:
        raise ModelError(
            f"{os.path.join(model_dir, 'config.json')} not found; is {model_name_or_path} a model directory?"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} must hold a JSON object")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return model_type
    architectures = config.get("architectures") or []
    candidates = [a for a in architectures if isinstance(a, str)] + [config.get("init_class") or ""]
    for arch in candidates:
        if arch:
            return guess_model_type(arch)
    raise ModelError(f"cannot tell the model type: {path} has neither 'model_type' nor 'architectures'")


# ----------------------------------------------------------------------------- dataset discovery


def _json_files(directory: str) -> list[str]:
    return sorted(glob.glob(os.path.join(directory, "*.json")))


def _is_builtin_dataset(name: str) -> bool:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        return False
    import importlib.util

    try:
        return importlib.util.find_spec(f"paddlenlp.datasets.{name}") is not None
    except ImportError:
        return False


def required_dataset_files(data_args: Any, quant_args: Any, training_args: Any) -> dict[str, list[str]]:
    """Check the dataset directory (spec §3.6 discovery order) and return the files per split.

    Keys are ``train``, ``dev``, ``quant`` and ``test`` for the splits the enabled phases need.
    Raises DataError naming the first missing file or directory.
    """
    name = _get(data_args, "dataset_name_or_path")
    root = os.path.expanduser(str(name))
    do_train = bool(_get(training_args, "do_train") or _get(quant_args, "do_qat"))
    do_eval = bool(_get(training_args, "do_eval"))
    do_calib = bool(_get(quant_args, "do_ptq") or _get(quant_args, "do_gptq"))
    do_predict = bool(_get(training_args, "do_predict"))
    if not os.path.isdir(root):
        if _is_builtin_dataset(str(name)):
            logger.warning("%s is a built-in paddlenlp dataset name; it will be downloaded", name)
            return {}
        raise DataError(
            f"dataset directory not found: {name}; pass --dataset_name_or_path with a local directory"
        )

    files: dict[str, list[str]] = {}
    single = {split: os.path.join(root, f"{split}.json") for split in ("train", "dev", "quant", "test")}
    subdir = {split: os.path.join(root, split) for split in ("train", "dev", "quant")}
    if any(os.path.isfile(single[s]) for s in ("train", "dev", "quant")):
        have = {s: [p] for s, p in single.items() if os.path.isfile(p)}
        layout = "file"
    elif any(os.path.isdir(subdir[s]) for s in ("train", "dev", "quant")):
        have = {s: _json_files(d) for s, d in subdir.items() if os.path.isdir(d)}
        layout = "dir"
    else:
        have, layout = {}, "none"

    def missing(split: str) -> DataError:
        if layout == "dir":
            where = os.path.join(root, split)
            what = f"{where}/ holds no *.json files" if os.path.isdir(where) else f"{where}/ not found"
            return DataError(f"{what}; add {split} data as JSON lines (or use {single[split]})")
        return DataError(f"{single[split]} not found; add {split} data as JSON lines")

    if do_train:
        if not have.get("train"):
            raise missing("train")
        files["train"] = have["train"]
    if do_eval:
        if not have.get("dev"):
            raise missing("dev")
        files["dev"] = have["dev"]
    if do_calib:
        if have.get("quant"):
            files["quant"] = have["quant"]
        elif have.get("train"):
            files["quant"] = have["train"]
        else:
            quant = single["quant"] if layout != "dir" else subdir["quant"] + "/"
            raise DataError(f"{quant} not found (and no train data to calibrate with); add calibration data")
    if do_predict:
        if not os.path.isfile(single["test"]):
            raise DataError(f"{single['test']} not found; add test data as JSON lines or drop --do_predict")
        files["test"] = [single["test"]]
    return files


# ----------------------------------------------------------------------------- device


def _sharding_stages(value: Any) -> set[str]:
    if isinstance(value, bool):
        return {"stage1"} if value else set()
    if isinstance(value, str):
        return set(value.split())
    if isinstance(value, list | tuple):
        return {str(getattr(v, "value", v)) for v in value}
    return set()


def check_device_support(training_args: Any, cuda_available: bool | None = None) -> None:
    """Reject GPU-only settings when paddle has no CUDA; uses the values the user requested."""
    if cuda_available is None:
        import paddle

        cuda_available = paddle.is_compiled_with_cuda()
    if cuda_available or _get(training_args, "dry_run"):  # a dry run reports GPU-only layouts instead
        return
    req = dict(getattr(training_args, "requested", None) or {})

    def value(name: str, default: Any = None) -> Any:
        return req[name] if name in req else _get(training_args, name, default)

    device = str(value("device") or "cpu").lower()
    if device.startswith("gpu"):
        raise ConfigError("--device gpu needs a GPU, but this paddle build has no CUDA; use --device cpu")
    for name, label in (
        ("tensor_parallel_degree", "tensor parallelism"),
        ("pipeline_parallel_degree", "pipeline parallelism"),
        ("sep_parallel_degree", "sequence parallelism"),
    ):
        degree = value(name, -1)
        if degree is not None and degree > 1:
            raise ConfigError(
                f"{name}={degree} ({label}) needs a GPU, but this paddle build has no CUDA; set --{name} 1 and "
                "use data parallel or --sharding stage1 over gloo instead"
            )
    stages = _sharding_stages(value("sharding", "")) & {"stage2", "stage3"}
    if stages:
        raise ConfigError(
            f"sharding {'/'.join(sorted(stages))} needs a GPU, but this paddle build has no CUDA; use --sharding "
            "stage1 (over gloo) or plain data parallel"
        )
    if value("fp16"):
        raise ConfigError(
            "fp16 training needs a GPU, but this paddle build has no CUDA; use --bf16 true or fp32"
        )


def check_training_dtype(training_args: Any, cuda_available: bool | None = None) -> None:
    """Refuse pure bfloat16 training without CUDA: ``--bf16`` with ``--fp16_opt_level O2`` loads and trains the
    model in bfloat16, and paddle 2.6 has no CPU bfloat16 kernels for training (random init, matmul, softmax).
    With O1 paddle's AMP is off on CPU (training runs in float32): accepted, with a warning."""
    if cuda_available is None:
        import paddle

        cuda_available = paddle.is_compiled_with_cuda()
    req = dict(getattr(training_args, "requested", None) or {})
    bf16 = req["bf16"] if "bf16" in req else _get(training_args, "bf16")
    if cuda_available or not bf16:
        return
    if _get(training_args, "fp16_opt_level") == "O2":
        raise ConfigError(
            "--bf16 with --fp16_opt_level O2 trains in pure bfloat16, which needs a GPU: paddle 2.6 has no CPU "
            "bfloat16 training kernels; on CPU set --fp16_opt_level O1 (AMP is then off: float32 training) or "
            "--bf16 false"
        )
    logger.warning("--bf16 has no effect on CPU (paddle's AMP runs on GPUs only): training runs in float32")


# ----------------------------------------------------------------------------- runtime


def check_runtime(
    model_args: Any,
    data_args: Any,
    quant_args: Any,
    training_args: Any,
    *,
    cuda_available: bool | None = None,
) -> str | None:
    """Check device support, model dir, adapters and dataset files; return the model type.

    Reads only ``config.json`` files, never weights. ``cuda_available`` overrides
    ``paddle.is_compiled_with_cuda()`` (for tests).
    """
    check_device_support(training_args, cuda_available=cuda_available)
    check_training_dtype(training_args, cuda_available=cuda_available)

    model_type = None
    name = _get(model_args, "model_name_or_path")
    if model_args is not None:
        if not name:
            raise ConfigError("model_name_or_path is required; pass --model_name_or_path NAME_OR_DIR")
        model_type = read_model_type(name)

    if (
        _get(data_args, "zero_padding")
        and model_type is not None
        and model_type not in ZERO_PADDING_MODEL_TYPES
    ):
        raise ConfigError(
            f"zero_padding is not supported for model type {model_type!r} (supported: "
            f"{', '.join(sorted(ZERO_PADDING_MODEL_TYPES))}); set --zero_padding false"
        )
    if (
        _get(model_args, "prefix_tuning")
        and model_type is not None
        and model_type not in PREFIX_TUNING_MODEL_TYPES
    ):
        raise ConfigError(
            f"prefix_tuning is not supported for model type {model_type!r} (supported: "
            f"{', '.join(sorted(PREFIX_TUNING_MODEL_TYPES))}); use --lora true or full fine-tuning instead"
        )

    for arg, config_name in (("lora_path", "lora_config.json"), ("prefix_path", "prefix_config.json")):
        path = _get(model_args, arg)
        if not path:
            continue
        expanded = os.path.expanduser(path)
        if not os.path.isdir(expanded):
            raise ModelError(f"{arg} directory not found: {path}")
        if not os.path.isfile(os.path.join(expanded, config_name)):
            raise ModelError(
                f"{os.path.join(path, config_name)} not found; is {path} a saved {arg[:-5]} checkpoint?"
            )

    phases = ("do_train", "do_eval", "do_predict")
    if data_args is not None and (
        any(_get(training_args, p) for p in phases) or any(_get(quant_args, m) for m in _MODES)
    ):
        if not _get(data_args, "dataset_name_or_path"):
            raise ConfigError("dataset_name_or_path is required; pass --dataset_name_or_path DIR")
        required_dataset_files(data_args, quant_args, training_args)
    return model_type
