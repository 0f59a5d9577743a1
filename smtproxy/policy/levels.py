"""Postfix's TLS security levels as a small table, and the `Policy` one destination gets.

A `Policy` is frozen and hashable: connections and TLS sessions are cached under it, so a
cached connection is only ever reused for a destination with an identical policy
(DESIGN.md invariant 5) — the destination's policy as the table or default level gives it:
what DANE and MTA-STS add per host is part of a TLS session's key, but a cached connection
is reused (within connection_reuse_time_limit) without looking them up again.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from typing import TYPE_CHECKING

from smtproxy.policy.dane import DaneAuthority

if TYPE_CHECKING:  # the value only; mta_sts.py brings an HTTP client and SQLite with it
    from smtproxy.policy.mta_sts import StsFailure, StsPolicy


class Level(enum.StrEnum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    FINGERPRINT = "fingerprint"
    VERIFY = "verify"
    SECURE = "secure"
    DANE = "dane"
    DANE_ONLY = "dane-only"

    @property
    def tls_wanted(self) -> bool:
        """STARTTLS is attempted when the server offers it."""
        return self is not Level.NONE

    @property
    def tls_required(self) -> bool:
        """No plaintext delivery: STARTTLS missing or failing is a temporary failure."""
        return self not in (Level.NONE, Level.MAY, Level.DANE)

    @property
    def authenticates(self) -> bool:
        """The server's certificate must match (name or fingerprint) or delivery fails."""
        return self in (Level.FINGERPRINT, Level.VERIFY, Level.SECURE, Level.DANE_ONLY)


# Postfix's default match strategies (smtp_tls_verify_cert_match, smtp_tls_secure_cert_match)
DEFAULT_MATCH = {Level.VERIFY: ("hostname",), Level.SECURE: ("nexthop", "dot-nexthop")}


# Postfix's smtp_tls_ciphers and smtp_tls_mandatory_ciphers: a remote that offers only
# older suites (AES-CBC, RSA key exchange) still gets TLS rather than plaintext or a deferral
DEFAULT_CIPHER_GRADE = "medium"


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """The effective TLS policy for one destination.

    `match`: for verify/secure the name strategies and names, lower-case, in Postfix's
    vocabulary (``hostname``, ``nexthop``, ``dot-nexthop``, ``example.com``,
    ``.example.com``); for fingerprint the digests as upper-case colon-separated hex.
    `min_protocol`/`max_protocol`: None means `[outbound.tls]`'s range.  `ciphers`: a
    Postfix cipher grade (``high``, ``medium``, ``low``, ``export``, ``null``) or None
    for `[outbound.tls] ciphers`, or `DEFAULT_CIPHER_GRADE` where that is empty.  `exclude`: OpenSSL cipher names or families to drop.
    `servername`: SNI; ``hostname`` (the MX host name, default), ``nexthop`` or a literal
    name.  `ca_file`/`verify_depth`: s/qmail's per-destination trust.  `dane`: set by
    the connector for one MX host when its usable TLSA records make TLS mandatory and
    authenticate the server (levels `dane` and `dane-only`), never by a table.  `sts`: set by
    the connector for a host under the domain's MTA-STS policy (level verify for `enforce`,
    the level as it was for `testing`), for TLSRPT and for caching under that policy;
    `sts_failure`: the domain announces a policy that could not be had (for TLSRPT).
    """

    level: Level
    match: tuple[str, ...] = ()
    min_protocol: str | None = None
    max_protocol: str | None = None
    ciphers: str | None = None
    exclude: tuple[str, ...] = ()
    servername: str = "hostname"
    connection_reuse: bool = True
    ca_file: Path | None = None
    verify_depth: int | None = None
    dane: DaneAuthority | None = None
    sts: StsPolicy | None = None
    sts_failure: StsFailure | None = dataclasses.field(default=None, compare=False)  # its text varies; no key

    @property
    def tls_wanted(self) -> bool:
        return self.level.tls_wanted or self.dane is not None

    @property
    def tls_required(self) -> bool:
        return self.level.tls_required or self.dane is not None

    @property
    def authenticates(self) -> bool:
        return self.level.authenticates or self.dane is not None

    @property
    def match_or_default(self) -> tuple[str, ...]:
        return self.match or DEFAULT_MATCH.get(self.level, ())


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyDecision:
    """A policy and where it came from, e.g. ``policy_file line 3 (.example.com)``."""

    policy: Policy
    source: str
