"""A history another provider wrote, sent to a target the router picked: what litellm still sends that
the target refuses is fitted (Mistral: tool-call ids and OpenAI reply fields; Groq: OpenAI reply
fields), and nothing else changes. Histories are built from the real recordings in cassettes/ (an
Anthropic tool-call reply, an Anthropic thinking reply, an OpenAI reply with ``annotations``); each
body is read on the wire through the loopback capture server and compared with what a direct
``litellm.completion`` to the same model sends."""

from __future__ import annotations

import re
from typing import Any

import litellm
import pytest
import vcr

from router_middleware import Pipeline, outcome

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


def _ids(body: dict[str, Any]) -> list[str]:
    """The tool-call ids of ``body``'s messages in order: each call's, then each result's."""
    out = []
    for message in body["messages"]:
        out += [c["id"] for c in message.get("tool_calls") or []]
        if message.get("role") == "tool":
            out.append(message["tool_call_id"])
    return out


def _without(body: dict[str, Any], fields: set[str]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if not (m["role"] == "assistant" and k in fields)} for m in body["messages"]]


def test_a_fallback_to_mistral_sends_what_a_direct_call_sends_with_ids_and_reply_fields_mistral_takes(
        monkeypatch) -> None:
    """Before, the fallback to Mistral carried Anthropic's ``toolu_...`` ids (Mistral: 400 "Tool call id
    was toolu_... but must be a-z, A-Z, 0-9, with a length of 9") and OpenAI's ``annotations`` (422
    extra_forbidden): the fallback failed where the caller's first model might not have."""
    messages, tools = history()
    direct = _direct("mistral/mistral-large-latest", messages, tools)
    assert any("annotations" in m for m in direct["messages"])  # litellm sends both as they are
    assert all(i.startswith("toolu_") for i in _ids(direct))
    _, routed = _routed("openai/gpt-4o-mini", "mistral/mistral-large-latest", messages, tools, monkeypatch)
    ids = _ids(routed)
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)
    assert ids[:2] == ids[2:] and ids[0] != ids[1]  # each call still matches its result
    back = dict(zip(ids, _ids(direct), strict=True))
    for message in routed["messages"]:
        for call in message.get("tool_calls") or []:
            call["id"] = back[call["id"]]
        if message["role"] == "tool":
            message["tool_call_id"] = back[message["tool_call_id"]]
    assert routed["messages"] == _without(direct, {"annotations"})
    assert {k: v for k, v in routed.items() if k != "messages"} == {k: v for k, v in direct.items()
                                                                     if k != "messages"}


def test_a_fallback_to_groq_drops_the_openai_reply_fields_groq_refuses(monkeypatch) -> None:
    """Groq refuses (a 400 "property '...' is unsupported") a message field its schema lacks;
    litellm drops litellm's own fields for it, not OpenAI's ``annotations``. Its ids are kept."""
    messages, tools = history()
    direct = _direct("groq/llama-3.3-70b-versatile", messages, tools)
    assert any("annotations" in m for m in direct["messages"])
    _, routed = _routed("openai/gpt-4o-mini", "groq/llama-3.3-70b-versatile", messages, tools, monkeypatch)
    assert routed["messages"] == _without(direct, {"annotations"})


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


def test_the_plan_says_what_was_fitted() -> None:
    messages, _ = history()
    pipeline = Pipeline.from_config({"context": {"enabled": False}, "cache": {"enabled": False}, "routing": {
        "aliases": {"pair": ["mistral/mistral-large-latest"]}}})
    result = outcome(pipeline.completion(model="pair", messages=messages, mock_response="ok"))
    decision = next(d for d in result.plan.decisions if d.policy == "messages")
    assert decision.action == "fit"
    assert decision.reason == ("for mistral/mistral-large-latest, which the caller did not name: annotations "
                               "dropped from assistant turns; 2 tool-call id(s) rewritten as 9 letters or "
                               "digits (mistral refuses them as another provider wrote them)")


def test_fit_history_is_pure_and_leaves_what_fits_alone() -> None:
    from router_middleware.fit import fit_history

    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "refusal": "I can't help with that.", "annotations": []},
                {"role": "assistant", "tool_calls": [{"id": "abcDEF123", "type": "function",
                                                      "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "ok"}]
    assert fit_history(messages, "openai") is None and fit_history(messages, None) is None
    fitted = fit_history(messages, "mistral")
    assert fitted is not None
    out, said = fitted
    assert out[1] == {"role": "assistant", "content": "I can't help with that."}  # the refusal is what it said
    assert out[0] is messages[0] and out[2] is messages[2] and out[3] is messages[3]  # a valid id is kept
    assert said == "annotations, refusal dropped from assistant turns"
    assert fit_history(out, "mistral") is None  # fitted once, it fits
    assert messages[1]["refusal"] == "I can't help with that."  # the caller's history is left as it was


def test_mistral_tool_ids_are_stable_and_leave_a_gemini_signature_off() -> None:
    from router_middleware.fit import mistral_tool_id

    assert mistral_tool_id("toolu_012r6TBCWjRHG71j6zruYyUL") == mistral_tool_id("toolu_012r6TBCWjRHG71j6zruYyUL")
    assert mistral_tool_id("call_1__thought__c2lnbmF0dXJl") == mistral_tool_id("call_1")
    assert mistral_tool_id("call_1") != mistral_tool_id("call_2")
    assert mistral_tool_id("abcDEF123") == "abcDEF123"
