"""The values that flow through the pipeline: Call -> Plan -> Outcome."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Self, TypeVar

from .errors import RequestError

Message = Mapping[str, Any]
T = TypeVar("T")
AttributeValue = str | int | float | bool

UsageSource = Literal["provider", "estimated", "cache", "none"]


class Frozen(dict[str, Any]):
    """A read-only dict: a call's params, a decision's attributes. Unlike a ``mappingproxy`` it pickles
    and deep-copies, as the litellm response carrying its :class:`Outcome` must (a caller's
    ``copy.deepcopy`` or ``pickle``, as of a bare litellm response)."""

    __slots__ = ()

    def __new__(cls, *args: Any, **kwargs: Any) -> Frozen:
        made = super().__new__(cls)
        dict.__init__(made, *args, **kwargs)
        return made

    def __init__(self, *_: Any, **__: Any) -> None:  # filled by __new__: calling it again changes nothing
        pass

    def _read_only(self, *_: Any, **__: Any) -> Any:
        raise TypeError(f"{type(self).__name__} is read-only: make a changed copy")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (dict(self),)


_EMPTY: Mapping[str, Any] = Frozen()  # shared: most decisions have no attributes


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return Frozen(mapping) if mapping else _EMPTY


class History(tuple[Message, ...]):
    """A call's or plan's messages: an immutable tuple that also keeps what was derived from it (per
    model, each message's cache key and token count), so a history is walked once per call however
    many policies read it, and what was derived lives exactly as long as the history."""

    def derived(self, key: Hashable, compute: Callable[[], T]) -> T:
        found: dict[Any, Any] = self.__dict__
        if key not in found:
            found[key] = compute()
        return found[key]  # type: ignore[no-any-return]


def label_problem(name: str, value: object) -> str | None:
    """Why ``value`` can be no context label ``name`` (:func:`_check_label`'s message), or ``None``."""
    try:
        _check_label(name, value)
    except RequestError as exc:
        return str(exc)
    return None


def _check_label(name: str, value: object) -> None:
    """A context label is a string a ledger and a span can hold (no NUL, no lone surrogate)."""
    if value is None:
        return
    if not isinstance(value, str):
        raise RequestError(f"context.{name}: expected a string, got {type(value).__name__} {value!r}")
    if "\x00" in value:
        raise RequestError(f"context.{name}: contains a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(f"context.{name}: not valid text (a lone surrogate)") from None


@dataclass(frozen=True, slots=True)
class AgentContext:
    """Who is calling and where in the agent loop: passed as ``context=`` to the pipeline.

    All fields are optional. ``session_id`` groups the calls of one agent run (budgets, caches,
    ``gen_ai.conversation.id``); ``step`` is the 0-based index of the call in that run; ``step_kind``
    is the caller's label for the step (``plan``, ``act``, ``observe``, ``edit``, ``summarize``...),
    else the one its messages show (:func:`~.reasoning.infer_step_kind`, filled in by ``Call.create``);
    ``tenant`` scopes the response cache; ``cache`` forces a call in (``True``) or out (``False``) of it;
    ``agent_id`` identifies the agent (``gen_ai.agent.id``; ``app`` is its ``gen_ai.agent.name``).
    """

    app: str | None = None
    session_id: str | None = None
    step: int | None = None
    step_kind: str | None = None
    user: str | None = None
    tenant: str | None = None
    tags: tuple[str, ...] = ()
    cache: bool | None = None
    agent_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("app", "session_id", "step_kind", "user", "tenant", "agent_id"):
            _check_label(name, getattr(self, name))
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0):
            raise RequestError(f"context.step: expected a whole number of at least 0, got {self.step!r}")
        if isinstance(self.tags, str | bytes):
            raise RequestError(f"context.tags: expected a list of strings, got one string {self.tags!r}")
        if isinstance(self.tags, Mapping):  # its keys alone would be kept
            raise RequestError(f"context.tags: expected a list of strings, got an object {self.tags!r:.80} (a tag "
                               f"is one string: ['team:search', 'env:prod'])")
        if not isinstance(self.tags, tuple | list | None) or not all(isinstance(t, str) for t in self.tags or ()):
            raise RequestError(f"context.tags: expected a list of strings, got {self.tags!r}")
        if not isinstance(self.tags, tuple):  # a list, as a dict gives them (None: none); the context is frozen
            object.__setattr__(self, "tags", tuple(self.tags or ()))
        if self.cache is not None and not isinstance(self.cache, bool):
            raise RequestError(f"context.cache: expected true, false or null, got {self.cache!r}")

    def with_inferred_kind(self, kind: str) -> AgentContext:
        """A copy whose ``step_kind`` is ``kind``, one :func:`~.reasoning.infer_step_kind` gave (a label
        of its own): the other fields were checked when this context was made, so the copy is not
        checked again (``dataclasses.replace`` would run every check a second time, on every call)."""
        copy = object.__new__(AgentContext)
        for name in _CONTEXT_FIELDS:
            object.__setattr__(copy, name, getattr(self, name))
        object.__setattr__(copy, "step_kind", kind)
        return copy

    @classmethod
    def coerce(cls, value: AgentContext | Mapping[str, Any] | None) -> AgentContext:
        """Accept an ``AgentContext``, a dict with the same keys, or ``None``; else ``RequestError``."""
        if value is None:
            return cls()
        if isinstance(value, AgentContext):
            return value
        if isinstance(value, Mapping):
            known = cls.__dataclass_fields__
            if not known.keys() >= value.keys():
                unknown = sorted(set(value) - set(known))
                raise RequestError(f"context: unknown field(s) {unknown}; expected some of {sorted(known)}")
            data = dict(value)
            tags = data.get("tags")
            if isinstance(tags, Iterable) and not isinstance(tags, str | bytes | list | tuple | Mapping):
                data["tags"] = tuple(tags)  # any other iterable (a list, a tuple or None: the context's own)
            return cls(**data)
        raise RequestError(f"context: expected an AgentContext or a dict, not {type(value).__name__}")


_CONTEXT_FIELDS = tuple(f.name for f in fields(AgentContext))


@dataclass(frozen=True, slots=True)
class Decision:
    """What one policy did to a call, and why. Decisions end up on the span and in replay reports."""

    policy: str
    action: str
    reason: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=lambda: _frozen(None))


@dataclass(frozen=True, slots=True)
class SessionRoute:
    """What the router remembers about a session between calls (``routing.affinity``): the target
    that answered its last call (which holds its prompt cache), the tier alias it was routed at, the
    tier alias an escalation holds it at (``""``: none), and the good steps since that escalation."""

    target: str
    tier: str = ""
    escalated: str = ""
    good: int = 0

    def encode(self) -> bytes:
        return json.dumps({"t": self.target, "r": self.tier, "e": self.escalated, "g": self.good}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> SessionRoute:
        data = json.loads(raw)
        return cls(str(data["t"]), str(data.get("r") or ""), str(data.get("e") or ""), int(data.get("g") or 0))


@dataclass(frozen=True, slots=True)
class Circuits:
    """What routing read of its targets' circuits, for the attempt loop: the half-open targets, each
    with the name whose one probe an attempt at it claims (its own, or that of the name it stands
    for), and the targets cooling down kept as a last resort, soonest back first."""

    half_open: Mapping[str, str] = field(default_factory=lambda: _frozen(None))
    last_resort: tuple[str, ...] = ()


NO_CIRCUITS = Circuits()


@dataclass(frozen=True, slots=True)
class SummaryJob:
    """A dropped span that a policy would rather replace with a model-written summary.

    ``key`` identifies the span (a hash of its messages); the pipeline writes the summary once, stores
    it under ``key``, and every later plan of the session reuses it.
    """

    key: str
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class Call:
    """What the agent asked for, in OpenAI chat format. Immutable: use ``override()``. ``decisions``:
    what was done to the input while making the call (a ``messages:repair``); every plan starts with them."""

    model: str
    messages: tuple[Message, ...]
    params: Mapping[str, Any] = field(default_factory=lambda: _frozen(None))
    context: AgentContext = field(default_factory=AgentContext)
    decisions: tuple[Decision, ...] = ()

    @classmethod
    def create(
        cls,
        model: str,
        messages: Sequence[Message],
        params: Mapping[str, Any] | None = None,
        context: AgentContext | Mapping[str, Any] | None = None,
        decisions: Sequence[Decision] = (),
    ) -> Call:
        history = History(messages)
        given = context.step_kind if isinstance(context, AgentContext) else (context or {}).get("step_kind")
        kind = _inferred_kind(history) if given is None and history else None
        if kind is not None:
            context = context.with_inferred_kind(kind) if isinstance(context, AgentContext) else {
                **(context or {}), "step_kind": kind}  # checked once, by coerce
        return cls(model, history, _frozen(params), AgentContext.coerce(context), tuple(decisions))

    @property
    def stream(self) -> bool:
        return bool(self.params.get("stream"))

    @property
    def tools(self) -> Sequence[Mapping[str, Any]]:
        return tuple(self.params.get("tools") or ())

    def override(self, **changes: Any) -> Self:
        if "params" in changes:
            changes["params"] = _frozen(changes["params"])
        if "messages" in changes:
            changes["messages"] = History(changes["messages"])
        return replace(self, **changes)


def _inferred_kind(history: History) -> str | None:
    """The step kind ``history`` shows, or ``None`` for messages no one validated (litellm's own
    message objects in an observed call)."""
    from .reasoning.signals import infer_step_kind  # reasoning imports this module

    try:
        return infer_step_kind(history)
    except (AttributeError, TypeError):
        return None


@dataclass(frozen=True, slots=True)
class ContextTokens:
    """What the context policies changed in a call's request, counted locally: the history as the
    caller sent it (``untouched``) and as it was sent (``sent``), its part no earlier request of the
    session sent (``fresh``: from the last assistant turn on), and whether the untouched request would
    have been read from the provider's prompt cache (``cached``: the provider caches prompts without
    being asked, or the caller marked its own breakpoints)."""

    untouched: int
    sent: int
    fresh: int
    cached: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """What will be sent: the chosen model and fallbacks, messages, params, and the decisions taken."""

    call: Call
    model: str
    messages: tuple[Message, ...]
    params: Mapping[str, Any]
    fallbacks: tuple[str, ...] = ()
    cache_key: str | None = None
    estimated_savings_usd: float = 0.0
    decisions: tuple[Decision, ...] = ()
    summary_jobs: tuple[SummaryJob, ...] = ()
    deployment: str | None = None  # the routing target's name when it is a configured deployment
    summary_cost_usd: float = 0.0  # what the summary calls made for this call cost (in its ledger row)
    context_tokens: ContextTokens | None = None  # where the context policies changed the request
    circuits: Circuits = NO_CIRCUITS  # the route's half-open and last-resort targets

    @classmethod
    def from_call(cls, call: Call) -> Plan:
        return cls(call=call, model=call.model, messages=call.messages, params=call.params, decisions=call.decisions)

    def override(self, **changes: Any) -> Self:
        """A copy with ``changes``. A plain ``Plan`` (a few copies per call) skips the per-call field
        introspection of ``dataclasses.replace``: it has no ``__post_init__`` to run; a subclass
        goes through ``replace``, its own fields and checks included."""
        if "params" in changes:
            changes["params"] = _frozen(changes["params"])
        if "messages" in changes:
            changes["messages"] = History(changes["messages"])
        if type(self) is not Plan:
            return replace(self, **changes)
        copy = object.__new__(Plan)
        for name in _PLAN_FIELDS:
            object.__setattr__(copy, name, changes.pop(name) if name in changes else getattr(self, name))
        if changes:
            raise TypeError(f"Plan has no field {', '.join(map(repr, changes))}")
        return copy  # type: ignore[return-value]

    def decide(self, decision: Decision, **changes: Any) -> Self:
        """Return a copy with ``changes`` applied and ``decision`` appended."""
        return self.override(decisions=(*self.decisions, decision), **changes)

    def request(self) -> dict[str, Any]:
        """The keyword arguments for ``litellm.completion``."""
        return {"model": self.model, "messages": [dict(m) for m in self.messages], **self.params}


_PLAN_FIELDS = tuple(f.name for f in fields(Plan))


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one call.

    Convention: ``input_tokens`` includes ``cache_read_tokens`` and ``cache_write_tokens``;
    ``output_tokens`` includes ``reasoning_tokens``. ``source`` says whether the provider reported the
    numbers, they were estimated locally, or the call was served from the response cache.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    source: UsageSource = "provider"

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def uncached_input_tokens(self) -> int:
        return max(0, self.input_tokens - self.cache_read_tokens - self.cache_write_tokens)


@dataclass(frozen=True, slots=True)
class Cost:
    """Cost of one call in USD.

    ``input_usd`` covers all input tokens (cache reads and writes included) and ``output_usd`` all
    output tokens (reasoning included); ``cache_read_usd``, ``cache_write_usd`` and ``reasoning_usd``
    are the parts of those. Amounts are ``None`` when the price is unknown (``source == "unknown"``),
    never a silent 0. ``source`` names where the price came from, e.g. ``catalog:deepseek/deepseek-chat``,
    ``config``, ``provider_reported``.
    """

    input_usd: float | None
    output_usd: float | None
    total_usd: float | None
    cache_read_usd: float | None = None
    cache_write_usd: float | None = None
    reasoning_usd: float | None = None
    source: str = "unknown"
    currency: str = "USD"

    @classmethod
    def unknown(cls) -> Cost:
        return cls(None, None, None)

    @classmethod
    def zero(cls, source: str) -> Cost:
        return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, source=source)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The result of a finished call: who answered, what it used, what it cost."""

    model: str
    provider: str | None
    usage: Usage
    cost: Cost
    plan: Plan | None = None
    response_id: str | None = None
    finish_reasons: tuple[str, ...] = ()
    latency_s: float | None = None
    time_to_first_token_s: float | None = None
