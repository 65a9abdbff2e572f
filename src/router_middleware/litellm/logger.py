"""``RouterLogger``, the logger litellm calls (see the package's docstring): registering it, and
every hook and event litellm calls on it (litellm's proxy finds some of them in the class's own
``__dict__``: see :mod:`.proxy`), the SDK's deployment hook with the steps behind it. The steps behind
the proxy's hooks are in :class:`.proxy._ProxyHooks`, those of the watch of sync streams in
:class:`.sync_streams._SyncStreams`, and what they share (with ``__init__``) in :class:`.core._Core`."""

from __future__ import annotations

import asyncio
import functools
import gc
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any

from opentelemetry.context import Context

from .. import wire
from ..accounting import build_outcome
from ..catalog import provider_named
from ..drivers import astep
from ..errors import BudgetExceeded, MessageError, NoRouteError, RequestError, StoreUnavailable
from ..lifecycle import Attempt, CallLifecycle, Flow
from ..telemetry import log
from ..types import Call
from .calls import FallbacksEnded, _Answer, _cut, _Details, _Open, _target
from .handoff import _HANDOFF
from .proxy import _ProxyHooks, _unplanned
from .request import (
    _REQUEST_KEYS,
    _SDK_AS_SENT,
    _as_sent,
    _error,
    _is_chat,
    _labelled,
    _metadata,
    _nested,
    _ours,
    _RoutersOwn,
    _sdk_fallbacks,
    _switch,
    _unrefusable,
)
from .sync_streams import _SyncStreams, _watch_key

_ENDPOINT_KEYS = ("api_base", "base_url")  # planned with an SDK call for its spans' server.address, sent as given
_SETTLE_WAIT_S = 0.5  # how long a call a budget would refuse waits for answered calls' events (_settle_answered)


def _not_routed(error: NoRouteError) -> None:
    """Log an SDK call over a quota of its deployment, or whose targets all cool down: litellm has
    chosen the deployment, so it is sent as it came and counted."""
    log.warning("route_not_enforced", error=str(error)[:200],
                why="litellm already chose this call's deployment: sent as it came, counted")


def _sends_refused(kwargs: Mapping[str, Any]) -> Callable[[Exception], bool]:
    """Whether an SDK call its lifecycle refused is sent all the same (:meth:`RouterLogger._not_started`):
    a budget's or the store's refusal only where refusing would make things worse; a quota's or
    cooldown's (``NoRouteError``) always, litellm having chosen the deployment. It keeps no reference
    to ``kwargs``: a lifecycle holding litellm's call would keep litellm from ever letting it go."""
    forced = _unrefusable(kwargs) is not None
    return lambda error: forced or not isinstance(error, BudgetExceeded | StoreUnavailable)


class RouterLogger(_ProxyHooks, _SyncStreams):
    """The pipeline inside litellm's callbacks (see the package's docstring): ``RouterLogger(pipeline,
    proxy=...)`` (:meth:`._Core.__init__`), then :meth:`register`."""

    def register(self) -> RouterLogger:
        """Add the logger to ``litellm.callbacks`` (once)."""
        import litellm

        if self not in litellm.callbacks:
            litellm.callbacks.append(self)
        return self

    def unregister(self) -> None:
        """Remove the logger from every litellm callback list (litellm copies ``callbacks`` into its
        success/failure lists on the first call, so removing it from ``callbacks`` alone is not enough)."""
        import litellm

        litellm.logging_callback_manager.remove_callback_from_all_lists(self)

    async def aflush(self) -> None:
        """Wait until litellm has delivered the events of the calls made so far, their ledger rows are
        written and the reservations of calls ended without an event are given back, and the sync streams
        left unread that litellm has let go of so far are recorded (:meth:`._SyncStreams._sync_ended`; one
        litellm still holds, as in a reference cycle the collector has not freed yet, is recorded when it
        is freed, and one its provider broke at the latest :data:`.sync_streams._BROKEN_WAIT_S` after its
        failure event). litellm runs async callbacks on a background worker (an async stream's from a task
        of its own once it ends), which ``asyncio.run`` cancels when its coroutine returns: a short script
        awaits this before it ends. Once the events are delivered, while it still follows a call or a
        sync stream, it runs a full garbage collection (0.2 s in a process that has imported litellm): a
        call litellm let go of without an event (one whose ``fallbacks=`` all failed) is freed only by
        the collector, as litellm's objects hold each other. With none left it does not."""
        await wire.drain_callbacks()
        await asyncio.sleep(0)  # litellm's finished logging tasks let go of their calls
        if self._calls or self._streams:
            gc.collect()
        await asyncio.sleep(0)  # the calls the collection let go of are ended (:meth:`_orphaned`)
        await asyncio.to_thread(_HANDOFF.drain)
        loop = asyncio.get_running_loop()
        writing = [w for w in tuple(self._writing) if w.get_loop() is loop]
        self._writing.difference_update(w for w in tuple(self._writing) if w.get_loop().is_closed())
        if writing:
            await asyncio.wait(writing)
        ledger = self.pipeline.ledger
        if ledger is not None:
            await asyncio.to_thread(ledger.flush)

    # -- the proxy: one call lifecycle per request -----------------------------------------------

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: Any) -> dict[str, Any] | None:
        """Proxy hook, before the proxy resolves ``model``: plan the call and admit its first attempt.
        Raises ``NoRouteError``, ``BudgetExceeded``, ``StoreUnavailable``, ``MessageError`` or
        ``RequestError``, which the proxy returns to the client. An Anthropic ``/v1/messages`` or
        OpenAI ``/v1/responses`` request is sent as it came, admitted against quotas and budgets first
        (:meth:`._ProxyHooks._admit_as_sent`)."""
        with self._lock:  # a refusal left by an earlier request under the same call id
            self._refusing.pop(self._key(data), None)
        endpoint = _as_sent(data, call_type)
        if endpoint is not None:
            await self._admit_as_sent(data, endpoint)
            return None
        if not _is_chat(data, call_type):
            return None
        self.hook_calls += 1
        engine = self.pipeline
        params = {k: v for k, v in data.items() if k in _REQUEST_KEYS}
        call = _labelled(lambda labels: engine.make_call(str(data["model"]), data["messages"], labels, params),
                         self._labels(data, derive=self.proxy))  # litellm's metadata is free-form
        served = self._served(data)  # a target the proxy has no model for is skipped, never sent
        if served is not None:
            self._known_model(call.model, served)
        # what the router falls back to without the hook: the call follows it after its plan's targets
        aliases = engine.config.routing.aliases
        own = _RoutersOwn(wire.proxy_router(), data.get("fallbacks", _RoutersOwn.ROUTERS),
                          aliases.keys() - engine.shadowed.keys() if engine.shadowed else aliases,
                          data.get("context_window_fallbacks"))
        usable = (lambda _: True) if served is None else served.__contains__
        lifecycle = engine.start(call, read=self._read, cache=False, usable=usable,
                                 unusable="not a model_name of the proxy's model_list", routers_own=own)
        flow = lifecycle.run()
        done, attempt = await astep(flow, None, None, wait=False, off_loop=engine.store_blocks)
        assert not done and isinstance(attempt, Attempt)  # without the response cache, a call is attempted
        # the router tries them in the lifecycle's order; one the proxy lacks is skipped there too
        targets = [t for t in attempt.remaining if usable(t)]
        # the targets cooling down behind it, and the router's own, are a last resort: the router first
        # retries its target as it would without them (a passing 503 is retried, not sent to a target
        # that may still be down)
        behind = (*lifecycle.circuits.last_resort, *lifecycle.routers_targets)
        retried = not [t for t in targets if t not in behind]
        self._keep(data, _Open(lifecycle, flow, attempt, attempt.plan, own_retries=retried,
                               planned=frozenset((_target(attempt), *attempt.remaining))))
        changed = _switch(data, call.params, attempt.plan)
        changed["model"] = _target(attempt)
        changed.update(wire.proxy_stream_usage({**data, **changed}))  # as the proxy does for its model names
        changed["fallbacks"] = own.sent(targets, usable)
        if not retried:  # else the router retries its target as it would without the hook
            changed["num_retries"] = engine.config.routing.fallback.attempts_per_model - 1
        return changed

    async def async_post_call_response_headers_hook(self, data: dict[str, Any], user_api_key_dict: Any,
                                                    response: Any, request_headers: dict[str, str] | None = None,
                                                    litellm_call_info: dict[str, Any] | None = None) -> None:
        """Proxy hook, once the router answered and before the proxy serves the answer: a chat stream's
        wrapper is kept with its call, whose success event litellm delivers with only the answer it
        assembled from it (:meth:`_Answer.source`). Adds no headers."""
        stream = wire.stream_wrapper(response)
        if stream is not None:
            with self._lock:
                found = self._calls.get(self._key(data))
                if found is not None:
                    found.stream = stream
        return None

    async def async_post_call_success_hook(self, data: dict[str, Any], user_api_key_dict: Any,
                                           response: Any) -> Any:
        """Proxy hook, once the router answered a plain call and before the proxy serves the answer: a
        routed chat call is settled here, so the client's next request is admitted against its spend
        (:meth:`._ProxyHooks._settle_served`). Changes nothing in the answer."""
        if not data.get("stream"):
            await self._settle_served(data, response)
        return None

    async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                      request_data: dict[str, Any]) -> AsyncGenerator[Any, None]:
        """Proxy hook around the stream the proxy serves: passes every chunk on as it came (kept, for
        a stream the router fell back on midway); once the stream has ended, and before the proxy ends
        its answer (``data: [DONE]``), a routed chat call is settled at the usage chunk that ended it
        (:meth:`._ProxyHooks._settle_served`). A stream
        that breaks or whose client leaves is ended by its events, as before."""
        served: list[Any] = []
        async for chunk in response:
            served.append(chunk)
            yield chunk
        await self._settle_served(request_data, served[-1] if served else None, served=served)

    async def async_post_call_failure_deployment_hook(self, request_data: Mapping[str, Any], exception: Exception,
                                                      call_type: Any, fallback_depth: int | None = None) -> None:
        """Hook after each failed attempt litellm makes (a proxy router's try or fallback; one of the
        SDK's ``fallbacks=``), with that attempt's own error, which is kept with its call: litellm
        delivers a call's first failure event at most, and behind the proxy its router raises the
        first target's error once a fallback failed too, so the error of every later attempt is known
        from this hook alone (read by :meth:`async_post_call_failure_hook` and as the router or the
        SDK moves on: :meth:`._Core._resume`). The SDK's outer call fails last, once its fallbacks all
        failed: the call then ends with its last fallback's error. No I/O but that ending's store writes."""
        if not self._calls:
            return
        nested = _nested(request_data)
        outer = {"litellm_call_id": request_data["litellm_logging_obj"].litellm_call_id} if nested else request_data
        with self._lock:
            found = self._calls.get(self._key(outer))
        if found is None or found.as_sent:
            return
        target = _metadata(request_data).get("model_group") if found.proxy else request_data.get("model")
        if not found.proxy and not nested and found.falling_back:  # litellm's fallbacks= all failed
            last = found.own_error()
            if last is not None and self._take_open(self._key(outer), only=found) is not None:
                self._end(found, last, failed=wire.provider_error(last))
                self._tally()
        elif target:
            found.failed_at = (str(target), exception)

    async def async_post_call_failure_hook(self, request_data: dict[str, Any], original_exception: Exception,
                                           user_api_key_dict: Any, traceback_str: str | None = None) -> None:
        """Proxy hook, once the request failed for good: a lifecycle still waiting ends with that error,
        counted toward its target's cooldown as its failure event would be, and settled at what a
        stream that broke partway had used (the proxy may call this hook before litellm delivers the
        failure event, and with one logging object for all attempts litellm delivers only the first:
        the usage is read from the request's logging object). Counted only when the router started
        the attempt the lifecycle waits on (its deployment hook ran: the request's ``model_group``
        still names the first target after a fallback, as litellm's router copies the metadata for
        each) and the error is the provider's: not when the lifecycle's next attempt was never made
        (the one before, whose failure event came, was the last; what it used was counted then), nor
        for what the proxy raised itself (a guardrail, its rate limit, a client gone). The error is
        the attempt's own, as the deployment failure hook reported it (the router raises its first
        target's after a fallback failed, and the proxy answers with that)."""
        found = self._take_open(self._key(request_data))
        with self._lock:
            self._refusing.pop(self._key(request_data), None)
        if found is None:  # settled as its answer was served (a callback after this one refused the answer):
            with self._lock:  # no success event comes for it
                self._answered.pop(self._key(request_data), None)
        else:
            ours = found.as_sent or found.started  # the router made the attempt the lifecycle waits on: it failed
            error = found.own_error() or original_exception
            self._end(found, error, self._spent(found, _cut(request_data)) if ours else None,
                      failed=ours and wire.provider_error(error))
            self._tally()

    # -- the SDK: the deployment hook, and events of calls no hook planned ----------------------

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        """Hook before each attempt, once litellm picked the deployment. Behind the proxy: the
        attempt's own plan. In the SDK (``litellm.acompletion``): the call's lifecycle, like
        ``Pipeline.acompletion``'s with one attempt (litellm retries on its own): context, reasoning,
        routing among targets of the provider litellm chose, quotas and budgets; ``litellm.aresponses``
        is admitted as sent (:meth:`_start_sdk_as_sent`). Raises
        ``BudgetExceeded``, or ``StoreUnavailable`` under ``on_store_error: closed``; a call it
        cannot plan otherwise goes as sent (logged), never failing where litellm alone would not."""
        endpoint = _as_sent(kwargs, call_type, _SDK_AS_SENT)
        if endpoint is None and not _is_chat(kwargs, call_type):
            return None
        key = self._key(kwargs)
        refused = self._refused(key, _metadata(kwargs).get("model_group"))
        if refused is not None:  # the lifecycle refused the fallback the router is about to call
            raise refused  # (a quota used up, a budget): not sent, as Pipeline.completion would not send it
        with self._lock:
            found = self._calls.get(key)
            if self._ended.get(key):  # a proxy call whose lifecycle has ended
                return None
        if found is not None:  # an attempt of a call in flight (or the chat call litellm makes of a
            return await self._attempting(kwargs, found) if found.proxy else None  # request sent as it came)
        if _nested(kwargs):  # an attempt of litellm's own fallbacks: the outer call's lifecycle follows it
            outer = {"litellm_call_id": kwargs["litellm_logging_obj"].litellm_call_id}  # the id its events carry
            with self._lock:
                found = self._calls.get(self._key(outer))
            return await self._attempting(kwargs, found, outer) if found is not None and found.follows else None
        self.hook_calls += 1
        if endpoint is not None:
            await self._start_sdk_as_sent(kwargs, endpoint)
            return None
        return await self._start_sdk_call(kwargs)

    async def _start_sdk_as_sent(self, kwargs: dict[str, Any], endpoint: str) -> None:
        """``litellm.aresponses``: sent as it came (:meth:`._ProxyHooks._plan_as_sent`, the model it names its
        target), its quotas and budgets admitted first; refused as a chat call is (:meth:`_refuses`).
        For a model without the Responses API litellm makes a chat call of its own under the same
        call id: this lifecycle follows it (the deployment hook finds it in flight). litellm hands
        the hook the call's keyword arguments only: a call given its ``input`` and ``model``
        positionally cannot be planned, and is sent and counted (logged)."""
        if not kwargs.get("model") or "input" not in kwargs:  # the hook's limit, not the request's fault
            _unplanned(endpoint, RequestError("model and input given positionally: litellm hands the hook "
                                              "keyword arguments only"))
            return
        try:
            found = await self._open_as_sent(kwargs, endpoint, str(kwargs["model"]), _sends_refused(kwargs))
        except Exception as exc:  # noqa: BLE001 - the request goes as sent, never worse than without the hook
            self._not_started(kwargs, exc, lambda error: _unplanned(endpoint, error))
            return
        self._keep(kwargs, found)
        self._watch(kwargs, found)

    def _not_started(self, kwargs: Mapping[str, Any], error: Exception, failed: Callable[[Exception], None]) -> None:
        """Starting an SDK call's lifecycle raised ``error``: re-raise a budget's or the store's refusal
        the hook refuses the call with (:meth:`_refuses`), or the request's own fault (a
        ``RequestError`` or ``MessageError``) where a budget or a rate limit would have to admit it (a call
        that cannot be planned cannot be measured against them); else the call is sent as it came,
        logged (a :class:`NoRouteError` as not routed, anything else by ``failed``)."""
        if isinstance(error, BudgetExceeded | StoreUnavailable) or (
                isinstance(error, RequestError | MessageError) and self._guarded(kwargs)):
            if self._refuses(kwargs, error):
                raise error
        elif isinstance(error, NoRouteError):
            _not_routed(error)
        else:
            failed(error)

    def _guarded(self, kwargs: Mapping[str, Any]) -> bool:
        """Would a budget, or a rate limit of the model ``kwargs`` name, have to admit this call?"""
        routing = self.pipeline.config.routing
        return bool(routing.budgets) or str(kwargs.get("model")) in routing.limits

    def _refuses(self, kwargs: Mapping[str, Any], refused: Exception) -> bool:
        """Whether the SDK call ``refused`` was raised for is refused: not when refusing would make
        things worse (:func:`_unrefusable`; then it is sent and counted, logged). A refused call is
        marked ended: litellm's failure event for it is no call of its own."""
        why = _unrefusable(kwargs)
        if why is not None:
            log.warning("budget_not_enforced", error=str(refused)[:200], why=f"{why}: counted, not refused")
            return False
        with self._lock:
            self._mark_ended(self._key(kwargs), False)
        return True

    async def _start_sdk_call(self, kwargs: dict[str, Any]) -> dict[str, Any] | None:
        """The lifecycle of an SDK chat call: one attempt, or with ``fallbacks=`` one per model litellm
        falls back to, in its order (:meth:`_attempting` plans each; one call, one ledger row)."""
        requested = str(kwargs["model"])
        engine = self.pipeline
        provider = engine.catalog.provider(requested)
        routing = engine.config.routing
        follow = _sdk_fallbacks(kwargs)
        if any(f in routing.aliases or f in routing.deployments for f in follow):
            follow = ()  # the lifecycle would route such a name; litellm calls it as it is
        params = {k: v for k, v in kwargs.items() if k in _REQUEST_KEYS or k in _ENDPOINT_KEYS and v}
        deployments = routing.deployments

        refusal = _sends_refused(kwargs)
        pending = self._sdk_open()  # a budget's refusal waits for their events first, said only then

        async def admitted(quiet: bool) -> tuple[Call, CallLifecycle, Flow, Any]:
            call = _labelled(lambda labels: engine.make_call(requested, kwargs["messages"], labels, params),
                             self._labels(kwargs))
            lifecycle = engine.start(call, read=self._read_own, cache=False, fallback=False, follow=follow,
                                     usable=lambda target: target in follow
                                     or engine.catalog.provider(engine.model_of(target)) == provider
                                     and not (target in deployments and deployments[target].own_endpoint),
                                     unusable=f"litellm already chose provider {provider} and its endpoint for "
                                     "this call" if provider is not None else "litellm's SDK calls the name it is "
                                     "given: an alias routes through Pipeline.acompletion or the proxy",
                                     sends_refused=(lambda error: isinstance(error, BudgetExceeded) or refusal(error))
                                     if quiet else refusal)
            flow = lifecycle.run()
            done, attempt = await astep(flow, None, None, wait=False, off_loop=engine.store_blocks)
            assert not done and isinstance(attempt, Attempt)  # without the response cache, a call is attempted
            return call, lifecycle, flow, attempt

        try:
            try:
                call, lifecycle, flow, attempt = await admitted(pending)
            except BudgetExceeded:
                if not pending:
                    raise
                await self._settle_answered()
                call, lifecycle, flow, attempt = await admitted(False)  # the answered calls settled at their spend
        except Exception as exc:  # noqa: BLE001 - the request goes as sent, never worse than without the hook
            self._not_started(kwargs, exc, lambda error: log.warning(
                "litellm_hook_failed", error_type=type(error).__name__, error=str(error)[:200]))
            return None
        found = _Open(lifecycle, flow, attempt, attempt.plan, proxy=False, follows=bool(follow))
        self._keep(kwargs, found)
        self._watch(kwargs, found)
        changed = _switch(kwargs, call.params, attempt.plan)
        target = attempt.plan.model
        if target != requested:
            changed["model"] = provider_named(target, provider)
        return changed

    def _sdk_open(self) -> bool:
        """Is an SDK call of this logger open (in flight, or answered and its event not delivered yet)?"""
        with self._lock:
            return any(not found.proxy for found in self._calls.values())

    @staticmethod
    async def _settle_answered() -> None:
        """Before a budget refuses an SDK call: let litellm deliver the events of the calls it has
        answered (it runs them on its logging worker after the call returned), so their reservations
        settle at what they spent, waiting :data:`_SETTLE_WAIT_S` at most. An agent's next call came
        before its last one's event and was refused against that call's estimate, not its spend."""
        try:
            await asyncio.wait_for(wire.drain_callbacks(), _SETTLE_WAIT_S)
        except TimeoutError:
            pass  # a call still in flight holds its reservation, as it should

    def _watch(self, kwargs: Mapping[str, Any], found: _Open) -> None:
        """End an SDK call litellm lets go of without an event: its logging object, which every event
        of the call needs, is gone (the call was cancelled, a timeout around it, or its stream was
        left unread), so the reservation is given back at once rather than held until it lapses (a
        stream whose first chunk had come is settled at its prompt: :meth:`_orphaned`). The finalizer
        reads the object's ``model_call_details`` through a weak reference to a :class:`_Details` the
        object holds: one the finalizer held would keep the object alive when litellm keeps a
        coroutine that never ran there (a call cancelled before it was sent)."""
        logging_obj, key = kwargs.get("litellm_logging_obj"), self._key(kwargs)
        if logging_obj is None:
            return
        loop = asyncio.get_running_loop()
        details = _Details(getattr(logging_obj, "model_call_details", None))
        held = weakref.ref(details)

        def gone() -> None:  # at collection, on any thread: the loop ends the call
            kept = held()  # freed with the object's own (no longer readable) when a collection found it in a cycle
            ending = functools.partial(self._orphaned, key, found, kept is not None and kept.streamed())
            try:
                loop.call_soon_threadsafe(ending)
            except RuntimeError:  # the loop is closed (a collection after asyncio.run): the logger's thread ends it
                _HANDOFF.put(ending)

        _HANDOFF.ready()

        try:
            weakref.finalize(logging_obj, gone).atexit = False
            logging_obj._router_middleware_details = details
        except (TypeError, AttributeError):  # not weakly referable, or no attributes: the call ends with its events
            pass

    def _orphaned(self, key: str, found: _Open, streamed: bool = False) -> None:
        """End a call litellm let go of. ``streamed``: its stream's first chunk had come, so the
        provider had read the whole prompt: the call is settled at the prompt counted locally, as a
        stream closed early (``usage.source`` ``estimated``). The chunks it streamed are not counted:
        litellm keeps an async stream's on its stream object, which no callback sees (a sync stream's
        reach :meth:`log_stream_event`: :meth:`._SyncStreams._sync_ended` counts them). A call of
        litellm's ``fallbacks=`` let go while a fallback ran, before any chunk of it, ends with
        :class:`.FallbacksEnded`."""
        if self._take_open(key, only=found) is None:
            return  # settled by its events (or evicted) before litellm let it go
        spent = None
        if streamed:
            plan = found.attempt.plan
            spent = self._spent(found, _Answer(wire.Partial.counted(self.pipeline.state.request_tokens(plan), 0),
                                               None, None, None))
        if found.falling_back and not streamed:  # no event comes for a fallback's failure
            error: BaseException = FallbacksEnded(f"litellm let the call go while its fallback "
                                                  f"{_target(found.attempt)} ran: it failed, or the call was cancelled")
        else:
            error = asyncio.CancelledError("litellm let the call go without an event (cancelled, or its stream left "
                                           "unread)")
        self._end(found, error, spent)
        self._tally()

    async def _recorded(self, record: Callable[..., None], *args: Any) -> None:
        """Record a call no lifecycle follows from its event (as the sync path does on litellm's
        thread): with a store that can block, in a worker thread, never holding up the loop."""
        if self.pipeline.store_blocks:
            await asyncio.to_thread(record, *args)
        else:
            record(*args)

    # -- sync streams: litellm lets go of one its caller stopped reading without an event ----------

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        """Before litellm sends a request: a sync chat stream (``litellm.completion(stream=True)``, which
        skips the deployment hook) is watched for litellm letting it go without an event
        (:meth:`._SyncStreams._watch_sync`); not one litellm sends no logger any event of (``no-log``:
        :func:`.wire.unlogged`)."""
        if kwargs.get("stream") is not True or str(kwargs.get("call_type")) != "completion" or _ours(kwargs) \
                or wire.unlogged(kwargs):
            return
        try:
            self._watch_sync(kwargs)
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def log_stream_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """A chunk of a sync stream, as litellm hands each to its loggers while the stream is read
        (:func:`.wire.streamed_output_tokens`): kept with the stream, for the count of a stream left
        partway (:meth:`._SyncStreams._sync_ended`)."""
        if not self._streams:
            return
        with self._lock:
            found = self._streams.get(_watch_key(kwargs) or "")
        if found is not None:
            found.chunks.append(response_obj)

    def _success(self, kwargs: Mapping[str, Any], response_obj: Any, start_time: Any, end_time: Any,
                 within: Context | None = None) -> None:
        """One row and span for a call no lifecycle follows that was answered, timed as litellm timed it
        (``within``: the caller's OpenTelemetry context, for an event that runs outside it)."""
        try:
            answer = _Answer.of(response_obj, kwargs, start_time, end_time)  # a hit of litellm's cache: no attempt
            plan, trace = self._planned(kwargs, wire.time_ns(start_time), within, attempt=answer.source != "cache")
            result = build_outcome(response_obj, plan, self.pipeline.catalog, usage_source=answer.source,
                                   latency_s=answer.latency_s, time_to_first_token_s=answer.ttft_s)
            self.pipeline.books.settle_observed(result)
            trace.succeed(result, response_obj, end_ns=wire.time_ns(end_time))
            self._tally()
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def _failure(self, kwargs: Mapping[str, Any], start_time: Any = None, end_time: Any = None,
                 within: Context | None = None) -> None:
        try:
            plan, trace = self._planned(kwargs, wire.time_ns(start_time), within)
            self._failed(plan, trace, _error(kwargs), end_ns=wire.time_ns(end_time))
        except Exception as exc:  # noqa: BLE001
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if not _ours(kwargs):
            watched = self._stream_ended(kwargs)  # a sync stream's event runs on a thread outside the caller's context
            self._success(kwargs, response_obj, start_time, end_time, watched.within if watched else None)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if _ours(kwargs) or self._served_already(kwargs):
            return
        self._stream_ended(kwargs)  # a sync stream read with ``async for``: litellm's async events end it
        answer = _Answer.of(response_obj, kwargs, start_time, end_time)
        try:
            if wire.client_disconnected(kwargs) and self._left(kwargs, answer):
                return
            if await self._resume(kwargs, answer, None):
                return
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return
        await self._recorded(self._success, kwargs, response_obj, start_time, end_time)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if not _ours(kwargs):
            watched = self._watched(kwargs)  # a sync stream's event runs on a thread outside the caller's context
            if not self._stream_broke(kwargs):
                self._failure(kwargs, start_time, end_time, watched.within if watched else None)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if _ours(kwargs):
            return
        self._stream_ended(kwargs)
        try:
            error = _error(kwargs)
            if await self._resume(kwargs, _cut(kwargs, start_time, end_time), error,
                                  wire.refused_group(error) or _metadata(kwargs).get("model_group")):
                return
        except Exception as exc:  # noqa: BLE001
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return
        await self._recorded(self._failure, kwargs, start_time, end_time)
