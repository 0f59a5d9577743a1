"""Issue 7 acceptance: a legacy MTA -> smtproxy's outbound listener -> a real remote MX.

The remote MX is a real Postfix with STARTTLS and a trustme PKI (or smtp-sink, or a small
scripted server where a misbehaving peer is the point of the test: response injection, a
remote that dies mid-DATA).  Every test asserts on what the remote received, on the reply
codes the MTA got and on smtproxy's log lines.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.peers import (
    Pki,
    PostfixInstance,
    RawSmtpClient,
    SmtproxyProcess,
    free_port,
    postfix_tls_server_params,
    run_swaks,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.integration

REMOTE_DOMAIN = "remote.test"


@dataclasses.dataclass
class OutboundProxy:
    process: SmtproxyProcess
    port: int

    def records(self, text: str) -> list[dict]:
        return [r for r in self.process.logs() if text in r["event"]]


@pytest.fixture(scope="module")
def remote_pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("remote-pki"))


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


@pytest.fixture
def start_outbound(tmp_path) -> Iterator[Callable[..., OutboundProxy]]:
    started: list[SmtproxyProcess] = []

    def start(routes: dict[str, str], *, policy: str = "", **outbound) -> OutboundProxy:
        directory = tmp_path / f"proxy{len(started)}"
        directory.mkdir()
        (directory / "routes").write_text("".join(f"{key} {value}\n" for key, value in routes.items()))
        (directory / "tls_policy").write_text(policy)
        port = free_port()
        config = {
            "inbound": {"listen": [], "implicit_tls_listen": []},
            "outbound": {
                "listen": [f"127.0.0.1:{port}"],
                "hostname": "out.example.test",
                "routes_file": str(directory / "routes"),
                "policy_file": str(directory / "tls_policy"),
                "connect_timeout": 5,
                "reply_timeout": 10,
                **outbound,
            },
            "metrics": {"listen": ""},
            "tlsrpt": {"socket": ""},
            "log": {"format": "json", "level": "info"},
        }
        process = SmtproxyProcess(write_config(directory, config)).start()
        started.append(process)
        process.wait_ready()
        return OutboundProxy(process, port)

    yield start
    for process in started:
        process.stop()
        print(f"--- smtproxy output ---\n{process.output_text()}")


def token() -> str:
    return uuid.uuid4().hex


def delivered(remote: PostfixInstance, marker: str, timeout: float = 20.0) -> bytes:
    def find() -> bytes | None:
        return next((m for m in remote.messages() if marker.encode() in m), None)

    return wait_until(find, timeout=timeout, what=f"a message with {marker} at {remote.hostname}")


def swaks_via(proxy: OutboundProxy, marker: str, to: str = f"user@{REMOTE_DOMAIN}", *args: str):
    return run_swaks("--server", f"127.0.0.1:{proxy.port}", "--to", to, "--from", "sender@example.test",
                     "--header", f"Subject: {marker}", *args)


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
