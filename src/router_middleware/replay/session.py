"""Recorded sessions: load and validate the ``agent-sessions`` JSON format.

A file holds ``id``, ``model``, ``messages`` (the final history, OpenAI chat format) and ``calls``:
one per model call with ``prefix_len`` (the request is ``messages[:prefix_len]``, the reply is
``messages[prefix_len]``), ``model``, ``provider``, ``usage`` (``prompt_tokens``,
``completion_tokens``, ``cached_tokens``, ``reasoning_tokens``) and ``cost_usd``. ``usage``,
``model`` and ``cost_usd`` may be null (chat transcripts); ``ts`` (optional) is when the call was
made, in seconds since the epoch or ISO 8601 (UTC unless it says otherwise). Trailing records with role ``exit``
(mini-swe-agent's exit status, never sent to a model) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from ..errors import SessionFormatError
from ..files import read_json
from ..messages import validate_messages

_TRAJECTORY_MARKERS = frozenset({"exit"})


@dataclass(frozen=True, slots=True)
class RecordedUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RecordedCall:
    prefix_len: int
    model: str | None
    provider: str | None
    usage: RecordedUsage | None
    cost_usd: float | None
    ts: float | None = None


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    path: str
    model: str | None
    messages: tuple[Mapping[str, Any], ...]
    calls: tuple[RecordedCall, ...]
    source: str | None = None
    license: str | None = None

    @property
    def has_tools(self) -> bool:
        return any(m.get("role") == "tool" or m.get("tool_calls") for m in self.messages)


def _int_field(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SessionFormatError(f"{where} must be a non-negative integer, got {value!r}")
    return value


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def _usage(raw: Any, where: str) -> RecordedUsage | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise SessionFormatError(f"{where}.usage must be an object or null")
    fields = {}
    for key in _USAGE_KEYS:
        value = raw.get(key)
        if value is None:  # a misspelled key is named, with the one it was likely meant for
            near = next((k for k in raw if k not in _USAGE_KEYS and get_close_matches(str(k), [key], cutoff=0.8)), None)
            if near is not None:
                raise SessionFormatError(f"{where}.usage has {near!r}, no field; did you mean {key!r}?")
        if value is None and key in ("cached_tokens", "reasoning_tokens"):
            value = 0
        fields[key] = _int_field(value, f"{where}.usage.{key}")
    return RecordedUsage(**fields)


def _timestamp(raw: Any, where: str) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, str):
        try:
            moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    raise SessionFormatError(f"{where}.ts must be epoch seconds or an ISO 8601 time, got {raw!r}")


def _is_marker(message: Any) -> bool:
    return isinstance(message, Mapping) and message.get("role") in _TRAJECTORY_MARKERS


def parse_session(data: Any, label: str) -> Session:
    """Validate decoded JSON ``data``; errors name ``label`` and the message or call index."""
    if not isinstance(data, Mapping):
        raise SessionFormatError(f"{label}: the top level must be an object")
    raw_messages = data.get("messages")
    raw_calls = data.get("calls")
    if not isinstance(raw_messages, list):
        raise SessionFormatError(f"{label}: 'messages' must be a list")
    if not isinstance(raw_calls, list):
        raise SessionFormatError(f"{label}: 'calls' must be a list")
    end = len(raw_messages)
    while end and _is_marker(raw_messages[end - 1]):
        end -= 1
    # Tool-call integrity and content parts are not checked here: a recording is what providers accepted
    # (and is never sent), and replay reports integrity per planned request instead of refusing the session.
    messages = validate_messages(raw_messages[:end], source=label, tool_calls=False, parts=False)
    calls = []
    for i, raw in enumerate(raw_calls):
        where = f"{label}: call {i}"
        if not isinstance(raw, Mapping):
            raise SessionFormatError(f"{where} must be an object")
        prefix_len = _int_field(raw.get("prefix_len"), f"{where}.prefix_len")
        if prefix_len < 1 or prefix_len > len(messages):
            raise SessionFormatError(f"{where}.prefix_len={prefix_len} is outside the {len(messages)} messages")
        cost = raw.get("cost_usd")
        if cost is not None and not isinstance(cost, int | float):
            raise SessionFormatError(f"{where}.cost_usd must be a number or null")
        calls.append(RecordedCall(
            prefix_len=prefix_len,
            model=raw.get("model"),
            provider=raw.get("provider"),
            usage=_usage(raw.get("usage"), where),
            cost_usd=float(cost) if cost is not None else None,
            ts=_timestamp(raw.get("ts", raw.get("timestamp")), where),
        ))
    return Session(
        id=str(data.get("id") or Path(label).stem),
        path=label,
        model=data.get("model"),
        messages=tuple(messages),
        calls=tuple(calls),
        source=data.get("source"),
        license=data.get("license"),
    )


def load_session(path: str | Path) -> Session:
    return parse_session(read_json(path, SessionFormatError), str(path))
