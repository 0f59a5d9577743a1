"""Self-tests of the integration harness (peers.py) against the real programs, no smtproxy.

If these fail, the integration tests of the proxy cannot be trusted: each one proves a
helper does what the proxy tests will rely on -- Postfix delivers what it accepts into a
readable Maildir, honours XCLIENT and the PROXY protocol, speaks TLS as a remote MX;
smtp-sink stores messages and can be told to refuse; the CLI clients run; the PKI's
fingerprints are the ones OpenSSL and Postfix compute.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import uuid

import pytest
import trustme

from tests.integration.peers import (
    Pki,
    PostfixError,
    PostfixInstance,
    RawSmtpClient,
    SmtproxyExited,
    SmtproxyProcess,
    openssl_s_client,
    postfix_tls_server_params,
    posttls_finger,
    run_swaks,
    to_toml,
    wait_until,
    write_config,
)


def token() -> str:
    """A string that appears in exactly one test message."""
    return f"harness-{uuid.uuid4().hex}"


def send_by_swaks(port: int, to: str, body: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return run_swaks(
        "--server",
        f"127.0.0.1:{port}",
        "--helo",
        "client.example.test",
        "--from",
        "alice@example.test",
        "--to",
        to,
        "--header",
        "Subject: harness self-test",
        "--body",
        body,
        *extra,
    )


def transact(client: RawSmtpClient, rcpt: str, body: bytes) -> None:
    """MAIL, RCPT, DATA with ``body`` (CRLF, no final dot); every reply must be positive."""
    assert client.command("MAIL FROM:<alice@example.test>").code == 250
    assert client.command(f"RCPT TO:<{rcpt}>").code == 250
    assert client.command("DATA").code == 354
    client.send(body + b"\r\n.\r\n")
    assert client.read_reply().code == 250


# --------------------------------------------------------------------------- Postfix


def test_swaks_to_postfix_lands_in_the_maildir(postfix_backend):
    body = token()

    result = send_by_swaks(postfix_backend.port, "bob@example.test", body)

    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"<-  250 2\.0\.0 Ok: queued as [0-9A-F]+", result.stdout)
    [message] = postfix_backend.wait_for_messages(1)
    assert body.encode() in message
    assert b"Delivered-To: bob@example.test\n" in message
    assert b"Subject: harness self-test\n" in message
    postfix_backend.wait_for_log(
        r"postfix/virtual\[\d+\]: \w+: to=<bob@example\.test>.*"
        r"status=sent \(delivered to maildir\)"
    )


def test_postfix_accepts_only_its_domains(postfix_factory):
    postfix = postfix_factory(domains=["other.test"])

    accepted = send_by_swaks(postfix.port, "carol@other.test", token())
    refused = send_by_swaks(postfix.port, "dave@elsewhere.test", token())

    assert accepted.returncode == 0, accepted.stdout
    assert refused.returncode == 24, refused.stdout  # swaks: RCPT refused
    assert "<** 554 5.7.1 <dave@elsewhere.test>: Relay access denied" in refused.stdout
    [message] = postfix.wait_for_messages(1)
    assert b"Delivered-To: carol@other.test\n" in message


def test_postfix_honours_xclient_from_authorized_hosts(postfix_factory):
    postfix = postfix_factory(xclient_hosts="127.0.0.0/8")
    body = token().encode()

    with RawSmtpClient(postfix.port) as client:
        assert client.read_reply().code == 220
        ehlo = client.ehlo()
        assert any(line.startswith("XCLIENT ") and " ADDR " in line for line in ehlo.lines)
        new_greeting = client.command("XCLIENT ADDR=203.0.113.5 PORT=40123")
        assert new_greeting.code == 220, new_greeting
        assert not any(line.startswith("XCLIENT") for line in client.ehlo().lines)
        transact(client, "bob@example.test", b"Subject: xclient\r\n\r\n" + body)
        assert client.command("QUIT").code == 221
        client.expect_close()

    [message] = postfix.wait_for_messages(1)
    assert b"(unknown [203.0.113.5])" in message
    assert body in message
    postfix.wait_for_log(r"\w+: client=unknown\[203\.0\.113\.5\]$")
    postfix.wait_for_log(r"disconnect from unknown\[203\.0\.113\.5\]")


def test_postfix_refuses_xclient_from_others(postfix_backend):
    with RawSmtpClient(postfix_backend.port) as client:
        assert client.read_reply().code == 220
        assert not any(line.startswith("XCLIENT") for line in client.ehlo().lines)
        refused = client.command("XCLIENT ADDR=203.0.113.5")
        assert refused.code == 550, refused
        assert "insufficient authorization" in refused.text


def test_postfix_takes_the_client_address_from_a_proxy_v1_header(postfix_factory):
    postfix = postfix_factory(proxy_protocol=True)

    with RawSmtpClient(postfix.port) as client:
        client.send(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n")
        assert client.read_reply().code == 220
        client.ehlo()
        transact(client, "bob@example.test", b"Subject: proxy\r\n\r\n" + token().encode())
        assert client.command("QUIT").code == 221

    postfix.wait_for_log(r"connect from unknown\[198\.51\.100\.7\]")
    [message] = postfix.wait_for_messages(1)
    assert b"(unknown [198.51.100.7])" in message

    # Without the header the connection is refused: the instance really expects it.
    with RawSmtpClient(postfix.port) as client:
        client.send(b"EHLO client.example.test\r\n")
        assert client.expect_close().startswith(b"421 ")


def test_postfix_start_failure_shows_postfixs_own_error(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        instance = PostfixInstance(tmp_path / "postfix", port=port, start_timeout=15)
        with pytest.raises(
            PostfixError, match=rf"fatal: bind 127\.0\.0\.1 port {port}: Address already in use"
        ):
            instance.start()
    assert instance.pids() == []


def test_kill_smtpd_cuts_a_session_and_postfix_recovers(postfix_backend):
    with RawSmtpClient(postfix_backend.port) as client:
        assert client.read_reply().code == 220
        client.ehlo()
        assert postfix_backend.kill_smtpd() >= 1
        assert client.expect_close() == b""

    result = send_by_swaks(postfix_backend.port, "bob@example.test", token())
    assert result.returncode == 0, result.stdout


# --------------------------------------------------------------------------- TLS Postfix


@pytest.fixture
def mx_cert(pki):
    return pki.server_cert("mx.example.test")


@pytest.fixture
def mx_rsa_cert(pki):
    return pki.server_cert("mx.example.test", key_type=trustme.KeyType.RSA)


@pytest.fixture
def tls_postfix(postfix_factory, mx_cert, mx_rsa_cert):
    """Postfix as a TLS remote MX: STARTTLS, ECDSA and RSA chains side by side."""
    params = postfix_tls_server_params(mx_cert, mx_rsa_cert)
    return postfix_factory(hostname="mx.example.test", extra_main_cf=params)


def test_posttls_finger_sees_tls_and_verifies_the_test_pki(tls_postfix, mx_cert, pki):
    port = tls_postfix.port

    untrusted = posttls_finger(port, "-c", "-l", "may")
    secure = posttls_finger(
        port, "-c", "-l", "secure", "-F", str(pki.ca_file), matches=["mx.example.test"]
    )
    pinned = posttls_finger(port, "-c", "-l", "fingerprint", matches=[mx_cert.fingerprint])

    assert re.search(
        rf"Untrusted TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{port}: "
        r"TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\) key-exchange X25519 server-signature ECDSA",
        untrusted.stdout,
    ), untrusted.stdout
    assert "matched peername: mx.example.test" in secure.stdout
    assert "Verified TLS connection established" in secure.stdout, secure.stdout
    assert "Matched fingerprint" in pinned.stdout
    assert "Verified TLS connection established" in pinned.stdout, pinned.stdout
    tls_postfix.wait_for_log(
        r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: TLSv1\.3"
    )


def test_openssl_s_client_sends_a_message_over_starttls(tls_postfix, pki):
    body = token()
    session = (
        "EHLO client.example.test\r\n"
        "MAIL FROM:<alice@example.test>\r\n"
        "RCPT TO:<bob@example.test>\r\n"
        "DATA\r\n"
        f"Subject: s_client\r\n\r\n{body}\r\n.\r\n"
        "QUIT\r\n"
    ).encode()

    result = openssl_s_client(
        tls_postfix.port,
        input=session,
        args=[
            "-CAfile",
            str(pki.ca_file),
            "-verify_return_error",
            "-servername",
            "mx.example.test",
        ],
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Verification: OK" in result.stdout
    assert "Server Temp Key: X25519" in result.stdout
    assert re.search(r"^250 2\.0\.0 Ok: queued as", result.stdout, re.M), result.stdout
    assert re.search(r"^221 2\.0\.0 Bye", result.stdout, re.M)
    [message] = tls_postfix.wait_for_messages(1)
    assert body.encode() in message
    assert b"with ESMTPS id" in message
    assert b"(using TLSv1.3 with cipher" in message


@pytest.mark.parametrize(
    ("sigalgs", "signature", "cert"),
    [
        ("ecdsa_secp256r1_sha256", "ECDSA", "mx_cert"),
        ("rsa_pss_rsae_sha256", "RSA-PSS", "mx_rsa_cert"),
    ],
)
def test_tls_postfix_serves_both_chains(tls_postfix, request, sigalgs, signature, cert):
    expected = request.getfixturevalue(cert)

    result = openssl_s_client(tls_postfix.port, input=b"QUIT\r\n", args=["-sigalgs", sigalgs])

    assert f"Peer signature type: {signature}" in result.stdout, result.stdout + result.stderr
    served = re.search(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", result.stdout, re.S
    )
    assert served is not None
    assert Pki.fingerprint_of_pem(served.group(0)) == expected.fingerprint


def test_raw_client_starttls_drops_pipelined_plaintext(tls_postfix, pki):
    with RawSmtpClient(tls_postfix.port) as client:
        assert client.read_reply().code == 220
        assert "STARTTLS" in client.ehlo().lines
        # CVE-2011-0411 shape: a command pipelined behind STARTTLS in plaintext.
        client.starttls(
            pki.client_context(), server_hostname="mx.example.test", command=b"STARTTLS\r\nRSET\r\n"
        )
        assert client.tls is not None and client.tls.version() == "TLSv1.3"
        assert client.plaintext_after_starttls == b""
        after = client.ehlo()  # the first reply inside TLS is EHLO's, not RSET's
        assert after.code == 250 and after.lines[0] == "mx.example.test"
        assert "STARTTLS" not in after.lines
        assert client.command("QUIT").code == 221
        client.expect_close()
    tls_postfix.wait_for_log(
        r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 quit=1 commands=4$"
    )


# --------------------------------------------------------------------------- smtp-sink


def test_swaks_to_smtp_sink_is_stored(smtp_sink):
    body = token()

    result = send_by_swaks(smtp_sink.port, "bob@example.test", body)

    assert result.returncode == 0, result.stdout
    [message] = smtp_sink.wait_for_messages(1)
    assert message.startswith(b"X-Client-Addr: 127.0.0.1\n")
    assert b"X-Helo-Args: client.example.test\n" in message
    assert b"X-Rcpt-Args: <bob@example.test>\n" in message
    assert body.encode() in message


def test_smtp_sink_switches_and_failures(smtp_sink_factory):
    sink = smtp_sink_factory(
        pipelining=False, eightbitmime=False, xclient=False, soft_reject=["RCPT"]
    )

    with RawSmtpClient(sink.port) as client:
        assert client.read_reply().code == 220
        extensions = client.ehlo().lines[1:]
        assert "PIPELINING" not in extensions and "8BITMIME" not in extensions
        assert not any(line.startswith("XCLIENT") for line in extensions)
        assert "ENHANCEDSTATUSCODES" in extensions
        assert client.command("MAIL FROM:<alice@example.test>").code == 250
        refused = client.command("RCPT TO:<bob@example.test>")
        assert refused.code == 450 and refused.text == "4.3.0 Error: command failed"

    closing = smtp_sink_factory(reply_421_after=["DATA"])
    with RawSmtpClient(closing.port) as client:
        client.read_reply()
        client.ehlo()
        client.command("MAIL FROM:<alice@example.test>")
        client.command("RCPT TO:<bob@example.test>")
        assert client.command("DATA").code == 421
        client.expect_close()
    assert closing.messages() == []


# --------------------------------------------------------------------------- PKI, config


@pytest.mark.parametrize("key_type", [trustme.KeyType.ECDSA, trustme.KeyType.RSA])
def test_pki_fingerprints_are_openssls(pki, key_type):
    cert = pki.server_cert("mx.example.test", key_type=key_type)

    x509 = subprocess.run(
        [
            "openssl",
            "x509",
            "-in",
            str(cert.cert_file),
            "-noout",
            "-fingerprint",
            "-sha256",
            "-text",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout

    assert f"sha256 Fingerprint={cert.fingerprint}" in x509
    assert ("id-ecPublicKey" if key_type is trustme.KeyType.ECDSA else "rsaEncryption") in x509
    subprocess.run(
        ["openssl", "verify", "-CAfile", str(pki.ca_file), str(cert.cert_file)],
        capture_output=True,
        check=True,
        timeout=30,
    )


def test_write_config_round_trips_dicts(tmp_path):
    config = {
        "inbound": {
            "listen": ["127.0.0.1:2500"],
            "backend": "127.0.0.1:2525",
            "security_level_networks": {"192.0.2.0/24": "encrypt"},
            "certificates": [
                {
                    "cert_file": tmp_path / "a.pem",
                    "key_file": "a.key",
                    "server_names": ["mx.example.test"],
                },
                {"cert_file": "b.pem", "key_file": "b.key"},
            ],
            "tls": {"min_protocol": "TLSv1.2", "client_fingerprints": []},
        },
        "log": {"format": "json", "level": "debug"},
        "metrics": {"enabled": False, "port": 9464, "ratio": 0.5},
    }

    path = write_config(tmp_path, config)

    assert path.read_text() == to_toml(config)
    assert "[[inbound.certificates]]" in path.read_text()


def test_wait_until_names_what_it_waited_for():
    assert wait_until(lambda: 42, 1, "the answer") == 42
    with pytest.raises(AssertionError, match=r"timed out after 0\.1s waiting for a free lunch"):
        wait_until(lambda: None, 0.1, "a free lunch")


# --------------------------------------------------------------------------- SmtproxyProcess

# A stand-in for `python -m smtproxy run --config FILE` that speaks the log contract
# (JSON lines on stderr, "smtproxy ready" once listening, SIGHUP/SIGTERM handling), so
# the harness's process handling is proven before the real CLI exists.
STAND_IN = """
import json, signal, sys

def log(event, **facts):
    print(json.dumps({"event": event, "level": "info", **facts}), file=sys.stderr, flush=True)

config = open(sys.argv[sys.argv.index("--config") + 1]).read()
if "crash" in config:
    print("Traceback (most recent call last): boom", file=sys.stderr, flush=True)
    sys.exit(3)
signal.signal(signal.SIGHUP, lambda *_: log("reloaded", sessions=0))
signal.signal(signal.SIGTERM, lambda *_: (log("stopping"), sys.exit(0)))
print("a line that is not JSON", file=sys.stderr, flush=True)
log("smtproxy ready", listeners=1)
while True:
    signal.pause()
"""


@pytest.fixture
def stand_in_dir(tmp_path):
    package = tmp_path / "smtproxy"  # `python -m` finds it first: the config's directory is the cwd
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(STAND_IN)
    return tmp_path


def test_smtproxy_process_reads_the_log_signals_and_stops(stand_in_dir):
    process = SmtproxyProcess(write_config(stand_in_dir, "mode = 'serve'\n")).start()
    try:
        ready = process.wait_ready(timeout=20)
        assert ready == {"event": "smtproxy ready", "level": "info", "listeners": 1}
        before = len(process.logs())
        process.send_signal(signal.SIGHUP)
        assert process.wait_for_log("reloaded", after=before)["sessions"] == 0
    finally:
        status = process.stop(timeout=10)
    assert status == 0
    assert [record["event"] for record in process.logs()] == [
        "smtproxy ready",
        "reloaded",
        "stopping",
    ]
    assert "a line that is not JSON" in process.output_lines()


def test_smtproxy_process_reports_an_early_exit_with_its_output(stand_in_dir):
    process = SmtproxyProcess(write_config(stand_in_dir, "mode = 'crash'\n")).start()
    try:
        with pytest.raises(SmtproxyExited, match=r"(?s)exited 3 before .*Traceback .*: boom"):
            process.wait_ready(timeout=20)
    finally:
        process.stop()
