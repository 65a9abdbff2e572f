"""A loopback HTTP server that records request bodies and answers 500.

Used only to read the outgoing request body for providers that have no real recording in
cassettes/ (Gemini, OpenRouter, DeepSeek); it never imitates a provider's response.
"""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .loopback import serve


@contextmanager
def capture_server() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    bodies: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("content-length", 0))
            bodies.append(json.loads(self.rfile.read(length) or b"{}"))
            payload = b'{"error": {"message": "capture server: request recorded"}}'
            self.send_response(500)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    with serve(Handler) as base:
        yield base, bodies
