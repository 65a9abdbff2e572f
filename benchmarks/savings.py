"""How close the ledger's baseline (what a call would have cost without the middleware) comes to
what the provider billed the untouched call, against loopback models with a provider's prompt cache
(tests/prefix_cache_server.py).

    .venv/bin/python benchmarks/savings.py

1. The 73 calls of the bundled DeepSeek agent session, sent as the agent sent them (a pass-through
   ``Pipeline()``) and through the default window (trimmed past 16k tokens), each to a fresh model
   that caches prompt prefixes as DeepSeek does: per trimmed call, the ledger's baseline against what
   the untouched call was billed; and the session's totals.
2. The same session resumed at step 40 (its earlier requests never sent: a chat loaded from storage, a
   restarted proxy), each call of it the same way.
3. Five calls of an agent on Claude Sonnet 4.5 against Anthropic's explicit cache, with and without the
   breakpoints the pipeline adds: the same comparison per call.
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.prefix_cache_server import bill_agent, bill_session  # noqa: E402

from router_middleware import Pipeline  # noqa: E402


def _ledger(billed_with, config: dict) -> tuple[list[float], list[tuple]]:
    folder = tempfile.mkdtemp()
    pipeline = Pipeline.from_config({**config, "ledger": {"url": f"sqlite:///{folder}/ledger.db"},
                                     "cache": {"enabled": False}})
    sent = billed_with(pipeline)
    pipeline.close()
    rows = sqlite3.connect(f"{folder}/ledger.db").execute(
        "SELECT step, baseline_cost_usd, saved_context_usd, decisions FROM calls ORDER BY step").fetchall()
    return sent, rows


def _report(name: str, untouched: list[float], sent: list[float], rows: list[tuple], changed: str) -> None:
    errors = sorted(abs(baseline - untouched[step]) / untouched[step] for step, baseline, _, decisions in rows
                    if changed in decisions)
    dearer = [(step, saved) for step, _, saved, decisions in rows
              if changed in decisions and sent[step] > untouched[step] * 1.05]
    total = sum(r[1] for r in rows)
    print(f"{name}: {len(errors)} calls changed; ledger baseline vs the untouched call's bill: median "
          f"{median(errors) * 100:.1f}%, max {max(errors) * 100:.1f}% off; session baseline ${total:.5f} vs "
          f"untouched ${sum(untouched):.5f} ({(total / sum(untouched) - 1) * 100:+.1f}%), sent ${sum(sent):.5f}; "
          f"calls made dearer: {len(dearer)}, with a negative saving: {sum(1 for _, s in dearer if s < 0)}")


def deepseek() -> None:
    untouched = bill_session(Pipeline())
    sent, rows = _ledger(bill_session, {})
    _report("deepseek session (window)", untouched, sent, rows, "window:trim")


def resumed(start: int = 40) -> None:
    skipped = [0.0] * start  # steps before the resumption: no call, no row
    untouched = skipped + bill_session(Pipeline(), start)
    sent, rows = _ledger(lambda pipeline: skipped + bill_session(pipeline, start), {})
    _report(f"deepseek session resumed at step {start} (window)", untouched, sent, rows, "window:trim")


def anthropic() -> None:
    untouched = bill_agent(Pipeline())
    sent, rows = _ledger(bill_agent, {})
    _report("anthropic agent (breakpoints)", untouched, sent, rows, "cache-breakpoints:breakpoints")


if __name__ == "__main__":
    deepseek()
    resumed()
    anthropic()
