"""A call stopped from outside (``asyncio.wait_for`` timing out, a task cancelled, an interrupt) at any
of its awaits gives back its budget reservation at once and is recorded, like a call that failed:
its reservation must not count against the budget until it lapses (``reservation_ttl_s``). One
stopped while litellm had its request is charged its prompt (the provider read it, and bills it)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import litellm
import pytest
from opentelemetry.trace import StatusCode

from router_middleware import Pipeline, drivers
from router_middleware.bookkeeping.keys import PROBE

from .test_drivers import _cooled_off, _on_redis

MESSAGES = [{"role": "user", "content": "hello"}]


def budget_pipeline(store: str = "memory://", **routing: Any) -> Pipeline:
    return Pipeline.from_config({
        "store": store, "cache": {"enabled": False}, "context": {"enabled": False},
        "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}], **routing},
    })


def spent(p: Pipeline, app: str) -> float:
    return float(p.store.get(f"budget:team:usd:{app}:0") or 0.0)


@pytest.fixture
def hanging(monkeypatch) -> list[str]:
    """litellm.acompletion that never answers (the provider hangs)."""
    calls: list[str] = []

    async def hang(**kwargs: Any) -> Any:
        calls.append(kwargs["model"])
        await asyncio.sleep(3600)

    monkeypatch.setattr(litellm, "acompletion", hang)
    return calls


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_call_cancelled_during_the_provider_call_is_charged_its_prompt_not_its_reservation(
        store, hanging, span_exporter, request) -> None:
    """It was given back whole: a looping agent under a client timeout spent with no limit (a trial: 40
    requests the provider answered, the budget counter at 0). Its prompt now counts: about $0.00002
    here, not the $0.005 its 500 output tokens reserved."""
    url = request.getfixturevalue("redis_url") if store == "redis" else "memory://"
    p, app = budget_pipeline(url), f"cancel-{uuid.uuid4().hex[:8]}"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.acompletion(model="gpt-4o", messages=MESSAGES, context={"app": app},
                                             max_tokens=500), 0.2)
    assert hanging == ["gpt-4o"]
    await p.aclose()
    assert 0 < spent(p, app) < 0.0001  # its prompt, not the reservation held for reservation_ttl_s
    routes = [s for s in span_exporter.get_finished_spans() if s.name.startswith("route")]
    assert len(routes) == 1 and routes[0].attributes.get("router_middleware.stopped_by") == "CancelledError"
    assert routes[0].attributes["router_middleware.ended"] == "stopped" and "error.type" not in routes[0].attributes
    assert routes[0].status.status_code == StatusCode.UNSET  # stopped by the caller's timeout: no error of the call


async def test_a_call_cancelled_while_backing_off_gives_its_reservation_back(monkeypatch) -> None:
    async def fail(**kwargs: Any) -> Any:
        raise litellm.exceptions.RateLimitError("slow down", "x", "m")

    async def wait_long(seconds: float) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(litellm, "acompletion", fail)
    monkeypatch.setattr(drivers, "_asleep", wait_long)
    p, app = budget_pipeline(aliases={"coder": ["gpt-4o", "gpt-4o-mini"]}), "backoff"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(p.acompletion(model="coder", messages=MESSAGES, context={"app": app},
                                             max_tokens=500), 0.2)
    assert spent(p, app) == 0.0


async def test_a_call_cancelled_during_its_admission_on_redis_gives_the_holds_back(
        redis_url, hanging, monkeypatch) -> None:
    """The admission script was sent (the batch's flush is not the caller's to cancel): its holds
    reach Redis even though the cancelled call never learns it holds them."""
    from router_middleware.stores.redis import RedisStore

    admitted = asyncio.Event()
    original = RedisStore.aadd_within

    async def slow_admission(self: RedisStore, *args: Any) -> Any:
        answer = await original(self, *args)
        admitted.set()
        await asyncio.sleep(3600)  # the answer is late: the caller gives up first
        return answer

    monkeypatch.setattr(RedisStore, "aadd_within", slow_admission)
    p, app = budget_pipeline(redis_url), f"admit-{uuid.uuid4().hex[:8]}"
    task = asyncio.ensure_future(p.acompletion(model="gpt-4o", messages=MESSAGES, context={"app": app},
                                               max_tokens=500))
    await admitted.wait()
    assert spent(p, app) > 0  # held
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.aclose()
    assert hanging == []
    assert spent(p, app) == 0.0


async def test_a_call_cancelled_before_its_admission_is_sent_to_redis_holds_nothing_afterwards(
        redis_url, hanging, monkeypatch) -> None:
    """The call is stopped while its admission waits in the batch for the loop's next turn (a busy
    loop): no hold lands after the call's release and counts against the budget until
    reservation_ttl_s (600 s). Before, the admission was sent all the same, after the release. (An
    admission of quotas alone is withdrawn from the batch; one with budget holds is sent, and the call
    gives them back once they landed.)"""
    from router_middleware.stores.redis import _Batch

    start = _Batch._start_flush

    def busy_loop(self: _Batch, loop: asyncio.AbstractEventLoop) -> None:
        loop.call_later(0.3, start, self, loop)  # the flush starts only once the loop is free again

    monkeypatch.setattr(_Batch, "_start_flush", busy_loop)
    queued = _admissions_queued(monkeypatch)
    await _cancelled_when(queued, redis_url, hanging)  # before: the hold landed after the call's release


async def test_a_call_cancelled_after_its_admission_went_to_redis_gives_the_holds_back_once_they_landed(
        redis_url, hanging, monkeypatch) -> None:
    """The admission had been written to Redis's connection, and Redis had not run it yet (a slow
    link), when the call was stopped. Its release goes on another connection: sent at once, it could
    run first, and the holds landing after it counted against the budget until reservation_ttl_s
    (600 s). The call now waits for its admission's answer (a round trip) before it gives them back."""
    from router_middleware.stores.redis import RedisStore

    original = RedisStore.aadd_within
    sent = asyncio.Event()

    async def slow_link(self: RedisStore, *args: Any) -> Any:
        async def arrive() -> Any:
            await asyncio.sleep(0.3)
            return await original(self, *args)

        sent.set()
        return await asyncio.shield(asyncio.ensure_future(arrive()))  # what was sent cannot be unsent

    monkeypatch.setattr(RedisStore, "aadd_within", slow_link)
    await _cancelled_when(sent, redis_url, hanging)  # before: the holds landed after the call's release


async def _cancelled_when(reached: asyncio.Event, redis_url: str, hanging: list[str]) -> None:
    """A budgeted call on Redis, cancelled once its admission ``reached`` a point: after the late
    flush or arrival, nothing is held on the budget, and the provider was never called."""
    p, app = budget_pipeline(redis_url), f"held-{uuid.uuid4().hex[:8]}"
    task = asyncio.ensure_future(p.acompletion(model="gpt-4o", messages=MESSAGES, context={"app": app},
                                               max_tokens=500))
    await reached.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)  # past the late flush or arrival
    await p.aclose()
    assert hanging == []
    assert spent(p, app) == 0.0


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_a_call_cancelled_while_it_claims_a_probe_gives_the_claim_back(kind, request, tmp_path, hanging,
                                                                            monkeypatch) -> None:
    """The admission claiming a half-open target's probe reached the store; its answer is late and the
    caller gives up: the call still ends the claim, rather than keep every call from probing the
    target until ``probe_s`` passes."""
    from router_middleware.stores.redis import RedisStore
    from router_middleware.stores.sqlite import SQLiteStore

    target = f"claude-{time.time_ns()}"
    url = request.getfixturevalue("redis_url") if kind == "redis" else f"sqlite:///{tmp_path / 'state.db'}"
    p = _on_redis(url, target)
    _cooled_off(p, target)
    admitted, loop = asyncio.Event(), asyncio.get_running_loop()
    if kind == "redis":
        original = RedisStore.aadd_within

        async def late_answer(self: RedisStore, *args: Any) -> Any:
            answer = await original(self, *args)
            admitted.set()
            await asyncio.sleep(0.3)
            return answer

        monkeypatch.setattr(RedisStore, "aadd_within", late_answer)
    else:
        blocking = SQLiteStore.add_within

        def late(self: SQLiteStore, *args: Any) -> Any:  # in a worker thread
            answer = blocking(self, *args)
            loop.call_soon_threadsafe(admitted.set)
            time.sleep(0.3)
            return answer

        monkeypatch.setattr(SQLiteStore, "add_within", late)
    task = asyncio.ensure_future(p.acompletion(model="coder", messages=MESSAGES))
    await admitted.wait()
    assert p.store.get(PROBE + target) is not None  # claimed
    await _cancelled_leaves_no_claim(task, p, hanging, target)


async def test_a_call_cancelled_before_its_probe_claim_reaches_redis_ends_the_claim_after_it(
        redis_url, hanging, monkeypatch) -> None:
    """The admission is queued, and the batch's flush (not the caller's to cancel) sends it late: the
    call waits for its answer before giving the claim back, or the claim would land after its end."""
    from router_middleware.stores.redis import _Batch

    send = _Batch._send

    async def slow_send(self: _Batch, commands: Any) -> Any:
        await asyncio.sleep(0.3)  # a slow link to Redis
        return await send(self, commands)

    monkeypatch.setattr(_Batch, "_send", slow_send)
    queued = _admissions_queued(monkeypatch)
    target = f"claude-{time.time_ns()}"
    p = _on_redis(redis_url, target)
    _cooled_off(p, target)
    task = asyncio.ensure_future(p.acompletion(model="coder", messages=MESSAGES))
    await queued.wait()
    await _cancelled_leaves_no_claim(task, p, hanging, target)


def _admissions_queued(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """An event set once a call's admission is queued in the Redis store's batch (not yet sent)."""
    from router_middleware.stores.redis import RedisStore

    queued, admit = asyncio.Event(), RedisStore.aadd_within

    def admission(self: RedisStore, *args: Any) -> Any:
        future = admit(self, *args)
        queued.set()
        return future

    monkeypatch.setattr(RedisStore, "aadd_within", admission)
    return queued


async def _cancelled_leaves_no_claim(task: asyncio.Future[Any], p: Any, hanging: list[Any], target: str) -> None:
    """Cancel the call ``task`` runs: it raises the cancellation, leaves no store write behind and no
    probe claim on ``target``."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.aclose()
    assert hanging == []
    assert p.store.get(PROBE + target) is None


async def test_an_agent_model_call_cancelled_gives_its_reservation_back() -> None:
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.messages import HumanMessage

    from router_middleware.langchain import RouterAgentMiddleware

    p = budget_pipeline()
    middleware = RouterAgentMiddleware(p, model="gpt-4o", context={"app": "agent"})
    request = ModelRequest(model=FakeListChatModel(responses=["ok"]), messages=[HumanMessage("hello")],
                           model_settings={"max_tokens": 500})

    async def handler(r: ModelRequest) -> ModelResponse:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(middleware.awrap_model_call(request, handler), 0.2)
    assert spent(p, "agent") == 0.0


def test_a_sync_call_interrupted_during_the_provider_call_is_charged_its_prompt_not_its_reservation(
        monkeypatch) -> None:
    def interrupted(**kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(litellm, "completion", interrupted)
    p = budget_pipeline()
    with pytest.raises(KeyboardInterrupt):
        p.completion(model="gpt-4o", messages=MESSAGES, context={"app": "sync"}, max_tokens=500)
    assert 0 < spent(p, "sync") < 0.0001


async def test_a_call_cancelled_while_it_settles_keeps_its_ledger_row_and_span(redis_url, monkeypatch, tmp_path,
                                                                             span_exporter) -> None:
    """The provider answered and the settlement went to Redis (the batch's flush is not the caller's to
    cancel): the paid call is in the ledger and its span ends, though its caller gave up."""
    from router_middleware.ledger.store import open_ledger
    from router_middleware.stores.redis import RedisStore

    settled = asyncio.Event()
    original = RedisStore.aadd_many

    async def slow_settlement(self: RedisStore, *args: Any) -> Any:
        await original(self, *args)
        settled.set()
        await asyncio.sleep(3600)

    monkeypatch.setattr(RedisStore, "aadd_many", slow_settlement)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    app = f"settle-{uuid.uuid4().hex[:8]}"
    p = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "context": {"enabled": False},
                              "ledger": {"url": url},
                              "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}]}})
    task = asyncio.ensure_future(p.acompletion(model="gpt-4o", messages=MESSAGES, context={"app": app},
                                               mock_response="ok", max_tokens=500))
    await settled.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.aclose()
    assert 0 < spent(p, app) < 0.001  # settled to the answer's cost
    assert open_ledger(url).query("SELECT model, error FROM calls") == [("gpt-4o", "CancelledError")]
    assert len([s for s in span_exporter.get_finished_spans() if s.name.startswith("route")]) == 1


async def test_a_call_cancelled_while_its_answer_is_cached_is_still_settled(monkeypatch, tmp_path) -> None:
    """The response cache on its own store writes before the settlement: a call stopped there was paid
    for, so it is settled to its cost (not released as nothing spent) and recorded."""
    import threading

    from router_middleware.ledger.store import open_ledger
    from router_middleware.stores.sqlite import SQLiteStore

    writing = threading.Event()
    original = SQLiteStore.put_bounded

    def slow_put(self: SQLiteStore, *args: Any) -> None:
        writing.set()
        threading.Event().wait(0.5)
        original(self, *args)

    monkeypatch.setattr(SQLiteStore, "put_bounded", slow_put)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"cache": {"store": f"sqlite:///{tmp_path / 'cache.db'}"}, "context": {"enabled": False},
                              "ledger": {"url": url},
                              "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}]}})
    task = asyncio.ensure_future(p.acompletion(model="gpt-4o", messages=MESSAGES, context={"app": "cached"},
                                               mock_response="ok", max_tokens=500, temperature=0))
    while not writing.is_set():
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await p.aclose()
    assert 0 < spent(p, "cached") < 0.001
    assert open_ledger(url).query("SELECT model, error FROM calls") == [("gpt-4o", "CancelledError")]
