"""DataScanner and ChunkReader: examples, a per-byte reference model, segmentation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtproxy.smtp import ChunkReader, DataError, DataScan, DataScanner

END = b"\r\n.\r\n"
MODES = ("reject", "normalize")


def feed_all(scanner: DataScanner, pieces: list[bytes]) -> tuple[bytes, bool, bytes, list[DataError]]:
    """Concatenated forward, done, concatenated rest, every error reported."""
    forward, rest, errors, done = b"", b"", [], False
    for piece in pieces:
        scan = scanner.feed(piece)
        assert not scan.rest or scan.done
        assert not (done and scan.forward), "nothing is forwarded after the end"
        forward += scan.forward
        rest += scan.rest
        done = scan.done
        if scan.error is not None:
            errors.append(scan.error)
            assert not scan.forward, "the feed that finds an error forwards nothing"
    return forward, done, rest, errors


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


def reference(stream: bytes, mode: str, max_size: int = 0, max_line: int = 0):
    """A deliberately naive model, one byte (or CRLF) at a time, for a complete message.

    Returns (forward if no error, error, forward made before the error, size, rest).
    """
    end = (b"\r\n" + stream).find(END)
    assert end >= 0
    content, rest = stream[:end], stream[end + 3 :]
    out = bytearray()
    error = None
    before_error = b""
    line_len = 0
    start = "genuine"  # what began the current line: genuine | normalised
    size = 0
    i = 0
    while i < len(content):
        byte = content[i : i + 1]
        following = content[i + 1 : i + 2]
        if byte == b"\r" and following == b"\n":
            token, kind = b"\r\n", "crlf"
        elif byte in (b"\r", b"\n"):
            token, kind = byte, "bare"
        else:
            token, kind = byte, "char"
        if error is None:
            if kind == "bare" and mode == "reject":
                error = DataError.BARE_CR if byte == b"\r" else DataError.BARE_LF
            elif kind == "char" and max_line and line_len + 1 + 2 > max_line:
                error = DataError.LINE_TOO_LONG
            elif max_size and size + len(token) > max_size:
                error = DataError.TOO_BIG
            if error is not None:
                before_error = bytes(out)
        if error is None:
            if kind == "char":
                if byte == b"." and line_len == 0:
                    after = content[i + 1 : i + 3]
                    bare_next = after[:1] == b"\n" or (after[:1] == b"\r" and after != b"\r\n")
                    if start == "normalised" or bare_next:
                        out += b"."
                out += byte
                line_len += 1
            else:
                out += b"\r\n"
                line_len = 0
                start = "genuine" if kind == "crlf" else "normalised"
        size += len(token)
        i += len(token)
    if error is None:
        out += b".\r\n"
    return bytes(out), error, before_error, size, rest


# ---------------------------------------------------------------------------- examples


def test_spec_example_normalize():
    scan = DataScanner("normalize").feed(b"a\n.\nb\r\n.\r\n")
    assert scan == DataScan(b"a\r\n..\r\nb\r\n.\r\n", True, b"", None)


def test_plain_message_and_pipelined_rest():
    scanner = DataScanner()
    scan = scanner.feed(b"Subject: x\r\n\r\nbody\r\n.\r\nMAIL FROM:<>\r\n")
    assert scan == DataScan(b"Subject: x\r\n\r\nbody\r\n.\r\n", True, b"MAIL FROM:<>\r\n", None)
    assert scanner.size == len(b"Subject: x\r\n\r\nbody\r\n")


def test_first_line_dot_is_an_empty_message():
    scanner = DataScanner()
    assert scanner.feed(b".\r\nQUIT\r\n") == DataScan(b".\r\n", True, b"QUIT\r\n", None)
    assert scanner.size == 0


def test_dot_stuffed_lines_pass_unchanged():
    scan = DataScanner().feed(b"..\r\n..x\r\n.y\r\n.\r\n")
    assert scan == DataScan(b"..\r\n..x\r\n.y\r\n.\r\n", True, b"", None)


@pytest.mark.parametrize(
    "smuggle",
    [b"a\r\n.\nMAIL", b"a\n.\r\nMAIL", b"a\n.\nMAIL", b"a\r.\rMAIL", b"a\r\n.\rMAIL", b"a\r.\r\nMAIL"],
)
def test_smuggling_sequences_never_end_the_data(smuggle):
    for mode in MODES:
        scan = DataScanner(mode).feed(smuggle)
        assert not scan.done


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"a\nb", DataError.BARE_LF),
        (b"a\rb", DataError.BARE_CR),
        (b"\n", DataError.BARE_LF),
        (b"a\r\r\n", DataError.BARE_CR),
    ],
)
def test_reject_mode_reports_the_first_bare_newline(data, error):
    scan = DataScanner("reject").feed(data)
    assert scan.error is error and scan.forward == b"" and not scan.done


def test_reject_then_discard_until_the_end():
    scanner = DataScanner("reject")
    assert scanner.feed(b"ok\r\n") == DataScan(b"ok", False, b"", None)
    assert scanner.feed(b"bad\nline\r\n") == DataScan(b"", False, b"", DataError.BARE_LF)
    assert scanner.feed(b"more\n.\nstill\r\n") == DataScan(b"", False, b"", None)
    assert scanner.feed(b".\r\nRSET\r\n") == DataScan(b"", True, b"RSET\r\n", None)
    assert scanner.size == len(b"ok\r\nbad\nline\r\nmore\n.\nstill\r\n")


def test_normalize_stuffs_dot_lines_that_end_in_a_bare_newline():
    assert DataScanner("normalize").feed(b"x\r\n.\ny\r\n.\r\n").forward == b"x\r\n..\r\ny\r\n.\r\n"
    assert DataScanner("normalize").feed(b".\rx\r\n.\r\n").forward == b"..\r\nx\r\n.\r\n"
    assert DataScanner("normalize").feed(b"a\r.b\r\n.\r\n").forward == b"a\r\n..b\r\n.\r\n"


def test_normalize_across_feeds():
    scanner = DataScanner("normalize")
    assert scanner.feed(b"x\n").forward == b"x\r\n"
    assert scanner.feed(b".y\r").forward == b"..y"
    assert scanner.feed(b"\n.").forward == b""
    assert scanner.feed(b"\r\n") == DataScan(b"\r\n.\r\n", True, b"", None)


def test_crlf_split_across_feeds_is_a_crlf():
    scanner = DataScanner("reject")
    assert scanner.feed(b"a\r") == DataScan(b"a", False, b"", None)
    assert scanner.feed(b"\nb\r\n.\r") == DataScan(b"\r\nb", False, b"", None)
    assert scanner.feed(b"\n") == DataScan(b"\r\n.\r\n", True, b"", None)


def test_held_back_bytes_are_few():
    scanner = DataScanner()
    for tail in (b"\r", b"\r\n", b"\r\n.", b"\r\n.\r"):
        scan = DataScanner().feed(b"x" * 100 + tail)
        assert scan.forward == b"x" * 100
    assert scanner.feed(b".").forward == b""  # a "." at a line start waits for its next byte
    assert scanner.feed(b"x").forward == b".x"


def test_too_big_counts_message_bytes_without_the_final_dot():
    assert DataScanner(max_size=5).feed(b"abc\r\n.\r\n").error is None
    scanner = DataScanner(max_size=4)
    assert scanner.feed(b"abc\r\n.\r\nNOOP\r\n") == DataScan(b"", True, b"NOOP\r\n", DataError.TOO_BIG)
    assert scanner.size == 5


def test_line_limit_counts_the_crlf():
    assert DataScanner(max_line=5).feed(b"abc\r\n.\r\n").error is None
    assert DataScanner(max_line=5).feed(b"abcd\r\n.\r\n").error is DataError.LINE_TOO_LONG
    scanner = DataScanner(max_line=5)
    assert scanner.feed(b"ab").error is None
    assert scanner.feed(b"cd").error is DataError.LINE_TOO_LONG


def test_framing_error_wins_a_tie_with_size():
    assert DataScanner(max_size=1).feed(b"a\nb").error is DataError.BARE_LF
    assert DataScanner(max_size=2, max_line=4).feed(b"abc").error is DataError.LINE_TOO_LONG


def test_feeding_after_the_end_is_all_rest():
    scanner = DataScanner()
    scanner.feed(b".\r\n")
    assert scanner.feed(b"EHLO x\r\n") == DataScan(b"", True, b"EHLO x\r\n", None)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        DataScanner("strip")
    with pytest.raises(ValueError):
        DataScanner(max_line=2)


def test_chunk_reader():
    reader = ChunkReader(5)
    assert reader.feed(b"abc") == (b"abc", b"", False)
    assert reader.feed(b"deBDAT") == (b"de", b"BDAT", True)
    assert reader.feed(b"more") == (b"", b"more", True)
    assert ChunkReader(0).feed(b"") == (b"", b"", True)
    assert ChunkReader(0).feed(b"QUIT\r\n") == (b"", b"QUIT\r\n", True)
    with pytest.raises(ValueError):
        ChunkReader(-1)


# ---------------------------------------------------------------------------- properties

atoms = st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b".\r\n", b"..", b"\x00", b"\xff"])
bodies = st.lists(atoms, max_size=40).map(b"".join)
cuts = st.lists(st.integers(min_value=0, max_value=400), max_size=12)
sizes = st.sampled_from([0, 0, 1, 2, 4, 7, 20])
line_limits = st.sampled_from([0, 0, 3, 4, 5, 8, 20])


@settings(max_examples=400, deadline=None)
@given(body=bodies, tail=bodies, cuts=cuts, mode=st.sampled_from(MODES), max_size=sizes, max_line=line_limits)
def test_matches_the_reference_model_for_any_segmentation(body, tail, cuts, mode, max_size, max_line):
    stream = body + END + tail
    expected, error, before_error, size, rest = reference(stream, mode, max_size, max_line)
    scanner = DataScanner(mode, max_size, max_line)
    forward, done, got_rest, errors = feed_all(scanner, split(stream, cuts))
    assert done and got_rest == rest and scanner.size == size
    assert errors == ([error] if error else [])
    if error is None:
        assert forward == expected
    else:
        assert before_error.startswith(forward)


@settings(max_examples=300, deadline=None)
@given(stream=bodies, cuts=cuts, mode=st.sampled_from(MODES), max_size=sizes, max_line=line_limits)
def test_any_segmentation_equals_one_feed(stream, cuts, mode, max_size, max_line):
    whole = DataScanner(mode, max_size, max_line)
    w_forward, w_done, w_rest, w_errors = feed_all(whole, [stream])
    pieces = DataScanner(mode, max_size, max_line)
    p_forward, p_done, p_rest, p_errors = feed_all(pieces, split(stream, cuts))
    assert (p_done, p_rest, p_errors, pieces.size) == (w_done, w_rest, w_errors, whole.size)
    if not w_errors:
        assert p_forward == w_forward


@settings(max_examples=400, deadline=None)
@given(stream=bodies, cuts=cuts, mode=st.sampled_from(MODES))
def test_far_side_sees_the_same_end_of_data(stream, cuts, mode):
    """The forwarded bytes contain CRLF.CRLF (virtual leading CRLF) only where we ended."""
    scanner = DataScanner(mode)
    forward, done, _, errors = feed_all(scanner, split(stream, cuts))
    relayed = b"\r\n" + forward
    if done and not errors:
        assert relayed.find(END) == len(relayed) - len(END)
    else:
        assert END not in relayed
    if mode == "reject":
        assert forward.count(b"\r") == forward.count(b"\n") == forward.count(b"\r\n")


@settings(max_examples=200, deadline=None)
@given(stream=st.binary(max_size=300), cuts=cuts, mode=st.sampled_from(MODES), max_size=sizes, max_line=line_limits)
def test_arbitrary_bytes_never_crash(stream, cuts, mode, max_size, max_line):
    feed_all(DataScanner(mode, max_size, max_line), split(stream, cuts))


@settings(max_examples=200, deadline=None)
@given(size=st.integers(min_value=0, max_value=50), stream=st.binary(max_size=80), cuts=cuts)
def test_chunk_reader_segmentation(size, stream, cuts):
    reader = ChunkReader(size)
    payload, rest, done = b"", b"", False
    for piece in split(stream, cuts):
        part, after, done = reader.feed(piece)
        payload, rest = payload + part, rest + after
    assert payload == stream[:size]
    assert done == (len(stream) >= size)
    assert rest == (stream[size:] if done else b"")
