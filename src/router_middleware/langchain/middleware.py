"""``RouterAgentMiddleware``: the pipeline's call lifecycle inside a LangChain v1 ``create_agent`` loop.

``wrap_model_call``/``awrap_model_call`` drive the same lifecycle as ``Pipeline.completion``, with
the agent's model handler in place of litellm: routing picks a model from ``models`` (LangChain
chat models keyed by the ids the routing config names; other targets are skipped with a reason),
the context policy trims the history (kept messages are the agent's own objects; a dropped span
becomes one digest message), and what the policies add goes to the model as ``Pipeline.completion``
sends it (reasoning parameters and a session's ``prompt_cache_key``, unless the model sets its own, in
``model_settings``, Anthropic ``cache_control`` breakpoints on the messages and the last tool, in its
``extras``).
Budgets, quotas, cooldowns, retries with backoff and fallbacks behave as in the pipeline; usage
and cost are read from the AIMessage and recorded (span, metrics, ledger, the session's reasoning
spend). An attempt whose model stream broke off is settled at what it streamed (read from
LangChain's callbacks), and so is each earlier try of it a retry middleware inside this one made
(settled apart: a row and span of its own); each try counts toward the target's quotas, as the
pipeline's own retry does (a request, and the tokens it used); a message a middleware inside this one made in place of
a failed model's answer (ModelRetryMiddleware giving up) reaches the agent, and is recorded as that failure.
The response cache answers it as a pipeline call (keyed by the routed model with what it sends of its
own; a hit is the stored AIMessage, and no model is called), except a call with a ``response_format``
or an answer of several messages.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any
from weakref import WeakValueDictionary

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, SystemMessage, convert_to_messages
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from .. import wire
from ..cache import key_value
from ..catalog import close_names, split_provider
from ..config import Config
from ..context.breakpoints import mark
from ..drivers import adrive, drive
from ..errors import AnswerDiscarded, ConfigError, MessageError
from ..lifecycle import Answers, Attempt, CallLifecycle, CutShort, Replaced, Unsent
from ..params import output_cap
from ..pipeline import PipelineSource, pipeline_of
from ..routing.fallback import retryable, suffix_on_no_alias
from ..routing.quotas import free_variant
from ..telemetry import log
from ..types import AgentContext, Outcome, Plan, label_problem
from .chat_model import RoutedChatModel
from .convert import (
    AttemptRuns,
    attempt,
    cached_answer,
    outcome_from_message,
    response_metadata,
    served_answer,
    to_completion,
    to_openai_once,
)
from .replay import CachedAnswer


def _run_config() -> Mapping[str, Any]:
    """The LangGraph run's config, or ``{}`` outside a graph run."""
    try:
        from langgraph.config import get_config

        return get_config()
    except Exception:  # noqa: BLE001 - outside a graph run there is no config
        return {}


_RUN_LABELS = ("app", "agent_id", "user", "tenant")  # the labels a run may set (the session is its thread_id)


def _run_labels(config: Mapping[str, Any], runtime_context: Any) -> tuple[dict[str, str], dict[str, str]]:
    """The labels a run sets for its calls, and why each value refused as one was (by label): the
    string values of :data:`_RUN_LABELS` in its config's ``configurable``, then ``metadata``, then the
    agent's runtime context (``agent.invoke(..., context=...)``: a dataclass, a pydantic model or a
    dict), each over the one before unless the pipeline refuses it (a NUL in it); its ``thread_id`` as
    the session. A value that is no string (the run's own object) is no label."""
    found: dict[str, str] = {}
    refused: dict[str, str] = {}
    configurable = config.get("configurable") or {}
    thread = configurable.get("thread_id")
    if thread is not None:
        found["session_id"] = str(thread)
    for source in (configurable, config.get("metadata") or {}, runtime_context):
        for name in _RUN_LABELS if source is not None else ():
            try:
                value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
            except Exception:  # noqa: BLE001 - a property of the run's own object that raises is no label
                continue
            if isinstance(value, str) and value:
                if (problem := label_problem(name, value)) is None:
                    found[name] = value
                else:
                    refused[name] = problem
    return found, refused


_OPENAI_CLIENTS = ("langchain_openai", "langchain_litellm", "langchain_community.chat_models.litellm",
                   "router_middleware")  # chat models that send to OpenAI's API unless given a base URL


def _endpoint(model: Any) -> str | None:
    """Where ``model`` sends its requests, for the breakpoints policy's ``prompt_cache_key``: its base
    URL (ChatOpenAI's, ChatLiteLLM's or RoutedChatModel's ``api_base``; the one ChatOpenAI's client
    resolved, from ``OPENAI_BASE_URL`` too), else ``None`` where litellm's default applies (one of those
    given none; an AzureChatOpenAI, whose endpoints take the key), else its class (a chat model of
    another family, ChatGroq's: an OpenAI model name it serves takes no key)."""
    cls = type(model)
    if cls.__name__.startswith("AzureChatOpenAI"):
        return None
    for attribute in ("openai_api_base", "api_base", "base_url"):
        value = getattr(model, attribute, None)
        if isinstance(value, str) and value:
            return value
    client = getattr(model, "root_client", None)  # ChatOpenAI's OpenAI client: the base URL it resolved
    if client is not None and getattr(client, "base_url", None):
        return str(client.base_url)
    return None if cls.__module__.startswith(_OPENAI_CLIENTS) else f"{cls.__module__}.{cls.__qualname__}"


def _model_name(model: BaseChatModel) -> str:
    for attribute in ("model", "model_name", "model_id"):
        value = getattr(model, attribute, None)
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def _own(valid: Sequence[Any], converted: Sequence[Any], owners: Sequence[Any]) -> dict[int, Any]:
    """The agent's own message for each validated dict, by the dict's id (``owners[i]``: the
    message ``converted[i]`` came from, or ``None``). A valid message is validated as the dict it
    was converted to, or as the equal dict validated for an earlier step (each step's history is
    converted anew); a repair (``messages.repair_tool_calls``) may have dropped tool results, or
    added placeholders, which match no original."""
    own: dict[int, Any] = {}
    start = 0
    for message in valid:
        for i in range(start, len(converted)):
            if converted[i] is message or converted[i] == message:
                if owners[i] is not None:
                    own[id(message)] = owners[i]
                start = i + 1
                break
    return own


def _as_kept(message: Mapping[str, Any], valid: Sequence[Any], own: Mapping[int, Any]) -> BaseMessage:
    """The LangChain message to send for a planned dict that is no validated dict of the call: where
    the breakpoints policy only marked one (:func:`.context.breakpoints.mark`), the agent's own message
    carrying the marks (a tool result keeps its ``status``, ``artifact``, ``id``, a block its own
    form); else one built from the dict (a summary, a placeholder result)."""
    for was in valid:
        original: BaseMessage | None = own.get(id(was))
        if original is not None and mark(was) == message:
            return original.model_copy(update={"content": _marks_on(original.content, message.get("content"))})
    return convert_to_messages([dict(message)])[0]


def _marks_on(content: Any, marked: Any) -> Any:
    """The agent's ``content`` with the ``cache_control`` of the planned ``marked`` parts: a string
    becomes the marked text part; a list of blocks gets each mark on the block in its place (its
    blocks stay as the agent wrote them)."""
    if not isinstance(marked, list):
        return content
    if isinstance(content, str):
        return [dict(p) for p in marked]
    if not isinstance(content, list) or len(content) != len(marked):
        return marked
    return [{**block, "cache_control": part["cache_control"]}
            if isinstance(block, dict) and isinstance(part, Mapping) and "cache_control" in part else block
            for block, part in zip(content, marked, strict=True)]


def _marked(own: list[Any], converted: Sequence[Any] | None, planned: Sequence[Any] | None) -> list[Any]:
    """The agent's own tools ``own`` (``converted`` for the pipeline), each the plan marked with a
    ``cache_control`` the pipeline's way (``planned``) carrying that mark: a tool in its ``extras``
    (where ChatAnthropic and RoutedChatModel read it), a dict as a key. Never dicts in place of the
    agent's tools: they would lose what a tool carries for its provider (``extras`` ChatAnthropic
    sends, such as ``defer_loading``), and read as provider tools to the middleware after this one."""
    if not planned or not converted or planned == converted or len(planned) != len(own):
        return own
    tools = list(own)
    for i, (tool, was, now) in enumerate(zip(own, converted, planned, strict=True)):
        mark = now.get("cache_control") if isinstance(now, Mapping) and now != was else None
        if mark is None:
            continue
        if isinstance(tool, BaseTool):
            tools[i] = tool.model_copy(update={"extras": {**(tool.extras or {}), "cache_control": mark}})
        elif isinstance(tool, dict):
            tools[i] = {**tool, "cache_control": mark}
    return tools


_FIRST_CHUNKS_KEPT = 1024  # streamed answers awaiting their read (_first_chunk), which follows at once
_STEPS_KEPT = 1024  # agent steps whose first call's model name is kept, to see a model swapped after it (_swapped)
_NO_DOWNGRADE_SAID: WeakValueDictionary[int, Config] = WeakValueDictionary()  # configs said (_no_downgrades)
_SAID_LOCK = threading.Lock()


def _step(state: Any) -> tuple[int, ...] | None:
    """What tells one agent step from another without holding its state: the state's identity, with its
    message count and the identity of its last message (a later step's state may take the id of one
    freed before it; with the same count and last message id too only if that message was freed as
    well, which within a run, whose later states hold it, it is not)."""
    messages = state.get("messages") if isinstance(state, Mapping) else None
    if not isinstance(messages, Sequence) or not messages:
        return None
    return id(state), len(messages), id(messages[-1])
_HINTS = ("prompt_cache_key",)  # what the policies add only where the caller sets none


def _sets(model: BaseChatModel, name: str) -> bool:
    """Whether ``model`` sends ``name`` of its own (a field, or in its ``model_kwargs``)."""
    own = getattr(model, "model_kwargs", None)
    return (isinstance(own, Mapping) and own.get(name) is not None) or getattr(model, name, None) is not None


_UNSENT = frozenset({  # chat model fields that never change an answer (or are this package's own)
    "callbacks", "callback_manager", "cache", "verbose", "tags", "metadata", "rate_limiter", "custom_get_token_ids",
    "disable_streaming", "streaming", "max_retries", "timeout", "request_timeout", "default_request_timeout",
    "pipeline"})
# What LangGraph and its Agent Server put in a run's configurable for that run alone (its thread and
# checkpoints, the request's id, its tracing headers; the signed-in user stays, as langgraph_auth_user_id)
_GRAPH_KEYS = frozenset({"thread_id", "checkpoint_id", "checkpoint_ns", "checkpoint_map", "run_id", "run_attempt",
                         "langgraph_request_id", "langgraph_auth_user"})


def _cap_of(runnable: Any) -> int | None:
    """The ``max_tokens`` (or ``max_completion_tokens``) a chat model sends of its own: bound to it,
    else its field, else in its ``model_kwargs``; ``None`` when it sets none."""
    model, bound = _unbound(runnable)
    fields = getattr(model, "__dict__", {})
    found = (output_cap(source) for source in (bound, fields, fields.get("model_kwargs") or {}))
    return next((cap for _, cap in filter(None, found)), None)


def _unbound(runnable: Any) -> tuple[BaseChatModel | None, dict[str, Any]]:
    """The chat model ``runnable`` is or wraps (``with_retry()``, ``bind()``: ``bound``), else ``None``,
    and the arguments its ``bind()`` wrappers add (an outer one's over an inner one's, as they are sent)."""
    bound: dict[str, Any] = {}
    for _ in range(8):
        if isinstance(runnable, BaseChatModel):
            return runnable, bound
        kwargs = getattr(runnable, "kwargs", None)
        if isinstance(kwargs, Mapping):
            bound = {**kwargs, **bound}
        runnable = getattr(runnable, "bound", None)
    return None, bound


def _settings(model: BaseChatModel, bound: Mapping[str, Any]) -> dict[str, Any]:
    """What ``model`` sends of its own: its class, every field it has but those that never change an
    answer (callbacks, retries, timeouts, streaming) or it never sends (``Field(exclude=True)``: its
    clients), secrets masked, and what a ``bind()`` around it adds."""
    own = {name: getattr(model, name, None) for name, field in type(model).model_fields.items()
           if name not in _UNSENT and not field.exclude}
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "fields": key_value(own),
            "bound": key_value(bound)}


def _configurable() -> dict[str, Any]:
    """The run's ``configurable`` but what LangGraph puts there for the run alone (:data:`_GRAPH_KEYS`,
    ``__pregel_*`` and the server's other ``__`` keys, ``langsmith-*``)."""
    try:
        from langgraph.config import get_config

        found = get_config().get("configurable") or {}
    except Exception:  # noqa: BLE001 - outside a graph run there is no config
        return {}
    return {k: v for k, v in found.items() if not (k.startswith(("__", "langsmith")) or k in _GRAPH_KEYS)}


def _stored(response: ModelResponse, result: Outcome) -> tuple[dict[str, Any], Any] | None:
    """An answer of one AIMessage for the response cache (:func:`.convert.to_completion`); ``None`` for
    one a middleware inside made of several messages or a structured response."""
    if response.structured_response is not None or len(response.result) != 1:
        return None
    message = response.result[0]
    return to_completion(message, result) if isinstance(message, AIMessage) else None


def _base(route: str) -> str:
    """``route`` without a ``:floor``/``:nitro`` suffix."""
    return route.rsplit(":", 1)[0] if route.endswith((":floor", ":nitro")) else route


_ROUTED = ("requested_model", "routed_model", "decisions", "cost_usd", "cost_source")  # the call's, on its answer


def _renumbered(error: MessageError, positions: list[int]) -> MessageError:
    """``error`` naming messages as the agent numbers them (``request.messages``, its system prompt
    apart), not as they were converted for the pipeline (the system prompt first, a message of
    several tool results as several)."""
    def at(index: int) -> int:
        return positions[index] if 0 <= index < len(positions) else index

    detail = re.sub(r"\bmessage (\d+)\b", lambda m: "the system prompt" if at(int(m.group(1))) < 0
                    else f"message {at(int(m.group(1)))}", error.detail)
    if error.index is not None and positions.count(at(error.index)) > 1:  # its parts were split: numbered apart
        detail = re.sub(r"\bcontent part \d+", "a content part", detail)
    if error.index is not None and at(error.index) < 0:
        return MessageError(f"the system prompt: {detail}", source=error.source)
    return MessageError(detail, index=None if error.index is None else at(error.index), source=error.source)


def _played_back(hit: ModelResponse) -> CachedAnswer:
    """The chat model that plays a response-cache hit's answer back as a run of the agent's model
    would be (:mod:`.replay`): its callbacks see the run, its stream a chunk."""
    answer = hit.result[-1]
    assert isinstance(answer, AIMessage)
    return CachedAnswer(answer=answer, model=str(answer.response_metadata.get("routed_model") or ""),
                             disable_streaming=bool(answer.invalid_tool_calls))


def _with_answer(hit: ModelResponse, played: BaseMessage) -> ModelResponse:
    """``hit`` answered with the message its run played back (the run's id on it, as on a live answer)."""
    return ModelResponse(result=[*hit.result[:-1], played], structured_response=hit.structured_response)


def _unsent(runs: AttemptRuns, error: BaseException) -> None:
    """Raise :class:`Unsent` for an ``error`` the handler raised before any chat model run began while
    the attempt was (no ``on_chat_model_start`` at all, the attempt's or one a middleware inside made
    with messages of its own): the request never reached a model."""
    if isinstance(error, Exception) and not runs.began:
        raise Unsent(error) from error


def _sent(request: ModelRequest) -> list[BaseMessage]:
    """The messages ``request`` hands its model."""
    return [request.system_message, *request.messages] if request.system_message else list(request.messages)


class RouterAgentMiddleware(AgentMiddleware):
    """``create_agent(model, tools, middleware=[RouterAgentMiddleware(pipeline, models={...}, model="coder")])``.

    ``model``: what each call asks the pipeline for (an alias, ``"auto"``, or a model id); with
    ``models``, a name no call could be routed by (not an alias, a deployment or one of ``models``)
    raises ``ConfigError`` with the closest names, as do a ``models`` entry that is no runnable, a
    route none of whose targets (or their ``:free`` variants) is among ``models``, and a budget whose
    ``downgrade_to`` has none there. Default: the name of the model handed to it (the
    agent's own), or with ``models``, where that is none of these, the name of the entry that is that
    model or holds the same one (:meth:`_route`). Without ``models``
    the agent's model is kept and only the context and reasoning policies apply; ``model=`` then names
    it: a route raises ``ConfigError``, a name litellm does not know is logged. ``context``: the
    calls' labels (``app``, ``user``, ``tenant``... as for ``Pipeline.completion``; a bad one raises
    ``RequestError`` here), and where it names none, a run's own string ``tenant``, ``user``, ``app``
    or ``agent_id`` (its runtime context, config metadata or configurable: :func:`_run_labels`); the
    session is LangGraph's ``thread_id`` unless it names one. A ``RoutedChatModel`` an attempt is made
    through sends it as planned (:meth:`.Pipeline.send`); one of ``models`` on an alias of this
    middleware's own pipeline raises ``ConfigError`` (it would route each attempt again).

    A middleware before this one that swaps the agent's model for a later call of the same agent step
    (``ModelFallbackMiddleware``'s retry with its model) has that call routed by the model it handed
    over, as without ``model=``: by its name where that is an alias, a deployment or one of ``models``,
    else by the one entry of ``models`` holding it (without ``models``, its name). A swapped model none
    of ``models`` holds is sent as it is, unrouted (as a direct call would send it), and a warning
    (``agent_model_swap_not_routed``) names the route and the model, once per pair. A model handed over
    on a step's first call is no swap: with ``model=`` that call is routed by ``model=``.
    """

    def __init__(self, pipeline: PipelineSource, *, models: Mapping[str, BaseChatModel] | None = None,
                 model: str | None = None, context: AgentContext | Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.pipeline = pipeline_of(pipeline, "RouterAgentMiddleware", "; a model's name goes in model=")
        if models is not None and not isinstance(models, Mapping):
            raise ConfigError(f"models=: expected a mapping of each name calls are routed to to its chat model "
                              f"({{'gpt-4o-mini': ChatOpenAI(model='gpt-4o-mini')}}), got a "
                              f"{type(models).__name__}")
        self.models = dict(models or {})
        self._no_retries: dict[str, RoutedChatModel] = {}  # a models entry's copy with max_retries=0
        for name, chat_model in self.models.items():
            inner, _ = _unbound(chat_model)
            if inner is None:
                raise ConfigError(f"models[{name!r}]: expected a LangChain chat model (a BaseChatModel, such as "
                                  f"RoutedChatModel(model={name!r}), or one wrapped: bind(), or with_retry() for an "
                                  f"agent without tools), got "
                                  f"{type(chat_model).__name__} {chat_model!r}")
            self._own_pipeline(inner, f"models[{name!r}]")
        self._serve()
        if self.models:
            self._downgrades_reachable()
        else:
            self._no_downgrades()
        if self.models and model is not None:
            self._known_route(model)
            self._no_misnamed_targets(model)
        elif model is not None:
            self._known_label(model)
        self.route = model
        self.context = AgentContext.coerce(context)
        self._lock = threading.Lock()
        self._firsts: dict[tuple[int, ...], str] = {}  # per agent step (_step): its first call's model name
        self._unrouted: set[tuple[str, str]] = set()  # (route, model) pairs said not routed (_route_of)
        self._said: set[tuple[str, str]] = set()  # ("fallback", target), ("label", name): warnings said once
        self._not_keyed: set[tuple[str, str]] = set()  # (model, reason) pairs said not cached (_keyed)
        self._first_chunks: dict[int, tuple[Any, float]] = {}  # an answered stream's response and first chunk,
        # by the response's id (_first_chunk): the entry holds it, so no other response reuses the id meanwhile

    def _serve(self) -> None:
        """Tell the pipeline the model each of ``models`` stands for, where its name is not that
        model (``"strong"`` for a ChatLiteLLM of ``openai/gpt-5-mini``), so an attempt there is
        planned, priced and its parameters fitted as that model (:meth:`.Engine.serve`). A name that
        is itself a model id the catalog knows as the same model (``"gpt-4o-mini"`` for one of
        ``openai/gpt-4o-mini``: same provider, prices, window and capabilities) is planned as itself,
        as ``Pipeline.completion`` plans it: its rows and spans name it as the pipeline's do."""
        served = {name: found for name, chat_model in self.models.items()
                  if (found := _model_name(chat_model)) != name and self.pipeline.catalog.resolve(found)
                  and not self._same_model(name, found)}
        endpoints = {name: base for name, chat_model in self.models.items() if (base := _endpoint(chat_model))}
        if served or endpoints:
            self.pipeline.serve({**self.pipeline.state.served, **self.pipeline.shadowed, **served}, endpoints)

    def _same_model(self, name: str, found: str) -> bool:
        """Whether the catalog knows ``name`` as the model ``found`` names (the same prices and window,
        and the same capability flags, whatever each is spelled as)."""
        catalog = self.pipeline.catalog
        mine, theirs = catalog.resolve(name), catalog.resolve(found)
        return (mine is not None and theirs is not None
                and replace(mine, model=theirs.model, source=theirs.source) == theirs
                and catalog.facts(name) == catalog.facts(found))

    def _base(self, route: str) -> str:
        """``route`` without a ``:floor``/``:nitro`` suffix, unless it is a name whole (a deployment
        ``x:floor``, one of ``models``)."""
        known = route in self.models or route in self.pipeline.config.routing.route_names()
        return route if known else _base(route)

    def _routes(self, route: str) -> bool:
        """Whether a call could be routed by ``route``: an alias, a deployment, ``auto`` with tiers, or
        one of ``models`` (a ``:floor``/``:nitro`` suffix aside)."""
        base = self._base(route)
        return base in self.models or base in self.pipeline.config.routing.route_names()

    def _known_route(self, route: str) -> None:
        """Refuse a ``model=`` that no call could be routed by (see :meth:`_routes`), or whose every
        target is missing from ``models`` (each call would fail with ``NoRouteError``), or that puts
        a ``:floor``/``:nitro`` suffix on a model that is no alias (it picks among an alias's models;
        on a deployment routing ignores it)."""
        base, routing = self._base(route), self.pipeline.config.routing
        if base != route and base in self.models and base not in (*routing.route_names(), "auto"):
            raise ConfigError(f"model={route!r}: {suffix_on_no_alias(routing, base, route.rsplit(':', 1)[1])}")
        if self._routes(route):
            targets = self._targets(route)
            if targets and not any(map(self._reaches, targets)):
                raise ConfigError(f"model={route!r}: none of its targets ({', '.join(targets)}) is one of models= "
                                  f"({', '.join(self.models)}): every call would fail with NoRouteError")
            return
        close = close_names(base, (*routing.route_names(), *self.models), models=False)
        raise ConfigError(f"model={route!r}: not an alias, a deployment or one of models= ({', '.join(self.models)})"
                          + (f"; did you mean {close[0]!r}?" if close else ""))

    def _downgrades_reachable(self) -> None:
        """Refuse a budget whose ``downgrade_to`` has no target among ``models``: past its soft limit,
        every call would be sent there and fail with ``NoRouteError``, where a direct call answers."""
        for budget in self.pipeline.config.routing.budgets:
            targets = self._targets(budget.downgrade_to) if budget.downgrade_to else []
            if targets and not any(map(self._reaches, targets)):
                raise ConfigError(f"budget {budget.name!r}: downgrade_to {budget.downgrade_to!r} has no target among "
                                  f"models= ({', '.join(self.models)}): past its soft limit every call would go "
                                  f"there and fail; add one of {', '.join(targets)} to models=")

    def _no_downgrades(self) -> None:
        """Say, once per config (an agent made per request says it once), that without ``models`` no
        budget's ``downgrade_to`` applies: the agent's own model answers every call, past a soft limit
        too, until the hard limit refuses it."""
        config = self.pipeline.config
        named = [budget.name for budget in config.routing.budgets if budget.downgrade_to]
        with _SAID_LOCK:
            if not named or _NO_DOWNGRADE_SAID.get(id(config)) is config:
                return
            _NO_DOWNGRADE_SAID[id(config)] = config
        log.warning("agent_downgrade_not_applied", budgets=named,
                    why="without models= the agent's own model answers every call: past a budget's soft "
                        "limit it is not downgraded, and its hard limit refuses it; pass models= (a chat "
                        "model for the downgrade's targets) to downgrade")

    def _no_misnamed_targets(self, route: str) -> None:
        """Refuse a ``models`` entry no route reaches whose chat model is a target of ``route`` (or of a
        budget's ``downgrade_to``) missing from ``models`` under its own name (``"gpt-4o-mni"`` holding
        the alias's ``gpt-4o-mini``): every call would skip that target, recording only a
        ``routing:skip`` decision, though the model to call it with was given."""
        routing = self.pipeline.config.routing
        routes = [route, *(budget.downgrade_to for budget in routing.budgets if budget.downgrade_to)]
        targets = {target: name for name in routes for target in self._targets(name)}
        held = {key: split_provider(_model_name(inner))[1] for key, chat_model in self.models.items()
                if key not in targets and (inner := _unbound(chat_model)[0]) is not None}
        for target, name in targets.items():
            misnamed = next((key for key, model in held.items() if model == split_provider(target)[1]), None)
            if misnamed is not None and not self._reaches(target):
                raise ConfigError(f"models[{misnamed!r}] holds {target!r}, a target of {name!r} that is missing from "
                                  f"models= under its own name: every call routed by {name!r} would skip it; did "
                                  f"you mean models[{target!r}]?")

    def _reaches(self, target: str) -> bool:
        """Is ``target`` one of ``models``, or is its free variant (``:free``, tried first with ``free_tier``)?"""
        return target in self.models or free_variant(target) in self.models

    def _targets(self, route: str) -> list[str]:
        """The targets a call routed by ``route`` may go to (the tiers' aliases' for ``auto``)."""
        base = self._base(route)
        routing = self.pipeline.config.routing
        if base in self.models:
            return [base]
        aliases = [tier.alias for tier in routing.tiers] if base == "auto" and base not in routing.aliases else [base]
        return list(dict.fromkeys(t for alias in aliases for t in routing.aliases.get(alias, [alias])))

    def _known_label(self, name: str) -> None:
        """Check a ``model=`` given without ``models``, where the agent's own model answers every call:
        a route is refused (its span and ledger row would name a target the route chose and nothing
        called); a name litellm does not know is logged (``agent_model_unknown``, with the closest
        names: a typo of a route, say; an Ollama or Azure deployment name is one too), its calls unpriced."""
        if self._routes(name):
            raise ConfigError(f"model={name!r} is a route of the pipeline's config, and RouterAgentMiddleware routes "
                              "only among models=, which were not given: the agent's own model would answer every "
                              "call, its span and ledger row naming the target the route chose; pass models= "
                              "(a chat model for each target) or name the agent's model")
        if not wire.provider_known(name) and self.pipeline.catalog.resolve(name) is None:
            log.warning("agent_model_unknown", model=name,
                        closest=list(close_names(name, self.pipeline.config.routing.route_names())),
                        why="without models= it names the agent's own model, which litellm does not know: its "
                            "calls are not priced (the config's models: gives a price)")

    def _route(self, model: BaseChatModel) -> str:
        """What a call handed ``model`` asks the pipeline for: ``model=``, else the model's name; with
        ``models``, a name no call could be routed by is the name of the entry that is ``model``, or
        else the one entry holding the same model (``"cheap"`` for the agent's ChatLiteLLM of
        ``openai/gpt-4o-mini``). None or several: ``ConfigError`` saying what to pass."""
        if self.route:
            return self.route
        name, named = self._routed_by(model)
        if name is not None:
            return name
        which = (f"is held by models= {', '.join(map(repr, named))} alike" if named else
                 f"is not an alias, a deployment or one of models= ({', '.join(map(repr, self.models))}), "
                 "and none of them holds it")
        raise ConfigError(f"the model handed to RouterAgentMiddleware, {_model_name(model)!r}, {which}: pass model= "
                          "(what each call is routed by) or add it to models= under a name of its own")

    def _routed_by(self, model: BaseChatModel) -> tuple[str | None, list[str]]:
        """What a call handed ``model`` is routed by without ``model=`` (see :meth:`_route`), or ``None``
        and the entries of ``models`` holding the same model (none, or several)."""
        name = _model_name(model)
        if not self.models or self._routes(name):
            return name, []
        named = [key for key, held in self.models.items() if held is model] or [
            key for key, held in self.models.items() if _model_name(held) == name]
        return (named[0], named) if len(named) == 1 else (None, named)

    def _swapped(self, request: ModelRequest) -> bool:
        """Whether a middleware outside this one swapped the agent's model for ``request`` (as
        ModelFallbackMiddleware does for its retry): a later call of the same agent step (:func:`_step`)
        handed a model of another name than the step's first call was (a new object of the same model,
        as a middleware building one each call makes, is no swap). The first model name of the last
        ``_STEPS_KEPT`` steps is kept (agent runs sharing this middleware at once; never their states);
        a step no longer kept reads as no swap."""
        step, name = _step(request.state), _model_name(request.model)
        if step is None:
            return False
        with self._lock:
            first = self._firsts.get(step)
            if first is not None:
                return first != name
            self._firsts[step] = name
            while len(self._firsts) > _STEPS_KEPT:
                del self._firsts[next(iter(self._firsts))]
            return False

    def _first(self, said: set[tuple[str, str]], pair: tuple[str, str]) -> bool:
        """Whether ``pair`` is yet to be said (a warning said once), noting that it now is."""
        with self._lock:
            new = pair not in said
            said.add(pair)
        return new

    def _route_of(self, request: ModelRequest) -> tuple[str, bool]:
        """What ``request`` is routed by, and whether its own model is sent as it is. A call whose model
        a middleware outside swapped (:meth:`_swapped`) is routed by that model where a call can be (its
        name is an alias, a deployment or one of ``models``, or one entry of ``models`` holds it;
        without ``models``, its name); a swapped model none of ``models`` holds is sent as it is,
        unrouted, as a direct call would send it, with a warning naming both once per pair; any other
        call by :meth:`_route`."""
        if not self._swapped(request):
            self._reached(request.model)
            return self._route(request.model), False
        name, _ = self._routed_by(request.model)
        if name is not None:
            return name, False
        self._reached(request.model)
        own = _model_name(request.model)
        pair = (self.route or "", own)
        if self._first(self._unrouted, pair):
            log.warning("agent_model_swap_not_routed", route=self.route, model=own,
                        why="a middleware before RouterAgentMiddleware handed it this model in place of the "
                            "agent's, and none of models= holds it: it is sent as it is, unrouted")
        return own, True

    def _reached(self, model: Any) -> None:
        """Tell the pipeline where a model the agent hands this middleware, none of ``models`` (sent as
        it is), sends its requests (:func:`_endpoint`), where it is not OpenAI's API, under its name."""
        if self.models and any(held is model for held in self.models.values()):
            return
        endpoint = _endpoint(model)
        name = _model_name(model)
        if endpoint is not None and self.pipeline.state.endpoints.get(name) != endpoint:
            self.pipeline.serve({**self.pipeline.state.served, **self.pipeline.shadowed}, {name: endpoint})

    def _without_retries(self, name: str, model: Any) -> Any:
        """``model`` for an attempt with another target behind it: a RoutedChatModel that sets no
        ``max_retries`` (nor in ``model_kwargs``) as a copy with ``max_retries=0`` on its pipeline, made
        once per entry of ``models``; any other model (a wrapped one included) as it is. The setting
        goes on the model, not in the request's ``model_settings``, which a middleware inside this one
        hands on to whatever model it calls."""
        if not isinstance(model, RoutedChatModel) or model.max_retries is not None \
                or "max_retries" in model.model_kwargs:
            return model
        entry = self.models.get(name) is model  # the entry's own model, not one another middleware set
        copy = self._no_retries.get(name) if entry else None
        if copy is None:
            model._pipeline()  # made now when it is the model's default: the copy shares it
            copy = model.model_copy(update={"max_retries": 0})
            if entry:
                self._no_retries[name] = copy
        return copy

    def _own_pipeline(self, chat_model: Any, where: str) -> None:
        """Refuse an entry of ``models`` that is a RoutedChatModel on an alias of this middleware's own
        pipeline: the middleware's attempt would be a routed call of its own there, accounted twice.
        One on a model or deployment is sent as the attempt planned it (:meth:`.Pipeline.send`)."""
        if isinstance(chat_model, RoutedChatModel) and chat_model.pipeline is self.pipeline and chat_model.routes():
            raise ConfigError(f"{where}: a RoutedChatModel on {chat_model.model!r}, a route of the middleware's own "
                              "pipeline, would route each attempt again and account it twice (two ledger rows, "
                              "budgets charged twice): give it the target's model or deployment name")

    def _own_caps(self, request: ModelRequest, route: str, own: bool) -> dict[str, int]:
        """The output cap (``max_tokens``) the models a call may go to set of their own, for its budget
        estimate: the agent's model's (bound, a field, or in its ``model_kwargs``), or with ``models``
        the route's targets' where they all set the same (else none: a policy that raises the cap, for
        a thinking budget, would fit it to one target's and send another's below it)."""
        held = [self.models[t] for t in self._targets(route) if t in self.models] if self.models and not own else []
        found = {_cap_of(model) for model in held or [request.model]}
        (cap,) = found if len(found) == 1 else (None,)  # targets capped alike: their policies fit them alike
        return {"max_tokens": cap} if cap is not None else {}

    def _context_of(self, request: ModelRequest) -> AgentContext:
        """The call's labels: ``context=``'s, and the run's own (:func:`_run_labels`: a tenant, user, app
        or agent id of the run's configurable, metadata or runtime context, its ``thread_id`` as the
        session) where ``context=`` names none. A run's value the pipeline refuses is said once per
        label (``agent_run_label_ignored``) and left out."""
        run, refused = _run_labels(_run_config(), getattr(request.runtime, "context", None))
        for name, problem in refused.items():
            if self._first(self._said, ("label", name)):
                log.warning("agent_run_label_ignored", label=name, error=problem[:200],
                            why="the call goes on without it (said once)")
        fill: dict[str, Any] = {name: value for name, value in run.items() if getattr(self.context, name) is None}
        return replace(self.context, **fill) if fill else self.context

    def _start(self, request: ModelRequest) -> tuple[CallLifecycle, Callable[[Plan, bool], ModelRequest], bool]:
        """The call's lifecycle, and how to turn an attempt's plan into the agent's model request."""
        originals = _sent(request)
        params = dict(request.model_settings)
        route, own = self._route_of(request)
        caps = self._own_caps(request, route, own) if output_cap(params) is None else {}
        params.update(caps)  # estimated at the output the model caps itself at, which it sends of its own
        if request.tools:
            params["tools"] = [convert_to_openai_tool(t) for t in request.tools]
        context = self._context_of(request)
        # A message converted to several (tool_result blocks in a user turn) is sent as those, each
        # rebuilt from its dict; every other message is sent as the agent's own object.
        converted: list[dict[str, Any]] = []
        owners: list[BaseMessage | None] = []
        positions: list[int] = []  # each converted message's index in the agent's messages (-1: its system prompt)
        for at, original in enumerate(originals, -1 if request.system_message else 0):
            parts = to_openai_once(original)
            converted += parts
            owners += [original] if len(parts) == 1 else [None] * len(parts)
            positions += [at] * len(parts)
        if context.step is None:  # the agent's step: its model turns so far, as the proxy counts them
            context = replace(context, step=sum(1 for m in converted if m.get("role") == "assistant"))
        try:
            call = self.pipeline.make_call(route, converted, context, params, litellm_sends=False)
        except MessageError as error:
            raise _renumbered(error, positions) from None
        by_id = _own(call.messages, converted, owners)

        def build(plan: Plan, failover: bool = False) -> ModelRequest:
            """The agent's request with ``plan`` applied: the routed model, the kept messages, reasoning.
            ``failover``: another target follows, so a RoutedChatModel's provider SDK retries are off
            unless it or the agent sets ``max_retries`` (as :meth:`.Engine.request` does for a pipeline)."""
            entries = bool(self.models) and not own
            model = self.models[plan.deployment or plan.model] if entries else request.model
            if request.tools and not hasattr(model, "bind_tools"):  # the agent binds them to it, before sending
                raise Unsent(ConfigError(
                    f"models[{plan.deployment or plan.model!r}]: a {type(model).__name__} cannot bind the agent's "
                    "tools (with_retry() gives one): give the chat model itself (the middleware retries and falls "
                    "back) or bind() it"))
            messages = [by_id.get(id(m)) or _as_kept(m, call.messages, by_id) for m in plan.messages]
            system = messages.pop(0) if messages and isinstance(messages[0], SystemMessage) else None
            assert system is None or isinstance(system, SystemMessage)
            # the caller's settings as fitted to the attempt's model (a dropped one stays out), and what
            # the policies added (reasoning, a prompt_cache_key, max_tokens above a thinking budget)
            # but a hint the model sets itself
            settings = {k: v for k, v in plan.params.items() if k != "tools" and (
                k in request.model_settings or (k in caps and v != caps[k])  # a policy raised the model's own
                or (k not in params and not (k in _HINTS and _sets(model, k))))}
            if failover and "max_retries" not in settings:
                model = self._without_retries(plan.deployment or plan.model, model)
            tools = plan.params.get("tools")  # the agent's, or as the policies marked them (cache_control)
            return request.override(model=model, messages=messages,  # type: ignore[arg-type]
                                    system_message=system, model_settings=settings,
                                    tools=_marked(request.tools, params.get("tools"), tools))

        routes = bool(self.models) and not own
        answers = None if request.response_format is not None else Answers(
            partial(self._keyed, request, routes), _stored, cached_answer,
            lambda message, result: ModelResponse(result=[served_answer(message, result)]))
        lifecycle = self.pipeline.start(call, read=self._read, usable=self.models.__contains__ if routes else None,
                                        answers=answers, unusable="not among RouterAgentMiddleware's models=",
                                        reroutes=routes, charges_timeouts=False)  # a timeout may be a guard's
        return lifecycle, build, not routes  # the agent's own model is told the target planned (see send)

    def _keyed(self, request: ModelRequest, routes: bool, plan: Plan) -> Plan | None:
        """``plan`` as the response cache keys it: its params with the ``tool_choice`` the agent sets, the
        tools as the agent gave them (a provider's server tool with its settings), what the attempt's model
        sends of its own (:func:`_settings`; its ``temperature`` where the plan sets none, so
        ``temperature0`` caching sees it), and what a middleware inside this one may build the request
        from: the run's ``context``, its ``configurable`` and the agent state's fields besides its
        messages, with every field they hold (a prompt made per user never answers another user).
        ``None`` when one of those cannot be keyed (the call is not cached). A target the middleware
        cannot reach is keyed apart (it never answered here). The model's settings are read only for a
        call the cache takes (another is never keyed). ``routes``: the attempt's model is the plan's
        entry of ``models``, else the request's own."""
        name = plan.deployment or plan.model
        model, bound = _unbound(self.models.get(name) if routes else request.model)
        params = dict(plan.params)
        temperature = bound.get("temperature", getattr(model, "temperature", None))
        if "temperature" not in params and isinstance(temperature, int | float):
            params["temperature"] = temperature
        cache = self.pipeline.cache
        if cache is None or not cache.cacheable(plan.override(params=params)):
            return plan.override(params=params)
        if request.tool_choice is not None:
            params["tool_choice"] = request.tool_choice
        try:
            params["langchain_model"] = _settings(model, bound) if model is not None else None
            given = [tool if isinstance(tool, Mapping) else {"name": tool.name, "extras": tool.extras}
                     for tool in request.tools if isinstance(tool, Mapping) or getattr(tool, "extras", None)]
            around = {"context": getattr(request.runtime, "context", None), "configurable": _configurable(),
                      "state": {k: v for k, v in (request.state or {}).items() if k != "messages"}, "tools": given}
            params["langchain_run"] = key_value({k: v for k, v in around.items() if v})
        except Exception as exc:  # noqa: BLE001 - a call whose key cannot be made is sent, not cached
            if self._first(self._not_keyed, (name, f"{type(exc).__name__}: {getattr(exc, 'what', exc)}")):
                log.warning("cache_not_keyed", route=name, error_type=type(exc).__name__, error=str(exc)[:300],
                            why="the response cache cannot key what this agent call may be built from; it is "
                                "sent, not cached (said once per model and reason)")
            return None
        return plan.override(params=params)

    def _read(self, plan: Plan, response: ModelResponse | AIMessage, started: float,
              first_token: float | None = None) -> Outcome:
        first_token = self._first_chunk(response) if first_token is None else first_token
        result = response.result if isinstance(response, ModelResponse) else [response]
        message = next((m for m in reversed(result) if isinstance(m, AIMessage)), None)
        found = outcome_from_message(message, plan, self.pipeline, self.pipeline.catalog.provider(plan.model),
                                     started, first_token)
        if message is not None and isinstance(response, ModelResponse):  # how the router served the call, on a
            routed = response_metadata(found)  # copy: the model's own message may be a cache's entry
            copy = message.model_copy(update={"response_metadata": {
                **message.response_metadata, **{k: routed[k] for k in _ROUTED if k in routed}}})
            response.result[next(i for i in range(len(result) - 1, -1, -1) if result[i] is message)] = copy
        return found

    def _first_chunk(self, response: Any) -> float | None:
        """When ``response``'s stream gave its first chunk (:meth:`_answered` noted it), or ``None``."""
        found = self._first_chunks.pop(id(response), None)  # its entry holds it: no other object has its id
        return found[1] if found is not None else None

    def _spent(self, plan: Plan, runs: AttemptRuns, started: float) -> Outcome | None:
        """What the attempt's model run used before it broke off (the prompt and the chunks it
        streamed, estimated), or ``None``: it streamed nothing, or reading it failed."""
        partial = runs.partial()
        if partial is None:
            return None
        try:
            return self._read(plan, partial, started, runs.first_token)
        except Exception as exc:  # noqa: BLE001 - accounting never fails the user's call
            log.warning("langchain_middleware_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return None

    def _tried(self, lifecycle: CallLifecycle, plan: Plan, runs: AttemptRuns) -> None:
        """The attempt's last model run failed, or answered and something after it raised, and the
        model is run again (a retry middleware inside this one): that try ends, and what it streamed
        or answered is settled apart (:meth:`.CallLifecycle.tried`; an answer as :class:`.AnswerDiscarded`)."""
        error = runs.error if isinstance(runs.error, Exception) else AnswerDiscarded(
            "the model answered, then something after it raised, and the model was run again")
        spent = self._spent(plan, runs, runs.started)
        if spent is not None:  # it ended when it failed or answered, not when the next try began
            spent = replace(spent, latency_s=runs.ended - runs.started)
        lifecycle.tried(error, spent, runs.ended_ns)

    def _broke(self, lifecycle: CallLifecycle, plan: Plan, runs: AttemptRuns, error: BaseException,
               started: float) -> None:
        """An attempt raised ``error``: if its model had streamed part of an answer, raise a
        :class:`CutShort` with what it used, so the call is settled at it, or for a stop from outside
        (a cancellation) tell the lifecycle that; else return (the caller raises ``error``)."""
        spent = self._spent(plan, runs, started)
        if spent is None:
            return
        if isinstance(error, Exception):
            raise CutShort(error, spent) from error
        lifecycle.stopping(spent)

    def _answered(self, made: Attempt, runs: AttemptRuns, response: ModelResponse, started: float) -> ModelResponse:
        """``response``, if a model run of the attempt answered (or none was seen); else it stands in
        for the model's failure (a middleware inside this one, such as ModelRetryMiddleware with
        ``on_failure="continue"``, answered the last run's error with a message of its own): raise
        :class:`Replaced`, so the call is recorded as that failure and still returns ``response``,
        and, where a fallback among ``models`` was left untried for an error that moves a call on, warn
        once per target (``agent_fallback_not_tried``)."""
        plan = made.plan
        if runs.answered or not isinstance(runs.error, Exception):
            if runs.first_token is not None:  # a stream: its time to first token, for the lifecycle's read
                if len(self._first_chunks) >= _FIRST_CHUNKS_KEPT:  # a bound: only answers never read stay
                    self._first_chunks.clear()
                self._first_chunks[id(response)] = (response, runs.first_token)
            return response
        target = plan.deployment or plan.model
        if made.remaining and retryable(runs.error) and any(map(self._reaches, made.remaining)) \
                and self._first(self._said, ("fallback", target)):
            log.warning("agent_fallback_not_tried", target=target, error_type=type(runs.error).__name__,
                        why="a middleware after RouterAgentMiddleware answered the model's failure with a message "
                            "of its own (ModelRetryMiddleware's on_failure='continue'), so the route's fallback was "
                            "not tried: give it on_failure='error', or put it before RouterAgentMiddleware")
        raise Replaced(runs.error, response, self._spent(plan, runs, started))

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]) -> Any:
        """Run the model call through the call lifecycle. Raises what the handler raised once no
        fallback is left, ``NoRouteError``, ``BudgetExceeded``, ``StoreUnavailable``, or
        ``MessageError``/``RequestError`` for bad input."""
        lifecycle, build, told = self._start(request)
        sent: list[Attempt] = []

        def send(made: Attempt) -> ModelResponse:
            sent.append(made)
            request, started = build(made.plan, made.follows), time.perf_counter()
            # recorded by this call: not again by a RoutedChatModel or a handler; each retry inside it too
            target = (made.plan.deployment or made.plan.model) if told else None
            with attempt(_sent(request), partial(self._tried, lifecycle, made.plan), _unbound(request.model)[0],
                         self.pipeline, target) as runs:
                try:
                    response = handler(request)
                except BaseException as exc:
                    self._broke(lifecycle, made.plan, runs, exc, started)
                    _unsent(runs, exc)
                    raise
            return self._answered(made, runs, response, started)

        response = drive(lifecycle.run(), send)
        if sent:
            return response
        # a cache hit: no attempt was made
        return _with_answer(response, _played_back(response).invoke(_sent(request)))

    async def awrap_model_call(self, request: ModelRequest,
                               handler: Callable[[ModelRequest], Awaitable[ModelResponse]]) -> Any:
        """The async twin of :meth:`wrap_model_call`."""
        lifecycle, build, told = self._start(request)
        sent: list[Attempt] = []

        async def send(made: Attempt) -> ModelResponse:
            sent.append(made)
            request, started = build(made.plan, made.follows), time.perf_counter()
            target = (made.plan.deployment or made.plan.model) if told else None
            with attempt(_sent(request), partial(self._tried, lifecycle, made.plan), _unbound(request.model)[0],
                         self.pipeline, target) as runs:
                try:
                    response = await handler(request)
                except BaseException as exc:
                    self._broke(lifecycle, made.plan, runs, exc, started)
                    _unsent(runs, exc)
                    raise
            return self._answered(made, runs, response, started)

        response = await adrive(lifecycle.run(), send, off_loop=self.pipeline.store_blocks)
        if sent:
            return response
        return _with_answer(response, await _played_back(response).ainvoke(_sent(request)))
