"""s/qmail's `control/tlsdestinations` → a policy table, and the Postfix lines that say the
same (`smtproxy policy import-qmail`).

The grammar is s/qmail's qmail-remote(8), CONTROL FILES, tlsdestinations: one rule a line,
`destination:cafile|ciphers|verifydepth;port|domain`, or `=fingerprint` in place of the
cafile.  Empty fields may be left out (`host:`, `host:;26`).  A destination is a host name,
`.domain` (its subdomains) or `[address]`, after an optional prefix; a few rules stand for
all destinations.  What each becomes here:

    !host:          no TLS                                   none
    %host:=HEX      certificate pinning (SHA-256 only here)  fingerprint match=HEX
    =host:cafile    CA-verified, name is the destination     secure match=nexthop
    ~host:cafile    the same, wildcard names accepted        secure match=nexthop
    host:cafile     mandatory TLS, CA-verified (no name)     verify with ca_file
    host:           mandatory TLS, some certificate shown    encrypt
    -host:          mandatory TLS, anonymous allowed         encrypt
    =*: ~*: +*: -*: the same four for all other destinations
    *: -:           opportunistic TLS for all others         may

A lookup follows qmail-remote's tls_destination(): `!` rules first (the host and each
parent `.domain`), then `%host`, `=host`, then `~`, plain and `-` rules (host, then
parents), then the rules for all destinations in the order above.  The table made here
answers every lookup the same way with Postfix's most-specific-key-first order, so a rule
that s/qmail would never reach (`mx.example.com:` under `!.example.com:`) takes the
answer that shadows it.

Where Postfix has no word for it this is stricter or refuses, naming the line: the host
name check of `verify` (s/qmail's plain rule checks only the CA), the CA check of `secure`
without a cafile (s/qmail then checks only the name), and errors for SHA-1/SHA-224/SHA-512
pins, CA directories, relative cafile names, OpenSSL cipher lists that are not a Postfix
grade plus exclusions, a cafile on an opportunistic rule, the sender-domain field, and
ports 465/6209 (implicit TLS).  A `;port` adds the key `[host]:port`, for where routes_file
sends the mail to that host and port, next to the key of the destination itself: mail that
reaches the destination by MX lookup on the default port keeps the rule's level instead of
falling to the default (s/qmail's `hiddenpartner.org:;35` demands TLS for that domain).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.policy.table import (
    CIPHER_NAME,
    GRADES,
    MAX_VERIFY_DEPTH,
    PolicyTable,
    PolicyTableError,
    parent_chain,
    parse_fingerprint,
    parse_key,
    read_policy_file,
    render_policy,
)

__all__ = ["load_tlsdestinations", "to_postfix_lines"]

# qmail-remote's lookup order: per-destination prefixes, then the rules for all destinations
PREFIX_ORDER = ("!", "%", "=", "~", "", "-")
GENERAL_ORDER = ("=*", "~*", "+*", "-*", "*", "-")
IMPLICIT_TLS_PORTS = {465: "SMTPS", 6209: "QMTPS"}
_OTHER_DIGESTS = {40: "SHA-1", 56: "SHA-224", 128: "SHA-512"}
RULE_FORM = "destination:cafile|ciphers|verifydepth;port (see qmail-remote(8), tlsdestinations)"

_GRADE_WORDS = {"high": "high", "medium": "medium", "low": "low", "export": "export",
                "null": "null", "enull": "null"}


@dataclasses.dataclass(frozen=True)
class _Rule:
    prefix: str  # one of PREFIX_ORDER, or one of GENERAL_ORDER for the rules for all
    destination: str  # lower-case host, .domain or [address]; "" for the rules for all
    port: int | None
    decision: PolicyDecision


def load_tlsdestinations(path: str | Path) -> PolicyTable:
    """Read an s/qmail tlsdestinations file; PolicyTableError (one line) on any problem."""
    rules: dict[tuple[str, str], _Rule] = {}
    lines: dict[tuple[str, str], int] = {}
    for line_number, line in enumerate(read_policy_file(path).splitlines(), start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            rule = _parse_rule(text, path, line_number)
        except ValueError as exc:
            raise PolicyTableError(path, line_number, f"{text}: {exc}") from None
        slot = (rule.prefix, rule.destination)
        if slot in rules:
            raise PolicyTableError(path, line_number, f'{text}: rule "{text.partition(":")[0]}" is already '
                                                      f"given on line {lines[slot]}; allowed: each once")
        rules[slot], lines[slot] = rule, line_number
    return _table(rules)


def to_postfix_lines(table: PolicyTable) -> list[str]:
    """The table as Postfix policy lines, with comments for what a table cannot hold."""
    lines = ["# smtproxy policy_file (Postfix smtp_tls_policy_maps syntax), from s/qmail tlsdestinations"]
    lines += table.render().splitlines()
    default = table.default
    if default is None:
        lines.append('# s/qmail used no TLS for other destinations: [outbound] default_level = "none" '
                     "does the same")
    else:
        lines.append(f"# other destinations ({default.source}): [outbound] default_level = "
                     f'"{default.policy.level}"')
        if render_policy(default.policy) != str(default.policy.level):
            lines.append(f"#   its attributes have no place in a table: {render_policy(default.policy)}")
    return lines


# --------------------------------------------------------------------------- one rule


def _parse_rule(text: str, path: str | Path, line_number: int) -> _Rule:
    destination_text, colon, info = text.partition(":")
    if not colon:
        raise ValueError(f"no colon; allowed: {RULE_FORM}")
    prefix, destination = _split_destination(destination_text)
    if prefix == "!" and info:
        raise ValueError("! (no TLS) takes nothing after the colon; allowed: !host:")
    fields = info.split("|")
    if len(fields) > 4:
        raise ValueError(f"{len(fields)} fields; allowed: {RULE_FORM}")
    if len(fields) == 4 and fields[3]:
        raise ValueError(f'"|{fields[3]}" binds the rule to a sender domain; allowed: rules for '
                         "every sender (smtproxy's policy depends on the destination only)")
    fields = (fields + ["", ""])[:3]
    last = max(index for index, field in enumerate(fields) if field or index == 0)
    fields[last], _, port_text = fields[last].partition(";")
    if any(";" in field for field in fields):
        raise ValueError(f'";port" stands after the last field given; allowed: {RULE_FORM}')
    trust, ciphers, depth = fields
    port = _port(port_text, prefix, destination)
    policy = _policy(prefix, destination, trust, ciphers, depth)
    source = f"tlsdestinations {path} line {line_number} ({destination_text})"
    return _Rule(prefix, destination, port, PolicyDecision(policy, source))


def _split_destination(text: str) -> tuple[str, str]:
    """`=mx.example.com` → ("=", "mx.example.com"); `-*` → ("-*", "")."""
    if text in GENERAL_ORDER:
        return text, ""
    prefix = text[0] if text[:1] in ("!", "%", "=", "~", "-") else ""
    name = text[len(prefix):]
    try:
        destination = parse_key(name)
    except ValueError:
        raise ValueError(f'"{text}" is not a destination; allowed: host, .domain or [address] after '
                         "one of ! % = ~ - (or none), or one of " + " ".join(GENERAL_ORDER)) from None
    if ":" in destination:
        raise ValueError("allowed: a destination without a port (the port goes after ;)")
    if prefix in ("%", "=") and destination.startswith("."):
        raise ValueError(f'"{text}": {prefix} compares one host name; allowed: {prefix}host, not {prefix}.domain')
    return prefix, destination


def _port(text: str, prefix: str, destination: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f'port "{text}"; allowed: 1 to 65535')
    port = int(text)
    if port in IMPLICIT_TLS_PORTS:
        raise ValueError(f"port {port} means {IMPLICIT_TLS_PORTS[port]} (TLS from the first byte); "
                         "allowed: a STARTTLS port (smtproxy sends with STARTTLS only)")
    if not destination or destination.startswith("."):
        raise ValueError(f"a port needs one host; allowed: host:;{port} or [address]:;{port}")
    return port


def _policy(prefix: str, destination: str, trust: str, ciphers: str, depth: str) -> Policy:
    level = _level(prefix, not destination, trust)
    grade, exclude = _ciphers(ciphers)
    match = ("nexthop",) if level is Level.SECURE else ()
    ca_file = verify_depth = None
    if level is Level.FINGERPRINT:
        match = (_fingerprint(trust),)
    elif trust:
        if level not in (Level.VERIFY, Level.SECURE):
            raise ValueError(f'cafile "{trust}" on a rule that checks no certificate; allowed: a cafile '
                             "after host, =host, ~host, +* , ~* or =*")
        ca_file = _ca_file(trust)
    if depth:
        if ca_file is None:
            raise ValueError(f'verifydepth "{depth}" without a cafile; allowed: cafile|ciphers|verifydepth')
        if not depth.isdigit() or not 1 <= int(depth) <= MAX_VERIFY_DEPTH:
            raise ValueError(f'verifydepth "{depth}"; allowed: an integer from 1 to {MAX_VERIFY_DEPTH}')
        verify_depth = int(depth)
    return Policy(level, match=match, ciphers=grade, exclude=exclude, ca_file=ca_file,
                  verify_depth=verify_depth)


def _level(prefix: str, general: bool, trust: str) -> Level:
    if prefix == "!":
        return Level.NONE
    if trust.startswith("="):
        if prefix in ("-", "-*", "*"):
            raise ValueError(f"a fingerprint on a {prefix} rule; allowed: %host:=fingerprint")
        return Level.FINGERPRINT
    if prefix == "%":
        raise ValueError("% (pinning) needs the fingerprint; allowed: %host:=fingerprint")
    if prefix in ("=", "~", "=*", "~*"):
        return Level.SECURE
    if prefix in ("", "+*"):
        return Level.VERIFY if trust else Level.ENCRYPT
    if prefix == "-*" or prefix == "-" and not general:
        return Level.ENCRYPT
    return Level.MAY  # "*:" and "-:", opportunistic for all destinations


def _fingerprint(trust: str) -> str:
    """`=HEX`; s/qmail tells SHA-1/224/256/512 apart by length, smtproxy pins SHA-256 only."""
    digits = trust[1:]
    other = _OTHER_DIGESTS.get(len(digits)) if re.fullmatch(r"[0-9A-Fa-f]+", digits) else None
    if other:
        raise ValueError(f"=fingerprint is {other}; allowed: a SHA-256 fingerprint (64 hex digits), "
                         "e.g. from openssl x509 -noout -fingerprint -sha256")
    return parse_fingerprint(digits)


def _ca_file(trust: str) -> Path:
    if trust.endswith("/"):
        raise ValueError(f'"{trust}" is a CA directory; allowed: a CA file (concatenate the '
                         "directory's certificates into one PEM file)")
    if not trust.startswith("/") or re.search(r"[\s,]", trust):
        raise ValueError(f'cafile "{trust}"; allowed: an absolute file name without blanks or commas '
                         "(s/qmail reads relative names from its home directory)")
    return Path(trust)


def _ciphers(text: str) -> tuple[str | None, tuple[str, ...]]:
    """An OpenSSL cipher list → (Postfix grade, exclusions); only `GRADE:!X:!Y` fits."""
    grade, exclude = None, []
    for item in (item for item in re.split(r"[:, ]+", text) if item):
        if item[0] in "!-" and CIPHER_NAME.fullmatch(item[1:]):
            exclude.append(item[1:])
        elif item.lower() in _GRADE_WORDS and grade is None:
            grade = _GRADE_WORDS[item.lower()]
        else:
            raise ValueError(f'cipher item "{item}" has no Postfix form; allowed: one grade '
                             f"({', '.join(GRADES).upper()}) and !exclusions, e.g. HIGH:!RC4")
    return grade, tuple(exclude)


# --------------------------------------------------------------------------- the table


def _table(rules: dict[tuple[str, str], _Rule]) -> PolicyTable:
    entries: dict[str, PolicyDecision] = {}
    for _, destination in rules:
        if not destination:  # a rule for all destinations
            continue
        rule = _resolve(rules, destination)
        entries.setdefault(destination, rule.decision)
        if rule.port is not None:
            port_key = f"{destination}:{rule.port}" if destination.startswith("[") else f"[{destination}]:{rule.port}"
            entries.setdefault(port_key, rule.decision)
    general = next((rules[(prefix, "")] for prefix in GENERAL_ORDER if (prefix, "") in rules), None)
    return PolicyTable(entries, general.decision if general else None)


def _resolve(rules: dict[tuple[str, str], _Rule], destination: str) -> _Rule:
    """The rule qmail-remote uses for `destination` (a host, or any host under `.domain`)."""
    chain = [destination] if destination.startswith("[") else parent_chain(destination)
    for prefix in PREFIX_ORDER:
        for candidate in chain:
            if (prefix, candidate) in rules:
                return rules[(prefix, candidate)]
    raise AssertionError(f"{destination} has a rule of its own")
