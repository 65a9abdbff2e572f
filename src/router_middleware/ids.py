"""Ids unique across processes, made without a system call per id.

``uuid.uuid4()`` reads ``os.urandom``, which lets go of the GIL: on an event loop serving a thousand
calls, with litellm's logging threads waiting for the GIL, getting it back can take a switch
interval (5 ms). An id here is a random per-process prefix (drawn at the first id, again in a forked
child) and a counter: 32 hex digits, like ``uuid4().hex``.
"""

from __future__ import annotations

import itertools
import os
import uuid

_prefix: str | None = None  # 16 random hex digits, this process's
_counter = itertools.count()


def unique_id() -> str:
    global _prefix
    if _prefix is None:
        _prefix = uuid.uuid4().hex[:16]
    return f"{_prefix}{next(_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def _forget_prefix() -> None:
    """In a forked child: its ids must not repeat the parent's, so it draws a prefix of its own."""
    global _prefix
    _prefix = None


os.register_at_fork(after_in_child=_forget_prefix)
