"""Name-mapping rules between Hugging Face and paddlenlp state dicts, usable in both directions.

A :class:`Rule` pairs an HF name template with one or more paddle name templates (``{L}`` = layer index,
``{E}`` = expert index) and an operation:

* ``copy``   — same array (embeddings, norms, biases, Conv1D weights)
* ``T``      — 2-D transpose (``torch.nn.Linear`` stores ``[out, in]``, ``paddle.nn.Linear`` ``[in, out]``)
* ``chunk``  — one HF tensor is the concatenation of the paddle tensors along the last axis (GPT-2 ``c_attn``)
* ``zero``   — the HF tensor has no paddle counterpart and is accepted only when it is all zeros

``shape`` is the HF tensor's shape in config symbols (``"I,H"``: intermediate x hidden, see
:mod:`llm.convert.shapes`); the paddle shape follows from the op (``pd_shape`` gives it for ``chunk``).

:func:`plan` turns a list of source names into :class:`Step` s (target name, source names, op, index);
:func:`expected_targets` lists every name a complete checkpoint must produce, so gaps are caught early.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm.convert.tensors import Tensor
from llm.errors import ModelError

_PLACEHOLDER = re.compile(r"\{(L|E)\}")


@functools.lru_cache(maxsize=4096)
def _compile(template: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(template)
    out = []
    for i, part in enumerate(parts):
        out.append(f"(?P<{part}>\\d+)" if i % 2 else re.escape(part))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class Rule:
    """One HF <-> paddle name mapping (see module docstring); ``when(paddle_config)`` enables it."""

    hf: str
    pd: tuple[str, ...]
    op: str = "copy"
    to_pd: bool = True
    to_hf: bool = True
    when: Callable[[Any], bool] | None = None
    shape: str = ""
    pd_shape: str = ""

    def enabled(self, config: Any) -> bool:
        return self.when is None or bool(self.when(config))


def R(hf: str, pd: str | tuple[str, ...], op: str = "copy", **kw: Any) -> Rule:  # noqa: N802 - short ctor
    """Shorthand: ``R("model.norm.weight", "llama.norm.weight")``."""
    return Rule(hf, (pd,) if isinstance(pd, str) else tuple(pd), op, **kw)


@dataclass
class Step:
    """Produce ``target`` from ``sources`` with ``op`` (``index`` picks the chunk of a ``chunk`` op)."""

    target: str
    sources: list[str]
    op: str
    index: int = 0
    parts: int = 1
    shape: str = ""  # the HF tensor's shape template (see Rule)
    pd_shape: str = ""


@dataclass
class RuleSet:
    """The rules of one family plus the source names to skip silently."""

    rules: list[Rule]
    ignore_hf: list[str] = field(default_factory=list)
    ignore_pd: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._ign_hf = [re.compile(p + r"\Z") for p in self.ignore_hf]
        self._ign_pd = [re.compile(p + r"\Z") for p in self.ignore_pd]

    def ignored(self, name: str, direction: str) -> bool:
        pats = self._ign_hf if direction == "to_pd" else self._ign_pd
        return any(p.match(name) for p in pats)


def _fill(template: str, groups: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: groups[m.group(1)], template)


def plan(ruleset: RuleSet, names: Iterable[str], direction: str, config: Any) -> tuple[list[Step], list[str]]:
    """Steps that convert the ``names`` of a checkpoint (``direction`` ``to_pd`` or ``to_hf``).

    Returns ``(steps, unknown_names)``; zero-checks are steps with an empty target.
    """
    rules = [r for r in ruleset.rules if r.enabled(config) and getattr(r, direction)]
    known = set(names)
    steps: dict[str, Step] = {}
    checks: list[Step] = []
    unknown: list[str] = []
    for name in names:
        matched = False
        for rule in rules:
            if direction == "to_pd":
                m = _compile(rule.hf).match(name)
                if not m:
                    continue
                matched = True
                groups = m.groupdict()
                if rule.op == "zero":
                    checks.append(Step("", [name], "zero"))
                for i, tmpl in enumerate(rule.pd):
                    target = _fill(tmpl, groups)
                    step = Step(target, [name], rule.op, i, len(rule.pd), rule.shape, rule.pd_shape)
                    steps.setdefault(target, step)
            else:
                for tmpl in rule.pd:
                    m = _compile(tmpl).match(name)
                    if not m:
                        continue
                    matched = True
                    groups = m.groupdict()
                    target = _fill(rule.hf, groups)
                    sources = [_fill(t, groups) for t in rule.pd]
                    if target in steps:
                        break
                    missing = [s for s in sources if s not in known]
                    if missing:
                        raise ModelError(f"cannot export '{target}': the checkpoint lacks '{missing[0]}'")
                    op = "concat" if rule.op == "chunk" else rule.op
                    steps[target] = Step(target, sources, op, 0, len(sources), rule.shape, rule.pd_shape)
                    break
        if not matched:
            pd_only = direction == "to_hf" and any(
                _compile(t).match(name)
                for r in ruleset.rules
                if r.enabled(config) and not r.to_hf
                for t in r.pd
            )
            if not pd_only and not ruleset.ignored(name, direction):
                unknown.append(name)
    return checks + list(steps.values()), unknown


def expected_targets(
    ruleset: RuleSet, config: Any, layers: int, experts: int = 0, direction: str = "to_pd"
) -> dict[str, str]:
    """``{paddle_name: hf_name}`` for every paddle weight of a complete model under the enabled rules.

    ``to_pd``: the names a conversion must produce; ``to_hf``: the names an export must find.
    """
    out: dict[str, str] = {}
    for rule in ruleset.rules:
        if not getattr(rule, direction) or rule.op == "zero" or not rule.enabled(config):
            continue
        for tmpl in rule.pd:
            for layer in range(layers) if "{L}" in tmpl else [None]:
                for expert in range(experts) if "{E}" in tmpl else [None]:
                    groups = {"L": str(layer), "E": str(expert)}
                    out.setdefault(_fill(tmpl, groups), _fill(rule.hf, groups))
    return out


def out_shape(step: Step, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """Shape of a step's result from its source shapes (raises ModelError when a chunk does not divide)."""
    first = shapes[0]
    if step.op == "T":
        if len(first) != 2:
            raise ModelError(f"'{step.sources[0]}' should be a matrix, found shape {list(first)}")
        return (first[1], first[0])
    if step.op == "chunk":
        if first[-1] % step.parts:
            raise ModelError(
                f"'{step.sources[0]}' (shape {list(first)}) does not split into {step.parts} parts"
            )
        return (*first[:-1], first[-1] // step.parts)
    if step.op == "concat":
        return (*first[:-1], sum(s[-1] for s in shapes))
    return tuple(first)


def apply(step: Step, tensors: list[Tensor]) -> Tensor:
    """Run a step's op on its source tensors (dtype unchanged)."""
    first = tensors[0]
    if step.op == "T":
        return Tensor(np.ascontiguousarray(first.array.T), first.dtype)
    if step.op == "chunk":
        size = first.array.shape[-1] // step.parts
        part = first.array[..., step.index * size : (step.index + 1) * size]
        return Tensor(np.ascontiguousarray(part), first.dtype)
    if step.op == "concat":
        return Tensor(np.concatenate([t.array for t in tensors], axis=-1), first.dtype)
    return first
