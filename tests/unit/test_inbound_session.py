"""The inbound session without sockets: each DESIGN.md invariant as a dialogue."""

from __future__ import annotations

import pytest

from smtproxy.inbound.session import (
    CloseBackend,
    CloseClient,
    Discarded,
    InboundSession,
    InboundSettings,
    MAX_PIPELINED,
    SASL_RESPONSE_LIMIT,
    MessageFinished,
    SendBackend,
    SendClient,
    StartTls,
)

CLIENT = ("192.0.2.7", 40000)
LISTENER = ("192.0.2.1", 25)
BACKEND_EHLO = (
    b"250-backend.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250-STARTTLS\r\n"
    b"250-XCLIENT NAME ADDR\r\n250-XFORWARD NAME\r\n250-AUTH PLAIN LOGIN\r\n250-X-SECRET\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
)


def settings(**overrides) -> InboundSettings:
    values = dict(
        hostname="mx.example.com",
        security_level="may",
        tls_available=True,
        client_identity="none",
    )
    values.update(overrides)
    return InboundSettings(**values)


def to_client(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendClient))


def to_backend(actions) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, SendBackend))


def greeted(**overrides) -> InboundSession:
    session = InboundSession(settings(**overrides), CLIENT, LISTENER)
    session.backend_connected()
    assert to_client(session.backend_data(b"220 backend.example ESMTP\r\n")) == b"220 backend.example ESMTP\r\n"
    return session


def ehloed(**overrides) -> InboundSession:
    session = greeted(**overrides)
    assert to_backend(session.client_data(b"EHLO client.example\r\n")) == b"EHLO client.example\r\n"
    session.backend_data(BACKEND_EHLO)
    return session


def test_ehlo_reply_offers_starttls_and_hides_what_the_proxy_must_not_relay():
    session = greeted()
    session.client_data(b"EHLO client.example\r\n")
    reply = to_client(session.backend_data(BACKEND_EHLO)).decode()
    lines = reply.split("\r\n")
    assert lines[0] == "250-backend.example"
    keywords = [line[4:].split(" ")[0] for line in lines[1:] if line]
    assert "STARTTLS" in keywords and keywords.count("STARTTLS") == 1
    for hidden in ("XCLIENT", "XFORWARD", "AUTH", "X-SECRET"):
        assert hidden not in keywords
    for kept in ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "CHUNKING"):
        assert kept in keywords
    assert "250-SIZE 10240000" in reply  # our limit is smaller than the backend's


def test_no_starttls_offered_at_level_none():
    session = greeted(security_level="none")
    session.client_data(b"EHLO c\r\n")
    assert b"STARTTLS" not in to_client(session.backend_data(BACKEND_EHLO))
    assert to_client(session.client_data(b"STARTTLS\r\n")).startswith(b"502 5.5.1")


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<evil@example.net>\r\n"])
def test_plaintext_pipelined_after_starttls_is_discarded(injected):
    session = ehloed()
    actions = session.client_data(b"STARTTLS\r\n" + injected)
    assert to_backend(actions) == b""
    assert to_client(actions) == b"220 2.0.0 Ready to start TLS\r\n"
    assert Discarded(len(injected)) in actions
    assert isinstance(actions[-1], StartTls)
    # Inside TLS: nothing learned before survives; EHLO is required again.
    actions = session.tls_established(("(using TLSv1.3)",))
    assert to_backend(actions) == b""
    actions = session.client_data(b"MAIL FROM:<a@example.org>\r\n")
    assert to_client(actions).startswith(b"503 5.5.1")
    assert to_backend(actions) == b""


def test_starttls_waits_for_pipelined_replies_before_answering():
    session = ehloed()
    actions = session.client_data(b"NOOP\r\nSTARTTLS\r\n")
    assert to_backend(actions) == b"NOOP\r\n"
    assert to_client(actions) == b""
    actions = session.backend_data(b"250 2.0.0 Ok\r\n")
    assert to_client(actions) == b"250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n"


def test_after_tls_ehlo_shows_auth_and_no_starttls():
    session = ehloed()
    session.client_data(b"STARTTLS\r\n")
    session.tls_established(("(using TLSv1.3)",))
    session.client_data(b"EHLO client.example\r\n")
    reply = to_client(session.backend_data(BACKEND_EHLO))
    assert b"AUTH PLAIN LOGIN" in reply
    assert b"STARTTLS" not in reply


def test_a_backend_without_ehlo_gets_helo_and_the_client_still_gets_starttls():
    session = greeted()
    assert to_backend(session.client_data(b"EHLO client.example\r\n")) == b"EHLO client.example\r\n"
    actions = session.backend_data(b"502 5.5.2 Error: command not recognized\r\n")
    assert to_client(actions) == b"" and to_backend(actions) == b"HELO client.example\r\n"
    reply = to_client(session.backend_data(b"250 backend.example\r\n"))
    assert reply == b"250-backend.example\r\n250 STARTTLS\r\n"
    assert to_client(session.client_data(b"STARTTLS\r\n")).startswith(b"220 ")


def test_a_backend_refusing_helo_too_gives_the_client_its_ehlo_refusal():
    session = greeted()
    session.client_data(b"EHLO client.example\r\n")
    session.backend_data(b"500 5.5.2 unknown\r\n")
    assert to_client(session.backend_data(b"554 5.7.1 go away\r\n")) == b"500 5.5.2 unknown\r\n"


def authenticating(**overrides) -> InboundSession:
    """After STARTTLS and EHLO again: AUTH is offered (auth_only_after_tls)."""
    session = ehloed(**overrides)
    session.client_data(b"STARTTLS\r\n")
    session.tls_established(("(using TLSv1.3)",))
    session.client_data(b"EHLO client.example\r\n")
    session.backend_data(BACKEND_EHLO)
    return session


def test_sasl_responses_go_to_the_backend_as_they_are_until_the_exchange_ends():
    """RFC 4954: after a 334 the next line is a response (empty, "*", or base64 of any
    length up to SASL_RESPONSE_LIMIT), never a command; the exchange ends at any other reply."""
    session = authenticating()
    assert to_backend(session.client_data(b"AUTH LOGIN\r\n")) == b"AUTH LOGIN\r\n"
    assert to_client(session.backend_data(b"334 VXNlcm5hbWU6\r\n")) == b"334 VXNlcm5hbWU6\r\n"
    assert to_backend(session.client_data(b"\r\n")) == b"\r\n"
    session.backend_data(b"334 UGFzc3dvcmQ6\r\n")
    token = b"QUJD" * 2000 + b"\r\n"  # 8,002 bytes: longer than a command line
    assert to_backend(session.client_data(token)) == token
    assert to_client(session.backend_data(b"235 2.7.0 Authentication successful\r\n")).startswith(b"235 ")
    assert to_backend(session.client_data(b"NOOP\r\n")) == b"NOOP\r\n"  # commands again
    assert session.errors == 0


def test_a_command_pipelined_behind_auth_waits_for_its_reply():
    """Until the backend has answered AUTH, a following line may be the response its 334
    asks for: it is held back, as Postfix's smtpd reads it only after the 334."""
    session = authenticating()
    actions = session.client_data(b"AUTH PLAIN\r\nMAIL FROM:<a@x.example>\r\n")
    assert to_backend(actions) == b"AUTH PLAIN\r\n"
    assert session.input_blocked
    actions = session.backend_data(b"535 5.7.8 no\r\n")
    assert to_client(actions) == b"535 5.7.8 no\r\n"
    assert to_backend(actions) == b"MAIL FROM:<a@x.example>\r\n"


def test_a_sasl_response_over_the_limit_cancels_the_exchange_at_the_backend():
    session = authenticating()
    session.client_data(b"AUTH GSSAPI\r\n")
    session.backend_data(b"334 \r\n")
    assert to_backend(session.client_data(b"A" * (SASL_RESPONSE_LIMIT + 10) + b"\r\n")) == b"*\r\n"
    actions = session.backend_data(b"501 5.7.0 Authentication aborted\r\n")
    assert to_client(actions).startswith(b"500 5.5.6 ")
    assert to_backend(session.client_data(b"NOOP\r\n")) == b"NOOP\r\n"


def test_a_backend_closing_at_the_sasl_cancel_is_relayed_and_ends_the_session():
    session = authenticating()
    session.client_data(b"AUTH GSSAPI\r\n")
    session.backend_data(b"334 \r\n")
    session.client_data(b"A" * (SASL_RESPONSE_LIMIT + 10) + b"\r\n")
    actions = session.backend_data(b"421 4.7.0 closing\r\n")
    assert to_client(actions) == b"421 4.7.0 closing\r\n"
    assert session.closed


def test_encrypt_refuses_mail_before_tls():
    session = ehloed(security_level="encrypt")
    actions = session.client_data(b"MAIL FROM:<a@example.org>\r\n")
    assert to_client(actions).startswith(b"530 5.7.0")
    assert to_backend(actions) == b""


def _deliver(session: InboundSession, body: bytes) -> tuple[bytes, list]:
    """MAIL/RCPT/DATA/body through an EHLO'd session; returns backend bytes and actions."""
    sent = to_backend(session.client_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"))
    assert sent == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    actions = session.backend_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n")
    actions += session.client_data(body)
    return to_backend(actions), actions


@pytest.mark.parametrize(("greeting", "protocol"), [(b"EHLO", b"ESMTP"), (b"HELO", b"SMTP")])
def test_the_trace_header_names_the_protocol_the_client_greeted_with(greeting, protocol):
    """RFC 3848 / Postfix: "with SMTP" after HELO, "with ESMTP" after EHLO."""
    session = greeted(client_identity="received-header")
    session.client_data(greeting + b" client.example\r\n")
    session.backend_data(BACKEND_EHLO if greeting == b"EHLO" else b"250 backend.example\r\n")
    sent, _ = _deliver(session, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert b"(smtproxy) with " + protocol + b";" in sent, sent


def test_a_long_non_ascii_helo_name_keeps_the_trace_header_short_and_7bit():
    session = greeted(client_identity="received-header")
    session.client_data(("EHLO " + "\U0001d538" * 300 + "\r\n").encode())
    session.backend_data(BACKEND_EHLO)
    sent, _ = _deliver(session, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    header = sent.split(b"\r\n\r\n", 1)[0]
    assert header.isascii() and all(len(line) <= 998 for line in header.split(b"\r\n")), header[:300]
    assert header.startswith(b"Received: from " + b"?" * 255 + b" (unknown [192.0.2.7])\r\n"), header[:300]


def test_data_gets_trace_header_and_relays_final_reply():
    session = ehloed(client_identity="received-header")
    sent, actions = _deliver(session, b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert sent.startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n")
    assert sent.endswith(b"Subject: hi\r\n\r\nbody\r\n.\r\n")
    assert not any(isinstance(a, MessageFinished) for a in actions)
    actions = session.backend_data(b"250 2.0.0 Ok: queued as ABC\r\n")
    assert to_client(actions) == b"250 2.0.0 Ok: queued as ABC\r\n"
    finished = [a for a in actions if isinstance(a, MessageFinished)]
    assert finished and finished[0].result == "accepted"
    assert session.messages == 1


def test_tls_facts_go_into_the_trace_header():
    session = ehloed()
    session.client_data(b"STARTTLS\r\n")
    session.tls_established(("(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))",))
    session.client_data(b"EHLO client.example\r\n")
    session.backend_data(BACKEND_EHLO)
    sent, _ = _deliver(session, b"x\r\n.\r\n")
    header = sent.split(b"\r\nx\r\n")[0].decode()
    assert "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))" in header
    assert "with ESMTPS;" in header


def test_bare_lf_in_data_never_reaches_the_backend_as_a_message():
    session = ehloed()
    sent, actions = _deliver(session, b"Subject: x\r\n\r\nsmuggled\n.\nMAIL FROM:<x@y>\r\n.\r\n")
    assert b"smuggled" not in sent and b".\r\n" not in sent.split(b"DATA\r\n")[-1]
    assert CloseBackend() in actions
    assert to_client(actions).endswith(b"521 5.5.2 Error: bare <LF> received\r\n")
    assert isinstance(actions[-1], CloseClient)


def test_bare_lf_normalized_is_dot_stuffed_so_end_of_data_agrees():
    session = ehloed(bare_newline="normalize")
    sent, actions = _deliver(session, b"a\n.\nb\r\n.\r\n")
    assert sent.endswith(b"a\r\n..\r\nb\r\n.\r\n")
    assert CloseBackend() not in actions


def test_backend_dies_mid_data_gives_4xx_never_250():
    session = ehloed()
    _, _ = _deliver(session, b"Subject: partial\r\n")
    actions = session.backend_closed()
    reply = to_client(actions)
    assert reply.startswith(b"421 4.4.2")
    assert b"250" not in reply
    assert isinstance(actions[-1], CloseClient) or CloseClient() in actions


def test_client_vanishes_mid_data_closes_backend_without_final_dot():
    session = ehloed()
    sent, _ = _deliver(session, b"Subject: partial\r\n")
    actions = session.client_closed()
    assert CloseBackend() in actions
    assert b".\r\n" not in to_backend(actions)
    assert not sent.endswith(b"\r\n.\r\n")


def test_a_client_that_half_closes_after_the_final_dot_still_gets_the_verdict():
    """Postfix's smtpd answers what it read before the EOF; cut off here, the client would
    send the accepted message again (delivered twice)."""
    session = ehloed()
    sent, _ = _deliver(session, b"Subject: done\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert sent.endswith(b"\r\n.\r\nQUIT\r\n")
    actions = session.client_input_ended()
    assert actions == []  # the backend's replies are still due
    actions = session.backend_data(b"250 2.0.0 Ok: queued as 4F2\r\n221 2.0.0 Bye\r\n")
    assert to_client(actions) == b"250 2.0.0 Ok: queued as 4F2\r\n221 2.0.0 Bye\r\n"
    assert any(isinstance(a, MessageFinished) and a.result == "accepted" for a in actions)
    assert CloseClient() in actions


def test_a_half_close_with_nothing_pending_ends_the_session():
    session = ehloed()
    actions = session.client_input_ended()
    assert CloseClient() in actions and CloseBackend() in actions


def test_a_half_close_mid_data_ends_the_session_without_the_final_dot():
    session = ehloed()
    _deliver(session, b"Subject: partial\r\n")
    actions = session.client_input_ended()
    assert CloseBackend() in actions
    assert CloseClient() in actions  # closed with a linger, like every close: the client may not read
    assert not any(isinstance(a, SendClient) for a in actions)
    assert any(isinstance(a, MessageFinished) and a.result == "failed" for a in actions)


def test_a_half_close_before_data_content_ends_the_session_at_the_354():
    """DATA pipelined, then EOF: the content can never come; the session ends when the 354
    arrives, and the backend gets no final dot."""
    session = ehloed()
    session.client_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
    assert session.client_input_ended() == []
    actions = session.backend_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n")
    assert CloseBackend() in actions and CloseClient() in actions
    assert b".\r\n" not in to_backend(actions)


def test_pipelined_replies_keep_command_order_with_local_refusals():
    session = ehloed()
    actions = session.client_data(b"MAIL FROM:<a@example.org>\r\nXCLIENT ADDR=1.2.3.4\r\nRCPT TO:<b@example.test>\r\n")
    assert to_backend(actions) == b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n"
    assert to_client(actions) == b""  # the local 550 waits for MAIL's reply
    actions = session.backend_data(b"250 2.1.0 Ok\r\n")
    assert to_client(actions) == b"250 2.1.0 Ok\r\n550 5.7.0 Error: insufficient authorization\r\n"
    assert to_client(session.backend_data(b"250 2.1.5 Ok\r\n")) == b"250 2.1.5 Ok\r\n"


def test_over_long_command_line_gets_500_and_the_session_continues():
    session = ehloed()
    actions = session.client_data(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert to_client(actions) == b"500 5.5.2 Error: line too long\r\n"
    assert to_backend(actions) == b"NOOP\r\n"


def test_too_many_errors_disconnects():
    session = ehloed(max_errors=3)
    actions = session.client_data(b"XFORWARD a\r\n" * 3)
    assert to_client(actions).endswith(b"421 4.7.0 mx.example.com Error: too many errors\r\n")
    assert CloseClient() in actions


def test_http_on_the_smtp_port_is_dropped():
    session = greeted()
    actions = session.client_data(b"GET / HTTP/1.1\r\n")
    assert to_client(actions).startswith(b"221 2.7.0")
    assert CloseClient() in actions


def test_a_deep_pipeline_is_read_a_bounded_batch_at_a_time():
    """1,000 pipelined NOOPs: at most MAX_PIPELINED are in flight (and reading from the
    client pauses); each batch of replies lets the next batch out; every reply in order."""
    session = ehloed()
    actions = session.client_data(b"".join(b"NOOP %d\r\n" % i for i in range(1000)))
    sent = to_backend(actions)
    assert sent.count(b"NOOP") == MAX_PIPELINED and session.input_blocked
    replies = b""
    while sent:
        actions = session.backend_data(b"".join(b"250 2.0.0 Ok %s\r\n" % line.split(b" ")[1]
                                                for line in sent.splitlines()))
        replies += to_client(actions)
        sent = to_backend(actions)
        assert sent.count(b"NOOP") <= MAX_PIPELINED
    assert replies == b"".join(b"250 2.0.0 Ok %d\r\n" % i for i in range(1000))
    assert not session.input_blocked


def test_421_to_data_closes_the_session_like_421_to_any_command():
    session = ehloed()
    session.client_data(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n")
    actions = session.backend_data(b"250 ok\r\n250 ok\r\n421 4.3.2 shutting down\r\n")
    assert to_client(actions).endswith(b"421 4.3.2 shutting down\r\n")
    assert any(isinstance(a, CloseClient) for a in actions) and any(isinstance(a, CloseBackend) for a in actions)
    assert session.closed


def test_backend_unreachable_or_refusing_gives_421_4_3_0():
    session = InboundSession(settings(), CLIENT, LISTENER)
    actions = session.backend_failed()
    assert to_client(actions).startswith(b"421 4.3.0")
    session = InboundSession(settings(), CLIENT, LISTENER)
    session.backend_connected()
    actions = session.backend_data(b"421 4.3.2 busy\r\n")
    assert to_client(actions).startswith(b"421 4.3.0")
    assert CloseClient() in actions


@pytest.mark.parametrize("identity, prefix", [
    ("proxy-v1", b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\n"),
    ("proxy-v2", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c"),
])
def test_proxy_protocol_header_goes_first(identity, prefix):
    session = InboundSession(settings(client_identity=identity), CLIENT, LISTENER)
    assert to_backend(session.backend_connected()).startswith(prefix)


def xclient_greeted() -> InboundSession:
    """client_identity = "xclient": the backend greeted, our EHLO sent (its reply is next)."""
    session = InboundSession(settings(client_identity="xclient"), CLIENT, LISTENER)
    session.backend_connected()
    actions = session.backend_data(b"220 backend ESMTP\r\n")
    assert to_backend(actions) == b"EHLO mx.example.com\r\n"
    assert to_client(actions) == b""
    return session


def test_xclient_is_sent_when_the_backend_offers_it_and_its_greeting_relayed():
    session = xclient_greeted()
    actions = session.backend_data(b"250-backend\r\n250 XCLIENT NAME ADDR PORT HELO\r\n")
    assert to_backend(actions) == b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7 PORT=40000\r\n"
    actions = session.backend_data(b"220 backend ESMTP again\r\n")
    assert to_client(actions) == b"220 backend ESMTP again\r\n"


def test_xclient_sends_only_the_attributes_the_backend_announced():
    session = xclient_greeted()
    actions = session.backend_data(b"250-backend\r\n250 XCLIENT NAME ADDR\r\n")
    assert to_backend(actions) == b"XCLIENT NAME=[UNAVAILABLE] ADDR=192.0.2.7\r\n"


def test_an_xclient_keyword_without_the_attributes_we_send_is_not_used():
    session = xclient_greeted()
    actions = session.backend_data(b"250-backend\r\n250 XCLIENT HELO\r\n")
    assert to_backend(actions) == b""
    assert to_client(actions) == b"220 mx.example.com ESMTP\r\n"


def test_a_refused_xclient_is_a_backend_failure_not_the_clients_greeting():
    """Only 220 or 554 may greet a client (RFC 5321 4.3.2): the backend's 501 to our
    XCLIENT becomes 421 4.3.0, as any backend that cannot be used."""
    session = xclient_greeted()
    session.backend_data(b"250-backend\r\n250 XCLIENT NAME ADDR PORT HELO\r\n")
    actions = session.backend_data(b"501 5.5.4 Bad command parameter syntax\r\n")
    reply = to_client(actions)
    assert reply.startswith(b"421 4.3.0 ") and b"501" in reply and b"5.5.4" not in reply, reply
    assert any(isinstance(a, CloseClient) for a in actions) and any(isinstance(a, CloseBackend) for a in actions)


def test_bdat_is_framed_by_count_and_carries_the_trace_header():
    session = ehloed(client_identity="received-header")
    session.client_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
    session.backend_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    actions = session.client_data(b"BDAT 7 LAST\r\nhi\n.\r\nQUIT\r\n")
    sent = to_backend(actions)
    first_line, rest = sent.split(b"\r\n", 1)
    header_len = rest.index(b"hi\n.\r\n")
    assert first_line == f"BDAT {7 + header_len} LAST".encode()
    assert rest.endswith(b"hi\n.\r\nQUIT\r\n")
    actions = session.backend_data(b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n")
    assert to_client(actions) == b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
    assert [a.result for a in actions if isinstance(a, MessageFinished)] == ["accepted"]


def test_trace_header_goes_into_the_first_of_several_bdat_chunks():
    session = ehloed(client_identity="received-header")
    session.client_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
    session.backend_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    first = to_backend(session.client_data(b"BDAT 6\r\nhello "))
    line, rest = first.split(b"\r\n", 1)
    assert rest.startswith(b"Received: from client.example (unknown [192.0.2.7])\r\n"), first
    assert line == f"BDAT {len(rest)}".encode() and rest.endswith(b"hello ")
    session.backend_data(b"250 2.0.0 Ok\r\n")
    second = to_backend(session.client_data(b"BDAT 7 LAST\r\nworld\r\n"))
    assert second == b"BDAT 7 LAST\r\nworld\r\n"  # one header per message, not per chunk
    actions = session.backend_data(b"250 2.0.0 Ok: queued\r\n")
    assert [(a.result, a.size) for a in actions if isinstance(a, MessageFinished)] == [("accepted", 13)]


@pytest.mark.parametrize("read_size", [1, 16, 128, 4096])
def test_same_backend_stream_at_every_read_size(read_size):
    stream = (
        b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n"
    )
    body = b"Subject: seg\r\n\r\n..leading dot\r\nline\r\n.\r\nQUIT\r\n"
    session = greeted()
    sent = b""
    for i in range(0, len(stream), read_size):
        sent += to_backend(session.client_data(stream[i : i + read_size]))
    assert sent == stream
    session.backend_data(BACKEND_EHLO + b"250 ok\r\n250 ok\r\n354 go\r\n")
    for i in range(0, len(body), read_size):
        sent += to_backend(session.client_data(body[i : i + read_size]))
    assert sent == stream + body


def test_bdat_refused_locally_swallows_its_chunk_and_leaves_no_phantom_pending():
    session = greeted()
    session.client_data(b"EHLO c\r\n")
    session.backend_data(b"250-backend\r\n250 PIPELINING\r\n")  # no CHUNKING
    session.client_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
    session.backend_data(b"250 ok\r\n250 ok\r\n")
    actions = session.client_data(b"BDAT 6 LAST\r\nDATA\r\n")
    assert to_client(actions) == b"502 5.5.1 Error: command not implemented\r\n"
    assert to_backend(actions) == b""  # the six bytes "DATA\r\n" were the chunk, not a command
    actions = session.client_data(b"DATA\r\n")
    assert to_backend(actions) == b"DATA\r\n"
    assert to_client(session.backend_data(b"354 go\r\n")) == b"354 go\r\n"


def test_a_chunk_over_the_size_limit_fails_the_whole_message():
    """RFC 3030: once a chunk is refused, so are the rest of the message's chunks, LAST
    included; the backend's RSET drops the chunks it already holds, so a truncated message
    is never completed there. The session goes on."""
    session = ehloed(max_message_size=1000)
    actions = session.client_data(b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\n"
                                  b"BDAT 600\r\n" + b"A" * 600 + b"BDAT 600\r\n" + b"B" * 600
                                  + b"BDAT 10 LAST\r\n" + b"C" * 10)
    sent = to_backend(actions)
    assert sent.endswith(b"A" * 600 + b"RSET\r\n") and b"BB" not in sent and b"CC" not in sent and b"LAST" not in sent
    replies = session.backend_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 600 bytes\r\n250 2.0.0 Ok\r\n")
    assert to_client(replies) == (b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 600 bytes\r\n"
                                  + b"552 5.3.4 Error: message file too big\r\n" * 2)
    assert not [a for a in replies if isinstance(a, MessageFinished) and a.result == "accepted"]
    # the next message of the session is relayed as usual
    sent = to_backend(session.client_data(b"MAIL FROM:<a@x.example>\r\n"))
    assert sent == b"MAIL FROM:<a@x.example>\r\n"
    assert to_client(session.backend_data(b"250 2.1.0 Ok\r\n")) == b"250 2.1.0 Ok\r\n"


def test_data_is_streamed_to_the_backend_before_the_final_dot():
    session = ehloed()
    line = b"x" * 998 + b"\r\n"
    sent, _ = _deliver(session, b"Subject: big\r\n\r\n")
    total = len(sent)  # (a trailing CRLF is held back: it might begin the end-of-data)
    for _ in range(200):  # 200 kB in, never a final dot: every complete line already left
        forwarded = to_backend(session.client_data(line))
        total += len(forwarded)
        assert forwarded, "a complete line was held back"
        assert not session.input_blocked
    assert total >= len(b"Subject: big\r\n\r\n") + 199 * len(line)
    assert to_backend(session.client_data(b".\r\n")).endswith(b"\r\n.\r\n")


def test_bdat_chunk_is_streamed_before_it_is_complete():
    session = ehloed()
    session.client_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.test>\r\n")
    session.backend_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    sent = to_backend(session.client_data(b"BDAT 100000 LAST\r\n" + b"y" * 40000))
    assert sent.startswith(b"BDAT 100000 LAST\r\n") and sent.endswith(b"y" * 40000)
    # the backend cannot answer a chunk it has not got: the wait is the client's, not the backend's
    assert not session.awaiting_backend
    assert to_backend(session.client_data(b"y" * 60000)) == b"y" * 60000
    assert session.awaiting_backend


# ----------------------------------------------------------------- replies that end the session
# (found by a hypothesis fuzzer of this session: each ending must come after the replies due)

MESSAGE = b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n"


def in_data(**overrides) -> InboundSession:
    session = ehloed(**overrides)
    session.client_data(MESSAGE)
    session.backend_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    return session


@pytest.mark.parametrize(("after_the_dot", "ending"), [
    (b"GET / HTTP/1.0\r\n", b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"),
    (b"\r\n\r\n\r\n", b"500 5.5.2 Error: bad syntax\r\n" * 2 + b"421 4.7.0 mx.example.com Error: too many errors\r\n"),
    (b"BDAT x\r\n", b"501 5.5.4 Syntax: BDAT count [LAST]\r\n"),
])
def test_the_verdict_on_a_message_comes_before_the_reply_that_ends_the_session(after_the_dot, ending):
    """The backend already holds the message: cut off without its verdict, the client
    would send it again (delivered twice)."""
    session = in_data(max_errors=3)
    actions = session.client_data(b"hello\r\n.\r\n" + after_the_dot)
    assert to_backend(actions) == b"hello\r\n.\r\n" and to_client(actions) == b""
    assert not session.closed and session.input_blocked  # nothing more is read
    actions = session.backend_data(b"250 2.0.0 queued\r\n")
    assert to_client(actions) == b"250 2.0.0 queued\r\n" + ending
    assert any(isinstance(a, CloseClient) for a in actions) and session.closed


def test_a_chunk_refused_at_the_error_limit_leaves_the_session_closed():
    session = ehloed(max_errors=1)
    actions = session.client_data(b"BDAT 3 LAST\r\nabc")
    assert to_client(actions).startswith(b"421 4.7.0 ") and session.closed
    assert session.client_data(b"EHLO c\r\n") == []


def test_many_refused_chunks_in_one_read_are_handled_without_recursion():
    session = greeted(max_errors=1000)
    session.client_data(b"EHLO c\r\n")
    session.backend_data(b"250-backend\r\n250 PIPELINING\r\n")  # no CHUNKING: each BDAT gets 502
    replies = to_client(session.client_data(b"BDAT 0\r\n" * 300))
    assert replies.count(b"502 5.5.1 ") == 300


def test_a_421_to_the_helo_instead_of_ehlo_is_relayed_and_ends_the_session():
    session = greeted()
    session.client_data(b"EHLO client.example\r\n")
    session.backend_data(b"500 5.5.2 unknown\r\n")
    actions = session.backend_data(b"421 4.3.2 shutting down\r\n")
    assert to_client(actions) == b"421 4.3.2 shutting down\r\n" and session.closed


def test_a_backend_that_asks_on_after_the_sasl_cancel_ends_the_session():
    """RFC 4954 wants 501 to "*": a 334 means the backend would take the client's next
    command for a SASL response, while the client was told the exchange is over."""
    session = authenticating()
    session.client_data(b"AUTH GSSAPI\r\n")
    session.backend_data(b"334 \r\n")
    session.client_data(b"A" * (SASL_RESPONSE_LIMIT + 10) + b"\r\n")
    actions = session.backend_data(b"334 go on\r\n")
    assert to_client(actions).startswith(b"421 4.4.2 ") and session.closed
