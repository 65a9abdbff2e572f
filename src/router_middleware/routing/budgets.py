"""Spending budgets per app, tenant, session or user, in USD and tokens, over time windows: which
counter a call counts against, and when the soft limit is passed (pure).

Spend is *reserved* before a call (its estimated cost) and *settled* after it
(:mod:`router_middleware.bookkeeping.budgets`); a reservation past the hard limit fails the call with
:class:`BudgetExceeded`. Past the soft limit the routing policy sends the call to the budget's
``downgrade_to`` alias instead.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import BudgetConfig
from ..errors import BudgetExceeded
from ..types import AgentContext


def scope_value(budget: BudgetConfig, context: AgentContext) -> str | None:
    if budget.scope == "global":
        return "all"
    value = getattr(context, {"session": "session_id"}.get(budget.scope, budget.scope))
    return str(value) if value else None


def budget_key(budget: BudgetConfig, context: AgentContext, unit: str, now: float) -> str | None:
    value = scope_value(budget, context)
    if value is None:
        return None
    window = int(now // budget.window_s) if budget.window_s else 0
    return f"{budget.name}:{unit}:{value}:{window}"


def over_soft_limit(budgets: list[BudgetConfig], spent: Mapping[str, float], context: AgentContext,
                    now: float) -> BudgetConfig | None:
    """The first budget past its soft limit that names an alias to downgrade to."""
    for budget in budgets:
        if not budget.downgrade_to:
            continue
        for unit, limit in (("usd", budget.usd), ("tokens", budget.tokens)):
            key = budget_key(budget, context, unit, now)
            if limit and key and spent.get(key, 0.0) >= budget.soft * limit:
                return budget
    return None


__all__ = ["BudgetExceeded", "budget_key", "over_soft_limit", "scope_value"]
