"""Parameters fitted to the model each attempt goes to (issue 17): dropped or adapted with a
``params`` decision, read on the wire through the loopback capture server."""

from __future__ import annotations

from typing import Any

import pytest

from router_middleware import Pipeline, outcome

from .capture_server import capture_server

HI = [{"role": "user", "content": "hi"}]
PLAN_HIGH = {"reasoning": {"rules": [{"when": {"step_kind": ["plan"]}, "effort": "high"}]}, "context": {"enabled": False}}


def sent(pipeline: Pipeline, model: str, **params: Any) -> dict[str, Any]:
    """The body ``pipeline`` sends for ``model`` (the capture server answers 500, so the call fails)."""
    with capture_server() as (base, bodies):
        with pytest.raises(Exception) as failed:  # noqa: PT011 - any provider error: the body is what counts
            pipeline.completion(model=model, messages=HI, api_base=base, api_key="test-key", num_retries=0,
                                max_retries=0, **params)
    assert bodies, f"{model}: no request left ({failed.value!r})"
    return bodies[-1]


def test_issue_reproduction_o3_mini_with_a_reasoning_rule_drops_temperature() -> None:
    body = sent(Pipeline.from_config(PLAN_HIGH), "openai/o3-mini", temperature=0.2)
    assert "temperature" not in body and body["reasoning_effort"] == "high"


@pytest.mark.parametrize(("model", "effort", "expected"), [
    ("openai/o3-mini", "minimal", "low"),
    ("openai/o3-mini", "none", "low"),
    ("openai/o3-mini", "xhigh", "high"),
    ("openai/gpt-5-nano", "none", "minimal"),
    ("openai/gpt-5-nano", "xhigh", "high"),
    ("openai/gpt-5.1", "minimal", "low"),
])
def test_openai_effort_moves_to_the_nearest_level_and_temperature_is_dropped(model, effort, expected) -> None:
    body = sent(Pipeline(), model, reasoning_effort=effort, temperature=0.2, top_p=0.5)
    assert body["reasoning_effort"] == expected
    assert "temperature" not in body and "top_p" not in body


def test_gpt_5_1_keeps_temperature_and_top_p_while_reasoning_is_off() -> None:
    body = sent(Pipeline(), "openai/gpt-5.1", reasoning_effort="none", temperature=0.2, top_p=0.5)
    assert (body["reasoning_effort"], body["temperature"], body["top_p"]) == ("none", 0.2, 0.5)


def test_a_supported_param_is_passed_through_untouched() -> None:
    pipeline = Pipeline()
    body = sent(pipeline, "openai/gpt-4o-mini", temperature=0.2, top_p=0.5, presence_penalty=0.3)
    assert (body["temperature"], body["top_p"], body["presence_penalty"]) == (0.2, 0.5, 0.3)
    response = pipeline.completion(model="openai/gpt-4o-mini", messages=HI, temperature=0.2, mock_response="ok")
    assert not [d for d in outcome(response).plan.decisions if d.policy == "params"]


def test_anthropic_drops_temperature_and_top_k_with_thinking_and_keeps_them_without() -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    body = sent(Pipeline(), "anthropic/claude-sonnet-4-5", thinking=thinking, max_tokens=4096, temperature=0.2,
                top_p=0.5, top_k=5)
    assert body["thinking"] == thinking
    assert "temperature" not in body and "top_k" not in body and body["top_p"] == 0.95
    plain = sent(Pipeline(), "anthropic/claude-sonnet-4-5", max_tokens=256, temperature=0.2, top_k=5)
    assert (plain["temperature"], plain["top_k"]) == (0.2, 5)


def test_anthropic_drops_penalties_litellm_would_refuse() -> None:
    body = sent(Pipeline(), "anthropic/claude-sonnet-4-5", max_tokens=256, temperature=0.3, presence_penalty=0.5)
    assert "presence_penalty" not in body and body["temperature"] == 0.3


def test_gemini_xhigh_becomes_high_and_temperature_passes() -> None:
    body = sent(Pipeline(), "gemini/gemini-2.5-flash", reasoning_effort="xhigh", temperature=0.2)
    high = sent(Pipeline(), "gemini/gemini-2.5-flash", reasoning_effort="high", temperature=0.2)
    assert body["generationConfig"]["thinkingConfig"] == high["generationConfig"]["thinkingConfig"]
    assert body["generationConfig"]["temperature"] == 0.2


def test_openrouter_gets_the_callers_params_as_sent() -> None:
    body = sent(Pipeline(), "openrouter/openai/o3-mini", temperature=0.2, top_p=0.5)
    assert (body["temperature"], body["top_p"]) == (0.2, 0.5)  # OpenRouter drops what its provider lacks


def test_the_decision_names_the_param_the_model_and_what_was_done() -> None:
    pipeline = Pipeline.from_config(PLAN_HIGH)
    response = pipeline.completion(model="openai/o3-mini", messages=HI, temperature=0.2, mock_response="ok")
    decision = next(d for d in outcome(response).plan.decisions if d.policy == "params")
    assert decision.action == "drop"
    assert decision.reason == "temperature=0.2 dropped for openai/o3-mini: it takes only temperature=1"
    assert decision.attributes == {"param": "temperature", "model": "openai/o3-mini"}
    adapted = Pipeline().completion(model="openai/o3-mini", messages=HI, reasoning_effort="minimal",
                                    mock_response="ok")
    decision = next(d for d in outcome(adapted).plan.decisions if d.policy == "params")
    assert (decision.action, decision.reason) == ("adapt", "reasoning_effort='minimal' sent as 'low' to "
                                                  "openai/o3-mini: the nearest level it takes (low, medium, high)")


@pytest.mark.parametrize("order", [("claude", "o3"), ("o3", "claude")])
def test_each_fallback_target_gets_params_fitted_to_its_own_model(order, monkeypatch) -> None:
    monkeypatch.setenv("FIT_TEST_KEY", "test-key")
    with capture_server() as (base, bodies):
        pipeline = Pipeline.from_config({"context": {"enabled": False}, "cache": {"enabled": False}, "routing": {
            "deployments": {"claude": {"model": "anthropic/claude-sonnet-4-5", "api_base": base,
                                       "api_key_env": "FIT_TEST_KEY"},
                            "o3": {"model": "openai/o3-mini", "api_base": base, "api_key_env": "FIT_TEST_KEY"}},
            "aliases": {"pair": list(order)},
            "fallback": {"attempts_per_model": 1, "backoff_s": 0.0, "max_backoff_s": 0.0}}})
        with pytest.raises(Exception):  # noqa: B017, PT011 - both attempts reach the capture server's 500
            pipeline.completion(model="pair", messages=HI, temperature=0.2, max_tokens=256, num_retries=0,
                                max_retries=0)
    assert len(bodies) == 2
    by_model = {("o3" if "o3-mini" in str(b.get("model")) else "claude"): b for b in bodies}
    assert by_model["claude"]["temperature"] == 0.2
    assert "temperature" not in by_model["o3"]


def test_fit_is_pure_and_leaves_fitting_params_alone() -> None:
    from router_middleware.fit import ParamRules, fit

    rules = ParamRules(checked={"temperature": None}, supported=frozenset({"temperature"}))
    params = {"temperature": 0.2, "mock_response": "ok"}
    assert fit(params, rules) == (params, ())
    assert fit(params, ParamRules()) == (params, ())  # a model litellm cannot place: nothing checked


@pytest.mark.parametrize(("names", "kept"), [
    (["top_k"], {"top_k"}),
    (("top_k", "logprobs"), {"top_k", "logprobs"}),
    ("logprobs_top_k", set()),  # a string is read as litellm reads it: a set of characters, no names
    (None, set()),
])
def test_allowed_and_skipped_params_are_read_as_litellm_reads_them(names, kept) -> None:
    """``allowed_openai_params`` keeps a param litellm lists as unsupported, ``additional_drop_params``
    leaves its drop to litellm; litellm reads either only as a list of names."""
    from router_middleware.fit import ParamRules, fit

    rules = ParamRules(checked={"top_k": None, "logprobs": None}, supported=frozenset())
    for key in ("allowed_openai_params", "additional_drop_params"):
        out, changes = fit({"top_k": 5, "logprobs": True, key: names}, rules)
        assert {"top_k", "logprobs"} - {c.param for c in changes} == kept
        assert all(c.dropped for c in changes)


def test_n_answers_go_only_to_a_model_that_gives_several_and_are_never_cut_to_one(monkeypatch) -> None:
    """``n=2`` to a model that gives one answer a call (Anthropic): dropped, the caller got one
    answer where it asked for two (litellm refuses the call). An alias routes such a call only among
    its targets that take ``n``; a call naming such a model is refused by name, unless the caller
    lets litellm drop what the model does not take (``drop_params``, the call's or litellm's own). An
    alias none of whose targets takes ``n`` is routed as for one answer, then fitted the same way."""
    from router_middleware import RequestError

    messages = [{"role": "user", "content": "two names for a cat"}]
    p = Pipeline.from_config({"routing": {"aliases": {"pair": ["anthropic/claude-sonnet-4-5", "gpt-4o-mini"]}},
                              "cache": {"enabled": False}})
    answer = p.completion(model="pair", messages=messages, n=2, mock_response="Tom")
    assert len(answer.choices) == 2 and outcome(answer).model == "gpt-4o-mini"
    assert "claude-sonnet-4-5: gives one answer a call (n=2)" in outcome(answer).plan.decisions[0].attributes["considered"]
    with pytest.raises(RequestError, match=r"^n=2: anthropic/claude-sonnet-4-5 gives one answer a call"):
        p.completion(model="anthropic/claude-sonnet-4-5", messages=messages, n=2, mock_response="Tom")
    dropped = p.completion(model="anthropic/claude-sonnet-4-5", messages=messages, n=2, mock_response="Tom",
                           drop_params=True)
    assert len(dropped.choices) == 1
    claude = Pipeline.from_config({"routing": {"aliases": {"claude": ["anthropic/claude-sonnet-4-5"]}}})
    with pytest.raises(RequestError, match=r"^n=2: anthropic/claude-sonnet-4-5"):  # no target takes n: as litellm
        claude.completion(model="claude", messages=messages, n=2, mock_response="Tom")
    import litellm

    monkeypatch.setattr(litellm, "drop_params", True)  # litellm's own setting (the proxy's litellm_settings)
    assert len(claude.completion(model="claude", messages=messages, n=2, mock_response="Tom").choices) == 1
