"""Model facts (prices, context window, prompt-cache rules) from ``litellm.model_cost`` plus overrides.

Prices are resolved through a fallback chain, and the chain step that answered is kept as
``ModelInfo.source``:

1. ``config``: an override given in the configuration;
2. ``catalog:<key>``: the exact id, then the id without the provider prefix, then with the prefix
   litellm infers, then the undated id (``-20250219``, ``@20240307``, ``-latest`` stripped);
3. ``catalog-variant:<key>``: the same model listed under another route (Bedrock ``anthropic.*-v1:0``,
   Vertex AI, Vercel AI Gateway ...), preferring first-party clouds;
4. ``free``: OpenRouter's ``:free`` variants cost 0 (the paid model's window and capabilities);
5. ``local:<provider>``: a model of a runner on the user's machine (Ollama, LM Studio, llamafile,
   Lemonade) costs 0, listed or not (its window where litellm lists it under that name); for those
   prefixes this step comes before 2 and 3 (a cloud's ``deepseek-r1`` is no local model's price);
6. nothing: ``resolve()`` returns ``None`` and pricing falls back to the provider-reported cost, or
   reports the cost as unknown.

Elsewhere a catalog entry whose input and output prices are both 0 counts as unknown, not free
(litellm lists some preview models with price 0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from typing import Any, TypeGuard

_DATE = re.compile(r"(?:[-@](?:20\d{6}|20\d\d-\d\d-\d\d)|-latest)$")
_ROUTE_NOISE = re.compile(r"^(?:(?:us|eu|apac|global)\.)?(?:anthropic\.)?|-v\d+(?::\d+)?$")
_LOCAL_PROVIDERS = frozenset({"ollama", "ollama_chat", "lm_studio", "llamafile", "lemonade"})  # runs on the machine: $0
_VARIANT_PREFERENCE = ("anthropic", "openai", "gemini", "vertex_ai", "bedrock", "azure", "deepseek")


@dataclass(frozen=True, slots=True)
class CacheRules:
    """How a provider's prompt cache behaves, for the replay simulator and cost estimates.

    ``min_tokens``: smallest cacheable prefix; ``unit``: cached prefixes are counted in multiples of
    this; ``caches_output``: the previous reply is cached too (DeepSeek's disk cache);
    ``explicit``: the provider caches only at ``cache_control`` breakpoints (Anthropic);
    ``hit_rate``: the share of implicit-cache hits the provider actually serves (best-effort caches
    such as Gemini's miss some); the simulator credits each hit at this expected value.
    """

    min_tokens: int = 1024
    unit: int = 1
    caches_output: bool = False
    explicit: bool = False
    hit_rate: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Prices are USD per token. ``cache_read``/``cache_write`` default to the input price."""

    model: str
    provider: str | None
    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None
    input_above_200k: float | None = None
    output_above_200k: float | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    cache: CacheRules = CacheRules()
    supports_reasoning: bool | None = None
    reasoning_efforts: frozenset[str] = frozenset()
    minimal_effort: bool | None = None  # the catalog's supports_minimal_reasoning_effort, where it says
    source: str = "catalog"

    def with_overrides(self, **changes: Any) -> ModelInfo:
        return replace(self, **changes)

    def cache_prices(self) -> tuple[float, float] | None:
        """``(read, rewrite)`` per token: a cached read, and re-sending a cached prefix after an edit
        (the input price, or the cache-write price on explicit caches such as Anthropic's). ``None``
        when cached reads are not cheaper than input."""
        read = self.cache_read if self.cache_read is not None else self.input
        if read <= 0 or read >= self.input:
            return None
        rewrite = (self.cache_write or self.input) if self.cache.explicit else self.input
        return read, rewrite


_LARGE_CACHE_FLOOR = re.compile(r"(?:opus|haiku)-4[-.][56](?!\d)")


def cache_rules_for(model: str, provider: str | None) -> CacheRules:
    """Published prompt-cache behaviour per provider family."""
    name = model.lower()
    family = (provider or "").lower()
    if "deepseek" in family or "deepseek" in name:
        return CacheRules(min_tokens=64, unit=64, caches_output=True)
    if "claude" in name or family == "anthropic":
        # Anthropic's minimum cacheable prompt: 4096 tokens for Opus 4.5 and 4.6 and Haiku 4.5, 2048 for
        # the older Haikus, 1024 for the others (Sonnet 4.x, Opus 4 and 4.1, the 3.x models)
        floor = 4096 if _LARGE_CACHE_FLOOR.search(name) else 2048 if "haiku" in name else 1024
        return CacheRules(min_tokens=floor, explicit=True)
    if "gemini" in name and "pro" in name:
        # Measured on recorded gemini-3-pro-preview sessions (via OpenRouter): cached_tokens come in
        # steps of 2048 (from 2048 on) up to the previous request's length, and 22 of the 343 calls
        # that could hit got nothing (implicit caching is best-effort): a 94% hit rate.
        return CacheRules(min_tokens=2048, unit=2048, hit_rate=0.94)
    if "gemini" in name:
        return CacheRules(min_tokens=1024)
    if family in ("openai", "azure") or re.search(r"gpt|o\d", name):
        return CacheRules(min_tokens=1024, unit=128)
    return CacheRules()


def provider_named(model: str, provider: str | None) -> str:
    """``model`` as ``provider`` names it: without litellm's ``provider/`` prefix (``openai/gpt-4o-mini``
    is ``gpt-4o-mini`` to OpenAI)."""
    return model.removeprefix(f"{provider}/") if provider else model


def split_provider(model: str) -> tuple[str | None, str]:
    """``model``'s ``provider/`` prefix (``None`` without one) and the rest."""
    if "/" in model:
        head, tail = model.split("/", 1)
        return head, tail
    return None, model


def _undated(name: str) -> str:
    return _DATE.sub("", name)


def _variant_key(key: str, *, dated: bool = False) -> str:
    last = _ROUTE_NOISE.sub("", key.rsplit("/", 1)[-1].replace("@", "-"))
    return last if dated else _undated(last)


@cache
def _cost_map() -> Mapping[str, Mapping[str, Any]]:
    """litellm's price map: the bundled one, even when litellm was imported first and fetched the
    remote map (unless the user asked for it with ``ROUTER_MIDDLEWARE_REMOTE_COST_MAP=1``)."""
    from ._env import remote_cost_map
    from .wire import litellm as imported

    prices: Mapping[str, Mapping[str, Any]] = imported().model_cost
    if remote_cost_map():
        return prices
    try:
        from litellm.litellm_core_utils import get_model_cost_map as loader

        if loader.get_model_cost_map_source_info()["source"] != "local":
            return _bundled_cost_map()
    except (ImportError, AttributeError, KeyError):  # another litellm layout: use what it loaded
        pass
    return prices


@lru_cache(maxsize=256)
def close_names(name: str, configured: tuple[str, ...] = (), *, models: bool = True) -> tuple[str, ...]:
    """Up to three known names closest to ``name``, best first, never ``name`` itself: among
    ``configured`` (the config's aliases and deployments), then (``models``) litellm's model list. A
    "did you mean" hint for an error path: it scans the whole list (10-40 ms), once per name."""
    from difflib import get_close_matches

    found = get_close_matches(name, [c for c in configured if c != name], n=3, cutoff=0.6)
    if models:  # a name with a provider prefix is matched against the prefixed names
        known = [m for m in (model_names() if "/" in name else _cost_map()) if m != name]
        found += get_close_matches(name, known, n=3, cutoff=0.75)
    return tuple(dict.fromkeys(found))[:3]


def provider_names() -> frozenset[str]:
    """Every provider name a model can have here: litellm's provider prefixes and the providers its
    price map files models under (``vertex_ai-language-models``...)."""
    from .wire import providers

    filed = {entry.get("litellm_provider") for entry in _cost_map().values() if isinstance(entry, Mapping)}
    return frozenset(providers()) | {name for name in filed if isinstance(name, str)}


def model_names() -> Iterator[str]:
    """Every model name litellm's price map knows, bare and with its provider's prefix (an OpenRouter
    model with its ``:free`` variant too)."""
    for key, entry in _cost_map().items():
        provider = entry.get("litellm_provider") if isinstance(entry, Mapping) else None
        prefixed = isinstance(provider, str) and not key.startswith(f"{provider}/")
        names = [key, f"{provider}/{key}"] if prefixed else [key]
        yield from names
        if provider == "openrouter":
            yield from (f"{name}:free" for name in names)


@cache
def _bundled_cost_map() -> Mapping[str, Mapping[str, Any]]:
    from litellm.litellm_core_utils.get_model_cost_map import GetModelCostMap

    return GetModelCostMap.load_local_model_cost_map()


@cache
def _variant_index(dated: bool) -> Mapping[str, tuple[str, ...]]:
    index: dict[str, list[str]] = {}
    for key, entry in _cost_map().items():
        if not isinstance(entry, Mapping) or not _priced(entry):
            continue
        index.setdefault(_variant_key(key, dated=dated), []).append(key)
    return {k: tuple(sorted(v, key=_variant_rank)) for k, v in index.items()}


def _variant_rank(key: str) -> tuple[int, int, int, str]:
    """Prefer global routes, entries that also list cache prices, then first-party clouds."""
    entry = _cost_map()[key]
    provider = str(entry.get("litellm_provider", ""))
    regional = 1 if re.match(r"^(?:[a-z]+\.)anthropic\.|^bedrock/[a-z-]+\d/", key) else 0
    incomplete = 0 if entry.get("cache_read_input_token_cost") else 1
    rank = next((i for i, name in enumerate(_VARIANT_PREFERENCE) if provider.startswith(name)),
                len(_VARIANT_PREFERENCE))
    return (regional, incomplete, rank, key)


def _price(value: Any) -> TypeGuard[int | float]:
    """A price litellm's map may hold: a finite number, not below 0 (not NaN)."""
    return isinstance(value, int | float) and 0 <= value < math.inf


def _priced(entry: Mapping[str, Any]) -> bool:
    """A price per input or output token, and no input or output price that is no price (NaN, say)."""
    prices = [entry.get("input_cost_per_token"), entry.get("output_cost_per_token")]
    return any(prices) and all(value is None or _price(value) for value in prices)


@lru_cache(maxsize=1024)
def _infer_provider(model: str) -> str | None:
    head, _ = split_provider(model)
    if head:
        return head
    entry = _cost_map().get(model)
    if isinstance(entry, Mapping) and entry.get("litellm_provider"):
        return str(entry["litellm_provider"])
    if model.startswith("claude"):
        return "anthropic"
    if model.startswith(("gpt", "o1", "o3", "o4", "chatgpt")):
        return "openai"
    if model.startswith("gemini"):
        return "gemini"
    if model.startswith("deepseek"):
        return "deepseek"
    return None


def _info_from_entry(model: str, provider: str | None, entry: Mapping[str, Any], source: str) -> ModelInfo:
    def num(key: str) -> float | None:  # a price or size: NaN, infinity or below 0 is none known
        value = entry.get(key)
        return float(value) if _price(value) else None

    def integer(key: str) -> int | None:
        value = num(key)
        return int(value) if value is not None else None

    return ModelInfo(
        model=model,
        provider=provider,
        input=num("input_cost_per_token") or 0.0,
        output=num("output_cost_per_token") or 0.0,
        cache_read=num("cache_read_input_token_cost"),
        cache_write=num("cache_creation_input_token_cost") or None,
        reasoning=num("output_cost_per_reasoning_token"),
        input_above_200k=num("input_cost_per_token_above_200k_tokens"),
        output_above_200k=num("output_cost_per_token_above_200k_tokens"),
        max_input_tokens=integer("max_input_tokens"),
        max_output_tokens=integer("max_output_tokens"),
        cache=cache_rules_for(model, provider),
        supports_reasoning=flag if isinstance(flag := entry.get("supports_reasoning"), bool) else None,
        reasoning_efforts=frozenset(
            level for level in ("none", "minimal", "xhigh") if entry.get(f"supports_{level}_reasoning_effort")
        ),
        minimal_effort=flag if isinstance(flag := entry.get("supports_minimal_reasoning_effort"), bool) else None,
        source=source,
    )


def catalog_lookup(model: str) -> ModelInfo | None:
    """Resolve ``model`` against litellm's catalog through the fallback chain (no overrides)."""
    return _catalog_lookup(model)


@cache
def _catalog_lookup(model: str) -> ModelInfo | None:
    if model.startswith("openrouter/") and model.endswith(":free"):
        return _free_variant(model)
    costs = _cost_map()
    provider = _infer_provider(model)
    if provider in _LOCAL_PROVIDERS:  # before any cloud listing of the same name (ollama/deepseek-r1)
        return _local(model, provider, costs.get(model))
    head, bare = split_provider(model)
    candidates = [model, bare]
    if provider and not head:
        candidates.append(f"{provider}/{model}")
    undated = _undated(bare)
    if undated != bare:
        candidates += [undated, f"{undated}-latest"]
        if provider:
            candidates.append(f"{provider}/{undated}")
    for key in dict.fromkeys(candidates):
        entry = costs.get(key)
        if isinstance(entry, Mapping) and _priced(entry):
            return _info_from_entry(model, provider, entry, f"catalog:{key}")
    for dated in (True, False):
        for key in _variant_index(dated).get(_variant_key(bare, dated=dated), ()):
            return _info_from_entry(model, provider, costs[key], f"catalog-variant:{key}")
    return None


def _local(model: str, provider: str, entry: Any) -> ModelInfo:
    """A model a runner on the user's machine serves (Ollama, LM Studio, llamafile, Lemonade): priced
    at zero, as litellm's catalog prices the ones it lists (its window where it lists the model under
    this very name), rather than unknown or at a cloud listing's price."""
    if isinstance(entry, Mapping):
        return replace(_info_from_entry(model, provider, entry, f"local:{provider}"), input=0.0, output=0.0,
                       cache_read=None, cache_write=None, reasoning=None, input_above_200k=None,
                       output_above_200k=None)
    return ModelInfo(model=model, provider=provider, input=0.0, output=0.0,
                     cache=cache_rules_for(model, provider), source=f"local:{provider}")


def _free_variant(model: str) -> ModelInfo:
    """OpenRouter's ``:free`` variant: priced at zero (known, not unknown); window and capabilities
    are the paid model's when the catalog knows it."""
    paid = _catalog_lookup(model.removesuffix(":free"))
    if paid is None:
        return ModelInfo(model=model, provider="openrouter", input=0.0, output=0.0,
                         cache=cache_rules_for(model, "openrouter"), source="free")
    return replace(paid, model=model, input=0.0, output=0.0, cache_read=0.0, cache_write=0.0, reasoning=0.0,
                   input_above_200k=None, output_above_200k=None, source=f"free:{paid.source.split(':', 1)[1]}")


class Catalog:
    """Model facts with user overrides on top of the catalog."""

    def __init__(self, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self._overrides = {k: dict(v) for k, v in (overrides or {}).items()}

    def resolve(self, model: str) -> ModelInfo | None:
        base = catalog_lookup(model)
        override = self._overrides.get(model)
        if override is None:
            return base
        if base is None:
            base = ModelInfo(model=model, provider=_infer_provider(model), input=0.0, output=0.0,
                             cache=cache_rules_for(model, _infer_provider(model)))
        return base.with_overrides(**override, source="config")

    def provider(self, model: str) -> str | None:
        return _infer_provider(model)

    def facts(self, model: str) -> Mapping[str, Any]:
        """The catalog entry behind ``resolve(model)`` (capability flags such as ``supports_vision``)."""
        info = catalog_lookup(model)
        if info is None or ":" not in info.source:
            return {}
        entry = _cost_map().get(info.source.split(":", 1)[1])
        return entry if isinstance(entry, Mapping) else {}
