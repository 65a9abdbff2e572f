"""Span attributes: GenAI semantic conventions, our ``router_middleware.*`` decisions, OpenInference.

Names under ``gen_ai.`` are the conventions' own, except ``gen_ai.usage.cost`` (a proposal, no
convention yet), kept because Langfuse reads it as a generation's cost. ``semconv`` picks the names
of attributes the conventions renamed: ``current``, ``legacy`` or ``both``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlparse

from ..params import effort_level
from ..types import AttributeValue, Outcome, Plan

_REQUEST_PARAMS = {
    "max_tokens": "gen_ai.request.max_tokens",
    "max_completion_tokens": "gen_ai.request.max_tokens",
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "stream": "gen_ai.request.stream",
    "seed": "gen_ai.request.seed",
}
_DOUBLES = frozenset({"temperature", "top_p"})  # typed double by the conventions, whatever number the caller gave
_DEFAULT_HOSTS = {
    "openai": "api.openai.com", "anthropic": "api.anthropic.com", "deepseek": "api.deepseek.com",
    "openrouter": "openrouter.ai", "gemini": "generativelanguage.googleapis.com", "groq": "api.groq.com",
    "mistral": "api.mistral.ai", "xai": "api.x.ai", "cohere": "api.cohere.com", "cohere_chat": "api.cohere.com",
    "perplexity": "api.perplexity.ai", "together_ai": "api.together.xyz", "fireworks_ai": "api.fireworks.ai",
}
# litellm's provider ids whose GenAI conventions' well-known ``gen_ai.provider.name`` differs; any
# other id (openai, anthropic, deepseek, groq, perplexity, openrouter, ollama...) is the value as it is
_PROVIDER_NAMES = {
    "gemini": "gcp.gemini", "vertex_ai": "gcp.vertex_ai", "vertex_ai_beta": "gcp.vertex_ai",
    "bedrock": "aws.bedrock", "azure": "azure.ai.openai", "azure_ai": "azure.ai.inference",
    "mistral": "mistral_ai", "xai": "x_ai", "watsonx": "ibm.watsonx.ai", "watsonx_text": "ibm.watsonx.ai",
    "cohere_chat": "cohere",
}


Semconv = Literal["current", "legacy", "both"]

# (current, legacy) names of the attributes the GenAI conventions renamed. SigNoz's AI panels still
# read the legacy cache name.
_RENAMED = {"cache_write": ("gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens")}


def semconv_mode(configured: Semconv | None = None) -> Semconv:
    """The configured mode, else ``current`` when ``OTEL_SEMCONV_STABILITY_OPT_IN`` lists
    ``gen_ai_latest_experimental`` (as OpenTelemetry's Python instrumentations read it), else ``both``."""
    if configured is not None:
        return configured
    opted = {part.strip() for part in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
    return "current" if "gen_ai_latest_experimental" in opted else "both"


def _renamed(key: str, semconv: Semconv) -> tuple[str, ...]:
    current, legacy = _RENAMED[key]
    return {"current": (current,), "legacy": (legacy,), "both": (current, legacy)}[semconv]


def agent_attributes(plan: Plan) -> dict[str, AttributeValue]:
    """``gen_ai.agent.name`` (the context's ``app``), ``gen_ai.agent.id``, ``gen_ai.conversation.id``."""
    context = plan.call.context
    attrs: dict[str, AttributeValue] = {}
    if context.app:
        attrs["gen_ai.agent.name"] = context.app
    if context.agent_id:
        attrs["gen_ai.agent.id"] = context.agent_id
    if context.session_id:
        attrs["gen_ai.conversation.id"] = context.session_id
    return attrs


def provider_name(provider: str) -> str:
    """``gen_ai.provider.name`` for a litellm provider id: the conventions' well-known value where
    they name the provider (``gemini`` is ``gcp.gemini``, ``bedrock`` ``aws.bedrock``), else the id."""
    return _PROVIDER_NAMES.get(provider, provider)


def endpoint_host(base: object) -> str | None:
    """The host of an endpoint URL (``api_base``), or ``None``."""
    return _host(base) if isinstance(base, str) and base else None


@functools.lru_cache(maxsize=256)
def _host(base: str) -> str | None:
    try:
        return urlparse(base).hostname
    except ValueError:  # not a URL (a bracketed host that is no IPv6 address)
        return None


def server_address(plan: Plan, provider: str | None, endpoints: Mapping[str, str] | None = None) -> str | None:
    """Where the attempt was sent: its deployment's endpoint (``endpoints``: a deployment's or a name the
    adapter serves to its base URL, :attr:`.PolicyState.endpoints`; the request goes there in place of
    the call's), else the call's ``api_base``, else, for no deployment, the endpoint the map holds
    under its model's name (a proxy ``model_name`` or an agent's model spelled as the model itself),
    else the provider's public host where it has one."""
    endpoints = endpoints or {}
    host = endpoint_host(endpoints.get(plan.deployment)) if plan.deployment else None
    return host or endpoint_host(plan.params.get("api_base") or plan.params.get("base_url")) \
        or host_of(None if plan.deployment else endpoints.get(plan.model), provider)


def host_of(endpoint: object, provider: str | None) -> str | None:
    """The host of ``endpoint`` (a base URL), else ``provider``'s public host where it has one."""
    return endpoint_host(endpoint) or _DEFAULT_HOSTS.get(provider or "")


def reasoning_level(plan: Plan) -> str | None:
    """The level ``plan`` sends: its ``reasoning_effort`` (a dict's ``effort``), else ``budget:<tokens>``."""
    effort = effort_level(plan.params.get("reasoning_effort"))
    if effort is not None:
        return effort
    thinking = plan.params.get("thinking")
    if isinstance(thinking, dict) and thinking.get("budget_tokens"):
        return f"budget:{thinking['budget_tokens']}"
    return None


def metric_attributes(plan: Plan, provider: str | None,
                      endpoints: Mapping[str, str] | None = None) -> dict[str, AttributeValue]:
    """The attributes an attempt's metric points carry (its span carries them too): its model,
    provider, server and deployment (the name the model was sent under: two deployments of one model
    apart)."""
    attrs: dict[str, AttributeValue] = {"gen_ai.operation.name": "chat", "gen_ai.request.model": plan.model}
    if provider:
        attrs["gen_ai.provider.name"] = provider_name(provider)
    address = server_address(plan, provider, endpoints)
    if address:
        attrs["server.address"] = address
    if plan.deployment:
        attrs["router_middleware.deployment"] = plan.deployment
    return attrs


def request_attributes(plan: Plan, provider: str | None,
                       endpoints: Mapping[str, str] | None = None) -> dict[str, AttributeValue]:
    attrs = metric_attributes(plan, provider, endpoints)
    for key, name in _REQUEST_PARAMS.items():
        value = plan.params.get(key)
        if key in _DOUBLES and isinstance(value, int) and not isinstance(value, bool):
            attrs[name] = float(value)
        elif isinstance(value, bool | int | float | str):
            attrs[name] = value
    level = reasoning_level(plan)
    if level:
        attrs["router_middleware.reasoning.level"] = level
    attrs.update(agent_attributes(plan))
    return attrs


def outcome_attributes(outcome: Outcome, *, openinference: bool = False,
                       semconv: Semconv = "both") -> dict[str, AttributeValue]:
    usage, cost = outcome.usage, outcome.cost
    attrs: dict[str, AttributeValue] = {
        "gen_ai.response.model": outcome.model,
        "gen_ai.usage.input_tokens": usage.input_tokens,
        "gen_ai.usage.output_tokens": usage.output_tokens,
        "gen_ai.usage.cache_read.input_tokens": usage.cache_read_tokens,
        "gen_ai.usage.reasoning.output_tokens": usage.reasoning_tokens,
        "router_middleware.usage.source": usage.source,
        "router_middleware.cost.source": cost.source,
    }
    for name in _renamed("cache_write", semconv):
        attrs[name] = usage.cache_write_tokens
    if outcome.response_id:
        attrs["gen_ai.response.id"] = outcome.response_id
    if outcome.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = list(outcome.finish_reasons)  # type: ignore[assignment]
    if cost.total_usd is not None:
        attrs["gen_ai.usage.cost"] = float(cost.total_usd)  # not a convention: Langfuse reads it
    for name in ("input_usd", "output_usd", "cache_read_usd", "cache_write_usd", "reasoning_usd"):
        value = getattr(cost, name)
        if value is not None:
            attrs[f"router_middleware.cost.{name}"] = float(value)
    if outcome.time_to_first_token_s is not None:
        attrs["gen_ai.response.time_to_first_chunk"] = outcome.time_to_first_token_s
    if openinference:
        attrs.update(openinference_attributes(outcome))
    return attrs


def openinference_attributes(outcome: Outcome) -> dict[str, AttributeValue]:
    """The OpenInference names Phoenix and Arize read for tokens and cost."""
    usage, cost = outcome.usage, outcome.cost
    attrs: dict[str, AttributeValue] = {
        "openinference.span.kind": "LLM",
        "llm.model_name": outcome.model,
        "llm.token_count.prompt": usage.input_tokens,
        "llm.token_count.completion": usage.output_tokens,
        "llm.token_count.total": usage.total_tokens,
        "llm.token_count.prompt_details.cache_read": usage.cache_read_tokens,
        "llm.token_count.prompt_details.cache_write": usage.cache_write_tokens,
        "llm.token_count.completion_details.reasoning": usage.reasoning_tokens,
    }
    if outcome.provider:
        attrs["llm.provider"] = outcome.provider
    if cost.total_usd is not None:
        attrs["llm.cost.total"] = float(cost.total_usd)
    if cost.input_usd is not None:
        attrs["llm.cost.prompt"] = float(cost.input_usd)
    if cost.output_usd is not None:
        attrs["llm.cost.completion"] = float(cost.output_usd)
    return attrs


CONTEXT_POLICIES = frozenset({"window", "middle-out", "fit-window", "fit-budget", "clear-tool-outputs"})


def decision_attributes(plan: Plan, tokens_before: int, tokens_after: int) -> dict[str, AttributeValue]:
    """What the policies did to this call, for the parent INTERNAL span."""
    trimmed = [d for d in plan.decisions if d.policy in CONTEXT_POLICIES and d.action in ("trim", "clear")]
    attrs: dict[str, AttributeValue] = {
        "router_middleware.requested_model": plan.call.model,
        "router_middleware.chosen_model": plan.model,
        "router_middleware.route.reason": next(
            (d.reason for d in plan.decisions if d.action == "route"),
            "pass-through" if plan.model == plan.call.model else "policy"),
        "router_middleware.fallback.depth": 0,
        "router_middleware.context.strategy": ",".join(dict.fromkeys(d.policy for d in trimmed)) or "none",
        "router_middleware.context.compacted": bool(trimmed),
        "router_middleware.cache.hit": False,
        "router_middleware.savings.estimated_usd": float(plan.estimated_savings_usd),
        "router_middleware.decisions": [f"{d.policy}:{d.action}" for d in plan.decisions],  # type: ignore[dict-item]
    }
    if tokens_before:  # counted only when a policy changed the messages
        attrs["router_middleware.context.tokens_before"] = tokens_before
        attrs["router_middleware.context.tokens_after"] = tokens_after
    level = reasoning_level(plan)
    if level:
        attrs["router_middleware.reasoning.level"] = level
    attrs.update(agent_attributes(plan))
    context = plan.call.context
    if context.app:
        attrs["router_middleware.app"] = context.app
    if context.step is not None:
        attrs["router_middleware.step"] = context.step
    if context.step_kind:
        attrs["router_middleware.step_kind"] = context.step_kind
    return attrs
