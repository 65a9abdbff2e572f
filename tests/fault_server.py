"""A loopback OpenAI-compatible endpoint with scripted failures, for the fallback tests.

Successful answers are the real recorded bodies from cassettes/ (openai_chat.yaml for plain calls,
openai_chat_streaming.yaml for streams); failures are what providers really do: 429 with
Retry-After, 500, 503, a hang past the client's timeout, truncated JSON (or a stream cut inside its
first event), a connection that breaks right after the headers. The path prefix names the deployment: /healthy/v1/... always answers, /flaky/v1/...
fails at random with ``fault_rate``. For the quota tests, /limited/v1/... answers with OpenAI's
rate-limit headers counting down from ``limited_requests`` (reset in 30 s), and /exhausted/v1/...
refuses with 429 and OpenRouter's free-tier headers (no requests left, reset in a minute).
/cut/v1/... is a stream that breaks partway (fault ``cut-stream``): the first ``cut_events`` events
of the recorded stream, then the connection drops (before the finish reason and the usage chunk),
as a provider's connection lost mid-answer does. /stall/v1/... is a slow stream (fault ``stall``):
the first ``cut_events`` events, a pause of ``hang_s``, then the rest, as a model that stops to think
mid-answer does (a client may leave during the pause). /broken/v1/... is fault ``broken-stream`` every
time: the connection breaks right after the headers, before any event. /empty/v1/... answers a stream
with no data: its headers (no length), then the connection closes cleanly. /down/v1/... answers 500
to every request.
"""

from __future__ import annotations

import http.server
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from .cassette_data import interactions
from .conftest import CASSETTES
from .loopback import serve

FAULTS = ("429", "500", "503", "hang", "truncated", "broken-stream")


def _bodies() -> tuple[bytes, bytes]:
    plain = interactions(CASSETTES / "openai_chat.yaml")[0].response_text.encode()
    stream = interactions(CASSETTES / "openai_chat_streaming.yaml")[0].response_text.encode()
    return plain, stream


def _anthropic_bodies() -> tuple[bytes, bytes]:
    """Anthropic's recorded ``/v1/messages`` answers: plain, and streamed (SSE)."""
    plain = interactions(CASSETTES / "anthropic_message_create.yaml")[0].response_text.encode()
    stream = interactions(CASSETTES / "anthropic_message_streaming.yaml")[0].response_text.encode()
    return plain, stream


@contextmanager
def fault_server(fault_rate: float = 0.5, seed: int = 7, hang_s: float = 1.0,
                 limited_requests: int = 3, cut_events: int = 5) -> Iterator[tuple[str, Counter[str]]]:
    plain, stream = _bodies()
    anthropic_plain, anthropic_stream = _anthropic_bodies()
    events = stream.split(b"\n\n")
    assert 0 < cut_events < len(events) - 2  # the recording's last events: the finish with usage, [DONE]
    cut = b"".join(event + b"\n\n" for event in events[:cut_events])
    rng = random.Random(seed)
    lock = threading.Lock()
    seen: Counter[str] = Counter()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _break(self, partial: bytes, content_type: str) -> None:
            """Headers that promise the whole recorded stream, ``partial`` of it, then the connection drops."""
            self.send_response(200)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(stream)))
            self.end_headers()
            self.wfile.write(partial)
            self.close_connection = True

        def _stall(self, first: bytes, rest: bytes) -> None:
            """The recorded stream, ``first`` of it, then the rest after ``hang_s`` (a client that left
            meanwhile finds the connection closed: the rest is not sent)."""
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(first) + len(rest)))
            self.end_headers()
            self.wfile.write(first)
            time.sleep(hang_s)
            try:
                self.wfile.write(rest)
            except OSError:
                self.close_connection = True

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", 0))
            request = self.rfile.read(length)
            streaming = b'"stream": true' in request or b'"stream":true' in request
            with lock:
                fault = rng.choice(FAULTS) if self.path.startswith("/flaky") and rng.random() < fault_rate else "ok"
                fault = {"/cut": "cut-stream", "/stall": "stall", "/broken": "broken-stream",
                         "/empty": "empty-stream"}.get(f"/{self.path.split('/')[1]}", fault)
                seen[f"{self.path.split('/')[1]}:{fault}"] += 1
            deployment = self.path.split("/")[1]
            if fault == "cut-stream":
                self._break(cut, "text/event-stream")
            elif fault == "empty-stream":  # a provider that closes its stream before any data
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("connection", "close")
                self.end_headers()
                self.close_connection = True
            elif fault == "stall":
                self._stall(cut, stream[len(cut):])
            elif deployment == "limited":
                left = max(0, limited_requests - seen["limited:ok"])
                self._send(200, stream if streaming else plain, "text/event-stream" if streaming else "application/json",
                           headers={"x-ratelimit-limit-requests": str(limited_requests),
                                    "x-ratelimit-remaining-requests": str(left), "x-ratelimit-reset-requests": "30s"})
            elif deployment == "exhausted":
                reset_ms = int((time.time() + 60) * 1000)
                self._send(429, b'{"error": {"message": "Rate limit exceeded: free-models-per-day", "code": 429}}',
                           headers={"X-RateLimit-Limit": "50", "X-RateLimit-Remaining": "0",
                                    "X-RateLimit-Reset": str(reset_ms)})
            elif deployment == "bare429":  # a 429 that says no reset (OpenRouter's upstream limit on a free model)
                self._send(429, b'{"error": {"message": "deepseek/deepseek-chat:free is temporarily rate-limited '
                           b'upstream", "code": 429}}')
            elif deployment == "down":  # a provider that is down: 500 to every request, before any work
                self._send(500, b'{"error": {"message": "upstream failure", "type": "server_error"}}')
            elif fault == "429":
                self._send(429, b'{"error": {"message": "rate limited", "type": "rate_limit_error"}}',
                           headers={"retry-after": "0"})
            elif fault in ("500", "503"):
                self._send(int(fault), b'{"error": {"message": "upstream failure", "type": "server_error"}}')
            elif fault == "hang":
                time.sleep(hang_s)
                self.close_connection = True
            elif fault == "truncated" and not streaming:
                self._send(200, plain[: len(plain) // 2])
            elif fault in ("truncated", "broken-stream"):
                # a stream cut before its first complete event (truncated), or a connection that
                # breaks right after the headers (broken-stream, also for plain requests)
                self._break(stream[:40] if fault == "truncated" else b"",
                            "text/event-stream" if streaming else "application/json")
            elif self.path.endswith("/v1/messages"):  # Anthropic's API (the recordings' answers)
                self._send(200, *((anthropic_stream, "text/event-stream") if streaming else (anthropic_plain,
                                                                                            "application/json")))
            elif streaming:
                self._send(200, stream, "text/event-stream")
            else:
                self._send(200, plain)

    with serve(Handler) as base:
        yield base, seen
