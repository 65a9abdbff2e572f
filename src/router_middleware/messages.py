"""Checks and small helpers over OpenAI-format chat messages."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import MessageError
from .memo import MessageMemo
from .types import Message

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def parse_tool_calls(raw: Any, *, index: int, source: str | None = None) -> list[dict[str, Any]] | None:
    """Return ``tool_calls`` as a list of dicts.

    Accepts a list, a JSON string, or a Python-literal string (some recorded trajectories store the
    list with ``repr``). Each call must have an ``id`` and ``function.name``.
    """
    if raw is None:
        return None
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except ValueError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError) as exc:
                raise MessageError(f"tool_calls is a string that is neither JSON nor a list ({exc})",
                                   index=index, source=source) from None
    if not isinstance(value, list):
        raise MessageError(f"tool_calls must be a list, got {type(value).__name__}", index=index, source=source)
    calls: list[dict[str, Any]] = []
    for j, call in enumerate(value):
        if not isinstance(call, Mapping):
            raise MessageError(f"tool_calls[{j}] must be an object", index=index, source=source)
        function = call.get("function")
        if not call.get("id"):
            raise MessageError(f"tool_calls[{j}] has no id", index=index, source=source)
        if not isinstance(function, Mapping) or not function.get("name"):
            raise MessageError(f"tool_calls[{j}] has no function.name", index=index, source=source)
        calls.append(dict(call))
    return calls


def validate_message(message: Any, *, index: int, source: str | None = None) -> dict[str, Any]:
    """Validate one message and return it as a plain dict (tool_calls parsed to a list)."""
    if not isinstance(message, Mapping):
        raise MessageError(f"expected an object, got {type(message).__name__}", index=index, source=source)
    role = message.get("role")
    if role not in ROLES:
        raise MessageError(f"unknown role {role!r} (expected one of {sorted(ROLES)})", index=index, source=source)
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise MessageError(f"content must be a string, a list of parts or null, got {type(content).__name__}",
                           index=index, source=source)
    if role == "tool" and not message.get("tool_call_id"):
        raise MessageError("tool message has no tool_call_id", index=index, source=source)
    raw_calls = message.get("tool_calls", None)
    if "tool_calls" not in message or (isinstance(raw_calls, list) and raw_calls and _calls_ok(raw_calls)):
        return message if isinstance(message, dict) else dict(message)  # valid as sent: no copy
    out = dict(message)
    calls = parse_tool_calls(raw_calls, index=index, source=source)
    if calls:
        out["tool_calls"] = calls
    else:
        out.pop("tool_calls")
    return out


def _calls_ok(calls: list[Any]) -> bool:
    return all(isinstance(c, Mapping) and c.get("id") and isinstance(c.get("function"), Mapping)
               and c["function"].get("name") for c in calls)


_VALID = MessageMemo()


def validate_messages(messages: Iterable[Any], *, source: str | None = None) -> list[dict[str, Any]]:
    """Validate every message (a resent, unchanged message dict is not checked again)."""
    if isinstance(messages, Mapping):
        raise MessageError("messages must be a list of message objects, got one message (a dict): "
                           "wrap it in a list", source=source)
    if isinstance(messages, str | bytes) or not isinstance(messages, Iterable):
        raise MessageError("messages must be a list of message objects", source=source)
    out = []
    for i, message in enumerate(messages):
        valid = _VALID.get(message) if isinstance(message, dict) else None
        if valid is None:
            valid = validate_message(message, index=i, source=source)
            if isinstance(message, dict):
                _VALID.put(message, valid)
        out.append(valid)
    return out


def integrity_violations(messages: Sequence[Message]) -> list[str]:
    """Problems a provider rejects with a 400: orphaned tool results and unanswered tool calls.

    A tool result must answer a call made by an earlier assistant turn that has not been answered
    yet; every tool call must be answered before the next assistant turn. A trailing assistant
    turn with pending calls is fine (its results have not been produced yet).
    """
    problems: list[str] = []
    pending: dict[str, int] = {}
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            if pending:
                problems.append(f"message {i}: assistant turn before results of {sorted(pending)}")
            pending = {str(c.get("id")): i for c in (message.get("tool_calls") or [])}
        elif role == "tool":
            call_id = str(message.get("tool_call_id"))
            if call_id in pending:
                del pending[call_id]
            else:
                problems.append(f"message {i}: tool result {call_id!r} has no matching tool call")
        elif role in ("user", "system", "developer") and pending and i + 1 < len(messages):
            # Results must directly follow the assistant turn that asked for them.
            problems.append(f"message {i}: {role} turn before results of {sorted(pending)}")
            pending = {}
    return problems


def text_of(message: Message) -> str:
    """All text in a message: string content, text parts, and tool-call arguments."""
    parts: list[str] = []
    content = message.get("content")
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping):
                for key in ("text", "thinking"):
                    value = part.get(key)
                    if isinstance(value, str):
                        parts.append(value)
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append(str(function.get("name") or ""))
        parts.append(str(function.get("arguments") or ""))
    return "\n".join(parts)
