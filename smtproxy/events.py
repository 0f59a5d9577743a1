"""The facts smtproxy publishes, and a tiny synchronous publish/subscribe.

Every TLS handshake (or failure to get one) becomes exactly one `HandshakeFacts`; metrics,
logs, the trace header and TLSRPT are views of it.  Sessions publish `SessionEnded` when a
client connection closes.  Subscribers must be cheap and must not raise: observability never
blocks mail (DESIGN.md invariant 6), so `EventBus.publish` swallows and counts their errors.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Any

# OpenSSL's names of TLS 1.2 suites with an ephemeral (EC)DH key exchange (ADH/AECDH: anonymous)
_EPHEMERAL_KEY_EXCHANGE = ("ECDHE-", "DHE-", "EDH-", "AECDH-", "ADH-")


class Direction(enum.StrEnum):
    INBOUND = "inbound"
    OUTBOUND = "outbound"


class PeerTrust(enum.StrEnum):
    """Postfix's trust words (FORWARD_SECRECY_README); a server never says Verified."""

    ANONYMOUS = "anonymous"
    UNTRUSTED = "untrusted"
    TRUSTED = "trusted"
    VERIFIED = "verified"


@dataclasses.dataclass(frozen=True, slots=True)
class PeerCertificate:
    subject_cn: str | None
    issuer_cn: str | None
    sha256_fingerprint: str  # colon-separated upper-case hex, as Postfix prints it
    pubkey_sha256_fingerprint: str | None  # None: the public key could not be parsed


@dataclasses.dataclass(frozen=True, slots=True)
class HandshakeFacts:
    """What one TLS handshake negotiated, read from the real handshake.

    `key_exchange` is the short group name used as a metric label: X25519, X448, P-256,
    P-384, P-521, ffdhe2048..., DHE-<bits> or None.  `server_signature` is the algorithm
    word and detail as Postfix logs it (``ECDSA``/``P-256``, ``RSA-PSS``/``2048 bits``).
    """

    direction: Direction
    peer_name: str
    peer_addr: str
    peer_port: int
    protocol: str | None = None
    cipher: str | None = None
    cipher_bits: int = 0
    cipher_alg_bits: int = 0
    key_exchange: str | None = None
    server_signature: str | None = None
    server_signature_detail: str | None = None
    server_digest: str | None = None
    client_signature: str | None = None
    client_signature_detail: str | None = None
    client_digest: str | None = None
    peer_trust: PeerTrust = PeerTrust.ANONYMOUS
    peer_certificate: PeerCertificate | None = None
    resumed: bool = False
    reused: bool = False
    duration: float = 0.0
    failure_type: str | None = None
    failure_reason: str | None = None
    # outbound only: what TLSRPT reports besides the handshake itself
    domain: str | None = None  # the TLSRPT policy domain (outbound.connector.tlsrpt_domain); None: no report
    local_addr: str | None = None  # sending-mta-ip
    peer_helo: str | None = None  # the remote's EHLO reply before STARTTLS, CRLF-joined (receiving-mx-helo)
    policy_level: str | None = None  # the TLS security level the attempt was made under
    # the TLSRPT policy the attempt was made under: "tlsa" (DANE) or "sts" (MTA-STS);
    # None: no-policy-found.  Its policy-domain, policy-strings and mx-host patterns.
    tlsrpt_policy_type: str | None = None
    tlsrpt_policy_domain: str | None = None
    tlsrpt_policy_strings: tuple[str, ...] = ()
    tlsrpt_mx_hosts: tuple[str, ...] = ()
    # (result type, reason) reported to TLSRPT as a failure while the handshake counts as
    # the success it was everywhere else: under MTA-STS testing what enforce would have
    # refused; without tlsrpt_policy_type, why the MTA-STS policy the domain announces
    # could not be had (sts-policy-fetch-error, sts-webpki-invalid, sts-policy-invalid)
    tlsrpt_failure: tuple[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.failure_type is None

    @property
    def forward_secrecy(self) -> bool:
        """TLS 1.3 always; TLS 1.2 when its cipher suite's key exchange is ephemeral (EC)DH.
        A resumed TLS 1.2 session shows no key exchange (`key_exchange` is None) but keeps
        the master secret of the (EC)DHE handshake that made it."""
        if self.protocol == "TLSv1.3":
            return True
        return self.key_exchange is not None or (self.cipher or "").startswith(_EPHEMERAL_KEY_EXCHANGE)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEnded:
    direction: Direction
    peer_name: str
    peer_addr: str
    tls: bool
    messages: int
    bytes: int
    duration: float


@dataclasses.dataclass(frozen=True, slots=True)
class MessageRelayed:
    direction: Direction
    result: str  # "accepted" | "rejected" | "deferred" | "failed"
    size: int
    duration: float


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionReuse:
    """An outbound connection was needed: `outcome` is new, reused or stale."""

    outcome: str


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyApplied:
    """The outbound TLS policy of one transaction and what came of it.

    `source` is `PolicyDecision.source` as logged; `outcome` is tls, plaintext (only
    where the level allows it) or deferred (no connection meeting the policy)."""

    level: str
    source: str
    outcome: str


@dataclasses.dataclass(frozen=True, slots=True)
class TlsrptEventSent:
    """One TLSRPT result handed to tlsrpt-collectd: `result` success or failure,
    `result_type` an RFC 8460 result type ("" for success)."""

    result: str
    result_type: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class TlsrptEventDropped:
    """One TLSRPT result lost: the collector socket was missing or would have blocked."""


class EventBus:
    """Synchronous fan-out of fact records to subscribers, keyed by record type."""

    def __init__(self) -> None:
        self._subscribers: dict[type, list[Callable[[Any], None]]] = {}
        self.subscriber_errors = 0

    def subscribe(self, kind: type, callback: Callable[[Any], None]) -> None:
        self._subscribers.setdefault(kind, []).append(callback)

    def publish(self, record: object) -> None:
        for callback in self._subscribers.get(type(record), ()):
            try:
                callback(record)
            except Exception:  # noqa: BLE001 - observability never blocks mail
                self.subscriber_errors += 1
