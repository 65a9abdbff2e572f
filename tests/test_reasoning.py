"""Reasoning caps: rules, step inference, wire bodies per provider, session budget, escalation."""

from __future__ import annotations

import pytest

from router_middleware import AgentContext, Call, Pipeline, Plan, outcome
from router_middleware.config import ReasoningConfig
from router_middleware.policies import PolicyState
from router_middleware.reasoning import ReasoningPolicy, failure_signal, infer_step_kind

from .capture_server import capture_server
from .cassette_data import capturing_vcr
from .conftest import CASSETTES

replayer, SENT = capturing_vcr()

CLINE_STYLE = {"reasoning": {"rules": [
    {"when": {"step_kind": ["plan"]}, "effort": "high"},
    {"when": {"step_kind": ["observe"]}, "effort": "low"},
    {"when": {"step_kind": ["summarize"]}, "effort": "none"},
]}}
TOOL_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "ls"}'}}]}


def plan(policy, messages, model="gpt-5-nano", state=None, **context) -> Plan:
    call = Call.create(model, messages, {}, AgentContext(**context))
    return policy(Plan.from_call(call), state or PolicyState())


def test_step_kind_inference() -> None:
    user = {"role": "user", "content": "fix it"}
    assert infer_step_kind([user]) == "plan"
    assert infer_step_kind([user, TOOL_CALL, {"role": "tool", "tool_call_id": "c1", "content": "a.py"}]) == "observe"
    assert infer_step_kind([user, {"role": "assistant", "content": "x"},
                            {"role": "user", "content": "<returncode>0</returncode>\n<output>\n</output>"}]) == "observe"
    assert infer_step_kind([user, {"role": "assistant", "content": "x"}, {"role": "user", "content": "now add tests"}]) \
        == "plan"
    assert infer_step_kind([user, {"role": "assistant", "content": "partial"}]) == "act"
    assert infer_step_kind([{"role": "user", "content": "Summarize these 12 messages"}]) == "summarize"


def test_rules_by_kind_first_every_model_and_app() -> None:
    config = ReasoningConfig.model_validate({"rules": [
        {"when": {"app": "batch"}, "effort": "none"},
        {"when": {"first": True}, "effort": "xhigh"},
        {"when": {"every": 5}, "effort": "high"},
        {"when": {"model": "gpt-5*", "step_kind": ["observe"]}, "budget_tokens": 1500},
        {"when": {}, "effort": "medium"},
    ]})
    policy = ReasoningPolicy(config)
    observe = [{"role": "user", "content": "go"}, TOOL_CALL, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    assert plan(policy, observe, step=0).params["reasoning_effort"] == "high"  # xhigh unsupported on gpt-5-nano
    assert plan(policy, observe, step=10).params["reasoning_effort"] == "high"
    assert plan(policy, observe, step=3).params["reasoning_effort"] == "minimal"  # 1500 tokens -> minimal
    assert plan(policy, observe, step=3, app="batch").params["reasoning_effort"] == "minimal"  # none -> minimal
    assert plan(policy, [{"role": "user", "content": "go"}, {"role": "assistant", "content": "x"}],
                step=3).params["reasoning_effort"] == "medium"


def test_rule_needs_exactly_one_of_effort_or_budget() -> None:
    from router_middleware import ConfigError

    with pytest.raises(ConfigError, match="reasoning.rules.0"):
        Pipeline.from_config({"reasoning": {"rules": [{"effort": "low", "budget_tokens": 10}]}})


def test_openai_wire_body_from_real_recording() -> None:
    pipeline = Pipeline.from_config(CLINE_STYLE)
    with replayer.use_cassette(str(CASSETTES / "openai_chat_reasoning.yaml")):
        response = pipeline.completion(model="gpt-5-nano", messages=[{"role": "user", "content": "Count r's in strawberry"}],
                                       context={"session_id": "r1", "step_kind": "observe"})
    assert SENT[-1]["reasoning_effort"] == "low"
    result = outcome(response)
    assert result.usage.reasoning_tokens > 0
    assert result.plan.decisions[0].attributes["level"] == "low"


def test_anthropic_wire_body_from_real_recording() -> None:
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "budget_tokens": 1024}]}})
    message = {"role": "user", "content": [{"type": "text", "text": "How many times does the letter 'r' appear in the word strawberry?"}]}
    with replayer.use_cassette(str(CASSETTES / "anthropic_thinking.yaml")):
        response = pipeline.completion(model="anthropic/claude-3-7-sonnet-20250219", messages=[message],
                                       max_tokens=2048, temperature=0.2)
    body = SENT[-1]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["max_tokens"] > 1024 and "temperature" not in body
    assert outcome(response).usage.reasoning_tokens > 0


@pytest.mark.parametrize(("model", "effort", "check"), [
    ("gemini/gemini-2.5-flash", "medium",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 8192),
    ("gemini/gemini-2.5-flash", "none",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 0),
    ("gemini/gemini-2.5-pro", "none",  # it cannot turn thinking off: its minimum
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 128),
    ("gemini/gemini-3-pro-preview", "medium",  # it has low and high only: a cap is not raised
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "low"),
    ("gemini/gemini-3.1-pro-preview", "medium",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "medium"),
    ("gemini/gemini-3.1-pro-preview", "none",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "low"),
    ("gemini/gemini-3.5-flash", "medium",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "medium"),
    ("gemini/gemini-3.5-flash", "minimal",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "minimal"),
    ("gemini/gemini-3.8-flash", "minimal",  # the catalog says it has no minimal
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "low"),
    ("gemini/gemini-3.5-flash", "xhigh",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "high"),
    ("gemini/gemini-3-pro-preview", "minimal",
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "low"),
    ("openrouter/google/gemini-3-pro-preview", "low", lambda b: b["reasoning"] == {"effort": "low"}),
    ("openrouter/anthropic/claude-sonnet-4.5", "none", lambda b: b["reasoning"] == {"enabled": False}),
    ("deepseek/deepseek-reasoner", "high", lambda b: "reasoning_effort" not in b),
    ("gpt-5-nano", "none", lambda b: b["reasoning_effort"] == "minimal"),
    ("gpt-4o-mini", "high", lambda b: not {"reasoning_effort", "thinking", "reasoning"} & b.keys()),
])
def test_wire_body_per_provider(model, effort, check) -> None:
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": effort}]},
                                     "context": {"enabled": False}})
    with capture_server() as (base, bodies):
        with pytest.raises(Exception):  # noqa: B017 - the capture server answers 500 on purpose
            pipeline.completion(model=model, messages=[{"role": "user", "content": "hi"}], api_base=base,
                                api_key="test-key", num_retries=0, max_retries=0)
    assert bodies, model
    assert check(bodies[-1]), bodies[-1]


def test_openrouter_budget_and_exclude() -> None:
    pipeline = Pipeline.from_config({"reasoning": {"exclude_from_response": True,
                                                   "rules": [{"when": {}, "budget_tokens": 3000}]},
                                     "context": {"enabled": False}})
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017
        pipeline.completion(model="openrouter/google/gemini-3-pro-preview", messages=[{"role": "user", "content": "hi"}],
                            api_base=base, api_key="k", num_retries=0, max_retries=0)
    assert bodies[-1]["reasoning"] == {"max_tokens": 3000, "exclude": True}


@pytest.mark.parametrize(("model", "params", "check"), [
    ("openrouter/anthropic/claude-sonnet-4.5", {"reasoning": {"max_tokens": 800}},
     lambda b: b["reasoning"] == {"max_tokens": 800}),
    ("gemini/gemini-2.5-flash", {"thinking": {"type": "enabled", "budget_tokens": 512}},
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 512),
    ("openrouter/openai/gpt-5-mini", {"reasoning": {"effort": "high", "exclude": True}},
     lambda b: b["reasoning"] == {"effort": "low", "exclude": True}),
    ("gemini/gemini-2.5-flash", {"reasoning_effort": "disable"},
     lambda b: b["generationConfig"]["thinkingConfig"]["thinkingBudget"] == 0),
    ("anthropic/claude-sonnet-4-5", {"reasoning_effort": "disable"},
     lambda b: b.get("thinking", {"type": "disabled"}) == {"type": "disabled"}),
])
def test_a_rule_keeps_what_the_caller_asked_for_below_its_cap(model, params, check) -> None:
    """A small budget of the caller's own is sent as it is (not as reasoning off), and a lowered
    OpenRouter effort keeps the caller's ``exclude``. litellm's ``reasoning_effort="disable"``
    (thinking off) is the caller's ``none``: a rule raised it to its own level (16,384 tokens of
    thinking)."""
    effort = "low" if "exclude" in params.get("reasoning", {}) else "high"
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": effort}]},
                                     "context": {"enabled": False}})
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017 - it answers 500
        pipeline.completion(model=model, messages=[{"role": "user", "content": "hi"}], api_base=base, api_key="k",
                            num_retries=0, max_retries=0, **params)
    assert check(bodies[-1]), bodies[-1]


def test_a_caller_s_anthropic_budget_below_the_minimum_is_raised_and_said() -> None:
    """Anthropic refuses a thinking budget under 1,024 tokens (a 400): it is sent at that minimum, and
    the decision says so."""
    from router_middleware import outcome

    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "high"}]},
                                     "context": {"enabled": False}})
    response = pipeline.completion(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
                                   thinking={"type": "enabled", "budget_tokens": 800}, mock_response="ok")
    plan = outcome(response).plan
    assert plan.params["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    decision = next(d for d in plan.decisions if d.policy == "reasoning")
    assert "thinking budget 1024 (Anthropic's minimum)" in decision.reason, decision.reason


def test_unsupported_model_never_gets_a_reasoning_param() -> None:
    policy = ReasoningPolicy(ReasoningConfig())
    planned = plan(policy, [{"role": "user", "content": "hi"}], model="gpt-4o-mini")
    assert planned.decisions == ()
    call = Call.create("gpt-4o-mini", [{"role": "user", "content": "hi"}], {"reasoning_effort": "high"})
    stripped = policy(Plan.from_call(call), PolicyState())
    assert "reasoning_effort" not in stripped.params
    assert stripped.decisions[0].action == "unsupported" and "does not support" in stripped.decisions[0].reason
    response = Pipeline.from_config({}).completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                  reasoning_effort="high", mock_response="ok")
    assert response.choices[0].message.content == "ok"


def test_session_budget_steps_down_then_turns_off() -> None:
    policy = ReasoningPolicy(ReasoningConfig.model_validate(
        {"session_budget_tokens": 40000, "rules": [{"when": {}, "effort": "high"}]}))
    messages = [{"role": "user", "content": "plan"}]
    levels = []
    for spent in (0, 10000, 30000, 37000, 39500, 40000, 50000):
        state = PolicyState(reasoning_spent={"s": spent})
        levels.append(plan(policy, messages, model="anthropic/claude-sonnet-4-5", state=state,
                           session_id="s").decisions[-1].attributes["level"])
    # the cap is the highest level whose budget fits in half of what is left
    assert levels == ["high", "medium", "low", "minimal", "none", "none", "none"]


def test_pipeline_counts_spent_reasoning_tokens() -> None:
    pipeline = Pipeline.from_config({"reasoning": {"session_budget_tokens": 100,
                                                   "rules": [{"when": {}, "effort": "high"}]}})
    with replayer.use_cassette(str(CASSETTES / "openai_chat_reasoning.yaml"), allow_playback_repeats=True):
        first = pipeline.completion(model="gpt-5-nano", messages=[{"role": "user", "content": "Count r's in strawberry"}],
                                    context={"session_id": "budget"})
        spent = outcome(first).usage.reasoning_tokens
        assert pipeline.reasoning_spent["budget"] == spent > 100
        pipeline.completion(model="gpt-5-nano", messages=[{"role": "user", "content": "Count r's in strawberry"}],
                            context={"session_id": "budget"})
    assert SENT[-1]["reasoning_effort"] == "minimal"  # budget exhausted: lowest effort gpt-5-nano accepts


def test_escalation_after_a_failed_step_then_decay() -> None:
    policy = ReasoningPolicy(ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "low"}]}))
    base = [{"role": "user", "content": "fix"}, TOOL_CALL]
    failed = [*base, {"role": "tool", "tool_call_id": "c1",
                      "content": "Traceback (most recent call last):\n  File 'x.py'\nValueError: bad"}]
    ok = [*base, {"role": "tool", "tool_call_id": "c1", "content": "all good"}]
    escalated = plan(policy, failed)
    assert escalated.params["reasoning_effort"] == "medium"
    assert "escalated one level" in escalated.decisions[-1].reason
    assert plan(policy, ok).params["reasoning_effort"] == "low"
    assert plan(policy, ok, tags=("retry",)).params["reasoning_effort"] == "medium"
    assert failure_signal([{"role": "user", "content": "<returncode>2</returncode>\n<output>x</output>"}],
                          AgentContext()) is not None
    repeated = [*base, {"role": "tool", "tool_call_id": "c1", "content": "x"},
                {**TOOL_CALL, "tool_calls": [{**TOOL_CALL["tool_calls"][0], "id": "c2"}]},
                {"role": "tool", "tool_call_id": "c2", "content": "x"}]
    assert failure_signal(repeated, AgentContext()) == "the agent repeated its last tool call"


def test_level_on_the_span(span_exporter) -> None:
    from opentelemetry.trace import SpanKind

    pipeline = Pipeline.from_config(CLINE_STYLE)
    pipeline.completion(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "plan it"}],
                        mock_response="ok")
    parent = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL)
    assert parent.attributes["router_middleware.reasoning.level"] == "budget:16384"
    assert "reasoning:cap" in parent.attributes["router_middleware.decisions"]


@pytest.mark.parametrize(("asked", "expected"), [
    ({"reasoning_effort": "low"}, "low"),
    ({"reasoning": {"effort": "minimal"}}, "minimal"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "low"),
    ({}, "high"),  # the caller asked for nothing: the rule's level
])
def test_a_rule_caps_the_callers_effort_and_never_raises_it(asked, expected) -> None:
    def planned(mode: str) -> Plan:
        config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "high", "mode": mode}]})
        call = Call.create("gpt-5-nano", [{"role": "user", "content": "fix it"}], asked, AgentContext())
        return ReasoningPolicy(config)(Plan.from_call(call), PolicyState())

    capped = planned("cap")
    assert capped.params["reasoning_effort"] == expected
    if asked:
        assert "kept at the caller's" in capped.decisions[-1].reason
    assert planned("set").params["reasoning_effort"] == "high"  # mode: set raises what the caller asked


def test_a_rule_below_the_callers_effort_still_lowers_it() -> None:
    config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "minimal"}]})
    call = Call.create("gpt-5-nano", [{"role": "user", "content": "fix it"}], {"reasoning_effort": "high"},
                       AgentContext())
    assert ReasoningPolicy(config)(Plan.from_call(call), PolicyState()).params["reasoning_effort"] == "minimal"


@pytest.mark.parametrize("thinking", [{"type": "enabled", "budget_tokens": 5000}, {"type": "enabled", "budget_tokens": -1}])
def test_without_a_rule_the_callers_thinking_budget_is_left_as_sent(thinking) -> None:
    call = Call.create("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "fix it"}],
                       {"thinking": thinking, "max_tokens": 9000}, AgentContext())
    planned = ReasoningPolicy(ReasoningConfig())(Plan.from_call(call), PolicyState())
    assert planned.params["thinking"] == thinking


def test_a_cap_keeps_the_callers_own_smaller_budget() -> None:
    config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "high"}]})
    call = Call.create("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "fix it"}],
                       {"thinking": {"type": "enabled", "budget_tokens": 3000}, "max_tokens": 9000}, AgentContext())
    planned = ReasoningPolicy(config)(Plan.from_call(call), PolicyState())
    assert planned.params["thinking"]["budget_tokens"] == 3000


@pytest.mark.parametrize(("cap", "sent"), [
    ({"max_completion_tokens": 1000}, 2048 + 4096),  # below the thinking budget: raised above it, as max_tokens is
    ({"max_completion_tokens": 32000}, 32000),  # above it: the caller's cap, unchanged
    ({"max_tokens": 1000}, 2048 + 4096),
])
def test_anthropic_thinking_raises_a_max_completion_tokens_below_its_budget_as_it_does_max_tokens(cap, sent) -> None:
    """OpenAI's newer name for the output cap is the same cap to Anthropic (litellm sends it as
    ``max_tokens``): left below the thinking budget, Anthropic refuses the call (a 400)."""
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "low"}]},
                                     "context": {"enabled": False}})
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017 - it answers 500
        pipeline.completion(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
                            api_base=base, api_key="k", num_retries=0, max_retries=0, **cap)
    assert bodies[-1]["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert bodies[-1]["max_tokens"] == sent, bodies[-1]


def _sent(call, model: str, messages: list[dict] | None = None, **params) -> dict:
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017 - it answers 500
        call(model=model, messages=messages or [{"role": "user", "content": "hi"}], api_base=base, api_key="k",
             num_retries=0, max_retries=0, **params)
    return bodies[-1]


@pytest.mark.parametrize("model", ["anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-flash", "openai/gpt-5-mini",
                                   "openrouter/anthropic/claude-sonnet-4.5", "deepseek/deepseek-chat"])
def test_without_a_rule_the_callers_reasoning_effort_goes_out_as_a_direct_call_sends_it(model) -> None:
    """No rule and no session budget: nothing caps the caller's level, so litellm maps it as it would
    without the middleware (before, Anthropic's 'high' became a 16,384-token budget with max_tokens
    raised from 5,000 to 20,480: four times the output the caller allowed; deepseek-chat's was dropped,
    where litellm sends ``thinking`` on with the effort)."""
    import litellm

    keys = ("reasoning_effort", "thinking", "reasoning", "max_tokens", "generationConfig")
    piped = _sent(Pipeline.from_config({"context": {"enabled": False}}).completion, model,
                  reasoning_effort="high", max_tokens=5000)
    direct = _sent(litellm.completion, model, reasoning_effort="high", max_tokens=5000)
    assert {k: piped.get(k) for k in keys} == {k: direct.get(k) for k in keys}


def test_without_a_rule_a_level_the_model_lacks_still_becomes_the_nearest_it_has() -> None:
    """gpt-5 models take no 'none' (OpenAI answers 400): the nearest level they take is sent."""
    call = Call.create("gpt-5-mini", [{"role": "user", "content": "fix it"}], {"reasoning_effort": "none"},
                       AgentContext())
    planned = ReasoningPolicy(ReasoningConfig())(Plan.from_call(call), PolicyState())
    assert planned.params["reasoning_effort"] == "minimal"
    assert planned.decisions[-1].action == "cap"


@pytest.mark.parametrize(("words", "sent"), [
    (10, 64000),  # a short request: the model's whole output limit, as litellm sends without the middleware
    (120_000, None),  # a long one: what its window leaves (Anthropic refuses prompt + max_tokens over it)
])
def test_anthropic_thinking_without_a_cap_leaves_the_answer_the_room_a_direct_call_has(words, sent) -> None:
    """Cline sends no max_tokens. Before, a rule's thinking set max_tokens to the budget plus 4,096 (6,144
    at 'low'), so an answer a direct call completes (a long file written in one tool call) was cut."""
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "low"}]},
                                     "context": {"enabled": False}})
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017 - it answers 500
        pipeline.completion(model="anthropic/claude-sonnet-4-5", api_base=base, api_key="k", num_retries=0,
                            max_retries=0, messages=[{"role": "user", "content": "word " * words}])
    body = bodies[-1]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    if sent is not None:
        assert body["max_tokens"] == sent
    else:
        prompt = pipeline.state.tokens("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "word " * words}])
        assert 2048 + 4096 <= body["max_tokens"] < 64000
        assert prompt + body["max_tokens"] <= 200_000 - prompt // 5  # room kept for a tokenizer that counts more


def test_a_max_tokens_set_for_a_thinking_budget_is_no_output_estimate_for_the_budgets() -> None:
    """Until replies are learned a call reserves its caller's max_tokens, else the default output: a
    ceiling the reasoning policy set (the window's room, 64,000 here) would reserve ~$0.96 a call."""
    p = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "low"}]}, "context": {"enabled": False},
                              "routing": {"budgets": [{"name": "b", "usd": 100, "window_s": 3600}]}})
    free = p.plan(p.make_call("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "hi"}], None, {}))
    assert free.params["max_tokens"] == 64000
    assert p.request_size(free)[2] == 512 + 2048  # routing.default_output_tokens plus the thinking budget
    capped = p.plan(p.make_call("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "hi"}], None,
                                {"max_tokens": 1000}))
    assert capped.params["max_tokens"] == 2048 + 4096 and p.request_size(capped)[2] == 2048 + 4096  # raised: the cap


def _rule(effort: str) -> Pipeline:
    return Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": effort}]},
                                 "context": {"enabled": False}})


@pytest.mark.parametrize("effort", ["low", "high", "none"])
def test_a_rule_on_deepseek_chat_sends_what_a_direct_call_with_its_level_sends(effort) -> None:
    """DeepSeek documents a thinking mode for its chat model (on/off, with an effort it maps to low or
    high), and litellm sends ``thinking`` for it. Before, the rule's level was dropped as unsupported:
    litellm's model map has no reasoning flag for deepseek-chat."""
    import litellm

    keys = ("reasoning_effort", "thinking")
    piped = _sent(_rule(effort).completion, "deepseek/deepseek-chat")
    direct = _sent(litellm.completion, "deepseek/deepseek-chat", reasoning_effort=effort)
    assert piped.get("thinking") and {k: piped.get(k) for k in keys} == {k: direct.get(k) for k in keys}


TOOL_LOOP = [{"role": "user", "content": "list files"}, TOOL_CALL, {"role": "tool", "tool_call_id": "c1", "content": "a.py"}]


def test_a_rule_does_not_switch_deepseek_thinking_on_over_tool_calls_without_their_reasoning() -> None:
    """In thinking mode DeepSeek refuses (a 400) an assistant tool call passed back without its
    ``reasoning_content``, and litellm fills none in for deepseek-chat. So over such a history a rule
    sends no reasoning parameter (as a direct call without one), but still turns thinking off."""
    bare = _sent(_rule("low").completion, "deepseek/deepseek-chat", TOOL_LOOP)
    assert not {"reasoning_effort", "thinking"} & bare.keys(), bare
    assert _sent(_rule("none").completion, "deepseek/deepseek-chat", TOOL_LOOP)["thinking"] == {"type": "disabled"}
    reasoned = [TOOL_LOOP[0], {**TOOL_CALL, "reasoning_content": "ls shows them"}, TOOL_LOOP[2]]
    assert _sent(_rule("low").completion, "deepseek/deepseek-chat", reasoned)["thinking"] == {"type": "enabled"}


@pytest.mark.parametrize(("model", "effort", "cap", "budget"), [
    ("gemini/gemini-2.5-flash", "low", {"max_completion_tokens": 300}, 150),  # half the cap: the rest answers
    ("gemini/gemini-2.5-flash", "low", {"max_tokens": 5000}, 2048),  # the rule's budget fits: as it was
    ("gemini/gemini-2.5-flash", "low", {"max_tokens": 1}, 0),  # no room to think: Flash turns it off
    ("gemini/gemini-2.5-pro", "low", {"max_tokens": 200}, 128),  # Pro cannot turn thinking off: its lowest
    ("gemini/gemini-2.5-flash-lite", "low", {"max_tokens": 600}, 0),  # below Flash-Lite's lowest, 512: off
    ("gemini/gemini-2.5-flash", "xhigh", {}, 24576),  # Flash's highest budget
])
def test_a_gemini_2_5_thinking_budget_fits_under_the_callers_output_cap(model, effort, cap, budget) -> None:
    """Gemini counts thinking toward maxOutputTokens. Before, a 'low' rule sent a 2,048-token budget
    under a 300-token cap, leaving the answer no room where a direct call (dynamic thinking) answers.
    The cap goes out as the caller set it, as a direct call sends it."""
    import litellm

    piped = _sent(_rule(effort).completion, model, **cap)
    direct = _sent(litellm.completion, model, **cap)
    assert piped["generationConfig"]["thinkingConfig"]["thinkingBudget"] == budget, piped
    assert piped["generationConfig"].get("max_output_tokens") == direct.get("generationConfig", {}).get("max_output_tokens")


def test_a_rule_does_not_switch_anthropic_thinking_on_over_a_tool_call_without_its_thinking_block() -> None:
    """With thinking on, Anthropic refuses (a 400) a final assistant tool call that does not start with
    its thinking block, and litellm drops thinking there only under ``modify_params``. An agent behind
    the proxy passes back none: before, a rule's thinking made each step after a tool call fail where a
    direct call answers. The request now goes as a direct call sends it."""
    import litellm

    keys = ("thinking", "max_tokens")
    piped = _sent(_rule("low").completion, "anthropic/claude-sonnet-4-5", TOOL_LOOP)
    direct = _sent(litellm.completion, "anthropic/claude-sonnet-4-5", TOOL_LOOP)
    assert {k: piped.get(k) for k in keys} == {k: direct.get(k) for k in keys}, piped
    block = {"type": "thinking", "thinking": "ls lists them", "signature": "sig"}
    kept = [TOOL_LOOP[0], {**TOOL_CALL, "thinking_blocks": [block]}, TOOL_LOOP[2]]
    assert _sent(_rule("low").completion, "anthropic/claude-sonnet-4-5", kept)["thinking"] == \
        {"type": "enabled", "budget_tokens": 2048}


BASH = {"type": "function", "function": {"name": "bash", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "bash"}}])
def test_a_rule_does_not_switch_anthropic_thinking_on_when_the_caller_forces_a_tool(choice) -> None:
    """Anthropic refuses thinking with a tool_choice that forces tool use (a 400): the request goes out
    as a direct call sends it, the caller's tool_choice kept."""
    import litellm

    keys = ("thinking", "max_tokens", "tool_choice")
    piped = _sent(_rule("low").completion, "anthropic/claude-sonnet-4-5", tools=[BASH], tool_choice=choice)
    direct = _sent(litellm.completion, "anthropic/claude-sonnet-4-5", tools=[BASH], tool_choice=choice)
    assert {k: piped.get(k) for k in keys} == {k: direct.get(k) for k in keys}, piped


UNKNOWN = ["openai/my-own-reasoner", "anthropic/claude-opus-9", "gemini/gemini-9-pro"]  # no catalog knows them


@pytest.mark.parametrize("model", UNKNOWN)
def test_a_model_no_catalog_knows_keeps_the_callers_reasoning_as_a_direct_call_sends_it(model) -> None:
    """A custom reasoner behind an OpenAI-compatible endpoint, or a model newer than litellm's map: the
    middleware cannot judge it, so the caller's ``reasoning_effort`` goes out as litellm maps it
    directly (before, it was dropped as unsupported: the model answered without the reasoning asked
    for); under a rule, the rule's level goes out the same way."""
    import litellm

    def reasoning(body: dict) -> dict:
        return {k: body.get(k) for k in ("reasoning_effort", "thinking", "reasoning", "generationConfig")}

    direct = reasoning(_sent(litellm.completion, model, reasoning_effort="high"))
    piped = _sent(Pipeline.from_config({"context": {"enabled": False}}).completion, model, reasoning_effort="high")
    assert reasoning(piped) == direct and any(direct.values())  # litellm sends it for each of them
    capped = _sent(Pipeline.from_config({"context": {"enabled": False},
                                         "reasoning": {"rules": [{"when": {}, "effort": "low"}]}}).completion,
                   model, reasoning_effort="high")
    assert reasoning(capped) == reasoning(_sent(litellm.completion, model, reasoning_effort="low"))


def test_a_rule_adds_no_reasoning_to_a_model_no_catalog_knows_when_the_caller_asked_none() -> None:
    """It may not reason: a parameter it does not take fails the call."""
    call = Call.create("openai/my-own-model", [{"role": "user", "content": "hi"}], {}, AgentContext())
    config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "high"}]})
    planned = ReasoningPolicy(config)(Plan.from_call(call), PolicyState())
    assert not any(k in planned.params for k in ("reasoning_effort", "thinking", "reasoning"))
    assert "unknown to the catalog" in planned.decisions[-1].reason


@pytest.mark.parametrize("rule", [{"effort": "xhigh"}, {"budget_tokens": 40000}])
def test_an_anthropic_thinking_budget_fits_the_model_s_output_limit(rule) -> None:
    """Claude Opus 4.1 returns at most 32,000 tokens: an ``xhigh`` rule (32,768 thinking tokens) sent
    ``max_tokens`` 36,864 and a 40,000-token rule 44,096, which Anthropic refuses. The budget is now
    the model's limit less the answer's room, and the decision says so."""
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, **rule}]}, "context": {"enabled": False}})
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017 - it answers 500
        pipeline.completion(model="anthropic/claude-opus-4-1", messages=[{"role": "user", "content": "hi"}],
                            api_base=base, api_key="k", num_retries=0, max_retries=0)
    assert bodies[-1]["max_tokens"] == 32000
    assert bodies[-1]["thinking"] == {"type": "enabled", "budget_tokens": 32000 - 4096}
    plan = pipeline.plan(pipeline.make_call("anthropic/claude-opus-4-1", [{"role": "user", "content": "hi"}], None, {}))
    assert "the model's 32000 output tokens less 4096 for the answer" in plan.decisions[-1].reason


SUMMARISED = {"effort": "high", "summary": "detailed"}  # litellm's dict form (the Responses API's reasoning)


def _handed_to_litellm(monkeypatch) -> list[dict]:
    """The kwargs each ``litellm.completion`` call receives (it answers as it would: ``mock_response``)."""
    import litellm

    sent: list[dict] = []
    original = litellm.completion
    monkeypatch.setattr(litellm, "completion", lambda **kw: sent.append(kw) or original(**kw))
    return sent


@pytest.mark.parametrize("model", ["gpt-5-mini", "o3-mini"])
@pytest.mark.parametrize(("asked", "level"), [(SUMMARISED, "high"), ({"summary": "auto"}, None)],
                         ids=["effort", "summary-only"])
def test_a_dict_reasoning_effort_reaches_litellm_with_its_effort_and_summary(model, asked, level, monkeypatch,
                                                                             span_exporter) -> None:
    """litellm takes ``reasoning_effort={"effort": "high", "summary": "detailed"}`` (it sends the summary
    where the Responses API serves the model), and one with no effort (the model's default level); the
    middleware refused both as unknown levels. The span names the level asked for."""
    from opentelemetry.trace import SpanKind

    sent = _handed_to_litellm(monkeypatch)
    answer = Pipeline().completion(model=model, messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                                   reasoning_effort=dict(asked))
    assert answer.choices[0].message.content == "ok"
    assert sent[-1]["reasoning_effort"] == asked
    parent = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL)
    assert parent.attributes.get("router_middleware.reasoning.level") == level


@pytest.mark.parametrize(("reasoning", "effort"), [
    ({"rules": [{"when": {}, "effort": "low"}]}, "low"),
    ({"session_budget_tokens": 3000}, "minimal"),  # half of what the session has left buys minimal
], ids=["rule", "session-budget"])
def test_a_cap_lowers_a_dict_reasoning_effort_and_keeps_its_summary(reasoning, effort, monkeypatch) -> None:
    """A cap reads the dict's effort as it reads the string (it was refused before) and rewrites only
    the effort: the caller's summary still goes to an OpenAI model."""
    sent = _handed_to_litellm(monkeypatch)
    pipeline = Pipeline.from_config({"reasoning": reasoning, "context": {"enabled": False}})
    answer = pipeline.completion(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                                 reasoning_effort=dict(SUMMARISED), context={"session_id": "s1"})
    assert sent[-1]["reasoning_effort"] == {"effort": effort, "summary": "detailed"}
    decision = outcome(answer).plan.decisions[-1]
    assert (decision.action, decision.attributes["level"]) == ("cap", effort)


def test_a_rule_keeps_a_dict_effort_below_its_cap_and_sets_one_that_names_none() -> None:
    """Mode cap never raises the dict's effort; a dict with only a summary gets the rule's level beside it."""
    config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "high"}]})

    def planned(asked: dict) -> object:
        call = Call.create("gpt-5-mini", [{"role": "user", "content": "fix it"}], {"reasoning_effort": asked},
                           AgentContext())
        return ReasoningPolicy(config)(Plan.from_call(call), PolicyState()).params["reasoning_effort"]

    assert planned({"effort": "low", "summary": "auto"}) == {"effort": "low", "summary": "auto"}
    assert planned({"summary": "auto"}) == {"effort": "high", "summary": "auto"}


def test_a_rule_sends_anthropic_the_thinking_a_string_effort_gets_for_a_dict_one(monkeypatch) -> None:
    """Anthropic takes no summary: the dict's capped level becomes the thinking budget the string's does."""
    sent = _handed_to_litellm(monkeypatch)
    for asked in (dict(SUMMARISED), "high"):
        _rule("low").completion(model="anthropic/claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
                                mock_response="ok", reasoning_effort=asked)
    keys = ("reasoning_effort", "thinking", "max_tokens")
    assert [{k: kw.get(k) for k in keys} for kw in sent] == 2 * [
        {"reasoning_effort": None, "thinking": {"type": "enabled", "budget_tokens": 2048}, "max_tokens": 64000}]


def test_a_rule_that_keeps_the_caller_s_anthropic_thinking_sends_its_max_tokens_as_it_came() -> None:
    """The caller's own thinking (3,000) and max_tokens (5,000) are a valid request; a rule at 'high' kept
    the budget but raised max_tokens to 7,096, so a 6,000-token budget refused the call."""
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "high"}]},
                                     "context": {"enabled": False},
                                     "routing": {"budgets": [{"name": "kept-thinking", "tokens": 6000}]}})
    thinking = {"type": "enabled", "budget_tokens": 3000}
    body = _sent(pipeline.completion, "anthropic/claude-sonnet-4-5", thinking=thinking, max_tokens=5000)
    assert (body["thinking"], body["max_tokens"]) == (thinking, 5000)


@pytest.mark.parametrize(("words", "thinking"), [(150_000, True), (170_000, False)])
def test_a_rule_switches_anthropic_thinking_on_only_where_the_window_holds_it_beside_the_prompt(words, thinking) -> None:
    """Anthropic refuses a prompt plus max_tokens over the window with thinking on: near the window a rule's
    thinking (2,048 + 4,096 for the answer) was sent past it, where the same call without the rule is not."""
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "low"}]},
                                     "context": {"enabled": False}})
    messages = [{"role": "user", "content": "word " * words}]
    body = _sent(pipeline.completion, "anthropic/claude-sonnet-4-5", messages)
    prompt = pipeline.state.tokens("anthropic/claude-sonnet-4-5", messages)
    if thinking:
        assert body["thinking"]["budget_tokens"] >= 1024
        assert prompt * 1.25 + body["max_tokens"] <= 200_000
    else:
        assert "thinking" not in body  # max_tokens as litellm sends it without the middleware
        config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "low"}]})
        call = Call.create("anthropic/claude-sonnet-4-5", messages, {}, AgentContext())
        planned = ReasoningPolicy(config)(Plan.from_call(call), pipeline.state)
        assert "thinking not switched on: the model's window leaves" in planned.decisions[-1].reason


def test_a_capping_rule_leaves_the_caller_s_own_thinking_without_max_tokens_as_a_direct_call_sends_it() -> None:
    """Near the window, the caller's own thinking (3,000, no max_tokens) under a rule at 'high' was
    lowered, or dropped, by the check meant for thinking a rule switches on."""
    pipeline = Pipeline.from_config({"reasoning": {"rules": [{"when": {}, "effort": "high"}]},
                                     "context": {"enabled": False}})
    thinking = {"type": "enabled", "budget_tokens": 3000}
    body = _sent(pipeline.completion, "anthropic/claude-sonnet-4-5", [{"role": "user", "content": "word " * 160_000}],
                 thinking=thinking)
    assert (body["thinking"], body["max_tokens"]) == (thinking, 3000 + 4096)


def test_a_session_budget_that_lowers_the_caller_s_thinking_keeps_its_max_tokens_and_says_why() -> None:
    config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "high"}], "session_budget_tokens": 5000})
    call = Call.create("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "fix it"}],
                       {"thinking": {"type": "enabled", "budget_tokens": 3000}, "max_tokens": 5000},
                       AgentContext(session_id="s"))
    planned = ReasoningPolicy(config)(Plan.from_call(call), PolicyState())
    assert planned.params["thinking"]["budget_tokens"] == 2048 and planned.params["max_tokens"] == 5000
    assert "session budget: 5000 reasoning tokens left" in planned.decisions[-1].reason


def test_a_rule_that_raises_the_caller_s_own_thinking_past_the_window_sends_the_caller_s_as_it_came() -> None:
    """review54b: a 'set' rule's 16,384-token budget over the caller's own 2,000 skipped the window check
    (the caller had sent thinking): prompt + max_tokens 202,488 on a 200,000-token window."""
    config = ReasoningConfig.model_validate({"rules": [{"when": {}, "effort": "high", "mode": "set"}]})
    asked = {"thinking": {"type": "enabled", "budget_tokens": 2000}, "max_tokens": 4000}
    call = Call.create("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "word " * 182_000}], asked,
                       AgentContext())
    planned = ReasoningPolicy(config)(Plan.from_call(call), PolicyState())
    assert (planned.params["thinking"], planned.params["max_tokens"]) == (asked["thinking"], 4000)
