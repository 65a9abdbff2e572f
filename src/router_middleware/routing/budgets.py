"""Spending budgets per app, tenant, session or user, in USD and tokens, over time windows.

Spend is *reserved* before a call (its estimated cost) with an atomic increment in the store, and
*settled* after it with the difference to the actual cost. A reservation that would take the total
past the hard limit is rolled back and the call fails with :class:`BudgetExceeded`; with Redis the
increments are atomic across processes, so concurrent workers can overspend at most by how much
their in-flight calls' actual costs exceed their estimates. Past the soft limit the routing policy
sends the call to the budget's ``downgrade_to`` alias instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..config import BudgetConfig
from ..errors import RouterMiddlewareError
from ..stores import Store
from ..types import AgentContext


class BudgetExceeded(RouterMiddlewareError):
    def __init__(self, name: str, unit: str, spent: float, limit: float) -> None:
        super().__init__(f"budget {name!r} exceeded: {spent:.6g} of {limit:.6g} {unit} spent")
        self.name = name
        self.unit = unit
        self.spent = spent
        self.limit = limit


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


@dataclass
class Reservation:
    keys: list[tuple[str, float, float | None]]  # (key, reserved amount, ttl)


def reserve(store: Store, budgets: list[BudgetConfig], context: AgentContext, *, usd: float, tokens: int,
            now: float) -> Reservation:
    """Reserve ``usd`` and ``tokens`` on every budget that applies, or raise ``BudgetExceeded``."""
    done: list[tuple[str, float, float | None]] = []
    for budget in budgets:
        for unit, amount, limit in (("usd", usd, budget.usd), ("tokens", float(tokens), budget.tokens)):
            if limit is None:
                continue
            key = budget_key(budget, context, unit, now)
            if key is None:
                continue
            ttl = budget.window_s * 2 if budget.window_s else None
            total = store.incr(f"budget:{key}", amount, ttl)
            if total > limit + 1e-12:
                store.incr(f"budget:{key}", -amount, ttl)
                release(store, Reservation(done))
                raise BudgetExceeded(budget.name, unit, total - amount, float(limit))
            done.append((key, amount, ttl))
    return Reservation(done)


def settle(store: Store, reservation: Reservation, *, usd: float | None, tokens: int | None) -> None:
    """Replace the reserved amounts by the actual ones (unknown actual: keep the reservation)."""
    for key, amount, ttl in reservation.keys:
        actual = usd if ":usd:" in key else tokens
        if actual is not None and not math.isclose(actual, amount):
            store.incr(f"budget:{key}", float(actual) - amount, ttl)


def release(store: Store, reservation: Reservation) -> None:
    for key, amount, ttl in reservation.keys:
        store.incr(f"budget:{key}", -amount, ttl)


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
