"""MTA-STS (RFC 8461) as policy/mta_sts.py reads it: records, policies, matching and the
cache rules.  The fetch itself runs against a real HTTPS server in
tests/integration/test_mta_sts.py; here it is replaced, to count and to fail on demand."""

from __future__ import annotations

import asyncio
import ssl
import time

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
import trustme

from smtproxy.policy import mta_sts
from smtproxy.policy.mta_sts import (
    StsCache,
    StsError,
    StsPolicies,
    StsPolicy,
    https_context,
    parse_policy,
    parse_record,
)

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


@pytest.mark.parametrize(("texts", "policy_id"), [
    (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
    (["v=STSv1;id=abc", "v=spf1 -all"], "abc"),
    (["v=STSv1; id=abc", "v=STSv1; id=def"], None),  # two: none (RFC 8461 3.1)
    (["v=STSv1; id=a-b"], None),  # not alphanumeric
    (["v=STSv1; id=" + "a" * 33], None),  # too long
    (["v=STSv1"], None),  # no id
    (["v=STSv10; id=abc"], None),
    ([], None),
])
def test_record(texts, policy_id):
    assert parse_record(texts) == policy_id


def test_policy_fields_and_lines():
    policy = parse_policy("example.com", "1", POLICY)
    assert (policy.mode, policy.mx, policy.max_age) == ("enforce", ("mail.example.com", "*.example.net"), 86400)
    assert policy.lines == ("version: STSv1", "mode: enforce", "mx: mail.example.com", "mx: *.example.net",
                            "max_age: 86400")
    assert parse_policy("example.com", "1", "version: STSv1\nmode: none\nmax_age: 0\nfuture: x\n").mode == "none"
    # more than RFC 8461's year is kept a year, not refused (which would drop an enforce policy)
    assert parse_policy("example.com", "1", POLICY.replace("86400", "99999999")).max_age == 31_557_600


@pytest.mark.parametrize(("text", "why"), [
    (POLICY.replace("STSv1", "STSv2"), "version"),
    (POLICY.replace("enforce", "strict"), "mode"),
    (POLICY.replace("86400", "-1"), "max_age"),
    (POLICY.replace("86400", "\u00b2"), "max_age"),  # a digit to str.isdigit, not to int()
    (POLICY.replace("86400", "12345678901"), "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 60\n", "no mx"),
    (POLICY + "garbage\n", "malformed"),
])
def test_invalid_policies(text, why):
    with pytest.raises(StsError) as error:
        parse_policy("example.com", "1", text)
    assert error.value.result_type == "sts-policy-invalid" and why in error.value.reason


@pytest.mark.parametrize(("host", "allowed"), [
    ("mail.example.com", True), ("MAIL.example.com.", True), ("x.example.net", True),
    ("example.net", False), ("a.b.example.net", False), ("other.example.com", False),
])
def test_mx_patterns(host, allowed):
    assert parse_policy("example.com", "1", POLICY).allows(host) is allowed


async def test_the_cache_survives_a_new_process_and_expires(tmp_path):
    path = tmp_path / "sts" / "cache.sqlite"
    policy = parse_policy("example.com", "1", POLICY)
    first = StsCache(path)
    await first.put(policy, POLICY, time.time() + 60)
    first.close()
    again = StsCache(path)
    assert await again.get("example.com", time.time()) == policy
    assert await again.get("example.com", time.time() + 61) is None


async def test_a_cache_file_that_cannot_be_used_leaves_the_policy_in_memory_and_is_tried_again(
        tmp_path, monkeypatch):
    monkeypatch.setattr(mta_sts, "REOPEN_DELAY", 0.0)  # at once, not a minute later
    blocker = tmp_path / "state"
    blocker.write_text("")  # a file where the cache's directory should be
    cache = StsCache(blocker / "cache.sqlite")
    policy = parse_policy("example.com", "1", POLICY)
    await cache.put(policy, POLICY, time.time() + 60)
    assert await cache.get("example.com", time.time()) == policy
    blocker.unlink()
    other = parse_policy("example.org", "1", POLICY)
    await cache.put(other, POLICY, time.time() + 60)
    assert await StsCache(blocker / "cache.sqlite").get("example.org", time.time()) == other


class _Resolver:
    """`_mta-sts` TXT answers from a table; a name absent from it is NXDOMAIN."""

    def __init__(self) -> None:
        self.txt: dict[str, str] = {}
        self.ttl = 0  # answers are not remembered unless a test says so
        self.queries = 0

    async def resolve(self, qname: str, rdtype: str, **_options) -> dns.resolver.Answer:
        self.queries += 1
        if qname not in self.txt:
            raise dns.resolver.NXDOMAIN()
        query = dns.message.make_query(qname, rdtype)
        response = dns.message.make_response(query)
        rrset = response.find_rrset(response.answer, query.question[0].name, dns.rdataclass.IN,
                                    dns.rdatatype.TXT, create=True)
        rrset.update(dns.rrset.from_text(query.question[0].name, self.ttl, "IN", "TXT", f'"{self.txt[qname]}"'))
        return dns.resolver.Answer(dns.name.from_text(qname), dns.rdatatype.TXT, dns.rdataclass.IN, response)


class _Policies(StsPolicies):
    """The real lookup and cache logic; the HTTPS fetch answers `body` or fails."""

    def __init__(self, cache: StsCache) -> None:
        super().__init__(_Resolver(), cache, https_context(None), fetch_timeout=1.0)
        self.body: str | StsError = POLICY
        self.fetches = 0

    async def _get(self, host: str, deadline: float) -> str:
        self.fetches += 1
        if isinstance(self.body, StsError):
            raise self.body
        return self.body


@pytest.fixture
def policies(tmp_path, monkeypatch) -> _Policies:
    monkeypatch.setattr(mta_sts, "NO_RECORD_TTL", 0.0)  # every call asks DNS again
    return _Policies(StsCache(tmp_path / "cache.sqlite"))


async def test_the_record_is_asked_once_per_ttl(tmp_path):
    """Mail to a domain without MTA-STS (most mail) costs no TXT query per connection."""
    policies = _Policies(StsCache(None))
    for _ in range(3):
        assert await policies.policy_for("plain.example") is None
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=1"
    policies.resolver.ttl = 300
    for _ in range(3):
        assert (await policies.policy_for("example.com")).policy_id == "1"
    assert (policies.resolver.queries, policies.fetches) == (2, 1)


async def test_no_record_no_policy(policies):
    assert await policies.policy_for("example.com") is None
    assert policies.fetches == 0


async def test_fetched_once_per_id(policies):
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=1"
    first = await policies.policy_for("example.com")
    assert isinstance(first, StsPolicy) and first.policy_id == "1"
    assert await policies.policy_for("example.com") == first
    assert policies.fetches == 1
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=2"
    policies.body = POLICY.replace("enforce", "testing")
    assert (await policies.policy_for("example.com")).mode == "testing"
    assert policies.fetches == 2


async def test_a_cached_policy_outlives_a_missing_record_and_a_failed_fetch(policies):
    """RFC 8461 5.1 and 10.2: blocking DNS or HTTPS must not switch the policy off."""
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=1"
    cached = await policies.policy_for("example.com")
    del policies.resolver.txt["_mta-sts.example.com"]
    assert await policies.policy_for("example.com") == cached
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=2"
    policies.body = StsError("sts-policy-fetch-error", "connection refused")
    assert await policies.policy_for("example.com") == cached


async def test_without_a_cached_policy_a_failed_fetch_is_an_error_and_not_retried_at_once(policies):
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=1"
    policies.body = "version: STSv1\nmode: enforce\n"
    for _ in range(3):
        with pytest.raises(StsError) as error:
            await policies.policy_for("example.com")
        assert error.value.result_type == "sts-policy-invalid"
    assert policies.fetches == 1


class _AddressResolver:
    """mta-sts.<domain> has the given IPv4 addresses; nothing else exists."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(self, qname: str, rdtype: str, **_options) -> list:
        if rdtype != "A":
            raise dns.resolver.NoAnswer()
        return [type("A", (), {"address": address})() for address in self.addresses]


async def test_a_silent_policy_server_costs_no_more_than_the_fetch_timeout():
    """A server that accepts and never answers the TLS handshake: the fetch gives up at
    `fetch_timeout`, not when the transport's own close times out (30 s), and leaves
    nothing open behind it."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    policies = StsPolicies(_AddressResolver(["127.0.0.1", "127.0.0.1"]), StsCache(None), https_context(None),
                           fetch_timeout=1.0)
    policies.port = port
    started = time.monotonic()
    with pytest.raises(StsError) as error:
        await policies._fetch("example.com", "1", time.time())
    elapsed = time.monotonic() - started
    server.close()
    for writer in held:
        writer.close()
    await server.wait_closed()
    assert elapsed < 3.0, elapsed
    assert error.value.result_type == "sts-policy-fetch-error"
    assert error.value.reason.count("no answer within") == 2  # each address had its share


async def test_deliveries_that_start_together_wait_for_one_fetch(policies):
    policies.resolver.txt["_mta-sts.example.com"] = "v=STSv1; id=1"
    found = await asyncio.gather(*(policies.policy_for("example.com") for _ in range(20)))
    assert {policy.policy_id for policy in found} == {"1"}
    assert policies.fetches == 1


async def test_a_policy_host_with_an_untrusted_certificate_is_sts_webpki_invalid():
    """RFC 8460 4.3.2.2: not a fetch error, a WebPKI one."""
    ca = trustme.CA()  # trusted by nobody here
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("mta-sts.example.com").configure_cert(context)

    async def serve(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    policies = StsPolicies(_AddressResolver(["127.0.0.1"]), StsCache(None), https_context(None), fetch_timeout=5.0)
    policies.port = server.sockets[0].getsockname()[1]
    with pytest.raises(StsError) as error:
        await policies._fetch("example.com", "1", time.time())
    server.close()
    await server.wait_closed()
    assert error.value.result_type == "sts-webpki-invalid" and "certificate" in error.value.reason


async def test_what_is_remembered_of_dns_stays_bounded(monkeypatch):
    monkeypatch.setattr(mta_sts, "MAX_REMEMBERED", 2)
    policies = _Policies(StsCache(None))
    for name in ("a.example", "b.example", "c.example", "b.example"):
        await policies.policy_for(name)
    assert list(policies._announced) == ["b.example", "c.example"]  # the oldest went; b was still known
    assert policies.resolver.queries == 3
