"""Writes ledger rows off the hot path: a background thread, batches, retries, and a spool.

``append()`` only puts the row on a queue. The writer thread inserts batches; a row the database
rejects goes to the spool's quarantine with the reason and the others are written; a batch that
still fails after ``retries`` attempts (the database does not answer) goes to the spool folder
(:mod:`.spool`), whose rows are inserted first on the next successful write, by this process or any
other once this one is gone (or by ``flush_spool()``, or ``router-middleware ledger drain``). When
the spool cannot be written either (its folder cannot be made), the rows wait in memory (up to
:data:`HELD_MAX`) for the next write. Rows are never dropped silently: at worst they wait in the
spool, its quarantine or memory, and it is logged; those still in memory at ``close()`` are logged
as lost. A writer still busy when ``close()`` gives up (a database locked by another process) leaves
its rows, queued and in flight, to the spool; a row written twice is kept once (``call_id``). A
writer closed and then given a row starts again (a pipeline closed by one coroutine and used by the
next).
"""

from __future__ import annotations

import atexit
import functools
import queue
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from ..telemetry import log
from ..urls import without_password
from .record import LedgerRecord
from .spool import Drained, Spool, default_spool, insert_tolerant
from .store import LedgerDB, open_ledger

_STOP = object()
HELD_MAX = 10_000  # rows kept in memory while neither the database nor the spool takes them
WAIT_S = 5.0  # how long one statement may wait on the ledger (a lock, a lost server) before it is retried


class LedgerWriter:
    def __init__(self, url: str, *, spool: str | Path | None = None, retries: int = 3, batch: int = 200,
                 wait_s: float = WAIT_S, opener: Callable[[str], LedgerDB] | None = None) -> None:
        """``spool``: the spool folder (default: :func:`~.spool.default_spool` of ``url``); ``wait_s``:
        how long one statement may wait on the database (another process's lock, a server the network
        lost) before it fails and is retried; after ``retries`` tries the batch goes to the spool."""
        self.url = url
        self.spool = Spool(spool or default_spool(url))
        self.retries = retries
        self.batch = batch
        self.wait_s = wait_s
        self._open = opener or functools.partial(open_ledger, wait_s=wait_s)
        self._db: LedgerDB | None = None
        self._queue: queue.Queue[object] = queue.Queue()
        self._lock = threading.Lock()
        self._starting = threading.Lock()
        self._held: list[LedgerRecord] = []  # rows neither the database nor the spool took
        self._inflight: list[LedgerRecord] = []  # the batch being written
        self._since = 0.0  # when the batch in flight began (0: none)
        self._said_waiting = False  # its wait has been logged
        self._left: set[str] = set()  # rows of the batch in flight already left to the spool
        self._stuck = False  # an exit flush timed out: a later one (a call ended at exit) does not wait again
        self._thread = self._start()
        _LIVE.add(self)

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="router-ledger-writer", daemon=True)
        thread.start()
        return thread

    def _running(self) -> None:
        """Start the writer again if it was closed."""
        if not self._thread.is_alive():
            with self._starting:
                if not self._thread.is_alive():
                    self._thread = self._start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def append(self, record: LedgerRecord) -> None:
        self._queue.put(record)
        self._running()
        if self._since and not self._said_waiting and time.monotonic() - self._since > self.wait_s:
            self._say_waiting()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far has been written or spooled; False if it timed out
        (logged: ``ledger_flush_timed_out``)."""
        done = threading.Event()
        self._queue.put(done)
        self._running()
        if done.wait(timeout_s):
            return True
        log.warning("ledger_flush_timed_out", timeout_s=timeout_s, in_flight=len(self._inflight),
                    queued=self._queue.qsize(), waiting_s=self._waited())
        return False

    def _waited(self) -> float:
        """How long the batch in flight has waited on the database (0: none in flight)."""
        since = self._since
        return round(time.monotonic() - since, 1) if since else 0.0

    def _say_waiting(self) -> None:
        self._said_waiting = True
        log.warning("ledger_write_waiting", rows=len(self._inflight), queued=self._queue.qsize(),
                    waiting_s=self._waited(), ledger=without_password(self.url),
                    why="the ledger database has not answered (locked by another process, or not responding); "
                        "the rows are spooled once its tries fail")

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, stop the writer and close the database; rows still held in memory
        (neither the database nor the spool took them) are logged as lost. A writer still busy after
        ``timeout_s`` in all leaves its rows to the spool (:meth:`_leave_to_spool`)."""
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        self._queue.put(_STOP)
        self._thread.join(max(deadline - time.monotonic(), 0.1))
        if self._thread.is_alive():
            self._leave_to_spool()  # its database is still in use: it stays open
            return
        self._lose_held("close()")
        if self._db is not None:
            self._db.close()
            self._db = None

    def _lose_held(self, when: str) -> None:
        """Log the rows still held in memory as lost (the writer has stopped, or the process ends)."""
        if self._held:
            log.error("ledger_rows_lost", rows=len(self._held), spool=str(self.spool.own),
                      why=f"neither the ledger database nor its spool folder took them before {when}")
            self._held = []

    def _leave_to_spool(self) -> None:
        """The writer did not finish in time: spool its batch (once) and what is queued behind it."""
        rows, rest = [r for r in self._inflight if r.call_id not in self._left], []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, LedgerRecord):
                rows.append(item)
            elif item is not _STOP:
                rest.append(item)
        for item in [*rest, _STOP]:
            self._queue.put(item)
        if not rows:
            return
        try:
            self.spool.add(rows, wait_s=1.0)
        except Exception as exc:  # noqa: BLE001 - the process may exit now: said, not raised
            log.error("ledger_rows_lost", rows=len(rows), spool=str(self.spool.folder),
                      why="the ledger writer was still busy at close() and the spool folder did not take them",
                      error_type=type(exc).__name__, error=str(exc)[:200])
            return
        self._left.update(r.call_id for r in rows)
        log.error("ledger_rows_spooled", rows=len(rows), spool=str(self.spool.folder),
                  why="the ledger writer was still busy when close() gave up (is the database locked?)")

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
            try:
                if pending or self._held:
                    self._write(pending)
            except Exception as exc:  # noqa: BLE001 - the writer outlives any one batch
                log.error("ledger_writer_failed", rows=len(pending), error_type=type(exc).__name__,
                          error=str(exc)[:200])
            finally:
                for waiter in waiters:
                    waiter.set()

    def _db_or_open(self) -> LedgerDB:
        if self._db is None:
            self._db = self._open(self.url)
        return self._db

    def _write(self, records: list[LedgerRecord]) -> None:
        records, self._held = [*self._held, *records], []
        self._inflight, self._since = records, time.monotonic()
        try:
            self._write_or_keep(records)
        finally:
            if self._said_waiting:
                log.info("ledger_write_unblocked", rows=len(records), waited_s=self._waited())
            self._inflight, self._since, self._said_waiting = [], 0.0, False
            self._left.clear()

    def _write_or_keep(self, records: list[LedgerRecord]) -> None:
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
        try:
            self.spool.add(records)
        except Exception as exc:  # noqa: BLE001 - kept in memory for the next write
            self._held = records[-HELD_MAX:]
            log.error("ledger_rows_held", rows=len(self._held), lost=len(records) - len(self._held),
                      spool=str(self.spool.own), error_type=type(exc).__name__, error=str(exc)[:200])
            return
        log.error("ledger_rows_spooled", rows=len(records), spool=str(self.spool.own))

    def flush_spool(self) -> Drained:
        """Write the spooled rows now (this process's, and those of processes that are gone)."""
        with self._lock:
            return self.spool.drain(self._db_or_open())


_LIVE: weakref.WeakSet[LedgerWriter] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """Rows still queued when the process exits are written, up to 5 s per writer, or spooled; rows
    neither takes are logged as lost (as :meth:`LedgerWriter.close` does). Run again (calls ended at
    the exit after it ran), a writer that did not finish the first time is not waited on again."""
    for writer in list(_LIVE):
        if writer.alive and (writer._stuck or not writer.flush(timeout_s=5.0)):
            writer._stuck = True
            writer._leave_to_spool()
        else:
            writer._lose_held("the process exited")

