"""The default context policy: clear old tool outputs in cache-friendly chunks, keep the request
inside its budget (window or middle-out), always fit the model's window, then place cache hints."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from ..config import ContextConfig
from ..policies import PolicyState
from ..types import Plan
from .breakpoints import CacheBreakpoints
from .clearing import ClearToolOutputs
from .window import MiddleOut, Window, context_limit


@dataclass(frozen=True)
class _Steps:
    """The sub-policies one :class:`ContextConfig` asks for, built once."""

    clear: ClearToolOutputs | None
    trim: Window | MiddleOut | None
    fit_budget: MiddleOut | None
    fit_window: MiddleOut
    breakpoints: CacheBreakpoints | None

    @classmethod
    def of(cls, config: ContextConfig) -> _Steps:
        clear = ClearToolOutputs(
            keep_last=config.keep_tool_outputs, chunk=config.chunk_tokens, payback_calls=config.payback_calls,
            tail_tokens=config.tail_tokens, exclude_tools=frozenset(config.exclude_tools),
            clear_inputs=config.clear_tool_inputs,
        ) if config.clear_tool_outputs else None
        high = config.watermark_tokens or config.budget_tokens
        if config.budget_tokens is not None and config.watermark_tokens is not None:
            high = min(config.watermark_tokens, config.budget_tokens)
        trim: Window | MiddleOut | None = None
        if high is not None:
            trim = MiddleOut(budget_tokens=high) if config.strategy == "middle-out" else Window(
                budget_tokens=config.budget_tokens, watermark_tokens=high, keep=config.window_keep,
                digest=config.digest, digest_share=config.digest_share, summarize=config.summarize,
                max_payback_calls=config.max_payback_calls)
        fit_budget = MiddleOut(budget_tokens=config.budget_tokens, name="fit-budget") \
            if config.budget_tokens is not None else None
        return cls(clear, trim, fit_budget, MiddleOut(name="fit-window"),
                   CacheBreakpoints(cache_key=config.prompt_cache_key) if config.cache_breakpoints else None)


@dataclass(frozen=True)
class ContextPolicy:
    config: ContextConfig = field(default_factory=ContextConfig)
    overrides: Mapping[str, ContextConfig] = field(default_factory=dict)
    name: str = "context"
    _steps: dict[str | None, _Steps] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        steps: dict[str | None, _Steps] = {pattern: _Steps.of(config) for pattern, config in self.overrides.items()}
        steps[None] = _Steps.of(self.config)  # the default
        object.__setattr__(self, "_steps", steps)

    def settings_for(self, model: str) -> ContextConfig:
        """The first override whose glob matches ``model`` (e.g. ``anthropic/*``), else the default."""
        return self.config if (pattern := self._pattern(model)) is None else self.overrides[pattern]

    def _pattern(self, model: str) -> str | None:
        return next((pattern for pattern in self.overrides if fnmatchcase(model, pattern)), None)

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        pattern = self._pattern(plan.model)
        config = self.config if pattern is None else self.overrides[pattern]
        if not config.enabled:
            return plan
        steps = self._steps[pattern]
        if steps.clear is not None:
            plan = steps.clear(plan, state)
        if steps.trim is not None:
            plan = steps.trim(plan, state)
        if steps.fit_budget is not None:
            plan = steps.fit_budget(plan, state)
        if context_limit(plan, state) is not None:
            plan = steps.fit_window(plan, state)
        if steps.breakpoints is not None:
            plan = steps.breakpoints(plan, state)
        return plan
