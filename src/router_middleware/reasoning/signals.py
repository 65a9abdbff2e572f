"""What the request's shape says about the step: its kind, and whether the last action failed.

Step kind, when the caller gives none (``AgentContext.step_kind``):

- ``plan``: no assistant turn yet (the first call), or the last message is a new user instruction;
- ``observe``: the last message is a tool result or an observation (``<returncode>``, ``Observation:``);
- ``summarize``: the request asks to summarize (our own summary calls, or the caller's);
- ``act``: anything else (e.g. the last message is an assistant turn being continued).

A failed step is reported by the caller (``"failed"`` or ``"retry"`` in ``AgentContext.tags``) or seen in
the request: the last tool result shows an error (a non-zero ``<returncode>``, a Python traceback, an
``Error:`` line, ``command not found``) or the last two assistant turns made the same tool call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..context.structure import OBSERVATION
from ..messages import text_of
from ..types import AgentContext, History, Message

_ERROR = re.compile(
    r"<returncode>\s*[1-9]\d*\s*</returncode>|Traceback \(most recent call last\)|^\s*(?:\w+)?Error:|"
    r"command not found|No such file or directory",
    re.MULTILINE,
)
_SUMMARY = re.compile(r"\bsummari[sz]e\b", re.IGNORECASE)


def infer_step_kind(messages: Sequence[Message]) -> str:
    if not messages:
        return "plan"
    last = messages[-1]
    role = last.get("role")
    if role == "tool":
        return "observe"
    if role == "user":
        content = last.get("content")
        if isinstance(content, str) and OBSERVATION.match(content):
            return "observe"
        if _SUMMARY.search(text_of(last)[:400]):
            return "summarize"
        return "plan"
    if not any(m.get("role") == "assistant" for m in messages):
        return "plan"
    return "act"


def _last_calls(messages: Sequence[Message], count: int = 2) -> list[str]:
    """The last ``count`` assistant tool-call turns, oldest first (read from the end: no full scan)."""
    calls: list[str] = []
    for message in reversed(messages):
        if message.get("role") == "assistant" and message.get("tool_calls"):
            calls.append("|".join(
                f"{(c.get('function') or {}).get('name')}:{(c.get('function') or {}).get('arguments')}"
                for c in message["tool_calls"]))
            if len(calls) == count:
                break
    return calls[::-1]


def failure_signal(messages: Sequence[Message], context: AgentContext) -> str | None:
    """Why the previous step looks failed, or ``None`` (found once per plan's history: routing and
    reasoning both ask)."""
    if isinstance(messages, History):
        return messages.derived(("failure_signal", context.tags), lambda: _failure(messages, context))
    return _failure(messages, context)


def _failure(messages: Sequence[Message], context: AgentContext) -> str | None:
    tags = {t.lower() for t in context.tags}
    if tags & {"failed", "retry"}:
        return "the caller reported a failed step"
    if messages:
        last = messages[-1]
        is_result = last.get("role") == "tool" or (
            last.get("role") == "user" and isinstance(last.get("content"), str)
            and OBSERVATION.match(str(last.get("content"))) is not None)
        if is_result and _ERROR.search(text_of(last)[-4000:]):
            return "the last tool result shows an error"
    calls = _last_calls(messages)
    if len(calls) >= 2 and calls[-1] == calls[-2]:
        return "the agent repeated its last tool call"
    return None
