"""The policy contract: a pure function from a Plan (and a read-only view of state) to a Plan.

A policy never performs I/O and never mutates its inputs: it returns ``plan.decide(Decision(...),
**changes)`` when it acts, or the plan unchanged. The same policies therefore run in every adapter,
including hooks that can only rewrite a request, and in the offline replay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .catalog import Catalog
from .errors import PolicyError, RouterMiddlewareError
from .tokens import REQUEST_OVERHEAD, Calibration, Profile, TokenCounter, tokenizer_name
from .types import History, Message, Plan, SessionRoute

T = TypeVar("T")
MEMO_SIZE = 4096


@dataclass
class PolicyState:
    """What a policy may read: model facts, token counts, stored summaries. Policies never write it.

    ``summaries`` maps a dropped span's hash to a summary written earlier (see
    :mod:`router_middleware.context.summarize`); ``calibration`` maps a session id to its online
    token calibration; ``provider_cache`` says whether the provider discounts cached prefixes.
    """

    catalog: Catalog = field(default_factory=Catalog)
    summaries: Mapping[str, str] = field(default_factory=dict)
    calibration: Mapping[str, Calibration] = field(default_factory=dict)
    provider_cache: bool = True
    reasoning_spent: Mapping[str, int] = field(default_factory=dict)
    cooldowns: Mapping[str, float] = field(default_factory=dict)  # model -> cooled down until (epoch s)
    throughput: Mapping[str, float] = field(default_factory=dict)  # model -> output tokens/s (EWMA)
    latency: Mapping[str, float] = field(default_factory=dict)  # model -> seconds to first token (EWMA)
    budget_spent: Mapping[str, float] = field(default_factory=dict)  # budget key -> reserved + spent
    quotas: Mapping[str, float] = field(default_factory=dict)  # quota counter key -> count (routing.quotas)
    sessions: Mapping[str, SessionRoute] = field(default_factory=dict)  # session id -> its last route
    served: Mapping[str, str] = field(default_factory=dict)  # a name the adapter serves -> its model (Engine.serve)
    groups: Mapping[str, str] = field(default_factory=dict)  # a served name -> the served name it stands for
    endpoints: dict[str, str] = field(default_factory=dict)  # a deployment or served name -> where it is sent
    pinned: bool = False  # the caller sends its own model whatever the plan names (no downgrade applies)
    now: float = 0.0
    _counters: dict[str, TokenCounter] = field(default_factory=dict, repr=False)
    _memo: OrderedDict[Hashable, Any] = field(default_factory=OrderedDict, repr=False)

    def but(self, **changes: Any) -> PolicyState:
        """A shallow copy with ``changes`` (one per planned call: ``dataclasses.replace`` would
        rebuild every field through ``__init__``). The copy shares the counters and the memo."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__, **changes)
        return copy

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """A bounded cache for values derived from the history (digests, span hashes), so a policy
        does not redo the same work on every step of a session. Policies stay pure: the value is a
        function of the key."""
        try:
            value: T = self._memo[key]
            self._memo.move_to_end(key)
            return value
        except KeyError:
            value = compute()
            self._memo[key] = value
            if len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
            return value

    def counter(self, model: str) -> TokenCounter:
        """``model``'s counter, shared by the models that use the same tokenizer (so routing that
        weighs several candidates does not count a history again for each)."""
        counter = self._counters.get(model)
        if counter is None:
            name = tokenizer_name(model)
            shared = next((c for c in self._counters.values() if c.tokenizer == name), None)
            counter = self._counters[model] = shared or TokenCounter(model)
        return counter

    def message_tokens(self, model: str, message: Message) -> int:
        return self.counter(model).message(message)

    def profile(self, model: str, messages: Sequence[Message]) -> Profile:
        """Each message's cache key and token count. A plan's messages are a :class:`History` that the
        policies and the engine share, which keeps its profile: a history is walked once per call
        rather than once per use."""
        if isinstance(messages, History):
            return messages.derived(("profile", model), lambda: self.counter(model).profile(messages))
        return self.counter(model).profile(messages)

    def tokens(self, model: str, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None,
               session_id: str | None = None) -> int:
        """Estimated prompt tokens, calibrated for the session when reported usage has been seen."""
        raw = REQUEST_OVERHEAD + self.counter(model).tools(tools) + self.profile(model, messages).totals[-1]
        return self.calibrated(raw, session_id)

    def request_tokens(self, plan: Plan) -> int:
        """The prompt tokens of the request ``plan`` sends, counted locally: its messages and tool
        definitions, calibrated for its session (:meth:`tokens`). A call whose provider reports no usage
        (a stream cut short) is settled at it."""
        return self.tokens(plan.model, plan.messages, plan.params.get("tools"), plan.call.context.session_id)

    def calibrated(self, raw: int, session_id: str | None) -> int:
        """A local count of a whole request (``REQUEST_OVERHEAD`` included) as the session's provider
        would count it, once reported usage has been seen."""
        calibration = self.calibration.get(session_id) if session_id else None
        return calibration.apply(raw) if calibration is not None else raw


class Policy(Protocol):
    """``name`` labels the decisions the policy records."""

    @property
    def name(self) -> str: ...

    def __call__(self, plan: Plan, state: PolicyState) -> Plan: ...


def apply_policies(plan: Plan, policies: Sequence[Policy], state: PolicyState) -> Plan:
    """``plan`` through each policy in turn; :class:`PolicyError` names one that returns no Plan, or
    raises an error that is not the package's (its own, a refusal such as ``NoRouteError``, pass)."""
    for policy in policies:
        try:
            planned = policy(plan, state)
        except RouterMiddlewareError:
            raise
        except Exception as exc:
            name = getattr(policy, "name", None) or type(policy).__name__
            raise PolicyError(f"policy {name!r} raised {type(exc).__name__}: {str(exc)[:200]}") from exc
        if not isinstance(planned, Plan):
            raise _not_a_plan(policy, planned)
        plan = planned
    return plan


def _not_a_plan(policy: Policy, returned: object) -> PolicyError:
    what = "None" if returned is None else f"a {type(returned).__name__}"
    name = getattr(policy, "name", None) or type(policy).__name__
    return PolicyError(f"policy {name!r} returned {what}; a policy returns a Plan")
