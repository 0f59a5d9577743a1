"""DANE for SMTP (RFC 7672, RFC 7671): TLSA lookups and matching a server's chain to them.

Lookups trust the AD bit of a validating resolver (`[dns] nameservers`), as Postfix does
with `smtp_dns_support_level = dnssec`: only a resolver on the same host or a trusted
network may be used for that.  What a lookup of ``_<port>._tcp.<mx host>`` TLSA means for
delivery (RFC 7672 2.2, Postfix's `dane` level):

- validated records, at least one usable: TLS required, authenticated by the records;
- validated records, none usable: TLS required, not authenticated (Postfix: `encrypt`);
- no records, or records that are not validated (insecure): no DANE for that host;
- the lookup failed (SERVFAIL, which is also what a bogus answer gets, or a timeout):
  the host is not used for this delivery (RFC 7672 2.1.1: an attacker may be hiding them).

Usable (RFC 7672 3.1.3): DANE-TA(2) and DANE-EE(3) with selector Cert(0) or SPKI(1) and
matching type Full(0), SHA2-256(1) or SHA2-512(2) whose data has the digest's length.
PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP.

Matching: DANE-EE matches the leaf certificate or its public key; nothing else about the
leaf is checked (RFC 7672 3.1.1: no name, no expiry).  DANE-TA matches a certificate the
server sent above the leaf; the leaf must chain up to it through CA certificates (basic
constraints CA, path length, keyCertSign where key usage is given), every certificate on
the way must be within its validity period, and the leaf must carry one of the reference
names (checked by the caller, RFC 7672 3.2.3).  A certificate above the leaf that cannot be
parsed is left out of the chain, as if not sent.  RFC 7671 5.2.2 requires the server to send
that trust anchor, so a TA given only as a bare public key (``2 1 0``) not in the chain
does not match.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.resolver
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DANE_TA = 2
DANE_EE = 3
_SELECTORS = (0, 1)  # Cert, SPKI
_DIGEST_LENGTHS = {1: 32, 2: 64}  # SHA2-256, SHA2-512; 0 is the full data, any length
_MAX_CHAIN = 10


@dataclasses.dataclass(frozen=True, slots=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    def __str__(self) -> str:
        """Presentation form, as Postfix logs it and hands it to TLSRPT: ``3 1 1 ABCD...``."""
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex().upper()}"

    @property
    def usable(self) -> bool:
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in _SELECTORS:
            return False
        if self.mtype == 0:
            return bool(self.data)
        return len(self.data) == _DIGEST_LENGTHS.get(self.mtype, -1)

    def matches(self, certificate: x509.Certificate) -> bool:
        if self.selector == 0:
            selected = certificate.public_bytes(Encoding.DER)
        else:
            try:
                selected = certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
            except (ValueError, UnsupportedAlgorithm):  # a key type this cryptography cannot load
                return False
        if self.mtype == 1:
            selected = hashlib.sha256(selected).digest()
        elif self.mtype == 2:
            selected = hashlib.sha512(selected).digest()
        return selected == self.data


@dataclasses.dataclass(frozen=True, slots=True)
class DaneAuthority:
    """What authenticates one MX host: its usable TLSA records.  `base_domain`: the MX host
    name they were found under.  `name_secure`: that name came from validated DNS (a
    DNSSEC-signed MX record) or from the operator's routes; a match under a forgeable MX
    name is only Trusted, not Verified (Postfix's `smtp_tls_dane_insecure_mx_policy`)."""

    records: tuple[Tlsa, ...]
    base_domain: str
    name_secure: bool

    @property
    def policy_strings(self) -> tuple[str, ...]:
        return tuple(map(str, self.records))


class TlsaStatus(enum.Enum):
    USABLE = "usable"
    UNUSABLE = "unusable"  # validated records, none usable
    NONE = "none"  # no records, or not validated
    FAILED = "failed"


@dataclasses.dataclass(frozen=True, slots=True)
class TlsaLookup:
    status: TlsaStatus
    qname: str
    records: tuple[Tlsa, ...] = ()  # the usable ones
    reason: str = ""


def tlsa_name(hostname: str, port: int) -> str:
    return f"_{port}._tcp.{hostname.rstrip('.')}"


async def lookup_tlsa(resolver: dns.asyncresolver.Resolver, hostname: str, port: int) -> TlsaLookup:
    """The TLSA records of `hostname`:`port`, judged as the module docstring says."""
    qname = tlsa_name(hostname, port)
    try:
        answer = await resolver.resolve(qname, "TLSA", search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return TlsaLookup(TlsaStatus.NONE, qname, reason="no TLSA records")
    except dns.resolver.NoNameservers:
        return TlsaLookup(TlsaStatus.FAILED, qname, reason="server failure (SERVFAIL: DNSSEC bogus or unreachable)")
    except dns.exception.Timeout:
        return TlsaLookup(TlsaStatus.FAILED, qname, reason="timeout")
    except (dns.exception.DNSException, OSError) as error:
        return TlsaLookup(TlsaStatus.FAILED, qname, reason=type(error).__name__)
    if answer.rrset is None:
        return TlsaLookup(TlsaStatus.NONE, qname, reason="no TLSA records")
    if not answer.response.flags & dns.flags.AD:
        return TlsaLookup(TlsaStatus.NONE, qname, reason="TLSA records not DNSSEC-validated")
    records = tuple(Tlsa(rdata.usage, rdata.selector, rdata.mtype, rdata.cert) for rdata in answer)
    usable = tuple(sorted({record for record in records if record.usable}, key=str))
    if not usable:
        return TlsaLookup(TlsaStatus.UNUSABLE, qname, reason="all TLSA records unusable")
    return TlsaLookup(TlsaStatus.USABLE, qname, usable)


@dataclasses.dataclass(frozen=True, slots=True)
class DaneMatch:
    """A chain matched `record`; for DANE-TA the caller still checks the leaf's names."""

    record: Tlsa
    depth: int  # of the matching certificate, 0 for the leaf


@dataclasses.dataclass(frozen=True, slots=True)
class DaneMismatch:
    """(RFC 8460 result type, OpenSSL-style reason) of the closest miss."""

    result_type: str
    reason: str


NO_MATCH = DaneMismatch("tlsa-invalid", "No_matching_DANE_TLSA_records")
_EXPIRED = DaneMismatch("certificate-expired", "certificate_has_expired")
_NOT_YET_VALID = DaneMismatch("validation-failure", "certificate_is_not_yet_valid")


def match_chain(records: tuple[Tlsa, ...], chain_der: list[bytes],
                now: datetime.datetime | None = None) -> DaneMatch | DaneMismatch:
    """The first record the presented chain (leaf first) satisfies, DANE-EE before DANE-TA."""
    chain = _parse(chain_der)
    if not chain:
        return NO_MATCH
    for record in records:
        if record.usage == DANE_EE and record.matches(chain[0]):
            return DaneMatch(record, 0)
    closest: DaneMismatch = NO_MATCH
    for record in records:
        if record.usage != DANE_TA:
            continue
        for depth, anchor in enumerate(chain[1:], start=1):
            if not record.matches(anchor):
                continue
            path = _path_to(chain, anchor)
            if path is None:
                continue
            invalid = _validity_problem(path, now or datetime.datetime.now(datetime.timezone.utc))
            if invalid is None:
                return DaneMatch(record, depth)
            closest = invalid
    return closest


def _parse(chain_der: list[bytes]) -> list[x509.Certificate]:
    """The leaf and every certificate above it that parses; nothing without a leaf."""
    chain = []
    for index, der in enumerate(chain_der[:_MAX_CHAIN]):
        try:
            chain.append(x509.load_der_x509_certificate(der))
        except ValueError:
            if index == 0:
                return []
    return chain


def _path_to(chain: list[x509.Certificate], anchor: x509.Certificate) -> list[x509.Certificate] | None:
    """Leaf, intermediates, anchor: each signed by the next, taken from what the server sent."""
    path = [chain[0]]
    while path[-1] != anchor and len(path) < _MAX_CHAIN:
        below = len(path) - 1  # CA certificates already between the leaf and the next issuer
        issuer = next((candidate for candidate in chain[1:]
                       if candidate not in path and _issued_by(path[-1], candidate, below)), None)
        if issuer is None:
            return None
        path.append(issuer)
    return path if path[-1] == anchor else None


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate, cas_below: int) -> bool:
    """`issuer` signed `certificate` and may issue certificates (RFC 5280 4.2.1.3, 4.2.1.9),
    with `cas_below` CA certificates under it on the path."""
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        if not constraints.ca or (constraints.path_length is not None and cas_below > constraints.path_length):
            return False
        try:
            if not issuer.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign:
                return False
        except x509.ExtensionNotFound:
            pass
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm, x509.ExtensionNotFound,
            x509.DuplicateExtension):
        return False
    return True


def _validity_problem(path: list[x509.Certificate], now: datetime.datetime) -> DaneMismatch | None:
    for certificate in path:
        if now > certificate.not_valid_after_utc:
            return _EXPIRED
        if now < certificate.not_valid_before_utc:
            return _NOT_YET_VALID
    return None
