"""The policy one MX host gets when DANE and MTA-STS both have a say (connector.py
`_host_policy`): the table, then DANE, then MTA-STS, then the default level; and an
enforced MTA-STS policy's MX list is never bypassed.  The TLSA records come from a real
validating Unbound serving a signed zone (tests/integration/dns_server.py); no connection
is made, only the decision is looked at.

    <kind>.listed.example.test    listed by the MTA-STS policy (mx: *.listed.example.test)
    <kind>.attacker.example.test  not listed
    kind: usable (TLSA 3 1 1), unusable (TLSA 1 1 1, PKIX-EE), none (no TLSA)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from smtproxy.config import DnsConfig, OutboundTlsConfig
from smtproxy.events import EventBus, HandshakeFacts
from smtproxy.outbound.connector import ConnectSettings, Connector, _HostContext, _policy_facts, _TryNext
from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.policy.mta_sts import StsFailure, parse_policy
from smtproxy.routing.mx import make_resolver
from smtproxy.routing.router import Target
from smtproxy.tls.client_context import ClientTls
from smtproxy.tls.session_cache import SessionCache
from tests.integration.dns_server import Unbound, requires_unbound

pytestmark = [pytest.mark.integration, requires_unbound]

DOMAIN = "example.test"
ENFORCE = parse_policy(DOMAIN, "1", "version: STSv1\nmode: enforce\nmx: *.listed.example.test\nmax_age: 86400\n")
TESTING = parse_policy(DOMAIN, "1", "version: STSv1\nmode: testing\nmx: *.listed.example.test\nmax_age: 86400\n")
TLSA = {"usable": "3 1 1 " + "ab" * 32, "unusable": "1 1 1 " + "cd" * 32}


def host(kind: str, listed: bool) -> Target:
    """Its name came from insecure DNS (a forgeable MX), its addresses were validated."""
    name = f"{kind}.{'listed' if listed else 'attacker'}.{DOMAIN}"
    return Target(name, "127.0.0.1", 25, 10, name_secure=False, addresses_secure=True)


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory) -> Iterator[Unbound]:
    records = []
    for group in ("listed", "attacker"):
        for kind in ("usable", "unusable", "none"):
            records.append(f"{kind}.{group}.{DOMAIN}. A 127.0.0.1")
            if kind in TLSA:
                records.append(f"_25._tcp.{kind}.{group}.{DOMAIN}. TLSA {TLSA[kind]}")
    server = Unbound(tmp_path_factory.mktemp("host-policy-unbound"), [], zones=(),
                     signed_zones={f"{DOMAIN}.": records}).start()
    yield server
    server.stop()


@pytest.fixture
def published() -> list[HandshakeFacts]:
    return []


def connector(published: list[HandshakeFacts], server: Unbound | None) -> Connector:
    """`server`: the validating resolver ([dns] dnssec = true); None: DNSSEC off."""
    bus = EventBus()
    bus.subscribe(HandshakeFacts, published.append)
    resolver = None
    if server is not None:
        resolver = make_resolver(DnsConfig((server.nameserver,), dnssec=True)).dns_resolver
    return Connector(ConnectSettings("out.example.test", 5, 5, 5), ClientTls(OutboundTlsConfig(), None), bus,
                     SessionCache(60), resolver=resolver)


async def host_policy(published, server: Unbound | None, target: Target, level: Level, sts=None,
                      sts_failure=None) -> Policy:
    decision = PolicyDecision(Policy(level), "default_level")
    return await connector(published, server)._host_policy(DOMAIN, target, decision,
                                                        _HostContext({}, sts, sts_failure))


async def test_the_records_as_the_real_resolver_gives_them(dns_server, published):
    """The control for the tests below: without MTA-STS, DANE decides."""
    usable = await host_policy(published, dns_server, host("usable", False), Level.MAY)
    unusable = await host_policy(published, dns_server, host("unusable", False), Level.MAY)
    none = await host_policy(published, dns_server, host("none", False), Level.MAY)
    assert usable.dane is not None and [str(r) for r in usable.dane.records] == [TLSA["usable"].upper()]
    assert (unusable.level, unusable.dane) == (Level.ENCRYPT, None)
    assert none == Policy(Level.MAY)


@pytest.mark.parametrize("kind", ["usable", "unusable", "none"])
async def test_an_unlisted_mx_is_refused_under_enforce_whatever_its_tlsa_records(kind, dns_server, published):
    """An attacker who forged the MX record (insecure MX) towards a host in a zone of their
    own, with TLSA records for their own key, must not get the mail."""
    with pytest.raises(_TryNext, match=f"MX host {kind}.attacker.example.test is not in the MTA-STS policy"):
        await host_policy(published, dns_server, host(kind, False), Level.MAY, ENFORCE)
    [refused] = published
    assert (refused.failure_type, refused.failure_reason, refused.tlsrpt_policy_type) == (
        "validation-failure", "mx_not_in_policy", "sts")


async def test_usable_tlsa_records_of_a_listed_mx_authenticate_it(dns_server, published):
    policy = await host_policy(published, dns_server, host("usable", True), Level.MAY, ENFORCE)
    assert policy.dane is not None and policy.level is Level.MAY  # DANE authenticates (RFC 8461 2)


async def test_unusable_tlsa_records_do_not_lower_enforce_to_encrypt(dns_server, published):
    policy = await host_policy(published, dns_server, host("unusable", True), Level.MAY, ENFORCE)
    assert (policy.level, policy.match, policy.min_protocol, policy.sts) == (
        Level.VERIFY, ("hostname",), "TLSv1.2", ENFORCE)


@pytest.mark.parametrize("level", [Level.VERIFY, Level.SECURE])
async def test_enforce_never_weakens_a_stricter_default(level, published):
    policy = await host_policy(published, None, host("none", True), level, ENFORCE)
    assert (policy.level, policy.match, policy.min_protocol, policy.sts) == (level, (), "TLSv1.2", ENFORCE)


async def test_testing_keeps_the_level_and_only_marks_the_policy(dns_server, published):
    policy = await host_policy(published, dns_server, host("none", False), Level.MAY, TESTING)
    assert (policy.level, policy.sts) == (Level.MAY, TESTING)
    assert published == []


async def test_a_policy_that_could_not_be_had_marks_the_host_policy_for_tlsrpt(dns_server, published):
    failure = StsFailure(DOMAIN, "sts-policy-fetch-error", "connection refused")
    policy = await host_policy(published, dns_server, host("unusable", True), Level.MAY, sts_failure=failure)
    assert (policy.level, policy.sts, policy.sts_failure) == (Level.ENCRYPT, None, failure)  # DANE's, marked
    assert _policy_facts(policy) == {"tlsrpt_failure": ("sts-policy-fetch-error", "connection_refused")}
    other = dataclasses.replace(failure, reason="no answer within 0.9 s")  # the same failure, other words
    assert dataclasses.replace(policy, sts_failure=other) == policy  # one TLS session key for both
