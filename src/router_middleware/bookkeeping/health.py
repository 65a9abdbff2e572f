"""Target health in the store: failure counts that open the circuit breaker (cooldowns), and the
speed averages the ``throughput`` and ``latency`` strategies read.

A target that fails ``failures`` times within ``window_s`` is skipped for ``cooldown_s`` (the routing
policy reads the cooldown). When it ends the target is half-open for ``cooldown_s`` more (the key
outlives its cooldown): one call at a time claims the probe (``PROBE``, with the call's admission)
and the others skip it; the probe's success closes the circuit, its failure opens it again (other
failures while the key lives, of attempts admitted before it opened, do not). The
claim holds its attempt's token: only that attempt ends it, so a probe that outlasts its claim
(``probe_s``), which another call then takes, does not end the later claim.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CooldownConfig
from ..errors import UnreadableCounter
from ..stores import Store
from ..stores.base import Average, Owned, number
from ..telemetry import log
from .keys import COOLDOWN, FAILURES, LATENCY, PROBE, THROUGHPUT

SPEED_WEIGHT = 0.3  # a new sample's weight in a speed average


@dataclass(frozen=True, slots=True)
class Probe:
    """One attempt's claim on the probe of half-open ``target``; ``owner``: a token unique to the attempt."""

    target: str
    owner: bytes


def note_failure(store: Store, target: str, config: CooldownConfig, now: float) -> bytes | None:
    """Count a failure; at the ``failures``-th within ``window_s`` open the circuit, unless it is open
    (or half-open) already: the cooldown key's value when this failure opened it. Opening is a claim
    of the absent cooldown key, atomic across processes, so a burst of failures opens the circuit once:
    the failures of attempts admitted before it opened (or by a process whose view lags) neither move
    its end nor take a failed probe's hold. One round trip below the threshold, two past it."""
    count = [(FAILURES + target, 1.0, config.failures - 1.0, config.window_s)]
    try:
        refused = store.add_within(count)
    except UnreadableCounter as exc:  # another program's value: it kept every failure from counting
        replace(store, exc, "the failure count starts again")
        refused = store.add_within(count)
    if refused is None:
        return None
    until, key = repr(now + config.cooldown_s).encode(), COOLDOWN + target
    if store.add_within([], owned=[(key, until, 2 * config.cooldown_s)]) is not None:
        unreadable = _unreadable(store, key)
        if unreadable is False:
            return None  # open (or half-open) already
        if unreadable:  # a value no reader takes (another program's), which kept the circuit from opening
            store.delete(key)
            log.warning("cooldown_value_replaced", key=key, why="it held no cooldown end, and no circuit could open")
        if store.add_within([], owned=[(key, until, 2 * config.cooldown_s)]) is not None:
            return None
    store.delete(FAILURES + target)  # the count starts again once the circuit closes
    store.delete(PROBE + target)  # a probe of an earlier cooldown, still in flight: not this one's
    return until


def replace(store: Store, unreadable: UnreadableCounter, then: str) -> None:
    """Take out the value an admission could not read (only that value, or one of that other type: a
    count or hold set another call wrote since stays), so the key counts from 0 again; said, naming
    the key, the value and ``then``."""
    if store.delete_if(unreadable.key, unreadable.found):  # else another call replaced it first
        log.warning("store_value_replaced", key=unreadable.key, found=_shown(unreadable.found), why=then)


def _shown(found: bytes | None) -> str:
    return "a value of another type" if found is None else repr(found[:40])


def _unreadable(store: Store, key: str) -> bool | None:
    """Whether cooldown ``key`` holds a value no reader takes as a cooldown's end (``False``: it holds
    one, the circuit is open or half-open; ``None``: it holds nothing, it lapsed since the claim)."""
    try:
        raw = store.get(key)
    except Exception as exc:
        if "WRONGTYPE" in str(exc):  # Redis: another program's list or hash there
            return True
        raise  # a store that fails fails the count, as the claim would
    if raw is None:
        return None
    try:
        number(raw)
    except ValueError:
        return True
    return False


def open_circuit(store: Store, target: str, config: CooldownConfig, now: float, *, probe: Probe) -> bytes:
    """After its failed ``probe``, skip ``target`` for ``cooldown_s`` again, then let it be probed
    (half-open) for ``cooldown_s`` more; the cooldown key's value. The probe is held (as that probe's)
    until the cooldown ends, whoever claims it now: a process that still reads the target as half-open
    (its view lags) does not probe it again, and a later probe still in flight, whose own claim it
    replaces, cannot end it early."""
    until = repr(now + config.cooldown_s).encode()
    store.set(COOLDOWN + target, until, ttl_s=2 * config.cooldown_s)
    store.delete(FAILURES + target)
    store.set(PROBE + target, probe.owner, ttl_s=config.cooldown_s)
    return until


def note_success(store: Store, target: str, *, probed: bool = False) -> None:
    """Clear ``target``'s failure count; after a probe (``probed``), close its circuit (and remove the
    probe's claim, whoever holds it: a closed circuit is not probed, and opening it again removes it too)."""
    store.delete(FAILURES + target)
    if probed:
        store.delete(COOLDOWN + target)
        store.delete(PROBE + target)


def end_probe(store: Store, probe: Probe) -> None:
    """Give ``probe`` back (its call failed for its own reasons, or never tried it): only while the
    claim is still its own."""
    store.delete_if(PROBE + probe.target, probe.owner)


def probe_claim(probe: Probe, probe_s: float) -> Owned:
    """The ``add_within`` owned entry that makes one call, across processes, the probe of its target
    (for ``probe_s`` at most)."""
    return PROBE + probe.target, probe.owner, probe_s


def speed_averages(target: str, output_tokens: int, latency_s: float | None,
                   first_token_s: float | None) -> list[Average]:
    """A provider-counted answer's samples of ``target``'s output tokens/s and seconds to its first
    token (the whole call's, unstreamed), each blended into its average by the settlement's write."""
    averages: list[Average] = []
    if latency_s and output_tokens:
        averages.append((THROUGHPUT + target, output_tokens / latency_s, SPEED_WEIGHT, None))
    first = first_token_s or latency_s
    if first:
        averages.append((LATENCY + target, first, SPEED_WEIGHT, None))
    return averages
