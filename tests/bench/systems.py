"""Systems under test (smtproxy, the Postfix relay anchor), the shared peers (smtp-sink,
a TLS remote MX), CPU pinning, and CPU/memory accounting from /proc.

The peers come from ``tests/integration/peers.py`` (PostfixInstance, SmtpSink, Pki,
SmtproxyProcess, free_port, wait_until); this module only adds what a benchmark needs on
top: tmpfs directories, pinning, /proc accounting and an smtproxy whose log goes to a file
(the integration harness parses every log line in a thread of the calling process, which
would steal CPU from the load generator).

CPU of a system under test = the sum of utime + stime + cutime + cstime over its process
tree (the root and every live descendant, read from /proc/PID/stat). Children that exited
and were reaped by a process of the tree are in that process's cutime/cstime, so a
Postfix master's forked-and-gone smtpd/cleanup/smtp processes are counted; a difference of
two readings is the CPU spent in between.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tests.integration.peers import (
    CertFiles,
    PostfixInstance,
    SmtproxyProcess,
    SmtpSink,
    free_port,
    postfix_tls_server_params,
    stop_process,
    wait_until,
    write_config,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
TMPFS = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def bench_dir(name: str) -> Path:
    """A fresh directory on tmpfs (Postfix queues, sink dumps, configs)."""
    path = Path(tempfile.mkdtemp(prefix=f"smtproxy-bench-{name}-", dir=TMPFS))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # fields from 3 (state) on


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant."""
    children = _children_map()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class CpuQuota:
    """Caps processes at a fraction of one CPU each, with the kernel's CFS bandwidth
    control: a cgroup per process (cgroup v1 ``cpu`` controller, or cgroup v2 ``cpu.max``).
    ``available()`` says whether this machine lets us; nothing is changed otherwise."""

    PERIOD_US = 100_000
    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        self.groups: list[Path] = []

    @classmethod
    def root(cls) -> Path | None:
        if (cls.V1 / "cpu.cfs_quota_us").exists():
            return cls.V1
        controllers = cls.V2 / "cgroup.controllers"
        if controllers.exists() and "cpu" in controllers.read_text().split():
            return cls.V2
        return None

    @classmethod
    def available(cls) -> bool:
        """Whether a group can be made here (a container may show the files read-only)."""
        root = cls.root()
        if root is None:
            return False
        probe = root / f"smtproxy-bench-probe-{os.getpid()}"
        try:
            probe.mkdir()
            probe.rmdir()
        except OSError:
            return False
        return True

    def apply(self, pid: int) -> None:
        root = self.root()
        assert root is not None
        group = root / f"smtproxy-bench-{pid}"
        group.mkdir(exist_ok=True)
        self.groups.append(group)
        quota = int(self.cpus * self.PERIOD_US)
        if root == self.V1:
            (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        (group / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        """After the processes have exited (a group with members cannot be removed)."""
        for group in self.groups:
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def cpu_seconds(root: int) -> float:
    """utime + stime + cutime + cstime summed over the tree of ``root``."""
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # stat fields 14..17 are utime, stime, cutime, cstime; fields[0] is field 3
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy so far (all CPUs, /proc/stat)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def established_to(port: int) -> int:
    """TCP connections on this host in state ESTABLISHED to ``port`` (IPv4, /proc/net/tcp)."""
    count = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def memory_kib(root: int) -> dict[str, int]:
    """RSS and PSS (KiB) summed over the tree of ``root``, and the process count."""
    rss = pss = count = 0
    for pid in tree_pids(root):
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        count += 1
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_kib": rss, "pss_kib": pss, "processes": count}


def pin(pids: Iterable[int], cpus: set[int] | None) -> None:
    if not cpus:
        return
    for pid in pids:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


def pin_tree(root: int, cpus: set[int] | None) -> None:
    """Pin ``root`` and its descendants; children forked later inherit the mask."""
    pin(tree_pids(root), cpus)


def parse_cpus(text: str | None) -> set[int] | None:
    """"0", "1,2", "0-1" -> a CPU set; "" or None -> no pinning."""
    if not text:
        return None
    cpus: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


class LogTail:
    """Counts regex matches in a growing log file, reading only what is new."""

    def __init__(self, path: Path, patterns: Mapping[str, str]) -> None:
        self.path = Path(path)
        self.patterns = {name: re.compile(regex) for name, regex in patterns.items()}
        self.counts = {name: 0 for name in patterns}
        self._offset = 0
        self._partial = b""

    def update(self) -> dict[str, int]:
        try:
            with open(self.path, "rb") as stream:
                stream.seek(self._offset)
                data = stream.read()
        except FileNotFoundError:
            return dict(self.counts)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            for name, pattern in self.patterns.items():
                if pattern.search(line):
                    self.counts[name] += 1
        return dict(self.counts)


# --------------------------------------------------------------------------- peers


def start_bench_module(name: str, args: list[str], cpus: set[int] | None) -> subprocess.Popen[bytes]:
    """``python -m tests.bench.NAME ARGS`` pinned to ``cpus``; returns once it printed
    its one line "... ready"."""
    process = subprocess.Popen(
        [sys.executable, "-m", f"tests.bench.{name}", *args],
        cwd=Path(__file__).resolve().parents[2], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )
    assert process.stdout is not None
    if not process.stdout.readline().endswith(b" ready\n"):
        raise AssertionError(f"tests.bench.{name} did not start (exit {process.poll()})")
    return process


_COUNTER = re.compile(rb"mesg=(\d+)")


def last_message_count(counter_file: Path) -> int:
    """The last ``mesg=N`` of a sink's counter output (smtp-sink -c), 0 before any."""
    try:
        with open(counter_file, "rb") as output:
            output.seek(0, os.SEEK_END)
            output.seek(max(0, output.tell() - 200))
            tail = output.read()
    except FileNotFoundError:
        return 0
    counts = _COUNTER.findall(tail)
    return int(counts[-1]) if counts else 0


class Sink:
    """smtp-sink (the plaintext backend of both systems under test) with running counters
    (``-c``) instead of one file per message (``-d``): writing 50 MiB files would put the
    sink's disk work on the load generator's CPU. ``stored()`` is smtp-sink's own count of
    messages whose final dot it received."""

    def __init__(self, cpus: set[int] | None, max_sessions: int = 256) -> None:
        # -m: smtp-sink's own bound on simultaneous connections (default 256)
        self.sink = SmtpSink(bench_dir("sink"), extra_args=["-c", "-m", str(max_sessions)])
        dump = self.sink.args.index("-d")
        del self.sink.args[dump : dump + 2]  # counters only, no message files
        self.cpus = cpus
        self.port = self.sink.port

    def start(self) -> Sink:
        self.sink.start()
        assert self.sink.process is not None
        pin([self.sink.process.pid], self.cpus)
        return self

    def cpu(self) -> float:
        assert self.sink.process is not None
        return cpu_seconds(self.sink.process.pid)

    def stored(self) -> int:
        return last_message_count(self.sink.output_file)

    complete = stored

    def clear(self) -> None:
        """Nothing to clear: no message is stored."""

    def stop(self) -> None:
        self.sink.stop()
        shutil.rmtree(self.sink.root, ignore_errors=True)


class BlackholeSink:
    """``tests.bench.blackhole`` as the bulk scenario's backend, with Sink's interface (why
    not smtp-sink there: see that module)."""

    def __init__(self, cpus: set[int] | None) -> None:
        self.dir = bench_dir("blackhole")
        self.counter = self.dir / "counter"
        self.port = free_port()
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> BlackholeSink:
        self.process = start_bench_module("blackhole", [str(self.port), str(self.counter)], self.cpus)
        return self

    def cpu(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def stored(self) -> int:
        return last_message_count(self.counter)

    complete = stored
    clear = Sink.clear

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


class RemoteMx:
    """A TLS remote MX for the outbound scenario: Postfix smtpd with STARTTLS (the ECDSA
    chain) that accepts mail for ``remote.test`` and discards it. Its maillog tells how
    many TCP connections, TLS handshakes and messages it saw."""

    def __init__(self, chain: CertFiles, cpus: set[int] | None) -> None:
        main_cf = postfix_tls_server_params(chain)
        main_cf.update({
            "relay_domains": "remote.test",
            "relay_transport": "discard:bench",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "default_process_limit": "300",
            "in_flow_delay": "0",
            "smtpd_tls_received_header": "no",
        })
        self.postfix = PostfixInstance(bench_dir("remote"), hostname="mx.remote.test", extra_main_cf=main_cf)
        self.cpus = cpus
        self.port = self.postfix.port
        self.log = LogTail(self.postfix.maillog, {
            "connections": r"smtpd\[\d+\]: connect from ",
            "handshakes": r"smtpd\[\d+\]: \w+ TLS connection established from ",
            "delivered": r"discard\[\d+\]: .*status=sent",
        })

    def start(self) -> RemoteMx:
        self.postfix.start()
        pin_tree(master_pid(self.postfix), self.cpus)
        return self

    def cpu(self) -> float:
        return cpu_seconds(master_pid(self.postfix))

    def stop(self) -> None:
        self.postfix.stop()
        shutil.rmtree(self.postfix.root, ignore_errors=True)


class DelayRelay:
    """``tests.bench.delay_relay`` in front of the remote MX: ``rtt_ms`` of round-trip time
    between the outbound systems and the remote (why in user space: see that module)."""

    def __init__(self, upstream_port: int, rtt_ms: float, cpus: set[int] | None) -> None:
        self.port = free_port()
        self.upstream_port = upstream_port
        self.rtt_ms = rtt_ms
        self.cpus = cpus
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DelayRelay:
        self.process = start_bench_module(
            "delay_relay", [str(self.port), str(self.upstream_port), str(self.rtt_ms)], self.cpus)
        return self

    def cpu(self) -> float:
        assert self.process is not None
        return cpu_seconds(self.process.pid)

    def stop(self) -> None:
        stop_process(self.process)


def master_pid(instance: PostfixInstance) -> int:
    text = (instance.queue_dir / "pid" / "master.pid").read_text()
    return int(text.strip())


# --------------------------------------------------------------------------- systems under test


class System:
    """What every system under test offers the scenarios."""

    label = "?"
    kind = "?"  # smtproxy | postfix
    starttls_port: int | None = None
    implicit_port: int | None = None
    outbound_port: int | None = None

    def start(self) -> System:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def root_pid(self) -> int:
        raise NotImplementedError

    def cpu(self) -> float:
        return cpu_seconds(self.root_pid())

    def memory(self) -> dict[str, int]:
        return memory_kib(self.root_pid())

    def __enter__(self) -> System:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class MinimalProxy(System):
    """``tests.bench.minimal_proxy``: the least a Python STARTTLS proxy does (see there)."""

    kind = "python-floor"

    def __init__(self, label: str, *, cpus: set[int] | None, backend_port: int, chain: CertFiles) -> None:
        self.label = label
        self.cpus = cpus
        self.backend_port = backend_port
        self.chain = chain
        self.starttls_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> MinimalProxy:
        self.process = start_bench_module(
            "minimal_proxy",
            [str(self.chain.chain_file), str(self.chain.key_file), str(self.starttls_port), str(self.backend_port)],
            self.cpus)
        return self

    def stop(self) -> None:
        stop_process(self.process)

    def root_pid(self) -> int:
        assert self.process is not None
        return self.process.pid


class _FileLoggedSmtproxy(SmtproxyProcess):
    """SmtproxyProcess with its output in a file (parsed only when asked) and the process
    pinned to ``cpus`` from before exec."""

    def __init__(self, config_path: Path, *, cpus: set[int] | None, args: tuple[str, ...] = ()):
        super().__init__(config_path, args=args)
        self.cpus = cpus
        self.output_file = self.cwd / "smtproxy.log"

    def start(self) -> _FileLoggedSmtproxy:
        cpus = self.cpus
        with open(self.output_file, "wb") as output:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            )
        return self

    def output_text(self) -> str:
        try:
            return self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> bool:
            if self.returncode is not None:
                raise AssertionError(f"smtproxy exited {self.returncode}:\n{self.output_text()[-3000:]}")
            return '"smtproxy ready"' in self.output_text()

        wait_until(ready, timeout, "smtproxy ready", interval=0.05)
        return {}


class Smtproxy(System):
    """smtproxy as a child process, JSON log (level info) to a file on tmpfs."""

    kind = "smtproxy"

    def __init__(
        self,
        label: str,
        *,
        cpus: set[int] | None,
        backend_port: int | None = None,
        chain: CertFiles | None = None,
        inbound: bool = True,
        outbound: Mapping[str, Any] | None = None,
        inbound_extra: Mapping[str, Any] | None = None,
        files: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        source: Path | None = None,
    ) -> None:
        """`source`: run the smtproxy package of this source tree instead of the installed one."""
        self.label = label
        self.dir = bench_dir("smtproxy")
        for name, text in (files or {}).items():
            (self.dir / name).write_text(text)
        config: dict[str, Any] = {}
        if inbound:
            assert backend_port is not None and chain is not None
            self.starttls_port, self.implicit_port = free_port(), free_port()
            config["inbound"] = {
                "listen": [f"127.0.0.1:{self.starttls_port}"],
                "implicit_tls_listen": [f"127.0.0.1:{self.implicit_port}"],
                "backend": f"127.0.0.1:{backend_port}",
                "hostname": "mx.bench.test",
                "max_message_size": 64 * 1024 * 1024,
                **(inbound_extra or {}),
                "certificates": [{"cert_file": str(chain.cert_file), "key_file": str(chain.key_file)}],
            }
        else:
            config["inbound"] = {"listen": [], "implicit_tls_listen": []}
        if outbound is not None:
            self.outbound_port = free_port()
            config["outbound"] = {"listen": [f"127.0.0.1:{self.outbound_port}"], "hostname": "relay.bench.test",
                                  **outbound}
        else:
            config["outbound"] = {"listen": [f"127.0.0.1:{free_port()}"]}
        config["metrics"] = {"listen": ""}
        config["tlsrpt"] = {"socket": ""}
        config["log"] = {"format": "json", "level": "info"}
        self.config_path = write_config(self.dir, config)
        self.process = _FileLoggedSmtproxy(self.config_path, cpus=cpus, args=args)
        if source is not None:
            self.process.env["PYTHONPATH"] = str(Path(source).resolve())

    def start(self) -> Smtproxy:
        self.process.start()
        self.process.wait_ready()
        return self

    def stop(self) -> None:
        self.process.stop()

    def root_pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def log_tail(self, patterns: Mapping[str, str]) -> LogTail:
        return LogTail(self.process.output_file, patterns)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def relay_main_cf(*, process_limit: int = 500) -> dict[str, str]:
    """What every Postfix relay anchor shares: queue and logs on tmpfs (the instance root),
    chroot off (PostfixInstance's master.cf), process limits raised, no flow-control
    delay, limits for loopback clients off."""
    return {
        "default_transport": "smtp",
        "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
        "default_process_limit": str(process_limit),
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
        "in_flow_delay": "0",
        "message_size_limit": str(64 * 1024 * 1024),
        "smtp_tls_security_level": "none",
    }


class PostfixRelay(System):
    """The anchor: a Postfix relay on the same box doing the same job.

    Inbound (``chain`` given): smtpd with STARTTLS on ``starttls_port`` and a wrapper-mode
    (implicit TLS) smtpd on ``implicit_port``, the same ECDSA certificate as smtproxy,
    OpenSSL's default groups (X25519 first, as smtproxy), TLS facts logged and in the
    Received header (as smtproxy), relayhost = the same smtp-sink.
    Outbound (``remote_port`` given): plaintext smtpd on ``outbound_port``, relayhost the
    remote MX, smtp with STARTTLS (level may), TLS session cache, and
    ``smtp_tls_connection_reuse`` per ``reuse``.
    """

    kind = "postfix"

    def __init__(
        self,
        label: str,
        *,
        cpus: set[int] | None,
        sink_port: int | None = None,
        chain: CertFiles | None = None,
        remote_port: int | None = None,
        reuse: bool = True,
        process_limit: int = 500,
    ) -> None:
        self.label = label
        self.cpus = cpus
        main_cf = relay_main_cf(process_limit=process_limit)
        extra_master: list[str] = []
        if chain is not None:
            assert sink_port is not None
            main_cf.update(postfix_tls_server_params(chain))
            main_cf["relayhost"] = f"[127.0.0.1]:{sink_port}"
            self.implicit_port = free_port()
            extra_master.append(
                f"127.0.0.1:{self.implicit_port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes"
            )
        if remote_port is not None:
            main_cf.update({
                "relayhost": f"[127.0.0.1]:{remote_port}",
                "smtp_tls_security_level": "may",
                "smtp_tls_loglevel": "1",
                "smtp_tls_connection_reuse": "yes" if reuse else "no",
                "smtp_tls_session_cache_database": "btree:${data_directory}/smtp_scache",
            })
        self.postfix = PostfixInstance(
            bench_dir("relay"), hostname="relay.bench.test", extra_main_cf=main_cf,
            extra_master_cf=extra_master,
        )
        if chain is not None:
            self.starttls_port = self.postfix.port
        if remote_port is not None:
            self.outbound_port = self.postfix.port
        self._master: int | None = None

    def start(self) -> PostfixRelay:
        self.postfix.start()
        self._master = master_pid(self.postfix)
        pin_tree(self._master, self.cpus)
        return self

    def stop(self) -> None:
        self.postfix.stop()

    def cleanup(self) -> None:
        shutil.rmtree(self.postfix.root, ignore_errors=True)

    def root_pid(self) -> int:
        assert self._master is not None
        return self._master

    def log_tail(self, patterns: Mapping[str, str]) -> LogTail:
        return LogTail(self.postfix.maillog, patterns)

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            directory = self.postfix.queue_dir / sub
            for _root, _dirs, files in os.walk(directory):
                if files:
                    return False
        return True


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05) -> bool:
    """wait_until without the exception: True when ``predicate`` held in time."""
    try:
        wait_until(predicate, timeout, what, interval=interval)
        return True
    except AssertionError:
        return False


def now() -> float:
    return time.monotonic()
