"""Telemetry must never fail or slow a call: every entry point is wrapped by :func:`never_raises`."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import structlog

from .redaction import DEFAULT_REDACTOR

P = ParamSpec("P")
R = TypeVar("R")


class LibraryLogger:
    """Our events go to structlog once the application has configured it; before that, to the
    standard library's ``logging.getLogger("router_middleware")``, which shows nothing below WARNING
    until the application sets a handler or level: a library does not print to stdout by default."""

    _LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

    def __init__(self, name: str) -> None:
        self._structured = structlog.get_logger(name)
        self._standard = logging.getLogger(name)
        self._bound: tuple[tuple[int, ...], Any] | None = None  # structlog's configuration, its logger

    def _logger(self) -> Any:
        """structlog's logger for the current configuration, assembled once per configuration (a lazy
        proxy assembles one on every event)."""
        version = tuple(id(value) for value in structlog.get_config().values())
        if self._bound is None or self._bound[0] != version:
            self._bound = (version, self._structured.bind())
        return self._bound[1]

    def enabled(self, level: str) -> bool:
        """Whether an event at ``level`` goes anywhere, so a caller can skip building its fields."""
        if structlog.is_configured():
            check = getattr(self._logger(), "is_enabled_for", None)
            return bool(check(self._LEVELS[level])) if callable(check) else True
        return self._standard.isEnabledFor(self._LEVELS[level])

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if level in ("warning", "error"):  # errors quote what failed: no secret reaches a log line
            fields = {k: DEFAULT_REDACTOR(v) if isinstance(v, str) else v for k, v in fields.items()}
        if structlog.is_configured():
            getattr(self._logger(), level)(event, **fields)
        elif self._standard.isEnabledFor(self._LEVELS[level]):
            self._standard.log(self._LEVELS[level], "%s %s", event,
                               " ".join(f"{key}={value!r}" for key, value in fields.items()))

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)


log = LibraryLogger("router_middleware")


def never_raises(default: R) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: run ``fn``; on any exception log it and return ``default``."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - telemetry must not fail the call
                try:
                    log.warning("telemetry_error", where=fn.__name__, error_type=type(exc).__name__)
                except Exception:  # noqa: BLE001, S110 - not even the warning may escape
                    pass
                return default

        return inner

    return wrap
