"""Issue 3 acceptance: outbound connection reuse and TLS session resumption, counted at
the far side (a real Postfix remote MX with STARTTLS) and in smtproxy's own log."""

from __future__ import annotations

import re

import pytest

from tests.integration.peers import PostfixInstance, postfix_tls_server_params, wait_until
from tests.integration.outbound_peers import REMOTE_DOMAIN, delivered, swaks_via, token

pytestmark = pytest.mark.integration

@pytest.fixture
def remote(postfix_factory, remote_pki) -> PostfixInstance:
    """A fresh TLS remote per test: its log counts connections and resumed sessions."""
    chain = remote_pki.server_cert("mx.remote.test")
    return postfix_factory(domains=[REMOTE_DOMAIN], hostname="mx.remote.test", extra_main_cf={
        **postfix_tls_server_params(chain), "smtpd_tls_loglevel": "2"})


def connections(remote: PostfixInstance) -> int:
    return len(re.findall(r"smtpd\[\d+\]: connect from unknown\[127\.0\.0\.1\]", remote.log_text()))


def send(proxy, marker: str) -> None:
    result = swaks_via(proxy, marker)
    assert result.returncode == 0, result.stdout


def test_two_messages_from_two_mta_connections_share_one_remote_connection(remote, start_outbound, remote_pki):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{remote.port}"}, default_level="encrypt",
                           ca_file=str(remote_pki.ca_file), connection_cache_time_limit=30)
    first, second = token(), token()
    send(proxy, first)
    send(proxy, second)
    delivered(remote, first)
    delivered(remote, second)
    assert connections(remote) == 1, remote.log_text()
    assert len(proxy.records("TLS connection established to", sessions=2)) == 1
    reused = proxy.records("TLS connection reused to", sessions=2)
    assert len(reused) == 1 and reused[0]["event"].startswith("Trusted TLS connection reused to 127.0.0.1[127.0.0.1]")
    assert reused[0]["reused"] is True


def test_after_the_idle_limit_a_new_connection_resumes_the_tls_session(remote, start_outbound, remote_pki):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{remote.port}"}, default_level="encrypt",
                           ca_file=str(remote_pki.ca_file), connection_cache_time_limit=0.2)
    first, second = token(), token()
    send(proxy, first)
    delivered(remote, first)
    # the cached connection is closed by smtproxy (QUIT) once its idle time is over
    remote.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] .*quit=1")
    send(proxy, second)
    delivered(remote, second)
    assert connections(remote) == 2
    established = proxy.records("TLS connection established to", sessions=2)
    assert [record["resumed"] for record in established] == [False, True], established
    remote.wait_for_log(r"unknown\[127\.0\.0\.1\]: Reusing old session")


def test_connection_reuse_no_opens_a_connection_per_message(remote, start_outbound, remote_pki):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{remote.port}"}, default_level="encrypt",
                           policy=f"[127.0.0.1]:{remote.port} encrypt connection_reuse=no\n",
                           connection_cache_time_limit=30)
    first, second = token(), token()
    send(proxy, first)
    send(proxy, second)
    delivered(remote, first)
    delivered(remote, second)
    assert connections(remote) == 2
    assert not proxy.records("TLS connection reused to", sessions=2)


def test_a_cached_connection_closed_by_the_remote_is_replaced_and_counted_stale(
        remote, start_outbound, remote_pki):
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{remote.port}"}, default_level="encrypt",
                           connection_cache_time_limit=60)
    first, second = token(), token()
    send(proxy, first)
    delivered(remote, first)
    wait_until(lambda: remote.kill_smtpd() > 0 or None, timeout=10, what="an smtpd to kill")
    send(proxy, second)
    delivered(remote, second)
    assert proxy.records("was stale", sessions=2), proxy.process.output_text()
    assert not proxy.records("TLS connection reused to", sessions=2)


def test_the_session_still_resumes_after_the_remote_dropped_the_cached_connection(
        remote, start_outbound, remote_pki):
    """The remote kills the smtpd holding the cached connection (no TLS shutdown on either
    side). OpenSSL marks the session of a connection freed that way not resumable; the
    session smtproxy keeps is its own copy, so the next connection still resumes."""
    proxy = start_outbound({REMOTE_DOMAIN: f"[127.0.0.1]:{remote.port}"}, default_level="encrypt",
                           ca_file=str(remote_pki.ca_file), connection_cache_time_limit=60)
    first, second = token(), token()
    send(proxy, first)
    delivered(remote, first)
    wait_until(lambda: remote.kill_smtpd() > 0 or None, 10, "an smtpd to kill")
    send(proxy, second)
    delivered(remote, second)
    established = proxy.records("TLS connection established to", sessions=2)
    assert [r["resumed"] for r in established] == [False, True], established
