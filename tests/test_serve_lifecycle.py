"""``flask_server.py`` as a process: one-line CLI errors, a full queue, SIGTERM shutdown, distributed launch.

* CLI errors run in ONE interpreter (a driver executes the real script with ``runpy`` per case; each fresh
  interpreter pays ~5 s for the paddle import); one real invocation checks the exit status and stderr.
* One server (with the UI unless the UI module is missing) answers a burst beyond its queue with 503s, then
  gets SIGTERM during a stream: the stream completes, the process exits 0 and leaves no process behind.
* Under ``python -m paddle.distributed.launch --nproc_per_node 1`` with ``--graceful_timeout 0``, SIGTERM cuts
  the streams in flight: each still ends with ``[DONE]``, the queued ones with "shutting down".
"""

from __future__ import annotations

import llm  # noqa: F401  (zlib fix first)

# isort: split
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

try:
    import helpers_cli as hc
    import helpers_serve as hs
except ImportError:  # tests/ imported as a package
    from tests import helpers_cli as hc
    from tests import helpers_serve as hs

pytestmark = pytest.mark.timeout(600)

# a prompt the demo model continues (counting) for longer than max_tokens: the stream ends by "length"
LONG = {"model": "model", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 190, "stream": True}


def stream_events(port: int, body: dict[str, Any], first: threading.Event | None = None) -> list[Any]:
    """POST a streaming completion; set ``first`` once the first event arrived; all events until the end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return [{"status": response.status, "body": response.read().decode()}]
        events: list[Any] = []
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if first is not None:
                    first.set()
        return events
    finally:
        conn.close()


def active(port: int) -> int:
    """Requests the server is answering (from ``/health``)."""
    return int(json.loads(hs.request(port, "GET", "/health")[1])["active_requests"])


# ------------------------------------------------------------------------------------------ CLI
def test_unknown_flag_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, hs.FLASK_SERVER, "--model_name_or_path", hs.DEMO_MODEL, "--flask_prot", "8010"],
        capture_output=True,
        text=True,
        env=hs.server_env(),
        timeout=300,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown argument 'flask_prot' on the command line (did you mean 'flask_port'?)"]
    assert "Traceback" not in proc.stderr


def test_cli_errors_before_the_model_loads() -> None:
    demo = ["--model_name_or_path", hs.DEMO_MODEL]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        cases: list[tuple[list[str], str]] = [
            (
                ["--model_name_or_path", "/nonexistent-model", "--base_port", "18123", "--no_ui"],
                "model directory not found",
            ),
            ([*demo, "--flask_port", str(taken), "--no_ui"], f"cannot listen on 127.0.0.1:{taken}"),
            ([*demo, "--max_queue", "0"], "max_queue must be >= 1, got 0"),
            (
                [*demo, "--decode_strategy", "beam_search", "--flask_port", "0", "--no_ui"],
                "beam search is not served",
            ),
            ([*demo, "--port", "9000", "--flask_port", "9000"], "both 9000"),
            ([*demo, "--max_length", "300", "--flask_port", "0", "--no_ui"], "exceeds"),
            ([*demo, "--max_body_bytes", "12", "--no_ui"], "max_body_bytes must be >= 1024"),
        ]
        argvs = [argv for argv, _ in cases] + [["--help"]]
        results = hc.run_scripts([(hs.FLASK_SERVER, argv) for argv in argvs], hs.server_env())
    for (argv, words), res in zip(cases, results):
        errors = [x for x in res["err"].splitlines() if x.startswith("error:")]
        assert res["code"] == 2 and len(errors) == 1 and words in errors[0], (argv, res)
        assert "Traceback" not in res["err"] and "Loading weights" not in res["err"] + res["out"], argv
    assert "--base_port is deprecated" in results[0]["err"]  # the alias warns (and fills in flask_port)
    assert (
        results[-1]["code"] == 0
        and "--flask_port" in results[-1]["out"]
        and "--api_key" in results[-1]["out"]
    )


def test_server_argument_rules(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from llm.errors import ConfigError
    from llm.serve.arguments import ServerArgument

    assert ServerArgument().flask_port == 8010 and ServerArgument().port == 8011
    with caplog.at_level("WARNING", logger="llm.serve.arguments"):
        assert ServerArgument(base_port=9000).flask_port == 9000
        assert ServerArgument(base_port=9000, flask_port=9100).flask_port == 9100  # base_port ignored
    assert [r.message.split(" (")[0] for r in caplog.records] == [
        "--base_port is deprecated",
        "--base_port is deprecated and ignored because --flask_port is set",
    ]
    monkeypatch.setenv("LLM_API_KEY", "from-env")
    assert ServerArgument().api_key == "from-env"
    assert ServerArgument(api_key="flag").api_key == "flag"
    monkeypatch.setenv("LLM_API_KEY", "")
    assert ServerArgument().api_key is None
    for bad in ({"api_key": " "}, {"port": 70000}, {"max_batch_size": 0}, {"graceful_timeout": -1.0}):
        with pytest.raises(ConfigError):
            ServerArgument(**bad)  # type: ignore[arg-type]
    assert ServerArgument(port=8010, flask_port=8010, no_ui=True).port == 8010  # no UI: no clash


# ------------------------------------------------------------------------------------------ one server
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[hs.Server]:
    log = tmp_path_factory.mktemp("serve-life") / "server.log"
    args = ["--model_name_or_path", hs.DEMO_MODEL, "--port", str(hs.free_port()), "--src_length", "64"]
    srv = hs.Server(args + ["--max_length", "192", "--max_batch_size", "1", "--max_queue", "1"], log)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_full_queue_answers_503_with_retry_after(server: hs.Server) -> None:
    def one(_: int) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        try:
            conn.request("POST", "/v1/completions", json.dumps(LONG), {"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    busy = [r for r in results if r[0] == 503]
    assert busy and {r[0] for r in results} == {200, 503}
    for _, headers, body in busy:
        assert headers["Retry-After"] == "1"
        assert "busy" in json.loads(body)["error"]["message"]
    assert all(hs.sse(r[2])[-1] == "[DONE]" for r in results if r[0] == 200)


def test_sigterm_lets_the_stream_finish_and_leaves_no_process(server: hs.Server) -> None:
    # "UI: http..." once the UI process runs; the one-line notice when the UI module is missing or fails
    ui_expected = server.wait_log("UI: http", "serving the API only") == "UI: http"
    if not os.path.exists(Path(hs.ROOT) / "llm" / "serve" / "ui.py"):
        assert not ui_expected and "the Gradio UI is not available" in server.log()
    family = hs.children(server.proc.pid)
    assert bool(family) == ui_expected, (family, server.log()[-2000:])

    first = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(stream_events, server.port, LONG, first)
        assert first.wait(120), server.log()[-2000:]
        server.proc.send_signal(signal.SIGTERM)
        events = stream.result(timeout=120)
    assert server.proc.wait(120) == 0, server.log()[-3000:]
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert len([e for e in events[:-1] if e["choices"][0]["text"]]) >= 100  # it ran to its end
    assert [pid for pid in family if hs.alive(pid)] == []
    log = server.log()
    assert "shutting down: no new connections, 1 request(s) in flight" in log and "stopped" in log
    assert "Traceback" not in log


# ------------------------------------------------------------------------------------------ distributed launch
def test_launch_and_sigterm_cut(tmp_path: Path) -> None:
    args = ["--model_name_or_path", hs.DEMO_MODEL, "--no_ui", "--src_length", "64", "--max_length", "192"]
    args += ["--max_batch_size", "1", "--max_queue", "8", "--graceful_timeout", "0"]
    srv = hs.Server(
        args, tmp_path / "launch.log", launch=["--nproc_per_node", "1", "--log_dir", str(tmp_path / "log")]
    )
    try:
        srv.wait_ready()
        status, data = hs.request(
            srv.port, "POST", "/api/chat", {"context": "spell: 12", "top_k": 1, "max_length": 4}
        )
        assert status == 200 and all(x["error_code"] == 0 for x in hs.ndjson(data))
        worker = [
            pid
            for pid in hs.children(srv.proc.pid)
            if "flask_server.py" in Path(f"/proc/{pid}/cmdline").read_text()
        ]
        assert worker, hs.children(srv.proc.pid)
        with ThreadPoolExecutor(6) as pool:
            streams = [pool.submit(stream_events, srv.port, LONG) for _ in range(6)]
            deadline = time.monotonic() + 120
            while active(srv.port) + sum(s.done() for s in streams) < len(streams):  # all have arrived
                assert time.monotonic() < deadline
                time.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)  # the launcher passes it on to the worker
            results = [s.result(timeout=120) for s in streams]
        srv.proc.wait(120)
        family = hs.children(srv.proc.pid) + worker
        assert [pid for pid in family if hs.alive(pid)] == []
    finally:
        srv.stop()
    for events in results:
        assert events[-1] == "[DONE]", events[-3:]
    cut = [e[-2]["error"]["message"] for e in results if "error" in e[-2]]
    assert "the server is shutting down" in cut, [e[-2] for e in results]  # the queued ones were cut
    log = srv.log() + "".join(p.read_text() for p in (tmp_path / "log").glob("workerlog.*"))
    assert "stopped" in log and "Traceback" not in log
