"""SQLite store: persistent on one machine, safe with several processes (WAL, busy timeout,
``BEGIN IMMEDIATE`` for read-modify-write)."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from urllib.parse import quote

from ..telemetry import log
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
    StoreError,
    Within,
    added,
    blend,
    counted,
    fetch_each,
    kept,
    numbers,
    partial_write,
    refusing,
    ring_seq,
    token_lock,
    unreadable,
    within_checks,
)


def has_table(path: str, table: str) -> bool:
    """Whether the SQLite file at ``path`` holds ``table``, read only (a command that only reads never
    creates or changes a database: an empty file, another program's). A file that is no database
    answers True: its opener says what it is."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                              (table,)).fetchone() is not None
    except sqlite3.DatabaseError:
        return True


SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL)"
HOLDS = ("CREATE TABLE IF NOT EXISTS holds (key TEXT NOT NULL, hold TEXT NOT NULL, amount REAL NOT NULL, "
         "expires REAL NOT NULL, PRIMARY KEY (key, hold))")
# What append keeps: a row per value, in the order appended (seq); every row of a key expires with it.
LISTS = ("CREATE TABLE IF NOT EXISTS lists (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, "
         "value BLOB NOT NULL, expires REAL)")
LISTS_BY_KEY = "CREATE INDEX IF NOT EXISTS lists_by_key ON lists (key, seq)"
# What the purge finds expired rows by (a scan of 200k rows took 25 ms, the index 2-3 ms; an increment's
# median with and without them was within the noise, 334-378 us).
_PURGED = 5000  # rows of each table one purge deletes at most (a file with a backlog is cleared over writes)
EXPIRING = ("CREATE INDEX IF NOT EXISTS kv_expires ON kv (expires)",
            "CREATE INDEX IF NOT EXISTS lists_expires ON lists (expires)")


class SQLiteStore:
    def __init__(self, path: str | Path, *, busy_timeout_s: float = 5.0, purge_every_s: float = 60.0) -> None:
        """``purge_every_s``: how often, at most, a write also deletes the rows that expired (a write
        to a key drops its own expired row; most keys are never written again: a quota's minute, a
        day's budget total, a session's route)."""
        self.path = str(path)
        self._busy = busy_timeout_s
        self._local = threading.local()
        self._purge_every = purge_every_s
        self._purge_at = 0.0  # time.monotonic() of the next purge: opening the store makes the first
        try:
            with self._tx() as db:
                db.execute(SCHEMA)
                db.execute(HOLDS)
                db.execute(LISTS)
                db.execute(LISTS_BY_KEY)
                for index in EXPIRING:
                    db.execute(index)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable SQLite store ({exc})") from None

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self._busy, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA busy_timeout={int(self._busy * 1000)}")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self, *, purging: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction, then a purge if it is time to (:meth:`_wrote`). This process's writers
        of the file take turns (:func:`_writers`): SQLite's busy handler is unfair, and with a busy
        timeout as short as ``store_timeout_s`` its own threads failed each other's writes; so the
        timeout bounds the wait for another process's lock. ``purging`` (the purge's own): the write
        lock is tried once, never waited for, and no purge follows."""
        turn = _writers(self.path)
        if not (turn.acquire(blocking=False) if purging else turn.acquire(timeout=self._busy)):
            raise sqlite3.OperationalError("database is locked (by this process's other writers)")
        try:
            db = self._db()
            try:
                if purging:
                    db.execute("PRAGMA busy_timeout=0")
                try:
                    db.execute("BEGIN IMMEDIATE")
                finally:
                    if purging:
                        db.execute(f"PRAGMA busy_timeout={int(self._busy * 1000)}")
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:  # SQLite ends one itself on a full disk: its error is the one raised
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.OperationalError) and not _contended(exc):
                    self.close()  # a connection opened on a read-only file stays so: the next write opens another
                raise
        finally:
            turn.release()
        if not purging:
            self._wrote()

    def _wrote(self) -> None:
        """After a write: purge the expired rows if it is time to (:meth:`_purge`)."""
        if time.monotonic() >= self._purge_at:
            self._purge()

    def _purge(self) -> None:
        """Delete up to ``_PURGED`` rows of each kind that expired: values, lists, and the expired holds
        of totals that are gone (a live total's expired holds are taken out of it by the next admission
        that holds against it); a full batch leaves the next write to go on. Never waits for another
        writer (the lock is tried once: busy, the purge waits for the next one), and a failure waits
        for the next one too: the write that made this one is already committed."""
        self._purge_at = time.monotonic() + self._purge_every
        now = time.time()
        full = False
        try:
            with self._tx(purging=True) as db:
                for table in ("kv", "lists"):
                    deleted = db.execute(f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} "  # noqa: S608
                                         "WHERE expires <= ? LIMIT ?)", (now, _PURGED)).rowcount
                    full = full or deleted >= _PURGED
                db.execute("DELETE FROM holds WHERE expires <= ? AND key NOT IN (SELECT key FROM kv)", (now,))
            if full:
                self._purge_at = 0.0
        except sqlite3.OperationalError as exc:
            if not _contended(exc):
                log.warning("store_purge_failed", path=self.path, error=str(exc)[:200])
        except sqlite3.Error as exc:
            log.warning("store_purge_failed", path=self.path, error=str(exc)[:200])

    @staticmethod
    def _expiry(ttl_s: float | None) -> float | None:
        return time.time() + ttl_s if ttl_s else None

    @staticmethod
    def _current(db: sqlite3.Connection, key: str) -> tuple[bytes, float | None] | None:
        row = db.execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        if row[1] is not None and row[1] <= time.time():
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            return None
        return _blob(row[0]), row[1]

    def get(self, key: str) -> bytes | None:
        row = self._db().execute("SELECT value, expires FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return _blob(row[0])

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        db = self._db()
        db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                   (key, value, self._expiry(ttl_s)))
        self._wrote()

    def delete(self, key: str) -> None:
        self._db().execute("DELETE FROM kv WHERE key = ?", (key,))

    def incr(self, key: str, amount: float = 1.0, ttl_s: float | None = None) -> float:
        with self._tx() as db:
            return self._add(db, key, amount, ttl_s)

    def _add(self, db: sqlite3.Connection, key: str, amount: float, ttl_s: float | None,
             fresh: float | None = None) -> float:
        current = self._current(db, key)
        if current is None:  # a release's counter gone while held: it starts again at the spend
            value, expires = amount if fresh is None else fresh, self._expiry(ttl_s)
        else:
            value, fresh_count = added(key, current[0], amount, fresh)
            expires = self._expiry(ttl_s) if fresh_count and current[1] is None else current[1]
        db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                   (key, repr(value).encode(), expires))
        return value

    def _kept(self, db: sqlite3.Connection, key: str, closed: Collection[str]) -> bool:
        """Whether ``key`` is one of ``keep`` holding a value no writer of ours leaves (said: :func:`kept`)."""
        if key in closed and (current := self._current(db, key)) is not None and unreadable(current[0]):
            kept(key, current[0])
            return True
        return False

    def add_within(self, entries: Sequence[Within], holds: Sequence[Hold] = (),
                   owned: Sequence[Owned] = (), left: Sequence[Countdown] = ()) -> Refusal | None:
        with self._tx() as db:
            now = time.time()
            for key, *_ in holds:
                self._expire_holds(db, key, now)
            for index, check in enumerate(within_checks(entries, holds, owned, left)):
                current = self._current(db, check[0])
                total = refusing(check, current[0] if current else None)
                if total is not None:
                    return index, total
            for key, amount, _, ttl_s in entries:
                self._add(db, key, amount, ttl_s)
            for key, owner, ttl_s in owned:
                db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                           (key, owner, self._expiry(ttl_s)))
            for key, amount, _, ttl_s, hold, hold_s in holds:
                self._add(db, key, amount, ttl_s)
                db.execute("INSERT OR REPLACE INTO holds (key, hold, amount, expires) VALUES (?, ?, ?, ?)",
                           (key, hold, amount, now + hold_s))
            for key, amount in left:
                if self._current(db, key) is not None:
                    self._add(db, key, -amount, None)
            return None

    def _expire_holds(self, db: sqlite3.Connection, key: str, now: float) -> None:
        expired = db.execute("SELECT COALESCE(SUM(amount), 0) FROM holds WHERE key = ? AND expires <= ?",
                             (key, now)).fetchone()[0]
        if expired:
            db.execute("DELETE FROM holds WHERE key = ? AND expires <= ?", (key, now))
            current = self._current(db, key)
            if current is not None and counted(current[0]) is not None:  # else the admission names it
                self._add(db, key, -float(expired), None)

    def add_many(self, entries: Sequence[Addition], samples: Sequence[Sample] = (),
                 releases: Sequence[Release] = (), bounded: Sequence[Bounded] = (),
                 averages: Sequence[Average] = (), puts: Sequence[Put] = (), closed: Collection[str] = ()) -> None:
        cache_failed: Exception | None = None
        try:  # the response cache's entries, then the settlement in a transaction of its own
            for put in bounded:
                self.put_bounded(*put)
        except Exception as exc:  # noqa: BLE001 - the settlement is written all the same
            cache_failed = exc
        try:
            with self._tx() as db:
                self._settle(db, entries, samples, releases, averages, puts, closed)
        except Exception as exc:
            if bounded and cache_failed is None:
                raise partial_write(exc, cache_written=True, settled=False) from exc
            raise
        if cache_failed is not None:
            raise partial_write(cache_failed, cache_written=False, settled=True) from cache_failed

    def _settle(self, db: sqlite3.Connection, entries: Sequence[Addition], samples: Sequence[Sample],
                releases: Sequence[Release], averages: Sequence[Average], puts: Sequence[Put],
                closed: Collection[str]) -> None:
        for key, amount, ttl_s in entries:
            if not self._kept(db, key, closed):
                self._add(db, key, amount, ttl_s)
        for key, hold, held, actual, ttl_s in releases:
            counted = db.execute("DELETE FROM holds WHERE key = ? AND hold = ?", (key, hold)).rowcount
            delta = actual - held if counted else actual
            if delta and not self._kept(db, key, closed):
                self._add(db, key, delta, ttl_s, fresh=actual)
        for key, value, keep, ttl_s in samples:
            current = self._current(db, key)
            recent = [*(_recent(current[0]) if current else []), value][-keep:]
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                       (key, json.dumps(recent).encode(), self._expiry(ttl_s)))
        for key, sample, weight, ttl_s in averages:
            current = self._current(db, key)
            value = blend(current[0] if current else None, sample, weight)
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                       (key, repr(value).encode(), self._expiry(ttl_s)))
        for key, raw, ttl_s in puts:
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                       (key, raw, self._expiry(ttl_s)))

    def put_bounded(self, key: str, value: bytes, ttl_s: float | None, ring: str, capacity: int) -> None:
        put = "INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)"
        with self._tx() as db:
            db.execute(put, (key, value, self._expiry(ttl_s)))
            seq = ring_seq(lambda: self._add(db, f"{ring}:seq", 1.0, None),
                           lambda: db.execute("DELETE FROM kv WHERE key = ?", (f"{ring}:seq",)))
            slot = f"{ring}:slot:{seq % capacity}"
            previous = self._current(db, slot)
            if previous and (evicted := previous[0].decode(errors="replace")) != key:  # (another program's bytes)
                db.execute("DELETE FROM kv WHERE key = ?", (evicted,))
            db.execute(put, (slot, key.encode(), self._expiry(ttl_s)))

    def samples(self, key: str) -> list[float]:
        raw = self.get(key)
        return _recent(raw) if raw else []

    def append(self, key: str, value: bytes, keep: int, ttl_s: float | None = None) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM lists WHERE key = ? AND expires <= ?", (key, time.time()))
            db.execute("INSERT INTO lists (key, value) VALUES (?, ?)", (key, value))
            db.execute("UPDATE lists SET expires = ? WHERE key = ?", (self._expiry(ttl_s), key))
            db.execute("DELETE FROM lists WHERE key = ? AND seq NOT IN "
                       "(SELECT seq FROM lists WHERE key = ? ORDER BY seq DESC LIMIT ?)", (key, key, keep))

    def appended(self, key: str) -> list[bytes]:
        rows = self._db().execute("SELECT value FROM lists WHERE key = ? AND (expires IS NULL OR expires > ?) "
                                  "ORDER BY seq", (key, time.time())).fetchall()
        return [_blob(row[0]) for row in rows]

    def fetch(self, keys: Sequence[str], lists: Sequence[str] = ()) -> Fetched:
        return fetch_each(self, keys, lists)

    def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl_s: float | None = None) -> bool:
        with self._tx() as db:
            current = self._current(db, key)
            if (current[0] if current else None) != expected:
                return False
            db.execute("INSERT OR REPLACE INTO kv (key, value, expires) VALUES (?, ?, ?)",
                       (key, value, self._expiry(ttl_s)))
            return True

    def lock(self, name: str, ttl_s: float = 10.0, timeout_s: float = 5.0) -> AbstractContextManager[None]:
        return token_lock(self, name, ttl_s, timeout_s)

    def delete_if(self, key: str, value: bytes | None) -> bool:
        with self._tx() as db:
            current = self._current(db, key)
            if current is None or value is None or current[0] != value:
                return False
            db.execute("DELETE FROM kv WHERE key = ?", (key,))
            return True

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def _blob(value: bytes | str | float) -> bytes:
    """A stored value as the bytes Redis would hold for it: ours are BLOBs; another program's
    ``UPDATE kv SET value = 0`` (an INTEGER), ``0.5`` (a REAL) or ``'3'`` (TEXT) reads as its text, as
    ``SET key 0`` would on Redis (``bytes()`` of an INTEGER made that many zero bytes; of a REAL or TEXT
    it raised TypeError, and every admission and settlement touching the key failed)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return repr(value).encode() if isinstance(value, float) else str(value).encode()


_TURNS: dict[str, threading.RLock] = {}
_TURNS_LOCK = threading.Lock()


def _writers(path: str) -> threading.RLock:
    """The turn of this process's writers of the SQLite file at ``path`` (every store open on it)."""
    key = os.path.realpath(path)
    with _TURNS_LOCK:
        return _TURNS.setdefault(key, threading.RLock())


def _contended(exc: sqlite3.OperationalError) -> bool:
    """Another writer held the lock (retried as it is), not a fault of the file or the connection."""
    return "locked" in str(exc) or "busy" in str(exc)


def _recent(raw: bytes) -> list[float]:
    """A row of recent values (a JSON list of numbers) as its finite numbers: a row another program
    wrote that is no such list reads as none, and a value in it that is no finite number is left out,
    as Redis's and memory's reads leave it out (:func:`.base.numbers`); the next sample replaces it."""
    try:
        values = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is one), or nested past Python's depth
        return []
    if not isinstance(values, list):
        return []
    return numbers(v for v in values if isinstance(v, int | float) and not isinstance(v, bool))
