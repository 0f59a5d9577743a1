"""MX resolution and the router, on dnspython answers built in memory.

`FakeDns` stands in for `dns.asyncresolver.Resolver`: it answers from a small zone the way
a recursive server would (CNAMEs followed into the answer section, NXDOMAIN for unknown
names, no answer for known names without that type). The same cases run against a real
Unbound in tests/integration/test_routing_dns.py.
"""

from __future__ import annotations

import random

import dns.message
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import pytest

from smtproxy.config import DnsConfig
from smtproxy.routing.mx import Exchanger, MxResolver, RoutingError, make_resolver
from smtproxy.routing.router import Destination, Router, Target
from smtproxy.routing.routes import RouteTable

Zone = dict[str, dict[str, list[str] | str | Exception]]


class FakeDns:
    def __init__(self, zone: Zone) -> None:
        self.zone = zone
        self.queries: list[tuple[str, str]] = []

    async def resolve(self, qname: str, rdtype: str, *, search: bool | None = None) -> dns.resolver.Answer:
        assert search is False
        self.queries.append((qname, rdtype))
        response = dns.message.make_response(dns.message.make_query(qname, rdtype))
        name = qname
        for _ in range(8):
            data = self.zone.get(name.rstrip("."))
            if data is None:
                raise dns.resolver.NXDOMAIN(qnames=[dns.name.from_text(qname)], responses={})
            value = data.get(rdtype)
            if isinstance(value, Exception):
                raise value
            if value is None and "CNAME" in data:
                _add(response, name, "CNAME", [data["CNAME"]])
                name = data["CNAME"]
                continue
            if value is not None:
                _add(response, name, rdtype, value)
            break
        if not any(rrset.rdtype == dns.rdatatype.from_text(rdtype) for rrset in response.answer):
            raise dns.resolver.NoAnswer(response=response)
        return dns.resolver.Answer(dns.name.from_text(qname), dns.rdatatype.from_text(rdtype),
                                   dns.rdataclass.IN, response)


def _add(response: dns.message.Message, name: str, rdtype: str, texts: list[str]) -> None:
    rrset = response.find_rrset(response.answer, dns.name.from_text(name), dns.rdataclass.IN,
                                dns.rdatatype.from_text(rdtype), create=True)
    for text in texts:
        rrset.add(dns.rdata.from_text(dns.rdataclass.IN, rdtype, text), 300)


TIMEOUT = dns.resolver.LifetimeTimeout(timeout=1.0, errors=[])
SERVFAIL = dns.resolver.NoNameservers(request=dns.message.make_query("servfail.test", "MX"), errors=[])

ZONE: Zone = {
    "two.test": {"MX": ["20 mx2.two.test.", "10 mx1.two.test."]},
    "mx1.two.test": {"A": ["127.0.0.11", "127.0.0.12"], "AAAA": ["::1"]},
    "mx2.two.test": {"A": ["127.0.0.21"]},
    "equal.test": {"MX": ["10 a.equal.test.", "10 b.equal.test.", "10 c.equal.test.", "20 z.equal.test."]},
    "a.equal.test": {"A": ["127.0.1.1"]},
    "b.equal.test": {"A": ["127.0.1.2"]},
    "c.equal.test": {"A": ["127.0.1.3"]},
    "z.equal.test": {"A": ["127.0.1.9"]},
    "implicit.test": {"A": ["127.0.2.1"], "AAAA": ["::1"]},
    "nothing.test": {"TXT": ['"v=spf1 -all"']},
    "null.test": {"MX": ["0 ."]},
    "broken.test": {"MX": ["10 gone.broken.test.", "20 alias.broken.test.", "30 empty.broken.test."]},
    "alias.broken.test": {"CNAME": "mx1.two.test."},
    "empty.broken.test": {"TXT": ['"no address"']},
    "partly.test": {"MX": ["10 gone.partly.test.", "20 mx.partly.test."]},
    "mx.partly.test": {"A": ["127.0.3.1"]},
    "slowmx.test": {"MX": ["10 slow.slowmx.test.", "20 gone.slowmx.test."]},
    "slow.slowmx.test": {"A": TIMEOUT, "AAAA": TIMEOUT},
    "timeout.test": {"MX": TIMEOUT},
    "servfail.test": {"MX": SERVFAIL},
    "v6fails.test": {"MX": ["10 mx.v6fails.test."]},
    "mx.v6fails.test": {"A": ["127.0.4.1"], "AAAA": TIMEOUT},
    "cname.test": {"CNAME": "implicit.test."},
    "relay.test": {"A": ["127.0.5.1"]},
    "relay-alias.test": {"CNAME": "relay.test."},
}


def resolver(zone: Zone = ZONE, seed: int = 0) -> MxResolver:
    return MxResolver(FakeDns(zone), random.Random(seed))  # type: ignore[arg-type]


async def failure(awaitable) -> RoutingError:
    with pytest.raises(RoutingError) as caught:
        await awaitable
    return caught.value


# ------------------------------------------------------------------------- MxResolver


async def test_mx_hosts_in_preference_order_ipv4_before_ipv6():
    assert await resolver().exchangers("two.test") == (
        Exchanger("mx1.two.test", 10, ("127.0.0.11", "127.0.0.12", "::1")),
        Exchanger("mx2.two.test", 20, ("127.0.0.21",)),
    )


async def test_equal_preferences_are_shuffled_by_the_injected_random():
    def order(seed: int) -> tuple[str, ...]:
        return tuple(exchanger.hostname for exchanger in orders[seed])

    orders = {seed: await resolver(seed=seed).exchangers("equal.test") for seed in range(40)}
    assert {order(seed)[3] for seed in orders} == {"z.equal.test"}  # preference 20 stays last
    assert len({order(seed)[:3] for seed in orders}) == 6  # every permutation of the 10s occurs
    assert await resolver(seed=7).exchangers("equal.test") == orders[7]


async def test_equal_preference_order_does_not_depend_on_answer_order():
    reversed_zone = dict(ZONE, **{"equal.test": {"MX": list(reversed(ZONE["equal.test"]["MX"]))}})
    assert await resolver(reversed_zone, seed=3).exchangers("equal.test") == \
        await resolver(seed=3).exchangers("equal.test")


async def test_no_mx_means_the_domain_itself_with_no_preference():
    assert await resolver().exchangers("implicit.test") == (
        Exchanger("implicit.test", None, ("127.0.2.1", "::1"), name_secure=True),
    )


async def test_domain_cname_is_followed_for_the_implicit_mx():
    exchangers = await resolver().exchangers("cname.test")
    assert exchangers == (Exchanger("cname.test", None, ("127.0.2.1", "::1"), name_secure=True),)


async def test_null_mx_is_556_5_1_10():
    error = await failure(resolver().exchangers("null.test"))
    assert (error.reply.code, error.reply.enhanced) == (556, "5.1.10")
    assert "null.test does not accept mail" in error.reply.text
    assert error.reason == "null MX for null.test"


async def test_nxdomain_is_550_5_1_2():
    error = await failure(resolver().exchangers("nonexistent.test"))
    assert (error.reply.code, error.reply.enhanced) == (550, "5.1.2")
    assert "name=nonexistent.test type=MX" in error.reply.text


async def test_no_mx_and_no_address_is_550_5_4_4():
    error = await failure(resolver().exchangers("nothing.test"))
    assert (error.reply.code, error.reply.enhanced) == (550, "5.4.4")


@pytest.mark.parametrize(("domain", "why"), [("timeout.test", "timeout"), ("servfail.test", "server failure")])
async def test_temporary_dns_failure_is_451_4_4_3(domain, why):
    error = await failure(resolver().exchangers(domain))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.3")
    assert error.reason.startswith(f"MX lookup of {domain}: {why}")


async def test_unusable_mx_hosts_are_skipped():
    assert await resolver().exchangers("partly.test") == (Exchanger("mx.partly.test", 20, ("127.0.3.1",)),)


async def test_all_mx_hosts_unusable_is_451_4_4_4_naming_each():
    error = await failure(resolver().exchangers("broken.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.4")
    assert "gone.broken.test: NXDOMAIN" in error.reason
    assert "MX host alias.broken.test is an alias (CNAME)" in error.reason
    assert "empty.broken.test has no A or AAAA record" in error.reason


async def test_all_mx_hosts_unusable_with_a_timeout_among_them_is_451_4_4_3():
    error = await failure(resolver().exchangers("slowmx.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.3")


async def test_a_failed_aaaa_lookup_leaves_the_ipv4_addresses():
    assert await resolver().exchangers("v6fails.test") == (Exchanger("mx.v6fails.test", 10, ("127.0.4.1",)),)


async def test_host_lookup_asks_no_mx_and_follows_cnames():
    fake = FakeDns(ZONE)
    assert await MxResolver(fake).host("relay-alias.test") == Exchanger("relay-alias.test", None, ("127.0.5.1",), name_secure=True)
    assert {rdtype for _, rdtype in fake.queries} == {"A", "AAAA"}


async def test_host_lookup_of_an_ip_address_asks_nothing():
    fake = FakeDns(ZONE)
    assert await MxResolver(fake).host("2001:db8::1") == Exchanger("2001:db8::1", None, ("2001:db8::1",))
    assert fake.queries == []


async def test_a_bug_in_a_lookup_is_not_hidden_as_a_skipped_host():
    zone = dict(ZONE, **{"mx.partly.test": {"A": ZeroDivisionError("bug")}})
    with pytest.raises(ZeroDivisionError):
        await resolver(zone).exchangers("partly.test")


# ------------------------------------------------------------------------- make_resolver


def test_make_resolver_takes_nameservers_with_ports_and_the_timeout():
    built = make_resolver(DnsConfig(nameservers=("127.0.0.1:5353", "192.0.2.53", "[2001:db8::53]:54",
                                                  "2001:db8::35"), timeout=1.5))
    assert [(ns.address, ns.port) for ns in built.dns_resolver.nameservers] == [
        ("127.0.0.1", 5353), ("192.0.2.53", 53), ("2001:db8::53", 54), ("2001:db8::35", 53)]
    assert built.dns_resolver.lifetime == 1.5


# ------------------------------------------------------------------------- Router


def router(routes: str | None = None, port: int = 25) -> Router:
    table = RouteTable.parse(routes, "routes") if routes is not None else None
    return Router(table, resolver(), port)


async def test_no_route_uses_the_mx_hosts_on_the_default_port():
    assert await router(port=2525).route("Two.Test") == Destination("two.test", (
        Target("mx1.two.test", "127.0.0.11", 2525, 10),
        Target("mx1.two.test", "127.0.0.12", 2525, 10),
        Target("mx1.two.test", "::1", 2525, 10),
        Target("mx2.two.test", "127.0.0.21", 2525, 20),
    ))


async def test_ip_literal_route_needs_no_dns():
    destination = await router("two.test [192.0.2.1]:2525\n").route("two.test")
    assert destination == Destination("[192.0.2.1]:2525", (Target("192.0.2.1", "192.0.2.1", 2525, None),))


async def test_bracketed_host_route_uses_its_addresses_not_its_mx():
    destination = await router("* [implicit.test]\n").route("two.test")
    assert destination == Destination("[implicit.test]", (
        Target("implicit.test", "127.0.2.1", 25, None, name_secure=True),
        Target("implicit.test", "::1", 25, None, name_secure=True)))


async def test_host_route_uses_the_mx_hosts_of_that_host_and_the_route_port():
    destination = await router(".example smtp:two.test:2525\n").route("sub.example")
    assert destination.nexthop == "two.test:2525"
    assert [(t.address, t.port, t.preference) for t in destination.targets] == [
        ("127.0.0.11", 2525, 10), ("127.0.0.12", 2525, 10), ("::1", 2525, 10), ("127.0.0.21", 2525, 20)]


async def test_default_entry_routes_by_the_domain():
    destination = await router("two.test :\n* [192.0.2.1]\n").route("two.test")
    assert destination.nexthop == "two.test"
    assert destination.targets[0].hostname == "mx1.two.test"


async def test_permanent_dns_answer_for_a_route_is_a_451_4_3_5_configuration_problem():
    error = await failure(router("* [nonexistent.test]\n").route("two.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.3.5")
    assert "route to [nonexistent.test] (routes:1): configuration problem" in error.reply.text
    assert error.reason.startswith("route routes:1: A lookup of nonexistent.test: NXDOMAIN")


async def test_temporary_dns_failure_for_a_route_stays_451_4_4_3():
    error = await failure(router("* timeout.test\n").route("two.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.3")


async def test_permanent_dns_answer_for_the_recipient_domain_stays_permanent():
    error = await failure(router("other.test [192.0.2.1]\n").route("null.test"))
    assert (error.reply.code, error.reply.enhanced) == (556, "5.1.10")


@pytest.mark.parametrize(("domain", "address"), [("[192.0.2.7]", "192.0.2.7"),
                                                 ("[IPv6:2001:db8::7]", "2001:db8::7")])
async def test_address_literal_domain_goes_to_that_address(domain, address):
    assert await router().route(domain) == Destination(domain.lower(), (Target(address, address, 25, None),))


async def test_invalid_address_literal_domain_is_550_5_1_2():
    error = await failure(router().route("[192.0.2.300]"))
    assert (error.reply.code, error.reply.enhanced) == (550, "5.1.2")
