"""The spool: ledger rows that could not be written yet, in one folder any process can drain.

Each process appends to its own JSON-lines file (``rows-<pid>.jsonl``); it drains that file before
its next write, and any process drains the files of processes that are gone (``router-middleware
ledger drain`` does it by hand). Reading is tolerant: a line cut off by a crash, or one that is not
a row, goes to ``quarantine.jsonl`` with the reason, and so does a row the database rejects (a NUL
byte on PostgreSQL, a lone surrogate on SQLite); the other rows are written. Nothing is dropped
silently: every quarantined line is kept, and logged.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from ..ids import unique_id
from ..telemetry import log
from .record import LedgerRecord, legacy_ending
from .store import LedgerDB

QUARANTINE = "quarantine.jsonl"
# the files this process's drains have claimed and not yet ended (each writer has a spool, and a lock, of its own)
_CLAIMED: set[Path] = set()
_CLAIMED_LOCK = threading.Lock()
_FIELDS = frozenset(f.name for f in fields(LedgerRecord))


def default_spool(url: str) -> Path:
    """Beside a SQLite ledger (``<file>.spool/``); for a server, a folder per ledger (its URL without
    the password) under ``$XDG_STATE_HOME`` (default ``~/.local/state``)/router-middleware/spool."""
    parts = urlsplit(url)
    if parts.scheme in ("", "sqlite"):
        path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
        return Path(f"{path}.spool")
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2:
        netloc[0] = netloc[0].split(":", 1)[0]  # the user, never the password
    safe = urlunsplit(parts._replace(netloc="@".join(netloc)))
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "router-middleware" / "spool" / hashlib.blake2b(safe.encode(), digest_size=6).hexdigest()


class DatabaseUnavailable(Exception):
    """The database failed and does not answer a probe either: keep the rows for later."""


def insert_tolerant(db: LedgerDB, records: Sequence[LedgerRecord]) -> list[tuple[LedgerRecord, str]]:
    """Insert ``records``; if the batch fails while the database still answers, insert them one by
    one and return the rows it rejects, with the reason. Raises :class:`DatabaseUnavailable` (from
    the database's error) when it does not answer, or answers but cannot write (:func:`_outage`: a
    full disk, a read-only file), which no row is to blame for."""
    try:
        db.insert(records)
        return []
    except Exception as exc:  # noqa: BLE001 - a bad row, or the database is down: the probe tells
        if _outage(exc) or not _answers(db):
            raise DatabaseUnavailable(str(exc)[:200]) from exc
    rejected = []
    for record in records:
        try:
            db.insert([record])
        except Exception as exc:  # noqa: BLE001
            if _outage(exc) or not _answers(db):
                raise DatabaseUnavailable(str(exc)[:200]) from exc
            rejected.append((record, f"{type(exc).__name__}: {str(exc)[:200]}"))
    return rejected


def _present(db: LedgerDB, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` the ledger holds already; :class:`DatabaseUnavailable` when it does not answer."""
    found: set[str] = set()
    try:
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = db.query(f"SELECT call_id FROM calls WHERE call_id IN ({', '.join('?' * len(chunk))})", chunk)
            found.update(str(row[0]) for row in rows)
    except Exception as exc:  # noqa: BLE001 - the rows stay spooled: nothing is lost
        raise DatabaseUnavailable(str(exc)[:200]) from exc
    return found


def _outage(exc: BaseException) -> bool:
    """A database error of the database, not of a row: DB-API's ``OperationalError`` (SQLite's full
    disk, read-only file, lock; PostgreSQL's lost connection, full disk) and PostgreSQL's read-only
    transaction (a standby)."""
    return any(kind.__name__ in _OUTAGES for kind in type(exc).__mro__)


_OUTAGES = frozenset({"OperationalError", "ReadOnlySqlTransaction"})


def _answers(db: LedgerDB) -> bool:
    try:
        db.query("SELECT 1")
        return True
    except Exception:  # noqa: BLE001
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _append(path: Path, records: Sequence[LedgerRecord]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(asdict(record)) + "\n" for record in records)


def _rejections(rejected: Sequence[tuple[LedgerRecord, str]]) -> list[dict[str, object]]:
    """Quarantine entries for rows the database refused, with its reason."""
    return [{"reason": reason, "row": asdict(record)} for record, reason in rejected]


@dataclass
class Drained:
    """What a drain did: rows written, rows already written, lines quarantined, rows left to live
    processes (by pid)."""

    written: int = 0
    already: int = 0  # rows the ledger held already, or a line repeated (a drain cut short, run again)
    quarantined: int = 0
    held: dict[int, int] = field(default_factory=dict)


class Spool:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.own = self.folder / f"rows-{os.getpid()}.jsonl"
        self._lock = threading.Lock()

    def add(self, records: Sequence[LedgerRecord], *, wait_s: float = -1) -> None:
        """Keep ``records`` in this process's file until the database takes them. ``wait_s``: how long
        to wait for a drain in progress (default: as long as it takes); past it the rows go to a file
        of their own (``rows-<pid>-<n>.jsonl``), drained like the process's file."""
        got = self._lock.acquire(timeout=wait_s)
        try:
            self.own = self.folder / f"rows-{os.getpid()}.jsonl"  # a forked child gets its own file
            self.folder.mkdir(parents=True, exist_ok=True)
            _append(self.own if got else self.folder / f"rows-{os.getpid()}-{unique_id()}.jsonl", records)
        finally:
            if got:
                self._lock.release()

    def pending(self) -> bool:
        return self.folder.is_dir() and (any(self.folder.glob("rows-*.jsonl"))
                                         or any(self.folder.glob("rows-*.draining")))

    def drain(self, db: LedgerDB) -> Drained:
        """Write this process's rows and those of processes that are gone; a file whose owner still
        runs is left to it. Raises :class:`DatabaseUnavailable` (the rest stays spooled)."""
        done = Drained()
        if not self.folder.is_dir():
            return done
        with self._lock:
            self._reclaim()
            for path in sorted(self.folder.glob("rows-*.jsonl")):
                try:
                    pid = int(path.stem.removeprefix("rows-").split("-", 1)[0])
                except ValueError:
                    pid = 0
                if pid != os.getpid() and pid and _alive(pid):
                    done.held[pid] = sum(1 for _ in path.open("rb"))
                    continue
                self._drain_file(db, path, done)
        return done

    def _reclaim(self) -> None:
        """Give the rows of a drain that never ended (its process exited or was killed while the
        database kept it waiting; or this process's, whose drain failed) back to the spool, as a file
        of their own: the drain below writes them (a row already written is kept once, by call_id)."""
        for claimed in self.folder.glob("rows-*.jsonl.*.draining"):
            try:  # rows-<pid>.jsonl.<drainer's pid>-<id>.draining
                drainer = int(claimed.name.removesuffix(".draining").rsplit(".", 1)[1].split("-", 1)[0])
            except ValueError:
                drainer = 0
            with _CLAIMED_LOCK:
                if claimed in _CLAIMED or (drainer != os.getpid() and drainer and _alive(drainer)):
                    continue  # still being drained, here or by another process
                try:
                    claimed.rename(self.folder / f"rows-{drainer}-{unique_id()}.jsonl")
                except FileNotFoundError:  # another drainer took it back first
                    continue
            log.warning("ledger_spool_reclaimed", file=claimed.name,
                        why="a drain of it never ended (its process exited while the database kept it waiting)")

    def _drain_file(self, db: LedgerDB, path: Path, done: Drained) -> None:
        claimed = path.with_name(f"{path.name}.{os.getpid()}-{unique_id()}.draining")  # never one left before
        with _CLAIMED_LOCK:
            try:
                path.rename(claimed)  # another drainer that got here first has it
            except FileNotFoundError:
                return
            _CLAIMED.add(claimed)
        try:
            self._drain_claimed(db, path, claimed, done)
        finally:
            with _CLAIMED_LOCK:
                _CLAIMED.discard(claimed)

    def _drain_claimed(self, db: LedgerDB, path: Path, claimed: Path, done: Drained) -> None:
        records: list[LedgerRecord] = []
        bad: list[dict[str, object]] = []
        dropped: set[str] = set()
        for number, raw in enumerate(claimed.read_bytes().splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
                if not isinstance(data, dict):
                    raise ValueError("not a ledger row")
                if not set(data) <= _FIELDS:  # a newer version's columns: the row is written without them
                    dropped.update(set(data) - _FIELDS)
                    data = {k: v for k, v in data.items() if k in _FIELDS}
                if data.get("ended") is None:  # a row spooled before ``ended``: read from its error
                    data["ended"] = legacy_ending(data.get("error"))
                records.append(LedgerRecord(**data))
            except (ValueError, TypeError) as exc:
                bad.append({"reason": f"line {number} of {path.name}: {type(exc).__name__}: {str(exc)[:200]}",
                            "line": raw.decode("utf-8", errors="replace")})
        if dropped:
            log.warning("ledger_spool_fields_dropped", file=path.name, fields=sorted(dropped)[:10],
                        detail="rows a newer version spooled: written without the columns this version lacks")
        first: dict[str, LedgerRecord] = {}
        for record in records:  # a line repeated: its first is written, as INSERT OR IGNORE would keep it
            first.setdefault(record.call_id, record)
        try:
            present = _present(db, list(first))
            fresh = [r for r in first.values() if r.call_id not in present]
            rejected = insert_tolerant(db, fresh) if fresh else []
        except DatabaseUnavailable:
            _append(path, records)  # back where it was, without the bad lines
            claimed.unlink()
            self._quarantine(bad)
            done.quarantined += len(bad)
            raise
        bad += _rejections(rejected)
        self._quarantine(bad)
        claimed.unlink()
        done.written += len(fresh) - len(rejected)
        done.already += len(records) - len(fresh)
        done.quarantined += len(bad)

    def quarantine(self, rejected: Sequence[tuple[LedgerRecord, str]]) -> None:
        """Keep rows the database rejected, with the reason (``quarantine.jsonl``)."""
        with self._lock:
            self._quarantine(_rejections(rejected))

    def _quarantine(self, entries: Sequence[dict[str, object]]) -> None:
        if not entries:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with (self.folder / QUARANTINE).open("a", encoding="utf-8") as handle:
            for entry in entries:
                handle.write(json.dumps(entry, default=str, ensure_ascii=True) + "\n")
        log.error("ledger_rows_quarantined", rows=len(entries), quarantine=str(self.folder / QUARANTINE),
                  reason=str(entries[0]["reason"])[:200])
