"""The load generator: C concurrent SMTP senders on asyncio (uvloop), raw streams + ssl.

Each sender opens a session (TCP; implicit TLS, STARTTLS or plaintext), sends M messages
of S bytes (MAIL, RCPT, DATA pipelined, then the text and the final dot), says QUIT and
starts the next session, until the session count or the duration bound is reached. TLS runs
on :class:`ssl.SSLObject` over memory BIOs on top of the raw asyncio streams, so a sender
can offer the session of its previous connection (``resume=True``) and read whether the
server resumed it (``session_reused``) -- asyncio's own ``start_tls`` takes no session.

Only loopback is allowed as a target: this is a benchmark, not a traffic cannon.

Latency of a message: from the moment the previous message of the session was accepted
(for the first message: from the TCP connect, so handshakes count) until the final 250.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import math
import ssl
import time
from typing import Any

CRLF = b"\r\n"


class SmtpError(Exception):
    """An unexpected reply; ``str()`` is the counted error kind (``reply 421 to MAIL``)."""


def check_loopback(host: str) -> None:
    if not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing to send load to {host}: only loopback addresses are allowed")


def client_context(*, tls_version: str | None = None, tickets: bool = True) -> ssl.SSLContext:
    """A client context that does not verify (the load generator's CPU is not under test)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls_version == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    elif tls_version == "1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    return context


def make_message(size: int, sender: str, recipient: str) -> bytes:
    """A message of ``size`` bytes (headers included), lines of at most 78 characters, no
    line starting with a dot, followed by the end-of-data ``.``."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: smtproxy benchmark\r\n"
        "Message-ID: <bench@bench.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + CRLF
    remaining = max(0, size - len(head))
    body = line * (remaining // len(line))
    tail = remaining - len(body)
    if tail:
        body += b"y" * max(0, tail - 2) + CRLF
    return head + body + b".\r\n"


class Connection:
    """One SMTP connection on raw asyncio streams; TLS via SSLObject + MemoryBIO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.tls: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None

    @classmethod
    async def open(cls, host: str, port: int, limit: int = 1 << 20) -> Connection:
        reader, writer = await asyncio.open_connection(host, port, limit=limit)
        return cls(reader, writer)

    # -- bytes

    def _flush_tls(self) -> None:
        assert self._outgoing is not None
        data = self._outgoing.read()
        if data:
            self.writer.write(data)

    def _read_tls(self) -> None:
        assert self.tls is not None
        while True:
            try:
                chunk = self.tls.read(1 << 18)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                break
            if not chunk:
                break
            self.buffer += chunk
        self._flush_tls()  # post-handshake messages (key updates) may want an answer

    async def _fill(self) -> None:
        data = await self.reader.read(1 << 18)
        if not data:
            raise ConnectionError("connection closed by server")
        if self.tls is None:
            self.buffer += data
        else:
            assert self._incoming is not None
            self._incoming.write(data)
            self._read_tls()

    async def send(self, data: bytes) -> None:
        if self.tls is None:
            self.writer.write(data)
        else:
            view = memoryview(data)
            offset = 0
            while offset < len(view):
                # bounded chunks keep the outgoing BIO (and our memory) small for 50 MiB
                offset += self.tls.write(view[offset : offset + (1 << 18)])
                self._flush_tls()
                if self.writer.transport.get_write_buffer_size() > (1 << 20):
                    await self.writer.drain()
        await self.writer.drain()

    async def reply(self) -> int:
        """Read one (possibly multi-line) reply; return its code."""
        while True:
            start = 0
            while True:
                end = self.buffer.find(b"\n", start)
                if end < 0:
                    break
                line = self.buffer[start : end + 1]
                start = end + 1
                if len(line) > 3 and line[3:4] == b"-":
                    continue
                try:
                    code = int(line[:3])
                except ValueError:
                    raise SmtpError("not an SMTP reply") from None
                del self.buffer[:start]
                return code
            await self._fill()

    async def command(self, line: bytes, expect: int, what: str) -> None:
        await self.send(line)
        code = await self.reply()
        if code != expect:
            raise SmtpError(f"reply {code} to {what}")

    # -- TLS

    async def handshake(
        self, context: ssl.SSLContext, server_hostname: str | None, session: ssl.SSLSession | None
    ) -> None:
        self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False,
            server_hostname=server_hostname, session=session,
        )
        self.buffer.clear()  # nothing sent in plaintext after the 220 is kept (there is none)
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush_tls()
                await self.writer.drain()
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionError("connection closed during the TLS handshake") from None
                self._incoming.write(data)
        self._flush_tls()
        await self.writer.drain()
        self._read_tls()

    @property
    def resumed(self) -> bool:
        return bool(self.tls is not None and self.tls.session_reused)

    def close(self) -> None:
        self.writer.transport.abort() if self.writer.transport is not None else None

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.command(b"QUIT\r\n", 221, "QUIT"), 5)
        except (OSError, SmtpError, asyncio.TimeoutError, ssl.SSLError):
            pass
        finally:
            self.writer.close()


@dataclasses.dataclass
class LoadSpec:
    port: int
    host: str = "127.0.0.1"
    mode: str = "starttls"  # starttls | implicit | plain
    concurrency: int = 20
    messages_per_session: int = 1
    size: int = 4096
    resume: bool = False
    sessions: int | None = None  # bound on sessions started; None: duration only
    duration: float = 10.0  # bound on time; no new session starts after it
    timeout: float = 30.0  # per session operation
    tls_version: str | None = None
    server_name: str | None = "mx.bench.test"
    sender: str = "sender@bench.test"
    recipient: str = "user@sink.test"
    pipelining: bool = True
    ehlo: str = "loadgen.bench.test"

    def __post_init__(self) -> None:
        check_loopback(self.host)
        if self.mode not in ("starttls", "implicit", "plain"):
            raise ValueError(f"mode {self.mode!r}: allowed starttls, implicit, plain")


@dataclasses.dataclass
class LoadResult:
    spec: LoadSpec
    elapsed: float = 0.0
    sessions_ok: int = 0
    sessions_failed: int = 0
    messages_ok: int = 0
    full_handshakes: int = 0
    resumed_handshakes: int = 0
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    latencies: list[float] = dataclasses.field(default_factory=list)
    bound: str = ""  # which bound ended the run: sessions, duration, deadline
    started_at: float = 0.0  # time.monotonic() at the start and the end of the run
    finished_at: float = 0.0

    @property
    def sessions_per_s(self) -> float:
        return self.sessions_ok / self.elapsed if self.elapsed else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.messages_ok / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        return percentile(self.latencies, p)

    def count_handshake(self, conn: Connection) -> None:
        if conn.tls is not None:
            if conn.resumed:
                self.resumed_handshakes += 1
            else:
                self.full_handshakes += 1

    def summary(self) -> dict[str, Any]:
        return {
            "elapsed_s": round(self.elapsed, 3),
            "sessions_ok": self.sessions_ok,
            "sessions_failed": self.sessions_failed,
            "messages_ok": self.messages_ok,
            "sessions_per_s": round(self.sessions_per_s, 1),
            "messages_per_s": round(self.messages_per_s, 1),
            "latency_ms": {
                f"p{p}": round(1000 * self.percentile(p), 2) for p in (50, 90, 99)
            },
            "full_handshakes": self.full_handshakes,
            "resumed_handshakes": self.resumed_handshakes,
            "errors": dict(self.errors),
            "bound": self.bound,
        }


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
    return ordered[rank]


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, SmtpError):
        return str(exc)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        return f"SSLError {exc.reason or exc}"
    return type(exc).__name__


async def open_session(
    spec: LoadSpec, context: ssl.SSLContext | None, session: ssl.SSLSession | None
) -> Connection:
    """Connect, greeting, EHLO, STARTTLS/handshake, EHLO: ready for MAIL."""
    conn = await Connection.open(spec.host, spec.port)
    try:
        if spec.mode == "implicit":
            assert context is not None
            await conn.handshake(context, spec.server_name, session)
        code = await conn.reply()
        if code != 220:
            raise SmtpError(f"greeting {code}")
        ehlo = f"EHLO {spec.ehlo}\r\n".encode()
        await conn.command(ehlo, 250, "EHLO")
        if spec.mode == "starttls":
            assert context is not None
            await conn.command(b"STARTTLS\r\n", 220, "STARTTLS")
            await conn.handshake(context, spec.server_name, session)
            await conn.command(ehlo, 250, "EHLO")
    except BaseException:
        conn.close()
        raise
    return conn


async def send_message(conn: Connection, spec: LoadSpec, message: bytes) -> None:
    mail = f"MAIL FROM:<{spec.sender}>\r\n".encode()
    rcpt = f"RCPT TO:<{spec.recipient}>\r\n".encode()
    if spec.pipelining:
        await conn.send(mail + rcpt + b"DATA\r\n")
        codes = [await conn.reply() for _ in range(3)]
        if codes != [250, 250, 354]:
            if codes[2] == 354:  # the server wants text although MAIL or RCPT failed
                await conn.send(b".\r\n")
                await conn.reply()
            raise SmtpError(f"replies {'/'.join(map(str, codes))} to MAIL/RCPT/DATA")
    else:
        await conn.command(mail, 250, "MAIL")
        await conn.command(rcpt, 250, "RCPT")
        await conn.command(b"DATA\r\n", 354, "DATA")
    await conn.send(message)
    code = await conn.reply()
    if code != 250:
        raise SmtpError(f"reply {code} to end of data")


async def run_load(spec: LoadSpec) -> LoadResult:
    """Run the load described by ``spec``; bounded by sessions, duration and a deadline."""
    result = LoadResult(spec)
    context = None if spec.mode == "plain" else client_context(tls_version=spec.tls_version)
    message = make_message(spec.size, spec.sender, spec.recipient)
    started = 0
    start = result.started_at = time.monotonic()
    stop_at = start + spec.duration

    def may_start() -> bool:
        nonlocal started
        if spec.sessions is not None and started >= spec.sessions:
            result.bound = result.bound or "sessions"
            return False
        if time.monotonic() >= stop_at:
            result.bound = result.bound or "duration"
            return False
        started += 1
        return True

    async def sender() -> None:
        session: ssl.SSLSession | None = None
        while may_start():
            t_prev = time.monotonic()
            conn: Connection | None = None
            try:
                async with asyncio.timeout(spec.timeout):
                    conn = await open_session(spec, context, session if spec.resume else None)
                    result.count_handshake(conn)
                    for _ in range(spec.messages_per_session):
                        await send_message(conn, spec, message)
                        now = time.monotonic()
                        result.latencies.append(now - t_prev)
                        result.messages_ok += 1
                        t_prev = now
                    await conn.quit()
                    if conn.tls is not None and spec.resume:
                        session = conn.tls.session
                result.sessions_ok += 1
            except Exception as exc:  # counted, never fatal: the run goes on
                result.sessions_failed += 1
                result.errors[error_kind(exc)] += 1
                if conn is not None:
                    conn.close()
                await asyncio.sleep(0.01)  # a refusing server must not turn this into a spin

    tasks = [asyncio.ensure_future(sender()) for _ in range(spec.concurrency)]
    deadline = spec.duration + spec.timeout + 5
    done, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
        result.bound = "deadline"
    if pending:
        await asyncio.wait(pending, timeout=5)
    result.finished_at = time.monotonic()
    result.elapsed = result.finished_at - start
    return result


async def park_sessions(
    spec: LoadSpec, count: int, *, concurrency: int = 50, deadline: float = 120.0
) -> tuple[list[Connection], LoadResult]:
    """Open ``count`` sessions and leave them parked after the EHLO that follows the
    handshake. Returns the open connections (the caller closes them) and the tally."""
    result = LoadResult(spec)
    context = client_context(tls_version=spec.tls_version) if spec.mode != "plain" else None
    parked: list[Connection] = []
    claimed = 0
    start = time.monotonic()
    stop_at = start + deadline

    async def opener() -> None:
        nonlocal claimed
        session: ssl.SSLSession | None = None
        while claimed < count and time.monotonic() < stop_at:
            claimed += 1
            try:
                async with asyncio.timeout(spec.timeout):
                    conn = await open_session(spec, context, session if spec.resume else None)
                result.count_handshake(conn)
                if conn.tls is not None and spec.resume and session is None:
                    # TLS 1.3 tickets arrive after the handshake, with the EHLO reply
                    session = conn.tls.session
                parked.append(conn)
                result.sessions_ok += 1
            except Exception as exc:
                result.sessions_failed += 1
                result.errors[error_kind(exc)] += 1
                await asyncio.sleep(0.01)

    tasks = [asyncio.ensure_future(opener()) for _ in range(concurrency)]
    _, pending = await asyncio.wait(tasks, timeout=deadline + spec.timeout)
    for task in pending:
        task.cancel()
        result.bound = "deadline"
    result.elapsed = time.monotonic() - start
    return parked, result


async def close_parked(parked: list[Connection]) -> None:
    for conn in parked:
        conn.close()
    async with asyncio.timeout(30):
        await asyncio.gather(*(conn.writer.wait_closed() for conn in parked), return_exceptions=True)
