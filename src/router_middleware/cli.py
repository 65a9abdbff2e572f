"""The ``router-middleware`` command: ``replay`` recorded sessions, ``report`` from a ledger,
``ledger drain`` its spool, ``route-eval`` the difficulty scorer on a labelled CSV, ``demo`` on the
bundled sessions."""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .errors import RouterMiddlewareError


def _session_paths(patterns: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            paths.extend(sorted(str(p) for p in path.glob("*.json")))
        elif any(ch in pattern for ch in "*?["):
            paths.extend(sorted(glob.glob(pattern)))
        else:
            paths.append(pattern)
    if not paths:
        raise RouterMiddlewareError(f"no session files matched {list(patterns)}")
    return paths


def bundled_sessions() -> list[str]:
    folder = resources.files("router_middleware") / "data" / "sessions"
    return sorted(str(p) for p in folder.iterdir() if str(p).endswith(".json"))


def _run_replay(paths: list[str], config: str | None, model: str | None, provider_cache: bool, *,
                show_progress: bool, ledger: str | None = None) -> object:
    from rich.progress import Progress

    from .ledger import LedgerRecord, open_ledger
    from .pipeline import Pipeline
    from .replay import load_session, replay

    pipeline = Pipeline.from_config(config or {})
    sessions = [load_session(p) for p in paths]
    total_calls = sum(len(s.calls) for s in sessions)
    rows: list[LedgerRecord] = []
    sink = rows.append if ledger else None
    if not show_progress:
        report = replay(sessions, pipeline, model=model, provider_cache=provider_cache, ledger=sink)
    else:
        with Progress(transient=True, console=_console(stderr=True)) as progress:
            task = progress.add_task("replaying", total=total_calls)
            report = replay(sessions, pipeline, model=model, provider_cache=provider_cache, ledger=sink,
                            on_session=lambda r: progress.advance(task, r.calls))
    if ledger:
        db = open_ledger(ledger)
        db.insert(rows)
        db.close()
    return report


def _console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(stderr=stderr)


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.4f}"


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _print_table(report: object, title: str) -> None:
    from rich.table import Table

    from .replay import ReplayReport

    assert isinstance(report, ReplayReport)
    table = Table(title=title)
    for name in ("session", "calls", "account", "input tokens", "cached", "cost", "vs baseline"):
        table.add_column(name, justify="left" if name in ("session", "account") else "right",
                         overflow="fold")

    def add_rows(label: str, calls: int, accounts: dict[str, tuple[int, int, float] | None], end: bool) -> None:
        base_cost = (accounts["baseline"] or (0, 0, 0.0))[2]
        for i, (name, values) in enumerate(accounts.items()):
            if values is None:
                continue
            tokens, cached, cost = values
            ratio = f"x{cost / base_cost:.3f}" if base_cost and name != "baseline" else ""
            table.add_row(label if i == 0 else "", str(calls) if i == 0 else "", name, f"{tokens:,}",
                          _share(cached, tokens), _money(cost), ratio, end_section=end and name == "optimized")

    for s in report.sessions:
        add_rows(s.id, s.calls, {
            "recorded": (s.recorded.input_tokens, s.recorded.cached_tokens, s.recorded.reported_cost_usd)
            if s.recorded.has_usage else None,
            "baseline": (s.baseline.input_tokens, s.baseline.cached_tokens, s.baseline.cost_usd),
            "optimized": (s.optimized.input_tokens, s.optimized.cached_tokens, s.optimized.cost_usd),
        }, end=True)
    totals = report.totals()
    accounts: dict[str, tuple[int, int, float] | None] = {}
    for name in ("recorded", "baseline", "optimized"):
        account = totals[name]
        assert isinstance(account, dict)
        accounts[name] = (int(account["input_tokens"]), int(account["cached_tokens"]), float(account["cost_usd"]))
    if not any(s.recorded.has_usage for s in report.sessions):
        accounts["recorded"] = None
    add_rows("total", int(str(totals["calls"])), accounts, end=False)
    console = _console()
    console.print(table)
    console.print(f"integrity violations: {totals['integrity_violations']}, retention: {totals['retention']:.3f}")


def cmd_replay(args: argparse.Namespace) -> int:
    report = _run_replay(_session_paths(args.paths), args.config, args.model, not args.no_provider_cache,
                         show_progress=not args.json and sys.stderr.isatty(), ledger=args.ledger)
    if args.json:
        from .replay import ReplayReport

        assert isinstance(report, ReplayReport)
        print(json.dumps(report.as_dict(), indent=None if args.compact else 2))
    else:
        _print_table(report, "replay: recorded vs baseline (pass-through) vs optimized (your config)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .ledger import build_report, open_ledger, parse_time, render_html

    db = open_ledger(args.ledger)
    try:
        report = build_report(db, since=parse_time(args.since), until=parse_time(args.until), top=args.top)
    finally:
        db.close()
    if args.html:
        Path(args.html).write_text(render_html(report), encoding="utf-8")
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif not args.html or sys.stdout.isatty():
        _print_report(report)
    return 0


def _print_report(report: dict[str, object]) -> None:
    from rich.table import Table

    console = _console()
    totals = report["totals"]
    assert isinstance(totals, dict)
    console.print(f"[bold]{totals['calls']:,} calls[/bold], cost ${totals['cost_usd']:,.4f} "
                  f"(${totals['baseline_cost_usd'] or 0:,.4f} without the middleware), "
                  f"response-cache hit rate {report['cache_hit_rate']:.1%}")
    for group in ("model", "provider", "app", "session"):
        rows = report[f"by_{group}"]
        assert isinstance(rows, list)
        table = Table(title=f"by {group}")
        for column in (group, "calls", "input", "cached", "output", "reasoning", "cost", "baseline"):
            table.add_column(column, justify="left" if column == group else "right", overflow="fold")
        for r in rows:
            table.add_row(str(r["key"] or "-"), f"{r['calls']:,}", f"{r['input_tokens']:,}",
                          f"{r['cached_tokens']:,}", f"{r['output_tokens']:,}", f"{r['reasoning_tokens']:,}",
                          _money(r["cost_usd"]), _money(r["baseline_cost_usd"]))
        console.print(table)
    for title in ("token_mix", "savings_by_policy"):
        data = report[title]
        assert isinstance(data, dict)
        table = Table(title=title.replace("_", " "))
        table.add_column("part")
        table.add_column("value", justify="right")
        for key, value in data.items():
            table.add_row(key, _money(value) if title.startswith("savings") else f"{value:,}")
        console.print(table)


def cmd_ledger_drain(args: argparse.Namespace) -> int:
    from .ledger import open_ledger
    from .ledger.spool import QUARANTINE, DatabaseUnavailable, Spool, default_spool

    url = args.ledger if "://" in args.ledger else f"sqlite:///{args.ledger}"
    folder = Path(args.spool) if args.spool else default_spool(url)
    if not folder.is_dir():
        print(f"nothing to drain: no spool folder at {folder}")
        return 0
    db = open_ledger(url)
    try:
        done = Spool(folder).drain(db)
    except DatabaseUnavailable as exc:
        raise RouterMiddlewareError(f"the ledger at {url} does not answer ({exc}); the rows stay in {folder}") from exc
    finally:
        db.close()
    print(f"{done.written:,} rows written from {folder} to the ledger; {done.quarantined:,} lines quarantined"
          + (f" (see {folder / QUARANTINE})" if done.quarantined else ""))
    for pid, rows in sorted(done.held.items()):
        print(f"{rows:,} rows left to process {pid}, which is still running (it drains them itself)")
    return 0


def cmd_route_eval(args: argparse.Namespace) -> int:
    from .routing import load_examples, route_eval, score_text

    result = route_eval(load_examples(args.files, args.weak, args.strong), score_text)
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    else:
        _console().print(
            f"{result['n']:,} prompts: APGR {result['apgr']:.3f} (random {result['random_apgr']:.3f}), "
            f"CPT(50%) {result['cpt50']:.1%}, CPT(80%) {result['cpt80']:.1%} of calls to the strong model; "
            f"quality weak {result['weak_quality']:.3f}, strong {result['strong_quality']:.3f}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    console = _console()
    console.print("[bold]router-middleware demo[/bold]: replaying bundled real coding-agent sessions offline "
                  "(no API keys, no network).")
    report = _run_replay(bundled_sessions(), args.config, None, True, show_progress=True)
    _print_table(report, "bundled sessions: recorded vs baseline vs default config")
    console.print("Sources and licences: router_middleware/data/sessions/SOURCES.txt")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="router-middleware", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="replay recorded sessions offline and account tokens and cost")
    rp.add_argument("paths", nargs="+", help="session JSON files, folders or globs")
    rp.add_argument("--config", help="YAML/JSON config for the optimized account")
    rp.add_argument("--model", help="price sessions with this model (default: the session's own)")
    rp.add_argument("--json", action="store_true", help="print one JSON object")
    rp.add_argument("--compact", action="store_true", help="with --json: one line")
    rp.add_argument("--no-provider-cache", action="store_true", help="account as if there were no prompt cache")
    rp.add_argument("--ledger", help="also write the replayed calls into this ledger (sqlite path or URL)")
    rp.set_defaults(func=cmd_replay)
    rep = sub.add_parser("report", help="rankings of tokens, cost and savings from a ledger")
    rep.add_argument("--ledger", required=True, help="sqlite:///path.db, a file path, or postgresql://...")
    rep.add_argument("--since", help="start (2026-11-28, 2026-11-28T12:00 UTC, or epoch seconds)")
    rep.add_argument("--until", help="end, exclusive")
    rep.add_argument("--top", type=int, default=10, help="sessions to list (by cost)")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--html", help="write a self-contained HTML report with charts to this file")
    rep.set_defaults(func=cmd_report)
    led = sub.add_parser("ledger", help="ledger maintenance")
    led_sub = led.add_subparsers(dest="action", required=True)
    drain = led_sub.add_parser("drain", help="write the rows waiting in the spool (any process's) into the ledger")
    drain.add_argument("--ledger", required=True, help="sqlite:///path.db, a file path, or postgresql://...")
    drain.add_argument("--spool", help="the spool folder (default: the ledger's, see README)")
    drain.set_defaults(func=cmd_ledger_drain)
    ev = sub.add_parser("route-eval", help="RouteLLM metrics (APGR, CPT) of the difficulty scorer on a CSV")
    ev.add_argument("files", nargs="+", help="CSV files with a 'prompt' column (concatenated)")
    ev.add_argument("--weak", required=True, help="column with the weak model's score (number or true/false)")
    ev.add_argument("--strong", required=True, help="column with the strong model's score")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_route_eval)
    demo = sub.add_parser("demo", help="replay the bundled example sessions and print a table")
    demo.add_argument("--config", help="YAML/JSON config for the optimized account")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (RouterMiddlewareError, ValueError) as exc:
        print(f"router-middleware: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
