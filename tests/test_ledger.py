"""Ledger rows for every call, off the hot path, never dropped; report numbers equal direct SQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import litellm
import pytest
import structlog

from router_middleware import Pipeline
from router_middleware.cli import bundled_sessions, main
from router_middleware.errors import STOPPED_BY, LedgerError, StreamLeft, ending
from router_middleware.ledger import (
    ENDED,
    MIGRATIONS,
    LedgerRecord,
    LedgerWriter,
    SQLiteLedger,
    build_report,
    open_ledger,
)
from router_middleware.ledger.record import legacy_ending
from router_middleware.litellm import ClientDisconnected

from .conftest import ROOT, service_missing

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    url = request.getfixturevalue("postgres_url")
    db = open_ledger(url)
    db.query("DELETE FROM calls")
    db.close()
    return url


def test_every_call_gets_a_row(ledger_url) -> None:
    pipeline = Pipeline.from_config({"app": "coder", "ledger": {"url": ledger_url}})
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="a", temperature=0,
                        context={"session_id": "s1", "step": 0})
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="a", temperature=0,
                        context={"session_id": "s1", "step": 1})  # response-cache hit
    for _ in pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="b c", stream=True,
                                 context={"session_id": "s2"}):
        pass
    with pytest.raises(litellm.exceptions.RateLimitError):
        pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, context={"session_id": "s2"},
                            mock_response=litellm.exceptions.RateLimitError("slow", "openai", "gpt-4o-mini"))
    pipeline.close()
    db = open_ledger(ledger_url)
    rows = db.query("SELECT session, step, app, cache_hit, error, cost_usd, saved_cache_usd, input_tokens "
                    "FROM calls ORDER BY ts")
    db.close()
    assert len(rows) == 4
    assert [r[0] for r in rows] == ["s1", "s1", "s2", "s2"] and rows[0][2] == "coder"
    assert rows[1][3] == 1 and rows[1][5] == 0 and rows[1][6] == pytest.approx(rows[0][5])
    assert rows[3][4] == "RateLimitError" and rows[3][7] == 0
    assert rows[2][7] > 0


def test_report_matches_direct_sql(ledger_url, tmp_path) -> None:
    assert main(["replay", *bundled_sessions(), "--ledger", ledger_url, "--json", "--compact"]) == 0
    db = open_ledger(ledger_url)
    report = build_report(db, top=50)
    total = db.query("SELECT COUNT(*), SUM(input_tokens), SUM(cached_tokens), SUM(output_tokens), "
                     "SUM(reasoning_tokens), SUM(cost_usd), SUM(baseline_cost_usd), SUM(saved_context_usd) "
                     "FROM calls")[0]
    by_model = dict(db.query("SELECT model, SUM(cost_usd) FROM calls GROUP BY model"))
    by_session = dict(db.query("SELECT session, SUM(input_tokens) FROM calls GROUP BY session"))
    db.close()
    t = report["totals"]
    assert (t["calls"], t["input_tokens"], t["cached_tokens"], t["output_tokens"], t["reasoning_tokens"]) == \
        tuple(int(v) for v in total[:5])
    assert t["cost_usd"] == pytest.approx(total[5]) and t["baseline_cost_usd"] == pytest.approx(total[6])
    assert report["savings_by_policy"]["context"] == pytest.approx(total[7])
    assert {r["key"]: r["cost_usd"] for r in report["by_model"]} == pytest.approx(by_model)
    assert {r["key"]: r["input_tokens"] for r in report["by_session"]} == by_session
    assert sum(report["token_mix"].values()) == t["input_tokens"] + t["output_tokens"]
    assert t["calls"] == 93 and t["cost_usd"] < t["baseline_cost_usd"]


def test_report_time_range(tmp_path) -> None:
    db = SQLiteLedger(str(tmp_path / "l.db"))
    db.insert([LedgerRecord(ts=1000.0 + i * 3600, model="m", requested_model="m", input_tokens=10, cost_usd=0.1)
               for i in range(5)])
    assert build_report(db, since=1000.0 + 3600, until=1000.0 + 3 * 3600)["totals"]["calls"] == 2
    assert build_report(db)["totals"]["input_tokens"] == 50


class FlakyDB(SQLiteLedger):
    failures = 0

    def insert(self, records):
        if FlakyDB.failures > 0:
            FlakyDB.failures -= 1
            raise OSError("disk unavailable")
        super().insert(records)

    def query(self, sql, params=()):
        if FlakyDB.failures > 0:  # the database does not answer a probe either
            FlakyDB.failures -= 1
            raise OSError("disk unavailable")
        return super().query(sql, params)


def test_failed_writes_are_spooled_then_written(tmp_path) -> None:
    path = str(tmp_path / "l.db")
    folder = tmp_path / "spool"
    FlakyDB.failures = 3 + 3  # every retry of the first batch fails, and the probe of the database too
    writer = LedgerWriter(path, spool=folder, retries=3, opener=FlakyDB)
    writer.append(LedgerRecord(ts=1.0, model="m", requested_model="m", call_id="first"))
    writer.flush()
    spool = writer.spool.own
    assert spool.exists() and "first" in spool.read_text()
    writer.append(LedgerRecord(ts=2.0, model="m", requested_model="m", call_id="second"))
    writer.close()
    assert not spool.exists()
    db = SQLiteLedger(path)
    assert sorted(r[0] for r in db.query("SELECT call_id FROM calls")) == ["first", "second"]


class SlowDB(SQLiteLedger):
    def insert(self, records):
        time.sleep(1.0)
        super().insert(records)


def test_a_slow_database_does_not_slow_calls(tmp_path) -> None:
    pipeline = Pipeline.from_config({})
    pipeline.ledger = pipeline.books.ledger = LedgerWriter(str(tmp_path / "l.db"), opener=SlowDB)  # rows go here
    Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="warm up")  # imports litellm
    started = time.perf_counter()
    for _ in range(5):
        pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="x")
    assert time.perf_counter() - started < 1.0  # five inserts would take 5 s on the hot path
    pipeline.close()
    assert SQLiteLedger(str(tmp_path / "l.db")).query("SELECT COUNT(*) FROM calls")[0][0] == 5


def test_schema_is_versioned_and_migrates(tmp_path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute(MIGRATIONS[0])
    raw.execute("INSERT INTO schema_version (version) VALUES (1)")
    raw.commit()
    raw.close()
    db = SQLiteLedger(str(path))
    assert db.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
    assert ("calls_ts",) in db.query("SELECT name FROM sqlite_master WHERE type = 'index'")
    SQLiteLedger(str(path))  # reopening is idempotent
    assert db.query("SELECT COUNT(*) FROM schema_version") == [(1,)]


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_rows_written_before_the_ended_column_are_read_from_their_error(dialect, tmp_path, request) -> None:
    """A ledger of schema version 4 (no ``ended``), and rows an older version writes after the migration:
    read through ``ENDED``, how they ended comes from their error, a name of what a caller's side
    raises being ``stopped``, any other ``failed``, none ``complete``."""
    import sqlite3

    rows = [(None, "complete"), ("StreamLeft", "stopped"), ("CancelledError", "stopped"),
            ("ClientDisconnected", "stopped"), ("APIConnectionError", "failed"), ("BudgetExceeded", "failed")]
    if dialect == "sqlite":
        url = str(tmp_path / "v4.db")
        raw: Any = sqlite3.connect(url, isolation_level=None)
    else:
        import psycopg

        url = request.getfixturevalue("postgres_url")
        raw = psycopg.connect(url, autocommit=True)
        raw.execute("DROP TABLE IF EXISTS calls")
        raw.execute("DROP TABLE IF EXISTS schema_version")
    mark = "?" if dialect == "sqlite" else "%s"
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[:4]:
        raw.execute(statement)
    raw.execute("INSERT INTO schema_version (version) VALUES (4)")
    for i, (error, _) in enumerate(rows):
        raw.execute("INSERT INTO calls (call_id, ts, source, requested_model, model, input_tokens, cached_tokens, "
                    "cache_write_tokens, output_tokens, reasoning_tokens, cache_hit, error, decisions, "
                    "saved_routing_usd, saved_context_usd, saved_cache_usd, saved_reasoning_usd) VALUES "
                    f"({', '.join([mark] * 17)})",
                    (f"c{i}", float(i), "live", "m", "m", 1, 0, 0, 1, 0, 0, error, "[]", 0.0, 0.0, 0.0, 0.0))
    db = open_ledger(url)  # migrated: a column added, no row rewritten (a table lock on PostgreSQL)
    try:
        # an older version, still running, writes after the migration: its row names no ``ended`` either
        raw.execute("INSERT INTO calls (call_id, ts, source, requested_model, model, input_tokens, cached_tokens, "
                    "cache_write_tokens, output_tokens, reasoning_tokens, cache_hit, error, decisions, "
                    "saved_routing_usd, saved_context_usd, saved_cache_usd, saved_reasoning_usd) VALUES "
                    f"({', '.join([mark] * 17)})",
                    ("late", 9.0, "live", "m", "m", 1, 0, 0, 1, 0, 0, "RateLimitError", "[]", 0.0, 0.0, 0.0, 0.0))
        assert db.query("SELECT COUNT(*) FROM calls WHERE ended IS NOT NULL") == [(0,)]
        assert db.query(f"SELECT error, {ENDED} FROM calls ORDER BY ts") == [*rows, ("RateLimitError", "failed")]
        totals = build_report(db)["totals"]
    finally:
        db.close()
        raw.close()
    assert (totals["calls"], totals["stopped_calls"], totals["failed_calls"]) == (7, 3, 3)
    try:
        with structlog.testing.capture_logs() as logs:  # and an older version than the ledger's says so
            db = open_ledger(url)
            db.query(f"UPDATE schema_version SET version = {len(MIGRATIONS) + 1}")
            db.close()
            open_ledger(url).close()
    finally:  # the worker's PostgreSQL database is shared: a later test's ledger is this version's again
        db = open_ledger(url)  # (test_spool's drain printed the "newer" warning ahead of its count: ci103)
        db.query(f"UPDATE schema_version SET version = {len(MIGRATIONS)}")
        db.close()
    assert [e["version"] for e in logs if e["event"] == "ledger_schema_newer"] == [len(MIGRATIONS) + 1]


def _write_rows(path: str, prefix: str) -> None:
    writer = LedgerWriter(path)
    for i in range(100):
        writer.append(LedgerRecord(ts=float(i), model="m", requested_model="m", call_id=f"{prefix}-{i}"))
    writer.close()


def test_sqlite_ledger_with_several_processes(tmp_path) -> None:
    path = str(tmp_path / "shared.db")
    SQLiteLedger(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_rows, args=(path, f"p{i}")) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert SQLiteLedger(path).query("SELECT COUNT(*) FROM calls")[0][0] == 300


def test_html_report_renders_in_a_real_browser(tmp_path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        service_missing("no chromium: apt-get install chromium")
    ledger = tmp_path / "demo.db"
    html_path = tmp_path / "report.html"
    assert main(["replay", *bundled_sessions(), "--ledger", str(ledger), "--json", "--compact"]) == 0
    assert main(["report", "--ledger", str(ledger), "--html", str(html_path)]) == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    dom = subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path}/profile-dom", "--dump-dom",
                          html_path.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = dom[dom.index("<body"):dom.index(">", dom.index("<body"))]
    assert 'data-rendered="yes"' in body and 'data-errors="0"' in body
    assert 'data-charts="4"' in body and 'data-calls="93"' in body
    bars = int(body.split('data-bars="')[1].split('"')[0])
    assert bars >= 10
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    screenshot = artifacts / "report.png"
    subprocess.run([chromium, *flags, f"--user-data-dir={tmp_path}/profile-shot", f"--screenshot={screenshot}",
                    "--window-size=1000,1600", html_path.as_uri()], capture_output=True, timeout=120, check=True)
    assert screenshot.stat().st_size > 10_000
    assert json.loads(dom.split('id="report-data">')[1].split("</script>")[0])["totals"]["calls"] == 93
    assert Path(html_path).read_text().count("http") == 0  # nothing fetched from a network


@pytest.mark.parametrize("error", [asyncio.CancelledError("x"), StreamLeft("x"), ClientDisconnected("x"),
                                   KeyboardInterrupt(), GeneratorExit(), SystemExit(1), ConnectionError("x"),
                                   TimeoutError("x"), litellm.RateLimitError("x", "openai", "gpt-4o"), None],
                         ids=lambda e: type(e).__name__)
def test_a_row_s_ending_reads_the_same_live_from_its_error_name_and_in_sql(error: BaseException | None) -> None:
    """How a call ended is decided live from its error (``errors.ending``), and for a row written
    without ``ended`` (an older version's) from the error's name, in Python (``legacy_ending``: the
    spool, ``LedgerRecord``) and in SQL (``ENDED``: the report): the three agree on every way a call
    is stopped, and on failures."""
    import sqlite3

    name = None if error is None else type(error).__name__
    with sqlite3.connect(":memory:") as db:
        in_sql = db.execute(f"SELECT {ENDED} FROM (SELECT NULL AS ended, ? AS error)", (name,)).fetchone()[0]
    assert ending(error) == legacy_ending(name) == in_sql
    assert in_sql == ("complete" if error is None else "failed" if isinstance(error, Exception) else "stopped")


def test_every_name_a_stopped_call_is_read_by_is_an_error_that_stops_it() -> None:
    """``STOPPED_BY``, the names a legacy row is read as stopped by, are exactly the errors
    ``errors.ending`` calls stopped."""
    stopped = {asyncio.CancelledError, StreamLeft, ClientDisconnected, KeyboardInterrupt, GeneratorExit, SystemExit}
    assert STOPPED_BY == {kind.__name__ for kind in stopped}
    assert all(ending(kind()) == "stopped" for kind in stopped)


def test_a_row_ends_complete_exactly_when_it_has_no_error() -> None:
    """A row says how its call ended, and that agrees with its error: a row built with an error and
    no ``ended`` (or ``complete`` with an error, ``failed`` without) is refused, naming both."""
    assert LedgerRecord(ts=1.0, model="m", requested_model="m").ended == "complete"
    with pytest.raises(ValueError, match="ended 'complete' with error 'StreamLeft'"):
        LedgerRecord(ts=1.0, model="m", requested_model="m", error="StreamLeft")
    with pytest.raises(ValueError, match="ended 'failed' with error None"):
        LedgerRecord(ts=1.0, model="m", requested_model="m", ended="failed")
    with pytest.raises(ValueError, match="ended 'done' is none of"):
        LedgerRecord(ts=1.0, model="m", requested_model="m", ended="done")  # type: ignore[arg-type]


def test_two_deployments_of_one_model_are_told_apart_in_rows_report_and_spans(tmp_path, span_exporter, capsys,
                                                                              monkeypatch) -> None:
    """Two deployments of ``openai/gpt-3.5-turbo`` (one region down, refusing connections; one answering
    with the recorded reply): their rows share ``target`` and name the deployment each call was sent
    under, the report ranks and counts failures by deployment, and each attempt's span names its own.
    A call to a model id as itself names none, nor does a response-cache hit (sent nowhere)."""
    import socket

    from opentelemetry.trace import SpanKind

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with fault_server() as (base, _), socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused, and no one takes it
        deployments = {"openai-eu": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/healthy/v1"},
                       "openai-us": {"model": "openai/gpt-3.5-turbo",
                                     "api_base": f"http://127.0.0.1:{down.getsockname()[1]}/v1"}}
        p = Pipeline.from_config({"ledger": {"url": url},
                                  "routing": {"deployments": deployments,
                                              "aliases": {"pool": ["openai-us", "openai-eu"], "plain": ["gpt-4o-mini"]},
                                              "fallback": {"backoff_s": 0.0, "max_backoff_s": 0.0}}})
        with pytest.raises(litellm.exceptions.InternalServerError, match="Connection error"):  # litellm's name
            p.completion(model="openai-us", messages=MESSAGES, max_retries=0, context={"cache": False})
        for _ in range(2):  # the second is a hit of the first's answer
            assert p.completion(model="pool", messages=MESSAGES, temperature=0).choices[0].message.content
        p.completion(model="plain", messages=MESSAGES, mock_response="ok", context={"cache": False})
        p.close()
    with contextlib.closing(open_ledger(url)) as db:
        rows = db.query("SELECT requested_model, target, deployment, ended, cache_hit FROM calls ORDER BY ts")
        report, ranged = build_report(db), build_report(db, since=0.0, until=time.time() + 60)
    assert rows == [("openai-us", "openai/gpt-3.5-turbo", "openai-us", "failed", 0),
                    ("pool", "openai/gpt-3.5-turbo", "openai-eu", "complete", 0),
                    ("pool", None, None, "complete", 1),  # a hit was sent nowhere
                    ("plain", "gpt-4o-mini", None, "complete", 0)]
    assert [(r["key"], r["calls"], r["failed_calls"]) for r in report["by_target"]  # the hit: under the model
            if r["key"] != "gpt-4o-mini"] == [("openai/gpt-3.5-turbo", 2, 1), ("gpt-3.5-turbo-0125", 1, 0)]  # that
    # answered it, not a target it was never sent to
    for each in (report, ranged):  # calls sent under a name of their own only, with a time range too
        assert sorted((r["key"], r["calls"], r["failed_calls"]) for r in each["by_deployment"]) == [
            ("openai-eu", 1, 0), ("openai-us", 1, 1)]
    clients = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [s.attributes.get("router_middleware.deployment") for s in clients] == [
        "openai-us", "openai-us", "openai-eu", None]
    monkeypatch.setenv("COLUMNS", "160")
    code = main(["report", "--ledger", url])
    lines = [line.strip() for line in capsys.readouterr().out.splitlines()]
    assert code == 0 and "failed calls by target: openai/gpt-3.5-turbo 1 of 2 (the ledger's error column says why)" in lines
    assert "failed calls by deployment: openai-us 1 of 1 (the ledger's error column says why)" in lines
    assert "by deployment" in lines  # the ranking's table


def test_an_alias_target_that_is_a_deployment_named_as_its_model_is_sent_there(tmp_path, monkeypatch) -> None:
    """A deployment may be named as the model it serves: reached through an alias it is still the
    deployment (its endpoint, its name in the row), as when it is called by its name."""
    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    model = "openai/gpt-3.5-turbo"
    with fault_server() as (base, seen):
        p = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}, "routing": {
            "deployments": {model: {"model": model, "api_base": f"{base}/healthy/v1"}}, "aliases": {"pool": [model]}}})
        for name in (model, "pool"):
            assert p.completion(model=name, messages=MESSAGES).choices[0].message.content
        p.close()
    assert seen["healthy:ok"] == 2
    with contextlib.closing(open_ledger(url)) as db:
        assert db.query("SELECT requested_model, deployment FROM calls ORDER BY ts") == [(model, model), ("pool", model)]


def _old_ledger(path: Path, version: int, **columns: Any) -> Path:
    """A SQLite ledger at schema ``version``, as an older release left it, with one row (``old``)."""
    import sqlite3

    row = {"call_id": "old", "ts": 1.0, "source": "live", "requested_model": "m", "model": "m", "input_tokens": 1,
           "cached_tokens": 0, "cache_write_tokens": 0, "output_tokens": 1, "reasoning_tokens": 0, "cache_hit": 0,
           "decisions": "[]", "saved_routing_usd": 0.0, "saved_context_usd": 0.0, "saved_cache_usd": 0.0,
           "saved_reasoning_usd": 0.0, **columns}
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in MIGRATIONS[:version]:
        raw.execute(statement)
    raw.execute(f"INSERT INTO schema_version (version) VALUES ({version})")
    raw.execute(f"INSERT INTO calls ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})", tuple(row.values()))
    raw.close()
    return path


def test_rows_written_before_the_deployment_column_have_none_and_no_deployment_ranking(tmp_path, capsys) -> None:
    """A ledger of schema version 7 (no ``deployment``) gains the column; its rows have none, and a
    report of calls sent to model ids alone has no deployment ranking (in JSON, tables and HTML)."""

    from router_middleware.cli.tables import print_report
    from router_middleware.ledger import render_html

    path = _old_ledger(tmp_path / "v7.db", 7, target="m")
    with contextlib.closing(open_ledger(str(path))) as db:
        assert db.query("SELECT call_id, deployment FROM calls") == [("old", None)]
        assert db.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)]
        report = build_report(db)
        db.insert([LedgerRecord(ts=2.0, model="gpt-4o-mini", requested_model="cheap", target="openai/gpt-4o-mini",
                                deployment="cheap")])
        named = build_report(db)
    assert report["by_deployment"] == [] and "By deployment" not in render_html(report)
    print_report(report)
    assert "by deployment" not in capsys.readouterr().out
    assert [(r["key"], r["calls"]) for r in named["by_deployment"]] == [("cheap", 1)]
    assert "By deployment" in render_html(named)
    print_report(named)
    assert "by deployment" in capsys.readouterr().out


def test_a_trimmed_call_s_saving_is_what_the_provider_would_have_billed_the_untouched_history_less_what_it_did(
        tmp_path) -> None:
    """The 73 calls of a recorded DeepSeek agent session, sent as the agent sent them and through the
    default window, to a model on loopback that caches prompt prefixes as DeepSeek does. A call's
    context saving was the tokens kept out at the cache-read price: the cut that first breaks the cached
    prefix costs its call more than the untouched history (the tail after the cut is billed uncached),
    yet its row said it saved, and its baseline was more than twice what the untouched call cost. Now
    each trimmed call's baseline is within 10% of what the untouched call was billed, a call the trim
    made dearer has a negative saving, and the session's baseline is within 3% of the untouched total."""
    import sqlite3

    from .prefix_cache_server import bill_session, session_requests

    requests = session_requests()
    billed = bill_session
    untouched = billed(Pipeline())
    url = tmp_path / "ledger.db"
    pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{url}"}, "cache": {"enabled": False}})
    sent = billed(pipeline)
    pipeline.close()
    rows = sqlite3.connect(url).execute(
        "SELECT step, cost_usd, baseline_cost_usd, saved_context_usd, decisions FROM calls ORDER BY step").fetchall()
    assert [r[0] for r in rows] == list(range(len(requests))) and [r[1] for r in rows] == pytest.approx(sent)
    trimmed = [(step, baseline, saved) for step, _, baseline, saved, decisions in rows if "window:trim" in decisions]
    assert len(trimmed) > 20
    for step, baseline, saved in trimmed:
        assert baseline == pytest.approx(untouched[step], rel=0.1), step
        if sent[step] > untouched[step] * 1.05:
            assert saved < 0, step
    assert any(sent[step] > untouched[step] * 1.05 for step, _, _ in trimmed)  # a cut that broke the cache
    assert sum(r[2] for r in rows) == pytest.approx(sum(untouched), rel=0.03)


def test_on_an_endpoint_that_caches_nothing_a_trimmed_call_s_saving_is_measured_uncached(tmp_path) -> None:
    """The same session on an OpenAI-compatible endpoint that caches nothing (a trial: a Cline loop
    whose trimming cut the bill by three quarters had 20 of 30 rows saying it cost more): the
    untouched history was priced as read from a cache the endpoint never reported. Now the cache is
    assumed only where the target's provider has reported a read."""
    import sqlite3

    from .prefix_cache_server import bill_session

    untouched = bill_session(Pipeline(), caches=False)
    url = tmp_path / "ledger.db"
    pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{url}"}, "cache": {"enabled": False}})
    sent = bill_session(pipeline, caches=False)
    pipeline.close()
    rows = sqlite3.connect(url).execute(
        "SELECT step, baseline_cost_usd, saved_context_usd, decisions FROM calls ORDER BY step").fetchall()
    trimmed = [(step, baseline, saved) for step, baseline, saved, decisions in rows if "window:trim" in decisions]
    assert len(trimmed) > 20
    for step, baseline, saved in trimmed:
        assert baseline == pytest.approx(untouched[step], rel=0.1), step
        assert saved > 0 and sent[step] < untouched[step], step  # nothing cached: every cut pays
    assert sum(r[1] for r in rows) == pytest.approx(sum(untouched), rel=0.03)


def test_the_first_call_of_a_resumed_session_is_measured_against_an_uncached_history(tmp_path) -> None:
    """A session resumed at step 40 (39 turns no request of which was sent lately): its first
    trimmed call's baseline took the turns before its last assistant message as read from the
    provider's cache, half what the untouched call was billed, and the row said the trim made the
    call dearer. Nothing of the conversation was sent lately, so the provider had none of it cached."""
    import sqlite3

    from .prefix_cache_server import bill_session

    untouched = bill_session(Pipeline(), start=40)
    url = tmp_path / "ledger.db"
    pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{url}"}, "cache": {"enabled": False}})
    bill_session(pipeline, start=40)
    pipeline.close()
    rows = sqlite3.connect(url).execute(
        "SELECT baseline_cost_usd, saved_context_usd, decisions FROM calls ORDER BY step").fetchall()
    assert "window:trim" in rows[0][2] and rows[0][1] > 0
    assert rows[0][0] == pytest.approx(untouched[0], rel=0.1)
    assert sum(r[0] for r in rows) == pytest.approx(sum(untouched), rel=0.03)


def test_a_conversation_is_taken_as_cached_only_by_the_target_that_answered_it_lately(monkeypatch) -> None:
    """A session that moved to another model was priced as read from that model's cache, which never
    saw it; so was one moved to another deployment of the same model (another endpoint, another
    cache); a conversation without a session id whose first request had no system message was cold on
    its second; a full table (10,000 conversations sent within five minutes) was wiped, every
    conversation cold again."""
    from router_middleware import engine
    from router_middleware.types import Plan

    now = [1000.0]
    monkeypatch.setattr(engine.time, "monotonic", lambda: now[0])
    pipeline = Pipeline()
    task = {"role": "user", "content": "Fix the failing test."}
    turn = [task, {"role": "assistant", "content": "Done?"}, {"role": "user", "content": "Not yet."}]
    session = Plan.from_call(pipeline.make_call("gpt-4o-mini", [task], {"session_id": "S"}, {}))
    assert not pipeline._sent_lately(session)
    pipeline.sent(session)
    assert pipeline._sent_lately(session)
    assert not pipeline._sent_lately(session.override(model="deepseek/deepseek-chat"))  # its own cache
    east, west = session.override(deployment="east"), session.override(deployment="west")
    pipeline.sent(east)
    assert pipeline._sent_lately(east) and not pipeline._sent_lately(west)
    first, second = (Plan.from_call(pipeline.make_call("gpt-4o-mini", m, None, {})) for m in ([task], turn))
    pipeline.sent(first)
    assert pipeline._sent_lately(second)
    now[0] += engine.PROMPT_CACHE_S + 1
    assert not pipeline._sent_lately(second)  # the provider no longer holds it
    pipeline.sent(second)
    for i in range(engine._CONVERSATIONS - len(pipeline._sent)):
        pipeline._sent[("m", i)] = now[0]  # sent just now, after it
    least_recent = next(iter(pipeline._sent))
    pipeline.sent(second)  # answered again: the most recent
    pipeline.sent(Plan.from_call(pipeline.make_call("gpt-4o-mini", [task], {"session_id": "S2"}, {})))
    assert len(pipeline._sent) == engine._CONVERSATIONS  # the least recently sent went, no other
    assert least_recent not in pipeline._sent and ("m", 0) in pipeline._sent
    assert pipeline._sent_lately(second)


def test_the_cache_breakpoints_a_call_got_are_its_context_saving_on_anthropic() -> None:
    """Anthropic caches only what a ``cache_control`` mark ends: an agent's calls without marks are
    billed in full, and the breakpoints the pipeline adds make the first call dearer (the write
    premium) and the next ones cheaper. Each row's baseline was its cost and its saving 0. Now the
    saving is what the unmarked call would have been billed less what the marked one was."""
    import sqlite3
    import tempfile

    from .prefix_cache_server import bill_agent

    billed = bill_agent
    untouched = billed(Pipeline())
    with tempfile.TemporaryDirectory() as folder:
        url = f"{folder}/ledger.db"
        pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{url}"}, "cache": {"enabled": False}})
        sent = billed(pipeline)
        pipeline.close()
        rows = sqlite3.connect(url).execute(
            "SELECT cost_usd, baseline_cost_usd, saved_context_usd, decisions FROM calls ORDER BY step").fetchall()
    assert all("cache-breakpoints:breakpoints" in r[3] for r in rows) and [r[0] for r in rows] == pytest.approx(sent)
    assert [r[1] for r in rows] == pytest.approx(untouched, rel=0.02)
    assert rows[0][2] < 0 < min(r[2] for r in rows[1:])  # the first write, then the reads


def test_a_call_s_user_is_in_its_row_and_the_report_ranks_tenants_and_users(ledger_url, tmp_path, capsys) -> None:
    """Budgets could be scoped by user, but no row said whose a call was: the report could not show what
    each user spent. A row now has the call's ``user`` label (``user_id``), and the report ranks tenants
    and users (the ``top`` costliest, as sessions; the calls that named none are a group of their own)."""
    from router_middleware.cli.tables import print_report
    from router_middleware.ledger import render_html

    pipeline = Pipeline.from_config({"app": "coder", "ledger": {"url": ledger_url}})
    for user, tenant, times in (("ann", "acme", 3), ("bo", "acme", 1), ("cy", "initech", 2), (None, None, 1),
                                ("dee", "umbrella", 4)):
        for _ in range(times):  # dee's model has no price: her calls' cost is unknown, ranked last
            pipeline.completion(model="openai/in-house-7b" if user == "dee" else "gpt-4o-mini", messages=MESSAGES,
                                mock_response="ok", context={"user": user, "tenant": tenant})
    pipeline.close()
    with contextlib.closing(open_ledger(ledger_url)) as db:
        rows = db.query("SELECT user_id, tenant, COUNT(*) FROM calls GROUP BY user_id, tenant ORDER BY user_id")
        report, top = build_report(db), build_report(db, top=1)
    assert sorted(rows, key=str) == sorted([("ann", "acme", 3), ("bo", "acme", 1), ("cy", "initech", 2),
                                            (None, None, 1), ("dee", "umbrella", 4)], key=str)
    assert [(r["key"], r["calls"]) for r in report["by_user"]] == [("ann", 3), ("cy", 2), ("bo", 1), (None, 1),
                                                                  ("dee", 4)]  # None: the calls that named none
    assert [(r["key"], r["calls"]) for r in report["by_tenant"]] == [("acme", 4), ("initech", 2), (None, 1),
                                                                    ("umbrella", 4)]
    assert [r["key"] for r in top["by_user"]] == ["ann"] and [r["key"] for r in top["by_tenant"]] == ["acme"]
    print_report(report)
    out = capsys.readouterr().out
    assert "by tenant" in out and "by user" in out and "<h2>By user</h2><table><thead><tr><th>user</th>" in render_html(report)


def test_rows_written_before_the_user_column_have_none_and_no_user_ranking(tmp_path) -> None:
    """A ledger of schema version 8 gains ``user_id``; its rows have none, and its report no user or
    tenant ranking while no call had one."""
    path = _old_ledger(tmp_path / "v8.db", 8)
    with contextlib.closing(open_ledger(str(path))) as db:
        assert db.query("SELECT call_id, user_id FROM calls") == [("old", None)]
        assert db.query("SELECT version FROM schema_version") == [(len(MIGRATIONS),)] == [(9,)]
        report = build_report(db)
    assert report["by_user"] == [] and report["by_tenant"] == []


def test_a_report_cut_to_one_tenant_or_user_counts_only_its_calls(ledger_url, capsys) -> None:
    """``report --user ann`` (or ``--tenant``, ``--app``): a team lead's view of one developer's spend, by
    model, target and session, beside the whole ledger's ranking by user."""
    from router_middleware.cli import main
    from router_middleware.cli.tables import print_report
    from router_middleware.ledger import render_html

    pipeline = Pipeline.from_config({"app": "coder", "ledger": {"url": ledger_url}})
    for user, tenant, times in (("ann", "acme", 2), ("bo", "acme", 1), ("cy", "initech", 1)):
        for _ in range(times):
            pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok",
                                context={"user": user, "tenant": tenant, "session_id": f"{user}-run"})
    pipeline.close()
    with contextlib.closing(open_ledger(ledger_url)) as db:
        whole = {r["key"]: r for r in build_report(db)["by_user"]}
        ann, acme = build_report(db, user="ann"), build_report(db, tenant="acme", app="coder")
        nobody = build_report(db, user="nobody")
    assert ann["only"] == {"user": "ann"} and ann["totals"]["calls"] == 2
    assert ann["totals"]["cost_usd"] == pytest.approx(whole["ann"]["cost_usd"])
    assert [r["key"] for r in ann["by_session"]] == ["ann-run"] and [r["key"] for r in ann["by_user"]] == ["ann"]
    assert acme["totals"]["calls"] == 3 and nobody["totals"]["calls"] == 0
    capsys.readouterr()  # the calls' own log lines, where an earlier test had structlog print them
    print_report(ann)
    assert capsys.readouterr().out.startswith("2 calls of user ann,")
    assert "<p>2 calls of user ann," in render_html(ann)
    assert main(["report", "--ledger", ledger_url, "--user", "nobody"]) == 0
    assert "0 calls: the ledger has none of user 'nobody'" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("url", ["sqlite://ledger.db", "sqlite:///ledger.db", "ledger.db"])
def test_a_sqlite_ledger_url_opens_the_file_it_names(tmp_path, monkeypatch, url) -> None:
    """As a store reads it: ``sqlite://ledger.db`` (as the CLI's ``--ledger`` takes it, where no config
    refuses it) opened the file ``edger.db``, its first character cut off as the third slash."""
    monkeypatch.chdir(tmp_path)
    open_ledger(url).close()
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.db"]


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_a_sqlite_ledger_url_with_no_file_is_refused(url) -> None:
    with pytest.raises(LedgerError, match="names no file"):
        open_ledger(url)


def test_a_postgresql_server_that_never_answers_fails_a_try_within_the_writer_s_wait() -> None:
    """A server that takes the connection and says nothing held each try 10 s, whatever ``wait_s`` said."""
    pytest.importorskip("psycopg")
    import socket

    from router_middleware.ledger.store import PostgresLedger

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever answers
        url = f"postgresql://u@127.0.0.1:{silent.getsockname()[1]}/ledger"
        began = time.monotonic()
        with pytest.raises(Exception, match="timeout"):  # noqa: B017 - psycopg's OperationalError
            PostgresLedger(url, wait_s=2)
        assert time.monotonic() - began < 7  # 2 s asked; 10 s before
