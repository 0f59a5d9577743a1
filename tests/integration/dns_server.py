"""A real Unbound on 127.0.0.1 serving test zones, for tests that need DNS.

Records are zone-file lines (``"example.test. MX 10 mx.example.test."``) served as
``local-data`` inside ``local-zone: "<zone>" static`` zones (default: ``test.``), so a
name in a zone without records is NXDOMAIN and a name without the asked type is NODATA.
Unbound never queries anything: ``do-not-query-address`` covers every IPv4 and IPv6
address, so a name outside the served zones gets SERVFAIL at once (``servfail.example.``
is a handy one). Answers keep the order of the records (``rrset-roundrobin: no``).

Every integration test can ask for the ``unbound_factory`` fixture (conftest.py)::

    def test_outbound(unbound_factory, smtp_sink):
        dns = unbound_factory([
            "example.test. MX 10 mx.example.test.",
            "mx.example.test. A 127.0.0.2",
        ])
        config = {"dns": {"nameservers": [dns.nameserver]}, ...}
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest

from tests.integration.peers import LOOPBACK, free_port, listening_in, stop_process, wait_until

UNBOUND = shutil.which("unbound") or shutil.which("unbound", path="/usr/sbin:/sbin")

requires_unbound = pytest.mark.skipif(
    UNBOUND is None,
    reason="unbound is not installed (Debian package unbound; scripts/install-test-deps installs it)",
)


def _quoted(text: str) -> str:
    """unbound.conf quoting: double quotes, or single quotes around a TXT record's own."""
    if '"' not in text:
        return f'"{text}"'
    if "'" in text:
        raise ValueError(f"a record cannot hold both quote characters: {text}")
    return f"'{text}'"


class Unbound:
    """One ``unbound -d`` on ``127.0.0.1:port``; ``nameserver`` is the ``[dns] nameservers``
    entry for it. ``start()`` returns once it answers a real query (bounded)."""

    def __init__(
        self,
        root: Path,
        records: Iterable[str],
        *,
        zones: Sequence[str] = ("test.",),
        port: int | None = None,
        start_timeout: float = 10.0,
        command_prefix: Sequence[str] = (),
    ) -> None:
        """`command_prefix`: run it elsewhere, e.g. ``ip netns exec NAME`` (then the readiness
        check looks for its listening TCP socket, since a query from here cannot reach it)."""
        self.root = Path(root).resolve()
        self.command_prefix = list(command_prefix)
        self.records = list(records)
        self.zones = list(zones)
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.config_file = self.root / "unbound.conf"
        self.log_file = self.root / "unbound.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def nameserver(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def config_text(self) -> str:
        lines = [
            "server:",
            f"    interface: {LOOPBACK}@{self.port}",
            "    do-daemonize: no",
            '    chroot: ""',
            '    username: ""',
            f"    directory: {_quoted(str(self.root))}",
            f"    pidfile: {_quoted(str(self.root / 'unbound.pid'))}",
            "    use-syslog: no",
            '    logfile: ""',
            "    verbosity: 1",
            "    log-replies: yes",
            "    num-threads: 1",
            "    do-ip6: no",
            "    access-control: 127.0.0.0/8 allow",
            '    module-config: "iterator"',
            "    do-not-query-address: 0.0.0.0/0",
            "    do-not-query-address: ::/0",
            "    rrset-roundrobin: no",
            *(f"    local-zone: {_quoted(zone)} static" for zone in self.zones),
            *(f"    local-data: {_quoted(record)}" for record in self.records),
            "remote-control:",
            "    control-enable: no",
        ]
        return "\n".join(lines) + "\n"

    def start(self) -> Unbound:
        assert UNBOUND is not None, "unbound is not installed"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config_text())
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(
                [*self.command_prefix, UNBOUND, "-d", "-c", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._answers, self.start_timeout, f"unbound answering on {self.nameserver}")
        except AssertionError as exc:
            self.stop()
            raise AssertionError(f"{exc}; unbound log:\n{self.log_text()}") from None
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"unbound exited {self.process.returncode}")
        if self.command_prefix:
            assert self.process is not None
            return listening_in(self.process.pid, LOOPBACK, self.port)
        query = dns.message.make_query(self.zones[0], "SOA")
        try:
            dns.query.udp(query, LOOPBACK, timeout=0.2, port=self.port)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Idempotent."""
        stop_process(self.process, timeout)

    def log_text(self) -> str:
        """Unbound's log: start-up problems, and one line per answered query."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def unbound_factory(tmp_path: Path) -> Iterator[Callable[..., Unbound]]:
    """``unbound_factory(records, *, zones=("test.",)) -> Unbound``, started; all are
    stopped at teardown. Skips the test when unbound is not installed."""
    if UNBOUND is None:
        pytest.skip("unbound is not installed (Debian package unbound)")
    servers: list[Unbound] = []

    def make(records: Iterable[str], **options: object) -> Unbound:
        server = Unbound(tmp_path / f"unbound{len(servers)}", records, **options)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    yield make
    for server in reversed(servers):
        server.stop()
