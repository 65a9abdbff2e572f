"""Values derived from message dicts, reused while the caller resends them unchanged.

Agent loops append to one history and resend the same message dicts on every call; validating and
keying each of them again is most of the pipeline's per-call cost on long histories. A
:class:`MessageMemo` entry is reused only for the very same dict object still holding the very
same ``content`` and ``tool_calls`` objects, so a message whose content is replaced is seen afresh.
(A dict edited in place in some other field, its role say, would keep its old entry: messages are
treated as values.) Entries hold their dicts, so the memo is small (``limit`` messages, then it
starts over): a few long agent histories, not a server's worth of sessions. A :class:`HistoryMemo`
finds a whole resent history, and with ``alike`` also new dicts equal to it (an adapter's requests).
"""

from __future__ import annotations

import operator
import threading
from collections.abc import Callable, Hashable, Sequence
from itertools import repeat
from typing import Any


def _dict_parts(message: Any) -> tuple[Any, Any]:
    return message.get("content"), message.get("tool_calls")


class MessageMemo:
    """``parts``: a message's ``content`` and ``tool_calls`` (a dict's by default; a LangChain
    message's attributes for the agent middleware's conversions)."""

    def __init__(self, limit: int = 4096, parts: Callable[[Any], tuple[Any, Any]] = _dict_parts) -> None:
        self._data: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._limit = limit
        self._parts = parts
        self._lock = threading.Lock()

    def get(self, message: Any) -> Any | None:
        entry = self._data.get(id(message))
        if entry is not None and entry[0] is message:
            content, calls = self._parts(message)
            if entry[1] is content and entry[2] is calls:
                return entry[3]
        return None

    def put(self, message: Any, value: Any) -> None:
        """Keep ``value`` for ``message`` (holding the message, so its id cannot be reused meanwhile)."""
        content, calls = self._parts(message)
        with self._lock:
            if len(self._data) >= self._limit:
                self._data.clear()
            self._data[id(message)] = (message, content, calls, value)


def _field(messages: Sequence[Any], name: str) -> tuple[Any, ...]:
    return tuple(map(dict.get, messages, repeat(name)))  # in C: about 70 ns a message


class _Seen:
    __slots__ = ("calls", "contents", "messages", "value")

    def __init__(self, messages: tuple[Any, ...], value: Any) -> None:
        self.messages, self.value = messages, value
        self.contents, self.calls = _field(messages, "content"), _field(messages, "tool_calls")


class HistoryMemo:
    """What was derived from a whole history, reused when the next history resends it and appends.

    Agent loops resend the same message dicts plus the newest ones on every call. An entry is found
    by the history's first message and reused when the new history starts with the remembered
    messages, equal and still holding equal ``content`` and ``tool_calls`` (the same objects
    compare in C at once, so a resent history costs about 0.15 us a message, against about 0.8 us
    looking each message up in a :class:`MessageMemo`; a message whose content was replaced in
    place is seen afresh). ``ways`` histories are kept per first message (a call's input and the
    trimmed history planned from it), the least recently remembered replaced.

    With ``alike``, a history of new dicts equal to remembered ones (an adapter parses or converts
    every request afresh: the LiteLLM proxy, the LangChain middleware) is found too, by the role and
    text of its first two messages, and compared value by value: see :meth:`find`.
    """

    def __init__(self, ways: int = 2, limit: int = 1024, *, alike: bool = False) -> None:
        self._entries: dict[int, list[_Seen]] = {}
        self._alike: dict[Hashable, list[_Seen]] | None = {} if alike else None
        self._ways = ways
        self._limit = limit
        self._lock = threading.Lock()

    def extended(self, messages: Sequence[Any]) -> tuple[int, Any]:
        """``(n, value)``: the value remembered for ``messages[:n]`` (a remembered history that
        ``messages`` extends), or ``(0, None)``."""
        n, value, _ = self.find(messages)
        return n, value

    def find(self, messages: Sequence[Any]) -> tuple[int, Any, bool]:
        """:meth:`extended`, and whether ``messages[:n]`` are copies of what was remembered (then
        remember what was derived from them with ``alike``, not the copies)."""
        if not messages:
            return 0, None, False
        n, value = _match(self._entries.get(id(messages[0]), ()), messages, copies=False)
        if n or self._alike is None:
            return n, value, False
        try:
            ways = self._alike.get(_opening(messages), ())
        except (AttributeError, TypeError):  # not dicts, or a text that cannot be a key
            return 0, None, False
        n, value = _match(ways, messages, copies=True)
        return n, value, bool(n)

    def remember(self, messages: Sequence[Any] | None, value: Any, *, alike: Sequence[Any] = ()) -> None:
        """Keep ``value`` for ``messages`` (the same dicts resent), replacing the remembered histories
        it extends; and, with the ``alike`` table, for ``alike`` (dicts whose later copies are found
        by value: what was derived from ``messages``)."""
        seen = None
        if messages and all(type(m) is dict for m in messages):
            seen = _Seen(tuple(messages), value)
            self._keep(self._entries, id(seen.messages[0]), seen)
        if self._alike is None or not alike:
            return
        held = tuple(alike)
        if seen is None or len(held) != len(seen.messages) or not all(map(operator.is_, held, seen.messages)):
            if not all(type(m) is dict for m in held):
                return
            seen = _Seen(held, value)  # else the same dicts (valid as sent): one entry in both tables
        try:
            key = _opening(held)
            hash(key)
        except TypeError:
            return
        self._keep(self._alike, key, seen)

    def _keep(self, table: dict[Any, list[_Seen]], key: Hashable, seen: _Seen) -> None:
        held = seen.messages
        with self._lock:
            ways = table.get(key)
            if ways is None:
                if len(table) >= self._limit:
                    table.clear()
                table[key] = [seen]
                return
            kept = [w for w in ways if len(w.messages) > len(held) or w.messages[-1] is not held[len(w.messages) - 1]]
            ways[:] = [seen, *kept][: self._ways]


def _match(ways: Sequence[_Seen], messages: Sequence[Any], *, copies: bool) -> tuple[int, Any]:
    """The first of ``ways`` that ``messages`` extend: the same dicts, or with ``copies`` equal ones."""
    for seen in ways:
        n = len(seen.messages)
        if n > len(messages):
            continue
        last = seen.messages[-1]
        if last is not messages[n - 1] and (not copies or last != messages[n - 1]):
            continue
        head = tuple(messages[:n])
        try:
            if seen.messages == head and seen.contents == _field(head, "content") \
                    and seen.calls == _field(head, "tool_calls"):
                return n, seen.value
        except TypeError:  # not a dict: never remembered
            continue
    return 0, None


def conversation_of(messages: Sequence[Any]) -> tuple[Any, ...]:
    """What tells a conversation from another without a session id, on every request of it: the role
    and text of its system messages and the first message after them (a task's opening)."""
    found = []
    for message in messages:
        found.append((message.get("role"), _text(message.get("content"))))
        if message.get("role") not in ("system", "developer"):
            break
    return tuple(found)


def _opening(messages: Sequence[Any]) -> tuple[Any, ...]:
    """What finds copies of a history: the role and text of its first two messages."""
    return tuple((m.get("role"), _text(m.get("content"))) for m in messages[:2])


def _text(content: Any) -> Any:
    if isinstance(content, list):
        return tuple(part.get("text") if isinstance(part, dict) else None for part in content)
    return content if isinstance(content, str) else None
