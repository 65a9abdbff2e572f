"""structlog setup: JSON lines in production, a readable console in development."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace

from ..errors import ConfigError


def add_trace_context(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Add the current span's ids to an event that has none (a structlog processor)."""
    if "trace_id" not in event:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            event["trace_id"] = format(context.trace_id, "032x")
            event["span_id"] = format(context.span_id, "016x")
    return event


def configure_logging(*, json: bool | None = None, level: int | str = logging.INFO, stream: Any = None) -> None:
    """Configure structlog for the application. ``json=None`` picks JSON unless the stream is a terminal;
    ``level``: a ``logging`` level or its name (``"warning"``). Raises :class:`~router_middleware.ConfigError`
    for a level it does not know or a ``stream`` without ``write`` and ``flush``."""
    level = _level(level)
    if stream is not None and not all(callable(getattr(stream, name, None)) for name in ("write", "flush")):
        raise ConfigError(f"stream: expected a file-like object with write() and flush(), got {type(stream).__name__}")
    stream = stream or sys.stderr
    isatty = getattr(stream, "isatty", None)
    use_json = not (callable(isatty) and isatty()) if json is None else json
    renderer: Any = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            add_trace_context,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def _level(level: int | str) -> int:
    """``level`` as a ``logging`` number (a name ``logging`` knows, in any case, or a number); else
    ``ConfigError``."""
    names = logging.getLevelNamesMapping()
    if isinstance(level, str) and level.strip().upper() in names:
        return names[level.strip().upper()]
    if isinstance(level, int) and not isinstance(level, bool) and level >= 0:
        return level
    raise ConfigError(f"level: expected a logging level ({', '.join(n.lower() for n in sorted(names))}, or "
                      f"logging.INFO...), got {level!r}")
