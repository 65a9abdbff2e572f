"""What the adapters cost per step of a growing agent history: the LiteLLM proxy's hook, the
LangChain agent middleware, and ``RouterLogger`` on ``litellm.acompletion`` (see :func:`sdk_times`).

    .venv/bin/python benchmarks/adapters.py [--steps N] [--sizes 20,300]

Behind the proxy (a Cline-style agent), every request brings the whole history as JSON, one turn
longer than the last: the median time of ``RouterLogger.async_pre_call_hook`` (labels derived from
the conversation, validation, planning, admission), each request parsed from JSON (the parse not
timed); no provider is called, so this is the hook's part of a request only (the proxy's router
and the success event come after it). In a LangChain ``create_agent`` loop, the agent's state keeps
its message objects and appends a turn a step: the median time of
``RouterAgentMiddleware.wrap_model_call`` with a handler that answers at once (conversion,
validation, planning, the call's accounting). For each starting size, ``--steps`` steps of one
session, two messages a step, the first 20 not counted. A second table times the agent middleware
with the response cache on: for a model the cache does not take, for one at ``temperature=0`` (each
step a miss whose answer is stored), and for the same steps replayed (each a hit: no model called).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import structlog  # noqa: E402

import router_middleware as rm  # noqa: E402
from router_middleware.litellm import RouterLogger  # noqa: E402

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))  # calls never answered
sys.path.insert(0, str(Path(__file__).parent))
from overhead import history  # noqa: E402


def middleware_times(size: int, steps: int, *, cache: bool = False, temperature: float | None = None,
                     replay: bool = False) -> list[float]:
    """``cache``: the response cache on (memory store); ``temperature``: the agent's model's, 0 for a
    model the cache takes; ``replay``: time a second pass over the same steps (every call a hit)."""
    from langchain.agents.middleware import ModelRequest, ModelResponse
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage, HumanMessage, convert_to_messages
    from pydantic import Field

    from router_middleware.langchain import RouterAgentMiddleware

    class Model(GenericFakeChatModel):
        messages: Iterator[AIMessage | str] = Field(exclude=True)  # the fake's script, not a setting it sends
        temperature: float | None = None

    config = {} if cache else {"cache": {"enabled": False}}
    middleware = RouterAgentMiddleware(rm.Pipeline.from_config(config), model="gpt-4o-mini")
    answer = ModelResponse(result=[AIMessage("ok", usage_metadata={"input_tokens": 10, "output_tokens": 2,
                                                                   "total_tokens": 12})])
    model = Model(messages=iter(["unused"]), temperature=temperature)
    messages = convert_to_messages(history(size))
    steps_sent = []
    for step in range(steps + 20):
        messages = [*messages, AIMessage(f"step {step} done"), HumanMessage("go on")]
        steps_sent.append(messages)
    times, called = [], []

    def handler(request: ModelRequest) -> ModelResponse:
        called.append(1)
        return answer

    for timed in (False, True) if replay else (True,):
        called.clear()
        for step, sent in enumerate(steps_sent):
            start = time.perf_counter()
            middleware.wrap_model_call(ModelRequest(model=model, messages=sent, model_settings={}), handler)
            if timed and step >= 20:
                times.append(time.perf_counter() - start)
    if replay and called:  # the pass timed as hits must be hits
        raise SystemExit(f"{len(called)} of {len(steps_sent)} replayed steps were not answered from the cache")
    return times


async def hook_times(size: int, steps: int) -> list[float]:
    logger = RouterLogger(rm.Pipeline.from_config({}), proxy=True)
    grown = history(size)
    times = []
    for step in range(steps + 20):
        grown = [*grown, {"role": "assistant", "content": f"step {step} done"}, {"role": "user", "content": "go on"}]
        data = {"model": "gpt-4o-mini", "messages": json.loads(json.dumps(grown)), "litellm_call_id": f"c{size}-{step}"}
        start = time.perf_counter()
        await logger.async_pre_call_hook(None, None, data, "acompletion")
        if step >= 20:
            times.append(time.perf_counter() - start)
    return times


async def sdk_times(size: int, steps: int) -> list[float]:
    """``RouterLogger`` on ``litellm.acompletion``: its deployment hook (the call's lifecycle up to
    its attempt) and the success event (settlement, span, row) of each call, the agent resending its
    history's dicts plus a turn a step; litellm's own work around them is not timed."""
    import litellm

    logger = RouterLogger(rm.Pipeline.from_config({}))
    answer = litellm.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                mock_response="ok")
    grown = history(size)
    times = []
    for step in range(steps + 20):
        grown = [*grown, {"role": "assistant", "content": f"step {step} done"}, {"role": "user", "content": "go on"}]
        kwargs = {"model": "gpt-4o-mini", "messages": grown, "litellm_call_id": f"s{size}-{step}"}
        start = time.perf_counter()
        await logger.async_pre_call_deployment_hook(kwargs, "acompletion")
        await logger.async_log_success_event(kwargs, answer, None, None)
        if step >= 20:
            times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--sizes", default="20,300")
    args = parser.parse_args(argv)
    print(f"adapters benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, litellm {version('litellm')}, {args.steps} requests per size\n")
    print("| history at the start | proxy pre-call hook per request (ms) | agent middleware per step (ms) "
          "| litellm SDK hook and success event per call (ms) |")
    print("|---|---|---|---|")
    medians = []
    for size in (int(s) for s in args.sizes.split(",")):
        hook = statistics.median(asyncio.run(hook_times(size, args.steps)))
        agent = statistics.median(middleware_times(size, args.steps))
        sdk = statistics.median(asyncio.run(sdk_times(size, args.steps)))
        medians.append(f"{size} messages {hook * 1e3:.3f} / {agent * 1e3:.3f} / {sdk * 1e3:.3f} ms")
        print(f"| {size} messages | {hook * 1e3:.3f} | {agent * 1e3:.3f} | {sdk * 1e3:.3f} |")
    print("\n| history at the start | agent middleware, cache off (ms) | cache on, a model it does not take "
          "| cache on, temperature 0, misses stored | cache on, temperature 0, hits |")
    print("|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        runs = [middleware_times(size, args.steps), middleware_times(size, args.steps, cache=True),
                middleware_times(size, args.steps, cache=True, temperature=0),
                middleware_times(size, args.steps, cache=True, temperature=0, replay=True)]
        print(f"| {size} messages | " + " | ".join(f"{statistics.median(r) * 1e3:.3f}" for r in runs) + " |")
    print(f"\nsummary: proxy hook / agent middleware / SDK hook and event per step, {', '.join(medians)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
