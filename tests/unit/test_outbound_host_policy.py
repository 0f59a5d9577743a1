"""The policy one MX host gets when DANE and MTA-STS both have a say (connector.py
`_host_policy`): the table, then DANE, then MTA-STS, then the default level; and an
enforced MTA-STS policy's MX list is never bypassed.  TLSA lookups are replaced here (the
real ones run against a validating Unbound in tests/integration/test_dane.py)."""

from __future__ import annotations

import dataclasses

import pytest

from smtproxy.config import OutboundTlsConfig
from smtproxy.events import EventBus, HandshakeFacts
from smtproxy.outbound import connector as connector_module
from smtproxy.outbound.connector import ConnectSettings, Connector, _HostContext, _policy_facts, _TryNext
from smtproxy.policy.dane import Tlsa, TlsaLookup, TlsaStatus
from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.policy.mta_sts import StsFailure, parse_policy
from smtproxy.routing.router import Target
from smtproxy.tls.client_context import ClientTls
from smtproxy.tls.session_cache import SessionCache

ENFORCE = parse_policy("example.com", "1", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n")
TESTING = parse_policy("example.com", "1", "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n")
LISTED = Target("mx.example.com", "192.0.2.1", 25, 10, name_secure=False, addresses_secure=True)
UNLISTED = Target("mx.attacker.example", "203.0.113.5", 25, 10, name_secure=False, addresses_secure=True)


@pytest.fixture
def published() -> list[HandshakeFacts]:
    return []


def connector(published: list[HandshakeFacts], *, dnssec: bool = True) -> Connector:
    bus = EventBus()
    bus.subscribe(HandshakeFacts, published.append)
    return Connector(ConnectSettings("out.example.test", 5, 5, 5), ClientTls(OutboundTlsConfig(), None), bus,
                     SessionCache(60), resolver=object() if dnssec else None)  # the resolver is never asked here


@pytest.fixture
def tlsa(monkeypatch) -> dict[str, TlsaStatus]:
    """Host name -> what its TLSA lookup finds (default: nothing)."""
    found: dict[str, TlsaStatus] = {}

    async def lookup(_resolver, hostname: str, port: int) -> TlsaLookup:
        status = found.get(hostname, TlsaStatus.NONE)
        records = (Tlsa(3, 1, 1, bytes(32)),) if status is TlsaStatus.USABLE else ()
        return TlsaLookup(status, f"_{port}._tcp.{hostname}", records)

    monkeypatch.setattr(connector_module, "lookup_tlsa", lookup)
    return found


async def host_policy(published, target: Target, level: Level, sts, **options) -> Policy:
    decision = PolicyDecision(Policy(level), "default_level")
    return await connector(published, **options)._host_policy("example.com", target, decision,
                                                              _HostContext({}, sts))


@pytest.mark.parametrize("status", [TlsaStatus.USABLE, TlsaStatus.UNUSABLE, TlsaStatus.NONE])
async def test_an_unlisted_mx_is_refused_under_enforce_whatever_its_tlsa_records(status, tlsa, published):
    """An attacker who forged the MX record (insecure MX) towards a host in a zone of their
    own, with TLSA records for their own key, must not get the mail."""
    tlsa[UNLISTED.hostname] = status
    with pytest.raises(_TryNext, match="MX host mx.attacker.example is not in the MTA-STS policy of example.com"):
        await host_policy(published, UNLISTED, Level.MAY, ENFORCE)
    [refused] = published
    assert (refused.failure_type, refused.failure_reason, refused.tlsrpt_policy_type) == (
        "validation-failure", "mx_not_in_policy", "sts")


async def test_usable_tlsa_records_of_a_listed_mx_authenticate_it(tlsa, published):
    tlsa[LISTED.hostname] = TlsaStatus.USABLE
    policy = await host_policy(published, LISTED, Level.MAY, ENFORCE)
    assert policy.dane is not None and policy.level is Level.MAY  # DANE authenticates (RFC 8461 2)


async def test_unusable_tlsa_records_do_not_lower_enforce_to_encrypt(tlsa, published):
    tlsa[LISTED.hostname] = TlsaStatus.UNUSABLE
    policy = await host_policy(published, LISTED, Level.MAY, ENFORCE)
    assert (policy.level, policy.match, policy.min_protocol, policy.sts) == (
        Level.VERIFY, ("hostname",), "TLSv1.2", ENFORCE)


@pytest.mark.parametrize("level", [Level.VERIFY, Level.SECURE, Level.FINGERPRINT])
async def test_enforce_never_weakens_a_stricter_default(level, tlsa, published):
    policy = await host_policy(published, LISTED, level, ENFORCE, dnssec=False)
    assert (policy.level, policy.match, policy.sts) == (level, (), ENFORCE)


async def test_a_policy_that_could_not_be_had_marks_the_host_policy_for_tlsrpt(tlsa, published):
    failure = StsFailure("example.com", "sts-policy-fetch-error", "connection refused")
    decision = PolicyDecision(Policy(Level.MAY), "default_level")
    policy = await connector(published)._host_policy("example.com", LISTED, decision,
                                                     _HostContext({}, None, failure))
    assert (policy.level, policy.sts, policy.sts_failure) == (Level.MAY, None, failure)
    assert _policy_facts(policy) == {"tlsrpt_failure": ("sts-policy-fetch-error", "connection_refused")}
    other = dataclasses.replace(failure, reason="no answer within 0.9 s")  # the same failure, other words
    assert dataclasses.replace(policy, sts_failure=other) == policy  # one TLS session key for both


async def test_testing_keeps_the_level_and_only_marks_the_policy(tlsa, published):
    policy = await host_policy(published, UNLISTED, Level.MAY, TESTING)
    assert (policy.level, policy.sts) == (Level.MAY, TESTING)
    assert published == []
