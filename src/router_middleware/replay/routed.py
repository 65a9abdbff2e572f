"""Routed replay: each recorded call planned with a routing alias as its model.

Each call is priced on the model the router chose, with one prompt-cache simulation per model and
session (a switch finds the new model's cache as the calls routed there left it: cold on first use).
Beside it, the same planned requests are priced on every model of the alias alone (``always``), each
with its own cache simulation that sees every call.

Cache lost to switches: per routed call, its cost minus the cost of the same request on the same
model with the cache of the ``always`` account of that model (warmed by every earlier call of the
session); summed, it is the cached-read discount lost because earlier calls went to another model.
Zero when the router never switches.

Token counts on the session's recorded model use the session's calibration; other models use their
own tokenizer uncalibrated (no reported counts exist for them). Output and reasoning tokens are the
recorded ones (capped as in the optimized account) whatever the model.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from ..catalog import Catalog, cache_rules_for
from ..config import RoutingConfig
from ..errors import RouterMiddlewareError
from ..routing.policy import SUFFIXES
from ..tokens import Calibration, TokenCounter
from ..types import Plan
from .accounts import Account, Accountant
from .cachesim import PromptCacheSim


def route_models(routing: RoutingConfig, alias: str) -> list[str]:
    """The models ``alias`` (with or without ``:floor`` or ``:nitro``) can route to, in order (tier
    order for ``auto`` or a difficulty alias).

    Raises ``RouterMiddlewareError`` when ``alias`` is not an alias of ``routing`` or has another suffix."""
    given = alias
    alias, _, suffix = routing.split_route(alias)  # an alias named with a colon is that name whole
    if alias == "auto" and routing.tiers or routing.strategy.get(alias) == "difficulty":
        names = [name for tier in routing.tiers for name in routing.aliases.get(tier.alias, ())]
    elif alias in routing.aliases:
        names = list(routing.aliases[alias])
    else:
        known = sorted(routing.aliases) + (["auto"] if routing.tiers else [])
        where = f"(known: {', '.join(known)})" if known else "(it has none: pass --config with routing.aliases)"
        raise RouterMiddlewareError(f"--route {given!r} is not an alias of the config's routing section {where}")
    if suffix and suffix not in SUFFIXES:
        raise RouterMiddlewareError(f"--route {given!r}: an alias takes ':floor' or ':nitro', not ':{suffix}'")
    models = [routing.deployments[n].model if n in routing.deployments else n for n in names]
    return list(dict.fromkeys(models))


@dataclass
class RoutedAccount:
    """One session's (or the total's) routed replay."""

    alias: str
    models: list[str]
    calls: Counter[str] = field(default_factory=Counter)
    switches: int = 0
    routed: Account = field(default_factory=Account)
    always: dict[str, Account] = field(default_factory=dict)
    cache_lost_usd: float = 0.0
    switches_per_session: list[int] = field(default_factory=list)

    def merge(self, other: RoutedAccount) -> None:
        self.calls.update(other.calls)
        self.switches += other.switches
        self.routed.merge(other.routed)
        for model, account in other.always.items():
            self.always.setdefault(model, Account()).merge(account)
            if model not in self.models:
                self.models.append(model)
        self.cache_lost_usd += other.cache_lost_usd
        self.switches_per_session += other.switches_per_session

    def as_dict(self, *, total: bool = False) -> dict[str, object]:
        accounts = self.always
        unknown = self.routed.cost is None
        data: dict[str, object] = {
            "alias": self.alias,
            "models": list(self.models),
            "calls": sum(self.calls.values()),
            "calls_per_model": {m: self.calls.get(m, 0) for m in self.models},
            "switches": self.switches,
            "routed": self.routed.as_dict(),
            "always": {m: accounts[m].as_dict() for m in self.models if m in accounts},
            "cost_usd": None if unknown else round(self.routed.cost_usd, 6),
            "cache_lost_usd": None if unknown else round(self.cache_lost_usd, 6),
        }
        if total:
            data["sessions"] = len(self.switches_per_session)
            data["median_switches_per_session"] = (
                statistics.median(self.switches_per_session) if self.switches_per_session else 0)
        return data


class RoutedSession:
    """Accounts one session's routed plans: call :meth:`add` once per call, in order."""

    def __init__(self, alias: str, models: list[str], catalog: Catalog, session_model: str,
                 calibration: Calibration, *, provider_cache: bool = True) -> None:
        self._catalog = catalog
        self._session_model = session_model
        self._calibration = calibration
        self._provider_cache = provider_cache
        self._counters: dict[str, TokenCounter] = {}
        self._routed: dict[str, Accountant] = {}
        self._always: dict[str, Accountant] = {}
        self._last: str | None = None
        self.account = RoutedAccount(alias, list(models))
        self.account.switches_per_session = [0]
        for model in models:
            self._accountant(model, always=True)

    def _accountant(self, model: str, *, always: bool) -> Accountant:
        table = self._always if always else self._routed
        if model not in table:
            info = self._catalog.resolve(model)
            rules = info.cache if info else cache_rules_for(model, self._catalog.provider(model))
            counter = self._counters.setdefault(model, TokenCounter(model))
            calibration = self._calibration if model == self._session_model else Calibration()
            table[model] = Accountant(counter, calibration, info, PromptCacheSim(rules, enabled=self._provider_cache))
            if always:
                self.account.always.setdefault(model, Account())
                if model not in self.account.models:
                    self.account.models.append(model)
        return table[model]

    def add(self, plan: Plan, reply_key: str, output: int, reasoning: int) -> None:
        """Price ``plan`` on the model it was routed to and on every model alone."""
        chosen = plan.model
        self._accountant(chosen, always=True)
        warm = None
        for model, accountant in self._always.items():
            usage, cost = accountant.account(plan, reply_key, output, reasoning)
            self.account.always[model].add(usage, cost.total_usd)
            if model == chosen:
                warm = cost.total_usd
        usage, cost = self._accountant(chosen, always=False).account(plan, reply_key, output, reasoning)
        self.account.routed.add(usage, cost.total_usd)
        if cost.total_usd is not None and warm is not None:
            self.account.cache_lost_usd += cost.total_usd - warm
        self.account.calls[chosen] += 1
        if self._last is not None and chosen != self._last:
            self.account.switches += 1
            self.account.switches_per_session[0] += 1
        self._last = chosen
