"""Smoke runs of the benchmark scripts at a tiny size: they run from a checkout and end with their
summary line (the real runs are by hand; their output is in benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT, SHARED


def _needs_shared(script: str) -> None:
    """Skip a benchmark that reads the recorded data in ``../shared/data`` when it is not there."""
    if not (SHARED / "data").is_dir():
        pytest.skip(f"{script} reads the shared data, not found at {SHARED / 'data'} (set ROUTER_MIDDLEWARE_SHARED)")


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("traced", [False, True])
def test_overhead_smoke(traced: bool) -> None:
    out = _run("overhead.py", "--repeat", "3", *(["--otel-sdk"] if traced else []))
    assert "| 300 messages | async |" in out and out.strip().splitlines()[-1].startswith("summary: wrapped/bare")
    assert ("OpenTelemetry SDK recording spans" in out.splitlines()[0]) is traced
    assert "own work per call, provider stubbed (20 messages, sync): back to back" in out
    assert "| litellm Router, one deployment | one span around the call (the floor) |" in out
    assert "| make_call + plan per agent step | same dicts resent (ms) | new dicts every call (ms) |" in out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith(("| sync |", "| async |"))] \
        == ["| sync", "| async"]  # the peers' rows


def test_overhead_over_http_smoke() -> None:
    out = _run("overhead_http.py", "--repeat", "3")
    rows = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| | ")]
    assert rows == ["sync", "async", "sync, streamed", "async, streamed", "sync, streamed, usage asked",
                    "async, streamed, usage asked"]
    assert out.strip().splitlines()[-1].startswith("summary: wrapped/bare")


def test_proxy_overhead_smoke() -> None:
    from .litellm_proxy import proxy_missing

    if proxy_missing():
        pytest.skip(proxy_missing())
    out = _run("proxy_overhead.py", "--repeat", "2")
    assert "| plain |" in out and "| streamed, usage asked |" in out
    assert out.strip().splitlines()[-1].startswith("summary: hook/no hook")


def test_proxy_throughput_smoke(redis_url) -> None:
    from .litellm_proxy import proxy_missing

    if proxy_missing():
        pytest.skip(proxy_missing())
    out = _run("proxy_throughput.py", "--clients", "2", "--requests", "4", "--stream-requests", "2", "--rounds", "1",
               "--ledger", "--redis-url", redis_url)
    assert "the hook writing its ledger to SQLite" in out.splitlines()[0]
    rows = [line.split(" | ")[1:3] for line in out.splitlines() if line.startswith("| 2 | ")]
    assert rows == [[shape, proxy] for shape in ("plain", "streamed, usage asked")
                    for proxy in ("no hook", "hook, memory", "hook, redis")]
    assert out.strip().splitlines()[-1].startswith("summary: hook/no hook")


@pytest.mark.parametrize("steady", [False, True])
def test_throughput_smoke(redis_url, steady: bool) -> None:
    out = _run("throughput.py", "--calls", "20", "--rounds", "1", "--redis-url", redis_url,
               *(["--freeze", "--warm", "--router"] if steady else []))
    assert "| pipeline, redis store |" in out and out.strip().splitlines()[-1].startswith("summary: calls/s")
    assert ("| litellm Router, redis |" in out) is steady
    assert ("startup objects frozen (gc.freeze), each batch after 20 untimed calls" in out.splitlines()[0]) is steady


def test_gc_pressure_smoke(redis_url) -> None:
    out = _run("gc_pressure.py", "--calls", "20", "--rounds", "1", "--redis-url", redis_url)
    assert "| pipeline, redis store |" in out and out.strip().splitlines()[-1].startswith("summary: objects promoted")


@pytest.mark.parametrize("script", ["context.py", "routing.py", "routed_replay.py"])
def test_quality_benchmarks_smoke(script: str) -> None:
    _needs_shared(script)
    args = ("--limit", "1") if script in ("context.py", "routed_replay.py") else ()
    out = _run(script, *args)
    assert out.strip().splitlines()[-1].startswith("summary:")


@pytest.mark.parametrize("mode", [(), ("--concurrent",), ("--concurrent", "--semantic")],
                         ids=["sync", "concurrent", "semantic"])
def test_redis_commands_smoke(redis_url, mode) -> None:
    out = _run("redis_commands.py", "--calls", "10", "--redis-url", redis_url, *mode)
    assert "round trips per call" in out and out.strip().splitlines()[-1].startswith("redis-server CPU per call")


def test_redis_workers_smoke(redis_url) -> None:
    out = _run("redis_workers.py", "--workers", "1,2", "--seconds", "1", "--concurrency", "5", "--redis-url", redis_url)
    assert "| 2 |" in out and out.strip().splitlines()[-1].startswith("summary: one Redis core serves")


def test_adapters_smoke() -> None:
    out = _run("adapters.py", "--steps", "3", "--sizes", "20")
    assert "| 20 messages |" in out and out.strip().splitlines()[-1].startswith("summary: proxy hook / agent middleware")


def test_breaker_smoke(redis_url) -> None:
    out = _run("breaker.py", "--seconds", "0.5", "--cooldown", "0.2", "--redis-url", redis_url)
    assert "| of them after its first failure |" in out and out.strip().splitlines()[-1].startswith("summary: ")


def test_semantic_cost_smoke() -> None:
    pytest.importorskip("onnxruntime", reason="the semantic extra (in `all`) runs the local embedder")
    _needs_shared("semantic.py")
    out = _run("semantic.py", "--cost", "2")
    rows = [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["call", "no semantic cache", "miss (scope holds entries)", "hit (a paraphrase)"]
    assert out.splitlines()[-2].endswith("| 1.00 |") and out.splitlines()[-1].endswith("| 1.00 |")  # one embedding
