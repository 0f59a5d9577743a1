"""Issue 2 acceptance: real clients -> smtproxy -> a real plaintext Postfix (or smtp-sink).

Every test asserts on what arrived at the far side (Postfix's Maildir, smtp-sink's dump,
Postfix's log), on reply codes and on smtproxy's own log lines.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.peers import (
    CertFiles,
    Pki,
    PostfixInstance,
    RawSmtpClient,
    SmtpSink,
    SmtproxyProcess,
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
                "certificates": [
                    {"cert_file": str(c.cert_file), "key_file": str(c.key_file)} for c in chains
                ],
                "tls": tls or {},
            },
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
        (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384", "-groups", "X25519:P-256"], "TLSv1.2", "X25519", "ECDSA (P-256)"),
        (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", "-groups", "P-256"], "TLSv1.2", "ECDHE (P-256)", "RSA-PSS (2048 bits)"),
        (["-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384"], "TLSv1.2", "DHE (2048 bits)", "RSA-PSS (2048 bits)"),
    ],
    ids=["tls13-x25519", "tls13-p256", "tls13-p384-rsa", "tls12-ecdhe-ecdsa", "tls12-ecdhe-rsa", "tls12-dhe-rsa"],
)
def test_openssl_s_client_facts_match_the_real_handshake(postfix, start_proxy, args, protocol, kex, signature):
    proxy = start_proxy(postfix.port)
    marker = token()
    session = (f"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.test>\r\n"
               f"DATA\r\n").encode()
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


# ----------------------------------------------------------------------- STARTTLS injection


@pytest.mark.parametrize("injected", [b"RSET\r\n", b"MAIL FROM:<evil@example.net>\r\n"])
def test_plaintext_pipelined_after_starttls_never_reaches_the_backend(postfix, start_proxy, pki, injected):
    proxy = start_proxy(postfix.port)
    marker = token()
    with RawSmtpClient(proxy.port) as client:
        client.read_reply()
        client.ehlo()
        client.starttls(pki.client_context(), server_hostname=HOSTNAME, command=b"STARTTLS\r\n" + injected)
        assert client.command(f"RCPT TO:<user@example.test>").code == 503  # nothing survived
        assert client.ehlo().code == 250
        assert client.command("MAIL FROM:<good@example.org>").code == 250
        assert client.command("RCPT TO:<user@example.test>").code == 250
        assert client.command("DATA").code == 354
        client.send(f"Subject: {marker}\r\n\r\nok\r\n.\r\n".encode())
        assert client.read_reply().code == 250
        client.command("QUIT")
    message = delivered_with(postfix, marker)
    assert b"evil@example.net" not in message
    proxy.process.wait_for_log(lambda r: r["event"] == "discarded plaintext pipelined after STARTTLS"
                               and r["bytes"] == len(injected))
    # Postfix counted exactly what crossed: one MAIL, and no RSET.
    match = postfix.wait_for_log(r"disconnect from \S+ ehlo=2 mail=1 rcpt=1 data=1 quit=1 commands=6")
    assert "rset" not in match.group(0)


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


# ----------------------------------------------------------------------- backend failures


def test_backend_down_gives_421(start_proxy):
    proxy = start_proxy(free_port())
    with RawSmtpClient(proxy.port) as client:
        reply = client.read_reply()
        assert reply.code == 421 and reply.lines[0].startswith("4.3.0"), reply
        client.expect_close()


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
