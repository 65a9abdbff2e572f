"""Usage -> Cost, with the price source recorded."""

from __future__ import annotations

from .catalog import ModelInfo
from .types import ContextTokens, Cost, Usage

LONG_CONTEXT = 200_000


def price(usage: Usage, info: ModelInfo | None, *, reported_usd: float | None = None) -> Cost:
    """Price ``usage`` with ``info``'s per-token prices.

    Uncached input is billed at the input price, cache reads at ``cache_read`` and cache writes at
    ``cache_write`` (each defaulting to the input price), output at the output price; reasoning is
    billed as output unless the model has its own reasoning price. Above 200k input tokens the
    catalog's long-context prices apply when it has them.

    ``reported_usd`` is the provider's own figure (OpenRouter's ``usage.cost``): it becomes the total
    (source ``provider_reported``) and the components are scaled to add up to it.
    """
    if usage.source == "cache":
        return Cost.zero("response_cache")
    if info is None:
        if reported_usd is not None:
            return Cost(None, None, reported_usd, source="provider_reported")
        return Cost.unknown()
    long = usage.input_tokens > LONG_CONTEXT
    input_price = (info.input_above_200k if long and info.input_above_200k else info.input)
    output_price = (info.output_above_200k if long and info.output_above_200k else info.output)
    read_price = info.cache_read if info.cache_read is not None else input_price
    write_price = info.cache_write if info.cache_write is not None else input_price
    reasoning_price = info.reasoning if info.reasoning is not None else output_price

    cache_read = usage.cache_read_tokens * read_price
    cache_write = usage.cache_write_tokens * write_price
    input_usd = usage.uncached_input_tokens * input_price + cache_read + cache_write
    reasoning = usage.reasoning_tokens * reasoning_price
    output_usd = (usage.output_tokens - usage.reasoning_tokens) * output_price + reasoning
    total = input_usd + output_usd
    if reported_usd is None:
        return Cost(input_usd, output_usd, total, cache_read, cache_write, reasoning, source=info.source)
    scale = reported_usd / total if total > 0 else 0.0
    return Cost(
        input_usd * scale, output_usd * scale, reported_usd,
        cache_read * scale, cache_write * scale, reasoning * scale,
        source="provider_reported",
    )


def context_saving(usage: Usage, info: ModelInfo | None, tokens: ContextTokens) -> float | None:
    """What the context policies saved a call (negative: what they cost it) on its input, from the
    usage the provider reported: the untouched request's input, priced as it would have been billed
    (its part earlier requests sent read from the prompt cache where the provider would have cached
    it, its ``fresh`` part written), less the input as sent and billed. A cut that breaks the cached
    prefix pays the re-read of what follows it here, and a cache breakpoint its write premium.
    ``None`` where it cannot be priced (no price, no input)."""
    if info is None or usage.input_tokens <= 0 or tokens.sent <= 0:
        return None
    scale = usage.input_tokens / tokens.sent  # the provider's count per local token
    whole = max(0, round(usage.input_tokens + scale * (tokens.untouched - tokens.sent)))
    fresh = min(whole, round(scale * tokens.fresh)) if tokens.cached else 0
    untouched = Usage(whole, usage.output_tokens, cache_read_tokens=whole - fresh if tokens.cached else 0,
                      cache_write_tokens=fresh, reasoning_tokens=usage.reasoning_tokens)
    baseline, sent = price(untouched, info).input_usd, price(usage, info).input_usd
    return baseline - sent if baseline is not None and sent is not None else None
