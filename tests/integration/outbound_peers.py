"""Helpers for outbound tests: a running smtproxy outbound listener and how to use it.

The `start_outbound` and `remote_pki` fixtures (tests/integration/conftest.py) build on this.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.integration.peers import PostfixInstance, SmtproxyProcess, free_port, run_swaks, wait_until, write_config

REMOTE_DOMAIN = "remote.test"


@dataclasses.dataclass
class OutboundProxy:
    process: SmtproxyProcess
    port: int

    def settled_logs(self, sessions: int = 1) -> list[dict]:
        """The log once it shows the end of `sessions` MTA sessions (a client may see its
        last reply before smtproxy's earlier log lines were read from its output)."""

        def ended() -> list[dict] | None:
            logs = self.process.logs()
            done = sum(1 for r in logs if r["event"].startswith("disconnect from ") and r.get("direction") == "outbound")
            return logs if done >= sessions else None

        return wait_until(ended, 15, f"smtproxy to log the end of {sessions} MTA session(s)")

    def records(self, text: str, *, sessions: int = 1) -> list[dict]:
        """Log records whose event contains `text`, once `sessions` MTA sessions ended."""
        return [r for r in self.settled_logs(sessions) if text in r["event"]]


def start_outbound_proxy(directory: Path, routes: Mapping[str, str], *, policy: str = "",
                         dns: Mapping[str, Any] | None = None, tlsrpt: Mapping[str, Any] | None = None,
                         mta_sts: Mapping[str, Any] | None = None, metrics_port: int | None = None,
                         **outbound: Any) -> OutboundProxy:
    """`routes` and `policy` become the routes and policy files, `dns` the [dns] table
    (e.g. {"nameservers": [unbound.nameserver]}), `tlsrpt` the [tlsrpt] table (default:
    no socket), `mta_sts` the [mta_sts] table, `metrics_port` the port of /metrics on
    127.0.0.1 (default: none), other keywords [outbound] keys."""
    directory.mkdir(parents=True)
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
        **({"dns": dict(dns)} if dns is not None else {}),
        **({"mta_sts": dict(mta_sts)} if mta_sts is not None else {}),
        "metrics": {"listen": f"127.0.0.1:{metrics_port}" if metrics_port else ""},
        "tlsrpt": dict(tlsrpt) if tlsrpt is not None else {"socket": ""},
        "log": {"format": "json", "level": "info"},
    }
    process = SmtproxyProcess(write_config(directory, config)).start()
    try:
        process.wait_ready()
    except BaseException:
        process.stop()
        raise
    return OutboundProxy(process, port)


def metric_samples(port: int, name: str) -> dict[str, float]:
    """The samples of `name` on 127.0.0.1:`port`/metrics, by their label text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return {line[len(name):].rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in lines if line.startswith(name + "{")}


def send_marked(proxy: OutboundProxy, domain: str) -> tuple[str, subprocess.CompletedProcess[str]]:
    """One message to user@`domain` through `proxy` (swaks); (its marker, swaks' result)."""
    marker = token()
    return marker, swaks_via(proxy, marker, f"user@{domain}")


def assert_deferred(result: subprocess.CompletedProcess[str], text: str) -> None:
    """swaks saw the TLS-policy deferral (451 4.7.5) naming `text`."""
    assert result.returncode != 0, result.stdout
    assert re.search(rf"<\*\* 451 4\.7\.5 .*{re.escape(text)}", result.stdout), result.stdout


def assert_delivered_nowhere(marker: str, *remotes: PostfixInstance) -> None:
    for remote in remotes:
        assert not any(marker.encode() in message for message in remote.messages()), remote.hostname


def token() -> str:
    return uuid.uuid4().hex


def delivered(remote: PostfixInstance, marker: str, timeout: float = 20.0) -> bytes:
    def find() -> bytes | None:
        return next((m for m in remote.messages() if marker.encode() in m), None)

    return wait_until(find, timeout=timeout, what=f"a message with {marker} at {remote.hostname}")


def swaks_via(proxy: OutboundProxy, marker: str, to: str = f"user@{REMOTE_DOMAIN}", *args: str):
    return run_swaks("--server", f"127.0.0.1:{proxy.port}", "--to", to, "--from", "sender@example.test",
                     "--header", f"Subject: {marker}", *args)
