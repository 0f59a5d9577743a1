"""One SMTP client connection to a remote MX: replies in, commands out, STARTTLS in place.

TLS runs over memory BIOs (`tls.engine.TlsEngine`), so this object sees every byte on the
wire.  When the server answers STARTTLS with 220, whatever else arrived with that reply is
thrown away before the handshake starts: a man in the middle cannot queue replies in
plaintext that the proxy would then read as if they came inside TLS (the response-injection
mirror of CVE-2011-0411, DESIGN.md invariant 2).
"""

from __future__ import annotations

import asyncio
import time

from smtproxy.smtp import PeerProtocolError, Reply, ReplyParser
from smtproxy.smtp.replies import MAX_REPLY_LINES
from smtproxy.tls.engine import TlsEngine, TlsHandshakeError


class UpstreamError(Exception):
    """The remote connection failed; `reason` is one short phrase for logs and replies."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _expire(waiter: asyncio.Future[None], what: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamError(f"timeout {what}"))


class UpstreamConnection(asyncio.Protocol):
    """Use `await UpstreamConnection.open(...)`; then `command`, `send`, `read_reply`."""

    def __init__(self, max_reply_line: int = 2048) -> None:
        self.transport: asyncio.Transport | None = None
        self.engine: TlsEngine | None = None
        self.discarded_after_starttls = 0
        self.created = time.monotonic()
        self._parser = ReplyParser(max_reply_line)
        # more unread than the longest reply accepted: the remote sends what nobody asked for
        self._max_unread = MAX_REPLY_LINES * max_reply_line
        self._loop = asyncio.get_running_loop()  # once: each call costs a getpid()
        self._waiter: asyncio.Future[None] | None = None
        self._closed_reason: str | None = None
        self._handshake_error: TlsHandshakeError | None = None
        self._parked = False  # idle in the connection cache: no reply is due
        self._can_write = asyncio.Event()
        self._can_write.set()

    @classmethod
    async def open(cls, host: str, port: int, *, timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(cls, host, port)
        except asyncio.TimeoutError:
            raise UpstreamError("connection timed out") from None
        except OSError as exc:
            raise UpstreamError(exc.strerror or str(exc) or "connection failed") from None
        return protocol

    # ----------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.engine is None:
            self._parser.feed(data)
        else:
            try:
                plaintext = self.engine.receive(data)
            except TlsHandshakeError as exc:
                self._handshake_error = exc
                plaintext = b""
            self._flush_tls()
            self._parser.feed(plaintext)
            if self.engine.peer_closed:
                self._closed_reason = self._closed_reason or "lost connection"
        if self._parser.unread > self._max_unread:
            self._closed_reason = self._closed_reason or "remote sent more than any reply"
            self.abort()
        elif self._parked:
            self._drop_unasked_input()
        self._wake()

    def eof_received(self) -> bool:
        self._closed_reason = self._closed_reason or "lost connection"
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed_reason = self._closed_reason or "lost connection"
        self._can_write.set()
        self._wake()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, deadline: float, what: str) -> None:
        """Until data or a close arrives, or the deadline passes (one timer on the loop:
        `asyncio.timeout` would look the running loop up three times, a getpid() each)."""
        waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiter, what)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _drop_unasked_input(self) -> None:
        if self._parser.unread:
            self._closed_reason = self._closed_reason or "unasked-for reply"
            self.abort()

    # ----------------------------------------------------------------- API

    def park(self) -> bool:
        """Idle between transactions: a reply arriving now (or already here) was asked for
        by nobody -- a 421 before an idle close, or a remote out of step -- and read as
        the next command's reply it would answer the wrong command.  Such a connection is
        dropped.  False if it cannot be parked."""
        self._parked = True
        self._drop_unasked_input()
        return self.alive

    def unpark(self) -> None:
        self._parked = False

    @property
    def closed_reason(self) -> str | None:
        return self._closed_reason

    @property
    def alive(self) -> bool:
        return self._closed_reason is None and self.transport is not None and not self.transport.is_closing()

    @property
    def tls_active(self) -> bool:
        return self.engine is not None and self.engine.handshake_done

    def send(self, data: bytes) -> None:
        if not self.alive:
            raise UpstreamError(self._closed_reason or "lost connection")
        assert self.transport is not None
        if self.engine is not None:
            self.engine.send(data)
            self._flush_tls()
        else:
            self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait while the socket's send buffer is over its high-water mark; a remote that
        stops reading for `timeout` seconds counts as lost (Postfix: smtp_data_xfer_timeout)."""
        if not self._can_write.is_set():
            try:
                async with asyncio.timeout(timeout):
                    await self._can_write.wait()
            except TimeoutError:
                raise UpstreamError("timeout sending message data") from None
        if not self.alive:
            raise UpstreamError(self._closed_reason or "lost connection")

    async def read_reply(self, timeout: float, what: str = "waiting for reply") -> Reply:
        deadline = time.monotonic() + timeout
        while True:
            try:
                reply = self._parser.next_reply()
            except PeerProtocolError:
                raise UpstreamError("malformed reply") from None
            if reply is not None:
                return reply
            if self._closed_reason is not None:
                raise UpstreamError(self._closed_reason)
            await self._wait(deadline, what)

    async def command(self, line: str, timeout: float) -> Reply:
        self.send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self.read_reply(timeout, f"waiting for reply to {line.split(' ', 1)[0]}")

    async def start_tls(self, engine: TlsEngine, timeout: float) -> None:
        """Run the handshake after the server's 220 to STARTTLS.

        Every way it can fail raises TlsHandshakeError: a TLS error as OpenSSL words it, a
        lost connection or a timeout as `lost_connection` / `handshake_timeout`. All are
        validation-failure for TLSRPT, as Postfix reports them (tls-handshake-failure): the
        server did offer and accept STARTTLS, so starttls-not-supported would misname it
        (and, not reported under `may`, hide a handshake broken on the path).
        """
        self.discarded_after_starttls = len(self._parser.take_buffer())
        self.engine = engine
        deadline = time.monotonic() + timeout
        engine.handshake()
        self._flush_tls()
        while not engine.handshake_done:
            if self._handshake_error is not None:
                raise self._handshake_error
            if self._closed_reason is not None:
                raise self._unfinished_handshake("lost_connection")
            try:
                await self._wait(deadline, "during TLS handshake")
            except UpstreamError:
                raise self._unfinished_handshake("handshake_timeout") from None
        if self._handshake_error is not None:
            raise self._handshake_error

    @staticmethod
    def _unfinished_handshake(reason: str) -> TlsHandshakeError:
        return TlsHandshakeError("validation-failure", reason)

    def _flush_tls(self) -> None:
        if self.engine is not None and self.transport is not None and not self.transport.is_closing():
            out = self.engine.outgoing()
            if out:
                self.transport.write(out)

    async def quit(self, timeout: float) -> None:
        """QUIT politely (best effort), then close. After a TLS handshake that did not
        complete there is no channel left to say it on: the connection is dropped."""
        if self.engine is not None and not self.engine.handshake_done:
            self.abort()
            return
        self._parked = False  # the 221 is asked for
        try:
            if self.alive:
                await self.command("QUIT", timeout)
        except UpstreamError:
            pass
        self.close()

    def close(self) -> None:
        if self.transport is None:
            return
        self._closed_reason = self._closed_reason or "closed"
        if self.engine is not None and self.engine.handshake_done and not self.transport.is_closing():
            self.engine.close()
            self._flush_tls()
        self.transport.close()

    def abort(self) -> None:
        """Drop the connection now, sending nothing more (no final dot, no QUIT)."""
        self._closed_reason = self._closed_reason or "aborted"
        if self.transport is not None:
            self.transport.abort()
