"""Session affinity and escalation, pure: whether a session should leave the model that holds its
prompt cache, and which tier its next step needs.

A switch from ``held`` (the target that answered the session's last call) to ``new`` is judged with
the cache-price model of the context window's payback check (:meth:`ModelInfo.cache_prices`): the
history (``tokens``, the routing estimate) is read at each model's cache-read price on every call
and re-read once at ``new``'s uncached (or cache-write) price. The switch pays back when the per-call
saving times ``horizon`` calls exceeds that one-time premium.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..catalog import ModelInfo
from ..types import Decision, Plan, SessionRoute


@dataclass(frozen=True, slots=True)
class Switch:
    """What moving a session from ``held`` to ``new`` costs once and saves a call (USD)."""

    held: str
    new: str
    tokens: int
    once_usd: float  # re-reading the history uncached at ``new``, beyond its cache-read price
    saving_usd: float  # a call on ``held`` minus a call on ``new`` (negative: ``new`` costs more)
    horizon: float

    @property
    def payback_calls(self) -> float:
        """Calls until the premium is saved back (``inf``: never)."""
        if self.saving_usd <= 0:
            return math.inf
        return self.once_usd / self.saving_usd

    @property
    def pays(self) -> bool:
        return self.payback_calls <= self.horizon

    def numbers(self, *, verdict: bool = True) -> str:
        """The premium, the saving and (with ``verdict``) the payback, in words."""
        head = f"re-reads {self.tokens:,} tokens for {usd(self.once_usd)}"
        if self.saving_usd <= 0:
            return f"{head} and costs {usd(-self.saving_usd)} more a call" + (": never pays back" if verdict else "")
        if not verdict:
            return f"{head} and saves {usd(self.saving_usd)} a call"
        return (f"{head} and saves {usd(self.saving_usd)} a call: pays back after "
                f"{_calls(self.payback_calls)} (horizon {self.horizon:g})")

    def attributes(self) -> dict[str, str | int | float | bool]:
        payback = self.payback_calls
        return {"from": self.held, "to": self.new, "history_tokens": self.tokens,
                "switch_usd": round(self.once_usd, 8), "saving_per_call_usd": round(self.saving_usd, 8),
                "payback_calls": round(payback, 2) if math.isfinite(payback) else -1.0,
                "horizon_calls": self.horizon}


def usd(amount: float) -> str:
    """``$0.12``, ``$0.004``, ``$0.000012``: two significant digits, never an exponent."""
    text = f"{amount:.2g}"
    if "e" in text:
        text = f"{float(text):.{max(0, 1 - math.floor(math.log10(abs(amount))))}f}"
    return f"${text}"


def _calls(n: float) -> str:
    if n < 1:
        return "less than 1 call"
    return f"{math.ceil(n - 1e-9):,} call{'s' if math.ceil(n - 1e-9) != 1 else ''}"


def read_prices(info: ModelInfo, provider_cache: bool) -> tuple[float, float]:
    """``(read, rewrite)`` per token of a history: the cached read and the one-time uncached (or
    cache-write) re-read; both the input price without a cache discount."""
    prices = info.cache_prices() if provider_cache else None
    return prices if prices is not None else (info.input, info.input)


def switch(held: str, held_info: ModelInfo, new: str, new_info: ModelInfo, *, tokens: int, output: int,
           horizon: float, provider_cache: bool = True) -> Switch:
    """The cost of moving a session's ``tokens``-token history from ``held`` to ``new`` (each call
    also writes ``output`` tokens)."""
    held_read, _ = read_prices(held_info, provider_cache)
    new_read, new_rewrite = read_prices(new_info, provider_cache)
    stay = tokens * held_read + output * held_info.output
    move = tokens * new_read + output * new_info.output
    return Switch(held, new, tokens, tokens * (new_rewrite - new_read), stay - move, horizon)


@dataclass(frozen=True, slots=True)
class Escalation:
    """A session step's escalation: ``floor`` (the lowest tier index it may use, -1: any), the tier
    alias to remember (``""``: none), good steps since, and what happened this step (``action``:
    ``escalate``, ``return`` or ``""``, with its ``reason``)."""

    floor: int = -1
    escalated: str = ""
    good: int = 0
    action: str = ""
    reason: str = ""

    @property
    def decision(self) -> Decision | None:
        """``routing:escalate`` or ``routing:return`` when this step did either."""
        return Decision("routing", self.action, self.reason, {"tier": self.escalated}) if self.action else None


def escalation(tiers: list[str], base: int, held_escalation: str, good: int, failed: str | None,
               return_after: int) -> Escalation:
    """The next step of a session's escalation. ``tiers``: the tier aliases, weakest first; ``base``:
    the index of the tier the session is on; ``held_escalation``/``good``: what was remembered;
    ``failed``: the failure signal of this request, if any."""
    if failed:
        up = min(base + 1, len(tiers) - 1)
        where = f"{tiers[base]} -> {tiers[up]}" if up > base else f"stays on the top tier {tiers[up]}"
        return Escalation(up, tiers[up], 0, "escalate",
                          f"{failed}: one tier up, {where} (back after {return_after} good steps)")
    if held_escalation not in tiers:
        return Escalation()
    good += 1
    if good >= return_after:
        return Escalation(action="return", reason=f"{good} good steps since the escalation to {held_escalation}: "
                                                   "the tier is free again (the cache rule decides a move down)")
    return Escalation(tiers.index(held_escalation), held_escalation, good)


def session_route(plan: Plan) -> SessionRoute | None:
    """What to remember after ``plan``'s call answered: its target and the session's tier and
    escalation, from its route decision; ``None`` without a session or a tiered route decision (a
    fallback's plan has none). The bookkeeper stores it; an offline replay can keep it in a dict."""
    if not plan.call.context.session_id:
        return None
    route = next((d for d in reversed(plan.decisions) if d.policy == "routing" and "good_steps" in d.attributes),
                 None)
    if route is None:
        return None
    attributes = route.attributes
    return SessionRoute(plan.deployment or plan.model, str(attributes["session_tier"]),
                        str(attributes["escalated_to"]), int(attributes["good_steps"]))
