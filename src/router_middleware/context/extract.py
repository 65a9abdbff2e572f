"""What a history mentions: files (agents: :func:`files`) and proper names (chats). Shared by the digest and
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
# of a source or project file's, so that ``os.path``, ``e.g.`` or ``example.com`` are none; not called
# (``resp.json()``) nor followed by more of a dotted name (``process.env.HOME``). Extensions that
# name attributes as often (``self.lock``, ``django.conf``) count for the files that have them only.
_EXTENSIONS = ("py|pyi|ipynb|js|mjs|cjs|jsx|ts|tsx|vue|svelte|json|jsonc|toml|ya?ml|ini|cfg|md|mdx|rst|txt"
               "|html?|css|scss|sass|less|sh|bash|zsh|ps1|bat|rs|go|mod|java|kt|kts|gradle|scala|swift|c|h|cc|cpp"
               "|hpp|cs|fs|rb|erb|php|lua|pl|r|sql|xml|csv|tsv|proto|graphql|tf|dockerfile|mk|cmake|ex|exs|dart"
               "|zig|nix|sol|tex|gemspec")
_NAMED = r"(?:poetry|Cargo|yarn|Gemfile|uv|flake|composer|Pipfile)\.lock|nginx\.conf"
_FILE = re.compile(rf"{_PATH.pattern}|(?<![\w/.-])(?:{_NAMED}|\w[\w-]*(?:\.[\w-]+)*\.(?:{_EXTENSIONS}))"
                   r"(?![\w(-])(?!\.\w)")


def files(text: str) -> list[str]:
    """The files ``text`` names: paths as written (``/abs/x.py``, ``./x.py``, ``.github/ci.yml``) and
    names alone (``README.md``, ``pyproject.toml``: a repository's top level, or the directory a
    command ran in) known by their extension, each once, in order of their last mention: the most
    recent last."""
    return list(reversed(dict.fromkeys(reversed(_FILE.findall(text)))))


def names(text: str) -> Counter[str]:
    """Proper names (capitalised words that do not start a sentence) with their counts."""
    return Counter(m for m in _NAME.findall(text) if m not in _STOP)


def questions(text: str) -> list[str]:
    return [q.strip() for q in _QUESTION.findall(text)]
