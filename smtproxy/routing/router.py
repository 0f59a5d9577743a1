"""Where one transaction's mail goes: the routes table first, else the domain's MX hosts.

A routes-table nexthop is the operator's choice, not the recipient's: a permanent DNS
answer about it (no such host, null MX) is a configuration problem, so it becomes
`451 4.3.5` and the legacy MTA keeps the mail, as Postfix does for its relayhost
(smtp_connect.c: "Don't bounce mail after a host lookup problem with a relayhost").
"""

from __future__ import annotations

import dataclasses

from smtproxy.routing.mx import Exchanger, MxResolver, RoutingError
from smtproxy.routing.routes import Route, RouteTable, address_literal
from smtproxy.smtp import Reply


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One address to connect to; `hostname` is the MX host name (the address itself for
    IP literals), `preference` None when not from an MX record; `name_secure` and
    `addresses_secure` as `Exchanger`'s (DNSSEC, for DANE)."""

    hostname: str
    address: str
    port: int
    preference: int | None
    name_secure: bool = False
    addresses_secure: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Destination:
    """`nexthop`: the route's nexthop as written, or the domain; the policy key.
    `targets`: in the order they must be tried.  `pinned`: the one address and port the
    legacy MTA itself chose (transparent mode); connections are cached per pinned address."""

    nexthop: str
    targets: tuple[Target, ...]
    pinned: tuple[str, int] | None = None


class Router:
    """Called once per transaction; holds no SMTP state."""

    def __init__(self, routes: RouteTable | None, resolver: MxResolver, default_port: int) -> None:
        self._routes = routes
        self._resolver = resolver
        self._default_port = default_port

    async def route(self, domain: str) -> Destination:
        """The destination for mail to `domain`; raises RoutingError."""
        domain = domain.lower()
        route = self._routes.lookup(domain) if self._routes is not None else None
        if route is None:
            return await self.by_mx(domain)
        port = self._default_port if route.port is None else route.port
        return Destination(route.nexthop, _targets(await self._by_route(route), port))

    async def by_mx(self, domain: str) -> Destination:
        """The destination by the domain's own MX (or address) records, routes aside."""
        return Destination(domain, _targets(await self._by_domain(domain), self._default_port))

    async def _by_domain(self, domain: str) -> tuple[Exchanger, ...]:
        if not domain.startswith("["):
            return await self._resolver.exchangers(domain)
        address = address_literal(domain)
        if address is None:
            raise RoutingError(Reply.of(550, "5.1.2", f"{domain}: invalid address literal"),
                               f"invalid address literal {domain}")
        return (await self._resolver.host(address),)

    async def _by_route(self, route: Route) -> tuple[Exchanger, ...]:
        try:
            if route.mx_lookup:
                return await self._resolver.exchangers(route.host)
            return (await self._resolver.host(route.host),)
        except RoutingError as error:
            if not error.reply.is_permanent:
                raise
            raise RoutingError(
                Reply.of(451, "4.3.5", f"route to {route.nexthop} ({route.source}): configuration problem: "
                                       f"{error.reason}"),
                f"route {route.source}: {error.reason}") from error


def _targets(exchangers: tuple[Exchanger, ...], port: int) -> tuple[Target, ...]:
    return tuple(Target(exchanger.hostname, address, port, exchanger.preference,
                        exchanger.name_secure, exchanger.addresses_secure)
                 for exchanger in exchangers for address in exchanger.addresses)
