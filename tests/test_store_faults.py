"""A store that does not answer, on a real redis-server stopped, killed or hung (SIGSTOP) mid-run: a
budget's ``on_store_error: open`` (the default) lets the call through and still records it, ``closed``
refuses it with StoreUnavailable before any provider call; a reservation whose settlement never
reached the store stops holding the budget after its ``reservation_ttl_s``."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import litellm
import pytest

from router_middleware import BudgetExceeded, Pipeline, StoreUnavailable, outcome
from router_middleware.ledger.store import open_ledger

from .conftest import _free_port, service_missing
from .test_cache import calls_to_provider

MESSAGES = [{"role": "user", "content": "hi"}]


class RedisServer:
    """A redis-server of the test's own on a free port, that the test may kill, restart, or hang."""

    def __init__(self, folder: Path, *, aof: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("no redis-server: apt-get install redis-server")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        self.args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                     "--dir", str(folder)]
        self.process = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        import redis

        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                redis.Redis(port=self.port).ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        return self.process

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def redis_we_can_stop(tmp_path):
    server = RedisServer(tmp_path)
    yield server.url, server.process
    server.stop()


@pytest.fixture
def redis_with_aof(tmp_path):
    server = RedisServer(tmp_path, aof=True)
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_budget_store_stopped_mid_run(mode, redis_we_can_stop, tmp_path, monkeypatch) -> None:
    url, server = redis_we_can_stop
    sent = calls_to_provider(monkeypatch)
    budget = {"name": "team", "usd": 10.0, "scope": "global", **({"on_store_error": mode} if mode == "closed" else {})}
    pipeline = Pipeline.from_config({"store": url, "routing": {"budgets": [budget]}, "cache": {"enabled": False},
                                     "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}})
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")  # the store answers
    server.terminate()
    server.wait(timeout=10)
    if mode == "closed":
        with pytest.raises(StoreUnavailable, match="budget 'team': the store did not answer"):
            pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
        assert len(sent) == 1  # refused before any provider call
    else:
        answer = pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
        assert answer.choices[0].message.content == "ok" and len(sent) == 2
    pipeline.ledger.close()
    errors = [r[0] for r in open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}").query("SELECT error FROM calls")]
    assert errors == ([None, None] if mode == "open" else [None])  # a refused call made no provider call


def test_a_reservation_whose_settlement_failed_lapses_after_its_ttl(redis_with_aof, tmp_path, monkeypatch) -> None:
    """Redis (append-only, so it comes back with what it held) dies between a call's answer and its
    settlement: the answer is returned and recorded, and the reservation it left holds the budget
    only until its ``reservation_ttl_s``; then the next admission takes it back out."""
    server = redis_with_aof
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    budget = {"name": "team", "usd": 0.001, "scope": "global", "reservation_ttl_s": 3.0}  # one reservation fits
    pipeline = Pipeline.from_config({"store": server.url, "routing": {"budgets": [budget]},
                                     "cache": {"enabled": False}, "ledger": {"url": ledger}})
    completion = litellm.completion

    def answer_then_die(**kwargs):
        response = completion(**kwargs)
        server.kill()  # after the admission (persisted), before the settlement
        return response

    monkeypatch.setattr(litellm, "completion", answer_then_die)
    answered = pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=1000)
    reserved = time.monotonic()
    assert answered.choices[0].message.content == "ok"
    failed = [d for d in outcome(answered).plan.decisions if d.action == "settle-failed"]
    assert failed and "stops counting within 3 s" in failed[0].reason
    monkeypatch.setattr(litellm, "completion", completion)
    server.start()  # back, with the reservation it held
    with pytest.raises(BudgetExceeded):  # still held: 0.0006 reserved + 0.0006 asked > 0.001
        pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=1000)
    assert time.monotonic() - reserved < 3.0
    time.sleep(max(0.0, reserved + 3.2 - time.monotonic()))
    later = pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=1000)
    import redis

    spent = float(redis.Redis.from_url(server.url).get("rm:budget:team:usd:all:0"))
    assert spent == pytest.approx(outcome(later).cost.total_usd)  # the lapsed reservation is gone
    pipeline.ledger.close()
    rows = open_ledger(ledger).query("SELECT error, decisions FROM calls")
    assert len(rows) == 2 and rows[0][0] is None and "budget:settle-failed" in rows[0][1]
