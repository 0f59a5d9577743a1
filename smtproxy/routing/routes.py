"""The routes table: static nexthops per recipient domain, in Postfix transport(5) syntax.

    example.com      [192.0.2.1]:2525
    .example.com     smtp:mx.example.net
    internal.test    :
    *                [smarthost.example]

Mail for example.com goes to 192.0.2.1 port 2525 (no DNS); for its subdomains to the MX
hosts of mx.example.net; internal.test is routed by DNS as if there were no table (the
entry exempts it from `*`); everything else goes to smarthost.example's A/AAAA addresses.
As in Postfix, `#` starts a comment only at the beginning of a line.

Lookup order is Postfix's (transport(5) TABLE SEARCH ORDER; trivial-rewrite/transport.c,
with transport_maps absent from parent_domain_matches_subdomains, Postfix's default): the
domain itself, then `.parent` for each parent domain from the nearest up to the top-level
domain, then `*`. The first entry found wins, even one that asks for default routing.
Keys are case-folded. Per-address keys (user@domain) are refused: smtproxy routes a whole
transaction, so it routes domains.

The result is Postfix's `transport:nexthop` with `smtp` the only transport, or a bare
nexthop (the form DESIGN.md shows). A nexthop is Postfix's SMTP nexthop: `host` or
`host:port` (MX lookup of host), `[host]` or `[host]:port` (A/AAAA only), `[192.0.2.1]`,
`[2001:db8::1]` or `[ipv6:2001:db8::1]` (as Postfix's host_port() reads it). An empty
nexthop (`smtp:`, `:`) means default routing. Postfix 3.5's nexthop lists and symbolic
service names are refused rather than half supported.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from smtproxy import tables
from smtproxy.tables import TableError, is_domain, read_table

ENTRY_ALLOWED = (
    "domain, .domain or * followed by a nexthop: [192.0.2.1]:25, [host], host.example, host:port, "
    "smtp:nexthop, or smtp / smtp: / : for default routing"
)
_IPV6_PREFIX = "ipv6:"


class RouteTableError(TableError):
    """A problem in a routes file (see smtproxy.tables.TableError)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """Where the routes table sends a domain.

    `nexthop` is as written in the table (`[192.0.2.1]:2525`, `mx.example.net`): the
    policy table is looked up with exactly this string. `host` is the bare name or
    address, `port` None when the entry names none, `mx_lookup` False for `[...]` forms,
    `source` is `file:line` of the entry.
    """

    nexthop: str
    host: str
    port: int | None
    mx_lookup: bool
    source: str


def address_literal(text: str) -> str | None:
    """`[192.0.2.1]`, `[2001:db8::1]` or `[IPv6:2001:db8::1]` -> the bare address, else None."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    kinds: tuple[type[ipaddress.IPv4Address | ipaddress.IPv6Address], ...]
    if inner.lower().startswith(_IPV6_PREFIX):
        inner, kinds = inner[len(_IPV6_PREFIX):], (ipaddress.IPv6Address,)
    else:
        kinds = (ipaddress.IPv4Address, ipaddress.IPv6Address)
    for kind in kinds:
        try:
            return str(kind(inner))
        except ValueError:
            pass
    return None


def _parse_nexthop(nexthop: str, source: str) -> Route:
    """One SMTP nexthop -> Route; ValueError says what is wrong with it."""
    if nexthop.startswith("["):
        inner, bracket, rest = nexthop[1:].partition("]")
        if not bracket:
            raise ValueError('missing "]"')
        if rest and not rest.startswith(":"):
            raise ValueError('only ":port" may follow "]"')
        host = address_literal(f"[{inner}]")
        if host is None:
            if not is_domain(inner.lower()):
                raise ValueError("not an IP address or host name inside [...]")
            host = inner.lower()
        return Route(nexthop, host, _port(rest[1:]), False, source)
    host, colon, port_text = nexthop.rpartition(":")
    if not colon:
        host = port_text
    if ":" in host or address_literal(f"[{host}]") is not None:
        raise ValueError("an IP address needs brackets: [192.0.2.1], [2001:db8::1]")
    if not is_domain(host.lower()):
        raise ValueError("not a host name")
    return Route(nexthop, host.lower(), _port(port_text) if colon else None, True, source)


def _port(text: str) -> int | None:
    if text == "":
        return None  # Postfix reads "host:" as "host" on the default port
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise ValueError("the port must be a number from 1 to 65535")
    return int(text)


def _parse_result(result: str, source: str) -> Route | None:
    """`transport:nexthop` or a bare nexthop -> Route, or None for default routing."""
    if address_literal(f"[{result}]") is not None:
        raise ValueError("an IP address needs brackets: [192.0.2.1], [2001:db8::1]")
    transport, colon, nexthop = result.partition(":")
    if result.startswith("[") or "." in transport:
        nexthop = result  # a bare nexthop: [host]:port, host.example, host.example:port
    elif transport not in ("", "smtp"):
        # Postfix reads a value without ":" as a transport name: "smtp" alone is default routing
        raise ValueError(f"transport {transport} is not supported; only smtp is")
    return _parse_nexthop(nexthop, source) if nexthop else None


def _parse_key(key: str) -> str:
    key = key.lower()
    if "@" in key:
        raise ValueError("per-address entries are not supported; routes are per domain")
    if key != "*" and not is_domain(key.removeprefix(".")):
        raise ValueError("the key must be a domain, .domain or *")
    return key


class RouteTable:
    """Immutable once loaded; reloading builds a new table."""

    def __init__(self, entries: dict[str, Route | None]) -> None:
        self._entries = entries

    @classmethod
    def load(cls, path: str | Path) -> RouteTable:
        """Read a table file; any problem raises RouteTableError naming file, line and value."""
        return cls.parse(read_table(path, RouteTableError), str(path))

    @classmethod
    def parse(cls, text: str, path: str) -> RouteTable:
        """Table text -> RouteTable; `path` names the file in errors and route sources."""
        entries: dict[str, Route | None] = {}
        first_lines: dict[str, int] = {}
        for tokens in tables.entries(text, path, RouteTableError):
            number, key_text = tokens[0]
            line = " ".join(token for _, token in tokens)
            try:
                if len(tokens) == 1:
                    raise ValueError("a key without a nexthop")
                if len(tokens) > 2:
                    raise ValueError("one nexthop per entry (no nexthop lists, no comment after the value)")
                key = _parse_key(key_text)
                if key in entries:
                    raise ValueError(f"duplicate key {key} (first at line {first_lines[key]})")
                entries[key] = _parse_result(tokens[1][1], f"{path}:{number}")
            except ValueError as exc:
                raise RouteTableError(path, number, f'"{line}": {exc}; allowed: {ENTRY_ALLOWED}') from None
            first_lines[key] = number
        return cls(entries)

    def lookup(self, domain: str) -> Route | None:
        """The route for `domain`; None means route by DNS (no entry applies, or the entry
        that applies asks for default routing). An address literal matches only `*`."""
        name = domain.lower()
        if name in self._entries:
            return self._entries[name]
        dot = name.find(".")
        while dot >= 0:
            if name[dot:] in self._entries:
                return self._entries[name[dot:]]
            dot = name.find(".", dot + 1)
        return self._entries.get("*")
