"""Wiring: config -> TLS contexts, event bus, subscribers, listeners; signals; shutdown."""

from __future__ import annotations

import asyncio
import signal

import structlog
import uvloop

from smtproxy.config import Config
from smtproxy.events import EventBus
from smtproxy.inbound.server import InboundServer
from smtproxy.outbound.connector import ConnectSettings, Connector
from smtproxy.outbound.pool import ConnectionPool, PoolLimits
from smtproxy.outbound.server import OutboundServer
from smtproxy.policy.table import Policies, PolicyTableError
from smtproxy.routing.mx import make_resolver
from smtproxy.routing.routes import RouteTable, RouteTableError
from smtproxy.routing.router import Router
from smtproxy.tls.client_context import ClientTls
from smtproxy.tls.session_cache import SessionCache
from smtproxy.telemetry import logging as log_setup
from smtproxy.tls.certificates import ensure_certificate
from smtproxy.tls.server_context import ServerTls

log = structlog.get_logger("smtproxy")


class StartupError(Exception):
    """A problem found while starting (certificate files, ports): one line for operators."""


def build_server_tls(config: Config) -> ServerTls | None:
    inbound = config.inbound
    if not inbound.certificates:
        return None
    for index, certificate in enumerate(inbound.certificates):
        if ensure_certificate(certificate, inbound.hostname):
            log.warning(
                "generated a self-signed certificate",
                key=f"inbound.certificates[{index}]",
                cert_file=str(certificate.cert_file),
                key_file=str(certificate.key_file),
            )
    try:
        return ServerTls(inbound.tls, inbound.certificates)
    except (OSError, ValueError) as exc:
        raise StartupError(f"inbound.certificates: cannot load TLS credentials: {exc}") from exc


def build_outbound(config: Config, bus: EventBus) -> OutboundServer | None:
    """The outbound listener with its routes, policies and TLS client; None when off."""
    outbound = config.outbound
    if not outbound.listen:
        return None
    try:
        routes = RouteTable.load(outbound.routes_file) if outbound.routes_file else None
        policies = Policies.from_config(outbound)
    except (RouteTableError, PolicyTableError) as exc:
        raise StartupError(str(exc)) from exc
    router = Router(routes, make_resolver(config.dns), outbound.port)
    try:
        client_tls = ClientTls(outbound.tls, outbound.ca_file)
    except (OSError, ValueError) as exc:
        raise StartupError(f"outbound.tls: cannot load TLS settings: {exc}") from exc
    settings = ConnectSettings(outbound.hostname, outbound.connect_timeout, outbound.handshake_timeout,
                               outbound.reply_timeout)
    connector = Connector(settings, client_tls, bus, SessionCache(outbound.tls.session_cache_timeout))
    limits = PoolLimits(outbound.connection_cache_time_limit, outbound.connection_reuse_time_limit,
                        outbound.connection_reuse_count_limit, outbound.connection_cache_size,
                        outbound.connection_cache_destination_size, outbound.reply_timeout)
    return OutboundServer(outbound, router, policies, connector, ConnectionPool(connector, limits, bus), bus)


async def serve(config: Config) -> None:
    bus = EventBus()
    log_setup.subscribe(bus)
    inbound = InboundServer(config.inbound, build_server_tls(config), bus)
    outbound = build_outbound(config, bus)
    try:
        listeners = await inbound.start()
    except OSError as exc:
        raise StartupError(f"inbound.listen: cannot bind: {exc}") from exc
    if outbound is not None:
        try:
            listeners += await outbound.start()
        except OSError as exc:
            raise StartupError(f"outbound.listen: cannot bind: {exc}") from exc

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    log.info("smtproxy ready", listeners=listeners, backend=str(config.inbound.backend))
    await stop.wait()

    log.info("smtproxy stopping", active_sessions=len(inbound.connections),
             active_outbound_sessions=len(outbound.sessions) if outbound else 0)
    inbound.stop_listening()
    if outbound is not None:
        outbound.stop_listening()
        await asyncio.gather(inbound.drain(config.inbound.drain_timeout),
                             outbound.drain(config.outbound.drain_timeout))
    else:
        await inbound.drain(config.inbound.drain_timeout)
    log.info("smtproxy stopped")


def run(config: Config) -> int:
    log_setup.configure(config.log.format, config.log.level)
    try:
        uvloop.run(serve(config))
    except StartupError as exc:
        log.error(str(exc))
        return 1
    return 0
