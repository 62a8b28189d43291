"""Parse a JSON config file plus ``--key value`` overrides (or CLI flags only) into dataclasses.

Mirrors PaddleNLP's ``PdArgumentParser`` usage in ``llm/``: when the first argument ends in
``.json`` the file gives the values and the remaining flags override them; otherwise every
value comes from the command line. Unlike argparse it never exits by itself: problems raise
:class:`~llm.errors.ConfigError` with a one-line message naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from llm.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

COMMAND_LINE = "the command line"
_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}
_MISSING = dataclasses.MISSING


def _training_choices(name: str) -> list[str] | None:
    """Valid values of string-typed paddlenlp ``TrainingArguments`` fields that it converts later."""
    from paddlenlp.trainer.trainer_utils import OptimizerNames, SchedulerType, ShardingOption

    table: dict[str, list[str]] = {
        "lr_scheduler_type": [e.value for e in SchedulerType],
        "optim": [e.value for e in OptimizerNames],
        "sharding": [e.value for e in ShardingOption],  # space-separated words
        "fp16_opt_level": ["O0", "O1", "O2"],
        "hybrid_parallel_topo_order": ["pp_first", "sharding_first"],
    }
    return table.get(name)


@dataclasses.dataclass
class _Target:
    """One dataclass field a key maps to."""

    index: int
    field: dataclasses.Field
    hint: Any
    extra_choices: list[str] | None


def _is_paddlenlp_training_args(cls: type) -> bool:
    return any(
        base.__name__ == "TrainingArguments" and base.__module__.startswith("paddlenlp")
        for base in cls.__mro__
    )


def _field_index(dataclass_types: Sequence[type]) -> dict[str, list[_Target]]:
    index: dict[str, list[_Target]] = {}
    for i, cls in enumerate(dataclass_types):
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        hints = typing.get_type_hints(cls)
        training = _is_paddlenlp_training_args(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            hint = hints.get(f.name, str)
            if f.default is None and not _allows_none(hint):
                hint = hint | None  # e.g. paddlenlp's ``eval_steps: int = None``
            extra = _training_choices(f.name) if training else None
            index.setdefault(f.name, []).append(_Target(i, f, hint, extra))
    return index


# ----------------------------------------------------------------------------- type conversion


def _is_text(hint: Any) -> bool:
    """str or list[str]: there "none"/"null" may be real values (``chat_template none``, ``report_to none``)."""
    return hint is str or (typing.get_origin(hint) is list and typing.get_args(hint) in ((str,), ()))


def _allows_none(hint: Any) -> bool:
    return hint is Any or type(None) in typing.get_args(hint) and _is_union(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _strip_optional(hint: Any) -> Any:
    if _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return typing.Union[tuple(args)]  # noqa: UP007
    return hint


def _type_name(hint: Any) -> str:
    inner = _strip_optional(hint)
    origin = typing.get_origin(inner)
    if origin is list:
        (item,) = typing.get_args(inner) or (str,)
        name = f"a list of {_type_name(item)}"
    elif origin is typing.Literal:
        name = f"one of {list(typing.get_args(inner))}"
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        name = f"one of {[e.value for e in inner]}"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if _allows_none(hint) else name


class _BadValue(Exception):
    """Raised by converters; turned into a ConfigError with key and source."""

    def __init__(self, expected: str | None = None):
        super().__init__(expected)
        self.expected = expected


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # "continue_training": 1 in PaddleNLP's JSONs
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise _BadValue()


def _to_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _BadValue()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            try:
                as_float = float(value)
            except ValueError:
                raise _BadValue() from None
            if as_float.is_integer():
                return int(as_float)
    raise _BadValue()


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _BadValue()
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    raise _BadValue()


def _convert(value: Any, hint: Any, from_cli: bool) -> Any:
    """Convert a JSON value or CLI string to ``hint``; raises :class:`_BadValue`."""
    if hint is Any:
        return value
    if _allows_none(hint):
        if value is None:
            return None
        inner = _strip_optional(hint)
        if isinstance(value, str) and (value == "None" or (value == "null" and not _is_text(inner))):
            return None
        return _convert(value, inner, from_cli)
    if value is None:
        raise _BadValue()
    origin = typing.get_origin(hint)
    if _is_union(hint):
        for option in typing.get_args(hint):
            try:
                return _convert(value, option, from_cli)
            except _BadValue:
                continue
        raise _BadValue()
    if origin is list:
        (item,) = typing.get_args(hint) or (str,)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise _BadValue()
        return [_convert(v, item, from_cli) for v in value]
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise _BadValue(f"one of {list(choices)}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        valid = [e.value for e in hint]
        if value in valid:
            return value  # paddlenlp converts the string to the enum in __post_init__
        raise _BadValue(f"one of {valid}")
    if hint is bool:
        return _to_bool(value)
    if hint is int:
        return _to_int(value)
    if hint is float:
        return _to_float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _BadValue()
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _BadValue()


def _check_choices(value: Any, target: _Target) -> str | None:
    """Return the expected-values text if ``value`` is not an allowed choice, else None."""
    choices = target.field.metadata.get("choices") or target.extra_choices
    if not choices or value is None or not isinstance(value, str):
        return None
    if target.field.name == "sharding":
        words = value.split()
        return None if all(w in choices for w in words) else f"space-separated words from {choices}"
    return None if value in choices else f"one of {choices}"


def _show(value: Any, from_cli: bool) -> str:
    if from_cli:
        return repr(value)
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def _where(source: str) -> str:
    return "on the command line" if source == COMMAND_LINE else f"in {source}"


# ----------------------------------------------------------------------------- inputs


def load_json_config(path: str) -> dict[str, Any]:
    """Read a JSON argument file; missing/invalid files raise ConfigError naming file:line:col."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory, expected a .json file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                logger.warning("duplicate key %r in %s; the last value wins", key, path)
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid JSON in {path}:{err.lineno}:{err.colno}: {err.msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} must hold a JSON object of argument names to values, got {type(data).__name__}"
        )
    return data


def _cli_pairs(tokens: Sequence[str], index: dict[str, list[_Target]]) -> list[tuple[str, str, Any]]:
    """Split CLI tokens into (key, spelling, value) triples; a bare bool flag gets True."""
    pairs: list[tuple[str, str, Any]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or token == "--":
            hint = " (a .json config file must be the first argument)" if token.endswith(".json") else ""
            raise ConfigError(f"unexpected argument {token!r} on the command line{hint}")
        spelled, has_eq, inline = token[2:].partition("=")
        key = spelled.replace("-", "_")
        if key not in index:
            _unknown(spelled, COMMAND_LINE, index)
        hint = _strip_optional(index[key][0].hint)
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        if has_eq:
            pairs.append((key, spelled, inline))
            i += 1
        elif hint is bool and (nxt is None or nxt.startswith("--")):
            pairs.append((key, spelled, True))
            i += 1
        elif typing.get_origin(hint) is list:
            values = []
            i += 1
            while i < len(tokens) and not tokens[i].startswith("--"):
                values.append(tokens[i])
                i += 1
            if not values:
                raise ConfigError(f"argument {spelled!r} on the command line expects a value")
            pairs.append((key, spelled, ",".join(values)))
        else:
            if nxt is None or (nxt.startswith("--") and nxt != "--"):
                raise ConfigError(f"argument {spelled!r} on the command line expects a value")
            pairs.append((key, spelled, nxt))
            i += 2
    return pairs


def _unknown(key: str, source: str, index: dict[str, list[_Target]]) -> typing.NoReturn:
    close = difflib.get_close_matches(key.replace("-", "_"), list(index), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown argument {key!r} {_where(source)}{hint}")


def format_help(dataclass_types: Sequence[type]) -> str:
    """Usage text listing every argument with its type, default and help."""
    lines = ["usage: script.py [config.json] [--key value ...]", ""]
    for cls in dataclass_types:
        lines.append(f"{cls.__name__}:")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = (
                "required" if f.default is _MISSING and f.default_factory is _MISSING else repr(f.default)
            )
            if f.default is _MISSING and f.default_factory is not _MISSING:
                default = "(factory)"
            helptext = f.metadata.get("help", "")
            lines.append(
                f"  --{f.name} {_type_name(hints.get(f.name, str))} [default: {default}]  {helptext}"
            )
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main entry


def parse_arguments(dataclass_types: Sequence[type] | type, argv: Sequence[str] | None = None) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``) into one instance per dataclass, in order.

    ``argv[0]`` may be a ``.json`` file whose values the remaining ``--key value``,
    ``--key=value`` or bare ``--flag`` arguments override. A key present in several dataclasses
    is given to all of them. ``--help`` prints the arguments and exits with code 0.
    Raises :class:`ConfigError` for unknown keys, ill-typed values, missing required values and
    errors from a dataclass ``__post_init__``.
    """
    if isinstance(dataclass_types, type):
        dataclass_types = (dataclass_types,)
    dataclass_types = tuple(dataclass_types)
    argv = list(sys.argv[1:] if argv is None else argv)
    index = _field_index(dataclass_types)

    if any(a in ("-h", "--help") for a in argv):
        print(format_help(dataclass_types))
        raise SystemExit(0)

    raw: list[tuple[str, str, Any, str]] = []  # (key, spelling, value, source)
    if argv and argv[0].endswith(".json"):
        path = argv.pop(0)
        for key, value in load_json_config(path).items():
            if key not in index:
                _unknown(key, path, index)
            raw.append((key, key, value, path))
    for key, spelled, value in _cli_pairs(argv, index):
        raw.append((key, spelled, value, COMMAND_LINE))

    latest = {key: (key, spelled, value, source) for key, spelled, value, source in raw}  # CLI overrides JSON
    kwargs: list[dict[str, Any]] = [{} for _ in dataclass_types]
    for key, spelled, value, source in latest.values():
        from_cli = source == COMMAND_LINE
        for target in index[key]:
            try:
                converted = _convert(value, target.hint, from_cli)
            except _BadValue as bad:
                expected = bad.expected or _type_name(target.hint)
                raise ConfigError(
                    f"argument {spelled!r} {_where(source)} expects {expected}, got {_show(value, from_cli)}"
                ) from None
            problem = _check_choices(converted, target)
            if problem:
                raise ConfigError(
                    f"argument {spelled!r} {_where(source)} expects {problem}, got {_show(value, from_cli)}"
                )
            kwargs[target.index][key] = converted

    results = []
    for cls, values in zip(dataclass_types, kwargs):
        for f in dataclasses.fields(cls):
            if f.init and f.default is _MISSING and f.default_factory is _MISSING and f.name not in values:
                raise ConfigError(
                    f"missing required argument {f.name!r}; set it in the JSON file or pass --{f.name} VALUE"
                )
        try:
            results.append(cls(**values))
        except UserError:
            raise
        except (ValueError, AssertionError) as err:
            message = " ".join(str(err).split()) or type(err).__name__
            raise ConfigError(f"invalid {cls.__name__}: {message}") from None
    return tuple(results)
