"""Context trimming on real sessions: our policies beside the peers' trimmers, in one run.

Replays ../shared/data/agent-sessions (and chat-sessions) through `router_middleware.replay` with
each strategy wrapped as a policy, and prints one table: input tokens and cost (with and without the
provider's prompt cache) relative to the untrimmed baseline, retention, integrity violations.

    .venv/bin/python benchmarks/context.py [--sessions DIR] [--chats DIR] [--limit N] [--steps N]

Peers: LangChain `trim_messages` (strategy "last", include_system, start_on "human"), LangChain v1's
ContextEditingMiddleware logic (ClearToolUsesEdit; extra `langchain`), litellm's `trim_messages`, and a
naive window keeping the system prompt, the task and the last N messages.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from router_middleware import Decision, Pipeline, Plan, PolicyState  # noqa: E402
from router_middleware.context import ClearToolOutputs, MiddleOut, Window  # noqa: E402
from router_middleware.replay import load_session, replay  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ROUTER_MIDDLEWARE_SHARED", ROOT.parent / "shared")) / "data"


@dataclass(frozen=True)
class Wrapped:
    """Any message-list trimmer as a policy."""

    name: str
    trim: Callable[[list[dict[str, Any]], str], list[dict[str, Any]]]

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        messages = [dict(m) for m in plan.messages]
        try:
            trimmed = self.trim(messages, plan.model)
        except Exception as exc:  # a peer that crashes sends the history untouched, and we count it
            return plan.decide(Decision(self.name, "error", repr(exc)[:200]))
        if trimmed == messages:
            return plan
        return plan.decide(Decision(self.name, "trim", "peer"), messages=trimmed)


def langchain_last(budget: int) -> Wrapped:
    from langchain_core.messages import convert_to_messages, convert_to_openai_messages, trim_messages

    from router_middleware.tokens import TokenCounter

    def trim(messages: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        counter = TokenCounter(model)

        def count(lc_messages: Sequence[Any]) -> int:
            return counter.messages(convert_to_openai_messages(list(lc_messages)))

        kept = trim_messages(convert_to_messages(messages), max_tokens=budget, strategy="last",
                             token_counter=count, include_system=True, start_on="human", allow_partial=False)
        return [dict(m) for m in convert_to_openai_messages(kept)]

    return Wrapped("langchain-trim-last", trim)


def langchain_context_editing(trigger: int, keep: int = 3) -> Wrapped:
    """LangChain v1's ContextEditingMiddleware logic: its ClearToolUsesEdit (past ``trigger`` tokens,
    tool results older than the last ``keep`` become a placeholder), applied to each request as the
    middleware does before every model call. Tokens are counted with our counter, as for trim_messages."""
    from langchain.agents.middleware.context_editing import ClearToolUsesEdit
    from langchain_core.messages import convert_to_messages, convert_to_openai_messages

    from router_middleware.tokens import TokenCounter

    edit = ClearToolUsesEdit(trigger=trigger, keep=keep)

    def trim(messages: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        counter = TokenCounter(model)
        edited = convert_to_messages(messages)
        edit.apply(edited, count_tokens=lambda ms: counter.messages(convert_to_openai_messages(list(ms))))
        return [dict(m) for m in convert_to_openai_messages(edited)]

    return Wrapped(f"langchain-context-editing-{trigger}", trim)


def litellm_trim(budget: int) -> Wrapped:
    """litellm's trimmer, with its token counter swapped for a per-message cached one.

    Unpatched, it recounts the whole history for every message it considers (quadratic): one replay
    of the 22 sessions did not finish in 10 minutes. The swap changes its speed, not its decisions
    beyond tokenizer differences."""
    import litellm

    from router_middleware.tokens import TokenCounter

    counters: dict[str, TokenCounter] = {}

    def cached_counter(model: str = "", messages: Any = None, text: Any = None, **_: Any) -> int:
        counter = counters.setdefault(model, TokenCounter(model or "gpt-4o"))
        if messages is not None:
            return counter.messages(messages)
        return counter.message({"role": "user", "content": text or ""})

    def trim(messages: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        original = litellm.utils.token_counter
        litellm.utils.token_counter = cached_counter
        try:
            result = litellm.utils.trim_messages(messages, model=model, max_tokens=budget)
        finally:
            litellm.utils.token_counter = original
        return list(result[0] if isinstance(result, tuple) else result)

    return Wrapped("litellm-trim", trim)


def naive_last(n: int) -> Wrapped:
    def trim(messages: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
        if len(messages) <= n + 2:
            return messages
        return [*messages[:2], *messages[-n:]]

    return Wrapped(f"last-{n}", trim)


def context_editing_rows(sessions: list[Any], budget: int) -> list[dict[str, Any]]:
    """LangChain's context editing at its default trigger (100k) and at our watermark; absent if
    langchain (extra ``langchain``) is not installed."""
    try:
        import langchain.agents.middleware.context_editing  # noqa: F401
    except ImportError:
        print("langchain not installed: the context-editing peer is left out", file=sys.stderr)
        return []
    return [row(f"langchain ContextEditingMiddleware (clear tool uses, trigger {trigger // 1000}k, keep 3)",
                sessions, Pipeline(policies=[langchain_context_editing(trigger)])) for trigger in (100_000, budget)]


def row(name: str, sessions: list[Any], pipeline: Pipeline) -> dict[str, Any]:
    cached = replay(sessions, pipeline).totals()
    uncached = replay(sessions, pipeline, provider_cache=False).totals()
    base, opt = cached["baseline"], cached["optimized"]
    base_nc, opt_nc = uncached["baseline"], uncached["optimized"]
    return {
        "strategy": name,
        "tokens": opt["input_tokens"] / base["input_tokens"],
        "cost": opt["cost_usd"] / base["cost_usd"],
        "cost_no_cache": opt_nc["cost_usd"] / base_nc["cost_usd"],
        "retention": cached["retention"],
        "integrity": cached["integrity_violations"],
        "max_request": opt["max_request_tokens"],
    }


def table(title: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"### {title}", "", "| strategy | input tokens | cost (provider cache) | cost (no cache) | retention "
             "| integrity violations | largest request |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | x{r['tokens']:.3f} | x{r['cost']:.3f} | x{r['cost_no_cache']:.3f} | "
                     f"{r['retention']:.4f} | {r['integrity']} | {r['max_request']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", default=str(SHARED / "agent-sessions"))
    parser.add_argument("--chats", default=str(SHARED / "chat-sessions"))
    parser.add_argument("--limit", type=int, default=0, help="only the first N sessions of each set (smoke run)")
    parser.add_argument("--steps", type=int, default=0, help="only the first N calls of each session (smoke run)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    agents = [load_session(p) for p in sorted(Path(args.sessions).glob("*.json"))]
    chats = [load_session(p) for p in sorted(Path(args.chats).glob("*.json"))]
    if args.limit:
        agents, chats = agents[: args.limit], chats[: args.limit]
    if args.steps:
        agents, chats = ([replace(s, calls=s.calls[: args.steps]) for s in group] for group in (agents, chats))
    agent_budget, chat_budget = 16000, 4000
    agent_rows = [
        row("router-middleware default (watermark 16k, cost-aware)", agents, Pipeline.from_config({})),
        row("ours: clear tool outputs only (keep 4)", agents, Pipeline(policies=[ClearToolOutputs()])),
        row("ours: window only, no payback check", agents,
            Pipeline(policies=[Window(watermark_tokens=agent_budget, max_payback_calls=None)])),
        row("ours: middle-out to 16k", agents, Pipeline(policies=[MiddleOut(budget_tokens=agent_budget)])),
        row("langchain trim_messages last 16k", agents, Pipeline(policies=[langchain_last(agent_budget)])),
        row("litellm trim_messages 16k", agents, Pipeline(policies=[litellm_trim(agent_budget)])),
        *context_editing_rows(agents, agent_budget),
        row("naive last-20 messages", agents, Pipeline(policies=[naive_last(20)])),
    ]
    chat_rows = [
        row("router-middleware (budget 4k)", chats, Pipeline.from_config({"context": {"budget_tokens": chat_budget}})),
        row("ours: middle-out to 4k", chats, Pipeline(policies=[MiddleOut(budget_tokens=chat_budget)])),
        row("langchain trim_messages last 4k", chats, Pipeline(policies=[langchain_last(chat_budget)])),
        row("litellm trim_messages 4k", chats, Pipeline(policies=[litellm_trim(chat_budget)])),
        row("naive last-40 messages", chats, Pipeline(policies=[naive_last(40)])),
    ]
    print(f"context benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, {len(agents)} agent sessions, {len(chats)} chats\n")
    print(table("Agent sessions (ratios vs the untrimmed baseline, priced with the recorded models)", agent_rows))
    print()
    print(table("Chat sessions (deepseek/deepseek-chat prices)", chat_rows))
    ours, best_peer = agent_rows[0], min(agent_rows[4:], key=lambda r: r["cost"])
    print(f"\nsummary: ours tokens x{ours['tokens']:.3f} cost x{ours['cost']:.3f} retention {ours['retention']:.3f}"
          f" | cheapest peer ({best_peer['strategy']}) tokens x{best_peer['tokens']:.3f} cost x{best_peer['cost']:.3f}"
          f" retention {best_peer['retention']:.3f} integrity {best_peer['integrity']}"
          f" | {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
