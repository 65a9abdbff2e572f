"""Reasoning caps: per-step effort, provider translation, session budgets, escalation."""

from .levels import DEFAULT_BUDGETS, LEVELS, Level
from .policy import ReasoningPolicy
from .signals import failure_signal, infer_step_kind
from .translate import can_reason, translate

__all__ = ["DEFAULT_BUDGETS", "LEVELS", "Level", "ReasoningPolicy", "can_reason", "failure_signal",
           "infer_step_kind", "translate"]
