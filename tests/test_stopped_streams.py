"""A stream its caller stops reading partway is the same ledger row through every way in: settled at
what it used, ``ended`` ``stopped`` (not ``failed``: the provider did nothing wrong), named in the
report apart from the failed calls, and its span saying so. A stream its provider breaks stays
``failed`` (``tests/test_stream_ledger.py``)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
from collections.abc import Callable
from typing import Any

import litellm
import pytest
from opentelemetry.trace import SpanKind

from router_middleware import Pipeline
from router_middleware.langchain import RoutedChatModel
from router_middleware.ledger.report import build_report
from router_middleware.ledger.store import open_ledger
from router_middleware.litellm import RouterLogger
from router_middleware.wire import drain_callbacks

ANSWER = "The quick brown fox jumps over the lazy dog. " * 5
MESSAGES = [{"role": "user", "content": "Tell me about foxes"}]
READ = 3
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city, now.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


Tools = dict[str, Any]  # more keyword arguments of the call: {}, {"tools": TOOLS}, {"user": ...}


def _polled(check: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def _pipeline_sync(p: Pipeline, tools: Tools) -> int:
    stream = p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response=ANSWER, stream=True, **tools)
    came = len(list(itertools.islice(stream, READ)))
    stream.close()
    return came


def _pipeline_async(p: Pipeline, tools: Tools) -> int:
    async def run() -> int:
        stream = await p.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response=ANSWER, stream=True,
                                     **tools)
        came = 0
        async for _chunk in stream:
            came += 1
            if came == READ:
                break
        await stream.aclose()
        return came

    return asyncio.run(run())


def _chat_model(p: Pipeline, tools: Tools) -> int:
    model = RoutedChatModel(model="gpt-4o-mini", pipeline=p, model_kwargs={"mock_response": ANSWER})
    chunks = (model.bind_tools(tools["tools"]) if tools else model).stream(MESSAGES)
    came = len(list(itertools.islice(chunks, READ)))
    chunks.close()  # what a ``for`` loop broken out of does once the generator is dropped
    return came


def _sdk_sync(p: Pipeline, tools: Tools) -> int:
    logger = RouterLogger(p).register()
    try:
        stream = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response=ANSWER, stream=True,
                                    **tools)
        came = len(list(itertools.islice(stream, READ)))
        del stream
        assert _polled(lambda: gc.collect() >= 0 and logger.recorded >= 1)
    finally:
        logger.unregister()
    return came


def _sdk_async(p: Pipeline, tools: Tools) -> int:
    logger = RouterLogger(p).register()

    async def run() -> int:
        stream = await litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response=ANSWER,
                                           stream=True, **tools)
        came = 0
        async for _chunk in stream:
            came += 1
            if came == READ:
                break
        del stream, _chunk
        deadline = time.monotonic() + 10
        while logger._calls and time.monotonic() < deadline:
            gc.collect()
            await asyncio.sleep(0.02)
        await logger.aflush()
        return came

    try:
        return asyncio.run(run())
    finally:
        logger.unregister()


WAYS = {"Pipeline.completion": _pipeline_sync, "Pipeline.acompletion": _pipeline_async,
        "RoutedChatModel.stream": _chat_model, "litellm.completion": _sdk_sync, "litellm.acompletion": _sdk_async}


@pytest.mark.parametrize("way", WAYS)
def test_a_stream_the_caller_stops_is_one_stopped_row_through_every_way_in(way, tmp_path, monkeypatch,
                                                                         span_exporter) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(drain_callbacks())
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url},
                              "routing": {"budgets": [{"name": "daily", "scope": "global", "tokens": 100000,
                                                                  "window_s": 86400}]}})
    try:
        assert WAYS[way](p, {}) == READ
        p.ledger.flush()
        counter = float(p.store.get(f"budget:daily:tokens:all:{int(time.time() // 86400)}") or 0)
    finally:
        p.close()
    db = open_ledger(url)
    try:
        rows = db.query("SELECT error, ended, input_tokens, output_tokens, cost_usd FROM calls")
        report = build_report(db)
    finally:
        db.close()
    assert len(rows) == 1, rows
    error, ended, input_tokens, output_tokens, cost = rows[0]
    assert ended == "stopped" and error in ("StreamLeft", "CancelledError")
    assert input_tokens > 0 and cost > 0 and counter >= input_tokens  # paid for, and charged to the budget
    assert output_tokens < litellm.token_counter(model="gpt-4o-mini", text=ANSWER)  # only what came
    assert (report["totals"]["stopped_calls"], report["totals"]["failed_calls"]) == (1, 0)
    spans = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert spans and all(s.attributes.get("router_middleware.ended") == "stopped" for s in spans)



@pytest.mark.parametrize("way", WAYS)
def test_a_stopped_stream_s_prompt_counts_the_tool_definitions_it_sent_through_every_way_in(way, tmp_path,
                                                                                          monkeypatch) -> None:
    """A stream stopped before its usage came is settled at its prompt counted locally. The pipeline's
    streams and the agent middleware counted the messages alone (litellm's builder does), leaving out the
    tool definitions sent with them, which the provider bills and the budget's reservation counts: the
    row said 9 input tokens where the request held about 60 more. Every way in now counts the request
    as the reservation did."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(drain_callbacks())
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}})
    try:
        assert WAYS[way](p, {"tools": TOOLS}) == READ
        p.ledger.flush()
        with_tools, without = p.state.tokens("gpt-4o-mini", MESSAGES, TOOLS), p.state.tokens("gpt-4o-mini", MESSAGES)
    finally:
        p.close()
    db = open_ledger(url)
    try:
        rows = db.query("SELECT ended, input_tokens FROM calls")
    finally:
        db.close()
    assert with_tools > without + 30
    assert rows == [("stopped", with_tools)]


@pytest.mark.parametrize("way", ["Pipeline.completion", "Pipeline.acompletion", "litellm.completion",
                                 "litellm.acompletion"])
def test_a_stopped_stream_is_charged_to_the_end_user_its_openai_user_field_names(way, monkeypatch) -> None:
    """OpenAI's ``user`` field names the call's user, where its labels name none, through every way
    in that takes it: a sync SDK stream left partway is settled from what was kept of its request,
    which had dropped the field, and ``Pipeline.completion`` read only ``context=``."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(drain_callbacks())
    p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
        {"name": "per-user", "scope": "user", "usd": 1.0}]}})
    try:
        assert WAYS[way](p, {"user": "ivan"}) == READ
        spent = float(p.store.get("budget:per-user:usd:ivan:0") or 0)
    finally:
        p.close()
    assert spent > 0


_LEFT_AT_EXIT = {
    "pipeline-sync": ("stream = p.completion(**KW)\n"
                      "for i, _ in zip(range(3), stream): pass\n"),
    "pipeline-async": ("import asyncio\n"
                       "async def main():\n"
                       "    stream = await p.acompletion(**KW)\n"
                       "    i = 0\n"
                       "    async for _ in stream:\n"
                       "        i += 1\n"
                       "        if i == 3: break\n"
                       "    return stream\n"
                       "stream = asyncio.run(main())\n"),
    "litellm-sync": ("import litellm\n"
                     "from router_middleware.litellm import RouterLogger\n"
                     "RouterLogger(p).register()\n"
                     "stream = litellm.completion(**KW)\n"
                     "for i, _ in zip(range(3), stream): pass\n"),
    "langchain-handler": ("from langchain_core.language_models.fake_chat_models import GenericFakeChatModel\n"
                          "from langchain_core.messages import AIMessage\n"
                          "from router_middleware.langchain import RouterCallbackHandler\n"
                          "model = GenericFakeChatModel(messages=iter([AIMessage(KW['mock_response'])]))\n"
                          "stream = model.stream(KW['messages'][0]['content'],\n"
                          "                      config={'callbacks': [RouterCallbackHandler(p)]})\n"
                          "for i, _ in zip(range(3), stream): pass\n"),
}


@pytest.mark.parametrize("way", sorted(_LEFT_AT_EXIT))
def test_a_stream_a_script_leaves_open_as_it_ends_is_a_stopped_row_and_frees_its_budget(way, redis_url,
                                                                                     tmp_path) -> None:
    """A script reads part of a stream, keeps it (a module-level name), and ends. The stream's
    finalizer ran during the interpreter's teardown, where litellm's builder failed (or, through
    litellm with the logger, never ran; a LangChain model's observed by ``RouterCallbackHandler``:
    its ``on_llm_error`` came where imports failed): no ledger row, and its budget hold on Redis counted for
    ``reservation_ttl_s`` against every process sharing the budget. Now it ends at the exit, as a
    ``stopped`` row settled at what it used, its hold released."""
    import subprocess
    import sys
    import uuid

    import redis

    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    name = f"exit{uuid.uuid4().hex[:8]}"
    config = {"store": redis_url, "ledger": {"url": ledger}, "cache": {"enabled": False},
              "routing": {"budgets": [{"name": name, "scope": "global", "tokens": 100000, "window_s": 86400}]}}
    script = ("from router_middleware import Pipeline\n"
              f"p = Pipeline.from_config({config!r})\n"
              f"KW = dict(model='gpt-4o-mini', messages={MESSAGES!r}, mock_response={ANSWER!r}, stream=True,"
              " max_tokens=500)\n" + _LEFT_AT_EXIT[way])
    run = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr and "ERROR" not in run.stderr, run.stderr
    rows = open_ledger(ledger).query("SELECT error, ended, input_tokens, output_tokens FROM calls")
    assert [(r[0], r[1]) for r in rows] == [("StreamLeft", "stopped")] and rows[0][3] > 0
    client = redis.Redis.from_url(redis_url)
    day = int(time.time() // 86400)
    key = f"rm:budget:{name}:tokens:all:{day}"
    assert float(client.get(key)) == rows[0][2] + rows[0][3]
    assert not client.zrange(f"{key}#held", 0, -1)  # nothing still held
