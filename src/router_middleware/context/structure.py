"""The shape of a chat history: its protected head, tool results and observations, and atomic blocks.

A *block* is the smallest run of messages that can be dropped without breaking the protocol: an
assistant turn with tool calls together with its tool results (and any system or developer message
sent before the last of them), or any single other message. Dropping
whole blocks never orphans a tool result or leaves a call unanswered.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Sequence
from operator import itemgetter

from ..messages import SIDE_ROLES, text_of
from ..tokens import Profile
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


# What coding agents send in the user's role themselves: Cline's (and Roo's, Kilo's) tool results and
# reminders, mini-swe-agent's format and timeout notes; unless the user's own words are in them (an
# answer, feedback, a message on resuming).
AGENT_SAID = re.compile(r"^\s*(?:\[[\w-]+(?: for .*?)?\] Result:|\[ERROR\] You did not use a tool"
                        r"|\[TASK RESUMPTION\]|Please always provide EXACTLY ONE action|The last command <command>)")
USER_SAID = re.compile(r"<(?:answer|feedback|user_message|task)>")


def agent_speaks_as_user(messages: Sequence[Message]) -> bool:
    """Whether an agent sends its tool results in the user's role in ``messages`` (Cline's XML tools,
    mini-swe-agent's observations): a history with no native tool calls that is no plain chat."""
    return any(m.get("role") == "user" and (is_observation(messages, i, 0) or AGENT_SAID.match(text_of(m)))
               for i, m in enumerate(messages))


def last_instruction(messages: Sequence[Message], head: int) -> int | None:
    """Index of the user's latest words after the head, if any: what an agent is working on once the
    task changed midway ("also update the docs"). Not an observation (mini-swe-agent's), nor a tool
    result or reminder an agent sends as the user (:data:`AGENT_SAID`) unless it holds the user's own
    words (:data:`USER_SAID`)."""
    for i in range(len(messages) - 1, head - 1, -1):
        if messages[i].get("role") != "user":
            continue
        text = text_of(messages[i])  # an observation sent as a list of parts too
        if not (OBSERVATION.match(text) or AGENT_SAID.match(text)) or USER_SAID.search(text):
            return i
    return None


def standing_instructions(span: Sequence[Message]) -> list[Message]:
    """The system and developer messages of ``span`` (a part of the history being dropped), the last of
    each text once: an instruction given mid-session (a mode switch, an author's note, an agent's
    reminder) still applies after a cut."""
    last: dict[tuple[object, str], Message] = {}
    for message in span:
        if message.get("role") in SIDE_ROLES and not message.get("tool_calls"):
            key = (message.get("role"), text_of(message))
            last.pop(key, None)  # kept where it was said last
            last[key] = message
    return list(last.values())


def is_standing(messages: Sequence[Message], begin: int, end: int) -> bool:
    """Whether the block ``messages[begin:end]`` holds only system or developer messages."""
    return all(m.get("role") in SIDE_ROLES and not m.get("tool_calls") for m in messages[begin:end])


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


def blocks(messages: Sequence[Message], start: int, profile: Profile | None = None) -> list[tuple[int, int]]:
    """Atomic ``[begin, end)`` blocks covering ``messages[start:]``. With the history's ``profile``
    they are found once per history (from its first message), resuming from the last block of a
    history it extends; ``start`` is most often the head's end, where a block begins."""
    if profile is None:
        return _blocks(messages, start)

    def scan(earlier: list[tuple[int, int]] | None) -> list[tuple[int, int]]:
        if not earlier:
            return _blocks(messages, 0)
        return [*earlier[:-1], *_blocks(messages, earlier[-1][0])]  # the last block may have grown

    every = profile.derive("blocks", scan)
    at = bisect_left(every, start, key=itemgetter(0))
    if at < len(every) and every[at][0] == start:
        return every[at:]
    return _blocks(messages, start)  # ``start`` inside a block (or past the end): scanned from there


def _blocks(messages: Sequence[Message], start: int) -> list[tuple[int, int]]:
    """A tool turn's block holds its results, and a system or developer message sent before all of
    them came (such a message neither answers nor closes the turn: see ``messages.SIDE_ROLES``)."""
    out: list[tuple[int, int]] = []
    begin = start
    calls = False  # the block being read is an assistant turn with tool calls
    open_ids: set[str] = set()  # the ids of its calls no result has answered yet
    for i, message in enumerate(messages[start:], start):
        role = message.get("role")
        if calls and role == "tool":
            open_ids.discard(str(message.get("tool_call_id")))
            continue
        if calls and open_ids and role in SIDE_ROLES and not message.get("tool_calls"):
            continue
        if i > begin:
            out.append((begin, i))
        begin = i
        calls = role == "assistant" and bool(message.get("tool_calls"))
        open_ids = {str(c.get("id")) for c in message.get("tool_calls") or () if isinstance(c, dict)}
    if begin < len(messages):
        out.append((begin, len(messages)))
    return out


def has_thinking(message: Message) -> bool:
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") in ("thinking", "redacted_thinking") for p in content
    )
