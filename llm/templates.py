"""Chat templates: one code path for training and inference.

Two template kinds are supported:

* **paddlenlp** ``chat_template.json``: ``{"system", "conversation": [user_tmpl, bot_tmpl], "query"}`` jinja
  strings using ``{{user}}``/``{{bot}}``/``{{query}}``; ``system`` may use the sample's ``context`` vars.
* **jinja** (HF ``chat_template`` string over ``messages``, ``add_generation_prompt``, ``bos_token``...).
  It is split into segments by rendering incrementally: ``messages[:k]`` is rendered for growing ``k`` and
  the string differences are the segments (the user segment of a round includes the generation prompt).
  Every rendering must extend the previous one, otherwise the template cannot be split and a
  ``ConfigError`` says so.

**Tokenization rule.** Each segment (system, user_i, bot_i, final user) is tokenized *separately* with
``add_special_tokens=False`` (the template carries BOS and markers) and the ids are concatenated. Training
(:meth:`ChatTemplate.encode_training`) and inference (:meth:`ChatTemplate.encode_prompt`) use the same
segments, so ``system + u1 + b1 + ... + u_n`` from training equals the inference prompt for
``history=rounds[:-1], query=u_n`` token for token. The ids can differ from tokenizing the whole rendered
string at once (BPE merges never cross a segment boundary); always use ``encode_prompt`` for model input.

**Stop token.** A bot segment whose ids do not already end with a stop id (``tokenizer.eos_token_ids``,
ignoring trailing whitespace-only tokens) gets ``eos_token_id`` appended, in training and in the history
of inference prompts alike, so every supervised answer teaches the model to stop.

**paddlenlp kind details.** The final (unanswered) user turn is rendered with the ``conversation`` user
template, the one training uses, so the two paths agree; ``query`` is only used when ``conversation`` is
missing (a warning is logged if it differs from the user template). Round variables: ``index``,
``is_first``, ``is_last``, ``length`` (rounds including the final query), ``is_training`` (from the context,
default False; identical in both paths), plus ``bos_token``/``eos_token`` and the context dict.

**jinja kind details.** ``context["system"]`` (a non-empty string) becomes a leading system message; all
context keys are also passed as template variables.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm.errors import ConfigError
from llm.fileio import try_read_json

logger = logging.getLogger(__name__)

Rounds = list[tuple[str, str]]
Segments = tuple[str, list[tuple[str, str]], "str | None"]


class _TemplateRaise(Exception):
    """Raised by ``raise_exception(...)`` inside a template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaise(message)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


def _env(kind: str) -> jinja2.Environment:
    if kind == "jinja":  # same settings as HF transformers
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    else:  # same settings as paddlenlp's ChatTemplate
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = _raise_exception
    return env


def _norm_slot(text: str) -> str:
    return re.sub(r"\{\{\s*(query|user)\s*\}\}", "{{user}}", text)


class ChatTemplate:
    """A chat template (paddlenlp dict or HF jinja string) that encodes training and inference alike."""

    def __init__(self, kind: str, source: dict[str, Any] | str, origin: str | None = None):
        if kind not in ("paddlenlp", "jinja"):
            raise ValueError(f"unknown chat template kind {kind!r}")
        self.kind = kind
        self.source = source
        self.origin = origin or "<chat_template>"
        self.special_tokens: dict[str, str] = {}
        self._compiled: dict[str, jinja2.Template | None] | None = None
        self._compile()  # surface syntax errors at load time

    @classmethod
    def from_paddlenlp(cls, d: dict[str, Any], origin: str | None = None) -> ChatTemplate:
        """From a paddlenlp ``chat_template.json`` dict (``system``, ``conversation``, ``query``)."""
        where = origin or "chat_template"
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: a paddlenlp chat template must be a JSON object")
        unknown = sorted(set(d) - {"system", "conversation", "query"})
        if unknown:
            logger.warning("%s: ignoring unknown chat template keys %s", where, unknown)
        for key in ("system", "query"):
            if d.get(key) is not None and not isinstance(d[key], str):
                raise ConfigError(f"{where}: '{key}' must be a string")
        conv = d.get("conversation")
        if conv is not None and not (
            isinstance(conv, list) and len(conv) == 2 and all(isinstance(c, str) for c in conv)
        ):
            raise ConfigError(f"{where}: 'conversation' must be a list of exactly two strings [user, bot]")
        source = {k: d[k] for k in ("system", "conversation", "query") if d.get(k) is not None}
        if conv is not None and "query" in source and _norm_slot(source["query"]) != _norm_slot(conv[0]):
            logger.warning(
                "%s: 'query' differs from the conversation user template; the user template is used for the "
                "final turn so that inference prompts match training",
                where,
            )
        return cls("paddlenlp", source, origin)

    @classmethod
    def from_jinja(cls, source: str | list[dict[str, Any]], origin: str | None = None) -> ChatTemplate:
        """From an HF jinja ``chat_template`` string (or HF's list of named templates: "default" wins)."""
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next((v for v in named.values() if isinstance(v, str)), None)
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(
                f"{origin or 'chat_template'}: a jinja chat template must be a non-empty string"
            )
        return cls("jinja", source, origin)

    # ---------------------------------------------------------------- compile / pickle
    def _compile(self) -> dict[str, jinja2.Template | None]:
        if self._compiled is None:
            env = _env(self.kind)
            try:
                if self.kind == "jinja":
                    self._compiled = {"main": env.from_string(self.source)}  # type: ignore[arg-type]
                else:
                    d: dict[str, Any] = self.source  # type: ignore[assignment]
                    conv = d.get("conversation") or [d.get("query") or "{{user}}", "{{bot}}"]
                    self._compiled = {
                        "system": env.from_string(d["system"]) if d.get("system") else None,
                        "user": env.from_string(conv[0]),
                        "bot": env.from_string(conv[1]),
                    }
            except jinja2.TemplateSyntaxError as err:
                raise ConfigError(f"{self.origin}: chat template syntax error: {err}") from None
        return self._compiled

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None
        return state

    @property
    def source_text(self) -> str:
        """The template source as text (a stable JSON dump for paddlenlp dicts); part of cache keys."""
        if isinstance(self.source, str):
            return self.source
        return json.dumps(self.source, ensure_ascii=False, sort_keys=True)

    def __repr__(self) -> str:
        return f"ChatTemplate(kind={self.kind!r}, origin={self.origin!r})"

    # ---------------------------------------------------------------- rendering
    def _render(self, name: str, variables: dict[str, Any]) -> str:
        tmpl = self._compile()[name]
        if tmpl is None:
            return ""
        try:
            return tmpl.render(**variables)
        except (jinja2.TemplateError, _TemplateRaise) as err:
            raise ConfigError(f"{self.origin}: chat template error: {err}") from None

    def render_segments(
        self,
        history: Rounds,
        query: str | None,
        context: dict[str, Any] | None = None,
        special_tokens: dict[str, str] | None = None,
    ) -> Segments:
        """Strings ``(system, [(user_i, bot_i)], final_user)``; ``final_user`` is None without a query."""
        ctx = dict(context or {})
        tokens = dict(self.special_tokens if special_tokens is None else special_tokens)
        if self.kind == "paddlenlp":
            return self._segments_paddlenlp(history, query, ctx, tokens)
        return self._segments_jinja(history, query, ctx, tokens)

    def _segments_paddlenlp(self, history: Rounds, query: str | None, ctx: dict, tokens: dict) -> Segments:
        n = len(history) + (query is not None)
        base = {**tokens, **ctx, "is_training": ctx.get("is_training", False), "length": n}
        system = self._render("system", base)

        def round_vars(i: int, user: str, bot: str) -> dict[str, Any]:
            extra = {"index": i, "is_first": i == 0, "is_last": i == n - 1, "user": user, "query": user}
            return {**base, **extra, "bot": bot}

        rounds = []
        for i, (user, bot) in enumerate(history):
            v = round_vars(i, user, bot)
            rounds.append((self._render("user", v), self._render("bot", v)))
        final = None if query is None else self._render("user", round_vars(n - 1, query, ""))
        return system, rounds, final

    def _segments_jinja(self, history: Rounds, query: str | None, ctx: dict, tokens: dict) -> Segments:
        variables = {**tokens, **ctx}
        variables.pop("messages", None)
        variables.pop("add_generation_prompt", None)
        msgs: list[dict[str, str]] = []
        if isinstance(ctx.get("system"), str) and ctx["system"]:
            msgs.append({"role": "system", "content": ctx["system"]})

        def render(gen: bool) -> str:
            return self._render("main", {**variables, "messages": list(msgs), "add_generation_prompt": gen})

        try:
            prev = render(False)
        except ConfigError:  # e.g. the template indexes messages[0]; the system text lands in user_0
            prev = ""
        system = prev

        def extend(before: str, after: str, what: str) -> str:
            if not after.startswith(before):
                raise ConfigError(
                    f"{self.origin}: chat template cannot be split into segments: rendering {what} does not "
                    f"extend the previous rendering (expected a prefix {before[-40:]!r}, got {after[:80]!r}); "
                    "the template must render earlier messages identically as the conversation grows"
                )
            return after[len(before) :]

        rounds = []
        for i, (user, bot) in enumerate(history):
            msgs.append({"role": "user", "content": user})
            with_user = render(True)
            user_seg = extend(prev, with_user, f"user message {i + 1}")
            msgs.append({"role": "assistant", "content": bot})
            prev = render(False)
            rounds.append((user_seg, extend(with_user, prev, f"assistant message {i + 1}")))
        final = None
        if query is not None:
            msgs.append({"role": "user", "content": query})
            final = extend(prev, render(True), f"user message {len(history) + 1}")
        return system, rounds, final

    def render_prompt(
        self, history: Rounds, query: str, context: dict[str, Any] | None = None, tokenizer: Any = None
    ) -> str:
        """The prompt text (system + history + final user turn with the generation prompt).

        For display/serving text only: model ids must come from :meth:`encode_prompt` (per-segment
        tokenization, EOS appended to history answers where needed).
        """
        tokens = _token_vars(tokenizer) if tokenizer is not None else None
        system, rounds, final = self.render_segments(history, query, context, tokens)
        return system + "".join(u + b for u, b in rounds) + (final or "")

    # ---------------------------------------------------------------- encoding
    def encode_segments(
        self, tokenizer: Any, history: Rounds, query: str | None, context: dict[str, Any] | None = None
    ) -> tuple[list[int], list[tuple[list[int], list[int]]], list[int] | None]:
        """Ids ``(system, [(user_i, bot_i)], final_user)``; each segment tokenized on its own."""
        system, rounds, final = self.render_segments(history, query, context, _token_vars(tokenizer))
        pairs = [(_encode(tokenizer, u), _encode_bot(tokenizer, b)) for u, b in rounds]
        return _encode(tokenizer, system), pairs, None if final is None else _encode(tokenizer, final)

    def encode_training(
        self, tokenizer: Any, rounds: Rounds, context: dict[str, Any] | None = None
    ) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
        """System ids and ``[(user_ids, bot_ids)]`` per round; bot ids end with a stop token."""
        system, pairs, _ = self.encode_segments(tokenizer, rounds, None, context)
        return system, pairs

    def encode_prompt(
        self, tokenizer: Any, history: Rounds, query: str, context: dict[str, Any] | None = None
    ) -> list[int]:
        """Prompt ids for generation: system + history rounds + final user turn (with generation prompt)."""
        system, pairs, final = self.encode_segments(tokenizer, history, query, context)
        ids = list(system)
        for user, bot in pairs:
            ids += user + bot
        return ids + (final or [])


def _token_vars(tokenizer: Any) -> dict[str, str]:
    if hasattr(tokenizer, "special_token_vars"):
        return tokenizer.special_token_vars()
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    return {n: getattr(tokenizer, n, None) or "" for n in names}


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def _encode_bot(tokenizer: Any, text: str) -> list[int]:
    ids = _encode(tokenizer, text)
    stops = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    for idx in reversed(ids):
        if idx in stops:
            return ids
        if tokenizer.decode([idx], skip_special_tokens=False).strip():
            break
    return ids + [tokenizer.eos_token_id]


# -------------------------------------------------------------------- loading / selection
def load_template_file(path: str) -> ChatTemplate:
    """A template file: ``.json`` is a paddlenlp dict (or ``{"chat_template": ...}``), anything else jinja."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read chat template ({err.strerror})") from None
    if not path.endswith(".json"):
        return ChatTemplate.from_jinja(text, origin=path)
    try:
        data = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"{path}: invalid JSON in chat template ({err})") from None
    if isinstance(data, dict) and "chat_template" in data:
        return ChatTemplate.from_jinja(data["chat_template"], origin=path)
    return ChatTemplate.from_paddlenlp(data, origin=path)


def load_template_from_dir(directory: str) -> ChatTemplate | None:
    """The directory's template: chat_template.json, chat_template.jinja, then tokenizer_config.json."""
    for name in ("chat_template.json", "chat_template.jinja"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return load_template_file(path)
    path = os.path.join(directory, "tokenizer_config.json")
    value = try_read_json(path).get("chat_template")
    if value:
        return ChatTemplate.from_jinja(value, origin=path)
    return None


def resolve_chat_template(tokenizer: Any, model_name_or_path: str, value: str | None) -> ChatTemplate | None:
    """Select the chat template (spec §4.5) and store it on ``tokenizer.chat_template``.

    None keeps the tokenizer's own template; ``"none"`` removes it; ``model_name_or_path`` or a directory
    loads that directory's template; a file loads it (``.json`` paddlenlp dict, otherwise jinja text); an
    inline jinja string is accepted too.
    """
    if value is None:
        tmpl = getattr(tokenizer, "chat_template", None)
    elif value.strip().lower() == "none":
        tmpl = None
    elif os.path.isdir(value):
        tmpl = load_template_from_dir(value)
        if tmpl is None and value == model_name_or_path:
            logger.warning("%s: no chat template found; continuing without one", value)
        elif tmpl is None:
            raise ConfigError(
                f"chat_template: {value}: no chat template in this directory (expected chat_template.json "
                "or a 'chat_template' entry in tokenizer_config.json)"
            )
    elif value == model_name_or_path:
        tmpl = getattr(tokenizer, "chat_template", None)
    elif os.path.isfile(value):
        tmpl = load_template_file(value)
    elif "{{" in value or "{%" in value:
        tmpl = ChatTemplate.from_jinja(value, origin="chat_template")
    else:
        raise ConfigError(
            f"chat_template: {value}: no such file or directory (give a model directory, a "
            "chat_template.json or jinja file, or 'none')"
        )
    if tmpl is not None:
        tmpl.special_tokens = _token_vars(tokenizer)
    tokenizer.chat_template = tmpl
    return tmpl
