"""Opt-in capture of message content on spans, always through the redactor."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..messages import text_of
from ..types import AttributeValue, Message
from .redaction import Redactor


def _parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    text = text_of({k: v for k, v in message.items() if k != "tool_calls"})
    if text:
        parts.append({"type": "text", "content": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        parts.append({"type": "tool_call", "id": call.get("id"), "name": function.get("name"),
                      "arguments": function.get("arguments")})
    if message.get("role") == "tool":
        parts = [{"type": "tool_call_response", "id": message.get("tool_call_id"), "response": text}]
    return parts


def content_attributes(
    messages: Sequence[Message], output: Sequence[Mapping[str, Any]] | None, redact: Redactor,
) -> dict[str, AttributeValue]:
    """``gen_ai.system_instructions``, ``gen_ai.input.messages`` and ``gen_ai.output.messages`` (JSON;
    none for ``output=None``: a failed attempt's)."""
    system = [p for m in messages if m.get("role") in ("system", "developer") for p in _parts(m)]
    inputs = [{"role": m.get("role"), "parts": _parts(m)}
              for m in messages if m.get("role") not in ("system", "developer")]
    attrs: dict[str, AttributeValue] = {"gen_ai.input.messages": _json(inputs, redact)}
    if output is not None:
        outputs = [{"role": "assistant", "parts": _parts(m), "finish_reason": m.get("finish_reason")} for m in output]
        attrs["gen_ai.output.messages"] = _json(outputs, redact)
    if system:
        attrs["gen_ai.system_instructions"] = _json(system, redact)
    return attrs


def _json(value: Any, redact: Redactor) -> str:
    """``value`` as JSON, each of its strings redacted first, as written (as a log line's fields are):
    redacted as JSON, a secret written ``api_key="..."`` passed the rules, its quotes escaped there, a
    half-redacted string was no JSON, and a rule could match across the JSON's own syntax or escapes."""
    return json.dumps(_redacted(value, redact), ensure_ascii=False)


def _redacted(value: Any, redact: Redactor) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redacted(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, redact) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


def response_messages(response: Any) -> list[dict[str, Any]]:
    out = []
    for choice in getattr(response, "choices", None) or []:
        message = getattr(choice, "message", None)
        if message is None:
            continue
        data = message.model_dump() if hasattr(message, "model_dump") else dict(message)
        data["finish_reason"] = getattr(choice, "finish_reason", None)
        out.append(data)
    return out
