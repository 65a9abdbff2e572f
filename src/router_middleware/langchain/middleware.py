"""``RouterAgentMiddleware``: the pipeline's policies inside a LangChain v1 ``create_agent`` loop.

In ``wrap_model_call`` each model request is planned like a pipeline call: routing picks a model
from ``models`` (LangChain chat models keyed by the ids the routing config names), the context
policy trims the history (kept messages are the agent's own objects; a dropped span becomes one
digest message), and the reasoning policy's parameters go into ``model_settings``. The call's
usage and cost are read from the AIMessage and recorded (span, metrics, ledger, budgets, the
session's reasoning spend); a retryable failure moves to the plan's next fallback in ``models``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, convert_to_messages
from langchain_core.utils.function_calling import convert_to_openai_tool

from ..pipeline import Pipeline
from ..reasoning.translate import REASONING_PARAMS
from ..routing.fallback import retryable
from ..routing.policy import NoRouteError
from ..telemetry import CallTrace
from ..types import Plan
from .convert import outcome_from_message, to_openai


def _thread_id() -> str | None:
    try:
        from langgraph.config import get_config

        value = (get_config().get("configurable") or {}).get("thread_id")
    except Exception:  # noqa: BLE001 - outside a graph run there is no config
        return None
    return str(value) if value is not None else None


def _model_name(model: BaseChatModel) -> str:
    for attribute in ("model", "model_name", "model_id"):
        value = getattr(model, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


@dataclass
class _Call:
    """One model request in flight: its plan, the agent's original messages, and its trace."""

    plan: Plan
    originals: Mapping[int, BaseMessage]
    request: ModelRequest
    trace: CallTrace
    started: float
    targets: list[str]
    planned: int = 0  # targets the plan had: the fallback depth is how many are gone


class RouterAgentMiddleware(AgentMiddleware):
    """``create_agent(model, tools, middleware=[RouterAgentMiddleware(pipeline, models={...}, model="coder")])``.

    ``model``: what each call asks the pipeline for (an alias, ``"auto"``, or a model id); default:
    the agent's own model. Without ``models`` the agent's model is kept and only the context and
    reasoning policies apply.
    """

    def __init__(self, pipeline: Pipeline, *, models: Mapping[str, BaseChatModel] | None = None,
                 model: str | None = None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.models = dict(models or {})
        self.route = model

    def _start(self, request: ModelRequest) -> _Call:
        originals = [*([request.system_message] if request.system_message else []), *request.messages]
        converted = to_openai(originals)
        params = dict(request.model_settings)
        if request.tools:
            params["tools"] = [convert_to_openai_tool(t) for t in request.tools]
        thread = _thread_id()
        context = {"session_id": thread} if thread else None
        call = self.pipeline.make_call(self.route or _model_name(request.model), converted, context, params)
        plan = self.pipeline.plan(call)
        by_id = {id(d): m for d, m in zip(call.messages, originals, strict=True)}
        targets = [plan.deployment or plan.model, *plan.fallbacks]
        started = time.perf_counter()
        reservation = self.pipeline._reserve(plan)
        trace = CallTrace.start(self.pipeline.telemetry, plan, self.pipeline.catalog.provider(plan.model),
                                len(call.messages), len(plan.messages))
        trace.reservation = reservation
        entry = _Call(plan, by_id, request, trace, started, targets, planned=len(targets))
        entry.request = self._request(entry, targets[0])
        return entry

    def _request(self, entry: _Call, target: str) -> ModelRequest:
        """The agent's request with the plan applied: the routed model, the kept messages, reasoning."""
        model = entry.request.model
        if self.models:
            if target not in self.models:
                raise NoRouteError(entry.plan.call.model, {target: "chosen by routing, but not in models="})
            model = self.models[target]
        messages = [entry.originals.get(id(m)) or convert_to_messages([dict(m)])[0] for m in entry.plan.messages]
        system = messages.pop(0) if messages and isinstance(messages[0], SystemMessage) else None
        assert system is None or isinstance(system, SystemMessage)
        settings = {**entry.request.model_settings,
                    **{k: v for k, v in entry.plan.params.items() if k in REASONING_PARAMS}}
        return entry.request.override(model=model, messages=messages,  # type: ignore[arg-type]
                                      system_message=system, model_settings=settings)

    def _finished(self, entry: _Call, response: ModelResponse | AIMessage) -> None:
        result = response.result if isinstance(response, ModelResponse) else [response]
        message = next((m for m in reversed(result) if isinstance(m, AIMessage)), None)
        outcome = outcome_from_message(message, entry.plan, self.pipeline, entry.trace.provider, entry.started)
        self.pipeline._settle(outcome, None, entry.trace)
        entry.trace.succeed(outcome)

    def _next(self, entry: _Call, error: Exception) -> bool:
        """After a failure: move to the next fallback that ``models`` has (True), or give up (False)."""
        entry.trace.attempt_failed(error)
        entry.targets.pop(0)
        while entry.targets and self.models and entry.targets[0] not in self.models:
            entry.targets.pop(0)
        if not retryable(error) or not entry.targets or not self.models:
            self.pipeline._give_up(entry.plan, entry.trace, error)
            return False
        target = entry.targets[0]
        deployment = target if target in self.pipeline.config.routing.deployments else None
        entry.plan = entry.plan.override(model=self.pipeline._model_of(target), deployment=deployment,
                                         fallbacks=tuple(entry.targets[1:]))
        entry.request = self._request(entry, target)
        entry.trace.next_attempt(entry.plan, self.pipeline.catalog.provider(entry.plan.model),
                                 entry.planned - len(entry.targets))
        return True

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        entry = self._start(request)
        while True:
            try:
                response = handler(entry.request)
            except Exception as error:
                if self._next(entry, error):
                    continue
                raise
            self._finished(entry, response)
            return response

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> Any:
        entry = self._start(request)
        while True:
            try:
                response = await handler(entry.request)
            except Exception as error:
                if self._next(entry, error):
                    continue
                raise
            self._finished(entry, response)
            return response
