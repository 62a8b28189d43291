"""``do_ptq`` / ``do_gptq`` inside ``finetune_generation.py``: calibrate, quantize, save, evaluate.

Order of work (every option and input checked before weights load): refuse LoRA / prefix / already quantized
models -> tokenizer and chat template -> calibration features from ``quant.json`` (else ``train.json``, with a
log line) and dev features -> model -> PTQ (:func:`llm.quant.ptq.ptq_model`: Shift, SmoothQuant,
PieceWiseSearch, A8W8 or weight-only RTN) or GPTQ (:func:`llm.quant.gptq.gptq_model`) -> the quantized model,
its tokenizer files and (PTQ) ``weight_scales.json`` / ``act_scales.json`` published into ``output_dir``
through the output-path policy -> dev evaluation of the quantized model -> ``metrics.json``.

Calibration rows are the calibration examples' token ids (prompt and answer, as in training) concatenated
and cut into rows of ``max_length`` tokens, so no calibration token is padding; a batch is
``per_device_train_batch_size`` rows and a step is one batch.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import paddle
from paddlenlp.utils.log import logger

from llm.convert.core import copy_tokenizer_files
from llm.errors import ConfigError, ModelError
from llm.fileio import write_json
from llm.outputs import check_output_path, new_staging_dir, publish

MERGE_FIRST = (
    "merge lora parameters first: python merge_lora_params.py --model_name_or_path BASE --lora_path {path} "
    "--merge_lora_model_path MERGED, then quantize MERGED"
)


def check_quantization_request(model_args: Any, quant_args: Any) -> None:
    """Refuse what cannot be quantized, before anything loads."""
    from llm.quant.formats import canonical_quant_type
    from llm.quant.io import is_quantized_dir

    if quant_args.do_ptq:
        canonical_quant_type(quant_args.quant_type)
    if quant_args.do_gptq and quant_args.gptq_bits not in (4, 8):
        raise ConfigError(f"gptq_bits must be 4 or 8, got {quant_args.gptq_bits}")
    lora_dir = model_args.lora_path or model_args.model_name_or_path
    if model_args.lora or model_args.lora_path or os.path.isfile(os.path.join(lora_dir, "lora_config.json")):
        raise ConfigError(MERGE_FIRST.format(path=lora_dir))
    if model_args.prefix_tuning or model_args.prefix_path:
        raise ConfigError(
            "prefix tuning cannot be quantized: quantize the base model and train the prefix on it"
        )
    if model_args.weight_quantize_algo:
        raise ConfigError(
            "weight_quantize_algo (QLoRA-style training) cannot be combined with do_ptq / do_gptq"
        )
    path = model_args.model_name_or_path
    done = is_quantized_dir(path) if os.path.isdir(path) else None
    if done is not None:
        raise ConfigError(
            f"{path} is already quantized ({done.algorithm} {done.quant_type}); start from a float model"
        )


def calibration_batches(
    features: list[dict[str, Any]], rows: int, length: int, steps: int, seed: int
) -> list[dict]:
    """At most ``steps`` batches of ``rows`` unpadded rows of ``length`` tokens (see the module docstring)."""
    order = np.random.RandomState(seed).permutation(len(features))
    stream = np.concatenate([np.asarray(features[i]["input_ids"], np.int64) for i in order])
    length = max(2, min(length, len(stream)))
    usable = len(stream) // length
    data = stream[: usable * length].reshape(usable, length)
    batches = [{"input_ids": data[i : i + rows]} for i in range(0, usable, rows)][:steps]
    logger.info(
        f"calibration: {len(batches)} batch(es) of up to {rows} x {length} tokens from {len(features)} examples"
    )
    return batches


def run_quantization(
    model_args: Any, data_args: Any, quant_args: Any, training_args: Any, load_features: Any
) -> dict[str, float]:
    """The ``do_ptq`` / ``do_gptq`` workflow (see the module docstring); returns the dev metrics.

    ``load_features(split, tokenizer, template)`` gives the tokenized features of a split (as in training)."""
    import llm.quant.io as quant_io
    from llm.model import family_of, load_model
    from llm.templates import resolve_chat_template
    from llm.tokenizer import load_tokenizer

    check_quantization_request(model_args, quant_args)
    out = training_args.output_dir
    check_output_path(
        out,
        inputs=(model_args.model_name_or_path, data_args.dataset_name_or_path),
        allow_existing=True,
        what="output_dir",
    )
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    template = resolve_chat_template(tokenizer, model_args.model_name_or_path, data_args.chat_template)
    tokenizer.chat_template = template
    if not _has_split(data_args.dataset_name_or_path, "quant"):
        logger.info("Not found quant.json, set train dataset as PTQ calibration dataset")
    calib = load_features(
        "quant" if _has_split(data_args.dataset_name_or_path, "quant") else "train", tokenizer, template
    )
    dev = load_features("dev", tokenizer, template) if training_args.do_eval else None
    steps = quant_args.ptq_step if quant_args.do_ptq else quant_args.gptq_step
    if quant_args.do_ptq:
        steps = max(
            steps,
            quant_args.shift_step if quant_args.shift else 0,
            quant_args.smooth_step if quant_args.smooth else 0,
        )
    batches = calibration_batches(
        calib, training_args.per_device_train_batch_size, data_args.max_length, steps, training_args.seed
    )

    model = load_model(model_args.model_name_or_path, dtype="float32")
    family_of(model)
    model.eval()
    scales: dict[str, Any] = {}
    with paddle.no_grad():
        if quant_args.do_ptq:
            from llm.quant.ptq import ptq_model

            config, weight_scales, act_scales = ptq_model(model, batches, quant_args)
            scales = {"weight_scales.json": weight_scales, "act_scales.json": act_scales}
        else:
            from llm.quant.gptq import gptq_model

            config = gptq_model(
                model,
                batches,
                bits=quant_args.gptq_bits,
                group_size=quant_args.gptq_group_size,
                act_order=quant_args.gptq_act_order,
                damp=quant_args.gptq_percdamp,
                steps=quant_args.gptq_step,
            )
    logger.info(f"quantized {len(config.modules)} linear layers: {config.algorithm} {config.quant_type}")

    if training_args.should_save:
        staging = new_staging_dir(out)
        try:
            quant_io.save_quantized(model, staging)
            copy_tokenizer_files(model_args.model_name_or_path, staging)
            for name, data in scales.items():
                write_json(os.path.join(staging, name), data, sort_keys=True)
            publish(staging, out, "finetune_generation", quantization=config.to_dict())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    metrics = _evaluate(model, tokenizer, dev, training_args) if dev is not None else {}
    if training_args.should_save and metrics:
        write_json(os.path.join(out, "metrics.json"), metrics, sort_keys=True)
    return metrics


def _has_split(dataset_dir: str, split: str) -> bool:
    from llm.data import find_split_files

    return bool(find_split_files(dataset_dir, split))


def _evaluate(model: Any, tokenizer: Any, dev: list[dict], training_args: Any) -> dict[str, float]:
    """Dev loss / token accuracy of the quantized model with the fine-tuning Trainer's evaluation."""
    from llm.data import DataCollator

    from .metrics import token_accuracy
    from .trainer import CausalLMTrainer, ListDataset

    trainer = CausalLMTrainer(
        model=model,
        args=training_args,
        eval_dataset=ListDataset(dev),
        tokenizer=tokenizer,
        data_collator=DataCollator(tokenizer),
        compute_metrics=token_accuracy,
    )
    metrics = trainer.evaluate()
    if not metrics:
        raise ModelError("evaluation of the quantized model returned no metrics")
    trainer.log_metrics("eval", metrics)
    return {k: float(v) for k, v in metrics.items()}
