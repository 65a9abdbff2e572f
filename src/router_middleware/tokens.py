"""Token counting: the model's tokenizer, once per message (cached by content hash), plus calibration.

Tokenizers, all loaded offline from the files litellm ships: DeepSeek models use DeepSeek's own
tokenizer; OpenAI models use tiktoken's encoding for the model; every other model uses ``o200k_base``
as an approximation that :class:`Calibration` corrects from provider-reported prompt tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import accumulate
from typing import Any, TypeVar

from .memo import HistoryMemo, MessageMemo
from .types import Message

T = TypeVar("T")

Encoder = Callable[[str], int]

MESSAGE_OVERHEAD = 4  # role and separators per message (OpenAI's published estimate)
REQUEST_OVERHEAD = 3  # reply priming
IMAGE_TOKENS = 765  # a 1024x1024 image at high detail (OpenAI's published formula); calibrated later


@cache
def _bundled_tokenizers() -> str | None:
    """litellm's folder of tokenizer files (tiktoken caches and DeepSeek's), found without importing it."""
    spec = importlib.util.find_spec("litellm")
    for root in (spec.submodule_search_locations or []) if spec else []:
        folder = os.path.join(root, "litellm_core_utils", "tokenizers")
        if os.path.isdir(folder):
            return folder
    return None


@cache
def _tiktoken_encoder(name: str) -> Encoder:
    folder = _bundled_tokenizers()
    if folder and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        os.environ["TIKTOKEN_CACHE_DIR"] = folder  # tiktoken would otherwise download the encoding
    import tiktoken

    encoding = tiktoken.get_encoding(name)
    return lambda text: len(encoding.encode(text, disallowed_special=()))


@cache
def _deepseek_encoder() -> Encoder | None:
    folder = _bundled_tokenizers()
    path = os.path.join(folder, "deepseek_tokenizer.json") if folder else ""
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def tokenizer_name(model: str) -> str:
    """Which tokenizer :func:`encoder_for` uses for ``model``."""
    name = model.lower().rsplit("/", 1)[-1]
    if "deepseek" in name and _deepseek_encoder() is not None:
        return "deepseek"
    if name.startswith(("gpt-3.5", "gpt-4-", "gpt-4")) and not name.startswith(("gpt-4o", "gpt-4.1")):
        return "cl100k_base"
    return "o200k_base"


def encoder_for(model: str) -> Encoder:
    name = tokenizer_name(model)
    if name == "deepseek":
        encoder = _deepseek_encoder()
        assert encoder is not None
        return encoder
    return _tiktoken_encoder(name)


def _message_text_parts(message: Message) -> tuple[list[str], int]:
    texts: list[str] = []
    images = 0
    content = message.get("content")
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind in ("image_url", "image", "input_image"):
                images += 1
            for key in ("text", "thinking"):
                value = part.get(key)
                if isinstance(value, str):
                    texts.append(value)
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        texts.append(str(function.get("name") or ""))
        texts.append(str(function.get("arguments") or ""))
    if message.get("name"):
        texts.append(str(message["name"]))
    return texts, images


def message_key(message: Message) -> str:
    """A stable content hash of a message (also used to find shared prefixes)."""
    blob = json.dumps(message, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def fast_key(message: Message) -> object:
    """A cheap in-process cache key: Python caches ``str`` hashes, so resent strings cost O(1).
    (:meth:`TokenCounter.keyed` keeps it per resent message dict.)"""
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return message_key(message)
    calls = message.get("tool_calls")
    call_key = tuple(
        (c.get("id"), hash(str((c.get("function") or {}).get("arguments"))), (c.get("function") or {}).get("name"))
        for c in calls
    ) if calls else None
    return (message.get("role"), hash(content), message.get("tool_call_id"), message.get("name"), call_key)


class Profile:
    """A history's token counts and keys, as running totals (``totals[i]``: the tokens of
    ``messages[:i]``) and a hash chain of the messages' :func:`fast_key` (``chain[i]`` names
    ``messages[:i]``, so a span is named by two numbers). Structure derived once per history
    (:meth:`derive`) resumes from the profile of an earlier history this one extends, so an agent
    loop's growing history is walked once."""

    __slots__ = ("_base", "_derived", "chain", "totals")
    totals: tuple[int, ...]
    chain: tuple[int, ...]
    _base: Profile | None

    def __init__(self, keys: Sequence[object], counts: Sequence[int], prior: Profile | None = None) -> None:
        """``keys`` and ``counts`` of the messages after those ``prior`` profiled."""
        link = prior.chain[-1] if prior is not None else 0
        chain = [link]
        for key in keys:
            link = hash((link, key))
            chain.append(link)
        totals = tuple(accumulate(counts, initial=prior.totals[-1] if prior is not None else 0))
        if prior is not None:
            totals, chain = prior.totals + totals[1:], [*prior.chain, *chain[1:]]
        self.totals, self.chain = totals, tuple(chain)
        self._derived: dict[str, Any] = {}
        # The nearest earlier profile holding derived values (one hop: it keeps no base of its own).
        self._base = None if prior is None else prior if prior._derived else prior._base

    def derive(self, name: str, compute: Callable[[Any], T]) -> T:
        """``compute(earlier)`` once: ``earlier`` is the value derived for a history this one extends,
        or ``None``."""
        if name not in self._derived:
            earlier = self._base._derived.get(name) if self._base is not None else None
            self._derived[name] = compute(earlier)
            self._base = None
        return self._derived[name]  # type: ignore[no-any-return]


class TokenCounter:
    """Counts tokens per message with a bounded cache, so a long history is not recounted per call."""

    def __init__(self, model: str, *, max_cached: int = 50_000) -> None:
        self.model = model
        self.tokenizer = tokenizer_name(model)
        self._encode = encoder_for(model)
        self._cache: OrderedDict[object, int] = OrderedDict()
        self._tools: dict[str, int] = {}
        self._resent = MessageMemo()  # message dict -> (fast key, count), one lookup per resent message
        self._histories = HistoryMemo()  # a resent history -> its Profile
        self._max = max_cached

    def message(self, message: Message, key: object | None = None) -> int:
        key = key if key is not None else fast_key(message)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        texts, images = _message_text_parts(message)
        count = MESSAGE_OVERHEAD + sum(self._encode(t) for t in texts if t) + images * IMAGE_TOKENS
        self._cache[key] = count
        if len(self._cache) > self._max:
            self._cache.popitem(last=False)
        return count

    def keyed(self, message: Message) -> tuple[object, int]:
        """The message's :func:`fast_key` and token count."""
        hit = self._resent.get(message)
        if hit is None:
            key = fast_key(message)
            hit = (key, self.message(message, key))
            self._resent.put(message, hit)
        return hit

    def profile(self, messages: Sequence[Message]) -> Profile:
        """The :class:`Profile` of ``messages``. The part of ``messages`` that resends a
        history profiled before (the same dicts, see :class:`~.memo.HistoryMemo`) is not looked at
        message by message again."""
        n, prior = self._histories.extended(messages)
        if prior is not None and n == len(messages):
            return prior  # type: ignore[no-any-return]
        pairs = [self.keyed(m) for m in messages[n:]]
        profile = Profile([p[0] for p in pairs], [p[1] for p in pairs], prior)
        self._histories.remember(messages, profile)
        return profile

    def tools(self, tools: Sequence[Mapping[str, Any]] | None) -> int:
        if not tools:
            return 0
        try:
            blob = json.dumps(list(tools), sort_keys=True, default=str)
        except TypeError:  # keys that do not sort (a str beside an int): counted as given
            blob = json.dumps(list(tools), default=str)
        count = self._tools.get(blob)
        if count is None:
            count = self._tools[blob] = self._encode(blob)
            if len(self._tools) > 64:  # tool sets rarely change: start over rather than track use
                self._tools.clear()
        return count

    def messages(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None = None) -> int:
        return REQUEST_OVERHEAD + self.tools(tools) + sum(self.message(m) for m in messages)


@dataclass
class Calibration:
    """Online correction of local counts from provider-reported prompt tokens.

    Fits ``reported ~= offset + ratio * counted`` over the calls seen so far (least squares over the
    last ``window`` calls; with one call, only the offset). The offset absorbs what the request holds
    beyond the messages (tool schemas, chat template); the ratio absorbs a tokenizer mismatch.
    """

    window: int = 32
    points: list[tuple[int, int]] = field(default_factory=list)

    def observe(self, counted: int, reported: int) -> None:
        if counted > 0 and reported > 0:
            self.points.append((counted, reported))
            del self.points[: -self.window]

    def coefficients(self) -> tuple[float, float]:
        """``(offset, ratio)``."""
        if not self.points:
            return 0.0, 1.0
        if len(self.points) == 1:
            counted, reported = self.points[0]
            return float(reported - counted), 1.0
        n = len(self.points)
        mean_x = sum(x for x, _ in self.points) / n
        mean_y = sum(y for _, y in self.points) / n
        var = sum((x - mean_x) ** 2 for x, _ in self.points)
        if var < 1e-9 * max(1.0, mean_x) ** 2:
            return mean_y - mean_x, 1.0
        ratio = sum((x - mean_x) * (y - mean_y) for x, y in self.points) / var
        ratio = min(1.6, max(0.6, ratio))
        return mean_y - ratio * mean_x, ratio

    def apply(self, counted: int) -> int:
        offset, ratio = self.coefficients()
        return max(0, round(offset + ratio * counted))
