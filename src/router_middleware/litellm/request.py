"""What a litellm request says, read for :class:`.RouterLogger`: the caller's ``metadata=``, which
calls are chat calls, the pipeline's own (:func:`_ours`) or sent as they came (:func:`_as_sent`), a
call's labels (derived by a proxy from the conversation: :func:`run_labels`), an Anthropic or
Responses request as chat messages (:func:`as_sent_view`), and the request a plan makes of it
(:func:`_switch`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from .. import wire
from ..context.breakpoints import FIRST_CALL
from ..context.structure import head_length
from ..context.summarize import SIDE_CALL
from ..errors import RequestError
from ..reasoning import infer_step_kind
from ..routing.fallback import given_fallbacks
from ..telemetry import log
from ..types import AgentContext, Call, Message, Plan

# the request's parameters a call is planned with (checked as Pipeline.completion checks them: see
# params.check_params); ``n`` sizes its reservation
_REQUEST_KEYS = frozenset({
    "tools", "tool_choice", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "stream",
    "response_format", "reasoning_effort", "thinking", "reasoning", "parallel_tool_calls", "seed", "n",
    "presence_penalty", "frequency_penalty",
})


def _metadata(kwargs: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``metadata=`` the caller gave litellm (where it keeps it differs by path)."""
    if isinstance(kwargs.get("metadata"), Mapping) and kwargs["metadata"]:
        return kwargs["metadata"]  # type: ignore[no-any-return]
    for source in (kwargs.get("litellm_params"), getattr(kwargs.get("litellm_logging_obj"), "model_call_details",
                                                          None)):
        if isinstance(source, Mapping):
            found = source.get("metadata") or (source.get("litellm_params") or {}).get("metadata")
            if isinstance(found, Mapping):
                return found
    return {}


def _is_chat(kwargs: Mapping[str, Any], call_type: Any) -> bool:
    return "messages" in kwargs and str(getattr(call_type, "value", call_type)) in ("acompletion", "completion") \
        and not _ours(kwargs)


# Endpoints the proxy sends as they came (no routing, context or reasoning policy: those read and
# rewrite chat messages), admitted against quotas and budgets and counted: call type -> the endpoint.
_AS_SENT = {"anthropic_messages": "/v1/messages", "aresponses": "/v1/responses"}
# What the SDK's deployment hook admits as sent (``litellm.aresponses``).
_SDK_AS_SENT = {"aresponses": "/v1/responses"}


def _as_sent(kwargs: Mapping[str, Any], call_type: Any, endpoints: Mapping[str, str] = _AS_SENT) -> str | None:
    """The endpoint of a request sent as it came (behind the proxy :data:`_AS_SENT`, in the SDK
    :data:`_SDK_AS_SENT`), or ``None``."""
    endpoint = endpoints.get(str(getattr(call_type, "value", call_type)))
    return None if endpoint is None or _ours(kwargs) else endpoint


def _ours(kwargs: Mapping[str, Any]) -> bool:
    """A call the pipeline made itself (an attempt, a context summary): accounted in the pipeline's own row."""
    return bool(_metadata(kwargs).get(SIDE_CALL))


def _digest(value: object) -> str:
    return hashlib.blake2b(repr(value).encode(), digest_size=8).hexdigest()


def run_labels(messages: Sequence[Message], owner: tuple[object, ...] = (), request: str | None = None
               ) -> dict[str, Any]:
    """What a proxy can tell of an agent run from its conversation, when the client sends no labels:
    ``session_id`` from the opening request (everything before the first assistant turn) and that
    turn (its tool-call ids or text, unique to the run), ``step`` (assistant turns so far) and
    ``step_kind``. A run's first call has no assistant turn yet: its session is its own, the head's
    and the ``request``'s id (``head-<h>-first-<r>``; without an id, ``head-<h>``, which every run that
    opens alike shares: a session budget filled up across reruns of one task and refused a new run's
    first call; its ``prompt_cache_key`` stays the head's: :func:`.session_cache_key`), and the run's
    later calls share ``head-<h>-<a>``. ``owner`` (the call's tenant and user, behind the proxy) keeps
    two users' runs that open alike apart."""
    head = head_length(messages)
    opening = [(m.get("role"), m.get("content")) for m in messages[:head]]
    session = f"head-{_digest([*opening, owner] if any(o is not None for o in owner) else opening)}"
    if head < len(messages):
        first = messages[head]
        ids = [c.get("id") for c in first.get("tool_calls") or () if isinstance(c, Mapping)]
        session += f"-{_digest(ids or first.get('content'))}"
    elif request:
        session += f"{FIRST_CALL}{_digest(request)}"
    steps = [m.get("role") for m in messages].count("assistant")
    return {"session_id": session, "step": steps, "step_kind": infer_step_kind(messages)}


def _end_user(kwargs: Mapping[str, Any]) -> str | None:
    """The request's OpenAI ``user`` field (the end user it is made for), where a string: a call's
    keyword, or the ``optional_params`` of litellm's event."""
    for source in (kwargs, kwargs.get("optional_params")):
        value = source.get("user") if isinstance(source, Mapping) else None
        if isinstance(value, str) and value:
            return value
    return None


# the labels the LiteLLM proxy's key gives a call, by the field litellm writes them to in its metadata
_KEY_FIELDS = (("user", "user_api_key_user_id"), ("tenant", "user_api_key_team_id"))
_ADMIN = "default_user_id"  # the user litellm's proxy gives its master key (LITELLM_PROXY_ADMIN_NAME)
_SAID: set[tuple[str, str, str]] = set()  # (label, the key's user, its team) whose client claims were said dropped
KeyLabels = Literal["only", "first", "off"]


def _key_labels(kwargs: Mapping[str, Any]) -> dict[str, str | None]:
    """Behind the LiteLLM proxy, the ``user`` and ``tenant`` of the key the request came with: the key's
    ``user_id`` and ``team_id``, which the proxy writes into the request's metadata
    (``user_api_key_user_id``, ``user_api_key_team_id``) once it has removed any the client sent;
    ``None`` for one the key lacks. Empty for a key with neither, and for the master key (whose user
    is litellm's ``default_user_id``, nobody's)."""
    params = kwargs.get("litellm_params")
    params = params if isinstance(params, Mapping) else {}
    found: dict[str, str | None] = {}
    for source in (kwargs.get("metadata"), kwargs.get("litellm_metadata"), params.get("metadata"),
                   params.get("litellm_metadata")):
        if not isinstance(source, Mapping):
            continue
        for label, field in _KEY_FIELDS:
            value = source.get(field)
            if label not in found and isinstance(value, str) and value and value != _ADMIN:
                found[label] = value
    return {label: found.get(label) for label, _ in _KEY_FIELDS} if found else {}


def _by_key(context: dict[str, Any], key: Mapping[str, str | None], *, first: bool) -> None:
    """Label ``context`` by the proxy ``key`` (:func:`_key_labels`): its user and tenant, one it lacks
    taken out (``first``: left as the client named it); a client's value replaced or taken out is said
    once per key and label."""
    for label, value in key.items():
        claimed = context.get(label)
        if value is None and first:
            continue
        said = (label, str(key.get("user")), str(key.get("tenant")))
        if claimed is not None and claimed != value and said not in _SAID and len(_SAID) < 10_000:
            _SAID.add(said)
            held = f"the key's, {value!r}, holds" if value is not None else "the key has none: the call has none"
            log.warning("proxy_label_from_key", label=label, key=value, claimed=str(claimed)[:100],
                        why=f"the request named a {label} of its own: {held} (proxy.key_labels; said once for "
                            f"this key's {label})")
        if value is None:
            context.pop(label, None)
        else:
            context[label] = value


def _context(kwargs: Mapping[str, Any], *, derive: bool = False, key_labels: KeyLabels = "only") -> dict[str, Any]:
    """The call's labels from its metadata, its ``user`` the request's OpenAI ``user`` field where the
    metadata names none; behind the LiteLLM proxy, with a key that has a user or a team, its ``user``
    and ``tenant`` as ``key_labels`` says (:class:`.ProxyConfig`: by default the key's alone, so that a
    client cannot spend another user's or team's budget; the client's dropped are said once per key);
    with ``derive`` (the proxy), what the client did not label is derived from the conversation
    (:func:`run_labels`, its session apart for each user and tenant)."""
    metadata = _metadata(kwargs)
    keys = ("app", "agent_id", "session_id", "step", "step_kind", "user", "tenant")
    context = {k: metadata[k] for k in keys if metadata.get(k) is not None}
    if "user" not in context and (user := _end_user(kwargs)) is not None:
        context["user"] = user
    if key_labels != "off":
        _by_key(context, _key_labels(kwargs), first=key_labels == "first")
    if derive:
        sent = kwargs.get("messages") or []
        messages = sent if set(map(type, sent)) <= {dict} else [m for m in sent if isinstance(m, Mapping)]
        call_id = kwargs.get("litellm_call_id")
        derived = run_labels(messages, owner=(context.get("tenant"), context.get("user")),
                             request=call_id if isinstance(call_id, str) else None)
        if "session_id" in context:
            derived.pop("step")  # a client's own session may not start where the messages do
        context = {**derived, **context}
    return context


def _observed(model: str, messages: list[Any], context: dict[str, Any],
              params: Mapping[str, Any] | None = None) -> Call:
    """The call litellm made, with its labels: one the pipeline refuses (litellm's ``metadata`` is
    free-form: ``step="first"``) is left out, logged, rather than the call unrecorded."""
    return _labelled(lambda labels: Call.create(model, messages, params or {}, labels), context)


def _params_of(details: Mapping[str, Any]) -> dict[str, Any]:
    """A call's request parameters (``temperature``, ``max_tokens``, ``stream``...) as its caller gave
    them: litellm copies them into the event's kwargs (unset ones as None, ``stream`` as False)."""
    return {k: v for k, v in details.items() if k in _REQUEST_KEYS and v is not None and (v or k != "stream")}


def _request_of(details: Mapping[str, Any]) -> dict[str, Any]:
    """What :meth:`._Core._planned` reads of a call's event kwargs (its model as passed, its
    messages, its parameters, its labels and end user, its endpoint), apart from litellm's dict, which a finalizer
    must not hold."""
    requested = wire.requested_model(details)
    kept = {"model": details.get("model"), "messages": list(details.get("messages") or []), **_params_of(details),
            "metadata": dict(_metadata(details)), "litellm_params": {"api_base": wire.api_base(details)},
            "user": _end_user(details)}
    return {**kept, "agentic_loop_params": {"model": requested}} if requested else kept


def _labelled(make: Callable[[dict[str, Any]], Call], context: dict[str, Any]) -> Call:
    """``make(context)``; when the pipeline refuses a label (litellm's ``metadata`` is free-form:
    ``step="first"``), ``make`` of the others, logged: the call is planned and recorded without it,
    never sent unadmitted or left unrecorded. Raises what the call's other input is refused for."""
    try:
        return make(context)
    except RequestError as exc:
        kept = {k: v for k, v in context.items() if _accepted(k, v)}
        if kept == context:
            raise
        log.warning("litellm_labels_refused", error=str(exc)[:200])
        return make(kept)


def _accepted(label: str, value: Any) -> bool:
    """Whether the pipeline takes ``value`` for ``label`` (each label is checked on its own)."""
    try:
        AgentContext.coerce({label: value})
    except RequestError:
        return False
    return True


def _seconds(start: Any, end: Any) -> float | None:
    return (end - start).total_seconds() if isinstance(start, datetime) and isinstance(end, datetime) else None


_OPAQUE_PARTS = frozenset({"image", "document", "input_image", "input_file", "input_audio"})


def _text(value: Any) -> str:
    """The text of an Anthropic or Responses content value (a string, or a list of parts), for sizing."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return "\n".join(_text(part) for part in value)
    if isinstance(value, Mapping):
        if value.get("type") in _OPAQUE_PARTS:  # its bytes are no tokens: sized as the provider bills it, after
            return f"[{value.get('type')}]"
        found = value.get("text") if isinstance(value.get("text"), str) else value.get("content")
        return _text(found) if found is not None else json.dumps(value, default=str)
    return "" if value is None else str(value)


def as_sent_view(data: Mapping[str, Any], endpoint: str) -> tuple[list[Message], dict[str, Any]]:
    """What an Anthropic ``/v1/messages`` or OpenAI ``/v1/responses`` request sends, as chat messages
    (roles and text) for its token estimate and its span, and its params: its output cap
    (``max_tokens``) and its tools' definitions as they came (counted, never sent from here: the
    request goes as it came)."""
    messages: list[Message] = []
    if endpoint == "/v1/messages":
        if data.get("system"):
            messages.append({"role": "system", "content": _text(data["system"])})
        for item in data.get("messages") or ():
            if isinstance(item, Mapping):
                role = "assistant" if item.get("role") == "assistant" else "user"
                messages.append({"role": role, "content": _text(item.get("content"))})
        cap = data.get("max_tokens")
    else:
        if data.get("instructions"):
            messages.append({"role": "system", "content": _text(data["instructions"])})
        items = data.get("input")
        for item in [items] if isinstance(items, str) else items or ():
            if isinstance(item, str):
                messages.append({"role": "user", "content": item})
            elif isinstance(item, Mapping):
                said = "assistant" if item.get("type") in ("function_call", "reasoning") else "user"
                role = {"assistant": "assistant", "system": "system", "developer": "system"}.get(str(item.get("role")),
                                                                                                  said)
                text = _text(item.get("content")) if "content" in item else json.dumps(item, default=str)
                messages.append({"role": role, "content": text})
        cap = data.get("max_output_tokens")
    params: dict[str, Any] = {"max_tokens": int(cap)} if isinstance(cap, int) and cap > 0 else {}
    tools = data.get("tools")
    if isinstance(tools, Sequence) and not isinstance(tools, str) and tools:
        params["tools"] = [t if isinstance(t, Mapping) else {"definition": str(t)} for t in tools]
    return messages or [{"role": "user", "content": ""}], params


class _RoutersOwn:
    """What the proxy's router falls back to after a call's first target without the hook: the
    client's own ``fallbacks`` (a request's list replaces the router's), else the router's
    ``router_settings`` ones (:func:`.wire.proxy_fallbacks`). Called with the first target (the
    lifecycle's ``routers_own``), it gives the names the call follows; each item is kept to hand the
    router as it came (:meth:`sent`: a mapping carries parameters of its own attempt). A request's
    list keyed by model group is read as the router reads it (:func:`.wire.keyed_fallbacks`), as
    are the router's own (:func:`.wire.proxy_fallbacks`): each target's own entry walked after it. A name
    of a routing alias the proxy has no model of its own for is handed on, not followed (the lifecycle
    would route it elsewhere; one it has is planned as that model: :meth:`.Engine.replan`); so is an
    item naming no model group (a group-keyed entry among mappings with parameters) or the first
    target itself (with parameters of its own). ``given``: the request's ``fallbacks`` (any value,
    ``None`` included, replaces the router's, as litellm's router takes it), or :data:`ROUTERS`
    where the request has none.
    ``aliases``: the routing aliases the proxy has no model for."""

    ROUTERS: Any = object()  # the request gives no fallbacks of its own

    def __init__(self, router: Any, given: Any, aliases: Collection[str], windows: Any = None) -> None:
        self.router = router
        self.windows = windows  # the request's context_window_fallbacks, if any
        self.given = None if given is _RoutersOwn.ROUTERS else list(given) if isinstance(given, list | tuple) else []
        self.aliases = aliases
        self.items: dict[str, Any] = {}  # name -> the item as configured, for the names followed
        self.left: list[Any] = []  # items handed to the router, not followed

    def __call__(self, first: str) -> tuple[str, ...]:
        chain: Sequence[Any]
        if self.given is None:
            chain = wire.proxy_fallbacks(self.router, first) if self.router is not None else ()
        else:
            keyed = wire.keyed_fallbacks(self.given, first, wire.max_fallbacks(self.router))
            chain = self.given if keyed is None else keyed
        self.items, self.left = {}, []
        for item in chain:
            name = wire.fallback_name(item)
            if name is not None and name in self.items:
                continue
            if name is None or name == first or name in self.aliases:
                self.left.append(item)
            else:
                self.items[name] = item
        return tuple(self.items)

    def window_chain(self, target: str) -> tuple[str, ...] | None:
        """Where the router sends a context-window error at ``target`` instead of the fallbacks it
        was handed: the names of its own chain (its or the request's ``context_window_fallbacks``),
        or ``None`` where it has none."""
        if self.router is None:
            return None
        windows = self.windows if isinstance(self.windows, list | tuple) and self.windows else None
        chain = wire.proxy_fallbacks(self.router, target, "context_window_fallbacks", windows)
        return tuple(dict.fromkeys(n for item in chain if (n := wire.fallback_name(item)) is not None)) or None

    def sent(self, targets: Sequence[str], usable: Callable[[str], bool]) -> list[Any]:
        """The fallbacks to hand the router: ``targets`` (the call's after its first, each as
        configured where it is one of these), then the items left to the router, those it can reach."""
        return [*(self.items.get(t, t) for t in targets),
                *(i for i in self.left if (name := wire.fallback_name(i)) is None or usable(name))]


def _sdk_fallbacks(kwargs: Mapping[str, Any]) -> tuple[str, ...]:
    """The models ``litellm.acompletion`` tries after the one it was called with
    (:func:`~..routing.fallback.given_fallbacks`). (litellm's global ``model_fallbacks`` recurses in
    litellm 1.110.2: not followed.)"""
    return given_fallbacks(kwargs.get("fallbacks"), str(kwargs.get("model")))[0]


def _nested(kwargs: Mapping[str, Any]) -> bool:
    """An SDK call made inside another one whose logging object it shares (``litellm.acompletion``'s
    ``fallbacks=``: one nested ``acompletion`` per model, each with a call id of its own): its events
    carry the outer call's id, so a lifecycle opened under its own id would never be settled."""
    logged = getattr(kwargs.get("litellm_logging_obj"), "litellm_call_id", None)
    own = kwargs.get("litellm_call_id")
    return bool(logged) and bool(own) and own != logged


def _unrefusable(kwargs: Mapping[str, Any]) -> str | None:
    """Why refusing this SDK call in the deployment hook would make things worse, if it would: a
    ``litellm.Router``'s call (``model_group`` in its metadata), whose router takes the refusal (a
    429) for the deployment's and cools it down for every caller; a call litellm retries itself
    (``num_retries``, ``retry_policy``), whose retries call the provider without hooks or events,
    so the refused call would be sent anyway, unseen."""
    if "model_group" in _metadata(kwargs):
        return ("litellm's Router would cool its deployments down for every caller (put the budget on the "
                "Router's side, or behind the proxy use its pre-call hook)")
    setting = wire.retries_unhooked(kwargs)
    if setting is not None:
        return f"litellm retries this call without its hooks ({setting}; without retries it is refused)"
    return None


def _switch(kwargs: Mapping[str, Any], sent: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """``kwargs`` with ``plan``'s messages, and the parameters it sets where they differ from ``sent``
    (what the request carries now), dropping those it does not keep."""
    changed = dict(kwargs)
    changed["messages"] = [dict(m) for m in plan.messages]
    for key in set(sent) | set(plan.params):
        if key not in plan.params:
            changed.pop(key, None)
        elif sent.get(key) != plan.params[key]:
            changed[key] = plan.params[key]
    return changed


def _error(kwargs: Mapping[str, Any]) -> Exception:
    found = kwargs.get("exception")
    return found if isinstance(found, Exception) else RuntimeError(str(kwargs.get("traceback_exception") or "failed"))


def _chat_stream(kwargs: Mapping[str, Any]) -> bool:
    """Is the event's call a streamed chat completion (whose response litellm assembled)?"""
    return kwargs.get("stream") is True and str(kwargs.get("call_type")) in ("acompletion", "completion")


def _ttft(kwargs: Mapping[str, Any], start_time: Any) -> float | None:
    """Time to first token of a stream (litellm's ``completion_start_time``); None otherwise."""
    if not kwargs.get("stream"):
        return None
    return _seconds(start_time, kwargs.get("completion_start_time"))
