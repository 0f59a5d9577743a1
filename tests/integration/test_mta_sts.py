"""MTA-STS (RFC 8461) on the outbound side, against real peers: policies served over HTTPS
by `openssl s_server -WWW` (one per policy domain, on its own loopback address, port 443
as RFC 8461 fixes it), remote MX hosts that are real Postfix instances, names from a real
Unbound, swaks as the legacy MTA and tlsrpt-collectd/-reportd for the reports.

    127.0.0.1:P  Postfix, certificate for mx.sts.test (test CA)
    127.0.0.2:P  Postfix, certificate for unrelated.example.net (test CA)
    127.0.0.9-12:443  the policies of enforce.test, wrongname.test, unlisted.test, testing.test
    127.0.0.13:443  mta-sts.unreachable.test: nothing listens

smtproxy trusts the test CA (`[outbound] ca_file`) for the MX hosts and the policy fetches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.dns_server import Unbound, requires_unbound
from tests.integration.outbound_peers import (
    OutboundProxy,
    assert_deferred,
    assert_delivered_nowhere,
    delivered,
    metric_samples,
)
from tests.integration.outbound_peers import send_marked as send
from tests.integration.peers import (
    Pki,
    PostfixInstance,
    free_port,
    listening_on,
    postfix_tls_server_params,
    stop_process,
    wait_until,
)

pytestmark = [pytest.mark.integration, requires_unbound]

OPENSSL = "openssl"  # Debian package openssl, installed by scripts/test
POLICIES = {  # domain: (address of mta-sts.<domain>, policy)
    "enforce.test": ("127.0.0.9", "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n"),
    "wrongname.test": ("127.0.0.10", "version: STSv1\nmode: enforce\nmx: *.wrong.test\nmax_age: 86400\n"),
    "unlisted.test": ("127.0.0.11", "version: STSv1\nmode: enforce\nmx: mx.other.test\nmax_age: 86400\n"),
    "testing.test": ("127.0.0.12", "version: STSv1\nmode: testing\nmx: *.wrong.test\nmax_age: 86400\n"),
}
MX = {"enforce.test": "mx.sts.test", "wrongname.test": "mx.wrong.test", "unlisted.test": "mx.sts.test",
      "testing.test": "mx.wrong.test", "unreachable.test": "mx.sts.test", "kept.test": "mx.sts.test",
      "plain.test": "mx.wrong.test"}
UNREACHABLE = "127.0.0.13"
KEPT = "127.0.0.14"


def txt(domain: str, policy_id: str = "1") -> str:
    return f'_mta-sts.{domain}. TXT "v=STSv1; id={policy_id}"'


class PolicyServer:
    """`openssl s_server -WWW` serving `policy` as /.well-known/mta-sts.txt (text/plain)
    for mta-sts.<domain> on `address`:443."""

    def __init__(self, root: Path, pki: Pki, domain: str, address: str, policy: str) -> None:
        self.root, self.address = root, address
        (root / ".well-known").mkdir(parents=True)
        (root / ".well-known" / "mta-sts.txt").write_text(policy)
        cert = pki.server_cert(f"mta-sts.{domain}")
        self.process = subprocess.Popen(
            [OPENSSL, "s_server", "-quiet", "-WWW", "-accept", f"{address}:443", "-cert", str(cert.cert_file),
             "-key", str(cert.key_file)],
            cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        try:
            wait_until(lambda: listening_on(address, 443) or self.process.poll() is not None, 10,
                       f"openssl s_server on {address}:443")
            assert self.process.poll() is None, f"openssl s_server on {address}:443 exited"
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.process)


@dataclasses.dataclass
class Peers:
    port: int
    pki: Pki
    good: PostfixInstance
    wrong: PostfixInstance
    dns: Unbound


@pytest.fixture(scope="module")
def peers(tmp_path_factory) -> Iterator[Peers]:
    pki = Pki(tmp_path_factory.mktemp("sts-pki"))
    port = free_port()
    records = [f"mta-sts.unreachable.test. A {UNREACHABLE}", txt("unreachable.test"),
               f"mta-sts.kept.test. A {KEPT}", txt("kept.test"),
               "mx.sts.test. A 127.0.0.1", "mx.wrong.test. A 127.0.0.2",
               *(f'_smtp._tls.{domain}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"'
                 for domain in ("testing.test", "unreachable.test")),
               *(f"{domain}. MX 10 {host}." for domain, host in MX.items())]
    for domain, (address, _) in POLICIES.items():
        records += [f"mta-sts.{domain}. A {address}", txt(domain)]
    domains = list(MX)
    with contextlib.ExitStack() as stack:
        good = stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("sts-good"), domains=domains, hostname="mx.sts.test", port=port,
            extra_main_cf=postfix_tls_server_params(pki.server_cert("mx.sts.test"))))
        wrong = stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("sts-wrong"), domains=domains, hostname="mx.wrong.test",
            extra_main_cf=postfix_tls_server_params(pki.server_cert("unrelated.example.net")),
            extra_master_cf=[f"127.0.0.2:{port} inet n - n - - smtpd"]))
        wait_until(lambda: listening_on("127.0.0.2", port), 10, f"Postfix smtpd on 127.0.0.2:{port}")
        for domain, (address, policy) in POLICIES.items():
            server = PolicyServer(tmp_path_factory.mktemp(f"sts-{domain}"), pki, domain, address, policy)
            stack.callback(server.stop)
        dns = Unbound(tmp_path_factory.mktemp("sts-unbound"), records).start()
        stack.callback(dns.stop)
        yield Peers(port, pki, good, wrong, dns)


def outbound(start_outbound, peers: Peers, **options) -> OutboundProxy:
    options.setdefault("default_level", "may")
    return start_outbound({}, dns={"nameservers": [peers.dns.nameserver]}, port=peers.port,
                          ca_file=str(peers.pki.ca_file), **options)


def assert_nowhere(peers: Peers, marker: str) -> None:
    assert_delivered_nowhere(marker, peers.good, peers.wrong)


def trust_words(proxy: OutboundProxy, sessions: int = 1) -> list[str]:
    return [record["event"].split(" ")[0] for record in proxy.settled_logs(sessions)
            if " TLS connection established to " in record["event"]]


# ----------------------------------------------------------------------------- enforce


def test_enforce_delivers_only_verified(start_outbound, peers):
    """The same MX under may would be only Trusted: the policy makes it verify."""
    metrics = free_port()
    proxy = outbound(start_outbound, peers, metrics_port=metrics)
    marker, result = send(proxy, "enforce.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.good, marker)
    [applies] = proxy.records("MTA-STS: policy applies")
    assert (applies["mode"], applies["mx"], applies["policy_id"]) == ("enforce", ["mx.sts.test"], "1")
    assert trust_words(proxy) == ["Verified"]
    marker, result = send(proxy, "plain.test")  # the control: no policy
    assert result.returncode == 0, result.stdout
    delivered(peers.wrong, marker)
    assert trust_words(proxy, 2) == ["Verified", "Trusted"]
    assert metric_samples(metrics, "smtproxy_policy_decisions_total") == {
        '{level="verify",outcome="tls",source="mta-sts"}': 1.0, '{level="may",outcome="tls",source="default_level"}': 1.0}


def test_enforce_refuses_a_certificate_for_another_name(start_outbound, peers):
    proxy = outbound(start_outbound, peers)
    marker, result = send(proxy, "wrongname.test")
    assert_deferred(result, "hostname_mismatch")
    assert_nowhere(peers, marker)


def test_enforce_refuses_an_mx_host_the_policy_does_not_list(start_outbound, peers):
    proxy = outbound(start_outbound, peers)
    marker, result = send(proxy, "unlisted.test")
    assert_deferred(result, "MX host mx.sts.test is not in the MTA-STS policy of unlisted.test (mx: mx.other.test)")
    assert_nowhere(peers, marker)


def test_a_policy_table_entry_outranks_mta_sts(start_outbound, peers):
    proxy = outbound(start_outbound, peers, policy="wrongname.test may\n")
    marker, result = send(proxy, "wrongname.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.wrong, marker)
    assert proxy.records("MTA-STS") == []


def test_mta_sts_can_be_switched_off(start_outbound, peers):
    proxy = outbound(start_outbound, peers, mta_sts={"enabled": False})
    marker, result = send(proxy, "wrongname.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.wrong, marker)
    assert proxy.records("MTA-STS") == []


# ----------------------------------------------------------------------------- no policy, testing


def test_an_unreachable_policy_is_no_policy_and_reported(collector, start_outbound, peers):
    """RFC 8461 5.1: a domain whose policy cannot be fetched, and none is cached, gets
    mail as if it had none; smtproxy says why, and so does TLSRPT (RFC 8460
    sts-policy-fetch-error) for the connection made without it."""
    proxy = outbound(start_outbound, peers, tlsrpt={"socket": str(collector.socket)})
    marker, result = send(proxy, "unreachable.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.good, marker)
    [why] = proxy.records("MTA-STS: no policy")
    assert why["result_type"] == "sts-policy-fetch-error" and UNREACHABLE in why["reason"], why
    assert trust_words(proxy) == ["Trusted"]  # the handshake itself is fine, and logged so
    wait_until(lambda: collector.stored_results() == 1, 10, "1 result in the collector's database")
    collector.roll_over()
    [policy] = collector.reports_by_reportd({"unreachable.test"})["unreachable.test"]["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": "unreachable.test"}
    [detail] = policy["failure-details"]
    assert detail["result-type"] == "sts-policy-fetch-error" and UNREACHABLE in detail["failure-reason-code"]


def test_testing_delivers_and_reports_what_enforce_would_refuse(collector, start_outbound, peers):
    proxy = outbound(start_outbound, peers, tlsrpt={"socket": str(collector.socket)})
    marker, result = send(proxy, "testing.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.wrong, marker)
    assert proxy.records("MTA-STS testing: mx.wrong.test[127.0.0.2] would be refused under enforce")
    wait_until(lambda: collector.stored_results() == 1, 10, "1 result in the collector's database")
    collector.roll_over()
    [policy] = collector.reports_by_reportd({"testing.test"})["testing.test"]["policies"]
    assert policy["policy"] == {"policy-type": "sts", "policy-domain": "testing.test",
                                "policy-string": ["version: STSv1", "mode: testing", "mx: *.wrong.test",
                                                  "max_age: 86400"],
                                "mx-host": ["*.wrong.test"]}
    assert policy["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [detail] = policy["failure-details"]
    assert (detail["result-type"], detail["failure-reason-code"]) == ("certificate-host-mismatch", "hostname_mismatch")


# ----------------------------------------------------------------------------- the cache


def test_a_cached_policy_survives_a_restart_and_a_vanished_policy_server(start_outbound, peers, tmp_path):
    """RFC 8461 10.2: once known, a policy cannot be switched off by blocking its fetch."""
    cache = tmp_path / "state" / "mta-sts.sqlite"
    server = PolicyServer(tmp_path / "kept", peers.pki, "kept.test", KEPT,
                          "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n")
    try:
        first = outbound(start_outbound, peers, mta_sts={"cache_file": str(cache)})
        marker, result = send(first, "kept.test")
        assert result.returncode == 0, result.stdout
        delivered(peers.good, marker)
        assert first.records("MTA-STS: policy fetched") and trust_words(first) == ["Verified"]
        first.process.stop()
    finally:
        server.stop()
    assert cache.exists()
    again = outbound(start_outbound, peers, mta_sts={"cache_file": str(cache)})
    marker, result = send(again, "kept.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.good, marker)
    assert again.records("MTA-STS: policy fetched") == [] and again.records("MTA-STS: policy applies")
    assert trust_words(again) == ["Verified"]


def test_a_policy_kept_in_memory_survives_a_reload(start_outbound, peers, tmp_path):
    """Without cache_file, the policy lives in the process: a SIGHUP (as after every
    certificate renewal) must not drop it, or blocking the fetch right after one would
    switch MTA-STS off."""
    server = PolicyServer(tmp_path / "kept", peers.pki, "kept.test", KEPT,
                          "version: STSv1\nmode: enforce\nmx: mx.sts.test\nmax_age: 86400\n")
    try:
        proxy = outbound(start_outbound, peers)
        marker, result = send(proxy, "kept.test")
        assert result.returncode == 0, result.stdout
        delivered(peers.good, marker)
    finally:
        server.stop()
    after = len(proxy.process.logs())
    proxy.process.send_signal(signal.SIGHUP)
    proxy.process.wait_for_log("configuration reloaded", after=after)
    marker, result = send(proxy, "kept.test")
    assert result.returncode == 0, result.stdout
    delivered(peers.good, marker)
    assert trust_words(proxy, 2) == ["Verified", "Verified"]
    assert len(proxy.records("MTA-STS: policy fetched", sessions=2)) == 1
