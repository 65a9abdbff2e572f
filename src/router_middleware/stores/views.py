"""Store-backed views that policies read like plain mappings (summaries, reasoning spend).

Reads go to the store; a store that fails reads as "missing" (with a warning), so a policy falls
back to its offline behaviour instead of failing the call. ``fresh_s`` keeps what was read (or found
missing) for that long in the process: for values that may lag a little (cooldowns, speed averages)
on a store over the network, it saves a round trip per read.

A call's lifecycle on a store that can block reads the views through a :class:`Prefetch` instead:
a value neither kept in the process nor fetched for the call reads as missing and is noted, the
lifecycle fetches every noted key in one round trip (``Store.fetch``) and plans again, so planning
itself never waits on the store. A call like an earlier one fetches first what that one looked up
(:meth:`Prefetch.ahead`), and is planned once if it looks up the same keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import fields
from typing import Any, Generic, TypeVar

from ..telemetry import log
from .base import Store

V = TypeVar("V")
T = TypeVar("T")
_KEEP = 10_000  # values kept in the process per view (then forgotten at once)


class Kept(Generic[T]):
    """Values read from the store, kept in the process for ``fresh_s``. For ``fresh_s`` more a value
    is still served (stale) while one call reads it again: :meth:`get` tells that one call to renew
    it, so a thousand calls that find it stale at once neither wait for it nor all read it."""

    def __init__(self, fresh_s: float) -> None:
        self.fresh_s = fresh_s
        self.entry: tuple[bool, Kept[T]] = (False, self)  # how a Prefetch notes a list kept here
        self._values: dict[str, tuple[float, T]] = {}  # key -> (when read, value)
        self._renewing: dict[str, float] = {}  # key -> until when one call is renewing it

    def get(self, key: str) -> tuple[bool, T | None, bool]:
        """``(found, value, renew)``: ``renew`` asks this caller to read the key again."""
        seen = self._values.get(key) if self.fresh_s else None
        if seen is None:
            return False, None, False
        now = time.monotonic()
        age = now - seen[0]
        if age < self.fresh_s:
            return True, seen[1], False
        if age >= 2 * self.fresh_s:
            return False, None, False
        renew = self._renewing.get(key, 0.0) <= now
        if renew:
            self._renewing[key] = now + self.fresh_s
        return True, seen[1], renew

    def has(self, key: str) -> bool:
        """Whether ``key`` is kept (fresh, or stale but still served), without asking to renew it."""
        seen = self._values.get(key) if self.fresh_s else None
        return seen is not None and time.monotonic() - seen[0] < 2 * self.fresh_s

    def amend(self, key: str, change: Callable[[T], T]) -> None:
        """Change the value kept for ``key`` (if one is) as this process changed the stored one,
        keeping when it was read: it is still read again on time, with every other process's changes."""
        seen = self._values.get(key) if self.fresh_s else None
        if seen is not None:
            self._values[key] = (seen[0], change(seen[1]))

    def keep(self, key: str, value: T) -> None:
        if self.fresh_s:
            if len(self._values) > _KEEP:
                self._values.clear()
                self._renewing.clear()
            self._values[key] = (time.monotonic(), value)
            self._renewing.pop(key, None)


class StoreView(Mapping[str, V], Generic[V]):
    def __init__(self, store: Store, prefix: str, decode: Callable[[bytes], V], *, fresh_s: float = 0.0) -> None:
        self.store = store
        self.prefix = prefix
        self._decode = decode
        self.kept: Kept[bytes | None] = Kept(fresh_s)
        self.entry: tuple[bool, StoreView[V]] = (True, self)  # how a Prefetch notes a value of this view
        self._unreadable: set[tuple[str, bytes]] = set()  # (key, value) said to be unreadable

    def __getitem__(self, key: str) -> V:
        return self.decode(key, self._read(key))

    def get(self, key: str, default: Any = None) -> Any:
        """As ``Mapping.get``, without raising a ``KeyError`` for a missing key (the common case: no
        cooldown, no quota used; read on every call)."""
        return self.decoded_or(key, self._read(key), default)

    def decoded_or(self, key: str, raw: bytes | None, default: Any) -> Any:
        """``raw`` as :meth:`decode` reads it, or ``default`` where it reads as missing."""
        if raw is None:
            return default
        try:
            return self.decode(key, raw)
        except KeyError:
            return default

    def decode(self, key: str, raw: bytes | None) -> V:
        """``raw``, the stored value of ``key``, as a value. Missing (``KeyError``) if it is ``None``,
        or if it cannot be read as one (written by something else, or corrupt: logged), as a failing
        store reads: a policy falls back to its offline behaviour instead of failing the call."""
        if raw is None:
            raise KeyError(key)
        try:
            return self._decode(raw)
        except Exception as exc:  # noqa: BLE001 - a value the view cannot read is missing
            said = (key, raw)
            if said not in self._unreadable:  # once per value: a kept one is decoded by every call
                if len(self._unreadable) > _KEEP:
                    self._unreadable.clear()
                self._unreadable.add(said)
                log.warning("store_value_unreadable", key=self.prefix + key, error_type=type(exc).__name__)
            raise KeyError(key) from None

    def _read(self, key: str) -> bytes | None:
        found, raw, renew = self.kept.get(key)
        if found and not renew:
            return raw
        try:
            raw = self.store.get(self.prefix + key)
        except Exception as exc:  # noqa: BLE001 - a failing store reads as missing
            log.warning("store_read_failed", key=self.prefix + key, error_type=type(exc).__name__)
            return raw if found else None
        self.kept.keep(key, raw)
        return raw

    def __iter__(self) -> Iterator[str]:  # a store is not enumerated
        return iter(())

    def __len__(self) -> int:
        return 0

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        try:
            self.store.set(self.prefix + key, value, ttl_s)
        except Exception as exc:  # noqa: BLE001 - losing a stored value must not fail the call
            log.warning("store_write_failed", key=self.prefix + key, error_type=type(exc).__name__)

    def add(self, key: str, amount: float, ttl_s: float | None = None) -> None:
        try:
            self.store.incr(self.prefix + key, amount, ttl_s)
        except Exception as exc:  # noqa: BLE001
            log.warning("store_write_failed", key=self.prefix + key, error_type=type(exc).__name__)


# Where a fetched value goes: a view (its value is kept there too), or a list of recent values kept
# by whoever asked for it (``None``: the call only).
Sink = StoreView[Any] | Kept[list[float]] | None


def view_fields(state: Any) -> tuple[str, ...]:
    """The names of the fields of ``state`` (a PolicyState) that hold a store view."""
    return tuple(f.name for f in fields(state) if isinstance(getattr(state, f.name), StoreView))


class Prefetch:
    """What one call read from the store (store keys, without the store's own prefix), what its
    planning wanted but found neither here nor kept in the process (``missed``: key -> whether it is
    a single value, and where it is kept), the stale values it was asked to renew (``renew``), and
    every key its planning looked up (``used``: what the next call like it reads ahead)."""

    def __init__(self) -> None:
        self.values: dict[str, bytes | None] = {}
        self.lists: dict[str, list[float]] = {}
        self.missed: dict[str, tuple[bool, Sink]] = {}
        self.renew: dict[str, tuple[bool, Sink]] = {}
        self.used: dict[str, tuple[bool, Sink]] = {}  # every key planning looked up, found or not

    def views(self, state: Any, names: tuple[str, ...] | None = None) -> dict[str, Any]:
        """Each store view of ``state`` (a PolicyState; ``names``: its :func:`view_fields`, if known),
        read through this prefetch: the fields to plan with, made for each plan, not kept, so they die
        young instead of living as long as the call."""
        found = vars(state)
        return {name: _Prefetched(found[name], self) for name in (view_fields(state) if names is None else names)}

    def want_list(self, key: str, kept: Kept[list[float]]) -> None:
        """Note a list of recent values that ``kept`` lacks (or asked to renew); one it keeps is the
        call's from here on, so a later read of the call (its admission's estimate) reads what its
        plan read, not the store, however stale the process's copy has grown since."""
        self.used[key] = kept.entry
        if key in self.lists:
            return
        found, value, renew = kept.get(key)
        if not found:
            self.missed[key] = (False, kept)
            return
        if value is not None:
            self.lists[key] = value
        if renew:
            self.renew[key] = (False, kept)

    def ahead(self, remembered: Mapping[str, tuple[bool, Sink]]) -> dict[str, tuple[bool, Sink]]:
        """Of the keys that planning a call like this one fetched before (``remembered``), those this
        call has not read and the process does not keep: fetched before its first plan, a call after
        idle is planned once, not planned, fetched for and planned again."""
        ahead: dict[str, tuple[bool, Sink]] = {}
        for key, read in remembered.items():
            if key in self.values or key in self.lists:
                continue
            kept, name = _kept_in(key, read[1])
            if kept is None or not kept.has(name):
                ahead[key] = read
        return ahead

    @staticmethod
    def wanted(noted: dict[str, tuple[bool, Sink]]) -> tuple[list[str], list[str]]:
        """``Store.fetch``'s arguments for the keys ``noted`` (``missed`` or ``renew``)."""
        return [k for k, (one, _) in noted.items() if one], [k for k, (one, _) in noted.items() if not one]

    def fill(self, noted: dict[str, tuple[bool, Sink]], found: tuple[list[bytes | None], list[list[float]]] | None,
             *, call: bool = True) -> None:
        """Take the store's answer for the keys ``noted`` (``None``: the store failed: a missed value
        reads as missing, a stale one stays as it is); ``call``: the call reads them too."""
        keys, lists = self.wanted(noted)
        if found is None:
            if call:
                self.values.update(dict.fromkeys(keys))
                self.lists.update((k, []) for k in lists)
            noted.clear()
            return
        values, series = found
        for key, value in [*zip(keys, values, strict=True), *zip(lists, series, strict=True)]:
            kept, name = _kept_in(key, noted[key][1])
            if kept is not None:
                kept.keep(name, value)
        if call:
            self.values.update(zip(keys, values, strict=True))
            self.lists.update(zip(lists, series, strict=True))
        noted.clear()


def _kept_in(key: str, sink: Sink) -> tuple[Kept[Any] | None, str]:
    """Where the process keeps store key ``key`` read for ``sink``, and under which name (a view keeps
    its values without its prefix); ``None``: only the call keeps it."""
    if isinstance(sink, StoreView):
        return sink.kept, key.removeprefix(sink.prefix)
    return sink, key


class _Prefetched(Mapping[str, V], Generic[V]):
    """A view read through one call's :class:`Prefetch`: it never reads the store."""

    def __init__(self, view: StoreView[V], prefetch: Prefetch) -> None:
        self.view = view
        self.prefetch = prefetch

    def __getitem__(self, key: str) -> V:
        found, raw = self._raw(key)
        if not found:
            raise KeyError(key)
        return self.view.decode(key, raw)

    def get(self, key: str, default: Any = None) -> Any:
        """As ``Mapping.get``, without raising a ``KeyError`` for a missing key."""
        return self.view.decoded_or(key, self._raw(key)[1], default)

    def _raw(self, key: str) -> tuple[bool, bytes | None]:
        """Whether the call or the process knows ``key``'s stored value, and that value (``None``:
        none stored)."""
        full = self.view.prefix + key
        self.prefetch.used[full] = self.view.entry
        values = self.prefetch.values
        if full in values:
            return True, values[full]
        found, raw, renew = self.view.kept.get(key)
        if not found:
            self.prefetch.missed[full] = (True, self.view)
            return False, None
        if renew:
            self.prefetch.renew[full] = (True, self.view)
        return True, raw

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0
