"""Run the real ``flask_server.py`` in a subprocess on 127.0.0.1 and talk to it (serving tests)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FLASK_SERVER = str(ROOT / "flask_server.py")
DEMO_MODEL = str(ROOT / "demo" / "model")
START_TIMEOUT = 180.0  # generous: the paddle import alone takes ~5 s on an idle 2-core machine


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LLM_API_KEY",)}
    env.update(PYTHONWARNINGS="ignore", FLAGS_call_stack_level="0", **extra)
    return env


def children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def proc_threads(pid: int) -> int:
    """The kernel's thread count of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Threads line for {pid}")


class Server:
    """``flask_server.py ARGS --flask_port PORT`` (optionally under ``paddle.distributed.launch``)."""

    def __init__(self, args: list[str], log_path: Path, *, launch: list[str] | None = None) -> None:
        self.port = free_port()
        self.log_path = log_path
        prefix = (
            [sys.executable, "-m", "paddle.distributed.launch", *launch]
            if launch is not None
            else [sys.executable]
        )
        self.cmd = [*prefix, FLASK_SERVER, *args, "--flask_port", str(self.port)]
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Server:
        """Poll ``/health`` until it answers; fail with the log's tail if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                status, _ = request(self.port, "GET", "/health")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not up after {timeout:.0f} s:\n{self.log()[-3000:]}")

    def wait_log(self, *texts: str, timeout: float = 60.0) -> str:
        """Wait until one of ``texts`` is in the log; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            for text in texts:
                if text in log:
                    return text
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"none of {texts!r} in the server log:\n{log[-3000:]}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; whatever is left of the process group is killed. Returns the exit code."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this test started, if anything is left
            except (ProcessLookupError, PermissionError):
                pass
            self._log.close()
        return int(self.proc.returncode)


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    timeout: float = 120.0,
) -> tuple[int, bytes]:
    """One HTTP request to 127.0.0.1; ``(status, body bytes)`` (the whole stream for streaming routes)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def ndjson(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def sse(data: bytes) -> list[Any]:
    """The ``data:`` payloads of an event stream (``"[DONE]"`` kept as a string)."""
    out: list[Any] = []
    for line in data.decode().splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out
