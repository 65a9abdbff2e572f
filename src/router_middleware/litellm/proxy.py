"""The steps behind :class:`.RouterLogger`'s hooks in the LiteLLM proxy (:class:`_ProxyHooks`): an
Anthropic ``/v1/messages`` or OpenAI ``/v1/responses`` request admitted as sent
(:meth:`_ProxyHooks._admit_as_sent`, whose plan the SDK's ``litellm.aresponses`` shares), the proxy's
model names, a chat call settled as its answer is served, a call whose client left mid-stream, and
the router moving to its next attempt. The
hooks themselves stay on ``RouterLogger``: litellm's proxy finds some of them in the callback's own
class ``__dict__`` (``async_pre_call_hook``, ``async_post_call_response_headers_hook``:
litellm/proxy/utils.py, 1.110.2), so every method overriding ``CustomLogger``'s is defined there."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .. import wire
from ..accounting import stream_finish_reasons
from ..catalog import close_names
from ..context.breakpoints import default_openai_endpoint, openai_endpoint
from ..drivers import astep
from ..errors import BudgetExceeded, EmptyStreamError, NoRouteError, StoreUnavailable, UnknownModelError
from ..lifecycle import Attempt
from ..telemetry import log
from ..types import Call, Decision, Plan
from .calls import ClientDisconnected, _Answer, _Open, _overflow, _target
from .core import _Core
from .request import _labelled, as_sent_view

_SERVE_WAIT_S = 0.2  # how long an answer waits for its call's settlement (a store slow to write)


def _unplanned(endpoint: str, error: Exception) -> None:
    """Log a request sent as it came that the hook could not plan: it is sent and counted, not refused."""
    log.warning("budget_not_enforced", error=f"{type(error).__name__}: {str(error)[:200]}",
                why=f"the hook could not plan this {endpoint} request: counted, not refused")


class _ProxyHooks(_Core):
    """:class:`.RouterLogger`'s steps behind the LiteLLM proxy (see the module's docstring)."""

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
            alias = engine.config.routing.split_route(requested)[0]
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

    async def _open_as_sent(self, data: Mapping[str, Any], endpoint: str, requested: str,
                            sends_refused: Callable[[Exception], bool] | None = None) -> _Open:
        """The lifecycle of a request sent as it came (:meth:`_plan_as_sent`), its one attempt
        admitted: raises ``BudgetExceeded``, ``NoRouteError`` (a quota used up) or ``StoreUnavailable``
        when it is refused, before anything is sent."""
        engine = self.pipeline
        plan = self._plan_as_sent(data, endpoint, requested)
        lifecycle = engine.start(plan.call, plan=plan, read=self._read_own, cache=False, fallback=False,
                                 sends_refused=sends_refused)
        flow = lifecycle.run()
        done, attempt = await astep(flow, None, None, wait=False, off_loop=engine.store_blocks)
        assert not done and isinstance(attempt, Attempt)  # without the response cache, a call is attempted
        return _Open(lifecycle, flow, attempt, attempt.plan, proxy=False)

    def _plan_as_sent(self, data: Mapping[str, Any], endpoint: str, requested: str) -> Plan:
        """The plan of a request sent as it came: its target the model it asks for (behind the proxy,
        its ``model_name``, whose quotas and cooldown it counts toward, as a chat call routed there
        does, and those of the name a ``model_group_alias`` stands for), priced as the model that name
        stands for; its conversation as chat messages and its tools' definitions, for its estimate and
        its span; its labels; a decision saying it was not routed."""
        engine = self.pipeline
        messages, params = as_sent_view(data, endpoint)
        in_config = requested in engine.config.routing.deployments
        model = engine.model_of(requested) if in_config else _proxy_model(requested) or requested
        labels = {"app": engine.config.app, **self._labels({**data, "messages": messages}, derive=self.proxy)}
        call = _labelled(lambda context: Call.create(requested, messages, params, context), labels)
        plan = Plan.from_call(call).override(model=model, deployment=requested if in_config or model != requested
                                             else None)  # a model_name spelled as its model: as Engine.serve does
        reason = (f"{endpoint}: sent as it came to {requested!r} (routing, context and reasoning policies apply "
                  "to chat completions only); admitted against its quotas and the budgets")
        return plan.decide(Decision("routing", "as-sent", reason, {"endpoint": endpoint}))

    def _known_model(self, model: str, served: frozenset[str]) -> None:
        """Refuse a model that is no name the proxy serves and no route of the config: the client's typo
        is a 400 (``UnknownModelError``, with the closest names), as the bare proxy's "Invalid model
        name", not a ``NoRouteError`` 503 that OpenAI-style clients retry."""
        routes = self.pipeline.config.routing.route_names()
        alias = self.pipeline.config.routing.split_route(model)[0]
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
            groups = {alias: group for alias, group in wire.proxy_group_aliases(current).items()
                      if fresh is not None and group in fresh}
            if fresh is not None and (fresh != names or groups != self.pipeline.state.groups):
                self._unserved(fresh)
                found = {name: _proxy_deployment(name) for name in fresh}
                self.pipeline.serve({name: model for name, (model, _) in found.items() if model is not None},
                                    {name: base for name, (_, base) in found.items() if base is not None}, groups)
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

    def _serving(self, data: Mapping[str, Any]) -> _Open | None:
        """The routed chat call whose answer the proxy is about to serve, if its lifecycle waits for
        it; not a request sent as it came (its answer is in its endpoint's own shape: its event settles it)."""
        with self._lock:
            found = self._calls.get(self._key(data))
        return found if found is not None and found.proxy and not found.as_sent else None

    async def _settle_served(self, data: Mapping[str, Any], response: Any, *,
                             served: list[Any] | None = None) -> None:
        """Settle a routed chat call as the proxy serves its answer (``response``; for a stream, the last
        chunk served: the usage chunk litellm ends it with when the client or the proxy asked for one;
        ``served``: every chunk of a stream served), before the client has it. litellm delivers the
        success event later, from a background worker: settled then, the call held its estimate
        meanwhile, and a client that sends its next request at once was admitted against that estimate,
        not this call's spend. The event then finds the call ended
        (:meth:`.RouterLogger.async_log_success_event`). After the router fell back mid-stream, the
        stream's wrapper keeps only the first target's chunks: what was served tells what the call
        answered, and its usage, out of the wrapper's sight, is said ``estimated``. Left to its event:
        a stream that served no usage chunk, one litellm's response cache served (its event says so), or
        one whose span captures the answer's content (assembling a stream takes litellm's builder about 0.15 ms a
        chunk: its event assembles it anyway). The answer waits at most :data:`_SERVE_WAIT_S` for the
        settlement's store writes; slower ones go on in the background. Never raises."""
        try:
            found = self._serving(data)
            streamed = served is not None
            times = wire.attempt_times(data.get("litellm_logging_obj"), streamed=streamed)
            if found is None or times is None:
                return
            chunks = wire.served_chunks(found.stream) if streamed else None
            stream = found.stream
            if chunks is not None and wire.fell_back_mid_stream(stream):  # a stream: ``served`` was given
                chunks, stream = served, None
            if chunks is not None and wire.said_nothing(chunks, stream):
                self._said_nothing(data, found)
                return
            if streamed and (chunks is None or getattr(response, "usage", None) is None
                             or found.lifecycle.wants_answer):
                return
            answer = _Answer.of(response, data["litellm_logging_obj"].model_call_details, *times)
            if chunks is not None:
                answer = replace(answer, answered=wire.answered_model(chunks), finishes=stream_finish_reasons(chunks))
            key = self._key(data)
            with self._lock:  # before the lifecycle is taken: its event, if it comes meanwhile, is dropped
                self._answered[key] = None
                _overflow(self._answered)
            settling = asyncio.ensure_future(self._resume(data, answer, None))
            self._writing.add(settling)  # aflush waits for it
            settling.add_done_callback(self._writing.discard)
            await asyncio.wait((settling,), timeout=_SERVE_WAIT_S)  # a task of its own: the hook may be cancelled
            if settling.done() and not settling.cancelled() and settling.result() is False:  # taken meanwhile
                with self._lock:
                    self._answered.pop(key, None)
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def _said_nothing(self, data: Mapping[str, Any], found: _Open) -> None:
        """End a routed chat stream whose provider sent nothing (a 200 closed before any data: litellm
        serves the client a bare finish chunk, and delivers no event): failed with
        :class:`.EmptyStreamError`, counted toward its target's cooldown, its reservation given back and
        its row written (before, it held its estimate until the reservation lapsed, refusing the user's
        next calls meanwhile). A late event of it is dropped."""
        key = self._key(data)
        if self._take_open(key, found) is None:
            return
        with self._lock:
            self._answered[key] = None
            _overflow(self._answered)
        self._end(found, EmptyStreamError(f"{_target(found.attempt)}: the stream ended with no data from the provider"),
                  failed=True)
        self._tally()

    def _left(self, kwargs: Mapping[str, Any], answer: _Answer) -> bool:
        """End a proxy call whose client left mid-stream (litellm delivers the chunks streamed so far
        as a success): settled as a stream closed early, at litellm's count of those chunks (``usage.source``
        ``estimated``) and the prompt the provider reported, else the request counted locally, tool
        definitions included (litellm's count leaves them out: :meth:`.PolicyState.request_tokens`), its
        row and span saying :class:`ClientDisconnected`. False when no lifecycle waits."""
        found = self._take_open(self._key(kwargs))
        if found is None:
            return False
        usage = getattr(answer.response, "usage", None)
        spent = wire.Partial(usage)
        if usage is not None and not wire.usage_reported((), answer.stream or found.stream):
            spent = wire.Partial.counted(self.pipeline.state.request_tokens(found.attempt.plan),
                                         usage.completion_tokens or 0)
        counted = replace(answer, response=spent)
        self._end(found, ClientDisconnected("the client disconnected before the stream ended (litellm: 499)"),
                  self._spent(found, counted))
        self._tally()
        return True


def _proxy_model(name: str) -> str | None:
    """The model the proxy's first deployment under ``model_name`` ``name`` is priced and judged as
    (:func:`_proxy_deployment`)."""
    return _proxy_deployment(name)[0]


def _proxy_deployment(name: str) -> tuple[str | None, str | None]:
    """The model the proxy's first deployment under ``model_name`` ``name`` is priced and judged as
    (its ``model_info.base_model``: what litellm prices an Azure deployment by; else its litellm
    model), and the endpoint the name's calls may go to (its deployments' ``api_base`` or ``base_url``:
    the first that is no OpenAI endpoint, as the router may pick any of them, else the first; one with
    neither goes where litellm sends a call given none); ``None`` for what the proxy does not say."""
    router = wire.proxy_router()
    try:
        found = router.registry().deployments(name) if router is not None else None
        params = found[0].get("litellm_params") if found else None
        info = found[0].get("model_info") if found else None
        model = (info.get("base_model") if isinstance(info, Mapping) else None) or \
            (params.get("model") if isinstance(params, Mapping) else None)
        bases = [_base(d.get("litellm_params")) or default_openai_endpoint() for d in found or ()]
    except Exception:  # noqa: BLE001 - another litellm's router: priced as the name
        return None, None
    given = [b for b in bases if b is not None]
    return (str(model) if model else None), next((b for b in given if not openai_endpoint(b)),
                                                 given[0] if given else None)


def _base(params: Any) -> str | None:
    """A deployment's endpoint of its own (``api_base``, else ``base_url``, else its named credential's
    from the proxy's ``credential_list``: :func:`.wire.credential_base`), if any."""
    if not isinstance(params, Mapping):
        return None
    base = params.get("api_base") or params.get("base_url")
    if not base and params.get("litellm_credential_name"):
        base = wire.credential_base(str(params["litellm_credential_name"]))
    return base if isinstance(base, str) and base else None
