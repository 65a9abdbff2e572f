"""Which failures move a call to its next attempt, and how long to wait before it (pure).

Retryable: rate limits (``Retry-After`` honoured), 5xx and unavailable services, timeouts,
connection errors, context-window errors (to a model with a larger window) and content-policy
refusals, as litellm raises them, as LangChain's chat models do (``langchain_core.exceptions``:
``ModelRateLimitError``, ``ModelTimeoutError``, ``ModelConnectionError``, ``ContextOverflowError``,
an error marked ``is_retryable``), and as the HTTP client or Python does (``httpx`` timeouts and
network errors, ``TimeoutError``, ``ConnectionError``): an agent's own chat model raises those.
A target litellm knows no provider for (a typo) is skipped for the next one, and with none left the
call fails with :class:`~router_middleware.errors.UnknownModelError`. Anything else (bad request,
authentication, not found) fails at once; a target whose provider key this process lacks is skipped
for the next one, as a typo is.
Failures count toward a target's cooldown (:mod:`router_middleware.bookkeeping.health`) unless
they are the request's own (or raised after the model answered: its output not parsed, a LangGraph
interrupt; or of a cause no event named: litellm's SDK fallbacks moving on) or a cancellation
(:func:`counts_toward_cooldown`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from ..catalog import close_names
from ..config import FallbackConfig, RoutingConfig
from ..errors import EmptyStreamError, MissingKeyError, RequestError, UnknownModelError
from ..types import Plan
from ..wire import missing_credentials, no_provider, out_of_credit, providers, retry_after, unbuilt
from .quotas import is_free

RETRYABLE = (
    "RateLimitError", "ServiceUnavailableError", "InternalServerError", "APIConnectionError", "Timeout",
    "APITimeoutError", "BadGatewayError", "ContextWindowExceededError", "ContentPolicyViolationError",
    "MidStreamFallbackError", "EmptyStreamError",
    "ModelRateLimitError", "ModelTimeoutError", "ModelConnectionError", "ContextOverflowError",  # LangChain's
    "TimeoutException", "NetworkError", "RemoteProtocolError",  # httpx's
    "TimeoutError", "ConnectionError",  # Python's
)
_KINDS = {"ContextOverflowError": "ContextWindowExceededError"}  # LangChain's name for the same failure


def error_kind(exc: BaseException) -> str:
    """The failure's kind: its class's name, or the litellm name of a failure LangChain names otherwise."""
    return next((_KINDS[name] for name in _names(exc) if name in _KINDS), type(exc).__name__)


def _names(exc: BaseException) -> set[str]:
    """The names of ``exc``'s classes (how a failure is known, whichever library raised it)."""
    return {cls.__name__ for cls in type(exc).__mro__}


# Failures of the request itself (its size, content or parameters) or of a name litellm cannot
# route: another request to the same target may well succeed, so they say nothing of its health.
REQUEST_FAULTS = frozenset({
    "BadRequestError", "ContextWindowExceededError", "ContentPolicyViolationError", "UnprocessableEntityError",
    "UnsupportedParamsError", "JSONSchemaValidationError",
    "ContextOverflowError", "ModelInvalidRequestError", "ModelRefusalError",  # LangChain's
    # raised in an agent's model call after the model answered: its output not parsed, a LangGraph
    # interrupt (control flow); not the target's health
    "OutputParserException", "StructuredOutputError", "GraphBubbleUp",
    "MessageError",  # ours, from a RoutedChatModel's pipeline inside the agent middleware
    "FellBack",  # ours: litellm's SDK fallbacks moved on after an error no event named (maybe the request's)
})


def given_fallbacks(given: Any, model: str) -> tuple[tuple[str, ...], bool]:
    """litellm's ``fallbacks=`` as the models it tries after ``model``, in order, once each whatever the
    error (a name, or a dict naming its ``model``, the call's own when it names none); and whether
    they are names alone (a dict with more than ``model`` sets parameters of its own attempt: an
    ``api_base``, a key; an item neither a name nor a dict is skipped, and they are not)."""
    if not isinstance(given, list | tuple) or not given:
        return (), False
    names, bare = [], True
    for fallback in given:
        if isinstance(fallback, str):
            names.append(fallback)
        elif isinstance(fallback, Mapping):
            names.append(str(fallback.get("model") or model))
            bare = bare and set(fallback) <= {"model"}
        else:
            bare = False
    return tuple(names), bare


_AFTER_ANSWER = frozenset({"OutputParserException", "StructuredOutputError", "GraphBubbleUp"})
_RETRY_STATUSES = (408, 409, 429, 500, 502, 503, 504, 529)  # 529: Anthropic's "overloaded"


def retryable(exc: BaseException) -> bool:
    names = _names(exc)
    return bool(names & set(RETRYABLE)) or getattr(exc, "is_retryable", False) is True \
        or getattr(exc, "status_code", 0) in _RETRY_STATUSES


def counts_toward_cooldown(exc: BaseException) -> bool:
    """Does ``exc`` say the target is unhealthy (5xx, rate limits, timeouts, lost connections,
    authentication, not found, an account out of credit)? A request's own fault does not: three bad
    requests from one caller must not send everyone else's calls elsewhere. Nor does a cancellation
    (``asyncio.CancelledError``: the caller stopped the call, or a proxy client left mid-stream)."""
    if isinstance(exc, asyncio.CancelledError | RequestError):  # ours (a RoutedChatModel's params fitted to
        return False  # its model in the agent middleware); httpx's RequestError is a lost connection: counted
    # the target's account, which every caller's next call meets (litellm's PaymentRequiredError and
    # Anthropic's 400 "credit balance is too low" are BadRequestErrors)
    if getattr(exc, "status_code", None) == 402 or out_of_credit(exc):
        return True
    if missing_credentials(exc) or unbuilt(exc) is not None:  # this process's configuration, or a request litellm
        return False  # could not build: never sent, so nothing of the provider's health
    if getattr(exc, "status_code", None) in _TOO_LARGE:  # litellm raises them as a bare APIError
        return False
    return not (_names(exc) & REQUEST_FAULTS)


_TOO_LARGE = frozenset({413, 414, 431})  # the request's body, URL or headers too large: the caller's own fault


def backoff(attempt: int, config: FallbackConfig, exc: BaseException, rng: random.Random | None = None, *,
            same_target: bool = True) -> float:
    """Exponential backoff with full jitter; retrying the same target, a Retry-After header wins
    (capped at ``max_backoff_s``): another target need not wait for the one that was rate-limited."""
    hinted = retry_after(exc) if same_target else None
    if hinted is not None:
        return min(hinted, config.max_backoff_s)
    ceiling = min(config.max_backoff_s, config.backoff_s * (2 ** attempt))
    return (rng or random).uniform(0, ceiling)


@dataclass
class Attempts:
    """The order of attempts of one call: the chosen model (``attempts_per_model`` times), then each fallback."""

    models: list[str]
    config: FallbackConfig
    tries: int = 0
    depth: int = 0
    history: tuple[str, ...] = ()  # what each attempt came to (a tuple: while empty, nothing the collector tracks)
    past: tuple[str, ...] = ()  # the targets moved past, in order (its owner may start it afresh)

    @property
    def model(self) -> str:
        return self.models[0]

    @property
    def again(self) -> bool:
        """Does the call retry its targets itself (``attempts_per_model`` above 1)? Then the provider
        SDK's retries are off at each try, the last one's too: they would multiply the call's (two
        attempts of the last target sent six requests)."""
        return self.config.attempts_per_model > 1

    def skip(self, reason: str) -> str | None:
        """Move past the current target for ``reason``, no retry (its quota is used up, the adapter
        cannot reach it, or litellm has no provider or no key for it)."""
        self.past += (self.models[0],)
        self.history += (f"{self.models.pop(0)}: {reason}",)
        if not self.models:
            return None
        self.tries = 0
        self.depth += 1
        return self.model

    def instead(self, models: Sequence[str]) -> None:
        """Replace the targets after the current one with ``models`` (where the adapter's router goes
        next after the current target's failure, a chain of its own)."""
        self.models[1:] = models

    def restart(self, models: list[str]) -> None:
        """Take another route before any attempt (a budget's downgrade): ``models`` in order, from the
        first; no attempt was made, so none is counted."""
        self.models = list(models)
        self.tries = 0

    def back_to(self, model: str) -> str:
        """Go back to ``model``, skipped before, ahead of the current target if any: a half-open target
        another call probes, before a target cooling down, or when no target after it admitted the call
        (tried anyway, as a direct call would be)."""
        self.models.insert(0, model)
        self.tries = 0
        self.depth += 1
        return model

    def advance(self, exc: BaseException, windows: dict[str, int] | None = None) -> str | None:
        """The model to try next after ``exc``, or ``None`` when the call must fail."""
        self.history += (f"{self.model}: {error_kind(exc)}",)
        after_answer = bool(_names(exc) & _AFTER_ANSWER)  # the model did answer
        if not retryable(exc) and not (is_free(self.model) and len(self.models) > 1 and not after_answer):
            return None  # a free variant that failed in any way still has its paid model behind it
        self.tries += 1
        if self.tries < self.config.attempts_per_model and error_kind(exc) != "ContextWindowExceededError":
            self.depth += 1
            return self.model
        current = self.models.pop(0)
        self.past += (current,)
        if error_kind(exc) == "ContextWindowExceededError" and windows is not None:
            needed = windows.get(current, 0)
            self.models = [m for m in self.models if windows.get(m, 0) > needed]
        if not self.models:
            return None
        self.tries = 0
        self.depth += 1
        return self.model


NO_PROVIDER = "litellm knows no provider for it (a typo?)"
NO_KEY = "no API key for its provider in this process"
UNBUILT = "litellm could not build the request for it"


def what_failed(plan: Plan, exc: BaseException) -> str:
    """How a fallback decision names the attempt that failed: a deployment left uncalled for its key
    is named with the variable, any other attempt by its model (and deployment, where it has one:
    two deployments of a model are told apart) and the error's kind."""
    if isinstance(exc, MissingKeyError):
        return f"deployment {exc.deployment!r} skipped: {exc.variable} is not set"
    where = f"deployment {plan.deployment!r} ({plan.model})" if plan.deployment else plan.model
    if no_provider(exc, plan.model):
        return f"{where} skipped: {NO_PROVIDER}"
    if missing_credentials(exc):  # litellm calls it a 500 (InternalServerError): not the provider's health
        return f"{where} skipped: {NO_KEY}"
    cause = unbuilt(exc)  # the Python error itself, however deep litellm wrapped it
    if cause is not None:
        return f"{where} skipped: {UNBUILT} ({type(cause).__name__}: {str(cause)[:80]})"
    return f"{where} failed ({error_kind(exc)})"


def unknown_model(requested: str, plan: Plan, routing: RoutingConfig, given: Sequence[str] = ()) -> UnknownModelError:
    """The error for a call whose last target, ``plan.model``, litellm knows no provider for: where
    the name came from (the request, a deployment, the alias routing chose, the call's own
    ``fallbacks=``, ``given``), what the config would have had to say, and the closest known names."""
    model, unknown = plan.model, "litellm knows no provider for it (not in its model list, no 'provider/' prefix)"
    prefix, slash, rest = model.partition("/")
    near: tuple[str, ...] = ()
    if slash and prefix not in providers():  # a misspelled provider: the model after it may be right
        unknown = f"litellm knows no provider {prefix!r} (the part before '/')"
        near = tuple(f"{p}/{rest}" for p in get_close_matches(prefix, providers(), n=1, cutoff=0.6))
    if plan.deployment is not None:
        fix = f"; give it a provider prefix (openai/{model} for an OpenAI-compatible server)"
        return UnknownModelError(model, f"the model of routing.deployments.{plan.deployment}: {unknown}{fix}",
                                 near or close_names(model))
    if model in given and model != requested:
        return UnknownModelError(model, f"a model of the call's fallbacks=: {unknown}", near or close_names(model))
    alias = next((str(d.attributes["alias"]) for d in reversed(plan.decisions)
                  if d.policy == "routing" and d.action == "route" and "alias" in d.attributes), None)
    if alias is not None:
        return UnknownModelError(model, f"the last target of routing.aliases.{alias}: {unknown}",
                                 near or close_names(model))
    if near:
        return UnknownModelError(model, unknown, near)
    name, _, suffix = requested.partition(":")
    if name == "auto" and not routing.tiers:
        return UnknownModelError(requested, "'auto' routes by difficulty over routing.tiers, and none is configured "
                                            "(a tier: {max_score: 0.35, alias: easy})")
    if suffix in ("floor", "nitro"):
        aliases = tuple(sorted(routing.aliases))
        return UnknownModelError(requested, suffix_on_no_alias(routing, name, suffix),
                                 tuple(f"{n}:{suffix}" for n in close_names(name, aliases, models=False)))
    return UnknownModelError(model, f"{unknown}, and the config has no alias or deployment of that name",
                             close_names(model, (*routing.aliases, *routing.deployments)))


def suffix_on_no_alias(routing: RoutingConfig, name: str, suffix: str) -> str:
    """What is wrong with ``name:suffix`` (``:floor``/``:nitro``) where ``name`` is no alias."""
    aliases = sorted(routing.aliases)
    known = f"the aliases are {', '.join(map(repr, aliases))}" if aliases else "none is configured"
    return f"':{suffix}' picks among the models of an alias of routing.aliases, and {name!r} is none ({known})"


def request_windows(catalog: Any, targets: list[str], model_of: Callable[[str], str]) -> dict[str, int]:
    """Input window of each attempt target (a model id, or a deployment resolved by ``model_of``)."""
    windows = {}
    for target in targets:
        info = catalog.resolve(model_of(target))
        windows[target] = (info.max_input_tokens or 0) if info else 0
    return windows


__all__ = ["NO_KEY", "NO_PROVIDER", "REQUEST_FAULTS", "RETRYABLE", "Attempts", "EmptyStreamError", "backoff",
           "counts_toward_cooldown", "error_kind", "request_windows", "retry_after", "retryable", "unknown_model"]
