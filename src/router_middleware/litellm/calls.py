"""A call in flight and what its events say, for :class:`.RouterLogger`: a success event's answer
(:class:`_Answer`), a call whose lifecycle waits for its events (:class:`_Open`), the errors the
logger ends a proxy call with (:class:`MovedOn`, :class:`ClientDisconnected`), and the bound on its
tables of calls in flight (:func:`_overflow`)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import wire
from ..lifecycle import Attempt, CallLifecycle, Flow, MovedPast
from ..routing.fallback import retryable
from ..types import Outcome, Plan, UsageSource
from .request import _chat_stream, _metadata, _seconds, _ttft

_MAX_IN_FLIGHT = 10_000
T = TypeVar("T")


def _overflow(table: OrderedDict[str, T]) -> list[T]:
    """Take the oldest entries past :data:`_MAX_IN_FLIGHT` out of ``table`` (calls whose events never
    came), and return them."""
    out = []
    while len(table) > _MAX_IN_FLIGHT:
        out.append(table.popitem(last=False)[1])
    return out


@dataclass(frozen=True)
class _Answer:
    """A success event: the response (a stream's assembled one, or the usage chunk that ended it, with
    the model that ``answered`` and the ``finishes`` its chunks sent), litellm's timings, and for a chat
    stream (``streamed``) the stream's wrapper where one was seen (:meth:`source`)."""

    response: Any
    latency_s: float | None
    ttft_s: float | None
    deployment: str | None
    streamed: bool = False
    stream: Any = None
    cached: bool = False
    answered: str | None = None  # the model that answered, where the response does not say (a usage chunk)
    finishes: tuple[str, ...] | None = None  # the finish reasons, where the response does not carry them

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
    hook; for litellm's SDK ``fallbacks=``, the first attempt's, the request each fallback starts
    from). ``proxy``: the proxy's router makes the attempts; else one ``litellm.acompletion`` does
    (``follows``: one per model of its ``fallbacks=``), or (``as_sent``) the proxy sends a request as it
    came, its one attempt. ``started``: the router was seen starting ``attempt`` (its deployment hook
    ran for it)."""

    lifecycle: CallLifecycle
    flow: Flow
    attempt: Attempt
    sent: Plan
    proxy: bool = True
    started: bool = False
    as_sent: bool = False
    stream: Any = None  # the chat stream the proxy serves for it, once it has one
    follows: bool = False
    own_retries: bool = False  # the proxy's router was handed no fallbacks: it retries the target its own way
    passed: MovedPast | None = None  # a failure the router decides on (router_decides), until it moves past it
    planned: frozenset[str] = frozenset()  # the targets the proxy call's plan held at its pre-call hook
    failed_at: tuple[str, Exception] | None = None  # the router's last failed attempt: its target, its own error

    @property
    def covered(self) -> frozenset[str]:
        """The targets the call follows: its plan's at the pre-call hook, and the router's own it
        follows (a context-window chain's among them)."""
        return self.planned | self.lifecycle.routers_targets

    def own_error(self) -> Exception | None:
        """The error of the attempt the lifecycle waits on, as the router's deployment failure hook
        reported it (:meth:`.RouterLogger.async_post_call_failure_deployment_hook`), taken once; ``None``
        where it reported none for that target (a target its own cooldown skipped, never called)."""
        failed, self.failed_at = self.failed_at, None
        return failed[1] if failed is not None and self.started and self.at(failed[0]) else None

    def router_decides(self, error: Exception) -> bool:
        """Does the proxy's router, not the lifecycle, decide whether the call goes on after ``error``?
        For a failure the lifecycle would end the call on (a 400, 401, 404: not :func:`.retryable`)
        while the router holds fallbacks: litellm's router falls back after some of them. The
        lifecycle then waits for the router's next attempt (its deployment hook: :class:`MovedOn`) or
        the proxy's failure hook."""
        return self.proxy and not self.as_sent and not self.own_retries and bool(self.attempt.remaining) \
            and not isinstance(error, MovedOn) and not retryable(error)

    @property
    def falling_back(self) -> bool:
        """Is a fallback of litellm's SDK ``fallbacks=`` in flight? The one failure event litellm
        delivers a call is then behind it (its first attempt's), and none comes for the fallback."""
        return self.follows and self.attempt.depth > 0

    def at(self, target: str) -> bool:
        """Is ``attempt`` at ``target`` (the router's deployment name; litellm's SDK's model, which
        may lack the provider prefix the plan's target has, or have one the plan's lacks)?"""
        planned = _target(self.attempt)
        return planned == target or not self.proxy and (planned.endswith(f"/{target}") or
                                                         target.endswith(f"/{planned}"))

    def end(self, error: BaseException, spent: Outcome | None = None, failed: bool = False) -> None:
        """End the call (:meth:`.CallLifecycle.abandon`); an attempt the proxy's router never started
        gives back all it took of its quotas."""
        self.lifecycle.abandon(error, spent, failed, made=self.started or not self.proxy)
        self.flow.close()


class _Details:
    """A litellm logging object's ``model_call_details``, kept on the object (see :meth:`RouterLogger._watch`)."""

    __slots__ = ("details", "__weakref__")

    def __init__(self, details: Any) -> None:
        self.details = details

    def streamed(self) -> bool:
        """Whether the call's stream had sent its first chunk (``completion_start_time``, set by
        ``CustomStreamWrapper`` as it reads it, litellm_core_utils/streaming_handler.py, 1.110.2)."""
        return isinstance(self.details, Mapping) and self.details.get("completion_start_time") is not None


class FallbacksEnded(Exception):
    """litellm's SDK ``fallbacks=`` let a call go without an answer once a fallback was being tried,
    and no deployment failure hook had ended it with its last fallback's error: the call was
    cancelled while a fallback ran, or litellm ended it some way that hook missed. Counts toward no
    cooldown."""


class MovedOn(Exception):
    """The proxy's router moved on to another target, so the attempt before failed; with one logging
    object for all attempts, litellm delivers only a request's first failure event. Retryable (503)
    like the failure it stands for, where the deployment failure hook told none of the attempt's own
    (:meth:`_Open.own_error`: a target the router's cooldown skipped, never called)."""

    status_code = 503


class FellBack(MovedOn):
    """litellm's SDK ``fallbacks=`` moved on to its next model, so the attempt before failed, with an
    error neither an event nor the deployment failure hook named (:meth:`_Open.own_error`). It counts
    toward no cooldown: litellm falls back after any error, the request's own among them."""


class ClientDisconnected(asyncio.CancelledError):
    """The proxy's client left before its stream ended (litellm's 499): the call was cancelled from the
    client's side, never a failure of its provider. What the chunks streamed so far used is settled
    as a stream closed early (:func:`.wire.client_disconnected`)."""

    status_code = 499


def _target(attempt: Attempt) -> str:
    return attempt.plan.deployment or attempt.plan.model


def _cut(kwargs: Mapping[str, Any], start_time: Any = None, end_time: Any = None) -> _Answer | None:
    """What a failed attempt had produced before it broke off (:func:`.wire.partial`, from a failure
    event's kwargs or a proxy request's data), as an answer; ``None`` where litellm recorded nothing."""
    spent = wire.partial(kwargs)
    return None if spent is None else _Answer.of(spent, kwargs, start_time, end_time)
