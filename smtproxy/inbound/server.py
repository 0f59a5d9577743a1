"""The thin asyncio shell around `InboundSession`: sockets, TLS bytes, timers, limits.

One `ClientConnection` per client socket owns the matching backend connection.  It feeds
the session and executes its actions; it never interprets SMTP itself.  TLS runs over
memory BIOs (`tls.engine.TlsEngine`), so every byte on the wire passes through here and
plaintext that arrived before the handshake cannot leak into it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from typing import TYPE_CHECKING

import structlog

from smtproxy.events import (
    Direction,
    EventBus,
    HandshakeFacts,
    MessageRelayed,
    SessionEnded,
)
from smtproxy.inbound.session import (
    Action,
    CloseBackend,
    CloseClient,
    Discarded,
    InboundSession,
    InboundSettings,
    MessageFinished,
    SendBackend,
    SendClient,
    StartTls,
)
from smtproxy.linger import close_with_linger
from smtproxy.smtp import Reply
from smtproxy.tls.engine import TlsEngine, TlsHandshakeError
from smtproxy.tls.facts import build_facts
from smtproxy.tls.wording import received_clause

if TYPE_CHECKING:
    from smtproxy.config import InboundConfig
    from smtproxy.tls.server_context import ServerTls

log = structlog.get_logger("smtproxy.inbound")
_session_ids = itertools.count(1)


class InboundServer:
    """Listeners for one `[inbound]` section plus the connection limits they share."""

    def __init__(self, config: InboundConfig, server_tls: ServerTls | None, bus: EventBus) -> None:
        self.config = config
        self.server_tls = server_tls
        self.bus = bus
        self.connections: set[ClientConnection] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self._servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop  # set by start(); asyncio.get_running_loop() costs a getpid()
        self._all_closed = asyncio.Event()
        self._all_closed.set()

    def reload(self, config: InboundConfig, server_tls: ServerTls | None) -> None:
        """New sessions (and STARTTLS in running ones) use the new settings and certificates;
        listen addresses change on restart only."""
        self.config = dataclasses.replace(config, listen=self.config.listen,
                                          implicit_tls_listen=self.config.implicit_tls_listen)
        self.server_tls = server_tls

    async def start(self, *, reuse_port: bool = False) -> list[str]:
        loop = self.loop = asyncio.get_running_loop()
        bound = []
        for implicit, addresses in ((False, self.config.listen), (True, self.config.implicit_tls_listen)):
            for address in addresses:
                server = await loop.create_server(
                    lambda implicit=implicit: ClientConnection(self, implicit_tls=implicit),
                    address.host,
                    address.port,
                    reuse_address=True,
                    reuse_port=reuse_port or None,
                    backlog=1024,
                )
                self._servers.append(server)
                bound.append(f"{address}{' (implicit TLS)' if implicit else ''}")
        return bound

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    async def drain(self, timeout: float) -> None:
        """Let running sessions finish for up to `timeout`, then end the rest with 421."""
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout)
        except asyncio.TimeoutError:
            for connection in list(self.connections):
                connection.shutdown()

    def add(self, connection: ClientConnection, client_ip: str) -> None:
        self.connections.add(connection)
        self.per_client[client_ip] += 1
        self._all_closed.clear()

    def remove(self, connection: ClientConnection, client_ip: str) -> None:
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        self.per_client[client_ip] -= 1
        if self.per_client[client_ip] <= 0:
            del self.per_client[client_ip]
        if not self.connections:
            self._all_closed.set()

    def settings_for(self, client_ip: str) -> InboundSettings:
        cfg = self.config
        return InboundSettings(
            hostname=cfg.hostname,
            security_level=cfg.level_for(client_ip),
            tls_available=self.server_tls is not None,
            client_identity=cfg.client_identity,
            auth_only_after_tls=cfg.auth_only_after_tls,
            bare_newline=cfg.bare_newline,
            max_message_size=cfg.max_message_size,
            max_command_line=cfg.max_command_line,
            max_reply_line=cfg.max_reply_line,
            max_text_line=cfg.max_text_line,
            max_errors=cfg.max_errors,
        )

    def admission_refusal(self, client_ip: str) -> Reply | None:
        cfg = self.config
        if len(self.connections) >= cfg.max_connections:
            return Reply.of(421, "4.7.0", f"{cfg.hostname} Error: too many connections")
        if cfg.max_connections_per_client and self.per_client[client_ip] >= cfg.max_connections_per_client:
            return Reply.of(421, "4.7.0", f"{cfg.hostname} Error: too many connections from {client_ip}")
        return None


class _BackendProtocol(asyncio.Protocol):
    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Here, not after `await create_connection()`: the greeting may already be queued
        # behind this callback and must find the session waiting for it.
        self.connection.on_backend_connected(transport)

    def data_received(self, data: bytes) -> None:
        self.connection.on_backend_data(data)

    def eof_received(self) -> bool:
        self.connection.on_backend_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.on_backend_closed()

    def pause_writing(self) -> None:
        self.connection.backend_congested = True
        self.connection.update_reading()

    def resume_writing(self) -> None:
        self.connection.backend_congested = False
        self.connection.update_reading()


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: InboundServer, *, implicit_tls: bool) -> None:
        self.server = server
        self.implicit_tls = implicit_tls
        self.transport: asyncio.Transport | None = None
        self.backend: asyncio.Transport | None = None
        self.backend_congested = False
        self.client_congested = False  # the client does not read its replies fast enough
        self.session: InboundSession | None = None
        self.engine: TlsEngine | None = None
        self._server_tls: ServerTls | None = None  # the settings the handshake runs under
        self._handshake_started = 0.0
        self._started = time.monotonic()
        self._client_ip = ""
        self._client_port = 0
        self._reading_paused = False
        self._closed = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._last_activity = 0.0
        self._backend_timer: asyncio.TimerHandle | None = None
        self._backend_deadline = 0.0  # 0: not waiting for the backend
        self._deadline_for_message_end = False  # the deadline is backend_data_done_timeout's
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._backend_task: asyncio.Task[None] | None = None
        self.log = log

    # ----------------------------------------------------------------- client socket

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self._client_ip, self._client_port = peer[0], peer[1]
        self.log = log.bind(session=next(_session_ids), client=f"unknown[{self._client_ip}]")
        refusal = self.server.admission_refusal(self._client_ip)
        if refusal is not None:
            self.log.warning("connection refused", reason=refusal.text)
            if not self.implicit_tls:
                transport.write(refusal.serialize())
            self._closed = True
            transport.close()
            return
        self.server.add(self, self._client_ip)
        self.log.info(
            f"connect from unknown[{self._client_ip}]",
            port=self._client_port,
            listener=f"{local[0]}:{local[1]}",
            implicit_tls=self.implicit_tls,
        )
        self.session = InboundSession(
            self.server.settings_for(self._client_ip),
            (self._client_ip, self._client_port),
            (local[0], local[1]),
            implicit_tls=self.implicit_tls,
        )
        if self.implicit_tls:
            self._start_tls()
        self._backend_task = self.server.loop.create_task(self._connect_backend())
        self._arm_backend_timer()  # from now: connecting and greeting get backend_connect_timeout
        self._touch()
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        if self.session is None or self._closed or (self.engine is not None and self.engine.peer_closed):
            return  # after close_notify the client has nothing more to say: bytes are dropped
        self._touch()
        if self.engine is None:
            self._execute(self.session.client_data(data))
            return
        was_done = self.engine.handshake_done
        try:
            plaintext = self.engine.receive(data)
        except TlsHandshakeError as exc:
            self._flush_tls()
            self._handshake_failed(exc.failure_type, exc.reason)
            return
        if was_done or not self.engine.handshake_done:
            self._flush_tls()
        elif self.engine.ssl_object.version() != "TLSv1.3":
            self._flush_tls()  # TLS 1.2: the server's last flight, which the client waits for
            self._handshake_done()
        else:
            # TLS 1.3: what is left is the session ticket, which the client needs only at
            # the end; it leaves with the first reply (one write fewer per session).
            self._handshake_done()
        if plaintext and not self._closed:
            self._execute(self.session.client_data(plaintext))
        if self.engine is not None and self.engine.broken and not self._closed:
            self._execute(self.session.client_closed())
            self._close_client()
        elif self.engine is not None and self.engine.peer_closed and not self._closed:
            self._execute(self.session.client_input_ended())
            if self.session.closed:
                self._close_client()

    def eof_received(self) -> bool:
        """The client shut its side down: what it sent is still answered (a half-closed
        socket can still be written), then the session closes, with a linger as any close."""
        if self.session is None or self._closed:
            return False
        if self.engine is not None and not self.engine.handshake_done:
            self._handshake_failed("validation-failure", "lost_connection")  # as Postfix logs it
            return True
        self._execute(self.session.client_input_ended())
        if self.session.closed:
            self._close_client()
        return True

    def pause_writing(self) -> None:
        self.client_congested = True
        self.update_reading()

    def resume_writing(self) -> None:
        self.client_congested = False
        self.update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is None or self.transport is None:
            return
        if self.engine is not None and not self.engine.handshake_done and not self._closed:
            self._report_handshake_failure("validation-failure", "lost_connection")  # as Postfix logs it
        if self.engine is not None and self.engine.handshake_done and not self.engine.broken and not self._closed:
            # OpenSSL takes the session of a connection freed without a shutdown out of
            # its cache (TLS 1.0's rule, lifted by RFC 4346): a client that drops the
            # connection would never resume it again
            self.engine.close()
        if not self.session.closed:
            self._execute(self.session.client_closed())
        self._closed = True
        for timer in (self._idle_timer, self._backend_timer, self._handshake_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        if self._backend_task is not None and not self._backend_task.done():
            self._backend_task.cancel()
        if self.backend is not None:
            self.backend.close()
        self.server.remove(self, self._client_ip)
        duration = time.monotonic() - self._started
        tls = self.session.tls_active
        self.log.info(
            f"disconnect from unknown[{self._client_ip}]",
            direction="inbound",
            tls=tls,
            messages=self.session.messages,
            bytes=self.session.message_bytes,
            errors=self.session.errors,
            duration=round(duration, 3),
        )
        self.server.bus.publish(
            SessionEnded(
                Direction.INBOUND,
                "unknown",
                self._client_ip,
                tls,
                self.session.messages,
                self.session.message_bytes,
                duration,
            )
        )

    def shutdown(self) -> None:
        """Drain deadline passed: tell the client to come back later (not in the middle of
        a handshake: there is no channel to say it on), and close."""
        if self.session is not None and not self._closed:
            if self.engine is None or self.engine.handshake_done:
                hostname = self.server.config.hostname
                self._write_client(Reply.of(421, "4.3.2", f"{hostname} Service shutting down").serialize())
            self._execute(self.session.client_closed())
            self._close_client()

    # ----------------------------------------------------------------- backend socket

    async def _connect_backend(self) -> None:
        assert self.session is not None
        address = self.server.config.backend
        try:  # bounded by the backend timer, armed with backend_connect_timeout in connection_made
            await self.server.loop.create_connection(lambda: _BackendProtocol(self), address.host, address.port)
        except OSError as exc:
            self.log.warning("backend unreachable", backend=str(address), error=str(exc) or type(exc).__name__)
            self._execute(self.session.backend_failed())

    def on_backend_connected(self, transport: asyncio.Transport) -> None:
        if self._closed or self.session is None:
            transport.close()
            return
        self.backend = transport
        self._execute(self.session.backend_connected())

    def on_backend_data(self, data: bytes) -> None:
        if self.session is not None and not self._closed:
            self._backend_deadline = 0.0
            self._execute(self.session.backend_data(data))

    def on_backend_closed(self) -> None:
        if self.session is not None and not self._closed:
            self._execute(self.session.backend_closed())

    # ----------------------------------------------------------------- actions

    def _execute(self, actions: list[Action]) -> None:
        """Run the session's actions.  What goes to each side leaves in one write per batch
        (one TLS record for the client), flushed before anything that must follow it on the
        wire; bytes for the backend still unsent when it is to be closed are dropped."""
        assert self.session is not None
        replies: list[bytes] = []
        commands: list[bytes] = []
        for action in actions:
            if isinstance(action, SendClient):
                replies.append(action.data)
                continue
            if isinstance(action, SendBackend):
                commands.append(action.data)
                continue
            if replies and isinstance(action, (StartTls, CloseClient)):
                # before a close, the last reply and close_notify leave in one write
                self._write_client(b"".join(replies), flush=isinstance(action, StartTls))
                replies.clear()
            if isinstance(action, StartTls):
                self._start_tls()
            elif isinstance(action, CloseBackend):
                commands.clear()
                if self.backend is not None:
                    self.backend.abort()
            elif isinstance(action, CloseClient):
                self._close_client()
            elif isinstance(action, MessageFinished):
                self.log.info("message relayed", result=action.result, size=action.size)
                self.server.bus.publish(
                    MessageRelayed(Direction.INBOUND, action.result, action.size, action.duration)
                )
            elif isinstance(action, Discarded):
                self.log.warning("discarded plaintext pipelined after STARTTLS", bytes=action.size)
        if replies:
            self._write_client(b"".join(replies))
        if commands and self.backend is not None and not self.backend.is_closing():
            self.backend.write(b"".join(commands))
        self._arm_backend_timer()
        self.update_reading()

    def _write_client(self, data: bytes, *, flush: bool = True) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self.engine is not None and self.engine.handshake_done:
            self.engine.send(data)
            if flush:
                self._flush_tls()
        else:
            self.transport.write(data)

    def _flush_tls(self) -> None:
        if self.engine is not None and self.transport is not None and not self.transport.is_closing():
            out = self.engine.outgoing()
            if out:
                self.transport.write(out)

    def _close_client(self) -> None:
        if self._closed or self.transport is None:
            return
        self._closed = True
        if self.engine is not None and self.engine.handshake_done:
            self.engine.close()
            self._flush_tls()
        self._linger_timer = close_with_linger(self.transport, self.server.loop)

    def update_reading(self) -> None:
        if self.transport is None or self.session is None or self._closed:
            return
        pause = (self.session.input_blocked or self.backend_congested or self.client_congested
                 or (self.engine is not None and self.engine.peer_closed))
        if pause and not self._reading_paused:
            self.transport.pause_reading()
            self._reading_paused = True
        elif not pause and self._reading_paused:
            self.transport.resume_reading()
            self._reading_paused = False

    # ----------------------------------------------------------------- TLS

    def _start_tls(self) -> None:
        server_tls = self._server_tls = self.server.server_tls  # a reload mid-handshake does not change it
        assert server_tls is not None
        self.engine = server_tls.new_engine()
        self._handshake_started = time.monotonic()
        self._handshake_timer = self.server.loop.call_later(
            self.server.config.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_done(self) -> None:
        """Judged by the settings the handshake ran under: after a reload in between, the
        old verification against the new client-certificate settings would be neither."""
        assert self.engine is not None and self.session is not None
        server_tls = self._server_tls
        assert server_tls is not None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        trust, certificate, refusal = server_tls.evaluate_client(self.engine)
        facts = build_facts(
            self.engine,
            direction=Direction.INBOUND,
            peer_name="unknown",
            peer_addr=self._client_ip,
            peer_port=self._client_port,
            duration=time.monotonic() - self._handshake_started,
            peer_trust=trust,
            peer_certificate=certificate,
            local_key_detail=server_tls.local_key_detail(self.engine),
        )
        self.server.bus.publish(facts)
        clause = received_clause(facts, client_cert_requested=server_tls.client_certificate_requested)
        self._server_tls = None  # not to keep a replaced ServerTls (its contexts, its cache) alive
        if refusal is not None:
            self.log.warning("client certificate refused", reason=refusal)
        self._execute(self.session.tls_established((clause,), refusal))

    def _handshake_failed(self, failure_type: str, reason: str) -> None:
        self._report_handshake_failure(failure_type, reason)
        assert self.session is not None
        self._execute(self.session.client_closed())
        self._close_client()  # the handshake is not done: no close_notify, only the alert already sent

    def _report_handshake_failure(self, failure_type: str, reason: str) -> None:
        self.log.warning(f"SSL_accept error from unknown[{self._client_ip}]: {reason}")
        self.server.bus.publish(
            HandshakeFacts(
                direction=Direction.INBOUND,
                peer_name="unknown",
                peer_addr=self._client_ip,
                peer_port=self._client_port,
                duration=time.monotonic() - self._handshake_started,
                failure_type=failure_type,
                failure_reason=reason,
            )
        )

    def _handshake_timed_out(self) -> None:
        if self.engine is not None and not self.engine.handshake_done and not self._closed:
            self._handshake_failed("validation-failure", "handshake_timeout")

    # ----------------------------------------------------------------- timers

    def _touch(self) -> None:
        """Note client activity.  One timer per connection, re-armed only when it fires
        early, instead of a cancel and a new timer for every read."""
        self._last_activity = time.monotonic()
        if self._idle_timer is None:
            self._idle_timer = self.server.loop.call_at(
                self._last_activity + self.server.config.idle_timeout, self._idle_timed_out
            )

    def _idle_timed_out(self) -> None:
        self._idle_timer = None
        if self.session is None or self._closed:
            return
        deadline = self._last_activity + self.server.config.idle_timeout
        if time.monotonic() < deadline:
            self._idle_timer = self.server.loop.call_at(deadline, self._idle_timed_out)
            return
        if self.session.awaiting_backend:
            self._touch()  # the client waits for the backend; the backend timer covers that
            return
        self.log.info(f"timeout after idle from unknown[{self._client_ip}]")
        self._execute(self.session.timed_out())

    def _arm_backend_timer(self) -> None:
        """Start the backend's answer deadline when the session begins waiting for it.  Like
        the idle timer, one timer per connection: it re-arms itself when it fires early."""
        if self.session is None:
            return
        if not self.session.awaiting_backend or self.session.closed:
            self._backend_deadline = 0.0
            return
        # until the client is greeted backend_connect_timeout (the connect and the greeting
        # together, then each identification reply), then backend_timeout for every reply
        # but a message's final one, and those due with it; a message end that arrives
        # while the wait is on (BDAT LAST in a later read) lengthens it
        message_end = self.session.backend_greeted and self.session.awaiting_message_end
        if self._backend_deadline and (self._deadline_for_message_end or not message_end):
            return
        config = self.server.config
        if not self.session.backend_greeted:
            limit = config.backend_connect_timeout
        elif message_end:
            limit = config.backend_data_done_timeout
        else:
            limit = config.backend_timeout
        self._deadline_for_message_end = message_end
        self._backend_deadline = time.monotonic() + limit
        timer = self._backend_timer
        if timer is None or timer.when() > self._backend_deadline:
            if timer is not None:
                timer.cancel()
            self._backend_timer = self.server.loop.call_at(self._backend_deadline, self._backend_timed_out)

    def _backend_timed_out(self) -> None:
        self._backend_timer = None
        if not self._backend_deadline or self.session is None or self._closed:
            return
        if time.monotonic() < self._backend_deadline:
            self._backend_timer = self.server.loop.call_at(self._backend_deadline, self._backend_timed_out)
            return
        backend = str(self.server.config.backend)
        if self.session.backend_greeted:
            self.log.warning("backend timeout", backend=backend)
        elif self.backend is None:
            self.log.warning("backend unreachable", backend=backend, error="connection timed out")
        else:
            self.log.warning("backend did not greet in time", backend=backend)
        if self._backend_task is not None and not self._backend_task.done():
            self._backend_task.cancel()
        self._execute(self.session.backend_timed_out())
