"""MTA-STS (RFC 8461): a recipient domain's promise, published over HTTPS, that its MX
hosts speak TLS with certificates valid for their names.

Discovery (RFC 8461 3.1, 3.3, 5.1): the ``_mta-sts.<domain>`` TXT record must be exactly
one record beginning ``v=STSv1;``, with an ``id=`` of 1 to 32 letters and digits.  When no
unexpired policy with that id is cached, the policy is fetched from
``https://mta-sts.<domain>/.well-known/mta-sts.txt``: the certificate must be trusted
(`[outbound] ca_file`, else the system store) and valid for that name, the answer a 200
(redirects are not followed) of type text/plain, at most 64 KiB, within `fetch_timeout`.
A valid policy is cached until its `max_age` runs out, in SQLite (`[mta_sts] cache_file`),
so that it survives restarts and is shared by workers.  A cached, unexpired policy stays in
force when the record disappears or the fetch fails (RFC 8461 5.1, 10.2: whoever can block
DNS or HTTPS must not be able to switch the policy off); only a policy with a new id, or
one whose `max_age` ran out, replaces it.

What a policy means for delivery (RFC 8461 4, 5) is up to the connector: `enforce` only
MX hosts matching an ``mx`` pattern, TLS 1.2 or later, a trusted certificate valid for the
MX host name; `testing` delivers as without a policy and only reports; `none` is no policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import sqlite3
import ssl
import threading
import time
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver
import h11
import structlog

log = structlog.get_logger("smtproxy.mta_sts")

MAX_POLICY_SIZE = 64 * 1024  # RFC 8461 3.3
MAX_AGE_LIMIT = 31_557_600  # RFC 8461 3.2: one year
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_MODES = ("enforce", "testing", "none")


class StsError(Exception):
    """No usable policy: `result_type` is the RFC 8460 one, `reason` a short phrase."""

    def __init__(self, result_type: str, reason: str) -> None:
        super().__init__(reason)
        self.result_type = result_type
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class StsFailure:
    """A policy `domain` announces but that could not be had: what TLSRPT reports for the
    connections made without it (RFC 8460 sts-policy-fetch-error, sts-policy-invalid)."""

    domain: str
    result_type: str
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class StsPolicy:
    """One domain's policy as published; `lines` as TLSRPT reports the policy-string."""

    domain: str
    policy_id: str
    mode: str
    mx: tuple[str, ...]
    max_age: int
    lines: tuple[str, ...]

    def allows(self, hostname: str) -> bool:
        """RFC 8461 4.1: an exact name, or ``*.`` for exactly one more label."""
        name = hostname.rstrip(".").lower()
        for pattern in self.mx:
            if pattern.startswith("*."):
                label, _, parent = name.partition(".")
                if label and parent == pattern[2:]:
                    return True
            elif name == pattern:
                return True
        return False


def parse_record(texts: list[str]) -> str | None:
    """The policy id of the one `v=STSv1` TXT record; None if there is not exactly one,
    or it has no valid id (RFC 8461 3.1: then the domain has no policy in DNS)."""
    candidates = [text for text in texts if re.match(r"v=STSv1\s*(;|$)", text)]
    if len(candidates) != 1:
        return None
    fields = dict(_field(part) for part in candidates[0].split(";") if part.strip())
    policy_id = fields.get("id", "")
    return policy_id if _ID.fullmatch(policy_id) else None


def _field(part: str) -> tuple[str, str]:
    name, _, value = part.strip().partition("=")
    return name.strip(), value.strip()


def parse_policy(domain: str, policy_id: str, text: str) -> StsPolicy:
    """The policy body (RFC 8461 3.2); raises StsError (sts-policy-invalid)."""
    lines = tuple(line.rstrip("\r") for line in text.split("\n") if line.strip())
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in lines:
        key, colon, value = line.partition(":")
        if not colon:
            raise StsError("sts-policy-invalid", f"malformed line {line[:60]!r}")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value.lower().rstrip("."))
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise StsError("sts-policy-invalid", "version is not STSv1")
    mode = fields.get("mode", "")
    if mode not in _MODES:
        raise StsError("sts-policy-invalid", f"mode {mode!r} is none of {', '.join(_MODES)}")
    max_age = fields.get("max_age", "")
    if not re.fullmatch(r"[0-9]{1,10}", max_age):
        raise StsError("sts-policy-invalid", f"max_age {max_age[:20]!r} is not a number of seconds")
    if mode != "none" and not mx:
        raise StsError("sts-policy-invalid", "no mx")
    # beyond RFC 8461's one year: kept a year, rather than the policy refused as a whole
    return StsPolicy(domain, policy_id, mode, tuple(mx), min(int(max_age), MAX_AGE_LIMIT), lines)


class StsCache:
    """Policies by domain until they expire: in memory, and in SQLite when `path` is set,
    which workers share and restarts keep.  SQLite runs in a thread (`asyncio.to_thread`),
    never on the event loop; when it fails the memory still holds the policy, and the file
    is tried again on the next use: mail must not wait for the cache."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._memory: dict[str, tuple[StsPolicy, float]] = {}
        self._db: sqlite3.Connection | None = None
        self._reopen_at = 0.0  # after a file that could not be opened: not before then
        self._closed = False  # replaced by a reload: what still runs keeps to memory
        self._lock = threading.Lock()

    async def get(self, domain: str, now: float) -> StsPolicy | None:
        policy, expires = self._memory.get(domain, (None, 0.0))
        if policy is None and self.path is not None:
            stored = await asyncio.to_thread(self._read, domain)
            if stored is not None:
                policy, expires = stored
                self._memory[domain] = stored
        return policy if policy is not None and expires > now else None

    async def put(self, policy: StsPolicy, body: str, expires: float) -> None:
        self._memory[policy.domain] = (policy, expires)
        if self.path is not None:
            await asyncio.to_thread(self._write, policy, body, expires)

    def _read(self, domain: str) -> tuple[StsPolicy, float] | None:
        row = self._execute("SELECT policy_id, body, expires FROM policies WHERE domain = ?", (domain,))
        if row is None:
            return None
        try:
            return parse_policy(domain, row[0], row[1]), row[2]
        except StsError:
            return None

    def _write(self, policy: StsPolicy, body: str, expires: float) -> None:
        self._execute("INSERT OR REPLACE INTO policies VALUES (?, ?, ?, ?)",
                      (policy.domain, policy.policy_id, body, expires))

    def _execute(self, sql: str, parameters: tuple) -> tuple | None:
        with self._lock:
            if self._db is None:
                if self._closed or time.monotonic() < self._reopen_at:
                    return None
                try:
                    self._db = _open(self.path)
                except (OSError, sqlite3.Error) as error:
                    self._reopen_at = time.monotonic() + REOPEN_DELAY
                    log.warning(f"MTA-STS: cannot open the policy cache {self.path}: {error}; policies are kept "
                                f"in memory, the file is tried again in {REOPEN_DELAY:g} s")
                    return None
            try:
                return self._db.execute(sql, parameters).fetchone()
            except sqlite3.Error as error:
                log.warning(f"MTA-STS: policy cache {self.path}: {error}; the policy is kept in memory")
                return None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None


REOPEN_DELAY = 60.0


def _open(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=1.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE IF NOT EXISTS policies (domain TEXT PRIMARY KEY, policy_id TEXT NOT NULL,"
               " body TEXT NOT NULL, expires REAL NOT NULL)")
    return db


def https_context(ca_file: Path | None) -> ssl.SSLContext:
    """WebPKI for policy fetches: `ca_file`, else the system store; TLS 1.2 or later."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


NO_RECORD_TTL = 300.0  # seconds a domain without an _mta-sts record is taken at its word
MAX_RECORD_TTL = 3600.0
MAX_REMEMBERED = 10000
FETCH_RETRY = 300.0  # seconds before a failed fetch of the same policy id is tried again


class StsPolicies:
    """The policy in force for a domain: `policy_for` (module docstring)."""

    def __init__(self, resolver: dns.asyncresolver.Resolver, cache: StsCache, context: ssl.SSLContext,
                 fetch_timeout: float) -> None:
        self.resolver = resolver
        self.cache = cache
        self.context = context
        self.fetch_timeout = fetch_timeout
        self._failed: dict[tuple[str, str], tuple[float, str, str]] = {}  # (domain, id) -> (until, type, reason)
        self._fetching: dict[tuple[str, str], asyncio.Task[StsPolicy]] = {}  # one fetch per policy at a time
        self._announced: dict[str, tuple[float, str | None]] = {}  # domain -> (until, id) from DNS
        self.port = 443  # RFC 8461 3.3; tests point it elsewhere

    async def policy_for(self, domain: str) -> StsPolicy | None:
        """The policy in force, None if there is none; raises StsError when the domain
        announces one that cannot be had and none is cached."""
        now = time.time()
        cached = await self.cache.get(domain, now)
        policy_id = await self._announced_id(domain)
        if policy_id is None or (cached is not None and cached.policy_id == policy_id):
            return cached
        try:
            return await asyncio.shield(self._fetch_once(domain, policy_id, now))
        except StsError as error:
            if cached is None:
                raise
            log.warning("MTA-STS: keeping the cached policy", domain=domain, policy_id=cached.policy_id,
                        reason=error.reason)
            return cached

    def _fetch_once(self, domain: str, policy_id: str, now: float) -> asyncio.Task[StsPolicy]:
        """The fetch of this policy under way, or a new one: deliveries to one domain that
        start together wait for one fetch, not one each."""
        key = (domain, policy_id)
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_and_keep(domain, policy_id, now))
            self._fetching[key] = task
            task.add_done_callback(lambda done: self._fetched(key, done))
        return task

    def _fetched(self, key: tuple[str, str], task: asyncio.Task[StsPolicy]) -> None:
        del self._fetching[key]
        if not task.cancelled():
            task.exception()  # retrieved: when every waiter was cancelled, nobody else would

    async def _fetch_and_keep(self, domain: str, policy_id: str, now: float) -> StsPolicy:
        policy, body = await self._fetch(domain, policy_id, now)
        await self.cache.put(policy, body, now + policy.max_age)
        log.info("MTA-STS: policy fetched", domain=domain, policy_id=policy_id, mode=policy.mode,
                 mx=list(policy.mx), max_age=policy.max_age)
        return policy

    async def _announced_id(self, domain: str) -> str | None:
        """The id in `_mta-sts.<domain>` TXT; None when there is none or DNS fails (a
        cached policy then stays in force, RFC 8461 5.1).  An answer is remembered for its
        TTL (no record: `NO_RECORD_TTL`), so that mail to domains without MTA-STS, most of
        it, costs no DNS query per connection; a failure is not remembered."""
        now = time.monotonic()
        known = self._announced.get(domain)
        if known is not None and known[0] > now:
            return known[1]
        try:
            answer = await self.resolver.resolve(f"_mta-sts.{domain}", "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            policy_id, ttl = None, NO_RECORD_TTL
        except (dns.exception.DNSException, OSError):
            return None
        else:
            policy_id = parse_record([b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer])
            ttl = min(answer.rrset.ttl if answer.rrset is not None else 0, MAX_RECORD_TTL)
        self._announced.pop(domain, None)
        if len(self._announced) >= MAX_REMEMBERED:  # the oldest answer goes: insertion order
            del self._announced[next(iter(self._announced))]
        self._announced[domain] = (now + ttl, policy_id)
        return policy_id

    async def _fetch(self, domain: str, policy_id: str, now: float) -> tuple[StsPolicy, str]:
        remembered = self._failed.get((domain, policy_id))
        if remembered is not None and remembered[0] > now:
            raise StsError(remembered[1], remembered[2])  # a new one each time: a raised one keeps its traceback
        try:
            # the addresses share fetch_timeout; the outer bound only catches what overruns it
            async with asyncio.timeout(self.fetch_timeout + 1.0):
                body = await self._get(f"mta-sts.{domain}", time.monotonic() + self.fetch_timeout)
            return parse_policy(domain, policy_id, body), body
        except TimeoutError:
            error = StsError("sts-policy-fetch-error", f"no policy within {self.fetch_timeout:g} s")
        except StsError as failed:
            error = failed
        self._failed = {key: value for key, value in self._failed.items() if value[0] > now}
        self._failed[(domain, policy_id)] = (now + FETCH_RETRY, error.result_type, error.reason)
        log.warning("MTA-STS: no policy", domain=domain, policy_id=policy_id, result_type=error.result_type,
                    reason=error.reason)
        raise error

    async def _get(self, host: str, deadline: float) -> str:
        """GET https://`host`/.well-known/mta-sts.txt from the first address that answers,
        each address given an equal share of the time left."""
        reasons = []
        result_type = "sts-policy-fetch-error"
        addresses = await self._addresses(host)
        for index, address in enumerate(addresses):
            share = (deadline - time.monotonic()) / (len(addresses) - index)
            try:
                async with asyncio.timeout(share):
                    return await self._get_from(address, host)
            except TimeoutError:
                reasons.append(f"{address}: no answer within {share:.1f} s")
            except ssl.SSLCertVerificationError as error:  # RFC 8460 4.3.2.2
                result_type = "sts-webpki-invalid"
                reasons.append(f"{address}: {error.verify_message}")
            except (OSError, ssl.SSLError, h11.ProtocolError) as error:
                reasons.append(f"{address}: {error}")
        raise StsError(result_type, "; ".join(reasons) or f"{host} has no address")

    async def _addresses(self, host: str) -> list[str]:
        addresses = []
        for rdtype in ("A", "AAAA"):
            with contextlib.suppress(dns.exception.DNSException, OSError):
                addresses += [rdata.address for rdata in await self.resolver.resolve(host, rdtype, search=False)]
        return addresses

    async def _get_from(self, address: str, host: str) -> str:
        reader, writer = await asyncio.open_connection(address, self.port, ssl=self.context, server_hostname=host)
        try:
            connection = h11.Connection(h11.CLIENT)
            writer.write(connection.send(h11.Request(method="GET", target="/.well-known/mta-sts.txt", headers=[
                ("Host", host), ("User-Agent", "smtproxy"), ("Accept", "text/plain"), ("Connection", "close")])))
            writer.write(connection.send(h11.EndOfMessage()))
            return _body(await _response(connection, reader))
        finally:
            writer.transport.abort()  # the answer is complete or abandoned: no TLS goodbye to wait for


async def _response(connection: h11.Connection, reader: asyncio.StreamReader) -> tuple[h11.Response, bytes]:
    response = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await reader.read(16384))
        elif isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_POLICY_SIZE:
                raise StsError("sts-policy-invalid", f"policy larger than {MAX_POLICY_SIZE} bytes")
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if response is None:
        raise StsError("sts-policy-fetch-error", "no HTTP response")
    return response, bytes(body)


def _body(answer: tuple[h11.Response, bytes]) -> str:
    response, body = answer
    if response.status_code != 200:  # RFC 8461 3.3: redirects are not followed either
        raise StsError("sts-policy-fetch-error", f"HTTP status {response.status_code}")
    content_type = dict(response.headers).get(b"content-type", b"").split(b";")[0].strip().lower()
    if content_type != b"text/plain":
        raise StsError("sts-policy-invalid", f"media type {content_type.decode('latin-1')!r} is not text/plain")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise StsError("sts-policy-invalid", "the policy is not UTF-8") from None
