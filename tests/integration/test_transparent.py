"""Transparent outbound mode: the legacy MTA connects to the remote MX's own address on
port 25, iptables REDIRECT hands the connection to smtproxy, and smtproxy reads the
original destination with SO_ORIGINAL_DST (IPv4 and IPv6) and delivers there.

The test builds a network namespace of its own (loopback only, no address outside it),
with smtproxy, the "remote MX" (smtp-sink on 127.0.0.5:25 and [::1]:25) and the "legacy
MTA" (smtp-source, running as the user ``nobody``) inside it, and a REDIRECT rule for
that user's port-25 connections. It needs root (CAP_NET_ADMIN) and the nat tables; when
the machine does not allow them, the tests are skipped with the command's own error.

Manual recipe for operators
===========================

1. smtproxy, in the same network namespace as the MTA (same host, or a sidecar in the
   same pod)::

       [outbound]
       mode = "transparent"
       listen = ["127.0.0.1:10025", "[::1]:10025"]

2. Redirect the MTA's outgoing port-25 connections, and only the MTA's: smtproxy's own
   connections to the remote MX go to port 25 too and must not be redirected back to it.
   Match the user the MTA's SMTP client runs as (qmail-remote: ``qmailr``; Postfix's
   smtp(8): ``postfix``), or exclude smtproxy's user with ``! --uid-owner``::

       iptables  -t nat -A OUTPUT -p tcp --dport 25 -m owner --uid-owner qmailr -j REDIRECT --to-ports 10025
       ip6tables -t nat -A OUTPUT -p tcp --dport 25 -m owner --uid-owner qmailr -j REDIRECT --to-ports 10025

   In Kubernetes an init container with the NET_ADMIN capability adds these rules to the
   pod's network namespace (as service meshes do); the rules never leave the pod.

3. Check: send one message. smtproxy logs ``connect from unknown[127.0.0.1]`` with
   ``original_destination`` = the remote MX's address and port, then ``message relayed``
   with ``relay=ADDRESS[ADDRESS]:25`` (the MX host name instead when DNS names it). The
   warning ``connection was not redirected`` means a client reached the listener directly:
   its RCPTs get ``451 4.3.5`` and the MTA keeps the mail.

The same, tried on a scratch namespace (as root; nothing outside it is touched)::

    ip netns add smtproxy-demo
    ip netns exec smtproxy-demo ip link set lo up
    ip netns exec smtproxy-demo iptables -t nat -A OUTPUT -p tcp -d 127.0.0.5 --dport 25 \\
        -m owner --uid-owner nobody -j REDIRECT --to-ports 10025
    ip netns exec smtproxy-demo smtp-sink -u postfix -d /tmp/demo/msg. 127.0.0.5:25 10 &
    ip netns exec smtproxy-demo smtproxy run --config transparent.toml &
    ip netns exec smtproxy-demo setpriv --reuid=nobody --regid=nogroup --clear-groups \\
        smtp-source -f a@example.test -t b@remote.test -S demo 127.0.0.5:25
    ls /tmp/demo            # one message, sent by smtproxy to 127.0.0.5:25
    ip netns del smtproxy-demo
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.dns_server import Unbound
from tests.integration.peers import SmtpSink, SmtproxyProcess, listening_in, wait_until, write_config

pytestmark = pytest.mark.integration

PROXY_PORT = 10025  # inside the namespace: nothing else listens there
MTA_UID = 65534  # nobody: the "legacy MTA" user whose port-25 connections are redirected
REMOTE_V4 = "127.0.0.5"  # a loopback address of the namespace (127.0.0.0/8 is on its lo)
REMOTE_V6 = "::1"
DEAD_V4 = "127.0.0.7"  # the first MX of fallback.test: nothing listens there
DNS_RECORDS = [  # served by an Unbound inside the namespace, on 127.0.0.1:53
    "fallback.test. MX 10 mx1.fallback.test.",
    f"mx1.fallback.test. A {DEAD_V4}",
    "fallback.test. MX 10 mx2.fallback.test.",  # equal preference: smtproxy's lookup may list it first
    f"mx2.fallback.test. A {REMOTE_V4}",
]
TOOLS = ("ip", "iptables", "ip6tables", "setpriv", "smtp-sink", "smtp-source")


def token() -> str:
    return uuid.uuid4().hex


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name

    def command(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return _run(*self.command(*command))

    def run_as_mta(self, *command: str) -> subprocess.CompletedProcess[str]:
        return self.run("setpriv", f"--reuid={MTA_UID}", f"--regid={MTA_UID}", "--clear-groups", *command)


class NetnsSink(SmtpSink):
    """smtp-sink started inside the namespace on one address (IPv4 or IPv6)."""

    def __init__(self, root: Path, namespace: Namespace, host: str, port: int) -> None:
        super().__init__(root, port=port)
        self.namespace = namespace
        self.host = host
        if ":" in host:
            self.args[self.args.index("-4")] = "-6"
            self.args[-2] = f"[{host}]:{port}"
        else:
            self.args[-2] = f"{host}:{port}"

    def start(self) -> NetnsSink:
        import pwd

        entry = pwd.getpwnam("postfix")
        self.dump_dir.mkdir(parents=True, exist_ok=True)
        os.chown(self.dump_dir, entry.pw_uid, entry.pw_gid)
        for directory in [self.dump_dir, *self.dump_dir.parents]:
            directory.chmod(directory.stat().st_mode | 0o011)
        with open(self.output_file, "wb") as output:
            self.process = subprocess.Popen(
                self.namespace.command("smtp-sink", *self.args), stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

        def bound() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"smtp-sink exited {self.process.returncode}: {self.output_text()}")
            return listening_in(self.process.pid, self.host, self.port)

        wait_until(bound, self.start_timeout, f"smtp-sink on {self.host}:{self.port} in {self.namespace.name}")
        return self


@dataclass
class Setup:
    namespace: Namespace
    proxy: SmtproxyProcess
    sink_v4: NetnsSink
    sink_v6: NetnsSink


def _skip_unless_possible() -> None:
    if os.geteuid() != 0:
        pytest.skip("transparent mode test needs root (CAP_NET_ADMIN) to create a network namespace "
                    "and iptables rules in it")
    missing = [tool for tool in TOOLS if shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
               is None]
    if missing:
        pytest.skip(f"transparent mode test needs {', '.join(missing)} (Debian: iproute2, iptables, util-linux, "
                    "postfix)")


@pytest.fixture(scope="module")
def namespace() -> Iterator[Namespace]:
    _skip_unless_possible()
    name = f"smtproxy-t{os.getpid()}-{token()[:6]}"
    created = _run("ip", "netns", "add", name)
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace (`ip netns add`): {created.stderr.strip()}")
    ns = Namespace(name)
    try:
        steps = [
            ("ip", "link", "set", "lo", "up"),
            *((tables, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", address, "--dport", "25",
               "-m", "owner", "--uid-owner", str(MTA_UID), "-j", "REDIRECT", "--to-ports", str(PROXY_PORT))
              for tables, address in (("iptables", REMOTE_V4), ("iptables", DEAD_V4), ("ip6tables", REMOTE_V6))),
        ]
        for step in steps:
            result = ns.run(*step)
            if result.returncode != 0:
                pytest.skip(f"`{' '.join(step)}` failed in a network namespace: "
                            f"{(result.stderr or result.stdout).strip()}")
        yield ns
    finally:
        _run("ip", "netns", "del", name)


@pytest.fixture(scope="module")
def setup(namespace: Namespace, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("transparent")
    (root / "policy").write_text("")
    # Routes are not the nexthop in transparent mode: if smtproxy used this one, the mail
    # would go to 127.0.0.9, where nothing listens, instead of the original destination.
    (root / "routes").write_text("* [127.0.0.9]:25\n")
    config = {
        "inbound": {"listen": [], "implicit_tls_listen": []},
        "outbound": {
            "listen": [f"127.0.0.1:{PROXY_PORT}", f"[::1]:{PROXY_PORT}"],
            "mode": "transparent",
            "hostname": "out.example.test",
            "default_level": "may",
            "routes_file": str(root / "routes"),
            "policy_file": str(root / "policy"),
            "connect_timeout": 5,
            "reply_timeout": 10,
        },
        "dns": {"nameservers": ["127.0.0.1:53"], "timeout": 2},
        "metrics": {"listen": ""},
        "tlsrpt": {"socket": ""},
        "log": {"format": "json", "level": "info"},
    }
    proxy = SmtproxyProcess(write_config(root / "proxy", config))
    proxy.command = namespace.command(*proxy.command)
    sinks: list[NetnsSink] = []
    dns = Unbound(root / "unbound", DNS_RECORDS, port=53, command_prefix=namespace.command())
    try:
        dns.start()
        sinks.append(NetnsSink(root / "sink4", namespace, REMOTE_V4, 25).start())
        sinks.append(NetnsSink(root / "sink6", namespace, REMOTE_V6, 25).start())
        proxy.start()
        proxy.wait_ready()
        yield Setup(namespace, proxy, *sinks)
    finally:
        proxy.stop()
        dns.stop()
        for sink in sinks:
            sink.stop()
        print(f"--- smtproxy output ---\n{proxy.output_text()}")


def _connects(setup: Setup, after: int) -> list[dict]:
    return [r for r in setup.proxy.logs()[after:] if r["event"].startswith("connect from")]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_redirected_connection_is_delivered_to_its_original_destination(setup: Setup, family: str):
    remote, sink = (REMOTE_V4, setup.sink_v4) if family == "ipv4" else (REMOTE_V6, setup.sink_v6)
    other = setup.sink_v6 if sink is setup.sink_v4 else setup.sink_v4
    marker = token()
    after = len(setup.proxy.logs())
    target = f"[{remote}]:25" if ":" in remote else f"{remote}:25"
    sent = setup.namespace.run_as_mta("smtp-source", "-6" if ":" in remote else "-4", "-M", "legacy.example.test",
                                      "-f", "sender@example.test", "-t", "user@remote.test", "-S", marker, target)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    [stored] = [m for m in sink.wait_for_messages(1) if marker.encode() in m] or [None]
    assert stored is not None, sink.messages()
    assert not [m for m in other.messages() if marker.encode() in m]
    # smtproxy received it (the MTA was redirected) and read the original destination
    [connect] = _connects(setup, after)
    assert connect["original_destination"] == [remote, 25], connect
    # (the log line may be read a moment after smtp-source has its reply)
    setup.proxy.wait_for_log(lambda r: r["event"] == "message relayed", after=after)
    relayed = [r for r in setup.proxy.logs()[after:] if r["event"] == "message relayed"]
    assert [(r["result"], r["relay"]) for r in relayed] == [("accepted", f"{remote}[{remote}]:25")], relayed
    # the sink's client was smtproxy (its EHLO name), not smtp-source: had the REDIRECT not
    # applied, smtp-source would have talked to the sink directly; had it applied to
    # smtproxy's own connection too, nothing would have arrived
    assert b"X-Helo-Args: out.example.test\n" in stored, stored


def test_a_connection_that_was_not_redirected_gets_4xx(setup: Setup):
    """A client (root: the rule does not match it) that reaches the listener directly:
    there is no original destination, so smtproxy defers rather than guessing one."""
    after = len(setup.proxy.logs())
    sent = setup.namespace.run("smtp-source", "-4", "-M", "legacy.example.test", "-f", "sender@example.test",
                               "-t", "user@remote.test", "-S", token(), f"127.0.0.1:{PROXY_PORT}")
    assert sent.returncode != 0
    assert "451 4.3.5" in sent.stdout + sent.stderr, sent.stdout + sent.stderr
    setup.proxy.wait_for_log("connection was not redirected", after=after)
    [connect] = _connects(setup, after)
    assert connect["original_destination"] is None, connect


def test_mail_for_one_domain_goes_to_whichever_address_the_mta_chose(setup: Setup):
    """The MTA sends mail for one domain to two different addresses, one after the other:
    each message lands where the MTA sent it. (A connection cached for the first original
    destination must not carry the second message: reuse is keyed by nexthop, which in
    transparent mode is the domain.)"""
    sent_to: list[tuple[str, NetnsSink, str]] = []
    for remote, sink in ((REMOTE_V4, setup.sink_v4), (REMOTE_V6, setup.sink_v6), (REMOTE_V4, setup.sink_v4)):
        marker = token()
        target = f"[{remote}]:25" if ":" in remote else f"{remote}:25"
        sent = setup.namespace.run_as_mta("smtp-source", "-6" if ":" in remote else "-4", "-M", "legacy.example.test",
                                          "-f", "sender@example.test", "-t", "user@same.test", "-S", marker, target)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        sent_to.append((remote, sink, marker))
    for remote, sink, marker in sent_to:
        other = setup.sink_v6 if sink is setup.sink_v4 else setup.sink_v4
        wait_until(lambda: [m for m in sink.messages() if marker.encode() in m], 20, f"{marker} at {remote}")
        assert not [m for m in other.messages() if marker.encode() in m], f"{marker} (sent to {remote}) went elsewhere"


def test_a_dead_mx_is_passed_over_for_the_next_one_as_the_mta_would(setup: Setup):
    """The MTA connects to the first MX of fallback.test, where nothing listens. Redirected,
    its connection succeeds all the same, so it cannot move on to the next MX itself (it
    would get 451 at RCPT and keep the mail until the first MX returns): smtproxy does,
    to the domain's other MX hosts of the same or a higher preference (its own lookup may
    list them in another order), whatever the routes table says."""
    marker, after = token(), len(setup.proxy.logs())
    sent = setup.namespace.run_as_mta("smtp-source", "-4", "-M", "legacy.example.test", "-f", "sender@example.test",
                                      "-t", "user@fallback.test", "-S", marker, f"{DEAD_V4}:25")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    relayed = setup.proxy.wait_for_log(lambda r: r["event"] == "message relayed", after=after)
    assert (relayed["result"], relayed["relay"]) == ("accepted", f"mx2.fallback.test[{REMOTE_V4}]:25"), relayed
    wait_until(lambda: [m for m in setup.sink_v4.messages() if marker.encode() in m], 20, f"{marker} at mx2")
    failed = [r for r in setup.proxy.logs()[after:] if r["event"] == "delivery attempt failed"]
    assert [r["peer"] for r in failed] == [f"mx1.fallback.test[{DEAD_V4}]"], failed

