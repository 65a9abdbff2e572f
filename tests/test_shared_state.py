"""Policy state lives in the configured store, so several pipelines (processes) share it."""

from __future__ import annotations

import uuid

import litellm
import pytest

from router_middleware import Pipeline, outcome

HISTORY = [{"role": "system", "content": "You are a coding agent."}, {"role": "user", "content": "task"}]
for i in range(12):
    HISTORY += [{"role": "assistant", "content": "", "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": "bash", "arguments": f'{{"command": "cat f{i}.py"}}'}}]},
        {"role": "tool", "tool_call_id": f"c{i}", "content": f"src/f{i}.py\n" + "x = 1\n" * 60}]


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state.db"
    return request.getfixturevalue("redis_url")


def test_two_pipelines_share_summaries(store_url, monkeypatch) -> None:
    session = f"s-{uuid.uuid4().hex[:6]}"
    config = {"store": store_url, "context": {"watermark_tokens": 1500, "max_payback_calls": None,
                                              "summarize": True,
                                              "summary_params": {"mock_response": f"Summary for {session}."}}}
    summaries = []
    real = litellm.completion

    def spy(**kwargs):
        if kwargs["model"] == "gpt-4o-mini":
            summaries.append(1)
        return real(**kwargs)

    monkeypatch.setattr(litellm, "completion", spy)
    first, second = Pipeline.from_config(config), Pipeline.from_config(config)
    for pipeline in (first, second):
        response = pipeline.completion(model="deepseek/deepseek-chat", messages=HISTORY, mock_response="ok",
                                       context={"session_id": session})
        assert any(f"Summary for {session}." in str(m.get("content")) for m in outcome(response).plan.messages)
    assert len(summaries) == 1  # the second worker read the summary the first one wrote


def test_two_pipelines_share_a_reasoning_budget(store_url) -> None:
    session = f"r-{uuid.uuid4().hex[:6]}"
    config = {"store": store_url, "reasoning": {"session_budget_tokens": 40000,
                                                "rules": [{"when": {}, "effort": "high"}]}}
    first, second = Pipeline.from_config(config), Pipeline.from_config(config)
    first.reasoning_spent.add(session, 35000)  # as if the first worker's calls had reported it
    plan = second.plan(second.make_call("anthropic/claude-sonnet-4-5", [{"role": "user", "content": "go"}],
                                        {"session_id": session}, {}))
    decision = next(d for d in plan.decisions if d.policy == "reasoning")
    assert decision.attributes["level"] == "low" and decision.attributes["session_remaining_tokens"] == 5000


def test_concurrent_calls_write_one_summary_per_span(store_url, monkeypatch) -> None:
    """Two pipelines (workers) x 20 concurrent calls of one session, all dropping the same span: one
    summary call; the others send the offline digest until the summary is stored."""
    import asyncio
    import threading

    session = f"c-{uuid.uuid4().hex[:6]}"
    config = {"store": store_url, "context": {"watermark_tokens": 1500, "max_payback_calls": None,
                                              "summarize": True,
                                              "summary_params": {"mock_response": f"Summary for {session}."}}}
    summaries: list[int] = []
    real = litellm.acompletion

    async def spy(**kwargs):
        if kwargs["model"] == "gpt-4o-mini":
            summaries.append(1)
            await asyncio.sleep(0.2)  # a summary takes a while: the other calls arrive meanwhile
        return await real(**kwargs)

    monkeypatch.setattr(litellm, "acompletion", spy)

    history = [{**m, "content": f"{session}\n{m['content']}"} if m["role"] == "tool" else m
               for m in HISTORY]  # spans no other test dropped

    def worker(pipeline: Pipeline, results: list) -> None:
        async def calls() -> list:
            return await asyncio.gather(*(pipeline.acompletion(
                model="deepseek/deepseek-chat", messages=history, mock_response="ok",
                context={"session_id": session}) for _ in range(20)))
        results.extend(asyncio.run(calls()))

    results: list = []
    threads = [threading.Thread(target=worker, args=(Pipeline.from_config(config), results)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(results) == 40 and len(summaries) == 1
    digests = [r for r in results if not any(f"Summary for {session}." in str(m.get("content"))
                                            for m in outcome(r).plan.messages)]
    assert len(digests) < 40  # the calls after the summary was stored carry it


@pytest.mark.parametrize("backend", ["memory", "sqlite", "redis"])
def test_concurrent_calls_of_a_session_step_the_reasoning_level_down(backend, request, tmp_path,
                                                                     monkeypatch) -> None:
    """100 calls of one session at once under a ``medium`` rule and a 100,000-token session budget:
    each call holds its level's tokens while it runs, so the calls that plan after it see them and step
    down (before, all 100 ran at medium); what they hold together stays within the budget, and all of
    it is released when they end (the mock replies report no reasoning)."""
    import asyncio

    from router_middleware.reasoning import DEFAULT_BUDGETS

    url = {"memory": "memory://", "sqlite": f"sqlite:///{tmp_path / 'state.db'}"}.get(backend) \
        or request.getfixturevalue("redis_url")
    session = f"r-{uuid.uuid4().hex[:6]}"
    pipeline = Pipeline.from_config({"store": url, "cache": {"enabled": False}, "context": {"enabled": False},
                                     "reasoning": {"session_budget_tokens": 100_000,
                                                   "rules": [{"when": {}, "effort": "medium"}]}})
    acompletion = litellm.acompletion

    async def slow(**kwargs):
        await asyncio.sleep(1.0)  # every call is in flight at once
        return await acompletion(**kwargs)

    monkeypatch.setattr(litellm, "acompletion", slow)

    async def run() -> list:
        return await asyncio.gather(*(pipeline.acompletion(
            model="gpt-5-mini", messages=[{"role": "user", "content": f"task {i}"}], mock_response="ok",
            context={"session_id": session}) for i in range(100)))

    levels = [next(d for d in reversed(outcome(r).plan.decisions) if d.policy == "reasoning" and d.action == "cap")
              .attributes["level"] for r in asyncio.run(run())]
    counts = {level: levels.count(level) for level in set(levels)}
    print(backend, counts)
    assert counts["medium"] < 20 and counts["none"] > 50 and len(counts) >= 3, counts
    assert sum(DEFAULT_BUDGETS[level] for level in levels) <= 100_000  # held at once, never past the budget
    assert pipeline.reasoning_spent.get(session, 0) == 0  # every hold released
