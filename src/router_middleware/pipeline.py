"""The public entry point: plan a call with the policies, run it through litellm, account for it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ._env import prepare_litellm_env
from .accounting import attach, build_outcome
from .cache import ResponseCache, rebuild_response, replay_chunks
from .catalog import Catalog
from .config import Config, load_config
from .context.summarize import summary_request, summary_text
from .ledger import LedgerWriter, from_outcome
from .messages import validate_messages
from .policies import Policy, PolicyState, apply_policies
from .pricing import price
from .routing import quotas
from .routing.budgets import Reservation, release, reserve, settle
from .routing.fallback import (
    Attempts,
    EmptyStreamError,
    backoff,
    error_kind,
    note_failure,
    note_success,
    request_windows,
    update_average,
)
from .routing.policy import NoRouteError
from .stores import StoreView, open_store
from .stores.memory import MemoryStore
from .streaming import TrackedStream
from .telemetry import CallTrace, log
from .types import AgentContext, Call, Cost, Decision, Outcome, Plan, SummaryJob, Usage, UsageSource

# Providers that send a final usage chunk only when asked with stream_options.include_usage.
_USAGE_CHUNK_PROVIDERS = frozenset({
    "openai", "azure", "deepseek", "openrouter", "text-completion-openai", "anthropic", "gemini", "vertex_ai",
})


def _litellm() -> Any:
    prepare_litellm_env()
    import litellm

    litellm.suppress_debug_info = True
    return litellm


def _usage_reported(chunks: Sequence[Any]) -> bool:
    """Did the provider send usage? litellm fills in a locally counted usage chunk when it did not,
    and marks the difference in the chunk's hidden ``usage`` param."""
    for chunk in chunks:
        hidden = getattr(chunk, "_hidden_params", None)
        usage = hidden.get("usage") if isinstance(hidden, dict) else None
        if usage is not None and type(usage).__name__ != "UnreportedUsage":
            return True
    return False


_END = object()


class _Prefetched:
    """A litellm stream whose first chunk has already been read (to fail over before it)."""

    def __init__(self, first: Any, rest: Any) -> None:
        self._first: list[Any] = [first]
        self._rest = rest

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rest, name)

    def __next__(self) -> Any:
        return self._first.pop() if self._first else next(self._rest)

    async def __anext__(self) -> Any:
        return self._first.pop() if self._first else await self._rest.__anext__()


class _Replay:
    """Stored chunks served through the same iterator protocols as a live litellm stream."""

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = iter(chunks)

    def __next__(self) -> Any:
        return next(self._chunks)

    async def __anext__(self) -> Any:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


@dataclass
class _Ready:
    """A call about to go to its provider: the attempt's plan and request, and the call's trace."""

    plan: Plan
    request: dict[str, Any]
    tracer: CallTrace
    started: float
    attempts: Attempts
    delay: float = 0.0

    def retry(self, next_attempt: tuple[Plan, dict[str, Any], float] | None) -> bool:
        """Take the next attempt from ``Pipeline._after_failure``; False when the call must fail."""
        if next_attempt is None:
            return False
        self.plan, self.request, self.delay = next_attempt
        return True


def _answered_model(chunks: Sequence[Any]) -> str | None:
    for chunk in chunks:
        hidden = getattr(chunk, "_hidden_params", None)
        if isinstance(hidden, dict) and hidden.get("provider_response_model"):
            return str(hidden["provider_response_model"])
    return None


class Pipeline:
    """Runs calls through policies and litellm, and accounts usage and cost for each.

    ``Pipeline()`` is a pass-through: no routing and no trimming, but every call still gets an
    :class:`~router_middleware.types.Outcome` and a span through the global OpenTelemetry API.
    ``Pipeline(config)`` or ``Pipeline.from_config(...)`` runs the policies the config asks for
    (``Pipeline.from_config({})`` gives the defaults); ``policies=`` replaces them.
    """

    def __init__(self, config: Config | None = None, *, policies: Sequence[Policy] | None = None) -> None:
        self.config = config or Config()
        self.catalog = Catalog(self.config.catalog_overrides())
        if policies is None:
            policies = self.config.policies() if config is not None else ()
        self.policies: tuple[Policy, ...] = tuple(policies)
        self.store = open_store(self.config.store)
        self.summaries: StoreView[str] = StoreView(self.store, "summary:", bytes.decode)
        self.reasoning_spent: StoreView[int] = StoreView(self.store, "reasoning:", lambda raw: int(float(raw)))
        # Over the network, values that may lag by a second are read at most once a second.
        lag = 0.0 if isinstance(self.store, MemoryStore) else 1.0
        self.state = PolicyState(catalog=self.catalog, summaries=self.summaries,
                                 reasoning_spent=self.reasoning_spent,
                                 cooldowns=StoreView(self.store, "cooldown:", float, fresh_s=lag),
                                 throughput=StoreView(self.store, "tps:", float, fresh_s=lag),
                                 latency=StoreView(self.store, "lat:", float, fresh_s=lag),
                                 budget_spent=StoreView(self.store, "budget:", float, fresh_s=lag),
                                 quotas=StoreView(self.store, "quota:", float))
        self._failed: dict[str, float] = {}  # targets this process saw fail since their last success
        self.telemetry = self.config.telemetry.settings()
        self.ledger: LedgerWriter | None = None
        if self.config.ledger.url:
            self.ledger = LedgerWriter(self.config.ledger.url, spool=self.config.ledger.spool)
        self.cache: ResponseCache | None = None
        if config is not None and self.config.cache.enabled:
            settings = self.config.cache
            store = open_store(settings.store) if settings.store else self.store
            self.cache = ResponseCache(store, ttl_s=settings.ttl_s, max_entries=settings.max_entries,
                                       policy=settings.policy, semantic=self._semantic_index(store))

    def _semantic_index(self, store: Any) -> Any:
        settings = self.config.cache.semantic
        if not settings.enabled:
            return None
        from .semantic import SemanticIndex, litellm_embedder, local_embedder

        embed = (litellm_embedder(settings.embedder.split(":", 1)[1]) if settings.embedder.startswith("litellm:")
                 else local_embedder)
        return SemanticIndex(store, embed, threshold=settings.threshold, max_per_scope=settings.max_per_scope,
                             ttl_s=self.config.cache.ttl_s, number_guard=settings.number_guard)

    @classmethod
    def from_config(
        cls, source: Config | Mapping[str, Any] | str | Path, *, policies: Sequence[Policy] | None = None
    ) -> Pipeline:
        """Build a pipeline from a YAML/JSON file path or a dict; a bad config raises ``ConfigError``."""
        return cls(load_config(source), policies=policies)

    # -- planning (pure) -------------------------------------------------------------------------

    def make_call(
        self, model: str, messages: Sequence[Any], context: AgentContext | Mapping[str, Any] | None,
        params: Mapping[str, Any],
    ) -> Call:
        ctx = AgentContext.coerce(context)
        if ctx.app is None and self.config.app:
            ctx = replace(ctx, app=self.config.app)
        return Call.create(model, validate_messages(messages), params, ctx)

    def plan(self, call: Call, state: PolicyState | None = None) -> Plan:
        """Apply the policies to ``call``. Policies do no I/O of their own (store-backed state is read
        through read-only views)."""
        state = state or self.state
        if self.config.routing.aliases or self.config.routing.budgets:
            state = replace(state, now=time.time())
        return apply_policies(Plan.from_call(call), self.policies, state)

    # -- execution -------------------------------------------------------------------------------

    def completion(
        self, model: str, messages: Sequence[Any], *, context: AgentContext | Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Any:
        """Drop-in for ``litellm.completion``: same keyword arguments, plus ``context=``.

        Returns litellm's ``ModelResponse``, or for ``stream=True`` a :class:`TrackedStream`.
        """
        call = self.make_call(model, messages, context, params)
        plan = self.plan(call)
        if plan.summary_jobs:
            for job in plan.summary_jobs:
                with self._summary_guard(job):
                    self._keep_summary(job, _litellm().completion(**self._summary_request(job)))
        ready = self._prepare(call, plan if not plan.summary_jobs else None)
        if not isinstance(ready, _Ready):
            return ready  # a response-cache hit
        while True:
            try:
                response = _litellm().completion(**ready.request)
                if ready.plan.params.get("stream"):  # fail over only before the first chunk
                    first = next(response, _END)
                    if first is _END:
                        raise EmptyStreamError(f"{ready.plan.model}: the stream ended before its first chunk")
                    response = _Prefetched(first, response)
                break
            except Exception as exc:
                if not ready.retry(self._after_failure(call, ready.plan, ready.attempts, ready.tracer, exc)):
                    raise
                time.sleep(ready.delay)
        return self._received(ready.plan, response, ready.tracer, ready.started)

    async def acompletion(
        self, model: str, messages: Sequence[Any], *, context: AgentContext | Mapping[str, Any] | None = None,
        **params: Any,
    ) -> Any:
        """Drop-in for ``litellm.acompletion``; see :meth:`completion`."""
        call = self.make_call(model, messages, context, params)
        plan = self.plan(call)
        if plan.summary_jobs:
            for job in plan.summary_jobs:
                with self._summary_guard(job):
                    self._keep_summary(job, await _litellm().acompletion(**self._summary_request(job)))
        ready = self._prepare(call, plan if not plan.summary_jobs else None)
        if not isinstance(ready, _Ready):
            return ready
        while True:
            try:
                response = await _litellm().acompletion(**ready.request)
                if ready.plan.params.get("stream"):
                    try:
                        first = await response.__anext__()
                    except StopAsyncIteration:
                        raise EmptyStreamError(f"{ready.plan.model}: the stream ended before its first chunk") from None
                    response = _Prefetched(first, response)
                break
            except Exception as exc:
                if not ready.retry(self._after_failure(call, ready.plan, ready.attempts, ready.tracer, exc)):
                    raise
                await asyncio.sleep(ready.delay)
        return self._received(ready.plan, response, ready.tracer, ready.started)

    def _prepare(self, call: Call, plan: Plan | None) -> Any:
        """Everything between planning and the provider call (``plan=None``: plan again, the summaries
        being written): the response cache, the budget reservation, the quotas, the request and its
        trace. Returns a cached response, or the :class:`_Ready` first attempt."""
        plan = plan or self.plan(call)
        cached, plan = self._from_cache(plan)
        if cached is not None:
            return cached
        reservation = self._reserve(plan)
        attempts = self._attempts(plan)
        try:
            plan, taken = self._admit(call, plan, attempts)
        except NoRouteError:
            if reservation is not None:
                release(self.store, reservation)  # no attempt was made: nothing is spent
            raise
        request, tracer, started = self._launch(plan)
        tracer.reservation, tracer.quota = reservation, taken
        return _Ready(plan, request, tracer, started, attempts)

    def _model_of(self, name: str) -> str:
        deployment = self.config.routing.deployments.get(name)
        return deployment.model if deployment else name

    def _reserve(self, plan: Plan) -> Reservation | None:
        """Reserve the call's estimated cost on the budgets that apply (raises ``BudgetExceeded``)."""
        budgets = self.config.routing.budgets
        if not budgets:
            return None
        tokens, output = self._request_size(plan)
        usd = price(Usage(tokens, output), self.catalog.resolve(plan.model)).total_usd or 0.0
        return reserve(self.store, budgets, plan.call.context, usd=usd, tokens=tokens + output, now=time.time())

    def _request_size(self, plan: Plan) -> tuple[int, int]:
        """Estimated prompt tokens, and the output allowed (``max_tokens``, else the configured default)."""
        tokens = self.state.tokens(plan.model, plan.messages, plan.params.get("tools"), plan.call.context.session_id)
        return tokens, int(plan.params.get("max_tokens") or self.config.routing.default_output_tokens)

    def _attempts(self, plan: Plan) -> Attempts:
        return Attempts([plan.deployment or plan.model, *plan.fallbacks], self.config.routing.fallback)

    def _admit(self, call: Call, plan: Plan, attempts: Attempts) -> tuple[Plan, Any]:
        """Take the attempt's request/token quotas (free tier, ``routing.limits``, the provider's view).
        A quota used up since planning moves the call on to its next attempt; none left raises
        :class:`NoRouteError`. A store failure admits the call (logged), never fails it."""
        denied: dict[str, str] = {}
        while True:
            target = plan.deployment or plan.model
            found = quotas.quotas_for(target, plan.model, self.config.routing)
            if not found:
                return plan, None
            tokens = sum(self._request_size(plan)) if quotas.estimate_needed(found) else 0
            try:
                taken, why = quotas.take(self.store, found, tokens, time.time())
            except Exception as exc:  # noqa: BLE001
                log.warning("quota_store_failed", error_type=type(exc).__name__)
                return plan, None
            if why is None:
                return plan, (taken, found)
            denied[target] = why
            next_model = attempts.skip(why)
            if next_model is None:
                raise NoRouteError(call.model, denied)
            plan = self._replan(call, next_model, Decision(
                "routing", "quota", f"{target}: {why}; moving on to {next_model}", {"depth": attempts.depth}))

    def _replan(self, call: Call, target: str, decision: Decision) -> Plan:
        """The plan for a later attempt at ``target``, still recording what the caller asked for."""
        return self.plan(call.override(model=target)).override(call=call).decide(decision)

    def _end_quota(self, tracer: CallTrace, response: Any, tokens: int | None) -> None:
        """Settle the attempt's quota tokens (given back if ``tokens`` is None: the call failed) and
        record the provider's rate-limit headers."""
        if tracer.quota is None:
            return
        taken, found = tracer.quota
        tracer.quota = None
        try:
            if tokens is None:
                quotas.give_back(self.store, taken, requests=False)
            else:
                quotas.settle(self.store, taken, tokens)
        except Exception as exc:  # noqa: BLE001
            log.warning("quota_store_failed", error_type=type(exc).__name__)
        quotas.observe(self.store, found, quotas.response_headers(response), time.time())

    def _after_failure(
        self, call: Call, plan: Plan, attempts: Attempts, tracer: CallTrace, exc: Exception,
    ) -> tuple[Plan, dict[str, Any], float] | None:
        """Count the failure for the circuit breaker; return the next attempt, or ``None`` to give up
        (the call's spans and ledger row then record the error)."""
        tracer.attempt_failed(exc)
        self._end_quota(tracer, exc, None)
        self._failed[plan.deployment or plan.model] = time.time()
        note_failure(self.store, plan.deployment or plan.model, self.config.routing.cooldown, time.time())
        windows = (request_windows(self.catalog, attempts.models, self._model_of)
                   if error_kind(exc) == "ContextWindowExceededError" else None)  # only that error needs them
        next_model = attempts.advance(exc, windows)
        if next_model is None:
            self._give_up(plan, tracer, exc)
            return None
        failed = plan.deployment or plan.model
        if next_model != failed:
            retry_plan = self._replan(call, next_model, Decision(
                "routing", "fallback", f"{plan.model} failed ({type(exc).__name__}); falling back to {next_model}",
                {"depth": attempts.depth, "failed": "; ".join(attempts.history)}))
        else:
            retry_plan = plan
        try:
            retry_plan, tracer.quota = self._admit(call, retry_plan, attempts)
        except NoRouteError as no_route:
            self._give_up(plan, tracer, exc)
            raise no_route from exc
        request = self._request(retry_plan)
        tracer.next_attempt(retry_plan, self.catalog.provider(retry_plan.model), attempts.depth)
        same = (retry_plan.deployment or retry_plan.model) == failed
        return retry_plan, request, backoff(attempts.depth - 1, self.config.routing.fallback, exc, same_target=same)

    def _give_up(self, plan: Plan, tracer: CallTrace, exc: Exception) -> None:
        """The call failed for good: its spans and ledger row record the error; its reservation is released."""
        tracer.fail(exc)
        self._record_failure(plan, exc)
        if tracer.reservation is not None:
            release(self.store, tracer.reservation)

    def _keep_summary(self, job: SummaryJob, response: Any) -> None:
        text = summary_text(response)
        if text:
            self.summaries.put(job.key, text.encode())

    def _summary_request(self, job: SummaryJob) -> dict[str, Any]:
        settings = self.config.context
        return summary_request(job, settings.summary_model, settings.summary_params)

    @contextlib.contextmanager
    def _summary_guard(self, job: SummaryJob) -> Iterator[None]:
        """A failed summary never fails the call: the plan keeps its offline digest."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001
            log.warning("summary_failed", span=job.key, error=repr(exc))

    def _launch(self, plan: Plan) -> tuple[dict[str, Any], CallTrace, float]:
        before = after = 0
        if plan.messages != plan.call.messages:
            session = plan.call.context.session_id
            before = self.state.tokens(plan.model, plan.call.messages, plan.call.tools, session)
            after = self.state.tokens(plan.model, plan.messages, plan.params.get("tools"), session)
            plan = plan.override(estimated_savings_usd=self._saving(plan.model, before - after))
        request = self._request(plan)
        provider = self.catalog.provider(plan.model)
        return request, CallTrace.start(self.telemetry, plan, provider, before, after), time.perf_counter()

    def _request(self, plan: Plan) -> dict[str, Any]:
        """litellm kwargs for ``plan``: a deployment adds its endpoint, key (from the environment), timeout."""
        request = plan.request()
        deployment = self.config.routing.deployments.get(plan.deployment or "")
        if deployment is not None:
            if deployment.api_base:
                request["api_base"] = deployment.api_base
            if deployment.api_key_env:
                request["api_key"] = os.environ.get(deployment.api_key_env)
            if deployment.timeout_s:
                request.setdefault("timeout", deployment.timeout_s)
        self._ask_for_usage(plan, request)
        return request

    def _ask_for_usage(self, plan: Plan, request: dict[str, Any]) -> None:
        provider = self.catalog.provider(plan.model)
        if request.get("stream") and provider in _USAGE_CHUNK_PROVIDERS and "stream_options" not in request:
            request["stream_options"] = {"include_usage": True}

    def _saving(self, model: str, tokens: int) -> float:
        """Tokens not sent, valued at the cache-read price (what they would most likely have cost)."""
        info = self.catalog.resolve(model)
        if info is None or tokens <= 0:
            return 0.0
        return tokens * (info.cache_read if info.cache_read is not None else info.input)

    def _received(self, plan: Plan, response: Any, tracer: CallTrace, started: float) -> Any:
        plan = tracer.plan
        if plan.params.get("stream"):
            return TrackedStream(response, self._stream_finisher(plan, tracer), started)
        result = build_outcome(response, plan, self.catalog, latency_s=time.perf_counter() - started)
        attach(response, result)
        self._settle(result, response, tracer)
        tracer.succeed(result, response)
        return response

    def _from_cache(self, plan: Plan) -> tuple[Any, Plan]:
        """A cached answer for ``plan`` shaped like a live one (a stream if one was asked for), or None;
        and the plan, with a decision recorded if the cache failed (it shows on the span)."""
        if self.cache is None or not self.cache.cacheable(plan):
            return None, plan
        entry = self.cache.lookup(plan)
        if self.cache.last_error:
            plan = plan.decide(Decision("cache", "error", f"{self.cache.last_error}; treated as a miss"))
        if entry is None:
            return None, plan
        plan = plan.override(estimated_savings_usd=entry.cost_usd or 0.0)
        tracer = CallTrace.start(self.telemetry, plan, self.catalog.provider(plan.model), 0, 0, attempt=False)
        tracer.cache_similarity = entry.similarity
        started = time.perf_counter()
        if plan.params.get("stream"):
            def finish(chunks: list[Any], begun: float, first: float | None, error: BaseException | None,
                       complete: bool) -> Outcome | None:
                result = build_outcome(rebuild_response(entry.response), plan, self.catalog, usage_source="cache",
                                       latency_s=time.perf_counter() - begun,
                                       time_to_first_token_s=(first - begun) if first is not None else None)
                tracer.succeed(result)
                self._record(result)
                return result

            return TrackedStream(_Replay(replay_chunks(entry.response)), finish, started), plan
        response = rebuild_response(entry.response)
        result = build_outcome(response, plan, self.catalog, usage_source="cache",
                               latency_s=time.perf_counter() - started)
        attach(response, result)
        tracer.succeed(result, response)
        self._record(result)
        return response, plan

    def _settle(self, result: Outcome, response: Any, tracer: CallTrace | None = None) -> None:
        """Record what a finished call leaves for later ones: the session's reasoning spend, the cache."""
        plan = result.plan
        session = plan.call.context.session_id if plan else None
        if tracer is not None:
            self._settle_budget(result, tracer)
            self._end_quota(tracer, response, result.usage.total_tokens)
        if plan is not None and self.config.routing.aliases:  # circuit breaker and :nitro averages
            target = plan.deployment or plan.model
            if self._failed.pop(target, None) is not None:  # no store round trip while all is well
                note_success(self.store, target)
            if result.latency_s and result.usage.output_tokens and result.usage.source == "provider":
                update_average(self.store, f"tps:{target}", result.usage.output_tokens / result.latency_s)
            first = result.time_to_first_token_s or result.latency_s
            if first and result.usage.source == "provider":
                update_average(self.store, f"lat:{target}", first)
        if session and result.usage.reasoning_tokens:
            self.reasoning_spent.add(session, result.usage.reasoning_tokens)
        if plan is not None and response is not None and self.cache is not None and self.cache.cacheable(plan):
            if not self.cache.save(plan, response, result.cost.total_usd) and tracer is not None:
                tracer.event("router_middleware.cache.error", {"reason": self.cache.last_error or "write failed"})
        self._record(result)

    def _settle_budget(self, result: Outcome, tracer: CallTrace) -> None:
        if tracer.reservation is not None:
            settle(self.store, tracer.reservation, usd=result.cost.total_usd, tokens=result.usage.total_tokens)
            tracer.reservation = None

    def _record(self, result: Outcome, *, error: BaseException | None = None) -> None:
        """Queue the call's ledger row (written on a background thread)."""
        if self.ledger is None:
            return
        saved = result.plan.estimated_savings_usd if result.plan else 0.0
        hit = result.usage.source == "cache"
        record = from_outcome(result, saved_context=0.0 if hit else saved, saved_cache=saved if hit else 0.0)
        if error is not None:
            record = replace(record, error=type(error).__qualname__)
        self.ledger.append(record)

    def _record_failure(self, plan: Plan, error: BaseException) -> None:
        if self.ledger is not None:
            failed = Outcome(model=plan.model, provider=self.catalog.provider(plan.model), usage=Usage(source="none"),
                             cost=Cost.unknown(), plan=plan)
            self._record(failed, error=error)

    def close(self) -> None:
        """Flush the ledger and close stores (call at shutdown)."""
        if self.ledger is not None:
            self.ledger.close()

    def _stream_finisher(self, plan: Plan, tracer: CallTrace) -> Any:
        def finish(
            chunks: list[Any], started: float, first: float | None, error: BaseException | None, complete: bool,
        ) -> Outcome | None:
            if error is not None and not chunks:
                tracer.fail(error)
                return None
            source: UsageSource = "provider"
            if not complete or not _usage_reported(chunks):
                source = "estimated"
            messages = [dict(m) for m in plan.messages]
            response = _litellm().stream_chunk_builder(chunks, messages=messages) if chunks else None
            if response is None:
                tracer.fail(error or RuntimeError("stream closed before the first chunk"))
                return None
            result = build_outcome(
                response, plan, self.catalog, usage_source=source, answered_model=_answered_model(chunks),
                latency_s=time.perf_counter() - started,
                time_to_first_token_s=(first - started) if first is not None else None,
            )
            self._end_quota(tracer, chunks[0], result.usage.total_tokens)  # the headers ride on the chunks
            self._settle(result, response, tracer) if complete else self._settle_budget(result, tracer)
            if error is not None:
                tracer.fail(error, result)
            else:
                tracer.succeed(result, response)
            return result

        return finish
