"""Round trip through a real Arize Phoenix server: export over OTLP/HTTP, read back over REST.

`.ci/run` starts `phoenix serve` on loopback and sets PHOENIX_URL. Without it the test is skipped
locally and fails in CI.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid

import pytest
import vcr

from router_middleware import Pipeline
from router_middleware.telemetry import configure_telemetry

from .cassette_data import completion_kwargs, interactions, recorded_usage
from .conftest import CASSETTES, service_missing

PHOENIX_URL = os.environ.get("PHOENIX_URL")
if not PHOENIX_URL:
    service_missing("PHOENIX_URL not set: start `phoenix serve` to run the round trip", module=True)


def _get(path: str) -> dict:
    with urllib.request.urlopen(f"{PHOENIX_URL}{path}", timeout=10) as response:
        return json.loads(response.read())


def _spans(project: str, expected: int, deadline_s: float = 30.0) -> list[dict]:
    until = time.monotonic() + deadline_s
    while True:
        try:
            spans = _get(f"/v1/projects/{project}/spans?limit=100")["data"]
        except urllib.error.HTTPError:
            spans = []
        if len(spans) >= expected or time.monotonic() > until:
            return spans
        time.sleep(0.5)


def test_spans_round_trip_through_phoenix() -> None:
    from opentelemetry import trace

    project = f"rm-{uuid.uuid4().hex[:8]}"
    handle = configure_telemetry(PHOENIX_URL, service_name="router-middleware-tests", metrics=False,
                                 set_global=False, resource_attributes={"openinference.project.name": project})
    original = trace.get_tracer_provider
    trace.get_tracer_provider = lambda: handle.tracer_provider  # type: ignore[assignment]
    path = CASSETTES / "anthropic_prompt_caching.yaml"
    items = interactions(path)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "task"}]
    for i in range(60):
        history += [{"role": "assistant", "content": f"reply {i} " * 40}, {"role": "user", "content": f"more {i}"}]
    try:
        with vcr.VCR(record_mode="none", decode_compressed_response=True).use_cassette(str(path)):
            for item in items:
                Pipeline.from_config({"telemetry": {"openinference": True}}).completion(
                    **completion_kwargs(item), context={"session_id": "phoenix-session", "app": "tests"})
        Pipeline.from_config({"context": {"watermark_tokens": 2000, "max_payback_calls": None, "summarize": True,
                                          "summary_params": {"mock_response": "They discussed replies 0 to 40."}}}
                             ).completion(model="deepseek/deepseek-chat", messages=history, mock_response="ok",
                                          context={"session_id": "long"})
        assert handle.force_flush(10_000)
    finally:
        trace.get_tracer_provider = original  # type: ignore[assignment]
        handle.shutdown()

    spans = _spans(project, expected=7)
    assert len(spans) == 7
    by_id = {s["context"]["span_id"]: s for s in spans}
    (summary,) = [s for s in spans if s["attributes"].get("router_middleware.purpose") == "context_summary"]
    llm = sorted((s for s in spans if s["name"].startswith("chat ") and s is not summary), key=lambda s: s["start_time"])
    routes = [s for s in spans if s["name"].startswith("route ")]
    assert len(llm) == 3 and len(routes) == 3
    for span in llm[:2]:  # the calls made with ``openinference``: both kinds named (not UNKNOWN)
        assert (span["span_kind"], by_id[span["parent_id"]]["span_kind"]) == ("LLM", "CHAIN")
    for span in llm:
        parent = by_id[span["parent_id"]]
        assert parent["name"].startswith("route ") and parent["context"]["trace_id"] == span["context"]["trace_id"]
    for span, item in zip(llm[:2], items, strict=True):
        attrs = span["attributes"]
        expected = recorded_usage(item)
        assert attrs["gen_ai.usage.input_tokens"] == expected["input_tokens"]
        assert attrs["gen_ai.usage.output_tokens"] == expected["output_tokens"]
        assert attrs["gen_ai.usage.cache_read.input_tokens"] == expected["cache_read_tokens"]
        assert attrs["gen_ai.usage.cache_creation.input_tokens"] == expected["cache_write_tokens"]
        assert attrs["gen_ai.usage.cache_write.input_tokens"] == expected["cache_write_tokens"]  # today's name
        assert attrs["gen_ai.agent.name"] == "tests"
        assert attrs["gen_ai.usage.cost"] > 0
        assert attrs["llm.token_count.prompt"] == expected["input_tokens"]
        assert attrs["llm.cost.total"] == pytest.approx(attrs["gen_ai.usage.cost"])
    assert summary["parent_id"] == llm[2]["parent_id"]  # the summary call, under the route span it was made for
    assert summary["attributes"]["gen_ai.usage.cost"] > 0 and summary["name"] == "chat gpt-4o-mini"
    compacted = by_id[llm[2]["parent_id"]]["attributes"]
    assert compacted["router_middleware.context.compacted"] is True
    assert compacted["router_middleware.context.strategy"] == "window"
    assert compacted["router_middleware.context.tokens_after"] < compacted["router_middleware.context.tokens_before"]
