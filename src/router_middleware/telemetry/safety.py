"""Telemetry must never fail or slow a call: every entry point is wrapped by :func:`never_raises`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import structlog

P = ParamSpec("P")
R = TypeVar("R")

log = structlog.get_logger("router_middleware")


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
