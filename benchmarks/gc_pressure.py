"""Garbage-collector pressure of 1,000 concurrent calls: bare litellm vs the pipeline with memory and
Redis stores, in the setup of `throughput.py`, measured in one run.

    .venv/bin/python benchmarks/gc_pressure.py [--calls 1000] [--rounds 3] [--redis-url URL]

In a batch of concurrent calls, whatever a call holds while it waits (on the provider, on Redis)
outlives the young collections that run meanwhile and is promoted to the oldest generation; every
~25% growth of that generation triggers a full collection, which walks the whole heap (a few
hundred thousand objects once litellm is imported: ~0.25 s here). So the objects promoted per call
decide how often a process stops for a full collection. They are counted, not timed, so the count
does not drift with the machine's load: at each young collection of generation 1, the objects of
generations 0 and 1 that it did not collect are the ones it promoted. Also printed: full
collections per 1,000 calls and the collector's time per call (these two do move with the load).
The count assumes CPython's generational collector of 3.11-3.13 (3.14's incremental one promotes
differently).
Without `--redis-url` (or REDIS_URL) a `redis-server` on a free loopback port is started for the run.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

sys.path.insert(0, str(Path(__file__).parent))
from throughput import batch, batch_options, redis_server, variants  # noqa: E402  (also configures logging as it does)


class Collector:
    """Counts, while ``on``: objects promoted by collections of generation 1, full collections, and
    the time spent collecting."""

    def __init__(self) -> None:
        self.on = False
        self.promoted = self.full = 0
        self.seconds = 0.0
        self._young = 0
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if not self.on:
            return
        generation = info["generation"]
        if phase == "start":
            self._started = time.perf_counter()
            if generation == 1:
                self._young = len(gc.get_objects(0)) + len(gc.get_objects(1))
            return
        self.seconds += time.perf_counter() - self._started
        if generation == 1:
            self.promoted += self._young - info["collected"]
        elif generation == 2:
            self.full += 1

    def measure(self) -> None:
        self.promoted = self.full = 0
        self.seconds = 0.0
        self.on = True


async def run(calls: int, rounds: int, redis_url: str) -> dict[str, list[tuple[float, float, float]]]:
    calls_of = variants(redis_url)
    for call in calls_of.values():  # warm up
        await batch(call, 50)
    collector = Collector()
    gc.callbacks.append(collector)
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in calls_of}
    try:
        for _ in range(rounds):
            for name, call in calls_of.items():
                collector.measure()
                await batch(call, calls)
                collector.on = False
                results[name].append((collector.promoted / calls, collector.full * 1000 / calls,
                                      collector.seconds / calls))
    finally:
        gc.callbacks.remove(collector)
    return results


def main(argv: list[str] | None = None) -> int:
    args = batch_options(__doc__, rounds=3).parse_args(argv)
    print(f"gc pressure benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, litellm {version('litellm')}, {args.calls} concurrent async calls "
          f"x {args.rounds} rounds (median), gc thresholds {gc.get_threshold()}\n")
    with redis_server(args.redis_url) as url:
        results = asyncio.run(run(args.calls, args.rounds, url))
    print("| variant | objects promoted per call | full collections per 1,000 calls | collector time per call (ms) |")
    print("|---|---|---|---|")
    promoted_of = {}
    for name, rows in results.items():
        promoted, full, seconds = (statistics.median(column) for column in zip(*rows, strict=True))
        promoted_of[name] = promoted
        print(f"| {name} | {promoted:.0f} | {full:.1f} | {seconds * 1e3:.3f} |")
    print("\nsummary: objects promoted per call " + ", ".join(f"{name} {n:.0f}" for name, n in promoted_of.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
