"""The outbound TLS policy table in Postfix `smtp_tls_policy_maps` syntax: parse, look up the
Postfix way, and write back.

File syntax (postmap(1) text input): `key  level  name=value ...`; attributes are separated
by white space or commas, a line that starts with white space continues the entry above,
lines whose first non-blank character is `#` and blank lines are skipped.  Keys, levels and
attribute names are case-insensitive.  Every problem is a one-line `PolicyTableError` that
names the file, the line, the offending value and what is allowed.

Where this is stricter than Postfix 3.x (src/smtp/smtp_tls_policy.c), it refuses what
Postfix would only warn about or ignore: attributes at level `none`, `match=` on
`dane`/`dane-only` (Postfix 3.x refuses that too), a key given twice, `fingerprint`
without `match=` (there is no smtp_tls_fingerprint_cert_match to fall back on), and
`tafile=` (smtproxy's DANE uses TLSA records only).  `ca_file=` and `verify_depth=`
(verify and secure only) are smtproxy's own attributes: they carry s/qmail's per-destination
CA file and depth (see policy/qmail.py); Postfix itself has no such attributes.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from smtproxy.config import PROTOCOLS
from smtproxy.policy.levels import DEFAULT_CIPHER_GRADE, DEFAULT_MATCH, Level, Policy, PolicyDecision
from smtproxy.tables import TableError, is_domain, read_table
from smtproxy import tables

if TYPE_CHECKING:
    from smtproxy.config import OutboundConfig

__all__ = [
    "Policies",
    "PolicyTable",
    "PolicyTableError",
    "describe_decision",
    "parent_chain",
    "parse_fingerprint",
    "parse_key",
    "parse_nexthop",
    "read_policy_file",
    "render_policy",
    "render_protocols",
]

GRADES = ("export", "low", "medium", "high", "null")
MATCH_STRATEGIES = ("hostname", "nexthop", "dot-nexthop")
IGNORED_PROTOCOLS = ("SSLv2", "SSLv3")  # Postfix names them; OpenSSL 3 cannot speak them
ALL_PROTOCOLS = IGNORED_PROTOCOLS + PROTOCOLS  # oldest first
FINGERPRINT_BYTES = 32  # SHA-256, Postfix's smtp_tls_fingerprint_digest default since 3.6
MAX_VERIFY_DEPTH = 100

KEY_FORMS = ("example.com, .example.com, example.com:2525, [mx.example.net], [mx.example.net]:25, "
             "[192.0.2.1]:2525, [2001:db8::1]:25")
MATCH_ALLOWED = f"{', '.join(MATCH_STRATEGIES)}, example.com, .example.com, separated by colons"
NEXTHOP_FORMS = "example.com, example.com:2525, [mx.example.net], [mx.example.net]:25, [192.0.2.1], [2001:db8::1]:25"

_COMMON_ATTRIBUTES = ("ciphers", "protocols", "exclude", "servername", "connection_reuse")
_ATTRIBUTES_AT = {
    Level.NONE: (),
    Level.MAY: _COMMON_ATTRIBUTES,
    Level.ENCRYPT: _COMMON_ATTRIBUTES,
    Level.DANE: _COMMON_ATTRIBUTES,
    Level.DANE_ONLY: _COMMON_ATTRIBUTES,
    Level.FINGERPRINT: ("match", *_COMMON_ATTRIBUTES),
    Level.VERIFY: ("match", *_COMMON_ATTRIBUTES, "ca_file", "verify_depth"),
    Level.SECURE: ("match", *_COMMON_ATTRIBUTES, "ca_file", "verify_depth"),
}
_KNOWN_ATTRIBUTES = ("match", *_COMMON_ATTRIBUTES, "ca_file", "verify_depth")
_REPEATABLE = ("match", "connection_reuse")  # match= accumulates; the last connection_reuse= wins

_PORT = re.compile(r"[0-9]{1,5}")
CIPHER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_HEX = re.compile(r"[0-9a-f]+")


class PolicyTableError(TableError):
    """A problem in a policy file (see smtproxy.tables.TableError)."""


# --------------------------------------------------------------------------- keys and nexthops


def _is_bracket_host(text: str) -> bool:
    """What may stand between brackets (`text` in lower case): a host name, an IP address,
    or RFC 5321's `IPv6:` address literal, which the routes table accepts too."""
    if is_domain(text):
        return True
    address = text.removeprefix("ipv6:")
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return False
    return address == text or parsed.version == 6


def _parse_destination(text: str, *, pattern: bool) -> tuple[str, bool]:
    """`text` → (lower-case key, exact); exact keys get one lookup, domains a parent chain.

    `pattern` allows `.example.com` (a table key matching subdomains).  ValueError."""
    key = text.lower()
    if key.startswith("["):
        host, bracket, rest = key[1:].partition("]")
        port = rest.removeprefix(":")
        if bracket and _is_bracket_host(host) and (rest == "" or rest.startswith(":") and _is_port(port)):
            return key, True
        raise ValueError
    name, colon, port = key.partition(":")
    if colon:
        if is_domain(name) and _is_port(port):
            return key, True
        raise ValueError
    if pattern and name.startswith(".") and is_domain(name[1:]) or is_domain(name):
        return key, False
    raise ValueError


def _is_port(text: str) -> bool:
    return bool(_PORT.fullmatch(text)) and 1 <= int(text) <= 65535


def parse_nexthop(nexthop: str) -> tuple[str, bool]:
    """A nexthop written the Postfix way → (lower-case key, exact).

    `example.com` is a domain whose MX hosts are looked up (`example.com:2525`: on port
    2525); `[host]` and `[host]:port` name a host directly.  ValueError for anything else."""
    try:
        return _parse_destination(nexthop, pattern=False)
    except ValueError:
        raise ValueError(f'"{nexthop}" is not a nexthop; allowed: {NEXTHOP_FORMS}') from None


def parse_key(text: str) -> str:
    """A table key → its lower-case form; ValueError naming the allowed forms."""
    try:
        return _parse_destination(text, pattern=True)[0]
    except ValueError:
        raise ValueError(f'"{text}" is not a policy key; allowed: {KEY_FORMS}') from None


def parent_chain(name: str) -> list[str]:
    """`a.b.example.com` → [a.b.example.com, .b.example.com, .example.com, .com]."""
    chain = [name]
    dot = name.find(".", 1)
    while dot != -1:
        chain.append(name[dot:])
        dot = name.find(".", dot + 1)
    return chain


# --------------------------------------------------------------------------- the table


@dataclasses.dataclass(frozen=True)
class PolicyTable:
    """Lower-case keys → the policy and where it was written.

    `default` answers a lookup nothing else matched; only an s/qmail file has one (its
    `*:` style rules), a Postfix table never does (Postfix uses main.cf for that)."""

    entries: Mapping[str, PolicyDecision] = dataclasses.field(default_factory=dict)
    default: PolicyDecision | None = None

    @classmethod
    def load(cls, path: str | Path) -> PolicyTable:
        return cls.parse(read_policy_file(path), path)

    @classmethod
    def parse(cls, text: str, path: str | Path) -> PolicyTable:
        """Parse a table's text; `path` names it in errors and sources, and relative
        `ca_file=` names resolve against its directory."""
        entries: dict[str, PolicyDecision] = {}
        first_line: dict[str, int] = {}
        for tokens in tables.entries(text, path, PolicyTableError):
            line_number, key_text = tokens[0]
            try:
                key = parse_key(key_text)
            except ValueError as exc:
                raise PolicyTableError(path, line_number, str(exc)) from None
            if key in entries:
                raise PolicyTableError(path, line_number, f'key "{key_text}" is already given on line '
                                                          f"{first_line[key]}; allowed: each key once")
            policy = _parse_policy(tokens, path)
            entries[key] = PolicyDecision(policy, f"policy_file {path} line {line_number} ({key})")
            first_line[key] = line_number
        return cls(entries)

    def lookup(self, nexthop: str) -> PolicyDecision | None:
        """The entry for a nexthop, looked up as Postfix's smtp(8) does.

        Postfix indexes the table by the nexthop exactly as written, brackets and port
        included (postconf(5) smtp_tls_policy_maps; tls_policy_lookup() in
        src/smtp/smtp_tls_policy.c): `[mx.example.net]:587` is one lookup of that key
        only, and does not fall back to `[mx.example.net]` (nor `[mx.example.net]` to
        `[mx.example.net]:25`); `example.com:2525` likewise.  A bare domain tries itself,
        then each parent with a leading dot: `a.b.example.com`, `.b.example.com`,
        `.example.com`, `.com`; `example.com` itself does not match `a.example.com`.
        ValueError when `nexthop` is not a nexthop."""
        key, exact = parse_nexthop(nexthop)
        for candidate in [key] if exact else parent_chain(key):
            found = self.entries.get(candidate)
            if found is not None:
                return found
        return self.default

    def render(self) -> str:
        """The entries as Postfix table text that `parse` reads back to equal policies."""
        width = max((len(key) for key in self.entries), default=0)
        return "".join(f"{key:<{width}}  {render_policy(decision.policy)}\n"
                       for key, decision in self.entries.items())


@dataclasses.dataclass(frozen=True)
class Policies:
    """The policy table with `[outbound] default_level` behind it."""

    table: PolicyTable
    default_level: Level

    @classmethod
    def from_config(cls, outbound: OutboundConfig) -> Policies:
        table = PolicyTable.load(outbound.policy_file) if outbound.policy_file else PolicyTable()
        return cls(table, Level(outbound.default_level))

    def decide(self, nexthop: str) -> PolicyDecision:
        """The table's entry for `nexthop`, else the default level (source `default_level`)."""
        found = self.table.lookup(nexthop)
        return found if found is not None else PolicyDecision(Policy(self.default_level), "default_level")


def read_policy_file(path: str | Path) -> str:
    """A policy file's text; PolicyTableError when it cannot be read or is not UTF-8."""
    return read_table(path, PolicyTableError)


# --------------------------------------------------------------------------- one entry


def _parse_policy(tokens: list[tuple[int, str]], path: str | Path) -> Policy:
    key_line, key = tokens[0]
    levels = ", ".join(level.value for level in Level)
    if len(tokens) == 1:
        raise PolicyTableError(path, key_line, f'key "{key}" has no security level; allowed: {levels}')
    level_line, level_text = tokens[1]
    try:
        level = Level(level_text.lower())
    except ValueError:
        raise PolicyTableError(path, level_line, f'unknown security level "{level_text}"; '
                                                 f"allowed: {levels}") from None
    values: dict[str, object] = {}
    for line_number, token in tokens[2:]:
        name, equals, value = token.partition("=")
        name = name.lower()
        try:
            if not equals or not name:
                raise ValueError(f"not name=value; allowed: {_allowed_attributes(level)}")
            _check_attribute(name, level)
            if name in values and name not in _REPEATABLE:
                raise ValueError("given twice; allowed: once per entry")
            parsed = _ATTRIBUTE_PARSERS[name](value, level, path)
        except ValueError as exc:
            raise PolicyTableError(path, line_number, f"{token}: {exc}") from None
        values[name] = values.get(name, ()) + parsed if name == "match" else parsed
    if level is Level.FINGERPRINT and "match" not in values:
        raise PolicyTableError(path, key_line, f'"{key}" is at level fingerprint without a fingerprint; '
                                               "allowed: fingerprint match=AB:CD:...(SHA-256)")
    protocols = values.pop("protocols", (None, None))
    return Policy(level, min_protocol=protocols[0], max_protocol=protocols[1], **values)


def _allowed_attributes(level: Level) -> str:
    names = _ATTRIBUTES_AT[level]
    return ", ".join(f"{name}=" for name in names) if names else f"no attributes at level {level}"


def _check_attribute(name: str, level: Level) -> None:
    if name == "tafile":
        raise ValueError("trust-anchor files (tafile=) are not supported; allowed: "
                         f"{_allowed_attributes(level)} (verify/secure: ca_file= for a CA file)")
    if name not in _KNOWN_ATTRIBUTES:
        raise ValueError(f'unknown attribute "{name}"; allowed: {_allowed_attributes(level)}')
    if name not in _ATTRIBUTES_AT[level]:
        raise ValueError(f"not valid at level {level}; allowed: {_allowed_attributes(level)}")


# --------------------------------------------------------------------------- attribute values


def _parse_match(value: str, level: Level, path: str | Path) -> tuple[str, ...]:
    """fingerprint: `|`-separated digests; verify/secure: `:`-separated strategies and names."""
    if level is Level.FINGERPRINT:
        items = tuple(parse_fingerprint(item) for item in value.split("|") if item)
    else:
        items = tuple(_match_name(item) for item in value.split(":") if item)
    if not items:
        raise ValueError("empty value; allowed: " + ("SHA-256 fingerprints separated by |"
                                                      if level is Level.FINGERPRINT else MATCH_ALLOWED))
    return items


def _match_name(item: str) -> str:
    name = item.lower()
    if name not in MATCH_STRATEGIES and not is_domain(name.removeprefix(".")):
        raise ValueError(f'"{item}" is neither a strategy nor a DNS name; allowed: {MATCH_ALLOWED}')
    return name


def parse_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint, plain hex or colon-separated pairs → "AB:CD:...", upper case."""
    digits = text.lower().replace(":", "")
    colons_ok = ":" not in text or re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})*", text)
    if not _HEX.fullmatch(digits) or not colons_ok or len(digits) % 2:
        raise ValueError(f'"{text}" is not a fingerprint; allowed: a SHA-256 digest as hex, '
                         "plain or colon-separated pairs (AB:CD:...)")
    if len(digits) != 2 * FINGERPRINT_BYTES:
        raise ValueError(f'"{text}" has {len(digits) // 2} bytes; allowed: a SHA-256 fingerprint '
                         f"({FINGERPRINT_BYTES} bytes); an MD5 or SHA-1 one must be computed again")
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2)).upper()


def _parse_ciphers(value: str, level: Level, path: str | Path) -> str:
    if value.lower() not in GRADES:
        raise ValueError(f"allowed: a Postfix cipher grade: {', '.join(GRADES)}")
    return value.lower()


def _parse_protocols(value: str, level: Level, path: str | Path) -> tuple[str, str]:
    """Postfix protocol syntax → (min, max) among TLSv1..TLSv1.3.

    Names enable only themselves (`TLSv1.2:TLSv1.3`), `!name` excludes, `>=name` and
    `<=name` bound the range; SSLv2 and SSLv3 are accepted and have no effect."""
    tokens = [token for token in value.split(":") if token]
    if not tokens:
        raise ValueError("empty value; allowed: protocol names separated by colons, e.g. >=TLSv1.2")
    included, excluded, lowest, highest = set(), set(), 0, len(ALL_PROTOCOLS) - 1
    bounds_seen = set()
    for token in tokens:
        operator = next((op for op in (">=", "<=", "!") if token.startswith(op)), "")
        index = _protocol_index(token[len(operator):])
        if operator in bounds_seen:
            raise ValueError(f'"{operator}" given twice; allowed: one >= and one <= bound')
        if operator == ">=":
            lowest = index
        elif operator == "<=":
            highest = index
        elif operator == "!":
            excluded.add(index)
        else:
            included.add(index)
        if operator in (">=", "<="):
            bounds_seen.add(operator)
    enabled = [index for index in range(lowest, highest + 1)
               if index not in excluded and (not included or index in included)
               and ALL_PROTOCOLS[index] not in IGNORED_PROTOCOLS]
    if not enabled:
        raise ValueError(f"enables none of {', '.join(PROTOCOLS)}; allowed: a setting that leaves one")
    if enabled != list(range(enabled[0], enabled[-1] + 1)):
        raise ValueError(f"leaves a gap ({':'.join(ALL_PROTOCOLS[i] for i in enabled)}); "
                         "allowed: a contiguous range such as >=TLSv1.2")
    return ALL_PROTOCOLS[enabled[0]], ALL_PROTOCOLS[enabled[-1]]


def _protocol_index(name: str) -> int:
    for index, known in enumerate(ALL_PROTOCOLS):
        if name.lower() == known.lower():
            return index
    raise ValueError(f'unknown protocol "{name}"; allowed: {", ".join(ALL_PROTOCOLS)}, each '
                     "alone, after ! (exclude), >= or <=, separated by colons")


def _parse_exclude(value: str, level: Level, path: str | Path) -> tuple[str, ...]:
    names = tuple(name for name in re.split(r"[:, ]+", value) if name)
    bad = [name for name in names if not CIPHER_NAME.fullmatch(name)]
    if not names or bad:
        raise ValueError(f'"{bad[0] if bad else value}" is not a cipher name; allowed: OpenSSL '
                         "cipher names or families separated by colons, e.g. 3DES:aNULL")
    return names


def _parse_servername(value: str, level: Level, path: str | Path) -> str:
    name = value.lower()
    if name in ("hostname", "nexthop") or is_domain(name):
        return name
    raise ValueError("allowed: hostname, nexthop or a DNS name")


def _parse_connection_reuse(value: str, level: Level, path: str | Path) -> bool:
    if value.lower() not in ("yes", "no"):
        raise ValueError("allowed: yes or no")
    return value.lower() == "yes"


def _parse_ca_file(value: str, level: Level, path: str | Path) -> Path:
    if not value:
        raise ValueError("empty value; allowed: a PEM file of CA certificates")
    ca_file = Path(path).parent / value  # an absolute value stays as it is
    if not ca_file.is_file():
        raise ValueError(f"{ca_file} is not an existing file; allowed: a PEM file of CA certificates")
    return ca_file


def _parse_verify_depth(value: str, level: Level, path: str | Path) -> int:
    if not value.isdigit() or not 1 <= int(value) <= MAX_VERIFY_DEPTH:
        raise ValueError(f"allowed: an integer from 1 to {MAX_VERIFY_DEPTH}")
    return int(value)


_ATTRIBUTE_PARSERS = {
    "match": _parse_match,
    "ciphers": _parse_ciphers,
    "protocols": _parse_protocols,
    "exclude": _parse_exclude,
    "servername": _parse_servername,
    "connection_reuse": _parse_connection_reuse,
    "ca_file": _parse_ca_file,
    "verify_depth": _parse_verify_depth,
}


# --------------------------------------------------------------------------- writing back


def render_protocols(min_protocol: str, max_protocol: str) -> str:
    if max_protocol == PROTOCOLS[-1]:
        return f">={min_protocol}"
    if min_protocol == PROTOCOLS[0]:
        return f"<={max_protocol}"
    return f">={min_protocol}:<={max_protocol}"


def render_policy(policy: Policy) -> str:
    """A policy as the value of a Postfix table entry: `secure match=nexthop ...`."""
    words = [str(policy.level)]
    if policy.match:
        words.append(f"match={'|'.join(policy.match) if policy.level is Level.FINGERPRINT else ':'.join(policy.match)}")
    if policy.min_protocol is not None and policy.max_protocol is not None:
        words.append(f"protocols={render_protocols(policy.min_protocol, policy.max_protocol)}")
    if policy.ciphers is not None:
        words.append(f"ciphers={policy.ciphers}")
    if policy.exclude:
        words.append(f"exclude={':'.join(policy.exclude)}")
    if policy.servername != "hostname":
        words.append(f"servername={policy.servername}")
    if not policy.connection_reuse:
        words.append("connection_reuse=no")
    if policy.ca_file is not None:
        words.append(f"ca_file={policy.ca_file}")
    if policy.verify_depth is not None:
        words.append(f"verify_depth={policy.verify_depth}")
    return " ".join(words)


def describe_decision(decision: PolicyDecision, outbound: OutboundConfig) -> list[str]:
    """`name: value` lines for `smtproxy policy`: the level, every attribute with what it
    falls back to from the configuration, and the source."""
    policy, tls = decision.policy, outbound.tls
    if policy.min_protocol is None or policy.max_protocol is None:
        protocols = f"{tls.min_protocol} to {tls.max_protocol} (from [outbound.tls])"
    else:
        protocols = (f"{policy.min_protocol} to {policy.max_protocol} "
                     f"(protocols={render_protocols(policy.min_protocol, policy.max_protocol)})")
    if policy.match:
        match = ("|" if policy.level is Level.FINGERPRINT else ":").join(policy.match)
    elif policy.level in DEFAULT_MATCH:
        match = f"{':'.join(DEFAULT_MATCH[policy.level])} (the default for {policy.level})"
    else:
        match = "(none: this level checks no name)"
    configured_ciphers = (f'"{tls.ciphers}" (from [outbound.tls] ciphers)' if tls.ciphers
                          else f"{DEFAULT_CIPHER_GRADE} ([outbound.tls] ciphers is empty)")
    configured_ca = (f"{outbound.ca_file} (from [outbound] ca_file)" if outbound.ca_file
                     else "the system trust store ([outbound] ca_file is empty)")
    return [
        f"level: {policy.level}",
        f"match: {match}",
        f"protocols: {protocols}",
        f"ciphers: {policy.ciphers or configured_ciphers}",
        f"exclude: {':'.join(policy.exclude) or '(none)'}",
        f"servername: {policy.servername}",
        f"connection_reuse: {'yes' if policy.connection_reuse else 'no'}",
        f"ca_file: {policy.ca_file or configured_ca}",
        f"verify_depth: {policy.verify_depth or 'the TLS library default'}",
        f"source: {decision.source}",
    ]
