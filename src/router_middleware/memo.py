"""Values derived from a message dict, reused while the caller resends the same dict unchanged.

Agent loops append to one history and resend the same message dicts on every call; validating and
keying each of them again is most of the pipeline's per-call cost on long histories. An entry is
reused only for the very same dict object still holding the very same ``content`` and
``tool_calls`` objects, so a message whose content is replaced is seen afresh. (A dict edited in
place in some other field, its role say, would keep its old entry: messages are treated as values.)
Entries hold their dicts, so the memo is small (``limit`` messages, then it starts over): a few
long agent histories, not a server's worth of sessions.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from itertools import repeat
from typing import Any


class MessageMemo:
    def __init__(self, limit: int = 4096) -> None:
        self._data: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def get(self, message: Any) -> Any | None:
        entry = self._data.get(id(message))
        if entry is not None and entry[0] is message and entry[1] is message.get("content") \
                and entry[2] is message.get("tool_calls"):
            return entry[3]
        return None

    def put(self, message: Any, value: Any) -> None:
        """Keep ``value`` for ``message`` (holding the dict, so its id cannot be reused meanwhile)."""
        with self._lock:
            if len(self._data) >= self._limit:
                self._data.clear()
            self._data[id(message)] = (message, message.get("content"), message.get("tool_calls"), value)


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
    """

    def __init__(self, ways: int = 2, limit: int = 1024) -> None:
        self._entries: dict[int, list[_Seen]] = {}
        self._ways = ways
        self._limit = limit
        self._lock = threading.Lock()

    def extended(self, messages: Sequence[Any]) -> tuple[int, Any]:
        """``(n, value)``: the value remembered for ``messages[:n]`` (a remembered history that
        ``messages`` extends), or ``(0, None)``."""
        if not messages:
            return 0, None
        for seen in self._entries.get(id(messages[0]), ()):
            n = len(seen.messages)
            if n > len(messages) or seen.messages[-1] is not messages[n - 1]:
                continue
            head = tuple(messages[:n])
            try:
                if seen.messages == head and seen.contents == _field(head, "content") \
                        and seen.calls == _field(head, "tool_calls"):
                    return n, seen.value
            except TypeError:  # not a dict: never remembered
                continue
        return 0, None

    def remember(self, messages: Sequence[Any], value: Any) -> None:
        """Keep ``value`` for ``messages``, replacing the remembered histories it extends."""
        if not messages or not all(type(m) is dict for m in messages):
            return
        held = tuple(messages)
        seen = _Seen(held, value)
        with self._lock:
            ways = self._entries.get(id(held[0]))
            if ways is None:
                if len(self._entries) >= self._limit:
                    self._entries.clear()
                self._entries[id(held[0])] = [seen]
                return
            kept = [w for w in ways if len(w.messages) > len(held) or w.messages[-1] is not held[len(w.messages) - 1]]
            ways[:] = [seen, *kept][: self._ways]
