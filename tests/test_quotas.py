"""Free tiers and rate limits: OpenRouter ``:free`` variants first while the account's free quota
lasts, then the paid variant without failing; per-deployment RPM/TPM limits of our own; quotas
corrected from the providers' rate-limit headers (real header shapes, served on loopback)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from router_middleware import ConfigError, Pipeline, bookkeeping, outcome
from router_middleware.bookkeeping import Bookkeeper, Held
from router_middleware.catalog import Catalog
from router_middleware.config import FreeTierConfig, RateLimit, RoutingConfig
from router_middleware.routing import quotas
from router_middleware.routing.policy import NoRouteError
from router_middleware.stores import open_store

from .fault_server import fault_server

PAID = "openrouter/deepseek/deepseek-chat"
FREE = f"{PAID}:free"
MESSAGES = [{"role": "user", "content": "Rename the variable x to count in utils.py"}]


def free_pipeline(rpd: int | None = None, **free: object) -> Pipeline:
    return Pipeline.from_config({
        "routing": {"aliases": {"coder": [PAID, "gpt-4o-mini"]},
                    "free_tier": {"prefer": True, "models": ["*"], **({"rpd": rpd} if rpd else {}), **free}},
        "context": {"enabled": False}, "cache": {"enabled": False},
    })


@pytest.mark.usefixtures("one_quota_window")
def test_free_variant_first_then_paid_when_the_daily_quota_is_used() -> None:
    p = free_pipeline(rpd=3)
    answered = [outcome(p.completion("coder", MESSAGES, mock_response="ok")) for _ in range(5)]
    assert [o.plan.model for o in answered] == [FREE] * 3 + [PAID] * 2  # none failed
    assert all(o.cost.total_usd == 0 for o in answered[:3]) and answered[3].cost.total_usd > 0
    assert answered[0].cost.source.startswith("free")
    considered = answered[3].plan.decisions[0].attributes["considered"]
    assert f"{FREE}: openrouter:free: rpd limit 3 reached (3 used today (UTC))" in considered


def test_free_tier_limits_follow_openrouters_credit_rule() -> None:
    assert FreeTierConfig().limit() == RateLimit(rpm=20, rpd=50)
    assert FreeTierConfig(credits_purchased_usd=10).limit() == RateLimit(rpm=20, rpd=1000)
    assert FreeTierConfig(rpd=7).limit().rpd == 7
    with pytest.raises(ConfigError, match="free_tier.prefer needs 'models'"):
        Pipeline.from_config({"routing": {"free_tier": {"prefer": True}}})
    with pytest.raises(ConfigError, match="routing.limits.a.rpm"):
        Pipeline.from_config({"routing": {"limits": {"a": {"rpm": 0}}}})


@pytest.mark.usefixtures("one_quota_window")
def test_the_free_quota_is_shared_by_every_free_model_per_minute() -> None:
    routing = RoutingConfig(aliases={"a": [PAID], "b": ["openrouter/meta-llama/llama-3.3-70b-instruct"]},
                            free_tier=FreeTierConfig(prefer=True, models=["*"], rpm=2))
    p = Pipeline.from_config({"routing": routing.model_dump(), "context": {"enabled": False},
                              "cache": {"enabled": False}})
    models = [outcome(p.completion(alias, MESSAGES, mock_response="ok")).plan.model for alias in "abab"]
    assert models == [FREE, "openrouter/meta-llama/llama-3.3-70b-instruct:free", PAID,
                      "openrouter/meta-llama/llama-3.3-70b-instruct"]


def test_free_preference_only_for_listed_models() -> None:
    p = free_pipeline(models=["openrouter/some/other-model"])
    assert outcome(p.completion("coder", MESSAGES, mock_response="ok")).plan.model == PAID


def _limited(limits: dict, alias: list[str]) -> Pipeline:
    return Pipeline.from_config({"routing": {"aliases": {"pool": alias}, "limits": limits},
                                 "context": {"enabled": False}, "cache": {"enabled": False}})


@pytest.mark.usefixtures("one_quota_window")
def test_own_rpm_limit_spills_over_and_then_names_the_limit() -> None:
    p = _limited({"gpt-4o-mini": {"rpm": 3}}, ["gpt-4o-mini", "gpt-3.5-turbo"])
    models = [outcome(p.completion("pool", MESSAGES, mock_response="ok")).model for _ in range(5)]
    assert models == ["gpt-4o-mini"] * 3 + ["gpt-3.5-turbo"] * 2
    alone = _limited({"gpt-4o-mini": {"rpm": 2}}, ["gpt-4o-mini"])
    for _ in range(2):
        alone.completion("pool", MESSAGES, mock_response="ok")
    with pytest.raises(NoRouteError) as refused:  # the model's own quota names it once
        alone.completion("pool", MESSAGES, mock_response="ok")
    assert str(refused.value) == ("no model of 'pool' can serve this request "
                                  "(gpt-4o-mini: rpm limit 2 reached (2 used this minute))")


@pytest.mark.usefixtures("one_quota_window")
def test_tpm_limit_counts_the_reported_tokens() -> None:
    p = _limited({"gpt-4o-mini": {"tpm": 200}}, ["gpt-4o-mini", "gpt-3.5-turbo"])
    first = outcome(p.completion("pool", MESSAGES, mock_response="ok", max_tokens=50))
    key = "quota:" + quotas.window("gpt-4o-mini", "tpm", time.time())[0]  # the window the call counted in
    assert float(p.store.get(key)) == first.usage.total_tokens  # settled from the estimate to the actual
    models = [outcome(p.completion("pool", MESSAGES, mock_response="ok", max_tokens=50)).model for _ in range(8)]
    assert "gpt-3.5-turbo" in models
    assert float(p.store.get(key)) <= 200


def admit(books: Bookkeeper, held: Held, found: tuple[quotas.Quota, ...], tokens: int) -> str | None:
    """Admit an attempt of ``tokens`` to the ``found`` quotas as a call's lifecycle does: the
    bookkeeper's admission, the store's one atomic ``add_within``, the bookkeeper's reading of its
    answer (``held`` keeps what was taken); why not, or ``None``."""
    admission = books.admission(found, tokens, [])
    assert admission is not None
    refusal = books.store.add_within(admission.entries, admission.holds, admission.owned, admission.left)
    return books.admitted(held, admission, refusal)


def pin_clock(monkeypatch, now: float) -> None:
    """The bookkeeper's clock (its windows' minute keys) stands at ``now``."""
    monkeypatch.setattr(bookkeeping, "time", SimpleNamespace(time=lambda: now))


def test_an_admission_is_atomic_and_gives_back_on_refusal(monkeypatch) -> None:
    books = Bookkeeper(open_store("memory://"), RoutingConfig(), Catalog())
    found = (quotas.Quota("d", RateLimit(rpm=2, tpm=100)),)
    pin_clock(monkeypatch, 1_000_000.0)  # minute 16666
    first = Held()
    assert admit(books, first, found, 60) is None
    refused = Held()
    assert admit(books, refused, found, 60) == "d: tpm limit 100 reached (60 used this minute)"
    assert refused.quota is None
    assert float(books.store.get("quota:d:rpm:16666")) == 1.0  # the refused request was not taken
    books.attempt_failed(first, "d", TimeoutError("no answer"))  # a failed attempt: its tokens come back
    assert float(books.store.get("quota:d:tpm:16666")) == 0.0 and float(books.store.get("quota:d:rpm:16666")) == 1.0


@pytest.mark.parametrize(("headers", "expected"), [
    ({"x-ratelimit-remaining-requests": "4999", "llm_provider-x-ratelimit-reset-requests": "12ms",
      "x-ratelimit-remaining-tokens": "159974", "llm_provider-x-ratelimit-reset-tokens": "6m0s"},
     {"requests": (4999.0, 100.012), "tokens": (159974.0, 460.0)}),
    ({"llm_provider-anthropic-ratelimit-requests-remaining": "49",
      "llm_provider-anthropic-ratelimit-requests-reset": "1970-01-01T00:01:40Z"}, {}),  # reset already past
    ({"retry-after": "7"}, {"requests": (0.0, 107.0)}),
])
def test_provider_view_reads_each_header_family(headers, expected) -> None:
    view = quotas.provider_view(headers, now=100.0)
    assert {k: (v[0], round(v[1], 3)) for k, v in view.items()} == expected


def test_openrouter_epoch_millisecond_reset() -> None:
    view = quotas.provider_view({"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                                 "X-RateLimit-Reset": "1700000060000"}, now=1_700_000_000.0)
    assert view == {"requests": (0.0, 1_700_000_060.0)}


def test_anthropic_iso_reset() -> None:
    view = quotas.provider_view({"llm_provider-anthropic-ratelimit-requests-remaining": "49",
                                 "llm_provider-anthropic-ratelimit-requests-reset": "2024-10-20T22:48:55Z"},
                                now=1729464500.0)
    assert view == {"requests": (49.0, 1729464535.0)}


def _deployments(base: str, **extra: dict) -> dict:
    return {name: {"model": model, "api_base": f"{base}/{path}/v1", "api_key_env": "OPENAI_API_KEY"}
            for name, (model, path) in {"free": (FREE, "exhausted"), "paid": (PAID, "healthy"),
                                         "limited": ("openai/gpt-3.5-turbo", "limited"),
                                         "spare": ("openai/gpt-3.5-turbo", "healthy"), **extra}.items()}


def test_a_free_tier_429_blocks_every_free_model_until_the_reset(monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fault_server() as (base, seen):
        p = Pipeline.from_config({
            "routing": {"deployments": _deployments(base), "aliases": {"coder": ["free", "paid"]},
                        "fallback": {"backoff_s": 0.0}, "cooldown": {"failures": 100}},
            "context": {"enabled": False}, "cache": {"enabled": False},
        })
        first = outcome(p.completion("coder", MESSAGES))
        assert first.model == "gpt-3.5-turbo-0125" and first.plan.deployment == "paid"  # fell over, no failure
        assert float(p.store.get("quota:openrouter:free:left:requests")) <= 0
        for _ in range(3):
            assert outcome(p.completion("coder", MESSAGES)).plan.deployment == "paid"
        assert seen["exhausted:ok"] == 1  # not asked again before its reset


def test_a_free_tier_429_with_no_reset_blocks_every_free_model_for_a_minute(monkeypatch) -> None:
    """Without a reset the free model was asked again on every call, each one a 429 and a fall-over
    (found by a routing trial)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fault_server() as (base, seen):
        p = Pipeline.from_config({
            "routing": {"deployments": _deployments(base, free=(FREE, "bare429")), "aliases": {"coder": ["free", "paid"]},
                        "fallback": {"backoff_s": 0.0}, "cooldown": {"failures": 100}},
            "context": {"enabled": False}, "cache": {"enabled": False},
        })
        assert [outcome(p.completion("coder", MESSAGES)).plan.deployment for _ in range(4)] == ["paid"] * 4
        assert seen["bare429:ok"] == 1
        assert float(p.store.get("quota:openrouter:free:left:requests")) <= 0
        _, expires = p.store._data["quota:openrouter:free:left:requests"]  # the memory store's (value, expiry)
        assert expires is not None and 55 < expires - time.monotonic() <= 60


def _deployment_used(result: object) -> str | None:
    for _ in result if not hasattr(result, "choices") else ():  # consume a stream
        pass
    return outcome(result).plan.deployment


@pytest.mark.parametrize("stream", [False, True])
def test_remaining_request_headers_correct_our_count(monkeypatch, stream) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fault_server(limited_requests=3) as (base, seen):
        p = Pipeline.from_config({
            "routing": {"deployments": _deployments(base), "aliases": {"pool": ["limited", "spare"]},
                        "limits": {"limited": {"rpm": 100}}},  # ours is generous; the provider's is 3
            "context": {"enabled": False}, "cache": {"enabled": False},
        })
        used = [_deployment_used(p.completion("pool", MESSAGES, stream=stream)) for _ in range(6)]
        assert used == ["limited"] * 3 + ["spare"] * 3
        assert seen["limited:ok"] == 3 and seen["healthy:ok"] == 3


def test_a_quota_store_failure_never_fails_the_call(monkeypatch) -> None:
    p = _limited({"gpt-4o-mini": {"rpm": 1}}, ["gpt-4o-mini"])

    def broken(*args: object, **kwargs: object) -> float:
        raise ConnectionError("store down")

    monkeypatch.setattr(p.store, "incr", broken)
    assert outcome(p.completion("pool", MESSAGES, mock_response="ok")).model == "gpt-4o-mini"


def test_quotas_on_real_redis_are_never_overtaken(redis_url, monkeypatch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from router_middleware.stores.redis import RedisStore

    books = Bookkeeper(RedisStore(redis_url), RoutingConfig(), Catalog())
    bucket = f"race-{time.time_ns()}"
    found = (quotas.Quota(bucket, RateLimit(rpm=30)),)
    now = time.time()
    pin_clock(monkeypatch, now)  # every taker in the same minute's window
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: admit(books, Held(), found, 0), range(200)))
    assert results.count(None) == 30
    assert set(results) == {None, f"{bucket}: rpm limit 30 reached (30 used this minute)"}
    assert float(books.store.get(f"quota:{bucket}:rpm:{int(now // 60)}")) == 30


@pytest.mark.usefixtures("one_quota_window")
def test_a_quota_refusal_releases_the_budget_reservation() -> None:
    p = Pipeline.from_config({"routing": {"aliases": {"pool": ["gpt-4o-mini"]}, "limits": {"gpt-4o-mini": {"rpm": 1}},
                                          "budgets": [{"name": "team", "scope": "global", "usd": 1.0}]},
                              "context": {"enabled": False}, "cache": {"enabled": False}})
    p.completion("pool", MESSAGES, mock_response="ok")
    spent = float(p.store.get("budget:team:usd:all:0"))
    p.state.quotas = {}  # the policy's view is stale: the race that only the atomic take sees
    with pytest.raises(NoRouteError, match="rpm limit 1 reached"):
        p.completion("pool", MESSAGES, mock_response="ok")
    assert float(p.store.get("budget:team:usd:all:0")) == pytest.approx(spent)
