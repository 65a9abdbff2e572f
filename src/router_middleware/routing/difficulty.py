"""A fast difficulty score in [0, 1] for a request, from its text alone (no model call).

Signals, each cheap: length (log-scaled), code (fences, keywords), stack traces and error output,
mathematics (numbers, operators, quantities to compute), reasoning words ("prove", "why",
"step by step"), multiple-choice options, tool count, and the step kind (planning weighs more than
reading an observation). The weights are hand-set, not fitted; `route-eval` measures how well the
score separates prompts a weak model gets wrong from those it gets right.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ..messages import text_of
from ..types import Message

_CODE = re.compile(r"```|\bdef |\bclass |\bimport |\breturn\b|;\s*$|\{\s*$|=>|#include", re.MULTILINE)
_TRACE = re.compile(r"Traceback \(most recent call last\)|Exception|Error:|at .+\(.+:\d+\)|panic:")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_MATH = re.compile(r"[+\-*/^=%]|\bpercent\b|\btimes\b|\btwice\b|\bhalf\b|\bratio\b|\baverage\b|\btotal\b")
_REASON = re.compile(r"\b(prove|derive|why|explain|step by step|optimi[sz]e|design|architecture|refactor|"
                     r"trade-?offs?|compare|analy[sz]e|calculate|how (?:much|many))\b", re.IGNORECASE)
_CHOICES = re.compile(r"^\s*[A-D][.)]\s", re.MULTILINE)
STEP_WEIGHT = {"plan": 0.15, "edit": 0.1, "act": 0.05, "observe": -0.1, "summarize": -0.15}


def _squash(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def score_text(text: str, *, tools: int = 0, step_kind: str | None = None) -> float:
    words = max(1, len(text.split()))
    numbers = len(_NUMBER.findall(text))
    x = -2.2
    x += 0.55 * math.log10(words)
    x += 0.6 * min(3, len(_CODE.findall(text))) / 3
    x += 0.8 if _TRACE.search(text) else 0.0
    x += 0.35 * min(8, numbers) / 8 + 0.25 * min(10, len(_MATH.findall(text))) / 10
    x += 0.4 * min(3, len(_REASON.findall(text))) / 3
    x += 0.15 if _CHOICES.search(text) else 0.0
    x += 0.1 * min(5, tools)
    x += STEP_WEIGHT.get(step_kind or "", 0.0) * 4
    return _squash(x)


def request_text(messages: Sequence[Message]) -> str:
    """The text a request is scored by: its last user turn (or its last message)."""
    last = next((m for m in reversed(messages) if m.get("role") == "user"), messages[-1] if messages else {})
    return text_of(last)


def score_request(messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] = (),
                  step_kind: str | None = None) -> float:
    """Score the last user turn (or the last message), with the request's tools and step kind."""
    return score_text(request_text(messages), tools=len(tools), step_kind=step_kind)
