"""Issue 7 acceptance, the outbound TLS policy matrix: one real-peer test per case.

The remote MX hosts are real Postfix instances with STARTTLS, found through MX records
served by a real Unbound.  They share one port P on different loopback addresses:

    mx.remote.test, mx2.remote.test  127.0.0.1:P  certificate for mx.remote.test,
                                                   mx2.remote.test, nexthop.test (test CA)
    mx1.wrongname.test               127.0.0.2:P  certificate for unrelated.example.net (test CA)
    mx1.expired.test                 127.0.0.3:P  certificate for its name, expired (test CA)
    mx1.selfsigned.test              127.0.0.4:P  self-signed certificate for its name

Every destination domain is accepted by every remote, so mail that went to the wrong
server would be found there.  The Postfix instances are shared by the module; what a test
sent is recognised by a marker in the Subject (delivered messages) or by the smtpd
sessions that started after the test began (Postfix's per-session command counts).

Only the peers that answer STARTTLS badly are scripted: no real SMTP server refuses
STARTTLS with 454, or says 220 and then closes or falls silent, on demand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.dns_server import Unbound, requires_unbound
from tests.integration.peers import (
    LOOPBACK,
    CertFiles,
    Pki,
    PostfixInstance,
    free_port,
    listening_on,
    postfix_tls_server_params,
    wait_until,
)
from tests.integration.outbound_peers import OutboundProxy, assert_deferred, delivered, swaks_via, token

pytestmark = [pytest.mark.integration, requires_unbound]

REPO = Path(__file__).resolve().parents[2]

DOMAINS = [
    "remote.test", "nexthop.test", "other.test",
    "wrongname.test", "wrongname-only.test",
    "expired.test", "expired-only.test",
    "selfsigned.test", "selfsigned-only.test",
    "starttls454.test",
]

GOOD_ADDRESS = "127.0.0.1"
BAD_ADDRESSES = {"wrongname": "127.0.0.2", "expired": "127.0.0.3", "selfsigned": "127.0.0.4"}
# OpenSSL's verdict (or smtproxy's own reason) per bad certificate, as smtproxy logs it
BAD_REASONS = {
    "wrongname": "hostname_mismatch",
    "expired": "certificate_has_expired",
    "selfsigned": "self-signed_certificate",
}

DNS_RECORDS = [
    "mx.remote.test. A 127.0.0.1",
    "mx2.remote.test. A 127.0.0.1",
    "remote.test. MX 10 mx.remote.test.",
    "nexthop.test. MX 10 mx.remote.test.",
    "other.test. MX 10 mx.remote.test.",
    *(record for kind, address in BAD_ADDRESSES.items() for record in (
        f"mx1.{kind}.test. A {address}",
        f"{kind}.test. MX 10 mx1.{kind}.test.",
        f"{kind}.test. MX 20 mx2.remote.test.",
        f"{kind}-only.test. MX 10 mx1.{kind}.test.",
    )),
]


# ----------------------------------------------------------------------------- peers


@dataclasses.dataclass
class Remotes:
    port: int
    ca_file: Path
    good: PostfixInstance
    good_cert: CertFiles
    bad: dict[str, PostfixInstance]
    bad_certs: dict[str, CertFiles]

    def all(self) -> list[PostfixInstance]:
        return [self.good, *self.bad.values()]

    def holders(self, marker: str) -> list[str]:
        """Host names of the remotes that have a message with `marker`."""
        return [remote.hostname for remote in self.all() if any(marker.encode() in m for m in remote.messages())]


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory) -> Iterator[Unbound]:
    # the real Unbound of tests/integration/dns_server.py, once per module (unbound_factory
    # is function-scoped; one server answers every test here)
    server = Unbound(tmp_path_factory.mktemp("unbound"), DNS_RECORDS).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remotes(tmp_path_factory) -> Iterator[Remotes]:
    pki = Pki(tmp_path_factory.mktemp("policy-pki"))
    port = free_port()
    now = datetime.datetime.now(datetime.timezone.utc)
    good_cert = pki.server_cert("mx.remote.test", "mx2.remote.test", "nexthop.test")
    bad_certs = {
        "wrongname": pki.server_cert("unrelated.example.net"),
        "expired": pki.server_cert("mx1.expired.test", not_before=now - datetime.timedelta(days=30),
                                   not_after=now - datetime.timedelta(days=1)),
        "selfsigned": pki.self_signed_cert("mx1.selfsigned.test"),
    }
    with contextlib.ExitStack() as stack:
        good = stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("remote-good"), domains=DOMAINS, hostname="mx.remote.test", port=port,
            extra_main_cf=postfix_tls_server_params(good_cert)))
        bad = {}
        for kind, address in BAD_ADDRESSES.items():
            # its own port on 127.0.0.1 (unused) and the shared port on its own address
            bad[kind] = stack.enter_context(PostfixInstance(
                tmp_path_factory.mktemp(f"remote-{kind}"), domains=DOMAINS, hostname=f"mx1.{kind}.test",
                extra_main_cf=postfix_tls_server_params(bad_certs[kind]),
                extra_master_cf=[f"{address}:{port} inet n - n - - smtpd"]))
            wait_until(lambda: listening_on(address, port), 10, f"Postfix smtpd on {address}:{port}")
        yield Remotes(port, pki.ca_file, good, good_cert, bad, bad_certs)


@pytest.fixture(autouse=True)
def _report_remote_logs(request) -> None:
    """A failing test's report shows what each shared remote logged during the test."""
    if "remotes" not in request.fixturenames:
        return
    from tests.integration.conftest import _attach_log

    shared: Remotes = request.getfixturevalue("remotes")
    for remote in shared.all():
        offset = len(remote.log_text())
        _attach_log(request, f"postfix maillog of {remote.hostname} during the test",
                    lambda remote=remote, offset=offset: remote.log_text()[offset:])


class SmtpdSessions:
    """The smtpd sessions a Postfix instance logs after a point in time (the test's start)."""

    def __init__(self, remote: PostfixInstance) -> None:
        self.remote = remote
        self.offset = len(remote.log_text())

    def text(self) -> str:
        return self.remote.log_text()[self.offset:]

    def disconnects(self, at_least: int = 1, timeout: float = 15.0) -> list[str]:
        """The command counts (`ehlo=2 starttls=1 quit=1 commands=4`) of every session that
        began after the offset, once all of them (and at least `at_least`) have ended."""

        def ended() -> list[str] | None:
            text = self.text()
            counts = []
            for connect in re.finditer(r"smtpd\[(\d+)\]: connect from ", text):
                end = re.compile(rf"smtpd\[{connect.group(1)}\]: disconnect from \S+ (.*)$", re.M)
                found = end.search(text, connect.end())
                if found is None:
                    return None
                counts.append(found.group(1))
            return counts if len(counts) >= at_least else None

        return wait_until(ended, timeout, f"{at_least} finished smtpd session(s) in {self.remote.maillog}")


class ScriptedStarttls:
    """A scripted SMTP peer (threads, plain sockets) that offers STARTTLS and answers it as
    `starttls` says: "454" (`454 4.7.0`, then carries on in plaintext), "close" (`220`,
    then closes without a byte of TLS) or "hang" (`220`, then silence until the client
    goes). It accepts everything else, and records every command line and message."""

    def __init__(self, starttls: str) -> None:
        self.starttls = starttls
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, name="refuses-454", daemon=True)

    def start(self) -> ScriptedStarttls:
        self._accept.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._accept.join(5)
        for thread in self._threads:
            thread.join(5)
        self.listener.close()

    def verbs(self) -> list[str]:
        with self._lock:
            return [line.split(" ", 1)[0].upper() for line in self.commands]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._session, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        buffer = b""

        def line() -> bytes | None:
            nonlocal buffer
            while b"\r\n" not in buffer:
                chunk = conn.recv(4096)
                if not chunk:
                    return None
                buffer += chunk
            text, _, buffer = buffer.partition(b"\r\n")
            return text

        with conn, contextlib.suppress(OSError):
            conn.sendall(b"220 mx.starttls454.test ESMTP scripted peer\r\n")
            while (command := line()) is not None:
                text = command.decode("latin-1")
                with self._lock:
                    self.commands.append(text)
                verb = text.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    conn.sendall(b"250-mx.starttls454.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n")
                elif verb == "STARTTLS" and self.starttls == "454":
                    conn.sendall(b"454 4.7.0 TLS not available due to local problem\r\n")
                elif verb == "STARTTLS":
                    conn.sendall(b"220 2.0.0 Ready to start TLS\r\n")
                    if self.starttls == "hang":
                        while conn.recv(4096):
                            pass
                    return
                elif verb == "DATA":
                    conn.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    lines = []
                    while (data := line()) not in (None, b"."):
                        lines.append(data)
                    with self._lock:
                        self.messages.append(b"\r\n".join(lines))
                    conn.sendall(b"250 2.0.0 Ok: queued\r\n")
                elif verb == "QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:  # HELO MAIL RCPT RSET NOOP
                    conn.sendall(b"250 2.0.0 Ok\r\n")


# ----------------------------------------------------------------------------- helpers


def proxy_for(start_outbound, remotes: Remotes, dns: Unbound, policy: str, *, routes: dict | None = None,
              **outbound) -> OutboundProxy:
    return start_outbound(routes or {}, policy=policy, dns={"nameservers": [dns.nameserver]},
                          port=remotes.port, **outbound)


def received_tls(message: bytes) -> tuple[str, str] | None:
    """(protocol, cipher) from the remote Postfix's own Received header, None: plaintext."""
    header = message.decode(errors="replace").split("\n\n", 1)[0]
    found = re.search(r"\(using (TLSv[\d.]+) with cipher (\S+) ", header)
    return (found.group(1), found.group(2)) if found else None


def logged(proxy: OutboundProxy, text: str, *, sessions: int = 1, after: int = 0) -> list[dict]:
    """smtproxy's log records (from index `after`) whose event contains `text`."""
    return [r for r in proxy.settled_logs(sessions)[after:] if text in r["event"]]


def established(proxy: OutboundProxy, *, sessions: int = 1, after: int = 0) -> list[str]:
    return [r["event"] for r in logged(proxy, " TLS connection established to ", sessions=sessions, after=after)]


def assert_no_mail_in(sessions: SmtpdSessions, at_least: int = 1) -> list[str]:
    """The remote saw STARTTLS and no MAIL in each session since the test began."""
    counts = sessions.disconnects(at_least)
    for count in counts:
        assert "starttls=1" in count and "mail=" not in count, counts
    return counts


# ----------------------------------------------------------------------------- encrypt vs 454


@pytest.fixture
def refuses_454() -> Iterator[ScriptedStarttls]:
    peer = ScriptedStarttls("454").start()
    yield peer
    peer.stop()


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_starttls_refused_with_454(level, refuses_454, start_outbound):
    """encrypt: 454 to STARTTLS is a 4xx and no MAIL goes out in plaintext; may (the
    control, which shows the peer would record it): the mail goes out in plaintext."""
    proxy = start_outbound({"starttls454.test": f"[127.0.0.1]:{refuses_454.port}"}, default_level=level)
    marker = token()
    result = swaks_via(proxy, marker, "user@starttls454.test")
    if level == "encrypt":
        assert_deferred(result, f"TLS is required, but host 127.0.0.1[127.0.0.1]:{refuses_454.port} "
                                "refused to start TLS: 454 4.7.0 TLS not available")
        wait_until(lambda: "QUIT" in refuses_454.verbs(), 10, "QUIT at the scripted peer")
        assert refuses_454.verbs() == ["EHLO", "STARTTLS", "QUIT"]
        assert not refuses_454.messages
    else:
        assert result.returncode == 0, result.stdout
        assert refuses_454.verbs()[:5] == ["EHLO", "STARTTLS", "MAIL", "RCPT", "DATA"]
        assert any(marker.encode() in message for message in refuses_454.messages)
    assert not established(proxy)


@pytest.mark.parametrize("starttls", ["close", "hang"])
@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_220_to_starttls_then_no_handshake(level, starttls, start_outbound):
    """A 220 to STARTTLS followed by a close or by silence is a failed handshake: `may`
    retries the server in plaintext on a new connection (Postfix's opportunistic TLS, here
    without the delay before it); `encrypt` defers, and no MAIL goes out."""
    peer = ScriptedStarttls(starttls).start()
    try:
        proxy = start_outbound({"starttls220.test": f"[127.0.0.1]:{peer.port}"}, default_level=level,
                               handshake_timeout=1, plaintext_fallback_delay=0)
        marker = token()
        result = swaks_via(proxy, marker, "user@starttls220.test")
        reason = {"close": "lost_connection", "hang": "handshake_timeout"}[starttls]
        where = f"127.0.0.1[127.0.0.1]:{peer.port}"
        if level == "encrypt":
            assert_deferred(result, f"TLS handshake with {where} failed: {reason}")
            assert peer.verbs() == ["EHLO", "STARTTLS"]
        else:
            assert result.returncode == 0, result.stdout
            assert peer.verbs()[:6] == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA"], peer.verbs()
            assert any(marker.encode() in message for message in peer.messages)
        assert logged(proxy, f"SSL_connect error to {where}: {reason}")
        assert not established(proxy)
    finally:
        peer.stop()


@pytest.mark.parametrize("level", ["may", "encrypt"])
def test_handshake_refused_by_a_real_postfix(level, remotes, dns_server, start_outbound):
    """No TLS 1.2 suite in common (the remote has an ECDSA certificate, the policy excludes
    aECDSA): Postfix ends the handshake with an alert. `may` delivers in plaintext to the
    same server (here without the delay before it), `encrypt` defers with the handshake's
    reason and sends no MAIL."""
    sessions = SmtpdSessions(remotes.good)
    proxy = proxy_for(start_outbound, remotes, dns_server,
                      f"remote.test {level} protocols=<=TLSv1.2 exclude=aECDSA\n", plaintext_fallback_delay=0)
    marker = token()
    result = swaks_via(proxy, marker)
    where = f"mx.remote.test[127.0.0.1]:{remotes.port}"
    assert logged(proxy, f"SSL_connect error to {where}: sslv3_alert_handshake_failure")
    wait_until(lambda: "no shared cipher" in sessions.text(), 10, "Postfix's TLS error in its log")
    if level == "encrypt":
        assert_deferred(result, f"TLS handshake with {where} failed: sslv3_alert_handshake_failure")
        assert sessions.disconnects() == ["ehlo=1 starttls=0/1 commands=1/2"]  # and no MAIL
    else:
        assert result.returncode == 0, result.stdout
        assert received_tls(delivered(remotes.good, marker)) is None
        assert remotes.holders(marker) == ["mx.remote.test"]
    assert not established(proxy)


def test_may_defers_a_server_whose_handshake_fails_until_the_fallback_delay(remotes, dns_server, start_outbound):
    """As Postfix: after a failed handshake `may` mail is not sent in plaintext at once
    (whoever breaks handshakes on the path would read it), but deferred until the server
    has failed for plaintext_fallback_delay; the handshake failure is still reported."""
    sessions = SmtpdSessions(remotes.good)
    proxy = proxy_for(start_outbound, remotes, dns_server, "remote.test may protocols=<=TLSv1.2 exclude=aECDSA\n")
    marker = token()
    where = f"mx.remote.test[127.0.0.1]:{remotes.port}"
    first, second = swaks_via(proxy, marker), swaks_via(proxy, marker)
    assert_deferred(first, f"TLS handshake with {where} failed: sslv3_alert_handshake_failure; "
                           "not retried without TLS for another 300 s")
    assert_deferred(second, "not retried without TLS for another")
    assert sessions.disconnects(2) == ["ehlo=1 starttls=0/1 commands=1/2"] * 2  # no plaintext session, no MAIL
    assert remotes.holders(marker) == []
    assert logged(proxy, f"SSL_connect error to {where}: sslv3_alert_handshake_failure")


# ----------------------------------------------------------------------------- verify


@pytest.mark.parametrize("kind", list(BAD_ADDRESSES))
def test_verify_defers_a_bad_certificate(kind, remotes, dns_server, start_outbound):
    domain = f"{kind}-only.test"
    proxy = proxy_for(start_outbound, remotes, dns_server, f"{domain} verify\n", ca_file=str(remotes.ca_file))
    sessions = SmtpdSessions(remotes.bad[kind])
    marker = token()
    result = swaks_via(proxy, marker, f"user@{domain}")
    where = f"mx1.{kind}.test[{BAD_ADDRESSES[kind]}]:{remotes.port}"
    assert_deferred(result, f"Server certificate not verified: {where}: {BAD_REASONS[kind]}")
    assert logged(proxy, f"server certificate verification failed for {where}: {BAD_REASONS[kind]}")
    assert not established(proxy)
    assert_no_mail_in(sessions)
    assert remotes.holders(marker) == []


@pytest.mark.parametrize("kind", list(BAD_ADDRESSES))
def test_verify_moves_on_to_the_second_mx_with_a_good_certificate(kind, remotes, dns_server, start_outbound):
    domain = f"{kind}.test"
    # default_level may: were the table ignored, the first MX would get the mail
    proxy = proxy_for(start_outbound, remotes, dns_server, f"{domain} verify\n", ca_file=str(remotes.ca_file))
    sessions = SmtpdSessions(remotes.bad[kind])
    marker = token()
    result = swaks_via(proxy, marker, f"user@{domain}")
    assert result.returncode == 0, result.stdout
    message = delivered(remotes.good, marker)
    assert received_tls(message) is not None, message
    assert remotes.holders(marker) == ["mx.remote.test"]
    bad = f"mx1.{kind}.test[{BAD_ADDRESSES[kind]}]:{remotes.port}"
    assert logged(proxy, f"server certificate verification failed for {bad}: {BAD_REASONS[kind]}")
    lines = established(proxy)
    assert len(lines) == 1 and lines[0].startswith(
        f"Verified TLS connection established to mx2.remote.test[127.0.0.1]:{remotes.port}: TLSv1.3 with cipher "
    ), lines
    assert_no_mail_in(sessions)


# ----------------------------------------------------------------------------- fingerprint


@pytest.mark.parametrize("digests", ["certificate", "public key", "second of two"])
def test_fingerprint_match_delivers(digests, remotes, dns_server, start_outbound):
    good = remotes.good_cert
    other = remotes.bad_certs["wrongname"].fingerprint
    match = {"certificate": good.fingerprint, "public key": good.pkey_fingerprint,
             "second of two": f"{other}|{good.pkey_fingerprint}"}[digests]
    # no ca_file: fingerprint needs no CA, and the chain is not trusted by the system store
    proxy = proxy_for(start_outbound, remotes, dns_server, f"remote.test fingerprint match={match}\n")
    marker = token()
    result = swaks_via(proxy, marker, "user@remote.test")
    assert result.returncode == 0, result.stdout
    assert received_tls(delivered(remotes.good, marker)) is not None
    lines = established(proxy)
    assert len(lines) == 1 and lines[0].startswith(
        f"Verified TLS connection established to mx.remote.test[127.0.0.1]:{remotes.port}: TLSv1."), lines


def test_fingerprint_mismatch_defers_and_delivers_nothing(remotes, dns_server, start_outbound):
    wrong = remotes.bad_certs["wrongname"]
    policy = f"remote.test fingerprint match={wrong.fingerprint}|{wrong.pkey_fingerprint}\n"
    proxy = proxy_for(start_outbound, remotes, dns_server, policy, ca_file=str(remotes.ca_file))
    sessions = SmtpdSessions(remotes.good)
    marker = token()
    result = swaks_via(proxy, marker, "user@remote.test")
    where = f"mx.remote.test[127.0.0.1]:{remotes.port}"
    assert_deferred(result, f"Server certificate not verified: {where}: fingerprint_mismatch")
    assert logged(proxy, f"server certificate verification failed for {where}: fingerprint_mismatch")
    assert not established(proxy)
    assert_no_mail_in(sessions)
    assert remotes.holders(marker) == []


# ----------------------------------------------------------------------------- secure


@pytest.mark.parametrize(("domain", "entry"), [
    ("remote.test", "secure"),  # nexthop:dot-nexthop; mx.remote.test is under .remote.test
    ("nexthop.test", "secure match=nexthop"),  # the certificate names nexthop.test itself
])
def test_secure_match_delivers(domain, entry, remotes, dns_server, start_outbound):
    proxy = proxy_for(start_outbound, remotes, dns_server, f"{domain} {entry}\n", ca_file=str(remotes.ca_file))
    marker = token()
    result = swaks_via(proxy, marker, f"user@{domain}")
    assert result.returncode == 0, result.stdout
    assert received_tls(delivered(remotes.good, marker)) is not None
    lines = established(proxy)
    assert len(lines) == 1 and lines[0].startswith(
        f"Verified TLS connection established to mx.remote.test[127.0.0.1]:{remotes.port}: TLSv1."), lines


def test_secure_checks_a_routed_nexthop_without_its_port(remotes, dns_server, start_outbound):
    """`other.test nexthop.test:P` (MX lookup of nexthop.test, port P): the certificate is
    checked against nexthop.test; the port is part of the route, not of the name."""
    proxy = proxy_for(start_outbound, remotes, dns_server, "", routes={"other.test": f"nexthop.test:{remotes.port}"},
                      default_level="secure", ca_file=str(remotes.ca_file))
    marker = token()
    result = swaks_via(proxy, marker, "user@other.test")
    assert result.returncode == 0, result.stdout
    assert received_tls(delivered(remotes.good, marker)) is not None
    assert established(proxy)[0].startswith(f"Verified TLS connection established to mx.remote.test[127.0.0.1]:"
                                            f"{remotes.port}: TLSv1.")


def test_a_tls_session_is_offered_only_under_the_name_it_was_made_for(remotes, dns_server, start_outbound):
    """servername=nexthop: remote.test and nexthop.test share an MX host but send different
    SNI names, so each gets its own TLS session (RFC 8446 4.2.11); the control is a second
    message to nexthop.test, which resumes its own."""
    policy = "".join(f"{domain} may servername=nexthop connection_reuse=no\n" for domain in ("remote.test", "nexthop.test"))
    proxy = proxy_for(start_outbound, remotes, dns_server, policy)
    for nth, domain in enumerate(("remote.test", "nexthop.test", "nexthop.test"), start=1):
        marker = token()
        assert swaks_via(proxy, marker, f"user@{domain}").returncode == 0
        delivered(remotes.good, marker)
        proxy.settled_logs(nth)
    resumed = [r["resumed"] for r in logged(proxy, " TLS connection established to ", sessions=3)]
    assert resumed == [False, False, True], resumed


@pytest.mark.parametrize(("domain", "entry"), [
    ("remote.test", "secure match=nexthop"),  # mx.remote.test is not remote.test itself
    ("other.test", "secure"),  # the MX host's certificate names neither other.test nor a subdomain
])
def test_secure_mismatch_defers(domain, entry, remotes, dns_server, start_outbound):
    proxy = proxy_for(start_outbound, remotes, dns_server, f"{domain} {entry}\n", ca_file=str(remotes.ca_file))
    sessions = SmtpdSessions(remotes.good)
    marker = token()
    result = swaks_via(proxy, marker, f"user@{domain}")
    where = f"mx.remote.test[127.0.0.1]:{remotes.port}"
    assert_deferred(result, f"Server certificate not verified: {where}: hostname_mismatch")
    # the chain is trusted, only the name is wrong: Untrusted, as posttls-finger 3.7 says it
    # (Postfix checks the name inside OpenSSL's verification: num=62:hostname mismatch)
    failed = logged(proxy, f"server certificate verification failed for {where}: hostname_mismatch")
    assert failed and failed[0]["peer_trust"] == "untrusted", failed
    assert_no_mail_in(sessions)
    assert remotes.holders(marker) == []


def test_verify_accepts_what_secure_refuses(remotes, dns_server, start_outbound):
    """The control for other.test above: the same server passes `verify` (match=hostname)."""
    proxy = proxy_for(start_outbound, remotes, dns_server, "other.test verify\n", ca_file=str(remotes.ca_file))
    marker = token()
    assert swaks_via(proxy, marker, "user@other.test").returncode == 0
    delivered(remotes.good, marker)
    assert established(proxy)[0].startswith("Verified TLS connection established to mx.remote.test[")


# ----------------------------------------------------------------------------- protocols, exclude


def send_and_read_tls(proxy: OutboundProxy, remotes: Remotes) -> tuple[str, str]:
    """Send one message to remote.test; the (protocol, cipher) the remote Postfix put in its
    Received header, checked against its log and smtproxy's log line."""
    sessions = SmtpdSessions(remotes.good)
    marker = token()
    result = swaks_via(proxy, marker, "user@remote.test")
    assert result.returncode == 0, result.stdout
    tls = received_tls(delivered(remotes.good, marker))
    assert tls is not None
    protocol, cipher = tls
    # Postfix's own log line (the connection itself stays open in smtproxy's cache)
    postfix_line = re.compile(r"TLS connection established from unknown\[127\.0\.0\.1\]: (\S+) with cipher (\S+) ")
    assert wait_until(lambda: postfix_line.search(sessions.text()), 10, "Postfix's TLS log line").groups() == tls
    lines = established(proxy)
    assert len(lines) == 1 and lines[0].startswith(
        f"Untrusted TLS connection established to mx.remote.test[127.0.0.1]:{remotes.port}: "
        f"{protocol} with cipher {cipher} "), lines
    return protocol, cipher


@pytest.mark.parametrize(("protocols", "expected"), [
    (None, "TLSv1.3"),  # the control: the remote would speak TLS 1.3
    ("<=TLSv1.2", "TLSv1.2"),
    ("!TLSv1.3", "TLSv1.2"),
])
def test_protocols_restrict_the_negotiated_version(protocols, expected, remotes, dns_server, start_outbound):
    entry = "remote.test encrypt" + (f" protocols={protocols}" if protocols else "")
    proxy = proxy_for(start_outbound, remotes, dns_server, entry + "\n")
    assert send_and_read_tls(proxy, remotes)[0] == expected


def test_exclude_changes_the_tls12_cipher(remotes, dns_server, start_outbound):
    base = proxy_for(start_outbound, remotes, dns_server, "remote.test encrypt protocols=<=TLSv1.2\n")
    protocol, cipher = send_and_read_tls(base, remotes)
    assert protocol == "TLSv1.2" and "GCM" in cipher, cipher
    excluding = proxy_for(start_outbound, remotes, dns_server,
                          "remote.test encrypt protocols=<=TLSv1.2 exclude=AESGCM\n")
    protocol, other = send_and_read_tls(excluding, remotes)
    assert protocol == "TLSv1.2" and other != cipher and "GCM" not in other, (cipher, other)


# ----------------------------------------------------------------------------- s/qmail tlsdestinations


def smtproxy_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smtproxy", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)


@dataclasses.dataclass(frozen=True)
class Outcome:
    reply: str  # "250" or the 4xx reply line
    delivered_to: tuple[str, ...]  # remotes holding the message
    tls: tuple[str, ...]  # smtproxy's "... TLS connection established to HOST[ADDR]" prefixes


def outcome(proxy: OutboundProxy, remotes: Remotes, domain: str, nth: int) -> Outcome:
    """Send one message (the `nth` MTA session of this proxy) and say what became of it."""
    before = len(proxy.settled_logs(nth - 1))
    marker = token()
    result = swaks_via(proxy, marker, f"user@{domain}")
    if result.returncode == 0:
        delivered(remotes.good, marker)
        reply = "250"
    else:
        reply = re.search(r"<\*\* (4\d\d \d\.\d\.\d .*)", result.stdout).group(1)
    tls = tuple(line.split(":")[0] for line in established(proxy, sessions=nth, after=before))
    return Outcome(reply, tuple(remotes.holders(marker)), tls)


def test_qmail_tlsdestinations_give_the_same_results_as_the_postfix_table(
        tmp_path, remotes, dns_server, start_outbound):
    ca = remotes.ca_file
    good, wrong = remotes.good_cert, remotes.bad_certs["wrongname"]
    hex_of = lambda fingerprint: fingerprint.replace(":", "")  # noqa: E731  (s/qmail writes bare hex)
    tlsdestinations = tmp_path / "tlsdestinations"
    tlsdestinations.write_text(
        f"%remote.test:={hex_of(good.fingerprint)}\n"
        f"%other.test:={hex_of(wrong.fingerprint)}\n"
        f"wrongname.test:{ca}\n"
        f"expired-only.test:{ca}\n"
        f"=nexthop.test:{ca}\n"
    )
    converted = smtproxy_cli("policy", "import-qmail", str(tlsdestinations))
    assert converted.returncode == 0, converted.stderr
    postfix_table = (
        f"remote.test fingerprint match={good.fingerprint}\n"
        f"other.test fingerprint match={wrong.fingerprint}\n"
        f"wrongname.test verify ca_file={ca}\n"
        f"expired-only.test verify ca_file={ca}\n"
        f"nexthop.test secure match=nexthop ca_file={ca}\n"
    )
    # no global ca_file: only the per-destination CA files can make verify/secure pass
    from_qmail = proxy_for(start_outbound, remotes, dns_server, converted.stdout)
    from_postfix = proxy_for(start_outbound, remotes, dns_server, postfix_table)
    port = remotes.port
    expected = {
        "remote.test": Outcome("250", ("mx.remote.test",),
                               ("Verified TLS connection established to mx.remote.test[127.0.0.1]",)),
        "other.test": Outcome(f"451 4.7.5 Server certificate not verified: mx.remote.test[127.0.0.1]:{port}: "
                              "fingerprint_mismatch", (), ()),
        "wrongname.test": Outcome("250", ("mx.remote.test",),
                                  ("Verified TLS connection established to mx2.remote.test[127.0.0.1]",)),
        "expired-only.test": Outcome("451 4.7.5 Server certificate not verified: "
                                     f"mx1.expired.test[127.0.0.3]:{port}: certificate_has_expired", (), ()),
        "nexthop.test": Outcome("250", ("mx.remote.test",),
                                ("Verified TLS connection established to mx.remote.test[127.0.0.1]",)),
    }
    for nth, (domain, wanted) in enumerate(expected.items(), start=1):
        assert outcome(from_postfix, remotes, domain, nth) == wanted, domain
        assert outcome(from_qmail, remotes, domain, nth) == wanted, domain


# ----------------------------------------------------------------------------- smtproxy policy


def test_policy_command_prints_what_the_running_proxy_decides(remotes, dns_server, start_outbound):
    fingerprint = remotes.good_cert.fingerprint
    proxy = proxy_for(start_outbound, remotes, dns_server,
                      f"# partners\nremote.test fingerprint match={fingerprint}\n.sub.test secure\n",
                      default_level="encrypt")
    config = proxy.process.config_path
    policy_file = config.parent / "tls_policy"

    table = smtproxy_cli("policy", "--config", str(config), "remote.test")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[:3] == ["nexthop: remote.test", "level: fingerprint", f"match: {fingerprint}"], lines
    assert lines[-1] == f"source: policy_file {policy_file} line 2 (remote.test)", lines

    parent = smtproxy_cli("policy", "--config", str(config), "mx.sub.test")
    assert parent.returncode == 0, parent.stderr
    assert "level: secure" in parent.stdout.splitlines()
    assert parent.stdout.splitlines()[-1] == f"source: policy_file {policy_file} line 3 (.sub.test)"

    default = smtproxy_cli("policy", "--config", str(config), "other.test")
    assert default.returncode == 0, default.stderr
    lines = default.stdout.splitlines()
    assert lines[:2] == ["nexthop: other.test", "level: encrypt"], lines
    assert lines[-1] == "source: default_level", lines

    # the running proxy with the same configuration decides the same, and acts on it
    cases = (("remote.test", "fingerprint", "Verified"), ("other.test", "encrypt", "Untrusted"))
    for nth, (domain, level, trust) in enumerate(cases, start=1):
        before = len(proxy.settled_logs(nth - 1))
        marker = token()
        assert swaks_via(proxy, marker, f"user@{domain}").returncode == 0
        delivered(remotes.good, marker)
        decided = [r for r in proxy.settled_logs(nth)[before:] if r["event"] == "policy"]
        cli = smtproxy_cli("policy", "--config", str(config), domain).stdout.splitlines()
        # (the record's own "level" key is structlog's log level: outbound/server.py logs the
        # policy level as level=..., which add_log_level overwrites; the source survives)
        assert decided and f"level: {level}" in cli, (decided, cli)
        assert cli[-1] == f"source: {decided[0]['source']}", (cli, decided)
        lines = established(proxy, sessions=nth, after=before)
        assert lines[0].startswith(f"{trust} TLS connection established to mx.remote.test["), lines
