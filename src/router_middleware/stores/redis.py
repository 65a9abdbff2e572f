"""Redis store: many workers, atomic updates through Lua scripts (extra ``redis``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .base import Addition, Refusal, Sample, Within, acquire

_INCR = """
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return value
"""
_CAS = """
local current = redis.call('GET', KEYS[1])
if (ARGV[1] == '' and current == false) or (ARGV[1] ~= '' and current == ARGV[2]) then
  if ARGV[4] ~= '' then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4]) else redis.call('SET', KEYS[1], ARGV[3]) end
  return 1
end
return 0
"""
# All or nothing: check every key's total + amount against its limit, then add them all.
_WITHIN = """
for i = 1, #KEYS do
  local total = tonumber(redis.call('GET', KEYS[i]) or '0')
  if total + tonumber(ARGV[3 * i - 2]) > tonumber(ARGV[3 * i - 1]) + 1e-9 then return {i, tostring(total)} end
end
for i = 1, #KEYS do
  redis.call('INCRBYFLOAT', KEYS[i], ARGV[3 * i - 2])
  if ARGV[3 * i] ~= '' and redis.call('PTTL', KEYS[i]) == -1 then redis.call('PEXPIRE', KEYS[i], ARGV[3 * i]) end
end
return {0, ''}
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _ms(ttl_s: float | None) -> str:
    return str(max(1, int(ttl_s * 1000))) if ttl_s else ""


class RedisStore:
    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, socket_timeout_s: float = 1.0,
                 prefix: str = "rm:") -> None:
        import redis

        self.client: Any = redis.Redis.from_url(url, socket_timeout=socket_timeout_s,
                                                socket_connect_timeout=socket_timeout_s)
        self.prefix = prefix
        self._incr = self.client.register_script(_INCR)
        self._cas = self.client.register_script(_CAS)
        self._release = self.client.register_script(_RELEASE)
        self._within = self.client.register_script(_WITHIN)

    def _k(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str) -> bytes | None:
        value = self.client.get(self._k(key))
        return bytes(value) if value is not None else None

    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.client.set(self._k(key), value, px=int(ttl_s * 1000) if ttl_s else None)

    def delete(self, key: str) -> None:
        self.client.delete(self._k(key))

    def incr(self, key: str, amount: float = 1.0, ttl_s: float | None = None) -> float:
        return float(self._incr(keys=[self._k(key)], args=[repr(float(amount)), _ms(ttl_s)]))

    def add_within(self, entries: Sequence[Within]) -> Refusal | None:
        if not entries:
            return None
        args: list[str] = []
        for _, amount, limit, ttl_s in entries:
            args += [repr(float(amount)), repr(float(limit)), _ms(ttl_s)]
        index, total = self._within(keys=[self._k(e[0]) for e in entries], args=args)
        return None if int(index) == 0 else (int(index) - 1, float(total))

    def add_many(self, entries: Sequence[Addition], samples: Sequence[Sample] = ()) -> None:
        if not entries and not samples:
            return
        pipe = self.client.pipeline(transaction=False)  # native commands: no script check per batch
        for key, amount, ttl_s in entries:
            if ttl_s:  # a key created here gets the ttl; an existing key keeps its own
                pipe.set(self._k(key), b"0", nx=True, px=max(1, int(ttl_s * 1000)))
            pipe.incrbyfloat(self._k(key), float(amount))
        for key, value, keep, ttl_s in samples:
            pipe.rpush(self._k(key), repr(float(value)))
            pipe.ltrim(self._k(key), -keep, -1)
            if ttl_s:
                pipe.pexpire(self._k(key), max(1, int(ttl_s * 1000)))
        pipe.execute()

    def samples(self, key: str) -> list[float]:
        return [float(v) for v in self.client.lrange(self._k(key), 0, -1)]

    def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl_s: float | None = None) -> bool:
        flag = "" if expected is None else "1"
        return bool(self._cas(keys=[self._k(key)], args=[flag, expected or b"", value, _ms(ttl_s)]))

    @contextmanager
    def lock(self, name: str, ttl_s: float = 10.0, timeout_s: float = 5.0) -> Iterator[None]:
        token = uuid.uuid4().hex
        key = self._k(f"lock:{name}")
        acquire(lambda: bool(self.client.set(key, token, nx=True, px=int(ttl_s * 1000))), name, timeout_s)
        try:
            yield
        finally:
            self._release(keys=[key], args=[token])

    def close(self) -> None:
        self.client.close()
