"""Budget counters in the store: what a call claims before it starts, and what settles or releases it.

A call's claims (its estimated cost on every budget that applies) are held in one atomic step
together with its first attempt's quota (:meth:`Bookkeeper.admission`): either all fit under their
limits or none is added, so a refused reservation never inflates the totals other callers see. With
Redis the step is one Lua script, atomic across processes: concurrent workers overspend at most by
how much their in-flight calls' actual costs exceed their estimates. A claim is a store hold that
lapses after the budget's ``reservation_ttl_s``: a reservation whose settlement never reached the
store (an outage) stops counting at the next admission after that, and a settlement that arrives
later still adds the call's actual spend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..config import BudgetConfig
from ..errors import BudgetExceeded
from ..routing.budgets import NO_APP, counter_key, scope_value
from ..stores.base import Hold, Release
from ..telemetry import log
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
    unit: str  # usd, tokens, or reasoning (a session's reasoning tokens)
    hold: str  # the hold's id in the store (one per call)
    hold_s: float  # how long the hold counts unless it is released first
    scope: str = ""  # whose counter it is ("tenant acme"; empty for a global budget), for the refusal
    closed: bool = False  # its budget's on_store_error: a counter of another program's is not replaced

    @property
    def budget(self) -> tuple[str, str]:
        """The budget and unit it counts toward, whatever its window (its key names the window)."""
        return self.name, self.unit

    @property
    def held(self) -> Hold:
        return self.key, self.amount, self.limit, self.ttl_s, self.hold, self.hold_s

    def release(self, actual: float) -> Release:
        """End the hold with the ``actual`` amount spent (0: nothing was)."""
        return self.key, self.hold, self.amount, float(actual), self.ttl_s


@dataclass
class Reservation:
    claims: list[Claim]


_BY_KEY = {"user": "; the LiteLLM proxy: a key with a user_id", "tenant": "; the LiteLLM proxy: a key with a team_id"}


def claims(budgets: list[BudgetConfig], context: AgentContext, *, usd: float, tokens: int,
           now: float, hold: str, first: Callable[[str], bool]) -> list[Claim]:
    """The call's estimated ``usd`` and ``tokens`` on every budget that applies to ``context``. A
    budget that cannot apply (the call names no value of its scope) is logged when ``first(name)``:
    the caller's record of budgets already reported, which notes the name as it answers."""
    found = []
    for budget in budgets:
        value = scope_value(budget, context)  # once per budget, for both its units
        if value is None:
            if first(budget.name):
                field = {"session": "session_id"}.get(budget.scope, budget.scope)
                run = "thread_id" if budget.scope == "session" else "config or runtime context"
                log.warning("budget_not_applied", budget=budget.name, scope=budget.scope,
                            why=f"the call names no {budget.scope}: pass context={{'{field}': ...}} (litellm: "
                                f"metadata={{'{field}': ...}}; RouterAgentMiddleware: the agent run's {run}"
                                f"{_BY_KEY.get(budget.scope, '')}; said once)")
            continue
        for unit, amount, limit in (("usd", usd, budget.usd), ("tokens", float(tokens), budget.tokens)):
            if limit is not None:
                key = counter_key(budget, value, unit, now)
                found.append(Claim(BUDGET + key, amount, float(limit), budget.window_s * 2 if budget.window_s else None,
                                   budget.name, unit, hold, budget.reservation_ttl_s,
                                   _whose(budget.scope, value), budget.on_store_error == "closed"))
    return found


def _whose(scope: str, value: str) -> str:
    """Whose counter a claim is on, as a refusal names it."""
    if scope == "global":
        return ""
    return "the calls that name no app" if scope == "app" and value == NO_APP else f"{scope} {value}"


def refused(claim: Claim, total: float) -> BudgetExceeded:
    return BudgetExceeded(claim.name, claim.unit, total, claim.limit, claim.amount, claim.scope)


def settlement(reservation: Reservation, *, usd: float | None, tokens: int | None,
               reasoning: int | None) -> list[Release]:
    """End the holds with the actual amounts (unknown actual: the reserved one is kept as spent). A
    budget held twice (a later attempt's top-up, perhaps in the next window) is charged the actual
    amount once, on its first hold."""
    out: list[Release] = []
    charged: set[tuple[str, str]] = set()
    for claim in reservation.claims:
        actual = {"usd": usd, "tokens": tokens, "reasoning": reasoning}[claim.unit]
        out.append(claim.release(claim.amount if actual is None else 0.0 if claim.budget in charged else actual))
        charged.add(claim.budget)
    return out


def top_up(reservation: Reservation | None, claims: list[Claim]) -> list[Claim]:
    """What a later attempt of a call, estimated at ``claims``, adds to its ``reservation``: on each
    budget, the estimate beyond what is held (a fallback to a dearer model; a window may have begun
    since), none where it holds enough."""
    have: dict[tuple[str, str], float] = {}
    for claim in reservation.claims if reservation is not None else ():
        have[claim.budget] = have.get(claim.budget, 0.0) + claim.amount
    return [replace(claim, amount=claim.amount - have.get(claim.budget, 0.0))
            for claim in claims if claim.amount > have.get(claim.budget, 0.0) + 1e-12]


def release(reservation: Reservation) -> list[Release]:
    return [claim.release(0.0) for claim in reservation.claims]


def closed(reservation: Reservation) -> list[str]:
    """The counters of the reservation's ``closed`` budgets: a settlement leaves one that holds another
    program's value as it is (the spend it stood for is unknown), where it replaces the others'."""
    return [claim.key for claim in reservation.claims if claim.closed]
