"""Issue 7 acceptance: a legacy MTA -> smtproxy's outbound listener -> a real remote MX.

The remote MX is a real Postfix with STARTTLS and a trustme PKI.  Every test asserts on
what the remote received, on the reply codes the MTA got and on smtproxy's log lines.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.outbound_peers import REMOTE_DOMAIN, delivered, swaks_via, token
from tests.integration.peers import PostfixInstance, postfix_tls_server_params, run_swaks

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_remote(tmp_path_factory, remote_pki) -> Iterator[PostfixInstance]:
    """A remote MX for remote.test with STARTTLS (certificate for mx.remote.test)."""
    chain = remote_pki.server_cert("mx.remote.test")
    with PostfixInstance(tmp_path_factory.mktemp("remote"), domains=[REMOTE_DOMAIN], hostname="mx.remote.test",
                         extra_main_cf=postfix_tls_server_params(chain)) as instance:
        yield instance


@pytest.fixture
def plain_remote(postfix_factory) -> PostfixInstance:
    """A remote MX for remote.test without STARTTLS (one per test: its log is the evidence)."""
    return postfix_factory(domains=[REMOTE_DOMAIN], hostname="plain.remote.test")


# ----------------------------------------------------------------------- real Postfix both sides


def test_postfix_legacy_mta_relays_through_smtproxy_to_tls_postfix(
        postfix_factory, tls_remote, remote_pki, start_outbound):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{tls_remote.port}"}, default_level="encrypt",
                           ca_file=str(remote_pki.ca_file))
    legacy = postfix_factory(hostname="legacy.example.test", extra_main_cf={
        "relayhost": f"[127.0.0.1]:{proxy.port}",
        "default_transport": "smtp",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "smtp_tls_security_level": "none",
    })
    marker = token()
    result = run_swaks("--server", f"127.0.0.1:{legacy.port}", "--to", f"user@{REMOTE_DOMAIN}",
                       "--from", "sender@example.test", "--header", f"Subject: {marker}")
    assert result.returncode == 0, result.stdout
    message = delivered(tls_remote, marker).decode()
    assert "(using TLSv1.3" in message or "(using TLSv1.2" in message, message
    tls_remote.wait_for_log(r"TLS connection established from unknown\[127\.0\.0\.1\]")
    legacy.wait_for_log(r"status=sent \(250 2\.0\.0 Ok")
    established = proxy.records("TLS connection established to")
    assert established and established[0]["event"].startswith(
        f"Trusted TLS connection established to 127.0.0.1[127.0.0.1]:{tls_remote.port}: TLSv1."), established


def test_may_delivers_in_plaintext_to_a_remote_without_starttls(plain_remote, start_outbound):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{plain_remote.port}"}, default_level="may")
    marker = token()
    result = swaks_via(proxy, marker)
    assert result.returncode == 0, result.stdout
    message = delivered(plain_remote, marker).decode()
    assert "with ESMTP id" in message and "ESMTPS" not in message
    assert not proxy.records("TLS connection established")


def test_encrypt_defers_when_the_remote_offers_no_starttls(plain_remote, start_outbound):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{plain_remote.port}"}, default_level="encrypt")
    marker = token()
    result = swaks_via(proxy, marker)
    assert result.returncode != 0
    assert "451 4.7.5 TLS is required, but was not offered by host" in result.stdout, result.stdout
    # Postfix counts the commands of each session in its disconnect line: no MAIL was sent
    session = plain_remote.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 (.*)")
    assert "mail=" not in session.group(1), session.group(0)
    assert not any(marker.encode() in m for m in plain_remote.messages())


def test_a_remote_offering_only_an_older_suite_gets_tls_as_from_postfix(postfix_factory, remote_pki, start_outbound):
    """The default cipher list is Postfix's `medium` grade (smtp_tls_ciphers): a remote that
    offers only TLS 1.2 with AES-CBC and SHA-1 (outside Python's default list, which was
    the default before: `encrypt` deferred such mail, `may` sent it in plaintext) gets TLS."""
    old = postfix_factory(domains=[REMOTE_DOMAIN], hostname="old.remote.test", extra_main_cf={
        **postfix_tls_server_params(remote_pki.server_cert("old.remote.test")),
        "smtpd_tls_protocols": "<=TLSv1.2", "smtpd_tls_ciphers": "high",
        "tls_high_cipherlist": "ECDHE-ECDSA-AES256-SHA"})
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{old.port}"}, default_level="encrypt")
    marker = token()
    result = swaks_via(proxy, marker)
    assert result.returncode == 0, result.stdout
    assert "(using TLSv1.2 with cipher ECDHE-ECDSA-AES256-SHA (256/256 bits))" in delivered(old, marker).decode()
    established = proxy.records("TLS connection established to")
    assert established and "TLSv1.2 with cipher ECDHE-ECDSA-AES256-SHA" in established[0]["event"], established


def test_a_trust_store_gone_since_the_start_defers_with_a_policy_reply(tls_remote, remote_pki, start_outbound,
                                                                       tmp_path):
    """The CA file is read when the first connection needs it; removed after the start (a
    Secret rotated badly), the MTA is told to try later, and the operator why."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(remote_pki.ca_file.read_bytes())
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{tls_remote.port}"}, default_level="verify",
                           ca_file=str(ca_file))
    ca_file.unlink()
    result = swaks_via(proxy, token())
    assert result.returncode != 0
    assert "451 4.7.5 cannot start TLS to 127.0.0.1[127.0.0.1]" in result.stdout, result.stdout
    assert proxy.records("cannot start TLS to 127.0.0.1[127.0.0.1]")[0]["level"] == "error"


def test_a_remote_slow_after_the_final_dot_has_the_data_done_timeout(postfix_factory, start_outbound):
    """The final reply may take data_done_timeout (Postfix's smtp_data_done_timeout), not
    reply_timeout: a remote scanning the content would otherwise deliver a message that
    the MTA was told to send again."""
    slow = postfix_factory(domains=[REMOTE_DOMAIN], extra_main_cf={"smtpd_end_of_data_restrictions": "sleep 3"})
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{slow.port}"}, default_level="may", reply_timeout=1,
                           data_done_timeout=20)
    marker = token()
    result = swaks_via(proxy, marker)
    assert result.returncode == 0, result.stdout
    delivered(slow, marker)


def test_dane_without_dnssec_acts_as_may_and_dane_only_defers(tls_remote, start_outbound):
    """With [dns] dnssec off (the default) no TLSA lookup is made: `dane` is `may`,
    `dane-only` cannot be met (the DANE cases with a signed zone are in test_dane.py)."""
    route = f"[127.0.0.1]:{tls_remote.port}"
    proxy = start_outbound({REMOTE_DOMAIN: route}, policy=f"{route} dane\n", default_level="none")
    marker = token()
    assert swaks_via(proxy, marker).returncode == 0
    assert "(using TLSv1." in delivered(tls_remote, marker).decode()
    [fallback] = proxy.records("DANE: no usable TLSA records; level dane acts as may")
    assert fallback["reason"] == "DNSSEC is off ([dns] dnssec = false)"

    # the policy table is looked up by nexthop, as Postfix does: here the route's [host]:port
    deferred = start_outbound({"only.test": route}, policy=f"{route} dane-only\n")
    other = token()
    result = swaks_via(deferred, other, "user@only.test")
    assert result.returncode != 0
    assert (f"451 4.7.5 dane-only: no usable TLSA records for 127.0.0.1[127.0.0.1]:{tls_remote.port}: "
            "DNSSEC is off ([dns] dnssec = false)") in result.stdout, result.stdout
    assert not any(other.encode() in m for m in tls_remote.messages())


def test_clients_outside_client_networks_are_refused_so_the_listener_is_no_open_relay(tls_remote, start_outbound):
    route = f"[127.0.0.1]:{tls_remote.port}"
    closed = start_outbound({REMOTE_DOMAIN: route}, client_networks=["192.0.2.0/24"])
    marker = token()
    result = swaks_via(closed, marker)
    assert result.returncode != 0
    assert "554 5.7.1 out.example.test Error: client host [127.0.0.1] is not allowed to relay" in result.stdout
    assert closed.process.wait_for_log("connection refused")["reason"] == "client not in outbound.client_networks"
    open_to_loopback = start_outbound({REMOTE_DOMAIN: route}, client_networks=["127.0.0.0/8"])
    assert swaks_via(open_to_loopback, marker).returncode == 0
    delivered(tls_remote, marker)
