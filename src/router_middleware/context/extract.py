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


# A file at the top of a repository, named alone (``README.md``, ``pyproject.toml``): its extension one
# of a source or project file's, so that ``os.path``, ``e.g.`` or ``example.com`` are none.
_EXTENSIONS = ("py|pyi|ipynb|js|mjs|cjs|jsx|ts|tsx|vue|svelte|json|jsonc|toml|ya?ml|ini|cfg|conf|lock|md|mdx|rst|txt"
               "|html?|css|scss|sass|less|sh|bash|zsh|ps1|bat|rs|go|mod|java|kt|kts|gradle|scala|swift|c|h|cc|cpp"
               "|hpp|cs|fs|rb|erb|php|lua|pl|r|sql|xml|csv|tsv|proto|graphql|tf|env|dockerfile|mk|cmake|ex|exs|dart"
               "|zig|nix|sol|tex|gemspec")
_FILE = re.compile(rf"{_PATH.pattern}|(?<![\w/.-])\w[\w-]*(?:\.[\w-]+)*\.(?:{_EXTENSIONS})(?![\w-])(?!\.\w)")


def paths(text: str) -> list[str]:
    """File paths as written (``/abs/x.py``, ``./x.py``, ``.github/ci.yml``), each once, in order of
    their last mention: the most recent last."""
    return _last_first(_PATH.findall(text))


def files(text: str) -> list[str]:
    """As :func:`paths`, with the files named alone (``README.md``, ``pyproject.toml``: a repository's
    top level, or the directory a command ran in) among them, by their extension."""
    return _last_first(_FILE.findall(text))


def _last_first(found: list[str]) -> list[str]:
    return list(reversed(dict.fromkeys(reversed(found))))


def names(text: str) -> Counter[str]:
    """Proper names (capitalised words that do not start a sentence) with their counts."""
    return Counter(m for m in _NAME.findall(text) if m not in _STOP)


def questions(text: str) -> list[str]:
    return [q.strip() for q in _QUESTION.findall(text)]
