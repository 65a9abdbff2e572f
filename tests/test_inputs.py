"""Hostile or mistaken input gets one clear error naming the field, before anything is planned,
reserved or sent; secrets of common shapes never reach a span or a log line."""

from __future__ import annotations

import re

import litellm
import pytest
import structlog
from opentelemetry.trace import SpanKind

from router_middleware import ConfigError, MessageError, Pipeline, RequestError

MESSAGES = [{"role": "user", "content": "hi"}]


def _deep(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


@pytest.mark.parametrize(("context", "named"), [
    ({"session_id": 123}, "context.session_id: expected a string, got int"),
    ({"session_id": "\udc80"}, "context.session_id: not valid text"),
    ({"tenant": "a\x00b"}, "context.tenant: contains a NUL"),
    ({"step": "first"}, "context.step: expected a whole number"),
    ({"step": -1}, "context.step: expected a whole number"),
    ({"tags": "prod"}, "context.tags: expected a list of strings, got one string"),
    ({"tags": ["ok", 3]}, "context.tags: expected a list of strings"),
    ({"tags": 3}, "context.tags: expected a list of strings, got 3"),
    ({"tags": {"team": "search"}}, "context.tags: expected a list of strings, got an object {'team': 'search'} (a "
                                   "tag is one string"),
    ({"cache": "yes"}, "context.cache: expected true, false or null"),
    ({"sesion_id": "s1"}, "context: unknown field(s) ['sesion_id']; expected some of"),
    (42, "context: expected an AgentContext or a dict, not int"),
])
def test_a_malformed_context_is_refused_by_name(context, named) -> None:
    with pytest.raises(RequestError, match=re.escape(named)):
        Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", context=context)


@pytest.mark.parametrize("tags", [["a", "b"], ("a", "b"), iter(["a", "b"])], ids=["list", "tuple", "iterator"])
def test_an_agent_context_takes_its_tags_as_a_list_as_a_dict_does(tags) -> None:
    """``AgentContext(tags=["a"])`` raised "expected a list of strings, got ['a']" (it wanted a tuple)
    while ``context={"tags": ["a"]}`` was taken."""
    from router_middleware import AgentContext

    context = AgentContext(tags=tags) if not isinstance(tags, type(iter([]))) else AgentContext.coerce({"tags": tags})
    assert context.tags == ("a", "b") and hash(context)
    assert AgentContext(tags=None).tags == AgentContext.coerce({"tags": None}).tags == ()
    with pytest.raises(RequestError, match=re.escape("got ['a', 1]")):  # as given, not as a tuple
        AgentContext(tags=["a", 1])
    answer = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", context=context)
    assert answer.choices[0].message.content == "ok"


@pytest.mark.parametrize(("params", "named"), [
    ({"max_tokens": -1e9}, "max_tokens: expected a whole number of at least 1"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": float("inf")}, "max_tokens: expected a whole number of at least 1, got inf"),
    ({"max_completion_tokens": float("nan")}, "max_completion_tokens: expected a whole number of at least 1, got nan"),
    ({"n": float("-inf")}, "n: expected a whole number of at least 1, got -inf"),
    ({"temperature": float("nan")}, "temperature: expected a number from 0 to 2, got nan"),
    ({"temperature": 3}, "temperature: expected a number from 0 to 2"),
    ({"top_p": -0.1}, "top_p"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": _deep(5000)}}]},
     "tools: nested deeper than 100 levels"),
    ({"stream": "yes"}, "stream: expected true or false, got 'yes'"),
    ({"thinking": {"type": "enabled", "budget_tokens": "lots"}}, "thinking.budget_tokens: expected a whole number"),
    ({"reasoning": {"max_tokens": -5}}, "reasoning.max_tokens: expected a whole number of tokens, got -5"),
    ({"reasoning_effort": 3}, "reasoning_effort: unknown level 3: litellm takes none, minimal, low"),
    # a cap rule would raise a level it cannot rank (a trial: "LOW" was sent as a rule's "high")
    ({"reasoning_effort": "LOW"}, "reasoning_effort: unknown level 'LOW': litellm takes none, minimal, low, medium, "
                                  "high, xhigh, max, default, disable"),
    ({"reasoning_effort": "huge"}, "reasoning_effort: unknown level 'huge'"),
    ({"reasoning_effort": ["high"]}, r"reasoning_effort: unknown level \['high'\]: litellm takes .*, or an object such "
                                     r"as \{'effort': 'high', 'summary': 'auto'\}"),
    # litellm's dict form: its effort is checked as the string is
    ({"reasoning_effort": {"effort": "huge", "summary": "auto"}}, "reasoning_effort.effort: unknown level 'huge': "
                                                                  "litellm takes none, minimal"),
    ({"reasoning_effort": {"effort": "High"}}, "reasoning_effort.effort: unknown level 'High'"),
    ({"reasoning_effort": {"effort": 3}}, "reasoning_effort.effort: unknown level 3"),
    # litellm breaks on these building the request (a TypeError, or a 500 for Anthropic and Gemini)
    ({"metadata": [1]}, r"metadata: expected an object, got list \[1\]"),
    ({"metadata": "task"}, "metadata: expected an object, got str 'task'"),
    ({"extra_body": [1]}, "extra_body: expected an object, got list"),
    ({"stop": [1, 2]}, r"stop: expected a string or a list of strings, got \[1, 2\]"),
    ({"response_format": "json"}, "response_format: expected an object such as {'type': 'json_object'} or a "
                                  "pydantic model class, got 'json'"),
    ({"response_format": {"schema": {}}}, "response_format: expected an object such as"),
    ({"tools": [{"type": "function"}]}, r"tools\[0\]: a function tool needs 'function' with its 'name'"),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, r"tools\[0\]: a function tool needs"),
    ({"tools": ["bash"]}, r"tools\[0\]: expected an object such as \{'type': 'function', 'function': \{'name': "
                          r"\.\.\.\}\}, got str"),
    ({"tools": {"type": "function", "function": {"name": "f"}}}, "tools: expected a list of tool objects, got dict"),
])
def test_out_of_range_or_too_deep_parameters_are_refused_by_name(params, named) -> None:
    with pytest.raises(RequestError, match=named):
        Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", **params)


@pytest.mark.parametrize("params", [
    {"thinking": True}, {"thinking": False},  # litellm turns them into a budget, or drops them
    {"reasoning": True}, {"reasoning": "low"},  # dropped for Gemini; ChatOllama's own values
    {"metadata": []}, {"metadata": ""}, {"extra_body": []}, {"stop": []}, {"stop": None}, {"metadata": None},
    {"reasoning_effort": None}, {"thinking": None},
    # litellm's dict form; without an effort it sends the dict (the model's default level, a summary)
    {"reasoning_effort": {"effort": "high", "summary": "detailed"}}, {"reasoning_effort": {"summary": "auto"}},
], ids=str)
def test_values_litellm_takes_or_drops_are_not_refused(params) -> None:
    """A review: ``thinking=True`` (litellm gives it a 2,048-token budget) and empty values litellm drops
    were refused by the new checks, where a direct call goes through."""
    model = "gemini/gemini-2.5-flash" if "reasoning" in params else "anthropic/claude-sonnet-4-5"
    direct = litellm.completion(model=model, messages=MESSAGES, mock_response="ok", **params)
    routed = Pipeline().completion(model=model, messages=MESSAGES, mock_response="ok", **params)
    assert routed.choices[0].message.content == direct.choices[0].message.content == "ok"


@pytest.mark.parametrize("model", [None, "", 42])
def test_a_missing_or_malformed_model_is_refused_by_name(model) -> None:
    with pytest.raises(RequestError, match=f"model: expected a model name or alias, got {model!r}"):
        Pipeline().completion(model=model, messages=MESSAGES, mock_response="ok")


def test_a_negative_max_tokens_never_passes_a_hard_budget() -> None:
    pipeline = Pipeline.from_config({"routing": {"budgets": [{"name": "hard", "usd": 0.0001, "scope": "global"}]}})
    for _ in range(5):
        with pytest.raises(RequestError):
            pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=-1e9)
    assert not pipeline.store.get("budget:hard:usd:all:0")  # nothing reserved, nothing spent


def test_a_message_dict_instead_of_a_list_says_so() -> None:
    with pytest.raises(MessageError, match="got one message \\(a dict\\): wrap it in a list"):
        Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES[0], mock_response="ok")


@pytest.mark.parametrize(("messages", "named"), [
    ([], "messages is empty: a call needs at least one message"),
    ([{"role": "user", "text": "hi"}], "message 0: a user message needs 'content' (it has 'text')"),
    ([{"role": "system"}, {"role": "user", "content": "hi"}], "message 0: a system message needs 'content'"),
    # a trial got "tool result for 1 has no earlier assistant tool call", naming no wrong type
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": 1, "content": "r"}],
     "message 1: tool_call_id must be a string (the id of the call it answers), got int 1"),
])
def test_a_request_a_provider_would_refuse_for_its_messages_is_refused_by_name(messages, named) -> None:
    """Sent as they are, each gets a provider's 400, or worse, a reply to nothing."""
    for repair in (False, True):
        p = Pipeline.from_config({"messages": {"repair_tool_calls": repair}, "cache": {"enabled": False}})
        with pytest.raises(MessageError, match=re.escape(named) + "$"):
            p.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")


def test_an_assistant_turn_of_tool_calls_alone_needs_no_content() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
    messages = [{"role": "user", "content": "list"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "a.py"}]
    assert Pipeline().completion(model="gpt-4o-mini", messages=messages, mock_response="ok").choices


def test_deeply_nested_tool_call_arguments_are_carried_not_crashed_on() -> None:
    arguments = "[" * 5000 + "]" * 5000
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    Pipeline.from_config({"context": {"watermark_tokens": 1000}}).completion(
        model="gpt-4o-mini", messages=messages, mock_response="ok", context={"session_id": "s"})


def test_a_yaml_alias_bomb_is_refused_and_small_anchors_still_load(tmp_path) -> None:
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for name, previous in zip("bcdef", "abcde", strict=True):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"  # 9**7 = 4.8 million values from a few hundred bytes
    bomb.write_text("context:\n  summary_params:\n" + "".join(f"    {line}\n" for line in levels)
                    + "    g: [" + ", ".join(["*f"] * 9) + "]\n")
    assert bomb.stat().st_size < 600
    with pytest.raises(ConfigError, match="expands to more than 100,000 values"):
        Pipeline.from_config(str(bomb))
    fine = tmp_path / "fine.yaml"
    fine.write_text("context:\n  summary_params: &p {temperature: 0}\n  models:\n    'gpt-4o*': {summary_params: *p}\n")
    assert Pipeline.from_config(str(fine)).config.context.summary_params == {"temperature": 0}


SECRETS = {
    "AKIAIOSFODNN7EXAMPLE": "[REDACTED_AWS_KEY_ID]",
    "aws_secret_access_key=wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY": "aws_secret_access_key=[REDACTED]",
    "ghs_16C7e42F292c6912E7710c838347Ae178B4a": "[REDACTED_TOKEN]",
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz": "[REDACTED_TOKEN]",
    "AIzaSyA-1234567890abcdefghijklmnopqrstu": "[REDACTED_API_KEY]",
    "xoxb-123456789012-1234567890123-abcdefghij": "[REDACTED_TOKEN]",
}


def test_secret_shapes_never_reach_a_span(span_exporter) -> None:
    text = "here are my keys: " + " ; ".join(SECRETS) + " ; commit 3f2a9c1e7b5d4a6f8e0c2b4d6f8a0c2e4b6d8f0a"
    Pipeline.from_config({"telemetry": {"capture_content": True}}).completion(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], mock_response="ok")
    (chat,) = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    captured = chat.attributes["gen_ai.input.messages"]
    for secret, masked in SECRETS.items():
        assert secret not in captured and masked in captured
    assert "3f2a9c1e7b5d4a6f8e0c2b4d6f8a0c2e4b6d8f0a" in captured  # a hash is not a secret


def test_a_failed_summary_logs_its_error_without_the_key(monkeypatch) -> None:
    import litellm

    def refuse(**kwargs: object) -> None:
        raise litellm.AuthenticationError("Incorrect API key provided: sk-proj-abcdefghijklmnop1234 and "
                                          "AKIAIOSFODNN7EXAMPLE", llm_provider="openai", model="gpt-4o-mini")

    history = [{"role": "user", "content": "task"}]
    for i in range(60):
        history += [{"role": "assistant", "content": f"reply {i} " * 40}, {"role": "user", "content": f"more {i}"}]
    pipeline = Pipeline.from_config({"context": {"watermark_tokens": 2000, "max_payback_calls": None,
                                                 "summarize": True}})
    monkeypatch.setattr(litellm, "completion", refuse)
    with structlog.testing.capture_logs() as logs:
        try:
            pipeline.completion(model="deepseek/deepseek-chat", messages=history, mock_response="ok",
                                context={"session_id": "s"})
        except Exception:  # noqa: BLE001, S110 - the main call goes through the refusing stub too
            pass
    (failed,) = [e for e in logs if e["event"] == "summary_failed"]
    assert "sk-proj-abcdefghijklmnop1234" not in str(failed) and "AKIAIOSFODNN7EXAMPLE" not in str(failed)
    assert "[REDACTED_API_KEY]" in failed["error"]


def test_a_single_message_over_the_window_is_said_not_sent_silently() -> None:
    pipeline = Pipeline.from_config({"models": {"gpt-4o-mini": {"max_input_tokens": 4000, "max_output_tokens": 500}}})
    huge = {"role": "user", "content": "lorem ipsum dolor sit amet " * 2000}  # ~12,000 tokens
    planned = pipeline.plan(pipeline.make_call("gpt-4o-mini", [huge], None, {"max_tokens": 500}))
    (over,) = [d for d in planned.decisions if d.action == "over-window"]
    assert over.attributes["window_tokens"] == 3500 and over.attributes["tokens"] > 3500
    assert "gpt-4o-mini" in over.reason
    fits = pipeline.plan(pipeline.make_call("gpt-4o-mini", MESSAGES, None, {"max_tokens": 500}))
    assert not [d for d in fits.decisions if d.action == "over-window"]


# -- tool-call integrity ----------------------------------------------------------------------------


def _asks(*calls: str, name: str = "read_file") -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": c, "type": "function", "function": {"name": name, "arguments": '{"path": "a.py"}'}} for c in calls]}


def _answer(call_id: str, content: str = "print(1)") -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


USER, LATER = {"role": "user", "content": "fix a.py"}, {"role": "user", "content": "and b.py"}
BROKEN = {
    "orphan": ([USER, _asks("call_1"), _answer("call_1"), {"role": "assistant", "content": "done"}, LATER,
                _asks("call_2"), _answer("call_2"), _answer("call_abc")],
               "message 7: tool result for call_abc has no earlier assistant tool call"),
    "unanswered before a user turn": ([USER, _asks("call_1"), _answer("call_1"), {"role": "assistant", "content": "ok"},
                                       _asks("call_x", "call_y"), _answer("call_y"), LATER],
                                      r"message 4: tool call call_x \(read_file\) is not answered before the user "
                                      "turn at message 6"),
    "unanswered before an assistant turn": ([USER, _asks("call_x"), {"role": "assistant", "content": "hm"}, LATER],
                                            r"message 1: tool call call_x \(read_file\) is not answered before the "
                                            "assistant turn at message 2"),
    "answered twice": ([USER, _asks("call_1"), _answer("call_1"), _answer("call_1", "again")],
                       r"message 3: tool result for call_1 answers it again \(first answered at message 2\)"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_tool_call_integrity_is_refused_naming_the_message_and_the_call(case) -> None:
    messages, named = BROKEN[case]
    with pytest.raises(MessageError, match=named) as raised:
        Pipeline().completion(model="gpt-4o-mini", messages=messages, mock_response="ok")
    assert raised.value.status_code == 400


def test_every_way_in_refuses_an_unanswered_tool_call() -> None:
    import asyncio

    from langchain.agents.middleware import ModelRequest
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage

    from router_middleware.langchain import RouterAgentMiddleware
    from router_middleware.litellm import RouterLogger

    messages, named = BROKEN["unanswered before an assistant turn"]
    with pytest.raises(MessageError, match=named):
        asyncio.run(Pipeline().acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok"))
    proxy = RouterLogger(Pipeline.from_config({}), proxy=True)
    data = {"model": "gpt-4o-mini", "messages": messages, "litellm_call_id": "c1"}
    with pytest.raises(MessageError, match=named):
        asyncio.run(proxy.async_pre_call_hook(None, None, data, "acompletion"))
    model = GenericFakeChatModel(messages=iter([AIMessage("never asked")]))
    history = [HumanMessage("fix a.py"), AIMessage("", tool_calls=[{"name": "read_file", "args": {}, "id": "call_x"}]),
               AIMessage("hm"), HumanMessage("and b.py")]
    request = ModelRequest(model=model, messages=history, model_settings={})
    with pytest.raises(MessageError, match=r"message 1: tool call call_x \(read_file\) is not answered"):
        RouterAgentMiddleware(Pipeline.from_config({}), model="gpt-4o-mini").wrap_model_call(
            request, lambda r: pytest.fail("the model was called"))


def test_a_valid_multi_tool_turn_passes_untouched() -> None:
    import router_middleware as rm

    messages = [{"role": "system", "content": "You edit code."}, USER, _asks("call_1", "call_2", "call_3"),
                _answer("call_3"), _answer("call_1"), _answer("call_2"),  # results in any order
                {"role": "assistant", "content": "done"}, LATER, _asks("call_4")]  # calls still open at the end
    for config in ({}, {"messages": {"repair_tool_calls": True}}):
        planned = rm.outcome(Pipeline.from_config(config).completion(
            model="gpt-4o-mini", messages=messages, mock_response="ok")).plan
        assert planned is not None and all(a is b for a, b in zip(planned.call.messages, messages, strict=True))
        assert not [d for d in planned.decisions if d.policy == "messages"]


def test_repair_sends_the_mended_request_and_records_why() -> None:
    import router_middleware as rm

    from .capture_server import capture_server

    messages = [USER, _asks("call_1"), _answer("call_1"), _answer("call_abc"), {"role": "assistant", "content": "ok"},
                _asks("call_x", "call_y"), _answer("call_y"), LATER]
    pipeline = Pipeline.from_config({"messages": {"repair_tool_calls": True}, "context": {"enabled": False}})
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017 - it answers 500 on purpose
        pipeline.completion(model="openai/gpt-4o-mini", messages=messages, api_base=base, api_key="k",
                            num_retries=0, max_retries=0)
    sent = bodies[-1]["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in sent] == [
        ("user", None), ("assistant", None), ("tool", "call_1"), ("assistant", None), ("assistant", None),
        ("tool", "call_y"), ("tool", "call_x"), ("user", None)]
    assert sent[6]["content"] == rm.messages.PLACEHOLDER_RESULT == "[no result recorded]"
    plan = rm.outcome(pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")).plan
    assert plan is not None
    (repair,) = [d for d in plan.decisions if f"{d.policy}:{d.action}" == "messages:repair"]
    assert "call_abc at message 3" in repair.reason and "call_x of message 5, before message 7" in repair.reason
    assert repair.attributes["dropped_results"] == 1 and repair.attributes["placeholder_results"] == 1
    assert repair.attributes["tool_call_ids"] == "call_abc,call_x"


def test_repair_in_the_agent_middleware_hands_the_model_the_mended_history() -> None:
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

    from router_middleware.langchain import RouterAgentMiddleware

    history = [HumanMessage("fix a.py"), AIMessage("", tool_calls=[{"name": "read_file", "args": {}, "id": "call_x"}]),
               HumanMessage("and b.py"), ToolMessage("stray", tool_call_id="call_abc")]
    seen: list[ModelRequest] = []

    def handler(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        return ModelResponse(result=[AIMessage("ok")])

    pipeline = Pipeline.from_config({"messages": {"repair_tool_calls": True}, "context": {"enabled": False}})
    model = GenericFakeChatModel(messages=iter([AIMessage("unused")]))
    RouterAgentMiddleware(pipeline, model="gpt-4o-mini").wrap_model_call(
        ModelRequest(model=model, messages=history, model_settings={}), handler)
    sent = seen[-1].messages
    assert sent[0] is history[0] and sent[1] is history[1] and sent[3] is history[2] and len(sent) == 4
    assert isinstance(sent[2], ToolMessage) and sent[2].tool_call_id == "call_x"
    assert sent[2].content == "[no result recorded]"


def test_integrity_violations_count_a_call_unanswered_before_the_last_user_turn() -> None:
    from router_middleware.messages import integrity_violations

    assert integrity_violations([USER, _asks("call_x"), LATER]) == [
        "message 1: tool call call_x (read_file) is not answered before the user turn at message 2"]
    assert integrity_violations([USER, _asks("call_x")]) == []  # still open at the end: left to the provider
    assert len(integrity_violations(BROKEN["orphan"][0])) == 1


def test_the_fast_check_and_the_repair_agree_with_integrity_violations() -> None:
    import random

    from router_middleware.messages import integrity_violations, repair_messages

    rng = random.Random(7)
    for _ in range(2000):
        history: list[dict] = []
        for _ in range(rng.randint(1, 8)):  # an empty request is refused for being empty
            draw = rng.random()
            if draw < 0.3:
                history.append(_asks(*rng.sample(["a", "b", "c", "d"], rng.randint(1, 3))))
            elif draw < 0.7:
                history.append(_answer(rng.choice("abcd")))
            else:
                history.append({"role": rng.choice(["user", "assistant", "system"]), "content": "x"})
        found = integrity_violations(history)
        try:
            Pipeline().make_call("gpt-4o-mini", history, None, {})
        except MessageError as error:
            assert found and found[0].endswith(error.detail), history
        else:
            assert not found, history
        mended, repairs = repair_messages(history)
        assert bool(repairs) == bool(found) and integrity_violations(mended) == [], history


def test_a_system_message_inside_a_tool_turn_neither_closes_nor_answers_it() -> None:
    """litellm lifts system messages out for Anthropic and Gemini, which accept this request: refusing
    it would make the call worse than sending it directly."""
    from router_middleware.messages import integrity_violations

    reminder = {"role": "system", "content": "Reminder: keep edits small."}
    fine = [USER, _asks("call_1"), reminder, _answer("call_1"), {"role": "assistant", "content": "done"}]
    assert integrity_violations(fine) == []
    Pipeline().make_call("anthropic/claude-sonnet-4-5", fine, None, {})
    still_open = [USER, _asks("call_1"), reminder, LATER]
    with pytest.raises(MessageError, match=r"message 1: tool call call_1 \(.*\) is not answered before the user turn at message 3"):
        Pipeline().make_call("anthropic/claude-sonnet-4-5", still_open, None, {})


@pytest.mark.parametrize("asynchronous", [False, True], ids=["completion", "acompletion"])
def test_an_agent_loop_can_resend_litellm_s_own_message_objects(asynchronous, monkeypatch) -> None:
    """The usual loop appends ``response.choices[0].message`` (a litellm pydantic ``Message``, tool calls
    as objects) to its history: litellm takes it, so the pipeline does, and sends it as litellm would."""
    import asyncio

    import litellm

    pipeline = Pipeline.from_config({"cache": {"enabled": False}})
    call = {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}
    history: list = [{"role": "user", "content": "List the files"}]

    def complete(**kwargs):
        if asynchronous:
            return asyncio.run(pipeline.acompletion(model="gpt-4o-mini", messages=history, **kwargs))
        return pipeline.completion(model="gpt-4o-mini", messages=history, **kwargs)

    first = complete(mock_tool_calls=[call])
    assert type(first.choices[0].message).__name__ == "Message"
    from router_middleware import outcome

    assert outcome(first).usage.source == "estimated"  # litellm made the usage up, as for mock_response
    history.append(first.choices[0].message)  # the pydantic Message itself
    history.append({"role": "tool", "tool_call_id": "call_1", "content": "README.md"})
    history.append({"role": "assistant", "content": None, "tool_calls": first.choices[0].message.tool_calls})
    history.append({"role": "tool", "tool_call_id": "call_1", "content": "README.md"})
    history[-2]["tool_calls"] = [litellm.types.utils.ChatCompletionMessageToolCall(**{**call, "id": "call_2"})]
    history[-1]["tool_call_id"] = "call_2"
    history.append({"role": "user", "content": "Thanks"})
    sent: list = []
    original = litellm.acompletion if asynchronous else litellm.completion

    def spy(**kwargs):
        sent.append(kwargs["messages"])
        return original(**kwargs)

    async def aspy(**kwargs):
        sent.append(kwargs["messages"])
        return await original(**kwargs)

    monkeypatch.setattr(litellm, "acompletion" if asynchronous else "completion", aspy if asynchronous else spy)
    assert complete(mock_response="done").choices[0].message.content == "done"
    (messages,) = sent
    assert all(type(m) is dict for m in messages)
    assert messages[1] == {"role": "assistant", "content": "This is a mock request", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}]}
    assert messages[3]["tool_calls"] == [{**call, "id": "call_2"}]


def test_a_message_without_a_role_is_sent_as_the_assistant_s_as_litellm_sends_it(monkeypatch) -> None:
    import litellm

    sent: list = []
    original = litellm.completion
    monkeypatch.setattr(litellm, "completion", lambda **kw: sent.append(kw["messages"]) or original(**kw))
    history = [{"role": "user", "content": "hi"}, {"content": "an earlier answer"}, {"role": "user", "content": "and?"}]
    Pipeline().completion(model="gpt-4o-mini", messages=history, mock_response="ok")
    assert sent[0][1] == {"role": "assistant", "content": "an earlier answer"}
    assert "role" not in history[1]  # the caller's dict is left as it was


def test_the_report_refuses_an_empty_time_range_and_a_negative_top(tmp_path, capsys) -> None:
    from router_middleware.cli import main
    from router_middleware.ledger import open_ledger

    ledger = tmp_path / "ledger.db"
    open_ledger(f"sqlite:///{ledger}").close()
    assert main(["report", "--ledger", str(ledger), "--since", "2026-11-29", "--until", "2026-11-28"]) == 2
    assert "--since 2026-11-29 is not before --until 2026-11-28" in capsys.readouterr().err
    assert main(["report", "--ledger", str(ledger), "--top", "-3"]) == 2
    assert "--top -3: expected how many sessions, tenants and users to list" in capsys.readouterr().err


def test_langchain_messages_are_refused_by_name_not_sent_as_the_assistant_s() -> None:
    """A LangChain message dumps to a dict with a ``type`` and no ``role``: sending it as an assistant
    turn would turn the conversation upside down, silently."""
    from langchain_core.messages import HumanMessage, SystemMessage

    with pytest.raises(MessageError, match="message 0: expected an OpenAI-format message, got a LangChain "
                                           "SystemMessage: convert the list with .*convert_to_openai_messages"):
        Pipeline().completion(model="gpt-4o-mini", messages=[SystemMessage("Be brief."), HumanMessage("hi")],
                              mock_response="ok")


@pytest.mark.parametrize("adapter", ["RouterLogger", "RouterCallbackHandler", "RouterAgentMiddleware"])
def test_an_adapter_takes_a_pipeline_or_its_config_and_names_anything_else(adapter, tmp_path) -> None:
    """``RouterLogger("router.yaml")`` as ``Pipeline("router.yaml")``: the adapter builds the pipeline
    (it failed every call with ``AttributeError: 'str' object has no attribute 'catalog'``); a value
    that is neither is refused when the adapter is made, naming it."""
    from router_middleware.langchain import RouterAgentMiddleware, RouterCallbackHandler
    from router_middleware.litellm import RouterLogger

    make = {"RouterLogger": RouterLogger, "RouterCallbackHandler": RouterCallbackHandler,
            "RouterAgentMiddleware": RouterAgentMiddleware}[adapter]
    path = tmp_path / "router.yaml"
    path.write_text("routing:\n  aliases:\n    coder: [gpt-4o-mini]\n")
    for source in (str(path), path, {"routing": {"aliases": {"coder": ["gpt-4o-mini"]}}}):
        assert make(source).pipeline.config.routing.aliases == {"coder": ["gpt-4o-mini"]}
    with pytest.raises(ConfigError, match=rf"{adapter}: expected a Pipeline or its config .*got int"):
        make(42)
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config file"):
        make(str(tmp_path / "missing.yaml"))


def test_a_router_logger_made_from_a_config_path_routes_sdk_calls(tmp_path) -> None:
    import asyncio

    import litellm

    from router_middleware.litellm import RouterLogger

    path = tmp_path / "router.yaml"
    path.write_text("routing:\n  budgets:\n    - {name: day, tokens: 100000}\n")
    logger = RouterLogger(str(path)).register()
    try:
        answer = asyncio.run(litellm.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok"))
        asyncio.run(logger.aflush())
    finally:
        logger.unregister()
    assert answer.choices[0].message.content == "ok" and logger.recorded == 1


_BAD_PARTS = [  # a user message's second part, and what the refusal says of it
    ({"type": "txt", "text": "hi"}, r"content part 1 has type 'txt', which litellm does not take in a user message "
                                    r"\(it takes .*\btext\b"),
    ("hi", r"content part 1 must be an object such as \{'type': 'text', 'text': \.\.\.\}, got str"),
    (None, r"content part 1 must be an object .*, got NoneType"),
    ({"type": "image_url"}, r"content part 1 \(image_url\) needs 'image_url', a URL or \{'url': \.\.\.\}"),
    ({"type": "image_url", "image_url": {"detail": "low"}}, r"content part 1 \(image_url\) needs 'image_url'"),
]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(("part", "says"), _BAD_PARTS, ids=["txt", "string", "none", "image-no-url", "image-url-no-url"])
def test_a_user_content_part_litellm_refuses_is_the_request_s_fault_named_before_any_attempt(asynchronous, part, says,
                                                                                             monkeypatch) -> None:
    """litellm refuses a user part of a type it does not take before sending, as a bare ``Exception``
    (sync) or an ``APIConnectionError`` (async), and breaks on a string part or an image part without
    its URL while building the request (an ``InternalServerError``, as if the provider had answered
    500): each looked like the target's failure, retried on every target and counted toward their
    cooldowns, so two such requests cooled a whole alias down for everyone. It is refused first, by
    name, and no target hears of it."""
    import asyncio

    import litellm

    sent: list[str] = []
    monkeypatch.setattr(litellm, "completion", lambda **kw: sent.append(kw["model"]))
    p = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-4.1"]}}, "cache": {"enabled": False}})
    bad = [{"role": "user", "content": [{"type": "text", "text": "see"}, part]}]
    for _ in range(3):
        with pytest.raises(MessageError, match=rf"^message 0: {says}"):
            if asynchronous:
                asyncio.run(p.acompletion(model="coder", messages=bad, mock_response="ok"))
            else:
                p.completion(model="coder", messages=bad, mock_response="ok")
    assert sent == [] and p.store.get("fail:gpt-4o-mini") is None


@pytest.mark.parametrize(("model", "messages", "params"), [
    ("openai/gpt-4o-mini", [{"role": "user", "content": ["hi"]}], {}),
    ("openai/gpt-4o-mini", [{"role": "user", "content": [None]}], {}),
    ("openai/gpt-4o-mini", [{"role": "user", "content": [{"type": "image_url"}]}], {}),
    ("openai/gpt-4o-mini", [{"role": "user", "content": "hi"}], {"response_format": "json"}),
    ("anthropic/claude-3-5-haiku-20241022", [{"role": "system", "content": ["be brief"]},
                                             {"role": "user", "content": "hi"}], {}),
    ("anthropic/claude-3-5-haiku-20241022", [{"role": "user", "content": "hi"}], {"tools": [{"type": "function"}]})],
    ids=["string-part", "none-part", "image-no-url", "response-format-string", "anthropic-system-string-part",
         "anthropic-function-tool-without-function"])
def test_litellm_alone_breaks_on_these_requests_before_sending_them(model, messages, params) -> None:
    """Why the checks above refuse them: litellm itself fails each while building the request, and
    nothing reaches the provider (a loopback server that records what arrives), with an error that
    reads as the provider's (a 500, or a connection error) and so would count against the target."""
    import litellm

    from .capture_server import capture_server

    with capture_server() as (base, bodies):
        with pytest.raises((litellm.InternalServerError, litellm.APIConnectionError)):
            litellm.completion(model=model, api_base=base, api_key="sk-test", num_retries=0, max_retries=0,
                               messages=messages, **params)
    assert bodies == []


@pytest.mark.parametrize(("raw", "shown"), [("x", "'x'"), ("[{" + "a" * 80, "'[{" + "a" * 55 + "...'")])
def test_tool_calls_that_are_no_list_are_named_with_what_they_hold(raw, shown) -> None:
    """The error shows the string (cut at 60 characters), not the Python parser's internals
    (``malformed node or string on line 1: <ast.Name object at 0x...>``)."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": raw}]
    with pytest.raises(MessageError) as raised:
        Pipeline().completion(model="gpt-4o-mini", messages=messages, mock_response="ok")
    assert str(raised.value) == f"message 1: tool_calls is a string that is neither JSON nor a list: {shown}"


@pytest.mark.parametrize("role", ["system", "assistant", "tool"])
def test_a_content_part_that_is_no_object_is_refused_in_any_message(role) -> None:
    """No provider takes a bare string in a list of parts; litellm breaks on one in a system message
    it sends to Anthropic (``'str' object has no attribute 'get'``, an ``APIConnectionError``)."""
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    messages = {"system": [{"role": "system", "content": ["be brief"]}, {"role": "user", "content": "hi"}],
                "assistant": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ["ok"]},
                              {"role": "user", "content": "go on"}],
                "tool": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": calls},
                         {"role": "tool", "tool_call_id": "c1", "content": ["done"]}]}[role]
    at = {"system": 0, "assistant": 1, "tool": 2}[role]
    with pytest.raises(MessageError, match=rf"^message {at}: content part 0 must be an object such as"):
        Pipeline().completion(model="gpt-4o-mini", messages=messages, mock_response="ok")


def test_a_flat_function_tool_passes_where_the_agent_s_own_model_sends_the_call() -> None:
    """The Responses API's flat function tool (``{"type": "function", "name": ...}``, which LangChain
    leaves as it is and ChatOpenAI sends) is no tool litellm builds a chat request from: refused for a
    call litellm sends, left to the agent's own model where it sends the call."""
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}}]
    engine = Pipeline()
    with pytest.raises(RequestError, match=r"tools\[0\]: a function tool needs 'function' with its 'name'"):
        engine.make_call("gpt-4o-mini", MESSAGES, {}, {"tools": tools})
    assert engine.make_call("gpt-4o-mini", MESSAGES, {}, {"tools": tools}, litellm_sends=False).params["tools"]


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-3-opus-20240229",
                                   "gemini/gemini-2.0-flash"])
def test_tool_call_arguments_given_as_an_object_are_sent_as_the_json_string_providers_take(model) -> None:
    """``function.arguments`` given as an object (not OpenAI's JSON string): alone, litellm sends it to
    OpenAI as it is (refused there), and breaks on it before sending for Anthropic (``'dict' object has
    no attribute 'strip'``) and Gemini (an ``APIConnectionError``, which reads as the provider's and
    would cool the target down). The pipeline writes it as the JSON string, and each request is sent
    with the call's arguments (a loopback server records what arrives)."""
    import json

    from .capture_server import capture_server

    messages = [{"role": "user", "content": "read a.py"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "read", "arguments": {"path": "a.py"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "print(1)"}]
    with capture_server() as (base, bodies), pytest.raises(Exception, match="capture server"):  # noqa: B017
        Pipeline().completion(model=model, messages=messages, api_base=base, api_key="k", num_retries=0,
                              max_retries=0)
    (body,) = bodies
    assert "a.py" in json.dumps(body)
    if model.startswith("openai/"):
        assert body["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"path": "a.py"}'
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"path": "a.py"}  # the caller's own untouched


def test_tool_call_arguments_json_cannot_write_are_named() -> None:
    import datetime

    messages = [{"role": "user", "content": "when?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "at", "arguments": {"day": datetime.date(2026, 1, 1)}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    with pytest.raises(MessageError, match=r"^message 1: tool_calls\[0\]\.function\.arguments is an object JSON "
                                           r"cannot write \(Object of type date is not JSON serializable\)"):
        Pipeline().completion(model="gpt-4o-mini", messages=messages, mock_response="ok")
