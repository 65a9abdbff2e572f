"""Redis store: many workers, atomic updates through Lua scripts (extra ``redis``).

Every operation times out after ``timeout_s`` (no retry on a timeout); after one that timed out, the
store is not asked again for ``timeout_s`` (operations raise :class:`StoreError` at once), so a call
meets one timeout while Redis hangs, not one per operation. A refused connection fails at once
anyway, and is not held against the server: a restarted Redis is used again by the next call. A
write is never sent twice: its connection may have broken after Redis ran it (a budget charged
twice); only a read whose connection broke is sent again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from ..telemetry import log
from .base import (
    Addition,
    Average,
    Bounded,
    Countdown,
    Fetched,
    Hold,
    Owned,
    Put,
    Refusal,
    Release,
    Sample,
    StoreError,
    UnreadableCounter,
    Within,
    acquire,
    kept,
    numbers,
    partial_write,
    replaced,
    within_keys,
)

F = TypeVar("F", bound=Callable[..., Any])
Script = Callable[[Any, str, list[str], list[Any]], None]  # queues (pipeline, script source, keys, args)
Reader = Callable[[list[Any]], Any]  # a call's result from the replies to its commands

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
# All or nothing: take expired holds back out of the held keys, check every key's total + amount
# against its limit, every owned key's absence and every countdown's key (where it is) against 0,
# then add them all, set the owned keys to their owners, record the holds and count the countdowns
# down where their keys are. A key holding what no writer of ours leaves (stores.base.counted: no
# finite decimal number, a total below minus its limit, another type; a hold set of another type) answers
# {-index of its check, its value, 'value' | 'type' | 'held'} before anything is added, and the
# caller raises UnreadableCounter naming it: checked later, it would fail the script after the keys
# before it were added to. KEYS: the entries' keys, the owned keys, then per hold its key and its hold set
# (member "<hold id>|<amount>", score: expiry in ms, the server's clock; a member of another form,
# written by another program, is taken out with no amount), then the countdowns' keys.
# ARGV[1], ARGV[2]: how many entries and owned keys; then per entry amount, limit, ttl ms; per owned
# key its owner, ttl ms; per hold amount, limit, ttl ms, member, hold ms; per countdown its amount;
# last, how many countdowns. A check without an amount is an owned key's; one marked (check[4]) a
# countdown's, whose key was found (check[5]) or not.
# A stored number as stores.base.number reads it (a strict finite decimal), or nil; ``limit``: as
# stores.base.counted reads a counter checked against one.
_READABLE = """
local function readable(raw, limit)
  if type(raw) ~= 'string' or #raw > 400 or not (string.find(raw, '^[+-]?%d*%.?%d*$')
      or string.find(raw, '^[+-]?%d*%.?%d*[eE][+-]?%d%d?%d?$')) then return nil end
  local total = tonumber(raw)
  if not total or total ~= total or math.abs(total) == math.huge then return nil end
  if limit and total < -math.max(limit, 1) then return nil end
  return total
end
"""
_WITHIN = _READABLE + """
local n, o, c = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[#ARGV])
local h = (#KEYS - n - o - c) / 2
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local checks = {}
for i = 1, n do checks[i] = {KEYS[i], 3 * i} end
for i = n + 1, n + o do checks[i] = {KEYS[i]} end
for j = 1, c do checks[n + o + h + j] = {KEYS[n + o + 2 * h + j], #ARGV - c - 1 + j, false, true} end
for j = 1, h do
  local key, set = KEYS[n + o + 2 * j - 1], KEYS[n + o + 2 * j]
  local gone = redis.pcall('ZRANGEBYSCORE', set, '-inf', now)
  if gone.err then return {-(n + o + j), '', 'held'} end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
    if readable(redis.pcall('GET', key)) then
      local back = 0
      for _, member in ipairs(gone) do
        local amount = tonumber(string.match(member, '|([^|]*)$') or '')
        if amount and amount == amount and math.abs(amount) ~= math.huge then back = back + amount end
      end
      redis.call('INCRBYFLOAT', key, string.format('%.17g', -back))
    end
  end
  checks[n + o + j] = {key, 3 * n + 2 * o + 5 * j - 2, set}
end
for i, check in ipairs(checks) do
  if check[2] == nil then
    if redis.call('EXISTS', check[1]) == 1 then return {i, '1'} end
  else
    local raw = redis.pcall('GET', check[1])
    if type(raw) == 'table' then return {-i, '', 'type'} end
    local total = readable(raw or '0', not check[4] and tonumber(ARGV[check[2] + 1]))
    if not total then return {-i, raw, 'value'} end
    if check[4] then
      if raw and total - tonumber(ARGV[check[2]]) < -1e-9 then return {i, tostring(total)} end
      check[5] = raw ~= false
    elseif total + tonumber(ARGV[check[2]]) > tonumber(ARGV[check[2] + 1]) + 1e-9 then return {i, tostring(total)} end
  end
end
for i, check in ipairs(checks) do
  local key, at, set = check[1], check[2], check[3]
  if check[4] then
    if check[5] then redis.call('INCRBYFLOAT', key, string.format('%.17g', -tonumber(ARGV[at]))) end
  elseif at == nil then
    local owner = 3 * n + 2 * (i - n) + 1
    if ARGV[owner + 1] ~= '' then redis.call('SET', key, ARGV[owner], 'PX', ARGV[owner + 1])
    else redis.call('SET', key, ARGV[owner]) end
  else
    redis.call('INCRBYFLOAT', key, ARGV[at])
    if ARGV[at + 2] ~= '' and redis.call('PTTL', key) == -1 then redis.call('PEXPIRE', key, ARGV[at + 2]) end
    if set then
      redis.call('ZADD', set, now + tonumber(ARGV[at + 4]), ARGV[at + 3])
      if ARGV[at + 2] ~= '' and redis.call('PTTL', set) == -1 then redis.call('PEXPIRE', set, ARGV[at + 2]) end
    end
  end
end
return {0, ''}
"""
# Append a value to a list and keep its last values (start: -keep), expiring ttl ms later ('': never).
# A key that holds another type is replaced by the list (as SET replaces any value): its LRANGE
# would fail the reads.
_PUSH = """
local function push(key, value, start, ttl)
  local kind = redis.call('TYPE', key)['ok']
  if kind ~= 'list' and kind ~= 'none' then redis.call('DEL', key) end
  redis.call('RPUSH', key, value)
  redis.call('LTRIM', key, start, -1)
  if ttl ~= '' then redis.call('PEXPIRE', key, ttl) end
end
"""
_APPEND = _PUSH + """
push(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
if ARGV[3] == '' then redis.call('PERSIST', KEYS[1]) end
return 1
"""
# A settlement (add_many but its bounded writes), all at once. KEYS: per addition its key, per
# sample its list, per release its key and hold set, per average and per put its key. ARGV[1..5]:
# how many additions, samples, releases, averages and puts; then per addition the amount and the ttl
# ms of a key created here; per sample the value, where the kept values start (-keep) and the list's
# ttl ms; per release the member, what to add while it is still held (actual - held), what to add
# once it is gone (actual), and the ttl ms of a key created here (a held key exists: its hold was
# added to it); per average the sample, its weight and the key's ttl ms; per put the value and ttl
# ms. The releases go first: a script that fails on a key (another program's value) keeps the
# writes before it, and what the admissions count must not wait for a counter or a list of reply
# sizes. A sample goes to its list as _PUSH appends. An average's key that holds no finite number
# (or another type) takes the sample, as stores.base.blend does. A counter that holds no number of
# ours (another program's value, another type) is replaced by the amount (a release's actual spend:
# its hold went with the value), keeping its expiry (else the ttl given), and one gone while its hold
# was still held (deleted, evicted) starts again at that spend with the ttl given: INCRBYFLOAT would fail the
# script there, and every settlement after it; one of the kept keys (the last KEYS, as many as ARGV's
# last: a closed budget's counters) is left as it is and not added to. Returns the keys replaced and
# the keys kept.
_SETTLE = _PUSH + _READABLE + """
local n, m, r = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v, p = tonumber(ARGV[4]), tonumber(ARGV[5])
local replaced, kept, keep = {}, {}, {}
for i = #KEYS - tonumber(ARGV[#ARGV]) + 1, #KEYS do keep[KEYS[i]] = true end
local function put(key, value, ttl)
  if ttl == '' then redis.call('SET', key, value) else redis.call('SET', key, value, 'PX', ttl) end
end
local function add(key, amount, ttl, fresh)
  local raw = redis.pcall('GET', key)
  if raw == false and fresh then put(key, fresh, ttl); return end
  if raw == false or readable(raw) then redis.call('INCRBYFLOAT', key, amount); return end
  if keep[key] then kept[#kept + 1] = key; return end
  local left = redis.call('PTTL', key)
  redis.call('DEL', key)
  put(key, fresh or amount, left > 0 and left or ttl)
  replaced[#replaced + 1] = key
end
local k, a = n + m, 5 + 2 * n + 3 * m
for _ = 1, r do
  local key, set = KEYS[k + 1], KEYS[k + 2]
  if redis.call('ZREM', set, ARGV[a + 1]) == 1 then
    if tonumber(ARGV[a + 2]) ~= 0 then add(key, ARGV[a + 2], ARGV[a + 4], ARGV[a + 3]) end
  elseif tonumber(ARGV[a + 3]) ~= 0 then
    if ARGV[a + 4] ~= '' then redis.call('SET', key, '0', 'NX', 'PX', ARGV[a + 4]) end
    add(key, ARGV[a + 3], ARGV[a + 4])
  end
  k, a = k + 2, a + 4
end
for _ = 1, v do
  local key, sample, weight = KEYS[k + 1], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local value = sample
  if redis.call('TYPE', key)['ok'] == 'string' then
    local stored = tonumber(redis.call('GET', key))
    if stored and stored == stored and stored ~= math.huge and stored ~= -math.huge then
      value = weight * sample + (1 - weight) * stored
    end
  end
  put(key, string.format('%.17g', value), ARGV[a + 3])
  k, a = k + 1, a + 3
end
for _ = 1, p do
  put(KEYS[k + 1], ARGV[a + 1], ARGV[a + 2])
  k, a = k + 1, a + 2
end
k, a = 0, 5
for _ = 1, n do
  local key = KEYS[k + 1]
  if ARGV[a + 2] ~= '' then redis.call('SET', key, '0', 'NX', 'PX', ARGV[a + 2]) end
  add(key, ARGV[a + 1], ARGV[a + 2])
  k, a = k + 1, a + 2
end
for _ = 1, m do
  push(KEYS[k + 1], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  k, a = k + 1, a + 3
end
return {replaced, kept}
"""
# The response cache's bounded write: the entry, then its slot in the ring (the oldest entry goes).
_BOUNDED = """
local function put(key, value)
  if ARGV[2] == '' then redis.call('SET', key, value) else redis.call('SET', key, value, 'PX', ARGV[2]) end
end
put(KEYS[1], ARGV[1])
local n = redis.pcall('INCRBYFLOAT', KEYS[2], 1)
if type(n) == 'table' then redis.call('DEL', KEYS[2]); n = redis.call('INCRBYFLOAT', KEYS[2], 1) end
local seq = math.floor(tonumber(n))
local slot = ARGV[4] .. (seq % tonumber(ARGV[3]))
local previous = redis.pcall('GET', slot)
if type(previous) == 'string' and previous ~= KEYS[1] then redis.call('DEL', previous) end
put(slot, KEYS[1])
return 1
"""
# Delete KEYS[1] if it holds ARGV[1]; or, given ARGV[2] (the type this package keeps there), if it
# holds a value of another type (another program's: a second call that found it too must not delete
# the value the first one wrote since).
_RELEASE = """
if ARGV[2] then
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind ~= 'none' and kind ~= ARGV[2] then return redis.call('DEL', KEYS[1]) end
  return 0
end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class _Outage:
    """When the server last timed out; until ``retry_s`` after that, it is not asked. One per server
    (:func:`_outage_of`): the stores of a process that use it (the budgets', the response cache's with
    a URL of its own) wait for one timeout during a hang, not one each."""

    def __init__(self, server: str, retry_s: float) -> None:
        self.url = server  # said in errors and logs: its host and port, or its socket (no password)
        self.retry_s = retry_s
        self.until = 0.0

    def check(self) -> None:
        if time.monotonic() < self.until:
            raise StoreError(f"redis {self.url} did not answer; not asked again for up to {self.retry_s:g} s")

    def note(self, error: BaseException) -> None:
        import redis

        if isinstance(error, redis.TimeoutError):
            self.until = time.monotonic() + self.retry_s


_OUTAGES: weakref.WeakValueDictionary[tuple[Any, ...], _Outage] = weakref.WeakValueDictionary()
_OUTAGES_LOCK = threading.Lock()


def _outage_of(connection: Mapping[str, Any], retry_s: float) -> _Outage:
    """The :class:`_Outage` of the server ``connection`` reaches (its host and port, or its socket: any
    database on it), shared by the stores that use it."""
    path = connection.get("path")
    host = str(connection.get("host"))
    server = str(path) if path else f"{f'[{host}]' if ':' in host else host}:{connection.get('port')}"
    with _OUTAGES_LOCK:
        found = _OUTAGES.get((server, retry_s))
        if found is None:
            found = _OUTAGES[(server, retry_s)] = _Outage(server, retry_s)
        return found


_UNLISTED: set[tuple[str, str]] = set()  # (server, key): keys of another type read as lists, said (_listed)


def _guarded(method: F) -> F:
    """Fail fast while the server hangs (see :class:`_Outage`); note a timeout."""

    @functools.wraps(method)
    def run(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        self._outage.check()
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._outage.note(exc)
            raise

    return run  # type: ignore[return-value]


def _read_again(method: F) -> F:
    """A read whose connection broke (not one that timed out) is sent once more on another: unlike
    a write's, running it twice changes nothing."""

    @functools.wraps(method)
    def run(self: RedisStore, *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return method(self, *args, **kwargs)
        except redis.ConnectionError:
            return method(self, *args, **kwargs)

    return run  # type: ignore[return-value]


def _hiredis_packer() -> Callable[[tuple[Any, ...]], bytes] | None:
    try:
        from hiredis import pack_command
    except ImportError:  # the redis extra installs it; without it, commands are packed in Python
        return None
    return pack_command


_hiredis_pack = _hiredis_packer()


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in Redis's wire format (RESP): its arguments as bulk strings (str, bytes, int or
    float; a bool, None or another type is a ``TypeError`` naming the command, as redis-py's
    ``DataError`` was). hiredis packs it in C when installed (the ``redis`` extra installs it, 3.2 or
    later, which redis-py also parses replies with)."""
    if _hiredis_pack is not None:
        try:
            return _hiredis_pack(args)
        except TypeError:
            pass  # a type hiredis refuses: the Python packer raises, naming the command and the value
    return _pack_py(args)


def _pack_py(args: tuple[Any, ...]) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, int | float) and not isinstance(arg, bool):
            data = repr(arg).encode()
        else:
            raise TypeError(f"redis command {args[0]}: cannot send {type(arg).__name__} {arg!r}")
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


def _last(replies: list[Any]) -> Any:
    return replies[-1] if replies else None


def _answer(future: asyncio.Future[Any], replies: list[Any], read: Reader, sees_errors: bool = False) -> None:
    """Answer a call with ``read`` of its ``replies``, or the first error among them (or ``read``'s);
    ``sees_errors``: ``read`` is given the error replies too, and raises those that fail the call."""
    failed = None if sees_errors else next((r for r in replies if isinstance(r, Exception)), None)
    if failed is None:
        try:
            result = read(replies)
        except Exception as exc:  # noqa: BLE001 - the call's own error, not the batch's
            failed = exc
        else:
            future.set_result(result)
            return
    future.set_exception(failed)


class _Commands:
    """The commands of one flush, packed as they are queued (the subset of a redis-py pipeline's
    methods this module queues); ``scripts``: the source behind each EVALSHA, by position (a script
    Redis lacks is loaded, and the same packed command sent again)."""

    __slots__ = ("packed", "scripts")

    def __init__(self) -> None:
        self.packed: list[bytes] = []
        self.scripts: dict[int, str] = {}

    def add(self, *args: Any) -> None:
        self.packed.append(_pack(args))

    def truncate(self, count: int) -> None:
        """Drop the commands queued after the first ``count``."""
        del self.packed[count:]
        self.scripts = {i: source for i, source in self.scripts.items() if i < count}

    def get(self, key: str) -> None:
        self.add("GET", key)

    def mget(self, keys: Sequence[str]) -> None:
        self.add("MGET", *keys)

    def lrange(self, key: str, start: int, end: int) -> None:
        self.add("LRANGE", key, start, end)

    def evalsha(self, sha: str, source: str, keys: list[str], args: list[Any]) -> None:
        self.scripts[len(self.packed)] = source
        self.add("EVALSHA", sha, len(keys), *keys, *args)


class _Queued:
    """The commands the calls of one turn of the loop queued, packed as each call queued them (what
    they were made of need not outlive the call's ``submit``), and who waits on their replies: per
    call its future, how many commands it queued, and what reads its result from their replies."""

    __slots__ = ("commands", "futures", "marks", "readers", "sizes")

    def __init__(self) -> None:
        self.commands = _Commands()
        self.futures: list[asyncio.Future[Any]] = []
        self.sizes: list[int] = []
        self.readers: list[tuple[Reader, bool]] = []  # and whether it sees the error replies (_answer)
        self.marks: list[int] = []  # the calls whose commands are not sent once they stop waiting

    def withdraw_cancelled(self) -> None:
        """Leave out the commands of each marked call whose future was cancelled before the flush (its
        caller stopped waiting and gives back what it would have taken, as never taken)."""
        withdrawn = {i for i in self.marks if self.futures[i].cancelled()}
        if not withdrawn:
            return
        kept, start = _Commands(), 0
        for index, size in enumerate(self.sizes):
            if index in withdrawn:
                self.sizes[index] = 0
            else:
                for i in range(start, start + size):
                    if i in self.commands.scripts:
                        kept.scripts[len(kept.packed)] = self.commands.scripts[i]
                    kept.packed.append(self.commands.packed[i])
            start += size
        self.commands = kept


class _Batch:
    """Writes queued by the calls of one event loop, flushed together after the loop's current turn.
    Each call's commands are packed (here, not by redis-py) as it submits them, and a flush sends them
    on one connection of the asyncio client's pool:
    a thousand calls' commands cost one write and their replies, not a redis-py pipeline's command
    objects, per-argument encoding and SCRIPT EXISTS round trip."""

    def __init__(self, client: Any, scripts: Sequence[str], outage: _Outage) -> None:
        self.client = client
        self.shas = {source: hashlib.sha1(source.encode()).hexdigest() for source in scripts}  # noqa: S324 - Redis's script id
        self.outage = outage
        self.pending = _Queued()
        self.reads: dict[tuple[bool, str], tuple[_SharedRead, int]] = {}  # reads in flight (afetch)
        self.flushing: set[asyncio.Task[None]] = set()  # a task the loop only holds weakly is kept here

    def submit(self, queue: Callable[..., Any], *args: Any, read: Reader = _last, sees_errors: bool = False,
               withdrawable: bool = False) -> asyncio.Future[Any]:
        """``queue(pipeline, script, *args)`` adds one call's commands (``script`` queues a script of
        this module as EVALSHA), packed at once; the future gets ``read`` of their results (by default
        the last one; ``sees_errors``: error replies included, see :func:`_answer`). A command that
        cannot be packed fails its call only. ``withdrawable``: not sent
        if the future is cancelled before the flush (an admission whose call was stopped meanwhile:
        its release, made at once, must not be overtaken by holds that land after it)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pending = self.pending
        if not pending.futures:
            loop.call_soon(self._start_flush, loop)
        commands = pending.commands
        before = len(commands.packed)
        try:
            queue(commands, self.evalsha, *args)
        except Exception as exc:  # noqa: BLE001 - handed to its caller, through its future
            commands.truncate(before)
            future.set_exception(exc)
        pending.futures.append(future)
        pending.sizes.append(len(commands.packed) - before)
        pending.readers.append((read, sees_errors))
        if withdrawable:
            pending.marks.append(len(pending.futures) - 1)
        return future

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        task = loop.create_task(self._flush())
        self.flushing.add(task)
        task.add_done_callback(self.flushing.discard)

    async def aclose(self) -> None:
        """Send what is queued, wait for the flushes in flight, then close the asyncio client."""
        await asyncio.sleep(0)  # a flush scheduled this turn starts
        while self.flushing:
            await asyncio.gather(*self.flushing, return_exceptions=True)
        await self.client.aclose()

    async def _flush(self) -> None:
        queued, self.pending = self.pending, _Queued()
        if queued.marks:
            queued.withdraw_cancelled()
            if not queued.commands.packed:  # every call of the turn stopped waiting
                return
        try:
            self.outage.check()
            results = await self._send(queued.commands)
        except Exception as exc:  # noqa: BLE001 - every call of the batch learns of it
            self.outage.note(exc)
            for future in queued.futures:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for future, size, (read, sees_errors) in zip(queued.futures, queued.sizes, queued.readers, strict=True):
            mine, start = results[start:start + size], start + size
            if not future.done():
                _answer(future, mine, read, sees_errors)

    async def _send(self, commands: _Commands) -> list[Any]:
        """Each command's reply (an error reply as its exception). A script Redis does not have (a
        restarted or flushed server) did not run: it is loaded (SCRIPT LOAD, which Redis never evicts)
        and sent again, once. Only then does it run, after the flush's other commands: a read queued
        behind it in the same flush may see the value from before it."""
        results = await self._exchange(commands.packed, writes=bool(commands.scripts))
        lost = [i for i in commands.scripts if _no_script(results[i])]
        if lost:
            sources = list(dict.fromkeys(commands.scripts[i] for i in lost))
            again = _Commands()
            for source in sources:
                again.add("SCRIPT", "LOAD", source)
            again.packed += (commands.packed[i] for i in lost)
            for i, reply in zip(lost, (await self._exchange(again.packed, writes=True))[len(sources):], strict=True):
                results[i] = reply
        return results

    async def _exchange(self, packed: list[bytes], *, writes: bool) -> list[Any]:
        """Send ``packed`` on one connection and read a reply to each. A connection that breaks is
        replaced and the commands sent again (once) only if they all read and no reply came; never
        when one ``writes``: Redis may have run it before the connection broke (a budget charged
        twice). The replies read are kept, and the rest read as the error. A pooled connection that
        reads before anything was sent on it (the server closed it: it restarted) is replaced first
        (redis-py's pool does not when maintenance notifications are on, its default)."""
        import redis

        pool = self.client.connection_pool
        for retry in ((False,) if writes else (True, False)):
            connection = await pool.get_connection()
            replies: list[Any] = []
            try:
                if await connection.can_read():  # its end of stream (or a stray push), seen by the event loop
                    await connection.disconnect()
                    await connection.connect()
                await connection.send_packed_command(packed, check_health=False)
                await _read_all(connection, len(packed), replies)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                await connection.disconnect()
                if not replies:
                    if retry and not isinstance(error, redis.TimeoutError):
                        continue
                    raise
                self.outage.note(error)
                return replies + [error] * (len(packed) - len(replies))
            except BaseException:
                await connection.disconnect()  # replies left unread: the connection is out of step
                raise
            finally:
                await pool.release(connection)
            return replies
        raise AssertionError("unreachable")

    def evalsha(self, commands: _Commands, source: str, keys: list[str], args: list[Any]) -> None:
        """Queue a script by its SHA (sent with its source only if Redis lacks it)."""
        commands.evalsha(self.shas[source], source, keys, args)


async def _read_all(connection: Any, count: int, replies: list[Any]) -> None:
    """Append ``count`` replies read on ``connection`` to ``replies`` (an error reply as its exception).
    redis-py would arm and cancel a timer for each reply (its ``socket_timeout``), a thousand for a
    busy turn's batch; here one watch looks every ``socket_timeout`` and ends the read (redis-py's
    ``TimeoutError``) only if no reply came since its last look. A batch read on a busy event loop,
    whose replies come in several chunks each waiting a turn of the loop, is not cut short: only a
    server that stops answering is."""
    import redis

    limit = connection.socket_timeout
    task = asyncio.current_task()
    if not limit or task is None:
        await _read_replies(connection, count, replies)
        return
    loop = asyncio.get_running_loop()
    stalled, handle = False, None

    def watch(seen: int) -> None:
        nonlocal handle, stalled
        if len(replies) > seen:  # a reply came since the last look: look again later
            handle = loop.call_later(limit, watch, len(replies))
        else:
            stalled = True
            task.cancel()

    handle = loop.call_later(limit, watch, len(replies))
    try:
        await _read_replies(connection, count, replies)
    except asyncio.CancelledError:
        if stalled and task.uncancel() == 0:  # the watch's cancellation, no one else's
            raise redis.TimeoutError(f"no reply from Redis for {limit} s") from None
        raise
    finally:
        handle.cancel()  # the last one armed


async def _read_replies(connection: Any, count: int, replies: list[Any]) -> None:
    import redis

    for _ in range(count):
        try:
            replies.append(await connection.read_response(timeout=math.inf))
        except redis.ResponseError as error:
            replies.append(error)


class _SharedRead:
    """A read in flight that calls of one loop share (``sent``: its future; ``keys``: what it reads,
    in ``reads``, the table of reads in flight, which it leaves once answered). Each call waits on a
    future of its own, fed the answer by one callback: a call cancelled meanwhile cancels only its
    wait (``asyncio.shield`` would do the same with a future, two callbacks and their contexts per
    waiting call)."""

    __slots__ = ("keys", "reads", "sent", "waiters")

    def __init__(self, sent: asyncio.Future[Any], keys: list[tuple[bool, str]],
                 reads: dict[tuple[bool, str], tuple[_SharedRead, int]]) -> None:
        self.sent = sent
        self.keys = keys
        self.reads = reads
        self.waiters: list[asyncio.Future[Any]] = []
        sent.add_done_callback(self._answered)

    def wait(self) -> asyncio.Future[Any]:
        """What a call awaits for the read's results (the read itself once it is answered)."""
        if self.sent.done():
            return self.sent
        mine: asyncio.Future[Any] = self.sent.get_loop().create_future()
        self.waiters.append(mine)
        return mine

    def _answered(self, sent: asyncio.Future[Any]) -> None:
        """Later calls read the keys again; every call still waiting gets the answer. The error is
        marked as seen: the calls waiting on it may all have been cancelled."""
        for read in self.keys:
            if self.reads.get(read, (None, 0))[0] is self:
                del self.reads[read]
        error = None if sent.cancelled() else sent.exception()
        for waiter in self.waiters:
            if waiter.done():
                continue
            if sent.cancelled():
                waiter.cancel()
            elif error is not None:
                waiter.set_exception(error)
            else:
                waiter.set_result(sent.result())
        self.waiters.clear()


def _no_script(reply: Any) -> bool:
    from redis.exceptions import NoScriptError

    return isinstance(reply, NoScriptError)


def _script(pipe: Any, script: Script, source: str, keys: list[str], args: list[Any]) -> None:
    script(pipe, source, keys, args)


def _eval(pipe: Any, source: str, keys: list[str], args: list[Any]) -> None:
    """Queue a script with its source (a blocking call's pipeline: no SCRIPT EXISTS round trip)."""
    pipe.eval(source, len(keys), *keys, *args)


def _client_options(timeout_s: float, retry: Any) -> dict[str, Any]:
    """Time out after ``timeout_s``; redis-py never sends a command again: a connection that broke
    after the command was sent may have broken after Redis ran it (a budget charged twice; a read is
    sent again by :func:`_read_again`). A pooled connection the server closed (it restarted) is
    replaced when taken from the pool, before anything is sent on it: redis-py's pool checks it
    (``can_read``: a closed socket reads as EOF) without a round trip."""
    from redis.backoff import NoBackoff

    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s,
            "retry": retry(NoBackoff(), 0)}


_MAX_MS = 2 ** 62  # the longest ttl Redis takes: its expiry (now + ttl, in ms) must fit in 64 bits


def _px(ttl_s: float) -> int:
    """``ttl_s`` in ms for Redis: at least 1, and a longer ttl than Redis takes (``inf`` too) is the
    longest it takes, about 146 million years (Redis refuses it, and every write with it)."""
    return max(1, int(min(ttl_s * 1000, _MAX_MS)))


def _ms(ttl_s: float | None) -> str:
    return str(_px(ttl_s)) if ttl_s else ""


def _member(hold: str, amount: float) -> str:
    return f"{hold}|{float(amount)!r}"


def _refusal(answer: Any, checked: Sequence[str], prefix: str) -> Refusal | None:
    """The admission script's answer; its checks' keys, ``checked``, name an unreadable one."""
    index, total, *what = answer
    if int(index) >= 0:
        return None if int(index) == 0 else (int(index) - 1, float(total))
    key = checked[-int(index) - 1] + ("#held" if what == [b"held"] else "")
    raise UnreadableCounter(key, bytes(total) if what == [b"value"] else None, prefix + key)


def _written(cached: int, replies: list[Any], prefix: str = "") -> None:
    """``add_many``'s replies: ``cached`` response-cache writes, then its settlement script. Raises the
    error where all failed, else :class:`.PartialWrite` saying which part landed."""
    settled = replies[cached] if len(replies) > cached else None
    if isinstance(settled, list) and len(settled) == 2:  # the counters the settlement replaced, and kept
        for said, keys in zip((replaced, kept), settled, strict=True):
            for key in keys:
                name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
                said(name.removeprefix(prefix), None)
    failed = [r for r in replies if isinstance(r, Exception)]
    if not failed:
        return
    if len(failed) == len(replies):
        raise failed[0]
    raise partial_write(failed[0], cache_written=not any(isinstance(r, Exception) for r in replies[:cached]),
                        settled=not any(isinstance(r, Exception) for r in replies[cached:])) from failed[0]




# add_many's writes other than its bounded ones: entries, samples, releases, averages, puts; the kept keys
_Settle = tuple[Sequence[Addition], Sequence[Sample], Sequence[Release], Sequence[Average], Sequence[Put],
                Collection[str]]


def _settles(entries: Sequence[Addition], samples: Sequence[Sample], releases: Sequence[Release],
             averages: Sequence[Average], puts: Sequence[Put], closed: Collection[str]) -> _Settle | None:
    """What ``add_many`` writes in its one settlement script, or ``None`` where it writes nothing there."""
    writes = (entries, samples, releases, averages, puts)
    return (*writes, closed) if any(writes) else None


def _resolved(value: Any) -> asyncio.Future[Any]:
    """An answer that needs no round trip, as a future (what the batched methods return)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


class RedisStore:
    """Sync methods on a blocking client. ``afetch``, ``aadd_within``, ``aadd_many``, ``aget`` and
    ``aput_bounded`` (what a call's reads, admission, settlement and response cache send on the async
    path) are batched per event loop: the commands of every call that reached that point in the same turn of the loop go
    out as one pipeline on one asyncio client (each script stays atomic), so a thousand concurrent
    calls share a few round trips."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, timeout_s: float = 0.5,
                 prefix: str = "rm:") -> None:
        import redis

        # Threads beyond the pool's connections wait for one (up to timeout_s) rather than fail at once.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=100, timeout=timeout_s,
                                                     **_client_options(timeout_s, redis.retry.Retry))
        try:  # a parameter the connection does not take fails only at the first command otherwise
            pool.connection_class(**pool.connection_kwargs)  # no socket is opened
        except TypeError as exc:
            raise ValueError(f"redis-py's connection takes no such parameter ({exc})") from None
        self.client: Any = redis.Redis(connection_pool=pool)
        self.url = url
        self.prefix = prefix
        self._timeout = timeout_s
        self._outage = _outage_of(pool.connection_kwargs, timeout_s)
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Batch] = weakref.WeakKeyDictionary()
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], weakref.ref[_Batch]] | None = None  # see _batch
        self._incr = self.client.register_script(_INCR)
        self._cas = self.client.register_script(_CAS)
        self._release = self.client.register_script(_RELEASE)
        self._within = self.client.register_script(_WITHIN)
        self._bounded = self.client.register_script(_BOUNDED)
        self._append = self.client.register_script(_APPEND)

    def _k(self, key: str) -> str:
        return self.prefix + key

    @_guarded
    @_read_again
    def get(self, key: str) -> bytes | None:
        value = self.client.get(self._k(key))
        return bytes(value) if value is not None else None

    @_guarded
    def set(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        self.client.set(self._k(key), value, px=_px(ttl_s) if ttl_s else None)

    @_guarded
    def delete(self, key: str) -> None:
        self.client.delete(self._k(key))

    @_guarded
    def delete_if(self, key: str, value: bytes | None) -> bool:
        if value is None:  # a value of another type: a hold set is a sorted set, the rest are strings
            return bool(self._release(keys=[self._k(key)], args=["", "zset" if key.endswith("#held") else "string"]))
        return bool(self._release(keys=[self._k(key)], args=[value]))

    @_guarded
    def incr(self, key: str, amount: float = 1.0, ttl_s: float | None = None) -> float:
        return float(self._incr(keys=[self._k(key)], args=[repr(float(amount)), _ms(ttl_s)]))

    def _held(self, key: str) -> str:
        """The sorted set of ``key``'s holds."""
        return self._k(f"{key}#held")

    def _within_call(self, entries: Sequence[Within], holds: Sequence[Hold], owned: Sequence[Owned],
                     left: Sequence[Countdown]) -> tuple[list[str], list[Any]] | None:
        """The admission script's keys and arguments, or ``None`` where there is nothing to add."""
        if not (entries or holds or owned or left):
            return None
        keys = [*(self._k(e[0]) for e in entries), *(self._k(o[0]) for o in owned)]
        args: list[Any] = [str(len(entries)), str(len(owned))]
        for _, amount, limit, ttl_s in entries:
            args += [repr(float(amount)), repr(float(limit)), _ms(ttl_s)]
        for _, owner, ttl_s in owned:
            args += [owner, _ms(ttl_s)]
        for key, amount, limit, ttl_s, hold, hold_s in holds:
            keys += [self._k(key), self._held(key)]
            args += [repr(float(amount)), repr(float(limit)), _ms(ttl_s), _member(hold, amount), _ms(hold_s)]
        keys += [self._k(key) for key, _ in left]
        args += [*(repr(float(amount)) for _, amount in left), str(len(left))]
        return keys, args

    @_guarded
    def add_within(self, entries: Sequence[Within], holds: Sequence[Hold] = (),
                   owned: Sequence[Owned] = (), left: Sequence[Countdown] = ()) -> Refusal | None:
        call = self._within_call(entries, holds, owned, left)
        if call is None:
            return None
        return _refusal(self._within(keys=call[0], args=call[1]), within_keys(entries, holds, owned, left), self.prefix)

    def aadd_within(self, entries: Sequence[Within], holds: Sequence[Hold] = (),
                    owned: Sequence[Owned] = (), left: Sequence[Countdown] = ()) -> Awaitable[Refusal | None]:
        """:meth:`add_within`, batched: a future, not a coroutine (a call waiting on it holds neither
        a coroutine nor what it adds: they are packed at once)."""
        call = self._within_call(entries, holds, owned, left)
        if call is None:
            return _resolved(None)
        checked, prefix = within_keys(entries, holds, owned, left), self.prefix
        return self._batch().submit(_script, _WITHIN, *call, withdrawable=True,
                                    read=lambda replies: _refusal(replies[-1], checked, prefix))

    async def aget(self, key: str) -> bytes | None:
        value = await self._batch().submit(self._queue_get, key)
        return bytes(value) if value is not None else None

    async def aput_bounded(self, key: str, value: bytes, ttl_s: float | None, ring: str, capacity: int) -> None:
        await self._batch().submit(_script, _BOUNDED, *self._bounded_call((key, value, ttl_s, ring, capacity)))

    @_guarded
    def put_bounded(self, key: str, value: bytes, ttl_s: float | None, ring: str, capacity: int) -> None:
        keys, args = self._bounded_call((key, value, ttl_s, ring, capacity))
        self._bounded(keys=keys, args=args)

    def _bounded_call(self, put: Bounded) -> tuple[list[str], list[Any]]:
        key, value, ttl_s, ring, capacity = put
        return [self._k(key), self._k(f"{ring}:seq")], [value, _ms(ttl_s), str(capacity), self._k(f"{ring}:slot:")]

    def _listed(self, key: str, reply: Any) -> list[Any]:
        """An LRANGE's reply for ``key``: a key of another type (someone SET it; its next append
        replaces it, see _PUSH) reads as empty, said once per key, not as a failed read of every key
        fetched with it (once in the process, by every pipeline on that server); any other error reply
        is raised."""
        import redis

        if isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE"):
            said = (self._outage.url, self._k(key))
            if said not in _UNLISTED:
                if len(_UNLISTED) >= 10_000:
                    _UNLISTED.clear()
                _UNLISTED.add(said)
                log.warning("store_value_unreadable", key=key, error_type="WRONGTYPE",
                            error="a key of another type where a list of recent values belongs: read as empty")
            return []
        if isinstance(reply, Exception):
            raise reply
        return list(reply)

    def _lrange(self, key: str) -> list[Any]:
        import redis

        try:
            return list(self.client.lrange(self._k(key), 0, -1))
        except redis.ResponseError as error:
            return self._listed(key, error)

    @_guarded
    @_read_again
    def samples(self, key: str) -> list[float]:
        return numbers(self._lrange(key))

    @_guarded
    def append(self, key: str, value: bytes, keep: int, ttl_s: float | None = None) -> None:
        self._append(keys=[self._k(key)], args=[value, str(-int(keep)), _ms(ttl_s)])

    @_guarded
    @_read_again
    def appended(self, key: str) -> list[bytes]:
        return [bytes(v) for v in self._lrange(key)]

    @_guarded
    @_read_again
    def fetch(self, keys: Sequence[str], lists: Sequence[str] = ()) -> Fetched:
        if not keys and not lists:
            return [], []
        pipe = self._queue_fetch(self.client.pipeline(transaction=False), _eval, keys, lists)
        return self._fetched(pipe.execute(raise_on_error=False), bool(keys), lists)

    async def afetch(self, keys: Sequence[str], lists: Sequence[str] = ()) -> Fetched:
        """:meth:`fetch`, batched; a key another call of the loop is already reading is not read again
        (a thousand calls that find the same value missing at once send one read of it)."""
        batch = self._batch()
        reads = [*((True, k) for k in keys), *((False, k) for k in lists)]
        found = {r: batch.reads[r] for r in reads if r in batch.reads}
        new = [r for r in reads if r not in found]
        if new:
            values, series = [k for one, k in new if one], [k for one, k in new if not one]
            decode = functools.partial(self._fetched, values=bool(values), lists=series)  # once per read, not per call
            shared = _SharedRead(batch.submit(self._queue_fetch, values, series, read=decode, sees_errors=True),
                                 new, batch.reads)
            for at, (one, key) in enumerate(new):  # the values come first in ``new``, then the lists
                found[(one, key)] = batch.reads[(one, key)] = (shared, at if one else at - len(values))
        answers = []
        for read in reads:
            shared, at = found[read]
            fetched = await shared.wait()  # shared with other calls: one cancelled fails only itself
            answers.append(fetched[0][at] if read[0] else fetched[1][at])
        return answers[:len(keys)], answers[len(keys):]

    def _queue_fetch(self, pipe: Any, script: Script, keys: Sequence[str], lists: Sequence[str]) -> Any:
        """One MGET for ``keys``, one LRANGE per key of ``lists``."""
        if keys:
            pipe.mget([self._k(k) for k in keys])
        for key in lists:
            pipe.lrange(self._k(key), 0, -1)
        return pipe

    def _fetched(self, results: list[Any], values: bool, lists: Sequence[str]) -> Fetched:
        """A fetch's replies (the MGET's, if it read ``values``, then one per list of ``lists``), error
        replies included, as its answer: a list's WRONGTYPE reads as empty (:meth:`_listed`), any
        other error fails the fetch."""
        if values and isinstance(results[0], Exception):
            raise results[0]
        found = [bytes(v) if v is not None else None for v in results[0]] if values else []
        replies = results[1 if values else 0:]
        return found, [numbers(self._listed(key, reply)) for key, reply in zip(lists, replies, strict=True)]

    @_guarded
    def add_many(self, entries: Sequence[Addition], samples: Sequence[Sample] = (),
                 releases: Sequence[Release] = (), bounded: Sequence[Bounded] = (),
                 averages: Sequence[Average] = (), puts: Sequence[Put] = (), closed: Collection[str] = ()) -> None:
        settle = _settles(entries, samples, releases, averages, puts, closed)
        if bounded or settle is not None:
            pipe = self._queue(self.client.pipeline(transaction=False), _eval, bounded, settle)
            _written(len(bounded), pipe.execute(raise_on_error=False), self.prefix)

    def aadd_many(self, entries: Sequence[Addition], samples: Sequence[Sample] = (),
                  releases: Sequence[Release] = (), bounded: Sequence[Bounded] = (),
                  averages: Sequence[Average] = (), puts: Sequence[Put] = (),
                  closed: Collection[str] = ()) -> Awaitable[None]:
        """:meth:`add_many`, batched (a future, as :meth:`aadd_within`)."""
        settle = _settles(entries, samples, releases, averages, puts, closed)
        if bounded or settle is not None:
            return self._batch().submit(self._queue, bounded, settle,
                                        read=functools.partial(_written, len(bounded), prefix=self.prefix),
                                        sees_errors=True)
        return _resolved(None)

    def _queue_get(self, pipe: Any, script: Script, key: str) -> None:
        pipe.get(self._k(key))

    def _queue(self, pipe: Any, script: Script, bounded: Sequence[Bounded], settle: _Settle | None) -> Any:
        """Each bounded write, then the rest (:func:`_settles`) as one script (one command to send and parse)."""
        for bound in bounded:
            script(pipe, _BOUNDED, *self._bounded_call(bound))
        if settle is not None:
            script(pipe, _SETTLE, *self._settle_call(*settle))
        return pipe

    def _settle_call(self, entries: Sequence[Addition], samples: Sequence[Sample], releases: Sequence[Release],
                     averages: Sequence[Average], puts: Sequence[Put],
                     closed: Collection[str]) -> tuple[list[str], list[Any]]:
        keys = [*(self._k(e[0]) for e in entries), *(self._k(s[0]) for s in samples)]
        args: list[Any] = [str(len(entries)), str(len(samples)), str(len(releases)), str(len(averages)),
                           str(len(puts))]
        for _, amount, ttl_s in entries:
            args += [repr(float(amount)), _ms(ttl_s)]
        for _, value, keep, ttl_s in samples:
            args += [repr(float(value)), str(-int(keep)), _ms(ttl_s)]
        for key, hold, held, actual, ttl_s in releases:
            keys += [self._k(key), self._held(key)]
            args += [_member(hold, held), repr(float(actual) - float(held)), repr(float(actual)), _ms(ttl_s)]
        for key, sample, weight, ttl_s in averages:
            keys.append(self._k(key))
            args += [repr(float(sample)), repr(float(weight)), _ms(ttl_s)]
        for key, raw, ttl_s in puts:
            keys.append(self._k(key))
            args += [raw, _ms(ttl_s)]
        kept = [self._k(key) for key in closed]
        return [*keys, *kept], [*args, str(len(kept))]

    def _batch(self) -> _Batch:
        """This event loop's batch: an asyncio client, and the writes of every call that reached its
        admission or settlement in the same turn of the loop, sent as one pipeline."""
        loop = asyncio.get_running_loop()
        last = self._last  # the last loop's batch, found without the weak dict's lookup; kept there, not here
        if last is not None and last[0]() is loop:
            found = last[1]()
            if found is not None:
                return found
        found = self._async.get(loop)
        if found is None:
            from redis.asyncio import Redis
            from redis.asyncio.retry import Retry

            client = Redis.from_url(self.url, **_client_options(self._timeout, Retry))
            found = self._async[loop] = _Batch(client, (_WITHIN, _BOUNDED, _SETTLE), self._outage)
        self._last = (weakref.ref(loop), weakref.ref(found))
        return found

    @_guarded
    def compare_and_set(self, key: str, expected: bytes | None, value: bytes, ttl_s: float | None = None) -> bool:
        flag = "" if expected is None else "1"
        return bool(self._cas(keys=[self._k(key)], args=[flag, expected or b"", value, _ms(ttl_s)]))

    @contextmanager
    def lock(self, name: str, ttl_s: float = 10.0, timeout_s: float = 5.0) -> Iterator[None]:
        token = uuid.uuid4().hex
        key = self._k(f"lock:{name}")
        acquire(lambda: bool(self.client.set(key, token, nx=True, px=_px(ttl_s))), name, timeout_s)
        try:
            yield
        finally:
            self._release(keys=[key], args=[token])

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()  # a pool given to the client is not closed with it

    async def aclose(self) -> None:
        """:meth:`close`, after the running loop's batched commands are sent and its asyncio client
        closed (a loop that ends without this leaves the client's connections unclosed)."""
        batch = self._async.pop(asyncio.get_running_loop(), None)
        self._last = None
        if batch is not None:
            await batch.aclose()
        self.close()
