"""The two wire protocols: request bodies -> :class:`GenRequest`, results -> JSON bodies and stream chunks.

**PaddleNLP** ``POST /api/chat`` (spec §9.2): ``context`` is the new user turn; ``history`` holds the turns
BEFORE it (``["u1", "b1", ...]`` or ``[{"utterance": ...}, ...]``, as a list or a JSON string, even length),
so the prompt is ``[[u1, b1], ..., [context]]`` and the current turn appears once. ``max_length`` is the number
of new tokens, ``src_length`` (default: the server's) truncates the prompt from the left; their sum may not
exceed the server's ``src_length + max_length``. Every line of the response is one JSON object.

**OpenAI** ``/v1/chat/completions`` and ``/v1/completions``: the usual fields, plus ``top_k`` and
``repetition_penalty`` as extensions; a prompt longer than the server's ``src_length`` is refused,
``max_tokens`` is capped at its ``max_length``. Problems raise :class:`ApiError` (status, message, param).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llm.errors import UserError
from llm.serve.service import UNLIMITED, Sampling, Service

ROLES_SYSTEM = ("system", "developer")
MAX_STOPS = 16


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with a one-line ``message`` naming the field."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def openai_body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def paddle_body(self) -> dict[str, Any]:
        return {"error_code": 1, "error_msg": self.message}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 for a bad field."""
    return ApiError(400, message, param=param, code=code)


@dataclass
class GenRequest:
    """One parsed generation request."""

    prompt_ids: list[int]
    sampling: Sampling
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


# ------------------------------------------------------------------------------------------ field readers
def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (400 for anything else)."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad("the request body is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise bad(
            f"malformed JSON in the request body: {err.msg} (line {err.lineno} column {err.colno})"
        ) from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {_kind(body)}")
    return body


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _number(body: dict[str, Any], name: str, default: Any, *, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if integer and ok and isinstance(value, float):
        ok = value.is_integer()
    if not ok:
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {_kind(value)}", name)
    return int(value) if integer else float(value)


def get_int(
    body: dict[str, Any], name: str, default: int | None, lo: int | None = None, hi: int | None = None
) -> int | None:
    """An optional integer field within ``[lo, hi]``."""
    value = _number(body, name, default, integer=True)
    if value is not None and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(f"'{name}' must be {where}, got {value}", name)
    return value


def get_float(body: dict[str, Any], name: str, default: float, lo: float, hi: float | None = None) -> float:
    """An optional number field within ``[lo, hi]``."""
    value = _number(body, name, default)
    if value < lo or (hi is not None and value > hi):
        where = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(f"'{name}' must be {where}, got {value}", name)
    return value


def get_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {_kind(value)}", name)
    return value


def sampling_of(body: dict[str, Any], defaults: Sampling) -> Sampling:
    """``top_k``, ``top_p``, ``temperature``, ``repetition_penalty`` (omitted: the server's defaults)."""
    penalty = get_float(body, "repetition_penalty", defaults.repetition_penalty, 0.0)
    if penalty == 0:
        raise bad("'repetition_penalty' must be > 0, got 0", "repetition_penalty")
    return Sampling(
        top_k=get_int(body, "top_k", defaults.top_k, 0),  # type: ignore[arg-type]
        top_p=get_float(body, "top_p", defaults.top_p, 0.0, 1.0),
        temperature=get_float(body, "temperature", defaults.temperature, 0.0),
        repetition_penalty=penalty,
    )


def get_seed(body: dict[str, Any]) -> int | None:
    return get_int(body, "seed", None, 0, 2**63 - 1)


def get_stops(body: dict[str, Any]) -> list[str]:
    """``stop``: a string or a list of strings (empty ones are ignored)."""
    value = body.get("stop")
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise bad("'stop' must be a string or a list of strings", "stop")
    if len(items) > MAX_STOPS:
        raise bad(f"'stop' takes at most {MAX_STOPS} strings, got {len(items)}", "stop")
    return [s for s in items if s]


def check_model(body: dict[str, Any], service: Service) -> None:
    """``model`` (optional) must name the served model (404 otherwise)."""
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise bad(f"'model' must be a string, got {_kind(model)}", "model")
    if model != service.model_name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{service.model_name}'",
            param="model",
            code="model_not_found",
        )


def refuse_unsupported(body: dict[str, Any]) -> None:
    """400 for OpenAI options whose meaning the server cannot honour (instead of silently ignoring them)."""
    n = get_int(body, "n", 1)
    if n != 1:
        raise bad(f"only n=1 is supported, got {n}", "n")
    best_of = get_int(body, "best_of", 1)
    if best_of != 1:
        raise bad(f"only best_of=1 is supported, got {best_of}", "best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, 0.0) != 0:
            raise bad(f"'{name}' is not supported (use 'repetition_penalty', e.g. 1.1)", name)
    for name, what in (
        ("tools", "tool calling"),
        ("functions", "function calling"),
        ("logit_bias", "logit_bias"),
        ("suffix", "suffix"),
        ("top_logprobs", "logprobs"),
    ):
        if body.get(name):
            raise bad(f"{what} is not supported by this server", name)
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs are not supported by this server", "logprobs")
    if get_bool(body, "echo"):
        raise bad("echo is not supported by this server", "echo")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") not in (None, "text")):
        raise bad("only response_format {'type': 'text'} is supported", "response_format")


def stream_fields(body: dict[str, Any]) -> tuple[bool, bool]:
    """``(stream, stream_options.include_usage)``."""
    stream = get_bool(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise bad(f"'stream_options' must be an object, got {_kind(options)}", "stream_options")
    return stream, get_bool(options, "include_usage")


def max_tokens_of(body: dict[str, Any], service: Service, *names: str) -> int:
    """The first of ``names`` given (an integer >= 1), capped at the server's ``max_length``."""
    for name in names:
        value = get_int(body, name, None, 1)
        if value is not None:
            return min(value, service.max_length)
    return service.max_length


def check_prompt_length(ids: list[int], service: Service, param: str) -> None:
    if len(ids) > service.src_length:
        raise bad(
            f"the prompt has {len(ids)} tokens, more than this server's limit of {service.src_length} "
            "(its --src_length); shorten the prompt",
            param,
            "context_length_exceeded",
        )


def prompt_of(
    service: Service, prompt: Any, src_length: int, param: str, context: dict[str, Any] | None = None
) -> list[int]:
    """Prompt ids of a conversation (or a plain string) via the predictor's path; template problems are 400s."""
    try:
        return service.conversation_ids(prompt, src_length, context)
    except UserError as err:  # e.g. a system prompt longer than src_length, a template's raise_exception
        raise bad(str(err), param) from None


# ------------------------------------------------------------------------------------------ OpenAI requests
def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise bad(
                    f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                    f"messages[{i}].content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad(f"messages[{i}].content must be a string, got {_kind(content)}", f"messages[{i}].content")


def parse_messages(value: Any) -> tuple[str | None, list[list[str]]]:
    """``(system, [[u1, a1], ..., [query]])`` of an OpenAI ``messages`` list.

    System (or developer) messages may only come first (joined by a blank line); then user and assistant
    alternate, starting and ending with user.
    """
    if not isinstance(value, list) or not value:
        raise bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    system: list[str] = []
    turns: list[str] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object, got {_kind(message)}", f"messages[{i}]")
        role = message.get("role")
        if role not in (*ROLES_SYSTEM, "user", "assistant"):
            raise bad(
                f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}",
                f"messages[{i}].role",
            )
        if message.get("tool_calls"):
            raise bad("tool calls are not supported by this server", f"messages[{i}].tool_calls")
        text = _content(message, i)
        if role in ROLES_SYSTEM:
            if turns:
                raise bad("system messages must come before the first user message", f"messages[{i}].role")
            system.append(text)
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise bad(
                f"messages[{i}].role must be '{expected}': user and assistant messages alternate, "
                "starting with user",
                f"messages[{i}].role",
            )
        turns.append(text)
    if not turns or len(turns) % 2 == 0:
        raise bad("the last message must be a user message", "messages")
    rounds = [turns[k : k + 2] for k in range(0, len(turns), 2)]
    return ("\n\n".join(system) if system else None), rounds


def parse_chat(body: dict[str, Any], service: Service) -> GenRequest:
    """A ``/v1/chat/completions`` body."""
    check_model(body, service)
    refuse_unsupported(body)
    system, rounds = parse_messages(body.get("messages"))
    if service.has_template:
        ids = prompt_of(service, rounds, UNLIMITED, "messages", {"system": system} if system else None)
    elif system is None and len(rounds) == 1:
        ids = service.text_ids(rounds[0][0])
    else:
        raise bad(
            "this model has no chat template: send a single user message (or use /v1/completions)", "messages"
        )
    check_prompt_length(ids, service, "messages")
    stream, usage = stream_fields(body)
    return GenRequest(
        prompt_ids=ids,
        sampling=sampling_of(body, service.defaults),
        max_tokens=max_tokens_of(body, service, "max_completion_tokens", "max_tokens"),
        stops=get_stops(body),
        seed=get_seed(body),
        stream=stream,
        include_usage=usage,
    )


def parse_completion(body: dict[str, Any], service: Service) -> GenRequest:
    """A ``/v1/completions`` body: ``prompt`` is a string, a list of one string, or a list of token ids."""
    check_model(body, service)
    refuse_unsupported(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = service.text_ids(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        ids = [int(t) for t in prompt]
    else:
        raise bad("'prompt' must be a string (one prompt per request) or a list of token ids", "prompt")
    check_prompt_length(ids, service, "prompt")
    stream, usage = stream_fields(body)
    return GenRequest(
        prompt_ids=ids,
        sampling=sampling_of(body, service.defaults),
        max_tokens=max_tokens_of(body, service, "max_tokens"),
        stops=get_stops(body),
        seed=get_seed(body),
        stream=stream,
        include_usage=usage,
    )


# ------------------------------------------------------------------------------------------ PaddleNLP request
def parse_history(value: Any) -> list[list[str]]:
    """``[[u1, b1], ...]`` of ``history``: a list (or its JSON string) of strings or ``{"utterance"}`` objects."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise bad(f"'history' is a string but not JSON: {err.msg}", "history") from None
    if not isinstance(value, list):
        raise bad(f"'history' must be a list (or its JSON string), got {_kind(value)}", "history")
    turns: list[str] = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and isinstance(item.get("utterance"), str):
            turns.append(item["utterance"])
        elif isinstance(item, str):
            turns.append(item)
        else:
            raise bad(
                f"history[{i}] must be a string or an object with a string 'utterance', got {_kind(item)}",
                "history",
            )
    if len({isinstance(item, str) for item in value}) > 1:
        raise bad("'history' mixes strings and {'utterance'} objects; use one form", "history")
    if len(turns) % 2:
        raise bad(
            f"'history' must hold whole (user, bot) rounds, an even number of turns, got {len(turns)}; it "
            "holds the turns BEFORE 'context' (the current user turn is 'context')",
            "history",
        )
    return [turns[k : k + 2] for k in range(0, len(turns), 2)]


def parse_paddle_chat(body: dict[str, Any], service: Service) -> GenRequest:
    """A PaddleNLP ``/api/chat`` body (``min_length`` and ``extra_info`` are accepted and ignored)."""
    context = body.get("context")
    if not isinstance(context, str):
        raise bad(f"'context' (the user's message) must be a string, got {_kind(context)}", "context")
    rounds = parse_history(body.get("history"))
    total = service.src_length + service.max_length
    src_length = get_int(body, "src_length", service.src_length, 1)
    max_length = get_int(body, "max_length", service.max_length, 1)
    assert src_length is not None and max_length is not None
    if src_length + max_length > total:
        raise bad(
            f"src_length ({src_length}) + max_length ({max_length}) = {src_length + max_length} exceeds this "
            f"server's limit of {total} tokens (src_length {service.src_length} + max_length "
            f"{service.max_length} at startup)",
            "max_length",
        )
    get_int(body, "min_length", None)  # type-checked, then ignored like PaddleNLP
    prompt: Any = rounds + [[context]] if service.has_template else context
    return GenRequest(
        prompt_ids=prompt_of(service, prompt, src_length, "context"),
        sampling=sampling_of(body, service.defaults),
        max_tokens=max_length,
        seed=get_seed(body),
        stream=True,
    )


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event line pair."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


def ndjson(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode()


def paddle_piece(text: str) -> dict[str, Any]:
    """One line of an ``/api/chat`` response."""
    return {
        "error_code": 0,
        "error_msg": "Success",
        "result": {"response": {"role": "bot", "utterance": text}},
    }


class Envelope:
    """Builds the OpenAI objects of one response (fixed id, creation time and model)."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat = chat
        self.model = model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = now()

    def _base(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, used: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._base(False), "choices": [choice], "usage": used}

    def chunk(
        self, text: str | None, finish_reason: str | None = None, *, role: bool = False
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        return {**self._base(True), "choices": [choice]}

    def usage_chunk(self, used: dict[str, int]) -> dict[str, Any]:
        return {**self._base(True), "choices": [], "usage": used}
