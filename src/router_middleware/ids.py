"""Ids unique across processes, made without a system call per id.

``uuid.uuid4()`` reads ``os.urandom``, which lets go of the GIL: on an event loop serving a thousand
calls, with litellm's logging threads waiting for the GIL, getting it back can take a switch
interval (5 ms). An id here is a random per-process prefix (drawn once, again after a fork) and a
counter: 32 hex digits, like ``uuid4().hex``.
"""

from __future__ import annotations

import itertools
import os
import uuid

_prefix: tuple[int, str] | None = None  # (pid, 16 random hex digits)
_counter = itertools.count()


def unique_id() -> str:
    global _prefix
    pid = os.getpid()
    if _prefix is None or _prefix[0] != pid:
        _prefix = (pid, uuid.uuid4().hex[:16])
    return f"{_prefix[1]}{next(_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"
