"""Reading a user's file (config, session, judged CSV, fitted router) with an error that names it.

Every reader raises its own error class with the same wording: ``<path>: cannot read <what>
(<reason>)``, ``<path>: <what> is not UTF-8 text (byte 0xe9 at offset 12); save it as UTF-8``, and
for JSON ``<path>: <what> is not valid JSON (<where>)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); save it as UTF-8"


def read_text(path: str | Path, error: type[Exception], what: str = "") -> str:
    """The text of ``path`` as UTF-8 (line endings as written); ``what`` names the file's role."""
    label = f"{what} " if what else ""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            return handle.read()
    except UnicodeDecodeError as exc:
        raise error(f"{path}: {label}{'is ' if what else ''}{not_utf8(exc)}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {label}({exc.strerror})") from None


def read_json(path: str | Path, error: type[Exception], what: str = "") -> Any:
    """:func:`read_text`, parsed as JSON."""
    text = read_text(path, error, what)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise error(f"{path}: {what + ' is ' if what else ''}not valid JSON ({exc})") from None
