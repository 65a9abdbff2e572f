"""A real coding agent through the LiteLLM proxy with router-middleware's hook.

The Cline CLI (npm ``cline``, pinned in .ci/run) talks to the LiteLLM proxy started from
integrations/litellm-proxy/config.yaml on loopback; the proxy's upstream is the scripted model of
tests/scripted_upstream.py (the only stand-in: no model can be reached). Cline must finish its task,
and its real requests must have gone through the pipeline: routed from the alias, reasoning capped
per step, the prompt-cache key set, usage recorded in the ledger and (with Phoenix) in spans.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import ROOT, service_missing
from .scripted_upstream import USAGE, scripted_upstream

PROXY_DIR = ROOT / "integrations" / "litellm-proxy"
CLINE = Path(os.environ.get("CLINE_BIN") or ROOT / ".ci-cline" / "node_modules" / ".bin" / "cline")
LITELLM = Path(sys.executable).with_name("litellm")


def _missing() -> str | None:
    if not CLINE.exists():
        return f"no Cline CLI at {CLINE} (.ci/run installs it: npm install --prefix .ci-cline cline@3.0.65)"
    try:
        import fastapi  # noqa: F401
    except ImportError:
        return "the LiteLLM proxy needs the `proxy` extra (pip install -e '.[proxy]')"
    return None


if (_why := _missing()) is not None:
    service_missing(_why, module=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


ROUTER_CONFIG = """
app: coding-agent
routing:
  deployments:
    coder-cheap: {{model: openai/gpt-4o-mini}}
    coder-strong: {{model: openai/gpt-5-mini}}
  aliases:
    coder: [coder-strong, coder-cheap]
reasoning:
  rules:
    - when: {{step_kind: [plan]}}
      effort: medium
    - when: {{step_kind: [observe]}}
      effort: low
ledger:
  url: sqlite:///{ledger}
"""


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a process and everything it started (Cline may leave helpers behind)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[dict[str, object]]:
    ledger = tmp_path / "ledger.db"
    (tmp_path / "router.yaml").write_text(ROUTER_CONFIG.format(ledger=ledger))
    project = f"cline-{uuid.uuid4().hex[:8]}"
    with scripted_upstream() as (upstream, seen):
        port = _free_port()
        env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_MASTER_KEY": "sk-proxy-master",
               "CHEAP_API_BASE": upstream, "STRONG_API_BASE": upstream, "CHEAP_API_KEY": "sk-upstream",
               "STRONG_API_KEY": "sk-upstream", "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml"),
               "ROUTER_MIDDLEWARE_PROJECT": project}
        if os.environ.get("PHOENIX_URL"):
            env["ROUTER_MIDDLEWARE_OTLP_ENDPOINT"] = os.environ["PHOENIX_URL"]
        log = (tmp_path / "proxy.log").open("wb")
        process = subprocess.Popen([str(LITELLM), "--config", str(PROXY_DIR / "config.yaml"), "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(180):
                try:
                    urllib.request.urlopen(f"{base}/health/liveliness", timeout=2)
                    break
                except OSError:
                    if process.poll() is not None:
                        raise RuntimeError((tmp_path / "proxy.log").read_text()[-3000:]) from None
                    time.sleep(0.5)
            else:
                raise RuntimeError("the LiteLLM proxy did not become ready in 90 s")
            yield {"base": f"{base}/v1", "seen": seen, "ledger": ledger, "project": project, "tmp": tmp_path}
        finally:
            _stop(process)
            log.close()


def _cline(args: list[str], home: Path, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "CLINE_DIR": str(home / ".cline")}
    process = subprocess.Popen([str(CLINE), *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=home)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        _stop(process)  # also ends any helper it started in its session
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _ledger_rows(path: Path, expected: int) -> list[sqlite3.Row]:
    for _ in range(100):
        if path.exists():
            with sqlite3.connect(path) as db:
                db.row_factory = sqlite3.Row
                rows = db.execute("SELECT * FROM calls ORDER BY ts").fetchall()
            if len(rows) >= expected:
                return rows
        time.sleep(0.2)
    raise AssertionError(f"the ledger at {path} did not get {expected} rows")


def test_cline_runs_through_the_proxy_and_the_pipeline(proxy) -> None:
    home = proxy["tmp"] / "home"
    work = home / "project"
    work.mkdir(parents=True)
    auth = _cline(["auth", "-p", "openai-compatible", "-k", "sk-proxy-master", "-m", "coder", "-b", proxy["base"]],
                  home)
    assert auth.returncode == 0, auth.stderr[-2000:]
    run = _cline(["--yolo", "--json", "-P", "openai-compatible", "-m", "coder", "-c", str(work), "say hello"], home)
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    result = events[-1]
    assert result["type"] == "run_result" and result["finishReason"] == "completed"
    assert result["iterations"] == 2 and "hello-from-cline" in result["text"]

    first, second = proxy["seen"]  # Cline's real requests, as the pipeline passed them on
    for body in (first, second):
        assert body["model"] == "gpt-5-mini"  # "coder" routed to the coder-strong deployment
        assert len(body["messages"][0]["content"]) > 5000 and body["messages"][0]["role"] == "system"
        assert [t["function"]["name"] for t in body["tools"]] == ["read_files", "run_commands", "editor",
                                                                   "submit_and_exit"]
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["prompt_cache_key"].startswith("rm-")  # the context policy's cache hint, one per session
    assert first["prompt_cache_key"] == second["prompt_cache_key"]
    assert first["reasoning_effort"] == "medium" and second["reasoning_effort"] == "low"  # per-step caps
    assistant = next(m for m in second["messages"] if m["role"] == "assistant")
    assert assistant.get("content") is None and assistant["tool_calls"][0]["function"]["name"] == "run_commands"
    assert second["messages"][-1]["role"] == "tool" and "hello-from-cline" in second["messages"][-1]["content"]

    rows = _ledger_rows(proxy["ledger"], 2)
    assert len(rows) == 2
    for row in rows:
        assert row["requested_model"] == "coder" and row["app"] == "coding-agent"
        assert (row["input_tokens"], row["cached_tokens"], row["output_tokens"]) == \
            (USAGE["prompt_tokens"], USAGE["prompt_tokens_details"]["cached_tokens"], USAGE["completion_tokens"])
        assert row["cost_usd"] > 0 and row["session"].startswith("head-")
        assert "routing:route" in row["decisions"] and "reasoning:" in row["decisions"]

    if os.environ.get("PHOENIX_URL"):
        spans = _phoenix_spans(str(proxy["project"]), expected=4)  # the proxy's own FastAPI spans are there too
        routes = [s for s in spans if s["name"] == "route coder"]
        assert len(routes) == 2
        clients = [s for s in spans if s["name"].startswith("chat ")]
        assert {c["attributes"]["gen_ai.usage.input_tokens"] for c in clients} == {USAGE["prompt_tokens"]}


def _phoenix_spans(project: str, expected: int) -> list[dict]:
    """Our spans (route and chat) in the project, once ``expected`` of them have arrived."""
    url = f"{os.environ['PHOENIX_URL']}/v1/projects/{project}/spans?limit=1000"
    spans: list[dict] = []
    for _ in range(80):  # the proxy's batch processor exports every few seconds
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                spans = [s for s in json.loads(response.read())["data"]
                         if s["name"].startswith(("route ", "chat "))]
        except OSError:
            spans = []
        if len(spans) >= expected:
            return spans
        time.sleep(0.5)
    return spans
