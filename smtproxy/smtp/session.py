"""The server side of an SMTP session as a state machine (no I/O).

With PIPELINING a client sends several commands before the first reply returns.  The
*confirmed* state moves only on replies; each new command is judged against the
*expected* state: the confirmed one with every pending command assumed to succeed.
Transitions live in one table, `_TRANSITIONS`; replies are first reduced to an `_Event`.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import re

from smtproxy.smtp.commands import Command, parse_bdat, parse_mail_from, parse_rcpt_to
from smtproxy.smtp.errors import PeerProtocolError
from smtproxy.smtp.replies import Reply


class SmtpState(enum.Enum):
    NEED_HELO = "need-helo"  # connected, or TLS just started: EHLO/HELO required
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # MAIL accepted
    RCPT = "rcpt"  # at least one RCPT accepted
    BDAT = "bdat"  # at least one non-LAST BDAT chunk accepted
    CLOSED = "closed"


class _Event(enum.Enum):
    GREETED = "greeted"
    MAIL_ACCEPTED = "mail-accepted"
    RCPT_ACCEPTED = "rcpt-accepted"
    CHUNK_ACCEPTED = "chunk-accepted"
    MESSAGE_ENDED = "message-ended"  # DATA's final reply, BDAT LAST, or a failed BDAT
    RESET = "reset"
    TLS_STARTING = "tls-starting"
    CLOSING = "closing"  # QUIT, or a 421 to anything


_S = SmtpState
_OPEN = (_S.NEED_HELO, _S.READY, _S.MAIL, _S.RCPT, _S.BDAT)
_TRANSACTION = (_S.MAIL, _S.RCPT, _S.BDAT)

# (verb, reply was 2xx) → event; BDAT with LAST is keyed "BDAT LAST".  Missing: no event.
_EVENTS: dict[tuple[str, bool], _Event] = {
    ("EHLO", True): _Event.GREETED,
    ("HELO", True): _Event.GREETED,
    ("MAIL", True): _Event.MAIL_ACCEPTED,
    ("RCPT", True): _Event.RCPT_ACCEPTED,
    ("DATA", True): _Event.MESSAGE_ENDED,
    ("DATA", False): _Event.MESSAGE_ENDED,
    ("BDAT", True): _Event.CHUNK_ACCEPTED,
    ("BDAT", False): _Event.MESSAGE_ENDED,
    ("BDAT LAST", True): _Event.MESSAGE_ENDED,
    ("BDAT LAST", False): _Event.MESSAGE_ENDED,
    ("RSET", True): _Event.RESET,
    ("STARTTLS", True): _Event.TLS_STARTING,
    ("QUIT", True): _Event.CLOSING,
    ("QUIT", False): _Event.CLOSING,
}

# (state, event) → next state.  Missing: the state does not change.
_TRANSITIONS: dict[tuple[SmtpState, _Event], SmtpState] = {
    **{(state, _Event.GREETED): _S.READY for state in _OPEN},
    (_S.READY, _Event.MAIL_ACCEPTED): _S.MAIL,
    (_S.MAIL, _Event.RCPT_ACCEPTED): _S.RCPT,
    (_S.RCPT, _Event.RCPT_ACCEPTED): _S.RCPT,
    (_S.RCPT, _Event.CHUNK_ACCEPTED): _S.BDAT,
    (_S.BDAT, _Event.CHUNK_ACCEPTED): _S.BDAT,
    **{(state, _Event.MESSAGE_ENDED): _S.READY for state in _TRANSACTION},
    **{(state, _Event.RESET): _S.READY for state in (_S.READY, *_TRANSACTION)},
    (_S.NEED_HELO, _Event.TLS_STARTING): _S.NEED_HELO,
    (_S.READY, _Event.TLS_STARTING): _S.NEED_HELO,
    **{(state, _Event.CLOSING): _S.CLOSED for state in _OPEN},
}

# Other protocols spoken to the SMTP port (Postfix's smtpd_forbidden_commands).
_FORBIDDEN = frozenset({"CONNECT", "GET", "POST", "USER", "PASS"})
_BEFORE_TLS = frozenset({"EHLO", "HELO", "STARTTLS", "NOOP", "QUIT", "RSET", "HELP"})
_NEED_GREETING = frozenset({"MAIL", "RCPT", "DATA", "BDAT"})
_SIZE = re.compile("[0-9]{1,20}")


GOODBYE = Reply.of(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
MUST_STARTTLS = Reply.of(530, "5.7.0", "Must issue a STARTTLS command first")
NOT_IMPLEMENTED = Reply.of(502, "5.5.1", "Error: command not implemented")


def too_many_errors(hostname: str) -> Reply:
    """The reply that ends a session at its error limit (Postfix's smtpd_hard_error_limit)."""
    return Reply.of(421, "4.7.0", f"{hostname} Error: too many errors")
NEED_RCPT = Reply.of(503, "5.5.1", "Error: need RCPT command")


@dataclasses.dataclass(frozen=True, slots=True)
class SessionPolicy:
    tls_offered: bool
    tls_required: bool
    auth_only_after_tls: bool = True
    max_message_size: int = 0  # 0: no limit
    chunking: bool = True


def _advance(state: SmtpState, command: Command, reply: Reply) -> SmtpState:
    if reply.code == 421:
        event: _Event | None = _Event.CLOSING
    else:
        event = _EVENTS.get((_verb_key(command), reply.is_positive_completion))
    return state if event is None else _TRANSITIONS.get((state, event), state)


def _verb_key(command: Command) -> str:
    if command.verb == "BDAT" and command.arg.upper().split()[1:] == ["LAST"]:
        return "BDAT LAST"
    return command.verb


_ASSUMED_SUCCESS = Reply(250, ("",))


class ServerSession:
    """Judges client commands and follows the far side's replies.

    Protocol for the caller, per command: `check(cmd)`; a Reply means "answer this
    locally" (the command is not pending and counts in `errors`); None means "forward it"
    and the command is now pending until `on_reply(cmd, reply)` reports the far side's
    reply, in command order.  STARTTLS is the exception: the caller answers it and calls
    `tls_started()` after the handshake, which clears it.

    DATA: do NOT pass the 354 to `on_reply`.  Pass either the rejection of the DATA
    command or, after the content, the final reply; both end the transaction here (after
    a rejected DATA the backend may still hold its envelope: a later MAIL then gets the
    backend's own 503, and EHLO/RSET reset both sides).

    BDAT: when `check` refuses a BDAT, the client still sends the chunk; the caller must
    read and drop its `size` bytes (see `parse_bdat`) before reading the next command.
    """

    def __init__(self, policy: SessionPolicy) -> None:
        self.policy = policy
        self._tls_active = False
        self._state = SmtpState.NEED_HELO
        self._expected = SmtpState.NEED_HELO
        self._pending: collections.deque[Command] = collections.deque()
        self._errors = 0

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def state(self) -> SmtpState:
        """The state confirmed by the replies received so far."""
        return self._state

    @property
    def expected_state(self) -> SmtpState:
        """The state once every pending command has succeeded."""
        return self._expected

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def errors(self) -> int:
        return self._errors

    def check(self, cmd: Command) -> Reply | None:
        refusal = self._refusal(cmd)
        if refusal is None:
            self._pending.append(cmd)
            self._expected = _advance(self._expected, cmd, _ASSUMED_SUCCESS)
            return None
        self._errors += 1
        if refusal is GOODBYE:
            self._state = self._expected = SmtpState.CLOSED
        return refusal

    def on_reply(self, cmd: Command, reply: Reply) -> None:
        """The far side answered the oldest pending command (see the class docstring)."""
        if self._pending:
            self._pending.popleft()
        self._state = _advance(self._state, cmd, reply)
        self._expected = self._state
        for pending in self._pending:
            self._expected = _advance(self._expected, pending, _ASSUMED_SUCCESS)

    def tls_started(self) -> None:
        """The STARTTLS handshake completed: everything said before is forgotten."""
        self._tls_active = True
        self._state = self._expected = SmtpState.NEED_HELO
        self._pending.clear()

    # ------------------------------------------------------------------ the rules

    def _refusal(self, cmd: Command) -> Reply | None:
        verb, expected, policy = cmd.verb, self._expected, self.policy
        if verb in _FORBIDDEN:
            return GOODBYE
        if expected is SmtpState.CLOSED:
            return Reply.of(503, "5.5.1", "Error: session is closing")
        if verb in ("XCLIENT", "XFORWARD"):
            return Reply.of(550, "5.7.0", "Error: insufficient authorization")
        if not self._tls_active and (
            (policy.tls_required and verb not in _BEFORE_TLS) or (verb == "AUTH" and policy.auth_only_after_tls)
        ):
            return MUST_STARTTLS
        if verb == "STARTTLS":
            return self._starttls_refusal(cmd)
        if verb in _NEED_GREETING and expected is SmtpState.NEED_HELO:
            return Reply.of(503, "5.5.1", "Error: send HELO/EHLO first")
        rule = _RULES.get(verb)
        return rule(self, cmd) if rule else None

    def _starttls_refusal(self, cmd: Command) -> Reply | None:
        if cmd.arg.strip(" "):
            return Reply.of(501, "5.5.4", "Syntax: STARTTLS")
        if not self.policy.tls_offered:
            return NOT_IMPLEMENTED
        if self._tls_active:
            return Reply.of(554, "5.5.1", "Error: TLS already active")
        if self._expected in _TRANSACTION:
            return Reply.of(503, "5.5.1", "Error: MAIL transaction in progress")
        return None

    def _mail_refusal(self, cmd: Command) -> Reply | None:
        if self._expected in _TRANSACTION:
            return Reply.of(503, "5.5.1", "Error: nested MAIL command")
        try:
            _, params = parse_mail_from(cmd.arg)
        except PeerProtocolError as exc:
            return exc.reply
        size = params.get("SIZE", "0")
        if size is None or not _SIZE.fullmatch(size):
            return Reply.of(501, "5.5.4", "Bad message size syntax")
        limit = self.policy.max_message_size
        if limit and int(size) > limit:
            return Reply.of(552, "5.3.4", "Message size exceeds fixed limit")
        return None

    def _rcpt_refusal(self, cmd: Command) -> Reply | None:
        if self._expected is SmtpState.BDAT:
            return Reply.of(503, "5.5.1", "Error: RCPT after BDAT")
        if self._expected not in (SmtpState.MAIL, SmtpState.RCPT):
            return Reply.of(503, "5.5.1", "Error: need MAIL command")
        try:
            parse_rcpt_to(cmd.arg)
        except PeerProtocolError as exc:
            return exc.reply
        return None

    def _data_refusal(self, cmd: Command) -> Reply | None:
        if self._expected is SmtpState.BDAT:
            return Reply.of(503, "5.5.1", "Error: DATA after BDAT")
        if self._expected is not SmtpState.RCPT:
            return NEED_RCPT
        if cmd.arg.strip(" "):
            return Reply.of(501, "5.5.4", "Syntax: DATA")
        return None

    def _bdat_refusal(self, cmd: Command) -> Reply | None:
        if not self.policy.chunking:
            return NOT_IMPLEMENTED
        if self._expected not in (SmtpState.RCPT, SmtpState.BDAT):
            return NEED_RCPT
        try:
            parse_bdat(cmd.arg)
        except PeerProtocolError as exc:
            return exc.reply
        return None


_RULES = {
    "MAIL": ServerSession._mail_refusal,
    "RCPT": ServerSession._rcpt_refusal,
    "DATA": ServerSession._data_refusal,
    "BDAT": ServerSession._bdat_refusal,
}
