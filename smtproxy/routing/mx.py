"""MX, A and AAAA lookups for outbound mail (RFC 5321 section 5.1, RFC 7505 null MX).

Order of `MxResolver.exchangers()`: MX preference, lowest first; hosts of equal preference
in random order (RFC 5321 5.1: pick one at random to spread the load). Each host's
addresses come IPv4 first, then IPv6, each family in the order the DNS gave it: many
clusters have no working IPv6 egress, and the big receivers hold IPv6 senders to stricter
rules (reverse DNS, authentication), so an IPv6 first attempt would turn into connect
timeouts or refusals that IPv4 would not have met. A and AAAA are asked at the same time,
and so are the hosts of one MX set, so a lookup takes about two `timeout`s at most.

DNSSEC (for DANE), only with `[dns] dnssec = true`: queries carry the DO bit, and what the
resolver validated (its AD bit) is kept per host: `Exchanger.name_secure` (the MX record naming it was validated, or the
name came from the domain or a route rather than from an MX record) and
`Exchanger.addresses_secure` (every address answer was validated).

An MX host that is an alias (CNAME, forbidden by RFC 2181 10.3), has no address or cannot
be resolved is skipped, as Postfix does while any other host resolves.

Replies (codes per RFC 3463):
- domain does not exist (NXDOMAIN): 550 5.1.2 (X.1.2: the part right of the @ is invalid)
- no MX and no A/AAAA: 550 5.4.4 (X.4.4 names "only an SOA record" as its example)
- null MX: 556 5.1.10 (RFC 7505 section 3)
- timeout, SERVFAIL, no nameserver answering: 451 4.4.3 (directory server failure)
- MX hosts but none usable: 451 4.4.4, or 451 4.4.3 when a lookup failed temporarily
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import itertools
import random

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from smtproxy.config import ConfigError, DnsConfig, parse_address
from smtproxy.smtp import Reply

_PERMANENT_NAME_ERRORS = (dns.resolver.NXDOMAIN, dns.exception.SyntaxError, dns.name.NameTooLong,
                          dns.name.IDNAException)


def a_label(domain: str) -> str | None:
    """`domain` in its ASCII form (`bücher.example` -> `xn--bcher-kva.example`), lower-case,
    as tables, DNS and TLSRPT reports name it; None if it is no valid host name (empty
    labels, or the blanks and backslashes that DNS master files would read as escapes)."""
    labels = domain.split(".")
    if not all(labels) or any(char.isspace() or char == "\\" for char in domain):
        return None
    try:
        return dns.name.from_text(domain).to_text(omit_final_dot=True).lower()
    except dns.exception.DNSException:
        return None


class RoutingError(Exception):
    """No destination: `reply` goes to the legacy MTA, `reason` is a short phrase for logs."""

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class Exchanger:
    """One mail host with its addresses (IPv4 first). `preference` is None when the host
    does not come from an MX record (implicit MX, `[host]` route, IP literal).  The two
    flags say what DNSSEC validated (module docstring)."""

    hostname: str
    preference: int | None
    addresses: tuple[str, ...]
    name_secure: bool = False
    addresses_secure: bool = False


def make_resolver(config: DnsConfig, rng: random.Random | None = None) -> MxResolver:
    """The resolver for `[dns]`: its nameservers, else /etc/resolv.conf; `timeout` bounds
    each query, retries included."""
    if config.nameservers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [_nameserver(text) for text in config.nameservers]
    else:
        try:
            resolver = dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError("dns.nameservers", [], "IP addresses, optionally with a port",
                              problem="empty, and /etc/resolv.conf names no nameserver") from None
    resolver.lifetime = config.timeout
    if config.dnssec:
        resolver.use_edns(0, dns.flags.DO, 1232)  # ask for validation, read the AD bit
    return MxResolver(resolver, rng, dnssec=config.dnssec)


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    try:
        return dns.nameserver.Do53Nameserver(str(ipaddress.ip_address(text)), 53)
    except ValueError:
        address = parse_address(text, "dns.nameservers")
        return dns.nameserver.Do53Nameserver(address.host, address.port)


def _temporary(name: str, rdtype: str, error: Exception) -> RoutingError:
    if isinstance(error, dns.exception.Timeout):
        why = "timeout"
    elif isinstance(error, dns.resolver.NoNameservers):
        why = "server failure (SERVFAIL, REFUSED or unreachable)"
    else:
        why = type(error).__name__
    return RoutingError(
        Reply.of(451, "4.4.3", f"Host or domain name not found. Name service error for "
                               f"name={name} type={rdtype}: Host not found, try again"),
        f"{rdtype} lookup of {name}: {why}")


def _not_found(name: str, rdtype: str) -> RoutingError:
    return RoutingError(
        Reply.of(550, "5.1.2", f"Host or domain name not found. Name service error for "
                               f"name={name} type={rdtype}: Host not found"),
        f"{rdtype} lookup of {name}: NXDOMAIN")


def _severity(error: BaseException) -> int:
    """Which of several failed lookups speaks for the name: a bug, then a permanent answer."""
    if not isinstance(error, RoutingError):
        return 0
    return 1 if error.reply.is_permanent else 2


class MxResolver:
    """MX and address lookups on a dnspython resolver; `rng` orders equal-preference hosts;
    `dnssec`: believe the resolver's AD bit (else nothing counts as validated)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, rng: random.Random | None = None, *,
                 dnssec: bool = False) -> None:
        self.dns_resolver = resolver
        self.dnssec = dnssec
        self._rng = rng or random.Random()

    async def exchangers(self, domain: str) -> tuple[Exchanger, ...]:
        """The mail hosts for `domain` in the order to try; raises RoutingError."""
        answer = await self._lookup(domain, "MX")
        if answer is None:  # RFC 5321 5.1: no MX records, the domain itself is the mail host
            addresses, secure = await self._addresses(domain, alias_ok=True)
            return (Exchanger(domain, None, addresses, name_secure=True, addresses_secure=secure),)
        records = [record for record in answer if record.exchange != dns.name.root]
        if not records:
            raise RoutingError(Reply.of(556, "5.1.10", f"Domain {domain} does not accept mail (nullMX)"),
                               f"null MX for {domain}")
        hosts = self._ordered_hosts(records)
        results = await asyncio.gather(*(self._addresses(name, alias_ok=False) for name, _ in hosts),
                                       return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        for failure in failures:
            if not isinstance(failure, RoutingError):
                raise failure
        name_secure = self._validated(answer)
        usable = tuple(Exchanger(name, preference, result[0], name_secure=name_secure, addresses_secure=result[1])
                       for (name, preference), result in zip(hosts, results) if isinstance(result, tuple))
        if usable:
            return usable
        temporary = any(failure.reply.is_transient for failure in failures)
        raise RoutingError(Reply.of(451, "4.4.3" if temporary else "4.4.4",
                                    f"no MX host for {domain} has a valid address record"),
                           f"no usable MX host for {domain}: " + "; ".join(map(str, failures)))

    async def host(self, hostname: str) -> Exchanger:
        """`hostname` (a name or an IP address) with its addresses, no MX lookup."""
        try:
            return Exchanger(hostname, None, (str(ipaddress.ip_address(hostname)),))
        except ValueError:
            addresses, secure = await self._addresses(hostname, alias_ok=True)
            return Exchanger(hostname, None, addresses, name_secure=True, addresses_secure=secure)

    def _ordered_hosts(self, records: list[MX]) -> list[tuple[str, int]]:
        """(host, preference) by preference, equal preferences shuffled, each host once.

        Sorting by name before shuffling makes the order depend on `rng` alone, not on
        the order the DNS server happened to send."""
        seen: set[str] = set()
        ordered: list[tuple[str, int]] = []
        records = sorted(records, key=lambda record: (record.preference, record.exchange))
        for preference, group in itertools.groupby(records, key=lambda record: record.preference):
            names = [record.exchange.to_text(omit_final_dot=True).lower() for record in group]
            self._rng.shuffle(names)
            for name in names:
                if name not in seen:
                    seen.add(name)
                    ordered.append((name, preference))
        return ordered

    async def _addresses(self, name: str, *, alias_ok: bool) -> tuple[tuple[str, ...], bool]:
        """A then AAAA addresses of `name`, and whether every answer with addresses was
        validated; RoutingError when there are none."""
        results = await asyncio.gather(self._lookup(name, "A"), self._lookup(name, "AAAA"),
                                       return_exceptions=True)
        answers = [result for result in results if isinstance(result, dns.resolver.Answer)]
        if not alias_ok and any(answer.canonical_name != dns.name.from_text(name) for answer in answers):
            raise RoutingError(Reply.of(550, "5.4.4", f"MX host {name} is an alias (CNAME)"),
                               f"MX host {name} is an alias (CNAME)")
        addresses = tuple(record.address for answer in answers for record in answer)
        if addresses:
            return addresses, all(self._validated(answer) for answer in answers if answer.rrset)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise min(failures, key=_severity)
        raise RoutingError(
            Reply.of(550, "5.4.4", f"Host or domain name not found. Name service error for "
                                   f"name={name} type=A: Host found but no data record of requested type"),
            f"{name} has no A or AAAA record")

    def _validated(self, answer: dns.resolver.Answer) -> bool:
        """The resolver vouches for the answer (AD bit, RFC 4035 3.2.3)."""
        return self.dnssec and bool(answer.response.flags & dns.flags.AD)

    async def _lookup(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, or None when the name has no record of that type."""
        try:
            return await self.dns_resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except _PERMANENT_NAME_ERRORS:
            raise _not_found(name, rdtype) from None
        except (dns.exception.DNSException, OSError) as error:
            raise _temporary(name, rdtype, error) from None
