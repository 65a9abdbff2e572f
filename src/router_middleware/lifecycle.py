"""One call's lifecycle, as a generator that decides everything and calls no provider.

``CallLifecycle.run()`` yields what it needs done and is sent what came of it, like httpx's auth
flow: :class:`Summarize` (a summary call for a dropped span), :class:`Attempt` (send this plan to
its provider), :class:`Wait` (back off before the next attempt), :class:`StoreCall` (the call's
admission and settlement writes). A failed attempt is thrown into
the generator, which answers with the next attempt or raises (or, for a :class:`Replaced` one,
returns the answer the adapter's caller was handed). The generator's return value is what
the caller gets: the provider's answer (accounted), a response-cache hit, or a
:class:`~.streaming.TrackedStream`. Drivers (:mod:`.drivers`) run it with sync or async I/O:
``Pipeline.completion``/``acompletion`` and ``RouterAgentMiddleware.wrap_model_call``/
``awrap_model_call``. What to write to the store is decided by the engine's bookkeeper.

Order: plan (summaries first, then plan again) -> response cache -> budget reservation ->
quota admission -> attempts, each settled or counted as a failure -> the Outcome, spans and
ledger row.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from . import wire
from .accounting import build_outcome, prompt_only, stream_finish_reasons
from .bookkeeping import Claim, Held, Probing, Settlement, StepDown, budgets
from .cache import key_for, rebuild_response, replay_chunks
from .context.summarize import summary_text
from .errors import (
    BudgetExceeded,
    NoRouteError,
    PartialWrite,
    RouterMiddlewareError,
    UnknownModelError,
    UnreadableCounter,
)
from .params import choices_asked, usage_asked
from .reasoning.levels import LEVELS
from .routing import quotas
from .routing.fallback import (
    NO_KEY,
    NO_PROVIDER,
    UNBUILT,
    Attempts,
    backoff,
    error_kind,
    request_windows,
    unknown_model,
    what_failed,
)
from .stores import Prefetch
from .stores.base import Bounded, Fetched, defer
from .streaming import Replay, TrackedStream
from .telemetry import CallTrace, log
from .telemetry.attributes import host_of
from .telemetry.tracing import SideCall
from .types import NO_CIRCUITS, Call, Decision, Outcome, Plan, SummaryJob, UsageSource

if TYPE_CHECKING:
    from .engine import Engine

# An adapter's reader of an answer that is not a litellm response: (plan, answer, started) -> Outcome.
Reader = Callable[[Plan, Any, float], Outcome]


@dataclass(frozen=True, slots=True)
class Answers:
    """How an adapter whose answers are not litellm responses uses the response cache. ``keyed``: the
    plan as the cache sees it (its params with what the adapter's model adds: its settings, its
    temperature), or ``None`` for a call it cannot key (not cached); ``stored``: the answer (and its
    Outcome) as a chat completion and the adapter's own form of it, or ``None`` to leave it out of the
    cache; ``loaded``: an entry (a litellm response, that own form or ``None``) as the adapter's answer,
    raising for one it cannot read (a miss); ``served``: that answer with the hit's Outcome."""

    keyed: Callable[[Plan], Plan | None]
    stored: Callable[[Any, Outcome], tuple[dict[str, Any], Any] | None]
    loaded: Callable[[Any, Any], Any]
    served: Callable[[Any, Outcome], Any]

PLAN_PASSES = 3  # plans of one call (or attempt) that may each fetch what the last one missed


@dataclass(frozen=True, slots=True)
class Summarize:
    """Make this litellm request; its text summarizes ``job``'s span (a failure keeps the digest)."""

    job: SummaryJob
    request: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Attempt:
    """Send ``plan`` to its provider (``depth``: attempts made before this one; ``remaining``: the
    targets left after this one, in order; ``again``: the call retries its targets itself,
    ``attempts_per_model``)."""

    plan: Plan
    depth: int
    remaining: tuple[str, ...] = ()
    again: bool = False

    @property
    def follows(self) -> bool:
        """Is the provider SDK's own retrying left to the call (another target follows this attempt, or
        the call retries its targets itself)? Then the SDK's retries are off."""
        return bool(self.remaining) or self.again


@dataclass(frozen=True, slots=True)
class Wait:
    seconds: float


@dataclass(frozen=True, slots=True)
class StoreCall:
    """Call ``store.<method>(*args)``; an async driver awaits the store's ``a<method>`` twin when it has
    one (Redis), so reads, admission and settlement never block the event loop there. ``store`` may
    also be a component whose method uses a store (the semantic cache): the async driver runs it in a
    worker thread. ``patient``: a driver stopped
    meanwhile waits for the store's answer (a few seconds at most: ``drivers.PATIENCE_S``) before the
    lifecycle hears of it, so what the call claimed is in the store by the time the call gives it back."""

    store: Any
    method: str
    args: tuple[Any, ...]
    patient: bool = False


class Failed(Exception):
    """What an adapter throws into a lifecycle for an attempt that failed with ``error``, having used
    ``spent`` if it broke off partway: how the call goes on is its subclass's."""

    def __init__(self, error: Exception, spent: Outcome | None = None) -> None:
        super().__init__(str(error))
        self.error, self.spent = error, spent


class CutShort(Failed):
    """An attempt that broke off after its provider had produced part of an answer (a stream cut
    partway): ``error`` broke it, ``spent`` is what the part used. A call that gives up on it is
    settled at ``spent`` (ledger row, span, budgets), as a stream closed early is, rather than its
    reservation given back; the attempt's quota takes ``spent``'s tokens, rather than giving its
    estimate back."""


class RoutersOwn(Protocol):
    """What the adapter's router does on its own after a target (the LiteLLM proxy's:
    :class:`.litellm.request._RoutersOwn`)."""

    def __call__(self, first: str) -> Sequence[str]:
        """The targets it falls back to after ``first``."""
        ...

    def window_chain(self, target: str) -> Sequence[str] | None:
        """Where it sends a context-window error at ``target``, if to a chain of its own."""
        ...


class MovedPast(Failed):
    """An attempt that failed when the adapter's own router has already moved on to the next target,
    after a failure the lifecycle would have ended the call on (the LiteLLM proxy's router falls back
    after a 400, 401 or 404): counted as that failure, and the call follows the router to its next
    target. ``made=False``: the router moved past it without calling it (its own cooldown): nothing
    is counted, and the attempt gives back what it took of its quotas."""

    def __init__(self, error: Exception, spent: Outcome | None = None, *, made: bool = True) -> None:
        super().__init__(error, spent)
        self.made = made


class Final(Failed):
    """An attempt that failed where no attempt will follow whatever targets are left: the adapter's
    caller was handed the error (litellm's SDK ``fallbacks=`` fall back only before a stream is handed
    over, not when it breaks while read). Counted as that failure; the call ends with it."""


class Unsent(Failed):
    """An attempt whose request never reached a model: the adapter's handler raised before any model
    run began (a bug in a middleware inside RouterAgentMiddleware, a model wrapper that cannot bind
    the tools). Nothing is counted toward the target's cooldown, its quotas are given back, and the
    call ends with ``error``, as a direct call would: another target would run the same code."""


class Replaced(Exception):
    """What an adapter throws into a lifecycle for an attempt whose model failed with ``error`` while
    the adapter's caller was handed ``answer`` in its place (LangChain's ModelRetryMiddleware inside
    RouterAgentMiddleware answers the model's last failure with a message of its own): the call ends
    as failed (its row and span naming ``error``, a count toward the target's cooldown; settled at
    ``spent`` if the model had streamed part of an answer) and returns ``answer``, with no fallback."""

    def __init__(self, error: Exception, answer: Any, spent: Outcome | None = None) -> None:
        super().__init__(str(error))
        self.error, self.answer, self.spent = error, answer, spent


Effect = Summarize | Attempt | Wait | StoreCall
Flow = Generator[Effect, Any, Any]


class CallLifecycle:
    """``read``: turns an adapter's answer into an Outcome (default: a litellm response or stream);
    ``usable``: whether the adapter can reach a routing target (others are skipped, ``unusable``
    saying why); ``cache``: use the response cache (for an adapter with a ``read``, only through its
    ``answers``); ``fallback=False``: the
    adapter's caller makes one attempt and retries on its own (litellm's SDK), so a failed attempt
    ends the call; ``follow``: the call's targets after its first are these, in this order, once
    each, after any error (litellm's ``fallbacks=``), rather than its routing's fallbacks;
    ``caller_sends``: the adapter's caller sends them whatever the lifecycle says (litellm's SDK),
    so none is skipped (a quota a target is over is not taken, logged: the caller calls it all the
    same; the budgets still hold) and no budget's ``downgrade_to`` reroutes the call; else (the
    pipeline, which sends them itself) they are admitted as routing's are; ``plan``: the call goes as the
    adapter planned it (a request sent as it came: no policy rewrites it), admitted, attempted and
    settled as any other; ``sends_refused``: whether the adapter sends a call the lifecycle refused
    before any attempt all the same (litellm's SDK, where refusing would make things worse): that
    refusal then ends no call, and has no span or log line of its own; ``reroutes=False``: the
    adapter sends the model the call names whatever its plan says (an agent middleware without
    ``models=``), so no budget's ``downgrade_to`` admits it at another model's estimate, nor does a soft
    limit plan it there; ``routers_own``: the targets the adapter's router falls back to on its own
    after a target (the proxy's ``router_settings`` fallbacks): the call follows those its plan lacks
    after its own, sent whatever their quotas and cooldowns say, as the router would (the budgets
    still hold); after a context-window error that router goes to its own chain for the target
    (``window_chain``), else to every target it was handed in turn, and the call follows it there."""

    def __init__(self, engine: Engine, call: Call, *, read: Reader | None = None,
                 usable: Callable[[str], bool] | None = None, unusable: str = "not among the adapter's models",
                 cache: bool = True, answers: Answers | None = None, fallback: bool = True,
                 follow: tuple[str, ...] = (), caller_sends: bool = True, plan: Plan | None = None,
                 sends_refused: Callable[[Exception], bool] | None = None, reroutes: bool = True,
                 charges_timeouts: bool = True, routers_own: RoutersOwn | None = None) -> None:
        self.engine = engine
        self.books = engine.books
        self.call = call
        self.read = read
        self.usable = usable
        self.unusable = unusable
        self.use_cache = cache and (read is None or answers is not None)
        self.answers = answers if read is not None else None
        self._keyed_as: tuple[Plan, Plan | None] | None = None  # the last plan an adapter's cache keyed, keyed
        self._looked_up: Plan | None = None  # a routed call's plan as the response cache looked it up (_cache_plan)
        self.fallback = fallback or bool(follow)
        self.follow = follow
        self.forced = bool(follow) and caller_sends  # targets sent whatever their quotas and probes say
        self.routers_own = routers_own
        self._own: frozenset[str] = frozenset()  # the router's own fallbacks the call follows (_route)
        self.reroutes = reroutes
        self.charges_timeouts = charges_timeouts  # an adapter's attempt that timed out was sent (not the agent's)
        self.given = plan
        self.sends_refused = sends_refused
        self.held = Held()
        self._sized: Plan | None = None  # the last plan sized, and its size (ints: a tuple the collector untracks)
        self._size_of = (0, 0)
        self._current: tuple[Plan, CallTrace] | None = None  # the attempt in flight, until the call ends
        self._answered: tuple[Outcome, Any, CallTrace] | None = None  # answered, until its span ends
        self._settlement: Settlement | None = None  # the answered call's settlement, once made
        self._settled = False  # ... and once its writes were made (or failed)
        self._apart = False  # the last attempt broke off partway and was settled on its own (_settle_apart)
        self._cut: Outcome | None = None  # what the attempt in flight used before a stop broke it off
        self._in_flight: float | None = None  # when the attempt sent to litellm began, until it returns or raises
        self._tries: tuple[tuple[Outcome | None, Exception, float], ...] = ()  # its earlier tries (tried)
        self.circuits = NO_CIRCUITS  # the route's half-open and last-resort targets (a downgrade's, after one)
        self._probed: str | None = None  # the first half-open target skipped for another call's probe
        self.side_calls: tuple[SideCall, ...] = ()  # summaries written for this call (none: nothing tracked)
        self.prefetch = Prefetch() if engine.prefetching else None  # what the call read from the store

    def run(self) -> Flow:
        """Raises what the last attempt raised, ``UnknownModelError`` (no provider for the last target),
        ``NoRouteError`` (no target left, or none usable), ``BudgetExceeded`` or ``StoreUnavailable``
        (before any attempt), or ``RequestError`` for a bad alias suffix (messages are checked before:
        :meth:`~.engine.Engine.make_call`)."""
        engine = self.engine
        try:
            plan = yield from self._plan()
            if plan.summary_jobs:
                for job in plan.summary_jobs:
                    yield from self._summarize(job)
                plan = self._carry((yield from self._plan()))
        except NoRouteError as refused:  # no candidate can serve the call
            self._refused(self._carry(Plan.from_call(self.call)), refused)
            raise
        if self.use_cache:
            cached, plan = yield from self._from_cache(plan)
            if cached is not None:
                return cached
        attempts = Attempts(self._route(plan), engine.config.routing.fallback)
        self.circuits = plan.circuits
        try:
            try:
                plan = yield from self._admit(plan, attempts, self._claims(plan))  # nothing is held when refused
            except RouterMiddlewareError as refused:  # NoRouteError, BudgetExceeded, StoreUnavailable
                self._refused(plan, refused)
                raise
            attempts.past = ()  # a target skipped before the first attempt was never sent, nor handed on
            plan, trace = engine.launch(plan, self.side_calls)
            while True:
                self._current = (plan, trace)
                started = time.perf_counter()  # the attempt's own: a fallback's speed is not its failed predecessor's
                self._in_flight = started
                try:
                    answer = yield Attempt(plan, attempts.depth, tuple(attempts.models[1:]),
                                           attempts.again and not self.follow)  # the caller's: each once
                except Exception as exc:
                    self._in_flight = None
                    thrown = exc
                    self._apart = False
                    self._settle_tries()
                else:
                    self._in_flight = None
                    self._settle_tries()
                    return (yield from self._succeeded(plan, answer, trace, started))
                if isinstance(thrown, Replaced):
                    self.books.attempt_failed(self.held, plan.deployment or plan.model, thrown.error, thrown.spent)
                    self._give_up(plan, trace, thrown.error, thrown.spent)
                    return thrown.answer
                # outside the handler: a CutShort's error is raised with its own context
                moved = isinstance(thrown, MovedPast)
                unmade = isinstance(thrown, Unsent) or (isinstance(thrown, MovedPast) and not thrown.made)
                error, spent = (thrown.error, thrown.spent) if isinstance(thrown, Failed) else (thrown, None)
                if isinstance(thrown, Unsent):  # its row and span say no request was made
                    plan = plan.decide(Decision("routing", "unsent", f"{type(error).__name__} raised before "
                                                f"{plan.deployment or plan.model} was called: no request reached it"))
                step = yield from self._failed(plan, trace, attempts, error, spent, moved=moved, unmade=unmade,
                                               ends=isinstance(thrown, Final | Unsent))
                if step is None:
                    raise error
                # paused at the next attempt, the flow holds no failure: its traceback reaches the
                # adapter's frames (litellm's call, whose release ends a call no event ends)
                thrown = error = None  # type: ignore[assignment]
                plan, delay = step
                if delay:
                    yield Wait(delay)
        except BaseException as exc:
            # stopped from outside at an effect (cancelled, interrupted); not a flow closed or collected
            # unfinished (GeneratorExit: its owner let it go, and the reservation lapses on its own)
            if not isinstance(exc, Exception | GeneratorExit):
                self._settle_tries()
                self._stopped(exc)
            raise

    @property
    def routers_targets(self) -> frozenset[str]:
        """The adapter's router's own fallbacks the call follows after its plan's targets."""
        return self._own

    def _route(self, plan: Plan) -> list[str]:
        """The call's targets in order: the plan's (or those it follows), then the adapter's router's
        own fallbacks after its first target that they lack and the adapter can reach."""
        route = [plan.deployment or plan.model, *(self.follow or plan.fallbacks)]
        if self.routers_own is not None:
            own = [t for t in dict.fromkeys(self.routers_own(route[0]))
                   if t not in route and (self.usable is None or self.usable(t))]
            self._own = frozenset(own)
            route += own
        return route

    def _refused(self, plan: Plan, refused: Exception) -> None:
        """A call refused before any attempt: its route span (error status, ``error.type``) and an
        ``llm_call_failed`` warning say why, unless the adapter sends it all the same; with summaries
        written for it (paid for), their spans and its ledger row too."""
        if not self.side_calls and self.sends_refused is not None and self.sends_refused(refused):
            return
        engine = self.engine
        trace = CallTrace.start(engine.telemetry, plan, engine.catalog.provider(plan.model), 0, 0, attempt=False,
                                side_calls=self.side_calls)
        if self.side_calls:
            self._give_up(plan, trace, refused)
        else:
            trace.fail(refused)

    @property
    def wants_answer(self) -> bool:
        """Does the attempt in flight's span read the answer's messages (content capture)?"""
        return self._current is not None and self._current[1].wants_answer

    def _stopped(self, error: BaseException) -> None:
        """The driver stopped the call at one of its effects (``asyncio.CancelledError``, a timeout
        around the call, ``KeyboardInterrupt``): an attempt in flight is recorded as failed with
        ``error``, and the call's reservation is given back at once rather than held until it lapses
        (a hold that never reached the store is released as nothing spent: no change), or settled at
        what the attempt used if it had produced part of an answer (:meth:`stopping`). A call stopped
        after its answer came was paid for: it is settled (or its settlement, already sent, recorded)
        and its ledger row and span carry ``error``."""
        if self._current is not None:
            self._give_up(*self._current, error, self._cut or self._unanswered(self._current[0]))
            return
        answered, self._answered = self._answered, None
        if answered is None:
            self.books.release(self.held)
            return
        result, answer, trace = answered  # the provider answered (and was paid): the call is recorded
        if self._settlement is None:  # before its settlement: settled here
            self._settle_later(result, answer, error)
        elif not self._settled:  # while its settlement's writes went to the store (they were sent)
            self._settlement.error = error
            self.books.settled(self._settlement)
        trace.fail(error, result)

    def _unanswered(self, plan: Plan, *, timed_out: bool = False) -> Outcome | None:
        """What the attempt litellm was sent is taken to have used when it timed out, or its caller
        stopped it while litellm had it (:func:`~.accounting.prompt_only`: its prompt, counted locally),
        so budgets and the ledger count it as the provider bills it; ``None`` where it may not have been
        sent: an adapter's attempt stopped from outside (its handler may have called no model; one that
        ``timed_out`` waiting for a provider's answer was sent), or no attempt in flight."""
        if not timed_out and (self.read is not None or self._in_flight is None):
            return None
        began = self._in_flight
        return prompt_only(plan, self.engine.catalog, self.engine.state.request_tokens(plan),
                           None if began is None else time.perf_counter() - began)

    def stopping(self, spent: Outcome) -> None:
        """The attempt in flight is about to be stopped from outside (a cancellation) after its provider
        had produced part of an answer, which used ``spent``: the call is settled at it, as a
        :class:`CutShort` attempt is, when the stop is thrown in."""
        self._cut = spent

    def tried(self, error: Exception, spent: Outcome | None, end_ns: int | None = None) -> None:
        """The attempt in flight was made again after it failed with ``error`` (a retry inside the
        adapter's model call: ModelRetryMiddleware inside RouterAgentMiddleware), having used ``spent``
        (``None``: nothing) before it broke off: its span ends (at ``end_ns``) with what it used, the
        next try has a span of its own, and what it used is settled apart (a ledger row of its own,
        charged to the budgets) when the attempt's end comes back; then too it counts toward the target's
        request and token quotas, as a request the provider was sent, as the pipeline's own retry of a
        target does (:meth:`~.bookkeeping.Bookkeeper.tried`). It counts toward no cooldown."""
        if self._current is None:
            return
        trace = self._current[1]
        trace.attempt_failed(error, spent, end_ns)
        trace.again()
        self._tries += ((spent, error, time.time()),)

    def _settle_tries(self) -> None:
        """Count the attempt's earlier tries toward its quotas, and settle apart what they used
        (:meth:`tried`), in the lifecycle's step (a store write never blocks an event loop there)."""
        tries, self._tries = self._tries, ()
        for spent, error, when in tries:
            self.books.tried(self.held, error, spent, when)
            if spent is not None:
                self._settle_apart(spent, error)

    def retried(self, error: Exception) -> None:
        """The adapter's router tried the current attempt's target again, on its own, after ``error``
        (the proxy's ``num_retries``): that try's failure counts toward the target's cooldown, as the
        lifecycle's own retries count (the last try's is counted when the call moves on or ends)."""
        if self._current is not None:
            plan, _ = self._current
            self.books.target_failed(self.held, plan.deployment or plan.model, error)

    def abandon(self, error: BaseException, spent: Outcome | None = None, failed: bool = False, *,
                made: bool = True) -> None:
        """End a call whose attempts stopped outside the lifecycle (the proxy gave up before the
        lifecycle did): record ``error`` as its failure and release what it holds, or settle it at
        ``spent`` (what its attempt used before it broke off). ``failed``: ``error`` is the attempt's
        own failure, told before (or instead of) its failure event: counted as a failure thrown in is
        (:meth:`~.bookkeeping.Bookkeeper.attempt_failed`); ``made=False``: the current attempt was
        never made, and gives back all it took of its quotas. Idempotent: once ended, nothing is counted."""
        if self._current is not None:
            plan, trace = self._current
            if failed:
                self.books.attempt_failed(self.held, plan.deployment or plan.model, error, spent)
            elif not made:
                self.books.attempt_unmade(self.held)
            self._give_up(plan, trace, error, spent, row=made or not self._apart)

    # -- before the first attempt ----------------------------------------------------------------

    def _plan(self, target: str | None = None, decision: Decision | None = None,
              route: bool = False) -> Generator[Effect, Any, Plan]:
        """The call's plan, or (``target``) a later attempt's, recording ``decision`` (``route``: an
        alias ``target`` is routed, never taken for the adapter's model of that name). On a store that
        can block, planning reads only what was fetched for the call or is kept in the process: what a
        pass missed (and the recent reply sizes the plan's estimate reads) is fetched in one round
        trip, and the call is planned again. A call first fetches what planning the last call like
        it read and the process does not keep (after idle; or never kept, as a session's reasoning
        spend), so it is planned once when it reads the same keys."""
        fetched = self.prefetch
        make = self._make
        if fetched is None:
            return make(target, decision, route)
        if target is not None:  # read again what the call's earlier plans read (its own holds, a spend)
            fetched.values.clear()
        failed = False  # the read ahead failed: what planning misses then reads as missing, unfetched
        ahead = fetched.ahead(self.engine.reads_of(self.call)) if target is None else {}
        if ahead:  # what the last call like this one read and the process no longer keeps
            found = yield from self._fetch(ahead)
            failed = found is None
            fetched.fill(ahead, found)
        for _ in range(PLAN_PASSES):
            try:
                plan = make(target, decision, route)
            except Exception:
                if not fetched.missed:  # not for want of a value: the plan's own error
                    raise
            else:
                self.books.want_recent(plan, fetched)
                if not fetched.missed:
                    break
            fetched.fill(fetched.missed, None if failed else (yield from self._fetch(fetched.missed)))
        else:
            plan = make(target, decision, route)
            self.books.want_recent(plan, fetched)
            fetched.fill(fetched.missed, None)  # still missing after a few passes: it reads as missing
        if target is None:
            self.engine.remember_reads(self.call, fetched.used)
        if fetched.renew:  # stale values this plan used: read again for the calls that follow
            fetched.fill(fetched.renew, (yield from self._fetch(fetched.renew)), call=False)
        return plan

    def _make(self, target: str | None, decision: Decision | None, route: bool = False) -> Plan:
        """Plan the call (or take the adapter's plan), or a later attempt at ``target`` (a method, not a
        closure: a call waiting on a fetch holds fewer objects)."""
        if target is None:
            return self.given if self.given is not None else self.engine.plan(
                self.call, prefetch=self.prefetch, pinned=not self.reroutes)
        assert decision is not None
        return self.engine.replan(self.call, target, decision, self.prefetch, served=not route and target in self._own)

    def _fetch(self, noted: dict[str, Any]) -> Generator[Effect, Any, Fetched | None]:
        """The store's values of the keys ``noted`` (one round trip), or ``None`` if it failed."""
        keys, lists = Prefetch.wanted(noted)
        try:
            found: Fetched = yield StoreCall(self.engine.store, "fetch", (keys, lists))
        except Exception as exc:  # noqa: BLE001 - a failing store reads as missing
            log.warning("store_read_failed", keys=len(keys) + len(lists), error_type=type(exc).__name__)
            return None
        return found

    def _summarize(self, job: SummaryJob) -> Generator[Effect, Any, None]:
        """Write a dropped span's summary unless another call is writing it (a failure keeps the offline
        digest); the call keeps what it cost and when, for its ledger row and a CLIENT span under its
        route span."""
        try:  # one writer per span across calls and processes; the others keep the digest meanwhile
            if (yield StoreCall(self.engine.store, "add_within", (self.books.summary_claim(job.key),))) is not None:
                return
        except Exception as exc:  # noqa: BLE001 - without the store's word, write it (as before claims)
            log.warning("summary_claim_failed", span=job.key, error_type=type(exc).__name__)
        request = self.engine.summary_request(job, self.call.params.get("timeout"))
        model, started = str(request.get("model")), time.time_ns()
        server = host_of(request.get("api_base") or request.get("base_url"), self.engine.catalog.provider(model))
        try:
            response = yield Summarize(job, request)
        except Exception as exc:  # noqa: BLE001 - a failed summary keeps the offline digest
            self.side_calls += (SideCall(model, None, exc, started, time.time_ns(), server=server),)
            log.warning("summary_failed", span=job.key, error_type=type(exc).__name__,
                        error=self.engine.telemetry.redactor(str(exc))[:200])
            return
        ended = time.time_ns()
        text = summary_text(response)
        if text:
            self.books.keep_summary(job.key, text, self.prefetch)
        try:
            outcome: Outcome | None = build_outcome(response, None, self.engine.catalog)
        except Exception as exc:  # noqa: BLE001 - an unpriced summary still serves the call
            log.warning("summary_unaccounted", span=job.key, error_type=type(exc).__name__)
            outcome = None
        self.side_calls += (SideCall(model, outcome, None, started, ended, server=server),)

    def _carry(self, plan: Plan) -> Plan:
        """``plan`` with what this call's summaries cost (every later plan of the call keeps it), and a
        decision naming a summary model no price is known for: its cost is left out, not said to be 0."""
        if not self.side_calls:
            return plan
        answered = [c for c in self.side_calls if c.outcome is not None]
        unpriced = sorted({c.model for c in answered if c.outcome is not None and c.outcome.cost.total_usd is None})
        if unpriced:
            plan = plan.decide(Decision("context", "summary-unpriced", f"no price is known for the summary model "
                                        f"{', '.join(unpriced)}: its calls' cost is left out of this call's cost "
                                        "(add it under models: to count it)", {"models": ", ".join(unpriced)}))
        spent = sum(c.outcome.cost.total_usd or 0.0 for c in answered if c.outcome is not None)
        return plan.override(summary_cost_usd=spent) if spent else plan

    def _from_cache(self, plan: Plan) -> Generator[Effect, Any, tuple[Any, Plan]]:
        """A cached answer shaped like a live one (a stream if one was asked for), or None; and the
        plan, with a decision recorded if the cache failed (it shows on the span). The exact lookup is
        a store effect; a paraphrase lookup (semantic cache) runs in place."""
        engine, cache = self.engine, self.engine.cache
        keyed = self._keyed(plan)
        if keyed is None or cache is None or not cache.cacheable(keyed):
            return None, plan
        entry, error, loaded, response = None, None, None, None
        route = None if self.follow else next((d for d in reversed(plan.decisions)
                                               if d.policy == "routing" and d.action == "route"), None)
        if route is not None:  # the alias routing resolved to (a tier's, a soft limit's), and its strategy
            alias = f"{route.attributes.get('alias', plan.call.model)}:{route.attributes.get('strategy', '')}"
            keyed = self._looked_up = keyed.override(model=alias)
        try:
            entry = cache.decode((yield StoreCall(cache.store, "get", (key_for(keyed),))))
        except Exception as exc:  # noqa: BLE001 - a broken cache is a miss
            error = cache.failed("lookup", exc)
        if entry is None and cache.semantic is not None:
            entry, failed = ((yield StoreCall(cache, "similar_entry", (keyed,))) if self.engine.store_blocks
                             else cache.similar_entry(keyed))
            error = error or failed
        if entry is not None and self.answers is not None:
            try:
                response = rebuild_response(entry.response)
                loaded = self.answers.loaded(response, entry.native)
            except Exception as exc:  # noqa: BLE001 - an entry the adapter cannot read is a miss
                entry, error = None, cache.failed("lookup", exc)
        if error:
            plan = plan.decide(Decision("cache", "error", f"{error}; treated as a miss"))
        if entry is None:
            return None, plan
        before, after = engine.trimmed(plan)  # what the policies kept out is saved as on a miss, the rest by the hit
        cached = entry.cost_usd or 0.0
        context = entry.saved_context_usd if entry.saved_context_usd is not None else \
            engine.saving(plan.model, before - after)  # as the miss's row measured it, where it could
        similar = entry.similarity
        hit_on = "the same request" if similar is None else f"a similar prompt (similarity {similar:.3f})"
        plan = plan.decide(Decision("cache", "hit", f"served from the response cache: {hit_on}",
                                    {} if similar is None else {"similarity": round(similar, 4)}),
                           estimated_savings_usd=context + cached)
        trace = CallTrace.start(engine.telemetry, plan, engine.catalog.provider(plan.model), before, after,
                                attempt=False, side_calls=self.side_calls)
        trace.cache_similarity = entry.similarity
        started = time.perf_counter()

        def hit(response: Any, begun: float, first: float | None = None,
                error: BaseException | None = None) -> Outcome:
            """The hit's outcome; ``error``: its stream's caller stopped reading (nothing was paid either way)."""
            result = build_outcome(response, plan, engine.catalog, usage_source="cache",
                                   latency_s=time.perf_counter() - begun,
                                   time_to_first_token_s=(first - begun) if first is not None else None)
            trace.end(result, response, error)
            self.books.record(result, error=error, cached_usd=cached)
            return result

        if self.answers is not None:
            return self.answers.served(loaded, hit(response, started)), plan
        if plan.params.get("stream"):
            return TrackedStream(Replay(replay_chunks(entry.response)),  # ending with a usage chunk, as asked
                                 lambda chunks, begun, first, error, _early:
                                 hit(rebuild_response(entry.response), begun, first, error), started,
                                 hide_usage=not usage_asked(plan.params), answers=choices_asked(plan.params)), plan
        response = rebuild_response(entry.response)
        wire.attach_outcome(response, hit(response, started))
        return response, plan

    def _claims(self, plan: Plan, *, reasoning: bool = True) -> list[Claim]:
        """The call's budget claims at its estimated size (none, and no estimate, without budgets), and
        with ``reasoning`` its expected reasoning on its session's budget."""
        expected = self.books.reasoning_claim(plan) if reasoning else []
        if not self.engine.config.routing.budgets:
            return expected
        tokens, output = self._size(plan)
        return self.books.claims(plan.call.context, usd=self.engine.estimate_usd(plan, tokens, output),
                                 tokens=tokens + output) + expected

    def _top_up(self, plan: Plan) -> list[Claim]:
        """A later attempt's budget claims: what ``plan``'s target is estimated at beyond what the call
        holds (a fallback to a dearer model; none without budgets, or where it holds enough)."""
        if self.held.reservation is None or self.forced:  # forced: litellm calls its fallbacks as given
            return []
        return budgets.top_up(self.held.reservation, self._claims(plan, reasoning=False))

    def _size(self, plan: Plan) -> tuple[int, int]:
        """The prompt and output tokens to reserve for ``plan`` (the local count kept to learn from),
        counted once per plan: the budget claims and a token quota of the same attempt share it."""
        if self._sized is not plan:
            self.held.counted, tokens, output = self.engine.request_size(plan, self.prefetch)
            self._sized, self._size_of = plan, (tokens, output)
        return self._size_of

    def _admit(self, plan: Plan, attempts: Attempts,
               claims: list[Claim] | None = None) -> Generator[Effect, Any, Plan]:
        """Take the attempt's quotas (free tier, ``routing.limits``, the provider's view), with the
        call's budget ``claims`` on its first attempt. A target the adapter cannot reach, or whose quota
        is used up, moves the call on to its next one; none left raises :class:`NoRouteError`. A
        half-open target is tried only by the call that claims its probe; the others move on, unless
        no target after it admits the call but a last resort (a target cooling down), at this attempt or
        a later one (tried anyway, as a direct call would be; not once an adapter's router holds the
        targets it was handed: it never goes back). A reasoning reservation
        that does not fit plans the call again (a lower level), a few times at most. A budget that
        cannot hold the call and names a ``downgrade_to`` plans it again on that alias, once, before
        it refuses it (:meth:`_downgraded`); that refusal stands if the alias does not admit the call
        either (its budget claim, its quotas or the adapter's reach). Each target is claimed at its own
        estimate: the first a target the call moves on to here; a later attempt's (``claims`` None) what
        it is estimated at beyond what the call holds (:meth:`_top_up`), and a budget that cannot hold
        that moves the call on to its next target (the budget refuses it when none is left)."""
        denied: dict[str, str] = {}
        replans = len(LEVELS)
        topping_up = claims is None
        claimed_for = plan.deployment or plan.model  # the target the claims were estimated on
        over: BudgetExceeded | None = None  # a budget that could not hold a later attempt's target
        # not where litellm calls the fallbacks it was given, nor for a request sent as it came: either
        # goes where it asked
        downgrade = self.reroutes and not self.forced and self.given is None
        downgraded: BudgetExceeded | None = None  # the refusal a downgrade answered
        anyway = False  # a half-open target another call probes is tried all the same (no target after it)
        while True:
            target = plan.deployment or plan.model
            if topping_up:
                claims = self._top_up(plan)
            elif target != claimed_for:  # moved on from the target the claims were estimated on
                claims, claimed_for = self._claims(plan, reasoning=replans > 0), target
            probed = self._probed  # skipped at this admission or an earlier attempt's
            # a half-open target comes before one cooling down
            if probed is not None and target in self.circuits.last_resort:
                anyway, back = True, attempts.back_to(probed)
                reason = f"{target} cools down: {probed}, half-open, is tried anyway before it"
                self._probed = None
                plan = _following(plan, self._carry((yield from self._plan(back, Decision(
                    "routing", "half-open", reason, {"depth": attempts.depth})))))
                continue
            unreachable = self.usable is not None and not self.usable(target)
            why = self.unusable if unreachable else None
            if why is None:
                found = quotas.quotas_for(target, plan.model, self.engine.config.routing, self.books.groups.get(target))
                size = sum(self._size(plan)) if quotas.estimate_needed(found) else 0
                probe = self.circuits.half_open.get(target) if not anyway else None
                budget = False  # a budget refused this target
                try:
                    why = yield from self._take(found, size, claims or [], probe)
                except BudgetExceeded as refused:
                    if not topping_up:
                        if downgraded is not None:
                            raise downgraded from None
                        cheaper = (yield from self._downgraded(plan, refused)) if downgrade else None
                        if cheaper is None:
                            raise
                        # another route from its start: what the first one skipped is not tried anyway
                        downgraded, anyway = refused, False
                        attempts.restart(self._route(cheaper))
                        self.circuits = cheaper.circuits
                        self._probed = None
                        plan = _following(plan, cheaper)
                        claims = self._claims(plan, reasoning=replans > 0)
                        claimed_for = cheaper.deployment or cheaper.model
                        continue
                    over, why = refused, str(refused)  # the call holds its first target's estimate: the next may fit
                    budget = True
                own = target in self._own and not budget  # the router's own fallback: it calls it all the same
                if why is not None and (self.forced or own) and not isinstance(why, StepDown):  # litellm calls it
                    log.warning("route_not_enforced", target=target, error=str(why)[:200],  # all the same
                                why="litellm calls its fallbacks as given: sent, its quotas not taken" if self.forced
                                else "the proxy's router falls back to it on its own: sent, its quotas not taken")
                    why = yield from self._take((), 0, claims or [], None)  # the budgets still hold
                if why is None:  # a half-open target skipped is still owed a try before a last resort
                    return plan
                if isinstance(why, Probing):
                    if len(attempts.models) == 1:
                        anyway = True
                        continue
                    self._probed = self._probed or target
                if isinstance(why, StepDown):
                    plan = _following(plan, self._carry((yield from self._plan(
                        target, Decision("reasoning", "step-down", why)))))
                    replans -= 1
                    claims = self._claims(plan, reasoning=replans > 0)
                    continue
            denied[target] = why
            next_target = attempts.skip(why)
            action = "skip" if unreachable else "half-open" if isinstance(why, Probing) else "quota"
            reason = f"{target}: {why}; moving on to {next_target}"
            probed = self._probed
            if next_target is None and probed is not None:  # refusing would be worse than a direct call
                anyway, next_target, action = True, attempts.back_to(probed), "half-open"
                reason = f"{target}: {why}; no target after {probed} admits the call: it is tried anyway"
                self._probed = None
            if next_target is None:
                refusal = downgraded or over  # no target admits it: a budget refused it
                if refusal is not None:
                    if refusal is over and len(attempts.history) > 1:  # which targets, and what came of them
                        refusal.add_note(f"router-middleware: {'; '.join(attempts.history[:-1])}; then the budget "
                                         f"could not hold {target}, the estimate above")
                    raise refusal
                raise NoRouteError(self.call.model, denied)
            plan = _following(plan, self._carry((yield from self._plan(next_target, Decision(
                "routing", action, reason, {"depth": attempts.depth})))))

    def _downgraded(self, plan: Plan, refused: BudgetExceeded) -> Generator[Effect, Any, Plan | None]:
        """The call planned again on the ``downgrade_to`` alias of the budget that refused it, when the
        call is not routed there already: a call that does not fit on the model it asked for may fit on
        a cheaper one, as it would be sent once the budget is past its soft limit. ``None``: no such
        alias, or none of its targets can serve the call (the refusal stands)."""
        budget = next((b for b in self.engine.config.routing.budgets if b.name == refused.name), None)
        alias = budget.downgrade_to if budget is not None else None
        routed = next((d.attributes.get("alias") for d in plan.decisions
                       if d.policy == "routing" and d.action == "route"), None)
        if alias is None or alias in (routed, self.engine.config.routing.split_route(plan.call.model)[0]):
            return None
        reason = f"{refused}: downgraded to {alias}"
        try:
            cheaper = yield from self._plan(alias, Decision("routing", "downgrade", reason, {"budget": refused.name}),
                                            route=True)
        except RouterMiddlewareError:
            return None
        return self._carry(cheaper)

    def _take(self, found: tuple[quotas.Quota, ...], size: int, claims: list[Claim],
              probe: str | None = None) -> Generator[Effect, Any, str | None]:
        """Admit an attempt through the store (one atomic ``add_within``), claiming the ``probe`` of a
        half-open target; why not, or ``None``."""
        admission = self.books.admission(found, size, claims, probe)
        if admission is None:
            return None
        # patient with a probe claim (one left behind would keep every call from probing for probe_s) or
        # budget holds (one taken after the call's release was sent would count until reservation_ttl_s)
        replaced: set[str] = set()  # each key's value is taken out once
        while True:
            try:
                refusal = yield StoreCall(self.engine.store, "add_within", (admission.entries, admission.holds,
                                                                            admission.owned, admission.left),
                                          admission.probe is not None or bool(admission.claims))
            except UnreadableCounter as exc:  # another program's value: taken out, if the books say so
                if exc.key in replaced or not self.books.replaces(admission, exc):
                    self.books.admission_failed(self.held, admission, exc)
                    return None
                try:
                    yield StoreCall(self.books, "replace", (exc,))
                except Exception as failed:  # noqa: BLE001 - as a failed admission
                    self.books.admission_failed(self.held, admission, failed)
                    return None
                replaced.add(exc.key)
                continue
            except Exception as exc:  # noqa: BLE001 - the bookkeeper decides: raise with budgets, else admit
                self.books.admission_failed(self.held, admission, exc)
                return None
            except BaseException:  # stopped while the store admits: what it claimed may be there
                admission.unanswered(self.held)
                raise
            return self.books.admitted(self.held, admission, refusal)

    # -- after an attempt ------------------------------------------------------------------------

    def _failed(self, plan: Plan, trace: CallTrace, attempts: Attempts, exc: Exception,
                spent: Outcome | None = None, *, moved: bool = False, unmade: bool = False,
                ends: bool = False) -> Generator[Effect, Any, tuple[Plan, float] | None]:
        """Count the failure; the next attempt's plan and delay, or ``None`` to give up (the spans
        and ledger row then record the error, and the reservation is released, or settled at
        ``spent``: what the attempt used before it broke off). ``moved``: the adapter's router has
        moved on to the next target (:class:`MovedPast`), which the call follows whatever ``exc`` is;
        ``unmade``: without making this attempt (nothing counted, its quotas given back); ``ends``:
        no attempt follows (:class:`Final`)."""
        engine, failed = self.engine, plan.deployment or plan.model
        if spent is None and wire.timed_out(exc) and (self.read is None or (
                self.charges_timeouts and wire.provider_timeout(exc))):
            spent = self._unanswered(plan, timed_out=True)  # sent, and no answer came in time: its prompt was paid
        unknown = wire.no_provider(exc, plan.model) or (  # a typo: the next target, if any, may still serve
            isinstance(exc, UnknownModelError) and exc.model == plan.model)  # (from a pipeline behind an adapter)
        keyless = not unknown and wire.missing_credentials(exc)  # refused before sending: the next may have one
        unbuilt = not (unknown or keyless) and wire.unbuilt(exc) is not None  # litellm broke building it
        if spent is None:  # else the attempt's span stays open, to end with what it used if the call ends
            trace.attempt_failed(exc, sent=not (unknown or keyless or unbuilt or unmade))
        if unmade:
            self.books.attempt_unmade(self.held)
        else:
            self.books.attempt_failed(self.held, failed, exc, spent)
        window = error_kind(exc) == "ContextWindowExceededError"
        # the proxy's router sends that error to a context_window_fallbacks chain of its own, if it has
        # one for the target, else to the fallbacks it was handed whatever their windows: the call
        # follows it there (one row, under the budgets)
        chain = self.routers_own.window_chain(failed) if window and self.routers_own is not None else None
        if chain is not None:  # as litellm walks it: the targets tried are skipped, one it cannot reach
            fresh = [t for t in chain if t != failed and t not in attempts.past]  # leads to the handed ones
            reach = [t for t in fresh if self.usable is None or self.usable(t)]
            if reach or not fresh:
                attempts.instead(reach)
                self._own = self._own | frozenset(reach)  # sent as the router sends them (the budgets hold)
        if not self.fallback or ends:
            self._give_up(plan, trace, exc, spent)
            return None
        windows = (request_windows(engine.catalog, attempts.models, engine.model_of)
                   if window and self.routers_own is None else None)  # only that error needs them
        next_target = (attempts.skip(NO_PROVIDER) if unknown else attempts.skip(NO_KEY) if keyless
                       else attempts.skip(UNBUILT) if unbuilt
                       else attempts.skip(error_kind(exc)) if self.follow or moved else attempts.advance(exc, windows))
        if next_target is None:
            final = unknown_model(self.call.model, plan, engine.config.routing, self.follow) if unknown else exc
            if len(attempts.history) > 1:  # the traceback shows every target's end, not only the last one's
                final.add_note(f"router-middleware: {len(attempts.history)} attempts, all failed: "
                               + "; ".join(attempts.history))
            self._give_up(plan, trace, final, spent)  # the log line, span and row say what the caller is told
            if unknown:
                raise final from exc
            return None
        if spent is not None:  # the call goes on: the cut attempt was paid for, and is settled on its own
            engine.sent(plan)  # its provider read the prompt (and cached it)
            trace.attempt_failed(exc, spent)
            self._settle_apart(spent, exc)
            self._apart = True
        if self.routers_own is not None:  # the adapter's router holds the targets it was handed (its
            self._probed = None  # moves, MovedPast, come only from it): one it was not handed is owed no try
        retry = plan
        if next_target != failed:
            retry = _following(plan, self._carry((yield from self._plan(next_target, Decision(
                "routing", "fallback", f"{what_failed(plan, exc)}; falling back to {next_target}",
                {"depth": attempts.depth, "failed": "; ".join(attempts.history)})))))
        try:
            retry = yield from self._admit(retry, attempts)
        except RouterMiddlewareError as no_route:  # no target left that admits it, can be paid for, or a store
            # that failed a closed budget's top-up (StoreUnavailable); a cut attempt has its row and charge
            self._give_up(plan, trace, exc, None if self._apart else spent, row=not self._apart)
            raise no_route from exc
        retry = engine.context_priced(retry)  # the target admitted (the conversation may be warm there now)
        trace.next_attempt(retry, engine.catalog.provider(retry.model), attempts.depth)
        same = (retry.deployment or retry.model) == failed
        if unknown or keyless:  # no provider was called: nothing to back off from
            return retry, 0.0
        return retry, backoff(attempts.depth - 1, engine.config.routing.fallback, exc, same_target=same)

    def _give_up(self, plan: Plan, trace: CallTrace, exc: BaseException, spent: Outcome | None = None, *,
                 row: bool = True) -> None:
        """End the call with ``exc``: its spans and ledger row say so, and its reservation is given
        back, or settled at ``spent`` (what an attempt that broke off partway used). ``row=False``: the
        last attempt made has its row already (:meth:`_settle_apart`; the one after was never made)."""
        self._current = None
        trace.fail(exc, spent)
        if spent is not None:
            self.engine.sent(plan)  # its provider read the prompt
            self._settle_later(spent, None, exc, complete=False)
            return
        if row:
            self.books.record_failure(plan, exc)
        self.books.release(self.held)

    def _settle_apart(self, spent: Outcome, error: BaseException) -> None:
        """An attempt (or a try of one) that broke off partway, followed by another: what it used is
        charged to the budgets that apply, and it has a ledger row of its own naming ``error`` (the
        call's row is its last attempt's), off the loop."""
        books = self.books

        def settle() -> None:
            books.settle_observed(spent, complete=False, error=error)

        defer(settle)

    def _settle_later(self, result: Outcome, answer: Any, error: BaseException, *, complete: bool = True) -> None:
        """Settle a call ended by ``error`` at ``result`` (off the loop, as a lesser write)."""
        held, books = self.held, self.books

        def settle() -> None:
            books.settle(result, held, answer, complete=complete, error=error)

        defer(settle)

    def _succeeded(self, plan: Plan, answer: Any, trace: CallTrace, started: float) -> Flow:
        self.engine.sent(plan)
        if self.read is not None:
            result = self.read(plan, answer, started)  # if it fails, abandon() still records the call
            self._current, self._answered = None, (result, answer, trace)
            stored = self._adapted(answer, result, trace) if self._saves(plan) else None
            entry = (yield from self._store(plan, stored[0], result, trace, stored[1])) if stored else None
            result, failed = yield from self._settle(result, entry=entry)
            yield from self._stored(plan, entry, failed, trace)
            self._answered = None
            trace.succeed(result, answer)  # content capture reads the answer's choices, if it has any
            return answer
        self._current = None
        if plan.params.get("stream"):
            return TrackedStream(answer, self._stream_finisher(plan, trace, answer), started,
                                 off_loop=self.engine.store_blocks, hide_usage=self.engine.adds_usage_chunk(plan),
                                 answers=choices_asked(plan.params))
        result = build_outcome(answer, plan, self.engine.catalog, latency_s=time.perf_counter() - started,
                               usage_source=wire.usage_source(answer))  # a hit of litellm.cache's: no cost
        wire.attach_outcome(answer, result)
        self._answered = (result, answer, trace)
        entry = (yield from self._store(plan, answer, result, trace)) if self._saves(plan) else None
        settled, failed = yield from self._settle(result, answer, entry)
        yield from self._stored(plan, entry, failed, trace)
        if settled is not result:
            wire.attach_outcome(answer, settled)
        self._answered = None
        trace.succeed(settled, answer)
        return answer

    def _keyed(self, plan: Plan) -> Plan | None:
        """``plan`` as the response cache sees it (an adapter's, with what its model adds; made once a
        plan), or ``None`` for one the adapter cannot key (not cached)."""
        if self.answers is None:
            return plan
        if self._keyed_as is None or self._keyed_as[0] is not plan:
            self._keyed_as = (plan, self.answers.keyed(plan))
        return self._keyed_as[1]

    def _cache_key(self, plan: Plan) -> Plan:
        """``plan``'s keyed form for a call :meth:`_saves` sends to the cache (so one it can key)."""
        keyed = self._keyed(plan)
        assert keyed is not None
        return keyed

    def _adapted(self, answer: Any, result: Outcome, trace: CallTrace) -> tuple[dict[str, Any], Any] | None:
        """An adapter's answer as a chat completion and its own form, or ``None`` (not to be cached)."""
        try:
            return self.answers.stored(answer, result) if self.answers is not None else None
        except Exception as exc:  # noqa: BLE001 - a failed write loses a cache entry, not the answer
            if self.engine.cache is not None:
                trace.event("router_middleware.cache.error", {"reason": self.engine.cache.failed("write", exc)})
            return None

    def _store(self, plan: Plan, response: Any, result: Outcome, trace: CallTrace,
               native: Any = None) -> Generator[Effect, Any, Bounded | None]:
        """Write ``response`` as ``plan``'s cached answer where the cache has a store of its own; else
        return its entry, for the settlement to write (one round trip)."""
        cache = self.engine.cache
        assert cache is not None
        if wire.says_nothing(response):  # no answer to serve again (an empty stream, an empty text)
            return None
        keyed = self._cache_plan(plan)
        try:
            entry = cache.entry(keyed, response, result.cost.total_usd, native,
                                self.books.context_saving(result))
            if cache.store is self.engine.store:
                return entry
            yield StoreCall(cache.store, "put_bounded", entry)
            yield from self._cached(keyed, entry[0])
        except Exception as exc:  # noqa: BLE001 - a failed write loses a cache entry, not the answer
            trace.event("router_middleware.cache.error", {"reason": cache.failed("write", exc)})
        return None

    def _stored(self, plan: Plan, entry: Bounded | None, failed: Exception | None,
                trace: CallTrace) -> Generator[Effect, Any, None]:
        """After a settlement that carried the cache's ``entry``: the semantic index learns it, or the
        span says the write failed."""
        cache = self.engine.cache
        if entry is None or cache is None:
            return
        if failed is None or isinstance(failed, PartialWrite) and failed.cache_written:  # the settlement failed alone
            yield from self._cached(self._cache_plan(plan), entry[0])
        else:
            trace.event("router_middleware.cache.error", {"reason": cache.failed("write", failed)})

    def _cached(self, plan: Plan, key: str) -> Generator[Effect, Any, None]:
        """After a response-cache write: the semantic index learns the entry (it writes to the store)."""
        cache = self.engine.cache
        if cache is not None and cache.semantic is not None and self.engine.store_blocks:
            yield StoreCall(cache, "saved", (plan, key))
        elif cache is not None:
            cache.saved(plan, key)

    def _settle(self, result: Outcome, answer: Any = None,
                entry: Bounded | None = None) -> Generator[Effect, Any, tuple[Outcome, Exception | None]]:
        """Settle through the store (one ``add_many``, with the response cache's ``entry`` when it
        shares the store); a failed write is logged and recorded as a decision on the outcome
        returned, never raised. The outcome, and the error if the write failed."""
        done = self._settlement = self.books.settlement(result, self.held, answer)
        failed = None
        if done.writes or entry is not None:
            try:
                yield StoreCall(self.engine.store, "add_many", done.batch([entry] if entry is not None else []))
            except Exception as exc:  # noqa: BLE001 - the answer is the user's, whatever the store says
                failed = exc
                if not (isinstance(exc, PartialWrite) and exc.settled):  # the cache's entry failed alone
                    self.books.settle_failed(done, exc)
        self._settled = True
        self.books.settled(done)
        return done.outcome, failed

    def _saves(self, plan: Plan) -> bool:
        """Will this call's answer go to the response cache? Not one litellm's ``fallbacks=`` may have
        given (another model's, which a call of this one would be served)."""
        cache = self.engine.cache
        if cache is None or not self.use_cache or plan.params.get("fallbacks"):
            return False
        keyed = self._keyed(plan)
        return keyed is not None and cache.cacheable(keyed)

    def _save(self, plan: Plan, response: Any, result: Outcome, trace: CallTrace) -> Bounded | None:
        """Save a stream's answer that :meth:`_saves` sends to the response cache: the entry, for the
        stream's settlement to write, where the cache shares the call's store; else saved here."""
        cache = self.engine.cache
        if cache is None or wire.says_nothing(response):  # no answer to serve again: see _store
            return None
        context = self.books.context_saving(result)
        keyed = self._cache_plan(plan)
        try:
            entry = cache.entry(keyed, response, result.cost.total_usd, saved_context_usd=context)
            if cache.store is self.engine.store:
                return entry
            cache.store.put_bounded(*entry)  # one round trip
            cache.saved(keyed, entry[0])
        except Exception as exc:  # noqa: BLE001 - a failed write loses a cache entry, not the answer
            trace.event("router_middleware.cache.error", {"reason": cache.failed("write", exc)})
        return None

    def _cache_plan(self, plan: Plan) -> Plan:
        """The plan ``plan``'s answer is cached as: a routed call's as it was looked up, its alias in
        place of its target (any target's answer serves the alias's next identical call: a fallback's
        while the first target fails; a call of the target by name is keyed apart), unless a budget
        downgraded it to another alias; else ``plan``'s own keyed form."""
        looked_up = self._looked_up
        if looked_up is not None and not any(d.action == "downgrade" for d in plan.decisions):
            return looked_up
        return self._cache_key(plan)

    def _stream_finisher(self, plan: Plan, trace: CallTrace, stream: Any) -> Any:
        engine = self.engine

        def finish(chunks: list[Any], started: float, first: float | None,
                   error: BaseException | None, early: bool) -> Outcome | None:
            complete = error is None
            read_out = complete and not early  # else the caller left at the answer's end: the usage chunk unread
            if isinstance(error, Exception):  # the provider's: a lost connection counts toward the cooldown
                self.books.target_failed(self.held, plan.deployment or plan.model, error)  # (not StreamLeft, Ctrl-C)
            if error is not None and not chunks:
                trace.fail(error)
                if plan.summary_cost_usd:  # the call's summaries were paid for: its row says so
                    self.books.record_failure(plan, error)
                self.books.release(self.held)
                return None
            reported = wire.usage_reported(chunks, stream)
            source: UsageSource = "provider" if read_out and reported else "estimated"
            saved = read_out and self._saves(plan)
            response, assembled = stream_answer(engine, plan, chunks, reported=reported,
                                                light=source == "provider" and not saved
                                                and not trace.wants_answer and engine.usage_chunk_asked(plan))
            if response is None:  # no chunks and no error: an empty stream, read to its end
                trace.fail(RuntimeError("the stream ended before its first chunk"))
                self.books.release(self.held)
                return None
            result = build_outcome(
                response, plan, engine.catalog, usage_source=source, answered_model=wire.answered_model(chunks),
                latency_s=time.perf_counter() - started,
                time_to_first_token_s=(first - started) if first is not None else None,
            )
            if saved and result.model and getattr(response, "model", None) != result.model:
                response.model = result.model  # the provider's name, as an answer's hit gives (not the request's)
            entry = self._save(plan, response, result, trace) if saved else None
            if not complete or not assembled:  # only the finishes the provider sent
                result = replace(result, finish_reasons=stream_finish_reasons(chunks))
            result, failed = self.books.settle(result, self.held, chunks[0], complete=complete, error=error,
                                               bounded=[entry] if entry is not None else ())  # headers ride on chunks
            if entry is not None and engine.cache is not None:
                if failed is None or isinstance(failed, PartialWrite) and failed.cache_written:  # settlement alone
                    engine.cache.saved(self._cache_plan(plan), entry[0])
                else:
                    trace.event("router_middleware.cache.error", {"reason": engine.cache.failed("write", failed)})
            trace.end(result, response, error)
            return result

        return finish


def stream_answer(engine: Engine, plan: Plan, chunks: list[Any], *, reported: bool,
                  light: bool = False) -> tuple[Any, bool]:
    """A stream's answer as its outcome is built from, and whether it was assembled: with ``light``
    (nothing reads the answer itself, and litellm was asked for its usage chunk), the usage chunk
    litellm ended it with, if any; else the answer assembled by litellm's builder (about 40 us a
    chunk). Unless the provider ``reported`` its usage, its prompt tokens are the request counted
    locally, tool definitions included (:meth:`.PolicyState.request_tokens`, once, if at all;
    litellm's own count leaves them out). ``None`` for no chunks."""
    found = wire.usage_chunk(chunks) if light else None
    if found is not None or not chunks:
        return found, False
    prompt = functools.cache(lambda: engine.state.request_tokens(plan))
    response = wire.litellm().stream_chunk_builder(chunks, count_prompt_tokens=prompt)
    if not reported:
        wire.set_prompt_tokens(response, prompt())
    return response, True


_ATTEMPT_ACTIONS = frozenset({"fallback", "skip", "quota", "half-open", "downgrade"})  # decisions moving a call on
# the first attempt's alone
_FIRST_ROUTE = ("session_tier", "escalated_to", "good_steps", "half_open", "group_probes", "last_resort")


def _following(previous: Plan, plan: Plan) -> Plan:
    """``plan`` (a later attempt's, or one planned again) keeping the routing decisions that moved the
    call on before it (each plan records only its own: a fallback that admission then moved past went
    missing from the row), and the route the call took first, without what a session remembers of
    it or its half-open targets (a later attempt's answer is no route of the session's tier: it is
    not remembered as one). Before, the row and the log line of a call that fell back lost its route."""
    carried = tuple(_carried(d) for d in previous.decisions
                    if d.policy == "routing" and (d.action in _ATTEMPT_ACTIONS or d.action == "route"))
    return plan.override(decisions=(*carried, *plan.decisions)) if carried else plan


def _carried(decision: Decision) -> Decision:
    if decision.action != "route" or not any(k in decision.attributes for k in _FIRST_ROUTE):
        return decision
    return replace(decision, attributes={k: v for k, v in decision.attributes.items() if k not in _FIRST_ROUTE})
