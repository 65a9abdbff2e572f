"""A scripted OpenAI-compatible model on loopback, standing in for a coding agent's model (no model
can be reached here). It answers like Cline's runs recorded in ../shared/data/cline-requests: turns
that call ``run_commands`` (one per step of the run), then ``submit_and_exit``; streamed (SSE, with
a final usage chunk when ``stream_options.include_usage`` is set) or plain JSON. Every request body is kept for the test to inspect.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .loopback import serve

USAGE = {"prompt_tokens": 3210, "completion_tokens": 42, "total_tokens": 3252,
         "prompt_tokens_details": {"cached_tokens": 2048}}


def _reply(body: dict[str, Any], steps: int, output_lines: int) -> dict[str, Any]:
    """The next tool call for this conversation: ``steps`` commands, then ``submit_and_exit``. The step
    reached is read from the last tool result (``step-K``), which trimming never drops."""
    results = [m for m in body.get("messages", []) if m.get("role") == "tool"]
    done = 0
    if results:
        found = re.findall(r"step-(\d+)", str(results[-1].get("content")))
        done = int(found[-1]) if found else steps
    if done >= steps:
        name, args = "submit_and_exit", {"summary": "Ran echo hello-from-cline; it printed hello-from-cline.",
                                         "verified": True}
    else:
        command = f"echo hello-from-cline step-{done + 1}"
        if output_lines:  # a long tool output (about 7 bytes a line)
            command += f" && seq 100000 {100000 + output_lines}"
        name, args = "run_commands", {"commands": [command]}
    return {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args)}}


def _chunks(model: str, call: dict[str, Any], usage: bool) -> Iterator[dict[str, Any]]:
    base = {"id": "chatcmpl-scripted", "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None}, "finish_reason": None}]}
    arguments = call["function"]["arguments"]
    half = len(arguments) // 2
    yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": call["id"], "type": "function",
         "function": {"name": call["function"]["name"], "arguments": arguments[:half]}}]}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": arguments[half:]}}]}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
    if usage:
        yield {**base, "choices": [], "usage": USAGE}


@contextmanager
def scripted_upstream(model: str = "scripted-coder", *, steps: int = 1, output_lines: int = 0,
                      status: int = 200, delay_s: float = 0.0,
                      fail_first: int = 0, break_after: int | None = None,
                      filtered: bool = False, overflow: bool = False) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``steps`` commands before the run ends, each printing ``output_lines`` lines; ``status`` other
    than 200: every request is answered with that error (an overloaded or dead deployment);
    ``delay_s``: each answer starts that late (a slow model); ``fail_first``: the first that many
    requests are answered 503 (a passing overload); ``break_after``: a stream sends that many chunks
    (1: its role chunk only), then the server closes the connection (no length, no ``[DONE]``);
    ``filtered``: a stream's answer is withheld, its role chunk followed by ``finish_reason``
    ``content_filter`` (and the usage chunk when asked); ``overflow``: every request is answered 400
    ``context_length_exceeded``, as OpenAI refuses a prompt over the model's window."""
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            models = {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "test"}]}
            self._send(200, json.dumps(models).encode(), "application/json")

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            with lock:
                seen.append(body)
                passing = len(seen) <= fail_first
            time.sleep(delay_s)
            if overflow:
                error = {"error": {"message": "This model's maximum context length is 8192 tokens. However, your "
                                   "messages resulted in 9000 tokens.", "type": "invalid_request_error",
                                   "param": "messages", "code": "context_length_exceeded"}}
                self._send(400, json.dumps(error).encode(), "application/json")
                return
            if status != 200 or passing:
                error = {"error": {"message": "the deployment is overloaded", "type": "server_error"}}
                self._send(503 if passing else status, json.dumps(error).encode(), "application/json")
                return
            call = _reply(body, steps, output_lines)
            if body.get("stream"):
                usage = bool((body.get("stream_options") or {}).get("include_usage"))
                chunks = list(_chunks(model, call, usage))
                if filtered:  # the role chunk, a finish of the filter's own, the usage chunk if asked
                    chunks = [chunks[0], {**chunks[0], "choices": [
                        {"index": 0, "delta": {}, "finish_reason": "content_filter"}]}, *chunks[4:]]
                if break_after is not None:
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("connection", "close")
                    self.end_headers()
                    for chunk in chunks[:break_after]:
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                    self.close_connection = True
                    return
                payload = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
                self._send(200, payload.encode(), "text/event-stream")
                return
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            response = {"id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
                        "model": model, "usage": USAGE,
                        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}
            self._send(200, json.dumps(response).encode(), "application/json")

    with serve(Handler) as base:
        yield f"{base}/v1", seen
