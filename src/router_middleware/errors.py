"""Errors raised by router-middleware. Each names the input that caused it."""

from __future__ import annotations


class RouterMiddlewareError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RouterMiddlewareError, ValueError):
    """A configuration file or dict is invalid; the message names the field."""


class MessageError(RouterMiddlewareError, ValueError):
    """A chat message is malformed; the message names the source and the message index."""

    def __init__(self, detail: str, *, index: int | None = None, source: str | None = None) -> None:
        where = []
        if source:
            where.append(source)
        if index is not None:
            where.append(f"message {index}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {detail}" if prefix else detail)
        self.index = index
        self.source = source
        self.detail = detail


class SessionFormatError(RouterMiddlewareError, ValueError):
    """A recorded session file does not follow the documented format."""


class OutcomeUnavailable(RouterMiddlewareError, LookupError):
    """``outcome()`` was asked for a call that has not finished (e.g. a stream not yet consumed)."""
