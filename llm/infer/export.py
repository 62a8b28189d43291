"""``export_model.py``: write a static model that ``predictor.py --mode static`` runs (spec §6).

The output directory gets the static program/parameters (:func:`llm.infer.static.export_engine`),
``config.json``, ``generation_config.json``, the tokenizer files, the chat template and
``export_info.json`` (the export-time ``src_length``/``max_length``, the static predictor's defaults). LoRA is merged
before export; a quantized model (or ``--quant_type``, see :mod:`llm.infer.quantized`) is exported with its low-bit
weights as int8 / uint8 parameters; a prefix-tuned model is exported with its prefix key/values (the engine stores them). Everything is written to
a staged directory published by the output-path policy of :mod:`llm.outputs`: the output may not be or
overlap the model or adapter directories, an existing non-empty one needs ``--overwrite``, and an interrupted
export never leaves a half-written model behind.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import llm  # noqa: F401  (zlib fix before paddle)
from llm.errors import ConfigError, ModelError, exit_on_user_error
from llm.fileio import try_read_json, write_json
from llm.infer.arguments import ExportArgument, ModelArgument, PredictorArgument
from llm.outputs import check_output_path, require_complete, staged_output

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
EXPORT_INFO = "export_info.json"  # the export-time src_length/max_length: static predict defaults


def check_static_dir(path: str, model_prefix: str = "model") -> None:
    """Raise one :class:`ModelError` listing what an exported directory lacks.

    The static files' stem is the one recorded in ``engine.json`` (``model_prefix`` when there is none).
    """
    from llm.infer.static import META_FILE
    from llm.model.loading import WEIGHT_FILES

    require_complete(path)
    stem = try_read_json(os.path.join(path, META_FILE)).get("model_prefix", model_prefix)
    names = ("config.json", f"{stem}.pdmodel", f"{stem}.pdiparams", META_FILE)
    missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
    if not any(os.path.isfile(os.path.join(path, n)) for n in TOKENIZER_FILES):
        missing.append("tokenizer files")
    dynamic = any(os.path.isfile(os.path.join(path, n)) for n in WEIGHT_FILES)
    if missing and dynamic and not os.path.isfile(os.path.join(path, META_FILE)):
        raise ModelError(
            f"{path}: not an exported static model (no {META_FILE}); drop --mode static to run it as it is, "
            f"or export it first: export_model.py --model_name_or_path {path} "
            f"--output_path {os.path.normpath(path)}_static"
        )
    if missing:
        raise ModelError(
            f"{path}: not a complete static model, missing {', '.join(missing)}; export it again with "
            "export_model.py --model_name_or_path MODEL --output_path DIR"
        )


def read_export_info(path: str) -> dict[str, Any]:
    """``export_info.json`` of an exported directory (``{}`` if absent or unreadable)."""
    return try_read_json(os.path.join(path, EXPORT_INFO))


def export(args: PredictorArgument, output_path: str, overwrite: bool = False) -> str:
    """Load (and LoRA-merge) the model of ``args`` and write the static model to ``output_path``."""
    from llm.infer import static
    from llm.infer.predictor import load_dynamic, require_model_dir, set_device
    from llm.quant.model import read_quantization_config

    path = require_model_dir(args.model_name_or_path)
    if args.mode == "static":
        raise ConfigError("export_model.py exports a dynamic model; drop --mode static")
    static.check_stem(args.model_prefix)
    inputs = (path, args.lora_path, args.prefix_path)
    output_path = check_output_path(output_path, inputs=inputs, overwrite=overwrite, what="output_path")
    set_device(args.device)
    tokenizer, model, src_length, max_length, dtype = load_dynamic(args, path)
    stored = read_quantization_config(model.config)
    quant_type = None if stored is None else stored.quant_type

    with staged_output(output_path, writer="export_model", inputs=inputs, overwrite=overwrite) as tmp:
        static.export_engine(
            model,
            tmp,
            max_seq_len=src_length + max_length,
            dtype=dtype,
            model_prefix=args.model_prefix,
            quant_lm_head=args.quant_lm_head,
        )
        model.config.save_pretrained(tmp)
        generation = os.path.join(path, "generation_config.json")
        if os.path.isfile(generation):
            shutil.copyfile(generation, os.path.join(tmp, "generation_config.json"))
        tokenizer.save_pretrained(tmp)
        info = {
            "src_length": src_length,
            "max_length": max_length,
            "dtype": dtype,
            "model": os.path.abspath(path),
            "lora_path": args.lora_path,
            "prefix_path": args.prefix_path,
            "quant_type": quant_type,
            "quant_lm_head": bool(args.quant_lm_head),
        }
        write_json(os.path.join(tmp, EXPORT_INFO), info)
        check_static_dir(tmp, args.model_prefix)
    quant = "" if quant_type is None else f", {quant_type} weights kept low-bit"
    print(
        f"exported static model to {output_path} (max_seq_len={src_length + max_length}, dtype={dtype}{quant})"
    )
    return output_path


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """``python export_model.py --model_name_or_path DIR [--lora_path L] --output_path OUT``."""
    from llm.config.parser import parse_arguments

    args, _model_args, export_args = parse_arguments((PredictorArgument, ModelArgument, ExportArgument), argv)
    if not export_args.output_path:
        raise ConfigError("missing required argument 'output_path' (pass --output_path DIR)")
    if not args.model_name_or_path:
        raise ModelError("missing required argument 'model_name_or_path' (pass --model_name_or_path DIR)")
    export(args, export_args.output_path, overwrite=export_args.overwrite)
