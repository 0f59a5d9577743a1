"""TLSA records as RFC 7672 judges them, and chains matched to them (policy/dane.py)."""

from __future__ import annotations

import datetime
import hashlib

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from smtproxy.policy.dane import (
    NO_MATCH,
    DaneMatch,
    DaneMismatch,
    Tlsa,
    TlsaStatus,
    lookup_tlsa,
    match_chain,
    tlsa_name,
)

NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.mark.parametrize(("record", "usable"), [
    (Tlsa(3, 1, 1, bytes(32)), True),
    (Tlsa(2, 0, 2, bytes(64)), True),
    (Tlsa(3, 0, 0, b"\x30\x00"), True),
    (Tlsa(0, 1, 1, bytes(32)), False),  # PKIX-TA: unusable for SMTP (RFC 7672 3.1.3)
    (Tlsa(1, 1, 1, bytes(32)), False),  # PKIX-EE
    (Tlsa(4, 1, 1, bytes(32)), False),  # unknown usage
    (Tlsa(3, 2, 1, bytes(32)), False),  # unknown selector
    (Tlsa(3, 1, 3, bytes(32)), False),  # unknown matching type
    (Tlsa(3, 1, 1, bytes(31)), False),  # a SHA2-256 digest of the wrong length
    (Tlsa(3, 1, 2, bytes(32)), False),  # a SHA2-512 digest of the wrong length
    (Tlsa(3, 1, 0, b""), False),  # no data
])
def test_usable_records(record, usable):
    assert record.usable is usable


def test_presentation_form_is_upper_case_hex_as_postfix_reports_it():
    assert str(Tlsa(3, 1, 1, bytes.fromhex("ab01"))) == "3 1 1 AB01"
    assert tlsa_name("mx.example.com.", 25) == "_25._tcp.mx.example.com"


def chain_of(leaf: trustme.LeafCert, *extra: trustme.CA) -> list[bytes]:
    pems = [blob.bytes() for blob in leaf.cert_chain_pems] + [ca.cert_pem.bytes() for ca in extra]
    return [x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER) for pem in pems]


def ta(ca: trustme.CA) -> Tlsa:
    der = x509.load_pem_x509_certificate(ca.cert_pem.bytes()).public_bytes(Encoding.DER)
    return Tlsa(2, 0, 1, hashlib.sha256(der).digest())


def test_dane_ta_walks_from_the_leaf_through_intermediates_in_any_order():
    root = trustme.CA()
    middle = root.create_child_ca()
    lower = middle.create_child_ca()
    chain = chain_of(lower.issue_cert("mx.example.com"))  # leaf, lower, middle
    shuffled = [chain[0], chain[2], chain[1]]
    assert match_chain((ta(middle),), shuffled) == DaneMatch(ta(middle), 1)
    assert match_chain((ta(root),), chain_of(lower.issue_cert("mx.example.com"), root)) == DaneMatch(ta(root), 3)


def test_dane_ta_needs_the_anchor_in_the_chain_and_valid_certificates_on_the_way():
    root = trustme.CA()
    middle = root.create_child_ca()
    assert match_chain((ta(root),), chain_of(middle.issue_cert("mx.example.com"))) == NO_MATCH
    stale = middle.issue_cert("mx.example.com", not_before=NOW - datetime.timedelta(days=2),
                              not_after=NOW - datetime.timedelta(days=1))
    assert match_chain((ta(middle),), chain_of(stale)) == DaneMismatch("certificate-expired", "certificate_has_expired")


def test_dane_ee_is_tried_before_dane_ta_and_garbage_matches_nothing():
    root = trustme.CA()
    chain = chain_of(root.create_child_ca().issue_cert("mx.example.com"))
    leaf = x509.load_der_x509_certificate(chain[0])
    ee = Tlsa(3, 0, 0, leaf.public_bytes(Encoding.DER))
    assert match_chain((ta(root), ee), chain) == DaneMatch(ee, 0)
    assert match_chain((ee,), [b"not a certificate"]) == NO_MATCH
    assert match_chain((ee,), []) == NO_MATCH


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, issuer: str, key, signer, *, ca: bool, path_length: int | None = None,
                 key_usage: x509.KeyUsage | None = None) -> x509.Certificate:
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(NOW - datetime.timedelta(days=1)).not_valid_after(NOW + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True))
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(signer, hashes.SHA256())


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(Encoding.DER)


def _anchor(certificate: x509.Certificate) -> Tlsa:
    return Tlsa(2, 0, 1, hashlib.sha256(_der(certificate)).digest())


def _keys(count: int) -> list:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(count)]


def test_dane_ta_refuses_a_path_through_a_certificate_that_may_not_issue():
    """An ordinary server certificate from the anchor CA must not vouch for another name
    (as OpenSSL's X509_V_ERR_INVALID_CA): not a CA, or a CA without keyCertSign."""
    anchor_key, holder_key, forged_key = _keys(3)
    anchor = _certificate("Anchor CA", "Anchor CA", anchor_key, anchor_key, ca=True)
    holder = _certificate("Holder", "Anchor CA", holder_key, anchor_key, ca=False)
    forged = _certificate("mx.victim.example", "Holder", forged_key, holder_key, ca=False)
    assert match_chain((_anchor(anchor),), [_der(forged), _der(holder), _der(anchor)]) == NO_MATCH
    signing_only = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                 data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                 crl_sign=False, encipher_only=False, decipher_only=False)
    no_cert_sign = _certificate("Holder", "Anchor CA", holder_key, anchor_key, ca=True, key_usage=signing_only)
    assert match_chain((_anchor(anchor),), [_der(forged), _der(no_cert_sign), _der(anchor)]) == NO_MATCH


def test_dane_ta_honours_path_length_constraints():
    anchor_key, middle_key, lower_key, leaf_key = _keys(4)
    for anchor_path_length, matches in ((0, False), (1, True)):
        anchor = _certificate("Anchor CA", "Anchor CA", anchor_key, anchor_key, ca=True,
                              path_length=anchor_path_length)
        middle = _certificate("Middle CA", "Anchor CA", middle_key, anchor_key, ca=True)
        leaf = _certificate("mx.example.com", "Middle CA", leaf_key, middle_key, ca=False)
        outcome = match_chain((_anchor(anchor),), [_der(leaf), _der(middle), _der(anchor)])
        assert isinstance(outcome, DaneMatch) is matches, (anchor_path_length, outcome)
    lower = _certificate("Lower CA", "Middle CA", lower_key, middle_key, ca=True)
    leaf = _certificate("mx.example.com", "Lower CA", leaf_key, lower_key, ca=False)
    outcome = match_chain((_anchor(anchor),), [_der(leaf), _der(lower), _der(middle), _der(anchor)])
    assert outcome == NO_MATCH  # two CAs below an anchor that allows one


def test_a_certificate_above_the_leaf_that_cannot_be_parsed_is_left_out():
    """OpenSSL accepts some encodings cryptography refuses (here a version field that
    DER must omit); a DANE-EE match needs only the leaf."""
    root = trustme.CA()
    leaf, ca = chain_of(root.issue_cert("mx.example.com"), root)
    at = ca.index(bytes.fromhex("a003020102"))
    odd_ca = ca[:at] + bytes.fromhex("a003020100") + ca[at + 5:]
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(odd_ca)
    ee = Tlsa(3, 0, 0, leaf)
    assert match_chain((ee,), [leaf, odd_ca]) == DaneMatch(ee, 0)
    assert match_chain((ee,), [odd_ca, leaf]) == NO_MATCH  # no leaf, nothing


class _Resolver:
    """Stands in for dnspython's resolver: one canned outcome (a lookup's classification
    is what is tested here; test_dane.py asks a real validating Unbound)."""

    def __init__(self, outcome) -> None:
        self.outcome = outcome

    async def resolve(self, qname: str, rdtype: str, **_options) -> dns.resolver.Answer:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        records, validated = self.outcome
        query = dns.message.make_query(qname, rdtype)
        response = dns.message.make_response(query)
        if validated:
            response.flags |= dns.flags.AD
        if records:
            rrset = response.find_rrset(response.answer, query.question[0].name, dns.rdataclass.IN,
                                        dns.rdatatype.TLSA, create=True)
            rrset.update(dns.rrset.from_text(query.question[0].name, 300, "IN", "TLSA", *records))
        return dns.resolver.Answer(dns.name.from_text(qname), dns.rdatatype.TLSA, dns.rdataclass.IN, response)


USABLE_TEXT = "3 1 1 " + "ab" * 32


@pytest.mark.parametrize(("outcome", "status", "reason"), [
    (([USABLE_TEXT, "1 1 1 " + "cd" * 32], True), TlsaStatus.USABLE, ""),
    ((["1 1 1 " + "cd" * 32, "3 1 3 abcd"], True), TlsaStatus.UNUSABLE, "all TLSA records unusable"),
    (([USABLE_TEXT], False), TlsaStatus.NONE, "TLSA records not DNSSEC-validated"),
    (([], True), TlsaStatus.NONE, "no TLSA records"),
    (dns.resolver.NXDOMAIN(), TlsaStatus.NONE, "no TLSA records"),
    (dns.resolver.NoNameservers(), TlsaStatus.FAILED, "server failure (SERVFAIL: DNSSEC bogus or unreachable)"),
    (dns.exception.Timeout(), TlsaStatus.FAILED, "timeout"),
], ids=["usable", "unusable", "not-validated", "nodata", "nxdomain", "servfail", "timeout"])
async def test_lookup_classification(outcome, status, reason):
    lookup = await lookup_tlsa(_Resolver(outcome), "mx.example.com", 25)
    assert (lookup.status, lookup.reason, lookup.qname) == (status, reason, "_25._tcp.mx.example.com")
    if status is TlsaStatus.USABLE:
        assert [str(record) for record in lookup.records] == [USABLE_TEXT.upper()]
