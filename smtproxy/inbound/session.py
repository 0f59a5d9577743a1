"""The inbound proxy session as protocol logic only (no sockets, no event loop).

The shell (`inbound.server`) feeds it what happened — bytes from the client (already
decrypted), bytes from the backend, TLS up, a side closed — and executes the actions it
returns: send to client, send to backend, start TLS, close.  Every decision the proxy
takes about SMTP lives here, so each invariant of DESIGN.md is testable without a socket.

Ordering: with PIPELINING the client sends several commands before any reply.  Every
command becomes one `_Pending` entry, answered either by the backend (in order) or locally
(a refusal); replies leave strictly in command order.  DATA and STARTTLS are
synchronisation points: nothing after them is parsed until their turn comes.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
from collections.abc import Callable

from smtproxy.inbound import identity
from smtproxy.smtp import (
    LINE_TOO_LONG,
    ChunkReader,
    Command,
    DataError,
    DataScanner,
    EhloReply,
    LineReader,
    LineTooLong,
    PeerProtocolError,
    Reply,
    ReplyParser,
    ServerSession,
    SessionPolicy,
    SmtpState,
    parse_bdat,
    parse_command,
    too_many_errors,
)

# Extensions relayed from the backend's EHLO reply; everything else is hidden because the
# proxy would not relay it correctly (or must not, like XCLIENT/XFORWARD/STARTTLS).
RELAYED_EXTENSIONS = (
    "PIPELINING",
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "DSN",
    "ENHANCEDSTATUSCODES",
    "AUTH",
    "CHUNKING",
    "BINARYMIME",
    "VRFY",
    "ETRN",
)


@dataclasses.dataclass(frozen=True, slots=True)
class SendClient:
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class SendBackend:
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class StartTls:
    """Send nothing more in plaintext; the next client bytes are a TLS ClientHello."""


@dataclasses.dataclass(frozen=True, slots=True)
class CloseBackend:
    """Close the backend connection now, sending nothing more (no final dot)."""


@dataclasses.dataclass(frozen=True, slots=True)
class CloseClient:
    """Close the client connection after what was already queued for it."""


@dataclasses.dataclass(frozen=True, slots=True)
class MessageFinished:
    result: str  # accepted | rejected | deferred | failed
    size: int
    duration: float


@dataclasses.dataclass(frozen=True, slots=True)
class Discarded:
    """Plaintext that followed STARTTLS and was thrown away (CVE-2011-0411)."""

    size: int


Action = SendClient | SendBackend | StartTls | CloseBackend | CloseClient | MessageFinished | Discarded


class _Kind(enum.Enum):
    LOCAL = "local"  # answered by the proxy
    RELAY = "relay"  # backend reply relayed as it is
    EHLO = "ehlo"  # backend reply rewritten
    DATA = "data"  # expects 354
    DATA_END = "data-end"  # final reply after the content
    BDAT = "bdat"
    INTERNAL = "internal"  # the proxy's own command (an RSET); reply swallowed
    HELO_FOR_EHLO = "helo-for-ehlo"  # our HELO after the backend refused the client's EHLO
    AUTH = "auth"  # AUTH, or a SASL response line: a 334 asks for (another) response
    SASL_CANCEL = "sasl-cancel"  # "*" in place of a response too long; the client gets a 500


@dataclasses.dataclass(slots=True)
class _Pending:
    kind: _Kind
    command: Command | None
    reply: Reply | None = None
    last_chunk: bool = False
    size: int = 0  # message bytes, on the entry whose reply ends a message
    started: float = 0.0  # when that message began
    refusal: Reply | None = None  # HELO_FOR_EHLO: the backend's refusal of the EHLO
    closes: bool = False  # LOCAL: the session ends once this reply is out


class _Mode(enum.Enum):
    COMMANDS = "commands"
    DATA = "data"
    BDAT = "bdat"
    HANDSHAKE = "handshake"
    CLOSED = "closed"


class _Backend(enum.Enum):
    CONNECTING = "connecting"
    GREETING = "greeting"  # waiting for the backend's 220
    IDENTIFY_EHLO = "identify-ehlo"  # our EHLO, to see whether XCLIENT is offered
    IDENTIFY_XCLIENT = "identify-xclient"  # XCLIENT sent; its reply is the new greeting
    READY = "ready"
    GONE = "gone"


@dataclasses.dataclass(frozen=True, slots=True)
class InboundSettings:
    """The per-connection view of `[inbound]` the session needs."""

    hostname: str
    security_level: str  # none | may | encrypt, already resolved for this client
    tls_available: bool
    client_identity: str
    auth_only_after_tls: bool = True
    bare_newline: str = "reject"
    max_message_size: int = 10240000
    max_command_line: int = 2048
    max_reply_line: int = 2048
    max_text_line: int = 0
    max_errors: int = 20


# The longest SASL response line taken (Postfix's smtpd_sasl_response_limit): GSSAPI
# tokens are far longer than a command line.
SASL_RESPONSE_LIMIT = 12288

# Commands read ahead of their replies (RFC 2920 pipelining). Past this many, the client's
# further commands wait in the socket: each reply is matched against the pending commands,
# so an unbounded pipeline would cost quadratic CPU and unbounded memory.
MAX_PIPELINED = 100

_DATA_ERROR_REPLIES = {
    DataError.BARE_LF: Reply.of(521, "5.5.2", "Error: bare <LF> received"),
    DataError.BARE_CR: Reply.of(521, "5.5.2", "Error: bare <CR> received"),
    DataError.LINE_TOO_LONG: Reply.of(521, "5.5.2", "Error: message line too long"),
    DataError.TOO_BIG: Reply.of(552, "5.3.4", "Error: message file too big"),
}


class InboundSession:
    def __init__(
        self,
        settings: InboundSettings,
        client_addr: tuple[str, int],
        server_addr: tuple[str, int],
        *,
        implicit_tls: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.client_addr = client_addr
        self.server_addr = server_addr
        self._clock = clock
        tls_offered = settings.tls_available and settings.security_level != "none"
        self.smtp = ServerSession(
            SessionPolicy(
                tls_offered=tls_offered and not implicit_tls,
                tls_required=settings.security_level == "encrypt",
                auth_only_after_tls=settings.auth_only_after_tls,
                max_message_size=settings.max_message_size,
                chunking=True,
            )
        )
        self._tls_offered = tls_offered and not implicit_tls
        self._reader = LineReader(settings.max_command_line)
        self._replies = ReplyParser(settings.max_reply_line)
        self._pending: collections.deque[_Pending] = collections.deque()
        self._mode = _Mode.HANDSHAKE if implicit_tls else _Mode.COMMANDS
        self._backend = _Backend.CONNECTING
        self._greeting: Reply | None = None
        self._greeted_client = False
        self._blocked_on_starttls = False
        self._input_ended = False  # the client half-closed: see client_input_ended
        self._blocked_on_data_reply = False
        self._blocked_on_auth = False  # AUTH or a SASL response awaits the backend's reply
        self._closing = False  # a reply that ends the session is queued: read nothing more
        self._sasl_response_due = False  # the backend said 334: the next line is a response
        self._backend_chunking = False
        self._scanner: DataScanner | None = None
        self._data_error: DataError | None = None
        self._chunk: ChunkReader | None = None
        self._chunk_forwarded = True
        self._bdat_total = 0
        self._bdat_refusal: Reply | None = None  # a chunk of this message was refused: so are the rest
        self._message_started = 0.0
        self._helo: str | None = None
        self._helo_verb: str | None = None  # EHLO or HELO, whichever the client greeted with
        self._tls_clauses: tuple[str, ...] = ()
        self.tls_active = False
        self.messages = 0
        self.message_bytes = 0
        self.errors = 0

    # ----------------------------------------------------------------- events in

    def backend_connected(self) -> list[Action]:
        self._backend = _Backend.GREETING
        if self.settings.client_identity == "proxy-v1":
            return [SendBackend(identity.proxy_v1_header(self.client_addr, self.server_addr))]
        if self.settings.client_identity == "proxy-v2":
            return [SendBackend(identity.proxy_v2_header(self.client_addr, self.server_addr))]
        return []

    def backend_failed(self) -> list[Action]:
        """The backend could not be reached or greeted: 421 4.3.0 and close."""
        self._backend = _Backend.GONE
        return self._fail(Reply.of(421, "4.3.0", f"{self.settings.hostname} Service not available"))

    def backend_data(self, data: bytes) -> list[Action]:
        if self._backend is _Backend.GONE:
            return []
        self._replies.feed(data)
        actions: list[Action] = []
        while self._mode is not _Mode.CLOSED:
            try:
                reply = self._replies.next_reply()
            except PeerProtocolError:
                self._backend = _Backend.GONE
                actions += self._fail(self._backend_lost_reply(), close_backend=True)
                break
            if reply is None:
                break
            actions += self._backend_reply(reply)
        if self._mode is _Mode.COMMANDS:
            actions += self._process_commands()  # those held back by a full pipeline
        return actions + self._end_if_input_answered()

    def backend_closed(self) -> list[Action]:
        if self._backend is _Backend.GONE or self._mode is _Mode.CLOSED:
            self._backend = _Backend.GONE
            return []
        self._backend = _Backend.GONE
        return self._fail(self._backend_lost_reply())

    def client_data(self, data: bytes) -> list[Action]:
        if self._mode is _Mode.CLOSED:
            return []
        if self._mode is _Mode.DATA:
            return self._feed_data(data)
        if self._mode is _Mode.BDAT:
            actions = self._feed_chunk(data)
            return actions + self._process_commands() if self._mode is _Mode.COMMANDS else actions
        self._reader.feed(data)
        return self._process_commands()

    def client_closed(self) -> list[Action]:
        mid_message = self._mode in (_Mode.DATA, _Mode.BDAT) or self.smtp.state in (
            SmtpState.MAIL,
            SmtpState.RCPT,
            SmtpState.BDAT,
        )
        self._mode = _Mode.CLOSED
        actions: list[Action] = []
        if mid_message and self._message_started:
            actions.append(MessageFinished("failed", self._message_size(), self._elapsed()))
            self._message_started = 0.0
        if self._backend is not _Backend.GONE:
            self._backend = _Backend.GONE
            actions.append(CloseBackend())
        return actions

    def client_input_ended(self) -> list[Action]:
        """The client half-closed (EOF, or TLS close_notify): nothing more will come, but
        what it sent is still answered before the session ends. A client that sent the
        final dot and QUIT and then shut its side down must get the backend's verdict on
        the message: cut off, it would send the message again, delivered twice. Mid-message
        or mid-handshake the rest can never come: the session ends as if the client left."""
        self._input_ended = True
        return self._end_if_input_answered()

    def _end_if_input_answered(self) -> list[Action]:
        if not self._input_ended or self._mode is _Mode.CLOSED:
            return []
        if self._mode is not _Mode.COMMANDS:  # mid-message or mid-handshake: the rest cannot come
            return self.client_closed() + [CloseClient()]
        if self._pending or not self._greeted_client:
            return []
        return self._close()

    def tls_established(self, tls_clauses: tuple[str, ...], refusal: str | None = None) -> list[Action]:
        """The handshake finished; `refusal` is set when policy rejects the client cert."""
        self.tls_active = True
        self._tls_clauses = tls_clauses
        self.smtp.tls_started()
        self._helo = self._helo_verb = None
        self._mode = _Mode.COMMANDS
        if refusal is not None:
            return self._fail(Reply.of(421, "4.7.1", f"{self.settings.hostname} Error: {refusal}"))
        actions: list[Action] = []
        if not self._greeted_client:
            actions += self._maybe_greet_client()
        return actions + self._process_commands()

    def timed_out(self) -> list[Action]:
        return self._fail(Reply.of(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))

    @property
    def backend_greeted(self) -> bool:
        """The backend's greeting (and our identification of the client) is over."""
        return self._backend in (_Backend.READY, _Backend.GONE)

    def backend_timed_out(self) -> list[Action]:
        if not self.backend_greeted:
            return self._fail(Reply.of(421, "4.3.0", f"{self.settings.hostname} Service not available"),
                              close_backend=True)
        return self._fail(
            Reply.of(421, "4.4.2", f"{self.settings.hostname} Error: backend did not answer in time"),
            close_backend=True,
        )

    # ----------------------------------------------------------------- state

    @property
    def closed(self) -> bool:
        return self._mode is _Mode.CLOSED

    @property
    def input_blocked(self) -> bool:
        """True while client bytes must wait (DATA's reply, STARTTLS's turn, greeting, a
        full pipeline), or will never be read (the session is ending)."""
        if self._mode is _Mode.HANDSHAKE:
            return False
        return (
            self._blocked_on_data_reply
            or self._blocked_on_auth
            or self._blocked_on_starttls
            or not self._greeted_client
            or self._closing
            or self._mode is _Mode.CLOSED
            or len(self._pending) >= MAX_PIPELINED
        )

    @property
    def awaiting_backend(self) -> bool:
        """A reply is due from the backend. Not while a BDAT chunk is still arriving: the
        backend answers once it has all of it, so that time is the client's (its idle
        timer), as during DATA's content."""
        if self._mode is _Mode.BDAT:
            return False
        return self._backend is not _Backend.READY or any(p.reply is None and p.kind is not _Kind.LOCAL for p in self._pending)

    @property
    def awaiting_message_end(self) -> bool:
        """A reply due from the backend is the final one for a message (after the final dot
        or BDAT LAST): it may take a content scan's time, and so may the replies pipelined
        before it, which a backend like Postfix sends together with it."""
        return any(entry.reply is None and (entry.kind is _Kind.DATA_END or entry.kind is _Kind.BDAT and entry.last_chunk)
                   for entry in self._pending)

    # ----------------------------------------------------------------- backend replies

    def _backend_reply(self, reply: Reply) -> list[Action]:
        if self._backend is _Backend.GREETING:
            return self._on_backend_greeting(reply)
        if self._backend is _Backend.IDENTIFY_EHLO:
            return self._on_identify_ehlo(reply)
        if self._backend is _Backend.IDENTIFY_XCLIENT:
            return self._on_identify_xclient(reply)
        for entry in self._pending:
            if entry.reply is None and entry.kind is not _Kind.LOCAL:
                entry.reply = reply
                break
        else:
            return []  # an unsolicited reply: ignore it
        return self._flush()

    def _on_backend_greeting(self, reply: Reply) -> list[Action]:
        if reply.code != 220:
            return self._refuse_greeting(reply)
        if self.settings.client_identity == "xclient":
            self._backend = _Backend.IDENTIFY_EHLO
            return [SendBackend(f"EHLO {self.settings.hostname}\r\n".encode())]
        return self._backend_ready(reply)

    def _on_identify_ehlo(self, reply: Reply) -> list[Action]:
        ehlo = EhloReply.parse(reply) if reply.code == 250 else None
        offered = frozenset(ehlo.capabilities.get("XCLIENT", "").upper().split()) if ehlo else frozenset()
        if not offered & {"NAME", "ADDR", "PORT"}:  # no XCLIENT, or none of what we would say
            self._backend = _Backend.READY
            self._greeting = Reply.of(220, None, f"{self.settings.hostname} ESMTP")
            return [*self._maybe_greet_client(), *self._process_commands()]
        self._backend = _Backend.IDENTIFY_XCLIENT
        return [SendBackend(identity.xclient_command(*self.client_addr, offered=offered))]

    def _on_identify_xclient(self, reply: Reply) -> list[Action]:
        if reply.code != 220:
            # the backend's answer to our XCLIENT is no greeting for the client (only 220 or
            # 554 may be, RFC 5321 4.3.2): a backend problem, as any other
            return self._fail(Reply.of(421, "4.3.0", f"{self.settings.hostname} Service not available "
                                                     f"(backend refused XCLIENT: {reply.code})"),
                              close_backend=True)
        return self._backend_ready(reply)

    def _backend_ready(self, greeting: Reply) -> list[Action]:
        self._backend = _Backend.READY
        self._greeting = greeting
        return [*self._maybe_greet_client(), *self._process_commands()]

    def _refuse_greeting(self, reply: Reply) -> list[Action]:
        self._backend = _Backend.GONE
        if reply.is_permanent:
            return self._fail(reply, close_backend=True)
        return self._fail(Reply.of(421, "4.3.0", f"{self.settings.hostname} Service not available"), close_backend=True)

    def _maybe_greet_client(self) -> list[Action]:
        if self._greeted_client or self._greeting is None or self._mode is _Mode.HANDSHAKE:
            return []
        self._greeted_client = True
        return [SendClient(self._greeting.serialize())]

    def _flush(self) -> list[Action]:
        """Deliver replies at the head of the queue, strictly in command order."""
        actions: list[Action] = []
        while self._pending and self._pending[0].reply is not None and self._mode is not _Mode.CLOSED:
            entry = self._pending.popleft()
            actions += self._deliver(entry)
        if self._blocked_on_starttls and not self._pending and self._mode is not _Mode.CLOSED:
            actions += self._start_tls()
        return actions

    def _deliver(self, entry: _Pending) -> list[Action]:
        reply = entry.reply
        assert reply is not None
        kind, command = entry.kind, entry.command
        if kind is _Kind.LOCAL:
            return self._send_local(reply) + (self._close() if entry.closes else [])
        if kind is _Kind.AUTH or kind is _Kind.SASL_CANCEL:
            return self._auth_reply(entry, reply)
        assert command is not None
        if kind is _Kind.INTERNAL:
            self.smtp.on_reply(command, reply)
            return []
        if kind is _Kind.DATA:
            if reply.code == 354:
                return [SendClient(reply.serialize()), *self._begin_data()]
            self._blocked_on_data_reply = False
            self.smtp.on_reply(command, reply)
            if reply.code == 421:  # the backend is closing (RFC 5321 3.8): so does the session
                return [SendClient(reply.serialize()), *self._close()]
            return [SendClient(reply.serialize()), *self._process_commands()]
        if kind is _Kind.EHLO and reply.code in (500, 502) and not self._pending:
            return self._helo_instead(command, reply)
        if kind is _Kind.HELO_FOR_EHLO and reply.code != 421:
            reply = self._ehlo_from_helo(reply) if reply.code == 250 else entry.refusal or reply
        self.smtp.on_reply(command, reply)
        if kind is _Kind.EHLO and reply.code == 250:
            reply = self._rewrite_ehlo(reply)
        actions: list[Action] = [SendClient(reply.serialize())]
        if kind is _Kind.DATA_END or (kind is _Kind.BDAT and (entry.last_chunk or not reply.is_positive_completion)):
            actions.append(self._message_finished(reply, entry))
        if command.verb == "QUIT" or reply.code == 421:
            actions += self._close()
        return actions

    def _auth_reply(self, entry: _Pending, reply: Reply) -> list[Action]:
        """The backend's answer to AUTH or to a SASL response. After a 334 the client's
        next line is the response (RFC 4954), whatever it looks like: relayed as it is,
        never read as a command (an empty line is a valid response)."""
        if entry.command is not None:
            self.smtp.on_reply(entry.command, reply)
        if entry.kind is _Kind.SASL_CANCEL and reply.code == 334:
            # RFC 4954 wants 501 to "*": a backend that asks on is out of step with the
            # client, which hears that the exchange is over
            return self._fail(self._backend_lost_reply(), close_backend=True)
        self._blocked_on_auth = False
        self._sasl_response_due = reply.code == 334
        if entry.kind is _Kind.SASL_CANCEL and reply.code != 421:
            reply = Reply.of(500, "5.5.6", "Error: authentication exchange line is too long")
        actions: list[Action] = [SendClient(reply.serialize())]
        if reply.code == 421:
            return actions + self._close()
        return actions + self._process_commands()

    def _on_sasl_response(self, line: bytes | LineTooLong) -> list[Action]:
        self._sasl_response_due = False
        self._blocked_on_auth = True
        if line is LINE_TOO_LONG:
            self._pending.append(_Pending(_Kind.SASL_CANCEL, None))
            return [SendBackend(b"*\r\n")]  # RFC 4954: the client cancels the exchange
        self._pending.append(_Pending(_Kind.AUTH, None))
        return [SendBackend(line)]

    def _helo_instead(self, ehlo: Command, refusal: Reply) -> list[Action]:
        """A backend that knows no EHLO (some appliances) would leave the client without
        STARTTLS, and under `encrypt` without a way to send at all: it gets HELO, and the
        client an EHLO reply made from its answer (see `_ehlo_from_helo`)."""
        self._pending.append(_Pending(_Kind.HELO_FOR_EHLO, ehlo, refusal=refusal))
        return [SendBackend(b"HELO " + ehlo.arg.strip().encode("utf-8", "surrogateescape") + b"\r\n")]

    def _ehlo_from_helo(self, helo: Reply) -> Reply:
        """The backend's HELO reply as an EHLO reply with STARTTLS only (where offered):
        no extension the backend itself lacks, since what the client uses goes on to it."""
        ehlo = EhloReply.parse(Reply(250, helo.lines[:1]))
        self._backend_chunking = False
        if self._tls_offered and not self.tls_active:
            ehlo.set("STARTTLS")
        return ehlo.to_reply()

    def _rewrite_ehlo(self, reply: Reply) -> Reply:
        ehlo = EhloReply.parse(reply)
        self._backend_chunking = ehlo.has("CHUNKING")
        for keyword in ehlo.keywords():
            if keyword not in RELAYED_EXTENSIONS:
                ehlo.remove(keyword)
        if self.settings.auth_only_after_tls and not self.tls_active:
            ehlo.remove("AUTH")
        if not self._backend_chunking:
            ehlo.remove("BINARYMIME")
        backend_size = ehlo.capabilities.get("SIZE", "")
        limit = self.settings.max_message_size
        if not backend_size.isdigit() or int(backend_size) == 0 or int(backend_size) > limit:
            ehlo.set("SIZE", str(limit))
        if self._tls_offered and not self.tls_active:
            ehlo.set("STARTTLS")
        return ehlo.to_reply()

    def _message_finished(self, reply: Reply, entry: _Pending) -> MessageFinished:
        size = entry.size
        if not reply.is_positive_completion and entry.kind is _Kind.BDAT:
            self._bdat_total = 0
        if reply.is_positive_completion:
            result = "accepted"
            self.messages += 1
            self.message_bytes += size
        elif reply.is_transient:
            result = "deferred"
        else:
            result = "rejected"
        return MessageFinished(result, size, self._clock() - entry.started)

    # ----------------------------------------------------------------- client commands

    def _process_commands(self) -> list[Action]:
        actions: list[Action] = []
        while self._mode is _Mode.COMMANDS and not self.input_blocked:
            if self._sasl_response_due:
                response = self._reader.next_line(SASL_RESPONSE_LIMIT)
                if response is None:
                    break
                actions += self._on_sasl_response(response)
                continue
            line = self._reader.next_line()
            if line is None:
                break
            if line is LINE_TOO_LONG:
                actions += self._answer_locally(Reply.of(500, "5.5.2", "Error: line too long"))
                continue
            try:
                command = parse_command(line)
            except PeerProtocolError as exc:
                actions += self._answer_locally(exc.reply)
                continue
            actions += self._on_command(command)
        return actions

    def _on_command(self, command: Command) -> list[Action]:
        if command.verb == "BDAT":
            return self._on_bdat(command)
        self._bdat_refusal = None  # the client moved on from the refused message
        refusal = self.smtp.check(command)
        if refusal is not None:
            return self._answer_locally(refusal)
        verb = command.verb
        if verb == "STARTTLS":
            self._blocked_on_starttls = True
            return self._flush()
        if verb in ("EHLO", "HELO"):
            self._helo, self._helo_verb = command.arg.strip() or None, verb
            self._pending.append(_Pending(_Kind.EHLO if verb == "EHLO" else _Kind.RELAY, command))
        elif verb == "DATA":
            self._blocked_on_data_reply = True
            self._pending.append(_Pending(_Kind.DATA, command))
        elif verb == "AUTH":
            self._blocked_on_auth = True  # what follows may be a SASL response, not a command
            self._pending.append(_Pending(_Kind.AUTH, command))
        else:
            if verb == "MAIL":
                self._bdat_total = 0
            self._pending.append(_Pending(_Kind.RELAY, command))
        return [SendBackend(command.raw)]

    def _on_bdat(self, command: Command) -> list[Action]:
        try:
            size, last = parse_bdat(command.arg)
        except PeerProtocolError as exc:
            # Without a size the chunk cannot be framed: nothing sane can follow.
            return self._goodbye(exc.reply)
        # Judged before check(), which moves the expected state to BDAT for a non-LAST chunk.
        first_chunk = not self._bdat_total and self.smtp.expected_state is not SmtpState.BDAT
        # The proxy's own refusals come first: once check() accepts, the command is pending.
        refusal = None
        actions: list[Action] = []
        if not self._backend_chunking:
            refusal = Reply.of(502, "5.5.1", "Error: command not implemented")
        elif self._bdat_refusal is not None:
            refusal = self._bdat_refusal
        elif self.settings.max_message_size and self._bdat_total + size > self.settings.max_message_size:
            refusal = self._bdat_refusal = Reply.of(552, "5.3.4", "Error: message file too big")
            actions = self._abandon_bdat_message()
        if refusal is None:
            refusal = self.smtp.check(command)
        if refusal is not None:
            if last:
                self._bdat_refusal = None
            actions += self._answer_locally(refusal)
            if self._closing:  # that was the error too many: its chunk is never read
                return actions
            self._start_chunk(size, forward=False)
            return actions + self._feed_chunk(self._reader.take_buffer())
        header = b""
        if first_chunk:
            header = self._trace_header()
            self._message_started = self._clock()
        self._bdat_total += size
        self._pending.append(
            _Pending(_Kind.BDAT, command, last_chunk=last, size=self._bdat_total, started=self._message_started)
        )
        if last:
            self._bdat_total = 0
            self._message_started = 0.0
        wire_size = size + len(header)
        line = f"BDAT {wire_size}{' LAST' if last else ''}\r\n".encode("ascii")
        self._start_chunk(size, forward=True)
        return [SendBackend(line + header), *self._feed_chunk(self._reader.take_buffer())]

    def _abandon_bdat_message(self) -> list[Action]:
        """A chunk of this message is refused here, so the message must never complete at
        the backend (RFC 3030: the rest of its chunks are refused too, LAST included). An
        RSET of our own drops the transaction there, with the chunks it already holds."""
        self._bdat_total = 0
        self._message_started = 0.0
        rset = parse_command(b"RSET\r\n")
        if self.smtp.check(rset) is not None:
            return []
        self._pending.append(_Pending(_Kind.INTERNAL, rset))
        return [SendBackend(rset.raw)]

    def _start_chunk(self, size: int, *, forward: bool) -> None:
        self._chunk = ChunkReader(size)
        self._chunk_forwarded = forward
        self._mode = _Mode.BDAT

    def _feed_chunk(self, data: bytes) -> list[Action]:
        assert self._chunk is not None
        payload, rest, done = self._chunk.feed(data)
        actions: list[Action] = []
        if payload and self._chunk_forwarded:
            actions.append(SendBackend(payload))
        if done:  # the caller reads on: the command loop, or client_data
            self._chunk = None
            self._mode = _Mode.COMMANDS
            self._reader.feed(rest)
            actions += self._flush()
        return actions

    def _answer_locally(self, reply: Reply) -> list[Action]:
        self.errors += 1
        if reply.code == 221:
            return self._goodbye(reply)
        if self.errors >= self.settings.max_errors:
            return self._goodbye(too_many_errors(self.settings.hostname))
        self._pending.append(_Pending(_Kind.LOCAL, None, reply))
        return self._flush()

    def _goodbye(self, reply: Reply) -> list[Action]:
        """A reply that ends the session (221 to HTTP on the SMTP port, 421 at max_errors,
        a BDAT that cannot be framed) goes out after the replies still due, in command
        order: the verdict on a message the backend already holds must reach the client,
        or it sends the message again. Nothing more is read meanwhile."""
        self._closing = True
        self._pending.append(_Pending(_Kind.LOCAL, None, reply, closes=True))
        return self._flush()

    def _send_local(self, reply: Reply) -> list[Action]:
        return [SendClient(reply.serialize())]


    # ----------------------------------------------------------------- STARTTLS

    def _start_tls(self) -> list[Action]:
        leftover = self._reader.take_buffer()
        self._mode = _Mode.HANDSHAKE
        self._blocked_on_starttls = False
        actions: list[Action] = [SendClient(Reply.of(220, "2.0.0", "Ready to start TLS").serialize())]
        if leftover:
            actions.append(Discarded(len(leftover)))
        actions.append(StartTls())
        return actions

    # ----------------------------------------------------------------- DATA

    def _begin_data(self) -> list[Action]:
        self._blocked_on_data_reply = False
        self._mode = _Mode.DATA
        self._message_started = self._clock()
        self._data_error = None
        self._scanner = DataScanner(
            self.settings.bare_newline, self.settings.max_message_size, self.settings.max_text_line
        )
        actions: list[Action] = []
        header = self._trace_header()
        if header:
            actions.append(SendBackend(header))
        return actions + self._feed_data(self._reader.take_buffer())

    def _feed_data(self, data: bytes) -> list[Action]:
        assert self._scanner is not None
        if not data:
            return []
        scan = self._scanner.feed(data)
        actions: list[Action] = []
        if scan.error is not None and self._data_error is None:
            # Abort the backend mid-message: without the final dot it delivers nothing.
            self._data_error = scan.error
            self._backend = _Backend.GONE
            actions.append(CloseBackend())
        elif scan.forward and self._data_error is None:
            actions.append(SendBackend(scan.forward))
        if not scan.done:
            return actions
        self._mode = _Mode.COMMANDS
        if self._data_error is not None:
            reply = _DATA_ERROR_REPLIES[self._data_error]
            actions.append(MessageFinished("rejected", self._scanner.size, self._elapsed()))
            return actions + self._fail(reply)
        self._pending.append(
            _Pending(
                _Kind.DATA_END,
                Command("DATA", "", b"DATA\r\n"),
                size=self._scanner.size,
                started=self._message_started,
            )
        )
        self._message_started = 0.0
        self._reader.feed(scan.rest)
        return actions + self._process_commands()

    def _trace_header(self) -> bytes:
        if self.settings.client_identity != "received-header" and not self.tls_active:
            return b""
        protocol = ("ESMTP" if self._helo_verb == "EHLO" else "SMTP") + ("S" if self.tls_active else "")
        return identity.received_header(
            helo=self._helo,
            client_addr=self.client_addr[0],
            by_host=self.settings.hostname,
            protocol=protocol,
            tls_clauses=self._tls_clauses,
        )

    def _message_size(self) -> int:
        """Bytes of the message being received right now."""
        if self._mode is _Mode.DATA and self._scanner is not None:
            return self._scanner.size
        return self._bdat_total

    def _elapsed(self) -> float:
        return self._clock() - self._message_started if self._message_started else 0.0

    # ----------------------------------------------------------------- endings

    def _backend_lost_reply(self) -> Reply:
        return Reply.of(421, "4.4.2", f"{self.settings.hostname} Error: backend connection lost")

    def _fail(self, reply: Reply, *, close_backend: bool = False) -> list[Action]:
        """Answer `reply` now (out of order is fine: the session ends) and close."""
        if self._mode is _Mode.CLOSED:
            return []
        actions: list[Action] = []
        if self._message_started and self._mode in (_Mode.DATA, _Mode.BDAT):
            actions.append(MessageFinished("deferred" if reply.is_transient else "rejected", self._message_size(), self._elapsed()))
        if self._mode is _Mode.HANDSHAKE and not self.tls_active:
            # Nothing can be said to a client that is mid-handshake; just close.
            return actions + self._close()
        actions.append(SendClient(reply.serialize()))
        if close_backend and self._backend is not _Backend.GONE:
            self._backend = _Backend.GONE
            actions.append(CloseBackend())
        return actions + self._close()

    def _close(self) -> list[Action]:
        self._mode = _Mode.CLOSED
        actions: list[Action] = [CloseClient()]
        if self._backend is not _Backend.GONE:
            self._backend = _Backend.GONE
            actions.append(CloseBackend())
        return actions
