"""What the commands print: the replay table as plain text that stays readable at 80 columns (in a
pipe or CI log as in a terminal), and the ledger report."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..ledger.report import counted
from ..replay import ReplayReport, SessionReport
from ..replay.accounts import Account, Recorded
from ..replay.routed import RoutedAccount

if TYPE_CHECKING:
    from rich.console import Console, ConsoleOptions
    from rich.measure import Measurement
    from rich.text import Text

WIDTHS = (22, 9, 11, 6, 10, 11)  # label, account, input tokens, cached, cost, vs baseline
HEADER = ("session / model", "account", "input tok", "cached", "cost", "vs baseline")
LEGEND = ("baseline: the recorded requests sent unchanged; optimized: the same requests through {config}. "
          "Both are priced from the catalog with a simulated prompt cache; recorded is what the provider "
          "reported (it can exceed the baseline when the provider's cache hit less often than the "
          "simulation: compare the cached column). retention: the share of what each next reply used "
          "that the optimized request still held.")


def money(value: float | None) -> str:
    """Four decimals; a smaller amount than that shows its own digits (a cheap call is not $0.0000)."""
    if value is None:
        return "unknown"
    if value == 0 or abs(value) >= 0.0001 or not math.isfinite(value):
        return f"${value:,.4f}"
    return f"${value:.{min(12, 1 - math.floor(math.log10(abs(value))))}f}"  # two significant digits


def _line(cells: tuple[str, ...]) -> str:
    first, *rest = cells
    return f"{first:<{WIDTHS[0]}}  {rest[0]:<{WIDTHS[1]}}" + "".join(
        f"  {cell:>{width}}" for cell, width in zip(rest[1:], WIDTHS[2:], strict=True))


def _fit(text: str, width: int = WIDTHS[0]) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


_BREAKS = re.compile(r"(?<=[\s/:_-])|(?<=\.)(?=[^\W\d])")  # after / : _ - or a space; a . before a letter


def wrap_name(text: str, width: int, measure: Callable[[str], int] = len) -> list[str]:
    """A name (a model id, a session) in lines of at most ``width``, broken after a ``/``, ``:``, ``_``,
    ``-``, a space or a ``.`` before a letter (a piece wider than ``width`` stays whole: the caller cuts
    it). ``measure``: a line's width (rich's ``cell_len`` in a table)."""
    lines, line = [], ""
    for piece in _pieces(text):
        if line and measure(line + piece.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += piece
    lines.append(line.rstrip())
    return lines


def _pieces(text: str) -> list[str]:
    """``text`` cut after each place a line may break (:data:`_BREAKS`)."""
    return [p for p in _BREAKS.split(text) if p]


def _label_lines(labels: list[str], width: int = WIDTHS[0]) -> list[str]:
    """A block's labels in lines of the label column: each wrapped (:func:`wrap_name`), a piece too long
    cut in two (a long session id on two lines, whole)."""
    return [line[i:i + width] for label in labels for line in wrap_name(label, width)
            for i in range(0, max(len(line), 1), width)]


def _account_rows(recorded: Recorded | None, baseline: Account, optimized: Account) -> Iterator[tuple[str, ...]]:
    base = baseline.cost
    rows: list[tuple[str, Account, float | None]] = []
    if recorded is not None:
        rows.append(("recorded", recorded, None if recorded.unreported_calls else recorded.reported_cost_usd))
    rows += [("baseline", baseline, baseline.cost), ("optimized", optimized, optimized.cost)]
    for name, account, cost in rows:
        share = f"{account.cached_tokens / account.input_tokens:.0%}" if account.input_tokens else "-"
        ratio = f"x{cost / base:.3f}" if name != "baseline" and cost is not None and base else ""
        yield name, f"{account.input_tokens:,}", share, money(cost), ratio


def _block(labels: list[str], rows: list[tuple[str, ...]]) -> list[str]:
    labels = _label_lines(labels)
    lines = []
    for i in range(max(len(labels), len(rows))):
        label = labels[i] if i < len(labels) else ""
        lines.append(_line((label, *(rows[i] if i < len(rows) else ("",) * 5))).rstrip())
    return lines


def _without_usage(session: SessionReport) -> list[str]:
    """A session some of whose calls recorded usage and some not: which not, and that no recorded row
    compares it (a session that recorded none, as chat logs often do, has no recorded row either)."""
    if not session.recorded.partial:
        return []
    missing = session.recorded.without_usage
    steps = ", ".join(str(step) for step in missing[:5]) + (", ..." if len(missing) > 5 else "")
    return textwrap.wrap(f"recorded: {counted(len(missing), 'call')} of {session.calls} recorded no usage "
                         f"(call {steps}): no recorded row, and left out of the recorded total",
                         width=78, initial_indent="  ", subsequent_indent="  ")


def replay_table(report: ReplayReport, title: str, config: str) -> str:
    """The replay as text: one block per session (id, model, calls) with a row per account, a total
    block, the integrity and retention figures and a legend."""
    out = [*textwrap.wrap(title, width=80), "", _line(HEADER), "-" * len(_line(HEADER))]
    for s in report.sessions:
        rows = list(_account_rows(s.recorded if s.recorded.complete else None, s.baseline, s.optimized))
        out += _block([s.id, s.model.rsplit("/", 1)[-1], counted(s.calls, "call")], rows)
        out += [*_without_usage(s), ""]
    calls = sum(s.calls for s in report.sessions)
    out += _block(["total", counted(len(report.sessions), "session"), counted(calls, "call")],
                  list(_account_rows(*report.accounts())))
    totals = report.totals()
    out += ["", f"tool messages orphaned (integrity violations): {totals['integrity_violations']}; "
                f"retention: {totals['retention']:.3f}"]
    out += [f"  {s.id}, {s.first_violation}" for s in report.sessions if s.first_violation] + [""]
    out += textwrap.wrap(LEGEND.format(config=config), width=80)
    return "\n".join(out)


ROUTED_WIDTHS = (22, 26, 6, 10)  # label, account, calls routed there, cost
ROUTED_LEGEND = ("routed: each call planned with the alias as its model and priced on the model chosen, "
                 "one simulated prompt cache per model (a switch finds the new model's cache as earlier calls "
                 "routed there left it); <model> alone: the same requests all priced on that model; calls: how "
                 "many the router sent there. cache lost: what the routed calls paid over the same calls on the "
                 "same model with a cache warmed by every earlier call.")


def _routed_line(cells: tuple[str, str, str, str]) -> str:
    label, account, calls, cost = cells
    w = ROUTED_WIDTHS
    return f"{label:<{w[0]}}  {account:<{w[1]}}  {calls:>{w[2]}}  {cost:>{w[3]}}".rstrip()


def _routed_block(labels: list[str], routed: RoutedAccount) -> list[str]:
    rows = [("routed", f"{sum(routed.calls.values()):,}", money(routed.routed.cost))]
    rows += [(_fit(f"{m.rsplit('/', 1)[-1]} alone", ROUTED_WIDTHS[1]), f"{routed.calls.get(m, 0):,}",
              money(routed.always[m].cost)) for m in routed.models if m in routed.always]
    labels = _label_lines(labels)
    lines = []
    for i in range(max(len(labels), len(rows))):
        label = labels[i] if i < len(labels) else ""
        lines.append(_routed_line((label, *(rows[i] if i < len(rows) else ("", "", "")))))
    return lines


def _lost(routed: RoutedAccount) -> str:
    return money(None if routed.routed.cost is None else routed.cache_lost_usd)


def routed_table(sessions: list[SessionReport], total: RoutedAccount) -> str:
    """The routed replay as text within 80 columns: per session and in total, the routed cost and
    each model alone, with the calls sent to each model, the switches and the cache lost to them."""
    header = _routed_line(("session / switches", "account", "calls", "cost"))
    out = [f"routed through {total.alias!r}", "", header, "-" * len(header)]
    for s in sessions:
        if s.routed is not None:
            out += _routed_block([s.id, f"{s.routed.switches:,} switches", f"lost {_lost(s.routed)}"], s.routed) + [""]
    data = total.as_dict(total=True)
    out += _routed_block(["total", f"{total.switches:,} switches",
                          f"median {data['median_switches_per_session']}/session", f"lost {_lost(total)}"], total)
    return "\n".join([*out, "", *textwrap.wrap(ROUTED_LEGEND, width=80)])


def unpriced(report: ReplayReport) -> dict[str, list[str]]:
    """Models with no price, and the sessions that used them."""
    out: dict[str, list[str]] = {}
    for s in report.sessions:
        if s.baseline.unpriced_calls:
            out.setdefault(s.model, []).append(s.id)
    return out


class _Name:
    """A table cell holding a name (a model id, an app, a session) that wraps after ``/``, ``-``, ``:``,
    ``_``, a space or a ``.`` before a letter, so ``openrouter/anthropic/claude-3.5-sonnet:beta`` wraps
    as ``openrouter/`` ``anthropic/`` ``claude-3.5-`` ``sonnet:beta``; only a piece longer than the
    column is cut mid-word. (rich breaks only at spaces: its ``fold`` cuts a model id anywhere.)"""

    def __init__(self, text: str) -> None:
        self.pieces = _pieces(text)
        self.text = text

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        from rich.cells import cell_len
        from rich.measure import Measurement

        longest = max((cell_len(p.rstrip()) for p in self.pieces), default=1)
        return Measurement(min(longest, options.max_width), min(cell_len(self.text), options.max_width))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        from rich.cells import cell_len
        from rich.text import Text

        lines = wrap_name(self.text, max(1, options.max_width), cell_len)
        yield Text("\n".join(lines), overflow="fold")  # a piece wider than the column is cut to fit


def print_budgets(rows: list[dict[str, Any]]) -> None:
    """The ``budgets`` command's table: a row per budget and unit; one whose scope the labels given do
    not name says which option names it."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("budget", "whose", "spent or held", "limit", "left", "starts over in"):
        table.add_column(column, justify="left" if column in ("budget", "whose") else "right")
    for r in rows:
        whose = "all" if r["scope"] == "global" else f"{r['scope']} {r['whose']}" if r["whose"] is not None else "-"
        amount = money if r["unit"] == "usd" else (lambda v: f"{v:,.0f} tokens")
        if r["whose"] is None:
            table.add_row(str(r["budget"]), whose, f"(pass --{r['scope']})", amount(r["limit"]), "", "")
            continue
        resets = r["resets_in_s"]
        table.add_row(str(r["budget"]), whose, amount(r["spent_or_held"]), amount(r["limit"]), amount(r["left"]),
                      "never" if resets is None else _duration(float(resets)))
    Console().print(table)


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def print_report(report: dict[str, Any]) -> None:
    """The ledger report as rich tables: totals, then rankings by model, target, deployment, provider,
    app, tenant, user (those three where calls had one) and session."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from ..ledger.report import GROUPS, LABELS, NAMED_ONLY, ends, whose

    console = Console()
    totals = report["totals"]
    if not totals["calls"]:  # seven empty tables said nothing more
        only = "".join(f" of {label} {value!r}" for label, value in report.get("only", {}).items())
        console.print(f"0 calls: the ledger has none{only} in this range (see --since and --until)",
                      highlight=False)
        return
    baseline = totals["baseline_cost_usd"] if totals["calls"] else 0.0
    ended = ends(totals)
    only = whose(report)
    phrases = [counted(totals["calls"], "call") + (f" of {only}" if only else "") + (f" ({ended})" if ended else ""),
               f"cost {money(totals['cost_usd'])} ({money(baseline)} without the middleware)",
               f"response-cache hit rate {report['cache_hit_rate']:.1%}"]
    joined = ", ".join(phrases)  # too wide for the console: a phrase a line, never one cut in two
    console.print(joined if len(joined) <= console.width else ",\n".join(phrases), highlight=False)
    if totals["failed_calls"]:  # by the model each was sent to (and its deployment), of the calls sent there
        for group in ("target", "deployment"):
            failed = [f"{r['key']} {r['failed_calls']:,} of {r['calls']:,}" for r in report[f"by_{group}"]
                      if r["failed_calls"]]
            if failed:
                console.print(f"[yellow]failed calls by {group}: {', '.join(failed)} "
                              "(the ledger's error column says why)[/yellow]")
    if totals["unpriced_calls"]:
        models = [r["key"] for r in report["by_model"] if r["unpriced_calls"]]
        unpriced = totals["unpriced_calls"]
        console.print(f"[yellow]{counted(unpriced, 'call')} {'has' if unpriced == 1 else 'have'} no price "
                      f"(model {', '.join(models)}): "
                      "their cost is unknown and not in the sums above[/yellow]")
    for group in GROUPS:
        if group in NAMED_ONLY | LABELS and not report[f"by_{group}"]:
            continue  # no call was sent under a deployment's name
        # numbers never wrap; a long name wraps in its own column (the only one that may) after a
        # '/', '-' or ':' (_Name), and no vertical rules, so the eight columns stay readable at 80
        # (a pipe, a CI log)
        table = Table(title=f"by {group}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column(group, overflow="fold", ratio=1, min_width=8)
        for column in ("calls", "input", "cached", "output", "reasoning", "cost", "baseline"):
            table.add_column(column, justify="right", no_wrap=True)
        for r in report[f"by_{group}"]:
            table.add_row(_Name(str(r["key"] or "-")), f"{r['calls']:,}", f"{r['input_tokens']:,}",
                          f"{r['cached_tokens']:,}", f"{r['output_tokens']:,}", f"{r['reasoning_tokens']:,}",
                          money(r["cost_usd"]), money(r["baseline_cost_usd"]))  # None: no call with a price
        console.print(table)
    for title in ("token_mix", "savings_by_policy"):
        table = Table(title=title.replace("_", " "))
        table.add_column("part")
        table.add_column("value", justify="right")
        for key, value in report[title].items():
            table.add_row(key, money(value) if title.startswith("savings") else f"{value:,}")
        console.print(table)
