"""Prompt-cache hints checked in the outgoing request body (real recordings answer)."""

from __future__ import annotations

import json

from router_middleware import Pipeline, outcome

from .cassette_data import capturing_vcr
from .conftest import CASSETTES

replayer, SENT = capturing_vcr()
LONG_SYSTEM = "You are a meticulous coding agent. " + "Follow the repository conventions carefully. " * 200


def _sent_body(cassette) -> dict:
    assert cassette.play_count == 1
    return SENT[-1]


def test_anthropic_breakpoints_on_system_and_last_message() -> None:
    pipeline = Pipeline.from_config({})
    with replayer.use_cassette(str(CASSETTES / "anthropic_message_create.yaml")) as cassette:
        response = pipeline.completion(
            model="anthropic/claude-3-opus-20240229", max_tokens=1024,
            messages=[{"role": "system", "content": LONG_SYSTEM},
                      {"role": "user", "content": "Tell me a joke about OpenTelemetry"}],
            context={"session_id": "s1"})
    body = _sent_body(cassette)
    assert body["system"][-1]["cache_control"] == {"type": "ephemeral"}
    assert body["messages"][-1]["content"][-1]["cache_control"] == {"type": "ephemeral"}
    marks = json.dumps(body).count('"cache_control"')
    assert marks <= 4
    assert outcome(response).plan.decisions[-1].policy == "cache-breakpoints"


def test_no_breakpoint_below_the_minimum_cacheable_size() -> None:
    with replayer.use_cassette(str(CASSETTES / "anthropic_message_create.yaml")) as cassette:
        Pipeline.from_config({}).completion(
            model="anthropic/claude-3-opus-20240229", max_tokens=1024,
            messages=[{"role": "user", "content": "Tell me a joke about OpenTelemetry"}])
    assert "cache_control" not in json.dumps(_sent_body(cassette))


def test_openai_gets_a_stable_prompt_cache_key_per_session() -> None:
    keys = []
    for _ in range(2):
        with replayer.use_cassette(str(CASSETTES / "openai_chat.yaml"), allow_playback_repeats=True) as cassette:
            Pipeline.from_config({}).completion(
                model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Tell me a joke about opentelemetry"}],
                context={"session_id": "task-42"})
        keys.append(_sent_body(cassette)["prompt_cache_key"])
    assert keys[0] == keys[1] and keys[0].startswith("rm-")
    with replayer.use_cassette(str(CASSETTES / "openai_chat.yaml"), allow_playback_repeats=True) as cassette:
        Pipeline.from_config({}).completion(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Tell me a joke about opentelemetry"}])
    assert "prompt_cache_key" not in _sent_body(cassette)  # no session, no invented key
