"""State stores: memory (default), SQLite (one machine, several processes), Redis (many workers)."""

from __future__ import annotations

from urllib.parse import urlparse

from ..errors import ConfigError
from ..urls import without_password
from .base import LockTimeout, Store, StoreError
from .memory import MemoryStore
from .sqlite import SQLiteStore
from .views import Prefetch, StoreView


def _normal(url: str | None) -> str:
    """``url`` with its scheme in lower case (a scheme's case does not matter, as the config checks it);
    ``memory://`` for none."""
    if not url:
        return "memory://"
    scheme, colon, rest = url.partition(":")
    return scheme.lower() + colon + rest


def in_process(url: str | None) -> bool:
    """Whether the store at ``url`` lives in one process's memory (``memory://``, the default)."""
    return _normal(url).startswith("memory:")


def sqlite_path(url: str | None) -> str | None:
    """The file of a ``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` store, else ``None``."""
    url = _normal(url)
    if urlparse(url).scheme != "sqlite":
        return None
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url[len("sqlite://"):]


def open_store(url: str | None, *, timeout_s: float = 0.5) -> Store:
    """``memory://`` (default), ``sqlite:///path/to/file.db`` (which waits at most ``timeout_s`` for
    another connection's write lock) or ``redis://host:port/db`` (whose operations time out after
    ``timeout_s``)."""
    url = _normal(url)
    if in_process(url):
        return MemoryStore()
    scheme = urlparse(url).scheme
    if (path := sqlite_path(url)) is not None:
        return SQLiteStore(path, busy_timeout_s=timeout_s)
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        try:
            return RedisStore(url, timeout_s=timeout_s)
        except ValueError as exc:  # redis-py's for a URL parameter it cannot read ("?socket_timeout=x")
            raise ConfigError(f"store {without_password(url)!r}: {exc}") from None
    raise StoreError(f"unknown store URL {without_password(url)!r}: use memory://, sqlite:///PATH or redis://HOST:PORT/DB")


__all__ = ["LockTimeout", "MemoryStore", "Prefetch", "SQLiteStore", "Store", "StoreError", "StoreView",
           "in_process", "open_store", "sqlite_path"]
