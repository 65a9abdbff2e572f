"""The watch of sync chat streams (``litellm.completion(stream=True)``), which skip the deployment
hook: one its caller stops reading gets no event from litellm, and one its provider broke after its
chunks began may get its failure event before its last chunks. :class:`_SyncStreams` holds the steps
of :class:`.RouterLogger` that watch them (behind its hooks ``log_pre_api_call`` and
``log_stream_event`` and its failure events) and settle each once: when litellm frees the call (a
finalizer, whose work :data:`.handoff._HANDOFF` runs), :data:`_BROKEN_WAIT_S` after a broken
stream's failure event (a timer), or at the interpreter's exit (an ``atexit`` hook), whichever comes first."""

from __future__ import annotations

import atexit
import functools
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context
from opentelemetry.context import Context

from .. import wire
from ..errors import StreamLeft
from .calls import _Answer, _overflow
from .core import _Core
from .handoff import _HANDOFF, _guarded
from .request import _error, _request_of

# the key of a sync stream's watch in litellm's ``model_call_details`` (:meth:`_SyncStreams._watch_sync`)
_WATCH_KEY = "router_middleware_stream"
# how long a sync stream its provider broke after chunks came waits for litellm to free its call before
# it is settled at the chunks counted by then (:meth:`_SyncStreams._stream_broke`)
_BROKEN_WAIT_S = 5.0


@dataclass
class _Streaming:
    """A sync chat stream in flight: what its request said (``request``, read by
    :meth:`._Core._planned`: its model, messages and labels; ``tools``: their definitions, for
    its prompt's count), the chunks litellm has told of so far (:meth:`RouterLogger.log_stream_event`),
    the finalizer of its watch (detached once it is settled, so the registry of finalizers lets go of
    it), and, once its provider broke it after chunks came, the error and the timer that settles it if
    litellm keeps the call (:meth:`_SyncStreams._stream_broke`)."""

    request: Mapping[str, Any]
    tools: Any = None
    start_ns: int | None = None  # when litellm began the call
    within: Context | None = None  # the caller's OpenTelemetry context (events and finalizers run outside it)
    chunks: list[Any] = field(default_factory=list)
    finalizer: Any = None  # weakref.finalize
    broken: Exception | None = None
    timer: threading.Timer | None = None


class _Watched:
    """What a sync stream's call keeps in litellm's ``model_call_details``, freed with it: its finalizer
    says litellm let the call go (:meth:`_SyncStreams._watch_sync`); ``key``, the watch's own, by
    which the call's events find it (:func:`_watch_key`)."""

    __slots__ = ("key", "__weakref__")

    def __init__(self, key: str) -> None:
        self.key = key


def _watch_key(kwargs: Mapping[str, Any]) -> str | None:
    """The key of the watch of the sync stream whose ``model_call_details`` (or a copy litellm made of
    them for a logger) ``kwargs`` are, if it is watched."""
    watched = kwargs.get(_WATCH_KEY)
    return watched.key if isinstance(watched, _Watched) else None


_PLAIN = (str, int, float, bool, type(None))


def _detached(error: Exception, depth: int = 0) -> Exception:
    """``error`` without what may hold the frames that raised it and, through them, litellm's stream
    and logging object: its traceback, cause and context; an attribute that is an exception (litellm's
    ``original_exception``) detached the same way, and one that is no plain value (a response) ``None``.
    The same class, message and plain attributes (what a row and a span name); a ``RuntimeError``
    naming it, if it cannot be made so."""
    try:
        args = error.args if all(isinstance(a, _PLAIN) for a in error.args) else (str(error),)
        copy = type(error).__new__(type(error), *args)
        copy.__dict__.update({k: _kept(v, depth) for k, v in vars(error).items()})
        str(copy)  # its text may read an attribute left out
    except Exception:  # noqa: BLE001 - an exception type that cannot be made without its __init__
        return RuntimeError(f"{type(error).__qualname__} (its text could not be read)")
    return copy


def _kept(value: Any, depth: int) -> Any:
    """What :func:`_detached` keeps of an exception's attribute."""
    if isinstance(value, _PLAIN):
        return value
    return _detached(value, depth + 1) if isinstance(value, Exception) and depth < 3 else None


def _logger_at_exit(logger: weakref.ref[_SyncStreams]) -> None:
    """The exit hook of a logger that watched a sync stream (a weak reference: a logger that is gone
    has nothing left to settle, its streams' finalizers and timers having held it until they ran)."""
    found = logger()
    if found is not None:
        found._settle_at_exit()


class _SyncStreams(_Core):
    """:class:`.RouterLogger`'s watch of sync chat streams (see the module's docstring)."""

    def _watch_sync(self, details: dict[str, Any]) -> None:
        """Watch a sync chat stream, which litellm lets go of without an event when its caller stops
        reading it (breaks out of it, closes it or drops it). A :class:`_Watched` kept in the call's
        ``model_call_details`` (the dict litellm hands this hook and each event of the call, freed with
        the call's logging object once the stream, and litellm's logging of the chunks it gave out,
        are done with it) ends the call when it is freed (:meth:`_sync_ended`), unless the call's success
        event, or a failure event before any chunk came, came first (:meth:`_stream_ended`,
        :meth:`_stream_broke`). Its finalizer holds what :func:`_request_of`
        keeps of the request, never litellm's dict. The events find the watch by the one in their
        dict, not by the call id, which another request may carry too (a caller's own, a retry's): a
        second request with the same dict (a retry litellm makes with the call's logging object)
        keeps its watch while it is on."""
        optional = details.get("optional_params")
        found = _Streaming(_request_of(details), optional.get("tools") if isinstance(optional, Mapping) else None,
                           wire.time_ns(details.get("start_time")), context.get_current())
        with self._lock:
            if _watch_key(details) in self._streams:
                return
            key = f"{self._key(details)}/{next(self._watches)}"
            self._streams[key] = found
            _overflow(self._streams)  # streams no event or finalizer ended: theirs finds nothing to do
            hook, self._exit_hooked = not self._exit_hooked, True
        if hook:
            atexit.register(_logger_at_exit, weakref.ref(self))
        watched = _Watched(key)
        _HANDOFF.ready()
        found.finalizer = weakref.finalize(watched, _HANDOFF.put, functools.partial(self._sync_ended, key, found))
        found.finalizer.atexit = False
        details[_WATCH_KEY] = watched

    def _watched(self, kwargs: Mapping[str, Any]) -> _Streaming | None:
        """The watch of the sync stream whose event ``kwargs`` are, if it is watched."""
        if not self._streams:
            return None
        with self._lock:
            return self._streams.get(_watch_key(kwargs) or "")

    def _stream_ended(self, kwargs: Mapping[str, Any]) -> _Streaming | None:
        """A call's success or failure event came: a sync stream's watch, if any, has nothing to do
        (returned, for what it kept of the call)."""
        if not self._streams:
            return None
        with self._lock:
            return self._streams.pop(_watch_key(kwargs) or "", None)

    def _stream_broke(self, kwargs: Mapping[str, Any]) -> bool:
        """A sync call's failure event came: is it a watched stream whose provider broke it after its
        chunks began to come (litellm's ``completion_start_time``, set as the first is read, before
        the failure event's thread starts)? Such a failure is settled with those chunks when the
        watch ends (:meth:`_sync_ended`), not now: litellm delivers each chunk to
        :meth:`.RouterLogger.log_stream_event` on its executor, whose task holds the call's logging object, and
        this event on a thread of its own, so chunks may still be on their way; the watch ends once
        litellm frees the call, after the last of them. A caller that keeps the stream, or the
        exception (its traceback holds both), keeps the call: then the stream is settled at the
        chunks counted :data:`_BROKEN_WAIT_S` after this event (a daemon timer), or at the
        interpreter's exit if that comes first (:meth:`_settle_at_exit`). A second failure event of the
        same stream changes nothing. Any other failure ends the watch."""
        if kwargs.get("completion_start_time") is None:
            self._stream_ended(kwargs)
            return False
        key = _watch_key(kwargs) or ""
        with self._lock:
            found = self._streams.get(key)
            if found is None:  # not watched, or settled: once after its provider broke it, this failure again
                return key in self._broken
            if found.broken is not None:  # litellm handed this failure again: the first one's timer runs
                return True
            found.broken = _detached(_error(kwargs))  # its traceback would hold the call
            found.timer = timer = threading.Timer(_BROKEN_WAIT_S, _guarded,
                                                  (functools.partial(self._sync_ended, key, found),))
        timer.name, timer.daemon = "router-middleware-broken-stream", True
        timer.start()
        return True

    def _settle_at_exit(self) -> None:
        """At the interpreter's exit (:func:`_logger_at_exit`, registered at the first watched stream;
        it runs once litellm's executor has delivered every chunk): wait for the work the finalizers
        queued, settle the streams still watched (broken ones whose timer has not fired, and those
        litellm still holds, which a script left unread as it ended: their finalizers would run
        during the interpreter's teardown, or never), wait for the rows a timer or finalizer is
        writing, and write the ledger's rows (its own hook may have run), each wait a few seconds at
        most."""
        _HANDOFF.drain(5.0)
        with self._lock:
            left = list(self._streams.items())
        for key, found in left:
            _guarded(functools.partial(self._sync_ended, key, found))
        with self._lock:
            self._settled.wait_for(lambda: self._settling == 0, timeout=5.0)
        ledger = self.pipeline.ledger
        if ledger is not None and ledger.alive:
            _guarded(functools.partial(ledger.flush, timeout_s=5.0))

    def _sync_ended(self, key: str, found: _Streaming) -> None:
        """End a sync stream's watch, once litellm let go of the call (on :data:`_HANDOFF`'s thread),
        :data:`_BROKEN_WAIT_S` after its provider broke it (:meth:`_stream_broke`'s timer), or, for a
        stream still watched then, at the interpreter's exit (the ``atexit`` hook :meth:`_settle_at_exit`),
        whichever comes first. A stream left without an event, its caller
        having stopped reading it, is one row and span naming :class:`StreamLeft`; one its provider broke,
        naming the provider's error. A stream whose chunks had begun to come was paid for its prompt and
        those chunks: settled at the prompt counted locally and litellm's count of the chunks that came
        (``usage.source`` ``estimated``), which the budgets that apply are charged, as a sync call's
        success is. One whose chunks no logger saw is a row with nothing spent (as on the async path):
        never read, or read with litellm handing its loggers no chunks
        (``litellm.disable_streaming_logging``, or ``async for`` over a sync stream, whose chunks go to the
        async handlers only)."""
        with self._lock:
            if self._streams.get(key) is not found:
                return  # its event came, it was settled already (or it was evicted)
            del self._streams[key]
            if found.broken is not None:  # a failure event of it that comes later writes no second row
                self._broken[key] = None
                _overflow(self._broken)
            self._settling += 1  # the exit hook waits for its row (_settle_at_exit)
        found.finalizer.detach()
        if found.timer is not None:
            found.timer.cancel()
        try:
            self._settle_stream(found)
        finally:
            with self._lock:
                self._settling -= 1
                self._settled.notify_all()

    def _settle_stream(self, found: _Streaming) -> None:
        """One row and span for a sync stream whose watch ended (:meth:`_sync_ended`)."""
        plan, trace = self._planned(found.request, found.start_ns, found.within)
        error = found.broken or StreamLeft("the caller stopped reading the stream and let it go before it ended "
                                           "(litellm sent no event for it)")
        spent = None
        if found.chunks:
            prompt = self.pipeline.state.tokens(plan.model, plan.messages, found.tools, plan.call.context.session_id)
            counted = wire.Partial.counted(prompt, wire.streamed_output_tokens(found.chunks))
            spent = self._read_own(plan, _Answer(counted, None, None, None), 0.0)
        self._failed(plan, trace, error, spent)
