"""The fine-tuning workflow behind ``finetune_generation.py``: SFT, LoRA and Prefix tuning.

Order of work: parse + validate every option (no weights touched) -> tokenizer and chat
template -> tokenized (cached) datasets -> model (+ PEFT, NEFTune) -> Trainer -> train with
automatic resume -> save -> metrics JSON + loss curve -> eval / predict.
"""

from __future__ import annotations

import json
import os
from typing import Any

import paddle
from paddlenlp.trainer import set_seed
from paddlenlp.utils.log import logger

import llm  # noqa: F401  (zlib fix before paddle)
from llm.config import (
    DataArgument,
    FinetuneArguments,
    GenerateArgument,
    ModelArgument,
    QuantArgument,
    check_runtime,
    check_static,
    parse_arguments,
)
from llm.data import DataCollator, load_split
from llm.errors import ConfigError, exit_on_user_error
from llm.model import apply_peft, enable_neftune, family_of, load_model
from llm.templates import resolve_chat_template
from llm.tokenizer import load_tokenizer

from .callbacks import CheckpointMarkerCallback, MetricsLogCallback
from .checkpoint import clear_marker, find_last_checkpoint, mark_complete
from .metrics import make_generation_metrics, token_accuracy
from .trainer import CausalLMTrainer, ListDataset

ARGUMENT_TYPES = (GenerateArgument, QuantArgument, ModelArgument, DataArgument, FinetuneArguments)


def _print_arguments(groups: tuple) -> None:
    for group in groups:
        logger.info(f"{'=' * 20} {type(group).__name__} {'=' * 20}")
        for key, value in sorted(vars(group).items()):
            if not key.startswith("_"):
                logger.info(f"{key}: {value}")


def _resume_checkpoint(training_args: FinetuneArguments) -> str | None:
    if training_args.resume_from_checkpoint:
        return training_args.resume_from_checkpoint
    if training_args.overwrite_output_dir or not training_args.do_train:
        return None
    last = find_last_checkpoint(training_args.output_dir)
    if last:
        logger.info(f"resuming from the newest complete checkpoint: {last}")
    return last


def _load_features(
    split: str, data_args: DataArgument, tokenizer: Any, template: Any, **kw: Any
) -> list[dict]:
    return load_split(
        data_args.dataset_name_or_path,
        split,
        tokenizer,
        template,
        src_length=data_args.src_length,
        max_length=data_args.max_length,
        cache_dir=data_args.cache_dir,
        **kw,
    )


def run(argv: list[str] | None = None) -> dict[str, float]:
    """Run fine-tuning from a JSON file and/or CLI flags; returns the final metrics.

    Model, optimizer and Trainer are built inside a fresh ``paddle.utils.unique_name`` scope: optimizer
    state is keyed by generated parameter names, so a second run in the same process (or a resume after
    another run) would otherwise get ``..._moment1_1`` names that do not match the checkpoint.
    """
    with paddle.utils.unique_name.guard():
        return _run(argv)


def _run(argv: list[str] | None) -> dict[str, float]:
    gen_args, quant_args, model_args, data_args, training_args = parse_arguments(ARGUMENT_TYPES, argv)
    check_static(model_args, data_args, quant_args, training_args)
    check_runtime(model_args, data_args, quant_args, training_args)
    if quant_args.do_ptq or quant_args.do_gptq or quant_args.do_qat or model_args.weight_quantize_algo:
        raise ConfigError(
            "quantization (do_ptq / do_gptq / do_qat / weight_quantize_algo) is not part of this release "
            "yet: only SFT, LoRA and Prefix tuning"
        )
    _print_arguments((model_args, data_args, quant_args, gen_args))
    logger.info(
        f"rank {training_args.process_index}, device {training_args.device}, "
        f"world_size {training_args.world_size}"
    )
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    template = resolve_chat_template(tokenizer, model_args.model_name_or_path, data_args.chat_template)
    tokenizer.chat_template = template
    do_generation = data_args.eval_with_do_generation and template is None
    if data_args.eval_with_do_generation and template is not None:
        logger.warning("eval_with_do_generation is turned off because a chat template is active")

    train_ds = eval_ds = test_ds = None
    if training_args.do_train:
        train_ds = _load_features(
            "train", data_args, tokenizer, template, zero_padding=data_args.zero_padding
        )
    if training_args.do_eval:
        eval_ds = _load_features(
            "dev",
            data_args,
            tokenizer,
            template,
            zero_padding=data_args.zero_padding and not do_generation,
            for_generation=do_generation,
        )
    if training_args.do_predict:
        test_ds = _load_features(
            "test", data_args, tokenizer, template, zero_padding=False, for_generation=do_generation
        )

    model = load_model(model_args.model_name_or_path, dtype=_model_dtype(training_args))
    family_of(model)  # refuses unknown families with a clear message
    model = apply_peft(model, model_args, dtype=_model_dtype(training_args))
    neftune = enable_neftune(model, model_args.neftune_noise_alpha) if model_args.neftune else None

    if do_generation:
        tokenizer.padding_side = "left"
    collator = DataCollator(tokenizer, pad_to_multiple_of=data_args.pad_to_multiple_of)
    gen_kwargs = {
        "top_k": gen_args.top_k,
        "top_p": gen_args.top_p,
        "max_new_tokens": data_args.max_length - data_args.src_length,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    trainer = CausalLMTrainer(
        model=model,
        args=training_args,
        train_dataset=ListDataset(train_ds) if train_ds is not None else None,
        eval_dataset=ListDataset(eval_ds) if eval_ds is not None else None,
        tokenizer=tokenizer,
        data_collator=collator,
        compute_metrics=make_generation_metrics(set(tokenizer.eos_token_ids))
        if do_generation
        else token_accuracy,
        callbacks=[MetricsLogCallback(), CheckpointMarkerCallback()],
        do_generation=do_generation,
        gen_kwargs=gen_kwargs,
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        if training_args.should_save:
            clear_marker(training_args.output_dir)  # the final model is about to be rewritten
        train_result = trainer.train(resume_from_checkpoint=_resume_checkpoint(training_args))
        if neftune is not None:
            neftune.remove()
        trainer.save_model(merge_tensor_parallel=training_args.tensor_parallel_degree > 1)
        if training_args.should_save:
            mark_complete(training_args.output_dir, trainer.state.global_step)
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        trainer.save_state()
        results.update(train_result.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
        if do_generation and data_args.save_generation_output and training_args.should_save:
            _save_generation_output(trainer, eval_ds, tokenizer, training_args.output_dir)
    if training_args.do_predict and test_ds is not None:
        metrics = trainer.evaluate(eval_dataset=ListDataset(test_ds), metric_key_prefix="test")
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
        results.update(metrics)
    if training_args.should_save and results:
        with open(os.path.join(training_args.output_dir, "metrics.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, sort_keys=True)
    return results


def _save_generation_output(
    trainer: CausalLMTrainer, features: list[dict], tokenizer: Any, out_dir: str
) -> str:
    """Generate for the eval set and write ``generated_output.json`` lines ``{"output", "tgt"}``."""
    prediction = trainer.predict(ListDataset(features))
    path = os.path.join(out_dir, "generated_output.json")
    with open(path, "w", encoding="utf-8") as f:
        for output, target in zip(prediction.predictions, prediction.label_ids):
            row = {
                "output": tokenizer.decode([int(i) for i in output if i >= 0]),
                "tgt": tokenizer.decode([int(i) for i in target if i >= 0]),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def _model_dtype(training_args: FinetuneArguments) -> str:
    if training_args.fp16_opt_level == "O2":
        return "float16" if training_args.fp16 else "bfloat16"
    return "float32"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``finetune_generation.py``."""
    paddle.set_device("cpu") if not paddle.is_compiled_with_cuda() else None
    run(argv)
