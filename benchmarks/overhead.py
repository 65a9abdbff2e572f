"""Overhead of the pipeline vs bare litellm, both with `mock_response`, measured in one run.

    .venv/bin/python benchmarks/overhead.py [--repeat N] [--otel-sdk]

For 20- and 300-message agent histories: median wall time of `litellm.completion` /
`litellm.acompletion` (bare) and of `Pipeline.completion` / `acompletion` with the default policies
(wrapped), their ratio, litellm sent the request the pipeline planned (trimmed at 300 messages,
so the wrapped call can beat bare), the pipeline's own overhead (wrapped minus that), and the
median planning time alone. Calls are spaced by 2 ms so that litellm's background logging of one
call (a thread, or a task) does not run inside the next one's timing. Bare and wrapped calls alternate so that
machine noise hits both alike. Logging is filtered to warnings (an application's usual setup); no
OpenTelemetry SDK is installed, as in an application that has not configured one, unless
``--otel-sdk``: an SDK tracer provider whose spans go to a batch processor and an exporter that
drops them (a traced application, without the network). Last, the pipeline's own work alone (the
provider stubbed): back to back, after 2 ms idle, and after a bare litellm call and 2 ms idle (the
paired runs' conditions). Its code and data are then out of the CPU's caches (a tight loop of the
same length is not slowed by the idle), and it costs nearly twice its back-to-back time.
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
import tracemalloc
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

import router_middleware as rm  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
import litellm  # noqa: E402


def history(n: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a coding agent."},
                                      {"role": "user", "content": "Fix the failing test in src/app/models.py"}]
    i = 0
    while len(messages) < n:
        call_id = f"call_{i}"
        messages.append({"role": "assistant", "content": f"Step {i}: inspect the next file.",
                         "tool_calls": [{"id": call_id, "type": "function",
                                         "function": {"name": "bash", "arguments": f'{{"command": "cat f{i}.py"}}'}}]})
        messages.append({"role": "tool", "tool_call_id": call_id, "content": f"def f{i}():\n    return {i}\n" * 20})
        i += 1
    return messages[:n] if messages[n - 1].get("role") == "tool" else messages[: n - 1]


def paired(calls: list[Callable[[], Any]], repeat: int) -> list[float]:
    """Median time of each callable, run in turn so machine noise hits them alike, after as many
    untimed rounds as timed ones, ten at most."""
    for _ in range(min(10, repeat)):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append(time.perf_counter() - start)
            time.sleep(0.002)  # litellm logs each call on a background thread: let it finish untimed
    return [statistics.median(t) for t in times]


async def apaired(calls: list[Callable[[], Awaitable[Any]]], repeat: int) -> list[float]:
    for _ in range(min(10, repeat)):
        for call in calls:
            await call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeat):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            await call()
            times[i].append(time.perf_counter() - start)
            await asyncio.sleep(0.002)  # let litellm's background logging of this call finish untimed
    return [statistics.median(t) for t in times]


def own_work(pipeline: rm.Pipeline, messages: list[dict[str, Any]], repeat: int) -> list[float]:
    """Median time of ``Pipeline.completion`` with litellm's ``completion`` stubbed (it returns a copy
    of a prebuilt response): back to back; each call after 2 ms idle; and each after a bare litellm
    call and 2 ms idle, as in the paired runs, where litellm's call and its logging thread run between
    two pipeline calls and take the CPU's caches."""
    kwargs = {"model": "gpt-4o-mini", "messages": messages, "mock_response": "ok"}
    prebuilt = litellm.completion(**kwargs)
    real = litellm.completion

    def stub(**_: Any) -> Any:
        response = prebuilt.model_copy()
        response._hidden_params = dict(prebuilt._hidden_params)
        return response

    medians = []
    for mode in ("back to back", "idle", "after litellm"):
        times = []
        for i in range(repeat + 10):
            if mode == "after litellm":
                real(**kwargs)
                time.sleep(0.002)
            litellm.completion = stub
            try:
                start = time.perf_counter()
                pipeline.completion(**kwargs, context={"session_id": "bench"})
                elapsed = time.perf_counter() - start
            finally:
                litellm.completion = real
            if i >= 10:
                times.append(elapsed)
            if mode != "back to back":
                time.sleep(0.002)
        medians.append(statistics.median(times))
    return medians


def peers(messages: list[dict[str, Any]], pipeline: rm.Pipeline, repeat: int) -> list[tuple[str, list[float]]]:
    """Sync and async medians, in one paired run each: bare litellm, the pipeline, litellm's
    ``Router`` with one deployment, and one span around the call (the floor of a traced wrapper)."""
    from opentelemetry import trace

    tracer = trace.get_tracer("overhead-floor")
    router = litellm.Router(model_list=[{"model_name": "gpt-4o-mini",
                                         "litellm_params": {"model": "gpt-4o-mini", "api_key": "sk-bench"}}])
    kwargs = {"model": "gpt-4o-mini", "messages": messages, "mock_response": "ok"}

    def spanned() -> Any:
        with tracer.start_as_current_span("chat gpt-4o-mini") as span:
            response = litellm.completion(**kwargs)
            span.set_attribute("gen_ai.usage.input_tokens", response.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", response.usage.completion_tokens)
            return response

    async def aspanned() -> Any:
        with tracer.start_as_current_span("chat gpt-4o-mini") as span:
            response = await litellm.acompletion(**kwargs)
            span.set_attribute("gen_ai.usage.input_tokens", response.usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", response.usage.completion_tokens)
            return response

    sync = paired([lambda: litellm.completion(**kwargs),
                   lambda: pipeline.completion(**kwargs, context={"session_id": "bench"}),
                   lambda: router.completion(**kwargs), spanned], repeat)
    run_async = asyncio.run(apaired([lambda: litellm.acompletion(**kwargs),
                                     lambda: pipeline.acompletion(**kwargs, context={"session_id": "bench"}),
                                     lambda: router.acompletion(**kwargs), aspanned], repeat))
    return [("sync", sync), ("async", run_async)]


def per_step(pipeline: rm.Pipeline, size: int, repeat: int, *, copies: bool) -> float:
    """Median ``make_call`` + ``plan`` of one agent step, the history growing by a turn (two
    messages) a step from ``size`` messages, 40 steps a session; ``copies``: new dicts every call."""
    base = history(size + 100)
    times = []
    for i in range(repeat + 40):
        if i % 40 == 0:
            session, grown = f"steps-{copies}-{i}", [dict(m) for m in base[:size]]  # a new session
            grown[1] = {**grown[1], "content": f"{grown[1]['content']} ({session})"}
        else:
            grown = [*grown, {"role": "assistant", "content": f"step {i} done"}, {"role": "user", "content": "go on"}]
        messages = json.loads(json.dumps(grown)) if copies else grown
        start = time.perf_counter()
        pipeline.plan(pipeline.make_call("gpt-4o-mini", messages, {"session_id": session}, {}))
        if i >= 40 and i % 40:  # a session's first step (a history never seen) is not counted
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--otel-sdk", action="store_true", help="record spans with the OpenTelemetry SDK")
    parser.add_argument("--no-peers", action="store_true", help="skip litellm's Router and the one-span floor")
    args = parser.parse_args(argv)
    if args.otel_sdk:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Dropped(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Dropped()))
        trace.set_tracer_provider(provider)
    pipeline = rm.Pipeline.from_config({})
    model = "gpt-4o-mini"
    print(f"overhead benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, litellm {version('litellm')}"
          f", {args.repeat} paired calls each"
          + (", OpenTelemetry SDK recording spans" if args.otel_sdk else "") + "\n")
    print("| history | mode | bare litellm (ms) | Pipeline (ms) | ratio | litellm, planned request (ms) "
          "| overhead (ms) | planning alone (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for size in (20, 300):
        messages = history(size)
        kwargs = {"model": model, "messages": messages, "mock_response": "ok"}
        wrapped_kwargs = {**kwargs, "context": {"session_id": "bench"}}
        call = rm.Call.create(model, messages, {}, {"session_id": "bench"})
        plans = []
        for _ in range(args.repeat):
            fresh = rm.Call.create(model, messages, {}, {"session_id": "bench"})  # a new call, as each step is
            start = time.perf_counter()
            pipeline.plan(fresh)
            plans.append(time.perf_counter() - start)
        planning = statistics.median(plans)
        planned = pipeline.plan(call).request()  # what the pipeline hands litellm (trimmed at 300)
        bare, wrapped, sent = paired([lambda kw=kwargs: litellm.completion(**kw),
                                      lambda kw=wrapped_kwargs: pipeline.completion(**kw),
                                      lambda kw=planned: litellm.completion(**kw, mock_response="ok")], args.repeat)
        abare, awrapped, asent = asyncio.run(apaired(
            [lambda kw=kwargs: litellm.acompletion(**kw), lambda kw=wrapped_kwargs: pipeline.acompletion(**kw),
             lambda kw=planned: litellm.acompletion(**kw, mock_response="ok")], args.repeat))
        for mode, b, w, p in (("sync", bare, wrapped, sent), ("async", abare, awrapped, asent)):
            ratios.append((size, mode, w / b))
            print(f"| {size} messages | {mode} | {b * 1e3:.3f} | {w * 1e3:.3f} | {w / b:.3f} | {p * 1e3:.3f} "
                  f"| {(w - p) * 1e3:.3f} | {planning * 1e3:.3f} |")
    hot, idle, shared = own_work(pipeline, history(20), args.repeat)
    print(f"\nown work per call, provider stubbed (20 messages, sync): back to back {hot * 1e3:.3f} ms, "
          f"after 2 ms idle {idle * 1e3:.3f} ms, after a bare litellm call and 2 ms idle {shared * 1e3:.3f} ms")
    print("\n| make_call + plan per agent step | same dicts resent (ms) | new dicts every call (ms) |")
    print("|---|---|---|")
    for size in (20, 300):
        print(f"| {size} messages | {per_step(pipeline, size, args.repeat, copies=False) * 1e3:.3f} "
              f"| {per_step(pipeline, size, args.repeat, copies=True) * 1e3:.3f} |")
    if not args.no_peers:
        print("\n| 20 messages | bare litellm (ms) | Pipeline | litellm Router, one deployment "
              "| one span around the call (the floor) |")
        print("|---|---|---|---|---|")
        for mode, (bare, wrapped, router, floor) in peers(history(20), pipeline, args.repeat):
            print(f"| {mode} | {bare * 1e3:.3f} | x{wrapped / bare:.3f} | x{router / bare:.3f} | x{floor / bare:.3f} |")
    tracemalloc.start()
    sessions = rm.Pipeline.from_config({})
    before = tracemalloc.take_snapshot()
    for s in range(200):
        sessions.plan(rm.Call.create(model, history(20), {}, {"session_id": f"s{s}"}))
    after = tracemalloc.take_snapshot()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    tracemalloc.stop()
    print(f"\nmemory per active session (200 sessions planned once, 20 messages each): {grown / 200 / 1024:.1f} KiB")
    summary = ", ".join(f"{size}/{mode} x{ratio:.3f}" for size, mode, ratio in ratios)
    print(f"summary: wrapped/bare median ratio {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
