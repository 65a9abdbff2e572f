"""``RoutedChatModel``: a LangChain chat model that runs every call through a router-middleware Pipeline."""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from operator import itemgetter
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_function, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field, PrivateAttr, SecretStr

from ..accounting import outcome
from ..cache import Unkeyable, key_value
from ..errors import ConfigError
from ..pipeline import Pipeline, pipeline_of
from ..telemetry.tracing import within_attempt
from .convert import (
    ROUTED,
    final_chunk,
    is_attempt,
    labels,
    made_through,
    planned_target,
    to_ai_message,
    to_chunk,
    to_openai,
    tool_choice,
)


class RoutedChatModel(BaseChatModel):
    """A chat model whose calls go through ``pipeline`` (routing, context, reasoning, cache, telemetry)
    and litellm (a ``Pipeline``, or its config: a dict, a ``Config`` or a YAML/JSON path; a bad one
    raises ``ConfigError``). ``model`` is an alias from the pipeline's config, ``"auto"``, or any
    litellm model id.

    The session for context and reasoning budgets is ``session_id``, else the ``thread_id`` (or
    ``session_id``) in the run's metadata, else the ``thread_id`` of its
    ``config={"configurable": {...}}`` (which a LangGraph run copies into the metadata, and
    langchain-core 1.8.3 does not, for ``model.invoke`` or an LCEL chain), else none. ``context`` (and a
    call's ``context=``) is an ``AgentContext`` or a dict of its labels, checked as the pipeline checks
    it: a bad or unknown label raises ``RequestError`` naming it.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    model: str = Field(default="auto", alias="model_name")
    pipeline: Pipeline | None = Field(default=None, exclude=True)
    temperature: float | None = None
    max_tokens: int | None = None
    timeout: float | None = None
    stop: list[str] | None = Field(default=None, alias="stop_sequences")
    max_retries: int | None = None
    api_key: SecretStr | None = None
    api_base: str | None = Field(default=None, alias="base_url")
    streaming: bool = False
    session_id: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    _default_pipeline: Pipeline | None = PrivateAttr(default=None)
    _own_key: str = PrivateAttr(default_factory=lambda: uuid.uuid4().hex)  # see _get_llm_string

    def __init__(self, **kwargs: Any) -> None:
        accepted = _accepted(type(self))
        unknown = [name for name in kwargs if name not in accepted]
        if unknown:  # pydantic would drop them silently (a ``mock_response=`` lost, a real call made)
            close = difflib.get_close_matches(unknown[0], accepted, n=1)
            raise ConfigError(f"RoutedChatModel: unknown argument {unknown[0]!r}" + (
                f"; did you mean {close[0]!r}?" if close else
                f": litellm's other parameters go in model_kwargs={{{unknown[0]!r}: ...}}"))
        kwargs["context"] = labels(kwargs.get("context"))  # checked here, not per call
        if kwargs.get("pipeline") is not None:  # a config (dict, Config, YAML/JSON path) as the adapters take it
            kwargs["pipeline"] = pipeline_of(kwargs["pipeline"], "RoutedChatModel")
        super().__init__(**kwargs)

    @property
    def _llm_type(self) -> str:
        return "router-middleware"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider=ROUTED, ls_model_name=kwargs.get("model", self.model),
                                 ls_model_type="chat")
        if self.temperature is not None:
            params["ls_temperature"] = self.temperature
        if max_tokens := kwargs.get("max_tokens", self.max_tokens):
            params["ls_max_tokens"] = max_tokens
        if stop := stop or self.stop:
            params["ls_stop"] = stop
        return params

    def _pipeline(self) -> Pipeline:
        if self.pipeline is not None:
            return self.pipeline
        if self._default_pipeline is None:
            self._default_pipeline = Pipeline.from_config({})
        return self._default_pipeline

    def _sent_as_given(self, messages: Sequence[BaseMessage], request: Mapping[str, Any]) -> bool:
        """Is this call RouterAgentMiddleware's attempt (:func:`.made_through`: the model it handed the
        handler, or one swapped in on its pipeline or one of the same config), which the middleware
        routes, retries and records itself? Then it is sent as given (:meth:`.Pipeline.send`: no second
        routing, retries, row or budget charge), unless it names a route of this model's own pipeline
        (an alias, ``auto``), which only the pipeline can resolve (then it is a routed call of its own,
        with no telemetry of its own: :func:`_recorded_outside`). Another model call made with the
        attempt's messages on a pipeline of its own (a guard's judge) is a call of its own, admitted
        and recorded there."""
        return made_through(self, self._pipeline(), messages) and not self.routes(str(request["model"]))

    def routes(self, model: str | None = None) -> bool:
        """Does ``model`` (this model's own by default) name a route only its pipeline resolves: an
        alias of its config (with or without a ``:floor``/``:nitro`` suffix), or ``auto``?"""
        routing = self._pipeline().config.routing
        name = routing.split_route(self.model if model is None else model)[0]
        return name == "auto" or name in routing.aliases

    def _sender(self, messages: Sequence[BaseMessage], request: Mapping[str, Any]) -> Callable[..., Any]:
        pipeline = self._pipeline()
        return pipeline.send if self._sent_as_given(messages, request) else pipeline.completion

    def _asender(self, messages: Sequence[BaseMessage], request: Mapping[str, Any]) -> Callable[..., Awaitable[Any]]:
        pipeline = self._pipeline()
        return pipeline.asend if self._sent_as_given(messages, request) else pipeline.acompletion

    def _request(self, messages: Sequence[BaseMessage], stop: list[str] | None, metadata: Mapping[str, Any] | None,
                 kwargs: dict[str, Any]) -> dict[str, Any]:
        """Pipeline keyword arguments: the model's settings, then the call's (the call's win)."""
        kwargs = dict(kwargs)
        kwargs.pop("ls_structured_output_format", None)
        handed = kwargs.pop(_RUN_METADATA, None)  # the run's metadata (and thread), where no callback manager
        metadata = {**(handed or {}), **(metadata or {})}  # holds it, or holds no configurable thread
        context = {**self.context, **labels(kwargs.pop("context", None))}
        session = self.session_id or metadata.get("thread_id") or metadata.get("session_id")
        if session and "session_id" not in context:
            context["session_id"] = str(session)
        model = kwargs.pop("model", None) or planned_target(self) or self.model  # the middleware's planned one
        request: dict[str, Any] = {"model": model, "messages": to_openai(messages), "context": context}
        settings = {"temperature": self.temperature, "max_tokens": self.max_tokens, "timeout": self.timeout,
                    "stop": stop or self.stop, "max_retries": self.max_retries, "api_base": self.api_base,
                    "api_key": self.api_key.get_secret_value() if self.api_key else None}
        request.update({k: v for k, v in settings.items() if v is not None})
        if "tool_choice" in kwargs:
            kwargs["tool_choice"] = tool_choice(kwargs["tool_choice"])
        request.update(self.model_kwargs)
        request.update(kwargs)
        return request

    # langchain-core (1.8.3) calls ``_stream`` without the run's callback manager, which holds its
    # metadata (the session), from ``stream``/``astream`` and from ``invoke`` on a streaming model: the
    # public entry points hand the run's metadata down to it as a keyword the request never sends.

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        return super().invoke(input, config, stop=stop, **_with_run_metadata(config, kwargs))

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                      stop: list[str] | None = None, **kwargs: Any) -> AIMessage:
        return await super().ainvoke(input, config, stop=stop, **_with_run_metadata(config, kwargs))

    def stream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
               stop: list[str] | None = None, **kwargs: Any) -> Iterator[AIMessageChunk]:
        return super().stream(input, config, stop=stop, **_with_run_metadata(config, kwargs))

    def astream(self, input: LanguageModelInput, config: RunnableConfig | None = None, *,
                stop: list[str] | None = None, **kwargs: Any) -> AsyncIterator[AIMessageChunk]:
        return super().astream(input, config, stop=stop, **_with_run_metadata(config, kwargs))

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        kwargs.pop(_RUN_METADATA, None)  # not a parameter: kept out of traces and LangChain's cache key
        return super()._get_invocation_params(stop=stop, **kwargs)

    def _get_llm_string(self, stop: list[str] | None = None, **kwargs: Any) -> str:
        """LangChain's cache key of the model's settings (its global LLM cache, ``set_llm_cache``), with
        what else changes the answer: ``api_base``, its own ``stop`` and ``model_kwargs``, hashed (two
        models told apart only by them shared entries)."""
        kwargs.pop(_RUN_METADATA, None)
        found = super()._get_llm_string(stop=stop, **kwargs)
        sends = {k: v for k, v in (("api_base", self.api_base), ("stop", self.stop),
                                   ("model_kwargs", self.model_kwargs)) if v}
        if not sends:
            return found
        try:  # hashed: a key in them stays out of the cache's keys
            keyed = json.dumps(key_value(sends), sort_keys=True, default=str)
            return f"{found}---{hashlib.sha256(keyed.encode()).hexdigest()}"
        except Unkeyable:  # a value with no state to key: this model's own entries (never another's answer)
            return f"{found}---unkeyable-{self._own_key}"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import generate_from_stream

            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        request = self._request(messages, stop, _metadata(run_manager), kwargs)
        with _recorded_outside(messages):
            response = self._sender(messages, request)(**request)
        return _result(to_ai_message(response, outcome(response)))

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        if self.streaming:
            from langchain_core.language_models.chat_models import agenerate_from_stream

            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        request = self._request(messages, stop, _metadata(run_manager), kwargs)
        with _recorded_outside(messages):
            response = await self._asender(messages, request)(**request)
        return _result(to_ai_message(response, outcome(response)))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        request = {**self._request(messages, stop, _metadata(run_manager), kwargs), "stream": True}
        with _recorded_outside(messages):
            stream = self._sender(messages, request)(**request)
        for chunk in stream:
            if (generation := _generation(chunk)) is not None:
                if run_manager is not None:
                    run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        yield ChatGenerationChunk(message=final_chunk(outcome(stream)))

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        request = {**self._request(messages, stop, _metadata(run_manager), kwargs), "stream": True}
        with _recorded_outside(messages):
            stream = await self._asender(messages, request)(**request)
        async for chunk in stream:
            if (generation := _generation(chunk)) is not None:
                if run_manager is not None:
                    await run_manager.on_llm_new_token(generation.text, chunk=generation)
                yield generation
        yield ChatGenerationChunk(message=final_chunk(outcome(stream)))

    def bind_tools(
        self, tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool], *,
        tool_choice: str | bool | dict[str, Any] | None = None, strict: bool | None = None, **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any format ``convert_to_openai_tool`` takes); ``tool_choice`` as LangChain spells it
        (``"any"``, a tool name, ``"auto"``, ``"none"``) or OpenAI's; ``strict`` on each function, as
        ChatOpenAI sends it (a top-level ``strict`` is no request field: OpenAI answers 400)."""
        formatted = [_with_mark(convert_to_openai_tool(t, strict=strict), t) for t in tools]
        if tool_choice is not None and tool_choice is not False:
            kwargs["tool_choice"] = tool_choice
        return self.bind(tools=formatted, **kwargs)

    def with_structured_output(self, schema: dict[str, Any] | type | None = None, *, include_raw: bool = False,
                               method: str = "function_calling", strict: bool | None = None,
                               **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """``method``: ``"function_calling"`` (a forced tool call, the default), ``"json_schema"`` (the
        schema as ``response_format``; a pydantic model's strict unless ``strict=False``, as ChatOpenAI
        and ChatLiteLLM send it, a dict's ``strict`` as given) or ``"json_mode"`` (``response_format``
        ``{"type": "json_object"}``: the prompt describes the schema), as ChatOpenAI takes them;
        langchain-core's default would drop ``method`` and ``strict`` and force a tool call anyway."""
        if kwargs:
            raise ValueError(f"Received unsupported arguments {kwargs}")
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ValueError(f"with_structured_output: unsupported method={method!r}; "
                             "use 'function_calling', 'json_schema' or 'json_mode'")
        if schema is None and method != "json_mode":
            raise ValueError(f"with_structured_output: method={method!r} needs a schema")
        pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        traced = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        parser: Runnable[Any, Any]
        if method == "function_calling":
            assert schema is not None
            llm = self.bind_tools([schema], tool_choice="any", strict=strict, ls_structured_output_format=traced)
            if pydantic:
                parser = PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
            else:
                parser = JsonOutputKeyToolsParser(key_name=convert_to_openai_tool(schema)["function"]["name"],
                                                  first_tool_only=True)
        else:
            if method == "json_schema" and pydantic and strict is not False:
                response_format: dict[str, Any] = _strict_response_format(schema)  # type: ignore[arg-type]
            elif method == "json_schema":
                function = convert_to_openai_function(schema, strict=strict)  # type: ignore[arg-type]
                json_schema = {"name": function["name"], "schema": function["parameters"]}
                if function.get("description"):
                    json_schema["description"] = function["description"]
                if strict is not None:
                    json_schema["strict"] = strict
                response_format = {"type": "json_schema", "json_schema": json_schema}
            else:
                response_format = {"type": "json_object"}
            llm = self.bind(response_format=response_format, ls_structured_output_format=traced)
            parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()  # type: ignore[arg-type]
        if not include_raw:
            return llm | parser
        parsed = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")


def _strict_response_format(schema: type) -> dict[str, Any]:
    """A pydantic model's ``response_format`` as ChatOpenAI sends it (and litellm makes it from the model):
    strict, every field required, ``additionalProperties: false``; ChatLiteLLM too asks for strict."""
    from litellm.llms.base_llm.base_utils import type_to_response_format_param

    response_format = type_to_response_format_param(schema)
    assert response_format is not None
    return response_format


def _with_mark(formatted: dict[str, Any], tool: Any) -> dict[str, Any]:
    """``formatted`` with the ``cache_control`` a tool carries in its ``extras`` (an Anthropic
    breakpoint marked as for ChatAnthropic), which LangChain's conversion leaves out."""
    mark = (getattr(tool, "extras", None) or {}).get("cache_control") if isinstance(tool, BaseTool) else None
    return {**formatted, "cache_control": mark} if mark else formatted


def _recorded_outside(messages: Sequence[BaseMessage]) -> AbstractContextManager[None]:
    """A call with the middleware's attempt's messages (through the model it handed the handler, one a
    middleware inside swapped in, or a guard's) has no telemetry of its own: the middleware's call
    records the attempt's spans, metrics and log lines (:func:`.within_attempt`)."""
    return within_attempt() if is_attempt(messages) else nullcontext()


_RUN_METADATA = "_router_run_metadata"


def _metadata(run_manager: Any) -> Mapping[str, Any] | None:
    return getattr(run_manager, "metadata", None)


def _with_run_metadata(config: RunnableConfig | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` and the run's metadata (``config``'s, or the enclosing runnable's), with the
    ``thread_id`` of its ``configurable`` where the metadata names none (a LangGraph run copies it
    there; langchain-core does not, for a bare model or an LCEL chain)."""
    found = ensure_config(config)
    metadata = found.get("metadata") or {}
    thread = (found.get("configurable") or {}).get("thread_id")
    if thread is not None and "thread_id" not in metadata:
        metadata = {**metadata, "thread_id": thread}
    return {**kwargs, _RUN_METADATA: metadata} if metadata else kwargs


def _generation(chunk: Any) -> ChatGenerationChunk | None:
    message = to_chunk(chunk)
    return ChatGenerationChunk(message=message) if message is not None else None


def _result(message: AIMessage) -> ChatResult:
    return ChatResult(generations=[ChatGeneration(message=message)],
                      llm_output={"model_name": message.response_metadata.get("model_name")})


@functools.cache
def _accepted(cls: type[RoutedChatModel]) -> tuple[str, ...]:
    """The arguments ``cls`` takes: its fields (a subclass's own included) and their aliases."""
    return tuple(dict.fromkeys(name for key, field in cls.model_fields.items() for name in (key, field.alias) if name))
