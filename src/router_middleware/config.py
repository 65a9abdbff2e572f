"""Configuration: pydantic models, loaded from YAML, JSON or a dict. Unknown fields are errors."""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .files import read_text
from .urls import ledger_url_problem, sqlite_problem

PER_MILLION = 1_000_000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``true`` as 1 for a number; in a config that is a slip (YAML's ``yes``, ``on``)."""
        if info.field_name is not None and _has_bool(value) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number, got {_has_bool(value)}")
        return value


def _has_bool(value: Any) -> str | None:
    """``value`` or the first value of a mapping that is a bool, as the config spelled it; else None."""
    values = value.values() if isinstance(value, Mapping) else (value,)
    return next((str(v).lower() for v in values if isinstance(v, bool)), None)


def _numeric(annotation: Any) -> bool:
    """Whether a field holds numbers: ``int``, ``float``, either or None, numeric literals (``version``),
    or a mapping to them."""
    if annotation in (int, float):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return all(type(a) in (int, float) for a in args)
    if origin in (typing.Union, types.UnionType):
        return all(a in (int, float, type(None)) for a in args)
    return origin is dict and len(args) == 2 and args[1] in (int, float)


class ModelOverride(_Strict):
    """Facts about one model that win over litellm's catalog. Prices in USD per million tokens."""

    input_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    output_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_read_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    cache_write_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    reasoning_per_mtok: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    max_input_tokens: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)

    def as_catalog_fields(self) -> dict[str, Any]:
        prices = {
            "input": self.input_per_mtok,
            "output": self.output_per_mtok,
            "cache_read": self.cache_read_per_mtok,
            "cache_write": self.cache_write_per_mtok,
            "reasoning": self.reasoning_per_mtok,
        }
        fields: dict[str, Any] = {k: v / PER_MILLION for k, v in prices.items() if v is not None}
        if self.max_input_tokens is not None:
            fields["max_input_tokens"] = self.max_input_tokens
        if self.max_output_tokens is not None:
            fields["max_output_tokens"] = self.max_output_tokens
        return fields


# litellm kwargs ``summary_params`` may not give, and why (see ``context.summarize.summary_request``:
# its ``**params`` won over the package's model and messages; its caller reads one reply, the first choice)
_SUMMARY_OWN = {
    "model": "set by the package: use context.summary_model",
    "messages": "set by the package: the span to summarize, with its instructions",
    "stream": "not supported: the summary is read as one reply, and a streamed one was neither kept nor "
              "accounted (the digest was sent, the summary's cost unrecorded)",
    "n": "not supported: only the first choice is read, while every choice is paid for",
}


def _summary_param(key: str) -> str:
    """A ``summary_params`` key the package leaves to the config."""
    if key in _SUMMARY_OWN:
        raise ValueError(f"{key!r} is {_SUMMARY_OWN[key]}")
    return key


class ContextConfig(_Strict):
    """How the history is trimmed; see ``router_middleware.context``."""

    enabled: bool = True
    clear_tool_outputs: bool = False
    keep_tool_outputs: int = Field(default=4, ge=0)
    chunk_tokens: int | None = Field(default=None, gt=0)
    payback_calls: float = Field(default=3.0, gt=0)
    tail_tokens: int = Field(default=4000, gt=0)
    exclude_tools: list[str] = Field(default_factory=list)
    clear_tool_inputs: bool = False
    budget_tokens: int | None = Field(default=None, gt=0)
    watermark_tokens: int | None = Field(default=16000, gt=0)
    strategy: Literal["window", "middle-out"] = "window"
    window_keep: float = Field(default=0.05, gt=0, lt=1)
    max_payback_calls: float | None = Field(default=2.0, gt=0)
    digest: bool = True
    digest_share: float = Field(default=0.1, ge=0, lt=1)
    summarize: bool = False
    summary_model: str = "gpt-4o-mini"
    summary_params: dict[Annotated[str, AfterValidator(_summary_param)], Any] = Field(default_factory=dict)
    cache_breakpoints: bool = True
    prompt_cache_key: Literal["auto", "always", "never"] = "auto"

    @field_validator("summary_params")
    @classmethod
    def _metadata_a_mapping(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``metadata`` is merged into the summary call's own: anything but a mapping failed the call."""
        metadata = params.get("metadata")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"metadata: expected a mapping (litellm's metadata), got {type(metadata).__name__} "
                             f"{metadata!r:.60}")
        return params


class MessagesConfig(_Strict):
    """``messages:``: what to do with a request whose tool calls break integrity (a tool result that
    answers no open call, or a call left unanswered before the next turn). By default the call raises
    ``MessageError`` naming the message; ``repair_tool_calls: true`` drops such results, gives each
    unanswered call a ``[no result recorded]`` result, and records a ``messages:repair`` decision."""

    repair_tool_calls: bool = False


class ContextSection(ContextConfig):
    """``context:`` in the config: the defaults, plus per-model overrides keyed by glob."""

    models: dict[str, ContextConfig] = Field(default_factory=dict)

    def base(self) -> ContextConfig:
        return ContextConfig(**self.model_dump(exclude={"models"}))

    def resolved_overrides(self) -> dict[str, ContextConfig]:
        """Each override inherits the fields it does not set from the defaults."""
        base = self.model_dump(exclude={"models"})
        return {pattern: ContextConfig(**{**base, **cfg.model_dump(exclude_unset=True)})
                for pattern, cfg in self.models.items()}


ReasoningLevel = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
# Thinking-token budgets used for providers that take budgets (Anthropic, Gemini 2.5, OpenRouter
# max_tokens), unless ``reasoning.level_budgets`` says otherwise. Anthropic's minimum budget is 1,024.
DEFAULT_LEVEL_BUDGETS: dict[ReasoningLevel, int] = {
    "none": 0, "minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768,
}


class RuleMatch(_Strict):
    """When a reasoning rule applies. Every field that is set must match."""

    step_kind: list[str] = Field(default_factory=list)
    model: str | None = None
    app: str | None = None
    first: bool | None = None
    step: int | None = Field(default=None, ge=0)
    every: int | None = Field(default=None, gt=0)


class ReasoningRule(_Strict):
    """``mode: cap`` (default) never raises what the caller asked for, when it asked; ``set`` does."""

    when: RuleMatch = Field(default_factory=RuleMatch)
    effort: ReasoningLevel | None = None
    budget_tokens: int | None = Field(default=None, ge=0)
    mode: Literal["cap", "set"] = "cap"

    def model_post_init(self, __context: Any) -> None:
        if (self.effort is None) == (self.budget_tokens is None):
            raise ValueError("give exactly one of 'effort' or 'budget_tokens'")


class ReasoningConfig(_Strict):
    """Reasoning caps. The first rule that matches a call sets its level (or token budget)."""

    enabled: bool = True
    rules: list[ReasoningRule] = Field(default_factory=list)
    session_budget_tokens: int | None = Field(default=None, ge=0)
    # A call's expected reasoning (its level's tokens) is held on the session's budget while it runs,
    # for at most this long (one whose settlement never reached the store lapses after it).
    reservation_ttl_s: float = Field(default=600.0, gt=0)
    escalate: bool = True
    exclude_from_response: bool = False
    level_budgets: dict[ReasoningLevel, int] = Field(default_factory=dict)

    @field_validator("level_budgets")
    @classmethod
    def _budgets_in_order(cls, budgets: dict[ReasoningLevel, int]) -> dict[ReasoningLevel, int]:
        """Each level's budget 0 or more, and none below a lower level's (the defaults fill the rest):
        a cap would otherwise raise the budget of the level it caps to."""
        negative = sorted(level for level, tokens in budgets.items() if tokens < 0)
        if negative:
            raise ValueError(f"a budget below 0 for {negative}: give 0 or more tokens")
        merged = {**DEFAULT_LEVEL_BUDGETS, **budgets}
        levels = typing.get_args(ReasoningLevel)
        for lower, higher in zip(levels, levels[1:], strict=False):
            if merged[lower] > merged[higher]:
                raise ValueError(f"'{lower}' ({merged[lower]} tokens) is above '{higher}' ({merged[higher]}, "
                                 f"{'given' if higher in budgets else 'the default'}): each level's budget must "
                                 "be at least the one below it")
        return budgets


_EMBEDDER_FORMS = "use 'local' or 'litellm:<embedding model>', e.g. 'litellm:text-embedding-3-small'"


def _embedder(value: str) -> str:
    """``local`` or ``litellm:<embedding model>``, the embedders the semantic cache builds (any other
    value was read as ``local``); refused otherwise, with the form meant when one is close."""
    kind, _, given = value.partition(":")
    model = given.strip()
    if value == "local" or (kind == "litellm" and model and model == given):
        return value
    close = difflib.get_close_matches(kind.strip().lower(), ("local", "litellm"), n=1)
    if close == ["litellm"] and not model:
        raise ValueError(f"{value!r} names no embedding model ({_EMBEDDER_FORMS})")
    meant = "local" if close == ["local"] and not model else f"litellm:{model}" if close == ["litellm"] else None
    raise ValueError(f"unknown embedder {value!r} ({_EMBEDDER_FORMS})"
                     + (f"; did you mean {meant!r}?" if meant else ""))


class SemanticCacheConfig(_Strict):
    """Paraphrase hits (extra ``semantic``); see ``router_middleware.semantic``."""

    enabled: bool = False
    threshold: float = Field(default=0.9, gt=0, le=1)
    embedder: str = "local"  # or "litellm:<embedding model>"
    _known_embedder = field_validator("embedder")(_embedder)
    number_guard: bool = True
    text_guards: bool = True  # identifiers, negation and direction must agree too
    max_per_scope: int = Field(default=200, gt=0)


_STORE_SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix")
_REDIS_SCHEMES = ("redis", "rediss", "unix")


def _store_scheme(url: str | None) -> str | None:
    """A store URL whose scheme is one :func:`~router_middleware.stores.open_store` opens, a SQLite
    URL's path, and a Redis URL's port and database as redis-py reads them; refused at load otherwise
    (the error names the scheme or the part, not the URL, which may hold a password)."""
    if not url:
        return url
    if ":" not in url:
        raise ValueError("no scheme (use memory://, sqlite:///PATH or redis://HOST:PORT/DB)")
    scheme = url.split("://", 1)[0] if "://" in url else url.split(":", 1)[0]
    if scheme.lower() not in _STORE_SCHEMES:  # a scheme's case does not matter (open_store lowers it)
        close = difflib.get_close_matches(scheme, _STORE_SCHEMES, n=1)
        raise ValueError(f"unsupported scheme {scheme!r} (use memory://, sqlite:///PATH or redis://HOST:PORT/DB)"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    problem = _redis_problem(url) if scheme.lower() in _REDIS_SCHEMES else None
    if scheme.lower() == "sqlite":
        problem = sqlite_problem(url)
    if problem:
        raise ValueError(problem)
    return url


def _redis_problem(url: str) -> str | None:
    """What redis-py would refuse with a bare ValueError (or, a database that is no number, read as 0)
    in a Redis URL: its form, port or database; ``None`` when nothing. A value is quoted only when no
    part of the password can be in it: every ``@`` of the URL is before its host."""
    if "://" not in url:
        return "a Redis URL starts with redis://, rediss:// or unix:// (redis://HOST:PORT/DB)"
    parts = urlsplit(url)
    quotable = "@" not in parts.path + parts.query + parts.fragment  # else a '/', '?' or '#' in the password cut it
    db = parse_qs(parts.query).get("db", [None])[0]
    if parts.scheme.lower() != "unix":
        port = _port_text(parts.netloc)
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            return (f"port {port!r}" if quotable else "its port") + " is not a number from 1 to 65535"
        db = unquote(parts.path).replace("/", "") if db is None else db  # as redis-py reads it
    if db and not (db.isascii() and db.isdigit()):
        return (f"database {db!r}" if quotable else "its database") + " is not a whole number (redis://HOST:PORT/DB)"
    return None


def _port_text(netloc: str) -> str:
    """A URL's port as written, found as urllib finds it ('' when none): after the host's first ':',
    or after an IPv6 host's ']'."""
    host = netloc.rpartition("@")[2]
    _, bracket, inside = host.partition("[")
    return (inside.partition("]")[2] if bracket else host).partition(":")[2]


class CacheConfig(_Strict):
    """The exact response cache (see ``router_middleware.cache``)."""

    enabled: bool = True
    store: str | None = None  # default: the top-level ``store``
    ttl_s: float = Field(default=3600.0, gt=0)
    _known_store = field_validator("store")(_store_scheme)
    max_entries: int = Field(default=10_000, gt=0)
    policy: Literal["temperature0", "opt-in", "always"] = "temperature0"
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)


class Tier(_Strict):
    max_score: float = Field(ge=0, le=1)
    alias: str


class ScorerConfig(_Strict):
    """What scores a request's difficulty for ``tiers``: the hand-set heuristic (``fitted`` unset), or
    a fitted file (``bundled``: the one shipped, or a ``fit-router`` output path). ``strength``: a
    model's strength on the fitted file's scale (its mean judged score, 0..1), for models it lacks.
    ``embeddings``: add the fitted file's embedding term (a MiniLM embedding of each request; needs
    the ``semantic`` extra and costs milliseconds per request); off, or without the extra, the core
    path (the heuristic rescaled, well under a millisecond)."""

    fitted: str | None = None
    strength: dict[str, float] = Field(default_factory=dict)
    embeddings: bool = False

    def model_post_init(self, __context: Any) -> None:
        for name, value in self.strength.items():
            if not 0 <= value <= 1:
                raise ValueError(f"strength of {name!r} is {value}; give a number in 0..1 (its mean judged score)")
        if self.fitted is not None:
            from .errors import RouterMiddlewareError
            from .routing.fitted import load_fitted

            try:
                fitted = load_fitted(self.fitted)
            except RouterMiddlewareError as exc:  # names the file and what is wrong with it
                raise ValueError(str(exc)) from None
            if self.embeddings and fitted.embedding is None:
                raise ValueError(f"embeddings: the fitted file {self.fitted!r} has no embedding term (fit it with the "
                                 "semantic extra installed)")
        if self.embeddings:
            from .routing.fitted import embeddings_installed

            if self.fitted is None:
                raise ValueError("embeddings: applies to a fitted scorer only; set 'fitted' too")
            if not embeddings_installed():
                raise ValueError("embeddings: needs the semantic extra: pip install 'router-middleware[semantic]'")


class FallbackConfig(_Strict):
    attempts_per_model: int = Field(default=1, ge=1)
    backoff_s: float = Field(default=0.5, ge=0)
    max_backoff_s: float = Field(default=8.0, ge=0)

    def model_post_init(self, __context: Any) -> None:
        if self.max_backoff_s < self.backoff_s:  # the cap would shorten the first wait below backoff_s
            raise ValueError(f"max_backoff_s {self.max_backoff_s:g} is below backoff_s {self.backoff_s:g}, "
                             "the first wait it caps")


class CooldownConfig(_Strict):
    """A target that fails ``failures`` times within ``window_s`` is skipped for ``cooldown_s``; then it
    is half-open (for ``cooldown_s`` more at most): one call at a time probes it, holding the probe
    for ``probe_s`` at most, while the others skip it, until a probe succeeds (closed) or fails (open
    again)."""

    failures: int = Field(default=3, ge=1)
    window_s: float = Field(default=60.0, gt=0)
    cooldown_s: float = Field(default=30.0, gt=0)
    probe_s: float = Field(default=30.0, gt=0)


class BudgetConfig(_Strict):
    """A spending limit. ``scope``: one budget per app, tenant, session, user, or one for everything."""

    name: str
    scope: Literal["app", "tenant", "session", "user", "global"] = "app"
    usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    tokens: int | None = Field(default=None, gt=0)
    window_s: float | None = Field(default=None, gt=0)  # None: never resets
    soft: float = Field(default=0.8, gt=0, le=1)
    downgrade_to: str | None = None
    # The store does not answer at admission: ``open`` lets calls through (their spend is still
    # settled once it answers), ``closed`` refuses them with StoreUnavailable.
    on_store_error: Literal["open", "closed"] = "open"
    # A call's reservation counts this long unless it is settled first: one whose settlement never
    # reached the store (an outage) stops holding the budget after it.
    reservation_ttl_s: float = Field(default=600.0, gt=0)

    @field_validator("name")
    @classmethod
    def _keyable(cls, name: str) -> str:
        """The name keys the budget's counters (``name:unit:whose:window``): a blank or ``:`` in it
        would read as another budget's or another scope's counter."""
        if not name.strip() or ":" in name:
            raise ValueError(f"budget name {name!r}: give a non-blank name without ':' (it keys the budget's "
                             "counters in the store)")
        return name

    def model_post_init(self, __context: Any) -> None:
        if self.usd is None and self.tokens is None:
            raise ValueError(f"budget {self.name!r} needs 'usd' or 'tokens'")


class RateLimit(_Strict):
    """Requests and tokens per minute and per UTC day; unset: no limit."""

    rpm: int | None = Field(default=None, gt=0)
    rpd: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    tpd: int | None = Field(default=None, gt=0)

    def model_post_init(self, __context: Any) -> None:
        if not self.items():
            raise ValueError("a rate limit needs at least one of rpm, rpd, tpm or tpd; none is set, so it "
                             "would limit nothing")

    def items(self) -> list[tuple[str, int]]:
        return [(kind, limit) for kind in ("rpm", "rpd", "tpm", "tpd") if (limit := getattr(self, kind)) is not None]


class FreeTierConfig(_Strict):
    """OpenRouter's ``:free`` variants, tried first while the account's free quota lasts.

    ``models``: the OpenRouter models (``openrouter/...``) whose free variant to prefer, or ``["*"]``
    for every OpenRouter candidate. The quota is account-wide: ``rpm`` requests a minute, and a day
    ``rpd``, by default 50, or 1,000 once ``credits_purchased_usd`` reaches 10 (OpenRouter's rule).
    """

    prefer: bool = False
    models: list[str] = Field(default_factory=list)
    credits_purchased_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    rpm: int = Field(default=20, gt=0)
    rpd: int | None = Field(default=None, gt=0)

    @field_validator("models")
    @classmethod
    def _openrouter_models(cls, models: list[str]) -> list[str]:
        """Only OpenRouter has ``:free`` variants: any other name would be skipped without a word."""
        for model in models:
            if model != "*" and not model.startswith("openrouter/"):
                raise ValueError(f"{model!r} is not an OpenRouter model: free variants exist only as "
                                 f"openrouter/<model>:free (write 'openrouter/{model}', or '*' for every "
                                 "OpenRouter candidate)")
        return models

    def limit(self) -> RateLimit:
        daily = self.rpd or (1000 if self.credits_purchased_usd >= 10 else 50)
        return RateLimit(rpm=self.rpm, rpd=daily)

    def applies_to(self, model: str) -> bool:
        return self.prefer and model.startswith("openrouter/") and not model.endswith(":free") and (
            "*" in self.models or model in self.models)


class Deployment(_Strict):
    """A named way to reach a model: its own endpoint and key (read from an environment variable)."""

    model: str
    api_base: str | None = None
    api_key_env: str | None = None
    timeout_s: float | None = Field(default=None, gt=0)

    @property
    def own_endpoint(self) -> bool:
        """Whether calls to it go to an endpoint or with a key of its own (not the caller's)."""
        return bool(self.api_base or self.api_key_env)


class AffinityConfig(_Strict):
    """A session (``session_id``) routed through tiers stays on the target holding its prompt cache
    unless a move pays back within ``horizon_calls`` calls. What it last used is remembered for
    ``ttl_s`` after each call (about a provider cache's life: Anthropic's default is 5 minutes,
    refreshed on each hit)."""

    enabled: bool = True
    horizon_calls: float = Field(default=10.0, gt=0)
    ttl_s: float = Field(default=300.0, gt=0)


class EscalationConfig(_Strict):
    """After a failed step (``reasoning.signals.failure_signal``) a session's next call goes one tier
    up; it may come back down (if the cache rule allows) after ``return_after`` good steps."""

    enabled: bool = True
    return_after: int = Field(default=3, ge=1)


class RoutingConfig(_Strict):
    """Aliases (``coder: [anthropic/claude-sonnet-4-5, openai/gpt-5-mini]``), strategies, tiers.

    An alias lists model ids or names from ``deployments``."""

    aliases: dict[str, list[str]] = Field(default_factory=dict)
    deployments: dict[str, Deployment] = Field(default_factory=dict)
    strategy: dict[str, Literal["ordered", "price", "throughput", "latency", "weighted", "difficulty"]] = Field(
        default_factory=dict)
    # for "weighted": target -> weight (default 1)
    weights: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    tiers: list[Tier] = Field(default_factory=list)
    scorer: ScorerConfig = Field(default_factory=ScorerConfig)
    allow_providers: list[str] = Field(default_factory=list)
    deny_providers: list[str] = Field(default_factory=list)
    require_reasoning_support: bool = False
    expected_cache_share: float = Field(default=0.0, ge=0, le=1)
    fallback: FallbackConfig = Field(default_factory=FallbackConfig)
    cooldown: CooldownConfig = Field(default_factory=CooldownConfig)
    budgets: list[BudgetConfig] = Field(default_factory=list)
    default_output_tokens: int = Field(default=512, gt=0)  # output estimate before replies were seen
    output_percentile: float = Field(default=0.9, gt=0, le=1)  # of recent replies: the learned estimate
    limits: dict[str, RateLimit] = Field(default_factory=dict)  # target (model id or deployment) -> our limits
    free_tier: FreeTierConfig = Field(default_factory=FreeTierConfig)
    affinity: AffinityConfig = Field(default_factory=AffinityConfig)
    escalation: EscalationConfig = Field(default_factory=EscalationConfig)
    step_kind_tiers: dict[str, str] = Field(default_factory=dict)  # step kind -> the lowest tier alias it gets

    def tier_index(self, alias: str) -> int | None:
        """The position of ``alias`` in ``tiers`` (weakest first), or ``None``."""
        return next((i for i, tier in enumerate(self.tiers) if tier.alias == alias), None)

    def tier_model(self, tier: Tier) -> str:
        """The model a tier's strength is looked up by: its alias's first target (a deployment's model)."""
        first = (self.aliases.get(tier.alias) or [""])[0]
        return self.deployments[first].model if first in self.deployments else first

    def route_names(self) -> tuple[str, ...]:
        """The names a call's ``model`` routes by: the aliases, the deployments, and ``auto`` with tiers
        (an alias also takes a ``:floor`` or ``:nitro`` suffix)."""
        return (*self.aliases, *self.deployments, *(("auto",) if self.tiers else ()))

    def split_route(self, requested: str) -> tuple[str, str, str]:
        """``requested`` as ``(name, ":", suffix)``: ``coder:floor`` is the alias ``coder`` with a suffix;
        an alias or deployment named with a ``:`` (``qwen2.5-coder:7b``) is that name whole, also
        before a suffix (``qwen2.5-coder:7b:floor``)."""
        if requested in self.aliases or requested in self.deployments:
            return requested, "", ""
        head, colon, suffix = requested.rpartition(":")
        if colon and (head in self.aliases or head in self.deployments):
            return head, colon, suffix
        return requested.partition(":")

    def baseline_target(self, requested: str) -> str:
        """The target a call naming ``requested`` would go to without routing, its saving measured
        against: an alias's first target (with or without a ``:floor``/``:nitro`` suffix; ``auto``:
        the top tier's, as an alias whose strategy is ``difficulty``), else ``requested`` itself (a
        model id, a deployment)."""
        alias, _, suffix = self.split_route(requested)
        by_tier = (alias == "auto" and "auto" not in self.aliases) or (
            not suffix and self.strategy.get(alias) == "difficulty")  # a suffix's strategy wins over it
        if self.tiers and by_tier:
            alias = self.tiers[-1].alias
        targets = self.aliases.get(alias)
        return targets[0] if targets else requested

    def alias_targets(self) -> set[str]:
        """Every target some alias lists (a model id or a deployment name)."""
        return {target for models in self.aliases.values() for target in models}

    def model_post_init(self, __context: Any) -> None:
        names = [budget.name for budget in self.budgets]
        if len(set(names)) < len(names):  # the name keys a budget's counters in the store
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"budgets: each needs its own name; {', '.join(map(repr, twice))} is used twice")
        for budget in self.budgets:
            if budget.downgrade_to and budget.downgrade_to not in self.aliases:
                raise ValueError(f"budget {budget.name!r}: downgrade_to {budget.downgrade_to!r} is not an alias")
        for tier in self.tiers:
            if tier.alias not in self.aliases:
                raise ValueError(f"tier alias {tier.alias!r} is not defined under 'aliases'")
        for before, tier in zip(self.tiers, self.tiers[1:], strict=False):  # the first tier a score fits wins
            if self.scorer.fitted is None and tier.max_score <= before.max_score:  # (a fitted one scores each)
                raise ValueError(f"tiers: {tier.alias!r} (max_score {tier.max_score}) follows {before.alias!r} "
                                 f"(max_score {before.max_score}), so no score would reach it: list the tiers "
                                 "by increasing max_score")
        for name, strategy in self.strategy.items():
            if name not in self.aliases:
                raise ValueError(f"strategy.{name}: {name!r} is not an alias under 'aliases' "
                                 f"(the aliases: {', '.join(map(repr, self.aliases)) or 'none'})")
            if strategy == "difficulty" and not self.tiers:
                raise ValueError(f"strategy.{name}: 'difficulty' routes by 'tiers', and none are set")
        targets = self.alias_targets()
        for name in self.weights:  # a target, or the :free variant the free tier puts before one
            if name not in targets and name.removesuffix(":free") not in targets:
                raise ValueError(f"weights.{name}: {name!r} is the target of no alias under 'aliases'")
        for kind, alias in self.step_kind_tiers.items():
            if self.tier_index(alias) is None:
                raise ValueError(f"step_kind_tiers.{kind}: {alias!r} is not the alias of a tier under 'tiers'")
        if self.scorer.fitted is not None:
            from .routing.fitted import load_fitted

            fitted = load_fitted(self.scorer.fitted)
            for tier in self.tiers:
                model = self.tier_model(tier)
                if model and fitted.strength_of(model, self.scorer.strength) is None:
                    raise ValueError(f"tier {tier.alias!r}: the fitted scorer has no strength for {model!r}; "
                                     f"add it under routing.scorer.strength (0..1, e.g. "
                                     f"gpt-4-1106-preview is {fitted.strength.get('gpt-4-1106-preview', 0.87)})")
        for name, models in self.aliases.items():
            if not models:
                raise ValueError(f"alias {name!r} has no models")
            if name in self.deployments:  # a call naming it goes to the deployment: the list never runs
                raise ValueError(f"alias {name!r} is also the name of a deployment under 'deployments', which a "
                                 f"call naming it goes to, so the alias's models would never be tried: rename "
                                 f"the alias (e.g. {name + '-pool'!r}) and call that")
        if self.free_tier.prefer and not self.free_tier.models:
            raise ValueError("free_tier.prefer needs 'models': the OpenRouter models to try free first, or ['*']")


class LedgerConfig(_Strict):
    """Where every call is recorded: ``sqlite:///path.db`` or ``postgresql://...``; off when unset."""

    url: str | None = None
    spool: str | None = None  # folder for rows not written yet (default: beside a SQLite ledger, see docs/ledger.md)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str | None) -> str | None:
        """Refused at load, not at the first row (which would go to the spool for good): a scheme the
        ledger does not open, a SQLite URL it would misread, and a scheme missing its ``//`` (read as a
        file path: ``sqlite:x.db`` was a file of that name). The URL is not quoted: it may hold a password."""
        problem = ledger_url_problem(url) if url else None
        if problem:
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _spool_needs_a_url(self) -> LedgerConfig:
        """A spool without a url is a ledger meant on and left off: said at load, not found out later."""
        if self.spool is not None and self.url is None:
            raise ValueError("spool is set but url is not, so nothing would be recorded: add url "
                             "(sqlite:///path.db or postgresql://...), or remove the ledger section")
        return self


class RedactionRule(_Strict):
    pattern: str
    replacement: str = "[REDACTED]"

    @field_validator("pattern")
    @classmethod
    def _a_regular_expression(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc}): {pattern!r}") from None
        return pattern


class TelemetryConfig(_Strict):
    """Spans and metrics go to the global OpenTelemetry API; message content only when asked."""

    enabled: bool = True
    capture_content: bool = False
    openinference: bool = False
    redact: list[RedactionRule] = Field(default_factory=list)
    # Attribute names of the GenAI conventions that changed: ``current``, ``legacy`` or ``both``.
    # Unset: ``current`` when OTEL_SEMCONV_STABILITY_OPT_IN has gen_ai_latest_experimental, else ``both``.
    semconv: Literal["current", "legacy", "both"] | None = None


class ProxyConfig(_Strict):
    """Behind the LiteLLM proxy. ``key_labels``: whose ``user`` and ``tenant`` label a call made with a
    proxy key that has a ``user_id`` or a ``team_id``: ``only`` the key's (what it lacks stays unset;
    what the client names is dropped), ``first`` the key's where it has them and the client's where it
    lacks one, ``off`` the client's (the key is not read). A key with neither (the master key) keeps
    the client's labels in each."""

    key_labels: Literal["only", "first", "off"] = "only"


class Config(_Strict):
    """The whole configuration. ``Config()`` is a pass-through that still accounts and traces."""

    version: Literal[1] = 1
    app: str | None = None
    store: str = "memory://"  # state shared by the policies: summaries, reasoning spend
    _known_store = field_validator("store")(_store_scheme)
    # A Redis operation that takes longer fails (the feature's store-error path applies), and Redis is
    # not asked again for as long: a call meets one timeout during an outage. SQLite waits as long for
    # another connection's write lock.
    store_timeout_s: float = Field(default=0.5, gt=0, le=60)
    models: dict[str, ModelOverride] = Field(default_factory=dict)
    messages: MessagesConfig = Field(default_factory=MessagesConfig)
    context: ContextSection = Field(default_factory=ContextSection)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    reasoning: ReasoningConfig = Field(default_factory=ReasoningConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    proxy: ProxyConfig = Field(default_factory=ProxyConfig)

    def catalog_overrides(self) -> dict[str, dict[str, Any]]:
        return {name: o.as_catalog_fields() for name, o in self.models.items()}


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        loc = item["loc"][:-1] if item["loc"][-1:] == ("[key]",) else item["loc"]  # a mapping's key: named by it
        field = ".".join(str(p) for p in loc) or "(root)"
        if item["type"] == "extra_forbidden":  # a typo, usually: name the fields there are
            known = _fields_at(Config, item["loc"][:-1])
            close = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(known)}"
            lines.append(f"{source}: field '{field}': unknown field; {hint}" if known else
                         f"{source}: field '{field}': {item['msg']}")
            continue
        lines.append(f"{source}: field '{field}': {item['msg']}")
    return "\n".join(lines)


def _fields_at(model: type[BaseModel], path: tuple[int | str, ...]) -> list[str]:
    """The field names of the section of ``model`` at ``path`` (through nested sections, and the
    values of mappings and lists of sections); none when it is not a section."""
    current: Any = model
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel):
            found = current.model_fields.get(str(part))
            current = found.annotation if found is not None else None
        else:  # a mapping's value or a list's item, named by its key or index
            current = (typing.get_args(current) or (None,))[-1]
        while typing.get_origin(current) in (typing.Union, types.UnionType):  # X | None: the section
            current = next((a for a in typing.get_args(current) if a is not type(None)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


MAX_CONFIG_VALUES = 100_000  # values in a config once YAML aliases are expanded; real ones have hundreds


def _expands_past(data: Any, limit: int) -> bool:
    """Whether ``data`` holds more than ``limit`` values counting every alias as a copy (iterative:
    stops at the limit, never expands anything)."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            return True
        if isinstance(item, dict):
            stack.extend(item.values())
            stack.extend(item.keys())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _parse_problem(exc: Exception) -> str:
    """One line naming where a YAML or JSON file stops parsing."""
    if isinstance(exc, json.JSONDecodeError):
        return f"line {exc.lineno}, column {exc.colno}: not valid JSON: {exc.msg}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    started = getattr(exc, "context_mark", None)
    after = f" ({context} at line {started.line + 1})" if context and started is not None else ""
    return f"{where}not valid YAML: {problem}{after}"


def load_config(source: Config | Mapping[str, Any] | str | Path | None) -> Config:
    """Load and validate a config from a ``Config``, a dict, or a YAML/JSON file path."""
    if source is None:
        return Config()
    if isinstance(source, Config):
        return source
    label = "config"
    data: Any
    if isinstance(source, str | Path):
        path = Path(source)
        label = str(path)
        text = read_text(path, ConfigError, "config file")
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"{label}: {_parse_problem(exc)}") from None
        if _expands_past(data, MAX_CONFIG_VALUES):
            raise ConfigError(f"{label}: expands to more than {MAX_CONFIG_VALUES:,} values once its YAML aliases "
                              "are resolved (an alias bomb?); write the values out")
        data = data or {}
    else:
        data = source
    if not isinstance(data, Mapping):
        raise ConfigError(f"{label}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, label)) from None
