"""Models on loopback with a provider's prompt cache, answering "ok" with the usage that cache gives,
so a test can price what the provider would bill a request as sent and as the caller sent it. No
recording can stand for this: a trimmed request was never sent to a real provider. A prompt counts a
token per 4 characters of its JSON.

:func:`prefix_cache_server`: OpenAI-compatible, an automatic cache (DeepSeek's, OpenAI's): a request's
cached tokens are those of the longest run of whole messages an earlier request began with, in
64-token blocks (``prompt_tokens_details.cached_tokens``, DeepSeek's ``prompt_cache_hit_tokens``).
:func:`anthropic_cache_server`: Anthropic's Messages API, an explicit cache: only a prefix that ends
at a ``cache_control`` mark is cached, read where an earlier request wrote it, else written."""

from __future__ import annotations

import http.server
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .loopback import serve

SESSION = "data/sessions/deepseek-chat__django__django-13757.json"  # a recorded DeepSeek agent session
AGENT_TOOLS = [{"type": "function", "function": {"name": "bash", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}}}}]


def session_requests() -> list[list[dict[str, Any]]]:
    """The 73 requests of the bundled DeepSeek agent session, as its agent sent them."""
    from importlib.resources import files

    session = json.loads(files("router_middleware").joinpath(SESSION).read_text())
    return [[m for m in session["messages"][:call["prefix_len"]]
             if m["role"] in ("system", "user", "assistant", "tool")] for call in session["calls"]]


def agent_messages(step: int) -> list[dict[str, Any]]:
    """An agent's request at ``step``: a long system prompt, the task, then ``step + 1`` tool turns."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent. " + "Rules. " * 3000},
                                      {"role": "user", "content": "Fix the bug."}]
    for j in range(step + 1):
        messages += [{"role": "assistant", "content": None, "tool_calls": [
            {"id": f"toolu_{j}", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}]},
            {"role": "tool", "tool_call_id": f"toolu_{j}", "content": "file.py " * 200}]
    return messages


def _send(handler: http.server.BaseHTTPRequestHandler, answer: dict[str, Any]) -> None:
    data = json.dumps(answer).encode()
    handler.send_response(200)
    handler.send_header("content-type", "application/json")
    handler.send_header("content-length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def _tokens(messages: list[Any]) -> int:
    return len(json.dumps(messages)) // 4


@contextmanager
def prefix_cache_server(caches: bool = True) -> Iterator[str]:
    """``caches=False``: an OpenAI-compatible endpoint that caches nothing (every cached count 0)."""
    seen: list[list[Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            messages = body.get("messages", [])
            best = 0
            for earlier in seen:
                same = 0
                while same < min(len(earlier), len(messages)) and earlier[same] == messages[same]:
                    same += 1
                best = max(best, _tokens(messages[:same]) if same else 0)
            seen.append(messages)
            prompt, cached = _tokens(messages), best // 64 * 64 if caches else 0
            answer = {"id": f"chatcmpl-{len(seen)}", "object": "chat.completion", "created": int(time.time()),
                      "model": body.get("model"),
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": prompt, "completion_tokens": 100, "total_tokens": prompt + 100,
                                "prompt_tokens_details": {"cached_tokens": cached},
                                "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt - cached}}
            _send(self, answer)

    with serve(Handler) as base:
        yield base


@contextmanager
def anthropic_cache_server() -> Iterator[str]:
    written: set[str] = set()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            total = len(json.dumps(body)) // 4
            request = json.dumps({k: body[k] for k in ("tools", "system", "messages") if k in body})
            prefixes = [request[:m.start()] for m in re.finditer('"cache_control"', request)]
            read = write = 0
            if prefixes:
                read = max((len(p) // 4 for p in prefixes if p in written), default=0)
                write = len(prefixes[-1]) // 4 - read
                written.update(prefixes)
            answer = {"id": f"msg_{len(written)}", "type": "message", "role": "assistant", "model": body.get("model"),
                      "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
                      "usage": {"input_tokens": total - read - write, "output_tokens": 20,
                                "cache_read_input_tokens": read, "cache_creation_input_tokens": write}}
            _send(self, answer)

    with serve(Handler) as base:
        yield base


def bill_session(pipeline: Any, start: int = 0, *, caches: bool = True) -> list[float]:
    """What each of :func:`session_requests` from ``start`` on (a resumed session's: none before it
    was sent) cost through ``pipeline``, against a fresh :func:`prefix_cache_server` (DeepSeek's prices)."""
    from router_middleware import outcome

    with prefix_cache_server(caches) as base:
        return [outcome(pipeline.completion(model="deepseek/deepseek-chat", messages=request, api_base=base,
                                            api_key="k", context={"session_id": "s", "step": step})).cost.total_usd
                for step, request in enumerate(session_requests()[start:], start)]


def bill_agent(pipeline: Any, steps: int = 5) -> list[float]:
    """What ``steps`` of :func:`agent_messages` cost through ``pipeline`` on Claude Sonnet 4.5, against a
    fresh :func:`anthropic_cache_server`."""
    from router_middleware import outcome

    with anthropic_cache_server() as base:
        return [outcome(pipeline.completion(model="anthropic/claude-sonnet-4-5", messages=agent_messages(step),
                                            tools=AGENT_TOOLS, api_base=base, api_key="k", max_tokens=100,
                                            context={"session_id": "a", "step": step})).cost.total_usd
                for step in range(steps)]
