"""The policy contract: a pure function from a Plan (and a read-only view of state) to a Plan.

A policy never performs I/O and never mutates its inputs: it returns ``plan.decide(Decision(...),
**changes)`` when it acts, or the plan unchanged. The same policies therefore run in every adapter,
including hooks that can only rewrite a request, and in the offline replay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .catalog import Catalog
from .tokens import TokenCounter
from .types import Message, Plan


@dataclass(frozen=True)
class PolicyState:
    """What a policy may read: model facts and token estimates. Never written by policies."""

    catalog: Catalog = field(default_factory=Catalog)
    estimate_tokens: Callable[[str, Sequence[Message]], int] | None = None

    def tokens(self, model: str, messages: Sequence[Message]) -> int:
        if self.estimate_tokens is not None:
            return self.estimate_tokens(model, messages)
        return TokenCounter(model).messages(messages)


class Policy(Protocol):
    """``name`` labels the decisions the policy records."""

    name: str

    def __call__(self, plan: Plan, state: PolicyState) -> Plan: ...


def apply_policies(plan: Plan, policies: Sequence[Policy], state: PolicyState) -> Plan:
    for policy in policies:
        plan = policy(plan, state)
    return plan
