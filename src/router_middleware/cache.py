"""Exact response cache: identical requests (after routing and trimming) are answered from a store.

The key is a hash of what can change the answer: the model actually called, the messages sent, and
every parameter except a short list known to leave the answer alone (streaming, timeouts, retries,
metadata, the prompt-cache routing hint): ``logprobs``, ``extra_body``, ``api_base``, ``api_key``,
``user`` and any parameter added tomorrow are keyed. It is namespaced by app and tenant, encoded so
that no two pairs share a namespace: one tenant can never read another's entries. Which calls may
be cached: those with ``temperature=0``, or any call whose context says ``cache=True``
(``policy: always`` caches everything, ``policy: opt-in`` only the latter). Entries expire after
``ttl_s``; at most ``max_entries`` per namespace are kept (the oldest is evicted first). A store
that fails degrades to a miss with a warning; it never fails the call.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import hashlib
import json
import math
import threading
import uuid
from collections.abc import Mapping, Set
from dataclasses import dataclass, fields, is_dataclass, replace
from enum import Enum
from pathlib import PurePath
from types import BuiltinFunctionType, FunctionType, MethodType
from typing import Any

from pydantic import SecretBytes, SecretStr

from .stores import Store
from .telemetry import log
from .types import Plan
from .wire import litellm, mark_cache_hit

# Parameters that never change the answer (transport, retries, tracing, routing hints; mock_response
# is a test's stand-in for the provider). Every other parameter is part of the key.
UNKEYED_PARAMS = frozenset({
    "stream", "stream_options", "metadata", "timeout", "request_timeout", "num_retries", "max_retries",
    "prompt_cache_key", "litellm_call_id", "litellm_logging_obj", "caching", "no-log", "fallbacks",
    "mock_response", "drop_params",
})


def key_material(value: Any) -> Any:
    """How a value JSON cannot write enters a key (``json.dumps(default=...)``): a pydantic model class
    (a ``response_format``) as its JSON schema, so a field added or changed is another request; any
    other object as its ``str``."""
    if isinstance(value, type) and callable(getattr(value, "model_json_schema", None)):
        name = f"{value.__module__}.{value.__qualname__}"
        try:
            return {"model": name, "schema": _schema(value)}
        except Exception:  # noqa: BLE001 - a schema pydantic cannot write: keyed by the class's name
            return {"model": name}
    return str(value)


KEY_VALUES = 10_000  # values one key_value() reads at most: a larger value is not keyed
_WHOLE_STR = (datetime.date, datetime.time, datetime.timedelta, uuid.UUID, decimal.Decimal, PurePath)  # str is whole


class Unkeyable(ValueError):
    """A value :func:`key_value` cannot hold whole: one that holds itself, is too large, or shows no
    state; ``path``: where in the value it is."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str] = []

    def __str__(self) -> str:
        return f"{'.'.join(self.path)}: {self.what}" if self.path else self.what


def key_value(value: Any) -> Any:
    """``value`` as plain data holding all of it, for a key: a mapping's pairs in their order, a tuple
    apart from a list, a dataclass's, attrs class's or pydantic model's fields (those hidden from
    ``repr`` and pydantic's private ones too) and another object's attributes (``__dict__``,
    ``__slots__``), with their type; a date, UUID, Decimal or path as its ``str``, a function or class
    by its qualified name, a secret as its mask. Raises :class:`Unkeyable`, naming where, for a value
    that holds itself, holds more than :data:`KEY_VALUES` values, or shows no state to key (a lock, a
    connection, an array, a generator)."""
    return _key(value, (), [KEY_VALUES])


def _key(value: Any, within: tuple[int, ...], left: list[int]) -> Any:
    left[0] -= 1
    if left[0] < 0:
        raise Unkeyable(f"more than {KEY_VALUES} values")
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if id(value) in within:
        raise Unkeyable(f"a {kind} that holds itself")
    within = (*within, id(value))
    if isinstance(value, Mapping):
        return {"map": [[_key(k, within, left), _at(k, v, within, left)] for k, v in value.items()]}
    if isinstance(value, list | tuple):
        items = [_at(i, item, within, left) for i, item in enumerate(value)]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, Set):
        return {"set": sorted(json.dumps(_key(item, within, left), sort_keys=True) for item in value)}
    if isinstance(value, SecretStr | SecretBytes):
        return str(value)
    if isinstance(value, Enum):
        return {"type": kind, "value": _key(value.value, within, left)}
    if isinstance(value, _WHOLE_STR):
        return {"type": kind, "str": str(value)}
    if isinstance(value, type):
        return key_material(value)
    if isinstance(value, FunctionType | BuiltinFunctionType | MethodType):
        return {"function": f"{getattr(value, '__module__', None)}.{value.__qualname__}"}
    state = _state(value)
    if state is None:
        raise Unkeyable(f"a {kind} shows no state to key")
    return {"type": kind, "fields": [[name, _at(name, field, within, left)] for name, field in state.items()]}


def _at(where: Any, value: Any, within: tuple[int, ...], left: list[int]) -> Any:
    """:func:`_key` of an item, an error naming its place."""
    try:
        return _key(value, within, left)
    except Unkeyable as error:
        error.path.insert(0, str(where))
        raise


def _names(slots: Any) -> tuple[str, ...]:
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _state(value: Any) -> dict[str, Any] | None:
    """An object's fields by name (pydantic, dataclass, attrs, ``__dict__`` and ``__slots__``), or ``None``."""
    names: Any = getattr(type(value), "model_fields", None)
    if isinstance(names, Mapping):  # pydantic
        return {**{name: getattr(value, name, None) for name in names}, **(getattr(value, "model_extra", None) or {}),
                **(getattr(value, "__pydantic_private__", None) or {})}
    if is_dataclass(value):
        return {field.name: getattr(value, field.name, None) for field in fields(value)}
    attrs = getattr(type(value), "__attrs_attrs__", None)
    if attrs is not None:
        return {a.name: getattr(value, a.name, None) for a in attrs}
    own = getattr(value, "__dict__", None)
    slots = [n for c in type(value).__mro__ for n in _names(getattr(c, "__slots__", ()))
             if n not in ("__dict__", "__weakref__")]
    if not isinstance(own, dict) and not slots:
        return None
    return {**(own if isinstance(own, dict) else {}), **{n: getattr(value, n) for n in slots if hasattr(value, n)}}


@functools.lru_cache(maxsize=256)
def _schema(model: type) -> Any:
    return model.model_json_schema()  # type: ignore[attr-defined]


def keyed_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters that are part of a cache key; a whole float as its int (``temperature`` 0.0, as
    a client's JSON may write it, is the request ``temperature`` 0 is)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v
            for k, v in params.items() if k not in UNKEYED_PARAMS}


@dataclass(frozen=True)
class CachedEntry:
    response: dict[str, Any]
    cost_usd: float | None
    similarity: float | None = None  # set for semantic hits
    saved_context_usd: float | None = None  # what the context policies saved the call it answered, measured
    native: Any = None  # the answer as the adapter that stored it gave it (a LangChain message's dict), if any


def namespace(plan: Plan) -> str:
    """``cache:<hash of (app, tenant)>``: no tenant is not the tenant ``-``, and app ``svc`` with
    tenant ``x:y`` is not app ``svc:x`` with tenant ``y``."""
    context = plan.call.context
    owner = json.dumps([context.app, context.tenant], ensure_ascii=True)
    return f"cache:{hashlib.sha256(owner.encode()).hexdigest()[:24]}"


def request_key(plan: Plan) -> str:
    material = {
        "model": plan.model,
        "messages": [dict(m) for m in plan.messages],
        "params": keyed_params(plan.params),
    }
    blob = json.dumps(material, sort_keys=True, ensure_ascii=True, default=key_material)
    return hashlib.sha256(blob.encode()).hexdigest()


def key_for(plan: Plan) -> str:
    return f"{namespace(plan)}:{request_key(plan)}"


class ResponseCache:
    def __init__(self, store: Store, *, ttl_s: float = 3600.0, max_entries: int = 10_000,
                 policy: str = "temperature0", semantic: Any = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.policy = policy
        self.semantic = semantic  # a SemanticIndex, or None
        self._local = threading.local()  # the last error of this thread's call, for its span

    @property
    def last_error(self) -> str | None:
        return getattr(self._local, "error", None)

    @last_error.setter
    def last_error(self, value: str | None) -> None:
        self._local.error = value

    def cacheable(self, plan: Plan) -> bool:
        opted = plan.call.context.cache
        if opted is not None:
            return opted
        if self.policy == "always":
            return True
        if self.policy == "opt-in":
            return False
        return plan.params.get("temperature") == 0 and not plan.params.get("n", 1) > 1

    def lookup(self, plan: Plan) -> CachedEntry | None:
        """The cached answer for ``plan`` (exact, then semantic), or None; a failure reads as a miss and
        sets :attr:`last_error`."""
        self.last_error = None
        entry = self._load(key_for(plan))
        if entry is None and self.semantic is not None:
            entry = self.similar(plan)
        return entry

    def similar_entry(self, plan: Plan) -> tuple[CachedEntry | None, str | None]:
        """:meth:`similar`'s answer, and why the lookup failed (``None`` if it did not)."""
        self.last_error = None
        entry = self.similar(plan)
        return entry, self.last_error

    def similar(self, plan: Plan) -> CachedEntry | None:
        """A cached answer to a paraphrase of ``plan`` (the semantic index), or None."""
        match = self.semantic.find(plan) if self.semantic is not None else None
        if match is None:
            return None
        found = self._load(match.cache_key)
        return replace(found, similarity=match.similarity) if found is not None else None

    def _load(self, key: str) -> CachedEntry | None:
        try:
            return self.decode(self.store.get(key))
        except Exception as exc:  # noqa: BLE001 - a broken cache is a miss
            self.last_error = self.failed("lookup", exc)
            return None

    @staticmethod
    def decode(raw: bytes | None) -> CachedEntry | None:
        """A stored entry. Raises on a corrupt one, or one of another schema (another program's, an
        older version's), which would otherwise be served as an empty answer or fail the call when
        its hit is built: it must hold a chat completion that rebuilds as one (and as a stream) and a
        cost that is a number of 0 or more, or unknown."""
        if raw is None:
            return None
        data = json.loads(raw)
        response, cost = dict(data["response"]), data.get("cost_usd")
        choices = response.get("choices")
        if not (isinstance(choices, list) and choices
                and all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)):
            raise ValueError("the entry holds no chat completion")
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int | float)
                                 or not math.isfinite(cost) or cost < 0):
            raise ValueError(f"the entry's cost_usd {cost!r} is not a cost (a number, 0 or more)")
        rebuild_response(response)  # what litellm's types refuse fails here, a miss, not in the call
        replay_chunks(response)
        context = data.get("saved_context_usd")  # a finite number, else the hit's plan estimates it
        if isinstance(context, bool) or not isinstance(context, int | float) or not math.isfinite(context):
            context = None
        return CachedEntry(response, cost, native=data.get("native"), saved_context_usd=context)

    @staticmethod
    def failed(what: str, exc: Exception) -> str:
        """Log a failed lookup or write; the reason, for the call's span."""
        log.warning(f"cache_{what}_failed", error_type=type(exc).__name__, error=str(exc)[:200])
        return f"{what} failed: {type(exc).__name__}"

    def entry(self, plan: Plan, response: Any, cost_usd: float | None, native: Any = None,
              saved_context_usd: float | None = None) -> tuple[str, bytes, float, str, int]:
        """``put_bounded``'s arguments for storing ``response`` as ``plan``'s answer (with ``native``,
        an adapter's own form of it, served in its place on a hit of that adapter's; and what the
        context policies saved the call, measured, which a hit's row saves too)."""
        space = namespace(plan)
        payload = response.model_dump() if hasattr(response, "model_dump") else dict(response)
        stored = {"response": payload, "cost_usd": cost_usd}
        if native is not None:
            stored["native"] = native
        if saved_context_usd is not None:
            stored["saved_context_usd"] = saved_context_usd
        blob = json.dumps(stored, default=str).encode()
        return f"{space}:{request_key(plan)}", blob, self.ttl_s, space, self.max_entries

    def saved(self, plan: Plan, key: str) -> None:
        """After a write: the semantic index learns the entry."""
        if self.semantic is not None:
            self.semantic.add(plan, key)


def rebuild_response(data: dict[str, Any]) -> Any:
    """A ``ModelResponse`` equal in shape to the one that was stored, marked as a cache hit."""
    response = litellm().ModelResponse(**data)
    mark_cache_hit(response)
    return response


def replay_chunks(data: dict[str, Any]) -> list[Any]:
    """The stored response as stream chunks: each choice's role and content and tool calls, each
    choice's finish (under its own ``index``, as a live stream of ``n`` choices has them), then usage."""
    from litellm.types.utils import ModelResponseStream, Usage

    chunk: Any = ModelResponseStream  # litellm's constructor types are stricter than what it accepts
    choices = data.get("choices") or [{}]
    base: dict[str, Any] = {"id": data.get("id"), "created": data.get("created"), "model": data.get("model"),
                            "object": "chat.completion.chunk"}
    chunks = []
    for number, choice in enumerate(choices):
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(message["tool_calls"])]
        chunks.append(chunk(**base, choices=[{"index": choice.get("index", number), "delta": delta}]))
    for number, choice in enumerate(choices):
        finish = choice.get("finish_reason") or "stop"
        chunks.append(chunk(**base, choices=[{"index": choice.get("index", number), "delta": {},
                                              "finish_reason": finish}]))
    final = chunk(**base, choices=[])
    usage = data.get("usage")
    final.usage = Usage(**usage) if isinstance(usage, dict) else usage  # litellm's Usage, as a live stream has
    chunks.append(final)
    return chunks
