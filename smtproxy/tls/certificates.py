"""Certificate files and facts: self-signed generation, fingerprints, key descriptions."""

from __future__ import annotations

import datetime
import functools
import hashlib
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from smtproxy.events import PeerCertificate

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def key_detail(public_key) -> tuple[str, str | None]:
    """(key family, Postfix's detail): ("RSA", "2048 bits"), ("EC", "P-256"), ("ED25519", None)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return "RSA", f"{public_key.key_size} bits"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "EC", _CURVES.get(public_key.curve.name, public_key.curve.name)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ED25519", None
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "ED448", None
    return type(public_key).__name__, None


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


# A remote MX (or a client with a certificate) presents the same certificate on every
# connection: parse each one once, not on every handshake (the two parses per new outbound
# connection were ~8 % of its CPU in a py-spy profile).
_PARSED_CERTIFICATES = 256


@functools.lru_cache(maxsize=_PARSED_CERTIFICATES)
def parse_peer_certificate(der: bytes) -> x509.Certificate | None:
    """None for a certificate OpenSSL accepted but cryptography's stricter DER parser
    refuses (e.g. a UTCTime without seconds, which BER allows): a peer must not break
    the session by it. Such a certificate is known by its fingerprint only."""
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        return None


def _public_key(der: bytes):
    cert = parse_peer_certificate(der)
    if cert is None:
        return None
    try:
        return cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None


@functools.lru_cache(maxsize=_PARSED_CERTIFICATES)
def peer_key_detail(der: bytes) -> tuple[str, str | None] | None:
    key = _public_key(der)
    return key_detail(key) if key is not None else None


@functools.lru_cache(maxsize=_PARSED_CERTIFICATES)
def peer_certificate(der: bytes) -> PeerCertificate:
    cert, key = parse_peer_certificate(der), _public_key(der)
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) if key else None
    return PeerCertificate(
        subject_cn=_common_name(cert.subject) if cert is not None else None,
        issuer_cn=_common_name(cert.issuer) if cert is not None else None,
        sha256_fingerprint=colon_hex(hashlib.sha256(der).digest()),
        pubkey_sha256_fingerprint=colon_hex(hashlib.sha256(spki).digest()) if spki is not None else None,
    )


EXPIRY_WARNING = datetime.timedelta(days=14)


def validity_warnings(chains) -> list[str]:
    """One line per certificate of the inbound chains (the server's own, then each
    intermediate) that senders checking them would refuse (expired, not valid yet) or soon
    will (within `EXPIRY_WARNING`). Postfix says nothing of it; the operator should hear it
    before the first sender that verifies does."""
    now = datetime.datetime.now(datetime.timezone.utc)
    warnings = []
    for index, chain in enumerate(chains):
        if not Path(chain.cert_file).exists():
            continue  # to be generated on start (self_signed_if_missing)
        try:
            certificates = x509.load_pem_x509_certificates(Path(chain.cert_file).read_bytes())
        except ValueError:
            continue  # OpenSSL loads it (certificate_problem); cryptography is stricter
        for position, cert in enumerate(certificates):
            problem = _validity_problem(cert, now)
            if problem is not None:
                which = "the certificate" if position == 0 else f"chain certificate {position + 1} ({_subject(cert)})"
                warnings.append(f'inbound.certificates[{index}].cert_file = "{chain.cert_file}": {which} {problem}')
    return warnings


def _validity_problem(cert: x509.Certificate, now: datetime.datetime) -> str | None:
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    if after < now:
        return f"expired on {after:%Y-%m-%d %H:%M} UTC"
    if before > now:
        return f"not valid before {before:%Y-%m-%d %H:%M} UTC"
    if after - now < EXPIRY_WARNING:
        left = (after - now).days
        return f"expires on {after:%Y-%m-%d %H:%M} UTC, in {f'{left} days' if left else 'less than a day'}"
    return None


def _subject(cert: x509.Certificate) -> str:
    return _common_name(cert.subject) or cert.subject.rfc4514_string()


def chain_key_detail(cert_file: Path) -> tuple[str, str | None]:
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return key_detail(cert.public_key())


def ensure_certificate(cert_cfg, hostname: str) -> bool:
    """Generate a self-signed certificate when allowed and both files are missing: for
    `hostname` and the chain's `server_names`; an RSA key when the certificate file's name
    has the word "rsa" in it (`rsa.pem`, `mx-rsa.pem`), else ECDSA P-256."""
    cert_file, key_file = Path(cert_cfg.cert_file), Path(cert_cfg.key_file)
    if not cert_cfg.self_signed_if_missing or cert_file.exists() or key_file.exists():
        return False
    if "rsa" in re.split(r"[^a-z0-9]+", cert_file.name.lower()):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
    names = list(dict.fromkeys([hostname, *cert_cfg.server_names]))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new directory: for the key's owner only
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        # one file for both (key_file = cert_file is allowed): key first, then the chain
        out.write(key_pem + cert_pem if key_file.resolve() == cert_file.resolve() else key_pem)
    if key_file.resolve() != cert_file.resolve():
        cert_file.write_bytes(cert_pem)
    return True
