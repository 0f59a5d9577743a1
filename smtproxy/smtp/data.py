"""Where a DATA message ends, and what of it may be relayed (the SMTP-smuggling defence).

Only CRLF "." CRLF ends the data (RFC 5321); the stream starts at the beginning of a line,
as if a CRLF came first.  Bare LF (not after CR) and bare CR (not before LF) are never line
ends for that purpose.  They are either refused or normalised to CRLF, and normalising
dot-stuffs any line that starts with "." right after such a newline, and a "." line that
ends in one, so the backend can never find an end-of-data the proxy did not find.

The common chunk (no bare CR/LF, no end-of-data) is handled with a few whole-buffer
`count`/`find` calls; at most four bytes (a trailing CR, "\\r\\n", "\\r\\n." or
"\\r\\n.\\r", or a "." / ".\\r" at the start of a line) are held back between feeds.
"""

from __future__ import annotations

import dataclasses
import enum
import re

_END = b"\r\n.\r\n"
_HOLD_SUFFIXES = (b"\r\n.\r", b"\r\n.", b"\r\n", b"\r")
_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_ANY_NEWLINE = re.compile(rb"\r\n|\r|\n")
_CR_TO_LF = bytes.maketrans(b"\r", b"\n")


class DataError(enum.Enum):
    BARE_LF = "bare-lf"
    BARE_CR = "bare-cr"
    LINE_TOO_LONG = "line-too-long"
    TOO_BIG = "too-big"


@dataclasses.dataclass(frozen=True, slots=True)
class DataScan:
    """What one `feed` produced.

    `forward`: bytes to relay now; once `done` (without error) it ends with the final
    ".\\r\\n".  `rest`: bytes after the end-of-data (pipelined commands).  `error`: set only
    on the feed that found the first error; from then on nothing is forwarded, and the
    scanner only looks for the end-of-data so the caller can answer after it.
    """

    forward: bytes
    done: bool
    rest: bytes
    error: DataError | None


class DataScanner:
    """Scans DATA content fed in arbitrary pieces.

    `bare_newline`: "reject" (first bare LF/CR is an error) or "normalize" (each becomes
    CRLF).  In "reject" mode, the feed that detects an error forwards nothing of itself:
    what went before may have been relayed, so the caller must abort the backend
    connection without a final dot.

    `max_size`: most message bytes as received (the final ".\\r\\n" excluded).  `max_line`:
    most bytes a line may have, its CRLF included (RFC 5321's limit is 1000); counted as
    received, before any normalisation.  0 means unlimited.  When one byte triggers two
    errors, a framing error wins over TOO_BIG.
    """

    def __init__(self, bare_newline: str = "reject", max_size: int = 0, max_line: int = 0) -> None:
        if bare_newline not in ("reject", "normalize"):
            raise ValueError(f"bare_newline must be 'reject' or 'normalize', not {bare_newline!r}")
        if 0 < max_line < 3:
            raise ValueError("max_line must be 0 or leave room for one byte and CRLF")
        self._normalize = bare_newline == "normalize"
        self._max_size = max_size
        self._max_line = max_line
        self._held = b""  # a possible start of the end-of-data, not yet judged
        self._tail = b"\r\n"  # the last two content bytes judged so far (virtual CRLF first)
        self._line_len = 0  # bytes of the current line, terminator excluded
        self._size = 0
        self._error: DataError | None = None
        self._done = False

    @property
    def size(self) -> int:
        """Message bytes received and judged so far (the final ".\\r\\n" excluded)."""
        return self._size

    def feed(self, data: bytes) -> DataScan:
        if self._done:
            return DataScan(b"", True, bytes(data), None)
        buffer = self._held + data if self._held else bytes(data)
        error_before = self._error
        end = self._find_end(buffer)
        if end < 0:
            keep = self._hold_back(buffer)
            content, rest, self._held = buffer[: len(buffer) - keep], b"", buffer[len(buffer) - keep :]
        else:
            content, rest, self._held = buffer[:end], buffer[end + 3 :], b""
        forward = self._content(content)
        if end >= 0:
            self._done = True
            if self._error is None:
                forward += b".\r\n"
        new_error = self._error if self._error is not error_before else None
        return DataScan(forward, self._done, rest, new_error)

    # ------------------------------------------------------------------ framing

    def _find_end(self, buffer: bytes) -> int:
        """Index of the final "." in `buffer`, or -1."""
        if self._tail == b"\r\n" and buffer.startswith(b".\r\n"):
            return 0
        index = buffer.find(_END)
        return index + 2 if index >= 0 else -1

    def _hold_back(self, buffer: bytes) -> int:
        """How many trailing bytes might still start the end-of-data."""
        if self._tail == b"\r\n" and len(buffer) < 3 and b".\r\n".startswith(buffer):
            return len(buffer)
        for suffix in _HOLD_SUFFIXES:
            if buffer.endswith(suffix):
                return len(suffix)
        return 0

    # ------------------------------------------------------------------ content

    def _content(self, content: bytes) -> bytes:
        """Account for bytes known to be message content; return what to relay.

        A trailing CR is always held back, so a CR ending `content` is followed by another
        CR (it is bare), and an LF starting `content` never follows a CR: the edges of
        `content` can be judged as if they were the edges of the stream.
        """
        if not content:
            return b""
        tail, size_before = self._tail, self._size
        self._tail = (tail + content[-2:])[-2:]
        self._size += len(content)
        if self._error is not None:
            return b""
        # Clean (no bare CR/LF) iff every CR and every LF belongs to a CRLF pair, that is
        # iff there are as many CRs and as many LFs as CRLFs (one-byte counts are the
        # cheapest whole-buffer scans; the two-byte count runs only when they agree).
        crs = content.count(b"\r")
        clean = crs == content.count(b"\n") and (crs == 0 or crs == content.count(b"\r\n"))
        self._error = self._first_error(content, clean, size_before)
        if self._error is not None:
            return b""
        if not self._normalize:
            return content
        return self._normalized(content, tail, clean)

    def _first_error(self, content: bytes, clean: bool, size_before: int) -> DataError | None:
        found: list[tuple[int, int, DataError]] = []  # (offset, priority, error)
        lines = content
        if not clean and not self._normalize:
            offset = _BARE.search(content).start()  # type: ignore[union-attr]  # not clean: one exists
            found.append((offset, 0, DataError.BARE_CR if content[offset] == 0x0D else DataError.BARE_LF))
            lines = content[:offset]
        if self._max_line:
            offset = self._long_line(lines, any_newline=self._normalize and not clean)
            if offset is not None:
                found.append((offset, 1, DataError.LINE_TOO_LONG))
        if self._max_size and size_before + len(content) > self._max_size:
            found.append((self._max_size - size_before, 2, DataError.TOO_BIG))
        return min(found)[2] if found else None

    def _long_line(self, content: bytes, *, any_newline: bool) -> int | None:
        """Offset of the byte that makes a line too long, or None (then update the carry)."""
        limit = self._max_line - 1  # this many bytes plus CRLF exceed max_line
        if any_newline:
            return self._long_line_split(content, limit)
        # Clean content: lines end at CRLF.  Jump from line start to the last LF within
        # reach, so a chunk of short lines costs a few memchr calls per `limit` bytes.
        start, carry = 0, self._line_len
        while start < len(content):
            reach = start + limit - carry  # the line must end (CR) before this offset
            if content.find(b"\r", start, reach) < 0:
                if reach <= len(content):
                    return reach - 1
                self._line_len = carry + len(content) - start
                return None
            start, carry = content.rfind(b"\n", start, reach + 1) + 1, 0
        self._line_len = carry
        return None

    def _long_line_split(self, content: bytes, limit: int) -> int | None:
        """The same for normalised content, where any CR or LF ends a line."""
        pieces = content.replace(b"\r\n", b"\n").translate(_CR_TO_LF).split(b"\n")
        head = self._line_len + len(pieces[0])
        if head < limit and max(map(len, pieces)) < limit:
            self._line_len = head if len(pieces) == 1 else len(pieces[-1])
            return None
        start, carry = 0, self._line_len
        for newline in _ANY_NEWLINE.finditer(content):
            if carry + newline.start() - start >= limit:
                break
            start, carry = newline.end(), 0
        return start + limit - carry - 1

    def _normalized(self, content: bytes, tail: bytes, clean: bool) -> bytes:
        """Bare CR/LF → CRLF, dot-stuffing every line that could otherwise end the data."""
        after_bare_newline = tail[1:] in (b"\r", b"\n") and tail != b"\r\n"
        stuff = after_bare_newline and content.startswith(b".")
        if clean:
            return b"." + content if stuff else content
        # Between genuine CRLFs every CR and LF is bare: a normalised line end.
        parts = content.split(b"\r\n")
        for index, part in enumerate(parts):
            if b"\r" not in part and b"\n" not in part:
                continue
            genuine_start = index > 0 or tail == b"\r\n"
            if genuine_start and part[:1] == b"." and part[1:2] in (b"\r", b"\n"):
                part = b"." + part  # "." then a bare newline would read as ".\r\n"
            parts[index] = part.translate(_CR_TO_LF).replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
        content = b"\r\n".join(parts)
        return b"." + content if stuff else content


class ChunkReader:
    """The payload of one BDAT chunk of `size` bytes."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("a chunk size is never negative")
        self._remaining = size

    def feed(self, data: bytes) -> tuple[bytes, bytes, bool]:
        """→ (payload to relay, bytes after the chunk, chunk complete)."""
        payload = bytes(data[: self._remaining])
        self._remaining -= len(payload)
        if self._remaining:
            return payload, b"", False
        return payload, bytes(data[len(payload) :]), True
