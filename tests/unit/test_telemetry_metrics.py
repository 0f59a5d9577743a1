"""Metrics from published facts (names, labels, bounded values) and the metrics HTTP endpoint."""

from __future__ import annotations

import asyncio
import re

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from smtproxy.config import Address
from smtproxy.events import (
    ConnectionReuse,
    Direction,
    EventBus,
    HandshakeFacts,
    MessageRelayed,
    PeerTrust,
    PolicyApplied,
    SessionEnded,
    TlsrptEventDropped,
    TlsrptEventSent,
)
from smtproxy.telemetry import http
from smtproxy.telemetry.http import MetricsServer, Readiness
from smtproxy.telemetry.metrics import Metrics, watch_backend
from tests.integration.peers import free_port

# DESIGN.md's Metrics contract: names and label sets that dashboards and operators rely on.
CONTRACT = {
    "smtproxy_tls_handshakes_total": {"direction", "protocol", "cipher", "key_exchange", "forward_secrecy",
                                      "peer_trust", "resumed"},
    "smtproxy_tls_handshake_failures_total": {"direction", "reason"},
    "smtproxy_tls_handshake_seconds": {"direction"},
    "smtproxy_connections_total": {"direction", "tls"},
    "smtproxy_connections_active": {"direction"},
    "smtproxy_connection_reuse_total": {"outcome"},
    "smtproxy_messages_total": {"direction", "result"},
    "smtproxy_message_bytes_total": {"direction"},
    "smtproxy_policy_decisions_total": {"level", "source", "outcome"},
    "smtproxy_tlsrpt_events_total": {"result", "result_type"},
    "smtproxy_tlsrpt_events_dropped_total": set(),
}


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def bus(metrics: Metrics) -> EventBus:
    bus = EventBus()
    metrics.subscribe(bus)
    return bus


def handshake(direction=Direction.INBOUND, **changes) -> HandshakeFacts:
    facts = {"protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384", "key_exchange": "X25519",
             "duration": 0.02, **changes}
    return HandshakeFacts(direction, "mx.secret-domain.example", "192.0.2.77", 25, **facts)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def handshakes(metrics: Metrics, **labels: str) -> float:
    """The sum of smtproxy_tls_handshakes_total over every series matching `labels`."""
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == "smtproxy_tls_handshakes_total"
               and all(sample.labels.get(k) == v for k, v in labels.items()))


# ----------------------------------------------------------------------------- handshakes


def test_tls13_handshake_is_counted_with_every_label(metrics, bus):
    bus.publish(handshake(peer_trust=PeerTrust.ANONYMOUS))
    assert value(metrics, "smtproxy_tls_handshakes_total", direction="inbound", protocol="TLSv1.3",
                 cipher="TLS_AES_256_GCM_SHA384", key_exchange="X25519", forward_secrecy="true",
                 peer_trust="anonymous", resumed="false") == 1
    assert value(metrics, "smtproxy_tls_handshake_seconds_count", direction="inbound") == 1
    assert value(metrics, "smtproxy_tls_handshake_seconds_sum", direction="inbound") == pytest.approx(0.02)
    assert bus.subscriber_errors == 0


@pytest.mark.parametrize(("protocol", "key_exchange", "forward_secrecy", "label"), [
    ("TLSv1.3", "P-256", "true", "P-256"),
    ("TLSv1.3", None, "true", "unknown"),  # resumed TLS 1.3 without key share (psk_ke) still counts as FS
    ("TLSv1.2", "X25519", "true", "X25519"),
    ("TLSv1.2", "DHE-2048", "true", "DHE-2048"),
    ("TLSv1.2", None, "false", "none"),  # static RSA key exchange
])
def test_forward_secrecy_follows_protocol_and_key_exchange(metrics, bus, protocol, key_exchange, forward_secrecy,
                                                           label):
    cipher = "AES256-GCM-SHA384" if protocol == "TLSv1.2" else "TLS_AES_256_GCM_SHA384"
    bus.publish(handshake(Direction.OUTBOUND, protocol=protocol, cipher=cipher, key_exchange=key_exchange,
                          peer_trust=PeerTrust.VERIFIED, resumed=True))
    assert handshakes(metrics, direction="outbound", protocol=protocol, key_exchange=label,
                      forward_secrecy=forward_secrecy, peer_trust="verified", resumed="true") == 1


@pytest.mark.parametrize("cipher", ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305",
                                    "DHE-RSA-AES128-GCM-SHA256"])
def test_a_resumed_tls12_session_keeps_the_forward_secrecy_of_its_cipher(metrics, bus, cipher):
    """No key exchange is seen when a TLS 1.2 session resumes; its (EC)DHE suite says the
    master secret came from an ephemeral one. The group itself is not guessed."""
    bus.publish(handshake(protocol="TLSv1.2", cipher=cipher, key_exchange=None, resumed=True))
    assert handshakes(metrics, key_exchange="unknown", forward_secrecy="true", resumed="true") == 1
    assert handshakes(metrics, forward_secrecy="false") == 0


def test_a_reused_connection_is_not_a_handshake(metrics, bus):
    bus.publish(handshake(Direction.OUTBOUND, reused=True, duration=0.0))
    bus.publish(ConnectionReuse("reused"))
    assert handshakes(metrics) == 0
    assert value(metrics, "smtproxy_tls_handshake_seconds_count", direction="outbound") is None
    assert value(metrics, "smtproxy_connection_reuse_total", outcome="reused") == 1


@pytest.mark.parametrize(("failure_type", "reason", "label"), [
    ("validation-failure", "no_shared_cipher", "no_shared_cipher"),
    ("certificate-not-trusted", "self-signed_certificate", "self-signed_certificate"),
    ("starttls-not-supported", "starttls_refused_454", "starttls_refused_454"),
    # Python's hostname-mismatch text names the host: the label falls back to the type
    ("certificate-host-mismatch", "Hostname_mismatch,_certificate_is_not_valid_for_'mx.example.org'.",
     "certificate-host-mismatch"),
    ("validation-failure", "mx.example.org", "validation-failure"),
    ("strange type from somewhere", None, "unknown"),
])
def test_failures_are_counted_by_a_bounded_reason(metrics, bus, failure_type, reason, label):
    bus.publish(handshake(Direction.OUTBOUND, failure_type=failure_type, failure_reason=reason))
    assert value(metrics, "smtproxy_tls_handshake_failures_total", direction="outbound", reason=label) == 1
    assert handshakes(metrics) == 0


def test_unknown_words_become_other_and_nothing_unbounded_reaches_a_label(metrics, bus):
    bus.publish(handshake(protocol="TLSv9", cipher="ECDHE with a space", key_exchange="X25519.example.org"))
    bus.publish(MessageRelayed(Direction.INBOUND, "user@domain.example said no", 10, 0.1))
    bus.publish(PolicyApplied("verify", "policy_file /etc/smtproxy/tls_policy line 3 (.secret-domain.example)",
                              "tls"))
    bus.publish(PolicyApplied("sideways", "dns 192.0.2.9", "who knows"))
    bus.publish(TlsrptEventSent("failure", "mx.secret-domain.example"))
    assert handshakes(metrics, protocol="other", cipher="other", key_exchange="other") == 1
    assert value(metrics, "smtproxy_messages_total", direction="inbound", result="other") == 1
    assert value(metrics, "smtproxy_policy_decisions_total", level="verify", source="policy_file",
                 outcome="tls") == 1
    assert value(metrics, "smtproxy_policy_decisions_total", level="other", source="other", outcome="other") == 1
    assert value(metrics, "smtproxy_tlsrpt_events_total", result="failure", result_type="other") == 1
    exposition = generate_latest(metrics.registry).decode()
    for secret in ("secret-domain", "192.0.2", "example.org", "domain.example", "/etc/smtproxy"):
        assert secret not in exposition


# ----------------------------------------------------------------------------- other facts


def test_messages_sessions_reuse_and_policy(metrics, bus):
    bus.publish(MessageRelayed(Direction.OUTBOUND, "accepted", 1000, 0.3))
    bus.publish(MessageRelayed(Direction.OUTBOUND, "accepted", 500, 0.7))
    bus.publish(MessageRelayed(Direction.INBOUND, "deferred", 20, 0.1))
    bus.publish(SessionEnded(Direction.INBOUND, "unknown", "192.0.2.1", True, 1, 20, 1.0))
    bus.publish(SessionEnded(Direction.OUTBOUND, "unknown", "127.0.0.1", False, 2, 1500, 2.0))
    for outcome in ("new", "reused", "reused", "stale"):
        bus.publish(ConnectionReuse(outcome))
    bus.publish(PolicyApplied("may", "default_level", "plaintext"))
    bus.publish(PolicyApplied("encrypt", "tlsdestinations /var/qmail/control/tlsdestinations line 1 (x.org)",
                              "deferred"))
    assert value(metrics, "smtproxy_messages_total", direction="outbound", result="accepted") == 2
    assert value(metrics, "smtproxy_message_bytes_total", direction="outbound") == 1500
    assert value(metrics, "smtproxy_message_relay_seconds_count", direction="outbound") == 2
    assert value(metrics, "smtproxy_message_relay_seconds_bucket", direction="outbound", le="0.5") == 1
    assert value(metrics, "smtproxy_messages_total", direction="inbound", result="deferred") == 1
    assert value(metrics, "smtproxy_connections_total", direction="inbound", tls="true") == 1
    assert value(metrics, "smtproxy_connections_total", direction="outbound", tls="false") == 1
    assert value(metrics, "smtproxy_connection_reuse_total", outcome="reused") == 2
    assert value(metrics, "smtproxy_connection_reuse_total", outcome="stale") == 1
    assert value(metrics, "smtproxy_policy_decisions_total", level="may", source="default_level",
                 outcome="plaintext") == 1
    assert value(metrics, "smtproxy_policy_decisions_total", level="encrypt", source="tlsdestinations",
                 outcome="deferred") == 1


def test_tlsrpt_events(metrics, bus):
    bus.publish(TlsrptEventSent("success"))
    bus.publish(TlsrptEventSent("failure", "certificate-expired"))
    bus.publish(TlsrptEventSent("failure", "certificate-expired"))
    bus.publish(TlsrptEventDropped())
    assert value(metrics, "smtproxy_tlsrpt_events_total", result="success", result_type="none") == 1
    assert value(metrics, "smtproxy_tlsrpt_events_total", result="failure", result_type="certificate-expired") == 2
    assert value(metrics, "smtproxy_tlsrpt_events_dropped_total") == 1


def test_gauges_read_live_state(metrics):
    open_connections = {"inbound": 3}
    metrics.watch_connections(Direction.INBOUND, lambda: open_connections["inbound"])
    metrics.watch_caches(lambda: 4, lambda: 5)
    assert value(metrics, "smtproxy_backend_up") is None  # no backend, no gauge: never a false 0
    up = [True]
    watch_backend(metrics.registry, lambda: up[0])
    assert value(metrics, "smtproxy_connections_active", direction="inbound") == 3
    open_connections["inbound"] = 1
    up[0] = False
    assert value(metrics, "smtproxy_connections_active", direction="inbound") == 1
    assert value(metrics, "smtproxy_connections_cached") == 4
    assert value(metrics, "smtproxy_tls_sessions_cached") == 5
    assert value(metrics, "smtproxy_backend_up") == 0


def test_design_contract_names_and_labels(metrics, bus):
    metrics.watch_connections(Direction.INBOUND, lambda: 0)
    bus.publish(handshake())
    bus.publish(handshake(failure_type="validation-failure", failure_reason="x"))
    bus.publish(SessionEnded(Direction.INBOUND, "unknown", "192.0.2.1", True, 1, 20, 1.0))
    bus.publish(ConnectionReuse("new"))
    bus.publish(MessageRelayed(Direction.INBOUND, "accepted", 10, 0.1))
    bus.publish(PolicyApplied("may", "default_level", "tls"))
    bus.publish(TlsrptEventSent("success"))
    bus.publish(TlsrptEventDropped())
    seen = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for sample in family.samples:
            seen.setdefault(sample.name, set(sample.labels) - {"le"})
    for name, labels in CONTRACT.items():
        sample = name + "_count" if name.endswith("_seconds") else name
        assert seen.get(sample) == labels, (name, seen.get(sample))


# ----------------------------------------------------------------------------- HTTP endpoint


async def get(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    if not raw:
        return 0, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): v.strip() for name, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def request(path: str, method: str = "GET", *headers: str) -> bytes:
    return "\r\n".join([f"{method} {path} HTTP/1.1", "Host: test", *headers, "", ""]).encode()


@pytest.fixture
async def backend():
    """A TCP listener standing in for the legacy MTA."""
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    yield server
    server.close()


@pytest.fixture
async def endpoint(metrics, bus, backend, monkeypatch):
    monkeypatch.setattr(http, "PROBE_CACHE_SECONDS", 0.0)
    listening = [True]
    backend_port = backend.sockets[0].getsockname()[1]
    readiness = Readiness(lambda: listening[0], Address("127.0.0.1", backend_port), 2.0)
    watch_backend(metrics.registry, lambda: readiness.backend_up)
    server = MetricsServer(metrics.registry, readiness)
    port = free_port()
    await server.start(Address("127.0.0.1", port))
    yield port, listening
    server.close()


async def test_metrics_endpoint_serves_prometheus_text(endpoint, bus):
    port, _ = endpoint
    bus.publish(handshake())
    status, headers, body = await get(port, request("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(headers["content-length"]) == len(body)
    text = body.decode()
    assert 'smtproxy_tls_handshakes_total{' in text
    assert "smtproxy_backend_up 1.0" in text  # the scrape probed the backend


async def test_metrics_endpoint_negotiates_openmetrics(endpoint):
    port, _ = endpoint
    status, headers, body = await get(port, request("/metrics", "GET", "Accept: application/openmetrics-text; "
                                                                       "version=1.0.0; charset=utf-8"))
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


async def test_healthz_and_readyz(endpoint, backend):
    port, listening = endpoint
    assert (await get(port, request("/healthz")))[::2] == (200, b"ok\n")
    assert (await get(port, request("/readyz")))[::2] == (200, b"ready\n")
    backend.close()
    await backend.wait_closed()
    status, _, body = await get(port, request("/readyz"))
    assert status == 503 and re.fullmatch(rb"not ready: backend 127\.0\.0\.1:\d+ is not reachable\n", body)
    _, _, body = await get(port, request("/metrics"))
    assert b"smtproxy_backend_up 0.0" in body
    listening[0] = False
    assert (await get(port, request("/readyz")))[::2] == (503, b"not ready: listeners are not accepting connections\n")


async def test_other_requests(endpoint):
    port, _ = endpoint
    assert (await get(port, request("/nothing")))[0] == 404
    assert (await get(port, request("/metrics", "POST")))[0] == 405
    status, headers, body = await get(port, request("/healthz", "HEAD"))
    assert (status, headers["content-length"], body) == (200, "3", b"")
    assert (await get(port, b"nonsense\r\n\r\n"))[0] == 400
    # a request head beyond the limit is not answered at all
    assert await get(port, request("/metrics", "GET", "X-Padding: " + "a" * http.REQUEST_HEAD_LIMIT)) == (0, {}, b"")
