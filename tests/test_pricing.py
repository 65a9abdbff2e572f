"""Price resolution chain and cost arithmetic, checked against recorded provider bills."""

from __future__ import annotations

import json

import pytest

from router_middleware import Catalog, Pipeline, Usage, outcome, price
from router_middleware.catalog import catalog_lookup
from router_middleware.replay import load_session, model_for


def test_dated_anthropic_model_litellm_cannot_price() -> None:
    import litellm

    with pytest.raises(litellm.exceptions.BadRequestError):
        litellm.cost_per_token(model="claude-3-7-sonnet-20250219", prompt_tokens=10, completion_tokens=10)
    info = catalog_lookup("claude-3-7-sonnet-20250219")
    assert info is not None
    assert (info.input, info.output, info.cache_read, info.cache_write) == pytest.approx((3e-6, 15e-6, 3e-7, 3.75e-6))
    assert info.source.startswith("catalog-variant:anthropic.claude-3-7-sonnet-20250219")


def test_exact_and_prefixed_ids() -> None:
    assert catalog_lookup("deepseek/deepseek-chat").source == "catalog:deepseek/deepseek-chat"
    assert catalog_lookup("gpt-4o-mini").source == "catalog:gpt-4o-mini"
    assert catalog_lookup("openai/gpt-4o-mini").source == "catalog:gpt-4o-mini"


def test_unknown_model_costs_none_not_zero() -> None:
    assert catalog_lookup("acme/never-heard-of-it") is None
    cost = price(Usage(100, 10), None)
    assert cost.total_usd is None and cost.source == "unknown"


def test_zero_priced_catalog_entry_is_unknown(monkeypatch) -> None:
    from router_middleware import catalog as catalog_module

    fake = {"free-looking-model": {"input_cost_per_token": 0.0, "output_cost_per_token": 0.0,
                                   "litellm_provider": "openai"}}
    monkeypatch.setattr(catalog_module, "_cost_map", lambda: fake)
    catalog_module._catalog_lookup.cache_clear()
    catalog_module._variant_index.cache_clear()
    catalog_module._infer_provider.cache_clear()
    try:
        assert catalog_module.catalog_lookup("free-looking-model") is None
    finally:
        catalog_module._catalog_lookup.cache_clear()
        catalog_module._variant_index.cache_clear()
        catalog_module._infer_provider.cache_clear()


@pytest.mark.parametrize(("model", "window"), [("ollama/llama3", 8192), ("ollama_chat/qwen2.5-coder:7b", None),
                                               ("lm_studio/some-local-model", None), ("ollama/deepseek-r1", None),
                                               ("lm_studio/mistral-small", None)])
def test_a_local_runner_s_model_costs_zero_not_unknown(model: str, window: int | None) -> None:
    """A model Ollama, LM Studio, llamafile or Lemonade serves on the user's machine is priced at $0,
    listed by litellm (at $0, with its window) or not, and whatever a cloud lists under the same name
    (``deepseek-r1``, ``mistral-small``); before, its cost was unknown (its route target logged as a
    possible typo whose suggestion was the same name) or a cloud's."""
    from router_middleware.catalog import close_names

    info = catalog_lookup(model)
    assert info is not None and (info.input, info.output, info.max_input_tokens) == (0.0, 0.0, window)
    assert info.source == f"local:{model.split('/')[0]}"
    answer = Pipeline().completion(model=model, messages=[{"role": "user", "content": "hi"}], mock_response="ok")
    assert outcome(answer).cost.total_usd == 0.0
    assert model not in close_names(model)


def test_config_override_wins_and_says_so() -> None:
    pipeline = Pipeline.from_config({"models": {"acme/model": {"input_per_mtok": 1.0, "output_per_mtok": 2.0,
                                                               "cache_read_per_mtok": 0.1}}})
    info = pipeline.catalog.resolve("acme/model")
    assert info is not None and info.source == "config"
    cost = price(Usage(1_000_000, 1_000_000, cache_read_tokens=500_000), info)
    assert cost.input_usd == pytest.approx(0.5 + 0.05)
    assert cost.output_usd == pytest.approx(2.0)
    assert cost.total_usd == pytest.approx(2.55)


def test_components_are_subsets() -> None:
    info = catalog_lookup("gpt-5-nano")
    cost = price(Usage(2000, 228, cache_read_tokens=1024, reasoning_tokens=192), info)
    assert cost.cache_read_usd == pytest.approx(1024 * 5e-9)
    assert cost.input_usd == pytest.approx(976 * 5e-8 + 1024 * 5e-9)
    assert cost.reasoning_usd == pytest.approx(192 * 4e-7)
    assert cost.output_usd == pytest.approx(228 * 4e-7)
    assert cost.total_usd == pytest.approx(cost.input_usd + cost.output_usd)


def test_provider_reported_cost_wins_with_scaled_components() -> None:
    info = catalog_lookup("openrouter/google/gemini-3-pro-preview")
    cost = price(Usage(1000, 100), info, reported_usd=0.01)
    assert cost.source == "provider_reported" and cost.total_usd == 0.01
    assert cost.input_usd + cost.output_usd == pytest.approx(0.01)
    assert price(Usage(1000, 100), None, reported_usd=0.01).total_usd == 0.01


def _priced_vs_reported(paths) -> tuple[float, float]:
    catalog = Catalog()
    priced = reported = 0.0
    for path in paths:
        session = load_session(path)
        info = catalog.resolve(model_for(session))
        for call in session.calls:
            u = call.usage
            priced += price(Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens, 0, u.reasoning_tokens),
                            info).total_usd
            reported += call.cost_usd
    return priced, reported


def test_deepseek_sessions_priced_within_1_percent(agent_session_paths) -> None:
    priced, reported = _priced_vs_reported([p for p in agent_session_paths if p.name.startswith("deepseek")])
    assert priced == pytest.approx(reported, rel=0.01)


def test_gemini_openrouter_sessions_priced_within_5_percent(agent_session_paths) -> None:
    paths = [p for p in agent_session_paths if p.name.startswith("gemini")]
    assert json.loads(paths[0].read_text())["model"] == "google/gemini-3-pro-preview"
    assert Catalog().resolve("openrouter/google/gemini-3-pro-preview").source == \
        "catalog-variant:vertex_ai/gemini-3-pro-preview"
    priced, reported = _priced_vs_reported(paths)
    assert priced == pytest.approx(reported, rel=0.05)


@pytest.mark.parametrize(("model", "floor"), [
    ("claude-opus-4-5-20251101", 4096), ("anthropic/claude-opus-4.5", 4096), ("claude-opus-4-6", 4096),
    ("us.anthropic.claude-haiku-4-5-20251001-v1:0", 4096), ("claude-3-5-haiku-20241022", 2048),
    ("claude-sonnet-4-5", 1024), ("claude-opus-4-1", 1024), ("claude-3-opus-20240229", 1024),
])
def test_anthropic_s_minimum_cacheable_prompt_per_model(model: str, floor: int) -> None:
    """Anthropic caches nothing below a model's minimum: 4096 tokens for Opus 4.5 and 4.6 and Haiku 4.5
    (breakpoints placed below it were spent on prefixes it never caches), 2048 for the older Haikus."""
    from router_middleware.catalog import cache_rules_for

    assert cache_rules_for(model, "anthropic").min_tokens == floor


@pytest.mark.parametrize("store", ["memory://", "redis"])
def test_a_price_that_is_no_number_leaves_the_model_unpriced_on_every_store(monkeypatch, store, redis_url) -> None:
    """A NaN price (litellm.register_model takes one) made the cost NaN; a budget then refused every
    call of the model in memory and failed its store on Redis."""
    from router_middleware import catalog as catalog_module

    cost_map = {**catalog_module._cost_map(), "openai/nan-model": {
        "input_cost_per_token": float("nan"), "output_cost_per_token": 1e-6, "litellm_provider": "openai"}}
    monkeypatch.setattr(catalog_module, "_cost_map", lambda: cost_map)
    for cached in (catalog_module._catalog_lookup, catalog_module._variant_index, catalog_module._infer_provider):
        cached.cache_clear()
    try:
        assert catalog_module.catalog_lookup("openai/nan-model") is None
        pipeline = Pipeline.from_config({"store": redis_url if store == "redis" else store,
                                         "routing": {"budgets": [{"name": "nan-price", "usd": 0.01}]}})
        for _ in range(2):
            result = outcome(pipeline.completion("openai/nan-model", [{"role": "user", "content": "hi"}],
                                                 mock_response="ok"))
            assert result.cost.total_usd is None
            assert "budget" not in {d.policy for d in result.plan.decisions if "failed" in d.action}
        pipeline.close()
    finally:
        for cached in (catalog_module._catalog_lookup, catalog_module._variant_index, catalog_module._infer_provider):
            cached.cache_clear()
