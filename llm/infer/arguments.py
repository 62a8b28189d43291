"""Arguments of ``predictor.py`` / ``export_model.py`` (spec §5.1, §6) and the rules that resolve them.

* Lengths (§5.2): checked against the model's position limit (``max_position_embeddings``, else
  ``max_sequence_length`` / ``seq_length`` / ``n_positions``; 2048 with a warning if none). With neither
  given, ``max_length = limit // 4`` and ``src_length = limit - max_length``; with one given, the other is
  the rest; with both, ``src_length + max_length`` must fit or a :class:`ConfigError` names the limit.
* Sampling settings left unset (None) come from the model's ``generation_config.json`` (``decode_strategy``
  or ``do_sample``, ``top_k``, ``top_p``, ``temperature``, ``repetition_penalty``, ``num_beams``), then from
  the spec defaults (sampling, top_k 0, top_p 0.7, temperature 0.95, repetition_penalty 1.0).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from llm.errors import ConfigError
from llm.fileio import load_json

logger = logging.getLogger(__name__)

STRATEGIES = ["greedy_search", "sampling", "beam_search"]
SAMPLING_DEFAULTS: dict[str, Any] = {
    "decode_strategy": "sampling",
    "top_k": 0,
    "top_p": 0.7,
    "temperature": 0.95,
    "repetition_penalty": 1.0,
    "num_beams": 1,
}
DEFAULT_POSITION_LIMIT = 2048
POSITION_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")


@dataclass
class PredictorArgument:
    """How to load the model and generate (CLI flags of ``predictor.py``)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model directory (paddlenlp or HF layout), or an exported static dir."},
    )
    model_prefix: str = field(default="model", metadata={"help": "File stem of the static model files."})
    src_length: int | None = field(
        default=None,
        metadata={"help": "Max prompt tokens (left-truncated); default: derived from the model."},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "Max NEW tokens; default: derived from the model's position limit."}
    )
    decode_strategy: str | None = field(
        default=None,
        metadata={
            "help": "greedy_search, sampling or beam_search (default: generation_config, else sampling).",
            "choices": STRATEGIES,
        },
    )
    top_k: int | None = field(default=None, metadata={"help": "Top-k sampling, 0 = off (default 0)."})
    top_p: float | None = field(default=None, metadata={"help": "Nucleus sampling threshold (default 0.7)."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature (default 0.95)."})
    repetition_penalty: float | None = field(
        default=None, metadata={"help": "Repetition penalty (default 1.0)."}
    )
    num_beams: int | None = field(default=None, metadata={"help": "Beams for beam_search (default 1)."})
    seed: int | None = field(default=None, metadata={"help": "Random seed for sampling."})
    device: str | None = field(
        default=None,
        metadata={
            "help": "gpu or cpu (default: gpu if paddle is compiled with CUDA, else cpu).",
            "choices": ["gpu", "cpu"],
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "float32, float16 or bfloat16 (default: the LoRA/prefix config's, else float32).",
            "choices": ["float32", "float16", "bfloat16"],
        },
    )
    lora_path: str | None = field(
        default=None, metadata={"help": "LoRA directory; merged in memory (dynamic)."}
    )
    merge_lora: bool = field(
        default=True,
        metadata={
            "help": "False: run the --lora_path adapter unmerged through the model's own forward, on the low-bit "
            "base it was trained on when it names one (weight_quantize_algo: the base stays 4 / 8-bit in memory); "
            "True: merge it in memory and decode on the fast engine."
        },
    )
    prefix_path: str | None = field(default=None, metadata={"help": "Prefix-tuning directory (dynamic)."})
    mode: str = field(
        default="dynamic",
        metadata={"help": "dynamic or static (an export_model.py output).", "choices": ["dynamic", "static"]},
    )
    batch_size: int = field(default=1, metadata={"help": "Prompts per batch."})
    benchmark: bool = field(default=False, metadata={"help": "Run the throughput benchmark."})
    benchmark_warmup: int = field(default=10, metadata={"help": "Benchmark warm-up passes."})
    benchmark_repeat: int = field(default=100, metadata={"help": "Benchmark timed passes."})
    chat_template: str | None = field(
        default=None,
        metadata={"help": "None: the model's template; 'none': no template; a directory or a template file."},
    )
    quant_type: str | None = field(
        default=None,
        metadata={
            "help": "weight_only_int8, weight_only_int4 or a8w8 (case-insensitive). A quantized model must match "
            "it; a float model is round-to-nearest quantized at load (weight-only types; a8w8 needs do_ptq)."
        },
    )
    quant_group_size: int = field(
        default=-1,
        metadata={
            "help": "--quant_type on a float model: -1 per channel, or groups of e.g. 64 / 128 inputs."
        },
    )
    quant_lm_head: bool = field(
        default=False,
        metadata={
            "help": "The engine reads the LM head from an int8 per-channel copy (4x fewer bytes per decode step; "
            "llama.cpp's quantized files quantize it too). Off: the float head, as PaddleNLP's weight-only models."
        },
    )
    inference_model: bool = field(
        default=False,
        metadata={
            "help": "PaddleNLP's high-performance predictor: here the toolkit's own engine (the default)."
        },
    )
    block_attn: bool = field(default=False, metadata={"help": "Not available: block (paged) attention."})
    block_size: int = field(default=64, metadata={"help": "Block size of --block_attn (unused here)."})
    cachekv_int8_type: str | None = field(default=None, metadata={"help": "Not available: int8 KV cache."})

    def __post_init__(self) -> None:
        from llm.infer.quantized import check_group_size, normalize_quant_type

        self.quant_type = normalize_quant_type(self.quant_type)
        self.quant_group_size = check_group_size(self.quant_group_size)
        if self.quant_group_size != -1 and self.quant_type == "a8w8":
            raise ConfigError("--quant_group_size applies to weight_only_int8 / weight_only_int4, not a8w8")
        if self.block_attn:
            raise ConfigError(
                "block_attn is not available in this toolkit (block attention needs the CUDA custom ops of "
                "paddlenlp_ops); the engine keeps one growing KV buffer per layer instead: leave --block_attn unset"
            )
        if self.cachekv_int8_type is not None and str(self.cachekv_int8_type).lower() not in ("none", ""):
            raise ConfigError(
                f"cachekv_int8_type {self.cachekv_int8_type!r} is not available in this toolkit (the KV cache is "
                "float32); leave --cachekv_int8_type unset"
            )
        self.cachekv_int8_type = None
        if int(self.batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("src_length", "max_length"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.lora_path and self.prefix_path:
            raise ConfigError("lora_path and prefix_path cannot be used together; choose one")
        if not self.merge_lora and self.quant_type is not None:
            raise ConfigError(
                "--quant_type quantizes the merged model: it cannot be combined with --merge_lora false"
            )


@dataclass
class ModelArgument:
    """Data input/output of ``predictor.py``."""

    model_type: str | None = field(default=None, metadata={"help": "Reserved (gpt-3 / img2txt models)."})
    data_file: str | None = field(default=None, metadata={"help": "JSONL file with src (and tgt) fields."})
    output_file: str = field(default="output.json", metadata={"help": "Where the predictions are written."})

    def __post_init__(self) -> None:
        if self.model_type is not None:
            raise ConfigError(
                f"model_type {self.model_type!r} is not available in this toolkit; the family is read from "
                "the model's config.json, leave --model_type unset"
            )


@dataclass
class ExportArgument:
    """Where ``export_model.py`` writes the static model."""

    output_path: str = field(metadata={"help": "Output directory of the static model (required)."})
    overwrite: bool = field(
        default=False,
        metadata={
            "help": "Write into an existing non-empty output_path (only files this toolkit wrote are replaced)."
        },
    )


# ------------------------------------------------------------------------------------------ resolving
def position_limit(config: Any) -> int:
    """The model's position limit from a config object or dict (2048 with a warning if absent)."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    for key in POSITION_KEYS:
        value = get(key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    logger.warning("the model config has no max_position_embeddings; assuming %d", DEFAULT_POSITION_LIMIT)
    return DEFAULT_POSITION_LIMIT


def resolve_lengths(
    src_length: int | None, max_length: int | None, limit: int, reserved: int = 0, what: str = "the model"
) -> tuple[int, int]:
    """``(src_length, max_length)`` per spec §5.2; ``reserved`` positions (prefix tokens) are taken off first."""
    room = limit - reserved
    where = f"{what}'s position limit {limit}" + (f" minus {reserved} prefix tokens" if reserved else "")
    if src_length is None and max_length is None:
        max_length = max(1, room // 4)
        src_length = room - max_length
    elif src_length is None:
        src_length = room - int(max_length)  # type: ignore[arg-type]
    elif max_length is None:
        max_length = room - int(src_length)
    src_length, max_length = int(src_length), int(max_length)  # type: ignore[arg-type]
    if src_length < 1 or max_length < 1 or src_length + max_length > room:
        raise ConfigError(
            f"src_length ({src_length}) + max_length ({max_length}) = {src_length + max_length} exceeds "
            f"{where} ({room} tokens); lower --src_length or --max_length"
        )
    return src_length, max_length


def read_generation_defaults(directory: str) -> dict[str, Any]:
    """Sampling defaults from ``directory/generation_config.json`` (keys of :data:`SAMPLING_DEFAULTS`)."""
    path = os.path.join(directory, "generation_config.json")
    gen = load_json(path, error=ConfigError) if os.path.isfile(path) else {}
    if not isinstance(gen, dict):
        return {}
    out: dict[str, Any] = {}
    if gen.get("decode_strategy") in STRATEGIES:
        out["decode_strategy"] = gen["decode_strategy"]
    elif isinstance(gen.get("do_sample"), bool):
        beams = gen.get("num_beams")
        greedy = "beam_search" if isinstance(beams, int) and beams > 1 else "greedy_search"
        out["decode_strategy"] = "sampling" if gen["do_sample"] else greedy
    for key, kind in (
        ("top_k", int),
        ("num_beams", int),
        ("top_p", float),
        ("temperature", float),
        ("repetition_penalty", float),
    ):
        value = gen.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = kind(value)
    return out


def sampling_settings(args: PredictorArgument, model_dir: str) -> dict[str, Any]:
    """The effective decode settings: CLI value, else generation_config.json, else the spec default."""
    from_file = read_generation_defaults(model_dir)
    out = {}
    for key, default in SAMPLING_DEFAULTS.items():
        value = getattr(args, key)
        out[key] = value if value is not None else from_file.get(key, default)
    if out["decode_strategy"] == "beam_search" and int(out["num_beams"]) < 2:
        raise ConfigError("decode_strategy beam_search needs --num_beams 2 or more")
    return out
