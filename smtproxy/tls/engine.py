"""TLS over memory BIOs: the caller owns every byte on the wire.

The asyncio shell reads ciphertext from the socket, hands it to `receive`, and writes what
`outgoing` returns.  Nothing that arrived before the engine existed can leak into TLS,
and handshake messages are recorded (see `trace`) so facts come from the real handshake.
"""

from __future__ import annotations

import _ssl
import ssl

from smtproxy.tls.openssl_ext import Session, VerifyRecorder, offer_session, recording, stop_message_callback

if not hasattr(ssl.SSLContext, "_msg_callback"):  # pragma: no cover - CPython 3.8+ has it
    raise ImportError("this Python's ssl module has no SSLContext._msg_callback")

_HANDSHAKE = 22
_READ_SIZE = 16 * 1024  # one TLS record's plaintext at most: SSL_read returns no more

# OpenSSL verify codes -> RFC 8460 result types, as Postfix 3.10 reports them: expiry and
# name mismatch have their own types; every other chain error (self-signed, unknown issuer,
# ...) is validation-failure with OpenSSL's text as the reason ("self-signed_certificate").
RESULT_TYPES = {
    10: "certificate-expired",
    62: "certificate-host-mismatch",
}


class TlsHandshakeError(Exception):
    def __init__(self, failure_type: str, reason: str) -> None:
        super().__init__(reason)
        self.failure_type = failure_type
        self.reason = reason


def _record_message(conn, direction, version, content_type, msg_type, data) -> None:
    trace = getattr(conn, "handshake_trace", None)
    if trace is not None and content_type == _HANDSHAKE:
        trace.append((direction, data))


def trace_handshakes(context: ssl.SSLContext) -> None:
    """Record the handshake messages of every connection made from `context`.

    Installed on `_ssl._SSLContext` directly: ssl.py's own setter wraps the callback in one
    that builds three enum values for every TLS record of every connection, handshake or
    not; `_record_message` only needs the plain integers."""
    _ssl._SSLContext._msg_callback.__set__(context, _record_message)


def failure_from(exc: ssl.SSLError) -> TlsHandshakeError:
    """Classify an OpenSSL error the way TLSRPT and Postfix's logs word it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        message = (exc.verify_message or "verification failed").replace(" ", "_")
        return TlsHandshakeError(RESULT_TYPES.get(exc.verify_code, "validation-failure"), message)
    reason = (exc.reason or type(exc).__name__).lower()
    return TlsHandshakeError("validation-failure", reason)


class TlsEngine:
    def __init__(
        self,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: Session | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        if session is not None:
            offer_session(self.ssl_object, session)
        self.server_side = server_side
        self.handshake_messages: list[tuple[str, bytes]] = []
        self.ssl_object.handshake_trace = self.handshake_messages
        self.verification = VerifyRecorder()
        self.handshake_done = False
        self.peer_closed = False  # close_notify received: the peer sends no more
        self.broken = False  # a TLS error after the handshake: nothing more can be sent either

    def handshake(self) -> bool:
        """Advance the handshake; True once complete.  Raises TlsHandshakeError."""
        if self.handshake_done:
            return True
        try:
            with recording(self.verification):
                self.ssl_object.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise failure_from(exc) from exc
        self.handshake_done = True
        self.ssl_object.handshake_trace = None
        stop_message_callback(self.ssl_object)
        return True

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext; returns decrypted application data (b"" while handshaking).

        When the handshake completes inside this call, application data that came with
        it is returned too.  After the handshake, close_notify sets `peer_closed`, and a
        TLS error sets both `peer_closed` and `broken`. After that, bytes are dropped, not
        buffered: OpenSSL reads no more of them, and a peer could send without end.
        """
        if self.peer_closed:
            return b""
        self._incoming.write(data)
        if not self.handshake_done and not self.handshake():
            return b""
        chunks = []
        # Read while records are left: a read that finds none raises SSLWantReadError,
        # which costs more than the record it would have found.
        while self._incoming.pending or self.ssl_object.pending():
            try:
                chunk = self.ssl_object.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except ssl.SSLError:
                self.peer_closed = self.broken = True
                break
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, data: bytes) -> None:
        self.ssl_object.write(data)

    def outgoing(self) -> bytes:
        return self._outgoing.read()

    def close(self) -> None:
        """Queue close_notify (best effort)."""
        try:
            self.ssl_object.unwrap()
        except ssl.SSLError:
            pass
