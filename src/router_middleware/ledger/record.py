"""One ledger row per call: who called, which model it was sent to and which answered, tokens and cost by
type, savings."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import STOPPED_BY, Ended, ending
from ..ids import unique_id
from ..types import Outcome, Plan

COLUMNS = (
    "call_id", "ts", "source", "app", "tenant", "session", "step", "step_kind", "requested_model", "model",
    "provider", "input_tokens", "cached_tokens", "cache_write_tokens", "output_tokens", "reasoning_tokens",
    "cost_usd", "input_cost_usd", "output_cost_usd", "cache_read_cost_usd", "cache_write_cost_usd",
    "reasoning_cost_usd", "cost_source", "latency_s", "ttft_s", "cache_hit", "error", "decisions",
    "baseline_cost_usd", "saved_routing_usd", "saved_context_usd", "saved_cache_usd", "saved_reasoning_usd",
    "summary_cost_usd", "ended", "target", "deployment", "user_id",
)


@dataclass(frozen=True)
class LedgerRecord:
    ts: float
    model: str
    requested_model: str
    call_id: str = field(default_factory=unique_id)
    source: str = "live"
    app: str | None = None
    tenant: str | None = None
    session: str | None = None
    step: int | None = None
    step_kind: str | None = None
    provider: str | None = None
    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    input_cost_usd: float | None = None
    output_cost_usd: float | None = None
    cache_read_cost_usd: float | None = None
    cache_write_cost_usd: float | None = None
    reasoning_cost_usd: float | None = None
    cost_source: str = "unknown"
    latency_s: float | None = None
    ttft_s: float | None = None
    cache_hit: int = 0
    error: str | None = None
    decisions: str = "[]"
    baseline_cost_usd: float | None = None
    saved_routing_usd: float = 0.0
    saved_context_usd: float = 0.0
    saved_cache_usd: float = 0.0
    saved_reasoning_usd: float = 0.0
    summary_cost_usd: float = 0.0  # the middleware's summary calls for this call; included in cost_usd
    # "complete" (no ``error``), "stopped" by the caller or "failed" (``error`` names what ended it)
    ended: Ended = "complete"
    # the model the call was sent to, as its route names it (``requested_model`` after routing): the
    # provider's name of it is ``model`` once it answered (a dated snapshot, no litellm prefix)
    target: str | None = None
    # the name the target was sent under, where it has one of its own: a deployment of the config, a
    # ``model_name`` of the LiteLLM proxy, a ``models`` entry of the agent middleware (two deployments of
    # one model share ``target`` and differ here); NULL for a model id called as itself and for a
    # response-cache hit (sent nowhere)
    deployment: str | None = None
    # the call's ``user`` label (``context.user``; behind the LiteLLM proxy, its key's user where it has
    # one); NULL without one, and in rows written before the column or by an older version after it
    user_id: str | None = None

    def __post_init__(self) -> None:
        if self.ended not in ("complete", "stopped", "failed"):
            raise ValueError(f"ended {self.ended!r} is none of complete, stopped, failed")
        if (self.error is None) != (self.ended == "complete"):
            raise ValueError(f"ended {self.ended!r} with error {self.error!r}: a call ends complete exactly when "
                             "it has no error")

    def row(self) -> tuple[Any, ...]:
        data = asdict(self)
        return tuple(data[c] for c in COLUMNS)


def from_outcome(outcome: Outcome, *, saved_context: float = 0.0, saved_cache: float = 0.0,
                 saved_routing: float = 0.0, saved_reasoning: float = 0.0, source: str = "live",
                 ts: float | None = None, error: BaseException | None = None) -> LedgerRecord:
    """The row of a call that ended with ``outcome`` (cut short by ``error``, if any)."""
    plan: Plan | None = outcome.plan
    context = plan.call.context if plan else None
    usage, cost = outcome.usage, outcome.cost
    saved = saved_context + saved_cache + saved_routing + saved_reasoning
    summaries = plan.summary_cost_usd if plan else 0.0
    return LedgerRecord(
        ts=ts if ts is not None else time.time(), source=source,
        model=outcome.model, requested_model=plan.call.model if plan else outcome.model,
        app=context.app if context else None, tenant=context.tenant if context else None,
        session=context.session_id if context else None, step=context.step if context else None,
        step_kind=context.step_kind if context else None, provider=outcome.provider,
        input_tokens=usage.input_tokens, cached_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens, output_tokens=usage.output_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cost_usd=_cost(outcome, summaries),
        input_cost_usd=cost.input_usd,
        output_cost_usd=cost.output_usd, cache_read_cost_usd=cost.cache_read_usd,
        cache_write_cost_usd=cost.cache_write_usd, reasoning_cost_usd=cost.reasoning_usd,
        cost_source=cost.source, latency_s=outcome.latency_s, ttft_s=outcome.time_to_first_token_s,
        cache_hit=1 if usage.source == "cache" else 0,
        decisions=json.dumps([f"{d.policy}:{d.action}" for d in plan.decisions] if plan else []),
        baseline_cost_usd=(cost.total_usd + saved) if cost.total_usd is not None else None,
        saved_routing_usd=saved_routing, saved_context_usd=saved_context, saved_cache_usd=saved_cache,
        saved_reasoning_usd=saved_reasoning, summary_cost_usd=summaries,
        error=type(error).__qualname__ if error is not None else None, ended=ending(error),
        target=plan.model if plan and usage.source != "cache" else None,  # a hit went nowhere (the report
        deployment=plan.deployment if plan and usage.source != "cache" else None,  # groups it by its model)
        user_id=context.user if context else None,
    )


def legacy_ending(error: str | None) -> Ended:
    """How a call ended, read from its row's ``error`` (a row without ``ended``, one of an older version:
    as :data:`.store.ENDED` reads it in SQL)."""
    if error is None:
        return "complete"
    return "stopped" if error in STOPPED_BY else "failed"


def _cost(outcome: Outcome, summaries: float) -> float | None:
    """The row's cost: the call's plus its summaries'. A call that was answered by a model with no
    price is unknown (never 0); a call that reached no model (refused, failed) cost its summaries."""
    if outcome.cost.total_usd is not None:
        return outcome.cost.total_usd + summaries
    if outcome.usage.source == "none" and summaries:
        return summaries
    return None
