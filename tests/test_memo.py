"""Resent message dicts are keyed and validated once; a replaced content or tool_calls is seen afresh."""

from __future__ import annotations

import pytest

from router_middleware import MessageError
from router_middleware.memo import MessageMemo
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
