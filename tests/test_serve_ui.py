"""The Gradio chat UI (``llm/serve/ui.py``): its ``/api/chat`` client against a recording HTTP server, and the
whole app in a real headless Chromium (selenium + Debian's chromedriver) driven against the real
``flask_server.py`` on ``demo/model``, which starts the UI through :func:`start_ui_process`."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DEMO_MODEL, ROOT
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

from llm.serve import ui

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
    "--disable-component-update --disable-sync --window-size=1280,1100"
).split()
SERVER = ROOT / "flask_server.py"
SRC_LENGTH, MAX_LENGTH = 64, 32
GREEDY = {"top_k": 1, "max_length": 12}  # the sliders the browser test moves; the rest keep their defaults
SHORT = 3  # a Max Length that gives a different (shorter) answer
DEFAULTS = {"top_k": 0, "top_p": 0.7, "temperature": 0.95, "repetition_penalty": 1.2}
API_KEY = "sk-ui-test"  # the server requires it, so every answer in the browser proves the UI sends it
WAIT = 60  # seconds any single browser wait may take on a loaded 2-core machine (a limit, not a measurement)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def direct_reply(api_url: str, context: str, history: list[str], **overrides: Any) -> str:
    """What ``/api/chat`` answers for this turn with the UI's settings, fetched without the UI."""
    params = {**DEFAULTS, "src_length": SRC_LENGTH, **GREEDY, **overrides}
    payload = ui.chat_payload(context, history, *(params[k] for k in ui.PARAM_ORDER))
    text = "".join(ui.stream_chat(api_url, payload, api_key=API_KEY))
    return text.removesuffix(ui.END_MARKER)


# --- the client and the handlers against a recording server (real HTTP, fixed NDJSON) ----------------------


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Records each request and streams ``self.server.lines`` back as NDJSON."""

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(
            {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
        )
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for line in self.server.lines:
            self.wfile.write((json.dumps(line) + "\n").encode())
            self.wfile.flush()

    def log_message(self, *args: Any) -> None:
        pass


def _chunk(text: str) -> dict[str, Any]:
    return {
        "error_code": 0,
        "error_msg": "Success",
        "result": {"response": {"role": "bot", "utterance": text}},
    }


@pytest.fixture
def recorder() -> Iterator[http.server.HTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    server.requests, server.lines, server.status = [], [_chunk("Hello"), _chunk(" world")], 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()
    server.server_close()


PARAMS = (0, 0.7, 0.95, 1.2, 64, 32)


def test_respond_sends_only_earlier_turns_as_history_and_streams(recorder: Any) -> None:
    turns = [["spell: 1", "one"], ["spell: 2", "two"]]
    views = list(ui.respond(recorder.url, "sk-test", "spell: 3", turns, *PARAMS))
    (req,) = recorder.requests
    assert req["path"] == "/api/chat"
    assert req["auth"] == "Bearer sk-test"
    assert req["body"] == {
        "context": "spell: 3",
        "history": ["spell: 1", "one", "spell: 2", "two"],  # the current turn is only in `context`
        "top_k": 0, "top_p": 0.7, "temperature": 0.95, "repetition_penalty": 1.2,
        "src_length": 64, "max_length": 32, "min_length": 1,
    }  # fmt: skip
    bots = [view[0][-1][1] for view in views]
    assert bots == [None, "Hello", "Hello world"]  # no bot bubble until the first chunk, then one per chunk
    shown, raw, text, state = views[-1]
    assert state == [*turns, ["spell: 3", "Hello world"]] and text == ""
    assert raw[-2:] == [
        {"role": "user", "utterance": "spell: 3"},
        {"role": "bot", "utterance": "Hello world"},
    ]
    assert turns[-1] == ["spell: 2", "two"]  # the caller's list is not modified


def test_respond_without_key_sends_no_header_and_strips_end_marker(recorder: Any) -> None:
    recorder.lines = [_chunk("Hi"), _chunk("[END]")]
    *_, (_, _, _, state) = ui.respond(recorder.url, None, "hello", [], *PARAMS)
    assert recorder.requests[0]["auth"] is None
    assert state == [["hello", "Hi"]]


def test_api_error_drops_the_pair_and_gives_the_text_back(recorder: Any) -> None:
    recorder.lines = [{"error_code": 1, "error_msg": "src_length + max_length > 96"}]
    with pytest.warns(UserWarning, match="src_length"):  # gr.Warning outside a request: a Python warning
        *_, (shown, raw, text, state) = ui.respond(recorder.url, None, "hello", [["a", "b"]], *PARAMS)
    assert state == [["a", "b"]] and text == "hello" and shown == [["a", "b"]]


def test_failed_regenerate_keeps_the_previous_answer(recorder: Any) -> None:
    recorder.lines = [_chunk("partial"), {"error_code": 1, "error_msg": "the server is shutting down"}]
    with pytest.warns(UserWarning, match="shutting down"):
        *_, (shown, _, text, state) = ui.regenerate(recorder.url, None, "draft", [["u1", "b1"]], *PARAMS)
    assert state == [["u1", "b1"]] and shown == [["u1", "b1"]] and text == "draft"


def test_http_error_status_is_reported(recorder: Any) -> None:
    recorder.status, recorder.lines = 401, [{"error": {"message": "invalid api key"}}]
    with pytest.raises(ui.ChatAPIError, match="invalid api key"):
        list(ui.stream_chat(recorder.url, {"context": "x"}))


def test_regenerate_and_rollback_handlers(recorder: Any) -> None:
    turns = [["u1", "b1"], ["u2", "old"]]
    *_, (_, _, text, state) = ui.regenerate(recorder.url, None, "draft", turns, *PARAMS)
    assert recorder.requests[0]["body"]["context"] == "u2"
    assert recorder.requests[0]["body"]["history"] == ["u1", "b1"]
    assert state == [["u1", "b1"], ["u2", "Hello world"]] and text == "draft"
    assert ui.rollback("", state)[2:] == ("u2", [["u1", "b1"]])
    with pytest.warns(UserWarning, match="don't have chat history"):
        list(ui.regenerate(recorder.url, None, "", [], *PARAMS))
    assert recorder.requests[1:] == []


def test_ui_process_keeps_key_out_of_argv_has_no_paddle_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = ui.start_ui_process(
        "http://127.0.0.1:9", host="127.0.0.1", port=port, title="T", sub_title="S", src_length=8,
        max_length=8, api_key="sk-secret",
    )  # fmt: skip
    try:
        ui.wait_until_up(f"http://127.0.0.1:{port}/", timeout=90, proc=proc)
        proc_dir = Path(f"/proc/{proc.pid}")
        assert b"sk-secret" not in (proc_dir / "cmdline").read_bytes()
        assert b"LLM_UI_API_KEY=sk-secret" in (proc_dir / "environ").read_bytes()
        assert "libpaddle" not in (proc_dir / "maps").read_text()  # gradio + httpx only
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=10).json()
        assert config["title"] == "T"
        sliders = {c["props"]["label"]: c["props"] for c in config["components"] if c["type"] == "slider"}
        assert (sliders["Max Src Length"]["maximum"], sliders["Max Src Length"]["value"]) == (8, 8)
        assert (sliders["Max Length"]["maximum"], sliders["Max Length"]["value"]) == (8, 8)  # min(50, 8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the app in a browser, against the real flask_server.py --------------------------------------------------


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"missing {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):  # .ci/run installs both: a missing browser there is a broken CI step
            pytest.fail(reason)
        pytest.skip(reason)


def _ui_children(pid: int) -> list[int]:
    """Child processes of ``pid`` that run ``python -m llm.serve.ui``."""
    kids = [
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    ]
    return [k for k in kids if b"llm.serve.ui" in Path(f"/proc/{k}/cmdline").read_bytes()]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """``flask_server.py`` on the demo model (API on one free port, the UI it launches on another)."""
    _require_browser()
    api_port, ui_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("flask_server") / "server.log"
    cmd = [sys.executable, str(SERVER), "--model_name_or_path", str(DEMO_MODEL), "--host", "127.0.0.1"]
    cmd += ["--flask_port", str(api_port), "--port", str(ui_port)]
    cmd += ["--src_length", str(SRC_LENGTH), "--max_length", str(MAX_LENGTH), "--api_key", API_KEY]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    api_url, ui_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}/"
    try:
        try:
            ui.wait_until_up(api_url + "/health", timeout=120, proc=server)
            ui.wait_until_up(ui_url, timeout=90, proc=server)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n--- server log ---\n{log_path.read_text()[-3000:]}")
        ui_pids = _ui_children(server.pid)
        yield {"api_url": api_url, "ui_url": ui_url, "ui_pids": ui_pids, "log": log_path}
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The UI goes with the server (terminated by it, or by its own parent watchdog).
    try:
        WebDriverWait(ui_pids, WAIT, poll_frequency=0.2).until(lambda pids: not any(map(_running, pids)))
    except TimeoutException:
        for pid in filter(_running, ui_pids):
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the UI process(es) {ui_pids} outlived flask_server.py")


@pytest.fixture(scope="module")
def browser(stack: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


class Page:
    """The chat page in the browser, by the elem_ids ui.build_app gives its components."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        driver.get(url)
        # gradio re-renders components while it streams: a lookup may miss or hold a replaced element
        ignored = (NoSuchElementException, StaleElementReferenceException)
        self.wait = WebDriverWait(driver, WAIT, ignored_exceptions=ignored)
        self.wait.until(lambda d: d.find_elements("css selector", "#utterance textarea"))

    def find(self, css: str) -> Any:
        return self.driver.find_element("css selector", css)

    def set_slider(self, label: str, value: int) -> None:
        box = self.find(f"input[aria-label='number input for {label}']")
        box.clear()
        box.send_keys(str(value), "\t")
        slider = f"input[aria-label='range slider for {label}']"
        self.wait.until(lambda d: self.find(slider).get_attribute("value") == str(value))

    def type(self, text: str) -> None:
        box = self.find("#utterance textarea")
        box.clear()
        box.send_keys(text)

    def click(self, elem_id: str) -> None:
        self.find(f"#{elem_id}").click()

    def messages(self, role: str) -> list[str]:
        return [e.text for e in self.driver.find_elements("css selector", f"#context [data-testid='{role}']")]

    def idle(self) -> bool:
        """No event is pending or streaming into the chat."""
        return "hide" in (self.find("#context > .wrap").get_attribute("class") or "").split()

    def wait_for_bots(self, expected: list[str]) -> None:
        """Until the bot bubbles are ``expected`` and idle; on a timeout, fail showing what they were."""
        try:
            self.wait.until(lambda d: self.messages("bot") == expected and self.idle())
        except TimeoutException:
            assert self.messages("bot") == expected
            raise

    def input_text(self) -> str:
        return self.find("#utterance textarea").get_attribute("value")

    def raw_lines(self) -> list[str]:
        return [line.strip() for line in self.find("#raw_context").text.splitlines()]

    def toasts(self) -> list[str]:
        return [
            e.text
            for e in self.driver.find_elements("css selector", "[data-testid='toast-body'] .toast-text")
        ]


def _shown(text: str) -> str:
    """A reply as the chat bubble shows it (markdown collapses runs of white space)."""
    return " ".join(text.split())


def test_chat_send_regenerate_rollback_in_browser(
    stack: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    api_url = stack["api_url"]
    u1, u2 = "spell: 342", "spell: 777"  # replies of 4 tokens: max_length SHORT cuts the second one
    b1 = direct_reply(api_url, u1, [])
    b2 = direct_reply(api_url, u2, [u1, b1])  # the UI must send turn 1 as history, and turn 2 only as context
    b2_short = direct_reply(api_url, u2, [u1, b1], max_length=SHORT)
    assert b1.strip() and b2.strip() and b2_short != b2, (b1, b2, b2_short)

    page = Page(browser, stack["ui_url"])
    assert "LLM-subtitle" in page.find("#sub_title").text
    for label, value in (("Top-k", GREEDY["top_k"]), ("Max Length", GREEDY["max_length"])):
        page.set_slider(label, value)

    page.type(u1)
    page.click("send")
    page.wait_for_bots([_shown(b1)])  # streamed from /api/chat: the same text as the direct request
    assert page.messages("user") == [u1]
    assert page.input_text() == ""
    assert json.dumps(b1) in page.raw_lines()  # Raw Context keeps the exact text

    page.type(u2)
    page.find("#utterance textarea").send_keys("\n")  # Enter submits too
    page.wait_for_bots([_shown(b1), _shown(b2)])
    assert page.messages("user") == [u1, u2]
    shot = tmp_path / "chat_ui.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Regenerate re-runs the last turn with the current sliders: first with a shorter Max Length (a different
    # answer, so the replacement is visible), then with the old one (greedy: the first answer again).
    page.set_slider("Max Length", SHORT)
    page.click("regenerate")
    page.wait_for_bots([_shown(b1), _shown(b2_short)])
    page.set_slider("Max Length", GREEDY["max_length"])
    page.click("regenerate")
    page.wait_for_bots([_shown(b1), _shown(b2)])
    assert page.messages("user") == [u1, u2]

    page.click("rollback")
    page.wait.until(lambda d: len(page.messages("user")) == 1)
    assert page.input_text() == u2
    assert page.messages("bot") == [_shown(b1)]
    assert json.dumps(u2) not in page.raw_lines() and json.dumps(b1) in page.raw_lines()


def test_empty_send_and_regenerate_without_history_warn(stack: dict[str, Any], browser: Any) -> None:
    page = Page(browser, stack["ui_url"])
    page.click("send")
    page.wait.until(lambda d: ui.EMPTY_INPUT in page.toasts())
    page.click("regenerate")
    page.wait.until(lambda d: ui.NO_HISTORY in page.toasts())
    assert page.messages("user") == [] and page.messages("bot") == []


def test_ui_started_by_the_server_has_no_paddle(stack: dict[str, Any]) -> None:
    (pid,) = stack["ui_pids"]  # exactly one UI process, a child of the server
    assert "libpaddle" not in Path(f"/proc/{pid}/maps").read_text()
