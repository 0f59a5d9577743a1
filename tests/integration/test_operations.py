"""Operations: SIGTERM drains, SIGHUP reloads (issue 6 item 3; issue 3's policy change).

Real peers: a plaintext Postfix behind the inbound listener, a TLS Postfix remote MX for
the outbound listener; smtproxy runs as a real process and gets real signals.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import signal
import socket
import ssl
import time
import uuid

import pytest

from tests.integration.outbound_peers import REMOTE_DOMAIN, delivered, swaks_via, token
from tests.integration.peers import (
    Pki,
    PostfixInstance,
    RawSmtpClient,
    SmtproxyProcess,
    free_port,
    http_get,
    openssl_s_client,
    postfix_tls_server_params,
    run_swaks,
    s_client_session,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

HOSTNAME = "mx.example.test"


def inbound_config(backend: PostfixInstance, port: int, cert, **inbound) -> dict:
    return {
        "inbound": {"listen": [f"127.0.0.1:{port}"], "implicit_tls_listen": [], "backend": f"127.0.0.1:{backend.port}",
                    "hostname": HOSTNAME, "certificates": [{"cert_file": str(cert.cert_file),
                                                            "key_file": str(cert.key_file)}], **inbound},
        "outbound": {"listen": []},
        "metrics": {"listen": ""},
        "tlsrpt": {"socket": ""},
        "log": {"format": "json", "level": "info"},
    }


@pytest.fixture
def legacy(postfix_factory) -> PostfixInstance:
    return postfix_factory()


@pytest.fixture
def started(tmp_path):
    processes: list[SmtproxyProcess] = []

    def start(config: dict) -> SmtproxyProcess:
        process = SmtproxyProcess(write_config(tmp_path / f"proxy{len(processes)}", config)).start()
        processes.append(process)
        process.wait_ready()
        return process

    yield start
    for process in processes:
        process.stop()
        print(f"--- smtproxy output ---\n{process.output_text()}")


def open_transaction(port: int, marker: str) -> RawSmtpClient:
    client = RawSmtpClient(port)
    assert client.read_reply().code == 220
    assert client.ehlo().code == 250
    assert client.command("MAIL FROM:<sender@example.org>").code == 250
    assert client.command("RCPT TO:<user@example.test>").code == 250
    assert client.command("DATA").code == 354
    client.send(f"Subject: {marker}\r\n\r\nfirst half\r\n".encode())
    return client


def fingerprint(der: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ----------------------------------------------------------------------- SIGTERM


def test_sigterm_mid_data_lets_the_message_finish_and_refuses_new_connections(legacy, started, pki):
    port = free_port()
    proxy = started(inbound_config(legacy, port, pki.server_cert(HOSTNAME), drain_timeout=20))
    marker = token()
    client = open_transaction(port, marker)
    proxy.send_signal(signal.SIGTERM)
    proxy.wait_for_log("smtproxy stopping")
    assert wait_until(lambda: refuses_connections(port), 10, "the listener to close")
    client.send(b"second half\r\n.\r\n")
    assert client.read_reply().code == 250
    assert client.command("QUIT").code == 221
    client.close()
    assert proxy.wait_exit(timeout=10) == 0
    message = delivered(legacy, marker).decode()
    assert "first half" in message and "second half" in message


def test_sessions_still_open_at_the_drain_deadline_get_421_and_the_process_exits(legacy, started, pki):
    port = free_port()
    proxy = started(inbound_config(legacy, port, pki.server_cert(HOSTNAME), drain_timeout=1))
    marker = token()
    client = open_transaction(port, marker)
    began = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    reply = client.read_reply(timeout=10)
    assert reply.code == 421 and reply.lines[0].startswith("4.3.2"), reply
    assert proxy.wait_exit(timeout=10) == 0
    assert time.monotonic() - began < 5
    legacy.wait_for_log(r"lost connection after DATA")
    assert not any(marker.encode() in m for m in legacy.messages())


def test_a_client_still_in_its_handshake_at_the_drain_deadline_gets_no_plaintext(legacy, started, pki):
    """On the implicit-TLS port nothing may be said before the handshake: the 421 would be
    plaintext bytes where the client expects a TLS record. Such a session is only closed."""
    port, tls_port = free_port(), free_port()
    proxy = started(inbound_config(legacy, port, pki.server_cert(HOSTNAME), drain_timeout=1,
                                   implicit_tls_listen=[f"127.0.0.1:{tls_port}"]))
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as client:
        proxy.wait_for_log("connect from unknown[127.0.0.1]")
        proxy.send_signal(signal.SIGTERM)
        received = b""
        while chunk := client.recv(4096):
            received += chunk
    assert received == b"", received
    assert proxy.wait_exit(timeout=10) == 0


# ----------------------------------------------------------------------- SIGHUP inbound


def test_sighup_swaps_the_certificate_while_a_running_session_completes(legacy, started, pki, tmp_path):
    port = free_port()
    old_cert, new_cert = pki.server_cert(HOSTNAME), pki.server_cert(HOSTNAME)
    cert_file, key_file = tmp_path / "live.pem", tmp_path / "live.key"
    cert_file.write_bytes(old_cert.cert_file.read_bytes())
    key_file.write_bytes(old_cert.key_file.read_bytes())
    config = inbound_config(legacy, port, old_cert)
    config["inbound"]["certificates"] = [{"cert_file": str(cert_file), "key_file": str(key_file)}]
    proxy = started(config)

    running = RawSmtpClient(port)
    assert running.read_reply().code == 220 and running.ehlo().code == 250
    running.starttls(pki.client_context(), server_hostname=HOSTNAME)
    assert fingerprint(running.tls.getpeercert(binary_form=True)) == old_cert.fingerprint

    cert_file.write_bytes(new_cert.cert_file.read_bytes())
    key_file.write_bytes(new_cert.key_file.read_bytes())
    after = len(proxy.logs())
    proxy.send_signal(signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", after=after)

    with RawSmtpClient(port) as fresh:
        assert fresh.read_reply().code == 220 and fresh.ehlo().code == 250
        fresh.starttls(pki.client_context(), server_hostname=HOSTNAME)
        assert fingerprint(fresh.tls.getpeercert(binary_form=True)) == new_cert.fingerprint

    marker = token()
    assert running.ehlo().code == 250
    assert running.command("MAIL FROM:<sender@example.org>").code == 250
    assert running.command("RCPT TO:<user@example.test>").code == 250
    assert running.command("DATA").code == 354
    running.send(f"Subject: {marker}\r\n\r\nbody\r\n.\r\n".encode())
    assert running.read_reply().code == 250
    running.close()
    delivered(legacy, marker)


def test_a_broken_config_on_sighup_leaves_the_old_one_serving(legacy, started, pki):
    port = free_port()
    cert = pki.server_cert(HOSTNAME)
    proxy = started(inbound_config(legacy, port, cert))
    proxy.config_path.write_text(proxy.config_path.read_text() + "\n[bogus]\nkey = 1\n")
    after = len(proxy.logs())
    proxy.send_signal(signal.SIGHUP)
    refused = proxy.wait_for_log("reload refused", after=after)
    assert refused["level"] == "error"
    with RawSmtpClient(port) as client:
        assert client.read_reply().code == 220 and client.ehlo().code == 250
        client.starttls(pki.client_context(), server_hostname=HOSTNAME)
        assert fingerprint(client.tls.getpeercert(binary_form=True)) == cert.fingerprint
    assert proxy.returncode is None


def test_a_reload_that_drops_the_certificates_under_a_running_implicit_tls_listener_is_refused(
        legacy, started, pki):
    """Listeners change on restart only, so the implicit-TLS listener still runs: a reload
    that leaves it without a certificate is refused, and TLS from the first byte still
    works (the review saw every such connection hang and leak)."""
    port, tls_port = free_port(), free_port()
    config = inbound_config(legacy, port, pki.server_cert(HOSTNAME), implicit_tls_listen=[f"127.0.0.1:{tls_port}"])
    proxy = started(config)
    write_config(proxy.config_path.parent, {**config, "inbound": {
        **config["inbound"], "certificates": [], "implicit_tls_listen": [], "security_level": "none"}},
        name=proxy.config_path.name)
    after = len(proxy.logs())
    proxy.send_signal(signal.SIGHUP)
    refused = proxy.wait_for_log("reload refused", after=after)
    assert "implicit-TLS listener needs one" in refused["event"], refused
    marker = uuid.uuid4().hex
    result = run_swaks("--server", f"127.0.0.1:{tls_port}", "--tls-on-connect", "--to", "user@example.test",
                       "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    wait_until(lambda: any(marker.encode() in m for m in legacy.messages()), 20, "the message at Postfix")


def test_after_a_reload_readyz_probes_the_new_backend(legacy, started, pki):
    """A reload that points the proxy at another backend moves /readyz with it: a backend
    that refuses connections makes the pod unready, as it makes every client get 421."""
    port, metrics_port = free_port(), free_port()
    config = inbound_config(legacy, port, pki.server_cert(HOSTNAME))
    config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    proxy = started(config)
    assert http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200
    gone = free_port()  # nothing listens there
    proxy.config_path.write_text(proxy.config_path.read_text().replace(f"127.0.0.1:{legacy.port}", f"127.0.0.1:{gone}"))
    after = len(proxy.logs())
    proxy.send_signal(signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", after=after)
    wait_until(lambda: http_get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 503, 10, "/readyz to follow the new backend")


def test_tls_sessions_made_before_a_reload_resume_after_it(legacy, started, pki, tmp_path):
    """The reloaded contexts seal and open tickets with the same keys as the old ones."""
    port = free_port()
    proxy = started(inbound_config(legacy, port, pki.server_cert(HOSTNAME)))
    session = tmp_path / "session.pem"
    assert "Reused" not in s_client_session(port, session, resume=False, server_name=HOSTNAME)
    after = len(proxy.logs())
    proxy.send_signal(signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", after=after)
    assert "Reused, TLSv1.3" in s_client_session(port, session, resume=True, server_name=HOSTNAME)


def test_a_reload_to_a_shorter_session_lifetime_rotates_the_ticket_keys_at_once(legacy, started, pki, tmp_path):
    """Keys rotate every half session lifetime; a reload applies a new lifetime to the key
    in use at once. A ticket (lifetime one hour, from before the reload) resumes after one
    rotation and no longer after two: its key is gone, the session has not expired."""
    port, cert = free_port(), pki.server_cert(HOSTNAME)
    proxy = started(inbound_config(legacy, port, cert))
    session = tmp_path / "session.pem"
    assert "Reused" not in s_client_session(port, session, resume=False, server_name=HOSTNAME)
    write_config(proxy.config_path.parent, inbound_config(legacy, port, cert, tls={"session_timeout": 10}))
    after = len(proxy.logs())

    def rotations(count: int) -> bool:
        return len([r for r in proxy.logs()[after:] if r["event"] == "session-ticket keys rotated"]) >= count

    proxy.send_signal(signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", after=after)
    wait_until(lambda: rotations(1), 15, "the rotation due at start + 5 s")
    assert "Reused, TLSv1.3" in s_client_session(port, session, resume=True, server_name=HOSTNAME)
    wait_until(lambda: rotations(2), 15, "the next rotation, 5 s later")
    assert "Reused" not in s_client_session(port, session, resume=True, server_name=HOSTNAME)


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_a_reload_that_drops_the_client_ca_ends_the_trust_of_resumed_sessions(legacy, started, pki, tmp_path,
                                                                             version):
    """A resumed session keeps the verdict its full handshake got. After a reload that
    trusts another CA, the session must not resume (its session ID context, a digest of the
    client-certificate settings, no longer matches): the certificate is judged again."""
    port, cert, known = free_port(), pki.server_cert(HOSTNAME), pki.client_cert("known.example.test")
    other_ca = Pki(tmp_path / "other").ca_file
    require = {"client_certificate": "require", "client_ca_file": str(pki.ca_file)}
    proxy = started(inbound_config(legacy, port, cert, tls=require))
    session, cert_args = tmp_path / "session.pem", ["-cert", str(known.cert_file), "-key", str(known.key_file)]
    first = openssl_s_client(port, args=[version, *cert_args, "-sess_out", str(session)],
                             input=b"EHLO client.test\r\nQUIT\r\n")
    assert "\n250 " in first.stdout, first.stdout
    write_config(proxy.config_path.parent, inbound_config(legacy, port, cert,
                                                          tls={**require, "client_ca_file": str(other_ca)}))
    after = len(proxy.logs())
    proxy.send_signal(signal.SIGHUP)
    proxy.wait_for_log("configuration reloaded", after=after)
    second = openssl_s_client(port, args=[version, *cert_args, "-sess_in", str(session)],
                              input=b"EHLO client.test\r\nQUIT\r\n")
    assert "\nReused, " not in second.stdout and "421 4.7.1 " in second.stdout, second.stdout
    assert "\n250 " not in second.stdout, second.stdout


def test_a_handshake_in_flight_at_a_reload_is_judged_by_the_settings_it_ran_under(legacy, started, pki, tmp_path):
    """The client's certificate was asked for and checked under the old settings (this
    certificate's fingerprint required); a reload to settings that list another fingerprint
    lands before the client's last flight. Judging that handshake by the new settings would
    mix two configurations (the old verification, the new list): it keeps the old ones."""
    port, cert, client = free_port(), pki.server_cert(HOSTNAME), pki.client_cert("known.example.test")
    settings = {"client_certificate": "require", "client_fingerprints": [client.fingerprint]}
    proxy = started(inbound_config(legacy, port, cert, tls=settings))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.load_cert_chain(client.cert_file, client.key_file)
    with RawSmtpClient(port) as smtp:
        assert smtp.read_reply().code == 220 and smtp.ehlo().code == 250
        assert smtp.command("STARTTLS").code == 220
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname=HOSTNAME)
        while True:  # until the server's flight is in: TLS 1.3's client side is then done
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                smtp.send(outgoing.read())
                incoming.write(smtp.sock.recv(65536))
        last_flight = outgoing.read()  # Certificate, CertificateVerify, Finished: held back
        write_config(proxy.config_path.parent, inbound_config(
            legacy, port, cert, tls={**settings, "client_fingerprints": [pki.client_cert("other.example.test").fingerprint]}))
        after = len(proxy.logs())
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_for_log("configuration reloaded", after=after)
        tls.write(b"EHLO client.test\r\n")
        smtp.send(last_flight + outgoing.read())
        reply = b""
        while b"\r\n250 " not in b"\r\n" + reply and not reply.startswith(b"421"):
            incoming.write(smtp.sock.recv(65536))
            with contextlib.suppress(ssl.SSLWantReadError):
                reply += tls.read(65536)
    assert reply.startswith(b"250-"), reply
    established = proxy.wait_for_log(lambda r: "TLS connection established from" in r["event"], after=after)
    assert established["event"].startswith("Trusted TLS connection established"), established
    assert "server-signature ECDSA (P-256)" in established["event"], established


# ----------------------------------------------------------------------- SIGHUP outbound


def test_a_policy_change_by_sighup_reuses_no_connection_or_session_of_the_old_policy(
        postfix_factory, remote_pki, start_outbound):
    chain = remote_pki.server_cert("mx.remote.test")
    remote = postfix_factory(domains=[REMOTE_DOMAIN], hostname="mx.remote.test", extra_main_cf={
        **postfix_tls_server_params(chain), "smtpd_tls_loglevel": "2"})
    route = f"[127.0.0.1]:{remote.port}"
    proxy = start_outbound({REMOTE_DOMAIN: route}, policy=f"{route} encrypt\n", connection_cache_time_limit=60)
    first = token()
    assert swaks_via(proxy, first).returncode == 0
    delivered(remote, first)

    policy_file = proxy.process.config_path.parent / "tls_policy"
    policy_file.write_text(f"{route} encrypt protocols=TLSv1.2\n")
    after = len(proxy.process.logs())
    proxy.process.send_signal(signal.SIGHUP)
    proxy.process.wait_for_log("configuration reloaded", after=after)

    second = token()
    assert swaks_via(proxy, second).returncode == 0
    delivered(remote, second)
    logs = proxy.settled_logs(2)
    established = [r for r in logs if "TLS connection established to" in r["event"]]
    assert [r["protocol"] for r in established] == ["TLSv1.3", "TLSv1.2"], established
    assert [r["resumed"] for r in established] == [False, False]
    assert not [r for r in logs if "TLS connection reused to" in r["event"]]
    connections = re.findall(r"smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]", remote.log_text())
    assert len(connections) == 2
