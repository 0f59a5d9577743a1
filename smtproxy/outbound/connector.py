"""Getting a connection to a destination that satisfies its TLS policy.

Postfix's smtp client order: try each MX address in turn; greet; EHLO; STARTTLS when the
level wants TLS and the server offers it; authenticate the server per level; EHLO again.
A policy failure moves on to the next address; only `may` (and `dane` without usable TLSA
records) falls back to plaintext (DESIGN.md invariant 4), after a failed handshake only as
`PlaintextFallback` allows.  Every handshake, and every failure to get one that the level
cared about, is published as one `HandshakeFacts`.

DANE (DESIGN.md: table, then DANE, then MTA-STS, then the default level), only with `[dns] dnssec = true`
(Postfix's smtp_dns_support_level = dnssec): each MX host's TLSA records are looked up when
its level is `dane` or `dane-only`, and when no table entry names the destination and the
default level is not `none` — then usable records outrank the default level.  Per
host (policy/dane.py): usable records make TLS mandatory and authenticate the server;
validated but unusable ones make TLS mandatory (Postfix: `encrypt`); a failed lookup
skips the host; none leave the level as it is (`dane` acting as `may`), except that
`dane-only` skips the host.  Lookups need validated address records (RFC 7672 2.2.2).

MTA-STS (policy/mta_sts.py) under the same conditions as DANE's default-level lookups, for
the recipient domain's own MX hosts: under `enforce` a host the policy does not list is
skipped whatever its TLSA records; a listed one without usable TLSA records gets level
`verify` with match=hostname and TLS 1.2 or later (a stricter level stays); under
`testing` the mail goes as it would, and TLSRPT hears what `enforce` would have refused.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import time

import dns.asyncresolver
import structlog

from smtproxy.events import Direction, EventBus, HandshakeFacts
from smtproxy.outbound.fallback import PlaintextFallback
from smtproxy.outbound.upstream import UpstreamConnection, UpstreamError
from smtproxy.policy.dane import DaneAuthority, TlsaLookup, TlsaStatus, lookup_tlsa, tlsa_name
from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.policy.mta_sts import StsError, StsFailure, StsPolicies, StsPolicy
from smtproxy.routing.router import Destination, Target
from smtproxy.routing.routes import address_literal
from smtproxy.smtp import EhloReply, Reply
from smtproxy.tls import openssl_ext
from smtproxy.tls.client_context import ClientCertificate, ClientTls
from smtproxy.tls.engine import TlsEngine, TlsHandshakeError
from smtproxy.tls.facts import build_facts
from smtproxy.tls.session_cache import SessionCache
from smtproxy.tls.verify import evaluate_server

log = structlog.get_logger("smtproxy.outbound")


class DeliveryFailure(Exception):
    """No acceptable connection: `reply` goes to the legacy MTA (always 4xx here)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectSettings:
    hostname: str  # our EHLO name
    connect_timeout: float
    handshake_timeout: float
    reply_timeout: float
    mx_address_limit: int = 5  # addresses tried per transaction, 0: all (Postfix smtp_mx_address_limit)
    plaintext_fallback_delay: float = 300.0  # see PlaintextFallback


@dataclasses.dataclass
class RemoteSession:
    """An open, greeted (and, per policy, TLS-protected) connection to one MX."""

    connection: UpstreamConnection
    target: Target
    nexthop: str
    policy: Policy
    ehlo: EhloReply
    facts: HandshakeFacts | None
    reuse_facts: HandshakeFacts | None = None  # `facts` as logged when the connection is reused
    transactions: int = 0
    reused: bool = False
    opened: float = dataclasses.field(default_factory=time.monotonic)
    cache_key: tuple | None = None  # set by the connection pool while the session is out
    reset_sent: bool = False  # RSET went out pipelined after the final dot; its reply is unread
    client_certificate: ClientCertificate | None = None  # offered at STARTTLS; part of every cache key

    @property
    def peer(self) -> str:
        return f"{self.target.hostname}[{self.target.address}]:{self.target.port}"


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    """Why one address was not used; `policy` marks a TLS-policy failure (4.7.5)."""

    text: str
    policy: bool = False


class _TryNext(Exception):
    def __init__(self, failure: _Failure) -> None:
        super().__init__(failure.text)
        self.failure = failure


class _RetryInPlaintext(Exception):
    """`may`: the TLS handshake failed; the same server may be retried without TLS."""

    def __init__(self, text: str, server: tuple) -> None:
        super().__init__(text)
        self.server = server  # the TLS session key: server and handshake settings


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def nexthop_name(nexthop: str) -> str:
    """The name a certificate is checked against: `[mx.example.net]:25` -> `mx.example.net`,
    `example.com:2525` -> `example.com`, `[IPv6:2001:db8::1]` -> `2001:db8::1` (Postfix:
    the port and any enclosing brackets are part of the policy lookup key, not of the name
    verified)."""
    if nexthop.startswith("["):
        bracketed = nexthop[: nexthop.index("]") + 1]
        return address_literal(bracketed) or bracketed[1:-1]
    return nexthop.partition(":")[0]


_DANE_LEVELS = (Level.DANE, Level.DANE_ONLY)


@dataclasses.dataclass(frozen=True, slots=True)
class _HostContext:
    """What one delivery attempt knows about all its hosts: TLSA lookups made so far, and
    the domain's MTA-STS policy (None: none applies) or why the one it announces could not
    be had."""

    lookups: dict[tuple[str, int], TlsaLookup]
    sts: StsPolicy | None
    sts_failure: StsFailure | None = None


class Connector:
    """`resolver`: for TLSA lookups (the routing resolver, DO bit set); None: DNSSEC is off,
    so no TLSA lookups (`dane` acts as `may`, `dane-only` defers).  `sts`: MTA-STS
    policies; None: MTA-STS is off."""

    def __init__(self, settings: ConnectSettings, client_tls: ClientTls, bus: EventBus,
                 sessions: SessionCache, resolver: dns.asyncresolver.Resolver | None = None,
                 sts: StsPolicies | None = None) -> None:
        self.settings = settings
        self.client_tls = client_tls
        self.bus = bus
        self.sessions = sessions
        self.resolver = resolver
        self.sts = sts
        self.fallback = PlaintextFallback(settings.plaintext_fallback_delay)

    def remember_session(self, remote: RemoteSession) -> None:
        """Keep the TLS session of a connection whose handshake met its policy (called
        after a transaction, when TLS 1.3 tickets have arrived)."""
        engine = remote.connection.engine
        if remote.transactions > 1:
            return  # kept after the first transaction already
        if engine is not None and engine.handshake_done and remote.facts is not None and remote.facts.ok:
            server_name = self._server_name(remote.policy, remote.target, remote.nexthop)
            self.sessions.put(_session_key(remote.target, server_name, remote.policy, remote.client_certificate),
                              openssl_ext.session_of(engine.ssl_object))

    async def connect(self, domain: str, destination: Destination, decision: PolicyDecision,
                      certificate: ClientCertificate | None = None) -> RemoteSession:
        """`certificate`: the client certificate for this mail's sender (`ClientTls.certificate_for`)."""
        failures: list[_Failure] = []
        limit = self.settings.mx_address_limit
        lookups: dict[tuple[str, int], TlsaLookup] = {}
        sts = await self._sts_policy(domain, destination, decision)
        context = _HostContext(lookups, sts if isinstance(sts, StsPolicy) else None,
                               sts if isinstance(sts, StsFailure) else None)
        for target in destination.targets[:limit] if limit else destination.targets:
            try:
                return await self._try_target(domain, destination.nexthop, target, decision, certificate, context)
            except _TryNext as exc:
                failures.append(exc.failure)
            log.info("delivery attempt failed", domain=domain, peer=f"{target.hostname}[{target.address}]",
                     reason=failures[-1].text)
        if not failures:
            raise DeliveryFailure(Reply.of(451, "4.4.4", f"{domain}: no mail server address found"))
        policy_failures = [failure for failure in failures if failure.policy]
        if policy_failures:
            raise DeliveryFailure(Reply.of(451, "4.7.5", policy_failures[-1].text))
        raise DeliveryFailure(Reply.of(451, "4.4.1", failures[-1].text))

    async def _sts_policy(self, domain: str, destination: Destination,
                          decision: PolicyDecision) -> StsPolicy | StsFailure | None:
        """The MTA-STS policy of the recipient domain, where it can apply: no table entry
        (DESIGN.md: the table, then DANE, then MTA-STS), a default level other than
        `none`, and the domain's own MX hosts as the destination (no route elsewhere).
        StsFailure: the domain announces a policy that could not be had, so the mail goes
        as if there were none (RFC 8461 5.1), and TLSRPT hears why."""
        if (self.sts is None or decision.source != "default_level" or decision.policy.level is Level.NONE
                or destination.nexthop != domain):
            return None
        try:
            policy = await self.sts.policy_for(domain)
        except StsError as error:  # logged by StsPolicies
            return StsFailure(domain, error.result_type, error.reason)
        if policy is None or policy.mode == "none":
            return None
        log.info("MTA-STS: policy applies", domain=domain, policy_id=policy.policy_id, mode=policy.mode,
                 mx=list(policy.mx))
        return policy

    async def _try_target(self, domain: str, nexthop: str, target: Target, decision: PolicyDecision,
                          certificate: ClientCertificate | None, context: _HostContext) -> RemoteSession:
        policy = await self._host_policy(nexthop, target, decision, context)
        try:
            return await self._attempt(domain, nexthop, target, policy, certificate, use_tls=True)
        except _RetryInPlaintext as failed:
            wait = self.fallback.handshake_failed(failed.server)
            if wait:
                raise _TryNext(_Failure(f"{failed}; not retried without TLS for another {math.ceil(wait)} s",
                                        policy=True)) from None
            return await self._attempt(domain, nexthop, target, policy, certificate, use_tls=False)

    async def _host_policy(self, nexthop: str, target: Target, decision: PolicyDecision,
                           context: _HostContext) -> Policy:
        """The policy for this one host: DANE's if its TLSA records say anything, else the
        domain's MTA-STS policy, else the decision's (module docstring)."""
        policy = decision.policy
        sts = context.sts
        if sts is not None and sts.mode == "enforce" and not sts.allows(target.hostname):
            # first: DANE records of a host the policy does not list must not let it in
            self._publish_failure(nexthop, target, None, None, dataclasses.replace(policy, sts=sts),
                                  "validation-failure", "mx_not_in_policy")
            raise _TryNext(_Failure(f"MX host {target.hostname} is not in the MTA-STS policy of {sts.domain} "
                                    f"(mx: {', '.join(sts.mx)})", policy=True))
        by_default = decision.source == "default_level" and policy.level is not Level.NONE
        if policy.level in _DANE_LEVELS or (by_default and self.resolver is not None):
            by_dane = await self._dane_policy(nexthop, target, policy, context.lookups)
            if by_dane is not None and by_dane.dane is not None:
                return by_dane
            policy = by_dane or policy  # unusable TLSA records (encrypt): MTA-STS may ask for more
        if sts is not None:
            return self._sts_host_policy(policy, sts)
        if context.sts_failure is not None:
            return dataclasses.replace(policy, sts_failure=context.sts_failure)
        return policy

    def _sts_host_policy(self, policy: Policy, sts: StsPolicy) -> Policy:
        """RFC 8461 4 for a listed host: `enforce` wants TLS 1.2 or later and a trusted
        certificate for the host name (level verify, match=hostname; a stricter level
        stays); `testing` only reports what enforce would have refused."""
        if sts.mode == "testing":
            return dataclasses.replace(policy, sts=sts)
        minimum = max(policy.min_protocol or self.client_tls.config.min_protocol, "TLSv1.2")  # the names sort
        if policy.level in (Level.FINGERPRINT, Level.VERIFY, Level.SECURE):
            return dataclasses.replace(policy, min_protocol=minimum, sts=sts)
        return dataclasses.replace(policy, level=Level.VERIFY, match=("hostname",), min_protocol=minimum, sts=sts)

    async def _dane_policy(self, nexthop: str, target: Target, policy: Policy,
                           lookups: dict[tuple[str, int], TlsaLookup]) -> Policy | None:
        """The policy once this host's TLSA records are known; None: they change nothing."""
        dane_level = policy.level in _DANE_LEVELS
        where = f"{target.hostname}[{target.address}]:{target.port}"
        if self.resolver is None:
            lookup = TlsaLookup(TlsaStatus.NONE, tlsa_name(target.hostname, target.port),
                                reason="DNSSEC is off ([dns] dnssec = false)")
        elif target.addresses_secure:
            key = (target.hostname.lower(), target.port)
            if key not in lookups:
                lookups[key] = await lookup_tlsa(self.resolver, target.hostname, target.port)
            lookup = lookups[key]
        else:
            lookup = TlsaLookup(TlsaStatus.NONE, tlsa_name(target.hostname, target.port),
                                reason="address records not DNSSEC-validated")
        if lookup.status is TlsaStatus.USABLE:
            authority = DaneAuthority(lookup.records, target.hostname, target.name_secure)
            log.info("DANE: TLSA records apply", peer=where, tlsa=list(authority.policy_strings),
                     mx_secure=target.name_secure)
            return dataclasses.replace(policy, dane=authority)
        if lookup.status is TlsaStatus.FAILED:
            self._publish_failure(nexthop, target, None, None, policy, "dnssec-invalid", "tlsa_lookup_failed")
            raise _TryNext(_Failure(f"TLSA lookup error for {lookup.qname}: {lookup.reason}", policy=True))
        if policy.level is Level.DANE_ONLY:
            self._publish_failure(nexthop, target, None, None, policy, "dane-required", "no_usable_TLSA_records")
            raise _TryNext(_Failure(f"dane-only: no usable TLSA records for {where}: {lookup.reason}",
                                    policy=True))
        if lookup.status is TlsaStatus.UNUSABLE and not policy.tls_required:
            log.info("DANE: all TLSA records unusable; TLS is mandatory without authentication (level encrypt)",
                     peer=where, qname=lookup.qname)
            return dataclasses.replace(policy, level=Level.ENCRYPT)
        if dane_level:
            log.info("DANE: no usable TLSA records; level dane acts as may", peer=where, reason=lookup.reason)
        return None

    async def _attempt(self, domain: str, nexthop: str, target: Target, policy: Policy,
                       certificate: ClientCertificate | None, *, use_tls: bool) -> RemoteSession:
        settings = self.settings
        where = f"{target.hostname}[{target.address}]:{target.port}"
        try:
            connection = await UpstreamConnection.open(target.address, target.port,
                                                       timeout=settings.connect_timeout)
        except UpstreamError as exc:
            raise _TryNext(_Failure(f"connect to {where}: {exc.reason}")) from None
        try:
            greeting = await connection.read_reply(settings.reply_timeout, "waiting for greeting")
            if greeting.code != 220:
                raise _TryNext(_Failure(f"host {where} refused to talk to me: {greeting.code} {greeting.text}"))
            ehlo = await self._ehlo(connection, where, policy)
            helo = _reply_text(ehlo.to_reply())
            facts = None
            if use_tls and policy.tls_wanted:
                if ehlo.has("STARTTLS"):
                    facts = await self._start_tls(connection, domain, nexthop, target, policy, helo,
                                                  certificate)
                    if facts is not None:
                        ehlo = await self._ehlo(connection, where, policy)
                elif policy.tls_required or policy.sts is not None:
                    self._publish_failure(nexthop, target, connection, helo, policy,
                                          "starttls-not-supported", "starttls_not_offered")
                    if policy.tls_required:
                        raise _TryNext(_Failure(f"TLS is required, but was not offered by host {where}",
                                                policy=True))
            return RemoteSession(connection, target, nexthop, policy, ehlo, facts, client_certificate=certificate)
        except UpstreamError as exc:
            connection.abort()
            raise _TryNext(_Failure(f"conversation with {where}: {exc.reason}")) from None
        except (_TryNext, _RetryInPlaintext):
            await connection.quit(min(settings.reply_timeout, 5.0))
            raise

    async def _ehlo(self, connection: UpstreamConnection, where: str, policy: Policy) -> EhloReply:
        reply = await connection.command(f"EHLO {self.settings.hostname}", self.settings.reply_timeout)
        if reply.code == 250:
            return EhloReply.parse(reply)
        if policy.tls_required:
            raise _TryNext(_Failure(f"host {where} refused EHLO: {reply.code} {reply.text}"))
        helo = await connection.command(f"HELO {self.settings.hostname}", self.settings.reply_timeout)
        if helo.code != 250:
            raise _TryNext(_Failure(f"host {where} refused HELO: {helo.code} {helo.text}"))
        return EhloReply(helo.lines[0])

    async def _start_tls(self, connection: UpstreamConnection, domain: str, nexthop: str, target: Target,
                         policy: Policy, helo: str,
                         certificate: ClientCertificate | None) -> HandshakeFacts | None:
        """The facts of a verified-enough handshake; None: STARTTLS refused under `may`."""
        where = f"{target.hostname}[{target.address}]:{target.port}"
        server_name = self._server_name(policy, target, nexthop)
        session_key = _session_key(target, server_name, policy, certificate)
        try:
            engine = self.client_tls.new_engine(policy, server_hostname=server_name,
                                                session=self.sessions.get(session_key), certificate=certificate)
        except (OSError, ValueError) as exc:  # a CA or certificate file gone since the start, say
            log.error(f"cannot start TLS to {where}: {exc}", domain=domain, level=str(policy.level))
            raise _TryNext(_Failure(f"cannot start TLS to {where}: local configuration problem",
                                    policy=True)) from None
        reply = await connection.command("STARTTLS", self.settings.reply_timeout)
        if reply.code != 220:
            self._publish_failure(nexthop, target, connection, helo, policy, "starttls-not-supported",
                                  f"starttls_refused_{reply.code}")
            if policy.tls_required:
                raise _TryNext(_Failure(f"TLS is required, but host {where} refused to start TLS: "
                                        f"{reply.code} {reply.text}", policy=True))
            log.info(f"host {where} refused to start TLS; continuing in plaintext", reply=reply.text)
            return None
        started = time.monotonic()
        try:
            await connection.start_tls(engine, self.settings.handshake_timeout)
        except TlsHandshakeError as exc:
            self.sessions.discard(session_key)
            log.warning(f"SSL_connect error to {where}: {exc.reason}", domain=domain)
            self._publish_failure(nexthop, target, connection, helo, policy, exc.failure_type, exc.reason,
                                  duration=time.monotonic() - started)
            if policy.tls_required:
                raise _TryNext(_Failure(f"TLS handshake with {where} failed: {exc.reason}", policy=True)) from None
            raise _RetryInPlaintext(f"TLS handshake with {where} failed: {exc.reason}", session_key) from None
        self.fallback.handshake_completed(session_key)
        if connection.discarded_after_starttls:
            log.warning("discarded plaintext received after the 220 reply to STARTTLS",
                        peer=where, bytes=connection.discarded_after_starttls)
        verdict = evaluate_server(engine, policy, mx_hostname=target.hostname, nexthop=nexthop_name(nexthop))
        facts = dataclasses.replace(
            build_facts(engine, direction=Direction.OUTBOUND, peer_name=target.hostname,
                        peer_addr=target.address, peer_port=target.port,
                        duration=time.monotonic() - started, peer_trust=verdict.trust,
                        peer_certificate=verdict.certificate,
                        local_key_detail=self.client_tls.local_key_detail(certificate)),
            domain=tlsrpt_domain(nexthop), local_addr=self._local_addr(connection), peer_helo=helo,
            policy_level=str(policy.level), **_policy_facts(policy))
        if verdict.failure is None and policy.sts is not None and policy.sts.mode == "testing":
            facts = self._testing_report(facts, engine, policy, target, nexthop)
        if verdict.failure is not None:
            self.sessions.discard(session_key)
            failed = dataclasses.replace(facts, failure_type=verdict.failure.failure_type,
                                         failure_reason=verdict.failure.reason)
            log.warning(f"server certificate verification failed for {where}: {verdict.failure.reason}",
                        domain=domain, level=str(policy.level), peer_trust=str(verdict.trust))
            self.bus.publish(failed)
            raise _TryNext(_Failure(f"Server certificate not verified: {where}: {verdict.failure.reason}",
                                    policy=True))
        self.bus.publish(facts)
        return facts

    @staticmethod
    def _server_name(policy: Policy, target: Target, nexthop: str) -> str | None:
        if policy.servername == "hostname":
            name = target.hostname
        elif policy.servername == "nexthop":
            name = nexthop_name(nexthop)
        else:
            name = policy.servername
        return None if _is_ip(name) else name

    @staticmethod
    def _local_addr(connection: UpstreamConnection | None) -> str | None:
        if connection is None or connection.transport is None:
            return None
        sockname = connection.transport.get_extra_info("sockname")
        return sockname[0] if sockname else None

    def _publish_failure(self, nexthop: str, target: Target, connection: UpstreamConnection | None,
                         helo: str | None, policy: Policy, failure_type: str, reason: str,
                         duration: float = 0.0) -> None:
        """`connection` and `helo` are None for a failure before connecting (TLSA lookups)."""
        self.bus.publish(HandshakeFacts(
            direction=Direction.OUTBOUND, peer_name=target.hostname, peer_addr=target.address,
            peer_port=target.port, duration=duration, failure_type=failure_type, failure_reason=reason,
            domain=tlsrpt_domain(nexthop), local_addr=self._local_addr(connection), peer_helo=helo,
            policy_level=str(policy.level), **_policy_facts(policy)))

    def _testing_report(self, facts: HandshakeFacts, engine: TlsEngine, policy: Policy, target: Target,
                        nexthop: str) -> HandshakeFacts:
        """MTA-STS `testing`: the facts carry what `enforce` would have refused, for TLSRPT
        only; the handshake itself succeeded, and the mail goes on under the level it has."""
        assert policy.sts is not None
        enforced = self._sts_host_policy(dataclasses.replace(policy, sts=None),
                                         dataclasses.replace(policy.sts, mode="enforce"))
        failure: tuple[str, str] | None = None
        protocol = engine.ssl_object.version() or ""
        if enforced.min_protocol and protocol < enforced.min_protocol:  # the names sort
            failure = ("validation-failure", f"{protocol}_below_{enforced.min_protocol}")
        else:
            verdict = evaluate_server(engine, enforced, mx_hostname=target.hostname, nexthop=nexthop_name(nexthop))
            if verdict.failure is not None:
                failure = (verdict.failure.failure_type, verdict.failure.reason)
        if failure is None:
            return facts
        log.warning(f"MTA-STS testing: {target.hostname}[{target.address}] would be refused under enforce: "
                    f"{failure[1]}", domain=policy.sts.domain)
        return dataclasses.replace(facts, tlsrpt_failure=failure)


def _policy_facts(policy: Policy) -> dict[str, object]:
    """The TLSRPT policy fields of `HandshakeFacts`: DANE's TLSA records for the MX host
    (Postfix's smtp_tlsrpt_set_dane_policy), or the domain's MTA-STS policy."""
    if policy.dane is not None:
        return {"tlsrpt_policy_type": "tlsa", "tlsrpt_policy_domain": policy.dane.base_domain,
                "tlsrpt_policy_strings": policy.dane.policy_strings}
    if policy.sts is not None:
        return {"tlsrpt_policy_type": "sts", "tlsrpt_policy_domain": policy.sts.domain,
                "tlsrpt_policy_strings": policy.sts.lines, "tlsrpt_mx_hosts": policy.sts.mx}
    if policy.sts_failure is not None:  # no policy was in force: only the failure to get one
        failure = policy.sts_failure
        return {"tlsrpt_failure": (failure.result_type, failure.reason.replace(" ", "_"))}
    return {}


def tlsrpt_domain(nexthop: str) -> str | None:
    """The domain whose TLSRPT policy a handshake with this nexthop's servers is reported
    to: the next-hop domain, whose MX hosts they are (the recipient domain, unless a route
    sends its mail elsewhere); None for `[host]` and address literals, which are no domain's
    MX hosts (Postfix reports nothing for them)."""
    return None if nexthop.startswith("[") else nexthop.partition(":")[0]


def _session_key(target: Target, server_name: str | None, policy: Policy,
                 certificate: ClientCertificate | None) -> tuple:
    """A TLS session resumes only for the same server, SNI, policy and client certificate:
    with `servername=nexthop` two domains on one MX send different names, and a session
    must not be offered under a name other than the one it was made for (RFC 8446 4.2.11)."""
    return (target.hostname.lower(), target.address, target.port, server_name, policy, certificate)


def _reply_text(reply: Reply) -> str:
    """The EHLO reply before STARTTLS as TLSRPT's receiving-mx-helo wants it: every line
    with its code, joined by CRLF (what Postfix hands libtlsrpt)."""
    return reply.serialize().decode("utf-8", "surrogateescape").rstrip("\r\n")
