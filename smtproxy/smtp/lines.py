"""Splitting a client's command stream into lines, with bounded memory."""

from __future__ import annotations


class LineTooLong:
    """Type of the `LINE_TOO_LONG` sentinel."""

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = LineTooLong()


class LineReader:
    """Command lines, each returned with its terminator; a line ends at LF.

    A line may have at most `limit` bytes, terminator included.  A longer one is returned
    as `LINE_TOO_LONG` (once) and its bytes are dropped as they arrive, so the buffer never
    holds more than `limit` bytes of it.  Only `next_line()` judges length: bytes handed
    over with `take_buffer()` (DATA, BDAT payloads) are never cut.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._skipping = False  # inside a too-long line already reported

    def feed(self, data: bytes) -> None:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return
            self._skipping = False
            data = data[end + 1 :]
        self._buffer += data

    def next_line(self, limit: int | None = None) -> bytes | LineTooLong | None:
        """The next line; `limit` replaces the reader's own for this line (a SASL response)."""
        limit = limit or self._limit
        end = self._buffer.find(b"\n", 0, limit)
        if end >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            return line
        if len(self._buffer) < limit:
            return None
        end = self._buffer.find(b"\n", limit)
        if end < 0:
            self._buffer.clear()
            self._skipping = True
        else:
            del self._buffer[: end + 1]
        return LINE_TOO_LONG

    def complete_lines(self, max_lines: int) -> list[bytes]:
        """Up to `max_lines` complete lines already buffered, left in place: what a client
        has pipelined (RFC 2920) beyond the line being handled.  Stops before a too-long line."""
        lines: list[bytes] = []
        start = 0
        while len(lines) < max_lines:
            end = self._buffer.find(b"\n", start, start + self._limit)
            if end < 0:
                break
            lines.append(bytes(self._buffer[start : end + 1]))
            start = end + 1
        return lines

    def take_buffer(self) -> bytes:
        """Remove and return everything buffered; the caller takes over the stream."""
        data = bytes(self._buffer)
        self._buffer.clear()
        self._skipping = False
        return data

    @property
    def buffered(self) -> int:
        return len(self._buffer)
