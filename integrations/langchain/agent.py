"""A LangChain v1 agent (`create_agent`) with a tool, routed and trimmed by RouterAgentMiddleware.

    .venv/bin/python integrations/langchain/agent.py   # offline: replays two real OpenAI recordings
    OPENAI_API_KEY=... .venv/bin/python integrations/langchain/agent.py --live

The middleware plans each model call with the pipeline: the `agent` alias picks the cheaper model
for the request, the context policy keeps the long earlier conversation under the watermark (old
turns become one digest message), and the call's usage and cost are recorded on a span.
It prints the agent's messages, then what the middleware did on each model call (the model it
routed to, the model that answered, the decisions taken, tokens, cost and savings), read back from
the ledger it wrote. Offline, the model's two answers are the recordings in cassettes/ (a streamed
tool call, then a streamed reply recorded for another question, both from gpt-3.5-turbo where the
middleware routes to gpt-4o-mini), so the final reply is not about the weather.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

from router_middleware import Pipeline
from router_middleware.langchain import RoutedChatModel, RouterAgentMiddleware

CASSETTES = Path(__file__).resolve().parents[2] / "cassettes"
CONFIG = {
    "routing": {"aliases": {"agent": ["gpt-4o-mini", "gpt-3.5-turbo"]}, "strategy": {"agent": "price"}},
    "context": {"watermark_tokens": 2000, "window_keep": 0.3},
}


@tool
def get_current_weather(location: str) -> str:
    """Get the current weather in a given location."""
    return f"70 degrees and sunny in {location}"


def build(ledger: str) -> tuple[object, list[object], Pipeline]:
    pipeline = Pipeline.from_config({**CONFIG, "ledger": {"url": ledger}})
    models = {m: RoutedChatModel(model=m, pipeline=Pipeline(), streaming=True)
              for m in ("gpt-4o-mini", "gpt-3.5-turbo")}
    agent = create_agent(models["gpt-3.5-turbo"], tools=[get_current_weather],
                         middleware=[RouterAgentMiddleware(pipeline, models=models, model="agent")])
    history: list[object] = []
    for i in range(30):
        history += [HumanMessage(f"Earlier question {i} about src/module_{i}.py " + "detail " * 60),
                    AIMessage(f"It defines helper_{i}. " + "more " * 60)]
    return agent, [*history, HumanMessage("What's the weather like in San Francisco?")], pipeline


def offline_cassette() -> str:
    import yaml

    first = yaml.safe_load((CASSETTES / "openai_chat_tools_streaming.yaml").read_text())["interactions"][0]
    second = yaml.safe_load((CASSETTES / "openai_chat_streaming.yaml").read_text())["interactions"][0]
    second["request"]["uri"] = first["request"]["uri"]  # recorded through a local proxy: same API
    path = Path(tempfile.mkdtemp()) / "agent.yaml"
    path.write_text(yaml.safe_dump({"interactions": [first, second], "version": 1}))
    return str(path)


def report(ledger: str, routed: list[str], offline: bool) -> None:
    """What the middleware did on each model call, from its ledger rows; ``routed``: the model it
    routed each call to, in order (the ledger's ``model`` is the one the response named)."""
    from router_middleware.ledger import open_ledger

    db = open_ledger(ledger, create=False)
    rows = db.query("SELECT requested_model, model, decisions, input_tokens, cached_tokens, output_tokens, "
                    "cost_usd, saved_context_usd FROM calls ORDER BY ts")
    db.close()
    print(f"\nWhat the middleware did ({len(rows)} model calls):")
    for i, (requested, model, decisions, tokens, cached, output, cost, saved) in enumerate(rows, 1):
        cost_text = "unknown" if cost is None else f"${cost:.6f}"
        to = routed[i - 1] if i <= len(routed) else "?"
        answer = f" (the recording's answer came from {model})" if offline else f", answered by {model}"
        print(f"  call {i}: {requested!r} routed to {to}{answer}; "
              f"decisions {', '.join(json.loads(decisions)) or 'none'}; "
              f"{tokens:,} input tokens ({cached:,} cached), {output:,} output; cost {cost_text}, "
              f"trimming saved ${saved:.6f}")


def main(offline: bool) -> str:
    ledger = f"sqlite:///{tempfile.mkdtemp()}/agent-ledger.db"
    agent, messages, pipeline = build(ledger)
    if offline:
        import os

        import vcr

        os.environ.setdefault("OPENAI_API_KEY", "sk-offline")
        with vcr.VCR(record_mode="none", decode_compressed_response=True).use_cassette(offline_cassette()):
            state = agent.invoke({"messages": messages})  # type: ignore[attr-defined]
    else:
        state = agent.invoke({"messages": messages})  # type: ignore[attr-defined]
    routed = []  # the model the middleware routed each call to: the one whose RoutedChatModel ran it
    for message in state["messages"][len(messages):]:
        print(f"{type(message).__name__}: {message.content or message.tool_calls}")
        if isinstance(message, AIMessage):
            routed.append(message.response_metadata.get("routed_model", "?"))
    pipeline.close()  # flushes the ledger
    report(ledger, routed, offline)
    if offline:
        print("\nOffline: both answers are real recordings replayed from cassettes/ (made with gpt-3.5-turbo, "
              "whatever model the request names), the second one made for another question, so the final reply "
              "is unrelated to the weather question. The model that answered and the second call's token "
              "counts are the recordings' (the first recording's stream reported no usage: its tokens are "
              "estimated), so the costs are gpt-3.5-turbo's prices; the routing and trimming decisions above "
              "are the middleware's own work on this run.")
    return str(state["messages"][-1].content)


if __name__ == "__main__":
    main(offline="--live" not in sys.argv)  # offline by default, as chain.py (--offline is still taken)
