"""Errors raised by router-middleware. Each names the input that caused it; those a call can raise
carry the HTTP ``status_code`` the LiteLLM proxy answers with when its hook raises them."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Literal


class RouterMiddlewareError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(RouterMiddlewareError, ValueError):
    """A configuration file or dict is invalid; the message names the field."""


class MissingKeyError(ConfigError):
    """A deployment names its key's environment variable (``api_key_env``) and this process has no
    value for it. The attempt is not sent (litellm would use the provider's default key, such as
    ``OPENAI_API_KEY``: sent to the deployment's endpoint if it has its own, and another account
    billed either way); the call's next target is tried."""

    def __init__(self, deployment: str, variable: str) -> None:
        super().__init__(f"deployment {deployment!r}: its api_key_env {variable} is not set in this process, so it "
                         "was not called (litellm would have used the provider's default key instead)")
        self.deployment = deployment
        self.variable = variable


class MessageError(RouterMiddlewareError, ValueError):
    """A chat message is malformed; the message names the source and the message index."""

    status_code = 400  # what the LiteLLM proxy answers when its hook raises this

    def __init__(self, detail: str, *, index: int | None = None, source: str | None = None) -> None:
        where = []
        if source:
            where.append(source)
        if index is not None:
            where.append(f"message {index}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {detail}" if prefix else detail)
        self.index = index
        self.source = source
        self.detail = detail


class RequestError(RouterMiddlewareError, ValueError):
    """A call's ``context=`` or parameters are malformed; the message names the field."""

    status_code = 400


def did_you_mean(suggestions: tuple[str, ...]) -> str:
    """The "; did you mean 'a' or 'b'?" ending of an error naming an unknown name ("" without suggestions)."""
    return f"; did you mean {' or '.join(map(repr, suggestions))}?" if suggestions else ""


class UnknownModelError(RequestError):
    """A call names a model that neither the config (an alias, a deployment) nor litellm knows (no
    provider for it: a typo, usually). ``suggestions``: the closest names that are known."""

    def __init__(self, model: str, detail: str, suggestions: tuple[str, ...] = ()) -> None:
        super().__init__(f"model {model!r}: {detail}{did_you_mean(suggestions)}")
        self.model = model
        self.suggestions = suggestions


class PolicyError(RouterMiddlewareError, TypeError):
    """A policy broke its contract: it returned something other than a :class:`~.types.Plan`. A
    fault of the code, not of the request: the proxy answers 500."""


class SessionFormatError(RouterMiddlewareError, ValueError):
    """A recorded session file does not follow the documented format."""


class LedgerError(RouterMiddlewareError):
    """A ledger could not be opened: no file there, not a database, an unknown URL scheme, a server
    that does not answer, or a driver extra that is not installed."""


class MissingExtra(RouterMiddlewareError, ImportError):
    """A feature the config or command asks for needs an optional extra that is not installed."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        super().__init__(f"{feature} needs the {module!r} package: pip install 'router-middleware[{extra}]' "
                         f"(in a checkout: .venv/bin/pip install -e '.[{extra}]')")
        self.extra = extra


class OutcomeUnavailable(RouterMiddlewareError, LookupError):
    """``outcome()`` was asked for a call that has not finished (e.g. a stream not yet consumed)."""


class BudgetExceeded(RouterMiddlewareError):
    """A call's estimated cost would take a hard budget past its limit (raised before any provider call)."""

    status_code = 429

    def __init__(self, name: str, unit: str, spent: float, limit: float, estimate: float | None = None,
                 scope: str = "") -> None:
        """``scope``: whose counter is full (``tenant acme``; empty for a global budget); ``spent``
        counts the holds of calls in flight with what was spent."""
        why = "" if estimate is None else (f"; this call's estimate, {estimate:.6g} {unit}, does not fit in the "
                                           f"{max(0.0, limit - spent):.6g} left")
        whose = f" ({scope})" if scope else ""
        super().__init__(f"budget {name!r}{whose} exceeded: {spent:.6g} of {limit:.6g} {unit} spent or held by "
                         f"calls in flight{why}")
        self.scope = scope
        self.estimate = estimate
        # sent with the LiteLLM proxy's 429: OpenAI's and Anthropic's SDKs then do not retry a refusal
        # that holds until the budget's spend goes down (they retry a 429 twice by default)
        self.headers = {"x-should-retry": "false"}
        self.name = name
        self.unit = unit
        self.spent = spent
        self.limit = limit


class NoRouteError(RouterMiddlewareError):
    """No candidate of an alias can serve the request; ``rejections`` says why for each."""

    status_code = 503

    def __init__(self, alias: str, rejections: Mapping[str, str]) -> None:
        reasons = "; ".join(why if why.startswith(f"{model}: ") else f"{model}: {why}"  # a quota of the model names it
                            for model, why in rejections.items())
        super().__init__(f"no model of {alias!r} can serve this request ({reasons})")
        self.alias = alias
        self.rejections = dict(rejections)


class MaxTokensError(NoRouteError, RequestError):
    """No candidate of an alias can serve the request because of its own ``max_tokens`` (or
    ``max_completion_tokens``): more than each one's window holds with the request. The request's
    fault, so a ``RequestError`` (400: sent again unchanged it fails again), where a plain
    ``NoRouteError`` is a 503 that clients retry; still a ``NoRouteError``, its ``rejections``
    naming the cap for each candidate."""

    status_code = 400


class EmptyStreamError(RouterMiddlewareError):
    """A provider's stream ended before its first chunk: retried like a connection error."""


class StoreError(RouterMiddlewareError):
    """A store could not be reached or answered nonsense. Callers degrade; they never fail a call."""


class PartialWrite(StoreError):
    """``add_many`` wrote part of its batch (Redis runs each command of it apart): ``cache_written``
    (its response-cache entries) and ``settled`` (the rest, one script) say which part landed."""

    def __init__(self, message: str, *, cache_written: bool, settled: bool) -> None:
        super().__init__(message)
        self.cache_written = cache_written
        self.settled = settled


class UnreadableCounter(StoreError):
    """A counter an admission checks holds what this package never leaves there (another program's
    value: text, ``inf``, a total below minus its limit; on Redis, a list or hash, or such a value in
    its hold set): ``key`` as the store was given it, and ``found``, its value (``None``: a value of
    another type, which only deleting the key replaces)."""

    def __init__(self, key: str, found: bytes | None, shown: str | None = None) -> None:
        what = "a value of another type" if found is None else repr(found[:40])
        super().__init__(f"counter {shown or key} holds {what}, not a count of this package's; "
                         "delete it to count from 0")
        self.key, self.found = key, found


class StoreUnavailable(StoreError):
    """The store holding a hard budget did not answer, and the budget says ``on_store_error: closed``:
    the call was refused before any provider call."""

    status_code = 503


class LockTimeout(StoreError):
    """A store lock could not be acquired in time."""


class StreamLeft(asyncio.CancelledError):
    """A chat stream its caller stopped reading (closed, broken out of, dropped) before it ended.
    Stopped from the caller's side, never a failure of its provider: the call is settled at what it
    had used, and its ledger row and span name this with ``ended`` ``stopped``. Never raised to the
    caller."""


class AnswerDiscarded(Exception):
    """A model answered an agent's attempt, then something after the model raised (its output not
    parsed, a guard) and a middleware inside ``RouterAgentMiddleware`` (ModelRetryMiddleware) ran
    the model again: the answer was paid for and not used. Names that try's ledger row and span,
    which carry what it used; never raised to the caller."""


Ended = Literal["complete", "stopped", "failed"]
# what the caller's side raises into a call it stops: a ledger row of an older version named these
STOPPED_BY = frozenset({"CancelledError", "StreamLeft", "ClientDisconnected", "KeyboardInterrupt", "GeneratorExit",
                        "SystemExit"})


def ending(error: BaseException | None) -> Ended:
    """How a call ended: ``complete`` (no error), ``stopped`` by its caller (a stream left or closed,
    a task cancelled, a proxy client gone, Ctrl-C, its process exiting, a LangGraph interrupt raised in
    an agent's model call: never its provider's failure), else ``failed``."""
    if error is None:
        return "complete"
    if isinstance(error, asyncio.CancelledError | KeyboardInterrupt | GeneratorExit | SystemExit):
        return "stopped"
    if any(cls.__name__ == "GraphBubbleUp" for cls in type(error).__mro__):  # LangGraph's control flow
        return "stopped"
    return "failed"
