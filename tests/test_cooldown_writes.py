"""The circuit breaker's writes under concurrency, on every backend: a burst of failures opens the
circuit once, and failures of attempts admitted before it opened neither move its end nor take the
failed probe's hold."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import litellm
import structlog

from router_middleware import Pipeline
from router_middleware.bookkeeping import health
from router_middleware.bookkeeping.keys import COOLDOWN, FAILURES, PROBE
from router_middleware.config import CooldownConfig

CONFIG = CooldownConfig(failures=3, window_s=60, cooldown_s=30)


def test_failures_while_the_circuit_is_open_do_not_open_it_again(store) -> None:
    """They come from attempts admitted before it opened (or by a process whose view lagged): each
    third one opened it again, moving its end later and logging another opening."""
    now = time.time()
    assert [health.note_failure(store, "m", CONFIG, now) for _ in range(2)] == [None, None]
    until = health.note_failure(store, "m", CONFIG, now)
    assert until == repr(now + 30).encode() and store.get(COOLDOWN + "m") == until
    assert [health.note_failure(store, "m", CONFIG, now + 5) for _ in range(10)] == [None] * 10
    assert store.get(COOLDOWN + "m") == until


def test_a_late_failure_leaves_the_failed_probe_s_hold(store) -> None:
    """A failed probe holds the probe until the cooldown ends; a late failure took it away (and with
    it what keeps a process whose view lags from probing again)."""
    now = time.time()
    probe = health.Probe("m", b"the probe")
    until = health.open_circuit(store, "m", CONFIG, now, probe=probe)
    for _ in range(3):
        health.note_failure(store, "m", CONFIG, now + 1)
    assert store.get(PROBE + "m") == b"the probe" and store.get(COOLDOWN + "m") == until


def test_concurrent_failures_open_the_circuit_once(store) -> None:
    start = threading.Barrier(16)
    opened: list[bytes] = []

    def work() -> None:
        start.wait()
        for _ in range(10):
            until = health.note_failure(store, "m", CONFIG, time.time())
            if until is not None:
                opened.append(until)

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1 and store.get(COOLDOWN + "m") == opened[0]


def test_a_provider_outage_under_a_thousand_concurrent_calls_opens_the_circuit_once(redis_url, monkeypatch) -> None:
    """Through acompletion on real Redis: every call admitted to the down target before the circuit
    opened fails there (litellm's mock RateLimitError) and falls back; the opening is logged once."""
    down = f"down-{time.time_ns()}"  # the cooldown keys are per target: none left by another test
    p = Pipeline.from_config({"store": redis_url, "store_timeout_s": 5.0, "context": {"enabled": False},
                              "cache": {"enabled": False},
                              "routing": {"deployments": {down: {"model": "gpt-4o-mini"}},
                                          "aliases": {"coder": [down, "gpt-3.5-turbo"]},
                                          "fallback": {"backoff_s": 0.0},
                                          "cooldown": {"failures": 3, "window_s": 60, "cooldown_s": 30}}})
    real = litellm.acompletion
    sent: list[str] = []

    async def provider(**kwargs: Any) -> Any:
        sent.append(kwargs["model"])
        failing = kwargs["model"] == "gpt-4o-mini"
        return await real(**{**kwargs, "mock_response": "litellm.RateLimitError" if failing else "ok"})

    monkeypatch.setattr(litellm, "acompletion", provider)

    async def calls() -> list[Any]:
        return await asyncio.gather(*(p.acompletion(model="coder", messages=[{"role": "user", "content": f"q{i}"}])
                                      for i in range(1000)))

    with structlog.testing.capture_logs() as logs:
        answers = asyncio.run(calls())
    assert len(answers) == 1000 and sent.count("gpt-3.5-turbo") == 1000
    assert sent.count("gpt-4o-mini") > 3  # several failed before the first opening was known
    assert [e["model"] for e in logs if e["event"] == "model_cooling_down"] == [down]
    assert p.store.get(FAILURES + down) is None or float(p.store.get(FAILURES + down)) < 3
    p.close()


def test_a_cooldown_key_holding_what_no_reader_takes_is_replaced_when_the_circuit_opens(store) -> None:
    """Another program's value in a target's cooldown key (no TTL) read as "no cooldown", and the
    opening, a claim of the absent key, was refused: the circuit breaker was off for that target for
    good. Its ``failures``-th failure now replaces it, once, and says so."""
    now = time.time()
    store.set(COOLDOWN + "m", b"abc")
    with structlog.testing.capture_logs() as logs:
        opened = [health.note_failure(store, "m", CONFIG, now) for _ in range(3)]
    assert opened[:2] == [None, None] and opened[2] == repr(now + 30).encode() == store.get(COOLDOWN + "m")
    assert [e["event"] for e in logs if e["event"] == "cooldown_value_replaced"] == ["cooldown_value_replaced"]
    assert [health.note_failure(store, "m", CONFIG, now + 1) for _ in range(3)] == [None] * 3  # open: kept


def test_a_cooldown_key_of_another_type_on_redis_is_replaced_when_the_circuit_opens(redis_url) -> None:
    import uuid

    import redis

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    redis.Redis.from_url(redis_url).hset(store._k(COOLDOWN + "m"), "a", "b")
    now = time.time()
    assert [health.note_failure(store, "m", CONFIG, now) for _ in range(3)][2] == repr(now + 30).encode()
    assert store.get(COOLDOWN + "m") == repr(now + 30).encode()
    store.close()
