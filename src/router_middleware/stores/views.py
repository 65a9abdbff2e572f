"""Store-backed views that policies read like plain mappings (summaries, reasoning spend).

Reads go to the store; a store that fails reads as "missing" (with a warning), so a policy falls
back to its offline behaviour instead of failing the call. ``fresh_s`` keeps what was read (or found
missing) for that long in the process: for values that may lag a little (cooldowns, speed averages)
on a store over the network, it saves a round trip per read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from ..telemetry import log
from .base import Store

V = TypeVar("V")


class StoreView(Mapping[str, V], Generic[V]):
    def __init__(self, store: Store, prefix: str, decode: Callable[[bytes], V], *, fresh_s: float = 0.0) -> None:
        self.store = store
        self.prefix = prefix
        self._decode = decode
        self._fresh_s = fresh_s
        self._recent: dict[str, tuple[float, bytes | None]] = {}

    def __getitem__(self, key: str) -> V:
        raw = self._read(key)
        if raw is None:
            raise KeyError(key)
        return self._decode(raw)

    def _read(self, key: str) -> bytes | None:
        if self._fresh_s:
            seen = self._recent.get(key)
            if seen is not None and seen[0] > time.monotonic():
                return seen[1]
        try:
            raw = self.store.get(self.prefix + key)
        except Exception as exc:  # noqa: BLE001 - a failing store reads as missing
            log.warning("store_read_failed", key=self.prefix + key, error_type=type(exc).__name__)
            return None
        if self._fresh_s:
            if len(self._recent) > 10_000:
                self._recent.clear()
            self._recent[key] = (time.monotonic() + self._fresh_s, raw)
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
