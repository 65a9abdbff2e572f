"""The response-cache key covers every parameter that can change the answer, and its namespace is
unambiguous, on each store (memory, SQLite, a real Redis)."""

from __future__ import annotations

import uuid

import litellm
import pytest

from router_middleware import Pipeline

MESSAGES = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cache.db"
    return str(request.getfixturevalue("redis_url"))


def _provider_calls(monkeypatch) -> list[dict]:
    seen: list[dict] = []
    real = litellm.completion

    def spy(**kwargs):
        seen.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(litellm, "completion", spy)
    return seen


@pytest.mark.parametrize("params", [
    {"logprobs": True, "top_logprobs": 2}, {"extra_body": {"safe_mode": True}},
    {"web_search_options": {"search_context_size": "low"}}, {"modalities": ["text", "audio"]},
    {"api_base": "https://eu.example.com/v1"}, {"api_key": "sk-other-tenant-key-000000"}, {"user": "u-42"},
    {"a_parameter_added_tomorrow": 1},
])
def test_every_parameter_that_can_change_the_answer_is_in_the_key(store, params, monkeypatch) -> None:
    seen = _provider_calls(monkeypatch)
    pipeline = Pipeline.from_config({"store": store, "app": f"k-{uuid.uuid4().hex[:8]}"})
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, temperature=0, mock_response="4")
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, temperature=0, mock_response="4", **params)
    assert len(seen) == 2  # not served the first request's answer
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, temperature=0, mock_response="4", **params)
    assert len(seen) == 2  # the same request again: a hit


def test_a_pydantic_response_format_is_keyed_by_its_schema(store, monkeypatch) -> None:
    """Two versions of one class name (a field added between deploys, or two modules' ``Person``) are
    two requests: keyed by the class's name alone, the second was served the first's JSON, which fails
    its own schema. The same class again is a hit."""
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str

    first = Person

    class Person(BaseModel):  # type: ignore[no-redef]  # the schema changed: age is required too
        name: str
        age: int

    seen = _provider_calls(monkeypatch)
    pipeline = Pipeline.from_config({"store": store, "app": f"p-{uuid.uuid4().hex[:8]}"})
    for response_format in (first, Person, Person):
        pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, temperature=0, mock_response='{"name": "Ada"}',
                            response_format=response_format)
    assert [call["response_format"] for call in seen] == [first, Person]


def test_harmless_parameters_still_hit(store, monkeypatch) -> None:
    seen = _provider_calls(monkeypatch)
    pipeline = Pipeline.from_config({"store": store, "app": f"h-{uuid.uuid4().hex[:8]}"})
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, temperature=0, mock_response="4")
    pipeline.completion(model="gpt-4o-mini", messages=MESSAGES, temperature=0, mock_response="4", timeout=30,
                        num_retries=2, metadata={"trace": "x"})
    assert len(seen) == 1


@pytest.mark.parametrize(("first", "second"), [
    ({"tenant": "-"}, {}),  # the tenant "-" is not "no tenant"
    ({"app": "svc", "tenant": "x:y"}, {"app": "svc:x", "tenant": "y"}),
    ({"app": "a", "tenant": None}, {"app": None, "tenant": "a"}),
])
def test_namespaces_never_collide(store, first, second, monkeypatch) -> None:
    seen = _provider_calls(monkeypatch)
    suffix = uuid.uuid4().hex[:8]  # a fresh namespace on a shared Redis

    def labelled(context: dict) -> dict:
        return {k: (f"{suffix}{v}" if isinstance(v, str) and k == "app" else v) for k, v in context.items()}

    pipeline = Pipeline.from_config({"store": store})
    for context in (first, second):
        pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": f"q {suffix}"}],
                            temperature=0, mock_response="secret", context=labelled(context))
    assert len(seen) == 2
