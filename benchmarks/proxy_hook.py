"""What the LiteLLM proxy hook costs per request of a growing agent history, each request parsed anew.

    .venv/bin/python benchmarks/proxy_hook.py [--steps N] [--sizes 20,300]

Behind the proxy (a Cline-style agent), every request brings the whole history as JSON, one turn
longer than the last. For each starting size: the median time of ``RouterLogger.async_pre_call_hook``
(labels derived from the conversation, validation, planning, admission) over ``--steps`` requests
of one session, the history growing by two messages a request and parsed from JSON for each (the
parse itself not timed), the first 20 requests not counted. No provider is called: the hook's part
of a request only (the proxy's router and the success event come after it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

import router_middleware as rm  # noqa: E402
from router_middleware.litellm import RouterLogger  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))  # calls never answered
sys.path.insert(0, str(Path(__file__).parent))
from overhead import history  # noqa: E402


async def hook_times(size: int, steps: int) -> list[float]:
    logger = RouterLogger(rm.Pipeline.from_config({}), proxy=True)
    grown = history(size)
    times = []
    for step in range(steps + 20):
        grown = [*grown, {"role": "assistant", "content": f"step {step} done"}, {"role": "user", "content": "go on"}]
        data = {"model": "gpt-4o-mini", "messages": json.loads(json.dumps(grown)), "litellm_call_id": f"c{size}-{step}"}
        start = time.perf_counter()
        await logger.async_pre_call_hook(None, None, data, "acompletion")
        if step >= 20:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sizes", default="20,300")
    args = parser.parse_args(argv)
    print(f"proxy hook benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, litellm {version('litellm')}, {args.steps} requests per size\n")
    print("| history at the start | pre-call hook per request, median (ms) |")
    print("|---|---|")
    medians = []
    for size in (int(s) for s in args.sizes.split(",")):
        median = statistics.median(asyncio.run(hook_times(size, args.steps)))
        medians.append(f"{size} messages {median * 1e3:.3f} ms")
        print(f"| {size} messages | {median * 1e3:.3f} |")
    print(f"\nsummary: pre-call hook per request, {', '.join(medians)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
