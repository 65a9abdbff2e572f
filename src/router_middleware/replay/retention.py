"""Retention: did the trimmed request keep what the recorded reply went on to use?

For agent sessions the items are files (paths, and names alone: :func:`.extract.files`); for chats
(no tools) they are proper names
(capitalised words that do not start a sentence). An item counts when the reply mentions it and it
occurs in the untrimmed request outside the first two messages (system prompt and task, which every
strategy keeps); it is retained when the planned request still contains it.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..context.extract import files, names
from ..messages import text_of
from ..types import Message


def path_items(text: str) -> set[str]:
    return {path.lstrip("./") for path in files(text)}  # one file, however it was written


def name_items(text: str) -> set[str]:
    return set(names(text))


def retention_counts(
    reply: Message, request: Sequence[Message], planned: Sequence[Message], *, chat: bool,
) -> tuple[int, int]:
    """``(retained, relevant)`` for one call."""
    extract = name_items if chat else path_items
    used = extract(text_of(reply))
    if not used:
        return 0, 0
    history = "\n".join(text_of(m) for m in request[2:])
    relevant = {item for item in used if item in history}
    if not relevant:
        return 0, 0
    kept_text = "\n".join(text_of(m) for m in planned)
    return sum(1 for item in relevant if item in kept_text), len(relevant)
