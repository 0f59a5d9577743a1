"""The outbound listener: legacy MTA connections in, one `OutboundSession` each.

In `relay` mode the nexthop comes from the routes table or MX lookup; in `transparent`
mode (iptables REDIRECT of port 25) it is the address the MTA was really connecting to,
read with SO_ORIGINAL_DST.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time

import structlog

from smtproxy.config import OutboundConfig
from smtproxy.events import Direction, EventBus, PolicyApplied, SessionEnded
from smtproxy.linger import close_with_linger
from smtproxy.outbound.connector import Connector, DeliveryFailure, RemoteSession
from smtproxy.outbound.original_dst import original_destination
from smtproxy.outbound.pool import ConnectionPool
from smtproxy.outbound.session import OutboundSession, OutboundSettings
from smtproxy.policy.table import Policies
from smtproxy.routing.router import Destination, Router, RoutingError, Target
from smtproxy.smtp import Reply

log = structlog.get_logger("smtproxy.outbound")
_session_ids = itertools.count(1)


class OutboundServer:
    def __init__(self, config: OutboundConfig, router: Router, policies: Policies, connector: Connector,
                 pool: ConnectionPool, bus: EventBus) -> None:
        self.config = config
        self.router = router
        self.policies = policies
        self.connector = connector
        self.pool = pool
        self.bus = bus
        self.settings = self._settings(config)
        self.sessions: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.AbstractServer] = []
        self._retired_pools: set[asyncio.Task[None]] = set()

    def reload(self, config: OutboundConfig, router: Router, policies: Policies, connector: Connector,
               pool: ConnectionPool) -> None:
        """New transactions use the new tables, TLS settings and caches (listen addresses and
        mode change on restart only).  Connections and TLS sessions made under the old
        configuration are never reused (DESIGN.md invariant 5): the old pool is closed, and
        what running sessions hand back to it is closed as well."""
        retired = self.pool
        self.config = dataclasses.replace(config, listen=self.config.listen, mode=self.config.mode)
        self.router, self.policies, self.connector, self.pool = router, policies, connector, pool
        self.settings = self._settings(self.config)
        task = asyncio.get_running_loop().create_task(retired.close_all())
        self._retired_pools.add(task)
        task.add_done_callback(self._retired_pools.discard)

    @staticmethod
    def _settings(config: OutboundConfig) -> OutboundSettings:
        return OutboundSettings(
            hostname=config.hostname, bare_newline=config.bare_newline, idle_timeout=config.idle_timeout,
            reply_timeout=config.reply_timeout, data_done_timeout=config.data_done_timeout,
            max_message_size=config.max_message_size,
            max_errors=config.max_errors)

    async def start(self, *, reuse_port: bool = False) -> list[str]:
        bound = []
        for address in self.config.listen:
            server = await asyncio.start_server(self._serve, address.host, address.port, reuse_address=True,
                                                reuse_port=reuse_port or None, backlog=1024)
            self._servers.append(server)
            bound.append(f"{address} (outbound {self.config.mode})")
        return bound

    def stop_listening(self) -> None:
        for server in self._servers:
            server.close()

    async def drain(self, timeout: float) -> None:
        if self.sessions:
            _, pending = await asyncio.wait(set(self.sessions), timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        await self.pool.close_all()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername") or ("?", 0)
        session_log = log.bind(session=f"o{next(_session_ids)}", client=f"unknown[{peer[0]}]")
        if not self.config.client_allowed(peer[0]):
            session_log.warning("connection refused", reason="client not in outbound.client_networks")
            writer.write(Reply.of(554, "5.7.1", f"{self.config.hostname} Error: client host [{peer[0]}] "
                                                "is not allowed to relay").serialize())
            writer.close()
            return
        if len(self.sessions) >= self.config.max_connections:
            session_log.warning("connection refused", reason="too many connections")
            writer.write(Reply.of(421, "4.7.0", f"{self.config.hostname} Error: too many connections").serialize())
            writer.close()
            return
        original = None
        if self.config.mode == "transparent":
            original = self._original_destination(writer, session_log)
        self.sessions.add(task)
        started = time.monotonic()
        session_log.info(f"connect from unknown[{peer[0]}]", direction="outbound", original_destination=original)
        session = OutboundSession(self.settings, reader, writer,
                                  lambda domain, sender: self._connect(domain, sender, original, session_log),
                                  self.pool.release, self.pool.stale, self.bus, session_log)
        try:
            await session.run()
        except asyncio.CancelledError:
            writer.write(Reply.of(421, "4.3.2", f"{self.config.hostname} Service shutting down").serialize())
        except Exception:  # a bug: the MTA tries again later instead of losing its connection unanswered
            session_log.exception("internal error, session ended")
            writer.write(Reply.of(421, "4.3.0", f"{self.config.hostname} Error: internal error").serialize())
        finally:
            self.sessions.discard(task)
            linger = close_with_linger(writer.transport, asyncio.get_running_loop())
            duration = time.monotonic() - started
            session_log.info(f"disconnect from unknown[{peer[0]}]", direction="outbound", tls=False,
                             messages=session.messages, bytes=session.message_bytes, errors=session.errors,
                             duration=round(duration, 3))
            self.bus.publish(SessionEnded(Direction.OUTBOUND, "unknown", peer[0], False, session.messages,
                                          session.message_bytes, duration))
            with contextlib.suppress(OSError):  # an MTA that reads nothing more: the linger aborts
                await writer.wait_closed()
            linger.cancel()  # the timer would keep the closed session's objects for its 5 s

    @staticmethod
    def _original_destination(writer: asyncio.StreamWriter, session_log) -> tuple[str, int] | None:
        sock = writer.get_extra_info("socket")
        local = writer.get_extra_info("sockname")
        try:
            original = original_destination(sock)
        except OSError as exc:
            session_log.warning("no original destination (SO_ORIGINAL_DST)", error=str(exc))
            return None
        if local is not None and original == (local[0], local[1]):
            session_log.warning("connection was not redirected: original destination is the listener itself")
            return None
        return original

    async def _connect(self, domain: str, sender: str, original: tuple[str, int] | None,
                       session_log) -> RemoteSession:
        if self.config.mode == "transparent":
            destination = await self._transparent_destination(domain, original)
        else:
            try:
                destination = await self.router.route(domain)
            except RoutingError as exc:
                session_log.warning("routing failed", domain=domain, reason=exc.reason)
                raise DeliveryFailure(exc.reply) from None
        decision = self.policies.decide(destination.nexthop if self.config.mode == "relay" else domain)
        level = str(decision.policy.level)
        pool = self.pool  # its connector's ClientTls picks the sender's client certificate
        certificate = pool.connector.client_tls.certificate_for(sender)
        session_log.info("policy", domain=domain, nexthop=destination.nexthop, policy_level=level,
                         source=decision.source, client_certificate=str(certificate) if certificate else None)
        try:
            remote = await pool.acquire(domain, destination, decision, certificate)
        except DeliveryFailure:
            self.bus.publish(PolicyApplied(level, decision.source, "deferred"))
            raise
        source = decision.source
        if decision.source == "default_level" and remote.policy.dane is not None:
            source = "dane"
        elif decision.source == "default_level" and remote.policy.sts is not None and remote.policy.sts.mode == "enforce":
            source = "mta-sts"
        self.bus.publish(PolicyApplied(str(remote.policy.level), source, "tls" if remote.facts else "plaintext"))
        return remote

    async def _transparent_destination(self, domain: str, original: tuple[str, int] | None) -> Destination:
        """The original destination, named by the MX host that has its address if DNS knows
        one; then the domain's other MX hosts of the same or a higher preference, in order.
        The MTA's connection to a dead MX never fails here (the redirect accepts it), so the
        MTA cannot move on to the next MX as it would: smtproxy does, when the MTA was
        delivering to the domain's MX hosts (not when it used a relay of its own)."""
        if original is None:
            raise DeliveryFailure(Reply.of(451, "4.3.5", "transparent mode: the original destination is unknown"))
        address, port = original
        targets = [Target(address, address, port, None)]
        try:
            by_mx = await self.router.by_mx(domain)
        except RoutingError:
            by_mx = None
        chosen = next((t for t in by_mx.targets if t.address == address), None) if by_mx else None
        if chosen is not None:
            rank = chosen.preference or 0
            targets = [dataclasses.replace(chosen, port=port),
                       *(t for t in by_mx.targets if t.address != address and (t.preference or 0) >= rank)]
        return Destination(domain, tuple(targets), pinned=(address, port))
