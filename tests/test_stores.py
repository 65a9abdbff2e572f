"""One store suite, three backends: memory, SQLite (files, several processes), real Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import threading
import time
import uuid
from typing import Any

import pytest

from router_middleware.stores import LockTimeout, MemoryStore, SQLiteStore, StoreError, open_store
from router_middleware.stores.redis import RedisStore

# A ttl that lapses within a test, and the wait until it has. Not 50 ms: a test that reads a key
# right after writing it failed when a busy machine stalled it for longer than that.
SHORT_S, LAPSED_S = 0.3, 0.4


def test_get_set_delete_and_ttl(store) -> None:
    assert store.get("a") is None
    store.set("a", b"1")
    assert store.get("a") == b"1"
    store.delete("a")
    assert store.get("a") is None
    store.set("short", b"x", ttl_s=SHORT_S)
    assert store.get("short") == b"x"
    time.sleep(LAPSED_S)
    assert store.get("short") is None


def test_add_within_is_all_or_nothing(store) -> None:
    store.incr("usd", 0.75)
    assert store.add_within([("usd", 0.2, 1.0, None), ("tokens", 10, 100, 60.0)]) is None
    assert float(store.get("usd")) == pytest.approx(0.95) and float(store.get("tokens")) == 10
    refused = store.add_within([("tokens", 10, 100, 60.0), ("usd", 0.1, 1.0, None)])
    assert refused is not None and refused[0] == 1 and refused[1] == pytest.approx(0.95)
    assert float(store.get("tokens")) == 10  # nothing was added, not even the entry that fitted
    assert store.add_within([]) is None


def test_add_within_counts_a_countdown_down_only_where_its_key_is(store) -> None:
    """A countdown (what a provider says is left) is counted down where its key is, refused below 0,
    and a key that is not there (it lapsed with the provider's reset) is neither checked nor made."""
    store.set("left", b"2", ttl_s=60)
    assert store.add_within([("taken", 1, 10, 60.0)], left=[("left", 1.0), ("gone", 5.0)]) is None
    assert float(store.get("left")) == 1 and store.get("gone") is None and float(store.get("taken")) == 1
    refused = store.add_within([("taken", 1, 10, 60.0)], left=[("left", 2.0)])
    assert refused is not None and refused[0] == 1 and refused[1] == pytest.approx(1)
    assert float(store.get("left")) == 1 and float(store.get("taken")) == 1  # nothing was added
    assert store.add_within([], left=[("gone", 1.0)]) is None and store.get("gone") is None


@pytest.mark.parametrize("stored", [b"nan", b"inf", b"abc", b"-1e300", b"5 ", b"\t5\n", b"0x10", b"1_000", b"1e-5000", b"0." + b"0" * 5000 + b"1"],
                         ids=["nan", "inf", "text", "far-below-0", "space", "whitespace", "hex", "underscore",
                              "underflow", "5-kb"])
def test_add_within_adds_nothing_on_a_total_no_writer_of_ours_leaves(store, stored) -> None:
    """A key whose total is no finite decimal, or below minus its limit (no increment of ours makes
    one: another program's value), fails add_within before anything is added, to the keys checked
    before it too (Redis keeps a script's writes up to its error), with an error naming the key and
    its value (Redis's named neither for another type, and -1e300 disabled the limit), which lets the
    caller replace that value, and only that one. Every store reads a value alike: Redis's script
    took ``"5 "`` (Lua's tonumber does) and then failed in INCRBYFLOAT with the keys before it added
    to, while memory and SQLite counted on from 5; ``0x10`` was 16 on Redis, ``1_000`` 1000 elsewhere;
    ``1e-5000`` and 5 KB of digits, which INCRBYFLOAT refuses, are no decimal of ours either."""
    from router_middleware import UnreadableCounter

    store.set("bad", stored)
    with pytest.raises(UnreadableCounter, match=r"counter (\w+:)?bad holds b'") as raised:
        store.add_within([("usd", 0.2, 1.0, None)], [("bad", 1.0, 10.0, None, "h1", 60.0)])
    assert store.get("usd") is None and store.get("bad") == stored
    assert (raised.value.key, raised.value.found) == ("bad", stored)
    assert store.delete_if("bad", raised.value.found)
    assert store.add_within([("usd", 0.2, 1.0, None)], [("bad", 1.0, 10.0, None, "h1", 60.0)]) is None


def test_a_redis_counter_or_hold_set_of_another_type_is_named(redis_url) -> None:
    """Another program's list where a counter or its hold set belongs failed the admission with a
    ``WRONGTYPE`` naming no key, by either driver."""
    import redis

    from router_middleware import UnreadableCounter
    from router_middleware.stores.redis import RedisStore

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    store, client = RedisStore(redis_url, prefix=prefix), redis.Redis.from_url(redis_url)
    client.rpush(f"{prefix}bad", "x")
    client.rpush(f"{prefix}b#held", "x")
    for admit in (store.add_within, lambda *a: asyncio.run(_awaited(store.aadd_within, *a))):
        with pytest.raises(UnreadableCounter, match=f"counter {prefix}bad holds a value of another type") as raised:
            admit([("bad", 1.0, 10.0, None)])
        assert (raised.value.key, raised.value.found) == ("bad", None)
        with pytest.raises(UnreadableCounter, match=f"counter {prefix}b#held holds a value of another type"):
            admit([], [("b", 0.4, 1.0, None, "h1", 60.0)])
    assert store.get("b") is None


@pytest.mark.parametrize("where", ["counter", "hold set"])
def test_a_value_of_another_type_is_replaced_once_not_again_by_a_second_call_that_found_it(where,
                                                                                         redis_url) -> None:
    """Two processes meet another program's list where a budget's counter or hold set belongs. The
    first replaces it and is admitted (its count, its hold recorded); the second, replacing the same
    list a moment later, deleted the key whatever it held by then, the first call's hold with it: that
    call's settlement found no hold and added its spend on top of its reservation, which was never given
    back. Now a value of another type is deleted only while it is still of another type."""
    import redis

    from router_middleware import UnreadableCounter
    from router_middleware.bookkeeping.health import replace

    prefix = f"t{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(redis_url)
    first, second = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    client.rpush(f"{prefix}usd" + ("#held" if where == "hold set" else ""), "x")
    found = {}
    for name, store in (("a", first), ("b", second)):
        with pytest.raises(UnreadableCounter) as raised:
            store.add_within([], [("usd", 4.0, 10.0, None, f"h{name}", 600.0)])
        found[name] = raised.value
    replace(first, found["a"], "counts from 0")
    assert first.add_within([], [("usd", 4.0, 10.0, None, "ha", 600.0)]) is None
    replace(second, found["b"], "counts from 0")
    assert second.add_within([], [("usd", 4.0, 10.0, None, "hb", 600.0)]) is None
    assert float(client.get(f"{prefix}usd")) == 8.0 and len(client.zrange(f"{prefix}usd#held", 0, -1)) == 2
    first.add_many([], releases=[("usd", "ha", 4.0, 1.0, None)])
    second.add_many([], releases=[("usd", "hb", 4.0, 1.0, None)])
    assert float(client.get(f"{prefix}usd")) == 2.0  # what the two calls spent
    assert not MemoryStore().delete_if("usd", None)  # no store but Redis holds another type


async def _awaited(method, *args):
    return await method(*args)


def test_a_redis_settlement_ends_its_holds_before_a_write_that_fails(redis_url) -> None:
    """On Redis a script keeps its writes up to an error: a settlement with a hold set another program
    overwrote ends the holds before it first (what admissions count), and replaces a list of recent
    values that holds another type. (A counter of another program's no longer fails it: replaced.)"""
    from redis.exceptions import ResponseError

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    assert store.add_within([], [("b", 0.4, 1.0, None, "h1", 60.0)]) is None
    store.client.set(store._held("bad"), b"abc")
    store.set("sizes", b"abc")
    with pytest.raises(ResponseError):
        store.add_many([], [("sizes", 20.0, 50, None)], [("b", "h1", 0.4, 0.3, None), ("bad", "h2", 1.0, 1.0, None)])
    assert float(store.get("b")) == pytest.approx(0.3)
    store.add_many([], [("sizes", 20.0, 50, None)])
    assert store.samples("sizes") == [20.0]
    store.close()


@pytest.mark.parametrize("ttl_s", [1e20, float("inf"), 1e-6])
def test_a_ttl_of_any_length_is_taken(store, ttl_s) -> None:
    """A ttl longer than Redis takes (its expiry must fit in 64 bits of ms), up to ``inf``, or shorter
    than a millisecond: every write takes it (Redis refused the first kind, and every write with it)."""
    store.set("a", b"1", ttl_s)
    assert store.add_within([("n", 1.0, 10.0, ttl_s)], [("b", 1.0, 10.0, ttl_s, "h1", ttl_s)]) is None
    store.put_bounded("entry", b"x", ttl_s, "ring", 10)
    store.add_many([("n", 1.0, ttl_s)], [("sizes", 1.0, 5, ttl_s)], [("b", "h1", 1.0, 2.0, ttl_s)])
    store.append("list", b"v", 5, ttl_s)
    if ttl_s > 1:
        assert store.get("a") == b"1" and float(store.get("n")) == 2.0 and float(store.get("b")) == 2.0
        assert store.get("entry") == b"x" and store.samples("sizes") == [1.0] and store.appended("list") == [b"v"]


def test_an_owned_claim_is_taken_with_the_rest_and_ended_by_its_owner_only(store) -> None:
    """An owned key is claimed all or nothing with the other entries (refused while another owner holds
    it; its index comes after the entries, before the holds), lapses after its ttl, and is ended only
    by the owner it holds: a claim that lapsed and was taken again is not ended by its first owner."""
    assert store.add_within([("q", 1.0, 5.0, None)], [("b", 0.1, 1.0, None, "h1", 60.0)],
                            [("probe", b"first", 0.1)]) is None
    assert store.get("probe") == b"first" and float(store.get("q")) == 1.0
    refused = store.add_within([("q", 1.0, 5.0, None)], [("b", 5.0, 1.0, None, "h2", 60.0)],
                               [("probe", b"second", 60.0)])
    assert refused == (1, 1.0)  # the owned key, before the hold that would not fit either
    assert float(store.get("q")) == 1.0  # nothing was added
    assert store.add_within([], [("b", 5.0, 1.0, None, "h2", 60.0)], [("free", b"x", None)]) == (1, pytest.approx(0.1))
    assert store.get("free") is None
    time.sleep(0.15)  # the first claim lapses: another owner takes it
    assert store.add_within([], (), [("probe", b"second", 60.0)]) is None
    assert store.delete_if("probe", b"first") is False and store.get("probe") == b"second"
    assert store.delete_if("probe", b"second") is True and store.get("probe") is None
    assert store.delete_if("probe", b"second") is False


async def test_an_owned_claim_through_the_batched_redis_admission(redis_url) -> None:
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    admitted, refused = await asyncio.gather(store.aadd_within([("q", 1.0, 5.0, None)], (), [("probe", b"a", 60.0)]),
                                             store.aadd_within([("q", 1.0, 5.0, None)], (), [("probe", b"b", 60.0)]))
    assert admitted is None and refused == (1, 1.0)
    assert store.get("probe") == b"a" and float(store.get("q")) == 1.0
    await store.aclose()


async def test_a_batched_admission_cancelled_before_its_flush_is_not_sent_and_the_others_are(redis_url) -> None:
    """Three admissions queued in one turn, the middle one's caller gone before the flush: only the
    other two reach Redis, each with its own answer, after a script Redis had to load again."""
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.client.script_flush()  # the admission script is loaded again for the flush's first command
    first = store.aadd_within([("q", 1.0, 5.0, None)])
    gone = store.aadd_within([("q", 2.0, 5.0, None)])
    last = store.aadd_within([("q", 4.0, 5.0, None)])
    gone.cancel()
    assert await asyncio.gather(first, last) == [None, None]  # 1 + 4 fits; had 2 been added, 4 would not
    assert float(store.get("q")) == 5.0
    await store.aclose()


def test_a_hold_counts_until_released_or_until_it_expires(store) -> None:
    """A reservation is a hold: counted against the limit like an addition, replaced by the actual amount
    when released, and taken back out by the next admission on its key once it expired (its release
    failed); a release that comes after that adds the actual amount in full."""
    store.incr("b", 0.5)
    assert store.add_within([], [("b", 0.4, 1.0, None, "h1", 60.0)]) is None
    assert float(store.get("b")) == pytest.approx(0.9)
    refused = store.add_within([("q", 1.0, 5.0, None)], [("b", 0.2, 1.0, None, "h2", 60.0)])
    assert refused is not None and refused[0] == 1 and refused[1] == pytest.approx(0.9)  # entries, then holds
    assert store.get("q") is None
    store.add_many([], (), [("b", "h1", 0.4, 0.3, None)])  # settled to its actual amount
    assert float(store.get("b")) == pytest.approx(0.8)
    assert store.add_within([], [("b", 0.15, 1.0, None, "lost", 0.05)]) is None  # its release will fail
    assert float(store.get("b")) == pytest.approx(0.95)
    time.sleep(0.12)
    assert store.add_within([], [("b", 0.1, 1.0, None, "h3", 60.0)]) is None  # "lost" expired: taken back out
    assert float(store.get("b")) == pytest.approx(0.9)
    store.add_many([], (), [("b", "lost", 0.15, 0.12, None), ("b", "h3", 0.1, 0.0, None)])  # late, and a release
    assert float(store.get("b")) == pytest.approx(0.92)
    store.add_many([], (), [("fresh", "h4", 0.1, 0.2, SHORT_S)])  # a key created by a release gets the ttl
    assert float(store.get("fresh")) == pytest.approx(0.2)
    time.sleep(LAPSED_S)
    assert store.get("fresh") is None


def test_many_holds_expire_in_order_and_released_ones_are_not_taken_back(store) -> None:
    """Hundreds of calls in flight on one key: the expired holds come back out exactly once, the released
    ones never (the memory store keeps them in a heap instead of scanning every hold per admission)."""
    started = time.monotonic()
    for i in range(300):
        assert store.add_within([], [("k", 1.0, 10_000.0, None, f"short{i}", 2.0)]) is None
        assert store.add_within([], [("k", 2.0, 10_000.0, None, f"long{i}", 60.0)]) is None
    held = time.monotonic()
    store.add_many([], (), [("k", f"short{i}", 1.0, 0.5, None) for i in range(0, 300, 2)])  # half settle in time
    store.add_many([], (), [("k", f"long{i}", 2.0, 2.0, None) for i in range(100)])
    if time.monotonic() - started < 1.8:  # nothing expired yet (a slow machine skips this check)
        assert float(store.get("k")) == pytest.approx(150 * 0.5 + 150 * 1.0 + 300 * 2.0)
    time.sleep(max(0.0, held + 2.1 - time.monotonic()))
    assert store.add_within([], [("k", 0.0, 10_000.0, None, "probe", 60.0)]) is None  # the 150 lost ones expire
    assert float(store.get("k")) == pytest.approx(150 * 0.5 + 300 * 2.0)
    store.add_many([], (), [("k", f"long{i}", 2.0, 1.0, None) for i in range(100, 300)])
    assert float(store.get("k")) == pytest.approx(150 * 0.5 + 100 * 2.0 + 200 * 1.0)


def test_add_within_never_lets_concurrent_callers_pass_the_limit(store) -> None:
    admitted = []

    def work() -> None:
        for _ in range(50):
            if store.add_within([("spent", 1.0, 60.0, None)]) is None:
                admitted.append(1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 60 and float(store.get("spent")) == 60.0


def test_add_many_adds_each_and_sets_the_ttl_of_new_keys(store) -> None:
    store.incr("kept", 1.0)
    store.add_many([("kept", 2.5, SHORT_S), ("fresh", -1.5, SHORT_S), ("kept", 1.0, None)])
    assert float(store.get("kept")) == 4.5 and float(store.get("fresh")) == -1.5
    time.sleep(LAPSED_S)
    assert store.get("fresh") is None and float(store.get("kept")) == 4.5  # an existing key keeps its ttl


def test_samples_keep_the_most_recent_values(store) -> None:
    assert store.samples("out:m") == []
    store.add_many([], [("out:m", float(v), 3, 60.0) for v in (10, 20, 30, 40)])
    store.add_many([("n", 1.0, None)], [("out:m", 50.0, 3, 60.0)])
    assert store.samples("out:m") == [30.0, 40.0, 50.0] and float(store.get("n")) == 1.0


def test_append_keeps_the_last_values_until_the_list_expires(store) -> None:
    assert store.appended("l") == []
    for value in (b"a", b"b", b"c", b"d"):
        store.append("l", value, 3, 60.0)
    assert store.appended("l") == [b"b", b"c", b"d"]
    store.append("short", b"x", 3, SHORT_S)
    store.append("kept", b"x", 3, SHORT_S)
    store.append("kept", b"y", 3)  # no ttl: the list stays
    time.sleep(LAPSED_S)
    assert store.appended("short") == [] and store.appended("kept") == [b"x", b"y"]
    store.append("short", b"z", 3, 60.0)  # what lapsed is not counted again
    assert store.appended("short") == [b"z"]


def test_concurrent_appends_all_land(store) -> None:
    def work(worker: int) -> None:
        for i in range(50):
            store.append("l", f"{worker}:{i}".encode(), 1000, 60.0)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(store.appended("l")) == sorted(f"{w}:{i}".encode() for w in range(4) for i in range(50))


def test_a_redis_append_replaces_a_key_of_another_type(redis_url) -> None:
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.set("l", b"another program's value")
    store.append("l", b"v", 3, 60.0)
    assert store.appended("l") == [b"v"]
    store.close()


def test_a_redis_list_read_of_a_key_of_another_type_is_empty(redis_url) -> None:
    """A key SET where a list of recent values belongs reads as empty, through every read of a list
    (the blocking fetch, the batched one, samples, appended), said once; the values and lists read
    with it are still read (its WRONGTYPE failed the whole fetch)."""
    import structlog

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.set("s", b"another program's value")
    store.set("a", b"1")
    store.append("l", b"2", 5)

    async def batched() -> Any:
        try:
            return await store.afetch(["a"], ["s", "l"])
        finally:
            await store.aclose()

    with structlog.testing.capture_logs() as logs:
        assert store.fetch(["a"], ["s", "l"]) == ([b"1"], [[], [2.0]])
        assert store.samples("s") == [] and store.appended("s") == []
        assert asyncio.run(batched()) == ([b"1"], [[], [2.0]])
    assert [(e["event"], e["key"]) for e in logs] == [("store_value_unreadable", "s")]


def test_put_bounded_keeps_the_newest_entries(store) -> None:
    for i in range(5):
        store.put_bounded(f"entry:{i}", f"v{i}".encode(), 60.0, "ring", 3)
    assert [store.get(f"entry:{i}") for i in range(5)] == [None, None, b"v2", b"v3", b"v4"]
    store.put_bounded("entry:4", b"again", 60.0, "ring", 3)  # a key rewritten keeps its own entry
    assert store.get("entry:4") == b"again" and store.get("entry:3") == b"v3"


def test_incr_is_atomic_across_threads(store) -> None:
    def work() -> None:
        for _ in range(100):
            store.incr("counter", 0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert float(store.get("counter")) == pytest.approx(200.0)
    assert store.incr("fresh", 2.5, ttl_s=SHORT_S) == 2.5
    time.sleep(LAPSED_S)
    assert store.incr("fresh", 1) == 1.0  # expired: starts again


def test_compare_and_set(store) -> None:
    assert store.compare_and_set("k", None, b"v1")
    assert not store.compare_and_set("k", None, b"v2")
    assert not store.compare_and_set("k", b"wrong", b"v2")
    assert store.compare_and_set("k", b"v1", b"v2")
    assert store.get("k") == b"v2"


def test_lock_excludes_and_times_out(store) -> None:
    inside = []
    with store.lock("job", ttl_s=5):
        with pytest.raises(LockTimeout):
            with store.lock("job", timeout_s=0.1):
                inside.append("second")
    with store.lock("job", timeout_s=0.5):
        inside.append("after release")
    assert inside == ["after release"]


def test_lock_expires_if_holder_dies(store) -> None:
    store.compare_and_set("lock:stale", None, b"dead-holder", ttl_s=0.1)
    with store.lock("stale", timeout_s=1.0):
        pass


def _add_many(path: str, n: int) -> None:
    backend = SQLiteStore(path)
    for _ in range(n):
        backend.incr("shared", 1)
    backend.close()


def test_sqlite_is_safe_with_several_processes(tmp_path) -> None:
    path = str(tmp_path / "shared.db")
    SQLiteStore(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(path, 200)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    assert float(SQLiteStore(path).get("shared")) == 600


def test_corrupt_sqlite_file_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="broken.db: not a usable SQLite store"):
        SQLiteStore(path)


def test_open_store_urls(tmp_path, redis_url) -> None:
    assert isinstance(open_store(None), MemoryStore)
    assert isinstance(open_store(f"sqlite:///{tmp_path}/x.db"), SQLiteStore)
    assert open_store(redis_url).get("nothing-here") is None
    with pytest.raises(StoreError, match="unknown store URL"):
        open_store("mongodb://x")


def test_fetch_reads_values_and_recent_values_at_once(store) -> None:
    store.set("a", b"1")
    store.add_many([], [("l", 2.0, 5, None), ("l", 3.0, 5, None)])
    assert store.fetch(["a", "missing"], ["l", "none"]) == ([b"1", None], [[2.0, 3.0], []])
    assert store.fetch([], ["l"]) == ([], [[2.0, 3.0]])


def test_add_many_blends_each_average_atomically(store) -> None:
    """An average (``(key, sample, weight, ttl_s)``) is blended into the stored value in the same
    write: ``weight * sample + (1 - weight) * stored``, the sample alone on a key that holds none or no
    finite number (another program's value), and with the ttl. Concurrent writers lose no sample."""
    store.add_many([], averages=[("lat:m", 1.0, 0.3, None)])
    store.add_many([("n", 1.0, None)], averages=[("lat:m", 2.0, 0.3, None), ("tps:m", 50.0, 0.3, SHORT_S)])
    assert float(store.get("lat:m")) == pytest.approx(0.3 * 2.0 + 0.7 * 1.0)
    assert float(store.get("tps:m")) == 50.0 and float(store.get("n")) == 1.0
    time.sleep(LAPSED_S)
    assert store.get("tps:m") is None  # the ttl of the average
    for stored in (b"nan", b"inf", b"abc"):
        store.set("lat:x", stored)
        store.add_many([], averages=[("lat:x", 3.0, 0.3, None)])
        assert float(store.get("lat:x")) == 3.0
    store.add_many([], averages=[("lat:c", 0.0, 1.0, None)])

    def blend() -> None:
        for _ in range(25):
            store.add_many([], averages=[("lat:c", 1.0, 0.01, None)])

    threads = [threading.Thread(target=blend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert float(store.get("lat:c")) == pytest.approx(1 - 0.99 ** 200)  # each of the 200 samples counted


def test_add_many_sets_each_put(store) -> None:
    store.set("left", b"9")
    store.add_many([("n", 1.0, None)], puts=[("left", b"4", None), ("short", b"x", SHORT_S)])
    assert store.get("left") == b"4" and store.get("short") == b"x" and float(store.get("n")) == 1.0
    time.sleep(LAPSED_S)
    assert store.get("short") is None and store.get("left") == b"4"


def test_add_many_makes_bounded_writes_too(store) -> None:
    store.add_many([("n", 1.0, None)], (), (), [("cache:k1", b"v1", None, "cache", 1), ("cache:k2", b"v2", None,
                                                                                        "cache", 1)])
    assert store.get("cache:k1") is None and store.get("cache:k2") == b"v2"  # a ring of one: the older went
    assert store.get("n") is not None


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_redis_add_many_sends_only_the_scripts_it_has_writes_for(redis_url, mode) -> None:
    """The scripts the server runs for an ``add_many`` (counted by Redis itself): none when it has
    nothing to write, one per bounded write, and one settlement script for all the rest, only where
    there is some (a bounded write alone sends no empty settlement)."""
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    entry, bound = [("n", 1.0, None)], [("cache:k", b"v", None, "cache", 4)]
    cases: list[tuple[dict[str, Any], int]] = [
        ({"entries": []}, 0), ({"entries": [], "bounded": bound}, 1), ({"entries": entry}, 1),
        ({"entries": [], "samples": [("s", 1.0, 3, None)]}, 1), ({"entries": [], "puts": [("p", b"x", None)]}, 1),
        ({"entries": [], "averages": [("a", 1.0, 0.5, None)]}, 1),
        ({"entries": [], "releases": [("r", "h1", 1.0, 1.0, None)]}, 1), ({"entries": entry, "bounded": bound * 2}, 3)]

    def scripts() -> int:  # the scripts the server ran so far
        stats = store.client.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))

    async def run_async() -> list[int]:
        await store.aadd_many(entry, bounded=bound)  # the asyncio client connected
        counts = []
        for kwargs, _ in cases:
            before = scripts()
            await store.aadd_many(**kwargs)
            counts.append(scripts() - before)
        await store.aclose()
        return counts

    store.add_many(entry, bounded=bound)  # the scripts loaded
    if mode == "sync":
        counts = []
        for kwargs, _ in cases:
            before = scripts()
            store.add_many(**kwargs)
            counts.append(scripts() - before)
        store.close()
    else:
        counts = asyncio.run(run_async())
    assert counts == [expected for _, expected in cases]


async def test_concurrent_async_fetches_of_one_key_read_it_once(redis_url, monkeypatch) -> None:
    """A thousand calls that find the same value missing at once send one read of it."""
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.set("k", b"v")
    queued = []
    original = RedisStore._queue_fetch
    monkeypatch.setattr(RedisStore, "_queue_fetch", lambda self, pipe, script, keys, lists: (
        queued.append((list(keys), list(lists))), original(self, pipe, script, keys, lists))[1])
    found = await asyncio.gather(*(store.afetch(["k", "other"], ["l"]) for _ in range(100)))
    assert found == [([b"v", None], [[]])] * 100
    assert queued == [(["k", "other"], ["l"])]
    store.close()


async def test_a_shared_read_is_decoded_once_not_once_per_call_waiting(redis_url, monkeypatch) -> None:
    """A burst after idle: a thousand calls wait on one read of the recent reply sizes (50 values a
    list). Its answer is decoded once for all of them (it was decoded by each: 100 float parses a
    call, the package's busiest function in a profile of the throughput benchmark)."""
    from router_middleware.stores import redis as redis_module

    store = redis_module.RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    for value in (b"1.5", b"oops", b"2"):
        store.client.rpush(store._k("l"), value)
    store.set("k", b"v")
    decoded: list[int] = []
    original = redis_module.numbers
    monkeypatch.setattr(redis_module, "numbers", lambda values: (decoded.append(1), original(values))[1])
    found = await asyncio.gather(*(store.afetch(["k", "other"], ["l", "empty"]) for _ in range(100)))
    assert found == [([b"v", None], [[1.5, 2.0], []])] * 100
    assert len(decoded) == 2  # one per list read
    store.close()


async def test_a_cancelled_call_does_not_fail_the_others_sharing_its_read(redis_url) -> None:
    """Calls that find the same value missing share one read; cancelling one of them (a client
    that went away) leaves the others their answer."""
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.set("k", b"v")
    first = asyncio.ensure_future(store.afetch(["k"]))
    second = asyncio.ensure_future(store.afetch(["k"]))
    await asyncio.sleep(0)  # both are waiting on the one read
    first.cancel()
    assert await second == ([b"v"], [])
    with pytest.raises(asyncio.CancelledError):
        await first
    store.close()


async def test_a_failed_read_whose_callers_were_cancelled_logs_no_unretrieved_error() -> None:
    """A shared read whose every caller was cancelled, and which then fails, leaves asyncio no
    'exception was never retrieved' to report (the store already logs its own failures)."""
    import gc

    from router_middleware.stores.redis import RedisStore

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisStore(f"redis://127.0.0.1:{port}/0", timeout_s=0.2)
    reported: list[Any] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    waiting = asyncio.ensure_future(store.afetch(["k"]))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    for _ in range(50):  # let the flush fail
        await asyncio.sleep(0.02)
    gc.collect()
    await asyncio.sleep(0)
    assert [c["message"] for c in reported] == []
    loop.set_exception_handler(None)


def test_aclose_closes_the_asyncio_client_on_its_loop(redis_url) -> None:
    """A script that runs async calls on Redis and ends with ``await pipeline.aclose()`` leaves no
    connection of the loop's asyncio client open (without it they stay open until the process
    exits, where redis-py warns of an unclosed client)."""
    import asyncio

    from router_middleware import Pipeline

    def open_connections(close: bool) -> int:
        pipeline = Pipeline.from_config({"store": redis_url, "app": f"aclose-{time.time_ns()}",
                                         "cache": {"enabled": False}, "routing": {
                                             "budgets": [{"name": "b", "scope": "app", "usd": 100.0, "window_s": 60}]}})
        pools = []

        async def script() -> None:
            await asyncio.gather(*(pipeline.acompletion("gpt-4o-mini", [{"role": "user", "content": f"q{i}"}],
                                                        mock_response="ok") for i in range(20)))
            pools.append(pipeline.store._batch().client.connection_pool)
            if close:
                await pipeline.aclose()

        asyncio.run(script())
        pool = pools[0]
        return sum(c.is_connected for c in [*pool._available_connections, *pool._in_use_connections])

    assert open_connections(close=False) > 0
    assert open_connections(close=True) == 0


async def test_a_script_redis_lost_runs_again_from_its_source(redis_url) -> None:
    """The async path sends scripts by SHA; a server that lost them (SCRIPT FLUSH, a restart) gets
    the command again with its source, once, and the caller sees only the answer."""
    import redis

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    entry = [("spent", 1.0, 10.0, None)]
    assert await store.aadd_within(entry) is None
    redis.Redis.from_url(redis_url).script_flush()
    assert await store.aadd_within(entry) is None
    assert await store.aadd_within([("spent", 9.0, 10.0, None)]) == (0, 2.0)  # refused: 2 + 9 > 10
    assert store.get("spent") == b"2"
    await store.aclose()


async def test_an_error_reply_fails_only_the_call_it_answers(redis_url) -> None:
    """Calls batched together: one whose command Redis refuses (WRONGTYPE: a GET of a list) raises
    it, the others get their answers (a list read of a string reads as empty: see
    test_a_redis_list_read_of_a_key_of_another_type_is_empty)."""
    import redis

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.set("text", b"v")
    store.append("list", b"1", 3)
    wrong, right, spent, listed = await asyncio.gather(
        store.aget("list"), store.aget("text"), store.aadd_within([("n", 1.0, 5.0, None)]),
        store.afetch([], ["text"]), return_exceptions=True)
    assert isinstance(wrong, redis.ResponseError) and "WRONGTYPE" in str(wrong)
    assert right == b"v" and spent is None and store.get("n") == b"1" and listed == ([], [[]])
    await store.aclose()


async def test_the_async_batch_reconnects_to_a_restarted_server(tmp_path) -> None:
    """A connection the server closed (it restarted) is replaced before anything is sent on it, and
    the scripts the new server lacks are sent with their source: the next call just works."""
    from router_middleware.stores.redis import RedisStore

    from .test_store_faults import RedisServer

    server = RedisServer(tmp_path)
    try:
        store = RedisStore(server.url)
        assert await store.aadd_within([("spent", 1.0, 10.0, None)]) is None
        server.kill()
        server.start()
        assert await store.aadd_within([("spent", 2.0, 10.0, None)]) is None
        assert store.get("spent") == b"2"  # a fresh server: only the second call's amount
        await store.aclose()
    finally:
        server.stop()


def test_the_blocking_client_reconnects_to_a_restarted_server_before_writing(tmp_path) -> None:
    """A pooled connection the server closed (it restarted) is replaced when taken from the pool
    (redis-py's pool sees its end of stream), so a write, which is never sent twice, still reaches
    the new server on the first try."""
    from router_middleware.stores.redis import RedisStore

    from .test_store_faults import RedisServer

    server = RedisServer(tmp_path)
    try:
        store = RedisStore(server.url)
        assert store.add_within([("spent", 1.0, 10.0, None)]) is None
        server.kill()
        server.start()
        assert store.add_within([("spent", 2.0, 10.0, None)]) is None
        assert store.get("spent") == b"2"
        store.close()
    finally:
        server.stop()


async def test_a_command_that_cannot_be_sent_fails_only_its_own_call(redis_url) -> None:
    """A key Redis cannot be sent (a lone surrogate from a caller's label) fails the call that
    queued it, not the others of its batch, and never leaves them waiting."""
    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    store.set("fine", b"v")
    good, bad, after = await asyncio.wait_for(asyncio.gather(
        store.aget("fine"), store.aadd_within([("spend:\ud800", 1.0, 10.0, None)]),
        store.aadd_within([("spend", 1.0, 10.0, None)]), return_exceptions=True), timeout=5)
    assert good == b"v" and isinstance(bad, UnicodeEncodeError) and after is None
    assert store.get("spend") == b"1"
    await store.aclose()


@pytest.mark.parametrize("packer", ["hiredis", "python"])
def test_commands_are_packed_alike_by_hiredis_and_python(packer, monkeypatch) -> None:
    """hiredis packs the batch's commands when installed; the Python packer gives the same bytes, and
    a value Redis cannot take raises a TypeError naming the command either way."""
    from router_middleware.stores import redis as module

    if packer == "hiredis":
        pytest.importorskip("hiredis")
    else:
        monkeypatch.setattr(module, "_hiredis_pack", None)
    args = ("EVALSHA", "a" * 40, 2, "k:é", b"\x00raw", 1.5e-07, -3, 2**70, 0.1)
    assert module._pack(args) == b"".join(
        [b"*9\r\n"] + [b"$%d\r\n%s\r\n" % (len(x), x) for x in
                        (b"EVALSHA", b"a" * 40, b"2", "k:é".encode(), b"\x00raw", b"1.5e-07", b"-3",
                         str(2**70).encode(), b"0.1")])
    for bad in (True, None, [1]):
        with pytest.raises(TypeError, match=f"redis command SET: cannot send {type(bad).__name__}"):
            module._pack(("SET", "k", bad))


async def test_a_connection_lost_mid_batch_keeps_the_replies_read(redis_url, monkeypatch) -> None:
    """The connection breaks after the first reply of a batch: that call gets its answer, the others
    the error, and nothing is sent again (the commands may have run)."""
    import redis
    from redis.asyncio.connection import AbstractConnection

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    for key in ("a", "b", "c"):
        store.set(key, key.encode())
    await store.aget("a")  # the batch's connection is open
    reads, sends = [], []
    read, send = AbstractConnection.read_response, AbstractConnection.send_packed_command

    async def breaking_read(self, *args, **kwargs):
        reads.append(1)
        if len(reads) == 2:
            raise redis.ConnectionError("connection reset by peer")
        return await read(self, *args, **kwargs)

    async def counted_send(self, *args, **kwargs):
        sends.append(1)
        return await send(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "read_response", breaking_read)
    monkeypatch.setattr(AbstractConnection, "send_packed_command", counted_send)
    a, b, c = await asyncio.gather(store.aget("a"), store.aget("b"), store.aget("c"), return_exceptions=True)
    assert a == b"a" and isinstance(b, redis.ConnectionError) and isinstance(c, redis.ConnectionError)
    assert len(sends) == 1
    monkeypatch.undo()
    assert await store.aget("c") == b"c"  # a fresh connection next time
    await store.aclose()


def test_sqlite_deletes_expired_rows_it_would_never_read_again(tmp_path) -> None:
    """Expired rows are deleted at most every ``purge_every_s`` by the next write, whether or not their
    keys are read or written again: a quota's minute window, a day's budget total, a session's route
    and the holds and lists beside them are each written under a key of their own, so rows only ever
    deleted when their key was touched again filled the file for good (a row a minute per quota)."""
    import sqlite3

    from router_middleware.stores import SQLiteStore

    path = tmp_path / "state.db"
    store = SQLiteStore(path, purge_every_s=SHORT_S)
    store.set("kept", b"y")
    store.set("short", b"x", ttl_s=SHORT_S)
    store.incr("quota:m:rpm:1", 1.0, ttl_s=SHORT_S)
    store.append("semantic:scope", b"v", 3, SHORT_S)
    store.add_within([], [("budget:day:1", 1.0, 10.0, SHORT_S, "h1", SHORT_S)])
    store.add_within([], [("budget:lifetime", 1.0, 10.0, None, "h2", SHORT_S)])  # a live key's hold stays
    time.sleep(LAPSED_S)
    store.set("other", b"z")  # the next write after the interval
    db = sqlite3.connect(path)
    assert {k for (k,) in db.execute("SELECT key FROM kv")} == {"kept", "other", "budget:lifetime"}
    assert db.execute("SELECT COUNT(*) FROM lists").fetchone()[0] == 0
    assert [k for (k,) in db.execute("SELECT key FROM holds")] == ["budget:lifetime"]
    assert store.add_within([("budget:lifetime", 9.0, 10.0, None)]) is None  # the expired hold is taken back out


def test_sqlite_clears_a_backlog_of_expired_rows_a_batch_a_write(tmp_path, monkeypatch) -> None:
    """A purge deletes at most a batch of each kind of row (a file written before purges existed may
    hold a year of expired rows: one write is not made to delete them all); a full batch leaves the
    next write to go on, until none is left."""
    import sqlite3

    from router_middleware.stores import SQLiteStore
    from router_middleware.stores import sqlite as module

    monkeypatch.setattr(module, "_PURGED", 2)
    path = tmp_path / "state.db"
    store = SQLiteStore(path, purge_every_s=3600)
    for i in range(5):
        store.set(f"old:{i}", b"x", ttl_s=SHORT_S)
    time.sleep(LAPSED_S)
    db = sqlite3.connect(path)
    left = []
    for i in range(4):
        store._purge_at = 0.0 if i == 0 else store._purge_at  # the interval is over once
        store.set(f"new:{i}", b"y")
        left.append(db.execute("SELECT COUNT(*) FROM kv WHERE key LIKE 'old:%'").fetchone()[0])
    assert left == [3, 1, 0, 0]


def test_a_sqlite_purge_never_waits_for_another_writer(tmp_path) -> None:
    """The purge after a write tries the write lock once: another process holding it leaves the
    expired rows to the next purge, at once rather than after the store's busy timeout, and the
    connection's own writes wait for the lock as before."""
    import sqlite3

    from router_middleware.stores import SQLiteStore

    path = tmp_path / "state.db"
    store = SQLiteStore(path, busy_timeout_s=30.0, purge_every_s=3600)
    store.set("old", b"x", ttl_s=SHORT_S)
    time.sleep(LAPSED_S)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    started = time.monotonic()
    store._purge()
    waited = time.monotonic() - started
    other.execute("ROLLBACK")
    assert waited < 10.0  # a purge that waited would take the 30 s busy timeout
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM kv WHERE key = 'old'").fetchone()[0] == 1
    assert store._db().execute("PRAGMA busy_timeout").fetchone()[0] == 30000
    store._purge_at = 0.0
    store.set("new", b"y")  # the lock is free: this write's purge deletes the row
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM kv WHERE key = 'old'").fetchone()[0] == 0


def test_a_sqlite_store_connection_that_cannot_write_is_opened_again(tmp_path) -> None:
    """A connection opened while the file was read-only (``chattr +i``, a read-only mount: here SQLite's
    ``query_only``, which fails writes with the same error) stayed so for good: every budget write of
    that thread failed after the file was writable again. The failed write drops it; the next opens anew."""
    import sqlite3

    from router_middleware.stores import SQLiteStore

    store = SQLiteStore(tmp_path / "store.db")
    store._db().execute("PRAGMA query_only = 1")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store.incr("budget:day", 5.0)
    assert store.incr("budget:day", 5.0) == 5.0 and store.get("budget:day") == b"5.0"


def test_a_hold_set_member_of_another_form_does_not_stop_the_expired_holds_coming_back(redis_url) -> None:
    """A member another program wrote in a budget's hold set (``junk``) failed the admission script
    after it had taken the expired holds out of the set but before it took their amounts out of the
    total: the total stayed that much too high for the rest of its window. Now such a member is taken
    out with no amount."""
    import redis

    from router_middleware.stores.redis import RedisStore

    store = RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    assert store.add_within([], [("b", 500.0, 10_000.0, None, "h1", 0.001)]) is None
    redis.Redis.from_url(redis_url).zadd(store._held("b"), {"junk": 0, "x|nan": 0})
    time.sleep(0.01)
    assert store.add_within([], [("b", 20.0, 10_000.0, None, "h2", 60.0)]) is None
    assert float(store.get("b")) == pytest.approx(20.0)
    store.close()


@pytest.mark.parametrize("stored", [b"abc", b"nan", b"inf"])
def test_a_cache_ring_counter_that_is_no_number_counts_again_and_writes_go_on(store, stored) -> None:
    """The response cache's eviction ring counts its writes in ``<ring>:seq``; another program's value
    there failed every cache write for good (on SQLite none landed; on Redis the entry landed, its
    eviction did not, and each write said it failed). The counter now starts again."""
    store.set("ring:seq", stored)
    for i in range(3):
        store.put_bounded(f"entry{i}", b"x", None, "ring", 2)
    assert store.get("entry0") is None and store.get("entry1") == store.get("entry2") == b"x"


@pytest.mark.parametrize("stored", [b"banana", b"0x10", b"5 "])
def test_a_settlement_replaces_a_counter_no_writer_of_ours_leaves_and_writes_the_rest(store, stored) -> None:
    """Another program's value in a counter failed the settlement there (Redis: "value is not a valid
    float" naming no key; SQLite: the whole transaction), and every settlement after it: with no
    admission to replace it first (litellm's sync calls are only counted), the spend was never
    counted. The addition replaces it, counting from 0, keeps its expiry and says so naming the key;
    the settlement's other writes land."""
    import structlog

    store.set("spent", stored, ttl_s=100)
    store.set("held-spent", stored)
    with structlog.testing.capture_logs() as logs:
        store.add_many([("spent", 2.5, 60.0), ("other", 1.0, 60.0)], samples=[("sizes", 7.0, 10, 60.0)],
                       releases=[("held-spent", "h1", 0.0, 4.0, None)])
    assert float(store.get("spent")) == 2.5 and float(store.get("held-spent")) == 4.0
    assert float(store.get("other")) == 1.0 and store.samples("sizes") == [7.0]
    said = sorted(e["key"] for e in logs if e["event"] == "store_value_replaced")
    assert said == ["held-spent", "spent"]  # the key as the package names it (no Redis prefix)
    store.add_many([("spent", 1.0, 60.0)])  # a number of ours again: added to, not replaced
    assert float(store.get("spent")) == 3.5
    assert store.add_within([], [("held", 0.4, 10.0, None, "h9", 60.0)]) is None
    store.set("held", stored)  # spoiled while the call ran: its hold went with the value
    store.add_many([], releases=[("held", "h9", 0.4, 0.3, None)])
    assert float(store.get("held")) == pytest.approx(0.3)  # the call's actual spend, not 0.3 - 0.4
    store.set("lasting", stored)  # no expiry: it takes the addition's
    store.add_many([("lasting", 1.0, LAPSED_S / 2)])
    time.sleep(LAPSED_S)
    assert store.get("lasting") is None
    if isinstance(store, RedisStore):
        assert 0 < store.client.pttl(store._k("spent")) <= 100_000  # its expiry kept


def test_a_settlement_leaves_a_closed_budget_s_counter_holding_another_program_s_value(store) -> None:
    """A closed budget's counter is not replaced (the spend it stood for is unknown: its admissions
    refuse until someone deletes it); the settlement's other writes land, the kept key said."""
    import structlog

    store.set("closed", b"banana")
    store.set("open", b"banana")
    with structlog.testing.capture_logs() as logs:
        store.add_many([("open", 1.0, 60.0)], releases=[("closed", "h1", 0.0, 4.0, None)], closed=["closed"])
    assert store.get("closed") == b"banana" and float(store.get("open")) == 1.0
    events = {e["event"]: e["key"] for e in logs}
    assert events == {"store_value_kept": "closed", "store_value_replaced": "open"}
    store.add_many([("closed", 2.0, 60.0)], closed=["closed"])
    store.delete("closed")
    store.add_many([("closed", 2.0, 60.0)], closed=["closed"])  # deleted: counted from 0 again
    assert float(store.get("closed")) == 2.0


def test_a_counter_gone_while_its_hold_was_held_starts_again_at_the_call_s_spend(store) -> None:
    """A budget's counter deleted while a call held part of it (an operator's reset, an eviction) got
    the release's difference: on Redis a negative counter with no expiry (its window never ended), on
    SQLite and in memory a negative one. The hold went with the counter, so the counter starts again
    at what the call spent, expiring with its window."""
    assert store.add_within([], [("spent", 0.4, 10.0, LAPSED_S / 2, "h1", 60.0)]) is None
    store.delete("spent")
    store.add_many([], releases=[("spent", "h1", 0.4, 0.3, LAPSED_S / 2)])
    assert float(store.get("spent")) == pytest.approx(0.3)
    if isinstance(store, RedisStore):
        assert 0 < store.client.pttl(store._k("spent")) <= LAPSED_S * 1000
    time.sleep(LAPSED_S)
    assert store.get("spent") is None
