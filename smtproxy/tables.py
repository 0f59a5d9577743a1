"""Postfix lookup-table text files (the policy and routes tables): reading, entries, keys.

The format of Postfix's texthash/postmap sources: blank lines and lines starting with `#`
are skipped (a `#` later in a line is data, as in Postfix), a line starting with white
space continues the entry above, and tokens are separated by white space or commas.
Problems are one line naming the file, the line and what is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SEPARATORS = re.compile(r"[\s,]+")


class TableError(Exception):
    """`FILE line N: what is wrong; allowed: ...`; `line_number` is None for problems with
    the whole file (unreadable, not UTF-8)."""

    def __init__(self, path: str | Path, line_number: int | None, message: str) -> None:
        self.path, self.line_number = Path(path), line_number
        where = f"{path} line {line_number}" if line_number is not None else str(path)
        super().__init__(" ".join(f"{where}: {message}".split()))


def read_table(path: str | Path, error: type[TableError] = TableError) -> str:
    """A table file's text; `error` (a TableError) when it cannot be read or is not UTF-8."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise error(path, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_number = raw.count(b"\n", 0, exc.start) + 1
        raise error(path, line_number, f"not UTF-8 text (byte {exc.start}); "
                                       "allowed: UTF-8 (in practice ASCII)") from None


def entries(text: str, path: str | Path, error: type[TableError] = TableError) -> Iterator[list[tuple[int, str]]]:
    """Each entry as (line number, token) pairs; continuation lines keep their own numbers."""
    entry: list[tuple[int, str]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        tokens = [(line_number, token) for token in _SEPARATORS.split(stripped) if token]
        if line[0].isspace():
            if not entry:
                raise error(path, line_number, f'"{stripped}" continues no entry; allowed: '
                                                "a key at the start of the line")
            entry.extend(tokens)
            continue
        if entry:
            yield entry
        entry = tokens
    if entry:
        yield entry


def is_domain(text: str) -> bool:
    """A lower-case DNS name; "192.0.2.1" has the label syntax but is an address."""
    return len(text) <= 253 and bool(_DOMAIN.fullmatch(text)) and not text.rsplit(".", 1)[-1].isdigit()
