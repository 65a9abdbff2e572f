"""Parameters that fit the model an attempt goes to.

A parameter the model cannot take is dropped, and a ``reasoning_effort`` level it lacks is moved to
the nearest level it has, so an attempt never ends in litellm's ``UnsupportedParamsError`` or a
provider's 400. Each change is a ``params`` decision on the plan naming the parameter, the model and
what was done. Pure: what a model takes (:class:`ParamRules`) is read from litellm by
:func:`.wire.param_rules`; :meth:`.Engine.plan` fits every attempt's plan, so each fallback target
gets the caller's params fitted to its own model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .reasoning.levels import LEVELS
from .types import Decision, Plan

_SAMPLING = ("top_p", "logprobs", "top_logprobs")  # gpt-5.1+ take these only while reasoning is off
_ANTHROPIC_THINKING_TOP_P = 0.95  # Anthropic's lowest top_p with thinking on


@dataclass(frozen=True, slots=True)
class ParamRules:
    """What one model takes, as litellm knows it (plus what litellm is wrong about; see
    :func:`.wire.param_rules`). The defaults check nothing.

    ``checked``: the params litellm validates against the model, with their default values;
    ``supported``: those of them the model takes (``None``: unknown, nothing is dropped);
    ``efforts``: the ``reasoning_effort`` levels it takes (``None``: not checked);
    ``temperature_one``: only ``temperature=1`` while it reasons; ``sampling_if_effort_none``: it
    takes temperature, top_p and logprobs when reasoning_effort resolves to "none" (gpt-5.1+);
    ``default_effort_none``: its effort is "none" when the request names none;
    ``thinking_sampling``: with thinking on it takes only temperature 1, top_p >= 0.95 and no top_k
    (Anthropic).
    """

    checked: Mapping[str, Any] = field(default_factory=dict)
    supported: frozenset[str] | None = None
    efforts: frozenset[str] | None = None
    temperature_one: bool = False
    sampling_if_effort_none: bool = False
    default_effort_none: bool = False
    thinking_sampling: bool = False


@dataclass(frozen=True, slots=True)
class Change:
    """``param`` was sent as ``sent``; ``kept`` is what goes instead (``dropped``: nothing)."""

    param: str
    sent: Any
    kept: Any
    dropped: bool
    why: str

    def decision(self, model: str) -> Decision:
        if self.dropped:
            action, text = "drop", f"{self.param}={self.sent!r} dropped for {model}: {self.why}"
        else:
            action, text = "adapt", f"{self.param}={self.sent!r} sent as {self.kept!r} to {model}: {self.why}"
        return Decision("params", action, text, {"param": self.param, "model": model})


def fit(params: Mapping[str, Any], rules: ParamRules) -> tuple[dict[str, Any], tuple[Change, ...]]:
    """``params`` fitted to a model's ``rules``, and the changes made (none when all fit)."""
    out = dict(params)
    changes: list[Change] = []

    def drop(name: str, why: str) -> None:
        changes.append(Change(name, out.pop(name), None, True, why))

    if rules.supported is not None:
        supported, checked = rules.supported, rules.checked
        allowed = _names(out.get("allowed_openai_params"))
        skipped = _names(out.get("additional_drop_params"))  # litellm drops these itself
        for name in [k for k, v in out.items() if k in checked and v is not None and v != checked[k]
                     and k not in supported and k not in allowed and k not in skipped and not (k == "n" and v == 1)]:
            drop(name, "litellm lists it as unsupported for this model")
    effort = _effort(out.get("reasoning_effort"))
    if rules.efforts and effort in LEVELS and effort not in rules.efforts:
        nearest = _nearest(effort, rules.efforts)
        if nearest is not None:
            sent = out["reasoning_effort"]
            out["reasoning_effort"] = nearest if isinstance(sent, str) else {**sent, "effort": nearest}
            takes = ", ".join(level for level in LEVELS if level in rules.efforts)
            changes.append(Change("reasoning_effort", sent, out["reasoning_effort"], False,
                                  f"the nearest level it takes ({takes})"))
            effort = nearest
    off = effort == "none" or (effort is None and rules.default_effort_none)
    sampling_ok = rules.sampling_if_effort_none and off
    if rules.sampling_if_effort_none and not off:
        for name in _SAMPLING:
            if out.get(name) is not None:
                drop(name, "taken only while reasoning_effort is 'none'")
    temperature = out.get("temperature")
    if temperature is not None and temperature != 1 and rules.temperature_one and not sampling_ok:
        drop("temperature", "it takes only temperature=1"
             + (" unless reasoning_effort is 'none'" if rules.sampling_if_effort_none else ""))
    if rules.thinking_sampling and _thinking_on(out):
        if out.get("temperature") not in (None, 1):
            drop("temperature", "only temperature=1 is allowed with thinking")
        top_p = out.get("top_p")
        if isinstance(top_p, int | float) and top_p < _ANTHROPIC_THINKING_TOP_P:
            out["top_p"] = _ANTHROPIC_THINKING_TOP_P
            changes.append(Change("top_p", top_p, out["top_p"], False, "the lowest top_p allowed with thinking"))
        if out.get("top_k") is not None:
            drop("top_k", "not allowed with thinking")
    return out, tuple(changes)


def fit_plan(plan: Plan, rules: ParamRules) -> Plan:
    """``plan`` with its params fitted to its model, one ``params`` decision per change."""
    params, changes = fit(plan.params, rules)
    if not changes:
        return plan
    return plan.override(params=params, decisions=(*plan.decisions, *(c.decision(plan.model) for c in changes)))


def _names(value: Any) -> Any:
    """A list of param names as given (a string is a set of its characters, as litellm reads it)."""
    return set(value) if isinstance(value, str) else value or ()


def _effort(value: Any) -> str | None:
    """The level of a ``reasoning_effort`` string or ``{"effort": ...}`` dict."""
    if isinstance(value, Mapping):
        value = value.get("effort")
    return value if isinstance(value, str) else None


def _nearest(level: str, efforts: frozenset[str]) -> str | None:
    """The level in ``efforts`` closest to ``level``, or ``None``; on a tie the higher one, so a model
    asked to reason a little still reasons ("minimal" -> "low" rather than "none")."""
    rank = LEVELS.index(level)
    known = [other for other in LEVELS if other in efforts]
    return min(known, key=lambda other: (abs(LEVELS.index(other) - rank), -LEVELS.index(other)), default=None)


def _thinking_on(params: Mapping[str, Any]) -> bool:
    """Whether Anthropic will think: a ``thinking`` block that is on, or a reasoning_effort above none."""
    thinking = params.get("thinking")
    if isinstance(thinking, Mapping):
        return thinking.get("type") in ("enabled", "adaptive")
    effort = _effort(params.get("reasoning_effort"))
    return effort is not None and effort != "none"
