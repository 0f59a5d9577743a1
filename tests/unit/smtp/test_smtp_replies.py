"""Reply values and ReplyParser."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtproxy.smtp import PeerProtocolError, Reply, ReplyParser


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


def parse_all(pieces: list[bytes], max_line: int = 2048) -> tuple[list[Reply], PeerProtocolError | None]:
    parser = ReplyParser(max_line)
    replies: list[Reply] = []
    for piece in pieces:
        parser.feed(piece)
        try:
            while (reply := parser.next_reply()) is not None:
                replies.append(reply)
        except PeerProtocolError as exc:
            return replies, exc
    return replies, None


def test_of_with_enhanced_code():
    reply = Reply.of(421, "4.3.0", "backend unavailable")
    assert reply == Reply(421, ("4.3.0 backend unavailable",))
    assert reply.enhanced == "4.3.0"
    assert reply.serialize() == b"421 4.3.0 backend unavailable\r\n"


def test_of_multi_line_prefixes_every_line():
    reply = Reply.of(550, "5.7.1", "first\nsecond")
    assert reply.lines == ("5.7.1 first", "5.7.1 second")
    assert reply.serialize() == b"550-5.7.1 first\r\n550 5.7.1 second\r\n"
    assert reply.text == "5.7.1 first\n5.7.1 second"


def test_of_without_enhanced_code_and_empty_text():
    assert Reply.of(250, None, "a\nb").serialize() == b"250-a\r\n250 b\r\n"
    assert Reply.of(250, None, "").serialize() == b"250\r\n"
    assert Reply.of(250, "2.0.0", "").lines == ("2.0.0",)


@pytest.mark.parametrize(
    ("code", "flags"),
    [(250, (True, False, False, False)), (354, (False, True, False, False)),
     (451, (False, False, True, False)), (554, (False, False, False, True))],
)
def test_classes(code, flags):
    reply = Reply(code, ("x",))
    assert (reply.is_positive_completion, reply.is_intermediate, reply.is_transient, reply.is_permanent) == flags


@pytest.mark.parametrize(
    ("line", "enhanced"),
    [("2.1.0 Ok", "2.1.0"), ("5.7.1", "5.7.1"), ("Ok", None), ("2.1.0x", None), ("9.1.1 x", None)],
)
def test_enhanced(line, enhanced):
    assert Reply(250, (line,)).enhanced == enhanced


@pytest.mark.parametrize(
    ("code", "lines"),
    [(199, ("x",)), (600, ("x",)), (250, ()), (250, ("a\r\nMAIL",)), (250, ("a\n",))],
)
def test_invalid_replies_are_refused(code, lines):
    with pytest.raises(ValueError):
        Reply(code, lines)


def test_error_carries_the_reply():
    error = PeerProtocolError(Reply.of(500, "5.5.2", "Error: bad syntax"))
    assert str(error) == "5.5.2 Error: bad syntax"
    assert error.reply.code == 500


def test_parser_multi_line_and_bare_lf():
    replies, error = parse_all([b"250-mx Hello\r\n250-PIPELINING\n250 SIZE 100\r\n220 ok\r\n"])
    assert error is None
    assert replies == [Reply(250, ("mx Hello", "PIPELINING", "SIZE 100")), Reply(220, ("ok",))]


def test_parser_waits_for_the_final_line():
    parser = ReplyParser()
    parser.feed(b"250-a\r\n250-b\r\n")
    assert parser.next_reply() is None
    parser.feed(b"250")
    assert parser.next_reply() is None
    parser.feed(b"\r\n")
    assert parser.next_reply() == Reply(250, ("a", "b", ""))


def test_take_buffer_returns_everything_not_yet_returned():
    parser = ReplyParser()
    parser.feed(b"220 go ahead\r\n250-injected\r\n250 x")
    assert parser.next_reply() == Reply(220, ("go ahead",))
    assert parser.next_reply() is None
    assert parser.take_buffer() == b"250-injected\r\n250 x"
    assert parser.next_reply() is None
    parser.feed(b"250 fresh\r\n")
    assert parser.next_reply() == Reply(250, ("fresh",))


@pytest.mark.parametrize(
    "data",
    [b"hello\r\n", b"25 x\r\n", b"250x\r\n", b"2500 x\r\n", b"199 x\r\n", b"600 x\r\n", b"100 x\r\n",
     b"250-a\r\n251 b\r\n", b"250 a\rb\r\n", b"\r\n", b"250 a\r\r\n", b"\xd9\xa2\xd9\xa5\xd9\xa0 x\r\n"],
)
def test_parser_refuses_malformed_lines(data):
    replies, error = parse_all([data])
    assert replies == [] and error is not None
    assert error.reply.code == 421 and error.reply.enhanced == "4.3.0"


def test_parser_errors_are_sticky():
    parser = ReplyParser()
    parser.feed(b"250 ok\r\nbogus\r\n")
    assert parser.next_reply() == Reply(250, ("ok",))
    for _ in range(2):
        with pytest.raises(PeerProtocolError):
            parser.next_reply()


def test_parser_line_limit_includes_the_terminator():
    assert parse_all([b"250 " + b"x" * 4 + b"\r\n"], max_line=10) == ([Reply(250, ("xxxx",))], None)
    assert parse_all([b"250 " + b"x" * 5 + b"\r\n"], max_line=10)[1] is not None
    # Without any LF, the parser refuses as soon as the limit is reached.
    assert parse_all([b"250 " + b"x" * 6], max_line=10)[1] is not None
    assert parse_all([b"250 " + b"x" * 5], max_line=10) == ([], None)


def test_non_utf8_text_survives_byte_for_byte():
    data = b"220 caf\xe9 \xff\xfe ESMTP\r\n"
    replies, _ = parse_all([data])
    assert replies[0].serialize() == data


def test_utf8_text_reads_naturally():
    replies, _ = parse_all(["250 Grüße\r\n".encode()])
    assert replies[0].lines == ("Grüße",)


# ---------------------------------------------------------------------------- properties

line_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20)
replies = st.builds(Reply, st.integers(200, 599), st.lists(line_text, min_size=1, max_size=4).map(tuple))


@settings(max_examples=200, deadline=None)
@given(reply=replies)
def test_serialize_then_parse_round_trips(reply):
    assert parse_all([reply.serialize()]) == ([reply], None)


@settings(max_examples=200, deadline=None)
@given(
    stream=st.lists(replies, max_size=5),
    junk=st.binary(max_size=30),
    cuts=st.lists(st.integers(0, 500), max_size=10),
)
def test_any_segmentation_equals_one_feed(stream, junk, cuts):
    data = b"".join(r.serialize() for r in stream) + junk
    whole_replies, whole_error = parse_all([data], max_line=64)
    split_replies, split_error = parse_all(split(data, cuts), max_line=64)
    assert split_replies == whole_replies
    assert (split_error is None) == (whole_error is None)
    if whole_error is not None:
        assert split_error.reply == whole_error.reply


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=8))
def test_arbitrary_bytes_only_raise_peer_protocol_error(data, cuts):
    parse_all(split(data, cuts), max_line=40)


def test_a_reply_without_end_is_refused_after_max_reply_lines():
    from smtproxy.smtp.replies import MAX_REPLY_LINES

    parser = ReplyParser()
    parser.feed(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 last\r\n")
    reply = parser.next_reply()
    assert reply is not None and len(reply.lines) == MAX_REPLY_LINES
    parser.feed(b"250-x\r\n" * (MAX_REPLY_LINES + 1))
    with pytest.raises(PeerProtocolError) as info:
        parser.next_reply()
    assert "reply too long" in info.value.reply.text
