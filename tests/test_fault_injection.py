"""1,000 calls through a flaky and a healthy deployment on loopback: every call succeeds, and the
spans show each attempt."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from opentelemetry.trace import SpanKind

from router_middleware import Pipeline, outcome

from .fault_server import fault_server

MESSAGES = [{"role": "user", "content": "Tell me a joke about opentelemetry"}]


def pipeline(base: str) -> Pipeline:
    return Pipeline.from_config({
        "cache": {"enabled": False}, "context": {"enabled": False},
        "routing": {
            "deployments": {
                "flaky": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/flaky/v1",
                          "api_key_env": "OPENAI_API_KEY", "timeout_s": 0.3},
                "healthy": {"model": "openai/gpt-3.5-turbo", "api_base": f"{base}/healthy/v1",
                            "api_key_env": "OPENAI_API_KEY", "timeout_s": 5},
            },
            "aliases": {"pool": ["flaky", "healthy"]},
            "fallback": {"attempts_per_model": 1, "backoff_s": 0.0, "max_backoff_s": 0.0},
            "cooldown": {"failures": 1000000, "window_s": 60, "cooldown_s": 1},  # keep probing flaky
        }})


def test_one_thousand_calls_under_random_faults(span_exporter) -> None:
    with fault_server(fault_rate=0.5, hang_s=1.0) as (base, seen):
        p = pipeline(base)

        def one(i: int):
            stream = i % 4 == 0
            result = p.completion(model="pool", messages=MESSAGES, stream=stream, max_retries=0)
            if stream:
                text = "".join(c.choices[0].delta.content or "" for c in result if c.choices)
                assert text.startswith("In the observability department")  # the recorded stream, whole
            else:
                assert result.choices[0].message.content
            return outcome(result)

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, range(1000)))
    assert len(results) == 1000
    faults = {k: v for k, v in seen.items() if k.startswith("flaky:") and k != "flaky:ok"}
    assert sum(faults.values()) > 300 and len(faults) == 6  # every kind of fault happened
    assert seen["healthy:ok"] >= sum(faults.values())
    spans = span_exporter.get_finished_spans()
    routes = [s for s in spans if s.kind == SpanKind.INTERNAL]
    clients = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert len(routes) == 1000
    assert len(clients) == 1000 + sum(1 for s in routes if s.attributes.get("router_middleware.fallback.depth"))
    failed = [s for s in clients if s.attributes.get("error.type")]
    assert len(failed) == len(clients) - 1000


@pytest.mark.parametrize("fault_rate", [1.0])
def test_healthy_deployment_carries_everything_when_flaky_is_down(fault_rate) -> None:
    with fault_server(fault_rate=fault_rate, hang_s=1.0) as (base, seen):
        p = pipeline(base)
        for _ in range(30):
            response = p.completion(model="pool", messages=MESSAGES, max_retries=0)
            assert outcome(response).plan.deployment == "healthy"
