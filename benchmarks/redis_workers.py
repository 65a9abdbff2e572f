"""How many routed calls/s one Redis serves for a given number of worker processes, measured.

    .venv/bin/python benchmarks/redis_workers.py [--workers 1,2,4] [--seconds 10] [--concurrency 100] [--redis-url URL]

For each worker count W, W processes share one redis-server and one app (so they share its budget
and its cooldown keys, as proxy workers do). Each runs `Pipeline.acompletion` through a two-model
alias with a USD and token budget and the circuit breaker (the config of `throughput.py`), with
`mock_response`, `--concurrency` calls in flight at a time, for `--seconds`, all starting together.
The table gives the calls/s all workers made together, the redis-server CPU each call cost (INFO
cpu over the timed window) and the busiest Redis could therefore serve: calls/s per Redis core
(1 / CPU per call). On this 2-core machine the workers, not Redis, are what saturates: calls/s
stops growing once W reaches the cores, while the Redis CPU per call says how far one Redis goes
before it saturates. Without `--redis-url` (or REDIS_URL) a `redis-server` on a free loopback port
is started for the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

sys.path.insert(0, str(Path(__file__).parent))


def worker(url: str, app: str, seconds: float, concurrency: int) -> dict[str, Any]:
    """One worker process: warm up, say so, wait for the common start time (a line on stdin), then run
    calls until the window ends."""
    import logging

    import structlog

    import router_middleware as rm

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    from overhead import history
    from throughput import config

    pipeline = rm.Pipeline.from_config({**config(url), "app": app})
    messages = history(20)

    async def run() -> dict[str, Any]:
        async def one() -> None:
            await pipeline.acompletion("coder", messages, mock_response="ok", context={"session_id": "s"})

        await asyncio.gather(*(one() for _ in range(20)))  # warm up: scripts loaded, connections open
        print("ready", flush=True)
        start_at = float(sys.stdin.readline())
        await asyncio.sleep(max(0.0, start_at - time.time()))
        done = 0
        end = start_at + seconds

        async def lane() -> None:
            nonlocal done
            while time.time() < end:
                await one()
                done += 1

        began = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
        await pipeline.aclose()
        return {"calls": done, "elapsed": elapsed}

    return asyncio.run(run())


def measure(url: str, workers: int, seconds: float, concurrency: int) -> dict[str, float]:
    import redis

    admin = redis.Redis.from_url(url)
    app = f"bench-workers-{time.time_ns()}"
    processes = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(
        {"url": url, "app": app, "seconds": seconds, "concurrency": concurrency})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    for process in processes:  # each has imported litellm and warmed up
        assert process.stdout is not None and process.stdin is not None
        if process.stdout.readline().strip() != "ready":
            raise SystemExit("a worker failed to start")
    start_at = time.time() + 0.5
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{start_at}\n")
        process.stdin.flush()
    time.sleep(max(0.0, start_at - time.time()))
    cpu = admin.info("cpu")
    before = cpu["used_cpu_user"] + cpu["used_cpu_sys"]
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=seconds + 300)
        if process.returncode != 0:
            raise SystemExit(f"a worker failed (rc {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    cpu = admin.info("cpu")  # read after the last worker: its calls past the window are few
    redis_cpu = cpu["used_cpu_user"] + cpu["used_cpu_sys"] - before
    calls = sum(r["calls"] for r in results)
    window = max(r["elapsed"] for r in results)
    return {"calls_per_s": calls / window, "redis_cpu_us": redis_cpu / calls * 1e6, "calls": calls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(spec["url"], spec["app"], spec["seconds"], spec["concurrency"])))
        return 0
    import platform
    from importlib.metadata import version

    from throughput import redis_server

    counts = [int(w) for w in args.workers.split(",")]
    print(f"redis workers benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, redis-py {version('redis')}, {args.concurrency} calls in flight "
          f"per worker, {args.seconds:g} s per worker count\n")
    print("| workers | calls/s, all workers | redis-server CPU per call (us) | calls/s one Redis core serves |")
    print("|---|---|---|---|")
    rows = []
    with redis_server(args.redis_url) as url:
        for count in counts:
            row = measure(url, count, args.seconds, args.concurrency)
            rows.append((count, row))
            print(f"| {count} | {row['calls_per_s']:,.0f} | {row['redis_cpu_us']:.0f} | "
                  f"{1e6 / row['redis_cpu_us']:,.0f} |", flush=True)
    worst = max(row["redis_cpu_us"] for _, row in rows)
    print(f"\nsummary: one Redis core serves at least {1e6 / worst:,.0f} routed calls/s "
          f"(the most CPU per call seen, over {', '.join(str(c) for c, _ in rows)} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
