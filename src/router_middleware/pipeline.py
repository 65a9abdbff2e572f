"""``Pipeline``: the drop-in for ``litellm.completion``/``acompletion``, a thin driver of the engine."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import wire
from .config import Config, load_config
from .drivers import adrive, drive
from .engine import Engine
from .errors import ConfigError
from .lifecycle import Attempt, Flow
from .policies import Policy
from .routing.fallback import given_fallbacks
from .sending import answered, said_ahead, sent_plan, stream_ended
from .streaming import Prefetched
from .types import AgentContext


class Pipeline(Engine):
    """Runs calls through the policies and litellm, and accounts usage and cost for each.

    ``Pipeline()`` is a pass-through: no routing and no trimming, but every call still gets an
    :class:`~router_middleware.types.Outcome` and a span through the global OpenTelemetry API.
    ``Pipeline(config)`` (a :class:`~.config.Config`, a dict, or a YAML/JSON path) or
    ``Pipeline.from_config(...)`` runs the policies the config asks for (``Pipeline({})`` gives the
    defaults); ``policies=`` replaces them.
    """

    @classmethod
    def from_config(
        cls, source: Config | Mapping[str, Any] | str | Path, *, policies: Sequence[Policy] | None = None
    ) -> Pipeline:
        """Build a pipeline from a YAML/JSON file path or a dict; a bad config raises ``ConfigError``."""
        return cls(load_config(source), policies=policies)

    def completion(
        self, model: str, messages: Sequence[Any], *, context: AgentContext | Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Any:
        """Drop-in for ``litellm.completion``: same keyword arguments, plus ``context=``.

        Returns litellm's ``ModelResponse``, or for ``stream=True`` a :class:`TrackedStream`. Raises
        what the provider raised once no fallback is left, ``NoRouteError``, ``BudgetExceeded``,
        ``StoreUnavailable``, or ``MessageError``/``RequestError`` (``UnknownModelError``) for bad input.
        litellm's ``fallbacks=`` (model names) become the call's own attempts after the first (see
        :meth:`_flow`).
        """
        return drive(self._flow(model, messages, context, params), self._send)

    async def acompletion(
        self, model: str, messages: Sequence[Any], *, context: AgentContext | Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Any:
        """Drop-in for ``litellm.acompletion``; see :meth:`completion`."""
        return await adrive(self._flow(model, messages, context, params), self._asend, off_loop=self.store_blocks)

    def send(self, model: str, messages: Sequence[Any], *, context: Any = None, **params: Any) -> Any:
        """One request sent as the caller planned it, for a caller that routes, retries and records the
        call itself (RouterAgentMiddleware's attempt through a RoutedChatModel): ``model`` resolved as
        a deployment where it names one, and nothing else (see :mod:`.sending`; ``context`` is not
        read). Returns litellm's response, its outcome attached, or a TrackedStream; raises what
        litellm raised, or ``MessageError``/``RequestError`` for bad input."""
        plan, started = sent_plan(self, model, messages, params), time.perf_counter()
        return answered(self, plan, wire.litellm().completion(**self.request(plan)), started)

    async def asend(self, model: str, messages: Sequence[Any], *, context: Any = None, **params: Any) -> Any:
        """The async twin of :meth:`send`."""
        plan, started = sent_plan(self, model, messages, params), time.perf_counter()
        return answered(self, plan, await wire.litellm().acompletion(**self.request(plan)), started)

    def _flow(self, model: str, messages: Sequence[Any], context: AgentContext | Mapping[str, Any] | None,
              params: dict[str, Any]) -> Flow:
        """The call's lifecycle. litellm's ``fallbacks=``, when they are model names (or dicts naming
        only a ``model``), are taken out of the request and tried by the lifecycle itself, as litellm
        tries them: in this order, once each, after any error (in place of an alias's own fallbacks),
        each admitted as a routing fallback is (its quotas, a half-open probe; a budget's
        ``downgrade_to`` reroutes the call). So each attempt is a span, counts toward its target's
        cooldown, and is the row's ``target``; an answer is cached under the model that gave it.
        Fallbacks that set parameters of their own go to litellm as given, and their answer is not
        cached (it may be another model's)."""
        follow, bare = given_fallbacks(params.get("fallbacks"), model)
        if bare:
            del params["fallbacks"]
        call = self.make_call(model, messages, context, params)
        return self.start(call, follow=follow if bare else (), caller_sends=False).run()

    def _send(self, attempt: Attempt) -> Any:
        response = wire.litellm().completion(**self.request(attempt.plan, failover=attempt.follows))
        if not attempt.plan.params.get("stream"):
            return response
        read = list(itertools.islice(response, 1))  # fail over only before the first chunk
        ended = bool(read) and stream_ended(attempt, read[0], response)
        if ended:
            read += list(response)  # the stream says it is done: its end (a usage chunk at most)
        return Prefetched(said_ahead(attempt, read, response, ended), response)

    async def _asend(self, attempt: Attempt) -> Any:
        response = await wire.litellm().acompletion(**self.request(attempt.plan, failover=attempt.follows))
        if not attempt.plan.params.get("stream"):
            return response
        read: list[Any] = []
        ended = False
        async for chunk in response:  # fail over only before the first chunk
            read.append(chunk)
            ended = ended or stream_ended(attempt, chunk, response)
            if not ended:
                break  # else the stream says it is done: its end is read (a usage chunk at most)
        return Prefetched(said_ahead(attempt, read, response, ended), response)


PipelineSource = Pipeline | Config | Mapping[str, Any] | str | Path  # what an adapter takes: see pipeline_of
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def pipeline_of(source: PipelineSource, owner: str, hint: str = "") -> Pipeline:
    """The pipeline an adapter (``owner``) drives: ``source`` itself, or one built from a config (a
    :class:`~.config.Config`, a dict, a YAML/JSON path; a bad one raises ``ConfigError``). Anything
    else, or a name that is no file and no YAML/JSON path (a model's, say), raises ``ConfigError``
    naming ``owner``, what it got, and ``hint`` for the latter."""
    if isinstance(source, Pipeline):
        return source
    if isinstance(source, str) and Path(source).suffix.lower() not in _CONFIG_SUFFIXES and not Path(source).exists():
        raise ConfigError(f"{owner}: {source!r} is no config file: expected a Pipeline or its config (a dict, a "
                          f"Config or a YAML/JSON path){hint}")
    if isinstance(source, Config | Mapping | str | Path):
        return Pipeline(source)
    raise ConfigError(f"{owner}: expected a Pipeline or its config (a dict, a Config or a YAML/JSON path), "
                      f"got {type(source).__name__}")
