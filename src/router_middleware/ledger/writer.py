"""Writes ledger rows off the hot path: a background thread, batches, retries, and a spool.

``append()`` only puts the row on a queue. The writer thread inserts batches; a row the database
rejects goes to the spool's quarantine with the reason and the others are written; a batch that
still fails after ``retries`` attempts (the database does not answer) goes to the spool folder
(:mod:`.spool`), whose rows are inserted first on the next successful write, by this process or any
other once this one is gone (or by ``flush_spool()``, or ``router-middleware ledger drain``). Rows
are never dropped silently: at worst they wait in the spool or its quarantine, and it is logged.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from ..telemetry import log
from .record import LedgerRecord
from .spool import Drained, Spool, default_spool, insert_tolerant
from .store import LedgerDB, open_ledger

_STOP = object()


class LedgerWriter:
    def __init__(self, url: str, *, spool: str | Path | None = None, retries: int = 3, batch: int = 200,
                 opener: Callable[[str], LedgerDB] = open_ledger) -> None:
        """``spool``: the spool folder (default: :func:`~.spool.default_spool` of ``url``)."""
        self.url = url
        self.spool = Spool(spool or default_spool(url))
        self.retries = retries
        self.batch = batch
        self._open = opener
        self._db: LedgerDB | None = None
        self._queue: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="router-ledger-writer", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def append(self, record: LedgerRecord) -> None:
        self._queue.put(record)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything queued so far has been written or spooled."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        self.flush(timeout_s)
        self._queue.put(_STOP)
        self._thread.join(timeout_s)
        if self._db is not None:
            self._db.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            pending: list[LedgerRecord] = []
            waiters: list[threading.Event] = []
            while True:
                if isinstance(item, LedgerRecord):
                    pending.append(item)
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                if len(pending) >= self.batch:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
            if pending:
                self._write(pending)
            for waiter in waiters:
                waiter.set()

    def _db_or_open(self) -> LedgerDB:
        if self._db is None:
            self._db = self._open(self.url)
        return self._db

    def _write(self, records: list[LedgerRecord]) -> None:
        for attempt in range(self.retries):
            try:
                db = self._db_or_open()
                if self.spool.pending():
                    self.spool.drain(db)
                self.spool.quarantine(insert_tolerant(db, records))
                return
            except Exception as exc:  # noqa: BLE001 - retried, then spooled
                log.warning("ledger_write_failed", attempt=attempt + 1, error_type=type(exc).__name__,
                            error=str(exc)[:200])
                if self._db is not None:
                    try:
                        self._db.close()
                    except Exception:  # noqa: BLE001, S110 - reconnecting anyway
                        pass
                    self._db = None
                time.sleep(min(0.05 * 2**attempt, 1.0))
        self.spool.add(records)
        log.error("ledger_rows_spooled", rows=len(records), spool=str(self.spool.own))

    def flush_spool(self) -> Drained:
        """Write the spooled rows now (this process's, and those of processes that are gone)."""
        with self._lock:
            return self.spool.drain(self._db_or_open())


_LIVE: weakref.WeakSet[LedgerWriter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Rows still queued when the process exits are written (or spooled), up to 5 s per writer."""
    for writer in list(_LIVE):
        if writer.alive:
            writer.flush(timeout_s=5.0)

