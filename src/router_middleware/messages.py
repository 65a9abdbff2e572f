"""Checks and small helpers over OpenAI-format chat messages."""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, Literal

from . import wire
from .errors import MessageError
from .memo import HistoryMemo, MessageMemo
from .types import Message

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _plain(value: Any, key: str = "role") -> Any:
    """A pydantic message or tool call (litellm's ``Message``, the OpenAI SDK's) as the dict litellm
    itself sends for it: its ``model_dump()`` without the ``None`` fields, when that has the OpenAI
    ``key`` (``role``; ``id`` for a tool call). Anything else as it is (a LangChain message, whose
    dump has a ``type`` instead, is refused by name)."""
    dump = getattr(value, "model_dump", None)
    if dump is None or isinstance(value, Mapping):
        return value
    dumped = dump()
    return {k: field for k, field in dumped.items() if field is not None} if key in dumped else value


def _not_an_object(message: Any) -> str:
    name = type(message).__name__
    if type(message).__module__.startswith("langchain"):
        return (f"expected an OpenAI-format message, got a LangChain {name}: convert the list with "
                "langchain_core.messages.convert_to_openai_messages, or call through RoutedChatModel")
    return f"expected an object, got {name}"


def parse_tool_calls(raw: Any, *, index: int, source: str | None = None) -> list[dict[str, Any]] | None:
    """Return ``tool_calls`` as a list of dicts.

    Accepts a list, a JSON string, or a Python-literal string (some recorded trajectories store the
    list with ``repr``). Each call must have an ``id`` and ``function.name``; its ``function.arguments``
    given as an object is written as the JSON string OpenAI's format has (litellm sends the object to
    OpenAI, which refuses it, and breaks on it for Anthropic and Gemini).
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
            except (ValueError, SyntaxError):
                shown = raw if len(raw) <= 60 else raw[:57] + "..."
                raise MessageError(f"tool_calls is a string that is neither JSON nor a list: {shown!r}",
                                   index=index, source=source) from None
    if not isinstance(value, list):
        raise MessageError(f"tool_calls must be a list, got {type(value).__name__}", index=index, source=source)
    calls: list[dict[str, Any]] = []
    for j, call in enumerate(_plain(call, "id") for call in value):
        if not isinstance(call, Mapping):
            raise MessageError(f"tool_calls[{j}] must be an object", index=index, source=source)
        function = call.get("function")
        if not call.get("id"):
            raise MessageError(f"tool_calls[{j}] has no id", index=index, source=source)
        if not isinstance(function, Mapping) or not function.get("name"):
            raise MessageError(f"tool_calls[{j}] has no function.name", index=index, source=source)
        arguments = function.get("arguments")
        if isinstance(arguments, Mapping):  # OpenAI's format is a JSON string: litellm breaks on an object
            try:
                written = json.dumps(arguments, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise MessageError(f"tool_calls[{j}].function.arguments is an object JSON cannot write ({exc}): "
                                   "give it as a JSON string", index=index, source=source) from None
            call = {**call, "function": {**function, "arguments": written}}
        calls.append(dict(call))
    return calls


def validate_message(message: Any, *, index: int, source: str | None = None, parts: bool = True) -> dict[str, Any]:
    """Validate one message and return it as a plain dict (tool_calls parsed to a list of dicts; a
    pydantic message, such as the ``choices[0].message`` of an earlier answer, as litellm sends it).
    ``parts``: a user message's content parts are of types litellm sends (off where another client,
    an agent's own chat model, sends the call)."""
    message = _plain(message)
    if not isinstance(message, Mapping):
        raise MessageError(_not_an_object(message), index=index, source=source)
    role = message.get("role")
    if not role:  # no role (or an empty one): litellm sends such a message as the assistant's
        typo = next((k for k in message if isinstance(k, str) and k != "role"
                     and get_close_matches(k.lower(), ["role"], cutoff=0.75)), None)
        if typo is not None:  # sent as the assistant's, a user turn typed {"rol": "user"} would speak for the model
            raise MessageError(f"no 'role' but {typo!r}; did you mean 'role'?", index=index, source=source)
        message, role = {**message, "role": "assistant"}, "assistant"
    if role not in ROLES:
        raise MessageError(f"unknown role {role!r} (expected one of {sorted(ROLES)})", index=index, source=source)
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise MessageError(f"content must be a string, a list of parts or null, got {type(content).__name__}",
                           index=index, source=source)
    if "content" not in message and role in _NEEDS_CONTENT:
        other = sorted(str(k) for k in message if k != "role")
        raise MessageError(f"a {role} message needs 'content'" + (f" (it has {', '.join(map(repr, other))})"
                                                                 if other else ""), index=index, source=source)
    if role == "tool" and not message.get("tool_call_id"):
        raise MessageError("tool message has no tool_call_id", index=index, source=source)
    if role == "tool" and not isinstance(message["tool_call_id"], str):  # a call's id is a string
        raise MessageError(f"tool_call_id must be a string (the id of the call it answers), got "
                           f"{type(message['tool_call_id']).__name__} {message['tool_call_id']!r:.40}",
                           index=index, source=source)
    if parts and isinstance(content, list):
        _check_parts(content, index, source, user=role == "user")
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


def _check_parts(parts: list[Any], index: int, source: str | None, *, user: bool) -> None:
    """A message's content parts are objects; a ``user`` message's are of types litellm sends, an
    image part with its URL: litellm refuses any other before sending, or breaks on it building the
    request (a string part, in a user message or in a system message sent to Anthropic; an
    ``image_url`` part without its URL), as an error that looks like the provider's and would count
    against the target."""
    for n, part in enumerate(parts):
        if not isinstance(part, Mapping):
            raise MessageError(f"content part {n} must be an object such as {{'type': 'text', 'text': ...}}, got "
                               f"{type(part).__name__}", index=index, source=source)
    if user:
        _check_user_parts(parts, index, source)


def _check_user_parts(parts: list[Mapping[str, Any]], index: int, source: str | None) -> None:
    known = wire.user_part_types()
    for n, part in enumerate(parts):
        kind = part.get("type")
        if kind not in known:
            raise MessageError(f"content part {n} has type {kind!r}, which litellm does not take in a "
                               f"user message (it takes {', '.join(sorted(known))})", index=index, source=source)
        why = _payload_missing(kind, part)
        if why:
            raise MessageError(f"content part {n} ({kind}) {why}", index=index, source=source)


def _payload_missing(kind: str, part: Mapping[str, Any]) -> str | None:
    """Why an image part lacks its ``image_url`` (a URL or ``{"url": ...}``). (A text part without its
    text is sent: litellm mends it for Anthropic and Gemini, and other providers answer for it.)"""
    if kind == "image_url":
        image = part.get("image_url")
        if not (isinstance(image, str) and image or isinstance(image, Mapping) and image.get("url")):
            return "needs 'image_url', a URL or {'url': ...}"
    return None


def _calls_ok(calls: list[Any]) -> bool:
    return all(isinstance(c, Mapping) and c.get("id") and isinstance(c.get("function"), Mapping)
               and c["function"].get("name") and not isinstance(c["function"].get("arguments"), Mapping)
               for c in calls)


_NEEDS_CONTENT = frozenset({"user", "system", "developer", "tool"})  # the assistant's may be tool calls alone
# per check of content parts (litellm sends, or not): a message dict -> its valid form; a resent
# history -> its valid messages and the tool-call state at its end
_MEMOS = {parts: (MessageMemo(), HistoryMemo(alike=True)) for parts in (True, False)}

PLACEHOLDER_RESULT = "[no result recorded]"  # the content of a tool result that repair adds


@dataclass(frozen=True, slots=True)
class ToolCallProblem:
    """A break in tool-call integrity. ``index``: the message at fault (the tool result, or the
    assistant turn whose call went unanswered); ``closed_by``: the message that came before the
    answer (unanswered calls only)."""

    kind: Literal["orphan", "repeat", "unanswered"]
    index: int
    call_id: str
    detail: str
    closed_by: int | None = None


class ToolTurns:
    """Tool-call integrity over one linear pass, fed each message in order (no I/O, no rescans).

    The rule: a tool result answers a call of the assistant turn it follows, once; every call of an
    assistant turn is answered, in any order, before the next user or assistant turn. A system or
    developer message in between neither answers nor closes a turn (litellm lifts them out for
    Anthropic and Gemini, which accept it; refusing it would make such a call worse than sending it
    directly). Calls still open at the end of the request are left to the provider: nothing after
    them shows they were skipped.
    """

    __slots__ = ("answered", "called", "pending")

    def __init__(self) -> None:
        self.pending: dict[str, tuple[int, str]] = {}  # open calls: id -> (assistant index, tool name)
        self.called: dict[str, int] = {}  # every call made so far: id -> assistant index
        self.answered: dict[str, int] = {}  # every call answered so far: id -> result index

    def result(self, index: int, call_id: str) -> ToolCallProblem | None:
        """Take the tool result at ``index``; the problem when it answers no open call."""
        if self.pending.pop(call_id, None) is not None:
            self.answered[call_id] = index
            return None
        if call_id in self.answered:
            return ToolCallProblem("repeat", index, call_id, f"tool result for {call_id} answers it again "
                                   f"(first answered at message {self.answered[call_id]})")
        if call_id in self.called:
            return ToolCallProblem("orphan", index, call_id, f"tool result for {call_id} does not follow its "
                                   f"assistant turn (message {self.called[call_id]})")
        return ToolCallProblem("orphan", index, call_id, f"tool result for {call_id} has no earlier assistant "
                               "tool call")

    def turn(self, index: int, message: Message) -> list[ToolCallProblem]:
        """Take a message that is not a tool result: the open calls it leaves unanswered, then open its
        own calls."""
        problems: list[ToolCallProblem] = []
        if message.get("role") in SIDE_ROLES and not message.get("tool_calls"):
            return problems
        if self.pending:
            what = f"{message.get('role')} {'turn' if message.get('role') in ('user', 'assistant') else 'message'}"
            problems = [ToolCallProblem("unanswered", at, call_id, f"tool call {call_id} ({name}) is not answered "
                                        f"before the {what} at message {index}", closed_by=index)
                        for call_id, (at, name) in self.pending.items()]
            self.pending = {}
        for call in message.get("tool_calls") or ():
            call_id = str(call.get("id"))
            self.pending[call_id] = (index, str((call.get("function") or {}).get("name")))
            self.called[call_id] = index
        return problems


@dataclass(frozen=True, slots=True)
class Repairs:
    """What :func:`repair_messages` changed: the tool results it dropped and the unanswered calls it
    gave a :data:`PLACEHOLDER_RESULT` result (indices are the input's)."""

    dropped: tuple[ToolCallProblem, ...] = ()
    answered: tuple[ToolCallProblem, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.dropped or self.answered)

    def describe(self) -> str:
        """One line for a decision's reason, naming each call id and message index."""
        parts = []
        if self.dropped:
            parts.append(f"dropped {len(self.dropped)} tool result(s) answering no open call ("
                         + ", ".join(f"{p.call_id} at message {p.index}" for p in self.dropped) + ")")
        if self.answered:
            parts.append(f"added a {PLACEHOLDER_RESULT!r} result for {len(self.answered)} unanswered tool call(s) ("
                         + ", ".join(f"{p.call_id} of message {p.index}, before message {p.closed_by}"
                                     for p in self.answered) + ")")
        return "; ".join(parts)


def validate_messages(messages: Iterable[Any], *, source: str | None = None, tool_calls: bool = True,
                      parts: bool = True) -> list[dict[str, Any]]:
    """Validate every message (a resent, unchanged message dict is not checked again) and, with
    ``tool_calls``, tool-call integrity (see :class:`ToolTurns`) in the same pass: a break raises
    ``MessageError`` naming the message and the call. ``parts``: see :func:`validate_message`."""
    out, broken = _validate(messages, source, tool_calls, parts)
    if broken:
        problem = _first_problem(out)
        raise MessageError(problem.detail, index=problem.index, source=source)
    return out


def nonempty(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``messages`` when there is at least one; else raises :class:`MessageError` (a provider would
    answer a 400)."""
    if not messages:
        raise MessageError("messages is empty: a call needs at least one message")
    return messages


def repair_messages(messages: Iterable[Any], *, source: str | None = None,
                    parts: bool = True) -> tuple[list[dict[str, Any]], Repairs]:
    """:func:`validate_messages` that mends tool-call integrity instead of raising: a tool result
    answering no open call is dropped, and an unanswered call gets a :data:`PLACEHOLDER_RESULT` tool
    result after its turn's results (providers accept it, and the model still sees the call it made)."""
    out, broken = _validate(messages, source, True, parts)
    return _mend(out) if broken else (out, Repairs())


_OTHER, _RESULT, _CALLS, _SIDE = 0, 1, 2, 3  # what a message is to tool-call integrity
SIDE_ROLES = frozenset({"system", "developer"})  # neither answer nor close a tool turn


def _entry(valid: dict[str, Any]) -> tuple[dict[str, Any], int, Any]:
    """A valid message with what integrity needs of it: its result's call id, or its calls' ids."""
    if valid["role"] == "tool":
        return valid, _RESULT, str(valid["tool_call_id"])
    calls = valid.get("tool_calls")
    if valid["role"] in SIDE_ROLES and not calls:
        return valid, _SIDE, None
    return (valid, _CALLS, frozenset(str(c["id"]) for c in calls)) if calls else (valid, _OTHER, None)


def _validate(messages: Iterable[Any], source: str | None, check: bool,
              parts: bool = True) -> tuple[list[dict[str, Any]], bool]:
    """The valid messages, and whether their tool-call integrity is broken. The hot path: only the open
    calls are tracked, with each message's ids kept in the memo; :class:`ToolTurns` says what broke,
    on broken requests only."""
    if isinstance(messages, Mapping):
        raise MessageError("messages must be a list of message objects, got one message (a dict): "
                           "wrap it in a list", source=source)
    if isinstance(messages, str | bytes) or not isinstance(messages, Iterable):
        raise MessageError("messages must be a list of message objects", source=source)
    history = messages if isinstance(messages, list | tuple) else None
    valids, histories = _MEMOS[parts]
    resent, earlier, copies = histories.find(history) if history is not None else (0, None, False)
    out: list[dict[str, Any]] = []
    calls: frozenset[str] = frozenset()  # the ids of the last turn's calls,
    left = 0  # how many of them are still open,
    seen: set[str] | None = None  # and which are answered (a turn of several calls only)
    broken = False
    if earlier is not None:  # the same dicts as a history validated before: go on from where it ended
        out, calls, left, answered, broken = list(earlier[0]), earlier[1], earlier[2], earlier[3], earlier[4]
        seen = set(answered) if answered is not None else None
    for i, message in enumerate(history[resent:] if history is not None and resent else messages, resent):
        entry = valids.get(message) if isinstance(message, dict) else None
        if entry is None:
            entry = _entry(validate_message(message, index=i, source=source, parts=parts))
            if isinstance(message, dict):
                valids.put(message, entry)
        valid, kind, ids = entry
        out.append(valid)
        if kind == _RESULT:
            if left and ids in calls and (seen is None or ids not in seen):
                left -= 1
                if seen is not None:
                    seen.add(ids)
            else:
                broken = True
        elif kind == _SIDE:
            continue
        elif left:
            broken = True
        elif kind:
            calls, left = ids, len(ids)
            seen = set() if left > 1 else None
    if history is not None and resent < len(out):  # copies of a history: found by value from now on, not kept
        valid = tuple(out)
        histories.remember(None if copies else history,
                            (valid, calls, left, frozenset(seen) if seen is not None else None, broken), alike=valid)
    return out, broken and check


def _problems(messages: Sequence[Message]) -> Iterator[ToolCallProblem]:
    """Every tool-call integrity problem of ``messages``, in order (see :class:`ToolTurns`)."""
    turns = ToolTurns()
    for i, message in enumerate(messages):
        if message.get("role") == "tool":
            found = turns.result(i, str(message.get("tool_call_id")))
            if found is not None:
                yield found
        else:
            yield from turns.turn(i, message)


def _first_problem(messages: Sequence[Message]) -> ToolCallProblem:
    problem = next(_problems(messages), None)
    if problem is None:
        raise AssertionError("no tool-call problem found in a request flagged as broken")
    return problem


def _mend(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], Repairs]:
    turns = ToolTurns()
    out: list[dict[str, Any]] = []
    dropped: list[ToolCallProblem] = []
    answered: list[ToolCallProblem] = []
    for i, message in enumerate(messages):
        if message.get("role") == "tool":
            problem = turns.result(i, str(message.get("tool_call_id")))
            if problem is not None:
                dropped.append(problem)
                continue
        else:
            unanswered = turns.turn(i, message)
            answered.extend(unanswered)
            out.extend({"role": "tool", "tool_call_id": p.call_id, "content": PLACEHOLDER_RESULT} for p in unanswered)
        out.append(message)
    return out, Repairs(tuple(dropped), tuple(answered))


def integrity_violations(messages: Sequence[Message]) -> list[str]:
    """Problems a provider rejects with a 400, one line each: orphaned or repeated tool results and
    calls unanswered before the next user or assistant turn (see :class:`ToolTurns`)."""
    return [f"message {p.index}: {p.detail}" for p in _problems(messages)]


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
