"""RouterLogger in ``litellm.callbacks``: the pre-call hook really rewrites what litellm sends (seen
on the wire through real recordings), and the success/failure events record usage, spans, ledger."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import litellm
import pytest
import structlog
from opentelemetry.trace import SpanKind, StatusCode

from router_middleware import BudgetExceeded, Pipeline, outcome, wire
from router_middleware.bookkeeping.keys import COOLDOWN, FAILURES
from router_middleware.ledger.store import open_ledger
from router_middleware.litellm import RouterLogger

from .cassette_data import capturing_vcr, completion_kwargs, interactions, recorded_usage
from .conftest import CASSETTES, cline_request


@pytest.fixture
def logger(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[RouterLogger]:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    pipeline = Pipeline.from_config({
        "context": {"watermark_tokens": 2000, "window_keep": 0.3, "max_payback_calls": None},
        "reasoning": {"rules": [{"when": {"model": "gpt-5*"}, "effort": "minimal"}]},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "cache": {"enabled": False},
    })
    asyncio.run(wire.drain_callbacks())  # litellm's logging of earlier tests' calls: not for this logger
    router = RouterLogger(pipeline).register()
    yield router
    router.unregister()
    assert all(router not in getattr(litellm, name) for name in
               ("callbacks", "success_callback", "failure_callback", "_async_success_callback",
                "_async_failure_callback"))


def _history(question: list[dict]) -> list[dict]:
    old: list[dict] = []
    for i in range(30):
        old += [{"role": "user", "content": f"Earlier question {i} about src/module_{i}.py " + "detail " * 60},
                {"role": "assistant", "content": f"It defines helper_{i}. " + "more " * 60}]
    return old + question


def _polled(condition: Callable[[], object], step_s: float = 0.02) -> bool:
    """Wait, blocking, until ``condition()`` holds (what litellm's threads deliver), 200 steps at most."""
    for _ in range(200):
        if condition():
            return True
        time.sleep(step_s)
    return False


async def _apolled(condition: Callable[[], object], step_s: float = 0.01) -> bool:
    """:func:`_polled` on the event loop, which keeps turning meanwhile."""
    for _ in range(200):
        if condition():
            return True
        await asyncio.sleep(step_s)
    return False


async def _recorded(router: RouterLogger, count: int) -> None:
    if not await _apolled(lambda: router.recorded >= count, 0.02):  # litellm runs success callbacks in the background
        raise AssertionError(f"only {router.recorded} of {count} calls recorded")


def test_async_hook_trims_the_request_on_the_wire_and_records_the_call(logger, span_exporter) -> None:
    item = interactions(CASSETTES / "openai_chat.yaml")[0]
    kwargs = completion_kwargs(item)
    kwargs["messages"] = _history(kwargs["messages"])
    replayer, sent = capturing_vcr()

    async def run() -> None:
        await litellm.acompletion(**kwargs, metadata={"session_id": "s1"})
        await _recorded(logger, 1)

    with replayer.use_cassette(str(CASSETTES / "openai_chat.yaml")):
        asyncio.run(run())
    assert logger.hook_calls == 1
    body = sent[-1]
    assert len(body["messages"]) < len(kwargs["messages"])  # trimmed by the hook, not by litellm
    assert sum("earlier messages omitted" in str(m["content"]) for m in body["messages"]) == 1
    assert body["messages"][-1] == item.request["messages"][-1]
    route = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL)
    assert route.attributes["router_middleware.context.compacted"] is True
    client = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    usage = recorded_usage(item)
    assert client.attributes["gen_ai.usage.input_tokens"] == usage["input_tokens"]
    assert client.attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"]
    assert client.attributes["gen_ai.conversation.id"] == "s1"
    logger.pipeline.close()
    rows = open_ledger(logger.pipeline.config.ledger.url).query("SELECT input_tokens, output_tokens FROM calls")
    assert [tuple(r) for r in rows] == [(usage["input_tokens"], usage["output_tokens"])]


def test_async_hook_applies_the_reasoning_policy(logger) -> None:
    item = interactions(CASSETTES / "openai_chat_reasoning.yaml")[0]
    kwargs = completion_kwargs(item)  # recorded with reasoning_effort "low"
    replayer, sent = capturing_vcr()

    async def run() -> None:
        await litellm.acompletion(**kwargs)
        await _recorded(logger, 1)

    with replayer.use_cassette(str(CASSETTES / "openai_chat_reasoning.yaml"), allow_playback_repeats=True):
        asyncio.run(run())
    assert sent[-1]["reasoning_effort"] == "minimal"  # the rule's cap, not what the caller asked


def test_sync_calls_are_recorded_though_litellm_skips_the_hook(logger) -> None:
    item = interactions(CASSETTES / "openai_chat.yaml")[0]
    replayer, sent = capturing_vcr()
    with replayer.use_cassette(str(CASSETTES / "openai_chat.yaml")):
        litellm.completion(**completion_kwargs(item))
    _polled(lambda: logger.recorded)
    assert logger.hook_calls == 0 and logger.recorded == 1


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_a_sync_call_s_span_carries_its_request_parameters(logger, span_exporter, stream) -> None:
    """``litellm.completion`` (no hook: the call is planned from its event) had every
    ``gen_ai.request.*`` attribute missing (the observed plan kept only the endpoint of the request)."""
    answer = litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                                temperature=0.3, max_tokens=77, top_p=0.9, seed=5, stream=stream)
    if stream:
        for _ in answer:
            pass
    assert _polled(lambda: logger.recorded)
    (chat,) = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    sent = {k.removeprefix("gen_ai.request."): v for k, v in chat.attributes.items() if k.startswith("gen_ai.request.")}
    assert sent == {"model": "gpt-4o-mini", "temperature": 0.3, "max_tokens": 77, "top_p": 0.9, "seed": 5,
                    **({"stream": True} if stream else {})}


def test_failures_are_recorded(logger, span_exporter) -> None:
    async def run() -> None:
        with pytest.raises(litellm.RateLimitError):
            await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                      mock_response=litellm.RateLimitError("slow down", "openai", "gpt-4o-mini"))
        await _recorded(logger, 1)

    asyncio.run(run())
    failed = [s for s in span_exporter.get_finished_spans() if s.status.status_code == StatusCode.ERROR]
    assert failed and failed[0].attributes["error.type"] == "RateLimitError"


@pytest.mark.parametrize("metadata", [{"session_id": 123}, {"tenant": {"a": 1}}, {"step": "three"}])
def test_the_proxy_hook_plans_a_request_whose_metadata_holds_no_label_without_it(metadata) -> None:
    """litellm's metadata is free-form: the proxy answered such a request 400 ("context.session_id:
    expected a string, got int 123"), where it answers 200 without the hook."""
    proxy = RouterLogger(Pipeline.from_config({}), proxy=True)
    data = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": "c1",
            "metadata": metadata}
    with structlog.testing.capture_logs() as logs:
        changed = asyncio.run(proxy.async_pre_call_hook(None, None, data, "acompletion"))
    assert changed["model"] == "gpt-4o-mini"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["litellm_labels_refused"]


def test_proxy_hook_routes_to_a_deployment_name_and_the_deployment_hook_then_stands_aside() -> None:
    body = cline_request("yolo_first.json")
    router = RouterLogger(Pipeline.from_config({
        "routing": {"deployments": {"cheap": {"model": "openai/gpt-4o-mini"}, "strong": {"model": "openai/gpt-5-mini"}},
                    "aliases": {"coder": ["strong", "cheap"]}},
        "reasoning": {"rules": [{"when": {"step_kind": ["plan"]}, "effort": "high"}]},
    }), proxy=True)
    data = {**body, "model": "coder", "litellm_call_id": "c1", "metadata": {"user_api_key_alias": "team-a"}}
    changed = asyncio.run(router.async_pre_call_hook(None, None, data, "acompletion"))
    assert changed["model"] == "strong" and changed["reasoning_effort"] == "high"
    assert changed["prompt_cache_key"].startswith("rm-") and changed["messages"] == body["messages"]
    assert asyncio.run(router.async_pre_call_deployment_hook({**changed, "model": "gpt-5-mini"}, "acompletion")) is None
    assert router.hook_calls == 1


def test_difficulty_tiers_route_a_step_alike_through_the_pipeline_and_the_proxy(tmp_path) -> None:
    """A step's kind, read from its messages when the caller gives none, weighs in its difficulty the
    same way in: the task's first call (``plan``) goes to the strong tier, a tool result (``observe``)
    to the cheap one, and both rows say which kind it was."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    config = {"routing": {"deployments": {"cheap": {"model": "openai/gpt-4o-mini"},
                                          "strong": {"model": "openai/gpt-5-mini"}},
                          "aliases": {"low": ["cheap"], "high": ["strong"]},
                          "tiers": [{"max_score": 0.2, "alias": "low"}, {"max_score": 1.0, "alias": "high"}]},
              "context": {"enabled": False}, "ledger": {"url": url}}
    task = [{"role": "user", "content": "Rename the variable x to count in utils.py and run the tests"}]
    observed = [*task, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "bash", "arguments": '{"command": "cat utils.py"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x = 1\nprint(x)\n"}]
    pipeline = Pipeline.from_config(config)
    direct = [pipeline.completion(model="auto", messages=m, mock_response="ok") for m in (task, observed)]
    assert [outcome(r).plan.model for r in direct] == ["openai/gpt-5-mini", "openai/gpt-4o-mini"]
    pipeline.close()
    proxy = RouterLogger(Pipeline.from_config(config), proxy=True)
    hooked = [asyncio.run(proxy.async_pre_call_hook(None, None, {"model": "auto", "messages": m,
                                                               "litellm_call_id": f"p{i}"}, "acompletion"))
              for i, m in enumerate((task, observed))]
    assert [h["model"] for h in hooked] == ["strong", "cheap"]
    rows = open_ledger(url).query("SELECT step_kind FROM calls ORDER BY ts")
    assert [r[0] for r in rows] == ["plan", "observe"]


def _proxy_logger(tmp_path, targets: list[str]) -> RouterLogger:
    return RouterLogger(Pipeline.from_config({
        "routing": {"deployments": {"flaky": {"model": "openai/gpt-5-mini"}, "flaky2": {"model": "openai/gpt-5-mini"},
                                    "healthy": {"model": "openai/gpt-4o-mini"}},
                    "aliases": {"coder": targets}},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "telemetry": {"capture_content": True},
    }), proxy=True).register()


async def _through_proxy(logger: RouterLogger, router: litellm.Router, call_id: str, stream: bool = False,
                         shared: bool = False, event_first: bool = False, hook_group: str | None = None) -> object:
    """What the LiteLLM proxy does with a request: the pre-call hook, the router, the failure hook
    (``event_first``: after litellm's failure event was delivered; else while it is still queued;
    ``hook_group``: the ``model_group`` the request names then, as the real proxy leaves its first
    target's: litellm's router copies the metadata for each fallback)."""
    data = {"model": "coder", "messages": [{"role": "user", "content": f"task {call_id}"}],
            "litellm_call_id": call_id, "stream": stream}
    changed = await logger.async_pre_call_hook(None, None, data, "acompletion")
    if shared:
        changed = _proxy_request(changed)
    try:
        response = await router.acompletion(**changed)
        if stream:
            async for _ in response:
                pass
        return response
    except Exception as exc:
        if event_first:
            await logger.aflush()
        if hook_group is not None:
            changed["metadata"] = {**changed.get("metadata", {}), "model_group": hook_group}
        await logger.async_post_call_failure_hook(changed, exc, None)
        raise


def _dead_router(dead: str) -> litellm.Router:
    """A router whose deployments ``flaky`` and ``flaky2`` are both served by the failing ``dead``."""
    return litellm.Router(model_list=[
        {"model_name": name, "litellm_params": {"model": "openai/gpt-5-mini", "api_base": dead, "api_key": "x"}}
        for name in ("flaky", "flaky2")])


def _flaky_router(bad: str, up: str) -> litellm.Router:
    """A router whose deployment ``flaky`` is served by ``bad`` and ``healthy`` by ``up``."""
    return litellm.Router(model_list=[
        {"model_name": "flaky", "litellm_params": {"model": "openai/gpt-5-mini", "api_base": bad, "api_key": "x"}},
        {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": up, "api_key": "x"}},
    ])


def _proxy_request(changed: dict) -> dict:
    """A request as the proxy hands it to its router: one logging object for all its attempts (litellm
    reports only the first failure), the one the proxy's own cleanup reads."""
    logging_obj, changed = litellm.utils.function_setup(
        original_function="acompletion", rules_obj=litellm.utils.Rules(), start_time=datetime.now(), **changed)
    changed["litellm_logging_obj"] = logging_obj
    return changed


def _one_target_logger(tmp_path, target: str, **routing: Any) -> RouterLogger:
    """A proxy logger whose alias ``coder`` has the one deployment ``target`` (gpt-3.5-turbo, as the
    fault server's recording), under a daily budget of 1000 tokens and a tpm limit (:func:`_tpm_used`);
    ``routing``: more of the routing config."""
    return RouterLogger(Pipeline.from_config({
        "routing": {"deployments": {target: {"model": "openai/gpt-3.5-turbo"}}, "aliases": {"coder": [target]},
                    "budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}],
                    "limits": {target: {"tpm": 100000}}, **routing},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()


def _cut_router(base: str) -> litellm.Router:
    """The proxy's router, its one deployment ``cut`` on the fault server's stream cut partway."""
    return litellm.Router(model_list=[{"model_name": "cut", "litellm_params": {
        "model": "openai/gpt-3.5-turbo", "api_base": f"{base}/cut/v1", "api_key": "x"}}])


async def _cut_event_first(logger: RouterLogger, router: litellm.Router, call_id: str) -> None:
    """A proxy stream cut partway, litellm's failure event delivered before the proxy's failure hook."""
    data = {"model": "coder", "messages": [{"role": "user", "content": f"task {call_id}"}],
            "litellm_call_id": call_id, "stream": True}
    changed = _proxy_request(await logger.async_pre_call_hook(None, None, data, "acompletion"))
    with pytest.raises(litellm.APIConnectionError) as broke:
        async for _ in await router.acompletion(**changed):
            pass
    await logger.aflush()  # litellm's failure event, delivered before the hook
    await logger.async_post_call_failure_hook(changed, broke.value, None)
    await logger.aflush()


def _tpm_used(logger: RouterLogger, bucket: str, since: float) -> float:
    """The tokens quota ``bucket``'s tpm counters hold, over the minutes from ``since`` to now."""
    minutes = range(int(since // 60), int(time.time() // 60) + 1)
    return sum(float(logger.pipeline.store.get(f"quota:{bucket}:tpm:{m}") or 0) for m in minutes)


def _ledger(logger: RouterLogger,
            columns: tuple[str, ...] = ("ts", "error", "requested_model", "decisions", "model", "cost_usd")
            ) -> list[dict]:
    logger.pipeline.ledger.flush()
    return _rows_at(logger.pipeline.config.ledger.url, columns)


def _rows_at(url: str, columns: tuple[str, ...]) -> list[dict]:
    db = open_ledger(url)
    try:
        return [dict(zip(columns, row, strict=True))
                for row in db.query(f"SELECT {', '.join(columns)} FROM calls ORDER BY ts")]
    finally:
        db.close()


def _integration_router(tmp_path, coder: str, routing: str = "") -> None:
    """router.yaml in ``tmp_path`` for integrations/litellm-proxy/config.yaml's two deployments: alias
    ``coder`` routed over ``coder`` (a YAML list), ``routing`` more of it, a SQLite store and ledger there."""
    (tmp_path / "router.yaml").write_text(f"""
app: coding-agent
store: sqlite:///{tmp_path / 'store.db'}
routing:
  deployments: {{coder-cheap: {{model: openai/gpt-4o-mini}}, coder-strong: {{model: openai/gpt-5-mini}}}}
  aliases: {{coder: {coder}}}
{routing}ledger: {{url: 'sqlite:///{tmp_path / 'ledger.db'}'}}
""")


def _proxy_rows(tmp_path, columns: tuple[str, ...], count: int) -> list[dict]:
    """The rows a proxy running in ``tmp_path`` wrote to its ledger (``ledger.db``) once it holds
    ``count`` of them, or what it holds after 10 s."""
    rows: list[dict] = []
    for _ in range(100):
        if (tmp_path / "ledger.db").exists() and len(rows := _rows_at(f"sqlite:///{tmp_path / 'ledger.db'}",
                                                                      columns)) >= count:
            break
        time.sleep(0.1)
    return rows


def test_proxy_calls_fail_over_across_an_alias_cool_down_and_are_one_row_each(tmp_path, span_exporter) -> None:
    """A real litellm Router with two loopback deployments, one answering 503 to everything."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen), scripted_upstream(status=503) as (dead, dead_seen):
        router = _flaky_router(dead, up)
        logger = _proxy_logger(tmp_path, ["flaky", "healthy"])
        try:
            async def calls() -> None:
                for i in range(5):
                    await _through_proxy(logger, router, f"c{i}", stream=i % 2 == 1)
                await _recorded(logger, 5)
            asyncio.run(calls())
            rows = _ledger(logger)
        finally:
            logger.unregister()
    assert len(seen) == 5 and len(dead_seen) == 3  # the cooldown (3 failures) routes past the dead target
    assert len(rows) == 5 and all(r["error"] is None and r["requested_model"] == "coder" for r in rows)
    assert ["routing:fallback" in r["decisions"] for r in sorted(rows, key=lambda r: r["ts"])] == \
        [True, True, True, False, False]
    spans = span_exporter.get_finished_spans()
    assert len([s for s in spans if s.name == "route coder"]) == 5
    answered = [s for s in spans if s.name.startswith("chat ") and s.status.status_code != StatusCode.ERROR]
    assert len(answered) == 5 and all("run_commands" in s.attributes["gen_ai.output.messages"] for s in answered)


@pytest.mark.parametrize("event_first", [False, True])
@pytest.mark.parametrize("retry", ["answers", "fails"])
@pytest.mark.parametrize("alias", [["flaky"], ["flaky", "gone"]], ids=["one-target", "a-target-the-proxy-lacks"])
def test_a_proxy_call_with_one_target_keeps_the_router_s_retries_and_is_one_row(tmp_path, monkeypatch, alias, retry,
                                                                                event_first) -> None:
    """With no fallback to move to, the router retries its one target as it would without the hook
    (the hook set ``num_retries`` 0 on every request, so a passing 503 failed a request the proxy alone
    answered), and the failed try's event does not end the call: the retry's answer is its one row.
    When the retries fail too (two of them), the proxy's failure hook ends it, each try counted
    toward the cooldown (the third failure opens it) (review55b #4: the tries between the first and the last were not: litellm
    delivers a request's first failure event only). So too when the alias's other target is no name
    the proxy serves (the router is handed no fallback)."""
    import sys
    import types

    from .scripted_upstream import scripted_upstream

    upstream = scripted_upstream(fail_first=1) if retry == "answers" else scripted_upstream(status=503)
    with upstream as (base, seen):
        router = litellm.Router(model_list=[{"model_name": "flaky", "litellm_params": {
            "model": "openai/gpt-5-mini", "api_base": base, "api_key": "x"}}], num_retries=1 if retry == "answers" else 2)
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
        logger = _proxy_logger(tmp_path, alias)
        try:
            async def call() -> object:
                try:
                    return await _through_proxy(logger, router, "r1", shared=True, event_first=event_first)
                except litellm.ServiceUnavailableError as exc:
                    return exc
                finally:
                    await logger.aflush()
            answer = asyncio.run(call())
            rows = _ledger(logger)
        finally:
            logger.unregister()
    assert len(seen) == (2 if retry == "answers" else 3) and len(rows) == 1 and rows[0]["requested_model"] == "coder"
    if retry == "answers":
        assert answer.choices[0].message.tool_calls and rows[0]["error"] is None
        assert logger.pipeline.store.get("fail:flaky") is None
    else:
        assert isinstance(answer, litellm.ServiceUnavailableError) and rows[0]["error"] == "ServiceUnavailableError"
        # each try counted, as the pipeline's: the third (cooldown.failures) opens the circuit
        assert logger.pipeline.store.get(f"{COOLDOWN}flaky") is not None


def _proxy_with_router(monkeypatch, bases: dict[str, str], **settings: Any) -> litellm.Router:
    """The proxy's router (seen by the hook as the running proxy's), one deployment per model_name of
    ``bases`` (the first gpt-5-mini, the others gpt-4o-mini) served at its base URL; ``settings``: the
    router's own (``fallbacks``, ``num_retries``)."""
    import sys
    import types

    router = litellm.Router(model_list=[
        {"model_name": name, "litellm_params": {"model": "openai/gpt-5-mini" if i == 0 else "openai/gpt-4o-mini",
                                                "api_base": base, "api_key": "x"}}
        for i, (name, base) in enumerate(bases.items())], **settings)
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    return router


async def _hooked(logger: RouterLogger, router: litellm.Router, data: dict[str, Any],
                  check: Callable[[dict[str, Any]], None] = lambda _: None) -> object:
    """``data`` through the proxy's pre-call hook (what it hands the router ``check``-ed) and the router;
    a stream read to its end; the logger flushed."""
    changed = _proxy_request(await logger.async_pre_call_hook(None, None, {"litellm_call_id": "r1", **data},
                                                             "acompletion"))
    check(changed)
    answer = await router.acompletion(**changed)
    if data.get("stream"):
        async for _ in answer:
            pass
    await logger.aflush()
    return answer


@pytest.mark.parametrize("whose", ["router", "router, with parameters", "client", "client, with parameters"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("asked", ["coder", "flaky"], ids=["alias", "proxy-name"])
def test_a_proxy_call_the_plan_gives_no_fallback_keeps_the_router_s_own_and_is_one_row(tmp_path, monkeypatch, asked,
                                                                                      stream, whose) -> None:
    """The hook handed the router ``fallbacks=[]`` for a call its plan sends to one target, and a
    request's list replaces the router's own (``router_settings: fallbacks``) and the client's (the
    request's ``fallbacks``): with that target down the client got a 503 the proxy alone answers with
    its fallback. The router keeps them now, and the call follows them as one call: one row, its
    answer's, the failed target counted."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, dead_seen), scripted_upstream() as (up, seen):
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "healthy": up}, fallbacks=[] if whose.startswith(
            "client") else [{"flaky": ["healthy"] if whose == "router" else [{"model": "healthy", "temperature": 0.2}]}])
        logger = _proxy_logger(tmp_path, ["flaky"])
        data: dict[str, Any] = {"model": asked, "messages": [{"role": "user", "content": "task r1"}], "stream": stream}
        if whose.startswith("client"):  # a fallback with parameters of its own is handed on as it came
            data["fallbacks"] = ["healthy"] if whose == "client" else [{"model": "healthy", "temperature": 0.2}]
        try:
            answer = asyncio.run(_hooked(logger, router, data))
            rows = _ledger(logger, ("error", "requested_model", "deployment", "decisions", "cost_usd"))
        finally:
            logger.unregister()
    assert dead_seen and len(seen) == 1 and answer is not None
    assert seen[0].get("temperature") == (0.2 if whose.endswith("with parameters") else None)
    assert [(r["error"], r["requested_model"], r["deployment"]) for r in rows] == [(None, asked, "healthy")]
    assert "routing:fallback" in rows[0]["decisions"] and rows[0]["cost_usd"] > 0
    store = logger.pipeline.store  # each of the router's tries of flaky counted: the third opens its cooldown
    tries = len(dead_seen)
    assert float(store.get("fail:flaky") or 0) == tries if tries < 3 else store.get(f"{COOLDOWN}flaky") is not None


def test_a_proxy_call_whose_router_has_fallbacks_keeps_the_router_s_retries_of_its_one_target(tmp_path,
                                                                                             monkeypatch) -> None:
    """review55: with the router's own fallbacks handed on, the hook took them for the plan's and set
    ``num_retries`` 0, so a passing 503 went to the fallback (and failed the client where that was
    down too) where the bare router retries its target and answers. The router's own fallbacks are a
    last resort now: its target is retried as without the hook, and answers; nothing counted failing."""
    from .scripted_upstream import scripted_upstream

    def handed(changed: dict[str, Any]) -> None:
        assert "num_retries" not in changed and changed["fallbacks"] == ["healthy"]

    with scripted_upstream(fail_first=1) as (flaky, flaky_seen), scripted_upstream(status=503) as (down, down_seen):
        router = _proxy_with_router(monkeypatch, {"flaky": flaky, "healthy": down}, fallbacks=[{"flaky": ["healthy"]}],
                                    num_retries=1)
        logger = _proxy_logger(tmp_path, ["flaky"])
        try:
            answer = asyncio.run(_hooked(logger, router, {"model": "coder", "messages": [
                {"role": "user", "content": "task r1"}]}, handed))
            rows = _ledger(logger, ("error", "deployment"))
        finally:
            logger.unregister()
    assert answer.choices[0].message.tool_calls and len(flaky_seen) == 2 and not down_seen
    assert rows == [{"error": None, "deployment": "flaky"}]
    assert logger.pipeline.store.get("fail:flaky") is None and logger.pipeline.store.get("fail:healthy") is None


@pytest.mark.parametrize("usd", [1.0, 0.01], ids=["fits", "over-budget"])
def test_a_router_fallback_named_like_a_routing_alias_is_the_proxy_s_model_of_that_name(tmp_path, monkeypatch,
                                                                                      usd) -> None:
    """review55: a router fallback whose name is also a routing alias of the config (``coder``, a
    model_name of the proxy too) was planned as the alias (routed back to the target that failed) and
    the router's call to it refused: a 503 the bare proxy answers from ``coder``. Then (review55b #3) it
    was handed on unfollowed: its own row, sent whatever the budgets said ($0.099 charged against a
    $0.01 budget). The call now follows it as the proxy's model of that name (gpt-4 here): one row
    priced as gpt-4, and a budget that cannot hold it refuses it (the first target's error, nothing
    sent, nothing charged)."""
    import sys
    import types

    from .scripted_upstream import scripted_upstream

    def handed(changed: dict[str, Any]) -> None:
        assert changed["fallbacks"] == ["coder"]

    with scripted_upstream(status=503) as (dead, dead_seen), scripted_upstream() as (up, seen):
        router = litellm.Router(model_list=[
            {"model_name": "flaky", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": dead, "api_key": "x"}},
            {"model_name": "coder", "litellm_params": {"model": "openai/gpt-4", "api_base": up, "api_key": "x"}}],
            fallbacks=[{"flaky": ["coder"]}], num_retries=0)
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"flaky": {"model": "openai/gpt-4o-mini"}}, "aliases": {"coder": ["flaky"]},
                        "budgets": [{"name": "daily", "usd": usd, "window_s": 86400}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        try:
            async def call() -> object:
                try:
                    return await _hooked(logger, router, {"model": "flaky", "messages": [
                        {"role": "user", "content": "task r1 " + "word " * 300}]}, handed)
                except Exception as exc:  # as the proxy does: its failure hook, then the client's error
                    await logger.async_post_call_failure_hook({"litellm_call_id": "r1"}, exc, None)
                    return exc
            answer = asyncio.run(call())
            rows = _ledger(logger, ("error", "deployment", "target", "cost_usd"))
            spent = float(logger.pipeline.store.get(f"budget:daily:usd:(no app):{int(time.time() // 86400)}") or 0)
        finally:
            logger.unregister()
    assert dead_seen
    if usd == 1.0:
        assert not isinstance(answer, Exception) and answer.choices[0].message.tool_calls and len(seen) == 1
        assert rows == [{"error": None, "deployment": "coder", "target": "openai/gpt-4", "cost_usd": pytest.approx(spent)}]
        assert spent > 0.01  # priced as gpt-4, not as the alias's gpt-4o-mini
    else:
        assert isinstance(answer, litellm.ServiceUnavailableError) and not seen and spent == 0
        assert rows == [{"error": "ServiceUnavailableError", "deployment": "flaky", "target": "openai/gpt-4o-mini",
                         "cost_usd": None}]


def test_a_budget_s_downgrade_alias_that_is_also_the_router_s_fallback_is_routed_as_the_alias(tmp_path,
                                                                                           monkeypatch) -> None:
    """review56: a budget's ``downgrade_to`` alias (``cheap`` = [mini]) that is also a model_name of
    the proxy (gpt-4 there) and the router's fallback after the first target was planned as the
    proxy's gpt-4 once such fallbacks were followed as the proxy's models: it did not fit either, and
    the call was refused where the alias answers. A downgrade routes the alias: mini answers, one row."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (pricey, pricey_seen), scripted_upstream() as (mini, mini_seen), \
            scripted_upstream() as (cheap, cheap_seen):
        router = _proxy_with_router(monkeypatch, {"pricey": pricey, "mini": mini, "cheap": cheap},
                                    fallbacks=[{"pricey": ["cheap"]}], num_retries=0)
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"pricey": {"model": "openai/gpt-4"}, "mini": {"model": "openai/gpt-4o-mini"}},
                        "aliases": {"cheap": ["mini"]},
                        "budgets": [{"name": "daily", "usd": 0.01, "window_s": 86400, "downgrade_to": "cheap"}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        try:
            answer = asyncio.run(_hooked(logger, router, {"model": "pricey", "messages": [
                {"role": "user", "content": "task r1 " + "word " * 300}]}))
            rows = _ledger(logger, ("error", "requested_model", "deployment"))
        finally:
            logger.unregister()
    assert not isinstance(answer, Exception) and len(mini_seen) == 1 and not pricey_seen and not cheap_seen
    assert rows == [{"error": None, "requested_model": "pricey", "deployment": "mini"}]


@pytest.mark.parametrize("then", ["nothing", "a cheaper fallback"])
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_budget_that_refuses_the_router_s_own_fallback_holds_through_the_router_s_retries(tmp_path, monkeypatch,
                                                                                             stream, then) -> None:
    """review55b: the router's own fallback the budget cannot hold was refused at the router's first
    try of it only; the router, keeping its retries, tried it again and the hook let it through: gpt-4
    answered and the budget counter reached $0.099 of $0.01. The refusal now holds until the call ends:
    the client gets the first target's error, the fallback is never sent, nothing is charged. A
    fallback after it (``coder``, the proxy's gpt-4o-mini, named like a routing alias too) is not
    refused with it (review55c), and answers: the call's one row."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, _), scripted_upstream() as (up, seen), \
            scripted_upstream() as (cheap, cheap_seen):
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "pricey": up, "coder": cheap}, num_retries=2,
                                    fallbacks=[{"flaky": ["pricey"] if then == "nothing" else ["pricey", "coder"]}])
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"flaky": {"model": "openai/gpt-4o-mini"}, "pricey": {"model": "openai/gpt-4"}},
                        "aliases": {"coder": ["flaky"]}, "fallback": {"backoff_s": 0, "max_backoff_s": 0},
                        "budgets": [{"name": "daily", "usd": 0.01, "window_s": 86400}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        try:
            async def call() -> object:
                try:
                    return await _hooked(logger, router, {"model": "flaky", "stream": stream, "messages": [
                        {"role": "user", "content": "task r1 " + "word " * 300}]})
                except Exception as exc:  # as the proxy does: its failure hook, then the client's error
                    await logger.async_post_call_failure_hook({"litellm_call_id": "r1"}, exc, None)
                    return exc
            answer = asyncio.run(call())
            rows = _ledger(logger, ("error", "deployment", "cost_usd"))
            spent = float(logger.pipeline.store.get(f"budget:daily:usd:(no app):{int(time.time() // 86400)}") or 0)
        finally:
            logger.unregister()
    assert not seen
    if then == "nothing":
        assert isinstance(answer, litellm.ServiceUnavailableError) and spent == 0
        assert rows == [{"error": "ServiceUnavailableError", "deployment": "flaky", "cost_usd": None}]
    else:
        assert not isinstance(answer, Exception) and len(cheap_seen) == 1 and 0 < spent < 0.01
        assert rows == [{"error": None, "deployment": "coder", "cost_usd": pytest.approx(spent)}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_target_a_budget_passes_over_in_the_middle_of_an_alias_is_refused_and_the_next_answers(
        tmp_path, monkeypatch, stream) -> None:
    """An alias [flaky, pricey, healthy] behind the proxy, flaky down and a budget that cannot hold
    pricey (gpt-4): the lifecycle moves past pricey to healthy while the router calls its fallbacks in
    order. Its attempt at pricey is refused, and healthy answers: one row, nothing sent to pricey. (The
    same with the router's own fallbacks, which the lifecycle had walked past healthy too, is
    ``test_a_budget_that_refuses_the_router_s_own_fallback_holds_through_the_router_s_retries``; this
    one passed before that fix as well, and keeps the plan's own targets as they were.)"""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, _), scripted_upstream() as (up, seen), \
            scripted_upstream() as (cheap, cheap_seen):
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "pricey": up, "healthy": cheap}, num_retries=0)
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"flaky": {"model": "openai/gpt-4o-mini"}, "pricey": {"model": "openai/gpt-4"},
                                        "healthy": {"model": "openai/gpt-4o-mini"}},
                        "aliases": {"coder": ["flaky", "pricey", "healthy"]},
                        "fallback": {"backoff_s": 0, "max_backoff_s": 0},
                        "budgets": [{"name": "daily", "usd": 0.01, "window_s": 86400}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        try:
            answer = asyncio.run(_hooked(logger, router, {"model": "coder", "stream": stream, "messages": [
                {"role": "user", "content": "task r1 " + "word " * 300}]}))
            rows = _ledger(logger, ("error", "deployment"))
        finally:
            logger.unregister()
    assert not isinstance(answer, Exception) and not seen and len(cheap_seen) == 1
    assert rows == [{"error": None, "deployment": "healthy"}]


@pytest.mark.parametrize("whose", ["alias", "router", "window chain", "window chain under *", "request's window chain"])
def test_after_a_context_window_error_the_proxy_s_next_target_is_the_call_s_own_attempt(tmp_path, monkeypatch,
                                                                                       whose) -> None:
    """review55 #5: after ``small`` refused the prompt as over its window, the call passed over
    ``big`` (the catalog gives it no larger window) and ended failed, while the router called ``big``
    all the same, which answered: a failed row, then an unplanned row of its own (sent before any
    budget check). The call follows the router there now: one row, the answer's; ``small`` is not
    counted toward a cooldown (the prompt's fault). ``whose``: ``big`` is the alias's next target (the
    case that failed) or the router's own fallback (followed as the router moved on: one row before
    the fix too). With a ``context_window_fallbacks`` chain for ``small`` (the router's, under its
    name or ``*``, or the request's) to ``huge``, the router sends the error there, not to ``big``
    (review56: the call followed ``big``, never called, and its failed row said ``MovedOn`` there):
    the call follows the chain, one row at ``huge``."""
    from .scripted_upstream import scripted_upstream

    chain = "window chain" in whose
    windows = [{"*" if whose.endswith("*") else "small": ["huge"]}]
    with scripted_upstream(overflow=True) as (small, small_seen), scripted_upstream() as (big, big_seen), \
            scripted_upstream() as (huge, huge_seen):
        router = _proxy_with_router(monkeypatch, {"small": small, "big": big, "huge": huge}, num_retries=0,
                                    **({"fallbacks": [{"small": ["big"]}]} if whose == "router" else {}),
                                    **({"context_window_fallbacks": windows} if whose.startswith("window") else {}))
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"small": {"model": "openai/gpt-4o-mini"}, "big": {"model": "openai/gpt-4o-mini"}},
                        "aliases": {"coder": ["small"] if whose == "router" else ["small", "big"]},
                        "budgets": [{"name": "daily", "usd": 1.0, "window_s": 86400}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        data: dict[str, Any] = {"model": "coder", "messages": [{"role": "user", "content": "task r1"}]}
        if whose.startswith("request"):
            data["context_window_fallbacks"] = windows
        try:
            answer = asyncio.run(_hooked(logger, router, data))
            rows = _ledger(logger, ("error", "requested_model", "deployment", "cost_usd"))
            spent = float(logger.pipeline.store.get(f"budget:daily:usd:(no app):{int(time.time() // 86400)}") or 0)
            cooled = logger.pipeline.store.get("fail:small")
        finally:
            logger.unregister()
    answered = "huge" if chain else "big"
    assert not isinstance(answer, Exception) and len(small_seen) == 1 and cooled is None and spent > 0
    assert (len(big_seen), len(huge_seen)) == ((0, 1) if chain else (1, 0))
    assert rows == [{"error": None, "requested_model": "coder", "deployment": answered,
                     "cost_usd": pytest.approx(spent)}]


@pytest.mark.parametrize("case", ["over budget", "a target tried", "only the target", "a name not served"])
def test_a_proxy_s_context_window_chain_is_followed_as_litellm_walks_it(tmp_path, monkeypatch, case) -> None:
    """review56c: the router's ``context_window_fallbacks`` chain followed by the call. A chain target
    the budget cannot hold (gpt-4) was refused by the call, but the router called it all the same: a
    second row, $0.099 against a $0.005 budget; it is refused to the router now (the client gets the
    error, nothing sent). A target the call tried already is skipped, as litellm skips it (the row
    named it though ``huge`` answered); a chain naming only the target that failed ends the call
    with its error (the row named ``big``, never called); a chain of names the proxy does not serve
    leads the router on to the fallbacks it was handed, which the call follows: one row each."""
    import sys
    import types

    from .scripted_upstream import scripted_upstream

    chains = {"over budget": ["huge"], "a target tried": ["a", "huge"], "only the target": ["small"],
              "a name not served": ["ghost"]}
    with scripted_upstream(overflow=True) as (small, small_seen), scripted_upstream() as (big, big_seen), \
            scripted_upstream() as (huge, huge_seen), scripted_upstream(status=503) as (a, a_seen):
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": model, "api_base": base, "api_key": "x"}}
            for name, model, base in (("a", "openai/gpt-4o-mini", a), ("small", "openai/gpt-4o-mini", small),
                                      ("big", "openai/gpt-4o-mini", big),
                                      ("huge", "openai/gpt-4" if case == "over budget" else "openai/gpt-4o-mini", huge))],
            context_window_fallbacks=[{"small": chains[case]}], num_retries=0)
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"aliases": {"coder": ["a", "small", "big"] if case == "a target tried" else ["small", "big"]},
                        "budgets": [{"name": "daily", "usd": 0.005, "window_s": 86400}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        data = {"model": "coder", "messages": [{"role": "user", "content": "task r1 " + "word " * 300}]}
        try:
            async def call() -> object:
                try:
                    return await _hooked(logger, router, data)
                except Exception as exc:  # as the proxy does: its failure hook, then the client's error
                    await logger.async_post_call_failure_hook({"litellm_call_id": "r1"}, exc, None)
                    return exc
            answer = asyncio.run(call())
            rows = _ledger(logger, ("error", "deployment"))
            spent = float(logger.pipeline.store.get(f"budget:daily:usd:(no app):{int(time.time() // 86400)}") or 0)
        finally:
            logger.unregister()
    answered = {"over budget": None, "a target tried": "huge", "only the target": None, "a name not served": "big"}[case]
    assert len(small_seen) == 1 and len(a_seen) == (1 if case == "a target tried" else 0)
    assert (len(big_seen), len(huge_seen)) == ((answered == "big") * 1, (answered == "huge") * 1)
    if answered is None:
        assert isinstance(answer, Exception) and spent == 0
        assert rows == [{"error": "ContextWindowExceededError", "deployment": "small"}]
    else:
        assert not isinstance(answer, Exception) and 0 < spent < 0.005
        assert rows == [{"error": None, "deployment": answered}]


def test_a_refusal_left_by_a_proxy_call_that_never_ended_refuses_no_later_call_under_its_id(tmp_path,
                                                                                           monkeypatch) -> None:
    """review55c: a refusal kept for a proxy call whose failure hook never ran (its client left while
    the router was between tries) refused an SDK call that reused the call id. It covers only the
    targets the refused call followed, and a new proxy request under the id drops it."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, _), scripted_upstream() as (up, seen):
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "pricey": up}, fallbacks=[{"flaky": ["pricey"]}],
                                    num_retries=0)
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"flaky": {"model": "openai/gpt-4o-mini"}, "pricey": {"model": "openai/gpt-4"}},
                        "aliases": {"coder": ["flaky"]}, "budgets": [{"name": "daily", "usd": 0.01, "window_s": 86400}]},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        try:
            async def calls() -> object:
                with pytest.raises(litellm.ServiceUnavailableError):  # no failure hook: the client left
                    await _hooked(logger, router, {"model": "flaky", "messages": [
                        {"role": "user", "content": "task r1 " + "word " * 300}]})
                return await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                                 mock_response="ok", litellm_call_id="r1")
            answer = asyncio.run(calls())
        finally:
            logger.unregister()
    assert answer.choices[0].message.content == "ok" and not seen


@pytest.mark.parametrize("given", ["same model, own endpoint", []], ids=["same-model-own-endpoint", "none"])
def test_a_client_s_fallbacks_the_call_cannot_follow_are_handed_on_as_they_came(tmp_path, monkeypatch,
                                                                               given) -> None:
    """review55b: a client's ``fallbacks`` the call cannot follow by name (the requested model itself
    with an endpoint of its own) were dropped, a 503 the bare proxy answers from them; and an empty
    list, which turns the router's own off, was taken for none given. Each is handed to the router as
    it came, and answers (the empty list: fails) as without the hook."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, _), scripted_upstream() as (up, seen):
        fallbacks = [{"model": "flaky", "api_base": up}] if given == "same model, own endpoint" else given
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "healthy": up}, fallbacks=[{"flaky": ["healthy"]}],
                                    num_retries=0)
        logger = _proxy_logger(tmp_path, ["flaky"])
        try:
            async def call() -> object:
                try:
                    return await _hooked(logger, router, {"model": "flaky", "fallbacks": fallbacks, "messages": [
                        {"role": "user", "content": "task r1"}]}, lambda c: None if c["fallbacks"] == fallbacks
                                         else pytest.fail(f"handed {c['fallbacks']}"))
                except litellm.ServiceUnavailableError as exc:
                    return exc
            answer = asyncio.run(call())
        finally:
            logger.unregister()
    if given == []:
        assert isinstance(answer, litellm.ServiceUnavailableError) and not seen
    else:
        assert answer.choices[0].message.tool_calls and len(seen) == 1


def _hooked_then_bare(logger: RouterLogger, router: litellm.Router, data: dict[str, Any],
                      check: Callable[[dict[str, Any]], None] = lambda _: None) -> tuple[Any, Any, list[dict]]:
    """``data`` through the proxy's hook and ``router`` (what it hands the router ``check``-ed), then,
    the logger unregistered, straight to ``router`` (litellm's events of it drained, reaching no
    logger): the model each answer names (``None``: a 503), and the ledger's rows of the first."""
    async def call(hooked: bool) -> str | None:
        try:
            if hooked:
                answer = await _hooked(logger, router, {**data, "messages": [{"role": "user", "content": "task r1"}]},
                                       check)
            else:
                answer = await router.acompletion(**data, messages=[{"role": "user", "content": "x"}])
                await wire.drain_callbacks()
            return str(answer.model)
        except litellm.ServiceUnavailableError:
            await (logger.aflush() if hooked else wire.drain_callbacks())
            return None
    try:
        hooked = asyncio.run(call(hooked=True))
    finally:
        logger.unregister()
    rows = _ledger(logger, ("error", "requested_model", "decisions", "cost_usd"))
    return hooked, asyncio.run(call(hooked=False)), rows


@pytest.mark.parametrize(("given", "chain"), [
    ([{"flaky": ["healthy"]}], ["healthy"]), ([{"*": ["healthy"]}], ["healthy"]),
    (["flaky2", "healthy", {"*": []}], ["healthy"]), (["healthy", "flaky2", {"*": []}], ["flaky2"]),
    ([{"*": ["flaky2"]}, {"flaky": ["healthy"]}], ["healthy"]), ([{"flaky": "healthy"}], []),
    ([{"other": ["healthy"]}], []), ([{"flaky": ["flaky2"]}, {"flaky2": ["healthy"]}], ["flaky2", "healthy"]),
    ([{"flaky2": ["healthy"]}], []), (["healthy", {"other": []}], None)],
    ids=["the-group-s", "generic", "last-name-among-keyed", "a-down-name-last", "the-group-s-before-generic",
         "not-a-list", "another-group-s", "a-fallback-s-own", "only-a-later-group-s", "names-among-another-s"])
def test_a_client_s_fallbacks_keyed_by_model_group_are_followed_as_the_router_reads_them(
        tmp_path, monkeypatch, given, chain) -> None:
    """A client's ``fallbacks`` keyed by model group were handed to the proxy's router unfollowed:
    the router's fallback answered, and the ledger held a failed row for the call and a row of its
    own for the answer (asked for the provider's model, no decisions). The list is read as litellm's
    router reads it: entries alone walked as it walks them (each fallback's own entry after it:
    review61 found ``flaky -> flaky2 -> healthy`` read as ``flaky2`` alone, a 503 the bare router
    answers), among plain names the group's entry, else the last name, else ``*``'s: the call follows
    ``chain``, one row when it answers. Names among another group's entry (``chain`` None) are handed
    on as they came. Either way the call answers, or fails, as the bare router does with the list."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, _), scripted_upstream() as (up, seen):
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "healthy": up, "flaky2": dead}, num_retries=0)
        logger = _proxy_logger(tmp_path, ["flaky"])
        handed: list[Any] = []
        hooked, bare, rows = _hooked_then_bare(logger, router, {"model": "flaky", "fallbacks": given},
                                               lambda c: handed.append(c["fallbacks"]))
        answered = hooked is not None
        assert answered is (bare is not None)  # as the bare router
    assert handed == [given if chain is None else chain] and len(seen) == 2 * answered
    if chain is None:  # the router takes the last plain name
        assert answered
    elif answered:
        assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["requested_model"] == "flaky"
        assert "routing:fallback" in json.loads(rows[0]["decisions"]) and rows[0]["cost_usd"] > 0
    else:
        assert all(r["error"] for r in rows)


@pytest.mark.parametrize(("fallbacks", "answers"), [
    ([{"flaky": ["flaky2"]}, {"flaky2": ["healthy"]}], "up-healthy"),
    ([{"flaky": ["flaky2", "healthy"]}, {"flaky2": ["spare"]}], "up-spare"),
    ([{"flaky": ["flaky2"]}, {"flaky2": ["flaky", "spare"]}], "up-spare"),
    ([{"flaky": ["flaky2", "spare"]}, {"*": ["healthy"]}], "up-spare"),
    ([{"flaky": ["flaky2"]}, {"*": ["healthy"]}], None)],
    ids=["a-fallback-s-own", "depth-first", "back-to-the-first", "the-group-s-over-generic-at-a-hop",
         "generic-not-at-a-hop"])
def test_the_router_s_chained_fallbacks_are_walked_as_the_bare_router_walks_them(tmp_path, monkeypatch, fallbacks,
                                                                                 answers) -> None:
    """review61: the router's own ``fallbacks`` were read one level deep (the first target's entry):
    with ``flaky -> flaky2`` and ``flaky2 -> healthy`` the hook handed the router ``[flaky2]`` alone,
    and the client got the 503 the bare proxy answers from ``healthy``. Each fallback's own entry is
    walked after it, depth first, as litellm's router does (``answers``: whose answer the bare
    router gives, or none); the call answers from the same deployment, one row."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, _), scripted_upstream(status=503) as (dead2, _), \
            scripted_upstream(model="up-healthy") as (up, _), scripted_upstream(model="up-spare") as (spare, _):
        router = _proxy_with_router(monkeypatch, {"flaky": dead, "flaky2": dead2, "healthy": up, "spare": spare},
                                    fallbacks=fallbacks, num_retries=0)
        logger = _proxy_logger(tmp_path, ["flaky"])
        hooked, bare, rows = _hooked_then_bare(logger, router, {"model": "flaky"})
    assert bare == hooked == answers  # as the bare router
    if answers:
        assert len(rows) == 1 and rows[0]["error"] is None and rows[0]["requested_model"] == "flaky"
        assert "routing:fallback" in json.loads(rows[0]["decisions"]) and rows[0]["cost_usd"] > 0


async def _served_stream(logger: RouterLogger, router: litellm.Router, data: dict[str, Any]) -> list[Any]:
    """A stream as the proxy serves it: its pre-call, response-headers and streaming-iterator hooks
    around the router; the chunks served; the logger flushed."""
    changed = _proxy_request(await logger.async_pre_call_hook(None, None, {**data, "stream": True}, "acompletion"))
    stream = await router.acompletion(**changed)
    await logger.async_post_call_response_headers_hook(changed, None, stream)
    chunks = [c async for c in logger.async_post_call_streaming_iterator_hook(None, stream, changed)]
    await logger.aflush()
    return chunks


def test_a_proxy_stream_whose_filter_withheld_the_answer_is_a_complete_row(tmp_path) -> None:
    """review55b: a stream that ends ``content_filter`` with no content and no usage chunk was taken
    for one whose provider sent nothing (``EmptyStreamError``, counted toward the target's cooldown):
    a finish reason of the provider's own is an answer."""
    from .scripted_upstream import scripted_upstream

    logger = _one_target_logger(tmp_path, "filtered")
    try:
        with scripted_upstream(filtered=True) as (base, seen):
            router = litellm.Router(model_list=[{"model_name": "filtered", "litellm_params": {
                "model": "openai/gpt-3.5-turbo", "api_base": base, "api_key": "x"}}])
            chunks = asyncio.run(_served_stream(logger, router, {
                "model": "coder", "messages": [{"role": "user", "content": "task f1"}], "litellm_call_id": "f1"}))
            rows = _ledger(logger, ("error", "ended"))
    finally:
        logger.unregister()
    assert len(seen) == 1 and [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == ["content_filter"]
    assert rows == [{"error": None, "ended": "complete"}] and logger.pipeline.store.get("fail:filtered") is None


@pytest.mark.parametrize("filtered", [False, True], ids=["answers", "filters-no-usage-chunk"])
def test_a_proxy_stream_the_router_moves_on_from_after_its_role_chunk_is_its_fallback_s_answer(tmp_path,
                                                                                              filtered) -> None:
    """trial54c: the first target's stream sent its role chunk and closed; litellm's router fell back
    mid-stream and the client was served the fallback's whole answer. The stream's wrapper keeps only
    the first target's chunks, so the served answer was read as a stream that said nothing: a failed
    row (``EmptyStreamError``, no cost) at the fallback, which was counted toward its cooldown. Now
    what was served decides: one complete row at the fallback, priced at its usage chunk, the first
    target alone counted failing. So too for a fallback whose filter withheld the answer
    (``content_filter``, no usage chunk asked: review55)."""
    from .scripted_upstream import USAGE, scripted_upstream

    logger = RouterLogger(Pipeline.from_config({
        "routing": {"deployments": {"cut": {"model": "openai/gpt-4o-mini"}, "healthy": {"model": "openai/gpt-4o-mini"}},
                    "aliases": {"coder": ["cut", "healthy"]}},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
    try:
        with scripted_upstream(break_after=1) as (cut, cut_seen), scripted_upstream(filtered=filtered) as (up, up_seen):
            router = litellm.Router(model_list=[
                {"model_name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": base, "api_key": "x"}}
                for name, base in (("cut", cut), ("healthy", up))])
            chunks = asyncio.run(_served_stream(logger, router, {
                "model": "coder", "messages": [{"role": "user", "content": "task m1"}], "litellm_call_id": "m1",
                **({} if filtered else {"stream_options": {"include_usage": True}})}))
            rows = _ledger(logger, ("error", "deployment", "ended", "input_tokens", "output_tokens", "cost_usd"))
    finally:
        logger.unregister()
    assert len(cut_seen) == len(up_seen) == 1
    if filtered:
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            ["content_filter"]
        assert [tuple(r.values())[:3] for r in rows] == [(None, "healthy", "complete")]
    else:
        assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
        assert [tuple(r.values())[:5] for r in rows] == [
            (None, "healthy", "complete", USAGE["prompt_tokens"], USAGE["completion_tokens"])]
    assert rows[0]["cost_usd"] > 0
    assert float(logger.pipeline.store.get("fail:cut") or 0) == 1 and logger.pipeline.store.get("fail:healthy") is None


def _with_a_last_resort(tmp_path, monkeypatch, first: str, cooling: str,
                        probed: bool = False) -> tuple[object, list[dict], RouterLogger]:
    """One proxy request for ``coder`` = [flaky, healthy], ``flaky`` served by ``first`` and ``healthy``,
    cooling down, by ``cooling`` (the router retries a target once): the answer, the rows, the logger.
    ``probed``: ``flaky2`` (also ``first``'s) comes first, half-open, another call probing it."""
    import sys
    import time
    import types

    from router_middleware.bookkeeping import health

    router = litellm.Router(model_list=[
        *({"model_name": name, "litellm_params": {"model": "openai/gpt-5-mini", "api_base": first, "api_key": "x"}}
          for name in ("flaky", "flaky2")),
        {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": cooling,
                                                     "api_key": "x"}}], num_retries=1)
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    logger = _proxy_logger(tmp_path, ["flaky2", "flaky", "healthy"] if probed else ["flaky", "healthy"])
    store = logger.pipeline.store
    store.set("cooldown:healthy", repr(time.time() + 60).encode(), ttl_s=120)
    if probed:
        store.set("cooldown:flaky2", repr(time.time() - 1).encode(), ttl_s=60)
        assert store.add_within([], (), [health.probe_claim(health.Probe("flaky2", b"another call"), 30.0)]) is None
    try:
        async def call() -> object:
            try:
                return await _through_proxy(logger, router, "r1", shared=True)
            finally:
                await logger.aflush()
        answer = asyncio.run(call())
        return answer, _ledger(logger, ("target", "error", "decisions")), logger
    finally:
        logger.unregister()


@pytest.mark.parametrize("probed", [False, True], ids=["first", "after-a-probed-target"])
def test_behind_the_proxy_a_target_with_only_a_last_resort_behind_it_keeps_the_router_s_retries(
        tmp_path, monkeypatch, probed) -> None:
    """The alias's other target cools down: it is a last resort, handed to the router as a fallback.
    The router still retries its first target as it would with no fallback (a passing 503 is answered
    by the retry), rather than sending the request to the target that may still be down (found in
    review: with the last resort the hook set ``num_retries`` 0, and the request failed there). The
    same when the call moved past a half-open target another call probes (the hook read the last
    resorts from the moved plan, which has none: ``num_retries`` 0 again)."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(fail_first=1) as (up, seen), scripted_upstream(status=503) as (dead, dead_seen):
        answer, rows, _ = _with_a_last_resort(tmp_path, monkeypatch, up, dead, probed)
    assert len(seen) == 2 and not dead_seen  # retried where it was, never sent to the target cooling down
    assert answer.choices[0].message.tool_calls and len(rows) == 1 and rows[0]["error"] is None


@pytest.mark.parametrize("probed", [False, True], ids=["first", "after-a-probed-target"])
def test_behind_the_proxy_a_last_resort_answers_once_the_router_s_retries_failed(
        tmp_path, monkeypatch, probed) -> None:
    """The first target stays down through the router's retries: the router falls back to the target
    cooling down, which is back and answers; the call follows it (one row, the fallback its target;
    before the fix, the lifecycle took the move for one more try of the first target: its row named it).
    After a half-open target another call probes, the row records no return to it: the router, not
    handed it, never sent it (review60: the row's decisions went back to it and on again)."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, dead_seen), scripted_upstream() as (up, seen):
        answer, rows, logger = _with_a_last_resort(tmp_path, monkeypatch, dead, up, probed)
    assert len(dead_seen) == 2 and len(seen) == 1 and answer.choices[0].message.tool_calls
    assert len(rows) == 1 and (rows[0]["target"], rows[0]["error"]) == ("openai/gpt-4o-mini", None)
    assert "routing:fallback" in rows[0]["decisions"]
    assert json.loads(rows[0]["decisions"]).count("routing:half-open") == probed  # flaky2 skipped, once
    # each failed try counted once, as each of the pipeline's own tries is (a trial: counted once a
    # request, a dead target with only a last resort behind it took three requests to cool down)
    assert float(logger.pipeline.store.get("fail:flaky") or 0) == 2


def test_behind_the_proxy_a_probed_target_passed_over_gets_no_return_after_a_plain_failure(
        tmp_path, monkeypatch) -> None:
    """``coder`` = [a, h, b, last]: a and b answer 503, h is half-open (another call probes it), last
    cools down and is up. The router, handed [b, last], never goes back to h; the row records no
    return to it either (review60b: after b's plain failure the lifecycle went back to h, then on)."""
    import sys
    import time
    import types

    from router_middleware.bookkeeping import health

    from .scripted_upstream import scripted_upstream

    names = ("a", "h", "b")
    with scripted_upstream(status=503) as (dead, dead_seen), scripted_upstream() as (up, seen):
        router = litellm.Router(model_list=[
            *({"model_name": n, "litellm_params": {"model": "openai/gpt-5-mini", "api_base": dead, "api_key": "x"}}
              for n in names),
            {"model_name": "last", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": up, "api_key": "x"}}])
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {**{n: {"model": "openai/gpt-5-mini"} for n in names},
                                        "last": {"model": "openai/gpt-4o-mini"}},
                        "aliases": {"coder": ["a", "h", "b", "last"]}},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        store = logger.pipeline.store
        store.set("cooldown:last", repr(time.time() + 60).encode(), ttl_s=120)
        store.set("cooldown:h", repr(time.time() - 1).encode(), ttl_s=60)
        assert store.add_within([], (), [health.probe_claim(health.Probe("h", b"another call"), 30.0)]) is None
        try:
            async def call() -> object:
                try:
                    return await _through_proxy(logger, router, "r1")
                finally:
                    await logger.aflush()
            answer = asyncio.run(call())
            rows = _ledger(logger, ("target", "error", "decisions"))
        finally:
            logger.unregister()
    assert len(dead_seen) == 2 and len(seen) == 1 and answer.choices[0].message.tool_calls
    assert len(rows) == 1 and (rows[0]["target"], rows[0]["error"]) == ("openai/gpt-4o-mini", None)
    assert json.loads(rows[0]["decisions"]).count("routing:half-open") == 1  # h skipped, once


def test_a_target_the_proxy_has_no_model_for_is_skipped_and_named_once(tmp_path, monkeypatch) -> None:
    """Handed to the proxy, it gets the client a 400 ("Invalid model name") where the alias's next
    target would have answered; the config's name is logged once, with the closest the proxy has."""
    import sys
    import types

    import structlog

    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen):
        router = litellm.Router(model_list=[
            {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": up, "api_key": "x"}},
            {"model_name": "flaky-2", "litellm_params": {"model": "openai/gpt-5-mini", "api_base": up, "api_key": "x"}},
        ])
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
        logger = _proxy_logger(tmp_path, ["flaky", "healthy"])  # the proxy has no model_name "flaky"
        try:
            async def calls() -> None:
                for i in range(2):
                    await _through_proxy(logger, router, f"u{i}")
                await _recorded(logger, 2)
            with structlog.testing.capture_logs() as logs:
                asyncio.run(calls())
            rows = _ledger(logger)
        finally:
            logger.unregister()
    assert [body["model"] for body in seen] == ["gpt-4o-mini", "gpt-4o-mini"]  # healthy's, at once
    assert all(r["error"] is None and "routing:skip" in r["decisions"] for r in rows)
    said = [e for e in logs if e["event"] == "proxy_model_unknown"]
    assert [(e["where"], e["target"]) for e in said] == [("routing.aliases.coder", "flaky"),
                                                         ("routing.deployments", "flaky"),
                                                         ("routing.deployments", "flaky2")]
    assert said[0]["did_you_mean"][0] == "flaky-2"


@pytest.mark.parametrize(("params", "named"), [({"n": 0}, "n: expected a whole number of at least 1, got 0"),
                                               ({"presence_penalty": 9}, "presence_penalty: expected a number from -2"),
                                               ({"frequency_penalty": "x"}, "frequency_penalty: expected a number")])
def test_the_proxy_refuses_the_parameters_pipeline_completion_refuses_by_name(params, named, tmp_path) -> None:
    """A parameter out of its range is the client's error behind the proxy as through ``Pipeline.completion``
    (400, naming it), not sent on to the provider."""
    from router_middleware import RequestError

    logger = _proxy_logger(tmp_path, ["flaky", "healthy"])
    try:
        data = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": "bad", **params}
        with pytest.raises(RequestError, match=named) as raised:
            asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
    finally:
        logger.unregister()  # registered, it would take later tests' litellm calls
    assert raised.value.status_code == 400


def test_the_proxy_reserves_the_output_of_each_of_n_answers(tmp_path) -> None:
    logger = RouterLogger(Pipeline.from_config({"routing": {"budgets": [{"name": "day", "tokens": 1000}]}}),
                          proxy=True)
    data = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300}
    asyncio.run(logger.async_pre_call_hook(None, None, {**data, "litellm_call_id": "one", "n": 1}, "acompletion"))
    with pytest.raises(BudgetExceeded, match="this call's estimate"):
        asyncio.run(logger.async_pre_call_hook(None, None, {**data, "litellm_call_id": "two", "n": 3}, "acompletion"))


@pytest.mark.parametrize(("model", "suggested"), [("healthyy", "healthy"), ("codr", "coder"), ("codr:floor", "coder")])
def test_a_model_neither_the_proxy_nor_the_config_knows_is_a_400_naming_the_closest(model, suggested, tmp_path,
                                                                                      monkeypatch) -> None:
    """A client's typo is the client's error (400, as the bare proxy's "Invalid model name"), with the
    closest names: not a 503 ``NoRouteError``, which OpenAI-style clients retry."""
    import sys
    import types

    from router_middleware import UnknownModelError

    router = litellm.Router(model_list=[
        {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x"}}])
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    logger = _proxy_logger(tmp_path, ["flaky", "healthy"])
    try:
        data = {"model": model, "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": f"typo-{model}"}
        with pytest.raises(UnknownModelError, match=rf"model '{model}': .*did you mean '{suggested}'") as raised:
            asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
        assert raised.value.status_code == 400
        for known in ("healthy", "coder", "coder:floor"):  # a proxy's model, the config's alias
            data = {"model": known, "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": f"ok-{known}"}
            changed = asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
            assert changed is not None and changed["model"] == "healthy"
            asyncio.run(logger.async_post_call_failure_hook(changed, RuntimeError("not sent"), None))
    finally:
        logger.unregister()


def test_a_request_with_its_own_credentials_is_not_held_to_the_proxy_s_model_list(tmp_path, monkeypatch) -> None:
    """With a client's api_key or api_base the proxy sends any model, so no target is skipped."""
    import sys
    import types

    router = litellm.Router(model_list=[
        {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x"}}])
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    logger = _proxy_logger(tmp_path, ["flaky", "healthy"])
    try:
        for extra, sent in (({}, "healthy"), ({"api_base": "http://127.0.0.1:9/v1"}, "flaky")):
            data = {"model": "coder", "messages": [{"role": "user", "content": "hi"}],
                    "litellm_call_id": f"own-{sent}", **extra}
            changed = asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
            assert changed is not None and changed["model"] == sent
            asyncio.run(logger.async_post_call_failure_hook(changed, RuntimeError("not sent"), None))
    finally:
        logger.unregister()


def test_the_sdk_hook_never_fails_a_call_it_cannot_plan(logger) -> None:
    bad = {"model": "gpt-4o-mini", "messages": [{"role": "tool", "content": "no call id"}], "litellm_call_id": "b"}
    assert asyncio.run(logger.async_pre_call_deployment_hook(bad, "acompletion")) is None  # sent as it came


@pytest.mark.parametrize("status", [503, 400, 401])
def test_a_proxy_call_that_fails_everywhere_is_one_error_row(tmp_path, status) -> None:
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=status) as (dead, dead_seen):
        router = _dead_router(dead)
        logger = _proxy_logger(tmp_path, ["flaky", "flaky2"])
        try:
            with pytest.raises(Exception, match="overloaded"):
                asyncio.run(_through_proxy(logger, router, "lost"))
            asyncio.run(_recorded(logger, 1))
            rows = _ledger(logger)
        finally:
            logger.unregister()
    assert len(dead_seen) == 2  # each target once, in the alias's order
    assert len(rows) == 1 and rows[0]["error"] and "routing:fallback" in rows[0]["decisions"]


def test_run_labels_separate_runs_of_the_same_task() -> None:
    from router_middleware.litellm import run_labels

    second = cline_request("yolo_second_after_tool.json")["messages"]
    first = second[:3]  # Cline's opening request: system, task, reminder

    def other_run(messages: list[dict]) -> list[dict]:
        turn = messages[3]
        return [*messages[:3], {**turn, "tool_calls": [{**turn["tool_calls"][0], "id": "call_another_run"}]},
                {**messages[4], "tool_call_id": "call_another_run"}]

    start, later, elsewhere = run_labels(first), run_labels(second), run_labels(other_run(second))
    assert (start["step"], start["step_kind"], later["step"], later["step_kind"]) == (0, "plan", 1, "observe")
    assert later["session_id"].startswith(start["session_id"] + "-")  # the run's first call: its head alone
    assert elsewhere["session_id"] != later["session_id"]  # same task, another run
    assert run_labels([*second, {"role": "assistant", "content": "done"}])["session_id"] == later["session_id"]


def test_a_proxy_call_follows_the_router_when_only_its_first_failure_is_reported(tmp_path) -> None:
    """Behind the proxy one logging object serves every attempt and reports one failure: the deployment
    hook of the next target tells the lifecycle that the attempt before failed too."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen), scripted_upstream(status=503) as (dead, dead_seen):
        router = litellm.Router(model_list=[
            {"model_name": "flaky", "litellm_params": {"model": "openai/gpt-5-mini", "api_base": dead, "api_key": "x"}},
            {"model_name": "flaky2", "litellm_params": {"model": "openai/gpt-5-mini", "api_base": dead, "api_key": "x"}},
            {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": up, "api_key": "x"}},
        ])
        logger = _proxy_logger(tmp_path, ["flaky", "flaky2", "healthy"])
        try:
            async def call() -> None:  # the success event runs on the call's event loop
                await _through_proxy(logger, router, "one", shared=True)
                await _recorded(logger, 1)
            asyncio.run(call())
            rows = _ledger(logger)
        finally:
            logger.unregister()
    assert (len(dead_seen), len(seen)) == (2, 1)
    assert len(rows) == 1 and rows[0]["error"] is None
    assert "routing:fallback" in json.loads(rows[0]["decisions"])  # the last fallback's plan (depth 2)
    expected = 3210 * 0.15e-6 + 42 * 0.6e-6  # gpt-4o-mini, the deployment that answered (no cache read here)
    assert rows[0]["cost_usd"] == pytest.approx(expected, rel=0.5)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("status", [400, 401, 404])
def test_a_proxy_call_the_router_falls_back_after_a_failure_the_pipeline_would_end_on_is_one_row(
        tmp_path, status, stream) -> None:
    """The proxy's router falls back after a 400, 401 or 404 of its first target, where the pipeline's
    own attempts would end the call: the lifecycle follows the router, so the call is one row (the
    answer's, its fallback decision naming the first target's error), not a failed row and a row of
    an unrouted call."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen), scripted_upstream(status=status) as (bad, bad_seen):
        router = _flaky_router(bad, up)
        logger = _proxy_logger(tmp_path, ["flaky", "healthy"])
        try:
            async def call() -> None:
                await _through_proxy(logger, router, "one", stream=stream, shared=True, event_first=True)
                await _recorded(logger, 1)
                await asyncio.sleep(0.2)  # a late event of the first attempt would add a row now
                await logger.aflush()
            asyncio.run(call())
            rows = _ledger(logger)
            failures = float(logger.pipeline.store.get("fail:flaky") or 0)
        finally:
            logger.unregister()
    assert failures == (0 if status == 400 else 1)  # the first target's failure counts, but not a bad request
    assert (len(bad_seen), len(seen)) == (1, 1)  # the router fell back
    assert len(rows) == 1, rows
    row = rows[0]
    assert (row["error"], row["requested_model"], row["model"]) == (None, "coder", "scripted-coder")
    assert "routing:fallback" in json.loads(row["decisions"])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("targets", "attempts"), [(["flaky", "healthy"], 1), (["flaky", "healthy"], 2),
                                                   (["flaky", "flaky2", "healthy"], 1)])
def test_proxy_calls_past_a_target_in_the_router_s_own_cooldown_are_one_row_each(tmp_path, stream, targets,
                                                                                attempts) -> None:
    """After a 401 litellm's router cools its target down: later calls skip it without calling it, and
    the router's refusal (``RouterRateLimitError``, its failure event naming no model group) comes after
    the lifecycle moved on: it is not the next target's failure (a failed row and an unrouted one). The
    lifecycle follows the router to the target it calls, past every target it skipped (before, one a
    step: a row named a target the router never called) and never retries one it moved past."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen), scripted_upstream(status=401) as (bad, bad_seen):
        router = litellm.Router(model_list=[
            *({"model_name": name, "litellm_params": {"model": "openai/gpt-5-mini", "api_base": bad, "api_key": "x"}}
              for name in targets[:-1]),
            {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": up, "api_key": "x"}},
        ])
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"deployments": {"flaky": {"model": "openai/gpt-5-mini"}, "flaky2": {"model": "openai/gpt-5-mini"},
                                        "healthy": {"model": "openai/gpt-4o-mini"}},
                        "aliases": {"coder": targets}, "fallback": {"attempts_per_model": attempts, "backoff_s": 0}},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
        try:
            async def calls() -> None:
                for i in range(3):
                    await _through_proxy(logger, router, f"c{i}", stream=stream, shared=True, event_first=True)
                    await _recorded(logger, i + 1)
                await asyncio.sleep(0.2)
                await logger.aflush()
            asyncio.run(calls())
            rows = _ledger(logger, ("ts", "error", "requested_model", "decisions", "deployment"))
        finally:
            logger.unregister()
    assert (len(bad_seen), len(seen)) == (len(targets) - 1, 3)  # the first call's 401s cooled them down
    assert len(rows) == 3, rows
    assert all(r["error"] is None and r["requested_model"] == "coder" and "routing:fallback" in r["decisions"]
               and r["deployment"] == "healthy" for r in rows), rows


def _quota_logger(tmp_path, models: dict[str, str], limited: str) -> RouterLogger:
    """A proxy logger whose alias ``coder`` is ``models`` (deployment -> model) in order, ``limited``
    at 1 request a minute, on a SQLite store (the plan's view of quotas up to a second old), no backoff
    and a cooldown no test reaches."""
    return RouterLogger(Pipeline.from_config({
        "store": f"sqlite:///{tmp_path / 'store.db'}",
        "routing": {"deployments": {name: {"model": model} for name, model in models.items()},
                    "aliases": {"coder": list(models)}, "limits": {limited: {"rpm": 1}},
                    "cooldown": {"failures": 100, "window_s": 60, "cooldown_s": 30}, "fallback": {"backoff_s": 0}},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()


async def _outcomes(logger: RouterLogger, router: litellm.Router, count: int, pause_s: float) -> list[str]:
    """``count`` proxy calls in a row (``pause_s`` apart): ``ok`` or the name of what each raised."""
    outcomes = []
    for i in range(count):
        try:
            await _through_proxy(logger, router, f"c{i}", shared=True, event_first=True)
            outcomes.append("ok")
        except Exception as exc:
            outcomes.append(type(exc).__name__)
        await asyncio.sleep(pause_s)
    return outcomes


@pytest.mark.usefixtures("one_quota_window")
def test_a_proxy_fallback_over_its_quota_is_not_called_and_the_call_is_one_row(tmp_path, monkeypatch) -> None:
    """The router holds the alias's next target as a fallback; when the first target fails and the
    lifecycle refuses that target (its rpm quota used up, which the plan's view of a shared store, up
    to a second old, did not show yet), the router called it anyway: over the limit, and a failed row
    plus a row of an unrouted call. Now the deployment hook refuses the attempt: the target is not
    called, the client gets the first target's error (as ``Pipeline.completion`` fails, and as with an
    in-memory store), one row; a direct call to the target still goes through. The view is kept 10 s
    here, so that it is still stale at the third call however slow the first one was (a first request
    that took over a second read the quota afresh, and the third call was planned without the target)."""
    from router_middleware import assembly

    from .scripted_upstream import scripted_upstream

    monkeypatch.setattr(assembly, "_lag", lambda store: 10.0)

    with scripted_upstream() as (up, seen), scripted_upstream(status=500) as (bad, bad_seen):
        router = _flaky_router(bad, up)
        logger = _quota_logger(tmp_path, {"flaky": "openai/gpt-5-mini", "healthy": "openai/gpt-4o-mini"}, "healthy")
        try:
            async def calls() -> list[str]:
                outcomes = await _outcomes(logger, router, 3, 0.2)
                await logger.aflush()
                await router.acompletion(model="healthy", messages=[{"role": "user", "content": "direct"}])
                return outcomes
            outcomes = asyncio.run(calls())
            rows = _ledger(logger, ("error", "requested_model", "deployment"))
        finally:
            logger.unregister()
    assert outcomes == ["ok", "InternalServerError", "InternalServerError"]
    assert (len(bad_seen), len(seen)) == (3, 2)  # healthy: the first call's fallback, and the direct call
    assert [(r["error"], r["requested_model"], r["deployment"]) for r in rows[:3]] == [
        (None, "coder", "healthy"), ("InternalServerError", "coder", "flaky"), ("InternalServerError", "coder", "flaky")]


@pytest.mark.usefixtures("one_quota_window")
def test_a_proxy_fallback_the_plan_passed_is_refused_and_a_target_never_called_counts_nothing(tmp_path) -> None:
    """Alias ``[flaky, mid, healthy]``, mid's rpm 1 used up by the first call's fallback: the next call's
    lifecycle passes mid (its quota) and admits healthy, while the router, handed mid as a fallback at
    the pre-call hook, calls mid next. Before, mid was called over its limit and the lifecycle counted
    healthy, never called, as failed (its cooldown reached for everyone: ``fail:healthy`` 4 after five
    calls). Now the deployment hook refuses mid, the router moves on to healthy: one row each, mid
    called once, healthy's count untouched (a review found it)."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen), scripted_upstream() as (mid, mid_seen), \
            scripted_upstream(status=500) as (bad, bad_seen):
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": base, "api_key": "x"}}
            for name, base in (("flaky", bad), ("mid", mid), ("healthy", up))])
        logger = _quota_logger(tmp_path, dict.fromkeys(("flaky", "mid", "healthy"), "openai/gpt-4o-mini"), "mid")
        try:
            async def calls() -> None:
                for i in range(5):
                    await _through_proxy(logger, router, f"c{i}", shared=True, event_first=True)
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)
                await logger.aflush()
            asyncio.run(calls())
            rows = _ledger(logger, ("error", "requested_model", "deployment"))
            counts = {name: logger.pipeline.store.get(f"fail:{name}") for name in ("mid", "healthy")}
        finally:
            logger.unregister()
    assert (len(bad_seen), len(mid_seen), len(seen)) == (5, 1, 4)
    assert [(r["error"], r["deployment"]) for r in rows] == [(None, "mid")] + [(None, "healthy")] * 4
    assert counts == {"mid": None, "healthy": None}


@pytest.mark.usefixtures("one_quota_window")
def test_a_proxy_fallback_the_lifecycle_refuses_in_its_own_hook_is_not_called_and_leaves_nothing(tmp_path) -> None:
    """Alias ``[flaky, flaky2, healthy]``, healthy's rpm 1: litellm reports only the first failure, so
    the lifecycle learns flaky2 failed in healthy's own deployment hook, and refuses healthy there (its
    quota used up). Before, the hook let the router call healthy over its limit, and the refusal stayed
    behind for a later request reusing the call id (a client's ``x-litellm-call-id``): its first
    target was refused. Now the refusal is raised there and nothing is left."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen), scripted_upstream(status=500) as (bad, bad_seen):
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": base, "api_key": "x"}}
            for name, base in (("flaky", bad), ("flaky2", bad), ("healthy", up))])
        logger = _quota_logger(tmp_path, dict.fromkeys(("flaky", "flaky2", "healthy"), "openai/gpt-4o-mini"),
                               "healthy")
        try:
            async def calls() -> list[str]:
                outcomes = await _outcomes(logger, router, 2, 0.05)
                await logger.aflush()
                return outcomes
            outcomes = asyncio.run(calls())
        finally:
            logger.unregister()
    assert outcomes == ["ok", "InternalServerError"] and len(seen) == 1  # healthy called once: rpm 1
    assert logger._refusing == {}


def test_a_proxy_router_s_own_context_window_fallback_is_followed(tmp_path) -> None:
    """The proxy's ``context_window_fallbacks`` send a call to a group its plan never held: the hook
    follows it as before (a review found it refused as a target the plan passed: the call failed where
    the bare proxy serves it)."""
    router = litellm.Router(model_list=[
        {"model_name": "primary", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x",
                                                     "mock_response": "litellm.ContextWindowExceededError"}},
        {"model_name": "other", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x",
                                                   "mock_response": "from other"}}],
        context_window_fallbacks=[{"primary": ["other"]}], num_retries=0)
    logger = RouterLogger(Pipeline.from_config({"ledger": {"url": f"sqlite:///{tmp_path / 'l.db'}"},
                                                "cache": {"enabled": False}}), proxy=True).register()
    try:
        async def call() -> object:
            data = {"model": "primary", "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": "c1"}
            changed = await logger.async_pre_call_hook(None, None, data, "acompletion")
            answer = await router.acompletion(**changed)
            await _recorded(logger, 1)  # its events, before the next test's logger is registered
            await logger.aflush()
            return answer
        answer = asyncio.run(call())
    finally:
        logger.unregister()
    assert answer.choices[0].message.content == "from other"


def test_the_pipelines_own_summary_calls_are_not_accounted_twice(tmp_path) -> None:
    """Behind the proxy the hook writes a summary through litellm, where the same logger sees it: its
    cost belongs to the row of the call it serves, not to a row of its own."""
    logger = RouterLogger(Pipeline.from_config({
        "context": {"watermark_tokens": 2000, "max_payback_calls": None, "summarize": True,
                    "summary_params": {"mock_response": "They discussed 40 questions."}},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
    }), proxy=True).register()
    try:
        async def hook() -> dict:
            data = {"model": "deepseek/deepseek-chat", "messages": _history([{"role": "user", "content": "next?"}]),
                    "litellm_call_id": "summarized"}
            changed = await logger.async_pre_call_hook(None, None, data, "acompletion")
            await asyncio.sleep(0.5)  # litellm's success callbacks of the summary call run in the background
            return changed
        changed = asyncio.run(hook())
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert any("They discussed 40 questions." in str(m.get("content")) for m in changed["messages"])
    assert logger.hook_calls == 1 and logger.recorded == 0 and rows == []


def test_aflush_delivers_a_short_scripts_events_before_asyncio_run_ends(logger) -> None:
    """litellm logs async calls on a background worker that ``asyncio.run`` cancels on return: the
    README's script awaits ``aflush()`` and every call is recorded, its ledger row written."""

    async def script() -> None:
        for i in range(3):
            await litellm.acompletion(model="gpt-4o-mini", mock_response="ok",
                                      messages=[{"role": "user", "content": f"question {i}"}])
        await logger.aflush()

    asyncio.run(script())
    assert logger.recorded == 3
    assert len(open_ledger(logger.pipeline.config.ledger.url).query("SELECT call_id FROM calls")) == 3


def test_aflush_with_no_call_left_to_follow_runs_no_collection(logger, monkeypatch) -> None:
    """The full collection (0.2 s) that frees calls litellm let go of is paid only while some call is
    still followed: an application awaiting ``aflush()`` after each answered request does not pay it."""
    import gc

    collections: list[int] = []
    collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1) or collect(*a))

    async def script() -> None:
        await litellm.acompletion(model="gpt-4o-mini", mock_response="ok",
                                  messages=[{"role": "user", "content": "question"}])
        await logger.aflush()

    asyncio.run(script())
    assert logger.recorded == 1 and collections == []


@pytest.mark.parametrize("target", ["team-gpt", "dep-1"])
def test_a_name_the_proxy_serves_beyond_its_model_names_is_not_skipped(tmp_path, monkeypatch, target) -> None:
    """A team model's public name (the proxy routes it for the team's keys) and a deployment's id
    (model_info.id) are no model_name of the model list, yet the proxy serves them: they are sent."""
    import sys
    import types

    router = litellm.Router(model_list=[
        {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x"},
         "model_info": {"id": "dep-1"}},
        {"model_name": "model_name_team1_abc", "litellm_params": {"model": "openai/gpt-4o", "api_key": "x"},
         "model_info": {"team_id": "team1", "team_public_model_name": "team-gpt"}},
    ])
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    logger = _proxy_logger(tmp_path, [target, "healthy"])
    try:
        data = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": "t",
                "metadata": {"user_api_key_team_id": "team1"}}
        changed = asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
    finally:
        logger.unregister()
    assert changed["model"] == target and changed["fallbacks"] == ["healthy"]


def test_proxy_hook_validates_only_what_a_cline_request_adds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two recorded Cline requests of one task, each parsed anew as the proxy does: the second
    resends the first's messages and adds a tool turn, and only those two are validated."""
    from router_middleware import messages as messages_module

    first, second = (cline_request(name) for name in ("yolo_first.json", "yolo_second_after_tool.json"))
    logger = RouterLogger(Pipeline.from_config({}), proxy=True)
    asyncio.run(logger.async_pre_call_hook(None, None, {**first, "litellm_call_id": "c1"}, "acompletion"))
    checked: list[int] = []
    validate = messages_module.validate_message
    monkeypatch.setattr(messages_module, "validate_message", lambda message, *, index, source=None, parts=True:
                        checked.append(index) or validate(message, index=index, source=source, parts=parts))
    changed = asyncio.run(logger.async_pre_call_hook(None, None, {**second, "litellm_call_id": "c2"}, "acompletion"))
    assert checked == [3, 4] and changed["messages"] == second["messages"]


def test_the_pipelines_own_calls_are_not_recorded_again_by_a_registered_logger(logger) -> None:
    """A ``Pipeline`` call goes through litellm, where a registered logger of the same pipeline sees it:
    the pipeline's row is the call's only one, and the SDK hook does not plan it a second time."""
    messages = [{"role": "user", "content": "hi"}]
    logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")

    async def run() -> None:
        stream = await logger.pipeline.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                                   stream=True, metadata={"team": "a"})
        async for _ in stream:
            pass
        await logger.aflush()

    asyncio.run(run())
    litellm.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")  # a plain call: recorded
    _polled(lambda: logger.recorded)
    time.sleep(0.3)  # the pipeline calls' sync events, had they been recorded, came before
    logger.pipeline.ledger.flush()
    rows = open_ledger(logger.pipeline.config.ledger.url).query("SELECT call_id FROM calls")
    assert (logger.hook_calls, logger.recorded, len(rows)) == (0, 1, 3)


def test_a_litellm_cache_hit_is_recorded_as_one_and_costs_nothing(logger, monkeypatch, span_exporter) -> None:
    """With litellm's own response cache (``litellm.cache``), a hit reaches no provider: its row is a
    cache hit at no cost, sync or async, not a second paid call; a sync hit's only span is its route
    span, as a ``Pipeline`` cache hit's (no CLIENT span for an attempt nobody made)."""
    from litellm.caching.caching import Cache

    monkeypatch.setattr(litellm, "cache", Cache())
    litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "sync"}], mock_response="ok")
    assert litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "sync"}],
                              mock_response="ok")._hidden_params.get("cache_hit")
    assert _polled(lambda: logger.recorded >= 2)
    assert [s.kind for s in span_exporter.get_finished_spans()] == [SpanKind.CLIENT, SpanKind.INTERNAL,
                                                                    SpanKind.INTERNAL]

    async def run() -> None:
        await _recorded(logger, 2)
        for _ in range(2):
            await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "async"}],
                                      mock_response="ok")
            await logger.aflush()  # the first answer is in litellm's cache before the second call

    asyncio.run(run())
    _paid_then_hit_twice(logger)


def _paid_then_hit_twice(logger: RouterLogger) -> None:
    """The ledger's rows, sync then async: a paid call, then its hit of litellm's cache at no cost."""
    logger.pipeline.ledger.flush()
    rows = open_ledger(logger.pipeline.config.ledger.url).query(
        "SELECT cache_hit, cost_usd, input_tokens FROM calls ORDER BY ts")
    assert [r[0] for r in rows] == [0, 1, 0, 1]
    assert rows[0][1] > 0 and rows[2][1] > 0 and rows[1][1:] == rows[3][1:] == (0.0, 0)


def test_a_stream_litellm_answers_from_its_cache_is_recorded_as_a_hit_at_no_cost(logger, monkeypatch) -> None:
    """A streamed hit of litellm's response cache: litellm marks it in the event (``cache_hit``), not on
    the answer it assembles from the cached chunks; its row is a cache hit at no cost, sync or async."""
    from litellm.caching.caching import Cache

    monkeypatch.setattr(litellm, "cache", Cache())
    for _ in range(2):
        assert len(list(litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "sync"}],
                                           mock_response="ok there", stream=True))) > 1
        assert _polled(lambda: logger.recorded >= 1)  # the first answer is in litellm's cache before the second

    async def run() -> None:
        await _recorded(logger, 2)
        for _ in range(2):
            stream = await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "async"}],
                                               mock_response="ok there", stream=True)
            assert len([chunk async for chunk in stream]) > 1
            await logger.aflush()

    asyncio.run(run())
    _paid_then_hit_twice(logger)


def test_a_litellm_cache_hit_behind_the_proxy_settles_at_no_cost(tmp_path, monkeypatch) -> None:
    from litellm.caching.caching import Cache

    monkeypatch.setattr(litellm, "cache", Cache())
    router = litellm.Router(model_list=[
        {"model_name": "healthy", "litellm_params": {"model": "openai/gpt-4o-mini", "mock_response": "ok", "api_key": "x"}}])
    logger = _proxy_logger(tmp_path, ["healthy"])
    try:
        async def calls() -> None:
            for i in range(2):
                data = {"model": "coder", "messages": [{"role": "user", "content": "same"}],
                        "litellm_call_id": f"hit{i}", "caching": True}
                await router.acompletion(**await logger.async_pre_call_hook(None, None, data, "acompletion"))
                await logger.aflush()
        asyncio.run(calls())
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert len(rows) == 2 and rows[0]["cost_usd"] > 0 and rows[1]["cost_usd"] == 0.0


def test_calls_it_observes_count_toward_the_pipelines_budgets(monkeypatch) -> None:
    """What litellm calls spent, sync or async, is added to the budgets that apply to them (the
    config's ``app`` labels both), so the pipeline's own calls under the same budget see it. (The
    async call is admitted first, at its estimate: ``max_tokens`` keeps that within the budget.)"""
    from router_middleware.errors import BudgetExceeded

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    logger = RouterLogger(Pipeline.from_config({
        "app": "svc", "routing": {"budgets": [{"name": "daily", "usd": 0.0001, "window_s": 86400}]},
        "cache": {"enabled": False}})).register()
    messages = [{"role": "user", "content": "hi"}]
    try:
        litellm.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")

        async def run() -> None:
            await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=20)
            await _recorded(logger, 2)

        asyncio.run(run())
        with pytest.raises(BudgetExceeded) as refused:
            logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=4000)
    finally:
        logger.unregister()
    assert refused.value.spent == pytest.approx(2 * 1.35e-05)  # gpt-4o-mini: 10 in, 20 out, twice


def test_an_sdk_call_right_after_an_answered_one_is_admitted_against_its_spend(span_exporter) -> None:
    """litellm delivers an async call's success event on its logging worker, after the call returned:
    an agent's next call, made at once, was refused against the answered call's estimate (521 tokens
    held of a 1,000-token budget) where it had spent 30, though a direct call would have been sent. A
    call a budget would refuse first lets the answered calls' events settle them."""
    asyncio.run(wire.drain_callbacks())
    logger = RouterLogger(Pipeline.from_config({"routing": {"budgets": [{"name": "g", "tokens": 1000}]},
                                                "cache": {"enabled": False}})).register()

    async def run() -> list[int]:
        used = []
        for i in range(6):
            answer = await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": f"q{i}"}],
                                               mock_response="short answer")
            used.append(answer.usage.total_tokens)
        await logger.aflush()
        return used

    try:
        used = asyncio.run(run())
    finally:
        logger.unregister()
    assert len(used) == 6 and sum(used) < 1000
    routes = [s for s in span_exporter.get_finished_spans() if s.name.startswith("route")]
    assert len(routes) == 6 and all(s.status.status_code != StatusCode.ERROR for s in routes)  # no refusal said


def test_the_pipelines_mark_on_its_own_calls_is_not_sent_to_openai(monkeypatch) -> None:
    """With ``litellm.enable_preview_features`` litellm sends the string values of ``metadata`` to
    OpenAI: the caller's go as they always did, the pipeline's own mark (``SIDE_CALL``) does not."""
    from .capture_server import capture_server

    monkeypatch.setattr(litellm, "enable_preview_features", True)
    bodies = []
    for metadata in ({"team": "a"}, None):
        with capture_server() as (base, sent), pytest.raises(litellm.InternalServerError):  # it answers 500
            Pipeline().completion(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                  api_base=base, api_key="test-key", num_retries=0, max_retries=0,
                                  **({"metadata": metadata} if metadata else {}))
        bodies += sent
    assert [b.get("metadata") for b in bodies] == [{"team": "a"}, None]


def test_a_pipeline_call_litellm_answers_from_its_cache_is_a_hit_at_no_cost(tmp_path, monkeypatch) -> None:
    """``Pipeline.completion`` with litellm's own response cache on (``litellm.cache``): a hit reached
    no provider, so the pipeline's row (its only one) is a cache hit at no cost, not a second paid call."""
    from litellm.caching.caching import Cache

    monkeypatch.setattr(litellm, "cache", Cache())
    pipeline = Pipeline.from_config({"ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
                                     "cache": {"enabled": False}})
    messages = [{"role": "user", "content": "the same question"}]
    for _ in range(2):
        answer = pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")
    assert answer._hidden_params.get("cache_hit")
    pipeline.ledger.flush()
    rows = open_ledger(pipeline.config.ledger.url).query("SELECT cache_hit, cost_usd, input_tokens FROM calls ORDER BY ts")
    assert rows[0][0] == 0 and rows[0][1] > 0
    assert rows[1] == (1, 0.0, 0)


def test_a_context_summary_s_mark_is_not_sent_to_openai(monkeypatch) -> None:
    """The summary call's own mark, like an attempt's, is no string litellm would forward."""
    from router_middleware.context.summarize import summary_request
    from router_middleware.types import SummaryJob

    from .capture_server import capture_server

    monkeypatch.setattr(litellm, "enable_preview_features", True)
    request = summary_request(SummaryJob("k", ({"role": "user", "content": "a long span"},)), "openai/gpt-4o-mini",
                              {"api_key": "test-key", "num_retries": 0, "max_retries": 0})
    with capture_server() as (base, sent), pytest.raises(litellm.InternalServerError):
        litellm.completion(**request, api_base=base)
    assert sent and sent[0].get("metadata") is None


def test_a_failing_sdk_hook_sends_the_request_as_it_came(logger, monkeypatch) -> None:
    """litellm raises what ``async_pre_call_deployment_hook`` raises to the caller: the logger's own
    failure there is logged and the request goes as sent, never failing the user's call."""
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug in planning")

    monkeypatch.setattr(logger.pipeline, "plan", broken)

    async def run() -> object:
        answer = await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                           mock_response="ok")
        await logger.aflush()
        return answer

    assert asyncio.run(run()).choices[0].message.content == "ok"
    assert logger.hook_calls == 1


def test_a_call_whose_metadata_labels_the_pipeline_refuses_is_still_recorded(logger, span_exporter) -> None:
    """litellm's ``metadata=`` is free-form: a ``step`` that is no whole number fails the hook's
    planning (logged; the request goes as sent), but the call litellm made is still accounted
    (span and ledger row), without the refused labels, on the async and the sync path."""
    async def run() -> None:
        await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                  mock_response="ok", metadata={"step": "first", "session_id": "s-async"})
        await logger.aflush()

    asyncio.run(run())
    litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                       mock_response="ok", metadata={"step": "first", "session_id": "s-sync"})
    _polled(lambda: logger.recorded >= 2)  # the sync path's success event runs on litellm's thread
    assert logger.recorded == 2
    assert len([s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]) == 2


def _sdk_logger(tmp_path, monkeypatch, routing: dict) -> RouterLogger:
    """A logger on ``litellm.acompletion`` with ``routing`` and a ledger, registered once litellm has
    delivered earlier tests' events; ``OPENAI_API_KEY`` set for the calls to OpenAI models."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    return RouterLogger(Pipeline.from_config({
        "app": "svc", "routing": routing, "cache": {"enabled": False},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}})).register()


def _run_and_probe(logger: RouterLogger, run: Callable[[], Any]) -> tuple[Any, int, list[dict]]:
    """``asyncio.run(run())``'s answer, what the daily budget's counter then holds (a call far over
    it is refused saying so) and the ledger's rows; the logger unregistered after."""
    from router_middleware.errors import BudgetExceeded

    try:
        answer = asyncio.run(run())
        with pytest.raises(BudgetExceeded) as spent:
            logger.pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       mock_response="ok", max_tokens=100_000)
        return answer, spent.value.spent, _ledger(logger)
    finally:
        logger.unregister()


def test_an_async_sdk_call_over_a_budget_is_refused_before_it_is_sent(tmp_path, monkeypatch) -> None:
    """On ``litellm.acompletion`` the deployment hook admits the call like ``Pipeline.acompletion``
    does: a call whose estimate does not fit is refused with ``BudgetExceeded`` (no ledger row, the
    counter untouched), and a call that fits holds its estimate and settles at what it spent."""
    from router_middleware.errors import BudgetExceeded

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}]})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> object:
        with pytest.raises(BudgetExceeded) as over:
            await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=2000)
        answer = await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                           max_tokens=100)
        await logger.aflush()
        return over.value, answer

    try:
        refused, answer = asyncio.run(run())
        with pytest.raises(BudgetExceeded) as spent:  # what the counter holds now, as the pipeline sees it
            logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=990)
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert refused.spent == 0 and refused.name == "daily"
    assert answer.choices[0].message.content == "ok"
    assert spent.value.spent == answer.usage.total_tokens  # settled at the actual use, not the estimate
    assert len(rows) == 1 and rows[0]["error"] is None  # the refused call was never made: no row


def test_an_alias_sent_to_litellm_s_sdk_is_said_to_route_only_through_the_pipeline_or_the_proxy(
        tmp_path, monkeypatch) -> None:
    """litellm's SDK calls the model it is given: ``litellm.acompletion(model="coder")`` fails in litellm
    (no provider), and the warning before it says where an alias is routed, not only that litellm
    chose provider None."""
    logger = _sdk_logger(tmp_path, monkeypatch, {"aliases": {"coder": ["gpt-4o-mini"]}})
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(litellm.exceptions.BadRequestError):
            asyncio.run(litellm.acompletion(model="coder", messages=[{"role": "user", "content": "hi"}],
                                            mock_response="ok"))
    finally:
        logger.unregister()
    said = next(e for e in logs if e["event"] == "route_not_enforced")
    assert "an alias routes through Pipeline.acompletion or the proxy" in said["error"]


@pytest.mark.usefixtures("one_quota_window")
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_an_sdk_call_over_a_quota_is_sent_and_counted_and_says_so(api, tmp_path, monkeypatch) -> None:
    """litellm has chosen an SDK call's deployment when the hook runs: a call over one of its quotas
    (``routing.limits``) has no other target and goes as it came, counted, with a warning that names
    the quota (``route_not_enforced``), not one that says the hook failed or could not plan it."""
    logger = _sdk_logger(tmp_path, monkeypatch, {"limits": {"gpt-4o-mini": {"rpm": 1}}})

    async def call() -> Any:
        if api == "chat":
            answer = await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                               mock_response="ok")
            return answer.choices[0].message.content
        answer = await litellm.aresponses(model="gpt-4o-mini", input="hi", mock_response="ok")
        return answer.output[0].content[0].text

    async def run() -> list[object]:
        answers = [await call() for _ in range(2)]
        await logger.aflush()
        return answers

    try:
        with structlog.testing.capture_logs() as logs:
            answers = asyncio.run(run())
    finally:
        logger.unregister()
    assert answers == ["ok", "ok"]
    assert [e["event"] for e in logs if e["event"] in ("route_not_enforced", "litellm_hook_failed",
                                                       "budget_not_enforced")] == ["route_not_enforced"]
    said = next(e for e in logs if e["event"] == "route_not_enforced")
    assert "rpm" in said["error"] and "litellm already chose" in said["why"]
    assert not [e for e in logs if e["event"] == "llm_call_failed"]  # its refusal ended no call: it was sent
    logger.pipeline.ledger.flush()
    assert len(open_ledger(logger.pipeline.config.ledger.url).query("SELECT call_id FROM calls")) == 2


def test_an_sdk_call_litellm_would_retry_on_its_own_is_counted_not_refused(tmp_path, monkeypatch) -> None:
    """litellm retries a failed ``acompletion`` (``num_retries``) by calling the provider again without
    its hooks or events: a refusal there would send the call anyway, unrecorded. Such a call goes
    as sent (``budget_not_enforced``) and its spend is still added to the budget."""
    from router_middleware.errors import BudgetExceeded

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}]})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> object:
        answer = await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                           max_tokens=2000, num_retries=2)
        await logger.aflush()
        return answer

    try:
        with structlog.testing.capture_logs() as logs:
            answer = asyncio.run(run())
        with pytest.raises(BudgetExceeded) as spent:
            logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=990)
    finally:
        logger.unregister()
    assert answer.choices[0].message.content == "ok"
    assert spent.value.spent == answer.usage.total_tokens
    said = [e for e in logs if e["event"] == "budget_not_enforced"]
    assert len(said) == 1 and "(num_retries; without retries it is refused)" in said[0]["why"]
    assert not [e for e in logs if e["event"] == "llm_call_failed"]  # its refusal ended no call: it was sent


def test_a_litellm_router_call_over_a_budget_is_counted_not_refused(tmp_path, monkeypatch) -> None:
    """Refused in the deployment hook, a ``litellm.Router``'s call would fail with a 429 that the
    router takes for its deployments' and cools them all down, failing the next callers' calls (of
    a tenant within its budget) for seconds. Such a call goes as sent (``budget_not_enforced``) and
    is counted; the other tenant's calls are answered."""
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "small", "scope": "tenant", "tokens": 1000,
                                                  "window_s": 86400}]})
    router = litellm.Router(model_list=[
        {"model_name": "coder", "litellm_params": {"model": model, "api_key": "sk-test"}}
        for model in ("gpt-4o-mini", "gpt-4.1-mini")])
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> list[str]:
        over = await router.acompletion(model="coder", messages=messages, mock_response="ok", max_tokens=2000,
                                        metadata={"tenant": "a"})
        within = [await router.acompletion(model="coder", messages=messages, mock_response="ok", max_tokens=20,
                                           metadata={"tenant": "b"}) for _ in range(3)]
        await logger.aflush()
        return [answer.choices[0].message.content for answer in (over, *within)]

    try:
        answers = asyncio.run(run())
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert answers == ["ok"] * 4
    assert len(rows) == 4 and all(r["error"] is None for r in rows)


def test_a_failed_async_sdk_call_counts_toward_a_cooldown_and_the_next_call_routes_past_it(
        tmp_path, monkeypatch) -> None:
    """An alias named like a litellm model routes within the provider litellm chose: a target of
    another provider is skipped (a decision saying so); a failure is one error row, releases its
    reservation and counts toward the target's cooldown, so the next call goes to the other target."""

    logger = _sdk_logger(tmp_path, monkeypatch, {
        "aliases": {"gpt-4o": ["claude-3-5-haiku-20241022", "gpt-4o-mini", "gpt-4.1-mini"]},
        "cooldown": {"failures": 1, "window_s": 60, "cooldown_s": 60},
        "budgets": [{"name": "daily", "tokens": 100_000, "window_s": 86400}]})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> object:
        with pytest.raises(litellm.RateLimitError):
            await litellm.acompletion(model="gpt-4o", messages=messages, mock_response=litellm.RateLimitError(
                "slow down", "openai", "gpt-4o-mini"))
        answer = await litellm.acompletion(model="gpt-4o", messages=messages, mock_response="ok", max_tokens=100)
        await logger.aflush()
        return answer

    answer, spent, rows = _run_and_probe(logger, run)
    assert answer.model == "gpt-4.1-mini"  # gpt-4o-mini cools down after its failure
    assert [(r["model"], r["error"] is not None) for r in rows] == [("gpt-4o-mini", True), ("gpt-4.1-mini", False)]
    assert all(json.loads(r["decisions"]) == ["routing:route", "routing:skip"] for r in rows)  # claude, first
    assert spent == answer.usage.total_tokens  # the failed call's reservation was given back


def test_aflush_waits_for_the_events_of_async_streams(tmp_path, monkeypatch) -> None:
    """litellm logs an async stream's success from a task of its own once the stream ends, not on its
    logging worker: ``aflush`` waits for it too, so a short script's streamed call is recorded and
    settled (its reservation replaced by what it spent) before ``asyncio.run`` ends."""
    from router_middleware.errors import BudgetExceeded

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    logger = RouterLogger(Pipeline.from_config({  # no ledger: aflush has no writes of its own to wait for
        "app": "svc", "cache": {"enabled": False},
        "routing": {"budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}]}})).register()
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> str:
        stream = await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="hello there",
                                           max_tokens=100, stream=True)
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
        await logger.aflush()
        nonlocal recorded
        recorded = logger.recorded  # before asyncio.run ends (it would run the task's remaining steps)
        return text

    recorded = 0
    try:
        assert asyncio.run(run()) == "hello there"
        with pytest.raises(BudgetExceeded) as spent:
            logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=990)
    finally:
        logger.unregister()
    assert recorded == 1
    assert spent.value.spent < 100  # what the stream used, not its estimate (the prompt and max_tokens)


def test_concurrent_async_sdk_calls_on_redis_never_pass_a_budget(tmp_path, monkeypatch, redis_url) -> None:
    """200 concurrent ``litellm.acompletion`` calls with the logger on a real Redis: each is admitted
    atomically at its estimate before it is sent, so those answered never spend past the limit, the
    rest are refused with ``BudgetExceeded``, and the counter holds exactly what the answered spent
    (every reservation settled or given back)."""
    from router_middleware.errors import BudgetExceeded

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    limit = 3000
    logger = RouterLogger(Pipeline.from_config({
        "app": f"sdk-{time.time_ns()}", "store": redis_url, "cache": {"enabled": False},
        "routing": {"budgets": [{"name": "daily", "tokens": limit, "window_s": 86400}]}})).register()
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> list[object]:
        results = await asyncio.gather(*(litellm.acompletion(model="gpt-4o-mini", messages=messages,
                                                             mock_response="ok", max_tokens=100)
                                         for _ in range(200)), return_exceptions=True)
        await logger.aflush()
        return results

    try:
        results = asyncio.run(run())
        app = logger.pipeline.config.app
        spent = float(logger.pipeline.store.get(f"budget:daily:tokens:{app}:{int(time.time() // 86400)}") or 0)
    finally:
        logger.unregister()
        logger.pipeline.close()
    answered = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BudgetExceeded)]
    assert answered and len(answered) + len(refused) == 200
    # the counter itself: a call probing it reserves its learned output (the answered replies' 20
    # tokens, once read), not its max_tokens, so it fits or not as the process's copy of them is fresh
    assert spent == sum(r.usage.total_tokens for r in answered) <= limit
    assert logger.recorded == len(answered)


async def _let_go(logger: RouterLogger) -> None:
    """Until litellm has let go of the calls the logger follows (a collection frees a failed call's
    traceback and logging object), and their rows are written."""
    import gc

    for _ in range(20):
        gc.collect()
        await asyncio.sleep(0.01)
        if not logger._calls:
            break
    await logger.aflush()


@pytest.mark.parametrize("fallbacks", [["gpt-4o"], ["gpt-4.1-mini", "gpt-4o"]], ids=["one", "two"])
def test_an_sdk_call_with_litellm_fallbacks_holds_one_reservation_and_settles_it(tmp_path, monkeypatch,
                                                                                 fallbacks) -> None:
    """``litellm.acompletion(fallbacks=[...])`` makes its attempts as nested ``acompletion`` calls (a
    call id of their own) that share the outer call's logging object, so their events carry the
    outer call's id: the outer call's lifecycle follows them, and they open none of their own (which
    no event would settle: their reservation held until it lapses). A call whose fallbacks all
    failed gets no event for its last one (litellm delivers one failure event per call): it ends as
    litellm raises, with its last fallback's own error (litellm's deployment failure hook), naming its
    last target (before, it ended as ``FallbacksEnded`` once litellm let it go)."""
    import logging

    from router_middleware.errors import BudgetExceeded

    # litellm logs each failed fallback with its traceback, which pytest's log capture keeps (and with
    # it the call): an application's handler writes the record and lets it go
    monkeypatch.setattr(logging.getLogger("LiteLLM"), "disabled", True)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 100_000, "window_s": 86400}]})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> object:
        answer = await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                           max_tokens=50, fallbacks=["gpt-4.1-mini"])
        try:  # as an application would: pytest.raises keeps the traceback, and through it the call
            await litellm.acompletion(model="gpt-4o-mini", messages=messages, max_tokens=50, fallbacks=fallbacks,
                                      mock_response=litellm.RateLimitError("x", "openai", "gpt-4o-mini"))
        except Exception as exc:  # noqa: BLE001 - litellm raises a bare Exception
            assert "All fallback attempts failed" in str(exc)
        await _let_go(logger)
        return answer

    try:
        answer = asyncio.run(run())
        in_flight = len(logger._calls)
        with pytest.raises(BudgetExceeded) as spent:
            logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                       max_tokens=100_000)
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert in_flight == 0
    assert spent.value.spent == answer.usage.total_tokens  # what it spent; no hold left behind
    assert sorted(r["error"] is not None for r in rows) == [False, True]  # one row per call
    failed = next(r for r in rows if r["error"] is not None)
    assert (failed["error"], failed["requested_model"], failed["model"]) == ("RateLimitError", "gpt-4o-mini", "gpt-4o")
    assert "routing:fallback" in failed["decisions"]


@pytest.mark.parametrize("fault", ["cut", "broken"])
def test_an_sdk_stream_with_litellm_fallbacks_that_breaks_while_read_is_one_row_of_its_own_model(
        tmp_path, monkeypatch, fault) -> None:
    """litellm's ``fallbacks=`` fall back only before a stream is handed over: a stream that breaks
    while read (partway, or before its first chunk) raises to its caller and no fallback is called.
    The call is one row naming the model that broke and its error, settled at what it streamed (before:
    the lifecycle moved on to the fallback litellm never called, a second row for it charged to the
    budget, or the only row naming the fallback with ``FallbacksEnded``). (A fallback's stream that
    breaks while read, after the first model failed when sent, gets no failure event from litellm,
    which delivers one per call: not covered, see docs/integrations.md.)"""
    import logging

    from .fault_server import fault_server

    monkeypatch.setattr(logging.getLogger("LiteLLM"), "disabled", True)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "team", "scope": "global", "usd": 1}]})
    messages = [{"role": "user", "content": "Tell me a joke"}]

    async def run(base: str) -> str:
        try:
            stream = await litellm.acompletion(model="openai/gpt-4o-mini", api_base=f"{base}/{fault}/v1",
                                               messages=messages, stream=True, max_retries=0,
                                               fallbacks=[{"model": "openai/gpt-4o", "api_base": f"{base}/healthy/v1"}])
            async for _ in stream:
                pass
        except Exception as exc:  # noqa: BLE001 - litellm's MidStreamFallbackError
            raised = type(exc).__name__
        else:
            raised = "nothing"
        await _let_go(logger)
        return raised

    try:
        with fault_server() as (base, seen):
            raised = asyncio.run(run(base))
        rows = _ledger(logger, ("requested_model", "target", "error", "output_tokens", "cost_usd", "decisions"))
        spent = float(logger.pipeline.store.get("budget:team:usd:all:0") or 0)
        in_flight = len(logger._calls)
    finally:
        logger.unregister()
    assert raised == "MidStreamFallbackError" and seen == {f"{fault}:{fault}-stream": 1} and in_flight == 0
    assert len(rows) == 1, rows  # no fallback called after a stream broke while read
    row = rows[0]
    assert (row["requested_model"], row["target"], row["error"]) == ("openai/gpt-4o-mini", "openai/gpt-4o-mini",
                                                                    "APIConnectionError")
    assert "routing:fallback" not in row["decisions"]
    assert spent == pytest.approx(row["cost_usd"] or 0.0)  # the budget holds what the row says, no more
    assert (row["output_tokens"] > 0) is (fault == "cut")


@pytest.mark.parametrize("caught", [True, False], ids=["aflush-in-the-loop", "error-escapes-the-loop"])
def test_an_sdk_call_whose_fallbacks_all_failed_gets_its_row_without_a_collection_of_the_caller_s(
        tmp_path, monkeypatch, caught) -> None:
    """The README's short script: the error caught, then ``await logger.aflush()`` before ``asyncio.run``
    ends; or the error escapes ``asyncio.run`` and a later ``aflush`` runs. litellm's call (in a
    reference cycle) was let go only at a later collection, after the loop had closed: its row was
    never written and its budget hold stood until it lapsed. Now ``aflush`` collects first, and a call
    let go after its loop closed is ended on the logger's own thread."""
    import gc
    import logging

    from router_middleware.errors import BudgetExceeded

    monkeypatch.setattr(logging.getLogger("LiteLLM"), "disabled", True)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 100_000, "window_s": 86400}]})

    async def run() -> None:
        try:
            await litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50,
                                      fallbacks=["gpt-4.1-mini"],
                                      mock_response=litellm.RateLimitError("x", "openai", "gpt-4o-mini"))
        except Exception:  # noqa: BLE001 - litellm raises a bare Exception
            if not caught:
                raise
        if caught:
            await logger.aflush()

    try:
        try:
            asyncio.run(run())
        except Exception as exc:  # noqa: BLE001 - litellm raises a bare Exception
            assert caught is False and "All fallback attempts failed" in str(exc)
        if not caught:
            gc.collect()  # litellm's call is freed now, its loop closed
            asyncio.run(logger.aflush())
        in_flight = len(logger._calls)
        rows = _ledger(logger, ("error", "target", "ended"))
        with pytest.raises(BudgetExceeded) as over:  # says what the budget's counter holds
            logger.pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       mock_response="ok", max_tokens=100_000)
    finally:
        logger.unregister()
    assert in_flight == 0
    assert rows == [{"error": "RateLimitError", "target": "gpt-4.1-mini", "ended": "failed"}]  # the last one's own
    assert over.value.spent == 0  # the hold given back


def test_a_sync_call_with_litellm_fallbacks_gets_its_answer_s_row_when_litellm_delivers_its_event(
        tmp_path, monkeypatch) -> None:
    """``litellm.completion(fallbacks=[...])`` (sync: no hook, no lifecycle to follow its attempts) runs
    its attempts as nested ``acompletion`` calls in an event loop of its own, which it closes on the
    answer: the first model's failure is a row at once, but the answer's success event stays queued on
    litellm's logging worker until an event loop runs it again (``aflush``, the next async call, the
    interpreter's exit). Until then its row and its budget charge are missing (README says so)."""
    import logging

    monkeypatch.setattr(logging.getLogger("LiteLLM"), "disabled", True)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 100_000, "window_s": 86400}]})
    try:
        answer = litellm.completion(model="o4-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=50,
                                    mock_response=litellm.RateLimitError("x", "openai", "o4-mini"),
                                    fallbacks=[{"model": "gpt-4o", "mock_response": "ok"}])
        time.sleep(0.5)  # litellm's executor threads have run the sync events
        before = _ledger(logger)
        asyncio.run(logger.aflush())  # an event loop: litellm's worker runs what it queued
        after = _ledger(logger)
    finally:
        logger.unregister()
    assert answer.choices[0].message.content == "ok"
    assert [(r["error"], r["requested_model"], r["model"]) for r in before] == [("RateLimitError", "o4-mini", "o4-mini")]
    assert [(r["error"], r["requested_model"], r["model"]) for r in after] == [
        ("RateLimitError", "o4-mini", "o4-mini"), (None, "gpt-4o", answer.model)]


def test_the_sdk_hook_routes_to_no_deployment_with_an_endpoint_of_its_own(tmp_path, monkeypatch) -> None:
    """In the SDK litellm has chosen the call's endpoint before the hook runs, and the hook changes the
    model only: a soft budget's downgrade to an alias whose one target is a deployment with its own
    ``api_base`` is not routed there (its row and span would name a deployment the call never
    reached); the call goes as it came, counted, and says so."""
    import socket

    from .fault_server import fault_server

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with fault_server() as (base, seen), socket.socket() as down:
        down.bind(("127.0.0.1", 0))  # never listening: what was sent there would be refused
        logger = RouterLogger(Pipeline.from_config({
            "app": "a", "cache": {"enabled": False}, "ledger": {"url": url}, "routing": {
                "deployments": {"us": {"model": "openai/gpt-3.5-turbo",
                                       "api_base": f"http://127.0.0.1:{down.getsockname()[1]}/v1"}},
                "aliases": {"cheap": ["us"]},
                "budgets": [{"name": "b", "scope": "global", "usd": 0.01, "soft": 0.0001, "downgrade_to": "cheap"}]}})
        ).register()

        async def run() -> list[str]:
            answers = []
            for i in range(2):  # the second call is past the soft limit
                answer = await litellm.acompletion(model="openai/gpt-4o", api_base=f"{base}/healthy/v1",
                                                   messages=[{"role": "user", "content": f"hi {i}"}])
                answers.append(answer.model)
            await logger.aflush()
            return answers

        try:
            with structlog.testing.capture_logs() as logs:
                answers = asyncio.run(run())
            rows = _ledger(logger, ("requested_model", "deployment", "error"))
        finally:
            logger.unregister()
    assert seen["healthy:ok"] == 2 and len(answers) == 2
    assert rows == [{"requested_model": "openai/gpt-4o", "deployment": None, "error": None}] * 2
    assert any(e["event"] == "route_not_enforced" and "its endpoint" in e["error"] for e in logs)


@pytest.mark.usefixtures("one_quota_window")
def test_a_litellm_fallback_over_its_quota_is_followed_as_litellm_calls_it(tmp_path, monkeypatch) -> None:
    """litellm calls its fallbacks whatever the router's quotas say: a fallback whose rpm is used up is
    still the attempt litellm makes (logged ``route_not_enforced``), not skipped for a model litellm
    never calls; the call is one row naming the model that answered."""
    import logging

    monkeypatch.setattr(logging.getLogger("LiteLLM"), "disabled", True)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 100_000, "window_s": 86400}],
                                                 "limits": {"gpt-4.1-mini": {"rpm": 1}}})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> object:
        await litellm.acompletion(model="gpt-4.1-mini", messages=messages, mock_response="ok")  # its one request
        with structlog.testing.capture_logs() as logs:
            answer = await litellm.acompletion(
                model="gpt-4o-mini", messages=messages, max_tokens=50,
                mock_response=litellm.RateLimitError("x", "openai", "gpt-4o-mini"),
                fallbacks=[{"model": "gpt-4.1-mini", "mock_response": "ok"}, "gpt-4o"])
        await _let_go(logger)
        assert any(e["event"] == "route_not_enforced" and e["target"] == "gpt-4.1-mini" for e in logs)
        return answer

    answer, spent, rows = _run_and_probe(logger, run)
    assert "gpt-4.1-mini" in answer.model
    assert [(r["error"], r["requested_model"], r["model"]) for r in rows] == \
        [(None, "gpt-4.1-mini", "gpt-4.1-mini"), (None, "gpt-4o-mini", "gpt-4.1-mini")]
    assert spent == 2 * answer.usage.total_tokens


@pytest.mark.parametrize("late", [False, True], ids=["event-first", "event-late"])
def test_a_litellm_fallback_s_answer_is_the_call_s_one_row_and_each_model_gets_its_own_request(
        tmp_path, monkeypatch, span_exporter, late) -> None:
    """``litellm.acompletion(model=..., fallbacks=[...])`` whose first model fails: the lifecycle
    follows litellm's fallbacks in its order (one failure event comes, for the first; litellm's
    deployment failure hook names each attempt's own error, and litellm moving on to the next model
    says the one before failed), plans each model's request (a reasoning effort
    set for the first is not carried to a model that takes none, which litellm would refuse), and the
    answer is the call's one ledger row, its spend charged to the budget once. ``late``: the failure
    event comes after litellm has moved on (over HTTP it is a task of its own): the lifecycle had
    moved past it, and it changes nothing."""

    if late:
        delivered = RouterLogger.async_log_failure_event

        async def delayed(self: RouterLogger, *args: Any) -> None:
            await asyncio.sleep(0.2)
            await delivered(self, *args)

        monkeypatch.setattr(RouterLogger, "async_log_failure_event", delayed)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    logger = RouterLogger(Pipeline.from_config({
        "app": "svc", "routing": {"budgets": [{"name": "daily", "tokens": 100_000, "window_s": 86400}]},
        "reasoning": {"rules": [{"effort": "low", "mode": "set"}]}, "cache": {"enabled": False},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}})).register()
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> object:
        answer = await litellm.acompletion(
            model="o4-mini", messages=messages, max_tokens=50,
            mock_response=litellm.RateLimitError("x", "openai", "o4-mini"),  # o3-mini takes it on too
            fallbacks=["o3-mini", {"model": "gpt-4o", "mock_response": "ok"}])
        await asyncio.sleep(0.3 if late else 0)  # the late failure event has come
        await _let_go(logger)
        return answer

    answer, spent, rows = _run_and_probe(logger, run)
    assert answer.choices[0].message.content == "ok" and "gpt-4o" in answer.model
    assert [(r["error"], r["requested_model"], r["model"]) for r in rows] == [(None, "o4-mini", "gpt-4o")]
    assert "routing:fallback" in rows[0]["decisions"] and rows[0]["cost_usd"] > 0
    assert spent == answer.usage.total_tokens  # charged once, at the answer
    chats = [s for s in span_exporter.get_finished_spans() if s.name.startswith("chat ")]
    assert [(s.name, s.status.status_code == StatusCode.ERROR) for s in chats] == \
        [("chat o4-mini", True), ("chat o3-mini", True), ("chat gpt-4o", False)]
    assert [s.attributes.get("error.type") for s in chats[:2]] == ["RateLimitError", "RateLimitError"]
    # each attempt's own failure counts toward its model's cooldown (before, one litellm moved past
    # with no event counted toward none: it was a FellBack, its error unknown)
    counts = [logger.pipeline.store.get(FAILURES + m) for m in ("o4-mini", "o3-mini")]
    assert [None if c is None else float(c) for c in counts] == [1.0, 1.0]


def test_a_label_the_pipeline_refuses_does_not_exempt_an_async_sdk_call_from_its_budgets(tmp_path, monkeypatch) -> None:
    """litellm's ``metadata`` is free-form: a label the pipeline refuses (``step="first"``) is left
    out, as the events do (:func:`_observed`), rather than the call sent unadmitted; the labels it
    takes still pick its budgets (a tenant's)."""
    from router_middleware.errors import BudgetExceeded

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "small", "scope": "tenant", "tokens": 1000,
                                                  "window_s": 86400}]})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> None:
        with pytest.raises(BudgetExceeded):
            await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=2000,
                                      metadata={"tenant": "a", "step": "first"})
        await logger.aflush()

    try:
        asyncio.run(run())
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert rows == []


@pytest.mark.parametrize("budgeted", [True, False])
def test_a_malformed_async_sdk_call_is_refused_where_a_budget_would_have_to_admit_it(
        tmp_path, monkeypatch, budgeted) -> None:
    """A request the pipeline cannot plan (``temperature=2.5``, a role ``"User"``) cannot be measured
    against a budget: a trial saw such calls over a hard budget sent unadmitted while the well-formed
    one was refused. With a budget they are refused with the ``RequestError`` or ``MessageError``
    naming the fault, unsent; without one they go as they came (the provider judges them)."""
    from router_middleware import MessageError, RequestError

    routing = {"budgets": [{"name": "tiny", "scope": "global", "tokens": 50}]} if budgeted else {}
    logger = _sdk_logger(tmp_path, monkeypatch, routing)
    broken = [({"temperature": 2.5}, RequestError, "temperature: expected a number from 0 to 2, got 2.5"),
              ({"messages": [{"role": "User", "content": "hi"}]}, MessageError, "message 0: unknown role 'User'")]

    async def run() -> list[object]:
        answers: list[object] = []
        for extra, error, said in broken:
            ask = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "mock_response": "ok",
                   "max_tokens": 2000, **extra}
            if budgeted:
                with pytest.raises(error, match=re.escape(said)):
                    await litellm.acompletion(**ask)
            else:
                answers.append((await litellm.acompletion(**ask)).choices[0].message.content)
        await logger.aflush()
        return answers

    try:
        answers = asyncio.run(run())
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert answers == ([] if budgeted else ["ok", "ok"])
    assert len(rows) == (0 if budgeted else 2)  # refused: never made, no row


@pytest.mark.parametrize("how", ["cancelled", "stream left unread"])
def test_an_async_sdk_call_litellm_lets_go_without_an_event_gives_its_reservation_back(
        tmp_path, monkeypatch, how) -> None:
    """litellm delivers no event for a call cancelled in flight (a timeout around it) nor for a
    stream its caller stops reading: once litellm lets go of the call, its reservation is given back
    and it is one error row, rather than held until it lapses, refusing calls that fit meanwhile."""
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}]})
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> str:
        if how == "cancelled":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                                           max_tokens=500, mock_delay=1.0), timeout=0.1)
        else:
            stream = await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="hello there",
                                               max_tokens=500, stream=True)
            async for _chunk in stream:
                break
            del stream, _chunk
        for _ in range(100):  # the loop ends the call once litellm let go of it (a stream: once it is closed)
            if not logger._calls:
                break
            await asyncio.sleep(0.01)
        answer = await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                           max_tokens=600)  # fits only if the first call's hold is gone
        await logger.aflush()
        return str(answer.choices[0].message.content)

    try:
        assert asyncio.run(run()) == "ok"
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert not logger._calls
    assert sorted(r["error"] or "" for r in rows) == ["", "CancelledError"]


@pytest.mark.parametrize("read", [2, 0], ids=["read partway", "never read"])
@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
def test_an_async_sdk_stream_left_partway_is_settled_at_its_prompt(tmp_path, monkeypatch, request, kind,
                                                                  read) -> None:
    """A stream whose caller breaks out of it after its first chunks (the real recording, paused
    after five events) was paid for: the provider read the whole prompt. litellm delivers no event
    for it; once it lets the stream go, the call is settled at its prompt counted locally (its row,
    and its budget with the hold gone), as ``Pipeline.acompletion`` settles a stream closed early,
    rather than released as if nothing were spent. A stream let go before litellm read its first
    chunk is released (the pipeline reads a stream's first chunk ahead: its unread stream is settled)."""
    from .fault_server import fault_server

    store = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'state.db'}"}.get(kind) \
        or request.getfixturevalue("redis_url")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    name = f"left{time.time_ns()}"
    logger = RouterLogger(Pipeline.from_config({
        "store": store, "cache": {"enabled": False}, "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "routing": {"budgets": [{"name": name, "scope": "global", "tokens": 100000, "window_s": 86400}]}})).register()
    messages = [{"role": "user", "content": "Tell me a joke about opentelemetry"}]

    async def run(base: str) -> int:
        stream = await litellm.acompletion(model="openai/gpt-3.5-turbo", messages=messages, api_key="x",
                                           api_base=f"{base}/stall/v1", max_tokens=100, stream=True)
        came = 0
        if read:
            async for _chunk in stream:
                came += 1
                if came == read:
                    break
            del _chunk
        del stream
        await _apolled(lambda: not logger._calls)
        await logger.aflush()
        return came

    try:
        with fault_server(cut_events=5, hang_s=2.0) as (base, _seen):
            came = asyncio.run(run(base))
        rows = _ledger(logger, ("input_tokens", "output_tokens", "cost_usd", "error", "model"))
        counter = float(logger.pipeline.store.get(f"budget:{name}:tokens:all:{int(time.time() // 86400)}") or 0)
    finally:
        logger.unregister()
        logger.pipeline.close()
    assert came == read and not logger._calls
    assert len(rows) == 1 and rows[0]["error"] == "CancelledError" and rows[0]["output_tokens"] == 0
    if read:  # the model answered: named as an answer names it ('openai/gpt-3.5-turbo' before: two names in report)
        assert rows[0]["model"] == "gpt-3.5-turbo"
    prompt = logger.pipeline.state.tokens("openai/gpt-3.5-turbo", messages)
    assert (rows[0]["input_tokens"], counter) == ((prompt, prompt) if read else (0, 0))
    assert (rows[0]["cost_usd"] or 0) > 0 if read else rows[0]["cost_usd"] is None


@pytest.mark.parametrize("read", [3, 0, None], ids=["left partway", "never read", "read to its end"])
@pytest.mark.parametrize("source", ["mock_response", "recording"])
def test_a_sync_stream_left_partway_is_settled_at_its_prompt_and_the_chunks_that_came(
        tmp_path, monkeypatch, span_exporter, source, read) -> None:
    """``litellm.completion(stream=True)`` skips the hook, and litellm sends no event for a stream its
    caller stops reading (broken out of, then dropped): the call was paid for, its prompt and the
    chunks it streamed. Once litellm lets the call go, it is one row naming ``StreamLeft``, settled at
    its prompt counted locally and litellm's count of the chunks that came (``usage.source``
    ``estimated``), and the budget is charged that. A stream never read is a row with nothing spent
    (as on the async path); one read to its end is recorded once, from its success event."""
    import contextlib
    import gc
    import itertools

    import vcr

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "scope": "global", "tokens": 100000,
                                                              "window_s": 86400}]})
    if source == "recording":
        item = interactions(CASSETTES / "openai_chat_streaming.yaml")[0]
        kwargs, whole = completion_kwargs(item), recorded_usage(item)["output_tokens"]
        replay: Any = vcr.VCR(record_mode="none", decode_compressed_response=True).use_cassette(
            str(CASSETTES / "openai_chat_streaming.yaml"))
    else:
        answer = "The quick brown fox jumps over the lazy dog. " * 5
        kwargs = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me about foxes"}],
                  "mock_response": answer, "stream": True}
        whole, replay = litellm.token_counter(model="gpt-4o-mini", text=answer), contextlib.nullcontext()
    try:
        with replay:
            stream = litellm.completion(**kwargs)
            came = list(itertools.islice(stream, read)) if read is not None else list(stream)
            del stream
            # litellm's logging object of a stream sent through OpenAI's client is in a cycle with the
            # stream: a collection frees it once litellm's logging of the chunks read is done with it
            assert _polled(lambda: gc.collect() >= 0 and logger.recorded >= 1)
        gc.collect()
        time.sleep(0.1)  # a second row would come now
        rows = _ledger(logger, ("input_tokens", "output_tokens", "cost_usd", "error"))
        counter = float(logger.pipeline.store.get(f"budget:daily:tokens:all:{int(time.time() // 86400)}") or 0)
    finally:
        logger.unregister()
    assert len(came) == read if read is not None else len(came) > 3
    assert logger.recorded == 1 and len(rows) == 1 and not logger._streams
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    if read is None:  # its success event's row, with what the provider (or litellm's mock) reported
        assert rows[0]["error"] is None and rows[0]["output_tokens"] > 0 and counter > 0
        return
    assert rows[0]["error"] == "StreamLeft" and span.status.status_code == StatusCode.UNSET  # no error of the call
    assert (span.attributes["router_middleware.ended"], span.attributes["router_middleware.stopped_by"]) == \
        ("stopped", "StreamLeft")
    if not read:
        assert (rows[0]["input_tokens"], rows[0]["output_tokens"], counter) == (0, 0, 0)
        return
    prompt = logger.pipeline.state.tokens(kwargs["model"], kwargs["messages"])
    output = litellm.stream_chunk_builder(came).usage.completion_tokens  # litellm's count of what came
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (prompt, output) and 0 < output < whole
    assert counter == prompt + output and rows[0]["cost_usd"] > 0  # the budget is charged what the row says
    assert span.attributes["router_middleware.usage.source"] == "estimated"
    assert span.attributes["gen_ai.usage.output_tokens"] == output


def test_a_sync_stream_left_partway_under_redacted_logging_is_still_recorded(tmp_path, monkeypatch) -> None:
    """With ``litellm.turn_off_message_logging`` litellm hands loggers each chunk redacted (a dict, no
    stream chunk), whose text cannot be counted: a stream left partway is still one ``StreamLeft`` row,
    settled at its prompt and a token a chunk that came, and the budget is charged that (the count
    raised, and the call had no row, no charge and an open span); ``aflush`` waits for the row."""
    import asyncio
    import gc
    import itertools

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "scope": "global", "tokens": 100000,
                                                              "window_s": 86400}]})
    monkeypatch.setattr(litellm, "turn_off_message_logging", True)
    kwargs = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me about foxes"}],
              "mock_response": "The quick brown fox jumps over the lazy dog. " * 5, "stream": True}
    try:
        stream = litellm.completion(**kwargs)
        came = list(itertools.islice(stream, 3))
        assert _polled(lambda: len(next(iter(logger._streams.values())).chunks) == 3)  # each chunk's event came
        del stream
        gc.collect()
        asyncio.run(logger.aflush())
        rows = _ledger(logger, ("input_tokens", "output_tokens", "error"))
        counter = float(logger.pipeline.store.get(f"budget:daily:tokens:all:{int(time.time() // 86400)}") or 0)
    finally:
        logger.unregister()
    prompt = logger.pipeline.state.tokens(kwargs["model"], kwargs["messages"])
    assert len(came) == 3 and [tuple(r.values()) for r in rows] == [(prompt, 3, "StreamLeft")]
    assert counter == prompt + 3 and not logger._streams


def _chunks_after_the_failure_event(logger: RouterLogger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make litellm's delivery of each chunk of a sync stream (on its executor) wait until the
    stream's failure event (on a thread of its own) has been handled: the order that lost the chunks
    of a broken stream now and then, made every time."""
    failed = threading.Event()
    on_chunk, on_failure = logger.log_stream_event, logger.log_failure_event

    def chunk(*args: Any, **kwargs: Any) -> None:
        failed.wait(10)
        on_chunk(*args, **kwargs)

    def failure(*args: Any, **kwargs: Any) -> None:
        on_failure(*args, **kwargs)
        failed.set()

    monkeypatch.setattr(logger, "log_stream_event", chunk)
    monkeypatch.setattr(logger, "log_failure_event", failure)


@pytest.mark.parametrize("kept", [False, True], ids=["let go", "kept by the caller"])
def test_a_sync_stream_the_provider_breaks_partway_is_settled_at_its_prompt_and_the_chunks_that_came(
        tmp_path, monkeypatch, span_exporter, kept) -> None:
    """A sync stream whose connection drops partway (the real recording's first five events) was paid
    for its prompt and the chunks that came: its failure event's row (the error named, one row, no
    second naming ``StreamLeft``) is settled at its prompt counted locally and litellm's count of the
    chunks (``usage.source`` ``estimated``), and the budget is charged that. litellm delivers the
    chunks on its executor and the failure event on a thread of its own, so the chunks are counted
    after the failure event here, every time (they were lost). Settled once litellm frees the call
    (every chunk's delivery holds it), or, when the caller keeps it (the exception's traceback holds
    the stream), ``_BROKEN_WAIT_S`` after the failure event."""
    import gc

    from router_middleware.litellm import sync_streams as module

    from .fault_server import fault_server

    monkeypatch.setattr(module, "_BROKEN_WAIT_S", 3.0 if kept else 600.0)  # let go: only its freeing settles it
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "scope": "global", "tokens": 100000,
                                                              "window_s": 86400}]})
    _chunks_after_the_failure_event(logger, monkeypatch)
    messages = [{"role": "user", "content": "Tell me a joke about opentelemetry"}]
    came: list[Any] = []
    try:
        with fault_server(cut_events=5) as (base, seen):
            stream = litellm.completion(model="openai/gpt-3.5-turbo", messages=messages, api_base=f"{base}/cut/v1",
                                        api_key="x", max_tokens=100, stream=True)
            with pytest.raises(litellm.exceptions.MidStreamFallbackError) as raised:  # litellm's wrapping
                for chunk in stream:
                    came.append(chunk)
            held = (stream, raised) if kept else ()  # the traceback holds litellm's stream and logging object
            del stream, raised
            assert _polled(lambda: (kept or gc.collect() >= 0) and logger.recorded >= 1, 0.05)
            del held
        gc.collect()
        time.sleep(0.1)  # a second row would come now
        rows = _ledger(logger, ("error", "input_tokens", "output_tokens"))
        counter = float(logger.pipeline.store.get(f"budget:daily:tokens:all:{int(time.time() // 86400)}") or 0)
    finally:
        logger.unregister()
    assert seen["cut:cut-stream"] == 1 and logger.recorded == 1 and not logger._streams and came
    prompt = logger.pipeline.state.tokens("openai/gpt-3.5-turbo", messages)
    output = litellm.stream_chunk_builder(came).usage.completion_tokens  # litellm's count of what came
    assert [tuple(r.values()) for r in rows] == [("APIConnectionError", prompt, output)] and output > 0
    assert counter == prompt + output
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert span.attributes["router_middleware.usage.source"] == "estimated"


def test_a_broken_stream_s_kept_error_lets_the_call_go_once_it_is_settled(tmp_path, monkeypatch) -> None:
    """The error a broken stream's row names is kept without what holds the call: a nested exception
    (litellm's ``MidStreamFallbackError.original_exception``) whose traceback holds the frame that had
    the call (here an object holding its ``model_call_details``, as litellm's logging object does) kept
    the watch, the call and its chunks alive for good once the timer had settled it."""
    import gc
    import weakref

    from router_middleware.litellm import sync_streams as module

    class Logging:  # holds the call's details, as litellm's logging object does
        def __init__(self, details: dict[str, Any]) -> None:
            self.model_call_details = details

    def fail(call: Logging) -> None:
        raise litellm.exceptions.APIConnectionError(message="peer closed", llm_provider="openai", model="gpt-4o-mini")

    monkeypatch.setattr(module, "_BROKEN_WAIT_S", 0.2)
    logger = _sdk_logger(tmp_path, monkeypatch, {})
    try:
        details = {"litellm_call_id": "c1", "model": "gpt-4o-mini", "stream": True, "call_type": "completion",
                   "messages": [{"role": "user", "content": "hi"}], "optional_params": {}}
        call = Logging(details)
        logger.log_pre_api_call("gpt-4o-mini", details["messages"], details)
        watched = weakref.ref(details[module._WATCH_KEY])
        details["completion_start_time"] = datetime.now()
        try:
            fail(call)
        except Exception as inner:  # noqa: BLE001
            details["exception"] = litellm.exceptions.MidStreamFallbackError(
                message="the stream broke", model="gpt-4o-mini", llm_provider="openai", original_exception=inner)
        logger.log_failure_event(details, None, None, None)
        del details, call
        assert _polled(lambda: logger.recorded >= 1)  # the timer settled it
        gc.collect()
        rows = _ledger(logger, ("error",))
    finally:
        logger.unregister()
    assert watched() is None and [r["error"] for r in rows] == ["MidStreamFallbackError"]


def test_the_handoff_thread_outlives_work_that_raises_a_base_exception() -> None:
    """Work a finalizer hands over that raises what is no ``Exception`` (``SystemExit``, ``GeneratorExit``)
    is logged, and the thread runs the work queued after it (it died, and that work waited for the
    next watch to start it again)."""
    import threading

    import structlog

    from router_middleware.litellm.handoff import _Handoff

    def stop() -> None:
        raise SystemExit(3)

    handoff = _Handoff()
    handoff.ready()
    ran = threading.Event()
    with structlog.testing.capture_logs() as logs:
        handoff.put(stop)
        handoff.put(ran.set)
        assert ran.wait(5)
    assert [e["error_type"] for e in logs if e["event"] == "litellm_logger_failed"] == ["SystemExit"]


@pytest.mark.parametrize("late", [False, True], ids=["while it waits", "once it is settled"])
def test_a_broken_stream_s_second_failure_event_starts_no_second_timer(tmp_path, monkeypatch, late) -> None:
    """litellm may hand a failure event of one broken sync stream more than once: while the watch
    waits, it keeps the first error and its one timer (a second one lingered past the settlement, and
    the error the row names was the later one's); once the stream is settled, the later event writes
    no second row."""
    import threading

    from router_middleware.litellm import sync_streams as module

    monkeypatch.setattr(module, "_BROKEN_WAIT_S", 0.5)
    logger = _sdk_logger(tmp_path, monkeypatch, {})
    try:
        details = {"litellm_call_id": "c2", "model": "gpt-4o-mini", "stream": True, "call_type": "completion",
                   "messages": [{"role": "user", "content": "hi"}], "optional_params": {}}
        logger.log_pre_api_call("gpt-4o-mini", details["messages"], details)
        details["completion_start_time"] = datetime.now()
        details["exception"] = litellm.exceptions.APIConnectionError(message="peer closed", llm_provider="openai",
                                                                     model="gpt-4o-mini")
        logger.log_failure_event(details, None, None, None)
        if late:
            assert _polled(lambda: logger.recorded >= 1)
        details["exception"] = TimeoutError("later")
        logger.log_failure_event(details, None, None, None)
        timers = [t for t in threading.enumerate() if t.name == "router-middleware-broken-stream"]
        assert _polled(lambda: logger.recorded >= 1)
        for timer in timers:
            timer.join(5)
        time.sleep(0.2)  # a second row would be on its way
        rows = _ledger(logger, ("error",))
    finally:
        logger.unregister()
    assert (late or len(timers) == 1) and [r["error"] for r in rows] == ["APIConnectionError"]


@pytest.mark.parametrize("kept, wait_s", [(False, 120.0), (True, 120.0), (True, 0.3)],
                         ids=["let go", "kept by the caller", "timer writing at the exit"])
def test_a_script_that_ends_after_a_broken_stream_writes_its_row_and_does_not_wait(tmp_path, kept, wait_s) -> None:
    """A short script whose sync stream its provider broke ends at once, not after the timer's
    ``_BROKEN_WAIT_S`` (120 s), and its row is written as it exits: freed by a collection just before
    the end (the finalizer's work is waited for), still held by the caller (settled by the exit hook,
    after litellm's executor delivered the chunks), or settled by the timer (0.3 s) whose row is still
    being written (slowed by 3 s here) when the script ends (the exit hook waits for it)."""
    import subprocess
    import sys

    from .conftest import ROOT

    script = f"""
import gc, os, time
os.environ["OPENAI_API_KEY"] = "sk-test"
import litellm
from router_middleware import Pipeline
from router_middleware.litellm import sync_streams as module
from router_middleware.litellm import RouterLogger
from tests.fault_server import fault_server
module._BROKEN_WAIT_S = {wait_s}
settle = RouterLogger._settle_stream
def slowed(self, found):
    time.sleep(3.0 if {wait_s} < 1 else 0.0)
    settle(self, found)
RouterLogger._settle_stream = slowed
logger = RouterLogger(Pipeline.from_config({{"app": "svc", "routing": {{}}, "cache": {{"enabled": False}},
    "ledger": {{"url": "sqlite:///{tmp_path / 'ledger.db'}"}}}})).register()
with fault_server(cut_events=5) as (base, seen):
    try:
        for chunk in litellm.completion(model="openai/gpt-3.5-turbo", messages=[{{"role": "user", "content": "hi"}}],
                                        api_base=f"{{base}}/cut/v1", api_key="x", max_tokens=100, stream=True):
            pass
    except Exception as error:
        kept = error if {kept} else None
gc.collect()
time.sleep(0.5 if {wait_s} < 1 else 0.0)  # the timer has fired and is writing the row
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert took < 100  # the timer's 120 s were not waited for
    db = open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    rows = db.query("SELECT error, output_tokens FROM calls")
    db.close()
    assert len(rows) == 1 and rows[0][0] == "APIConnectionError" and rows[0][1] > 0


def test_a_sync_stream_the_provider_breaks_before_its_first_chunk_is_a_failure_with_nothing_spent(
        tmp_path, monkeypatch) -> None:
    """A sync stream whose connection breaks right after the headers, before any chunk came, is its
    failure event's row with nothing spent, written from the event (not once litellm frees the call)."""
    from router_middleware.litellm import sync_streams as module

    from .fault_server import fault_server

    monkeypatch.setattr(module, "_BROKEN_WAIT_S", 600.0)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "scope": "global", "tokens": 100000,
                                                              "window_s": 86400}]})
    messages = [{"role": "user", "content": "Tell me a joke about opentelemetry"}]
    try:
        with fault_server() as (base, seen):
            stream = litellm.completion(model="openai/gpt-3.5-turbo", messages=messages,
                                        api_base=f"{base}/broken/v1", api_key="x", max_tokens=100, stream=True)
            with pytest.raises(litellm.exceptions.MidStreamFallbackError) as raised:
                for _chunk in stream:
                    pass
            assert _polled(lambda: logger.recorded >= 1)  # the caller still holds the stream and the error
            del stream, raised
        rows = _ledger(logger, ("error", "input_tokens", "output_tokens"))
        counter = float(logger.pipeline.store.get(f"budget:daily:tokens:all:{int(time.time() // 86400)}") or 0)
    finally:
        logger.unregister()
    assert seen["broken:broken-stream"] == 1 and logger.recorded == 1 and not logger._streams
    assert [tuple(r.values()) for r in rows] == [("APIConnectionError", 0, 0)] and counter == 0


def test_two_sync_streams_under_one_call_id_are_watched_apart(tmp_path, monkeypatch) -> None:
    """A sync stream sent under the call id of another still watched (a caller's own ``litellm_call_id``,
    or a retry's) has a watch of its own: the first, left partway, is its ``StreamLeft`` row at its
    prompt and its own chunks once let go, and the second, read to its end, its success event's row.
    Before, the second kept the first's watch (the second's chunks counted in it) and its success
    event removed it: the first had no row and its budget no charge."""
    import gc
    import itertools

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "scope": "global", "tokens": 100000,
                                                              "window_s": 86400}]})
    kwargs = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Tell me about foxes"}],
              "mock_response": "The quick brown fox jumps over the lazy dog. " * 5, "stream": True,
              "litellm_call_id": "one-call-id"}
    try:
        first = litellm.completion(**kwargs)
        came = list(itertools.islice(first, 3))
        assert _polled(lambda: [len(f.chunks) for f in logger._streams.values()] == [3])  # each chunk's event came
        whole = list(litellm.completion(**kwargs))
        assert _polled(lambda: logger.recorded >= 1)  # the second's success event
        del first
        assert _polled(lambda: gc.collect() >= 0 and logger.recorded >= 2)
        time.sleep(0.1)  # a third row would come now
        rows = _ledger(logger, ("error", "input_tokens", "output_tokens"))
    finally:
        logger.unregister()
    prompt = logger.pipeline.state.tokens(kwargs["model"], kwargs["messages"])
    output = litellm.stream_chunk_builder(came).usage.completion_tokens
    assert len(whole) > 3 and logger.recorded == 2 and not logger._streams
    assert sorted((r["error"] or "", r["input_tokens"], r["output_tokens"]) for r in rows)[1] == \
        ("StreamLeft", prompt, output)
    assert [r["error"] for r in rows].count(None) == 1


def test_a_sync_stream_the_caller_asked_litellm_not_to_log_is_not_recorded(tmp_path, monkeypatch) -> None:
    """``no-log=True`` asks litellm to send the call to no logger: it delivers none of its events, so a
    sync stream of it, read to its end or left, is no row (not one naming ``StreamLeft``)."""
    import gc
    import itertools

    logger = _sdk_logger(tmp_path, monkeypatch, {})
    messages = [{"role": "user", "content": "Tell me about foxes"}]
    try:
        for read in (None, 3):
            stream = litellm.completion(model="gpt-4o-mini", messages=messages, stream=True, mock_response="fox " * 40,
                                        **{"no-log": True})
            came = list(itertools.islice(stream, read))
            del stream
        for _ in range(3):  # litellm's logging of the chunks ends, the streams are freed, their rows would come
            time.sleep(0.1)
            gc.collect()
        time.sleep(0.1)
        rows = _ledger(logger)
    finally:
        logger.unregister()
    assert len(came) == 3 and logger.recorded == 0 and rows == [] and not logger._streams


def test_aresponses_of_openais_responses_api_is_admitted_before_it_is_sent(tmp_path, monkeypatch) -> None:
    """``litellm.aresponses`` of a model with the Responses API (OpenAI's): the deployment hook, which
    litellm calls for it as for ``acompletion``, admits it as sent (its ``input`` and
    ``max_output_tokens`` estimated, no policy rewriting it): one whose estimate does not fit a budget
    is refused with ``BudgetExceeded`` naming it, nothing made and no row; one that fits is settled
    at its usage (one row, the budget charged what it used). ``litellm.responses`` (sync) skips the
    hook, as a sync chat call does: it is counted after, not refused."""
    from router_middleware.errors import BudgetExceeded

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}]})
    request = {"model": "openai/gpt-4o-mini", "input": "Tell me a joke", "mock_response": "A joke. " * 20}

    async def run() -> tuple[BudgetExceeded, Any]:
        with pytest.raises(BudgetExceeded) as over:
            await litellm.aresponses(**request, max_output_tokens=2000)
        answer = await litellm.aresponses(**request, max_output_tokens=100)
        await logger.aflush()
        return over.value, answer

    try:
        refused, answer = asyncio.run(run())
        with pytest.raises(BudgetExceeded) as spent:  # what the counter holds now, as the pipeline sees it
            logger.pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                       mock_response="ok", max_tokens=990)
        hooked = logger.hook_calls
        litellm.responses(**request, max_output_tokens=2000)  # sync: no hook, so not refused; counted after
        _polled(lambda: logger.recorded >= 2)  # the sync path's events run on litellm's thread
        rows = _ledger(logger, ("requested_model", "input_tokens", "output_tokens", "decisions", "error"))
    finally:
        logger.unregister()
    assert (refused.name, refused.spent, hooked) == ("daily", 0, 2)
    assert spent.value.spent == answer.usage.total_tokens  # settled at the actual use, not the estimate
    assert rows[0] == {"requested_model": "openai/gpt-4o-mini", "input_tokens": answer.usage.input_tokens,
                       "output_tokens": answer.usage.output_tokens, "decisions": '["routing:as-sent"]', "error": None}
    assert len(rows) == 2 and rows[1]["error"] is None  # the refused call: no row; the sync one: counted


def test_aresponses_given_its_model_positionally_is_counted_not_refused(tmp_path, monkeypatch) -> None:
    """litellm hands the deployment hook the call's keyword arguments only: ``aresponses("hi", model)``
    cannot be planned (no model, no input), so it is sent and counted, ``budget_not_enforced`` logged,
    never refused as a call of model ``''``."""
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 10, "window_s": 86400}]})

    async def run() -> Any:
        answer = await litellm.aresponses("Tell me a joke", "openai/gpt-4o-mini", mock_response="A joke.")
        await logger.aflush()
        return answer

    try:
        with structlog.testing.capture_logs() as logs:
            answer = asyncio.run(run())
        rows = _ledger(logger, ("requested_model", "output_tokens", "error"))
    finally:
        logger.unregister()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["budget_not_enforced"]
    assert rows == [{"requested_model": "openai/gpt-4o-mini", "output_tokens": answer.usage.output_tokens,
                     "error": None}]


@pytest.mark.parametrize("stream", [False, True])
def test_aresponses_for_a_model_without_the_responses_api_is_one_admitted_call(tmp_path, monkeypatch,
                                                                                 stream: bool) -> None:
    """``litellm.aresponses`` of an Anthropic model: admitted as sent by the deployment hook of the
    responses call; the chat call litellm answers it with (sharing the call's id) is followed by that
    lifecycle, not planned again. The responses call's success event settles it: one row at the
    recorded usage, priced as the model that answered (a stream too, at its recording's usage). Over
    a budget it is refused before anything is sent, with ``BudgetExceeded`` naming the budget."""
    from router_middleware.errors import BudgetExceeded

    from .fault_server import fault_server

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    recording = "anthropic_message_streaming.yaml" if stream else "anthropic_message_create.yaml"
    recorded = recorded_usage(interactions(CASSETTES / recording)[0])
    model = "anthropic/claude-3-opus-20240229"

    async def run(logger: RouterLogger, base: str) -> object:
        try:
            answer = await litellm.aresponses(model=model, input="Tell me a joke about OpenTelemetry",
                                              api_base=f"{base}/healthy", max_output_tokens=1024, stream=stream)
            if stream:
                async for event in answer:  # type: ignore[union-attr]
                    if getattr(event, "type", None) == "response.completed":
                        return event.response
            return answer
        except BudgetExceeded as refused:
            return refused
        finally:
            await logger.aflush()

    rows, outcomes = [], []
    with fault_server() as (base, seen):
        for tokens in (100000, 500):
            (tmp_path / str(tokens)).mkdir()
            logger = _sdk_logger(tmp_path / str(tokens), monkeypatch,
                                 {"budgets": [{"name": "daily", "tokens": tokens, "window_s": 86400}]})
            try:
                outcomes.append((asyncio.run(run(logger, base)), logger.hook_calls, logger.recorded))
                rows.append(_ledger(logger, ("requested_model", "model", "input_tokens", "output_tokens", "cost_usd",
                                             "decisions", "error")))
            finally:
                logger.unregister()
    (answer, hooked, counted), (refused, refused_hooked, refused_counted) = outcomes
    assert seen == Counter({"healthy:ok": 1})  # the refused call sent nothing
    assert answer.usage.output_tokens == recorded["output_tokens"] and (hooked, counted) == (1, 1)
    [row] = rows[0]
    answered = Pipeline.from_config({}).catalog.resolve(row["model"])
    assert answered is not None
    cost = recorded["input_tokens"] * answered.input + recorded["output_tokens"] * answered.output  # once
    assert row == {"requested_model": model, "model": row["model"], "input_tokens": recorded["input_tokens"],
                   "output_tokens": recorded["output_tokens"], "cost_usd": pytest.approx(cost),
                   "decisions": '["routing:as-sent"]', "error": None}
    assert isinstance(refused, BudgetExceeded) and refused.name == "daily"
    assert (refused_hooked, refused_counted, rows[1]) == (1, 0, [])


def _redis_sdk_logger(monkeypatch: pytest.MonkeyPatch, redis_url: str, name: str, slow_s: float = 0.0,
                      tokens: int = 1000) -> tuple[RouterLogger, list[int]]:
    """An SDK logger on Redis with a ``tokens`` budget; its ``add_many`` writes (their threads) listed
    once made, each after ``slow_s`` (a store slow to answer)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    asyncio.run(wire.drain_callbacks())
    logger = RouterLogger(Pipeline.from_config({
        "app": f"{name}-{time.time_ns()}", "store": redis_url, "cache": {"enabled": False},
        "routing": {"budgets": [{"name": "daily", "tokens": tokens, "window_s": 86400}]}})).register()
    store, writes = logger.pipeline.store, []
    real = store.add_many

    def add_many(*args: object, **kwargs: object) -> object:
        time.sleep(slow_s)
        answer = real(*args, **kwargs)
        writes.append(threading.get_ident())
        return answer

    monkeypatch.setattr(store, "add_many", add_many)
    return logger, writes


def test_a_call_let_go_without_an_event_is_ended_off_the_event_loop_on_redis(monkeypatch, redis_url) -> None:
    """Giving back a cancelled SDK call's reservation is a store write: on Redis it is made in a worker
    thread, as the lifecycle's other lesser writes are, never blocking the event loop (a Redis that
    hangs would stall every call in the process for its timeout)."""
    logger, writes = _redis_sdk_logger(monkeypatch, redis_url, "off-loop")

    async def run() -> int:
        messages = [{"role": "user", "content": "hi"}]
        await litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=5)
        await logger.aflush()  # connected, scripts loaded: the next call is in flight well within its timeout
        writes.clear()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                                       max_tokens=500, mock_delay=2.0), timeout=0.5)
        await _apolled(lambda: not logger._calls and writes)
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(run())
    finally:
        logger.unregister()
        logger.pipeline.close()
    assert writes and loop_thread not in writes


def test_an_async_call_recorded_from_its_event_alone_settles_off_the_event_loop_on_redis(
        monkeypatch, redis_url) -> None:
    """A call no lifecycle follows (a ``litellm.Router``'s here, counted, not refused) is settled from
    its success event on the event loop: on Redis the writes go to a worker thread."""
    logger, writes = _redis_sdk_logger(monkeypatch, redis_url, "event", tokens=10)
    router = litellm.Router(model_list=[{"model_name": "coder",
                                         "litellm_params": {"model": "gpt-4o-mini", "api_key": "sk-test"}}])

    async def run() -> int:
        await router.acompletion(model="coder", messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                                 max_tokens=500)  # over the budget: counted, not refused
        await logger.aflush()
        await _apolled(lambda: writes)
        return threading.get_ident()

    try:
        loop_thread = asyncio.run(run())
    finally:
        logger.unregister()
        logger.pipeline.close()
    assert logger.recorded == 1 and writes and loop_thread not in writes


def test_aflush_waits_for_the_reservation_of_a_call_let_go_to_be_given_back_on_redis(
        monkeypatch, redis_url) -> None:
    """A call litellm let go of gives its reservation back in a worker thread on Redis; ``aflush``
    waits for that write too, so what a script reads of its budgets afterwards no longer holds it."""
    logger, writes = _redis_sdk_logger(monkeypatch, redis_url, "aflush-end", slow_s=0.3)
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> int:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(litellm.acompletion(model="gpt-4o-mini", messages=messages, mock_response="ok",
                                                       max_tokens=500, mock_delay=2.0), timeout=0.3)
        await _apolled(lambda: not logger._calls)
        await logger.aflush()
        return len(writes)

    try:
        made = asyncio.run(run())
    finally:
        logger.unregister()
        logger.pipeline.close()
    assert not logger._calls and made == 1


def test_a_call_let_go_while_the_event_loop_shuts_down_still_gives_its_reservation_back_on_redis(
        monkeypatch, redis_url, caplog) -> None:
    """litellm lets go of a call (its logging object is collected) while ``asyncio.run`` shuts its
    default executor down: the reservation is still given back (no worker thread takes new work
    then), not left held until it lapses with an error from the loop's callback."""
    logger, writes = _redis_sdk_logger(monkeypatch, redis_url, "shutdown-end")
    held: list[object] = []  # the call's logging object, kept alive until the loop is ending
    watch = logger._watch

    def keeping(kwargs: dict[str, object], found: object) -> None:
        held.append(kwargs.get("litellm_logging_obj"))
        watch(kwargs, found)  # type: ignore[arg-type]

    monkeypatch.setattr(logger, "_watch", keeping)

    def let_go_late() -> None:
        time.sleep(0.3)  # asyncio.run is shutting its default executor down by now (it waits for this)
        held.clear()

    async def run() -> None:
        call = asyncio.ensure_future(litellm.acompletion(model="gpt-4o-mini", messages=[{"role": "user",
                                                                                       "content": "hi"}],
                                                         mock_response="ok", max_tokens=500, mock_delay=5.0))
        await _apolled(lambda: logger._calls)
        call.cancel()
        await asyncio.sleep(0.05)
        assert logger._calls and held  # in flight as far as the logger knows: litellm still holds the call
        asyncio.get_running_loop().run_in_executor(None, let_go_late)

    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            asyncio.run(run())
    finally:
        logger.unregister()
        logger.pipeline.close()
    assert not logger._calls and len(writes) == 1
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_the_requested_model_is_what_the_caller_passed_with_or_without_the_hook(logger) -> None:
    """The ledger's ``requested_model`` is the model as the caller passed it (provider prefix kept),
    whether the deployment hook planned the call (``acompletion``) or its events alone record it (a
    sync call, which skips the hook; a failure too), not litellm's name with the prefix stripped."""
    messages = [{"role": "user", "content": "hi"}]

    async def run() -> None:
        await litellm.acompletion(model="openai/gpt-4o-mini", messages=messages, mock_response="ok")
        await logger.aflush()

    asyncio.run(run())
    litellm.completion(model="openai/gpt-4o-mini", messages=messages, mock_response="ok")
    with pytest.raises(litellm.RateLimitError):
        litellm.completion(model="openai/gpt-4o-mini", messages=messages,
                           mock_response=litellm.RateLimitError("slow down", "openai", "gpt-4o-mini"))
    _polled(lambda: logger.recorded >= 3)  # the sync path's events run on litellm's thread
    assert (logger.hook_calls, logger.recorded) == (1, 3)
    assert [r["requested_model"] for r in _ledger(logger)] == ["openai/gpt-4o-mini"] * 3


def test_an_sdk_stream_broken_partway_is_settled_at_what_litellm_counted(tmp_path, monkeypatch,
                                                                        span_exporter) -> None:
    """A provider's stream that breaks after a few chunks (the real recording's first five events,
    then the connection drops) was billed for them: litellm counts the chunks it received before it
    delivers the failure event, and the call's ledger row, span and budget carry that count (marked
    ``estimated``: not the provider's report, which never came), with the error."""
    from router_middleware.errors import BudgetExceeded

    from .fault_server import fault_server

    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "daily", "tokens": 1000, "window_s": 86400}],
                                    "limits": {"openai/gpt-3.5-turbo": {"tpm": 100000}}})
    messages = [{"role": "user", "content": "Tell me a joke about opentelemetry"}]
    started = time.time()

    async def run(base: str) -> str:
        stream = await litellm.acompletion(model="openai/gpt-3.5-turbo", messages=messages, api_base=f"{base}/cut/v1",
                                           api_key="x", max_tokens=100, stream=True)
        text = ""
        with pytest.raises(litellm.exceptions.MidStreamFallbackError):  # litellm's wrapping of the lost connection
            async for chunk in stream:
                text += chunk.choices[0].delta.content or ""
        await logger.aflush()
        return text

    try:
        with fault_server(cut_events=5) as (base, seen):
            text = asyncio.run(run(base))
        with pytest.raises(BudgetExceeded) as spent:  # what the budget's counter holds now
            logger.pipeline.completion(model="gpt-4o-mini", messages=messages, mock_response="ok", max_tokens=990)
        rows = _ledger(logger, ("input_tokens", "output_tokens", "cost_usd", "error"))
    finally:
        logger.unregister()
    assert seen["cut:cut-stream"] == 1 and text == "In the observability"
    assert len(rows) == 1
    input_tokens, output_tokens, cost, error = rows[0].values()
    assert input_tokens > 0 and cost > 0 and error == "APIConnectionError"
    whole = recorded_usage(interactions(CASSETTES / "openai_chat_streaming.yaml")[0])
    assert 0 < output_tokens < whole["output_tokens"]  # the five chunks that came, not the whole answer
    assert spent.value.spent == input_tokens + output_tokens  # the budget is charged what the row says
    assert _tpm_used(logger, "openai/gpt-3.5-turbo", started) == input_tokens + output_tokens  # and the quota
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["router_middleware.usage.source"] == "estimated"
    assert span.attributes["gen_ai.usage.output_tokens"] == output_tokens


@pytest.mark.parametrize("first", ["post-call failure hook", "failure event"])
def test_a_proxy_stream_broken_partway_is_settled_at_what_litellm_counted(tmp_path, span_exporter, first) -> None:
    """Behind the proxy a stream that breaks partway ends with the proxy's post-call failure hook (from
    its stream generator) and litellm's failure event, in either order: whichever comes first settles
    the call at what litellm counted of the chunks that came (the hook reads it from the request's
    logging object) and counts the failure toward the target's cooldown, and the other finds the call
    ended: one row, charged once, one failure counted."""
    from router_middleware.errors import BudgetExceeded

    from .fault_server import fault_server

    asyncio.run(wire.drain_callbacks())
    logger = _one_target_logger(tmp_path, "cut")
    started = time.time()

    async def run(router: litellm.Router) -> None:
        if first == "failure event":
            await _cut_event_first(logger, router, "cut-1")
            return
        with pytest.raises(litellm.APIConnectionError):  # as the proxy's stream generator does, the event queued
            await _through_proxy(logger, router, "cut-1", stream=True, shared=True)
        await logger.aflush()

    try:
        with fault_server(cut_events=5) as (base, seen):
            asyncio.run(run(_cut_router(base)))
        with pytest.raises(BudgetExceeded) as spent:
            logger.pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "task cut-1"}],
                                       mock_response="ok", max_tokens=990)
        rows = _ledger(logger, ("input_tokens", "output_tokens", "cost_usd", "error"))
    finally:
        logger.unregister()
    assert seen["cut:cut-stream"] == 1 and logger.recorded == 1 and len(rows) == 1
    assert float(logger.pipeline.store.get("fail:cut") or 0) == 1
    input_tokens, output_tokens, cost, error = rows[0].values()
    assert input_tokens > 0 and 0 < output_tokens < 50 and cost > 0 and error == "APIConnectionError"
    assert spent.value.spent == input_tokens + output_tokens
    assert _tpm_used(logger, "cut", started) == input_tokens + output_tokens
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert span.attributes["router_middleware.usage.source"] == "estimated"


def _task(data: dict) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"task {data['litellm_call_id']}"}]


def _client_leaves_after_two_chunks(logger: RouterLogger, data: dict, *, hook: bool) -> Counter[str]:
    """A proxy request (planned by the pre-call hook if ``hook``) streamed by a router whose deployment
    ``slow`` is the fault server's slow stream, read for two chunks, then ended by the proxy's own
    cleanup of a client that left (``finalize_streaming_generator_cleanup``, which flags the request
    and delivers the chunks streamed as a success); what the fault server saw."""
    from litellm.proxy.common_request_processing import ProxyBaseLLMRequestProcessing

    from .fault_server import fault_server

    request = {**data, "messages": _task(data), "stream": True}

    async def run(router: litellm.Router) -> None:
        planned = await logger.async_pre_call_hook(None, None, request, "acompletion") if hook else request
        sent = _proxy_request(planned)
        stream = await router.acompletion(**sent)
        read = 0
        async for _ in stream:
            read += 1
            if read == 2:
                break
        await ProxyBaseLLMRequestProcessing.finalize_streaming_generator_cleanup(None, sent, stream,
                                                                                 client_disconnected=True)
        await logger.aflush()

    with fault_server(hang_s=3.0, cut_events=3) as (base, seen):
        router = litellm.Router(model_list=[{"model_name": "slow", "litellm_params": {
            "model": "openai/gpt-3.5-turbo", "api_base": f"{base}/stall/v1", "api_key": "x"}}])
        asyncio.run(run(router))
    return seen


def test_a_client_that_leaves_a_stream_planned_at_its_attempt_is_recorded_as_closed_early(tmp_path,
                                                                                        span_exporter) -> None:
    """A proxy request the pre-call hook did not plan (the lifecycle starts at its attempt, in the
    deployment hook, as in the SDK) whose client left mid-stream: litellm delivers the chunks streamed
    as a success flagged ``client_disconnected``. Recorded as a planned call is: its row and span say
    ``ClientDisconnected``, with litellm's count marked ``estimated``; not a complete answer (no
    reply-size sample). Its prompt counts the tool definitions it sent (litellm's count of it, which
    the row had, leaves them out)."""
    asyncio.run(wire.drain_callbacks())
    logger = _one_target_logger(tmp_path, "slow")
    data = {"model": "slow", "litellm_call_id": "gone-2", "tools": [{"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the workspace and return its text.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]}
    try:
        seen = _client_leaves_after_two_chunks(logger, data, hook=False)
        rows = _ledger(logger, ("input_tokens", "output_tokens", "error"))
        samples = [key for key in logger.pipeline.store._data if key.startswith("out:")]
    finally:
        logger.unregister()
    assert seen["stall:stall"] == 1 and len(rows) == 1
    input_tokens, output_tokens, error = rows[0].values()
    assert input_tokens > litellm.token_counter(model="gpt-3.5-turbo", messages=_task(data)) + 30  # the tool's
    assert 0 < output_tokens < 50 and error == "ClientDisconnected"
    assert samples == []
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert span.attributes["router_middleware.stopped_by"] == "ClientDisconnected"
    assert span.attributes["router_middleware.usage.source"] == "estimated"


def _store_values(path, *prefixes: str) -> dict[str, bytes]:
    """What a SQLite store (a proxy process's) holds under ``prefixes``."""
    import sqlite3

    with sqlite3.connect(path) as db:
        return {k: v for k, v in db.execute("SELECT key, value FROM kv") if k.startswith(prefixes)}


def _one_stream_behind_a_budget(tmp_path) -> bytes:
    """router.yaml in ``tmp_path`` for the real proxy (``coder`` routed to coder-cheap, a daily token
    budget, a SQLite store and ledger there), and the body of a stream request to ``coder``; skips
    without the proxy."""
    from .conftest import service_missing
    from .litellm_proxy import proxy_missing

    if (why := proxy_missing()) is not None:
        service_missing(why)
    (tmp_path / "router.yaml").write_text(f"""
app: coding-agent
store: sqlite:///{tmp_path / 'store.db'}
routing:
  deployments: {{coder-cheap: {{model: openai/gpt-4o-mini}}}}
  aliases: {{coder: [coder-cheap]}}
  budgets: [{{name: day, tokens: 100000, scope: global}}]
ledger: {{url: 'sqlite:///{tmp_path / 'ledger.db'}'}}
""")
    return json.dumps({"model": "coder", "messages": [{"role": "user", "content": "Tell me a joke about opentelemetry"}],
                       "stream": True}).encode()


def test_a_stream_whose_provider_sent_nothing_behind_the_real_proxy_is_a_failed_row_holding_nothing(tmp_path) -> None:
    """The provider answers 200 and closes before any data: the proxy serves the client a bare finish
    chunk (a 200, as without the hook) and litellm delivers no event. Before, the call had no row and
    its estimate stayed held on the budget until the reservation lapsed (ten minutes), refusing the
    user's next calls meanwhile; now it is one failed row (``EmptyStreamError``), holding nothing."""
    import urllib.request

    from .fault_server import fault_server
    from .litellm_proxy import running_proxy

    body = _one_stream_behind_a_budget(tmp_path)
    with fault_server() as (base, seen):
        env = {"CHEAP_API_BASE": f"{base}/empty/v1", "STRONG_API_BASE": f"{base}/empty/v1", "CHEAP_API_KEY": "x",
               "STRONG_API_KEY": "x", "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env) as proxy:
            request = urllib.request.Request(f"{proxy}/v1/chat/completions", body, {
                "Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                status, served = answer.status, answer.read()
            rows = _proxy_rows(tmp_path, ("error", "requested_model", "deployment"), 1)
            time.sleep(1.0)  # a late event would add a row now
            rows = _proxy_rows(tmp_path, ("error", "requested_model", "deployment"), 2)
    assert status == 200 and b'"content"' not in served  # what the bare proxy serves too
    assert seen["empty:empty-stream"] >= 1
    assert rows == [{"error": "EmptyStreamError", "requested_model": "coder", "deployment": "coder-cheap"}]
    held = _store_values(tmp_path / "store.db", "budget:")
    assert all(float(v) == 0 for v in held.values()), held


def test_the_router_s_own_fallbacks_behind_the_real_proxy_answer_as_without_the_hook(tmp_path) -> None:
    """trial54c: a Cline-style client asks the proxy for ``coder-cheap``, whose ``router_settings``
    fallback is ``coder-strong``; with coder-cheap down the bare proxy answers from coder-strong, and
    with the hook the client got a 503 (the hook handed the router an empty ``fallbacks``). Now both
    a plain call and a stream are answered, each one row, at the fallback."""
    import urllib.request

    from .conftest import service_missing
    from .litellm_proxy import PROXY_DIR, proxy_missing, running_proxy
    from .scripted_upstream import scripted_upstream

    if (why := proxy_missing()) is not None:
        service_missing(why)
    _integration_router(tmp_path, "[coder-cheap]")
    (tmp_path / "config.yaml").write_text((PROXY_DIR / "config.yaml").read_text()
                                          + "router_settings:\n  fallbacks: [{coder-cheap: [coder-strong]}]\n")
    with scripted_upstream(status=503) as (down, down_seen), scripted_upstream() as (up, up_seen):
        env = {"CHEAP_API_BASE": down, "STRONG_API_BASE": up, "CHEAP_API_KEY": "x", "STRONG_API_KEY": "x",
               "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env, tmp_path / "config.yaml") as proxy:
            served = []
            for stream in (False, True):
                request = urllib.request.Request(f"{proxy}/v1/chat/completions", json.dumps({
                    "model": "coder-cheap", "stream": stream,
                    "messages": [{"role": "user", "content": "list the files"}]}).encode(),
                    {"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as answer:
                    served.append((answer.status, b"run_commands" in answer.read()))
            rows = _proxy_rows(tmp_path, ("error", "requested_model", "deployment", "decisions"), 2)
            time.sleep(1.0)  # a late event would add a row now
            rows = _proxy_rows(tmp_path, ("error", "requested_model", "deployment", "decisions"), 3)
    assert served == [(200, True), (200, True)] and down_seen and len(up_seen) == 2
    assert [(r["error"], r["requested_model"], r["deployment"]) for r in rows] == [(None, "coder-cheap", "coder-strong")] * 2
    assert all("routing:fallback" in r["decisions"] for r in rows)


def test_a_stream_to_a_routing_alias_behind_the_real_proxy_asks_its_provider_for_usage(tmp_path) -> None:
    """The proxy asks a stream's provider for its usage chunk (and strips it from what the client is
    served) for its own model names, before the hook: a stream to a routing alias that is none (``hard``)
    went without it, and its row had litellm's count instead of the provider's. The hook now asks for
    the model_name it sends the call to, as the proxy would."""
    import urllib.request

    from .conftest import service_missing
    from .litellm_proxy import proxy_missing, running_proxy
    from .scripted_upstream import USAGE, scripted_upstream

    if (why := proxy_missing()) is not None:
        service_missing(why)
    (tmp_path / "router.yaml").write_text(f"""
app: coding-agent
routing:
  deployments: {{coder-cheap: {{model: openai/gpt-4o-mini}}}}
  aliases: {{hard: [coder-cheap]}}
ledger: {{url: 'sqlite:///{tmp_path / 'ledger.db'}'}}
""")
    body = json.dumps({"model": "hard", "messages": [{"role": "user", "content": "Run the tests"}],
                       "stream": True}).encode()
    with scripted_upstream() as (upstream, seen):
        env = {"CHEAP_API_BASE": upstream, "STRONG_API_BASE": upstream, "CHEAP_API_KEY": "x", "STRONG_API_KEY": "x",
               "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env) as proxy:
            request = urllib.request.Request(f"{proxy}/v1/chat/completions", body, {
                "Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                served = answer.read()
            rows = _proxy_rows(tmp_path, ("requested_model", "input_tokens", "output_tokens"), 1)
    assert seen[0]["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in served  # the client did not ask for it: stripped, as the proxy does
    assert rows == [{"requested_model": "hard", "input_tokens": USAGE["prompt_tokens"],
                     "output_tokens": USAGE["completion_tokens"]}]


def test_a_client_that_leaves_mid_stream_behind_the_real_proxy_is_settled_as_a_stream_closed_early(tmp_path) -> None:
    """The real LiteLLM proxy streams a slow answer (the recording's first three events, then a pause
    of 4 s); the client reads two chunks and closes its connection. The proxy reports the chunks
    streamed as a success flagged ``client_disconnected``: the row has what they used, with the error
    ``ClientDisconnected``, the budget is charged that, and a truncated reply teaches nothing (no
    reply-size sample for the output estimate, no speed average)."""
    import socket

    from .fault_server import fault_server
    from .litellm_proxy import running_proxy

    body = _one_stream_behind_a_budget(tmp_path)
    with fault_server(hang_s=4.0, cut_events=3) as (base, seen):
        env = {"CHEAP_API_BASE": f"{base}/stall/v1", "STRONG_API_BASE": f"{base}/stall/v1", "CHEAP_API_KEY": "x",
               "STRONG_API_KEY": "x", "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env) as proxy:
            with socket.create_connection(("127.0.0.1", int(proxy.rsplit(":", 1)[1]))) as client:
                client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer "
                               b"sk-proxy-master\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                               % len(body) + body)
                got = b""
                while got.count(b"data: ") < 2:  # two chunks, then the client leaves during the pause
                    got += client.recv(65536)
            rows = _proxy_rows(tmp_path, ("input_tokens", "output_tokens", "error"), 1)
    assert seen["stall:stall"] == 1 and b"[DONE]" not in got
    assert len(rows) == 1
    input_tokens, output_tokens, error = rows[0].values()
    whole = recorded_usage(interactions(CASSETTES / "openai_chat_streaming.yaml")[0])
    assert input_tokens > 0 and 0 < output_tokens < whole["output_tokens"] and error == "ClientDisconnected"
    kept = _store_values(tmp_path / "store.db", "budget:", "out:", "tps:", "lat:")
    assert kept == {"budget:day:tokens:all:0": repr(float(input_tokens + output_tokens)).encode()}


def test_a_proxy_call_every_target_of_which_failed_at_once_spent_nothing(tmp_path) -> None:
    """Both targets of the alias answer 500 to a long prompt, plain and streamed. litellm's proxy lifts
    an estimate of the prompt into the data of every request that failed after it was sent (priced 0:
    no provider bills an error answered at once), and the logger read it as a stream cut partway: each
    failed call's row had the prompt's tokens and cost, charged to the user's budget, which then
    refused the user's next calls. Each row now says nothing was spent, and the budget is untouched."""
    from .conftest import service_missing
    from .fault_server import fault_server
    from .litellm_proxy import proxy_missing, running_proxy

    if (why := proxy_missing()) is not None:
        service_missing(why)
    _integration_router(tmp_path, "[coder-strong, coder-cheap]", "  budgets: [{name: per-user, scope: user, usd: 1.0}]\n")
    with fault_server() as (base, seen):
        env = {"CHEAP_API_BASE": f"{base}/down/v1", "STRONG_API_BASE": f"{base}/down/v1", "CHEAP_API_KEY": "x",
               "STRONG_API_KEY": "x", "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env) as proxy:
            for stream in (False, True):
                request = urllib.request.Request(f"{proxy}/v1/chat/completions", json.dumps({
                    "model": "coder", "stream": stream, "metadata": {"user": "frank"},
                    "messages": [{"role": "user", "content": "def f():\n    return 1\n" * 300}]}).encode(),
                    {"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
                with pytest.raises(urllib.error.HTTPError) as failed:
                    urllib.request.urlopen(request, timeout=60).read()
                assert failed.value.code == 500
            rows = _proxy_rows(tmp_path, ("input_tokens", "output_tokens", "cost_usd", "ended"), 2)
    assert seen["down:ok"] >= 4  # each target tried by each call
    assert [tuple(r.values()) for r in rows] == [(0, 0, None, "failed")] * 2
    assert all(float(v) == 0 for v in _store_values(tmp_path / "store.db", "budget:").values())


@pytest.mark.parametrize("way", ["sdk", "proxy hook"])
def test_the_request_s_openai_user_field_is_the_call_s_user_where_its_metadata_names_none(way) -> None:
    """OpenAI's own ``user`` field names the end user a request is for; only ``metadata={"user": ...}``
    was read, so a per-user budget held nothing for a client that sent ``user=`` (five calls of a user
    over the limit all answered). It is the call's user now, under a user the metadata names."""
    from router_middleware import BudgetExceeded

    async def calls(logger: RouterLogger) -> list[str]:
        outcomes = []
        for user, metadata in [("ivan", {}), ("ivan", {}), ("ivan", {"user": "olga"}), ("ivan", {})]:
            data = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi " * 400}], "user": user,
                    "metadata": metadata, "mock_response": "ok"}
            try:
                if way == "sdk":
                    await litellm.acompletion(**data)
                else:
                    changed = await logger.async_pre_call_hook(None, None, {**data, "litellm_call_id": uuid.uuid4().hex},
                                                               "acompletion")
                    await litellm.acompletion(**_proxy_request(changed))
                outcomes.append("ok")
            except BudgetExceeded as exc:
                outcomes.append(str(exc).split(" exceeded")[0])
            await logger.aflush()
        return outcomes

    asyncio.run(wire.drain_callbacks())
    logger = RouterLogger(Pipeline.from_config({"cache": {"enabled": False}, "routing": {"budgets": [
        {"name": "per-user", "scope": "user", "usd": 0.0004}]}}), proxy=way == "proxy hook").register()
    try:
        outcomes = asyncio.run(calls(logger))
        spent = {user: float(logger.pipeline.store.get(f"budget:per-user:usd:{user}:0") or 0) for user in ("ivan", "olga")}
    finally:
        logger.unregister()
    if way == "proxy hook":  # each call reserves about $0.00037 (400 prompt and 512 output tokens) and spends
        # $0.00007: ivan's second does not fit in $0.0004
        assert outcomes == ["ok", "budget 'per-user' (user ivan)", "ok", "budget 'per-user' (user ivan)"]
        assert 0 < spent["ivan"] == pytest.approx(spent["olga"])
    else:  # an SDK call is charged, not refused (documented): each of ivan's three calls to ivan's budget
        assert outcomes == ["ok"] * 4
        assert 0 < spent["ivan"] == pytest.approx(3 * spent["olga"])


def test_a_client_that_leaves_mid_stream_ends_the_call_s_span_with_the_disconnect(tmp_path, span_exporter) -> None:
    """The same through the hooks, in this process: a router's slow stream, read for two chunks, then
    ended by the proxy's own cleanup of a client that left (``finalize_streaming_generator_cleanup``,
    which flags the request and delivers the chunks streamed as a success). The attempt's span says
    ``ClientDisconnected``, with litellm's count marked ``estimated``: not the provider's report."""
    asyncio.run(wire.drain_callbacks())
    logger = _one_target_logger(tmp_path, "slow")
    started = time.time()
    try:
        seen = _client_leaves_after_two_chunks(logger, {"model": "coder", "litellm_call_id": "gone-1"}, hook=True)
        rows = _ledger(logger, ("input_tokens", "output_tokens", "error", "ended"))
    finally:
        logger.unregister()
    assert seen["stall:stall"] == 1 and logger.recorded == 1 and len(rows) == 1
    input_tokens, output_tokens, error, ended = rows[0].values()
    assert input_tokens > 0 and 0 < output_tokens < 50 and (error, ended) == ("ClientDisconnected", "stopped")
    assert _tpm_used(logger, "slow", started) == input_tokens + output_tokens
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert span.status.status_code == StatusCode.UNSET and "error.type" not in span.attributes
    assert (span.attributes["router_middleware.ended"], span.attributes["router_middleware.stopped_by"]) == \
        ("stopped", "ClientDisconnected")  # by the client: kept apart from failures
    assert span.attributes["router_middleware.usage.source"] == "estimated"
    assert span.attributes["gen_ai.usage.output_tokens"] == output_tokens



@pytest.mark.parametrize(("status", "counted"), [(503, 1.0), (400, 0.0)])
@pytest.mark.parametrize("hook_group", [None, "flaky"], ids=["group-of-the-last", "group-of-the-first"])
def test_a_proxy_call_s_last_failure_counts_toward_a_cooldown_though_only_the_failure_hook_reports_it(
        tmp_path, status, counted, hook_group) -> None:
    """Behind the proxy one logging object serves every attempt and litellm delivers its first failure
    event only: the last target's failure reaches the logger through the proxy's post-call failure
    hook alone. A provider's failure (503) counts toward each target's cooldown once; a request's own
    fault (400) toward none. The real proxy's request still names its first target's ``model_group``
    then (its router copies the metadata for each fallback): the last target's failure counted all
    the same (it was not, so a dead last target of an alias never cooled down)."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=status) as (dead, dead_seen):
        router = _dead_router(dead)
        logger = _proxy_logger(tmp_path, ["flaky", "flaky2"])

        async def call() -> None:
            with pytest.raises(Exception, match="overloaded"):
                await _through_proxy(logger, router, "lost", shared=True, hook_group=hook_group)
            await logger.aflush()

        try:
            asyncio.run(call())
            rows = _ledger(logger)
        finally:
            logger.unregister()
    counts = [float(logger.pipeline.store.get(f"fail:{name}") or 0) for name in ("flaky", "flaky2")]
    assert len(dead_seen) == 2 and logger.recorded == 1 and len(rows) == 1 and rows[0]["error"]
    assert counts == [counted] * 2


def _proxy_call_over(tmp_path, statuses: tuple[int, ...]) -> tuple[list[float], list[dict], BaseException | None]:
    """One call through the proxy's hooks and a real ``litellm.Router`` over the alias's targets
    ``flaky``, ``flaky2`` (and ``healthy``), each answering its status of ``statuses`` (200: the
    answer), each called once: the failures counted for flaky and flaky2, the rows, and what the
    router raised (``None``: it answered)."""
    from contextlib import ExitStack

    from .scripted_upstream import scripted_upstream

    names, models = ("flaky", "flaky2", "healthy"), ("openai/gpt-5-mini", "openai/gpt-5-mini", "openai/gpt-4o-mini")
    with ExitStack() as servers:
        ups = [servers.enter_context(scripted_upstream(status=status)) for status in statuses]
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": model, "api_base": base, "api_key": "x"}}
            for name, model, (base, _) in zip(names, models, ups, strict=False)])
        logger = _proxy_logger(tmp_path, list(names[:len(statuses)]))
        raised: list[BaseException] = []

        async def call() -> None:
            try:
                await _through_proxy(logger, router, "over", shared=True, event_first=True)
                await _recorded(logger, 1)
            except Exception as exc:  # noqa: BLE001 - what the router raised, for the test
                raised.append(exc)
            await logger.aflush()

        try:
            asyncio.run(call())
            rows = _ledger(logger)
        finally:
            logger.unregister()
        assert [len(seen) for _, seen in ups] == [1] * len(statuses)
    counts = [float(logger.pipeline.store.get(f"fail:{name}") or 0) for name in names[:2]]
    return counts, rows, raised[0] if raised else None


@pytest.mark.parametrize(("first", "last", "error"), [(400, 503, "ServiceUnavailableError"),
                                                     (503, 400, "BadRequestError")])
def test_a_proxy_fallback_that_fails_is_recorded_with_its_own_error_not_the_first_target_s(
        tmp_path, first, last, error) -> None:
    """litellm's router raises its first target's error once a fallback failed too, and no failure event
    comes for the fallback: its own error reaches the logger through the deployment failure hook only.
    A fallback down with a 503 after the first target's 400 cools down (it was counted as the 400, so
    a dead fallback never did); a fallback's 400 after the first target's 503 is the request's own
    fault and cools nothing down (it was counted as the 503). The row says the fallback's error."""
    counts, rows, raised = _proxy_call_over(tmp_path, (first, last))
    assert getattr(raised, "status_code", None) == first  # litellm's router raises the first target's
    assert counts == [float(first != 400), float(last != 400)]
    assert len(rows) == 1 and rows[0]["error"] == error, rows


def test_behind_the_real_proxy_a_dead_fallback_after_a_bad_request_cools_down(tmp_path) -> None:
    """The real proxy: the alias's first target answers 400, its fallback 503. The client is answered
    with the first target's 400 (litellm's), and the row said so, counting the 503 nowhere: a dead
    fallback never cooled down. Now the row says the fallback's 503 and the fallback cools down."""
    import urllib.request

    from .conftest import service_missing
    from .litellm_proxy import proxy_missing, running_proxy
    from .scripted_upstream import scripted_upstream

    if (why := proxy_missing()) is not None:
        service_missing(why)
    _integration_router(tmp_path, "[coder-strong, coder-cheap]", "  cooldown: {failures: 1}\n")
    with scripted_upstream(status=400) as (bad, bad_seen), scripted_upstream(status=503) as (dead, dead_seen):
        env = {"STRONG_API_BASE": bad, "CHEAP_API_BASE": dead, "CHEAP_API_KEY": "x", "STRONG_API_KEY": "x",
               "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env) as proxy:
            request = urllib.request.Request(f"{proxy}/v1/chat/completions", json.dumps({
                "model": "coder", "messages": [{"role": "user", "content": "fix the bug"}]}).encode(),
                {"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as failed:
                urllib.request.urlopen(request, timeout=60).read()
            rows = _proxy_rows(tmp_path, ("error", "ended"), 1)
            failures = _store_values(tmp_path / "store.db", "fail:", "cooldown:")
    assert failed.value.code == 400  # what litellm's router raises: its first target's error
    assert (len(bad_seen), len(dead_seen)) == (1, 1)
    assert rows == [{"error": "ServiceUnavailableError", "ended": "failed"}]
    assert set(failures) == {"cooldown:coder-cheap"}, failures  # the fallback's 503 cools it; the 400 is the request's


@pytest.mark.parametrize(("first", "second"), [(503, 400), (400, 503), (503, 503)])
def test_a_proxy_fallback_the_router_moved_past_is_counted_as_its_own_error(tmp_path, first, second) -> None:
    """The router moves on from a failed fallback to the next with no failure event for it (one
    logging object, first failure only): the deployment failure hook tells what it failed with, so a
    fallback's 400 after the first target's 503 cools nothing down (it counted as a 503 before), and
    a 503 still does."""
    counts, rows, raised = _proxy_call_over(tmp_path, (first, second, 200))
    assert raised is None and len(rows) == 1 and rows[0]["error"] is None
    assert counts == [float(first != 400), float(second != 400)]


def test_a_target_the_router_never_tried_is_not_counted_for_the_proxy_s_failure(tmp_path) -> None:
    """The router gave up after the first target (here it was handed no fallbacks) while the lifecycle,
    told of that failure by its event, had admitted the alias's next target: the post-call failure
    hook names the target that failed last (``model_group``), already counted, and the target never
    tried is not counted."""
    from .scripted_upstream import scripted_upstream

    with scripted_upstream(status=503) as (dead, dead_seen):
        router = _dead_router(dead)
        logger = _proxy_logger(tmp_path, ["flaky", "flaky2"])

        async def call() -> None:
            data = {"model": "coder", "messages": [{"role": "user", "content": "task lost"}], "litellm_call_id": "lost"}
            changed = _proxy_request(await logger.async_pre_call_hook(None, None, data, "acompletion"))
            with pytest.raises(litellm.ServiceUnavailableError) as failed:
                await router.acompletion(**{**changed, "fallbacks": []})
            await logger.aflush()
            await logger.async_post_call_failure_hook(changed, failed.value, None)

        try:
            asyncio.run(call())
        finally:
            logger.unregister()
    counts = [float(logger.pipeline.store.get(f"fail:{name}") or 0) for name in ("flaky", "flaky2")]
    assert len(dead_seen) == 1 and logger.recorded == 1 and counts == [1.0, 0.0]


@pytest.mark.parametrize("status", [400, 429, 499])
def test_what_the_proxy_raises_itself_never_cools_a_target_down(tmp_path, status) -> None:
    """A guardrail's block, the proxy's own rate limit or a client gone (an ``HTTPException`` raised
    before or around the router, no provider named) ends the call, and counts toward no cooldown: three
    of them in a row leave the target to the next call."""
    from fastapi import HTTPException

    logger = _proxy_logger(tmp_path, ["flaky", "healthy"])
    try:
        async def calls() -> list[str]:
            sent = []
            for i in range(4):
                data = {"model": "coder", "messages": [{"role": "user", "content": f"task {i}"}],
                        "litellm_call_id": f"blocked-{status}-{i}"}
                changed = await logger.async_pre_call_hook(None, None, data, "acompletion")
                sent.append(changed["model"])
                await logger.async_post_call_failure_hook(changed, HTTPException(status, "Violated guardrail"), None)
            return sent

        sent = asyncio.run(calls())
    finally:
        logger.unregister()
    assert sent == ["flaky"] * 4 and logger.pipeline.store.get("fail:flaky") is None


def test_a_retry_the_router_never_makes_is_not_counted_when_the_hook_ends_the_call(tmp_path) -> None:
    """The stream breaks partway; litellm's failure event comes first and the lifecycle, allowed two
    attempts a target, admits a retry at the same target, which the router (it does not retry a stream
    cut mid-way) never starts. The proxy's failure hook then ends the call: the failure was counted once
    (by its event), and what the cut attempt used is in the quota, the budget and the call's one ledger
    row once (the retry never made adds no row)."""
    from router_middleware.errors import BudgetExceeded

    from .fault_server import fault_server

    asyncio.run(wire.drain_callbacks())
    logger = _one_target_logger(tmp_path, "cut", fallback={"attempts_per_model": 2, "backoff_s": 0})
    started = time.time()
    try:
        with fault_server(cut_events=5) as (base, seen):
            asyncio.run(_cut_event_first(logger, _cut_router(base), "cut-2"))
        with pytest.raises(BudgetExceeded) as spent:
            logger.pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "task cut-2"}],
                                       mock_response="ok", max_tokens=990)
        rows = _ledger(logger, ("input_tokens", "output_tokens", "error"))
    finally:
        logger.unregister()
    assert seen["cut:cut-stream"] == 1 and len(rows) == 1
    assert float(logger.pipeline.store.get("fail:cut") or 0) == 1
    input_tokens, output_tokens, error = rows[0].values()
    assert input_tokens > 0 and 0 < output_tokens < 50 and error == "APIConnectionError"
    assert spent.value.spent == input_tokens + output_tokens  # charged once
    assert _tpm_used(logger, "cut", started) == input_tokens + output_tokens  # once, not twice


STREAMS = ("openai_chat_tools_streaming.yaml", "openai_chat_streaming.yaml", "anthropic_message_streaming.yaml")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("name", STREAMS)
def test_an_sdk_stream_s_usage_is_the_provider_s_only_where_its_chunks_show_it(name, mode, tmp_path, monkeypatch,
                                                                               span_exporter) -> None:
    """Real recorded streams replayed: openai_chat_tools_streaming.yaml has no usage chunk (litellm counts
    the tokens), the others report usage. litellm hands its callbacks the answer it assembled, whose usage
    looks the same either way; the stream's wrapper keeps the chunks that carried the provider's usage,
    and a sync call's event to OpenAI or Anthropic carries that wrapper (``original_response``). An
    async call's event carries no trace of its stream: its usage is said ``estimated`` whatever the
    provider sent. Only the provider's usage feeds the speed averages."""
    import vcr

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    item = interactions(CASSETTES / name)[0]
    kwargs = completion_kwargs(item)
    logger = RouterLogger(Pipeline.from_config({
        "routing": {"aliases": {"speedy": [kwargs["model"]]}},  # (speed averages are kept for routing)
        "cache": {"enabled": False}, "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
    })).register()
    replay = vcr.VCR(record_mode="none", decode_compressed_response=True)
    try:
        with replay.use_cassette(str(CASSETTES / name)):
            if mode == "sync":
                assert len(list(litellm.completion(**kwargs))) > 1
                assert _polled(lambda: logger.recorded == 1)
            else:
                async def run() -> None:
                    assert len([chunk async for chunk in await litellm.acompletion(**kwargs)]) > 1
                    await _recorded(logger, 1)

                asyncio.run(run())
        averages = sorted(key.split(":")[0] for key in logger.pipeline.store._data if key.startswith(("tps:", "lat:")))
    finally:
        logger.unregister()
    usage = recorded_usage(item)
    source = "provider" if usage is not None and mode == "sync" else "estimated"
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert span.attributes["router_middleware.usage.source"] == source
    assert averages == (["lat", "tps"] if source == "provider" else [])
    if usage is not None:  # the provider's count, whichever way it is labelled
        assert span.attributes["gen_ai.usage.input_tokens"] == usage["input_tokens"]
        assert span.attributes["gen_ai.usage.output_tokens"] == usage["output_tokens"]


@pytest.mark.parametrize(("provider", "source"), [("openai", "provider"), ("deepseek", "estimated")])
def test_a_sync_stream_whose_event_logs_no_wrapper_is_estimated(provider, source, span_exporter) -> None:
    """A sync stream of a provider litellm sends through its generic HTTP handler (DeepSeek's
    OpenAI-compatible API here, answered with the real OpenAI recording that reports usage) logs no
    stream wrapper in its event (``original_response`` is a note), so nothing tells the provider's
    usage from litellm's count: ``estimated``, as README says. Through litellm's OpenAI client the
    same reply is the provider's."""
    from .replay_server import replay_server

    logger = RouterLogger(Pipeline.from_config({"cache": {"enabled": False}})).register()
    try:
        with replay_server("openai_chat_streaming.yaml") as (base, seen):
            stream = litellm.completion(model=f"{provider}/gpt-3.5-turbo", messages=[{"role": "user", "content": "hi"}],
                                        api_base=f"{base}/v1", api_key="x", stream=True)
            assert len(list(stream)) > 1
            assert _polled(lambda: logger.recorded == 1)
    finally:
        logger.unregister()
    span = next(s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT)
    assert len(seen) == 1 and span.attributes["router_middleware.usage.source"] == source


def test_a_proxy_stream_s_usage_is_the_provider_s_only_where_its_chunks_show_it(tmp_path) -> None:
    """The real LiteLLM proxy streams two real recordings, one deployment each: coder-cheap's has no
    usage chunk (litellm counts the tokens, though the proxy asked the deployment for usage), coder-strong's
    reports usage. The proxy hands the logger the stream it serves (``async_post_call_response_headers_hook``),
    whose wrapper keeps the chunks that carried the provider's usage: only coder-strong's usage is the
    provider's, and only it feeds the speed averages; both rows carry the tokens."""
    from .conftest import service_missing
    from .litellm_proxy import proxy_missing, running_proxy
    from .replay_server import replay_server

    if (why := proxy_missing()) is not None:
        service_missing(why)
    _integration_router(tmp_path, "[coder-cheap, coder-strong]")
    with replay_server("openai_chat_tools_streaming.yaml") as (counted, counted_seen), \
            replay_server("openai_chat_streaming.yaml") as (reported, reported_seen):
        env = {"CHEAP_API_BASE": counted, "STRONG_API_BASE": reported, "CHEAP_API_KEY": "x", "STRONG_API_KEY": "x",
               "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env) as proxy:
            for model in ("coder-cheap", "coder-strong"):
                request = urllib.request.Request(
                    f"{proxy}/v1/chat/completions", json.dumps({
                        "model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode(),
                    {"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"})
                assert b"[DONE]" in urllib.request.urlopen(request, timeout=60).read()
            rows = _proxy_rows(tmp_path, ("model", "input_tokens", "output_tokens"), 2)
    assert len(counted_seen) == len(reported_seen) == 1
    assert counted_seen[0]["stream_options"] == {"include_usage": True}  # asked; the deployment sent none
    reported_usage = recorded_usage(interactions(CASSETTES / "openai_chat_streaming.yaml")[0])
    tokens = {r["model"]: (r["input_tokens"], r["output_tokens"]) for r in rows}
    assert tokens["gpt-3.5-turbo"] == (reported_usage["input_tokens"], reported_usage["output_tokens"])
    assert min(tokens["gpt-3.5-turbo-0125"]) > 0  # litellm's count of the recording's tool call
    assert set(_store_values(tmp_path / "store.db", "tps:", "lat:")) == {"tps:coder-strong", "lat:coder-strong"}


def test_every_method_overriding_custom_logger_s_is_router_logger_s_own() -> None:
    """litellm's proxy looks for a callback's ``async_pre_call_hook`` and
    ``async_post_call_response_headers_hook`` in its class's own ``__dict__``, not its bases'
    (``ProxyLogging.callback_capabilities``, litellm/proxy/utils.py, 1.110.2): one defined on a base
    class of ``RouterLogger`` is never called behind the proxy (with the proxy's hooks on a base class,
    a proxy stream's usage was no longer the provider's). So every method of ``RouterLogger`` that
    overrides ``CustomLogger``'s is its own (``__init__`` aside: litellm looks for no constructor)."""
    from litellm.integrations.custom_logger import CustomLogger

    owners = {name: next(klass for klass in RouterLogger.__mro__ if name in vars(klass))
              for name in dir(CustomLogger) if not name.startswith("__")}
    inherited = {name for name, klass in owners.items() if klass is not RouterLogger and not issubclass(CustomLogger,
                                                                                                          klass)}
    assert inherited == set()
    assert {"async_pre_call_hook", "async_post_call_response_headers_hook"} <= set(vars(RouterLogger))


@pytest.mark.parametrize("served", ["plain", "stream with its usage chunk", "stream without one"])
def test_the_proxy_settles_a_call_as_its_answer_is_served_and_drops_its_late_event(tmp_path, served) -> None:
    """The proxy's post-call hooks (as litellm's proxy calls them: the success hook for a plain answer,
    the iterator hook around a stream it serves) settle the call before the client has the answer:
    its budget holds what the call spent, no longer its estimate, and litellm's success event,
    delivered after, writes no second row. A stream that served no usage chunk is left to that event."""
    async def scenario(logger: RouterLogger) -> tuple[int, float, float, int, list[dict]]:
        router = litellm.Router(model_list=[{"model_name": "solo", "litellm_params": {
            "model": "openai/gpt-3.5-turbo", "api_key": "x", "mock_response": "a short answer"}}])
        data = {"model": "coder", "messages": [{"role": "user", "content": "task"}], "litellm_call_id": "c1",
                "max_tokens": 200}
        if served != "plain":
            data["stream"] = True
        if served == "stream with its usage chunk":
            data["stream_options"] = {"include_usage": True}
        changed = _proxy_request(await logger.async_pre_call_hook(None, None, data, "acompletion"))
        budget = next(k for k in logger.pipeline.store._data if k.startswith("budget:daily:"))
        held = float(logger.pipeline.store.get(budget))
        response = await router.acompletion(**changed)
        if served == "plain":
            await logger.async_post_call_success_hook(changed, None, response)
            usage = response.usage
        else:
            await logger.async_post_call_response_headers_hook(changed, None, response)
            chunks = [chunk async for chunk in logger.async_post_call_streaming_iterator_hook(None, response, changed)]
            usage = next((c.usage for c in reversed(chunks) if getattr(c, "usage", None) is not None), None)
        recorded_when_served = logger.recorded
        spent_when_served = float(logger.pipeline.store.get(budget))
        await logger.aflush()
        rows = _rows_at(f"sqlite:///{tmp_path / 'ledger.db'}", ("input_tokens", "output_tokens", "ended"))
        expected = usage.prompt_tokens + usage.completion_tokens if usage is not None else -1
        return recorded_when_served, held, spent_when_served, expected, rows + [{"recorded": logger.recorded}]

    asyncio.run(wire.drain_callbacks())
    logger = _one_target_logger(tmp_path, "solo")
    try:
        recorded, held, spent, expected, rows = asyncio.run(scenario(logger))
    finally:
        logger.unregister()  # else later tests' litellm calls reach it (and its budget)
    assert rows[-1] == {"recorded": 1} and len(rows) == 2 and rows[0]["ended"] == "complete"  # one row
    if served == "stream without one":
        assert (recorded, spent) == (0, held)  # still its estimate: its event settles it
    else:
        assert recorded == 1 and spent == expected != held  # the call's spend, before the client has the answer
        assert rows[0]["input_tokens"] + rows[0]["output_tokens"] == expected


@pytest.mark.parametrize("way", ["completion", "completion stream", "acompletion", "acompletion stream"])
def test_the_logger_s_spans_sit_in_the_caller_s_trace_timed_as_the_call_and_name_its_endpoint(logger, span_exporter,
                                                                                              way) -> None:
    """litellm's events come after the call, a sync stream's on a thread outside the caller's context:
    the spans are still the caller's span's children, start and end when litellm says the call did
    (as the row's ``latency_s``), and name the endpoint the call went to."""
    from opentelemetry import trace

    from .fault_server import fault_server

    streamed, asynchronous = way.endswith("stream"), way.startswith("a")
    messages = [{"role": "user", "content": "Tell me a joke about opentelemetry"}]
    tracer = trace.get_tracer("the-agent")

    async def acall(kw: dict) -> None:
        response = await litellm.acompletion(**kw)
        if streamed:
            async for _ in response:
                pass
        await _recorded(logger, 1)

    with fault_server() as (base, _seen):
        kw = {"model": "openai/gpt-3.5-turbo", "messages": messages, "api_key": "x", "api_base": f"{base}/healthy/v1",
              "max_tokens": 100, "stream": streamed}
        with tracer.start_as_current_span("agent step") as step:
            if asynchronous:
                asyncio.run(acall(kw))
            else:
                response = litellm.completion(**kw)
                for _ in response if streamed else ():
                    pass
                del response
                assert _polled(lambda: logger.recorded >= 1)
    (row,) = _ledger(logger, ("latency_s", "error"))
    spans = {s.kind: s for s in span_exporter.get_finished_spans() if s.name != "agent step"}
    route, chat = spans[SpanKind.INTERNAL], spans[SpanKind.CLIENT]
    assert route.parent.span_id == step.get_span_context().span_id and chat.parent.span_id == route.context.span_id
    assert chat.attributes["server.address"] == "127.0.0.1" and row["error"] is None
    if not asynchronous:  # timed by litellm's event (an async call's spans are the lifecycle's, opened at its hook)
        assert (chat.end_time - chat.start_time) / 1e9 == pytest.approx(row["latency_s"], abs=0.002)


def test_a_sync_call_s_spans_and_duration_point_cover_the_call_not_the_moment_its_event_came(logger,
                                                                                           span_exporter) -> None:
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from router_middleware.telemetry import metrics as call_metrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    found = call_metrics.instruments
    original = metrics.get_meter
    metrics.get_meter = provider.get_meter  # type: ignore[assignment]
    found.cache_clear()
    try:
        litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="ok",
                           mock_delay=0.3)
        assert _polled(lambda: logger.recorded >= 1)
        points = [p for m in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics
                  if m.name == "gen_ai.client.operation.duration" for p in m.data.data_points]
    finally:
        metrics.get_meter = original  # type: ignore[assignment]
        found.cache_clear()
        provider.shutdown()
    (row,) = _ledger(logger, ("latency_s",))
    for span in span_exporter.get_finished_spans():
        assert (span.end_time - span.start_time) / 1e9 == pytest.approx(row["latency_s"], abs=0.002)
    assert row["latency_s"] >= 0.3 and [p.sum for p in points] == [pytest.approx(row["latency_s"], abs=0.002)]


def test_a_call_resending_the_sdk_s_own_message_object_is_recorded(logger) -> None:
    """litellm takes openai's ``ChatCompletionMessage`` in ``messages`` (an agent appends the answer it
    got); the logger's record of the call reads its labels from messages no one validated, and still
    records it (the step kind inferred from them failed on the object: the call went unrecorded)."""
    from openai.types.chat import ChatCompletionMessage

    messages = [{"role": "user", "content": "write a haiku"}, ChatCompletionMessage(role="assistant", content="Sure")]
    litellm.completion(model="gpt-4o-mini", messages=messages, mock_response="ok")
    assert _polled(lambda: logger.recorded >= 1)


def test_a_sync_stream_that_breaks_before_its_first_chunk_keeps_the_caller_s_trace(logger, span_exporter) -> None:
    """litellm's failure event of a sync stream runs on a thread of its own: the call's spans are still
    the caller's span's children (they were the root of a new trace)."""
    from opentelemetry import trace

    from .fault_server import fault_server

    with fault_server() as (base, _seen), trace.get_tracer("the-agent").start_as_current_span("agent step") as step:
        with pytest.raises(Exception):  # noqa: B017 - litellm's error for a broken connection
            for _ in litellm.completion(model="openai/gpt-3.5-turbo", messages=[{"role": "user", "content": "joke"}],
                                        api_key="x", api_base=f"{base}/broken/v1", stream=True, max_retries=0):
                pass
        assert _polled(lambda: logger.recorded >= 1)
    (route,) = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.INTERNAL and s.name != "agent step"]
    assert route.parent is not None and route.parent.span_id == step.get_span_context().span_id


@pytest.mark.parametrize("endpoint", ["acompletion", "aresponses"])
def test_a_proxy_model_name_spelled_as_its_model_names_no_deployment_and_another_its_name(tmp_path, monkeypatch,
                                                                                           endpoint) -> None:
    """Behind the proxy a ``model_name`` spelled as its own model (``openai/gpt-4o-mini``) is the model
    called as itself: its row names no deployment, as a pipeline call of that model; a name standing
    for another model (``named``) is named, on the chat endpoint as on the ones sent as they came
    (``/v1/responses``; it named the model as its own deployment there)."""
    import sys
    import types

    router = litellm.Router(model_list=[
        {"model_name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_key": "x", "mock_response": "ok"}}
        for name in ("openai/gpt-4o-mini", "named")])
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    logger = RouterLogger(Pipeline.from_config({"ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}),
                          proxy=True).register()

    async def calls() -> None:
        for name in ("openai/gpt-4o-mini", "named"):
            data: dict[str, Any] = {"model": name, "litellm_call_id": name}
            if endpoint == "acompletion":
                data["messages"] = [{"role": "user", "content": f"to {name}"}]
            else:
                data["input"] = f"to {name}"
            sent = await logger.async_pre_call_hook(None, None, data, endpoint) or data  # None: sent as it came
            await getattr(router, endpoint)(**sent)
        await logger.aflush()

    try:
        asyncio.run(calls())
        rows = _ledger(logger, ("requested_model", "target", "deployment", "error"))
    finally:
        logger.unregister()
    assert rows == [
        {"requested_model": "openai/gpt-4o-mini", "target": "openai/gpt-4o-mini", "deployment": None, "error": None},
        {"requested_model": "named", "target": "openai/gpt-4o-mini", "deployment": "named", "error": None}]


def test_the_proxy_hook_sends_a_call_its_budget_cannot_hold_to_the_budget_s_downgrade_alias(tmp_path) -> None:
    """gpt-5-mini's estimate (512 output tokens at $2/M) does not fit in the $0.0005 budget; gpt-4o-mini's
    does: the proxy routes the call to ``cheap``'s deployment, where it refused it before."""
    logger = RouterLogger(Pipeline.from_config({
        "routing": {"deployments": {"strong": {"model": "openai/gpt-5-mini"}, "light": {"model": "openai/gpt-4o-mini"}},
                    "aliases": {"coder": ["strong"], "cheap": ["light"]},
                    "budgets": [{"name": "day", "scope": "global", "usd": 0.0005, "downgrade_to": "cheap"}]},
    }), proxy=True).register()
    try:
        data = {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "litellm_call_id": "down-1"}
        changed = asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
    finally:
        logger.unregister()
    assert changed["model"] == "light" and changed["fallbacks"] == []


def test_an_sdk_call_whose_downgrade_alias_it_cannot_reach_is_still_refused_by_its_budget(tmp_path,
                                                                                         monkeypatch) -> None:
    """In the SDK litellm has chosen the provider: a downgrade to an alias of another provider's model
    cannot be taken, and the budget's refusal stands (not a ``NoRouteError``, which the SDK hook sends
    as it came: the budget would be passed)."""
    from router_middleware import BudgetExceeded

    logger = _sdk_logger(tmp_path, monkeypatch, {
        "aliases": {"cheap": ["deepseek/deepseek-chat"]},
        "budgets": [{"name": "day", "scope": "global", "usd": 0.0005, "downgrade_to": "cheap"}]})
    try:
        with pytest.raises(BudgetExceeded, match="budget 'day'"):
            asyncio.run(litellm.acompletion(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=512, mock_response="ok"))
    finally:
        logger.unregister()


def test_a_request_sent_as_it_came_is_refused_by_its_budget_not_downgraded(tmp_path) -> None:
    """An Anthropic ``/v1/messages`` request goes to the ``model_name`` it names, whatever a plan says:
    admitting it at a downgraded estimate would let the expensive model answer on the cheap one's
    reservation. It is refused."""
    from router_middleware import BudgetExceeded

    logger = RouterLogger(Pipeline.from_config({
        "routing": {"aliases": {"cheap": ["gpt-4o-mini"]},
                    "budgets": [{"name": "day", "scope": "global", "usd": 0.0005, "downgrade_to": "cheap"}]},
    }), proxy=True).register()
    try:
        data = {"model": "claude-sonnet-4-5", "max_tokens": 512, "litellm_call_id": "as-sent-1",
                "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(BudgetExceeded, match="budget 'day'"):
            asyncio.run(logger.async_pre_call_hook(None, None, data, "anthropic_messages"))
    finally:
        logger.unregister()


def test_a_stream_said_nothing_only_without_an_answer_part_usage_or_a_finish_of_the_provider_s() -> None:
    """:func:`.wire.said_nothing`: litellm's own bare finish chunk says nothing; a finish reason the
    provider sent (``length``: a reasoning model out of tokens; Gemini's, which litellm keeps apart), a
    refusal, or usage does (reviews found such answers recorded as ``EmptyStreamError``, their target
    cooled down, and Gemini's failed over by the pipeline)."""
    from types import SimpleNamespace

    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices, Usage

    def chunk(finish: str | None = None, **delta: Any) -> ModelResponseStream:
        return ModelResponseStream(choices=[StreamingChoices(index=0, delta=Delta(**delta), finish_reason=finish)])

    bare = chunk("stop")
    assert wire.said_nothing([bare]) and wire.bare_finish(bare)
    assert not wire.said_nothing([bare], SimpleNamespace(received_finish_reason="length"))
    assert not wire.said_nothing([bare], SimpleNamespace(intermittent_finish_reason="length"))  # Gemini's MAX_TOKENS
    assert not wire.said_nothing([bare], SimpleNamespace(received_any_finish_reason=True))
    assert not wire.said_nothing([chunk(refusal="I can't help with that."), bare])
    assert not wire.said_nothing([chunk(tool_calls=[{"index": 0, "id": "c1", "type": "function",
                                                     "function": {"name": "ls", "arguments": "{}"}}]), bare])
    assert not wire.said_nothing([bare, ModelResponseStream(choices=[], usage=Usage(prompt_tokens=3,
                                                                                    completion_tokens=0))])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_proxy_call_s_spans_name_the_server_its_model_list_sends_it_to(tmp_path, monkeypatch, span_exporter,
                                                                           stream) -> None:
    """Behind the proxy a model name whose deployment has an ``api_base`` of its own (a self-hosted
    OpenAI-compatible server) is called there: its chat span's ``server.address`` is that host, as a
    config deployment's or a call's own ``api_base`` is, not OpenAI's public host (the span named
    ``api.openai.com`` for a call that never left the machine)."""
    import sys
    import types

    from .scripted_upstream import scripted_upstream

    with scripted_upstream() as (up, seen):
        router = litellm.Router(model_list=[
            {"model_name": name, "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": up, "api_key": "x"}}
            for name in ("local", "openai/gpt-4o-mini")])  # a name of its own, and its model's
        monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
        logger = RouterLogger(Pipeline.from_config({
            "routing": {"aliases": {"coder": ["local"]}},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()

        async def call() -> None:
            for i, model in enumerate(("coder", "openai/gpt-4o-mini")):
                data = {"model": model, "messages": [{"role": "user", "content": "task"}],
                        "litellm_call_id": f"local-{i}", "stream": stream}
                changed = _proxy_request(await logger.async_pre_call_hook(None, None, data, "acompletion"))
                response = await router.acompletion(**changed)
                if stream:
                    async for _ in response:
                        pass
                await _recorded(logger, i + 1)
            await logger.aflush()

        try:
            asyncio.run(call())
            rows = _ledger(logger, ("requested_model", "deployment", "error"))
        finally:
            logger.unregister()
    assert len(seen) == 2 and rows == [{"requested_model": "coder", "deployment": "local", "error": None},
                                       {"requested_model": "openai/gpt-4o-mini", "deployment": None, "error": None}]
    chats = [s for s in span_exporter.get_finished_spans() if s.kind == SpanKind.CLIENT]
    assert [s.attributes["server.address"] for s in chats] == ["127.0.0.1", "127.0.0.1"]


def test_proxy_runs_that_open_alike_do_not_share_a_session_budget_at_their_first_call(tmp_path, monkeypatch) -> None:
    """Cline sends no session id: the proxy derives one per run, but a run's first call (no assistant
    turn yet) was booked under the opening alone, which every rerun of the same task shares: a
    per-session budget filled up across runs, and a new run was refused at its first call (a 429 where
    the bare proxy answers). Each run's first call is now a session of its own; a run's later calls
    share the run's. The first calls' ``prompt_cache_key`` stays the opening's: reruns send the same
    request, which the provider's and litellm's caches serve alike."""
    import sys
    import types

    from router_middleware import BudgetExceeded

    router = litellm.Router(model_list=[{"model_name": "coder", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_key": "x", "mock_response": "Running the tests."}}])
    monkeypatch.setitem(sys.modules, "litellm.proxy.proxy_server", types.SimpleNamespace(llm_router=router))
    logger = RouterLogger(Pipeline.from_config({
        "routing": {"budgets": [{"name": "run", "scope": "session", "tokens": 250}]},
        "cache": {"enabled": False}, "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"}}), proxy=True).register()
    opening = [{"role": "system", "content": "You are a coding agent. " * 20},
               {"role": "user", "content": "Fix the failing test"}]
    refused: list[str] = []
    keys: set[str] = set()

    async def first_call(run: int) -> None:
        data = {"model": "coder", "messages": opening, "litellm_call_id": f"run{run}", "max_tokens": 50}
        try:
            changed = await logger.async_pre_call_hook(None, None, data, "acompletion")
        except BudgetExceeded:
            refused.append(f"run{run}")
            return
        keys.add(changed["prompt_cache_key"])
        await router.acompletion(**changed)
        await _recorded(logger, run + 1 - len(refused))

    async def runs() -> None:
        for run in range(5):  # each first call reserves ~180 tokens of the 250 a session may, spends 30
            await first_call(run)
        await logger.aflush()

    try:
        asyncio.run(runs())
        rows = _ledger(logger, ("session", "error", "input_tokens", "output_tokens"))
    finally:
        logger.unregister()
    assert refused == [] and len(keys) == 1
    assert len(rows) == 5 and len({r["session"] for r in rows}) == 5
    assert all(r["session"].startswith("head-") and r["error"] is None for r in rows)


def test_an_sdk_call_whose_litellm_fallback_a_budget_cannot_hold_is_still_one_row_of_the_answer(
        tmp_path, monkeypatch) -> None:
    """litellm sends the fallbacks it was given whatever the budget says (the ``forced`` path): a
    review found a top-up refusal there made one answered call a failed row and an orphan row of the
    answer (requested model the fallback's, no decisions). Such a fallback takes no top-up: one row,
    as before."""
    import logging

    monkeypatch.setattr(logging.getLogger("LiteLLM"), "disabled", True)
    logger = _sdk_logger(tmp_path, monkeypatch, {"budgets": [{"name": "team", "usd": 0.005}]})

    async def run() -> Any:
        answer = await litellm.acompletion(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=1000,
            mock_response=litellm.RateLimitError("x", "openai", "gpt-4o-mini"),
            fallbacks=[{"model": "gpt-4o", "mock_response": "ok"}])
        await _let_go(logger)
        return answer

    try:
        answer = asyncio.run(run())
        rows = _ledger(logger, ("error", "requested_model", "model", "ended", "decisions"))
    finally:
        logger.unregister()
    assert answer.choices[0].message.content == "ok"
    assert rows == [{"error": None, "requested_model": "gpt-4o-mini", "model": "gpt-4o", "ended": "complete",
                     "decisions": '["routing:fallback"]'}]
