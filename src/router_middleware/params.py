"""Checks on a call's parameters before anything is planned or reserved: numbers in their range,
JSON values not nested past what any provider accepts. Each failure is a :class:`RequestError`
naming the parameter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import RequestError

MAX_DEPTH = 100  # JSON nesting a request may carry (tool schemas, response formats): far past real ones
_POSITIVE_INTS = ("max_tokens", "max_completion_tokens", "n")
_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "presence_penalty": (-2.0, 2.0),
           "frequency_penalty": (-2.0, 2.0)}
_NESTED = ("tools", "response_format", "tool_choice", "functions", "extra_body")
# litellm's reasoning_effort values (its Literal), and its "disable" (Gemini's thinking off)
EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max", "default", "disable")


def check_model(model: Any) -> str:
    """``model`` when it is a model name or alias; else raises :class:`RequestError`."""
    if not isinstance(model, str) or not model.strip():
        raise RequestError(f"model: expected a model name or alias, got {model!r}")
    return model


def check_params(params: Mapping[str, Any], *, litellm_sends: bool = True) -> Mapping[str, Any]:
    """``params`` unchanged when they are sound; else raises :class:`RequestError`. ``litellm_sends=False``:
    another client sends the call (an agent's own chat model), so what litellm would break on (tools,
    ``metadata``, ``extra_body``, ``stop``) is left to it."""
    stream = params.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"stream: expected true or false, got {stream!r}")
    for name in _POSITIVE_INTS:
        value = params.get(name)
        if value is not None and (not _whole(value) or value < 1):
            raise RequestError(f"{name}: expected a whole number of at least 1, got {value!r}")
    for name, (low, high) in _RANGES.items():
        value = params.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not low <= value <= high):
            raise RequestError(f"{name}: expected a number from {low:g} to {high:g}, got {value!r}")
    for name in _NESTED:
        if name in params and too_deep(params[name]):
            raise RequestError(f"{name}: nested deeper than {MAX_DEPTH} levels")
    if litellm_sends:
        _check_tools(params.get("tools"))
        _check_shapes(params)
    shape = params.get("response_format")
    if shape is not None and not isinstance(shape, type) \
            and not (isinstance(shape, Mapping) and isinstance(shape.get("type"), str)):
        raise RequestError(f"response_format: expected an object such as {{'type': 'json_object'}} or a pydantic "
                           f"model class, got {shape!r}")
    _check_effort(params.get("reasoning_effort"))
    for name in ("thinking", "reasoning"):
        value = params.get(name)
        if isinstance(value, Mapping):
            budget = value.get("budget_tokens", value.get("max_tokens"))
            if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
                key = "budget_tokens" if "budget_tokens" in value else "max_tokens"
                raise RequestError(f"{name}.{key}: expected a whole number of tokens, got {budget!r}")
    return params


def _check_effort(effort: Any) -> None:
    """``reasoning_effort`` is a level litellm takes, or litellm's dict form (the Responses API's
    ``reasoning``: ``{"effort": "high", "summary": "detailed"}``) whose ``effort`` is one where it gives
    one (without it, litellm sends the dict: the model's default level, with a summary): a cap rule would
    not know where another level ranks."""
    name, level = "reasoning_effort", effort
    if isinstance(effort, Mapping):
        name, level = "reasoning_effort.effort", effort.get("effort")
    if level is not None and level not in EFFORTS:
        also = "" if name.endswith(".effort") else ", or an object such as {'effort': 'high', 'summary': 'auto'}"
        raise RequestError(f"{name}: unknown level {level!r}: litellm takes {', '.join(EFFORTS)}{also}")


def effort_level(effort: Any) -> str | None:
    """The level a ``reasoning_effort`` asks for: the string, or the ``effort`` of litellm's dict form."""
    if isinstance(effort, Mapping):
        effort = effort.get("effort")
    return effort if isinstance(effort, str) else None


def with_effort(effort: Any, level: str) -> Any:
    """``reasoning_effort`` ``effort`` moved to ``level`` in its own form: the level, or the caller's
    dict with its other keys (a ``summary``) kept."""
    return {**effort, "effort": level} if isinstance(effort, Mapping) else level


def _check_shapes(params: Mapping[str, Any]) -> None:
    """``metadata`` and ``extra_body`` objects, ``stop`` a string or a list of strings, where given (an
    empty value litellm drops passes): litellm breaks on others building the request (or the pipeline
    would: it adds its mark to ``metadata``), or the provider refuses them."""
    for name in ("metadata", "extra_body"):
        value = params.get(name)
        if value and not isinstance(value, Mapping):
            raise RequestError(f"{name}: expected an object, got {type(value).__name__} {value!r:.80}")
    stop = params.get("stop")
    if stop and not isinstance(stop, str) and not (isinstance(stop, list | tuple)
                                                   and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"stop: expected a string or a list of strings, got {stop!r:.80}")


def _check_tools(tools: Any) -> None:
    """``tools`` is a list of objects, a ``function`` tool naming its function: litellm breaks on one
    without it building an Anthropic request (an ``APIConnectionError`` that would count against the
    target); a list of anything else no provider takes."""
    if tools is None:
        return
    if not isinstance(tools, list | tuple):
        raise RequestError(f"tools: expected a list of tool objects, got {type(tools).__name__}")
    for n, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise RequestError(f"tools[{n}]: expected an object such as {{'type': 'function', 'function': "
                               f"{{'name': ...}}}}, got {type(tool).__name__}")
        function = tool.get("function")
        if tool.get("type") == "function" and not (isinstance(function, Mapping) and function.get("name")):
            raise RequestError(f"tools[{n}]: a function tool needs 'function' with its 'name'")


def _whole(value: Any) -> bool:
    """Whether ``value`` is a whole number: an int (not a bool) or an integral float (never inf or nan)."""
    if isinstance(value, float):
        return value.is_integer()
    return isinstance(value, int) and not isinstance(value, bool)


def output_cap(params: Mapping[str, Any]) -> tuple[str, int] | None:
    """The output a request caps itself at, and the parameter that says so: ``max_tokens``, else
    ``max_completion_tokens`` (checked whole numbers: see :func:`check_params`); ``None`` when neither."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = params.get(name)
        if value:
            return name, int(value)
    return None


def choices_asked(params: Mapping[str, Any]) -> int:
    """How many answers the request asks for (``n``, checked by :func:`check_params`; 1 when not given):
    its output is that many answers, each capped by ``max_tokens``."""
    n: Any = params.get("n")
    return int(n) if _whole(n) and n >= 1 else 1


def usage_asked(params: Mapping[str, Any]) -> bool:
    """Does the caller ask for a stream's final usage chunk (``stream_options.include_usage``)?"""
    options = params.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value`` (dicts and lists) nests deeper than ``limit``; iterative, so it never
    recurses itself."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
