"""Issue 7 item 2 acceptance: MX/A/AAAA routing against a real Unbound on 127.0.0.1.

One Unbound serves every zone of this module (`dns_server`); the timeout test talks to
a UDP socket of its own that never answers. Every address is on 127.0.0.0/8 or ::1.
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest

from smtproxy.config import DnsConfig
from smtproxy.routing.mx import Exchanger, MxResolver, RoutingError, make_resolver
from smtproxy.routing.router import Destination, Router, Target
from smtproxy.routing.routes import RouteTable
from tests.integration.dns_server import Unbound, requires_unbound
from tests.integration.peers import LOOPBACK

pytestmark = [pytest.mark.integration, requires_unbound]

RECORDS = [
    # two MX hosts, listed worst first: the order comes from the preference
    "two.test. MX 20 mx2.two.test.",
    "two.test. MX 10 mx1.two.test.",
    "mx1.two.test. A 127.0.0.11",
    "mx1.two.test. A 127.0.0.12",
    "mx1.two.test. AAAA ::1",
    "mx2.two.test. A 127.0.0.21",
    # three hosts of equal preference, one backup
    "equal.test. MX 10 a.equal.test.",
    "equal.test. MX 10 b.equal.test.",
    "equal.test. MX 10 c.equal.test.",
    "equal.test. MX 20 z.equal.test.",
    "a.equal.test. A 127.0.1.1",
    "b.equal.test. A 127.0.1.2",
    "c.equal.test. A 127.0.1.3",
    "z.equal.test. A 127.0.1.9",
    # no MX: the domain's own addresses
    "implicit.test. A 127.0.2.1",
    "implicit.test. AAAA ::1",
    # exists, but neither MX nor address
    'nothing.test. TXT "v=spf1 -all"',
    "null.test. MX 0 .",
    # MX hosts that cannot be used: no such name, an alias, no address, a server failure
    "broken.test. MX 10 gone.broken.test.",
    "broken.test. MX 20 alias.broken.test.",
    "broken.test. MX 30 empty.broken.test.",
    "alias.broken.test. CNAME mx1.two.test.",
    'empty.broken.test. TXT "no address"',
    "partly.test. MX 10 alias.broken.test.",
    "partly.test. MX 20 gone.partly.test.",
    "partly.test. MX 30 mx.partly.test.",
    "mx.partly.test. A 127.0.3.1",
    "failing.test. MX 10 mx.servfail.example.",
    "failing.test. MX 20 gone.failing.test.",
    # a smarthost for the routes table
    "relay.test. A 127.0.5.1",
]


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    server = Unbound(tmp_path_factory.mktemp("unbound"), RECORDS).start()
    yield server
    server.stop()


def resolver(server: Unbound, seed: int = 0) -> MxResolver:
    return make_resolver(DnsConfig(nameservers=(server.nameserver,), timeout=5.0), random.Random(seed))


async def failure(awaitable) -> RoutingError:
    with pytest.raises(RoutingError) as caught:
        await awaitable
    return caught.value


async def test_preference_order_with_ipv4_before_ipv6(dns_server):
    assert await resolver(dns_server).exchangers("two.test") == (
        Exchanger("mx1.two.test", 10, ("127.0.0.11", "127.0.0.12", "::1")),
        Exchanger("mx2.two.test", 20, ("127.0.0.21",)),
    )


async def test_router_tries_every_address_of_the_primary_then_the_backup(dns_server):
    router = Router(None, resolver(dns_server), 25)
    assert await router.route("two.test") == Destination("two.test", (
        Target("mx1.two.test", "127.0.0.11", 25, 10),
        Target("mx1.two.test", "127.0.0.12", 25, 10),
        Target("mx1.two.test", "::1", 25, 10),
        Target("mx2.two.test", "127.0.0.21", 25, 20),
    ))


async def test_equal_preference_shuffle_is_deterministic_with_a_seeded_random(dns_server):
    orders = {}
    for seed in range(40):
        exchangers = await resolver(dns_server, seed).exchangers("equal.test")
        orders[seed] = tuple(exchanger.hostname for exchanger in exchangers)
    assert {order[3] for order in orders.values()} == {"z.equal.test"}
    assert len({order[:3] for order in orders.values()}) == 6
    again = await resolver(dns_server, 11).exchangers("equal.test")
    assert tuple(exchanger.hostname for exchanger in again) == orders[11]


async def test_implicit_mx_uses_the_domains_own_addresses(dns_server):
    assert await resolver(dns_server).exchangers("implicit.test") == (
        Exchanger("implicit.test", None, ("127.0.2.1", "::1"), name_secure=True),
    )


async def test_null_mx_is_556_5_1_10(dns_server):
    error = await failure(resolver(dns_server).exchangers("null.test"))
    assert error.reply.serialize() == b"556 5.1.10 Domain null.test does not accept mail (nullMX)\r\n"


async def test_nxdomain_is_550_5_1_2(dns_server):
    error = await failure(resolver(dns_server).exchangers("nonexistent.test"))
    assert (error.reply.code, error.reply.enhanced) == (550, "5.1.2")
    assert error.reason == "MX lookup of nonexistent.test: NXDOMAIN"


async def test_domain_without_mx_or_address_is_550_5_4_4(dns_server):
    error = await failure(resolver(dns_server).exchangers("nothing.test"))
    assert (error.reply.code, error.reply.enhanced) == (550, "5.4.4")


async def test_unusable_mx_hosts_are_skipped(dns_server):
    assert await resolver(dns_server).exchangers("partly.test") == (
        Exchanger("mx.partly.test", 30, ("127.0.3.1",)),
    )


async def test_all_mx_hosts_unusable_is_451_4_4_4(dns_server):
    error = await failure(resolver(dns_server).exchangers("broken.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.4")
    for host in ("gone.broken.test", "alias.broken.test", "empty.broken.test"):
        assert host in error.reason


async def test_servfail_is_451_4_4_3(dns_server):
    error = await failure(resolver(dns_server).exchangers("servfail.example"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.3")
    assert error.reason == ("MX lookup of servfail.example: "
                            "server failure (SERVFAIL, REFUSED or unreachable)")


async def test_unusable_mx_hosts_with_a_servfail_among_them_is_451_4_4_3(dns_server):
    error = await failure(resolver(dns_server).exchangers("failing.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.3")


async def test_timeout_is_451_4_4_3_within_the_configured_time():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        config = DnsConfig(nameservers=(f"{LOOPBACK}:{silent.getsockname()[1]}",), timeout=0.5)
        started = time.monotonic()
        error = await failure(make_resolver(config).exchangers("two.test"))
        elapsed = time.monotonic() - started
    assert (error.reply.code, error.reply.enhanced) == (451, "4.4.3")
    assert error.reason == "MX lookup of two.test: timeout"
    assert elapsed < 2.0


async def test_routes_table_overrides_mx(dns_server, tmp_path):
    path = tmp_path / "routes"
    path.write_text(
        "two.test       [relay.test]:2525\n"
        ".two.test      smtp:two.test:587\n"
        "implicit.test  [127.0.0.99]\n"
        "*              [relay.test]\n"
    )
    router = Router(RouteTable.load(path), resolver(dns_server), 25)
    assert await router.route("two.test") == Destination(
        "[relay.test]:2525", (Target("relay.test", "127.0.5.1", 2525, None, name_secure=True),))
    sub = await router.route("a.two.test")
    assert sub.nexthop == "two.test:587"
    assert [(t.hostname, t.address, t.port) for t in sub.targets] == [
        ("mx1.two.test", "127.0.0.11", 587), ("mx1.two.test", "127.0.0.12", 587),
        ("mx1.two.test", "::1", 587), ("mx2.two.test", "127.0.0.21", 587)]
    assert await router.route("implicit.test") == Destination(
        "[127.0.0.99]", (Target("127.0.0.99", "127.0.0.99", 25, None),))
    assert (await router.route("null.test")).nexthop == "[relay.test]"


async def test_route_to_a_missing_host_is_a_temporary_configuration_problem(dns_server):
    router = Router(RouteTable.parse("* [missing.test]\n", "routes"), resolver(dns_server), 25)
    error = await failure(router.route("two.test"))
    assert (error.reply.code, error.reply.enhanced) == (451, "4.3.5")
