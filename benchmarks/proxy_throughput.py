"""Requests/s of the real LiteLLM proxy under concurrent clients, with and without the router hook.

    .venv/bin/python benchmarks/proxy_throughput.py [--clients 50,200] [--requests 1000]
        [--stream-requests 200] [--rounds 5] [--stores memory,redis] [--ledger] [--redis-url URL]

Proxies run side by side (tests/litellm_proxy.py starts each, one uvicorn worker: the proxy's
default), in front of the loopback server of ``overhead_http.py`` that replays real recorded OpenAI
replies with their headers (rate-limit headers among them): one without the hook, and one with
integrations/litellm-proxy's hook per store of its state (``memory://``, and a redis-server of its
own unless ``--redis-url``). The hook's config routes the alias ``coder`` (a ``model_name`` of
both proxies, as in integrations/) to two deployments, with a budget, limits on both deployments
(never reached) and cooldowns; with ``--ledger`` it also writes the usage ledger to SQLite, as
integrations/'s router.yaml does. The load comes from ``proxy_client.py``, a process of its own
(asyncio + aiohttp): ``--clients`` concurrent clients each send a Cline-like request (the
20-message history of ``overhead.py``) and the next one when its answer is read, ``--requests`` in
all, plain and streamed with ``stream_options.include_usage`` (as Cline asks). Each batch starts
once every client holds an open connection, and ends when the last answer is read and the proxy is
idle again (its CPU under 5% over 0.2 s), so work the proxy defers past its answers (litellm's
success logging, where the hook settles a call) is counted. The proxies alternate batch by batch,
round by round; the table gives each one's median requests/s, each hooked proxy's ratio to the
batch without the hook just before it (median, min-max), the proxy's CPU per request (less exposed
than the rate to what else runs on the machine) and the CPU share (cores) of the proxy, the client
and the upstream during the batches: a client well under one core is not what limits the rate.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
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
from proxy_client import cpu  # noqa: E402
from proxy_overhead import proxy_config  # noqa: E402
from tests.litellm_proxy import proxy_missing, running_proxy  # noqa: E402
from throughput import redis_server  # noqa: E402

DEPLOYMENTS = ("coder-a", "coder-b")
SHAPES: dict[str, dict[str, Any]] = {"plain": {}, "streamed, usage asked": {"stream": True, "stream_options": USAGE}}


def hook_config(store: str, ledger: Path | None = None) -> dict[str, Any]:
    """The hook's router config: ``coder`` routed to two deployments, a budget, limits, cooldowns;
    with ``ledger``, the usage ledger written to that SQLite file."""
    return {
        **({"ledger": {"url": f"sqlite:///{ledger}"}} if ledger else {}),
        "app": f"bench-{time.time_ns()}",
        "store": store,
        "routing": {
            "deployments": {name: {"model": "openai/gpt-4o-mini"} for name in DEPLOYMENTS},
            "aliases": {"coder": list(DEPLOYMENTS)},
            "budgets": [{"name": "team", "scope": "app", "usd": 1_000_000, "tokens": 10**12, "window_s": 3600}],
            "limits": {name: {"rpm": 10**7, "tpm": 10**11} for name in DEPLOYMENTS},
            "cooldown": {"failures": 3, "window_s": 60, "cooldown_s": 30},
        },
    }


def listener(base: str) -> int:
    """The process listening on ``base``'s loopback port (its socket's inode among its descriptors)."""
    port = int(base.split(":")[2].split("/")[0])
    with open("/proc/net/tcp") as table:
        inodes = {f"socket:[{row[9]}]" for row in (line.split() for line in list(table)[1:])
                  if row[1] == f"0100007F:{port:04X}" and row[3] == "0A"}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (entry / "fd").iterdir()):
                    return int(entry.name)
            except OSError:
                continue
    raise RuntimeError(f"no process listens on {base}")


def idle(pid: int, window: float = 0.2, share: float = 0.05) -> tuple[float, float]:
    """Wait until ``pid`` spends under ``share`` of a core over ``window`` seconds; the wall clock and
    its CPU seconds when that quiet window began."""
    while True:
        start, used = time.time(), cpu(pid)
        time.sleep(window)
        if cpu(pid) - used < share * window:
            return start, used


class Client:
    """``proxy_client.py`` in a process of its own; one batch a call."""

    def __init__(self, upstream_pid: int) -> None:
        self.upstream_pid = upstream_pid
        self.process = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "proxy_client.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def batch(self, base: str, pid: int, clients: int, requests: int, body: str) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"base": base, "pid": pid, "upstream_pid": self.upstream_pid,
                                             "clients": clients, "requests": requests, "body": body}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit("the client process ended")
        result: dict[str, Any] = json.loads(line)
        if result["failures"]:
            raise SystemExit(f"{result['failures']} of {requests} requests to {base} failed, first: "
                             f"{result['first_failure']}")
        answered = cpu(pid)
        quiet, used = idle(pid)
        seconds = result["seconds"] + max(0.0, quiet - result["end"])
        return {**result, "rate": requests / seconds, "seconds": seconds,
                "proxy_cpu": result["proxy_cpu"] + used - answered}

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="50,200", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=1000, help="plain requests per batch")
    parser.add_argument("--stream-requests", type=int, default=200,
                        help="streamed requests per batch (the proxy relays 196 chunks a stream: ~10x the CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--stores", default="memory,redis", help="the hook's state: memory, redis or both")
    parser.add_argument("--ledger", action="store_true", help="the hook also writes its usage ledger to SQLite")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    args = parser.parse_args(argv)
    missing = proxy_missing()
    if missing:
        print(missing)
        return 1
    stores = args.stores.split(",")
    with ExitStack() as stack:
        upstream = stack.enter_context(replay_server())
        redis = stack.enter_context(redis_server(args.redis_url)) if "redis" in stores else ""
        proxies: dict[str, tuple[str, int]] = {}
        for name, store in [("no hook", None), *((f"hook, {s}", redis if s == "redis" else "memory://")
                                                 for s in stores)]:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            (folder / "router.yaml").write_text(json.dumps(hook_config(store or "memory://",
                                                                       folder / "ledger.db" if args.ledger else None)))
            (folder / "config.yaml").write_text(proxy_config(upstream, store is not None, ("coder", *DEPLOYMENTS)))
            base = stack.enter_context(running_proxy(
                folder, {"ROUTER_MIDDLEWARE_CONFIG": str(folder / "router.yaml")}, folder / "config.yaml"))
            proxies[name] = base, listener(base)
        client = Client(listener(upstream))
        stack.callback(client.close)
        print(f"proxy throughput benchmark, {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} "
              f"cores, Python {platform.python_version()}, litellm {version('litellm')}, one proxy worker each, "
              + ("the hook writing its ledger to SQLite, " if args.ledger else "")
              + f"{args.requests} plain or {args.stream_requests} streamed requests a batch x {args.rounds} rounds, "
              "client: asyncio + aiohttp in a process of its own, upstream a loopback server replaying recorded "
              "OpenAI replies\n")
        print("| clients | shape | proxy | req/s | ratio to no hook, per round (median, min-max) "
              "| proxy CPU per request (ms) | CPU (cores): proxy, client, upstream |")
        print("|---|---|---|---|---|---|---|")
        summary = []
        for clients in (int(c) for c in args.clients.split(",")):
            for shape, extra in SHAPES.items():
                body = json.dumps({"model": "coder", "messages": history(20), **extra})
                requests = max(clients, args.stream_requests if extra else args.requests)  # one each at least
                for base, pid in proxies.values():  # warm-up
                    client.batch(base, pid, clients, clients, body)
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in proxies}
                for _ in range(args.rounds):
                    for name, (base, pid) in proxies.items():
                        runs[name].append(client.batch(base, pid, clients, requests, body))
                for name, done in runs.items():
                    ratios = [r["rate"] / b["rate"] for r, b in zip(done, runs["no hook"], strict=True)]
                    ratio = "" if name == "no hook" else \
                        f"x{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
                    cores = ", ".join(f"{statistics.median(r[key] / r['seconds'] for r in done):.2f}"
                                      for key in ("proxy_cpu", "client_cpu", "upstream_cpu"))
                    print(f"| {clients} | {shape} | {name} | {statistics.median(r['rate'] for r in done):,.0f} | "
                          f"{ratio} | {statistics.median(r['proxy_cpu'] / requests for r in done) * 1e3:.2f} | "
                          f"{cores} |", flush=True)
                    if name != "no hook":
                        summary.append(f"{clients} clients, {shape}, {name} x{statistics.median(ratios):.3f}")
        print("\nsummary: hook/no hook requests/s, median of per-round ratios: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
