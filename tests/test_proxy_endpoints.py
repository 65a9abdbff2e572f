"""The LiteLLM proxy's other endpoints coding agents use, with router-middleware's hook: Anthropic's
``/v1/messages`` (Claude Code; litellm's call type ``anthropic_messages``) and OpenAI's
``/v1/responses`` (Codex CLI; ``aresponses``). They are sent as they came (no routing, context or
reasoning policy: those rewrite chat messages), but admitted against the budgets before they are
sent and counted after: one ledger row with the provider's usage and cost, a span, the spend added
to the budgets. The real proxy runs on loopback; its upstream serves Anthropic's recorded answers
(cassettes/anthropic_message_*.yaml) from tests/fault_server.py. A chat call to the same model through
``/v1/chat/completions`` is settled before its answer is served (the budget tests below).
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from router_middleware.litellm import as_sent_view

from .cassette_data import interactions, recorded_usage
from .conftest import CASSETTES, service_missing
from .fault_server import fault_server
from .litellm_proxy import proxy_missing, running_proxy

PROXY_CONFIG = """
model_list:
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-opus-20240229
      api_base: os.environ/ANTHROPIC_API_BASE
      api_key: os.environ/ANTHROPIC_API_KEY
litellm_settings:
  callbacks: router_hook.handler
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
"""

# Each request asks for 300 output tokens at most: its estimate (about 315 tokens) fits twice in the
# budget, and not a third time after the two answers the recordings report (237 and 188 tokens).
ROUTER_CONFIG = """
app: coding-agent
store: sqlite:///{tmp}/store.db
routing:
  aliases: {{coder: [claude]}}
  budgets: [{{name: day, tokens: 600, scope: global}}]
ledger: {{url: 'sqlite:///{tmp}/ledger.db'}}
"""

# A quota of two requests a day on the proxy's model_name, and a cooldown after two failures.
GUARDED_CONFIG = """
app: coding-agent
store: sqlite:///{tmp}/store.db
routing:
  aliases: {{coder: [claude]}}
  limits: {{claude: {{rpd: 2}}}}
  cooldown: {{failures: 2, window_s: 60, cooldown_s: 30}}
ledger: {{url: 'sqlite:///{tmp}/ledger.db'}}
"""

# A callback litellm awaits before the hook, holding up the proxy's first success event: as a loaded
# machine's logging worker does, which runs the events in the background after the answers are served.
LATE_S = 2.0
LATE_EVENTS = f"""
import asyncio

from litellm.integrations.custom_logger import CustomLogger


class LateFirstEvent(CustomLogger):
    def __init__(self):
        super().__init__()
        self.events = 0

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.events += 1
        if self.events == 1:
            await asyncio.sleep({LATE_S})


handler = LateFirstEvent()
"""

QUESTION = "Tell me a joke about OpenTelemetry"  # the recordings' prompt
PLAIN, STREAMED = (recorded_usage(interactions(CASSETTES / name)[0])
                   for name in ("anthropic_message_create.yaml", "anthropic_message_streaming.yaml"))


@contextmanager
def _proxy(tmp_path: Path, router_config: str = ROUTER_CONFIG, upstream_path: str = "/healthy",
           fault_rate: float = 0.5, *, late_first_event: bool = False,
           cache: bool = False, router_settings: str = "") -> Iterator[tuple[str, Any]]:
    """``late_first_event``: litellm delivers the first success event :data:`LATE_S` late (:data:`LATE_EVENTS`);
    ``cache``: the proxy has litellm's response cache (in memory), for requests that ask ``caching``;
    ``router_settings``: the proxy config's ``router_settings`` section (a YAML flow mapping)."""
    if (why := proxy_missing()) is not None:
        service_missing(why)
    (tmp_path / "router.yaml").write_text(router_config.format(tmp=tmp_path))
    config = PROXY_CONFIG
    if late_first_event:
        (tmp_path / "late_events.py").write_text(LATE_EVENTS)
        config = config.replace("callbacks: router_hook.handler", "callbacks: [late_events.handler, router_hook.handler]")
    if cache:
        config = config.replace("litellm_settings:\n", "litellm_settings:\n  cache: true\n  cache_params: {type: local}\n")
    if router_settings:
        config += f"router_settings: {router_settings}\n"
    (tmp_path / "config.yaml").write_text(config)
    with fault_server(fault_rate=fault_rate) as (upstream, seen):
        env = {"ANTHROPIC_API_BASE": f"{upstream}{upstream_path}", "ANTHROPIC_API_KEY": "sk-ant-test",
               "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml"), "ROUTER_MIDDLEWARE_LOG_LEVEL": "info"}
        with running_proxy(tmp_path, env, tmp_path / "config.yaml") as base:
            yield base, seen


def _post(base: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    status, answer, _headers = _exchange(base, path, body)
    return status, answer


def _exchange(base: str, path: str, body: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
    """The proxy's status, body and headers (lower-cased names) for ``body`` posted to ``path``."""
    request = urllib.request.Request(f"{base}{path}", json.dumps(body).encode(), {
        "Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read(), {k.lower(): v for k, v in answer.headers.items()}
    except urllib.error.HTTPError as error:
        return error.code, error.read(), {k.lower(): v for k, v in error.headers.items()}


def _rows(tmp_path: Path, expected: int) -> list[sqlite3.Row]:
    rows: list[sqlite3.Row] = []
    for _ in range(300):  # 60 s: the proxy's writer is a thread of a loaded process (20 s once was not enough)
        if (tmp_path / "ledger.db").exists():
            with sqlite3.connect(tmp_path / "ledger.db") as db:
                db.row_factory = sqlite3.Row
                try:
                    rows = db.execute("SELECT * FROM calls ORDER BY ts").fetchall()
                except sqlite3.OperationalError:  # the writer made the file, not yet its table
                    rows = []
            if len(rows) >= expected:
                return rows
        time.sleep(0.2)
    seen = [(row["requested_model"], row["output_tokens"], row["error"]) for row in rows]
    log = (tmp_path / "proxy.log").read_text(errors="replace")[-4000:]
    raise AssertionError(f"the ledger got {len(rows)} rows, not {expected}: {seen}\nthe proxy's log ends:\n{log}")


def _spent(tmp_path: Path, key: str = "budget:day:tokens:all:0") -> float:
    with sqlite3.connect(tmp_path / "store.db") as db:
        found = db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
    return float(found[0]) if found else 0.0


def _messages(**extra: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 300, "messages": [{"role": "user", "content": QUESTION}], **extra}


def test_anthropic_messages_are_counted_and_refused_before_they_are_sent_once_over_budget(tmp_path) -> None:
    """Claude Code's endpoint: a plain and a streamed ``/v1/messages`` call are answered as the
    provider answered, each one ledger row under the name the client asked for, with the provider's
    usage and cost and a decision saying it went as it came; their spend is on the budget, and the
    third call, whose estimate no longer fits, is refused (429, in Anthropic's error shape) without
    reaching the provider. The proxy delivers the first call's success event late (as litellm's
    logging worker on a loaded machine does, after the answer was served): until it comes, that call
    holds its estimate, and the second call's would not fit beside it (two estimates are over the
    budget), so the second is sent once the first call's row is written."""
    with _proxy(tmp_path, late_first_event=True) as (base, seen):
        plain = _post(base, "/v1/messages", _messages())
        _rows(tmp_path, 1)  # the first call settled, its hold given back
        streamed = _post(base, "/v1/messages", _messages(stream=True))
        assert streamed[0] == 200, streamed
        rows = _rows(tmp_path, 2)
        refused = _post(base, "/v1/messages", _messages())
        spent = _spent(tmp_path)
    logged = [json.loads(line) for line in (tmp_path / "proxy.log").read_text().splitlines() if line.startswith("{")]
    assert [(e["requested_model"], e["output_tokens"]) for e in logged if e.get("event") == "llm_call"] == [
        ("claude", PLAIN["output_tokens"]), ("claude", STREAMED["output_tokens"])]  # ROUTER_MIDDLEWARE_LOG_LEVEL
    assert [(e["model"], e["error_type"]) for e in logged if e.get("event") == "llm_call_failed"] == [
        ("anthropic/claude-3-opus-20240229", "BudgetExceeded")]  # the refusal is said (its route span has it too)
    assert plain[0] == 200 and json.loads(plain[1])["usage"]["output_tokens"] == PLAIN["output_tokens"]
    assert streamed[0] == 200 and b"event: message_stop" in streamed[1]
    assert len(rows) == 2
    for row, usage in zip(rows, (PLAIN, STREAMED), strict=True):
        assert row["requested_model"] == "claude" and row["model"] == "claude-3-opus-20240229"
        assert row["target"] == "anthropic/claude-3-opus-20240229"  # sent as it came, to the deployment's model
        assert row["deployment"] == "claude"  # under the proxy's model_name
        assert (row["input_tokens"], row["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
        assert row["cost_usd"] > 0 and row["error"] is None and row["app"] == "coding-agent"
        assert json.loads(row["decisions"]) == ["routing:as-sent"]
    assert spent == sum(u["input_tokens"] + u["output_tokens"] for u in (PLAIN, STREAMED))
    assert refused[0] == 429, refused
    error = json.loads(refused[1])
    assert error["type"] == "error" and "budget 'day' exceeded" in error["error"]["message"]
    assert seen["healthy:ok"] == 2  # the refused call never reached the provider
    assert len(_rows(tmp_path, 2)) == 2


def test_responses_are_counted_once_and_refused_before_they_are_sent_once_over_budget(tmp_path) -> None:
    """Codex's endpoint: litellm answers a ``/v1/responses`` call to a model without that API by a
    chat call of its own (here to Anthropic's API). That chat call is not planned again (no second
    row, no refusal inside the proxy's router, which would cool the deployment down for every
    client): the request is one row, its spend on the budget, and once over it the next request is
    refused before it is sent. The first request's success event comes late, as in the test above:
    the second is sent once the first's row is written (two estimates are over the budget)."""
    pytest.importorskip("nacl", reason="the proxy signs /v1/responses ids with PyNaCl (the `proxy` extra)")
    with _proxy(tmp_path, late_first_event=True) as (base, seen):
        answers: list[tuple[int, bytes]] = []
        for expected in (1, 2):
            answers.append(_post(base, "/v1/responses", {"model": "claude", "input": QUESTION,
                                                         "max_output_tokens": 300}))
            assert answers[-1][0] == 200, answers[-1]
            rows = _rows(tmp_path, expected)
        refused = _post(base, "/v1/responses", {"model": "claude", "input": QUESTION, "max_output_tokens": 300})
        spent = _spent(tmp_path)
    for status, body in answers:
        assert status == 200, body
        assert json.loads(body)["usage"]["output_tokens"] == PLAIN["output_tokens"]
    assert len(rows) == 2
    for row in rows:
        assert row["requested_model"] == "claude" and row["error"] is None and row["cost_usd"] > 0
        assert (row["input_tokens"], row["output_tokens"]) == (PLAIN["input_tokens"], PLAIN["output_tokens"])
        assert json.loads(row["decisions"]) == ["routing:as-sent"]
    assert spent == 2 * (PLAIN["input_tokens"] + PLAIN["output_tokens"])
    message = json.loads(refused[1])["error"]["message"]
    assert refused[0] == 429 and message.startswith("budget 'day' exceeded")  # the hook's, not the router's 429
    assert seen["healthy:ok"] == 2
    assert len(_rows(tmp_path, 2)) == 2


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "claude", "max_tokens": 300, "messages": [{"role": "user", "content": QUESTION}], **extra}


@pytest.mark.parametrize("first", ["plain", "streamed"])
def test_a_chat_call_is_settled_before_its_answer_is_served(tmp_path, first) -> None:
    """A Cline-style client sends its next request as soon as an answer comes. The proxy settles a
    ``/v1/chat/completions`` call (plain, or a stream read to its end that asked for its usage chunk)
    before it serves the answer,
    not when litellm's logging worker gets to its success event (here held :data:`LATE_S`): the next
    request is admitted against the first call's real spend, not against its estimate (two estimates
    are over the budget), and the late event writes no second row. Once the real spend no longer
    leaves room for an estimate, the next request is refused."""
    with _proxy(tmp_path, late_first_event=True) as (base, seen):
        asked = {"stream": True, "stream_options": {"include_usage": True}} if first == "streamed" else {}
        one = _post(base, "/v1/chat/completions", _chat(**asked))  # a stream asking for its usage, as Cline's do
        two = _post(base, "/v1/chat/completions", _chat())  # at once: the first call's event is held
        *three, headers = _exchange(base, "/v1/chat/completions", _chat())
        rows = _rows(tmp_path, 2)
        time.sleep(LATE_S + 1.0)  # the first call's event has come by now
        rows = _rows(tmp_path, 2)
        spent = _spent(tmp_path)
    assert one[0] == 200 and two[0] == 200, (one, two)
    assert three[0] == 429 and b"budget 'day' exceeded" in three[1], three
    assert headers["x-should-retry"] == "false"  # OpenAI's SDK (Cline's) would retry it twice, to the same refusal
    first_usage = STREAMED if first == "streamed" else PLAIN
    assert [(row["input_tokens"], row["output_tokens"], row["error"]) for row in rows] == [
        (first_usage["input_tokens"], first_usage["output_tokens"], None),
        (PLAIN["input_tokens"], PLAIN["output_tokens"], None)]
    models = {"plain": "claude-3-opus-20240229", "streamed": "claude-3-haiku-20240307"}  # what the recordings name
    assert [row["model"] for row in rows] == [models[first], models["plain"]]
    assert all(row["ended"] == "complete" and row["cost_usd"] > 0 for row in rows)
    assert spent == sum(u["input_tokens"] + u["output_tokens"] for u in (first_usage, PLAIN))
    assert seen["healthy:ok"] == 2  # the refused call never reached the provider


def test_answers_of_litellm_s_response_cache_are_settled_at_no_cost(tmp_path) -> None:
    """The proxy's response cache answers the second of two like requests, plain and streamed: that
    call is a cache-hit row with nothing spent, also when it is settled as the answer is served (a
    streamed hit's usage chunk repeats the first answer's usage: it was never paid again)."""
    with _proxy(tmp_path, ROUTER_CONFIG.replace("tokens: 600", "tokens: 6000"), cache=True) as (base, seen):
        for asked in ({}, {"stream": True, "stream_options": {"include_usage": True}}):
            for _ in range(2):
                answer = _post(base, "/v1/chat/completions", _chat(caching=True, **asked))
                assert answer[0] == 200, answer
                time.sleep(1.0)  # litellm writes a stream's answer to its cache in a task of its own
        rows = _rows(tmp_path, 4)
        spent = _spent(tmp_path)
    assert seen["healthy:ok"] == 2  # the second of each pair came from the cache
    assert [(row["cache_hit"], row["output_tokens"] > 0, row["cost_usd"] > 0) for row in rows] == [
        (0, True, True), (1, False, False), (0, True, True), (1, False, False)], [
        (row["ts"], row["cache_hit"], row["output_tokens"], row["latency_s"], row["decisions"]) for row in rows]
    assert spent == sum(u["input_tokens"] + u["output_tokens"] for u in (PLAIN, STREAMED))


def test_a_quota_on_the_proxys_model_name_holds_for_messages_requests_too(tmp_path) -> None:
    """``routing.limits`` on ``claude`` counts the requests sent to it as they came, as it counts chat
    calls routed there: two a day go through, the third is refused before it is sent (503 naming the
    limit, in Anthropic's error shape)."""
    with _proxy(tmp_path, GUARDED_CONFIG) as (base, seen):
        answers = [_post(base, "/v1/messages", _messages()) for _ in range(2)]
        rows = _rows(tmp_path, 2)
        refused = _post(base, "/v1/messages", _messages())
    assert [status for status, _ in answers] == [200, 200]
    assert all(row["error"] is None and row["requested_model"] == "claude" for row in rows)
    assert refused[0] == 503, refused
    assert "rpd limit 2 reached" in json.loads(refused[1])["error"]["message"]
    assert seen["healthy:ok"] == 2


def test_a_model_group_alias_counts_toward_the_quota_of_the_model_name_it_stands_for(tmp_path) -> None:
    """The proxy's ``router_settings.model_group_alias`` makes ``opus`` another name for ``claude``: a
    call naming ``opus`` is sent as it asked (the router's fallbacks and limits keyed by ``opus`` still
    apply) and also counted toward ``claude``, so the two a day of ``claude``'s quota hold across both
    names and endpoints (before, four calls through ``opus`` went through, none counted toward ``claude``)."""
    with _proxy(tmp_path, GUARDED_CONFIG, router_settings="{model_group_alias: {opus: claude}}") as (base, seen):
        answers = [_post(base, "/v1/chat/completions", _chat(model="opus")) for _ in range(2)]
        rows = _rows(tmp_path, 2)
        refused = [_post(base, "/v1/chat/completions", _chat(model=name)) for name in ("opus", "claude")]
        refused.append(_post(base, "/v1/messages", _messages(model="opus")))
    assert [status for status, _ in answers] == [200, 200], answers
    assert all(json.loads(body)["model"] == "opus" for _, body in answers)
    assert [(row["requested_model"], row["deployment"], row["error"]) for row in rows] == [("opus", "opus", None)] * 2
    assert all(row["model"] == "claude-3-opus-20240229" and row["cost_usd"] > 0 for row in rows)
    assert [status for status, _ in refused] == [503] * 3, refused
    assert all(b"claude: rpd limit 2 reached" in body for _, body in refused)
    assert seen["healthy:ok"] == 2


def test_failures_through_a_model_group_alias_cool_down_the_model_name_it_stands_for(tmp_path) -> None:
    """Two failed calls through ``opus`` (``model_group_alias``, standing for ``claude``) cool down
    both ``opus`` and ``claude`` (their cooldown keys in the store; before, only ``opus`` was
    counted, and an alias listing ``claude`` went on sending to it)."""
    config = GUARDED_CONFIG.replace("rpd: 2", "rpd: 100")
    with _proxy(tmp_path, config, "/flaky", fault_rate=1.0,
                router_settings="{model_group_alias: {opus: claude}}") as (base, seen):
        failed = [_post(base, "/v1/chat/completions", _chat(model="opus")) for _ in range(2)]
        _rows(tmp_path, 2)
        for _ in range(50):
            if _spent(tmp_path, "cooldown:claude") and _spent(tmp_path, "cooldown:opus"):
                break
            time.sleep(0.1)
        cooled = (_spent(tmp_path, "cooldown:opus"), _spent(tmp_path, "cooldown:claude"))
    assert all(status >= 400 for status, _ in failed), failed
    assert min(cooled) > time.time(), cooled
    assert sum(seen.values()) >= 2


def test_a_call_through_a_model_group_alias_is_the_probe_that_closes_the_circuit_of_the_model_name(tmp_path) -> None:
    """Once ``claude``'s cooldown has ended, a routed call through ``opus`` (``model_group_alias``,
    standing for ``claude``) claims ``claude``'s probe, and its answer closes ``claude``'s circuit
    (before, ``opus`` was no probe of ``claude``: the cooldown stayed on record, and calls listing
    ``claude`` went on waiting for a probe of their own)."""
    from router_middleware.stores import open_store

    config = GUARDED_CONFIG.replace("coder: [claude]", "coder: [opus]").replace("rpd: 2", "rpd: 100")
    with _proxy(tmp_path, config, router_settings="{model_group_alias: {opus: claude}}") as (base, seen):
        store = open_store(f"sqlite:///{tmp_path / 'store.db'}")
        store.set("cooldown:claude", repr(time.time() - 1).encode(), ttl_s=60)  # its cooldown has just ended
        status, _ = _post(base, "/v1/chat/completions", _chat(model="coder"))
        rows = _rows(tmp_path, 1)
        for _ in range(50):
            if store.get("cooldown:claude") is None:
                break
            time.sleep(0.1)
        closed = store.get("cooldown:claude")
        store.close()
    assert status == 200 and rows[0]["deployment"] == "opus" and seen["healthy:ok"] == 1
    assert closed is None


def test_failures_of_messages_requests_count_toward_their_targets_cooldown(tmp_path) -> None:
    """An upstream that fails every request: each ``/v1/messages`` request is an error row, and the
    two failures cool ``claude`` down for the chat calls routed there, as two failed chat calls would
    (before, a request sent as it came counted toward no cooldown)."""
    with _proxy(tmp_path, GUARDED_CONFIG, "/flaky", fault_rate=1.0) as (base, seen):
        failed = [_post(base, "/v1/messages", _messages()) for _ in range(2)]
        rows = _rows(tmp_path, 2)
        for _ in range(50):
            if _spent(tmp_path, "cooldown:claude"):
                break
            time.sleep(0.1)
        cooled_until = _spent(tmp_path, "cooldown:claude")
    assert all(status >= 400 for status, _ in failed), failed
    assert all(row["error"] for row in rows) and sum(seen.values()) >= 2
    assert cooled_until > time.time()


def test_a_routing_alias_on_the_messages_endpoint_is_a_400_naming_the_model_names_to_use(tmp_path) -> None:
    """Aliases are routed on /v1/chat/completions only: ``coder`` sent to /v1/messages (no model_name
    of the proxy) is the client's error, saying so and naming the alias's targets the proxy serves,
    rather than the proxy's bare "Invalid model name". Nothing is sent or recorded."""
    with _proxy(tmp_path) as (base, seen):
        status, body = _post(base, "/v1/messages", {**_messages(), "model": "coder"})
        unknown = _post(base, "/v1/messages", {**_messages(), "model": "claud"})
        time.sleep(1.0)
    message = json.loads(body)["error"]["message"]
    assert status == 400 and "routes on /v1/chat/completions only" in message and "'claude'" in message
    assert unknown[0] == 400  # the proxy's own answer to a name it does not serve
    assert seen["healthy:ok"] == 0
    assert not (tmp_path / "ledger.db").exists() or _rows(tmp_path, 0) == []


def test_the_estimate_of_a_claude_code_turn_reads_text_not_payloads() -> None:
    """Tool calls and results count as their text; an image's bytes are no tokens of the estimate
    (the provider's usage is what the row records)."""
    messages, params = as_sent_view({
        "model": "claude", "max_tokens": 32000, "system": [{"type": "text", "text": "You are Claude Code."}],
        "tools": [{"name": "Read", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "read a.py"},
                                         {"type": "image", "source": {"type": "base64", "data": "A" * 100000}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read",
                                               "input": {"path": "a.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "print(1)"}]}]},
        "/v1/messages")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"] == "You are Claude Code." and messages[1]["content"] == "read a.py\n[image]"
    assert '"name": "Read"' in messages[2]["content"] and messages[3]["content"] == "print(1)"
    assert params == {"max_tokens": 32000, "tools": [{"name": "Read", "input_schema": {"type": "object"}}]}
    responses, params = as_sent_view({"model": "x", "instructions": "Be brief.", "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}], "max_output_tokens": 50}, "/v1/responses")
    assert [m["role"] for m in responses] == ["system", "system", "assistant", "user"]
    assert responses[1]["content"] == "rules" and params == {"max_tokens": 50}


@pytest.mark.parametrize("level, configured", [("warning", True), ("LOUD", False)])
def test_the_hook_s_log_level_is_read_from_the_environment(tmp_path, monkeypatch, level, configured) -> None:
    """``ROUTER_MIDDLEWARE_LOG_LEVEL`` sets router-middleware's log level in the proxy; a value that is
    no level stops the proxy at its start, naming the variable and the levels."""
    import logging
    import runpy

    import structlog

    from .litellm_proxy import PROXY_DIR

    (tmp_path / "router.yaml").write_text("app: a\n")
    monkeypatch.setenv("ROUTER_MIDDLEWARE_CONFIG", str(tmp_path / "router.yaml"))
    monkeypatch.setenv("ROUTER_MIDDLEWARE_LOG_LEVEL", level)
    monkeypatch.delenv("ROUTER_MIDDLEWARE_OTLP_ENDPOINT", raising=False)
    old, was_configured = structlog.get_config(), structlog.is_configured()
    try:
        if configured:
            hook = runpy.run_path(str(PROXY_DIR / "router_hook.py"))
            hook["handler"].unregister()
            logger = structlog.get_logger()
            assert logger.is_enabled_for(logging.WARNING) and not logger.is_enabled_for(logging.INFO)
        else:
            with pytest.raises(ValueError, match="ROUTER_MIDDLEWARE_LOG_LEVEL='LOUD' is no log level"):
                runpy.run_path(str(PROXY_DIR / "router_hook.py"))
    finally:
        structlog.configure(**old) if was_configured else structlog.reset_defaults()
