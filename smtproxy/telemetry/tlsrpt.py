"""TLSRPT (RFC 8460): each new outbound TLS connection attempt becomes one result datagram
for sys4's tlsrpt-collectd, as Postfix 3.10 sends them through libtlsrpt.

What is reported (Postfix's rules, smtp_tlsrpt.c): one final result per new connection,
success or the failure the connector met (under MTA-STS `testing`, what `enforce` would
have refused; without the MTA-STS policy a domain announces, why it could not be had); never for a reused cached connection; for a resumed TLS session only with
`skip_reused_handshakes = false`; starttls-not-supported only where the level requires TLS
or a DANE or MTA-STS policy applied; never about `[host]` nexthops and address literals
(`HandshakeFacts.domain` is None); and only to domains whose `_smtp._tls` TXT record asks
for reports.  Where DANE TLSA records applied, the policy is tlsa, for the MX host they
belong to, with the records as policy strings (Postfix's smtp_tlsrpt_set_dane_policy);
where an MTA-STS policy applied, sts, for the domain, with its lines and mx patterns;
otherwise no-policy-found, for the next-hop domain (the recipient domain unless a route
sends its mail elsewhere).

Nothing here may delay mail (DESIGN.md invariant 6): the bus callback only queues the
facts; one task looks up the record and sends, in order, on a non-blocking datagram
socket.  A missing or full collector, or a full queue, loses the result: counted
(`TlsrptEventDropped`) and logged at most once per `DROP_LOG_INTERVAL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

import dns.asyncresolver
import structlog

from smtproxy.config import TlsrptConfig
from smtproxy.events import Direction, EventBus, HandshakeFacts, TlsrptEventDropped, TlsrptEventSent
from smtproxy.policy.levels import Level
from smtproxy.telemetry.tlsrpt_datagram import TlsrptFailure, TlsrptPolicy, TlsrptResult, encode
from smtproxy.routing.mx import a_label
from smtproxy.telemetry.tlsrpt_record import TlsrptRecords

log = structlog.get_logger("smtproxy.tlsrpt")

QUEUE_SIZE = 1000  # results waiting for their record lookup
DROP_LOG_INTERVAL = 60.0  # seconds between two "dropped" warnings


def reportable(facts: HandshakeFacts, skip_resumed: bool) -> bool:
    """Whether these handshake facts stand for a TLSRPT result (before the DNS check)."""
    if facts.direction is not Direction.OUTBOUND or facts.reused or not facts.domain:
        return False
    if facts.resumed and skip_resumed:
        return False
    if facts.failure_type == "starttls-not-supported" and facts.policy_level is not None:
        return facts.tlsrpt_policy_type is not None or Level(facts.policy_level).tls_required
    return True


def tlsrpt_result(facts: HandshakeFacts, domain: str, record: str) -> TlsrptResult:
    """The result for `domain` (its A-label) under its TLSRPT `record`."""
    failure = None
    failure_type, reason = (facts.failure_type, facts.failure_reason) if facts.failure_type else (
        facts.tlsrpt_failure or (None, None))
    if failure_type is not None:
        failure = TlsrptFailure(
            result_type=failure_type, sending_mta_ip=facts.local_addr,
            receiving_mx_hostname=facts.peer_name, receiving_mx_helo=facts.peer_helo,
            receiving_ip=facts.peer_addr, failure_reason_code=reason)
    if facts.tlsrpt_policy_type is not None:
        policy = TlsrptPolicy(facts.tlsrpt_policy_type, facts.tlsrpt_policy_domain, facts.tlsrpt_policy_strings,
                              facts.tlsrpt_mx_hosts)
    elif facts.tlsrpt_failure is not None and not facts.failure_type:  # the domain's MTA-STS policy, not had
        policy = TlsrptPolicy("sts", domain)
    else:
        policy = TlsrptPolicy("no-policy-found", domain)
    return TlsrptResult(domain, record, policy, failure)


def log_line(result: TlsrptResult, facts: HandshakeFacts) -> str:
    """Postfix's wording (tlsrpt_wrapper.c), failure types with underscores."""
    line = (f"TLSRPT: status={result.result}, domain={result.domain}, "
            f"receiving_mx={facts.peer_name}[{facts.peer_addr}]")
    if result.failure is not None:
        line += f", failure_type={result.failure.result_type.replace('-', '_')}"
        if result.failure.failure_reason_code:
            line += f", failure_reason={result.failure.failure_reason_code}"
    return line


class DatagramSender:
    """`sendto` on one non-blocking unix datagram socket: never waits for the collector."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._socket: socket.socket | None = None

    def send(self, payload: bytes) -> OSError | None:
        """None when the collector's queue took the datagram, else why it did not."""
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(payload, self.path)
        except OSError as error:
            return error
        return None

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class TlsrptReporter:
    """The `HandshakeFacts` subscriber: queue, look up, send, count, log."""

    def __init__(self, bus: EventBus, records: TlsrptRecords, sender: DatagramSender, *,
                 skip_resumed: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.bus = bus
        self.records = records
        self.sender = sender
        self.skip_resumed = skip_resumed
        self._clock = clock
        self._queue: asyncio.Queue[HandshakeFacts] = asyncio.Queue(QUEUE_SIZE)
        self._worker: asyncio.Task[None] | None = None
        self._unlogged_drops = 0
        self._next_drop_log = float("-inf")

    def on_handshake(self, facts: HandshakeFacts) -> None:
        if not reportable(facts, self.skip_resumed):
            return
        try:
            self._queue.put_nowait(facts)
        except asyncio.QueueFull:
            self._dropped(f"more than {QUEUE_SIZE} results wait for their TLSRPT record lookup")
            return
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work())

    async def _work(self) -> None:
        while True:
            facts = await self._queue.get()
            try:
                await self._report(facts)
            except Exception:  # noqa: BLE001 - one bad result must not end reporting
                log.exception("TLSRPT: cannot report a result", domain=facts.domain)
            finally:
                self._queue.task_done()

    async def _report(self, facts: HandshakeFacts) -> None:
        domain = a_label(facts.domain or "")
        record = await self.records.lookup(domain) if domain else None
        if record is None:
            return
        result = tlsrpt_result(facts, domain, record)
        log.info(log_line(result, facts), domain=domain, result=result.result)
        error = self.sender.send(encode(result))
        if error is not None:
            self._dropped(f"cannot send to the collector at {self.sender.path}: {error.strerror or error}")
            return
        result_type = result.failure.result_type if result.failure else ""
        self.bus.publish(TlsrptEventSent(result.result, result_type))

    def _dropped(self, reason: str) -> None:
        self.bus.publish(TlsrptEventDropped())
        self._unlogged_drops += 1
        now = self._clock()
        if now < self._next_drop_log:
            return
        log.warning(f"TLSRPT: results dropped: {reason}", dropped=self._unlogged_drops,
                    next_report_in=DROP_LOG_INTERVAL)
        self._unlogged_drops = 0
        self._next_drop_log = now + DROP_LOG_INTERVAL

    async def close(self, timeout: float) -> None:
        """Send what is queued (for at most `timeout` seconds), then stop."""
        if self._worker is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout)
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self.sender.close()


def subscribe(bus: EventBus, config: TlsrptConfig,
              resolver: dns.asyncresolver.Resolver) -> TlsrptReporter | None:
    """The reporter for `[tlsrpt]`, subscribed to handshake facts; None when TLSRPT is off."""
    if not config.socket:
        return None
    reporter = TlsrptReporter(bus, TlsrptRecords(resolver), DatagramSender(config.socket),
                              skip_resumed=config.skip_reused_handshakes)
    bus.subscribe(HandshakeFacts, reporter.on_handshake)
    return reporter
