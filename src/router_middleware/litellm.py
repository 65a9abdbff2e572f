"""``RouterLogger``: the pipeline inside litellm's own callbacks (``litellm.callbacks = [RouterLogger()]``).

In the SDK, litellm lets one hook rewrite a request, ``async_pre_call_deployment_hook``, and calls
it on the async path only (``litellm.acompletion``), after it has chosen the provider. There the
logger applies the context and reasoning policies to the request, and routing when the model it
picks is served by the same provider (litellm cannot change providers at that point; the decision
says so otherwise). The success and failure events record usage, cost, spans, metrics and ledger
rows for every call, sync or async. litellm logs and ignores exceptions raised in hooks, so the
logger counts what it did (``hook_calls``, ``recorded``) for tests and health checks. Use
``register()`` / ``unregister()`` rather than editing ``litellm.callbacks`` by hand.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from litellm.integrations.custom_logger import CustomLogger

from .accounting import build_outcome
from .pipeline import Pipeline
from .telemetry import CallTrace, log
from .types import Call, Decision, Plan

_REQUEST_KEYS = frozenset({
    "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "response_format", "reasoning_effort", "thinking", "reasoning", "parallel_tool_calls", "seed",
})
_MAX_IN_FLIGHT = 10_000


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
    return "messages" in kwargs and str(getattr(call_type, "value", call_type)) in ("acompletion", "completion")


def _context(kwargs: Mapping[str, Any], *, head_session: bool = False) -> dict[str, Any]:
    """The call's labels from its metadata; with ``head_session``, a call without ``session_id`` gets
    one from its conversation head (the system prompt and the task), which an agent resends unchanged
    on every step: what a proxy can know when the client (Cline, say) sends no session."""
    metadata = _metadata(kwargs)
    keys = ("app", "session_id", "step", "step_kind", "user", "tenant")
    context = {k: metadata[k] for k in keys if metadata.get(k) is not None}
    if head_session and "session_id" not in context:
        head = [m for m in kwargs.get("messages") or [] if isinstance(m, Mapping)][:2]
        digest = hashlib.blake2b(repr([(m.get("role"), m.get("content")) for m in head]).encode(), digest_size=8)
        context["session_id"] = f"head-{digest.hexdigest()}"
    return context


class RouterLogger(CustomLogger):
    def __init__(self, pipeline: Pipeline | None = None, *, proxy: bool = False) -> None:
        """``proxy=True`` (the LiteLLM proxy): calls without ``metadata.session_id`` are grouped into
        sessions by their conversation head."""
        super().__init__()
        self.pipeline = pipeline or Pipeline.from_config({})
        self.proxy = proxy
        self._calls: OrderedDict[str, tuple[Plan, CallTrace]] = OrderedDict()
        self._lock = threading.Lock()
        self.hook_calls = 0
        self.recorded = 0

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

    async def async_pre_call_deployment_hook(self, kwargs: dict[str, Any], call_type: Any) -> dict[str, Any] | None:
        """SDK (and proxy) hook, after litellm picked the deployment: context, reasoning, same-provider routing."""
        if not _is_chat(kwargs, call_type) or self._planned(kwargs):
            return None
        return self._apply(kwargs, provider_fixed=True)

    async def async_pre_call_hook(self, user_api_key_dict: Any, cache: Any, data: dict[str, Any],
                                  call_type: Any) -> dict[str, Any] | None:
        """Proxy hook, before the proxy resolves ``model``: routing may pick any ``model_name`` of the
        proxy's model_list (the routing config's aliases list them), then context and reasoning."""
        if not _is_chat(data, call_type):
            return None
        return self._apply(data, provider_fixed=False)

    def _planned(self, kwargs: Mapping[str, Any]) -> bool:
        with self._lock:
            return str(kwargs.get("litellm_call_id")) in self._calls

    def _apply(self, kwargs: dict[str, Any], *, provider_fixed: bool) -> dict[str, Any]:
        self.hook_calls += 1
        requested = str(kwargs["model"])
        params = {k: v for k, v in kwargs.items() if k in _REQUEST_KEYS}
        provider = self.pipeline.catalog.provider(requested)
        context = _context(kwargs, head_session=self.proxy)
        call = self.pipeline.make_call(requested, kwargs["messages"], context, params)
        plan = self.pipeline.plan(call)
        changed = dict(kwargs)
        changed["messages"] = [dict(m) for m in plan.messages]
        for key in set(call.params) | set(plan.params):  # what the policies set, changed or dropped
            if key not in plan.params:
                changed.pop(key, None)
            elif call.params.get(key) != plan.params[key]:
                changed[key] = plan.params[key]
        if plan.model != requested:
            if not provider_fixed:
                changed["model"] = plan.deployment or plan.model
            elif self.pipeline.catalog.provider(plan.model) == provider:
                changed["model"] = plan.model.split("/", 1)[1] if plan.model.startswith(f"{provider}/") else plan.model
            else:
                plan = plan.decide(Decision("routing", "kept", f"litellm already chose provider {provider}; "
                                            f"{plan.model} needs another one, so {requested} is kept"))
                plan = plan.override(model=requested)
        trace = CallTrace.start(self.pipeline.telemetry, plan, provider, len(call.messages), len(plan.messages))
        call_id = str(kwargs.get("litellm_call_id") or id(kwargs))
        with self._lock:
            self._calls[call_id] = (plan, trace)
            while len(self._calls) > _MAX_IN_FLIGHT:
                self._calls.popitem(last=False)
        return changed

    def _take(self, kwargs: Mapping[str, Any]) -> tuple[Plan, CallTrace]:
        """The call's plan and trace from the hook, or (sync calls, which skip the hook) new ones."""
        with self._lock:
            found = self._calls.pop(str(kwargs.get("litellm_call_id")), None)
        if found is not None:
            return found
        model = str(kwargs.get("model") or "unknown")
        call = Call.create(model, list(kwargs.get("messages") or []), {}, _context(kwargs))
        plan = Plan.from_call(call)
        return plan, CallTrace.start(self.pipeline.telemetry, plan, self.pipeline.catalog.provider(model), 0, 0)

    def _success(self, kwargs: Mapping[str, Any], response_obj: Any, start_time: Any, end_time: Any) -> None:
        try:
            plan, trace = self._take(kwargs)
            latency = (end_time - start_time).total_seconds() if start_time and end_time else None
            result = build_outcome(response_obj, plan, self.pipeline.catalog, latency_s=latency)
            self.pipeline.books.settle(result)
            trace.succeed(result, response_obj)
            self.recorded += 1
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def _failure(self, kwargs: Mapping[str, Any]) -> None:
        try:
            plan, trace = self._take(kwargs)
            error = kwargs.get("exception") or RuntimeError(str(kwargs.get("traceback_exception") or "failed"))
            trace.fail(error)
            self.pipeline.books.record_failure(plan, error)
            self.recorded += 1
        except Exception as exc:  # noqa: BLE001
            log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._success(kwargs, response_obj, start_time, end_time)

    async def async_log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._success(kwargs, response_obj, start_time, end_time)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._failure(kwargs)

    async def async_log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._failure(kwargs)


__all__ = ["RouterLogger"]
