"""``flask_server.py``: load the model, serve the API (werkzeug, threaded), start the UI, shut down cleanly.

Lifecycle: every option is checked (ports free, no beam search, one process) before the weights load; then
the scheduler starts, the API listens on ``--host:--flask_port`` and the Gradio UI runs as a separate process
(``llm.serve.ui.start_ui_process``; skipped with ``--no_ui`` or when that module is missing). SIGTERM or
Ctrl-C: the listening socket closes (no new connections), in-flight requests get ``--graceful_timeout``
seconds to finish (a second Ctrl-C cuts that short), then the scheduler shuts down (what is still running
ends as "the server is shutting down"), the UI process is terminated (killed if it does not exit) and the
process exits 0.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import subprocess
import sys
import threading
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server

from llm.errors import exit_on_user_error
from llm.serve.arguments import ServerArgument, check_serving_options
from llm.serve.service import Service

logger = logging.getLogger(__name__)

DRAIN_AFTER_CANCEL = 5.0  # seconds for cut streams to write their last line
UI_STOP_TIMEOUT = 10.0


class RequestHandler(WSGIRequestHandler):
    """werkzeug's handler with a socket timeout, so a stalled client cannot hold a thread forever."""

    timeout = 60


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr``, also after it has been swapped (tests capture it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging() -> None:
    """INFO lines of the toolkit and werkzeug's access log on stderr (paddlenlp keeps its own logger)."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("llm", "werkzeug"):
        log = logging.getLogger(name)
        if not log.handlers:
            log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def connect_host(host: str) -> str:
    """The address a local client (the UI) uses to reach a server listening on ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# ------------------------------------------------------------------------------------------ the UI process
def start_ui(server: ServerArgument, api_url: str, service: Service) -> subprocess.Popen | None:
    """The Gradio UI process, or None (``--no_ui``, or the UI module is missing / fails to start)."""
    if server.no_ui:
        return None
    try:
        from llm.serve.ui import start_ui_process
    except ImportError as err:
        logger.info("the Gradio UI is not available (%s); serving the API only", err)
        return None
    try:
        proc = start_ui_process(
            api_url,
            host=server.host,
            port=int(server.port),
            title=server.title,
            sub_title=server.sub_title,
            src_length=service.src_length,
            max_length=service.max_length,
            api_key=server.api_key,
        )
    except Exception as err:  # noqa: BLE001 - the API still serves; one line says why the UI does not
        logger.warning("the Gradio UI did not start (%s: %s); serving the API only", type(err).__name__, err)
        return None
    logger.info("UI: http://%s:%d (process %d)", connect_host(server.host), server.port, proc.pid)
    return proc


def stop_ui(proc: subprocess.Popen | None) -> None:
    """Terminate the UI process; kill it if it has not exited within ``UI_STOP_TIMEOUT`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(UI_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        logger.warning("the UI process %d did not exit after SIGTERM; killing it", proc.pid)
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------------------ serving
class Stopper:
    """SIGTERM/SIGINT handlers: the first signal asks for a shutdown; a second Ctrl-C for a quick one.

    A repeated SIGTERM changes nothing: ``paddle.distributed.launch`` sends it three times 0.2 s apart, then
    waits 30 s. The handlers stay installed until the process exits, so no repeat can kill it mid-shutdown.
    """

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.hurry = threading.Event()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested.is_set() and signum == signal.SIGINT:
            self.hurry.set()
        self.requested.set()


def serve(service: Service, server: ServerArgument) -> int:
    """Serve until SIGTERM/SIGINT, then shut down as the module docstring says; returns the exit code."""
    from llm.serve.app import create_app

    app = create_app(service, api_key=server.api_key, max_body_bytes=server.max_body_bytes)
    activity = app.extensions["llm.activity"]
    httpd = make_server(
        server.host, int(server.flask_port), app, threaded=True, request_handler=RequestHandler
    )
    api_url = f"http://{connect_host(server.host)}:{httpd.server_port}"
    stopper = Stopper()
    stopper.install()
    listener = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="llm-http")
    listener.start()
    logger.info(
        "API: %s (model %r, src_length %d, max_length %d, %s)",
        api_url,
        service.model_name,
        service.src_length,
        service.max_length,
        "API key required" if server.api_key else "no API key",
    )
    ui = None
    try:
        ui = start_ui(server, api_url, service)
        while not stopper.requested.wait(0.5):
            if ui is not None and ui.poll() is not None:
                logger.warning("the UI process exited with code %s; the API keeps serving", ui.returncode)
                ui = None
    finally:
        logger.info("shutting down: no new connections, %d request(s) in flight", activity.active)
        if activity.active:
            logger.info("in flight: %s", activity.describe())
        httpd.shutdown()
        listener.join()
        httpd.server_close()
        if not activity.wait_idle(server.graceful_timeout, stopper.hurry):
            logger.info("cutting %d request(s) still running: %s", activity.active, activity.describe())
        service.shutdown()
        activity.wait_idle(DRAIN_AFTER_CANCEL)
        stop_ui(ui)
        logger.info("stopped")
    return 0


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    """``python flask_server.py --model_name_or_path DIR [--flask_port 8010] [--port 8011] ...``."""
    from llm.config.parser import parse_arguments
    from llm.infer.arguments import ModelArgument, PredictorArgument

    configure_logging()
    args, model_args, server = parse_arguments((PredictorArgument, ModelArgument, ServerArgument), argv)
    check_serving_options(args, model_args, server)
    try:
        code = serve_model(args, server)
    except KeyboardInterrupt:  # Ctrl-C while the model loads
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(code)


def serve_model(args: Any, server: ServerArgument) -> int:
    """Load the predictor described by ``args`` and :func:`serve` it."""
    from llm.infer.predictor import Predictor

    if args.batch_size != 1:
        logger.warning(
            "--batch_size is not used by the server; --max_batch_size (%d) sets the batch",
            server.max_batch_size,
        )
    predictor = Predictor.from_args(dataclasses.replace(args, batch_size=server.max_batch_size))
    service = Service.create(predictor, args, server)
    return serve(service, server)
