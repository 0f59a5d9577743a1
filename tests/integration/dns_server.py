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

DNSSEC (for DANE, RFC 7672): ``signed_zones`` maps a zone origin to its record lines; the
fixture adds SOA and NS, signs the zone (ECDSAP256SHA256, one generated key, NSEC) and
Unbound serves it as an ``auth-zone`` behind its validator, with a trust anchor for that
zone alone, so its answers (NXDOMAIN and NODATA included) carry AD. ``unsigned_zones``
are served the same way, unsigned and outside every trust anchor: answers without AD.
``bogus`` lines join the signed zone that holds their name with a broken RRSIG, so that
name and type (the whole RRset) is SERVFAIL::

    dns = unbound_factory(
        ["plain.test. A 127.0.0.3"],              # local-data, as above
        signed_zones={"dane.test.": [
            "dane.test. MX 10 mx.dane.test.",
            "mx.dane.test. A 127.0.0.2",
            "_25._tcp.mx.dane.test. TLSA 3 1 1 " + "ab" * 32,
        ]},
        unsigned_zones={"insecure.test.": ["mx.insecure.test. A 127.0.0.4"]},
        bogus=["bad.dane.test. A 127.0.0.5"],
    )

Each signed or unsigned zone also gets ``local-zone: "<zone>" transparent``, so it is not
shadowed by an enclosing ``zones`` entry (``test.`` by default) nor by Unbound's built-in
RFC 6761 ``test.`` zone; they combine freely with ``records``, as long as no ``records``
line falls inside a signed or unsigned zone (it would be answered as unvalidated
local-data) and no zone is named both in ``zones`` and as a signed or unsigned zone.
Record lines use absolute names; a line whose name is outside its zone is a ValueError.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.transaction
import dns.zone
import pytest
from dns.dnssecalgs.ecdsa import PrivateECDSAP256SHA256
from dns.rdtypes.ANY.RRSIG import RRSIG

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


ZONE_TTL = 300


def _absolute(origin: str) -> str:
    return dns.name.from_text(origin).to_text()


def _records(lines: Iterable[str]) -> list[tuple[dns.name.Name, dns.rdataset.Rdataset]]:
    """Record lines as RRsets. Parsed under the root, since dnspython silently drops a
    line outside the origin it is given; the callers check the names themselves."""
    text = "\n".join([f"$TTL {ZONE_TTL}", *lines]) + "\n"
    parsed = dns.zone.from_text(text, origin=dns.name.root, relativize=False, check_origin=False)
    return list(parsed.iterate_rdatasets())


def _inside(origin: dns.name.Name, lines: Iterable[str]) -> list[tuple[dns.name.Name, dns.rdataset.Rdataset]]:
    records = _records(lines)
    for name, _ in records:
        if not name.is_subdomain(origin):
            raise ValueError(f"{name} is outside the zone {origin}")
    return records


def _build_zone(origin: str, lines: Iterable[str]) -> dns.zone.Zone:
    """The zone with its SOA and NS (the NS target needs no address: nothing queries it)."""
    apex = f"""$TTL {ZONE_TTL}
{origin} SOA ns.{origin} hostmaster.{origin} 1 3600 600 86400 {ZONE_TTL}
{origin} NS ns.{origin}
"""
    zone = dns.zone.from_text(apex, origin=origin, relativize=False)
    with zone.writer() as txn:
        for owner, rdataset in _inside(zone.origin, lines):
            txn.add(owner, rdataset)
    return zone


def _zone_text(zone: dns.zone.Zone) -> str:
    return zone.to_text(relativize=False, want_origin=True)


def _bogus_by_zone(lines: Sequence[str], signed: Sequence[str], unsigned: Sequence[str]) -> dict[str, list[str]]:
    """Each bogus line under the closest zone that holds its name, which must be signed."""
    by_zone: dict[str, list[str]] = {}
    names = [dns.name.from_text(origin) for origin in [*signed, *unsigned]]
    for line in lines:
        for owner, _ in _records([line]):
            holders = [origin for origin in names if owner.is_subdomain(origin)]
            closest = max(holders, key=len).to_text() if holders else None
            if closest not in signed:
                raise ValueError(f"bogus record {line!r} is outside every signed zone")
            by_zone.setdefault(closest, []).append(line)
    return by_zone


class SignedZone:
    """A zone signed with one ECDSAP256SHA256 key (KSK and ZSK at once) and NSEC, valid
    from a day ago for 30 days; the RRSIGs of the `bogus` lines' RRsets are corrupted.

    ``dns.dnssec.sign_zone`` adds the DNSKEY and the NSEC chain, but each RRSIG is made
    here: dnspython gates ``dns.dnssec.sign``/``make_dnskey`` on cryptography>=50, which
    the project's pin (<50) excludes, while its key classes work with any version."""

    def __init__(self, origin: str, lines: Sequence[str], bogus: Sequence[str] = ()) -> None:
        self.origin = origin
        self.signer = dns.name.from_text(origin)
        self.key = PrivateECDSAP256SHA256.generate()
        self.dnskey = self.key.public_key().to_dnskey(flags=dns.dnssec.Flag.ZONE | dns.dnssec.Flag.SEP)
        now = datetime.now(timezone.utc)
        self.inception = int((now - timedelta(days=1)).timestamp())
        self.expiration = int((now + timedelta(days=30)).timestamp())
        self.bogus = {(owner, rdataset.rdtype) for owner, rdataset in _records(bogus)}
        zone = _build_zone(origin, [*lines, *bogus])
        dns.dnssec.sign_zone(zone, keys=[(self.key, self.dnskey)], rrset_signer=self._sign)
        self.text = _zone_text(zone)

    @property
    def trust_anchor(self) -> str:
        """The DS of the key, as unbound.conf's ``trust-anchor:`` takes it."""
        ds = dns.dnssec.make_ds(self.origin, self.dnskey, "SHA256")
        return f"{self.origin} DS {ds.to_text()}"

    def _sign(self, txn: dns.transaction.Transaction, rrset: dns.rrset.RRset) -> None:
        labels = len(rrset.name) - (2 if rrset.name.is_wild() else 1)
        template = RRSIG(
            rrset.rdclass,
            dns.rdatatype.RRSIG,
            type_covered=rrset.rdtype,
            algorithm=self.dnskey.algorithm,
            labels=labels,
            original_ttl=rrset.ttl,
            expiration=self.expiration,
            inception=self.inception,
            key_tag=dns.dnssec.key_id(self.dnskey),
            signer=self.signer,
            signature=b"",
        )
        signature = self.key.sign(_signed_data(template, rrset))
        if (rrset.name, rrset.rdtype) in self.bogus:
            signature = bytes([signature[0] ^ 0xFF]) + signature[1:]
        txn.add(rrset.name, rrset.ttl, template.replace(signature=signature))


def _signed_data(template: RRSIG, rrset: dns.rrset.RRset) -> bytes:
    """RFC 4034 section 3.1.8.1: the RRSIG RDATA without its signature, then the RRset in
    canonical form and order (names are absolute, and a wildcard is signed as itself)."""
    owner = rrset.name.to_digestable()
    fixed = struct.pack("!HHI", rrset.rdtype, rrset.rdclass, template.original_ttl)
    rdatas = sorted(rdata.to_digestable() for rdata in rrset)
    records = b"".join(owner + fixed + struct.pack("!H", len(rdata)) + rdata for rdata in rdatas)
    return template.to_digestable() + records


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
        signed_zones: Mapping[str, Sequence[str]] = {},
        unsigned_zones: Mapping[str, Sequence[str]] = {},
        bogus: Sequence[str] = (),
    ) -> None:
        """`command_prefix`: run it elsewhere, e.g. ``ip netns exec NAME`` (then the readiness
        check looks for its listening TCP socket, since a query from here cannot reach it).
        `signed_zones`, `unsigned_zones`, `bogus`: see the module docstring; the zones are
        built (and signed) here, so a bad record line raises at once."""
        self.root = Path(root).resolve()
        self.command_prefix = list(command_prefix)
        self.records = list(records)
        self.zones = list(zones)
        clash = {_absolute(zone) for zone in self.zones} & {
            _absolute(zone) for zone in [*signed_zones, *unsigned_zones]
        }
        if clash:
            raise ValueError(f"zones served both as local-data and as auth-zone: {sorted(clash)}")
        signed = {_absolute(origin): list(lines) for origin, lines in signed_zones.items()}
        broken = _bogus_by_zone(bogus, list(signed), [_absolute(origin) for origin in unsigned_zones])
        self.signed_zones = {
            origin: SignedZone(origin, lines, broken.get(origin, [])) for origin, lines in signed.items()
        }
        self.unsigned_zones = {
            _absolute(origin): _zone_text(_build_zone(_absolute(origin), lines))
            for origin, lines in unsigned_zones.items()
        }
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
            *self._validator_config(),
            "    do-not-query-address: 0.0.0.0/0",
            "    do-not-query-address: ::/0",
            "    rrset-roundrobin: no",
            *(f"    local-zone: {_quoted(zone)} static" for zone in self.zones),
            *(f"    local-data: {_quoted(record)}" for record in self.records),
            *(f"    local-zone: {_quoted(zone)} transparent" for zone in self._auth_zones()),
            *(f"    domain-insecure: {_quoted(zone)}" for zone in self.unsigned_zones),
            *(f"    trust-anchor: {_quoted(zone.trust_anchor)}" for zone in self.signed_zones.values()),
            *(line for zone in self._auth_zones() for line in self._auth_zone_config(zone)),
            "remote-control:",
            "    control-enable: no",
        ]
        return "\n".join(lines) + "\n"

    def _validator_config(self) -> list[str]:
        if not self.signed_zones:
            return ['    module-config: "iterator"']
        return ['    module-config: "validator iterator"', "    val-log-level: 2"]

    def _auth_zones(self) -> list[str]:
        return [*self.signed_zones, *self.unsigned_zones]

    def _zone_file(self, origin: str) -> Path:
        return self.root / f"{origin.rstrip('.') or 'root'}.zone"

    def _auth_zone_config(self, origin: str) -> list[str]:
        """Served to the iterator only (`for-upstream`), as if from an authoritative server,
        so the validator checks its answers; no fallback to the (unreachable) network."""
        return [
            "auth-zone:",
            f"    name: {_quoted(origin)}",
            f"    zonefile: {_quoted(str(self._zone_file(origin)))}",
            "    for-upstream: yes",
            "    for-downstream: no",
            "    fallback-enabled: no",
        ]

    def _write_zone_files(self) -> None:
        for origin, zone in self.signed_zones.items():
            self._zone_file(origin).write_text(zone.text)
        for origin, text in self.unsigned_zones.items():
            self._zone_file(origin).write_text(text)

    def start(self) -> Unbound:
        assert UNBOUND is not None, "unbound is not installed"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.config_text())
        self._write_zone_files()
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
            if not self.command_prefix:
                self._check_auth_zones()
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
        query = dns.message.make_query([*self.zones, *self._auth_zones()][0], "SOA")
        try:
            dns.query.udp(query, LOOPBACK, timeout=0.2, port=self.port)
        except (dns.exception.Timeout, OSError):
            return False
        return True

    def _check_auth_zones(self) -> None:
        """Each signed zone's SOA validates (AD) and each unsigned one answers: a zone file
        Unbound did not load, or a signature it rejects, fails ``start()`` with its log."""
        for origin in self._auth_zones():
            query = dns.message.make_query(origin, "SOA", want_dnssec=True)
            query.flags |= dns.flags.AD
            try:
                answer = dns.query.udp(query, LOOPBACK, timeout=self.start_timeout, port=self.port)
            except dns.exception.Timeout:
                raise AssertionError(f"zone {origin}: no answer to SOA") from None
            secure = bool(answer.flags & dns.flags.AD)
            if answer.rcode() != dns.rcode.NOERROR or secure != (origin in self.signed_zones):
                raise AssertionError(
                    f"zone {origin}: SOA answer {dns.rcode.to_text(answer.rcode())}"
                    f"{' with AD' if secure else ' without AD'}"
                )

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
    """``unbound_factory(records, *, zones=("test.",), signed_zones={}, unsigned_zones={},
    bogus=()) -> Unbound``, started (options as for :class:`Unbound`); all are stopped at
    teardown. Skips the test when unbound is not installed."""
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
