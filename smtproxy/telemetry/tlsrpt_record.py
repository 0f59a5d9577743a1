"""Which domains want TLSRPT: their `_smtp._tls` TXT record (RFC 8460 section 3).

Records that do not begin with `v=TLSRPTv1;` are ignored (as RFC 8460 says, and as
Postfix and tlsrpt-reportd read them: no blank before the semicolon); unless exactly one
is left, the domain does not take part.  That one must have exactly one `rua=` list of
mailto: or https: URIs (schemes in any case) and otherwise only `name=value` fields,
which are ignored (the RFC: a superset of the grammar is accepted), or it is ignored too.  Answers are
cached for their DNS TTL (negative answers for the SOA's negative TTL) by dnspython's
cache; a lookup that failed (timeout, SERVFAIL) is not repeated for `FAILURE_TTL`, so a
broken resolver costs one timeout per domain and minute, not one per delivery.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

import dns.asyncresolver
import dns.exception
import dns.resolver
import structlog

log = structlog.get_logger("smtproxy.tlsrpt")

CACHE_SIZE = 10000  # answers kept (LRU)
FAILURE_TTL = 60.0  # seconds a failed lookup is not repeated

_VERSION = re.compile(r"v=TLSRPTv1;")
_FIELD_DELIM = re.compile(r"[ \t]*;[ \t]*")
_URI = r"(?i:mailto|https):[\x21-\x2b\x2d-\x3a\x3c-\x7e]+"  # commas and semicolons come %-encoded
_RUA = re.compile(rf"rua={_URI}(?:[ \t]*,[ \t]*{_URI})*")
_FIELD = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+=[\x21-\x3a\x3c-\x7e]*")  # any name=value, ignored


def tlsrpt_record(texts: Iterable[str]) -> str | None:
    """The domain's TLSRPT record among its `_smtp._tls` TXT strings, or None."""
    candidates = [text for text in texts if _VERSION.match(text)]
    if len(candidates) != 1:
        return None
    record = candidates[0]
    fields = _FIELD_DELIM.split(record)[1:]
    if fields and fields[-1] == "":  # a record may end in a delimiter
        fields.pop()
    ruas = [field for field in fields if field.startswith("rua=")]
    if len(ruas) != 1 or not _RUA.fullmatch(ruas[0]):
        return None
    if not all(_FIELD.fullmatch(field) for field in fields if not field.startswith("rua=")):
        return None
    return record


class TlsrptRecords:
    """`_smtp._tls.<domain>` TXT lookups on a dnspython resolver, which gets an answer cache."""

    def __init__(self, resolver: dns.asyncresolver.Resolver,
                 clock: Callable[[], float] = time.monotonic) -> None:
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self._resolver = resolver
        self._clock = clock
        self._failed_until: dict[str, float] = {}

    async def lookup(self, domain: str) -> str | None:
        """The valid TLSRPT record of `domain` (an A-label), or None."""
        now = self._clock()
        if self._failed_until.get(domain, now) > now:
            return None
        try:
            answer = await self._resolver.resolve(f"_smtp._tls.{domain}.", "TXT", raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None
        except (dns.exception.DNSException, OSError) as error:
            self._remember_failure(domain, now)
            log.warning(f"TLSRPT: cannot look up _smtp._tls.{domain} TXT: {type(error).__name__}; "
                        f"no TLSRPT results for {domain} for {FAILURE_TTL:g}s", domain=domain)
            return None
        texts = [b"".join(rdata.strings).decode("utf-8", "replace") for rdata in answer.rrset or ()]
        return tlsrpt_record(texts)

    def _remember_failure(self, domain: str, now: float) -> None:
        if len(self._failed_until) >= CACHE_SIZE:
            live = {name: until for name, until in self._failed_until.items() if until > now}
            self._failed_until = live if len(live) < CACHE_SIZE else {}
        self._failed_until[domain] = now + FAILURE_TTL
