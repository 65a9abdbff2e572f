"""What a settled call writes beyond its budgets: the speed averages behind ``:nitro`` and latency
routing (fed by answers whose usage the provider reported) and the provider's view of its quotas
(its rate-limit headers), from real recordings replayed over litellm's HTTP path."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from router_middleware import Pipeline, outcome

from .replay_server import replay_server

MESSAGES = [{"role": "user", "content": "Say hello."}]


def command_names(packed: bytes) -> list[bytes]:
    """The names of the RESP commands in what a connection sent (``*N``, then N bulk strings)."""
    names, at = [], 0
    while at < len(packed):
        end = packed.index(b"\r\n", at)
        count, at = int(packed[at + 1:end]), end + 2
        for i in range(count):
            end = packed.index(b"\r\n", at)
            size = int(packed[at + 1:end])
            if i == 0:
                names.append(packed[end + 2:end + 2 + size].upper())
            at = end + 2 + size + 2
    return names



def count_sent(monkeypatch: pytest.MonkeyPatch, *, on_loop: bool = False) -> list[list[bytes]]:
    """From here on, the names of the commands redis-py's blocking client sends, per round trip (with
    ``on_loop``, only those sent while an event loop runs in the sending thread)."""
    from redis.connection import Connection

    trips: list[list[bytes]] = []
    original = Connection.send_packed_command

    def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
        if not on_loop or asyncio._get_running_loop() is not None:
            trips.append(command_names(command if isinstance(command, bytes) else b"".join(command)))
        return original(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    return trips


def names(trips: list[list[bytes]]) -> list[bytes]:
    return [name for trip in trips for name in trip]


# The provider's view of gpt-4o-mini's quota as the recorded openai_chat.yaml headers leave it.
VIEWS = {"quota:openai/gpt-4o-mini:left:requests": b"4999.0", "quota:openai/gpt-4o-mini:left:tokens": b"159974.0"}


def limited(redis_url: str, app: str) -> Pipeline:
    """A pipeline on Redis, an app of its own: the alias ``chat`` over gpt-4o-mini, with a rate limit
    of ours (never reached) so that the provider's view of the quota is kept."""
    return Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "context": {"enabled": False},
                                 "app": f"{app}-{uuid.uuid4().hex[:8]}",
                                 "routing": {"aliases": {"chat": ["openai/gpt-4o-mini"]},
                                             "limits": {"openai/gpt-4o-mini": {"rpm": 10_000, "tpm": 10**7}}}})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_concurrent_calls_on_redis_write_speed_and_the_providers_quota_view_in_their_settlement(
        redis_url, monkeypatch, mode) -> None:
    """Each speed average is blended into the store, and the provider's requests and tokens left are
    set, in the settlement's one write. An average was a read then a compare-and-set, tried up to
    five times: under concurrency most tries lost to another call's write (samples dropped), and on
    the async path the retries ran on the blocking client in the store's threads, two to ten round
    trips a call, the heaviest Redis traffic of a routed call; the provider's view was a SET per unit
    on that client too."""

    pipeline = limited(redis_url, "speed")
    with replay_server("openai_chat.yaml", all_headers=True) as (base, _):
        kwargs = {"model": "chat", "messages": MESSAGES, "api_base": base, "api_key": "sk-test"}
        pipeline.completion(**kwargs)  # scripts loaded, connections open, the views read once
        trips = count_sent(monkeypatch)  # the blocking client's round trips from here on
        puts: list[tuple[str, bytes, float | None]] = []  # what the settlements set
        store = type(pipeline.store)

        def recording(original):  # type: ignore[no-untyped-def]
            def settle(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                puts.extend(kwargs.get("puts", args[5] if len(args) > 5 else ()))
                return original(self, *args, **kwargs)
            return settle

        monkeypatch.setattr(store, "add_many", recording(store.add_many))
        monkeypatch.setattr(store, "aadd_many", recording(store.aadd_many))
        if mode == "sync":
            for _ in range(10):
                assert outcome(pipeline.completion(**kwargs)).usage.source == "provider"
        else:
            async def many() -> None:
                await pipeline.acompletion(**kwargs)  # the batch's client open
                trips.clear()
                answers = await asyncio.gather(*(pipeline.acompletion(**kwargs) for _ in range(20)))
                assert {outcome(a).usage.source for a in answers} == {"provider"}
                await pipeline.aclose()

            asyncio.run(many())
        monkeypatch.undo()
    sent = names(trips)
    if mode == "async":
        assert sent == []  # every read and write of the async path went through the batched client
    else:
        assert b"GET" not in sent  # no read of an average before writing it
        writes = [name for name in sent if name not in (b"MGET", b"LRANGE")]  # the views' reads: once a second
        assert len(writes) <= 10 * 2  # an admission and a settlement a call at most
        assert len(sent) - len(writes) <= 3 * 3
    throughput = float(pipeline.store.get("tps:openai/gpt-4o-mini") or 0)
    first_token = float(pipeline.store.get("lat:openai/gpt-4o-mini") or 0)
    assert throughput > 0 and first_token > 0
    # the recorded x-ratelimit-remaining-* headers, set with each settlement (for their reset: 9-12 ms)
    assert {(key.split(":left:")[1], raw) for key, raw, _ in puts} == {("requests", b"4999.0"), ("tokens", b"159974.0")}
    assert len(puts) == 2 * (10 if mode == "sync" else 21)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_sessions_route_through_tiers_is_set_by_its_settlement(redis_url, monkeypatch, mode) -> None:
    """With tiers and a session, what the router remembers of the session (the target that answered,
    its tier) is set in the settlement's one write. It was a SET of its own after each call: one more
    round trip a call on the blocking client (on the async path, in the store's threads)."""

    from router_middleware.types import SessionRoute

    app = f"route-{uuid.uuid4().hex[:8]}"
    pipeline = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "context": {"enabled": False},
                                     "app": app, "routing": {
                                         "aliases": {"easy": ["openai/gpt-4o-mini"], "hard": ["openai/gpt-4o"]},
                                         "tiers": [{"max_score": 0.35, "alias": "easy"},
                                                   {"max_score": 1.0, "alias": "hard"}],
                                         "affinity": {"ttl_s": 300}}})
    session = f"s-{app}"
    with replay_server("openai_chat.yaml", all_headers=True) as (base, _):
        kwargs = {"model": "auto", "messages": MESSAGES, "api_base": base, "api_key": "sk-test",
                  "context": {"session_id": session}}
        pipeline.completion(**kwargs)  # connections open, the views read once
        trips = count_sent(monkeypatch)  # the blocking client's round trips from here on
        if mode == "sync":
            for _ in range(5):
                pipeline.completion(**kwargs)
        else:
            async def many() -> None:
                await pipeline.acompletion(**kwargs)  # the batch's client open
                trips.clear()
                await asyncio.gather(*(pipeline.acompletion(**kwargs) for _ in range(10)))
                await pipeline.aclose()

            asyncio.run(many())
        monkeypatch.undo()
    sent = names(trips)
    assert b"SET" not in sent  # no write of its own: the settlement's script sets it
    if mode == "async":
        assert sent == []
    key = f"route:{session}"
    assert SessionRoute.decode(pipeline.store.get(key) or b"{}").target == "openai/gpt-4o-mini"
    assert 0 < pipeline.store.client.pttl(pipeline.store._k(key)) <= 300_000


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_providers_quota_view_that_lapses_during_a_call_is_not_brought_back(redis_url, monkeypatch, mode) -> None:
    """The provider's view of a quota (what its rate-limit headers said is left) lapses at its reset,
    for OpenAI often within milliseconds (the recording: 12 ms for requests, 9 ms for tokens), so
    mostly while a call runs. The call's admission counts the view down where it is, in its one
    atomic step, and nothing of ours adjusts it afterwards. Its settlement added the difference
    between the estimated and the counted tokens to it: to a view that had lapsed, a key made from
    nothing and kept for good (a stream, whose recording carries no rate-limit headers, set no new
    one), which the routing policy then read as what the provider has left, refusing the target."""
    pipeline = limited(redis_url, "view")
    store = pipeline.store
    views = dict(VIEWS)
    store_type = type(store)

    def lapsing(original):  # type: ignore[no-untyped-def]
        def admit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            answer = original(self, *args, **kwargs)
            for key in views:  # the provider's window resets while the call runs
                self.delete(key)
            return answer
        return admit

    monkeypatch.setattr(store_type, "add_within", lapsing(store_type.add_within))
    monkeypatch.setattr(store_type, "aadd_within", lapsing(store_type.aadd_within))
    with replay_server("openai_chat_streaming.yaml", all_headers=True) as (base, _):
        kwargs = {"model": "chat", "messages": MESSAGES, "api_base": base, "api_key": "sk-test", "stream": True}

        async def read() -> list[object]:
            return [chunk async for chunk in await pipeline.acompletion(**kwargs)]

        for _ in range(3):
            for key, left in views.items():
                store.set(key, left, ttl_s=60)
            chunks = list(pipeline.completion(**kwargs)) if mode == "sync" else asyncio.run(read())
            assert chunks
    monkeypatch.undo()
    for key in views:  # gone with the provider's reset, not made again by a count of ours
        assert store.get(key) is None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_providers_quota_view_is_counted_down_in_the_admission(redis_url, monkeypatch, mode) -> None:
    """While the provider's view of a quota is in the store, each admission counts it down in its one
    atomic step; one that lapsed (at the provider's reset) while the process's copy of it lags is
    left alone, and refuses nothing. Counting it down was an INCRBYFLOAT of its own per unit on the
    blocking client, two round trips a call (on the async path the admission ran in the store's
    threads), and where the view had lapsed since the process read it, it made the key afresh at -1
    and refused the call ("the provider reports no requests left") though the provider had said 4999."""

    pipeline = limited(redis_url, "view")
    store = pipeline.store
    views = dict(VIEWS)
    for key, left in views.items():  # as an answer's headers left them (the stream's carry none)
        store.set(key, left, ttl_s=60)
    with replay_server("openai_chat_streaming.yaml", all_headers=True) as (base, _):
        kwargs = {"model": "chat", "messages": MESSAGES, "api_base": base, "api_key": "sk-test", "stream": True}
        list(pipeline.completion(**kwargs))  # connections open; the process reads the views
        trips = count_sent(monkeypatch)  # the blocking client's round trips from here on

        async def read() -> list[object]:
            return [chunk async for chunk in await pipeline.acompletion(**kwargs)]

        async def many(calls: int) -> None:
            await read()  # the batch's client open
            trips.clear()
            await asyncio.gather(*(read() for _ in range(calls)))

        if mode == "sync":
            for _ in range(5):
                list(pipeline.completion(**kwargs))
        else:
            asyncio.run(many(4))
        monkeypatch.undo()
        sent = names(trips)
        assert float(store.get(next(iter(views))) or 0) == 4999 - 6  # one request each, atomically
        if mode == "async":  # every admission went through the batched client (a stream's settlement,
            assert b"EVALSHA" not in sent  # made as it ends, is an EVAL on the blocking one in the store's threads)
        else:
            assert sent.count(b"EVALSHA") == 5  # each admission's one script, no countdown of its own
        for key in views:  # the provider's window resets; the process's copy of the view lags
            store.delete(key)
        chunks = list(pipeline.completion(**kwargs)) if mode == "sync" else asyncio.run(read())
        assert chunks  # answered, not refused
    for key in views:
        assert store.get(key) is None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_streamed_answers_response_cache_entry_rides_its_settlement(redis_url, monkeypatch, mode) -> None:
    """A stream read to its end is saved to the response cache (on the call's store) by the
    settlement's one write, as an answer that is not streamed is. It was a put of its own on the
    blocking client as the stream ended: one more round trip a streamed call, sync or async."""

    pipeline = Pipeline.from_config({"store": redis_url, "cache": {"enabled": True, "policy": "always"},
                                     "context": {"enabled": False}, "app": f"stream-{uuid.uuid4().hex[:8]}",
                                     "routing": {"aliases": {"chat": ["openai/gpt-4o-mini"]}}})
    with replay_server("openai_chat_streaming.yaml", all_headers=True) as (base, _):
        def kwargs(i: int) -> dict[str, object]:
            return {"model": "chat", "messages": [{"role": "user", "content": f"Say hello, {i}."}], "api_base": base,
                    "api_key": "sk-test", "stream": True}

        async def read(i: int) -> list[object]:
            return [chunk async for chunk in await pipeline.acompletion(**kwargs(i))]

        list(pipeline.completion(**kwargs(-1)))  # scripts loaded, connections open
        trips = count_sent(monkeypatch)  # the commands of each round trip of the blocking client
        if mode == "sync":
            for i in range(5):
                list(pipeline.completion(**kwargs(i)))
        else:
            async def many() -> None:
                await asyncio.gather(*(read(i) for i in range(5)))

            asyncio.run(many())
        monkeypatch.undo()
        writes = [trip for trip in trips if b"EVAL" in trip or b"EVALSHA" in trip]
        assert len(writes) == 5  # each stream's settlement, its cache entry with it
        hit = pipeline.completion(**kwargs(3))
        assert list(hit) and outcome(hit).usage.source == "cache"


def test_reply_sizes_that_go_stale_between_a_calls_plan_and_its_admission_are_not_read_on_the_loop(
        redis_url, monkeypatch) -> None:
    """The recent reply sizes (the learned estimates, with a budget) an async call plans with are the
    ones its admission reserves by: kept in the process for a second, one that went stale between the
    call's plan and its admission (under load, a call's steps are that far apart) was read again from
    Redis there, an LRANGE per list on the blocking client, on the event loop."""

    from router_middleware.lifecycle import CallLifecycle

    pipeline = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "context": {"enabled": False},
                                     "app": f"sizes-{uuid.uuid4().hex[:8]}", "routing": {
                                         "aliases": {"chat": ["openai/gpt-4o-mini"]},
                                         "budgets": [{"name": "team", "scope": "app", "usd": 1000}]}})
    kept = pipeline.books._recent
    sized = CallLifecycle._size

    def later(self, plan):  # type: ignore[no-untyped-def]
        for key, (at, value) in list(kept._values.items()):  # a second and a half since the plan read them
            kept._values[key] = (at - 1.5, value)
        return sized(self, plan)

    with replay_server("openai_chat.yaml", all_headers=True) as (base, _):
        kwargs = {"model": "chat", "messages": MESSAGES, "api_base": base, "api_key": "sk-test"}
        pipeline.completion(**kwargs)  # a reply size learned

        async def calls() -> None:
            await pipeline.acompletion(**kwargs)  # the sizes kept, fresh
            monkeypatch.setattr(CallLifecycle, "_size", later)
            on_loop.append(count_sent(monkeypatch, on_loop=True))  # the round trips made on the loop
            await pipeline.acompletion(**kwargs)
            monkeypatch.undo()
            await pipeline.aclose()

        on_loop: list[list[list[bytes]]] = []
        asyncio.run(calls())
    assert on_loop == [[]]
