"""Reasoning effort levels, ordered, and the token budgets that stand for them."""

from __future__ import annotations

from typing import Literal

Level = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
LEVELS: tuple[Level, ...] = ("none", "minimal", "low", "medium", "high", "xhigh")

# Thinking-token budgets used for providers that take budgets (Anthropic, Gemini 2.5, OpenRouter
# max_tokens). Anthropic's minimum budget is 1,024.
DEFAULT_BUDGETS: dict[Level, int] = {
    "none": 0, "minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768,
}


def shift(level: Level, steps: int) -> Level:
    index = min(len(LEVELS) - 1, max(0, LEVELS.index(level) + steps))
    return LEVELS[index]


def level_for_budget(tokens: int, budgets: dict[Level, int] = DEFAULT_BUDGETS) -> Level:
    """The highest level whose budget fits in ``tokens``."""
    best: Level = "none"
    for level in LEVELS:
        if budgets[level] <= tokens:
            best = level
    return best
