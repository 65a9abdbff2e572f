"""Replay recorded sessions through a pipeline's policies, with no network.

For each recorded call the request ``messages[:prefix_len]`` is planned twice: by a pass-through
pipeline (``baseline``) and by the configured one (``optimized``). Each plan is accounted with the
model's tokenizer (calibrated online from the prompt tokens the provider reported for *earlier* calls
of the same session), a prompt-cache simulation, and the recorded output tokens, then priced. With
``route`` each call is also planned with a routing alias as its model (:mod:`.routed`).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..catalog import Catalog, ModelInfo, cache_rules_for, close_names
from ..errors import RouterMiddlewareError, did_you_mean
from ..ledger import LedgerRecord, from_outcome
from ..messages import integrity_violations
from ..pipeline import Pipeline
from ..pricing import price
from ..routing.affinity import session_route
from ..tokens import Calibration, TokenCounter, message_key
from ..types import AgentContext, Call, Cost, Outcome, Plan, Usage
from .accounts import Account, Accountant, Recorded
from .cachesim import PromptCacheSim
from .retention import retention_counts
from .routed import RoutedAccount, RoutedSession, route_models
from .session import Session

DEFAULT_CHAT_MODEL = "deepseek/deepseek-chat"
_LITELLM_PREFIXES = frozenset({
    "openai", "azure", "anthropic", "deepseek", "gemini", "vertex_ai", "openrouter", "bedrock", "groq",
    "mistral", "together_ai", "fireworks_ai", "xai", "cohere", "ollama",
})


def reasoning_cap(plan: Plan) -> int:
    """The reasoning tokens the plan's cap allows: an estimate (the recorded reply is assumed to keep
    its other output, and to need no more reasoning than the cap allows)."""
    from ..reasoning import DEFAULT_BUDGETS

    for decision in reversed(plan.decisions):
        if decision.policy == "reasoning" and decision.action == "cap":
            budget = decision.attributes.get("budget_tokens")
            if isinstance(budget, int):
                return budget
            level = str(decision.attributes.get("effective_level", "xhigh"))
            budgets: dict[str, int] = {str(k): v for k, v in DEFAULT_BUDGETS.items()}
            return budgets.get(level, 1 << 30)
    return 1 << 30


def model_for(session: Session, override: str | None = None) -> str:
    """The litellm model id to price a session with.

    ``override`` wins; a session without a model gets ``deepseek/deepseek-chat``. A ``vendor/model``
    slug whose vendor is not a litellm provider (``google/gemini-3-pro-preview``) is an OpenRouter
    route, priced as ``openrouter/<slug>``.
    """
    return model_for_name(override or session.model or DEFAULT_CHAT_MODEL)


def model_for_name(model: str) -> str:
    """``model`` as a litellm id: a ``vendor/model`` slug of a non-litellm vendor is an OpenRouter route."""
    head = model.split("/", 1)[0] if "/" in model else None
    if head is not None and head not in _LITELLM_PREFIXES:
        return f"openrouter/{model}"
    return model


@dataclass
class SessionReport:
    id: str
    path: str
    model: str
    price_source: str
    calls: int = 0
    recorded: Recorded = field(default_factory=Recorded)
    baseline: Account = field(default_factory=Account)
    optimized: Account = field(default_factory=Account)
    integrity_violations: int = 0
    first_violation: str | None = None  # "step N: message M: ..." of the first planned request that broke
    retained: int = 0
    relevant: int = 0
    raw_error: int = 0
    calibrated_error: int = 0
    decisions: Counter[str] = field(default_factory=Counter)
    routed: RoutedAccount | None = None  # with ``route``: the calls planned with the alias as the model

    @property
    def retention(self) -> float:
        return self.retained / self.relevant if self.relevant else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "path": self.path,
            "model": self.model,
            "price_source": self.price_source,
            "calls": self.calls,
            "recorded": self.recorded.as_dict() if self.recorded.calls else None,
            "baseline": self.baseline.as_dict(),
            "optimized": self.optimized.as_dict(),
            "integrity_violations": self.integrity_violations,
            "first_violation": self.first_violation,
            "retention": round(self.retention, 4),
            "decisions": dict(self.decisions),
        } | ({"routed": self.routed.as_dict()} if self.routed is not None else {})


def replay_session(
    session: Session,
    optimized: Pipeline,
    *,
    baseline: Pipeline | None = None,
    model: str | None = None,
    provider_cache: bool = True,
    ledger: Callable[[LedgerRecord], None] | None = None,
    started_at: float = 0.0,
    on_call: Callable[[], None] | None = None,
    route: str | None = None,
) -> SessionReport:
    """Replay one session; with ``route`` each call is also planned with that routing alias as its
    model and priced on the model chosen (see :mod:`.routed`)."""
    baseline = baseline or Pipeline()
    model_id = model_for(session, model)
    calibration = Calibration()
    state = replace(optimized.state, calibration={session.id: calibration}, provider_cache=provider_cache,
                    summaries=dict(optimized.state.summaries))
    catalog: Catalog = optimized.catalog
    info = catalog.resolve(model_id)
    rules = info.cache if info else cache_rules_for(model_id, catalog.provider(model_id))
    counter = TokenCounter(model_id)
    report = SessionReport(session.id, session.path, model_id, info.source if info else "unknown")
    accountants = {
        name: Accountant(counter, calibration, info, PromptCacheSim(rules, enabled=provider_cache))
        for name in ("baseline", "optimized")
    }
    routed = None
    if route is not None:
        routed = RoutedSession(route, route_models(optimized.config.routing, route), catalog, model_id,
                               calibration, provider_cache=provider_cache)
        routed_state = replace(state, summaries=dict(optimized.state.summaries))
    chat = not session.has_tools
    for step, recorded in enumerate(session.calls):
        request = session.messages[: recorded.prefix_len]
        reply = session.messages[recorded.prefix_len] if recorded.prefix_len < len(session.messages) else {}
        reply_key = message_key(reply)
        usage = recorded.usage
        output = usage.completion_tokens if usage else counter.message(reply)
        reasoning = usage.reasoning_tokens if usage else 0
        context = AgentContext(app=optimized.config.app or "replay", session_id=session.id, step=step)
        call = Call.create(model_id, request, {}, context)
        plans = {"baseline": baseline.plan(call), "optimized": optimized.plan(call, state)}
        costs: dict[str, Cost] = {}
        for name, plan in plans.items():
            capped = min(reasoning, reasoning_cap(plan)) if name == "optimized" else reasoning
            planned_usage, cost = accountants[name].account(plan, reply_key, output - (reasoning - capped), capped)
            costs[name] = cost
            getattr(report, name).add(planned_usage, cost.total_usd)
        if ledger is not None:
            row = _ledger_record(plans, costs, planned_usage, model_id, catalog, info, reasoning - capped,
                                 recorded.ts if recorded.ts is not None else started_at + step)
            ledger(replace(row, call_id=replay_call_id(session, step)))
        if routed is not None:
            routed_plan = optimized.plan(Call.create(route or "", request, {}, context), routed_state)
            remembered = session_route(routed_plan)  # what the bookkeeper would store after the answer
            if remembered is not None:
                routed_state = replace(routed_state, sessions={session.id: remembered})
            capped = min(reasoning, reasoning_cap(routed_plan))
            routed.add(routed_plan, reply_key, output - (reasoning - capped), capped)
        plan = plans["optimized"]
        report.calls += 1
        broken = integrity_violations(plan.messages)
        if broken:
            report.integrity_violations += 1
            report.first_violation = report.first_violation or f"step {step}: {broken[0]}"
        retained, relevant = retention_counts(reply, request, plan.messages, chat=chat)
        report.retained += retained
        report.relevant += relevant
        report.decisions.update(f"{d.policy}:{d.action}" for d in plan.decisions)
        if usage is not None:
            recorded_usage = Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, 0,
                                   usage.reasoning_tokens)
            report.recorded.add(recorded_usage, price(recorded_usage, info).total_usd)
            if recorded.cost_usd is None:
                report.recorded.unreported_calls += 1
            else:
                report.recorded.reported_cost_usd += recorded.cost_usd
            counted = counter.messages(request)
            report.raw_error += abs(counted - usage.prompt_tokens)
            report.calibrated_error += abs(calibration.apply(counted) - usage.prompt_tokens)
            calibration.observe(counted, usage.prompt_tokens)
        else:
            report.recorded.without_usage.append(step)
        if on_call is not None:
            on_call()
    report.routed = routed.account if routed is not None else None
    return report


def replay_call_id(session: Session, index: int) -> str:
    """A replayed call's ledger identity: the same recorded call replayed again replaces its row."""
    digest = hashlib.sha256(f"{session.id}\0{session.model or ''}\0{Path(session.path).name}".encode())
    return f"replay-{digest.hexdigest()[:16]}-{index}"


def _ledger_record(plans: dict[str, Plan], costs: dict[str, Cost], usage: Usage, model: str, catalog: Catalog,
                   info: ModelInfo | None, reasoning_saved: int, ts: float) -> LedgerRecord:
    """The optimized call as a ledger row. Its baseline is the pass-through plan's cost, as in the
    replay table; the difference is split into reasoning caps and context (negative when the
    configured plan cost more)."""
    base, opt = costs["baseline"].total_usd, costs["optimized"].total_usd
    outcome = Outcome(model=model, provider=catalog.provider(model), usage=usage, cost=costs["optimized"],
                      plan=plans["optimized"])
    if base is None or opt is None or info is None:
        return from_outcome(outcome, source="replay", ts=ts)
    saved_reasoning = reasoning_saved * (info.reasoning or info.output)
    return from_outcome(outcome, saved_context=base - opt - saved_reasoning, saved_reasoning=saved_reasoning,
                        source="replay", ts=ts)


@dataclass
class ReplayReport:
    sessions: list[SessionReport]

    def accounts(self) -> tuple[Recorded | None, Account, Account]:
        """The recorded (of the sessions whose every call recorded usage; None when there is none),
        baseline and optimized accounts summed."""
        recorded, baseline, optimized = Recorded(), Account(), Account()
        for s in self.sessions:
            if s.recorded.complete:
                recorded.merge(s.recorded)
            baseline.merge(s.baseline)
            optimized.merge(s.optimized)
        return (recorded if any(s.recorded.complete for s in self.sessions) else None), baseline, optimized

    def left_out(self) -> list[SessionReport]:
        """The sessions with calls left out of the recorded total: some or all recorded no usage."""
        return [s for s in self.sessions if s.recorded.without_usage]

    def totals(self) -> dict[str, object]:
        recorded, baseline, optimized = self.accounts()
        recorded_data = (recorded or Recorded()).as_dict()
        left_out = self.left_out()
        recorded_data["calls_without_usage"] = sum(len(s.recorded.without_usage) for s in left_out)
        recorded_data["sessions_left_out"] = len(left_out)
        retained = sum(s.retained for s in self.sessions)
        relevant = sum(s.relevant for s in self.sessions)
        return {
            "sessions": len(self.sessions),
            "calls": sum(s.calls for s in self.sessions),
            "recorded": recorded_data,
            "baseline": baseline.as_dict(),
            "optimized": optimized.as_dict(),
            "integrity_violations": sum(s.integrity_violations for s in self.sessions),
            "retention": round(retained / relevant, 4) if relevant else 1.0,
        }

    def fidelity(self) -> dict[str, dict[str, float]]:
        """Per model: baseline vs recorded input tokens, and cached shares, on sessions with usage."""
        by_model: dict[str, list[SessionReport]] = {}
        for s in self.sessions:
            if s.recorded.complete:  # every call's usage, to compare with every call's baseline
                by_model.setdefault(s.model, []).append(s)
        out = {}
        for model, group in by_model.items():
            calls = sum(s.calls for s in group)
            rec_in = sum(s.recorded.input_tokens for s in group)
            rec_cached = sum(s.recorded.cached_tokens for s in group)
            base_in = sum(s.baseline.input_tokens for s in group)
            base_cached = sum(s.baseline.cached_tokens for s in group)
            out[model] = {
                "baseline_over_recorded_input": round(base_in / rec_in, 4) if rec_in else 0.0,
                "recorded_cached_share": round(rec_cached / rec_in, 4) if rec_in else 0.0,
                "baseline_cached_share": round(base_cached / base_in, 4) if base_in else 0.0,
                "prompt_tokens_mae_raw": round(sum(s.raw_error for s in group) / calls, 1),
                "prompt_tokens_mae_calibrated": round(sum(s.calibrated_error for s in group) / calls, 1),
                "priced_over_reported_cost": round(
                    sum(s.recorded.cost_usd for s in group) / sum(s.recorded.reported_cost_usd for s in group), 4
                ) if sum(s.recorded.reported_cost_usd for s in group) else 0.0,
            }
        return out

    def routed(self) -> RoutedAccount | None:
        """The routed accounts summed over sessions (None without ``route``)."""
        parts = [s.routed for s in self.sessions if s.routed is not None]
        if not parts:
            return None
        total = RoutedAccount(parts[0].alias, list(parts[0].models))
        for part in parts:
            total.merge(part)
        return total

    def as_dict(self) -> dict[str, object]:
        data = self.totals()
        data["fidelity"] = self.fidelity()
        routed = self.routed()
        if routed is not None:
            data["routed"] = routed.as_dict(total=True)
        data["per_session"] = [s.as_dict() for s in self.sessions]
        return data


def replay(
    sessions: Iterable[Session],
    optimized: Pipeline,
    *,
    model: str | None = None,
    provider_cache: bool = True,
    on_session: Callable[[SessionReport], None] | None = None,
    ledger: Callable[[LedgerRecord], None] | None = None,
    on_call: Callable[[], None] | None = None,
    route: str | None = None,
) -> ReplayReport:
    """Replay ``sessions``; ``ledger`` receives one row per replayed call, stamped with the call's
    recorded ``ts`` or else one second apart, ending just before the replay started.

    With ``route`` (an alias of the config's ``routing``, or ``auto`` with ``tiers``) each call is also
    planned with the alias as its model: see :mod:`.routed`.

    Raises ``RouterMiddlewareError`` when ``model`` has no price in the catalog or the config, or
    ``route`` is not an alias of the config."""
    baseline = Pipeline(optimized.config, policies=())
    if model is not None and optimized.catalog.resolve(model_for_name(model)) is None:
        near = close_names(model_for_name(model), tuple(optimized.config.models))
        raise RouterMiddlewareError(
            f"--model {model!r} has no price in litellm's catalog or the config's models: section "
            f"(looked up as {model_for_name(model)!r})"
            + (did_you_mean(near) if near else "; use a litellm model id such as deepseek/deepseek-chat"))
    if route is not None:
        route_models(optimized.config.routing, route)  # refuses an unknown alias before any replaying
    sessions = list(sessions)
    reports = []
    clock = time.time() - sum(len(s.calls) for s in sessions)
    for session in sessions:
        report = replay_session(session, optimized, baseline=baseline, model=model, provider_cache=provider_cache,
                                ledger=ledger, started_at=clock, on_call=on_call, route=route)
        clock += report.calls
        reports.append(report)
        if on_session is not None:
            on_session(report)
    return ReplayReport(reports)

