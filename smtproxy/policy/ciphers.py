"""Postfix's cipher grades as OpenSSL cipher lists for TLS 1.2 and older (TLS 1.3 suites are
not chosen this way), and the exclusions each security level adds (smtp_tls_policy.c)."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from smtproxy.policy.levels import DEFAULT_CIPHER_GRADE, Level, Policy, PolicyDecision

if TYPE_CHECKING:
    from smtproxy.policy.table import Policies

CIPHER_GRADES = {
    "high": "aNULL:-aNULL:HIGH:@STRENGTH",
    "medium": "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH",
    "low": "aNULL:-aNULL:HIGH:MEDIUM:LOW:+RC4:@STRENGTH",
    "export": "aNULL:-aNULL:HIGH:MEDIUM:LOW:EXPORT:+RC4:@STRENGTH",
    "null": "eNULL:!aNULL",
}

# Postfix smtp_tls_policy.c: encrypt needs encryption, authenticating levels a certificate
LEVEL_EXCLUSIONS = {
    Level.ENCRYPT: ("eNULL",),
    Level.FINGERPRINT: ("aNULL",),
    Level.VERIFY: ("aNULL",),
    Level.SECURE: ("aNULL",),
    Level.DANE_ONLY: ("aNULL",),
}


def cipher_list(policy: Policy, configured: str) -> str:
    """The OpenSSL cipher list for `policy`: its grade, else `configured` ([outbound.tls]
    ciphers), else Postfix's default grade; minus `exclude=` and the level's exclusions."""
    if policy.ciphers is None:
        base = configured or CIPHER_GRADES[DEFAULT_CIPHER_GRADE]
    elif policy.ciphers in CIPHER_GRADES:
        base = CIPHER_GRADES[policy.ciphers]
    else:
        raise ValueError(f"unknown cipher grade {policy.ciphers!r}; allowed: {', '.join(CIPHER_GRADES)}")
    level = Level.DANE_ONLY if policy.dane is not None else policy.level  # TLSA authenticate
    excluded = policy.exclude + LEVEL_EXCLUSIONS.get(level, ())
    return base + "".join(f":!{name}" for name in excluded)


def cipher_problem(policies: Policies, configured: str) -> str | None:
    """The first policy whose cipher list selects no cipher (`exclude=ALL`, `ciphers=null` at
    `encrypt`), as one line; None: every one selects some.  Found on start and reload, such
    an entry would otherwise fail every delivery to its destination."""
    decisions = [*policies.table.entries.values(), PolicyDecision(Policy(policies.default_level), "default_level")]
    checked: set[str] = set()
    for decision in decisions:
        ciphers = cipher_list(decision.policy, configured)
        if ciphers in checked:
            continue
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(ciphers)
        except ssl.SSLError:
            return (f"{decision.source}: its ciphers=, exclude= and level select no cipher "
                    f"(OpenSSL cipher list {ciphers!r})")
        checked.add(ciphers)
    return None
