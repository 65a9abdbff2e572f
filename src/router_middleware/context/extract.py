"""What a history mentions: file paths (agents) and proper names (chats). Shared by the digest and
the replay's retention metric, so both mean the same thing."""

from __future__ import annotations

import re
from collections import Counter

_PATH = re.compile(r"(?<![\w/.-])(?:\.{0,2}/)?(?:[\w.-]+/)+[\w.-]+\.[A-Za-z]\w*")
# A capitalised word preceded by a space that does not follow sentence-ending punctuation.
_NAME = re.compile(r"(?<![.!?:;\"'(][ \t])(?<=[ \t])([A-Z][a-z]{2,})\b")
_STOP = frozenset({
    "The", "This", "That", "And", "But", "You", "Your", "They", "There", "What", "When", "Then", "Yes", "Okay",
    "Are", "Can", "How", "Who", "Why", "Where", "Not", "Now", "Well", "Just", "Let", "All", "Its", "His", "Her",
})
_QUESTION = re.compile(r"[^.!?\n]{8,200}\?")


def paths(text: str) -> list[str]:
    """File paths as written (``/abs/x.py``, ``./x.py``, ``.github/ci.yml``), each once, in order of
    their last mention: the most recent last."""
    found = _PATH.findall(text)
    return list(reversed(dict.fromkeys(reversed(found))))


def names(text: str) -> Counter[str]:
    """Proper names (capitalised words that do not start a sentence) with their counts."""
    return Counter(m for m in _NAME.findall(text) if m not in _STOP)


def questions(text: str) -> list[str]:
    return [q.strip() for q in _QUESTION.findall(text)]
