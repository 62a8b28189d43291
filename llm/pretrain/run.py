"""The pretraining workflow behind ``run_pretrain.py`` (spec §2).

Order of work: parse + validate every option (config.json only, no weights) -> tokenizer -> datasets (index cache
built once) -> model (from the config, or its weights with ``continue_training``) -> Trainer -> train with
automatic resume -> save (output-path policy, completion markers) -> metrics JSON + loss curve -> eval / test.
"""

from __future__ import annotations

import math
import os
from typing import Any

import paddle
from paddlenlp.trainer import set_seed
from paddlenlp.utils.log import logger

import llm  # noqa: F401  (zlib fix before paddle)
from llm.config import check_static, parse_arguments
from llm.config.checks import check_device_support, check_training_dtype, read_model_type, resolve_model_dir
from llm.data.mmap import MMapTokens
from llm.distributed import check_parallel
from llm.errors import ConfigError, exit_on_user_error
from llm.fileio import read_json, write_json
from llm.model import build_model, family_of, load_model
from llm.outputs import check_output_path
from llm.tokenizer import load_tokenizer
from llm.train.callbacks import CheckpointMarkerCallback, MetricsLogCallback
from llm.train.checkpoint import checkpoint_step, choose_resume, run_settings
from llm.train.finetune import barrier, model_dtype, print_arguments, save_final_model, train_or_resume

from .arguments import (
    PRETRAIN_ARGUMENT_TYPES,
    PretrainDataArguments,
    PreTrainingArguments,
    PretrainModelArguments,
)
from .dataset import SPLIT_NAMES, BuildOptions, build_datasets, parse_input_dir, target_sample_counts
from .trainer import PretrainingTrainer, collate_tokens

#: model types run_pretrain.py trains (the seed's Pretrain column)
PRETRAIN_MODEL_TYPES = ("llama", "qwen", "gpt")
#: run settings a checkpoint must share with the run that resumes it
PRETRAIN_KEYS = (
    ("model_name_or_path", "continue_training"),
    ("input_dir", "split", "max_seq_length"),
    ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed"),
)
VOCAB_MULTIPLE = 128


def check_pretrain(
    model_args: PretrainModelArguments, data_args: PretrainDataArguments, training_args: PreTrainingArguments
) -> str:
    """Validate the options before anything heavy happens; returns the model type."""
    check_static(model_args, None, None, training_args)
    if not data_args.input_dir:
        raise ConfigError("input_dir is required; pass --input_dir with a folder of .bin/.idx token files")
    if data_args.data_impl != "mmap":
        raise ConfigError(f"data_impl {data_args.data_impl!r} is not supported; use mmap token files")
    if training_args.do_train and training_args.max_steps <= 0:
        raise ConfigError(
            "pretraining runs for a number of steps, not epochs: set --max_steps to a positive number"
        )
    check_device_support(training_args)
    check_training_dtype(training_args)
    for _weight, prefix in parse_input_dir(data_args.input_dir):  # every token file opens (headers only)
        MMapTokens(prefix)
    model_type = read_model_type(model_args.model_name_or_path)
    if model_type not in PRETRAIN_MODEL_TYPES:
        raise ConfigError(
            f"run_pretrain.py trains {', '.join(PRETRAIN_MODEL_TYPES)} models, not {model_type!r}; fine-tune it "
            "with finetune_generation.py instead"
        )
    return model_type


def pretrain_config(model_args: PretrainModelArguments, data_args: PretrainDataArguments, dtype: str) -> Any:
    """The model config of a from-scratch run: vocab padded to a multiple of 128, positions >= max_seq_length."""
    path = resolve_model_dir(model_args.model_name_or_path)
    spec = family_of(read_json(os.path.join(path, "config.json"), "config"))
    config = spec.config_class.from_pretrained(path)
    padded = math.ceil(config.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded != config.vocab_size:
        logger.info(f"vocab_size {config.vocab_size} padded to {padded} (a multiple of {VOCAB_MULTIPLE})")
        config.vocab_size = padded
    if getattr(config, "max_position_embeddings", data_args.max_seq_length) < data_args.max_seq_length:
        config.max_position_embeddings = data_args.max_seq_length
    if spec.name == "gpt":
        config.hidden_dropout_prob = model_args.hidden_dropout_prob
        config.attention_probs_dropout_prob = model_args.attention_probs_dropout_prob
    for knob in (
        "fuse_attention_qkv",
        "fuse_attention_ffn",
        "recompute_granularity",
        "pp_recompute_interval",
    ):
        setattr(config, knob, getattr(model_args, knob))
    config.no_recompute_layers = model_args.no_recompute_layers
    config.dtype = dtype
    return config


def _log_samples(datasets: list[Any], tokenizer: Any) -> None:
    for name, dataset in zip(SPLIT_NAMES, datasets):
        if dataset is not None and len(dataset):
            text = tokenizer.decode([int(t) for t in dataset.window(0)[:64]])
            logger.info(f"{name} sample 0 ({len(dataset)} samples): {text!r}")


def run(argv: list[str] | None = None) -> dict[str, float]:
    """Run pretraining from a JSON file and/or CLI flags; returns the final metrics."""
    with paddle.utils.unique_name.guard():
        return _run(argv)


def _run(argv: list[str] | None) -> dict[str, float]:
    model_args, data_args, training_args = parse_arguments(PRETRAIN_ARGUMENT_TYPES, argv)
    check_pretrain(model_args, data_args, training_args)
    check_parallel(training_args, model_args)
    if training_args.dry_run:
        return {}
    check_output_path(
        training_args.output_dir,
        inputs=(model_args.model_name_or_path, data_args.input_dir),
        allow_existing=True,
        what="output_dir",
    )
    settings = run_settings(model_args, data_args, training_args, keys=PRETRAIN_KEYS)
    resume = choose_resume(training_args, settings) if training_args.do_train else None
    print_arguments((model_args, data_args))
    logger.info(
        f"rank {training_args.process_index}, device {training_args.device}, world_size {training_args.world_size}"
    )
    set_seed(training_args.seed)
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path)

    args = training_args
    counts = target_sample_counts(
        args.per_device_train_batch_size,
        args.per_device_eval_batch_size,
        args.dataset_world_size,
        max(args.max_steps, 0),
        args.gradient_accumulation_steps,
        int(args.eval_steps or args.max_steps or 1),
    )
    counts = [
        counts[0] if args.do_train else 0,
        counts[1] if args.do_eval else 0,
        counts[2] if args.do_predict else 0,
    ]
    logger.info(" > datasets target sizes (minimum size):")
    for name, count in zip(SPLIT_NAMES, counts):
        logger.info(f"    {name}: {count}")
    options = BuildOptions(
        input_dir=data_args.input_dir,
        split=data_args.split,
        max_seq_length=data_args.max_seq_length,
        seed=args.seed,
        data_cache=data_args.data_cache,
        builder=args.process_index == 0 if data_args.share_folder else args.local_process_index == 0,
        barrier=lambda: barrier(args),
    )
    train_ds, valid_ds, test_ds = build_datasets(options, counts)
    _log_samples([train_ds, valid_ds, test_ds], tokenizer)

    dtype = model_dtype(args)
    if model_args.continue_training:
        model = load_model(model_args.model_name_or_path, dtype=dtype)
        model.config.seq_length = data_args.max_seq_length
    else:
        model = build_model(pretrain_config(model_args, data_args, dtype), seed=args.seed)
        model.config.seq_length = data_args.max_seq_length
    trainer = PretrainingTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        tokenizer=tokenizer,
        data_collator=collate_tokens,
        callbacks=[MetricsLogCallback(), CheckpointMarkerCallback(settings)],
        seq_length=data_args.max_seq_length,
    )

    results: dict[str, float] = {}
    if args.do_train:
        train_result = train_or_resume(trainer, resume)
        saved = save_final_model(
            trainer, settings, resumed_step=checkpoint_step(resume) if resume else None, writer="run_pretrain"
        )
        if saved and train_result is not None:
            metrics = dict(train_result.metrics)
            if "train_samples_per_second" in metrics:
                metrics["train_tokens_per_second"] = round(
                    metrics["train_samples_per_second"] * data_args.max_seq_length, 2
                )
                logger.info(f"Effective Tokens per second: {metrics['train_tokens_per_second']}")
            trainer.log_metrics("train", metrics)
            trainer.save_metrics("train", metrics)
            trainer.save_state()
            results.update(metrics)
    if args.do_eval and valid_ds is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if args.do_predict and test_ds is not None:
        metrics = trainer.evaluate(eval_dataset=test_ds, metric_key_prefix="test")
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        results.update(metrics)
    if args.should_save and results:
        write_json(os.path.join(args.output_dir, "metrics.json"), results, sort_keys=True)
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``run_pretrain.py``."""
    paddle.set_device("cpu") if not paddle.is_compiled_with_cuda() else None
    run(argv)
