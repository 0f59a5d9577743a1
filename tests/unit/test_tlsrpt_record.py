"""`_smtp._tls` TXT records: RFC 8460 section 3 selection and grammar, and the lookups
(dnspython's real resolver and cache against a small DNS server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import dns.asyncresolver
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
import structlog

from smtproxy.routing.mx import a_label
from smtproxy.telemetry.tlsrpt_record import FAILURE_TTL, TlsrptRecords, tlsrpt_record

GOOD = "v=TLSRPTv1; rua=mailto:tlsrpt@example.com"


@pytest.mark.parametrize("record", [
    GOOD,
    "v=TLSRPTv1;rua=https://reports.example.com/tlsrpt",
    "v=TLSRPTv1; rua=mailto:a@example.com,https://reports.example.com/v1",
    "v=TLSRPTv1; rua=mailto:a@example.com , mailto:b@example.com",
    "v=TLSRPTv1; rua=mailto:a@example.com;",
    "v=TLSRPTv1; rua=mailto:a@example.com ; ext=1",  # blanks around a later delimiter
    "v=TLSRPTv1; ext_1=value; rua=mailto:a@example.com",
    "v=TLSRPTv1; rua=MAILTO:a@example.com,HTTPS://reports.example.com/",  # URI schemes: any case
    "v=TLSRPTv1; rua=mailto:a@example.com; " + "x" * 40 + "=future",  # a superset: unknown fields ignored
    "v=TLSRPTv1; rua=mailto:a%2Cb@example.com",
])
def test_valid_records(record):
    assert tlsrpt_record([record]) == record


@pytest.mark.parametrize("record", [
    "v=TLSRPTv1;",
    "v=TLSRPTv1; ext=1",
    "v=TLSRPTv1; rua=mailto:a@example.com; rua=mailto:b@example.com",
    "v=TLSRPTv1; rua=http://reports.example.com/",
    "v=TLSRPTv1; rua=directory:/tmp/reports",
    "v=TLSRPTv1; rua=",
    "v=TLSRPTv1; rua=mailto:a@example.com;; ext=1",
    "v=TLSRPTv1; rua=mailto:a@example.com; =value",
    "v=TLSRPTv2; rua=mailto:a@example.com",
    "v=tlsrptv1; rua=mailto:a@example.com",
    "v=TLSRPTv1",
    "rua=mailto:a@example.com; v=TLSRPTv1",
    "v=TLSRPTv1 ; rua=mailto:a@example.com",  # not begun with "v=TLSRPTv1;": reportd refuses it too
])
def test_invalid_records(record):
    assert tlsrpt_record([record]) is None


def test_other_txt_records_are_ignored():
    assert tlsrpt_record(["v=spf1 -all", GOOD, "google-site-verification=abc"]) == GOOD


def test_two_tlsrpt_records_mean_none():
    assert tlsrpt_record([GOOD, "v=TLSRPTv1; rua=mailto:other@example.com"]) is None


def test_an_invalid_second_record_still_counts():
    assert tlsrpt_record([GOOD, "v=TLSRPTv1; nonsense"]) is None


def test_no_records():
    assert tlsrpt_record([]) is None


@pytest.mark.parametrize(("domain", "label"), [
    ("example.com", "example.com"),
    ("Example.COM", "example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("a..b", None),
    ("x" * 64 + ".example", None),
    # what a DNS master file reads as escapes would name another domain than the one given
    ("ex\\065.com", None),
    ("exa mple.com", None),
    (".", None),
])
def test_a_label(domain, label):
    assert a_label(domain) == label


# ----------------------------------------------------------------------- lookups


class SmallDns(asyncio.DatagramProtocol):
    """Answers TXT queries from `zone` (name -> TXT rdata texts, or "SERVFAIL"); other
    names get NXDOMAIN with an SOA, so negative answers can be cached. Counts queries."""

    def __init__(self, zone: dict[str, list[str] | str], ttl: int = 300) -> None:
        self.zone = zone
        self.ttl = ttl
        self.queries: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        self.queries.append(name)
        response = dns.message.make_response(query)
        entry = self.zone.get(name)
        if entry == "SERVFAIL":
            response.set_rcode(dns.rcode.SERVFAIL)
        elif entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            soa = response.find_rrset(response.authority, dns.name.from_text("test."), dns.rdataclass.IN,
                                      dns.rdatatype.SOA, create=True)
            soa.update_ttl(self.ttl)
            soa.add(dns.rdata.from_text("IN", "SOA", "ns.test. admin.test. 1 3600 600 86400 300"))
        else:
            rrset = response.find_rrset(response.answer, question.name, dns.rdataclass.IN, dns.rdatatype.TXT,
                                        create=True)
            rrset.update_ttl(self.ttl)
            for text in entry:
                rrset.add(dns.rdata.from_text("IN", "TXT", text))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


@pytest.fixture
async def small_dns() -> AsyncIterator[tuple[SmallDns, dns.asyncresolver.Resolver]]:
    server = SmallDns({
        "_smtp._tls.good.test": [f'"{GOOD}"'],
        "_smtp._tls.split.test": ['"v=TLSRPTv1;" " rua=mailto:tlsrpt@split.test"'],
        "_smtp._tls.spf.test": ['"v=spf1 -all"'],
        "_smtp._tls.broken.test": "SERVFAIL",
    })
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0))
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", transport.get_extra_info("sockname")[1])]
    resolver.lifetime = 2.0
    yield server, resolver
    transport.close()


async def test_lookup_finds_the_record_and_caches_it(small_dns):
    server, resolver = small_dns
    records = TlsrptRecords(resolver)
    assert await records.lookup("good.test") == GOOD
    assert await records.lookup("good.test") == GOOD
    assert server.queries == ["_smtp._tls.good.test"]


async def test_txt_strings_of_one_record_are_joined(small_dns):
    records = TlsrptRecords(small_dns[1])
    assert await records.lookup("split.test") == "v=TLSRPTv1; rua=mailto:tlsrpt@split.test"


async def test_no_tlsrpt_record(small_dns):
    server, resolver = small_dns
    records = TlsrptRecords(resolver)
    assert await records.lookup("spf.test") is None
    assert await records.lookup("nothing.test") is None
    assert await records.lookup("nothing.test") is None  # NXDOMAIN cached for the SOA's negative TTL
    assert server.queries == ["_smtp._tls.spf.test", "_smtp._tls.nothing.test"]


async def test_a_failed_lookup_is_not_repeated_for_a_while(small_dns):
    server, resolver = small_dns
    now = [1000.0]
    records = TlsrptRecords(resolver, clock=lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        assert await records.lookup("broken.test") is None
        asked = len(server.queries)
        assert asked >= 1
        now[0] += FAILURE_TTL - 1
        assert await records.lookup("broken.test") is None
        assert len(server.queries) == asked
        assert await records.lookup("good.test") == GOOD  # other domains are not affected
        now[0] += 2
        assert await records.lookup("broken.test") is None
        assert len(server.queries) > asked + 1
    warnings = [entry["event"] for entry in logs if entry["log_level"] == "warning"]
    assert warnings == ["TLSRPT: cannot look up _smtp._tls.broken.test TXT: NoNameservers; "
                        f"no TLSRPT results for broken.test for {FAILURE_TTL:g}s"] * 2
