"""A history another provider wrote goes to a target that takes it, whether the router picked it or
the caller named it, as a direct call sends it. Histories are built from the real recordings in cassettes/ (an
Anthropic tool-call reply, an Anthropic thinking reply, an OpenAI reply with ``annotations``); each
body is read on the wire through the loopback capture server and compared with what a direct
``litellm.completion`` to the same model sends."""

from __future__ import annotations

from typing import Any

import litellm
import pytest
import vcr

from router_middleware import Pipeline

from .capture_server import capture_server
from .cassette_data import completion_kwargs, interactions
from .conftest import CASSETTES

replayer = vcr.VCR(record_mode="none", decode_compressed_response=True)
KEYS = {"OPENAI_API_KEY": "k", "MISTRAL_API_KEY": "k", "GROQ_API_KEY": "k", "DEEPSEEK_API_KEY": "k",
        "GEMINI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"}


@pytest.fixture(autouse=True)
def _keys(monkeypatch) -> None:
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def _reply(name: str) -> tuple[dict[str, Any], Any]:
    """The request recorded in ``cassettes/<name>.yaml`` and litellm's reply message to it (replayed)."""
    item = interactions(CASSETTES / f"{name}.yaml")[0]
    kwargs = completion_kwargs(item)
    with replayer.use_cassette(str(CASSETTES / f"{name}.yaml"), allow_playback_repeats=True):
        return kwargs, litellm.completion(**kwargs).choices[0].message


def history() -> tuple[list[Any], list[dict[str, Any]]]:
    """An agent's history as it appends replies: Anthropic's tool calls (``toolu_`` ids), their results,
    then an OpenAI reply (``annotations: []``) dumped as a dict; and the tools."""
    asked, calls = _reply("anthropic_tools")
    _, answer = _reply("openai_chat_reasoning")
    messages: list[Any] = [*asked["messages"], calls]
    messages += [{"role": "tool", "tool_call_id": c.id, "name": c.function.name, "content": "sunny, 21C"}
                 for c in calls.tool_calls]
    messages += [{"role": "user", "content": "and how many r's in strawberry?"}, answer.model_dump(),
                 {"role": "user", "content": "thanks; both again, briefly"}]
    return messages, asked["tools"]


def _direct(model: str, messages: list[Any], tools: Any, **params: Any) -> dict[str, Any]:
    """The body ``litellm.completion`` sends for ``model`` without the middleware."""
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017, PT011 - it answers 500
        litellm.completion(model=model, messages=messages, tools=tools, api_base=base, api_key="k",
                           num_retries=0, max_retries=0, **params)
    return bodies[-1]


def _routed(first: str, target: str, messages: list[Any], tools: Any, monkeypatch,
            **params: Any) -> list[dict[str, Any]]:
    """The bodies of a call to alias ``pair``: ``first`` (which fails) then ``target``, which the
    router picks."""
    monkeypatch.setenv("HISTORY_FIT_KEY", "k")
    with capture_server() as (base, bodies):
        deployment = {"api_base": base, "api_key_env": "HISTORY_FIT_KEY"}
        pipeline = Pipeline.from_config({"context": {"enabled": False}, "cache": {"enabled": False}, "routing": {
            "deployments": {"first": {"model": first, **deployment}, "target": {"model": target, **deployment}},
            "aliases": {"pair": ["first", "target"]},
            "fallback": {"attempts_per_model": 1, "backoff_s": 0.0, "max_backoff_s": 0.0}}})
        with pytest.raises(Exception):  # noqa: B017, PT011 - both attempts reach the capture server's 500
            pipeline.completion(model="pair", messages=messages, tools=tools, num_retries=0, max_retries=0,
                                **params)
    assert len(bodies) == 2
    return bodies


def test_the_model_the_caller_named_gets_the_history_as_a_direct_call_sends_it() -> None:
    """Named by the caller, Mistral gets what litellm sends it without the middleware (a history it
    refuses fails there as it would directly); only a target the router picked is fitted."""
    messages, tools = history()
    direct = _direct("mistral/mistral-large-latest", messages, tools)
    with capture_server() as (base, bodies), pytest.raises(Exception):  # noqa: B017, PT011 - it answers 500
        Pipeline.from_config({"context": {"enabled": False}}).completion(
            model="mistral/mistral-large-latest", messages=messages, tools=tools, api_base=base, api_key="k",
            num_retries=0, max_retries=0)
    assert bodies[-1]["messages"] == direct["messages"]


@pytest.mark.parametrize("target", ["anthropic/claude-3-7-sonnet-20250219", "deepseek/deepseek-chat",
                                    "openai/gpt-4o-mini", "gemini/gemini-2.5-flash",
                                    "openrouter/openai/gpt-4o-mini"])
def test_a_target_that_takes_the_history_gets_it_as_a_direct_call_sends_it(target, monkeypatch) -> None:
    """Anthropic's signed thinking going back to Anthropic, ``reasoning_content`` to DeepSeek, and
    whatever litellm already converts or the provider accepts: a picked target gets exactly what a direct
    call sends (the Anthropic thinking reply is recorded; nothing of it is dropped)."""
    messages, tools = history()
    asked, thought = _reply("anthropic_thinking")
    messages = [*messages, *asked["messages"], thought, {"role": "user", "content": "sure?"}]
    params = {"max_tokens": 2048} if target.startswith("anthropic") else {}
    direct = _direct(target, messages, tools, **params)
    _, routed = _routed("mistral/mistral-large-latest", target, messages, tools, monkeypatch, **params)
    assert routed.get("messages", routed.get("contents")) == direct.get("messages", direct.get("contents"))
    assert "thinking" in str(direct) or "reasoning_content" in str(direct) or "thought" in str(direct)
