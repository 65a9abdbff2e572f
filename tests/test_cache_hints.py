"""Prompt-cache hints checked in the outgoing request body (real recordings answer)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from router_middleware import Pipeline, outcome

from .cassette_data import capturing_vcr
from .conftest import CASSETTES

replayer, SENT = capturing_vcr()
LONG_SYSTEM = "You are a meticulous coding agent. " + "Follow the repository conventions carefully. " * 200


def _sent_body(cassette) -> dict:
    assert cassette.play_count == 1
    return SENT[-1]


def test_anthropic_breakpoints_on_system_and_last_message() -> None:
    pipeline = Pipeline.from_config({})
    with replayer.use_cassette(str(CASSETTES / "anthropic_message_create.yaml")) as cassette:
        response = pipeline.completion(
            model="anthropic/claude-3-opus-20240229", max_tokens=1024,
            messages=[{"role": "system", "content": LONG_SYSTEM},
                      {"role": "user", "content": "Tell me a joke about OpenTelemetry"}],
            context={"session_id": "s1"})
    body = _sent_body(cassette)
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    marks = json.dumps(body).count('"cache_control"')
    assert marks <= 4
    assert outcome(response).plan.decisions[-1].policy == "cache-breakpoints"


@pytest.mark.parametrize(("said", "output", "marked_role"), [("Running it.", "", "assistant"),
                                                             (None, " \n", "user")])
def test_a_tool_s_empty_output_gets_no_breakpoint_the_message_before_it_does(said, output, marked_role) -> None:
    """A command that printed nothing (a tool message with ``""``) is the last message: Anthropic answers
    400 "cache_control cannot be set for empty text blocks" to a mark there (before, the pipeline
    made that request, where the direct call went through). The mark goes on the last message
    that can carry one: not blank output, nor an assistant turn of tool calls alone (litellm drops
    a mark on a message without content)."""
    call = {"id": "toolu_1", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "true"}'}}
    with replayer.use_cassette(str(CASSETTES / "anthropic_message_create.yaml")) as cassette:
        Pipeline.from_config({}).completion(
            model="anthropic/claude-3-opus-20240229", max_tokens=1024,
            messages=[{"role": "system", "content": LONG_SYSTEM},
                      {"role": "user", "content": "Run the formatter " + "on every file. " * 300},
                      {"role": "assistant", "content": said, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "toolu_1", "content": output}],
            context={"session_id": "s1"})
    body = _sent_body(cassette)
    assert '"cache_control"' not in json.dumps(body["messages"][-1])
    marked = [m["role"] for m in body["messages"] if '"cache_control"' in json.dumps(m)]
    assert marked == [marked_role] and body["system"][-1]["cache_control"] == {"type": "ephemeral"}


@pytest.mark.parametrize("system", ["", " \n", [{"type": "text", "text": ""}]])
def test_a_blank_system_prompt_gets_no_breakpoint_behind_long_tools(system) -> None:
    """Tools long enough to cache put the prefix up to a blank system prompt over the minimum: its mark
    went on empty text (Anthropic answers 400 "cache_control cannot be set for empty text blocks",
    where the direct call went through). The tools and the last message are marked."""
    tools = [{"type": "function", "function": {"name": "read_file", "description": "Read a file. " * 900,
                                               "parameters": {"type": "object", "properties": {}}}}]
    pipeline = Pipeline.from_config({})
    plan = pipeline.plan(pipeline.make_call(
        "anthropic/claude-3-opus-20240229", [{"role": "system", "content": system},
                                             {"role": "user", "content": "Read utils.py"}],
        {"session_id": "s1"}, {"tools": tools, "max_tokens": 1024}))
    assert "cache_control" not in json.dumps(plan.messages[0])
    assert plan.params["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" in json.dumps(plan.messages[-1])


def test_no_breakpoint_below_the_minimum_cacheable_size() -> None:
    with replayer.use_cassette(str(CASSETTES / "anthropic_message_create.yaml")) as cassette:
        Pipeline.from_config({}).completion(
            model="anthropic/claude-3-opus-20240229", max_tokens=1024,
            messages=[{"role": "user", "content": "Tell me a joke about OpenTelemetry"}])
    assert "cache_control" not in json.dumps(_sent_body(cassette))


def test_a_client_s_sessions_get_keys_of_their_own_and_a_derived_first_call_its_opening_s() -> None:
    """A run's first call behind the proxy (``head-<h>-first-<r>``, derived) is keyed by its opening
    (``head-<h>``), as every rerun's is; a client's own session ids are keyed as they are, whatever
    they spell (a review: ``onboarding-first-run-alice`` and ``-bob`` shared one key)."""
    from router_middleware.context.breakpoints import session_cache_key

    opening = "head-0123456789abcdef"
    assert session_cache_key(f"{opening}-first-fedcba9876543210") == session_cache_key(opening)
    assert session_cache_key(f"{opening}-first-0000000000000000") == session_cache_key(opening)
    assert len({session_cache_key(s) for s in ("onboarding-first-run-alice", "onboarding-first-run-bob",
                                                 "release-first-draft", "release")}) == 4


def test_openai_gets_a_stable_prompt_cache_key_per_session() -> None:
    keys = []
    for _ in range(2):
        with replayer.use_cassette(str(CASSETTES / "openai_chat.yaml"), allow_playback_repeats=True) as cassette:
            Pipeline.from_config({}).completion(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Tell me a joke about opentelemetry"}],
                context={"session_id": "task-42"})
        keys.append(_sent_body(cassette)["prompt_cache_key"])
    assert keys[0] == keys[1] and keys[0].startswith("rm-")
    with replayer.use_cassette(str(CASSETTES / "openai_chat.yaml"), allow_playback_repeats=True) as cassette:
        Pipeline.from_config({}).completion(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Tell me a joke about opentelemetry"}])
    assert "prompt_cache_key" not in _sent_body(cassette)  # no session, no invented key


@pytest.mark.parametrize(("model", "keyed"), [
    ("gpt-4o-mini", True), ("openai/o3-mini", True), ("azure/gpt-4o", True),
    ("groq/openai/gpt-oss-120b", False), ("together_ai/openai/gpt-oss-20b", False),
    ("openrouter/openai/gpt-4o-mini", False), ("hosted_vllm/gpt-oss-20b", False), ("deepseek/deepseek-chat", False)])
def test_the_prompt_cache_key_goes_to_openai_and_azure_only(model: str, keyed: bool) -> None:
    """OpenAI's ``prompt_cache_key`` is sent to OpenAI and Azure; an OpenAI model served by another
    provider gets none (Groq answers 400 "property 'prompt_cache_key' is unsupported"; before, any
    ``gpt-``/``o``-series name got one, wherever it was served)."""
    pipeline = Pipeline.from_config({})
    plan = pipeline.plan(pipeline.make_call(model, [{"role": "user", "content": "hi"}], {"session_id": "s1"}, {}))
    assert ("prompt_cache_key" in plan.params) is keyed


GROQ = "https://api.groq.com/openai/v1"


@pytest.mark.parametrize(("endpoint", "setting", "keyed"), [
    (None, "auto", True), ("https://api.openai.com/v1", "auto", True), ("https://eu.api.openai.com/v1", "auto", True),
    (GROQ, "auto", False), ("https://integrate.api.nvidia.com/v1", "auto", False),
    ("http://127.0.0.1:8000/v1", "auto", False), ("api.groq.com/openai/v1", "auto", False),
    ("https://api.openai.com.evil.example/v1", "auto", False), ("https://myres.openai.azure.com/openai/v1", "auto", True),
    (GROQ, "always", True), (None, "never", False)])
@pytest.mark.parametrize("where", ["deployment", "call"])
def test_the_prompt_cache_key_goes_only_to_openai_s_endpoint_unless_the_config_says_always(
        endpoint, setting, keyed, where) -> None:
    """An OpenAI model on an OpenAI-compatible endpoint elsewhere (a deployment's ``api_base``, or the
    call's) gets no ``prompt_cache_key``: Groq and NVIDIA answer 400 to the field, so every call there
    failed where a direct call went through. ``context.prompt_cache_key: always`` sends it wherever (a
    gateway that passes it on to OpenAI); ``never`` nowhere."""
    deployment = {"model": "openai/gpt-oss-120b", **({"api_base": endpoint} if endpoint else {})}
    pipeline = Pipeline.from_config({"routing": {"deployments": {"oss": deployment}},
                                     "context": {"prompt_cache_key": setting}})
    model, params = ("oss", {}) if where == "deployment" else \
        ("openai/gpt-oss-120b", {"api_base": endpoint} if endpoint else {})
    plan = pipeline.plan(pipeline.make_call(model, [{"role": "user", "content": "hi"}], {"session_id": "s1"}, params))
    assert ("prompt_cache_key" in plan.params) is keyed
    assert any(d.action == "cache_key" for d in plan.decisions) is keyed


@pytest.mark.parametrize("how", ["OPENAI_BASE_URL", "OPENAI_API_BASE", "litellm.api_base"])
def test_an_openai_model_the_environment_sends_elsewhere_gets_no_prompt_cache_key(monkeypatch, how) -> None:
    """A call given no endpoint goes where litellm sends it: ``litellm.api_base``, else
    ``OPENAI_BASE_URL`` or ``OPENAI_API_BASE`` (a review found Groq's 400 there: the direct call went through)."""
    import litellm

    for name in ("OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.delenv(name, raising=False)
    if how == "litellm.api_base":
        monkeypatch.setattr(litellm, "api_base", GROQ)
    else:
        monkeypatch.setenv(how, GROQ)
    pipeline = Pipeline.from_config({"routing": {"deployments": {"oss": {"model": "openai/gpt-oss-120b"}}}})
    for model in ("oss", "openai/gpt-oss-120b", "gpt-4o-mini"):
        plan = pipeline.plan(pipeline.make_call(model, [{"role": "user", "content": "hi"}], {"session_id": "s1"}, {}))
        assert "prompt_cache_key" not in plan.params, model
    monkeypatch.setattr(litellm, "api_base", None)
    for name in ("OPENAI_BASE_URL", "OPENAI_API_BASE"):
        monkeypatch.setenv(name, "https://api.openai.com/v1")
    plan = pipeline.plan(pipeline.make_call("oss", [{"role": "user", "content": "hi"}], {"session_id": "s1"}, {}))
    assert "prompt_cache_key" in plan.params


def test_a_deployment_on_groq_is_sent_without_the_prompt_cache_key(monkeypatch) -> None:
    """What litellm sends: the deployment's request to Groq's endpoint carries no ``prompt_cache_key``."""
    import litellm

    sent: list[dict] = []
    real = litellm.completion

    def capture(**kwargs):
        sent.append(kwargs)
        return real(**kwargs, mock_response="ok")

    monkeypatch.setattr(litellm, "completion", capture)
    monkeypatch.setenv("GROQ_KEY", "gsk-test")
    pipeline = Pipeline.from_config({"routing": {"deployments": {"oss": {
        "model": "openai/gpt-oss-120b", "api_base": GROQ, "api_key_env": "GROQ_KEY"}}}})
    pipeline.completion(model="oss", messages=[{"role": "user", "content": "hi"}], context={"session_id": "s1"})
    assert sent[0]["api_base"] == GROQ and "prompt_cache_key" not in sent[0]


# -- through the LangChain adapters ------------------------------------------------------------------


def test_a_routed_chat_model_sends_the_callers_own_cache_breakpoints() -> None:
    """LangChain marks an Anthropic breakpoint on a content block (as for ChatAnthropic): sent as
    given, not flattened away with the block's other keys."""
    from langchain_core.messages import HumanMessage, SystemMessage

    from router_middleware.langchain import RoutedChatModel

    model = RoutedChatModel(model="anthropic/claude-3-opus-20240229", max_tokens=1024, pipeline=Pipeline())
    marked = {"type": "text", "text": "Follow the style guide.", "cache_control": {"type": "ephemeral"}}
    with replayer.use_cassette(str(CASSETTES / "anthropic_message_create.yaml")) as cassette:
        model.invoke([SystemMessage([marked]),
                      HumanMessage([{"type": "text", "text": "Tell me a joke"}, {**marked, "text": "about OpenTelemetry"}])])
    body = _sent_body(cassette)
    assert body["system"] == [marked]
    assert body["messages"][-1]["content"] == [{"type": "text", "text": "Tell me a joke"},
                                               {**marked, "text": "about OpenTelemetry"}]


def _agent_call(model: str, cassette_name: str, session: str | None = "task-42", tools: tuple = ()) -> dict:
    """The body one model call of a ``create_agent`` agent sends through RouterAgentMiddleware
    (default policies)."""
    from langchain.agents import create_agent

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    models = {model: RoutedChatModel(model=model, max_tokens=1024, pipeline=Pipeline())}
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models=models,
                                       model=model, context={"session_id": session} if session else None)
    agent = create_agent(models[model], tools=list(tools), system_prompt=LONG_SYSTEM, middleware=[middleware])
    with replayer.use_cassette(str(CASSETTES / cassette_name)) as cassette:
        agent.invoke({"messages": [{"role": "user", "content": "Tell me a joke about OpenTelemetry"}]})
    return _sent_body(cassette)


def test_the_agent_middleware_sends_the_anthropic_breakpoints_it_records() -> None:
    from langchain_core.tools import tool

    @tool(description="Read a file of the repository. " + "Paths are relative to the repository root. " * 150)
    def read_file(path: str) -> str:
        return path

    body = _agent_call("anthropic/claude-3-opus-20240229", "anthropic_message_create.yaml", tools=(read_file,))
    assert body["tools"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["tools"][-1]["name"] == "read_file"
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["system"][-1]["text"] == LONG_SYSTEM


def test_the_agent_middleware_sends_the_prompt_cache_key_it_records() -> None:
    body = _agent_call("gpt-3.5-turbo", "openai_chat.yaml")
    assert body["prompt_cache_key"] == _agent_call("gpt-3.5-turbo", "openai_chat.yaml")["prompt_cache_key"]
    assert body["prompt_cache_key"].startswith("rm-")  # the session's key, as Pipeline.completion sends it
    assert "prompt_cache_key" not in _agent_call("gpt-3.5-turbo", "openai_chat.yaml", session=None)


@pytest.mark.parametrize("where", ["models", "the agent's own"])
def test_the_agent_middleware_sends_no_prompt_cache_key_to_a_model_on_another_endpoint(where) -> None:
    """An agent's model of an OpenAI model on Groq's endpoint (its ``api_base``), or of another family
    (a chat model class that is no OpenAI client), gets no ``prompt_cache_key`` (Groq answers 400 to
    it); one on OpenAI's API does, in ``models=`` or as the agent's own model."""
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    class OtherFamily(GenericFakeChatModel):
        model_name: str = "openai/gpt-oss-120b"

    class ChatOpenAI(GenericFakeChatModel):  # as langchain_openai's: its client resolved OPENAI_BASE_URL
        model_name: str = "gpt-4o-mini"
        root_client: Any = None

    ChatOpenAI.__module__ = "langchain_openai.chat_models.base"
    cases = [(RoutedChatModel(model="openai/gpt-oss-120b", api_base=GROQ, pipeline=Pipeline()), False),
             (OtherFamily(messages=iter(())), False), (RoutedChatModel(model="gpt-4o-mini", pipeline=Pipeline()), True),
             (ChatOpenAI(messages=iter(()), root_client=SimpleNamespace(base_url=f"{GROQ}/")), False),
             (ChatOpenAI(messages=iter(()), root_client=SimpleNamespace(base_url="https://api.openai.com/v1/")), True)]
    for chat_model, keyed in cases:
        middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}),
                                           models={"m": chat_model} if where == "models" else None,
                                           context={"session_id": "s1"})
        handed: list[ModelRequest] = []

        def handler(request: ModelRequest, handed: list[ModelRequest] = handed) -> ModelResponse:
            handed.append(request)
            return ModelResponse(result=[AIMessage("ok", usage_metadata={"input_tokens": 9, "output_tokens": 1,
                                                                         "total_tokens": 10})])

        middleware.wrap_model_call(ModelRequest(model=chat_model, messages=[HumanMessage("hi")], model_settings={},
                                                tools=[]), handler)
        assert ("prompt_cache_key" in handed[0].model_settings) is keyed, chat_model


def test_the_agent_middleware_s_spans_name_the_server_a_model_sends_to(span_exporter) -> None:
    """An agent's model whose client sends to a server of its own (ChatOpenAI's base URL, a self-hosted
    OpenAI-compatible server) is that server on the call's chat span (``server.address``), not
    OpenAI's public host, as before: in ``models=`` under a name of its own or its model's, or the
    agent's own model; the pipeline's own call of that model with an ``api_base`` names its own
    (a review caught it named after the agent's server)."""
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage
    from opentelemetry.trace import SpanKind

    from router_middleware.langchain import RouterAgentMiddleware

    class ChatOpenAI(GenericFakeChatModel):  # as langchain_openai's: its client resolved its base URL
        model_name: str = "gpt-4o-mini"
        root_client: Any = None

    ChatOpenAI.__module__ = "langchain_openai.chat_models.base"
    def handler(request: ModelRequest) -> ModelResponse:
        return ModelResponse(result=[AIMessage("ok", usage_metadata={"input_tokens": 9, "output_tokens": 1,
                                                                     "total_tokens": 10})])

    hosts = []
    for name in ("m", "gpt-4o-mini", None):  # a name of its own, the model's own name, the agent's own model
        chat_model = ChatOpenAI(messages=iter(()), root_client=SimpleNamespace(base_url="http://10.0.0.5:8000/v1/"))
        pipeline = Pipeline.from_config({"cache": {"enabled": False}})
        middleware = RouterAgentMiddleware(pipeline, models={name: chat_model} if name else None, model=name)
        middleware.wrap_model_call(ModelRequest(model=chat_model, messages=[HumanMessage("hi")], model_settings={},
                                                tools=[]), handler)
        pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                            api_base="http://192.168.7.7:9000/v1")
        hosts.append([s.attributes["server.address"] for s in span_exporter.get_finished_spans()
                      if s.kind == SpanKind.CLIENT])
        span_exporter.clear()
    assert hosts == [["10.0.0.5", "192.168.7.7"]] * 3  # a call's own api_base wins over the agent's model's


def test_the_agent_middleware_marks_the_agent_s_own_tools_keeping_what_they_carry() -> None:
    """The agent's model is handed the agent's own tools, the last one marked in its ``extras`` (where
    ChatAnthropic reads a tool's cache_control, and RoutedChatModel too): not OpenAI-format dicts in
    their place, which lose what a tool carries for its provider (ChatAnthropic sends a tool's
    ``extras``: ``defer_loading``, the caller's own ``cache_control``) and read as provider tools to
    the middleware after this one."""
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.messages import AIMessage, HumanMessage
    from langchain_core.tools import BaseTool, tool

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    @tool(description="Read a file of the repository. " + "Paths are relative to the repository root. " * 150)
    def read_file(path: str) -> str:
        return path

    @tool(extras={"defer_loading": True})
    def search_docs(query: str) -> str:
        """Search the docs."""
        return query

    claude = "anthropic/claude-3-opus-20240229"
    models = {claude: RoutedChatModel(model=claude, max_tokens=1024, pipeline=Pipeline())}
    middleware = RouterAgentMiddleware(Pipeline.from_config({"cache": {"enabled": False}}), models=models,
                                       model=claude)
    handed: list[ModelRequest] = []

    def handler(request: ModelRequest) -> ModelResponse:
        handed.append(request)
        return ModelResponse(result=[AIMessage("ok", usage_metadata={"input_tokens": 9, "output_tokens": 1,
                                                                     "total_tokens": 10})])

    middleware.wrap_model_call(ModelRequest(model=models[claude], messages=[HumanMessage("Read utils.py")],
                                            model_settings={}, tools=[read_file, search_docs]), handler)
    first, last = handed[0].tools
    assert first is read_file and isinstance(last, BaseTool) and last.name == "search_docs"
    assert last.extras == {"defer_loading": True, "cache_control": {"type": "ephemeral"}}
    assert search_docs.extras == {"defer_loading": True}  # the agent's own tool is left as it was
    bound = models[claude].bind_tools(handed[0].tools).kwargs["tools"]  # type: ignore[attr-defined]
    assert [t.get("cache_control") for t in bound] == [None, {"type": "ephemeral"}]
