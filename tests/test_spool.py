"""The ledger's spool: a row the database rejects is quarantined and the rest written, a spool cut
off by a crash is read tolerantly, and a dead worker's spool is drained by another process (real
SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

from router_middleware.cli import main
from router_middleware.ledger.record import LedgerRecord
from router_middleware.ledger.spool import QUARANTINE, default_spool
from router_middleware.ledger.store import open_ledger
from router_middleware.ledger.writer import LedgerWriter

from .test_ledger import ledger_url  # noqa: F401 - the fixture, over SQLite and PostgreSQL


def _row(call_id: str, **fields: object) -> LedgerRecord:
    return LedgerRecord(ts=1.0, model="m", requested_model="m", call_id=call_id, **fields)  # type: ignore[arg-type]


def _count(url: str) -> int:
    db = open_ledger(url)
    try:
        return int(db.query("SELECT COUNT(*) FROM calls")[0][0])
    finally:
        db.close()


def _quarantined(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / QUARANTINE).read_text().splitlines()]


def test_a_row_the_database_rejects_is_quarantined_and_the_rest_written(ledger_url, tmp_path) -> None:  # noqa: F811
    poison = "\x00" if ledger_url.startswith("postgres") else "\udc80"  # what each database refuses
    folder = tmp_path / "spool"
    writer = LedgerWriter(ledger_url, spool=folder, retries=1)
    for i in range(26):
        writer.append(_row(f"a{i}", session=poison if i == 5 else "s"))
    writer.flush()
    for i in range(20):  # the ledger goes on: later rows are written
        writer.append(_row(f"b{i}", session="s"))
    writer.close()
    assert _count(ledger_url) == 45
    (entry,) = _quarantined(folder)
    assert entry["row"]["call_id"] == "a5" and entry["reason"]
    assert not list(folder.glob("rows-*.jsonl"))  # nothing left waiting


def test_a_spool_cut_off_by_a_crash_is_read_tolerantly(tmp_path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    rows = [json.dumps(asdict(_row(f"c{i}"))) for i in range(3)]
    gone = folder / "rows-999999999.jsonl"  # a process that no longer exists
    gone.write_bytes(("\n".join(rows) + "\n" + rows[0][:40] + "\n").encode() + b"\xff\xfe{}\n")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    writer = LedgerWriter(url, spool=folder)
    for i in range(20):
        writer.append(_row(f"d{i}"))
    writer.close()
    assert _count(url) == 23
    reasons = [entry["reason"] for entry in _quarantined(folder)]
    assert len(reasons) == 2 and "line 4" in reasons[0] and "line 5" in reasons[1]
    assert not gone.exists()


def test_rows_spooled_by_another_version_are_written(tmp_path) -> None:
    """An older version's rows (no ``ended``) are read from their error; a newer version's columns
    this one lacks are dropped, said in a warning, and the rows written, never quarantined."""
    import structlog

    folder = tmp_path / "spool"
    folder.mkdir()
    older = {k: v for k, v in asdict(_row("old", error="CancelledError", ended="stopped")).items() if k != "ended"}
    newer = {**asdict(_row("new", error="APIConnectionError", ended="failed")), "future_column": 1}
    (folder / "rows-999999999.jsonl").write_text(json.dumps(older) + "\n" + json.dumps(newer) + "\n")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with structlog.testing.capture_logs() as logs:
        writer = LedgerWriter(url, spool=folder)
        writer.append(_row("now"))
        writer.close()
    db = open_ledger(url)
    try:
        assert db.query("SELECT call_id, ended FROM calls ORDER BY call_id") == [
            ("new", "failed"), ("now", "complete"), ("old", "stopped")]
    finally:
        db.close()
    assert [e["fields"] for e in logs if e["event"] == "ledger_spool_fields_dropped"] == [["future_column"]]
    assert not (folder / QUARANTINE).exists()


def _spool_and_exit(url: str, folder: str) -> None:
    """A worker whose database is down the whole time: its rows go to its spool, then it exits."""
    class Down:
        def __init__(self, url: str) -> None:
            raise OSError("connection refused")

    writer = LedgerWriter(url, spool=folder, retries=1, opener=Down)  # type: ignore[arg-type]
    for i in range(50):
        writer.append(_row(f"w{i}"))
    writer.close()


def test_a_dead_workers_spool_is_drained_by_another_process(ledger_url, tmp_path, capsys) -> None:  # noqa: F811
    folder = tmp_path / "spool"
    worker = multiprocessing.get_context("spawn").Process(target=_spool_and_exit, args=(ledger_url, str(folder)))
    worker.start()
    worker.join(120)
    assert worker.exitcode == 0 and len(list(folder.glob("rows-*.jsonl"))) == 1
    live = folder / f"rows-{os.getppid()}.jsonl"  # a process that still runs keeps its own rows
    live.write_text(json.dumps(asdict(_row("live"))) + "\n")
    assert main(["ledger", "drain", "--ledger", ledger_url, "--spool", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "50 rows written" in out and f"1 row left to process {os.getppid()}" in out
    assert _count(ledger_url) == 50 and live.exists()


def test_a_drain_counts_a_row_the_ledger_held_already_once_not_as_written(ledger_url, tmp_path,  # noqa: F811
                                                                        capsys) -> None:
    """A spool's line repeated, or a row the ledger held already (a drain cut short, run again), was
    counted as written: "3 rows written" for one new row."""
    folder = tmp_path / "spool"
    folder.mkdir()
    db = open_ledger(ledger_url)
    db.insert([_row("old")])
    db.close()
    lines = [json.dumps(asdict(_row(call_id))) for call_id in ("old", "new", "new")]
    writer = subprocess.Popen(["true"])  # a writer that has exited: its spool is anyone's to drain
    writer.wait()
    (folder / f"rows-{writer.pid}.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["ledger", "drain", "--ledger", ledger_url, "--spool", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1 row written from") and "(2 more it held already: each kept once)" in out
    assert _count(ledger_url) == 2 and not list(folder.glob("rows-*"))


def test_drain_names_a_spool_folder_given_that_is_not_there(tmp_path, capsys) -> None:
    """A --spool typed by hand that does not exist is an error naming it, and so is a --ledger with
    neither a database nor a spool there (a typo); a ledger that never spooled has nothing to drain."""
    ledger = f"sqlite:///{tmp_path}/l.db"
    assert main(["ledger", "drain", "--ledger", ledger, "--spool", str(tmp_path / "spoool")]) == 2
    assert f"--spool {tmp_path / 'spoool'}: no such folder" in capsys.readouterr().err
    assert main(["ledger", "drain", "--ledger", ledger]) == 2
    assert f"no ledger at '{tmp_path}/l.db' (file not found; a pipeline writes it with its first row" in capsys.readouterr().err
    open_ledger(ledger).close()
    assert main(["ledger", "drain", "--ledger", ledger]) == 0
    assert "nothing to drain: no spool folder at" in capsys.readouterr().out


def test_drain_of_a_server_ledger_with_no_spool_has_nothing_to_drain(tmp_path, monkeypatch, capsys) -> None:
    """Only a SQLite path is checked for a typo: a PostgreSQL ledger is not connected to (it may be
    down, or its extra not installed here) when there is nothing to write to it."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert main(["ledger", "drain", "--ledger", "postgresql://nobody@127.0.0.1:1/none"]) == 0
    assert "nothing to drain: no spool folder at" in capsys.readouterr().out


def test_the_spool_lives_beside_a_sqlite_ledger_and_never_names_a_password(tmp_path, monkeypatch) -> None:
    assert default_spool(f"sqlite:///{tmp_path}/l.db") == Path(f"{tmp_path}/l.db.spool")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    found = default_spool("postgresql://app:s3cret@db:5432/ledger")
    assert found.parent == tmp_path / "router-middleware" / "spool" and "s3cret" not in str(found)
    assert found == default_spool("postgresql://app:other@db:5432/ledger")  # one folder per ledger


def test_rows_neither_the_database_nor_the_spool_takes_wait_in_memory_and_the_writer_lives_on(tmp_path) -> None:
    """The spool's folder cannot be made (its parent is a file) while the database is down: the writer
    thread died, every later row was lost and ``close()`` waited its 30 s. Now the rows wait in memory
    and are written once the database answers; those still waiting at ``close()`` are logged as lost."""
    import structlog

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    (tmp_path / "afile").write_text("a file, not a folder")
    down = [True]

    def opener(target: str):
        if down[0]:
            raise ConnectionError("the database is down")
        return open_ledger(target)

    writer = LedgerWriter(url, spool=tmp_path / "afile" / "spool", retries=1, opener=opener)
    with structlog.testing.capture_logs() as logs:
        for i in range(3):
            writer.append(_row(f"a{i}"))
            writer.flush(timeout_s=10)
        assert writer.alive
        down[0] = False
        writer.append(_row("b0"))
        writer.close(timeout_s=10)
    assert _count(url) == 4
    assert [e["rows"] for e in logs if e["event"] == "ledger_rows_held"] == [1, 2, 3]
    down[0] = True
    with structlog.testing.capture_logs() as logs:
        writer.append(_row("c0"))
        writer.close(timeout_s=10)
    assert [(e["event"], e["rows"]) for e in logs if e["event"] == "ledger_rows_lost"] == [("ledger_rows_lost", 1)]


def test_a_pipeline_closed_by_one_coroutine_records_the_calls_of_the_next(tmp_path) -> None:
    """README: a coroutine done with the pipeline awaits ``aclose()``; the next ``asyncio.run`` using the
    same pipeline had its calls answered and their rows dropped without a word (also after ``close()``)."""
    import asyncio

    from router_middleware import Pipeline

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"ledger": {"url": url}})

    async def job(text: str) -> None:
        await pipeline.acompletion("gpt-4o-mini", [{"role": "user", "content": text}], mock_response="ok")
        await pipeline.aclose()

    asyncio.run(job("one"))
    asyncio.run(job("two"))
    pipeline.completion("gpt-4o-mini", [{"role": "user", "content": "three"}], mock_response="ok")
    pipeline.close()
    assert _count(url) == 3


def test_a_full_ledger_database_spools_its_rows_and_writes_them_once_it_has_room(tmp_path) -> None:
    """A full disk is an outage, not bad rows: the database still answers ``SELECT 1``, so its rows were
    quarantined (where no drain writes them) behind a "cannot rollback" error that hid SQLITE_FULL. Now
    they wait in the spool and are written once there is room (the disk filled: ``max_page_count``)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    open_ledger(url).close()
    folder, full = tmp_path / "spool", [True]

    def opener(target: str):
        db = open_ledger(target)
        if full[0]:
            pages = db.query("PRAGMA page_count")[0][0]
            db.query(f"PRAGMA max_page_count = {pages}")
        return db

    writer = LedgerWriter(url, spool=folder, retries=1, opener=opener)
    for i in range(50):
        writer.append(_row(f"a{i}", session="s" * 2000))
    writer.flush()
    assert not (folder / QUARANTINE).exists()
    assert list(folder.glob("rows-*.jsonl")) and _count(url) == 0
    full[0] = False
    writer.append(_row("b0"))
    writer.close()
    assert _count(url) == 51 and not list(folder.glob("rows-*.jsonl"))


@pytest.mark.parametrize("spooled_before", [False, True], ids=["inserting", "draining"])
def test_rows_a_writer_still_holds_when_close_gives_up_are_left_to_the_spool(tmp_path, spooled_before) -> None:
    """Another process holds the SQLite ledger locked: ``close()`` gave up while the writer thread waited
    on the lock with its batch, which was in neither the spool nor the rows logged as lost, and the
    process exited with them. Now the batch and the rows queued behind it are spooled (to a file of
    their own when the writer is stuck draining the spool); once the lock is gone the writer's own
    insert and a drain keep each row once."""
    import sqlite3

    import structlog

    from router_middleware.ledger.spool import Spool

    path = tmp_path / "ledger.db"
    url, folder = f"sqlite:///{path}", tmp_path / "spool"
    writer = LedgerWriter(url, spool=folder)
    writer.append(_row("warm"))
    writer.flush()  # its database is open
    if spooled_before:
        Spool(folder).add([_row("old")])
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    with structlog.testing.capture_logs() as logs:
        for i in range(3):
            writer.append(_row(f"a{i}"))
        writer.close(timeout_s=0.5)
    spooled = [json.loads(line)["call_id"] for f in folder.glob("rows-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(spooled) == ["a0", "a1", "a2"]
    assert len(list(folder.glob("rows-*-*.jsonl"))) == spooled_before  # the writer holds the spool's lock
    assert [(e["event"], e["rows"]) for e in logs if e["event"].startswith("ledger_rows")] == [("ledger_rows_spooled", 3)]
    locker.execute("ROLLBACK")
    locker.close()
    writer._thread.join(60)
    assert not writer.alive
    reader = LedgerWriter(url, spool=folder)
    reader.flush_spool()
    reader.close()
    assert _count(url) == 4 + spooled_before and not list(folder.glob("rows-*.jsonl"))


def test_a_process_that_exits_without_close_spools_what_its_writer_still_holds(tmp_path) -> None:
    """No ``close()``: at exit the writer had 5 s to finish; one stuck on a locked ledger lost its
    rows with the process. Now they are spooled, and a later drain writes them."""
    import sqlite3
    import subprocess
    import sys

    path = tmp_path / "ledger.db"
    url, folder = f"sqlite:///{path}", tmp_path / "spool"
    open_ledger(url).close()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    child = ("from router_middleware.ledger.record import LedgerRecord\n"
             "from router_middleware.ledger.writer import LedgerWriter\n"
             f"w = LedgerWriter({url!r}, spool={str(folder)!r})\n"
             "for i in range(2): w.append(LedgerRecord(ts=1.0, model='m', requested_model='m', call_id=f'x{i}'))\n")
    subprocess.run([sys.executable, "-c", child], check=True, timeout=120)
    locker.execute("ROLLBACK")
    locker.close()
    spooled = [json.loads(line)["call_id"] for f in folder.glob("rows-*.jsonl") for line in f.read_text().splitlines()]
    assert sorted(spooled) == ["x0", "x1"]
    reader = LedgerWriter(url, spool=folder)
    reader.flush_spool()
    reader.close()
    assert _count(url) == 2


def test_rows_a_process_was_draining_from_its_spool_when_it_exited_are_drained_later(tmp_path) -> None:
    """The writer drains its spool before its next insert: a drain claims the file by renaming it
    (``rows-<pid>.jsonl.<pid>-<id>.draining``) and waits on a locked ledger; the process exits. Its queued
    rows went to the spool, but the claimed file stayed, and no drain ever read it again (its rows
    were neither written nor logged as lost). Now a later drain takes the claim of a process that is
    gone back, and writes its rows."""
    import subprocess
    import sys

    path = tmp_path / "ledger.db"
    url, folder = f"sqlite:///{path}", tmp_path / "spool"
    child = ("import sqlite3, time\n"
             "from router_middleware.ledger.record import LedgerRecord\n"
             "from router_middleware.ledger.spool import Spool\n"
             "from router_middleware.ledger.writer import LedgerWriter\n"
             "def row(i): return LedgerRecord(ts=1.0, model='m', requested_model='m', call_id=i)\n"
             f"w = LedgerWriter({url!r}, spool={str(folder)!r}, wait_s=30)\n"  # still draining at exit
             "w.append(row('first'))\n"
             "assert w.flush()\n"
             f"Spool({str(folder)!r}).add([row('old0'), row('old1')])\n"
             f"locker = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
             "locker.execute('BEGIN EXCLUSIVE')\n"
             "for i in range(2): w.append(row(f'x{i}'))\n"
             "time.sleep(0.5)\n"
             f"print(sorted(p.name for p in __import__('pathlib').Path({str(folder)!r}).iterdir()))\n")
    seen = subprocess.run([sys.executable, "-c", child], check=True, timeout=120, capture_output=True, text=True)
    assert "draining" in seen.stdout  # the writer was draining the spool when the process exited
    assert len(list(folder.glob("rows-*.draining"))) == 1  # and left the claimed file
    reader = LedgerWriter(url, spool=folder)
    reader.flush_spool()
    reader.close()
    assert _count(url) == 5 and not list(folder.glob("rows-*"))


def test_a_drain_another_writer_of_the_process_is_running_is_not_taken_back(tmp_path) -> None:
    """Two pipelines of one process on one ledger: each writer has a spool, and a lock, of its own.
    While one drains a file (its insert waiting on a locked ledger), the other's drain took that claim
    back as one whose drain had failed: its rows were written twice, and the first drain failed on the
    file it no longer had. Now a claim this process holds is left to it."""
    import threading
    import time

    from router_middleware.ledger.spool import Spool

    class Waiting:  # a ledger whose insert from the first drainer waits (another process holds its lock)
        def __init__(self) -> None:
            self.inserted: list[tuple[str, str]] = []
            self.gate = threading.Event()

        def insert(self, records, replace=False) -> None:
            if threading.current_thread().name == "first":
                self.gate.wait(10)
            self.inserted += [(threading.current_thread().name, r.call_id) for r in records]

        def query(self, sql, params=()) -> list:  # which rows it holds already: none
            return []

    folder = tmp_path / "spool"
    first, second = Spool(folder), Spool(folder)
    first.add([_row(f"c{i}") for i in range(3)])
    db, raised = Waiting(), []

    def drain() -> None:
        try:
            first.drain(db)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            raised.append(exc)

    drainer = threading.Thread(target=drain, name="first")
    drainer.start()
    for _ in range(200):
        if list(folder.glob("rows-*.draining")):
            break
        time.sleep(0.01)
    assert second.drain(db).written == 0
    db.gate.set()
    drainer.join(10)
    assert raised == [] and db.inserted == [("first", "c0"), ("first", "c1"), ("first", "c2")]
    assert not list(folder.glob("rows-*"))


def test_rows_neither_the_database_nor_the_spool_took_are_said_lost_at_exit_without_close(tmp_path) -> None:
    """A script that ends without ``close()`` (the README's RouterLogger example) lost the rows held in
    memory without a word: the last line said ``ledger_rows_held ... lost=0``. The exit hook says them
    lost, as ``close()`` does."""
    import structlog

    from router_middleware.ledger import writer as writers

    (tmp_path / "afile").write_text("a file, not a folder")
    writer = LedgerWriter(f"sqlite:///{tmp_path / 'ledger.db'}", spool=tmp_path / "afile" / "spool", retries=1,
                          opener=lambda target: (_ for _ in ()).throw(ConnectionError("the database is down")))
    with structlog.testing.capture_logs() as logs:
        for i in range(3):
            writer.append(_row(f"a{i}"))
        writers._flush_at_exit()
    lost = [e for e in logs if e["event"] == "ledger_rows_lost"]
    assert [e["rows"] for e in lost] == [3] and "exited" in lost[0]["why"]
    writer.close(timeout_s=10)


def _lock(url: str):  # noqa: ANN202 - a connection holding the ledger's table locked, and how to let it go
    if url.startswith("postgres"):
        import psycopg

        db = psycopg.connect(url)
        db.execute("LOCK TABLE calls IN ACCESS EXCLUSIVE MODE")  # psycopg opened a transaction
        return db.rollback, db.close
    import sqlite3

    db3 = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None)
    db3.execute("BEGIN EXCLUSIVE")
    return (lambda: db3.execute("ROLLBACK")), db3.close


def test_a_ledger_locked_by_another_session_has_the_rows_spooled_after_the_writers_tries_and_says_they_wait(
        ledger_url, tmp_path) -> None:  # noqa: F811
    """A PostgreSQL ledger another session holds locked (``LOCK TABLE``) kept the writer's batch waiting as
    long as the lock stood, with no log line, and a SQLite one 30 s a try: the rows sat in memory and
    ``flush()`` timed out. Now each try waits ``wait_s``, the batch goes to the spool after its tries,
    the wait is logged once it is longer than ``wait_s``, and the rows are written once the lock is gone."""
    import time

    import structlog

    folder = tmp_path / "spool"
    writer = LedgerWriter(ledger_url, spool=folder, retries=3, wait_s=0.5)
    writer.append(_row("warm"))
    assert writer.flush()  # its database is open
    release, close = _lock(ledger_url)
    try:
        with structlog.testing.capture_logs() as logs:
            writer.append(_row("a0"))
            deadline, n = time.monotonic() + 20, 0
            while not any(e["event"] == "ledger_write_waiting" for e in logs) and time.monotonic() < deadline:
                time.sleep(0.05)
                n += 1
                writer.append(_row(f"b{n}"))
            assert writer.flush(timeout_s=20)  # every try failed in time: spooled, not held
        events = [e["event"] for e in logs]
        assert "ledger_write_waiting" in events and "ledger_write_failed" in events
        spooled = sum(e["rows"] for e in logs if e["event"] == "ledger_rows_spooled")
        assert spooled == n + 1 and "ledger_rows_held" not in events
        waiting = next(e for e in logs if e["event"] == "ledger_write_waiting")
        assert waiting["waiting_s"] >= 0.5
    finally:
        release()
        close()
    writer.append(_row("after"))  # the lock is gone: the spool is drained before this row
    writer.close()
    assert _count(ledger_url) == n + 3 and not list(folder.glob("rows-*.jsonl"))


def test_a_flush_that_times_out_says_what_waits(tmp_path) -> None:
    import structlog

    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    writer = LedgerWriter(url, spool=tmp_path / "spool", wait_s=5.0)
    writer.append(_row("warm"))
    assert writer.flush()
    release, close = _lock(url)
    try:
        with structlog.testing.capture_logs() as logs:
            writer.append(_row("a0"))
            assert not writer.flush(timeout_s=0.3)
        (said,) = [e for e in logs if e["event"] == "ledger_flush_timed_out"]
        assert said["in_flight"] == 1 and said["waiting_s"] > 0
    finally:
        release()
        close()
    writer.close()
    assert _count(url) == 2


def test_an_exit_flush_run_again_waits_no_more_and_spools_each_row_once(tmp_path, monkeypatch) -> None:
    """A stream left open at exit is ended by its own exit hook, which flushes the ledger again: with the
    ledger locked, the writer was waited on twice (5 s each) and its batch in flight spooled twice."""
    import sqlite3

    from router_middleware.ledger import writer as writers

    path = tmp_path / "ledger.db"
    url, folder = f"sqlite:///{path}", tmp_path / "spool"
    writer = LedgerWriter(url, spool=folder)
    writer.append(_row("warm"))
    writer.flush()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    waits: list[float] = []
    flush = writer.flush
    monkeypatch.setattr(writer, "flush", lambda timeout_s=30.0: waits.append(timeout_s) or flush(0.5))
    try:
        for i in range(3):
            writer.append(_row(f"a{i}"))
        writers._flush_at_exit()
        writer.append(_row("ended-at-exit"))  # a call the exit ended after the first flush
        writers._flush_at_exit()
        spooled = [json.loads(line)["call_id"] for f in folder.glob("rows-*.jsonl")
                   for line in f.read_text().splitlines()]
        assert sorted(spooled) == ["a0", "a1", "a2", "ended-at-exit"]
        assert waits == [5.0]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
        writer.close(timeout_s=60)
