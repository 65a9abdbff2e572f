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
class ContextPolicy:
    config: ContextConfig = field(default_factory=ContextConfig)
    overrides: Mapping[str, ContextConfig] = field(default_factory=dict)
    name: str = "context"

    def settings_for(self, model: str) -> ContextConfig:
        """The first override whose glob matches ``model`` (e.g. ``anthropic/*``), else the default."""
        for pattern, config in self.overrides.items():
            if fnmatchcase(model, pattern):
                return config
        return self.config

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        config = self.settings_for(plan.model)
        if not config.enabled:
            return plan
        if config.clear_tool_outputs:
            plan = ClearToolOutputs(
                keep_last=config.keep_tool_outputs, chunk=config.chunk_tokens, payback_calls=config.payback_calls,
                tail_tokens=config.tail_tokens, exclude_tools=frozenset(config.exclude_tools),
                clear_inputs=config.clear_tool_inputs,
            )(plan, state)
        high = config.watermark_tokens or config.budget_tokens
        if config.budget_tokens is not None and config.watermark_tokens is not None:
            high = min(config.watermark_tokens, config.budget_tokens)
        if high is not None:
            if config.strategy == "middle-out":
                plan = MiddleOut(budget_tokens=high)(plan, state)
            else:
                plan = Window(budget_tokens=config.budget_tokens, watermark_tokens=high, keep=config.window_keep,
                              digest=config.digest, digest_share=config.digest_share, summarize=config.summarize,
                              max_payback_calls=config.max_payback_calls)(plan, state)
        if config.budget_tokens is not None:
            plan = MiddleOut(budget_tokens=config.budget_tokens, name="fit-budget")(plan, state)
        if context_limit(plan, state) is not None:
            plan = MiddleOut(name="fit-window")(plan, state)
        if config.cache_breakpoints:
            plan = CacheBreakpoints()(plan, state)
        return plan
