"""Parameters that fit the model an attempt goes to.

A parameter the model cannot take is dropped, and a ``reasoning_effort`` level it lacks is moved to
the nearest level it has, so an attempt never ends in litellm's ``UnsupportedParamsError`` or a
provider's 400. Each change is a ``params`` decision on the plan naming the parameter, the model and
what was done. Pure: what a model takes (:class:`ParamRules`) is read from litellm by
:func:`.wire.param_rules`; :meth:`.Engine.plan` fits every attempt's plan, so each fallback target
gets the caller's params fitted to its own model.

A history goes to a provider the router picked (not the one the caller named) as that provider takes
it (:func:`fit_history`): what another provider wrote there and litellm still sends, but the target
refuses, is converted or dropped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError
from .params import effort_level, with_effort
from .reasoning.levels import LEVELS
from .types import Decision, Message, Plan

_SAMPLING = ("top_p", "logprobs", "top_logprobs")  # gpt-5.1+ take these only while reasoning is off
_ANTHROPIC_THINKING_TOP_P = 0.95  # Anthropic's lowest top_p with thinking on
# An OpenAI reply's own fields that litellm 1.110.2 passes on to these providers, which refuse a
# message field their schema lacks: Mistral with a 422 (extra_forbidden), Groq with a 400.
_REPLY_FIELDS = frozenset({"annotations", "audio", "refusal"})
_REFUSED_FIELDS: Mapping[str, frozenset[str]] = {"mistral": _REPLY_FIELDS, "groq": _REPLY_FIELDS}
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")  # Mistral refuses (a 400) any other tool-call id
_THOUGHT_SIGNATURE = "__thought__"  # litellm's mark of a Gemini signature in a tool-call id
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


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
    effort = effort_level(out.get("reasoning_effort"))
    if rules.efforts and effort in LEVELS and effort not in rules.efforts:
        nearest = _nearest(effort, rules.efforts)
        if nearest is not None:
            sent = out["reasoning_effort"]
            out["reasoning_effort"] = with_effort(sent, nearest)
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


def fit_plan(plan: Plan, rules: ParamRules, *, drops: bool = False) -> Plan:
    """``plan`` with its params fitted to its model, one ``params`` decision per change. Raises
    ``RequestError`` for ``n`` above 1 to a model that gives one answer a call: dropped, the caller
    would get fewer answers than asked, where litellm refuses the call, unless litellm drops what a
    model does not take (the call's ``drop_params``, or litellm's own: ``drops``)."""
    n = plan.params.get("n")
    if isinstance(n, int) and n > 1 and not takes_n(rules) and not (drops or plan.params.get("drop_params")):
        raise RequestError(f"n={n}: {plan.model} gives one answer a call (litellm lists n as unsupported for "
                           f"it); make {n} calls, or ask a model that takes n")
    params, changes = fit(plan.params, rules)
    if not changes:
        return plan
    return plan.override(params=params, decisions=(*plan.decisions, *(c.decision(plan.model) for c in changes)))


def takes_n(rules: ParamRules) -> bool:
    """Does the model give several answers to one call (``n``)? Unknown counts as yes."""
    return rules.supported is None or "n" in rules.supported


def _names(value: Any) -> Any:
    """A list of param names as given (a string is a set of its characters, as litellm reads it)."""
    return set(value) if isinstance(value, str) else value or ()


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
    effort = effort_level(params.get("reasoning_effort"))
    return effort is not None and effort != "none"


def fit_history(messages: Sequence[Message], provider: str | None) -> tuple[list[Message], str] | None:
    """``messages`` as ``provider`` takes them, and what was changed; ``None`` when they fit as they are.
    An assistant turn loses the reply fields the provider refuses (an OpenAI ``refusal`` with no
    content becomes the content); for Mistral each tool-call id becomes :func:`mistral_tool_id`."""
    refused = _REFUSED_FIELDS.get(provider or "")
    if refused is None:
        return None
    renamed: set[str] | None = set() if provider == "mistral" else None
    dropped: set[str] = set()
    out: list[Message] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant":
            message = _assistant(message, refused, dropped, renamed)
        elif role == "tool" and renamed is not None and isinstance(message.get("tool_call_id"), str):
            new = _renamed(message["tool_call_id"], renamed)
            message = message if new == message["tool_call_id"] else {**message, "tool_call_id": new}
        out.append(message)
    if not dropped and not renamed:
        return None
    said = [f"{', '.join(sorted(dropped))} dropped from assistant turns"] if dropped else []
    if renamed:
        said.append(f"{len(renamed)} tool-call id(s) rewritten as 9 letters or digits")
    return out, "; ".join(said)


def fit_history_plan(plan: Plan, provider: str | None) -> Plan:
    """``plan`` with its messages fitted to ``provider`` (:func:`fit_history`), and a ``messages:fit``
    decision saying what changed. Only for a target the router picked: a history sent to the model
    the caller named goes as a direct call sends it."""
    fitted = fit_history(plan.messages, provider)
    if fitted is None:
        return plan
    messages, said = fitted
    decision = Decision("messages", "fit", f"for {plan.model}, which the caller did not name: {said} "
                        f"({provider} refuses them as another provider wrote them)", {"model": plan.model})
    return plan.decide(decision, messages=messages)


def mistral_tool_id(call_id: str) -> str:
    """A tool-call id as Mistral takes it: one of 9 letters or digits as it is, any other (Anthropic's
    ``toolu_...``, OpenAI's ``call_...``) as 9 base-62 digits of its SHA-256, so a call and its result
    still match and a history sends the same ids on every turn. A Gemini thought signature litellm
    appended is left off first, as litellm leaves it off for any other provider."""
    base = call_id.split(_THOUGHT_SIGNATURE, 1)[0]
    if _MISTRAL_ID.fullmatch(base):
        return base
    number = int.from_bytes(hashlib.sha256(base.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(digits)


def _assistant(message: Message, refused: frozenset[str], dropped: set[str], renamed: set[str] | None) -> Message:
    """An assistant turn without the ``refused`` fields it sets (named in ``dropped``), its tool-call ids
    as Mistral takes them when ``renamed`` collects the ids rewritten; the turn itself when nothing changes."""
    found = {k for k in refused if message.get(k) is not None}
    calls = message.get("tool_calls")
    fitted = _with_ids(calls, renamed) if renamed is not None and isinstance(calls, list) else calls
    if not found and fitted is calls:
        return message
    out = {k: v for k, v in message.items() if k not in refused}
    if "refusal" in found and not message.get("content"):
        out["content"] = message["refusal"]  # what the model said instead of an answer
    if fitted is not calls:
        out["tool_calls"] = fitted
    dropped |= found
    return out


def _renamed(call_id: str, renamed: set[str]) -> str:
    new = mistral_tool_id(call_id)
    if new != call_id:
        renamed.add(call_id)
    return new


def _with_id(call: Any, renamed: set[str]) -> Any:
    if not isinstance(call, Mapping) or not isinstance(call.get("id"), str):
        return call
    new = _renamed(call["id"], renamed)
    return call if new == call["id"] else {**call, "id": new}


def _with_ids(calls: list[Any], renamed: set[str]) -> list[Any]:
    """``calls`` with their ids as Mistral takes them; the same list when every id fits."""
    fitted = [_with_id(call, renamed) for call in calls]
    return calls if all(a is b for a, b in zip(fitted, calls, strict=True)) else fitted
