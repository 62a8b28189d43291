"""Argument dataclasses of the fine-tuning script (PaddleNLP 2.8 ``llm/argument.py`` names and defaults).

The fine-tuning script parses, in this order::

    GenerateArgument, QuantArgument, ModelArgument, DataArgument, FinetuneArguments

``FinetuneArguments`` is paddlenlp's ``TrainingArguments`` plus ``decay_steps`` (and the
``benchmark`` / ``autotuner_benchmark`` switches of ``llm/argument.py``), and it picks
``device="cpu"`` by itself on a CPU-only build of paddle.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

# (``llm/__init__`` with its zlib fix has already run: this module lives inside ``llm``.)
import paddle
from paddlenlp.trainer import TrainingArguments
from paddlenlp.trainer.trainer_utils import IntervalStrategy

from llm.config.ranges import check_ranges
from llm.errors import ConfigError

logger = logging.getLogger(__name__)

#: Parallel / precision settings as the user asked for them. paddlenlp's ``TrainingArguments``
#: silently resets the parallel degrees and ``sharding`` in a single-process run, so
#: :func:`llm.config.checks.check_runtime` looks at this copy instead.
REQUESTED_KEYS = (
    "tensor_parallel_degree",
    "pipeline_parallel_degree",
    "sep_parallel_degree",
    "sharding_parallel_degree",
    "sharding",
    "fp16",
    "bf16",
    "device",
)


@dataclass
class ModelKnobs:
    """The v2.8 performance switches of the fine-tuning and pretraining model arguments (copied onto the model
    config; the GPU-only ones are accepted and have no effect on CPU)."""

    use_flash_attention: bool = field(default=False, metadata={"help": "Use FlashAttention (GPU only)."})
    use_fused_rms_norm: bool = field(default=False, metadata={"help": "Use the fused RMSNorm kernel (GPU)."})
    fuse_attention_qkv: bool = field(default=False, metadata={"help": "Fuse the q/k/v projections."})
    fuse_attention_ffn: bool = field(default=False, metadata={"help": "Fuse the FFN gate/up projections."})
    recompute_granularity: str = field(
        default="full",
        metadata={"help": "Recompute granularity.", "choices": ["full", "full_attn", "core_attn"]},
    )
    virtual_pp_degree: int = field(default=1, metadata={"help": "Virtual pipeline degree (interleaved PP)."})
    sequence_parallel: bool = field(default=False, metadata={"help": "Sequence parallelism (with TP)."})
    fuse_sequence_parallel_allreduce: bool = field(
        default=False, metadata={"help": "Fuse the sequence-parallel all-reduce."}
    )
    use_fused_rope: bool = field(default=False, metadata={"help": "Use the fused RoPE kernel (GPU)."})
    no_recompute_layers: list[int] | None = field(
        default=None, metadata={"help": "Layer indices to skip when recompute is on."}
    )
    pp_recompute_interval: int = field(
        default=1, metadata={"help": "Recompute interval under pipeline parallel."}
    )
    recompute_use_reentrant: bool = field(default=False, metadata={"help": "Use the reentrant recompute."})
    hidden_dropout_prob: float = field(
        default=0.1, metadata={"help": "Hidden dropout, for models whose config uses it (e.g. GPT)."}
    )
    attention_probs_dropout_prob: float = field(
        default=0.1, metadata={"help": "Attention dropout, for models whose config uses it (e.g. GPT)."}
    )


@dataclass
class ModelArgument(ModelKnobs):
    """Which model to fine-tune and how (full / LoRA / prefix / quantized base weights)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Built-in (community) model name or path to a local model directory."}
    )
    weight_quantize_algo: str | None = field(
        default=None,
        metadata={
            "help": "Quantize the base weights for QLoRA-style training: nf4, fp4, weight_only_int8 or weight_only_int4."
        },
    )
    weight_blocksize: int = field(
        default=64, metadata={"help": "Block size for nf4/fp4 weight quantization."}
    )
    weight_double_quant: bool = field(
        default=False, metadata={"help": "Quantize the nf4/fp4 scales again (double quantization)."}
    )
    weight_double_quant_block_size: int = field(
        default=256, metadata={"help": "Block size of the double quantization of nf4/fp4 scales."}
    )

    # LoRA
    lora: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_path: str | None = field(
        default=None,
        metadata={"help": "Initialise LoRA from a saved LoRA directory (holds lora_config.json)."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised LoRA scaling (lora_alpha becomes 4 instead of 2r)."}
    )
    lora_plus_scale: float = field(
        default=1.0, metadata={"help": "LoRA+ learning-rate multiplier for the B matrices."}
    )
    pissa: bool = field(default=False, metadata={"help": "PiSSA (SVD) initialisation of the LoRA weights."})
    use_quick_lora: bool = field(
        default=False, metadata={"help": "Fused quick-LoRA kernel; only takes effect with LoRA dropout 0."}
    )

    # Prefix tuning
    prefix_tuning: bool = field(default=False, metadata={"help": "Train prefix-tuning parameters."})
    prefix_path: str | None = field(
        default=None,
        metadata={
            "help": "Initialise prefix tuning from a saved prefix directory (holds prefix_config.json)."
        },
    )
    num_prefix_tokens: int = field(default=128, metadata={"help": "Number of prefix tokens."})

    # AI Studio hub I/O (accepted for compatibility; this toolkit works offline)
    from_aistudio: bool = field(
        default=False, metadata={"help": "Load the model from AI Studio (needs network)."}
    )
    save_to_aistudio: bool = field(
        default=False, metadata={"help": "Upload the result to AI Studio (no-op here)."}
    )
    aistudio_repo_id: str | None = field(default=None, metadata={"help": "AI Studio repo id (no-op here)."})
    aistudio_repo_private: bool = field(default=True, metadata={"help": "Create a private AI Studio repo."})
    aistudio_repo_license: str = field(
        default="Apache License 2.0", metadata={"help": "License of the AI Studio repo."}
    )
    aistudio_token: str | None = field(default=None, metadata={"help": "AI Studio access token."})

    # NEFTune
    neftune: bool = field(
        default=False, metadata={"help": "Add NEFTune noise to the embedding output in training."}
    )
    neftune_noise_alpha: float = field(default=5.0, metadata={"help": "NEFTune noise magnitude alpha."})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class DataArgument:
    """Where the data lives and how examples are tokenized, truncated and packed."""

    dataset_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local dataset directory (train.json, dev.json, ...) or built-in dataset name."},
    )
    task_name: str | None = field(default=None, metadata={"help": "Sub-task of a built-in dataset."})
    zero_padding: bool = field(
        default=False, metadata={"help": "Pack several examples into one max_length sequence (Zero Padding)."}
    )
    src_length: int = field(
        default=1024, metadata={"help": "Max prompt tokens; prompts are truncated from the left."}
    )
    max_length: int = field(
        default=2048,
        metadata={"help": "Max prompt+answer tokens; also the packing length with zero_padding."},
    )
    eval_with_do_generation: bool = field(
        default=False,
        metadata={"help": "Evaluate with generate() and ROUGE/BLEU instead of teacher-forced accuracy."},
    )
    save_generation_output: bool = field(
        default=False, metadata={"help": "With generation eval, write generated_output.json."}
    )
    lazy: bool = field(
        default=False,
        metadata={"help": "Iterable (streaming) dataset instead of map-style; needs max_steps."},
    )
    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "Multi-turn template: None keeps the tokenizer's, 'none' removes it, the model path uses the "
            "model's own, a directory uses its chat_template.json, a file is loaded."
        },
    )
    pad_to_multiple_of: int | None = field(
        default=None, metadata={"help": "Pad batches to a multiple of this."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Directory where tokenized datasets are cached (None: no cache)."}
    )
    # deprecated aliases
    task_name_or_path: str | None = field(
        default=None, metadata={"help": "Deprecated alias of dataset_name_or_path."}
    )
    intokens: bool | None = field(default=None, metadata={"help": "Deprecated alias of zero_padding."})

    def __post_init__(self) -> None:
        if self.task_name_or_path is not None:
            logger.warning("`--task_name_or_path` is deprecated, please use `--dataset_name_or_path`.")
            self.dataset_name_or_path = self.task_name_or_path
        if self.intokens is not None:
            logger.warning("`--intokens` is deprecated, please use `--zero_padding`.")
            self.zero_padding = self.intokens
        check_ranges(self)


@dataclass
class QuantArgument:
    """Post-training quantization (PTQ, GPTQ) and quantization-aware training switches."""

    quant_type: str = field(
        default="a8w8", metadata={"help": "Quantization type: a8w8, wint4, wint8 (and a8w4 for QAT)."}
    )
    do_qat: bool = field(default=False, metadata={"help": "Quantization-aware training (not yet supported)."})
    do_ptq: bool = field(default=False, metadata={"help": "Post-training quantization."})
    ptq_step: int = field(default=32, metadata={"help": "Calibration forward steps for PTQ."})
    shift: bool = field(default=False, metadata={"help": "Shift (Outlier Suppression+) before PTQ."})
    shift_all_linears: bool = field(
        default=False, metadata={"help": "Also shift linears not preceded by LayerNorm."}
    )
    shift_sampler: str = field(
        default="ema", metadata={"help": "Sampler for shift.", "choices": ["ema", "none"]}
    )
    shift_step: int = field(default=32, metadata={"help": "Forward steps for shift."})
    smooth: bool = field(default=False, metadata={"help": "SmoothQuant before PTQ."})
    smooth_all_linears: bool = field(default=False, metadata={"help": "Smooth all linears."})
    smooth_sampler: str = field(
        default="none", metadata={"help": "Sampler for smooth.", "choices": ["none", "multi_step"]}
    )
    smooth_step: int = field(default=32, metadata={"help": "Forward steps for smooth."})
    smooth_piecewise_search: bool = field(
        default=False, metadata={"help": "PieceWiseSearch of alpha/scale per activation piece."}
    )
    smooth_k_piece: int = field(default=3, metadata={"help": "Number of pieces for the piecewise search."})
    smooth_search_piece: bool = field(
        default=False, metadata={"help": "Also search the number of pieces (slow)."}
    )
    do_gptq: bool = field(default=False, metadata={"help": "GPTQ weight-only (W4) quantization."})
    gptq_step: int = field(default=8, metadata={"help": "Forward steps per layer for GPTQ."})
    gptq_group_size: int = field(
        default=-1,
        metadata={"help": "GPTQ scale groups along the input: -1 per output channel, or e.g. 64, 128."},
    )
    gptq_bits: int = field(default=4, metadata={"help": "GPTQ weight bits: 4 (W4, PaddleNLP's) or 8."})
    gptq_act_order: bool = field(
        default=True, metadata={"help": "GPTQ: quantize columns by decreasing Hessian diagonal (act-order)."}
    )
    gptq_percdamp: float = field(
        default=0.1,
        metadata={"help": "GPTQ damping: this fraction of the mean Hessian diagonal is added to it."},
    )
    quant_group_size: int = field(
        default=-1,
        metadata={
            "help": "do_ptq with quant_type wint8/wint4 (round-to-nearest): -1 per channel, or e.g. 128."
        },
    )
    auto_clip: bool = field(default=False, metadata={"help": "AWQ-style auto clip before PTQ."})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class GenerateArgument:
    """Decoding settings; only used when ``eval_with_do_generation`` is on (sampling strategy)."""

    top_k: int = field(default=1, metadata={"help": "Top-k filtering in sampling (1 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Top-p (nucleus) filtering in sampling (1.0 = off)."})

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class FinetuneArguments(TrainingArguments):
    """paddlenlp ``TrainingArguments`` plus ``decay_steps``; ``device`` defaults to the available device."""

    decay_steps: int = field(
        default=0, metadata={"help": "LR decay steps (0: decay over all training steps)."}
    )
    benchmark: bool = field(
        default=False, metadata={"help": "Benchmark mode: report Effective_Tokens_per_second."}
    )
    autotuner_benchmark: bool = field(
        default=False,
        metadata={"help": "Autotuner benchmark: 5 steps, no eval/save/predict, overwrite the output dir."},
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Check the whole configuration, print the parallel layout (ranks -> dp/pp/sharding/tp groups, "
            "per-rank parameters and memory estimate) and exit without loading weights or training."
        },
    )
    # Redeclared: paddlenlp defaults to "gpu"; None means "gpu if paddle has CUDA, else cpu".
    device: str | None = field(
        default=None,
        metadata={
            "help": "cpu, gpu, xpu or npu; default: gpu when paddle is compiled with CUDA, otherwise cpu."
        },
    )

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = "gpu" if paddle.is_compiled_with_cuda() else "cpu"
        if isinstance(self.device, str):
            self.device = self.device.lower()
        if self.fp16 and self.bf16:
            raise ConfigError("fp16 and bf16 are both enabled; choose one of --fp16 or --bf16")
        self.requested: dict[str, Any] = {key: getattr(self, key) for key in REQUESTED_KEYS}
        check_ranges(self)  # before paddlenlp's __post_init__ reads (and resets) the values
        if (
            paddle.distributed.get_world_size() > 1
            and not paddle.is_compiled_with_cuda()
            and not self.dry_run
        ):
            # paddlenlp would call fleet.init for hybrid parallel here and fail obscurely on CPU.
            from llm.config.checks import check_device_support

            check_device_support(self, cuda_available=False)
        super().__post_init__()
        if self.autotuner_benchmark:
            self.max_steps = 5
            self.do_train = True
            self.do_export = False
            self.do_predict = False
            self.do_eval = False
            self.overwrite_output_dir = True
            self.load_best_model_at_end = False
            self.report_to = []
            if self.save_strategy in (IntervalStrategy.STEPS, IntervalStrategy.EPOCH):
                self.save_strategy = IntervalStrategy.NO
            if self.evaluation_strategy in (IntervalStrategy.STEPS, IntervalStrategy.EPOCH):
                self.evaluation_strategy = IntervalStrategy.NO


#: The dataclasses of the fine-tuning script, in PaddleNLP's order.
FINETUNE_ARGUMENT_TYPES = (GenerateArgument, QuantArgument, ModelArgument, DataArgument, FinetuneArguments)
