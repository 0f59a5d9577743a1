"""One connection from the legacy MTA: smtproxy answers the envelope itself, and relays
the transaction synchronously to the remote MX of the first recipient's domain.

Nothing is acknowledged before the remote acknowledged it (DESIGN.md invariant 1): MAIL gets
a local 250 after a syntax check, but every RCPT reply and the final reply after the data
are the remote's own (a remote refusal of MAIL becomes the RCPT reply).  One destination per
transaction: a RCPT for another domain gets `452 4.5.3`, and the MTA sends it next time.
Commands are answered strictly in order, so the MTA may pipeline.

When the remote offers PIPELINING (RFC 2920), MAIL goes out together with the RCPT being
handled and whatever the MTA pipelined right after it: further RCPTs for the same domain
and a DATA that ends the group.  Their replies are read as the MTA's commands come up in
order, so each reply still answers its own command; a transaction then costs two round
trips to the remote (envelope, then the message) instead of one per command, and the
RSET that readies a reusable connection for the next transaction follows the final dot
in the same group.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import Awaitable, Callable

from smtproxy.events import Direction, EventBus, MessageRelayed
from smtproxy.outbound.connector import DeliveryFailure, RemoteSession
from smtproxy.outbound.upstream import UpstreamError
from smtproxy.routing.mx import a_label
from smtproxy.smtp import (
    LINE_TOO_LONG,
    ChunkReader,
    Command,
    DataError,
    DataScanner,
    LineReader,
    PeerProtocolError,
    Reply,
    ServerSession,
    SessionPolicy,
    parse_bdat,
    parse_command,
    parse_mail_from,
    parse_rcpt_to,
    too_many_errors,
)

COMMAND_LINE_LIMIT = 2048
READ_SIZE = 64 * 1024
MAX_PIPELINED_RCPTS = 100  # bound on the RCPTs sent ahead in one group

# MAIL/RCPT parameters and the remote extension each needs (RFC 1870, 6152, 6531, 3461)
_MAIL_PARAMS = {"SIZE": "SIZE", "BODY": "8BITMIME", "SMTPUTF8": "SMTPUTF8", "RET": "DSN", "ENVID": "DSN"}
_RCPT_PARAMS = {"NOTIFY": "DSN", "ORCPT": "DSN"}

_DATA_ERRORS = {
    DataError.BARE_LF: Reply.of(521, "5.5.2", "Error: bare <LF> received"),
    DataError.BARE_CR: Reply.of(521, "5.5.2", "Error: bare <CR> received"),
    DataError.LINE_TOO_LONG: Reply.of(500, "5.5.2", "Error: line too long"),
    DataError.TOO_BIG: Reply.of(552, "5.3.4", "Error: message file too big"),
}


@dataclasses.dataclass(frozen=True, slots=True)
class OutboundSettings:
    hostname: str
    bare_newline: str
    idle_timeout: float
    reply_timeout: float
    data_done_timeout: float
    max_message_size: int
    max_errors: int = 20


# (recipient domain, envelope sender) -> an open remote session ready for MAIL; raises
# DeliveryFailure.  The sender picks the client certificate (s/qmail domaincerts).
Connect = Callable[[str, str], Awaitable[RemoteSession]]
# hand a remote session back after a transaction (for reuse, or to close it)
Release = Callable[[RemoteSession, bool], None]
# a reused connection failed at its first command: drop it, then try again
Stale = Callable[[RemoteSession], None]


class MtaGone(Exception):
    """The legacy MTA closed the connection or went idle past the timeout."""


def recipient_domain(path: str) -> str | None:
    """The domain part as an A-label (RFC 6531 lets an MTA send `bücher.example`; routes,
    policies and DNS know `xn--bcher-kva.example`), or an address literal (`[192.0.2.1]`,
    RFC 5321 4.1.3: the router delivers to it, or refuses a malformed one). None: no
    domain, or none that can be a DNS name."""
    local, at, domain = path.rpartition("@")
    if not at or not local or not domain:
        return None
    return domain.lower() if domain.startswith("[") else a_label(domain.rstrip("."))


def _as_451(reply: Reply) -> Reply:
    """A remote's 421 as the MTA gets it: the same text, as a transient failure of this
    transaction only."""
    return Reply(451, reply.lines)


def _line(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape") + b"\r\n"


def _forward_line(command: Command, remote: RemoteSession) -> bytes:
    """What goes to the remote for the MTA's RCPT or DATA."""
    if command.verb == "DATA":
        return b"DATA\r\n"
    path, params = parse_rcpt_to(command.arg)
    return _line(f"RCPT TO:<{path}>" + filter_params(params, _RCPT_PARAMS, remote.ehlo))


def filter_params(params: dict[str, str | None], allowed: dict[str, str], remote) -> str:
    """The parameters the remote's EHLO reply allows, as ` KEY=VALUE ...` (or "")."""
    kept = [key if value is None else f"{key}={value}" for key, value in params.items()
            if key in allowed and remote.has(allowed[key])]
    return "".join(f" {word}" for word in kept)


NOT_RECOGNIZED = Reply.of(502, "5.5.2", "Error: command not recognized")


class OutboundSession:
    def __init__(self, settings: OutboundSettings, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 connect: Connect, release: Release, stale: Stale, bus: EventBus, log) -> None:
        self.settings = settings
        self.stale = stale
        self.bus = bus
        self.reader = reader
        self.writer = writer
        self.connect = connect
        self.release = release
        self.log = log
        self.smtp = ServerSession(SessionPolicy(tls_offered=False, tls_required=False, auth_only_after_tls=False,
                                                max_message_size=settings.max_message_size, chunking=False))
        self.lines = LineReader(COMMAND_LINE_LIMIT)
        self._replies: list[bytes] = []  # answered, not yet written: see _flush
        self.messages = 0
        self.message_bytes = 0
        self.errors = 0
        self._reset_transaction()

    def _reset_transaction(self) -> None:
        self.mail: tuple[str, dict[str, str | None]] | None = None
        self.domain: str | None = None
        self.remote: RemoteSession | None = None
        self.remote_refusal: Reply | None = None
        self.accepted = 0
        # commands of the MTA sent to the remote ahead of their turn (PIPELINING), oldest first
        self.sent_ahead: collections.deque[Command] = collections.deque()

    # ----------------------------------------------------------------- I/O helpers

    async def _read(self) -> bytes:
        try:
            async with asyncio.timeout(self.settings.idle_timeout):  # wait_for would make a task per read
                if self._replies:
                    self._flush()
                    await self.writer.drain()  # an MTA that stops reading times out too
                data = await self.reader.read(READ_SIZE)
        except asyncio.TimeoutError:
            self._write(Reply.of(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
            raise MtaGone("timeout") from None
        except ConnectionError:
            raise MtaGone("lost connection") from None
        if not data:
            raise MtaGone("lost connection")
        return data

    def _write(self, reply: Reply) -> None:
        self._replies.append(reply.serialize())

    def _flush(self) -> None:
        """Write the replies so far in one go. Called before waiting for the MTA (as
        Postfix's smtpd does): replies to a pipelined group leave together, and an MTA that
        waits for a reply always has it before smtproxy waits for its next command."""
        if self._replies and not self.writer.is_closing():
            self.writer.write(b"".join(self._replies))
        self._replies.clear()

    async def _discard_chunk(self, bdat: Command) -> bool:
        """The payload of a refused BDAT (CHUNKING is not offered) is read and dropped,
        never taken for commands; False when it has no size, so nothing after it can be
        framed."""
        try:
            size, _ = parse_bdat(bdat.arg)
        except PeerProtocolError:
            return False
        chunk, data = ChunkReader(size), self.lines.take_buffer()
        while True:
            _, rest, done = chunk.feed(data)
            if done:
                self.lines.feed(rest)
                return True
            data = await self._read()

    async def _next_command_line(self) -> bytes | object:
        while True:
            line = self.lines.next_line()
            if line is not None:
                return line
            self.lines.feed(await self._read())

    # ----------------------------------------------------------------- the session

    async def run(self) -> None:
        self._write(Reply(220, (f"{self.settings.hostname} ESMTP smtproxy",)))
        try:
            while not self.writer.is_closing():
                line = await self._next_command_line()
                if line is LINE_TOO_LONG:
                    if not self._refuse(Reply.of(500, "5.5.2", "Error: line too long")):
                        break
                    continue
                try:
                    command = parse_command(line)
                except PeerProtocolError as exc:
                    if not self._refuse(exc.reply):
                        break
                    continue
                refusal = self.smtp.check(command)
                if self.sent_ahead and (refusal is not None or self.sent_ahead[0] != command):
                    await self._settle_sent_ahead()
                if refusal is not None and refusal.code == 221:
                    self._write(refusal)
                    break
                if refusal is not None:
                    if not self._refuse(refusal):
                        break
                    if command.verb == "BDAT" and not await self._discard_chunk(command):
                        break
                    continue
                reply = await self._handle(command)
                if command.verb != "DATA" or reply.code != 354:
                    self.smtp.on_reply(command, reply)
                if reply is NOT_RECOGNIZED:
                    if not self._refuse(reply):
                        break
                    continue
                self._write(reply)
                if command.verb == "QUIT":
                    break
        except MtaGone as exc:
            self.log.info("legacy MTA connection ended", reason=str(exc))
        finally:
            self._flush()
            self._abandon_remote()

    def _refuse(self, reply: Reply) -> bool:
        """Answer a command refused here; at the `max_errors`th the answer is 421 instead
        and False says the session ends (Postfix's smtpd_hard_error_limit)."""
        self.errors += 1
        if self.errors >= self.settings.max_errors:
            self._write(too_many_errors(self.settings.hostname))
            return False
        self._write(reply)
        return True

    async def _handle(self, command: Command) -> Reply:
        verb = command.verb
        if verb in ("EHLO", "HELO"):
            self._end_transaction()
            return self._ehlo_reply() if verb == "EHLO" else Reply(250, (self.settings.hostname,))
        if verb == "MAIL":
            self.mail = parse_mail_from(command.arg)
            return Reply.of(250, "2.1.0", "Ok")
        if verb == "RCPT":
            return await self._rcpt(command)
        if verb == "DATA":
            return await self._data(command)
        if verb == "RSET":
            self._end_transaction()
            return Reply.of(250, "2.0.0", "Ok")
        if verb == "NOOP":
            return Reply.of(250, "2.0.0", "Ok")
        if verb == "QUIT":
            return Reply.of(221, "2.0.0", "Bye")
        return NOT_RECOGNIZED

    def _ehlo_reply(self) -> Reply:
        return Reply(250, (
            self.settings.hostname, "PIPELINING", f"SIZE {self.settings.max_message_size}", "ENHANCEDSTATUSCODES",
            "8BITMIME", "DSN", "SMTPUTF8"))

    # ----------------------------------------------------------------- RCPT

    async def _rcpt(self, command: Command) -> Reply:
        path, _ = parse_rcpt_to(command.arg)
        domain = recipient_domain(path)
        if domain is None:
            return Reply.of(501, "5.1.3", "Bad recipient address syntax")
        if self.domain is None:
            self.domain = domain
        elif domain != self.domain:
            return Reply.of(452, "4.5.3", f"Error: too many recipients; {domain} goes in a separate transaction")
        if self.remote_refusal is not None:
            return self.remote_refusal
        if self.remote is None:
            refusal = await self._open_transaction(domain, command)
            if refusal is not None:
                self.remote_refusal = refusal
                return refusal
        assert self.remote is not None
        try:
            if not self._was_sent_ahead(command):
                self.remote.connection.send(_forward_line(command, self.remote))
            reply = await self.remote.connection.read_reply(self.settings.reply_timeout, "waiting for reply to RCPT")
        except UpstreamError as exc:
            return self._remote_lost(exc)
        if reply.code == 421:
            return self._remote_closing(reply)
        if reply.is_positive_completion:
            self.accepted += 1
        return reply

    async def _open_transaction(self, domain: str, rcpt: Command) -> Reply | None:
        """Connect and send MAIL (with `rcpt` and what follows it, under PIPELINING); a
        refusal to answer every RCPT of this transaction."""
        assert self.mail is not None
        sender, params = self.mail
        while True:
            try:
                remote = await self.connect(domain, sender)
            except DeliveryFailure as exc:
                self.log.warning("delivery deferred", domain=domain, reply=exc.reply.text)
                return exc.reply
            if "SMTPUTF8" in params and not remote.ehlo.has("SMTPUTF8"):
                self.release(remote, True)
                return Reply.of(553, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {remote.peer}")
            mail = f"MAIL FROM:<{sender}>" + filter_params(params, _MAIL_PARAMS, remote.ehlo)
            ahead = [rcpt, *self._pipelined_after(domain)] if remote.ehlo.has("PIPELINING") else []
            try:
                remote.connection.send(b"".join([_line(mail), *(_forward_line(c, remote) for c in ahead)]))
                reply = await remote.connection.read_reply(self.settings.reply_timeout, "waiting for reply to MAIL")
                break
            except UpstreamError as exc:
                if remote.reused:
                    self.stale(remote)  # closed while cached: the message goes on a new one
                    continue
                remote.connection.abort()
                return Reply.of(451, "4.4.2",
                                f"lost connection with {remote.peer} while sending MAIL FROM: {exc.reason}")
        if not reply.is_positive_completion:
            settled = await self._drop_replies(remote, ahead)
            self.release(remote, settled and remote.connection.alive and reply.code != 421)
            return _as_451(reply) if reply.code == 421 else reply
        self.remote = remote
        self.sent_ahead.extend(ahead)
        return None

    def _pipelined_after(self, domain: str) -> list[Command]:
        """The RCPTs for `domain` the MTA pipelined after the current one, and a DATA right
        after them: only commands no local check can refuse, so each reply the remote
        gives is the reply the MTA gets."""
        commands: list[Command] = []
        for line in self.lines.complete_lines(MAX_PIPELINED_RCPTS):
            try:
                command = parse_command(line)
                if command.verb == "DATA" and not command.arg.strip(" "):
                    commands.append(command)  # RFC 2920: DATA ends a group
                    break
                if command.verb != "RCPT" or recipient_domain(parse_rcpt_to(command.arg)[0]) != domain:
                    break
            except PeerProtocolError:
                break
            commands.append(command)
        return commands

    def _was_sent_ahead(self, command: Command) -> bool:
        if self.sent_ahead and self.sent_ahead[0] == command:
            self.sent_ahead.popleft()
            return True
        return False

    async def _drop_replies(self, remote: RemoteSession, commands: list[Command]) -> bool:
        """Read and drop the remote's replies to `commands`; False if the connection is
        not fit for another transaction (lost, or waiting for message data after a 354)."""
        try:
            for _ in commands:
                reply = await remote.connection.read_reply(self.settings.reply_timeout, "waiting for a pipelined reply")
                if reply.code == 354:
                    return False
        except UpstreamError:
            return False
        return True

    async def _settle_sent_ahead(self) -> None:
        """The MTA's next command is not the one sent ahead, or it gets a local answer after
        all (DATA once the remote refused every RCPT): the remote's replies to what was sent
        ahead must not answer later commands."""
        assert self.remote is not None
        commands = list(self.sent_ahead)
        self.sent_ahead.clear()
        if not await self._drop_replies(self.remote, commands):
            self.remote.connection.abort()  # nothing is sent: the remote delivers nothing

    def _remote_closing(self, reply: Reply) -> Reply:
        """The remote's 421 closes the remote connection, not the MTA's session: our service
        stays up and the MTA's next transaction may go elsewhere, so the MTA gets 451 (a 421
        would end its session, RFC 5321 3.8) for this and the transaction's later commands."""
        assert self.remote is not None
        self.remote.connection.abort()
        self.remote = None
        self.sent_ahead.clear()
        self.remote_refusal = _as_451(reply)
        return self.remote_refusal

    def _remote_lost(self, exc: UpstreamError) -> Reply:
        assert self.remote is not None
        peer = self.remote.peer
        self.remote.connection.abort()
        self.remote = None
        self.sent_ahead.clear()
        self.remote_refusal = Reply.of(451, "4.4.2", f"lost connection with {peer}: {exc.reason}")
        return self.remote_refusal

    # ----------------------------------------------------------------- DATA

    async def _data(self, command: Command) -> Reply:
        if self.remote is None:
            reply = self.remote_refusal or Reply.of(554, "5.5.1", "Error: no valid recipients")
            self._end_transaction()
            return reply
        remote = self.remote
        try:
            if not self._was_sent_ahead(command):
                remote.connection.send(b"DATA\r\n")
            reply = await remote.connection.read_reply(self.settings.reply_timeout, "waiting for reply to DATA")
        except UpstreamError as exc:
            reply = self._remote_lost(exc)
        if reply.code == 421:
            reply = self._remote_closing(reply)
        if reply.code != 354:
            self._end_transaction()
            return reply
        self._write(reply)
        started = time.monotonic()
        scanner = DataScanner(self.settings.bare_newline, self.settings.max_message_size)
        lost: UpstreamError | None = None
        error: DataError | None = None
        data = self.lines.take_buffer()
        # the RSET that readies the connection for reuse rides with the final dot, in the same
        # write: in a write of its own it reached Postfix after the dot's reply had left, and
        # Postfix's reply to it then waited ~40 ms for our ACK (Nagle against delayed ACK)
        reset = b"RSET\r\n" if remote.policy.connection_reuse and remote.ehlo.has("PIPELINING") else b""
        try:
            while True:
                scan = scanner.feed(data) if data else None
                if scan is not None:
                    if scan.error is not None and error is None:
                        error = scan.error
                        remote.connection.abort()  # without the final dot: nothing is delivered
                    if error is None and lost is None and scan.forward:
                        try:
                            remote.connection.send(scan.forward + reset if scan.done else scan.forward)
                            remote.reset_sent = scan.done and bool(reset)
                            await remote.connection.drain(self.settings.reply_timeout)
                        except UpstreamError as exc:
                            lost = exc
                    if scan.done:
                        self.lines.feed(scan.rest)
                        break
                data = await self._read()
        except MtaGone:
            remote.connection.abort()  # the MTA vanished mid-DATA: no final dot
            self.remote = None
            raise
        size = scanner.size
        if error is not None:
            self.remote = None
            self._end_transaction()
            self.log.warning("message refused", reason=error.value, size=size)
            return _DATA_ERRORS[error]
        if lost is None:
            try:
                final = await remote.connection.read_reply(self.settings.data_done_timeout, "waiting for end of data")
            except UpstreamError as exc:
                lost = exc
        if lost is not None:
            final = self._remote_lost(lost)
        elif final.code == 421:
            final = self._remote_closing(final)
        self._record(final, size, time.monotonic() - started, remote)
        self._end_transaction()
        return final

    def _record(self, final: Reply, size: int, duration: float, remote: RemoteSession) -> None:
        if final.is_positive_completion:
            self.messages += 1
            self.message_bytes += size
            result = "accepted"
        else:
            result = "deferred" if final.is_transient else "rejected"
        self.log.info("message relayed", result=result, size=size, domain=self.domain,
                      relay=remote.peer, reply=final.text, duration=round(duration, 3))
        self.bus.publish(MessageRelayed(Direction.OUTBOUND, result, size, duration))

    # ----------------------------------------------------------------- ending

    def _end_transaction(self) -> None:
        """Hand the remote back (it gets RSET for reuse or QUIT) and forget the envelope."""
        if self.remote is not None:
            self.release(self.remote, self.remote.connection.alive and not self.sent_ahead)
        self._reset_transaction()

    def _abandon_remote(self) -> None:
        if self.remote is not None:
            self.remote.connection.abort()
        self._reset_transaction()
