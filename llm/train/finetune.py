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
from paddlenlp.trainer import TrainerState, set_seed
from paddlenlp.trainer.trainer import TRAINER_STATE_NAME
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
from llm.distributed import check_parallel
from llm.errors import ConfigError, exit_on_user_error
from llm.fileio import staged_file, write_json
from llm.lowbit import LowBitSpec, check_low_bit_training, load_low_bit_model, write_base_quantization
from llm.model import apply_peft, enable_neftune, family_of, load_model
from llm.outputs import check_output_path, is_complete, new_staging_dir, publish, staging_path
from llm.templates import resolve_chat_template
from llm.tokenizer import load_tokenizer

from .callbacks import CheckpointMarkerCallback, MetricsLogCallback
from .checkpoint import checkpoint_step, choose_resume, run_settings
from .metrics import make_generation_metrics, token_accuracy
from .quantize import run_quantization
from .trainer import CausalLMTrainer, ListDataset

ARGUMENT_TYPES = (GenerateArgument, QuantArgument, ModelArgument, DataArgument, FinetuneArguments)


def print_arguments(groups: tuple) -> None:
    """Log every field of each argument dataclass, PaddleNLP-style (one block per class)."""
    for group in groups:
        logger.info(f"{'=' * 20} {type(group).__name__} {'=' * 20}")
        for key, value in sorted(vars(group).items()):
            if not key.startswith("_"):
                logger.info(f"{key}: {value}")


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
    check_parallel(training_args, model_args)  # world = dp x pp x sharding x tp, heads / layers divisible ...
    if training_args.dry_run:
        return {}
    if quant_args.do_qat:
        raise ConfigError(
            "quantization-aware training (do_qat) is not part of this release yet; post-training quantization is "
            "(do_ptq, do_gptq), and so is LoRA / Prefix tuning on a low-bit base (weight_quantize_algo)"
        )
    low_bit = LowBitSpec.from_args(model_args)
    if low_bit is not None and not (quant_args.do_ptq or quant_args.do_gptq):
        check_low_bit_training(model_args)
    if quant_args.do_ptq or quant_args.do_gptq:
        print_arguments((model_args, data_args, quant_args))
        set_seed(training_args.seed)
        return run_quantization(
            model_args,
            data_args,
            quant_args,
            training_args,
            lambda split, tok, template: _load_features(split, data_args, tok, template, zero_padding=False),
        )
    check_output_path(
        training_args.output_dir,
        inputs=(
            model_args.model_name_or_path,
            data_args.dataset_name_or_path,
            model_args.lora_path,
            model_args.prefix_path,
        ),
        allow_existing=True,
        what="output_dir",
    )
    settings = run_settings(model_args, data_args, training_args)
    resume = choose_resume(training_args, settings) if training_args.do_train else None
    print_arguments((model_args, data_args, quant_args, gen_args))
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

    if low_bit is not None:  # the base quantized tensor by tensor as it loads (llm.lowbit)
        model = load_low_bit_model(model_args.model_name_or_path, low_bit, dtype=model_dtype(training_args))
    else:
        model = load_model(model_args.model_name_or_path, dtype=model_dtype(training_args))
    family_of(model)  # refuses unknown families with a clear message
    model = apply_peft(model, model_args, dtype=model_dtype(training_args))
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
        callbacks=[MetricsLogCallback(), CheckpointMarkerCallback(settings)],
        do_generation=do_generation,
        gen_kwargs=gen_kwargs,
    )

    results: dict[str, float] = {}
    if training_args.do_train:
        train_result = train_or_resume(trainer, resume)
        if neftune is not None:
            neftune.remove()
        saved = save_final_model(trainer, settings, resumed_step=checkpoint_step(resume) if resume else None)
        if saved and train_result is not None:
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
        write_json(os.path.join(training_args.output_dir, "metrics.json"), results, sort_keys=True)
    return results


def train_or_resume(trainer: CausalLMTrainer, resume: str | None) -> Any:
    """``trainer.train``, except that resuming at or past ``max_steps`` trains nothing and returns None.

    paddlenlp checks ``max_steps`` only after a step, so a checkpoint taken mid-epoch at ``max_steps`` would be
    trained one step further; here its weights and trainer state are loaded and nothing else happens.
    """
    max_steps = trainer.args.max_steps
    if resume is None or not 0 < max_steps <= checkpoint_step(resume):
        return trainer.train(resume_from_checkpoint=resume)
    logger.warning(f"{resume} is at or past max_steps {max_steps}: nothing to train")
    trainer._load_from_checkpoint(resume)
    trainer.state = TrainerState.load_from_json(os.path.join(resume, TRAINER_STATE_NAME))
    return None


def barrier(training_args: FinetuneArguments) -> None:
    """Wait for every rank (no-op in a single process)."""
    if training_args.world_size > 1:
        paddle.distributed.barrier()


def save_final_model(
    trainer: CausalLMTrainer,
    settings: dict[str, Any],
    resumed_step: int | None,
    writer: str = "finetune_generation",
) -> bool:
    """Save the trained model into ``output_dir`` through the output-path policy; returns whether it did.

    Every rank saves into one staging directory (a name all ranks compute alike), which rank 0 marks complete
    and publishes (:func:`llm.outputs.publish`): ``output_dir`` keeps its checkpoints and logs, and a kill at
    any moment leaves the previous final model or the new one, never a mix. A run that resumed at (or past)
    ``max_steps`` trained nothing: it does not replace a finished model already in ``output_dir``.
    """
    args, step = trainer.args, trainer.state.global_step
    out = args.output_dir
    if resumed_step is not None and step <= resumed_step and is_complete(out):
        logger.warning(
            f"nothing was trained (resumed at step {resumed_step}, max_steps reached): {out} keeps its "
            "finished model"
        )
        return False
    key = f"final-{step}"
    if args.should_save:
        new_staging_dir(out, key=key)
    barrier(args)
    staging = staging_path(out, key)
    trainer.save_model(output_dir=staging, merge_tensor_parallel=args.tensor_parallel_degree > 1)
    barrier(args)
    if args.should_save:
        write_base_quantization(trainer.model, staging)  # a Prefix adapter names its low-bit base
        publish(staging, out, writer, global_step=step, run=settings)
    barrier(args)
    return True


def _save_generation_output(
    trainer: CausalLMTrainer, features: list[dict], tokenizer: Any, out_dir: str
) -> str:
    """Generate for the eval set and write ``generated_output.json`` lines ``{"output", "tgt"}``."""
    prediction = trainer.predict(ListDataset(features))
    path = os.path.join(out_dir, "generated_output.json")
    with staged_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for output, target in zip(prediction.predictions, prediction.label_ids):
            row = {
                "output": tokenizer.decode([int(i) for i in output if i >= 0]),
                "tgt": tokenizer.decode([int(i) for i in target if i >= 0]),
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def model_dtype(training_args: FinetuneArguments) -> str:
    """The dtype the model trains in: half with ``fp16_opt_level O2``, else float32 (AMP O1)."""
    if training_args.fp16_opt_level == "O2":
        return "float16" if training_args.fp16 else "bfloat16"
    return "float32"


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """Entry point of ``finetune_generation.py``."""
    paddle.set_device("cpu") if not paddle.is_compiled_with_cuda() else None
    run(argv)
