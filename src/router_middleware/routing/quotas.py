"""Request and token quotas: OpenRouter's free tier and per-deployment limits of our own.

A *bucket* is one quota: ``openrouter:free`` (shared by every ``:free`` model of the account, as
OpenRouter counts it: 20 requests a minute, 50 or 1,000 a UTC day depending on credits bought) or a
target named under ``routing.limits`` (RPM, RPD, TPM, TPD). Usage is counted in the store in fixed
windows (the minute, the UTC day), taken atomically before each attempt (:func:`take`) and corrected
after it: tokens are settled to the reported total, and the provider's own rate-limit headers
(``x-ratelimit-remaining-*`` with their reset, ``anthropic-ratelimit-*``, OpenRouter's
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
from ..stores import Store
from ..telemetry import log

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


def quotas_for(target: str, model: str, config: RoutingConfig) -> tuple[Quota, ...]:
    """The buckets a call to ``target`` (a model id or deployment name serving ``model``) counts against."""
    found = []
    if is_free(model):
        found.append(Quota(FREE_BUCKET, config.free_tier.limit()))
    own = config.limits.get(target)
    if own is not None:
        found.append(Quota(target, own))
    return tuple(found)


def _window(bucket: str, kind: str, now: float) -> tuple[str, float]:
    span = _SPANS[kind]
    return f"{bucket}:{kind}:{int(now // span)}", span - now % span + 1.0


def _needs(kind: str, tokens: int) -> float:
    return 1.0 if kind.startswith("r") else float(tokens)


def _no_provider_quota(bucket: str, unit: str) -> str:
    return f"{bucket}: the provider reports no {unit} left until its reset"


def _over_limit(bucket: str, kind: str, limit: int, used: float) -> str:
    return f"{bucket}: {kind} limit {limit:,} reached ({used:,.0f} used {_WINDOW_NAMES[kind]})"


def exhausted(quotas: tuple[Quota, ...], used: Mapping[str, float], now: float, tokens: int) -> str | None:
    """Why a call of ``tokens`` cannot be taken now (read-only, for the routing policy), or ``None``."""
    for quota in quotas:
        for unit in ("requests", "tokens"):
            left = used.get(f"{quota.bucket}:left:{unit}")
            if left is not None and left < (1 if unit == "requests" else tokens):
                return _no_provider_quota(quota.bucket, unit)
        for kind, limit in quota.limit.items():
            key, _ = _window(quota.bucket, kind, now)
            count = used.get(key, 0.0)
            if count + _needs(kind, tokens) > limit:
                return _over_limit(quota.bucket, kind, limit, count)
    return None


@dataclass
class Taken:
    """What :func:`take` counted, to settle (tokens) or give back (on a failed attempt)."""

    keys: list[tuple[str, float, float | None]]
    tokens: int


def take(store: Store, quotas: tuple[Quota, ...], tokens: int, now: float) -> tuple[Taken, str | None]:
    """Count one request of ``tokens`` against every bucket, atomically per counter. If any limit
    would be passed, everything taken is given back and the reason returned."""
    taken = Taken([], tokens)
    for quota in quotas:
        for unit, amount in (("requests", 1.0), ("tokens", float(tokens))):
            key = f"quota:{quota.bucket}:left:{unit}"
            if store.get(key) is None:
                continue
            # ttl only applies if the provider view expired in between (then it lapses at once)
            left = store.incr(key, -amount, ttl_s=1.0)
            taken.keys.append((key, -amount, None))
            if left < 0:
                give_back(store, taken)
                return Taken([], tokens), _no_provider_quota(quota.bucket, unit)
        for kind, limit in quota.limit.items():
            key, ttl = _window(quota.bucket, kind, now)
            amount = _needs(kind, tokens)
            total = store.incr(f"quota:{key}", amount, ttl)
            taken.keys.append((f"quota:{key}", amount, ttl))
            if total > limit:
                give_back(store, taken)
                return Taken([], tokens), _over_limit(quota.bucket, kind, limit, total - amount)
    return taken, None


def give_back(store: Store, taken: Taken, *, requests: bool = True) -> None:
    """Return what was taken: everything, or only the tokens (``requests=False``: the request was made)."""
    for key, amount, ttl in taken.keys:
        if requests or _is_tokens(key):
            store.incr(key, -amount, ttl)
    taken.keys = []


def settle(store: Store, taken: Taken, actual_tokens: int | None) -> None:
    """Replace the estimated tokens by the reported total (unknown: keep the estimate)."""
    if actual_tokens is None:
        return
    delta = float(actual_tokens - taken.tokens)
    for key, amount, ttl in taken.keys:
        if _is_tokens(key) and delta:
            store.incr(key, delta if amount > 0 else -delta, ttl)
    taken.keys = []


def _is_tokens(key: str) -> bool:
    return key.endswith(":tokens") or ":tpm:" in key or ":tpd:" in key


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


def observe(store: Store, quotas: tuple[Quota, ...], headers: Mapping[str, Any] | None, now: float) -> None:
    """Record the provider's view for the call's buckets. Never raises: a store problem is logged."""
    if not quotas or not headers:
        return
    try:
        for unit, (left, reset) in provider_view(headers, now).items():
            for quota in quotas:
                store.set(f"quota:{quota.bucket}:left:{unit}", repr(left).encode(), ttl_s=max(reset - now, 0.001))
    except Exception as exc:  # noqa: BLE001
        log.warning("quota_store_failed", error_type=type(exc).__name__)


def response_headers(response: Any) -> Mapping[str, Any] | None:
    """Rate-limit headers of a litellm response, stream chunk or exception."""
    hidden = getattr(response, "_hidden_params", None)
    if isinstance(hidden, dict) and isinstance(hidden.get("additional_headers"), Mapping):
        return hidden["additional_headers"]  # type: ignore[no-any-return]
    for source in (getattr(response, "litellm_response_headers", None),
                   getattr(getattr(response, "response", None), "headers", None)):
        if source is not None:
            try:
                return dict(source.items())
            except Exception:  # noqa: BLE001
                continue
    return None


def estimate_needed(quotas: tuple[Quota, ...]) -> bool:
    """Whether the call's token estimate matters (a token limit applies)."""
    return any(quota.limit.tpm or quota.limit.tpd for quota in quotas)


__all__ = ["FREE_BUCKET", "Quota", "Taken", "exhausted", "free_variant", "give_back", "is_free", "observe",
           "provider_view", "quotas_for", "response_headers", "settle", "take"]
