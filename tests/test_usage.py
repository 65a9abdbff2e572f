"""Usage normalization across provider shapes (convention: cache in input, reasoning in output)."""

from __future__ import annotations

import litellm
import pytest
import structlog

from router_middleware import Usage, normalize_usage
from router_middleware.usage import reported_cost


def test_openai_and_azure_shape() -> None:
    raw = {"prompt_tokens": 1200, "completion_tokens": 300, "total_tokens": 1500,
           "prompt_tokens_details": {"cached_tokens": 1024},
           "completion_tokens_details": {"reasoning_tokens": 192}}
    assert normalize_usage(raw) == Usage(1200, 300, 1024, 0, 192)


def test_litellm_usage_object() -> None:
    raw = litellm.Usage(prompt_tokens=50, completion_tokens=7,
                        prompt_tokens_details={"cached_tokens": 10},
                        completion_tokens_details={"reasoning_tokens": 3})
    assert normalize_usage(raw) == Usage(50, 7, 10, 0, 3)


def test_deepseek_cache_hit_fields() -> None:
    raw = {"prompt_tokens": 1733, "completion_tokens": 86, "prompt_cache_hit_tokens": 1536,
           "prompt_cache_miss_tokens": 197}
    assert normalize_usage(raw) == Usage(1733, 86, 1536, 0, 0)


def test_anthropic_raw_excludes_cache_from_input_tokens() -> None:
    raw = {"input_tokens": 4, "cache_creation_input_tokens": 1163, "cache_read_input_tokens": 0,
           "output_tokens": 187}
    usage = normalize_usage(raw)
    assert usage == Usage(1167, 187, 0, 1163, 0)
    assert usage.uncached_input_tokens == 4


def test_litellm_normalized_anthropic_already_includes_cache() -> None:
    raw = {"prompt_tokens": 1167, "completion_tokens": 202, "cache_read_input_tokens": 1163,
           "cache_creation_input_tokens": 0, "prompt_tokens_details": {"cached_tokens": 1163}}
    assert normalize_usage(raw) == Usage(1167, 202, 1163, 0, 0)


def test_gemini_raw_adds_thoughts_to_output() -> None:
    raw = {"promptTokenCount": 1493, "candidatesTokenCount": 51, "thoughtsTokenCount": 124,
           "cachedContentTokenCount": 1024, "totalTokenCount": 1668}
    assert normalize_usage(raw) == Usage(1493, 175, 1024, 0, 124)


def test_openrouter_cache_write_and_cost() -> None:
    from router_middleware.usage import reported_cost

    raw = {"prompt_tokens": 5000, "completion_tokens": 100, "cost": 0.0123,
           "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 4000},
           "completion_tokens_details": {"reasoning_tokens": 40}}
    assert normalize_usage(raw) == Usage(5000, 100, 0, 4000, 40)
    assert reported_cost(raw) == 0.0123
    assert reported_cost({"cost": 0}) is None


def test_missing_usage_is_marked_none() -> None:
    assert normalize_usage(None).source == "none"
    assert normalize_usage({}).total_tokens == 0


def test_hidden_params_are_the_dict_litellm_exposes() -> None:
    """wire.hidden reads pydantic's private storage directly: it must be the very dict that
    ``response._hidden_params`` gives, so what is written there (the Outcome) is found again."""
    import litellm

    from router_middleware import wire

    response = litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                  mock_response="ok")
    assert wire.hidden(response) is response._hidden_params
    wire.attach_outcome(response, "marker")
    assert response._hidden_params[wire.OUTCOME_KEY] == "marker"
    assert wire.hidden({"not": "a response"}) == {} and wire.hidden(None) == {}


def test_a_mapping_with_no_token_count_is_no_usage_not_a_count_of_zero() -> None:
    """``{"foo": 1}`` (or a cost alone) says nothing of tokens: source ``none``, as ``None`` gives;
    a provider's count of zero stays the provider's."""
    assert normalize_usage({"foo": 1}).source == "none"
    assert normalize_usage({"cost": 0.01}).source == "none"
    assert normalize_usage({"prompt_tokens": 0, "completion_tokens": 0}).source == "provider"
    assert normalize_usage({"totalTokenCount": 0}).source == "provider"


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), -5, "many", 1e999, [3], 10**20, 1e300])
def test_a_count_that_is_no_count_counts_zero_and_is_logged(bad) -> None:
    """A provider's (or a mock's) count that is no non-negative number neither raises nor enters a total."""
    with structlog.testing.capture_logs() as logs:
        usage = normalize_usage({"prompt_tokens": 100, "completion_tokens": bad,
                                 "prompt_tokens_details": {"cached_tokens": 40}})
    assert usage == Usage(100, 0, 40, 0, 0)
    assert [(e["event"], e["field"]) for e in logs] == [("usage_count_invalid", "completion_tokens")]


def test_counts_given_as_text_or_float_are_read() -> None:
    assert normalize_usage({"prompt_tokens": "12", "completion_tokens": 3.0}) == Usage(12, 3, 0, 0, 0)


def test_an_infinite_count_fails_no_answered_call_and_its_row_is_written(tmp_path) -> None:
    """litellm returns such an answer as it came; the pipeline returned it too, not an OverflowError."""
    from router_middleware import Pipeline, outcome
    from router_middleware.ledger.store import open_ledger

    answer = litellm.ModelResponse(model="gpt-4o-mini", choices=[
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}],
        usage={"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120})
    object.__setattr__(answer.usage, "completion_tokens", float("inf"))
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    pipeline = Pipeline.from_config({"ledger": {"url": url}})
    response = pipeline.completion("gpt-4o-mini", [{"role": "user", "content": "hi"}], mock_response=answer)
    assert response.choices[0].message.content == "hi"
    assert (outcome(response).usage.input_tokens, outcome(response).usage.output_tokens) == (100, 0)
    pipeline.close()
    assert open_ledger(url).query("SELECT input_tokens, output_tokens, ended FROM calls") == [(100, 0, "complete")]


@pytest.mark.parametrize("cost", [float("inf"), float("nan"), -1.0, 0])
def test_a_provider_cost_that_is_no_cost_is_not_used(cost) -> None:
    assert reported_cost({"cost": cost}) is None
