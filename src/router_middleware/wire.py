"""The litellm boundary: the one module that reads what litellm keeps outside its public fields.

litellm's responses, stream chunks and exceptions carry the answering model, the provider's
response headers and whether usage was reported in private places (``_hidden_params``,
``litellm_response_headers``). Everything else asks here, so a litellm upgrade changes one file.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ._env import prepare_litellm_env

OUTCOME_KEY = "router_middleware_outcome"


def litellm() -> Any:
    """The litellm module, imported on first use with the offline price map (see :mod:`._env`)."""
    found: Any = sys.modules.get("litellm")
    if found is None or not getattr(found, "suppress_debug_info", False):
        prepare_litellm_env()
        import litellm as found

        found.suppress_debug_info = True
    return found


def hidden(response: Any) -> dict[str, Any]:
    """litellm's hidden params of a response or chunk (a dict that may be written to), or ``{}``."""
    found = getattr(response, "_hidden_params", None)
    return found if isinstance(found, dict) else {}


def answered_model_of(response: Any) -> str | None:
    """The model the provider named in its answer (litellm's own ``model`` echoes the request)."""
    name = hidden(response).get("provider_response_model")
    return str(name) if name else None


def answered_model(chunks: Sequence[Any]) -> str | None:
    """:func:`answered_model_of` for a stream: the first chunk that names it."""
    return next((name for chunk in chunks if (name := answered_model_of(chunk))), None)


def usage_reported(chunks: Sequence[Any]) -> bool:
    """Did the provider send usage in a stream? litellm fills in a locally counted usage chunk when it
    did not, and marks the difference in the chunk's hidden ``usage``."""
    for chunk in chunks:
        usage = hidden(chunk).get("usage")
        if usage is not None and type(usage).__name__ != "UnreportedUsage":
            return True
    return False


def response_headers(response: Any) -> Mapping[str, Any] | None:
    """The provider's response headers on a litellm response, stream chunk or exception."""
    found = hidden(response).get("additional_headers")
    if isinstance(found, Mapping):
        return found
    for source in (getattr(response, "litellm_response_headers", None),
                   getattr(getattr(response, "response", None), "headers", None)):
        if source is not None:
            try:
                return dict(source.items())
            except Exception:  # noqa: BLE001 - a header object we cannot read is no headers
                continue
    return None


def retry_after(exc: BaseException) -> float | None:
    """Seconds a failed request's ``Retry-After`` header asks to wait, or ``None``."""
    for source in (getattr(exc, "litellm_response_headers", None),
                   getattr(getattr(exc, "response", None), "headers", None)):
        try:
            value = source.get("retry-after") if source is not None else None
        except Exception:  # noqa: BLE001
            value = None
        if value is not None:
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None
    return None


def mark_cache_hit(response: Any) -> None:
    hidden(response)["cache_hit"] = True


def attach_outcome(response: Any, outcome: Any) -> None:
    """Keep the call's Outcome on the response, where ``router_middleware.outcome()`` finds it."""
    found = getattr(response, "_hidden_params", None)
    if isinstance(found, dict):
        found[OUTCOME_KEY] = outcome


def provider_of(response: Any) -> str | None:
    value = hidden(response).get("custom_llm_provider")
    return str(value) if value else None
