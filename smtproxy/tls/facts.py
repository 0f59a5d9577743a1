"""One `HandshakeFacts` per completed handshake, from the engine's real handshake."""

from __future__ import annotations

from collections.abc import Callable

from smtproxy.events import Direction, HandshakeFacts, PeerCertificate, PeerTrust
from smtproxy.tls.certificates import peer_key_detail
from smtproxy.tls.engine import TlsEngine
from smtproxy.tls.trace import SIGNATURE_SCHEMES, observe

_FAMILY_OF_WORD = {"RSA": "RSA", "RSA-PSS": "RSA", "ECDSA": "EC", "ED25519": "ED25519", "ED448": "ED448"}
_WORD_OF_FAMILY = {"RSA": "RSA", "EC": "ECDSA", "ED25519": "ED25519", "ED448": "ED448"}

# (key family) -> detail of the local certificate in use, e.g. "EC" -> "P-256"
LocalKeyDetail = Callable[[str], str | None]


def _peer_key(engine: TlsEngine) -> tuple[str, str | None] | None:
    der = engine.ssl_object.getpeercert(binary_form=True)
    return peer_key_detail(der) if der else None


def _signature(
    scheme: int | None, key: tuple[str, str | None] | None, protocol: str | None
) -> tuple[str | None, str | None, str | None]:
    """(word, detail, digest): from the scheme when a signature was made, else the key."""
    if scheme is not None and scheme in SIGNATURE_SCHEMES:
        word, digest = SIGNATURE_SCHEMES[scheme]
        detail = key[1] if key and key[0] == _FAMILY_OF_WORD[word] else None
        return word, detail, digest
    if key is not None:  # resumed: no signature, but Postfix still names the key
        word = _WORD_OF_FAMILY.get(key[0], key[0])
        if word == "RSA" and protocol == "TLSv1.3":
            word = "RSA-PSS"  # the only way TLS 1.3 signs with an RSA key; Postfix says so too
        return word, key[1], None
    return None, None, None


def build_facts(
    engine: TlsEngine,
    *,
    direction: Direction,
    peer_name: str,
    peer_addr: str,
    peer_port: int,
    duration: float,
    peer_trust: PeerTrust,
    peer_certificate: PeerCertificate | None,
    local_key_detail: LocalKeyDetail | None = None,
    reused: bool = False,
) -> HandshakeFacts:
    ssl_object = engine.ssl_object
    protocol = ssl_object.version()
    cipher_name, _, bits = ssl_object.cipher() or (None, None, 0)
    seen = observe(engine.handshake_messages, server_side=engine.server_side, protocol=protocol, cipher=cipher_name)
    peer_key = _peer_key(engine)

    def local_key(scheme: int | None) -> tuple[str, str | None] | None:
        if scheme is None or scheme not in SIGNATURE_SCHEMES or local_key_detail is None:
            return None
        family = _FAMILY_OF_WORD[SIGNATURE_SCHEMES[scheme][0]]
        return family, local_key_detail(family)

    if engine.server_side:
        server = _signature(seen.server_scheme, local_key(seen.server_scheme), protocol)
        client = _signature(seen.client_scheme, peer_key, protocol) if seen.client_scheme else (None, None, None)
    else:
        server = _signature(seen.server_scheme, peer_key, protocol)
        client = (_signature(seen.client_scheme, local_key(seen.client_scheme), protocol) if seen.client_scheme
                  else (None, None, None))
    return HandshakeFacts(
        direction=direction,
        peer_name=peer_name,
        peer_addr=peer_addr,
        peer_port=peer_port,
        protocol=protocol,
        cipher=cipher_name,
        cipher_bits=bits or 0,
        cipher_alg_bits=bits or 0,
        key_exchange=seen.key_exchange,
        server_signature=server[0],
        server_signature_detail=server[1],
        server_digest=server[2],
        client_signature=client[0],
        client_signature_detail=client[1],
        client_digest=client[2],
        peer_trust=peer_trust,
        peer_certificate=peer_certificate,
        resumed=ssl_object.session_reused,
        reused=reused,
        duration=duration,
    )
