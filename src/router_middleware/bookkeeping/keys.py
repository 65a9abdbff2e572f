"""Every key prefix the package writes in a store, in one table (the policies read the same keys
through :class:`~router_middleware.stores.StoreView`)."""

from __future__ import annotations

SUMMARY = "summary:"  # span hash -> summary text written by a summary call
SUMMARY_CLAIM = "sumclaim:"  # span hash -> 1 while one call writes its summary (with a TTL)
REASONING = "reasoning:"  # session id -> reasoning tokens spent
COOLDOWN = "cooldown:"  # target -> cooled down until (epoch s)
FAILURES = "fail:"  # target -> failures in the current window
PROBE = "prober:"  # target -> token of the attempt probing it after its cooldown (TTL: cooldown.probe_s)
THROUGHPUT = "tps:"  # target -> output tokens/s (EWMA)
LATENCY = "lat:"  # target -> seconds to the first token (EWMA)
BUDGET = "budget:"  # budget key (routing.budgets.budget_key) -> reserved + spent; "<key>#held": its holds
QUOTA = "quota:"  # quota counter (routing.quotas) -> requests or tokens taken, or left (provider view)
OUTPUT = "out:"  # model:app -> output tokens of its recent replies (a list)
INPUT_RATIO = "inr:"  # model:app -> reported / locally counted prompt tokens of recent calls (a list)
SESSION_ROUTE = "route:"  # session id -> types.SessionRoute: last target, tier, escalation (TTL: affinity.ttl_s)
LOCK = "lock:"  # lock name -> holder's token

__all__ = ["BUDGET", "COOLDOWN", "FAILURES", "INPUT_RATIO", "LATENCY", "LOCK", "OUTPUT", "PROBE", "QUOTA", "REASONING",
           "SESSION_ROUTE", "SUMMARY", "SUMMARY_CLAIM", "THROUGHPUT"]
