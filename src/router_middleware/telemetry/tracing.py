"""The spans of one routed call: an INTERNAL parent carrying the decisions, a CLIENT child per attempt.

Every method swallows its own errors (see :mod:`.safety`): a broken exporter or a bug here never
reaches the user's call.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..errors import ending
from ..types import AttributeValue, Decision, Outcome, Plan
from . import metrics as call_metrics
from .attributes import (
    Semconv,
    agent_attributes,
    decision_attributes,
    metric_attributes,
    outcome_attributes,
    provider_name,
    request_attributes,
)
from .content import content_attributes, response_messages
from .redaction import DEFAULT_REDACTOR, Redactor
from .safety import log, never_raises


@dataclass(frozen=True)
class SideCall:
    """A call the pipeline made on a call's behalf (a context summary): its outcome or error, and when
    (``time.time_ns()``)."""

    model: str
    outcome: Outcome | None
    error: BaseException | None
    start_ns: int
    end_ns: int
    purpose: str = "context_summary"
    server: str | None = None  # its server.address: the request's endpoint host, else its provider's


@dataclass(frozen=True)
class TelemetrySettings:
    enabled: bool = True
    capture_content: bool = False
    openinference: bool = False
    redactor: Redactor = field(default_factory=lambda: DEFAULT_REDACTOR)
    semconv: Semconv = "both"
    endpoints: Mapping[str, str] = field(default_factory=dict)  # a deployment's or served name -> its base URL


_tracer_of: tuple[Any, trace.Tracer] | None = None  # OpenTelemetry's global provider (None: unset), and its tracer
_UNKNOWN = object()  # no global provider to read (an OpenTelemetry without it): the provider is asked each call
_API_GET = trace.get_tracer_provider
_WITHIN: ContextVar[bool] = ContextVar("router_middleware_within_attempt", default=False)


@contextmanager
def within_attempt() -> Iterator[None]:
    """Calls made inside are one attempt of an outer call that records it (the agent middleware's
    model call, made through a ``RoutedChatModel``): they get no spans, metrics or log lines of their
    own, so the outer call's are not counted twice."""
    token = _WITHIN.set(True)
    try:
        yield
    finally:
        _WITHIN.reset(token)


def _tracer() -> trace.Tracer:
    """This package's tracer from the current global provider, looked up once per provider (the
    SDK's ``get_tracer`` returns its cached tracer, but after about 25 us of setup on every call); a
    provider set later gets its own. While OpenTelemetry's ``get_tracer_provider`` is its own (not a
    test's stand-in), the provider is known from OpenTelemetry's global (``None`` until one is set:
    then the API's proxy tracer, which follows a provider set later), and no call reads the
    environment, as ``get_tracer_provider`` does while none is set."""
    global _tracer_of
    found = _tracer_of
    if trace.get_tracer_provider is _API_GET:
        key = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN)
        if found is not None and found[0] is key and key is not _UNKNOWN:
            return found[1]
    provider = trace.get_tracer_provider()
    key = getattr(trace, "_TRACER_PROVIDER", _UNKNOWN) if trace.get_tracer_provider is _API_GET else _UNKNOWN
    key = provider if key is _UNKNOWN else key  # the global unreadable, or a stand-in: the provider it gave
    if found is None or found[0] is not key:
        found = _tracer_of = (key, provider.get_tracer("router_middleware"))
    return found[1]


def _ids(span: Span) -> dict[str, str]:
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class CallTrace:
    """Create with :meth:`start`; finish with :meth:`succeed` or :meth:`fail` (each at most once).

    Each provider attempt gets a CLIENT span and one ``gen_ai.client.operation.duration`` point
    (a failed one with ``error.type``), timed from its own start. An adapter that learns of a call
    after it ran (litellm's events) passes the call's ``start_ns`` and ``end_ns`` (``time.time_ns()``
    clock), which time its spans and metrics instead of the moment the event came."""

    def __init__(self, settings: TelemetrySettings, plan: Plan, provider: str | None,
                 start_ns: int | None = None) -> None:
        self.settings = settings
        self.plan = plan
        self.provider = provider
        self.parent: Span | None = None
        self.child: Span | None = None
        self.started = time.perf_counter()  # the current attempt's start
        self.start_ns = start_ns  # the current attempt's start as the adapter saw it, if given
        self.attempting = False  # an attempt is under way whose duration point is not recorded yet
        self.last_ids: dict[str, str] = {}  # the span ids of the last attempt that ended, for the log line
        self.request_attrs: dict[str, AttributeValue] = {}
        self._said: list[Decision] = []  # the decisions on the route span, as its events
        self.done = False
        self.cache_similarity: float | None = None
        self.nested = _WITHIN.get()  # an outer call records this one (see within_attempt)
        self.reservation: Any = None  # the call's budget reservation, settled when it ends
        self.quota: Any = None  # the attempt's (Taken, quotas), settled when it ends

    @classmethod
    def start(cls, settings: TelemetrySettings, plan: Plan, provider: str | None, tokens_before: int,
              tokens_after: int, *, attempt: bool = True, side_calls: Sequence[SideCall] = (),
              start_ns: int | None = None, within: Context | None = None) -> CallTrace:
        """``attempt=False``: no provider is called (a response-cache hit), so no CLIENT span;
        ``side_calls`` made before it get their CLIENT spans first (the route span starts with them);
        ``start_ns``: when the call began, if before now; ``within``: the caller's OpenTelemetry context,
        where this runs outside it (a thread of litellm's), else the current one."""
        trace_ = cls(settings, plan, provider, start_ns)
        trace_.attempting = attempt
        if settings.enabled and not trace_.nested:
            trace_._open(tokens_before, tokens_after, attempt, side_calls, within)
        return trace_

    @never_raises(default=None)
    def _open(self, tokens_before: int, tokens_after: int, attempt: bool = True,
              side_calls: Sequence[SideCall] = (), within: Context | None = None) -> None:
        tracer = _tracer()
        begun = min((c.start_ns for c in side_calls), default=self.start_ns)
        self.parent = tracer.start_span(f"route {self.plan.call.model}", context=within, kind=SpanKind.INTERNAL,
                                        start_time=begun)
        for call in side_calls:
            self._side_call(call)
        if not self.parent.is_recording():  # no SDK installed, or sampled out: build no attributes
            self.parent = None
            return
        self.parent.set_attributes({**decision_attributes(self.plan, tokens_before, tokens_after),
                                    **self._kind("CHAIN")})
        self._say(self.plan.decisions)
        self.request_attrs = request_attributes(self.plan, self.provider, self.settings.endpoints)
        if attempt:
            self._start_attempt()

    @property
    def wants_answer(self) -> bool:
        """Does :meth:`succeed` read the answer's messages (content capture on a recording span)?"""
        return self.child is not None and self.settings.capture_content

    def _side_call(self, call: SideCall) -> None:
        """A CLIENT span (and metrics) for a call made on this call's behalf, timed as it was."""
        settings = self.settings
        attrs: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat", "gen_ai.request.model": call.model,
                                            "router_middleware.purpose": call.purpose}
        if call.outcome is not None and call.outcome.provider:
            attrs["gen_ai.provider.name"] = provider_name(call.outcome.provider)
        if call.server:
            attrs["server.address"] = call.server
        call_metrics.record(dict(attrs), call.outcome, (call.end_ns - call.start_ns) / 1e9,
                            type(call.error).__qualname__ if call.error else None, self.plan.call.context.app)
        if self.parent is None or not self.parent.is_recording():
            return
        span = _tracer().start_span(f"chat {call.model}", context=trace.set_span_in_context(self.parent),
                                    kind=SpanKind.CLIENT, start_time=call.start_ns,
                                    attributes={**attrs, **agent_attributes(self.plan), **self._kind("LLM")})
        if call.outcome is not None:
            span.set_attributes(outcome_attributes(call.outcome, openinference=settings.openinference,
                                                   semconv=settings.semconv))
        if call.error is not None:
            span.set_attribute("error.type", type(call.error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, settings.redactor(str(call.error))[:500]))
        span.end(end_time=call.end_ns)

    def _start_attempt(self) -> None:
        """A CLIENT span under the route span for one provider attempt of ``self.plan``."""
        assert self.parent is not None
        context = trace.set_span_in_context(self.parent)
        self.child = _tracer().start_span(f"chat {self.plan.model}", context=context, kind=SpanKind.CLIENT,
                                          attributes={**self.request_attrs, **self._kind("LLM")},
                                          start_time=self.start_ns)

    def _kind(self, kind: str) -> dict[str, AttributeValue]:
        """OpenInference's span kind, with ``telemetry.openinference`` (Phoenix shows a span without one
        as UNKNOWN): ``CHAIN`` for the route span, ``LLM`` for each chat span, answered or failed."""
        return {"openinference.span.kind": kind} if self.settings.openinference else {}

    def _next(self) -> None:
        """Another attempt starts now: its span and its duration point are timed from here."""
        self.started, self.start_ns, self.attempting = time.perf_counter(), None, True
        if self.parent is not None and self.child is None:
            self._start_attempt()

    def _point(self, outcome: Outcome | None, error: str | None, end_ns: int | None,
               extra: dict[str, AttributeValue] | None = None) -> None:
        """The duration point (and tokens and cost, if ``outcome``) of the attempt under way."""
        self.attempting = False
        if self.nested or not self.settings.enabled:
            return
        if self.start_ns is not None:  # the adapter's clock: from when the call began to its end (or now)
            duration = ((end_ns if end_ns is not None else time.time_ns()) - self.start_ns) / 1e9
        else:  # ours, less the time since an end given (a failed try's, ended before its retry began)
            duration = time.perf_counter() - self.started - ((time.time_ns() - end_ns) / 1e9 if end_ns else 0.0)
        attrs = self._metric_attrs()
        if extra:
            attrs.update(extra)
        call_metrics.record(attrs, outcome, duration, error, self.plan.call.context.app)

    @never_raises(default=None)
    def attempt_failed(self, error: BaseException, spent: Outcome | None = None, end_ns: int | None = None, *,
                       sent: bool = True) -> None:
        """End the current attempt's span as failed (at ``end_ns``, else now), with what it used before
        it broke off (``spent``) if anything, and record its duration point unless nothing was
        ``sent`` (a target litellm knows no provider for, a deployment without its key: no provider
        operation); the call goes on with another attempt."""
        kind = type(error).__qualname__
        if self.attempting and sent:
            self._point(spent, kind, end_ns)
        self.attempting = False
        if self.child is not None:
            self.child.set_attributes({"error.type": kind, "router_middleware.ended": "failed"})
            self.child.set_status(Status(StatusCode.ERROR, self.settings.redactor(str(error))[:500]))
            self._exception(self.child, error)
            self._used(spent)
            self._sent_content()
            self.last_ids = _ids(self.child)
            self.child.end(end_time=end_ns)
            self.child = None

    def _exception(self, span: Span, error: BaseException) -> None:
        """The conventions' ``exception`` event on a failed span, its message and stack trace redacted
        as the status is (OpenTelemetry's ``record_exception`` would put them as they are)."""
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        span.add_event("exception", {
            "exception.type": name,
            "exception.message": self.settings.redactor(str(error))[:2000],
            "exception.stacktrace": self.settings.redactor("".join(traceback.format_exception(error)))[-8000:]})

    def _sent_content(self) -> None:
        """With content capture, a failed attempt's span carries what it sent (its input and system
        instructions, redacted), as an answered one does: what a failure is debugged from."""
        if self.child is not None and self.settings.capture_content:
            self.child.set_attributes(content_attributes(self.plan.messages, None, self.settings.redactor))

    @never_raises(default=None)
    def again(self) -> None:
        """The attempt is made again, as it was (a retry inside an adapter's model call): a CLIENT span of its own."""
        self._next()

    def _used(self, outcome: Outcome | None) -> None:
        """Put what an attempt that failed had used on its span."""
        if self.child is not None and outcome is not None:
            self.child.set_attributes(outcome_attributes(outcome, openinference=self.settings.openinference,
                                                         semconv=self.settings.semconv))

    def _say(self, decisions: Sequence[Decision]) -> list[Decision]:
        """Put the decisions the route span does not carry yet on it, one event each; returns them. A
        decision a later attempt's plan carries (the call's route, without what its session remembers)
        is the one said already."""
        assert self.parent is not None
        routes = {(d.policy, d.reason) for d in self._said if d.action == "route"}
        new = [d for d in decisions
               if d not in self._said and not (d.action == "route" and (d.policy, d.reason) in routes)]
        for decision in new:
            self.parent.add_event(f"{decision.policy}:{decision.action}",
                                  {"reason": decision.reason, **dict(decision.attributes)})
        self._said += new
        return new

    @never_raises(default=None)
    def next_attempt(self, plan: Plan, provider: str | None, depth: int) -> None:
        """The call goes on with ``plan`` (a fallback, or the same target again): the route span
        carries its new decisions too, and says why it chose the model it now has."""
        self.plan = plan
        self.provider = provider
        if self.parent is not None:
            new = self._say(plan.decisions)
            attrs: dict[str, AttributeValue] = {
                "router_middleware.fallback.depth": depth, "router_middleware.chosen_model": plan.model,
                "router_middleware.decisions": [f"{d.policy}:{d.action}" for d in self._said]}  # type: ignore[dict-item]
            routed = [d for d in new if d.policy == "routing"]
            if routed:
                attrs["router_middleware.route.reason"] = routed[-1].reason
            self.parent.set_attributes(attrs)
            self.request_attrs = request_attributes(plan, provider, self.settings.endpoints)
        self._next()

    @never_raises(default=None)
    def event(self, name: str, attributes: dict[str, AttributeValue]) -> None:
        if self.parent is not None:
            self.parent.add_event(name, attributes)

    @never_raises(default=None)
    def succeed(self, outcome: Outcome, response: Any = None, end_ns: int | None = None) -> None:
        self._end(outcome, response, end_ns=end_ns)

    def end(self, outcome: Outcome, response: Any, error: BaseException | None) -> None:
        """End the call as it ended: :meth:`succeed` without an ``error``, else :meth:`fail` with it."""
        if error is None:
            self.succeed(outcome, response)
        else:
            self.fail(error, outcome, response=response)

    @never_raises(default=None)
    def fail(self, error: BaseException, outcome: Outcome | None = None, end_ns: int | None = None, *,
             response: Any = None) -> None:
        """End the call with ``error`` (at ``end_ns``, else now), having used ``outcome`` if anything (on
        its spans and metrics); one its caller stopped (:func:`~router_middleware.errors.ending`: a
        stream closed or left, a task cancelled) is no error: its spans, metrics and log say what it
        used, with ``router_middleware.ended`` ``stopped`` and what stopped it, and (content capture)
        the part of the answer ``response`` holds (a stream's chunks read so far)."""
        if ending(error) == "stopped":
            self._end(outcome, response, stopped_by=type(error).__qualname__, end_ns=end_ns)
            return
        if self.done:
            return
        self.done = True
        kind = type(error).__qualname__
        message = self.settings.redactor(str(error))[:500]
        for span in (self.child, self.parent):
            if span is None:
                continue
            span.set_attribute("error.type", kind)
            span.set_attribute("router_middleware.ended", "failed")
            span.set_status(Status(StatusCode.ERROR, message))
            self._exception(span, error)
        self._used(outcome)
        self._sent_content()
        if self.parent is not None:
            self._cost(outcome)
        ids = self._log_ids()
        for span in (self.child, self.parent):
            if span is not None:
                span.end(end_time=end_ns)
        if self.attempting:  # the call failed with its attempt (else a refusal: no provider operation)
            self._point(outcome, kind, end_ns)
        if not self.nested:
            log.warning("llm_call_failed", **ids, **self._labels(), model=self.plan.model, error_type=kind,
                        error=message)

    def _end(self, outcome: Outcome | None, response: Any = None, *, stopped_by: str | None = None,
             end_ns: int | None = None) -> None:
        """End the call answered (``outcome``), or stopped by its caller after using ``outcome``, if anything."""
        if self.done:
            return
        self.done = True
        settings = self.settings
        stopped = {"router_middleware.ended": "stopped", "router_middleware.stopped_by": stopped_by} \
            if stopped_by is not None else None
        if self.child is not None:
            if outcome is not None:
                attrs = outcome_attributes(outcome, openinference=settings.openinference, semconv=settings.semconv)
                if settings.capture_content:  # the input, and the answer if there is one
                    output = response_messages(response)
                    if stopped:  # a part: only the finishes its provider sent (litellm's builder says stop)
                        finishes = outcome.finish_reasons
                        for i, message in enumerate(output):
                            message["finish_reason"] = finishes[i] if i < len(finishes) else None
                    attrs.update(content_attributes(self.plan.messages, output, settings.redactor))
                self.child.set_attributes(attrs)
            if stopped:
                self.child.set_attributes(stopped)
        ids = self._log_ids()
        if self.child is not None:
            self.child.end(end_time=end_ns)
        if self.parent is not None:
            if stopped:
                self.parent.set_attributes(stopped)
            if outcome is not None:
                self._answered(outcome)
            self.parent.end(end_time=end_ns)
        if self.attempting and (outcome is None or outcome.usage.source != "cache"):  # a hit is no GenAI operation
            self._point(outcome, None, end_ns, {"router_middleware.ended": "stopped"} if stopped else None)
        if self.nested or (stopped_by is None and not log.enabled("info")):
            return
        fields: dict[str, Any] = {"model": self.plan.model}
        if outcome is not None:
            usage = outcome.usage
            fields = {"provider": outcome.provider, "model": outcome.model, "input_tokens": usage.input_tokens,
                      "output_tokens": usage.output_tokens, "cache_read_tokens": usage.cache_read_tokens,
                      "cache_write_tokens": usage.cache_write_tokens, "reasoning_tokens": usage.reasoning_tokens,
                      "cost_usd": outcome.cost.total_usd, "cost_source": outcome.cost.source}
        decisions = [f"{d.policy}:{d.action}" for d in self.plan.decisions]
        if stopped_by is not None:  # the caller's choice: no warning
            log.info("llm_call_stopped", **ids, **self._labels(), requested_model=self.plan.call.model, **fields,
                     decisions=decisions, stopped_by=stopped_by)
        else:
            log.info("llm_call", **ids, **self._labels(), requested_model=self.plan.call.model, **fields,
                     decisions=decisions)

    def _answered(self, outcome: Outcome) -> None:
        """The route span's attributes of what the call used."""
        assert self.parent is not None
        self.parent.set_attribute("gen_ai.response.model", outcome.model)
        self._cost(outcome)
        if outcome.usage.source == "cache":
            self.parent.set_attribute("router_middleware.cache.hit", True)
            similarity = self.cache_similarity
            if similarity is not None:
                self.parent.set_attribute("router_middleware.cache.similarity", float(similarity))
            self.parent.set_attribute("router_middleware.savings.estimated_usd",
                                      float(self.plan.estimated_savings_usd))

    def _cost(self, outcome: Outcome | None) -> None:
        """The call's cost on its route span, as its ledger row has it: what its attempts used plus its
        summaries (``router_middleware.summary_cost_usd``); unknown for an answer without a price. Not
        ``gen_ai.usage.cost``, which a backend sums over the trace."""
        assert self.parent is not None
        summaries = self.plan.summary_cost_usd
        used = outcome.cost.total_usd if outcome is not None else 0.0
        if used is None or not (outcome is not None or summaries):
            return
        self.parent.set_attribute("router_middleware.cost_usd", float(used + summaries))
        if summaries:
            self.parent.set_attribute("router_middleware.summary_cost_usd", float(summaries))

    def _metric_attrs(self) -> dict[str, AttributeValue]:
        """The attempt's model, provider and server, whether or not its spans record (metrics alone, or
        a trace sampled out, still name them)."""
        return metric_attributes(self.plan, self.provider, self.settings.endpoints)

    def _labels(self) -> dict[str, str]:
        """Whose call it was, for its log line: its app, tenant, user and session, those it names."""
        context = self.plan.call.context
        found = {"app": context.app, "tenant": context.tenant, "user": context.user, "session": context.session_id}
        return {k: v for k, v in found.items() if v is not None}

    def _log_ids(self) -> dict[str, str]:
        """The ids of the attempt's span, else the last attempt's (it failed and ended), else (a cache
        hit, a refusal) the call's."""
        if self.child is not None:
            return _ids(self.child)
        return self.last_ids or (_ids(self.parent) if self.parent is not None else {})
