"""Offline extractive digests: what a dropped span or a cleared output mentioned.

Used in place of a model-written summary when none is available (replay, or before the summary has
been written): for agents the file paths and commands, for chats the names and open questions.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..messages import text_of
from ..types import Message
from .extract import files, names, questions
from .structure import agent_speaks_as_user, last_instruction


def _recent_paths(text: str, limit: int) -> str:
    """The ``limit`` most recently mentioned files (their paths as written, or a name alone:
    :func:`.extract.files`), oldest first; '' if none."""
    found = files(text)
    shown = found[-limit:] if limit else []
    earlier = f"(+{len(found) - len(shown)} earlier) " if len(found) > len(shown) else ""
    return earlier + ", ".join(shown) if shown else ""


def cleared_placeholder(text: str, *, tokens: int, max_paths: int = 40) -> str:
    """The short text that replaces a cleared tool output; it keeps the paths the output named."""
    lines = text.count("\n") + 1
    note = f"[output cleared to save context: {lines} lines, ~{tokens} tokens"
    if shown := _recent_paths(text, max_paths):
        note += "; paths: " + shown
    return note + "]"


def span_digest(messages: Sequence[Message], *, chat: bool, max_names: int = 120, max_paths: int = 40,
                latest: bool = True) -> str:
    """A digest of a dropped span of the conversation; an agent's keeps the user's latest words in it
    (cut to ``max_paths`` x 25 characters, at most 1,000: :func:`.structure.last_instruction`), also
    one with no native tools (:func:`.structure.agent_speaks_as_user`), unless ``latest`` is off (the
    window keeps them whole, outside the span); a plain chat's keeps its names and open questions
    instead (the words would crowd out names, and its latest ones are never dropped)."""
    text = "\n".join(text_of(m) for m in messages)
    parts = [f"[{len(messages)} earlier messages omitted to save context. Digest:"]
    if chat:
        counts = names(text)
        top = [name for name, _ in counts.most_common(max_names)]
        if top:
            parts.append("names and places mentioned: " + ", ".join(sorted(top)))
        threads = questions(text)[-3:]
        if threads:
            parts.append("open questions: " + " | ".join(threads))
    elif shown := _recent_paths(text, max_paths):
        parts.append("files mentioned, most recent last: " + shown)
    said = last_instruction(messages, 0) if latest and (not chat or agent_speaks_as_user(messages)) else None
    if said is not None:  # the task may have changed in the span: its latest words are kept
        words = " ".join(text_of(messages[said]).split())
        cut = min(max_paths, 40) * 25
        parts.append("the user's latest words in them: " + (words if len(words) <= cut else words[:cut] + " ..."))
    return "\n".join(parts) + "]"
