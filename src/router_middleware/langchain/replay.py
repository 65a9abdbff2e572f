"""A response-cache hit played back as a chat model run, for RouterAgentMiddleware.

A hit is answered without calling the agent's model, so without a run of its own the agent's
callbacks would see nothing: LangGraph's ``stream_mode="messages"`` would get the whole message from
the state and no chunk, ``astream_events`` no ``on_chat_model_*`` event. Played back through
:class:`CachedAnswer` (inheriting the agent's run config, as the model it stands for would), the hit
streams as one chunk where the agent streams, and its message gets the run's id as a live answer does.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from .convert import ROUTED


class CachedAnswer(BaseChatModel):
    """Answers with ``answer``. Its runs say they are accounted (``ls_provider``: the call's lifecycle
    recorded the hit), so a RouterCallbackHandler records no second call. Build it with
    ``disable_streaming=True`` for an answer with a tool call that did not parse (LangChain's merge
    of chunks would parse what it can of it)."""

    answer: AIMessage
    model: str = ""  # the routed model the hit was cached for (what traces name)
    cache: bool | None = False  # never LangChain's global LLM cache: its key would not hold the answer

    @property
    def _llm_type(self) -> str:
        return "router-middleware-cache"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return LangSmithParams(ls_provider=ROUTED, ls_model_name=self.model, ls_model_type="chat")

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self.answer)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        yield ChatGenerationChunk(message=as_chunk(self.answer))  # LangChain's stream() reports it to callbacks

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        yield ChatGenerationChunk(message=as_chunk(self.answer))


def as_chunk(message: AIMessage) -> AIMessageChunk:
    """``message`` as the one and last chunk of a stream, which LangChain merges back into it (its tool
    calls as fragments whose arguments are JSON text)."""
    fragments = [tool_call_chunk(name=call["name"], args=json.dumps(call["args"]), id=call["id"], index=i)
                 for i, call in enumerate(message.tool_calls)]
    fragments += [tool_call_chunk(name=call["name"], args=call["args"], id=call["id"], index=len(fragments) + i)
                  for i, call in enumerate(message.invalid_tool_calls)]
    return AIMessageChunk(content=message.content, additional_kwargs=message.additional_kwargs,
                          response_metadata=message.response_metadata, usage_metadata=message.usage_metadata,
                          id=message.id, tool_call_chunks=fragments, chunk_position="last")
