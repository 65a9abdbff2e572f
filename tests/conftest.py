from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Cassettes replay real recordings; the SDKs only need a key to be present.
os.environ.setdefault("OPENAI_API_KEY", "sk-test-cassette")
os.environ.setdefault("ANTHROPIC_API_KEY", "sk-ant-test-cassette")

ROOT = Path(__file__).resolve().parents[1]
CASSETTES = ROOT / "cassettes"
SHARED = Path(os.environ.get("ROUTER_MIDDLEWARE_SHARED", ROOT.parent / "shared"))
AGENT_SESSIONS = SHARED / "data" / "agent-sessions"


@pytest.fixture(autouse=True)
def _clear_of_an_hour_s_end() -> None:
    """Budgets count per window of ``window_s`` aligned to UTC (an hour or a day in these tests): a
    test crossing a window's end sees what it counted reset and fails. One starting in the last 30 s
    of an hour waits for the next (a day ends with an hour): at most 30 s per hour of the run."""
    left = 3600 - time.time() % 3600
    if left < 30:
        time.sleep(left + 0.5)


def cline_request(name: str) -> dict:
    """The body of a recorded Cline request (``../shared/data/cline-requests/<name>``); skips the
    test when the shared data is absent."""
    import json

    path = SHARED / "data" / "cline-requests" / name
    if not path.exists():
        pytest.skip(f"shared Cline requests not found at {path.parent} (set ROUTER_MIDDLEWARE_SHARED)")
    return json.loads(path.read_text())["body"]


@pytest.fixture(scope="session")
def agent_session_paths() -> list[Path]:
    paths = sorted(AGENT_SESSIONS.glob("*.json"))
    if not paths:
        pytest.skip(f"shared agent sessions not found at {AGENT_SESSIONS} (set ROUTER_MIDDLEWARE_SHARED)")
    return paths


@pytest.fixture
def one_quota_window(monkeypatch):
    """Per-minute quota windows counted on a clock that starts the test one second into a minute, so
    a test of a few calls never sees its count reset at a minute's turn (a CI run did: an rpm limit of
    1 used up at 09:53:59 was free again at 09:54:00). A shift, not a frozen clock: windows and their
    expiries move with real time, and a test runs in its first minute for 59 seconds."""
    import time

    from router_middleware.bookkeeping import quotas as counted
    from router_middleware.routing import quotas as pure

    real = pure.window
    shift = time.time() % 60 - 1.0

    def shifted(bucket: str, kind: str, now: float) -> tuple[str, float]:
        return real(bucket, kind, now - shift)

    monkeypatch.setattr(pure, "window", shifted)
    monkeypatch.setattr(counted, "window", shifted)


@pytest.fixture
def span_exporter():
    """An SDK tracer provider with an in-memory exporter, installed for the test only."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    original = trace.get_tracer_provider
    trace.get_tracer_provider = lambda: provider  # type: ignore[assignment]
    try:
        yield exporter
    finally:
        trace.get_tracer_provider = original  # type: ignore[assignment]
        provider.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def service_missing(why: str, *, module: bool = False) -> None:
    """A real service a test needs is not here: an error in CI (.ci/run must provide it), a skip locally."""
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must provide this (see .ci/run): {why}")
    pytest.skip(why, allow_module_level=module)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real redis-server: REDIS_URL from .ci/run (a database the tests empty first: what an earlier
    run left there would leak into this one), or one started here if the binary exists. Under
    pytest-xdist only the first worker uses REDIS_URL; each other worker starts a server of its own
    (tests read the server's command counts and flush its scripts)."""
    import shutil
    import subprocess
    import time

    url = os.environ.get("REDIS_URL")
    if url and os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        url = None  # (the other workers' tests would meet in REDIS_URL's database)
    if url:
        import redis

        redis.Redis.from_url(url).flushdb()
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        service_missing("no redis-server: install it (apt-get install redis-server), or set REDIS_URL and run "
                        "the tests in one process (-n 0)")
    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store(request, tmp_path):
    """Each backend in turn (Redis under a prefix of its own); a test file may define its own ``store``."""
    import uuid

    from router_middleware.stores import MemoryStore, SQLiteStore

    if request.param == "memory":
        backend = MemoryStore()
    elif request.param == "sqlite":
        backend = SQLiteStore(tmp_path / "state.db")
    else:
        from router_middleware.stores.redis import RedisStore

        backend = RedisStore(request.getfixturevalue("redis_url"), prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield backend
    backend.close()


def _worker_database(url: str) -> str:
    """``url``, or under pytest-xdist a database of this worker's own on its server, made afresh (the
    ledger tests migrate and empty their tables)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return url
    from urllib.parse import urlsplit, urlunsplit

    import psycopg

    parts = urlsplit(url)
    name = f"{parts.path.strip('/') or 'postgres'}_{worker}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server: PG_URL from .ci/run, or one started here (root, Debian's binaries)."""
    import glob
    import subprocess

    url = os.environ.get("PG_URL")
    if url:
        yield _worker_database(url)
        return
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") or os.geteuid() != 0:
        service_missing("no PostgreSQL server binaries (apt-get install postgresql) or not root; or set PG_URL")
    port = str(_free_port())
    script = str(ROOT / "tests" / "services" / "postgres.sh")
    url = subprocess.run(["bash", script, "start", port], check=True, capture_output=True, text=True).stdout.strip()
    try:
        yield url
    finally:
        subprocess.run(["bash", script, "stop", port], check=False)
