"""Between LangChain messages and litellm's OpenAI-format requests and responses, and our Outcome."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    convert_to_openai_messages,
    message_to_dict,
    messages_from_dict,
)
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata, add_ai_message_chunks
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk
from langchain_core.tracers.context import register_configure_hook

from ..catalog import Catalog, provider_named
from ..errors import OutcomeUnavailable
from ..memo import MessageMemo
from ..pricing import price
from ..types import AgentContext, Outcome, Plan, Usage
from ..usage import count_in

ROUTED = "router_middleware"  # RoutedChatModel's ``ls_provider``: its calls are accounted by its pipeline
_ATTEMPT: ContextVar[BaseMessage | None] = ContextVar("router_middleware_attempt", default=None)
# the attempt's model, the middleware's pipeline, and the target planned for the agent's own model
_THROUGH: ContextVar[tuple[Any, Any, str | None] | None] = ContextVar("router_middleware_attempt_model", default=None)


class AttemptRuns(BaseCallbackHandler):
    """What langchain-core tells the handlers of RouterAgentMiddleware's attempt's model runs (those
    whose messages end with ``last``): the chunks the last one streamed, when it started, whether
    (and when) it failed or answered, and whether any answered. Added to each run made while the
    attempt is (see :func:`attempt`). A run that starts after the last one failed, or answered (a
    retry: something after the model raised), first hands this to ``retried``, which reads what
    that run used."""

    run_inline = True  # in the run's own thread, in order
    raise_error = False

    def __init__(self, last: BaseMessage | None, retried: Callable[[AttemptRuns], None] | None = None) -> None:
        self.last = last
        self.retried = retried
        self.run: UUID | None = None
        self.chunks: list[AIMessageChunk] = []
        self.started = 0.0  # the last run's start (time.perf_counter())
        self.first_token: float | None = None
        self.error: BaseException | None = None  # the last run's, if it failed
        self.ended, self.ended_ns = 0.0, 0  # when the last run failed or answered (perf_counter, time_ns)
        self.answered = False
        self.answer: AIMessage | None = None  # the last run's answer, once it answered
        self.began = False  # whether any chat model run began while the attempt was (its own, or not)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *,
                            run_id: UUID, **kwargs: Any) -> None:
        self.began = True  # a middleware inside may have rebuilt the messages: not recognised, but made
        if self.last is not None and messages and messages[0] and messages[0][-1] is self.last:
            if self.retried is not None and (isinstance(self.error, Exception) or self.answer is not None):
                self.retried(self)
            self.run, self.chunks, self.first_token, self.error, self.answer = run_id, [], None, None, None
            self.started = time.perf_counter()

    def on_llm_new_token(self, token: Any, *, run_id: UUID, chunk: Any = None, **kwargs: Any) -> None:
        message = getattr(chunk, "message", None)
        if run_id == self.run and isinstance(message, AIMessageChunk):
            self.chunks.append(message)
            self.first_token = self.first_token or time.perf_counter()

    def on_llm_end(self, response: Any, *, run_id: UUID, **kwargs: Any) -> None:
        if run_id == self.run:
            self.answered, self.ended, self.ended_ns = True, time.perf_counter(), time.time_ns()
            generations = getattr(response, "generations", None)
            message = getattr(generations[0][0], "message", None) if generations and generations[0] else None
            self.answer = message if isinstance(message, AIMessage) else None

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        if run_id == self.run:
            self.error, self.ended, self.ended_ns = error, time.perf_counter(), time.time_ns()

    def partial(self) -> AIMessage | None:
        """What the last run used, for an attempt that raised: its answer, if it answered (something
        after the model raised: its output not parsed, an interrupt); else what it streamed, merged
        (its usage, if any, marked as estimated, as for a stream cut short); else ``None``."""
        if self.answer is not None:
            return self.answer
        if not self.chunks:
            return None
        merged = add_ai_message_chunks(self.chunks[0], *self.chunks[1:])
        return merged.model_copy(update={"response_metadata": {**merged.response_metadata,
                                                               "usage_source": "estimated"}})


_RUNS: ContextVar[AttemptRuns | None] = ContextVar("router_middleware_attempt_runs", default=None)
register_configure_hook(_RUNS, inheritable=False)


@contextmanager
def attempt(request_messages: Sequence[BaseMessage], retried: Callable[[AttemptRuns], None] | None = None,
            model: Any = None, pipeline: Any = None, target: str | None = None) -> Iterator[AttemptRuns]:
    """RouterAgentMiddleware makes an attempt with ``request_messages`` through ``model`` (the chat
    model it hands the handler, unwrapped) on ``pipeline`` (``target``: what the agent's own model is
    to send, see :func:`planned_target`): the model call inside whose messages end with the same
    message object is that attempt (see :func:`is_attempt`; :func:`made_through`: by whom); what its
    runs report is gathered in the :class:`AttemptRuns` yielded (``retried``: see there)."""
    last = request_messages[-1] if request_messages else None
    runs = AttemptRuns(last, retried)
    token, collecting, through = _ATTEMPT.set(last), _RUNS.set(runs), _THROUGH.set((model, pipeline, target))
    try:
        yield runs
    finally:
        _THROUGH.reset(through)
        _RUNS.reset(collecting)
        _ATTEMPT.reset(token)


def made_through(model: Any, pipeline: Any, messages: Sequence[BaseMessage]) -> bool:
    """Whether ``model`` (on ``pipeline``) called with ``messages`` makes RouterAgentMiddleware's
    attempt, which the middleware records: it is the model the middleware handed the handler, or one a
    middleware inside swapped in on the middleware's pipeline, or on one of the same config; not
    another call made with the attempt's messages on a pipeline of its own (a guard's judge)."""
    through = _THROUGH.get()
    if through is None or not is_attempt(messages):
        return False
    held, ours, _ = through
    return held is model or ours is pipeline or (ours is not None and ours.config == pipeline.config)


def planned_target(model: Any) -> str | None:
    """The target the middleware planned for the attempt ``model`` makes, where it is the agent's own
    model (not one of ``models``, which are each their target's); ``None`` otherwise."""
    through = _THROUGH.get()
    return through[2] if through is not None and through[0] is model else None


def is_attempt(messages: Sequence[BaseMessage]) -> bool:
    """Whether a chat model called with ``messages`` makes RouterAgentMiddleware's attempt (which
    records it), not another model call made meanwhile (a guard, a tool selector)."""
    last = _ATTEMPT.get()
    return last is not None and bool(messages) and messages[-1] is last


def accounted(metadata: Mapping[str, Any], messages: Sequence[BaseMessage]) -> bool:
    """Whether the chat model run with ``metadata`` and ``messages`` is accounted already: a
    RoutedChatModel's (by its pipeline), or RouterAgentMiddleware's attempt."""
    return metadata.get("ls_provider") == ROUTED or is_attempt(messages)


# (a pydantic field read from __dict__: getattr of an absent one costs an AttributeError in pydantic)
_CONVERTED = MessageMemo(parts=lambda message: (message.content, message.__dict__.get("tool_calls")))


def to_openai_once(message: BaseMessage) -> list[dict[str, Any]]:
    """:func:`to_openai` of one message (one dict, or several for tool_result blocks in a user turn),
    kept while an agent resends the same message object with the same content and tool calls (its
    state keeps them from step to step). The dicts are shared: never change them."""
    found: list[dict[str, Any]] | None = _CONVERTED.get(message)
    if found is None:
        found = to_openai([message])
        _CONVERTED.put(message, found)
    return found


def to_openai(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages as OpenAI chat messages (tool calls, tool results, names and parts kept,
    the ``cache_control`` breakpoints of text blocks: see :func:`_with_breakpoints`, and an assistant
    turn's ``reasoning_content`` and ``thinking_blocks``: see :func:`_with_reasoning`)."""
    if not any(_breakpoints(m) or _reasoning(m) for m in messages):
        return _converted(messages)
    out: list[dict[str, Any]] = []
    for message in messages:
        converted = _with_breakpoints(message, _converted([message])) if _breakpoints(message) \
            else _converted([message])
        out += _with_reasoning(message, converted)
    return out


_REASONING = ("reasoning_content", "thinking_blocks")  # what litellm reads back from an assistant turn


def _reasoning(message: BaseMessage) -> dict[str, Any]:
    if not isinstance(message, AIMessage):
        return {}
    return {key: value for key in _REASONING if (value := message.additional_kwargs.get(key))}


def _with_reasoning(message: BaseMessage, converted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``converted`` with the ``reasoning_content`` and Anthropic's signed ``thinking_blocks`` an assistant
    turn carries (as RoutedChatModel and ChatLiteLLM return them), which langchain-core's conversion
    leaves out: DeepSeek with thinking on refuses (a 400) a tool call passed back without its reasoning,
    Anthropic a tool_use turn without its thinking block; litellm sends both back."""
    reasoning = _reasoning(message)
    if not reasoning or len(converted) != 1:
        return converted
    return [{**converted[0], **reasoning}]


def _converted(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    converted = convert_to_openai_messages(list(messages))
    return [converted] if isinstance(converted, dict) else list(converted)


def _breakpoints(message: BaseMessage) -> bool:
    content = message.content
    return isinstance(content, list) and any(isinstance(b, dict) and "cache_control" in b for b in content)


def _with_breakpoints(message: BaseMessage, converted: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``converted`` with the ``cache_control`` of ``message``'s text blocks put back on its text parts
    (langchain-core's conversion keeps only a text block's text, or joins the texts into one string:
    an Anthropic breakpoint marked as for ChatAnthropic would be lost). Left as converted where the
    text parts do not match the text blocks one to one (a user turn split into tool results)."""
    texts = [b if isinstance(b, dict) else {"type": "text", "text": b} for b in message.content
             if isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text")]
    if len(converted) != 1:
        return converted
    (found,) = converted
    content = found.get("content")
    if isinstance(content, str):
        if content != "\n".join(t["text"] for t in texts):
            return converted
        parts = [{"type": "text", "text": t["text"]} for t in texts]
    elif isinstance(content, list):
        parts = list(content)
    else:
        return converted
    slots = [i for i, p in enumerate(parts) if isinstance(p, dict) and p.get("type") == "text"]
    if len(slots) != len(texts):
        return converted
    for i, text in zip(slots, texts, strict=True):
        if "cache_control" in text:
            parts[i] = {**parts[i], "cache_control": text["cache_control"]}
    return [{**found, "content": parts}]


def labels(context: AgentContext | Mapping[str, Any] | None) -> dict[str, Any]:
    """The labels ``context`` sets, checked as ``Pipeline.completion`` checks them (a bad or unknown one
    raises ``RequestError`` naming it)."""
    return {name: value for name, value in asdict(AgentContext.coerce(context)).items() if value not in (None, ())}


def usage_metadata(usage: Usage) -> UsageMetadata:
    """Our usage in LangChain's convention (input includes cache reads and writes; output includes reasoning)."""
    return UsageMetadata(
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens, total_tokens=usage.total_tokens,
        input_token_details=InputTokenDetails(cache_read=usage.cache_read_tokens,
                                              cache_creation=usage.cache_write_tokens),
        output_token_details=OutputTokenDetails(reasoning=usage.reasoning_tokens),
    )


def response_metadata(result: Outcome) -> dict[str, Any]:
    """What LangChain tracers read (``model_name``: the model that answered), plus cost and routing."""
    metadata: dict[str, Any] = {"model_name": result.model, "model_provider": result.provider or "litellm"}
    if result.finish_reasons:
        metadata["finish_reason"] = result.finish_reasons[0]
    if result.response_id:
        metadata["id"] = result.response_id
    metadata["cost_usd"] = result.cost.total_usd
    metadata["cost_source"] = result.cost.source
    metadata["usage_source"] = result.usage.source  # ``estimated``: litellm's count, not the provider's report
    if result.time_to_first_token_s is not None:  # a stream's: the agent middleware cannot see its chunks
        metadata["time_to_first_token_s"] = result.time_to_first_token_s
    if result.plan is not None:
        metadata["requested_model"] = result.plan.call.model
        metadata["routed_model"] = result.plan.model
        metadata["decisions"] = [f"{d.policy}:{d.action}" for d in result.plan.decisions]
    return metadata


def _tool_calls(raw: Sequence[Any] | None) -> tuple[list[Any], list[Any]]:
    calls, invalid = [], []
    for item in raw or ():
        function = item.function
        arguments = function.arguments or "{}"
        try:
            args = json.loads(arguments)
            if not isinstance(args, dict):
                raise ValueError("arguments are not an object")
            calls.append(tool_call(name=function.name or "", args=args, id=item.id))
        except ValueError as exc:
            invalid.append(invalid_tool_call(name=function.name, args=arguments, id=item.id, error=str(exc)))
    return calls, invalid


def to_ai_message(response: Any, result: Outcome) -> AIMessage:
    """The answer as an AIMessage with no id of its own, as ChatOpenAI's: LangChain gives it the run's
    (the provider's id, which some servers repeat, is ``response_metadata["id"]``; as the message's id,
    LangGraph's ``add_messages`` replaced an earlier turn that had the same)."""
    return _ai_message(response, usage_metadata=usage_metadata(result.usage),
                       response_metadata=response_metadata(result))


def _ai_message(response: Any, **fields: Any) -> AIMessage:
    message = response.choices[0].message
    calls, invalid = _tool_calls(getattr(message, "tool_calls", None))
    extra: dict[str, Any] = {}
    reasoning = getattr(message, "reasoning_content", None)
    if reasoning:
        extra["reasoning_content"] = reasoning
    blocks = getattr(message, "thinking_blocks", None)  # Anthropic's, signed: the next turn sends them back
    if blocks:
        extra["thinking_blocks"] = [dict(block) for block in blocks]
    return AIMessage(content=message.content or "", tool_calls=calls, invalid_tool_calls=invalid,
                     additional_kwargs=extra, **fields)


def to_completion(message: AIMessage, result: Outcome) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """An agent model's answer for the response cache: as an OpenAI chat completion (what every hit is
    checked and replayed as), and as LangChain's own dict of it (what a hit of the agent's serves:
    content blocks, thinking signatures and provider fields as the model gave them); ``None`` for an
    answer with a tool call that did not parse, or a field JSON would read back otherwise (a tuple, a
    key that is no string). Raises for a field JSON cannot write."""
    if message.invalid_tool_calls:
        return None
    native = message_to_dict(message.model_copy(update={"usage_metadata": None}))
    if json.loads(json.dumps(native)) != native:  # a tuple, a key that is no string: read back otherwise
        return None  # (what JSON cannot write at all raises): no entry, rather than a hit that differs
    calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": json.dumps(c["args"])}}
             for c in message.tool_calls]
    answer: dict[str, Any] = {"role": "assistant", "content": message.text}
    if calls:
        answer["tool_calls"] = calls
    usage = result.usage
    completion = {
        "id": result.response_id or message.id or "", "object": "chat.completion", "created": int(time.time()),
        "model": result.model,
        "choices": [{"index": 0, "message": answer,
                     "finish_reason": result.finish_reasons[0] if result.finish_reasons else
                     ("tool_calls" if calls else "stop")}],
        "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens,
                  "total_tokens": usage.total_tokens,
                  "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
                  "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens}},
    }
    return completion, native


def cached_answer(response: Any, native: Any) -> AIMessage:
    """A response-cache entry as the agent's model answer: the message as it was stored, else rebuilt
    from the chat completion. Raises for an entry that does not read as one (a miss, not a failed call)."""
    if not isinstance(native, Mapping):
        return _ai_message(response)
    message = messages_from_dict([dict(native)])[0]
    if not isinstance(message, AIMessage):
        raise ValueError(f"the cached answer is a {type(message).__name__}, not an AIMessage")
    return message


def served_answer(message: AIMessage, result: Outcome) -> AIMessage:
    """A hit's answer with the hit's usage (none consumed) and metadata, and no id (the stored answer's
    may be in another thread's history): the run that plays it back gives it its own (:mod:`.replay`)."""
    return message.model_copy(update={"id": None, "usage_metadata": usage_metadata(result.usage),
                                      "response_metadata": {**message.response_metadata, **response_metadata(result)}})


def to_chunk(chunk: Any) -> AIMessageChunk | None:
    """A litellm stream chunk as a LangChain chunk (text, reasoning, tool-call fragments); usage is
    left to the final chunk built from the Outcome, so it is counted once."""
    if not chunk.choices:
        return None
    delta = chunk.choices[0].delta
    fragments = [
        tool_call_chunk(name=c.function.name if c.function else None,
                        args=c.function.arguments if c.function else None, id=c.id, index=c.index)
        for c in (getattr(delta, "tool_calls", None) or ())
    ]
    extra: dict[str, Any] = {}
    reasoning = getattr(delta, "reasoning_content", None)
    if reasoning:
        extra["reasoning_content"] = reasoning
    blocks = getattr(delta, "thinking_blocks", None)  # fragments with litellm's block index: merged by it
    if blocks:
        extra["thinking_blocks"] = [dict(block) for block in blocks]
    content = getattr(delta, "content", None) or ""
    if not content and not fragments and not extra:
        return None
    return AIMessageChunk(content=content, tool_call_chunks=fragments, additional_kwargs=extra)


def final_chunk(result: Outcome) -> AIMessageChunk:
    return AIMessageChunk(content="", usage_metadata=usage_metadata(result.usage),
                          response_metadata=response_metadata(result), chunk_position="last")


def tool_choice(choice: Any) -> Any:
    """LangChain's tool_choice values in OpenAI's format."""
    if choice in (None, "auto", "none", "required"):
        return choice
    if choice in ("any", True):
        return "required"
    if isinstance(choice, str):
        return {"type": "function", "function": {"name": choice}}
    if isinstance(choice, Mapping):
        return dict(choice)
    raise ValueError(f"tool_choice: unsupported value {choice!r}")


def usage_from_message(message: Any, estimate: int | Callable[[], int], model: str | None = None) -> Usage:
    """A LangChain message's ``usage_metadata`` as our Usage (same conventions); without it, an estimate:
    ``estimate`` for the prompt (or what counts it, called only then) and what the message said
    counted with ``model``'s tokenizer (a quarter of its characters without one). Reported by the
    provider unless the message says it is an estimate (a RoutedChatModel's
    ``response_metadata["usage_source"]``, as for a stream that sent no usage)."""
    metadata = getattr(message, "usage_metadata", None)
    if not metadata:
        text = _said(message)
        prompt = estimate() if callable(estimate) else estimate
        if model is None:
            return Usage(prompt, max(1, len(text) // 4), source="estimated")
        from ..tokens import encoder_for

        return Usage(prompt, max(1, encoder_for(model)(text)), source="estimated")
    estimated = (getattr(message, "response_metadata", None) or {}).get("usage_source") == "estimated"
    inputs = metadata.get("input_token_details") or {}
    outputs = metadata.get("output_token_details") or {}
    return Usage(count_in(metadata, "input_tokens"), count_in(metadata, "output_tokens"),
                 count_in(inputs, "cache_read"), count_in(inputs, "cache_creation"),
                 count_in(outputs, "reasoning"), source="estimated" if estimated else "provider")


def _said(message: Any) -> str:
    """What an answer said, as its output is counted without a report: its text and reasoning, and
    its tool calls as litellm counts them in a stream it assembles (each call's JSON), so a stream cut
    mid tool call counts on the agent's paths as through ``Pipeline.completion`` (LangChain's chunks
    carry the calls apart from the text, which alone counted: 1 token)."""
    content = getattr(message, "content", "") or ""
    parts = [content] if isinstance(content, str) else [_block_text(block) for block in content]
    reasoning = (getattr(message, "additional_kwargs", None) or {}).get("reasoning_content")
    reasoned = not isinstance(content, str) and any(
        isinstance(block, Mapping) and block.get("type") in ("reasoning", "thinking") for block in content)
    if isinstance(reasoning, str) and not reasoned:  # a v1 message holds it in a block as well
        parts.append(reasoning)
    fragments = getattr(message, "tool_call_chunks", None)  # a chunk's calls, valid or not, are read from them
    unparsed = fragments or getattr(message, "invalid_tool_calls", None) or ()
    calls = [] if fragments else [(c.get("id"), c["name"], json.dumps(c["args"]))
                                  for c in getattr(message, "tool_calls", None) or ()]
    calls += [(c.get("id"), c.get("name") or "", c.get("args") or "") for c in unparsed]
    parts += [json.dumps({"function": {"arguments": args, "name": name}, "id": id_, "type": "function"},
                         separators=(",", ":")) for id_, name, args in calls]  # as litellm counts a call's
    return "".join(parts)


def _block_text(block: Any) -> str:
    """A content block's text as its output is counted: a text, thinking or reasoning block's (LangChain's
    v1 ``reasoning``, the Responses API's ``summary`` parts); a tool call's are counted apart."""
    if not isinstance(block, Mapping):
        return str(block)
    found = block.get("text") or block.get("thinking") or block.get("reasoning")
    if isinstance(found, str):
        return found
    summary = block.get("summary")
    if isinstance(summary, list):
        return "".join(str(part.get("text") or "") for part in summary if isinstance(part, Mapping))
    return ""


def _answered(message: Any) -> tuple[Mapping[str, Any], str, tuple[str, ...]]:
    """A chat model's answer's ``response_metadata``, the model it names (``""`` if none) and its
    finish reasons (LangChain's providers say ``finish_reason`` or ``stop_reason``)."""
    metadata: Mapping[str, Any] = getattr(message, "response_metadata", None) or {}
    finish = metadata.get("finish_reason") or metadata.get("stop_reason")
    return metadata, str(metadata.get("model_name") or metadata.get("model") or ""), (str(finish),) if finish else ()


def _response_id(message: Any, metadata: Mapping[str, Any]) -> str | None:
    """The provider's id of an answer: its ``response_metadata["id"]`` (ChatOpenAI's, a
    RoutedChatModel's), else the message's own unless LangChain gave it (a run's ``lc_run-``/``run-``)."""
    given = metadata.get("id")
    if isinstance(given, str) and given:
        return given
    own = getattr(message, "id", None)
    return own if isinstance(own, str) and own and not own.startswith(("lc_run-", "run-")) else None


def message_outcome(message: Any, catalog: Catalog) -> Outcome:
    """The Outcome of a chat model's answer (:func:`router_middleware.outcome` of a LangChain message):
    its ``usage_metadata``, priced with ``catalog`` as the model its ``response_metadata`` names, or
    at the provider's own figure where the message carries one (``cost_source`` ``provider_reported``,
    a RoutedChatModel's). Raises :class:`.OutcomeUnavailable` for a message without usage."""
    if not getattr(message, "usage_metadata", None):
        raise OutcomeUnavailable(f"{type(message).__name__} carries no usage_metadata: pass a chat model's answer")
    metadata, model, finish = _answered(message)
    reported = metadata.get("cost_usd") if metadata.get("cost_source") == "provider_reported" else None
    usage = usage_from_message(message, 0)
    return Outcome(model=model, provider=metadata.get("model_provider"), usage=usage,
                   cost=price(usage, catalog.resolve(model) if model else None,
                              reported_usd=float(reported) if isinstance(reported, int | float) else None),
                   response_id=_response_id(message, metadata), finish_reasons=finish,
                   time_to_first_token_s=metadata.get("time_to_first_token_s"))


def outcome_from_message(message: Any, plan: Plan, pipeline: Any, provider: str | None, started: float,
                         first_token: float | None = None) -> Outcome:
    """The Outcome of a call some LangChain chat model made for ``plan``, priced with the pipeline's catalog
    (``provider``, else the one the message names); its time to first token is ``first_token``'s, else
    the one the message says (a RoutedChatModel's stream), else unknown."""
    metadata, named, finish = _answered(message)
    provider = provider or metadata.get("model_provider")
    model = provider_named(named or plan.model, provider)  # a stream cut before a chunk named it: the target's
    usage = usage_from_message(message, lambda: pipeline.state.request_tokens(plan), model)  # counted if need be
    info = pipeline.catalog.resolve(model) or pipeline.catalog.resolve(plan.model)
    return Outcome(model=model, provider=provider, usage=usage,
                   cost=price(usage, info), plan=plan,
                   response_id=_response_id(message, metadata), finish_reasons=finish,
                   latency_s=time.perf_counter() - started,
                   time_to_first_token_s=(first_token - started) if first_token
                   else metadata.get("time_to_first_token_s"))
