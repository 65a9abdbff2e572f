"""Redis commands and round trips per routed call, counted on a real redis-server.

    .venv/bin/python benchmarks/redis_commands.py [--calls 200] [--concurrent] [--http] [--semantic]
        [--redis-url URL]

Each call goes through an alias with the response cache (a miss: every call asks something new),
a USD and token budget and a requests/tokens-per-minute limit, with `mock_response` (or, `--http`,
over litellm's HTTP path to the loopback server of ``overhead_http.py`` replaying a recorded reply:
the provider's usage, which also feeds the speed averages): one after another with `completion`, or
(`--concurrent`) all at once with `acompletion`; `--semantic` adds the semantic cache (the local
embedder, the `semantic` extra; every call asks something new: no paraphrase hit, one lookup and
one add to the index of the calls' one scope). Commands are Redis's
own count (INFO commandstats, reset before the run; commands run inside a Lua script count too);
round trips are the requests the blocking redis-py client sent (pipelined commands travel together;
the async path's batched pipelines are not counted); the server's CPU time per call (INFO cpu) gives
how many such calls one Redis core serves. Without `--redis-url` (or REDIS_URL) a `redis-server` on
a free loopback port is started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import router_middleware as rm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from overhead_http import replay_server  # noqa: E402
from throughput import redis_server  # noqa: E402


def config(url: str, provider: str = "", semantic: bool = False) -> dict:
    return {
        "store": url,
        "cache": {"enabled": True, "policy": "always", "semantic": {"enabled": semantic}},
        "context": {"enabled": False},
        "routing": {
            "aliases": {"coder": [f"{provider}gpt-4o-mini", f"{provider}gpt-3.5-turbo"]},
            "budgets": [{"name": "team", "scope": "app", "usd": 1_000_000, "tokens": 10**12, "window_s": 3600}],
            "limits": {f"{provider}gpt-4o-mini": {"rpm": 1_000_000, "tpm": 10**12}},
        },
        "app": f"bench-{time.time_ns()}",
    }


async def _all_at_once(pipeline: rm.Pipeline, calls: int, answer: dict[str, Any]) -> None:
    await asyncio.gather(*(pipeline.acompletion("coder", [{"role": "user", "content": f"question {i}"}],
                                                context={"session_id": "s"}, **answer)
                           for i in range(calls)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--concurrent", action="store_true",
                        help="all calls at once through acompletion (the batched asyncio client)")
    parser.add_argument("--http", action="store_true",
                        help="over litellm's HTTP path to a loopback server replaying a recorded reply")
    parser.add_argument("--semantic", action="store_true", help="with the semantic cache (its local embedder)")
    args = parser.parse_args(argv)
    import redis
    from redis.connection import Connection

    sent = 0
    original = Connection.send_packed_command

    def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        nonlocal sent
        sent += 1
        return original(self, command, check_health)

    with redis_server(args.redis_url) as url, (replay_server() if args.http else nullcontext()) as base:
        answer: dict[str, Any] = {"api_base": base, "api_key": "sk-bench"} if base else {"mock_response": "ok"}
        pipeline = rm.Pipeline.from_config(config(url, "openai/" if base else "", args.semantic))
        ask = lambda text: pipeline.completion(  # noqa: E731
            "coder", [{"role": "user", "content": text}], context={"session_id": "s"}, **answer)
        for i in range(20):  # warm up: scripts loaded, connections open (and the embedder loaded)
            ask(f"warm-up {i}")
        admin = redis.Redis.from_url(url)
        admin.config_resetstat()
        cpu = admin.info("cpu")
        before = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
        Connection.send_packed_command = counting  # type: ignore[method-assign]
        try:
            if args.concurrent:
                asyncio.run(_all_at_once(pipeline, args.calls, answer))
            else:
                for i in range(args.calls):
                    ask(f"question {i}")
        finally:
            Connection.send_packed_command = original  # type: ignore[method-assign]
        cpu = admin.info("cpu")
        redis_cpu_s = cpu["used_cpu_user"] + cpu["used_cpu_sys"] - before
        stats = admin.info("commandstats")
    counts = Counter({name.removeprefix("cmdstat_").upper(): int(value["calls"]) for name, value in stats.items()
                      if name not in ("cmdstat_config", "cmdstat_info")})
    total = sum(counts.values())
    mode = ("all at once, async" if args.concurrent else "one after another, sync") + (
        ", over HTTP" if args.http else ", mock_response") + (", semantic cache" if args.semantic else "")
    print(f"{args.calls} routed calls (response cache miss, budget, rate limit), {mode}, redis-py")
    print(f"commands per call: {total / args.calls:.2f} ("
          + ", ".join(f"{name} {n / args.calls:.2f}" for name, n in counts.most_common()) + ")")
    print(f"round trips per call on the blocking client: {sent / args.calls:.2f}")
    per_call = redis_cpu_s / args.calls
    print(f"redis-server CPU per call: {per_call * 1e6:.0f} us, so one Redis core serves about "
          f"{1 / per_call:,.0f} such calls/s whatever the number of workers (the commands, not the "
          f"connections, cost it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
