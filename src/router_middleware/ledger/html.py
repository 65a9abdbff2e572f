"""A self-contained HTML report: inline SVG charts, no scripts or fonts from the network."""

from __future__ import annotations

import html
import json
from datetime import UTC, datetime
from typing import Any

from .report import GROUPS, LABELS, NAMED_ONLY, counted, ends, nice_max, whose

PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")


def _bars(items: list[tuple[str, float]], *, unit: str, title: str, chart_id: str) -> str:
    width, row, left = 640, 26, 220
    top = max((v for _, v in items), default=0.0)
    scale = nice_max(top)
    height = row * max(1, len(items)) + 30
    parts = [f'<svg id="{chart_id}" class="chart" role="img" aria-label="{html.escape(title)}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    for i, (label, value) in enumerate(items):
        y = 10 + i * row
        length = (width - left - 110) * (value / scale if scale else 0)
        parts.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{html.escape(label[:32])}</text>')
        tip = f"{html.escape(label)}: {value:,.6g} {unit}"
        parts.append(f'<rect class="bar" x="{left}" y="{y}" width="{length:.1f}" height="{row - 8}" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"><title>{tip}</title></rect>')
        shown = f"{value:,.0f}" if unit == "tokens" else f"{value:,.4g}"
        parts.append(f'<text x="{left + length + 6:.1f}" y="{y + 15}">{shown} {unit}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _stacked(timeline: dict[str, Any], chart_id: str) -> str:
    buckets = timeline["buckets"]
    starts = sorted({b["start"] for b in buckets})
    models = sorted({b["model"] for b in buckets})
    width, height, left, bottom = 760, 300, 70, 40
    totals = {s: sum(b["tokens"] for b in buckets if b["start"] == s) for s in starts}
    scale = nice_max(max(totals.values(), default=0))
    step = (width - left - 20) / max(1, len(starts))
    parts = [f'<svg id="{chart_id}" class="chart" role="img" aria-label="tokens over time by model" '
             f'width="{width}" height="{height + 30 + 18 * len(models)}" '
             f'viewBox="0 0 {width} {height + 30 + 18 * len(models)}">',
             f'<text x="{left - 6}" y="14" text-anchor="end">{scale:,.0f}</text>',
             f'<text x="{left - 6}" y="{height - bottom}" text-anchor="end">0</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - 10}" y2="{height - bottom}" stroke="#999"/>']
    for i, start in enumerate(starts):
        x = left + i * step
        y = height - bottom
        for j, model in enumerate(models):
            tokens = sum(b["tokens"] for b in buckets if b["start"] == start and b["model"] == model)
            h = (height - bottom - 10) * tokens / scale if scale else 0
            y -= h
            parts.append(f'<rect class="bar" x="{x + 1:.1f}" y="{y:.1f}" width="{max(1.0, step - 2):.1f}" '
                         f'height="{h:.1f}" fill="{PALETTE[j % len(PALETTE)]}"><title>{html.escape(model)}: '
                         f'{tokens:,} tokens</title></rect>')
        if i == 0 or i == len(starts) - 1:
            label = datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M")
            parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}">{label}</text>')
    for j, model in enumerate(models):
        y = height + 10 + 18 * j
        parts.append(f'<rect x="{left}" y="{y - 10}" width="12" height="12" fill="{PALETTE[j % len(PALETTE)]}"/>'
                     f'<text x="{left + 18}" y="{y}">{html.escape(model)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(rows: list[dict[str, Any]], title: str, key: str) -> str:
    """A ranking's table, its first column headed ``key`` (the group: model, user...)."""
    head = ("key", "calls", "failed_calls", "stopped_calls", "input_tokens", "cached_tokens", "output_tokens",
            "reasoning_tokens", "cost_usd", "baseline_cost_usd")
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c), c))}</td>" for c in head) + "</tr>" for r in rows)
    return (f"<h2>{html.escape(title)}</h2><table><thead><tr>"
            + "".join(f"<th>{html.escape(key) if c == 'key' else c.replace('_', ' ')}</th>" for c in head)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _usd(value: float | None) -> str:
    """A cost in the summary: unknown (no call with a price), never $0."""
    return "unknown" if value is None else f"${value:,.4f}"


def _fmt(value: Any, column: str = "") -> str:
    if value is None:
        return "unknown" if column.endswith("_usd") else "-"
    if isinstance(value, float):
        return f"{value:,.6f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_html(report: dict[str, Any]) -> str:
    totals = report["totals"]
    savings = report["savings_by_policy"]
    mix = report["token_mix"]
    charts = [
        "<h2>Tokens over time by model</h2>" + _stacked(report["timeline"], "tokens-over-time"),
        "<h2>Cost by app (USD)</h2>" + _bars([(r["key"] or "(none)", float(r["cost_usd"]))
                                                for r in report["by_app"] if r["cost_usd"] is not None],
                                               unit="USD", title="cost by app",
                                               chart_id="cost-by-app"),
        "<h2>Savings by policy (USD)</h2>" + _bars([(k, float(v or 0)) for k, v in savings.items()], unit="USD",
                                                     title="savings by policy", chart_id="savings-by-policy"),
        "<h2>Token mix</h2>" + _bars([(k.replace("_", " "), float(v)) for k, v in mix.items()], unit="tokens",
                                     title="token mix", chart_id="token-mix"),
    ]
    ended = ends(totals)
    only = html.escape(whose(report))
    summary = (f"<p>{counted(totals['calls'], 'call')}{f' of {only}' if only else ''}{f' ({ended})' if ended else ''}, "
               f"{totals['input_tokens']:,} input tokens "
               f"({totals['cached_tokens']:,} from cache), {totals['output_tokens']:,} output tokens "
               f"({totals['reasoning_tokens']:,} reasoning); cost {_usd(totals['cost_usd'])} vs "
               f"{_usd(totals['baseline_cost_usd'])} without the middleware; response-cache hit rate "
               f"{report['cache_hit_rate']:.1%}.</p>")
    tables = "".join(_table(report[f"by_{g}"], f"By {g}", g) for g in GROUPS
                     if report[f"by_{g}"] or g not in NAMED_ONLY | LABELS)
    # Raw JSON inside <script> (entities are not decoded there); "</" is escaped so no tag can close it.
    data = json.dumps(report, default=str).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>router-middleware report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #ddd; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
svg text {{ font-size: 12px; fill: #333; }}
</style></head>
<body data-rendered="no" data-errors="0">
<h1>router-middleware: usage and savings</h1>
{summary}
{''.join(charts)}
{tables}
<script type="application/json" id="report-data">{data}</script>
<script>
window.addEventListener("error", function () {{
  document.body.dataset.errors = String(Number(document.body.dataset.errors) + 1);
}});
var originalError = console.error;
console.error = function () {{
  document.body.dataset.errors = String(Number(document.body.dataset.errors) + 1);
  originalError.apply(console, arguments);
}};
var report = JSON.parse(document.getElementById("report-data").textContent);
var charts = document.querySelectorAll("svg.chart");
var bars = document.querySelectorAll("svg.chart rect.bar");
document.body.dataset.charts = String(charts.length);
document.body.dataset.bars = String(bars.length);
document.body.dataset.calls = String(report.totals.calls);
document.body.dataset.rendered = "yes";
</script>
</body></html>
"""
