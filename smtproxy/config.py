"""Configuration: one TOML file -> frozen dataclasses; errors name the key, the value and
what is allowed, in one line.

Every TOML key is a dataclass field of the same name. The field's metadata holds a `Kind`
that parses and checks the TOML value and turns the Python value back into TOML, so the
schema of a section is just its dataclass. Rules that involve several keys live in each
section's `_validate` method. `render_config` writes the effective configuration (every
key, defaults filled in) as TOML that `load_config` reads back to an equal `Config`.

The reference for operators is docs/configuration.md; a unit test keeps it in step with
the dataclasses below.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import math
import re
import socket as _socket
import ssl
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Address",
    "CertificateConfig",
    "Config",
    "ConfigError",
    "DnsConfig",
    "InboundConfig",
    "InboundTlsConfig",
    "LogConfig",
    "MetricsConfig",
    "OutboundConfig",
    "OutboundTlsConfig",
    "TlsrptConfig",
    "default_hostname",
    "load_config",
    "parse_address",
    "parse_config",
    "render_config",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

INBOUND_LEVELS = ("none", "may", "encrypt")
OUTBOUND_LEVELS = ("none", "may", "encrypt", "fingerprint", "verify", "secure", "dane", "dane-only")
CLIENT_IDENTITIES = ("none", "xclient", "proxy-v1", "proxy-v2", "received-header")
PROTOCOLS = ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")  # oldest first
GROUPS = ("X25519", "X448", "P-256", "P-384", "P-521",
          "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192")

MAX_SECONDS = 86400.0
MAX_INT = 2**31 - 1  # what OpenSSL's and the event loop's C integers hold everywhere


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """A configuration problem, as one line naming the key, the value and what is allowed.

    `key` is dotted (``inbound.certificates[0].cert_file``; "" for a file that is not
    TOML at all), `value` the offending value (None when there is none), `allowed` a
    description of what would be accepted.
    """

    def __init__(self, key: str, value: Any = None, allowed: str = "", *,
                 problem: str | None = None, message: str | None = None) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        if message is None:
            head = key if value is None else f"{key} = {_show(value)}"
            message = f"{head}: {problem}; allowed: {allowed}" if problem else f"{head}: allowed: {allowed}"
        super().__init__(" ".join(message.splitlines()))


def _show(value: Any, limit: int = 200) -> str:
    """A value as it would be written in TOML, cut short for an error line."""
    text = _toml_value(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_key(key: str, value: Any, allowed_keys: list[str]) -> ConfigError:
    allowed = ", ".join(allowed_keys)
    return ConfigError(key, value, allowed, message=f"{key}: unknown key; allowed keys: {allowed}")


# --------------------------------------------------------------------------- addresses


@dataclasses.dataclass(frozen=True)
class Address:
    """A TCP endpoint: a host name or IP address (IPv6 without brackets) and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


ADDRESS_ALLOWED = "host:port or [IPv6]:port, host a name or an IP address, port 1 to 65535"

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def _is_host_name(text: str) -> bool:
    if len(text) > 253 or not _DNS_NAME.fullmatch(text):
        return False
    # "192.0.2.300" matches the label syntax but is neither a name nor an address
    return not text.rstrip(".").rsplit(".", 1)[-1].isdigit()


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def parse_address(text: Any, key: str) -> Address:
    """`host:port` or `[IPv6]:port` -> Address; anything else raises ConfigError naming `key`."""
    if not isinstance(text, str):
        raise ConfigError(key, text, ADDRESS_ALLOWED)
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        ok = bool(bracket) and rest.startswith(":")
        if ok:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                ok = False
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        ok = bool(colon) and ":" not in host and (_is_ipv4(host) or _is_host_name(host))
    if not ok or not re.fullmatch(r"[0-9]{1,5}", port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(key, text, ADDRESS_ALLOWED)
    return Address(host, int(port_text))


# --------------------------------------------------------------------------- kinds of values


@dataclasses.dataclass(frozen=True)
class _Context:
    base_dir: Path
    check_files: bool


class Kind:
    """How one key is read from TOML, checked, and written back."""

    allowed = ""
    required = False  # the key must be present (no default)

    def parse(self, value: Any, key: str, ctx: _Context) -> Any:
        raise NotImplementedError

    def dump(self, value: Any) -> Any:
        """The Python value -> a value `_toml_value` can write."""
        return value

    def fail(self, key: str, value: Any, allowed: str | None = None) -> ConfigError:
        return ConfigError(key, value, self.allowed if allowed is None else allowed)


class Choice(Kind):
    def __init__(self, options: tuple[str, ...]) -> None:
        self.options = options
        self.allowed = ", ".join(options)

    def parse(self, value, key, ctx):
        if isinstance(value, str) and value in self.options:
            return value
        raise self.fail(key, value)


class Flag(Kind):
    allowed = "true or false"

    def parse(self, value, key, ctx):
        if isinstance(value, bool):
            return value
        raise self.fail(key, value)


class Integer(Kind):
    def __init__(self, minimum: int, maximum: int | None = None, zero: str | None = None) -> None:
        self.minimum, self.zero = minimum, zero
        self.maximum = MAX_INT if maximum is None else maximum
        if maximum is not None:
            self.allowed = f"an integer from {minimum} to {maximum}"
        else:
            self.allowed = f"an integer ≥ {minimum}"
        if zero:
            self.allowed = f"0 ({zero}) or {self.allowed}"

    def parse(self, value, key, ctx):
        if type(value) is int:  # not bool, not float
            if value == 0 and self.zero or self.minimum <= value <= self.maximum:
                return value
            if value > self.maximum:
                raise self.fail(key, value, f"{self.allowed} and ≤ {self.maximum}" if "≥" in self.allowed
                                else self.allowed)
        raise self.fail(key, value)


class Seconds(Kind):
    def __init__(self, zero: str | None = None) -> None:
        self.zero = zero
        self.allowed = f"a number of seconds > 0 and ≤ {MAX_SECONDS:g}"
        if zero:
            self.allowed = f"0 ({zero}) or {self.allowed}"

    def parse(self, value, key, ctx):
        if type(value) in (int, float) and math.isfinite(value) and (0 < value or value == 0 and self.zero) \
                and value <= MAX_SECONDS:
            return float(value)
        raise self.fail(key, value)

    def dump(self, value):
        return int(value) if float(value).is_integer() else value


class HostName(Kind):
    allowed = "a host name like mx.example.com (letters, digits, '-' and '.')"

    def parse(self, value, key, ctx):
        if isinstance(value, str) and _is_host_name(value) and not value.endswith("."):
            return value
        raise self.fail(key, value)


class Ciphers(Kind):
    allowed = ('an OpenSSL cipher list for TLS 1.2 and older that selects at least one cipher '
               '(see "openssl ciphers"), or "" for the library default')

    def parse(self, value, key, ctx):
        if not isinstance(value, str):
            raise self.fail(key, value)
        if value:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).set_ciphers(value)
            except (ssl.SSLError, ValueError):
                raise self.fail(key, value) from None
        return value


class FilePath(Kind):
    """A file name; relative names resolve against the config file's directory.

    `optional`: "" means None. `must_exist`: checked when files are checked at all
    (certificate files are checked by their section, which knows about
    self_signed_if_missing)."""

    def __init__(self, *, optional: bool, must_exist: bool, what: str = "a file path") -> None:
        self.optional, self.must_exist = optional, must_exist
        self.required = not optional
        self.allowed = f'{what}, or "" for none' if optional else what

    def parse(self, value, key, ctx):
        if not isinstance(value, str) or "\0" in value or (value == "" and not self.optional):
            raise self.fail(key, value)
        if value == "":
            return None
        path = _resolve(value, ctx.base_dir)
        if self.must_exist and ctx.check_files:
            _check_file(path, key, self.allowed.replace("a file path", "an existing file"))
        return path

    def dump(self, value):
        return "" if value is None else str(value)


def _resolve(text: str, base_dir: Path) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base_dir / path


def _check_file(path: Path, key: str, allowed: str) -> None:
    if not path.exists():
        raise ConfigError(key, str(path), allowed, problem="file does not exist")
    if not path.is_file():
        raise ConfigError(key, str(path), allowed, problem="not a regular file")


class SocketPath(Kind):
    allowed = 'a Unix socket path, or "" for off'

    def parse(self, value, key, ctx):
        if not isinstance(value, str) or "\0" in value:
            raise self.fail(key, value)
        return str(_resolve(value, ctx.base_dir)) if value else ""


class AddressKind(Kind):
    allowed = ADDRESS_ALLOWED

    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional
        if optional:
            self.allowed = f'{ADDRESS_ALLOWED}; or "" for off'

    def parse(self, value, key, ctx):
        if self.optional and value == "":
            return None
        if not isinstance(value, str):
            raise self.fail(key, value)
        try:
            return parse_address(value, key)
        except ConfigError:
            raise self.fail(key, value) from None

    def dump(self, value):
        return "" if value is None else str(value)


class ListOf(Kind):
    """A TOML array of strings, each checked (and normalised) by `item`."""

    def __init__(self, item: Callable[[str], Any], item_allowed: str, what: str,
                 dump_item: Callable[[Any], Any] = lambda item: item) -> None:
        self.item, self.item_allowed, self.dump_item = item, item_allowed, dump_item
        self.allowed = f"a list of {what}"

    def parse(self, value, key, ctx):
        if not isinstance(value, list):
            raise self.fail(key, value)
        items = []
        for index, element in enumerate(value):
            result = self.item(element) if isinstance(element, str) else None
            if result is None:
                raise ConfigError(f"{key}[{index}]", element, self.item_allowed)
            if result in items:
                raise ConfigError(f"{key}[{index}]", element, f"{self.item_allowed}; each only once")
            items.append(result)
        return tuple(items)

    def dump(self, value):
        return [self.dump_item(item) for item in value]


def _address_or_none(text: str) -> Address | None:
    try:
        return parse_address(text, "")
    except ConfigError:
        return None


def _group_or_none(text: str) -> str | None:
    return text if text in GROUPS else None


def _fingerprint_or_none(text: str) -> str | None:
    """SHA-256 digest, plain hex or colon-separated pairs, any case -> "AB:CD:...", upper case."""
    if re.fullmatch(r"[0-9A-Fa-f]{64}", text):
        digits = text
    elif re.fullmatch(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){31}", text):
        digits = text.replace(":", "")
    else:
        return None
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2)).upper()


def _server_name_or_none(text: str) -> str | None:
    name = text.lower()
    rest = name[2:] if name.startswith("*.") else name
    if _is_host_name(rest) and not rest.endswith(".") and ("." in rest or rest == name):
        return name
    return None


def _nameserver_or_none(text: str) -> str | None:
    """An IP address, optionally with a port: 192.0.2.53, 2001:db8::53, [2001:db8::53]:5353."""
    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    address = _address_or_none(text)
    if address is None:
        return None
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return None
    return text


class Networks(Kind):
    """A TOML table `{ "192.0.2.0/24" = "encrypt", ... }` -> ((network, level), ...),
    most specific network first."""

    network_allowed = "a network like 192.0.2.0/24 or 2001:db8::/32 (no host bits set) as the key"

    def __init__(self, levels: tuple[str, ...]) -> None:
        self.levels = levels
        self.allowed = 'a table of network = level, like { "192.0.2.0/24" = "encrypt" }'

    def parse(self, value, key, ctx):
        if not isinstance(value, dict):
            raise self.fail(key, value)
        seen: dict[Network, str] = {}
        result: list[tuple[Network, str]] = []
        for text, level in value.items():
            sub = _join(key, text)
            network = _network_or_none(text)
            if network is None:
                raise ConfigError(sub, text, self.network_allowed,
                                  message=f"{sub}: not a network; allowed: {self.network_allowed}")
            if network in seen:
                raise ConfigError(sub, text, "each network only once", message=(
                    f"{sub}: the same network as {_join(key, seen[network])}; allowed: each network only once"))
            seen[network] = text
            if not (isinstance(level, str) and level in self.levels):
                raise ConfigError(sub, level, ", ".join(self.levels))
            result.append((network, level))
        result.sort(key=lambda item: (-item[0].prefixlen, item[0].version, int(item[0].network_address)))
        return tuple(result)

    def dump(self, value):
        return {str(network): level for network, level in value}


def _network_or_none(text: str) -> Network | None:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return None
    # ::ffff:192.0.2.0/120 is 192.0.2.0/24: store it as IPv4 so that it sorts and matches as such
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(mapped):
        v4 = network.network_address.ipv4_mapped
        return ipaddress.IPv4Network(f"{v4}/{network.prefixlen - 96}")
    return network


class Table(Kind):
    """A TOML table parsed into the dataclass `cls`."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def parse(self, value, key, ctx):
        return _parse_table(self.cls, value, key, ctx)


class TableArray(Kind):
    """An array of tables (`[[inbound.certificates]]`), each parsed into `cls`."""

    def __init__(self, cls: type) -> None:
        self.cls = cls

    def parse(self, value, key, ctx):
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise self.fail(key, value, f"an array of tables ([[{key}]])")
        return tuple(_parse_table(self.cls, item, f"{key}[{index}]", ctx) for index, item in enumerate(value))


def _key(kind: Kind, default: Any = dataclasses.MISSING, *,
         default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is a TOML key parsed by `kind`."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"kind": kind})


@functools.lru_cache(maxsize=1)
def default_hostname() -> str:
    """This host's fully qualified name (what Postfix calls myhostname)."""
    name = _socket.getfqdn()
    return name if _is_host_name(name) and not name.endswith(".") else "localhost.localdomain"


# --------------------------------------------------------------------------- sections


def _check_protocol_range(key: str, min_protocol: str, max_protocol: str) -> None:
    if PROTOCOLS.index(min_protocol) > PROTOCOLS.index(max_protocol):
        allowed = ", ".join(PROTOCOLS[: PROTOCOLS.index(max_protocol) + 1])
        raise ConfigError(f"{key}.min_protocol", min_protocol,
                          f'{allowed} (not newer than {key}.max_protocol = "{max_protocol}")')


@dataclasses.dataclass(frozen=True)
class CertificateConfig:
    """One `[[inbound.certificates]]` chain (RSA and ECDSA chains may sit side by side)."""

    cert_file: Path = _key(FilePath(optional=False, must_exist=False, what="a PEM certificate chain file"))
    key_file: Path = _key(FilePath(optional=False, must_exist=False, what="a PEM private key file"))
    server_names: tuple[str, ...] = _key(ListOf(
        _server_name_or_none, "a DNS name like mx.example.com or *.example.com",
        "DNS names (empty: the default chain)"), ())
    self_signed_if_missing: bool = _key(Flag(), False)

    def _validate(self, key: str, ctx: _Context) -> None:
        if not ctx.check_files:
            return
        missing = [name for name in ("cert_file", "key_file") if not getattr(self, name).exists()]
        if self.self_signed_if_missing and len(missing) == 2:
            return  # generated on start
        for name in ("cert_file", "key_file"):
            if self.self_signed_if_missing:
                allowed = ("an existing file; self_signed_if_missing generates a certificate "
                           "only when both cert_file and key_file are missing")
            else:
                allowed = "an existing file (or self_signed_if_missing = true to generate one)"
            _check_file(getattr(self, name), f"{key}.{name}", allowed)


def certificate_problem(config: Config) -> str | None:
    """The first inbound chain OpenSSL cannot load (garbage, or a key that is not the
    certificate's), as one line naming the entry and both files; None: all load. Run where
    the files are about to be used: at start after generating missing ones, and by `check`."""
    for index, chain in enumerate(config.inbound.certificates):
        if chain.self_signed_if_missing and not chain.cert_file.exists() and not chain.key_file.exists():
            continue  # generated on start
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain.cert_file, chain.key_file)
        except (OSError, ssl.SSLError) as exc:
            reason = re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc))
            return str(ConfigError(
                f"inbound.certificates[{index}].cert_file", str(chain.cert_file),
                f"a PEM certificate chain whose first certificate matches the PEM private key in key_file "
                f"({chain.key_file})", problem=f"cannot load it: {reason}"))
    return None


@dataclasses.dataclass(frozen=True)
class InboundTlsConfig:
    """`[inbound.tls]`: the server side of STARTTLS and implicit TLS."""

    min_protocol: str = _key(Choice(PROTOCOLS), "TLSv1.2")
    max_protocol: str = _key(Choice(PROTOCOLS), "TLSv1.3")
    ciphers: str = _key(Ciphers(), "")
    groups: tuple[str, ...] = _key(ListOf(_group_or_none, ", ".join(GROUPS), "key-exchange groups"), ())
    dh_param_file: Path | None = _key(FilePath(
        optional=True, must_exist=True, what="a file path (PEM DH parameters)"), None)
    client_certificate: str = _key(Choice(("none", "ask", "require")), "none")
    client_ca_file: Path | None = _key(FilePath(optional=True, must_exist=True), None)
    client_fingerprints: tuple[str, ...] = _key(ListOf(
        _fingerprint_or_none,
        "a SHA-256 fingerprint: 64 hex digits, plain or as colon-separated pairs (AB:CD:...)",
        "SHA-256 fingerprints"), ())
    session_cache_size: int = _key(Integer(0), 20480)
    session_timeout: int = _key(Integer(1), 3600)
    session_tickets: bool = _key(Flag(), True)

    def _validate(self, key: str, ctx: _Context) -> None:
        _check_protocol_range(key, self.min_protocol, self.max_protocol)
        if self.client_certificate == "require" and self.client_ca_file is None and not self.client_fingerprints:
            raise ConfigError(f"{key}.client_certificate", "require",
                              f"none, ask (require needs {key}.client_ca_file or {key}.client_fingerprints)")


def client_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address as matched against configured networks: without a zone index,
    IPv4-mapped IPv6 (::ffff:192.0.2.7) as IPv4; None if it does not parse."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclasses.dataclass(frozen=True)
class InboundConfig:
    """`[inbound]`: internet -> smtproxy (TLS terminated here) -> the legacy MTA."""

    listen: tuple[Address, ...] = _key(
        ListOf(_address_or_none, ADDRESS_ALLOWED, "host:port addresses", str), (Address("0.0.0.0", 25),))
    implicit_tls_listen: tuple[Address, ...] = _key(
        ListOf(_address_or_none, ADDRESS_ALLOWED, "host:port addresses", str), (Address("0.0.0.0", 465),))
    backend: Address = _key(AddressKind(), Address("127.0.0.1", 2525))
    hostname: str = _key(HostName(), default_factory=default_hostname)
    security_level: str = _key(Choice(INBOUND_LEVELS), "may")
    security_level_networks: tuple[tuple[Network, str], ...] = _key(Networks(INBOUND_LEVELS), ())
    client_identity: str = _key(Choice(CLIENT_IDENTITIES), "received-header")
    auth_only_after_tls: bool = _key(Flag(), True)
    bare_newline: str = _key(Choice(("reject", "normalize")), "reject")
    idle_timeout: float = _key(Seconds(), 300.0)
    handshake_timeout: float = _key(Seconds(), 60.0)
    backend_connect_timeout: float = _key(Seconds(), 10.0)
    backend_timeout: float = _key(Seconds(), 300.0)
    backend_data_done_timeout: float = _key(Seconds(), 600.0)
    drain_timeout: float = _key(Seconds(), 30.0)
    max_connections: int = _key(Integer(1), 1000)
    max_connections_per_client: int = _key(Integer(1, zero="unlimited"), 50)
    max_message_size: int = _key(Integer(1), 10240000)
    max_command_line: int = _key(Integer(512), 2048)
    max_reply_line: int = _key(Integer(512), 2048)
    max_text_line: int = _key(Integer(1000, zero="no limit"), 0)
    max_errors: int = _key(Integer(1), 20)
    certificates: tuple[CertificateConfig, ...] = _key(TableArray(CertificateConfig), ())
    tls: InboundTlsConfig = _key(Table(InboundTlsConfig), default_factory=InboundTlsConfig)

    def level_for(self, ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
        """The security level for a client address: the most specific matching network in
        `security_level_networks`, else `security_level`. IPv4-mapped IPv6 addresses
        (::ffff:192.0.2.7) match IPv4 networks; an unparsable address gets the default."""
        address = client_address(str(ip))
        if address is None:
            return self.security_level
        for network, level in self.security_level_networks:
            if network.version == address.version and address in network:
                return level
        return self.security_level

    def _validate(self, key: str, ctx: _Context) -> None:
        used: dict[Address, str] = {}
        for name in ("listen", "implicit_tls_listen"):
            for index, address in enumerate(getattr(self, name)):
                where = f"{key}.{name}[{index}]"
                if address in used:
                    raise ConfigError(where, str(address), f"an address not already used by {used[address]}")
                used[address] = where
        if self.certificates or not used:
            return
        reason = None
        if self.listen and self.security_level != "none":
            reason = f'{key}.security_level = "{self.security_level}"'
        elif self.listen:
            for network, level in self.security_level_networks:
                if level != "none":
                    reason = f'{_join(key + ".security_level_networks", str(network))} = "{level}"'
                    break
        if reason is None and self.implicit_tls_listen:
            reason = f"{key}.implicit_tls_listen is not empty"
        if reason:
            raise ConfigError(f"{key}.certificates", [],
                              f"at least one [[{key}.certificates]] table, because {reason}")


SENDER_DOMAIN_ALLOWED = "a sender domain like example.com, or .example.com for its subdomains"
DOMAINCERTS_FORM = ("domain:certificate|keyfile|password per line, .domain for subdomains, * for other "
                    "senders (s/qmail control/domaincerts)")


def _required(kind: Kind) -> Kind:
    kind.required = True
    return kind


def _sender_domain_or_none(text: str) -> str | None:
    name = text.lower()
    rest = name[1:] if name.startswith(".") else name
    return name if _is_host_name(rest) and not rest.endswith(".") else None


@dataclasses.dataclass(frozen=True)
class SenderCertificateConfig:
    """One `[[outbound.tls.sender_certificates]]`: the client certificate presented for mail
    from these envelope sender domains."""

    sender_domains: tuple[str, ...] = _key(_required(
        ListOf(_sender_domain_or_none, SENDER_DOMAIN_ALLOWED, "sender domains")))
    cert_file: Path = _key(FilePath(optional=False, must_exist=True, what="a file path (PEM certificate chain)"))
    key_file: Path | None = _key(FilePath(optional=True, must_exist=True, what="a file path (PEM private key)"), None)

    def _validate(self, key: str, ctx: _Context) -> None:
        if not self.sender_domains:
            raise ConfigError(f"{key}.sender_domains", [], "a list of one or more sender domains "
                                                           "(example.com, or .example.com for its subdomains)")


@dataclasses.dataclass(frozen=True)
class DomainCert:
    """One line of an s/qmail `control/domaincerts` file (`load_domaincerts`)."""

    domain: str  # lower case: example.com, .example.com, or * (every other sender)
    cert_file: Path
    key_file: Path | None  # None: the key is in cert_file
    password: str | None = dataclasses.field(repr=False)
    line: int


def load_domaincerts(path: Path, key: str = "outbound.tls.domaincerts_file") -> tuple[DomainCert, ...]:
    """s/qmail's qmail-remote(8) `domaincerts`: `domain:certificate|keyfile|password`, keyfile
    and password optional; ConfigError (one line, naming the line) on any problem.  The
    password is never shown in an error."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(key, str(path), "a readable file", problem=f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(key, str(path), "UTF-8 text", problem=f"not UTF-8 (byte {exc.start})") from None
    entries: list[DomainCert] = []
    first: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        domain_text, colon, info = line.partition(":")

        def fail(problem: str, allowed: str = DOMAINCERTS_FORM) -> ConfigError:
            return ConfigError(key, str(path), allowed, problem=f"line {number} ({domain_text}): {problem}")

        if not colon:
            raise fail("no colon")
        domain = "*" if domain_text == "*" else _sender_domain_or_none(domain_text)
        if domain is None:
            raise fail("not a sender domain", f"{SENDER_DOMAIN_ALLOWED}, or *")
        if domain in first:
            raise fail(f"already given on line {first[domain]}", "each sender domain once")
        cert_text, _, rest = info.partition("|")
        key_text, _, password = rest.partition("|")
        cert_file = _domaincerts_path(cert_text, "certificate", fail)
        key_file = _domaincerts_path(key_text, "keyfile", fail) if key_text else None
        first[domain] = number
        entries.append(DomainCert(domain, cert_file, key_file, password or None, number))
    return tuple(entries)


def _domaincerts_path(name: str, what: str, fail: Callable[..., ConfigError]) -> Path:
    if not name.startswith("/"):
        raise fail(f'{what} "{name}" is not an absolute file name',
                   "absolute file names (s/qmail reads relative names from its home directory)")
    if not Path(name).is_file():
        raise fail(f'{what} "{name}" is not an existing file', "existing files")
    return Path(name)


@dataclasses.dataclass(frozen=True)
class OutboundTlsConfig:
    """`[outbound.tls]`: the client side of outbound STARTTLS."""

    min_protocol: str = _key(Choice(PROTOCOLS), "TLSv1.2")
    max_protocol: str = _key(Choice(PROTOCOLS), "TLSv1.3")
    ciphers: str = _key(Ciphers(), "")
    client_cert_file: Path | None = _key(FilePath(optional=True, must_exist=True), None)
    client_key_file: Path | None = _key(FilePath(optional=True, must_exist=True), None)
    domaincerts_file: Path | None = _key(FilePath(
        optional=True, must_exist=True, what="a file path (s/qmail control/domaincerts syntax)"), None)
    session_cache_timeout: int = _key(Integer(0, zero="no session cache"), 3600)
    sender_certificates: tuple[SenderCertificateConfig, ...] = _key(TableArray(SenderCertificateConfig), ())

    def _validate(self, key: str, ctx: _Context) -> None:
        _check_protocol_range(key, self.min_protocol, self.max_protocol)
        for name, other in (("client_cert_file", "client_key_file"), ("client_key_file", "client_cert_file")):
            if getattr(self, name) is None and getattr(self, other) is not None:
                raise ConfigError(f"{key}.{name}", "", f"a file path, because {key}.{other} is set")
        where: dict[str, str] = {}
        for index, entry in enumerate(self.sender_certificates):
            for position, domain in enumerate(entry.sender_domains):
                here = f"{key}.sender_certificates[{index}].sender_domains[{position}]"
                if domain in where:
                    raise ConfigError(here, domain, f"each sender domain once (already in {where[domain]})")
                where[domain] = here
        if self.domaincerts_file is None or not ctx.check_files:
            return
        for line in load_domaincerts(self.domaincerts_file, f"{key}.domaincerts_file"):
            problem = None
            if line.domain == "*" and self.client_cert_file is not None:
                problem, allowed = "* names a default certificate", f"no * line while {key}.client_cert_file is set"
            elif line.domain in where:
                problem, allowed = f"{line.domain} is already in {where[line.domain]}", "each sender domain once"
            if problem:
                raise ConfigError(f"{key}.domaincerts_file", str(self.domaincerts_file), allowed,
                                  problem=f"line {line.line} ({line.domain}): {problem}")


# Who may hand mail to the outbound listener (Postfix's mynetworks): loopback and the
# private ranges a sidecar's MTA comes from; anything else would make it an open relay.
DEFAULT_CLIENT_NETWORKS = tuple(ipaddress.ip_network(text) for text in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7"))


@dataclasses.dataclass(frozen=True)
class OutboundConfig:
    """`[outbound]`: legacy MTA -> smtproxy -> remote MX with STARTTLS per policy."""

    listen: tuple[Address, ...] = _key(
        ListOf(_address_or_none, ADDRESS_ALLOWED, "host:port addresses", str), (Address("127.0.0.1", 10025),))
    mode: str = _key(Choice(("relay", "transparent")), "relay")
    client_networks: tuple[Network, ...] = _key(ListOf(
        _network_or_none, "a network in CIDR notation: 127.0.0.0/8, 10.0.0.0/8, ::1/128",
        "networks (empty: any client)", str), DEFAULT_CLIENT_NETWORKS)
    default_level: str = _key(Choice(OUTBOUND_LEVELS), "may")
    policy_file: Path | None = _key(FilePath(
        optional=True, must_exist=True, what="a file path (Postfix smtp_tls_policy_maps syntax)"), None)
    routes_file: Path | None = _key(FilePath(
        optional=True, must_exist=True, what="a file path (Postfix transport syntax)"), None)
    ca_file: Path | None = _key(FilePath(
        optional=True, must_exist=True, what="a file path (PEM CA certificates)"), None)
    port: int = _key(Integer(1, 65535), 25)
    mx_address_limit: int = _key(Integer(0, zero="unlimited"), 5)
    plaintext_fallback_delay: float = _key(Seconds(zero="at once"), 300.0)
    hostname: str = _key(HostName(), default_factory=default_hostname)
    bare_newline: str = _key(Choice(("reject", "normalize")), "normalize")
    idle_timeout: float = _key(Seconds(), 300.0)
    connect_timeout: float = _key(Seconds(), 30.0)
    handshake_timeout: float = _key(Seconds(), 60.0)
    reply_timeout: float = _key(Seconds(), 300.0)
    data_done_timeout: float = _key(Seconds(), 600.0)
    drain_timeout: float = _key(Seconds(), 30.0)
    max_connections: int = _key(Integer(1), 100)
    max_message_size: int = _key(Integer(1), 10240000)
    max_errors: int = _key(Integer(1), 20)
    connection_cache_time_limit: float = _key(Seconds(), 2.0)
    connection_reuse_time_limit: float = _key(Seconds(), 300.0)
    connection_reuse_count_limit: int = _key(Integer(0, zero="unlimited"), 0)
    connection_cache_size: int = _key(Integer(0, zero="no connection cache"), 100)
    connection_cache_destination_size: int = _key(Integer(1), 10)
    tls: OutboundTlsConfig = _key(Table(OutboundTlsConfig), default_factory=OutboundTlsConfig)

    def client_allowed(self, ip: str) -> bool:
        """Whether a client address is in `client_networks` (IPv4-mapped IPv6 as IPv4)."""
        if not self.client_networks:
            return True
        address = client_address(ip)
        if address is None:
            return False
        return any(address.version == network.version and address in network for network in self.client_networks)

    def _validate(self, key: str, ctx: _Context) -> None:
        for index, address in enumerate(self.listen):
            if address in self.listen[:index]:
                raise ConfigError(f"{key}.listen[{index}]", str(address), "each address only once")


@dataclasses.dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[str, ...] = _key(ListOf(
        _nameserver_or_none, "an IP address, optionally with a port: 192.0.2.53, 127.0.0.1:5353, [2001:db8::53]:53",
        "IP addresses (empty: /etc/resolv.conf)"), ())
    timeout: float = _key(Seconds(), 5.0)
    # trust the nameservers' AD bit (DANE); Postfix's smtp_dns_support_level = dnssec
    dnssec: bool = _key(Flag(), False)


@dataclasses.dataclass(frozen=True)
class MtaStsConfig:
    enabled: bool = _key(Flag(), True)
    # policies survive restarts and are shared by workers there; "": in memory only
    cache_file: Path | None = _key(FilePath(optional=True, must_exist=False, what="a SQLite file path"), None)
    fetch_timeout: float = _key(Seconds(), 30.0)


@dataclasses.dataclass(frozen=True)
class TlsrptConfig:
    socket: str = _key(SocketPath(), "/run/tlsrpt/collectd.sock")
    skip_reused_handshakes: bool = _key(Flag(), True)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    listen: Address | None = _key(AddressKind(optional=True), Address("0.0.0.0", 9464))


@dataclasses.dataclass(frozen=True)
class LogConfig:
    format: str = _key(Choice(("json", "console")), "json")
    level: str = _key(Choice(("debug", "info", "warning", "error")), "info")


@dataclasses.dataclass(frozen=True)
class Config:
    inbound: InboundConfig = _key(Table(InboundConfig), default_factory=InboundConfig)
    outbound: OutboundConfig = _key(Table(OutboundConfig), default_factory=OutboundConfig)
    dns: DnsConfig = _key(Table(DnsConfig), default_factory=DnsConfig)
    mta_sts: MtaStsConfig = _key(Table(MtaStsConfig), default_factory=MtaStsConfig)
    tlsrpt: TlsrptConfig = _key(Table(TlsrptConfig), default_factory=TlsrptConfig)
    metrics: MetricsConfig = _key(Table(MetricsConfig), default_factory=MetricsConfig)
    log: LogConfig = _key(Table(LogConfig), default_factory=LogConfig)
    source: Path | None = None  # the file it was loaded from; not a TOML key


# --------------------------------------------------------------------------- parsing


def _toml_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if "kind" in f.metadata}


def _join(prefix: str, name: str) -> str:
    name = _toml_key(name)
    return f"{prefix}.{name}" if prefix else name


def _parse_table(cls: type, data: Any, key: str, ctx: _Context) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(key, data, f"a table ([{key}])")
    fields = _toml_fields(cls)
    for name, value in data.items():
        if name not in fields:
            raise _unknown_key(_join(key, name), value, list(fields))
    values = {}
    for name, field in fields.items():
        kind: Kind = field.metadata["kind"]
        if name in data:
            values[name] = kind.parse(data[name], _join(key, name), ctx)
        elif isinstance(kind, Table):  # an absent section still gets its cross-key checks
            values[name] = kind.parse({}, _join(key, name), ctx)
        elif kind.required:
            raise ConfigError(_join(key, name), None, kind.allowed, problem="required key is missing")
    result = cls(**values)
    validate = getattr(result, "_validate", None)
    if validate is not None:
        validate(key, ctx)
    return result


def parse_config(data: Mapping[str, Any], base_dir: str | Path, *,
                 source: Path | None = None, check_files: bool = True) -> Config:
    """A `Config` from parsed TOML. Relative file names resolve against `base_dir`.

    `check_files=False` skips the checks that named files exist (for tests that only
    need the values)."""
    ctx = _Context(Path(base_dir).absolute(), check_files)
    config = _parse_table(Config, dict(data), "", ctx)
    return dataclasses.replace(config, source=source)


def load_config(path: str | Path) -> Config:
    """Read and check a TOML config file; ConfigError (one line) on any problem."""
    given = Path(path).absolute()
    # the directory's real location ("..", symlinked directories); the file name as given,
    # so that a symlinked config file (Kubernetes ConfigMap) is read through its link
    path = given.parent.resolve() / given.name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", message=f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError("", message=f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", message=f"{path}: TOML syntax error: {exc}") from None
    return parse_config(data, path.parent, source=path)


# --------------------------------------------------------------------------- rendering


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else _toml_string(name)


def _toml_string(text: str) -> str:
    escapes = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
    out = []
    for char in text:
        if char in escapes:
            out.append(escapes[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (str, Path, Address)):
        return _toml_string(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    return _toml_string(str(value))


def _render_table(obj: Any, header: str | None, lines: list[str]) -> None:
    if header is not None:
        lines.append(header)
    nested = []
    for name, field in _toml_fields(type(obj)).items():
        kind, value = field.metadata["kind"], getattr(obj, name)
        if isinstance(kind, (Table, TableArray)):
            nested.append((name, kind, value))
        else:
            lines.append(f"{_toml_key(name)} = {_toml_value(kind.dump(value))}")
    prefix = header.strip("[]") + "." if header else ""
    for name, kind, value in nested:
        if isinstance(kind, Table):
            lines.append("")
            _render_table(value, f"[{prefix}{name}]", lines)
        elif not value:
            lines.extend(["", f"# no [[{prefix}{name}]]"])
        for item in value if isinstance(kind, TableArray) else ():
            lines.append("")
            _render_table(item, f"[[{prefix}{name}]]", lines)


def render_config(cfg: Config) -> str:
    """The effective configuration, every key with its value, as TOML that
    `load_config` reads back to an equal Config (file names are absolute)."""
    lines = ["# smtproxy effective configuration" + (f" (from {cfg.source})" if cfg.source else "")]
    _render_table(cfg, None, lines)
    return "\n".join(lines) + "\n"
