"""``RouterCallbackHandler``: observe any LangChain chat model (usage, cost, spans, ledger, budgets).

LangChain drops what callbacks return, so this handler cannot route, trim or refuse; it accounts for
calls made by models it does not wrap, adding what each spent to the budgets that apply to it. Each
run is tracked by its ``run_id`` (batches and nested runs do not mix); a streamed run's usage is
read from the aggregated message LangChain hands ``on_llm_end``.
A ``RoutedChatModel``'s run, and a model call made by ``RouterAgentMiddleware``, is listed in
``outcomes`` only: its pipeline already gave it a span and a ledger row.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, LLMResult
from langchain_core.runnables.config import var_child_runnable_config

from ..errors import StreamLeft
from ..exits import end_at_exit
from ..pipeline import Pipeline, PipelineSource, pipeline_of
from ..telemetry import CallTrace, log
from ..types import AgentContext, Call, Outcome, Plan
from .convert import accounted, labels, outcome_from_message, to_openai


@dataclass
class _Run:
    trace: CallTrace | None  # None: accounted by a pipeline already (a RoutedChatModel's, the middleware's)
    plan: Plan
    started: float
    first_token: float | None = None


def _model_name(serialized: Mapping[str, Any] | None, metadata: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    for value in (params.get("model"), params.get("model_name"), metadata.get("ls_model_name"),
                  (serialized or {}).get("kwargs", {}).get("model"),
                  (serialized or {}).get("kwargs", {}).get("model_name")):
        if value:
            return str(value)
    return "unknown"


def _streamed(response: LLMResult | None) -> BaseMessage | None:
    """The message merged from a failed run's chunks, if any came: LangChain puts it first in the
    response it hands ``on_llm_error``, a chunk (the error's own generation is a whole message)."""
    first = response.generations[0] if response is not None and response.generations else []
    return first[0].message if first and isinstance(first[0], ChatGenerationChunk) else None


def _answer(generation: Any, result: Outcome) -> Any:
    """An observed answer as a chat completion's choices, for content capture (its span's output)."""
    message = getattr(generation, "message", None)
    converted = to_openai([message]) if isinstance(message, BaseMessage) else []
    finish = result.finish_reasons[0] if result.finish_reasons else None
    return SimpleNamespace(choices=[SimpleNamespace(message=converted[0], finish_reason=finish)] if converted else [])


def _chain_thread(parent_run_id: UUID | None) -> Any:
    """The ``thread_id`` of the ``configurable`` of the chain step that runs the model (langchain-core
    copies it into the callbacks' metadata only inside a LangGraph run): the runnable context's, where
    it is that step's (its callbacks' parent run is the model run's parent; else it is an outer
    run's, and a model invoked inside it with a config of its own has another thread: review61b). A
    bare model's ``invoke`` sets no such context, and its configurable is out of a callback's reach."""
    config = var_child_runnable_config.get() or {}
    if parent_run_id is None or getattr(config.get("callbacks"), "parent_run_id", None) != parent_run_id:
        return None
    configurable = config.get("configurable") or {}
    return configurable.get("thread_id") if isinstance(configurable, Mapping) else None


class RouterCallbackHandler(BaseCallbackHandler):
    """Pass in ``config={"callbacks": [RouterCallbackHandler()]}`` (or a model's ``callbacks=``).

    ``pipeline`` supplies the catalog (prices, overrides), telemetry settings and the ledger;
    ``context`` the app/session/user labels: a bad one raises ``RequestError`` here, since errors
    inside the handler's callbacks are logged, never raised.
    """

    raise_error = False

    def __init__(self, pipeline: PipelineSource | None = None, *,
                 context: AgentContext | Mapping[str, Any] | None = None) -> None:
        self.pipeline = Pipeline() if pipeline is None else pipeline_of(pipeline, "RouterCallbackHandler")
        self.context = labels(context)  # checked now: a mistake found per call would only be logged
        if self.pipeline.config.app:  # a call that names no app counts for the config's, as in the pipeline
            self.context.setdefault("app", self.pipeline.config.app)
        self._runs: dict[UUID, _Run] = {}
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []  # the most recent calls, newest last (bounded)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, parent_run_id: UUID | None = None, tags: list[str] | None = None,
                            metadata: dict[str, Any] | None = None, **kwargs: Any) -> None:
        metadata = metadata or {}
        params = kwargs.get("invocation_params") or {}
        model = _model_name(serialized, metadata, params)
        context = {**self.context}
        session = metadata.get("thread_id") or metadata.get("session_id") or _chain_thread(parent_run_id)
        if session and "session_id" not in context:
            context["session_id"] = str(session)
        if tags and "tags" not in context:
            context["tags"] = tuple(tags)
        sent = to_openai(messages[0]) if messages else []
        if "step" not in context:  # the agent's model turns so far, as the middleware and the proxy count them
            context["step"] = sum(1 for m in sent if m.get("role") == "assistant")
        settings = {k: v for k, v in params.items() if k in ("temperature", "max_tokens", "stream")}
        tools = params.get("tools")  # counted in the prompt of a call its provider reports no usage for
        if isinstance(tools, list) and all(isinstance(tool, Mapping) for tool in tools):
            settings["tools"] = tools
        call = Call.create(model, sent, settings, context)
        plan = Plan.from_call(call)
        trace = None
        if not accounted(metadata, messages[0] if messages else []):
            provider = metadata.get("ls_provider") or self.pipeline.catalog.provider(model)
            trace = CallTrace.start(self.pipeline.telemetry, plan, provider, 0, 0)
            trace.event("langchain.run", {"run_id": str(run_id), "parent_run_id": str(parent_run_id or "")})
        with self._lock:
            self._runs[run_id] = _Run(trace, plan, time.perf_counter())
        if trace is not None:
            end_at_exit(self)

    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        run = self._runs.get(run_id)
        if run is not None and run.first_token is None:
            run.first_token = time.perf_counter()

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            return
        try:
            generation = response.generations[0][0] if response.generations and response.generations[0] else None
            result = outcome_from_message(getattr(generation, "message", None), run.plan, self.pipeline,
                                          run.trace.provider if run.trace else None, run.started, run.first_token)
        except Exception as exc:  # noqa: BLE001 - observing must never break the user's chain
            log.warning("langchain_callback_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            if run.trace is not None:
                run.trace.fail(exc)
            return
        if run.trace is not None:
            result = self.pipeline.books.settle_observed(result)  # its spend counts toward the budgets
            run.trace.succeed(result, _answer(generation, result) if run.trace.wants_answer else None)
        with self._lock:
            self.outcomes.append(result)
            del self.outcomes[:-1000]

    def on_llm_error(self, error: BaseException, *, run_id: UUID, response: LLMResult | None = None,
                     **kwargs: Any) -> None:
        """A run that ended in ``error``: a stream broken off or stopped by its reader after chunks
        came (LangChain hands the merged chunks in ``response``; a model that streams when invoked,
        as in an agent, hands none: its prompt alone then) is settled at what it used, as a stream of
        the pipeline cut short; else a row with nothing spent."""
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is not None:
            streamed = _streamed(response)
            self._broke_off(run, error, streamed is not None or run.first_token is not None, streamed)

    def _broke_off(self, run: _Run, error: BaseException, chunks_came: bool, merged: BaseMessage | None) -> None:
        """End ``run`` with ``error``: after chunks came, settled at the prompt and what streamed
        (``merged``, the chunks LangChain merged, if at hand), estimated, as a stream of the pipeline
        cut short; else a row with nothing spent."""
        trace = run.trace
        if trace is None:  # accounted by its pipeline
            return
        if not chunks_came:
            trace.fail(error)
            self.pipeline.books.record_failure(run.plan, error, trace.provider)
            return
        try:
            result = outcome_from_message(merged, run.plan, self.pipeline, trace.provider, run.started,
                                          run.first_token)
            result = self.pipeline.books.settle_observed(result, complete=False, error=error)
        except Exception as exc:  # noqa: BLE001 - observing must never break the user's chain
            log.warning("langchain_callback_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            trace.fail(error)
            return
        trace.fail(error, result)
        with self._lock:
            self.outcomes.append(result)
            del self.outcomes[:-1000]

    @property
    def in_flight(self) -> Sequence[UUID]:
        return tuple(self._runs)

    def end_at_exit(self) -> bool:
        """Runs still under way as the interpreter exits (a script that stopped reading a stream and
        ended) end now, while imports still work, stopped by :class:`.StreamLeft`: one whose first
        token had come is settled at its prompt counted locally (the chunks LangChain merged are out
        of reach), as a stream closed early; else a row with nothing spent. Left to the teardown,
        LangChain's ``on_llm_error`` came when imports failed: no row, and its spend uncounted."""
        with self._lock:
            runs, self._runs = [run for run in self._runs.values() if run.trace is not None], {}
        for run in runs:
            try:  # the chunks LangChain merged are out of reach: the prompt alone, estimated
                self._broke_off(run, StreamLeft("the process exited before the stream ended"),
                                run.first_token is not None, None)
            except Exception as exc:  # noqa: BLE001 - one run that cannot end keeps no other from ending
                log.warning("langchain_callback_failed", error_type=type(exc).__name__, error=str(exc)[:200])
        return bool(runs)
