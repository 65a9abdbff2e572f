"""Normalize provider usage objects into :class:`Usage`.

Shapes understood (as litellm returns them, or raw from the provider):

- OpenAI / Azure / OpenRouter: ``prompt_tokens``, ``completion_tokens``,
  ``prompt_tokens_details.cached_tokens``, ``completion_tokens_details.reasoning_tokens``
  (OpenRouter adds ``prompt_tokens_details.cache_write_tokens`` and ``cost``).
- DeepSeek: ``prompt_cache_hit_tokens`` / ``prompt_cache_miss_tokens``.
- Anthropic raw: ``input_tokens`` *excluding* ``cache_read_input_tokens`` and
  ``cache_creation_input_tokens``; litellm's normalized Anthropic usage has ``prompt_tokens`` that
  already includes both.
- Gemini raw: ``promptTokenCount`` (cached included), ``candidatesTokenCount`` (thoughts excluded),
  ``thoughtsTokenCount``, ``cachedContentTokenCount``.

Result convention: cached reads and writes are part of ``input_tokens``; reasoning is part of
``output_tokens``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .types import Usage, UsageSource


def as_dict(obj: Any) -> dict[str, Any]:
    """A plain dict view of a pydantic model, an object with ``__dict__``, or a mapping."""
    if obj is None:
        return {}
    if isinstance(obj, Mapping):
        return dict(obj)
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        data = dump()
        return dict(data) if isinstance(data, Mapping) else {}
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")} if hasattr(obj, "__dict__") else {}


MAX_COUNT = 10**9  # tokens: far past any model's window; a count above it is no count


def count(value: Any, field: str) -> int:
    """A token count as a non-negative int. Anything else a provider (or a handler) puts there (text
    that is no number, NaN, infinity, a negative number, a number past :data:`MAX_COUNT`) counts 0
    and is logged (``usage_count_invalid``, naming ``field``), so one bad value neither fails an
    answered call nor enters a total."""
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value
    if value is None:
        return 0
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        number = -1
    if 0 <= number <= MAX_COUNT:
        return number
    from .telemetry.safety import log  # imported here: at the top it would be a circular import

    log.warning("usage_count_invalid", field=field, value=repr(value)[:40], counted=0)
    return 0


def count_in(data: Mapping[str, Any], field: str) -> int:
    """:func:`count` of ``data``'s ``field`` (0 where it holds none)."""
    return count(data.get(field), field)


def _first(data: Mapping[str, Any], *fields: str) -> int:
    """The first of ``fields`` that ``data`` holds a count other than 0 for."""
    return next((number for field in fields if (number := count_in(data, field))), 0)


# the token counts of the shapes normalize_usage reads (OpenAI's, Anthropic's, Gemini's)
_COUNTS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens", "input_tokens", "output_tokens",
                     "promptTokenCount", "candidatesTokenCount", "totalTokenCount"})


def normalize_usage(raw: Any, *, source: UsageSource = "provider") -> Usage:
    """Convert any supported usage shape to :class:`Usage`; ``None``, or a mapping with none of their
    token counts, gives an empty usage (``source`` ``none``: no count, not a count of zero)."""
    data = as_dict(raw)
    if not data or _COUNTS.isdisjoint(data):
        return Usage(source="none")
    if "promptTokenCount" in data or "candidatesTokenCount" in data:
        thoughts = count_in(data, "thoughtsTokenCount")
        return Usage(
            input_tokens=count_in(data, "promptTokenCount"),
            output_tokens=count_in(data, "candidatesTokenCount") + thoughts,
            cache_read_tokens=count_in(data, "cachedContentTokenCount"),
            reasoning_tokens=thoughts,
            source=source,
        )
    prompt_details = as_dict(data.get("prompt_tokens_details"))
    completion_details = as_dict(data.get("completion_tokens_details"))
    if "prompt_tokens" not in data and "input_tokens" in data:
        read = count_in(data, "cache_read_input_tokens")
        write = count_in(data, "cache_creation_input_tokens")
        return Usage(
            input_tokens=count_in(data, "input_tokens") + read + write,
            output_tokens=count_in(data, "output_tokens"),
            cache_read_tokens=read,
            cache_write_tokens=write,
            reasoning_tokens=count_in(as_dict(data.get("output_tokens_details")), "reasoning_tokens"),
            source=source,
        )
    read = count_in(prompt_details, "cached_tokens") \
        or _first(data, "cache_read_input_tokens", "prompt_cache_hit_tokens")
    write = count_in(data, "cache_creation_input_tokens") \
        or _first(prompt_details, "cache_write_tokens", "cache_creation_tokens")
    return Usage(
        input_tokens=count_in(data, "prompt_tokens"),
        output_tokens=count_in(data, "completion_tokens"),
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=count_in(completion_details, "reasoning_tokens"),
        source=source,
    )


def reported_cost(raw: Any) -> float | None:
    """The provider's own cost figure (OpenRouter's ``usage.cost``), if present, positive and finite."""
    value = as_dict(raw).get("cost")
    try:
        cost = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    return cost if cost and 0 < cost < math.inf else None
