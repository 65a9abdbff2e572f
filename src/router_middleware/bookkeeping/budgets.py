"""Budget counters in the store: what a call claims before it starts, and what settles or releases it.

A call's claims (its estimated cost on every budget that applies) are added in one atomic step
together with its first attempt's quota (:meth:`Bookkeeper.admit`): either all fit under their limits
or none is added, so a refused reservation never inflates the totals other callers see. With Redis
the step is one Lua script, atomic across processes: concurrent workers overspend at most by how
much their in-flight calls' actual costs exceed their estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import BudgetConfig
from ..errors import BudgetExceeded
from ..routing.budgets import budget_key
from ..stores.base import Addition, Within
from ..types import AgentContext
from .keys import BUDGET


@dataclass(frozen=True, slots=True)
class Claim:
    """One budget counter a call reserves on."""

    key: str  # the store key
    amount: float
    limit: float
    ttl_s: float | None
    name: str
    unit: str

    @property
    def within(self) -> Within:
        return self.key, self.amount, self.limit, self.ttl_s


@dataclass
class Reservation:
    claims: list[Claim]


def claims(budgets: list[BudgetConfig], context: AgentContext, *, usd: float, tokens: int,
           now: float) -> list[Claim]:
    """The call's estimated ``usd`` and ``tokens`` on every budget that applies to ``context``."""
    found = []
    for budget in budgets:
        for unit, amount, limit in (("usd", usd, budget.usd), ("tokens", float(tokens), budget.tokens)):
            key = budget_key(budget, context, unit, now) if limit is not None else None
            if key is not None and limit is not None:
                found.append(Claim(BUDGET + key, amount, float(limit), budget.window_s * 2 if budget.window_s else None,
                                   budget.name, unit))
    return found


def refused(claim: Claim, total: float) -> BudgetExceeded:
    return BudgetExceeded(claim.name, claim.unit, total, claim.limit)


def settlement(reservation: Reservation, *, usd: float | None, tokens: int | None) -> list[Addition]:
    """Replace the reserved amounts by the actual ones (unknown actual: keep the reservation). The
    counters exist (admission created them with their ttl), so no ttl is sent again."""
    out: list[Addition] = []
    for claim in reservation.claims:
        actual = usd if claim.unit == "usd" else tokens
        if actual is not None and not math.isclose(actual, claim.amount):
            out.append((claim.key, float(actual) - claim.amount, None))
    return out


def release(reservation: Reservation) -> list[Addition]:
    return [(claim.key, -claim.amount, None) for claim in reservation.claims]
