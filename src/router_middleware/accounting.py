"""Build the :class:`Outcome` of a finished litellm call, and find it again later."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .catalog import Catalog, ModelInfo, provider_named
from .errors import OutcomeUnavailable
from .pricing import context_saving, price
from .types import Outcome, Plan, Usage, UsageSource
from .usage import as_dict, normalize_usage, reported_cost
from .wire import OUTCOME_KEY, answered_model_of, hidden, litellm, provider_of

_REPORTS_COST = frozenset({"openrouter"})


def _price_info(catalog: Catalog, answered: str, provider: str | None, planned: str | None) -> ModelInfo | None:
    names = []
    if provider and not answered.startswith(f"{provider}/"):
        names.append(f"{provider}/{answered}")
    names.append(answered)
    if planned:
        names.append(planned)
    for name in dict.fromkeys(names):
        info = catalog.resolve(name)
        if info is not None:
            return info
    return None


def finish_reasons(choices: Iterable[Any]) -> tuple[str, ...]:
    """The finish reasons ``choices`` (a response's, or a stream's chunks') carry, in order."""
    return tuple(str(c.finish_reason) for c in choices if getattr(c, "finish_reason", None))


def stream_finish_reasons(chunks: Iterable[Any]) -> tuple[str, ...]:
    """The finish reasons a stream's ``chunks`` sent, in order: only the provider's (litellm's
    builder fills in ``stop`` for a stream cut short)."""
    return finish_reasons(c for chunk in chunks for c in getattr(chunk, "choices", None) or ())


def build_outcome(
    response: Any,
    plan: Plan | None,
    catalog: Catalog,
    *,
    usage_source: UsageSource = "provider",
    answered_model: str | None = None,
    latency_s: float | None = None,
    time_to_first_token_s: float | None = None,
) -> Outcome:
    """Normalize the usage of ``response`` and price it (see :mod:`router_middleware.pricing`).

    The answering model is the one the provider named in its response (litellm keeps it as
    ``provider_response_model``; its own ``model`` field echoes the requested alias).
    """
    provider = provider_of(response) or (catalog.provider(plan.model) if plan else None)
    # else litellm's name (a stream's usage chunk gives it with its prefix), else the target's (a stream
    # cut short before a chunk named it; an agent's chunks name what it asked for): each as the
    # provider names it, as an answer does
    answered = provider_named(str(answered_model or answered_model_of(response) or getattr(response, "model", None)
                                  or (plan.model if plan else "unknown")), provider)
    raw_usage = getattr(response, "usage", None)
    if plan is not None and usage_source == "provider" and (
            plan.params.get("mock_response") is not None or plan.params.get("mock_tool_calls") is not None):
        usage_source = "estimated"  # litellm invents usage for mock responses
    usage = normalize_usage(raw_usage, source=usage_source)
    if usage_source == "cache":
        usage = Usage(source="cache")  # nothing was consumed; the response keeps its original usage
    info = _price_info(catalog, answered, provider, plan.model if plan else None)
    reported = reported_cost(raw_usage) if provider in _REPORTS_COST else None
    cost = price(usage, info, reported_usd=reported)
    return Outcome(
        model=answered,
        provider=provider,
        usage=usage,
        cost=cost,
        plan=plan,
        response_id=getattr(response, "id", None),
        finish_reasons=finish_reasons(getattr(response, "choices", None) or ()),
        latency_s=latency_s,
        time_to_first_token_s=time_to_first_token_s,
    )


def prompt_only(plan: Plan, catalog: Catalog, prompt_tokens: int, latency_s: float | None = None) -> Outcome:
    """What an attempt sent and never heard back from (timed out, or stopped by its caller) is taken to
    have used: its prompt, counted locally (``usage.source`` ``estimated``; the provider read it, and
    bills it), priced on the attempt's target."""
    provider = catalog.provider(plan.model)
    usage = Usage(input_tokens=prompt_tokens, source="estimated")
    return Outcome(model=provider_named(plan.model, provider), provider=provider, usage=usage,
                   cost=price(usage, _price_info(catalog, plan.model, provider, plan.model)), plan=plan,
                   latency_s=latency_s)


def outcome(response_or_stream: Any, *, catalog: Catalog | None = None) -> Outcome:
    """The :class:`Outcome` of a finished call.

    Works on what ``Pipeline.completion`` returned (a response, or a stream once consumed), on
    any litellm ``ModelResponse`` and on a LangChain chat model's answer (an ``AIMessage``, as
    ``RoutedChatModel`` or an agent with ``RouterAgentMiddleware`` returns it), priced with the default
    catalog (or ``catalog``). Raises :class:`OutcomeUnavailable` for a stream that has not been
    consumed yet, or an object that carries no usage.
    """
    from .streaming import TrackedStream

    if isinstance(response_or_stream, TrackedStream):
        result = response_or_stream.outcome
        if result is None:
            raise OutcomeUnavailable("the stream has not been consumed yet: iterate it to the end first")
        return result
    if type(response_or_stream).__module__.startswith("langchain_core.messages"):
        from .langchain.convert import message_outcome

        return message_outcome(response_or_stream, catalog or Catalog())
    stored = hidden(response_or_stream).get(OUTCOME_KEY)
    if isinstance(stored, Outcome):
        return stored
    if getattr(response_or_stream, "usage", None) is None and not as_dict(response_or_stream).get("usage"):
        raise OutcomeUnavailable(
            f"{type(response_or_stream).__name__} carries no usage: pass a finished litellm response"
        )
    if isinstance(response_or_stream, Mapping):  # a chat completion as a dict (JSON read back, model_dump())
        response_or_stream = _as_response(response_or_stream)
    return build_outcome(response_or_stream, None, catalog or Catalog())


def _as_response(data: Mapping[str, Any]) -> Any:
    """A litellm ``ModelResponse`` of a chat completion given as a dict, or ``OutcomeUnavailable``. A dict
    keeps none of litellm's hidden fields: it is priced by its model at catalog prices (a cost the
    provider reported, as OpenRouter does, is not read)."""
    usage = data.get("usage")
    if not isinstance(usage, Mapping):
        raise OutcomeUnavailable(f"the dict's usage is a {type(usage).__name__}, not a mapping of token counts")
    if "prompt_tokens" not in usage and "completion_tokens" not in usage:
        keys = ", ".join(map(str, usage))[:80]
        raise OutcomeUnavailable(f"the dict's usage has no prompt_tokens or completion_tokens ({keys}): not a chat "
                                 "completion (a Responses API or Anthropic answer?)")
    try:
        return litellm().ModelResponse(**data)
    except Exception as exc:  # noqa: BLE001 - pydantic's and litellm's errors alike
        raise OutcomeUnavailable(f"a dict that is no chat completion litellm can read: {exc}"[:300]) from exc


def measured_context_saving(outcome: Outcome, catalog: Catalog) -> float | None:
    """What the context policies saved ``outcome``'s call, from the usage its provider reported
    (:func:`.pricing.context_saving`); ``None`` where they changed nothing, or no provider reported
    its usage (an estimate has no cache reads to weigh: the plan's estimate stands)."""
    plan = outcome.plan
    if plan is None or plan.context_tokens is None or outcome.usage.source != "provider":
        return None
    return context_saving(outcome.usage, catalog.resolve(plan.model), plan.context_tokens)


def routing_saving(outcome: Outcome, baseline: ModelInfo | None) -> float:
    """What routing saved ``outcome``'s call: its usage priced at ``baseline`` (the model the call
    would have gone to without routing) less its cost; negative where routing (a fallback) cost more.
    0 where either is unknown, and for a response-cache hit or a call with no usage."""
    cost = outcome.cost.total_usd
    if baseline is None or cost is None or outcome.usage.source in ("cache", "none"):
        return 0.0
    priced = price(outcome.usage, baseline).total_usd
    return priced - cost if priced is not None else 0.0
