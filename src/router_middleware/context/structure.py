"""The shape of a chat history: its protected head, tool results and observations, and atomic blocks.

A *block* is the smallest run of messages that can be dropped without breaking the protocol: an
assistant turn with tool calls together with its tool results, or any single other message. Dropping
whole blocks never orphans a tool result or leaves a call unanswered.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..types import Message

# Observations of agents that run tools without native tool calls (mini-swe-agent, ReAct prompts).
OBSERVATION = re.compile(r"^\s*(?:<returncode>|<output>|Observation:|OBSERVATION:)")


def head_length(messages: Sequence[Message]) -> int:
    """Everything before the first assistant turn: the client's whole opening request (system prompt,
    task, and whatever else it sent with them, such as Cline's standing ``[SYSTEM]`` reminder)."""
    for i, message in enumerate(messages):
        if message.get("role") == "assistant":
            return i
    return len(messages)


def is_observation(messages: Sequence[Message], index: int, head: int) -> bool:
    message = messages[index]
    if index < head or message.get("role") != "user":
        return False
    content = message.get("content")
    return isinstance(content, str) and OBSERVATION.match(content) is not None


def result_indices(messages: Sequence[Message], head: int) -> list[int]:
    """Indices of tool results and observation messages after the head, oldest first."""
    return [
        i for i, m in enumerate(messages)
        if i >= head and (m.get("role") == "tool" or is_observation(messages, i, head))
    ]


def tool_names(messages: Sequence[Message]) -> dict[str, str]:
    """``tool_call_id`` -> tool name, from the assistant turns."""
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or ():
            names[str(call.get("id"))] = str((call.get("function") or {}).get("name") or "")
    return names


def blocks(messages: Sequence[Message], start: int) -> list[tuple[int, int]]:
    """Atomic ``[begin, end)`` blocks covering ``messages[start:]``."""
    out: list[tuple[int, int]] = []
    i = start
    while i < len(messages):
        end = i + 1
        if messages[i].get("role") == "assistant" and messages[i].get("tool_calls"):
            while end < len(messages) and messages[end].get("role") == "tool":
                end += 1
        out.append((i, end))
        i = end
    return out


def has_thinking(message: Message) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") in ("thinking", "redacted_thinking") for p in content
    )
