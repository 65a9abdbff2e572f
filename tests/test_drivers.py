"""The attempt loop through every way in: ``Pipeline.completion``, ``Pipeline.acompletion``,
``RouterAgentMiddleware.wrap_model_call`` and ``awrap_model_call`` drive one call lifecycle, so
fallbacks, retries, backoff, cooldowns, quotas and budgets behave the same in each.

Provider answers and failures come from litellm's ``mock_response`` (an exception instance makes
litellm raise it), scripted per model; the middleware's handler invokes the chosen LangChain model,
a ``RoutedChatModel`` that calls the same (scripted) litellm."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litellm
import pytest
from opentelemetry.trace import SpanKind, StatusCode

from router_middleware import BudgetExceeded, NoRouteError, Pipeline, UnknownModelError, drivers
from router_middleware.bookkeeping import health
from router_middleware.bookkeeping.keys import COOLDOWN, FAILURES, PROBE
from router_middleware.engine import Engine

CODER = ["anthropic/claude-sonnet-4-5", "gpt-5-mini", "deepseek/deepseek-chat"]
CLAUDE, MINI, DEEPSEEK = CODER
TYPO = "gpt-5-mnii"  # a model litellm knows no provider for
MESSAGES = [{"role": "user", "content": "Rename the variable x to count in utils.py"}]


def rate_limit() -> Exception:
    return litellm.exceptions.RateLimitError("slow down", "x", "m")


@dataclass
class Script:
    """Per model, the answers litellm gives in turn (an exception is raised); then "ok"."""

    failures: dict[str, list[Exception]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    during: Callable[[str], None] | None = None  # what happens while the provider answers a model

    def answer(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(kwargs["model"])
        if self.during is not None:
            self.during(kwargs["model"])
        queue = self.failures.get(kwargs["model"], [])
        return {**kwargs, "mock_response": queue.pop(0) if queue else "ok"}


@pytest.fixture
def script(monkeypatch) -> Script:
    found = Script()
    completion, acompletion = litellm.completion, litellm.acompletion
    monkeypatch.setattr(litellm, "completion", lambda **kw: completion(**found.answer(kw)))

    async def async_fake(**kw: Any) -> Any:
        return await acompletion(**found.answer(kw))

    monkeypatch.setattr(litellm, "acompletion", async_fake)
    return found


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    seen: list[float] = []

    async def asleep(seconds: float) -> None:
        seen.append(seconds)

    monkeypatch.setattr(drivers, "_sleep", seen.append)
    monkeypatch.setattr(drivers, "_asleep", asleep)
    return seen


def _middleware_call(pipeline: Pipeline, model: str, asynchronous: bool, messages: list[dict[str, Any]]) -> Any:
    from langchain.agents.middleware import ModelRequest
    from langchain_core.messages import convert_to_messages

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    inner = Pipeline.from_config({"telemetry": {"enabled": False}, "cache": {"enabled": False}}, policies=())
    served = {name: name for name in (*CODER, "gpt-4o-mini", TYPO)}
    served.update({name: d.model for name, d in pipeline.config.routing.deployments.items()})  # each its model
    models = {name: RoutedChatModel(model=model, pipeline=inner) for name, model in served.items()}
    middleware = RouterAgentMiddleware(pipeline, models=models, model=model)
    system = [m for m in messages if m["role"] == "system"]
    request = ModelRequest(model=models[CLAUDE], messages=convert_to_messages([m for m in messages if m not in system]),
                           system_message=convert_to_messages(system)[0] if system else None, model_settings={})
    return _drive(middleware, request, asynchronous)


def _drive(middleware: Any, request: Any, asynchronous: bool) -> Any:
    """``request`` through the agent middleware (sync or async), its handler invoking the chosen model."""
    from langchain.agents.middleware import ModelRequest, ModelResponse

    if not asynchronous:
        return middleware.wrap_model_call(request, lambda r: ModelResponse(result=[r.model.invoke(r.messages)]))

    async def handler(r: ModelRequest) -> ModelResponse:
        return ModelResponse(result=[await r.model.ainvoke(r.messages)])

    return asyncio.run(middleware.awrap_model_call(request, handler))


DRIVERS: dict[str, Callable[[Pipeline, str, list[dict[str, Any]]], Any]] = {
    "completion": lambda p, model, messages: p.completion(model=model, messages=messages),
    "acompletion": lambda p, model, messages: asyncio.run(p.acompletion(model=model, messages=messages)),
    "wrap_model_call": lambda p, model, messages: _middleware_call(p, model, False, messages),
    "awrap_model_call": lambda p, model, messages: _middleware_call(p, model, True, messages),
}


@pytest.fixture(params=list(DRIVERS))
def call(request) -> Callable[..., Any]:
    """One routed call through the driver under test: ``call(pipeline, model="coder", messages=MESSAGES)``."""
    driver = DRIVERS[request.param]
    return lambda pipeline, model="coder", messages=MESSAGES: driver(pipeline, model, messages)


def pipeline(ledger: str | None = None, **routing: Any) -> Pipeline:
    config = {"routing": {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0}, **routing},
              "context": {"enabled": False}, "cache": {"enabled": False}, **({"ledger": {"url": ledger}} if ledger else {})}
    return Pipeline.from_config(config)


def routes(exporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.name == "route coder"]


def test_falls_back_on_a_rate_limit_with_a_span_per_attempt(call, script, span_exporter, tmp_path) -> None:
    import structlog

    from router_middleware.ledger.store import open_ledger

    script.failures[CLAUDE] = [rate_limit()]
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = pipeline(ledger=url)
    with structlog.testing.capture_logs() as logs:
        call(p)
    p.close()
    assert script.calls == [CLAUDE, MINI]
    (route,) = routes(span_exporter)
    attempts = [s for s in span_exporter.get_finished_spans()
                if s.kind == SpanKind.CLIENT and s.parent is not None and s.parent.span_id == route.context.span_id]
    assert [s.name for s in attempts] == [f"chat {CLAUDE}", f"chat {MINI}"]
    assert attempts[0].status.status_code == StatusCode.ERROR
    assert attempts[0].attributes["error.type"] == "RateLimitError"
    assert route.attributes["router_middleware.fallback.depth"] == 1
    assert route.attributes["router_middleware.chosen_model"] == MINI
    # the route span says why the call moved on, as the ledger row does (its decisions and events)
    said = list(route.attributes["router_middleware.decisions"])
    assert said[0] == "routing:route" and "routing:fallback" in said
    fallback = next(e for e in route.events if e.name == "routing:fallback")
    assert CLAUDE in fallback.attributes["reason"] and "RateLimitError" in fallback.attributes["reason"]
    assert route.attributes["router_middleware.route.reason"] == fallback.attributes["reason"]
    assert [e.name for e in route.events].count("routing:route") == 1
    # the row and the log line keep the route the call took first too (they lost it after a fallback)
    ((row,),) = open_ledger(url).query("SELECT decisions FROM calls")
    (line,) = [e for e in logs if e["event"] == "llm_call"]
    for decisions in (json.loads(row), line["decisions"]):
        assert decisions[0] == "routing:route" and "routing:fallback" in decisions


def test_retries_the_same_model_first_after_a_backoff(call, script, waits) -> None:
    script.failures[CLAUDE] = [rate_limit()]
    call(pipeline(fallback={"attempts_per_model": 2, "backoff_s": 0.4, "max_backoff_s": 1.0}))
    assert script.calls == [CLAUDE, CLAUDE]
    assert len(waits) == 1 and 0.0 <= waits[0] <= 0.4  # full jitter below backoff_s * 2**0


def test_retry_after_sets_the_wait_for_the_same_target(call, script, waits) -> None:
    import httpx

    answer = httpx.Response(429, headers={"retry-after": "0.7"}, request=httpx.Request("POST", "http://x"))
    limited = litellm.exceptions.RateLimitError("slow down", "x", "m", response=answer)
    script.failures[CLAUDE] = [limited]
    call(pipeline(fallback={"attempts_per_model": 2, "backoff_s": 0.1, "max_backoff_s": 5.0}))
    assert script.calls == [CLAUDE, CLAUDE] and waits == [0.7]


def test_a_non_retryable_error_fails_at_once(call, script) -> None:
    script.failures[CLAUDE] = [litellm.exceptions.AuthenticationError("bad key", "anthropic", "claude")]
    with pytest.raises(litellm.exceptions.AuthenticationError):
        call(pipeline())
    assert script.calls == [CLAUDE]


@pytest.fixture
def missing_key(monkeypatch) -> Exception:
    """What litellm raises for an OpenAI model when no key is set: a 500 (``InternalServerError``),
    raised before any request is sent."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(Exception) as raised:
        litellm.completion(model=MINI, messages=MESSAGES)
    monkeypatch.undo()
    assert isinstance(raised.value, litellm.exceptions.InternalServerError), raised.value  # not an auth error
    return raised.value


def test_a_missing_provider_key_skips_to_the_next_target_at_once(missing_key, call, script, waits,
                                                                  span_exporter) -> None:
    """Retrying or backing off cannot supply a key this process lacks (litellm reports it as a 500,
    before sending anything); the alias's next target, another provider's, may have one. It says
    nothing of the provider's health, so it cools nothing down, and the fallback says so (it said
    "failed (InternalServerError)", read as an outage: found by a routing trial)."""
    script.failures[CLAUDE] = [missing_key] * 4
    p = pipeline(fallback={"attempts_per_model": 2, "backoff_s": 0.4}, cooldown={"failures": 1})
    call(p)
    call(p)
    assert script.calls == [CLAUDE, MINI, CLAUDE, MINI] and waits == []
    for route in routes(span_exporter):
        fallback = next(e for e in route.events if e.name == "routing:fallback")
        assert fallback.attributes["reason"] == (f"{CLAUDE} skipped: no API key for its provider in this process; "
                                                 f"falling back to {MINI}")
    assert p.store.get(f"cooldown:{CLAUDE}") is None
    script.calls.clear()
    with pytest.raises(litellm.exceptions.InternalServerError, match="Missing credentials"):
        call(pipeline(aliases={"coder": [CLAUDE]}, fallback={"attempts_per_model": 2, "backoff_s": 0.4}))
    assert script.calls == [CLAUDE] and waits == []  # the last target: its own error, at once


def test_a_request_s_own_fault_does_not_cool_the_target_down(call, script) -> None:
    """Bad requests and requests too long for a model are the caller's: the next call still goes there."""
    p = pipeline(cooldown={"failures": 1})
    script.failures[CLAUDE] = [litellm.exceptions.BadRequestError("unsupported parameter", CLAUDE, "anthropic"),
                               litellm.exceptions.ContextWindowExceededError("too long", CLAUDE, "anthropic")]
    with pytest.raises(litellm.exceptions.BadRequestError):
        call(p)
    call(p)  # falls back to a larger window, without counting against claude
    call(p)
    assert script.calls == [CLAUDE, CLAUDE, MINI, CLAUDE]
    assert p.store.get(f"cooldown:{CLAUDE}") is None and p.store.get(f"fail:{CLAUDE}") is None


@pytest.mark.parametrize("no_credit", [
    lambda: litellm.exceptions.PaymentRequiredError("insufficient credits", CLAUDE, "anthropic"),
    lambda: litellm.exceptions.BadRequestError(  # Anthropic's own answer, a 400
        "AnthropicException - Your credit balance is too low to access the Anthropic API.", CLAUDE, "anthropic"),
], ids=["402", "anthropic-400"])
def test_an_account_out_of_credit_cools_the_target_down(call, script, no_credit) -> None:
    """A 402 (litellm's PaymentRequiredError, a BadRequestError) is the target's account, not the
    request: every caller's next call would meet it too, so it counts toward the cooldown."""
    p = pipeline(cooldown={"failures": 1})
    script.failures[CLAUDE] = [no_credit()]
    with pytest.raises(litellm.exceptions.BadRequestError):
        call(p)
    call(p)  # routed past claude while it cools down
    assert script.calls == [CLAUDE, MINI]
    assert p.store.get(f"cooldown:{CLAUDE}") is not None


def test_a_target_litellm_knows_no_provider_for_is_skipped_for_the_next(call, script, span_exporter, waits) -> None:
    call(pipeline(aliases={"coder": [TYPO, MINI]}, fallback={"backoff_s": 0.4}))
    assert script.calls == [TYPO, MINI]  # litellm refused the typo itself (no provider), then the next one answered
    assert waits == []  # no provider was called: nothing to back off from
    (route,) = routes(span_exporter)
    assert route.attributes["router_middleware.chosen_model"] == MINI


def test_a_model_nobody_knows_fails_naming_it_and_the_closest_known_names(call, script, span_exporter) -> None:
    import structlog

    with pytest.raises(UnknownModelError) as raised, structlog.testing.capture_logs() as logs:
        call(pipeline(), model=TYPO)
    failed = [e for e in logs if e["event"] == "llm_call_failed"]
    assert failed and all(e["error_type"] == "UnknownModelError" for e in failed)  # what the caller is told
    # (the middleware's drivers log twice: its own lifecycle, and the inner RoutedChatModel's pipeline)
    assert script.calls == [TYPO]
    assert raised.value.model == TYPO and "gpt-5-mini" in raised.value.suggestions
    assert f"model {TYPO!r}: litellm knows no provider for it" in str(raised.value)
    assert "did you mean 'gpt-5-mini'" in str(raised.value)
    assert isinstance(raised.value, ValueError) and raised.value.status_code == 400  # bad input, as RequestError
    assert type(raised.value.__cause__).__name__ in ("BadRequestError", "UnknownModelError")  # litellm's, kept


def test_when_every_attempt_fails_the_last_error_is_raised_and_recorded(call, script, span_exporter) -> None:
    for model in CODER:
        script.failures[model] = [rate_limit()]
    with pytest.raises(litellm.exceptions.RateLimitError) as raised:
        call(pipeline())
    assert script.calls == CODER
    assert raised.value.__notes__ == ["router-middleware: 3 attempts, all failed: "  # every way in says it
                                      + "; ".join(f"{model}: RateLimitError" for model in CODER)]
    (route,) = routes(span_exporter)
    assert route.status.status_code == StatusCode.ERROR and route.attributes["error.type"] == "RateLimitError"


def test_a_failed_call_is_counted_with_the_answered_calls_of_the_model_it_was_sent_to(call, script,
                                                                                      tmp_path) -> None:
    """A row's ``model`` is the provider's name of the model that answered (``claude-sonnet-4-5``), or
    for a call none answered the target it tried (``anthropic/claude-sonnet-4-5``): its ``target`` is
    the route's name on both, so the report's ``by_target`` counts a target's failures out of its calls."""
    from router_middleware.ledger import build_report, open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = pipeline(ledger=url)
    call(p)
    script.failures[CLAUDE] = [litellm.exceptions.AuthenticationError("bad key", "anthropic", "claude")]
    with pytest.raises(litellm.exceptions.AuthenticationError):
        call(p)
    p.close()
    with contextlib.closing(open_ledger(url)) as db:
        rows, report = db.query("SELECT requested_model, target, model, ended FROM calls ORDER BY ts"), build_report(db)
    assert rows == [("coder", CLAUDE, "claude-sonnet-4-5", "complete"), ("coder", CLAUDE, CLAUDE, "failed")]
    assert [(r["key"], r["calls"], r["failed_calls"]) for r in report["by_target"]] == [(CLAUDE, 2, 1)]


def test_repeated_failures_open_the_circuit(call, script) -> None:
    p = pipeline(cooldown={"failures": 2, "window_s": 60, "cooldown_s": 60})
    script.failures[CLAUDE] = [rate_limit(), rate_limit()]
    call(p)
    call(p)  # the second failure puts claude into cooldown
    script.calls.clear()
    call(p)
    assert script.calls == [MINI]


def test_when_every_target_is_cooling_down_the_first_to_cool_off_is_tried_anyway(call, script, span_exporter) -> None:
    """Refusing every call until a cooldown ends would be worse than calling the provider directly."""
    p = pipeline(aliases={"coder": [CLAUDE, MINI]}, cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    script.failures[CLAUDE] = [rate_limit()]
    script.failures[MINI] = [rate_limit()]
    with pytest.raises(litellm.exceptions.RateLimitError):
        call(p)  # each fails once: both cool down, claude first
    script.calls.clear()
    call(p)
    assert script.calls == [CLAUDE]
    route = routes(span_exporter)[-1]
    assert f"every candidate is cooling down: {CLAUDE} is tried anyway" in route.attributes[
        "router_middleware.route.reason"]


def test_a_target_cooling_down_is_the_last_resort_when_the_others_fail(call, script, span_exporter) -> None:
    """A target cooling down was dropped from the alias: when the others failed, the call failed,
    where a direct call to the cooled one (back by then) would have been answered (the LiteLLM proxy's
    bare router answered 200 where the hook answered 500 for the cooldown's 30 s). It follows the
    others now, soonest back first (the plan's route decision lists it as a last resort)."""
    p = pipeline(cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    script.failures[CLAUDE] = [rate_limit()]
    call(p)  # claude fails once and cools down; gpt-5-mini answers
    script.failures[MINI] = [rate_limit()]
    script.failures[DEEPSEEK] = [rate_limit()]
    script.calls.clear()
    call(p)
    assert script.calls == [MINI, DEEPSEEK, CLAUDE]  # the others failed: claude answers
    assert routes(span_exporter)[-1].status.is_ok


def test_a_half_open_target_another_call_probes_goes_before_a_last_resort(call, script) -> None:
    """A half-open target another call probes is tried anyway when no target after it admits the call;
    a last resort (cooling down) admitted the call first, so the call went there, and when it failed
    the half-open target was never tried (found in review: a call that failed, answered before the
    last resort existed). The half-open target goes first now, then the last resort."""
    p = pipeline(aliases={"coder": [CLAUDE, MINI]}, cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    _probing(p, CLAUDE)
    p.store.set(f"cooldown:{MINI}", repr(time.time() + 50).encode(), ttl_s=60)  # still cooling down
    script.failures[MINI] = [rate_limit()]
    call(p)
    assert script.calls == [CLAUDE]


def test_a_half_open_target_skipped_at_one_attempt_goes_before_a_last_resort_at_a_later_one(call, script) -> None:
    """The half-open target is skipped for another call's probe, the next target is admitted and fails:
    the target after it cools down, so the half-open one is tried before it (found in review: it was
    owed only within one admission, and the call went to the target cooling down)."""
    p = pipeline(cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    _probing(p, CLAUDE)
    p.store.set(f"cooldown:{DEEPSEEK}", repr(time.time() + 50).encode(), ttl_s=60)  # still cooling down
    script.failures[MINI] = [rate_limit()]
    call(p)
    assert script.calls == [MINI, CLAUDE]


SERVED = {"claude; eu": CLAUDE, "mini; eu": MINI, "deepseek; eu": DEEPSEEK}  # served names with "; " in them


def _served(*targets: str) -> Pipeline:
    """The coder alias over ``targets``, some deployments whose names hold "; " (the separator of the
    route's text)."""
    return pipeline(aliases={"coder": list(targets)}, deployments={n: {"model": m} for n, m in SERVED.items()},
                    cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})


def test_a_half_open_target_whose_name_holds_the_route_s_separator_is_probed_by_one_call(call, script) -> None:
    """The attempt loop read the half-open targets back from the route's text, split at "; ": a
    target named "claude; eu" was none of them, and every call went to it once its cooldown ended
    (no one-probe limit)."""
    p = _served(*SERVED)
    _cooled_off(p, "claude; eu")
    _probing(p, "claude; eu")
    call(p)
    assert script.calls == [MINI]  # another call probes claude; eu: passed over


def test_a_last_resort_whose_name_holds_the_route_s_separator_comes_after_a_half_open_target(call, script) -> None:
    """As ``test_a_half_open_target_skipped_at_one_attempt_goes_before_a_last_resort_at_a_later_one``,
    the target cooling down named "deepseek; eu": read back from the route's text, it was no last
    resort, and the call went to it before the half-open target."""
    p = _served(CLAUDE, "mini; eu", "deepseek; eu")
    _cooled_off(p, CLAUDE)
    _probing(p, CLAUDE)
    p.store.set("cooldown:deepseek; eu", repr(time.time() + 50).encode(), ttl_s=60)  # still cooling down
    script.failures[MINI] = [rate_limit()]
    call(p)
    assert script.calls == [MINI, CLAUDE]


def test_after_a_budget_s_downgrade_its_alias_s_last_resorts_are_the_ones_kept(script) -> None:
    """A budget downgrade plans the call on another alias: later attempts read that alias's last
    resorts, not those of the route the call first took (found in review: the half-open target of the
    downgrade's alias was not put back before its target cooling down, and the call failed)."""
    half_open, cooling = DEEPSEEK, MINI
    p = pipeline(aliases={"coder": [CLAUDE], "cheap": ["gpt-4o-mini", half_open, cooling]},
                 cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60},
                 budgets=[{"name": "day", "scope": "global", "usd": 0.005, "downgrade_to": "cheap"}])
    _cooled_off(p, half_open)
    _probing(p, half_open)
    p.store.set(f"cooldown:{cooling}", repr(time.time() + 50).encode(), ttl_s=60)
    script.failures["gpt-4o-mini"] = [rate_limit()]
    script.failures[cooling] = [rate_limit()]
    p.completion(model="coder", messages=MESSAGES, max_tokens=512)
    assert script.calls == ["gpt-4o-mini", half_open]


def _cooled_off(p: Pipeline, target: str) -> None:
    """As when ``target``'s cooldown has just ended: half-open (the key outlives its cooldown)."""
    p.store.set(f"cooldown:{target}", repr(time.time() - 1).encode(), ttl_s=60)


def _probing(p: Pipeline, target: str, owner: bytes = b"another call") -> None:
    """Another call (``owner``) holds ``target``'s probe."""
    assert p.store.add_within([], (), [health.probe_claim(health.Probe(target, owner), 30.0)]) is None


def test_after_a_cooldown_one_call_probes_the_target_and_its_success_closes_the_circuit(call, script) -> None:
    """Not every call at once on a target that may still be down: while one call probes it the
    others go elsewhere; the probe's answer closes the circuit for all."""
    p = pipeline(cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    script.failures[CLAUDE] = [rate_limit()]
    call(p)  # claude fails once: its circuit opens, and the call falls back
    assert script.calls == [CLAUDE, MINI] and float(p.store.get(f"cooldown:{CLAUDE}")) > time.time() + 50
    _cooled_off(p, CLAUDE)
    _probing(p, CLAUDE)
    script.calls.clear()
    call(p)
    assert script.calls == [MINI]  # skipped: another call probes claude
    p.store.delete(PROBE + CLAUDE)  # that probe ended without a word (its claim lapsed)
    script.calls.clear()
    call(p)  # this call claims the probe, and claude answers
    call(p)
    assert script.calls == [CLAUDE, CLAUDE]
    assert p.store.get(f"cooldown:{CLAUDE}") is None and p.store.get(PROBE + CLAUDE) is None


def test_a_probe_that_fails_opens_the_circuit_again_at_once(call, script) -> None:
    """One failure of the probe is enough (not ``failures`` more): the target is still down."""
    p = pipeline(cooldown={"failures": 3, "window_s": 60, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    script.failures[CLAUDE] = [rate_limit()]
    call(p)
    assert script.calls == [CLAUDE, MINI] and p.store.get(PROBE + CLAUDE) is not None  # held until it ends
    assert float(p.store.get(f"cooldown:{CLAUDE}")) > time.time() + 50
    script.calls.clear()
    call(p)
    assert script.calls == [MINI]


def test_a_probe_ended_by_the_request_s_own_fault_lets_another_call_probe(call, script) -> None:
    p = pipeline(cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    script.failures[CLAUDE] = [litellm.BadRequestError("bad request", "x", "m")]
    with pytest.raises(litellm.BadRequestError):
        call(p)
    assert p.store.get(PROBE + CLAUDE) is None and float(p.store.get(f"cooldown:{CLAUDE}")) < time.time()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def breaker_store(request, tmp_path) -> Any:
    """A store URL for the circuit breaker tests; on the shared Redis, claude's breaker keys are
    removed before and after."""
    if request.param != "redis":
        yield "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'state.db'}"
        return
    from router_middleware.stores.redis import RedisStore

    url = request.getfixturevalue("redis_url")
    store = RedisStore(url)
    keys = [prefix + CLAUDE for prefix in (COOLDOWN, FAILURES, PROBE)]
    for key in keys:
        store.delete(key)
    yield url
    for key in keys:
        store.delete(key)
    store.close()


def test_a_probe_that_outlasts_its_claim_ends_only_its_own(call, script, breaker_store) -> None:
    """A probe slower than ``probe_s`` lost its claim, and another call took the probe: the first
    probe's end (here the request's own fault) leaves that claim alone, so a third call does not probe
    the target at the same time."""
    p = Pipeline.from_config({"store": breaker_store, "context": {"enabled": False}, "cache": {"enabled": False},
                              "routing": {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0},
                                          "cooldown": {"failures": 1, "cooldown_s": 60, "probe_s": 0.05}}})
    _cooled_off(p, CLAUDE)

    def outlast(model: str) -> None:
        if model == CLAUDE:
            time.sleep(0.15)  # the claim lapses...
            _probing(p, CLAUDE, b"a later probe")  # ...and another call claims the probe

    script.during = outlast
    script.failures[CLAUDE] = [litellm.BadRequestError("bad request", "x", "m")]
    with pytest.raises(litellm.BadRequestError):
        call(p)
    assert p.store.get(PROBE + CLAUDE) == b"a later probe"
    script.calls.clear()
    script.during = None
    call(p)
    assert script.calls == [MINI]  # skipped: the later probe is still in flight
    p.close()


def test_a_failed_probe_that_outlasted_its_claim_still_holds_the_probe_until_the_cooldown_ends(script) -> None:
    """Its failure opens the circuit again: the probe is held as the failed probe's, over the claim of
    the later probe still in flight, whose end (for its own reasons) then leaves it held."""
    p = pipeline(cooldown={"failures": 1, "cooldown_s": 60, "probe_s": 0.05})
    _cooled_off(p, CLAUDE)
    later = health.Probe(CLAUDE, b"a later probe")

    def outlast(model: str) -> None:
        if model == CLAUDE:
            time.sleep(0.15)
            _probing(p, CLAUDE, later.owner)

    script.during = outlast
    script.failures[CLAUDE] = [rate_limit()]
    p.completion(model="coder", messages=MESSAGES)
    assert script.calls == [CLAUDE, MINI] and float(p.store.get(COOLDOWN + CLAUDE)) > time.time() + 50
    health.end_probe(p.store, later)
    assert p.store.get(PROBE + CLAUDE) not in (None, later.owner)


def test_a_probe_claim_whose_answer_was_lost_is_still_the_call_s_probe(call, script, monkeypatch) -> None:
    """The store took the claim but its answer failed (a timeout after the write): the call, admitted
    as on any store failure, is the probe all the same; its answer closes the circuit and ends the claim,
    rather than leave it for ``probe_s`` with the target half-open."""
    from router_middleware.stores import MemoryStore, StoreError

    admit = MemoryStore.add_within

    def answer_lost(self: MemoryStore, *args: Any) -> Any:
        admit(self, *args)
        raise StoreError("no answer")

    monkeypatch.setattr(MemoryStore, "add_within", answer_lost)
    p = pipeline(cooldown={"failures": 1, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    call(p)
    assert script.calls == [CLAUDE]
    assert p.store.get(COOLDOWN + CLAUDE) is None and p.store.get(PROBE + CLAUDE) is None


def test_a_call_that_fails_for_good_gives_its_budget_back_and_counts_toward_the_cooldown(call, script,
                                                                                       breaker_store) -> None:
    """The writes of the step in which a call fails for good (its budget hold given back, its failure
    counted toward the target's cooldown) are made on every store. On a store that blocks, the async
    drivers queue a step's writes for a worker thread; a step that raised lost them: the hold stayed on
    the budget until it lapsed, and the failure counted toward no cooldown."""
    import uuid

    app = f"fails-{uuid.uuid4().hex[:8]}"
    p = Pipeline.from_config({"store": breaker_store, "app": app, "context": {"enabled": False},
                              "cache": {"enabled": False},
                              "routing": {"cooldown": {"failures": 1, "window_s": 60, "cooldown_s": 60},
                                          "budgets": [{"name": "team", "scope": "app", "usd": 10.0}]}})
    script.failures[CLAUDE] = [rate_limit()]
    with pytest.raises(litellm.exceptions.RateLimitError):
        call(p, CLAUDE)
    assert script.calls == [CLAUDE]
    assert float(p.store.get(f"budget:team:usd:{app}:0") or 0) == 0
    assert float(p.store.get(COOLDOWN + CLAUDE) or 0) > time.time()


def test_a_failure_opens_the_breaker_though_the_event_loop_s_default_executor_is_busy(
        monkeypatch, breaker_store) -> None:
    """litellm runs the sync part of every ``acompletion`` in the event loop's default executor; under
    load its queue is long. The async drivers make a blocking store's writes (a failure's count toward
    a cooldown) in threads of their own: a failure opens the breaker, and the next call routes past the
    target, while that executor is still busy. Made there, the count waited its turn (the default
    executor held here by one job of 2 s): the breaker opened late, and the calls meanwhile still went
    to the target that was down."""
    import concurrent.futures
    import json

    from .cassette_data import interactions
    from .conftest import CASSETTES

    recorded = json.loads(interactions(CASSETTES / "openai_chat.yaml")[0].response_text)
    sent: list[str] = []

    async def provider(**kwargs: Any) -> Any:  # no executor: the provider's answer, as recorded
        sent.append(kwargs["model"])
        if kwargs["model"] == CLAUDE:
            raise rate_limit()
        return litellm.ModelResponse(**recorded)

    monkeypatch.setattr(litellm, "acompletion", provider)
    p = Pipeline.from_config({"store": breaker_store, "context": {"enabled": False}, "cache": {"enabled": False},
                              "routing": {"aliases": {"coder": [CLAUDE, MINI]}, "fallback": {"backoff_s": 0.0},
                                          "cooldown": {"failures": 1, "window_s": 60, "cooldown_s": 60}}})

    async def run() -> float:
        await p.acompletion(model=MINI, messages=MESSAGES)  # connected: the store's first answers are quick
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(1))
        busy = loop.run_in_executor(None, time.sleep, 2.0)
        started = time.perf_counter()
        await p.acompletion(model="coder", messages=MESSAGES)
        await p.acompletion(model="coder", messages=MESSAGES)
        took = time.perf_counter() - started
        await busy
        return took

    try:
        took = asyncio.run(run())
    finally:
        p.close()
    assert sent == [MINI, CLAUDE, MINI, MINI]  # the second call went past claude: its breaker was open
    assert took < 1.0


def test_a_half_open_last_target_another_call_probes_is_tried_anyway(call, script) -> None:
    """Refusing it would make the call worse than calling the provider directly."""
    p = pipeline(aliases={"coder": [CLAUDE]}, cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    _probing(p, CLAUDE)
    call(p)
    assert script.calls == [CLAUDE]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_half_open_target_another_call_probes_is_tried_anyway_when_no_target_after_it_admits_the_call(
        script, asynchronous) -> None:
    """The agent middleware can reach claude only (gpt-5-mini is none of its models): skipping claude
    because another call probes it left the call no target, a NoRouteError where a direct call would
    have been sent."""
    from langchain.agents.middleware import ModelRequest
    from langchain_core.messages import HumanMessage

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    p = pipeline(aliases={"coder": [CLAUDE, MINI]}, cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60})
    _cooled_off(p, CLAUDE)
    _probing(p, CLAUDE)
    inner = Pipeline.from_config({"telemetry": {"enabled": False}, "cache": {"enabled": False}}, policies=())
    models = {CLAUDE: RoutedChatModel(model=CLAUDE, pipeline=inner)}
    middleware = RouterAgentMiddleware(p, models=models, model="coder")
    request = ModelRequest(model=models[CLAUDE], messages=[HumanMessage(MESSAGES[0]["content"])], model_settings={})
    _drive(middleware, request, asynchronous)
    assert script.calls == [CLAUDE]
    assert p.store.get(PROBE + CLAUDE) is not None  # the other call's probe, still held: not taken over


def test_after_a_cooldown_one_of_many_concurrent_calls_probes_the_target_on_real_redis(redis_url,
                                                                                       monkeypatch) -> None:
    target = f"claude-{time.time_ns()}"  # the cooldown keys are per target: none left by another test
    p = Pipeline.from_config({"store": redis_url, "context": {"enabled": False}, "cache": {"enabled": False},
                              "routing": {"deployments": {target: {"model": CLAUDE}},
                                          "aliases": {"coder": [target, MINI]}, "fallback": {"backoff_s": 0.0}}})
    _cooled_off(p, target)
    sent: list[str] = []
    real = litellm.acompletion

    async def slow(**kwargs: Any) -> Any:
        sent.append(kwargs["model"])
        if kwargs["model"] == CLAUDE:
            await asyncio.sleep(0.3)  # the probe is still in flight while the others are admitted
        return await real(**{**kwargs, "mock_response": "ok"})

    monkeypatch.setattr(litellm, "acompletion", slow)

    async def calls() -> list[Any]:
        return await asyncio.gather(*(p.acompletion(model="coder", messages=MESSAGES) for _ in range(20)))

    answers = asyncio.run(calls())
    assert len(answers) == 20 and sent.count(CLAUDE) == 1 and sent.count(MINI) == 19
    assert p.store.get(f"cooldown:{target}") is None and p.store.get(PROBE + target) is None
    p.close()


def _on_redis(store: str, target: str) -> Pipeline:
    """A pipeline on ``store``, real Redis here (a process's view of the cooldowns is read at most once
    a second), whose alias ``coder`` is the deployment ``target`` (claude), then gpt-5-mini; one
    failure opens a circuit."""
    return Pipeline.from_config({"store": store, "context": {"enabled": False}, "cache": {"enabled": False},
                                 "routing": {"deployments": {target: {"model": CLAUDE}},
                                             "aliases": {"coder": [target, MINI]}, "fallback": {"backoff_s": 0.0},
                                             "cooldown": {"failures": 1, "window_s": 60, "cooldown_s": 60}}})


def test_on_redis_a_process_skips_a_target_at_once_after_opening_its_circuit(redis_url, script) -> None:
    """Not for the second its view of the cooldowns still holds what it read before."""
    target = f"claude-{time.time_ns()}"
    p = _on_redis(redis_url, target)
    p.completion(model="coder", messages=MESSAGES)  # reads "no cooldown", kept for a second
    script.failures[CLAUDE] = [rate_limit()]
    p.completion(model="coder", messages=MESSAGES)  # claude fails: this process opens its circuit
    script.calls.clear()
    p.completion(model="coder", messages=MESSAGES)
    assert script.calls == [MINI]
    p.close()


def test_on_redis_a_failed_probe_holds_the_probe_until_the_cooldown_ends(redis_url, script) -> None:
    """Another process that still reads the target as half-open (its view lags) does not probe it again."""
    target = f"claude-{time.time_ns()}"
    p, other = _on_redis(redis_url, target), _on_redis(redis_url, target)
    _cooled_off(p, target)
    _probing(p, target)
    p.completion(model="coder", messages=MESSAGES)  # reads "half-open" (kept for a second); probed elsewhere
    p.store.delete(PROBE + target)
    script.failures[CLAUDE] = [rate_limit()]
    other.completion(model="coder", messages=MESSAGES)  # the other process probes claude: it fails
    script.calls.clear()
    p.completion(model="coder", messages=MESSAGES)
    assert script.calls == [MINI]
    p.close()
    other.close()


@pytest.mark.usefixtures("one_quota_window")
def test_a_used_up_quota_moves_the_call_on(call, script) -> None:
    p = pipeline(limits={CLAUDE: {"rpm": 1}})
    call(p)
    call(p)
    assert script.calls == [CLAUDE, MINI]


@pytest.mark.usefixtures("one_quota_window")
def test_a_quota_on_every_target_names_each_limit(call, script) -> None:
    p = pipeline(limits={m: {"rpm": 1} for m in CODER})
    for _ in CODER:
        call(p)
    with pytest.raises(NoRouteError, match="rpm limit 1 reached"):
        call(p)
    assert len(script.calls) == 3


def test_a_hard_budget_refuses_before_any_attempt(call, script) -> None:
    p = pipeline(budgets=[{"name": "tiny", "scope": "global", "usd": 0.000001}])
    with pytest.raises(BudgetExceeded, match="budget 'tiny' exceeded"):
        call(p)
    assert script.calls == []


@pytest.mark.parametrize("limit", [0.005, 0.0001])
def test_a_call_a_budget_cannot_hold_goes_to_its_downgrade_alias_before_it_is_refused(call, script, tmp_path,
                                                                                     limit) -> None:
    """Claude's estimate (512 output tokens at $15/M) does not fit in $0.005; DeepSeek's does. Before,
    the budget refused the call while it was under its soft limit, though it names a cheaper alias to
    send calls to once past it. Now the call goes there (a ``routing:downgrade`` decision in its row),
    and is refused only when that alias's estimate does not fit either ($0.0001)."""
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = pipeline(url, aliases={"coder": CODER, "cheap": [DEEPSEEK]},
                 budgets=[{"name": "day", "scope": "global", "usd": limit, "downgrade_to": "cheap"}])
    if limit < 0.001:
        with pytest.raises(BudgetExceeded, match=r"budget 'day' exceeded: 0 of 0.0001 usd.*estimate, 0\.00"):
            call(p)
        assert script.calls == []
        return
    call(p)
    p.close()
    assert script.calls == [DEEPSEEK]
    (requested, target, decisions), = open_ledger(url).query("SELECT requested_model, target, decisions FROM calls")
    assert (requested, target) == ("coder", DEEPSEEK) and "routing:downgrade" in json.loads(decisions)
    assert 0 < float(p.store.get("budget:day:usd:all:0")) < limit


def test_past_a_soft_limit_a_fallback_goes_to_the_downgrade_s_next_target(call, script) -> None:
    """Past the soft limit the call goes to the downgrade alias; its first target rate-limited, the
    fallback is the alias's next target. Before, the fallback's plan was downgraded again, to the
    alias's first target: DeepSeek twice, gpt-5-mini never tried, and the call failed."""
    p = pipeline(aliases={"coder": [CLAUDE], "cheap": [DEEPSEEK, MINI]},
                 budgets=[{"name": "day", "scope": "global", "usd": 1.0, "soft": 0.5, "downgrade_to": "cheap"}])
    p.store.set("budget:day:usd:all:0", b"0.7")
    script.failures[DEEPSEEK] = [rate_limit()]
    call(p)
    assert script.calls == [DEEPSEEK, MINI]


def test_a_pinned_call_replanned_keeps_its_model_past_a_soft_limit() -> None:
    """A call whose adapter sends its own model (planned ``pinned``) keeps it when it is planned again
    (a reasoning step-down at admission replans it): before, the replan went through the soft limit's
    downgrade, and the row named the downgrade's target while the agent's model answered."""
    from router_middleware.types import Decision

    p = pipeline(aliases={"cheap": [DEEPSEEK]},
                 budgets=[{"name": "day", "scope": "global", "usd": 1.0, "soft": 0.5, "downgrade_to": "cheap"}])
    p.store.set("budget:day:usd:all:0", b"0.7")
    call = p.make_call(CLAUDE, MESSAGES, {}, {})
    assert p.plan(call).model == DEEPSEEK  # a pipeline call past the soft limit is downgraded
    assert p.plan(call, pinned=True).model == CLAUDE
    assert p.replan(call, CLAUDE, Decision("reasoning", "step-down", "x")).model == CLAUDE


def test_a_downgrade_claims_the_probe_of_its_half_open_targets(script) -> None:
    """After a downgrade, a half-open target of the alias whose probe another call holds is skipped,
    as a call routed to the alias at once skips it (the downgraded plan's half-open targets were read
    from the original route's, and the target was sent without its probe)."""
    p = pipeline(aliases={"coder": [CLAUDE], "cheap": [DEEPSEEK, MINI]},
                 cooldown={"failures": 1, "window_s": 60, "cooldown_s": 60},
                 budgets=[{"name": "day", "scope": "global", "usd": 0.005, "downgrade_to": "cheap"}])
    p.store.set(f"{COOLDOWN}{DEEPSEEK}", repr(time.time() - 1).encode(), ttl_s=60)  # cooled down: half-open
    assert p.store.add_within([], (), [health.probe_claim(health.Probe(DEEPSEEK, b"another call"), 30.0)]) is None
    p.completion(model="coder", messages=MESSAGES, max_tokens=512)
    assert script.calls == [MINI] and p.store.get(PROBE + DEEPSEEK) == b"another call"


@pytest.mark.usefixtures("one_quota_window")
def test_a_downgrade_nothing_admits_is_the_budget_s_refusal_not_a_target_skipped_before(script,
                                                                                      monkeypatch) -> None:
    """Claude is half-open, another call probing it: the call moves on to gpt-5-mini, whose estimate the
    budget refuses; the downgrade's one target has used its quota (taken by another process after
    this call was planned: the policy's view of it lags). The route skipped before is not tried anyway
    at the downgrade's estimate: the budget refuses the call, and nothing is sent."""
    from router_middleware.routing import policy

    p = pipeline(aliases={"coder": [CLAUDE, MINI], "cheap": [DEEPSEEK]}, limits={DEEPSEEK: {"rpd": 1}},
                 budgets=[{"name": "day", "scope": "global", "usd": 0.0008, "downgrade_to": "cheap"}])
    p.completion(model="cheap", messages=MESSAGES, max_tokens=20)  # deepseek's one request today
    monkeypatch.setattr(policy, "exhausted", lambda *args, **kwargs: None)  # planning does not see it
    script.calls.clear()
    p.store.set(f"{COOLDOWN}{CLAUDE}", repr(time.time() - 1).encode(), ttl_s=60)
    assert p.store.add_within([], (), [health.probe_claim(health.Probe(CLAUDE, b"another call"), 30.0)]) is None
    with pytest.raises(BudgetExceeded, match="budget 'day' exceeded"):
        p.completion(model="coder", messages=MESSAGES, max_tokens=512)
    assert script.calls == []


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_agent_middleware_without_models_is_refused_by_its_budget_not_downgraded(script, asynchronous) -> None:
    """Without ``models=`` the middleware sends the agent's own model whatever the plan says: admitting it
    at the downgrade alias's estimate would send Claude on DeepSeek's reservation."""
    from langchain.agents.middleware import ModelRequest
    from langchain_core.messages import HumanMessage

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    p = pipeline(aliases={"cheap": [DEEPSEEK]},
                 budgets=[{"name": "day", "scope": "global", "usd": 0.005, "downgrade_to": "cheap"}])
    inner = Pipeline.from_config({"telemetry": {"enabled": False}, "cache": {"enabled": False}}, policies=())
    request = ModelRequest(model=RoutedChatModel(model=CLAUDE, pipeline=inner, max_tokens=512),
                           messages=[HumanMessage("Rename x to count in utils.py")], model_settings={})
    with pytest.raises(BudgetExceeded, match="budget 'day' exceeded"):
        _drive(RouterAgentMiddleware(p), request, asynchronous)
    assert script.calls == []


@pytest.mark.parametrize("asynchronous", [False, True])
def test_an_agent_middleware_without_models_past_a_soft_limit_sends_and_records_the_agent_s_model(
        script, tmp_path, asynchronous) -> None:
    """Past the soft limit, the plan of a call through the middleware without ``models=`` named the
    downgrade's target (DeepSeek) while the agent's own Claude answered: the row said ``target``
    DeepSeek, reserved at its price. Now the plan keeps the agent's model, and making the middleware
    says the downgrade does not apply."""
    import structlog
    from langchain.agents.middleware import ModelRequest
    from langchain_core.messages import HumanMessage

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = pipeline(url, aliases={"cheap": [DEEPSEEK]},
                 budgets=[{"name": "day", "scope": "global", "usd": 1.0, "soft": 0.5, "downgrade_to": "cheap"}])
    p.store.set("budget:day:usd:all:0", b"0.7")  # past the soft limit, far from the hard one
    inner = Pipeline.from_config({"telemetry": {"enabled": False}, "cache": {"enabled": False}}, policies=())
    request = ModelRequest(model=RoutedChatModel(model=CLAUDE, pipeline=inner, max_tokens=512),
                           messages=[HumanMessage("Rename x to count in utils.py")], model_settings={})
    with structlog.testing.capture_logs() as logs:
        middleware = RouterAgentMiddleware(p)
        RouterAgentMiddleware(p)  # an agent made per request: said once per config
    assert [(e["event"], e["budgets"]) for e in logs] == [("agent_downgrade_not_applied", ["day"])]
    _drive(middleware, request, asynchronous)
    p.close()
    assert script.calls == [CLAUDE]
    (requested, target, decisions), = open_ledger(url).query("SELECT requested_model, target, decisions FROM calls")
    assert (requested, target) == (CLAUDE, CLAUDE) and "routing:downgrade" not in decisions


@pytest.mark.usefixtures("one_quota_window")
@pytest.mark.parametrize("refusal", ["budget", "quota", "route"])
def test_a_call_refused_before_any_attempt_has_its_route_span_and_log_line(call, script, span_exporter,
                                                                           refusal) -> None:
    """A call refused by a budget, by every target's quota (at admission) or by routing (no candidate
    may serve it, at planning) is seen in telemetry: its route span with the error and
    ``error.type``, no chat span (no provider operation), and an ``llm_call_failed`` warning (before,
    nothing at all: no span, no log line). As documented, no ledger row."""
    import structlog

    from router_middleware.errors import RouterMiddlewareError

    p = {"budget": lambda: pipeline(budgets=[{"name": "tiny", "scope": "global", "usd": 0.000001}]),
         "quota": lambda: pipeline(limits={m: {"rpm": 1} for m in CODER}),
         "route": lambda: pipeline(deny_providers=["anthropic", "openai", "deepseek"])}[refusal]()
    if refusal == "quota":  # each target's one request a minute used
        for _ in CODER:
            call(p)
        script.calls.clear()
        span_exporter.clear()
    with structlog.testing.capture_logs() as logs, pytest.raises(RouterMiddlewareError) as refused:
        call(p)
    assert script.calls == []
    kind = type(refused.value).__name__
    assert kind == {"budget": "BudgetExceeded", "quota": "NoRouteError", "route": "NoRouteError"}[refusal]
    spans = span_exporter.get_finished_spans()
    assert [s.name for s in spans] == ["route coder"]
    assert spans[0].status.status_code == StatusCode.ERROR and spans[0].attributes["error.type"] == kind
    assert [(e["event"], e["error_type"]) for e in logs if e["event"].startswith("llm_call")] == [
        ("llm_call_failed", kind)]


def test_successful_calls_settle_budgets_and_reach_the_ledger(call, script, tmp_path) -> None:
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"routing": {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0},
                                          "budgets": [{"name": "team", "scope": "global", "usd": 10.0}]},
                              "context": {"enabled": False}, "cache": {"enabled": False}, "ledger": {"url": url}})
    script.failures[CLAUDE] = [rate_limit()]
    call(p)
    p.close()
    spent = float(p.store.get("budget:team:usd:all:0") or 0)
    assert 0 < spent < 0.01  # settled to the answer's cost, not left at the reservation
    rows = open_ledger(url).query("SELECT requested_model, error, cost_usd, step_kind FROM calls")
    assert len(rows) == 1 and rows[0][0] == "coder" and rows[0][1] is None and rows[0][2] > 0
    assert rows[0][3] == "plan"  # the caller gave no step kind: its messages show the task's first call


def test_an_attempt_cut_partway_then_one_that_answers_are_both_charged_each_with_its_row(tmp_path) -> None:
    """An adapter throws in what an attempt cut partway had used (a stream the provider broke, as
    litellm counted it) and the call goes on to the next target: the provider was paid for both, so
    the budget is charged both and each has its ledger row (the cut one naming its error)."""
    from router_middleware.ledger.store import open_ledger
    from router_middleware.lifecycle import CutShort
    from router_middleware.types import Cost, Outcome, Usage

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                          "fallback": {"backoff_s": 0.0},
                                          "budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}]},
                              "context": {"enabled": False}, "cache": {"enabled": False}, "ledger": {"url": url}})
    sent = []

    def send(attempt: Any) -> Any:
        sent.append(attempt.plan.model)
        if len(sent) == 1:
            spent = Outcome(model=attempt.plan.model, provider="openai", usage=Usage(30, 5, source="estimated"),
                            cost=Cost(4.5e-6, 3e-6, 7.5e-6, source="test"), plan=attempt.plan)
            raise CutShort(litellm.APIConnectionError(message="Connection error.", llm_provider="openai",
                                                      model=attempt.plan.model), spent)
        return litellm.completion(**attempt.plan.request(), mock_response="done")

    response = drivers.drive(p.start(p.make_call("coder", MESSAGES, {"session_id": "s"}, {})).run(), send)
    answered = response.usage.total_tokens
    with pytest.raises(BudgetExceeded) as refused:
        p.completion(model="coder", messages=MESSAGES, mock_response="ok", max_tokens=990)
    p.close()
    assert sent == ["gpt-4o-mini", "gpt-3.5-turbo"] and refused.value.spent == 35 + answered
    rows = open_ledger(url).query("SELECT model, input_tokens, output_tokens, error FROM calls ORDER BY ts")
    assert [tuple(r) for r in rows] == [("gpt-4o-mini", 30, 5, "APIConnectionError"),
                                        ("gpt-3.5-turbo", response.usage.prompt_tokens,
                                         response.usage.completion_tokens, None)]


def test_the_engine_is_what_every_driver_shares() -> None:
    assert issubclass(Pipeline, Engine)


def test_a_store_failing_at_settle_never_breaks_an_answered_call(call, script, span_exporter, tmp_path,
                                                                  monkeypatch) -> None:
    from router_middleware.ledger.store import open_ledger

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = Pipeline.from_config({"routing": {"aliases": {"coder": CODER},
                                          "budgets": [{"name": "team", "scope": "global", "usd": 10.0}]},
                              "context": {"enabled": False}, "cache": {"enabled": False}, "ledger": {"url": url}})

    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store down")

    monkeypatch.setattr(p.store, "add_many", down)
    call(p)  # answered: the settle write fails and is logged, the answer still reaches the caller
    p.close()
    assert script.calls == [CLAUDE]
    (route,) = routes(span_exporter)
    assert route.status.status_code != StatusCode.ERROR
    assert len(open_ledger(url).query("SELECT model FROM calls WHERE error IS NULL")) == 1


@pytest.mark.usefixtures("one_quota_window")
def test_budgets_and_quotas_on_real_redis_through_every_driver(call, script, redis_url, request,
                                                                monkeypatch) -> None:
    """On Redis the async drivers hand admission and settlement to the store's batched asyncio
    client (``aadd_within``/``aadd_many``), the sync ones to its blocking client: same results."""
    import uuid

    from router_middleware.stores.redis import RedisStore

    used: list[str] = []
    for name in ("add_within", "aadd_within", "add_many", "aadd_many"):
        original = getattr(RedisStore, name)

        def spy(self, *args, _name=name, _original=original):
            used.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(RedisStore, name, spy)
    import redis

    admin = redis.Redis.from_url(redis_url)
    for key in admin.scan_iter(f"rm:quota:{CLAUDE}:*"):  # the minute's count is shared by the parameters
        admin.delete(key)
    app = f"drivers-{uuid.uuid4().hex[:8]}"
    p = Pipeline.from_config({"store": redis_url, "app": app,
                              "routing": {"aliases": {"coder": CODER}, "limits": {CLAUDE: {"rpm": 1}},
                                          "budgets": [{"name": "team", "scope": "app", "usd": 10.0}]},
                              "context": {"enabled": False}, "cache": {"enabled": False}})
    call(p)
    call(p)  # claude's one request a minute is taken: the call moves on to gpt-5-mini
    assert script.calls == [CLAUDE, MINI]
    spent = float(p.store.get(f"budget:team:usd:{app}:0"))
    assert 0 < spent < 0.01
    asynchronous = request.node.callspec.params["call"].startswith("a")
    expected = {"aadd_within", "aadd_many"} if asynchronous else {"add_within", "add_many"}
    assert set(used) == expected


def test_agent_middleware_fits_model_settings_to_the_routed_model() -> None:
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.messages import AIMessage, HumanMessage

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

    inner = Pipeline(policies=())
    models = {name: RoutedChatModel(model=name, pipeline=inner) for name in ("openai/o3-mini", "gpt-4o-mini")}
    config = {"routing": {"aliases": {"agent": ["openai/o3-mini", "gpt-4o-mini"]}}, "cache": {"enabled": False}}
    middleware = RouterAgentMiddleware(Pipeline.from_config(config), models=models, model="agent")
    seen: list[dict[str, Any]] = []

    def handler(r: ModelRequest) -> ModelResponse:
        seen.append(dict(r.model_settings))
        return ModelResponse(result=[AIMessage("ok")])

    request = ModelRequest(model=models["gpt-4o-mini"], messages=[HumanMessage("hi")],
                           model_settings={"temperature": 0.2, "reasoning_effort": "minimal"})
    middleware.wrap_model_call(request, handler)
    assert seen == [{"reasoning_effort": "low"}]  # o3-mini: temperature dropped, effort moved to its nearest


async def test_on_redis_an_async_call_stays_on_the_event_loop(redis_url, monkeypatch) -> None:
    """With an alias, a budget and the circuit breaker on Redis, an async call's steps run on the event
    loop and use no worker thread: what planning reads is fetched through the batched client (and
    then kept a second), admission and settlement are batched, and no lesser write is due."""
    import threading
    import uuid

    threads: list[Any] = []
    original = drivers._in_thread

    async def in_thread(work: Any, *args: Any) -> Any:
        threads.append(work)
        return await original(work, *args)

    monkeypatch.setattr(drivers, "_in_thread", in_thread)
    planned: list[int] = []
    plan = Engine.plan

    def spy(self: Engine, *args: Any, **kwargs: Any) -> Any:
        planned.append(threading.get_ident())
        return plan(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "plan", spy)
    p = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "app": f"loop-{uuid.uuid4().hex[:8]}",
                              "routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                          "budgets": [{"name": "team", "scope": "app", "usd": 100.0}]}})
    answers = await asyncio.gather(*(p.acompletion(model="coder", messages=[{"role": "user", "content": f"q{i}"}],
                                                   mock_response="ok", context={"session_id": "s"})
                                     for i in range(20)))
    p.close()
    assert [a.choices[0].message.content for a in answers] == ["ok"] * 20
    assert threads == [] and set(planned) == {threading.get_ident()}


@pytest.mark.parametrize("asynchronous", [False, True], ids=["completion", "acompletion"])
def test_after_idle_a_call_like_an_earlier_one_is_planned_once(redis_url, monkeypatch, asynchronous) -> None:
    """On Redis, what planning read is kept in the process for a second or two. A call that finds it
    gone (after idle) fetches what the last call like it read before planning: one plan, not a plan
    that misses, a fetch and a second plan. A call of another kind (another session) still learns."""
    import time
    import uuid
    from types import SimpleNamespace

    from router_middleware.stores import views

    planned: list[str] = []
    plan = Engine.plan

    def spy(self: Engine, call: Any, *args: Any, **kwargs: Any) -> Any:
        planned.append(call.context.session_id)
        return plan(self, call, *args, **kwargs)

    monkeypatch.setattr(Engine, "plan", spy)
    fetches: list[tuple[list[str], list[str]]] = []
    p = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "app": f"idle-{uuid.uuid4().hex[:8]}",
                              "routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                          "budgets": [{"name": "team", "scope": "app", "usd": 100.0}]}})
    fetch, afetch = p.store.fetch, p.store.afetch  # type: ignore[attr-defined]

    def counted(keys: list[str], lists: list[str] = ()) -> Any:  # type: ignore[assignment]
        fetches.append((sorted(keys), sorted(lists)))
        return fetch(keys, lists)

    async def acounted(keys: list[str], lists: list[str] = ()) -> Any:  # type: ignore[assignment]
        fetches.append((sorted(keys), sorted(lists)))
        return await afetch(keys, lists)

    monkeypatch.setattr(p.store, "fetch", counted)
    monkeypatch.setattr(p.store, "afetch", acounted)

    def ask(session: str) -> None:
        kwargs = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "mock_response": "ok",
                  "context": {"session_id": session}}
        answer = asyncio.run(p.acompletion(**kwargs)) if asynchronous else p.completion(**kwargs)
        assert answer.choices[0].message.content == "ok"

    ask("a")
    assert planned == ["a", "a"] and len(fetches) == 1  # the first call learns what planning reads
    first = fetches[0]
    ask("a")
    assert planned == ["a", "a", "a"] and len(fetches) == 1  # kept in the process: no fetch, one plan
    later = time.monotonic() + 60  # a minute of idle: nothing is kept any more
    monkeypatch.setattr(views, "time", SimpleNamespace(monotonic=lambda: later))
    ask("a")
    assert planned == ["a"] * 4 and fetches == [first, first]  # fetched first, then planned once
    later += 60
    ask("b")
    assert planned == ["a"] * 4 + ["b", "b"] and len(fetches) == 3  # another kind of call learns anew
    p.close()


def test_what_planning_read_is_remembered_per_kind_of_call_and_bounded() -> None:
    """The engine keeps, for each kind of call, what planning the last call of that kind looked up:
    replaced by each call (keys an earlier call read and this one did not are forgotten), at most a
    few dozen keys."""
    from router_middleware.engine import _READS_PER_KIND
    from router_middleware.types import Call

    engine = Engine()
    call = Call.create("coder", [{"role": "user", "content": "hi"}], {}, {"app": "a", "session_id": "s", "step": 1})
    later_step = Call.create("coder", [{"role": "user", "content": "hi"}], {}, {"app": "a", "session_id": "s", "step": 2})
    engine.remember_reads(call, {"cooldown:m": (True, None), "summary:abc": (True, None)})
    assert engine.reads_of(later_step) == {"cooldown:m": (True, None), "summary:abc": (True, None)}  # not the step
    engine.remember_reads(later_step, {"budget:team:1": (True, None)})
    assert engine.reads_of(call) == {"budget:team:1": (True, None)}  # replaced, not added to
    other = Call.create("coder", [{"role": "user", "content": "hi"}], {}, {"app": "a", "session_id": "t"})
    assert engine.reads_of(other) == {}
    engine.remember_reads(call, {f"k{i}": (True, None) for i in range(_READS_PER_KIND + 10)})
    assert len(engine.reads_of(call)) == _READS_PER_KIND
    used = {"cooldown:m": (True, None)}
    engine.remember_reads(call, used)
    used["cooldown:fallback"] = (True, None)  # the call's replan for a fallback looks up more
    assert engine.reads_of(call) == {"cooldown:m": (True, None)}  # a copy: what the first plan looked up


def test_when_the_read_ahead_fails_planning_does_not_ask_the_store_again(redis_url, monkeypatch) -> None:
    """After idle, a call reads ahead what the last call like it read; if the store fails that read,
    what planning then misses reads as missing without a second read (one timeout, not two), and the
    call is answered."""
    import time
    import uuid
    from types import SimpleNamespace

    from router_middleware.stores import views

    p = Pipeline.from_config({"store": redis_url, "cache": {"enabled": False}, "app": f"fail-{uuid.uuid4().hex[:8]}",
                              "routing": {"aliases": {"coder": ["gpt-4o-mini", "gpt-3.5-turbo"]},
                                          "budgets": [{"name": "team", "scope": "app", "usd": 100.0}]}})
    kwargs = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "mock_response": "ok",
              "context": {"session_id": "s"}}
    p.completion(**kwargs)
    remembered = dict(p.reads_of(p.make_call("coder", kwargs["messages"], kwargs["context"], {})))
    assert len(remembered) > 1  # the alias's cooldowns, the model's recent reply sizes
    p.remember_reads(p.make_call("coder", kwargs["messages"], kwargs["context"], {}),
                     {k: r for i, (k, r) in enumerate(remembered.items()) if i})  # one key less: it will be missed
    reads: list[list[str]] = []

    def failing(keys: list[str], lists: list[str] = ()) -> Any:  # type: ignore[assignment]
        reads.append([*keys, *lists])
        raise ConnectionError("redis went away")

    monkeypatch.setattr(p.store, "fetch", failing)
    later = time.monotonic() + 60
    monkeypatch.setattr(views, "time", SimpleNamespace(monotonic=lambda: later))
    answer = p.completion(**kwargs)
    assert answer.choices[0].message.content == "ok"
    assert len(reads) == 1  # the read ahead only; the missed key was not asked for again
    p.close()


@pytest.mark.parametrize(("requested", "answered", "baseline"), [
    ("coder", MINI, CLAUDE),  # the first target failed over: routing cost what the fallback did
    ("coder:floor", DEEPSEEK, CLAUDE),  # the cheapest target, measured against the alias's first
    ("gpt-4o-mini", "gpt-4o-mini", None),  # not routed: nothing saved
])
def test_a_routed_call_s_row_says_what_routing_saved_against_the_alias_s_first_target(
        call, script, tmp_path, requested, answered, baseline) -> None:
    """``saved_routing_usd`` was 0 on every live row: it is the answer's usage priced at the model the
    call would have gone to without routing (an alias's first target) less what it cost, so
    ``baseline_cost_usd`` is what the unrouted call would have been billed."""
    from router_middleware.catalog import Catalog
    from router_middleware.ledger.store import open_ledger
    from router_middleware.pricing import price
    from router_middleware.types import Usage

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    p = pipeline(ledger=url)
    if requested == "coder":
        script.failures[CLAUDE] = [rate_limit()]
    call(p, model=requested)
    p.close()
    with contextlib.closing(open_ledger(url)) as db:
        ((target, inp, out, cost, routing, base),) = db.query(
            "SELECT target, input_tokens, output_tokens, cost_usd, saved_routing_usd, baseline_cost_usd FROM calls")
    assert target == answered and cost > 0
    if baseline is None:
        assert routing == 0 and base == pytest.approx(cost)
        return
    unrouted = price(Usage(inp, out), Catalog().resolve(baseline)).total_usd
    assert routing == pytest.approx(unrouted - cost) and routing > 0  # claude-sonnet-4-5 is the dearest of the three
    assert base == pytest.approx(unrouted)

def _agent_history(turns: int = 30) -> list[dict[str, Any]]:
    """A coding agent's history long enough for a 4k window to trim."""
    history: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent."},
                                     {"role": "user", "content": "Fix the failing test in utils.py."}]
    for i in range(turns):
        history += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": "bash", "arguments": f'{{"cmd": "cat f{i}.py"}}'}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": f"line {i} of the file\n" * 120}]
    return history


def test_a_trimmed_call_s_measured_context_saving_is_the_same_through_every_way_in(call, script, tmp_path) -> None:
    """The ledger's context saving is measured from the usage the provider reported and what the
    context policies changed (``Engine.launch``, ``Bookkeeper.record``): a long agent history trimmed
    by the window gets the same ``saved_context_usd`` through each driver as through
    ``Pipeline.completion``, and it is what :func:`.pricing.context_saving` makes of its row."""
    from router_middleware.ledger.store import open_ledger

    history = _agent_history()

    def saved(driver: Callable[..., Any], folder: Path) -> tuple[float, float, int]:
        url = f"sqlite:///{folder / 'ledger.db'}"
        p = Pipeline.from_config({"context": {"watermark_tokens": 4000}, "cache": {"enabled": False},
                                  "ledger": {"url": url}})
        driver(p, "gpt-4o-mini", history)
        p.close()
        ((value, cost, inp, decisions),) = open_ledger(url).query(
            "SELECT saved_context_usd, cost_usd, input_tokens, decisions FROM calls")
        assert "window:trim" in decisions
        return value, cost, inp

    (tmp_path / "direct").mkdir()
    (tmp_path / "driver").mkdir()
    expected = saved(lambda p, model, messages: p.completion(model=model, messages=messages), tmp_path / "direct")
    got = saved(call, tmp_path / "driver")
    assert expected[0] > 0 and got[0] == pytest.approx(expected[0], rel=0.02), (got, expected)
    assert got[1:] == pytest.approx(expected[1:], rel=0.02)



def test_a_fallback_s_context_saving_is_measured_and_its_target_holds_the_conversation_warm(
        call, script, tmp_path) -> None:
    """A trimmed call that fell back (Claude refused it, gpt-5-mini answered) had no context saving on
    its row (the fallback's plan was never priced), and the conversation was taken as sent to Claude,
    which cached nothing, not to gpt-5-mini: its next call there was priced cold (saving ~13x). Now
    the saving of the attempt that answered is measured, and the next call is priced as after a first
    call gpt-5-mini answered directly."""
    from router_middleware.ledger.store import open_ledger

    history = _agent_history()
    later = [*history, {"role": "assistant", "content": "Looked at all 30 files."}, {"role": "user", "content": "Go on."}]

    def rows(first_model: str, folder: Path) -> list[tuple[str, float, str]]:
        folder.mkdir()
        url = f"sqlite:///{folder / 'ledger.db'}"
        p = Pipeline.from_config({"routing": {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0},
                                              "cooldown": {"failures": 1}},
                                  "context": {"watermark_tokens": 4000}, "cache": {"enabled": False},
                                  "ledger": {"url": url}})
        script.failures[CLAUDE] = [rate_limit()] if first_model == "coder" else []
        call(p, first_model, history)
        call(p, first_model, later)  # through the alias, Claude is cooling down: gpt-5-mini
        p.close()
        return open_ledger(url).query("SELECT target, saved_context_usd, decisions FROM calls ORDER BY ts")

    fell_back = rows("coder", tmp_path / "fallback")
    direct = rows(MINI, tmp_path / "direct")
    assert [r[0] for r in fell_back] == [MINI, MINI]
    assert "routing:fallback" in fell_back[0][2] and "window:trim" in fell_back[0][2]
    assert fell_back[0][1] != 0 and fell_back[0][1] == pytest.approx(direct[0][1], rel=0.02)
    assert fell_back[1][1] == pytest.approx(direct[1][1], rel=0.02), (fell_back, direct)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["wrap_model_call", "awrap_model_call"])
def test_a_fallback_that_admission_moved_on_has_its_context_saving_measured(asynchronous, script, tmp_path) -> None:
    """The fallback's plan was priced before its admission: where admission moved the call on (here a
    target the agent middleware has no model for; also a used-up quota, a half-open probe), the plan
    that went was never priced and its row said no context saving; nor did it say the call had fallen
    back (each plan recorded only its own routing decision)."""
    from langchain.agents.middleware import ModelRequest
    from langchain_core.messages import convert_to_messages

    from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware
    from router_middleware.ledger.store import open_ledger

    history = _agent_history()
    system, rest = history[:1], history[1:]

    def row(model: str, folder: Path) -> tuple[str, float, str]:
        folder.mkdir()
        url = f"sqlite:///{folder / 'ledger.db'}"
        p = Pipeline.from_config({"routing": {"aliases": {"coder": CODER}, "fallback": {"backoff_s": 0.0}},
                                  "context": {"watermark_tokens": 4000}, "cache": {"enabled": False},
                                  "ledger": {"url": url}})
        inner = Pipeline.from_config({"telemetry": {"enabled": False}, "cache": {"enabled": False}}, policies=())
        models = {name: RoutedChatModel(model=name, pipeline=inner) for name in (CLAUDE, DEEPSEEK)}  # no gpt-5-mini
        middleware = RouterAgentMiddleware(p, models=models, model=model)
        request = ModelRequest(model=models[CLAUDE], messages=convert_to_messages(rest),
                               system_message=convert_to_messages(system)[0], model_settings={})
        script.failures[CLAUDE] = [rate_limit()] if model == "coder" else []
        _drive(middleware, request, asynchronous)
        p.close()
        return open_ledger(url).query("SELECT target, saved_context_usd, decisions FROM calls ORDER BY ts")[-1]

    moved_on, direct = row("coder", tmp_path / "coder"), row(DEEPSEEK, tmp_path / "direct")
    assert moved_on[0] == DEEPSEEK and "window:trim" in moved_on[2]
    assert json.loads(moved_on[2]).index("routing:fallback") < json.loads(moved_on[2]).index("routing:skip")
    assert moved_on[1] != 0 and moved_on[1] == pytest.approx(direct[1], rel=0.02), (moved_on, direct)
