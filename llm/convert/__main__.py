"""``python -m llm.convert --model_name_or_path SRC --output_path DST [--to paddle|hf] [--dtype ...]``.

The direction defaults to the other layout of SRC: a Hugging Face directory becomes a paddlenlp one and
vice versa.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import llm  # noqa: F401  (zlib fix before paddle)
from llm.config.parser import parse_arguments
from llm.convert.checkpoint import detect_layout
from llm.convert.core import convert_hf_to_paddle, export_paddle_to_hf
from llm.errors import ConfigError, ModelError, exit_on_user_error


@dataclasses.dataclass
class ConvertArguments:
    """Command-line arguments of ``python -m llm.convert``."""

    model_name_or_path: str = dataclasses.field(metadata={"help": "source model directory (HF or paddlenlp)"})
    output_path: str = dataclasses.field(
        metadata={"help": "directory to write (must not exist unless --overwrite)"}
    )
    to: str = dataclasses.field(
        default="auto", metadata={"help": "target layout", "choices": ["auto", "paddle", "hf"]}
    )
    dtype: str | None = dataclasses.field(
        default=None,
        metadata={
            "help": "float32 | float16 | bfloat16 (default: float32 for paddle, the stored dtype for hf)",
            "choices": ["float32", "float16", "bfloat16"],
        },
    )
    overwrite: bool = dataclasses.field(default=False, metadata={"help": "replace an existing output_path"})
    max_shard_size: str = dataclasses.field(
        default="10GB", metadata={"help": "largest output file, e.g. 5GB"}
    )
    progress: bool = dataclasses.field(default=True, metadata={"help": "show a progress bar"})


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> str:
    """Run the converter; returns the written directory."""
    (args,) = parse_arguments(ConvertArguments, argv)
    layout = detect_layout(args.model_name_or_path)
    if layout is None:
        raise ModelError(f"{args.model_name_or_path}: no model weights found (is it a model directory?)")
    target = {"hf": "paddle", "paddle": "hf"}[layout] if args.to == "auto" else args.to
    if target == layout:
        raise ConfigError(f"{args.model_name_or_path} is already a {layout} directory; nothing to convert")
    if target == "paddle":
        out = convert_hf_to_paddle(
            args.model_name_or_path, args.output_path, args.dtype or "float32", args.overwrite, args.progress
        )
    else:
        out = export_paddle_to_hf(
            args.model_name_or_path, args.output_path, args.dtype, args.overwrite, args.progress
        )
    print(f"wrote {target} model to {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
