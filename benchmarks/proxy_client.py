"""The load generator of ``proxy_throughput.py``, in a process of its own (asyncio + aiohttp).

Reads one JSON command a line on stdin: ``{"base", "pid", "upstream_pid", "clients", "requests",
"body"}``. Opens ``clients`` kept-alive connections to ``base`` (one untimed request each), then
times ``requests`` requests sent by ``clients`` concurrent workers, each sending its next request
when its last answer is read to the end (a stream too). Prints one JSON line: the seconds taken,
the CPU seconds this process, the proxy (``pid``) and the upstream spent meanwhile, the wall clock
at the end, and the first failure if any. It imports neither litellm nor the package.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp

HEADERS = {"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"}
TICK = os.sysconf("SC_CLK_TCK")


def cpu(pid: int) -> float:
    """CPU seconds (user and system, every thread) a process has spent."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def send(session: aiohttp.ClientSession, url: str, body: bytes, count: int, failures: list[str]) -> None:
    for _ in range(count):
        async with session.post(url, data=body, headers=HEADERS) as response:
            data = await response.read()
            streamed = data.startswith(b"data: ")
            if response.status != 200 or (streamed and not data.rstrip().endswith(b"data: [DONE]")) or (
                    not streamed and b'"choices"' not in data):
                failures.append(f"{response.status}: {data[:300]!r}")


async def warm(session: aiohttp.ClientSession, url: str, body: bytes, failures: list[str]) -> None:
    """One untimed request, tried again if the proxy closed a connection kept alive from the last batch
    as it was reused (uvicorn drops idle ones after 5 s: a race, not a failure of the proxy)."""
    for attempt in range(3):
        try:
            await send(session, url, body, 1, failures)
            return
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            if attempt == 2:
                raise


async def batch(sessions: dict[str, aiohttp.ClientSession], command: dict[str, Any]) -> dict[str, Any]:
    base, clients, requests = command["base"], command["clients"], command["requests"]
    if base not in sessions:
        sessions[base] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                               timeout=aiohttp.ClientTimeout(total=300))
    session, url, body = sessions[base], f"{base}/v1/chat/completions", command["body"].encode()
    failures: list[str] = []
    await asyncio.gather(*(warm(session, url, body, failures) for _ in range(clients)))  # connections open
    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    before = time.process_time(), cpu(command["pid"]), cpu(command["upstream_pid"]), time.perf_counter()
    await asyncio.gather(*(send(session, url, body, n, failures) for n in shares))
    elapsed = time.perf_counter() - before[3]
    return {"seconds": elapsed, "client_cpu": time.process_time() - before[0],
            "proxy_cpu": cpu(command["pid"]) - before[1], "upstream_cpu": cpu(command["upstream_pid"]) - before[2],
            "end": time.time(), "failures": len(failures), "first_failure": failures[0] if failures else None}


async def main() -> None:
    sessions: dict[str, aiohttp.ClientSession] = {}
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps(await batch(sessions, json.loads(line))), flush=True)
    finally:
        for session in sessions.values():
            await session.close()


if __name__ == "__main__":
    asyncio.run(main())
