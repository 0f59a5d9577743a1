"""Postfix's verdicts on the server certificate: trust words, name matching, failures."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtproxy.config import OutboundTlsConfig
from smtproxy.events import Direction, PeerTrust
from smtproxy.policy.dane import DaneAuthority, Tlsa
from smtproxy.policy.levels import Level, Policy
from smtproxy.tls.certificates import colon_hex, parse_peer_certificate
from smtproxy.tls.client_context import ClientTls
from smtproxy.tls.facts import build_facts
from smtproxy.tls.openssl_ext import VerifyVerdict
from smtproxy.tls.verify import (
    ServerVerdict,
    certificate_names,
    chain_failure,
    evaluate_server,
    name_matches,
    reference_names,
)
from tests.unit.test_tls_client import MX, ca, ca_file, client, handshake, server_context  # noqa: F401

DOMAIN = "example.com"
NOW = datetime.datetime.now(datetime.timezone.utc)
VERIFY = Policy(Level.VERIFY)
SECURE = Policy(Level.SECURE)


def expired(ca: trustme.CA, name: str) -> trustme.LeafCert:
    return ca.issue_cert(name, not_before=NOW - datetime.timedelta(days=2), not_after=NOW - datetime.timedelta(days=1))


def self_signed_server() -> ssl.SSLContext:
    """A server presenting a self-signed certificate (a fresh trustme root)."""
    root = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with root.cert_pem.tempfile() as cert_file, root.private_key_pem.tempfile() as key_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def anonymous_server() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL:@SECLEVEL=0")
    return context


def judge(
    client: ClientTls, policy: Policy, server: ssl.SSLContext, *, mx: str = MX, nexthop: str = DOMAIN
) -> ServerVerdict:
    engine = client.new_engine(policy, mx)
    handshake(engine, server)
    return evaluate_server(engine, policy, mx_hostname=mx, nexthop=nexthop)


def failure_of(verdict: ServerVerdict) -> tuple[str, str] | None:
    return (verdict.failure.failure_type, verdict.failure.reason) if verdict.failure else None


def der_of(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


# ------------------------------------------------------------------ trust words per level


@pytest.mark.parametrize("level", [Level.MAY, Level.ENCRYPT, Level.DANE])
def test_unauthenticated_levels_log_the_trust_word_and_never_fail(level, client: ClientTls, ca: trustme.CA) -> None:
    policy = Policy(level)
    trusted = judge(client, policy, server_context(ca.issue_cert(MX)))
    assert (trusted.trust, trusted.failure) == (PeerTrust.TRUSTED, None)  # name not checked: never Verified
    assert trusted.certificate is not None
    untrusted = judge(client, policy, self_signed_server())
    assert (untrusted.trust, untrusted.failure) == (PeerTrust.UNTRUSTED, None)
    wrong_name = judge(client, policy, server_context(ca.issue_cert("mx.elsewhere.net")))
    assert (wrong_name.trust, wrong_name.failure) == (PeerTrust.TRUSTED, None)


def test_anonymous_without_a_certificate(ca_file: Path) -> None:
    client = ClientTls(OutboundTlsConfig(ciphers="aNULL:HIGH:@SECLEVEL=0"), ca_file)
    engine = client.new_engine(Policy(Level.MAY), MX)
    handshake(engine, anonymous_server())
    may = evaluate_server(engine, Policy(Level.MAY), mx_hostname=MX, nexthop=DOMAIN)
    assert (may.trust, may.certificate, may.failure) == (PeerTrust.ANONYMOUS, None, None)
    verify = evaluate_server(engine, VERIFY, mx_hostname=MX, nexthop=DOMAIN)
    assert verify.trust is PeerTrust.ANONYMOUS
    assert failure_of(verify) == ("validation-failure", "no_peer_certificate")


def test_verify_with_matching_hostname_is_verified(client: ClientTls, ca: trustme.CA) -> None:
    verdict = judge(client, VERIFY, server_context(ca.issue_cert(MX)))
    assert (verdict.trust, verdict.failure) == (PeerTrust.VERIFIED, None)


def test_verify_matches_a_wildcard_for_one_label(client: ClientTls, ca: trustme.CA) -> None:
    assert judge(client, VERIFY, server_context(ca.issue_cert("*.example.com"))).trust is PeerTrust.VERIFIED
    deeper = judge(client, VERIFY, server_context(ca.issue_cert("*.example.com")), mx="a.mx.example.com")
    assert failure_of(deeper) == ("certificate-host-mismatch", "hostname_mismatch")


def test_verify_with_wrong_name_is_untrusted_and_fails(client: ClientTls, ca: trustme.CA) -> None:
    """posttls-finger 3.7 -l verify/secure: "num=62:hostname mismatch", then "Untrusted TLS
    connection established": Postfix checks the name inside OpenSSL's chain verification."""
    verdict = judge(client, VERIFY, server_context(ca.issue_cert("mx.elsewhere.net")))
    assert verdict.trust is PeerTrust.UNTRUSTED
    assert failure_of(verdict) == ("certificate-host-mismatch", "hostname_mismatch")


@pytest.mark.parametrize("name", [MX, "mx.elsewhere.net"])
def test_expired_is_reported_as_expired(name, client: ClientTls, ca: trustme.CA) -> None:
    verdict = judge(client, VERIFY, server_context(expired(ca, name)))
    assert verdict.trust is PeerTrust.UNTRUSTED
    assert failure_of(verdict) == ("certificate-expired", "certificate_has_expired")


def test_self_signed_is_not_trusted(client: ClientTls) -> None:
    verdict = judge(client, VERIFY, self_signed_server())
    assert verdict.trust is PeerTrust.UNTRUSTED
    assert failure_of(verdict) == ("validation-failure", "self-signed_certificate")


def test_unknown_issuer_is_not_trusted(client: ClientTls) -> None:
    verdict = judge(client, VERIFY, server_context(trustme.CA().issue_cert(MX)))
    assert failure_of(verdict) == ("validation-failure", "unable_to_get_local_issuer_certificate")


@pytest.mark.parametrize(
    ("names", "mx", "trust"),
    [
        ((DOMAIN,), "mx.hoster.net", PeerTrust.VERIFIED),  # nexthop
        (("mx1.example.com",), "mx1.example.com", PeerTrust.VERIFIED),  # dot-nexthop
        (("*.example.com",), "mx.hoster.net", PeerTrust.VERIFIED),  # dot-nexthop, as OpenSSL
        (("mx.hoster.net",), "mx.hoster.net", PeerTrust.UNTRUSTED),  # the MX name (insecure DNS) is not enough
        (("example.com.evil.net",), "mx.hoster.net", PeerTrust.UNTRUSTED),
    ],
)
def test_secure_matches_nexthop_and_its_subdomains(names, mx, trust, client: ClientTls, ca: trustme.CA) -> None:
    verdict = judge(client, SECURE, server_context(ca.issue_cert(*names)), mx=mx)
    assert verdict.trust is trust
    assert (verdict.failure is None) == (trust is PeerTrust.VERIFIED)


def test_match_list_overrides_the_level_default(client: ClientTls, ca: trustme.CA) -> None:
    server = server_context(ca.issue_cert("mail.partner.example"))
    assert judge(client, SECURE, server).trust is PeerTrust.UNTRUSTED
    assert judge(client, Policy(Level.SECURE, match=(".partner.example",)), server).trust is PeerTrust.VERIFIED
    assert judge(client, Policy(Level.VERIFY, match=("mail.partner.example",)), server).trust is PeerTrust.VERIFIED


# ------------------------------------------------------------------ fingerprint level


def fingerprints(cert: trustme.LeafCert) -> tuple[str, str]:
    parsed = x509.load_der_x509_certificate(der_of(cert))
    spki = parsed.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return colon_hex(hashlib.sha256(der_of(cert)).digest()), colon_hex(hashlib.sha256(spki).digest())


@pytest.mark.parametrize("which", ["certificate", "public key", "public key without colons"])
def test_fingerprint_match_is_verified_whatever_the_chain(which, client: ClientTls) -> None:
    cert = expired(trustme.CA(), "anything.invalid")  # untrusted, expired, wrong name
    certificate_digest, key_digest = fingerprints(cert)
    listed = {
        "certificate": certificate_digest,
        "public key": key_digest,
        "public key without colons": key_digest.replace(":", "").lower(),
    }[which]
    policy = Policy(Level.FINGERPRINT, match=("00:11", listed))
    verdict = judge(client, policy, server_context(cert))
    assert (verdict.trust, verdict.failure) == (PeerTrust.VERIFIED, None)
    assert verdict.certificate.sha256_fingerprint == certificate_digest


def test_fingerprint_mismatch_fails(client: ClientTls, ca: trustme.CA) -> None:
    policy = Policy(Level.FINGERPRINT, match=(fingerprints(ca.issue_cert(MX))[0],))
    verdict = judge(client, policy, server_context(ca.issue_cert(MX)))  # a trusted chain does not help
    assert verdict.trust is PeerTrust.TRUSTED
    assert failure_of(verdict) == ("certificate-not-trusted", "fingerprint_mismatch")


def test_dane_only_without_tlsa_records_fails_closed(client: ClientTls, ca: trustme.CA) -> None:
    verdict = judge(client, Policy(Level.DANE_ONLY), server_context(ca.issue_cert(MX)))
    assert failure_of(verdict) == ("dane-required", "no_usable_TLSA_records")


# ------------------------------------------------------------------ DANE (RFC 7672)


def spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def leaf_of(cert: trustme.LeafCert) -> x509.Certificate:
    return x509.load_der_x509_certificate(der_of(cert))


def ca_certificate(ca: trustme.CA) -> x509.Certificate:
    return x509.load_pem_x509_certificate(ca.cert_pem.bytes())


def dane(*records: Tlsa, name_secure: bool = True, level: Level = Level.DANE) -> Policy:
    return Policy(level, dane=DaneAuthority(records, MX, name_secure))


def ee(certificate: x509.Certificate, selector: int = 1, mtype: int = 1) -> Tlsa:
    data = spki(certificate) if selector else certificate.public_bytes(serialization.Encoding.DER)
    digest = {0: lambda b: b, 1: lambda b: hashlib.sha256(b).digest(), 2: lambda b: hashlib.sha512(b).digest()}
    return Tlsa(3, selector, mtype, digest[mtype](data))


def ta(certificate: x509.Certificate) -> Tlsa:
    return Tlsa(2, 0, 1, hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest())


@pytest.mark.parametrize(("selector", "mtype"), [(1, 1), (0, 1), (1, 2), (0, 0)])
def test_dane_ee_match_is_verified_whatever_the_name_chain_or_expiry(selector, mtype, client: ClientTls) -> None:
    """RFC 7672 3.1.1: a DANE-EE match skips name, chain and expiry checks."""
    stranger = trustme.CA()  # a CA nobody trusts, a name that is not the MX, and expired
    cert = expired(stranger, "unrelated.example.net")
    verdict = judge(client, dane(ee(leaf_of(cert), selector, mtype)), server_context(cert))
    assert (verdict.trust, verdict.failure) == (PeerTrust.VERIFIED, None)


def test_dane_ee_mismatch_fails_as_tlsa_invalid(client: ClientTls, ca: trustme.CA) -> None:
    other = leaf_of(ca.issue_cert(MX))
    verdict = judge(client, dane(ee(other)), server_context(ca.issue_cert(MX)))
    assert failure_of(verdict) == ("tlsa-invalid", "No_matching_DANE_TLSA_records")
    assert verdict.trust is PeerTrust.UNTRUSTED


def test_dane_match_under_an_insecure_mx_name_is_only_trusted(client: ClientTls, ca: trustme.CA) -> None:
    """Postfix's smtp_tls_dane_insecure_mx_policy = dane: authenticated, but logged
    Trusted, since the MX host name could have been forged."""
    cert = ca.issue_cert(MX)
    verdict = judge(client, dane(ee(leaf_of(cert)), name_secure=False), server_context(cert))
    assert (verdict.trust, verdict.failure) == (PeerTrust.TRUSTED, None)


def test_dane_ta_matches_the_sent_issuer_and_checks_the_name() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    anchor = ta(ca_certificate(intermediate))
    client = ClientTls(OutboundTlsConfig(), None)  # the system store: DANE-TA needs no CA file
    good = judge(client, dane(anchor), server_context(intermediate.issue_cert(MX)))
    assert (good.trust, good.failure) == (PeerTrust.VERIFIED, None)
    by_nexthop = judge(client, dane(anchor), server_context(intermediate.issue_cert("*." + DOMAIN)))
    assert (by_nexthop.trust, by_nexthop.failure) == (PeerTrust.VERIFIED, None)
    wrong_name = judge(client, dane(anchor), server_context(intermediate.issue_cert("unrelated.example.net")))
    assert failure_of(wrong_name) == ("certificate-host-mismatch", "hostname_mismatch")


def test_dane_ta_checks_expiry_and_ignores_an_anchor_the_leaf_does_not_chain_to() -> None:
    root = trustme.CA()
    intermediate = root.create_child_ca()
    client = ClientTls(OutboundTlsConfig(), None)
    stale = judge(client, dane(ta(ca_certificate(intermediate))), server_context(expired(intermediate, MX)))
    assert failure_of(stale) == ("certificate-expired", "certificate_has_expired")
    unrelated = trustme.CA()
    verdict = judge(client, dane(ta(ca_certificate(unrelated))), server_context(intermediate.issue_cert(MX)))
    assert failure_of(verdict) == ("tlsa-invalid", "No_matching_DANE_TLSA_records")


def test_dane_ta_of_the_leaf_itself_does_not_authenticate(client: ClientTls, ca: trustme.CA) -> None:
    """A DANE-TA record names an issuer; the leaf matching it proves nothing about names."""
    cert = ca.issue_cert("unrelated.example.net")
    verdict = judge(client, dane(Tlsa(2, 1, 1, hashlib.sha256(spki(leaf_of(cert))).digest())), server_context(cert))
    assert failure_of(verdict) == ("tlsa-invalid", "No_matching_DANE_TLSA_records")


# ------------------------------------------------------------------ trust store and depth


def test_system_store_when_no_ca_file_is_configured(ca: trustme.CA) -> None:
    verdict = judge(ClientTls(OutboundTlsConfig(), None), VERIFY, server_context(ca.issue_cert(MX)))
    assert failure_of(verdict) == ("validation-failure", "unable_to_get_local_issuer_certificate")


def test_policy_ca_file_overrides_the_configured_one(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    client = ClientTls(OutboundTlsConfig(), other)
    server = server_context(ca.issue_cert(MX))
    assert judge(client, VERIFY, server).trust is PeerTrust.UNTRUSTED
    assert judge(client, Policy(Level.VERIFY, ca_file=ca_file), server).trust is PeerTrust.VERIFIED


@pytest.mark.parametrize(("depth", "failure"), [(1, ("validation-failure", "certificate_chain_too_long")), (2, None)])
def test_verify_depth_counts_like_postfix(depth, failure, tmp_path: Path) -> None:
    root = trustme.CA()
    root.cert_pem.write_to_path(str(tmp_path / "root.pem"))
    leaf = root.create_child_ca().issue_cert(MX)  # leaf, intermediate, root: depth 2
    verdict = judge(ClientTls(OutboundTlsConfig(), tmp_path / "root.pem"), Policy(Level.VERIFY, verify_depth=depth),
                    server_context(leaf))
    assert failure_of(verdict) == failure


# ------------------------------------------------------------------ resumed handshakes


@pytest.mark.parametrize(
    ("policy", "cert", "trust"),
    [
        (VERIFY, lambda ca: ca.issue_cert(MX), PeerTrust.VERIFIED),
        (VERIFY, lambda ca: expired(ca, MX), PeerTrust.UNTRUSTED),
        (Policy(Level.MAY), lambda ca: trustme.CA().issue_cert(MX), PeerTrust.UNTRUSTED),
        (Policy(Level.MAY), lambda ca: ca.issue_cert("mx.elsewhere.net"), PeerTrust.TRUSTED),
    ],
)
def test_resumed_handshake_keeps_the_verdict(policy, cert, trust, client: ClientTls, ca: trustme.CA) -> None:
    server = server_context(cert(ca))
    first = client.new_engine(policy, MX)
    handshake(first, server)
    resumed = client.new_engine(policy, MX, session=first.ssl_object.session)
    handshake(resumed, server)
    assert resumed.ssl_object.session_reused
    full = evaluate_server(first, policy, mx_hostname=MX, nexthop=DOMAIN)
    again = evaluate_server(resumed, policy, mx_hostname=MX, nexthop=DOMAIN)
    assert again.trust is full.trust is trust
    assert failure_of(again) == failure_of(full)
    assert again.certificate == full.certificate is not None


# ------------------------------------------------------------------ the rules, one by one


@pytest.mark.parametrize(
    ("certificate_name", "reference", "matches"),
    [
        ("mx.example.com", "mx.example.com", True),
        ("*.example.com", "mx.example.com", True),
        ("*.example.com", "a.mx.example.com", False),  # one label only
        ("*.example.com", "example.com", False),
        ("*.com", "example.com", False),  # not a whole domain
        ("mx*.example.com", "mx1.example.com", False),  # partial wildcard
        ("m*.example.com", "m*.example.com", True),  # ... is just a name
        ("mx.example.com", ".example.com", True),
        ("a.b.example.com", ".example.com", True),
        ("*.example.com", ".example.com", True),
        ("example.com", ".example.com", False),
        ("badexample.com", ".example.com", False),
        ("mx.example.com", "example.com", False),
    ],
)
def test_name_matching(certificate_name, reference, matches) -> None:
    assert name_matches(certificate_name, reference) is matches


def test_reference_names_from_strategies_and_patterns() -> None:
    match = ("hostname", "nexthop", "dot-nexthop", "Mail.Example.NET.", ".example.org", "")
    assert list(reference_names(match, mx_hostname="MX.example.com.", nexthop="Example.com")) == [
        "mx.example.com", "example.com", ".example.com", "mail.example.net", ".example.org",
    ]
    assert list(reference_names(("nexthop", "dot-nexthop"), mx_hostname=MX, nexthop="")) == []


def certificate(common_name: str, *dns_names: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=1))
    )
    if dns_names:
        san = x509.SubjectAlternativeName([x509.DNSName(dns) for dns in dns_names])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256())


def test_common_name_only_without_dns_names() -> None:
    assert certificate_names(certificate("Legacy.Example.com")) == ["legacy.example.com"]
    assert certificate_names(certificate("cn.example.com", "a.example.com", "B.example.com")) == [
        "a.example.com", "b.example.com",
    ]


def test_chain_failure_is_the_verdict_nearest_the_leaf() -> None:
    assert chain_failure([]) is None
    verdicts = [
        VerifyVerdict(depth=1, code=10, message="certificate has expired"),
        VerifyVerdict(depth=0, code=20, message="unable to get local issuer certificate"),
        VerifyVerdict(depth=0, code=10, message="certificate has expired"),
    ]
    assert chain_failure(verdicts) == ("validation-failure", "unable_to_get_local_issuer_certificate")
    assert chain_failure([VerifyVerdict(depth=0, code=9, message="certificate is not yet valid")]) == (
        "validation-failure", "certificate_is_not_yet_valid",
    )


# ------------------------------------------------------------------ certificates only OpenSSL parses


def _tlv(tag: int, body: bytes) -> bytes:
    length = len(body)
    head = bytes([length]) if length < 0x80 else bytes([0x80 | (length.bit_length() + 7) // 8]) + length.to_bytes(
        (length.bit_length() + 7) // 8, "big")
    return bytes([tag]) + head + body


def _children(body: bytes) -> list[tuple[int, bytes, bytes]]:
    """(tag, content, whole TLV) of each DER element in `body`."""
    found, offset = [], 0
    while offset < len(body):
        tag, length, start = body[offset], body[offset + 1], offset + 2
        if length & 0x80:
            size = length & 0x7F
            length, start = int.from_bytes(body[start:start + size], "big"), start + size
        found.append((tag, body[start:start + length], body[offset:start + length]))
        offset = start + length
    return found


def utctime_without_seconds(tmp_path: Path) -> tuple[ssl.SSLContext, bytes]:
    """A server whose self-signed certificate writes its validity as YYMMDDHHMMZ: BER that
    OpenSSL accepts and cryptography's strict DER parser refuses."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, MX)])
    start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)
    der = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
           .serial_number(1).not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    tbs, algorithm, _ = _children(_children(der)[0][1])
    fields = []
    for tag, body, whole in _children(tbs[1]):
        times = _children(body) if tag == 0x30 else []
        if len(times) == 2 and all(t == 0x17 for t, _, _ in times):  # the Validity
            whole = _tlv(0x30, b"".join(_tlv(0x17, value[:10] + b"Z") for _, value, _ in times))
        fields.append(whole)
    new_tbs = _tlv(0x30, b"".join(fields))
    signature = key.sign(new_tbs, ec.ECDSA(hashes.SHA256()))
    bad = _tlv(0x30, new_tbs + algorithm[2] + _tlv(0x03, b"\0" + signature))
    cert_file, key_file = tmp_path / "bad.pem", tmp_path / "bad.key"
    cert_file.write_text(ssl.DER_cert_to_PEM_cert(bad))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, bad


@pytest.mark.parametrize(("level", "trust", "failed"), [
    (Level.MAY, PeerTrust.UNTRUSTED, False),
    (Level.VERIFY, PeerTrust.UNTRUSTED, True),
    (Level.FINGERPRINT, PeerTrust.VERIFIED, False),
])
def test_a_certificate_cryptography_cannot_parse_is_known_by_its_fingerprint(
        level, trust, failed, client: ClientTls, tmp_path: Path) -> None:
    """A remote MX (or client) may present one: the session goes on as under any other
    certificate the level does not accept, instead of failing with a traceback."""
    server, der = utctime_without_seconds(tmp_path)
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(der)
    fingerprint = colon_hex(hashlib.sha256(der).digest())
    policy = Policy(level, match=(fingerprint,) if level is Level.FINGERPRINT else ())
    engine = client.new_engine(policy, MX)
    handshake(engine, server)
    verdict = evaluate_server(engine, policy, mx_hostname=MX, nexthop=DOMAIN)
    assert (verdict.trust, verdict.failure is not None) == (trust, failed), verdict
    assert verdict.certificate is not None
    assert (verdict.certificate.sha256_fingerprint, verdict.certificate.subject_cn) == (fingerprint, None)
    facts = build_facts(engine, direction=Direction.OUTBOUND, peer_name=MX, peer_addr="192.0.2.1", peer_port=25,
                        duration=0.0, peer_trust=verdict.trust, peer_certificate=verdict.certificate)
    assert (facts.server_signature, facts.server_signature_detail) == ("ECDSA", None)  # the key is not parsed


def test_a_certificate_whose_extensions_cryptography_refuses_names_nothing(ca: trustme.CA) -> None:
    """cryptography parses extensions only when they are first read: a duplicated
    subjectAltName (BER OpenSSL's client may accept from a non-OpenSSL server) must count
    as no name, not escape as an exception."""
    der = der_of(ca.issue_cert(MX))
    tbs, algorithm, signature = _children(_children(der)[0][1])
    fields = [whole for _, _, whole in _children(tbs[1])]
    extensions = _children(_children(_children(fields[-1])[0][1])[0][1])
    san = next(whole for _, body, whole in extensions if body.startswith(b"\x06\x03\x55\x1d\x11"))  # 2.5.29.17
    duplicated = [whole for _, _, whole in extensions] + [san]
    fields[-1] = _tlv(0xA3, _tlv(0x30, b"".join(duplicated)))
    bad = _tlv(0x30, _tlv(0x30, b"".join(fields)) + algorithm[2] + signature[2])
    assert certificate_names(parse_peer_certificate(bad)) == []
