"""Load and faults: 200 requests from 16 concurrent clients against the real ``flask_server.py``.

Valid streaming and non-streaming calls of both APIs are mixed with malformed JSON, wrong types, over-long
prompts, unknown routes, a wrong key and clients that drop the connection mid-stream. Afterwards: no 5xx,
every 4xx carries a message, every valid request got the same text as when it ran alone, the dropped streams
were cancelled, ``/health`` answers and the server is back to its idle thread count.
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

try:
    import helpers_serve as hs
except ImportError:  # tests/ imported as a package
    from tests import helpers_serve as hs

pytestmark = pytest.mark.timeout(600)

KEY = "load-key"
REQUESTS, CLIENTS = 200, 16
NEW = 12  # new tokens of every valid request
PROMPTS = ["spell: 5", "spell: 342", "digits: seventy one", "spell: 808"]
HISTORY = ["spell: 12", "twelve"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hs.Server]:
    log = tmp_path_factory.mktemp("serve-load") / "server.log"
    args = ["--model_name_or_path", hs.DEMO_MODEL, "--no_ui", "--api_key", KEY, "--src_length", "64"]
    srv = hs.Server(args + ["--max_length", "192", "--max_batch_size", "8", "--max_queue", "64"], log)
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log()[-3000:]


# ------------------------------------------------------------------------------------------ requests
def completion(prompt: str, stream: bool) -> dict[str, Any]:
    return {"model": "model", "prompt": prompt, "max_tokens": NEW, "temperature": 0, "stream": stream}


def chat_body(prompt: str, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": HISTORY[0]}, {"role": "assistant", "content": HISTORY[1]}]
    body = {"model": "model", "messages": [*messages, {"role": "user", "content": prompt}], "max_tokens": NEW}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def paddle_body(prompt: str) -> dict[str, Any]:
    return {
        "context": prompt,
        "history": HISTORY,
        "top_k": 1,
        "top_p": 1,
        "temperature": 1,
        "max_length": NEW,
    }


def text_of(kind: str, status: int, data: bytes) -> str:
    """The generated text of a valid response (asserting that it completed)."""
    assert status == 200, (kind, status, data[:300])
    if kind == "paddle":
        lines = hs.ndjson(data)
        assert all(line["error_code"] == 0 for line in lines), lines
        return "".join(line["result"]["response"]["utterance"] for line in lines)
    if kind in ("chat_stream", "completion_stream"):
        events = hs.sse(data)
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [e for e in events[:-1] if e["choices"]]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        if kind == "chat_stream":
            assert events[-2]["usage"]["completion_tokens"] >= 1
            return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return "".join(c["choices"][0]["text"] for c in chunks)
    body = json.loads(data)
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    return choice["message"]["content"] if kind == "chat" else choice["text"]


VALID: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "paddle": ("/api/chat", paddle_body),
    "chat": ("/v1/chat/completions", lambda p: chat_body(p, False)),
    "chat_stream": ("/v1/chat/completions", lambda p: chat_body(p, True)),
    "completion": ("/v1/completions", lambda p: completion(p, False)),
    "completion_stream": ("/v1/completions", lambda p: completion(p, True)),
}


def drop_mid_stream(port: int, prompt: str) -> int:
    """Start a long stream, read its first event, then hang up; returns the status (from the first bytes)."""
    body = json.dumps({"model": "model", "prompt": prompt, "max_tokens": 192, "stream": True}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(head + body)
        got = b""
        while b"data:" not in got:
            chunk = sock.recv(4096)
            if not chunk:
                break
            got += chunk
    return int(got.split(b" ", 2)[1])


def faulty(i: int) -> tuple[str, str, Any, bytes | None, str | None]:
    """``(method, path, body, raw body, key)`` of the i-th faulty request."""
    variant = i // 10
    if i % 10 == 0:
        return "POST", "/v1/chat/completions", None, b'{"model": "model", "messages": [', KEY
    if i % 10 == 1:
        body = [{"prompt": 5}, {"prompt": "x", "max_tokens": "ten"}, {"prompt": "x", "stop": [1]}][
            variant % 3
        ]
        return "POST", "/v1/completions", body, None, KEY
    if i % 10 == 2:
        if variant % 2:
            return "POST", "/api/chat", {**paddle_body("x"), "src_length": 64, "max_length": 193}, None, KEY
        return "POST", "/v1/completions", {"prompt": "spell: 12 " * 40}, None, KEY
    if i % 10 == 3:
        return ["POST", "GET"][variant % 2], f"/v2/route{variant}", {"x": 1}, None, KEY
    return "POST", "/v1/chat/completions", chat_body("x", False), None, "wrong-key"


def error_message(path: str, data: bytes) -> str:
    if path.startswith("/api/"):
        lines = hs.ndjson(data)
        assert len(lines) == 1 and lines[0]["error_code"] == 1
        return lines[0]["error_msg"]
    return json.loads(data)["error"]["message"]


def idle(port: int, deadline: float, threads: int | None = None) -> dict[str, Any]:
    """Poll /health until no request is active (and, if given, the thread count is ``threads``)."""
    while True:
        status, data = hs.request(port, "GET", "/health")
        health = json.loads(data)
        if status == 200 and health["active_requests"] == 0 and threads in (None, health["threads"]):
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.1)


def test_load_and_faults(server: hs.Server) -> None:
    port = server.port
    kinds = list(VALID)
    # alone first: the expected text of every (kind, prompt), and the idle thread counts after this warm-up
    want = {}
    for kind in kinds:
        path, make = VALID[kind]
        for prompt in PROMPTS:
            status, data = hs.request(port, "POST", path, make(prompt), key=KEY)
            want[kind, prompt] = text_of(kind, status, data)
    assert len({want["completion", p] for p in PROMPTS}) > 1
    base = idle(port, time.monotonic() + 30)
    base_proc = hs.proc_threads(server.proc.pid)

    def run(i: int) -> tuple[str, int, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        slot = i % 10
        if slot == 5:
            return "dropped", drop_mid_stream(port, prompt), ""
        if slot >= 6:
            kind = kinds[(i // 10 + slot) % len(kinds)]
            path, make = VALID[kind]
            status, data = hs.request(port, "POST", path, make(prompt), key=KEY)
            assert text_of(kind, status, data) == want[kind, prompt], (kind, prompt)
            return kind, status, ""
        method, path, body, raw, key = faulty(i)
        status, data = hs.request(port, method, path, body, raw=raw, key=key)
        return path, status, error_message(path, data) if 400 <= status < 500 else data.decode()[:200]

    began = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(run, range(REQUESTS)))
    elapsed = time.monotonic() - began
    print(f"\n{REQUESTS} requests from {CLIENTS} clients in {elapsed:.1f} s")

    assert len(results) == REQUESTS
    assert [r for r in results if r[1] >= 500] == []
    errors = [r for r in results if 400 <= r[1] < 500]
    assert errors and all(r[2].strip() for r in errors), errors
    assert sorted({r[1] for r in errors}) == [400, 401, 404]
    valid = [r for r in results if r[0] in VALID]
    assert len(valid) == REQUESTS * 4 // 10 and all(r[1] == 200 for r in valid)
    assert all(r[1] == 200 for r in results if r[0] == "dropped")

    after = idle(port, time.monotonic() + 60, base["threads"])
    assert after["active_requests"] == 0
    assert after["threads"] == base["threads"], (base, after)
    # no OS thread leaked (one that was still winding down when the base was taken may be gone by now)
    deadline = time.monotonic() + 30
    while hs.proc_threads(server.proc.pid) > base_proc and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hs.proc_threads(server.proc.pid) <= base_proc
    cut = [
        int(n)
        for n in re.findall(r"cmpl-\w+ cancelled after (\d+) tokens .*client disconnected", server.log())
    ]
    assert cut and all(n < 192 for n in cut), cut  # dropped streams were cancelled, not run to the end
    assert "Traceback" not in server.log()
