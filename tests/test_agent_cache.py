"""The response cache behind ``RouterAgentMiddleware`` (sync and async): a repeated agent request with a
deterministic model is answered from the cache without calling the model, keyed by what the model
sends of its own; what is not cacheable, and a cache that fails, reach the model as before.

The agent's models are ``RoutedChatModel``s on a pipeline of their own (no cache) calling litellm with
``mock_response``, and LangChain's ``GenericFakeChatModel`` where an answer's own content blocks matter."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain.agents.middleware import ModelRequest, ModelResponse
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage
from opentelemetry.trace import SpanKind
from pydantic import Field

from router_middleware import Pipeline
from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware
from router_middleware.stores import MemoryStore

QUESTION = [HumanMessage("What is 2 + 2?")]
INNER = {"telemetry": {"enabled": False}, "cache": {"enabled": False}, "context": {"enabled": False}}


def routed(answer: str = "4", **settings: Any) -> RoutedChatModel:
    return RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline.from_config(INNER),
                           model_kwargs={"mock_response": answer, **settings.pop("model_kwargs", {})}, **settings)


class Fake(GenericFakeChatModel):
    messages: Iterator[AIMessage | str] = Field(exclude=True)  # the test's script of answers: not a setting sent
    temperature: float | None = None


@pytest.fixture(params=["wrap_model_call", "awrap_model_call"])
def ask(request) -> Callable[..., tuple[ModelResponse, int]]:
    """``ask(middleware, model, messages=QUESTION, **request)``: the middleware's answer to one model call,
    and how many times the handler called the model."""

    def run(middleware: RouterAgentMiddleware, model: Any, messages: list[Any] = QUESTION,
            **fields: Any) -> tuple[ModelResponse, int]:
        called: list[int] = []
        model_request = ModelRequest(model=model, messages=messages, model_settings={}, **fields)
        if request.param == "wrap_model_call":
            def handler(r: ModelRequest) -> ModelResponse:
                called.append(1)
                return ModelResponse(result=[r.model.invoke(r.messages)])

            return middleware.wrap_model_call(model_request, handler), len(called)

        async def ahandler(r: ModelRequest) -> ModelResponse:
            called.append(1)
            return ModelResponse(result=[await r.model.ainvoke(r.messages)])

        return asyncio.run(middleware.awrap_model_call(model_request, ahandler)), len(called)

    return run


def pipeline(**cache: Any) -> Pipeline:
    return Pipeline.from_config({"context": {"enabled": False}, "cache": cache})


def test_a_repeated_request_at_temperature_0_is_answered_from_the_cache(ask, span_exporter, tmp_path) -> None:
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    middleware = RouterAgentMiddleware(Pipeline.from_config({"context": {"enabled": False}, "ledger": {"url": url}}))
    model = routed(temperature=0)
    first, called = ask(middleware, model)
    assert called == 1
    second, called = ask(middleware, model)
    assert called == 0
    live, hit = first.result[0], second.result[0]
    assert isinstance(hit, AIMessage) and hit.content == live.content == "4"
    assert hit.usage_metadata["total_tokens"] == 0 and live.usage_metadata["total_tokens"] > 0
    assert hit.response_metadata["usage_source"] == "cache" and hit.response_metadata["cost_usd"] == 0
    assert hit.response_metadata["model_name"] == "gpt-4o-mini"
    assert hit.id and hit.id != live.id  # its own run's, not the stored answer's (maybe in another thread)
    spans = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL]
    assert spans[-1].attributes["router_middleware.cache.hit"] is True
    assert spans[-1].attributes["router_middleware.savings.estimated_usd"] == pytest.approx(
        live.response_metadata["cost_usd"])
    middleware.pipeline.close()
    rows = open_ledger(url).query("SELECT cache_hit, cost_usd, saved_cache_usd, deployment FROM calls ORDER BY ts")
    assert [r[0] for r in rows] == [0, 1] and rows[1][1] == 0
    assert rows[1][2] == pytest.approx(live.response_metadata["cost_usd"]) and rows[0][1] == rows[1][2] > 0


def test_a_hit_serves_the_answer_as_the_model_gave_it(ask) -> None:
    blocks = [{"type": "thinking", "thinking": "2 and 2", "signature": "sig"},
              {"type": "text", "text": "Let me check."},
              {"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {"expr": "2+2"}}]
    answer = AIMessage(content=blocks, tool_calls=[{"name": "calc", "args": {"expr": "2+2"}, "id": "toolu_1"}],
                       usage_metadata={"input_tokens": 12, "output_tokens": 30, "total_tokens": 42},
                       response_metadata={"model_name": "claude-sonnet-4-5", "stop_reason": "tool_use"})
    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([answer]), temperature=0)  # one answer: a second call would fail
    first, _ = ask(middleware, model)
    second, called = ask(middleware, model)
    assert called == 0
    hit = second.result[0]
    assert hit.content == blocks and hit.tool_calls == answer.tool_calls
    assert hit.response_metadata["stop_reason"] == "tool_use"  # the model's own metadata, and the hit's
    assert hit.response_metadata["usage_source"] == "cache" and hit.usage_metadata["total_tokens"] == 0
    assert first.result[0].usage_metadata["total_tokens"] == 42


@pytest.mark.parametrize("case", ["temperature unset", "temperature 0.7", "opted out", "another model setting",
                                  "another tool_choice", "a response_format"])
def test_what_the_cache_does_not_answer(ask, case) -> None:
    from langchain_core.tools import tool

    @tool
    def calc(expr: str) -> str:
        """Evaluate ``expr``."""
        return expr

    context = {"cache": False} if case == "opted out" else None
    middleware = RouterAgentMiddleware(pipeline(), context=context)
    settings = {"temperature": 0.7} if case == "temperature 0.7" else {} if case == "temperature unset" else {
        "temperature": 0}
    ask(middleware, routed(**settings), tools=[calc], tool_choice="auto")
    if case == "another model setting":
        settings["max_tokens"] = 50
    fields: dict[str, Any] = {"tools": [calc], "tool_choice": "required" if case == "another tool_choice" else "auto"}
    if case == "a response_format":
        from langchain.agents.structured_output import ToolStrategy

        fields["response_format"] = ToolStrategy({"type": "object", "properties": {}, "title": "Sum"})
        ask(middleware, routed(**settings), **fields)  # not stored either
    _, called = ask(middleware, routed(**settings), **fields)
    assert called == 1


def test_model_kwargs_are_part_of_the_key(ask) -> None:
    middleware = RouterAgentMiddleware(pipeline())
    ask(middleware, routed(temperature=0))
    _, called = ask(middleware, routed(temperature=0, model_kwargs={"top_p": 0.5}))
    assert called == 1


def test_a_pipeline_s_entry_is_not_an_agent_s_answer(ask) -> None:
    """The same model and messages through ``Pipeline.completion`` and the middleware are two keys."""
    shared = pipeline()
    shared.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "What is 2 + 2?"}],
                      temperature=0, mock_response="4")
    _, called = ask(RouterAgentMiddleware(shared), routed(temperature=0))
    assert called == 1


def test_a_failing_cache_store_never_fails_the_call(ask, monkeypatch) -> None:
    class Broken(MemoryStore):
        def get(self, key: str) -> Any:
            raise ConnectionError("cache down")

        def put_bounded(self, *args: Any) -> None:
            raise ConnectionError("cache down")

    middleware = RouterAgentMiddleware(pipeline())
    monkeypatch.setattr(middleware.pipeline.cache, "store", Broken())
    for _ in range(2):
        answer, called = ask(middleware, routed(temperature=0))
        assert called == 1 and answer.result[0].content == "4"


def test_an_answer_the_cache_cannot_hold_is_answered_and_not_stored(ask) -> None:
    odd = AIMessage(content="4", additional_kwargs={"parsed": object()},
                    usage_metadata={"input_tokens": 5, "output_tokens": 1, "total_tokens": 6})
    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([odd, AIMessage("4")]), temperature=0)
    answer, _ = ask(middleware, model)
    assert answer.result[0].content == "4"
    _, called = ask(middleware, model)
    assert called == 1


@pytest.mark.parametrize("odd", [{"tool_calls": [{"name": "calc", "args": {"xs": (1, 2)}, "id": "c1"}]},
                                 {"additional_kwargs": {"scores": {1: "a"}}}], ids=["a tuple", "a number as a key"])
def test_an_answer_json_would_read_back_otherwise_is_not_stored(ask, odd) -> None:
    """Stored, a tuple would come back a list and a number key a string: the hit would differ from the
    answer the model gave, so there is no entry."""
    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage(content="4", **odd), AIMessage("4")]), temperature=0)
    first, _ = ask(middleware, model)
    assert [c["args"] for c in first.result[0].tool_calls] == [c["args"] for c in odd.get("tool_calls", [])]
    _, called = ask(middleware, model)
    assert called == 1


def test_an_entry_the_middleware_cannot_read_is_a_miss_not_a_failed_call(ask, tmp_path) -> None:
    """An entry whose LangChain form does not parse (another version's, or corrupt) passes the cache's
    own check of its chat completion: it is a miss, the model answers, and the ledger records no hit."""
    import json

    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    middleware = RouterAgentMiddleware(Pipeline.from_config({"context": {"enabled": False}, "ledger": {"url": url}}))
    model = Fake(messages=iter([AIMessage("4"), AIMessage("four")]), temperature=0)
    ask(middleware, model)
    store = middleware.pipeline.cache.store
    [key] = [k for k in store._data if k.startswith("cache:") and ":slot:" not in k and not k.endswith(":seq")]
    data = json.loads(store._data[key][0])
    data["native"] = {"type": "ai", "data": {"content": "4", "tool_calls": [{"name": "x"}]}}  # no args, no id
    store._data[key] = (json.dumps(data).encode(), store._data[key][1])
    answer, called = ask(middleware, model)
    assert called == 1 and answer.result[0].content == "four"
    middleware.pipeline.close()
    rows = open_ledger(url).query("SELECT cache_hit, ended FROM calls ORDER BY ts")
    assert [tuple(r) for r in rows] == [(0, "complete"), (0, "complete")]


def test_a_provider_s_server_tool_is_keyed_with_its_settings(ask) -> None:
    """Anthropic's web search with other ``allowed_domains`` is another request (converted to OpenAI's
    shape the tool would be its name alone)."""
    def search(domain: str) -> dict[str, Any]:
        return {"type": "web_search_20250305", "name": "web_search", "allowed_domains": [domain], "max_uses": 5}

    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage("per nytimes.com"), AIMessage("per example.org")]), temperature=0)
    ask(middleware, model, tools=[search("nytimes.com")])
    answer, called = ask(middleware, model, tools=[search("example.org")])
    assert called == 1 and answer.result[0].content == "per example.org"
    _, called = ask(middleware, model, tools=[search("nytimes.com")])
    assert called == 0


@pytest.mark.parametrize("case", ["stop", "a copy with another max_tokens", "bind(max_tokens=)",
                                  "bind(temperature=0.9)"])
def test_every_setting_the_model_sends_is_part_of_the_key(ask, case) -> None:
    """What the model sends of its own beyond LangChain's settings string: a RoutedChatModel's ``stop``,
    a copy of a model made after its string was cached, and the arguments of a ``bind()`` around a
    ``models=`` entry (a bound temperature of 0.9 is not cached at all)."""
    if case == "a copy with another max_tokens":
        from langchain_core.language_models.fake_chat_models import FakeListChatModel

        class Listed(FakeListChatModel):  # serializable, as ChatOpenAI and ChatAnthropic are
            temperature: float | None = 0
            max_tokens: int | None = 4000

            @classmethod
            def is_lc_serializable(cls) -> bool:
                return True

        first = Listed(responses=["a long answer", "a short one"])
        middleware = RouterAgentMiddleware(pipeline())
        ask(middleware, first)
        answer, called = ask(middleware, first.model_copy(update={"max_tokens": 5}))
        assert called == 1 and answer.result[0].content == "a short one"
        return
    if case == "stop":
        middleware = RouterAgentMiddleware(pipeline())
        ask(middleware, routed(temperature=0))
        _, called = ask(middleware, routed(temperature=0, stop=["."]))
        assert called == 1
        return
    model = Fake(messages=iter([AIMessage("first"), AIMessage("second"), AIMessage("third")]), temperature=0)
    bound = model.bind(max_tokens=5) if case == "bind(max_tokens=)" else model.bind(temperature=0.9)
    middleware = RouterAgentMiddleware(pipeline(), models={"gpt-4o-mini": model, "gpt-4o": bound},
                                       model="gpt-4o-mini")
    agent_model = routed(temperature=0)  # the agent's model: routed to models= by name
    ask(middleware, agent_model)
    swapped = RouterAgentMiddleware(pipeline(), models={"gpt-4o-mini": bound}, model="gpt-4o-mini")
    swapped.pipeline.cache.store = middleware.pipeline.cache.store  # one store, as two workers share Redis
    answer, called = ask(swapped, agent_model)
    assert called == 1 and answer.result[0].content == "second"
    if case == "bind(temperature=0.9)":
        answer, called = ask(swapped, agent_model)
        assert called == 1 and answer.result[0].content == "third"


def test_on_real_redis_one_middleware_s_answer_serves_another_s(ask, redis_url) -> None:
    """Two middlewares (two workers) sharing one Redis: the second answers from the first's entry."""
    config, app = {"context": {"enabled": False}, "store": redis_url}, {"app": f"agent-{uuid.uuid4().hex[:8]}"}
    first, called = ask(RouterAgentMiddleware(Pipeline.from_config(config), context=app), routed(temperature=0))
    assert called == 1
    second, called = ask(RouterAgentMiddleware(Pipeline.from_config(config), context=app), routed(temperature=0))
    assert called == 0 and second.result[0].content == first.result[0].content == "4"


def test_in_a_create_agent_loop_a_hit_gets_an_id_and_is_streamed() -> None:
    """End to end: the hit's message has an id of its own, and ``stream_mode="messages"`` yields it
    (as a chunk of the run that plays it back)."""
    from langchain.agents import create_agent

    agent = create_agent(routed(temperature=0), tools=[], middleware=[RouterAgentMiddleware(pipeline())])
    ask = {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    live = agent.invoke(ask)["messages"][-1]
    hit = agent.invoke(ask)["messages"][-1]
    assert hit.content == live.content == "4" and hit.response_metadata["usage_source"] == "cache"
    assert hit.id and hit.id != live.id
    streamed = [chunk for chunk, _ in agent.stream(ask, stream_mode="messages")]
    assert [(c.content, c.response_metadata.get("usage_source")) for c in streamed] == [("4", "cache")]


@pytest.mark.parametrize("run", ["stream", "astream_events"])
def test_a_hit_streams_and_has_chat_model_events_as_a_live_answer_does(run, tmp_path) -> None:
    """A hit answered without a model run: LangGraph's ``stream_mode="messages"`` got the whole message
    from the node's output (an ``AIMessage``, no chunk) and ``astream_events`` no ``on_chat_model_*``
    event, so a UI streaming the agent showed nothing for it. Now a run plays it back: one chunk and
    the events, as the live answer's (its chunks, its events); the hit is still one ledger row with a
    RouterCallbackHandler on the run (which only lists what the middleware accounts)."""
    from langchain.agents import create_agent

    from router_middleware.langchain import RouterCallbackHandler
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = Pipeline.from_config({"context": {"enabled": False}, "ledger": {"url": url}})
    handler = RouterCallbackHandler(engine)
    agent = create_agent(routed(temperature=0), tools=[], middleware=[RouterAgentMiddleware(engine)])
    ask = {"messages": [{"role": "user", "content": "What is 2 + 2?"}]}
    config = {"callbacks": [handler]}

    def streamed() -> list[tuple[str, str]]:
        if run == "stream":
            return [(type(c).__name__, c.content) for c, _ in agent.stream(ask, config, stream_mode="messages")]

        async def events() -> list[tuple[str, str]]:
            return [(e["event"], getattr(e["data"].get("chunk"), "content", "")) async for e in
                    agent.astream_events(ask, config, version="v2") if "chat_model" in e["event"]]
        return asyncio.run(events())

    live, hit = streamed(), streamed()
    if run == "stream":
        assert ("AIMessageChunk", "4") in live and hit == [("AIMessageChunk", "4")]
    else:
        assert [e for e, _ in hit] == ["on_chat_model_start", "on_chat_model_stream", "on_chat_model_end"]
        assert ("on_chat_model_stream", "4") in live and ("on_chat_model_stream", "4") in hit
    assert len(handler.outcomes) == 2  # listed as before, not recorded: the hit's run is no call of its own
    engine.close()
    rows = open_ledger(url).query("SELECT cache_hit FROM calls ORDER BY ts")
    assert [r[0] for r in rows] == [0, 1]


def test_a_hit_is_played_back_past_langchain_s_own_llm_cache(ask) -> None:
    """With ``set_llm_cache`` on, the play-back run went through LangChain's global cache, keyed by the
    messages alone (every play-back model reads alike): a later hit for the same messages was played
    back as the earlier hit's answer, another model's. The play-back never reads or writes it."""
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import set_llm_cache

    llm_cache = InMemoryCache()
    set_llm_cache(llm_cache)
    try:
        for answer in ("4", "four"):
            middleware = RouterAgentMiddleware(pipeline())  # a cache of its own for each
            model = routed(answer, temperature=0)
            ask(middleware, model)
            hit, called = ask(middleware, model)
            assert called == 0 and hit.result[0].content == answer
    finally:
        set_llm_cache(None)
    assert not [key for key in llm_cache._cache if "router-middleware-cache" in key[1]]  # the models' own only


@pytest.mark.parametrize("where", ["context", "a context field hidden from repr", "a pydantic field hidden from repr",
                                   "configurable"])
@pytest.mark.parametrize("run", ["invoke", "ainvoke"])
def test_a_prompt_a_middleware_inside_makes_per_user_never_answers_another_user(where, run) -> None:
    """A ``dynamic_prompt`` inside the router builds each user's system prompt from the run's context
    (also from a field its ``repr`` hides, as one keeps personal data out of logs) or its
    ``configurable``, after the router keyed the request: they are part of the key, so user B is not
    served A's answer, while A's repeated question is."""
    from dataclasses import dataclass, field

    from langchain.agents import create_agent
    from langchain.agents.middleware import dynamic_prompt
    from langgraph.config import get_config
    from pydantic import BaseModel, Field

    @dataclass
    class User:
        name: str

    @dataclass
    class Hidden:
        profile: str = field(repr=False)

    class Modelled(BaseModel):
        profile: str = Field(repr=False)

    def user(name: str) -> Any:
        return {"context": User(name), "a context field hidden from repr": Hidden(name),
                "a pydantic field hidden from repr": Modelled(profile=name)}.get(where)

    @dynamic_prompt
    def personal(request: ModelRequest) -> str:
        context = request.runtime.context
        name = get_config()["configurable"]["user_id"] if context is None else getattr(
            context, "name", None) or context.profile
        return f"Address the user as {name}."

    answers = iter(["Hi Ada", "Hi Bob", "unused"])
    model = Fake(messages=(AIMessage(a) for a in answers), temperature=0)
    agent = create_agent(model, tools=[], middleware=[RouterAgentMiddleware(pipeline()), personal])
    ask = {"messages": [{"role": "user", "content": "Greet me"}]}

    def said(name: str) -> Any:
        config = {"configurable": {"user_id": name, "thread_id": name}}
        if run == "invoke":
            return agent.invoke(ask, config, context=user(name))["messages"][-1]
        return asyncio.run(agent.ainvoke(ask, config, context=user(name)))["messages"][-1]

    answered = [said(name) for name in ("Ada", "Bob", "Ada")]
    assert [m.content for m in answered] == ["Hi Ada", "Hi Bob", "Hi Ada"]
    assert answered[2].response_metadata["usage_source"] == "cache"
    assert answered[1].response_metadata.get("usage_source") != "cache"


def test_a_context_that_holds_itself_is_answered_and_not_cached(ask) -> None:
    """A run context the key cannot hold (it refers to itself) sends the call uncached, never fails it."""
    from langgraph.runtime import Runtime

    loop: dict[str, Any] = {}
    loop["self"] = loop
    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage("4"), AIMessage("four")]), temperature=0)
    for expected in ("4", "four"):
        answer, called = ask(middleware, model, runtime=Runtime(context=loop))
        assert called == 1 and answer.result[0].content == expected


def test_a_tool_s_extras_are_part_of_the_key(ask) -> None:
    """A tool object's ``extras`` (what ChatAnthropic and ChatOpenAI send beside its schema: input
    examples, ``defer_loading``, a provider's tool definition in its place) are keyed."""
    from langchain_core.tools import tool

    def search_with(extras: dict[str, Any]) -> Any:
        @tool(extras=extras)
        def search(query: str) -> str:
            """Search the web."""
            return query

        return search

    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage("one"), AIMessage("two"), AIMessage("three")]), temperature=0)
    ask(middleware, model, tools=[search_with({"defer_loading": True})])
    for extras in ({"defer_loading": False},
                   {"provider_tool_definition": {"type": "web_search_20250305", "name": "search", "max_uses": 1}}):
        _, called = ask(middleware, model, tools=[search_with(extras)])
        assert called == 1


def _context_pairs() -> dict[str, tuple[Any, Any]]:
    """Two run contexts a prompt could tell apart, by what ``str`` hides of them."""
    import attrs
    from pydantic import BaseModel, PrivateAttr

    @attrs.define
    class Attrs:  # slots, no __dict__
        profile: str = attrs.field(repr=False)

    class Private(BaseModel):
        _profile: str = PrivateAttr(default="")

    one, two = Private(), Private()
    one._profile, two._profile = "Ada", "Bob"
    pairs: dict[str, tuple[Any, Any]] = {
        "an attrs field hidden from repr": (Attrs("Ada"), Attrs("Bob")),
        "a pydantic private attribute": (one, two),
        "a tuple and a list": ({"ids": (1, 2)}, {"ids": [1, 2]}),
        "the order of a mapping": ({"a": 1, "b": 2}, {"b": 2, "a": 1}),
    }
    return pairs


@pytest.mark.parametrize("case", ["an attrs field hidden from repr", "a pydantic private attribute",
                                  "a tuple and a list", "the order of a mapping"])
def test_contexts_a_prompt_could_tell_apart_are_two_keys(ask, case) -> None:
    from langgraph.runtime import Runtime

    first, second = _context_pairs()[case]
    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage("one"), AIMessage("two"), AIMessage("three")]), temperature=0)
    ask(middleware, model, runtime=Runtime(context=first))
    _, called = ask(middleware, model, runtime=Runtime(context=second))
    assert called == 1
    _, called = ask(middleware, model, runtime=Runtime(context=first))
    assert called == 0


@pytest.mark.parametrize("held", ["a connection", "an array", "a lock"])
def test_a_context_holding_what_shows_no_state_is_sent_uncached_and_said_once(ask, held) -> None:
    """A value whose state the key cannot read (a database connection, an array, a lock: ``str`` would
    hold an address, or a summary) is never keyed by a stand-in: the call is sent, not cached, and a
    warning names where the value is, once."""
    import sqlite3
    import threading

    import structlog
    from langgraph.runtime import Runtime

    value = {"a connection": lambda: sqlite3.connect(":memory:"), "a lock": threading.Lock,
             "an array": lambda: pytest.importorskip("numpy").arange(3000)}[held]()
    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage("one"), AIMessage("two")]), temperature=0)
    with structlog.testing.capture_logs() as logs:
        for expected in ("one", "two"):
            answer, called = ask(middleware, model, runtime=Runtime(context={"user": {"handle": value}}))
            assert called == 1 and answer.result[0].content == expected
    said = [e for e in logs if e["event"] == "cache_not_keyed"]
    assert len(said) == 1
    assert "user.handle: a " in said[0]["error"] and "shows no state to key" in said[0]["error"]


def test_what_langgraph_puts_in_configurable_for_one_run_is_not_keyed(ask) -> None:
    """The Agent Server's request id, the run's id and tracing headers change every run: keyed, no run
    would ever hit; the signed-in user's id is keyed."""
    from langchain_core.runnables.config import var_child_runnable_config

    middleware = RouterAgentMiddleware(pipeline())
    model = Fake(messages=iter([AIMessage("one"), AIMessage("two"), AIMessage("three")]), temperature=0)

    def in_run(request_id: str, user: str) -> int:
        token = var_child_runnable_config.set({"configurable": {
            "langgraph_request_id": request_id, "run_id": request_id, "langsmith-trace": request_id,
            "__request_start_time_ms__": 1.0, "thread_id": request_id, "langgraph_auth_user_id": user}})
        try:
            return ask(middleware, model)[1]
        finally:
            var_child_runnable_config.reset(token)

    assert [in_run("r1", "ada"), in_run("r2", "ada"), in_run("r3", "bob")] == [1, 0, 1]


def test_a_key_is_the_same_in_another_process_and_bounded_in_size() -> None:
    """What a key holds carries no memory address (a function by its name, a ``__slots__`` object by its
    fields), so another worker finds the entry; a value with more than 10,000 parts (a shared child
    walked on every path grows it fast) is refused at once, not walked for seconds."""
    import json
    import subprocess
    import sys

    from router_middleware.cache import Unkeyable, key_value

    script = """
import json, sys
from router_middleware.cache import key_value
class Slotted:
    __slots__ = ("name",)
    def __init__(self, name): self.name = name
def fetch(): return 1
print(json.dumps(key_value({"f": fetch, "s": Slotted("ada"), "n": {1, 2}}), sort_keys=True))
"""
    keys = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(keys) == 1 and "0x" not in keys.pop()
    shared: Any = {"leaf": 1}
    for _ in range(13):
        shared = {"a": shared, "b": shared, "c": shared}
    with pytest.raises(Unkeyable, match="more than 10000 values"):
        key_value(shared)
    assert json.dumps(key_value({"a": (1, 2)})) != json.dumps(key_value({"a": [1, 2]}))


def test_an_answer_with_no_text_and_no_tool_call_is_not_cached(ask) -> None:
    """An agent model's empty answer (no text, no tool call) is no answer to serve again: the next
    request like it reaches the model (as the pipeline's: an empty stream, an empty text); one that
    says something is cached."""
    middleware = RouterAgentMiddleware(pipeline())
    empty = Fake(messages=iter([AIMessage(""), AIMessage(""), AIMessage("4")]), temperature=0)
    assert [ask(middleware, empty)[1] for _ in range(4)] == [1, 1, 1, 0]
