"""The remote connection's STARTTLS handshake, against a server on loopback that says 220
to STARTTLS and then breaks the handshake (what stripping on the path looks like)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from smtproxy.config import OutboundTlsConfig
from smtproxy.outbound.upstream import UpstreamConnection
from smtproxy.policy.levels import Level, Policy
from smtproxy.tls.client_context import ClientTls
from smtproxy.tls.engine import TlsHandshakeError


@pytest.fixture
async def closes_at_the_handshake() -> AsyncIterator[int]:
    """Accepts, reads the ClientHello's first bytes, closes without a byte of TLS."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_a_handshake_cut_off_after_the_220_is_a_validation_failure(closes_at_the_handshake):
    """The server offered and accepted STARTTLS: a handshake it then drops is a
    validation-failure (Postfix reports tls-handshake-failure under 205), not
    starttls-not-supported, which `may` would not report at all."""
    connection = await UpstreamConnection.open("127.0.0.1", closes_at_the_handshake, timeout=5)
    engine = ClientTls(OutboundTlsConfig(), None).new_engine(Policy(Level.MAY), "mx.example.test")
    with pytest.raises(TlsHandshakeError) as failed:
        await connection.start_tls(engine, timeout=5)
    assert (failed.value.failure_type, failed.value.reason) == ("validation-failure", "lost_connection")
    connection.abort()


async def test_a_parked_connection_says_goodbye_politely():
    """Closing an idle cached connection sends QUIT: its 221 is asked for, not an unasked
    reply that would abort the connection."""
    said: list[bytes] = []
    served = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        said.append(await reader.readline())
        writer.write(b"221 2.0.0 Bye\r\n")
        said.append(await reader.read())  # b"": the client closed after the 221
        writer.close()
        served.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        connection = await UpstreamConnection.open("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
        assert connection.park()
        await connection.quit(timeout=5)
        assert connection.closed_reason == "closed"
        await asyncio.wait_for(served.wait(), 5)
        assert said == [b"QUIT\r\n", b""]
    finally:
        server.close()
        await server.wait_closed()
