"""Issue 7 acceptance, relay robustness and routing: many messages to two destinations,
a remote that injects replies around STARTTLS, remotes and MTAs that vanish mid-DATA, the
reply mapping of DESIGN.md invariant 1, bare LF (invariant 3), and MX routing through
smtproxy against a real Unbound.

Peers: ``smtp-source`` as the legacy MTA sending many messages, :class:`RawSmtpClient` as
an MTA driven byte by byte, real Postfix and ``smtp-sink`` as remote MX hosts, a real
Unbound serving the test zones. Where the point of a test is a remote that misbehaves on
purpose (replies injected after STARTTLS, dying in the middle of DATA) a small scripted
server (:class:`ScriptedRemote`) plays the remote: no real MTA misbehaves on demand.
Every assertion is on what the MTA was told, what the remote received, and smtproxy's log.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.peers import (
    LOOPBACK,
    Conversation,
    RawSmtpClient,
    Reply,
    SmtpSink,
    flood_without_reading,
    free_port,
    listening_on,
    wait_until,
)
from tests.integration.outbound_peers import OutboundProxy

pytestmark = pytest.mark.integration

SENDER = "sender@example.test"


def token() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- helpers


def open_session(proxy: OutboundProxy) -> RawSmtpClient:
    """An MTA session on the proxy, greeted, EHLO done."""
    mta = RawSmtpClient(proxy.port, timeout=30.0)
    assert mta.read_reply().code == 220
    assert mta.ehlo("legacy.example.test").code == 250
    return mta


def message(marker: str, body: bytes = b"hello\r\n") -> bytes:
    """Headers with `marker` in the Subject, then `body`; the caller adds the final dot."""
    return (f"From: <{SENDER}>\r\nSubject: {marker}\r\nMessage-ID: <{marker}@example.test>\r\n\r\n").encode() + body


def relay_in_session(mta: RawSmtpClient, recipient: str, marker: str) -> tuple[Reply, Reply]:
    """One transaction in an open MTA session; returns (RCPT reply, final reply after the dot)."""
    assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
    rcpt = mta.command(f"RCPT TO:<{recipient}>")
    if rcpt.code != 250:
        return rcpt, rcpt
    assert mta.command("DATA").code == 354
    mta.send(message(marker) + b".\r\n")
    return rcpt, mta.read_reply()


def relay_one(proxy: OutboundProxy, recipient: str, marker: str) -> tuple[Reply, Reply]:
    """One complete transaction in a session of its own (see relay_in_session)."""
    with open_session(proxy) as mta:
        replies = relay_in_session(mta, recipient, marker)
        mta.command("QUIT")
        return replies


def with_marker(messages: list[bytes], marker: str) -> list[bytes]:
    return [m for m in messages if marker.encode() in m]


class SinkAt(SmtpSink):
    """smtp-sink on another loopback address (127.0.0.2, ...): MX hosts of one domain share
    one port (``[outbound] port``) and differ by address. Additive to :class:`SmtpSink`,
    whose own readiness check looks at the port only."""

    def __init__(self, root: Path, host: str, port: int, **options) -> None:
        super().__init__(root, port=port, **options)
        self.host = host
        self.args[-2] = f"{host}:{port}"

    def start(self) -> SinkAt:
        super().start()

        def bound() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"smtp-sink exited {self.process.returncode}: {self.output_text()}")
            return listening_on(self.host, self.port)

        wait_until(bound, self.start_timeout, f"smtp-sink on {self.host}:{self.port}")
        return self


@pytest.fixture
def sink_at(tmp_path) -> Iterator[Callable[..., SinkAt]]:
    sinks: list[SinkAt] = []

    def make(host: str, port: int, **options) -> SinkAt:
        sink = SinkAt(tmp_path / f"sink-{host}", host, port, **options)
        sinks.append(sink)
        return sink.start()

    yield make
    for sink in sinks:
        sink.stop()
        print(f"--- smtp-sink {sink.host}:{sink.port} ---\n{sink.output_text()}")


# --------------------------------------------------------------------------- 1. many messages


def test_smtp_source_two_destinations_concurrently_all_delivered_to_the_right_remote(
        postfix_factory, smtp_sink_factory, start_outbound):
    """smtp-source (plaintext, 5 sessions x 40 messages per destination, both at once): every
    message reaches the remote of its domain, none the other one."""
    alpha = postfix_factory(domains=["alpha.test"], hostname="mx.alpha.test")
    beta = smtp_sink_factory(hostname="mx.beta.test")
    proxy = start_outbound({"alpha.test": f"[127.0.0.1]:{alpha.port}", "beta.test": f"[127.0.0.1]:{beta.port}"},
                           default_level="may")
    count = 40
    markers = {"alpha.test": f"alpha-{token()}", "beta.test": f"beta-{token()}"}
    sources = {
        domain: subprocess.Popen(
            ["smtp-source", "-s", "5", "-m", str(count), "-M", "legacy.example.test", "-f", SENDER,
             "-t", f"user@{domain}", "-S", marker, f"127.0.0.1:{proxy.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for domain, marker in markers.items()
    }
    for domain, source in sources.items():
        output, _ = source.communicate(timeout=120)
        assert source.returncode == 0, f"smtp-source to {domain} exited {source.returncode}: {output}"

    # every message was acknowledged to smtp-source only after its remote said 250, so
    # they are all there now (Postfix still has to move them from its queue to the Maildir)
    at_alpha = alpha.wait_for_messages(count, timeout=60)
    at_beta = beta.wait_for_messages(count, timeout=30)
    assert len(with_marker(at_alpha, markers["alpha.test"])) == count == len(at_alpha)
    assert len(with_marker(at_beta, markers["beta.test"])) == count == len(at_beta)
    assert not with_marker(at_alpha, markers["beta.test"]) and not with_marker(at_beta, markers["alpha.test"])
    assert all(b"X-Rcpt-Args: <user@beta.test>" in m for m in at_beta)
    assert all(b"Delivered-To: user@alpha.test" in m for m in at_alpha)
    def all_relayed() -> list[dict] | None:
        found = [r for r in proxy.process.logs() if r["event"] == "message relayed"]
        return found if len(found) >= 2 * count else None

    relayed = wait_until(all_relayed, 30, f"{2 * count} 'message relayed' lines")
    by_domain = {domain: [r for r in relayed if r["domain"] == domain] for domain in markers}
    assert [len(by_domain[d]) for d in markers] == [count, count], relayed
    assert {r["result"] for r in relayed} == {"accepted"}
    assert {r["relay"] for r in by_domain["alpha.test"]} == {f"127.0.0.1[127.0.0.1]:{alpha.port}"}
    assert {r["relay"] for r in by_domain["beta.test"]} == {f"127.0.0.1[127.0.0.1]:{beta.port}"}


# --------------------------------------------------------------------------- 2. response injection

INJECTED = b"250 injected\r\n"


def test_replies_injected_after_the_220_to_starttls_are_discarded(pki, scripted_remote, start_outbound):
    """The remote answers STARTTLS with `220 ready\\r\\n250 injected\\r\\n` in one segment,
    then does a real TLS handshake (Python's ssl) and answers everything inside TLS with
    texts of its own. The proxy throws the injected 250 away (and logs how many bytes), so
    each reply the MTA gets is the inside-TLS reply to that very command; had the proxy
    read the injected 250 as its EHLO reply, every later reply would be one step behind."""
    chain = pki.server_cert("mx.injector.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain.cert_file, chain.key_file)

    def script(c: Conversation) -> None:
        c.send(b"220 mx.injector.test ESMTP\r\n")
        c.expect(b"EHLO ")
        c.send(b"250-mx.injector.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        c.expect(b"STARTTLS")
        c.send(b"220 ready\r\n" + INJECTED)  # one send: one segment on loopback
        c.starttls(context)
        c.notes["ehlo in TLS"] = c.expect(b"EHLO ")
        c.send(b"250-mx.injector.test inside TLS\r\n250 8BITMIME\r\n")
        c.expect(b"MAIL FROM:")
        c.send(b"250 2.1.0 sender ok inside TLS\r\n")
        c.expect(b"RCPT TO:")
        c.send(b"250 2.1.5 recipient ok inside TLS\r\n")
        c.expect(b"DATA")
        c.send(b"354 go ahead inside TLS\r\n")
        c.notes["message"] = c.data()
        c.send(b"250 2.0.0 queued inside TLS as INJ1\r\n")
        c.goodbye()

    remote = scripted_remote(script)
    proxy = start_outbound({"injector.test": f"[127.0.0.1]:{remote.port}"}, default_level="encrypt")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        rcpt = mta.command("RCPT TO:<user@injector.test>")
        assert (rcpt.code, rcpt.text) == (250, "2.1.5 recipient ok inside TLS"), rcpt
        data = mta.command("DATA")
        assert (data.code, data.text) == (354, "go ahead inside TLS"), data
        mta.send(message(marker) + b".\r\n")
        final = mta.read_reply()
        assert (final.code, final.text) == (250, "2.0.0 queued inside TLS as INJ1"), final
        mta.command("QUIT")
    remote.join()
    assert marker.encode() in remote.notes["message"]
    assert remote.notes["ehlo in TLS"] == b"EHLO out.example.test"
    [discarded] = proxy.records("discarded plaintext received after the 220 reply to STARTTLS")
    assert discarded["bytes"] == len(INJECTED) == 14, discarded
    assert discarded["level"] == "warning"


# --------------------------------------------------------------------------- 3. vanishing peers


def test_remote_closing_mid_data_gives_the_mta_a_4xx(scripted_remote, start_outbound):
    """The remote takes part of the message and closes; the MTA, sending the rest and the
    dot, gets a 4xx (the proxy never acknowledges what the remote did not)."""
    closed = threading.Event()

    def script(c: Conversation) -> None:
        c.accept_envelope(b"mx.dying.test", pipelining=True)
        c.expect(b"DATA")
        c.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        while b"end of part one" not in c.buffer:  # its CRLF may be held back: it could start CRLF.CRLF
            c.fill()
        c.notes["received"] = c.buffer
        c.close()
        closed.set()

    remote = scripted_remote(script)
    proxy = start_outbound({"dying.test": f"[127.0.0.1]:{remote.port}"}, default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<user@dying.test>").code == 250
        assert mta.command("DATA").code == 354
        mta.send(message(marker, b"part one\r\n" * 100 + b"end of part one\r\n"))
        assert closed.wait(20), "the scripted remote never saw part one"
        mta.send(b"part two\r\n" * 100 + b".\r\n")
        final = mta.read_reply()
    remote.join()
    assert marker.encode() in remote.notes["received"]
    assert 400 <= final.code < 500, final
    assert "lost connection" in final.text, final
    [relayed] = proxy.records("message relayed")
    assert relayed["result"] == "deferred", relayed


def test_a_remote_that_stops_answering_gives_the_mta_a_4xx_after_the_reply_timeout(
        scripted_remote, start_outbound):
    """The remote greets and answers EHLO, then keeps silent after MAIL: when
    `reply_timeout` has passed, the MTA gets a 4xx naming the timeout, and the proxy
    drops the connection (the script sees it closed)."""

    def script(c: Conversation) -> None:
        c.send(b"220 mx.silent.test ESMTP\r\n")
        c.expect(b"EHLO ")
        c.send(b"250-mx.silent.test\r\n250 PIPELINING\r\n")
        c.expect(b"MAIL FROM:")
        with pytest.raises(EOFError):
            while True:
                c.fill()
        c.notes["dropped"] = True

    remote = scripted_remote(script)
    proxy = start_outbound({"silent.test": f"[127.0.0.1]:{remote.port}"}, default_level="may", reply_timeout=1)
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        started = time.monotonic()
        rcpt = mta.command("RCPT TO:<user@silent.test>")
        waited = time.monotonic() - started
    remote.join()
    assert rcpt.code == 451 and "timeout waiting for reply to MAIL" in rcpt.text, rcpt
    assert waited >= 1.0
    assert remote.notes["dropped"]


def test_smtp_sink_dropping_at_the_final_dot_gives_the_mta_a_4xx(smtp_sink_factory, start_outbound):
    """smtp-sink takes the whole message, dot included, and disconnects without a reply."""
    sink = smtp_sink_factory(disconnect_after=["."])
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{sink.port}"}, default_level="may")
    rcpt, final = relay_one(proxy, "user@sink.test", token())
    assert rcpt.code == 250
    assert 400 <= final.code < 500 and "lost connection" in final.text, final


def test_mta_vanishing_mid_data_makes_the_remote_deliver_nothing(postfix_factory, start_outbound):
    """The MTA sends MAIL, RCPT, DATA and some lines, then closes: the proxy drops the
    remote connection without the final dot, so the real Postfix remote logs a lost
    connection after DATA and delivers nothing."""
    remote = postfix_factory(domains=["remote.test"], hostname="mx.remote.test")
    proxy = start_outbound({"remote.test": f"[127.0.0.1]:{remote.port}"}, default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<user@remote.test>").code == 250
        assert mta.command("DATA").code == 354
        mta.send(message(marker, b"an unfinished message\r\n" * 20))
    lost = remote.wait_for_log(r"lost connection after DATA \((\d+) bytes\) from unknown\[127\.0\.0\.1\]")
    assert int(lost.group(1)) > 0, lost.group(0)  # the partial message did reach Postfix
    proxy.process.wait_for_log("legacy MTA connection ended")
    assert not with_marker(remote.messages(), marker)
    assert "250 2.0.0 Ok: queued" not in remote.log_text()
    assert not proxy.records("message relayed")


# --------------------------------------------------------------------------- 4. invariant 1


def test_remote_5xx_to_rcpt_is_relayed_as_is(smtp_sink_factory, start_outbound):
    refusal = "550 5.1.1 <user@sink.test>: Recipient address rejected: no such user here"
    sink = smtp_sink_factory(hard_reject=["RCPT"], hard_reply=refusal)
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{sink.port}"}, default_level="may")
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        rcpt = mta.command("RCPT TO:<user@sink.test>")
        assert str(rcpt) == refusal
        assert mta.command("DATA").code == 503  # no recipient: nothing to send
    assert not sink.messages()


@pytest.mark.parametrize("refusal", [
    "553 5.1.8 <sender@example.test>: Sender address rejected: domain not found",
    "451 4.3.2 sender check unavailable, try again later",
], ids=["5xx", "4xx"])
def test_remote_refusing_mail_becomes_the_reply_to_every_rcpt(smtp_sink_factory, start_outbound, refusal):
    """MAIL gets a local 250 (the remote is not contacted before the first RCPT); the
    remote's refusal of MAIL is then the reply to each RCPT of the transaction."""
    code = int(refusal[:3])
    option = {"hard_reject": ["MAIL"], "hard_reply": refusal} if code >= 500 else \
        {"soft_reject": ["MAIL"], "soft_reply": refusal}
    sink = smtp_sink_factory(**option)
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{sink.port}"}, default_level="may")
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert str(mta.command("RCPT TO:<one@sink.test>")) == refusal
        assert str(mta.command("RCPT TO:<two@sink.test>")) == refusal
        assert mta.command("DATA").code == 503
    assert not sink.messages()


def test_remote_452_to_rcpt_is_relayed(smtp_sink_factory, start_outbound):
    refusal = "452 4.5.3 Error: too many recipients, says the remote"
    sink = smtp_sink_factory(soft_reject=["RCPT"], soft_reply=refusal)
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{sink.port}"}, default_level="may")
    rcpt, _ = relay_one(proxy, "user@sink.test", token())
    assert str(rcpt) == refusal


def test_rcpt_for_a_second_domain_gets_452_and_the_first_domain_still_gets_its_message(
        postfix_factory, start_outbound):
    remote = postfix_factory(domains=["remote.test"], hostname="mx.remote.test")
    proxy = start_outbound({"remote.test": f"[127.0.0.1]:{remote.port}",
                            "other.test": f"[127.0.0.1]:{remote.port}"}, default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<user@remote.test>").code == 250
        second = mta.command("RCPT TO:<user@other.test>")
        assert second.code == 452 and second.text.startswith("4.5.3 "), second
        assert mta.command("DATA").code == 354
        mta.send(message(marker) + b".\r\n")
        final = mta.read_reply()
        assert final.code == 250, final
    [delivered] = wait_until(lambda: with_marker(remote.messages(), marker), 20, "the message at the remote")
    assert b"Delivered-To: user@remote.test" in delivered
    session = remote.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] .*")
    assert "rcpt=1 " in session.group(0) and "other.test" not in remote.log_text(), session.group(0)


def test_bare_lf_rejected_and_nothing_delivered(postfix_factory, start_outbound):
    remote = postfix_factory(domains=["remote.test"], hostname="mx.remote.test")
    proxy = start_outbound({"remote.test": f"[127.0.0.1]:{remote.port}"}, default_level="may",
                           bare_newline="reject")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<user@remote.test>").code == 250
        assert mta.command("DATA").code == 354
        mta.send(message(marker, b"line one\nline two\r\n") + b".\r\n")
        final = mta.read_reply()
        assert 500 <= final.code < 600 and "bare <LF>" in final.text, final
        # the session goes on: the next transaction works
        assert mta.command("RSET").code == 250
    remote.wait_for_log(r"lost connection after DATA .*from unknown\[127\.0\.0\.1\]")
    assert not with_marker(remote.messages(), marker)
    assert "Ok: queued" not in remote.log_text()


def test_bare_lf_normalized_reaches_a_strict_remote_with_crlf(postfix_factory, start_outbound):
    """`normalize`: bare LFs become CRLF, and a bare-LF "end of data" (`\\n.\\n`, the SMTP
    smuggling trick) is dot-stuffed into plain content. The remote Postfix rejects any bare
    LF (smtpd_forbid_bare_newline = reject, no exclusions), so its 250 proves what it got
    was CRLF only -- and one message, the smuggled line inside it."""
    remote = postfix_factory(domains=["remote.test"], hostname="mx.remote.test", extra_main_cf={
        "smtpd_forbid_bare_newline": "reject", "smtpd_forbid_bare_newline_exclusions": ""})
    proxy = start_outbound({"remote.test": f"[127.0.0.1]:{remote.port}"}, default_level="may",
                           bare_newline="normalize")
    marker = token()
    smuggled = f"smuggled-{marker}"
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<user@remote.test>").code == 250
        assert mta.command("DATA").code == 354
        mta.send(message(marker, f"line one\nline two\n.\nMAIL FROM:<{smuggled}@evil.test>\r\n".encode())
                 + b".\r\n")
        final = mta.read_reply()
        assert final.code == 250, final
    [delivered] = wait_until(lambda: with_marker(remote.messages(), marker), 20, "the message at the remote")
    # virtual(8) writes LF line ends; the unstuffed "." is a content line
    assert b"\nline one\nline two\n.\nMAIL FROM:<" + smuggled.encode() in delivered, delivered
    assert "bare <LF> received" not in remote.log_text()


def test_bare_lf_is_refused_by_the_strict_remote_when_sent_directly(postfix_factory):
    """Control for the test above: the strict remote really does refuse a bare LF."""
    remote = postfix_factory(domains=["remote.test"], hostname="mx.remote.test", extra_main_cf={
        "smtpd_forbid_bare_newline": "reject", "smtpd_forbid_bare_newline_exclusions": ""})
    with RawSmtpClient(remote.port) as client:
        assert client.read_reply().code == 220
        assert client.ehlo().code == 250
        assert client.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert client.command("RCPT TO:<user@remote.test>").code == 250
        assert client.command("DATA").code == 354
        client.send(message(token(), b"line one\nline two\r\n") + b".\r\n")
        assert client.read_reply().code == 550


# --------------------------------------------------------------------------- 5. pipelining (RFC 2920)


def pipelined_transaction(mta: RawSmtpClient, recipients: list[str], marker: str) -> list[Reply]:
    """MAIL, every RCPT and DATA in one send, as a pipelining MTA does; the replies, and
    after a 354 the message and its final reply."""
    mta.send(b"".join(f"{line}\r\n".encode() for line in
                      [f"MAIL FROM:<{SENDER}>", *(f"RCPT TO:<{r}>" for r in recipients), "DATA"]))
    replies = [mta.read_reply() for _ in range(len(recipients) + 2)]
    if replies[-1].code == 354:
        mta.send(message(marker) + b".\r\n")
        replies.append(mta.read_reply())
    return replies


def pipelined_to_scripted_remote(script, domain: str, scripted_remote, start_outbound) -> tuple[list[Reply], dict]:
    """A pipelined transaction to one@ and two@`domain` through the proxy to a scripted
    remote that stores the message in its notes; the MTA's replies and those notes."""
    remote = scripted_remote(script)
    proxy = start_outbound({domain: f"[127.0.0.1]:{remote.port}"}, default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        replies = pipelined_transaction(mta, [f"one@{domain}", f"two@{domain}"], marker)
        mta.command("QUIT")
    remote.join()
    assert marker.encode() in remote.notes["message"]
    return replies, remote.notes


def test_the_envelope_reaches_a_pipelining_remote_in_one_group(scripted_remote, start_outbound):
    """The remote offers PIPELINING: MAIL, both RCPTs and DATA reach it before it has
    answered anything (what arrived in one read is what no real MTA can show us), each of
    its replies answers the MTA's own command, in order, and the RSET that readies the
    connection for reuse comes with the final dot."""

    def script(c: Conversation) -> None:
        c.send(b"220 mx.pipe.test ESMTP\r\n")
        c.expect(b"EHLO ")
        c.send(b"250-mx.pipe.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        while not c.buffer.endswith(b"DATA\r\n"):
            c.fill()
        c.notes["group"] = c.buffer.split(b"\r\n")[:-1]
        c.buffer = b""
        c.send(b"250 2.1.0 sender ok\r\n250 2.1.5 one ok\r\n550 5.1.1 two unknown\r\n354 go ahead\r\n")
        c.notes["message"] = c.data()
        c.notes["with the dot"] = c.buffer
        c.send(b"250 2.0.0 queued as PIPE1\r\n")
        c.goodbye()

    replies, notes = pipelined_to_scripted_remote(script, "pipe.test", scripted_remote, start_outbound)
    assert [str(r) for r in replies] == [
        "250 2.1.0 Ok", "250 2.1.5 one ok", "550 5.1.1 two unknown", "354 go ahead", "250 2.0.0 queued as PIPE1"]
    assert notes["group"] == [
        f"MAIL FROM:<{SENDER}>".encode(), b"RCPT TO:<one@pipe.test>", b"RCPT TO:<two@pipe.test>", b"DATA"]
    assert notes["with the dot"] == b"RSET\r\n"  # readies the connection for reuse, no extra round trip


def test_replies_to_a_pipelined_group_reach_the_mta_in_one_segment(smtp_sink, start_outbound):
    """As Postfix's smtpd does, the replies to MAIL, RCPT and DATA are written together,
    when smtproxy would next wait for the MTA: the local 250 for MAIL does not leave
    alone before the remote has answered the RCPT."""
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{smtp_sink.port}"}, default_level="may")
    with open_session(proxy) as mta:
        mta.send(f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<user@sink.test>\r\nDATA\r\n".encode())
        first_read = mta.sock.recv(65536)
        assert [line[:3] for line in first_read.split(b"\r\n")[:-1]] == [b"250", b"250", b"354"], first_read
        mta.send(message(token()) + b".\r\n")
        assert mta.read_reply().code == 250
        assert mta.command("QUIT").code == 221


def test_a_transaction_pipelined_after_the_final_dot_is_relayed_too(smtp_sink, start_outbound):
    """The MTA sends the next transaction right behind the final dot, without waiting for
    the final reply (RFC 2920 allows commands after the end of data): both messages arrive,
    and each final reply is the remote's own."""
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{smtp_sink.port}"}, default_level="may")
    first, second = token(), token()
    envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<user@sink.test>\r\nDATA\r\n".encode()
    with open_session(proxy) as mta:
        mta.send(envelope)
        assert [mta.read_reply().code for _ in range(3)] == [250, 250, 354]
        mta.send(message(first) + b".\r\n" + envelope)
        replies = [mta.read_reply() for _ in range(4)]
        assert [r.code for r in replies] == [250, 250, 250, 354], [str(r) for r in replies]
        mta.send(message(second) + b".\r\nQUIT\r\n")
        assert [mta.read_reply().code for _ in range(2)] == [250, 221]
    stored = smtp_sink.wait_for_messages(2)
    assert len(stored) == 2
    assert any(first.encode() in m for m in stored) and any(second.encode() in m for m in stored)


def test_a_remote_without_pipelining_gets_one_command_per_reply(scripted_remote, start_outbound):
    """The same pipelined MTA transaction to a remote that does not offer PIPELINING:
    each command reaches it alone, after its reply to the one before."""

    def script(c: Conversation) -> None:
        c.send(b"220 mx.lockstep.test ESMTP\r\n")
        c.expect(b"EHLO ")
        c.send(b"250-mx.lockstep.test\r\n250 8BITMIME\r\n")
        arrived_alone = []
        for command, reply in ((b"MAIL FROM:", b"250 2.1.0 Ok\r\n"), (b"RCPT TO:<ONE@", b"250 2.1.5 Ok\r\n"),
                               (b"RCPT TO:<TWO@", b"250 2.1.5 Ok\r\n"), (b"DATA", b"354 go ahead\r\n")):
            c.expect(command)
            arrived_alone.append(c.buffer == b"")  # one write: the rest would be in this segment
            c.send(reply)
        c.notes["arrived alone"] = arrived_alone
        c.notes["message"] = c.data()
        c.notes["with the dot"] = c.buffer
        c.send(b"250 2.0.0 queued as STEP1\r\n")
        c.goodbye()

    replies, notes = pipelined_to_scripted_remote(script, "lockstep.test", scripted_remote, start_outbound)
    assert [r.code for r in replies] == [250, 250, 250, 354, 250], [str(r) for r in replies]
    assert notes["arrived alone"] == [True, True, True, True]
    assert notes["with the dot"] == b""  # RSET comes after the final reply


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "no-pipelining"])
def test_pipelined_transaction_to_postfix_with_one_recipient_refused(postfix_factory, start_outbound, pipelining):
    """A real Postfix remote, with and without PIPELINING in its EHLO reply, refuses one
    of three recipients: the MTA gets Postfix's replies in order, and both accepted
    recipients get the message."""
    remote = postfix_factory(domains=["remote.test"], hostname="mx.remote.test", extra_main_cf={
        "smtpd_recipient_restrictions": "check_recipient_access inline:{nobody@remote.test=REJECT}, permit",
        **({} if pipelining else {"smtpd_discard_ehlo_keywords": "pipelining"}),
    })
    proxy = start_outbound({"remote.test": f"[127.0.0.1]:{remote.port}"}, default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        replies = pipelined_transaction(mta, ["one@remote.test", "nobody@remote.test", "two@remote.test"], marker)
        mta.command("QUIT")
    assert [r.code for r in replies] == [250, 250, 554, 250, 354, 250], [str(r) for r in replies]
    assert replies[2].text.startswith("5.7.1 <nobody@remote.test>: Recipient address rejected"), replies[2]
    copies = wait_until(lambda: len(with_marker(remote.messages(), marker)) == 2 and with_marker(remote.messages(), marker),
                        20, "both accepted recipients' copies at the remote")
    assert sorted(line for m in copies for line in m.splitlines() if line.startswith(b"Delivered-To:")) == [
        b"Delivered-To: one@remote.test", b"Delivered-To: two@remote.test"]
    session = remote.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] .*")
    assert "rcpt=2/3 data=1" in session.group(0), session.group(0)


def test_a_refused_mail_answers_every_pipelined_rcpt_and_the_session_goes_on(smtp_sink_factory, start_outbound):
    """smtp-sink refuses MAIL; the MTA pipelined two RCPTs and DATA. Each RCPT gets the
    refusal of MAIL (not the remote's replies to the RCPTs sent ahead, which are read and
    dropped), DATA a local 503, and a second transaction in the same session fares the same."""
    refusal = "553 5.1.8 <sender@example.test>: Sender address rejected: domain not found"
    sink = smtp_sink_factory(hard_reject=["MAIL"], hard_reply=refusal)
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{sink.port}"}, default_level="may")
    with open_session(proxy) as mta:
        for _ in range(2):
            replies = pipelined_transaction(mta, ["one@sink.test", "two@sink.test"], token())
            assert [str(r) for r in replies[:3]] == ["250 2.1.0 Ok", refusal, refusal]
            assert replies[3].code == 503, replies[3]
            assert mta.command("RSET").code == 250
        assert mta.command("QUIT").code == 221
    assert not sink.messages()


def test_data_sent_ahead_after_every_rcpt_was_refused_delivers_nothing(smtp_sink_factory, start_outbound):
    """smtp-sink refuses the only RCPT but answers the DATA sent ahead with 354 (a real
    server would refuse it). The MTA gets the RCPT's 550 and a local 503 for DATA; the
    proxy drops that remote connection rather than leave it waiting for a message, and
    the MTA's next transaction in the same session gets its own fresh replies."""
    refusal = "550 5.1.1 <user@sink.test>: Recipient address rejected"
    sink = smtp_sink_factory(hard_reject=["RCPT"], hard_reply=refusal)
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{sink.port}"}, default_level="may")
    with open_session(proxy) as mta:
        first = pipelined_transaction(mta, ["user@sink.test"], token())
        assert [str(r) for r in first[:2]] == ["250 2.1.0 Ok", refusal]
        assert first[2].code == 503, first[2]
        assert mta.command("RSET").code == 250
        second = pipelined_transaction(mta, ["user@sink.test"], token())
        assert [str(r) for r in second[:2]] == ["250 2.1.0 Ok", refusal]
        assert second[2].code == 503, second[2]
        assert mta.command("QUIT").code == 221
    assert not sink.messages()


# --------------------------------------------------------------------------- 6. MX routing


def _require_loopback_addresses(*hosts: str) -> None:
    for host in hosts:
        try:
            with socket.socket() as sock:
                sock.bind((host, 0))
        except OSError as exc:
            pytest.skip(f"cannot listen on {host} on this machine: {exc}")


def test_mx_preference_order_the_most_preferred_mx_gets_the_mail(unbound_factory, sink_at, start_outbound):
    _require_loopback_addresses("127.0.0.2", "127.0.0.3")
    dns = unbound_factory([
        "pref.test. MX 20 mx2.pref.test.",  # the worse one first: order comes from preference
        "pref.test. MX 10 mx1.pref.test.",
        "mx1.pref.test. A 127.0.0.2",
        "mx2.pref.test. A 127.0.0.3",
    ])
    port = free_port()
    best, backup = sink_at("127.0.0.2", port), sink_at("127.0.0.3", port)
    proxy = start_outbound({}, dns={"nameservers": [dns.nameserver]}, port=port, default_level="may")
    markers = [token() for _ in range(3)]
    for marker in markers:
        rcpt, final = relay_one(proxy, "user@pref.test", marker)
        assert (rcpt.code, final.code) == (250, 250), (rcpt, final)
    got = best.wait_for_messages(3)
    assert [len(with_marker(got, m)) for m in markers] == [1, 1, 1]
    assert backup.messages() == []
    assert {r["relay"] for r in proxy.records("message relayed", sessions=3)} == {f"mx1.pref.test[127.0.0.2]:{port}"}


def test_mx_fallback_to_the_second_mx_when_the_first_refuses_connections(unbound_factory, sink_at, start_outbound):
    _require_loopback_addresses("127.0.0.3", "127.0.0.4")
    dns = unbound_factory([
        "fallback.test. MX 10 mx1.fallback.test.",
        "fallback.test. MX 20 mx2.fallback.test.",
        "mx1.fallback.test. A 127.0.0.4",
        "mx2.fallback.test. A 127.0.0.3",
    ])
    port = free_port()
    second = sink_at("127.0.0.3", port)
    assert not listening_on("127.0.0.4", port)  # the first MX's port is closed
    proxy = start_outbound({}, dns={"nameservers": [dns.nameserver]}, port=port, default_level="may")
    marker = token()
    rcpt, final = relay_one(proxy, "user@fallback.test", marker)
    assert (rcpt.code, final.code) == (250, 250), (rcpt, final)
    assert len(with_marker(second.wait_for_messages(1), marker)) == 1
    [attempt] = proxy.records("delivery attempt failed")
    assert attempt["peer"] == "mx1.fallback.test[127.0.0.4]" and "refused" in attempt["reason"].lower(), attempt
    [relayed] = proxy.records("message relayed")
    assert relayed["relay"] == f"mx2.fallback.test[127.0.0.3]:{port}"


@pytest.mark.parametrize(("recipient", "code", "status"), [
    ("user@nosuch.test", 550, "5.1.2"),  # NXDOMAIN
    ("user@null.test", 556, "5.1.10"),  # null MX (RFC 7505)
], ids=["nxdomain", "null-mx"])
def test_permanent_dns_answers_become_5xx(unbound_factory, start_outbound, recipient, code, status):
    dns = unbound_factory(["null.test. MX 0 .", "other.test. A 127.0.0.1"])
    proxy = start_outbound({}, dns={"nameservers": [dns.nameserver]}, default_level="may")
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        rcpt = mta.command(f"RCPT TO:<{recipient}>")
        assert rcpt.code == code and rcpt.text.startswith(f"{status} "), rcpt
        assert mta.command("DATA").code == 503
    [failed] = proxy.records("routing failed")
    assert failed["domain"] == recipient.split("@")[1]


def test_dns_timeout_becomes_4xx(start_outbound):
    """A nameserver that never answers (a bound UDP socket nobody reads): 451 4.4.3."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        proxy = start_outbound({}, dns={"nameservers": [f"{LOOPBACK}:{silent.getsockname()[1]}"], "timeout": 2},
                               default_level="may")
        with open_session(proxy) as mta:
            assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
            started = time.monotonic()
            rcpt = mta.command("RCPT TO:<user@slow.test>")
            elapsed = time.monotonic() - started
    assert rcpt.code == 451 and rcpt.text.startswith("4.4.3 "), rcpt
    assert elapsed < 10, f"the lookup took {elapsed:.1f}s with a 2s DNS timeout"
    [failed] = proxy.records("routing failed")
    assert "timeout" in failed["reason"], failed


# --------------------------------------------------------------------------- remote misbehaviour


@pytest.mark.parametrize("closing_at", ["RCPT", "DATA", "."])
def test_a_remote_421_fails_the_transaction_not_the_mta_session(smtp_sink_factory, start_outbound, closing_at):
    """smtp-sink answers 421 and closes. The MTA gets the transaction's failure as 451 (a
    421 would end its whole session, RFC 5321 3.8: our service is still there), and the
    same session goes on to deliver the next transaction elsewhere."""
    closing = smtp_sink_factory(reply_421_after=[closing_at])
    good = smtp_sink_factory(hostname="mx.good.test")
    proxy = start_outbound({"closing.test": f"[127.0.0.1]:{closing.port}", "good.test": f"[127.0.0.1]:{good.port}"},
                           default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        replies = [mta.command("RCPT TO:<a@closing.test>"), mta.command("RCPT TO:<b@closing.test>")]
        if closing_at == "RCPT":
            assert [r.code for r in replies] == [451, 451], replies
            assert mta.command("DATA").code == 503  # no recipient was accepted
        else:
            assert [r.code for r in replies] == [250, 250], replies
            data = mta.command("DATA")
            if closing_at == "DATA":
                assert data.code == 451, data
            else:
                assert data.code == 354, data
                mta.send(message(token()) + b".\r\n")
                assert mta.read_reply().code == 451
        assert mta.command("RSET").code == 250
        assert relay_in_session(mta, "user@good.test", marker)[1].code == 250
        assert mta.command("QUIT").code == 221
    assert any(marker.encode() in m for m in good.wait_for_messages(1))


def test_after_a_remote_lost_mid_transaction_the_next_transaction_starts_afresh(
        scripted_remote, smtp_sink_factory, start_outbound):
    """The remote accepts RCPT a and drops the connection at RCPT b; DATA gets the 451.
    The MTA's next transaction in the same session, without RSET, is judged on its own:
    another domain is not told to wait for a separate transaction, and no stale 451."""

    def script(c: Conversation) -> None:
        c.accept_envelope(b"mx.flaky.test")  # no PIPELINING: one command at a time
        c.expect(b"RCPT TO:")

    remote = scripted_remote(script)
    good = smtp_sink_factory(hostname="mx.good.test")
    proxy = start_outbound({"flaky.test": f"[127.0.0.1]:{remote.port}", "good.test": f"[127.0.0.1]:{good.port}"},
                           default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<a@flaky.test>").code == 250
        assert mta.command("RCPT TO:<b@flaky.test>").code == 451
        assert mta.command("DATA").code == 451
        assert relay_in_session(mta, "user@good.test", marker)[1].code == 250
    remote.join()
    assert any(marker.encode() in m for m in good.wait_for_messages(1))


def test_a_remote_that_stops_reading_the_message_is_dropped_after_the_reply_timeout(
        scripted_remote, start_outbound):
    """The remote answers 354 and then reads nothing: once the proxy's send buffer is full
    and `reply_timeout` has passed, the MTA gets a 4xx and the remote connection is dropped
    without a final dot (Postfix's smtp_data_xfer_timeout)."""
    stopped = threading.Event()

    def script(c: Conversation) -> None:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.accept_envelope(b"mx.stuck.test")
        c.expect(b"DATA")
        c.send(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        stopped.wait(30)  # reads nothing more until the test is done

    remote = scripted_remote(script, timeout=40)
    proxy = start_outbound({"stuck.test": f"[127.0.0.1]:{remote.port}"}, default_level="may", reply_timeout=1,
                           max_message_size=50_000_000)
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        assert mta.command("RCPT TO:<user@stuck.test>").code == 250
        assert mta.command("DATA").code == 354
        mta.send(message(token()) + (b"y" * 998 + b"\r\n") * 20000 + b".\r\n")  # 20 MB, more than buffers hold
        final = mta.read_reply()
    stopped.set()
    remote.join()
    assert final.code == 451 and "timeout sending message data" in final.text, final


def test_a_remote_reply_without_end_is_refused_not_buffered(scripted_remote, start_outbound):
    """After EHLO the remote sends "250-" lines and never a last line: the proxy gives up
    after MAX_REPLY_LINES (memory stays bounded) and the MTA gets a 4xx at once."""

    def script(c: Conversation) -> None:
        c.send(b"220 mx.endless.test ESMTP\r\n")
        c.expect(b"EHLO ")
        try:
            for _ in range(5000):
                c.send(b"250-" + b"x" * 60 + b"\r\n")
        except OSError:
            c.notes["dropped"] = True

    remote = scripted_remote(script)
    proxy = start_outbound({"endless.test": f"[127.0.0.1]:{remote.port}"}, default_level="may")
    with open_session(proxy) as mta:
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        rcpt = mta.command("RCPT TO:<user@endless.test>")
    remote.join()
    assert rcpt.code == 451 and "malformed reply" in rcpt.text, rcpt


def test_a_refused_bdat_payload_is_dropped_not_read_as_commands(smtp_sink, start_outbound):
    """CHUNKING is not offered, so BDAT gets 502; its payload (here SMTP commands) is
    still read and dropped, as RFC 3030 frames it, and never answered as commands."""
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{smtp_sink.port}"}, default_level="may")
    payload = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<user@sink.test>\r\n".encode()
    with open_session(proxy) as mta:
        mta.send(f"BDAT {len(payload)} LAST\r\n".encode() + payload + b"NOOP\r\n")
        assert mta.read_reply().code == 502
        noop = mta.read_reply()
        assert noop.code == 250 and "2.0.0 Ok" in noop.text, noop
        assert mta.command("RCPT TO:<user@sink.test>").code == 503  # no MAIL was taken from the payload
        assert mta.command("QUIT").code == 221


def test_an_mta_that_keeps_sending_errors_is_disconnected_at_max_errors(smtp_sink, start_outbound):
    """Postfix's smtpd_hard_error_limit on the outbound listener: unknown, malformed,
    overlong and out-of-sequence commands count; the fourth is answered 421 and the
    connection closes. A good command in between does not reset the count."""
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{smtp_sink.port}"}, default_level="may", max_errors=4)
    with open_session(proxy) as mta:
        assert mta.command("XYZZY").code == 502
        assert mta.command("NOOP").code == 250
        assert mta.command("RCPT TO:<user@sink.test>").code == 503
        assert mta.command("NOOP " + "x" * 3000).code == 500
        refused = mta.command("MAIL FROM:<nobody")
        assert refused.code == 421 and refused.text.startswith("4.7.0 out.example.test Error: too many errors"), refused
        assert mta.expect_close() == b""
    ended = proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.1]")
    assert (ended["direction"], ended["tls"], ended["errors"], ended["messages"]) == ("outbound", False, 4, 0), ended


def test_a_remote_that_floods_a_cached_connection_is_cut_off(start_outbound, scripted_remote):
    """Unasked-for bytes on a parked connection are buffered no further than the longest
    reply smtproxy accepts (1000 lines of 2048 bytes): then the connection is dropped,
    instead of growing the proxy's memory for as long as the remote keeps sending."""
    flood, limit = b"x" * 65536, 64 * 1024 * 1024

    def script(c: Conversation) -> None:
        c.receive_message(b"mx.flood.test")
        c.send(b"250 2.0.0 queued\r\n")
        c.goodbye()  # the RSET: the connection is parked for reuse
        sent = 0
        try:
            while sent < limit:
                c.sock.sendall(flood)
                sent += len(flood)
        except OSError:
            c.notes["cut off after"] = sent

    remote = scripted_remote(script)
    proxy = start_outbound({"flood.test": f"[127.0.0.1]:{remote.port}"}, default_level="may",
                           connection_cache_time_limit=60)
    with open_session(proxy) as mta:
        assert relay_in_session(mta, "user@flood.test", token())[1].code == 250
    remote.join()
    assert remote.notes.get("cut off after", limit) < 16 * 1024 * 1024, remote.notes


def test_a_recipient_domain_in_unicode_is_routed_by_its_a_label(smtp_sink, start_outbound):
    """An MTA may name the domain as a U-label (RFC 6531); tables, DNS and policies know the
    A-label. It used to raise at the policy lookup: no reply to RCPT, the MTA disconnected."""
    proxy = start_outbound({"xn--bcher-kva.test": f"[127.0.0.1]:{smtp_sink.port}"}, default_level="may")
    marker = token()
    with open_session(proxy) as mta:
        assert relay_in_session(mta, "user@bücher.test", marker)[1].code == 250
        assert mta.command("QUIT").code == 221
    assert any(marker.encode() in m for m in smtp_sink.wait_for_messages(1))
    relayed = proxy.process.wait_for_log("message relayed")
    assert relayed["domain"] == "xn--bcher-kva.test", relayed


def test_a_cached_connection_that_sent_an_unasked_reply_is_not_reused(start_outbound, scripted_remote):
    """The remote answers the RSET that parks the connection with a second 250 nobody asked
    for (in the same segment). Reused, the connection would give that 250 as the reply to
    the next MAIL, and every later reply would answer the command before it. It is dropped
    instead, and the next message goes on a new connection."""

    def chatty(c: Conversation) -> None:
        c.receive_message(b"mx.chatty.test")
        c.send(b"250 2.0.0 queued as ONE\r\n")
        c.expect(b"RSET")
        c.send(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n")
        try:
            c.notes["after the unasked reply"] = c.line()
        except (EOFError, OSError):
            c.notes["after the unasked reply"] = "closed"

    def fresh(c: Conversation) -> None:
        c.notes["second message"] = c.receive_message(b"mx.chatty.test")
        c.send(b"250 2.0.0 queued as TWO\r\n")
        c.goodbye()

    remote = scripted_remote(chatty, fresh)
    proxy = start_outbound({"chatty.test": f"[127.0.0.1]:{remote.port}"}, default_level="may",
                           connection_cache_time_limit=60)
    first, second = token(), token()
    with open_session(proxy) as mta:
        assert relay_in_session(mta, "user@chatty.test", first)[1].code == 250
    dropped = proxy.process.wait_for_log(lambda r: r["event"].startswith("cached connection to"), timeout=10)
    with open_session(proxy) as mta:
        assert relay_in_session(mta, "user@chatty.test", second)[1].code == 250
    remote.join()
    assert remote.notes["after the unasked reply"] == "closed", remote.notes
    assert second.encode() in remote.notes["second message"]
    assert dropped["event"] == "cached connection to 127.0.0.1[127.0.0.1]:%d dropped" % remote.port, dropped
    assert dropped["reason"] == "unasked-for reply", dropped


def test_an_mta_that_never_reads_loses_its_connection_after_the_session(smtp_sink, start_outbound):
    """At idle_timeout the session ends (421, "disconnect from"); its unsent replies must
    not keep the socket open for as long as the MTA keeps its end."""
    proxy = start_outbound({"sink.test": f"[127.0.0.1]:{smtp_sink.port}"}, default_level="may", idle_timeout=2)
    with flood_without_reading(proxy.port) as mta:
        client_port = mta.getsockname()[1]
        proxy.process.wait_for_log(lambda r: r["event"].startswith("disconnect from"), timeout=30)

        def connection_gone() -> bool:
            listed = subprocess.run(["ss", "-tnH", "state", "established",
                                     f"( sport = :{proxy.port} and dport = :{client_port} )"],
                                    capture_output=True, text=True, timeout=10).stdout
            return not listed.strip()

        wait_until(connection_gone, 15, "the proxy to drop the connection")


def test_a_recipient_at_an_address_literal_is_delivered_there(smtp_sink, start_outbound):
    """user@[127.0.0.1] (RFC 5321 4.1.3): no MX lookup, the address itself on the default
    port; a malformed literal is refused by the router, not as bad syntax."""
    proxy = start_outbound({}, default_level="may", port=smtp_sink.port)
    marker = token()
    with open_session(proxy) as mta:
        assert relay_in_session(mta, "user@[127.0.0.1]", marker)[1].code == 250
        assert mta.command(f"MAIL FROM:<{SENDER}>").code == 250
        refused = mta.command("RCPT TO:<user@[not.an.address]>")
        assert refused.code == 550 and "invalid address literal" in refused.text, refused
    assert any(marker.encode() in m for m in smtp_sink.wait_for_messages(1))


@pytest.mark.parametrize("limit", [None, 0], ids=["default-5", "unlimited"])
def test_at_most_mx_address_limit_addresses_are_tried(unbound_factory, sink_at, start_outbound, limit):
    """Six MX hosts whose port is closed, then a working one: by default, as Postfix's
    smtp_mx_address_limit, five addresses are tried and the MTA gets a 4xx; with the
    limit off (0) the seventh delivers."""
    hosts = [f"127.0.0.{n}" for n in range(11, 18)]
    _require_loopback_addresses(*hosts)
    dns = unbound_factory([f"limit.test. MX {10 * n} mx{n}.limit.test." for n in range(1, 8)]
                          + [f"mx{n}.limit.test. A {host}" for n, host in enumerate(hosts, start=1)])
    port = free_port()
    good = sink_at(hosts[-1], port)
    options = {} if limit is None else {"mx_address_limit": limit}
    proxy = start_outbound({}, dns={"nameservers": [dns.nameserver]}, port=port, default_level="may", **options)
    marker = token()
    rcpt, final = relay_one(proxy, "user@limit.test", marker)
    attempts = proxy.records("delivery attempt failed")
    if limit is None:
        assert rcpt.code == 451 and "refused" in rcpt.text.lower(), rcpt
        assert [a["peer"] for a in attempts] == [f"mx{n}.limit.test[127.0.0.{10 + n}]" for n in range(1, 6)]
        assert not good.messages()
    else:
        assert (rcpt.code, final.code) == (250, 250), (rcpt, final)
        assert len(attempts) == 6
        assert len(with_marker(good.wait_for_messages(1), marker)) == 1
