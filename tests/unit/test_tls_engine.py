"""TlsEngine and the inbound server context over memory BIOs: what leaves and what is read."""

from __future__ import annotations

import _ssl
import ssl
from pathlib import Path

import pytest
import trustme

from smtproxy.config import CertificateConfig, InboundTlsConfig
from smtproxy.tls.engine import TlsEngine, _record_message
from smtproxy.tls.server_context import ServerTls
from tests.unit.test_tls_client import handshake

CA = trustme.CA()
LEAF = CA.issue_cert("mx.example.test")
NEW_SESSION_TICKET = 4


@pytest.fixture
def server_tls(tmp_path: Path) -> ServerTls:
    cert_file, key_file = tmp_path / "chain.pem", tmp_path / "key.pem"
    LEAF.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    LEAF.private_key_pem.write_to_path(str(key_file))
    return ServerTls(InboundTlsConfig(), [CertificateConfig(cert_file=cert_file, key_file=key_file)])


def client_context(records: list[tuple[int, int]] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(context)
    if records is not None:
        context._msg_callback = lambda conn, direction, version, content_type, msg_type, data: records.append(
            (int(content_type), int(msg_type)))
    return context


def client_engine(context: ssl.SSLContext) -> TlsEngine:
    return TlsEngine(context, server_side=False, server_hostname="mx.example.test")


def plain_client_handshake(context: ssl.SSLContext, server_tls: ServerTls,
                           session: ssl.SSLSession | None = None) -> ssl.SSLObject:
    """A plain SSLObject client (a TlsEngine would stop its message callback after the
    handshake, before the tickets arrive) against the server context, then one reply."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="mx.example.test", session=session)
    server = server_tls.new_engine()
    for _ in range(10):
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        server.receive(outgoing.read())
        incoming.write(server.outgoing())
        if server.handshake_done:
            break
    server.send(b"250 ok\r\n")
    incoming.write(server.outgoing())
    assert client.read(100) == b"250 ok\r\n"
    return client


def test_server_sends_one_tls13_session_ticket(server_tls: ServerTls):
    """OpenSSL's default is two; an SMTP client resumes one session per server."""
    records: list[tuple[int, int]] = []
    context = client_context(records)
    client = plain_client_handshake(context, server_tls)
    assert client.version() == "TLSv1.3"
    assert records.count((ssl._TLSContentType.HANDSHAKE, NEW_SESSION_TICKET)) == 1
    resumed = plain_client_handshake(context, server_tls, session=client.session)
    assert resumed.session_reused


def test_message_callback_stops_with_the_handshake(server_tls: ServerTls):
    """The handshake recorder costs a Python call and a copy per record; application data
    after the handshake must not reach it."""
    context = server_tls.default_context
    calls: list[int] = []

    def counting_recorder(conn, *message) -> None:
        calls.append(1)
        _record_message(conn, *message)

    _ssl._SSLContext._msg_callback.__set__(context, counting_recorder)
    client = client_engine(client_context())
    server = handshake(client, context)
    during_handshake = len(calls)
    for _ in range(20):
        client.send(b"x" * 1000)
        assert server.receive(client.outgoing()) == b"x" * 1000
        server.send(b"250 ok\r\n")
        assert client.receive(server.outgoing()) == b"250 ok\r\n"
    assert during_handshake > 0
    assert len(calls) == during_handshake
    assert server.handshake_messages  # what the handshake facts are read from was recorded


def test_receive_returns_every_record_fed_at_once_and_waits_for_a_partial_one(server_tls: ServerTls):
    client = client_engine(client_context())
    server = handshake(client, server_tls.default_context)
    for part in (b"MAIL FROM:<a@example.test>\r\n", b"RCPT TO:<b@example.test>\r\n", b"DATA\r\n"):
        client.send(part)
    wire = client.outgoing()
    client.send(b"QUIT\r\n")
    partial = client.outgoing()
    assert server.receive(wire + partial[:7]) == (
        b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert server.receive(partial[7:]) == b"QUIT\r\n"
    assert not server.peer_closed


def test_close_notify_marks_the_peer_closed(server_tls: ServerTls):
    client = client_engine(client_context())
    server = handshake(client, server_tls.default_context)
    client.send(b"QUIT\r\n")
    client.close()
    assert server.receive(client.outgoing()) == b"QUIT\r\n"
    assert server.peer_closed


def test_bytes_after_close_notify_are_dropped_not_buffered(server_tls: ServerTls):
    """OpenSSL reads nothing after close_notify: what a peer sends then must not pile up in
    the memory BIO (a peer could send without end while its last replies are due)."""
    client = client_engine(client_context())
    server = handshake(client, server_tls.default_context)
    client.close()
    server.receive(client.outgoing())
    assert server.peer_closed and not server.broken
    for _ in range(64):
        assert server.receive(b"\x17\x03\x03" + b"x" * 16384) == b""
    assert server._incoming.pending == 0
    server.send(b"221 bye\r\n")  # the replies still due can still be written
    assert client.receive(server.outgoing()) == b"221 bye\r\n"


def test_an_unknown_object_layout_only_costs_the_saving(server_tls: ServerTls, monkeypatch):
    """Where the SSL pointer cannot be found, handshakes still work; the hook stays on."""
    from smtproxy.tls import openssl_ext

    def layout_not_found(ssl_object):
        raise RuntimeError("cannot locate the SSL of an ssl.SSLObject on this Python build")

    monkeypatch.setattr(openssl_ext, "_ssl_pointer", layout_not_found)
    monkeypatch.setattr(openssl_ext, "_ssl_layout_known", True)
    client = client_engine(client_context())
    server = handshake(client, server_tls.default_context)
    client.send(b"QUIT\r\n")
    assert server.receive(client.outgoing()) == b"QUIT\r\n"
    assert openssl_ext._ssl_layout_known is False
