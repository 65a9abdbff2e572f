"""Budgets: reserve before, settle after; hard limits fail with the numbers, soft limits downgrade;
concurrent workers on real Redis never overspend beyond what in-flight estimates allow."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from router_middleware import BudgetExceeded, Config, ConfigError, Pipeline, outcome

MESSAGES = [{"role": "user", "content": "hello"}]


def budget_pipeline(store: str = "memory://", **budget) -> Pipeline:
    return Pipeline.from_config({
        "store": store, "cache": {"enabled": False}, "context": {"enabled": False},
        "routing": {"aliases": {"main": ["gpt-4o"], "cheap": ["gpt-4o-mini"]},
                    "budgets": [{"name": "team", "scope": "app", **budget}]},
    })


def call(pipeline: Pipeline, app: str = "a", **params):
    return pipeline.completion(model="main", messages=MESSAGES, mock_response="ok", context={"app": app}, **params)


def test_hard_limit_names_budget_spent_and_limit() -> None:
    p = budget_pipeline(usd=0.0006)
    costs = []
    with pytest.raises(BudgetExceeded) as error:
        for _ in range(100):
            costs.append(outcome(call(p, max_tokens=20)).cost.total_usd)
    assert 0 < len(costs) < 100
    assert error.value.name == "team" and error.value.unit == "usd" and error.value.limit == 0.0006
    assert "budget 'team' (app a) exceeded" in str(error.value)
    assert f"this call's estimate, {error.value.estimate:.6g} usd, does not fit in the" in str(error.value)
    spent = p.state.budget_spent
    key = next(iter(k for k in ["team:usd:a:0"] if spent.get(k) is not None))
    assert spent[key] == pytest.approx(sum(costs))  # reservations settled to the actual costs
    assert outcome(call(p, app="other", max_tokens=20)).usage.output_tokens > 0  # other app, other budget


def test_token_budget_and_window_reset() -> None:
    p = budget_pipeline(tokens=120, window_s=0.5)
    call(p, max_tokens=20)
    with pytest.raises(BudgetExceeded, match="tokens"):
        for _ in range(10):
            call(p, max_tokens=20)
    time.sleep(0.6)
    call(p, max_tokens=20)  # a new window


def test_soft_limit_downgrades_to_a_cheaper_alias() -> None:
    p = budget_pipeline(usd=0.01, soft=0.5, downgrade_to="cheap")
    first = outcome(call(p, max_tokens=20))
    assert first.model == "gpt-4o"
    p.store.incr("budget:team:usd:a:0", 0.006)  # as if other calls had spent it
    second = outcome(call(p, max_tokens=20))
    assert second.model == "gpt-4o-mini"
    assert "past its soft limit" in second.plan.decisions[0].reason


@pytest.mark.parametrize("asynchronous", [False, True], ids=["completion", "acompletion"])
@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
def test_a_soft_limit_downgrades_at_the_same_call_on_every_store(backend, asynchronous, tmp_path, request) -> None:
    """The totals routing reads from SQLite or Redis are kept in the process for a second; a process's
    own reservations and settlements now change what it kept, so its next call sees them. Before, a
    burst on Redis stayed on the expensive model for a second past the soft limit (found by a
    routing trial), where the memory store downgraded at once."""
    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'state.db'}",
           "redis": request.getfixturevalue("redis_url") if backend == "redis" else ""}[backend]
    p = budget_pipeline(url, tokens=1000, soft=0.05, downgrade_to="cheap")  # soft: 50 tokens; a call uses 30
    app = f"soft-{uuid.uuid4().hex[:8]}"
    if asynchronous:
        async def calls() -> list:
            return [await p.acompletion(model="main", messages=MESSAGES, mock_response="ok", context={"app": app},
                                        max_tokens=20) for _ in range(4)]
        answered = [outcome(answer) for answer in asyncio.run(calls())]
    else:
        answered = [outcome(call(p, app=app, max_tokens=20)) for _ in range(4)]
    assert [o.usage.total_tokens for o in answered] == [30] * 4
    assert [o.model for o in answered] == ["gpt-4o", "gpt-4o", "gpt-4o-mini", "gpt-4o-mini"]
    assert "past its soft limit" in answered[2].plan.decisions[0].reason
    p.close()


def test_budget_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs 'usd' or 'tokens'"):
        budget_pipeline()
    with pytest.raises(ConfigError, match="downgrade_to 'nope'"):
        budget_pipeline(usd=1, downgrade_to="nope")


def test_the_refusal_names_whose_counter_is_full_and_what_it_holds() -> None:
    """A tenant's budget names the tenant (each tenant has a counter of its own); what the message
    counts includes the holds of calls still in flight, and says so."""
    p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
        {"name": "per-tenant", "scope": "tenant", "tokens": 100, "window_s": 3600}]}})
    with pytest.raises(BudgetExceeded) as error:
        p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=500,
                     context={"tenant": "acme"})
    assert error.value.scope == "tenant acme"
    assert str(error.value).startswith("budget 'per-tenant' (tenant acme) exceeded: 0 of 100 tokens spent or "
                                       "held by calls in flight; this call's estimate")


def test_a_first_call_whose_own_estimate_is_over_the_limit_is_told_so() -> None:
    p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [{"name": "team", "usd": 0.0001}]}})
    with pytest.raises(BudgetExceeded, match=r"0 of 0.0001 usd spent or held by calls in flight; this call's "
                                             r"estimate, .* usd, does not fit in "
                                             r"the 0.0001 left") as error:
        p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")  # 512 output tokens reserved
    assert error.value.estimate > 0.0001


def test_a_call_for_n_answers_reserves_n_answers_and_learns_one_answer_s_size() -> None:
    """``n`` answers bill ``n`` times the output: a budget that one answer's estimate fits may not fit
    five (the estimate was the same for both, so a hard budget could be passed five times over). The
    size it learns from the reply is one answer's, whatever ``n`` the next call asks."""
    from router_middleware.bookkeeping.keys import OUTPUT

    p = Pipeline.from_config({"cache": {"enabled": False},
                              "routing": {"budgets": [{"name": "team", "tokens": 300}]}})
    p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=100, n=1)
    with pytest.raises(BudgetExceeded, match=r"this call's estimate, (\d+) tokens") as error:
        p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=100, n=5)
    assert error.value.estimate >= 500  # five answers of at most 100 tokens
    p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=100, n=2)
    learned = p.books.recent(OUTPUT, "gpt-4o-mini", None)
    assert learned == [20.0, 10.0]  # litellm's mock reports 20 output tokens whatever n: two answers of 10


def test_two_budgets_of_one_name_are_refused() -> None:
    """The name keys a budget's counters: two of one name (say an app and a user budget) would share them."""
    with pytest.raises(ConfigError, match="'team' is used twice"):
        Pipeline.from_config({"routing": {"budgets": [{"name": "team", "usd": 1},
                                                      {"name": "team", "scope": "user", "usd": 2}]}})


@pytest.mark.parametrize("name", ["", "  ", "team:usd"])
def test_a_budget_name_that_cannot_key_its_counters_is_refused(name: str) -> None:
    """Counters are keyed ``name:unit:whose:window``: a blank name, or one with ``:``, would read as
    another budget's or another scope's counter."""
    with pytest.raises(ConfigError, match=f"budget name {name!r}: give a non-blank name without ':'"):
        Pipeline.from_config({"routing": {"budgets": [{"name": name, "usd": 1}]}})


@pytest.mark.parametrize("config_app", [None, "from-config"])
def test_an_app_budget_holds_calls_that_name_no_app(config_app) -> None:
    """``app`` is the default scope: a service that never names its app is one app, and its budget holds."""
    p = Pipeline.from_config({"cache": {"enabled": False}, "app": config_app,
                              "routing": {"budgets": [{"name": "team", "usd": 0.00005}]}})
    answered = 0
    whose = "app from-config" if config_app else "the calls that name no app"
    with pytest.raises(BudgetExceeded, match=rf"budget 'team' \({whose}\) exceeded"):
        for _ in range(50):
            p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok", max_tokens=5)
            answered += 1
    assert 0 < answered < 50


def test_a_budget_that_cannot_apply_to_a_call_says_so_once() -> None:
    import structlog

    p = Pipeline.from_config({"cache": {"enabled": False},
                              "routing": {"budgets": [{"name": f"per-user-{uuid.uuid4().hex}", "scope": "user",
                                                       "usd": 0.0001}]}})
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")  # names no user: not held
    said = [e for e in logs if e["event"] == "budget_not_applied"]
    assert len(said) == 1 and said[0]["scope"] == "user" and "context={'user': ...}" in said[0]["why"]


def test_a_usd_budget_says_once_per_model_that_it_counted_nothing_for_an_unpriced_model_s_calls() -> None:
    """A model with no price (a fine-tune, a self-hosted endpoint) costs nothing the USD limit can see:
    its calls all pass it. That is said once per budget and model, naming the model and how to price
    it, where it was silent; the token limit of the same budget still counts the calls."""
    import structlog

    p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
        {"name": "team", "scope": "app", "usd": 0.001, "tokens": 10_000}]}})
    with structlog.testing.capture_logs() as logs:
        for model in ("openai/my-finetune", "openai/my-finetune", "openai/other-finetune", "gpt-4o-mini"):
            p.completion(model=model, messages=MESSAGES, mock_response="ok")
    said = [e for e in logs if e["event"] == "budget_usd_unpriced"]
    assert [(e["budget"], e["model"]) for e in said] == [("team", "openai/my-finetune"),
                                                          ("team", "openai/other-finetune")]
    assert "has no price: its calls add nothing to the budget's USD limit" in said[0]["why"]
    assert "models: {openai/my-finetune: {input_per_mtok: ..., output_per_mtok: ...}}" in said[0]["why"]
    priced = Pipeline.from_config({"cache": {"enabled": False}, "models": {  # the advice, followed
        "openai/my-finetune": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        "routing": {"budgets": [{"name": "team", "scope": "app", "usd": 1.0}]}})
    with structlog.testing.capture_logs() as logs:
        priced.completion(model="openai/my-finetune", messages=MESSAGES, mock_response="ok")
    assert [e for e in logs if e["event"] == "budget_usd_unpriced"] == []
    with pytest.raises(BudgetExceeded, match="budget 'team' .* exceeded"):  # its tokens still count
        for _ in range(1000):
            p.completion(model="openai/my-finetune", messages=MESSAGES, mock_response="ok")


def test_an_unpriced_name_whose_answer_is_priced_counts_and_is_not_said_to_pass(monkeypatch) -> None:
    """A deployment name litellm has no price for, whose answer names a priced model (an OpenAI-
    compatible endpoint answering as gpt-3.5-turbo): the call is priced as the model that answered and
    counts toward the USD limit, so nothing says it passes it."""
    import structlog

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fault_server() as (base, _), structlog.testing.capture_logs() as logs:
        p = Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
            {"name": "team", "scope": "app", "usd": 0.0001}]}})
        answered = 0
        with pytest.raises(BudgetExceeded, match="budget 'team' .* exceeded"):
            for _ in range(20):
                p.completion(model="openai/my-prod-deployment", messages=MESSAGES, api_base=f"{base}/healthy/v1")
                answered += 1
    assert 0 < answered < 20
    assert [e for e in logs if e["event"] == "budget_usd_unpriced"] == []


def test_each_pipeline_says_once_that_a_budget_cannot_apply() -> None:
    """Two pipelines of one config object each say it (once): what was said is the engine's own
    record, not a module's keyed by object ids that a later config may reuse."""
    import structlog

    config = Config.model_validate({"cache": {"enabled": False},
                                    "routing": {"budgets": [{"name": "per-tenant", "scope": "tenant", "usd": 1.0}]}})
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            p = Pipeline(config)
            for _ in range(2):
                p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert [e["budget"] for e in logs if e["event"] == "budget_not_applied"] == ["per-tenant", "per-tenant"]


def test_a_budget_that_cannot_apply_is_said_once_by_calls_on_many_threads() -> None:
    """A ``RouterLogger`` plans and records calls on litellm's threads and the event loop at once: a
    budget that cannot apply is still said once, however the threads interleave between the check
    that it was said and the note that it is (here a membership test that lets the others run first)."""
    import structlog

    class Yielding(set[str]):
        def __contains__(self, name: object) -> bool:
            found = super().__contains__(name)
            time.sleep(0.02)  # the other threads run here, between the check and what follows it
            return found

    p = Pipeline.from_config({"cache": {"enabled": False},
                              "routing": {"budgets": [{"name": "per-user", "scope": "user", "usd": 1.0}]}})
    p.books._unapplied = Yielding()
    start = threading.Barrier(32)

    def one() -> None:
        start.wait()
        p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")

    with structlog.testing.capture_logs() as logs:
        _in_threads(32, one)
    assert [e["budget"] for e in logs if e["event"] == "budget_not_applied"] == ["per-user"]


def _in_threads(calls: int, one: Callable[[], None]) -> None:
    """Run ``one`` in ``calls`` threads at once and wait for them all."""
    threads = [threading.Thread(target=one) for _ in range(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _in_two_processes(target: Callable[..., None], args: tuple, *, timeout_s: float) -> list[tuple]:
    """Run ``target(*args, results)`` in two spawned processes; what each put on ``results``."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=target, args=(*args, results)) for _ in range(2)]
    for w in workers:
        w.start()
    outcomes = [results.get(timeout=timeout_s) for _ in workers]
    for w in workers:
        w.join(60)
    return outcomes


def _worker(url: str, app: str, calls: int, output_estimate: int, limit: float, results) -> None:  # spawned
    import os

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    from router_middleware import BudgetExceeded, Pipeline, outcome

    pipeline = Pipeline.from_config({
        "store": url, "cache": {"enabled": False}, "context": {"enabled": False},
        "routing": {"aliases": {"main": ["gpt-4o"]}, "default_output_tokens": output_estimate,
                    "budgets": [{"name": "shared", "scope": "app", "usd": limit}]}})
    ok, refused, spent = 0, 0, 0.0
    lock = threading.Lock()

    def one() -> None:
        nonlocal ok, refused, spent
        try:
            response = pipeline.completion(model="main", messages=[{"role": "user", "content": "hello"}],
                                           mock_response="a reply of a few words", context={"app": app})
            with lock:
                ok += 1
                spent += outcome(response).cost.total_usd
        except BudgetExceeded:
            with lock:
                refused += 1

    _in_threads(calls, one)
    results.put((ok, refused, spent))


@pytest.mark.parametrize(("output_estimate", "limit"), [(512, 0.02), (1, 0.004)],
                         ids=["estimate-above-actual", "estimate-below-actual"])
def test_concurrent_processes_on_redis_respect_the_budget(redis_url, output_estimate, limit) -> None:
    app = f"race-{uuid.uuid4().hex[:8]}"
    outcomes = _in_two_processes(_worker, (redis_url, app, 100, output_estimate, limit), timeout_s=120)
    ok = sum(o[0] for o in outcomes)
    refused = sum(o[1] for o in outcomes)
    spent = sum(o[2] for o in outcomes)
    assert ok + refused == 200 and ok > 0 and refused > 0  # the budget really was contended
    from router_middleware.stores.redis import RedisStore

    recorded = float(RedisStore(redis_url).get(f"budget:shared:usd:{app}:0"))
    assert recorded == pytest.approx(spent, rel=1e-6)  # every reservation settled to the actual cost
    actual = spent / ok
    pipeline = Pipeline()
    estimate = pipeline.catalog.resolve("gpt-4o")
    assert estimate is not None
    estimated = pipeline.state.tokens("gpt-4o", [{"role": "user", "content": "hello"}]) * estimate.input \
        + output_estimate * estimate.output
    # Overspend is bounded by what the calls in flight could add beyond their estimates (200 at most).
    assert spent <= limit + 200 * max(0.0, actual - estimated) + 1e-12
    if estimated >= actual:
        assert spent <= limit + 1e-12  # estimates that cover the cost never overspend


def _admission_config(url: str, limit: float) -> dict:
    return {"store": url, "cache": {"enabled": False}, "context": {"enabled": False},
            "routing": {"aliases": {"main": ["gpt-4o"]}, "budgets": [{"name": "fit", "scope": "app", "usd": limit}]}}


def _admission_worker(url: str, app: str, calls: int, max_tokens: int, limit: float, results) -> None:  # spawned
    import os

    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    from router_middleware import BudgetExceeded, Pipeline

    pipeline = Pipeline.from_config(_admission_config(url, limit))
    ok = refused = 0
    lock = threading.Lock()
    start = threading.Barrier(calls)

    def one() -> None:
        nonlocal ok, refused
        start.wait()  # all calls contend at once
        try:
            pipeline.completion(model="main", messages=MESSAGES, mock_response="a reply of a steady size",
                                max_tokens=max_tokens, context={"app": app})
            with lock:
                ok += 1
        except BudgetExceeded:
            with lock:
                refused += 1

    _in_threads(calls, one)
    results.put((ok, refused))


def test_learned_estimates_admit_the_calls_that_fit_and_never_pass_the_limit(redis_url) -> None:
    """``max_tokens`` twice the real output: once ten replies of this model and app were seen, the
    reservation is what such a call really costs, so (nearly) every call that fits is admitted."""
    from router_middleware.stores.redis import RedisStore

    app = f"fit-{uuid.uuid4().hex[:8]}"
    warm = Pipeline.from_config(_admission_config(redis_url, 1.0))
    for _ in range(10):
        first = warm.completion(model="main", messages=MESSAGES, mock_response="a reply of a steady size",
                                max_tokens=40, context={"app": app})
    reply = outcome(first)
    assert reply.usage.output_tokens == 20  # max_tokens=40 is twice the real output
    cost = reply.cost.total_usd
    key = f"budget:fit:usd:{app}:0"
    warmed = float(RedisStore(redis_url).get(key))
    fits = 150
    limit = warmed + fits * cost + cost / 2
    outcomes = _in_two_processes(_admission_worker, (redis_url, app, 200, 40, limit), timeout_s=180)
    ok = sum(o[0] for o in outcomes)
    assert ok + sum(o[1] for o in outcomes) == 400
    spent = float(RedisStore(redis_url).get(key))
    assert spent <= limit + 1e-12  # never past the limit
    assert spent == pytest.approx(warmed + ok * cost, rel=1e-6)  # every reservation settled
    print(f"admitted {ok} of the {fits} calls that fit; spent {spent - warmed:.6f} of {limit - warmed:.6f}")
    assert ok >= 0.9 * fits, f"admitted {ok} of the {fits} calls that fit"


def test_each_pipeline_says_once_that_its_budget_cannot_apply() -> None:
    import structlog

    name = f"b-{uuid.uuid4().hex}"
    with structlog.testing.capture_logs() as logs:
        for scope in ("user", "tenant"):
            p = Pipeline.from_config({"cache": {"enabled": False},
                                      "routing": {"budgets": [{"name": name, "scope": scope, "usd": 1}]}})
            for _ in range(2):
                p.completion(model="gpt-4o-mini", messages=MESSAGES, mock_response="ok")
    assert [e["scope"] for e in logs if e["event"] == "budget_not_applied"] == ["user", "tenant"]


def test_a_fallback_to_a_dearer_target_is_claimed_at_its_own_price(monkeypatch) -> None:
    """A call's budget hold was priced at its first target only: with that target down, every call was
    admitted at its (free) estimate and billed at the fallback's price, past the limit without end (a
    trial: 40 concurrent calls spent $6.00 where $0.60 was left). Now a later attempt claims what its
    target is estimated at beyond what the call holds; one that does not fit moves the call on to its
    next target, and with none left the budget refuses it."""
    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("SCRIPTED_KEY", "x")
    price = {"max_input_tokens": 100_000, "max_output_tokens": 4096}
    with scripted_upstream(status=500) as (down, _), scripted_upstream() as (up, seen):
        p = Pipeline.from_config({
            "cache": {"enabled": False}, "context": {"enabled": False},
            "models": {"openai/free-model": {"input_per_mtok": 0, "output_per_mtok": 0, **price},
                       # $1 an output token: a call estimated at its max_tokens (100), billed at its 42
                       "openai/dear-model": {"input_per_mtok": 1, "output_per_mtok": 1_000_000, **price}},
            "routing": {
                "deployments": {name: {"model": f"openai/{model}", "api_base": base, "api_key_env": "SCRIPTED_KEY"}
                                for name, model, base in (("down", "free-model", down), ("dear", "dear-model", up),
                                                          ("spare", "free-model", up))},
                "aliases": {"a": ["down", "dear"], "b": ["down", "dear", "spare"]},
                "cooldown": {"failures": 100}, "fallback": {"backoff_s": 0.001, "max_backoff_s": 0.002},
                "budgets": [{"name": "team", "usd": 150}]}})
        spent = []
        with pytest.raises(BudgetExceeded) as refused:
            for _ in range(10):
                spent.append(outcome(p.completion(model="a", messages=MESSAGES, max_tokens=100)).cost.total_usd)
        assert len(spent) == 2 and sum(spent) <= 150  # a third ($84 spent + $100 estimated) does not fit
        assert refused.value.name == "team" and refused.value.limit == 150
        assert len(seen) == 2  # the dear model was never sent the call the budget could not hold
        third = outcome(p.completion(model="b", messages=MESSAGES, max_tokens=100))
    assert third.plan.deployment == "spare" and third.cost.total_usd == 0
    assert any(d.action == "quota" and "budget 'team'" in d.reason for d in third.plan.decisions)


def test_a_call_that_times_out_waiting_for_its_answer_is_charged_its_prompt(monkeypatch, tmp_path) -> None:
    """litellm's ``timeout=`` after the request went out: the whole hold was given back and the row had
    no cost, so an agent looping under a client timeout had no spending limit (a trial: ten requests
    the provider answered, the budget counter at 0). Now its prompt, counted locally, is charged and
    recorded (``usage.source`` estimated); the answer never came, so no output is."""
    import sqlite3

    import litellm

    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("SCRIPTED_KEY", "x")
    with scripted_upstream(delay_s=1.0) as (slow, seen):
        p = Pipeline.from_config({
            "cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": f"sqlite:///{tmp_path}/l.db"},
            "routing": {"deployments": {"slow": {"model": "openai/gpt-4o", "api_base": slow, "api_key_env": "SCRIPTED_KEY"}},
                        "aliases": {"a": ["slow"]}, "budgets": [{"name": "team", "usd": 1.0}]}})
        with pytest.raises(litellm.Timeout):
            p.completion(model="a", messages=MESSAGES, max_tokens=500, timeout=0.3, max_retries=0)
        p.close()
    assert len(seen) == 1
    from router_middleware.routing.budgets import counter_key, scope_value
    from router_middleware.types import AgentContext

    budget = p.config.routing.budgets[0]
    held = float(p.store.get("budget:" + counter_key(budget, scope_value(budget, AgentContext()) or "", "usd",
                                                    time.time())) or 0)
    with sqlite3.connect(tmp_path / "l.db") as db:
        (row,) = db.execute("SELECT input_tokens, output_tokens, cost_usd, ended, error FROM calls").fetchall()
    assert row[0] > 0 and row[1] == 0 and row[3] == "failed" and "Timeout" in row[4]
    assert held == pytest.approx(row[2]) and 0 < held < 0.0001  # the prompt at $2.50 per million, not 500 outputs


def _cheap_then_dear(first: str, dear: str, tmp_path, cheap: tuple[float, float], dearer: tuple[float, float],
                     budget: dict) -> Pipeline:
    """Alias ``a``: the cheap model at ``first``, then the dear one at ``dear`` (each priced input, output
    USD per million tokens), with ``budget`` and a ledger in ``tmp_path``."""
    window = {"max_input_tokens": 100_000, "max_output_tokens": 4096}
    return Pipeline.from_config({
        "cache": {"enabled": False}, "context": {"enabled": False}, "ledger": {"url": f"sqlite:///{tmp_path}/l.db"},
        "models": {"openai/cheap-model": {"input_per_mtok": cheap[0], "output_per_mtok": cheap[1], **window},
                   "openai/dear-model": {"input_per_mtok": dearer[0], "output_per_mtok": dearer[1], **window}},
        "routing": {
            "deployments": {name: {"model": f"openai/{model}", "api_base": base, "api_key_env": "SCRIPTED_KEY"}
                            for name, model, base in (("first", "cheap-model", first), ("dear", "dear-model", dear))},
            "aliases": {"a": ["first", "dear"]}, "fallback": {"backoff_s": 0.001, "max_backoff_s": 0.002},
            "budgets": [budget]}})


def test_a_fallback_s_top_up_the_store_fails_ends_the_call_with_its_hold_given_back(monkeypatch, tmp_path) -> None:
    """A review: a top-up admission the store failed (a budget with ``on_store_error: closed``) raised
    ``StoreUnavailable`` past the call's end: its first hold counted until it lapsed, and it had no
    ledger row."""
    import sqlite3

    from router_middleware import StoreUnavailable

    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("SCRIPTED_KEY", "x")
    with scripted_upstream(status=500) as (down, _), scripted_upstream() as (up, _):
        p = _cheap_then_dear(down, up, tmp_path, (0.1, 0.1), (1, 100),
                             {"name": "team", "usd": 100, "on_store_error": "closed"})
        real, admissions = p.store.add_within, []

        def flaky(*args: object, **kwargs: object) -> object:
            if args[1]:  # holds: the first admission's claim, then the fallback's top-up
                admissions.append(args[1])
                if len(admissions) == 2:
                    raise ConnectionError("the store is down for a moment")
            return real(*args, **kwargs)

        monkeypatch.setattr(p.store, "add_within", flaky)
        with pytest.raises(StoreUnavailable):
            p.completion(model="a", messages=MESSAGES, max_tokens=100)
        p.close()
    assert len(admissions) == 2 and not any(p.store._holds.values())  # the first hold given back at once
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("SELECT ended FROM calls").fetchall() == [("failed",)]


def test_a_budget_held_twice_is_charged_once_even_across_its_window() -> None:
    """A review: a top-up taken after the budget's window began again is on the next window's counter;
    the settlement charged the actual amount on both."""
    from router_middleware.bookkeeping.budgets import Claim, Reservation, settlement

    first = Claim("budget:team:usd:-:100", 0.001, 1.0, 8.0, "team", "usd", "h", 600.0)
    top_up = Claim("budget:team:usd:-:101", 0.002, 1.0, 8.0, "team", "usd", "h2", 600.0)
    releases = settlement(Reservation([first, top_up]), usd=0.0025, tokens=None, reasoning=None)
    assert [(key, actual) for key, _, _, actual, _ in releases] == [
        ("budget:team:usd:-:100", 0.0025), ("budget:team:usd:-:101", 0.0)]


def test_a_timed_out_attempt_whose_next_target_is_refused_is_charged_once(monkeypatch, tmp_path) -> None:
    """A review: the timed-out attempt's prompt was settled on its own, then settled again when the next
    target's admission refused the call (a top-up that did not fit): two rows and twice the charge."""
    import sqlite3

    from .scripted_upstream import scripted_upstream

    monkeypatch.setenv("SCRIPTED_KEY", "x")
    with scripted_upstream(delay_s=1.0) as (slow, _), scripted_upstream() as (up, dear_seen):
        p = _cheap_then_dear(slow, up, tmp_path, (100, 0.1), (100, 100), {"name": "team", "usd": 0.01})
        with pytest.raises(BudgetExceeded):
            p.completion(model="a", messages=MESSAGES, max_tokens=1000, timeout=0.3, max_retries=0)
        p.close()
    from router_middleware.routing.budgets import counter_key, scope_value
    from router_middleware.types import AgentContext

    budget = p.config.routing.budgets[0]
    held = float(p.store.get("budget:" + counter_key(budget, scope_value(budget, AgentContext()) or "", "usd",
                                                    time.time())) or 0)
    with sqlite3.connect(tmp_path / "l.db") as db:
        rows = db.execute("SELECT cost_usd, ended FROM calls").fetchall()
    assert len(dear_seen) == 0 and len(rows) == 1 and rows[0][1] == "failed"
    assert rows[0][0] > 0 and held == pytest.approx(rows[0][0])


def test_a_connect_timeout_is_not_charged_a_prompt(monkeypatch) -> None:
    """A request that never left the process (the connection itself timed out: a host that drops
    packets) reached no provider: nothing is charged (a review found its prompt charged)."""
    import socket

    import litellm

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []  # fill the accept backlog: a further connect then never completes
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.skip("this kernel completes connects past a full backlog")
    except (TimeoutError, OSError):
        pass
    finally:
        probe.close()
    monkeypatch.setenv("SCRIPTED_KEY", "x")
    p = Pipeline.from_config({
        "cache": {"enabled": False}, "context": {"enabled": False},
        "routing": {"deployments": {"far": {"model": "openai/gpt-4o", "api_base": f"http://127.0.0.1:{port}/v1",
                                            "api_key_env": "SCRIPTED_KEY"}},
                    "aliases": {"a": ["far"]}, "budgets": [{"name": "team", "usd": 1.0}]}})
    try:
        with pytest.raises((litellm.Timeout, litellm.APIConnectionError)):
            p.completion(model="a", messages=MESSAGES, max_tokens=100, timeout=0.5, max_retries=0)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert not [v for k, v in p.store._data.items() if k.startswith("budget:") and float(v[0] or 0)]
