"""OpenTelemetry spans and structlog events for each call, through the global API only.

Nothing here installs an SDK provider: with no provider configured the spans are no-ops. Every
function swallows (and logs) its own errors, so telemetry can never fail a user's call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

import structlog
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .types import AttributeValue, Outcome, Plan

P = ParamSpec("P")
R = TypeVar("R")

log = structlog.get_logger("router_middleware")
_REQUEST_PARAMS = {
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "stream": "gen_ai.request.stream",
    "reasoning_effort": "gen_ai.request.reasoning.level",
}


def _tracer() -> trace.Tracer:
    return trace.get_tracer("router_middleware")


def never_raises(default: R) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: run ``fn``; on any exception log it and return ``default``."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - telemetry must not fail the call
                log.warning("telemetry_error", where=fn.__name__, error=repr(exc))
                return default

        return inner

    return wrap


def request_attributes(plan: Plan, provider: str | None) -> dict[str, AttributeValue]:
    attrs: dict[str, AttributeValue] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": plan.model,
    }
    if provider:
        attrs["gen_ai.provider.name"] = provider
    for key, name in _REQUEST_PARAMS.items():
        value = plan.params.get(key)
        if isinstance(value, bool | int | float | str):
            attrs[name] = value
    context = plan.call.context
    if context.session_id:
        attrs["gen_ai.conversation.id"] = context.session_id
    if context.app:
        attrs["router_middleware.app"] = context.app
    if context.step is not None:
        attrs["router_middleware.step"] = context.step
    if context.step_kind:
        attrs["router_middleware.step_kind"] = context.step_kind
    if plan.model != plan.call.model:
        attrs["router_middleware.requested_model"] = plan.call.model
    return attrs


def outcome_attributes(outcome: Outcome) -> dict[str, AttributeValue]:
    usage, cost = outcome.usage, outcome.cost
    attrs: dict[str, AttributeValue] = {
        "gen_ai.response.model": outcome.model,
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read_tokens,
        "gen_ai.usage.cache_creation.input_tokens": usage.cache_write_tokens,
        "gen_ai.usage.reasoning.output_tokens": usage.reasoning_tokens,
        "router_middleware.usage.source": usage.source,
        "router_middleware.cost.source": cost.source,
    }
    if outcome.response_id:
        attrs["gen_ai.response.id"] = outcome.response_id
    if outcome.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = ",".join(outcome.finish_reasons)
    if cost.total_usd is not None:
        attrs["gen_ai.usage.cost"] = float(cost.total_usd)
    for name in ("input_usd", "output_usd", "cache_read_usd", "cache_write_usd", "reasoning_usd"):
        value = getattr(cost, name)
        if value is not None:
            attrs[f"router_middleware.cost.{name}"] = float(value)
    if outcome.time_to_first_token_s is not None:
        attrs["router_middleware.time_to_first_chunk_s"] = outcome.time_to_first_token_s
    return attrs


@never_raises(default=cast(Span, trace.INVALID_SPAN))
def start_call_span(plan: Plan, provider: str | None) -> Span:
    return _tracer().start_span(
        f"chat {plan.model}", kind=SpanKind.CLIENT, attributes=request_attributes(plan, provider)
    )


@never_raises(default=None)
def end_call_span(span: Span, outcome: Outcome) -> None:
    span.set_attributes(outcome_attributes(outcome))
    span.end()
    log.info(
        "llm_call",
        model=outcome.model,
        provider=outcome.provider,
        input_tokens=outcome.usage.input_tokens,
        output_tokens=outcome.usage.output_tokens,
        cache_read_tokens=outcome.usage.cache_read_tokens,
        reasoning_tokens=outcome.usage.reasoning_tokens,
        cost_usd=outcome.cost.total_usd,
        cost_source=outcome.cost.source,
    )


@never_raises(default=None)
def fail_call_span(span: Span, error: BaseException, **extra: Any) -> None:
    span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR, str(error)[:500]))
    span.end()
    log.warning("llm_call_failed", error_type=type(error).__qualname__, **extra)
