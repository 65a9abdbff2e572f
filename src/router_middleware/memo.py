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
