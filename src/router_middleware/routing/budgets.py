"""Spending budgets per app, tenant, session or user, in USD and tokens, over time windows: which
counter a call counts against, and when the soft limit is passed (pure).

Spend is *reserved* before a call (its estimated cost) and *settled* after it
(:mod:`router_middleware.bookkeeping.budgets`); a reservation past the hard limit fails the call with
:class:`BudgetExceeded`. Past the soft limit the routing policy sends the call to the budget's
``downgrade_to`` alias instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..config import BudgetConfig
from ..errors import BudgetExceeded
from ..types import AgentContext

NO_APP = "(no app)"  # the app a call that names none counts as: an app budget (the default scope) still applies


def scope_value(budget: BudgetConfig, context: AgentContext) -> str | None:
    """Which counter of ``budget`` the call counts against; ``None``: the budget does not apply (a
    tenant, session or user budget, and a call that names no tenant, session or user)."""
    if budget.scope == "global":
        return "all"
    value = getattr(context, {"session": "session_id"}.get(budget.scope, budget.scope))
    if not value:
        return NO_APP if budget.scope == "app" else None
    return str(value)


def budget_key(budget: BudgetConfig, context: AgentContext, unit: str, now: float) -> str | None:
    value = scope_value(budget, context)
    return None if value is None else counter_key(budget, value, unit, now)


def counter_key(budget: BudgetConfig, value: str, unit: str, now: float) -> str:
    """The counter of ``budget`` for scope ``value`` (see :func:`scope_value`) in the window holding ``now``."""
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


def output_estimate(recent: Sequence[float], *, max_tokens: int | None, default: int, share: float = 0.9,
                    min_samples: int = 10) -> int:
    """The output tokens to reserve for a call: once ``min_samples`` replies of this model and app
    have been seen, the ``share`` percentile (nearest rank) of the ``recent`` ones, capped by the
    call's ``max_tokens``; before that, ``max_tokens`` or ``default``. Reserving ``max_tokens``, often
    far above what a model answers, refuses calls that would have fitted."""
    if len(recent) < min_samples:
        return int(max_tokens or default)
    learned = math.ceil(percentile(recent, share))
    return min(learned, int(max_tokens)) if max_tokens else learned


def input_estimate(counted: int, recent_ratios: Sequence[float], *, share: float = 0.9, min_samples: int = 10) -> int:
    """The prompt tokens to reserve: the local count, scaled by the ``share`` percentile of recent
    reported/counted ratios (the provider's framing and tokenizer) once ``min_samples`` were seen."""
    if len(recent_ratios) < min_samples:
        return counted
    return math.ceil(counted * percentile(recent_ratios, share))


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile of ``values`` (``share`` in (0, 1])."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


__all__ = ["NO_APP", "BudgetExceeded", "budget_key", "counter_key", "input_estimate", "output_estimate",
           "over_soft_limit", "percentile", "scope_value"]
