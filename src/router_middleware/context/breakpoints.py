"""Provider prompt-cache hints: Anthropic ``cache_control`` breakpoints, OpenAI ``prompt_cache_key``.

Anthropic (and Anthropic models through OpenRouter, Bedrock or Vertex AI) caches only up to explicit
breakpoints, at most 4 per request. We mark the stable prefix: the last tool definition, the last
system message, and the last message of the request (the next request of an agent loop resends it
unchanged), each only when the prefix up to it reaches the model's minimum cacheable size.
OpenAI-family models get a stable ``prompt_cache_key`` per session, which keeps a session's requests
on the same cache shard, where the call goes to OpenAI's API or Azure's (``context.prompt_cache_key``:
``auto``; an OpenAI-compatible server elsewhere may refuse the field).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ..policies import PolicyState
from ..types import Decision, Message, Plan
from .structure import has_thinking

EPHEMERAL = {"type": "ephemeral"}
MAX_BREAKPOINTS = 4


def uses_explicit_cache(model: str) -> bool:
    name = model.lower()
    return "claude" in name or name.startswith("anthropic/")


def uses_cache_key(model: str, provider: str | None, endpoint: str | None = None, setting: str = "auto") -> bool:
    """Does ``model`` take OpenAI's ``prompt_cache_key``? Azure's models, and OpenAI's (an OpenAI model
    name whose provider is unknown too) sent to OpenAI's API or an Azure OpenAI resource: ``endpoint``,
    else where litellm sends a call given none (:func:`default_openai_endpoint`), on ``openai.com`` or
    ``openai.azure.com`` (or none: OpenAI's API). Not an OpenAI model served elsewhere, on an
    OpenAI-compatible endpoint (Groq and NVIDIA answer 400 to the field), unless ``setting`` is
    ``always`` (a gateway that passes it on to OpenAI); ``never``: none."""
    if setting == "never":
        return False
    if provider == "azure":
        return True
    if provider != "openai" and (provider is not None or
                                 not model.lower().rsplit("/", 1)[-1].startswith(("gpt-", "o1", "o3", "o4"))):
        return False
    if setting == "always":
        return True
    endpoint = endpoint or default_openai_endpoint()
    return endpoint is None or openai_endpoint(endpoint)


_OPENAI_HOSTS = ("openai.com", "openai.azure.com", "cognitiveservices.azure.com")  # OpenAI's API, Azure OpenAI's


def openai_endpoint(endpoint: str) -> bool:
    """Is ``endpoint`` (a base URL) OpenAI's API (a host of ``openai.com``) or an Azure OpenAI resource's?"""
    host = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}").hostname or ""
    return any(host == name or host.endswith(f".{name}") for name in _OPENAI_HOSTS)


def default_openai_endpoint() -> str | None:
    """Where litellm sends an OpenAI call given no endpoint: ``litellm.api_base``, else the environment's
    ``OPENAI_BASE_URL`` or ``OPENAI_API_BASE`` (the OpenAI SDK's and LangChain's ChatOpenAI's too),
    else ``None`` (OpenAI's API). Read at each call, as litellm reads it (litellm is not imported here)."""
    litellm = sys.modules.get("litellm")
    base = getattr(litellm, "api_base", None) if litellm is not None else None
    return (base if isinstance(base, str) and base else None) or os.environ.get("OPENAI_BASE_URL") \
        or os.environ.get("OPENAI_API_BASE") or None


FIRST_CALL = "-first-"  # what a session derived for a run's first call adds to its opening's (litellm.request)
_DERIVED_FIRST = re.compile(rf"(head-[0-9a-f]{{16}}){FIRST_CALL}[0-9a-f]{{16}}")


@functools.lru_cache(maxsize=4096)
def session_cache_key(session: str) -> str:
    """The ``prompt_cache_key`` of a session: stable across calls and processes. A run's first call,
    a session of its own behind the proxy (``head-<h>-first-<r>``, as derived), is keyed by its
    opening, as every rerun's first call is (the same request: provider and litellm caches serve
    them alike); a client's own session as it is."""
    derived = _DERIVED_FIRST.fullmatch(session)
    keyed = derived.group(1) if derived else session
    return "rm-" + hashlib.blake2b(keyed.encode(), digest_size=8).hexdigest()


def count_marks(messages: tuple[Message, ...], tools: Any) -> int:
    """The cache breakpoints (``cache_control`` marks) ``messages`` and ``tools`` carry."""
    count = 0
    for message in messages:
        if message.get("cache_control"):
            count += 1
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for p in content if isinstance(p, Mapping) and p.get("cache_control"))
    for tool in tools or ():
        if isinstance(tool, Mapping) and tool.get("cache_control"):
            count += 1
    return count


def _markable(part: Any) -> bool:
    """Can ``part`` carry ``cache_control``? Not a thinking block, nor an empty text block (Anthropic
    answers 400 "cache_control cannot be set for empty text blocks")."""
    return isinstance(part, Mapping) and part.get("type") not in ("thinking", "redacted_thinking") \
        and not (part.get("type") == "text" and not str(part.get("text") or "").strip())


def markable(message: Message) -> bool:
    """Can :func:`mark` put a breakpoint on ``message``? Not on blank text (a tool's empty output), nor
    on a message without content (an assistant turn of tool calls alone: litellm drops such a mark)."""
    content = message.get("content")
    if isinstance(content, str):
        return bool(content.strip())
    if isinstance(content, list):
        return any(map(_markable, content))
    return False


def mark(message: Message) -> dict[str, Any]:
    """A copy of ``message`` whose last content part that can carry ``cache_control`` (:func:`markable`)
    carries it."""
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": [{"type": "text", "text": content, "cache_control": EPHEMERAL}]}
    if isinstance(content, list) and content:
        parts = [dict(p) if isinstance(p, Mapping) else p for p in content]
        for i in range(len(parts) - 1, -1, -1):
            if _markable(parts[i]):
                parts[i] = {**parts[i], "cache_control": EPHEMERAL}
                return {**message, "content": parts}
    return {**message, "cache_control": EPHEMERAL}


@dataclass(frozen=True)
class CacheBreakpoints:
    """Anthropic ``cache_control`` marks (system prompt, last message, last tool), or OpenAI's
    ``prompt_cache_key`` per session where the call's endpoint takes it (``cache_key``:
    :func:`uses_cache_key`'s setting; the endpoint: the call's ``api_base``, else its deployment's)."""

    name: str = "cache-breakpoints"
    cache_key: str = "auto"

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        if uses_explicit_cache(plan.model):
            return self._anthropic(plan, state)
        session = plan.call.context.session_id
        if not session or "prompt_cache_key" in plan.params or self.cache_key == "never":
            return plan
        params, name = plan.params, plan.deployment or plan.model
        endpoint = params.get("api_base") or params.get("base_url") or state.endpoints.get(name)
        if uses_cache_key(plan.model, state.catalog.provider(plan.model), endpoint, self.cache_key):
            return plan.decide(Decision(self.name, "cache_key", "stable prompt_cache_key for the session"),
                               params={**plan.params, "prompt_cache_key": session_cache_key(session)})
        return plan

    def _anthropic(self, plan: Plan, state: PolicyState) -> Plan:
        info = state.catalog.resolve(plan.model)
        minimum = info.cache.min_tokens if info else 1024
        messages = list(plan.messages)
        tools = list(plan.params.get("tools") or ())
        budget = MAX_BREAKPOINTS - count_marks(plan.messages, tools)
        counter = state.counter(plan.model)
        prefix = counter.tools(tools)
        cumulative = []
        for message in messages:
            prefix += counter.message(message)
            cumulative.append(prefix)
        chosen: list[str] = []
        params = dict(plan.params)
        if tools and budget > 0 and counter.tools(tools) >= minimum:
            tools[-1] = {**tools[-1], "cache_control": EPHEMERAL}
            params["tools"] = tools
            budget -= 1
            chosen.append("tools")
        systems = [i for i, m in enumerate(messages) if m.get("role") == "system"]
        last = len(messages) - 1  # the last message that can carry a mark (a tool's empty output cannot)
        while last >= 0 and not markable(messages[last]):
            last -= 1
        targets = ([systems[-1]] if systems else []) + ([last] if last >= 0 else [])
        for index in dict.fromkeys(targets):
            if budget <= 0 or cumulative[index] < minimum or has_thinking(messages[index]) \
                    or not markable(messages[index]):  # a blank system prompt: Anthropic's 400
                continue
            messages[index] = mark(messages[index])
            budget -= 1
            chosen.append(f"message {index}")
        if not chosen:
            return plan
        return plan.decide(
            Decision(self.name, "breakpoints", "cache_control on " + ", ".join(chosen),
                     {"breakpoints": len(chosen)}),
            messages=messages, params=params,
        )
