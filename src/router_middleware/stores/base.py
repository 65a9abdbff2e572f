"""The store contract shared by every policy that keeps state: one small interface, three backends.

Values are bytes; counters are floats. ``ttl_s`` is in seconds (``None``: no expiry).
"""

from __future__ import annotations

import math
import re
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol, runtime_checkable

from ..errors import LockTimeout, PartialWrite, StoreError, UnreadableCounter
from ..telemetry import log
from ..urls import without_password

__all__ = ["Addition", "Average", "Bounded", "Check", "Countdown", "Fetched", "Hold", "LockTimeout", "Owned", "Put",
           "Refusal", "Release", "Sample", "Store", "StoreError", "UnreadableCounter", "Within", "acquire", "blend",
           "counted", "defer", "fetch_each", "number", "numbers", "poll", "refusing", "token_lock", "within_checks",
           "within_keys"]

Addition = tuple[str, float, float | None]  # (key, amount, ttl_s)
Within = tuple[str, float, float, float | None]  # (key, amount, limit, ttl_s)
# A claim only its owner ends (Store.delete_if): key is set to the owner's token if it is absent.
Owned = tuple[str, bytes, float | None]  # (key, owner token, ttl_s)
# What another party counts (a provider's requests or tokens left until its reset): where key is, it
# is counted down by amount, unless that takes it below 0; where it is not (it lapsed), it stays so.
Countdown = tuple[str, float]  # (key, amount)
Refusal = tuple[int, float]  # (index of the entry that would pass its limit, that key's total)
Sample = tuple[str, float, int, float | None]  # (key, value, how many recent values to keep, ttl_s)
# A sample blended into key's exponentially weighted average: weight * sample + (1 - weight) * stored.
Average = tuple[str, float, float, float | None]  # (key, sample, weight of the sample, ttl_s)
Put = tuple[str, bytes, float | None]  # (key, value, ttl_s): set key, as Store.set
# An amount added to key's total like a Within entry, but only held: until it is released (Release)
# or hold_s passes, after which the next add_within on key takes it back out.
Hold = tuple[str, float, float, float | None, str, float]  # (key, amount, limit, ttl_s, hold id, hold_s)
# End a hold: key's total gets actual - held while the hold is still counted, else actual (it expired
# and was taken back out).
Release = tuple[str, str, float, float, float | None]  # (key, hold id, amount held, actual, ttl_s)
Bounded = tuple[str, bytes, float | None, str, int]  # put_bounded's (key, value, ttl_s, ring, capacity)
Fetched = tuple[list["bytes | None"], list[list[float]]]  # fetch's answer: values, then recent values
TOLERANCE = 1e-9  # totals are float sums: a total this close to its limit is within it


def store_name(store: object) -> str:
    """How errors name a store: its URL (without a password) or file, else its kind."""
    url, path = getattr(store, "url", None), getattr(store, "path", None)
    if isinstance(url, str):
        return without_password(url)
    return str(path) if isinstance(path, str) else f"({type(store).__name__})"


def ring_seq(add: Callable[[], float], drop: Callable[[], object]) -> int:
    """``put_bounded``'s next place in its ring: ``add()`` of its counter, counted again from 1 after
    ``drop()`` when the counter holds what is no number (another program's value: every write of the
    cache failed on it)."""
    try:
        return int(add())
    except (ValueError, OverflowError):
        drop()
        return int(add())


# A decimal as Python's repr and Redis's INCRBYFLOAT write one, as Redis's admission script reads one:
# at most 400 characters (a double's digits, written out) and a three-digit exponent (INCRBYFLOAT
# refuses 5 KB of digits, and 1e-5000, which a double reads as 0).
_DECIMAL = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
_DECIMAL_CHARS = 400


def number(raw: bytes | str | float) -> float:
    """A stored number (a counter, a time, an average): a finite decimal, as the package writes them
    (Redis's INCRBYFLOAT never makes ``inf`` or ``nan``); anything else is a ``ValueError``, also what
    ``float()`` alone takes but Redis's INCRBYFLOAT refuses or reads otherwise (``" 5"``, ``"1_000"``),
    so that every store reads a value alike."""
    if isinstance(raw, (bytes, str)) and (len(raw) > _DECIMAL_CHARS or not _DECIMAL.fullmatch(
            raw.encode() if isinstance(raw, str) else raw)):
        raise ValueError(f"{raw!r} is not a decimal number")
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(f"{raw!r} is not a finite number")
    return value


def numbers(values: Iterable[Any]) -> list[float]:
    """The values of a list of recent values (:meth:`Store.samples`) that are finite numbers: one
    another program pushed is left out, not a reason to fail the read of every key fetched with it."""
    found = []
    for value in values:
        try:
            found.append(number(value))
        except (TypeError, ValueError, OverflowError):  # a JSON null, list, object or huge integer (SQLite)
            continue
    return found


@runtime_checkable
class Store(Protocol):
    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...

    def delete(self, key: str) -> None: ...

    def delete_if(self, key: str, value: bytes | None) -> bool:
        """Delete ``key`` only if it holds ``value``, atomically (an owner ends its own claim, never a
        later one's); whether it did. ``None``: only if it holds a value of another type than this
        package keeps there (on Redis, another program's list or hash; elsewhere never)."""
        ...

    def incr(self, key: str, amount: float = 1.0, ttl_s: float | None = None) -> float:
        """Add ``amount`` atomically (a missing key counts as 0) and return the new value. ``ttl_s`` is
        set when the key is created."""
        ...

    def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl_s: float | None = None) -> bool:
        """Set ``value`` only if the current value equals ``expected`` (``None``: the key is absent)."""
        ...

    def add_within(self, entries: Sequence[Within], holds: Sequence[Hold] = (),
                   owned: Sequence[Owned] = (), left: Sequence[Countdown] = ()) -> Refusal | None:
        """Add every ``(key, amount, limit, ttl_s)``, hold every :data:`Hold`, claim every
        :data:`Owned` key and count down every :data:`Countdown` at once, atomically, if each key's new
        total stays within its limit, each owned key is absent and no countdown goes below 0; otherwise
        add nothing. ``None`` when added, else the first refusal (its index counts ``entries``, then
        ``owned``, then ``holds``, then ``left``; an owned key taken totals 1).
        Expired holds on the held keys are taken back out first. A key whose total no writer of this
        package leaves (:func:`counted`) raises :class:`UnreadableCounter` naming it, and nothing is
        added."""
        ...

    def add_many(self, entries: Sequence[Addition], samples: Sequence[Sample] = (),
                 releases: Sequence[Release] = (), bounded: Sequence[Bounded] = (),
                 averages: Sequence[Average] = (), puts: Sequence[Put] = (), closed: Collection[str] = ()) -> None:
        """Add each ``(key, amount, ttl_s)`` (each atomic), append each ``(key, value, keep, ttl_s)``
        to its list of recent values (the last ``keep`` kept), end each :data:`Release`'s hold (each
        atomic), make each :meth:`put_bounded` of ``bounded``, blend each :data:`Average` into its
        key (each atomic, :func:`blend`) and set each :data:`Put`: one round trip where the backend
        allows. An addition (or release) onto a counter that holds no total of ours (:func:`counted`)
        replaces it, counting from 0 (:func:`replaced`), except on the keys in ``closed`` (a ``closed``
        budget's counters: the spend it stood for is unknown), which are left as they are and not
        added to (:func:`kept`)."""
        ...

    def samples(self, key: str) -> list[float]:
        """The recent values appended under ``key`` by :meth:`add_many`, oldest first."""
        ...

    def fetch(self, keys: Sequence[str], lists: Sequence[str] = ()) -> Fetched:
        """:meth:`get` of every key of ``keys`` and :meth:`samples` of every key of ``lists``, in one
        round trip where the backend allows."""
        ...

    def put_bounded(self, key: str, value: bytes, ttl_s: float | None, ring: str, capacity: int) -> None:
        """Set ``key`` and give it the next of ``capacity`` slots under ``ring``, deleting the key that
        held that slot (the oldest entry goes): one atomic step, one round trip."""
        ...

    def append(self, key: str, value: bytes, keep: int, ttl_s: float | None = None) -> None:
        """Append ``value`` to the list under ``key``, keep its last ``keep`` values and make the list
        expire ``ttl_s`` after this append (``None``: never): one atomic step, one round trip, so
        concurrent appends all land and none is retried."""
        ...

    def appended(self, key: str) -> list[bytes]:
        """The values :meth:`append` keeps under ``key``, oldest first."""
        ...

    def lock(self, name: str, ttl_s: float = 10.0, timeout_s: float = 5.0) -> AbstractContextManager[None]:
        """A mutual-exclusion lock across processes, released on exit or after ``ttl_s``."""
        ...

    def close(self) -> None: ...


Check = tuple[str, float, float, str]  # (key, amount, limit, kind: "add", "owned" or "left")


def within_checks(entries: Sequence[Within], holds: Sequence[Hold], owned: Sequence[Owned],
                  left: Sequence[Countdown] = ()) -> list[Check]:
    """What :meth:`Store.add_within` checks, in its refusal order (see :func:`refusing`)."""
    return [*((k, a, lim, "add") for k, a, lim, _ in entries), *((k, 1.0, 1.0, "owned") for k, _, _ in owned),
            *((k, a, lim, "add") for k, a, lim, *_ in holds), *((k, a, 0.0, "left") for k, a in left)]


def counted(raw: bytes | str | float, limit: float | None = None) -> float | None:
    """A counter's total, or ``None`` where no writer of this package leaves ``raw``: no finite
    number, or (``limit``: a counter checked against one) a total below minus its limit (or -1). Our
    own totals go below 0 only by what a write gives back after the store lost the key, far less."""
    try:
        total = number(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    return None if limit is not None and total < -max(limit, 1.0) else total


def replaced(key: str, found: bytes | str | float | None) -> None:
    """Say that an addition replaced ``key``'s value, ``found`` (``None``: not read), which no writer
    of ours leaves: the key counts from 0 again (as an admission's :func:`~..bookkeeping.health.replace`)."""
    shown = "another program's value" if found is None else repr(found)[:60]
    log.warning("store_value_replaced", key=key, found=shown,
                why="it held no count of ours; an addition replaced it, counting from 0")


def kept(key: str, found: bytes | str | float | None) -> None:
    """Say that an addition left ``key``'s value, ``found`` (``None``: not read), as it was: a counter
    no writer of ours leaves that is not to be replaced (a ``closed`` budget's)."""
    shown = "another program's value" if found is None else repr(found)[:60]
    log.warning("store_value_kept", key=key, found=shown,
                why="it holds no count of ours, and a closed budget's counter is not replaced: not added to; "
                    "delete it to count from 0")


def unreadable(current: bytes | str | float | None) -> bool:
    """Whether a counter holds ``current``, a value no writer of ours leaves (absent: ``None``, readable)."""
    return current is not None and counted(current) is None


def partial_write(error: Exception, *, cache_written: bool, settled: bool) -> PartialWrite:
    """``add_many``'s error where part of its batch landed: which part failed, with ``error``."""
    part = "the settlement" if cache_written else "the response cache's entry"
    return PartialWrite(f"{part} failed ({type(error).__name__}: {str(error)[:160]}); the rest was written",
                        cache_written=cache_written, settled=settled)


def added(key: str, current: bytes | str | float, amount: float, fresh: float | None = None) -> tuple[float, bool]:
    """What an addition of ``amount`` to ``key``, holding ``current``, leaves, and whether it replaced
    the value: the sum, or where the key holds no total of ours (:func:`counted`; said with
    :func:`replaced`) a count from 0, of ``fresh`` where given (a release's actual spend: its hold went
    with the value it replaces): failing there would fail every write after it. A replaced value
    keeps its expiry, or takes the addition's where it had none."""
    total = counted(current)
    if total is None:
        replaced(key, current)
        return (amount if fresh is None else fresh), True
    return total + amount, False


def within_keys(entries: Sequence[Within], holds: Sequence[Hold], owned: Sequence[Owned],
                left: Sequence[Countdown] = ()) -> list[str]:
    """The keys :meth:`Store.add_within` checks, in its refusal order."""
    return [*(e[0] for e in entries), *(o[0] for o in owned), *(h[0] for h in holds), *(k for k, _ in left)]


def refusing(check: Check, current: bytes | str | float | None) -> float | None:
    """The total that refuses ``check`` where its key holds ``current`` (``None``: absent), else
    ``None``: an owned key taken totals 1; a countdown refuses only where its key is. Raises
    :class:`UnreadableCounter` where the key holds no total of ours (:func:`counted`)."""
    key, amount, limit, kind = check
    if kind == "owned":
        return 1.0 if current is not None else None
    if current is None:
        return None if kind == "left" or amount <= limit + TOLERANCE else 0.0
    total = counted(current, None if kind == "left" else limit)
    if total is None:
        raise UnreadableCounter(key, current.encode() if isinstance(current, str) else
                                current if isinstance(current, bytes) else repr(current).encode())
    if kind == "left":
        return None if total - amount >= -TOLERANCE else total
    return total if total + amount > limit + TOLERANCE else None


def blend(stored: bytes | None, sample: float, weight: float) -> float:
    """An :data:`Average`'s new value: ``sample`` where nothing, or no finite number, is stored."""
    try:
        return sample if stored is None else weight * sample + (1 - weight) * number(stored)
    except ValueError:
        return sample


def fetch_each(store: Store, keys: Sequence[str], lists: Sequence[str] = ()) -> Fetched:
    """:meth:`Store.fetch` one key at a time (a store in the process, or on a local file)."""
    return [store.get(k) for k in keys], [store.samples(k) for k in lists]


# While a call's lifecycle step runs on an event loop (:mod:`..drivers`), writes whose answer the step
# does not need are queued here instead of blocking the loop; the driver then makes them in a thread.
# A step runs to its end without yielding to the loop, so a per-thread slot (not a ContextVar, whose
# every set allocates a new context) holds the queue of the one step running on each thread.
_DEFERRED = threading.local()


class deferring:  # noqa: N801 - used as a function: ``with deferring() as queued``
    """Within it, :func:`defer` queues its writes on the list it gives instead of making them (a
    class, not a generator: entered on every step of every async call on a store that blocks)."""

    __slots__ = ("outer", "queued")

    def __enter__(self) -> list[Callable[[], None]]:
        self.queued: list[Callable[[], None]] = []
        self.outer = getattr(_DEFERRED, "queue", None)
        _DEFERRED.queue = self.queued
        return self.queued

    def __exit__(self, *exc: object) -> None:
        _DEFERRED.queue = self.outer


def defer(write: Callable[[], None]) -> None:
    """Make ``write`` now, or queue it while a lifecycle step runs on an event loop."""
    queued: list[Callable[[], None]] | None = getattr(_DEFERRED, "queue", None)
    if queued is None:
        write()
    else:
        queued.append(write)


@contextmanager
def token_lock(store: Store, name: str, ttl_s: float, timeout_s: float) -> Iterator[None]:
    """A lock held as ``lock:<name>`` = a random token, set only if absent (``compare_and_set``) and
    removed on exit only if it still holds our token (``delete_if``)."""
    token = uuid.uuid4().hex.encode()
    key = f"lock:{name}"
    acquire(lambda: store.compare_and_set(key, None, token, ttl_s), name, timeout_s)
    try:
        yield
    finally:
        store.delete_if(key, token)


def acquire(try_once: Callable[[], bool], name: str, timeout_s: float) -> None:
    """Call ``try_once`` until it returns True, or raise :class:`LockTimeout` after ``timeout_s``."""
    for _ in poll(timeout_s):
        if try_once():
            return
    raise LockTimeout(f"lock {name!r} not acquired within {timeout_s}s")


def poll(timeout_s: float, interval_s: float = 0.01) -> Iterator[None]:
    """Yield until ``timeout_s`` has passed, sleeping ``interval_s`` between tries."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        yield
        if time.monotonic() >= deadline:
            return
        time.sleep(interval_s)
