"""The real tlsrpt-collectd (PyPI tlsrpt-reporter), with tlsrpt-fetcher's and
tlsrpt-reportd's settings, for every test that checks what reached TLSRPT: the
``collector`` fixture (conftest.py) starts one per test; `Collector.reports_by_reportd`
lets the real reportd write the RFC 8460 reports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.peers import stop_process, wait_until

BIN = Path(sys.executable).parent  # tlsrpt-reporter's programs, installed with '.[test]' by scripts/test


class Collector:
    """tlsrpt-collectd on a socket in `root`, with the fetcher's and reportd's settings in
    the same INI file; `reports` is where reportd writes (record map: every rua replaced
    by that directory)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "collectd.sock"
        assert len(str(self.socket)) < 100, f"socket path too long for sun_path: {self.socket}"
        self.database = root / "collectd.sqlite"
        self.reports = root / "reports"
        self.reports.mkdir()
        self.config_file = root / "tlsrpt.cfg"
        (root / "record-map").write_text(f". REPLACE directory:{self.reports}\n")
        storage = f"sqlite://{self.database}"
        self.config_file.write_text(f"""\
[tlsrpt_collectd]
storage = {storage}
socketname = {self.socket}
sockettimeout = 1
max_uncommited_datagrams = 1
logfilename = {root}/collectd.log
log_level = debug
pidfilename = {root}/collectd.pid
dump_path_for_invalid_datagram = {root}/invalid-datagram

[tlsrpt_fetcher]
storage = {storage}
logfilename = {root}/fetcher.log
log_level = debug

[tlsrpt_reportd]
dbname = {root}/reportd.sqlite
fetchers = {BIN}/tlsrpt-fetcher --config_file {self.config_file}
organization_name = smtproxy tests
contact_info = tlsrpt-reports@example.test
sender_address = tlsrpt-reports@example.test
tlsrpt_record_map = {root}/record-map
spread_out_delivery = 1
interval_main_loop = 1
min_wait_domainlist = 0
max_wait_domainlist = 1
min_wait_domaindetails = 0
max_wait_domaindetails = 1
logfilename = {root}/reportd.log
log_level = debug
pidfilename = {root}/reportd.pid
""")
        self.process = self._spawn("tlsrpt-collectd", "collectd.out")
        try:
            wait_until(lambda: self.socket.exists() or self.process.poll() is not None, 10,
                       "tlsrpt-collectd's socket")
            assert self.process.poll() is None, self.logs()
        except AssertionError:
            self.stop()
            raise

    def _spawn(self, program: str, output: str) -> subprocess.Popen[bytes]:
        with open(self.root / output, "wb") as out:
            return subprocess.Popen([str(BIN / program), "--config_file", str(self.config_file)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def logs(self) -> str:
        texts = []
        for name in ("collectd.log", "collectd.out", "fetcher.log", "reportd.log", "reportd.out"):
            with contextlib.suppress(FileNotFoundError):
                texts.append(f"--- {name} ---\n{(self.root / name).read_text(errors='replace')}")
        return "\n".join(texts)

    def stored_results(self) -> int:
        """How many results the collector has committed to today's database."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)) as db:
                return db.execute("SELECT COALESCE(SUM(cntrtotal), 0) FROM finalresults").fetchone()[0]
        except sqlite3.OperationalError:  # being written or renamed just now
            return -1

    def roll_over(self) -> None:
        """Postfix-free development roll-over (SIGUSR2): today's rows become yesterday's,
        the database becomes collectd.sqlite.yesterday, which is all the fetcher reads."""
        yesterday = Path(f"{self.database}.yesterday")
        yesterday.unlink(missing_ok=True)  # the collector made an empty one at start
        os.kill(self.process.pid, signal.SIGUSR2)
        wait_until(lambda: yesterday.exists() and self.database.exists(), 10, "the collector's day roll-over")

    def fetch(self, *args: str) -> str:
        result = subprocess.run([str(BIN / "tlsrpt-fetcher"), "--config_file", str(self.config_file), *args],
                                capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert result.returncode == 0, result.stdout + result.stderr + self.logs()
        return result.stdout

    def reported_day(self) -> str:
        """The day the fetcher offers (its protocol's third line)."""
        return self.fetch("1999-01-01").splitlines()[2]

    def reports_by_reportd(self, domains: set[str]) -> dict[str, dict]:
        """Run tlsrpt-reportd until it has written one report per domain; return them."""
        reportd = self._spawn("tlsrpt-reportd", "reportd.out")
        try:
            def written() -> dict[str, dict] | None:
                reports = {}
                for path in self.reports.glob("*.json"):
                    with contextlib.suppress(ValueError):
                        report = json.loads(path.read_text())
                        reports[report["policies"][0]["policy"]["policy-domain"]] = report
                return reports if set(reports) >= domains else None

            return wait_until(written, 30, f"tlsrpt-reportd's reports for {sorted(domains)}")
        finally:
            stop_process(reportd)

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    root = tmp_path / "tlsrpt"
    root.mkdir()
    collector = Collector(root)
    yield collector
    collector.stop()
    print(collector.logs())
