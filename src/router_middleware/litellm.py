"""``RouterLogger``: the pipeline inside litellm's own callbacks (``litellm.callbacks = [RouterLogger()]``).

Behind the LiteLLM proxy (``async_pre_call_hook``) each request drives the pipeline's call
lifecycle (:mod:`.lifecycle`), like ``Pipeline.acompletion`` does, except that the proxy's router
makes the attempts: the hook plans the call (routing to any ``model_name`` of the proxy, context,
reasoning, budgets, quotas) and tells the router the alias's remaining targets as the request's
``fallbacks``; each failure event is thrown into the lifecycle (failure counts, cooldowns, the next
attempt's admission); the success event settles the call (one whose client left mid-stream, as a
stream closed early). A call that fell over is one ledger row and one route span with an attempt
span per target. Anthropic ``/v1/messages`` and OpenAI ``/v1/responses`` requests (Claude Code,
Codex) are sent as they came, through the same lifecycle with the plan the hook makes of them (no
policy rewrites them): quotas and budgets admitted before they are sent, their failures counted
toward their target's cooldown, their events settling them (:meth:`RouterLogger._admit_as_sent`).

In the SDK, litellm lets one hook rewrite a request, ``async_pre_call_deployment_hook``, and calls
it on the async path only (``litellm.acompletion``), after it has chosen the provider. There the
hook drives the same lifecycle with a single attempt (litellm retries on its own): context and
reasoning policies, routing among the targets served by the provider litellm chose (the others are
skipped, the decision saying so), quotas, and budgets, so a call over a budget is refused with
``BudgetExceeded`` before it is sent (unless litellm would retry it without its hooks, or it is a
``litellm.Router``'s, whose router would cool its deployments down: then it is counted, not
refused); the success or failure event settles it. ``litellm.aresponses``, whose call litellm hooks
the same way, is admitted as the proxy admits a ``/v1/responses`` request: sent as it came, its
quotas and budgets first (:meth:`RouterLogger._start_sdk_as_sent`). If planning fails otherwise, the
request goes as sent and a warning is logged. The events record usage, cost, spans, metrics and
ledger rows for every call, sync or async (a sync call, which skips the hook, is counted toward its
budgets after it is made; a sync stream its caller stops reading, which gets no event, once litellm
frees it: :meth:`RouterLogger._watch_sync`; one its provider broke after its chunks began, then too,
or :data:`_BROKEN_WAIT_S` after its failure event, or at the interpreter's exit). The logger counts
what it did (``hook_calls``, ``recorded``) for tests and health checks. Use ``register()`` /
``unregister()`` rather than editing ``litellm.callbacks`` by hand.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import hashlib
import itertools
import json
import queue
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

from litellm.integrations.custom_logger import CustomLogger

from . import wire
from .accounting import build_outcome
from .catalog import close_names
from .context.structure import head_length
from .context.summarize import SIDE_CALL
from .drivers import astep, queued_writes, write_all
from .errors import BudgetExceeded, NoRouteError, RequestError, StoreUnavailable, StreamLeft, UnknownModelError
from .lifecycle import Attempt, CallLifecycle, CutShort, Flow
from .pipeline import Pipeline
from .reasoning import infer_step_kind
from .telemetry import CallTrace, log
from .types import AgentContext, Call, Decision, Message, Outcome, Plan, UsageSource

_REQUEST_KEYS = frozenset({
    "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "response_format", "reasoning_effort", "thinking", "reasoning", "parallel_tool_calls", "seed",
})
_MAX_IN_FLIGHT = 10_000
T = TypeVar("T")


def _overflow(table: OrderedDict[str, T]) -> list[T]:
    """Take the oldest entries past :data:`_MAX_IN_FLIGHT` out of ``table`` (calls whose events never
    came), and return them."""
    out = []
    while len(table) > _MAX_IN_FLIGHT:
        out.append(table.popitem(last=False)[1])
    return out


def _metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``metadata=`` the caller gave litellm (where it keeps it differs by path)."""
    if isinstance(kwargs.get("metadata"), Mapping) and kwargs["metadata"]:
        return kwargs["metadata"]  # type: ignore[no-any-return]
    for source in (kwargs.get("litellm_params"), getattr(kwargs.get("litellm_logging_obj"), "model_call_details",
                                                          None)):
        if isinstance(source, Mapping):
            found = source.get("metadata") or (source.get("litellm_params") or {}).get("metadata")
            if isinstance(found, Mapping):
                return found
    return {}


def _is_chat(kwargs: Mapping[str, Any], call_type: Any) -> bool:
    return "messages" in kwargs and str(getattr(call_type, "value", call_type)) in ("acompletion", "completion") \
        and not _ours(kwargs)


# Endpoints the proxy sends as they came (no routing, context or reasoning policy: those read and
# rewrite chat messages), admitted against quotas and budgets and counted: call type -> the endpoint.
_AS_SENT = {"anthropic_messages": "/v1/messages", "aresponses": "/v1/responses"}
# What the SDK's deployment hook admits as sent (``litellm.aresponses``).
_SDK_AS_SENT = {"aresponses": "/v1/responses"}


def _as_sent(kwargs: Mapping[str, Any], call_type: Any, endpoints: Mapping[str, str] = _AS_SENT) -> str | None:
    """The endpoint of a request sent as it came (behind the proxy :data:`_AS_SENT`, in the SDK
    :data:`_SDK_AS_SENT`), or ``None``."""
    endpoint = endpoints.get(str(getattr(call_type, "value", call_type)))
    return None if endpoint is None or _ours(kwargs) else endpoint


def _unplanned(endpoint: str, error: Exception) -> None:
    """Log a request sent as it came that the hook could not plan: it is sent and counted, not refused."""
    log.warning("budget_not_enforced", error=f"{type(error).__name__}: {str(error)[:200]}",
                why=f"the hook could not plan this {endpoint} request: counted, not refused")


def _not_routed(error: NoRouteError) -> None:
    """Log an SDK call over a quota of its deployment, or whose targets all cool down: litellm has
    chosen the deployment, so it is sent as it came and counted."""
    log.warning("route_not_enforced", error=str(error)[:200],
                why="litellm already chose this call's deployment: sent as it came, counted")


def _ours(kwargs: Mapping[str, Any]) -> bool:
    """A call the pipeline made itself (an attempt, a context summary): accounted in the pipeline's own row."""
    return bool(_metadata(kwargs).get(SIDE_CALL))


def _digest(value: object) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def run_labels(messages: Sequence[Message]) -> dict[str, Any]:
    """What a proxy can tell of an agent run from its conversation, when the client sends no labels:
    ``session_id`` from the opening request (everything before the first assistant turn) and that
    turn (its tool-call ids or text, unique to the run), ``step`` (assistant turns so far) and
    ``step_kind``. A run's first call has no assistant turn yet: its session is the head's alone
    (``head-<h>``), and the run's later calls share ``head-<h>-<a>``."""
    head = head_length(messages)
    session = f"head-{_digest([(m.get('role'), m.get('content')) for m in messages[:head]])}"
    if head < len(messages):
        first = messages[head]
        ids = [c.get("id") for c in first.get("tool_calls") or () if isinstance(c, Mapping)]
        session += f"-{_digest(ids or first.get('content'))}"
    steps = [m.get("role") for m in messages].count("assistant")
    return {"session_id": session, "step": steps, "step_kind": infer_step_kind(messages)}


def _context(kwargs: Mapping[str, Any], *, derive: bool = False) -> dict[str, Any]:
    """The call's labels from its metadata; with ``derive`` (the proxy), what the client did not
    label is derived from the conversation (:func:`run_labels`)."""
    metadata = _metadata(kwargs)
    keys = ("app", "agent_id", "session_id", "step", "step_kind", "user", "tenant")
    context = {k: metadata[k] for k in keys if metadata.get(k) is not None}
    if derive:
        sent = kwargs.get("messages") or []
        messages = sent if set(map(type, sent)) <= {dict} else [m for m in sent if isinstance(m, Mapping)]
        derived = run_labels(messages)
        if "session_id" in context:
            derived.pop("step")  # a client's own session may not start where the messages do
        context = {**derived, **context}
    return context


def _observed(model: str, messages: list[Any], context: dict[str, Any]) -> Call:
    """The call litellm made, with its labels: one the pipeline refuses (litellm's ``metadata`` is
    free-form: ``step="first"``) is left out, logged, rather than the call unrecorded."""
    return _labelled(lambda labels: Call.create(model, messages, {}, labels), context)


def _request_of(details: Mapping[str, Any]) -> dict[str, Any]:
    """What :meth:`RouterLogger._planned` reads of a call's event kwargs (its model as passed, its
    messages, its labels), apart from litellm's dict, which a finalizer must not hold."""
    requested = wire.requested_model(details)
    kept = {"model": details.get("model"), "messages": list(details.get("messages") or []),
            "metadata": dict(_metadata(details))}
    return {**kept, "agentic_loop_params": {"model": requested}} if requested else kept


def _labelled(make: Callable[[dict[str, Any]], Call], context: dict[str, Any]) -> Call:
    """``make(context)``; when the pipeline refuses a label (litellm's ``metadata`` is free-form:
    ``step="first"``), ``make`` of the others, logged: the call is planned and recorded without it,
    never sent unadmitted or left unrecorded. Raises what the call's other input is refused for."""
    try:
        return make(context)
    except RequestError as exc:
        kept = {k: v for k, v in context.items() if _accepted(k, v)}
        if kept == context:
            raise
        log.warning("litellm_labels_refused", error=str(exc)[:200])
        return make(kept)


def _accepted(label: str, value: Any) -> bool:
    """Whether the pipeline takes ``value`` for ``label`` (each label is checked on its own)."""
    try:
        AgentContext.coerce({label: value})
    except RequestError:
        return False
    return True


def _seconds(start: Any, end: Any) -> float | None:
    return (end - start).total_seconds() if isinstance(start, datetime) and isinstance(end, datetime) else None


@dataclass(frozen=True)
class _Answer:
    """A success event: the response (a stream's assembled one), litellm's timings, and for a chat
    stream (``streamed``) the stream's wrapper where one was seen (:meth:`source`)."""

    response: Any
    latency_s: float | None
    ttft_s: float | None
    deployment: str | None
    streamed: bool = False
    stream: Any = None
    cached: bool = False

    @classmethod
    def of(cls, response: Any, kwargs: Mapping[str, Any], start_time: Any, end_time: Any) -> _Answer:
        """``response`` with the timings, the router's deployment, the stream (a sync call's) and the
        cache hit of the event's ``kwargs``."""
        streamed = _chat_stream(kwargs)
        return cls(response, _seconds(start_time, end_time), _ttft(kwargs, start_time),
                   _metadata(kwargs).get("model_group"), streamed, wire.logged_stream(kwargs) if streamed else None,
                   wire.cache_hit(kwargs))

    @property
    def choices(self) -> Any:
        """The response's choices: what the span captures as output when content capture is on."""
        return getattr(self.response, "choices", None)

    @property
    def source(self) -> UsageSource:
        """Whose count the usage is (:func:`.wire.usage_source`): a chat stream's is the provider's only
        when its wrapper kept the provider's usage chunk. A proxy stream's wrapper is the one the proxy
        served (:meth:`RouterLogger.async_post_call_response_headers_hook`), a sync call's the one its
        event logs; an async SDK call's event carries none, so its usage is said ``estimated``. A hit of
        litellm's response cache is ``cache``."""
        return "cache" if self.cached else wire.usage_source(self.response, self.stream, streamed=self.streamed)


@dataclass
class _Open:
    """A call in flight: its lifecycle, paused at the attempt litellm is making, and the plan whose
    request litellm carries (behind the proxy, the first attempt's until a fallback's deployment
    hook). ``proxy``: the proxy's router makes the attempts; else one ``litellm.acompletion`` does,
    or (``as_sent``) the proxy sends a request as it came, its one attempt. ``started``: the router
    was seen starting ``attempt`` (its deployment hook ran for it)."""

    lifecycle: CallLifecycle
    flow: Flow
    attempt: Attempt
    sent: Plan
    proxy: bool = True
    started: bool = False
    as_sent: bool = False
    stream: Any = None  # the chat stream the proxy serves for it, once it has one

    def end(self, error: BaseException, spent: Outcome | None = None, failed: bool = False) -> None:
        """End the call (:meth:`.CallLifecycle.abandon`); an attempt the proxy's router never started
        gives back all it took of its quotas."""
        self.lifecycle.abandon(error, spent, failed, made=self.started or not self.proxy)
        self.flow.close()


_OPAQUE_PARTS = frozenset({"image", "document", "input_image", "input_file", "input_audio"})


def _text(value: Any) -> str:
    """The text of an Anthropic or Responses content value (a string, or a list of parts), for sizing."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return "\n".join(_text(part) for part in value)
    if isinstance(value, Mapping):
        if value.get("type") in _OPAQUE_PARTS:  # its bytes are no tokens: sized as the provider bills it, after
            return f"[{value.get('type')}]"
        found = value.get("text") if isinstance(value.get("text"), str) else value.get("content")
        return _text(found) if found is not None else json.dumps(value, default=str)
    return "" if value is None else str(value)


def as_sent_view(data: Mapping[str, Any], endpoint: str) -> tuple[list[Message], dict[str, Any]]:
    """What an Anthropic ``/v1/messages`` or OpenAI ``/v1/responses`` request sends, as chat messages
    (roles and text) for its token estimate and its span, and its params: its output cap
    (``max_tokens``) and its tools' definitions as they came (counted, never sent from here: the
    request goes as it came)."""
    messages: list[Message] = []
    if endpoint == "/v1/messages":
        if data.get("system"):
            messages.append({"role": "system", "content": _text(data["system"])})
        for item in data.get("messages") or ():
            if isinstance(item, Mapping):
                role = "assistant" if item.get("role") == "assistant" else "user"
                messages.append({"role": role, "content": _text(item.get("content"))})
        cap = data.get("max_tokens")
    else:
        if data.get("instructions"):
            messages.append({"role": "system", "content": _text(data["instructions"])})
        items = data.get("input")
        for item in [items] if isinstance(items, str) else items or ():
            if isinstance(item, str):
                messages.append({"role": "user", "content": item})
            elif isinstance(item, Mapping):
                said = "assistant" if item.get("type") in ("function_call", "reasoning") else "user"
                role = {"assistant": "assistant", "system": "system", "developer": "system"}.get(str(item.get("role")),
                                                                                                  said)
                text = _text(item.get("content")) if "content" in item else json.dumps(item, default=str)
                messages.append({"role": role, "content": text})
        cap = data.get("max_output_tokens")
    params: dict[str, Any] = {"max_tokens": int(cap)} if isinstance(cap, int) and cap > 0 else {}
    tools = data.get("tools")
    if isinstance(tools, Sequence) and not isinstance(tools, str) and tools:
        params["tools"] = [t if isinstance(t, Mapping) else {"definition": str(t)} for t in tools]
    return messages or [{"role": "user", "content": ""}], params


# the key of a sync stream's watch in litellm's ``model_call_details`` (:meth:`RouterLogger._watch_sync`)
_WATCH_KEY = "router_middleware_stream"
# how long a sync stream its provider broke after chunks came waits for litellm to free its call before
# it is settled at the chunks counted by then (:meth:`RouterLogger._stream_broke`)
_BROKEN_WAIT_S = 5.0


@dataclass
class _Streaming:
    """A sync chat stream in flight: what its request said (``request``, read by
    :meth:`RouterLogger._planned`: its model, messages and labels; ``tools``: their definitions, for
    its prompt's count), the chunks litellm has told of so far (:meth:`RouterLogger.log_stream_event`),
    the finalizer of its watch (detached once it is settled, so the registry of finalizers lets go of
    it), and, once its provider broke it after chunks came, the error and the timer that settles it if
    litellm keeps the call (:meth:`RouterLogger._stream_broke`)."""

    request: Mapping[str, Any]
    tools: Any = None
    chunks: list[Any] = field(default_factory=list)
    finalizer: Any = None  # weakref.finalize
    broken: Exception | None = None
    timer: threading.Timer | None = None


class _Watched:
    """What a sync stream's call keeps in litellm's ``model_call_details``, freed with it: its finalizer
    says litellm let the call go (:meth:`RouterLogger._watch_sync`); ``key``, the watch's own, by
    which the call's events find it (:func:`_watch_key`)."""

    __slots__ = ("key", "__weakref__")

    def __init__(self, key: str) -> None:
        self.key = key


def _watch_key(kwargs: Mapping[str, Any]) -> str | None:
    """The key of the watch of the sync stream whose ``model_call_details`` (or a copy litellm made of
    them for a logger) ``kwargs`` are, if it is watched."""
    watched = kwargs.get(_WATCH_KEY)
    return watched.key if isinstance(watched, _Watched) else None


class _Handoff:
    """Work a finalizer hands over, run on a daemon thread of its own. A finalizer runs where the
    object is freed: inside a garbage collection, on any thread, maybe while that thread holds a lock
    the work takes (the logger's, a store's); so it only queues (``SimpleQueue.put`` may be called
    there). The thread is started before anything can be queued (:meth:`ready`)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ready(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="router-middleware-handoff", daemon=True)
                self._thread.start()

    def put(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until the work queued so far is done (at most ``timeout_s``): a mark queued behind it
        is reached."""
        if self._thread is None:
            return  # nothing was ever queued
        reached = threading.Event()
        self._queue.put(reached.set)
        reached.wait(timeout_s)

    def _run(self) -> None:
        while True:
            _guarded(self._queue.get())


def _guarded(work: Callable[[], None]) -> None:
    """Run ``work`` on a thread of the logger's own, logging what it raises."""
    try:
        work()
    except Exception as exc:  # noqa: BLE001 - accounting never fails anything else
        log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])


_HANDOFF = _Handoff()


class _Details:
    """A litellm logging object's ``model_call_details``, kept on the object (see :meth:`RouterLogger._watch`)."""

    __slots__ = ("details", "__weakref__")

    def __init__(self, details: Any) -> None:
        self.details = details

    def streamed(self) -> bool:
        """Whether the call's stream had sent its first chunk (``completion_start_time``, set by
        ``CustomStreamWrapper`` as it reads it, litellm_core_utils/streaming_handler.py, 1.110.2)."""
        return isinstance(self.details, Mapping) and self.details.get("completion_start_time") is not None


class MovedOn(Exception):
    """The proxy's router moved on to another target, so the attempt before failed; behind the proxy
    litellm delivers only a request's first failure event. Retryable (503) like the failure it stands for."""

    status_code = 503


class ClientDisconnected(asyncio.CancelledError):
    """The proxy's client left before its stream ended (litellm's 499): the call was cancelled from the
    client's side, never a failure of its provider. What the chunks streamed so far used is settled
    as a stream closed early (:func:`.wire.client_disconnected`)."""

    status_code = 499


def _target(attempt: Attempt) -> str:
    return attempt.plan.deployment or attempt.plan.model


class RouterLogger(CustomLogger):
    def __init__(self, pipeline: Pipeline | None = None, *, proxy: bool = False) -> None:
        """``proxy=True`` (the LiteLLM proxy): calls the client did not label get a session, step and
        step kind from their conversation (:func:`run_labels`)."""
        super().__init__()
        self.pipeline = pipeline or Pipeline.from_config({})
        self.proxy = proxy
        self._calls: OrderedDict[str, _Open] = OrderedDict()  # calls in flight
        self._streams: OrderedDict[str, _Streaming] = OrderedDict()  # sync chat streams in flight, by watch
        self._watches = itertools.count()  # numbers of the watches, each its own (their call ids may repeat)
        self._exit_hooked = False  # _settle_broken registered with atexit
        self._ended: OrderedDict[str, bool] = OrderedDict()  # calls whose lifecycle has ended (True: the proxy's)
        self._lock = threading.Lock()
        self._settling = 0  # sync streams whose watch ended and whose row is being written (_sync_ended)
        self._settled = threading.Condition(self._lock)  # notified as each of those is written
        self._writing: set[asyncio.Future[None]] = set()  # store writes of calls ended, made in a worker thread
        self.hook_calls = 0
        self.recorded = 0
        self._names: tuple[Any, float, frozenset[str] | None] = (None, 0.0, None)  # router, when read, its names

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
        """Wait until litellm has delivered the events of the calls made so far, their ledger rows
        are written and the reservations of calls ended without an event are given back, and the
        sync streams left unread that litellm has let go of so far are recorded (:meth:`_sync_ended`;
        one litellm still holds, as in a reference cycle the collector has not freed yet, is recorded
        when it is freed, and one its provider broke at the latest :data:`_BROKEN_WAIT_S` after its
        failure event). litellm runs async callbacks on a background worker (an async stream's
        from a task of its own once it ends), which ``asyncio.run`` cancels when its coroutine
        returns: a short script awaits this before it ends."""
        await wire.drain_callbacks()
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
        (:meth:`_admit_as_sent`)."""
        endpoint = _as_sent(data, call_type)
        if endpoint is not None:
            await self._admit_as_sent(data, endpoint)
            return None
        if not _is_chat(data, call_type):
            return None
        self.hook_calls += 1
        engine = self.pipeline
        params = {k: v for k, v in data.items() if k in _REQUEST_KEYS}
        call = engine.make_call(str(data["model"]), data["messages"], _context(data, derive=self.proxy), params)
        served = self._served(data)  # a target the proxy has no model for is skipped, never sent
        if served is not None:
            self._known_model(call.model, served)
        lifecycle = engine.start(call, read=self._read, cache=False,
                                 usable=None if served is None else served.__contains__,
                                 unusable="not a model_name of the proxy's model_list")
        flow = lifecycle.run()
        done, attempt = await astep(flow, None, None, wait=False, off_loop=engine.store_blocks)
        assert not done and isinstance(attempt, Attempt)  # without the response cache, a call is attempted
        self._keep(data, _Open(lifecycle, flow, attempt, attempt.plan))
        changed = _switch(data, call.params, attempt.plan)
        changed["model"] = _target(attempt)
        # the router tries them in the lifecycle's order; one the proxy lacks is skipped there too
        changed["fallbacks"] = [t for t in attempt.remaining if served is None or t in served]
        changed["num_retries"] = engine.config.routing.fallback.attempts_per_model - 1
        return changed

    async def _admit_as_sent(self, data: dict[str, Any], endpoint: str) -> None:
        """A ``/v1/messages`` or ``/v1/responses`` request: sent as it came, to the proxy's
        ``model_name`` it asks for (the routing, context and reasoning policies read and rewrite chat
        messages: they do not apply). Its lifecycle runs with the plan :meth:`_plan_as_sent` makes of
        it, the ``model_name`` as its target: the quotas of that target and the budgets its labels fall
        under are admitted before it is sent (``NoRouteError``, a 503, naming the quota used up;
        ``BudgetExceeded``, a 429: nothing is sent), its failure counts toward the target's cooldown,
        and its events settle it (a ledger row, a span). A routing alias the proxy has no
        ``model_name`` for is refused (``UnknownModelError``, a 400) naming the alias's targets it
        serves. A request it cannot plan is sent and counted, not refused (``budget_not_enforced``)."""
        engine = self.pipeline
        requested = str(data.get("model") or "")
        served = self._served(data)
        if served is not None and requested not in served:
            alias = requested.partition(":")[0]
            targets = engine.config.routing.aliases.get(alias)
            if targets is not None:
                raise UnknownModelError(requested, f"a routing alias of the config, which the proxy routes on "
                                        f"/v1/chat/completions only; {endpoint} requests go as they came, to a "
                                        "model_name of the proxy", tuple(t for t in targets if t in served))
            with self._lock:  # the proxy answers it itself (400, "Invalid model name"): nothing is sent, nor
                self._mark_ended(self._key(data), True)  # recorded from its failure event
            return
        self.hook_calls += 1
        try:
            found = await self._open_as_sent(data, endpoint, requested)
        except (BudgetExceeded, NoRouteError, StoreUnavailable):
            raise  # refused before anything is sent (the proxy answers 429, 503)
        except Exception as exc:  # noqa: BLE001 - the request goes as sent, never worse than without the hook
            _unplanned(endpoint, exc)
            return  # its events record it as a call no hook planned
        self._keep(data, replace(found, as_sent=True))

    async def _open_as_sent(self, data: Mapping[str, Any], endpoint: str, requested: str) -> _Open:
        """The lifecycle of a request sent as it came (:meth:`_plan_as_sent`), its one attempt
        admitted: raises ``BudgetExceeded``, ``NoRouteError`` (a quota used up) or ``StoreUnavailable``
        when it is refused, before anything is sent."""
        engine = self.pipeline
        plan = self._plan_as_sent(data, endpoint, requested)
        lifecycle = engine.start(plan.call, plan=plan, read=self._read_own, cache=False, fallback=False)
        flow = lifecycle.run()
        done, attempt = await astep(flow, None, None, wait=False, off_loop=engine.store_blocks)
        assert not done and isinstance(attempt, Attempt)  # without the response cache, a call is attempted
        return _Open(lifecycle, flow, attempt, attempt.plan, proxy=False)

    def _plan_as_sent(self, data: Mapping[str, Any], endpoint: str, requested: str) -> Plan:
        """The plan of a request sent as it came: its target the model it asks for (behind the proxy,
        its ``model_name``, whose quotas and cooldown it counts toward, as a chat call routed there
        does), priced as the model that name stands for; its conversation as chat messages and its
        tools' definitions, for its estimate and its span; its labels; a decision saying it was not routed."""
        engine = self.pipeline
        messages, params = as_sent_view(data, endpoint)
        in_config = requested in engine.config.routing.deployments
        model = engine.model_of(requested) if in_config else _proxy_model(requested) or requested
        labels = {"app": engine.config.app, **_context({**data, "messages": messages}, derive=self.proxy)}
        call = _labelled(lambda context: Call.create(requested, messages, params, context), labels)
        plan = Plan.from_call(call).override(model=model, deployment=requested)
        reason = (f"{endpoint}: sent as it came to {requested!r} (routing, context and reasoning policies apply "
                  "to chat completions only); admitted against its quotas and the budgets")
        return plan.decide(Decision("routing", "as-sent", reason, {"endpoint": endpoint}))

    def _known_model(self, model: str, served: frozenset[str]) -> None:
        """Refuse a model that is no name the proxy serves and no route of the config: the client's typo
        is a 400 (``UnknownModelError``, with the closest names), as the bare proxy's "Invalid model
        name", not a ``NoRouteError`` 503 that OpenAI-style clients retry."""
        routes = self.pipeline.config.routing.route_names()
        alias = model.partition(":")[0]
        if model in served or alias in routes:
            return
        raise UnknownModelError(model, "no model_name of the proxy's model_list, and no alias or deployment of the "
                                "router config", close_names(alias, (*routes, *sorted(served)), models=False))

    def _served(self, data: Mapping[str, Any]) -> frozenset[str] | None:
        """The names the proxy sends ``data`` to (:meth:`_proxy_names`), or ``None`` for any: the
        client brings its own credentials or config, or the proxy serves names beyond its list."""
        names = self._proxy_names()
        return None if any(k in data for k in ("api_key", "api_base", "user_config")) else names

    def _proxy_names(self) -> frozenset[str] | None:
        """The proxy's model names (:func:`.wire.proxy_model_names`), read again at most once a second;
        when they change, the config's targets they lack are logged (:meth:`_unserved`) and the engine
        is told the model each stands for (:meth:`.Engine.serve`)."""
        current = wire.proxy_router()
        if current is None:
            return None
        router, read, names = self._names
        now = time.monotonic()
        if current is not router or now - read >= 1.0:
            fresh = wire.proxy_model_names(current)
            if fresh is not None and fresh != names:
                self._unserved(fresh)
                self.pipeline.serve({name: model for name in fresh if (model := _proxy_model(name)) is not None})
            names = fresh
            self._names = (current, now, names)
        return names

    def _unserved(self, served: frozenset[str]) -> None:
        """Log each routing target of the config the proxy has no model for (calls skip it), with
        the closest model names it has: once per model list."""
        routing = self.pipeline.config.routing
        for where, targets in (*((f"routing.aliases.{a}", t) for a, t in routing.aliases.items()),
                               ("routing.deployments", list(routing.deployments))):
            for target in targets:
                if target not in served:
                    log.warning("proxy_model_unknown", where=where, target=target,
                                did_you_mean=list(close_names(target, tuple(sorted(served)), models=False)),
                                why="not a model_name of the proxy's model_list: calls skip it")

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

    async def async_post_call_failure_hook(self, request_data: dict[str, Any], original_exception: Exception,
                                           user_api_key_dict: Any, traceback_str: str | None = None) -> None:
        """Proxy hook, once the request failed for good: a lifecycle still waiting ends with that error,
        counted toward its target's cooldown as its failure event would be, and settled at what a
        stream that broke partway had used (the proxy may call this hook before litellm delivers the
        failure event, and with one logging object for all attempts litellm delivers only the first:
        the usage is read from the request's logging object). Counted only when the router's last
        attempt (the request's ``model_group``) was at this target, the router started it (its
        deployment hook ran), and the error is the provider's: not when the lifecycle's next attempt
        was never made (the one before, whose failure event came, was the last; what it used was
        counted then), nor for what the proxy raised itself (a guardrail, its rate limit, a client gone)."""
        found = self._take_open(self._key(request_data))
        if found is not None:
            about = _metadata(request_data).get("model_group")  # a request sent as it came has one attempt
            ours = found.as_sent or (found.started and about == _target(found.attempt))  # else the one before
            self._end(found, original_exception, self._spent(found, _cut(request_data)) if ours else None,
                      failed=ours and wire.provider_error(original_exception))
            self._tally()

    def _left(self, kwargs: Mapping[str, Any], answer: _Answer) -> bool:
        """End a proxy call whose client left mid-stream (litellm delivers the chunks streamed so far
        as a success): settled as a stream closed early, at litellm's count of those chunks (``usage.source``
        ``estimated``), its row and span saying :class:`ClientDisconnected`. False when no lifecycle waits."""
        found = self._take_open(self._key(kwargs))
        if found is None:
            return False
        counted = replace(answer, response=wire.Partial(getattr(answer.response, "usage", None)))
        self._end(found, ClientDisconnected("the client disconnected before the stream ended (litellm: 499)"),
                  self._spent(found, counted))
        self._tally()
        return True

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
            stale = current is not None and current.proxy and bool(about) and _target(current.attempt) != about
            if error is not None and (key in self._ended or stale):
                return True  # a failure the lifecycle has already moved past
        found = self._take_open(key)
        if found is None:
            return False
        if reply is not None and reply.stream is None and found.stream is not None:
            reply = replace(reply, stream=found.stream)
        if error is not None:
            spent = self._spent(found, reply)
            error = error if spent is None else CutShort(error, spent)
        try:
            done, value = await astep(found.flow, reply, error, wait=False, off_loop=self.pipeline.store_blocks)
        except Exception as exc:  # noqa: BLE001 - the lifecycle gave up (and recorded why), or reading failed
            found.lifecycle.abandon(exc)  # does nothing once the lifecycle recorded the call
            done, value = True, None
        except BaseException as exc:  # cancelled: end the call, release what it holds
            found.end(exc)
            raise
        if done:
            self._tally()
            return True
        found.attempt, found.started = value, False  # the router's next attempt (the lifecycle admitted it)
        self._keep(kwargs, found)
        return True

    def _spent(self, found: _Open, cut: _Answer | None) -> Outcome | None:
        """What the attempt ``found`` waits for had used before it broke off (``cut``: :func:`_cut`),
        or ``None`` (also when it cannot be read: the failure is then recorded without it)."""
        if cut is None:
            return None
        try:
            return self._read(found.attempt.plan, cut, 0.0, routed=found.proxy)
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return None

    async def _attempting(self, kwargs: dict[str, Any], found: _Open) -> dict[str, Any] | None:
        """The deployment hook of a proxy call's attempt: when the router moved on without a failure
        event, the attempt before failed; a fallback's request gets its own plan (messages, params)."""
        deployment = _metadata(kwargs).get("model_group")
        if deployment and _target(found.attempt) != deployment:
            await self._resume(kwargs, None, MovedOn(f"the router moved on to {deployment}"))
            with self._lock:
                current = self._calls.get(self._key(kwargs))
            if current is None:
                return None
            found = current
        if deployment and _target(found.attempt) != deployment:
            return None
        found.started = True
        if found.attempt.plan is found.sent:
            return None
        changed = _switch(kwargs, found.sent.params, found.attempt.plan)
        found.sent = found.attempt.plan
        return changed

    def _read(self, plan: Plan, answer: _Answer, started: float, *, routed: bool = True) -> Outcome:
        """The outcome of the answer, priced as the deployment the proxy's router says answered
        (``routed``; in the SDK the call's own model answered)."""
        moved = routed and answer.deployment and answer.deployment != (plan.deployment or plan.model)
        return build_outcome(answer.response, plan, self.pipeline.catalog,
                             usage_source=answer.source, latency_s=answer.latency_s,
                             time_to_first_token_s=answer.ttft_s,
                             answered_model=self.pipeline.model_of(str(answer.deployment)) if moved else None)

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
        with self._lock:
            key = self._key(kwargs)
            found = self._calls.get(key)
            if self._ended.get(key):  # a proxy call whose lifecycle has ended
                return None
        if found is not None:  # an attempt of a call in flight (or the chat call litellm makes of a
            return await self._attempting(kwargs, found) if found.proxy else None  # request sent as it came)
        if _nested(kwargs):  # an attempt of litellm's own fallbacks: the outer call's lifecycle follows it
            return None
        self.hook_calls += 1
        if endpoint is not None:
            await self._start_sdk_as_sent(kwargs, endpoint)
            return None
        return await self._start_sdk_call(kwargs)

    async def _start_sdk_as_sent(self, kwargs: dict[str, Any], endpoint: str) -> None:
        """``litellm.aresponses``: sent as it came (:meth:`_plan_as_sent`, the model it names its
        target), its quotas and budgets admitted first; refused as a chat call is (:meth:`_refuses`).
        For a model without the Responses API litellm makes a chat call of its own under the same
        call id: this lifecycle follows it (the deployment hook finds it in flight). litellm hands
        the hook the call's keyword arguments only: a call given its ``input`` and ``model``
        positionally cannot be planned, and is sent and counted (logged)."""
        try:
            if not kwargs.get("model") or "input" not in kwargs:
                raise RequestError("model and input given positionally: litellm hands the hook keyword "
                                   "arguments only")
            found = await self._open_as_sent(kwargs, endpoint, str(kwargs["model"]))
        except Exception as exc:  # noqa: BLE001 - the request goes as sent, never worse than without the hook
            self._not_started(kwargs, exc, lambda error: _unplanned(endpoint, error))
            return
        self._keep(kwargs, found)
        self._watch(kwargs, found)

    def _not_started(self, kwargs: Mapping[str, Any], error: Exception, failed: Callable[[Exception], None]) -> None:
        """Starting an SDK call's lifecycle raised ``error``: re-raise a budget's or the store's refusal
        the hook refuses the call with (:meth:`_refuses`); else the call is sent as it came, logged (a
        :class:`NoRouteError` as not routed, anything else by ``failed``)."""
        if isinstance(error, BudgetExceeded | StoreUnavailable):
            if self._refuses(kwargs, error):
                raise error
        elif isinstance(error, NoRouteError):
            _not_routed(error)
        else:
            failed(error)

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
        requested = str(kwargs["model"])
        engine = self.pipeline
        provider = engine.catalog.provider(requested)
        try:
            params = {k: v for k, v in kwargs.items() if k in _REQUEST_KEYS}
            call = _labelled(lambda labels: engine.make_call(requested, kwargs["messages"], labels, params),
                             _context(kwargs))
            lifecycle = engine.start(call, read=self._read_own, cache=False, fallback=False,
                                     usable=lambda target: engine.catalog.provider(engine.model_of(target)) == provider,
                                     unusable=f"litellm already chose provider {provider} for this call")
            flow = lifecycle.run()
            done, attempt = await astep(flow, None, None, wait=False, off_loop=engine.store_blocks)
        except Exception as exc:  # noqa: BLE001 - the request goes as sent, never worse than without the hook
            self._not_started(kwargs, exc, lambda error: log.warning(
                "litellm_hook_failed", error_type=type(error).__name__, error=str(error)[:200]))
            return None
        assert not done and isinstance(attempt, Attempt)  # without the response cache, a call is attempted
        found = _Open(lifecycle, flow, attempt, attempt.plan, proxy=False)
        self._keep(kwargs, found)
        self._watch(kwargs, found)
        changed = _switch(kwargs, call.params, attempt.plan)
        target = attempt.plan.model
        if target != requested:
            changed["model"] = target.split("/", 1)[1] if target.startswith(f"{provider}/") else target
        return changed

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
            try:
                loop.call_soon_threadsafe(self._orphaned, key, found, kept is not None and kept.streamed())
            except RuntimeError:  # the loop is closed: nothing runs there any more
                pass

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
        reach :meth:`log_stream_event`: :meth:`_sync_ended` counts them)."""
        if self._take_open(key, only=found) is None:
            return  # settled by its events (or evicted) before litellm let it go
        spent = None
        if streamed:
            plan = found.attempt.plan
            prompt = self.pipeline.state.tokens(plan.model, plan.messages, plan.params.get("tools"),
                                                plan.call.context.session_id)
            usage = {"prompt_tokens": prompt, "completion_tokens": 0, "total_tokens": prompt}
            spent = self._spent(found, _Answer(wire.Partial(usage), None, None, None))
        self._end(found, asyncio.CancelledError("litellm let the call go without an event (cancelled, or its "
                                                "stream left unread)"), spent)
        self._tally()

    def _end(self, found: _Open, error: BaseException, spent: Outcome | None = None, *, failed: bool = False) -> None:
        """End a call waiting for an event, on the event loop (settled at ``spent``, if given; ``failed``:
        ``error`` is its attempt's failure, :meth:`.CallLifecycle.abandon`): with a store that can block,
        the writes this makes (its reservation given back) go to a worker thread, never holding up the
        loop (made on the spot once no worker thread takes them: ``asyncio.run`` shutting its executor down)."""
        if not self.pipeline.store_blocks:
            found.end(error, spent, failed)
            return
        _, writes = queued_writes(found.end, error, spent, failed)
        if not writes:
            return
        try:
            pending = asyncio.get_running_loop().run_in_executor(None, write_all, writes)
        except RuntimeError:  # the loop's default executor is shut down (asyncio.run is ending): made here
            write_all(writes)
            return
        self._writing.add(pending)  # aflush waits for it; asyncio.run's end waits for the thread
        pending.add_done_callback(self._writing.discard)

    async def _recorded(self, record: Callable[..., None], *args: Any) -> None:
        """Record a call no lifecycle follows from its event (as the sync path does on litellm's
        thread): with a store that can block, in a worker thread, never holding up the loop."""
        if self.pipeline.store_blocks:
            await asyncio.to_thread(record, *args)
        else:
            record(*args)

    def _read_own(self, plan: Plan, answer: _Answer, started: float) -> Outcome:
        return self._read(plan, answer, started, routed=False)

    def _planned(self, kwargs: Mapping[str, Any]) -> tuple[Plan, CallTrace]:
        """A new plan and trace for a call no lifecycle follows (sync calls, which skip the hook), of
        the model the caller passed, as the hook records it (litellm's own ``model`` is stripped).
        ``kwargs``: an event's, or what :func:`_request_of` kept of them."""
        model = wire.requested_model(kwargs) or str(kwargs.get("model") or "unknown")
        context = {"app": self.pipeline.config.app, **_context(kwargs)}
        call = _observed(model, list(kwargs.get("messages") or []), context)
        plan = Plan.from_call(call)
        return plan, CallTrace.start(self.pipeline.telemetry, plan, self.pipeline.catalog.provider(model), 0, 0)

    # -- sync streams: litellm lets go of one its caller stopped reading without an event ----------

    def log_pre_api_call(self, model: Any, messages: Any, kwargs: Any) -> None:
        """Before litellm sends a request: a sync chat stream (``litellm.completion(stream=True)``, which
        skips the deployment hook) is watched for litellm letting it go without an event (:meth:`_watch_sync`);
        not one litellm sends no logger any event of (``no-log``: :func:`.wire.unlogged`)."""
        if kwargs.get("stream") is not True or str(kwargs.get("call_type")) != "completion" or _ours(kwargs) \
                or wire.unlogged(kwargs):
            return
        try:
            self._watch_sync(kwargs)
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

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
        found = _Streaming(_request_of(details), optional.get("tools") if isinstance(optional, Mapping) else None)
        with self._lock:
            if _watch_key(details) in self._streams:
                return
            key = f"{self._key(details)}/{next(self._watches)}"
            self._streams[key] = found
            _overflow(self._streams)  # streams no event or finalizer ended: theirs finds nothing to do
        watched = _Watched(key)
        _HANDOFF.ready()
        found.finalizer = weakref.finalize(watched, _HANDOFF.put, functools.partial(self._sync_ended, key, found))
        found.finalizer.atexit = False
        details[_WATCH_KEY] = watched

    def log_stream_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        """A chunk of a sync stream, as litellm hands each to its loggers while the stream is read
        (:func:`.wire.streamed_output_tokens`): kept with the stream, for the count of a stream left
        partway (:meth:`_sync_ended`)."""
        if not self._streams:
            return
        with self._lock:
            found = self._streams.get(_watch_key(kwargs) or "")
        if found is not None:
            found.chunks.append(response_obj)

    def _stream_ended(self, kwargs: Mapping[str, Any]) -> None:
        """A call's success or failure event came: a sync stream's watch, if any, has nothing to do."""
        if self._streams:
            with self._lock:
                self._streams.pop(_watch_key(kwargs) or "", None)

    def _stream_broke(self, kwargs: Mapping[str, Any]) -> bool:
        """A sync call's failure event came: is it a watched stream whose provider broke it after its
        chunks began to come (litellm's ``completion_start_time``, set as the first is read, before
        the failure event's thread starts)? Such a failure is settled with those chunks when the
        watch ends (:meth:`_sync_ended`), not now: litellm delivers each chunk to
        :meth:`log_stream_event` on its executor, whose task holds the call's logging object, and
        this event on a thread of its own, so chunks may still be on their way; the watch ends once
        litellm frees the call, after the last of them. A caller that keeps the stream, or the
        exception (its traceback holds both), keeps the call: then the stream is settled at the
        chunks counted :data:`_BROKEN_WAIT_S` after this event (a daemon timer), or at the
        interpreter's exit if that comes first (:meth:`_settle_broken`). Any other failure ends the
        watch."""
        if kwargs.get("completion_start_time") is None:
            self._stream_ended(kwargs)
            return False
        key = _watch_key(kwargs) or ""
        with self._lock:
            found = self._streams.get(key)
            if found is None:
                return False
            found.broken = _detached(_error(kwargs))  # its traceback would hold the call
            found.timer = timer = threading.Timer(_BROKEN_WAIT_S, _guarded,
                                                  (functools.partial(self._sync_ended, key, found),))
            hook, self._exit_hooked = not self._exit_hooked, True
        if hook:
            atexit.register(self._settle_broken)
        timer.name, timer.daemon = "router-middleware-broken-stream", True
        timer.start()
        return True

    def _settle_broken(self) -> None:
        """At the interpreter's exit (an ``atexit`` hook, registered at the first broken stream, which
        keeps the logger until the exit; it runs once litellm's executor has delivered every chunk):
        wait for the work the finalizers queued, settle the broken streams whose timer has not fired,
        wait for the rows a timer or finalizer is writing, and write the ledger's rows (its own hook
        may have run), each wait a few seconds at most."""
        _HANDOFF.drain(5.0)
        with self._lock:
            broken = [(key, found) for key, found in self._streams.items() if found.broken is not None]
        for key, found in broken:
            _guarded(functools.partial(self._sync_ended, key, found))
        with self._lock:
            self._settled.wait_for(lambda: self._settling == 0, timeout=5.0)
        ledger = self.pipeline.ledger
        if ledger is not None and ledger.alive:
            _guarded(functools.partial(ledger.flush, timeout_s=5.0))

    def _sync_ended(self, key: str, found: _Streaming) -> None:
        """End a sync stream's watch, once litellm let go of the call (on :data:`_HANDOFF`'s thread) or
        :data:`_BROKEN_WAIT_S` after its provider broke it (:meth:`_stream_broke`), whichever comes
        first. A stream left without an event, its caller having stopped reading it, is one row and
        span naming :class:`StreamLeft`; one its provider broke, naming the provider's error. A
        stream whose chunks had begun to come was paid for its prompt and those chunks: settled at the
        prompt counted locally and litellm's count of the chunks that came (``usage.source``
        ``estimated``), which the budgets that apply are charged, as a sync call's success is. One
        whose chunks no logger saw is a row with nothing spent (as on the async path): never read, or
        read with litellm handing its loggers no chunks (``litellm.disable_streaming_logging``, or
        ``async for`` over a sync stream, whose chunks go to the async handlers only)."""
        with self._lock:
            if self._streams.get(key) is not found:
                return  # its event came, it was settled already (or it was evicted)
            del self._streams[key]
            self._settling += 1  # the exit hook waits for its row (_settle_broken)
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
        plan, trace = self._planned(found.request)
        error = found.broken or StreamLeft("the caller stopped reading the stream and let it go before it ended "
                                           "(litellm sent no event for it)")
        if not found.chunks:
            trace.fail(error)
            self.pipeline.books.record_failure(plan, error)
        else:
            prompt = self.pipeline.state.tokens(plan.model, plan.messages, found.tools, plan.call.context.session_id)
            output = wire.streamed_output_tokens(found.chunks)
            usage = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}
            spent = self._read_own(plan, _Answer(wire.Partial(usage), None, None, None), 0.0)
            trace.fail(error, self.pipeline.books.settle_observed(spent, complete=False, error=error))
        self._tally()

    def _success(self, kwargs: Mapping[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        try:
            plan, trace = self._planned(kwargs)
            answer = _Answer.of(response_obj, kwargs, start_time, end_time)
            result = build_outcome(response_obj, plan, self.pipeline.catalog, usage_source=answer.source,
                                   latency_s=answer.latency_s, time_to_first_token_s=answer.ttft_s)
            self.pipeline.books.settle_observed(result)
            trace.succeed(result, response_obj)
            self._tally()
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def _failure(self, kwargs: Mapping[str, Any]) -> None:
        try:
            plan, trace = self._planned(kwargs)
            error = _error(kwargs)
            trace.fail(error)
            self.pipeline.books.record_failure(plan, error)
            self._tally()
        except Exception as exc:  # noqa: BLE001
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

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

    def _tally(self) -> None:
        """One more call recorded (its events run on the loop and on worker threads at once)."""
        with self._lock:
            self.recorded += 1

    def _mark_ended(self, key: str, proxy: bool) -> None:
        self._ended[key] = proxy
        _overflow(self._ended)

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if not _ours(kwargs):
            self._stream_ended(kwargs)
            self._success(kwargs, response_obj, start_time, end_time)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if _ours(kwargs):
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
        if not _ours(kwargs) and not self._stream_broke(kwargs):
            self._failure(kwargs)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        if _ours(kwargs):
            return
        self._stream_ended(kwargs)
        try:
            if await self._resume(kwargs, _cut(kwargs, start_time, end_time), _error(kwargs),
                                  _metadata(kwargs).get("model_group")):
                return
        except Exception as exc:  # noqa: BLE001
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return
        await self._recorded(self._failure, kwargs)


def _proxy_model(name: str) -> str | None:
    """The model the proxy's first deployment under ``model_name`` ``name`` is priced and judged as:
    its ``model_info.base_model`` (what litellm prices an Azure deployment by), else its litellm
    model; ``None`` when the proxy has no such deployment."""
    router = wire.proxy_router()
    try:
        found = router.registry().deployments(name) if router is not None else None
        params = found[0].get("litellm_params") if found else None
        info = found[0].get("model_info") if found else None
        model = (info.get("base_model") if isinstance(info, Mapping) else None) or \
            (params.get("model") if isinstance(params, Mapping) else None)
    except Exception:  # noqa: BLE001 - another litellm's router: priced as the name
        return None
    return str(model) if model else None


def _nested(kwargs: Mapping[str, Any]) -> bool:
    """An SDK call made inside another one whose logging object it shares (``litellm.acompletion``'s
    ``fallbacks=``: one nested ``acompletion`` per model, each with a call id of its own): its events
    carry the outer call's id, so a lifecycle opened under its own id would never be settled."""
    logged = getattr(kwargs.get("litellm_logging_obj"), "litellm_call_id", None)
    own = kwargs.get("litellm_call_id")
    return bool(logged) and bool(own) and own != logged


def _unrefusable(kwargs: Mapping[str, Any]) -> str | None:
    """Why refusing this SDK call in the deployment hook would make things worse, if it would: a
    ``litellm.Router``'s call (``model_group`` in its metadata), whose router takes the refusal (a
    429) for the deployment's and cools it down for every caller; a call litellm retries itself
    (``num_retries``, ``retry_policy``), whose retries call the provider without hooks or events,
    so the refused call would be sent anyway, unseen."""
    if "model_group" in _metadata(kwargs):
        return ("litellm's Router would cool its deployments down for every caller (put the budget on the "
                "Router's side, or behind the proxy use its pre-call hook)")
    setting = wire.retries_unhooked(kwargs)
    if setting is not None:
        return f"litellm retries this call without its hooks ({setting}; without retries it is refused)"
    return None


def _switch(kwargs: Mapping[str, Any], sent: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """``kwargs`` with ``plan``'s messages, and the parameters it sets where they differ from ``sent``
    (what the request carries now), dropping those it does not keep."""
    changed = dict(kwargs)
    changed["messages"] = [dict(m) for m in plan.messages]
    for key in set(sent) | set(plan.params):
        if key not in plan.params:
            changed.pop(key, None)
        elif sent.get(key) != plan.params[key]:
            changed[key] = plan.params[key]
    return changed


def _error(kwargs: Mapping[str, Any]) -> Exception:
    found = kwargs.get("exception")
    return found if isinstance(found, Exception) else RuntimeError(str(kwargs.get("traceback_exception") or "failed"))


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


def _cut(kwargs: Mapping[str, Any], start_time: Any = None, end_time: Any = None) -> _Answer | None:
    """What a failed attempt had produced before it broke off (:func:`.wire.partial`, from a failure
    event's kwargs or a proxy request's data), as an answer; ``None`` where litellm recorded nothing."""
    spent = wire.partial(kwargs)
    return None if spent is None else _Answer.of(spent, kwargs, start_time, end_time)


def _chat_stream(kwargs: Mapping[str, Any]) -> bool:
    """Is the event's call a streamed chat completion (whose response litellm assembled)?"""
    return kwargs.get("stream") is True and str(kwargs.get("call_type")) in ("acompletion", "completion")


def _ttft(kwargs: Mapping[str, Any], start_time: Any) -> float | None:
    """Time to first token of a stream (litellm's ``completion_start_time``); None otherwise."""
    if not kwargs.get("stream"):
        return None
    return _seconds(start_time, kwargs.get("completion_start_time"))


__all__ = ["ClientDisconnected", "MovedOn", "RouterLogger", "StreamLeft", "run_labels"]
