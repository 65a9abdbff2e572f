"""In-process store (the default): a dict with expiry and an LRU bound, safe across threads."""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Collection, Sequence
from contextlib import AbstractContextManager
from typing import TypeVar

from .base import (
    Addition,
    Average,
    Bounded,
    Countdown,
    Fetched,
    Hold,
    Owned,
    Put,
    Refusal,
    Release,
    Sample,
    Within,
    added,
    blend,
    counted,
    fetch_each,
    kept,
    refusing,
    ring_seq,
    token_lock,
    unreadable,
    within_checks,
)

T = TypeVar("T")
Lists = OrderedDict[str, tuple[deque[T], float | None]]  # key -> (its values, when it expires)


class MemoryStore:
    def __init__(self, max_keys: int = 100_000) -> None:
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()
        self._series: Lists[float] = OrderedDict()  # recent values (samples)
        self._lists: Lists[bytes] = OrderedDict()  # what append keeps
        self._holds: dict[str, dict[str, tuple[float, float]]] = {}  # key -> hold id -> (amount, expires)
        self._expiries: dict[str, list[tuple[float, str]]] = {}  # key -> heap of (expires, hold id)
        self._mutex = threading.RLock()
        self._max = max_keys

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= time.monotonic():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    def _put(self, key: str, value: bytes, ttl_s: float | None) -> None:
        self._data[key] = (value, time.monotonic() + ttl_s if ttl_s else None)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def get(self, key: str) -> bytes | None:
        with self._mutex:
            return self._live(key)

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        with self._mutex:
            self._put(key, value, ttl_s)

    def delete(self, key: str) -> None:
        with self._mutex:
            self._data.pop(key, None)

    def incr(self, key: str, amount: float = 1.0, ttl_s: float | None = None) -> float:
        with self._mutex:
            return self._add(key, amount, ttl_s)

    def _add(self, key: str, amount: float, ttl_s: float | None, fresh: float | None = None) -> float:
        current = self._live(key)
        if current is None:  # a release's counter gone while held: it starts again at the spend
            value = amount if fresh is None else fresh
            self._put(key, repr(value).encode(), ttl_s)
            return value
        value, fresh_count = added(key, current, amount, fresh)
        if fresh_count and self._data[key][1] is None:
            self._put(key, repr(value).encode(), ttl_s)
        else:
            self._data[key] = (repr(value).encode(), self._data[key][1])
        return value

    def add_within(self, entries: Sequence[Within], holds: Sequence[Hold] = (),
                   owned: Sequence[Owned] = (), left: Sequence[Countdown] = ()) -> Refusal | None:
        with self._mutex:
            now = time.monotonic()
            for key, *_ in holds:
                self._expire_holds(key, now)
            for index, check in enumerate(within_checks(entries, holds, owned, left)):
                total = refusing(check, self._live(check[0]))
                if total is not None:
                    return index, total
            for key, amount, _, ttl_s in entries:
                self._add(key, amount, ttl_s)
            for key, owner, ttl_s in owned:
                self._put(key, owner, ttl_s)
            for key, amount, _, ttl_s, hold, hold_s in holds:
                self._add(key, amount, ttl_s)
                self._holds.setdefault(key, {})[hold] = (amount, now + hold_s)
                heapq.heappush(self._expiries.setdefault(key, []), (now + hold_s, hold))
            for key, amount in left:
                if self._live(key) is not None:
                    self._add(key, -amount, None)
            return None

    def _expire_holds(self, key: str, now: float) -> None:
        """Give back the holds on ``key`` that expired, earliest first (a heap: with a thousand calls
        in flight, an admission looks at the expired holds only)."""
        heap = self._expiries.get(key)
        held = self._holds.get(key, {})
        while heap and heap[0][0] <= now:
            expires, hold = heapq.heappop(heap)
            found = held.get(hold)
            if found is None or found[1] != expires:  # released (or held again) since
                continue
            del held[hold]
            current = self._live(key)
            if current is not None and counted(current) is not None:  # else the admission names it
                self._add(key, -found[0], None)
        if not held:
            self._holds.pop(key, None)
            self._expiries.pop(key, None)
        elif heap is not None and len(heap) > 2 * len(held) + 64:  # mostly released holds: start afresh
            heap[:] = [(expires, hold) for hold, (_, expires) in held.items()]
            heapq.heapify(heap)

    def add_many(self, entries: Sequence[Addition], samples: Sequence[Sample] = (),
                 releases: Sequence[Release] = (), bounded: Sequence[Bounded] = (),
                 averages: Sequence[Average] = (), puts: Sequence[Put] = (), closed: Collection[str] = ()) -> None:
        with self._mutex:
            for put in bounded:
                self.put_bounded(*put)
            for key, amount, ttl_s in entries:
                if not self._kept(key, closed):
                    self._add(key, amount, ttl_s)
            for key, hold, held, actual, ttl_s in releases:
                delta = actual - held if self._holds.get(key, {}).pop(hold, None) is not None else actual
                if delta and not self._kept(key, closed):
                    self._add(key, delta, ttl_s, fresh=actual)
            for key, value, keep, ttl_s in samples:
                self._push(self._series, key, value, keep, ttl_s)
            for key, sample, weight, ttl_s in averages:
                self._put(key, repr(blend(self._live(key), sample, weight)).encode(), ttl_s)
            for key, raw, ttl_s in puts:
                self._put(key, raw, ttl_s)

    def _kept(self, key: str, closed: Collection[str]) -> bool:
        """Whether ``key`` is one of ``keep`` holding a value no writer of ours leaves (said: :func:`kept`)."""
        if key in closed and unreadable(found := self._live(key)):
            kept(key, found)
            return True
        return False

    def put_bounded(self, key: str, value: bytes, ttl_s: float | None, ring: str, capacity: int) -> None:
        with self._mutex:
            self._put(key, value, ttl_s)
            counter = f"{ring}:seq"
            seq = ring_seq(lambda: self._add(counter, 1.0, None), lambda: self._data.pop(counter, None))
            slot = f"{ring}:slot:{seq % capacity}"
            previous = self._live(slot)
            if previous and (evicted := previous.decode(errors="replace")) != key:  # (another program's bytes)
                self._data.pop(evicted, None)
            self._put(slot, key.encode(), ttl_s)

    def samples(self, key: str) -> list[float]:
        with self._mutex:
            return list(self._recent(self._series, key))

    def append(self, key: str, value: bytes, keep: int, ttl_s: float | None = None) -> None:
        with self._mutex:
            self._push(self._lists, key, value, keep, ttl_s)

    def appended(self, key: str) -> list[bytes]:
        with self._mutex:
            return list(self._recent(self._lists, key))

    def fetch(self, keys: Sequence[str], lists: Sequence[str] = ()) -> Fetched:
        return fetch_each(self, keys, lists)

    def _push(self, lists: Lists[T], key: str, value: T, keep: int, ttl_s: float | None) -> None:
        """Append ``value`` to ``key``'s list in ``lists``, keeping its last ``keep`` values (and at most
        ``max_keys`` lists: the least recently written goes)."""
        recent = deque(self._recent(lists, key), maxlen=keep)
        recent.append(value)
        lists[key] = (recent, time.monotonic() + ttl_s if ttl_s else None)
        lists.move_to_end(key)
        while len(lists) > self._max:
            lists.popitem(last=False)

    @staticmethod
    def _recent(lists: Lists[T], key: str) -> deque[T]:
        found = lists.get(key)
        if found is None or (found[1] is not None and found[1] <= time.monotonic()):
            return deque()
        return found[0]

    def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl_s: float | None = None) -> bool:
        with self._mutex:
            if self._live(key) != expected:
                return False
            self._put(key, value, ttl_s)
            return True

    def lock(self, name: str, ttl_s: float = 10.0, timeout_s: float = 5.0) -> AbstractContextManager[None]:
        return token_lock(self, name, ttl_s, timeout_s)

    def delete_if(self, key: str, value: bytes | None) -> bool:
        with self._mutex:
            if value is None or self._live(key) != value:
                return False
            del self._data[key]
            return True

    def close(self) -> None:
        pass
