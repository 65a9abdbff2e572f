"""The thread a finalizer hands its work to (:data:`_HANDOFF`), shared by every :class:`.RouterLogger`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from ..telemetry import log


class _Handoff:
    """Work a finalizer hands over, run on a daemon thread of its own. A finalizer runs where the
    object is freed: inside a garbage collection, on any thread, maybe while that thread holds a lock
    the work takes (the logger's, a store's); so it only queues (``SimpleQueue.put`` may be called
    there). The thread is started before anything can be queued (:meth:`ready`)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ready(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="router-middleware-handoff", daemon=True)
                self._thread.start()

    def put(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def drain(self, timeout_s: float = 30.0) -> None:
        """Wait until the work queued so far is done (at most ``timeout_s``): a mark queued behind it
        is reached."""
        if self._thread is None:
            return  # nothing was ever queued
        reached = threading.Event()
        self._queue.put(reached.set)
        reached.wait(timeout_s)

    def _run(self) -> None:
        while True:
            _guarded(self._queue.get(), BaseException)  # a SystemExit too: the work queued after it still runs


def _guarded(work: Callable[[], object], catching: type[BaseException] = Exception) -> None:
    """Run ``work``, logging what it raises of ``catching`` (on a thread of the logger's own, or in its
    exit hook, where Ctrl-C must go on: only ``Exception`` there)."""
    try:
        work()
    except catching as exc:  # noqa: BLE001 - accounting never fails anything else
        log.warning("litellm_logger_failed", error_type=type(exc).__name__, error=str(exc)[:200])


_HANDOFF = _Handoff()
