"""Bad session files give errors naming the file and the message or call index."""

from __future__ import annotations

import json

import pytest

from router_middleware import MessageError, SessionFormatError
from router_middleware.cli import main
from router_middleware.replay import load_session

GOOD = {
    "id": "t", "model": "deepseek/deepseek-chat",
    "messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "task"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "out"},
        {"role": "assistant", "content": "done"},
        {"role": "exit", "content": "Submitted"},
    ],
    "calls": [
        {"prefix_len": 2, "model": "deepseek-chat", "provider": None,
         "usage": {"prompt_tokens": 100, "completion_tokens": 10, "cached_tokens": 0, "reasoning_tokens": 0},
         "cost_usd": 0.0001},
        {"prefix_len": 4, "model": "deepseek-chat", "provider": None,
         "usage": {"prompt_tokens": 130, "completion_tokens": 5, "cached_tokens": 64, "reasoning_tokens": 0},
         "cost_usd": 0.0001},
    ],
}


def write(tmp_path, data, name="s.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_good_session_drops_trailing_exit_record(tmp_path) -> None:
    session = load_session(write(tmp_path, GOOD))
    assert len(session.messages) == 5 and len(session.calls) == 2
    assert session.has_tools


def test_python_literal_tool_calls_are_parsed(tmp_path) -> None:
    data = json.loads(json.dumps(GOOD))
    data["messages"][2]["tool_calls"] = repr(data["messages"][2]["tool_calls"])
    session = load_session(write(tmp_path, data))
    assert session.messages[2]["tool_calls"][0]["id"] == "c1"


@pytest.mark.parametrize(
    ("mutate", "error", "pattern"),
    [
        (lambda d: d["messages"][3].pop("tool_call_id"), MessageError,
         r"s\.json: message 3: tool message has no tool_call_id"),
        (lambda d: d["messages"][1].update(role="narrator"), MessageError,
         r"s\.json: message 1: unknown role 'narrator'"),
        (lambda d: d["messages"][2].update(tool_calls="[{broken"), MessageError, r"s\.json: message 2: tool_calls"),
        (lambda d: d["messages"][2]["tool_calls"][0].pop("id"), MessageError, r"message 2: tool_calls\[0\] has no id"),
        (lambda d: d["calls"][1].update(prefix_len=99), SessionFormatError, r"s\.json: call 1\.prefix_len=99"),
        (lambda d: d["calls"][0]["usage"].update(prompt_tokens="many"), SessionFormatError,
         r"call 0\.usage\.prompt_tokens"),
        (lambda d: d.pop("calls"), SessionFormatError, r"'calls' must be a list"),
        # a misspelled usage key is named (it said "prompt_tokens must be ..., got None"; a misspelled
        # optional one was read as 0): found by a newcomer trial
        (lambda d: d["calls"][0]["usage"].update(prompt_tokns=d["calls"][0]["usage"].pop("prompt_tokens")),
         SessionFormatError, r"call 0\.usage has 'prompt_tokns', no field; did you mean 'prompt_tokens'\?"),
        (lambda d: d["calls"][0]["usage"].update(cache_read_tokens=d["calls"][0]["usage"].pop("cached_tokens")),
         SessionFormatError,
         r"call 0\.usage has 'cache_read_tokens', no field; did you mean 'cached_tokens'\?"),
    ],
)
def test_malformed_sessions(tmp_path, mutate, error, pattern) -> None:
    data = json.loads(json.dumps(GOOD))
    mutate(data)
    with pytest.raises(error, match=pattern):
        load_session(write(tmp_path, data))


def test_not_json(tmp_path) -> None:
    with pytest.raises(SessionFormatError, match=r"s\.json: not valid JSON"):
        load_session(write(tmp_path, "{nope"))


def test_cli_reports_error_and_exits_2(tmp_path, capsys) -> None:
    data = json.loads(json.dumps(GOOD))
    data["messages"][3].pop("tool_call_id")
    path = write(tmp_path, data, "broken.json")
    assert main(["replay", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "broken.json: message 3: tool message has no tool_call_id" in err
