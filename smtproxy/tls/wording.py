"""Postfix's wording for handshake facts (src/tls/tls_misc.c, smtpd_tls_received_header)."""

from __future__ import annotations

import re

from smtproxy.events import Direction, HandshakeFacts


def key_exchange_text(label: str | None) -> str | None:
    """X25519/X448 bare, NIST curves as ECDHE (P-256), finite fields as DHE (2048 bits)."""
    if label is None:
        return None
    if label.startswith("P-"):
        return f"ECDHE ({label})"
    if label.startswith("ffdhe"):
        return f"DHE ({label[5:]} bits)"
    if label.startswith("DHE-"):
        return f"DHE ({label[4:]} bits)"
    return label


def _signature(role: str, word: str | None, detail: str | None, digest: str | None) -> str:
    if word is None:
        return ""
    text = f" {role}-signature {word}" + (f" ({detail})" if detail else "")
    return text + (f" {role}-digest {digest}" if digest else "")


def summary(facts: HandshakeFacts) -> str:
    text = f"{facts.protocol} with cipher {facts.cipher} ({facts.cipher_bits}/{facts.cipher_alg_bits} bits)"
    kex = key_exchange_text(facts.key_exchange)
    if kex:
        text += f" key-exchange {kex}"
    text += _signature("server", facts.server_signature, facts.server_signature_detail, facts.server_digest)
    text += _signature("client", facts.client_signature, facts.client_signature_detail, facts.client_digest)
    return text


def connection_line(facts: HandshakeFacts) -> str:
    """`Anonymous TLS connection established from host[addr]: ...` (or `to host[addr]:port`)."""
    verb = "reused" if facts.reused else "established"
    if facts.direction is Direction.INBOUND:
        where = f"from {facts.peer_name}[{facts.peer_addr}]"
    else:
        where = f"to {facts.peer_name}[{facts.peer_addr}]:{facts.peer_port}"
    return f"{facts.peer_trust.capitalize()} TLS connection {verb} {where}: {summary(facts)}"


def _header_safe(text: str | None) -> str:
    """Certificate names are peer-controlled: no CR/LF, quotes or parentheses in a header."""
    return re.sub(r'[\x00-\x1f\x7f()"\\]', "?", text or "")[:64]


def received_clause(facts: HandshakeFacts, *, client_cert_requested: bool) -> str:
    text = f"(using {summary(facts)})"
    cert = facts.peer_certificate
    if not client_cert_requested:
        return text + " (No client certificate requested)"
    if cert is None:
        return text + " (Client did not present a certificate)"
    verdict = "verified OK" if facts.peer_trust in ("trusted", "verified") else "not verified"
    # Postfix's clause, then what s/qmail-style fingerprint lists need (Postfix has no such clause)
    return (text + f' (Client CN "{_header_safe(cert.subject_cn)}", Issuer "{_header_safe(cert.issuer_cn)}"'
            f" ({verdict})) (client-fingerprint SHA256 {cert.sha256_fingerprint})")
