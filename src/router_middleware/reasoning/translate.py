"""Turn a reasoning cap into each provider's own parameter.

litellm maps ``reasoning_effort`` correctly for OpenAI and Gemini (2.5 -> ``thinkingBudget``,
3 -> ``thinkingLevel``), so those get ``reasoning_effort``. Anthropic gets an explicit ``thinking``
budget with ``max_tokens`` above it (litellm would pick its own budget), OpenRouter its ``reasoning``
object, DeepSeek ``thinking`` on or off (with ``reasoning_effort`` on DeepSeek's own API). A model that
cannot reason gets no reasoning parameter at all (a request that carried one would fail with
``UnsupportedParamsError``), and the plan says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..catalog import ModelInfo
from ..params import output_cap, with_effort
from .levels import DEFAULT_BUDGETS, Level, level_for_budget

REASONING_PARAMS = ("reasoning_effort", "thinking", "reasoning")
_FAMILY_REASONS = re.compile(
    r"(?:^|/)(?:o1|o3|o4|gpt-5|claude-3-7|claude-(?:sonnet|opus|haiku)-4|claude-(?:opus|sonnet)-4|"
    r"gemini-2\.5|gemini-3|deepseek-reasoner|grok-[34]|qwq|qwen3)",
)
ANTHROPIC_OUTPUT_RESERVE = 4096
ANTHROPIC_MIN_BUDGET = 1024  # Anthropic refuses a thinking budget below 1,024 tokens


@dataclass(frozen=True)
class Translation:
    """``effective`` is the level the provider will really apply (e.g. Gemini 3 cannot go below low)."""

    params: dict[str, Any]
    note: str
    supported: bool = True
    effective: str | None = None


def can_reason(model: str, info: ModelInfo | None, provider: str | None = None) -> bool:
    """The catalog's reasoning flag, else the model's family. DeepSeek's own API takes its thinking
    switch for every model (litellm sends it; its map flags no reasoning for deepseek-chat)."""
    if info is not None and info.supports_reasoning is not None:
        return info.supports_reasoning
    return provider == "deepseek" or _FAMILY_REASONS.search(model.lower()) is not None


def family(model: str, provider: str | None) -> str:
    name = model.lower()
    if provider == "openrouter" or name.startswith("openrouter/"):
        return "openrouter"
    if "claude" in name:
        return "anthropic"
    if "gemini" in name:
        return "gemini-3" if "gemini-3" in name else "gemini-2.5"
    if "deepseek" in name:
        return "deepseek"
    return "openai"


def _gemini_3_level(model: str, info: ModelInfo | None, level: Level) -> str:
    """The thinking level a Gemini 3 model takes for ``level``, never above it where the model has one
    at or below: Flash models think down to minimal, others to low (none of them turns thinking off);
    medium on all but the first Gemini 3 Pro, which has low and high only; xhigh where the catalog
    says so (litellm refuses it elsewhere)."""
    name = model.lower()
    if level in ("none", "minimal"):
        minimal = "flash" in name and (info is None or info.minimal_effort is not False)
        return "minimal" if minimal else "low"
    if level == "medium" and re.search(r"gemini-3-pro(?![.\d])", name):
        return "low"
    if level == "xhigh" and (info is None or "xhigh" not in info.reasoning_efforts):
        return "high"
    return level


GEMINI_PRO_MIN_BUDGET = 128  # Gemini 2.5 Pro thinks with 128 to 32,768 tokens; 0 (off) is refused


def _gemini_range(model: str) -> tuple[int, int]:
    """The lowest and highest thinking budget Google documents for a Gemini 2.5 model (Flash and
    Flash-Lite also take 0, off; Pro does not)."""
    name = model.lower()
    if "pro" in name:
        return GEMINI_PRO_MIN_BUDGET, 32768
    return (512 if "lite" in name else 1), 24576


def _gemini_budget(model: str, tokens: int, cap: int | None) -> int:
    """``tokens`` within the model's range and, under the caller's output cap, at most half of it.
    Gemini counts thinking toward maxOutputTokens, so a larger budget leaves the answer no room where a
    direct call (dynamic thinking) answers. The cap is not raised as Anthropic's ``max_tokens`` is
    (Anthropic refuses a budget at or above it; Gemini takes a small one): the caller's cap is the most
    output, thinking included, the call may bill. Below the model's lowest: off, or Pro's lowest."""
    low, high = _gemini_range(model)
    budget = max(low, min(tokens, high))
    room = cap // 2 if cap else high
    if budget <= room:
        return budget
    if room >= low:
        return room
    return GEMINI_PRO_MIN_BUDGET if low == GEMINI_PRO_MIN_BUDGET else 0


def _gemini_25(model: str, base: dict[str, Any], level: Level, tokens: int) -> Translation:
    """Gemini 2.5's ``thinkingBudget``: ``tokens`` fitted by :func:`_gemini_budget`; at ``none``, 0
    (off), or Pro's minimum (it cannot turn thinking off)."""
    if level == "none" and "pro" in model.lower():
        return Translation({**base, "thinking": {"type": "enabled", "budget_tokens": GEMINI_PRO_MIN_BUDGET}},
                           f"thinkingBudget {GEMINI_PRO_MIN_BUDGET} (Gemini 2.5 Pro's minimum: it cannot "
                           "turn thinking off)", effective="minimal")
    cap = output_cap(base)
    fitted = 0 if level == "none" else _gemini_budget(model, tokens, cap[1] if cap else None)
    why = f" (asked {tokens}; fitted to the model's range and half the output cap)" if fitted != tokens else ""
    if fitted == 0:
        return Translation({**base, "reasoning_effort": "disable"}, "thinkingBudget 0" + why)
    return Translation({**base, "thinking": {"type": "enabled", "budget_tokens": fitted}},
                       f"thinkingBudget {fitted}" + why)


def _effort(params: Mapping[str, Any], level: str) -> dict[str, Any]:
    """``reasoning_effort`` at ``level`` in the form the caller sent: the level, or their dict (litellm's
    Responses form) with its other keys kept, so a summary asked for is still asked for."""
    return {"reasoning_effort": with_effort(params.get("reasoning_effort"), level)}


def _without_reasoning(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in REASONING_PARAMS}


def _tool_calls_carry(messages: Sequence[Mapping[str, Any]], key: str, *, last: bool = False) -> bool:
    """Whether every assistant tool call in ``messages`` (with ``last``, the last one) passes back its
    reasoning under ``key``. With thinking on, DeepSeek refuses (a 400) a tool call without its
    ``reasoning_content``, and litellm fills none in for deepseek-chat; Anthropic refuses a final one
    that does not start with its thinking block (``thinking_blocks``), and litellm drops thinking then
    only under ``modify_params``."""
    calls = [m for m in messages if m.get("role") == "assistant" and m.get("tool_calls")]
    return all(m.get(key) for m in (calls[-1:] if last else calls))


def _forces_a_tool(params: Mapping[str, Any]) -> bool:
    """Whether ``tool_choice`` forces tool use ('required', or one named tool), which Anthropic refuses
    with thinking on (a 400)."""
    choice = params.get("tool_choice")
    return choice in ("required", "any") or (isinstance(choice, Mapping) and choice.get("type") not in ("auto", "none"))


def _thinking_not_on(base: dict[str, Any], why: str) -> Translation:
    """The request without reasoning, as a direct call without one sends it: thinking would be refused."""
    return Translation(base, f"thinking not switched on: {why}, which the provider refuses with thinking on")


def translate(
    model: str, provider: str | None, info: ModelInfo | None, params: Mapping[str, Any], *,
    level: Level, budget_tokens: int | None = None, budgets: Mapping[Level, int] = DEFAULT_BUDGETS,
    exclude: bool = False, room: Callable[[], int | None] | None = None, messages: Sequence[Mapping[str, Any]] = (),
) -> Translation:
    """The request params with the cap applied (other params untouched). ``room``: the output the
    model's window leaves this request (asked where a thinking budget needs a ``max_tokens`` the
    caller did not give, or where a rule's thinking must fit the window beside the prompt).
    ``messages``: the history, checked where thinking needs it in a shape."""
    base = _without_reasoning(params)
    if not can_reason(model, info, provider):
        if info is None and base != params:  # unknown to the catalog, and the caller asked: litellm maps it
            return Translation({**base, **_effort(params, level)}, f"{model} is unknown to the catalog: "
                               f"reasoning_effort={level}, as litellm maps it for the provider", effective=level)
        why = "is unknown to the catalog" if info is None else "does not support reasoning"
        return Translation(base, f"{model} {why}: no reasoning parameter sent", False)
    tokens = budget_tokens if budget_tokens is not None else budgets[level]
    if budget_tokens is not None:  # a positive budget below the lowest level's still reasons: sent as it is
        level = level_for_budget(budget_tokens, dict(budgets))
        if level == "none" and budget_tokens > 0:
            level = "minimal"
    kind = family(model, provider)
    if kind == "openai":
        efforts = info.reasoning_efforts if info else frozenset()
        effort: str = level
        if level == "none" and "none" not in efforts:
            effort = "minimal" if "minimal" in efforts else "low"
        elif level == "minimal" and "minimal" not in efforts:
            effort = "low"
        elif level == "xhigh" and "xhigh" not in efforts:
            effort = "high"
        return Translation({**base, **_effort(params, effort)}, f"reasoning_effort={effort}", effective=effort)
    if kind == "anthropic":
        if level == "none" or tokens <= 0:
            return Translation(base, "thinking off")
        if not _tool_calls_carry(messages, "thinking_blocks", last=True):
            return _thinking_not_on(base, "the last tool call in the history carries no thinking_blocks")
        if _forces_a_tool(base):
            return _thinking_not_on(base, "tool_choice forces a tool")
        raised = tokens < ANTHROPIC_MIN_BUDGET  # Anthropic refuses a smaller budget (a 400)
        tokens = max(ANTHROPIC_MIN_BUDGET, tokens)
        limit = info.max_output_tokens if info is not None else None  # Anthropic refuses max_tokens past it
        lowered = False
        if limit and tokens + ANTHROPIC_OUTPUT_RESERVE > limit >= ANTHROPIC_MIN_BUDGET + ANTHROPIC_OUTPUT_RESERVE:
            tokens, lowered = limit - ANTHROPIC_OUTPUT_RESERVE, True
        cap = output_cap(base)  # max_completion_tokens is the same cap to Anthropic: sent as max_tokens
        asked = params.get("thinking")
        given = asked if isinstance(asked, Mapping) else {}
        enabled = given.get("type") == "enabled"  # by the caller
        own = enabled and isinstance(given.get("budget_tokens"), int) and tokens <= given["budget_tokens"]
        if own and cap and cap[1] > tokens:
            max_tokens = cap[1]  # the caller's max_tokens still holds the budget: as it came
        else:  # raised over the budget; without a cap, to the room a direct call has
            space = room() if room is not None and not (own and cap) else None
            max_tokens = max(cap[1] if cap else space or 0, tokens + ANTHROPIC_OUTPUT_RESERVE)
            # a rule's thinking only where the window holds it (the caller's own: as the caller left it)
            if not own and space is not None and max_tokens > space:  # Anthropic refuses it over the window
                if enabled:  # a rule raised the caller's own thinking past it: the caller's, as it came
                    return Translation(dict(params), f"the caller's own thinking, as sent: the model's window "
                                       f"leaves ~{max(0, space)} output tokens beside the prompt, under the rule's")
                if space - ANTHROPIC_OUTPUT_RESERVE < ANTHROPIC_MIN_BUDGET:
                    return _thinking_not_on(base, f"the model's window leaves ~{max(0, space)} output tokens "
                                            "beside the prompt, under a thinking budget plus its answer")
                tokens, max_tokens = min(tokens, space - ANTHROPIC_OUTPUT_RESERVE), space
        out = {**{k: v for k, v in base.items() if k != "max_completion_tokens"},
               "thinking": {"type": "enabled", "budget_tokens": tokens}, "max_tokens": max_tokens}
        dropped = [k for k in ("temperature", "top_k") if k in out and out[k] != 1]
        for key in dropped:
            out.pop(key)
        why = " (Anthropic's minimum)" if raised else ""
        if lowered:
            why = f" (the model's {limit} output tokens less {ANTHROPIC_OUTPUT_RESERVE} for the answer)"
        note = f"thinking budget {tokens}{why}, max_tokens {out['max_tokens']}"
        return Translation(out, note + (f"; dropped {dropped} (not allowed with thinking)" if dropped else ""))
    if kind == "gemini-3":
        effort = _gemini_3_level(model, info, level)
        return Translation({**base, **_effort(params, effort)}, f"thinkingLevel {effort}", effective=effort)
    if kind == "gemini-2.5":
        return _gemini_25(model, base, level, tokens)
    if kind == "openrouter":
        if "gemini-3" in model.lower() and level in ("none", "minimal"):
            level = "low"  # Gemini 3 cannot turn thinking off; its lowest level is low
        if level == "none":
            return Translation({**base, "reasoning": {"enabled": False}}, "reasoning disabled")
        body: dict[str, Any] = ({"max_tokens": tokens} if budget_tokens is not None
                                else {"effort": "high" if level == "xhigh" else level})
        asked = params.get("reasoning")
        if exclude or (isinstance(asked, Mapping) and asked.get("exclude")):  # the caller's exclude is kept
            body["exclude"] = True
        return Translation({**base, "reasoning": body}, f"reasoning {body}", effective=level)
    # DeepSeek: thinking on or off, its effort low or high (minimal/low -> low); deepseek-reasoner always thinks.
    if "reasoner" in model.lower():
        return Translation(base, "deepseek-reasoner always reasons: no control", effective="xhigh")
    if level == "none":
        return Translation({**base, "thinking": {"type": "disabled"}}, "thinking off")
    if not _tool_calls_carry(messages, "reasoning_content"):
        return _thinking_not_on(base, "a tool call in the history carries no reasoning_content")
    effort_param = {"reasoning_effort": level} if provider == "deepseek" else {}  # as litellm sends it to DeepSeek
    return Translation({**base, "thinking": {"type": "enabled"}, **effort_param}, f"thinking on, effort {level}")
