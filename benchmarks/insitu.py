"""Where a concurrent call's CPU goes, in situ: bare litellm vs the pipeline, sampled by py-spy.

    pip install py-spy   # optional, not a dependency of the package
    .venv/bin/python benchmarks/insitu.py [--seconds 15] [--redis-url URL] [--py-spy PATH]

Each variant of `throughput.py` (bare litellm, the pipeline on memory and on Redis) runs in a process
of its own, in back-to-back batches of 1,000 concurrent calls after a warm-up and `gc.freeze()`.
py-spy samples it for ``--seconds`` with ``--gil``: a sample is the stack of the thread holding the
GIL, so the samples split the process's Python CPU between threads without counting a thread that
waits for the GIL. Each sample goes to one part: litellm (any litellm frame on the stack, on the event
loop or in litellm's worker threads, unless a router_middleware frame is deeper: litellm calling back
into the package is the package's), the package (a router_middleware frame, none of litellm's below
it), or the rest (asyncio's loop, logging, the benchmark). The collector's pauses land on whatever
frame allocated. Printed per variant: calls/s while sampled, and each part in milliseconds of CPU
per call (samples / rate / calls); then the package's part split by the lifecycle step that
encloses it. Machine noise moves calls/s by several percent between processes; the per-call parts
move less.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

sys.path.insert(0, str(Path(__file__).parent))
from throughput import batch, redis_server, variants  # noqa: E402  (also configures logging as it does)

RATE = 400  # samples per second
STEPS = (  # the package's own work, by the first frame on the stack (outermost first) whose name starts so
    ("Engine.make_call", "validation"), ("CallLifecycle._plan", "planning"), ("CallLifecycle._claims", "estimate"),
    ("CallLifecycle._admit", "admission"), ("Engine.launch", "launch and span"), ("Engine.request", "request"),
    ("CallLifecycle._succeeded", "outcome and settlement"), ("RedisStore.", "Redis client"),
    ("_Batch.", "Redis client"))


async def serve(name: str, redis_url: str, seconds: float) -> None:
    """Run ``name``'s batches for ``seconds`` after the warm-up; print "warm", then the calls/s."""
    call = variants(redis_url)[name]
    await batch(call, 200)
    gc.collect()
    gc.freeze()
    print("warm", flush=True)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await batch(call, 1000)
        done += 1000
    print(f"{done / (time.perf_counter() - start):.1f}", flush=True)


def part(stack: list[str]) -> str:
    """``litellm``, ``package`` or ``rest`` for one sampled stack (frames outermost first)."""
    package = [i for i, frame in enumerate(stack) if "(router_middleware/" in frame]
    litellm = [i for i, frame in enumerate(stack) if "(litellm/" in frame]
    if package and (not litellm or package[-1] > litellm[-1]):
        return "package"
    return "litellm" if litellm else "rest"


def step(stack: list[str]) -> str:
    """The lifecycle step (or the Redis client) whose frame encloses a sample of the package's."""
    for frame in stack:
        name = frame.split(" (")[0]
        label = next((label for prefix, label in STEPS if name.startswith(prefix)), None)
        if label is not None:
            return label
    return "drivers and the rest"


def sample(command: list[str], seconds: float, spy: str) -> tuple[float, collections.Counter[str],
                                                                  collections.Counter[str]]:
    """Run ``command`` and sample it for ``seconds``: its calls/s under sampling, its samples by part,
    and the package's by step. ``command`` prints "warm", then serves calls for longer than
    ``seconds`` and prints its calls/s (as :func:`serve` for ``seconds`` + 4 does)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    if child.stdout.readline().strip() != "warm":
        raise SystemExit(f"{' '.join(command)}: the benchmark process did not start")
    raw = Path(tempfile.mkdtemp(prefix="rm-insitu-")) / "samples.txt"
    subprocess.run([spy, "record", "--gil", "-r", str(RATE), "-d", str(int(seconds)), "-f", "raw", "-o", str(raw),
                    "--pid", str(child.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rate = float(child.stdout.readline())
    child.wait()
    parts: collections.Counter[str] = collections.Counter()
    steps: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        which = part(frames)
        parts[which] += int(count)
        if which == "package":
            steps[step(frames)] += int(count)
    shutil.rmtree(raw.parent, ignore_errors=True)
    return rate, parts, steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--py-spy", default=shutil.which("py-spy"))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(serve(args.serve, args.redis_url, args.seconds))
        return 0
    if not args.py_spy:
        raise SystemExit("no py-spy: pip install py-spy, or pass --py-spy PATH")
    print(f"in-situ CPU per call, 1,000 concurrent calls a batch, py-spy --gil at {RATE} Hz for {args.seconds:.0f} s "
          f"a variant, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores\n")
    print("| variant | calls/s | litellm (ms/call) | package (ms/call) | rest (ms/call) | package share |")
    print("|---|---|---|---|---|---|")
    splits = {}
    with redis_server(args.redis_url) as url:
        for name in ("bare litellm", "pipeline, memory store", "pipeline, redis store"):
            rate, parts, steps = sample([sys.executable, __file__, "--serve", name, "--redis-url", url,
                                         "--seconds", str(args.seconds + 4)], args.seconds, args.py_spy)
            calls = rate * args.seconds
            per = {key: parts[key] / RATE / calls * 1e3 for key in ("litellm", "package", "rest")}
            print(f"| {name} | {rate:,.0f} | {per['litellm']:.3f} | {per['package']:.3f} | {per['rest']:.3f} "
                  f"| {parts['package'] / max(1, sum(parts.values())):.1%} |")
            splits[name] = {label: n / RATE / calls * 1e3 for label, n in steps.items()}
    labels = list(dict.fromkeys(label for _, label in STEPS)) + ["drivers and the rest"]
    print("\n| the package's part (ms/call) | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name, split in splits.items():
        if name != "bare litellm":
            print(f"| {name} | " + " | ".join(f"{split.get(label, 0.0):.3f}" for label in labels) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
