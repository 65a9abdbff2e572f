"""The commands behind ``router-middleware``: each takes its parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RouterMiddlewareError, did_you_mean
from ..urls import without_password
from .inputs import expand_paths, output_file, time_option
from .tables import print_budgets, print_report, replay_table, routed_table, unpriced

if TYPE_CHECKING:
    from ..replay import ReplayReport


def bundled_sessions() -> list[str]:
    folder = resources.files("router_middleware") / "data" / "sessions"
    return sorted(str(p) for p in folder.iterdir() if str(p).endswith(".json"))


def _warn(text: str) -> None:
    print(f"router-middleware: warning: {text}", file=sys.stderr)


def _run_replay(paths: list[str], config: str | None, model: str | None, provider_cache: bool, *,
                show_progress: bool, ledger: str | None = None, route: str | None = None) -> ReplayReport:
    """Replay ``paths``; with ``ledger`` the rows are written there (the ledger is opened first, so a
    bad path fails before any replaying)."""
    from ..ledger import LedgerRecord, open_ledger
    from ..pipeline import Pipeline
    from ..replay import load_session, replay

    db = open_ledger(ledger) if ledger else None
    try:
        pipeline = Pipeline.from_config(config or {})
        sessions = [load_session(p) for p in paths]
        rows: list[LedgerRecord] = []
        with _progress(show_progress, sum(len(s.calls) for s in sessions)) as advance:
            report = replay(sessions, pipeline, model=model, provider_cache=provider_cache,
                            ledger=rows.append if db else None, on_call=advance, route=route)
        if db is not None:
            db.insert(rows, replace=True)
            print(f"wrote {len(rows):,} rows to the ledger {without_password(db.url)} "
                  "(a call replayed again replaces its row)", file=sys.stderr)
    finally:
        if db is not None:
            db.close()
    for name, sessions_of in unpriced(report).items():
        _warn(f"no price for model {name!r} (sessions {', '.join(sessions_of)}): their costs show as unknown")
    for session in report.left_out():
        if session.recorded.partial:
            missing = session.recorded.without_usage
            _warn(f"{session.path}: call {missing[0]} has no usage ({len(missing)} of {session.calls} calls): "
                  "the session's recorded account is left out of the recorded total")
    if route is not None:  # replay routes by the config alone: no adapter serves a name of its own
        from ..assembly import unpriced_targets
        from ..catalog import close_names

        for alias, target in unpriced_targets(pipeline.config, pipeline.catalog):
            near = close_names(target, tuple(pipeline.config.routing.deployments))
            _warn(f"routing.aliases.{alias}: no price for {target!r} (a typo?): its routed calls' costs show as "
                  "unknown" + did_you_mean(near))
    return report


@contextmanager
def _progress(show: bool, total: int) -> Iterator[Callable[[], None] | None]:
    """A progress bar on stderr advanced once per replayed call (nothing when ``show`` is false)."""
    if not show:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(transient=True, console=Console(stderr=True)) as progress:
        task = progress.add_task("replaying", total=total)
        yield lambda: progress.advance(task)


def cmd_replay(args: argparse.Namespace) -> int:
    report = _run_replay(expand_paths(args.paths, ".json", "session files"), args.config, args.model,
                         not args.no_provider_cache, show_progress=not args.json and sys.stderr.isatty(),
                         ledger=args.ledger, route=args.route)
    if args.json:
        print(json.dumps(report.as_dict(), indent=None if args.compact else 2))
    else:
        config = f"the config {args.config}" if args.config else "the default config"
        print(replay_table(report, f"recorded vs baseline (no middleware) vs optimized ({config})", config))
        routed = report.routed()
        if routed is not None:
            print("\n" + routed_table(report.sessions, routed))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..ledger import build_report, open_ledger, render_html

    since, until = time_option("--since", args.since), time_option("--until", args.until)
    if since is not None and until is not None and since >= until:
        raise RouterMiddlewareError(f"--since {args.since} is not before --until {args.until}: no call can be in it")
    if args.top < 0:
        raise RouterMiddlewareError(f"--top {args.top}: expected how many sessions, tenants and users to list, "
                                    "0 or more")
    html = output_file("--html", args.html) if args.html else None
    db = open_ledger(args.ledger, create=False)
    try:
        report = build_report(db, since=since, until=until, top=args.top, app=args.app, tenant=args.tenant,
                              user=args.user)
    finally:
        db.close()
    if html is not None:
        html.write_text(render_html(report), encoding="utf-8")
        print(f"wrote the HTML report to {html.resolve()}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    elif html is None or sys.stdout.isatty():
        print_report(report)
    return 0


def cmd_budgets(args: argparse.Namespace) -> int:
    """Each budget of ``--config``: what its counter holds now for the labels given, its limit, what is
    left, and when its window starts over."""
    import time

    from ..bookkeeping.keys import BUDGET
    from ..config import load_config
    from ..routing.budgets import counter_key, scope_value
    from ..stores import in_process, open_store, sqlite_path
    from ..stores.sqlite import has_table
    from ..types import AgentContext

    config = load_config(args.config)
    if not config.routing.budgets:
        raise RouterMiddlewareError(f"{args.config}: the config has no routing.budgets")
    if in_process(config.store):
        raise RouterMiddlewareError(f"{args.config}: store {config.store!r} lives in the process that makes the calls; "
                                    "budgets are read from a shared store (sqlite:///..., redis://...)")
    context = AgentContext.coerce({"app": args.app or config.app, "tenant": args.tenant, "user": args.user,
                                   "session_id": args.session})
    where = without_password(config.store)
    if (path := sqlite_path(config.store)) is not None and not Path(path).is_file():
        raise RouterMiddlewareError(f"{args.config}: no store at {where}: no call has used it yet")
    if path is not None and not has_table(path, "kv"):  # opening it would add the store's tables
        raise RouterMiddlewareError(f"{args.config}: {path!r} is not a router-middleware store (no kv table): "
                                    "left as it is")
    store = open_store(config.store, timeout_s=max(config.store_timeout_s, 5.0))
    now = time.time()
    rows: list[dict[str, object]] = []
    try:
        for budget in config.routing.budgets:
            value = scope_value(budget, context)
            for unit, limit in (("usd", budget.usd), ("tokens", budget.tokens)):
                if limit is None:
                    continue
                row: dict[str, object] = {"budget": budget.name, "scope": budget.scope, "whose": value,
                                          "unit": unit, "limit": limit}
                if value is not None:
                    try:
                        raw = store.get(BUDGET + counter_key(budget, value, unit, now))
                    except Exception as exc:  # noqa: BLE001 - the store's own error, said in one line
                        raise RouterMiddlewareError(f"store {where}: {type(exc).__name__}: {exc}") from None
                    used = float(raw) if raw is not None else 0.0
                    row |= {"spent_or_held": used, "left": max(0.0, limit - used),
                            "resets_in_s": (budget.window_s - now % budget.window_s) if budget.window_s else None}
                rows.append(row)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print_budgets(rows)
    return 0


def cmd_ledger_drain(args: argparse.Namespace) -> int:
    from ..ledger import open_ledger
    from ..ledger.report import counted
    from ..ledger.spool import QUARANTINE, DatabaseUnavailable, Spool, default_spool
    from ..ledger.store import ledger_scheme

    ledger_scheme(args.ledger)  # one no ledger opens is said as report and replay say it, not "nothing to drain"
    url = args.ledger if "://" in args.ledger else f"sqlite:///{args.ledger}"
    folder = Path(args.spool) if args.spool else default_spool(url)
    if args.spool and not folder.is_dir():  # a folder named by hand that is not there: a typo, not "nothing"
        raise RouterMiddlewareError(f"--spool {args.spool}: no such folder")
    if not folder.is_dir():
        if url.startswith("sqlite:"):  # a ledger path with a typo is said, not "nothing to drain"
            open_ledger(url, create=False).close()
        print(f"nothing to drain: no spool folder at {folder}")
        return 0
    db = open_ledger(url)
    try:
        done = Spool(folder).drain(db)
    except DatabaseUnavailable as exc:
        raise RouterMiddlewareError(f"the ledger at {without_password(url)} does not answer ({exc}); "
                                    f"the rows stay in {folder}") from exc
    finally:
        db.close()
    print(f"{counted(done.written, 'row')} written from {folder} to the ledger"
          + (f" ({done.already:,} more it held already: each kept once)" if done.already else "")
          + f"; {counted(done.quarantined, 'line')} quarantined"
          + (f" (see {folder / QUARANTINE})" if done.quarantined else ""))
    for pid, rows in sorted(done.held.items()):
        print(f"{counted(rows, 'row')} left to process {pid}, which is still running (it drains them itself)")
    return 0


def _scorer(spec: str, weak: str, embeddings: bool = False) -> Callable[[str], float]:
    """``heuristic``, ``fitted`` or ``fitted:FILE`` as a text -> score function for route-eval."""
    from ..routing import score_text
    from ..routing.fitted import load_fitted

    kind, _, path = spec.partition(":")
    if kind == "heuristic" and not path:
        return score_text
    if kind != "fitted":
        raise RouterMiddlewareError(f"--scorer {spec!r}: expected heuristic, fitted or fitted:FILE")
    fitted = load_fitted(path or None, embeddings)
    if embeddings and not fitted.embedding_path:
        why = "it has no embedding term (refit with the semantic extra)" if fitted.embedding is None else \
            "the semantic extra is not installed"
        raise RouterMiddlewareError(f"--embeddings: cannot add the fitted file's embedding term: {why}")
    strength = fitted.strength_of(weak)
    if strength is None:
        _warn(f"the fitted file has no strength for {weak!r}: using the mean (the ranking, and so APGR and CPT, "
              "do not depend on it)")
        strength = fitted.mean_strength()
    return lambda text: 1.0 - fitted.p_good(fitted.difficulty(text), strength)


def cmd_route_eval(args: argparse.Namespace) -> int:
    from ..routing import load_examples, route_eval

    if args.embeddings and not args.scorer.startswith("fitted"):
        raise RouterMiddlewareError("--embeddings applies to --scorer fitted[:FILE] only")
    scorer = _scorer(args.scorer, args.weak, args.embeddings)
    result = route_eval(load_examples(expand_paths(args.files, ".csv", "CSV files"), args.weak, args.strong),
                        scorer)
    if result["weak_quality"] == result["strong_quality"]:
        _warn(f"{args.weak!r} and {args.strong!r} have the same mean score ({result['weak_quality']:.3f}): "
              "there is no gap to recover, so APGR and CPT are meaningless here")
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
    else:
        scored_by = args.scorer + (" + embeddings" if args.embeddings else "")
        print(f"{scored_by} scorer, {result['n']:,} prompts: APGR {result['apgr']:.3f} "
              f"(random {result['random_apgr']:.3f}), "
              f"CPT(50%) {result['cpt50']:.1%}, CPT(80%) {result['cpt80']:.1%} of calls to the strong model; "
              f"quality weak {result['weak_quality']:.3f}, strong {result['strong_quality']:.3f}")
    return 0


def cmd_fit_router(args: argparse.Namespace) -> int:
    from ..routing.fitted import embeddings_installed, local_embed
    from ..routing.fitting import fit_router, load_judgments

    if args.hold_out < 0 or args.hold_out == 1:
        raise RouterMiddlewareError(f"--hold-out {args.hold_out}: expected 0 (keep every prompt) or 2 or more "
                                    "(leave out the prompts whose CRC-32 is divisible by it; 1 leaves out all)")
    out = output_file("--out", args.out)
    sources = [[j for path in expand_paths([arg], ".csv", "CSV files") for j in load_judgments(path)]
               for arg in args.files]
    topics = not args.no_embeddings and embeddings_installed()
    fit = fit_router(sources, args.files, hold_out=args.hold_out, embed=local_embed if topics else None)
    data = {**fit.scorer.as_dict(), "fitted_on": fit.sources,
            "held_out": f"crc32(prompt) % {args.hold_out} == 0" if args.hold_out else None}
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
    strengths = ", ".join(f"{m} {s:.2f}" for m, s in sorted(fit.scorer.strength.items(), key=lambda kv: -kv[1]))
    how = ("with the embedding term" if fit.scorer.embedding is not None else
           "no embedding term (" + ("--no-embeddings" if args.no_embeddings else "the semantic extra is not installed")
           + ")")
    print(f"fitted on {fit.rows:,} prompts; wrote {out} (a {fit.scorer.a:.2f}, b {fit.scorer.b:.2f}; {how}); "
          f"strengths: {strengths}")
    return 0


NEXT_STEPS = """\
Next: replay your own sessions (format: docs/replay.md)
into a ledger, then open its report (router-middleware is in the venv's bin
folder: .venv/bin/router-middleware, unless the venv is activated):
  router-middleware replay my-sessions/ --config my.yaml --ledger ledger.db
  router-middleware report --ledger ledger.db --html report.html"""


def cmd_demo(args: argparse.Namespace) -> int:
    from ..config import load_config

    if args.config:
        load_config(args.config)  # a bad config is said before the banner
    print("router-middleware demo: bundled real coding-agent sessions, replayed offline\n"
          "(no API keys, no network).\n")
    report = _run_replay(bundled_sessions(), args.config, None, True, show_progress=sys.stderr.isatty())
    config = f"the config {args.config}" if args.config else "the default config"
    print(replay_table(report, f"recorded vs baseline (no middleware) vs optimized ({config})", config))
    sources = Path(str(resources.files("router_middleware") / "data" / "sessions" / "SOURCES.txt"))
    print(f"\nSources and licences of the sessions: {sources}\n\n{NEXT_STEPS}")
    return 0
