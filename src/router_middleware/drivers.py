"""Thin drivers of a call's lifecycle (:mod:`.lifecycle`): they do the I/O it asks for, sync or async.

``send`` performs an :class:`~.lifecycle.Attempt` (call the provider, or an agent framework's model
handler) and returns its answer; a summary goes to litellm; a wait sleeps; a store call runs on the
store (the async driver awaits its async twin where the store has one). Whatever ``send`` raises
is thrown into the lifecycle, which answers with the next effect or raises it to the caller.
:func:`step`/:func:`astep` run the effects between two attempts, for an adapter whose attempts are
made by someone else (the LiteLLM proxy: its hooks and events drive the lifecycle).

With a store that can block (Redis, SQLite: ``off_loop=True``) the lifecycle's steps still run on
the event loop: what they read was fetched by a store call (see :class:`~.stores.Prefetch`), and
the bookkeeper's lesser writes made during a step (counts toward a cooldown, a reservation or a
probe given back) are queued and then made in a worker thread (:func:`store_threads`), as is each
store call without an async twin: the event loop never waits on the store.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import wire
from .lifecycle import Attempt, Effect, Flow, StoreCall, Summarize, Wait
from .stores.base import deferring

T = TypeVar("T")

_sleep = time.sleep  # module names, so a test can record the waits
_asleep = asyncio.sleep
PATIENCE_S = 2.0  # how long a stopped call waits for a store's answer on its way (a store times out first)
STORE_THREADS = 8  # threads of store_threads(): store round trips are short, and most wait on the network


def drive(flow: Flow, send: Callable[[Attempt], Any]) -> Any:
    done, value = step(flow, None, None)
    while not done:
        try:
            reply, error = send(value), None
        except Exception as exc:  # noqa: BLE001 - handed to the lifecycle, which decides
            reply, error = None, exc
        except BaseException as exc:  # interrupted: the lifecycle ends the call, then it goes on up
            _stop(flow, exc)
            raise
        done, value = step(flow, reply, error)
    return value


async def adrive(flow: Flow, send: Callable[[Attempt], Awaitable[Any]], *, off_loop: bool = False) -> Any:
    done, value = await astep(flow, None, None, off_loop=off_loop)
    while not done:
        try:
            reply, error = await send(value), None
        except Exception as exc:  # noqa: BLE001
            reply, error = None, exc
        except BaseException as exc:  # cancelled: the lifecycle ends the call, then it goes on up
            await _astop(flow, exc, off_loop)
            raise
        done, value = await astep(flow, reply, error, off_loop=off_loop)
    return value


def _stop(flow: Flow, error: BaseException) -> None:
    """Throw ``error`` (a cancellation, an interrupt) into ``flow`` where it waits: the lifecycle
    records the call and gives back what it holds, then raises it (the caller raises it on)."""
    try:
        flow.throw(error)
    except BaseException:  # noqa: BLE001, S110 - ``error`` again (or a write's): the caller raises ``error``
        pass
    flow.close()


async def _astop(flow: Flow, error: BaseException, off_loop: bool) -> None:
    """:func:`_stop` on the loop; with ``off_loop`` the writes it queued are made in a worker thread."""
    if not off_loop:
        _stop(flow, error)
        return
    _, queued = queued_writes(_stop, flow, error)
    if queued:
        await _in_thread(write_all, queued)


def queued_writes(work: Callable[..., T], *args: Any) -> tuple[T, list[Callable[[], None]]]:
    """``work(*args)`` on the loop, and the store writes it queued (the bookkeeper's: see
    :func:`~.stores.base.defer`), for the caller to make off the loop (:func:`write_all`)."""
    with deferring() as queued:
        result = work(*args)
    return result, queued


def step(flow: Flow, reply: Any, error: Exception | None, *, wait: bool = True) -> tuple[bool, Any]:
    """Hand ``flow`` what came of its last effect and do every effect up to the next attempt:
    ``(False, Attempt)``, or ``(True, result)``. ``wait=False``: a caller that backs off on its own
    (litellm's router, behind the proxy) skips the waits."""
    done, value = _advance(flow, reply, error)
    while not done and not isinstance(value, Attempt):
        try:
            reply, error = _perform(value, wait), None
        except Exception as exc:  # noqa: BLE001
            reply, error = None, exc
        except BaseException as exc:
            _stop(flow, exc)
            raise
        done, value = _advance(flow, reply, error)
    return done, value


async def astep(flow: Flow, reply: Any, error: Exception | None, *, wait: bool = True,
                off_loop: bool = False) -> tuple[bool, Any]:
    """:func:`step` with async I/O; ``off_loop``: the store blocks (its writes go to a worker thread)."""
    done, value = await _aadvance(flow, reply, error, off_loop)
    while not done and not isinstance(value, Attempt):
        try:
            io, value = _aeffect(value, wait, off_loop), None  # the effect need not live while its I/O runs
            reply, error = await io, None
        except Exception as exc:  # noqa: BLE001
            reply, error = None, exc
        except BaseException as exc:  # cancelled during a store call or a wait
            await _astop(flow, exc, off_loop)
            raise
        done, value = await _aadvance(flow, reply, error, off_loop)
    return done, value


def _advance(flow: Flow, reply: Any, error: Exception | None) -> tuple[bool, Any]:
    """Hand the lifecycle what came of its last effect: ``(False, next effect)`` or ``(True, result)``."""
    try:
        return False, (flow.throw(error) if error is not None else flow.send(reply))
    except StopIteration as stop:
        return True, stop.value


async def _aadvance(flow: Flow, reply: Any, error: Exception | None, off_loop: bool) -> tuple[bool, Any]:
    """:func:`_advance` on the loop; with ``off_loop``, the writes the step queued are then made in a
    worker thread, before its next effect (the order of a sync call), also when the step raised (the
    call failed for good: its hold given back, its failure counted)."""
    if not off_loop:
        return _advance(flow, reply, error)
    queued: list[Callable[[], None]] = []
    try:
        with deferring() as queued:
            return _advance(flow, reply, error)
    finally:
        if queued:
            await _in_thread(write_all, queued)


def write_all(writes: list[Callable[[], None]]) -> None:
    for write in writes:
        write()


def _in_thread(work: Callable[..., Any], *args: Any) -> Awaitable[Any]:
    """``work(*args)`` in a thread of :func:`store_threads` (with the caller's context, as
    ``asyncio.to_thread``), :func:`_patient`: the lifecycle's state is never touched from two threads
    at once."""
    run = functools.partial(contextvars.copy_context().run, work, *args)
    return _patient(asyncio.get_running_loop().run_in_executor(store_threads(), run))


_threads: ThreadPoolExecutor | None = None


def store_threads() -> ThreadPoolExecutor:
    """The threads the async drivers make a blocking store's I/O in: a pool of their own, not the event
    loop's default executor, whose queue litellm fills with one job per ``acompletion``. A failure's
    count toward a cooldown waited there: under load, the breaker opened half a second or more late."""
    global _threads
    if _threads is None:
        _threads = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="router-middleware-store")
    return _threads


def _forget_threads() -> None:
    """In a forked child: the parent's pool has no threads here; the first store call makes a new one."""
    global _threads
    _threads = None


os.register_at_fork(after_in_child=_forget_threads)


async def _patient(io: Awaitable[T], limit: float | None = None) -> T:
    """What ``io`` gives; a caller cancelled meanwhile waits for ``io`` to end (at most ``limit``
    seconds), then raises."""
    running = asyncio.ensure_future(io)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        await asyncio.wait({running}, timeout=limit)
        raise


def _perform(effect: Effect, wait: bool) -> Any:
    if isinstance(effect, Wait):
        if wait:
            _sleep(effect.seconds)
        return None
    if isinstance(effect, StoreCall):
        return getattr(effect.store, effect.method)(*effect.args)
    assert isinstance(effect, Summarize)
    return wire.litellm().completion(**effect.request)


def _aeffect(effect: Effect, wait: bool, off_loop: bool) -> Awaitable[Any]:
    """What to await for ``effect``: the I/O's own awaitable, not a coroutine wrapping it (a call
    waiting on Redis holds one object fewer while a thousand others run)."""
    if isinstance(effect, Wait):
        return _asleep(effect.seconds) if wait else _done(None)
    if isinstance(effect, StoreCall):
        return astore(effect, off_loop)
    assert isinstance(effect, Summarize)
    return wire.litellm().acompletion(**effect.request)  # type: ignore[no-any-return]


def astore(call: StoreCall, off_loop: bool) -> Awaitable[Any]:
    """What to await for a store call: the store's async twin where it has one (Redis's batch), else
    the method in a worker thread (``off_loop``: the store can block) or in place."""
    twin = getattr(call.store, "a" + call.method, None)
    if twin is not None:
        io: Awaitable[Any] = twin(*call.args)
        return _patient(io, PATIENCE_S) if call.patient else io
    method = getattr(call.store, call.method)
    return _in_thread(method, *call.args) if off_loop else _done(method(*call.args))


async def _done(value: Any) -> Any:
    return value
