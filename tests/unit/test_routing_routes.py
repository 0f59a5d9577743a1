"""The routes table: Postfix transport(5) syntax (smtp only) and Postfix's lookup order."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtproxy.routing.routes import Route, RouteTable, RouteTableError, address_literal


def table(text: str) -> RouteTable:
    return RouteTable.parse(text, "routes")


def route_of(result: str) -> Route | None:
    return table(f"example.com {result}\n").lookup("example.com")


@pytest.mark.parametrize(
    ("result", "nexthop", "host", "port", "mx_lookup"),
    [
        ("[192.0.2.1]:2525", "[192.0.2.1]:2525", "192.0.2.1", 2525, False),
        ("smtp:[192.0.2.1]:2525", "[192.0.2.1]:2525", "192.0.2.1", 2525, False),
        (":[192.0.2.1]", "[192.0.2.1]", "192.0.2.1", None, False),
        ("mx.example.net", "mx.example.net", "mx.example.net", None, True),
        ("mx.example.net:2525", "mx.example.net:2525", "mx.example.net", 2525, True),
        ("smtp:mx.example.net:2525", "mx.example.net:2525", "mx.example.net", 2525, True),
        ("[Relay.Example.NET]", "[Relay.Example.NET]", "relay.example.net", None, False),
        ("[2001:db8::1]:25", "[2001:db8::1]:25", "2001:db8::1", 25, False),
        ("[ipv6:2001:DB8::1]", "[ipv6:2001:DB8::1]", "2001:db8::1", None, False),
        ("[IPv6:2001:db8::1]:587", "[IPv6:2001:db8::1]:587", "2001:db8::1", 587, False),
        ("[192.0.2.1]:", "[192.0.2.1]:", "192.0.2.1", None, False),
    ],
)
def test_nexthop_forms(result, nexthop, host, port, mx_lookup):
    assert route_of(result) == Route(nexthop, host, port, mx_lookup, "routes:1")


@pytest.mark.parametrize("result", [":", "smtp:", "SMTP:", "smtp"])  # "smtp": Postfix's transport name alone
def test_empty_nexthop_means_default_routing(result):
    assert route_of(result.lower()) is None


def test_lookup_order_exact_then_parents_nearest_first_then_wildcard():
    routes = table(
        "example.com      [192.0.2.1]\n"
        ".example.com     [192.0.2.2]\n"
        ".b.example.com   [192.0.2.3]\n"
        ".com             [192.0.2.4]\n"
        "*                [192.0.2.9]\n"
    )
    assert routes.lookup("example.com").host == "192.0.2.1"
    assert routes.lookup("a.example.com").host == "192.0.2.2"
    assert routes.lookup("x.a.example.com").host == "192.0.2.2"
    assert routes.lookup("a.b.example.com").host == "192.0.2.3"
    assert routes.lookup("b.example.com").host == "192.0.2.2"  # .b.example.com is for its subdomains
    assert routes.lookup("example2.com").host == "192.0.2.4"
    assert routes.lookup("example.org").host == "192.0.2.9"


def test_dot_domain_does_not_match_the_domain_itself():
    routes = table(".example.com [192.0.2.2]\n")
    assert routes.lookup("example.com") is None
    assert routes.lookup("mail.example.com").host == "192.0.2.2"


def test_default_entry_exempts_a_domain_from_the_wildcard():
    # transport(5) EXAMPLES: internal destinations direct, all else via a relay
    routes = table("my.domain :\n.my.domain :\n* smtp:[outbound-relay.my.domain]\n")
    assert routes.lookup("my.domain") is None
    assert routes.lookup("host.my.domain") is None
    assert routes.lookup("example.com").nexthop == "[outbound-relay.my.domain]"


def test_no_entry_and_no_wildcard_is_none():
    assert table("example.com [192.0.2.1]\n").lookup("example.org") is None


def test_keys_and_lookups_are_case_folded():
    routes = table("Example.COM [192.0.2.1]\n")
    assert routes.lookup("EXAMPLE.com").host == "192.0.2.1"


def test_address_literal_domain_only_matches_the_wildcard():
    routes = table("100.example [192.0.2.1]\n* [192.0.2.9]\n")
    assert routes.lookup("[198.51.100.1]").host == "192.0.2.9"


def test_comments_blank_lines_and_continuation_lines():
    routes = table(
        "# routes\n"
        "\n"
        "   \n"
        "example.com\n"
        "    # a comment inside an entry\n"
        "\t[192.0.2.1]:2525\n"
        "  # indented comment\n"
        "example.org mx.example.net\n"
    )
    assert routes.lookup("example.com") == Route("[192.0.2.1]:2525", "192.0.2.1", 2525, False, "routes:4")
    assert routes.lookup("example.org").source == "routes:8"


def test_load_reads_the_file_and_names_it_in_sources(tmp_path: Path):
    path = tmp_path / "routes"
    path.write_text("# comment\nexample.com [192.0.2.1]\n")
    assert RouteTable.load(path).lookup("example.com").source == f"{path}:2"


def test_load_of_a_missing_file_names_the_file(tmp_path: Path):
    with pytest.raises(RouteTableError, match=r"routes-missing: cannot read: No such file"):
        RouteTable.load(tmp_path / "routes-missing")


def test_load_of_a_file_that_is_not_utf8_names_the_line(tmp_path: Path):
    path = tmp_path / "routes"
    path.write_bytes(b"example.com [192.0.2.1]\nexample.org [caf\xe9.example]\n")
    with pytest.raises(RouteTableError, match=r"routes line 2: not UTF-8 text"):
        RouteTable.load(path)


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("example.com error:mail for example.com is undeliverable", "routes line 1", "one nexthop per entry"),
        ("example.com error:nope", "routes line 1", "transport error is not supported; only smtp is"),
        ("example.com local:", "routes line 1", "transport local is not supported"),
        ("example.com relay", "routes line 1", "transport relay is not supported"),  # not a host "relay"
        ("example.com relay:[192.0.2.1]", "routes line 1", "transport relay is not supported"),
        ("example.com lmtp:unix:/run/lmtp", "routes line 1", "transport lmtp is not supported"),
        ("user@example.com [192.0.2.1]", "routes line 1", "per-address entries are not supported"),
        ("example.com", "routes line 1", "a key without a nexthop"),
        ("example.com 192.0.2.1", "routes line 1", "an IP address needs brackets"),
        ("example.com smtp:192.0.2.1:25", "routes line 1", "an IP address needs brackets"),
        ("example.com 2001:db8::1", "routes line 1", "an IP address needs brackets"),
        ("example.com [192.0.2.300]", "routes line 1", r"not an IP address or host name inside \[...\]"),
        ("example.com [ipv6:192.0.2.1]", "routes line 1", "not an IP address or host name"),
        ("example.com [192.0.2.1", "routes line 1", 'missing "]"'),
        ("example.com [192.0.2.1]25", "routes line 1", 'only ":port" may follow "]"'),
        ("example.com [192.0.2.1]:0", "routes line 1", "the port must be a number from 1 to 65535"),
        ("example.com [192.0.2.1]:65536", "routes line 1", "the port must be a number from 1 to 65535"),
        ("example.com mx.example.net:smtp", "routes line 1", "the port must be a number"),
        ("example.com smtp:[192.0.2.1], [192.0.2.2]", "routes line 1", "no nexthop lists"),
        ("example.com [192.0.2.1] # primary", "routes line 1", "no comment after the value"),
        ("exa_mple..com [192.0.2.1]", "routes line 1", "the key must be a domain, .domain or \\*"),
        ("# first\n  example.com [192.0.2.1]", "routes line 2", "continues no entry"),
        ("example.com [192.0.2.1]\n\nEXAMPLE.com [192.0.2.2]", "routes line 3",
         r"duplicate key example.com \(first at line 1\)"),
    ],
)
def test_errors_name_file_line_value_and_what_is_allowed(text, where, problem):
    with pytest.raises(RouteTableError, match=problem) as caught:
        table(text)
    message = str(caught.value)
    assert message.startswith(f'{where}: "')
    assert "allowed: " in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("[192.0.2.1]", "192.0.2.1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[IPv6:2001:DB8::1]", "2001:db8::1"),
        ("[ipv6:192.0.2.1]", None),
        ("[mx.example.com]", None),
        ("192.0.2.1", None),
    ],
)
def test_address_literal(text, address):
    assert address_literal(text) == address
