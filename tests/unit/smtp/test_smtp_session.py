"""ServerSession: every refusal, every transition, pipelining, STARTTLS reset."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtproxy.smtp import Reply, ServerSession, SessionPolicy, SmtpState, parse_command

OK = Reply(250, ("2.0.0 Ok",))
OPEN = SessionPolicy(tls_offered=True, tls_required=False)


def cmd(text: str):
    return parse_command(text.encode() + b"\r\n")


def run(session: ServerSession, text: str, reply: Reply = OK) -> None:
    """Check a command, expect it allowed, and answer it."""
    command = cmd(text)
    assert session.check(command) is None, text
    session.on_reply(command, reply)


def session_in(state: SmtpState, policy: SessionPolicy = OPEN, *, tls: bool = False) -> ServerSession:
    session = ServerSession(policy)
    if tls:
        run(session, "EHLO c")
        assert session.check(cmd("STARTTLS")) is None
        session.tls_started()
    steps = {
        SmtpState.NEED_HELO: [],
        SmtpState.READY: ["EHLO c"],
        SmtpState.MAIL: ["EHLO c", "MAIL FROM:<a@x>"],
        SmtpState.RCPT: ["EHLO c", "MAIL FROM:<a@x>", "RCPT TO:<b@y>"],
        SmtpState.BDAT: ["EHLO c", "MAIL FROM:<a@x>", "RCPT TO:<b@y>", "BDAT 10"],
    }[state]
    for step in steps:
        run(session, step)
    assert session.state is state and session.expected_state is state and session.pending == 0
    return session


def refused(session: ServerSession, text: str) -> tuple[int, str]:
    errors = session.errors
    reply = session.check(cmd(text))
    assert reply is not None, f"{text} was allowed"
    assert session.errors == errors + 1
    return reply.code, reply.text


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("text", ["MAIL FROM:<a@x>", "RCPT TO:<b@y>", "DATA", "BDAT 1 LAST"])
def test_transaction_commands_need_a_greeting(text):
    assert refused(session_in(SmtpState.NEED_HELO), text) == (503, "5.5.1 Error: send HELO/EHLO first")


@pytest.mark.parametrize("text", ["MAIL FROM:<a@x>", "VRFY a", "AUTH PLAIN", "ETRN x", "FOO", "DATA"])
def test_tls_required_blocks_all_but_the_pre_tls_commands(text):
    session = session_in(SmtpState.READY, SessionPolicy(tls_offered=True, tls_required=True))
    assert refused(session, text) == (530, "5.7.0 Must issue a STARTTLS command first")


@pytest.mark.parametrize("text", ["EHLO c", "HELO c", "NOOP", "RSET", "HELP", "QUIT", "STARTTLS"])
def test_tls_required_allows_the_pre_tls_commands(text):
    session = session_in(SmtpState.READY, SessionPolicy(tls_offered=True, tls_required=True))
    assert session.check(cmd(text)) is None


def test_tls_required_is_satisfied_after_tls():
    session = session_in(SmtpState.READY, SessionPolicy(tls_offered=True, tls_required=True), tls=True)
    assert session.tls_active
    assert session.check(cmd("MAIL FROM:<a@x>")) is None


def test_auth_only_after_tls():
    assert refused(session_in(SmtpState.READY), "AUTH PLAIN") == (530, "5.7.0 Must issue a STARTTLS command first")
    assert session_in(SmtpState.READY, tls=True).check(cmd("AUTH PLAIN")) is None
    lax = SessionPolicy(tls_offered=True, tls_required=False, auth_only_after_tls=False)
    assert session_in(SmtpState.READY, lax).check(cmd("AUTH PLAIN")) is None


@pytest.mark.parametrize(
    ("session", "text", "expected"),
    [
        (lambda: session_in(SmtpState.READY), "STARTTLS now", (501, "5.5.4 Syntax: STARTTLS")),
        (
            lambda: session_in(SmtpState.READY, SessionPolicy(False, False)),
            "STARTTLS",
            (502, "5.5.1 Error: command not implemented"),
        ),
        (lambda: session_in(SmtpState.READY, tls=True), "STARTTLS", (554, "5.5.1 Error: TLS already active")),
        (lambda: session_in(SmtpState.MAIL), "STARTTLS", (503, "5.5.1 Error: MAIL transaction in progress")),
        (lambda: session_in(SmtpState.RCPT), "STARTTLS", (503, "5.5.1 Error: MAIL transaction in progress")),
        (lambda: session_in(SmtpState.BDAT), "STARTTLS", (503, "5.5.1 Error: MAIL transaction in progress")),
    ],
)
def test_starttls_refusals(session, text, expected):
    assert refused(session(), text) == expected


def test_starttls_is_allowed_before_ehlo():
    assert session_in(SmtpState.NEED_HELO).check(cmd("STARTTLS")) is None


@pytest.mark.parametrize("state", [SmtpState.MAIL, SmtpState.RCPT, SmtpState.BDAT])
def test_nested_mail(state):
    assert refused(session_in(state), "MAIL FROM:<c@x>") == (503, "5.5.1 Error: nested MAIL command")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("MAIL FROM:a b@x", (501, "5.5.4 Syntax: MAIL FROM:<address>")),
        ("MAIL FROM:<a@x> SIZE=big", (501, "5.5.4 Bad message size syntax")),
        ("MAIL FROM:<a@x> SIZE", (501, "5.5.4 Bad message size syntax")),
        ("MAIL FROM:<a@x> SIZE=1001", (552, "5.3.4 Message size exceeds fixed limit")),
    ],
)
def test_mail_refusals(text, expected):
    policy = SessionPolicy(tls_offered=True, tls_required=False, max_message_size=1000)
    assert refused(session_in(SmtpState.READY, policy), text) == expected


def test_mail_size_within_limit_or_unlimited():
    policy = SessionPolicy(tls_offered=True, tls_required=False, max_message_size=1000)
    assert session_in(SmtpState.READY, policy).check(cmd("MAIL FROM:<a@x> SIZE=1000")) is None
    assert session_in(SmtpState.READY).check(cmd("MAIL FROM:<a@x> SIZE=99999999999")) is None


def test_rcpt_refusals():
    assert refused(session_in(SmtpState.READY), "RCPT TO:<b@y>") == (503, "5.5.1 Error: need MAIL command")
    assert refused(session_in(SmtpState.MAIL), "RCPT TO:b c@y") == (501, "5.5.4 Syntax: RCPT TO:<address>")
    assert refused(session_in(SmtpState.BDAT), "RCPT TO:<c@y>") == (503, "5.5.1 Error: RCPT after BDAT")


def test_data_refusals():
    assert refused(session_in(SmtpState.READY), "DATA") == (503, "5.5.1 Error: need RCPT command")
    assert refused(session_in(SmtpState.MAIL), "DATA") == (503, "5.5.1 Error: need RCPT command")
    assert refused(session_in(SmtpState.RCPT), "DATA now") == (501, "5.5.4 Syntax: DATA")
    assert refused(session_in(SmtpState.BDAT), "DATA") == (503, "5.5.1 Error: DATA after BDAT")


def test_bdat_refusals():
    no_chunking = SessionPolicy(tls_offered=True, tls_required=False, chunking=False)
    assert refused(session_in(SmtpState.RCPT, no_chunking), "BDAT 1 LAST") == (
        502,
        "5.5.1 Error: command not implemented",
    )
    assert refused(session_in(SmtpState.MAIL), "BDAT 1 LAST") == (503, "5.5.1 Error: need RCPT command")
    assert refused(session_in(SmtpState.RCPT), "BDAT x") == (501, "5.5.4 Syntax: BDAT count [LAST]")


@pytest.mark.parametrize("text", ["XCLIENT ADDR=1.2.3.4", "XFORWARD NAME=x", "xclient NAME=spoofed"])
def test_xclient_and_xforward_are_never_relayed(text):
    assert refused(session_in(SmtpState.READY), text) == (550, "5.7.0 Error: insufficient authorization")


@pytest.mark.parametrize(
    "text", ["GET / HTTP/1.1", "POST /x HTTP/1.0", "CONNECT a:25 HTTP/1.1", "USER bob", "PASS secret"]
)
def test_other_protocols_end_the_session(text):
    session = session_in(SmtpState.READY)
    assert refused(session, text) == (221, "2.7.0 Error: I can break rules, too. Goodbye.")
    assert session.state is SmtpState.CLOSED and session.expected_state is SmtpState.CLOSED


@pytest.mark.parametrize("text", ["EHLO c", "HELO c", "RSET", "NOOP", "QUIT", "VRFY a", "HELP", "FROB x", "ETRN x"])
def test_everything_else_goes_to_the_backend(text):
    session = session_in(SmtpState.READY, tls=True)
    assert session.check(cmd(text)) is None
    assert session.pending == 1 and session.errors == 0


def test_nothing_is_relayed_after_quit():
    session = session_in(SmtpState.READY)
    assert session.check(cmd("QUIT")) is None
    assert session.expected_state is SmtpState.CLOSED
    assert refused(session, "NOOP")[0] == 503


# ---------------------------------------------------------------------------- transitions


def test_a_whole_data_transaction():
    session = session_in(SmtpState.RCPT)
    run(session, "RCPT TO:<c@y>")
    assert session.state is SmtpState.RCPT
    run(session, "DATA")  # final reply after the content; the 354 is never passed
    assert session.state is SmtpState.READY


def test_bdat_chunks():
    session = session_in(SmtpState.BDAT)
    run(session, "BDAT 5")
    assert session.state is SmtpState.BDAT
    run(session, "BDAT 0 LAST", Reply(451, ("4.3.0 try later",)))
    assert session.state is SmtpState.READY


def test_failed_bdat_aborts_the_transaction():
    session = session_in(SmtpState.RCPT)
    run(session, "BDAT 5", Reply(552, ("5.3.4 too big",)))
    assert session.state is SmtpState.READY


@pytest.mark.parametrize("state", [SmtpState.MAIL, SmtpState.RCPT, SmtpState.BDAT, SmtpState.READY])
def test_rset_returns_to_ready(state):
    session = session_in(state)
    run(session, "RSET")
    assert session.state is SmtpState.READY


def test_rset_does_not_greet():
    session = session_in(SmtpState.NEED_HELO)
    run(session, "RSET")
    assert session.state is SmtpState.NEED_HELO


def test_ehlo_in_a_transaction_resets_it():
    session = session_in(SmtpState.RCPT)
    run(session, "EHLO again")
    assert session.state is SmtpState.READY


@pytest.mark.parametrize("text", ["EHLO c", "HELO c", "MAIL FROM:<a@x>"])
def test_rejections_leave_the_state_alone(text):
    session = session_in(SmtpState.READY if text.startswith("MAIL") else SmtpState.NEED_HELO)
    before = session.state
    run(session, text, Reply(550, ("5.7.1 no",)))
    assert session.state is before


def test_rejected_rcpt_keeps_mail():
    session = session_in(SmtpState.MAIL)
    run(session, "RCPT TO:<nobody@y>", Reply(550, ("5.1.1 unknown",)))
    assert session.state is SmtpState.MAIL


def test_quit_and_421_close():
    session = session_in(SmtpState.READY)
    run(session, "QUIT", Reply(221, ("2.0.0 Bye",)))
    assert session.state is SmtpState.CLOSED
    session = session_in(SmtpState.RCPT)
    run(session, "RCPT TO:<c@y>", Reply(421, ("4.3.2 shutting down",)))
    assert session.state is SmtpState.CLOSED


def test_tls_started_forgets_everything():
    session = session_in(SmtpState.READY)
    assert session.check(cmd("STARTTLS")) is None
    assert session.pending == 1 and session.expected_state is SmtpState.NEED_HELO
    # Plaintext pipelined behind STARTTLS is judged as if TLS had started (the caller drops it anyway).
    assert refused(session, "MAIL FROM:<a@x>") == (503, "5.5.1 Error: send HELO/EHLO first")
    session.tls_started()
    assert session.tls_active and session.pending == 0
    assert session.state is session.expected_state is SmtpState.NEED_HELO
    assert refused(session, "MAIL FROM:<a@x>") == (503, "5.5.1 Error: send HELO/EHLO first")


# ---------------------------------------------------------------------------- pipelining


def test_pipelined_transaction_is_checked_against_the_expected_state():
    session = session_in(SmtpState.NEED_HELO, tls=True)
    commands = [cmd(t) for t in ("EHLO c", "MAIL FROM:<a@x>", "RCPT TO:<b@y>", "RCPT TO:<c@y>", "DATA")]
    for command in commands:
        assert session.check(command) is None
    assert session.pending == 5
    assert session.state is SmtpState.NEED_HELO and session.expected_state is SmtpState.READY
    for command in commands[:3]:
        session.on_reply(command, OK)
    assert session.state is SmtpState.RCPT and session.pending == 2


def test_failed_pipelined_command_corrects_the_expected_state():
    session = session_in(SmtpState.READY)
    mail, rcpt = cmd("MAIL FROM:<a@x>"), cmd("RCPT TO:<b@y>")
    assert session.check(mail) is None and session.check(rcpt) is None
    assert session.expected_state is SmtpState.RCPT
    session.on_reply(mail, Reply(550, ("5.7.1 sender refused",)))
    assert session.state is SmtpState.READY and session.expected_state is SmtpState.READY
    assert refused(session, "DATA") == (503, "5.5.1 Error: need RCPT command")


def test_local_refusals_are_not_pending():
    session = session_in(SmtpState.READY)
    assert session.check(cmd("DATA")) is not None
    assert session.pending == 0


# ---------------------------------------------------------------------------- robustness

verbs = st.sampled_from(
    ["EHLO c", "HELO c", "MAIL FROM:<a@x>", "MAIL FROM:<a@x> SIZE=5000", "RCPT TO:<b@y>", "DATA", "BDAT 3",
     "BDAT 0 LAST", "RSET", "NOOP", "QUIT", "STARTTLS", "AUTH PLAIN", "XCLIENT A=1", "GET /", "FOO", "MAIL x"]
)
replies = st.sampled_from(
    [OK, Reply(221, ("bye",)), Reply(354, ("go",)), Reply(421, ("4.3.2 bye",)), Reply(451, ("x",)), Reply(550, ("x",))]
)


@settings(max_examples=300, deadline=None)
@given(script=st.lists(st.tuples(verbs, st.booleans(), replies), max_size=25),
       tls_required=st.booleans(), chunking=st.booleans())
def test_any_dialogue_keeps_the_books_straight(script, tls_required, chunking):
    """Random commands, replies arriving at random times: counters and states stay coherent."""
    session = ServerSession(SessionPolicy(True, tls_required, max_message_size=1000, chunking=chunking))
    waiting: list = []
    allowed = refusals = 0
    for text, answer_now, reply in script:
        command = cmd(text)
        if session.check(command) is None:
            allowed += 1
            waiting.append(command)
        else:
            refusals += 1
        if answer_now and waiting:
            session.on_reply(waiting.pop(0), reply)
        assert session.pending == len(waiting) and session.errors == refusals
        if not waiting:
            assert session.expected_state is session.state
