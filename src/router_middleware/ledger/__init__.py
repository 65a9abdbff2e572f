"""Usage ledger: one row per call in SQLite or PostgreSQL, written off the hot path; rankings report."""

from .html import render_html
from .record import COLUMNS, LedgerRecord, from_outcome
from .report import build_report, parse_time
from .store import ENDED, MIGRATIONS, TARGET, LedgerDB, PostgresLedger, SQLiteLedger, open_ledger
from .writer import LedgerWriter

__all__ = ["COLUMNS", "ENDED", "MIGRATIONS", "LedgerDB", "LedgerRecord", "LedgerWriter", "PostgresLedger",
           "SQLiteLedger", "TARGET", "build_report", "from_outcome", "open_ledger", "parse_time", "render_html"]
