"""Agent sessions that keep their cache: session affinity, escalation per step, step-kind tiers."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import pytest

from router_middleware import ConfigError, Pipeline, outcome
from router_middleware.routing.affinity import usd
from router_middleware.types import Outcome, SessionRoute

TIERS = [{"max_score": 0.3, "alias": "cheap"}, {"max_score": 1.0, "alias": "strong"}]
HARD = ("Prove step by step why this deadlocks and design a fix:\nTraceback (most recent call last):\n"
        + "```python\ndef run():\n    return lock.acquire()\n```\n" * 5)
# The same input and cache prices, output a little cheaper on gpt-4o-mini: a switch saves $0.0015 a call
# (512 output tokens x $3/M) and re-reads the history once at $2.7/M above the cache-read price.
CLOSE_PRICES = {"gpt-4o": {"input_per_mtok": 3.0, "cache_read_per_mtok": 0.3, "output_per_mtok": 15.0},
                "gpt-4o-mini": {"input_per_mtok": 3.0, "cache_read_per_mtok": 0.3, "output_per_mtok": 12.0}}
STAY = re.compile(r"stay on gpt-4o: a switch to gpt-4o-mini re-reads ([\d,]+) tokens for \$([\d.]+) and saves "
                  r"\$([\d.]+) a call: pays back after ([\d,]+) calls \(horizon 10\)")


def pipeline(store: str = "memory://", models: dict[str, Any] | None = None, **routing: Any) -> Pipeline:
    config = {"store": store, "models": models or {}, "context": {"enabled": False}, "cache": {"enabled": False},
              "routing": {"aliases": {"cheap": ["gpt-4o-mini"], "strong": ["gpt-4o"]}, "tiers": TIERS, **routing}}
    return Pipeline.from_config(config)


def call(p: Pipeline, messages: list[dict[str, Any]], session: str | None = "s1", **context: Any) -> Outcome:
    ctx = {"session_id": session, **context} if session else context or None
    return outcome(p.completion(model="auto", messages=messages, mock_response="ok", context=ctx))


def history(turns: int, last: str = "thanks, hi") -> list[dict[str, Any]]:
    """The hard task, ``turns`` easy exchanges of about 1,000 tokens each, then an easy ``last`` question."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": HARD}, {"role": "assistant", "content": "done"}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"Note {i}. " + "We read the notes once more. " * 80})
        messages.append({"role": "assistant", "content": f"Noted {i}. " + "The notes are fine. " * 80})
    return [*messages, {"role": "user", "content": last}]


def actions(result: Outcome) -> list[str]:
    assert result.plan is not None
    return [f"{d.policy}:{d.action}" for d in result.plan.decisions]


def decision(result: Outcome, action: str) -> str:
    assert result.plan is not None
    return next(d.reason for d in result.plan.decisions if d.policy == "routing" and d.action == action)


def remembered(p: Pipeline, session: str = "s1") -> SessionRoute | None:
    raw = p.store.get("route:" + session)
    return SessionRoute.decode(raw) if raw is not None else None


def test_the_first_call_of_a_session_routes_freely_and_is_remembered() -> None:
    p = pipeline()
    first = call(p, [{"role": "user", "content": HARD}])
    assert first.model == "gpt-4o" and actions(first) == ["routing:route"]
    assert remembered(p) == SessionRoute("gpt-4o", "strong")
    other = call(p, [{"role": "user", "content": "hi"}], session="s2")  # another session: free, on its own
    assert other.model == "gpt-4o-mini" and remembered(p, "s2") == SessionRoute("gpt-4o-mini", "cheap")
    later = asyncio.run(p.acompletion(model="auto", messages=[{"role": "user", "content": "hi"}],
                                      mock_response="ok", context={"session_id": "s3"}))  # the async path too
    assert outcome(later).model == "gpt-4o-mini" and remembered(p, "s3") == SessionRoute("gpt-4o-mini", "cheap")


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_session_stays_when_a_switch_does_not_pay_back_with_its_numbers(backend: str, tmp_path) -> None:
    store = "memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'state.db'}"
    p = pipeline(store, CLOSE_PRICES)
    assert call(p, [{"role": "user", "content": HARD}]).model == "gpt-4o"
    long = history(40)  # ~39k tokens, an easy last question: the difficulty says cheap
    stayed = call(p, long)
    assert stayed.model == "gpt-4o" and actions(stayed) == ["routing:route", "routing:stay"]
    match = STAY.fullmatch(decision(stayed, "stay"))
    assert match, decision(stayed, "stay")
    tokens, once, saving, calls = (float(g.replace(",", "")) for g in match.groups())
    assert 35_000 < tokens < 50_000
    assert once == pytest.approx(tokens * 2.7e-6, rel=0.05) and saving == pytest.approx(512 * 3e-6, rel=0.05)
    assert calls == pytest.approx(once / saving, rel=0.1) and calls > 10
    assert "the session stays on gpt-4o" in decision(stayed, "route")
    assert stayed.plan is not None and stayed.plan.fallbacks == ("gpt-4o-mini",)
    considered = stayed.plan.decisions[0].attributes["considered"]
    assert considered == "gpt-4o: chosen; gpt-4o-mini: ranked first; the session's cache is on gpt-4o"
    fresh = call(p, long, session="s9")  # the same request in a new session goes to the cheap tier
    assert fresh.model == "gpt-4o-mini" and actions(fresh) == ["routing:route"]


def test_a_session_moves_when_the_switch_pays_back() -> None:
    p = pipeline(models=CLOSE_PRICES)
    call(p, [{"role": "user", "content": HARD}])
    moved = call(p, history(1))  # ~1k tokens: re-read for ~$0.003, saving $0.0015 a call
    assert moved.model == "gpt-4o-mini" and actions(moved) == ["routing:route", "routing:switch"]
    assert re.fullmatch(r"switch from gpt-4o to gpt-4o-mini: it re-reads [\d,]+ tokens for \$[\d.]+ and saves "
                        r"\$0\.0015 a call: pays back after 2 calls \(horizon 10\)", decision(moved, "switch"))
    assert remembered(p) == SessionRoute("gpt-4o-mini", "cheap")
    # At the catalog's prices gpt-4o-mini is far cheaper: even the long history pays back at once.
    q = pipeline()
    call(q, [{"role": "user", "content": HARD}])
    cheap = call(q, history(40))
    assert cheap.model == "gpt-4o-mini" and "pays back after less than 1 call" in decision(cheap, "switch")


def test_a_session_leaves_a_model_that_cannot_serve_it() -> None:
    p = pipeline(models=CLOSE_PRICES)
    call(p, [{"role": "user", "content": HARD}])
    p.store.set("cooldown:gpt-4o", str(time.time() + 60).encode())
    left = call(p, history(40))
    assert left.model == "gpt-4o-mini"
    assert re.fullmatch(r"leave gpt-4o: cooling down for \d+s after repeated failures", decision(left, "switch"))


def test_a_longer_horizon_lets_the_long_history_move() -> None:
    p = pipeline(models=CLOSE_PRICES, affinity={"horizon_calls": 200})
    call(p, [{"role": "user", "content": HARD}])
    assert call(p, history(40)).model == "gpt-4o-mini"


def test_a_move_up_never_pays_back_so_the_session_stays() -> None:
    p = pipeline()
    assert call(p, [{"role": "user", "content": "hi"}]).model == "gpt-4o-mini"
    hard = call(p, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": HARD}])
    assert hard.model == "gpt-4o-mini"
    assert re.fullmatch(r"stay on gpt-4o-mini: a switch to gpt-4o re-reads [\d,]+ tokens for \$[\d.]+ and costs "
                        r"\$[\d.]+ more a call: never pays back", decision(hard, "stay"))


def test_without_a_session_id_routing_is_as_before() -> None:
    p = pipeline(models=CLOSE_PRICES)
    assert call(p, [{"role": "user", "content": HARD}], session=None).model == "gpt-4o"
    later = call(p, history(40), session=None)
    assert later.model == "gpt-4o-mini" and actions(later) == ["routing:route"]
    assert later.plan is not None and "good_steps" not in later.plan.decisions[0].attributes
    assert p.store.get("route:") is None and p.store.get("route:None") is None


def tool_turn(n: int, result: str) -> list[dict[str, Any]]:
    """An assistant turn running ``pytest -k t<n>`` and its tool result."""
    call_id = f"c{n}"
    return [{"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
        "name": "run", "arguments": f'{{"cmd": "pytest -k t{n}"}}'}}]},
            {"role": "tool", "tool_call_id": call_id, "content": result}]


def test_escalation_after_a_traceback_and_return_after_k_good_steps() -> None:
    p = pipeline(escalation={"return_after": 3})
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi, run the tests"}]
    assert call(p, messages).model == "gpt-4o-mini"
    messages += tool_turn(1, "Traceback (most recent call last):\n  File \"t.py\", line 3\nValueError: bad")
    failed = call(p, messages)
    assert failed.model == "gpt-4o"
    assert actions(failed) == ["routing:escalate", "routing:route", "routing:switch"]
    assert decision(failed, "escalate") == ("the last tool result shows an error: one tier up, cheap -> strong "
                                            "(back after 3 good steps)")
    assert re.fullmatch(r"move up from gpt-4o-mini to gpt-4o \(escalated\): re-reads \d+ tokens for \$[\d.]+ and costs "
                        r"\$[\d.]+ more a call", decision(failed, "switch"))
    assert remembered(p) == SessionRoute("gpt-4o", "strong", "strong", 0)
    for step in (2, 3):  # good steps: held on the strong tier
        messages += tool_turn(step, "<returncode>0</returncode>\n1 passed")
        good = call(p, messages)
        assert good.model == "gpt-4o" and actions(good) == ["routing:route"]
        assert remembered(p) == SessionRoute("gpt-4o", "strong", "strong", step - 1)
    messages += tool_turn(4, "<returncode>0</returncode>\n1 passed")
    back = call(p, messages)  # the third good step: the tier is free again and the move down pays back
    assert back.model == "gpt-4o-mini"
    assert actions(back) == ["routing:return", "routing:route", "routing:switch"]
    assert decision(back, "return").startswith("3 good steps since the escalation to strong")
    assert decision(back, "switch").startswith("switch from gpt-4o to gpt-4o-mini: it re-reads ")
    assert remembered(p) == SessionRoute("gpt-4o-mini", "cheap")


def test_tiers_that_share_models_remember_the_tier_the_session_was_routed_at() -> None:
    p = pipeline(models=CLOSE_PRICES, aliases={"cheap": ["gpt-4o-mini", "gpt-4o"], "strong": ["gpt-4o", "gpt-4o-mini"]})
    assert call(p, [{"role": "user", "content": HARD}]).model == "gpt-4o"
    stayed = call(p, history(40))  # routed at cheap, kept on gpt-4o: it is still on the strong tier
    assert stayed.model == "gpt-4o" and remembered(p) == SessionRoute("gpt-4o", "strong")
    messages = [*history(40)[:-1], *tool_turn(1, "<returncode>1</returncode>")]
    failed = call(p, messages)  # one tier up from strong: the top, so it stays
    assert failed.model == "gpt-4o" and decision(failed, "escalate").startswith(
        "the last tool result shows an error: one tier up, stays on the top tier strong")


def test_escalation_can_be_turned_off() -> None:
    p = pipeline(escalation={"enabled": False})
    messages: list[dict[str, Any]] = [{"role": "user", "content": "hi, run the tests"}]
    call(p, messages)
    messages += tool_turn(1, "<returncode>2</returncode>\nerror")
    assert call(p, messages).model == "gpt-4o-mini"


def test_step_kind_tiers_raise_plan_steps() -> None:
    p = pipeline(step_kind_tiers={"plan": "strong"})
    plan = call(p, [{"role": "user", "content": "hi"}], session=None, step_kind="plan")
    assert plan.model == "gpt-4o"
    assert plan.plan is not None and "step kind plan -> tier strong" in plan.plan.decisions[0].reason
    observe = call(p, [{"role": "user", "content": "hi"}], session=None, step_kind="observe")
    assert observe.model == "gpt-4o-mini"
    inferred = call(p, [{"role": "user", "content": "hi"}], session=None)  # a new instruction: a plan step
    assert inferred.model == "gpt-4o"
    # In a session the plan step moves it up; the next observe step goes back down only if that pays back.
    q = pipeline(models=CLOSE_PRICES, step_kind_tiers={"plan": "strong"})
    assert call(q, [{"role": "user", "content": "hi"}], step_kind="observe").model == "gpt-4o-mini"
    up = call(q, history(40), step_kind="plan")
    assert up.model == "gpt-4o" and decision(up, "switch").startswith("move up from gpt-4o-mini to gpt-4o (step kind plan)")
    assert call(q, history(40), step_kind="observe").model == "gpt-4o"  # stays: the long history does not pay back


def test_config_is_validated_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"step_kind_tiers\.plan: 'nope' is not the alias of a tier"):
        pipeline(step_kind_tiers={"plan": "nope"})
    with pytest.raises(ConfigError, match=r"field 'routing\.affinity\.horizon_calls'"):
        pipeline(affinity={"horizon_calls": 0})
    with pytest.raises(ConfigError, match=r"field 'routing\.escalation\.return_after'"):
        pipeline(escalation={"return_after": 0})
    with pytest.raises(ConfigError, match=r"field 'routing\.affinity\.ttl'"):
        pipeline(affinity={"ttl": 60})


def test_a_session_record_the_store_cannot_read_routes_freely() -> None:
    p = pipeline()
    p.store.set("route:s1", b"not json")
    assert call(p, [{"role": "user", "content": "hi"}]).model == "gpt-4o-mini"
    assert remembered(p) == SessionRoute("gpt-4o-mini", "cheap")


def test_usd_has_two_significant_digits_and_no_exponent() -> None:
    assert [usd(x) for x in (0.1234, 0.004, 0.0000123, 2.0, 1234.0)] == ["$0.12", "$0.004", "$0.000012", "$2", "$1200"]


def test_behind_the_litellm_proxy_a_derived_session_escalates_after_a_traceback() -> None:
    """The proxy hook (sessions derived from the conversation, as for Cline) and a real litellm Router."""
    import litellm

    from router_middleware.litellm import RouterLogger

    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, _seen):
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": f"openai/{model}", "api_base": up, "api_key": "x"}}
            for name, model in (("cheap", "gpt-4o-mini"), ("strong", "gpt-4o"))])
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"cheap": {"model": "openai/gpt-4o-mini"}, "strong": {"model": "openai/gpt-4o"}},
                        "aliases": {"easy": ["cheap"], "hard": ["strong"]},
                        "tiers": [{"max_score": 0.3, "alias": "easy"}, {"max_score": 1.0, "alias": "hard"}]},
            "cache": {"enabled": False}}), proxy=True).register()
        messages: list[dict[str, Any]] = [{"role": "user", "content": "hi, run the tests"}]
        sent: list[str] = []
        store, written = logger.pipeline.store, []
        put = store.set
        store.set = lambda key, *a: put(key, *a) or written.append(key)  # type: ignore[method-assign]

        async def step(n: int) -> None:
            data = {"model": "auto", "messages": messages, "litellm_call_id": f"p{n}"}
            changed = await logger.async_pre_call_hook(None, None, data, "acompletion")
            sent.append(changed["model"])
            await router.acompletion(**changed)
            for _ in range(200):  # the success event settles the call (and writes its route) in the background
                if len(written) >= n:
                    break
                await asyncio.sleep(0.02)

        try:
            async def run() -> None:
                await step(1)  # the run's first call: its own session (head-<h>-first-<r>)
                messages.extend(tool_turn(1, "<returncode>0</returncode>"))
                await step(2)  # the run's session from here on (head-<h>-<a>)
                messages.extend(tool_turn(2, "Traceback (most recent call last):\nKeyError: 'x'"))
                await step(3)
                for n in (4, 5, 6):  # good steps: held on the strong tier (remembered), back after the third
                    messages.extend(tool_turn(n, "<returncode>0</returncode>"))
                    await step(n)
            asyncio.run(run())
        finally:
            logger.unregister()
    assert sent == ["cheap", "cheap", "strong", "strong", "strong", "cheap"]


def test_session_route_is_what_a_replay_can_remember_without_a_store() -> None:
    from router_middleware.routing.affinity import session_route

    p = pipeline()
    plan = p.plan(p.make_call("auto", [{"role": "user", "content": HARD}], {"session_id": "r"}, {}))
    assert session_route(plan) == SessionRoute("gpt-4o", "strong")
    assert session_route(p.plan(p.make_call("auto", [{"role": "user", "content": HARD}], None, {}))) is None
    assert session_route(p.plan(p.make_call("gpt-4o", [{"role": "user", "content": "hi"}], {"session_id": "r"}, {}))) \
        is None  # a concrete model is not routed through tiers
