"""Routing: difficulty scoring and its evaluation (model aliases, fallbacks and budgets: not yet)."""

from .difficulty import score_request, score_text
from .evaluation import load_examples, metrics, route_eval

__all__ = ["load_examples", "metrics", "route_eval", "score_request", "score_text"]
