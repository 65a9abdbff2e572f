"""The pipeline's own CPU per call under concurrency, the provider stubbed: `throughput.py`'s Redis
and memory variants with litellm's answer taken out, to compare two versions of the package.

    .venv/bin/python benchmarks/stubbed_cpu.py [--store redis|memory] [--batches 12] [--redis-url URL]
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/stubbed_cpu.py   # another tree, e.g. from git archive

Batches of 1,000 concurrent `Pipeline.acompletion` calls (the same config, history and context as
`throughput.py`), with `litellm.acompletion` replaced by a coroutine that returns a copy of one
answer it made before; startup objects frozen (`gc.freeze()`) after a warm-up. Printed: the process's
CPU time per call (`time.process_time`, all its threads) per batch, their median and least. What
remains is the package's work, the Redis client's (on Redis) and asyncio's; litellm's own work, about
four fifths of a real call's CPU, and its logging are left out, so a change to the package moves this
figure several times more than it moves `throughput.py`'s ratio. Alternate the two trees a few times:
on a shared machine the median moves by several percent from one process to the next.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

sys.path.insert(0, str(Path(__file__).parent))
import litellm  # noqa: E402
from throughput import MODELS, config, history, redis_server  # noqa: E402  (also configures logging as it does)

import router_middleware as rm  # noqa: E402


async def measure(store_url: str, batches: int, calls: int) -> list[float]:
    """CPU ms per call of each timed batch."""
    messages = history(20)
    pipeline = rm.Pipeline.from_config(config(store_url, MODELS))
    answer = await litellm.acompletion(model=MODELS[0], messages=messages, mock_response="ok")

    async def stub(**_: Any) -> Any:
        return copy.copy(answer)

    litellm.acompletion = stub  # the pipeline calls litellm through its module: every call gets the stub

    def call() -> Any:
        return pipeline.acompletion("coder", messages, context={"session_id": "s"}, mock_response="ok")

    for _ in range(3):
        await asyncio.gather(*(call() for _ in range(200)))
    gc.collect()
    gc.freeze()
    per_call = []
    for _ in range(batches):
        began = time.process_time()
        await asyncio.gather(*(call() for _ in range(calls)))
        per_call.append((time.process_time() - began) / calls * 1e3)
    return per_call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", choices=("redis", "memory"), default="redis")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = parser.parse_args(argv)
    with redis_server(args.redis_url if args.store == "redis" else "memory://") as url:
        per_call = asyncio.run(measure(url, args.batches, args.calls))
    print(f"{args.store} store, {rm.__file__}: CPU per call median {statistics.median(per_call):.4f} ms, "
          f"least {min(per_call):.4f} ms ({' '.join(f'{t:.3f}' for t in per_call)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
