"""``ServerArgument`` of ``flask_server.py`` (spec §9) and the startup checks made before any weights load.

PaddleNLP's fields keep their names and defaults (``port`` is the Gradio UI, ``flask_port`` the API,
``base_port`` a deprecated alias of ``flask_port``); the rest are this toolkit's: where to listen, the API key,
the scheduler's batch and queue bounds, the request body limit and the shutdown grace period.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from llm.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_FLASK_PORT = 8010
API_KEY_ENV = "LLM_API_KEY"


@dataclass
class ServerArgument:
    """How ``flask_server.py`` serves (the predictor flags choose the model and its lengths)."""

    port: int = field(default=8011, metadata={"help": "Port of the Gradio UI."})
    flask_port: int | None = field(
        default=None, metadata={"help": f"Port of the HTTP API (default {DEFAULT_FLASK_PORT}; 0 = any free)."}
    )
    base_port: int | None = field(
        default=None, metadata={"help": "Deprecated alias of --flask_port (ignored if both are set)."}
    )
    title: str = field(default="LLM", metadata={"help": "Title of the UI."})
    sub_title: str = field(default="LLM-subtitle", metadata={"help": "Subtitle of the UI."})
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "Interface the API and the UI listen on (0.0.0.0 = every interface)."},
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": f"Require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV})."
        },
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "Model id of the OpenAI API (default: the model directory's name)."}
    )
    max_batch_size: int = field(default=8, metadata={"help": "Requests generated together."})
    max_queue: int = field(
        default=64, metadata={"help": "Requests waiting beyond the batch; more get 503 with Retry-After."}
    )
    max_body_bytes: int = field(
        default=1 << 20, metadata={"help": "Largest request body in bytes (larger ones get 413)."}
    )
    graceful_timeout: float = field(
        default=10.0,
        metadata={"help": "Seconds in-flight requests may finish after SIGTERM/Ctrl-C before they are cut."},
    )
    no_ui: bool = field(default=False, metadata={"help": "Serve the API only (no Gradio UI process)."})

    def __post_init__(self) -> None:
        if self.base_port is not None:
            if self.flask_port is None:
                logger.warning(
                    "--base_port is deprecated (since 2023.12.30) and will be removed; use --flask_port %d",
                    self.base_port,
                )
                self.flask_port = self.base_port
            else:
                logger.warning("--base_port is deprecated and ignored because --flask_port is set")
        if self.flask_port is None:
            self.flask_port = DEFAULT_FLASK_PORT
        for name in ("port", "flask_port"):
            value = getattr(self, name)
            if not 0 <= int(value) <= 65535:
                raise ConfigError(f"{name} must be a TCP port in [0, 65535], got {value}")
        if not self.no_ui and self.port == self.flask_port and self.port != 0:
            raise ConfigError(
                f"port (the UI) and flask_port (the API) are both {self.port}; give them different ports"
            )
        for name in ("max_batch_size", "max_queue"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.max_body_bytes) < 1024:
            raise ConfigError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not math.isfinite(self.graceful_timeout) or self.graceful_timeout < 0:
            raise ConfigError(
                f"graceful_timeout must be a number of seconds >= 0, got {self.graceful_timeout}"
            )
        if not self.host:
            raise ConfigError(
                "host must not be empty (127.0.0.1 for this machine, 0.0.0.0 for every interface)"
            )
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        elif not self.api_key.strip():
            raise ConfigError(
                f"api_key must not be empty (leave it unset, or unset ${API_KEY_ENV}, for none)"
            )
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ConfigError("served_model_name must not be empty")


def world_size() -> int:
    """Processes of a ``paddle.distributed.launch`` job (1 when run plainly)."""
    for key in ("PADDLE_TRAINERS_NUM", "PADDLE_GLOBAL_SIZE"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 1


def check_serving_options(args: Any, model_args: Any, server: ServerArgument) -> None:
    """Refuse options the server cannot honour, before the model loads (one-line :class:`ConfigError`)."""
    if world_size() > 1:
        raise ConfigError(
            f"flask_server.py serves from one process, got a job of {world_size()} (tensor-parallel serving "
            "needs GPUs and is not available here); launch it with --nproc_per_node 1"
        )
    if args.decode_strategy == "beam_search":
        raise ConfigError("beam search is not served; use --decode_strategy greedy_search or sampling")
    if args.benchmark:
        raise ConfigError("--benchmark is a predictor.py option; flask_server.py serves requests")
    if model_args.data_file:
        raise ConfigError("--data_file is a predictor.py option; flask_server.py generates for HTTP requests")
    check_port_free(server.host, int(server.flask_port), "flask_port")
    if not server.no_ui:
        check_port_free(server.host, int(server.port), "port")


def check_port_free(host: str, port: int, name: str) -> None:
    """A one-line :class:`ConfigError` when ``host:port`` cannot be bound (in use, or an unknown host)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise ConfigError(f"cannot listen on host {host!r}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({err.strerror}); pass another --{name}"
            ) from None
