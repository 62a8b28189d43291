"""The Flask application: routes, API-key check, errors as JSON, streaming with cancellation.

Routes: ``POST /api/chat`` (PaddleNLP, NDJSON lines), ``POST /v1/chat/completions`` and ``POST /v1/completions``
(OpenAI, JSON or server-sent events), ``GET /v1/models``, ``GET /health`` (no key needed). Every error is one
JSON object with a message: OpenAI's ``{"error": {message, type, param, code}}``, or PaddleNLP's
``{"error_code": 1, "error_msg"}`` under ``/api/``; a client never sees a traceback. A streaming client that
disconnects makes the next write fail; the server then closes the response generator, which cancels the
request's scheduler handle.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import ClosingIterator

from llm.errors import ConfigError
from llm.serve import api
from llm.serve.api import ApiError, Envelope, GenRequest
from llm.serve.scheduler import QueueFull, SchedulerStopped
from llm.serve.service import Service, TextRun

logger = logging.getLogger(__name__)

SHUTTING_DOWN = "the server is shutting down"
OWNER = "paddle-llm-toolkit"


class Activity:
    """Counts the requests being answered (``/health`` excluded); the server drains it on shutdown."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running: dict[int, str] = {}
        self._next = 0
        self.total = 0

    @property
    def active(self) -> int:
        return len(self._running)

    def describe(self) -> str:
        """The active requests as ``METHOD /path`` (for the shutdown log)."""
        with self._cond:
            return ", ".join(self._running.values())

    def wrap(self, wsgi_app: Callable[..., Any]) -> Callable[..., Any]:
        """WSGI middleware: a request counts until its response iterable is closed (also on a disconnect)."""

        def tracked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == "/health":
                return wsgi_app(environ, start_response)
            with self._cond:
                self._next += 1
                self.total += 1
                key = self._next
                self._running[key] = f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
            leave = functools.partial(self._leave, key)
            try:
                result = wsgi_app(environ, start_response)
            except BaseException:
                leave()
                raise
            return ClosingIterator(result, [leave])

        return tracked

    def _leave(self, key: int) -> None:
        with self._cond:
            self._running.pop(key, None)
            self._cond.notify_all()

    def wait_idle(self, timeout: float, cut_short: threading.Event | None = None) -> bool:
        """Wait until no request is active (or ``timeout`` s, or ``cut_short`` is set); True if idle."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running:
                left = deadline - time.monotonic()
                if left <= 0 or (cut_short is not None and cut_short.is_set()):
                    return False
                self._cond.wait(min(left, 0.2))
        return True


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        json.dumps(payload, ensure_ascii=False), status=status, headers=headers, mimetype="application/json"
    )


def _paddle_route() -> bool:
    return request.path.startswith("/api/")


def error_response(err: ApiError) -> Response:
    """``err`` in the shape of the route's protocol."""
    if _paddle_route():
        return Response(
            api.ndjson(err.paddle_body()),
            status=err.status,
            headers=err.headers,
            mimetype="application/x-ndjson",
        )
    return _json(err.openai_body(), err.status, err.headers)


def _http_error(err: HTTPException, max_body_bytes: int) -> ApiError:
    status = err.code or 500
    if status == 404:
        return ApiError(404, f"unknown route {request.method} {request.path}", code="not_found")
    if status == 405:
        allowed = ", ".join(m for m in (err.valid_methods or []) if m not in ("HEAD", "OPTIONS")) or "none"
        return ApiError(
            405,
            f"method {request.method} is not allowed on {request.path} (use {allowed})",
            code="method_not_allowed",
        )
    if status == 413:
        return ApiError(
            413,
            f"the request body is larger than this server's limit of {max_body_bytes} bytes",
            code="too_large",
        )
    return ApiError(status, err.description or err.name, code=err.name.lower().replace(" ", "_"))


def create_app(service: Service, *, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> Flask:
    """The WSGI app over ``service`` (``app.extensions["llm.activity"]`` counts active requests)."""
    app = Flask("llm.serve")
    app.config["MAX_CONTENT_LENGTH"] = int(max_body_bytes)
    activity = Activity()
    app.extensions["llm.activity"] = activity
    app.wsgi_app = activity.wrap(app.wsgi_app)  # type: ignore[method-assign]
    key = api_key.encode() if api_key else None

    @app.before_request
    def check_key() -> None:
        if key is None or request.path == "/health":
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    @app.errorhandler(ApiError)
    def on_api_error(err: ApiError) -> Response:
        return error_response(err)

    @app.errorhandler(HTTPException)
    def on_http_error(err: HTTPException) -> Response:
        return error_response(_http_error(err, max_body_bytes))

    @app.errorhandler(Exception)
    def on_crash(err: Exception) -> Response:
        logger.exception("internal error on %s %s", request.method, request.path)
        return error_response(
            ApiError(500, f"internal server error ({type(err).__name__}); see the server log")
        )

    def body() -> dict[str, Any]:
        return api.parse_body(request.get_data(cache=False))

    def start(req: GenRequest, route: str, rid: str) -> TextRun:
        try:
            config = service.config(req.sampling, req.max_tokens, req.seed)
            run = service.start(req.prompt_ids, config, req.stops)
        except QueueFull as err:
            raise ApiError(
                503,
                f"the server is busy ({err}); retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            ) from None
        except SchedulerStopped:
            raise ApiError(503, SHUTTING_DOWN, code="shutting_down") from None
        except ConfigError as err:
            raise ApiError(400, str(err)) from None
        logger.info(
            "%s %s: %d prompt tokens, up to %d new, %s",
            rid,
            route,
            len(req.prompt_ids),
            req.max_tokens,
            config.decode_strategy,
        )
        return run

    def done(run: TextRun, rid: str, began: float, note: str = "") -> None:
        logger.info(
            "%s %s after %d tokens in %.2f s%s",
            rid,
            run.finish_reason,
            run.completion_tokens,
            time.monotonic() - began,
            note,
        )

    # ---------------------------------------------------------------------------------- routes
    @app.get("/health")
    def health() -> Response:
        return _json(
            {
                "status": "ok",
                "model": service.model_name,
                "threads": threading.active_count(),
                "active_requests": activity.active,
            }
        )

    def model_card() -> dict[str, Any]:
        return {"id": service.model_name, "object": "model", "created": 0, "owned_by": OWNER}

    @app.get("/v1/models")
    def models() -> Response:
        return _json({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/<path:name>")
    def model(name: str) -> Response:
        if name != service.model_name:
            raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")
        return _json(model_card())

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        return openai(api.parse_chat(body(), service), chat=True)

    @app.post("/v1/completions")
    def completions() -> Response:
        return openai(api.parse_completion(body(), service), chat=False)

    def openai(req: GenRequest, chat: bool) -> Response:
        env = Envelope(chat, service.model_name)
        began = time.monotonic()
        run = start(req, request.path, env.id)
        if not req.stream:
            text = run.collect()
            done(run, env.id, began)
            if run.finish_reason == "cancelled":
                raise ApiError(503, SHUTTING_DOWN, code="shutting_down")
            if run.finish_reason == "error":
                raise ApiError(500, f"generation failed: {run.error}")
            return _json(
                env.response(
                    text, run.finish_reason or "stop", api.usage(run.prompt_tokens, run.completion_tokens)
                )
            )
        return Response(
            _openai_events(run, env, req.include_usage, lambda note: done(run, env.id, began, note)),
            mimetype="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/api/chat")
    def paddle_chat() -> Response:
        req = api.parse_paddle_chat(body(), service)
        rid, began = api.new_id("chat"), time.monotonic()
        run = start(req, request.path, rid)
        return Response(
            _paddle_lines(run, lambda note: done(run, rid, began, note)), mimetype="application/x-ndjson"
        )

    return app


def _openai_events(
    run: TextRun, env: Envelope, include_usage: bool, finished: Callable[[str], None]
) -> Iterator[bytes]:
    """SSE chunks of ``run``; closing this generator early (client gone) cancels the request."""
    pieces = iter(run)
    extra = {"usage": None} if include_usage else {}
    complete = False
    try:
        if env.chat:
            yield api.sse({**env.chunk("", role=True), **extra})
        for piece in pieces:
            yield api.sse({**env.chunk(piece), **extra})
        if run.finish_reason in ("stop", "length"):
            yield api.sse({**env.chunk(None if env.chat else "", run.finish_reason), **extra})
            if include_usage:
                yield api.sse(env.usage_chunk(api.usage(run.prompt_tokens, run.completion_tokens)))
        else:
            message = SHUTTING_DOWN if run.finish_reason == "cancelled" else f"generation failed: {run.error}"
            err = ApiError(503 if run.finish_reason == "cancelled" else 500, message)
            yield api.sse(err.openai_body())
        yield api.sse("[DONE]")
        complete = True
    finally:
        pieces.close()  # type: ignore[attr-defined]  # cancels the handle if it is still running
        finished("" if complete else " (client disconnected)")


def _paddle_lines(run: TextRun, finished: Callable[[str], None]) -> Iterator[bytes]:
    """NDJSON lines of ``run`` (PaddleNLP's shape; empty pieces are never sent)."""
    pieces = iter(run)
    complete = False
    try:
        for piece in pieces:
            yield api.ndjson(api.paddle_piece(piece))
        if run.finish_reason == "cancelled":
            yield api.ndjson({"error_code": 1, "error_msg": SHUTTING_DOWN})
        elif run.finish_reason == "error":
            yield api.ndjson({"error_code": 1, "error_msg": f"generation failed: {run.error}"})
        complete = True
    finally:
        pieces.close()  # type: ignore[attr-defined]
        finished("" if complete else " (client disconnected)")
