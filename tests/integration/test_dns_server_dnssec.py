"""The DNSSEC side of `dns_server.Unbound`, which DANE tests (RFC 7672) stand on.

One Unbound serves a signed zone, an unsigned one, a bogus record and plain local-data
side by side; every query sets RD, AD and the EDNS DO bit, as a DANE-aware resolver
client does, and only the AD bit of the answer tells secure from insecure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.integration.dns_server import Unbound, requires_unbound
from tests.integration.peers import LOOPBACK

pytestmark = [pytest.mark.integration, requires_unbound]

DIGEST = hashlib.sha256(b"the mx's public key").hexdigest()

SIGNED = {
    "dane.test.": [
        "dane.test. MX 10 mx.dane.test.",
        "mx.dane.test. A 127.0.0.1",
        f"_2525._tcp.mx.dane.test. TLSA 3 1 1 {DIGEST}",
    ]
}
UNSIGNED = {"insecure.test.": ["mx.insecure.test. A 127.0.0.4"]}
BOGUS = ["forged.dane.test. A 127.0.0.66"]
LOCAL = ["plain.test. A 127.0.0.3"]


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    server = Unbound(
        tmp_path_factory.mktemp("unbound"),
        LOCAL,
        signed_zones=SIGNED,
        unsigned_zones=UNSIGNED,
        bogus=BOGUS,
    ).start()
    yield server
    server.stop()


def ask(
    server: Unbound, name: str, rdtype: str, send: Callable[..., dns.message.Message] = dns.query.udp
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    query.flags |= dns.flags.AD
    return send(query, LOOPBACK, timeout=5.0, port=server.port)


def data(answer: dns.message.Message, rdtype: str) -> list[str]:
    """The answer's records of `rdtype` (the RRSIGs that DO brings along left out)."""
    wanted = dns.rdatatype.from_text(rdtype)
    return [rdata.to_text() for rrset in answer.answer if rrset.rdtype == wanted for rdata in rrset]


def secure(answer: dns.message.Message) -> bool:
    return bool(answer.flags & dns.flags.AD)


def test_signed_address_is_secure(dns_server):
    answer = ask(dns_server, "mx.dane.test.", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert data(answer, "A") == ["127.0.0.1"]
    assert secure(answer)


def test_signed_tlsa_is_secure_over_tcp_too(dns_server):
    for send in (dns.query.udp, dns.query.tcp):
        answer = ask(dns_server, "_2525._tcp.mx.dane.test.", "TLSA", send)
        assert answer.rcode() == dns.rcode.NOERROR
        assert data(answer, "TLSA") == [f"3 1 1 {DIGEST}"]
        assert secure(answer)


def test_signed_mx_is_secure(dns_server):
    answer = ask(dns_server, "dane.test.", "MX")
    assert data(answer, "MX") == ["10 mx.dane.test."]
    assert secure(answer)


def test_missing_name_in_a_signed_zone_is_a_secure_nxdomain(dns_server):
    """The NSEC chain proves the name absent: a DANE client may then trust "no TLSA"."""
    answer = ask(dns_server, "_25._tcp.nothing.dane.test.", "TLSA")
    assert answer.rcode() == dns.rcode.NXDOMAIN
    assert secure(answer)


def test_missing_type_in_a_signed_zone_is_a_secure_nodata(dns_server):
    answer = ask(dns_server, "mx.dane.test.", "TLSA")
    assert answer.rcode() == dns.rcode.NOERROR
    assert data(answer, "TLSA") == []
    assert secure(answer)


def test_unsigned_zone_answers_without_ad(dns_server):
    answer = ask(dns_server, "mx.insecure.test.", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert data(answer, "A") == ["127.0.0.4"]
    assert not secure(answer)


def test_bogus_record_is_servfail(dns_server):
    answer = ask(dns_server, "forged.dane.test.", "A")
    assert answer.rcode() == dns.rcode.SERVFAIL
    assert data(answer, "A") == []


def test_local_data_still_answers_beside_the_auth_zones(dns_server):
    answer = ask(dns_server, "plain.test.", "A")
    assert answer.rcode() == dns.rcode.NOERROR
    assert data(answer, "A") == ["127.0.0.3"]
    assert not secure(answer)
    assert ask(dns_server, "missing.test.", "A").rcode() == dns.rcode.NXDOMAIN


def test_names_outside_every_zone_still_fail_without_a_query(dns_server):
    assert ask(dns_server, "mx.servfail.example.", "A").rcode() == dns.rcode.SERVFAIL


def test_factory_serves_signed_zones_without_local_zones(unbound_factory):
    """With ``zones=()`` nothing is local-data; readiness asks the signed zone's SOA."""
    server = unbound_factory([], zones=(), signed_zones={"example.": ["mx.example. A 127.0.0.9"]})
    answer = ask(server, "mx.example.", "A")
    assert data(answer, "A") == ["127.0.0.9"]
    assert secure(answer)


def test_a_record_outside_its_zone_is_refused_before_unbound_starts(tmp_path):
    with pytest.raises(ValueError, match="outside the zone"):
        Unbound(tmp_path, [], signed_zones={"dane.test.": ["mx.other.test. A 127.0.0.1"]})
    with pytest.raises(ValueError, match="outside every signed zone"):
        Unbound(tmp_path, [], signed_zones={"dane.test.": []}, bogus=["mx.other.test. A 127.0.0.1"])
