"""EhloReply: parse, edit, serialise."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtproxy.smtp import EhloReply, Reply


BACKEND = Reply(
    250,
    ("mx.example.com Hello", "PIPELINING", "SIZE 10240000", "auth PLAIN LOGIN", "AUTH=LOGIN PLAIN", "8BITMIME"),
)


def test_parse():
    ehlo = EhloReply.parse(BACKEND)
    assert ehlo.greeting == "mx.example.com Hello"
    assert ehlo.capabilities == {
        "PIPELINING": "",
        "SIZE": "10240000",
        "AUTH": "PLAIN LOGIN",
        "AUTH=LOGIN": "PLAIN",
        "8BITMIME": "",
    }
    assert ehlo.keywords() == ["PIPELINING", "SIZE", "AUTH", "AUTH=LOGIN", "8BITMIME"]


def test_edit_and_serialise():
    ehlo = EhloReply.parse(BACKEND)
    ehlo.remove("auth", "AUTH=LOGIN", "NOT-THERE")
    ehlo.set("size", "52428800")  # replaced in place
    ehlo.set("STARTTLS")  # added at the end
    assert ehlo.has("starttls") and not ehlo.has("AUTH")
    assert ehlo.to_reply().serialize() == (
        b"250-mx.example.com Hello\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-8BITMIME\r\n250 STARTTLS\r\n"
    )


def test_a_greeting_only_reply():
    ehlo = EhloReply.parse(Reply(250, ("mx",)))
    assert ehlo.capabilities == {} and ehlo.to_reply() == Reply(250, ("mx",))


def test_blank_extension_lines_are_skipped():
    assert EhloReply.parse(Reply(250, ("mx", "", " PIPELINING "))).keywords() == ["PIPELINING"]


def test_only_250_is_an_ehlo_reply():
    with pytest.raises(ValueError):
        EhloReply.parse(Reply(502, ("5.5.1 Error: command not implemented",)))


keyword = st.from_regex(r"[A-Z0-9][A-Z0-9=-]{0,10}", fullmatch=True)
params = st.from_regex(r"([!-~]{1,6}( [!-~]{1,6}){0,2})?", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(greeting=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20),
       capabilities=st.dictionaries(keyword, params, max_size=6))
def test_to_reply_then_parse_round_trips(greeting, capabilities):
    ehlo = EhloReply(greeting, capabilities)
    assert EhloReply.parse(ehlo.to_reply()) == ehlo
