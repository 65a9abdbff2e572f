"""Routing, pure: aliases and strategies (:mod:`.policy`), fallbacks and backoff (:mod:`.fallback`),
budgets (:mod:`.budgets`), quotas and free tiers (:mod:`.quotas`), difficulty scoring and its
evaluation. The store writes behind budgets, quotas and cooldowns live in
:mod:`router_middleware.bookkeeping`."""

from .difficulty import score_request, score_text
from .evaluation import load_examples, metrics, route_eval

__all__ = ["load_examples", "metrics", "route_eval", "score_request", "score_text"]
