"""Writes ledger rows off the hot path: a background thread, batches, retries, and a spool file.

``append()`` only puts the row on a queue. The writer thread inserts batches; a batch that still
fails after ``retries`` attempts is appended to a JSON-lines spool file, and spooled rows are
inserted first on the next successful write (or by ``flush_spool()``). Rows are never dropped
silently: at worst they wait in the spool, and the failure is logged.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from ..telemetry import log
from .record import LedgerRecord
from .store import LedgerDB, open_ledger

_STOP = object()


class LedgerWriter:
    def __init__(self, url: str, *, spool: str | Path | None = None, retries: int = 3, batch: int = 200,
                 opener: Callable[[str], LedgerDB] = open_ledger) -> None:
        self.url = url
        self.spool = Path(spool) if spool else Path(f".router-ledger-spool-{os.getpid()}.jsonl")
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
                self._drain_spool(db)
                db.insert(records)
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
        with self._lock, self.spool.open("a", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(asdict(record)) + "\n")
        log.error("ledger_rows_spooled", rows=len(records), spool=str(self.spool))

    def _drain_spool(self, db: LedgerDB) -> None:
        with self._lock:
            if not self.spool.exists():
                return
            lines = self.spool.read_text(encoding="utf-8").splitlines()
            records = [LedgerRecord(**json.loads(line)) for line in lines if line.strip()]
            if records:
                db.insert(records)  # inserts ignore call_ids already present, so a retry is harmless
            self.spool.unlink()

    def flush_spool(self) -> None:
        self._drain_spool(self._db_or_open())


_LIVE: weakref.WeakSet[LedgerWriter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Rows still queued when the process exits are written (or spooled), up to 5 s per writer."""
    for writer in list(_LIVE):
        if writer.alive:
            writer.flush(timeout_s=5.0)

