"""Session-ticket keys: shared, they let a client resume on another worker process; rotated,
an old key stops opening tickets after two rotations.

Real OpenSSL handshakes over memory BIOs: two server contexts stand for two workers, and
a session made with one is offered to the other.
"""

from __future__ import annotations

import gc
import os
import ssl

import pytest
import trustme

from smtproxy.tls.engine import TlsEngine
from smtproxy.tls.openssl_ext import TICKET_KEY_LENGTH, TicketKeys
from tests.unit.test_tls_client import handshake

CA = trustme.CA()
LEAF = CA.issue_cert("mx.example.test")
VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def new_key() -> bytes:
    return os.urandom(TICKET_KEY_LENGTH)


def worker_context(keys: TicketKeys | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    LEAF.configure_cert(context)
    if keys is not None:
        keys.install(context)
    return context


def client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    CA.configure_trust(context)
    context.maximum_version = version
    return context


def connect(server_context: ssl.SSLContext, client_context: ssl.SSLContext, session=None) -> TlsEngine:
    client = TlsEngine(client_context, server_side=False, server_hostname="mx.example.test", session=session)
    handshake(client, server_context)  # its first reply brings the TLS 1.3 tickets along
    return client


@pytest.mark.parametrize("version", VERSIONS)
def test_shared_keys_resume_across_workers(version):
    key, client = new_key(), client_context(version)
    first = connect(worker_context(TicketKeys(key)), client)
    second = connect(worker_context(TicketKeys(key)), client, session=first.ssl_object.session)
    assert second.ssl_object.session_reused


@pytest.mark.parametrize("version", VERSIONS)
def test_own_keys_do_not_resume_across_workers(version):
    client = client_context(version)
    first = connect(worker_context(None), client)
    second = connect(worker_context(None), client, session=first.ssl_object.session)
    assert not second.ssl_object.session_reused


@pytest.mark.parametrize("version", VERSIONS)
def test_a_ticket_opens_after_one_rotation_and_not_after_two(version):
    keys, client = TicketKeys(new_key()), client_context(version)
    server = worker_context(keys)
    session = connect(server, client).ssl_object.session
    keys.rotate(new_key())
    renewed = connect(server, client, session=session)
    assert renewed.ssl_object.session_reused  # sealed by the previous key: still opens
    keys.rotate(new_key())
    assert not connect(server, client, session=session).ssl_object.session_reused
    # the ticket that came with the resumed handshake is sealed by the key now previous
    assert connect(server, client, session=renewed.ssl_object.session).ssl_object.session_reused


@pytest.mark.parametrize("version", VERSIONS)
def test_a_worker_started_later_gets_the_previous_key_too(version):
    previous, current, client = new_key(), new_key(), client_context(version)
    running = TicketKeys(previous)
    session = connect(worker_context(running), client).ssl_object.session
    running.rotate(current)
    restarted = worker_context(TicketKeys(current, previous))
    assert connect(restarted, client, session=session).ssl_object.session_reused


def test_ticket_keys_have_openssls_length():
    with pytest.raises(ValueError, match="80 bytes"):
        TicketKeys(b"short")


def test_a_context_keeps_its_keys_alive():
    """OpenSSL holds only a pointer to the callback: keys installed and then dropped by the
    caller must not be collected (another callback would take over the freed closure)."""
    key, client = new_key(), client_context(ssl.TLSVersion.TLSv1_2)
    server = worker_context(TicketKeys(key))
    gc.collect()
    newcomer = TicketKeys(new_key())  # would reuse the freed closure
    session = connect(server, client).ssl_object.session
    assert connect(worker_context(TicketKeys(key)), client, session=session).ssl_object.session_reused
    assert not connect(worker_context(newcomer), client, session=session).ssl_object.session_reused
