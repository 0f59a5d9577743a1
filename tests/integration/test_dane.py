"""DANE (RFC 7672) on the outbound side, against real peers: Postfix remote MX hosts, a
validating Unbound serving a DNSSEC-signed zone (tests/integration/dns_server.py), swaks
as the legacy MTA and tlsrpt-collectd/-reportd for the reports.

    127.0.0.1:P  Postfix with STARTTLS; its chain is the leaf (one name per MX host below
                 that should match a DANE-TA record) and the test CA that issued it
    127.0.0.2:P  Postfix without STARTTLS

Every MX host has its own name, and its own TLSA records under ``_P._tcp.<mx host>``
in the signed zone ``dane.test.``; ``insecure.test.`` is unsigned, and so is the zone
holding the TLSA records of mx-adzero.dane.test (validated addresses, records without AD).
smtproxy runs with ``[dns] dnssec = true`` unless a test says otherwise.  What a test sent is
recognised by a marker in the Subject.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import ssl
import subprocess
import sys
from collections.abc import Iterator

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
    CertFiles,
    Pki,
    PostfixInstance,
    free_port,
    listening_on,
    postfix_tls_server_params,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.integration, requires_unbound]

MATCHING_NAMES = ["mx-ta.dane.test", "mx-good.dane.test"]  # in the TLS remote's certificate
DOMAINS = ["good.dane.test", "bad.dane.test", "ta.dane.test", "taname.dane.test", "unusable.dane.test",
           "none.dane.test", "bogus.dane.test", "plain.dane.test", "adzero.dane.test", "insecure.test",
           "mixed.insecure.test"]


@dataclasses.dataclass
class Remotes:
    port: int
    tls: PostfixInstance
    plain: PostfixInstance
    cert: CertFiles
    ca_der: bytes


@pytest.fixture(scope="module")
def remotes(tmp_path_factory) -> Iterator[Remotes]:
    pki = Pki(tmp_path_factory.mktemp("dane-pki"))
    port = free_port()
    cert = pki.server_cert(*MATCHING_NAMES)
    ca_pem = pki.ca_file.read_text()
    # RFC 7671 5.2.2: a server with DANE-TA records sends the trust anchor in its chain
    with_anchor = cert.chain_file.with_name("chain-with-ca.pem")
    with_anchor.write_text(cert.chain_file.read_text() + ca_pem)
    with contextlib.ExitStack() as stack:
        tls = stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("dane-tls"), domains=DOMAINS, hostname="mx-good.dane.test", port=port,
            extra_main_cf=postfix_tls_server_params(dataclasses.replace(cert, chain_file=with_anchor))))
        plain = stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("dane-plain"), domains=DOMAINS, hostname="mx-plain.dane.test",
            extra_master_cf=[f"127.0.0.2:{port} inet n - n - - smtpd"]))
        wait_until(lambda: listening_on("127.0.0.2", port), 10, f"Postfix smtpd on 127.0.0.2:{port}")
        yield Remotes(port, tls, plain, cert, ssl.PEM_cert_to_DER_cert(ca_pem))


def tlsrpt_txt(domain: str) -> str:
    return f'_smtp._tls.{domain}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"'


def spki_digest(cert: CertFiles) -> str:
    return cert.pkey_fingerprint.replace(":", "")


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory, remotes: Remotes) -> Iterator[Unbound]:
    port, good = remotes.port, spki_digest(remotes.cert)
    ca_digest = hashlib.sha256(remotes.ca_der).hexdigest()

    def host(name: str, address: str = "127.0.0.1") -> list[str]:
        return [f"{name}.dane.test. MX 10 mx-{name}.dane.test.", f"mx-{name}.dane.test. A {address}"]

    signed = [
        *host("good"), f"_{port}._tcp.mx-good.dane.test. TLSA 3 1 1 {good}", tlsrpt_txt("good.dane.test"),
        *host("bad"), f"_{port}._tcp.mx-bad.dane.test. TLSA 3 1 1 {'00' * 32}", tlsrpt_txt("bad.dane.test"),
        *host("ta"), f"_{port}._tcp.mx-ta.dane.test. TLSA 2 0 1 {ca_digest}",
        *host("taname"), f"_{port}._tcp.mx-taname.dane.test. TLSA 2 0 1 {ca_digest}",
        *host("unusable"), f"_{port}._tcp.mx-unusable.dane.test. TLSA 1 1 1 {good}",
        *host("none"),
        *host("bogus"),
        *host("plain", "127.0.0.2"), f"_{port}._tcp.mx-plain.dane.test. TLSA 3 1 1 {good}",
        *host("adzero"),
    ]
    unsigned = [
        "insecure.test. MX 10 mx.insecure.test.", "mx.insecure.test. A 127.0.0.1",
        f"_{port}._tcp.mx.insecure.test. TLSA 3 1 1 {'00' * 32}",  # wrong, but not validated: ignored
        "mixed.insecure.test. MX 10 mx-good.dane.test.",  # a forgeable MX name, a validated TLSA
    ]
    adzero = f"_{port}._tcp.mx-adzero.dane.test."  # unsigned, inside the signed zone: no AD
    server = Unbound(tmp_path_factory.mktemp("dane-unbound"), [], zones=(),
                     signed_zones={"dane.test.": signed},
                     unsigned_zones={"insecure.test.": unsigned, adzero: [f"{adzero} TLSA 3 1 1 {'00' * 32}"]},
                     bogus=[f"_{port}._tcp.mx-bogus.dane.test. TLSA 3 1 1 {good}"]).start()
    yield server
    server.stop()


def outbound(start_outbound, remotes: Remotes, dns: Unbound, policy: str = "", *, dnssec: bool = True,
             **options) -> OutboundProxy:
    options.setdefault("default_level", "may")
    return start_outbound({}, policy=policy, dns={"nameservers": [dns.nameserver], "dnssec": dnssec},
                          port=remotes.port, **options)


def assert_nowhere(remotes: Remotes, marker: str) -> None:
    assert_delivered_nowhere(marker, remotes.tls, remotes.plain)


def events(proxy: OutboundProxy, text: str) -> list[str]:
    return [record["event"] for record in proxy.records(text)]


def received_tls(message: bytes) -> bool:
    header = message.decode(errors="replace").split("\n\n", 1)[0]
    return re.search(r"\(using TLSv[\d.]+ with cipher ", header) is not None


# ----------------------------------------------------------------------------- matches


@pytest.mark.parametrize("policy", ["", "good.dane.test dane\n", "good.dane.test dane-only\n"],
                         ids=["default-level", "dane", "dane-only"])
def test_dane_ee_match_delivers_verified(policy, start_outbound, remotes, dns_server):
    """Usable TLSA records authenticate the MX host, also when no table entry names the
    destination (DESIGN.md: the table, then DANE, then the default level)."""
    metrics = free_port()
    proxy = outbound(start_outbound, remotes, dns_server, policy, metrics_port=metrics)
    marker, result = send(proxy, "good.dane.test")
    assert result.returncode == 0, result.stdout
    assert received_tls(delivered(remotes.tls, marker))
    level, source = ("may", "dane") if not policy else (policy.split()[1], "policy_file")
    assert metric_samples(metrics, "smtproxy_policy_decisions_total") == {
        f'{{level="{level}",outcome="tls",source="{source}"}}': 1.0}
    [applied] = proxy.records("DANE: TLSA records apply")
    assert applied["tlsa"] == [f"3 1 1 {spki_digest(remotes.cert)}"] and applied["mx_secure"] is True
    assert events(proxy, " TLS connection established to ")[0].startswith(
        f"Verified TLS connection established to mx-good.dane.test[127.0.0.1]:{remotes.port}: TLSv1.3 ")


def test_dane_ta_match_checks_the_mx_name(start_outbound, remotes, dns_server):
    proxy = outbound(start_outbound, remotes, dns_server)
    marker, result = send(proxy, "ta.dane.test")
    assert result.returncode == 0, result.stdout
    delivered(remotes.tls, marker)
    assert events(proxy, " TLS connection established to ")[0].startswith("Verified TLS connection established")
    # the same trust anchor, but the certificate does not name mx-taname.dane.test
    marker, result = send(proxy, "taname.dane.test")
    assert_deferred(result, "hostname_mismatch")
    assert_nowhere(remotes, marker)


@pytest.mark.parametrize("domain", ["good.dane.test", "ta.dane.test"])
def test_a_resumed_session_is_judged_by_the_same_records(domain, start_outbound, remotes, dns_server):
    """A resumed handshake sends no certificate; the chain of the handshake that made the
    session is matched again (DANE-TA needs the whole chain, not only the leaf)."""
    proxy = outbound(start_outbound, remotes, dns_server, f"{domain} dane connection_reuse=no\n")
    for _ in range(2):
        marker, result = send(proxy, domain)
        assert result.returncode == 0, result.stdout
        delivered(remotes.tls, marker)
    established = [record for record in proxy.settled_logs(2) if " TLS connection established to " in record["event"]]
    assert [(record["event"].split(" ")[0], record["resumed"]) for record in established] == [
        ("Verified", False), ("Verified", True)]


def test_a_secure_tlsa_under_an_insecure_mx_authenticates_but_is_only_trusted(start_outbound, remotes, dns_server):
    """Postfix's smtp_tls_dane_insecure_mx_policy = dane: the records are used, and the
    peer is logged Trusted, since the MX host name itself could have been forged."""
    proxy = outbound(start_outbound, remotes, dns_server)
    marker, result = send(proxy, "mixed.insecure.test")
    assert result.returncode == 0, result.stdout
    delivered(remotes.tls, marker)
    [applied] = proxy.records("DANE: TLSA records apply")
    assert applied["mx_secure"] is False
    assert events(proxy, " TLS connection established to ")[0].startswith(
        "Trusted TLS connection established to mx-good.dane.test[127.0.0.1]")


# ----------------------------------------------------------------------------- fail closed


@pytest.mark.parametrize("policy", ["", "bad.dane.test dane\n"], ids=["default-level", "dane"])
def test_a_tlsa_mismatch_defers_and_sends_nothing(policy, start_outbound, remotes, dns_server):
    proxy = outbound(start_outbound, remotes, dns_server, policy)
    marker, result = send(proxy, "bad.dane.test")
    assert_deferred(result, "No_matching_DANE_TLSA_records")
    assert_nowhere(remotes, marker)


def test_a_table_entry_outranks_dane(start_outbound, remotes, dns_server):
    """The control for the test above: the same server is fine under the table's `may`."""
    proxy = outbound(start_outbound, remotes, dns_server, "bad.dane.test may\n")
    marker, result = send(proxy, "bad.dane.test")
    assert result.returncode == 0, result.stdout
    delivered(remotes.tls, marker)
    assert proxy.records("DANE:") == []


def test_usable_tlsa_and_no_starttls_defers_instead_of_plaintext(start_outbound, remotes, dns_server):
    proxy = outbound(start_outbound, remotes, dns_server)
    marker, result = send(proxy, "plain.dane.test")
    assert_deferred(result, "TLS is required, but was not offered by host mx-plain.dane.test")
    assert_nowhere(remotes, marker)


def test_a_bogus_tlsa_answer_skips_the_host(start_outbound, remotes, dns_server):
    """RFC 7672 2.1.1: a failed TLSA lookup may be an attacker hiding the records."""
    proxy = outbound(start_outbound, remotes, dns_server)
    marker, result = send(proxy, "bogus.dane.test")
    assert_deferred(result, f"TLSA lookup error for _{remotes.port}._tcp.mx-bogus.dane.test")
    assert_nowhere(remotes, marker)


def test_dane_only_without_tlsa_records_defers(start_outbound, remotes, dns_server):
    proxy = outbound(start_outbound, remotes, dns_server, "none.dane.test dane-only\n")
    marker, result = send(proxy, "none.dane.test")
    assert_deferred(result, "dane-only: no usable TLSA records for mx-none.dane.test")
    assert_nowhere(remotes, marker)


# ----------------------------------------------------------------------------- no DANE


@pytest.mark.parametrize(("domain", "why", "dnssec"), [
    ("none.dane.test", "no TLSA records", True),
    ("insecure.test", "address records not DNSSEC-validated", True),
    ("adzero.dane.test", "TLSA records not DNSSEC-validated", True),
    ("bad.dane.test", "DNSSEC is off ([dns] dnssec = false)", False),
], ids=["no-records", "insecure-addresses", "insecure-records", "dnssec-off"])
def test_without_validated_tlsa_records_dane_acts_as_may(domain, why, dnssec, start_outbound, remotes, dns_server):
    proxy = outbound(start_outbound, remotes, dns_server, f"{domain} dane\n", dnssec=dnssec)
    marker, result = send(proxy, domain)
    assert result.returncode == 0, result.stdout
    assert received_tls(delivered(remotes.tls, marker))
    [fallback] = proxy.records("DANE: no usable TLSA records; level dane acts as may")
    assert fallback["reason"] == why
    assert events(proxy, " TLS connection established to ")[0].startswith("Untrusted TLS connection established")


def test_dnssec_off_no_tlsa_lookups_for_the_default_level(start_outbound, remotes, dns_server):
    """Postfix trusts the AD bit only with smtp_dns_support_level = dnssec; so does
    smtproxy, with [dns] dnssec: off by default, and then the TLSA records that fail the
    DANE tests above do not matter."""
    proxy = outbound(start_outbound, remotes, dns_server, dnssec=False)
    asked_before = len(dns_server.log_text())
    marker, result = send(proxy, "bad.dane.test")
    assert result.returncode == 0, result.stdout
    delivered(remotes.tls, marker)
    assert proxy.records("DANE:") == []
    asked = dns_server.log_text()[asked_before:]
    assert "mx-bad.dane.test. A IN" in asked and "TLSA" not in asked, asked


def test_the_default_level_none_makes_no_tlsa_lookups(start_outbound, remotes, dns_server):
    proxy = outbound(start_outbound, remotes, dns_server, default_level="none")
    marker, result = send(proxy, "bad.dane.test")
    assert result.returncode == 0, result.stdout
    assert not received_tls(delivered(remotes.tls, marker))
    assert proxy.records("DANE:") == []


def test_only_unusable_tlsa_records_make_tls_mandatory_without_authentication(start_outbound, remotes, dns_server):
    """Postfix: TLSA records, none usable (here PKIX-EE, RFC 7672 3.1.3): level encrypt."""
    proxy = outbound(start_outbound, remotes, dns_server)
    marker, result = send(proxy, "unusable.dane.test")
    assert result.returncode == 0, result.stdout
    assert received_tls(delivered(remotes.tls, marker))
    assert proxy.records("DANE: all TLSA records unusable")
    [policy] = proxy.records("policy")
    assert policy["policy_level"] == "may"  # the table's level; the host's became encrypt


def test_probe_says_which_records_authenticated_the_host(remotes, dns_server, tmp_path):
    config = write_config(tmp_path / "conf", {
        "inbound": {"listen": [], "implicit_tls_listen": []},
        "outbound": {"port": remotes.port, "hostname": "probe.example.test"},
        "dns": {"nameservers": [dns_server.nameserver], "dnssec": True},
    })
    result = subprocess.run([sys.executable, "-m", "smtproxy", "probe", "--config", str(config), "good.dane.test"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy: may (source: default_level)" in result.stdout
    assert f"DANE: mx-good.dane.test authenticated by TLSA 3 1 1 {spki_digest(remotes.cert)}" in result.stdout
    assert f"Verified TLS connection established to mx-good.dane.test[127.0.0.1]:{remotes.port}" in result.stdout


# ----------------------------------------------------------------------------- TLSRPT


def test_tlsrpt_reports_the_tlsa_policy(collector, start_outbound, remotes, dns_server):
    """Postfix's smtp_tlsrpt_set_dane_policy: policy type tlsa, for the MX host, with its
    records as the policy strings; a mismatch is tlsa-invalid."""
    proxy = outbound(start_outbound, remotes, dns_server, tlsrpt={"socket": str(collector.socket)})
    marker, result = send(proxy, "good.dane.test")
    assert result.returncode == 0, result.stdout
    _, result = send(proxy, "bad.dane.test")
    assert result.returncode != 0, result.stdout
    wait_until(lambda: collector.stored_results() == 2, 10, "2 results in the collector's database")
    collector.roll_over()
    reports = collector.reports_by_reportd({"mx-good.dane.test", "mx-bad.dane.test"})

    [good] = reports["mx-good.dane.test"]["policies"]
    assert good["policy"] == {"policy-type": "tlsa", "policy-string": [f"3 1 1 {spki_digest(remotes.cert)}"],
                              "policy-domain": "mx-good.dane.test"}
    assert good["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}

    [bad] = reports["mx-bad.dane.test"]["policies"]
    assert bad["policy"]["policy-type"] == "tlsa"
    assert bad["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [detail] = bad["failure-details"]
    assert (detail["result-type"], detail["failure-reason-code"]) == ("tlsa-invalid", "No_matching_DANE_TLSA_records")
