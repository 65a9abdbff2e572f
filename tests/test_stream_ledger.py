"""A stream that ends early (closed by the caller, or cut by the provider after its first chunk) was
paid for: its budget settles to what was received, and the ledger has its row like every other call's."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

import litellm
import pytest

from router_middleware import Pipeline
from router_middleware.ledger.store import open_ledger

MESSAGES = [{"role": "user", "content": "hello"}]


def ledger_pipeline(tmp_path) -> tuple[Pipeline, str]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    return Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False},
                                 "ledger": {"url": url},
                                 "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}]}}), url


def test_a_stream_closed_early_has_its_ledger_row(tmp_path) -> None:
    p, url = ledger_pipeline(tmp_path)
    stream = p.completion(model="gpt-4o", messages=MESSAGES, mock_response="a b c d e f", stream=True,
                          context={"app": "a"})
    next(stream)
    stream.close()
    p.close()
    spent = float(p.store.get("budget:team:usd:a:0") or 0)
    rows = open_ledger(url).query("SELECT model, error, ended, cost_usd FROM calls")
    assert len(rows) == 1 and rows[0][:3] == ("gpt-4o", "StreamLeft", "stopped")  # as the SDK's row of it
    assert rows[0][3] == pytest.approx(spent)  # the ledger says what the budget counted


def test_a_stream_cut_by_the_provider_has_its_ledger_row_with_the_error(tmp_path, monkeypatch) -> None:
    completion = litellm.completion

    def cut(**kwargs: Any) -> Any:
        inner = completion(**kwargs)
        yield next(inner)
        raise litellm.exceptions.APIConnectionError("connection reset", "openai", "gpt-4o")

    monkeypatch.setattr(litellm, "completion", cut)
    p, url = ledger_pipeline(tmp_path)
    stream = p.completion(model="gpt-4o", messages=MESSAGES, mock_response="a b c d e f", stream=True,
                          context={"app": "a"})
    with pytest.raises(litellm.exceptions.APIConnectionError):
        list(stream)
    p.close()
    rows = open_ledger(url).query("SELECT model, error, ended FROM calls")
    assert rows == [("gpt-4o", "APIConnectionError", "failed")]


@pytest.mark.parametrize("how", ["close", "drop", "aclose"])
def test_a_stream_closed_before_it_is_read_settles_its_reservation_and_is_recorded(how, tmp_path) -> None:
    """The provider answered (the pipeline read the first chunk to fail over before it): a stream the
    caller closes or drops unread is a paid call, settled and in the ledger, not a reservation held
    for reservation_ttl_s nor a span saying no chunk came."""
    import gc

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url},
                              "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}]}})
    kwargs: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES, "mock_response": "a b c d",
                              "context": {"app": how}, "max_tokens": 500, "stream": True}
    if how == "aclose":
        async def unread() -> None:
            stream = await p.acompletion(**kwargs)
            await stream.aclose()

        asyncio.run(unread())
    else:
        stream = p.completion(**kwargs)
        if how == "close":
            stream.close()
        del stream
        gc.collect()
    p.close()
    assert 0 < float(p.store.get(f"budget:team:usd:{how}:0") or 0) < 0.001  # settled to an estimate of what was sent, not the 0.005 reserved
    rows = open_ledger(url).query("SELECT model, error, ended FROM calls")
    assert rows == [("gpt-4o", "StreamLeft", "stopped")]


def test_a_stream_dropped_on_the_event_loop_settles_off_it() -> None:
    """An async stream on a store that can block (``off_loop``), dropped unread while its loop runs:
    its settlement goes to a worker thread, never blocking the loop from the finalizer."""
    import gc
    import threading

    from router_middleware.streaming import TrackedStream

    ended: list[threading.Thread] = []
    done = threading.Event()

    def finish(*_: Any) -> None:
        ended.append(threading.current_thread())
        done.set()

    async def drop(off_loop: bool) -> None:
        stream = TrackedStream(iter(()), finish, 0.0, off_loop=off_loop)
        del stream
        gc.collect()

    for off_loop in (True, False):
        done.clear()
        asyncio.run(drop(off_loop))
        assert done.wait(5)
    assert ended[0] is not threading.main_thread() and ended[1] is threading.main_thread()


STREAMS = ["openai_chat_streaming.yaml", "openai_chat_tools_streaming.yaml", "anthropic_message_streaming.yaml"]


@pytest.mark.parametrize("asked", [False, True], ids=["usage-chunk-added", "usage-chunk-asked"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_read_to_its_end_is_accounted_from_its_usage_chunk_as_from_the_assembled_answer(
        name, mode, asked, monkeypatch) -> None:
    """Assembling a stream's answer (litellm's ``stream_chunk_builder``) costs about 40 us a chunk,
    some 8 ms for a reply of 200 chunks: the pipeline does it only when something reads the answer
    (the response cache, content capture). Otherwise the outcome comes from the usage chunk litellm
    ends the stream with, and is the one the assembled answer gives, on real recordings."""
    import sys

    import vcr

    from router_middleware import wire

    from .cassette_data import completion_kwargs, interactions, recorded_usage
    from .conftest import CASSETTES

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    item = interactions(CASSETTES / name)[0]
    replay = vcr.VCR(record_mode="none", decode_compressed_response=True)
    builder, ours = litellm.stream_chunk_builder, []

    def counted(*args: Any, **kwargs: Any) -> Any:
        if sys._getframe(1).f_globals["__name__"].startswith("router_middleware"):
            ours.append(1)
        return builder(*args, **kwargs)

    monkeypatch.setattr(litellm, "stream_chunk_builder", counted)

    kwargs = {**completion_kwargs(item), **({"stream_options": {"include_usage": True}} if asked else {})}

    def outcome() -> Any:
        pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}})
        with replay.use_cassette(str(CASSETTES / name)):
            if mode == "sync":
                stream = pipeline.completion(**kwargs)
                first = next(stream)
                list(stream)
            else:
                async def read() -> tuple[Any, Any]:
                    stream = await pipeline.acompletion(**kwargs)
                    chunks = [chunk async for chunk in stream]
                    return stream, chunks[0]

                stream, first = asyncio.run(read())
        assert stream.outcome.response_id == first.id  # (litellm names an Anthropic stream anew each call)
        return stream.outcome

    usage = recorded_usage(item)
    cheap = outcome()
    # nothing read the answer: not assembled, unless the provider sent no usage (litellm's builder counts it)
    assert ours == ([] if usage is not None else [1])
    monkeypatch.setattr(wire, "usage_chunk", lambda chunks: None)  # the assembled answer's outcome
    assembled = outcome()
    assert len(ours) == (1 if usage is not None else 2)
    fields = ("model", "provider", "usage", "cost", "finish_reasons")
    assert {f: getattr(cheap, f) for f in fields} == {f: getattr(assembled, f) for f in fields}
    assert cheap.cost.total_usd and cheap.finish_reasons
    if usage is not None:  # the provider's own count, as recorded, and said to be (litellm marks that
        # on no chunk of an async stream: it was said "estimated", and fed no speed average)
        assert (cheap.usage.input_tokens, cheap.usage.output_tokens) == (usage["input_tokens"], usage["output_tokens"])
        assert cheap.usage.source == "provider"
    else:
        assert cheap.usage.source == "estimated"


@pytest.mark.parametrize("asked", [False, True], ids=["usage-chunk-added", "usage-chunk-asked"])
@pytest.mark.parametrize("name", STREAMS)
def test_a_sync_stream_read_to_its_end_is_assembled_by_litellm_once_no_more_than_a_bare_call(name, asked,
                                                                                             monkeypatch) -> None:
    """The pipeline asks litellm for the usage chunk (``stream_options``); litellm's sync stream then
    hands that chunk, and, read once more, assembled the whole answer a second time before it
    stopped (``stream_chunk_builder``, about 40 us a chunk: 30 ms of a 230 ms stream of 195 chunks
    on loopback). The pipeline stops at that chunk: litellm assembles the answer once, no more than
    for a bare call (twice for one that asks for the usage chunk), and the outcome is the provider's
    usage, as recorded. The caller that asked for the usage chunk reads it, as from litellm."""
    import sys

    import vcr

    from .cassette_data import completion_kwargs, interactions, recorded_usage
    from .conftest import CASSETTES

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    item = interactions(CASSETTES / name)[0]
    replay = vcr.VCR(record_mode="none", decode_compressed_response=True)
    builder, built = litellm.stream_chunk_builder, []

    def counted(*args: Any, **kwargs: Any) -> Any:  # litellm's own assemblies (the pipeline's: when no usage came)
        if not sys._getframe(1).f_globals["__name__"].startswith("router_middleware"):
            built.append(1)
        return builder(*args, **kwargs)

    monkeypatch.setattr(litellm, "stream_chunk_builder", counted)
    kwargs = {**completion_kwargs(item), **({"stream_options": {"include_usage": True}} if asked else {})}
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}})
    counts, read = [], []
    for wrapped in (False, True):
        built.clear()
        with replay.use_cassette(str(CASSETTES / name), allow_playback_repeats=True):
            stream = pipeline.completion(**kwargs) if wrapped else litellm.completion(**kwargs)
            chunks = list(stream)
        assert chunks and next(stream, None) is None  # ended: read again, nothing more
        counts.append(len(built))
        read.append([bool(c.choices) for c in chunks])
    assert counts[1] == 1 <= counts[0]  # (litellm assembles a bare call's stream twice where its provider sent no usage)
    if asked:  # the same chunks, the usage chunk (no choices) last
        assert read[0] == read[1] and not read[1][-1]
    usage = recorded_usage(item)
    if usage is not None:
        assert (stream.outcome.usage.input_tokens, stream.outcome.usage.output_tokens) == \
            (usage["input_tokens"], usage["output_tokens"]) and stream.outcome.usage.source == "provider"


def _read_to_end(pipeline: Pipeline, kwargs: dict[str, Any], mode: str) -> Any:
    """A stream of ``pipeline`` (``mode``: sync or async) read to its end."""
    if mode == "sync":
        stream = pipeline.completion(**kwargs)
        list(stream)
        return stream

    async def read() -> Any:
        stream = await pipeline.acompletion(**kwargs)
        _ = [chunk async for chunk in stream]
        return stream

    return asyncio.run(read())


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("model", ["groq/openai/gpt-oss-120b", "mistral/mistral-small-latest"])
@pytest.mark.parametrize(("name", "source"), [("openai_chat_streaming.yaml", "provider"),
                                              ("openai_chat_tools_streaming.yaml", "estimated")])
def test_a_stream_of_a_provider_asked_no_usage_chunk_says_whether_it_sent_usage(name, source, model, mode) -> None:
    """Of Groq or Mistral the pipeline asks no usage chunk (they send usage unasked, OpenAI-style): a
    recorded stream with the provider's usage is ``provider``, one without it (litellm counted its
    tokens) ``estimated``. litellm overwrites the last chunk's hidden usage with its counted total at
    the end of such a stream: read there, the count was said to be the provider's, fed the speed
    averages, and routed ``:nitro`` by litellm's guess."""
    from .replay_server import replay_server

    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False},
                                     "routing": {"aliases": {"chat": [model]}}})  # (speed is kept for routing)
    with replay_server(name) as (base, bodies):
        kwargs = {"model": model, "messages": MESSAGES, "api_base": base, "api_key": "sk-test", "stream": True}
        stream = _read_to_end(pipeline, kwargs, mode)
    assert "stream_options" not in bodies[0]
    assert stream.outcome.usage.source == source
    assert stream.outcome.usage.output_tokens > 0
    assert bool(pipeline.store.get(f"tps:{model}")) is (source == "provider")  # only a provider's count feeds it


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "groq/openai/gpt-oss-120b"])
def test_a_stream_read_to_its_end_without_the_provider_s_usage_counts_its_tools_in_the_prompt(model, mode) -> None:
    """A real stream with no usage from the provider (the recording of a tool call), read to its end,
    the request carrying the recording's tool: litellm fills in its own count (a usage chunk it adds,
    or the last chunk's usage), which leaves the tool definitions out (8 input tokens here, 82 with the tool), so the
    call was charged less than the budget reserved for it. Its prompt is now the request counted
    locally, tools included, as for a stream cut short."""
    from .cassette_data import interactions
    from .conftest import CASSETTES
    from .replay_server import replay_server

    tools = interactions(CASSETTES / "openai_chat_tools_streaming.yaml")[0].request["tools"]
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}})
    with replay_server("openai_chat_tools_streaming.yaml") as (base, _bodies):
        kwargs = {"model": model, "messages": MESSAGES, "tools": tools, "api_base": base, "api_key": "sk-test",
                  "stream": True}
        stream = _read_to_end(pipeline, kwargs, mode)
    usage = stream.outcome.usage
    counted = pipeline.state.tokens(model, MESSAGES, tools)
    assert usage.source == "estimated" and usage.output_tokens > 0
    assert usage.input_tokens == counted > litellm.token_counter(model="gpt-4o-mini", messages=MESSAGES) + 30


def test_an_off_loop_stream_read_to_its_end_ends_complete_when_its_reader_is_cancelled_meanwhile() -> None:
    """An async stream read to its end settles in a worker thread: when its reading task is cancelled
    while that settlement waits for a free worker, it still ends read to its end (it was recorded as
    left, ``StreamLeft``, once the stream was dropped), and once."""
    import contextlib
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from router_middleware.streaming import TrackedStream

    class Chunks:
        def __init__(self) -> None:
            self.left = [1, 2]

        async def __anext__(self) -> int:
            if not self.left:
                raise StopAsyncIteration
            return self.left.pop(0)

    ended: list[tuple[list[Any], BaseException | None]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        gate = threading.Event()
        busy = loop.run_in_executor(None, gate.wait)  # the one worker is taken
        streams = [TrackedStream(Chunks(), lambda chunks, *rest: ended.append((list(chunks), rest[2])), 0.0,
                                 off_loop=True)]

        async def read() -> None:
            async for _ in streams[0]:
                pass

        task = asyncio.create_task(read())
        await asyncio.sleep(0.05)  # both chunks read: the settlement waits for the worker
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        streams.clear()  # dropped: its finalizer would end it now, were it not ending already
        gate.set()
        await busy
        for _ in range(200):
            if ended:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert ended == [([1, 2], None)]


@pytest.mark.parametrize("stop", ["drop", "close"])
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("name", STREAMS)
def test_a_stream_left_at_its_finish_reason_is_complete(name, mode, stop, tmp_path, monkeypatch) -> None:
    """A caller that stops at the chunk that ends the answer (``if chunk.choices[0].finish_reason:
    break``) had the whole answer: its call is ``complete`` when it closes or drops the stream (it was
    ``stopped``, ``StreamLeft``), at litellm's count of the chunks, the usage chunk unread."""
    import vcr

    from router_middleware import wire

    from .cassette_data import completion_kwargs, interactions
    from .conftest import CASSETTES

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    item = interactions(CASSETTES / name)[0]
    replay = vcr.VCR(record_mode="none", decode_compressed_response=True)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False},
                                     "ledger": {"url": url}})

    def ends(chunk: Any) -> bool:
        return bool(chunk.choices) and all(c.finish_reason for c in chunk.choices)

    with replay.use_cassette(str(CASSETTES / name)):
        if mode == "sync":
            stream = pipeline.completion(**completion_kwargs(item))
            read = []
            for chunk in stream:
                read.append(chunk)
                if ends(chunk):
                    break
            if stop == "close":
                stream.close()
            del stream
        else:
            async def run() -> list[Any]:
                stream = await pipeline.acompletion(**completion_kwargs(item))
                read = []
                async for chunk in stream:
                    read.append(chunk)
                    if ends(chunk):
                        break
                if stop == "close":
                    await stream.aclose()
                return read

            read = asyncio.run(run())
    rows: list[Any] = []
    deadline = time.monotonic() + 10  # a stream dropped on the event loop settles in a thread
    while not rows and time.monotonic() < deadline:
        gc.collect()
        pipeline.ledger.flush()
        rows = open_ledger(url).query("SELECT error, ended, input_tokens, output_tokens, cost_usd FROM calls")
    pipeline.close()
    assert ends(read[-1])
    assert len(rows) == 1 and rows[0][:2] == (None, "complete")
    assert rows[0][2] > 0 and rows[0][4] > 0
    assert rows[0][3] == wire.streamed_output_tokens(read)  # litellm's count of the answer the caller read


@pytest.mark.parametrize("how", ["close", "drop", "aclose"])
@pytest.mark.parametrize(("sent", "answers", "read", "error"), [
    (["a", "b:stop", "usage"], 1, 2, None),  # left at the finish reason: the (hidden) usage chunk never read
    (["a", "b:stop", "usage"], 1, 1, "StreamLeft"),  # left before it
    (["0a", "1x", "0b:stop", "1y:stop"], 2, 3, "StreamLeft"),  # n=2: one answer ended, the other goes on
    (["0a", "1x", "0b:stop", "1y:stop"], 2, 4, None),  # both ended
], ids=["at-finish", "before-finish", "one-of-two-ended", "both-ended"])
def test_a_stream_left_once_each_answer_has_ended_ends_complete_without_reading_on(sent, answers, read, error,
                                                                                  how) -> None:
    from types import SimpleNamespace

    from router_middleware.streaming import TrackedStream

    def chunk(text: str) -> Any:
        if text == "usage":
            return SimpleNamespace(choices=[], usage=1)
        index, text = (int(text[0]), text[1:]) if text[0].isdigit() else (0, text)
        content, _, finish = text.partition(":")
        return SimpleNamespace(choices=[SimpleNamespace(index=index, delta=content, finish_reason=finish or None)])

    class Inner:  # a provider that sends nothing more once ``read`` chunks are out (a read would fail)
        def __init__(self) -> None:
            self.left = [chunk(text) for text in sent]

        def __next__(self) -> Any:
            assert len(self.left) > len(sent) - read, "read past what the caller asked for"
            return self.left.pop(0)

        async def __anext__(self) -> Any:
            return self.__next__()

    ended: list[BaseException | None] = []
    stream = TrackedStream(Inner(), lambda chunks, *rest: ended.append(rest[2]), 0.0, hide_usage=True,
                           answers=answers)

    async def leave() -> None:
        for _ in range(read):
            await stream.__anext__()
        await stream.aclose()

    if how == "aclose":
        asyncio.run(leave())
    else:
        for _ in range(read):
            next(stream)
        if how == "close":
            stream.close()
        else:
            del stream
            gc.collect()
    assert len(ended) == 1 and (type(ended[0]).__name__ if ended[0] else None) == error


def test_a_stream_sent_as_given_keeps_the_provider_s_prompt_and_counts_tools_where_it_sent_none() -> None:
    """``Pipeline.send`` (RouterAgentMiddleware's attempt through a RoutedChatModel) on real recordings:
    a stream whose reader leaves after the provider's usage chunk, before the stream's end, keeps the
    provider's prompt count (estimated: the stream was not read out); a stream with no usage from
    the provider counts its prompt with the tool definitions, as ``Pipeline.completion`` does
    (before, litellm's count without them: 8 tokens for 82)."""
    from .cassette_data import interactions
    from .conftest import CASSETTES
    from .replay_server import replay_server

    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}})
    given = {"api_key": "sk-test", "stream": True}
    with replay_server("openai_chat_streaming.yaml") as (base, _):
        whole = pipeline.send("gpt-3.5-turbo", MESSAGES, api_base=base, stream_options={"include_usage": True}, **given)
        count = len(list(whole))
        left = pipeline.send("gpt-3.5-turbo", MESSAGES, api_base=base, stream_options={"include_usage": True}, **given)
        read = [next(left) for _ in range(count)]
        left.close()
    assert getattr(read[-1], "usage", None) is not None  # the usage chunk was read, the stream's end was not
    assert whole.outcome.usage.source == "provider" and left.outcome.usage.source == "estimated"
    assert left.outcome.usage.input_tokens == whole.outcome.usage.input_tokens
    tools = interactions(CASSETTES / "openai_chat_tools_streaming.yaml")[0].request["tools"]
    with replay_server("openai_chat_tools_streaming.yaml") as (base, _):
        unreported = pipeline.send("gpt-4o-mini", MESSAGES, tools=tools, api_base=base, **given)
        list(unreported)
    assert unreported.outcome.usage.source == "estimated"
    assert unreported.outcome.usage.input_tokens == pipeline.state.tokens("gpt-4o-mini", MESSAGES, tools) > 30
