"""A store that does not answer, on a real redis-server stopped, killed or hung (SIGSTOP) mid-run: a
budget's ``on_store_error: open`` (the default) lets the call through and still records it, ``closed``
refuses it with StoreUnavailable before any provider call; a reservation whose settlement never
reached the store stops holding the budget after its ``reservation_ttl_s``; a write whose connection a
proxy broke after Redis ran it is not sent again (the budget holds what was spent, once), a read is."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import litellm
import pytest

from router_middleware import BudgetExceeded, Pipeline, StoreUnavailable, outcome
from router_middleware.ledger.store import open_ledger

from .breaking_proxy import BreakingProxy, Command
from .conftest import _free_port, service_missing
from .test_cache import calls_to_provider
from .test_drivers import CLAUDE, CODER
from .test_drivers import call as way_in  # noqa: F401 - the fixtures: a call through every way in
from .test_drivers import script as scripted  # noqa: F401

MESSAGES = [{"role": "user", "content": "hi"}]


class RedisServer:
    """A redis-server of the test's own on a free port, that the test may kill, restart, or hang."""

    def __init__(self, folder: Path, *, aof: bool = False, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing("no redis-server: apt-get install redis-server")
        self.port, self.password = _free_port(), password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        self.args = [str(binary), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
                     "--dir", str(folder), *(["--requirepass", password] if password else [])]
        self.process = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        import redis

        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                redis.Redis(port=self.port, password=self.password).ping()
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
        with pytest.raises(StoreUnavailable, match=f"budget 'team': the store {url} failed the call's admission"):
            pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
        assert len(sent) == 1  # refused before any provider call
    else:
        answer = pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
        assert answer.choices[0].message.content == "ok" and len(sent) == 2
    pipeline.ledger.close()
    errors = [r[0] for r in open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}").query("SELECT error FROM calls")]
    assert errors == ([None, None] if mode == "open" else [None])  # a refused call made no provider call


@pytest.mark.parametrize("driver", ["completion", "acompletion"])
def test_a_reservation_whose_settlement_failed_lapses_after_its_ttl(driver, redis_with_aof, tmp_path,
                                                                   monkeypatch) -> None:
    """Redis (append-only, so it comes back with what it held) dies between a call's answer and its
    settlement: the answer is returned and recorded, and the reservation it left holds the budget
    only until its ``reservation_ttl_s``; then the next admission takes it back out."""
    import asyncio

    server = redis_with_aof
    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    budget = {"name": "team", "usd": 0.001, "scope": "global", "reservation_ttl_s": 3.0}  # one reservation fits
    pipeline = Pipeline.from_config({"store": server.url, "routing": {"budgets": [budget]},
                                     "cache": {"enabled": False}, "ledger": {"url": ledger}})

    def call() -> Any:
        request = {"model": "gpt-4o-mini", "messages": MESSAGES, "mock_response": "ok", "max_tokens": 1000}
        return pipeline.completion(**request) if driver == "completion" else asyncio.run(pipeline.acompletion(**request))

    provider = getattr(litellm, driver)

    def answer_then_die(**kwargs: Any) -> Any:
        response = provider(**kwargs)
        server.kill()  # after the admission (persisted), before the settlement
        return response

    async def aanswer_then_die(**kwargs: Any) -> Any:
        response = await provider(**kwargs)
        server.kill()
        return response

    monkeypatch.setattr(litellm, driver, answer_then_die if driver == "completion" else aanswer_then_die)
    answered = call()
    reserved = time.monotonic()
    assert answered.choices[0].message.content == "ok"
    failed = [d for d in outcome(answered).plan.decisions if d.action == "settle-failed"]
    assert failed and "stops counting within 3 s" in failed[0].reason
    monkeypatch.setattr(litellm, driver, provider)
    server.start()  # back, with the reservation it held
    with pytest.raises(BudgetExceeded):  # still held: 0.0006 reserved + 0.0006 asked > 0.001
        call()
    assert time.monotonic() - reserved < 3.0
    time.sleep(max(0.0, reserved + 3.2 - time.monotonic()))
    later = call()
    import redis

    spent = float(redis.Redis.from_url(server.url).get("rm:budget:team:usd:all:0"))
    assert spent == pytest.approx(outcome(later).cost.total_usd)  # the lapsed reservation is gone
    pipeline.ledger.close()
    rows = open_ledger(ledger).query("SELECT error, decisions FROM calls")
    assert len(rows) == 2 and rows[0][0] is None and "budget:settle-failed" in rows[0][1]


def _every_store_read(url: str, mode: str) -> dict:
    """A config whose calls touch the store at every step: routing views, reasoning spend, the response
    cache, reply sizes, quotas, the budget."""
    return {"store": url, "store_timeout_s": 0.5, "cache": {"enabled": True},
            "routing": {"aliases": {"main": ["gpt-4o-mini", "gpt-4o"]}, "limits": {"gpt-4o-mini": {"rpm": 1000}},
                        "budgets": [{"name": "team", "usd": 10.0, "scope": "global", "on_store_error": mode}]},
            "reasoning": {"session_budget_tokens": 100000, "rules": [{"when": {}, "effort": "medium"}]}}


def ask(content: str) -> dict:
    return {"model": "main", "messages": [{"role": "user", "content": content}], "mock_response": "ok",
            "temperature": 0, "context": {"session_id": "s1"}}


class LoopWatch:
    """A task that ticks every 5 ms; ``stall``: the longest gap it saw between two ticks."""

    def __init__(self) -> None:
        import asyncio

        self.stall, self.ticking = 0.0, True
        self.task = asyncio.create_task(self._tick())

    async def _tick(self) -> None:
        import asyncio

        last = time.perf_counter()
        while self.ticking:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.stall, last = max(self.stall, now - last), now

    async def stop(self) -> float:
        self.ticking = False
        await self.task
        return self.stall


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_hung_redis_never_stalls_the_event_loop(mode, redis_we_can_stop) -> None:
    """Redis hangs (SIGSTOP) for 3 s: the event loop keeps turning (the longest gap between two ticks
    of a concurrent task stays far below the hang) and each call ends within about one store timeout,
    answered (``open``) or refused with StoreUnavailable (``closed``); a sync call as well."""
    import asyncio

    url, server = redis_we_can_stop
    pipeline = Pipeline.from_config(_every_store_read(url, mode))
    async def run() -> tuple[float, list[tuple[float, str]]]:
        await pipeline.acompletion(**ask("warm up"))
        await asyncio.sleep(1.1)  # the views' one-second copies lapse: the next calls read the store

        async def one(content: str) -> tuple[float, str]:
            began = time.perf_counter()
            try:
                answer = (await pipeline.acompletion(**ask(content))).choices[0].message.content
            except StoreUnavailable:
                answer = "StoreUnavailable"
            return time.perf_counter() - began, answer

        watch = LoopWatch()
        await asyncio.sleep(0.05)
        os.kill(server.pid, signal.SIGSTOP)
        hung = time.perf_counter()
        try:
            ended = await asyncio.gather(*(one(f"question {i}") for i in range(5)))
            await asyncio.sleep(max(0.0, hung + 3.0 - time.perf_counter()))  # the loop keeps turning meanwhile
        finally:
            os.kill(server.pid, signal.SIGCONT)
        return await watch.stop(), ended

    stall, ended = asyncio.run(run())
    expected = "ok" if mode == "open" else "StoreUnavailable"
    print(f"{mode}: longest loop stall {stall:.3f} s during a 3 s hang; calls took "
          f"{', '.join(f'{t:.2f}' for t, _ in ended)} s")
    assert stall < 0.3
    assert all(answer == expected and took < 1.5 for took, answer in ended), ended
    os.kill(server.pid, signal.SIGSTOP)
    try:
        began = time.perf_counter()
        if mode == "open":
            pipeline.completion(**ask("sync"))
        else:
            with pytest.raises(StoreUnavailable):
                pipeline.completion(**ask("sync"))
        assert time.perf_counter() - began < 1.5  # one timeout, not one per store operation
    finally:
        os.kill(server.pid, signal.SIGCONT)


@pytest.mark.parametrize("cache_url", ["the store's URL", "another database"])
def test_a_hung_redis_costs_one_timeout_when_the_cache_names_its_store(cache_url, redis_we_can_stop) -> None:
    """The response cache's ``store`` set (as docs/stores.md shows it) opened a second store, which
    kept its own note of the outage: its lookup, the admission, its write and the settlement each
    waited a timeout, about 2 s a call for as long as Redis hung. The server's outage is one note
    now (and the same URL is the same store): each call waits about one timeout, sync or async."""
    import asyncio

    url, server = redis_we_can_stop
    config = _every_store_read(url, "open")
    config["cache"]["store"] = url if cache_url == "the store's URL" else url[:-1] + "1"
    pipeline = Pipeline.from_config(config)
    pipeline.completion(**ask("warm up"))
    time.sleep(1.1)  # the views' one-second copies lapse: the next calls read the store
    os.kill(server.pid, signal.SIGSTOP)
    took = []
    try:
        for i in range(3):
            began = time.perf_counter()
            call = ask(f"question {i}")
            answer = pipeline.completion(**call) if i % 2 == 0 else asyncio.run(pipeline.acompletion(**call))
            took.append(time.perf_counter() - began)
            assert answer.choices[0].message.content == "ok"
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert max(took) < 1.2 and sum(took) < 2.0, took  # before: about 2 s each


def test_a_stream_that_ends_while_redis_hangs_never_stalls_the_event_loop(redis_we_can_stop) -> None:
    """An async stream admitted before Redis hung ends (settlement, cache write) while it hangs: the
    loop keeps turning, and the stream still gets its outcome."""
    import asyncio

    url, server = redis_we_can_stop
    pipeline = Pipeline.from_config(_every_store_read(url, "open"))

    async def run() -> tuple[float, str]:
        stream = await pipeline.acompletion(**ask("stream it"), stream=True)  # admitted, first chunk read
        watch = LoopWatch()
        os.kill(server.pid, signal.SIGSTOP)
        try:
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert outcome(stream).usage.output_tokens > 0
        return await watch.stop(), text

    stall, text = asyncio.run(run())
    print(f"longest loop stall {stall:.3f} s while the stream ended")
    assert text == "ok" and stall < 0.3


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_store_url_s_password_is_never_said(mode, tmp_path) -> None:
    """Redis hangs under calls whose store URL holds a password: the warnings logged and the error a
    call raises name the store (host and port) but never the password."""
    import structlog

    server = RedisServer(tmp_path, password="hunter2secret")
    try:
        pipeline = Pipeline.from_config(_every_store_read(server.url, mode))
        pipeline.completion(**ask("warm up"))
        time.sleep(1.1)  # the views' one-second copies lapse: the next calls read the store
        said: list[str] = []
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            with structlog.testing.capture_logs() as logs:
                for i in range(2):  # the first times out; the second is refused at once (the outage is known)
                    try:
                        pipeline.completion(**ask(f"question {i}"))
                    except StoreUnavailable as exc:
                        said.append(str(exc))
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        said += [repr(event) for event in logs]
    finally:
        server.stop()
    assert len(said) > 2 and any(f"127.0.0.1:{server.port}" in line for line in said), said
    assert not [line for line in said if "hunter2secret" in line]
    if mode == "closed":
        assert any("did not answer" in line for line in said[:2])



def test_a_stored_value_the_policies_cannot_read_is_said_once_not_on_every_call(redis_url) -> None:
    """A value kept in the process is decoded by every call that reads it: one another program wrote
    logged ``store_value_unreadable`` on each call while it stayed (seven calls, eight warnings per key
    in a trial), where once says it."""
    import redis
    import structlog

    client = redis.Redis.from_url(redis_url)
    client.set(f"rm:cooldown:{CLAUDE}", b"abc")
    routing = {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0}}
    pipeline = Pipeline.from_config({"store": redis_url, "routing": routing, "context": {"enabled": False},
                                     "cache": {"enabled": False}})
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            pipeline.completion(model="coder", messages=MESSAGES, mock_response="ok")
    pipeline.close()
    assert [e["key"] for e in logs if e["event"] == "store_value_unreadable"] == [f"cooldown:{CLAUDE}"]


@pytest.mark.parametrize("stored", [("cooldown", b"abc"), ("cooldown", b"inf"), ("quota", b"abc"), ("quota", b"inf")])
def test_a_stored_value_the_policies_cannot_read_is_missing_not_a_failed_call(
        stored, way_in, scripted, redis_we_can_stop) -> None:  # noqa: F811 - the fixtures imported above
    """Values the package never writes (text in a cooldown or a quota counter, ``inf`` as a cooldown's
    end or a quota's count: another program's key, a version that stored something else) read as
    missing, with a warning naming the key, through every way in: the call is routed as if they were
    absent (the quota's admission fails as a store failure: open), not failed by a ValueError, nor
    sent elsewhere by a cooldown that never ends or a count no call made."""
    import redis
    import structlog

    url, _ = redis_we_can_stop
    client = redis.Redis.from_url(url)
    kind, value = stored
    minute = int(time.time() // 60)
    keys = [f"cooldown:{CLAUDE}"] if kind == "cooldown" else [f"quota:{CLAUDE}:rpm:{m}" for m in (minute, minute + 1)]
    for key in keys:  # a quota window: this minute's, and the next one's (the call may start in it)
        client.set(f"rm:{key}", value)
    routing = {"aliases": {"coder": CODER}, "limits": {CLAUDE: {"rpm": 100}}, "fallback": {"backoff_s": 0.0}}
    pipeline = Pipeline.from_config({"store": url, "routing": routing, "context": {"enabled": False},
                                     "cache": {"enabled": False}})
    with structlog.testing.capture_logs() as logs:
        way_in(pipeline)
    assert scripted.calls == [CLAUDE]
    unread = {e["key"] for e in logs if e["event"] == "store_value_unreadable"}
    assert unread & set(keys), logs


@pytest.mark.parametrize("stored", [b"nan", b"junk", b"-1e300"])
def test_a_budget_counter_no_writer_of_ours_leaves_is_replaced_when_open_and_refuses_when_closed(
        stored, redis_we_can_stop) -> None:
    """A budget's tokens counter holds another program's value (no increment of ours makes ``nan``,
    text, or a total far below 0). It failed every admission for the rest of the window: ``open``
    let every call through uncounted (and ``-1e300`` was taken as a total, so no limit ever refused),
    ``closed`` refused every call. Now ``open`` replaces it (``store_value_replaced`` names the key and
    the value) and the budget counts, and refuses, again; ``closed`` refuses naming the key and how to
    fix it, and admits once the key is deleted. Nothing is added to the other counters meanwhile."""
    import redis
    import structlog

    url, _ = redis_we_can_stop
    client = redis.Redis.from_url(url)
    day = int(time.time() // 86400)
    key = f"rm:budget:team:tokens:all:{day}"
    budget = {"name": "team", "scope": "global", "usd": 1.0, "tokens": 600, "window_s": 86400}
    pipeline = Pipeline.from_config({"store": url, "routing": {"budgets": [budget]}, "cache": {"enabled": False}})
    closed = Pipeline.from_config({"store": url, "routing": {"budgets": [{**budget, "on_store_error": "closed"}]},
                                   "cache": {"enabled": False}})
    client.set(key, stored)
    with pytest.raises(StoreUnavailable, match=f"counter {key} holds b'{stored.decode()}'.*delete it to count from 0"):
        closed.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert client.get(key) == stored and client.get(f"rm:budget:team:usd:all:{day}") is None
    with structlog.testing.capture_logs() as logs:
        used = outcome(pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")).usage
    assert [(e["key"], e["found"]) for e in logs if e["event"] == "store_value_replaced"] == \
        [(f"budget:team:tokens:all:{day}", repr(stored))]
    assert float(client.get(key)) == used.input_tokens + used.output_tokens  # counted from 0
    with pytest.raises(BudgetExceeded, match="90 of 600 tokens"):  # 30 a call, estimated 520: the fourth
        for _ in range(3):
            pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    client.set(key, stored)
    with pytest.raises(StoreUnavailable):
        closed.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    client.delete(key)
    closed.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")


def test_a_closed_refusal_names_the_budget_whose_counter_the_store_could_not_read(redis_url) -> None:
    """Two closed budgets, one counter spoiled: the refusal named the first budget by name (``a``),
    whatever key the store could not read (``z``'s). It names the one whose counter it is; a store
    that failed as a whole (no key) names every closed budget of the call."""
    import redis

    client = redis.Redis.from_url(redis_url)
    day = int(time.time() // 86400)
    budgets = [{"name": name, "scope": "global", "tokens": 10_000, "window_s": 86400, "on_store_error": "closed"}
               for name in ("a", "z")]
    pipeline = Pipeline.from_config({"store": redis_url, "routing": {"budgets": budgets}, "cache": {"enabled": False}})
    client.set(f"rm:budget:z:tokens:all:{day}", b"abc")
    with pytest.raises(StoreUnavailable, match=r"^budget 'z': .*counter rm:budget:z:tokens"):
        pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    down = Pipeline.from_config({"store": "redis://127.0.0.1:1/0", "routing": {"budgets": budgets},
                                 "cache": {"enabled": False}})
    with pytest.raises(StoreUnavailable, match=r"^budgets 'a', 'z': the store redis://127.0.0.1:1/0 failed"):
        down.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_budget_counter_spoiled_while_the_call_ran_is_replaced_at_settlement_unless_closed(
        mode, way_in, scripted, redis_we_can_stop) -> None:  # noqa: F811 - the fixtures imported above
    """Another program's value written into a budget counter after the call's admission failed its
    settlement (a script error naming no key) and every settlement after it; with no admission to
    replace it (litellm's sync calls are only counted) it stayed for good. An ``open`` budget's is now
    replaced at settlement, counting the call from 0; a ``closed`` one's is kept (``store_value_kept``),
    so its next call is refused naming the key, as at an admission."""
    import redis
    import structlog

    url, _ = redis_we_can_stop
    client = redis.Redis.from_url(url)
    key = f"rm:budget:team:tokens:all:{int(time.time() // 86400)}"
    scripted.during = lambda model: client.set(key, b"banana")
    budget = {"name": "team", "scope": "global", "tokens": 100_000, "window_s": 86400, "on_store_error": mode}
    pipeline = Pipeline.from_config({"store": url, "context": {"enabled": False}, "cache": {"enabled": False},
                                     "routing": {"aliases": {"coder": CODER}, "budgets": [budget]}})
    with structlog.testing.capture_logs() as logs:
        way_in(pipeline)
    events = {e["event"] for e in logs}
    assert "settle_failed" not in events
    if mode == "open":
        assert "store_value_replaced" in events and 0 < float(client.get(key)) < 1000
        return
    assert "store_value_kept" in events and client.get(key) == b"banana"
    scripted.during = None
    with pytest.raises(StoreUnavailable, match="holds b'banana'.*delete it to count from 0"):
        way_in(pipeline)


@pytest.mark.parametrize("junk", ["quota-text", "quota-far-below-0", "hold-set-list"])
def test_another_programs_value_in_a_quota_window_or_a_hold_set_is_replaced_and_the_budget_still_checked(
        junk, way_in, scripted, redis_we_can_stop) -> None:  # noqa: F811 - the fixtures imported above
    """Junk in a quota window (text, or ``-1e300``, which disabled the limit) or a list where a
    budget's hold set belongs failed the whole atomic admission: a ``closed`` budget refused every call
    with ``StoreUnavailable budget 'team'`` (the budget was fine), an ``open`` one let calls through
    with neither the quota nor the budget counted, until the window passed, through every way in. Now
    the value is replaced (``store_value_replaced`` names the key), and the call is admitted and counted
    on both."""
    import redis
    import structlog

    url, _ = redis_we_can_stop
    client = redis.Redis.from_url(url)
    minute, day = int(time.time() // 60), int(time.time() // 86400)
    if junk == "hold-set-list":
        keys = [f"budget:team:usd:all:{day}#held"]
        for key in keys:
            client.rpush(f"rm:{key}", "x")
    else:
        keys = [f"quota:{CLAUDE}:rpm:{m}" for m in (minute, minute + 1)]  # the call may start in the next
        for key in keys:
            client.set(f"rm:{key}", b"abc" if junk == "quota-text" else b"-1e300")
    budget = {"name": "team", "scope": "global", "usd": 5.0, "window_s": 86400, "on_store_error": "closed"}
    routing = {"aliases": {"coder": CODER}, "limits": {CLAUDE: {"rpm": 100}}, "fallback": {"backoff_s": 0.0},
               "budgets": [budget]}
    pipeline = Pipeline.from_config({"store": url, "routing": routing, "context": {"enabled": False},
                                     "cache": {"enabled": False}})
    with structlog.testing.capture_logs() as logs:
        way_in(pipeline)
    assert scripted.calls == [CLAUDE]
    replaced = [e["key"] for e in logs if e["event"] == "store_value_replaced"]
    assert len(replaced) == 1 and replaced[0] in keys, logs
    assert float(client.get(f"rm:budget:team:usd:all:{day}")) > 0
    if junk != "hold-set-list":
        assert float(client.get(f"rm:{replaced[0]}")) == 1.0


def test_another_programs_value_in_a_failure_count_is_replaced_and_the_breaker_works(redis_url) -> None:
    """Text in a target's failure count (``fail:<target>``) failed every count: the circuit breaker was
    off for that target for good, each failure logged as ``cooldown_store_failed`` naming no key."""
    import redis
    import structlog

    from router_middleware.bookkeeping.health import note_failure
    from router_middleware.config import CooldownConfig
    from router_middleware.stores.redis import RedisStore

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store, client = RedisStore(redis_url, prefix=prefix), redis.Redis.from_url(redis_url)
    client.set(f"{prefix}fail:m", b"abc")
    config = CooldownConfig(failures=2, window_s=60, cooldown_s=30)
    with structlog.testing.capture_logs() as logs:
        assert note_failure(store, "m", config, time.time()) is None
        assert note_failure(store, "m", config, time.time()) is not None  # the second failure opens it
    assert [(e["key"], e["found"]) for e in logs if e["event"] == "store_value_replaced"] == [("fail:m", "b'abc'")]
    assert client.get(f"{prefix}cooldown:m") is not None


@pytest.mark.parametrize("driver", ["completion", "acompletion"])
def test_a_reply_size_list_of_another_type_keeps_no_budget_held(driver, redis_we_can_stop) -> None:
    """The list of a model's recent reply sizes holds a string (another program's value, an older
    version's): each settlement still ends the budget's hold and adds the actual spend (it did not: the
    list's write failed the whole settlement, so every call's estimate stayed held for
    ``reservation_ttl_s`` and the tenth call of a budget sized for hundreds was refused), and the
    list is replaced by a list of reply sizes."""
    import asyncio

    import redis

    url, _ = redis_we_can_stop
    client = redis.Redis.from_url(url)
    client.set("rm:out:gpt-4o-mini:shop", b"abc")
    budget = {"name": "team", "usd": 0.003, "window_s": 86400}  # about 10 estimates, 200 actual costs
    pipeline = Pipeline.from_config({"app": "shop", "store": url, "routing": {"budgets": [budget]},
                                     "cache": {"enabled": False}})
    request = {"model": "gpt-4o-mini", "messages": MESSAGES, "mock_response": "ok"}
    spent = 0.0
    for _ in range(12):
        answer = pipeline.completion(**request) if driver == "completion" else asyncio.run(pipeline.acompletion(**request))
        spent += outcome(answer).cost.total_usd
    key = f"rm:budget:team:usd:shop:{int(time.time() // 86400)}"
    assert float(client.get(key)) == pytest.approx(spent) and client.zcard(f"{key}#held") == 0
    assert client.type("rm:out:gpt-4o-mini:shop") == b"list"


def test_a_reply_size_that_is_no_number_fails_no_other_read(redis_we_can_stop) -> None:
    """A list of recent reply sizes holds a value that is no number: it is left out, and the values
    fetched with it (a cooldown) are still read: the cooling target is skipped (every read of the
    call's fetch failed with it, and the call went to the target cooling down)."""
    import redis

    url, _ = redis_we_can_stop
    client = redis.Redis.from_url(url)
    client.rpush("rm:out:gpt-4o-mini:shop", b"abc", b"20")
    client.set("rm:cooldown:gpt-4o-mini", str(time.time() + 30).encode())
    pipeline = Pipeline.from_config({
        "app": "shop", "store": url, "cache": {"enabled": False},
        "routing": {"aliases": {"mini": ["gpt-4o-mini", "gpt-4.1-mini"]}, "budgets": [{"name": "team", "usd": 5.0}]}})
    answer = pipeline.completion(model="mini", messages=MESSAGES, mock_response="ok")
    assert outcome(answer).plan.model == "gpt-4.1-mini"


@pytest.mark.parametrize("driver", ["completion", "acompletion"])
def test_a_reply_size_list_of_another_type_fails_no_other_read(driver, redis_url) -> None:
    """The list of a model's recent reply sizes is a string (someone SET it): the call's prefetch reads
    it as empty, logged once with its key, and the values fetched with it are still read: the cooling
    target is skipped (the list's WRONGTYPE failed the call's whole fetch, so it went to the target
    cooling down, and every call logged the failure again)."""
    import asyncio

    import redis
    import structlog

    client = redis.Redis.from_url(redis_url)
    app = f"wrongtype-{driver}"  # keys of its own: each is said once in the process
    keys = [f"rm:out:gpt-4o-mini:{app}", f"rm:inr:gpt-4o-mini:{app}"]
    config = {"app": app, "store": redis_url, "cache": {"enabled": False}, "routing": {
        "aliases": {"mini": ["gpt-4o-mini", "gpt-4.1-mini"]}, "budgets": [{"name": app, "usd": 5.0}]}}
    request = {"model": "mini", "messages": MESSAGES, "mock_response": "ok"}
    try:
        client.set("rm:cooldown:gpt-4o-mini", str(time.time() + 30).encode(), ex=30)
        with structlog.testing.capture_logs() as logs:
            for _ in range(2):  # each a new pipeline: nothing kept in the process from the one before
                client.mset(dict.fromkeys(keys, b"abc"))
                pipeline = Pipeline.from_config(config)
                answer = (pipeline.completion(**request) if driver == "completion"
                          else asyncio.run(pipeline.acompletion(**request)))
                assert outcome(answer).plan.model == "gpt-4.1-mini"
                pipeline.close()
    finally:
        client.delete("rm:cooldown:gpt-4o-mini", *keys)
    assert not [e for e in logs if e["event"] == "store_read_failed"], logs
    said = [e["key"] for e in logs if e["event"] == "store_value_unreadable"]
    assert sorted(said) == sorted(k.removeprefix("rm:") for k in keys), logs  # once each, in two calls


def test_a_budget_window_and_cache_ttl_longer_than_redis_takes(redis_we_can_stop) -> None:
    """``window_s`` and ``cache.ttl_s`` pass the config at ``1e20`` (or ``.inf``): practically forever.
    Redis refused their expiry (it must fit in 64 bits of ms), so every call failed its admission and
    ``on_store_error: closed`` refused all of them, and the cache never kept an entry; now the
    longest expiry Redis takes is set instead."""
    url, _ = redis_we_can_stop
    budget = {"name": "team", "usd": 1.0, "scope": "global", "window_s": 1e20, "on_store_error": "closed"}
    pipeline = Pipeline.from_config({"store": url, "routing": {"budgets": [budget]}, "cache": {"ttl_s": float("inf")}})
    request = {"model": "gpt-4o-mini", "messages": MESSAGES, "mock_response": "ok", "temperature": 0}
    first = pipeline.completion(**request)
    assert outcome(first).usage.source != "cache"
    assert outcome(pipeline.completion(**request)).usage.source == "cache"
    import redis

    assert float(redis.Redis.from_url(url).get("rm:budget:team:usd:all:0")) == pytest.approx(outcome(first).cost.total_usd)


def _runs(source: str) -> Any:
    """A test of a command: it runs the script ``source`` (EVAL with the source, or EVALSHA)."""
    sha = hashlib.sha1(source.encode()).hexdigest().encode()  # noqa: S324 - Redis's script id

    def runs(command: Command) -> bool:
        return command[0].upper() in (b"EVAL", b"EVALSHA") and command[1] in (source.encode(), sha)

    return runs


def _text(answer: Any) -> str:
    """The answer's text, from a completion or from the middleware's model response."""
    return answer.choices[0].message.content if hasattr(answer, "choices") else answer.result[0].content


@pytest.mark.parametrize("write", ["admission", "settlement"])
def test_a_write_whose_reply_was_lost_is_never_sent_again(write, way_in, scripted, tmp_path) -> None:  # noqa: F811
    """Redis runs a call's admission (the budget's hold) or its settlement (the spend), then the
    connection breaks before the reply arrives (a proxy between them closes it): the write is not
    sent again, through every way in, so the budget holds exactly what the calls spent; the call
    still gets its answer (the failure is logged), and the next call is admitted and settled on a new
    connection. It was sent again (redis-py's retry on the blocking client; on the async path, the
    batch's own when no reply was read): a settlement counted the spend twice, and an admission's
    hold taken twice stayed in the budget after the call ended, for the rest of its window."""
    import redis
    import structlog

    from router_middleware.stores.redis import _SETTLE, _WITHIN

    server = RedisServer(tmp_path)
    proxy = BreakingProxy(server.port)
    try:
        routing = {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0},
                   "budgets": [{"name": "team", "usd": 10.0, "scope": "global"}]}
        pipeline = Pipeline.from_config({"store": proxy.url, "routing": routing, "context": {"enabled": False},
                                         "cache": {"enabled": False}})
        client = redis.Redis(port=server.port)

        def spent() -> float:
            return float(client.get("rm:budget:team:usd:all:0") or 0)

        way_in(pipeline)
        one = spent()  # what one call spends (each is the same call, answered "ok")
        proxy.arm(_runs(_WITHIN if write == "admission" else _SETTLE))
        with structlog.testing.capture_logs() as logs:
            answer = way_in(pipeline)
        assert len(proxy.broken) == 1 and _text(answer) == "ok"
        assert spent() == pytest.approx(2 * one)
        assert any(e["event"] == ("budget_store_failed" if write == "admission" else "settle_failed") for e in logs)
        assert _text(way_in(pipeline)) == "ok"
        assert spent() == pytest.approx(3 * one) and client.zcard("rm:budget:team:usd:all:0#held") == 0
    finally:
        proxy.close()
        server.stop()


@pytest.mark.parametrize("driver", ["completion", "acompletion"])
def test_a_restarted_redis_is_written_to_by_the_next_call_with_no_failed_write(driver, redis_with_aof) -> None:
    """Redis restarts between two calls (its append-only file keeps the budget): the second call's
    admission and settlement reach it on the first try, though the connections pooled before the
    restart (the async client's too: both calls run on one event loop) were closed by the server and
    a write is never sent twice; no store failure is logged and the budget holds both calls' spend."""
    import asyncio

    import structlog

    server = redis_with_aof
    pipeline = Pipeline.from_config({"store": server.url, "cache": {"enabled": False},
                                     "routing": {"budgets": [{"name": "team", "usd": 10.0, "scope": "global"}]}})
    request = {"model": "gpt-4o-mini", "messages": MESSAGES, "mock_response": "ok"}

    def restart() -> None:
        server.kill()
        server.start()

    async def twice() -> list[Any]:
        first = await pipeline.acompletion(**request)
        restart()
        return [first, await pipeline.acompletion(**request)]

    with structlog.testing.capture_logs() as logs:
        if driver == "completion":
            answers = [pipeline.completion(**request)]
            restart()
            answers.append(pipeline.completion(**request))
        else:
            answers = asyncio.run(twice())
    import redis

    assert [e["event"] for e in logs if e.get("log_level") in ("warning", "error")] == []
    spent = float(redis.Redis.from_url(server.url).get("rm:budget:team:usd:all:0"))
    assert spent == pytest.approx(sum(outcome(a).cost.total_usd for a in answers))


def test_a_read_whose_reply_was_lost_is_sent_again(tmp_path) -> None:
    """A read (GET, MGET) whose connection broke after Redis answered is sent once more on a new
    connection, on the blocking client and in the async batch: reading twice changes nothing."""
    import asyncio

    from router_middleware.stores.redis import RedisStore

    server = RedisServer(tmp_path)
    proxy = BreakingProxy(server.port)
    try:
        store = RedisStore(proxy.url)
        store.set("k", b"v")
        proxy.arm(lambda command: command[0] == b"GET")
        assert store.get("k") == b"v"
        proxy.arm(lambda command: command[0] == b"MGET")
        assert store.fetch(["k"]) == ([b"v"], [])

        async def batched() -> bytes | None:
            proxy.arm(lambda command: command[0] == b"GET")
            try:
                return await store.aget("k")
            finally:
                await store.aclose()

        assert asyncio.run(batched()) == b"v"
        assert [command[0] for command in proxy.broken] == [b"GET", b"MGET", b"GET"]
    finally:
        proxy.close()
        server.stop()


def _paced_batch(tmp_path: Path, pace: tuple[int, float]) -> tuple[list[Any], float, list[Command]]:
    """Ten values of 8,000 bytes read as one async batch (``aget``, a store timeout of 0.5 s) through a
    proxy that relays Redis's replies at ``pace``: each read's value or error, the seconds the batch
    took, and the commands the proxy saw."""
    import asyncio

    from router_middleware.stores.redis import RedisStore

    server = RedisServer(tmp_path)
    proxy = BreakingProxy(server.port)
    try:
        store = RedisStore(proxy.url, timeout_s=0.5)
        for i in range(10):
            store.set(f"k{i}", b"x" * 8000)
        proxy.pace = pace

        async def batched() -> tuple[list[Any], float]:
            began = time.perf_counter()
            try:
                got = await asyncio.gather(*(store.aget(f"k{i}") for i in range(10)), return_exceptions=True)
                return list(got), time.perf_counter() - began
            finally:
                await store.aclose()

        got, took = asyncio.run(batched())
        return got, took, proxy.seen
    finally:
        proxy.pace = None
        proxy.close()
        server.stop()


def test_a_batch_whose_replies_come_slowly_is_read_while_each_part_comes_within_the_timeout(tmp_path) -> None:
    """The replies to one async batch that come a slice at a time, each within the store's timeout
    but all of them later than it (a slow link; or an event loop too busy to read a large batch in
    one turn), are all read: a batch fails only when no reply comes for a timeout (a hung server).
    One deadline for the whole batch failed it at 0.5 s, and every call of the batch with it."""
    got, took, seen = _paced_batch(tmp_path, (16_000, 0.3))  # about two replies every 0.3 s: 1.2 s for ten
    assert got == [b"x" * 8000] * 10
    assert took > 1.0  # read over more than twice the timeout
    assert [command[0] for command in seen[-10:]] == [b"GET"] * 10


def test_a_batch_whose_replies_stop_coming_partway_fails_about_a_timeout_after_the_last(tmp_path) -> None:
    """A batch whose replies stop partway (the link stalls after the first slice) fails with a timeout
    about one timeout (at most two) after the last reply came, not when the link wakes; the replies
    already read are kept, the rest fail."""
    import redis

    got, took, _ = _paced_batch(tmp_path, (16_100, 5.0))  # two replies (8,009 bytes each), then 5 s of nothing
    assert got[:2] == [b"x" * 8000] * 2
    assert all(isinstance(error, redis.TimeoutError) for error in got[2:]), got[2:]
    assert 0.5 <= took < 1.5


@pytest.mark.parametrize("stored", [b"abc", b'{"a": 1}', b'["abc", 20, null]', b'[Infinity, 20]', b'[true, "2", 20]',
                                    b"[" + b"9" * 400 + b"]", b"[" * 100_000],
                         ids=["text", "object", "text-and-null", "infinity", "bool-and-string", "huge", "nested"])
def test_a_reply_size_list_sqlite_cannot_read_keeps_no_budget_held(stored, tmp_path) -> None:
    """SQLite keeps a model's recent reply sizes as a JSON list in one row: a row another program (or an
    older version) wrote that is no such list, or holds values that are no finite numbers, reads as its
    finite numbers only, and each settlement still ends the budget's hold and adds the actual spend (it
    did not: every settlement of that model and app failed on the row, for good, so each call's
    estimate stayed held for ``reservation_ttl_s`` and the tenth call was refused)."""
    from router_middleware.stores import SQLiteStore

    path = tmp_path / "state.db"
    SQLiteStore(path).set("out:gpt-4o-mini:shop", stored)
    budget = {"name": "team", "usd": 0.003, "window_s": 86400}  # about 10 estimates, 200 actual costs
    pipeline = Pipeline.from_config({"app": "shop", "store": f"sqlite:///{path}", "routing": {"budgets": [budget]},
                                     "cache": {"enabled": False}})
    spent = 0.0
    for _ in range(12):
        spent += outcome(pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")).cost.total_usd
    store = SQLiteStore(path)
    assert float(store.get(f"budget:team:usd:shop:{int(time.time() // 86400)}")) == pytest.approx(spent)
    assert len(store.samples("out:gpt-4o-mini:shop")) >= 12 - 1 and all(v < 100 for v in store.samples("out:gpt-4o-mini:shop"))


@pytest.mark.parametrize("written", [0, 0.5, "3", "nan"], ids=["integer", "real", "text", "text-nan"])
@pytest.mark.parametrize("on_store_error", ["open", "closed"])
def test_a_budget_counter_another_program_set_with_sql_reads_as_redis_would_read_it(
        written, on_store_error, tmp_path) -> None:
    """An operator resets a budget with ``UPDATE kv SET value = 0``: SQLite keeps an INTEGER (or a REAL,
    or TEXT) where this package writes BLOBs. The INTEGER read as that many zero bytes (0: an empty
    value, "replaced"; 5: junk), a REAL or TEXT raised TypeError in every admission and settlement
    touching the key: the budget counted nothing for the rest of its window, its holds stayed, and a
    ``closed`` budget failed every call. Each now reads as its text, as ``SET key 0`` does on Redis:
    the next call counts on top of it; NaN is another program's junk, replaced (``open``) or named
    (``closed``) as on Redis."""
    import sqlite3

    path = tmp_path / "state.db"
    day = int(time.time() // 86400)
    budget = {"name": "team", "usd": 1.0, "tokens": 600, "window_s": 86400, "on_store_error": on_store_error}
    pipeline = Pipeline.from_config({"app": "shop", "store": f"sqlite:///{path}", "routing": {"budgets": [budget]},
                                     "cache": {"enabled": False}})
    first = outcome(pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok"))
    db = sqlite3.connect(path)
    db.execute("UPDATE kv SET value = ? WHERE key = ?", (written, f"budget:team:tokens:shop:{day}"))
    db.commit()
    if written == "nan" and on_store_error == "closed":
        with pytest.raises(StoreUnavailable, match="holds b'nan'.*delete it to count from 0"):
            pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
        return
    second = outcome(pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok"))
    rows = dict(db.execute("SELECT key, value FROM kv").fetchall())
    base = 0.0 if written == "nan" else float(written)
    assert float(rows[f"budget:team:tokens:shop:{day}"]) == base + second.usage.input_tokens + second.usage.output_tokens
    assert float(rows[f"budget:team:usd:shop:{day}"]) == pytest.approx(first.cost.total_usd + second.cost.total_usd)
    assert db.execute("SELECT COUNT(*) FROM holds").fetchone()[0] == 0  # settled: nothing still held


@pytest.mark.parametrize("driver", ["completion", "acompletion"])
def test_a_settlement_that_fails_alone_does_not_say_the_cache_write_failed(driver, redis_we_can_stop,
                                                                          monkeypatch) -> None:
    """On Redis the response cache's entry and the settlement go in one round trip, each command run
    apart: a settlement failing on a hold set another program overwrote (while the call ran, after its
    admission) logged the cache write as failed too (and taught the semantic index nothing), though
    the entry landed and served the next call. (A counter of another program's is replaced by the
    settlement: ``tests/test_stores.py``.)"""
    import asyncio

    import redis
    import structlog

    url, _ = redis_we_can_stop
    day = int(time.time() // 86400)
    completion, acompletion = litellm.completion, litellm.acompletion

    def spoil() -> None:
        redis.Redis.from_url(url).set(f"rm:budget:team:tokens:all:{day}#held", b"nan")

    async def aspoiled(**kwargs: Any) -> Any:
        spoil()
        return await acompletion(**kwargs)

    monkeypatch.setattr(litellm, "completion", lambda **kwargs: (spoil(), completion(**kwargs))[1])
    monkeypatch.setattr(litellm, "acompletion", aspoiled)
    pipeline = Pipeline.from_config({"store": url, "routing": {"budgets": [
        {"name": "team", "scope": "global", "tokens": 1_000_000, "window_s": 86400}]}})

    def ask(answer: str) -> Any:
        kwargs = {"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 0, "mock_response": answer}
        if driver == "completion":
            return pipeline.completion(**kwargs)
        return asyncio.run(pipeline.acompletion(**kwargs))

    with structlog.testing.capture_logs() as logs:
        ask("first")
        second = ask("second")
    events = [e["event"] for e in logs]
    assert second.choices[0].message.content == "first" and outcome(second).usage.source == "cache"
    assert "settle_failed" in events and "cache_write_failed" not in events
    pipeline.close()


def test_a_sqlite_store_another_process_holds_locked_costs_a_call_about_its_timeout(
        way_in, scripted, tmp_path) -> None:  # noqa: F811 - the fixtures imported above
    """Another program holding the store file's write lock made every call wait SQLite's fixed 5 s busy
    timeout at admission and again at settlement (10 s a call, through every way in). It waits
    ``store_timeout_s`` now, as Redis's operations do; the call is answered, its row says the budget
    went unchecked."""
    import sqlite3

    path = tmp_path / "state.db"
    pipeline = Pipeline.from_config({
        "store": f"sqlite:///{path}", "store_timeout_s": 0.3, "cache": {"enabled": False},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "routing": {"aliases": {"coder": CODER}, "budgets": [{"name": "day", "tokens": 100_000}]}})
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")  # another process's long write
    try:
        started = time.monotonic()
        answer = way_in(pipeline)
        elapsed = time.monotonic() - started
    finally:
        other.execute("ROLLBACK")
        other.close()
    pipeline.close()
    assert answer is not None
    assert elapsed < 4.0, elapsed  # 10 s before; about 2 x 0.3 s of waiting now, on a slow machine
    ((decisions,),) = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}").query("SELECT decisions FROM calls")
    assert "budget" in decisions


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_cache_write_that_fails_alone_leaves_the_settlement_written_and_said_apart(stream, tmp_path) -> None:
    """On SQLite the response cache's entry is written before the settlement's transaction: bytes of
    another program's in the cache's eviction ring (not UTF-8) failed that write, and with it every
    settlement (each call's estimate held until it lapsed, 180 -> 702 -> 1224 tokens for calls of 30).
    A stream's settlement said a cache write that failed alone as a failed settlement. Now the ring's
    slot reads as another key, the settlement is written, and a cache write that fails alone is said
    alone."""
    import sqlite3

    import structlog

    path = tmp_path / "state.db"
    pipeline = Pipeline.from_config({"store": f"sqlite:///{path}", "app": "a", "cache": {"policy": "always"},
                                     "routing": {"budgets": [{"name": "tok", "scope": "app", "tokens": 100_000}]}})

    def ask(text: str) -> None:
        messages = [{"role": "user", "content": text}]
        answer = pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok", stream=stream)
        if stream:
            for _ in answer:
                pass

    ask("first")
    db = sqlite3.connect(path, isolation_level=None)
    assert db.execute("UPDATE kv SET value = ? WHERE key LIKE '%:slot:%'", (b"\x00\xff\x00",)).rowcount
    spent = lambda: float(db.execute("SELECT value FROM kv WHERE key LIKE 'budget:tok:tokens:%'").fetchone()[0])  # noqa: E731
    before = spent()
    original = pipeline.store.put_bounded
    with structlog.testing.capture_logs() as logs:
        ask("second")  # its cache write evicts the spoiled slot's entry
        pipeline.store.put_bounded = lambda *a: (_ for _ in ()).throw(sqlite3.OperationalError("disk I/O error"))
        ask("third")  # its cache write fails alone
        pipeline.store.put_bounded = original
    events = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    assert "settle_failed" not in events, logs
    assert spent() > before and db.execute("SELECT COUNT(*) FROM holds").fetchone()[0] == 0  # settled, none held
    assert "cache_write_failed" in events
    pipeline.close()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_settlement_that_fails_alone_on_sqlite_leaves_the_cache_entry_said_written(stream, tmp_path,
                                                                                    monkeypatch) -> None:
    """A stream whose settlement failed while its response-cache entry landed said the cache write
    failed too (and taught the semantic index nothing); the whole answer's path told them apart."""
    import sqlite3

    import structlog

    pipeline = Pipeline.from_config({"store": f"sqlite:///{tmp_path / 'state.db'}", "cache": {"policy": "always"},
                                     "routing": {"budgets": [{"name": "tok", "scope": "global", "tokens": 100_000}]}})

    def ask() -> Any:
        answer = pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", stream=stream)
        if stream:
            for _ in answer:
                pass
        return answer

    def failing(*args: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with structlog.testing.capture_logs() as logs:
        monkeypatch.setattr(pipeline.store, "_settle", failing)
        ask()
        monkeypatch.undo()
    events = [e["event"] for e in logs if e["log_level"] in ("warning", "error")]
    assert "settle_failed" in events and "cache_write_failed" not in events, events
    assert outcome(ask()).usage.source == "cache"
    pipeline.close()


def test_a_sqlite_store_s_own_threads_do_not_fail_each_other_s_writes_at_a_short_timeout(tmp_path) -> None:
    """With ``store_timeout_s`` (0.5 s) as SQLite's busy timeout, 16 threads of one process calling
    through one budget failed some admissions and settlements (SQLite's busy handler is unfair: a
    writer waited past 0.5 s in a run of under a second). The process's writers take turns; the
    timeout bounds the wait for another process's lock only."""
    import threading

    import structlog

    pipeline = Pipeline.from_config({"store": f"sqlite:///{tmp_path / 'state.db'}", "store_timeout_s": 0.5,
                                     "cache": {"enabled": False}, "telemetry": {"enabled": False},
                                     "routing": {"budgets": [{"name": "day", "scope": "app", "tokens": 10**7}]}})

    def work(i: int) -> None:
        for j in range(15):
            pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": f"hi {i} {j}"}],
                                mock_response="ok")

    with structlog.testing.capture_logs() as logs:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    pipeline.close()
    assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == []
