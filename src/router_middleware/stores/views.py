"""Store-backed views that policies read like plain mappings (summaries, reasoning spend).

Reads go to the store; a store that fails reads as "missing" (with a warning), so a policy falls
back to its offline behaviour instead of failing the call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from ..telemetry import log
from .base import Store

V = TypeVar("V")


class StoreView(Mapping[str, V], Generic[V]):
    def __init__(self, store: Store, prefix: str, decode: Callable[[bytes], V]) -> None:
        self.store = store
        self.prefix = prefix
        self._decode = decode

    def __getitem__(self, key: str) -> V:
        try:
            raw = self.store.get(self.prefix + key)
        except Exception as exc:  # noqa: BLE001 - a failing store reads as missing
            log.warning("store_read_failed", key=self.prefix + key, error_type=type(exc).__name__)
            raise KeyError(key) from None
        if raw is None:
            raise KeyError(key)
        return self._decode(raw)

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
