"""Clear old tool outputs: the cheapest large saving in agent histories, made cache-friendly.

All but the last ``keep_last`` tool results (or observation messages), and never those of the current
step (after the last assistant turn, which the model is about to read), may be replaced by a short
placeholder that keeps the file paths they named. They are cleared in *chunks*: only when the
clearable tokens reach a whole multiple of ``chunk`` tokens, so the cleared prefix stays identical
from one step to the next and the provider's prompt cache keeps hitting between clearings.

The chunk is sized from the model's prices (:func:`chunk_tokens`): clearing makes the provider
re-read the rest of the prompt at the full input (or cache-write) price once, so a chunk is only
cleared when the tokens it removes, read at the cache price on each later call, pay that back within
``payback_calls`` calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..catalog import ModelInfo
from ..policies import PolicyState
from ..types import Decision, Message, Plan
from .digest import cleared_placeholder
from .structure import head_length, result_indices, tool_names

PLACEHOLDER_PREFIX = "[output cleared to save context"


def chunk_tokens(info: ModelInfo | None, *, tail_tokens: int, payback_calls: float, provider_cache: bool = True) -> int:
    """Tokens to clear at once so that the cache re-read of ``tail_tokens`` pays back in time.

    Re-reading costs ``premium = input - cache_read`` per tail token (``cache_write - cache_read`` on
    explicit caches such as Anthropic's); each later call saves ``cache_read`` per cleared token.
    Without a provider cache (or a cache discount) there is nothing to re-read: clear every step.
    """
    prices = info.cache_prices() if info is not None and provider_cache else None
    if prices is None:
        return 1
    read, rewrite = prices
    premium = max(0.0, rewrite - read)
    return max(1, round(tail_tokens * premium / (read * payback_calls)))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return ""


@dataclass(frozen=True)
class ClearToolOutputs:
    keep_last: int = 4
    chunk: int | None = None
    payback_calls: float = 3.0
    tail_tokens: int = 4000
    min_tokens: int = 120
    exclude_tools: frozenset[str] = field(default_factory=frozenset)
    clear_inputs: bool = False
    name: str = "clear-tool-outputs"

    def chunk_for(self, plan: Plan, state: PolicyState) -> int:
        if self.chunk is not None:
            return max(1, self.chunk)
        return chunk_tokens(state.catalog.resolve(plan.model), tail_tokens=self.tail_tokens,
                            payback_calls=self.payback_calls, provider_cache=state.provider_cache)

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        messages = plan.messages
        head = head_length(messages)
        results = result_indices(messages, head)
        step = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].get("role") == "assistant"), -1)
        # never the current step's results (after the last assistant turn): the model is about to read them
        candidates = [i for i in results[: max(0, len(results) - self.keep_last)] if i < step]
        if not candidates:
            return plan
        names = tool_names(messages) if self.exclude_tools else {}
        eligible: list[tuple[int, int]] = []
        for index in candidates:
            message = messages[index]
            if names and names.get(str(message.get("tool_call_id"))) in self.exclude_tools:
                continue
            tokens = state.message_tokens(plan.model, message)
            if tokens >= self.min_tokens and not _text(message.get("content")).startswith(PLACEHOLDER_PREFIX):
                eligible.append((index, tokens))
        total = sum(tokens for _, tokens in eligible)
        chunk = self.chunk_for(plan, state)
        level = total // chunk * chunk
        cleared: dict[int, int] = {}
        running = 0
        for index, tokens in eligible:
            if running >= level:
                break
            running += tokens
            cleared[index] = tokens
        if not cleared:
            return plan
        cleared_ids = {str(messages[i].get("tool_call_id")) for i in cleared}
        new_messages: list[Message] = []
        for i, message in enumerate(messages):
            if i in cleared:
                text = _text(message.get("content"))
                new_messages.append({**message, "content": cleared_placeholder(text, tokens=cleared[i])})
            elif self.clear_inputs and i < max(cleared) and message.get("tool_calls"):
                new_messages.append(_clear_inputs(message, cleared_ids))
            else:
                new_messages.append(message)
        saved = sum(cleared.values())
        return plan.decide(
            Decision(self.name, "clear", f"cleared {len(cleared)} old tool outputs (~{saved} tokens) in "
                     f"{chunk}-token chunks; kept the last {self.keep_last}",
                     {"cleared_messages": len(cleared), "cleared_tokens": saved, "chunk_tokens": chunk}),
            messages=new_messages,
        )


def _clear_inputs(message: Any, cleared_ids: set[str]) -> dict[str, Any]:
    calls = []
    for call in message.get("tool_calls") or ():
        if str(call.get("id")) in cleared_ids:
            function = dict(call.get("function") or {})
            function["arguments"] = "{}"
            call = {**call, "function": function}
        calls.append(call)
    return {**message, "tool_calls": calls}
