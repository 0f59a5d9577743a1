"""The least a Python STARTTLS proxy does per session, as a reference for the inbound scenarios:
``python -m tests.bench.minimal_proxy CERT KEY PORT BACKEND_PORT`` (``--python-floor``).

asyncio on uvloop and ssl over memory BIOs like smtproxy, one backend connection per
client like smtproxy, but no SMTP: bytes are relayed as they come, STARTTLS (the whole
first read after the greeting exchange) is answered here, and "250-STARTTLS" is added
after the "250-PIPELINING" line of the backend's plaintext EHLO reply. No limits, no
parsing, no logging, no handshake facts, no timeouts: not a proxy anyone should run. What
smtproxy's CPU per session exceeds this by is the cost of its own code; what this one
costs is Python's event loop, the sockets and OpenSSL.
"""

from __future__ import annotations

import asyncio
import ssl
import sys

import uvloop

_PIPELINING = b"250-PIPELINING\r\n"


class _Backend(asyncio.Protocol):
    def __init__(self, client: _Client) -> None:
        self.client = client

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.client.backend = transport

    def data_received(self, data: bytes) -> None:
        self.client.from_backend(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    def __init__(self, context: ssl.SSLContext, backend_port: int) -> None:
        self.context = context
        self.backend_port = backend_port
        self.backend: asyncio.Transport | None = None
        self.tls: ssl.SSLObject | None = None
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.handshake_done = False
        self.closed = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        loop = asyncio.get_running_loop()
        loop.create_task(loop.create_connection(lambda: _Backend(self), "127.0.0.1", self.backend_port))

    def from_backend(self, data: bytes) -> None:
        if self.tls is None:
            self.transport.write(data.replace(_PIPELINING, _PIPELINING + b"250-STARTTLS\r\n", 1))
        else:
            self.tls.write(data)
            self.transport.write(self.outgoing.read())

    def data_received(self, data: bytes) -> None:
        if self.tls is None:
            if data[:8].upper() == b"STARTTLS":
                self.transport.write(b"220 2.0.0 Ready to start TLS\r\n")
                self.tls = self.context.wrap_bio(self.incoming, self.outgoing, server_side=True)
            elif self.backend is not None:
                self.backend.write(data)
            return
        self.incoming.write(data)
        if not self.handshake_done:
            try:
                self.tls.do_handshake()
                self.handshake_done = True
            except ssl.SSLWantReadError:
                pass
            self.transport.write(self.outgoing.read())
            if not self.handshake_done:
                return
        chunks = []
        while self.incoming.pending or self.tls.pending():
            try:
                chunks.append(self.tls.read(16384))
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
        if chunks and self.backend is not None:
            self.backend.write(b"".join(chunks))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            if self.backend is not None:
                self.backend.close()


async def serve(cert_file: str, key_file: str, port: int, backend_port: int) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.num_tickets = 1  # as smtproxy
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Client(context, backend_port), "127.0.0.1", port, backlog=1024)
    print("minimal proxy ready", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
