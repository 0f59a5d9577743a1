"""Wiring: config -> TLS contexts, event bus, subscribers, listeners; signals; shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import ssl
from collections.abc import Callable

import structlog
import uvloop

from smtproxy.config import Config, ConfigError, certificate_problem, load_config
from smtproxy.events import Direction, EventBus
from smtproxy.inbound.server import InboundServer
from smtproxy.outbound.connector import ConnectSettings, Connector
from smtproxy.outbound.pool import ConnectionPool, PoolLimits
from smtproxy.outbound.server import OutboundServer
from smtproxy.policy.ciphers import cipher_problem
from smtproxy.policy.mta_sts import StsCache, StsPolicies, https_context
from smtproxy.policy.table import Policies, PolicyTableError
from smtproxy.routing.mx import make_resolver
from smtproxy.routing.routes import RouteTable, RouteTableError
from smtproxy.routing.router import Router
from smtproxy.tls.client_context import ClientTls
from smtproxy.tls.session_cache import SessionCache
from smtproxy.telemetry import logging as log_setup
from smtproxy.telemetry import tlsrpt
from smtproxy.telemetry.http import MetricsServer, Readiness
from smtproxy.telemetry.metrics import Metrics, watch_backend
from smtproxy.tls.certificates import ensure_certificate, validity_warnings
from smtproxy.tls.openssl_ext import TicketKeys
from smtproxy.tls.server_context import ServerTls
from smtproxy.tls.ticket_rotation import TicketKeyRotation, new_ticket_key
from smtproxy.workers import Supervisor, WorkerLink

log = structlog.get_logger("smtproxy")
GAUGE_REFRESH_SECONDS = 1.0


class StartupError(Exception):
    """A problem found while starting (certificate files, ports): one line for operators."""


def generate_missing_certificates(config: Config) -> None:
    """`self_signed_if_missing` chains whose files are both missing get a new certificate."""
    inbound = config.inbound
    for index, certificate in enumerate(inbound.certificates):
        try:
            generated = ensure_certificate(certificate, inbound.hostname)
        except OSError as exc:
            raise StartupError(f"inbound.certificates[{index}]: cannot write a self-signed certificate "
                               f"({certificate.cert_file}, {certificate.key_file}): {exc.strerror or exc}") from exc
        if generated:
            log.warning(
                "generated a self-signed certificate",
                key=f"inbound.certificates[{index}]",
                cert_file=str(certificate.cert_file),
                key_file=str(certificate.key_file),
            )


def build_server_tls(config: Config, ticket_keys: TicketKeys | None = None) -> ServerTls | None:
    inbound = config.inbound
    if not inbound.certificates:
        return None
    generate_missing_certificates(config)
    problem = certificate_problem(config)
    if problem is not None:
        raise StartupError(problem)
    for warning in validity_warnings(inbound.certificates):
        log.warning(warning)
    try:
        return ServerTls(inbound.tls, inbound.certificates, ticket_keys)
    except (OSError, ValueError) as exc:
        raise StartupError(f"inbound.certificates: cannot load TLS credentials: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class OutboundParts:
    """What `[outbound]` builds and a reload replaces whole."""

    router: Router
    policies: Policies
    connector: Connector
    pool: ConnectionPool


def build_outbound_parts(config: Config, bus: EventBus, sts: StsPolicies | None = None) -> OutboundParts:
    """Routes, policies, TLS client and caches; StartupError names what is wrong.  `sts`:
    the MTA-STS policies to keep (a reload that changed nothing they depend on)."""
    outbound = config.outbound
    try:
        routes = RouteTable.load(outbound.routes_file) if outbound.routes_file else None
        policies = Policies.from_config(outbound)
    except (RouteTableError, PolicyTableError) as exc:
        raise StartupError(str(exc)) from exc
    resolver = make_resolver(config.dns)
    router = Router(routes, resolver, outbound.port)
    problem = cipher_problem(policies, outbound.tls.ciphers)
    if problem is not None:
        raise StartupError(problem)
    try:
        client_tls = ClientTls(outbound.tls, outbound.ca_file)
    except (OSError, ValueError) as exc:
        raise StartupError(f"outbound.tls: cannot load TLS settings: {exc}") from exc
    settings = ConnectSettings(outbound.hostname, outbound.connect_timeout, outbound.handshake_timeout,
                               outbound.reply_timeout, outbound.mx_address_limit, outbound.plaintext_fallback_delay)
    if not config.mta_sts.enabled:
        sts = None
    elif sts is None:
        try:
            context = https_context(outbound.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"mta_sts: cannot load the CA file {outbound.ca_file}: {exc}") from exc
        sts = StsPolicies(resolver.dns_resolver, StsCache(config.mta_sts.cache_file), context,
                          config.mta_sts.fetch_timeout)
    connector = Connector(settings, client_tls, bus, SessionCache(outbound.tls.session_cache_timeout),
                          resolver.dns_resolver if config.dns.dnssec else None, sts)
    limits = PoolLimits(outbound.connection_cache_time_limit, outbound.connection_reuse_time_limit,
                        outbound.connection_reuse_count_limit, outbound.connection_cache_size,
                        outbound.connection_cache_destination_size, outbound.reply_timeout)
    return OutboundParts(router, policies, connector, ConnectionPool(connector, limits, bus))


def build_outbound(config: Config, bus: EventBus) -> OutboundServer | None:
    """The outbound listener with its routes, policies and TLS client; None when off."""
    if not config.outbound.listen:
        return None
    parts = build_outbound_parts(config, bus)
    return OutboundServer(config.outbound, parts.router, parts.policies, parts.connector, parts.pool, bus)


def reload(config: Config, bus: EventBus, inbound: InboundServer, outbound: OutboundServer | None,
           ticket_keys: TicketKeys | None = None) -> Config:
    """SIGHUP: re-read the config file, certificates and tables; the running proxy keeps the
    old ones when anything is wrong.  Returns the configuration now in force."""
    assert config.source is not None
    try:
        new = load_config(config.source)
        server_tls = build_server_tls(new, ticket_keys)
        parts = build_outbound_parts(new, bus, _kept_sts(config, new, outbound)) if outbound is not None else None
    except (ConfigError, StartupError) as exc:
        log.error(f"reload refused, the running configuration stays: {exc}", config=str(config.source))
        return config
    if server_tls is None and inbound.config.implicit_tls_listen:
        log.error("reload refused, the running configuration stays: inbound.certificates: none, but the running "
                  "implicit-TLS listener needs one (listeners change on restart only)", config=str(config.source))
        return config
    restart_only = [name for name in ("inbound.listen", "inbound.implicit_tls_listen", "outbound.listen",
                                      "outbound.mode", "metrics", "tlsrpt", "log")
                    if _section(new, name) != _section(config, name)]
    if restart_only:
        log.warning("changed settings that take effect on restart only", keys=restart_only)
    inbound.reload(new.inbound, server_tls)
    if outbound is not None and parts is not None:
        replaced = outbound.connector.sts
        outbound.reload(new.outbound, parts.router, parts.policies, parts.connector, parts.pool)
        if replaced is not None and replaced is not parts.connector.sts:
            replaced.cache.close()
    log.info("configuration reloaded", config=str(config.source))
    return new


def _kept_sts(old: Config, new: Config, outbound: OutboundServer | None) -> StsPolicies | None:
    """The running MTA-STS policies, when the reload leaves them as they are: a known
    policy must not lapse because the operator reloaded (cache_file "" keeps them in memory)."""
    unchanged = (old.mta_sts, old.dns, old.outbound.ca_file) == (new.mta_sts, new.dns, new.outbound.ca_file)
    return outbound.connector.sts if unchanged and new.mta_sts.enabled and outbound is not None else None


def _section(config: Config, dotted: str) -> object:
    value: object = config
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


def watch_gauges(metrics: Metrics, inbound: InboundServer, outbound: OutboundServer | None) -> None:
    metrics.watch_connections(Direction.INBOUND, lambda: len(inbound.connections))
    if outbound is not None:
        metrics.watch_connections(Direction.OUTBOUND, lambda: len(outbound.sessions))
        metrics.watch_caches(lambda: outbound.pool.idle_connections, lambda: len(outbound.connector.sessions))


async def start_metrics(config: Config, metrics: Metrics, inbound: InboundServer, outbound: OutboundServer | None,
                        listening: Callable[[], bool]) -> MetricsServer | None:
    """Gauges read the servers' live state; /readyz also wants the backend to accept a connection."""
    watch_gauges(metrics, inbound, outbound)
    if config.metrics.listen is None:
        return None
    backend = config.inbound.backend if config.inbound.listen or config.inbound.implicit_tls_listen else None
    readiness = Readiness(listening, backend, config.inbound.backend_connect_timeout)
    if backend is not None:
        watch_backend(metrics.registry, lambda: readiness.backend_up)
    server = MetricsServer(metrics.registry, readiness)
    try:
        await server.start(config.metrics.listen)
    except OSError as exc:
        raise StartupError(f"metrics.listen: cannot bind: {exc}") from exc
    return server


async def serve(config: Config, link: WorkerLink | None = None) -> None:
    """One process's proxy; `link`: this process is a worker of `smtproxy.workers`."""
    bus = EventBus()
    log_setup.subscribe(bus)
    metrics = Metrics()
    metrics.subscribe(bus)
    ticket_keys = link.ticket_keys if link is not None else TicketKeys(new_ticket_key())
    inbound = InboundServer(config.inbound, build_server_tls(config, ticket_keys), bus)
    outbound = build_outbound(config, bus)
    reporter = tlsrpt.subscribe(bus, config.tlsrpt, make_resolver(config.dns).dns_resolver) if outbound else None
    reuse_port = link is not None
    try:
        listeners = await inbound.start(reuse_port=reuse_port)
    except OSError as exc:
        raise StartupError(f"inbound.listen: cannot bind: {exc}") from exc
    if outbound is not None:
        try:
            listeners += await outbound.start(reuse_port=reuse_port)
        except OSError as exc:
            raise StartupError(f"outbound.listen: cannot bind: {exc}") from exc

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    current = config
    metrics_server: MetricsServer | None = None
    rotation: TicketKeyRotation | None = None  # a worker's keys come from its supervisor

    def on_hangup() -> None:
        nonlocal current
        current = reload(current, bus, inbound, outbound, ticket_keys)
        if rotation is not None:
            rotation.reschedule()
        if metrics_server is not None:
            metrics_server.readiness.follow(current.inbound.backend, current.inbound.backend_connect_timeout)

    def on_new_ticket_key(key: bytes) -> None:
        ticket_keys.rotate(key)
        if current.inbound.certificates and current.inbound.tls.session_tickets:
            log.info("session-ticket keys rotated")

    if config.source is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if link is None:
        metrics_server = await start_metrics(config, metrics, inbound, outbound, lambda: not stop.is_set())
        if metrics_server is not None:
            listeners.append(f"{config.metrics.listen} (metrics)")
        rotation = TicketKeyRotation(lambda: current.inbound.tls.session_timeout, on_new_ticket_key)
        log.info("smtproxy ready", listeners=listeners, backend=str(config.inbound.backend))
    else:
        watch_gauges(metrics, inbound, outbound)
        refresher = loop.create_task(_refresh_gauges(metrics))
        link.watch(on_new_ticket_key, stop.set)
        log.info("worker ready", listeners=listeners)
        link.ready()
    await stop.wait()

    if rotation is not None:
        rotation.stop()
    log.info("smtproxy stopping", active_sessions=len(inbound.connections),
             active_outbound_sessions=len(outbound.sessions) if outbound else 0)
    inbound.stop_listening()
    if outbound is not None:
        outbound.stop_listening()
        await asyncio.gather(inbound.drain(current.inbound.drain_timeout),
                             outbound.drain(current.outbound.drain_timeout))
    else:
        await inbound.drain(current.inbound.drain_timeout)
    if metrics_server is not None:
        metrics_server.close()
    if link is not None:
        refresher.cancel()
        metrics.refresh()
    if reporter is not None:
        await reporter.close(timeout=5.0)
    log.info("smtproxy stopped")


async def _refresh_gauges(metrics: Metrics) -> None:
    """Workers: copy live gauge values into the shared metric files once a second."""
    while True:
        metrics.refresh()
        await asyncio.sleep(GAUGE_REFRESH_SECONDS)


def run(config: Config, workers: int = 1, worker_fd: int | None = None) -> int:
    """The proxy in this process; with `workers` > 1 a supervisor of that many worker
    processes (smtproxy.workers); `worker_fd`: this process is one of those workers."""
    static_fields = {"worker_pid": os.getpid()} if worker_fd is not None else None
    log_setup.configure(config.log.format, config.log.level, static_fields=static_fields)
    try:
        if worker_fd is not None:
            uvloop.run(serve(config, WorkerLink(worker_fd)))
        elif workers > 1:
            generate_missing_certificates(config)  # once, before workers race to do it
            return uvloop.run(Supervisor(config, workers).run())
        else:
            uvloop.run(serve(config))
    except (StartupError, ConfigError) as exc:  # ConfigError: what only start-up finds (no resolver)
        log.error(str(exc))
        return 1
    finally:
        log_setup.flush()
    return 0
