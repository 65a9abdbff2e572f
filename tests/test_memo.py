"""Resent message dicts are keyed and validated once; a replaced content or tool_calls is seen afresh."""

from __future__ import annotations

import gc
import json
import random
import tracemalloc

import pytest

from router_middleware import MessageError, Pipeline
from router_middleware import messages as messages_module
from router_middleware.context.structure import blocks
from router_middleware.memo import HistoryMemo, MessageMemo
from router_middleware.messages import validate_messages
from router_middleware.tokens import TokenCounter, fast_key


def test_replaced_content_is_keyed_and_counted_again() -> None:
    message = {"role": "user", "content": "short"}
    counter = TokenCounter("gpt-4o-mini")
    key, count = counter.keyed(message)
    assert counter.keyed(message) == (key, count)  # resent unchanged: same entry
    message["content"] = "a much longer message than before " * 20
    new_key, new_count = counter.keyed(message)
    assert new_key != key and new_count > count and new_key == fast_key(dict(message))


def test_replaced_tool_calls_are_validated_again() -> None:
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert validate_messages([message])[0] is message
    message["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]  # no id
    with pytest.raises(MessageError, match="tool_calls\\[0\\] has no id"):
        validate_messages([message])


def test_memo_is_bounded_and_holds_its_dicts() -> None:
    memo = MessageMemo(limit=3)
    kept = [{"role": "user", "content": str(i)} for i in range(5)]
    for i, message in enumerate(kept):
        memo.put(message, i)
    assert memo.get(kept[4]) == 4 and memo.get(kept[0]) is None  # started over when full
    assert memo.get({"role": "user", "content": "4"}) is None  # equal but another dict: not the same entry


def _agent_history(turns: int) -> list[dict]:
    history: list[dict] = [{"role": "system", "content": "You are a coding agent."},
                           {"role": "user", "content": "Fix the failing test."}]
    for i in range(turns):
        history.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "bash", "arguments": f'{{"n": {i}}}'}}]})
        history.append({"role": "tool", "tool_call_id": f"c{i}", "content": f"output {i} " * (i + 1)})
    return history


def test_history_memo_finds_the_remembered_prefix_and_refuses_changes() -> None:
    memo = HistoryMemo()
    history = _agent_history(3)
    memo.remember(history, "first")
    grown = [*history, {"role": "user", "content": "next"}]
    assert memo.extended(grown) == (len(history), "first")
    assert memo.extended(list(history)) == (len(history), "first")  # a new list of the same dicts
    history[3]["content"] = "replaced in place"
    assert memo.extended(grown) == (0, None)  # a replaced content is seen afresh
    history[3]["content"] = "output 0 "
    history[2]["tool_calls"] = []
    assert memo.extended(grown) == (0, None)
    other = [history[0], {"role": "user", "content": "another task"}]
    assert memo.extended(other) == (0, None)


def test_history_memo_keeps_a_call_and_its_trimmed_plan() -> None:
    memo = HistoryMemo(ways=2)
    history = _agent_history(4)
    trimmed = [history[0], history[1], {"role": "user", "content": "[digest]"}, *history[-2:]]
    memo.remember(history, "input")
    memo.remember(trimmed, "trimmed")  # shares the first message, extends nothing: a second way
    assert memo.extended([*history, {"role": "user", "content": "go on"}]) == (len(history), "input")
    assert memo.extended(trimmed)[1] == "trimmed"
    grown = [*history, {"role": "user", "content": "go on"}]
    memo.remember(grown, "grown")  # extends the input: replaces it, the trimmed way stays
    assert memo.extended(grown) == (len(grown), "grown") and memo.extended(trimmed)[1] == "trimmed"
    memo.remember([history[0], "not a dict"], "x")  # type: ignore[list-item]
    assert memo.extended([history[0], "not a dict"])[1] != "x"  # type: ignore[list-item]


def test_profile_of_a_growing_history_counts_only_the_new_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = TokenCounter("gpt-4o-mini")
    history = _agent_history(5)
    first = counter.profile(history)
    looked: list[dict] = []
    keyed = counter.keyed
    monkeypatch.setattr(counter, "keyed", lambda m: looked.append(m) or keyed(m))
    history += [{"role": "assistant", "content": "done"}, {"role": "user", "content": "thanks"}]
    grown = counter.profile(history)
    assert looked == history[-2:]
    fresh = TokenCounter("gpt-4o-mini").profile([dict(m) for m in history])
    assert (grown.chain, grown.totals) == (fresh.chain, fresh.totals)  # the same keys and counts
    assert grown.totals[-1] == sum(counter.message(m) for m in history) and grown.chain[: len(first.chain)] == first.chain


def test_blocks_resumed_from_an_earlier_history_equal_a_fresh_scan() -> None:
    rng = random.Random(7)
    counter = TokenCounter("gpt-4o-mini")
    kinds = [lambda i: {"role": "user", "content": f"u{i}"}, lambda i: {"role": "assistant", "content": f"a{i}"},
             lambda i: {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}"}]},
             lambda i: {"role": "tool", "tool_call_id": f"c{i}", "content": f"t{i}"},
             lambda i: {"role": "system", "content": f"s{i}"}]
    for _ in range(200):
        history: list[dict] = [{"role": "system", "content": "sys"}]
        for step in range(rng.randrange(1, 6)):
            history += [rng.choice(kinds)(len(history)) for _ in range(rng.randrange(1, 5))]
            head = rng.randrange(0, len(history) + 1)
            resumed = blocks(history, head, counter.profile(history))
            assert resumed == blocks(history, head), (history, head, step)


def test_validation_goes_on_from_a_resent_history_with_its_open_calls() -> None:
    history = _agent_history(3)
    history.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": "open", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]})
    assert validate_messages(history) == history  # the last call is still open: left to the provider
    answered = [*history, {"role": "tool", "tool_call_id": "open", "content": "ok"}]
    assert validate_messages(answered) == answered  # resumed: the open call is answered
    with pytest.raises(MessageError, match=r"message 8: tool call open \(bash\) is not answered before the user turn at message 9"):
        validate_messages([*history, {"role": "user", "content": "skip it"}])
    with pytest.raises(MessageError, match="message 10: tool result for c0 answers it again"):
        validate_messages([*answered, {"role": "tool", "tool_call_id": "c0", "content": "again"}])
    with pytest.raises(MessageError, match="message 10: unknown role 'robot'"):
        validate_messages([*answered, {"role": "robot", "content": "?"}])


def _copies(history: list[dict]) -> list[dict]:
    """The history as an adapter hands it on each request: new dicts of the same JSON (the LiteLLM
    proxy parses every request; the LangChain middleware converts its messages every call)."""
    return json.loads(json.dumps(history))


def test_a_history_resent_as_copies_is_validated_once(monkeypatch: pytest.MonkeyPatch) -> None:
    history = _agent_history(6)
    first = validate_messages(_copies(history))
    checked: list[int] = []
    validate = messages_module.validate_message
    monkeypatch.setattr(messages_module, "validate_message",
                        lambda message, *, index, source=None, parts=True: checked.append(index) or validate(
                            message, index=index, source=source, parts=parts))
    grown = [*_copies(history), {"role": "user", "content": "go on"}]
    again = validate_messages(grown)
    assert checked == [len(history)]  # only the new message
    assert all(a is b for a, b in zip(again, first, strict=False))  # the first request's dicts: later memos hit
    assert again[-1] is grown[-1] and again == grown


def test_copies_that_differ_anywhere_are_validated_afresh() -> None:
    history = _agent_history(4)
    validate_messages(_copies(history))
    broken = _copies(history)
    broken[5]["tool_call_id"] = "nobody"  # an earlier result now answers no call
    with pytest.raises(MessageError, match="message 5: tool result for nobody"):
        validate_messages(broken)
    renamed = _copies(history)
    renamed[3]["content"] = "edited"
    assert validate_messages(renamed)[3]["content"] == "edited"


def test_requests_of_one_session_keep_one_history_not_one_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind the proxy each request of an agent loop brings new dicts of its growing history: the
    memos keep what the session needs (its history once), not every request's copy of it. The
    process-wide validation memos start empty, as in a fresh process: the session's 300 new messages
    grow the MessageMemo's dict, and when earlier tests left it just below a resize (1,365 or 2,730
    entries) the whole new table (74 or 148 KB) lands in the measured window, while the old one,
    allocated before tracemalloc started, is not credited: a resize, not what the session keeps."""
    monkeypatch.setattr(messages_module, "_MEMOS", {parts: (MessageMemo(), HistoryMemo(alike=True))
                                                    for parts in (True, False)})
    pipeline = Pipeline.from_config({})
    history = _agent_history(60)
    pipeline.plan(pipeline.make_call("gpt-4o-mini", _copies(history), {"session_id": "s"}, {}))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for step in range(150):
            history += [{"role": "assistant", "content": f"step {step} done"}, {"role": "user", "content": "go on"}]
            pipeline.plan(pipeline.make_call("gpt-4o-mini", _copies(history), {"session_id": "s"}, {}))
        gc.collect()
        grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
    size = len(json.dumps(history))
    assert grown < 10 * size, f"{grown} bytes kept after 150 requests of a history of {size} bytes at the end"
