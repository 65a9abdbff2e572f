"""Ledger databases: SQLite (a file; safe with several processes) and PostgreSQL (by URL).

The schema is versioned: ``schema_version`` holds the applied migration number and
:data:`MIGRATIONS` is applied in order on open. SQL is written once with ``?`` placeholders.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import STOPPED_BY, LedgerError, MissingExtra
from ..stores import sqlite_path
from ..stores.sqlite import has_table
from ..telemetry import log
from ..urls import ledger_url_problem, without_password
from .record import COLUMNS, LedgerRecord

_STOPPED = ", ".join(f"'{name}'" for name in sorted(STOPPED_BY))
# how a row's call ended, in SQL: its ``ended``, else read from its ``error`` as :func:`.record.legacy_ending` does
ENDED = (f"COALESCE(ended, CASE WHEN error IS NULL THEN 'complete' WHEN error IN ({_STOPPED}) THEN 'stopped' "
         "ELSE 'failed' END)")
# the model a row's call was sent to, in SQL: its ``target``, else (a row of an older version) its ``model``,
# which names the target where no model answered
TARGET = "COALESCE(target, model)"
MIGRATIONS: tuple[str, ...] = (
    # 1: the calls table
    """CREATE TABLE IF NOT EXISTS calls (
        call_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, source TEXT NOT NULL, app TEXT, tenant TEXT,
        session TEXT, step INTEGER, step_kind TEXT, requested_model TEXT NOT NULL, model TEXT NOT NULL,
        provider TEXT, input_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
        cache_write_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, reasoning_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION, input_cost_usd DOUBLE PRECISION, output_cost_usd DOUBLE PRECISION,
        cache_read_cost_usd DOUBLE PRECISION, cache_write_cost_usd DOUBLE PRECISION,
        reasoning_cost_usd DOUBLE PRECISION, cost_source TEXT, latency_s DOUBLE PRECISION,
        ttft_s DOUBLE PRECISION, cache_hit INTEGER NOT NULL, error TEXT, decisions TEXT NOT NULL,
        baseline_cost_usd DOUBLE PRECISION, saved_routing_usd DOUBLE PRECISION NOT NULL,
        saved_context_usd DOUBLE PRECISION NOT NULL, saved_cache_usd DOUBLE PRECISION NOT NULL,
        saved_reasoning_usd DOUBLE PRECISION NOT NULL)""",
    # 2: indexes for the report's time ranges and groupings
    "CREATE INDEX IF NOT EXISTS calls_ts ON calls (ts)",
    "CREATE INDEX IF NOT EXISTS calls_session ON calls (session)",
    # 4: what the middleware's own summary calls cost, in the row of the call they were made for
    "ALTER TABLE calls ADD COLUMN summary_cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0",
    # 5: how the call ended (complete, stopped by its caller, failed). NULL in rows written before it, or
    # by an older version after it: read them through ENDED, never the column alone
    "ALTER TABLE calls ADD COLUMN ended TEXT",
    # 6: nothing (a ledger opened by 5f2e61e, never released, is at 6 already: its 5 and 6 added ended
    # with a default and filled it)
    "SELECT 1",
    # 7: the model the call was sent to (its route's name). NULL in rows written before it, or by an
    # older version after it: read them through TARGET
    "ALTER TABLE calls ADD COLUMN target TEXT",
    # 8: the name the target was sent under (a deployment, a proxy model_name). NULL for a model id called
    # as itself, in rows written before it, and in rows an older version writes after it
    "ALTER TABLE calls ADD COLUMN deployment TEXT",
    # 9: the call's user label (``context.user``). NULL without one, in rows written before it, and in rows
    # an older version writes after it ("user" is a reserved word in PostgreSQL)
    "ALTER TABLE calls ADD COLUMN user_id TEXT",
)
UPSERT = " ON CONFLICT (call_id) DO UPDATE SET " + ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:])
INSERT = f"INSERT INTO calls ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"


class LedgerDB(Protocol):
    url: str
    floor: str  # SQL that floors ``{x}`` to an integer in this dialect

    def insert(self, records: Sequence[LedgerRecord], *, replace: bool = False) -> None:
        """Add ``records``; a row whose ``call_id`` exists is kept, or overwritten with ``replace``."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def close(self) -> None: ...


def _migrate(execute: Any, fetch_version: Any) -> None:
    execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    version = fetch_version()
    for number, statement in enumerate(MIGRATIONS, start=1):
        if number > version:
            execute(statement)
    if version > len(MIGRATIONS):
        log.warning("ledger_schema_newer", version=version, known=len(MIGRATIONS),
                    detail="a newer version of router-middleware migrated this ledger: upgrade this process")
    if version == 0:
        execute(f"INSERT INTO schema_version (version) VALUES ({len(MIGRATIONS)})")
    elif version < len(MIGRATIONS):
        execute(f"UPDATE schema_version SET version = {len(MIGRATIONS)}")


class SQLiteLedger:
    floor = "CAST({x} AS INTEGER)"  # ts is positive: truncation is floor

    def __init__(self, path: str, wait_s: float = 30.0) -> None:
        """``wait_s``: how long a statement waits on another process's lock before it fails."""
        self.url = f"sqlite:///{path}"
        self.db = sqlite3.connect(path, timeout=wait_s, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA busy_timeout={int(wait_s * 1000)}")
        self.db.execute("BEGIN IMMEDIATE")
        try:
            _migrate(self.db.execute, lambda: (self.db.execute("SELECT MAX(version) FROM schema_version")
                                               .fetchone()[0] or 0))
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def insert(self, records: Sequence[LedgerRecord], *, replace: bool = False) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
            self.db.executemany(INSERT.replace("INSERT", verb, 1), [r.row() for r in records])
            self.db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """End a failed transaction, if SQLite has not ended it already (it does on a full disk): the
        error that failed it is the one raised, not "cannot rollback"."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return list(self.db.execute(sql, tuple(params)).fetchall())

    def close(self) -> None:
        self.db.close()


class PostgresLedger:
    floor = "CAST(FLOOR({x}) AS BIGINT)"

    def __init__(self, url: str, wait_s: float | None = None) -> None:
        """``wait_s``: how long connecting, a statement (waiting on a lock included) and unacknowledged
        data (a server the network lost) may take before it fails; None: connecting 10 s, the rest as
        long as it takes. The URL's own ``connect_timeout`` or ``tcp_user_timeout`` wins."""
        import psycopg

        self.url = url
        given = psycopg.conninfo.conninfo_to_dict(url)
        bounded: dict[str, Any] = {}
        if "connect_timeout" not in given:  # psycopg waits at least 2 s, per address the host has
            bounded["connect_timeout"] = max(2, math.ceil(wait_s)) if wait_s is not None else 10
        if wait_s is not None and "tcp_user_timeout" not in given:
            bounded["tcp_user_timeout"] = int(wait_s * 1000)
        self.db = psycopg.connect(url, autocommit=True, **bounded)
        if wait_s is not None:
            self.db.execute(f"SET statement_timeout = {int(wait_s * 1000)}")
        with self.db.transaction():
            def execute(sql: str) -> None:
                self.db.execute(sql.replace("?", "%s"))

            def version() -> int:
                row = self.db.execute("SELECT MAX(version) FROM schema_version").fetchone()
                return int(row[0] or 0) if row else 0

            self.db.execute("SELECT pg_advisory_xact_lock(424242)")  # one migrator at a time
            _migrate(execute, version)

    def insert(self, records: Sequence[LedgerRecord], *, replace: bool = False) -> None:
        sql = INSERT.replace("?", "%s") + (UPSERT if replace else " ON CONFLICT (call_id) DO NOTHING")
        with self.db.transaction(), self.db.cursor() as cursor:
            cursor.executemany(sql, [r.row() for r in records])

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cursor = self.db.execute(sql.replace("?", "%s"), tuple(params))
        return list(cursor.fetchall()) if cursor.description is not None else []

    def close(self) -> None:
        self.db.close()


def ledger_scheme(url: str) -> str | None:
    """The scheme of ledger ``url`` (``None``: a file path); ``LedgerError`` for one no ledger opens or
    would misread (:func:`~router_middleware.urls.ledger_url_problem`: config refuses the same)."""
    problem = ledger_url_problem(url)
    if problem:
        raise LedgerError(f"ledger {without_password(url)!r}: {problem}")
    return url.split("://", 1)[0] if "://" in url else None


def open_ledger(url: str, *, create: bool = True, wait_s: float | None = None) -> LedgerDB:
    """``sqlite:///path.db`` (or a plain file path) or ``postgresql://user@host:port/db``.

    ``wait_s`` bounds how long one statement may wait (on a lock, or a server the network lost) before
    it fails; None: SQLite waits 30 s for a lock, PostgreSQL as long as it takes (a report's query).
    Raises ``LedgerError`` naming the ledger when it cannot be opened; with ``create=False`` a
    SQLite file that does not exist is such an error (a report never creates an empty ledger)."""
    scheme = ledger_scheme(url)
    if scheme in ("postgresql", "postgres"):
        try:
            import psycopg
        except ImportError:
            raise MissingExtra("a PostgreSQL ledger", "postgres", "psycopg") from None
        try:
            return PostgresLedger(url, wait_s)
        except psycopg.Error as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LedgerError(f"cannot open the PostgreSQL ledger {without_password(url)}: {reason}") from None
    path = (sqlite_path(url) or "") if scheme else url
    if not path:  # sqlite3 would open a private temporary database, gone with the connection
        raise LedgerError(f"ledger {url!r} names no file (use sqlite:///path.db)")
    if Path(path).is_dir():
        raise LedgerError(f"ledger {path!r} is a folder, not a database file")
    if not create and not Path(path).exists():
        raise LedgerError(f"no ledger at {path!r} (file not found; a pipeline writes it with its first row: a "
                          "call answered, failed or stopped, not one refused before any attempt)")
    if not create and not has_table(path, "calls"):  # opening it would add them (an empty file, another database)
        raise LedgerError(f"{path!r} is not a router-middleware ledger (no calls table): left as it is")
    try:
        return SQLiteLedger(path, 30.0 if wait_s is None else wait_s)
    except sqlite3.DatabaseError as exc:
        what = "is not a SQLite database" if "not a database" in str(exc) else f"cannot be opened ({exc})"
        raise LedgerError(f"ledger {path!r} {what}") from None

