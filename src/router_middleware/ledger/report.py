"""Rankings from the ledger: where the tokens went and what the middleware saved.

Every number comes from one SQL aggregate over the ``calls`` table (see :data:`GROUPS`), so the
report can be checked against the database directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from .store import ENDED, TARGET, LedgerDB

# calls that used tokens at no known price (their cost is not in the sums); calls that ended in an error,
# and calls their caller stopped (a stream left, a task cancelled): all three counted in calls
UNPRICED = "SUM(CASE WHEN cost_usd IS NULL AND cache_hit = 0 AND input_tokens + output_tokens > 0 THEN 1 ELSE 0 END)"
PRICED = "SUM(CASE WHEN cost_usd IS NOT NULL THEN 1 ELSE 0 END)"  # a group of none has no known cost
FAILED = f"SUM(CASE WHEN {ENDED} = 'failed' THEN 1 ELSE 0 END)"
STOPPED = f"SUM(CASE WHEN {ENDED} = 'stopped' THEN 1 ELSE 0 END)"
SUMS = ("input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
        "cost_usd", "baseline_cost_usd", "saved_routing_usd", "saved_context_usd", "saved_cache_usd",
        "saved_reasoning_usd", "summary_cost_usd", "cache_hit")
# each ranking's key: the model that answered (or, where none did, the one the call was sent to), the
# model the call was sent to as its route names it (a failed call is counted with the answered ones there),
# the deployment it was sent under (calls sent under a name of their own only: two deployments of one
# model apart); the tenant and user labels (the calls that named none a group of their own)
GROUPS = {"model": "model", "target": TARGET, "deployment": "deployment", "provider": "provider", "app": "app",
          "tenant": "tenant", "user": "user_id", "session": "session"}
NAMED_ONLY = frozenset({"deployment"})  # rankings of the rows that have their key, no NULL group
LABELS = frozenset({"tenant", "user"})  # rankings with a NULL group (the calls that named none), none if all are
TOPPED = frozenset({"tenant", "user", "session"})  # rankings cut to the ``top`` that cost most


def _where(since: float | None, until: float | None, labels: Mapping[str, str]) -> tuple[str, list[Any]]:
    """The rows in ``[since, until)`` whose ``labels`` (a column: a value) are those given."""
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("ts >= ?")
        params.append(since)
    if until is not None:
        clauses.append("ts < ?")
        params.append(until)
    for column, value in labels.items():
        clauses.append(f"{column} = ?")
        params.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _row(names: tuple[str, ...], values: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        if isinstance(value, float) and name.endswith("_usd"):
            value = round(value, 8)
        elif name != "key" and value is None:
            value = 0
        out[name] = int(value) if name.endswith("tokens") or name.endswith(("calls", "cache_hits")) else value
    if out.get("unpriced_calls") and not out.get("priced_calls"):  # no call with a price: unknown, never $0
        out["cost_usd"] = out["baseline_cost_usd"] = None
    return out


def build_report(db: LedgerDB, *, since: float | None = None, until: float | None = None, top: int = 10,
                 app: str | None = None, tenant: str | None = None, user: str | None = None) -> dict[str, Any]:
    """Totals, rankings and the timeline of the calls in ``[since, until)``; with ``app``, ``tenant``
    or ``user``, of that one's calls only."""
    given = {"app": app, "tenant": tenant, "user": user}
    where, params = _where(since, until, {GROUPS[k]: v for k, v in given.items() if v is not None})
    select = ", ".join(f"SUM({c})" for c in SUMS) + f", {UNPRICED}, {PRICED}, {FAILED}, {STOPPED}"
    names = ("calls", *(c if c != "cache_hit" else "cache_hits" for c in SUMS), "unpriced_calls", "priced_calls",
             "failed_calls", "stopped_calls")
    total = _row(names, db.query(f"SELECT COUNT(*), {select} FROM calls{where}", params)[0])
    report: dict[str, Any] = {
        "range": {"since": since, "until": until},
        "only": {k: v for k, v in given.items() if v is not None},
        "totals": total,
        "cache_hit_rate": (total["cache_hits"] / total["calls"]) if total["calls"] else 0.0,
        "token_mix": {
            "input_uncached": total["input_tokens"] - total["cached_tokens"] - total["cache_write_tokens"],
            "input_cache_read": total["cached_tokens"],
            "input_cache_write": total["cache_write_tokens"],
            "output_visible": total["output_tokens"] - total["reasoning_tokens"],
            "output_reasoning": total["reasoning_tokens"],
        },
        "savings_by_policy": {
            "routing": total["saved_routing_usd"], "context": total["saved_context_usd"],
            "cache": total["saved_cache_usd"], "reasoning": total["saved_reasoning_usd"],
        },
    }
    for group, key in GROUPS.items():
        limit = f" LIMIT {int(top)}" if group in TOPPED else ""
        named = (f"{' AND' if where else ' WHERE'} {key} IS NOT NULL") if group in NAMED_ONLY else ""
        rows = db.query(
            f"SELECT {key}, COUNT(*), {select} FROM calls{where}{named} GROUP BY {key} "
            f"ORDER BY COALESCE(SUM(cost_usd), 0) DESC, {key} IS NULL, {key}{limit}", params)  # NULLs last
        ranked = [_row(("key", *names), r) for r in rows]
        report[f"by_{group}"] = [] if group in LABELS and all(r["key"] is None for r in ranked) else ranked
    report["timeline"] = _timeline(db, where, params)
    return report


def whose(report: dict[str, Any]) -> str:
    """Whose calls a report cut to an app, tenant or user counts (``"user ann"``), or ``""``."""
    return " and ".join(f"{label} {value}" for label, value in report.get("only", {}).items())


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural but for one: ``"1 call"``, ``"1,024 calls"``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def ends(counts: dict[str, Any]) -> str:
    """How many of a report's ``counts`` (its totals, or a group's) did not complete, in words:
    ``"2 failed, 1 stopped by their caller"``, or ``""``."""
    words = (("failed_calls", "failed"), ("stopped_calls", "stopped by their caller"))
    return ", ".join(f"{counts[key]:,} {label}" for key, label in words if counts.get(key))


def _timeline(db: LedgerDB, where: str, params: list[Any]) -> dict[str, Any]:
    bounds = db.query(f"SELECT MIN(ts), MAX(ts) FROM calls{where}", params)[0]
    if bounds[0] is None:
        return {"bucket_s": 3600, "buckets": []}
    span = float(bounds[1]) - float(bounds[0])
    bucket = next((b for b in (60, 600, 3600, 21600, 86400, 604800) if span / b <= 48), 2592000)
    rows = db.query(
        f"SELECT {db.floor.format(x=f'ts / {bucket}')} * {bucket}, model, SUM(input_tokens + output_tokens), "
        f"SUM(cost_usd) FROM calls{where} GROUP BY 1, 2 ORDER BY 1, 2", params)
    return {"bucket_s": bucket, "buckets": [
        {"start": float(start), "model": model, "tokens": int(tokens or 0), "cost_usd": float(cost or 0.0)}
        for start, model, tokens, cost in rows]}


def parse_time(text: str | None) -> float | None:
    """``2026-11-28``, ``2026-11-28T12:00`` (UTC) or seconds since the epoch."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        pass
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    exponent = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * exponent:
            return float(step * exponent)
    return float(10 * exponent)
