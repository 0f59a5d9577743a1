"""What the handshake messages themselves say: group, DH size, signature algorithms.

Python 3.11's `ssl` does not report the key-exchange group or the signature algorithm, so
they are read from the plaintext handshake messages (`SSLContext._msg_callback` sees every
message, TLS 1.3's encrypted ones included).  `observe` is a pure function over the
recorded (direction, message) list, so it is unit-tested on recorded handshakes.
"""

from __future__ import annotations

import dataclasses
import struct

CLIENT_HELLO, SERVER_HELLO, SERVER_KEY_EXCHANGE, CERTIFICATE_VERIFY = 1, 2, 12, 15
_EXT_KEY_SHARE = 0x0033

GROUPS = {
    0x0017: "P-256",
    0x0018: "P-384",
    0x0019: "P-521",
    0x001D: "X25519",
    0x001E: "X448",
    0x0100: "ffdhe2048",
    0x0101: "ffdhe3072",
    0x0102: "ffdhe4096",
    0x0103: "ffdhe6144",
    0x0104: "ffdhe8192",
}

# TLS SignatureScheme -> (Postfix's signature word, digest or None)
SIGNATURE_SCHEMES = {
    0x0201: ("RSA", "SHA1"),
    0x0203: ("ECDSA", "SHA1"),
    0x0401: ("RSA", "SHA256"),
    0x0403: ("ECDSA", "SHA256"),
    0x0501: ("RSA", "SHA384"),
    0x0503: ("ECDSA", "SHA384"),
    0x0601: ("RSA", "SHA512"),
    0x0603: ("ECDSA", "SHA512"),
    0x0804: ("RSA-PSS", "SHA256"),
    0x0805: ("RSA-PSS", "SHA384"),
    0x0806: ("RSA-PSS", "SHA512"),
    0x0807: ("ED25519", None),
    0x0808: ("ED448", None),
    0x0809: ("RSA-PSS", "SHA256"),
    0x080A: ("RSA-PSS", "SHA384"),
    0x080B: ("RSA-PSS", "SHA512"),
}

Message = tuple[str, bytes]  # ("read" | "write", handshake message with its 4-byte header)


@dataclasses.dataclass(frozen=True, slots=True)
class Observed:
    key_exchange: str | None = None  # metric label: X25519, P-256, ffdhe2048, DHE-2048
    server_scheme: int | None = None
    client_scheme: int | None = None


def _server_hello_group(body: bytes) -> int | None:
    offset = 2 + 32
    offset += 1 + body[offset]  # session id
    offset += 2 + 1  # cipher suite, compression
    if offset + 2 > len(body):
        return None
    (ext_total,) = struct.unpack_from("!H", body, offset)
    offset += 2
    end = min(len(body), offset + ext_total)
    group = None
    while offset + 4 <= end:
        ext_type, ext_len = struct.unpack_from("!HH", body, offset)
        offset += 4
        if ext_type == _EXT_KEY_SHARE and ext_len >= 2:
            (group,) = struct.unpack_from("!H", body, offset)  # HelloRetryRequest carries only this
        offset += ext_len
    return group


def _server_key_exchange(body: bytes, cipher: str) -> tuple[str | None, int | None]:
    """(key-exchange label, signature scheme) of a TLS 1.2 ServerKeyExchange."""
    if cipher.startswith(("ECDHE", "AECDH")):
        if body[0] != 3:  # only named curves are negotiated by OpenSSL 3
            return None, None
        (group,) = struct.unpack_from("!H", body, 1)
        offset = 3 + 1 + body[3]
        label = GROUPS.get(group, f"group-{group:#06x}")
    else:  # DHE / EDH / ADH: p, g, Ys as 2-byte-length-prefixed integers
        (p_len,) = struct.unpack_from("!H", body, 0)
        prime = body[2 : 2 + p_len].lstrip(b"\0")
        offset = 2 + p_len
        for _ in range(2):
            (length,) = struct.unpack_from("!H", body, offset)
            offset += 2 + length
        label = f"DHE-{len(prime) * 8}"
    scheme = struct.unpack_from("!H", body, offset)[0] if offset + 2 <= len(body) else None
    return label, scheme


def observe(messages: list[Message], *, server_side: bool, protocol: str | None, cipher: str | None) -> Observed:
    """Read the negotiated group and signature schemes from the recorded messages."""
    ours = "write" if server_side else "read"  # direction of messages the server sent
    group = None
    key_exchange = None
    server_scheme = client_scheme = None
    for direction, message in messages:
        if len(message) < 4:
            continue
        kind, body = message[0], message[4:]
        try:
            if kind == SERVER_HELLO and direction == ours:
                group = _server_hello_group(body) or group
            elif kind == SERVER_KEY_EXCHANGE and direction == ours and cipher:
                key_exchange, server_scheme = _server_key_exchange(body, cipher)
            elif kind == CERTIFICATE_VERIFY and len(body) >= 2:
                (scheme,) = struct.unpack_from("!H", body, 0)
                if direction == ours:
                    server_scheme = scheme
                else:
                    client_scheme = scheme
        except (IndexError, struct.error):
            continue  # a malformed message fails the handshake anyway; report what we know
    if protocol == "TLSv1.3" and group is not None:
        key_exchange = GROUPS.get(group, f"group-{group:#06x}")
    return Observed(key_exchange, server_scheme, client_scheme)
