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
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, service_missing
from .litellm_proxy import proxy_missing, running_proxy, stop
from .scripted_upstream import USAGE, scripted_upstream

CLINE = Path(os.environ.get("CLINE_BIN") or ROOT / ".ci-cline" / "node_modules" / ".bin" / "cline")


def _missing() -> str | None:
    if not CLINE.exists():
        return f"no Cline CLI at {CLINE} (.ci/run installs it: npm install --prefix .ci-cline cline@3.0.65)"
    return proxy_missing()


if (_why := _missing()) is not None:
    service_missing(_why, module=True)


ROUTER_CONFIG = """
app: coding-agent
routing:
  deployments:
    coder-cheap: {{model: openai/gpt-4o-mini}}
    coder-strong: {{model: openai/gpt-5-mini}}
  aliases:
    coder: [coder-strong, coder-cheap]
context:
  prompt_cache_key: always  # the scripted upstream on loopback stands for OpenAI's API
reasoning:
  rules:
    - when: {{step_kind: [plan]}}
      effort: medium
    - when: {{step_kind: [observe]}}
      effort: low
ledger:
  url: sqlite:///{ledger}
"""


@contextmanager
def _proxy(tmp_path: Path, router_config: str = ROUTER_CONFIG, *, steps: int = 1, output_lines: int = 0,
           strong_status: int = 200, delay_s: float = 0.0) -> Iterator[dict[str, Any]]:
    """The LiteLLM proxy of integrations/litellm-proxy on loopback, with router-middleware's hook and
    ``router_config``; coder-cheap is the scripted model, coder-strong too unless ``strong_status``
    makes it answer every request with that error."""
    ledger = tmp_path / "ledger.db"
    (tmp_path / "router.yaml").write_text(router_config.format(ledger=ledger))
    project = f"cline-{uuid.uuid4().hex[:8]}"
    with scripted_upstream(steps=steps, output_lines=output_lines, delay_s=delay_s) as (upstream, seen), \
            scripted_upstream(status=strong_status) as (dead, dead_seen):
        strong = upstream if strong_status == 200 else dead
        env = {"CHEAP_API_BASE": upstream, "STRONG_API_BASE": strong, "CHEAP_API_KEY": "sk-upstream",
               "STRONG_API_KEY": "sk-upstream", "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml"),
               "ROUTER_MIDDLEWARE_PROJECT": project}
        if os.environ.get("PHOENIX_URL"):
            env["ROUTER_MIDDLEWARE_OTLP_ENDPOINT"] = os.environ["PHOENIX_URL"]
        with running_proxy(tmp_path, env) as base:
            yield {"base": f"{base}/v1", "seen": seen, "dead_seen": dead_seen, "ledger": ledger, "project": project,
                   "tmp": tmp_path}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with _proxy(tmp_path) as running:
        yield running


def _cline(args: list[str], home: Path, timeout: int = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "CLINE_DIR": str(home / ".cline")}
    process = subprocess.Popen([str(CLINE), *args], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=home)
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        stop(process)  # also ends any helper it started in its session
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _ledger_rows(path: Path, expected: int) -> list[sqlite3.Row]:
    for _ in range(100):
        if path.exists():
            with sqlite3.connect(path) as db:
                db.row_factory = sqlite3.Row
                try:
                    rows = db.execute("SELECT * FROM calls ORDER BY ts").fetchall()
                except sqlite3.OperationalError:  # the proxy's writer made the file, not yet its table
                    rows = []
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
        assert row["ttft_s"] is not None and 0 <= row["ttft_s"] <= row["latency_s"]  # Cline streams
    # Steps and kinds derived from the conversation; the run's session is its head plus its first
    # assistant turn (the first call, which has none yet, is a session of its own: its head and request).
    assert [(r["step"], r["step_kind"]) for r in rows] == [(0, "plan"), (1, "observe")]
    head, _, request = rows[0]["session"].partition("-first-")
    assert request and rows[1]["session"].startswith(head + "-") and "-first-" not in rows[1]["session"]

    if os.environ.get("PHOENIX_URL"):
        spans = _phoenix_spans(str(proxy["project"]), expected=4)  # the proxy's own FastAPI spans are there too
        routes = [s for s in spans if s["name"] == "route coder"]
        assert len(routes) == 2
        clients = [s for s in spans if s["name"].startswith("chat ")]
        assert {c["attributes"]["gen_ai.usage.input_tokens"] for c in clients} == {USAGE["prompt_tokens"]}


REMINDER = "[SYSTEM] This run is not complete until you call"


def _run(proxy: dict[str, Any], *extra: str) -> dict[str, Any]:
    """A yolo Cline run of a task through the proxy; its final event."""
    home = proxy["tmp"] / "home"
    work = home / "project"
    work.mkdir(parents=True, exist_ok=True)
    auth = _cline(["auth", "-p", "openai-compatible", "-k", "sk-proxy-master", "-m", "coder", "-b", proxy["base"]],
                  home)
    assert auth.returncode == 0, auth.stderr[-2000:]
    run = _cline(["--yolo", "--json", "-P", "openai-compatible", "-m", "coder", *extra, "-c", str(work),
                  "say hello"], home, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    result = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")][-1]
    assert result["type"] == "run_result" and result["finishReason"] == "completed", result
    return result


def _intact(messages: list[dict[str, Any]]) -> bool:
    """Every tool result answers a call of the assistant turn before it, and every call is answered."""
    open_calls: set[str] = set()
    for message in messages:
        if message["role"] == "tool":
            if message.get("tool_call_id") not in open_calls:
                return False
            open_calls.discard(message["tool_call_id"])
        elif open_calls:
            return False
        if message["role"] == "assistant":
            open_calls = {c["id"] for c in message.get("tool_calls") or []}
    return not open_calls


def test_a_long_run_is_trimmed_keeps_the_reminder_and_records_savings(tmp_path: Path) -> None:
    config = ROUTER_CONFIG + "context:\n  watermark_tokens: 6000\n"
    steps = 8
    with _proxy(tmp_path, config, steps=steps, output_lines=1100) as proxy:
        _run(proxy)
        seen = proxy["seen"]
        assert len(seen) == steps + 1
        for body in seen:  # Cline's opening request is the protected head: its reminder is never dropped
            head = body["messages"][:3]
            assert [m["role"] for m in head] == ["system", "user", "user"] and REMINDER in head[2]["content"]
            assert _intact(body["messages"])
        trimmed = [b for b in seen if any("earlier messages omitted" in str(m.get("content")) for m in b["messages"])]
        assert trimmed, "the window never cut the history"
        rows = _ledger_rows(proxy["ledger"], steps + 1)
    assert [r["step"] for r in rows] == list(range(steps + 1))
    cut = [r for r in rows if "window:trim" in r["decisions"]]
    assert len(cut) >= len(trimmed) and all(r["saved_context_usd"] > 0 for r in cut)
    assert all(r["baseline_cost_usd"] == pytest.approx(r["cost_usd"] + r["saved_context_usd"]) for r in rows)
    assert sum(r["saved_context_usd"] for r in rows) > 0


def test_a_dead_first_deployment_fails_over_and_cools_down(tmp_path: Path) -> None:
    steps = 4
    with _proxy(tmp_path, steps=steps, strong_status=503) as proxy:  # coder: [coder-strong (dead), coder-cheap]
        _run(proxy)
        assert len(proxy["seen"]) == steps + 1  # every call was answered by coder-cheap
        assert all(b["model"] == "gpt-4o-mini" for b in proxy["seen"])
        dead = len(proxy["dead_seen"])
        rows = _ledger_rows(proxy["ledger"], steps + 1)
        spans = _phoenix_spans(str(proxy["project"]), expected=2 * (steps + 1) + dead) \
            if os.environ.get("PHOENIX_URL") else []  # read while the proxy runs: it exports in batches
    assert dead == 3, dead  # one try per call (no retries of a dead target) until the cooldown (3 failures)
    assert len(rows) == steps + 1 and all(r["error"] is None and r["requested_model"] == "coder" for r in rows)
    assert len({r["cost_usd"] for r in rows}) == 1  # every row priced as the deployment that answered
    fell_over = [r for r in rows if "routing:fallback" in r["decisions"]]
    assert len(fell_over) == dead  # each fell over within one call: one row, with the fallback decision
    assert all("routing:fallback" not in r["decisions"] for r in rows[dead:])  # then the cooldown routed past it
    if spans:
        assert len([s for s in spans if s["name"] == "route coder"]) == steps + 1
        attempts = [s for s in spans if s["name"].startswith("chat ")]
        assert len(attempts) == steps + 1 + dead  # one attempt span per target tried, under its call's route span
        assert sorted(s["status_code"] for s in attempts).count("ERROR") == dead


def test_a_client_effort_is_capped_never_raised(tmp_path: Path) -> None:
    with _proxy(tmp_path) as proxy:  # the rules say medium for plan steps, low for observe steps
        _run(proxy, "--thinking", "low")
        efforts = [b.get("reasoning_effort") for b in proxy["seen"]]
    assert efforts == ["low", "low"], efforts


def test_a_refused_call_gets_a_readable_http_error(tmp_path: Path) -> None:
    """A hard budget refuses the call in the proxy's hook: the client gets 429 naming the budget."""
    config = ROUTER_CONFIG.replace("routing:\n", "routing:\n  budgets: [{{name: tiny, usd: 0.000001, scope: global}}]\n", 1)
    with _proxy(tmp_path, config) as proxy:
        request = urllib.request.Request(
            f"{proxy['base']}/chat/completions", method="POST",
            data=json.dumps({"model": "coder", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=60)
        assert not proxy["seen"]  # nothing reached the model
    assert refused.value.code == 429
    assert "budget 'tiny' exceeded" in refused.value.read().decode()


def test_a_client_that_leaves_before_the_first_chunk_frees_its_budget_hold(tmp_path: Path) -> None:
    """A streaming client closes its connection while the model has not answered yet (it answers after
    3 s): the proxy's events still end the call, so its reservation does not hold the budget until it
    lapses. Two such requests do not fit the budget together; the second is answered."""
    config = ROUTER_CONFIG.replace("routing:\n", "routing:\n  budgets: [{{name: day, tokens: 9000, scope: global}}]\n", 1)
    with _proxy(tmp_path, config, delay_s=3.0) as proxy:
        host, port = proxy["base"].split("//")[1].split("/")[0].split(":")
        body = json.dumps({"model": "coder", "messages": [{"role": "user", "content": "task 1"}], "stream": True,
                           "max_tokens": 5000}).encode()
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
                           b"sk-proxy-master\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                           % len(body) + body)
            time.sleep(1.0)  # admitted and sent upstream, no chunk yet: the client leaves
        rows = _ledger_rows(proxy["ledger"], 1)  # the first call ends once the model has answered
        request = urllib.request.Request(
            f"{proxy['base']}/chat/completions", method="POST",
            data=json.dumps({"model": "coder", "messages": [{"role": "user", "content": "task 2"}],
                             "max_tokens": 5000}).encode(),
            headers={"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as answered:
            assert answered.status == 200
    assert len(rows) == 1 and rows[0]["requested_model"] == "coder"


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


def test_a_deployment_the_proxy_lacks_is_skipped_not_sent(tmp_path: Path) -> None:
    """A misspelled proxy model name in router.yaml: the proxy would answer 400 ("Invalid model name")
    where the alias's next target serves the call; it is skipped, and named once in the proxy's log."""
    config = ROUTER_CONFIG.replace("coder-strong: {{", "coder-strng: {{").replace("[coder-strong,", "[coder-strng,")
    with _proxy(tmp_path, config) as proxy:
        request = urllib.request.Request(
            f"{proxy['base']}/chat/completions", method="POST",
            data=json.dumps({"model": "coder", "messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
        for _ in range(2):
            with urllib.request.urlopen(request, timeout=60) as answered:
                assert answered.status == 200
        assert [b["model"] for b in proxy["seen"]] == ["gpt-4o-mini", "gpt-4o-mini"]  # coder-cheap's, at once
        log = (tmp_path / "proxy.log").read_text()
    assert log.count("proxy_model_unknown") == 2, log[-3000:]  # the alias's target and the deployment, once
    assert "coder-strng" in log and "coder-strong" in log  # the name, and the proxy's closest
