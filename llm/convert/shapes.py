"""Check every source tensor against the shape and dtype the target config implies, before anything is written.

Each conversion rule carries its Hugging Face shape as config symbols (``"I,H"``, see :mod:`llm.convert.specs`);
:func:`sizes` resolves the symbols of one family from the paddlenlp config (the target of HF -> paddle, the
source of paddle -> HF). The paddle shape follows from the rule's op (``T`` reverses it, ``copy`` keeps it,
``chunk`` parts are given as ``pd_shape``). A square matrix cannot reveal a transpose; every other wrong
orientation, wrong size and non-floating tensor is refused with one line naming the tensor, the expected
shape and the shape found.
"""

from __future__ import annotations

from typing import Any

from llm.convert.checkpoint import Checkpoint
from llm.convert.rules import Step
from llm.errors import ModelError

Sizes = dict[str, tuple[str, int]]
FLOATING = ("float64", "float32", "float16", "bfloat16")


def _int(cfg: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    return None


def _put(out: Sizes, symbol: str, label: str, value: int | None) -> None:
    if value is not None:
        out[symbol] = (label, int(value))


def sizes(spec_name: str, cfg: Any) -> Sizes:
    """``{symbol: (label, size)}`` of one family's paddlenlp config (symbols a config lacks are left out)."""
    out: Sizes = {}
    hidden = _int(cfg, "hidden_size")
    heads = _int(cfg, "num_attention_heads", "n_head")
    _put(out, "V", "vocab_size", _int(cfg, "vocab_size"))
    _put(out, "H", "hidden_size", hidden)
    if hidden is None:
        return out
    _put(out, "3H", "3*hidden_size", 3 * hidden)
    _put(out, "4H", "4*hidden_size", 4 * hidden)
    inter = _int(cfg, "intermediate_size")
    if spec_name in ("llama", "qwen2", "mixtral"):
        _put(out, "I", "intermediate_size", inter)
        if heads:
            kv = _int(cfg, "num_key_value_heads") or heads
            _put(out, "KV", "num_key_value_heads*head_dim", kv * (hidden // heads))
        _put(out, "E", "num_local_experts", _int(cfg, "num_local_experts"))
    elif spec_name == "qwen":
        channels = _int(cfg, "kv_channels")
        if channels is not None and heads:
            _put(out, "P", "kv_channels*num_attention_heads", channels * heads)
            _put(out, "3P", "3*kv_channels*num_attention_heads", 3 * channels * heads)
        _put(out, "I2", "intermediate_size/2", None if inter is None else inter // 2)
    elif spec_name == "chatglm_v2":
        _put(out, "V", "padded_vocab_size", _int(cfg, "padded_vocab_size", "vocab_size"))
        groups = _int(cfg, "multi_query_group_num")
        if heads and groups:
            label = "hidden_size+2*kv_channels*multi_query_group_num"
            _put(out, "QKV", label, hidden + 2 * (hidden // heads) * groups)
        ffn = _int(cfg, "ffn_hidden_size")
        _put(out, "F", "ffn_hidden_size", ffn)
        _put(out, "2F", "2*ffn_hidden_size", None if ffn is None else 2 * ffn)
    elif spec_name == "gpt":
        _put(out, "I", "intermediate_size", inter)
        _put(out, "P", "max_position_embeddings", _int(cfg, "max_position_embeddings"))
    elif spec_name == "opt":
        _put(out, "F", "intermediate_size", inter)
        positions = _int(cfg, "max_position_embeddings")
        _put(out, "P2", "max_position_embeddings+2", None if positions is None else positions + 2)
    return out


def resolve(template: str, table: Sizes) -> tuple[tuple[int, ...], str] | None:
    """``(shape, "label x label")`` of a template, or ``None`` when a symbol is unknown (nothing to check)."""
    if not template:
        return None
    dims = [table.get(symbol) for symbol in template.split(",")]
    if any(d is None for d in dims):
        return None
    return tuple(d[1] for d in dims), " x ".join(d[0] for d in dims)  # type: ignore[index]


def _pd_template(step: Step) -> str:
    """The paddle-side template of a step: its ``pd_shape``, else derived from the HF one by the op."""
    if step.pd_shape or not step.shape:
        return step.pd_shape
    if step.op == "T":
        return ",".join(reversed(step.shape.split(",")))
    return step.shape if step.op == "copy" else ""


def _expected(step: Step, direction: str) -> str:
    return step.shape if direction == "to_pd" else _pd_template(step)


def _problem(name: str, found: tuple[int, ...], dtype: str, want: tuple[tuple[int, ...], str] | None) -> str:
    if dtype not in FLOATING:
        return f"{name}: expected a floating-point tensor (float32, float16 or bfloat16), found {dtype}"
    if want is None or tuple(found) == want[0]:
        return ""
    shape, label = want
    hint = (
        " (transposed?)" if len(shape) == 2 and shape[0] != shape[1] and tuple(found) == shape[::-1] else ""
    )
    return f"{name}: expected {list(shape)} ({label}), found {list(found)}{hint}"


def check_tensors(
    ckpt: Checkpoint, steps: list[Step], spec_name: str, cfg: Any, direction: str, where: str
) -> None:
    """Refuse (one :class:`ModelError` line) the first source tensor of ``steps`` whose shape differs from the
    one ``cfg`` implies, or that is not floating point; reads headers only (whole files for pickles)."""
    table = sizes(spec_name, cfg)
    order = {name: i for i, name in enumerate(ckpt.files)}
    wanted: dict[str, str] = {}
    for step in steps:
        if step.op == "zero":
            continue
        for source in step.sources:
            wanted.setdefault(source, _expected(step, direction))
    problems = []
    for name in sorted(wanted, key=lambda n: order.get(ckpt.key_file.get(n, ""), 0)):
        found, dtype = ckpt.info(name)
        problem = _problem(name, found, dtype, resolve(wanted[name], table))
        if problem:
            problems.append(problem)
    if problems:
        more = f" (and {len(problems) - 1} more tensors that do not fit)" if len(problems) > 1 else ""
        raise ModelError(f"{where}: {problems[0]}{more}; is the checkpoint corrupt or for another config?")
