"""The TLSRPT reporter: which handshake facts become datagrams, what they hold, the
Postfix log line, and that a missing, full or slow collector never blocks (a real unix
datagram socket in tmp_path plays the collector)."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator

import dns.asyncresolver
import pytest
import structlog

from smtproxy.config import TlsrptConfig
from smtproxy.events import (
    Direction,
    EventBus,
    HandshakeFacts,
    TlsrptEventDropped,
    TlsrptEventSent,
)
from smtproxy.telemetry import tlsrpt
from smtproxy.telemetry.tlsrpt import DatagramSender, TlsrptReporter
from tests.unit.test_tlsrpt_record import GOOD, small_dns  # noqa: F401  (small_dns is a fixture)

RECORD = "v=TLSRPTv1; rua=mailto:tlsrpt@example.test"

SUCCESS = HandshakeFacts(
    direction=Direction.OUTBOUND, peer_name="mx.example.test", peer_addr="192.0.2.25", peer_port=25,
    protocol="TLSv1.3", domain="example.test", local_addr="192.0.2.7", peer_helo="mx.example.test",
    policy_level="verify")
SELF_SIGNED = dataclasses.replace(SUCCESS, failure_type="validation-failure",
                                  failure_reason="self-signed_certificate")


def facts(**changes) -> HandshakeFacts:
    return dataclasses.replace(SUCCESS, **changes)


class Records:
    """Stands in for TlsrptRecords: a fixed table; remembers what was asked."""

    def __init__(self, records: dict[str, str]) -> None:
        self.records = records
        self.asked: list[str] = []

    async def lookup(self, domain: str) -> str | None:
        self.asked.append(domain)
        return self.records.get(domain)


class Collector:
    """A bound unix datagram socket that reads only when asked."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(path)
        self.socket.setblocking(False)

    def datagrams(self) -> list[dict]:
        received = []
        while True:
            try:
                received.append(json.loads(self.socket.recv(65536)))
            except BlockingIOError:
                return received


@pytest.fixture
def collector(tmp_path) -> Iterator[Collector]:
    collector = Collector(str(tmp_path / "collectd.sock"))
    yield collector
    collector.socket.close()


@dataclasses.dataclass
class Run:
    reporter: TlsrptReporter
    records: Records
    published: list[object]


def reporter_for(path: str, *, skip_resumed: bool = True, clock=time.monotonic,
                 records: dict[str, str] | None = None) -> Run:
    bus = EventBus()
    published: list[object] = []
    bus.subscribe(TlsrptEventSent, published.append)
    bus.subscribe(TlsrptEventDropped, published.append)
    table = Records({"example.test": RECORD} if records is None else records)
    reporter = TlsrptReporter(bus, table, DatagramSender(path), skip_resumed=skip_resumed, clock=clock)
    bus.subscribe(HandshakeFacts, reporter.on_handshake)
    return Run(reporter, table, published)


async def report(run: Run, *items: HandshakeFacts) -> None:
    for item in items:
        run.reporter.on_handshake(item)
    await run.reporter.close(timeout=5)


# ----------------------------------------------------------------------- what is reported


async def test_success_datagram(collector):
    run = reporter_for(collector.path)
    await report(run, SUCCESS)
    assert collector.datagrams() == [{"dpv": "1", "d": "example.test", "pr": RECORD, "policies": [
        {"policy-type": 9, "policy-domain": "example.test", "t": 0, "f": 0}]}]
    assert run.published == [TlsrptEventSent("success", "")]


async def test_failure_datagram(collector):
    run = reporter_for(collector.path)
    await report(run, SELF_SIGNED)
    assert collector.datagrams() == [{"dpv": "1", "d": "example.test", "pr": RECORD, "policies": [
        {"policy-type": 9, "policy-domain": "example.test",
         "failure-details": [{"c": 205, "s": "192.0.2.7", "n": "mx.example.test", "h": "mx.example.test",
                              "r": "192.0.2.25", "f": "self-signed_certificate"}],
         "t": 1, "f": 1}]}]
    assert run.published == [TlsrptEventSent("failure", "validation-failure")]


@pytest.mark.parametrize("item", [
    facts(reused=True),
    facts(resumed=True),
    facts(direction=Direction.INBOUND),
    facts(domain=None),
    facts(failure_type="starttls-not-supported", failure_reason="starttls_refused_454", policy_level="may"),
    facts(failure_type="starttls-not-supported", failure_reason="starttls_refused_454", policy_level="dane"),
], ids=["reused", "resumed", "inbound", "no-domain", "starttls-under-may", "starttls-under-dane"])
async def test_not_reported_and_not_looked_up(collector, item):
    run = reporter_for(collector.path)
    await report(run, item)
    assert collector.datagrams() == []
    assert run.records.asked == []
    assert run.published == []


async def test_resumed_sessions_are_reported_when_not_skipped(collector):
    run = reporter_for(collector.path, skip_resumed=False)
    await report(run, facts(resumed=True), facts(resumed=True, reused=True))
    assert [datagram["policies"][0]["f"] for datagram in collector.datagrams()] == [0]


@pytest.mark.parametrize("level", ["encrypt", "verify", "secure", "fingerprint"])
async def test_starttls_not_supported_where_tls_is_required(collector, level):
    run = reporter_for(collector.path)
    await report(run, facts(failure_type="starttls-not-supported", failure_reason="starttls_not_offered",
                            policy_level=level, protocol=None))
    [datagram] = collector.datagrams()
    assert datagram["policies"][0]["failure-details"][0]["c"] == 201
    assert datagram["policies"][0]["failure-details"][0]["f"] == "starttls_not_offered"


async def test_dane_results_carry_the_tlsa_policy_of_the_mx_host(collector):
    """Postfix's smtp_tlsrpt_set_dane_policy; a missing STARTTLS counts under `dane` once
    usable TLSA records made TLS mandatory."""
    run = reporter_for(collector.path)
    dane = {"tlsrpt_policy_type": "tlsa", "tlsrpt_policy_domain": "mx.example.test",
            "tlsrpt_policy_strings": ("3 1 1 AB01", "2 0 1 CD02")}
    await report(run, facts(policy_level="dane", **dane),
                 facts(failure_type="starttls-not-supported", failure_reason="starttls_not_offered",
                       policy_level="dane", protocol=None, **dane))
    success, failure = collector.datagrams()
    assert success["policies"] == [{"policy-type": 1, "policy-string": ["3 1 1 AB01", "2 0 1 CD02"],
                                    "policy-domain": "mx.example.test", "t": 0, "f": 0}]
    assert failure["policies"][0]["failure-details"][0]["c"] == 201


async def test_an_mta_sts_policy_that_could_not_be_had_is_reported_once_per_connection(collector):
    """The handshake was fine; the connection went without the policy the domain announced
    (RFC 8460 sts-policy-fetch-error).  A failure of the connection's own wins, under no
    policy, since none was in force."""
    run = reporter_for(collector.path)
    fetch_error = ("sts-policy-fetch-error", "connection_refused")
    await report(run, facts(tlsrpt_failure=fetch_error),
                 facts(tlsrpt_failure=fetch_error, failure_type="validation-failure",
                       failure_reason="self-signed_certificate"))
    without, broken = collector.datagrams()
    assert without["policies"][0]["policy-type"] == 2 and without["policies"][0]["policy-domain"] == "example.test"
    assert without["policies"][0]["failure-details"][0]["c"] == 301
    assert broken["policies"][0]["policy-type"] == 9
    assert broken["policies"][0]["failure-details"][0]["c"] == 205


async def test_a_handshake_failure_under_may_is_reported(collector):
    run = reporter_for(collector.path)
    await report(run, facts(failure_type="validation-failure", failure_reason="tlsv1_alert_protocol_version",
                            policy_level="may"))
    [datagram] = collector.datagrams()
    assert datagram["policies"][0]["failure-details"][0]["c"] == 205


async def test_domain_without_record_gets_nothing(collector):
    run = reporter_for(collector.path)
    await report(run, facts(domain="norecord.test"))
    assert run.records.asked == ["norecord.test"]
    assert collector.datagrams() == []
    assert run.published == []


async def test_international_domain_is_reported_as_a_label(collector):
    run = reporter_for(collector.path, records={"xn--bcher-kva.example": RECORD})
    await report(run, facts(domain="bücher.example"))
    [datagram] = collector.datagrams()
    assert datagram["d"] == datagram["policies"][0]["policy-domain"] == "xn--bcher-kva.example"


async def test_results_are_sent_in_order(collector):
    run = reporter_for(collector.path, records={"a.test": RECORD, "b.test": RECORD})
    items = [facts(domain="a.test" if index % 3 else "b.test", peer_name=f"mx{index}.test",
                   failure_type="certificate-expired") for index in range(8)]
    await report(run, *items)
    hosts = [datagram["policies"][0]["failure-details"][0]["n"] for datagram in collector.datagrams()]
    assert hosts == [f"mx{index}.test" for index in range(8)]


# ----------------------------------------------------------------------- log lines


async def test_postfix_log_lines(collector):
    run = reporter_for(collector.path)
    with structlog.testing.capture_logs() as logs:
        await report(run, SUCCESS, SELF_SIGNED,
                     facts(failure_type="certificate-host-mismatch", failure_reason=None))
    assert [entry["event"] for entry in logs if entry["event"].startswith("TLSRPT:")] == [
        "TLSRPT: status=success, domain=example.test, receiving_mx=mx.example.test[192.0.2.25]",
        "TLSRPT: status=failure, domain=example.test, receiving_mx=mx.example.test[192.0.2.25], "
        "failure_type=validation_failure, failure_reason=self-signed_certificate",
        "TLSRPT: status=failure, domain=example.test, receiving_mx=mx.example.test[192.0.2.25], "
        "failure_type=certificate_host_mismatch",
    ]


# ----------------------------------------------------------------------- collector trouble


async def test_missing_collector_is_counted_and_logged_once_per_interval(tmp_path):
    times = iter([0.0, 1.0, 2.0, tlsrpt.DROP_LOG_INTERVAL + 1, tlsrpt.DROP_LOG_INTERVAL + 2])
    run = reporter_for(str(tmp_path / "absent.sock"), clock=lambda: next(times))
    with structlog.testing.capture_logs() as logs:
        await report(run, *[SUCCESS] * 5)
    assert run.published == [TlsrptEventDropped()] * 5
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["dropped"] for entry in warnings] == [1, 3]
    assert warnings[0]["event"] == (f"TLSRPT: results dropped: cannot send to the collector at "
                                    f"{tmp_path / 'absent.sock'}: No such file or directory")


async def test_stale_socket_file_without_collector(tmp_path):
    path = str(tmp_path / "stale.sock")
    Collector(path).socket.close()  # the file stays, nobody reads
    run = reporter_for(path)
    await report(run, SUCCESS)
    assert run.published == [TlsrptEventDropped()]


async def test_full_collector_drops_without_blocking(collector):
    run = reporter_for(collector.path)
    started = time.monotonic()
    with structlog.testing.capture_logs() as logs:
        await report(run, *[SUCCESS] * 40)  # nobody reads: the socket's queue fills up
    assert time.monotonic() - started < 5
    sent = run.published.count(TlsrptEventSent("success", ""))
    dropped = run.published.count(TlsrptEventDropped())
    assert sent + dropped == 40 and sent >= 1 and dropped >= 1
    assert len(collector.datagrams()) == sent
    assert len([entry for entry in logs if entry["log_level"] == "warning"]) == 1


async def test_full_queue_drops_at_once(collector, monkeypatch):
    monkeypatch.setattr(tlsrpt, "QUEUE_SIZE", 2)
    run = reporter_for(collector.path)
    for _ in range(5):
        run.reporter.on_handshake(SUCCESS)  # no await in between: the worker has not run yet
    assert run.published == [TlsrptEventDropped()] * 3
    await run.reporter.close(timeout=5)
    assert len(collector.datagrams()) == 2


# ----------------------------------------------------------------------- wiring


def test_off_without_socket():
    bus = EventBus()
    assert tlsrpt.subscribe(bus, TlsrptConfig(socket=""), dns.asyncresolver.Resolver(configure=False)) is None


async def test_subscribe_reports_through_the_bus_with_real_lookups(collector, small_dns):
    server, resolver = small_dns
    bus = EventBus()
    reporter = tlsrpt.subscribe(bus, TlsrptConfig(socket=collector.path), resolver)
    assert reporter is not None
    bus.publish(facts(domain="good.test"))
    bus.publish(facts(domain="nothing.test"))
    await reporter.close(timeout=5)
    [datagram] = collector.datagrams()
    assert (datagram["d"], datagram["pr"]) == ("good.test", GOOD)
    assert server.queries == ["_smtp._tls.good.test", "_smtp._tls.nothing.test"]
