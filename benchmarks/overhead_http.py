"""Overhead of the pipeline vs bare litellm on litellm's real HTTP path, measured in one run.

    .venv/bin/python benchmarks/overhead_http.py [--repeat N]

``overhead.py`` measures against ``mock_response``, which skips litellm's HTTP client, the request's
transformation and the reply's parsing: the cheapest call litellm makes, so the ratio there is the
largest the middleware can show. Here both sides call an OpenAI-compatible server on loopback, in a
process of its own (as a provider is; asyncio, so that a thousand concurrent connections cost it
little), that answers every request with a real recorded reply (its status, headers and body)
(cassettes/openai_chat.yaml, gzip-encoded as recorded; cassettes/openai_chat_streaming.yaml for
streams: 196 chunks). The medians and their ratio are for a 20-message agent history, sync and
async: plain; streamed (read to the end); and streamed with ``stream_options.include_usage``, as
coding agents ask. The pipeline asks for that usage chunk itself when the caller does not (so that
usage is the provider's count), and litellm then assembles the stream's answer twice: the plain
streamed rows include that. Calls alternate and are spaced by 2 ms as in ``overhead.py``. The
network's own latency, absent on loopback, would only shrink the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

import router_middleware as rm  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
import litellm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from overhead import apaired, history, paired  # noqa: E402

CASSETTES = Path(__file__).resolve().parent.parent / "cassettes"
USAGE = {"include_usage": True}  # as coding agents ask (Cline does); the pipeline asks it when they do not

SERVER = r"""
import asyncio, sys, yaml

def raw(response):
    body = response["body"]["string"]
    body = body.encode() if isinstance(body, str) else body
    head = [f"HTTP/1.1 {response['status']['code']} {response['status']['message']}"]
    head += [f"{name}: {value}" for name, values in response["headers"].items() for value in values
             if name.lower() not in ("content-length", "transfer-encoding", "connection")]  # as the provider sent
    return ("\r\n".join([*head, f"Content-Length: {len(body)}", "", ""])).encode() + body

plain, streamed = (raw(yaml.safe_load(open(path))["interactions"][0]["response"]) for path in sys.argv[1:3])

async def serve(reader, writer):  # HTTP/1.1 keep-alive: each request answered in one write
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line[15:]) for line in head.split(b"\r\n")
                           if line[:15].lower() == b"content-length:"), 0)
            request = await reader.readexactly(length)
            writer.write(streamed if b'"stream": true' in request or b'"stream":true' in request else plain)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextmanager
def replay_server() -> Iterator[str]:
    """The base URL of a loopback server, in a process of its own, answering with the recorded replies."""
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(CASSETTES / "openai_chat.yaml"),
                                str(CASSETTES / "openai_chat_streaming.yaml")], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        base = f"http://127.0.0.1:{process.stdout.readline().strip()}/v1"
        for _ in range(100):
            try:
                urllib.request.urlopen(urllib.request.Request(f"{base}/chat/completions", b"{}"), timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=10)


def measure(pipeline: rm.Pipeline, kwargs: dict[str, Any], stream: bool, repeat: int) -> list[float]:
    """Medians of bare ``litellm.completion`` and ``Pipeline.completion`` (a stream read to its end)."""
    def read(response: Any) -> Any:
        return list(response) if stream else response

    wrapped = {**kwargs, "context": {"session_id": "bench"}}
    return paired([lambda: read(litellm.completion(**kwargs)), lambda: read(pipeline.completion(**wrapped))], repeat)


async def ameasure(pipeline: rm.Pipeline, kwargs: dict[str, Any], stream: bool, repeat: int) -> list[float]:
    """:func:`measure` with ``acompletion``."""
    async def read(response: Any) -> Any:
        return [chunk async for chunk in response] if stream else response

    async def bare() -> Any:
        return await read(await litellm.acompletion(**kwargs))

    async def routed() -> Any:
        return await read(await pipeline.acompletion(**kwargs, context={"session_id": "bench"}))
    return await apaired([bare, routed], repeat)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args(argv)
    with replay_server() as base:
        pipeline = rm.Pipeline.from_config({})
        print(f"overhead over HTTP benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} "
              f"cores, Python {platform.python_version()}, litellm {version('litellm')}, {args.repeat} paired calls "
              "each, a loopback server replaying recorded OpenAI replies\n")
        print("| 20 messages | mode | bare litellm (ms) | Pipeline (ms) | ratio | overhead (ms) |")
        print("|---|---|---|---|---|---|")
        ratios = []
        shapes: dict[str, dict[str, Any]] = {"": {}, ", streamed": {"stream": True},
                                             ", streamed, usage asked": {"stream": True, "stream_options": USAGE}}
        for shape, extra in shapes.items():
            stream = bool(extra)
            kwargs: dict[str, Any] = {"model": "openai/gpt-4o-mini", "messages": history(20), "api_base": base,
                                      "api_key": "sk-bench", **extra}
            measured = (("sync", measure(pipeline, kwargs, stream, args.repeat)),
                        ("async", asyncio.run(ameasure(pipeline, kwargs, stream, args.repeat))))
            for mode, (b, w) in measured:
                label = mode + shape
                ratios.append((label, w / b))
                print(f"| | {label} | {b * 1e3:.3f} | {w * 1e3:.3f} | {w / b:.3f} | {(w - b) * 1e3:.3f} |")
        print("\nsummary: wrapped/bare median ratio " + ", ".join(f"{label} x{r:.3f}" for label, r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
