"""GenAI client metrics and our cost counter, through the global metrics API."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from opentelemetry import metrics
from opentelemetry.metrics import Counter, Histogram

from ..types import AttributeValue, Outcome
from .attributes import provider_name

TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]


@dataclass(frozen=True)
class Instruments:
    tokens: Histogram
    duration: Histogram
    first_chunk: Histogram
    cost: Counter


@cache
def instruments() -> Instruments:
    meter = metrics.get_meter("router_middleware")
    return Instruments(
        tokens=meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                      description="Number of input and output tokens used.",
                                      explicit_bucket_boundaries_advisory=TOKEN_BUCKETS),
        duration=meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                        description="GenAI operation duration.",
                                        explicit_bucket_boundaries_advisory=DURATION_BUCKETS),
        first_chunk=meter.create_histogram("gen_ai.client.operation.time_to_first_chunk", unit="s",
                                           description="Time to the first chunk of a streamed response.",
                                           explicit_bucket_boundaries_advisory=DURATION_BUCKETS),
        cost=meter.create_counter("router_middleware.cost", unit="USD", description="Cost of calls in USD."),
    )


def record(base: dict[str, AttributeValue], outcome: Outcome | None, duration_s: float, error: str | None,
           app: str | None) -> None:
    found = instruments()
    attrs = dict(base)
    if error:
        attrs["error.type"] = error
    if outcome is not None:
        attrs["gen_ai.response.model"] = outcome.model
    found.duration.record(duration_s, attrs)
    if outcome is None:
        return
    found.tokens.record(outcome.usage.input_tokens, {**attrs, "gen_ai.token.type": "input"})
    found.tokens.record(outcome.usage.output_tokens, {**attrs, "gen_ai.token.type": "output"})
    if outcome.time_to_first_token_s is not None:
        found.first_chunk.record(outcome.time_to_first_token_s, attrs)
    if outcome.cost.total_usd:  # by what the histograms' points name (but error.type), and by app
        cost_attrs = {k: v for k, v in attrs.items() if k != "error.type"}
        if error:  # what a failed call used (a stream cut partway) is told apart from answered calls' cost
            cost_attrs.setdefault("router_middleware.ended", "failed")
        if outcome.provider and "gen_ai.provider.name" not in cost_attrs:
            cost_attrs["gen_ai.provider.name"] = provider_name(outcome.provider)
        if app:
            cost_attrs["router_middleware.app"] = app
        found.cost.add(outcome.cost.total_usd, cost_attrs)
