"""Command lines, MAIL/RCPT arguments, BDAT arguments."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtproxy.smtp import Command, PeerProtocolError, parse_bdat, parse_command, parse_mail_from, parse_rcpt_to


def refusal(call, *args):
    with pytest.raises(PeerProtocolError) as info:
        call(*args)
    return info.value.reply


@pytest.mark.parametrize(
    ("line", "command"),
    [
        (b"MAIL FROM:<a>\r\n", Command("MAIL", "FROM:<a>", b"MAIL FROM:<a>\r\n")),
        (b"ehlo client.example\n", Command("EHLO", "client.example", b"ehlo client.example\r\n")),
        (b"QUIT", Command("QUIT", "", b"QUIT\r\n")),
        (b"NOOP  two spaces \r\n", Command("NOOP", " two spaces ", b"NOOP  two spaces \r\n")),
        (b"MAIL\tFROM:<a>\r\n", Command("MAIL", "FROM:<a>", b"MAIL\tFROM:<a>\r\n")),
        (b"x-Custom \xff\r\n", Command("X-CUSTOM", "\udcff", b"x-Custom \xff\r\n")),
    ],
)
def test_parse_command(line, command):
    assert parse_command(line) == command


def test_verb_upper_casing_is_ascii_only():
    # "ſ" (U+017F) upper-cases to "S" in Unicode; the backend would not see STARTTLS.
    assert parse_command("ſtarttls\r\n".encode()).verb != "STARTTLS"


@pytest.mark.parametrize(
    "line", [b"\r\n", b"\n", b"", b"NO\x00OP\r\n", b"NOOP\rMAIL FROM:<>\r\n", b" NOOP\r\n", b"A\nB\r\n",
             # Postfix's smtpd would read XCLIENT / DATA here (it splits at any isspace())
             b"XCLIENT\x0bADDR=203.0.113.9\r\n", b"DATA\x0c\r\n", b"MAIL FROM:<a>\x1b\r\n"]
)
def test_bad_command_lines(line):
    reply = refusal(parse_command, line)
    assert (reply.code, reply.text) == (500, "5.5.2 Error: bad syntax")


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("FROM:<a@example.com>", ("a@example.com", {})),
        ("from:<>", ("", {})),
        ("FROM: <a@example.com>", ("a@example.com", {})),
        ("FROM:<a@x> BODY=8BITMIME SMTPUTF8", ("a@x", {"BODY": "8BITMIME", "SMTPUTF8": None})),
        ("FROM:<a@x> size=100 ret=HDRS", ("a@x", {"SIZE": "100", "RET": "HDRS"})),
        ('FROM:<"a> b"@x>', ('"a> b"@x', {})),
        ('FROM:<"a\\"> b"@x>', ('"a\\"> b"@x', {})),
        ("FROM:<@relay:a@x>", ("@relay:a@x", {})),
        ("FROM:<a@x>  AUTH=<>", ("a@x", {"AUTH": "<>"})),
        ("FROM:<ü@例え.jp> SMTPUTF8", ("ü@例え.jp", {"SMTPUTF8": None})),
        ("FROM:a@x", ("a@x", {})),  # no angle brackets: taken as Postfix takes it
        ("FROM: a@x SIZE=100", ("a@x", {"SIZE": "100"})),
    ],
)
def test_parse_mail_from(arg, expected):
    assert parse_mail_from(arg) == expected


@pytest.mark.parametrize(
    "arg",
    ["", "FROM:", "FROM:a b@x", "FROM:a@x>", "FROM:a<b@x", "TO:<a@x>", "FROM <a@x>", "FROM:<a@x", "FROM:<a b@x>", "FROM:<a@x>BODY=7BIT",
     "FROM:<a@x> =x", "FROM:<a@x> BODY=", "FROM:<a@x> -X", "FROM:<a@x> SIZE=1 SIZE=2", "FROM:<<a@x>>",
     'FROM:<"unterminated@x>'],
)
def test_parse_mail_from_refuses(arg):
    reply = refusal(parse_mail_from, arg)
    assert (reply.code, reply.text) == (501, "5.5.4 Syntax: MAIL FROM:<address>")


def test_parse_rcpt_to():
    assert parse_rcpt_to("TO:<b@example.com> NOTIFY=NEVER") == ("b@example.com", {"NOTIFY": "NEVER"})
    assert parse_rcpt_to("to: <postmaster>") == ("postmaster", {})
    assert parse_rcpt_to("TO:b@example.com NOTIFY=NEVER") == ("b@example.com", {"NOTIFY": "NEVER"})


@pytest.mark.parametrize("arg", ["TO:<>", "FROM:<a@x>", "TO:", "TO:<b@x>x"])
def test_parse_rcpt_to_refuses(arg):
    reply = refusal(parse_rcpt_to, arg)
    assert (reply.code, reply.text) == (501, "5.5.4 Syntax: RCPT TO:<address>")


@pytest.mark.parametrize(
    ("arg", "expected"),
    [("1000 LAST", (1000, True)), ("0", (0, False)), ("12 last", (12, True)), ("5  LAST ", (5, True))],
)
def test_parse_bdat(arg, expected):
    assert parse_bdat(arg) == expected


@pytest.mark.parametrize("arg", ["", "LAST", "-1", "1 2", "1 FIRST", "١٢", "1e3", "9" * 21])
def test_parse_bdat_refuses(arg):
    reply = refusal(parse_bdat, arg)
    assert (reply.code, reply.enhanced) == (501, "5.5.4")


@settings(max_examples=300, deadline=None)
@given(line=st.binary(max_size=80))
def test_arbitrary_lines_only_raise_peer_protocol_error(line):
    try:
        command = parse_command(line)
    except PeerProtocolError:
        return
    assert command.raw.endswith(b"\r\n") and command.raw.count(b"\n") == 1 and b"\r" not in command.raw[:-2]
    assert not any(byte < 0x20 and byte != 0x09 for byte in command.raw[:-2])
    for parse in (parse_mail_from, parse_rcpt_to, parse_bdat):
        try:
            parse(command.arg)
        except PeerProtocolError:
            pass


@settings(max_examples=300, deadline=None)
@given(arg=st.text(max_size=60))
def test_arbitrary_arguments_only_raise_peer_protocol_error(arg):
    for parse in (parse_mail_from, parse_rcpt_to, parse_bdat):
        try:
            parse(arg)
        except PeerProtocolError:
            pass
