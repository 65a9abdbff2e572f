"""What the router hook's stream wrapper costs the LiteLLM proxy per stream, measured in one run.

    .venv/bin/python benchmarks/proxy_stream_hook.py [--chunks 1,200,500] [--repeat 41]

``RouterLogger`` defines ``async_post_call_streaming_iterator_hook`` (to settle a chat call before
the proxy ends its stream), and litellm's proxy then leaves its pass-through path for every chat
stream it serves (``ProxyLogging.async_post_call_streaming_iterator_hook``, litellm/proxy/utils.py,
1.110.2). This drives that method in-process with a real litellm ``Logging`` object over N
ready-made chunks, with one callback registered each time: a plain ``CustomLogger`` (the proxy's
fast path), ``RouterLogger`` (no call in flight: the wrapper only passes the chunks on), and a bare
pass-through override (what any such hook costs). Medians of the time to serve the whole stream.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import statistics
import time
from collections.abc import AsyncIterator
from importlib.metadata import version
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def _callbacks() -> dict[str, Any]:
    from litellm.integrations.custom_logger import CustomLogger

    from router_middleware import Pipeline
    from router_middleware.litellm import RouterLogger

    class Plain(CustomLogger):
        pass

    class PassThrough(CustomLogger):
        async def async_post_call_streaming_iterator_hook(self, user_api_key_dict: Any, response: Any,
                                                          request_data: Any) -> AsyncIterator[Any]:
            async for chunk in response:
                yield chunk

    return {"no stream hook (fast path)": Plain(), "RouterLogger": RouterLogger(Pipeline.from_config({}), proxy=True),
            "bare pass-through hook": PassThrough()}


async def _serve(callback: Any, n: int, repeat: int) -> float:
    import litellm
    from litellm.caching.caching import DualCache
    from litellm.litellm_core_utils.litellm_logging import Logging
    from litellm.proxy._types import UserAPIKeyAuth
    from litellm.proxy.utils import ProxyLogging
    from litellm.types.utils import Delta, ModelResponseStream, StreamingChoices

    litellm.callbacks = [callback]
    proxy = ProxyLogging(user_api_key_cache=DualCache())
    chunks = [ModelResponseStream(id="x", model="m", choices=[StreamingChoices(index=0, delta=Delta(content="tok "))])
              for _ in range(n)]
    times = []
    for _ in range(repeat):
        logging_obj = Logging(model="m", messages=[], stream=True, call_type="acompletion",
                              start_time=datetime.datetime.now(), litellm_call_id="z", function_id="f")

        async def stream() -> AsyncIterator[Any]:
            for chunk in chunks:
                yield chunk

        started = time.perf_counter()
        async for _ in proxy.async_post_call_streaming_iterator_hook(
                response=stream(), user_api_key_dict=UserAPIKeyAuth(),
                request_data={"litellm_call_id": "z", "litellm_logging_obj": logging_obj}):
            pass
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", default="1,200,500")
    parser.add_argument("--repeat", type=int, default=41)
    args = parser.parse_args()
    sizes = [int(n) for n in args.chunks.split(",")]
    callbacks = _callbacks()
    print(f"proxy stream hook benchmark, {datetime.date.today()}, {platform.machine()} {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, litellm {version('litellm')}, median of {args.repeat}\n")
    print("| chunks | " + " | ".join(f"{name} (ms)" for name in callbacks) + " |")
    print("|---" * (len(callbacks) + 1) + "|")
    for n in sizes:
        row = [await _serve(callback, n, args.repeat) * 1e3 for callback in callbacks.values()]
        print(f"| {n} | " + " | ".join(f"{t:.3f}" for t in row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
