from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Cassettes replay real recordings; the SDKs only need a key to be present.
os.environ.setdefault("OPENAI_API_KEY", "sk-test-cassette")
os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-test-cassette")

ROOT = Path(__file__).resolve().parents[1]
CASSETTES = ROOT / "cassettes"
SHARED = Path(os.environ.get("ROUTER_MIDDLEWARE_SHARED", ROOT.parent / "shared"))
AGENT_SESSIONS = SHARED / "data" / "agent-sessions"


@pytest.fixture(scope="session")
def agent_session_paths() -> list[Path]:
    paths = sorted(AGENT_SESSIONS.glob("*.json"))
    if not paths:
        pytest.skip(f"shared agent sessions not found at {AGENT_SESSIONS} (set ROUTER_MIDDLEWARE_SHARED)")
    return paths


@pytest.fixture
def span_exporter():
    """An SDK tracer provider with an in-memory exporter, installed for the test only."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    original = trace.get_tracer_provider
    trace.get_tracer_provider = lambda: provider  # type: ignore[assignment]
    try:
        yield exporter
    finally:
        trace.get_tracer_provider = original  # type: ignore[assignment]
        provider.shutdown()
