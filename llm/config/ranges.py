"""Allowed ranges of the fine-tuning script's numeric options, checked before anything loads.

:data:`RANGES` maps every range-checked int/float option of ``GenerateArgument``, ``QuantArgument``,
``ModelArgument``, ``DataArgument`` and ``FinetuneArguments`` (paddlenlp ``TrainingArguments`` plus
extras) to its :class:`Range`; :data:`UNCHECKED` names the numeric options left unchecked, with the
reason. ``tests/test_config_ranges.py`` requires every numeric field to be in exactly one of them.

:func:`check_ranges` raises one-line :class:`~llm.errors.ConfigError` s such as
``per_device_train_batch_size must be >= 1, got 0``. It runs in the dataclasses' ``__post_init__``
(so paddlenlp's own ``__post_init__`` never sees a bad value) and again in
:func:`llm.config.checks.check_static`. Import-light: no paddle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llm.errors import ConfigError

_MISSING = object()


@dataclass(frozen=True)
class Range:
    """An interval (bounds inclusive unless ``*_open``), extra allowed values, and when it applies.

    ``also`` holds sentinel values allowed outside the interval with their meaning, e.g.
    ``((-1, "no limit"),)``. ``when`` holds ``(field, value)`` pairs of the same argument group that
    must all hold for the check to apply, e.g. ``(("save_strategy", "steps"),)``. ``None`` (an unset
    optional option) is always allowed; floats must be finite.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple[tuple[int | float, str], ...] = ()
    when: tuple[tuple[str, Any], ...] = ()

    def contains(self, value: int | float) -> bool:
        """True if ``value`` is allowed."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if any(value == special for special, _ in self.also):
            return True
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def applies(self, group: Any) -> bool:
        """True if every ``when`` condition holds on ``group``."""
        return all(_plain(getattr(group, name, None)) == value for name, value in self.when)

    def describe(self) -> str:
        """The allowed values in words, e.g. ``-1 (no limit) or >= 1`` or ``in (0, 1]``."""
        parts = [f"{_num(special)} ({meaning})" for special, meaning in self.also]
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            parts.append(f"in {left}{_num(self.low)}, {_num(self.high)}{right}")
        elif self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {_num(self.low)}")
        elif self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {_num(self.high)}")
        text = " or ".join(parts) or "a finite number"
        if self.when:
            text += " when " + " and ".join(f"{name} is {_show(value)}" for name, value in self.when)
        return text


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)  # paddlenlp turns strategies into enums in __post_init__


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def at_least(low: float, **kw: Any) -> Range:
    """``>= low``."""
    return Range(low=low, **kw)


def positive(**kw: Any) -> Range:
    """``> 0``."""
    return Range(low=0, low_open=True, **kw)


_STEPS = "steps"
_UNSET = (-1, "unset")

#: Option name -> allowed values. Option names are unique across the five dataclasses.
RANGES: dict[str, Range] = {
    # GenerateArgument (sampling during eval_with_do_generation)
    "top_k": at_least(0),  # 0: no top-k filter
    "top_p": Range(low=0, high=1, low_open=True),
    # QuantArgument
    "ptq_step": at_least(1),
    "shift_step": at_least(1),
    "smooth_step": at_least(1),
    "smooth_k_piece": at_least(1),
    "gptq_step": at_least(1),
    "gptq_group_size": Range(low=2, also=((-1, "per channel"),)),
    "gptq_bits": Range(low=4, high=8),
    "gptq_percdamp": Range(low=0, high=1, low_open=True),
    "quant_group_size": Range(low=2, also=((-1, "per channel"),)),
    # ModelArgument
    "weight_blocksize": at_least(1),
    "weight_double_quant_block_size": at_least(1),
    "lora_rank": at_least(1, when=(("lora", True),)),
    "lora_plus_scale": positive(when=(("lora", True),)),
    "num_prefix_tokens": at_least(1, when=(("prefix_tuning", True),)),
    "neftune_noise_alpha": at_least(0, when=(("neftune", True),)),
    "virtual_pp_degree": at_least(1),
    "no_recompute_layers": at_least(0),  # layer indices
    "pp_recompute_interval": at_least(1),
    "hidden_dropout_prob": Range(low=0, high=1, high_open=True),
    "attention_probs_dropout_prob": Range(low=0, high=1, high_open=True),
    # DataArgument
    "src_length": at_least(1),
    "max_length": at_least(1),
    "pad_to_multiple_of": at_least(1),
    # FinetuneArguments: batch and steps
    "per_device_train_batch_size": at_least(1),
    "per_device_eval_batch_size": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "eval_accumulation_steps": at_least(1),
    "num_train_epochs": positive(),
    "max_steps": at_least(1, also=((-1, "train for num_train_epochs"),)),
    "logging_steps": at_least(1, when=(("logging_strategy", _STEPS),)),
    "save_steps": at_least(1, when=(("save_strategy", _STEPS),)),
    "eval_steps": at_least(1, also=((0, "use logging_steps"),), when=(("evaluation_strategy", _STEPS),)),
    "save_total_limit": at_least(0),  # 0 (like null) keeps every checkpoint
    "max_evaluate_steps": at_least(1, also=((-1, "evaluate the whole set"),)),
    "minimum_eval_times": at_least(0),  # 0 (like null) is off
    "dataloader_num_workers": at_least(0),
    "seed": Range(low=0, high=2**32 - 1),  # numpy's seed range
    # FinetuneArguments: optimizer and schedule
    "learning_rate": positive(),
    "weight_decay": at_least(0),
    "adam_beta1": Range(low=0, high=1, high_open=True),
    "adam_beta2": Range(low=0, high=1, high_open=True),
    "adam_epsilon": at_least(0),
    "max_grad_norm": at_least(0),  # 0 turns clipping off
    "warmup_ratio": Range(low=0, high=1),
    "warmup_steps": at_least(0),
    "num_cycles": at_least(0),
    "lr_end": at_least(0),
    "power": at_least(0),
    "decay_steps": at_least(0),  # 0: decay over all training steps
    "scale_loss": positive(),
    "past_index": at_least(0, also=((-1, "off"),)),
    # FinetuneArguments: parallelism (-1: unset, paddlenlp's default)
    "sharding_degree": at_least(1, also=(_UNSET,)),
    "sharding_parallel_degree": at_least(1, also=(_UNSET,)),
    "tensor_parallel_degree": at_least(1, also=(_UNSET,)),
    "pipeline_parallel_degree": at_least(1, also=(_UNSET,)),
    "sep_parallel_degree": at_least(1, also=(_UNSET,)),
}

#: Numeric options deliberately not range-checked, with the reason.
UNCHECKED: dict[str, str] = {
    "local_rank": "set by paddle.distributed.launch for each worker (-1 in a single process), not by the user",
}


def check_ranges(*groups: Any) -> None:
    """Raise ConfigError for the first option of ``groups`` (argument objects or None) outside its range."""
    for group in groups:
        if group is None:
            continue
        for name, allowed in RANGES.items():
            value = getattr(group, name, _MISSING)
            if value is _MISSING or value is None or isinstance(value, bool) or not allowed.applies(group):
                continue
            for item in value if isinstance(value, list | tuple) else (value,):
                if not allowed.contains(item):
                    entries = " entries" if isinstance(value, list | tuple) else ""
                    raise ConfigError(f"{name}{entries} must be {allowed.describe()}, got {item!r}")
