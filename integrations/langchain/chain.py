"""A LangChain chain (prompt | model | parser) whose model calls go through router-middleware.

    .venv/bin/python integrations/langchain/chain.py            # offline: litellm's mock_response answers
    OPENAI_API_KEY=... .venv/bin/python integrations/langchain/chain.py --live

The model is the alias `writer` from the config below (cheapest of two models for each request);
the callback handler also accounts the run, as it would for any other chat model in the chain.
"""

from __future__ import annotations

import sys

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from router_middleware import Pipeline
from router_middleware.langchain import RoutedChatModel, RouterCallbackHandler

CONFIG = {
    "app": "docs-chain",
    "routing": {"aliases": {"writer": ["gpt-4o-mini", "gpt-4.1-mini"]}, "strategy": {"writer": "price"}},
}


def main(live: bool) -> str:
    pipeline = Pipeline.from_config(CONFIG)
    extra = {} if live else {"model_kwargs": {"mock_response": "Caching the stable prefix makes long chats cheap."}}
    model = RoutedChatModel(model="writer", pipeline=pipeline, temperature=0, **extra)
    prompt = ChatPromptTemplate.from_messages([("system", "Answer in one sentence."), ("user", "{question}")])
    chain = prompt | model | StrOutputParser()
    handler = RouterCallbackHandler(pipeline)
    answer = chain.invoke({"question": "Why does prompt caching matter for agents?"},
                          config={"callbacks": [handler], "metadata": {"thread_id": "demo"}})  # the session
    seen = handler.outcomes[-1]
    print(answer)
    print(f"model={seen.model} input_tokens={seen.usage.input_tokens} output_tokens={seen.usage.output_tokens} "
          f"cost_usd={seen.cost.total_usd:.8f}")
    pipeline.close()
    return answer


if __name__ == "__main__":
    main(live="--live" in sys.argv)
