"""The ``router-middleware`` command (also ``python -m router_middleware``): ``demo`` on the bundled
sessions, ``replay`` recorded sessions, ``report`` from a ledger, ``ledger drain`` its spool,
``budgets`` what each budget has left, ``route-eval`` a difficulty scorer on a labelled CSV,
``fit-router`` fit one from judgments.
Errors print one line and exit with 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import RouterMiddlewareError
from .commands import (
    bundled_sessions,
    cmd_budgets,
    cmd_demo,
    cmd_fit_router,
    cmd_ledger_drain,
    cmd_replay,
    cmd_report,
    cmd_route_eval,
)

__all__ = ["build_parser", "bundled_sessions", "main"]

LEDGER_HELP = "a file path, sqlite:///path.db or postgresql://user@host/db"


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="router-middleware", description=(__doc__ or "").replace("``", ""))
    parser.add_argument("--version", action="version", version=f"router-middleware {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="replay the bundled example sessions and print a table")
    demo.add_argument("--config", help="YAML/JSON config for the optimized account (default: the default config)")
    demo.set_defaults(func=cmd_demo)
    rp = sub.add_parser("replay", help="replay recorded sessions offline and account tokens and cost")
    rp.add_argument("paths", nargs="+", help="session JSON files, folders or globs")
    rp.add_argument("--config", help="YAML/JSON config for the optimized account")
    rp.add_argument("--model", help="price sessions with this model (default: the session's own; "
                    "deepseek/deepseek-chat for one that recorded none)")
    rp.add_argument("--route", metavar="ALIAS",
                    help="also plan each call with this routing alias of --config as its model (auto: the "
                         "difficulty tiers) and price it on the model chosen, beside each model alone")
    rp.add_argument("--json", action="store_true", help="print one JSON object")
    rp.add_argument("--compact", action="store_true", help="with --json: one line")
    rp.add_argument("--no-provider-cache", action="store_true", help="account as if there were no prompt cache")
    rp.add_argument("--ledger", help=f"also write the replayed calls into this ledger ({LEDGER_HELP})")
    rp.set_defaults(func=cmd_replay)
    rep = sub.add_parser("report", help="rankings of tokens, cost and savings from a ledger")
    rep.add_argument("--ledger", required=True, help=LEDGER_HELP)
    rep.add_argument("--since", help="start (2026-11-28, 2026-11-28T12:00 UTC, or epoch seconds)")
    rep.add_argument("--until", help="end, exclusive")
    rep.add_argument("--top", type=int, default=10, help="sessions, tenants and users to list (the costliest)")
    for label in ("app", "tenant", "user"):
        rep.add_argument(f"--{label}", help=f"this {label}'s calls only")
    rep.add_argument("--json", action="store_true", help="print one JSON object")
    rep.add_argument("--html", help="write a self-contained HTML report with charts to this file")
    rep.set_defaults(func=cmd_report)
    bud = sub.add_parser("budgets", help="what each budget of a config has spent or holds, and what is left")
    bud.add_argument("--config", required=True, help="the YAML/JSON config (its store: sqlite:///... or redis://...)")
    for label, scope in (("app", "app (default: the config's)"), ("tenant", "tenant"), ("user", "user"),
                         ("session", "session")):
        bud.add_argument(f"--{label}", help=f"the {scope} whose counters to read")
    bud.add_argument("--json", action="store_true", help="print one JSON list")
    bud.set_defaults(func=cmd_budgets)
    led = sub.add_parser("ledger", help="ledger maintenance: 'ledger drain' writes the spooled rows")
    led_sub = led.add_subparsers(dest="action", required=True, metavar="ACTION")
    drain = led_sub.add_parser("drain", help="write the rows waiting in the spool (any process's) into the ledger")
    drain.add_argument("--ledger", required=True, help=LEDGER_HELP)
    drain.add_argument("--spool", help="the spool folder (default: <ledger file>.spool, see docs/ledger.md)")
    drain.set_defaults(func=cmd_ledger_drain)
    ev = sub.add_parser("route-eval", help="RouteLLM metrics (APGR, CPT) of the difficulty scorer on a CSV")
    ev.add_argument("files", nargs="+", help="CSV files, folders or globs with a 'prompt' column (concatenated)")
    ev.add_argument("--weak", required=True, help="column with the weak model's score (number or true/false)")
    ev.add_argument("--strong", required=True, help="column with the strong model's score")
    ev.add_argument("--scorer", default="heuristic",
                    help="heuristic (default), fitted (the bundled fit) or fitted:FILE (a fit-router file)")
    ev.add_argument("--embeddings", action="store_true",
                    help="add the fitted file's embedding term (needs the semantic extra; slower)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_route_eval)
    fit = sub.add_parser("fit-router", help="fit the difficulty scorer from judged prompts (CSV: prompt + a "
                         "score column per model)")
    fit.add_argument("files", nargs="+", help="CSV files, folders or globs; each argument weighs the same")
    fit.add_argument("--out", required=True, help="the JSON file to write (point routing.scorer.fitted at it)")
    fit.add_argument("--hold-out", type=int, default=0, metavar="N",
                     help="leave out the prompts whose CRC-32 is divisible by N (for a held-out check)")
    fit.add_argument("--no-embeddings", action="store_true",
                     help="fit the core path alone (the embedding term is fitted when the semantic extra is installed)")
    fit.set_defaults(func=cmd_fit_router)
    for command in (demo, rp, rep, bud, drain, ev, fit):
        command.set_defaults(parser=command)  # its own usage for an argument it does not take
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line's arguments; one its command does not take is that command's usage error
    (argparse gives the top level's), and so is ``--compact`` without ``--json``."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "compact", False) and not args.json:
        args.parser.error("--compact shapes the --json output: give --json too")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return int(args.func(args))
    except (RouterMiddlewareError, ValueError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the error text holds
        print(f"router-middleware: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of the output left (`| head`): as other command-line tools,
        _quiet_stdout()  # end quietly, with no traceback, and none when the interpreter flushes stdout
        return 1


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's last flush of what the closed pipe
    never took raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
