"""Hold and ledger ids: unique within a process and across forked workers, without a syscall each."""

from __future__ import annotations

import multiprocessing
import re

from router_middleware.ids import unique_id


def _ids(count: int) -> list[str]:
    return [unique_id() for _ in range(count)]


def test_ids_are_unique_hex_and_differ_in_a_forked_worker() -> None:
    here = _ids(5000)
    assert len(set(here)) == 5000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in here)
    with multiprocessing.get_context("fork").Pool(2) as pool:  # forked after ids were drawn here
        there = pool.map(_ids, [5000, 5000])
    assert len(set(here) | set(there[0]) | set(there[1])) == 15000
    assert {i[:16] for i in there[0]}.isdisjoint({i[:16] for i in here})
