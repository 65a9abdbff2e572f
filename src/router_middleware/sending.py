"""Sending a request: a stream read ahead to its first chunk, so an attempt fails over before any
reaches its caller (:meth:`.Pipeline._send`), and one request sent as its caller planned it, for a
caller that routes, retries and records the call itself: RouterAgentMiddleware's attempt made
through a ``RoutedChatModel`` (:meth:`.Pipeline.send`).

The target is resolved as the pipeline resolves a routing target (a deployment's model, endpoint, key
and timeout: :meth:`.Engine.request`) and nothing else happens: no policy, response cache, budget,
quota, cooldown count, span, metric or ledger row, and no retry or fallback of its own. The answer
carries its :class:`~.types.Outcome` (what it used and cost) for the caller to read."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import wire
from .accounting import build_outcome
from .errors import EmptyStreamError
from .fit import fit_plan
from .lifecycle import stream_answer
from .params import choices_asked, usage_asked
from .streaming import TrackedStream
from .types import Outcome, Plan, UsageSource

if TYPE_CHECKING:
    from .engine import Engine
    from .lifecycle import Attempt
    from .streaming import Finisher


def sent_plan(engine: Engine, model: str, messages: Sequence[Any], params: Mapping[str, Any]) -> Plan:
    """The plan of a request sent as given: its messages and params checked as a call's are
    (``MessageError``/``RequestError``), ``model`` a deployment's name (its model, endpoint and key)
    or a model id, and its params fitted to that model as a planned call's are (:func:`.fit.fit_plan`:
    the caller's chat model adds settings of its own, a ``temperature`` a reasoning model refuses,
    that the caller's plan did not see)."""
    call = engine.make_call(model, messages, None, params)
    deployment = model if model in engine.config.routing.deployments else None
    plan = Plan.from_call(call).override(model=engine.model_of(model), deployment=deployment)
    return fit_plan(plan, wire.param_rules(plan.model), drops=choices_asked(plan.params) > 1 and wire.drops_params())


def answered(engine: Engine, plan: Plan, response: Any, started: float) -> Any:
    """``response`` with its outcome attached (:func:`~.accounting.outcome` reads it); a stream as a
    :class:`.TrackedStream` whose outcome is there once it has been read."""
    if not plan.params.get("stream"):
        wire.attach_outcome(response, build_outcome(response, plan, engine.catalog,
                                                    latency_s=time.perf_counter() - started))
        return response
    return TrackedStream(response, _finisher(engine, plan, response), started,
                         hide_usage=not usage_asked(plan.params))


def _finisher(engine: Engine, plan: Plan, stream: Any) -> Finisher:
    """What a stream sent as given used, once read: the provider's usage where it sent it, else an
    estimate, its prompt counted locally with the tool definitions (litellm's own count leaves them out)."""

    def finish(chunks: list[Any], started: float, first: float | None, error: BaseException | None,
               early: bool) -> Outcome | None:
        if not chunks:
            return None
        reported = wire.usage_reported(chunks, stream)
        response, _ = stream_answer(engine, plan, chunks, reported=reported)
        source: UsageSource = "provider" if reported and error is None and not early else "estimated"
        return build_outcome(response, plan, engine.catalog, usage_source=source,
                             answered_model=wire.answered_model(chunks), latency_s=time.perf_counter() - started,
                             time_to_first_token_s=(first - started) if first is not None else None)

    return finish


def stream_ended(attempt: Attempt, first: Any, stream: Any) -> bool:
    """Does a stream whose first chunk is ``first`` say it is done with nothing said, with a target
    left to fail over to (litellm closes a stream that ended before any data with a bare finish chunk)?"""
    return bool(attempt.remaining) and wire.bare_finish(first, stream)


def said_ahead(attempt: Attempt, read: list[Any], stream: Any, ended: bool) -> list[Any]:
    """The chunks read ahead of a stream, or ``EmptyStreamError`` (which fails over) when there are none,
    or, when it ``ended`` at once (:func:`stream_ended`), when its provider sent nothing in what followed
    either (the last target's is served as it came, as a direct call's is)."""
    if not read:
        raise EmptyStreamError(f"{attempt.plan.model}: the stream ended before its first chunk")
    if ended and wire.said_nothing(read, stream):
        raise EmptyStreamError(f"{attempt.plan.model}: the stream ended with no data from the provider")
    return read
