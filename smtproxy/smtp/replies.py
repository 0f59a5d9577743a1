"""SMTP replies: the `Reply` value and an incremental parser for a server's reply stream.

Reply text is decoded as UTF-8 with errors="surrogateescape": any byte sequence survives
parse-then-serialise unchanged, so the proxy relays a peer's (possibly Latin-1) text byte
for byte, and valid UTF-8 text reads naturally.
"""

from __future__ import annotations

import dataclasses
import re

from smtproxy.smtp.errors import PeerProtocolError

_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |$)")
_CR, _SPACE, _SEPARATORS = 13, 32, b" -"
# "ddd-text" lines, then a "ddd" or "ddd text" line; each ends in CRLF or a bare LF
_WHOLE_REPLY = re.compile(rb"(?:[0-9]{3}-[^\r\n]*\r?\n)*[0-9]{3}(?: [^\r\n]*)?\r?\n")
# Lines in one reply: an EHLO reply has about 20; a peer sending "250-" lines without end
# must not hold the proxy's memory (DESIGN.md invariant 7).
MAX_REPLY_LINES = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """One (possibly multi-line) reply; `lines` hold the text after "ddd-" / "ddd "."""

    code: int
    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} outside 200..599")
        if not self.lines:
            raise ValueError("a reply has at least one line")
        if any("\r" in line or "\n" in line for line in self.lines):
            raise ValueError("reply lines must not contain CR or LF")

    @classmethod
    def of(cls, code: int, enhanced: str | None, text: str) -> Reply:
        """`Reply.of(421, "4.3.0", "a\\nb")`: each line of `text` gets the enhanced code."""
        lines = text.split("\n")
        if enhanced is not None:
            lines = [f"{enhanced} {line}" if line else enhanced for line in lines]
        return cls(code, tuple(lines))

    def serialize(self) -> bytes:
        out = [f"{self.code}-{line}\r\n" for line in self.lines[:-1]]
        last = self.lines[-1]
        out.append(f"{self.code} {last}\r\n" if last else f"{self.code}\r\n")
        return "".join(out).encode("utf-8", "surrogateescape")

    @property
    def enhanced(self) -> str | None:
        match = _ENHANCED.match(self.lines[0])
        return match.group() if match else None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def is_positive_completion(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600


def _bad_reply(why: str) -> PeerProtocolError:
    return PeerProtocolError(Reply.of(421, "4.3.0", f"Error: {why}"))


class ReplyParser:
    """Turns a server's byte stream into `Reply` values.

    Lines end at LF (CRLF preferred, bare LF tolerated).  `max_line` counts a line's bytes
    including its terminator.  A malformed line raises `PeerProtocolError` from
    `next_reply()` and stays buffered, so asking again raises again.
    """

    def __init__(self, max_line: int = 2048) -> None:
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already parsed into `_lines`
        self._code = 0
        self._lines: list[str] = []

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def unread(self) -> int:
        """Bytes received and not yet returned as part of a reply."""
        return len(self._buffer)

    def take_buffer(self) -> bytes:
        """Remove and return every byte not yet returned as part of a reply."""
        data = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        self._lines = []
        return data

    def next_reply(self) -> Reply | None:
        if not self._scanned:
            reply = self._whole_reply()
            if reply is not None:
                return reply
        buffer = self._buffer
        while True:
            start = self._scanned
            end = buffer.find(b"\n", start, start + self._max_line)
            if end < 0:
                if len(buffer) - start >= self._max_line:
                    raise _bad_reply("reply line too long")
                return None
            stop = end - 1 if end > start and buffer[end - 1] == _CR else end
            code, final, text = self._parse_line(bytes(buffer[start:stop]))
            if len(self._lines) >= MAX_REPLY_LINES:
                raise _bad_reply("reply too long")
            self._scanned = end + 1
            self._code = code
            self._lines.append(text)
            if final:
                reply = Reply(code, tuple(self._lines))
                del buffer[: self._scanned]
                self._scanned = 0
                self._lines = []
                return reply

    def _whole_reply(self) -> Reply | None:
        """A well-formed reply that arrived whole (the common case: a 12-line EHLO reply
        in one read) in one regular-expression match and one decode; None leaves it to
        the line-by-line parser, which also words what is wrong."""
        match = _WHOLE_REPLY.match(self._buffer)
        if match is None or match.end() > self._max_line:  # short enough: every line is
            return None
        lines = self._buffer[: match.end()].decode("utf-8", "surrogateescape").split("\n")
        lines.pop()  # after the last LF
        code = lines[0][:3]
        if len(lines) > 1 and any(not line.startswith(code) for line in lines):
            return None
        if not 200 <= int(code) <= 599:
            return None
        del self._buffer[: match.end()]
        return Reply(int(code), tuple(line[4:].rstrip("\r") for line in lines))

    def _parse_line(self, line: bytes) -> tuple[int, bool, str]:
        """`line` without its line ending: "ddd", or "ddd" then " " or "-" then text."""
        digits = line[:3]
        if len(digits) < 3 or not digits.isdigit() or (len(line) > 3 and line[3] not in _SEPARATORS) or b"\r" in line:
            raise _bad_reply("malformed reply line")
        code = int(digits)
        if not 200 <= code <= 599:
            raise _bad_reply("reply code out of range")
        if self._lines and code != self._code:
            raise _bad_reply("reply code changed within a multi-line reply")
        return code, len(line) == 3 or line[3] == _SPACE, line[4:].decode("utf-8", "surrogateescape")
