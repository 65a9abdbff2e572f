"""The litellm boundary: the one module that reads what litellm keeps outside its public fields.

litellm's responses, stream chunks and exceptions carry the answering model, the provider's
response headers and whether usage was reported in private places (``_hidden_params``,
``litellm_response_headers``). What a model takes (:func:`param_rules`) is read from litellm's
provider configs. Everything else asks here, so a litellm upgrade changes one file.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from ._env import prepare_litellm_env
from .errors import MissingKeyError
from .fit import ParamRules
from .reasoning.levels import LEVELS
from .types import UsageSource

OUTCOME_KEY = "router_middleware_outcome"


_litellm: Any = None  # the module, once litellm() has returned it


def litellm() -> Any:
    """The litellm module, imported on first use with the offline price map (see :mod:`._env`). Where
    this is its first import (not the application's, nor :mod:`router_middleware.litellm`'s, whose
    users call litellm themselves), its feedback banner on each failed call is off
    (``suppress_debug_info``): a failed attempt a fallback then answers prints nothing. Otherwise
    the application's setting stands."""
    global _litellm
    if _litellm is not None:
        return _litellm
    ours = "litellm" not in sys.modules
    prepare_litellm_env()
    import litellm as found

    if ours:
        found.suppress_debug_info = True
    _litellm = found
    return found


@functools.cache
def user_part_types() -> frozenset[str]:
    """The content part types litellm takes in a user message: ``litellm.completion`` refuses any other
    before sending, for every provider (``validate_chat_completion_user_messages``, utils.py, 1.110.2)."""
    litellm()
    from litellm.types.llms.openai import ValidUserMessageContentTypes

    return frozenset(ValidUserMessageContentTypes)


def hidden(response: Any) -> dict[str, Any]:
    """litellm's hidden params of a response or chunk (a dict that may be written to), or ``{}``."""
    private = getattr(response, "__pydantic_private__", None)  # where pydantic keeps it: read directly,
    if isinstance(private, dict) and "_hidden_params" in private:  # not through BaseModel.__getattr__ (~5 us)
        found = private["_hidden_params"]
    else:
        found = getattr(response, "_hidden_params", None)
    return found if isinstance(found, dict) else {}


def answered_model_of(response: Any) -> str | None:
    """The model the provider named in its answer (litellm's own ``model`` echoes the request)."""
    name = hidden(response).get("provider_response_model")
    return str(name) if name else None


def answered_model(chunks: Sequence[Any]) -> str | None:
    """:func:`answered_model_of` for a stream: the first chunk that names it."""
    return next((name for chunk in chunks if (name := answered_model_of(chunk))), None)


def usage_chunk(chunks: Sequence[Any]) -> Any:
    """The last chunk of a stream that carries usage, or ``None``. At the end of a stream litellm sets
    the whole call's usage on it (what ``stream_chunk_builder`` would sum from every chunk), with the
    response's id, model and hidden params: enough to account for a call without assembling it."""
    return next((chunk for chunk in reversed(chunks) if getattr(chunk, "usage", None) is not None), None)


def stream_spent(stream: Any) -> bool:
    """Has litellm's sync ``stream`` handed the usage chunk it makes once the provider's stream has
    ended (asked with ``stream_options``)? Read again, it only assembles the whole answer a second
    time (about 40 us a chunk) and hands it to its logging, which drops it, before it stops
    (``CustomStreamWrapper.__next__``, litellm_core_utils/streaming_handler.py, 1.110.2). Its async
    stream logs the call only on that read: not for ``__anext__``."""
    return getattr(stream, "sent_stream_usage", None) is True and getattr(stream, "sent_last_chunk", None) is True


def usage_reported(chunks: Sequence[Any], stream: Any = None) -> bool:
    """Did the provider send usage in ``stream`` (litellm's, whose ``chunks`` were read)? litellm fills
    in a locally counted usage chunk when it did not. Its wrapper keeps the provider's usage chunks in
    its own ``chunks`` list: that decides. A chunk's hidden ``usage`` (``UnreportedUsage`` when
    counted) is read only without the wrapper: litellm overwrites the last one with the counted total
    at the stream's end when the request asked no ``stream_options``."""
    kept = getattr(stream, "chunks", None)
    if isinstance(kept, list):
        return any(getattr(chunk, "usage", None) is not None for chunk in kept)
    for chunk in chunks:
        usage = hidden(chunk).get("usage")
        if usage is not None and type(usage).__name__ != "UnreportedUsage":
            return True
    return False


def set_prompt_tokens(response: Any, prompt: int) -> None:
    """Set the prompt tokens of ``response``'s usage (an answer litellm assembled), keeping its total."""
    usage = getattr(response, "usage", None)
    if usage is not None:
        usage.prompt_tokens = prompt
        usage.total_tokens = prompt + (usage.completion_tokens or 0)


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


_quiet_lock = threading.Lock()
_quiet_held: list[bool] = []  # the application's setting while a probe runs (one entry per probe running)


@contextmanager
def _quiet() -> Iterator[Any]:
    """litellm with its banners off while the package probes a name (``get_llm_provider`` prints its
    provider list when a name has none): the application's setting is put back after the last probe
    running ends."""
    lib = litellm()
    with _quiet_lock:
        _quiet_held.append(lib.suppress_debug_info if not _quiet_held else _quiet_held[0])
        lib.suppress_debug_info = True
    try:
        yield lib
    finally:
        with _quiet_lock:
            setting = _quiet_held.pop()
            if not _quiet_held:
                lib.suppress_debug_info = setting


def provider_known(model: str) -> bool:
    """Can litellm resolve a provider for ``model`` by its name alone (its model list or a prefix)?"""
    try:
        with _quiet() as lib:
            lib.get_llm_provider(model=model)
    except Exception:  # noqa: BLE001 - litellm raises its BadRequestError, or others on odd names
        return False
    return True


@functools.cache
def providers() -> tuple[str, ...]:
    """The provider prefixes litellm knows (``openai``, ``anthropic``, ...)."""
    return tuple(str(getattr(p, "value", p)) for p in litellm().provider_list)


def no_provider(exc: BaseException, model: str) -> bool:
    """Did litellm refuse ``model`` before any request because it knows no provider for it (not in its
    model list, no ``provider/`` prefix, no ``custom_llm_provider``)? litellm says so only in the
    message of a ``BadRequestError`` raised by its provider lookup."""
    return type(exc).__name__ == "BadRequestError" and "LLM Provider NOT provided" in str(exc) \
        and f"model={model}" in str(exc)


def proxy_router() -> Any:
    """The running LiteLLM proxy's router (read from the proxy's module, as its own request routing
    does), or ``None`` outside the proxy."""
    return getattr(sys.modules.get("litellm.proxy.proxy_server"), "llm_router", None)


def proxy_stream_usage(request: Mapping[str, Any]) -> dict[str, Any]:
    """What the LiteLLM proxy adds to a chat stream's ``request`` so its provider reports usage
    (``stream_options.include_usage``, with its flags to strip the usage chunk from what the client is
    served, also where the client said ``false``), worked out for the ``model`` the hook sends it to:
    the proxy does it before the hook, for the name the client asked for, and not for a name that is
    none of its model names (a routing alias: the row then had litellm's count, not the provider's)
    (litellm/proxy/common_request_processing.py, 1.110.2). Empty outside the proxy, when the proxy or
    the client asked already, or when this litellm cannot tell."""
    server = sys.modules.get("litellm.proxy.proxy_server")
    options = request.get("stream_options")
    if server is None or request.get("stream") is not True or request.get("_litellm_stream_usage_injected") or \
            (isinstance(options, Mapping) and options.get("include_usage") is True):
        return {}  # not a stream, the proxy asked already, or the client did
    try:
        from litellm.proxy import common_request_processing as processing

        metadata = request.get("metadata")
        team = metadata.get("user_api_key_team_id") if isinstance(metadata, Mapping) else None
        return dict(processing.stream_usage_tracking_updates(
            request, getattr(server, "general_settings", None) or {}, "acompletion",
            lambda: processing.model_deployments_support_stream_options(request.get("model"), proxy_router(), team)))
    except Exception:  # noqa: BLE001 - another litellm: the request goes as the proxy made it
        return {}


def credential_base(name: str) -> str:
    """The ``api_base`` of litellm's named credential ``name`` (a proxy's ``credential_list``, or one
    added in its UI), else a stand-in naming it: an endpoint not known to be OpenAI's."""
    try:
        from litellm.litellm_core_utils.credential_accessor import CredentialAccessor

        base = CredentialAccessor.get_credential_values(name).get("api_base")
    except Exception:  # noqa: BLE001 - another litellm: where it goes is not known
        base = None
    return base if isinstance(base, str) and base else f"credential:{name}"


def proxy_model_names(router: Any) -> frozenset[str] | None:
    """The model names the proxy's ``router`` answers to (its ``model_list``'s ``model_name`` and
    ``model`` values, deployment ids, team models' public names, routing groups and group aliases),
    or ``None`` when that cannot be told: a router that serves names beyond its list (wildcards, a
    default deployment, pass-through), or one this version cannot read."""
    try:
        registry, settings = router.registry(), router.settings()
        if registry.patterns().patterns or settings.default_deployment is not None \
                or settings.router_general_settings.pass_through_all_models:
            return None
        names = {*registry.names(kind="group_set"), *registry.names(kind="deployment_names"),
                 # what its request routing also serves: a deployment's id, a team model's public
                 # name (for that team's keys) and a routing group's name
                 *registry.names(kind="ids"), *registry.names(kind="team_public"), *registry.routing_groups()}
        return frozenset(names | set(getattr(router, "model_group_alias", None) or {}))
    except Exception:  # noqa: BLE001 - another litellm's router: nothing is filtered
        return None


def proxy_group_aliases(router: Any) -> dict[str, str]:
    """The proxy ``router``'s ``router_settings.model_group_alias``, each alias with the model name it
    stands for (an entry is that name, or ``{"model": name, "hidden": ...}``; one naming itself stands
    for nothing else); ``{}`` for none, or a router this version cannot read."""
    found = getattr(router, "model_group_alias", None)
    if not isinstance(found, Mapping):
        return {}
    groups = {str(alias): entry.get("model") if isinstance(entry, Mapping) else entry for alias, entry in found.items()}
    return {alias: group for alias, group in groups.items() if isinstance(group, str) and group and group != alias}


_CHAINS: dict[tuple[int, str], tuple[Any, tuple[Any, ...]]] = {}  # (id of a fallbacks list, group) -> it, chain


def proxy_fallbacks(router: Any, group: str, kind: str = "fallbacks", given: Any = None) -> tuple[Any, ...]:
    """What the proxy's ``router`` falls back to on its own after ``group`` (its ``router_settings``
    ``fallbacks``, or ``kind``: ``context_window_fallbacks``; ``given``: a request's list of that kind,
    which replaces the router's), as litellm's router looks them up (the group's entry, else the
    generic ``*``; for ``fallbacks``, each target's own entry walked when it fails: :func:`walked`),
    each as configured: a model group's name, or a mapping naming it (``model``) with
    parameters of that attempt's own; none when this litellm's router cannot be read. Kept per list
    and group (looking one up takes litellm 0.01-0.2 ms); a list the router replaces is looked up anew,
    one edited in place is not (litellm's router and proxy replace it: ``update_settings``)."""
    try:
        configured = given if given is not None else getattr(router.settings(), kind)
        if not configured:
            return ()
        kept = _CHAINS.get((id(configured), group))
        if kept is not None and kept[0] is configured:
            return kept[1]
        if kind == "fallbacks":
            chain = walked(configured, group, max_fallbacks(router))
        else:
            from litellm.router_utils.fallback_event_handlers import get_fallback_model_group

            found, _ = get_fallback_model_group(fallbacks=configured, model_group=group)
            chain = tuple(found or ())
    except Exception:  # noqa: BLE001 - another litellm's router: none are followed
        return ()
    if given is not None:  # a request's own: not kept
        return chain
    if len(_CHAINS) >= 1024:
        _CHAINS.clear()
    _CHAINS[id(configured), group] = (configured, chain)
    return chain


def max_fallbacks(router: Any) -> int:
    """How many fallbacks deep litellm's ``router`` goes (its ``max_fallbacks``; 5 by default)."""
    found = getattr(router, "max_fallbacks", None)
    return found if isinstance(found, int) and not isinstance(found, bool) and found >= 0 else 5


def walked(configured: Sequence[Any], group: str, cap: int) -> tuple[Any, ...]:
    """The targets litellm's router tries, in its order, once ``group`` failed, from ``fallbacks``
    keyed by model group: the group's entry (else ``*``'s), and as each target fails, its own entry
    (else the group's, else ``*``'s: ``get_fallback_model_group_for_lookup_groups`` over the target
    and ``group``) walked first, depth first, each target once, no more than ``cap`` deep
    (``max_fallbacks``). Before, only the group's entry was read: a chain ``flaky -> a -> c`` ended at
    ``a``, where the bare router goes on to ``c``. An item naming no model is kept, not walked."""
    from litellm.router_utils.fallback_event_handlers import get_fallback_model_group_for_lookup_groups

    tried, chain = {group}, []

    def walk(at: str, depth: int) -> None:
        if depth >= cap:
            return
        found, _ = get_fallback_model_group_for_lookup_groups(fallbacks=configured,
                                                              lookup_groups=tuple(dict.fromkeys((at, group))))
        for item in found if isinstance(found, list) else ():
            name = fallback_name(item)
            if name is None:
                chain.append(item)
            elif name not in tried:
                tried.add(name)
                chain.append(item)
                walk(name, depth + 1)

    walk(group, 0)
    return tuple(chain)


def keyed_fallbacks(given: list[Any], group: str, cap: int = 5) -> tuple[Any, ...] | None:
    """The chain litellm's router follows after ``group`` from a request's ``fallbacks`` keyed by
    model group (``[{"flaky": ["coder"]}]``, ``"*"`` for any group), as it reads them: entries alone
    walked as the router walks its own (:func:`walked`, ``cap`` deep); entries among plain names
    by ``get_fallback_model_group`` (the group's entry, else the list's last plain name, else
    ``*``'s) where they are keyed by ``group`` or ``*`` only. ``None`` where the list names its
    targets itself (names alone, or mappings with parameters of their own: followed as they are),
    mixes names with another group's entry (handed on as it came), or this litellm cannot read it."""
    keys = [next(iter(item), None) for item in given if isinstance(item, Mapping)]
    try:
        from litellm.router_utils.fallback_event_handlers import (
            check_non_standard_fallback_format,
            get_fallback_model_group,
        )

        if check_non_standard_fallback_format(fallbacks=given):
            return None
        if len(keys) == len(given):  # keyed entries alone: walked as the router walks them
            return walked(given, group, cap)
        if any(key not in (group, "*") for key in keys):
            return None
        found, _ = get_fallback_model_group(fallbacks=given, model_group=group)
    except Exception:  # noqa: BLE001 - another litellm: the list is handed on as it came
        return None
    return tuple(found) if isinstance(found, list) else ()


def fallback_name(item: Any) -> str | None:
    """The model group a fallback item names (a name, or a mapping's ``model``), or ``None``."""
    name = item.get("model") if isinstance(item, Mapping) else item
    return name if isinstance(name, str) and name else None


_NO_CREDIT = re.compile(r"credit balance is too low", re.I)


def out_of_credit(exc: BaseException) -> bool:
    """Does the provider say the account has no credit left? Anthropic answers that with a 400
    (``BadRequestError``), the shape of a request's own fault."""
    return bool(_NO_CREDIT.search(str(exc)[:1000]))


_MISSING_KEY = re.compile(r"missing credentials|missing [\w .-]{1,40} api key|api_key client option must be set", re.I)


def missing_credentials(exc: BaseException) -> bool:
    """Did the provider's client refuse to send for want of a key, before any request? litellm
    reports that as a 500 for some providers (OpenAI's "Missing credentials" is an
    ``InternalServerError``, Gemini's missing key an ``APIConnectionError``) though it is an
    authentication problem of this process, not the provider's health. So is a deployment whose
    key's variable is unset (``MissingKeyError``: the package did not send it)."""
    return isinstance(exc, MissingKeyError) or bool(_MISSING_KEY.search(str(exc)[:1000]))


_UNBUILT = (TypeError, AttributeError, KeyError, IndexError, ValueError)  # Python's, from litellm's own code
_ASKED = ("response_format", "response_schema")  # the request's parameters, not an answer


def _reading(frame: str) -> bool:
    """Is ``frame`` (a function's name) one of litellm's that read a provider's answer
    (``transform_response``, ``transform_google_generate_content_to_openai_model_response``, a
    stream's ``chunk_parser``), not one that maps the request's ``response_format``?"""
    return "chunk_parser" in frame or "response" in frame and not any(asked in frame for asked in _ASKED)


def unbuilt(exc: BaseException) -> BaseException | None:
    """The Python error litellm broke on while building the request, before sending it, if it did;
    else ``None``. A parameter or message part of a shape its mapping for that provider does not take
    (a tool without ``type`` for Anthropic) makes it raise one, which it reports as an
    ``APIConnectionError`` (a 500): the request's fault, or litellm's, not the provider's health. An
    error raised reading a provider's answer (in a frame such as ``transform_response``:
    :func:`_reading`) is not one."""
    for _ in range(3):  # litellm's async path wraps its own APIConnectionError once more
        if type(exc).__name__ != "APIConnectionError":
            return None
        cause = exc.__cause__ or exc.__context__
        if cause is None:
            return None
        if isinstance(cause, _UNBUILT) and not isinstance(cause, UnicodeError | json.JSONDecodeError):
            frames = traceback.extract_tb(cause.__traceback__)
            return None if any(_reading(frame.name) for frame in frames) else cause
        exc = cause
    return None


def timed_out(exc: BaseException) -> bool:
    """Did the attempt time out waiting for its answer (litellm's ``timeout=``, the SDK's), not while
    connecting (httpx's ``ConnectTimeout``, however deep litellm wrapped it: nothing left the process)?"""
    if not (isinstance(exc, TimeoutError) or type(exc).__name__ in ("Timeout", "APITimeoutError")):
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if type(cause).__name__ in ("ConnectTimeout", "ConnectError"):
            return False
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return True


def provider_timeout(exc: BaseException) -> bool:
    """Is ``exc`` a provider client's own timeout (litellm's, naming its provider; the OpenAI SDK's
    ``APITimeoutError``, as LangChain's chat models raise it), not a ``TimeoutError`` some other code
    raised (an adapter's handler may have called no model)?"""
    return provider_error(exc) or type(exc).__name__ == "APITimeoutError"


def provider_error(exc: BaseException) -> bool:
    """Did ``exc`` come from a provider's call? litellm's exceptions name the provider
    (``llm_provider``); what the proxy raises itself (a guardrail's or its rate limiter's
    ``HTTPException``, a client gone) does not."""
    return bool(getattr(exc, "llm_provider", None))


def refused_group(exc: BaseException) -> str | None:
    """The model group litellm's router refused without calling it (``RouterRateLimitError``: all its
    deployments in the router's cooldown, or over their limits), or ``None``. Its failure event names
    no ``model_group``: a proxy call that moved on to its next target meanwhile is not that target's failure."""
    if type(exc).__name__ not in ("RouterRateLimitError", "RouterRateLimitErrorBasic"):
        return None
    model = getattr(exc, "model", None)
    return model if isinstance(model, str) and model else None


def retries_unhooked(request: Mapping[str, Any]) -> str | None:
    """The setting by which litellm retries a failed SDK ``acompletion`` of ``request`` itself
    (``num_retries``, ``retry_policy``, or ``litellm.num_retries``), if any: it calls the provider
    again without its hooks or events (``acompletion_with_retries``, 1.110.2). A ``litellm.Router``'s
    call is retried by the router."""
    if request.get("retry_policy"):
        return "retry_policy"
    retries = request.get("num_retries")
    if retries is not None:
        return "num_retries" if retries else None
    return "litellm.num_retries" if litellm().num_retries else None


def mark_cache_hit(response: Any) -> None:
    hidden(response)["cache_hit"] = True


def usage_source(response: Any, stream: Any = None, *, streamed: bool = False) -> UsageSource:
    """``cache`` for an answer served from a response cache (litellm's own, or :func:`mark_cache_hit`):
    it consumed nothing; ``estimated`` for a :class:`Partial` (litellm's count, not the provider's
    report); for the answer litellm assembled from a chat stream (``streamed``), ``provider`` only when
    ``stream``, the stream's wrapper, kept a usage chunk (:func:`usage_reported`), else ``estimated``:
    the assembled answer's usage looks the same whether the provider reported it or litellm counted
    it; ``provider`` for any other."""
    if isinstance(response, Partial):
        return "estimated"
    if hidden(response).get("cache_hit"):
        return "cache"
    return "provider" if not streamed or usage_reported((), stream) else "estimated"


def cache_hit(event: Mapping[str, Any]) -> bool:
    """Did litellm's response cache answer the call of these event kwargs? litellm marks a hit there
    (``cache_hit``); the answer it assembles from a cached stream's chunks carries no mark."""
    return event.get("cache_hit") is True


def stream_wrapper(value: Any) -> Any:
    """``value`` if it is litellm's chat stream wrapper (``CustomStreamWrapper``, a router's stream
    included), whose ``chunks`` keep the provider's usage chunks (:func:`usage_reported`); else ``None``."""
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    return value if isinstance(value, CustomStreamWrapper) else None


def served_chunks(wrapper: Any) -> list[Any] | None:
    """The chunks a chat stream's wrapper (:func:`stream_wrapper`) kept of what it served, when a
    provider served them: ``None`` for no wrapper, or a stream litellm's response cache replayed (its
    ``custom_llm_provider`` is ``cached_response``, litellm/caching/caching_handler.py, 1.110.2; while it
    is served, the call's ``cache_hit`` is not set yet)."""
    chunks = getattr(wrapper, "chunks", None)
    if not isinstance(chunks, list) or getattr(wrapper, "custom_llm_provider", None) == "cached_response":
        return None
    return chunks


def fell_back_mid_stream(wrapper: Any) -> bool:
    """Did litellm's router fall back while the stream of its ``wrapper`` was read? The wrapper then
    keeps the first target's chunks, and what it served after them came from its fallback's own
    wrapper, out of reach (``fallback_headers_adopted``: litellm/router_rust/invoke/streaming.py, 1.110.2)."""
    return getattr(wrapper, "fallback_headers_adopted", False) is True


_SERVED = ("content", "tool_calls", "function_call", "refusal", "audio", "images")  # what a message gives its caller
_SAID = (*_SERVED, "reasoning_content", "thinking_blocks")  # what a stream's delta carries of the provider's answer


def said_nothing(chunks: list[Any], stream: Any = None) -> bool:
    """Did a chat stream's provider send nothing: no chunk with text, reasoning, a tool call, a
    refusal, audio, images or usage, and no finish reason of its own, in its chunks or (``stream``)
    the wrapper litellm read it through (litellm ends a stream whose provider closed before any data
    with a bare ``stop`` it makes: a ``length`` or ``content_filter`` the provider sent is an answer)?"""
    if getattr(stream, "received_finish_reason", None) or getattr(stream, "intermittent_finish_reason", None) \
            or getattr(stream, "received_any_finish_reason", False) is True:  # (Gemini's MAX_TOKENS, SAFETY)
        return False
    for chunk in chunks:
        if getattr(chunk, "usage", None) is not None:
            return False
        for choice in getattr(chunk, "choices", None) or ():
            if getattr(choice, "finish_reason", None) not in (None, "stop"):  # a filter's, the length
                return False
            delta = getattr(choice, "delta", None)
            if any(getattr(delta, name, None) for name in _SAID):
                return False
    return True


def says_nothing(response: Any) -> bool:
    """Does a chat completion (litellm's, a stream's assembled, or an adapter's as a dict) give its
    caller nothing: no choice whose message has text, a tool call, a refusal, audio or images (a
    stream its provider closed before any data, an empty text)? Reasoning alone is no answer to serve again."""
    for choice in _field(response, "choices") or ():
        message = _field(choice, "message")
        if any(_field(message, name) for name in _SERVED):
            return False
    return True


def _field(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def bare_finish(chunk: Any, stream: Any = None) -> bool:
    """Is ``chunk`` a stream's end that says nothing (a finish reason litellm made, no text, reasoning,
    tool call or usage: :func:`said_nothing`): what litellm streams for a provider that closed before
    any data?"""
    choices = getattr(chunk, "choices", None) or ()
    return bool(choices) and all(getattr(c, "finish_reason", None) for c in choices) and said_nothing([chunk], stream)


def attempt_times(logging_obj: Any, *, streamed: bool) -> tuple[datetime, datetime | None] | None:
    """The start and end of the attempt that answered a proxy request, as its success event will carry
    them, read from the request's logging object before the event: a plain answer's from
    ``deferred_success_result`` (litellm/utils.py, 1.110.2), a stream's start from ``start_time`` (as
    litellm's success handler takes it; the stream ends now). Else the request's start (pre-call hook
    and failed attempts included), ``None`` when the logging object has none."""
    details = getattr(logging_obj, "model_call_details", None)
    begun = details.get("start_time") if isinstance(details, Mapping) else None
    if not isinstance(begun, datetime):
        return None
    if streamed:
        start = getattr(logging_obj, "start_time", None)
        start = start if isinstance(start, datetime) else begun
        return start, datetime.now(start.tzinfo)
    deferred = getattr(logging_obj, "deferred_success_result", None)
    if isinstance(deferred, tuple) and len(deferred) == 3:
        return deferred[1], deferred[2]
    end = details.get("end_time") if isinstance(details, Mapping) else None
    return begun, end if isinstance(end, datetime) else None


def logged_stream(event: Mapping[str, Any]) -> Any:
    """The stream wrapper a call's event kwargs carry, or ``None``: litellm's sync ``completion`` logs
    the wrapper it returns as the call's ``original_response`` for the providers it sends through its
    OpenAI client, Anthropic's and some others (main.py, 1.110.2); those of its generic HTTP handler
    log a note there, and an async call the coroutine that made the stream."""
    return stream_wrapper(event.get("original_response"))


@dataclass(frozen=True)
class Partial:
    """What a call that broke off partway had used, read as a response that carries only ``usage``."""

    usage: Any

    @classmethod
    def counted(cls, prompt: int, output: int) -> Partial:
        """``prompt`` and ``output`` tokens, counted here (neither reported by the provider)."""
        return cls({"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output})


def broke_while_read(event: Mapping[str, Any]) -> bool:
    """Did a streamed call fail while its stream was read, after litellm had handed it over (a stream
    cut partway, or one that broke before its first chunk), rather than when it was sent? Read from a
    failure event's kwargs: the error was raised in ``CustomStreamWrapper`` (its
    ``traceback_exception`` passes through litellm_core_utils/streaming_handler.py, 1.110.2); without
    a traceback, a chunk had come (``completion_start_time``, which the attempts of one call share).
    litellm's SDK ``fallbacks=`` do not follow such a failure."""
    if not event.get("stream"):
        return False
    trace = event.get("traceback_exception")
    if isinstance(trace, str) and trace:
        return "streaming_handler" in trace
    return event.get("completion_start_time") is not None


def partial(event: Mapping[str, Any]) -> Partial | None:
    """What a failed call had used, as litellm recorded it before its failure event: for a stream that
    broke partway, its count of the chunks that came (``combined_usage_object``, set by
    ``CustomStreamWrapper._record_partial_usage_for_failure``, litellm_core_utils/streaming_handler.py,
    1.110.2). Read from a failure event's kwargs, or from the logging object of a proxy request's
    data (``litellm_logging_obj``); ``None`` where litellm recorded none, or only the estimate of a
    prompt no provider billed: litellm's proxy lifts one into the data of every request that failed
    after it was sent, priced 0 unless the provider bills such a failure (a read timeout, a client
    that left: ``_failure_usage_to_lift``, proxy/utils.py), so an error answered at once used nothing."""
    details = getattr(event.get("litellm_logging_obj"), "model_call_details", None)
    for source in (event, details):
        if not isinstance(source, Mapping) or (usage := source.get("combined_usage_object")) is None:
            continue
        if not getattr(usage, "completion_tokens", 0) and not source.get("response_cost"):
            continue  # the prompt alone, estimated and unbilled
        return Partial(usage)
    return None


def unlogged(event: Mapping[str, Any]) -> bool:
    """Did the caller ask litellm to hand the call of these event kwargs to no logger (``no-log=True``,
    kept in its ``litellm_params``)? litellm then delivers none of its success, stream or failure
    events to a logger like this one, though it still calls ``log_pre_api_call``
    (``Logging.should_run_callback``, litellm_core_utils/litellm_logging.py, 1.110.2), unless
    ``litellm.global_disable_no_log_param`` is set."""
    params = event.get("litellm_params")
    return isinstance(params, Mapping) and params.get("no-log") is True \
        and not getattr(litellm(), "global_disable_no_log_param", False)


def streamed_output_tokens(chunks: Sequence[Any]) -> int:
    """litellm's count of the output tokens in ``chunks``, a stream's (``stream_chunk_builder``, as it
    counts a stream that broke partway). A sync stream's chunks reach a logger one by one as its caller
    reads them: ``CustomStreamWrapper.__next__`` hands each to the logging object's ``success_handler``
    on litellm's executor, which calls ``log_stream_event`` until the stream has ended
    (litellm_core_utils/streaming_handler.py, litellm_logging.py, 1.110.2; not under
    ``litellm.disable_streaming_logging``), in the order the executor runs them. An async stream's
    chunks reach no callback. A chunk litellm redacted before logging it (``turn_off_message_logging``:
    ``{"text": "redacted-by-litellm"}``, no stream chunk) has no text to count, and counts as one token,
    as does each chunk when the builder fails."""
    real = [c for c in chunks if hasattr(c, "choices")]
    counted = 0
    if real:
        try:
            built = litellm().stream_chunk_builder(chunks=real)
            counted = int(getattr(getattr(built, "usage", None), "completion_tokens", 0) or 0)
        except Exception:  # noqa: BLE001 - a count, never a failure: a token a chunk
            counted = len(real)
    return counted + len(chunks) - len(real)


def client_disconnected(event: Mapping[str, Any]) -> bool:
    """Did the proxy's client leave before its stream ended? litellm's proxy catches the disconnect in
    its stream generator (``except (asyncio.CancelledError, GeneratorExit)``, proxy/proxy_server.py:11024,
    1.110.2), flags the request's metadata ``client_disconnected`` (error 499,
    ``_record_streaming_client_disconnect_if_needed``, proxy/common_request_processing.py:395-452), then
    delivers a response assembled from the chunks streamed so far as a success event
    (``_bill_partial_streamed_spend_on_disconnect``, 505-571, dispatched at 584-586). Read from that
    event's kwargs (the logging object's ``metadata``, or its ``litellm_params``' one)."""
    params = event.get("litellm_params")
    for metadata in (event.get("metadata"), params.get("metadata") if isinstance(params, Mapping) else None):
        if isinstance(metadata, Mapping) and metadata.get("client_disconnected") is True:
            return True
    return False


def attach_outcome(response: Any, outcome: Any) -> None:
    """Keep the call's Outcome on the response, where ``router_middleware.outcome()`` finds it."""
    hidden(response)[OUTCOME_KEY] = outcome  # no hidden params: written nowhere, as mark_cache_hit


# the coroutines litellm runs as tasks of their own to deliver an async stream's events: its success
# once it ended, its failure mid-stream (litellm_core_utils/streaming_handler.py, 1.110.2)
_EVENT_TASKS = frozenset({"Logging.dispatch_success_handlers",
                          "Logging.dispatch_attempt_failure_handlers.<locals>.dispatch"})


async def drain_callbacks() -> None:
    """Wait until litellm has run the async success and failure callbacks of the calls made so far:
    it spawns a task per call that queues the callback on its logging worker, which runs it later;
    an async stream's success is delivered by a task of its own, once the stream has ended."""
    current = asyncio.current_task()
    events = [t for t in asyncio.all_tasks() if t is not current and not t.done()
              and getattr(t.get_coro(), "__qualname__", "") in _EVENT_TASKS]
    if events:
        await asyncio.wait(events)
    try:
        from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
        from litellm.responses.streaming_iterator import drain_logging_tasks
    except ImportError:  # an older litellm runs its callbacks as plain tasks: let them run
        await asyncio.sleep(0)
        return
    await drain_logging_tasks()
    await GLOBAL_LOGGING_WORKER.flush()


def requested_model(event: Mapping[str, Any]) -> str | None:
    """The model as the caller passed it (``openai/gpt-4o-mini``), read from a call's event kwargs,
    whose ``model`` litellm has stripped of its provider prefix (``gpt-4o-mini``). litellm keeps the
    caller's name, after its ``model_alias_map``, in ``agentic_loop_params`` (recorded in ``completion``
    before ``get_llm_provider``, main.py, 1.110.2); ``None`` where it did not."""
    found = event.get("agentic_loop_params")
    name = found.get("model") if isinstance(found, Mapping) else None
    return str(name) if name else None


def api_base(event: Mapping[str, Any]) -> str | None:
    """The endpoint a call's event kwargs say it was sent to (``litellm_params.api_base``, set by
    litellm for the call before it is sent), or ``None``."""
    params = event.get("litellm_params")
    base = params.get("api_base") if isinstance(params, Mapping) else None
    return base if isinstance(base, str) and base else None


def time_ns(moment: Any) -> int | None:
    """A litellm event's ``start_time``/``end_time`` (a ``datetime``; naive ones are local time, as
    litellm takes them) on the ``time.time_ns()`` clock spans use, or ``None``."""
    return int(moment.timestamp() * 1e9) if isinstance(moment, datetime) else None


def provider_of(response: Any) -> str | None:
    value = hidden(response).get("custom_llm_provider")
    return str(value) if value else None


# litellm's chat params that it never validates against a model (or that only name the request)
_UNCHECKED = frozenset({"model", "custom_llm_provider", "api_version", "drop_params", "allowed_openai_params",
                        "additional_drop_params", "messages", "metadata", "extra_headers", "user", "stream",
                        "stream_options", "max_retries"})
# OpenAI's o-series take reasoning_effort low, medium or high only. litellm's map has no level flags
# for them and its o-series config forwards any level, so "minimal", "none" or "xhigh" reach OpenAI
# and come back as a 400: this table is where litellm is wrong.
_O_SERIES_EFFORTS = frozenset({"low", "medium", "high"})


def drops_params() -> bool:
    """litellm's global ``drop_params`` (the proxy's ``litellm_settings.drop_params``): it drops what
    a model does not take rather than refusing the call."""
    return bool(getattr(litellm(), "drop_params", False))


@functools.lru_cache(maxsize=512)
def param_rules(model: str) -> ParamRules:
    """What ``model`` takes (see :class:`~.fit.ParamRules`), from litellm's provider config for it:
    its supported OpenAI params, its reasoning_effort gate (gpt-5 family, Gemini) and its
    temperature rules (o-series, gpt-5, Claude models without sampling params). A model litellm
    cannot place gets rules that check nothing."""
    lib = litellm()
    from litellm.constants import DEFAULT_CHAT_COMPLETION_PARAM_VALUES
    from litellm.llms.anthropic.chat.transformation import AnthropicConfig
    from litellm.llms.openai.chat.gpt_reasoning_transformation import OpenAIGPT5Config
    from litellm.llms.openai.chat.o_series_transformation import OpenAIOSeriesConfig
    from litellm.llms.vertex_ai.gemini.vertex_and_google_ai_studio_gemini import VertexGeminiConfig
    from litellm.types.utils import LlmProviders
    from litellm.utils import ProviderConfigManager

    try:
        with _quiet():
            name, provider, _, _ = lib.get_llm_provider(model)
        config = ProviderConfigManager.get_provider_chat_config(model=name, provider=LlmProviders(provider))
        supported = lib.get_supported_openai_params(model=name, custom_llm_provider=provider)
        if supported is None:  # litellm then checks against OpenAI's list
            supported = lib.get_supported_openai_params(model=name, custom_llm_provider="openai")
    except Exception:  # noqa: BLE001 - a model litellm cannot place: leave its params alone
        return ParamRules()
    checked = {k: v for k, v in DEFAULT_CHAT_COMPLETION_PARAM_VALUES.items() if k not in _UNCHECKED}
    rules = ParamRules(checked=checked, supported=frozenset(supported or ()))
    if isinstance(config, OpenAIOSeriesConfig):
        return replace(rules, efforts=_O_SERIES_EFFORTS, temperature_one=True)
    if isinstance(config, OpenAIGPT5Config):
        efforts = frozenset(level for level in LEVELS if not config.refuses_reasoning_effort_level(name, level))
        takes_none = config.supports_reasoning_effort_level(name, "none")
        return replace(rules, efforts=efforts, temperature_one=True, sampling_if_effort_none=takes_none,
                       default_effort_none=takes_none and config.effort_resolves_to_none(name, None))
    if isinstance(config, AnthropicConfig):
        # Claude 4.7+ take only temperature=1. With thinking on, litellm forwards temperature, top_p and
        # top_k as sent and Anthropic answers 400: thinking_sampling covers what litellm misses.
        return replace(rules, temperature_one=not config._supports_sampling_params(name), thinking_sampling=True)
    if isinstance(config, VertexGeminiConfig):
        return replace(rules, efforts=frozenset(level for level in LEVELS if _gemini_takes(config, name, level)))
    return rules


def _gemini_takes(config: Any, model: str, level: str) -> bool:
    """Whether litellm's Gemini config maps ``reasoning_effort=level`` for ``model`` (it raises if not)."""
    try:
        config._map_reasoning_effort(level, model, level)
    except Exception:  # noqa: BLE001 - UnsupportedParamsError: a level the model lacks
        return False
    return True
