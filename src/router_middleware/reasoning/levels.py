"""Reasoning effort levels, ordered, and the token budgets that stand for them."""

from __future__ import annotations

from ..config import DEFAULT_LEVEL_BUDGETS, ReasoningLevel

Level = ReasoningLevel
LEVELS: tuple[Level, ...] = ("none", "minimal", "low", "medium", "high", "xhigh")
DEFAULT_BUDGETS: dict[Level, int] = DEFAULT_LEVEL_BUDGETS  # the thinking tokens each level stands for


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
