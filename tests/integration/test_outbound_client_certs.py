"""Issue 7 item 5: client certificates per sending domain (s/qmail control/domaincerts),
seen by a real Postfix remote MX that asks for client certificates.

Each message's Received header names the client certificate of the connection it arrived
on (`smtpd_tls_received_header`); Postfix's log ties each queue ID to the smtpd process,
that is the connection, that received it.  With connection reuse on, a sender's message
rides only on a connection made with its own certificate (DESIGN.md invariant 5).
"""

from __future__ import annotations

import re

import pytest

from tests.integration.outbound_peers import REMOTE_DOMAIN, delivered, token
from tests.integration.peers import Pki, PostfixInstance, postfix_tls_server_params, run_swaks

pytestmark = pytest.mark.integration


@pytest.fixture
def client_pki(tmp_path) -> Pki:
    """The CA of smtproxy's client certificates, trusted by the remote."""
    return Pki(tmp_path / "client-pki")


@pytest.fixture
def remote(postfix_factory, remote_pki, client_pki) -> PostfixInstance:
    chain = remote_pki.server_cert("mx.remote.test")
    return postfix_factory(domains=[REMOTE_DOMAIN], hostname="mx.remote.test", extra_main_cf={
        **postfix_tls_server_params(chain), "smtpd_tls_ask_ccert": "yes",
        "smtpd_tls_CAfile": str(client_pki.ca_file)})


def send(proxy, sender: str) -> tuple[str, str]:
    """One message from `sender` in its own MTA connection; (marker, Received header)."""
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{proxy.port}", "--to", f"user@{REMOTE_DOMAIN}",
                       "--from", sender, "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    return marker, result.stdout


def received(message: bytes) -> str:
    """The remote's own Received header (the first), unfolded."""
    header = re.search(rb"^Received: .*?(?=^\S)", message, re.S | re.M)
    assert header is not None, message
    return " ".join(header.group(0).decode().split())


def connection_of(remote: PostfixInstance, header: str) -> str:
    """The smtpd process (one connection at a time) that received the message."""
    queue_id = re.search(r"with ESMTPS id (\w+)", header)
    assert queue_id is not None, header
    match = remote.wait_for_log(rf"smtpd\[(\d+)\]: {queue_id.group(1)}: client=")
    return match.group(1)


def test_each_sender_domain_presents_its_own_certificate_and_connections_never_mix(
        remote, start_outbound, remote_pki, client_pki, tmp_path):
    default = client_pki.client_cert("default.client.test")
    alpha = client_pki.client_cert("alpha.client.test")
    beta = client_pki.client_cert("beta.client.test")
    domaincerts = tmp_path / "domaincerts"  # s/qmail syntax; keyfile left out: the key is in the chain file
    domaincerts.write_text(f"# s/qmail control/domaincerts\n.beta.test:{beta.chain_file}\n")
    proxy = start_outbound(
        {REMOTE_DOMAIN: f"[127.0.0.1]:{remote.port}"}, default_level="encrypt", ca_file=str(remote_pki.ca_file),
        connection_cache_time_limit=30,
        tls={"client_cert_file": str(default.cert_file), "client_key_file": str(default.key_file),
             "domaincerts_file": str(domaincerts),
             "sender_certificates": [{"sender_domains": ["alpha.test"], "cert_file": str(alpha.cert_file),
                                      "key_file": str(alpha.key_file)}]})

    sent = [("alice@alpha.test", "alpha"), ("bob@mail.beta.test", "beta"), ("carol@alpha.test", "alpha"),
            ("<>", "default"), ("dave@other.test", "default")]
    headers = []
    for sender, _ in sent:
        marker, transcript = send(proxy, sender)
        assert f"MAIL FROM:<{sender.strip('<>')}>" in transcript, transcript
        headers.append(received(delivered(remote, marker)))

    for (sender, name), header in zip(sent, headers):
        assert f'(Client CN "{name}.client.test", Issuer "smtproxy tests" (verified OK))' in header, (sender, header)
    connections = [connection_of(remote, header) for header in headers]
    # reuse is on: alpha's second message and the default's second message rode on earlier
    # connections, each made with the same certificate; every other message got its own
    assert connections[2] == connections[0] and connections[4] == connections[3], connections
    assert len({connections[0], connections[1], connections[3]}) == 3, connections
    assert len(re.findall(r"smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]", remote.log_text())) == 3
    assert len(proxy.records("TLS connection reused to", sessions=len(sent))) == 2
    # Postfix's words for our own CertificateVerify, with the key of the certificate sent
    established = proxy.records("TLS connection established to", sessions=len(sent))
    assert len(established) == 3 and all(
        " client-signature ECDSA (P-256) client-digest SHA256" in r["event"] for r in established), established
    policy_logs = proxy.records("policy", sessions=len(sent))
    assert [record["client_certificate"] for record in policy_logs] == [
        str(alpha.cert_file), str(beta.chain_file), str(alpha.cert_file), str(default.cert_file),
        str(default.cert_file)]
