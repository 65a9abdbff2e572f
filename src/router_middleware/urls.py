"""What may be said of a URL: the same URL without its password."""

from __future__ import annotations

import difflib
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


def sqlite_problem(url: str) -> str | None:
    """What is wrong with a ``sqlite:`` URL its reader would misread, ``None`` when nothing: fewer
    slashes before the path than the reader cuts off (``sqlite:x.db`` opened the file ``db``; a store
    and a ledger read ``sqlite://x.db`` as ``x.db``), or no path (a private temporary database per
    connection, shared with no one)."""
    rest = url[len("sqlite:"):]
    path = rest[3:] if rest.startswith("///") else rest[2:] if rest.startswith("//") else None
    if path:
        return None
    given = rest.removeprefix("//") if path is None else ""
    return ("a SQLite URL is sqlite:///PATH (a relative path) or sqlite:////ABSOLUTE/PATH"
            + (f"; did you mean 'sqlite:///{given}'?" if given else ": this one names no file"))


LEDGER_SCHEMES = ("sqlite", "postgresql", "postgres")
_LEDGER_FORMS = "use a file path, sqlite:///path.db or postgresql://..."


def ledger_url_problem(url: str) -> str | None:
    """What is wrong with ledger ``url``, ``None`` when nothing: a scheme no ledger opens, a SQLite URL
    its reader would misread (:func:`sqlite_problem`), or a scheme missing its ``//`` (read as a file
    path: ``sqlite:x.db`` was a file of that name). The URL is not quoted: it may hold a password."""
    scheme, slashes, _ = url.partition("://")
    start = url.partition(":")[0]
    if not slashes and ":" in url and start.isalpha() \
            and difflib.get_close_matches(start.lower(), LEDGER_SCHEMES, n=1):
        return f"{start + ':'!r} with no '//' after it is read as a file path's start ({_LEDGER_FORMS})"
    if slashes and scheme not in LEDGER_SCHEMES:
        close = difflib.get_close_matches(scheme.lower(), LEDGER_SCHEMES, n=1)
        return f"unsupported scheme {scheme!r} ({_LEDGER_FORMS})" + (f"; did you mean {close[0]!r}?" if close else "")
    return sqlite_problem(url) if scheme == "sqlite" else None
