"""Gradio chat UI over the ``/api/chat`` streaming API (PaddleNLP's ``gradio_ui.py``, spec §9.3).

Run it on its own with ``python -m llm.serve.ui --api_url http://127.0.0.1:8010 --port 8011``, or from the
API server with :func:`start_ui_process`. The UI process imports gradio and httpx only (never paddle), so
it starts in seconds and holds no model memory.

History convention: each request sends ``context`` = the new user message and ``history`` = the *earlier*
turns as a flat list ``["u1", "b1", "u2", "b2", ...]``. The current turn is not in ``history``, so the
server sees it exactly once (the original UI sent it twice, see the spec's "Quirk").
"""

from __future__ import annotations

import argparse
import html
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import gradio as gr

API_KEY_ENV = "LLM_UI_API_KEY"  # the API key reaches the UI process through the environment, never argv
PARENT_PID_ENV = "LLM_UI_PARENT_PID"  # set by start_ui_process: the UI exits when that process is gone
END_MARKER = "[END]"
NO_HISTORY = "don't have chat history"
EMPTY_INPUT = "Please type a message first."
NOTHING_TO_ROLL_BACK = "Nothing to roll back."

PARAM_ORDER = ("top_k", "top_p", "temperature", "repetition_penalty", "src_length", "max_length")  # sliders
Turns = list[list[str]]  # [[user, bot], ...], the raw text of every finished or streaming pair


class ChatAPIError(RuntimeError):
    """The API answered with ``error_code != 0``, a non-200 status, or could not be reached."""


def flat_history(turns: Sequence[Sequence[str]]) -> list[str]:
    """``[[u1, b1], [u2, b2]] -> ["u1", "b1", "u2", "b2"]`` (the API's ``history``)."""
    return [text for pair in turns for text in (pair[0], pair[1])]


def raw_context(turns: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """The "Raw Context" view: ``[{"role": "user", "utterance": u1}, {"role": "bot", ...}, ...]``."""
    out: list[dict[str, str]] = []
    for user, bot in turns:
        out += [{"role": "user", "utterance": user}, {"role": "bot", "utterance": bot}]
    return out


def _error_message(response: httpx.Response) -> str:
    """The ``error_msg`` (or OpenAI-style ``error.message``) of an error response, else its status and text."""
    body = response.read().decode("utf-8", "replace")
    try:
        data = json.loads(body.splitlines()[0]) if body.strip() else {}
    except (json.JSONDecodeError, IndexError):
        data = {}
    if isinstance(data, dict):
        if data.get("error_msg"):
            return str(data["error_msg"])
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return f"HTTP {response.status_code}: {body.strip()[:300] or response.reason_phrase}"


def stream_chat(
    api_url: str, payload: dict[str, Any], *, api_key: str | None = None, timeout: float = 300.0
) -> Iterator[str]:
    """POST ``payload`` to ``{api_url}/api/chat`` and yield the utterance chunks as they arrive.

    Raises :class:`ChatAPIError` with the server's ``error_msg`` when a line has ``error_code != 0``.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = api_url.rstrip("/") + "/api/chat"
    try:
        with httpx.stream(
            "POST", url, json=payload, headers=headers, timeout=httpx.Timeout(10.0, read=timeout)
        ) as response:
            if response.status_code != 200:
                raise ChatAPIError(_error_message(response))
            for line in response.iter_lines():
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ChatAPIError(f"bad response line from {url}: {line[:200]!r}") from exc
                if data.get("error_code", 0) != 0:
                    raise ChatAPIError(str(data.get("error_msg") or f"error_code {data['error_code']}"))
                chunk = (data.get("result") or {}).get("response", {}).get("utterance") or ""
                if chunk:
                    yield chunk
    except httpx.HTTPError as exc:
        raise ChatAPIError(f"cannot reach the API at {url}: {exc}") from exc


def chat_payload(
    utterance: str,
    history: list[str],
    top_k: float,
    top_p: float,
    temperature: float,
    repetition_penalty: float,
    src_length: float,
    max_length: float,
) -> dict[str, Any]:
    """The ``/api/chat`` request body for one turn (spec §9.2)."""
    return {
        "context": utterance,
        "history": history,
        "top_k": int(top_k),
        "top_p": float(top_p),
        "temperature": float(temperature),
        "repetition_penalty": float(repetition_penalty),
        "src_length": int(src_length),
        "max_length": int(max_length),
        "min_length": 1,
    }


def _view(turns: Turns, text: str) -> tuple[list[list[str | None]], list[dict[str, str]], str, Turns]:
    """Outputs of every handler: (chatbot pairs, raw context, input box, state)."""
    shown: list[list[str | None]] = [[u, b or None] for u, b in turns]  # None: no bubble until text arrives
    return shown, raw_context(turns), text, turns


def respond(
    api_url: str,
    api_key: str | None,
    utterance: str,
    turns: Turns,
    *params: float,
) -> Iterator[tuple[Any, ...]]:
    """Append ``utterance`` and stream the bot's answer into the last pair, yielding the view after each chunk.

    ``params`` are the slider values (top_k, top_p, temperature, repetition_penalty, src_length,
    max_length). On an API error the pair is dropped, the text goes back into the input box and a
    warning shows the server's message.
    """
    import gradio as gr

    turns = [list(pair) for pair in (turns or [])]
    if not (utterance or "").strip():
        gr.Warning(EMPTY_INPUT)
        yield _view(turns, utterance or "")
        return
    payload = chat_payload(utterance, flat_history(turns), *params)
    turns.append([utterance, ""])
    yield _view(turns, "")
    try:
        for chunk in stream_chat(api_url, payload, api_key=api_key):
            turns[-1][1] += chunk
            yield _view(turns, "")
    except ChatAPIError as exc:
        gr.Warning(html.escape(str(exc)))
        turns.pop()
        yield _view(turns, utterance)
        return
    if turns[-1][1].endswith(END_MARKER):
        turns[-1][1] = turns[-1][1][: -len(END_MARKER)].rstrip()
        yield _view(turns, "")


def regenerate(
    api_url: str, api_key: str | None, text: str, turns: Turns, *params: float
) -> Iterator[tuple[Any, ...]]:
    """Drop the last answer and generate it again for the same user message (kept if the API fails)."""
    import gradio as gr

    if not turns:
        gr.Warning(NO_HISTORY)
        yield _view([], text)
        return
    *earlier, (utterance, _) = turns
    state = turns
    for shown, raw, _text, state in respond(api_url, api_key, utterance, earlier, *params):
        yield shown, raw, text, state  # leave whatever the user is typing alone
    if len(state) == len(earlier):  # the API failed (respond warned): keep the previous answer
        yield _view([list(p) for p in turns], text)


def rollback(text: str, turns: Turns) -> tuple[Any, ...]:
    """Remove the last pair and put its user text back into the input box."""
    import gradio as gr

    if not turns:
        gr.Warning(NOTHING_TO_ROLL_BACK)
        return _view([], text)
    *earlier, (utterance, _) = turns
    return _view([list(p) for p in earlier], utterance)


def clear() -> tuple[Any, ...]:
    """Empty the conversation and the input box."""
    return _view([], "")


def _fix_gradio_schema_bug() -> None:
    """Let gradio 4.44's API-info builder accept boolean JSON schemas (``"additionalProperties": true``).

    pydantic >= 2.11 writes them for ``dict[str, Any]`` fields (the Chatbot's), and gradio-client 1.3.0 then
    fails every page load with ``TypeError: argument of type 'bool' is not iterable``; newer gradio-client
    releases read ``true`` as ``Any`` as done here.
    """
    from gradio_client import utils as client_utils

    original = client_utils._json_schema_to_python_type
    if getattr(original, "_accepts_bool", False):
        return

    def to_python_type(schema: Any, defs: Any = None) -> str:
        return "Any" if isinstance(schema, bool) else original(schema, defs)

    to_python_type._accepts_bool = True  # type: ignore[attr-defined]
    client_utils._json_schema_to_python_type = to_python_type


def build_app(
    api_url: str,
    *,
    title: str = "LLM",
    sub_title: str = "LLM-subtitle",
    src_length: int = 1024,
    max_length: int = 2048,
    api_key: str | None = None,
) -> gr.Blocks:
    """The chat app (not yet launched): sliders on the left, conversation on the right."""
    import gradio as gr

    _fix_gradio_schema_bug()
    # Soft theme with local font stacks: the default Google fonts cannot load on an offline machine.
    theme = gr.themes.Soft(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    with gr.Blocks(title=title, theme=theme) as app:
        gr.HTML(
            f"<h2 style='text-align:center'>{html.escape(title)} "
            f"<span id='sub_title' style='color:red;font-size:0.7em'>{html.escape(sub_title)}</span></h2>"
        )
        with gr.Row():
            with gr.Column(scale=1):
                sliders = [
                    gr.Slider(lo, hi, value=value, step=step, label=label, info=info)
                    for label, lo, hi, value, step, info in (
                        ("Top-k", 0, 20, 0, 1, "Sample from the k most likely tokens; 0: no top-k cut"),
                        ("Top-p", 0, 1, 0.7, 0.05, "Sample from the most likely tokens that add up to p"),
                        ("Temperature", 0.05, 1.5, 0.95, 0.05, "Below 1 sharpens the distribution"),
                        ("Repetition Penalty", 0.1, 10, 1.2, 0.1, "Above 1 discourages repeated tokens"),
                        ("Max Src Length", 1, src_length, src_length, 1, "Longest prompt in tokens"),
                        ("Max Length", 1, max_length, min(50, max_length), 1, "Most tokens in one answer"),
                    )
                ]
            with gr.Column(scale=4):
                chatbot = gr.Chatbot(label="Context", elem_id="context", height=420)
                utterance = gr.Textbox(
                    label="Utterance", placeholder="Type a message and press Enter", elem_id="utterance"
                )
                with gr.Row():
                    clear_btn = gr.Button("Clear", elem_id="clear")
                    rollback_btn = gr.Button("Rollback", elem_id="rollback")
                    regen_btn = gr.Button("Regenerate", elem_id="regenerate")
                    send_btn = gr.Button("Send", variant="primary", elem_id="send")
                raw = gr.JSON(label="Raw Context", value=[], elem_id="raw_context")
        turns = gr.State([])

        outputs = [chatbot, raw, utterance, turns]
        # One listener for Enter and Send, so a second one is ignored while an answer streams.
        chat_inputs = [utterance, turns, *sliders]  # the sliders in the order of PARAM_ORDER
        gr.on([utterance.submit, send_btn.click], partial(respond, api_url, api_key), chat_inputs, outputs)
        regen_btn.click(partial(regenerate, api_url, api_key), chat_inputs, outputs)
        rollback_btn.click(rollback, [utterance, turns], outputs)
        clear_btn.click(clear, None, outputs)
    return app


def start_ui_process(
    api_url: str,
    *,
    host: str,
    port: int,
    title: str,
    sub_title: str,
    src_length: int,
    max_length: int,
    api_key: str | None = None,
) -> subprocess.Popen:
    """Run the UI in a new process (``python -m llm.serve.ui``); terminate it to stop it.

    The key goes through the environment (``LLM_UI_API_KEY``) so it never shows in a process listing; the
    child also exits by itself when the calling process is gone.
    """
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    env[PARENT_PID_ENV] = str(os.getpid())
    root = str(Path(__file__).resolve().parents[2])  # importable even without the editable install
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "llm.serve.ui", "--api_url", api_url, "--host", host, "--port", str(port)]
    cmd += ["--title", title, "--sub_title", sub_title]
    cmd += ["--src_length", str(src_length), "--max_length", str(max_length)]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def wait_until_up(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers with a status below 500; stop early if ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with code {proc.returncode} before {url} was up")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
            last = "server error"
        except httpx.HTTPError as exc:
            last = str(exc)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not up after {timeout:.0f} s ({last})")
        time.sleep(0.2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m llm.serve.ui``."""
    p = argparse.ArgumentParser(prog="python -m llm.serve.ui", description=__doc__.splitlines()[0])
    p.add_argument("--api_url", required=True, help="base URL of the API server, e.g. http://127.0.0.1:8010")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--title", default="LLM")
    p.add_argument("--sub_title", default="LLM-subtitle")
    p.add_argument("--src_length", type=int, default=1024, help="upper end of the Max Src Length slider")
    p.add_argument("--max_length", type=int, default=2048, help="upper end of the Max Length slider")
    p.add_argument("--api_key", default=None, help=f"bearer token for the API (default: ${API_KEY_ENV})")
    args = p.parse_args(argv)
    if args.src_length < 1 or args.max_length < 1:
        p.error("--src_length and --max_length must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the UI until SIGTERM/SIGINT (or until the parent process named in the environment is gone)."""
    args = parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    app = build_app(
        args.api_url,
        title=args.title,
        sub_title=args.sub_title,
        src_length=args.src_length,
        max_length=args.max_length,
        api_key=api_key,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    # Several chats may stream at once; the API server queues or batches them.
    app.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, prevent_thread_lock=True, show_api=False, quiet=True
    )
    print(f"chat UI on http://{args.host}:{args.port} (API {args.api_url})", flush=True)
    parent = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    while not stop.wait(1.0):
        if parent and os.getppid() != parent:  # started by a server that has died
            break
    app.close(verbose=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
