"""What the router hook adds to a request behind the real LiteLLM proxy, measured in one run.

    .venv/bin/python benchmarks/proxy_overhead.py [--repeat N]

Two proxies run side by side (tests/litellm_proxy.py starts each as a subprocess): one with
integrations/litellm-proxy's hook (``router.yaml``: an app label only) and one without, both in front
of the loopback server of ``overhead_http.py`` that replays real recorded OpenAI replies. A client
sends a Cline-like request (a 20-message agent history) to each in turn over a kept-alive
connection: plain, and streamed with ``stream_options.include_usage``. Medians of the client's
time per request, and their ratio.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]
from overhead import history  # noqa: E402
from overhead_http import USAGE, replay_server  # noqa: E402
from tests.litellm_proxy import proxy_missing, running_proxy  # noqa: E402

HEADERS = {"Authorization": "Bearer sk-proxy-master", "Content-Type": "application/json"}


def proxy_config(upstream: str, hook: bool, names: tuple[str, ...] = ("coder",)) -> str:
    """The proxy's config: each of ``names`` a ``model_name`` of gpt-4o-mini at ``upstream``."""
    lines = ["model_list:"]
    for name in names:
        lines += [f"  - model_name: {name}", "    litellm_params:", "      model: openai/gpt-4o-mini",
                  f"      api_base: {upstream}", "      api_key: sk-bench"]
    lines += ["litellm_settings:", "  num_retries: 0"]
    if hook:
        lines.append("  callbacks: router_hook.handler")
    return "\n".join([*lines, "general_settings:", "  master_key: os.environ/LITELLM_MASTER_KEY", ""])


def timed(connection: http.client.HTTPConnection, body: str) -> float:
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, HEADERS)
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"the proxy answered {response.status}: {data[:300]!r}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args(argv)
    missing = proxy_missing()
    if missing:
        print(missing)
        return 1
    with ExitStack() as stack:
        upstream = stack.enter_context(replay_server())
        connections = []
        for hook in (False, True):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            (folder / "router.yaml").write_text("app: bench\n")
            (folder / "config.yaml").write_text(proxy_config(upstream, hook))
            base = stack.enter_context(running_proxy(
                folder, {"ROUTER_MIDDLEWARE_CONFIG": str(folder / "router.yaml")}, folder / "config.yaml"))
            connections.append(http.client.HTTPConnection(base.removeprefix("http://"), timeout=60))
        print(f"proxy overhead benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} "
              f"cores, Python {platform.python_version()}, litellm {version('litellm')}, {args.repeat} requests "
              "to each proxy in turn, upstream a loopback server replaying recorded OpenAI replies\n")
        print("| 20 messages | proxy (ms) | proxy with the router hook (ms) | ratio |")
        print("|---|---|---|---|")
        ratios = []
        shapes: dict[str, dict[str, Any]] = {"plain": {}, "streamed, usage asked": {"stream": True,
                                                                                      "stream_options": USAGE}}
        for shape, extra in shapes.items():
            body = json.dumps({"model": "coder", "messages": history(20), **extra})
            times: list[list[float]] = [[], []]
            for i in range(args.repeat + 10):
                for which, connection in enumerate(connections):
                    elapsed = timed(connection, body)
                    if i >= 10:
                        times[which].append(elapsed)
                    time.sleep(0.01)  # the proxy's success logging of a request runs untimed
            bare, hooked = (statistics.median(t) for t in times)
            ratios.append((shape, hooked / bare))
            print(f"| {shape} | {bare * 1e3:.2f} | {hooked * 1e3:.2f} | {hooked / bare:.3f} |")
        print("\nsummary: hook/no hook median ratio " + ", ".join(f"{s} x{r:.3f}" for s, r in ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
