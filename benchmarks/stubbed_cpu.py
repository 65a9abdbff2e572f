"""The pipeline's own CPU per call under concurrency, the provider stubbed: `throughput.py`'s Redis
and memory variants with litellm's answer taken out, to compare two versions of the package.

    .venv/bin/python benchmarks/stubbed_cpu.py [--store redis|memory] [--batches 12] [--redis-url URL]
    PYTHONPATH=/tmp/old/src .venv/bin/python benchmarks/stubbed_cpu.py   # another tree, e.g. from git archive
    .venv/bin/python benchmarks/stubbed_cpu.py --py-spy .venv/bin/py-spy [--seconds 20]   # where it goes

Batches of 1,000 concurrent `Pipeline.acompletion` calls (the same config, history and context as
`throughput.py`), with `litellm.acompletion` replaced by a coroutine that returns a copy of one
answer it made before; startup objects frozen (`gc.freeze()`) after a warm-up. Printed: the process's
CPU time per call (`time.process_time`, all its threads) per batch, their median and least. What
remains is the package's work, the Redis client's (on Redis) and asyncio's; litellm's own work, about
four fifths of a real call's CPU, and its logging are left out, so a change to the package moves this
figure several times more than it moves `throughput.py`'s ratio. Alternate the two trees a few times:
on a shared machine the median moves by several percent from one process to the next.

``--py-spy PATH`` samples the same calls instead (py-spy, not a dependency of the package, as
`insitu.py` does) and prints the package's CPU per call split by the lifecycle step that encloses it.
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
from insitu import RATE, STEPS, sample  # noqa: E402
from throughput import MODELS, config, history, redis_server  # noqa: E402  (also configures logging as it does)

import router_middleware as rm  # noqa: E402


async def measure(store_url: str, batches: int, calls: int, seconds: float | None = None) -> list[float]:
    """CPU ms per call of each timed batch; with ``seconds``, print "warm" after the warm-up, run
    batches for that long, then print the calls/s (to be sampled: see :func:`insitu.sample`)."""
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
    if seconds is not None:
        print("warm", flush=True)
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            await asyncio.gather(*(call() for _ in range(calls)))
            done += calls
        print(f"{done / (time.perf_counter() - began):.1f}", flush=True)
        return []
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
    parser.add_argument("--py-spy", help="sample with this py-spy instead, and split the CPU by step")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long --py-spy samples")
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(measure(args.redis_url, 0, args.calls, args.serve))
        return 0
    with redis_server(args.redis_url if args.store == "redis" else "memory://") as url:
        if args.py_spy:
            return split(url, args)
        per_call = asyncio.run(measure(url, args.batches, args.calls))
    print(f"{args.store} store, {rm.__file__}: CPU per call median {statistics.median(per_call):.4f} ms, "
          f"least {min(per_call):.4f} ms ({' '.join(f'{t:.3f}' for t in per_call)})")
    return 0


def split(url: str, args: argparse.Namespace) -> int:
    """Sample a process of its own serving the stubbed calls; print the package's CPU per call by step."""
    rate, parts, steps = sample([sys.executable, __file__, "--serve", str(args.seconds + 4), "--redis-url", url,
                                 "--calls", str(args.calls)], args.seconds, args.py_spy)
    calls = rate * args.seconds
    print(f"{args.store} store, {rm.__file__}, sampled {args.seconds:.0f} s: {rate:,.0f} calls/s; CPU per call "
          f"(ms): package {parts['package'] / RATE / calls * 1e3:.4f}, "
          f"the rest (asyncio, the stub) {(parts['rest'] + parts['litellm']) / RATE / calls * 1e3:.4f}\n")
    labels = list(dict.fromkeys(label for _, label in STEPS)) + ["drivers and the rest"]
    print("| step | package CPU per call (ms) | share |\n|---|---|---|")
    total = max(1, sum(steps.values()))
    for label in labels:
        print(f"| {label} | {steps[label] / RATE / calls * 1e3:.4f} | {steps[label] / total:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
