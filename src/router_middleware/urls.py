"""What may be said of a URL: the same URL without its password."""

from __future__ import annotations

import re

_PASSWORD_PARAMETER = re.compile(r"(?i)([?&](?:password|passwd|pass|pwd)=)[^&#]*")


def without_password(url: str) -> str:
    """``url`` with its password left out (``redis://:secret@host`` -> ``redis://@host``; a
    ``?password=`` parameter, as redis-py and libpq take it, -> ``?password=***``), for what is said
    about a store or a ledger: error messages and log lines."""
    url = _PASSWORD_PARAMETER.sub(r"\1***", url)
    head, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    user, _, host = rest.rpartition("@")
    return f"{head}{sep}{user.split(':', 1)[0]}@{host}"
