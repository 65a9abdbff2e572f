"""Target health in the store: failure counts that open the circuit breaker (cooldowns), and the
speed averages the ``throughput`` and ``latency`` strategies read.

A target that fails ``failures`` times within ``window_s`` is skipped for ``cooldown_s`` (the routing
policy reads the cooldown); when it ends the next call is the probe, and a success clears the count.
"""

from __future__ import annotations

from ..config import CooldownConfig
from ..stores import Store
from .keys import COOLDOWN, FAILURES


def note_failure(store: Store, target: str, config: CooldownConfig, now: float) -> bool:
    """Count a failure; ``True`` when it put the target into cooldown."""
    failures = store.incr(FAILURES + target, 1, ttl_s=config.window_s)
    if failures < config.failures:
        return False
    store.set(COOLDOWN + target, repr(now + config.cooldown_s).encode(), ttl_s=config.cooldown_s)
    store.delete(FAILURES + target)
    return True


def note_success(store: Store, target: str) -> None:
    store.delete(FAILURES + target)


def update_average(store: Store, key: str, sample: float, alpha: float = 0.3) -> None:
    """An exponentially weighted average kept in the store (compare-and-set, a few tries)."""
    for _ in range(5):
        current = store.get(key)
        value = sample if current is None else alpha * sample + (1 - alpha) * float(current)
        if store.compare_and_set(key, current, repr(value).encode()):
            return
