"""Smoke runs of the benchmark scripts at a tiny size: they run from a checkout and end with their
summary line (the real runs are by hand; their output is in benchmarks/RESULTS.md).

Each script runs as a subprocess that spends most of its time importing litellm, starting processes
of its own or in one CPU-bound loop, so the runs go two at a time (this machine's cores), longest
first, started when the module's first test asks: :data:`SMOKES` lists them, and each test names
its run with a ``smoke`` marker. A run that talks to Redis gets a database of its own, emptied first,
so that two at once never meet in the store."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest

from .conftest import ROOT, SHARED

TIMEOUT_S = 600


@dataclass(frozen=True)
class Smoke:
    """A benchmark script's smoke run: its arguments, whether it gets ``--redis-url``, and what it
    needs that may be missing here (``proxy``, ``shared``, ``onnx``)."""

    script: str
    args: tuple[str, ...] = ()
    redis: bool = False
    needs: tuple[str, ...] = ()


SMOKES: dict[str, Smoke] = {  # longest first (80 s alone on this machine, down to 9 s)
    "proxy_throughput": Smoke("proxy_throughput.py", ("--clients", "2", "--requests", "4", "--stream-requests", "2",
                                                      "--rounds", "1", "--ledger"), redis=True, needs=("proxy",)),
    "redis_workers": Smoke("redis_workers.py", ("--workers", "1,2", "--seconds", "1", "--concurrency", "5"),
                           redis=True),
    "proxy_overhead": Smoke("proxy_overhead.py", ("--repeat", "2"), needs=("proxy",)),
    "overhead_http": Smoke("overhead_http.py", ("--repeat", "3")),
    "overhead": Smoke("overhead.py", ("--repeat", "3")),
    "context": Smoke("context.py", ("--limit", "1", "--steps", "80"), needs=("shared",)),
    "throughput": Smoke("throughput.py", ("--calls", "20", "--rounds", "1"), redis=True),
    "throughput_steady": Smoke("throughput.py", ("--calls", "20", "--rounds", "1", "--freeze", "--warm", "--router"),
                               redis=True),
    "redis_commands": Smoke("redis_commands.py", ("--calls", "10"), redis=True),
    "overhead_traced": Smoke("overhead.py", ("--repeat", "3", "--otel-sdk")),
    "redis_commands_concurrent": Smoke("redis_commands.py", ("--calls", "10", "--concurrent"), redis=True),
    "proxy_stream_hook": Smoke("proxy_stream_hook.py", ("--chunks", "1,5", "--repeat", "3"), needs=("proxy",)),
    "semantic": Smoke("semantic.py", ("--cost", "2"), needs=("onnx", "shared")),
    "savings": Smoke("savings.py"),
    "adapters": Smoke("adapters.py", ("--steps", "3", "--sizes", "20")),
    "routed_replay": Smoke("routed_replay.py", ("--limit", "1"), needs=("shared",)),
    "redis_commands_semantic": Smoke("redis_commands.py", ("--calls", "10", "--concurrent", "--semantic"), redis=True),
    "routing": Smoke("routing.py", ("--sample", "1000"), needs=("shared",)),
    "gc_pressure": Smoke("gc_pressure.py", ("--calls", "20", "--rounds", "1"), redis=True),
    "breaker": Smoke("breaker.py", ("--seconds", "0.5", "--cooldown", "0.2"), redis=True),
    "stubbed_cpu": Smoke("stubbed_cpu.py", ("--batches", "2", "--calls", "20"), redis=True),
}


def _missing(need: str, script: str) -> str | None:
    """Why ``script`` cannot run here for want of ``need``, or ``None``."""
    if need == "shared":
        found = (SHARED / "data").is_dir()
        return None if found else f"{script} reads the shared data, not found at {SHARED / 'data'} " \
                                  "(set ROUTER_MIDDLEWARE_SHARED)"
    if need == "onnx":
        found = importlib.util.find_spec("onnxruntime") is not None
        return None if found else "the semantic extra (in `all`) runs the local embedder"
    from .litellm_proxy import proxy_missing

    return proxy_missing()


def _database(url: str, offset: int) -> str:
    """``url`` on the database ``offset`` after its own, emptied (a server with too few databases, or
    one that cannot be emptied, fails the run that would use it, with Redis's error)."""
    import redis

    parts = urlsplit(url)
    found = urlunsplit(parts._replace(path=f"/{int(parts.path.strip('/') or 0) + offset}"))
    redis.Redis.from_url(found).flushdb()
    return found


class Runs:
    """The smoke runs the selected tests name, two at a time in :data:`SMOKES`' order."""

    def __init__(self, names: set[str], redis_url: str | None, redis_missing: str | None) -> None:
        self.skipped: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._processes: list[subprocess.Popen[str]] = []
        self._pool = ThreadPoolExecutor(max_workers=2)
        self._runs: dict[str, Future[subprocess.CompletedProcess[str]]] = {}
        ready: list[tuple[str, Smoke, list[str]]] = []
        databases = 0
        for name, smoke in SMOKES.items():
            if name not in names:
                continue
            reason = next((r for need in smoke.needs if (r := _missing(need, smoke.script))), None)
            if reason is None and smoke.redis and redis_url is None:
                reason = redis_missing or "no Redis"
            if reason is not None:
                self.skipped[name] = reason
                continue
            args = list(smoke.args)
            if smoke.redis and redis_url is not None:
                databases += 1
                try:
                    args += ["--redis-url", _database(redis_url, databases)]
                except Exception as exc:  # noqa: BLE001 - this run's failure, not the module's
                    self.failed[name] = f"no Redis database {databases} after REDIS_URL's ({redis_url}): {exc}"
                    continue
            ready.append((name, smoke, args))
        for name, smoke, args in ready:  # every database worked out before any run starts
            self._runs[name] = self._pool.submit(self._run, smoke.script, args)

    def _run(self, script: str, args: list[str]) -> subprocess.CompletedProcess[str]:
        process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / script), *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                   env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
        self._processes.append(process)
        try:
            out, err = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            err += f"\n(killed after {TIMEOUT_S} s)"
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def output(self, name: str) -> str:
        """The run's standard output, once it ended well (skipped as the run is)."""
        if name in self.skipped:
            pytest.skip(self.skipped[name])
        assert name not in self.failed, self.failed.get(name)
        done = self._runs[name].result()
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in self._processes:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest) -> Iterator[Runs]:
    names = {marker.args[0] for item in request.session.items if item.module is request.module
             for marker in item.iter_markers("smoke")}
    url, missing = None, None
    if any(SMOKES[name].redis for name in names):
        try:
            url = request.getfixturevalue("redis_url")
        except pytest.skip.Exception as exc:
            missing = str(exc.msg)
    found = Runs(names, url, missing)
    yield found
    found.close()


@pytest.fixture
def out(request: pytest.FixtureRequest, runs: Runs) -> str:
    """The output of the run the test's ``smoke`` marker names."""
    marker = request.node.get_closest_marker("smoke")
    assert marker is not None, "each test here names its run with @pytest.mark.smoke(name)"
    return runs.output(marker.args[0])


def _runs(*names: str) -> list[object]:
    """One parameter per run, each marked with its run's name (the test's parameter)."""
    return [pytest.param(name, marks=pytest.mark.smoke(name), id=name) for name in names]


@pytest.mark.parametrize("run", _runs("overhead", "overhead_traced"))
def test_overhead_smoke(out: str, run: str) -> None:
    assert "| 300 messages | async |" in out and out.strip().splitlines()[-1].startswith("summary: wrapped/bare")
    assert ("OpenTelemetry SDK recording spans" in out.splitlines()[0]) is (run == "overhead_traced")
    assert "own work per call, provider stubbed (20 messages, sync): back to back" in out
    assert "| litellm Router, one deployment | one span around the call (the floor) |" in out
    assert "| make_call + plan per agent step | same dicts resent (ms) | new dicts every call (ms) |" in out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith(("| sync |", "| async |"))] \
        == ["| sync", "| async"]  # the peers' rows


@pytest.mark.smoke("overhead_http")
def test_overhead_over_http_smoke(out: str) -> None:
    rows = [line.split(" | ")[1] for line in out.splitlines() if line.startswith("| | ")]
    assert rows == ["sync", "async", "sync, streamed", "async, streamed", "sync, streamed, usage asked",
                    "async, streamed, usage asked"]
    assert out.strip().splitlines()[-1].startswith("summary: wrapped/bare")


@pytest.mark.smoke("proxy_overhead")
def test_proxy_overhead_smoke(out: str) -> None:
    assert "| plain |" in out and "| streamed, usage asked |" in out
    assert out.strip().splitlines()[-1].startswith("summary: hook/no hook")


@pytest.mark.smoke("proxy_stream_hook")
def test_proxy_stream_hook_smoke(out: str) -> None:
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| 1 | ", "| 5 | "))]
    assert len(rows) == 2 and all(len(row) == 4 for row in rows)
    assert "RouterLogger (ms)" in out


@pytest.mark.smoke("proxy_throughput")
def test_proxy_throughput_smoke(out: str) -> None:
    assert "the hook writing its ledger to SQLite" in out.splitlines()[0]
    rows = [line.split(" | ")[1:3] for line in out.splitlines() if line.startswith("| 2 | ")]
    assert rows == [[shape, proxy] for shape in ("plain", "streamed, usage asked")
                    for proxy in ("no hook", "hook, memory", "hook, redis")]
    assert out.strip().splitlines()[-1].startswith("summary: hook/no hook")


@pytest.mark.parametrize("run", _runs("throughput", "throughput_steady"))
def test_throughput_smoke(out: str, run: str) -> None:
    steady = run == "throughput_steady"
    assert "| pipeline, redis store |" in out and out.strip().splitlines()[-1].startswith("summary: calls/s")
    assert ("| litellm Router, redis |" in out) is steady
    assert ("startup objects frozen (gc.freeze), each batch after 20 untimed calls" in out.splitlines()[0]) is steady


@pytest.mark.smoke("gc_pressure")
def test_gc_pressure_smoke(out: str) -> None:
    assert "| pipeline, redis store |" in out and out.strip().splitlines()[-1].startswith("summary: objects promoted")


@pytest.mark.parametrize("run", _runs("context", "routing", "routed_replay"))
def test_quality_benchmarks_smoke(out: str, run: str) -> None:
    assert out.strip().splitlines()[-1].startswith("summary:")


@pytest.mark.parametrize("run", _runs("redis_commands", "redis_commands_concurrent", "redis_commands_semantic"))
def test_redis_commands_smoke(out: str, run: str) -> None:
    assert "round trips per call" in out and out.strip().splitlines()[-1].startswith("redis-server CPU per call")


@pytest.mark.smoke("redis_workers")
def test_redis_workers_smoke(out: str) -> None:
    assert "| 2 |" in out and out.strip().splitlines()[-1].startswith("summary: one Redis core serves")


@pytest.mark.smoke("adapters")
def test_adapters_smoke(out: str) -> None:
    assert "| 20 messages |" in out and out.strip().splitlines()[-1].startswith("summary: proxy hook / agent middleware")
    cached = next(line for line in out.splitlines() if "cache on, temperature 0, hits" in line)
    rows = [line for line in out.splitlines() if line.startswith("| 20 messages |")]
    assert cached and len(rows) == 2 and len(rows[1].split("|")) == 7  # the cache table: four timings


@pytest.mark.smoke("breaker")
def test_breaker_smoke(out: str) -> None:
    assert "| of them after its first failure |" in out and out.strip().splitlines()[-1].startswith("summary: ")


@pytest.mark.smoke("semantic")
def test_semantic_cost_smoke(out: str) -> None:
    rows = [line.split(" | ")[0][2:] for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["call", "no semantic cache", "miss (scope holds entries)", "hit (a paraphrase)"]
    assert out.splitlines()[-2].endswith("| 1.00 |") and out.splitlines()[-1].endswith("| 1.00 |")  # one embedding


@pytest.mark.smoke("savings")
def test_savings_smoke(out: str) -> None:
    lines = out.strip().splitlines()[-3:]
    assert [line.split(":")[0] for line in lines] == ["deepseek session (window)",
                                                       "deepseek session resumed at step 40 (window)",
                                                       "anthropic agent (breakpoints)"]
    assert "with a negative saving: 1" in lines[0] and "with a negative saving: 1" in lines[2]
    assert re.search(r"resumed .* max [0-9.]+% off", lines[1]) and float(re.findall(r"max ([0-9.]+)%", lines[1])[0]) < 10


@pytest.mark.smoke("stubbed_cpu")
def test_stubbed_cpu_smoke(out: str) -> None:
    line = out.strip().splitlines()[-1]
    assert line.startswith("redis store, ") and "CPU per call median" in line
    assert len(line.split("(")[-1].rstrip(")").split()) == 2  # one figure per batch
