"""Client commands: the line, the MAIL/RCPT argument grammar and BDAT's argument."""

from __future__ import annotations

import dataclasses
import re

from smtproxy.smtp.errors import PeerProtocolError
from smtproxy.smtp.replies import Reply

BAD_SYNTAX = Reply.of(500, "5.5.2", "Error: bad syntax")
MAIL_SYNTAX = Reply.of(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply.of(501, "5.5.4", "Syntax: RCPT TO:<address>")
BDAT_SYNTAX = Reply.of(501, "5.5.4", "Syntax: BDAT count [LAST]")

# SP and HTAB both end the verb: MTAs split on either, and the proxy must see the same verb.
_VERB_END = re.compile(rb"[ \t]")
# Every other C0 control: Postfix's smtpd also splits at VT and FF (isspace()), so
# "XCLIENT<VT>ADDR=..." would be an unknown verb here and XCLIENT there; a stray CR or LF
# could end the line early at the backend; NUL ends a C string.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f]")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([^\x00-\x20=\x7f]+))?")
_BDAT = re.compile(r" *([0-9]{1,20})(?: +(LAST))? *", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper-cased (ASCII only)
    arg: str  # after the separator, UTF-8 with surrogateescape
    raw: bytes  # the line as received, ending in CRLF


def parse_command(line: bytes) -> Command:
    """Parse one command line (CRLF, bare LF or no terminator).

    Empty lines and lines with a control character other than HTAB are refused: the
    backend must never split a forwarded command differently from the proxy.
    """
    if line.endswith(b"\r\n"):
        body = line[:-2]
    elif line.endswith(b"\n"):
        body = line[:-1]
    else:
        body = line
    if not body or _CONTROL.search(body):
        raise PeerProtocolError(BAD_SYNTAX)
    verb, *rest = _VERB_END.split(body, maxsplit=1)
    if not verb:
        raise PeerProtocolError(BAD_SYNTAX)
    arg = rest[0] if rest else b""
    return Command(
        verb.upper().decode("utf-8", "surrogateescape"),
        arg.decode("utf-8", "surrogateescape"),
        body + b"\r\n",
    )


def parse_mail_from(arg: str) -> tuple[str, dict[str, str | None]]:
    """`FROM:<path> [params]` → (reverse-path, params); "" is the null sender."""
    return _parse_path_arg(arg, "FROM:", MAIL_SYNTAX, null_allowed=True)


def parse_rcpt_to(arg: str) -> tuple[str, dict[str, str | None]]:
    """`TO:<path> [params]` → (forward-path, params); the null path is refused."""
    return _parse_path_arg(arg, "TO:", RCPT_SYNTAX, null_allowed=False)


def parse_bdat(arg: str) -> tuple[int, bool]:
    """`"1000 LAST"` → (1000, True)."""
    match = _BDAT.fullmatch(arg)
    if match is None:
        raise PeerProtocolError(BDAT_SYNTAX)
    return int(match.group(1)), match.group(2) is not None


def _parse_path_arg(
    arg: str, prefix: str, syntax: Reply, *, null_allowed: bool
) -> tuple[str, dict[str, str | None]]:
    if arg[: len(prefix)].upper() != prefix:
        raise PeerProtocolError(syntax)
    # Like Postfix, tolerate spaces between the colon and the path; nothing else.
    path, after = _split_path(arg[len(prefix) :].lstrip(" "), syntax)
    if not path and not null_allowed:
        raise PeerProtocolError(syntax)
    if after and not after.startswith(" "):
        raise PeerProtocolError(syntax)
    params: dict[str, str | None] = {}
    for word in after.split(" "):
        if not word:
            continue
        match = _PARAM.fullmatch(word)
        keyword = match.group(1).upper() if match else ""
        if not keyword or keyword in params:
            # A repeated keyword is refused: the proxy and the backend could read different values.
            raise PeerProtocolError(syntax)
        params[keyword] = match.group(2)
    return path, params


def _split_path(text: str, syntax: Reply) -> tuple[str, str]:
    """`<path>rest` → (path, rest); `>` and spaces may appear inside a quoted string.
    Without angle brackets the path is one word (`MAIL FROM:a@example.com`, from printers
    and scripts): Postfix takes it by default (strict_rfc821_envelopes = no), and the
    backend or remote, not the proxy, should be the one to refuse it."""
    if not text.startswith("<"):
        path, space, rest = text.partition(" ")
        if not path or "<" in path or ">" in path:
            raise PeerProtocolError(syntax)
        return path, space + rest
    quoted = escaped = False
    for index in range(1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif quoted:
            continue
        elif char == ">":
            return text[1:index], text[index + 1 :]
        elif char in " <":
            break
    raise PeerProtocolError(syntax)
