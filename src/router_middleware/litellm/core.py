"""What the parts of :class:`.RouterLogger` share (:class:`_Core`): its state (the calls in flight,
the sync streams watched, its lock and counts), stepping and ending a call's lifecycle as its events
come, reading an answer's outcome, and the plan and trace of a call no lifecycle follows."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from litellm.integrations.custom_logger import CustomLogger
from opentelemetry.context import Context

from .. import wire
from ..accounting import build_outcome
from ..drivers import astep, queued_writes, write_all
from ..errors import BudgetExceeded, NoRouteError
from ..lifecycle import CutShort, Final, MovedPast
from ..pipeline import PipelineSource, pipeline_of
from ..telemetry import CallTrace, log
from ..types import Outcome, Plan
from .calls import FellBack, MovedOn, _Answer, _Open, _overflow, _target
from .request import _context, _metadata, _observed, _params_of, _switch

if TYPE_CHECKING:
    from .sync_streams import _Streaming


class _Core(CustomLogger):
    """The state and the shared steps of :class:`.RouterLogger` (the steps behind its proxy hooks:
    :class:`.proxy._ProxyHooks`; its watch of sync streams: :class:`.sync_streams._SyncStreams`)."""

    def __init__(self, pipeline: PipelineSource | None = None, *, proxy: bool = False) -> None:
        """``pipeline``: a :class:`.Pipeline`, or its config (:func:`.pipeline_of`; ``None``, the default
        config's). ``proxy=True`` (the LiteLLM proxy): calls the client did not label get a session, step
        and step kind from their conversation (:func:`.run_labels`)."""
        super().__init__()
        self.pipeline = pipeline_of({} if pipeline is None else pipeline, type(self).__name__)
        self.proxy = proxy
        self._calls: OrderedDict[str, _Open] = OrderedDict()  # calls in flight
        self._streams: OrderedDict[str, _Streaming] = OrderedDict()  # sync chat streams in flight, by watch
        self._watches = itertools.count()  # numbers of the watches, each its own (their call ids may repeat)
        self._exit_hooked = False  # _logger_at_exit registered with atexit (it runs _settle_at_exit)
        self._broken: OrderedDict[str, None] = OrderedDict()  # watches of broken sync streams settled, by key
        self._ended: OrderedDict[str, bool] = OrderedDict()  # calls whose lifecycle has ended (True: the proxy's)
        self._answered: OrderedDict[str, None] = OrderedDict()  # proxy calls settled as served, their event to come
        # proxy calls whose next attempt was refused: the targets the call followed, refused until it ends
        self._refusing: OrderedDict[str, tuple[frozenset[str], Exception]] = OrderedDict()
        self._lock = threading.Lock()
        self._settling = 0  # sync streams whose watch ended and whose row is being written (_sync_ended)
        self._settled = threading.Condition(self._lock)  # notified as each of those is written
        self._writing: set[asyncio.Future[Any]] = set()  # store writes of calls ended (in a worker thread), settlements
        self.hook_calls = 0
        self.recorded = 0
        self._names: tuple[Any, float, frozenset[str] | None] = (None, 0.0, None)  # router, when read, its names

    def _labels(self, kwargs: Mapping[str, Any], *, derive: bool = False) -> dict[str, Any]:
        """The labels of the call ``kwargs`` asks for (:func:`._context`), a proxy key's as the config's
        ``proxy.key_labels`` says."""
        return _context(kwargs, derive=derive, key_labels=self.pipeline.config.proxy.key_labels)

    def _refused(self, key: str, target: Any) -> Exception | None:
        """The refusal of the proxy call ``key`` if it covers ``target``: one the call followed, which
        stays refused through the router's retries until the call ends (the proxy's failure hook, or
        the next request under its id)."""
        with self._lock:
            found = self._refusing.get(key)
        return found[1] if found is not None and target in found[0] else None

    def _take_open(self, key: str, only: _Open | None = None) -> _Open | None:
        """Take a call's lifecycle out of the table while it steps, marking it ended (:meth:`_resume`
        puts it back when it waits for another attempt); with ``only``, just that one (not a later
        call's that reuses the id)."""
        with self._lock:
            found = self._calls.get(key)
            if found is None or (only is not None and found is not only):
                return None
            del self._calls[key]
            self._mark_ended(key, found.proxy or found.as_sent)
            return found

    async def _resume(self, kwargs: Mapping[str, Any], reply: _Answer | None, error: Exception | None,
                      about: Any = None) -> bool:
        """Hand a call's lifecycle what its attempt came to (``about``: the target a failure event
        names; a ``reply`` with an ``error``: what the attempt had produced before it broke off, which
        the call is settled at). False when no lifecycle waits for this event: the caller records it
        on its own, so a success is never lost."""
        key = self._key(kwargs)
        with self._lock:
            current = self._calls.get(key)
            stale = current is not None and (current.proxy and bool(about) and _target(current.attempt) != about
                                             or current.falling_back and not isinstance(error, MovedOn))
            if error is not None and (key in self._ended or stale):
                return True  # a failure the lifecycle has already moved past
        found = self._take_open(key)
        if found is None:
            return False
        if reply is not None and reply.stream is None and found.stream is not None:
            reply = replace(reply, stream=found.stream)
        if error is not None:
            spent = self._spent(found, reply)
            if isinstance(error, MovedOn) and found.proxy:  # the router moved past the target: never retried
                moved = found.own_error() or error  # (with the failure its event or deployment hook told; one
                error, found.passed = found.passed or MovedPast(moved, made=found.started), None  # the router
                # never started is not counted, its quotas given back)
            elif isinstance(error, FellBack):  # litellm's fallbacks= moved on: the failure its hook told
                error = found.own_error() or error
            elif found.router_decides(error):
                found.passed = MovedPast(error, spent)  # the router's next attempt, or the failure hook, says
                self._keep(kwargs, found)
                return True
            if spent is None and found.own_retries and not isinstance(error, MovedPast):
                # the router was handed no fallback but a last resort: it may retry its target (the
                # proxy's own num_retries), so the retry's answer settles the call, or the proxy's
                # failure hook ends it (ended here, a retry that answered had a failed row), or the
                # router moves on to the last resort, which this failure then moved it past
                found.passed = MovedPast(error, spent)
                self._keep(kwargs, found)
                return True
            if found.follows and wire.broke_while_read(kwargs):  # litellm's fallbacks= do not follow it:
                error = Final(error, spent)  # its caller was handed the error
            else:
                error = error if spent is None or isinstance(error, MovedPast) else CutShort(error, spent)
        try:
            done, value = await astep(found.flow, reply, error, wait=False, off_loop=self.pipeline.store_blocks)
        except Exception as exc:  # noqa: BLE001 - the lifecycle gave up (and recorded why), or reading failed
            found.lifecycle.abandon(exc)  # does nothing once the lifecycle recorded the call
            done, value = True, None
            if found.proxy and isinstance(exc, NoRouteError | BudgetExceeded):  # its next target refused:
                with self._lock:  # the router, holding it as a fallback, must not call it (the deployment hook),
                    self._refusing[key] = (found.covered, exc)  # nor retry it; one handed on unfollowed goes
                    _overflow(self._refusing)
        except BaseException as exc:  # cancelled: end the call, release what it holds
            found.end(exc)
            raise
        if done:
            self._tally()
            return True
        found.attempt, found.started = value, False  # the router's next attempt (the lifecycle admitted it)
        self._keep(kwargs, found)
        return True

    async def _attempting(self, kwargs: dict[str, Any], found: _Open,
                          events: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The deployment hook of an attempt the proxy's router makes, or litellm's SDK ``fallbacks=``
        (:attr:`_Open.follows`; ``events``: what carries the call id its events carry, the outer
        call's): when it moved on to the next target without a failure event, the attempt before
        failed; a fallback's request gets its own plan (messages, params)."""
        events = kwargs if events is None else events
        at = _metadata(kwargs).get("model_group") if found.proxy else str(kwargs.get("model") or "") or None
        _passed_over(found, at)
        while at and not found.at(at):
            # the proxy's router skips targets its own cooldown holds without calling them: each is passed
            ahead = found.proxy and at in found.attempt.remaining
            moved = MovedOn(f"the router moved on to {at}") if found.proxy else FellBack(f"litellm fell back to {at}")
            before = found.attempt
            await self._resume(events, None, moved)
            with self._lock:
                current = self._calls.get(self._key(events))
            refused = self._refused(self._key(events), at)
            if refused is not None:  # the lifecycle refused this very target: the router must not call it
                raise refused
            if current is None:
                return None
            found = current
            if not ahead or found.attempt is before:
                break
            _passed_over(found, at)  # the lifecycle moved past it to a target after it (a budget refused it)
        if at and not found.at(at):
            return None
        if found.started:  # the router tries its target again after a failure (its num_retries): that try
            own = found.own_error()  # counts toward the cooldown, as the lifecycle's own do; litellm delivers
            retried, found.passed = found.passed, None  # a request's first failure event only, the deployment
            error = retried.error if retried is not None else own  # failure hook each try's error
            if error is not None:
                self._off_loop(found.lifecycle.retried, error)
        found.started = True
        if found.attempt.plan is found.sent:
            return None
        changed = _switch(kwargs, found.sent.params, found.attempt.plan)
        if found.proxy:  # the router sends this request on; each of litellm's fallbacks starts from the first's
            found.sent = found.attempt.plan
        return changed

    def _spent(self, found: _Open, cut: _Answer | None) -> Outcome | None:
        """What the attempt ``found`` waits for had used before it broke off (``cut``: :func:`._cut`),
        or ``None`` (also when it cannot be read: the failure is then recorded without it)."""
        if cut is None:
            return None
        try:
            return self._read(found.attempt.plan, cut, 0.0, routed=found.proxy)
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return None

    def _read(self, plan: Plan, answer: _Answer, started: float, *, routed: bool = True) -> Outcome:
        """The outcome of the answer, priced as the deployment the proxy's router says answered
        (``routed``; in the SDK the call's own model answered)."""
        moved = routed and answer.deployment and answer.deployment != (plan.deployment or plan.model)
        answered = self.pipeline.model_of(str(answer.deployment)) if moved else answer.answered
        result = build_outcome(answer.response, plan, self.pipeline.catalog,
                               usage_source=answer.source, latency_s=answer.latency_s,
                               time_to_first_token_s=answer.ttft_s, answered_model=answered)
        return result if answer.finishes is None else replace(result, finish_reasons=answer.finishes)

    def _end(self, found: _Open, error: BaseException, spent: Outcome | None = None, *, failed: bool = False) -> None:
        """End a call waiting for an event, on the event loop (settled at ``spent``, if given; ``failed``:
        ``error`` is its attempt's failure, :meth:`.CallLifecycle.abandon`), its writes (its reservation
        given back) off the loop (:meth:`_off_loop`)."""
        self._off_loop(found.end, error, spent, failed)

    def _off_loop(self, work: Callable[..., object], *args: Any) -> None:
        """``work(*args)`` on the event loop, the store writes it makes going to a worker thread when
        the store can block, never holding up the loop (made on the spot once no worker thread takes
        them: ``asyncio.run`` shutting its executor down); :meth:`aflush` waits for them."""
        if not self.pipeline.store_blocks:
            work(*args)
            return
        _, writes = queued_writes(work, *args)
        if not writes:
            return
        try:
            pending = asyncio.get_running_loop().run_in_executor(None, write_all, writes)
        except RuntimeError:  # the loop's default executor is shut down (asyncio.run is ending): made here
            write_all(writes)
            return
        self._writing.add(pending)  # aflush waits for it; asyncio.run's end waits for the thread
        pending.add_done_callback(self._writing.discard)

    def _read_own(self, plan: Plan, answer: _Answer, started: float) -> Outcome:
        return self._read(plan, answer, started, routed=False)

    def _planned(self, kwargs: Mapping[str, Any], start_ns: int | None = None,
                 within: Context | None = None, *, attempt: bool = True) -> tuple[Plan, CallTrace]:
        """A new plan and trace for a call no lifecycle follows (sync calls, which skip the hook), of
        the model the caller passed, as the hook records it (litellm's own ``model`` is stripped), sent
        to the endpoint it was sent to. ``kwargs``: an event's, or what :func:`._request_of` kept of
        them; its spans start at ``start_ns`` (when the call began), under ``within`` (the caller's
        OpenTelemetry context, where the event runs outside it); ``attempt=False``: no provider was
        called (a hit of litellm's response cache), so no CLIENT span."""
        model = wire.requested_model(kwargs) or str(kwargs.get("model") or "unknown")
        context = {"app": self.pipeline.config.app, **self._labels(kwargs)}
        base = wire.api_base(kwargs)
        params = _params_of(kwargs) | ({"api_base": base} if base else {})
        call = _observed(model, list(kwargs.get("messages") or []), context, params)
        plan = Plan.from_call(call)
        return plan, CallTrace.start(self.pipeline.telemetry, plan, self.pipeline.catalog.provider(model), 0, 0,
                                     attempt=attempt, start_ns=start_ns, within=within)

    # -- shared -----------------------------------------------------------------------------------

    @staticmethod
    def _key(kwargs: Mapping[str, Any]) -> str:
        return str(kwargs.get("litellm_call_id") or id(kwargs))

    def _keep(self, kwargs: Mapping[str, Any], value: _Open) -> None:
        evicted: list[_Open] = []
        with self._lock:
            key = self._key(kwargs)
            replaced = self._calls.pop(key, None)
            if replaced is not None and replaced is not value:
                evicted.append(replaced)  # a reused call id
            self._calls[key] = value
            self._ended.pop(key, None)
            evicted += _overflow(self._calls)
        for stale in evicted:
            self._end(stale, TimeoutError("no event came for this call"))

    def _failed(self, plan: Plan, trace: CallTrace, error: BaseException, spent: Outcome | None = None,
                end_ns: int | None = None) -> None:
        """One row and span for a call no lifecycle follows that ended in ``error`` (at ``end_ns``, else
        now): settled at what it used (``spent``, charged to the budgets that apply), else with nothing spent."""
        if spent is None:
            trace.fail(error, end_ns=end_ns)
            self.pipeline.books.record_failure(plan, error)
        else:
            trace.fail(error, self.pipeline.books.settle_observed(spent, complete=False, error=error), end_ns=end_ns)
        self._tally()

    def _tally(self) -> None:
        """One more call recorded (its events run on the loop and on worker threads at once)."""
        with self._lock:
            self.recorded += 1

    def _served_already(self, kwargs: Mapping[str, Any]) -> bool:
        """Is this the success event of a proxy call settled as its answer was served
        (:meth:`._ProxyHooks._settle_served`)? Then it was recorded: the event is dropped."""
        with self._lock:
            key = self._key(kwargs)
            if key not in self._answered:
                return False
            del self._answered[key]
            return True

    def _mark_ended(self, key: str, proxy: bool) -> None:
        self._ended[key] = proxy
        _overflow(self._ended)


def _passed_over(found: _Open, at: str | None) -> None:
    """Refuse the proxy router's attempt at ``at``, a target the call followed and passed (its quota,
    a cooldown, a budget): the router must not call it (``NoRouteError``), and moves on. A group the
    call does not follow (one handed on unfollowed) is sent as before."""
    if found.proxy and at and at in found.covered and not found.at(at) and at not in found.attempt.remaining:
        raise NoRouteError(found.lifecycle.call.model, {at: "the call's plan passed it (its quota used up, "
                                                            "cooling down, or over a budget)"})
