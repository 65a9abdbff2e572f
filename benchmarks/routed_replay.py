"""Routed replay of the shared agent sessions: what difficulty routing over two models costs, per
session and in total, beside each model alone, with the switches and the prompt cache they lose.

    PYTHONPATH=src .venv/bin/python benchmarks/routed_replay.py [--sessions DIR] [--config FILE]
        [--route ALIAS] [--limit N]

The same numbers as ``router-middleware replay DIR --config FILE --route ALIAS --json`` (its
``routed`` block), printed as a Markdown table for benchmarks/RESULTS.md. The first model of the
alias is "cheap", the last "strong".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from datetime import date
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from router_middleware import Pipeline  # noqa: E402
from router_middleware.replay import RoutedAccount, load_session, replay  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:.4f}"


def _row(label: str, routed: RoutedAccount) -> str:
    cheap, strong = routed.models[0], routed.models[-1]
    calls = " / ".join(f"{routed.calls.get(m, 0)}" for m in routed.models)
    return (f"| {label} | {calls} | {routed.switches} | {_money(routed.routed.cost)} | "
            f"{_money(routed.always[cheap].cost)} | {_money(routed.always[strong].cost)} | "
            f"{_money(routed.cache_lost_usd)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared = Path(os.environ.get("ROUTER_MIDDLEWARE_SHARED", ROOT.parent / "shared"))
    parser.add_argument("--sessions", default=str(shared / "data" / "agent-sessions"))
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "configs" / "auto.yaml"))
    parser.add_argument("--route", default="auto")
    parser.add_argument("--limit", type=int, default=0, help="replay only the first N sessions")
    args = parser.parse_args()
    paths = sorted(Path(args.sessions).glob("*.json"))[: args.limit or None]
    if not paths:
        print(f"no sessions in {args.sessions}", file=sys.stderr)
        return 2
    report = replay([load_session(p) for p in paths], Pipeline.from_config(args.config), route=args.route)
    total = report.routed()
    assert total is not None
    short = " / ".join(m.rsplit("/", 1)[-1] for m in total.models)
    print(f"routed replay, {date.today()}: {len(paths)} sessions, --config {Path(args.config).name} "
          f"--route {args.route}\n")
    print(f"| session | calls ({short}) | switches | routed | always cheap | always strong | cache lost |")
    print("|---|---|---|---|---|---|---|")
    for s in report.sessions:
        if s.routed is not None:
            print(_row(f"{s.id} ({s.model.rsplit('/', 1)[-1]})", s.routed))
    print(_row(f"total ({len(paths)} sessions)", total))
    switches = [s.routed.switches for s in report.sessions if s.routed is not None]
    cheap, strong = total.models[0], total.models[-1]
    print(f"\nsummary: routed {_money(total.routed.cost)} vs always cheap {_money(total.always[cheap].cost)} / "
          f"always strong {_money(total.always[strong].cost)}; {total.switches} switches "
          f"(median {statistics.median(switches)} per session), cache lost {_money(total.cache_lost_usd)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
