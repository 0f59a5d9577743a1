"""Issue 2 acceptance: real clients -> smtproxy -> a real plaintext Postfix (or smtp-sink).

Every test asserts on what arrived at the far side (Postfix's Maildir, smtp-sink's dump,
Postfix's log), on reply codes and on smtproxy's own log lines.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import MISSING, SMTP, AuthResult

from smtproxy.tls.engine import TlsEngine
from tests.integration.peers import (
    CertFiles,
    Conversation,
    Pki,
    PostfixInstance,
    RawSmtpClient,
    SmtpSink,
    SmtproxyProcess,
    flood_without_reading,
    free_port,
    openssl_s_client,
    posttls_finger,
    run_swaks,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

HOSTNAME = "mx.example.test"


@dataclasses.dataclass
class Proxy:
    process: SmtproxyProcess
    port: int
    tls_port: int

    def handshakes(self) -> list[dict]:
        return [r for r in self.process.logs() if "TLS connection established" in r["event"]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def ecdsa_cert(pki) -> CertFiles:
    return pki.server_cert(HOSTNAME)


@pytest.fixture(scope="module")
def rsa_cert(pki) -> CertFiles:
    return pki.server_cert(HOSTNAME, key_type=trustme.KeyType.RSA)


@pytest.fixture(scope="module")
def postfix(tmp_path_factory) -> Iterator[PostfixInstance]:
    """The plaintext legacy MTA: trusts XCLIENT from loopback, like a real deployment would."""
    with PostfixInstance(tmp_path_factory.mktemp("legacy"), xclient_hosts="127.0.0.0/8") as instance:
        yield instance


def _chain_config(chain: CertFiles | tuple[CertFiles, list[str]]) -> dict:
    """One ``[[inbound.certificates]]`` table: a CertFiles (default chain) or
    ``(CertFiles, server_names)``."""
    cert, names = (chain, []) if isinstance(chain, CertFiles) else chain
    table: dict = {"cert_file": str(cert.cert_file), "key_file": str(cert.key_file)}
    if names:
        table["server_names"] = list(names)
    return table


@pytest.fixture
def start_proxy(tmp_path, ecdsa_cert, rsa_cert):
    started: list[SmtproxyProcess] = []

    def start(backend_port: int, *, certificates=None, tls=None, **inbound) -> Proxy:
        port, tls_port = free_port(), free_port()
        chains = certificates if certificates is not None else [ecdsa_cert, rsa_cert]
        config = {
            "inbound": {
                "listen": [f"127.0.0.1:{port}"],
                "implicit_tls_listen": [f"127.0.0.1:{tls_port}"],
                "backend": f"127.0.0.1:{backend_port}",
                "hostname": HOSTNAME,
                **inbound,
                "certificates": [_chain_config(c) for c in chains],
                "tls": tls or {},
            },
            # Inbound only: the default outbound listener (127.0.0.1:10025) would collide
            # with every other smtproxy started at the same time.
            "outbound": {"listen": []},
            "metrics": {"listen": ""},
            "tlsrpt": {"socket": ""},
            "log": {"format": "json", "level": "info"},
        }
        process = SmtproxyProcess(write_config(tmp_path, config)).start()
        started.append(process)
        process.wait_ready()
        return Proxy(process, port, tls_port)

    yield start
    for process in started:
        process.stop()
        print(f"--- smtproxy output ---\n{process.output_text()}")  # shown for failed tests


def token() -> str:
    return uuid.uuid4().hex


def delivered_with(backend, marker: str, timeout: float = 20.0) -> bytes:
    def find() -> bytes | None:
        return next((m for m in backend.messages() if marker.encode() in m), None)

    return wait_until(find, timeout, f"a delivered message containing {marker}")


# ----------------------------------------------------------------------- delivery


def test_swaks_starttls_delivers_with_tls_trace_header(postfix, start_proxy):
    proxy = start_proxy(postfix.port)
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--tls", "--to", "user@example.test",
                       "--header", f"Subject: {marker}", "--body", "hello through STARTTLS")
    assert result.returncode == 0, result.stdout
    assert "<~  250" in result.stdout  # the final reply came back inside TLS
    message = delivered_with(postfix, marker).decode()
    assert re.search(r"Received: from \S+ \(unknown \[127\.0\.0\.1\]\)\s+\(using TLSv1\.3 with cipher "
                     r"TLS_\w+ \(\d+/\d+ bits\) key-exchange X25519 server-signature \S+ \(.+?\) "
                     r"server-digest SHA\d+\) \(No client certificate requested\)\s+"
                     r"by mx\.example\.test \(smtproxy\) with ESMTPS;", message), message
    assert "hello through STARTTLS" in message


def test_swaks_implicit_tls_delivers(postfix, start_proxy):
    proxy = start_proxy(postfix.port)
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{proxy.tls_port}", "--tls-on-connect",
                       "--to", "user@example.test", "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    message = delivered_with(postfix, marker).decode()
    assert "(using TLSv1.3 with cipher" in message
    assert "with ESMTPS;" in message


def test_plaintext_delivery_under_may_with_received_header(postfix, start_proxy):
    proxy = start_proxy(postfix.port, client_identity="received-header")
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--to", "user@example.test",
                       "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    message = delivered_with(postfix, marker).decode()
    assert re.search(r"Received: from \S+ \(unknown \[127\.0\.0\.1\]\)\s+by mx\.example\.test "
                     r"\(smtproxy\) with ESMTP;", message), message
    assert "using TLS" not in message


def test_encrypt_refuses_mail_before_starttls(postfix, start_proxy):
    proxy = start_proxy(postfix.port, security_level="encrypt")
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220
        assert "STARTTLS" in client.ehlo().text
        reply = client.command("MAIL FROM:<a@example.org>")
        assert reply.code == 530 and reply.lines[0].startswith("5.7.0")
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--tls", "--to", "user@example.test",
                       "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    delivered_with(postfix, marker)


def test_encrypt_per_client_network(postfix, start_proxy):
    proxy = start_proxy(postfix.port, security_level="may",
                        security_level_networks={"127.0.0.3/32": "encrypt"})
    for source, expected in (("127.0.0.3", 530), ("127.0.0.4", 250)):
        with RawSmtpClient(proxy.port, source=source) as client:
            client.read_reply()
            client.ehlo()
            assert client.command("MAIL FROM:<a@example.org>").code == expected, source


def _keywords(reply) -> list[str]:
    return [line.split(" ")[0].upper() for line in reply.lines[1:]]


@pytest.mark.parametrize("backend_kind", ["postfix", "smtp-sink"])
def test_ehlo_reply_is_rewritten(request, start_proxy, pki, backend_kind):
    # Both backends offer XCLIENT to the proxy (Postfix: smtpd_authorized_xclient_hosts),
    # smtp-sink also XFORWARD and AUTH; none of them is TLS-capable.
    backend = request.getfixturevalue("postfix" if backend_kind == "postfix" else "smtp_sink")
    with RawSmtpClient(backend.port) as direct:
        direct.read_reply()
        offered = _keywords(direct.ehlo())
    assert "XCLIENT" in offered and "STARTTLS" not in offered, offered
    proxy = start_proxy(backend.port)
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        before = _keywords(client.ehlo())
        client.starttls(pki.client_context(), server_hostname=HOSTNAME)
        after = _keywords(client.ehlo())
    assert before.count("STARTTLS") == 1 and "STARTTLS" not in after, (before, after)
    for keywords in (before, after):
        assert not {"XCLIENT", "XFORWARD"} & set(keywords), keywords
        for kept in ("PIPELINING", "SIZE", "8BITMIME", "ENHANCEDSTATUSCODES", "DSN"):
            assert kept in keywords, (kept, keywords)
    if "AUTH" in offered:  # auth_only_after_tls (default on)
        assert "AUTH" not in before and "AUTH" in after, (before, after)
    for optional in ("SMTPUTF8", "CHUNKING"):
        assert (optional in offered) == (optional in before) == (optional in after), optional


def test_bdat_chunks_are_relayed_to_postfix(postfix, start_proxy, pki):
    proxy = start_proxy(postfix.port)
    marker = token()
    first, second = f"Subject: {marker}\r\n\r\nfirst chunk, ".encode(), b"second chunk\r\n.not a dot line\r\n"
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        client.ehlo()
        client.starttls(pki.client_context(), server_hostname=HOSTNAME)
        assert "CHUNKING" in _keywords(client.ehlo())
        assert client.command("MAIL FROM:<a@example.org> BODY=8BITMIME").code == 250
        assert client.command("RCPT TO:<user@example.test>").code == 250
        client.send(f"BDAT {len(first)}\r\n".encode() + first)
        assert client.read_reply().code == 250
        client.send(f"BDAT {len(second)} LAST\r\n".encode() + second)
        assert client.read_reply().code == 250
        client.command("QUIT")
    message = delivered_with(postfix, marker).decode()
    assert "first chunk, second chunk\n.not a dot line\n" in message, message
    assert "(using TLSv1.3 with cipher" in message and "with ESMTPS;" in message
    postfix.wait_for_log(r"disconnect from \S+ ehlo=2 mail=1 rcpt=1 bdat=2 quit=1 commands=7")


# ----------------------------------------------------------------------- handshake facts

SERVER_TEMP_KEY = {
    "X25519": "Server Temp Key: X25519",
    "ECDHE (P-256)": "Server Temp Key: ECDH, prime256v1",
    "ECDHE (P-384)": "Server Temp Key: ECDH, secp384r1",
    "DHE (2048 bits)": "Server Temp Key: DH, 2048 bits",
}


@pytest.mark.parametrize(
    "args, protocol, kex, signature",
    [
        (["-tls1_3", "-groups", "X25519", "-sigalgs", "ECDSA+SHA256"], "TLSv1.3", "X25519", "ECDSA (P-256)"),
        (["-tls1_3", "-groups", "P-256", "-sigalgs", "ECDSA+SHA256"], "TLSv1.3", "ECDHE (P-256)", "ECDSA (P-256)"),
        (["-tls1_3", "-groups", "P-384", "-sigalgs", "rsa_pss_rsae_sha256"], "TLSv1.3", "ECDHE (P-384)", "RSA-PSS (2048 bits)"),
        # TLS 1.2 (RFC 8422): supported_groups also bounds the curve of an ECDSA
        # certificate, so a P-256 chain needs P-256 listed; X25519 first wins the exchange.
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", "-groups", "X25519:P-256"], "TLSv1.2", "X25519", "ECDSA (P-256)"),
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256", "-groups", "P-256"], "TLSv1.2", "ECDHE (P-256)", "ECDSA (P-256)"),
        (["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384", "-groups", "X25519"], "TLSv1.2", "X25519", "RSA-PSS (2048 bits)"),
        (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-groups", "P-256"], "TLSv1.2", "ECDHE (P-256)", "RSA-PSS (2048 bits)"),
        (["-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384"], "TLSv1.2", "DHE (2048 bits)", "RSA-PSS (2048 bits)"),
    ],
    ids=["tls13-x25519", "tls13-p256", "tls13-p384-rsa", "tls12-ecdhe-ecdsa-x25519", "tls12-ecdhe-ecdsa-p256",
         "tls12-ecdhe-rsa-x25519", "tls12-ecdhe-rsa-p256", "tls12-dhe-rsa"],
)
def test_openssl_s_client_facts_match_the_real_handshake(postfix, start_proxy, args, protocol, kex, signature):
    proxy = start_proxy(postfix.port)
    marker = token()
    session = ("EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
               "DATA\r\n").encode()
    body = f"Subject: {marker}\r\n\r\nbody\r\n.\r\nQUIT\r\n".encode()
    # RCPT and DATA need their replies before the body: feed the body after a pause-free
    # pipeline is not allowed, so s_client gets the whole dialogue and the proxy's
    # pipelining support sorts it out (DATA is the last command of its group).
    result = openssl_s_client(proxy.port, args=args, input=session + body)
    assert f"Protocol  : {protocol}" in result.stdout or f"New, {protocol}" in result.stdout, result.stdout
    assert SERVER_TEMP_KEY[kex] in result.stdout, result.stdout
    line = next(r["event"] for r in proxy.handshakes())
    assert line.startswith("Anonymous TLS connection established from unknown[127.0.0.1]: ")
    assert f": {protocol} with cipher " in line
    assert f" key-exchange {kex} server-signature {signature} server-digest SHA" in line, line
    digest = re.search(r"Peer signing digest:\s+(\S+)", result.stdout).group(1)
    assert line.endswith(f"server-digest {digest}"), (line, digest)
    message = delivered_with(postfix, marker).decode()
    assert f"key-exchange {kex} server-signature {signature}" in message


def _s_client_facts(proxy: Proxy, args: list[str]) -> tuple[subprocess.CompletedProcess[str], str]:
    """One s_client STARTTLS session (EHLO, QUIT inside TLS); returns its result and our
    handshake log line for it."""
    after = len(proxy.process.logs())
    result = openssl_s_client(proxy.port, args=args, input=b"EHLO client.example\r\nQUIT\r\n")
    assert "221 " in result.stdout, result.stdout  # the session ran inside TLS to the end
    record = proxy.process.wait_for_log(lambda r: "TLS connection established" in r["event"], after=after)
    return result, record["event"]


def test_dh_param_file_sets_the_dhe_group(postfix, start_proxy, tmp_path):
    dh_file = tmp_path / "ffdhe3072.pem"
    subprocess.run(["openssl", "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt", "group:ffdhe3072",
                    "-out", str(dh_file)], check=True, capture_output=True, timeout=30)
    proxy = start_proxy(postfix.port, tls={"dh_param_file": str(dh_file)})
    result, line = _s_client_facts(proxy, ["-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384"])
    assert "Server Temp Key: DH, 3072 bits" in result.stdout, result.stdout
    assert " key-exchange DHE (3072 bits) server-signature RSA-PSS (2048 bits) " in line, line


def test_configured_groups_decide_the_key_exchange(postfix, start_proxy):
    # The client offers X25519 first (and sends its key share); the server allows only
    # P-384: TLS 1.3 needs a HelloRetryRequest, TLS 1.2 simply picks P-384.
    proxy = start_proxy(postfix.port, tls={"groups": ["P-384"]})
    for args in (["-tls1_3", "-groups", "X25519:P-384"],
                 ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-groups", "X25519:P-384"]):
        result, line = _s_client_facts(proxy, args)
        assert "Server Temp Key: ECDH, secp384r1" in result.stdout, result.stdout
        assert " key-exchange ECDHE (P-384) " in line, line
    result = openssl_s_client(proxy.port, args=["-groups", "X25519"], input=b"QUIT\r\n")
    assert "Server Temp Key" not in result.stdout, result.stdout  # no common group: no handshake
    proxy.process.wait_for_log(lambda r: r["event"].startswith("SSL_accept error from unknown[127.0.0.1]"))


def _subject_cn(s_client_output: str) -> str:
    return re.search(r"^subject=.*CN = ([^,\s]+)", s_client_output, re.M).group(1)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_a_session_resumes_only_under_the_server_name_it_was_made_for(postfix, start_proxy, pki, rsa_cert,
                                                                        tmp_path, version):
    """RFC 6066 section 3: a session made with one server name must not resume under
    another, whose certificate (here another chain) the client never saw: it gets a full
    handshake and that name's certificate. Under the same name it resumes."""
    a_cert, b_cert = pki.server_cert("a.example.test"), pki.server_cert("b.example.test")
    proxy = start_proxy(postfix.port, certificates=[rsa_cert, (a_cert, ["a.example.test"]),
                                                    (b_cert, ["b.example.test"])])
    session = tmp_path / "a.session"

    def connect(server_name: str, *args: str) -> str:
        return openssl_s_client(proxy.port, args=[version, "-servername", server_name, *args],
                                input=b"QUIT\r\n").stdout

    first = connect("a.example.test", "-sess_out", str(session))
    assert "\nNew, " in first and Pki.fingerprint_of_pem(first) == a_cert.fingerprint, first
    other_name = connect("b.example.test", "-sess_in", str(session))
    assert "\nNew, " in other_name and Pki.fingerprint_of_pem(other_name) == b_cert.fingerprint, other_name
    assert "\nReused, " in connect("a.example.test", "-sess_in", str(session))


def test_sni_and_key_type_pick_the_certificate_chain(postfix, start_proxy, pki, rsa_cert):
    a_ecdsa = pki.server_cert("a.example.test")
    b_ecdsa = pki.server_cert("b.example.test")
    b_rsa = pki.server_cert("b.example.test", key_type=trustme.KeyType.RSA)
    proxy = start_proxy(postfix.port, certificates=[
        rsa_cert,  # the default chain: RSA only
        (a_ecdsa, ["a.example.test"]),  # ECDSA only
        (b_ecdsa, ["b.example.test", "*.b.example.test", "a-and-b.example.test"]),
        (b_rsa, ["b.example.test", "*.b.example.test"]),  # side by side with b_ecdsa
    ])
    cases = [
        (["-noservername"], rsa_cert, "RSA-PSS (2048 bits)"),
        (["-servername", "unknown.example.test"], rsa_cert, "RSA-PSS (2048 bits)"),
        (["-servername", "a.example.test"], a_ecdsa, "ECDSA (P-256)"),
        (["-servername", "A.Example.TEST"], a_ecdsa, "ECDSA (P-256)"),
        (["-servername", "a-and-b.example.test"], b_ecdsa, "ECDSA (P-256)"),
        (["-servername", "b.example.test", "-sigalgs", "ECDSA+SHA256"], b_ecdsa, "ECDSA (P-256)"),
        (["-servername", "b.example.test", "-sigalgs", "rsa_pss_rsae_sha256"], b_rsa, "RSA-PSS (2048 bits)"),
        (["-servername", "mx1.b.example.test", "-sigalgs", "rsa_pss_rsae_sha256"], b_rsa, "RSA-PSS (2048 bits)"),
        (["-servername", "mx1.b.example.test", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"],
         b_ecdsa, "ECDSA (P-256)"),
        (["-servername", "b.example.test", "-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"],
         b_rsa, "RSA-PSS (2048 bits)"),
    ]
    expected_cn = {rsa_cert.fingerprint: HOSTNAME, a_ecdsa.fingerprint: "a.example.test",
                   b_ecdsa.fingerprint: "b.example.test", b_rsa.fingerprint: "b.example.test"}
    for args, chain, signature in cases:
        result, line = _s_client_facts(proxy, args)
        assert Pki.fingerprint_of_pem(result.stdout) == chain.fingerprint, (args, chain.cert_file.name, result.stdout)
        assert _subject_cn(result.stdout) == expected_cn[chain.fingerprint], (args, result.stdout)
        # The log names the key of the chain SNI chose (its detail comes from that chain).
        assert f" server-signature {signature} server-digest " in line, (args, line)
    # A client that can verify only ECDSA gets no RSA-only default chain.
    result = openssl_s_client(proxy.port, args=["-noservername", "-sigalgs", "ECDSA+SHA256"], input=b"QUIT\r\n")
    assert "BEGIN CERTIFICATE" not in result.stdout, result.stdout


def test_posttls_finger_resumes_and_our_log_says_resumed(postfix, start_proxy):
    proxy = start_proxy(postfix.port)
    result = posttls_finger(proxy.port, "-c", "-l", "may", "-r", "1")
    assert "Untrusted TLS connection established" in result.stdout or \
        "Anonymous TLS connection established" in result.stdout, result.stdout
    assert "Reusing old session" in result.stdout, result.stdout
    records = proxy.process.wait_for_log(lambda r: "TLS connection established" in r["event"] and r.get("resumed"))
    assert records["resumed"] is True
    first = proxy.handshakes()[0]
    assert first["resumed"] is False


@pytest.mark.parametrize(
    "args, tls",
    [
        (["-tls1_2", "-no_ticket"], {}),  # server-side session cache (session IDs)
        (["-tls1_2"], {"session_cache_size": 0}),  # RFC 5077 ticket, no cache needed
        (["-tls1_3"], {}),  # TLS 1.3 ticket
        (["-tls1_3", "-servername", "b.example.test"], {}),  # on a chain chosen by SNI
    ],
    ids=["tls12-session-cache", "tls12-ticket", "tls13-ticket", "tls13-ticket-sni"],
)
def test_openssl_resumes_and_our_log_says_resumed(postfix, start_proxy, pki, ecdsa_cert, tmp_path, args, tls):
    sni_chain = pki.server_cert("b.example.test")
    proxy = start_proxy(postfix.port, tls=tls, certificates=[ecdsa_cert, (sni_chain, ["b.example.test"])])
    session_file = tmp_path / "session.pem"
    first = openssl_s_client(proxy.port, args=[*args, "-sess_out", str(session_file)], input=b"QUIT\r\n")
    assert "221 " in first.stdout and session_file.exists(), first.stdout
    second = openssl_s_client(proxy.port, args=[*args, "-sess_in", str(session_file)], input=b"QUIT\r\n")
    assert "\nReused, TLSv1." in second.stdout, second.stdout
    resumed = proxy.process.wait_for_log(lambda r: "TLS connection established" in r["event"] and r["resumed"])
    assert [r["resumed"] for r in proxy.handshakes()] == [False, True]
    assert "server-signature" not in resumed["event"]  # nothing was signed this time
    # the resumed TLS 1.2 session shows no key exchange, but its ECDHE suite made the secret
    assert resumed["forward_secrecy"] is True, resumed


def test_a_tls12_session_id_survives_a_client_that_drops_the_connection(postfix, start_proxy, pki):
    """A client that closes its socket without close_notify (as many do after 221, and as
    sslyze does) must not take its session out of the server's cache: OpenSSL drops the
    session of a connection freed without a shutdown (TLS 1.0's rule; RFC 4346 lifted it),
    and every later resumption of it would fail."""
    proxy = start_proxy(postfix.port)
    context = pki.client_context(check_hostname=False)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_TICKET  # the server's session cache, not a ticket

    def connect(session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        client = context.wrap_socket(socket.create_connection(("127.0.0.1", proxy.tls_port), timeout=10),
                                     session=session)
        assert client.recv(4096).startswith(b"220 "), "no greeting"
        return client

    first = connect()
    session = first.session
    for attempt in range(3):
        logged = len(proxy.process.logs())
        first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()  # no close_notify: the TCP connection ends with a reset
        proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.1]", timeout=20,
                                   after=logged)
        first = connect(session)
        assert first.session_reused, f"attempt {attempt + 1}: the session was dropped from the server's cache"
    first.close()


# ----------------------------------------------------------------------- STARTTLS injection


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<evil@example.net>\r\n"])
def test_plaintext_pipelined_after_starttls_never_reaches_the_backend(postfix, start_proxy, pki, injected):
    proxy = start_proxy(postfix.port)
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        client.ehlo()
        client.starttls(pki.client_context(), server_hostname=HOSTNAME, command=b"STARTTLS\r\n" + injected)
        assert client.command("RCPT TO:<user@example.test>").code == 503  # nothing survived
        assert client.ehlo().code == 250
        _send_marked(client, marker, sender="good@example.org")
        client.command("QUIT")
    message = delivered_with(postfix, marker)
    assert b"evil@example.net" not in message
    proxy.process.wait_for_log(lambda r: r["event"] == "discarded plaintext pipelined after STARTTLS"
                               and r["bytes"] == len(injected))
    # Postfix counted exactly what crossed: one MAIL, and no RSET.
    match = postfix.wait_for_log(r"disconnect from \S+ ehlo=2 mail=1 rcpt=1 data=1 quit=1 commands=6")
    assert "rset" not in match.group(0)


# ----------------------------------------------------------------------- external judge

# testssl.sh's finding ids that may be LOW: the CBC suites (TLS 1.2 ECDHE with AES-CBC-SHA2)
# stay on for senders without AEAD, as Postfix's "medium" grade keeps them for opportunistic
# TLS, where the alternative is plaintext. Anything else must be OK or INFO.
_LOW_BY_CHOICE = {"LUCKY13", "cipherlist_AVERAGE"}
# Findings about testssl's own openssl build, not about the server.
_ABOUT_THE_SCANNER = {"engine_problem", "service"}


def _testssl(port: int, out: Path, *, starttls: bool) -> subprocess.Popen[bytes]:
    """testssl.sh (Debian): protocols (-p), cipher categories (-s), forward secrecy (-f) and
    the known vulnerabilities (-U), one finding per line of a JSON file."""
    args = ["testssl", "--quiet", "--color", "0", "--warnings", "batch", "--ip", "one",
            "-p", "-s", "-f", "-U", "--jsonfile", str(out)]
    if starttls:
        args += ["-t", "smtp"]
    return subprocess.Popen([*args, f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.timeout(300)
def test_testssl_finds_no_weakness_on_starttls_and_implicit_tls(start_proxy, tmp_path):
    """An external judge of the TLS configuration (not of injection or smuggling, which the
    tests above cover). Both listeners are scanned, one after the other (each scan is ~1,000
    sessions), with an ECDSA and an RSA chain loaded, so that the RSA key-transport
    (non-forward-secret) suites would show if offered.
    The backend is a smtp-sink of its own: the scan's ~2,000 sessions would otherwise all
    reach the Postfix that the other tests of this module share."""
    with SmtpSink(tmp_path / "sink") as sink:
        proxy = start_proxy(sink.port)
        for name, port in (("starttls", proxy.port), ("implicit", proxy.tls_port)):
            out = tmp_path / f"{name}.json"
            transcript = _testssl(port, out, starttls=name == "starttls").communicate(timeout=120)[0].decode(
                errors="replace")
            _judge(name, {f["id"]: (f["severity"], f["finding"]) for f in json.loads(out.read_text())},
                   transcript)
        # The proxy refused the old protocols, logged why, and still relays.
        proxy.process.wait_for_log(lambda r: r["event"].startswith("SSL_accept error")
                                   and "version_too_low" in r["event"])
        marker = token()
        result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--tls", "--to", "user@example.test",
                           "--header", f"Subject: {marker}")
        assert result.returncode == 0, result.stdout
        delivered_with(sink, marker)


SSLYZE = Path(__file__).resolve().parents[2] / ".venv" / "sslyze" / "bin" / "sslyze"  # scripts/install-test-deps


def test_sslyze_finds_both_resumptions_and_nothing_unsafe_on_either_listener(start_proxy, tmp_path):
    """A second external judge, a different TLS client (sslyze, on its own OpenSSL build):
    both ways to resume (TLS 1.2 session IDs and tickets, 5 tries each) work, and nothing
    a sender could abuse is on: no SSLv2/3, TLS 1.0/1.1, compression, 0-RTT early data
    (replayable commands), client-initiated renegotiation; fallback SCSV and extended
    master secret are. The proxy's own log must show the resumptions too."""
    with SmtpSink(tmp_path / "sink") as sink:
        proxy = start_proxy(sink.port)
        for name, target in (("starttls", ["--starttls", "smtp", f"127.0.0.1:{proxy.port}"]),
                             ("implicit", [f"127.0.0.1:{proxy.tls_port}"])):
            out = tmp_path / f"sslyze-{name}.json"
            logged = len(proxy.process.logs())
            scan = subprocess.run(
                [str(SSLYZE), "--sslv2", "--sslv3", "--tlsv1", "--tlsv1_1", "--tlsv1_2", "--tlsv1_3", "--resum",
                 "--reneg", "--early_data", "--compression", "--fallback", "--ems", "--heartbleed", "--openssl_ccs",
                 "--mozilla_config", "disable", "--json_out", str(out), *target],
                capture_output=True, text=True, timeout=120)
            assert scan.returncode == 0, scan.stdout + scan.stderr
            [server] = json.loads(out.read_text())["server_scan_results"]
            assert server["scan_status"] == "COMPLETED", (name, server)
            found = {key: value["result"] for key, value in server["scan_result"].items()
                     if value and value["status"] == "COMPLETED"}
            for version in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
                assert not found[f"{version}_cipher_suites"]["is_tls_version_supported"], (name, version)
            assert found["tls_1_3_cipher_suites"]["is_tls_version_supported"], name
            resumption = found["session_resumption"]
            assert (resumption["session_id_resumption_result"], resumption["tls_ticket_resumption_result"]) == (
                "FULLY_SUPPORTED", "FULLY_SUPPORTED"), (name, resumption)
            assert not found["tls_1_3_early_data"]["supports_early_data"], name
            assert not found["tls_compression"]["supports_compression"], name
            renegotiation = found["session_renegotiation"]
            assert renegotiation["client_renegotiations_success_count"] == 0, (name, renegotiation)
            assert not renegotiation["is_vulnerable_to_client_renegotiation_dos"], (name, renegotiation)
            assert found["tls_fallback_scsv"]["supports_fallback_scsv"], name
            assert found["tls_extended_master_secret"]["supports_ems_extension"], name
            assert not found["heartbleed"]["is_vulnerable_to_heartbleed"], name
            assert not found["openssl_ccs_injection"]["is_vulnerable_to_ccs_injection"], name
            resumed = [r for r in proxy.process.logs()[logged:] if r.get("resumed") is True]
            assert len(resumed) >= 10, (name, len(resumed))


def _judge(name: str, verdict: dict[str, tuple[str, str]], transcript: str) -> None:
    """`verdict`: testssl's finding id -> (severity, finding)."""
    assert "scanProblem" not in verdict, transcript
    for version in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert verdict[version][1] == "not offered", (name, version, verdict[version])
    assert verdict["TLS1_2"][1] == "offered", (name, verdict["TLS1_2"])
    assert verdict["TLS1_3"][1].startswith("offered"), (name, verdict["TLS1_3"])
    assert verdict["PFS"] == ("OK", "offered"), (name, verdict["PFS"])
    assert "no RSA key transport cipher" in verdict["ROBOT"][1], (name, verdict["ROBOT"])
    for category in ("NULL", "aNULL", "EXPORT", "LOW", "3DES_IDEA"):
        assert verdict[f"cipherlist_{category}"][1] == "not offered", (name, category)
    assert verdict["secure_client_renego"][0] == "OK", (name, verdict["secure_client_renego"])
    flagged = {key: v for key, v in verdict.items()
               if key not in _ABOUT_THE_SCANNER and v[0] not in ("OK", "INFO")
               and not (key in _LOW_BY_CHOICE and v[0] == "LOW")}
    assert not flagged, (name, flagged)


# ----------------------------------------------------------------------- client identity


def _swaks_from(source: str, port: int, marker: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_swaks("--server", f"127.0.0.1:{port}", "--local-interface", source, "--to",
                     "user@example.test", "--header", f"Subject: {marker}", *extra)


def test_xclient_tells_postfix_the_real_client(postfix, start_proxy):
    proxy = start_proxy(postfix.port, client_identity="xclient")
    marker = token()
    result = _swaks_from("127.0.0.5", proxy.port, marker, "--tls")
    assert result.returncode == 0, result.stdout
    message = delivered_with(postfix, marker).decode()
    assert "unknown [127.0.0.5]" in message  # Postfix's own Received header names the real client
    postfix.wait_for_log(r"client=unknown\[127\.0\.0\.5\]")


@pytest.mark.parametrize("separator", [b" ", b"\x0b", b"\x0c"], ids=["space", "vertical-tab", "form-feed"])
def test_a_client_cannot_pass_xclient_to_a_backend_that_trusts_the_proxy(postfix, start_proxy, separator):
    """Postfix trusts XCLIENT from the proxy. Its smtpd splits a command at any isspace(),
    VT and FF too: a client's XCLIENT with one of those must not reach it either."""
    proxy = start_proxy(postfix.port, client_identity="xclient")
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220
        client.ehlo()
        client.send(b"XCLIENT" + separator + b"ADDR=203.0.113.9 NAME=forged.example\r\n")
        assert client.read_reply().code in (500, 550)
        _send_marked(client, marker)
        client.command("QUIT")
    message = delivered_with(postfix, marker).decode()
    assert "203.0.113.9" not in message and "forged.example" not in message, message
    assert "unknown [127.0.0.1]" in message


@pytest.mark.parametrize("version", ["proxy-v1", "proxy-v2"])
def test_proxy_protocol_tells_postfix_the_real_client(tmp_path, start_proxy, version):
    source = "127.0.0.6" if version == "proxy-v1" else "127.0.0.7"
    with PostfixInstance(tmp_path / "pp", proxy_protocol=True) as backend:
        proxy = start_proxy(backend.port, client_identity=version)
        marker = token()
        result = _swaks_from(source, proxy.port, marker)
        assert result.returncode == 0, result.stdout
        delivered_with(backend, marker)
        backend.wait_for_log(rf"client=unknown\[{re.escape(source)}\]")


# ----------------------------------------------------------------------- client certificates


def _client_cert_args(cert: CertFiles | None) -> list[str]:
    return ["--tls-cert", str(cert.cert_file), "--tls-key", str(cert.key_file)] if cert else []


def test_required_client_certificate(postfix, start_proxy, pki, tmp_path):
    stranger_pki = Pki(tmp_path / "other")
    listed = stranger_pki.client_cert("listed.example.test")
    unlisted = stranger_pki.client_cert("unlisted.example.test")
    proxy = start_proxy(postfix.port, tls={
        "client_certificate": "require",
        "client_ca_file": str(pki.ca_file),
        "client_fingerprints": [listed.fingerprint],
    })
    for cert, accepted in ((None, False), (unlisted, False), (pki.client_cert(), True), (listed, True)):
        marker = token()
        result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--tls", "--to", "user@example.test",
                           "--header", f"Subject: {marker}", *_client_cert_args(cert))
        name = cert.cert_file.name if cert else "no certificate"
        if accepted:
            assert result.returncode == 0, (name, result.stdout)
            message = delivered_with(postfix, marker).decode()
            assert "(Client CN " in message, message
        else:
            assert result.returncode != 0, (name, result.stdout)
            assert "<~  250 2.0.0" not in result.stdout and "queued" not in result.stdout


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_a_refused_client_certificate_stays_refused_when_its_session_resumes(
        postfix, start_proxy, pki, tmp_path, version):
    """A resumed handshake verifies no chain: the verdict is the one the session kept. A
    client refused for an untrusted certificate must not come back trusted by resuming
    the session that refused handshake gave it; a trusted one resumes trusted."""
    stranger = Pki(tmp_path / "other").client_cert("stranger.example.test")
    proxy = start_proxy(postfix.port, tls={"client_certificate": "require", "client_ca_file": str(pki.ca_file)})
    for cert, trusted in ((stranger, False), (pki.client_cert("known.example.test"), True)):
        session = tmp_path / f"{cert.cert_file.stem}{version}.pem"
        cert_args = ["-cert", str(cert.cert_file), "-key", str(cert.key_file)]
        first = openssl_s_client(proxy.port, args=[version, *cert_args, "-sess_out", str(session)],
                                 input=b"EHLO client.test\r\nQUIT\r\n")
        second = openssl_s_client(proxy.port, args=[version, "-sess_in", str(session)],
                                  input=b"EHLO client.test\r\nQUIT\r\n")
        assert "\nReused, TLSv1." in second.stdout, second.stdout
        for output in (first.stdout, second.stdout):
            if trusted:
                assert "\n250 " in output and "421 " not in output, output
            else:
                assert "421 4.7.1 " in output and "\n250 " not in output, output
    trust = [(r["peer_trust"], r["resumed"]) for r in proxy.handshakes()]
    assert trust == [("untrusted", False), ("untrusted", True), ("trusted", False), ("trusted", True)], trust


def test_asked_client_certificate_is_optional_and_named_in_the_trace_header(postfix, start_proxy, pki, tmp_path):
    stranger = Pki(tmp_path / "other").client_cert("stranger.example.test")
    proxy = start_proxy(postfix.port, tls={"client_certificate": "ask", "client_ca_file": str(pki.ca_file)})
    cases = [
        (None, "(Client did not present a certificate)", "Anonymous"),
        (pki.client_cert("known.example.test"), '(Client CN "known.example.test", Issuer "', "Trusted"),
        (stranger, '(Client CN "stranger.example.test", Issuer "', "Untrusted"),
    ]
    for cert, clause, trust in cases:
        marker = token()
        after = len(proxy.process.logs())
        result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--tls", "--to", "user@example.test",
                           "--header", f"Subject: {marker}", *_client_cert_args(cert))
        assert result.returncode == 0, result.stdout  # "ask" never refuses
        message = delivered_with(postfix, marker).decode()
        assert clause in message, message
        if cert is not None:
            assert ("(verified OK)" in message) == (trust == "Trusted"), message
            assert f"(client-fingerprint SHA256 {cert.fingerprint})" in message.replace("\n\t", " "), message
        line = proxy.process.wait_for_log(lambda r: "TLS connection established" in r["event"], after=after)
        assert line["event"].startswith(f"{trust} TLS connection established from unknown[127.0.0.1]: "), line
        # The client's CertificateVerify, read from the handshake (trustme keys: ECDSA P-256).
        signed = " client-signature ECDSA (P-256) client-digest SHA256" in line["event"]
        assert signed == (cert is not None), line


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_the_certificate_request_names_the_client_cas(postfix, start_proxy, pki, version):
    """As Postfix with smtpd_tls_CAfile: a client holding several certificates picks one
    issued by a CA the server names (openssl s_client lists them)."""
    proxy = start_proxy(postfix.port, tls={"client_certificate": "ask", "client_ca_file": str(pki.ca_file)})
    result = openssl_s_client(proxy.port, args=[version], input=b"QUIT\r\n")
    assert "Acceptable client certificate CA names" in result.stdout, result.stdout
    named = result.stdout.split("Acceptable client certificate CA names", 1)[1].split("\n---", 1)[0]
    assert "O = smtproxy tests" in named, named


def test_a_backend_that_accepts_but_never_greets_gets_the_client_421_after_the_connect_timeout(start_proxy):
    """Connecting and greeting together get backend_connect_timeout (not backend_timeout,
    300 s): the client hears 421 4.3.0 as for a backend that is down."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody greets
        proxy = start_proxy(silent.getsockname()[1], backend_connect_timeout=1)
        began = time.monotonic()
        with RawSmtpClient(proxy.port) as client:
            reply = client.read_reply(timeout=10)
        assert reply.code == 421 and reply.lines[0].startswith("4.3.0 "), reply
        assert time.monotonic() - began < 5



# ----------------------------------------------------------------------- SASL AUTH


class _AiosmtpdBackend:
    """aiosmtpd's handler as the legacy MTA, where Postfix cannot play the part asked of
    it: the messages it accepted are recorded."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        self.messages.append(envelope.content)
        return "250 2.0.0 Ok: queued"


class _SaslBackend(_AiosmtpdBackend):
    """It offers SASL mechanisms whose responses are not command lines (Postfix would need
    a Cyrus or Dovecot SASL server set up for this). XOAUTH2 answers with an error
    challenge that the client must acknowledge with an empty line (RFC 7628 3.2.3);
    BIGTOKEN takes one long token, as GSSAPI does. The responses are recorded."""

    TOKEN_SIZE = 9000  # decoded bytes: 12,000 in base64, six times a command line

    def __init__(self) -> None:
        super().__init__()
        self.responses: list[bytes] = []

    async def auth_XOAUTH2(self, server, args):
        self.responses.append(await server.challenge_auth(b'{"status":"401","schemes":"bearer"}'))
        return AuthResult(success=False, handled=False)

    async def auth_BIGTOKEN(self, server, args):
        token = await server.challenge_auth(b"")
        if token is MISSING:  # cancelled with "*": aiosmtpd has answered 501 itself
            return AuthResult(success=False, handled=True)
        self.responses.append(token)
        return AuthResult(success=token == b"t" * self.TOKEN_SIZE, handled=False)


class _LongLinesSMTP(SMTP):
    line_length_limit = 16384  # aiosmtpd's default: 1,001 bytes (RFC 5321's command line)


class _SaslController(Controller):
    def factory(self) -> SMTP:
        return _LongLinesSMTP(self.handler, **self.SMTP_kwargs)


@pytest.fixture
def sasl_backend() -> Iterator[tuple[_SaslBackend, int]]:
    handler, port = _SaslBackend(), free_port()
    controller = _SaslController(handler, hostname="127.0.0.1", port=port, auth_require_tls=False)
    controller.start()  # returns once the server answers
    yield handler, port
    controller.stop()


def _authenticating_client(proxy, pki) -> RawSmtpClient:
    client = RawSmtpClient(proxy.port)
    assert client.read_reply().code == 220 and client.ehlo().code == 250
    client.starttls(pki.client_context(), server_hostname=HOSTNAME)
    ehlo = client.ehlo()
    assert any(line.startswith("AUTH ") and "BIGTOKEN" in line for line in ehlo.lines), ehlo
    return client


def test_an_empty_sasl_response_reaches_the_backend_and_the_exchange_stays_in_step(sasl_backend, start_proxy, pki):
    """After the backend's 334 the client's next line is a SASL response, not a command:
    an empty one (XOAUTH2's acknowledgement of an error) must reach the backend, or the
    backend takes the next command for the response and every reply after answers the
    wrong command."""
    handler, port = sasl_backend
    proxy = start_proxy(port)
    with _authenticating_client(proxy, pki) as client:
        challenge = client.command("AUTH XOAUTH2 dXNlcj1hAWF1dGg9QmVhcmVyIHgBAQ==")
        assert challenge.code == 334, challenge
        assert client.command("").code == 535
        assert client.command("MAIL FROM:<a@example.org>").code == 250
        assert client.command("QUIT").code == 221
    assert handler.responses == [b""]


def test_a_sasl_token_longer_than_a_command_line_is_relayed(sasl_backend, start_proxy, pki):
    """GSSAPI tokens run to kilobytes: the response line may be as long as Postfix's
    smtpd_sasl_response_limit (12,288 bytes), not only max_command_line (2,048)."""
    handler, port = sasl_backend
    proxy = start_proxy(port)
    token_line = base64.b64encode(b"t" * _SaslBackend.TOKEN_SIZE)
    with _authenticating_client(proxy, pki) as client:
        assert client.command("AUTH BIGTOKEN").code == 334
        assert client.command(token_line).code == 235
        _send_marked(client, marker := token())
        client.command("QUIT")
    assert handler.responses == [b"t" * _SaslBackend.TOKEN_SIZE]
    assert any(marker.encode() in m for m in handler.messages)


def test_a_sasl_response_over_the_limit_cancels_the_exchange(sasl_backend, start_proxy, pki):
    """Past 12,288 bytes the proxy cancels the exchange at the backend with "*" (RFC 4954)
    and tells the client why; both sides are back at the command level."""
    handler, port = sasl_backend
    proxy = start_proxy(port)
    with _authenticating_client(proxy, pki) as client:
        assert client.command("AUTH BIGTOKEN").code == 334
        too_long = client.command(b"A" * 20000)
        assert too_long.code == 500 and too_long.lines[0].startswith("5.5.6 "), too_long
        assert client.command("NOOP").code == 250
        assert client.command("QUIT").code == 221
    assert handler.responses == []  # the backend got the cancel, not a token



class _HeloOnlySMTP(SMTP):
    """An old appliance's SMTP: EHLO is an unknown command (RFC 821 only)."""

    async def smtp_EHLO(self, hostname: str) -> None:  # noqa: N802 (aiosmtpd: smtp_<VERB>)
        await self.push("502 5.5.2 Error: command not recognized")


class _HeloOnlyController(Controller):
    def factory(self) -> SMTP:
        return _HeloOnlySMTP(self.handler, **self.SMTP_kwargs)


def test_a_backend_that_knows_only_helo_still_gets_mail_over_starttls(start_proxy, pki):
    """Its 502 to EHLO used to reach the client, which then sent HELO: no STARTTLS offered,
    so under `encrypt` (here) no mail at all, under `may` only plaintext. The proxy sends
    the backend HELO and gives the client an EHLO reply with STARTTLS."""
    handler, port = _AiosmtpdBackend(), free_port()
    controller = _HeloOnlyController(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        proxy = start_proxy(port, security_level="encrypt")
        marker = token()
        with RawSmtpClient(proxy.port) as client:
            assert client.read_reply().code == 220
            ehlo = client.ehlo()
            assert ehlo.code == 250 and ehlo.lines[1:] == ["STARTTLS"], ehlo
            client.starttls(pki.client_context(), server_hostname=HOSTNAME)
            assert client.ehlo().code == 250
            _send_marked(client, marker)
            assert client.command("QUIT").code == 221
    finally:
        controller.stop()
    [message] = handler.messages
    assert marker.encode() in message and b"with ESMTPS" in message, message


# ----------------------------------------------------------------------- half-close and stuck clients

TRANSACTION = "MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\nDATA\r\n"


def test_a_client_that_half_closes_after_the_dot_and_quit_gets_both_replies(postfix, start_proxy):
    """As Postfix's smtpd does, what arrived before the EOF is answered: cut off, the
    client would never learn that the message was accepted and would send it again."""
    proxy = start_proxy(postfix.port)
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        client.send(TRANSACTION.encode())
        assert [client.read_reply().code for _ in range(3)] == [250, 250, 354]
        client.send(f"Subject: {marker}\r\n\r\nbody\r\n.\r\nQUIT\r\n".encode())
        client.sock.shutdown(socket.SHUT_WR)
        assert [client.read_reply().code for _ in range(2)] == [250, 221]
        assert client.expect_close() == b""
    delivered_with(postfix, marker)
    assert proxy.process.wait_for_log("message relayed")["result"] == "accepted"


def test_a_tls_client_that_sends_close_notify_after_quit_gets_every_reply(postfix, start_proxy, pki):
    """The same with TLS: the whole session pipelined after the handshake, then
    close_notify; every reply still comes, then the proxy's own close_notify."""
    proxy = start_proxy(postfix.port)
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        assert client.command("STARTTLS").code == 220
        engine = TlsEngine(pki.client_context(), server_side=False, server_hostname=HOSTNAME)
        engine.handshake()
        while not engine.handshake_done:
            client.sock.sendall(engine.outgoing())
            engine.receive(client.sock.recv(65536))
        engine.send(f"EHLO c.test\r\n{TRANSACTION}Subject: {marker}\r\n\r\nbody\r\n.\r\nQUIT\r\n".encode())
        engine.close()
        client.sock.sendall(engine.outgoing())
        replies = b""
        while chunk := client.sock.recv(65536):
            replies += engine.receive(chunk)
    codes = [line[:4] for line in replies.decode().split("\r\n") if line[3:4] == " "]
    assert codes == ["250 ", "250 ", "250 ", "354 ", "250 ", "221 "], replies
    assert engine.peer_closed
    delivered_with(postfix, marker)


def test_a_client_that_never_reads_is_cut_off_after_the_idle_timeout(smtp_sink, start_proxy):
    """It pipelines EHLOs and reads none of the replies (smtp-sink answers them fast).
    Once nothing moves for idle_timeout, the proxy answers 421 and closes, which cannot
    flush either: the connection is then aborted, instead of keeping its slot for as long
    as the client keeps its socket open."""
    proxy = start_proxy(smtp_sink.port, idle_timeout=2)
    with flood_without_reading(proxy.port):
        idle = proxy.process.wait_for_log("timeout after idle", timeout=30)
        ended = proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.1]", timeout=20)
    lingered = datetime.fromisoformat(ended["timestamp"]) - datetime.fromisoformat(idle["timestamp"])
    assert lingered.total_seconds() < 10, (idle, ended)


def test_a_client_that_never_reads_and_fails_its_handshake_is_cut_off_too(smtp_sink, start_proxy):
    """The same flood, then STARTTLS and no handshake: the handshake timeout closes the
    connection, whose unsent replies must not keep it open either."""
    proxy = start_proxy(smtp_sink.port, handshake_timeout=2)
    with flood_without_reading(proxy.port, then=b"STARTTLS\r\n"):
        failed = proxy.process.wait_for_log("SSL_accept error from unknown[127.0.0.1]: handshake_timeout", timeout=30)
        ended = proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.1]", timeout=20)
    lingered = datetime.fromisoformat(ended["timestamp"]) - datetime.fromisoformat(failed["timestamp"])
    assert lingered.total_seconds() < 10, (failed, ended)


# ----------------------------------------------------------------------- bad input


def test_over_long_command_line_gets_500_and_session_continues(postfix, start_proxy):
    proxy = start_proxy(postfix.port)
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        client.ehlo()
        reply = client.command(b"NOOP " + b"x" * 10000)
        assert reply.code == 500 and reply.lines[0].startswith("5.5.2")
        assert client.command("NOOP").code == 250


def test_garbage_instead_of_client_hello(postfix, start_proxy, pki):
    proxy = start_proxy(postfix.port)
    with RawSmtpClient(proxy.tls_port) as client:
        client.send(b"EHLO this is not TLS\r\n" * 4)
        client.expect_close()
    proxy.process.wait_for_log(lambda r: r["event"].startswith("SSL_accept error from unknown[127.0.0.1]"))
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{proxy.tls_port}", "--tls-on-connect",
                       "--to", "user@example.test", "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    delivered_with(postfix, marker)


def test_idle_client_is_closed_after_the_idle_timeout(postfix, start_proxy):
    proxy = start_proxy(postfix.port, idle_timeout=1)
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        reply = client.read_reply(timeout=10)
        assert reply.code == 421 and reply.lines[0].startswith("4.4.2")
        client.expect_close()
    proxy.process.wait_for_log(lambda r: r["event"] == "timeout after idle from unknown[127.0.0.1]")


def test_client_idle_in_the_middle_of_data_gets_421_and_nothing_is_delivered(tmp_path, start_proxy):
    with PostfixInstance(tmp_path / "stalled") as backend:  # its own log: this test's alone
        proxy = start_proxy(backend.port, idle_timeout=1)
        with RawSmtpClient(proxy.port) as client:
            _start_message(client)
            client.send(b"Subject: half a message\r\n\r\nand then nothing")
            reply = client.read_reply(timeout=10)
            assert reply.code == 421 and reply.lines[0].startswith("4.4.2"), reply
            client.expect_close()
        # The backend lost the connection without ever seeing an end-of-data.
        backend.wait_for_log(r"lost connection after DATA")
        proxy.process.wait_for_log(lambda r: r["event"] == "message relayed" and r["result"] == "deferred")
        assert backend.messages() == []


def up_to_the_handshake(client: RawSmtpClient) -> None:
    """Greeting, EHLO, STARTTLS and its 220: the client's ClientHello is due next."""
    assert client.read_reply().code == 220
    client.ehlo()
    client.send(b"STARTTLS\r\n")
    assert client.read_reply().code == 220


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_silent_client_is_closed_after_the_handshake_timeout(postfix, start_proxy, implicit):
    # The idle timeout is far longer than the client waits: only the handshake timer can close.
    proxy = start_proxy(postfix.port, handshake_timeout=1, idle_timeout=120)
    with RawSmtpClient(proxy.tls_port if implicit else proxy.port) as client:
        if not implicit:
            up_to_the_handshake(client)
        # ... and then no ClientHello.
        assert client.expect_close(timeout=15) == b""
    proxy.process.wait_for_log(
        lambda r: r["event"] == "SSL_accept error from unknown[127.0.0.1]: handshake_timeout")
    end = proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.1]")
    assert end["tls"] is False and end["messages"] == 0 and end["direction"] == "inbound"


@pytest.mark.parametrize("implicit", [False, True], ids=["starttls", "implicit-tls"])
def test_client_gone_in_the_middle_of_the_handshake_is_a_handshake_failure(postfix, start_proxy, implicit):
    """Postfix logs "SSL_accept error ... lost connection" for it, and it counts with the
    other handshake failures (a timeout already did)."""
    proxy = start_proxy(postfix.port)
    with RawSmtpClient(proxy.tls_port if implicit else proxy.port) as client:
        if not implicit:
            up_to_the_handshake(client)
        client.send(bytes.fromhex("160301"))  # the start of a record, then nothing more
    proxy.process.wait_for_log(
        lambda r: r["event"] == "SSL_accept error from unknown[127.0.0.1]: lost_connection")
    end = proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.1]")
    assert end["tls"] is False and end["messages"] == 0


def test_a_refused_bdat_chunk_leaves_no_truncated_message_at_postfix(postfix, start_proxy):
    """A pipelined BDAT message whose second chunk passes the size limit: the proxy refuses
    it and the LAST chunk (RFC 3030), and Postfix, which holds the first chunk, gets an RSET
    instead of a LAST that would complete a truncated message. The session goes on."""
    proxy = start_proxy(postfix.port, max_message_size=1000)
    truncated, marker = token(), token()
    first = f"Subject: {truncated}\r\n\r\n".encode().ljust(598, b"a") + b"\r\n"
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220
        assert "CHUNKING" in client.ehlo().text
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
                    + b"BDAT 600\r\n" + first + b"BDAT 600\r\n" + b"b" * 598 + b"\r\n"
                    + b"BDAT 10 LAST\r\n" + b"c" * 8 + b"\r\n")
        codes = [client.read_reply().code for _ in range(5)]
        assert codes == [250, 250, 250, 552, 552], codes
        assert client.command("MAIL FROM:<a@example.org>").code == 250
        assert client.command("RCPT TO:<user@example.test>").code == 250
        body = f"Subject: {marker}\r\n\r\nok\r\n".encode()
        assert client.command(f"BDAT {len(body)} LAST".encode() + b"\r\n" + body).code == 250
        client.command("QUIT")
    delivered_with(postfix, marker)
    assert not any(truncated.encode() in m for m in postfix.messages())
    postfix.wait_for_log(r"disconnect from \S+ ehlo=1 mail=2 rcpt=2 bdat=2 rset=1 quit=1 commands=9")


def test_421_to_data_is_relayed_once_and_the_session_closes(start_proxy, tmp_path):
    """smtp-sink answers DATA with 421 and closes: the client gets that 421 and a close,
    not a second, made-up 421 when the backend's close is noticed."""
    with SmtpSink(tmp_path / "sink", reply_421_after=["DATA"]) as sink:
        proxy = start_proxy(sink.port)
        with RawSmtpClient(proxy.port) as client:
            assert client.read_reply().code == 220
            client.ehlo()
            assert client.command("MAIL FROM:<a@example.org>").code == 250
            assert client.command("RCPT TO:<user@example.test>").code == 250
            reply = client.command("DATA")
            assert reply.code == 421, reply
            assert client.expect_close() == b""


def _rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))


def test_a_client_that_pipelines_and_never_reads_is_held_back(start_proxy, tmp_path):
    """EHLO after EHLO, pipelined, replies never read (each ~6 times the command): once its
    replies back up, the proxy stops reading the client's commands (as Postfix's smtpd
    blocks in write), so the client's sends block and the proxy's memory stays flat. When
    the client reads again, its commands get their replies, in order."""
    ehlo = b"EHLO client.example\r\n"
    with SmtpSink(tmp_path / "sink") as sink:
        proxy = start_proxy(sink.port)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            assert sock.recv(4096).startswith(b"220 ")
            baseline = _rss_kib(proxy.process.process.pid)
            burst, sent, growth = ehlo * 2000, 0, 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and growth < 64 * 1024:  # bounded in time and memory
                if not select.select([], [sock], [], 2)[1]:
                    break  # held back: the proxy has stopped reading
                sent += sock.send(burst)
                growth = _rss_kib(proxy.process.process.pid) - baseline
            else:
                pytest.fail(f"sent {sent} bytes, never held back; the proxy grew by {growth} KiB")
            received = b""
            while received.count(b"\r\n250 ") < 20000:
                chunk = sock.recv(1 << 20)
                assert chunk, f"closed after {received.count(b'250 ')} replies"
                received += chunk
        replies = re.findall(rb"(?:250-[^\r]*\r\n)*250 [^\r]*\r\n", received)
        assert len(replies) >= 20000 and all(r.startswith(b"250-") for r in replies), replies[:3]
        assert len(set(replies)) == 1, set(replies)  # every one a whole EHLO reply


def test_a_slow_bdat_chunk_is_not_taken_for_a_silent_backend(postfix, start_proxy):
    """backend_timeout is how long the backend may take to answer; while a chunk is still
    arriving it cannot answer, so a client slower than that is not cut off with 421."""
    proxy = start_proxy(postfix.port, backend_timeout=1)
    marker = token()
    body = f"Subject: {marker}\r\n\r\n".encode().ljust(998, b"x") + b"\r\n"
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220
        client.ehlo()
        assert client.command("MAIL FROM:<a@example.org>").code == 250
        assert client.command("RCPT TO:<user@example.test>").code == 250
        client.send(f"BDAT {len(body)} LAST\r\n".encode() + body[:400])
        client.sock.settimeout(2)  # twice the backend timeout: nothing may come back meanwhile
        with pytest.raises(TimeoutError):
            client.sock.recv(1024)
        client.send(body[400:])
        assert client.read_reply().code == 250
        client.command("QUIT")
    delivered_with(postfix, marker)


@pytest.mark.parametrize("transfer", ["data", "pipelined-bdat"])
def test_the_final_reply_may_take_the_data_done_timeout(postfix_factory, start_proxy, transfer):
    """A backend slow after the final dot (a content scan: Postfix's own `sleep` restriction
    here) has backend_data_done_timeout (RFC 5321's ten minutes by default), not
    backend_timeout: cut off with 421 while it still accepts, the message would be
    delivered and then sent again by the client. With MAIL, RCPT and BDAT LAST pipelined
    (as Exchange sends), Postfix answers all three at the end: the wait is the same."""
    slow = postfix_factory(extra_main_cf={"smtpd_end_of_data_restrictions": "sleep 3"})
    proxy = start_proxy(slow.port, backend_connect_timeout=1, backend_timeout=1, backend_data_done_timeout=20)
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        if transfer == "data":
            _send_marked(client, marker)
        else:
            body = f"Subject: {marker}\r\n\r\nok\r\n".encode()
            client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
                        + f"BDAT {len(body)} LAST\r\n".encode() + body)
            assert [client.read_reply().code for _ in range(3)] == [250, 250, 250]
        client.command("QUIT")
    delivered_with(slow, marker)
    assert not [r for r in proxy.process.logs() if r["event"] == "backend timeout"]


def test_bdat_last_in_a_later_read_still_gets_the_data_done_timeout(scripted_remote, start_proxy):
    """MAIL and RCPT reach the proxy in one read, BDAT LAST and its chunk in the next, before
    the backend answered anything: the wait begun for MAIL with backend_timeout must grow
    to backend_data_done_timeout once the message end is due with it. The backend holds
    its pipelined replies until the chunk is in, and then, scanning, until the client has
    heard nothing for twice backend_timeout."""
    forwarded, scanned = threading.Event(), threading.Event()

    def backend(c: Conversation) -> None:
        c.send(b"220 backend.example ESMTP\r\n")
        c.expect(b"EHLO")
        c.send(b"250-backend.example\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        c.expect(b"MAIL FROM:")
        c.expect(b"RCPT TO:")
        forwarded.set()
        size = int(c.expect(b"BDAT ").split()[1])
        while len(c.buffer) < size:
            c.fill()
        c.notes["message"], c.buffer = c.buffer[:size], c.buffer[size:]
        assert scanned.wait(20), "the test never ended the scan"
        c.send(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 queued\r\n")
        c.goodbye()

    remote = scripted_remote(backend)
    proxy = start_proxy(remote.port, backend_timeout=1, backend_data_done_timeout=20)
    marker = token()
    body = f"Subject: {marker}\r\n\r\nok\r\n".encode()
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n")
        assert forwarded.wait(10), "the proxy did not pass MAIL and RCPT on"
        client.send(f"BDAT {len(body)} LAST\r\n".encode() + body)
        client.sock.settimeout(2)  # twice backend_timeout: no 421 may come meanwhile
        with pytest.raises(TimeoutError):
            client.sock.recv(1024)
        scanned.set()
        assert [client.read_reply(timeout=10).code for _ in range(3)] == [250, 250, 250]
        assert client.command("QUIT").code == 221
    remote.join()
    assert marker.encode() in remote.notes["message"]


def test_backend_timeout_holds_even_when_shorter_than_the_connect_timeout(postfix_factory, start_proxy):
    """The one backend timer was armed at connect with backend_connect_timeout; a shorter
    backend_timeout for a later reply must move it earlier, not wait for it."""
    slow = postfix_factory(extra_main_cf={"smtpd_data_restrictions": "sleep 4"})
    proxy = start_proxy(slow.port, backend_timeout=1, backend_connect_timeout=10)
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        assert client.command("MAIL FROM:<a@example.org>").code == 250
        assert client.command("RCPT TO:<user@example.test>").code == 250
        began = time.monotonic()
        data = client.command("DATA")
        waited = time.monotonic() - began
    assert data.code == 421 and data.lines[0].startswith("4.4.2 "), data
    assert waited < 3, waited
    proxy.process.wait_for_log("backend timeout")


def test_addresses_without_angle_brackets_are_left_for_the_backend_to_judge(postfix, start_proxy):
    """`MAIL FROM:a@example.org` (printers, scripts) breaks RFC 5321, but Postfix takes it
    by default (strict_rfc821_envelopes = no): refused by the proxy, such mail would bounce
    where the legacy MTA itself would have accepted it."""
    proxy = start_proxy(postfix.port)
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        assert client.command("MAIL FROM:a@example.org").code == 250
        assert client.command("RCPT TO:user@example.test").code == 250
        assert client.command("DATA").code == 354
        client.send(f"Subject: {marker}\r\n\r\nok\r\n.\r\n".encode())
        assert client.read_reply().code == 250
        client.command("QUIT")
    assert b"Return-Path: <a@example.org>" in delivered_with(postfix, marker)


def test_bare_lf_in_data_is_rejected_and_nothing_delivered(postfix, start_proxy):
    proxy = start_proxy(postfix.port)
    smuggled, marker = token(), token()
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        client.ehlo()
        client.command("MAIL FROM:<a@example.org>")
        client.command("RCPT TO:<user@example.test>")
        assert client.command("DATA").code == 354
        client.send(f"Subject: {smuggled}\r\n\r\nx\n.\nMAIL FROM:<b@example.org>\r\n.\r\n".encode())
        reply = client.read_reply()
        assert reply.code == 521 and reply.lines[0].startswith("5.5.2"), reply
        client.expect_close()
    result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--to", "user@example.test",
                       "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    delivered_with(postfix, marker)
    assert not any(smuggled.encode() in m for m in postfix.messages())


def test_per_client_connection_limit(postfix, start_proxy):
    proxy = start_proxy(postfix.port, max_connections_per_client=2)
    clients = [RawSmtpClient(proxy.port) for _ in range(2)]
    try:
        for client in clients:
            assert client.read_reply().code == 220
        with RawSmtpClient(proxy.port) as third:
            reply = third.read_reply()
            assert reply.code == 421 and reply.lines[0].startswith("4.7.0"), reply
            third.expect_close()
    finally:
        for client in clients:
            client.close()


def test_global_connection_limit(postfix, start_proxy):
    proxy = start_proxy(postfix.port, max_connections=2, max_connections_per_client=0)
    first, second = RawSmtpClient(proxy.port, source="127.0.0.11"), RawSmtpClient(proxy.port, source="127.0.0.12")
    try:
        assert first.read_reply().code == 220 and second.read_reply().code == 220
        # A third client, from yet another address: the limit is global, not per client.
        with RawSmtpClient(proxy.port, source="127.0.0.13") as third:
            reply = third.read_reply()
            assert reply.code == 421 and reply.lines[0].startswith("4.7.0"), reply
            assert third.expect_close() == b""
        # The implicit-TLS listener shares the limit (and says nothing in plaintext).
        with RawSmtpClient(proxy.tls_port, source="127.0.0.13") as fourth:
            assert fourth.expect_close() == b""
        def refusals() -> list[dict]:
            return [r for r in proxy.process.logs() if r["event"] == "connection refused"]

        wait_until(lambda: len(refusals()) >= 2, 10, "two 'connection refused' lines")
        assert len(refusals()) == 2, refusals()
        # A slot frees when a session ends.
        first.close()
        proxy.process.wait_for_log(lambda r: r["event"] == "disconnect from unknown[127.0.0.11]")
        with RawSmtpClient(proxy.port, source="127.0.0.13") as fifth:
            assert fifth.read_reply().code == 220
            assert fifth.command("QUIT").code == 221
    finally:
        first.close()
        second.close()


def _message_of(size: int, subject: str) -> bytes:
    """A message of exactly `size` bytes (CRLF line ends, no line starting with a dot)."""
    head = f"Subject: {subject}\r\n\r\n".encode()
    body = b""
    while len(head) + len(body) + 72 <= size:
        body += b"x" * 70 + b"\r\n"
    rest = size - len(head) - len(body)
    assert rest >= 2, "size too small for the subject"
    body += b"y" * (rest - 2) + b"\r\n"
    message = head + body
    assert len(message) == size
    return message


def test_max_message_size_is_advertised_and_enforced(tmp_path, start_proxy):
    limit = 5000
    with PostfixInstance(tmp_path / "size") as backend:  # its own log: this test's alone
        proxy = start_proxy(backend.port, max_message_size=limit)
        at_limit, over_bdat, over_data = token(), token(), token()
        with RawSmtpClient(proxy.port) as client:
            client.read_reply()
            extensions = client.ehlo().lines[1:]
            assert f"SIZE {limit}" in extensions, extensions  # ours, not Postfix's 10240000
            # Declared too big: refused before anything reaches the backend.
            reply = client.command(f"MAIL FROM:<a@example.org> SIZE={limit + 1}")
            assert reply.code == 552 and reply.lines[0].startswith("5.3.4"), reply
            # Exactly at the limit: delivered.
            assert client.command(f"MAIL FROM:<a@example.org> SIZE={limit}").code == 250
            assert client.command("RCPT TO:<user@example.test>").code == 250
            assert client.command("DATA").code == 354
            client.send(_message_of(limit, at_limit) + b".\r\n")
            assert client.read_reply().code == 250
            # BDAT beyond the limit: refused, the chunk swallowed, the session goes on.
            assert "CHUNKING" in extensions
            assert client.command("MAIL FROM:<a@example.org>").code == 250
            assert client.command("RCPT TO:<user@example.test>").code == 250
            client.send(f"BDAT {limit + 1} LAST\r\n".encode() + _message_of(limit + 1, over_bdat))
            reply = client.read_reply()
            assert reply.code == 552 and reply.lines[0].startswith("5.3.4"), reply
            assert client.command("RSET").code == 250
            assert client.command("QUIT").code == 221
        # Undeclared, and really bigger than the limit: 552 at the end of DATA, and the
        # backend is cut off before the final dot.
        with RawSmtpClient(proxy.port) as client:
            _start_message(client)
            client.send(_message_of(limit + 1, over_data) + b".\r\n")
            reply = client.read_reply()
            assert reply.code == 552 and reply.lines[0].startswith("5.3.4"), reply
            client.expect_close()
        backend.wait_for_log(r"lost connection after DATA")
        proxy.process.wait_for_log(lambda r: r["event"] == "message relayed" and r["result"] == "rejected")
        delivered = backend.wait_for_messages(1)
        assert len(delivered) == 1 and at_limit.encode() in delivered[0], delivered
        # Postfix saw the refused MAIL and the BDAT never: one MAIL accepted per message; the
        # refused chunk's transaction ended with the proxy's RSET, then the client's own.
        backend.wait_for_log(r"disconnect from \S+ ehlo=1 mail=2 rcpt=2 data=1 rset=2 quit=1 commands=9")


def test_one_log_line_at_the_start_and_the_end_of_each_session(postfix, start_proxy, pki):
    proxy = start_proxy(postfix.port)
    messages = [f"Subject: {token()}\r\n\r\nfirst\r\n".encode(),
                f"Subject: {token()}\r\n\r\nthe second, longer\r\n".encode()]

    def session_lines(source: str) -> tuple[dict, dict]:
        end = proxy.process.wait_for_log(lambda r: r["event"] == f"disconnect from unknown[{source}]")
        starts = [r for r in proxy.process.logs() if r["event"] == f"connect from unknown[{source}]"]
        ends = [r for r in proxy.process.logs() if r["event"] == f"disconnect from unknown[{source}]"]
        assert len(starts) == 1 and len(ends) == 1, (starts, ends)
        assert starts[0]["session"] == end["session"]
        assert starts[0]["client"] == end["client"] == f"unknown[{source}]"
        return starts[0], end

    started = time.monotonic()
    with RawSmtpClient(proxy.port, source="127.0.0.21") as client:  # STARTTLS, two messages
        local_port = client.sock.getsockname()[1]
        client.read_reply()
        client.ehlo()
        client.starttls(pki.client_context(), server_hostname=HOSTNAME)
        client.ehlo()
        for message in messages:
            assert client.command("MAIL FROM:<a@example.org>").code == 250
            assert client.command("RCPT TO:<user@example.test>").code == 250
            assert client.command("DATA").code == 354
            client.send(message + b".\r\n")
            assert client.read_reply().code == 250
        client.command("QUIT")
    start, end = session_lines("127.0.0.21")
    elapsed = time.monotonic() - started
    assert start["port"] == local_port and start["listener"] == f"127.0.0.1:{proxy.port}"
    assert start["implicit_tls"] is False
    assert end["tls"] is True and end["messages"] == 2
    assert end["bytes"] == sum(len(m) for m in messages)
    assert 0 < end["duration"] <= elapsed + 0.0005  # logged rounded to the millisecond

    with RawSmtpClient(proxy.port, source="127.0.0.22") as client:  # plaintext, one refused
        client.read_reply()
        client.ehlo()
        assert client.command("MAIL FROM:<a@example.org>").code == 250
        assert client.command("RCPT TO:<user@elsewhere.example>").code == 554  # relay denied
        client.command("QUIT")
    start, end = session_lines("127.0.0.22")
    assert end["tls"] is False and end["messages"] == 0 and end["bytes"] == 0

    result = run_swaks("--server", f"127.0.0.1:{proxy.tls_port}", "--tls-on-connect", "--local-interface",
                       "127.0.0.23", "--to", "user@example.test", "--header", f"Subject: {token()}")
    assert result.returncode == 0, result.stdout
    start, end = session_lines("127.0.0.23")
    assert start["implicit_tls"] is True and start["listener"] == f"127.0.0.1:{proxy.tls_port}"
    assert end["tls"] is True and end["messages"] == 1 and end["bytes"] > 0


# ----------------------------------------------------------------------- backend failures


def test_backend_down_gives_421(start_proxy):
    proxy = start_proxy(free_port())
    with RawSmtpClient(proxy.port) as client:
        reply = client.read_reply()
        assert reply.code == 421 and reply.lines[0].startswith("4.3.0"), reply
        client.expect_close()


def _send_marked(client: RawSmtpClient, marker: str, sender: str = "a@example.org") -> None:
    """One accepted message with `marker` in its Subject, in a greeted session."""
    assert client.command(f"MAIL FROM:<{sender}>").code == 250
    assert client.command("RCPT TO:<user@example.test>").code == 250
    assert client.command("DATA").code == 354
    client.send(f"Subject: {marker}\r\n\r\nok\r\n.\r\n".encode())
    assert client.read_reply().code == 250


def _start_message(client: RawSmtpClient) -> None:
    client.read_reply()
    client.ehlo()
    assert client.command("MAIL FROM:<a@example.org>").code == 250
    assert client.command("RCPT TO:<user@example.test>").code == 250
    assert client.command("DATA").code == 354


def test_backend_killed_mid_data_gives_4xx_never_250(tmp_path, start_proxy):
    with PostfixInstance(tmp_path / "victim") as backend:
        proxy = start_proxy(backend.port)
        with RawSmtpClient(proxy.port) as client:
            _start_message(client)
            client.send(b"Subject: lost\r\n\r\nfirst half\r\n")
            proxy.process.wait_for_log("connect from")
            assert backend.kill_smtpd() >= 1
            reply = client.read_reply()
            assert reply.code == 421 and reply.lines[0].startswith("4.4.2"), reply
            client.expect_close()
        assert backend.messages() == []


def test_backend_vanishing_before_its_final_reply_gives_4xx(tmp_path, start_proxy):
    # smtp-sink keeps the message and hangs up instead of answering the final dot: the
    # sender must not get 250 (it will retry; a duplicate is better than a loss).
    with SmtpSink(tmp_path / "sink", disconnect_after=["."]) as sink:
        proxy = start_proxy(sink.port)
        with RawSmtpClient(proxy.port) as client:
            _start_message(client)
            client.send(b"Subject: unanswered\r\n\r\nbody\r\n.\r\n")
            reply = client.read_reply()
            assert reply.code == 421 and reply.lines[0].startswith("4.4.2"), reply


# ----------------------------------------------------------------------- smtproxy check


def test_check_names_the_wrong_key(tmp_path):
    path = write_config(tmp_path, '[inbound]\nsecurity_level = "mandatory"\n')
    result = subprocess.run([sys.executable, "-m", "smtproxy", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "inbound.security_level" in lines[0] and '"mandatory"' in lines[0]
    assert "none, may, encrypt" in lines[0]


def test_check_prints_the_effective_config(tmp_path, ecdsa_cert):
    path = write_config(tmp_path, {"inbound": {"certificates": [
        {"cert_file": str(ecdsa_cert.cert_file), "key_file": str(ecdsa_cert.key_file)}]}})
    result = subprocess.run([sys.executable, "-m", "smtproxy", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert 'security_level = "may"' in result.stdout
    assert 'bare_newline = "reject"' in result.stdout

