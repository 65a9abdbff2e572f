"""Routing: aliases and strategies, constraints with explanations, fallbacks, retries, cooldowns."""

from __future__ import annotations

import asyncio
import re

import litellm
import pytest
from opentelemetry.trace import SpanKind, StatusCode

from router_middleware import (
    BudgetExceeded,
    ConfigError,
    MaxTokensError,
    Pipeline,
    RequestError,
    UnknownModelError,
    outcome,
)
from router_middleware.config import FallbackConfig
from router_middleware.routing.budgets import NO_APP
from router_middleware.routing.fallback import backoff, counts_toward_cooldown
from router_middleware.routing.policy import NoRouteError

CODER = ["anthropic/claude-sonnet-4-5", "gpt-5-mini", "deepseek/deepseek-chat"]
MESSAGES = [{"role": "user", "content": "Rename the variable x to count in utils.py"}]


def pipeline(**routing) -> Pipeline:
    config = {"routing": {"aliases": {"coder": CODER, "small": ["gpt-3.5-turbo", "gpt-4o-mini"],
                                      "cheap": ["deepseek/deepseek-chat"], "strong": ["anthropic/claude-sonnet-4-5"]},
                          "fallback": {"backoff_s": 0.0}, **routing},
              "context": {"enabled": False}, "cache": {"enabled": False}}
    return Pipeline.from_config(config)


def routed(p: Pipeline, model: str, messages=MESSAGES, **params):
    return p.plan(p.make_call(model, messages, {"session_id": "s"}, params))


def test_alias_order_and_floor_suffix() -> None:
    p = pipeline()
    plan = routed(p, "coder")
    assert plan.model == "anthropic/claude-sonnet-4-5" and plan.fallbacks == tuple(CODER[1:])
    floor = routed(p, "coder:floor")
    assert floor.model == "deepseek/deepseek-chat"  # cheapest for this request at catalog prices
    decision = floor.decisions[0]
    assert decision.policy == "routing" and decision.attributes["strategy"] == "price"
    assert "claude-sonnet-4-5: ranked lower" in decision.attributes["considered"]
    assert routed(p, "gpt-4o").model == "gpt-4o"  # a concrete model passes through


@pytest.mark.parametrize(("model", "strategy"), [("qwen2.5-coder:7b", "ordered"), ("qwen2.5-coder:7b:floor", "price"),
                                                 ("qwen2.5-coder:7b:nitro", "throughput")])
def test_an_alias_named_with_a_colon_takes_a_suffix(model: str, strategy: str) -> None:
    """``qwen2.5-coder:7b:floor`` is the alias ``qwen2.5-coder:7b`` by price. Before, it was split at the
    first colon: no alias ``qwen2.5-coder``, so the call went to litellm as the model of that name."""
    p = Pipeline.from_config({"routing": {"aliases": {"qwen2.5-coder:7b": ["gpt-4o", "gpt-4o-mini"]}}})
    plan = routed(p, model)
    assert plan.decisions[0].attributes["strategy"] == strategy
    assert plan.model == ("gpt-4o-mini" if strategy == "price" else "gpt-4o")


@pytest.mark.parametrize(("model", "hint"), [("coder:flor", "; did you mean ':floor'?"), ("coder:cheapest", "")])
def test_a_misspelled_alias_suffix_is_refused_naming_the_ones_there_are(model: str, hint: str) -> None:
    """Routed by the alias's default order instead, the caller would never learn it was not by price."""
    with pytest.raises(RequestError) as raised:
        pipeline().completion(model=model, messages=MESSAGES, mock_response="ok")
    assert str(raised.value) == (f"model {model!r}: an alias takes ':floor' (the cheapest target first) or ':nitro' "
                                 f"(the fastest first), not ':{model.partition(':')[2]}'{hint}")


def test_a_misspelled_provider_prefix_is_named_with_the_provider_meant() -> None:
    """Not "no 'provider/' prefix": there is one, and the model after it may be right."""
    p = Pipeline.from_config({"routing": {"deployments": {"d": {"model": "antropic/claude-sonnet-4-5"}}}})
    with pytest.raises(UnknownModelError) as raised:
        p.completion(model="opnai/gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert str(raised.value) == ("model 'opnai/gpt-4o-mini': litellm knows no provider 'opnai' (the part before '/'); "
                                 "did you mean 'openai/gpt-4o-mini'?")
    with pytest.raises(UnknownModelError, match=r"the model of routing.deployments.d: litellm knows no provider "
                                                r"'antropic' .*did you mean 'anthropic/claude-sonnet-4-5'\?$"):
        p.completion(model="d", messages=MESSAGES, mock_response="ok")


def test_auto_without_tiers_points_at_them() -> None:
    with pytest.raises(UnknownModelError, match=r"^model 'auto': 'auto' routes by difficulty over routing.tiers, "
                                                r"and none is configured"):
        pipeline().completion(model="auto", messages=MESSAGES, mock_response="ok")


def test_constraints_explain_every_rejection() -> None:
    p = pipeline(deny_providers=["anthropic"])
    big = [{"role": "user", "content": "word " * 20000}]
    plan = routed(p, "coder", big)
    attrs = plan.decisions[0].attributes
    assert plan.model == "gpt-5-mini"
    assert "provider anthropic denied" in attrs["considered"]
    assert routed(p, "small", big).model == "gpt-4o-mini"  # gpt-3.5-turbo's 16k window is too small
    with pytest.raises(NoRouteError) as error:
        routed(pipeline(deny_providers=["openai"]), "small", [{"role": "user", "content": "word " * 200000}])
    message = str(error.value)
    assert "no model of 'small' can serve this request" in message
    assert "gpt-3.5-turbo: provider openai denied" in message


def test_a_request_that_looks_too_big_for_every_window_is_sent_to_the_largest_the_provider_counts() -> None:
    """Not a 503 that clients retry on the middleware's estimate: sent directly, the provider would
    take it or answer its own 400 naming its count (then, as a context-window error, not retried)."""
    plan = routed(pipeline(), "small", [{"role": "user", "content": "word " * 200000}])
    assert plan.model == "gpt-4o-mini" and plan.fallbacks == ()
    decision = plan.decisions[0]
    assert re.match(r"the request looks too big for every candidate's window: gpt-4o-mini, the largest, is tried "
                    r"anyway \(the provider counts; request needs ~[\d,]+ tokens, window is 128,000\); ", decision.reason)
    considered = str(decision.attributes["considered"])
    assert "gpt-3.5-turbo: request needs ~" in considered and "window is 16,385" in considered


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
def test_a_smaller_window_is_not_tried_while_a_larger_one_refuses_only_the_request_s_cap(cap: str) -> None:
    """gpt-4o-mini (128k) holds the ~30k-token messages and refuses only the 100k cap; gpt-3.5-turbo
    (16k) holds neither. Sending the call to gpt-3.5-turbo as "the largest" (found by a routing
    trial) was a certain provider 400 named as the wrong fault: it is the request's, a 400 here."""
    big = [{"role": "user", "content": "word " * 30000}]
    with pytest.raises(MaxTokensError) as error:
        routed(pipeline(), "small", big, **{cap: 100_000})
    assert error.value.status_code == 400 and isinstance(error.value, NoRouteError)
    assert re.match(rf"{cap} 100,000 with the ~[\d,]+-token request exceeds the window of 128,000$",
                    error.value.rejections["gpt-4o-mini"])
    assert "window is 16,385" in error.value.rejections["gpt-3.5-turbo"]
    assert routed(pipeline(), "small", big, **{cap: 1_000}).model == "gpt-4o-mini"  # a cap it holds: served


def test_a_model_without_vision_is_skipped_only_when_the_request_has_an_image() -> None:
    p = Pipeline.from_config({"routing": {"aliases": {"eyes": ["azure/o3-mini", "gpt-4o-mini"]}},
                              "context": {"enabled": False}, "cache": {"enabled": False}})
    assert routed(p, "eyes").model == "azure/o3-mini"  # text only: the first candidate serves it
    picture = [{"role": "user", "content": [
        {"type": "text", "text": "What is on this screenshot?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    plan = routed(p, "eyes", picture)
    assert plan.model == "gpt-4o-mini"
    assert "azure/o3-mini: does not support images" in plan.decisions[0].attributes["considered"]


def long_history(turns: int, last: str = "and now?") -> list[dict[str, str]]:
    """A chat of ``turns`` exchanges of about 1,100 tokens each (gpt-4o's tokenizer), then ``last``."""
    history: list[dict[str, str]] = []
    for i in range(turns):
        history.append({"role": "user", "content": f"Question {i}. " + "We read the parser once more. " * 83})
        history.append({"role": "assistant", "content": f"Answer {i}. " + "The parser reads one token. " * 83})
    return [*history, {"role": "user", "content": last}]


def test_an_alias_judges_each_window_on_the_request_the_context_policy_would_send(monkeypatch) -> None:
    from router_middleware import tokens

    encoded: list[int] = []
    real = tokens.encoder_for

    def counting(model: str):
        encode = real(model)
        return lambda text: encoded.append(1) or encode(text)

    monkeypatch.setattr(tokens, "encoder_for", counting)
    p = Pipeline.from_config({"routing": {"aliases": {"big": ["gpt-4o", "gpt-4o-mini"]}},
                              "cache": {"enabled": False}})
    history = long_history(118)
    direct = p.plan(p.make_call("gpt-4o", history, None, {}))
    assert 128_000 < p.state.tokens("gpt-4o", history) < 130_000
    assert [d.action for d in direct.decisions] == ["trim"]  # named directly, the history is trimmed to fit
    encoded.clear()
    plan = p.plan(p.make_call("big", history, None, {}))  # was NoRouteError (~129,000 tokens vs 128,000)
    assert plan.model == "gpt-4o" and plan.fallbacks == ("gpt-4o-mini",)
    assert [(d.policy, d.action) for d in plan.decisions] == [("routing", "route"), ("window", "trim")]
    assert "gpt-4o-mini: ranked lower" in plan.decisions[0].attributes["considered"]
    assert len(encoded) <= 2  # a candidate's fit reuses the counts: no message of the history counted again
    response = p.completion(model="big", messages=history, mock_response="ok")
    assert outcome(response).model == "gpt-4o" and outcome(response).usage.input_tokens < 20_000


def test_a_candidate_still_over_its_window_once_trimmed_is_skipped_naming_both_numbers() -> None:
    p = Pipeline.from_config({"routing": {"aliases": {"mixed": ["gpt-3.5-turbo", "gpt-4o"],
                                                      "small": ["gpt-3.5-turbo"]}},
                              "cache": {"enabled": False}})
    history = long_history(20, last="Summarize this log: " + "error at line 7. " * 4000)  # ~20k-token last turn
    plan = p.plan(p.make_call("mixed", history, None, {}))
    assert plan.model == "gpt-4o"
    considered = str(plan.decisions[0].attributes["considered"])
    assert "gpt-3.5-turbo: request needs ~" in considered and "tokens after the context policy trimmed it (~" in \
        considered and "before), window is 16,385" in considered
    alone = p.plan(p.make_call("small", history, None, {}))  # the only candidate: tried anyway
    assert alone.model == "gpt-3.5-turbo" and "tried anyway" in alone.decisions[0].reason
    why = alone.decisions[0].reason.partition("the provider counts; ")[2].rpartition("); ")[0]
    trimmed, before = (int(n.replace(",", "")) for n in re.findall(r"~([\d,]+)", why))
    assert 16_385 < trimmed < before and why.endswith("window is 16,385")


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_a_max_tokens_no_candidate_can_produce_is_the_request_s_400_naming_it(param: str) -> None:
    """Not a 503 NoRouteError (which clients retry) saying only that the request needs ~1e9 tokens."""
    p = pipeline()
    with pytest.raises(RequestError) as raised:
        routed(p, "coder", **{param: 10**9})
    assert isinstance(raised.value, NoRouteError) and raised.value.status_code == 400
    assert set(raised.value.rejections) == set(CODER)
    assert re.fullmatch(rf"{param} 1,000,000,000 with the ~\d+-token request exceeds the window of 200,000",
                        raised.value.rejections["anthropic/claude-sonnet-4-5"])
    plan = routed(p, "coder", **{param: 100_000})  # a catalog's output limit is not judged: the provider's word
    assert plan.model == "anthropic/claude-sonnet-4-5"


def test_a_max_tokens_a_window_cannot_hold_with_the_request_is_named_and_a_400() -> None:
    p = Pipeline.from_config({"models": {"acme/small": {"max_input_tokens": 1000}},  # no output limit known
                              "routing": {"aliases": {"tiny": ["acme/small"]}}, "cache": {"enabled": False}})
    with pytest.raises(NoRouteError) as raised:
        routed(p, "tiny", max_tokens=5000)
    assert raised.value.status_code == 400 and isinstance(raised.value, RequestError)
    assert re.fullmatch(r"max_tokens 5,000 with the ~\d+-token request exceeds the window of 1,000",
                        raised.value.rejections["acme/small"])
    plan = routed(p, "tiny", [{"role": "user", "content": "word " * 2000}], max_tokens=10)
    assert plan.model == "acme/small" and "tried anyway" in plan.decisions[0].reason  # the messages: not max_tokens


def test_difficulty_tiers_via_auto() -> None:
    p = pipeline(tiers=[{"max_score": 0.3, "alias": "cheap"}, {"max_score": 1.0, "alias": "strong"}])
    assert routed(p, "auto", [{"role": "user", "content": "hi"}]).model == "deepseek/deepseek-chat"
    hard = "Prove step by step why this deadlocks and design a fix:\nTraceback (most recent call last):\n" \
           + "```python\ndef run():\n    return lock.acquire()\n```\n" * 5
    plan = routed(p, "auto", [{"role": "user", "content": hard}])
    assert plan.model == "anthropic/claude-sonnet-4-5" and "tier strong" in plan.decisions[0].reason
    assert "above every tier" not in plan.decisions[0].reason
    short = pipeline(tiers=[{"max_score": 0.3, "alias": "cheap"}])  # no tier up to 1.0: the last takes the rest
    reason = routed(short, "auto", [{"role": "user", "content": hard}]).decisions[0].reason
    assert re.match(r"difficulty 0\.\d\d -> tier cheap \(above every tier's max_score: the last\)", reason)


def test_auto_takes_a_suffix_as_an_alias_does() -> None:
    """``auto:floor`` was accepted and routed as ``auto``: the tier alias's own order won over the suffix."""
    p = pipeline(tiers=[{"max_score": 1.0, "alias": "small"}])
    assert routed(p, "auto").model == "gpt-3.5-turbo"
    plan = routed(p, "auto:floor")
    assert plan.model == "gpt-4o-mini" and "price strategy chose gpt-4o-mini" in plan.decisions[0].reason


def test_bad_routing_config() -> None:
    with pytest.raises(ConfigError, match="tier alias 'nope'"):
        Pipeline.from_config({"routing": {"aliases": {"a": ["gpt-4o"]}, "tiers": [{"max_score": 1, "alias": "nope"}]}})


@pytest.mark.parametrize(("routing", "problem"), [
    # every call to 'a' raised IndexError inside the routing policy
    ({"aliases": {"a": ["gpt-4o"]}, "strategy": {"a": "difficulty"}},
     "strategy.a: 'difficulty' routes by 'tiers', and none are set"),
    # 'b' could never be chosen: the first tier a score fits wins
    ({"aliases": {"a": ["gpt-4o"], "b": ["gpt-4o-mini"]},
      "tiers": [{"max_score": 1.0, "alias": "a"}, {"max_score": 0.3, "alias": "b"}]},
     "'b' (max_score 0.3) follows 'a' (max_score 1.0), so no score would reach it"),
])
def test_a_route_no_call_could_take_is_refused_at_load(routing, problem) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        Pipeline.from_config({"routing": routing})


def test_a_fitted_scorer_s_tiers_need_no_increasing_max_score() -> None:
    """The fitted scorer scores each tier on its own (the chance its model is not good enough)."""
    Pipeline.from_config({"routing": {"aliases": {"cheap": ["gpt-4o-mini"], "strong": ["gpt-4-1106-preview"]},
                                      "scorer": {"fitted": "bundled", "strength": {"gpt-4o-mini": 0.6}},
                                      "tiers": [{"max_score": 0.5, "alias": "cheap"},
                                                {"max_score": 0.45, "alias": "strong"}]}})


def test_an_alias_or_deployment_named_with_a_colon_is_called_by_its_name() -> None:
    """A call to 'coder:fast' was the alias 'coder' with the suffix ':fast' (an unknown model, or
    'did you mean coder:floor:floor?'); a deployment named after its model id ('qwen2.5-coder:7b') worked
    only as an alias's target."""
    p = pipeline(aliases={"coder:fast": ["gpt-4o-mini"], "pool": ["qwen2.5-coder:7b"]},
                 deployments={"qwen2.5-coder:7b": {"model": "ollama/qwen2.5-coder:7b"}})
    assert routed(p, "coder:fast").model == "gpt-4o-mini"
    assert routed(p, "qwen2.5-coder:7b").deployment == "qwen2.5-coder:7b"
    assert routed(p, "pool").deployment == "qwen2.5-coder:7b"
    assert p.config.routing.baseline_target("coder:fast") == "gpt-4o-mini"


def failing(monkeypatch, failures: dict[str, list[Exception]]) -> list[str]:
    """litellm.completion that raises the scripted errors per model, then answers with mock_response."""
    calls: list[str] = []
    real = litellm.completion

    def fake(**kwargs):
        calls.append(kwargs["model"])
        queue = failures.get(kwargs["model"], [])
        if queue:
            raise queue.pop(0)
        return real(**{**kwargs, "mock_response": kwargs.get("mock_response") or "ok"})

    monkeypatch.setattr(litellm, "completion", fake)
    return calls


def rate_limit(model: str) -> Exception:
    return litellm.exceptions.RateLimitError("slow down", "x", model)


def test_fallback_on_rate_limit_with_spans_per_attempt(monkeypatch, span_exporter) -> None:
    calls = failing(monkeypatch, {"anthropic/claude-sonnet-4-5": [rate_limit("c")]})
    response = pipeline().completion(model="coder", messages=MESSAGES)
    assert calls == ["anthropic/claude-sonnet-4-5", "gpt-5-mini"]
    result = outcome(response)
    assert result.model == "gpt-5-mini"
    assert any(d.action == "fallback" for d in result.plan.decisions)
    clients = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [s.name for s in clients] == ["chat anthropic/claude-sonnet-4-5", "chat gpt-5-mini"]
    assert clients[0].status.status_code == StatusCode.ERROR and clients[0].attributes["error.type"] == "RateLimitError"
    (route,) = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL]
    assert route.attributes["router_middleware.fallback.depth"] == 1
    assert route.attributes["router_middleware.chosen_model"] == "gpt-5-mini"


def test_retries_same_model_first(monkeypatch) -> None:
    calls = failing(monkeypatch, {"anthropic/claude-sonnet-4-5": [rate_limit("c")]})
    pipeline(fallback={"attempts_per_model": 2, "backoff_s": 0.0}).completion(model="coder", messages=MESSAGES)
    assert calls == ["anthropic/claude-sonnet-4-5", "anthropic/claude-sonnet-4-5"]


def test_non_retryable_errors_fail_at_once(monkeypatch) -> None:
    auth = litellm.exceptions.AuthenticationError("bad key", "anthropic", "claude")
    calls = failing(monkeypatch, {"anthropic/claude-sonnet-4-5": [auth]})
    with pytest.raises(litellm.exceptions.AuthenticationError):
        pipeline().completion(model="coder", messages=MESSAGES)
    assert calls == ["anthropic/claude-sonnet-4-5"]


def test_context_window_error_moves_to_a_larger_window(monkeypatch) -> None:
    too_long = litellm.exceptions.ContextWindowExceededError("too long", "gpt-4o-mini", "openai")
    p = pipeline(aliases={"mixed": ["gpt-4o-mini", "gpt-3.5-turbo", "gpt-5-mini"]})
    calls = failing(monkeypatch, {"gpt-4o-mini": [too_long]})
    p.completion(model="mixed", messages=MESSAGES)
    assert calls == ["gpt-4o-mini", "gpt-5-mini"]  # 16k-window gpt-3.5-turbo skipped


def test_all_attempts_fail(monkeypatch) -> None:
    failing(monkeypatch, {m: [rate_limit(m)] for m in CODER})
    with pytest.raises(litellm.exceptions.RateLimitError):
        pipeline().completion(model="coder", messages=MESSAGES)


def test_stream_fails_over_before_the_first_chunk(monkeypatch) -> None:
    calls = failing(monkeypatch, {"anthropic/claude-sonnet-4-5": [litellm.exceptions.ServiceUnavailableError(
        "down", "anthropic", "claude")]})
    stream = pipeline().completion(model="coder", messages=MESSAGES, stream=True, mock_response="a b c")
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "a b c"
    assert calls[:2] == ["anthropic/claude-sonnet-4-5", "gpt-5-mini"]
    assert outcome(stream).model == "gpt-5-mini"


async def test_async_fallback(monkeypatch) -> None:
    real = litellm.acompletion
    calls = []

    async def fake(**kwargs):
        calls.append(kwargs["model"])
        if len(calls) == 1:
            raise rate_limit("c")
        return await real(**{**kwargs, "mock_response": "ok"})

    monkeypatch.setattr(litellm, "acompletion", fake)
    response = await pipeline().acompletion(model="coder", messages=MESSAGES)
    assert calls == ["anthropic/claude-sonnet-4-5", "gpt-5-mini"] and outcome(response).model == "gpt-5-mini"


def test_cooldown_skips_a_failing_model_then_probes(monkeypatch) -> None:
    import time

    p = pipeline(cooldown={"failures": 2, "window_s": 60, "cooldown_s": 0.3})
    calls = failing(monkeypatch, {"anthropic/claude-sonnet-4-5": [rate_limit("c"), rate_limit("c")]})
    p.completion(model="coder", messages=MESSAGES)
    p.completion(model="coder", messages=MESSAGES)  # second failure opens the circuit
    calls.clear()
    plan = routed(p, "coder")
    assert plan.model == "gpt-5-mini"
    assert "claude-sonnet-4-5: cooling down" in plan.decisions[0].attributes["considered"]
    assert plan.decisions[0].attributes["considered"].endswith("after repeated failures: a last resort")
    assert plan.fallbacks[-1] == "anthropic/claude-sonnet-4-5"  # tried when the others failed
    time.sleep(0.35)
    p.completion(model="coder", messages=MESSAGES)  # half-open: the probe goes to the recovered model
    assert calls == ["anthropic/claude-sonnet-4-5"]


@pytest.mark.parametrize("asynchronous", [False, True])
@pytest.mark.parametrize(("first", "broken"), [
    ("anthropic/claude-sonnet-4-5", {"tools": [{"function": {"name": "f"}}]}),
    ("gemini/gemini-2.5-flash", {"thinking": "on"}),
], ids=["Anthropic, a tool without type", "Gemini, thinking='on'"])
def test_a_request_litellm_cannot_build_for_a_target_moves_on_and_counts_nothing(first, broken, asynchronous) -> None:
    """litellm breaks building an Anthropic request with a tool without ``type``, or a Gemini one with
    ``thinking="on"`` (a Python error it reports as an ``APIConnectionError``, a 500), before sending
    anything: a trial saw three such calls cool a healthy target down for every caller. Now the call
    moves on to its next target as for a missing key, nothing is counted, and a well-formed call goes
    to that target again; a call with no target left gets litellm's own error, as a direct call does."""
    p = pipeline(aliases={"coder": [first, "gpt-5-mini"]}, cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    send = (lambda **kw: asyncio.run(p.acompletion(**kw))) if asynchronous else (lambda **kw: p.completion(**kw))
    for _ in range(3):
        response = send(model="coder", messages=MESSAGES, mock_response="ok", **broken)
        assert outcome(response).model == "gpt-5-mini"
        fallback = [d for d in outcome(response).plan.decisions if d.action == "fallback"]
        assert len(fallback) == 1 and fallback[0].reason.startswith(
            f"{first} skipped: litellm could not build the request for it (")
    answered = first.split("/")[1]
    assert outcome(send(model="coder", messages=MESSAGES, mock_response="ok")).model == answered
    with pytest.raises(litellm.APIConnectionError) as direct:
        litellm.completion(model=first, messages=MESSAGES, mock_response="ok", **broken)
    with pytest.raises(litellm.APIConnectionError) as routed_alone:
        send(model=first, messages=MESSAGES, mock_response="ok", **broken)
    assert str(routed_alone.value).split("\n")[0] == str(direct.value).split("\n")[0]
    assert outcome(send(model="coder", messages=MESSAGES, mock_response="ok")).model == answered


def test_an_error_litellm_raises_reading_an_answer_still_counts_toward_cooldown() -> None:
    """Only an error raised building the request is the request's: a Python error litellm raised
    reading a provider's answer (``transform_response``) is the provider's, and counts."""
    from router_middleware.wire import unbuilt

    def transform_response() -> None:
        raise KeyError("choices")

    def transform_google_generate_content_to_openai_model_response() -> None:  # how Gemini's answer is read
        raise TypeError("'NoneType' object is not subscriptable")

    def get_optional_params() -> None:
        raise KeyError("type")

    def wrapped(fn) -> BaseException:
        try:
            try:
                fn()
            except (KeyError, TypeError) as exc:
                raise litellm.APIConnectionError(str(exc), "anthropic", "claude-sonnet-4-5") from exc
        except litellm.APIConnectionError as exc:
            return exc
        raise AssertionError("not raised")

    assert unbuilt(wrapped(get_optional_params)) and not counts_toward_cooldown(wrapped(get_optional_params))
    assert not unbuilt(wrapped(transform_response)) and counts_toward_cooldown(wrapped(transform_response))
    read = wrapped(transform_google_generate_content_to_openai_model_response)
    assert not unbuilt(read) and counts_toward_cooldown(read)  # a review: Gemini's reader was taken for a build
    assert not unbuilt(litellm.APIConnectionError("Connection refused", "anthropic", "claude-sonnet-4-5"))


def test_a_cancellation_says_nothing_of_a_target_s_health() -> None:
    """A caller that cancels its call, or a proxy client that leaves mid-stream, is no failure of the
    target: neither counts toward its cooldown (a timeout, the provider's slowness, does)."""
    from router_middleware.litellm import ClientDisconnected

    assert not counts_toward_cooldown(asyncio.CancelledError())
    assert not counts_toward_cooldown(ClientDisconnected())
    assert counts_toward_cooldown(TimeoutError()) and counts_toward_cooldown(litellm.Timeout("slow", "m", "p"))
    from router_middleware import MessageError

    assert not counts_toward_cooldown(MessageError("a RoutedChatModel's pipeline refused its messages"))


def test_backoff_honours_retry_after_and_jitters() -> None:
    config = FallbackConfig(backoff_s=0.5, max_backoff_s=8)

    class Limited(Exception):
        litellm_response_headers = {"retry-after": "3"}

    assert backoff(0, config, Limited()) == 3.0
    delays = [backoff(3, config, Exception()) for _ in range(50)]
    assert all(0 <= d <= 4.0 for d in delays) and len(set(delays)) > 1


def test_nitro_orders_by_observed_throughput() -> None:
    p = pipeline()
    p.store.set("tps:deepseek/deepseek-chat", b"120.0")
    p.store.set("tps:gpt-5-mini", b"40.0")
    assert routed(p, "coder:nitro").model == "deepseek/deepseek-chat"


def test_latency_strategy_uses_observed_averages() -> None:
    p = pipeline(strategy={"coder": "latency"})
    p.store.set("lat:gpt-5-mini", b"0.4")
    p.store.set("lat:anthropic/claude-sonnet-4-5", b"1.2")
    plan = routed(p, "coder")
    assert plan.model == "gpt-5-mini"
    assert plan.fallbacks == ("anthropic/claude-sonnet-4-5", "deepseek/deepseek-chat")  # unknown last


def test_successful_calls_feed_the_averages() -> None:
    p = pipeline()
    for _ in p.completion(model="coder", messages=MESSAGES, stream=True, mock_response="a b c"):
        pass
    assert p.state.latency.get("anthropic/claude-sonnet-4-5") is None  # mock usage is not provider-reported
    p.store.add_many([], averages=[("lat:x", 1.0, 0.3, None)])
    p.store.add_many([], averages=[("lat:x", 2.0, 0.3, None)])
    assert p.state.latency["x"] == pytest.approx(0.3 * 2.0 + 0.7 * 1.0)


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_a_fallback_s_speed_is_its_own_not_its_failed_predecessor_s(stream: bool, monkeypatch) -> None:
    """A target that answered after another failed slowly was timed from the call's start: its latency
    average took the failed attempt's 0.6 s, so a latency or :nitro route ranked the healthy target
    low, and its span's time to first chunk exceeded the span's own duration."""
    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("SCRIPTED_KEY", "x")
    with scripted_upstream(status=500, delay_s=0.6) as (slow, _), scripted_upstream() as (good, _):
        p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
            "deployments": {name: {"model": "openai/gpt-4o-mini", "api_base": base, "api_key_env": "SCRIPTED_KEY"}
                            for name, base in (("slow", slow), ("good", good))},
            "aliases": {"a": ["slow", "good"]}, "fallback": {"backoff_s": 0.01, "max_backoff_s": 0.02}}})
        response = p.completion(model="a", messages=MESSAGES, stream=stream)
        if stream:
            for _ in response:
                pass
        answered = outcome(response)
    assert answered.plan.deployment == "good" and answered.usage.source == "provider"
    assert answered.latency_s is not None and answered.latency_s < 0.5
    if stream:
        assert answered.time_to_first_token_s is not None and answered.time_to_first_token_s < 0.5
    assert p.state.latency["good"] < 0.5


def test_weighted_spreads_load_by_weight() -> None:
    import time as clock

    p = pipeline(strategy={"coder": "weighted"},
                 weights={"anthropic/claude-sonnet-4-5": 3, "gpt-5-mini": 1, "deepseek/deepseek-chat": 0})
    picks = []
    for i in range(400):
        call = p.make_call("coder", [*MESSAGES] * (1 + i % 3), {"session_id": f"s{i}"}, {})
        picks.append(p.plan(call).model)
        clock.sleep(0)
    share = picks.count("anthropic/claude-sonnet-4-5") / len(picks)
    assert 0.65 < share < 0.85 and "deepseek/deepseek-chat" not in picks


@pytest.mark.parametrize(("requested", "config", "says", "suggests"), [
    ("gpt-4o-minii", {}, "model 'gpt-4o-minii': litellm knows no provider for it (not in its model list, no "
                         "'provider/' prefix), and the config has no alias or deployment of that name", "gpt-4o-mini"),
    ("codr:floor", {"aliases": {"coder": ["gpt-4o"]}},
     "model 'codr:floor': ':floor' picks among the models of an alias of routing.aliases, and 'codr' is none "
     "(the aliases are 'coder')", "coder:floor"),
    ("gpt-4o-mini:nitro", {}, "'gpt-4o-mini' is none (none is configured)", None),
    ("coder", {"aliases": {"coder": ["gpt-4o-minii"]}}, "model 'gpt-4o-minii': the last target of "
                                                        "routing.aliases.coder", "gpt-4o-mini"),
    ("coder", {"aliases": {"coder": ["gpt-4o"], "cheap": ["gpt-4o-minii"]},  # a soft limit sent it to cheap
               "budgets": [{"name": "b", "usd": 1, "soft": 0.5, "downgrade_to": "cheap"}]},
     "the last target of routing.aliases.cheap", "gpt-4o-mini"),
    ("auto", {"aliases": {"small": ["gpt-4o-minii"], "big": ["gpt-4o"]},
              "tiers": [{"max_score": 0.5, "alias": "small"}, {"max_score": 1.0, "alias": "big"}]},
     "the last target of routing.aliases.small", "gpt-4o-mini"),
    ("local", {"deployments": {"local": {"model": "my-llama", "api_base": "http://127.0.0.1:1/v1"}}},
     "model 'my-llama': the model of routing.deployments.local: litellm knows no provider for it", None),
])
def test_an_unknown_model_error_says_where_the_name_came_from_and_what_is_close(requested, config, says,
                                                                                suggests) -> None:
    p = Pipeline.from_config({"routing": config, "cache": {"enabled": False}, "context": {"enabled": False}})
    if config.get("budgets"):
        p.store.incr(f"budget:b:usd:{NO_APP}:0", 0.9)  # past the soft limit
    with pytest.raises(UnknownModelError) as raised:
        p.completion(model=requested, messages=MESSAGES, mock_response="ok")
    assert says in str(raised.value)
    assert (raised.value.suggestions[0] if raised.value.suggestions else None) == suggests


def test_an_unknown_model_in_the_call_s_fallbacks_is_named_as_one(monkeypatch) -> None:
    """It was said to be missing from the config, which the caller's own ``fallbacks=`` never came from."""
    failing(monkeypatch, {"gpt-4o-mini": [litellm.InternalServerError("down", "openai", "gpt-4o-mini")]})
    p = Pipeline.from_config({"cache": {"enabled": False}, "context": {"enabled": False}})
    with pytest.raises(UnknownModelError) as raised:
        p.completion(model="gpt-4o-mini", messages=MESSAGES, fallbacks=["gpt-4.1-nanoo"])
    assert "model 'gpt-4.1-nanoo': a model of the call's fallbacks=: litellm knows no provider" in str(raised.value)
    assert raised.value.suggestions[0] == "gpt-4.1-nano"


def test_a_deployment_is_called_by_its_name_without_any_alias() -> None:
    p = Pipeline.from_config({"routing": {"deployments": {"local": {
        "model": "openai/my-llama", "api_base": "http://127.0.0.1:1/v1"}}}, "context": {"enabled": False}})
    plan = routed(p, "local")
    assert (plan.model, plan.deployment) == ("openai/my-llama", "local")
    assert p.request(plan)["api_base"] == "http://127.0.0.1:1/v1"


# Input-cheap, output-dear vs the reverse: which is cheaper for a ~10k-token request turns on the output.
_PRICED = {"gpt-4o-mini": {"input_per_mtok": 0.1, "output_per_mtok": 10.0},
           "gpt-3.5-turbo": {"input_per_mtok": 1.0, "output_per_mtok": 1.0}}
_LONG = [{"role": "user", "content": "word " * 10_000}]


@pytest.mark.parametrize(("params", "routing", "cheapest"), [
    ({}, {}, "gpt-4o-mini"),  # 512 tokens out: the cheap input wins
    ({"max_tokens": 4000}, {}, "gpt-3.5-turbo"),  # 4,000 out: the cheap output wins
    ({"max_completion_tokens": 4000}, {}, "gpt-3.5-turbo"),  # OpenAI's newer name for the same cap
    ({}, {"default_output_tokens": 4000}, "gpt-3.5-turbo"),  # the config's expected output, without a cap
])
def test_floor_prices_each_candidate_at_the_output_the_request_expects(params, routing, cheapest) -> None:
    p = Pipeline.from_config({"models": _PRICED, "context": {"enabled": False}, "cache": {"enabled": False},
                              "routing": {"aliases": {"pair": ["gpt-4o-mini", "gpt-3.5-turbo"]}, **routing}})
    assert routed(p, "pair:floor", _LONG, **params).model == cheapest


def test_a_token_limit_judges_a_candidate_with_max_completion_tokens_too() -> None:
    p = Pipeline.from_config({"context": {"enabled": False}, "cache": {"enabled": False},
                              "routing": {"aliases": {"pair": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                          "limits": {"gpt-4o-mini": {"tpm": 5000}}}})
    for cap in ({"max_tokens": 8000}, {"max_completion_tokens": 8000}):
        plan = routed(p, "pair", **cap)
        assert plan.model == "gpt-3.5-turbo", cap
        assert "gpt-4o-mini: " in plan.decisions[0].attributes["considered"]


def test_the_routing_baseline_is_what_the_call_would_go_to_without_routing() -> None:
    """``saved_routing_usd`` is measured against it: an alias's first target, the top tier's for
    ``auto`` and for an alias whose strategy is ``difficulty`` (unless a suffix sets another), else the
    name itself."""
    from router_middleware.config import RoutingConfig

    routing = RoutingConfig(aliases={"cheap": ["gpt-4o-mini"], "strong": ["gpt-4o", "gpt-4.1"],
                                     "coder": ["gpt-4.1-mini", "gpt-4o"]},
                            strategy={"coder": "difficulty"},
                            tiers=[{"max_score": 0.5, "alias": "cheap"}, {"max_score": 1.0, "alias": "strong"}])
    assert [routing.baseline_target(name) for name in ("auto", "coder", "coder:floor", "strong:nitro", "gpt-4o-mini",
                                                        "ollama/llama3:8b")] == \
        ["gpt-4o", "gpt-4o", "gpt-4.1-mini", "gpt-4o", "gpt-4o-mini", "ollama/llama3:8b"]


def test_a_request_too_large_for_a_target_does_not_cool_it_down_for_everyone(monkeypatch) -> None:
    """litellm raises an HTTP 413 as a bare APIError, which counted toward the target's cooldown: three
    oversized requests from one caller sent every other caller's calls elsewhere for 30 s."""
    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("SCRIPTED_KEY", "x")
    with scripted_upstream(status=413) as (small, seen):
        p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {
            "deployments": {"small": {"model": "openai/gpt-4o-mini", "api_base": small, "api_key_env": "SCRIPTED_KEY"}},
            "aliases": {"a": ["small"]}, "cooldown": {"failures": 2}}})
        for _ in range(4):
            with pytest.raises(litellm.APIError) as raised:
                p.completion(model="a", messages=MESSAGES)
            assert raised.value.status_code == 413
    assert len(seen) == 4 and p.state.cooldowns.get("small") is None  # each call sent: none cooled it down


def test_a_budget_that_refuses_a_fallback_says_which_target_and_what_came_before(monkeypatch) -> None:
    """The refusal named neither the fallback whose estimate it quotes nor the first target's failure."""
    failing(monkeypatch, {"gpt-4o-mini": [litellm.RateLimitError("slow down", "openai", "gpt-4o-mini")]})
    p = Pipeline.from_config({"app": "a", "cache": {"enabled": False}, "context": {"enabled": False},
                              "routing": {"aliases": {"m": ["gpt-4o-mini", "gpt-4o"]}, "fallback": {"backoff_s": 0},
                                          "budgets": [{"name": "fallback-note", "usd": 0.003}]}})
    with pytest.raises(BudgetExceeded) as raised:
        p.completion(model="m", messages=MESSAGES, max_tokens=500)
    assert raised.value.__notes__ == ["router-middleware: gpt-4o-mini: RateLimitError; then the budget could not "
                                      "hold gpt-4o, the estimate above"]


def test_a_name_standing_for_another_is_passed_over_while_that_one_cools_down_and_takes_its_quota() -> None:
    """``Engine.serve``'s groups (the LiteLLM proxy's ``model_group_alias``: ``opus`` stands for
    ``claude``): an alias listing ``opus`` moves on while ``claude`` cools down, keeping ``opus`` as a
    last resort, and tries it anyway when it is the only target (review58: refused with a 503
    before); a call to ``opus`` also counts against ``claude``'s quota."""
    import time

    from router_middleware.routing.quotas import Quota, quotas_for

    p = pipeline(aliases={"coder": ["opus", "gpt-4o-mini"], "alone": ["opus"]}, limits={"claude": {"rpm": 1}})
    opus = "anthropic/claude-3-opus-20240229"
    p.serve({"opus": opus, "claude": opus})
    assert routed(p, "coder").deployment == "opus"
    p.store.set("cooldown:claude", repr(time.time() + 30).encode(), ttl_s=30)
    assert routed(p, "coder").deployment == "opus"  # not told opus stands for claude
    p.serve({"opus": opus, "claude": opus}, groups={"opus": "claude"})
    plan = routed(p, "coder")
    assert plan.model == "gpt-4o-mini" and plan.fallbacks == ("opus",)
    assert "opus: claude cooling down for" in plan.decisions[0].attributes["considered"]
    assert plan.decisions[0].attributes["last_resort"] == "opus"
    alone = routed(p, "alone")
    assert alone.deployment == "opus" and "opus is tried anyway (its cooldown ends first" in alone.decisions[0].reason
    config = p.config.routing
    assert quotas_for("opus", opus, config, p.state.groups.get("opus")) == (Quota("claude", config.limits["claude"]),)
    assert quotas_for("opus", opus, config) == ()


@pytest.mark.parametrize(("alias", "group"), [("opus", "claude"), ("opus: eu", "claude; eu")])
def test_a_name_standing_for_another_shares_its_half_open_probe(monkeypatch, alias, group) -> None:
    """review58 #3: once ``claude``'s cooldown has ended, a call through ``opus`` (standing for it)
    is half-open too and claims ``claude``'s one probe: it moves on while another call probes, its
    success closes ``claude``'s circuit, and its failure opens it again at once. Served names are the
    proxy's own: ``"opus: eu"`` and ``"claude; eu"`` work as well (review59b: a call failed, or the
    alias claimed its own probe, where the route's text was parsed)."""
    import time

    from router_middleware.bookkeeping import health
    from router_middleware.bookkeeping.keys import PROBE

    opus = "anthropic/claude-3-opus-20240229"
    p = pipeline(aliases={"coder": [alias, "gpt-4o-mini"]}, cooldown={"failures": 3, "window_s": 60, "cooldown_s": 60})
    p.serve({alias: opus, group: opus}, groups={alias: group})
    calls = failing(monkeypatch, {opus: [rate_limit("opus")]})

    def cooled_off() -> None:  # claude's cooldown has just ended: half-open
        p.store.set(f"cooldown:{group}", repr(time.time() - 1).encode(), ttl_s=60)

    cooled_off()
    assert routed(p, "coder").decisions[0].attributes["half_open"] == alias
    assert p.store.add_within([], (), [health.probe_claim(health.Probe(group, b"another call"), 30.0)]) is None
    p.completion(model="coder", messages=MESSAGES)
    assert calls == ["gpt-4o-mini"]  # another call probes claude: opus is passed over
    p.store.delete(PROBE + group)
    calls.clear()
    p.completion(model="coder", messages=MESSAGES)  # the probe, through opus, fails: claude opens again
    assert calls == [opus, "gpt-4o-mini"] and float(p.store.get(f"cooldown:{group}")) > time.time() + 50
    assert p.store.get(PROBE + group) is not None and p.store.get(f"cooldown:{alias}") is None  # one failure of 3
    cooled_off()
    p.store.delete(PROBE + group)
    calls.clear()
    p.completion(model="coder", messages=MESSAGES)  # the probe, through opus, is answered: claude closes
    assert calls == [opus] and p.store.get(f"cooldown:{group}") is None and p.store.get(PROBE + group) is None
    assert "half_open" not in routed(p, "coder").decisions[0].attributes


def test_a_probe_through_a_name_standing_for_another_ends_the_circuit_it_claimed(monkeypatch) -> None:
    """review59: a probe through ``opus`` of ``claude``'s circuit (the plan's ``probes``) closes
    ``opus``'s own half-open circuit too when answered, and reopens ``claude``'s when it fails even
    if the alias map lost ``opus`` meanwhile (the claim was left until ``probe_s`` before, and no call
    could probe ``claude``)."""
    import time

    from router_middleware.bookkeeping.keys import PROBE

    opus = "anthropic/claude-3-opus-20240229"
    p = pipeline(aliases={"coder": ["opus", "gpt-4o-mini"]}, cooldown={"failures": 3, "window_s": 60, "cooldown_s": 60})
    p.serve({"opus": opus, "claude": opus}, groups={"opus": "claude"})
    calls = failing(monkeypatch, {})
    for name in ("opus", "claude"):  # both names' cooldowns have just ended
        p.store.set(f"cooldown:{name}", repr(time.time() - 1).encode(), ttl_s=60)
    route = routed(p, "coder").decisions[0].attributes
    assert route["half_open"] == "opus" and route["group_probes"] == "opus"
    p.completion(model="coder", messages=MESSAGES)
    assert calls == [opus] and p.store.get("cooldown:claude") is None and p.store.get("cooldown:opus") is None
    assert "half_open" not in routed(p, "coder").decisions[0].attributes

    p.store.set("cooldown:claude", repr(time.time() - 1).encode(), ttl_s=60)
    answer = litellm.completion

    def map_lost(**kwargs):  # the proxy re-serves without the alias while the probe is in flight
        p.serve({"opus": opus, "claude": opus})
        raise rate_limit("opus")

    monkeypatch.setattr(litellm, "completion", lambda **kwargs: map_lost(**kwargs) if kwargs["model"] == opus
                        else answer(**kwargs))
    p.completion(model="coder", messages=MESSAGES)
    assert float(p.store.get("cooldown:claude")) > time.time() + 50 and p.store.get(PROBE + "claude") is not None
