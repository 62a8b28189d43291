"""Argument dataclasses of ``run_pretrain.py`` (PaddleNLP 2.8 ``llm/run_pretrain.py`` names and defaults, spec §2.1).

The script parses, in this order::

    PretrainModelArguments, PretrainDataArguments, PreTrainingArguments

through the same parser as fine-tuning (:func:`llm.config.parse_arguments`: unknown keys are refused with a
"did you mean"). ``PreTrainingArguments`` is the fine-tuning ``FinetuneArguments`` (paddlenlp's
``TrainingArguments`` + ``decay_steps``, device auto-detection, ``dry_run``) plus ``min_learning_rate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.config.arguments import FinetuneArguments, ModelKnobs
from llm.config.ranges import check_ranges


@dataclass
class PretrainModelArguments(ModelKnobs):
    """Which model to pretrain: a config to initialise from, or weights to continue from."""

    model_name_or_path: str = field(
        default="__internal_testing__/tiny-random-llama",
        metadata={"help": "Model directory: its config.json (and its weights with continue_training)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory (default: model_name_or_path)."}
    )
    continue_training: bool = field(
        default=False,
        metadata={
            "help": "Load the model's weights and continue training them; False initialises from the config "
            "(vocab padded to a multiple of 128, max_position_embeddings raised to max_seq_length)."
        },
    )
    use_fast_layer_norm: bool = field(
        default=False, metadata={"help": "Fast LayerNorm kernel for GPT-style models (GPU)."}
    )

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class PretrainDataArguments:
    """Where the token files are and how samples are cut from them."""

    input_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder of <prefix>.bin/.idx (or legacy _ids.npy/_idx.npz) token files, or a weighted list "
            "'w1 prefix1 w2 prefix2 ...'."
        },
    )
    split: str = field(default="949,50,1", metadata={"help": "Train,validation,test ratio of the documents."})
    max_seq_length: int = field(
        default=1024, metadata={"help": "Tokens per sample; also becomes the model config's seq_length."}
    )
    share_folder: bool = field(
        default=False,
        metadata={"help": "The index cache is on a disk all nodes share: only global rank 0 builds it."},
    )
    data_impl: str = field(
        default="mmap", metadata={"help": "Format of the token files.", "choices": ["mmap", "lazy"]}
    )
    skip_warmup: bool = field(default=True, metadata={"help": "Skip the mmap warm-up (accepted; no effect)."})
    data_cache: str | None = field(
        default=None,
        metadata={"help": "Directory of the index cache (unused if <input folder>/index-cache exists)."},
    )

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class PreTrainingArguments(FinetuneArguments):
    """Training arguments of pretraining: the fine-tuning ones plus the schedule's floor."""

    min_learning_rate: float = field(
        default=1e-5, metadata={"help": "Floor of the cosine / linear warmup-decay learning-rate schedule."}
    )
    enable_linear_fused_grad_add: bool = field(
        default=False, metadata={"help": "Fused gradient accumulation in Linear (GPU; accepted, no effect)."}
    )


#: The dataclasses of the pretraining script, in PaddleNLP's order.
PRETRAIN_ARGUMENT_TYPES = (PretrainModelArguments, PretrainDataArguments, PreTrainingArguments)
