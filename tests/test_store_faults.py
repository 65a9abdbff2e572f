"""A budget's store that does not answer: ``on_store_error: open`` (the default) lets the call through
and still records it; ``closed`` refuses it with StoreUnavailable before any provider call. On a
real redis-server that is stopped mid-run."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest

from router_middleware import Pipeline, StoreUnavailable
from router_middleware.ledger.store import open_ledger

from .conftest import _free_port, service_missing
from .test_cache import calls_to_provider

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def redis_we_can_stop(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("no redis-server: apt-get install redis-server")
    port = _free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", process
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=10)


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
