"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UserError(Exception):
    """An error caused by the user's input (config, data, paths); printed without a traceback."""

    exit_code = 2


class ConfigError(UserError):
    """Unknown/ill-typed argument or conflicting options."""


class DataError(UserError):
    """Malformed or missing dataset; the message names the file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ModelError(UserError):
    """Missing or incompatible model / adapter files."""


def exit_on_user_error(func: F) -> F:
    """Decorate a script ``main`` so a :class:`UserError` prints ``error: ...`` and exits non-zero."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(err.exit_code) from None

    return wrapper  # type: ignore[return-value]
