"""A LangChain v1 agent (`create_agent`) with a tool, routed and trimmed by RouterAgentMiddleware.

    .venv/bin/python integrations/langchain/agent.py --offline   # replays two real OpenAI recordings
    OPENAI_API_KEY=... .venv/bin/python integrations/langchain/agent.py

The middleware plans each model call with the pipeline: the `agent` alias picks the cheaper model
for the request, the context policy keeps the long earlier conversation under the watermark (old
turns become one digest message), and the call's usage and cost are recorded on a span.
Offline, the model's two answers are the recordings in cassettes/ (a streamed tool call, then a
streamed reply), so the reply text is not about the weather.
"""

from __future__ import annotations

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


def build() -> tuple[object, list[object]]:
    pipeline = Pipeline.from_config(CONFIG)
    models = {m: RoutedChatModel(model=m, pipeline=Pipeline(), streaming=True)
              for m in ("gpt-4o-mini", "gpt-3.5-turbo")}
    agent = create_agent(models["gpt-3.5-turbo"], tools=[get_current_weather],
                         middleware=[RouterAgentMiddleware(pipeline, models=models, model="agent")])
    history: list[object] = []
    for i in range(30):
        history += [HumanMessage(f"Earlier question {i} about src/module_{i}.py " + "detail " * 60),
                    AIMessage(f"It defines helper_{i}. " + "more " * 60)]
    return agent, [*history, HumanMessage("What's the weather like in San Francisco?")]


def offline_cassette() -> str:
    import yaml

    first = yaml.safe_load((CASSETTES / "openai_chat_tools_streaming.yaml").read_text())["interactions"][0]
    second = yaml.safe_load((CASSETTES / "openai_chat_streaming.yaml").read_text())["interactions"][0]
    second["request"]["uri"] = first["request"]["uri"]  # recorded through a local proxy: same API
    path = Path(tempfile.mkdtemp()) / "agent.yaml"
    path.write_text(yaml.safe_dump({"interactions": [first, second], "version": 1}))
    return str(path)


def main(offline: bool) -> str:
    agent, messages = build()
    if offline:
        import os

        import vcr

        os.environ.setdefault("OPENAI_API_KEY", "sk-offline")
        with vcr.VCR(record_mode="none", decode_compressed_response=True).use_cassette(offline_cassette()):
            state = agent.invoke({"messages": messages})  # type: ignore[attr-defined]
    else:
        state = agent.invoke({"messages": messages})  # type: ignore[attr-defined]
    for message in state["messages"][len(messages):]:
        print(f"{type(message).__name__}: {message.content or message.tool_calls}")
    return str(state["messages"][-1].content)


if __name__ == "__main__":
    main(offline="--offline" in sys.argv)
