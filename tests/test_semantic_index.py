"""The semantic cache's index in the store, on every backend: concurrent adds in one scope all land,
each add and each lookup is one round trip, entries expire and the oldest go past ``max_per_scope``.
A stand-in embedder (a hash of the text) keeps these tests free of the ``semantic`` extra: what they
check is the store traffic, not the similarity."""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
import uuid
from collections.abc import Sequence

from router_middleware import Call, Plan
from router_middleware.semantic import SemanticIndex, scope_of


def hashed(texts: Sequence[str]) -> list[list[float]]:
    """A unit vector per text: the same text gives the same vector, others one far from it."""
    vectors = []
    for text in texts:
        vector = [b - 127.5 for b in hashlib.sha256(text.encode()).digest()]
        norm = math.sqrt(sum(x * x for x in vector))
        vectors.append([x / norm for x in vector])
    return vectors


def turn(text: str) -> Plan:
    return Plan.from_call(Call.create("gpt-4o-mini", [{"role": "user", "content": text}], {"temperature": 0},
                                      {"app": "sem-index"}))


def question(i: int) -> str:
    return f"What is {i} times {i + 7}?"


def test_concurrent_adds_in_one_scope_all_land(store) -> None:
    """Sixteen threads adding to one scope at once lose no entry (the index was a JSON list rewritten
    by compare-and-set, up to 20 tries: under contention some adds gave up, and their turns missed)."""
    index = SemanticIndex(store, hashed, max_per_scope=1000)
    start = threading.Barrier(16)

    def work(worker: int) -> None:
        start.wait()
        for i in range(worker * 20, worker * 20 + 20):
            index.add(turn(question(i)), f"key-{i}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missed = [i for i in range(320) if (found := index.find(turn(question(i)))) is None or found.cache_key != f"key-{i}"]
    assert missed == []


def test_the_oldest_entries_go_past_max_per_scope(store) -> None:
    index = SemanticIndex(store, hashed, max_per_scope=3)
    for i in range(5):
        index.add(turn(question(i)), f"key-{i}")
    assert [index.find(turn(question(i))) is not None for i in range(5)] == [False, False, True, True, True]


def test_an_entry_expires_after_the_ttl(store) -> None:
    index = SemanticIndex(store, hashed, ttl_s=0.05)
    index.add(turn(question(1)), "key-1")
    assert index.find(turn(question(1))) is not None
    time.sleep(0.12)
    index.add(turn(question(2)), "key-2")  # the scope is written to again: the older entry still lapses
    assert index.find(turn(question(1))) is None


def test_an_add_and_a_lookup_are_one_round_trip_each(redis_url, monkeypatch) -> None:
    """On Redis an add is one round trip whoever else adds (it was a SET, then a GET and a
    compare-and-set per try), and a lookup one however many entries the scope holds (it was a GET of
    the index, then one GET per entry)."""
    from redis.connection import Connection

    from router_middleware.stores.redis import RedisStore

    index = SemanticIndex(RedisStore(redis_url, prefix=f"t{uuid.uuid4().hex[:8]}:"), hashed)
    for i in range(10):
        index.add(turn(question(i)), f"key-{i}")
    sent = []
    original = Connection.send_packed_command
    monkeypatch.setattr(Connection, "send_packed_command",
                        lambda self, command, check_health=True: sent.append(1) or original(self, command, check_health))
    index.add(turn(question(10)), "key-10")
    assert len(sent) == 1
    sent.clear()
    assert index.find(turn(question(3))).cache_key == "key-3"
    assert len(sent) == 1


def test_an_index_of_the_earlier_format_is_ignored(store) -> None:
    """An earlier version's index (a JSON list of entry ids under ``<scope>:index``, each entry its own
    key) is not read: its turns miss until asked again, and its keys lapse with the cache's ttl."""
    index = SemanticIndex(store, hashed)
    scope = scope_of(turn(question(1)))
    store.set(f"{scope}:index", json.dumps(["old"]).encode(), ttl_s=60)
    store.set(f"{scope}:e:old", json.dumps({"vector": "", "key": "old-key"}).encode(), ttl_s=60)
    assert index.find(turn(question(1))) is None
    index.add(turn(question(1)), "key-1")
    assert index.find(turn(question(1))).cache_key == "key-1"
