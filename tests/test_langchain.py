"""The LangChain integration on real recordings: RoutedChatModel (routing, tool calls, streaming,
structured output), RouterCallbackHandler (any chat model: streaming, async, batch, errors, nested
runs) and RouterAgentMiddleware in a real ``create_agent`` loop with a tool."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import vcr
import yaml
from langchain.agents.middleware import ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel

from router_middleware import ConfigError, Pipeline
from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware, RouterCallbackHandler
from router_middleware.langchain.convert import to_openai

from .cassette_data import capturing_vcr, completion_kwargs, interactions, recorded_usage
from .conftest import CASSETTES

REPLAY = vcr.VCR(record_mode="none", decode_compressed_response=True)


@pytest.fixture(autouse=True)
def _keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")


def _recorded_stream_args(item: Any) -> dict[str, Any]:
    """The tool-call arguments a recorded stream carried, decoded from its SSE lines."""
    fragments = []
    for line in item.response_text.splitlines():
        if line.startswith("data:") and "[DONE]" not in line:
            for call in (json.loads(line[5:])["choices"][0]["delta"].get("tool_calls") or []):
                fragments.append(call["function"].get("arguments") or "")
    return json.loads("".join(fragments))


def _routed(**model: Any) -> RoutedChatModel:
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-3.5-turbo", "gpt-4o-mini"]}},
                                     "cache": {"enabled": False}})
    return RoutedChatModel(model="coder", pipeline=pipeline, **model)


def test_routed_model_streams_a_recorded_tool_call_through_an_alias() -> None:
    item = interactions(CASSETTES / "openai_chat_tools_streaming.yaml")[0]
    kwargs = completion_kwargs(item)
    model = _routed().bind_tools(kwargs["tools"])
    with REPLAY.use_cassette(str(CASSETTES / "openai_chat_tools_streaming.yaml")):
        chunks = list(model.stream(kwargs["messages"]))
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk
    assert message.tool_calls[0]["name"] == "get_current_weather"
    assert message.tool_calls[0]["args"] == _recorded_stream_args(item) == {"location": "San Francisco"}
    assert message.response_metadata["model_name"] == "gpt-3.5-turbo-0125"  # the model that answered
    assert message.response_metadata["requested_model"] == "coder"
    assert message.usage_metadata["output_tokens"] > 0  # no usage chunk was recorded: estimated, once


def test_routed_models_told_apart_by_their_endpoint_or_model_kwargs_do_not_share_langchain_s_cache() -> None:
    """With LangChain's global LLM cache on, two RoutedChatModels told apart only by ``api_base``, ``stop``
    or ``model_kwargs`` had one cache key (their settings' key named only model, temperature and
    max_tokens): the second served the first's answer. A secret in them is masked in the key."""
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import set_llm_cache

    llm_cache = InMemoryCache()
    set_llm_cache(llm_cache)
    inner = Pipeline.from_config({"telemetry": {"enabled": False}, "cache": {"enabled": False}})
    try:
        answers = [RoutedChatModel(model="gpt-4o-mini", pipeline=inner, temperature=0, **settings).invoke("hi").content
                   for settings in ({"model_kwargs": {"mock_response": "a"}}, {"model_kwargs": {"mock_response": "b"}},
                                    {"model_kwargs": {"mock_response": "c", "api_key": "sk-secret-1"}},
                                    {"model_kwargs": {"mock_response": "d"}, "api_base": "http://127.0.0.1:9/v1"},
                                    {"model_kwargs": {"mock_response": "e"}, "stop": ["END"]})]
    finally:
        set_llm_cache(None)
    assert answers == ["a", "b", "c", "d", "e"]
    assert not [key for key in llm_cache._cache if "sk-secret-1" in key[1]]
    plain, stopping = (RoutedChatModel(model="gpt-4o-mini", pipeline=inner, **stop) for stop in ({}, {"stop": ["END"]}))
    assert plain._get_llm_string() != stopping._get_llm_string()  # its own stop is sent: another answer
    odd = [RoutedChatModel(model="gpt-4o-mini", pipeline=inner, model_kwargs={"extra_body": {"lock": threading.Lock()}})
           for _ in range(2)]  # settings no key can hold: each model keys its own entries
    assert odd[0]._get_llm_string() != odd[1]._get_llm_string() and odd[0]._get_llm_string() == odd[0]._get_llm_string()


def test_routed_model_reads_recorded_anthropic_tool_use_and_usage() -> None:
    item = interactions(CASSETTES / "anthropic_tools.yaml")[0]
    kwargs = completion_kwargs(item)
    model = RoutedChatModel(model=kwargs["model"], max_tokens=kwargs["max_tokens"], pipeline=Pipeline())
    with REPLAY.use_cassette(str(CASSETTES / "anthropic_tools.yaml")):
        message = model.bind_tools(kwargs["tools"]).invoke(kwargs["messages"])
    recorded = [b for b in json.loads(item.response_text)["content"] if b["type"] == "tool_use"]
    assert [(c["name"], c["args"], c["id"]) for c in message.tool_calls] == \
        [(b["name"], b["input"], b["id"]) for b in recorded]
    usage = recorded_usage(item)
    assert message.usage_metadata["input_tokens"] == usage["input_tokens"]
    assert message.usage_metadata["output_tokens"] == usage["output_tokens"]
    assert message.response_metadata["cost_usd"] > 0


def test_routed_model_keeps_anthropic_s_signed_thinking_for_the_next_turn() -> None:
    """Anthropic refuses (a 400) an assistant turn sent back without the signed thinking block it
    answered with, when thinking is on: the AIMessage kept only ``reasoning_content``, so the next
    turn of an agent's tool loop went out with no thinking block (litellm's own message keeps it)."""
    import litellm

    item = interactions(CASSETTES / "anthropic_thinking.yaml")[0]
    kwargs = completion_kwargs(item)
    model = RoutedChatModel(model=kwargs["model"], max_tokens=kwargs["max_tokens"], pipeline=Pipeline(),
                            model_kwargs={"thinking": kwargs["thinking"]})
    with REPLAY.use_cassette(str(CASSETTES / "anthropic_thinking.yaml")):
        message = model.invoke(kwargs["messages"])
    recorded = [{"type": "thinking", "thinking": b["thinking"], "signature": b["signature"]}
                for b in json.loads(item.response_text)["content"] if b["type"] == "thinking"]
    assert recorded and recorded[0]["signature"]
    assert message.additional_kwargs["thinking_blocks"] == recorded
    history = to_openai([HumanMessage("How many r's in strawberry?"), message, HumanMessage("And in raspberry?")])
    assert history[1]["thinking_blocks"] == recorded
    body = litellm.AnthropicConfig().transform_request(
        model="claude-3-7-sonnet-20250219", messages=history, litellm_params={}, headers={},
        optional_params={"thinking": kwargs["thinking"], "max_tokens": kwargs["max_tokens"]})
    turn = next(m for m in body["messages"] if m["role"] == "assistant")
    assert turn["content"][0] == recorded[0]  # first, signed, as Anthropic needs it


def test_a_streamed_answer_keeps_anthropic_s_signed_thinking_for_the_next_turn() -> None:
    """A stream's thinking arrives in fragments (text, then the signature) that litellm numbers by block:
    the chunks carry them with that index, so LangChain's merge of the stream rebuilds the signed block.
    (No recording of a streamed thinking answer exists: litellm's own stream objects, as its Anthropic
    stream handler builds them.)"""
    import litellm
    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

    from router_middleware.langchain.convert import to_chunk

    deltas = [Delta(reasoning_content="Let me ", thinking_blocks=[{"type": "thinking", "thinking": "Let me ", "index": 0}]),
              Delta(reasoning_content="count.", thinking_blocks=[{"type": "thinking", "thinking": "count.", "index": 0}]),
              Delta(thinking_blocks=[{"type": "thinking", "thinking": "", "signature": "EqQB", "index": 0}]),
              Delta(content="Three.")]
    chunks = [to_chunk(ModelResponseStream(choices=[StreamingChoices(delta=delta)])) for delta in deltas]
    merged = chunks[0]
    for chunk in chunks[1:]:
        assert chunk is not None
        merged += chunk
    assert merged is not None and merged.content == "Three."
    assert merged.additional_kwargs["thinking_blocks"] == [
        {"type": "thinking", "thinking": "Let me count.", "signature": "EqQB", "index": 0}]
    history = to_openai([HumanMessage("How many r's in strawberry?"), AIMessage(**merged.model_dump(
        include={"content", "additional_kwargs"})), HumanMessage("And in raspberry?")])
    body = litellm.AnthropicConfig().transform_request(
        model="claude-3-7-sonnet-20250219", messages=history, litellm_params={}, headers={},
        optional_params={"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048})
    turn = next(m for m in body["messages"] if m["role"] == "assistant")
    assert turn["content"][0] == {"type": "thinking", "thinking": "Let me count.", "signature": "EqQB"}


def test_structured_output_from_a_recorded_tool_call() -> None:
    item = interactions(CASSETTES / "openai_chat_tools_streaming.yaml")[0]
    kwargs = completion_kwargs(item)
    schema = kwargs["tools"][0]
    with REPLAY.use_cassette(str(CASSETTES / "openai_chat_tools_streaming.yaml")):
        parsed = _routed(streaming=True).with_structured_output(schema).invoke(kwargs["messages"])
    assert parsed == _recorded_stream_args(item)


def test_async_invoke_replays_usage_exactly() -> None:
    item = interactions(CASSETTES / "openai_chat.yaml")[0]
    kwargs = completion_kwargs(item)
    with REPLAY.use_cassette(str(CASSETTES / "openai_chat.yaml")):
        message = asyncio.run(RoutedChatModel(model=kwargs["model"]).ainvoke(kwargs["messages"]))
    usage = recorded_usage(item)
    assert (message.usage_metadata["input_tokens"], message.usage_metadata["output_tokens"]) == \
        (usage["input_tokens"], usage["output_tokens"])


def test_bind_tools_strict_marks_each_function_not_the_request() -> None:
    """``bind_tools(tools, strict=True)`` as ChatOpenAI sends it: ``strict`` on each function (with
    ``additionalProperties: false``), not a top-level request field OpenAI refuses with a 400."""
    item = interactions(CASSETTES / "openai_chat_tools_streaming.yaml")[0]
    kwargs = completion_kwargs(item)
    replayer, sent = capturing_vcr()
    with replayer.use_cassette(str(CASSETTES / "openai_chat_tools_streaming.yaml")):
        functions = [t["function"] for t in kwargs["tools"]]  # (a tool in OpenAI's own format is sent as given)
        message = _routed(streaming=True).bind_tools(functions, tool_choice="any", strict=True).invoke(
            kwargs["messages"])
    assert message.tool_calls[0]["args"] == _recorded_stream_args(item)
    body = sent[-1]  # (the matcher sees the one request more than once)
    assert "strict" not in body
    function = body["tools"][0]["function"]
    assert function["strict"] is True and function["parameters"]["additionalProperties"] is False


class Weather(BaseModel):
    location: str


def _structured(method: str, **kwargs: Any) -> Any:
    model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline.from_config({"cache": {"enabled": False}}),
                            model_kwargs={"mock_response": '{"location": "San Francisco"}'})
    return model.with_structured_output(Weather, method=method, **kwargs)


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_structured_output_by_json_schema_or_json_mode_asks_for_a_response_format(method: str) -> None:
    """``with_structured_output(method="json_schema" | "json_mode")`` asks the model for JSON content
    (``response_format``), as ChatOpenAI does, and parses it; not a forced tool call in its place
    (langchain-core's default drops ``method`` and ``strict``), which a model without tools cannot answer."""
    from .capture_server import capture_server

    strict = True if method == "json_schema" else None
    with capture_server() as (base, bodies):
        model = RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline.from_config({"cache": {"enabled": False}}),
                                api_base=base, api_key="test-key", max_retries=0, model_kwargs={"num_retries": 0})
        with pytest.raises(Exception):  # noqa: B017, PT011 - the capture server answers 500: the body is what counts
            model.with_structured_output(Weather, method=method, strict=strict).invoke("Weather in SF?")
    body = bodies[-1]
    assert "tools" not in body and "tool_choice" not in body
    if method == "json_schema":
        assert body["response_format"]["type"] == "json_schema"
        schema = body["response_format"]["json_schema"]
        assert (schema["name"], schema["strict"], schema["schema"]["properties"]["location"]["type"]) == (
            "Weather", True, "string")
    else:
        assert body["response_format"] == {"type": "json_object"}
    assert _structured(method).invoke("Weather in SF?") == Weather(location="San Francisco")
    raw = asyncio.run(_structured(method, include_raw=True).ainvoke("Weather in SF?"))
    assert raw["parsed"] == Weather(location="San Francisco") and raw["parsing_error"] is None
    assert raw["raw"].usage_metadata["output_tokens"] > 0


def test_structured_output_refuses_an_unknown_method_by_name() -> None:
    with pytest.raises(ValueError, match="method='json'"):
        _structured("json")



def _wire(call: Any) -> dict[str, Any]:
    """The body ``call(api_base)`` sends, read by the capture server (which answers 500)."""
    from .capture_server import capture_server

    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017, PT011 - the body is what counts
        call(base)
    return bodies[-1]


def _routed_at(model: str, base: str) -> RoutedChatModel:
    return RoutedChatModel(model=model, pipeline=Pipeline.from_config({}), api_base=base, api_key="test-key",
                           max_retries=0, model_kwargs={"num_retries": 0})


def _direct(base: str, **kwargs: Any) -> Any:
    """litellm.completion called directly, as a LangChain chat model that speaks OpenAI's format calls it."""
    import litellm

    return litellm.completion(api_base=base, api_key="test-key", max_retries=0, num_retries=0, **kwargs)


def test_an_assistant_turn_s_reasoning_content_is_passed_back() -> None:
    """An AIMessage's ``reasoning_content`` (as RoutedChatModel returns DeepSeek's) goes back with its
    turn, as ChatLiteLLM sends it: DeepSeek with thinking on refuses (a 400) a tool call without it."""
    call = {"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}
    history = [HumanMessage("Weather in Paris?"),
               AIMessage("Let me check.", tool_calls=[call],
                         additional_kwargs={"reasoning_content": "I should call the tool."}),
               ToolMessage("sunny", tool_call_id="call_1")]
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    sent = _wire(lambda base: _routed_at("deepseek/deepseek-chat", base).bind_tools([tool]).invoke(
        history, reasoning_effort="high"))
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Let me check.", "reasoning_content": "I should call the tool.",
                 "tool_calls": [{"type": "function", "id": "call_1",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    direct = _wire(lambda base: _direct(base, model="deepseek/deepseek-chat", messages=messages, tools=[tool],
                                        reasoning_effort="high"))
    assert sent["messages"][1]["reasoning_content"] == "I should call the tool."
    assert sent == direct



@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "openai/gpt-5-mini"])
def test_structured_output_by_json_schema_asks_for_a_strict_schema_by_default(model: str) -> None:
    """``with_structured_output(Model, method="json_schema")`` sends the pydantic model's strict schema
    (every field required, ``additionalProperties: false``, ``strict: true``), as ChatOpenAI sends it
    (the model as ``response_format``, which litellm converts as the OpenAI SDK does) and ChatLiteLLM
    asks for it (``strict`` defaults to true there): not a loose schema the model need not follow."""
    class Answer(BaseModel):
        """An answer."""

        text: str
        score: int | None = None

    sent = _wire(lambda base: _routed_at(model, base).with_structured_output(Answer, method="json_schema").invoke(
        "hi"))
    direct = _wire(lambda base: _direct(base, model=model, messages=[{"role": "user", "content": "hi"}],
                                        response_format=Answer))
    assert sent == direct
    schema = sent["response_format"]["json_schema"]
    assert schema["strict"] is True and schema["schema"]["additionalProperties"] is False
    assert schema["schema"]["required"] == ["text", "score"]


# -- RouterCallbackHandler -------------------------------------------------------------------------


def _fake(*texts: str, model: str = "gpt-4o-mini") -> GenericFakeChatModel:
    replies = iter([AIMessage(content=t, response_metadata={"model_name": model},
                              usage_metadata={"input_tokens": 1200, "output_tokens": 80, "total_tokens": 1280,
                                              "input_token_details": {"cache_read": 1000},
                                              "output_token_details": {"reasoning": 30}})
                    for t in texts])
    return GenericFakeChatModel(messages=replies)


def test_callback_observes_any_model_usage_cost_and_span(span_exporter) -> None:
    handler = RouterCallbackHandler(context={"app": "shop"})
    _fake("hello").invoke("hi", config={"callbacks": [handler], "configurable": {"thread_id": "t1"}})
    result = handler.outcomes[-1]
    assert (result.usage.input_tokens, result.usage.cache_read_tokens, result.usage.reasoning_tokens) == \
        (1200, 1000, 30)
    expected = 200 * 0.15e-6 + 1000 * 0.075e-6 + 80 * 0.6e-6  # gpt-4o-mini catalog prices
    assert result.cost.total_usd == pytest.approx(expected)
    client = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT][-1]
    assert client.attributes["gen_ai.usage.cache_read.input_tokens"] == 1000
    assert client.attributes["gen_ai.usage.cost"] == pytest.approx(expected)
    assert result.plan.call.context.app == "shop"
    assert not handler.in_flight


def test_callback_streaming_async_batch_and_nested_runs() -> None:
    handler = RouterCallbackHandler()
    config = {"callbacks": [handler]}
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | _fake("a b c", "d", "e", "f") | StrOutputParser()
    assert "".join(chain.stream({"q": "x"}, config=config)) == "a b c"  # nested: only the model run counts
    assert asyncio.run(chain.ainvoke({"q": "y"}, config=config)) == "d"
    assert chain.batch([{"q": "1"}, {"q": "2"}], config=config) == ["e", "f"]
    assert len(handler.outcomes) == 4 and not handler.in_flight
    assert handler.outcomes[0].time_to_first_token_s is not None  # streamed
    # GenericFakeChatModel streams no usage: estimated, and said so; the others carry usage_metadata
    assert [o.usage.source for o in handler.outcomes] == ["estimated", "provider", "provider", "provider"]


def test_callback_records_errors(span_exporter, tmp_path) -> None:
    """A failed run's span and row say so, and name the same provider (the chat model's ``ls_provider``)."""
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    handler = RouterCallbackHandler(Pipeline.from_config({"ledger": {"url": url}}))
    with pytest.raises(StopIteration):
        GenericFakeChatModel(messages=iter([])).invoke("hi", config={"callbacks": [handler]})
    failed = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT][-1]
    assert failed.status.status_code == StatusCode.ERROR and not handler.in_flight
    handler.pipeline.close()
    rows = open_ledger(url).query("SELECT provider, error FROM calls")
    assert rows == [(failed.attributes["gen_ai.provider.name"], "StopIteration")]


def test_the_callback_captures_the_content_of_a_call_it_observes(span_exporter) -> None:
    """With ``capture_content`` on, an observed call's chat span has its input messages and its answer
    (before, an empty output)."""
    handler = RouterCallbackHandler(Pipeline.from_config({"telemetry": {"capture_content": True}}))
    GenericFakeChatModel(messages=iter([AIMessage("sure thing")])).invoke("secret prompt text",
                                                                         config={"callbacks": [handler]})
    chat = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT][-1]
    assert "secret prompt text" in chat.attributes["gen_ai.input.messages"]
    (output,) = json.loads(chat.attributes["gen_ai.output.messages"])
    assert output["role"] == "assistant" and output["parts"][0]["content"] == "sure thing"


class _BreaksAfter(GenericFakeChatModel):
    """Streams its reply's first words, then its connection drops."""

    def _stream(self, *args: Any, **kwargs: Any) -> Any:
        for number, chunk in enumerate(super()._stream(*args, **kwargs)):
            if number == 4:
                raise ConnectionError("connection reset by peer")
            yield chunk


class _StreamsWhenInvoked(_BreaksAfter):
    """Streams even when invoked (``streaming=True``, as a chat model set to stream does inside an
    agent), and breaks off as :class:`_BreaksAfter`."""

    streaming: bool = True


@pytest.mark.parametrize("how", ["stopped", "broken", "broken, invoked"])
def test_the_callback_settles_an_observed_stream_cut_short_at_what_it_streamed(how, tmp_path, span_exporter) -> None:
    """A chat model the handler only observes, whose stream its reader stops after a few chunks (the
    generator closed) or whose provider breaks it off: LangChain hands ``on_llm_error`` the chunks
    merged, and the call is settled at them (the prompt and what streamed, estimated, charged to the
    budgets), ``ended`` ``stopped`` or ``failed``, not a row with nothing spent. Invoked (as
    ``create_agent`` calls a model), LangChain hands it no chunks: the call is settled at its prompt
    once tokens came (trial56: a row with nothing spent, and nothing charged to the budgets)."""
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"ledger": {"url": url}, "routing": {"budgets": [
        {"name": "daily", "scope": "global", "tokens": 100000, "window_s": 86400}]}})
    handler = RouterCallbackHandler(pipeline)
    reply = AIMessage(content="one two three four five six seven eight nine ten")
    config: Any = {"callbacks": [handler], "metadata": {"ls_model_name": "gpt-4o-mini"}}
    if how == "stopped":
        chunks = GenericFakeChatModel(messages=iter([reply])).stream("Count to ten", config=config)
        came = [next(chunks) for _ in range(4)]
        chunks.close()
    elif how == "broken":
        came = []
        with pytest.raises(ConnectionError):
            for chunk in _BreaksAfter(messages=iter([reply])).stream("Count to ten", config=config):
                came.append(chunk)
    else:
        with pytest.raises(ConnectionError):
            _StreamsWhenInvoked(messages=iter([reply]), streaming=True).invoke("Count to ten", config=config)
        came = [None] * 4
    pipeline.close()
    counter = float(pipeline.store.get(f"budget:daily:tokens:all:{int(time.time() // 86400)}") or 0)
    rows = open_ledger(url).query("SELECT model, error, ended, input_tokens, output_tokens, cost_usd FROM calls")
    assert len(came) == 4 and len(rows) == 1 and not handler.in_flight
    model, error, ended, input_tokens, output_tokens, cost = rows[0]
    assert (model, error, ended) == ("gpt-4o-mini", *{"stopped": ("GeneratorExit", "stopped")}.get(
        how, ("ConnectionError", "failed")))
    assert input_tokens > 0 and cost > 0 and counter == input_tokens + output_tokens
    assert 0 < output_tokens < 10  # invoked, the chunks are out of reach: the first token's, estimated
    assert [o.usage.source for o in handler.outcomes] == ["estimated"]
    span = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT][-1]
    assert span.attributes["router_middleware.ended"] == ended and span.attributes["gen_ai.usage.output_tokens"] > 0


# -- RouterAgentMiddleware in create_agent --------------------------------------------------------


def _agent_cassette(tmp_path: Path) -> Path:
    """Two real recordings back to back: a streamed tool call, then a streamed answer."""
    first = yaml.safe_load((CASSETTES / "openai_chat_tools_streaming.yaml").read_text())["interactions"][0]
    second = yaml.safe_load((CASSETTES / "openai_chat_streaming.yaml").read_text())["interactions"][0]
    second["request"]["uri"] = first["request"]["uri"]  # it was recorded through a local proxy: same API
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"interactions": [first, second], "version": 1}))
    return path


def test_agent_middleware_routes_trims_and_accounts_in_a_real_agent_loop(tmp_path, span_exporter) -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    calls: list[str] = []

    @tool
    def get_current_weather(location: str) -> str:
        """Get the current weather in a given location."""
        calls.append(location)
        return "70 degrees and sunny"

    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                                 "strategy": {"agent": "price"}},
                                     "context": {"watermark_tokens": 2000, "window_keep": 0.3, "max_payback_calls": None},
                                     "cache": {"enabled": False}})
    models = {m: RoutedChatModel(model=m, pipeline=Pipeline(), streaming=True) for m in ("gpt-4o-mini", "gpt-3.5-turbo")}
    old = []
    for i in range(30):  # ~4,400 tokens of earlier conversation, over the 2,000-token watermark
        old += [HumanMessage(f"Earlier question {i}: what is in src/module_{i}.py? " + "detail " * 60),
                AIMessage(f"It defines helper_{i}. " + "more " * 60)]
    agent = create_agent(models["gpt-3.5-turbo"], tools=[get_current_weather],
                         middleware=[RouterAgentMiddleware(pipeline, models=models, model="agent")])
    replayer, sent = capturing_vcr()
    with replayer.use_cassette(str(_agent_cassette(tmp_path))):
        state = agent.invoke({"messages": [*old, HumanMessage("What's the weather like in San Francisco?")]})
    assert calls == ["San Francisco"]  # the recorded tool call ran the agent's tool
    assert isinstance(state["messages"][-1], AIMessage) and state["messages"][-1].content
    assert isinstance(state["messages"][-2], ToolMessage)
    requests = list({len(b["messages"]): b for b in sent}.values())
    assert len(requests) == 2
    assert all(b["model"] == "gpt-4o-mini" for b in requests)  # price routing: cheaper than gpt-3.5-turbo
    first = requests[0]["messages"]
    assert len(first) < len(old) + 1  # the window dropped old turns ...
    digests = [m for m in first if "earlier messages omitted to save context" in str(m.get("content"))]
    assert len(digests) == 1  # ... for one digest message
    assert first[-1]["content"] == "What's the weather like in San Francisco?"
    assert [t["function"]["name"] for t in requests[0]["tools"]] == ["get_current_weather"]
    routes = [s for s in span_exporter.get_finished_spans() if s.name == "route agent"]
    assert len(routes) == 2
    assert routes[0].attributes["router_middleware.chosen_model"] == "gpt-4o-mini"
    assert routes[0].attributes["router_middleware.context.compacted"] is True


def _failing_then_answering(models: dict[str, str]) -> dict[str, RoutedChatModel]:
    """Two routed models by name: the first rate-limited, the second answering "done"."""
    import litellm

    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    return {name: RoutedChatModel(model=model, pipeline=Pipeline(), model_kwargs={"mock_response": answer})
            for (name, model), answer in zip(models.items(), (limited, "done"), strict=True)}


def test_agent_middleware_falls_back_to_the_next_mapped_model(span_exporter) -> None:
    from langchain.agents import create_agent

    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                                 "fallback": {"backoff_s": 0.0}},
                                     "context": {"enabled": False}, "cache": {"enabled": False}})
    models = _failing_then_answering({"gpt-4o-mini": "gpt-4o-mini", "gpt-3.5-turbo": "gpt-3.5-turbo"})
    agent = create_agent(models["gpt-4o-mini"], tools=[],
                         middleware=[RouterAgentMiddleware(pipeline, models=models, model="agent")])
    state = agent.invoke({"messages": [HumanMessage("hi")]})
    assert state["messages"][-1].content == "done"
    metadata = state["messages"][-1].response_metadata  # the router's call, not the inner model's own
    assert (metadata["requested_model"], metadata["routed_model"], metadata["decisions"]) == \
        ("agent", "gpt-3.5-turbo", ["routing:route", "routing:fallback"])
    spans = span_exporter.get_finished_spans()
    (route,) = [s for s in spans if s.name == "route agent"]
    attempts = [s for s in spans if s.parent is not None and s.parent.span_id == route.context.span_id]
    assert [s.name for s in attempts] == ["chat gpt-4o-mini", "chat gpt-3.5-turbo"]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert route.attributes["router_middleware.fallback.depth"] == 1
    assert route.attributes["router_middleware.chosen_model"] == "gpt-3.5-turbo"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_agent_middleware_fails_over_without_the_sdk_s_own_retries(monkeypatch, asynchronous) -> None:
    """A RoutedChatModel with a target behind it is sent with ``max_retries=0``, as the pipeline sends
    such an attempt: the OpenAI SDK would retry a 500 twice on the same target before the agent's call
    could fail over (3 requests, about 2 s). The last target keeps the SDK's retries, as a direct call
    has them, and so does a model that sets ``max_retries`` itself (or in ``model_kwargs``). The setting
    is on the model, never in the request's ``model_settings``, which a middleware inside the router
    (LangChain's ModelFallbackMiddleware) hands on to another chat model: ChatOpenAI refuses it."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware

    from .capture_server import capture_server
    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    inner: list[tuple[int | None, dict[str, Any]]] = []

    class Inside(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            inner.append((request.model.max_retries, dict(request.model_settings)))
            return handler(request)

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            inner.append((request.model.max_retries, dict(request.model_settings)))
            return await handler(request)

    def agent_call(models: dict[str, RoutedChatModel], route: list[str]) -> Any:
        pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": route}, "fallback": {"backoff_s": 0.0}},
                                         "cache": {"enabled": False}})
        agent = create_agent(models[route[0]], tools=[],
                             middleware=[RouterAgentMiddleware(pipeline, models=models, model="coder"), Inside()])
        state = {"messages": [HumanMessage("Rename x to count")]}
        return asyncio.run(agent.ainvoke(state)) if asynchronous else agent.invoke(state)

    with capture_server() as (down, sent), fault_server() as (up, seen):
        def model(base: str, **settings: Any) -> RoutedChatModel:
            return RoutedChatModel(model="openai/gpt-3.5-turbo", pipeline=Pipeline(), api_base=base, **settings)

        models = {"down": model(down), "up": model(f"{up}/healthy/v1")}
        state = agent_call(models, ["down", "up"])
        assert state["messages"][-1].response_metadata["decisions"] == ["routing:route", "routing:fallback"]
        assert len(sent) == 1 and seen["healthy:ok"] == 1
        assert inner == [(0, {}), (None, {})] and models["down"].max_retries is None  # a copy was sent
        sent.clear()
        agent_call({**models, "down": model(down, max_retries=1)}, ["down", "up"])
        assert len(sent) == 2  # the model's own setting
        sent.clear()
        agent_call({**models, "down": model(down, model_kwargs={"max_retries": 1})}, ["down", "up"])
        assert len(sent) == 2
        sent.clear()
        with pytest.raises(Exception, match="capture server"):
            agent_call(models, ["down"])
        assert len(sent) == 3  # the SDK's two retries, as sent directly


def test_agent_middleware_keeps_the_models_own_prompt_cache_key() -> None:
    """A model that sets its own ``prompt_cache_key`` (in ``model_kwargs``) sends it in a thread, as
    without the middleware: the session's key is added only where the model sets none (replacing it
    split the cache the caller shares across threads)."""
    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    def agent_call(base: str, **kwargs: Any) -> Any:
        model = RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline(), api_base=base, api_key="test-key",
                                max_retries=0, model_kwargs={"num_retries": 0, **kwargs})
        agent = create_agent(model, tools=[], checkpointer=InMemorySaver(), middleware=[RouterAgentMiddleware(
            Pipeline.from_config({"context": {"prompt_cache_key": "always"}}))])  # the loopback stands for OpenAI
        return agent.invoke({"messages": [HumanMessage("hi")]}, {"configurable": {"thread_id": "t1"}})

    assert _wire(lambda base: agent_call(base, prompt_cache_key="shared"))["prompt_cache_key"] == "shared"
    assert _wire(agent_call)["prompt_cache_key"].startswith("rm-")  # none of its own: the session's


def test_agent_middleware_fits_the_callers_settings_to_the_model_a_name_stands_for(tmp_path) -> None:
    """``models={"cheap": gpt-4o-mini, "strong": gpt-5-mini}``: the fallback to "strong" is planned as
    gpt-5-mini (temperature=0.2 dropped, as litellm refuses it there), and its one ledger row is
    priced and attributed to that model's provider."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["cheap", "strong"]},
                                                 "fallback": {"backoff_s": 0.0}},
                                     "cache": {"enabled": False}, "ledger": {"url": url}})
    models = _failing_then_answering({"cheap": "openai/gpt-4o-mini", "strong": "openai/gpt-5-mini"})
    handed: list[tuple[str, dict[str, Any]]] = []

    @wrap_model_call
    def warm(request: Any, handler: Any) -> Any:
        return handler(request.override(model_settings={**request.model_settings, "temperature": 0.2}))

    @wrap_model_call
    def seen(request: Any, handler: Any) -> Any:
        handed.append((request.model.model, dict(request.model_settings)))
        return handler(request)

    agent = create_agent(models["cheap"], tools=[], middleware=[
        warm, RouterAgentMiddleware(pipeline, models=models, model="coder"), seen])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "done"
    assert handed == [("openai/gpt-4o-mini", {"temperature": 0.2}), ("openai/gpt-5-mini", {})]
    pipeline.close()
    ((model, provider, cost, decisions),) = open_ledger(url).query(
        "SELECT model, provider, cost_usd, decisions FROM calls")
    assert (model, provider) == ("gpt-5-mini", "openai") and cost > 0
    assert "params:drop" in json.loads(decisions)


@pytest.mark.parametrize(("context", "named"), [({"step": "first"}, "context.step"),
                                                 ({"sesion_id": "s1"}, "unknown field")])
def test_the_callback_handler_refuses_a_bad_context_when_it_is_made(context, named) -> None:
    """Its callbacks only log their errors: a context found bad per call would record nothing, silently."""
    from router_middleware import RequestError

    with pytest.raises(RequestError, match=named):
        RouterCallbackHandler(context=context)


def test_the_agent_middleware_labels_its_calls_with_its_context() -> None:
    """A user budget holds an agent's calls once the middleware is told the user (the session stays the thread)."""
    from langchain.agents import create_agent

    from router_middleware import BudgetExceeded, RequestError

    def agent(context: dict | None) -> Any:
        pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
            "aliases": {"agent": ["gpt-4o-mini"]}, "budgets": [{"name": "per-user", "scope": "user", "usd": 0.0001}]}})
        models = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(),
                                                 model_kwargs={"mock_response": "done"})}
        middleware = RouterAgentMiddleware(pipeline, models=models, model="agent", context=context)
        return create_agent(models["gpt-4o-mini"], tools=[], middleware=[middleware])

    assert agent(None).invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "done"  # no user
    with pytest.raises(BudgetExceeded, match=r"budget 'per-user' \(user u1\) exceeded"):
        agent({"user": "u1", "app": "shop"}).invoke({"messages": [HumanMessage("hi")]})
    with pytest.raises(RequestError, match="context.step"):
        agent({"step": "first"})


def test_the_callback_handler_takes_an_agent_context() -> None:
    from router_middleware import AgentContext

    handler = RouterCallbackHandler(context=AgentContext(app="shop", user="u1", step=0))
    assert handler.context == {"app": "shop", "user": "u1", "step": 0}


@pytest.mark.parametrize("repair", [False, True])
def test_the_agent_middleware_hands_the_agent_its_own_messages_on_every_step(repair: bool) -> None:
    """Each step's history is converted anew (equal dicts the pipeline recognises from the step
    before); the model still gets the agent's own message objects, with what conversion drops
    (ids, response metadata)."""
    from langchain.agents.middleware import ModelRequest, ModelResponse

    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "messages": {"repair_tool_calls": repair}})
    middleware = RouterAgentMiddleware(pipeline, model="gpt-4o-mini")
    seen: list[list[Any]] = []

    def handler(request: ModelRequest) -> ModelResponse:
        seen.append(list(request.messages))
        return ModelResponse(result=[AIMessage("ok", id=f"run-{len(seen)}", response_metadata={"step": len(seen)})])

    history: list[Any] = [HumanMessage("fix the test", id="h0")]
    for step in range(3):
        model = GenericFakeChatModel(messages=iter(["unused"]))
        middleware.wrap_model_call(ModelRequest(model=model, messages=list(history), model_settings={}), handler)
        assert all(a is b for a, b in zip(seen[-1], history, strict=True)), step
        history += [AIMessage(f"step {step}", id=f"ai-{step}", response_metadata={"kept": step}),
                    HumanMessage("go on", id=f"h{step + 1}")]


def test_a_message_the_breakpoints_mark_is_still_the_agent_s_own() -> None:
    """A prompt-cache breakpoint on the last tool result (a Claude agent's long prompt) marks the
    agent's own ToolMessage: its ``status`` (ChatAnthropic's ``is_error``), ``artifact`` and ``id``
    stay, and its text carries the mark. Rebuilt from the planned dict, a failed tool's result went
    to the model as a success."""
    from langchain.agents.middleware import ModelRequest, ModelResponse

    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), model="claude-sonnet-4-5")
    sent: list[Any] = []

    def handler(request: ModelRequest) -> ModelResponse:
        sent.extend(request.messages)
        return ModelResponse(result=[AIMessage("done")])

    failed = ToolMessage("Error: file not found " * 300, tool_call_id="t1", name="read_file", status="error",
                         artifact={"raw": 1}, id="tm-1")
    history = [HumanMessage("Fix the bug in a.py " + "context " * 1500, id="h-1"),
               AIMessage("", tool_calls=[{"name": "read_file", "args": {"path": "a.py"}, "id": "t1"}], id="ai-1"),
               failed]
    model = GenericFakeChatModel(messages=iter(["unused"]))
    middleware.wrap_model_call(ModelRequest(model=model, messages=history, model_settings={}), handler)
    last = sent[-1]
    assert (type(last), last.status, last.artifact, last.id, last.name) == \
        (ToolMessage, "error", {"raw": 1}, "tm-1", "read_file")
    assert last.content == [{"type": "text", "text": failed.content, "cache_control": {"type": "ephemeral"}}]
    assert sent[:2] == history[:2]


def test_the_agent_middleware_numbers_the_steps_of_a_run_in_its_rows(tmp_path) -> None:
    """Its ledger rows had ``step`` NULL (the proxy numbers an agent's steps from its conversation,
    so did nobody here); now each row has the agent's model turns so far, unless the caller says."""
    from langchain.agents.middleware import ModelRequest, ModelResponse

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}})

    def handler(request: ModelRequest) -> ModelResponse:
        return ModelResponse(result=[AIMessage("ok")])

    for context in (None, {"step": 7}):
        middleware = RouterAgentMiddleware(pipeline, model="gpt-4o-mini", context=context)
        history: list[Any] = [HumanMessage("fix the test")]
        for step in range(3):
            model = GenericFakeChatModel(messages=iter(["unused"]))
            middleware.wrap_model_call(ModelRequest(model=model, messages=list(history), model_settings={}), handler)
            history += [AIMessage(f"step {step}"), HumanMessage("go on")]
    pipeline.close()
    assert [r[0] for r in open_ledger(url).query("SELECT step FROM calls ORDER BY ts")] == [0, 1, 2, 7, 7, 7]


@pytest.mark.parametrize(("where", "context", "named"), [
    ("model", {"sesion_id": "s1"}, "unknown field"), ("call", {"sesion_id": "s1"}, "unknown field"),
    ("model", {"step": "first"}, "context.step")])
def test_the_routed_model_refuses_a_bad_context_naming_the_field(where, context, named) -> None:
    """A misspelt label is an error, as for ``Pipeline.completion``, not dropped (the call then runs unlabelled)."""
    from router_middleware import RequestError

    with pytest.raises(RequestError, match=named):
        if where == "model":
            RoutedChatModel(model="gpt-4o-mini", context=context)
        else:
            RoutedChatModel(model="gpt-4o-mini", model_kwargs={"mock_response": "ok"}).invoke("hi", context=context)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"temprature": 0}, r"unknown argument 'temprature'; did you mean 'temperature'\?$"),
    ({"mock_response": "ok"}, r"unknown argument 'mock_response': litellm's other parameters go in "
                              r"model_kwargs=\{'mock_response': \.\.\.\}$")])
def test_the_routed_model_refuses_an_unknown_argument_naming_it(kwargs, message) -> None:
    """pydantic would drop it: a misspelt setting ignored, or a ``mock_response=`` lost and a real call made."""
    from router_middleware import ConfigError

    with pytest.raises(ConfigError, match=message):
        RoutedChatModel(model="gpt-4o-mini", **kwargs)
    aliased = RoutedChatModel(model_name="gpt-4o-mini", base_url="http://127.0.0.1:9/v1", stop_sequences=["x"],
                              tags=["t"], model_kwargs={"mock_response": "ok"})  # fields, aliases, LangChain's own
    assert (aliased.model, aliased.api_base, aliased.stop) == ("gpt-4o-mini", "http://127.0.0.1:9/v1", ["x"])

    class Team(RoutedChatModel):  # a subclass's own fields are arguments too
        team: str = "a"

    assert Team(model="gpt-4o-mini", team="b").team == "b"
    with pytest.raises(ConfigError, match="unknown argument 'teem'; did you mean 'team'"):
        Team(model="gpt-4o-mini", teem="b")


def test_the_routed_model_takes_an_agent_context() -> None:
    from router_middleware import AgentContext

    model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": "ok"},
                            context=AgentContext(app="shop", user="u1"))
    message = model.invoke("hi", context=AgentContext(step=3))
    assert message.content == "ok" and model.context == {"app": "shop", "user": "u1"}


@pytest.mark.parametrize("fails", [False, True])
def test_the_callback_handler_does_not_count_a_routed_models_call_twice(fails, tmp_path, span_exporter) -> None:
    """``RoutedChatModel`` with the handler in the same chain (integrations/langchain/chain.py): its pipeline
    accounts each call once (one ledger row, one CLIENT span); the handler still lists it."""
    import litellm

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"app": "docs", "ledger": {"url": url}, "cache": {"enabled": False},
                                     "routing": {"aliases": {"writer": ["gpt-4o-mini"]}}})
    answer = litellm.exceptions.BadRequestError("bad", "gpt-4o-mini", "openai") if fails else "Done."
    model = RoutedChatModel(model="writer", pipeline=pipeline, model_kwargs={"mock_response": answer})
    handler = RouterCallbackHandler(pipeline)
    chain = ChatPromptTemplate.from_messages([("user", "{q}")]) | model | StrOutputParser()
    if fails:
        with pytest.raises(litellm.exceptions.BadRequestError):
            chain.invoke({"q": "hi"}, config={"callbacks": [handler]})
    else:
        assert chain.invoke({"q": "hi"}, config={"callbacks": [handler]}) == "Done."
        assert [(o.model, o.provider) for o in handler.outcomes] == [("gpt-4o-mini", "openai")]
    pipeline.close()
    rows = open_ledger(url).query("SELECT requested_model, model, error FROM calls")
    assert rows == [("writer", "gpt-4o-mini", "BadRequestError" if fails else None)]
    assert len([s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]) == 1
    assert not handler.in_flight


def test_the_callback_handler_labels_its_calls_with_the_configs_app(tmp_path) -> None:
    """As ``Pipeline.completion``: a call that names no app counts for the config's ``app:``."""
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"app": "support-bot", "ledger": {"url": url}})
    handler = RouterCallbackHandler(pipeline)
    _fake("hello").invoke("hi", config={"callbacks": [handler]})
    pipeline.close()
    assert handler.outcomes[-1].plan.call.context.app == "support-bot"
    assert open_ledger(url).query("SELECT app FROM calls") == [("support-bot",)]


def test_calls_the_callback_handler_observes_count_toward_the_pipelines_budgets() -> None:
    """As ``RouterLogger``'s observed calls: what a chat model the handler observes spent is added to
    the budgets that apply to its labels (a tenant's here), so the pipeline's own calls see it."""
    from router_middleware.errors import BudgetExceeded

    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
        {"name": "tenant-day", "scope": "tenant", "usd": 1.0, "window_s": 86400}]}})
    handler = RouterCallbackHandler(pipeline, context={"tenant": "acme"})
    _fake("hello").invoke("hi", config={"callbacks": [handler]})
    spent = handler.outcomes[-1].cost.total_usd
    with pytest.raises(BudgetExceeded) as over:
        pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                            max_tokens=2_000_000, context={"tenant": "acme"})
    assert spent and over.value.spent == pytest.approx(spent)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_callback_handler_does_not_count_an_agent_middleware_call_twice(asynchronous, tmp_path) -> None:
    """The handler on an agent that runs RouterAgentMiddleware: the middleware's lifecycle accounts each
    model call (its ledger row); the handler lists it without a second row."""
    from langchain.agents.middleware import ModelRequest, ModelResponse

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"ledger": {"url": url}, "cache": {"enabled": False}})
    handler = RouterCallbackHandler(pipeline)
    middleware = RouterAgentMiddleware(pipeline, model="gpt-4o-mini")
    request = ModelRequest(model=_fake("done"), messages=[HumanMessage("hi")], model_settings={})
    config = {"callbacks": [handler]}
    if asynchronous:
        async def handle(r: Any) -> ModelResponse:
            return ModelResponse(result=[await r.model.ainvoke(r.messages, config=config)])

        asyncio.run(middleware.awrap_model_call(request, handle))
    else:
        middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages, config=config)]))
    pipeline.close()
    assert open_ledger(url).query("SELECT requested_model, input_tokens FROM calls") == [("gpt-4o-mini", 1200)]
    assert len(handler.outcomes) == 1 and not handler.in_flight


def test_the_agent_middleware_sends_tool_results_given_as_content_blocks_of_a_user_turn() -> None:
    """One LangChain message can be several OpenAI messages (Anthropic's tool_result blocks answering
    parallel calls): the call goes through, each result as a tool message."""
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    calls = [{"name": "weather", "args": {"city": c}, "id": f"toolu_{c}"} for c in ("SF", "NY")]
    history = [HumanMessage("Weather in SF and NY?"), AIMessage("", tool_calls=calls),
               HumanMessage([{"type": "tool_result", "tool_use_id": "toolu_SF", "content": "sunny"},
                             {"type": "tool_result", "tool_use_id": "toolu_NY", "content": "rain"}])]
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), model="gpt-4o-mini")
    sent: list[Any] = []

    def handler(r: Any) -> ModelResponse:
        sent.extend(r.messages)
        return ModelResponse(result=[r.model.invoke(r.messages)])

    request = ModelRequest(model=FakeListChatModel(responses=["ok"]), messages=history, model_settings={})
    assert middleware.wrap_model_call(request, handler).result[-1].content == "ok"
    assert sent[:2] == history[:2]  # the agent's own objects
    assert [(type(m), m.tool_call_id, m.content) for m in sent[2:]] == \
        [(ToolMessage, "toolu_SF", "sunny"), (ToolMessage, "toolu_NY", "rain")]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_the_documented_agent_setup_records_each_model_call_once(span_exporter, monkeypatch: pytest.MonkeyPatch,
                                                                  asynchronous: bool) -> None:
    """``models={m: RoutedChatModel(model=m, pipeline=Pipeline())}``: the middleware's call records the
    model call (one route span, one CLIENT span, one metrics record); the inner pass-through pipeline
    it goes through records nothing of its own (its tokens and cost counted twice before)."""
    from langchain.agents import create_agent
    from opentelemetry.trace import SpanKind

    from router_middleware.telemetry import metrics as call_metrics

    recorded: list[Any] = []
    record = call_metrics.record
    monkeypatch.setattr(call_metrics, "record", lambda *a: recorded.append(a) or record(*a))
    models = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(),
                                             model_kwargs={"mock_response": "done"})}
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models=models,
                                       model="gpt-4o-mini")
    agent = create_agent(models["gpt-4o-mini"], tools=[], middleware=[middleware])
    state = {"messages": [HumanMessage("hi")]}
    result = asyncio.run(agent.ainvoke(state)) if asynchronous else agent.invoke(state)
    assert result["messages"][-1].content == "done"
    spans = span_exporter.get_finished_spans()
    assert [s.name for s in spans if s.kind == SpanKind.CLIENT] == ["chat gpt-4o-mini"]
    assert [s.name for s in spans if s.kind == SpanKind.INTERNAL and s.name.startswith("route")] == [
        "route gpt-4o-mini"]
    assert len(recorded) == 1


def test_the_agent_middleware_converts_each_message_once_across_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent's state keeps its message objects from step to step: each is converted to OpenAI's
    shape once, not on every step (at 300 messages that was three quarters of the middleware's work)."""
    from langchain.agents.middleware import ModelRequest, ModelResponse

    from router_middleware.langchain import convert

    converted: list[Any] = []
    real = convert.convert_to_openai_messages
    monkeypatch.setattr(convert, "convert_to_openai_messages", lambda messages: converted.extend(messages) or real(
        messages))
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), model="gpt-4o-mini")
    history: list[Any] = [HumanMessage("fix the test"), AIMessage("looking"), HumanMessage("go on")]
    model = GenericFakeChatModel(messages=iter(["unused"]))

    def step() -> None:
        middleware.wrap_model_call(ModelRequest(model=model, messages=list(history), model_settings={}),
                                   lambda request: ModelResponse(result=[AIMessage("ok")]))

    step()
    converted.clear()
    history += [AIMessage("step 1"), HumanMessage("more")]
    step()
    assert converted == history[-2:]
    history[1].content = "edited"  # a message whose content was replaced is converted again
    converted.clear()
    step()
    assert converted == [history[1]]


def test_only_the_attempts_own_model_call_is_left_to_the_middleware(span_exporter) -> None:
    """Inside the middleware's model call another model call may run (a guard, a tool selector listed
    after it): that one is no attempt of the middleware's call, and a RoutedChatModel or a callback
    handler records it as usual."""
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from opentelemetry.trace import SpanKind

    guard = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": "safe"})
    observed = GenericFakeChatModel(messages=iter([AIMessage("fine")]))
    handler_ = RouterCallbackHandler(Pipeline())
    models = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(),
                                             model_kwargs={"mock_response": "done"})}
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models=models,
                                       model="gpt-4o-mini")

    def handler(request: ModelRequest) -> ModelResponse:
        guard.invoke([HumanMessage("is this request safe?")])
        observed.invoke([HumanMessage("and this?")], config={"callbacks": [handler_]})
        return ModelResponse(result=[request.model.invoke([request.system_message, *request.messages]
                                                          if request.system_message else request.messages)])

    middleware.wrap_model_call(ModelRequest(model=models["gpt-4o-mini"], messages=[HumanMessage("hi")],
                                            model_settings={}), handler)
    routes = sorted(s.name for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL
                    and s.name.startswith("route"))
    # the guard's own call, the middleware's (its attempt not a second time), the handler's of the observed one
    assert routes == ["route gpt-4o-mini", "route gpt-4o-mini", "route unknown"]
    assert len([s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]) == 3
    assert len(handler_.outcomes) == 1


@pytest.mark.parametrize("shared", [True, False], ids=["the-middleware-s-pipeline", "one-of-the-same-config"])
def test_a_routed_model_the_attempt_is_made_through_is_one_row_and_one_budget_charge(tmp_path, shared) -> None:
    """``models`` entries that are RoutedChatModels on the middleware's own pipeline, or on one built
    from the same config (a path passed to each): each attempt is sent as the middleware planned it
    (:meth:`.Pipeline.send`), so a call that fell over is one ledger row and one budget charge. Before,
    the first was refused, and the second ran a call of its own in each attempt: a row and a budget
    charge of its own (three rows for one call), and its own retries. The agent's own model on the
    same pipeline, named by the alias, is sent the target planned, not its own route's first."""
    import litellm
    from langchain.agents import create_agent

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = {"cache": {"enabled": False}, "ledger": {"url": url},
              "routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-4.1-mini"]}, "budgets": [
                  {"name": "b", "tokens": 100_000}], "fallback": {"attempts_per_model": 2, "backoff_s": 0}}}
    pipeline = Pipeline.from_config(config)
    theirs = pipeline if shared else Pipeline.from_config(config)
    down = litellm.InternalServerError("down", "openai", "gpt-4o-mini")
    models = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=theirs, model_kwargs={"mock_response": down}),
              "gpt-4.1-mini": RoutedChatModel(model="gpt-4.1-mini", pipeline=theirs, model_kwargs={"mock_response": "ok"})}
    agent = create_agent(models["gpt-4o-mini"], tools=[], middleware=[
        RouterAgentMiddleware(pipeline, models=models, model="coder")])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "ok"
    own = RoutedChatModel(model="coder", pipeline=pipeline, model_kwargs={"mock_response": "mine"})
    alone = create_agent(own, tools=[], middleware=[RouterAgentMiddleware(pipeline)])
    assert alone.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "mine"
    pipeline.close()
    theirs.close()
    rows = open_ledger(url).query("SELECT requested_model, target, error, input_tokens + output_tokens FROM calls "
                                  "ORDER BY ts")
    assert [row[:3] for row in rows] == [("coder", "gpt-4.1-mini", None), ("coder", "gpt-4o-mini", None)]
    from router_middleware.routing.budgets import NO_APP

    counter = f"budget:b:tokens:{NO_APP}:0"
    assert float(pipeline.store.get(counter) or 0) == sum(row[3] for row in rows)  # charged once each
    assert shared or theirs.store.get(counter) is None  # the models' own pipeline charged nothing


@pytest.mark.parametrize("where", ["models", "the agent's model"])
def test_the_middleware_estimates_a_call_at_the_output_cap_its_model_sets(where) -> None:
    """A budget estimates a call's output at its ``max_tokens``: the one the chat model sets of its own
    was not read (only the request's settings), so an agent call was estimated at the 512-token default
    and refused where the same model called directly was admitted."""
    from langchain.agents import create_agent

    from router_middleware import BudgetExceeded

    def agent(cap: int | None) -> Any:
        pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
            "aliases": {"coder": ["gpt-4o-mini"]}, "budgets": [{"name": "b", "usd": 0.0001}]}})
        model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), max_tokens=cap,
                                model_kwargs={"mock_response": "ok"})
        if where == "models":
            return create_agent(model, tools=[], middleware=[
                RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": model}, model="coder")])
        return create_agent(model, tools=[], middleware=[RouterAgentMiddleware(pipeline)])

    question = {"messages": [HumanMessage("hi")]}
    assert agent(10).invoke(question)["messages"][-1].content == "ok"  # 10 output tokens fit in $0.0001
    with pytest.raises(BudgetExceeded, match="this call's estimate"):  # 512 do not
        agent(None).invoke(question)


def test_a_guard_s_routed_model_called_with_the_attempt_s_messages_keeps_its_own_budget() -> None:
    """A review: a middleware inside the router calls a RoutedChatModel of its own (a judge) with the
    attempt's messages; it was taken for the attempt and sent as given, past its own pipeline's budget
    and ledger. Only the model the middleware hands the handler is sent as given."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware
    from langchain_core.messages import SystemMessage

    from router_middleware import BudgetExceeded

    main = Pipeline.from_config({"cache": {"enabled": False}})
    guarded = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
        {"name": "g", "scope": "global", "tokens": 5}]}})
    judge = RoutedChatModel(model="gpt-4.1-mini", pipeline=guarded, model_kwargs={"mock_response": "SAFE"})
    verdicts: list[str] = []

    class Guard(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            try:
                verdicts.append(str(judge.invoke([SystemMessage("Safe? SAFE or UNSAFE."), *request.messages]).content))
            except BudgetExceeded as refused:
                verdicts.append(refused.name)
            return handler(request)

    model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": "hello!"})
    agent = create_agent(model, tools=[], middleware=[RouterAgentMiddleware(main), Guard()])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "hello!"
    assert verdicts == ["g"]  # refused by its own budget, not sent as the attempt


def test_a_models_entry_on_an_alias_of_another_pipeline_adds_no_spans_of_its_own(span_exporter) -> None:
    """A review: an entry that is a RoutedChatModel on an alias of another pipeline is a routed call
    of its own there (only that pipeline resolves the alias); its telemetry stays the middleware's
    call's (a route span and a chat span), as before the attempt was sent as given."""
    from langchain.agents import create_agent

    config = {"cache": {"enabled": False}, "routing": {"aliases": {"coder": ["gpt-4o-mini"], "inner": ["gpt-4o-mini"]}}}
    pipeline, theirs = Pipeline.from_config(config), Pipeline.from_config(config)
    models = {"gpt-4o-mini": RoutedChatModel(model="inner", pipeline=theirs, model_kwargs={"mock_response": "ok"})}
    agent = create_agent(models["gpt-4o-mini"], tools=[], middleware=[
        RouterAgentMiddleware(pipeline, models=models, model="coder")])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "ok"
    assert sorted(s.name for s in span_exporter.get_finished_spans()) == ["chat gpt-4o-mini", "route coder"]


def test_a_fallback_model_swapped_in_inside_the_router_on_its_pipeline_is_one_row_and_sent_itself(
        tmp_path, monkeypatch) -> None:
    """A second review: ModelFallbackMiddleware inside the router swaps in a RoutedChatModel on the
    router's own pipeline. It was taken for a call of its own (two rows, the budget charged twice),
    or, told the primary's planned target, sent there again. It is the attempt, sent as it is named."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelFallbackMiddleware

    from router_middleware.ledger.store import open_ledger

    monkeypatch.setenv("UP_KEY", "sk-x")
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}, "routing": {
        "deployments": {"dead": {"model": "openai/gpt-4o-mini", "api_base": "http://127.0.0.1:9", "api_key_env": "UP_KEY"}},
        "budgets": [{"name": "b", "scope": "global", "tokens": 1_000_000}]}})
    primary = RoutedChatModel(model="dead", pipeline=pipeline, max_retries=0)
    fallback = RoutedChatModel(model="gpt-4o", pipeline=pipeline, model_kwargs={"mock_response": "from fallback"})
    agent = create_agent(primary, tools=[], middleware=[RouterAgentMiddleware(pipeline), ModelFallbackMiddleware(fallback)])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "from fallback"
    pipeline.close()
    rows = open_ledger(url).query("SELECT input_tokens + output_tokens FROM calls")
    assert len(rows) == 1 and float(pipeline.store.get("budget:b:tokens:all:0") or 0) == rows[0][0]


def test_targets_capped_differently_give_the_estimate_no_cap_and_each_a_valid_thinking_cap(monkeypatch) -> None:
    """A second review: with ``models`` capped at 300 and 8000 output tokens and a 2,048-token thinking
    budget, the larger cap went into the plan, the thinking translation kept it, and the target capped
    at 300 was sent its own 300, under its thinking budget (Anthropic answers that with a 400). Caps
    that differ give no cap: the policy raises the request's as it does for a model that sets none.
    A cap in ``model_kwargs`` counts as the model's own."""
    import litellm
    from langchain.agents import create_agent
    from litellm.integrations.custom_logger import CustomLogger

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-x")
    sent: list[tuple[Any, Any]] = []

    class Spy(CustomLogger):
        def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
            optional = kwargs.get("optional_params", {})
            sent.append((optional.get("max_tokens"), (optional.get("thinking") or {}).get("budget_tokens")))

    spy = Spy()
    litellm.callbacks.append(spy)
    try:
        pipeline = Pipeline.from_config({"cache": {"enabled": False}, "reasoning": {"rules": [{"budget_tokens": 2048}]},
                                         "routing": {"aliases": {"coder": ["anthropic/claude-sonnet-4-20250514",
                                                                           "anthropic/claude-3-7-sonnet-20250219"]}}})
        small = RoutedChatModel(model="anthropic/claude-sonnet-4-20250514", pipeline=pipeline, max_tokens=300,
                                model_kwargs={"mock_response": "A"})
        large = RoutedChatModel(model="anthropic/claude-3-7-sonnet-20250219", pipeline=pipeline, max_tokens=8000,
                                model_kwargs={"mock_response": "B"})
        agent = create_agent(small, tools=[], middleware=[RouterAgentMiddleware(pipeline, model="coder", models={
            "anthropic/claude-sonnet-4-20250514": small, "anthropic/claude-3-7-sonnet-20250219": large})])
        assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "A"
    finally:
        litellm.callbacks.remove(spy)
    ((cap, thinking),) = sent
    assert thinking == 2048 and cap > thinking  # not the 300 the model sets, under its thinking budget
    from router_middleware.langchain.middleware import _cap_of

    assert _cap_of(RoutedChatModel(model="gpt-4o-mini", model_kwargs={"max_tokens": 300})) == 300


def test_a_guard_s_model_that_times_out_charges_the_agent_s_attempt_nothing(monkeypatch) -> None:
    """A second review: a guard's judge timed out before the agent's model was called, and the
    attempt was charged its prompt (a timeout is taken as the attempt's own through litellm's
    callbacks). Through the agent middleware a timeout charges nothing: the model may never have run."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware
    from langchain_core.messages import SystemMessage

    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("UP_KEY", "sk-x")
    with scripted_upstream(delay_s=2.0) as (base, seen):
        main = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
            {"name": "b", "scope": "global", "tokens": 1_000_000}]}})
        judge = RoutedChatModel(model="judge", pipeline=Pipeline.from_config({"cache": {"enabled": False}, "routing": {
            "deployments": {"judge": {"model": "openai/gpt-4o-mini", "api_base": base, "api_key_env": "UP_KEY"}}}}),
            timeout=0.5, max_retries=0)

        class Guard(AgentMiddleware):
            def wrap_model_call(self, request: Any, handler: Any) -> Any:
                judge.invoke([SystemMessage("Is this safe?"), *request.messages])
                return handler(request)

        model = RoutedChatModel(model="gpt-4o-mini", pipeline=main, model_kwargs={"mock_response": "hello"})
        agent = create_agent(model, tools=[], middleware=[RouterAgentMiddleware(main), Guard()])
        with pytest.raises(litellm.Timeout):
            agent.invoke({"messages": [HumanMessage("hi")]})
    assert len(seen) == 1  # the judge's request; the agent's model was never called
    assert float(main.store.get("budget:b:tokens:all:0") or 0) == 0


def test_a_routed_model_on_an_alias_of_the_middleware_s_own_pipeline_is_refused_by_name() -> None:
    """Its attempts would be routed again by the alias, each a call of its own: accounted twice."""
    from router_middleware import ConfigError

    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"aliases": {"coder": ["gpt-4o-mini"]}}})
    routed = RoutedChatModel(model="coder", pipeline=pipeline)
    with pytest.raises(ConfigError, match=r"models\['gpt-4o-mini'\]: a RoutedChatModel on 'coder', a route of the "
                                          r"middleware's own pipeline"):
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": routed}, model="coder")
    RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=pipeline)},
                          model="coder")


def test_a_misspelled_route_is_refused_when_the_middleware_is_made() -> None:
    """With ``models=``, what ``model=`` names must be an alias, a deployment or one of the models:
    a typo is refused at once with the closest names, not at the agent's first call."""
    from router_middleware import ConfigError

    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini"]}}})
    models = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline())}
    with pytest.raises(ConfigError, match=r"model='agnet': not an alias.*did you mean 'agent'\?"):
        RouterAgentMiddleware(pipeline, models=models, model="agnet")
    for route in ("agent", "agent:floor", "gpt-4o-mini"):
        RouterAgentMiddleware(pipeline, models=models, model=route)
    on_deployment = Pipeline.from_config({"routing": {"deployments": {"dep": {"model": "openai/gpt-4o-mini"}}}})
    RouterAgentMiddleware(on_deployment, models={"dep": models["gpt-4o-mini"]}, model="dep:floor")  # routing
    # ignores a suffix on a deployment, as Pipeline.completion does (review61b)
    for suffix in ("floor", "nitro"):  # review61: made, then every call failed with a NoRouteError saying the
        # model was not among models=, which it is
        with pytest.raises(ConfigError, match=rf"model='gpt-4o-mini:{suffix}': ':{suffix}' picks among the models "
                                              r"of an alias of routing.aliases, and 'gpt-4o-mini' is none \(the "
                                              r"aliases are 'agent'\)"):
            RouterAgentMiddleware(pipeline, models=models, model=f"gpt-4o-mini:{suffix}")


def test_without_models_a_route_is_refused_and_an_unknown_name_logged_when_the_middleware_is_made() -> None:
    """Without ``models=`` the agent's own model answers every call: ``model="agent"`` (an alias) had
    each call planned to the alias's first target, its span saying ``chat gpt-4o-mini`` while the
    agent's ``gpt-4.1-mini`` answered: refused, naming why. A name litellm does not know (``model="agnet"``
    was taken silently) is logged with the closest names."""
    from router_middleware import ConfigError

    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-4.1-mini"]},
                                                 "deployments": {"cheap": {"model": "openai/gpt-4o-mini"}}}})
    for route in ("agent", "agent:floor", "cheap"):
        with pytest.raises(ConfigError, match=rf"model='{route}' is a route .* routes only among models="):
            RouterAgentMiddleware(pipeline, model=route)
    with structlog.testing.capture_logs() as logs:  # a name of the agent's own (Ollama's, an Azure
        for name in ("agnet", "llama3.1", "gpt-4.1-mini", "openai/gpt-4o-mini"):  # deployment's) is taken
            RouterAgentMiddleware(pipeline, model=name)
    unknown = [(e["model"], e["closest"][:1]) for e in logs if e["event"] == "agent_model_unknown"]
    assert unknown == [("agnet", ["agent"]), ("llama3.1", [])]


def test_without_model_the_agents_model_is_routed_by_its_name_in_models(tmp_path) -> None:
    """``models={"cheap": ..., "strong": ...}`` and no ``model=``: a call of the agent's model goes to
    the entry that is it (or holds the same model), under that name; one none of them holds is a
    ``ConfigError`` saying what to pass (it was a NoRouteError at the agent's first call)."""
    from langchain.agents import create_agent

    from router_middleware import ConfigError
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["cheap", "strong"]}},
                                     "cache": {"enabled": False}, "ledger": {"url": url}})

    def chat(model: str, answer: str) -> RoutedChatModel:
        return RoutedChatModel(model=model, pipeline=Pipeline(), model_kwargs={"mock_response": answer})

    models = {"cheap": chat("openai/gpt-4o-mini", "from cheap"), "strong": chat("openai/gpt-5-mini", "from strong")}
    middleware = RouterAgentMiddleware(pipeline, models=models)
    for own, answer in ((models["strong"], "from strong"), (chat("openai/gpt-4o-mini", "unsent"), "from cheap")):
        agent = create_agent(own, tools=[], middleware=[middleware])
        assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == answer
    pipeline.close()
    assert open_ledger(url).query("SELECT requested_model, model, error FROM calls ORDER BY ts") == [
        ("strong", "gpt-5-mini", None), ("cheap", "gpt-4o-mini", None)]
    agent = create_agent(chat("openai/gpt-4o", "unsent"), tools=[], middleware=[middleware])
    with pytest.raises(ConfigError, match=r"the model handed to RouterAgentMiddleware, 'openai/gpt-4o', is not an "
                                          r"alias.*\('cheap', 'strong'\).*pass model=.*or add it to models="):
        agent.invoke({"messages": [HumanMessage("hi")]})


@pytest.mark.parametrize("way", ["invoke", "ainvoke", "streaming"])
@pytest.mark.parametrize(("model", "own"), [
    ("openai/gpt-5-mini", {"temperature": 0.2}), ("openai/gpt-5-mini", {"model_kwargs": {"presence_penalty": 0.5}}),
    ("openai/gpt-4o-mini", {"model_kwargs": {"reasoning_effort": "high"}}),
    ("anthropic/claude-sonnet-4-5", {"model_kwargs": {"seed": 7}})],
    ids=["temperature-to-reasoning", "presence-penalty-to-reasoning", "effort-to-plain", "seed-to-claude"])
def test_an_agent_s_routed_model_with_settings_its_target_refuses_answers_as_it_does_alone(model, own, way,
                                                                                           tmp_path) -> None:
    """review61 (a new user's trial): a RoutedChatModel with a setting of its own that its model does
    not take (``temperature=0.2`` to a reasoning model) answers alone, the setting dropped (``params:drop``),
    but under RouterAgentMiddleware every call failed (``UnsupportedParamsError``): the attempt is
    sent as the middleware planned it, which fitted the request's settings, not the model's own.
    The attempt sent is now fitted to its model as a planned call is, and answers."""
    from langchain.agents import create_agent

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}})
    kwargs = {**own, "model_kwargs": {"mock_response": "fine", **own.get("model_kwargs", {})}}
    chat = RoutedChatModel(model=model, pipeline=pipeline, streaming=way == "streaming", **kwargs)
    assert chat.invoke("hi").content == "fine"  # alone
    agent = create_agent(chat, tools=[], middleware=[RouterAgentMiddleware(pipeline)])
    state = {"messages": [HumanMessage("hi")]}
    done = asyncio.run(agent.ainvoke(state)) if way == "ainvoke" else agent.invoke(state)
    assert done["messages"][-1].content == "fine"
    pipeline.close()
    assert [r[0] for r in open_ledger(url).query("SELECT error FROM calls")] == [None, None]


def test_an_agent_s_routed_model_asking_what_its_model_refuses_counts_toward_no_cooldown(tmp_path) -> None:
    """review61b: now that the attempt is fitted to its model, ``n=2`` to a model giving one answer a
    call is the caller's ``RequestError`` (litellm's ``UnsupportedParamsError`` before), and was
    counted as the target's failure: three such calls put Claude into cooldown for every caller."""
    from langchain.agents import create_agent

    from router_middleware import RequestError
    from router_middleware.bookkeeping.keys import COOLDOWN, FAILURES

    target = "anthropic/claude-sonnet-4-5"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"cooldown": {"failures": 2}}})
    chat = RoutedChatModel(model=target, pipeline=pipeline, model_kwargs={"mock_response": "fine", "n": 2})
    agent = create_agent(chat, tools=[], middleware=[RouterAgentMiddleware(pipeline)])
    for _ in range(3):
        with pytest.raises(RequestError, match="n=2: anthropic/claude-sonnet-4-5 gives one answer a call"):
            agent.invoke({"messages": [HumanMessage("hi")]})
    assert pipeline.store.get(FAILURES + target) is None and pipeline.store.get(COOLDOWN + target) is None


def test_an_estimated_usage_stays_estimated_through_the_agent_middleware(tmp_path, span_exporter) -> None:
    """A streamed reply with no usage chunk (the recorded tool call) is counted by litellm, not reported:
    through a RoutedChatModel among the middleware's models it is still ``estimated`` (as through
    ``Pipeline.completion``), not passed off as the provider's report; the recorded answer with its
    usage chunk is ``provider``. Both carry the stream's time to first token, which the middleware
    cannot see itself (the latency strategy reads it)."""
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    @tool
    def get_current_weather(location: str) -> str:
        """Get the current weather in a given location."""
        return "70 degrees and sunny"

    models = {"gpt-3.5-turbo": RoutedChatModel(model="gpt-3.5-turbo", pipeline=Pipeline(), streaming=True)}
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models=models,
                                       model="gpt-3.5-turbo")
    agent = create_agent(models["gpt-3.5-turbo"], tools=[get_current_weather], middleware=[middleware])
    with REPLAY.use_cassette(str(_agent_cassette(tmp_path)), allow_playback_repeats=False):
        agent.invoke({"messages": [HumanMessage("What's the weather like in San Francisco?")]})
    spans = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [s.attributes["router_middleware.usage.source"] for s in spans] == ["estimated", "provider"]
    assert all(s.attributes.get("gen_ai.response.time_to_first_chunk") for s in spans)  # the streams', not unknown


@pytest.mark.parametrize("how", ["astream", "astream_events"])
def test_a_routed_stream_cancelled_mid_answer_is_settled_with_the_cancellation(how: str, tmp_path) -> None:
    """A task reading a RoutedChatModel stream is cancelled mid-answer (the provider paused after a
    few chunks): what came is charged to the budget at once, and the ledger row says its caller
    stopped it, not a finished answer (``error`` empty) nor a failed one."""
    from router_middleware.ledger.store import open_ledger

    from .fault_server import fault_server

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url},
                                     "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}]}})

    async def cancelled(base: str) -> list[Any]:
        model = RoutedChatModel(model="openai/gpt-3.5-turbo", pipeline=pipeline, api_base=f"{base}/stall/v1",
                                api_key="x", max_tokens=2000, context={"app": "a"})
        got: list[Any] = []

        async def read() -> None:
            if how == "astream":
                async for chunk in model.astream("hi"):
                    got.append(chunk)
            else:
                async for event in model.astream_events("hi", version="v2"):
                    if event["event"] == "on_chat_model_stream":
                        got.append(event)

        task = asyncio.create_task(read())
        while len(got) < 3:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return got

    with fault_server(hang_s=1.0) as (base, seen):
        assert asyncio.run(cancelled(base))
    assert seen["stall:stall"] == 1
    pipeline.close()
    spent = float(pipeline.store.get("budget:team:usd:a:0") or 0)
    rows = open_ledger(url).query("SELECT model, error, output_tokens, cost_usd, ended FROM calls")
    assert len(rows) == 1 and rows[0][0] == "gpt-3.5-turbo" and rows[0][4] == "stopped"
    # astream's reader awaits inside the model's stream, so the cancellation lands there. astream_events
    # reads through a task of langchain-core's own, cancelled in turn: it may be waiting inside the
    # stream (CancelledError) or between chunks, and then the stream is closed (StreamLeft).
    assert rows[0][1] in (("CancelledError",) if how == "astream" else ("CancelledError", "StreamLeft"))
    assert rows[0][2] > 0 and rows[0][3] == pytest.approx(spent) and spent > 0  # what came, counted once


class _CutStream(GenericFakeChatModel):
    """langchain-core's fake chat model, its stream broken off after ``cut_after`` chunks: it raises
    ``ConnectionError`` there, or (``hang``, async only) stalls until cancelled."""

    cut_after: int = 7
    hang: bool = False

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        for i, chunk in enumerate(super()._stream(messages, stop, run_manager, **kwargs)):
            if i == self.cut_after:
                raise ConnectionError("the provider hung up")
            yield chunk

    async def _astream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        for i, chunk in enumerate(GenericFakeChatModel._stream(self, messages, stop, run_manager, **kwargs)):
            if i == self.cut_after:
                if self.hang:
                    await asyncio.sleep(60)
                raise ConnectionError("the provider hung up")
            yield chunk
            await asyncio.sleep(0)


def _cut_agent(tmp_path: Path, hang: bool = False, inside: Any = None,
               limits: dict[str, Any] | None = None) -> tuple[Any, Pipeline, str]:
    """An agent on a model whose every stream breaks off (twice at most), routed by the router, with
    a middleware ``inside`` it if given (and ``routing.limits`` if given)."""
    from langchain.agents import create_agent

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url},
                                     "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}],
                                                 "limits": limits or {}}})
    model = _CutStream(messages=iter([AIMessage("one two three four five six seven eight")] * 2), hang=hang)
    # named with its provider: the row names it as an answer would, 'gpt-4o-mini' (cut before a chunk named it)
    middleware = RouterAgentMiddleware(pipeline, models={"openai/gpt-4o-mini": model}, model="openai/gpt-4o-mini",
                                       context={"app": "a"})
    return create_agent(model, tools=[], middleware=[middleware, *([inside] if inside else [])]), pipeline, url


def _cut_row(pipeline: Pipeline, url: str, streamed: str, error: str, span_exporter: Any) -> None:
    """The call's one ledger row and span: settled at the prompt's estimate and the streamed output,
    naming ``error``; the budget charged what the row says."""
    from router_middleware.langchain.convert import usage_from_message
    from router_middleware.ledger.store import open_ledger

    pipeline.close()
    rows = open_ledger(url).query("SELECT model, error, input_tokens, output_tokens, cost_usd, ended FROM calls")
    ended = "stopped" if error == "CancelledError" else "failed"  # by the task's owner, or by the model
    assert len(rows) == 1 and rows[0][:2] == ("gpt-4o-mini", error) and rows[0][5] == ended
    assert rows[0][2] > 0 and rows[0][3] == usage_from_message(AIMessage(streamed), 0).output_tokens
    spent = float(pipeline.store.get("budget:team:usd:a:0") or 0)
    assert rows[0][4] > 0 and rows[0][4] == pytest.approx(spent)
    (chat,) = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert chat.status.status_code == (StatusCode.UNSET if ended == "stopped" else StatusCode.ERROR)
    assert chat.attributes["router_middleware.ended"] == ended
    assert chat.attributes["router_middleware.usage.source"] == "estimated"
    assert chat.attributes["gen_ai.usage.output_tokens"] == rows[0][3]


class _SlowStream(GenericFakeChatModel):
    """langchain-core's fake chat model, its first chunk 50 ms after the run starts."""

    def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        time.sleep(0.05)
        yield from super()._stream(messages, stop, run_manager, **kwargs)

    async def _astream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        await asyncio.sleep(0.05)
        for chunk in GenericFakeChatModel._stream(self, messages, stop, run_manager, **kwargs):
            yield chunk


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_agent_stream_that_completes_has_its_time_to_first_token(asynchronous, tmp_path) -> None:
    """The middleware sees the chunks of a streamed answer: its row has ``ttft_s`` (it was NULL unless
    the stream was cut short)."""
    from langchain.agents import create_agent

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}})
    model = _SlowStream(messages=iter([AIMessage("one two three")]))
    agent = create_agent(model, tools=[], middleware=[RouterAgentMiddleware(pipeline, model="gpt-4o-mini")])
    question = {"messages": [{"role": "user", "content": "hello"}]}
    if asynchronous:
        async def read() -> None:
            async for _ in agent.astream(question, stream_mode="messages"):
                pass
        asyncio.run(read())
    else:
        for _ in agent.stream(question, stream_mode="messages"):
            pass
    pipeline.close()
    ((ended, ttft, latency),) = open_ledger(url).query("SELECT ended, ttft_s, latency_s FROM calls")
    assert ended == "complete" and ttft is not None and 0.04 <= ttft <= latency


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_agent_stream_cut_by_the_provider_is_settled_at_what_it_streamed(asynchronous, tmp_path,
                                                                            span_exporter) -> None:
    """The model raises after a few chunks of its answer: the prompt and the chunks were billed, so
    the row and span say what they used (estimated), with the error, as for the pipeline's own streams."""
    agent, pipeline, url = _cut_agent(tmp_path)
    got: list[str] = []
    question = {"messages": [HumanMessage("hi")]}

    async def read() -> None:
        async for chunk, _ in agent.astream(question, stream_mode="messages"):
            got.append(chunk.content)

    with pytest.raises(ConnectionError):
        if asynchronous:
            asyncio.run(read())
        else:
            got.extend(chunk.content for chunk, _ in agent.stream(question, stream_mode="messages"))
    assert "".join(got) == "one two three four"
    _cut_row(pipeline, url, "one two three four", "ConnectionError", span_exporter)


def test_an_agent_stream_cancelled_mid_answer_is_settled_at_what_it_streamed(tmp_path, span_exporter) -> None:
    """The task reading the agent's messages is cancelled while the model's stream stalls: the row and
    span say what the prompt and the chunks that came used, and the cancellation."""
    agent, pipeline, url = _cut_agent(tmp_path, hang=True)
    got: list[str] = []

    async def cancelled() -> None:
        async def read() -> None:
            async for chunk, _ in agent.astream({"messages": [HumanMessage("hi")]}, stream_mode="messages"):
                got.append(chunk.content)

        task = asyncio.create_task(read())
        while len(got) < 3:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    _cut_row(pipeline, url, "".join(got), "CancelledError", span_exporter)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_retry_middleware_inside_the_router_that_gives_up_is_recorded_as_the_failure(asynchronous, tmp_path,
                                                                                       span_exporter) -> None:
    """LangChain's ModelRetryMiddleware after the router (wrapping the model the router calls) answers
    the model's last failure with a message of its own (``on_failure="continue"``): the agent gets that
    message, and the router records the attempt as failed with the model's error (row, span, a count
    toward the target's cooldown), not as an answer."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url},
                                     "routing": {"cooldown": {"failures": 1}}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": limited})
    retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
    agent = create_agent(model, tools=[], middleware=[
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": model}, model="gpt-4o-mini"), retry])
    question = {"messages": [HumanMessage("hi")]}
    state = asyncio.run(agent.ainvoke(question)) if asynchronous else agent.invoke(question)
    assert state["messages"][-1].content.startswith("Model call failed after 2 attempts with RateLimitError")
    pipeline.close()
    rows = open_ledger(url).query("SELECT model, error, output_tokens FROM calls")
    assert rows == [("gpt-4o-mini", "RateLimitError", 0)]  # the first try used nothing: no row of its own
    tries = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]  # a span each
    assert [s.status.status_code for s in tries] == [StatusCode.ERROR] * 2
    assert pipeline.store.get("cooldown:gpt-4o-mini") is not None


def test_a_retry_middleware_inside_that_gives_up_says_once_that_the_route_s_fallback_was_not_tried() -> None:
    """LangChain's default ``on_failure="continue"`` inside the router turns the alias's fallback off
    (documented); nothing said so, and a user adding retries expects the fallback still to apply."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False},
                                     "routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-4.1"]}}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    models = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(),
                                             model_kwargs={"mock_response": limited}),
              "gpt-4.1": RoutedChatModel(model="gpt-4.1", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})}
    retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
    agent = create_agent(models["gpt-4o-mini"], tools=[], middleware=[
        RouterAgentMiddleware(pipeline, models=models, model="agent"), retry])
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            state = agent.invoke({"messages": [HumanMessage("hi")]})
            assert state["messages"][-1].content.startswith("Model call failed after 2 attempts")
    said = [e for e in logs if e["event"] == "agent_fallback_not_tried"]
    assert len(said) == 1 and said[0]["target"] == "gpt-4o-mini" and said[0]["error_type"] == "RateLimitError"
    assert "on_failure='error'" in said[0]["why"]
    alone = create_agent(models["gpt-4o-mini"], tools=[], middleware=[  # the fallback is not among models=: none lost
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": models["gpt-4o-mini"]}, model="agent"), retry])
    with structlog.testing.capture_logs() as logs:
        alone.invoke({"messages": [HumanMessage("hi")]})
    assert not [e for e in logs if e["event"] == "agent_fallback_not_tried"]


def test_retry_and_fallback_middleware_outside_the_router_have_each_call_recorded(tmp_path) -> None:
    """ModelRetryMiddleware and ModelFallbackMiddleware before the router (each retry or fallback a
    call of the router's): each failed call has its error row, the fallback model's answer its own."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelFallbackMiddleware, ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    failing = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": limited})
    answering = RoutedChatModel(model="gpt-3.5-turbo", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})
    retry = ModelRetryMiddleware(max_retries=1, on_failure="error", initial_delay=0.0, jitter=False)
    agent = create_agent(failing, tools=[], middleware=[
        ModelFallbackMiddleware(answering), retry, RouterAgentMiddleware(pipeline)])
    state = agent.invoke({"messages": [HumanMessage("hi")]})
    assert state["messages"][-1].content == "done"
    pipeline.close()
    rows = open_ledger(url).query("SELECT model, error FROM calls ORDER BY ts")
    assert rows == [("gpt-4o-mini", "RateLimitError"), ("gpt-4o-mini", "RateLimitError"), ("gpt-3.5-turbo", None)]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("route", [None, "agent"])
def test_a_fallback_middleware_outside_the_router_with_models(route, asynchronous, tmp_path) -> None:
    """ModelFallbackMiddleware before the router, with ``models=``: its model is sent when it is among
    ``models`` (routed by its name there): the failed call's row, the fallback's answer and row. With
    ``model=`` too: the call the fallback makes with its model (not the agent's) is routed by that
    model, not by ``model=`` (before, the fallback ran the route again, its model never sent: a second
    failure, and the agent got the error)."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelFallbackMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["main"]}, "cooldown": {"failures": 2}},
                                     "cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    models = {"main": RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline(),
                                      model_kwargs={"mock_response": limited}),
              "backup": RoutedChatModel(model="openai/gpt-4o", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})}
    agent = create_agent(models["main"], tools=[], middleware=[
        ModelFallbackMiddleware(models["backup"]), RouterAgentMiddleware(pipeline, models=models, model=route)])
    question = {"messages": [HumanMessage("hi")]}
    state = asyncio.run(agent.ainvoke(question)) if asynchronous else agent.invoke(question)
    assert state["messages"][-1].content == "done"
    pipeline.close()
    rows = open_ledger(url).query("SELECT requested_model, model, error FROM calls ORDER BY ts")
    assert rows == [(route or "main", "openai/gpt-4o-mini", "RateLimitError"), ("backup", "gpt-4o", None)]
    assert pipeline.store.get("cooldown:main") is None  # one failure: the route ran once


@pytest.mark.parametrize("route", ["agent", None])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_fallback_model_outside_the_router_that_no_call_can_be_routed_by_is_sent_as_it_is(asynchronous, route,
                                                                                          tmp_path) -> None:
    """ModelFallbackMiddleware before the router hands it a model none of ``models`` holds (and whose
    name routes nothing): that model is sent as it is, unrouted, as a direct call would send it; a
    warning names the route and the model, once per pair. Before, with ``model=`` the call was routed
    by ``model=`` again (the rate-limited target a second time, and the agent got its error); without
    it, a ``ConfigError`` replaced the provider's error in mid-run."""
    import litellm
    import structlog
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelFallbackMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["main"]}},
                                     "cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    models = {"main": RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline(),
                                      model_kwargs={"mock_response": limited})}
    outsider = RoutedChatModel(model="openai/gpt-4o", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})
    agent = create_agent(models["main"], tools=[], middleware=[
        ModelFallbackMiddleware(outsider), RouterAgentMiddleware(pipeline, models=models, model=route)])
    question = {"messages": [HumanMessage("hi")]}
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            state = asyncio.run(agent.ainvoke(question)) if asynchronous else agent.invoke(question)
            assert state["messages"][-1].content == "done"
    said = [e for e in logs if e["event"] == "agent_model_swap_not_routed"]
    assert len(said) == 1 and (said[0]["route"], said[0]["model"]) == (route, "openai/gpt-4o")
    pipeline.close()
    rows = open_ledger(url).query("SELECT requested_model, target, error FROM calls ORDER BY ts")
    assert rows == [(route or "main", "openai/gpt-4o-mini", "RateLimitError"),
                    ("openai/gpt-4o", "openai/gpt-4o", None)] * 2


def test_a_fallback_model_outside_on_the_router_s_own_pipeline_is_accounted_once(tmp_path) -> None:
    """The outer fallback's model sent as it is, a RoutedChatModel on the router's own pipeline: its
    attempt is sent as given, so the call is one row (it was refused: as a call of its own, two rows
    and two budget charges)."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelFallbackMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")
    models = {"main": RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline(),
                                      model_kwargs={"mock_response": limited})}
    outsider = RoutedChatModel(model="openai/gpt-4o", pipeline=pipeline, model_kwargs={"mock_response": "done"})
    agent = create_agent(models["main"], tools=[], middleware=[
        ModelFallbackMiddleware(outsider), RouterAgentMiddleware(pipeline, models=models, model="main")])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "done"
    pipeline.close()
    rows = open_ledger(url).query("SELECT requested_model, target, error FROM calls ORDER BY ts")
    assert rows == [("main", "openai/gpt-4o-mini", "RateLimitError"), ("openai/gpt-4o", "openai/gpt-4o", None)]


def test_a_new_object_of_the_same_model_from_a_middleware_outside_is_no_swap(tmp_path) -> None:
    """A middleware before the router that builds the agent's model anew for each call (the same model,
    another object) is no outer swap: ModelRetryMiddleware's retry through it is routed by ``model=``
    again (it was routed by the new object's name, under ``models``' entry holding it, as a fallback's
    model is). The router keeps each step's first model name, never the agent's state."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware, ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["main"]}}, "cache": {"enabled": False},
                                     "context": {"enabled": False}, "ledger": {"url": url}})
    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")

    def build() -> RoutedChatModel:
        return RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": limited})

    class Rebuild(AgentMiddleware):
        def wrap_model_call(self, request, handler):  # type: ignore[no-untyped-def]
            return handler(request.override(model=build()))

    router = RouterAgentMiddleware(pipeline, models={"main": build()}, model="agent")
    agent = create_agent(build(), tools=[], middleware=[
        ModelRetryMiddleware(max_retries=1, initial_delay=0.0, jitter=False, on_failure="error"), Rebuild(), router])
    with pytest.raises(litellm.RateLimitError):
        agent.invoke({"messages": [HumanMessage("hi")]})
    pipeline.close()
    assert open_ledger(url).query("SELECT requested_model FROM calls") == [("agent",), ("agent",)]
    assert router._firsts and all(isinstance(name, str) for name in router._firsts.values())


def test_a_retry_middleware_inside_the_router_that_recovers_is_recorded_as_the_answer(tmp_path) -> None:
    """The model fails once, then answers ModelRetryMiddleware's retry: the router's call is that answer."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    class Flaky(GenericFakeChatModel):
        failed: bool = False

        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            if not self.failed:
                self.failed = True
                raise ConnectionError("the provider hung up")
            return super()._generate(*args, **kwargs)

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url},
                                     "routing": {"cooldown": {"failures": 1}}})
    model = Flaky(messages=iter([AIMessage("done")]))
    retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
    agent = create_agent(model, tools=[], middleware=[
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": model}, model="gpt-4o-mini"), retry])
    assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "done"
    pipeline.close()
    assert open_ledger(url).query("SELECT model, error FROM calls") == [("gpt-4o-mini", None)]
    assert pipeline.store.get("cooldown:gpt-4o-mini") is None


def test_a_retry_middleware_inside_the_router_that_gives_up_on_cut_streams_is_settled_at_each_try(
        tmp_path, span_exporter) -> None:
    """Each try's stream breaks off; ModelRetryMiddleware gives up with a message of its own: the
    call is recorded as the model's failure, settled at what the last try streamed, and the first
    try, settled apart at what it streamed, has a row and span of its own."""
    from langchain.agents.middleware import ModelRetryMiddleware

    from router_middleware.langchain.convert import usage_from_message
    from router_middleware.ledger.store import open_ledger

    retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
    agent, pipeline, url = _cut_agent(tmp_path, inside=retry)
    got = [chunk.content for chunk, _ in agent.stream({"messages": [HumanMessage("hi")]}, stream_mode="messages")]
    assert got[-1].startswith("Model call failed after 2 attempts with ConnectionError")
    pipeline.close()
    streamed = usage_from_message(AIMessage("one two three four"), 0).output_tokens
    rows = open_ledger(url).query("SELECT model, error, output_tokens, cost_usd FROM calls")
    assert [row[:3] for row in rows] == [("gpt-4o-mini", "ConnectionError", streamed)] * 2
    assert float(pipeline.store.get("budget:team:usd:a:0") or 0) == pytest.approx(sum(row[3] for row in rows))
    tries = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [s.attributes["gen_ai.usage.output_tokens"] for s in tries] == [streamed] * 2


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize("then", ["healthy", "cut"])
def test_each_try_of_a_retry_middleware_inside_the_router_is_charged_what_it_streamed(then, asynchronous, tmp_path,
                                                                                       span_exporter) -> None:
    """ModelRetryMiddleware inside the router; the first try's stream (a real recording) breaks off
    partway, the retry answers or breaks off too. The first try was billed for its prompt and what
    it streamed: it has a ledger row and a span of its own with that (estimated), and the session's
    budget is charged it, beside the call's own row (before, only the last try was counted)."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware, ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    from .fault_server import fault_server

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": url},
                                     "routing": {"budgets": [{"name": "s", "scope": "session", "usd": 1.0}]}})
    with fault_server(cut_events=5) as (base, seen):
        cut, second = (RoutedChatModel(model="openai/gpt-4o-mini", pipeline=Pipeline(), api_base=f"{base}/{path}/v1",
                                       api_key="k", streaming=True, max_retries=0, model_kwargs={"num_retries": 0})
                       for path in ("cut", then))
        tries: list[str] = []

        class Provider(AgentMiddleware):  # the first try's stream breaks off
            def pick(self, request: Any) -> Any:
                tries.append("try")
                return request.override(model=cut if len(tries) == 1 else second)

            def wrap_model_call(self, request: Any, handler: Any) -> Any:
                return handler(self.pick(request))

            async def awrap_model_call(self, request: Any, handler: Any) -> Any:
                return await handler(self.pick(request))

        retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
        agent = create_agent(cut, tools=[], middleware=[
            RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": cut}, model="gpt-4o-mini",
                                  context={"session_id": "s1"}), retry, Provider()])
        question = {"messages": [HumanMessage("hi")]}
        state = asyncio.run(agent.ainvoke(question)) if asynchronous else agent.invoke(question)
    assert seen[f"{then}:{'ok' if then == 'healthy' else 'cut-stream'}"] >= 1 and len(tries) == 2
    assert state["messages"][-1].content.startswith("Model call failed") == (then == "cut")
    pipeline.close()
    rows = open_ledger(url).query("SELECT error, input_tokens, output_tokens, cost_usd FROM calls ORDER BY ts")
    assert len(rows) == 2 and rows[0][0] is not None and (rows[1][0] is None) == (then == "healthy")
    assert all(inputs > 0 and outputs > 0 and cost > 0 for _, inputs, outputs, cost in rows)
    spent = float(pipeline.store.get("budget:s:usd:s1:0") or 0)
    assert spent == pytest.approx(sum(row[3] for row in rows))
    first, last = sorted((s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT),
                         key=lambda s: s.start_time)
    assert first.status.status_code == StatusCode.ERROR and first.end_time <= last.start_time
    assert first.attributes["router_middleware.usage.source"] == "estimated"
    assert first.attributes["gen_ai.usage.output_tokens"] == rows[0][2]


@pytest.mark.parametrize(("name", "held"), [("gpt-4o-mini", "openai/gpt-4o-mini"), ("openai/gpt-4o-mini", "gpt-4o-mini")])
def test_the_agent_middleware_names_a_target_in_its_rows_and_spans_as_the_pipeline_does(name, held, tmp_path,
                                                                                          span_exporter) -> None:
    """``models={name: a model of held}`` where ``name`` is itself a model id standing for the same
    model (same catalog facts): a failed call and an answered one through a real agent loop name the
    target in their ledger rows and CLIENT spans as ``Pipeline.completion`` names it for the same
    alias (before, a failed row and span named the held model's own spelling, ``openai/gpt-4o-mini``,
    where the pipeline and the answered row said ``gpt-4o-mini``)."""
    import litellm
    from langchain.agents import create_agent

    from router_middleware.ledger.store import open_ledger

    limited = litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")

    def config(url: str) -> dict[str, Any]:
        return {"routing": {"aliases": {"coder": [name]}}, "cache": {"enabled": False},
                "context": {"enabled": False}, "ledger": {"url": url}}

    def recorded(url: str, pipeline: Pipeline) -> tuple[list[Any], list[str]]:
        pipeline.close()
        spans = [s.name for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
        span_exporter.clear()
        return [tuple(r) for r in open_ledger(url).query("SELECT model, provider, error FROM calls ORDER BY ts")], spans

    url = f"sqlite:///{tmp_path / 'pipeline.db'}"
    direct = Pipeline.from_config(config(url))
    with pytest.raises(litellm.RateLimitError):
        direct.completion(model="coder", messages=[{"role": "user", "content": "hi"}], mock_response=limited)
    direct.completion(model="coder", messages=[{"role": "user", "content": "hi"}], mock_response="done")
    expected = recorded(url, direct)

    url = f"sqlite:///{tmp_path / 'agent.db'}"
    pipeline = Pipeline.from_config(config(url))
    for answer in (limited, "done"):
        model = RoutedChatModel(model=held, pipeline=Pipeline(), model_kwargs={"mock_response": answer})
        agent = create_agent(model, tools=[], middleware=[
            RouterAgentMiddleware(pipeline, models={name: model}, model="coder")])
        if isinstance(answer, Exception):
            with pytest.raises(litellm.RateLimitError):
                agent.invoke({"messages": [HumanMessage("hi")]})
        else:
            assert agent.invoke({"messages": [HumanMessage("hi")]})["messages"][-1].content == "done"
    rows, spans = recorded(url, pipeline)
    assert (rows, spans) == expected
    assert [error for _, _, error in rows] == ["RateLimitError", None]
    assert spans == [f"chat {name}"] * 2


def _day_count(pipeline: Pipeline, bucket: str, kind: str) -> float:
    """What ``bucket``'s ``kind`` (``rpd``, ``tpd``) counter holds for today (UTC; the window the calls
    counted in, on the clock of :func:`~tests.conftest.one_quota_window`)."""
    import time

    from router_middleware.routing import quotas

    return float(pipeline.store.get(f"quota:{quotas.window(bucket, kind, time.time())[0]}") or 0)


@pytest.mark.usefixtures("one_quota_window")
@pytest.mark.parametrize("way", ["pipeline", "agent", "async agent"])
def test_each_try_of_a_retry_counts_toward_the_request_quota_as_the_pipeline_s_own_retry_does(way, monkeypatch) -> None:
    """The provider refuses the first request (a 429) and answers the second. ``Pipeline.completion``
    retries it itself (``attempts_per_model: 2``); through the agent, ModelRetryMiddleware inside the
    router retries it. Either way two requests reached the provider: both count toward the target's
    requests a day, the tokens are the answer's, and the next call finds the quota used up (before,
    the agent's inner retry took no request: the next call went through)."""
    import litellm
    from langchain.agents import create_agent
    from langchain.agents.middleware import ModelRetryMiddleware

    from router_middleware import NoRouteError, outcome

    answers = iter([litellm.RateLimitError("slow down", "openai", "gpt-4o-mini"), "done", "late"])
    completion = litellm.completion
    monkeypatch.setattr(litellm, "completion", lambda **kw: completion(**{**kw, "mock_response": next(answers)}))
    acompletion = litellm.acompletion

    async def scripted(**kw: Any) -> Any:
        return await acompletion(**{**kw, "mock_response": next(answers)})

    monkeypatch.setattr(litellm, "acompletion", scripted)
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False},
                                     "routing": {"limits": {"gpt-4o-mini": {"rpd": 2, "tpd": 100_000}},
                                                 "fallback": {"backoff_s": 0.0,
                                                              "attempts_per_model": 2 if way == "pipeline" else 1}}})
    if way == "pipeline":
        def ask() -> Any:
            return pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])

        response = ask()
        assert response.choices[0].message.content == "done"
        answered = outcome(response).usage.total_tokens
    else:
        model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline())
        retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
        agent = create_agent(model, tools=[], middleware=[
            RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": model}, model="gpt-4o-mini"), retry])

        def ask() -> Any:
            question = {"messages": [HumanMessage("hi")]}
            return asyncio.run(agent.ainvoke(question)) if way == "async agent" else agent.invoke(question)

        message = ask()["messages"][-1]
        assert message.content == "done"
        answered = message.usage_metadata["total_tokens"]
    assert _day_count(pipeline, "gpt-4o-mini", "rpd") == 2  # the refused request and the answered one
    assert _day_count(pipeline, "gpt-4o-mini", "tpd") == answered  # the 429 used no tokens
    with pytest.raises(NoRouteError, match="rpd limit 2 reached"):
        ask()


@pytest.mark.usefixtures("one_quota_window")
def test_each_try_of_a_retry_middleware_inside_the_router_counts_its_tokens_toward_the_quota(tmp_path) -> None:
    """Each try's stream breaks off after part of an answer, and ModelRetryMiddleware gives up: each
    try was a request the provider billed for its prompt and what it streamed, so the target's
    request and token quotas count both tries, at what each row says it used (before, one request
    and the last try's tokens)."""
    from langchain.agents.middleware import ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    retry = ModelRetryMiddleware(max_retries=1, on_failure="continue", initial_delay=0.0, jitter=False)
    agent, pipeline, url = _cut_agent(tmp_path, inside=retry,
                                      limits={"openai/gpt-4o-mini": {"rpd": 100, "tpd": 1_000_000}})
    got = [chunk.content for chunk, _ in agent.stream({"messages": [HumanMessage("hi")]}, stream_mode="messages")]
    assert got[-1].startswith("Model call failed after 2 attempts with ConnectionError")
    pipeline.close()
    rows = open_ledger(url).query("SELECT input_tokens, output_tokens FROM calls")
    assert len(rows) == 2 and all(inputs > 0 and outputs > 0 for inputs, outputs in rows)
    assert _day_count(pipeline, "openai/gpt-4o-mini", "rpd") == 2
    assert _day_count(pipeline, "openai/gpt-4o-mini", "tpd") == sum(inputs + outputs for inputs, outputs in rows)


class _Raising(BaseChatModel):
    """An agent's own chat model (not litellm's) that raises ``error`` once per call."""

    error: Any = None

    @property
    def _llm_type(self) -> str:
        return "raising"

    def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
        raise self.error


def _langchain_errors() -> list[Exception]:
    import httpx
    from langchain_core import exceptions

    return [exceptions.ModelRateLimitError("slow down"), exceptions.ModelTimeoutError("slow"),
            exceptions.ModelConnectionError("gone"), httpx.ReadTimeout("slow"), httpx.ConnectError("refused"),
            TimeoutError("slow"), ConnectionResetError("reset")]


@pytest.mark.parametrize("error", _langchain_errors(), ids=lambda e: type(e).__name__)
def test_the_middleware_falls_over_on_the_failures_an_agent_s_own_chat_model_raises(error) -> None:
    """A LangChain chat model raises LangChain's, httpx's or Python's errors, not litellm's: a rate
    limit, a timeout or a lost connection moves the call to the next target and counts toward the
    first one's cooldown, as litellm's do; a context overflow moves it on without counting."""
    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-4.1"]},
                                                 "fallback": {"backoff_s": 0.0, "attempts_per_model": 1}},
                                     "context": {"enabled": False}, "cache": {"enabled": False}})
    models = {"gpt-4o-mini": _Raising(error=error),
              "gpt-4.1": RoutedChatModel(model="gpt-4.1", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})}
    middleware = RouterAgentMiddleware(pipeline, models=models, model="agent")
    request = ModelRequest(model=models["gpt-4o-mini"], messages=[HumanMessage("hi")], model_settings={})
    answer = middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages)]))
    assert answer.result[0].content == "done"
    assert float(pipeline.store.get("fail:gpt-4o-mini") or 0) == 1


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_error_raised_before_the_model_is_called_counts_toward_no_cooldown(tmp_path, asynchronous) -> None:
    """A bug in a middleware inside RouterAgentMiddleware (a KeyError on a state field), raised before
    any model run began, is no failure of the target: three of them cooled a healthy gpt-4o-mini down
    for every caller and sent the calls on to gpt-4.1. The call ends with the error, as directly; its
    row says no request reached the target."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware

    from router_middleware.ledger.store import open_ledger

    class Buggy(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            raise KeyError("user_profile")

        async def awrap_model_call(self, request: Any, handler: Any) -> Any:
            raise KeyError("user_profile")

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-4.1"]},
                                                 "fallback": {"backoff_s": 0.0}},
                                     "cache": {"enabled": False}, "ledger": {"url": url}})
    models = {name: RoutedChatModel(model=name, pipeline=Pipeline(), model_kwargs={"mock_response": name})
              for name in ("gpt-4o-mini", "gpt-4.1")}
    agent = create_agent(models["gpt-4o-mini"], tools=[],
                         middleware=[RouterAgentMiddleware(pipeline, models=models, model="coder"), Buggy()])
    state = {"messages": [HumanMessage("hi")]}
    for _ in range(4):
        with pytest.raises(KeyError, match="user_profile"):
            asyncio.run(agent.ainvoke(state)) if asynchronous else agent.invoke(state)
    assert pipeline.store.get("fail:gpt-4o-mini") is None and pipeline.store.get("cooldown:gpt-4o-mini") is None
    pipeline.close()
    rows = open_ledger(url).query("SELECT target, error, decisions FROM calls")  # none sent on to gpt-4.1
    assert rows == [("gpt-4o-mini", "KeyError", '["routing:route", "routing:unsent"]')] * 4


@pytest.mark.parametrize("inside", ["context-editing", "reminder"])
def test_a_model_failure_behind_a_middleware_that_rebuilds_the_messages_still_fails_over(inside) -> None:
    """A middleware inside that copies the messages (LangChain's ContextEditingMiddleware) or appends
    one hides the attempt's run from its callbacks: the review found the model's rate limit then
    taken for an error raised before any model was called, with no fallback and no cooldown count."""
    from langchain.agents import create_agent
    from langchain.agents.middleware import AgentMiddleware, ContextEditingMiddleware
    from langchain_core import exceptions

    class Reminder(AgentMiddleware):
        def wrap_model_call(self, request: Any, handler: Any) -> Any:
            return handler(request.override(messages=[*request.messages, HumanMessage("Reminder: be brief.")]))

    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-4.1"]},
                                                 "fallback": {"backoff_s": 0.0, "attempts_per_model": 1}},
                                     "cache": {"enabled": False}})
    models = {"gpt-4o-mini": _Raising(error=exceptions.ModelRateLimitError("429 slow down")),
              "gpt-4.1": RoutedChatModel(model="gpt-4.1", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})}
    agent = create_agent(models["gpt-4.1"], tools=[], middleware=[
        RouterAgentMiddleware(pipeline, models=models, model="coder"),
        ContextEditingMiddleware() if inside == "context-editing" else Reminder()])
    state = agent.invoke({"messages": [HumanMessage("hi")]})
    assert state["messages"][-1].content == "done"
    assert state["messages"][-1].response_metadata["decisions"] == ["routing:route", "routing:fallback"]
    assert float(pipeline.store.get("fail:gpt-4o-mini") or 0) == 1


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_models_entry_that_cannot_bind_the_agent_s_tools_is_named(asynchronous) -> None:
    """A ``with_retry()`` entry (taken when the middleware is made) has no ``bind_tools``: an agent with
    tools broke on it with an AttributeError from LangChain that counted toward the target's cooldown.
    Now a ConfigError names the entry and what to give instead; nothing is counted."""
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    @tool
    def lookup(query: str) -> str:
        """Look something up."""
        return "found " + query

    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-4.1"]}},
                                     "cache": {"enabled": False}})
    models = {name: RoutedChatModel(model=name, pipeline=Pipeline(), model_kwargs={"mock_response": name})
              for name in ("gpt-4o-mini", "gpt-4.1")}
    wrapped = {**models, "gpt-4o-mini": models["gpt-4o-mini"].with_retry()}
    middleware = RouterAgentMiddleware(pipeline, models=wrapped, model="coder")
    state = {"messages": [HumanMessage("find x")]}
    without_tools = create_agent(models["gpt-4o-mini"], tools=[], middleware=[middleware])
    assert without_tools.invoke(state)["messages"][-1].content == "gpt-4o-mini"  # nothing to bind: it serves
    agent = create_agent(models["gpt-4o-mini"], tools=[lookup], middleware=[middleware])
    with pytest.raises(ConfigError, match=r"models\['gpt-4o-mini'\]: a RunnableRetry cannot bind the agent's tools"):
        asyncio.run(agent.ainvoke(state)) if asynchronous else agent.invoke(state)
    assert pipeline.store.get("fail:gpt-4o-mini") is None


def test_a_context_overflow_from_langchain_moves_on_without_counting_toward_a_cooldown() -> None:
    from langchain_core.exceptions import ContextOverflowError

    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-4.1"]},
                                                 "fallback": {"backoff_s": 0.0}},
                                     "context": {"enabled": False}, "cache": {"enabled": False}})
    models = {"gpt-4o-mini": _Raising(error=ContextOverflowError("too long")),
              "gpt-4.1": RoutedChatModel(model="gpt-4.1", pipeline=Pipeline(), model_kwargs={"mock_response": "done"})}
    middleware = RouterAgentMiddleware(pipeline, models=models, model="agent")
    request = ModelRequest(model=models["gpt-4o-mini"], messages=[HumanMessage("hi")], model_settings={})
    answer = middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages)]))
    assert answer.result[0].content == "done" and pipeline.store.get("fail:gpt-4o-mini") is None


def test_the_middleware_refuses_models_it_could_never_call_when_it_is_made() -> None:
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-4.1"]}}})
    wrapped = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline())
    RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": wrapped.with_retry()}, model="coder")  # a chat model, wrapped
    free = Pipeline.from_config({"routing": {"aliases": {"coder": ["openrouter/meta-llama/llama-3.3-70b-instruct"]},
                                             "free_tier": {"prefer": True, "models": ["*"]}}})
    RouterAgentMiddleware(free, model="coder", models={  # its free variant, which the free tier tries first
        "openrouter/meta-llama/llama-3.3-70b-instruct:free": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline())})
    with pytest.raises(ConfigError, match=r"models\['gpt-4o-mini'\]: expected a LangChain chat model .* got str"):
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": "gpt-4o-mini"}, model="coder")  # type: ignore[dict-item]
    from langchain_core.runnables import RunnableLambda

    with pytest.raises(ConfigError, match=r"expected a LangChain chat model .* got RunnableLambda"):
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": RunnableLambda(lambda x: x)}, model="coder")
    own = RoutedChatModel(model="coder", pipeline=pipeline).with_retry()
    with pytest.raises(ConfigError, match=r"a RoutedChatModel on 'coder', a route of the middleware's own pipeline"):
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": own}, model="coder")  # seen through its wrapper
    other = {"gpt-5-mini": RoutedChatModel(model="gpt-5-mini", pipeline=Pipeline())}
    with pytest.raises(ConfigError, match=r"model='coder': none of its targets \(gpt-4o-mini, gpt-4.1\) is one of "
                                          r"models= \(gpt-5-mini\)"):
        RouterAgentMiddleware(pipeline, models=other, model="coder")
    budgeted = Pipeline.from_config({"routing": {
        "aliases": {"coder": ["gpt-4o-mini"], "cheap": ["deepseek/deepseek-chat"]},
        "budgets": [{"name": "team", "scope": "global", "usd": 1, "soft": 0.5, "downgrade_to": "cheap"}]}})
    mini = {"gpt-4o-mini": RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline())}
    with pytest.raises(ConfigError, match=r"budget 'team': downgrade_to 'cheap' has no target among models= "
                                          r"\(gpt-4o-mini\): past its soft limit every call would go there and fail"):
        RouterAgentMiddleware(budgeted, models=mini, model="coder")


def test_a_models_entry_holding_a_target_under_another_name_is_refused_when_the_middleware_is_made() -> None:
    """``models={"gpt-4o-mni": cheap, "gpt-4.1": dear}`` for an alias of gpt-4o-mini then gpt-4.1 was
    taken without a word, and every call skipped the cheap model for the dear one (a ``routing:skip``
    decision on each row was the only trace). An entry no route reaches whose chat model is a target
    missing from ``models`` is now refused with the name it should have; a list for ``models``, or a
    model's name where the pipeline goes, gets an error naming the argument."""
    pipeline = Pipeline.from_config({"routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-4.1"],
                                                             "local": ["ollama/llama3.1:70b", "gpt-4.1"]}}})
    cheap, dear, small = (RoutedChatModel(model=name, pipeline=Pipeline())
                          for name in ("gpt-4o-mini", "gpt-4.1", "ollama/llama3.1:8b"))
    with pytest.raises(ConfigError, match=r"models\['gpt-4o-mni'\] holds 'gpt-4o-mini', a target of 'agent' that is "
                                          r"missing from models= under its own name: every call routed by 'agent' "
                                          r"would skip it; did you mean models\['gpt-4o-mini'\]\?"):
        RouterAgentMiddleware(pipeline, models={"gpt-4o-mni": cheap, "gpt-4.1": dear}, model="agent")
    RouterAgentMiddleware(pipeline, models={"gpt-4o-mni": cheap, "gpt-4.1": dear})  # routed by the agent's own model
    RouterAgentMiddleware(pipeline, models={"gpt-4.1": dear}, model="agent")  # a target left out: skipped, as documented
    RouterAgentMiddleware(pipeline, models={"gpt-5-mini": cheap.model_copy(update={"model": "gpt-5-mini"}),
                                            "gpt-4.1": dear}, model="agent")  # another model, a near name
    RouterAgentMiddleware(pipeline, models={"ollama/llama3.1:8b": small, "gpt-4.1": dear}, model="local")  # a size apart
    with pytest.raises(ConfigError, match=r"models=: expected a mapping of each name calls are routed to to its chat "
                                          r"model .* got a list"):
        RouterAgentMiddleware(pipeline, models=[cheap], model="agent")  # type: ignore[arg-type]
    for name in ("gpt-4o-mini", "gpt-4.1"):
        with pytest.raises(ConfigError, match=rf"RouterAgentMiddleware: '{name}' is no config file: .*; a model's "
                                              r"name goes in model="):
            RouterAgentMiddleware(name)


@pytest.mark.parametrize("how", ["runtime context", "runtime context dict", "config metadata", "config configurable"])
def test_a_run_labels_its_calls_for_the_tenant_budget_through_its_runtime_context_or_config(how, tmp_path) -> None:
    """A multi-tenant agent labels each run the LangChain v1 way; the middleware read only its own
    ``context=``, fixed when it was made, so a tenant budget never held an agent's calls (each row's
    tenant NULL, one ``budget_not_applied`` warning saying to pass ``context=``). A run's ``tenant``
    (runtime context, config metadata or configurable) now labels its calls: one tenant's spend is
    held by its budget, and another tenant's run is not."""
    from dataclasses import dataclass

    from langchain.agents import create_agent
    from langgraph.checkpoint.memory import InMemorySaver

    from router_middleware import BudgetExceeded
    from router_middleware.ledger.store import open_ledger

    @dataclass
    class Ctx:
        tenant: str
        user: object = None  # the run's own object, no label

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url},
                                     "routing": {"budgets": [{"name": "per-tenant", "scope": "tenant", "usd": 0.0005}]}})
    agent = create_agent(_fake(*["ok"] * 4), tools=[], context_schema=Ctx, checkpointer=InMemorySaver(),
                         middleware=[RouterAgentMiddleware(pipeline, model="gpt-4o-mini", context={"app": "shop"})])

    def run(tenant: str, thread: str) -> Any:
        config: Any = {"configurable": {"thread_id": thread}}
        labelled: dict[str, Any] = {"runtime context": {"context": Ctx(tenant, user=object())},
                                    "runtime context dict": {"context": {"tenant": tenant}},
                                    "config metadata": {"config": {**config, "metadata": {"tenant": tenant}}},
                                    "config configurable": {"config": {"configurable": {**config["configurable"],
                                                                                        "tenant": tenant}}}}[how]
        return agent.invoke({"messages": [HumanMessage("hi")]}, **{"config": config, **labelled})

    run("acme", "t1")  # $0.000153 a call; each reserves $0.000308 (512 output tokens) while in flight
    run("acme", "t2")
    with pytest.raises(BudgetExceeded, match=r"budget 'per-tenant' \(tenant acme\) exceeded"):
        run("acme", "t3")
    run("globex", "t4")  # another tenant: its own budget
    fixed = create_agent(_fake("ok"), tools=[], context_schema=Ctx, checkpointer=InMemorySaver(), middleware=[
        RouterAgentMiddleware(pipeline, model="gpt-4o-mini", context={"tenant": "initech"})])
    agent = fixed
    run("acme", "t5")  # the middleware's own tenant holds: a run does not change it
    pipeline.close()
    rows = open_ledger(url).query("SELECT app, tenant, session FROM calls ORDER BY ts")
    assert rows == [("shop", "acme", "t1"), ("shop", "acme", "t2"), ("shop", "globex", "t4"),
                    (None, "initech", "t5")]


def test_a_run_label_the_pipeline_refuses_is_said_once_and_left_out_and_the_others_hold(tmp_path) -> None:
    """A label the pipeline refuses (a NUL in it) dropped every label of the run, a valid tenant of
    its runtime context too, so a client could take its run out of the tenant's budget with a bad
    ``user`` in its metadata. Only the refused label is left out now, said once."""
    from dataclasses import dataclass

    from langchain.agents import create_agent

    from router_middleware import BudgetExceeded

    @dataclass
    class Ctx:
        tenant: str

    pipeline = Pipeline.from_config({"cache": {"enabled": False},
                                     "routing": {"budgets": [{"name": "per-tenant", "scope": "tenant", "usd": 1e-7}]}})
    agent = create_agent(_fake("ok", "ok"), tools=[], context_schema=Ctx,
                         middleware=[RouterAgentMiddleware(pipeline, model="gpt-4o-mini")])
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(BudgetExceeded, match=r"budget 'per-tenant' \(tenant acme\)"):
                agent.invoke({"messages": [HumanMessage("hi")]}, context=Ctx("acme"),
                             config={"metadata": {"user": "bob\x00", "tenant": "other"}})
    pipeline.close()
    (ignored,) = [e for e in logs if e["event"] == "agent_run_label_ignored"]
    assert ignored["label"] == "user" and "context.user: contains a NUL character" in ignored["error"]


def test_a_malformed_message_is_named_as_the_agent_numbers_its_messages() -> None:
    """The agent's system prompt is sent first, but ``request.messages`` does not hold it: an error
    names the agent's own indexes (it said one more with a system prompt)."""
    from langchain_core.messages import SystemMessage

    from router_middleware import MessageError

    model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": "ok"})
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models={"gpt-4o-mini": model})
    messages = [HumanMessage("hi"), AIMessage("", tool_calls=[{"id": "call_x", "name": "read_file", "args": {}}]),
                HumanMessage("again")]
    for system in (None, SystemMessage("You are a coding agent")):
        request = ModelRequest(model=model, messages=messages, system_message=system, model_settings={})
        with pytest.raises(MessageError, match=r"^message 1: tool call call_x \(read_file\) is not answered before "
                                               r"the user turn at message 2$"):
            middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages)]))


def _unparsable_count(url: str) -> tuple[Pipeline, RoutedChatModel, Callable[..., Any]]:
    """A pipeline with a global budget and a ledger at ``url``; a model whose every answer is a
    ``Count`` that does not parse (``count`` not an int); and an agent of that model, its output
    ``Count`` (``handle_errors=False``), with the middleware given."""
    from langchain.agents import create_agent
    from langchain.agents.structured_output import ToolStrategy

    class Count(BaseModel):
        count: int

    pipeline = Pipeline.from_config({"ledger": {"url": url}, "cache": {"enabled": False},
                                     "routing": {"budgets": [{"name": "all", "scope": "global", "usd": 1}]}})
    bad = [{"id": "call_1", "type": "function", "function": {"name": "Count", "arguments": '{"count": "many"}'}}]
    model = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(),
                            model_kwargs={"mock_response": "", "mock_tool_calls": bad})

    def agent(*middleware: Any) -> Any:
        return create_agent(model, tools=[], response_format=ToolStrategy(Count, handle_errors=False),
                            middleware=list(middleware))

    return pipeline, model, agent


def test_an_answer_the_agent_then_fails_to_parse_is_paid_for_and_no_fault_of_the_model(tmp_path) -> None:
    """Structured output is parsed inside the model call the middleware wraps: when parsing fails
    after the model answered, the provider billed the answer. The row carries its tokens and cost,
    the budget is charged, and the target's cooldown does not count it (before: 0 tokens, no cost,
    a failure toward the cooldown, and three such answers cooled the model down for everyone)."""
    from langgraph.errors import GraphInterrupt

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline, model, unparsable = _unparsable_count(url)
    middleware = RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": model})
    agent = unparsable(middleware)
    with pytest.raises(Exception, match="Failed to parse structured output"):
        agent.invoke({"messages": [HumanMessage("how many?")]})

    def interrupted(request: ModelRequest) -> ModelResponse:  # a middleware inside pausing for a human, after the answer
        request.model.invoke(request.messages)
        raise GraphInterrupt(())

    with pytest.raises(GraphInterrupt):
        middleware.wrap_model_call(ModelRequest(model=model, messages=[HumanMessage("hi")], model_settings={}),
                                   interrupted)
    pipeline.close()
    rows = open_ledger(url).query("SELECT ended, error, input_tokens, output_tokens, cost_usd FROM calls ORDER BY ts")
    assert [r[:2] for r in rows] == [("failed", "StructuredOutputValidationError"), ("stopped", "GraphInterrupt")]
    assert all(r[2] > 0 and r[3] > 0 and r[4] > 0 for r in rows)
    assert float(pipeline.store.get("budget:all:usd:all:0") or 0) == pytest.approx(sum(r[4] for r in rows))
    assert pipeline.store.get("fail:gpt-4o-mini") is None


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_answer_a_retry_inside_the_router_runs_again_after_it_failed_to_parse_is_paid_for(asynchronous,
                                                                                           tmp_path) -> None:
    """ModelRetryMiddleware inside the router retries when structured output fails to parse after the
    model answered: each try's answer was billed. The first try has a row of its own with its tokens
    and cost (``AnswerDiscarded``), the call's row the last try's, and the budget is charged both
    (before: the first try's answer was lost, neither row nor budget)."""
    from langchain.agents.middleware import ModelRetryMiddleware

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline, model, unparsable = _unparsable_count(url)
    retry = ModelRetryMiddleware(max_retries=1, on_failure="error", initial_delay=0.0, jitter=False)
    agent = unparsable(RouterAgentMiddleware(pipeline, models={"gpt-4o-mini": model}), retry)
    question = {"messages": [HumanMessage("how many?")]}
    with pytest.raises(Exception, match="Failed to parse structured output"):
        asyncio.run(agent.ainvoke(question)) if asynchronous else agent.invoke(question)
    pipeline.close()
    rows = open_ledger(url).query("SELECT error, input_tokens, output_tokens, cost_usd FROM calls ORDER BY ts")
    assert [r[0] for r in rows] == ["AnswerDiscarded", "StructuredOutputValidationError"]
    assert all(r[1] > 0 and r[2] > 0 and r[3] > 0 for r in rows)
    assert float(pipeline.store.get("budget:all:usd:all:0") or 0) == pytest.approx(sum(r[3] for r in rows))
    assert pipeline.store.get("fail:gpt-4o-mini") is None


@pytest.mark.parametrize("after", ["interrupt", "unparsable"])
def test_what_raises_after_a_free_variant_answered_does_not_fall_to_the_paid_model(after) -> None:
    """A ``:free`` variant falls to its paid model after any failure of its own; not after it answered
    and something after the model raised (a LangGraph interrupt, output not parsed): the paid model
    would be a second billed call for the same step. The call stops at its first attempt."""
    from langchain_core.exceptions import OutputParserException
    from langgraph.errors import GraphInterrupt

    paid = "openrouter/meta-llama/llama-3.3-70b-instruct"
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": [paid]},
                                                 "free_tier": {"prefer": True, "models": ["*"]}},
                                     "cache": {"enabled": False}})
    models = {name: RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": name})
              for name in (f"{paid}:free", paid)}
    middleware = RouterAgentMiddleware(pipeline, models=models, model="coder")
    sent: list[Any] = []

    def answered_then_raised(request: ModelRequest) -> ModelResponse:
        sent.append(request.model)
        request.model.invoke(request.messages)
        raise GraphInterrupt(()) if after == "interrupt" else OutputParserException("not a Count")

    with pytest.raises(GraphInterrupt if after == "interrupt" else OutputParserException):
        middleware.wrap_model_call(ModelRequest(model=models[paid], messages=[HumanMessage("hi")], model_settings={}),
                                   answered_then_raised)
    assert [m.model_kwargs["mock_response"] for m in sent] == [f"{paid}:free"]  # before: the paid model too


def test_the_router_s_metadata_goes_on_a_copy_of_the_answer_not_into_a_cache_s_entry() -> None:
    """The middleware's answer carries the router's call (requested_model, routed_model, decisions,
    cost) in its response_metadata, on a copy: the model's own message may be the one LangChain's
    cache keeps (``set_llm_cache``), which later calls would then read with this call's cost."""
    model = GenericFakeChatModel(messages=iter([AIMessage("ok", usage_metadata={
        "input_tokens": 10, "output_tokens": 2, "total_tokens": 12})]))
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models={"gpt-4o-mini": model})
    kept: list[AIMessage] = []

    def cached(request: ModelRequest) -> ModelResponse:
        message = request.model.invoke(request.messages)
        kept.append(message)  # as a cache keeps it
        return ModelResponse(result=[message])

    request = ModelRequest(model=model, messages=[HumanMessage("hi")], model_settings={})
    answer = middleware.wrap_model_call(request, cached)
    assert answer.result[0].response_metadata["requested_model"] == "gpt-4o-mini"
    assert answer.result[0].response_metadata["routed_model"] == "gpt-4o-mini"
    assert answer.result[0] is not kept[0] and "requested_model" not in kept[0].response_metadata


def test_outcome_reads_a_chat_model_s_answer() -> None:
    """``router_middleware.outcome`` of an AIMessage (a RoutedChatModel's, an agent's, any chat model's
    with ``usage_metadata``): its tokens, priced as the model it names; a message without usage is
    refused by name, as any object without usage is (before: every AIMessage was refused)."""
    from router_middleware import Catalog, OutcomeUnavailable, outcome

    answer = RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline(), model_kwargs={"mock_response": "ok"}).invoke("hi")
    read = outcome(answer)
    assert (read.model, read.usage.input_tokens, read.usage.output_tokens) == \
        ("gpt-4o-mini", answer.usage_metadata["input_tokens"], answer.usage_metadata["output_tokens"])
    assert read.cost.total_usd == pytest.approx(answer.response_metadata["cost_usd"])
    other = AIMessage("ok", response_metadata={"model_name": "deepseek/deepseek-chat"},
                      usage_metadata={"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100})
    info = Catalog().resolve("deepseek/deepseek-chat")
    assert outcome(other).cost.total_usd == pytest.approx(1000 * info.input + 100 * info.output)
    with pytest.raises(OutcomeUnavailable, match="AIMessage carries no usage_metadata"):
        outcome(AIMessage("ok"))


def test_content_parts_an_agent_s_own_chat_model_takes_pass_the_middleware() -> None:
    """litellm refuses a user content part of a type it does not take; an agent's own chat model
    (Anthropic's, say) may take it, and the middleware does not send through litellm: it passes."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel

    model = FakeListChatModel(responses=["ok"])
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}))
    message = HumanMessage(content=[{"type": "text", "text": "see"},
                                    {"type": "search_result", "source": "s", "title": "t",
                                     "content": [{"type": "text", "text": "x"}]}])
    request = ModelRequest(model=model, messages=[message], model_settings={})
    answer = middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages)]))
    assert answer.result[0].content == "ok"


def test_an_answer_without_usage_is_counted_with_the_model_s_tokenizer() -> None:
    """A chat model's answer that carries no usage (a stream stopped before its usage came, through
    the agent middleware) was estimated at a quarter of its characters: 90 output tokens for an
    answer litellm and the provider count as 81, so a stopped call cost more than the same answer read
    to its end. Now its text is counted with the routed model's tokenizer, as a pipeline stream's."""
    import litellm

    from router_middleware.langchain.convert import usage_from_message

    text = "The quick brown fox jumps over the lazy dog. " * 8
    counted = litellm.token_counter(model="gpt-4o-mini", text=text)
    assert counted != len(text) // 4
    assert usage_from_message(AIMessage(content=text), 12, "gpt-4o-mini").output_tokens == counted


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_agent_answer_without_usage_counts_the_tool_definitions_in_its_prompt(asynchronous, tmp_path) -> None:
    """An agent model's answer that carries no usage is settled at the prompt counted locally; that
    count left out the agent's tool definitions (9 input tokens for a request whose budget reservation
    counted 129 with two tools), so such calls were charged less than they were billed and reserved.
    It now counts the request as the reservation does."""
    from langchain_core.language_models.fake_chat_models import FakeListChatModel
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from router_middleware.ledger.store import open_ledger

    def get_weather(city: str) -> str:
        """The weather in a city, now."""
        return "sunny"

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"ledger": {"url": url}, "cache": {"enabled": False}})
    middleware = RouterAgentMiddleware(pipeline, model="gpt-4o-mini")
    request = ModelRequest(model=FakeListChatModel(responses=["sunny, 20 C"]), messages=[HumanMessage("weather?")],
                           tools=[get_weather], model_settings={})
    if asynchronous:
        async def handle(r: Any) -> ModelResponse:
            return ModelResponse(result=[await r.model.ainvoke(r.messages)])

        asyncio.run(middleware.awrap_model_call(request, handle))
    else:
        middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages)]))
    pipeline.close()
    messages = [{"role": "user", "content": "weather?"}]
    counted = pipeline.state.tokens("gpt-4o-mini", messages, [convert_to_openai_tool(get_weather)])
    assert counted > pipeline.state.tokens("gpt-4o-mini", messages) + 20
    assert open_ledger(url).query("SELECT input_tokens FROM calls") == [(counted,)]


@pytest.mark.parametrize("where", ["metadata", "configurable"])
@pytest.mark.parametrize("style", ["invoke", "ainvoke", "stream", "astream", "invoke streaming", "chain stream",
                                   "batch"])
def test_the_run_s_thread_id_is_the_session_of_every_call_style(style: str, where: str, tmp_path) -> None:
    """langchain-core calls ``_stream`` without the run's callback manager (from ``stream``, ``astream``
    and ``invoke`` on a streaming model), and the session was read from it: streamed calls had no
    session, so a session budget did not apply to them and their rows had none. LangChain's usual
    ``config={"configurable": {"thread_id": ...}}`` is read too: outside a graph langchain-core does
    not copy it into the metadata, and every call of a bare model or an LCEL chain had no session."""
    import sqlite3

    url = tmp_path / "ledger.db"
    pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{url}"}, "cache": {"enabled": False}})
    streaming = {"streaming": True} if style == "invoke streaming" else {}  # streaming=False: .stream() answers whole
    model = RoutedChatModel(model="gpt-4o-mini", pipeline=pipeline, model_kwargs={"mock_response": "ok"}, **streaming)
    config: Any = {where: {"thread_id": "T-1"}}
    chunks: list[Any] = []
    if style in ("invoke", "invoke streaming"):
        model.invoke("hi", config)
    elif style == "ainvoke":
        asyncio.run(model.ainvoke("hi", config))
    elif style == "stream":
        chunks = list(model.stream("hi", config))
    elif style == "astream":
        async def read() -> None:
            async for chunk in model.astream("hi", config):
                chunks.append(chunk)
        asyncio.run(read())
    elif style == "chain stream":
        chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
        chunks = list(chain.stream({"q": "hi"}, config))
    else:
        model.batch(["hi", "ho"], config)
    pipeline.close()
    if "stream" in style and style != "invoke streaming":
        assert len(chunks) == 2  # streamed (the text, then the usage chunk), not one invoke's answer
    sessions = [s for (s,) in sqlite3.connect(url).execute("SELECT session FROM calls")]
    assert sessions and set(sessions) == {"T-1"}


def test_the_callback_handler_s_session_is_an_lcel_chain_s_configurable_thread_id(tmp_path) -> None:
    """review61 (a new user's trial): RouterCallbackHandler read the session from the callbacks'
    metadata alone, where langchain-core puts a ``configurable`` thread_id only inside a LangGraph
    run: an LCEL chain's calls had no session (a session budget did not count them). A bare model's
    configurable is out of a callback's reach: its thread is named in the metadata; a model invoked
    inside another run with a config of its own is not given the outer run's thread."""
    import sqlite3

    from langchain_core.runnables import RunnableLambda

    url = tmp_path / "ledger.db"
    pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{url}"}, "cache": {"enabled": False}})
    handler = RouterCallbackHandler(pipeline)

    def model() -> GenericFakeChatModel:
        return GenericFakeChatModel(messages=iter([AIMessage("x", response_metadata={"model_name": "gpt-4o-mini"},
                                                             usage_metadata={"input_tokens": 10, "output_tokens": 3,
                                                                             "total_tokens": 13})]))
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    (prompt | model()).invoke({"q": "x"}, config={"callbacks": [handler], "configurable": {"thread_id": "chain"}})
    asyncio.run((prompt | model()).ainvoke({"q": "x"}, config={"callbacks": [handler],
                                                              "configurable": {"thread_id": "achain"}}))
    model().invoke("x", config={"callbacks": [handler], "metadata": {"thread_id": "bare"}})
    inner = RunnableLambda(lambda q: model().invoke(q, config={"callbacks": [handler],
                                                               "configurable": {"thread_id": "inner"}}))
    inner.invoke("x", config={"configurable": {"thread_id": "outer"}})  # review61b: recorded as the outer run's
    pipeline.close()
    assert [s for (s,) in sqlite3.connect(url).execute("SELECT session FROM calls ORDER BY ts")] == \
        ["chain", "achain", "bare", None]


def test_a_session_budget_counts_a_streamed_call() -> None:
    from router_middleware import BudgetExceeded

    pipeline = Pipeline.from_config({"routing": {"budgets": [{"name": "per-thread", "scope": "session",
                                                              "tokens": 60}]}, "cache": {"enabled": False}})
    model = RoutedChatModel(model="gpt-4o-mini", pipeline=pipeline, model_kwargs={"mock_response": "ok " * 10})
    config: Any = {"metadata": {"thread_id": "T-2"}}
    with pytest.raises(BudgetExceeded, match="per-thread"):
        for _ in range(10):
            for _ in model.stream("hi", config):
                pass


def test_a_routed_model_takes_its_pipeline_s_config_as_the_adapters_do(tmp_path) -> None:
    """``pipeline="router.yaml"`` raised pydantic's "Input should be an instance of Pipeline"."""
    path = tmp_path / "router.yaml"
    path.write_text("routing:\n  aliases:\n    coder: [gpt-4o-mini]\n")
    answer = RoutedChatModel(model="coder", pipeline=str(path), model_kwargs={"mock_response": "ok"}).invoke("hi")
    assert answer.content == "ok" and answer.response_metadata["routed_model"] == "gpt-4o-mini"
    assert RoutedChatModel(pipeline={"app": "a"}).pipeline.config.app == "a"
    path.write_text("routing:\n  alias: {}\n")
    with pytest.raises(ConfigError, match=r"router.yaml: field 'routing.alias': unknown field; did you mean 'aliases'"):
        RoutedChatModel(pipeline=path)
    with pytest.raises(ConfigError, match="RoutedChatModel: expected a Pipeline or its config"):
        RoutedChatModel(pipeline=3)


def test_the_agent_middleware_s_own_retries_replace_the_sdk_s_as_the_pipeline_s_do(monkeypatch) -> None:
    """``attempts_per_model: 2`` on an agent's one target: each try kept the OpenAI SDK's two retries
    (six requests) where ``Pipeline.completion`` sends two (a review)."""
    from langchain.agents import create_agent
    from langchain_core.messages import HumanMessage

    from router_middleware.langchain import RoutedChatModel

    from .capture_server import capture_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with capture_server() as (down, sent):
        model = RoutedChatModel(model="openai/gpt-3.5-turbo", pipeline=Pipeline(), api_base=down)
        pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["down"]},
                                                     "fallback": {"attempts_per_model": 2, "backoff_s": 0.0}},
                                         "cache": {"enabled": False}})
        agent = create_agent(model, tools=[], middleware=[RouterAgentMiddleware(pipeline, models={"down": model},
                                                                                model="coder")])
        with pytest.raises(Exception, match="capture server"):
            agent.invoke({"messages": [HumanMessage("Rename x to count")]})
    assert len(sent) == 2


@pytest.mark.parametrize("counts", [{"input_tokens": None, "output_tokens": 2}, {"input_tokens": float("nan"), "output_tokens": 2},
                                    {"input_tokens": float("inf"), "output_tokens": 2}])
def test_the_callback_records_an_answer_whose_usage_metadata_holds_no_count(tmp_path, counts) -> None:
    """A None, NaN or infinite count in ``usage_metadata`` raised in the handler: the answered call got no
    row, and ``llm_call_failed`` was logged for it."""
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    handler = RouterCallbackHandler(Pipeline.from_config({"ledger": {"url": url}}))
    message = AIMessage(content="hi", response_metadata={"model_name": "gpt-4o-mini"})
    object.__setattr__(message, "usage_metadata", {**counts, "total_tokens": 2})  # as a provider package may
    with structlog.testing.capture_logs() as logs:
        GenericFakeChatModel(messages=iter([message])).invoke("hi", config={"callbacks": [handler]})
    assert "llm_call_failed" not in {e["event"] for e in logs}
    handler.pipeline.close()
    assert open_ledger(url).query("SELECT input_tokens, output_tokens, ended, error FROM calls") == \
        [(0, 2, "complete", None)]


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
@pytest.mark.parametrize("way", ["model", "middleware"])
def test_an_agent_keeps_every_turn_when_the_provider_repeats_its_response_id(way, stream, monkeypatch) -> None:
    """The scripted server answers every request as ``chatcmpl-scripted`` (some servers repeat ids).
    RoutedChatModel made it the AIMessage's id, and LangGraph's ``add_messages`` replaced the first
    turn with the second: its tool call gone, the run failed on the orphaned tool result. The message
    now has the run's id, as ChatOpenAI's, and the provider's stays in ``response_metadata["id"]``
    (and the span's ``gen_ai.response.id``)."""
    from langchain.agents import create_agent

    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("UP_KEY", "sk-x")
    with scripted_upstream(steps=2) as (base, seen):
        pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"deployments": {
            "a": {"model": "openai/gpt-4o-mini", "api_base": base, "api_key_env": "UP_KEY"}}}})
        model = RoutedChatModel(model="a", pipeline=pipeline, streaming=stream)
        middleware = [RouterAgentMiddleware(pipeline, models={"a": model}, model="a")] if way == "middleware" else []
        state = create_agent(model, tools=_scripted_tools(), middleware=middleware).invoke(
            {"messages": [HumanMessage("run it")]})
    turns = [m for m in state["messages"] if isinstance(m, AIMessage)]
    assert len(seen) == 3 and [len(t.tool_calls) for t in turns] == [1, 1, 1]
    assert [t.tool_calls[0]["name"] for t in turns] == ["run_commands", "run_commands", "submit_and_exit"]
    assert len({t.id for t in turns}) == 3 and all(t.id and t.id.startswith("lc_run-") for t in turns)
    assert {t.response_metadata["id"] for t in turns} == {"chatcmpl-scripted"}


def _scripted_tools() -> list[Any]:
    """The two tools the scripted server's answers call (:mod:`tests.scripted_upstream`)."""
    from langchain_core.tools import tool

    @tool
    def run_commands(commands: list[str]) -> str:
        """Run shell commands and return their output."""
        return "\n".join(commands)

    @tool(return_direct=True)
    def submit_and_exit(summary: str, verified: bool) -> str:
        """Submit the final result."""
        return "submitted"

    return [run_commands, submit_and_exit]


@pytest.mark.parametrize("break_after", [2, 4], ids=["cut mid tool call", "no usage chunk"])
def test_an_agent_stream_the_provider_reports_no_usage_for_is_estimated_as_the_pipeline_s_own(break_after, tmp_path,
                                                                                              monkeypatch) -> None:
    """A streamed tool call that breaks off after its first fragment (a failed attempt, the fallback
    answers), or ends without a usage chunk: the agent's row is estimated as ``Pipeline.completion``
    estimates the same stream. Before, a cut tool call counted 1 output token on the agent's path (its
    text alone: LangChain's chunks carry the call apart; 35 through the pipeline), and a stream with no
    usage chunk counted its prompt without the tool definitions (9 tokens; 144 with them)."""
    from langchain.agents import create_agent
    from langchain_core.utils.function_calling import convert_to_openai_tool

    from router_middleware.ledger.store import open_ledger

    from . import scripted_upstream as scripted
    from .scripted_upstream import scripted_upstream

    reply = scripted._reply  # one call id for every answer: a random one takes 6 to 14 tokens
    monkeypatch.setattr(scripted, "_reply", lambda *args: {**reply(*args), "id": "call_0123456789ab"})
    monkeypatch.setenv("UP_KEY", "sk-x")
    tools = _scripted_tools()
    with scripted_upstream(break_after=break_after) as (cut, _), scripted_upstream() as (whole, _):
        def pipeline(url: str) -> Pipeline:
            return Pipeline.from_config({"cache": {"enabled": False}, "ledger": {"url": url}, "routing": {
                "deployments": {name: {"model": "openai/gpt-4o-mini", "api_base": base, "api_key_env": "UP_KEY"}
                                for name, base in (("cut", cut), ("whole", whole))},
                "aliases": {"coder": ["cut", "whole"]}, "fallback": {"backoff_s": 0}}})

        agent_url, own_url = (f"sqlite:///{tmp_path / name}.db" for name in ("agent", "own"))
        routed = pipeline(agent_url)
        models = {name: RoutedChatModel(model=name, pipeline=routed, streaming=True) for name in ("cut", "whole")}
        create_agent(models["cut"], tools=tools, middleware=[RouterAgentMiddleware(routed, models=models, model="coder")]
                     ).invoke({"messages": [HumanMessage("say hello")]})
        routed.close()
        own = pipeline(own_url)
        try:
            for _ in own.completion("cut", [{"role": "user", "content": "say hello"}], stream=True,
                                    tools=[convert_to_openai_tool(t) for t in tools]):
                pass
        except Exception as exc:  # noqa: BLE001 - the cut stream raises to its reader, after its row
            assert break_after == 2, exc
        own.close()
    query = "SELECT ended, input_tokens, output_tokens FROM calls ORDER BY ts LIMIT 1"
    ((agent_ended, agent_in, agent_out),) = open_ledger(agent_url).query(query)
    ((own_ended, own_in, own_out),) = open_ledger(own_url).query(query)
    assert agent_ended == own_ended == ("failed" if break_after == 2 else "complete")
    assert agent_in == own_in > 100  # the tool definitions counted
    assert agent_out == own_out > 20


def test_the_callback_s_row_has_the_agent_s_step_as_the_middleware_counts_it(tmp_path) -> None:
    """An observed call's row has its ``step``: the model turns before it (its assistant messages), as
    RouterAgentMiddleware and the proxy count them; a step the handler's context sets is kept. Before,
    the handler's rows had no step (NULL), so a ledger's per-step view left them out."""
    from router_middleware.ledger.store import open_ledger

    history = [HumanMessage("a"), AIMessage("b"), HumanMessage("c"), AIMessage("d"), HumanMessage("e")]
    steps = []
    for context in (None, {"step": 7}):
        url = f"sqlite:///{tmp_path / f'ledger{len(steps)}.db'}"
        handler = RouterCallbackHandler(Pipeline.from_config({"ledger": {"url": url}}), context=context)
        for turns in (1, 5):
            GenericFakeChatModel(messages=iter([AIMessage("ok")])).invoke(history[:turns], config={"callbacks": [handler]})
        handler.pipeline.close()
        steps.append([step for (step,) in open_ledger(url).query("SELECT step FROM calls ORDER BY ts")])
    assert steps == [[0, 2], [7, 7]]


def test_the_callback_estimates_a_call_its_model_reports_no_usage_for_with_its_tools_and_tool_call() -> None:
    """A chat model with bound tools streams a tool call and reports no usage: the handler settles it
    at the prompt counted with the tool definitions (as the pipeline counts the same request; before,
    without them: 10 tokens for 101) and at the tool call it streamed (before, 1 token: its text)."""
    from langchain_core.messages import AIMessageChunk
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.outputs import ChatGenerationChunk, ChatResult
    from langchain_core.utils.function_calling import convert_to_openai_tool

    class NoUsage(BaseChatModel):
        model_name: str = "gpt-4o-mini"

        @property
        def _llm_type(self) -> str:
            return "no-usage"

        def bind_tools(self, tools: Any, **kwargs: Any) -> Any:
            return self.bind(tools=[convert_to_openai_tool(t) for t in tools], **kwargs)

        def _generate(self, *args: Any, **kwargs: Any) -> ChatResult:
            raise NotImplementedError

        def _stream(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> Any:
            for first, piece in ((True, '{"commands": ["echo '), (False, 'hi"]}')):
                chunk = ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[tool_call_chunk(
                    name="run_commands" if first else None, args=piece, id="c1" if first else None, index=0)]))
                if run_manager:
                    run_manager.on_llm_new_token("", chunk=chunk)
                yield chunk

    tools = _scripted_tools()
    pipeline = Pipeline.from_config({"cache": {"enabled": False}})
    handler = RouterCallbackHandler(pipeline)
    for _ in NoUsage().bind_tools(tools).stream([HumanMessage("run the tests")], config={"callbacks": [handler]}):
        pass
    usage = handler.outcomes[-1].usage
    counted = pipeline.state.tokens("gpt-4o-mini", [{"role": "user", "content": "run the tests"}],
                                    [convert_to_openai_tool(t) for t in tools])
    assert usage.source == "estimated" and usage.input_tokens == counted > 50 and usage.output_tokens > 10


@pytest.mark.parametrize("answer", [
    AIMessage([{"type": "reasoning", "reasoning": "I should list the files first, then run the tests."}]),
    AIMessage([{"type": "reasoning", "summary": [{"type": "summary_text", "text": "I should list the files first, "},
                                                 {"type": "summary_text", "text": "then run the tests."}]}]),
    AIMessage([{"type": "thinking", "thinking": "I should list the files first, then run the tests."}]),
    AIMessage("", invalid_tool_calls=[{"type": "invalid_tool_call", "id": "c1", "name": "run_commands",
                                       "args": '{"commands": ["echo I should list the files first', "error": None}]),
], ids=["v1 reasoning", "responses summary", "thinking", "invalid tool call"])
def test_an_answer_without_usage_is_estimated_at_what_it_said_in_any_block(answer) -> None:
    """An answer the provider reports no usage for is counted at what it said: a reasoning block
    (LangChain's v1 ``reasoning``, the Responses API's ``summary``), a thinking block, a tool call that
    did not parse. Before, each counted 1 output token."""
    from router_middleware.langchain.convert import usage_from_message

    assert usage_from_message(answer, 0, "gpt-4o-mini").output_tokens >= 10


def test_a_v1_answer_counts_its_reasoning_once() -> None:
    """A v1 message (``output_version="v1"``) holds its reasoning in a ``reasoning`` block and still in
    ``additional_kwargs["reasoning_content"]``: counted once (review57b: twice, 242 tokens for 122)."""
    from langchain_core.language_models._utils import _update_message_content_to_blocks

    from router_middleware.langchain.convert import usage_from_message

    v0 = AIMessage("done", additional_kwargs={"reasoning_content": "I should list the files first. " * 20})
    v1 = _update_message_content_to_blocks(v0, "v1")
    assert "reasoning_content" in v1.additional_kwargs and v1.content[0]["type"] == "reasoning"
    counts = [usage_from_message(m, 0, "gpt-4o-mini").output_tokens for m in (v0, v1)]
    assert abs(counts[0] - counts[1]) <= 1 and counts[0] > 100


@pytest.mark.parametrize("reported", [False, True])
def test_the_callback_records_a_call_whose_tools_cannot_be_counted_in_order(reported) -> None:
    """Tools whose schema mixes key types (``{1: ..., "a": ...}``) could not be serialised sorted: the
    handler's prompt count raised, and the call had no row even when its model reported usage
    (review57b). They are counted as given, and the prompt is counted only for a call without usage."""
    from langchain_core.outputs import ChatGeneration, ChatResult

    class Tooled(BaseChatModel):
        model_name: str = "gpt-4o-mini"

        @property
        def _llm_type(self) -> str:
            return "tooled"

        def _generate(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> ChatResult:
            usage = {"usage_metadata": {"input_tokens": 500, "output_tokens": 3, "total_tokens": 503}} if reported else {}
            return ChatResult(generations=[ChatGeneration(message=AIMessage("ok", **usage))])

    odd = [{"type": "function", "function": {"name": "f", "parameters": {1: "x", "a": "y"}}}]
    handler = RouterCallbackHandler(Pipeline.from_config({"cache": {"enabled": False}}))
    Tooled().bind(tools=odd).invoke([HumanMessage("hi")], config={"callbacks": [handler]})
    [result] = handler.outcomes
    assert result.usage.input_tokens == (500 if reported else result.usage.input_tokens) > 10


def test_the_middleware_takes_a_deployment_named_like_a_route_with_a_suffix() -> None:
    """``model="x:floor"`` naming a deployment ``x:floor`` is that deployment (review57b: read as the
    route ``x`` by price and refused as no alias or deployment); ``q:7b:floor`` is the alias ``q:7b``."""
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
        "deployments": {"x:floor": {"model": "openai/gpt-4o"}}, "aliases": {"q:7b": ["x:floor"]}}})
    model = GenericFakeChatModel(messages=iter(["unused"]))
    for route in ("x:floor", "q:7b:floor"):
        RouterAgentMiddleware(pipeline, models={"x:floor": model}, model=route)
    with pytest.raises(ConfigError, match=r"model='x:nitro': not an alias, a deployment or one of models="):
        RouterAgentMiddleware(pipeline, models={"x:floor": model}, model="x:nitro")
