"""Calls still under way as the interpreter exits end then, while imports still work.

Left to their finalizers, they end during the interpreter's teardown, where imports fail (litellm's
stream builder, LangChain's callbacks): the call had no ledger row and its budget hold stayed until
it lapsed. Whatever registers here ends at the exit (its ``end_at_exit()``, which says whether it
ended a call), and the ledger's rows are written after (its own exit hook may have run first).
"""

from __future__ import annotations

import atexit
import contextlib
import weakref
from typing import Protocol


class Ending(Protocol):
    def end_at_exit(self) -> bool: ...


_LIVE: weakref.WeakSet[Ending] = weakref.WeakSet()
_HOOKED: list[bool] = []


def end_at_exit(thing: Ending) -> None:
    """End ``thing`` at the interpreter's exit unless it is collected first."""
    _LIVE.add(thing)
    if not _HOOKED:
        _HOOKED.append(True)
        atexit.register(_end_all)


def _end_all() -> None:
    ended = False
    for thing in list(_LIVE):
        with contextlib.suppress(Exception):  # one that cannot end keeps no other from ending
            ended = thing.end_at_exit() or ended
    if ended:
        from .ledger.writer import _flush_at_exit

        _flush_at_exit()
