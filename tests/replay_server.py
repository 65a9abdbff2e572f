"""A loopback server that answers every request with a real recorded reply from cassettes/, unchanged
(its status, content type and body), for a process vcrpy cannot reach (the LiteLLM proxy's)."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from .conftest import CASSETTES
from .loopback import serve


@contextmanager
def replay_server(cassette: str, *, all_headers: bool = False) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """``(base URL, the request bodies received)`` while the server replays ``cassette``'s first reply:
    its content type and encoding, or (``all_headers``) every header the provider sent with it (its
    rate-limit headers among them)."""
    recorded = yaml.safe_load((CASSETTES / cassette).read_text())["interactions"][0]["response"]
    raw = recorded["body"]["string"]
    body = raw.encode() if isinstance(raw, str) else raw
    headers = {name.lower(): values[0] for name, values in recorded["headers"].items()}
    sent = [name for name in headers if name not in ("content-length", "transfer-encoding", "connection")] \
        if all_headers else ["content-type", "content-encoding"]
    bodies: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            bodies.append(json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}"))
            self.send_response(recorded["status"]["code"])
            for name in sent:
                if name in headers:
                    self.send_header(name, headers[name])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    with serve(Handler) as base:
        yield base, bodies
