"""LineReader: lines with terminators, bounded memory for over-long lines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtproxy.smtp import LINE_TOO_LONG, LineReader, LineTooLong


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


def read_all(pieces: list[bytes], limit: int) -> tuple[list[bytes | LineTooLong], bytes]:
    reader = LineReader(limit)
    lines: list[bytes | LineTooLong] = []
    for piece in pieces:
        reader.feed(piece)
        while (line := reader.next_line()) is not None:
            lines.append(line)
        assert reader.buffered < limit, "a partial line never exceeds the limit"
    return lines, reader.take_buffer()


def test_lines_keep_their_terminator():
    assert read_all([b"EHLO a\r\nNOOP\nQU", b"IT\r\n"], 100) == ([b"EHLO a\r\n", b"NOOP\n", b"QUIT\r\n"], b"")


def test_limit_counts_the_terminator():
    assert read_all([b"abc\r\n"], 5) == ([b"abc\r\n"], b"")
    assert read_all([b"abcd\r\nok\r\n"], 5) == ([LINE_TOO_LONG, b"ok\r\n"], b"")


def test_long_line_is_reported_once_and_dropped_as_it_arrives():
    reader = LineReader(8)
    reader.feed(b"x" * 20)
    assert reader.next_line() is LINE_TOO_LONG
    assert reader.buffered == 0
    reader.feed(b"y" * 10_000)
    assert reader.buffered == 0
    assert reader.next_line() is None
    reader.feed(b"zz\r\nNOOP\r\n")
    assert reader.next_line() == b"NOOP\r\n"
    assert reader.next_line() is None


def test_take_buffer_hands_over_raw_bytes_uncut():
    reader = LineReader(8)
    reader.feed(b"BDAT 30 LAST\r\n" + b"p" * 30)
    assert reader.next_line() is LINE_TOO_LONG  # the caller's limit is 8 here
    reader = LineReader(64)
    reader.feed(b"BDAT 30 LAST\r\n" + b"p" * 30)
    assert reader.next_line() == b"BDAT 30 LAST\r\n"
    assert reader.buffered == 30
    assert reader.take_buffer() == b"p" * 30
    assert reader.buffered == 0


def test_take_buffer_ends_skipping():
    reader = LineReader(6)
    reader.feed(b"far too long")
    assert reader.next_line() is LINE_TOO_LONG
    assert reader.take_buffer() == b""
    reader.feed(b"EHLO\n")
    assert reader.next_line() == b"EHLO\n"


def test_sentinel_repr():
    assert repr(LINE_TOO_LONG) == "LINE_TOO_LONG"


@settings(max_examples=300, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b"bcd", b"\r", b"\n", b"\r\n", b"x" * 9]), max_size=30).map(b"".join),
    cuts=st.lists(st.integers(0, 300), max_size=10),
    limit=st.integers(1, 12),
)
def test_any_segmentation_equals_one_feed(data, cuts, limit):
    assert read_all(split(data, cuts), limit) == read_all([data], limit)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), limit=st.integers(1, 20))
def test_lines_are_the_input_less_too_long_ones(data, limit):
    lines, left = read_all([data], limit)
    *complete, tail = data.split(b"\n")
    expected = [part + b"\n" if len(part) < limit else LINE_TOO_LONG for part in complete]
    if len(tail) >= limit:  # already known to be too long, though unfinished
        expected.append(LINE_TOO_LONG)
    assert lines == expected
    assert left == (tail if len(tail) < limit else b"")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), limit=st.integers(1, 20), max_lines=st.integers(0, 12))
def test_complete_lines_are_the_next_lines_up_to_a_too_long_one_and_stay_buffered(data, limit, max_lines):
    reader = LineReader(limit)
    reader.feed(data)
    peeked = reader.complete_lines(max_lines)
    assert reader.buffered == len(data)
    following = []
    while len(following) < max_lines:
        line = reader.next_line()
        if not isinstance(line, bytes):
            break
        following.append(line)
    assert peeked == following


def test_complete_lines_leave_out_an_unfinished_line():
    reader = LineReader(100)
    reader.feed(b"RCPT TO:<a@x>\r\nDATA\r\nSubj")
    assert reader.complete_lines(10) == [b"RCPT TO:<a@x>\r\n", b"DATA\r\n"]
    assert reader.complete_lines(1) == [b"RCPT TO:<a@x>\r\n"]
