"""Request and token quotas: OpenRouter's free tier and per-deployment limits of our own.

A *bucket* is one quota: ``openrouter:free`` (shared by every ``:free`` model of the account, as
OpenRouter counts it: 20 requests a minute, 50 or 1,000 a UTC day depending on credits bought) or a
target named under ``routing.limits`` (RPM, RPD, TPM, TPD). Usage is counted in the store in fixed
windows (the minute, the UTC day), taken before each attempt and corrected after it
(:mod:`router_middleware.bookkeeping.quotas`): tokens are settled to the reported total, and the
provider's own rate-limit headers (``x-ratelimit-remaining-*`` with their reset, ``anthropic-ratelimit-*``, OpenRouter's
``x-ratelimit-remaining``/``-reset``, ``retry-after`` on a 429) set a *provider view*, the requests
and tokens the provider says are left until its reset, counted down locally until then.
The routing policy reads the same keys (:func:`exhausted`) to skip a bucket that is used up, so the
call goes to the next candidate (the paid variant) instead of failing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..config import RateLimit, RoutingConfig

FREE_BUCKET = "openrouter:free"
_SPANS = {"rpm": 60.0, "rpd": 86_400.0, "tpm": 60.0, "tpd": 86_400.0}
_WINDOW_NAMES = {"rpm": "this minute", "rpd": "today (UTC)", "tpm": "this minute", "tpd": "today (UTC)"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATIONS = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")


def is_free(model: str) -> bool:
    return model.startswith("openrouter/") and model.endswith(":free")


def free_variant(model: str) -> str:
    return model if model.endswith(":free") else f"{model}:free"


@dataclass(frozen=True, slots=True)
class Quota:
    bucket: str
    limit: RateLimit


def quotas_for(target: str, model: str, config: RoutingConfig, group: str | None = None) -> tuple[Quota, ...]:
    """The buckets a call to ``target`` (a model id or deployment name serving ``model``) counts against;
    with ``group``, the name ``target`` stands for (a proxy's ``model_group_alias``), that one's too."""
    found = []
    if is_free(model):
        found.append(Quota(FREE_BUCKET, config.free_tier.limit()))
    for name in (target, group) if group and group != target else (target,):
        own = config.limits.get(name)
        if own is not None:
            found.append(Quota(name, own))
    return tuple(found)


def window(bucket: str, kind: str, now: float) -> tuple[str, float]:
    span = _SPANS[kind]
    return f"{bucket}:{kind}:{int(now // span)}", span - now % span + 1.0


def needs(kind: str, tokens: int) -> float:
    return 1.0 if kind.startswith("r") else float(tokens)


def no_provider_quota(bucket: str, unit: str) -> str:
    return f"{bucket}: the provider reports no {unit} left until its reset"


def over_limit(bucket: str, kind: str, limit: int, used: float) -> str:
    return f"{bucket}: {kind} limit {limit:,} reached ({used:,.0f} used {_WINDOW_NAMES[kind]})"


def is_tokens(key: str) -> bool:
    """Whether a quota counter key counts tokens (else requests)."""
    return key.endswith(":tokens") or ":tpm:" in key or ":tpd:" in key


def exhausted(quotas: tuple[Quota, ...], used: Mapping[str, float], now: float, tokens: int) -> str | None:
    """Why a call of ``tokens`` cannot be taken now (read-only, for the routing policy), or ``None``."""
    for quota in quotas:
        for unit in ("requests", "tokens"):
            left = used.get(f"{quota.bucket}:left:{unit}")
            if left is not None and left < (1 if unit == "requests" else tokens):
                return no_provider_quota(quota.bucket, unit)
        for kind, limit in quota.limit.items():
            key, _ = window(quota.bucket, kind, now)
            count = used.get(key, 0.0)
            if count + needs(kind, tokens) > limit:
                return over_limit(quota.bucket, kind, limit, count)
    return None


# -- the provider's view, from its response headers ------------------------------------------------


def _reset_at(value: str | None, now: float) -> float | None:
    """A reset given as a duration (``6m0s``, ``12ms``: OpenAI), an ISO time (Anthropic), epoch
    milliseconds or seconds (OpenRouter), or seconds from now."""
    if not value:
        return None
    value = value.strip()
    if _DURATIONS.fullmatch(value):
        factors = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        return now + sum(float(n) * factors[u] for n, u in _DURATION.findall(value))
    try:
        number = float(value)
    except ValueError:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    if number > 1e12:  # epoch milliseconds
        return number / 1000
    if number > 1e9:  # epoch seconds
        return number
    return now + number


def provider_view(headers: Mapping[str, Any], now: float) -> dict[str, tuple[float, float]]:
    """``{"requests"|"tokens": (left, reset_at)}`` from rate-limit headers (litellm's normalized
    ``x-ratelimit-*`` or the raw ``llm_provider-*`` copies); a ``retry-after`` means none left."""
    flat = {str(k).lower().removeprefix("llm_provider-"): str(v) for k, v in headers.items()}
    view: dict[str, tuple[float, float]] = {}
    for unit in ("requests", "tokens"):
        left = (flat.get(f"x-ratelimit-remaining-{unit}") or flat.get(f"anthropic-ratelimit-{unit}-remaining")
                or (flat.get("x-ratelimit-remaining") if unit == "requests" else None))
        reset = _reset_at(flat.get(f"x-ratelimit-reset-{unit}") or flat.get(f"anthropic-ratelimit-{unit}-reset")
                          or (flat.get("x-ratelimit-reset") if unit == "requests" else None), now)
        if left is None or reset is None or reset <= now:
            continue
        try:
            view[unit] = (float(left), reset)
        except ValueError:
            continue
    retry = _reset_at(flat.get("retry-after"), now)
    if retry is not None and retry > now:
        view["requests"] = (0.0, max(retry, view.get("requests", (0.0, 0.0))[1]))
    return view


def estimate_needed(quotas: tuple[Quota, ...]) -> bool:
    """Whether the call's token estimate matters (a token limit applies)."""
    return any(quota.limit.tpm or quota.limit.tpd for quota in quotas)


__all__ = ["FREE_BUCKET", "Quota", "estimate_needed", "exhausted", "free_variant", "is_free", "is_tokens", "needs",
           "no_provider_quota", "over_limit", "provider_view", "quotas_for", "window"]
