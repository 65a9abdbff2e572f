"""A provider prompt-cache simulator for replay.

Prefixes are identified by a hash chain over message hashes, so a request hits the cache for the
longest message prefix that an earlier request of the same session (or, for providers that cache
output such as DeepSeek, an earlier request plus its reply) already sent.

- Implicit caches (OpenAI, DeepSeek, Gemini): every prefix sent is cached; a hit is counted in
  multiples of ``rules.unit`` and only from ``rules.min_tokens`` on, times ``rules.hit_rate`` (the
  expected value of a best-effort cache that sometimes misses: deterministic, not sampled).
- Explicit caches (Anthropic): only prefixes ending at a ``cache_control`` breakpoint are written
  (billed as cache writes) and can be read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..catalog import CacheRules
from ..types import Message


def prefix_chain(keys: Sequence[str]) -> list[str]:
    """``chain[i]`` identifies ``keys[:i + 1]``."""
    chain: list[str] = []
    running = hashlib.blake2b(digest_size=16)
    for key in keys:
        running.update(key.encode())
        chain.append(running.copy().hexdigest())
    return chain


def has_breakpoint(message: Message) -> bool:
    if message.get("cache_control"):
        return True
    content = message.get("content")
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("cache_control") for p in content
    )


@dataclass
class CacheResult:
    read: int
    write: int


@dataclass
class PromptCacheSim:
    rules: CacheRules
    enabled: bool = True
    _seen: set[str] = field(default_factory=set)

    def _floor(self, tokens: int) -> int:
        if tokens < self.rules.min_tokens:
            return 0
        unit = max(1, self.rules.unit)
        return tokens // unit * unit

    def request(
        self,
        keys: Sequence[str],
        prefix_tokens: Sequence[int],
        messages: Sequence[Message],
        *,
        reply_key: str | None = None,
    ) -> CacheResult:
        """Account one request: ``prefix_tokens[i]`` is the token count of ``messages[:i + 1]``."""
        if not self.enabled or not keys:
            return CacheResult(0, 0)
        chain = prefix_chain(keys)
        hit = -1
        for i in range(len(chain) - 1, -1, -1):
            if chain[i] in self._seen:
                hit = i
                break
        read = self._floor(prefix_tokens[hit]) if hit >= 0 else 0
        if not self.rules.explicit and self.rules.hit_rate < 1.0:
            read = round(read * self.rules.hit_rate)
        read = min(read, prefix_tokens[-1])
        write = 0
        if self.rules.explicit:
            marks = [i for i, m in enumerate(messages) if has_breakpoint(m)]
            for i in marks:
                self._seen.add(chain[i])
            if marks and prefix_tokens[marks[-1]] >= self.rules.min_tokens:
                write = max(0, prefix_tokens[marks[-1]] - read)
        else:
            self._seen.update(chain)
            if self.rules.caches_output and reply_key is not None:
                self._seen.add(prefix_chain([*keys, reply_key])[-1])
        return CacheResult(read, write)
