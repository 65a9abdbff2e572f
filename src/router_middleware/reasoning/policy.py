"""The reasoning-cap policy: pick a level per step, keep it inside the session budget, escalate once
after a failure, and translate it for the model that will answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from ..catalog import ModelInfo
from ..config import ReasoningConfig, ReasoningRule
from ..params import effort_level
from ..policies import PolicyState
from ..types import AgentContext, Decision, Plan
from .levels import DEFAULT_BUDGETS, LEVELS, Level, level_for_budget, shift
from .signals import failure_signal, infer_step_kind
from .translate import REASONING_PARAMS, translate


def rule_matches(rule: ReasoningRule, model: str, requested: str, context: AgentContext, kind: str) -> bool:
    when = rule.when
    step = context.step
    checks = [
        not when.step_kind or kind in when.step_kind,
        when.model is None or fnmatchcase(model, when.model) or fnmatchcase(requested, when.model),
        when.app is None or context.app == when.app,
        when.first is None or (step == 0) == when.first,
        when.step is None or step == when.step,
        when.every is None or (step is not None and step % when.every == 0),
    ]
    return all(checks)


@dataclass(frozen=True)
class ReasoningPolicy:
    config: ReasoningConfig = field(default_factory=ReasoningConfig)
    name: str = "reasoning"

    def _budgets(self) -> dict[Level, int]:
        return {**DEFAULT_BUDGETS, **self.config.level_budgets}

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        config = self.config
        if not config.enabled:
            return plan
        context = plan.call.context
        kind = context.step_kind or infer_step_kind(plan.messages)
        rule = next((r for r in config.rules if rule_matches(r, plan.model, plan.call.model, context, kind)), None)
        budgets = self._budgets()
        asked = requested_level(plan.call.params, budgets)
        level: Level | None = None
        budget: int | None = None
        reasons: list[str] = []
        if rule is not None:
            level, budget = rule.effort, rule.budget_tokens
            reasons.append(f"rule for step '{kind}'" + (f" #{context.step}" if context.step is not None else ""))
        elif (effort := _effort(plan.params)) is not None:  # no rule: the caller's own level
            if self._remaining(context, state) is None and not config.exclude_from_response:  # nothing caps it
                return self._keep(plan, state, effort, kind)
            level = effort
            reasons.append("caller's own setting")
        if level is None and budget is None:
            return self._strip_if_unsupported(plan, state)
        if budget is not None:
            level = level_for_budget(budget, budgets)
        assert level is not None
        if config.escalate:
            failed = failure_signal(plan.messages, context)
            if failed and level != "xhigh":
                level = shift(level, 1)
                budget = None
                reasons.append(f"escalated one level: {failed}")
        if asked is not None and _rank(level) > _rank(asked) and (rule is None or rule.mode == "cap"):
            level, budget = asked, thinking_budget(plan.call.params)
            own = f"{budget}-token thinking budget" if budget is not None else f"'{asked}'"
            reasons.append(f"kept at the caller's {own} (a rule caps; mode: set raises)")
        remaining = self._remaining(context, state)
        if remaining is not None:
            allowed = level_for_budget(max(0, remaining) // 2, budgets) if remaining > 0 else "none"
            lowered = budget is not None and budget > remaining // 2  # then the level's own budget
            if lowered:
                budget = None
            if _rank(level) > _rank(allowed):
                level, lowered = allowed, True
            if lowered:
                reasons.append(f"session budget: {max(0, remaining)} reasoning tokens left")
        info = state.catalog.resolve(plan.model)
        result = translate(plan.model, state.catalog.provider(plan.model), info, plan.params, level=level,
                           budget_tokens=budget, budgets=budgets, exclude=config.exclude_from_response,
                           room=lambda: output_room(plan, state, info), messages=plan.messages)
        action = "cap" if result.supported else "unsupported"
        attrs: dict[str, str | int | float | bool] = {"level": level, "step_kind": kind,
                                                      "effective_level": result.effective or level}
        if budget is not None:
            attrs["budget_tokens"] = budget
        if remaining is not None:
            attrs["session_remaining_tokens"] = max(0, remaining)
        return plan.decide(Decision(self.name, action, "; ".join([*reasons, result.note]), attrs),
                           params=result.params)

    def _keep(self, plan: Plan, state: PolicyState, level: Level, kind: str) -> Plan:
        """The caller's own ``reasoning_effort`` with no rule or session budget to cap it: sent as it
        came (litellm maps it as it would without the middleware), unless the model cannot take it:
        dropped, or (a level it lacks, which its provider refuses) the nearest level it has."""
        result = translate(plan.model, state.catalog.provider(plan.model), state.catalog.resolve(plan.model),
                           plan.params, level=level, budgets=self._budgets())
        attrs: dict[str, str | int | float | bool] = {"level": level, "step_kind": kind,
                                                      "effective_level": result.effective or level}
        if not result.supported or (result.effective or level) != level:
            return plan.decide(Decision(self.name, "cap" if result.supported else "unsupported",
                                        f"caller's own setting; {result.note}", attrs), params=result.params)
        return plan.decide(Decision(self.name, "keep", "caller's own setting, sent as it came: no rule or "
                                                       "session budget caps it", attrs))

    def _remaining(self, context: AgentContext, state: PolicyState) -> int | None:
        if self.config.session_budget_tokens is None or not context.session_id:
            return None
        return self.config.session_budget_tokens - state.reasoning_spent.get(context.session_id, 0)

    def _strip_if_unsupported(self, plan: Plan, state: PolicyState) -> Plan:
        if not any(key in plan.params for key in REASONING_PARAMS):
            return plan
        level = requested_level(plan.params, self._budgets()) or "medium"
        result = translate(plan.model, state.catalog.provider(plan.model), state.catalog.resolve(plan.model),
                           plan.params, level=level)
        if result.supported:
            return plan
        return plan.decide(Decision(self.name, "unsupported", result.note), params=result.params)


TOKENIZER_SLACK = 1.25  # a provider's tokenizer may count this much more than the local estimate


def output_room(plan: Plan, state: PolicyState, info: ModelInfo | None) -> int | None:
    """The output ``plan``'s request leaves in its model's window: its output limit, less what a
    prompt counted with :data:`TOKENIZER_SLACK` would take past the window (a provider that refuses a
    prompt plus ``max_tokens`` over its window, as Anthropic does with thinking, refuses none then);
    ``None`` when the catalog knows neither."""
    if info is None or not info.max_output_tokens or not info.max_input_tokens:
        return None
    prompt = state.request_tokens(plan)
    return min(info.max_output_tokens, info.max_input_tokens - int(prompt * TOKENIZER_SLACK))


def requested_level(params: Mapping[str, object], budgets: Mapping[Level, int] = DEFAULT_BUDGETS) -> Level | None:
    """The level the caller asked for, in any family's shape: ``reasoning_effort`` (a level, or litellm's
    dict's ``effort``), Anthropic's ``thinking`` (a budget, or disabled), OpenRouter's ``reasoning`` (effort
    or max_tokens); None if none. litellm's ``reasoning_effort="disable"`` (thinking off, for Gemini) is
    ``none``."""
    effort = _effort(params)
    if effort is not None:
        return effort
    if effort_level(params.get("reasoning_effort")) == "disable":
        return "none"
    for key in ("thinking", "reasoning"):
        value = params.get(key)
        if not isinstance(value, Mapping):
            continue
        if value.get("type") == "disabled" or value.get("enabled") is False:
            return "none"
        if isinstance(value.get("effort"), str) and value["effort"] in LEVELS:
            return value["effort"]  # type: ignore[no-any-return]
        tokens = value.get("budget_tokens", value.get("max_tokens"))
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:  # < 0: dynamic, no cap
            return level_for_budget(tokens, dict(budgets)) if tokens == 0 or tokens >= budgets["minimal"] \
                else "minimal"
    return None


def thinking_budget(params: Mapping[str, object]) -> int | None:
    """The thinking budget ``params`` give (Anthropic ``thinking``, OpenRouter ``reasoning``), if any."""
    for key in ("thinking", "reasoning"):
        value = params.get(key)
        if isinstance(value, Mapping):
            tokens = value.get("budget_tokens", value.get("max_tokens"))
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
                return tokens
    return None


def _effort(params: Mapping[str, object]) -> Level | None:
    """The level ``reasoning_effort`` asks for (a string, or litellm's dict's ``effort``) where it is one
    of :data:`LEVELS`."""
    effort = effort_level(params.get("reasoning_effort"))
    return next((level for level in LEVELS if level == effort), None)


def _rank(level: str) -> int:
    return LEVELS.index(level)
