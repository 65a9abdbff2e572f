"""The speed averages behind ``:nitro`` and latency routing, fed by calls whose usage the provider
reported (real recordings, replayed over litellm's HTTP path)."""

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
def test_concurrent_calls_on_redis_feed_the_speed_averages_in_their_settlement(redis_url, monkeypatch, mode) -> None:
    """Each average is blended into the store in the settlement's one write. It was a read then a
    compare-and-set, tried up to five times: under concurrency most tries lost to another call's
    write (samples dropped), and on the async path the retries ran on the blocking client in the
    store's threads, two to ten round trips a call, the heaviest Redis traffic of a routed call."""
    from redis.connection import Connection

    pipeline = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "context": {"enabled": False},
                                     "app": f"speed-{uuid.uuid4().hex[:8]}",
                                     "routing": {"aliases": {"chat": ["openai/gpt-4o-mini"]}}})
    with replay_server("openai_chat.yaml") as (base, _):
        kwargs = {"model": "chat", "messages": MESSAGES, "api_base": base, "api_key": "sk-test"}
        pipeline.completion(**kwargs)  # scripts loaded, connections open, the views read once
        sent: list[bytes] = []  # the names of the commands the blocking client sent
        original = Connection.send_packed_command

        def counted(self, command, check_health=True):  # type: ignore[no-untyped-def]
            sent.extend(command_names(command if isinstance(command, bytes) else b"".join(command)))
            return original(self, command, check_health)

        monkeypatch.setattr(Connection, "send_packed_command", counted)
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
