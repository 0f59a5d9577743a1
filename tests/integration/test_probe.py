"""`smtproxy probe` (DESIGN.md's posttls-finger-like client) against a real TLS Postfix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.integration.outbound_peers import REMOTE_DOMAIN
from tests.integration.peers import PostfixInstance, postfix_tls_server_params, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def remote(postfix_factory, remote_pki) -> PostfixInstance:
    chain = remote_pki.server_cert("mx.remote.test")
    return postfix_factory(domains=[REMOTE_DOMAIN], hostname="mx.remote.test",
                           extra_main_cf=postfix_tls_server_params(chain))


def probe(tmp_path, remote: PostfixInstance, remote_pki, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "routes").write_text(f"{REMOTE_DOMAIN} [127.0.0.1]:{remote.port}\n")
    (tmp_path / "tls_policy").write_text(f"[127.0.0.1]:{remote.port} encrypt\n")
    config = write_config(tmp_path / "conf", {
        "inbound": {"listen": [], "implicit_tls_listen": []},
        "outbound": {"routes_file": str(tmp_path / "routes"), "policy_file": str(tmp_path / "tls_policy"),
                     "ca_file": str(remote_pki.ca_file), "hostname": "probe.example.test"},
    })
    return subprocess.run([sys.executable, "-m", "smtproxy", "probe", "--config", str(config), *args, REMOTE_DOMAIN],
                          capture_output=True, text=True, timeout=60)


def test_probe_prints_route_policy_handshake_and_ehlo(tmp_path, remote, remote_pki):
    result = probe(tmp_path, remote, remote_pki)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"nexthop: [127.0.0.1]:{remote.port}" in out
    assert "policy: encrypt (source: policy_file " in out
    assert f"Trusted TLS connection established to 127.0.0.1[127.0.0.1]:{remote.port}: TLSv1.3 with cipher " in out
    assert "  mx.remote.test" in out and "  PIPELINING" in out
    remote.wait_for_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 quit=1 commands=4")


def test_probe_fails_when_the_level_cannot_be_met(tmp_path, remote, remote_pki):
    result = probe(tmp_path, remote, remote_pki, "--level", "verify")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "policy: verify (source: --level)" in result.stdout
    assert "no acceptable connection: 451 4.7.5 " in result.stdout
    assert "certificate-host-mismatch (hostname_mismatch)" in result.stdout
