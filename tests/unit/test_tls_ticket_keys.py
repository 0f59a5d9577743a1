"""Shared session-ticket keys: what lets a client resume on another worker process.

Two server contexts stand for two workers; a session made with one is offered to the other.
"""

from __future__ import annotations

import os
import ssl

import pytest
import trustme

from smtproxy.tls.engine import TlsEngine
from smtproxy.tls.openssl_ext import TICKET_KEYS_LENGTH, set_ticket_keys
from tests.unit.test_tls_client import handshake

CA = trustme.CA()
LEAF = CA.issue_cert("mx.example.test")


def worker_context(keys: bytes | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    LEAF.configure_cert(context)
    if keys is not None:
        set_ticket_keys(context, keys)
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


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_shared_keys_resume_across_workers(version):
    keys, client = os.urandom(TICKET_KEYS_LENGTH), client_context(version)
    first = connect(worker_context(keys), client)
    second = connect(worker_context(keys), client, session=first.ssl_object.session)
    assert second.ssl_object.session_reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_own_keys_do_not_resume_across_workers(version):
    client = client_context(version)
    first = connect(worker_context(None), client)
    second = connect(worker_context(None), client, session=first.ssl_object.session)
    assert not second.ssl_object.session_reused


def test_ticket_keys_have_openssls_length():
    with pytest.raises(ValueError, match="80 bytes"):
        set_ticket_keys(worker_context(None), b"short")
