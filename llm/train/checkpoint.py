"""Training checkpoints: discovery, rotation, and the automatic-resume decision.

Checkpoints carry the completion marker of :mod:`llm.outputs`; a ``checkpoint-N`` directory is written in
place by paddlenlp's Trainer, so it holds ``write_in_progress.json`` until its marker is written, and resume
never picks one without a marker. The marker also records the run's **settings** (model, PEFT, data, lengths,
batch geometry, see :func:`run_settings`): automatic resume refuses a checkpoint whose settings differ from the
new run's, before any weights load, instead of loading e.g. a rank-16 adapter into a rank-4 model.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from llm.errors import ConfigError, ModelError
from llm.outputs import COMPLETE_MARKER, is_complete, read_marker, remove_output, require_complete

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
logger = logging.getLogger(__name__)

#: ModelArgument / DataArgument / TrainingArguments fields that must match for a checkpoint to be resumed
MODEL_KEYS = (
    "model_name_or_path",
    "lora",
    "lora_rank",
    "lora_path",
    "rslora",
    "pissa",
    "lora_plus_scale",
    "prefix_tuning",
    "num_prefix_tokens",
    "prefix_path",
    "weight_quantize_algo",
    "neftune",
    "neftune_noise_alpha",
)
DATA_KEYS = ("dataset_name_or_path", "src_length", "max_length", "zero_padding", "chat_template", "lazy")
TRAINING_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "world_size")
_PATH_KEYS = (
    "model_name_or_path",
    "lora_path",
    "prefix_path",
    "dataset_name_or_path",
    "chat_template",
    "input_dir",
)


def _value(key: str, value: Any) -> Any:
    if key in _PATH_KEYS and isinstance(value, str) and os.path.exists(os.path.expanduser(value)):
        return os.path.realpath(os.path.expanduser(value))
    return value


def run_settings(
    model_args: Any,
    data_args: Any,
    training_args: Any,
    keys: tuple[tuple[str, ...], ...] = (MODEL_KEYS, DATA_KEYS, TRAINING_KEYS),
) -> dict[str, Any]:
    """The settings a checkpoint must share with a run that resumes it (recorded in every marker): the
    ``keys[i]`` fields of the i-th argument object (default: fine-tuning's)."""
    settings: dict[str, Any] = {}
    for obj, names in zip((model_args, data_args, training_args), keys):
        for key in names:
            value = getattr(obj, key, None)
            settings[key] = _value(key, value if isinstance(value, (str, int, float, bool)) else None)
    return settings


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """All ``checkpoint-N`` sub-directories as (N, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_last_checkpoint(output_dir: str) -> str | None:
    """Newest complete checkpoint in ``output_dir``; incomplete ones are skipped with a warning."""
    for _step, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s)", path, COMPLETE_MARKER)
    return None


def checkpoint_step(path: str) -> int:
    """The global step a checkpoint was saved at (its marker, else its ``checkpoint-N`` name; 0 if unknown)."""
    step = (read_marker(path) or {}).get("global_step")
    if isinstance(step, int):
        return step
    match = _CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else 0


def settings_mismatch(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: recorded -> current`` for every setting that differs (keys unknown to the checkpoint are skipped)."""
    return [
        f"{key}={recorded[key]!r} (this run: {current.get(key)!r})"
        for key in current
        if key in recorded and recorded[key] != current.get(key)
    ]


def choose_resume(training_args: Any, settings: dict[str, Any]) -> str | None:
    """The checkpoint this run resumes from, decided before any weights load.

    An explicit ``--resume_from_checkpoint`` must be a complete directory. Automatic resume (the newest
    complete ``checkpoint-N`` of ``output_dir``, unless ``overwrite_output_dir``) must have been written with
    the same :func:`run_settings`, and lie before ``max_steps`` when ``output_dir`` already holds a finished
    model (without one, resuming the last checkpoint writes the final model a killed run did not); otherwise
    :class:`ConfigError` says what differs and what to do.
    """
    explicit = training_args.resume_from_checkpoint
    if explicit:
        if not os.path.isdir(explicit):
            raise ModelError(f"resume_from_checkpoint: checkpoint directory not found: '{explicit}'")
        require_complete(explicit)
        return explicit
    if training_args.overwrite_output_dir or not training_args.do_train:
        return None
    last = find_last_checkpoint(training_args.output_dir)
    if last is None:
        return None
    recorded = (read_marker(last) or {}).get("run")
    if isinstance(recorded, dict):
        diff = settings_mismatch(recorded, settings)
        if diff:
            raise ConfigError(
                f"output_dir {training_args.output_dir} holds {os.path.basename(last)} of a different run "
                f"({'; '.join(diff)}), so it cannot be resumed; choose another --output_dir, or pass "
                "--overwrite_output_dir true to train from scratch there"
            )
    else:
        logger.warning("%s records no run settings (an older checkpoint); resuming it unchecked", last)
    step, max_steps = checkpoint_step(last), getattr(training_args, "max_steps", -1) or -1
    if 0 < max_steps <= step and is_complete(training_args.output_dir):
        raise ConfigError(
            f"output_dir {training_args.output_dir} holds {os.path.basename(last)}, at or past max_steps "
            f"{max_steps}: there is nothing to train; raise --max_steps, choose another --output_dir, or pass "
            "--overwrite_output_dir true to train from scratch there"
        )
    logger.info("resuming from the newest complete checkpoint: %s", last)
    return last


def rotate_checkpoints(
    output_dir: str, limit: int | None, current: str, keep: str | None = None
) -> list[str]:
    """Apply ``save_total_limit`` once ``current`` is marked complete; returns the deleted paths.

    Among the checkpoints up to ``current``'s step, the newest ``limit`` complete ones survive (``keep``, the
    best-model checkpoint, always does) and incomplete ones (interrupted saves) are deleted. Checkpoints of a
    later step, left by an earlier longer run, are not touched. ``limit`` None or <= 0 keeps everything.
    Deletion goes through :func:`llm.outputs.remove_output` (marker first, then the files).
    """
    if not limit or limit <= 0:
        return []
    found = list_checkpoints(output_dir)
    current_step = next((step for step, path in found if os.path.samefile(path, current)), None)
    if current_step is None:
        return []
    older = [(step, path) for step, path in found if step <= current_step]
    complete = [path for _step, path in older if is_complete(path)]
    survivors = set(complete[-limit:])
    if keep and os.path.isdir(keep):
        survivors |= {path for _step, path in older if os.path.samefile(path, keep)}
    deleted = []
    for _step, path in older:
        if path not in survivors:
            logger.info("deleting checkpoint %s (save_total_limit=%d)", path, limit)
            remove_output(path)
            deleted.append(path)
    return deleted
