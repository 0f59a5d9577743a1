"""Self-signed certificates made on first start, and the warnings about certificates that
senders which check them would refuse."""

from __future__ import annotations

import datetime

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from smtproxy.config import CertificateConfig
from smtproxy.tls.certificates import ensure_certificate, validity_warnings


def generated(tmp_path, name: str, **options) -> x509.Certificate:
    chain = CertificateConfig(cert_file=tmp_path / "keys" / name, key_file=tmp_path / "keys" / f"{name}.key",
                              self_signed_if_missing=True, **options)
    assert ensure_certificate(chain, "mx.example.com")
    return x509.load_pem_x509_certificate(chain.cert_file.read_bytes())


def test_the_generated_certificate_names_the_host_and_the_chains_server_names(tmp_path):
    cert = generated(tmp_path, "ecdsa.pem", server_names=("mail.example.org", "mx.example.com"))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["mx.example.com", "mail.example.org"]
    assert (tmp_path / "keys").stat().st_mode & 0o077 == 0  # the key's new directory: its owner's only
    assert (tmp_path / "keys" / "ecdsa.pem.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("name", "kind"), [("rsa.pem", rsa.RSAPublicKey), ("mx-rsa.pem", rsa.RSAPublicKey),
                                            ("corsair.pem", ec.EllipticCurvePublicKey)])
def test_an_rsa_key_only_for_a_file_named_with_the_word_rsa(tmp_path, name, kind):
    assert isinstance(generated(tmp_path, name).public_key(), kind)


def test_expired_not_yet_valid_and_soon_expiring_certificates_are_warned_about(tmp_path):
    ca, now = trustme.CA(), datetime.datetime.now(datetime.timezone.utc)
    chains = []
    for index, (before, after) in enumerate([(-30, -1), (2, 30), (-1, 5), (-1, 300)]):
        leaf = ca.issue_cert("mx.example.com", not_before=now + datetime.timedelta(days=before),
                             not_after=now + datetime.timedelta(days=after))
        path = tmp_path / f"{index}.pem"
        leaf.cert_chain_pems[0].write_to_path(str(path))
        chains.append(CertificateConfig(cert_file=path, key_file=path))
    warnings = validity_warnings(chains)
    assert [w.split(": the certificate ")[1].split(" on ")[0].split(" before ")[0] for w in warnings] == [
        "expired", "not valid", "expires"]
    assert warnings[0].startswith(f'inbound.certificates[0].cert_file = "{tmp_path}/0.pem": the certificate expired on ')
    assert warnings[2].endswith("in 4 days") or warnings[2].endswith("in 5 days"), warnings[2]


def test_an_expired_intermediate_is_warned_about_too(tmp_path):
    ca, now = trustme.CA(), datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert("mx.example.com")
    expired = ca.issue_cert("old-intermediate.example", common_name="Old Intermediate", not_before=now - datetime.timedelta(days=30),
                            not_after=now - datetime.timedelta(days=1))
    chain_file = tmp_path / "chain.pem"
    chain_file.write_bytes(leaf.cert_chain_pems[0].bytes() + expired.cert_chain_pems[0].bytes())
    [warning] = validity_warnings([CertificateConfig(cert_file=chain_file, key_file=chain_file)])
    assert ': chain certificate 2 (Old Intermediate) expired on ' in warning, warning
