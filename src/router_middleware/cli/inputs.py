"""Command-line inputs checked before any work: file lists, times and output paths, each refused with
one line that names the file or option."""

from __future__ import annotations

import glob
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from ..errors import RouterMiddlewareError


def expand_paths(patterns: Sequence[str], suffix: str, what: str) -> list[str]:
    """Files named by ``patterns``: a file, a folder (its ``*<suffix>`` files) or a glob, quoted or not."""
    paths: list[str] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(str(p) for p in path.glob(f"*{suffix}"))
            if not found:
                raise RouterMiddlewareError(f"{pattern}: a folder with no {suffix} files")
            paths.extend(found)
        elif any(ch in pattern for ch in "*?["):
            found = sorted(glob.glob(pattern))
            if not found:
                raise RouterMiddlewareError(f"{pattern}: no {what} matched this pattern")
            paths.extend(found)
        elif not path.exists():
            raise RouterMiddlewareError(f"{pattern}: no such file or folder")
        else:
            paths.append(pattern)
    if not paths:
        raise RouterMiddlewareError(f"no {what} given")
    return paths


def time_option(option: str, text: str | None) -> float | None:
    """``--since``/``--until``: a date, a date and time (UTC unless it says otherwise) or epoch seconds."""
    from ..ledger import parse_time

    try:
        return parse_time(text)
    except ValueError:
        example = datetime.now().strftime("%Y-%m-%d")
        raise RouterMiddlewareError(f"{option} {text!r}: expected a date ({example}), a time "
                                    f"({example}T12:00, UTC) or epoch seconds") from None


def output_file(option: str, path: str) -> Path:
    """A file a command will write: its folder must exist, and it must not be a folder itself."""
    target = Path(path)
    if target.is_dir():
        raise RouterMiddlewareError(f"{option} {path}: is a folder; give a file name")
    if not target.parent.is_dir():
        raise RouterMiddlewareError(f"{option} {path}: folder {str(target.parent)!r} does not exist")
    return target
