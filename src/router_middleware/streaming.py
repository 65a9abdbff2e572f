"""A stream that behaves like litellm's and records its Outcome when consumed, closed or abandoned."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from . import wire
from .errors import StreamLeft
from .exits import end_at_exit
from .types import Outcome

_CLOSED = "the caller closed the stream before it ended"  # close() and aclose()'s StreamLeft

# finish(chunks, started_at, first_chunk_at, error, early) -> Outcome | None; ``error`` None: the caller
# had the whole answer, read to the stream's end, or (``early``) left once the answer had ended, the
# stream's last chunks (a usage chunk, its end) unread
Finisher = Callable[[list[Any], float, float | None, BaseException | None, bool], Outcome | None]


class TrackedStream:
    """Iterate it (sync or async) exactly like the litellm stream it wraps.

    Once the last chunk has been read, ``outcome`` holds the call's :class:`Outcome` (usage from the
    final usage chunk when the provider sent one). Closing it early, or dropping it, ends the call
    with what was received, cut short by :class:`.StreamLeft`. ``off_loop``: iterated async, the
    stream ends (its settlement and cache write, which go to the store) in a worker thread, also when
    it is dropped on a running loop.
    ``hide_usage``: the final usage chunk (no choices) was asked for by the pipeline, not the caller:
    it is read, not yielded. A caller that leaves once it has read a finish reason for each of the
    ``answers`` asked for (``n``) had the whole answer: its call is complete, at an estimate of its
    usage when the provider's usage chunk was not read.
    """

    def __init__(self, inner: Any, finish: Finisher, started_at: float, *, off_loop: bool = False,
                 hide_usage: bool = False, answers: int = 1) -> None:
        self._inner = inner
        self._finish = finish
        self._started_at = started_at
        self._off_loop = off_loop
        self._hide_usage = hide_usage
        self._first_chunk_at: float | None = None
        self._chunks: list[Any] = []
        self._answers = answers
        self._finished: set[int] = set()  # the choices whose finish reason came
        self._read_out = False  # read to the stream's end (else left, or cut short)
        self._done = False
        self.outcome: Outcome | None = None
        end_at_exit(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _record(self, chunk: Any) -> Any:
        if self._first_chunk_at is None:
            self._first_chunk_at = time.perf_counter()
        self._chunks.append(chunk)
        for choice in getattr(chunk, "choices", None) or ():
            if getattr(choice, "finish_reason", None):
                self._finished.add(getattr(choice, "index", 0) or 0)
        return chunk

    def _left(self, why: str) -> StreamLeft | None:
        """What ends a stream its caller leaves: nothing once it read the answer's end, else :class:`.StreamLeft`."""
        return None if len(self._finished) >= self._answers else StreamLeft(why)

    def _end(self, error: BaseException | None) -> None:
        """End the call once: ``error`` None, read to its end (or to the answer's end, then left); else cut
        short by it."""
        if self._claim():
            self._settle(error)

    def _claim(self) -> bool:
        """Whether this is the stream's one ending (the first to ask)."""
        if self._done:
            return False
        self._done = True
        return True

    def _settle(self, error: BaseException | None) -> None:
        if not self._chunks and isinstance(self._inner, Prefetched):  # closed unread: the provider answered
            self._chunks.extend(self._inner.unread)
        self.outcome = self._finish(self._chunks, self._started_at, self._first_chunk_at, error, not self._read_out)

    def __iter__(self) -> Iterator[Any]:
        return self

    def _hidden(self, chunk: Any) -> bool:
        return self._hide_usage and not getattr(chunk, "choices", None)

    def _next(self) -> Any:
        """The sync stream's next chunk; its end once litellm's closing usage chunk (no choices) was
        read (:func:`.wire.stream_spent`: nothing follows it, and litellm would assemble the answer
        again). A chunk with choices, most of them, is looked at no further."""
        inner = self._inner
        if self._chunks and not getattr(self._chunks[-1], "choices", None) \
                and not (isinstance(inner, Prefetched) and inner.unread) and wire.stream_spent(inner):
            inner.close()
            raise StopIteration
        return next(inner)

    def __next__(self) -> Any:
        try:
            chunk = self._record(self._next())
            while self._hidden(chunk):
                chunk = self._record(self._next())
            return chunk
        except StopIteration:
            self._read_out = True
            self._end(None)
            raise
        except BaseException as exc:  # a provider's error, or the reader stopped from outside (Ctrl-C)
            self._end(exc)
            raise

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        try:
            chunk = self._record(await self._inner.__anext__())
            while self._hidden(chunk):
                chunk = self._record(await self._inner.__anext__())
            return chunk
        except StopAsyncIteration:
            self._read_out = True
            await self._aend(None)
            raise
        except Exception as exc:
            await self._aend(exc)
            raise
        except BaseException as exc:  # the reading task cancelled mid-answer: cut short by that, settled now
            self._end_now(exc)
            raise

    async def _aend(self, error: BaseException | None) -> None:
        if not self._off_loop:
            self._end(error)
        elif self._claim():  # the reader cancelled while it waits for a worker: it still ends as it ended
            await asyncio.shield(asyncio.to_thread(self._settle, error))

    def close(self) -> None:
        """Stop reading: the call ends with what was received, cut short by :class:`.StreamLeft` unless the
        answer had ended."""
        self._end(self._left(_CLOSED))
        closer = getattr(self._inner, "close", None)
        if callable(closer):
            closer()

    async def aclose(self) -> None:
        """Stop reading, as :meth:`close` does."""
        await self._aend(self._left(_CLOSED))
        closer = getattr(self._inner, "aclose", None)
        if callable(closer):
            await closer()

    def __enter__(self) -> TrackedStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _end_now(self, error: BaseException | None) -> None:
        """End it unfinished without awaiting (a finalizer, a cancelled task): off the loop if settling may block."""
        if not self._claim():
            return
        if self._off_loop and _loop_running():  # its settlement may block: not on the loop
            threading.Thread(target=self._settle, args=(error,), daemon=True).start()
        else:
            self._settle(error)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # never raise from a finalizer
            if not self._done:
                self._end_now(self._left("the caller let the stream go before it ended"))

    def end_at_exit(self) -> bool:
        """Still open as the interpreter exits (a script that stopped reading it and ended): cut short
        by :class:`.StreamLeft`, settled at what it used (:mod:`.exits`)."""
        if self._done:
            return False
        self._end_now(self._left("the process exited before the stream ended"))
        return True


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class Prefetched:
    """A provider stream whose first chunks (``read``) have already been read (so a call can fail over
    before them)."""

    def __init__(self, read: list[Any], rest: Any) -> None:
        self._read = read[::-1]  # popped from the end
        self._rest = rest

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rest, name)

    @property
    def unread(self) -> list[Any]:
        """The chunks read ahead that the caller has not read yet."""
        return self._read[::-1]

    def __next__(self) -> Any:
        return self._read.pop() if self._read else next(self._rest)

    async def __anext__(self) -> Any:
        return self._read.pop() if self._read else await self._rest.__anext__()


class Replay:
    """Stored chunks served through the same iterator protocols as a live stream (a cache hit)."""

    def __init__(self, chunks: list[Any]) -> None:
        self._chunks = iter(chunks)

    def __next__(self) -> Any:
        return next(self._chunks)

    async def __anext__(self) -> Any:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None
