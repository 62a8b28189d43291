"""Every numeric option of the fine-tuning script is range-checked (or listed as unchecked with a reason),
and a bad value stops ``finetune_generation`` with one ``error:`` line before any weights load."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path

import pytest

import llm  # noqa: F401  (zlib fix before paddle)
import llm.train.finetune as finetune
from llm.config import FINETUNE_ARGUMENT_TYPES, check_static, parse_arguments
from llm.config.ranges import RANGES, UNCHECKED, Range
from llm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
NUMBER_TYPES = (int, float)


def _numeric_kind(hint: typing.Any) -> type | None:
    """int or float for ``int``/``float``/``list[int]``/``list[float]`` hints (Optional stripped), else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint) or (str,)
    return hint if hint in NUMBER_TYPES else None


def numeric_fields(classes: tuple[type, ...]) -> dict[str, tuple[type, type]]:
    """Field name -> (owning dataclass, int or float) for every numeric init field of ``types``."""
    found: dict[str, tuple[type, type]] = {}
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = _numeric_kind(hints[f.name])
            if f.init and kind is not None:
                found.setdefault(f.name, (cls, kind))
    return found


def unclassified(classes: tuple[type, ...]) -> list[str]:
    return sorted(name for name in numeric_fields(classes) if name not in RANGES and name not in UNCHECKED)


FIELDS = numeric_fields(FINETUNE_ARGUMENT_TYPES)


# ----------------------------------------------------------------------------- classification


def test_every_numeric_field_is_range_checked_or_listed_as_unchecked() -> None:
    missing = unclassified(FINETUNE_ARGUMENT_TYPES)
    assert (
        not missing
    ), f"numeric options without a range in llm/config/ranges.py (RANGES or UNCHECKED): {missing}"
    assert not set(RANGES) & set(UNCHECKED)
    stale = sorted((set(RANGES) | set(UNCHECKED)) - set(FIELDS))
    assert not stale, f"RANGES/UNCHECKED name options that are not numeric fields: {stale}"
    assert all(isinstance(reason, str) and len(reason) > 20 for reason in UNCHECKED.values())


def test_a_new_numeric_field_is_reported_until_classified() -> None:
    @dataclasses.dataclass
    class Extended(FINETUNE_ARGUMENT_TYPES[2]):  # ModelArgument
        lora_new_knob: int = 3
        lora_new_scale: float | None = None

    assert unclassified((*FINETUNE_ARGUMENT_TYPES, Extended)) == ["lora_new_knob", "lora_new_scale"]


def test_the_walk_sees_the_known_kinds() -> None:
    assert FIELDS["per_device_train_batch_size"][1] is int
    assert FIELDS["learning_rate"][1] is float
    assert FIELDS["eval_accumulation_steps"][1] is int  # Optional[int]
    assert FIELDS["no_recompute_layers"][1] is int  # list[int] | None
    assert FIELDS["top_p"][0].__name__ == "GenerateArgument"
    assert {"lora", "do_train", "output_dir"}.isdisjoint(FIELDS)  # bools and strings are not numeric


# ----------------------------------------------------------------------------- every range is enforced


def _cli(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _enable(rng: Range) -> list[str]:
    return [part for name, value in rng.when for part in (f"--{name}", _cli(value))]


def _disable(rng: Range) -> list[str]:
    off = {True: False, "steps": "no"}
    return [part for name, value in rng.when for part in (f"--{name}", _cli(off[value]))]


def bad_values(rng: Range, kind: type) -> list[int | float]:
    """Values just outside each bound (skipping the allowed sentinels); plus nan and inf for floats."""
    out: list[int | float] = []
    if rng.low is not None:
        value = kind(rng.low)
        if not rng.low_open:
            value -= 1
        while rng.contains(value):  # a sentinel such as -1 or 0
            value -= 1
        out.append(value)
    if rng.high is not None:
        out.append(kind(rng.high) if rng.high_open else kind(rng.high) + 1)
    if kind is float:
        out += [math.nan, math.inf]
    assert out and not any(rng.contains(v) for v in out)
    return out


def parse_and_check(tmp_path: Path, *argv: str) -> None:
    """The real parser (dataclass __post_init__ included) followed by check_static."""
    base = ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", "m", "--dataset_name_or_path", "d"]
    _gen, quant, model, data, train = parse_arguments(FINETUNE_ARGUMENT_TYPES, [*base, *argv])
    check_static(model, data, quant, train)


CASES = [(name, bad) for name, rng in RANGES.items() for bad in bad_values(rng, FIELDS[name][1])]


@pytest.mark.parametrize(("name", "bad"), CASES, ids=[f"{n}={b}" for n, b in CASES])
def test_out_of_range_value_is_refused(name: str, bad: float, tmp_path: Path) -> None:
    rng = RANGES[name]
    parse_and_check(tmp_path, *_enable(rng))  # the context alone is fine
    with pytest.raises(ConfigError) as exc:
        parse_and_check(tmp_path, *_enable(rng), f"--{name}", str(bad))
    message = str(exc.value)
    entries = " entries" if name == "no_recompute_layers" else ""
    shown = repr(float(bad)) if FIELDS[name][1] is float else repr(bad)
    assert message == f"{name}{entries} must be {rng.describe()}, got {shown}"


CONDITIONAL = [name for name, rng in RANGES.items() if rng.when]


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_range_is_ignored_when_the_option_is_unused(name: str, tmp_path: Path) -> None:
    rng = RANGES[name]
    bad = bad_values(rng, FIELDS[name][1])[0]
    parse_and_check(tmp_path, *_disable(rng), f"--{name}", str(bad))


def test_sentinels_and_none_are_accepted(tmp_path: Path) -> None:
    parse_and_check(
        tmp_path,
        *("--max_steps -1 --eval_steps 0 --evaluation_strategy steps --tensor_parallel_degree -1".split()),
        *("--past_index -1 --max_evaluate_steps -1 --save_total_limit 0 --seed 4294967295".split()),
        *("--eval_accumulation_steps null --pad_to_multiple_of null --warmup_ratio 1 --top_p 1".split()),
    )


def test_range_descriptions() -> None:
    assert RANGES["per_device_train_batch_size"].describe() == ">= 1"
    assert RANGES["top_p"].describe() == "in (0, 1]"
    assert RANGES["max_steps"].describe() == "-1 (train for num_train_epochs) or >= 1"
    assert RANGES["save_steps"].describe() == ">= 1 when save_strategy is 'steps'"
    assert RANGES["lora_rank"].describe() == ">= 1 when lora is true"


def test_eval_steps_checked_after_do_eval_turns_the_strategy_to_steps(tmp_path: Path) -> None:
    """Before paddlenlp's __post_init__ the strategy is 'no'; check_static sees the 'steps' it becomes."""
    with pytest.raises(
        ConfigError, match=r"^eval_steps must be .* when evaluation_strategy is 'steps', got -3$"
    ):
        parse_and_check(tmp_path, "--do_eval", "--evaluation_strategy", "no", "--eval_steps", "-3")


# ----------------------------------------------------------------------------- the script


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--per_device_train_batch_size", "0"], "error: per_device_train_batch_size must be >= 1, got 0"),
        (
            ["--save_strategy", "steps", "--save_steps", "-5"],
            "error: save_steps must be >= 1 when save_strategy is 'steps', got -5",
        ),
        (
            ["--do_eval", "--evaluation_strategy", "no", "--eval_steps", "-3"],
            "error: eval_steps must be 0 (use logging_steps) or >= 1 when evaluation_strategy is 'steps', got -3",
        ),
    ],
)
def test_script_stops_before_loading_anything(
    extra: list[str],
    expected: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights, tokenizer or data were loaded before the option check")

    for name in ("load_model", "load_tokenizer", "load_split"):
        monkeypatch.setattr(finetune, name, must_not_run)
    argv = [str(REPO / "demo" / "sft_argument.json"), "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exc:
        finetune.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [expected]
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
