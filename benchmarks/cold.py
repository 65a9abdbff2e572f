"""Why the pipeline's own work costs more between calls than back to back: what happens before it.

    .venv/bin/python benchmarks/cold.py [--repeat N]

``Pipeline.completion`` with litellm's ``completion`` stubbed (a copy of a prebuilt 20-message
answer), default config, timed after each of: nothing (back to back), 2 ms asleep, 2 ms of a
spinning ``perf_counter`` loop, a pure Python loop of about 2 / 0.2 / 0.02 ms (no system call,
almost no memory), and 2 ms of JSON work (other code and data). Medians. Then cProfile of the
calls back to back and after 2 ms of spinning: whether the slower calls do more (more function
calls: a time-based refresh, a cache expiring) or the same work more slowly (the state the CPU had
cached for them lost while something else ran).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

import litellm  # noqa: E402

import router_middleware as rm  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import history  # noqa: E402


def pure(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def json_work(seconds: float, blob: Any) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        json.loads(json.dumps(blob))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    args = parser.parse_args(argv)
    pipeline = rm.Pipeline.from_config({})
    kwargs = {"model": "gpt-4o-mini", "messages": history(20), "mock_response": "ok"}
    prebuilt = litellm.completion(**kwargs)

    def stub(**_: Any) -> Any:
        response = prebuilt.model_copy()
        response._hidden_params = dict(prebuilt._hidden_params)
        return response

    litellm.completion = stub

    def call() -> None:
        pipeline.completion(**kwargs, context={"session_id": "cold"})

    for _ in range(50):
        call()
    start = time.perf_counter()
    pure(100_000)
    loop_2ms = int(0.002 / ((time.perf_counter() - start) / 100_000))
    blob = {"rows": [list(range(50)) for _ in range(20)], "text": "x" * 1000}
    befores: dict[str, Callable[[], Any]] = {
        "nothing (back to back)": lambda: None,
        "2 ms asleep": lambda: time.sleep(0.002),
        "2 ms spinning on perf_counter": lambda: spin(0.002),
        "pure Python loop, about 2 ms": lambda: pure(loop_2ms),
        "pure Python loop, about 0.2 ms": lambda: pure(loop_2ms // 10),
        "pure Python loop, about 0.02 ms": lambda: pure(loop_2ms // 100),
        "2 ms of JSON work": lambda: json_work(0.002, blob),
    }
    print(f"cold benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {args.repeat} calls a row\n")
    print("| before each call | own work, median (ms) |")
    print("|---|---|")
    for name, before in befores.items():
        times = []
        for _ in range(args.repeat):
            before()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        print(f"| {name} | {statistics.median(times) * 1e3:.3f} |")
    stats = {}
    for name, before in (("back to back", befores["nothing (back to back)"]),
                         ("after 2 ms spinning", befores["2 ms spinning on perf_counter"])):
        profile = cProfile.Profile()
        for _ in range(args.repeat):
            before()
            profile.enable()
            call()
            profile.disable()
        stats[name] = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    hot, cold = stats["back to back"], stats["after 2 ms spinning"]
    calls = {name: sum(v[1] for v in s.values()) for name, s in stats.items()}
    seconds = {name: sum(v[2] for v in s.values()) for name, s in stats.items()}
    hot_ms, cold_ms = (seconds[n] / args.repeat * 1e3 for n in ("back to back", "after 2 ms spinning"))
    print(f"\ncProfile, {args.repeat} calls each: function calls {calls['back to back']:,} back to back, "
          f"{calls['after 2 ms spinning']:,} after 2 ms spinning; own time {hot_ms:.3f} vs {cold_ms:.3f} "
          "ms a call (profiled)")
    grew = [(cold.get(k, (0, 0, 0.0))[2] - v[2], k) for k, v in hot.items()]
    slower = sum(1 for d, _ in grew if d > 0)
    print(f"functions slower after spinning: {slower} of {len(grew)}; the five that grew most (ms a call):")
    for delta, key in sorted(grew, reverse=True)[:5]:
        print(f"  +{delta / args.repeat * 1e3:.4f}  {key[0].rsplit('/', 1)[-1]}:{key[1]} {key[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
