"""Throughput under concurrency: 1,000 concurrent async calls, bare litellm vs the pipeline with
budgets and cooldowns kept in memory vs in Redis, all with `mock_response`, measured in one run.

    .venv/bin/python benchmarks/throughput.py [--calls 1000] [--rounds 5] [--redis-url URL]
        [--leave-logging] [--freeze] [--warm] [--router] [--http]

Each round launches all calls at once with `asyncio.gather` (20-message agent history, routed
through a two-model alias with a USD and a token budget and the circuit breaker), and times the
batch until litellm has also done the background logging of its calls (each variant pays for its
own: a process can only sustain the rate at which it also logs); the three variants alternate
round by round, and the median calls/s is reported, then each round's ratio to the bare batch just
before it (median and range: on a shared machine the rate drifts by several percent between
rounds, and a ratio of neighbours is less exposed to the drift). Without
`--redis-url` (or REDIS_URL) a `redis-server` on a free loopback port is started for the run. On
the async path the Redis store's reads, admissions and settlements go through its batched asyncio
client, and the call's lifecycle runs on the event loop: this measures what that costs against the
in-memory store.

`--freeze` moves everything alive after the warm-up out of the collector's reach (`gc.freeze()`), as
the LiteLLM proxy does once it has started (litellm/proxy/proxy_server.py): a full collection then
walks only what the calls themselves keep, not litellm's few hundred thousand startup objects. It
measures the variants as they run behind that proxy; without it, as in a process that never
freezes (see `gc_pressure.py` for what the collector costs each variant there).

`--warm` runs 20 untimed calls of a variant just before each of its timed batches. Between its
batches a variant sits idle while the others run (about 3 s here), longer than the pipeline keeps
what it read from Redis (1 s, served 1 s more while one call renews it), so without it every
Redis batch starts with a burst whose calls all wait for one read before they are planned; with
it, a batch runs as in a process that serves calls without pause.

`--router` adds the peer doing the same job inside litellm: a ``litellm.Router`` with the same
two-model group, its cooldowns (3 failures, 30 s) and a provider budget (USD per hour), once with
its state in memory and once with ``redis_url`` (it keeps its spend in memory and syncs it with
Redis in the background; the pipeline reserves and settles each call in Redis atomically).

`--http` sends every variant's calls over litellm's real HTTP path, to the loopback server of
``overhead_http.py`` (a process of its own replaying the recorded OpenAI reply), instead of
``mock_response``. Then the usage is the provider's, as in production, and each answer also feeds
the answering target's speed averages (`mock_response` usage feeds none). litellm's HTTP client
keeps at most 500 connections to one host, so half of each batch waits for a connection, in every
variant alike.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager, nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

import router_middleware as rm  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
import litellm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from overhead import history  # noqa: E402
from overhead_http import replay_server  # noqa: E402

MODELS = ("gpt-4o-mini", "gpt-3.5-turbo")
T = TypeVar("T")


def config(store: str, models: tuple[str, ...] = MODELS) -> dict[str, Any]:
    return {
        "store": store,
        "cache": {"enabled": False},
        "routing": {
            "aliases": {"coder": list(models)},
            "budgets": [{"name": "team", "scope": "app", "usd": 1_000_000, "tokens": 10**12, "window_s": 3600}],
            "cooldown": {"failures": 3, "window_s": 60, "cooldown_s": 30},
        },
        "app": f"bench-{time.time_ns()}",
    }


@contextmanager
def redis_server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("no redis-server: install it (apt-get install redis-server) or pass --redis-url")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="rm-bench-redis-")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


async def batch(call: Callable[[], Awaitable[Any]], calls: int, *, own_logging: bool = True) -> float:
    """Calls/s of ``calls`` concurrent calls. litellm logs each async call on a background worker
    (about 1 ms of CPU a call); ``own_logging``: the batch ends when the logging of its own calls is
    done, so no variant hands its backlog to the next one (without it, the bare and memory batches
    leave ~900 jobs queued that the Redis batch, idle while it waits on its socket, works off)."""
    from router_middleware import wire

    if own_logging:
        await wire.drain_callbacks()  # nothing left over from before (warm-up, an earlier variant)
    start = time.perf_counter()
    results = await asyncio.gather(*(call() for _ in range(calls)), return_exceptions=True)
    if own_logging:
        await wire.drain_callbacks()
    elapsed = time.perf_counter() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise SystemExit(f"{len(failures)} of {calls} calls failed, first: {failures[0]!r}")
    return calls / elapsed


def router(redis_url: str | None, models: tuple[str, ...], sent: dict[str, Any]) -> Any:
    """litellm's ``Router`` over the same two models, with cooldowns and a provider budget."""
    return litellm.Router(
        model_list=[{"model_name": "coder", "litellm_params": {"model": model, "api_key": "sk-bench", **sent}}
                    for model in models],
        allowed_fails=3, cooldown_time=30, redis_url=redis_url,
        provider_budget_config={"openai": {"budget_limit": 1_000_000, "time_period": "1h"}})


def variants(redis_url: str, peers: bool = False, http: str | None = None) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call of each variant (bare litellm, the pipeline on memory and on Redis; with ``peers``,
    litellm's Router on memory and on Redis), warmed up by ``run``; with ``http``, sent to that
    base URL rather than answered by ``mock_response``."""
    messages = history(20)
    models = tuple(f"openai/{m}" for m in MODELS) if http else MODELS
    sent: dict[str, Any] = {"api_base": http} if http else {}
    answer: dict[str, Any] = {"api_key": "sk-bench"} if http else {"mock_response": "ok"}
    memory = rm.Pipeline.from_config(config("memory://", models))
    redis = rm.Pipeline.from_config(config(redis_url, models))
    extra: dict[str, Callable[[], Awaitable[Any]]] = {}
    if peers:
        in_memory, on_redis = router(None, models, sent), router(redis_url, models, sent)
        mock = {} if http else answer
        extra = {"litellm Router, memory": lambda: in_memory.acompletion(model="coder", messages=messages, **mock),
                 "litellm Router, redis": lambda: on_redis.acompletion(model="coder", messages=messages, **mock)}
    return {
        "bare litellm": lambda: litellm.acompletion(model=models[0], messages=messages, **sent, **answer),
        "pipeline, memory store": lambda: memory.acompletion("coder", messages, context={"session_id": "s"},
                                                             **sent, **answer),
        "pipeline, redis store": lambda: redis.acompletion("coder", messages, context={"session_id": "s"},
                                                           **sent, **answer),
        **extra,
    }


async def run(calls: int, rounds: int, redis_url: str, own_logging: bool = True, freeze: bool = False,
              warm: bool = False, peers: bool = False, http: str | None = None) -> dict[str, list[float]]:
    variants_ = variants(redis_url, peers, http)
    for call in variants_.values():  # warm up
        await batch(call, 50)
    if freeze:  # what the LiteLLM proxy does after its startup
        gc.collect()
        gc.freeze()
    rates: dict[str, list[float]] = {name: [] for name in variants_}
    for _ in range(rounds):
        for name, call in variants_.items():
            if warm:
                await batch(call, 20)
            rates[name].append(await batch(call, calls, own_logging=own_logging))
    return rates


def run_ending(main: Coroutine[Any, Any, T], leftover_s: float = 10.0) -> T:
    """``asyncio.run(main)``, except that the tasks still pending once ``main`` returned get
    ``leftover_s`` to end after they are cancelled; those that do not are named on stderr and left.
    The ``--router`` runs (litellm's Router with ``redis_url``, 1.110.2) sometimes leave a task of
    litellm's Redis stores (a ``_internal_context.run_async`` coroutine) that does not end when
    cancelled: ``asyncio.run`` waited on it until a CI run killed the smoke run after 600 s (1 run in
    16 here, two at once)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        result = loop.run_until_complete(main)
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            _, stuck = loop.run_until_complete(asyncio.wait(left, timeout=leftover_s))
            for task in stuck:
                print(f"left running after {leftover_s} s, cancelled: {task!r}"[:500], file=sys.stderr)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        return result
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def batch_options(description: str | None, rounds: int) -> argparse.ArgumentParser:
    """The options of a benchmark that runs these variants in concurrent batches: calls per batch,
    rounds, and the Redis to use (a server of its own without one)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = batch_options(__doc__, rounds=5)
    parser.add_argument("--leave-logging", action="store_true",
                        help="end each batch when its calls return, leaving litellm's logging of them queued "
                             "(how this benchmark measured before 2026-11-29: the backlog lands on the next variant)")
    parser.add_argument("--freeze", action="store_true",
                        help="gc.freeze() after the warm-up, as the LiteLLM proxy does after its startup")
    parser.add_argument("--warm", action="store_true",
                        help="20 untimed calls of a variant before each of its timed batches (no idle gap)")
    parser.add_argument("--router", action="store_true",
                        help="add litellm's Router (same group, cooldowns, a provider budget) on memory and Redis")
    parser.add_argument("--http", action="store_true",
                        help="over litellm's HTTP path to a loopback server replaying a recorded reply")
    args = parser.parse_args(argv)
    print(f"throughput benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, litellm {version('litellm')}, redis-py {version('redis')}, "
          f"{args.calls} concurrent async calls x {args.rounds} rounds (median), "
          + ("litellm logging left queued" if args.leave_logging else "each batch waits for its own litellm logging")
          + (", startup objects frozen (gc.freeze)" if args.freeze else "")
          + (", each batch after 20 untimed calls of its variant" if args.warm else "")
          + (", over HTTP to a loopback server replaying a recorded reply\n" if args.http else ", mock_response\n"))
    with redis_server(args.redis_url) as url, (replay_server() if args.http else nullcontext()) as base:
        logging.getLogger("LiteLLM").setLevel(logging.ERROR)  # "connection pool saturated": every variant alike
        rounds = run_ending(run(args.calls, args.rounds, url, own_logging=not args.leave_logging,
                                 freeze=args.freeze, warm=args.warm, peers=args.router, http=base))
    rates = {name: statistics.median(values) for name, values in rounds.items()}
    bare = rates["bare litellm"]
    print("| variant | calls/s | ratio to bare litellm |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.0f} | {rate / bare:.3f} |")
    paired = {name: [rate / base for rate, base in zip(values, rounds["bare litellm"], strict=True)]
              for name, values in rounds.items() if name != "bare litellm"}
    print("\nper round, against that round's bare batch (median, min-max): " + ", ".join(
        f"{name} x{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f})" for name, r in paired.items()))
    memory, redis = rates["pipeline, memory store"], rates["pipeline, redis store"]
    print(f"\nsummary: calls/s ratio memory/bare x{memory / bare:.3f}, redis/bare x{redis / bare:.3f}, "
          f"redis/memory x{redis / memory:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
