"""What may be said of a URL: the same URL without its password."""

from __future__ import annotations


def without_password(url: str) -> str:
    """``url`` with its password left out (``redis://:secret@host`` -> ``redis://@host``), for what
    is said about a store or a ledger: error messages and log lines."""
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    user, _, host = rest.rpartition("@")
    return f"{head}{sep}{user.split(':', 1)[0]}@{host}"
