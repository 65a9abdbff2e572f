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


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_concurrent_calls_on_redis_write_speed_and_the_providers_quota_view_in_their_settlement(
        redis_url, monkeypatch, mode) -> None:
    """Each speed average is blended into the store, and the provider's requests and tokens left are
    set, in the settlement's one write. An average was a read then a compare-and-set, tried up to
    five times: under concurrency most tries lost to another call's write (samples dropped), and on
    the async path the retries ran on the blocking client in the store's threads, two to ten round
    trips a call, the heaviest Redis traffic of a routed call; the provider's view was a SET per unit
    on that client too."""
    from redis.connection import Connection

    pipeline = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "context": {"enabled": False},
                                     "app": f"speed-{uuid.uuid4().hex[:8]}",
                                     "routing": {"aliases": {"chat": ["openai/gpt-4o-mini"]},
                                                 "limits": {"openai/gpt-4o-mini": {"rpm": 10_000, "tpm": 10**7}}}})
    with replay_server("openai_chat.yaml", all_headers=True) as (base, _):
        kwargs = {"model": "chat", "messages": MESSAGES, "api_base": base, "api_key": "sk-test"}
        pipeline.completion(**kwargs)  # scripts loaded, connections open, the views read once
        sent: list[bytes] = []  # the names of the commands the blocking client sent
        original = Connection.send_packed_command

        def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
            sent.extend(command_names(command if isinstance(command, bytes) else b"".join(command)))
            return original(self, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counted)
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
                sent.clear()
                answers = await asyncio.gather(*(pipeline.acompletion(**kwargs) for _ in range(20)))
                assert {outcome(a).usage.source for a in answers} == {"provider"}
                await pipeline.aclose()

            asyncio.run(many())
        monkeypatch.undo()
    if mode == "async":
        assert sent == []  # every read and write of the async path went through the batched client
    else:
        assert b"GET" not in sent  # no read of an average before writing it
        assert len(sent) <= 10 * 2  # an admission and a settlement a call at most (the views read seldom)
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
    from redis.connection import Connection

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
        sent: list[bytes] = []
        original = Connection.send_packed_command

        def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
            sent.extend(command_names(command if isinstance(command, bytes) else b"".join(command)))
            return original(self, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counted)
        if mode == "sync":
            for _ in range(5):
                pipeline.completion(**kwargs)
        else:
            async def many() -> None:
                await pipeline.acompletion(**kwargs)  # the batch's client open
                sent.clear()
                await asyncio.gather(*(pipeline.acompletion(**kwargs) for _ in range(10)))
                await pipeline.aclose()

            asyncio.run(many())
        monkeypatch.undo()
    assert b"SET" not in sent  # no write of its own: the settlement's script sets it
    if mode == "async":
        assert sent == []
    key = f"route:{session}"
    assert SessionRoute.decode(pipeline.store.get(key) or b"{}").target == "openai/gpt-4o-mini"
    assert 0 < pipeline.store.client.pttl(pipeline.store._k(key)) <= 300_000
