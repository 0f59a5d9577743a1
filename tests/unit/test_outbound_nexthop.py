"""The name a nexthop's certificate is checked against (Postfix's smtp_tls_verify_cert_match
"nexthop": the destination without its port and brackets)."""

from __future__ import annotations

import pytest

from smtproxy.outbound.connector import nexthop_name


@pytest.mark.parametrize(("nexthop", "name"), [
    ("example.com", "example.com"),
    ("example.com:2525", "example.com"),
    ("[mx.example.net]", "mx.example.net"),
    ("[mx.example.net]:587", "mx.example.net"),
    ("[192.0.2.1]:25", "192.0.2.1"),
    ("[2001:db8::1]:25", "2001:db8::1"),
    ("[IPv6:2001:db8::1]:25", "2001:db8::1"),
])
def test_nexthop_name_drops_port_brackets_and_ipv6_tag(nexthop: str, name: str) -> None:
    assert nexthop_name(nexthop) == name
