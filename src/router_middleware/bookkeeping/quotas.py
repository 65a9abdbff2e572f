"""Quota counters in the store: what an attempt takes (a request and its token estimate), what
settles the tokens to the reported total, what a failed attempt gives back, and the provider's own
view recorded from its rate-limit headers: set by a settlement (or a failure) that carried them,
counted down by each admission where it still is (it lapses with the provider's reset, often within
milliseconds), and never settled or given back by a count of ours (the provider's next headers say
what it counted; an adjustment made after the view lapsed would bring it back from nothing). What
the limits are and when a bucket is used up is decided in :mod:`router_middleware.routing.quotas`
(pure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..routing.quotas import FREE_BUCKET, Quota, is_tokens, needs, no_provider_quota, over_limit, provider_view, window
from ..stores.base import Addition, Countdown, Put, Within
from .keys import QUOTA


@dataclass
class Taken:
    """What an attempt counted, to settle (tokens) or give back (on a failed attempt)."""

    keys: Sequence[Addition]  # only iterated: a list, or an admission's tuple
    tokens: int


@dataclass(frozen=True, slots=True)
class WindowClaim:
    """One fixed-window counter (requests or tokens a minute or a UTC day) an attempt takes from."""

    within: Within
    bucket: str
    kind: str
    limit: int


def window_claims(quotas: tuple[Quota, ...], tokens: int, now: float) -> tuple[WindowClaim, ...]:
    """One claim per quota and limit (a tuple: with no quota, the empty one, which the collector ignores)."""
    found = []
    for quota in quotas:
        for kind, limit in quota.limit.items():
            key, ttl = window(quota.bucket, kind, now)
            found.append(WindowClaim((QUOTA + key, needs(kind, tokens), float(limit), ttl), quota.bucket, kind, limit))
    return tuple(found)


def took(claims: Sequence[WindowClaim], tokens: int) -> Taken:
    """What an attempt counted by taking ``claims`` (its estimate ``tokens``): each window's addition."""
    return Taken([(c.within[0], c.within[1], c.within[3]) for c in claims], tokens)


def refused(claim: WindowClaim, total: float) -> str:
    return over_limit(claim.bucket, claim.kind, claim.limit, total)


@dataclass(frozen=True, slots=True)
class ViewClaim:
    """The provider's view of one unit (requests or tokens) of a bucket, counted down by an attempt
    where the store holds it (``add_within``'s ``left``)."""

    countdown: Countdown
    bucket: str
    unit: str


def view_claims(quotas: tuple[Quota, ...], tokens: int) -> tuple[ViewClaim, ...]:
    """One countdown per bucket and unit: the store counts down only a view that is there."""
    return tuple(ViewClaim((f"{QUOTA}{quota.bucket}:left:{unit}", amount), quota.bucket, unit)
                 for quota in quotas for unit, amount in (("requests", 1.0), ("tokens", float(tokens))))


def viewed(claim: ViewClaim) -> str:
    return no_provider_quota(claim.bucket, claim.unit)


def give_back(taken: Taken, *, requests: bool = True) -> list[Addition]:
    """What returns everything taken, or only the tokens (``requests=False``: the request was made)."""
    return [(key, -amount, ttl) for key, amount, ttl in taken.keys if requests or is_tokens(key)]


def settlement(taken: Taken, actual_tokens: int | None) -> list[Addition]:
    """What replaces the estimated tokens by the reported total (unknown: keep the estimate)."""
    if actual_tokens is None:
        return []
    delta = float(actual_tokens - taken.tokens)
    if not delta:
        return []
    return [(key, delta if amount > 0 else -delta, ttl) for key, amount, ttl in taken.keys if is_tokens(key)]


def provider_left(quotas: tuple[Quota, ...], headers: Mapping[str, Any] | None, now: float) -> list[Put]:
    """The provider's view (requests and tokens left until its reset) for the call's buckets, to set."""
    if not quotas or not headers:
        return []
    return [(f"{QUOTA}{quota.bucket}:left:{unit}", repr(left).encode(), max(reset - now, 0.001))
            for unit, (left, reset) in provider_view(headers, now).items() for quota in quotas]


FREE_BLOCK_S = 60.0  # the free tier's per-minute window


def free_blocked(quotas: tuple[Quota, ...], error: BaseException) -> list[Put]:
    """A 429 on a free model whose provider said no reset: the free tier is taken as used up for a
    minute (its per-minute window), so the next calls go to paid targets rather than into more 429s
    (where the provider says its reset, :func:`provider_left` sets that instead)."""
    if getattr(error, "status_code", None) != 429:
        return []
    return [(f"{QUOTA}{quota.bucket}:left:requests", b"0.0", FREE_BLOCK_S) for quota in quotas
            if quota.bucket == FREE_BUCKET]
