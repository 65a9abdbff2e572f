"""Pipeline(): drop-in completion/acompletion, streaming outcomes, policies, spans, failure isolation."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import litellm
import pytest

from router_middleware import (
    AgentContext,
    ConfigError,
    Decision,
    MessageError,
    OutcomeUnavailable,
    Pipeline,
    Plan,
    PolicyError,
    PolicyState,
    RequestError,
    outcome,
)


def client_span(exporter):
    from opentelemetry.trace import SpanKind

    (span,) = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    return span


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]


def test_pass_through_returns_litellm_response() -> None:
    import litellm

    response = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hello")
    assert isinstance(response, litellm.ModelResponse)
    assert response.choices[0].message.content == "hello"
    result = outcome(response)
    assert result.model == "gpt-4o-mini" and result.provider == "openai"
    assert result.usage.source == "estimated"  # litellm invents usage for mock responses
    expected = result.usage.input_tokens * 1.5e-7 + result.usage.output_tokens * 6e-7
    assert result.cost.total_usd == pytest.approx(expected)
    assert result.plan is not None and result.plan.decisions == ()


def test_stream_outcome_only_after_consumption() -> None:
    stream = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="one two three",
                                   stream=True)
    with pytest.raises(OutcomeUnavailable):
        outcome(stream)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "one two three"
    result = outcome(stream)
    assert result.usage.output_tokens > 0
    assert result.time_to_first_token_s is not None and result.time_to_first_token_s >= 0


async def test_async_and_async_stream() -> None:
    pipeline = Pipeline()
    response = await pipeline.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert outcome(response).usage.input_tokens > 0
    stream = await pipeline.acompletion(model="gpt-4o-mini", messages=MESSAGES, mock_response="a b", stream=True)
    chunks = [c async for c in stream]
    assert chunks and outcome(stream).model == "gpt-4o-mini"


def test_tools_pass_through() -> None:
    tools = [{"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {}}}}]
    response = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, tools=tools, mock_response="x")
    assert outcome(response).plan.params["tools"] == tools


@dataclass
class ShortenModel:
    """A pure policy used to prove policies run before the executor."""

    name: str = "test-route"

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        return plan.decide(Decision(self.name, "route", "test says so"), model="gpt-4o-mini",
                           messages=plan.messages[-1:])


def test_policies_rewrite_the_request_and_record_why() -> None:
    pipeline = Pipeline(policies=[ShortenModel()])
    response = pipeline.completion(model="coder", messages=MESSAGES, mock_response="ok",
                                   context={"app": "demo", "session_id": "s-1", "step": 3, "step_kind": "act"})
    result = outcome(response)
    assert result.plan.call.model == "coder" and result.model == "gpt-4o-mini"
    assert len(result.plan.messages) == 1
    assert result.plan.decisions[0].reason == "test says so"
    assert result.plan.call.context == AgentContext(app="demo", session_id="s-1", step=3, step_kind="act")


@dataclass
class Forgetful:
    """A policy that forgets to return the plan (or returns something else)."""

    returns: object = None
    name: str = "forgetful"

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        return self.returns  # type: ignore[return-value]


@pytest.mark.parametrize(("returns", "named"), [(None, "returned None"), ({"model": "x"}, "returned a dict")])
def test_a_policy_that_returns_no_plan_is_named(returns, named, monkeypatch) -> None:
    import litellm

    monkeypatch.setattr(litellm, "completion", lambda **kwargs: pytest.fail("sent despite the broken policy"))
    with pytest.raises(PolicyError, match=f"^policy 'forgetful' {named}; a policy returns a Plan$"):
        Pipeline(policies=[ShortenModel(), Forgetful(returns)]).completion(model="gpt-4o-mini", messages=MESSAGES)


@dataclass
class Raising:
    """A policy with a bug: it raises a Python error."""

    name: str = "raising"

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        return {}["oops"]  # type: ignore[no-any-return]


def test_a_policy_that_raises_is_named_and_its_error_kept_as_the_cause(monkeypatch) -> None:
    """A trial saw a policy's own ``KeyError('oops')`` reach the caller, with nothing naming the policy."""
    import litellm

    monkeypatch.setattr(litellm, "completion", lambda **kwargs: pytest.fail("sent despite the broken policy"))
    with pytest.raises(PolicyError, match="^policy 'raising' raised KeyError: 'oops'$") as raised:
        Pipeline(policies=[ShortenModel(), Raising()]).completion(model="gpt-4o-mini", messages=MESSAGES)
    assert isinstance(raised.value.__cause__, KeyError)


@pytest.mark.parametrize(("policies", "named"), [
    ([1], "policies[0]: expected a policy (a callable taking a Plan and a PolicyState), got int 1"),
    ([ShortenModel(), "x"], "policies[1]: expected a policy"),
    ("x", "policies: expected a list of policies (callables taking a Plan and a PolicyState), got str"),
])
def test_policies_that_are_not_callables_are_refused_when_the_pipeline_is_built(policies, named) -> None:
    """They were taken, and each call then raised a bare ``TypeError: 'int' object is not callable``."""
    with pytest.raises(ConfigError, match=re.escape(named)):
        Pipeline(policies=policies)


def test_policies_given_as_any_iterable_are_taken() -> None:
    response = Pipeline(policies=(p for p in [ShortenModel()])).completion(
        model="coder", messages=MESSAGES, mock_response="ok")
    assert outcome(response).plan is not None and outcome(response).plan.model == "gpt-4o-mini"


def test_context_rejects_unknown_fields() -> None:
    with pytest.raises(RequestError, match="session"):
        Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="x", context={"session": "s"})


def test_bad_messages_name_the_index() -> None:
    bad = [*MESSAGES, {"role": "tool", "content": "orphan"}]
    with pytest.raises(MessageError, match="message 2: tool message has no tool_call_id"):
        Pipeline().completion(model="gpt-4o-mini", messages=bad, mock_response="x")
    with pytest.raises(MessageError, match="message 0: unknown role 'robot'"):
        Pipeline().completion(model="gpt-4o-mini", messages=[{"role": "robot", "content": "x"}], mock_response="x")


@pytest.mark.parametrize("key", ["rol", "Role", "roles"])
def test_a_misspelled_role_key_is_named_not_sent_as_the_assistant_s(key: str) -> None:
    """A message with no role is the assistant's, as litellm sends it; one whose role key is misspelled
    went the same way, a user's turn spoken as the model's (found by a newcomer trial)."""
    with pytest.raises(MessageError, match=f"message {len(MESSAGES)}: no 'role' but '{key}'; did you mean 'role'\\?"):
        Pipeline().completion(model="gpt-4o-mini", messages=[*MESSAGES, {key: "user", "content": "x"}],
                              mock_response="x")
    answered = Pipeline().completion(model="gpt-4o-mini", messages=[*MESSAGES, {"content": "x"}], mock_response="x")
    assert outcome(answered).model == "gpt-4o-mini"  # no role and no such key: the assistant's, as litellm sends it


def test_span_carries_usage_and_cost(span_exporter) -> None:
    response = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hello",
                                     temperature=0, context={"session_id": "sess-9"})
    span = client_span(span_exporter)
    attrs = dict(span.attributes)
    result = outcome(response)
    assert span.name == "chat gpt-4o-mini"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == result.usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == result.usage.output_tokens
    assert attrs["gen_ai.usage.cost"] == pytest.approx(result.cost.total_usd)
    assert attrs["gen_ai.conversation.id"] == "sess-9"
    assert attrs["gen_ai.request.temperature"] == 0


def test_no_conversation_id_is_invented(span_exporter) -> None:
    Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hello")
    span = client_span(span_exporter)
    assert "gen_ai.conversation.id" not in span.attributes


def test_abandoned_stream_ends_its_span(span_exporter) -> None:
    stream = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="a b c d e f",
                                   stream=True)
    next(iter(stream))
    stream.close()
    span = client_span(span_exporter)
    assert span.attributes["router_middleware.usage.source"] == "estimated"
    assert "gen_ai.response.finish_reasons" not in span.attributes  # closed early: no finish, not "stop"
    assert outcome(stream).finish_reasons == ()
    whole = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="a b", stream=True)
    assert list(whole) and outcome(whole).finish_reasons == ("stop",)


def test_provider_error_marks_span_and_propagates(span_exporter) -> None:
    import litellm

    with pytest.raises(litellm.exceptions.RateLimitError):
        Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES,
                              mock_response=litellm.exceptions.RateLimitError("slow down", "openai", "gpt-4o-mini"))
    span = client_span(span_exporter)
    assert span.attributes["error.type"] == "RateLimitError"


def test_broken_telemetry_never_fails_the_call(monkeypatch, span_exporter) -> None:
    from router_middleware.telemetry import attributes, tracing

    def explode(*args, **kwargs):
        raise RuntimeError("exporter on fire")

    monkeypatch.setattr(tracing, "_tracer", explode)
    monkeypatch.setattr(tracing, "outcome_attributes", explode)
    monkeypatch.setattr(attributes, "request_attributes", explode)
    response = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="still fine")
    assert response.choices[0].message.content == "still fine"
    assert outcome(response).usage.output_tokens > 0
    stream = Pipeline().completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="a b", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b"


def test_outcome_of_a_plain_litellm_response() -> None:
    import litellm

    response = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hi")
    assert outcome(response).cost.source == "catalog:gpt-4o-mini"
    with pytest.raises(OutcomeUnavailable):
        outcome(object())


def test_outcome_of_a_response_given_as_a_dict_is_the_response_s() -> None:
    """A chat completion read back as a dict (``model_dump()``, JSON) is priced as the response it
    was (before: model ``unknown``, no usage, no cost); a dict whose usage is no mapping is named."""
    import json

    import litellm

    response = litellm.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="hello there")
    expected = outcome(response)
    for given in (response.model_dump(), json.loads(response.model_dump_json())):
        found = outcome(given)
        assert (found.model, found.usage, found.cost) == (expected.model, expected.usage, expected.cost)
    with pytest.raises(OutcomeUnavailable, match="usage is a int"):
        outcome({**response.model_dump(), "usage": 5})


@pytest.mark.parametrize("copied", ["deepcopy", "pickle"])
def test_a_pipeline_response_copies_and_pickles_as_litellm_s_does(copied) -> None:
    """The Outcome a response carries holds the call's params and decisions: read-only dicts that
    copy (before: mappingproxies, so ``copy.deepcopy`` or ``pickle`` of the response raised where
    a bare litellm response's does not). The copy still has its Outcome; the params stay read-only."""
    import copy
    import pickle

    pipeline = Pipeline.from_config({"routing": {"aliases": {"pair": ["gpt-4o-mini", "gpt-4o"]}}})
    response = pipeline.completion(model="pair", messages=MESSAGES, mock_response="hi", temperature=0.2)
    again = copy.deepcopy(response) if copied == "deepcopy" else pickle.loads(pickle.dumps(response))
    assert again.choices[0].message.content == "hi"
    found = outcome(again)
    assert found.cost == outcome(response).cost
    assert found.plan is not None and found.plan.params["temperature"] == 0.2
    assert [d.action for d in found.plan.decisions] == [d.action for d in outcome(response).plan.decisions]
    with pytest.raises(TypeError, match="read-only"):
        found.plan.params["temperature"] = 1.0  # type: ignore[index]
    found.plan.params.__init__(temperature=1.0)  # type: ignore[misc] # filled once: no way in through __init__
    assert found.plan.params["temperature"] == 0.2


def _chunk_shapes(chunks) -> list[int]:
    return [len(c.choices) for c in chunks]


@pytest.mark.parametrize("include_usage", [None, True])
async def test_a_stream_yields_the_chunks_litellm_would(include_usage) -> None:
    """The pipeline asks for the provider's usage chunk to account a stream; a caller that did not ask
    for it does not get it (a chunk without choices breaks ``chunk.choices[0]`` loops), sync, async
    and from the response cache; a caller that asked gets it, as from litellm."""
    import litellm

    extra = {} if include_usage is None else {"stream_options": {"include_usage": include_usage}}
    kwargs = {"model": "gpt-4o-mini", "messages": MESSAGES, "mock_response": "one two three", "stream": True,
              **extra}
    bare = _chunk_shapes(litellm.completion(**kwargs))
    assert bare == _chunk_shapes([c async for c in await litellm.acompletion(**kwargs)])
    assert (0 in bare) is bool(include_usage)  # litellm sends the usage chunk only when asked
    pipeline = Pipeline()
    stream = pipeline.completion(**kwargs)
    assert _chunk_shapes(stream) == bare
    assert outcome(stream).usage.output_tokens > 0
    stream = await pipeline.acompletion(**kwargs)
    assert _chunk_shapes([c async for c in stream]) == bare
    cached = Pipeline.from_config({"cache": {"enabled": True, "policy": "always"}})
    for _ in range(2):  # a miss, then a hit replayed from the stored response
        stream = cached.completion(**kwargs)
        shapes = _chunk_shapes(stream)
        assert (0 in shapes) is bool(include_usage) and all(shapes[:-1])
    assert outcome(stream).usage.source == "cache"


def test_plan_override_copies_plain_plans_and_subclasses_alike() -> None:
    """``Plan.override`` copies a plain plan field by field (no ``dataclasses.replace``); a subclass of
    ``Plan`` still goes through ``replace``: its own fields and ``__post_init__`` checks are kept."""
    from router_middleware.types import Call, Decision, Plan

    plan = Plan.from_call(Call.create("gpt-4o-mini", [{"role": "user", "content": "hi"}], {"temperature": 0.1}))
    copy = plan.override(model="b", params={"top_p": 0.5}).decide(Decision("p", "a", "why"))
    assert (copy.model, dict(copy.params), copy.call, copy.messages) == ("b", {"top_p": 0.5}, plan.call, plan.messages)
    assert copy.decisions == (Decision("p", "a", "why"),) and plan.model == "gpt-4o-mini" and copy != plan
    assert plan.override() == plan
    with pytest.raises(TypeError, match="Plan has no field 'nope'"):
        plan.override(nope=1)

    @dataclass(frozen=True, slots=True)
    class Noted(Plan):
        note: str = ""

        def __post_init__(self) -> None:
            if self.note == "bad":
                raise ValueError("bad note")

    noted = Noted(plan.call, plan.model, plan.messages, plan.params, note="kept")
    assert type(noted.override(model="b")) is Noted and noted.decide(Decision("p", "a", "w")).note == "kept"
    assert noted.override(note="n").note == "n"
    with pytest.raises(ValueError, match="bad note"):
        noted.override(note="bad")


def _deployments(base: str, *names: str) -> dict:
    """Deployments of gpt-4o-mini at ``base``, each keyed by its own variable (``<NAME>_KEY``)."""
    return {name: {"model": "openai/gpt-4o-mini", "api_base": base, "api_key_env": f"{name.upper()}_KEY"}
            for name in names}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_deployment_whose_key_variable_is_unset_is_not_called(mode, monkeypatch) -> None:
    """litellm given ``api_key=None`` sends the provider's default key (``OPENAI_API_KEY``) to the
    deployment's endpoint: the call is not sent, the error names the variable, and the alias's next
    target serves the call (no cooldown counted: the endpoint's health is not in question)."""
    import asyncio

    import litellm

    from router_middleware import MissingKeyError

    from .capture_server import capture_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leave-this-process")
    monkeypatch.delenv("EU_KEY", raising=False)
    monkeypatch.setenv("US_KEY", "")  # empty is unset too
    completion, acompletion = litellm.completion, litellm.acompletion
    answered = {"model": "gpt-4o-mini", "mock_response": "ok"}  # the plain model answers; deployments go out
    monkeypatch.setattr(litellm, "completion",
                        lambda **kw: completion(**{**kw, **answered}) if kw["model"] == "gpt-4o-mini" else completion(**kw))

    async def afake(**kw):
        return await acompletion(**{**kw, **answered}) if kw["model"] == "gpt-4o-mini" else await acompletion(**kw)

    monkeypatch.setattr(litellm, "acompletion", afake)

    with capture_server() as (base, sent):
        pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
            "deployments": _deployments(base, "eu", "us"), "cooldown": {"failures": 1},
            "aliases": {"mini": ["eu", "gpt-4o-mini"], "regions": ["eu", "us"]},
            "fallback": {"attempts_per_model": 1, "backoff_s": 0.0, "max_backoff_s": 0.0}}})

        def call(model: str):
            kwargs = {"model": model, "messages": MESSAGES, "max_retries": 0}
            if mode == "sync":
                return pipeline.completion(**kwargs)
            return asyncio.run(pipeline.acompletion(**kwargs))

        with pytest.raises(MissingKeyError, match="deployment 'eu': its api_key_env EU_KEY is not set") as raised:
            call("eu")
        assert (raised.value.deployment, raised.value.variable) == ("eu", "EU_KEY")
        response = call("mini")
        with pytest.raises(MissingKeyError, match="US_KEY") as both:
            call("regions")
    assert sent == []  # nothing reached the endpoint, so no key did
    assert response.choices[0].message.content == "ok"
    fallback = next(d for d in outcome(response).plan.decisions if d.action == "fallback")
    assert fallback.reason == "deployment 'eu' skipped: EU_KEY is not set; falling back to gpt-4o-mini"
    assert pipeline.store.get("cooldown:eu") is None
    assert both.value.__notes__ == ["router-middleware: 2 attempts, all failed: eu: no API key for its provider "
                                    "in this process; us: no API key for its provider in this process"]


def test_the_fallback_from_a_failed_deployment_names_the_deployment_not_only_its_model(monkeypatch) -> None:
    """Two deployments of one model: the decision said ``openai/gpt-4o-mini failed``, which of the two
    it does not tell."""
    monkeypatch.setenv("EU_KEY", "sk-eu")
    monkeypatch.setenv("US_KEY", "sk-us")
    completion = litellm.completion

    def answer(**kwargs: Any) -> Any:
        failing = "eu" in kwargs["api_base"]
        return completion(**kwargs, mock_response=litellm.exceptions.InternalServerError("down", "openai", "m")
                          if failing else "ok")

    monkeypatch.setattr(litellm, "completion", answer)
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
        "deployments": {**_deployments("http://eu.invalid/v1", "eu"), **_deployments("http://us.invalid/v1", "us")},
        "aliases": {"regions": ["eu", "us"]}, "fallback": {"backoff_s": 0.0, "max_backoff_s": 0.0}}})
    plan = outcome(pipeline.completion(model="regions", messages=MESSAGES)).plan
    (fallback,) = [d for d in plan.decisions if d.action == "fallback"]
    assert fallback.reason == ("deployment 'eu' (openai/gpt-4o-mini) failed (InternalServerError); "
                               "falling back to us")


def test_the_fallback_from_a_keyless_deployment_names_it_and_its_variable(monkeypatch) -> None:
    """Two deployments of one model behind an alias, the first's key variable unset: the decision
    says which deployment was skipped and which variable to set, not only the model they share."""
    monkeypatch.delenv("EU_KEY", raising=False)
    monkeypatch.setenv("US_KEY", "sk-us")
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
        "deployments": _deployments("http://127.0.0.1:9/v1", "eu", "us"), "aliases": {"regions": ["eu", "us"]},
        "fallback": {"attempts_per_model": 1, "backoff_s": 0.0, "max_backoff_s": 0.0}}})
    response = pipeline.completion(model="regions", messages=MESSAGES, mock_response="ok")
    plan = outcome(response).plan
    assert response.choices[0].message.content == "ok" and plan.deployment == "us"
    (fallback,) = [d for d in plan.decisions if d.action == "fallback"]
    assert fallback.reason == "deployment 'eu' skipped: EU_KEY is not set; falling back to us"


@pytest.mark.parametrize("asynchronous", [False, True])
def test_litellm_s_fallbacks_given_to_the_pipeline_are_its_own_attempts(monkeypatch, span_exporter,
                                                                       asynchronous) -> None:
    """``fallbacks=`` (names) went to litellm, which fell back inside one attempt: the row's target
    was the model that failed, no span or decision showed the fallback, no failure counted toward a
    cooldown, and the answer was cached under the requested model, so a later plain call of it was
    served the other model's answer. Now they are the lifecycle's attempts, as litellm makes them."""
    import asyncio

    from opentelemetry.trace import SpanKind, StatusCode

    sent: list[dict[str, Any]] = []
    completion, acompletion = litellm.completion, litellm.acompletion

    def answer(kw: dict[str, Any]) -> dict[str, Any]:
        sent.append(kw)
        busy = litellm.RateLimitError("busy", "openai", "gpt-4o")
        return {**kw, "mock_response": busy if kw["model"] == "gpt-4o" and len(sent) == 1 else f"from {kw['model']}"}

    async def afake(**kw: Any) -> Any:
        return await acompletion(**answer(kw))

    monkeypatch.setattr(litellm, "completion", lambda **kw: completion(**answer(kw)))
    monkeypatch.setattr(litellm, "acompletion", afake)
    pipeline = Pipeline.from_config({"routing": {"cooldown": {"failures": 1, "window_s": 60, "cooldown_s": 30}}})

    def call(**kwargs: Any) -> Any:
        kwargs = {"messages": MESSAGES, "temperature": 0, **kwargs}
        return asyncio.run(pipeline.acompletion(**kwargs)) if asynchronous else pipeline.completion(**kwargs)

    response = call(model="gpt-4o", fallbacks=["gpt-4o-mini"])
    assert response.choices[0].message.content == "from gpt-4o-mini"
    assert [kw["model"] for kw in sent] == ["gpt-4o", "gpt-4o-mini"] and not any("fallbacks" in kw for kw in sent)
    plan = outcome(response).plan
    assert plan.model == "gpt-4o-mini" and "fallback" in [d.action for d in plan.decisions]
    attempts = [(s.attributes["gen_ai.request.model"], s.status.status_code)
                for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert attempts == [("gpt-4o", StatusCode.ERROR), ("gpt-4o-mini", StatusCode.UNSET)]
    assert pipeline.store.get("cooldown:gpt-4o") is not None  # its failure counted
    again = call(model="gpt-4o", mock_response="from gpt-4o")  # no fallbacks: gpt-4o's own answer
    assert again.choices[0].message.content == "from gpt-4o" and outcome(again).usage.source != "cache"
    cached = call(model="gpt-4o-mini")  # the fallback's answer was cached under the model that gave it
    assert cached.choices[0].message.content == "from gpt-4o-mini" and outcome(cached).usage.source == "cache"


@pytest.mark.usefixtures("one_quota_window")
def test_the_pipeline_admits_the_fallbacks_it_was_given_as_it_admits_an_alias_s(monkeypatch) -> None:
    """The pipeline sends the ``fallbacks=`` it was given itself, so they are admitted as routing's
    are (a first version treated them as litellm's SDK does, which sends them whatever the lifecycle
    says): a target over its rate limit is moved past, not sent; a budget's ``downgrade_to`` still
    reroutes a call that does not fit."""
    sent: list[str] = []
    completion = litellm.completion
    monkeypatch.setattr(litellm, "completion", lambda **kw: sent.append(kw["model"]) or completion(**kw))
    limited = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"limits": {"gpt-5-mini": {"rpm": 1}}}})
    for _ in range(2):
        limited.completion(model="gpt-5-mini", messages=MESSAGES, mock_response="ok", fallbacks=["gpt-4o-mini"])
    assert sent == ["gpt-5-mini", "gpt-4o-mini"]  # the second call moved past the limit
    sent.clear()
    budget = {"name": "team", "usd": 0.001, "scope": "global", "downgrade_to": "cheap"}
    tight = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
        "aliases": {"cheap": ["gpt-4o-mini"]}, "budgets": [budget]}})
    answer = tight.completion(model="claude-sonnet-4-5", messages=MESSAGES, mock_response="ok", max_tokens=1000,
                              fallbacks=["deepseek/deepseek-chat"])
    assert sent == ["gpt-4o-mini"] and "downgrade" in [d.action for d in outcome(answer).plan.decisions]


def test_fallbacks_with_parameters_of_their_own_go_to_litellm_and_their_answer_is_not_cached(monkeypatch) -> None:
    """A fallback that sets its own parameters (an ``api_base``, here a mock answer) goes to litellm as
    given; the answer may be the fallback's, so it is not cached under the requested model."""
    pipeline = Pipeline.from_config({})
    busy = litellm.RateLimitError("busy", "openai", "gpt-4o")
    first = pipeline.completion(model="gpt-4o", messages=MESSAGES, temperature=0, mock_response=busy,
                                fallbacks=[{"model": "gpt-4o-mini", "mock_response": "from gpt-4o-mini"}])
    assert first.choices[0].message.content == "from gpt-4o-mini"
    again = pipeline.completion(model="gpt-4o", messages=MESSAGES, temperature=0, mock_response="from gpt-4o")
    assert again.choices[0].message.content == "from gpt-4o"


def test_a_call_that_fails_on_every_target_says_what_each_came_to(monkeypatch) -> None:
    """The caller gets the last target's error; its notes (shown in the traceback) list every attempt."""
    import litellm

    limited = litellm.exceptions.RateLimitError("slow down", "x", "m")
    refused = litellm.exceptions.AuthenticationError("bad key", "deepseek", "deepseek/deepseek-chat")
    pipeline = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
        "aliases": {"pair": ["gpt-4o-mini", "deepseek/deepseek-chat"]},
        "fallback": {"attempts_per_model": 1, "backoff_s": 0.0, "max_backoff_s": 0.0}}})
    completion = litellm.completion
    monkeypatch.setattr(litellm, "completion", lambda **kw: completion(
        **kw, mock_response=limited if kw["model"] == "gpt-4o-mini" else refused))
    with pytest.raises(litellm.exceptions.AuthenticationError) as raised:
        pipeline.completion(model="pair", messages=MESSAGES)
    assert raised.value.__notes__ == ["router-middleware: 2 attempts, all failed: gpt-4o-mini: RateLimitError; "
                                      "deepseek/deepseek-chat: AuthenticationError"]
    refused = litellm.exceptions.AuthenticationError("bad key", "deepseek", "deepseek/deepseek-chat")
    with pytest.raises(litellm.exceptions.AuthenticationError) as alone:  # one attempt: nothing to add
        pipeline.completion(model="deepseek/deepseek-chat", messages=MESSAGES)
    assert not hasattr(alone.value, "__notes__")


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stream_the_provider_breaks_counts_toward_its_target_s_cooldown(monkeypatch, asynchronous) -> None:
    """A provider that breaks every stream after its first chunks (five events of a recorded answer)
    fails the caller's read, not the attempt the pipeline made (one broken before its first chunk
    fails over at once): it was never counted as a failure, so its circuit never opened and every
    call went on to the same target. Now it counts as a failure before the first chunk does: the
    third call goes to the next target."""
    import asyncio

    import litellm

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    broken = (litellm.exceptions.APIConnectionError, litellm.exceptions.MidStreamFallbackError)

    async def aread(p: Pipeline) -> str:
        stream = await p.acompletion(model="pair", messages=MESSAGES, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    def read(p: Pipeline) -> str:
        if asynchronous:
            return asyncio.run(aread(p))
        return "".join(c.choices[0].delta.content or "" for c in p.completion(model="pair", messages=MESSAGES,
                                                                             stream=True) if c.choices)

    with fault_server() as (base, seen):
        deployments = {"flaky": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/cut/v1"},
                       "up": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/healthy/v1"}}
        p = Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"pair": ["flaky", "up"]},
                                              "cooldown": {"failures": 2, "window_s": 60, "cooldown_s": 30}},
                                  "cache": {"enabled": False}})
        for _ in range(2):
            with pytest.raises(broken):
                read(p)
        assert read(p)
        p.close()
    assert seen == {"cut:cut-stream": 2, "healthy:ok": 1}
    assert p.store.get("cooldown:flaky") is not None


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stream_whose_provider_sent_nothing_fails_over_while_a_target_is_left(monkeypatch, tmp_path,
                                                                                 asynchronous) -> None:
    """A provider that answers 200 and closes before any data: litellm streams one bare finish chunk.
    With a target left the pipeline fails over, as for a stream that ended before its first chunk
    (before, the caller got the empty answer and the row said ``complete``); the last target's is
    served as it came, as a direct call's is."""
    import asyncio
    import sqlite3

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    async def aread(p: Pipeline, model: str) -> list:
        return [c async for c in await p.acompletion(model=model, messages=MESSAGES, stream=True)]

    def read(p: Pipeline, model: str) -> list:
        if asynchronous:
            return asyncio.run(aread(p, model))
        return list(p.completion(model=model, messages=MESSAGES, stream=True))

    from .scripted_upstream import scripted_upstream

    with fault_server() as (base, seen), scripted_upstream() as (scripted, scripted_seen):
        deployments = {"empty": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/empty/v1"},
                       "up": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/healthy/v1"},
                       "tools": {"model": "openai/gpt-3.5-turbo", "api_base": scripted}}
        p = Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"pair": ["empty", "up"],
                                                                                       "fine": ["tools", "empty"]}},
                                  "cache": {"enabled": False}, "ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}"}})
        answer = "".join(c.choices[0].delta.content or "" for c in read(p, "pair") if c.choices)
        alone = read(p, "empty")
        first = read(p, "fine")  # opens with a role chunk of no content (a review: it was failed over)
        p.close()
    assert answer and seen == {"empty:empty-stream": 2, "healthy:ok": 1} and len(scripted_seen) == 1
    assert [c.choices[0].finish_reason for c in alone] == ["stop"]  # as litellm streams it directly
    assert [c.choices[0].finish_reason for c in first if c.choices][-1] == "tool_calls"  # all of it
    rows = sqlite3.connect(tmp_path / "l.db").execute("SELECT requested_model, deployment, error, decisions FROM calls "
                                                      "ORDER BY ts").fetchall()
    assert [r[:3] for r in rows] == [("pair", "up", None), ("empty", "empty", None), ("fine", "tools", None)]
    assert "routing:fallback" in rows[0][3] and "routing:fallback" not in rows[2][3]


def test_a_stream_its_reader_interrupts_counts_toward_no_cooldown(monkeypatch) -> None:
    """Ctrl-C while a sync stream waits for its next chunk ends the call (a ``stopped`` row), as it
    does a call that is not streamed: it says nothing of the provider, and opened no circuit."""
    import _thread
    import threading

    from router_middleware.bookkeeping.keys import COOLDOWN, FAILURES

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fault_server(hang_s=2.0) as (base, seen):
        deployments = {"slow": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/stall/v1"},
                       "up": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/healthy/v1"}}
        p = Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"pair": ["slow", "up"]},
                                              "cooldown": {"failures": 1, "window_s": 60, "cooldown_s": 30}},
                                  "cache": {"enabled": False}})
        stream = p.completion(model="pair", messages=MESSAGES, stream=True)
        next(stream)
        threading.Timer(0.3, _thread.interrupt_main).start()  # during the provider's pause
        with pytest.raises(KeyboardInterrupt):
            for _ in stream:
                pass
        p.close()
    assert seen == {"stall:stall": 1}
    assert p.store.get(COOLDOWN + "slow") is None and p.store.get(FAILURES + "slow") is None


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_attempt_with_a_fallback_behind_it_fails_over_without_the_sdk_s_own_retries(monkeypatch,
                                                                                       asynchronous) -> None:
    """The OpenAI SDK retries a 500 twice (waiting, and a 429's Retry-After up to a minute) before the
    call can fail over: with a target behind it, one request; the last target keeps the SDK's retries,
    as a direct call has them, and so does a call that sets ``max_retries`` itself."""
    import asyncio

    from .capture_server import capture_server
    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")

    def completion(p: Pipeline, **params) -> object:
        request = {"model": "coder", "messages": [{"role": "user", "content": "Rename x to count"}], **params}
        return asyncio.run(p.acompletion(**request)) if asynchronous else p.completion(**request)

    with capture_server() as (down, sent), fault_server() as (up, seen):
        deployments = {"down": {"model": "openai/gpt-3.5-turbo", "api_base": down},
                       "up": {"model": "openai/gpt-3.5-turbo", "api_base": f"{up}/healthy/v1"}}
        both = Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"coder": ["down", "up"]},
                                                 "fallback": {"backoff_s": 0.0}}, "cache": {"enabled": False}})
        assert outcome(completion(both)).usage.output_tokens > 0
        assert len(sent) == 1 and seen["healthy:ok"] == 1
        sent.clear()
        completion(both, max_retries=1)
        assert len(sent) == 2  # the caller's own setting
        alone = Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"coder": ["down"]}},
                                      "cache": {"enabled": False}})
        sent.clear()
        with pytest.raises(Exception, match="capture server"):
            completion(alone)
        assert len(sent) == 3  # the SDK's two retries, as sent directly
        twice = Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"coder": ["down"]},
                                                  "fallback": {"attempts_per_model": 2, "backoff_s": 0.0}},
                                      "cache": {"enabled": False}})
        sent.clear()
        with pytest.raises(Exception, match="capture server"):
            completion(twice)
        assert len(sent) == 2  # the call's own two attempts replace the SDK's retries (each kept them: 6)
        sent.clear()  # the caller's own fallbacks= are each tried once: the last keeps the SDK's retries
        with pytest.raises(Exception, match="capture server"):
            completion(twice, fallbacks=["down"])
        assert len(sent) == 4  # the first, then the fallback and its two SDK retries (a review: 2 after the fix)


@pytest.mark.parametrize("model", ["deepseek/deepseek-chat", "openrouter/google/gemini-3-pro-preview"])
def test_a_streamed_and_a_whole_answer_name_the_same_model(model) -> None:
    """A stream's usage chunk names the model as litellm was asked for it (``deepseek/deepseek-chat``),
    a whole answer as its provider does (``deepseek-chat``): the report ranked one model under two
    names. Both are the provider's name now (the two mock usages differ, so the costs do)."""
    pipeline = Pipeline.from_config({"cache": {"enabled": False}})
    messages = [{"role": "user", "content": "hi"}]
    whole = outcome(pipeline.completion(model=model, messages=messages, mock_response="ok"))
    stream = pipeline.completion(model=model, messages=messages, mock_response="ok", stream=True)
    for _ in stream:
        pass
    streamed = outcome(stream)
    assert whole is not None and streamed is not None
    assert streamed.model == whole.model == model.split("/", 1)[1]
    assert streamed.cost.total_usd and whole.cost.total_usd  # priced as that model


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_an_answer_that_says_nothing_is_not_cached(tmp_path, monkeypatch, asynchronous) -> None:
    """A stream its provider closed before any data, served as it came (no target left), and a plain
    answer with no text and no tool call are no answers to serve again: the response cache keeps
    neither (before, the same request was answered from the cache with an empty text for an hour,
    its provider never asked again: worse than calling it directly)."""
    import asyncio
    import sqlite3

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    kw = {"messages": MESSAGES, "temperature": 0}

    async def aread(p: Pipeline, **more: Any) -> Any:
        response = await p.acompletion(**kw, **more)
        return [c async for c in response] if more.get("stream") else response

    def read(p: Pipeline, **more: Any) -> Any:
        if asynchronous:
            return asyncio.run(aread(p, **more))
        response = p.completion(**kw, **more)
        return list(response) if more.get("stream") else response

    with fault_server() as (base, seen):
        p = Pipeline.from_config({"ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}"}})  # the cache on, as by default
        for _ in range(2):
            read(p, model="openai/gpt-3.5-turbo", api_base=f"{base}/empty/v1", stream=True)
        plain = [read(p, model="gpt-4o-mini", mock_response="") for _ in range(2)]
        said = [read(p, model="gpt-4o-mini", mock_response="ok") for _ in range(2)]
        p.close()
    assert seen == {"empty:empty-stream": 2}
    assert [outcome(r).usage.source for r in plain] == ["estimated", "estimated"]
    assert [outcome(r).usage.source for r in said] == ["estimated", "cache"]  # an answer is cached
    rows = sqlite3.connect(tmp_path / "l.db").execute("SELECT cache_hit FROM calls ORDER BY ts").fetchall()
    assert [r[0] for r in rows] == [0, 0, 0, 0, 0, 1]
