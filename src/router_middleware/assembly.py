"""Wiring: build the policy chain, stores, response cache, ledger and telemetry from a ``Config``.

The one module that knows every component; none of them imports it (as structlog's ``_config.py``).
Everything here runs once per engine, never per call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any
from weakref import WeakValueDictionary

from .bookkeeping import Bookkeeper, keys
from .cache import ResponseCache
from .catalog import Catalog, close_names, model_names, provider_names
from .config import Config, TelemetryConfig
from .errors import ConfigError, MissingExtra
from .ledger import LedgerWriter
from .policies import Policy, PolicyState
from .stores import Store, StoreView, open_store
from .stores.base import number
from .stores.memory import MemoryStore
from .telemetry import Redactor, TelemetrySettings, log
from .telemetry.attributes import semconv_mode
from .types import SessionRoute
from .wire import provider_known

_SAID: WeakValueDictionary[int, Config] = WeakValueDictionary()  # configs whose problems were logged


@dataclass(frozen=True)
class Parts:
    """An engine's components, built once from its config."""

    config: Config
    catalog: Catalog
    policies: tuple[Policy, ...]
    store: Store
    state: PolicyState
    telemetry: TelemetrySettings
    ledger: LedgerWriter | None
    cache: ResponseCache | None
    books: Bookkeeper
    unpriced: tuple[tuple[str, str], ...] = ()  # alias targets of no price: said at the first call (Engine.start)


def build_policies(config: Config) -> tuple[Policy, ...]:
    """The policies ``config`` asks for, in order: routing, reasoning, context."""
    from .context import ContextPolicy
    from .reasoning import ReasoningPolicy
    from .routing.policy import RoutingPolicy

    context = ContextPolicy(config.context.base(), config.context.resolved_overrides()) \
        if config.context.enabled else None
    policies: list[Policy] = []
    if config.routing.aliases or config.routing.budgets or config.routing.deployments:  # a deployment by name too
        policies.append(RoutingPolicy(config.routing, fit=context))  # judges windows on the trimmed request
    if config.reasoning.enabled:
        policies.append(ReasoningPolicy(config.reasoning))
    if context is not None:
        policies.append(context)
    return tuple(policies)


def given_policies(policies: Iterable[Policy]) -> tuple[Policy, ...]:
    """``policies=`` as given (any iterable), when its items are callables; else :class:`ConfigError`
    naming the item."""
    if isinstance(policies, str | bytes | Mapping) or not isinstance(policies, Iterable):
        raise ConfigError(f"policies: expected a list of policies (callables taking a Plan and a PolicyState), "
                          f"got {type(policies).__name__}")
    policies = tuple(policies)
    for n, policy in enumerate(policies):
        if not callable(policy):
            raise ConfigError(f"policies[{n}]: expected a policy (a callable taking a Plan and a PolicyState), "
                              f"got {type(policy).__name__} {policy!r:.60}")
    return policies


def telemetry_settings(config: TelemetryConfig, endpoints: Mapping[str, str]) -> TelemetrySettings:
    """The telemetry settings; ``endpoints``: where each deployment or served name sends its calls (the
    policies' map, :attr:`.PolicyState.endpoints`, shared: its spans' ``server.address``)."""
    return TelemetrySettings(enabled=config.enabled, capture_content=config.capture_content,
                             openinference=config.openinference,
                             redactor=Redactor(tuple((r.pattern, r.replacement) for r in config.redact)),
                             semconv=semconv_mode(config.semconv), endpoints=endpoints)


def policy_state(store: Store, catalog: Catalog) -> PolicyState:
    """What the policies read, as views of the store. Over the network, values that may lag by a
    second (cooldowns, speed averages, budget and quota totals) are read at most once a second (a
    call's lifecycle serves such a value for a second more while one call reads it again): the
    admission step checks budgets and quotas again, atomically, so a lagging read never passes a limit."""
    lag = _lag(store)
    return PolicyState(
        catalog=catalog,
        summaries=StoreView(store, keys.SUMMARY, bytes.decode),
        reasoning_spent=StoreView(store, keys.REASONING, lambda raw: int(number(raw))),
        cooldowns=StoreView(store, keys.COOLDOWN, number, fresh_s=lag),
        throughput=StoreView(store, keys.THROUGHPUT, number, fresh_s=lag),
        latency=StoreView(store, keys.LATENCY, number, fresh_s=lag),
        budget_spent=StoreView(store, keys.BUDGET, number, fresh_s=lag),
        quotas=StoreView(store, keys.QUOTA, number, fresh_s=lag),  # admission re-checks atomically
        sessions=StoreView(store, keys.SESSION_ROUTE, SessionRoute.decode),  # a session's calls follow each other
    )


def deployment_endpoints(config: Config) -> dict[str, str]:
    """Each deployment of the config with an endpoint of its own (``api_base``): where its calls go."""
    return {name: d.api_base for name, d in config.routing.deployments.items() if d.api_base}


def _lag(store: Store) -> float:
    return 0.0 if isinstance(store, MemoryStore) else 1.0


def response_cache(config: Config, store: Store) -> ResponseCache | None:
    settings = config.cache
    if not settings.enabled:
        return None
    if settings.store and settings.store != config.store:  # the call's own store (one round trip to settle)
        store = open_store(settings.store, timeout_s=config.store_timeout_s)
    return ResponseCache(store, ttl_s=settings.ttl_s, max_entries=settings.max_entries, policy=settings.policy,
                         semantic=_semantic_index(config, store))


def _semantic_index(config: Config, store: Store) -> Any:
    settings = config.cache.semantic
    if not settings.enabled:
        return None
    from .semantic import SemanticIndex, litellm_embedder, local_embedder

    embed = (litellm_embedder(settings.embedder.split(":", 1)[1]) if settings.embedder.startswith("litellm:")
             else local_embedder)
    return SemanticIndex(store, embed, threshold=settings.threshold, max_per_scope=settings.max_per_scope,
                         ttl_s=config.cache.ttl_s, number_guard=settings.number_guard,
                         text_guards=settings.text_guards)


def require_extras(config: Config) -> None:
    """Raise ``MissingExtra`` naming the extra to install for each optional feature the config uses
    whose package is missing (checked when the config is assembled, not at the first call)."""
    urls = (config.store, config.cache.store if config.cache.enabled else None)
    if any(u and u.split("://", 1)[0] in ("redis", "rediss", "unix") for u in urls):
        _require("a redis:// store", "redis", "redis")
    if config.ledger.url and config.ledger.url.startswith(("postgresql://", "postgres://")):
        _require("a PostgreSQL ledger", "postgres", "psycopg")
    if config.cache.enabled and config.cache.semantic.enabled and not config.cache.semantic.embedder.startswith(
            "litellm:"):
        from .semantic import LOCAL_MODEL_MODULES

        for module in LOCAL_MODEL_MODULES:
            _require("the semantic cache's local embedder", "semantic", module)


def unpriced_targets(config: Config, catalog: Catalog) -> list[tuple[str, str]]:
    """``(alias, target)`` for each alias target that is neither a deployment nor a model with a price
    (in litellm's catalog or the config's ``models:``): a typo, usually, and unpriced either way."""
    routing = config.routing
    return [(alias, target) for alias, targets in routing.aliases.items() for target in targets
            if target not in routing.deployments and catalog.resolve(target) is None]


def unpriced_target(config: Config, alias: str, target: str) -> None:
    """Say that alias ``target`` has no price (``unpriced_alias_target``), with the closest names."""
    log.warning("unpriced_alias_target", where=f"routing.aliases.{alias}", model=target,
                why="neither litellm's catalog nor the config's models price it (a typo?); its calls' cost "
                    "is unknown", did_you_mean=list(close_names(target, tuple(config.routing.deployments))))


def unpriced_deployments(config: Config, catalog: Catalog) -> list[tuple[str, str]]:
    """``(name, model)`` for each deployment whose model no price list has (litellm's catalog or the
    config's ``models:``): a typo, usually, or a model of its own endpoint; unpriced either way."""
    return [(name, d.model) for name, d in config.routing.deployments.items() if catalog.resolve(d.model) is None]


def idle_reasoning_rules(config: Config) -> list[tuple[int, str]]:
    """``(index, glob)`` for each reasoning rule whose ``when.model`` matches no name a call may ask
    for or be routed to: none in litellm's price map (``:free`` variants on OpenRouter), the config's
    ``models:``, aliases (with a ``:floor`` or ``:nitro`` suffix), ``auto`` with tiers, deployments
    or their models (a typo, usually: the rule never applies)."""
    from fnmatch import fnmatchcase

    globs = [(i, rule.when.model) for i, rule in enumerate(config.reasoning.rules) if rule.when.model]
    if not globs:
        return []
    routing = config.routing
    targets = {*routing.alias_targets(), *(d.model for d in routing.deployments.values())}
    named = {*config.models, *routing.route_names(), *targets, *(f"{t}:free" for t in targets),
             *(f"{alias}:{suffix}" for alias in routing.aliases for suffix in ("floor", "nitro"))}
    idle = [(i, glob) for i, glob in globs if not any(fnmatchcase(name, glob) for name in named)]
    return [(i, glob) for i, glob in idle if not any(fnmatchcase(name, glob) for name in model_names())]


def check_alias_targets(config: Config) -> None:
    """Refuse an alias target that is another alias: a call's first attempt calls the target by its
    name (a model litellm may not know), a fallback to it routes it as that alias; either way not what
    the config says. An alias may list itself (``gpt-4o-mini: [gpt-4o-mini, ...]``: the model)."""
    routing = config.routing
    for alias, targets in routing.aliases.items():
        for target in targets:
            if target != alias and target in routing.aliases and target not in routing.deployments:
                raise ConfigError(f"routing.aliases.{alias}: {target!r} is an alias; an alias lists model ids or "
                                  f"deployment names, not other aliases (list its targets instead: "
                                  f"{routing.aliases[target]})")


def check_providers(config: Config) -> None:
    """Refuse an ``allow_providers`` or ``deny_providers`` entry that names no provider: a typo there
    would silently allow everything or deny nothing. Known: litellm's providers and the prefixes of
    the config's own model names (a deployment's ``custom/...``)."""
    routing = config.routing
    names = (*routing.alias_targets(), *(d.model for d in routing.deployments.values()), *config.models)
    known = provider_names() | {name.split("/", 1)[0] for name in names if "/" in name}
    for field in ("allow_providers", "deny_providers"):
        for provider in getattr(routing, field):
            if provider not in known:
                close = get_close_matches(provider, sorted(known), n=3, cutoff=0.6)
                raise ConfigError(f"routing.{field}: {provider!r} is no provider litellm or the config knows"
                                  + (f"; did you mean {', '.join(map(repr, close))}?" if close else ""))


def idle_limits(config: Config, catalog: Catalog) -> list[str]:
    """Each ``routing.limits`` key that limits nothing: no deployment or alias target goes by that
    name, and litellm knows no provider for it, so no call can be sent there (a typo, usually)."""
    routing = config.routing
    targets = routing.alias_targets()
    return [name for name in routing.limits if name not in routing.deployments and name not in targets
            and catalog.resolve(name) is None and not provider_known(name)]


def _require(feature: str, extra: str, module: str) -> None:
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise MissingExtra(feature, extra, module)


def _say_config_problems(config: Config, catalog: Catalog) -> None:
    """Log what in ``config`` is likely a typo (each with the closest known names), once per config
    object: a second pipeline of the same config (replay's baseline) does not say it again."""
    if _SAID.get(id(config)) is config:
        return
    _SAID[id(config)] = config
    for name, model in unpriced_deployments(config, catalog):
        why = ("neither litellm's catalog nor the config's models price it (a typo?); its calls' cost is unknown "
               "until models: gives its prices") if provider_known(model) else \
            "litellm knows no provider for it (a typo?): every call to this deployment will fail"
        log.warning("unpriced_deployment_model", where=f"routing.deployments.{name}.model", model=model, why=why,
                    did_you_mean=list(close_names(model)))
    for index, glob in idle_reasoning_rules(config):
        log.warning("idle_reasoning_rule", where=f"reasoning.rules.{index}.when.model", model=glob,
                    why="the glob matches no model litellm or the config knows (a typo?): the rule never applies",
                    did_you_mean=list(close_names(glob.replace("*", ""), tuple(config.routing.aliases))))
    for name in idle_limits(config, catalog):
        log.warning("idle_limit", where=f"routing.limits.{name}", why="no deployment or alias target has this "
                    "name and litellm knows no provider for it (a typo?): it limits nothing",
                    did_you_mean=list(close_names(name, tuple(config.routing.deployments))))
    summary_model, routed = config.context.summary_model, config.context.summary_params
    if config.context.summarize and not {"custom_llm_provider", "api_base", "base_url"} & set(routed) \
            and catalog.resolve(summary_model) is None and not provider_known(summary_model):
        log.warning("unknown_summary_model", where="context.summary_model", model=summary_model,
                    why="litellm knows no provider for it and no price list has it (a typo?): every summary "
                        "call will fail, and the window will send its offline digest instead",
                    did_you_mean=list(close_names(summary_model)))


def assemble(config: Config | None, policies: Sequence[Policy] | None = None) -> Parts:
    """``config=None`` is the pass-through: no policies and no response cache, still accounted."""
    configured = config is not None
    config = config or Config()
    require_extras(config)
    catalog = Catalog(config.catalog_overrides())
    check_alias_targets(config)
    check_providers(config)
    unpriced = unpriced_targets(config, catalog)  # said at the first call: an adapter may serve the name by then
    _say_config_problems(config, catalog)
    store = open_store(config.store, timeout_s=config.store_timeout_s)
    ledger = LedgerWriter(config.ledger.url, spool=config.ledger.spool) if config.ledger.url else None
    chain = given_policies(policies) if policies is not None else (build_policies(config) if configured else ())
    state = policy_state(store, catalog)
    state.endpoints = deployment_endpoints(config)
    return Parts(
        config=config, catalog=catalog, policies=chain, store=store, state=state,
        telemetry=telemetry_settings(config.telemetry, state.endpoints), ledger=ledger,
        cache=response_cache(config, store) if configured else None,
        books=Bookkeeper(store, config.routing, catalog, ledger, fresh_s=_lag(store),
                         cooldown_view=state.cooldowns, budget_view=state.budget_spent,
                         reasoning=config.reasoning),
        unpriced=tuple(unpriced),
    )
