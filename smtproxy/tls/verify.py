"""The server certificate judged as Postfix's SMTP client judges it.

Trust words (FORWARD_SECRECY_README, tls_client.c): Anonymous (no certificate),
Untrusted (chain not trusted), Trusted (chain trusted; name not matched, or not checked
at this level), Verified (chain trusted and a name matched under verify/secure, or a
listed fingerprint matched under fingerprint, whatever the chain).

A level that authenticates fails short of Verified, with the RFC 8460 result type and
an OpenSSL-style reason.  The chain failure reported is the one closest to the leaf, the
first found at that depth (Postfix tls_verify.c, update_error_state); it outranks a name
mismatch, so an expired certificate is reported as expired.

DANE (policy.dane set): the chain must match a usable TLSA record (policy/dane.py); for
DANE-TA the leaf must also carry the MX host name or the nexthop domain.  A match is
Verified, or Trusted when the MX host name came from DNS that was not validated.

Names (postconf(5) smtp_tls_verify_cert_match, tls_client.c): DNS subjectAltNames, the
subject CommonNames only when there is none; case-insensitive; ``*`` only as the whole
left-most label, for exactly one label (RFC 6125 6.4.3; Postfix's
tls_wildcard_matches_multiple_labels = yes would allow more).  A ``.domain`` reference
matches any name with that suffix (as OpenSSL's X509_check_host, which Postfix uses).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from cryptography import x509
from cryptography.x509.oid import NameOID

from smtproxy.events import PeerCertificate, PeerTrust
from smtproxy.policy.dane import DANE_TA, DaneAuthority, DaneMismatch, match_chain
from smtproxy.policy.levels import Level, Policy
from smtproxy.tls import openssl_ext
from smtproxy.tls.certificates import parse_peer_certificate, peer_certificate
from smtproxy.tls.engine import RESULT_TYPES, TlsEngine, TlsHandshakeError
from smtproxy.tls.openssl_ext import VerifyVerdict

# (RFC 8460 result type, reason) of failures that are not OpenSSL's verdicts
_NO_CERTIFICATE = ("validation-failure", "no_peer_certificate")
_HOSTNAME_MISMATCH = ("certificate-host-mismatch", "hostname_mismatch")
_FINGERPRINT_MISMATCH = ("certificate-not-trusted", "fingerprint_mismatch")
_NO_TLSA = ("dane-required", "no_usable_TLSA_records")


@dataclasses.dataclass(frozen=True, slots=True)
class ServerVerdict:
    trust: PeerTrust
    certificate: PeerCertificate | None
    failure: TlsHandshakeError | None


def chain_failure(verdicts: list[VerifyVerdict]) -> tuple[str, str] | None:
    """(result type, reason) of OpenSSL's verdict nearest the leaf; None: chain trusted."""
    if not verdicts:
        return None
    worst = min(verdicts, key=lambda verdict: verdict.depth)
    return RESULT_TYPES.get(worst.code, "validation-failure"), worst.message.replace(" ", "_")


def _normal(name: str) -> str:
    return name.rstrip(".").lower()


def reference_names(match: tuple[str, ...], *, mx_hostname: str, nexthop: str) -> Iterator[str]:
    """Postfix's match strategies and patterns as names, ``.domain`` meaning any subdomain."""
    for word in match:
        if word == "hostname":
            name = _normal(mx_hostname)
        elif word == "nexthop":
            name = _normal(nexthop)
        elif word == "dot-nexthop":
            name = "." + _normal(nexthop)
        else:
            name = _normal(word)
        if name.strip("."):
            yield name


def certificate_names(certificate: x509.Certificate | None) -> list[str]:
    """DNS subjectAltNames, else the subject CommonNames (RFC 2818 3.1, as Postfix); none
    from a certificate that could not be parsed (so it matches no name)."""
    if certificate is None:
        return []
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        return []  # extensions are parsed only now: one cryptography refuses names nothing
    names = san.get_values_for_type(x509.DNSName) if san is not None else []
    if not names:
        names = [str(cn.value) for cn in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [_normal(name) for name in names]


def name_matches(certificate_name: str, reference: str) -> bool:
    """One certificate name against one reference name (both lower case, no trailing dot)."""
    if reference.startswith("."):
        return len(certificate_name) > len(reference) and certificate_name.endswith(reference)
    if certificate_name == reference:
        return True
    if not certificate_name.startswith("*."):
        return False
    label, _, parent = reference.partition(".")
    wildcard_parent = certificate_name[2:]
    return bool(label) and "." in wildcard_parent and wildcard_parent == parent


def _bare_hex(digest: str) -> str:
    return digest.replace(":", "").upper()


def _fingerprint_matches(certificate: PeerCertificate, match: tuple[str, ...]) -> bool:
    """Certificate or public-key SHA-256 digest listed (colons optional, as Postfix >= 3.6)."""
    listed = {_bare_hex(digest) for digest in match}
    presented = (certificate.sha256_fingerprint, certificate.pubkey_sha256_fingerprint)
    return any(_bare_hex(digest) in listed for digest in presented if digest is not None)


def evaluate_server(engine: TlsEngine, policy: Policy, *, mx_hostname: str, nexthop: str) -> ServerVerdict:
    """Trust word, certificate facts and, where the level authenticates, the failure.

    `mx_hostname`: the server's name as found in DNS or the route; `nexthop`: the
    recipient domain, or the host of a bracketed route, without brackets or port.
    """
    der = engine.ssl_object.getpeercert(binary_form=True)
    if not der:
        failure = TlsHandshakeError(*_NO_CERTIFICATE) if policy.authenticates else None
        return ServerVerdict(PeerTrust.ANONYMOUS, None, failure)
    certificate = peer_certificate(der)
    if policy.dane is not None:
        return _dane_verdict(engine, policy.dane, der, certificate, nexthop=nexthop)
    untrusted = chain_failure(engine.verification.verdicts)
    if policy.level is Level.FINGERPRINT:
        matched, mismatch = _fingerprint_matches(certificate, policy.match), _FINGERPRINT_MISMATCH
    elif policy.level in (Level.VERIFY, Level.SECURE):
        names = certificate_names(parse_peer_certificate(der))
        references = reference_names(policy.match_or_default, mx_hostname=mx_hostname, nexthop=nexthop)
        matched = untrusted is None and any(name_matches(n, r) for r in references for n in names)
        mismatch = untrusted or _HOSTNAME_MISMATCH
    else:  # nothing to match; dane-only without TLSA records never gets this far
        matched, mismatch = False, _NO_TLSA
    if matched:
        trust = PeerTrust.VERIFIED
    elif untrusted or policy.level in (Level.VERIFY, Level.SECURE):
        # Postfix 3.x checks the name inside OpenSSL's chain verification
        # (X509_V_ERR_HOSTNAME_MISMATCH): a name that does not match is an Untrusted peer
        trust = PeerTrust.UNTRUSTED
    else:
        trust = PeerTrust.TRUSTED
    failure = None if matched or not policy.authenticates else TlsHandshakeError(*mismatch)
    return ServerVerdict(trust, certificate, failure)


def _dane_verdict(engine: TlsEngine, authority: DaneAuthority, der: bytes, certificate: PeerCertificate,
                  *, nexthop: str) -> ServerVerdict:
    outcome = match_chain(authority.records, openssl_ext.peer_chain(engine.ssl_object) or [der])
    if not isinstance(outcome, DaneMismatch) and outcome.record.usage == DANE_TA:
        names = certificate_names(parse_peer_certificate(der))
        references = (_normal(authority.base_domain), _normal(nexthop))
        if not any(name_matches(name, reference) for reference in references for name in names):
            outcome = DaneMismatch(*_HOSTNAME_MISMATCH)
    if isinstance(outcome, DaneMismatch):
        return ServerVerdict(PeerTrust.UNTRUSTED, certificate, TlsHandshakeError(outcome.result_type, outcome.reason))
    return ServerVerdict(PeerTrust.VERIFIED if authority.name_secure else PeerTrust.TRUSTED, certificate, None)
