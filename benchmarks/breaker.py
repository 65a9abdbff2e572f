"""A provider that stays down, behind the circuit breaker: how many attempts still reach it.

    .venv/bin/python benchmarks/breaker.py [--seconds 10] [--wave 20] [--every 0.1] [--cooldown 2]
        [--redis-url URL]

An alias of two targets, ``gpt-4o-mini`` (down: each attempt fails with a rate limit after 50 ms) and
``gpt-3.5-turbo`` (answers), with ``cooldown: {failures: 1, cooldown_s: --cooldown}``. A wave of concurrent
calls starts every ``--every`` seconds for ``--seconds``, all through ``Pipeline.acompletion`` with
litellm's ``mock_response``. Each time the down target's cooldown ends, the calls admitted then are
the ones that can reach it: the breaker lets one of them probe it (the others go on to the next
target) and the probe's failure opens the circuit again. Printed: calls, attempts that reached the
down target (all of them, and those started after its first failure came back: the calls before
it could not know), and the calls' median and 95th-percentile time (each attempt on the down target costs
its caller the 50 ms before it falls back). On Redis (``--redis-url``) the store is shared as by
several workers (a process reads a cooldown at most once a second there: the calls of that second
still reach the target); in memory otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

import router_middleware as rm  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
import litellm  # noqa: E402

DOWN, UP = "gpt-4o-mini", "gpt-3.5-turbo"


async def run(pipeline: rm.Pipeline, seconds: float, wave: int, every: float) -> tuple[Counter[str], list[float]]:
    sent: Counter[str] = Counter()
    real = litellm.acompletion

    async def provider(**kwargs: Any) -> Any:
        sent[kwargs["model"]] += 1
        if kwargs["model"] == DOWN:
            if sent["failed"]:  # an attempt after the first failure came back: the breaker let it through
                sent["later"] += 1
            await asyncio.sleep(0.05)
            sent["failed"] += 1
            raise litellm.RateLimitError("the provider is down", "openai", DOWN)
        return await real(**{**kwargs, "mock_response": "ok"})

    litellm.acompletion = provider
    times: list[float] = []

    async def one() -> None:
        start = time.perf_counter()
        await pipeline.acompletion("coder", [{"role": "user", "content": "Fix the failing test"}])
        times.append(time.perf_counter() - start)

    try:
        tasks = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            tasks += [asyncio.ensure_future(one()) for _ in range(wave)]
            await asyncio.sleep(every)
        await asyncio.gather(*tasks)
    finally:
        litellm.acompletion = real
    return sent, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--wave", type=int, default=20)
    parser.add_argument("--every", type=float, default=0.1)
    parser.add_argument("--cooldown", type=float, default=2.0)
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    pipeline = rm.Pipeline.from_config({
        "store": args.redis_url or "memory://", "cache": {"enabled": False}, "context": {"enabled": False},
        "app": f"breaker-{time.time_ns()}",
        "routing": {"aliases": {"coder": [DOWN, UP]}, "fallback": {"backoff_s": 0.0},
                    "cooldown": {"failures": 1, "window_s": 60, "cooldown_s": args.cooldown}}})
    if args.redis_url:  # the cooldown keys are per target: start from a healthy one
        for key in ("cooldown:", "fail:", "probe:"):
            pipeline.store.delete(key + DOWN)
    sent, times = asyncio.run(run(pipeline, args.seconds, args.wave, args.every))
    pipeline.close()
    times.sort()
    p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
    print(f"breaker benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, litellm "
          f"{litellm.__version__ if hasattr(litellm, '__version__') else '?'}, "
          f"{'redis' if args.redis_url else 'memory'} store, a wave of {args.wave} calls every {args.every} s "
          f"for {args.seconds} s, cooldown {args.cooldown} s\n")
    print("| calls | attempts on the down target | of them after its first failure | attempts on the next "
          "| median call (ms) | p95 call (ms) |")
    print("|---|---|---|---|---|---|")
    print(f"| {len(times)} | {sent[DOWN]} | {sent['later']} | {sent[UP]} | {statistics.median(times) * 1e3:.1f} "
          f"| {p95 * 1e3:.1f} |")
    print(f"summary: {sent[DOWN]} of {len(times)} calls reached the down target, {sent['later']} after its first "
          f"failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
