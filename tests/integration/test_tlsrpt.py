"""Issue 4 acceptance: TLSRPT results from smtproxy, collected by the real tlsrpt-collectd
and turned into RFC 8460 reports by the real tlsrpt-reportd (PyPI tlsrpt-reporter).

A real Unbound publishes the MX, A and `_smtp._tls` TXT records; the remote MX hosts are
real Postfix instances sharing one port P on different loopback addresses:

    mx.reported.test, mx.unreported.test  127.0.0.1:P  STARTTLS, certificate from the test CA
    mx.selfsigned.test                    127.0.0.4:P  STARTTLS, self-signed certificate
    mx.plain.test                         127.0.0.5:P  no STARTTLS

reported.test, selfsigned.test and plain.test publish TLSRPT records; unreported.test
does not.  Every wait is on a condition (smtproxy's log, the collector's database, a report
file), never a sleep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.dns_server import requires_unbound
from tests.integration.peers import (
    LOOPBACK,
    Pki,
    PostfixInstance,
    SmtproxyProcess,
    free_port,
    postfix_tls_server_params,
    run_swaks,
    wait_for_port,
    wait_until,
)


pytestmark = [pytest.mark.integration, requires_unbound]

DOMAINS = ["reported.test", "unreported.test", "selfsigned.test", "plain.test"]
SELF_SIGNED_ADDRESS = "127.0.0.4"
PLAIN_ADDRESS = "127.0.0.5"


def tlsrpt_txt(domain: str) -> str:
    return f'_smtp._tls.{domain}. TXT "v=TLSRPTv1; rua=mailto:tlsrpt@{domain}"'


DNS_RECORDS = [
    "reported.test. MX 10 mx.reported.test.",
    "mx.reported.test. A 127.0.0.1",
    tlsrpt_txt("reported.test"),
    "unreported.test. MX 10 mx.unreported.test.",
    "mx.unreported.test. A 127.0.0.1",
    'unreported.test. TXT "v=spf1 -all"',
    "selfsigned.test. MX 10 mx.selfsigned.test.",
    f"mx.selfsigned.test. A {SELF_SIGNED_ADDRESS}",
    tlsrpt_txt("selfsigned.test"),
    "plain.test. MX 10 mx.plain.test.",
    f"mx.plain.test. A {PLAIN_ADDRESS}",
    tlsrpt_txt("plain.test"),
]


# ----------------------------------------------------------------------------- peers


@dataclasses.dataclass
class Remotes:
    port: int
    ca_file: Path
    good: PostfixInstance


@pytest.fixture(scope="module")
def remotes(tmp_path_factory) -> Iterator[Remotes]:
    pki = Pki(tmp_path_factory.mktemp("tlsrpt-pki"))
    port = free_port()
    with contextlib.ExitStack() as stack:
        good = stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("mx-good"), domains=DOMAINS, hostname="mx.reported.test", port=port,
            extra_main_cf=postfix_tls_server_params(pki.server_cert("mx.reported.test", "mx.unreported.test"))))
        # each also listens on its own (unused) 127.0.0.1 port
        stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("mx-selfsigned"), domains=DOMAINS, hostname="mx.selfsigned.test",
            extra_main_cf=postfix_tls_server_params(pki.self_signed_cert("mx.selfsigned.test")),
            extra_master_cf=[f"{SELF_SIGNED_ADDRESS}:{port} inet n - n - - smtpd"]))
        stack.enter_context(PostfixInstance(
            tmp_path_factory.mktemp("mx-plain"), domains=DOMAINS, hostname="mx.plain.test",
            extra_master_cf=[f"{PLAIN_ADDRESS}:{port} inet n - n - - smtpd"]))
        for address in (SELF_SIGNED_ADDRESS, PLAIN_ADDRESS):
            wait_for_port(address, port)
        yield Remotes(port, pki.ca_file, good)


@dataclasses.dataclass
class Proxy:
    process: SmtproxyProcess
    port: int
    metrics_port: int

    def send(self, domain: str) -> tuple[str, subprocess.CompletedProcess[str]]:
        marker = uuid.uuid4().hex
        result = run_swaks("--server", f"{LOOPBACK}:{self.port}", "--to", f"user@{domain}",
                           "--from", "sender@example.test", "--header", f"Subject: {marker}")
        return marker, result

    def deliver(self, domain: str, remote: PostfixInstance) -> None:
        marker, result = self.send(domain)
        assert result.returncode == 0, result.stdout
        wait_until(lambda: any(marker.encode() in m for m in remote.messages()), 20, f"{marker} at {domain}")

    def events(self, prefix: str) -> list[str]:
        return [r["event"] for r in self.process.logs() if str(r.get("event", "")).startswith(prefix)]

    def wait_for_events(self, prefix: str, count: int) -> list[str]:
        def enough() -> list[str] | None:
            found = self.events(prefix)
            return found if len(found) >= count else None

        return wait_until(enough, 20, f"{count} log lines starting {prefix!r}")

    def established_resumed(self, host: str) -> list[bool]:
        return [r["resumed"] for r in self.process.logs()
                if "TLS connection established to" in r["event"] and f" to {host}[" in r["event"]]

    def metric(self, name: str) -> float:
        """The sum of the samples of `name` over all their labels, from /metrics."""
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.split("{")[0].split(" ")[0] == name)


@pytest.fixture
def start_proxy(smtproxy, unbound_factory, remotes) -> Callable[..., Proxy]:  # noqa: F811
    dns = unbound_factory(DNS_RECORDS)

    def start(tlsrpt: dict, **outbound) -> Proxy:
        port, metrics_port = free_port(), free_port()
        process = smtproxy({
            "inbound": {"listen": [], "implicit_tls_listen": []},
            "outbound": {
                "listen": [f"{LOOPBACK}:{port}"],
                "hostname": "out.example.test",
                "port": remotes.port,
                "default_level": "verify",
                "ca_file": str(remotes.ca_file),
                "connect_timeout": 5,
                "reply_timeout": 10,
                "connection_cache_time_limit": 30,
                **outbound,
            },
            "dns": {"nameservers": [dns.nameserver]},
            "tlsrpt": tlsrpt,
            "metrics": {"listen": f"{LOOPBACK}:{metrics_port}"},
            "log": {"format": "json", "level": "info"},
        })
        return Proxy(process, port, metrics_port)

    return start


def write_policy(tmp_path: Path, text: str) -> str:
    path = tmp_path / "tls_policy"
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- tests


def test_daily_report_counts_new_connections_only(collector, start_proxy, remotes, tmp_path):
    proxy = start_proxy({"socket": str(collector.socket)},
                        policy_file=write_policy(tmp_path, "plain.test encrypt\n"),
                        connection_reuse_count_limit=2)
    proxy.deliver("reported.test", remotes.good)  # new connection: success
    proxy.deliver("reported.test", remotes.good)  # the cached connection, reused
    proxy.deliver("reported.test", remotes.good)  # reuse limit reached: new connection, resumed session
    proxy.deliver("unreported.test", remotes.good)  # new handshake, but no TLSRPT record
    for domain in ("selfsigned.test", "plain.test"):  # verify / encrypt fail
        _, result = proxy.send(domain)
        assert result.returncode != 0 and "451 4.7.5" in result.stdout, result.stdout

    assert proxy.events("Verified TLS connection reused to mx.reported.test"), proxy.process.output_text()
    assert proxy.established_resumed("mx.reported.test") == [False, True]
    assert proxy.established_resumed("mx.unreported.test") == [False]
    # Postfix's wording; one line per reported result, in order
    assert proxy.wait_for_events("TLSRPT:", 3) == [
        "TLSRPT: status=success, domain=reported.test, receiving_mx=mx.reported.test[127.0.0.1]",
        "TLSRPT: status=failure, domain=selfsigned.test, receiving_mx=mx.selfsigned.test[127.0.0.4], "
        "failure_type=validation_failure, failure_reason=self-signed_certificate",
        "TLSRPT: status=failure, domain=plain.test, receiving_mx=mx.plain.test[127.0.0.5], "
        "failure_type=starttls_not_supported, failure_reason=starttls_not_offered",
    ]
    # results are sent in order: once the last is stored, nothing else is on its way
    wait_until(lambda: collector.stored_results() == 3, 10, "3 results in the collector's database")
    assert proxy.metric("smtproxy_tlsrpt_events_total") == 3

    collector.roll_over()
    reports = collector.reports_by_reportd({"reported.test", "selfsigned.test", "plain.test"})
    assert set(reports) == {"reported.test", "selfsigned.test", "plain.test"}  # none for unreported.test
    assert "unreported.test" not in collector.fetch(collector.reported_day()).splitlines()

    day = datetime.date.fromisoformat(collector.reported_day())
    for domain, report in reports.items():
        assert report["organization-name"] == "smtproxy tests"
        assert report["contact-info"] == "tlsrpt-reports@example.test"
        assert report["date-range"]["start-datetime"].startswith(day.isoformat())
        assert report["report-id"].endswith(f"_{domain}")
        assert [p["policy"] for p in report["policies"]] == [
            {"policy-type": "no-policy-found", "policy-domain": domain}]

    [reported] = reports["reported.test"]["policies"]
    assert reported["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    assert reported["failure-details"] == []

    [selfsigned] = reports["selfsigned.test"]["policies"]
    assert selfsigned["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [detail] = selfsigned["failure-details"]
    assert detail.pop("sending-mta-ip").startswith("127.")
    # receiving-mx-helo: the whole EHLO reply before STARTTLS, as Postfix reports it
    helo = detail.pop("receiving-mx-helo")
    assert helo.startswith("250-mx.selfsigned.test\r\n") and "\r\n250-STARTTLS\r\n" in helo, helo
    assert detail == {"result-type": "validation-failure", "receiving-mx-hostname": "mx.selfsigned.test",
                      "receiving-ip": SELF_SIGNED_ADDRESS,
                      "failure-reason-code": "self-signed_certificate", "failed-session-count": 1}

    [plain] = reports["plain.test"]["policies"]
    assert plain["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [detail] = plain["failure-details"]
    assert detail.pop("sending-mta-ip").startswith("127.")
    helo = detail.pop("receiving-mx-helo")
    assert helo.startswith("250-mx.plain.test\r\n") and "STARTTLS" not in helo, helo
    assert detail == {"result-type": "starttls-not-supported", "receiving-mx-hostname": "mx.plain.test",
                      "receiving-ip": PLAIN_ADDRESS,
                      "failure-reason-code": "starttls_not_offered", "failed-session-count": 1}


def test_resumed_sessions_count_when_not_skipped(collector, start_proxy, remotes):
    proxy = start_proxy({"socket": str(collector.socket), "skip_reused_handshakes": False},
                        connection_reuse_count_limit=1)
    proxy.deliver("reported.test", remotes.good)
    proxy.deliver("reported.test", remotes.good)  # a new connection that resumes the session
    assert proxy.established_resumed("mx.reported.test") == [False, True]
    assert len(proxy.wait_for_events("TLSRPT: status=success, domain=reported.test", 2)) == 2
    wait_until(lambda: collector.stored_results() == 2, 10, "2 results in the collector's database")

    collector.roll_over()
    day = collector.reported_day()
    assert collector.fetch(day).splitlines()[3:] == ["reported.test", "."]
    details = json.loads(collector.fetch(day, "reported.test"))
    [(record, policies)] = details["policies"].items()
    assert record == "v=TLSRPTv1; rua=mailto:tlsrpt@reported.test"
    assert policies == {'{"policy-type": 9, "policy-domain": "reported.test"}': {
        "cntrtotal": 2, "cntrfailure": 0, "failures": {}}}


def test_without_collector_mail_flows_and_drops_are_counted(start_proxy, remotes, tmp_path):
    proxy = start_proxy({"socket": str(tmp_path / "absent.sock"), "skip_reused_handshakes": False},
                        connection_reuse_count_limit=1)
    for _ in range(3):
        proxy.deliver("reported.test", remotes.good)
    assert len(proxy.wait_for_events("TLSRPT: status=success", 3)) == 3
    wait_until(lambda: proxy.metric("smtproxy_tlsrpt_events_dropped_total") == 3, 10, "3 dropped results counted")
    dropped = proxy.events("TLSRPT: results dropped")
    assert dropped == [f"TLSRPT: results dropped: cannot send to the collector at {tmp_path / 'absent.sock'}: "
                       "No such file or directory"]


def test_failed_handshake_is_one_failure_result(collector, start_proxy, remotes, tmp_path):
    """A handshake that ends in an alert (no TLS 1.2 suite in common: the remote has an
    ECDSA certificate, the policy excludes aECDSA) is one validation-failure result with
    OpenSSL's reason; the message is deferred, and nothing else is reported."""
    proxy = start_proxy({"socket": str(collector.socket)},
                        policy_file=write_policy(tmp_path, "reported.test encrypt protocols=<=TLSv1.2 exclude=aECDSA\n"))
    _, result = proxy.send("reported.test")
    assert result.returncode != 0 and "451 4.7.5" in result.stdout, result.stdout
    assert proxy.wait_for_events("TLSRPT:", 1) == [
        "TLSRPT: status=failure, domain=reported.test, receiving_mx=mx.reported.test[127.0.0.1], "
        "failure_type=validation_failure, failure_reason=sslv3_alert_handshake_failure"]
    wait_until(lambda: collector.stored_results() == 1, 10, "1 result in the collector's database")
    collector.roll_over()
    details = json.loads(collector.fetch(collector.reported_day(), "reported.test"))
    [policies] = details["policies"].values()
    [counts] = policies.values()
    assert (counts["cntrtotal"], counts["cntrfailure"]) == (1, 1), counts
    assert "sslv3_alert_handshake_failure" in json.dumps(counts["failures"]), counts


def test_a_domain_routed_to_a_fixed_host_is_not_reported_about_that_host(collector, start_proxy, remotes, tmp_path):
    """A route sends reported.test to [127.0.0.1]: that host is none of its MX hosts, so
    reported.test gets no result about it (its owners could not fix it, and would learn an
    internal relay). The same delivery by its MX records is reported."""
    routes = tmp_path / "routes"
    routes.write_text(f"reported.test [127.0.0.1]:{remotes.port}\n")
    routed = start_proxy({"socket": str(collector.socket)}, routes_file=str(routes), default_level="encrypt")
    routed.deliver("reported.test", remotes.good)
    by_mx = start_proxy({"socket": str(collector.socket)}, default_level="encrypt")
    by_mx.deliver("reported.test", remotes.good)
    assert by_mx.wait_for_events("TLSRPT:", 1)[0].startswith("TLSRPT: status=success, domain=reported.test")
    assert [e for e in routed.events("") if "TLS connection established to 127.0.0.1[127.0.0.1]" in e]
    assert routed.events("TLSRPT:") == []
