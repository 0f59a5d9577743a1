"""Real peers for integration tests, all on 127.0.0.1.

Everything here starts or drives a *real* program over a real socket: a Postfix instance
as the plaintext legacy MTA (or a TLS remote MX), Postfix's ``smtp-sink``, ``swaks``,
``openssl s_client``, ``posttls-finger``, the smtproxy process itself, and a scripted raw
SMTP client for byte-exact sessions. Test PKIs come from ``trustme``.

Waiting: tests never sleep. They wait for a condition with a deadline -- :func:`wait_until`
(the one waiting primitive), :func:`wait_for_port`, or the ``wait_for_*`` methods built on
them -- and a timeout raises an ``AssertionError`` that says what was awaited and, where
there is one, shows the peer's own log.

Postfix needs root here (it runs its daemons as the ``postfix`` user); the test command
runs as root. See ``shared/reference/postfix-tls.md`` ("Real Postfix as a test peer") for
the quirks this module works around.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import trustme

LOOPBACK = "127.0.0.1"
CRLF = b"\r\n"

T = TypeVar("T")


# --------------------------------------------------------------------------- waiting


_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this test run
    has not handed out before.

    The kernel picks it (bind to port 0); the socket is closed before returning, so a
    program started next can bind it. Another process could take it in between; the
    kernel picks from a large range, so that is rare on a test machine. The kernel may
    well pick the same port for two calls in a row (nothing bound it in between), so
    ports already handed out are skipped: `port, tls_port = free_port(), free_port()`
    once got one port twice.
    """
    if len(_handed_out) > 10000:  # far more than a run uses; the ephemeral range is ~28,000
        _handed_out.clear()
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """(status, body) of a GET; an HTTP error status is returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(
    predicate: Callable[[], T], timeout: float, what: str, *, interval: float = 0.02
) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    The only sanctioned way for a test to wait. ``what`` names the awaited condition
    ("2 messages in the Maildir"); on timeout an ``AssertionError`` says
    ``timed out after Ns waiting for <what>``. The predicate is always called at least
    once, and once more at the deadline, so a slow machine never loses a last chance.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(min(interval, remaining))


def stop_process(process: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``. Idempotent; None is nothing to stop."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connection to ``host:port`` succeeds (the listener is bound).

    Each attempt connects and closes at once. Raises ``AssertionError`` after ``timeout``.
    """

    def accepts() -> bool:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            return False

    wait_until(accepts, timeout, f"a listener on {host}:{port}", interval=0.05)


def is_listening(port: int) -> bool:
    """True if some socket listens on TCP ``port`` (IPv4 or IPv6), read from
    /proc/net/tcp{,6} -- unlike :func:`wait_for_port`, the server sees no connection
    (no "lost connection after CONNECT" noise in its log)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            next(rows, None)
            for row in rows:
                fields = row.split()
                if len(fields) > 3 and fields[1].endswith(suffix) and fields[3] == "0A":
                    return True
    return False


def _proc_address(host: str, port: int) -> tuple[str, str]:
    """(/proc/net table, local_address column) for host:port."""
    if ":" in host:
        packed = socket.inet_pton(socket.AF_INET6, host)
        words = "".join(packed[i : i + 4][::-1].hex() for i in range(0, 16, 4))
        return "tcp6", f"{words.upper()}:{port:04X}"
    return "tcp", f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"


def listening_in(pid: int, host: str, port: int) -> bool:
    """True if host:port listens in the network namespace of process `pid`."""
    table, local = _proc_address(host, port)
    try:
        rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(f[1] == local and f[3] == "0A" for f in (row.split() for row in rows))


def listening_on(host: str, port: int) -> bool:
    """True if a socket listens on exactly host:port here (e.g. a second loopback address
    of a server whose own readiness check looks at the port only)."""
    return listening_in(os.getpid(), host, port)


# --------------------------------------------------------------------------- small helpers


def _postfix_ids() -> tuple[int, int]:
    entry = pwd.getpwnam("postfix")
    return entry.pw_uid, entry.pw_gid


def _make_traversable(path: Path) -> None:
    """Let other users (the ``postfix`` user) enter ``path`` and each of its parents.

    pytest makes its temporary directories 0700; only the search bit (o+x) is added, so
    nobody else can list them.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH | stat.S_IXGRP)


def _backdate(*paths: Path) -> None:
    """Set the modification time of Postfix configuration files 10 s into the past.

    Postfix re-reads a configuration file, 0.3 s at a time, until its mtime is at least
    a second or two old (it guards against reading a file while an editor writes it):
    a freshly written main.cf costs every ``postfix``/``postconf`` run ~2 s.
    """
    past = time.time() - 10
    for path in paths:
        os.utime(path, (past, past))


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _pids_with_env(name: str, value: str) -> list[int]:
    """Processes whose initial environment has ``name=value`` (read from /proc)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != "Z"


# --------------------------------------------------------------------------- Postfix

DEFAULT_POSTFIX_CONFIG = Path("/etc/postfix")
_POSTFIX_REGISTRY_LOCK = Path("/tmp/.smtproxy-tests-postfix-main-cf.lock")

# Only the services an MTA that receives and delivers locally needs; chroot off for all.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{smtp_listener} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
tlsproxy  unix  -       -       n       -       0       tlsproxy
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(AssertionError):
    """A Postfix instance failed to start or stop; the message carries Postfix's own text."""


def _postfix_registry(config_dir: Path, *, add: bool) -> None:
    """Add ``config_dir`` to (or remove it from) ``alternate_config_directories`` of the
    default ``/etc/postfix/main.cf``, which Postfix requires for ``postfix -c DIR``.

    Idempotent and safe against concurrent test runs (an flock around read-modify-write).
    Entries of pytest temporary directories that no longer exist are pruned, so the list
    does not grow run after run. A missing default main.cf (Debian's "No configuration"
    install) is created with nothing but this parameter and a compatibility level.
    """
    main_cf = DEFAULT_POSTFIX_CONFIG / "main.cf"
    with open(_POSTFIX_REGISTRY_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not main_cf.exists():
            main_cf.write_text(
                "# Created by smtproxy's tests/integration/peers.py: Postfix needs a default\n"
                "# main.cf that lists the test instances' configuration directories.\n"
                "compatibility_level = 3.6\n"
            )
            _backdate(main_cf)
        current = subprocess.run(
            ["postconf", "-c", str(DEFAULT_POSTFIX_CONFIG), "-h", "alternate_config_directories"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        entries = [e for e in re.split(r"[\s,]+", current) if e]
        kept = [e for e in entries if "/pytest-" not in e or Path(e).is_dir()]
        target = str(config_dir)
        if add and target not in kept:
            kept.append(target)
        if not add:
            kept = [e for e in kept if e != target]
        if kept != entries:
            subprocess.run(
                [
                    "postconf",
                    "-c",
                    str(DEFAULT_POSTFIX_CONFIG),
                    "-e",
                    "alternate_config_directories = " + " ".join(kept),
                ],
                check=True,
                capture_output=True,
                timeout=30,
            )
        _backdate(main_cf)


class PostfixInstance:
    """A real Postfix, in its own configuration and queue directories, on 127.0.0.1.

    It plays the plaintext legacy MTA behind smtproxy (or, with TLS settings in
    ``extra_main_cf``, a TLS remote MX): its smtpd listens on ``127.0.0.1:port``, accepts
    mail for ``example.test`` and the other ``domains`` from anyone (no relaying beyond
    them: ``554 Relay access denied``), and its virtual(8) agent delivers every recipient
    into one Maildir that :meth:`messages` reads. Its log goes to a file (``maillog``),
    read by :meth:`log_text` / :meth:`wait_for_log`.

    Layout under ``root``: ``etc/`` (main.cf, master.cf), ``queue/``, ``data/``,
    ``mail/Maildir/``, ``maillog``.

    ``xclient_hosts`` sets ``smtpd_authorized_xclient_hosts``; ``proxy_protocol`` sets
    ``smtpd_upstream_proxy_protocol = haproxy`` (then every connection must start with a
    PROXY header); ``extra_main_cf`` adds or overrides main.cf parameters (applied last);
    ``extra_master_cf`` appends master.cf lines (e.g. a wrapper-mode smtps listener).
    Reverse DNS lookups of clients are off (``smtpd_peername_lookup = no``), so clients
    are logged as ``unknown[ADDR]``.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        root: Path,
        *,
        domains: Iterable[str] = (),
        hostname: str = "legacy.example.test",
        xclient_hosts: str | None = None,
        proxy_protocol: bool = False,
        extra_main_cf: Mapping[str, str] | None = None,
        extra_master_cf: Iterable[str] = (),
        port: int | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.mail_base = self.root / "mail"
        self.maildir = self.mail_base / "Maildir"
        self.maillog = self.root / "maillog"
        self.hostname = hostname
        self.domains = ["example.test", *(d for d in domains if d != "example.test")]
        self.xclient_hosts = xclient_hosts
        self.proxy_protocol = proxy_protocol
        self.extra_main_cf = dict(extra_main_cf or {})
        self.extra_master_cf = list(extra_master_cf)
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self._started = False

    # -- configuration

    def main_cf(self) -> dict[str, str]:
        """The main.cf parameters this instance is started with."""
        uid, gid = _postfix_ids()
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.root),
            "myhostname": self.hostname,
            "mydestination": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            "notify_classes": "",
            "smtpd_peername_lookup": "no",
            "smtpd_relay_restrictions": "reject_unauth_destination",
            "virtual_mailbox_domains": " ".join(self.domains),
            "virtual_mailbox_base": str(self.mail_base),
            "virtual_mailbox_maps": "static:Maildir/",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_minimum_uid": str(uid),
            # Nothing leaves the test machine: anything not for our domains bounces locally.
            "default_transport": "error:5.7.1 outbound delivery is disabled in this test instance",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            # A daemon that dies abnormally (kill_smtpd) throttles its service for this
            # long (default 60s) before the master starts a new one.
            "service_throttle_time": "1s",
        }
        if self.xclient_hosts is not None:
            params["smtpd_authorized_xclient_hosts"] = self.xclient_hosts
        if self.proxy_protocol:
            params["smtpd_upstream_proxy_protocol"] = "haproxy"
        params.update(self.extra_main_cf)
        return params

    def _write_config(self) -> None:
        uid, gid = _postfix_ids()
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in (self.config_dir, self.queue_dir):
            directory.mkdir(mode=0o755, exist_ok=True)
            directory.chmod(0o755)
        for directory in (self.data_dir, self.mail_base):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chown(directory, uid, gid)
        self.root.chmod(0o755)
        _make_traversable(self.root)
        main_cf = "".join(f"{key} = {value}\n" for key, value in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main_cf)
        master_cf = _MASTER_CF.format(smtp_listener=f"{LOOPBACK}:{self.port}")
        master_cf += "".join(line.rstrip("\n") + "\n" for line in self.extra_master_cf)
        (self.config_dir / "master.cf").write_text(master_cf)
        _backdate(self.config_dir / "main.cf", self.config_dir / "master.cf")

    def _postfix(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["postfix", "-c", str(self.config_dir), *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- lifecycle

    def start(self) -> PostfixInstance:
        """Write the configuration, start Postfix and wait until smtpd accepts connections.

        Bounded by ``start_timeout``; on failure raises :class:`PostfixError` with the
        output of ``postfix start`` and the tail of the instance's maillog.
        """
        self._write_config()
        _postfix_registry(self.config_dir, add=True)
        self._started = True
        try:
            result = self._postfix("start", timeout=self.start_timeout)
        except subprocess.TimeoutExpired as exc:
            self._fail(f"`postfix start` did not finish in {self.start_timeout:g}s", exc)
        if result.returncode != 0:
            self._fail(f"`postfix start` exited {result.returncode}", result)
        # `master -w` returns once the master initialised, listeners included.
        try:
            wait_until(
                lambda: is_listening(self.port), self.start_timeout, f"smtpd on port {self.port}"
            )
        except AssertionError as exc:
            self._fail(str(exc), None)
        return self

    def _fail(self, what: str, output: Any) -> NoReturn:
        details = [f"Postfix instance {self.config_dir}: {what}"]
        if output is not None:
            for name in ("stdout", "stderr"):
                text = getattr(output, name, None)
                if isinstance(text, bytes):
                    text = text.decode(errors="replace")
                if text and text.strip():
                    details.append(f"--- {name}:\n{text.strip()}")
        details.append(f"--- {self.maillog} (tail):\n{_tail(self.log_text()) or '(empty)'}")
        with contextlib.suppress(Exception):
            self.stop()
        raise PostfixError("\n".join(details))

    def stop(self, timeout: float = 20.0) -> None:
        """Stop Postfix (``postfix stop``), then kill whatever of it is left.

        Leftovers are found by their environment (``MAIL_CONFIG`` = this instance's
        config directory), so only this instance's processes are touched. Idempotent.
        """
        if not self._started:
            return
        self._started = False
        if self.pids():  # `postfix stop` of a dead instance still costs a second
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._postfix("stop", timeout=timeout)
        self._kill_leftovers(timeout)
        _postfix_registry(self.config_dir, add=False)

    def pids(self) -> list[int]:
        """Live processes of this instance (master and its children), by environment."""
        return [
            pid
            for pid in _pids_with_env("MAIL_CONFIG", str(self.config_dir))
            if pid != os.getpid() and _alive(pid)
        ]

    def _kill_leftovers(self, timeout: float) -> None:
        def gone() -> bool:
            return not self.pids()

        with contextlib.suppress(AssertionError):
            wait_until(gone, min(timeout, 5.0), "Postfix processes to exit")
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(gone, timeout, f"Postfix processes of {self.config_dir} to die")

    def kill_smtpd(self) -> int:
        """SIGKILL every smtpd process of this instance (sessions die mid-conversation).

        Simulates a crashing backend; the master keeps running and new connections get
        a fresh smtpd after ``service_throttle_time`` (1 s here: a killed daemon makes the
        master throttle the service). Returns how many processes were killed.
        """
        victims = [pid for pid in self.pids() if _process_name(pid) == "smtpd"]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(victims)

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what arrived

    def message_files(self) -> list[Path]:
        """Delivered message files (Maildir ``new/`` and ``cur/``), oldest first."""
        files = [
            path
            for sub in ("new", "cur")
            if (self.maildir / sub).is_dir()
            for path in (self.maildir / sub).iterdir()
        ]
        return sorted(files, key=lambda path: (path.stat().st_mtime_ns, path.name))

    def messages(self) -> list[bytes]:
        """Every delivered message as raw bytes (with Postfix's Return-Path, Delivered-To
        and Received headers on top), oldest first. virtual(8) writes Maildir files with
        LF line ends."""
        return [path.read_bytes() for path in self.message_files()]

    def wait_for_messages(self, n: int, timeout: float = 20.0) -> list[bytes]:
        """Wait until at least ``n`` messages were delivered; return all of them."""

        def enough() -> list[bytes] | None:
            found = self.messages()
            return found if len(found) >= n else None

        try:
            return wait_until(enough, timeout, f"{n} message(s) in {self.maildir}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- maillog (tail):\n{_tail(self.log_text())}") from None

    def log_text(self) -> str:
        """The instance's whole log so far (its ``maillog_file``)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, regex: str | re.Pattern[str], timeout: float = 10.0) -> re.Match[str]:
        """Wait until a log line matches ``regex`` (``re.MULTILINE``); return the match."""
        pattern = re.compile(regex, re.MULTILINE) if isinstance(regex, str) else regex

        try:
            return wait_until(
                lambda: pattern.search(self.log_text()),
                timeout,
                f"/{pattern.pattern}/ in {self.maillog}",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- maillog (tail):\n{_tail(self.log_text())}") from None

    def postconf(self, name: str) -> str:
        """The effective value of one parameter (``postconf -c etc -h name``)."""
        return subprocess.run(
            ["postconf", "-c", str(self.config_dir), "-h", name],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.strip()


def postfix_tls_server_params(*chains: CertFiles, level: str = "may") -> dict[str, str]:
    """``extra_main_cf`` that makes a :class:`PostfixInstance` a TLS server (a remote MX
    for outbound tests): STARTTLS at ``level`` (may/encrypt) with ``chains`` side by side
    (e.g. an ECDSA and an RSA :class:`CertFiles`), TLS facts logged (``Anonymous TLS
    connection established from ...``) and put in the Received header.

    For implicit TLS add a wrapper-mode listener through ``extra_master_cf``:
    ``f"127.0.0.1:{port} inet n - n - - smtpd -o smtpd_tls_wrappermode=yes"``.
    """
    return {
        "smtpd_tls_security_level": level,
        "smtpd_tls_chain_files": ", ".join(str(chain.chain_file) for chain in chains),
        "smtpd_tls_loglevel": "1",
        "smtpd_tls_received_header": "yes",
    }


# --------------------------------------------------------------------------- smtp-sink


class SmtpSink:
    """Postfix's ``smtp-sink`` on ``127.0.0.1:port``: a fast SMTP server that stores each
    message in its own file (``-d``) under ``root/dump``.

    Each stored message starts with smtp-sink's own headers (``X-Client-Addr:``,
    ``X-Client-Proto:``, ``X-Helo-Args:``, ``X-Mail-Args:``, ``X-Rcpt-Args:`` and a
    ``Received:`` header), then the message as received, then an empty line; lines end in
    LF. smtp-sink advertises ``XCLIENT NAME HELO`` (unless ``xclient=False``) and answers
    ``250`` to any XCLIENT, but records no claimed address (``X-Client-Addr`` stays the
    TCP peer): test XCLIENT against :class:`PostfixInstance` (``xclient_hosts``).

    Feature switches (smtp-sink flags): ``esmtp=False`` (-e: no EHLO),
    ``pipelining=False`` (-p), ``eightbitmime=False`` (-8), ``enhanced_status_codes=False``
    (-E), ``dsn=False`` (-N), ``auth=False`` (-a), ``xclient=False`` (-C),
    ``xforward=False`` (-F). Failures: ``soft_reject`` / ``hard_reject`` commands get
    ``450 4.3.0`` / ``500 5.3.0`` (texts via ``soft_reply`` / ``hard_reply``),
    ``disconnect_after`` commands drop the connection without reply, ``reply_421_after``
    commands get ``421`` and a close. Command names as in ``man smtp-sink``: CONNECT, HELO,
    EHLO, MAIL, RCPT, DATA, ``.``, RSET, NOOP, QUIT. ``extra_args`` go before the address.
    """

    def __init__(
        self,
        root: Path,
        *,
        hostname: str = "sink.example.test",
        esmtp: bool = True,
        pipelining: bool = True,
        eightbitmime: bool = True,
        enhanced_status_codes: bool = True,
        dsn: bool = True,
        auth: bool = True,
        xclient: bool = True,
        xforward: bool = True,
        soft_reject: Sequence[str] = (),
        hard_reject: Sequence[str] = (),
        disconnect_after: Sequence[str] = (),
        reply_421_after: Sequence[str] = (),
        soft_reply: str | None = None,
        hard_reply: str | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.root = Path(root).resolve()
        self.dump_dir = self.root / "dump"
        self.output_file = self.root / "smtp-sink.out"
        self.port = port or free_port()
        self.start_timeout = start_timeout
        args = ["-u", "postfix", "-4", "-h", hostname]
        switches = {
            "-e": esmtp,
            "-p": pipelining,
            "-8": eightbitmime,
            "-E": enhanced_status_codes,
            "-N": dsn,
            "-a": auth,
            "-C": xclient,
            "-F": xforward,
        }
        args += [flag for flag, enabled in switches.items() if not enabled]
        for flag, commands in (
            ("-r", soft_reject),
            ("-f", hard_reject),
            ("-q", disconnect_after),
            ("-Q", reply_421_after),
        ):
            if commands:
                args += [flag, ",".join(commands)]
        if soft_reply is not None:
            args += ["-b", soft_reply]
        if hard_reply is not None:
            args += ["-B", hard_reply]
        template = str(self.dump_dir).replace("%", "%%") + "/msg."
        self.args = [*args, "-d", template, *extra_args, f"{LOOPBACK}:{self.port}", "128"]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        """Start smtp-sink and wait until it accepts connections (bounded)."""
        uid, gid = _postfix_ids()
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.dump_dir, uid, gid)
        _make_traversable(self.dump_dir)
        with open(self.output_file, "wb") as output:
            self.process = subprocess.Popen(
                ["smtp-sink", *self.args],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def listening() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"smtp-sink exited {self.process.returncode}: {self.output_text()}"
                )
            return is_listening(self.port)

        try:
            wait_until(listening, self.start_timeout, f"smtp-sink on port {self.port}")
        except AssertionError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate smtp-sink (SIGTERM, then SIGKILL after ``timeout``). Idempotent."""
        stop_process(self.process, timeout)

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def output_text(self) -> str:
        """What smtp-sink printed (errors; the conversation too with ``extra_args=["-v"]``)."""
        try:
            return self.output_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _open_files(self) -> set[str]:
        if self.process is None:
            return set()
        names = set()
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{self.process.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    names.add(os.readlink(fd))
        return names

    def message_files(self) -> list[Path]:
        """Files of complete messages, oldest first.

        smtp-sink keeps a dump file open while its transaction is in progress; files it
        still has open (seen in /proc/PID/fd) are left out.
        """
        if not self.dump_dir.is_dir():
            return []
        busy = self._open_files()
        files = [path for path in self.dump_dir.iterdir() if str(path) not in busy]
        return sorted(files, key=lambda path: (path.stat().st_mtime_ns, path.name))

    def messages(self) -> list[bytes]:
        """Every complete stored message as raw bytes (see the class doc for the format)."""
        return [path.read_bytes() for path in self.message_files()]

    def wait_for_messages(self, n: int, timeout: float = 20.0) -> list[bytes]:
        """Wait until at least ``n`` messages were stored; return all of them."""

        def enough() -> list[bytes] | None:
            found = self.messages()
            return found if len(found) >= n else None

        return wait_until(enough, timeout, f"{n} message(s) in smtp-sink's {self.dump_dir}")


# --------------------------------------------------------------------------- CLI clients


def run_swaks(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``swaks`` with ``args``; return the finished process (text; never raises on a
    non-zero exit: swaks exits 2x for failed SMTP steps, e.g. 24 for a rejected RCPT).

    Pass the server explicitly: ``run_swaks("--server", f"127.0.0.1:{port}", "--to",
    "user@example.test", "--body", "hello")``. swaks prints the transcript on stdout
    (``<-`` server, ``->`` client, ``~>`` / ``<~`` inside TLS).
    """
    return subprocess.run(
        ["swaks", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def openssl_s_client(
    port: int,
    *,
    starttls: bool = True,
    args: Sequence[str] = (),
    input: bytes = b"",
    timeout: float = 20.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl s_client`` against ``127.0.0.1:port``; return the finished process.

    With ``starttls`` (default) s_client itself reads the greeting, sends EHLO and
    STARTTLS, then handshakes; without it the handshake starts at once (implicit TLS,
    port 465 style). ``args`` are extra s_client options (``-tls1_2``, ``-groups
    P-256``, ``-sigalgs``, ``-servername``, ``-CAfile``, ``-verify_return_error``,
    ``-cert``/``-key``, ``-sess_out``/``-sess_in`` ...).

    ``input`` is written verbatim (use CRLF) right after the handshake, as one burst: it is
    a pipelined session, so script it as one (``EHLO``, ``MAIL``, ``RCPT``, ``DATA``, the
    message, ``.``, ``QUIT``). End it with ``QUIT\\r\\n``: s_client runs with ``-ign_eof``
    (end of input does not close the connection, so every reply is read) and exits when
    the server closes. ``-nocommands`` keeps lines starting with ``R``/``Q``/``k`` (RCPT,
    QUIT) from being taken as s_client commands. stdout holds the session summary
    (``Protocol``, ``Cipher``, ``Server Temp Key``, ``Peer signature type``, verification)
    and the server's replies; the TLS summary is printed before the replies.
    ``subprocess.TimeoutExpired`` (with the output so far) if the server never closes.
    """
    command = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-ign_eof", "-nocommands"]
    if starttls:
        command += ["-starttls", "smtp"]
    command += list(args)
    return subprocess.run(
        command,
        input=input.decode("latin-1"),
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=timeout,
    )


def s_client_session(port: int, session_file: Path, *, resume: bool, server_name: str) -> str:
    """A STARTTLS session with TLS 1.3 that saves its session to ``session_file`` or, with
    ``resume``, offers it again; s_client's stdout says ``Reused, TLSv1.3`` when it resumed."""
    option = "-sess_in" if resume else "-sess_out"
    return openssl_s_client(port, args=["-tls1_3", option, str(session_file), "-servername", server_name],
                            input=b"QUIT\r\n").stdout


def posttls_finger(
    port: int,
    *args: str,
    host: str = LOOPBACK,
    matches: Sequence[str] = (),
    timeout: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``posttls-finger [args] [host]:port [matches]``; stdout and stderr merged in
    ``.stdout``.

    posttls-finger exits 0 even when the connection or the verification failed: assert
    on its output (``Untrusted TLS connection established``, ``Verified TLS connection
    established``, ``Reusing old session``, ``Matched fingerprint``, ``hostname
    mismatch``). Useful args: ``-c`` (no SMTP chat), ``-l LEVEL`` (may, encrypt,
    fingerprint, verify, secure), ``-F CAfile``, ``-r 1`` (reconnect once: session
    resumption), ``-w`` (implicit TLS), ``-o param=value``.
    """
    return subprocess.run(
        ["posttls-finger", *args, f"[{host}]:{port}", *matches],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


# --------------------------------------------------------------------------- smtproxy


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Path):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(item, Mapping) for item in value)
    )


def _toml_table(table: Mapping[str, Any], prefix: str, out: list[str]) -> None:
    for key, value in table.items():
        if not isinstance(value, Mapping) and not _is_table_array(value):
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in table.items():
        name = f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key)
        if isinstance(value, Mapping):
            out.append(f"\n[{name}]")
            _toml_table(value, name, out)
        elif _is_table_array(value):
            for item in value:
                out.append(f"\n[[{name}]]")
                _toml_table(item, name, out)


def to_toml(config: Mapping[str, Any]) -> str:
    """Serialise a dict of tables (str/int/float/bool/Path/lists, nested dicts as tables,
    lists of dicts as arrays of tables) to TOML text."""
    out: list[str] = []
    _toml_table(config, "", out)
    return "\n".join(out).lstrip("\n") + "\n"


def write_config(
    directory: Path, config: str | Mapping[str, Any], name: str = "smtproxy.toml"
) -> Path:
    """Write an smtproxy config (TOML text, or a dict turned into TOML) to
    ``directory/name`` and return its path. The text must parse as TOML (checked here,
    so a typo in a test fails with tomllib's message rather than smtproxy's)."""
    text = config if isinstance(config, str) else to_toml(config)
    parsed = tomllib.loads(text)
    if not isinstance(config, str):
        expected = json.loads(json.dumps(config, default=str))  # Paths -> str, tuples -> lists
        assert parsed == expected, f"to_toml() lost information: {parsed!r} != {expected!r}"
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


class SmtproxyExited(AssertionError):
    """smtproxy exited while a test was waiting for it; the message holds its output."""


class SmtproxyProcess:
    """``python -m smtproxy run --config PATH`` as a child process, with its log.

    stdout and stderr are read line by line in a background thread. Lines that are JSON
    objects (smtproxy's ``[log] format = "json"``, at least ``event`` and ``level``) are
    parsed and kept in order (:meth:`logs`); every line, JSON or not (tracebacks), is kept
    in :meth:`output_lines`. The process runs in ``cwd`` (default: the config's directory)
    in its own session, with ``PYTHONUNBUFFERED=1``.

    Waiting methods raise :class:`SmtproxyExited` with the whole output as soon as the
    process exits, instead of running into their timeout.
    """

    def __init__(
        self,
        config_path: Path,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        python: str = sys.executable,
    ) -> None:
        self.config_path = Path(config_path)
        self.command = [python, "-m", "smtproxy", "run", "--config", str(self.config_path), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = Path(cwd) if cwd is not None else self.config_path.parent
        self.process: subprocess.Popen[bytes] | None = None
        self._lines: list[str] = []
        self._records: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    def start(self) -> SmtproxyProcess:
        """Start the process (does not wait; see :meth:`wait_ready`)."""
        self.process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,
        )
        self._reader = threading.Thread(
            target=self._read, args=(self.process.stdout,), name="smtproxy-log", daemon=True
        )
        self._reader.start()
        return self

    def _read(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            record = None
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
            with self._changed:
                self._lines.append(line)
                if isinstance(record, dict):
                    self._records.append(record)
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    # -- reading the log

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log record so far, in order."""
        with self._changed:
            return list(self._records)

    def output_lines(self) -> list[str]:
        """Every line printed so far (JSON or not)."""
        with self._changed:
            return list(self._lines)

    def output_text(self) -> str:
        """Everything printed so far, as one text (for failure reports)."""
        return "\n".join(self.output_lines())

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while running."""
        return None if self.process is None else self.process.poll()

    def _finished_reading(self) -> bool:
        return self._reader is None or not self._reader.is_alive()

    def wait_for_log(
        self,
        match: str | Callable[[dict[str, Any]], bool],
        timeout: float = 10.0,
        *,
        after: int = 0,
    ) -> dict[str, Any]:
        """Wait for a JSON log record and return it.

        ``match`` is a substring of the record's ``event`` or a predicate on the record.
        Only records from index ``after`` on are considered (``after=len(p.logs())``
        waits for a *new* record). Raises :class:`SmtproxyExited` if the process exits
        first and ``AssertionError`` on timeout, both with the output.
        """
        if isinstance(match, str):
            needle = match

            def predicate(record: dict[str, Any]) -> bool:
                return needle in str(record.get("event", ""))

            what = f"a log event containing {needle!r}"
        else:
            predicate = match
            what = f"a log record matching {getattr(match, '__name__', match)!r}"
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for record in self._records[after:]:
                    if predicate(record):
                        return record
                if self._finished_reading() and self.returncode is not None:
                    raise SmtproxyExited(
                        f"smtproxy exited {self.returncode} before {what}:\n{self.output_text()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout:g}s waiting for {what}:\n{self.output_text()}"
                    )
                self._changed.wait(min(remaining, 0.2))

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        """Wait for the ``smtproxy ready`` event (every listener bound)."""
        return self.wait_for_log(lambda r: r.get("event") == "smtproxy ready", timeout)

    # -- control

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the process (SIGHUP: reload, SIGTERM: drain and stop)."""
        assert self.process is not None, "smtproxy was not started"
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait until the process exited (and its output was read); return its status."""
        assert self.process is not None, "smtproxy was not started"
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"smtproxy still running after {timeout:g}s:\n{self.output_text()}"
            ) from None
        if self._reader is not None:
            self._reader.join(timeout)
        return code

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; then SIGKILL whatever is left of
        its process group. Returns the exit status (negative: killed by that signal).
        Idempotent."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):  # workers it left behind, if any
            os.killpg(self.process.pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout)
        return self.process.returncode

    def __enter__(self) -> SmtproxyProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class CertFiles:
    """One issued certificate as files.

    ``cert_file``: the leaf followed by its chain (no root); ``key_file``: the private
    key; ``chain_file``: key and certificates in one file (Postfix
    ``smtpd_tls_chain_files`` form); ``fingerprint``: SHA-256 of the leaf certificate,
    ``AB:CD:...``; ``pkey_fingerprint``: SHA-256 of its SubjectPublicKeyInfo, same form.
    """

    cert_file: Path
    key_file: Path
    chain_file: Path
    fingerprint: str
    pkey_fingerprint: str


def _first_pem_der(pem: str) -> bytes:
    match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.S)
    if match is None:
        raise ValueError("no PEM certificate found")
    return ssl.PEM_cert_to_DER_cert(match.group(0))


def _colon_hex(digest: bytes) -> str:
    return ":".join(f"{byte:02X}" for byte in digest)


class Pki:
    """A test PKI (trustme): one CA, and server and client certificates it issues.

    ``ca_file`` is the CA certificate (PEM) to trust. ``server_cert("mx.example.test",
    key_type=trustme.KeyType.RSA)`` and ``client_cert("client.example.test")`` return
    :class:`CertFiles`; every call issues a fresh certificate under ``directory``.
    ``Pki(dir2)`` makes an unrelated CA (for "untrusted" cases); ``server_cert(...,
    not_after=...)`` an expired one; ``self_signed_cert(name)`` one issued by no CA.
    """

    def __init__(self, directory: Path, *, key_type: trustme.KeyType = trustme.KeyType.ECDSA):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(key_type=key_type, organization_name="smtproxy tests")
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._serial = 0

    def _issue(
        self,
        identities: Sequence[str],
        key_type: trustme.KeyType,
        kind: str,
        common_name: str | None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertFiles:
        self._serial += 1
        leaf = self.ca.issue_cert(
            *identities,
            common_name=common_name,
            key_type=key_type,
            not_before=not_before,
            not_after=not_after,
        )
        return self._write(
            f"{kind}{self._serial}-{key_type.name.lower()}-{identities[0]}",
            b"".join(blob.bytes() for blob in leaf.cert_chain_pems),
            leaf.private_key_pem.bytes(),
            leaf.private_key_and_cert_chain_pem.bytes(),
        )

    def _write(self, name: str, cert_pem: bytes, key_pem: bytes, chain_pem: bytes) -> CertFiles:
        """The certificate, key and key+chain files (the key ones 0600) under ``name``."""
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        cert_file = self.directory / f"{stem}.pem"
        key_file = self.directory / f"{stem}.key"
        chain_file = self.directory / f"{stem}.chain.pem"
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        chain_file.write_bytes(chain_pem)
        for path in (key_file, chain_file):
            path.chmod(0o600)
        return CertFiles(
            cert_file=cert_file,
            key_file=key_file,
            chain_file=chain_file,
            fingerprint=self.fingerprint(cert_file),
            pkey_fingerprint=self.public_key_fingerprint(cert_file),
        )

    def server_cert(
        self,
        *hostnames: str,
        key_type: trustme.KeyType = trustme.KeyType.ECDSA,
        common_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertFiles:
        """Issue a server certificate for ``hostnames`` (default ``mx.example.test``).

        ``not_before`` / ``not_after`` (aware datetimes) set the validity period, e.g. one
        that ended yesterday for an expired certificate (trustme's default: valid now)."""
        names = hostnames or ("mx.example.test",)
        return self._issue(
            names, key_type, "server", common_name or names[0], not_before, not_after
        )

    def self_signed_cert(self, *hostnames: str) -> CertFiles:
        """A self-signed ECDSA (P-256) end-entity certificate for ``hostnames`` (DNS
        subjectAltNames, CN the first), issued by no CA (not this one either): the
        "self-signed certificate" case of certificate verification."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        names = hostnames or ("mx.example.test",)
        self._serial += 1
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return self._write(f"selfsigned{self._serial}-{names[0]}", cert_pem, key_pem, key_pem + cert_pem)

    def client_cert(
        self,
        identity: str = "client.example.test",
        *,
        key_type: trustme.KeyType = trustme.KeyType.ECDSA,
        common_name: str | None = None,
    ) -> CertFiles:
        """Issue a client certificate (trustme's leaves allow clientAuth)."""
        return self._issue((identity,), key_type, "client", common_name or identity)

    def client_context(self, *, check_hostname: bool = True) -> ssl.SSLContext:
        """A client ``SSLContext`` trusting this CA (verification on)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.check_hostname = check_hostname
        return context

    @staticmethod
    def fingerprint(cert_file: Path) -> str:
        """SHA-256 of the first certificate in a PEM file, colon-separated upper hex."""
        return Pki.fingerprint_of_pem(Path(cert_file).read_text())

    @staticmethod
    def fingerprint_of_pem(pem: str) -> str:
        """SHA-256 of the first certificate in PEM text (e.g. s_client's output)."""
        return _colon_hex(hashlib.sha256(_first_pem_der(pem)).digest())

    @staticmethod
    def public_key_fingerprint(cert_file: Path) -> str:
        """SHA-256 of the first certificate's SubjectPublicKeyInfo (Postfix's pkey digest)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        cert = x509.load_der_x509_certificate(_first_pem_der(Path(cert_file).read_text()))
        spki = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _colon_hex(hashlib.sha256(spki).digest())


# --------------------------------------------------------------------------- raw SMTP


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply: ``code``, the text ``lines`` (without the
    code and separator), and the ``raw`` bytes as received."""

    code: int
    lines: list[str]
    raw: bytes

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return self.raw.decode("utf-8", errors="replace").rstrip()


class RawSmtpClient:
    """A scripted SMTP client on a plain socket: exact bytes out, whole replies in.

    For byte-level tests (STARTTLS injection, smuggling, pipelining, abrupt closes). Every
    read is bounded by ``timeout``; a timeout raises ``AssertionError`` showing what had
    arrived. Bytes the server sent beyond the reply being read stay buffered for the next
    read -- except at :meth:`starttls`, where they are recorded in
    ``plaintext_after_starttls`` and dropped (never fed into TLS).
    """

    def __init__(
        self, port: int, host: str = LOOPBACK, *, timeout: float = 10.0, source: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.buffer = b""
        self.plaintext_after_starttls = b""

    # -- bytes

    def send(self, data: bytes) -> None:
        """Send ``data`` exactly as given."""
        self.sock.sendall(data)

    def send_line(self, line: str | bytes) -> None:
        """Send one line with CRLF appended."""
        self.send((line.encode() if isinstance(line, str) else line) + CRLF)

    def _receive(self, timeout: float | None, what: str) -> bytes:
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(
                f"timed out waiting for {what} from {self.host}:{self.port}; "
                f"received so far: {self.buffer!r}"
            ) from None

    def read_reply(self, timeout: float | None = None) -> Reply:
        """Read one complete reply (``NNN-`` lines up to the ``NNN `` line)."""
        while True:
            reply = self._parse_reply()
            if reply is not None:
                return reply
            chunk = self._receive(timeout, "a reply")
            if not chunk:
                raise AssertionError(
                    f"connection closed while waiting for a reply; received {self.buffer!r}"
                )
            self.buffer += chunk

    def _parse_reply(self) -> Reply | None:
        lines = []
        start = 0
        while True:
            end = self.buffer.find(b"\n", start)
            if end < 0:
                return None
            line = self.buffer[start : end + 1]
            start = end + 1
            text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
            if not re.match(r"\d{3}([ -]|$)", text):
                raise AssertionError(f"not an SMTP reply line: {line!r} (buffer {self.buffer!r})")
            lines.append(text)
            if len(text) == 3 or text[3] == " ":
                raw, self.buffer = self.buffer[:start], self.buffer[start:]
                return Reply(int(text[:3]), [item[4:] for item in lines], raw)

    def command(self, line: str | bytes, timeout: float | None = None) -> Reply:
        """Send one command line and read its reply."""
        self.send_line(line)
        return self.read_reply(timeout)

    def ehlo(self, name: str = "client.example.test") -> Reply:
        """``EHLO name``; returns the reply (extensions are ``reply.lines[1:]``)."""
        return self.command(f"EHLO {name}")

    # -- TLS

    def starttls(
        self,
        context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        command: bytes = b"STARTTLS\r\n",
        expect: int = 220,
    ) -> Reply:
        """Send ``command`` (verbatim: append pipelined bytes to test injection), read
        the reply, which must have code ``expect``; if that is 220, do the TLS handshake
        (bounded by the client's timeout). Returns the reply.

        Bytes that arrived in plaintext after the STARTTLS reply go to
        ``plaintext_after_starttls`` and are not interpreted."""
        self.send(command)
        reply = self.read_reply()
        if reply.code != expect:
            raise AssertionError(f"STARTTLS answered {reply} (expected {expect})")
        if reply.code == 220:
            self.plaintext_after_starttls, self.buffer = self.buffer, b""
            self.start_implicit_tls(context, server_hostname=server_hostname)
        return reply

    def start_implicit_tls(
        self, context: ssl.SSLContext, *, server_hostname: str | None = None
    ) -> None:
        """Do the TLS handshake now (on an implicit-TLS port: before the greeting)."""
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    @property
    def tls(self) -> ssl.SSLSocket | None:
        """The TLS socket after :meth:`starttls` (``.version()``, ``.cipher()``,
        ``.getpeercert()``), else None."""
        return self.sock if isinstance(self.sock, ssl.SSLSocket) else None

    # -- closing

    def expect_close(self, timeout: float | None = None) -> bytes:
        """Wait until the server closes the connection; return what it sent before
        (including anything still buffered). ``AssertionError`` if it stays open."""
        received = self.buffer
        self.buffer = b""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"server did not close the connection; got {received!r}")
            try:
                self.sock.settimeout(remaining)
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                return received
            if not chunk:
                return received
            received += chunk

    def close(self) -> None:
        """Close the socket (no QUIT). Idempotent."""
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawSmtpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@contextlib.contextmanager
def flood_without_reading(port: int, *, then: bytes = b"") -> Iterator[socket.socket]:
    """A client with a small receive buffer that pipelines EHLOs and reads nothing, until
    the server's kernel send queue stops growing (`ss`), so every buffer on the way is full;
    then a few more (their replies wait in the server process itself) and `then`. Bounded in count
    and time."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", port))
    client_port = sock.getsockname()[1]

    def server_send_queue() -> int:
        out = subprocess.run(["ss", "-tnH", "state", "all", f"( sport = :{port} and dport = :{client_port} )"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[2]) if len(out) > 2 else -1

    try:
        sock.settimeout(10)
        last, stable, deadline = -1, 0, time.monotonic() + 30
        while stable < 5 and time.monotonic() < deadline:
            sock.sendall(b"EHLO stuck.example.test\r\n" * 50)
            # the batch is taken in when the queue moves; a queue that does not move over a
            # few polls of ss is full
            queue = next((q for q in (server_send_queue() for _ in range(5)) if q != last), last)
            stable, last = (stable + 1 if queue == last else 0), queue
        sock.sendall(b"EHLO stuck.example.test\r\n" * 20 + then)
        yield sock
    finally:
        sock.close()


def postfix_version() -> str:
    """The installed Postfix's version (``postconf -d -h mail_version``)."""
    if shutil.which("postconf") is None:
        return "not installed"
    result = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, timeout=30
    )
    return result.stdout.strip() or "unknown"


# --------------------------------------------------------------------------- scripted peers


class Conversation:
    """One accepted connection of a :class:`ScriptedRemote`: lines and data in, bytes out.
    Every read is bounded by the socket timeout."""

    def __init__(self, sock: socket.socket, notes: dict[str, object]) -> None:
        self.sock = sock
        self.buffer = b""
        self.notes = notes  # what the script records, for the test to assert on

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"the client closed the connection; unread: {self.buffer!r}")
        self.buffer += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self.fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def expect(self, prefix: bytes) -> bytes:
        line = self.line()
        assert line.upper().startswith(prefix), f"expected {prefix!r}, got {line!r}"
        return line

    def data(self) -> bytes:
        """The message up to CRLF.CRLF (its last CRLF included, the dot not)."""
        while b"\r\n.\r\n" not in self.buffer:
            self.fill()
        body, self.buffer = self.buffer.split(b"\r\n.\r\n", 1)
        return body + b"\r\n"

    def accept_envelope(self, host: bytes, *, pipelining: bool = False) -> None:
        """Greet as `host`, answer EHLO (PIPELINING offered or not), accept MAIL and one RCPT."""
        self.send(b"220 " + host + b" ESMTP\r\n")
        self.expect(b"EHLO ")
        self.send(b"250-" + host + b"\r\n250 PIPELINING\r\n" if pipelining else b"250 " + host + b"\r\n")
        self.expect(b"MAIL FROM:")
        self.send(b"250 2.1.0 Ok\r\n")
        self.expect(b"RCPT TO:")
        self.send(b"250 2.1.5 Ok\r\n")

    def receive_message(self, host: bytes) -> bytes:
        """A whole transaction up to the final dot (PIPELINING offered): its message; the
        caller gives the final reply."""
        self.accept_envelope(host, pipelining=True)
        self.expect(b"DATA")
        self.send(b"354 go ahead\r\n")
        return self.data()

    def goodbye(self) -> None:
        """After a transaction: answer the proxy's RSET (it parks the connection for reuse)
        or QUIT, then end the script (the proxy finds the cached connection closed)."""
        line = self.line().upper()
        assert line in (b"RSET", b"QUIT"), line
        self.send(b"250 2.0.0 Ok\r\n" if line == b"RSET" else b"221 2.0.0 Bye\r\n")

    def starttls(self, context: ssl.SSLContext) -> None:
        assert not self.buffer, f"client sent plaintext after STARTTLS: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_side=True)

    def close(self) -> None:
        self.sock.close()


class ScriptedRemote:
    """An SMTP server (a remote MX, or the legacy MTA behind the inbound side) that
    behaves as a test needs it to: misbehaves on purpose, or holds its replies as a real
    one may but none does on demand.

    Listens on 127.0.0.1 and, in a thread, accepts one connection per script, one after
    the other, running ``script(conversation)`` on each. It stops itself: the accept and
    every read time out after ``timeout``, and the listener closes when the last script
    ends. ``error`` holds what went wrong in a script (an unexpected command, a timeout);
    ``notes`` what the scripts chose to record."""

    def __init__(self, *scripts: Callable[[Conversation], None], timeout: float = 20.0) -> None:
        self.scripts = scripts
        self.timeout = timeout
        self.listener = socket.create_server((LOOPBACK, 0))
        self.listener.settimeout(timeout)
        self.port = self.listener.getsockname()[1]
        self.error: BaseException | None = None
        self.notes: dict[str, object] = {}
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"scripted-remote-{self.port}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for script in self.scripts:
                sock, _ = self.listener.accept()
                sock.settimeout(self.timeout)
                conversation = Conversation(sock, self.notes)
                try:
                    script(conversation)
                finally:
                    conversation.close()
        except BaseException as exc:  # reported by join()
            self.error = exc
        finally:
            self.listener.close()
            self.finished.set()

    def join(self) -> None:
        """Wait for the script to end; re-raise what went wrong in it."""
        assert self.finished.wait(self.timeout * 2 + 5), "the scripted remote did not stop"
        if self.error is not None:
            raise AssertionError(f"scripted remote failed: {self.error!r}") from self.error
