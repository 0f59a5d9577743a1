"""Prometheus metrics: a subscriber that turns published facts into counters and histograms,
and gauges that read live state through callables handed in by the wiring.

Names and labels are the DESIGN.md contract.  Every label value passes through a closed
set or a strict pattern first, so no domain, address or free text can become a series.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# Set for worker processes by the supervisor (smtproxy.workers): prometheus-client then
# keeps every value in files there, and the supervisor's /metrics sums them.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

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

OTHER = "other"
DIRECTIONS = tuple(direction.value for direction in Direction)
PEER_TRUST = tuple(trust.value for trust in PeerTrust)
PROTOCOLS = ("SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
MESSAGE_RESULTS = ("accepted", "rejected", "deferred", "failed")
REUSE_OUTCOMES = ("new", "reused", "stale")
POLICY_LEVELS = ("none", "may", "encrypt", "fingerprint", "verify", "secure", "dane", "dane-only")
POLICY_SOURCES = ("default_level", "policy_file", "tlsdestinations", "dane", "mta-sts")
POLICY_OUTCOMES = ("tls", "plaintext", "deferred")
TLSRPT_RESULTS = ("success", "failure")
TLSRPT_RESULT_TYPES = (  # RFC 8460 section 4.3
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)
# Cipher suites, group names (X25519, P-256, ffdhe2048, DHE-2048, group-0x01ff) and OpenSSL
# reason codes are short words without dots, so a host name can never pass.
_WORD = re.compile(r"[A-Za-z0-9_-]{1,64}")

HANDSHAKE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def one_of(value: object, allowed: Collection[str]) -> str:
    text = str(value)
    return text if text in allowed else OTHER


def word(value: str | None, fallback: str = OTHER) -> str:
    return value if value is not None and _WORD.fullmatch(value) else fallback


def failure_reason(facts: HandshakeFacts) -> str:
    """OpenSSL's reason code (``no_shared_cipher``, ``self-signed_certificate``); a reason
    that carries a name (Python's hostname-mismatch text does) falls back to its type."""
    return word(facts.failure_reason, word(facts.failure_type, "unknown"))


def policy_source(source: str) -> str:
    """``policy_file /etc/smtproxy/tls_policy line 3 (.example.com)`` -> ``policy_file``."""
    return one_of(source.split(" ", 1)[0], POLICY_SOURCES)


class Metrics:
    """The smtproxy_* families in their own registry (plus the process collector)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = MULTIPROCESS_DIR_VARIABLE in os.environ
        self._watched: list[tuple[Gauge, Callable[[], int]]] = []
        ProcessCollector(registry=self.registry)
        family = {"namespace": "smtproxy", "registry": self.registry}
        self.handshakes = Counter(
            "tls_handshakes", "Completed new TLS handshakes (reused connections are not handshakes).",
            ["direction", "protocol", "cipher", "key_exchange", "forward_secrecy", "peer_trust", "resumed"],
            **family)
        self.handshake_failures = Counter(
            "tls_handshake_failures", "TLS handshakes that failed or did not meet the policy.",
            ["direction", "reason"], **family)
        self.handshake_seconds = Histogram(
            "tls_handshake_seconds", "Duration of completed new TLS handshakes.", ["direction"],
            buckets=HANDSHAKE_BUCKETS, **family)
        self.connections = Counter(
            "connections", "Closed client connections; tls: whether TLS was active at the end.",
            ["direction", "tls"], **family)
        self.connections_active = Gauge(
            "connections_active", "Open client connections.", ["direction"], multiprocess_mode="livesum", **family)
        self.connections_cached = Gauge(
            "connections_cached", "Idle outbound connections kept for reuse.", multiprocess_mode="livesum", **family)
        self.tls_sessions_cached = Gauge(
            "tls_sessions_cached", "Outbound TLS sessions kept for resumption.", multiprocess_mode="livesum", **family)
        self.connection_reuse = Counter(
            "connection_reuse", "Outbound connections needed: new, reused from the cache, or stale.",
            ["outcome"], **family)
        self.messages = Counter(
            "messages", "Messages relayed, by the far side's final answer.", ["direction", "result"], **family)
        self.message_bytes = Counter(
            "message_bytes", "Bytes of message content relayed.", ["direction"], **family)
        self.relay_seconds = Histogram(
            "message_relay_seconds", "From the end of the sender's data to the far side's final answer.",
            ["direction"], buckets=RELAY_BUCKETS, **family)
        self.policy_decisions = Counter(
            "policy_decisions", "Outbound TLS policy applied to a transaction, and what came of it.",
            ["level", "source", "outcome"], **family)
        self.tlsrpt_events = Counter(
            "tlsrpt_events", "TLSRPT results handed to tlsrpt-collectd.", ["result", "result_type"], **family)
        self.tlsrpt_dropped = Counter(
            "tlsrpt_events_dropped", "TLSRPT results lost because the collector was missing or busy.", **family)

    def subscribe(self, bus: EventBus) -> None:
        bus.subscribe(HandshakeFacts, self.on_handshake)
        bus.subscribe(SessionEnded, self.on_session_ended)
        bus.subscribe(MessageRelayed, self.on_message)
        bus.subscribe(ConnectionReuse, self.on_reuse)
        bus.subscribe(PolicyApplied, self.on_policy)
        bus.subscribe(TlsrptEventSent, self.on_tlsrpt_sent)
        bus.subscribe(TlsrptEventDropped, self.on_tlsrpt_dropped)

    # ------------------------------------------------------------------ gauges

    def watch_connections(self, direction: Direction, active: Callable[[], int]) -> None:
        self._watch(self.connections_active.labels(str(direction)), active)

    def watch_caches(self, connections: Callable[[], int], tls_sessions: Callable[[], int]) -> None:
        self._watch(self.connections_cached, connections)
        self._watch(self.tls_sessions_cached, tls_sessions)

    def _watch(self, gauge: Gauge, read: Callable[[], int]) -> None:
        """Read at scrape time; in a worker process (multiprocess mode, where the supervisor
        scrapes files and cannot call us) `refresh()` copies the value in instead."""
        if self.multiprocess:
            self._watched.append((gauge, read))
        else:
            gauge.set_function(read)

    def refresh(self) -> None:
        for gauge, read in self._watched:
            gauge.set(read())

    # ------------------------------------------------------------------ subscribers

    def on_handshake(self, facts: HandshakeFacts) -> None:
        direction = one_of(facts.direction, DIRECTIONS)
        if not facts.ok:
            self.handshake_failures.labels(direction, failure_reason(facts)).inc()
            return
        if facts.reused:
            return  # counted by connection_reuse_total{outcome="reused"}
        self.handshakes.labels(
            direction,
            one_of(facts.protocol, PROTOCOLS),
            word(facts.cipher),
            _key_exchange_label(facts),
            _bool(facts.forward_secrecy),
            one_of(facts.peer_trust, PEER_TRUST),
            _bool(facts.resumed),
        ).inc()
        self.handshake_seconds.labels(direction).observe(facts.duration)

    def on_session_ended(self, ended: SessionEnded) -> None:
        self.connections.labels(one_of(ended.direction, DIRECTIONS), _bool(ended.tls)).inc()

    def on_message(self, message: MessageRelayed) -> None:
        direction = one_of(message.direction, DIRECTIONS)
        self.messages.labels(direction, one_of(message.result, MESSAGE_RESULTS)).inc()
        self.message_bytes.labels(direction).inc(message.size)
        self.relay_seconds.labels(direction).observe(message.duration)

    def on_reuse(self, reuse: ConnectionReuse) -> None:
        self.connection_reuse.labels(one_of(reuse.outcome, REUSE_OUTCOMES)).inc()

    def on_policy(self, applied: PolicyApplied) -> None:
        self.policy_decisions.labels(one_of(applied.level, POLICY_LEVELS), policy_source(applied.source),
                                     one_of(applied.outcome, POLICY_OUTCOMES)).inc()

    def on_tlsrpt_sent(self, sent: TlsrptEventSent) -> None:
        result_type = one_of(sent.result_type, TLSRPT_RESULT_TYPES) if sent.result_type else "none"
        self.tlsrpt_events.labels(one_of(sent.result, TLSRPT_RESULTS), result_type).inc()

    def on_tlsrpt_dropped(self, _: TlsrptEventDropped) -> None:
        self.tlsrpt_dropped.inc()


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _key_exchange_label(facts: HandshakeFacts) -> str:
    """The group seen in the handshake; `none` when there was no ephemeral key exchange
    (static RSA); `unknown` when there was one but this handshake did not show it (a
    resumed TLS 1.2 session: the group was chosen by the handshake that made it)."""
    if facts.key_exchange is not None:
        return word(facts.key_exchange)
    return "unknown" if facts.forward_secrecy else "none"


def watch_backend(registry: CollectorRegistry, up: Callable[[], bool]) -> None:
    """`backend_up`, read at scrape time from the process that probes the backend (the one
    process, or the supervisor of workers). Only registered when there is a backend, so
    `backend_up == 0` always means down."""
    Gauge("backend_up", "1 when the legacy MTA accepted the last readiness probe's connection.",
          namespace="smtproxy", registry=registry).set_function(lambda: float(up()))
