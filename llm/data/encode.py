"""Example -> features (spec §3.7 and §4.5).

Design decisions:

* **No template, multi-turn data**: only the first turn (``src[0]``/``tgt[0]``) is used, exactly as
  paddlenlp's ``tokenize_example`` does for training and as the predictor does (spec §4.3), so training and
  prediction see the same prompt. A warning is logged once.
* **No template**: the prompt is tokenized with special tokens and left-truncated to ``src_length`` (the
  special tokens survive the cut); the target without special tokens is cut to ``max_length - len(src)``;
  EOS is appended only if the (possibly cut) target is shorter than that budget (paddlenlp's rule).
* **With a template**: system + rounds from :meth:`ChatTemplate.encode_training` (each bot segment already
  ends with a stop token, see ``llm.templates``). Labels are -100 on system and user segments. The newest
  rounds are kept and the oldest dropped whole while the total exceeds ``max_length``; if the newest round
  alone is too long, its user part is left-truncated to ``src_length - len(system)`` (keeping the
  generation prompt) and the bot part is cut to what remains.
* Training features are shifted (``input_ids[:-1]``, ``labels[1:]``): paddlenlp CausalLM losses don't shift.
* ``for_generation=True``: ``input_ids`` is the prompt only (same truncation as :func:`build_prompt_ids`,
  bounded by ``src_length``) and ``labels`` is the last target tokenized without special tokens.
"""

from __future__ import annotations

import logging
from typing import Any

from llm.data.reader import Example
from llm.errors import DataError, UserError

logger = logging.getLogger(__name__)
IGNORE_INDEX = -100
_warned: set[str] = set()


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg, *args)


def encode_source(tokenizer: Any, text: str, src_length: int) -> list[int]:
    """``text`` with special tokens, left-truncated to ``src_length`` ids (BOS/EOS markers are kept)."""
    full = list(tokenizer.encode(text, add_special_tokens=True))
    if len(full) <= src_length:
        return full
    body = list(tokenizer.encode(text, add_special_tokens=False))
    prefix: list[int] = []
    suffix: list[int] = []
    for k in range(len(full) - len(body) + 1):
        if full[k : k + len(body)] == body:
            prefix, suffix = full[:k], full[k + len(body) :]
            break
    keep = max(src_length - len(prefix) - len(suffix), 0)
    return prefix + (body[len(body) - keep :] if keep else []) + suffix


def _shift(input_ids: list[int], labels: list[int]) -> dict[str, list[int]]:
    return {"input_ids": input_ids[:-1], "labels": labels[1:]}


def build_prompt_ids(
    tokenizer: Any,
    template: Any,
    history: list[tuple[str, str]],
    query: str,
    src_length: int,
    context: dict[str, Any] | None = None,
) -> list[int]:
    """Prompt ids for generation, at most ``src_length`` long (shared by eval and the predictor).

    Without a template only ``query`` is used (left-truncated). With one, the oldest history rounds are
    dropped whole while too long; then the final user segment is left-truncated.
    """
    if template is None:
        return encode_source(tokenizer, query, src_length)
    system, pairs, final = template.encode_segments(tokenizer, history, query, context)
    final = final or []
    if len(system) >= src_length:
        raise DataError(f"the system prompt has {len(system)} tokens, not fewer than src_length={src_length}")
    budget = src_length - len(system) - len(final)
    kept: list[int] = []
    for user, bot in reversed(pairs):
        if len(kept) + len(user) + len(bot) > budget:
            break
        kept = user + bot + kept
    if budget < 0:
        final = final[len(final) - (src_length - len(system)) :]
    return system + kept + final


def _encode_plain(
    ex: Example, tokenizer: Any, src_length: int, max_length: int, for_generation: bool
) -> dict:
    if len(ex.src) > 1:
        _warn_once(
            "multi-turn",
            "%s:%d: multi-turn example without a chat template: only the first turn is used",
            ex.path,
            ex.line,
        )
    src_ids = encode_source(tokenizer, ex.src[0], src_length)
    if for_generation:
        return {"input_ids": src_ids, "labels": list(tokenizer.encode(ex.tgt[0], add_special_tokens=False))}
    budget = max_length - len(src_ids)
    tgt_ids = list(tokenizer.encode(ex.tgt[0], add_special_tokens=False))[: max(budget, 0)]
    if len(tgt_ids) < budget:  # not truncated: teach the model to stop
        tgt_ids.append(tokenizer.eos_token_id)
    return _shift(src_ids + tgt_ids, [IGNORE_INDEX] * len(src_ids) + tgt_ids)


def _encode_rounds(
    ex: Example, tokenizer: Any, template: Any, src_length: int, max_length: int, for_generation: bool
) -> dict:
    rounds = list(zip(ex.src, ex.tgt))
    if for_generation:
        prompt = build_prompt_ids(tokenizer, template, rounds[:-1], ex.src[-1], src_length, ex.context)
        return {"input_ids": prompt, "labels": list(tokenizer.encode(ex.tgt[-1], add_special_tokens=False))}
    system, pairs = template.encode_training(tokenizer, rounds, ex.context)
    if len(system) >= max_length:
        raise DataError(f"the system prompt has {len(system)} tokens, not fewer than max_length={max_length}")
    budget = max_length - len(system)
    input_ids: list[int] = []
    labels: list[int] = []
    for index in range(len(pairs) - 1, -1, -1):
        user, bot = pairs[index]
        too_long = len(input_ids) + len(user) + len(bot) > budget
        if too_long and index < len(pairs) - 1:
            break  # older rounds are dropped whole
        if too_long:  # the newest round alone is too long
            keep_user = min(len(user), max(1, min(src_length - len(system), budget - 1)))
            user = user[len(user) - keep_user :]
            bot = bot[: max(budget - len(user), 0)]
        input_ids = user + bot + input_ids
        labels = [IGNORE_INDEX] * len(user) + bot + labels
        if too_long:
            break
    return _shift(system + input_ids, [IGNORE_INDEX] * len(system) + labels)


def encode_example(
    ex: Example, tokenizer: Any, template: Any, src_length: int, max_length: int, for_generation: bool = False
) -> dict[str, list[int]]:
    """Features ``{"input_ids", "labels"}`` of one example (see the module docstring for the rules)."""
    try:
        if template is None:
            return _encode_plain(ex, tokenizer, src_length, max_length, for_generation)
        return _encode_rounds(ex, tokenizer, template, src_length, max_length, for_generation)
    except DataError as err:
        if err.path is None:
            raise DataError(str(err), ex.path, ex.line) from None
        raise
    except UserError as err:  # e.g. a template error on this sample's context
        raise DataError(str(err), ex.path, ex.line) from None


def has_supervision(features: dict[str, list[int]]) -> bool:
    """True if at least one label is not ``-100`` (training features that can contribute to the loss)."""
    return any(label != IGNORE_INDEX for label in features["labels"])
