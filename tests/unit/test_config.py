"""smtproxy.config: defaults, every validation rule with its exact one-line message,
unknown keys, per-network levels, fingerprints, paths, render/load round trip, and that
the example file and docs/configuration.md agree with the code."""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from smtproxy.config import (
    Address,
    CertificateConfig,
    Config,
    ConfigError,
    DnsConfig,
    InboundConfig,
    InboundTlsConfig,
    LogConfig,
    MetricsConfig,
    MtaStsConfig,
    OutboundConfig,
    OutboundTlsConfig,
    SenderCertificateConfig,
    TlsrptConfig,
    default_hostname,
    load_config,
    load_domaincerts,
    parse_address,
    parse_config,
    render_config,
)

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "smtproxy.toml"
DOCS = REPO / "docs" / "configuration.md"
BASE = Path("/nonexistent/etc/smtproxy")

# A certificate entry that needs no files: both are missing and may be generated.
SELF_SIGNED = {"cert_file": "certs/a.pem", "key_file": "certs/a.key", "self_signed_if_missing": True}


def with_cert(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """`data` plus one self-signed certificate entry in [inbound] (unless it has its own)."""
    data = copy.deepcopy(data or {})
    data.setdefault("inbound", {}).setdefault("certificates", [dict(SELF_SIGNED)])
    return data


def parse(data: dict[str, Any], base: Path = BASE, **kwargs: Any) -> Config:
    return parse_config(data, base, **kwargs)


def error(data: dict[str, Any], base: Path = BASE, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def section(path: str, value: Any) -> dict[str, Any]:
    """section("inbound.tls.groups", [...]) -> {"inbound": {"tls": {"groups": [...]}}}."""
    *parents, last = path.split(".")
    data: dict[str, Any] = {last: value}
    for parent in reversed(parents):
        data = {parent: data}
    return data


def touch(path: Path, text: str = "x\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ defaults


def test_defaults():
    config = parse(with_cert())
    inbound = config.inbound
    assert inbound.listen == (Address("0.0.0.0", 25),)
    assert inbound.implicit_tls_listen == (Address("0.0.0.0", 465),)
    assert inbound.backend == Address("127.0.0.1", 2525)
    assert inbound.hostname == default_hostname()
    assert inbound.security_level == "may"
    assert inbound.security_level_networks == ()
    assert inbound.client_identity == "received-header"
    assert inbound.auth_only_after_tls is True
    assert inbound.bare_newline == "reject"
    assert (inbound.idle_timeout, inbound.handshake_timeout, inbound.backend_connect_timeout,
            inbound.backend_timeout, inbound.drain_timeout) == (300.0, 60.0, 10.0, 300.0, 30.0)
    assert all(isinstance(getattr(inbound, name), float) for name in ("idle_timeout", "drain_timeout"))
    assert (inbound.max_connections, inbound.max_connections_per_client, inbound.max_message_size,
            inbound.max_command_line, inbound.max_reply_line, inbound.max_text_line,
            inbound.max_errors) == (1000, 50, 10240000, 2048, 2048, 0, 20)
    assert inbound.certificates == (CertificateConfig(
        cert_file=BASE / "certs/a.pem", key_file=BASE / "certs/a.key", server_names=(),
        self_signed_if_missing=True),)
    assert inbound.tls == InboundTlsConfig(
        min_protocol="TLSv1.2", max_protocol="TLSv1.3", ciphers="", groups=(), dh_param_file=None,
        client_certificate="none", client_ca_file=None, client_fingerprints=(),
        session_cache_size=20480, session_timeout=3600, session_tickets=True)
    assert config.outbound == OutboundConfig(
        listen=(Address("127.0.0.1", 10025),), mode="relay", default_level="may", policy_file=None,
        routes_file=None, ca_file=None, port=25, hostname=default_hostname(),
        tls=OutboundTlsConfig(min_protocol="TLSv1.2", max_protocol="TLSv1.3", ciphers="",
                              client_cert_file=None, client_key_file=None, domaincerts_file=None,
                              session_cache_timeout=3600, sender_certificates=()))
    assert config.dns == DnsConfig(nameservers=(), timeout=5.0)
    assert config.tlsrpt == TlsrptConfig(socket="/run/tlsrpt/collectd.sock", skip_reused_handshakes=True)
    assert config.metrics == MetricsConfig(listen=Address("0.0.0.0", 9464))
    assert config.log == LogConfig(format="json", level="info")
    assert config.source is None


def test_dataclass_defaults_equal_parsed_defaults():
    config = parse(with_cert())
    assert dataclasses.replace(config.inbound, certificates=()) == InboundConfig()
    assert (config.outbound, config.dns, config.tlsrpt, config.metrics, config.log) == (
        OutboundConfig(), DnsConfig(), TlsrptConfig(), MetricsConfig(), LogConfig())


def test_sections_are_frozen():
    config = parse(with_cert())
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.inbound.security_level = "none"  # type: ignore[misc]


def test_durations_accept_integers_and_floats():
    config = parse(with_cert({"inbound": {"idle_timeout": 5, "handshake_timeout": 0.5}, "dns": {"timeout": 2}}))
    assert config.inbound.idle_timeout == 5.0 and isinstance(config.inbound.idle_timeout, float)
    assert config.inbound.handshake_timeout == 0.5
    assert config.dns.timeout == 2.0


def test_boundary_values_are_accepted():
    config = parse(with_cert({"inbound": {
        "max_command_line": 512, "max_reply_line": 512, "max_text_line": 1000,
        "max_connections_per_client": 0, "max_connections": 1, "max_errors": 1, "max_message_size": 1,
        "idle_timeout": 86400, "listen": ["[::]:1"], "implicit_tls_listen": ["mx.example.com:65535"],
    }, "outbound": {"port": 65535}}))
    assert config.inbound.max_text_line == 1000 and config.inbound.max_connections_per_client == 0
    assert config.inbound.listen == (Address("::", 1),)
    assert config.inbound.implicit_tls_listen == (Address("mx.example.com", 65535),)
    assert config.outbound.port == 65535


def test_empty_listener_lists_and_off_switches():
    config = parse(with_cert({"inbound": {"listen": [], "implicit_tls_listen": []},
                              "metrics": {"listen": ""}, "tlsrpt": {"socket": ""}}))
    assert config.inbound.listen == () and config.inbound.implicit_tls_listen == ()
    assert config.metrics.listen is None
    assert config.tlsrpt.socket == ""


# ------------------------------------------------------------------------------ errors

SEC = "a number of seconds > 0 and ≤ 86400"
ADDR = "host:port or [IPv6]:port, host a name or an IP address, port 1 to 65535"

ERRORS = [
    # [inbound]
    ("inbound.security_level", "mayy", 'inbound.security_level = "mayy": allowed: none, may, encrypt'),
    ("inbound.security_level", "dane", 'inbound.security_level = "dane": allowed: none, may, encrypt'),
    ("inbound.security_level", 1, "inbound.security_level = 1: allowed: none, may, encrypt"),
    ("inbound.client_identity", "proxy",
     'inbound.client_identity = "proxy": allowed: none, xclient, proxy-v1, proxy-v2, received-header'),
    ("inbound.bare_newline", "normalise", 'inbound.bare_newline = "normalise": allowed: reject, normalize'),
    ("inbound.auth_only_after_tls", "yes", 'inbound.auth_only_after_tls = "yes": allowed: true or false'),
    ("inbound.auth_only_after_tls", 1, "inbound.auth_only_after_tls = 1: allowed: true or false"),
    ("inbound.max_connections", "ten", 'inbound.max_connections = "ten": allowed: an integer ≥ 1'),
    ("inbound.max_connections", 0, "inbound.max_connections = 0: allowed: an integer ≥ 1"),
    ("inbound.max_connections", 10.0, "inbound.max_connections = 10.0: allowed: an integer ≥ 1"),
    ("inbound.max_connections", True, "inbound.max_connections = true: allowed: an integer ≥ 1"),
    ("inbound.max_connections", 2**31,
     "inbound.max_connections = 2147483648: allowed: an integer ≥ 1 and ≤ 2147483647"),
    ("inbound.max_connections_per_client", -1,
     "inbound.max_connections_per_client = -1: allowed: 0 (unlimited) or an integer ≥ 1"),
    ("inbound.max_message_size", 0, "inbound.max_message_size = 0: allowed: an integer ≥ 1"),
    ("inbound.max_command_line", 511, "inbound.max_command_line = 511: allowed: an integer ≥ 512"),
    ("inbound.max_reply_line", 100, "inbound.max_reply_line = 100: allowed: an integer ≥ 512"),
    ("inbound.max_text_line", 999, "inbound.max_text_line = 999: allowed: 0 (no limit) or an integer ≥ 1000"),
    ("inbound.max_errors", 0, "inbound.max_errors = 0: allowed: an integer ≥ 1"),
    ("inbound.idle_timeout", 0, f"inbound.idle_timeout = 0: allowed: {SEC}"),
    ("inbound.handshake_timeout", -1.5, f"inbound.handshake_timeout = -1.5: allowed: {SEC}"),
    ("inbound.backend_connect_timeout", "10s", f'inbound.backend_connect_timeout = "10s": allowed: {SEC}'),
    ("inbound.backend_timeout", float("inf"), f"inbound.backend_timeout = inf: allowed: {SEC}"),
    ("inbound.drain_timeout", float("nan"), f"inbound.drain_timeout = nan: allowed: {SEC}"),
    ("inbound.drain_timeout", True, f"inbound.drain_timeout = true: allowed: {SEC}"),
    ("inbound.idle_timeout", 86401, f"inbound.idle_timeout = 86401: allowed: {SEC}"),
    ("inbound.backend", "127.0.0.1", f'inbound.backend = "127.0.0.1": allowed: {ADDR}'),
    ("inbound.backend", "", f'inbound.backend = "": allowed: {ADDR}'),
    ("inbound.backend", ["127.0.0.1:2525"], f'inbound.backend = ["127.0.0.1:2525"]: allowed: {ADDR}'),
    ("inbound.listen", "0.0.0.0:25",
     'inbound.listen = "0.0.0.0:25": allowed: a list of host:port addresses'),
    ("inbound.listen", ["0.0.0.0:25", "0.0.0.0:0"], f'inbound.listen[1] = "0.0.0.0:0": allowed: {ADDR}'),
    ("inbound.implicit_tls_listen", ["::1:465"], f'inbound.implicit_tls_listen[0] = "::1:465": allowed: {ADDR}'),
    ("inbound.listen", [25], f"inbound.listen[0] = 25: allowed: {ADDR}"),
    ("inbound.hostname", "mx example", 'inbound.hostname = "mx example": allowed: a host name like '
     "mx.example.com (letters, digits, '-' and '.')"),
    ("inbound.hostname", "mx.example.com.", 'inbound.hostname = "mx.example.com.": allowed: a host name like '
     "mx.example.com (letters, digits, '-' and '.')"),
    ("inbound.hostname", "", "inbound.hostname = \"\": allowed: a host name like "
     "mx.example.com (letters, digits, '-' and '.')"),
    ("inbound.security_level_networks", ["192.0.2.0/24"],
     'inbound.security_level_networks = ["192.0.2.0/24"]: allowed: a table of network = level, '
     'like { "192.0.2.0/24" = "encrypt" }'),
    ("inbound.security_level_networks", {"192.0.2.0/24": "mandatory"},
     'inbound.security_level_networks."192.0.2.0/24" = "mandatory": allowed: none, may, encrypt'),
    ("inbound.security_level_networks", {"192.0.2.1/24": "encrypt"},
     'inbound.security_level_networks."192.0.2.1/24": not a network; allowed: a network like '
     "192.0.2.0/24 or 2001:db8::/32 (no host bits set) as the key"),
    ("inbound.security_level_networks", {"example.com": "encrypt"},
     'inbound.security_level_networks."example.com": not a network; allowed: a network like '
     "192.0.2.0/24 or 2001:db8::/32 (no host bits set) as the key"),
    ("inbound.security_level_networks", {"192.0.2.0/24": "may", "::ffff:192.0.2.0/120": "encrypt"},
     'inbound.security_level_networks."::ffff:192.0.2.0/120": the same network as '
     'inbound.security_level_networks."192.0.2.0/24"; allowed: each network only once'),
    ("inbound.certificates", {"cert_file": "a", "key_file": "b"},
     'inbound.certificates = { cert_file = "a", key_file = "b" }: allowed: an array of tables '
     "([[inbound.certificates]])"),
    ("inbound.certificates", [{"cert_file": "a.pem", "key_file": "a.key", "self_signed_if_missing": True},
                              "b.pem"],
     'inbound.certificates = [{ cert_file = "a.pem", key_file = "a.key", self_signed_if_missing = true }, '
     '"b.pem"]: allowed: an array of tables ([[inbound.certificates]])'),
    ("inbound.tls", "modern", 'inbound.tls = "modern": allowed: a table ([inbound.tls])'),
    # [[inbound.certificates]]
    ("inbound.certificates", [{"key_file": "a.key"}],
     "inbound.certificates[0].cert_file: required key is missing; allowed: a PEM certificate chain file"),
    ("inbound.certificates", [dict(SELF_SIGNED), {"cert_file": "b.pem", "self_signed_if_missing": True}],
     "inbound.certificates[1].key_file: required key is missing; allowed: a PEM private key file"),
    ("inbound.certificates", [{"cert_file": "", "key_file": "a.key"}],
     'inbound.certificates[0].cert_file = "": allowed: a PEM certificate chain file'),
    ("inbound.certificates", [{**SELF_SIGNED, "key_file": 5}],
     "inbound.certificates[0].key_file = 5: allowed: a PEM private key file"),
    ("inbound.certificates", [{**SELF_SIGNED, "server_names": "mx.example.com"}],
     'inbound.certificates[0].server_names = "mx.example.com": allowed: a list of DNS names '
     "(empty: the default chain)"),
    ("inbound.certificates", [{**SELF_SIGNED, "server_names": ["mx.example.com", "mx_1.example.com"]}],
     'inbound.certificates[0].server_names[1] = "mx_1.example.com": allowed: a DNS name like '
     "mx.example.com or *.example.com"),
    ("inbound.certificates", [{**SELF_SIGNED, "server_names": ["*.com"]}],
     'inbound.certificates[0].server_names[0] = "*.com": allowed: a DNS name like '
     "mx.example.com or *.example.com"),
    ("inbound.certificates", [{**SELF_SIGNED, "server_names": ["a.*.example.com"]}],
     'inbound.certificates[0].server_names[0] = "a.*.example.com": allowed: a DNS name like '
     "mx.example.com or *.example.com"),
    ("inbound.certificates", [{**SELF_SIGNED, "self_signed_if_missing": "true"}],
     'inbound.certificates[0].self_signed_if_missing = "true": allowed: true or false'),
    # [inbound.tls]
    ("inbound.tls.min_protocol", "TLSv1.4",
     'inbound.tls.min_protocol = "TLSv1.4": allowed: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3'),
    ("inbound.tls.max_protocol", "tlsv1.3",
     'inbound.tls.max_protocol = "tlsv1.3": allowed: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3'),
    ("inbound.tls.max_protocol", "TLSv1.1",
     'inbound.tls.min_protocol = "TLSv1.2": allowed: TLSv1, TLSv1.1 (not newer than '
     'inbound.tls.max_protocol = "TLSv1.1")'),
    ("inbound.tls.ciphers", "NO-SUCH-CIPHER",
     'inbound.tls.ciphers = "NO-SUCH-CIPHER": allowed: an OpenSSL cipher list for TLS 1.2 and older '
     'that selects at least one cipher (see "openssl ciphers"), or "" for the library default'),
    ("inbound.tls.ciphers", ["ECDHE+AESGCM"],
     'inbound.tls.ciphers = ["ECDHE+AESGCM"]: allowed: an OpenSSL cipher list for TLS 1.2 and older '
     'that selects at least one cipher (see "openssl ciphers"), or "" for the library default'),
    ("inbound.tls.groups", ["X25519", "secp256r1"],
     'inbound.tls.groups[1] = "secp256r1": allowed: X25519, X448, P-256, P-384, P-521, ffdhe2048, '
     "ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192"),
    ("inbound.tls.groups", ["X25519", "X25519"],
     'inbound.tls.groups[1] = "X25519": allowed: X25519, X448, P-256, P-384, P-521, ffdhe2048, '
     "ffdhe3072, ffdhe4096, ffdhe6144, ffdhe8192; each only once"),
    ("inbound.tls.groups", "X25519",
     'inbound.tls.groups = "X25519": allowed: a list of key-exchange groups'),
    ("inbound.tls.client_certificate", "optional",
     'inbound.tls.client_certificate = "optional": allowed: none, ask, require'),
    ("inbound.tls.client_certificate", "require",
     'inbound.tls.client_certificate = "require": allowed: none, ask (require needs '
     "inbound.tls.client_ca_file or inbound.tls.client_fingerprints)"),
    ("inbound.tls.client_fingerprints", ["AB" * 20],
     f'inbound.tls.client_fingerprints[0] = "{"AB" * 20}": allowed: a SHA-256 fingerprint: 64 hex digits, '
     "plain or as colon-separated pairs (AB:CD:...)"),
    ("inbound.tls.client_fingerprints", ["-".join(["ab"] * 32)],
     f'inbound.tls.client_fingerprints[0] = "{"-".join(["ab"] * 32)}": allowed: a SHA-256 fingerprint: '
     "64 hex digits, plain or as colon-separated pairs (AB:CD:...)"),
    ("inbound.tls.client_fingerprints", ["sha256:" + "ab" * 32],
     f'inbound.tls.client_fingerprints[0] = "sha256:{"ab" * 32}": allowed: a SHA-256 fingerprint: '
     "64 hex digits, plain or as colon-separated pairs (AB:CD:...)"),
    ("inbound.tls.client_fingerprints", ["gg" * 32],
     f'inbound.tls.client_fingerprints[0] = "{"gg" * 32}": allowed: a SHA-256 fingerprint: '
     "64 hex digits, plain or as colon-separated pairs (AB:CD:...)"),
    ("inbound.tls.client_fingerprints", ["ab" * 32, "AB" * 32],
     f'inbound.tls.client_fingerprints[1] = "{"AB" * 32}": allowed: a SHA-256 fingerprint: 64 hex digits, '
     "plain or as colon-separated pairs (AB:CD:...); each only once"),
    ("inbound.tls.session_cache_size", -1, "inbound.tls.session_cache_size = -1: allowed: an integer ≥ 0"),
    ("inbound.tls.session_timeout", 0, "inbound.tls.session_timeout = 0: allowed: an integer ≥ 1"),
    ("inbound.tls.session_tickets", "off", 'inbound.tls.session_tickets = "off": allowed: true or false'),
    ("inbound.tls.dh_param_file", 2048,
     'inbound.tls.dh_param_file = 2048: allowed: a file path (PEM DH parameters), or "" for none'),
    # [outbound]
    ("outbound.mode", "smarthost", 'outbound.mode = "smarthost": allowed: relay, transparent'),
    ("outbound.default_level", "must",
     'outbound.default_level = "must": allowed: none, may, encrypt, fingerprint, verify, secure, dane, dane-only'),
    ("outbound.port", 0, "outbound.port = 0: allowed: an integer from 1 to 65535"),
    ("outbound.port", 65536, "outbound.port = 65536: allowed: an integer from 1 to 65535"),
    ("outbound.port", "25", 'outbound.port = "25": allowed: an integer from 1 to 65535'),
    ("outbound.listen", ["127.0.0.1:10025", "127.0.0.1:10025"],
     'outbound.listen[1] = "127.0.0.1:10025": allowed: host:port or [IPv6]:port, host a name or an IP '
     "address, port 1 to 65535; each only once"),
    ("outbound.hostname", "-bad-.example", 'outbound.hostname = "-bad-.example": allowed: a host name like '
     "mx.example.com (letters, digits, '-' and '.')"),
    ("outbound.policy_file", ["a"],
     'outbound.policy_file = ["a"]: allowed: a file path (Postfix smtp_tls_policy_maps syntax), or "" for none'),
    ("outbound.tls.min_protocol", "TLSv1.3x",
     'outbound.tls.min_protocol = "TLSv1.3x": allowed: TLSv1, TLSv1.1, TLSv1.2, TLSv1.3'),
    ("outbound.tls", {"min_protocol": "TLSv1.3", "max_protocol": "TLSv1.2"},
     'outbound.tls.min_protocol = "TLSv1.3": allowed: TLSv1, TLSv1.1, TLSv1.2 (not newer than '
     'outbound.tls.max_protocol = "TLSv1.2")'),
    ("outbound.tls.ciphers", "NONSENSE",
     'outbound.tls.ciphers = "NONSENSE": allowed: an OpenSSL cipher list for TLS 1.2 and older that '
     'selects at least one cipher (see "openssl ciphers"), or "" for the library default'),
    ("outbound.tls.sender_certificates", {"sender_domains": ["a.example"], "cert_file": "a.pem"},
     'outbound.tls.sender_certificates = { sender_domains = ["a.example"], cert_file = "a.pem" }: '
     "allowed: an array of tables ([[outbound.tls.sender_certificates]])"),
    ("outbound.tls.sender_certificates", [{"cert_file": "a.pem"}],
     "outbound.tls.sender_certificates[0].sender_domains: required key is missing; allowed: a list of "
     "sender domains"),
    ("outbound.tls.sender_certificates", [{"sender_domains": ["a.example"]}],
     "outbound.tls.sender_certificates[0].cert_file: required key is missing; allowed: a file path "
     "(PEM certificate chain)"),
    ("outbound.tls.sender_certificates", [{"sender_domains": ["*"], "cert_file": "a.pem"}],
     'outbound.tls.sender_certificates[0].sender_domains[0] = "*": allowed: a sender domain like '
     "example.com, or .example.com for its subdomains"),
    ("outbound.tls.sender_certificates", [{"sender_domains": ["user@a.example"], "cert_file": "a.pem"}],
     'outbound.tls.sender_certificates[0].sender_domains[0] = "user@a.example": allowed: a sender domain '
     "like example.com, or .example.com for its subdomains"),
    ("outbound.tls.sender_certificates", [{"sender_domains": ["a.example", "A.example"], "cert_file": "a.pem"}],
     'outbound.tls.sender_certificates[0].sender_domains[1] = "A.example": allowed: a sender domain like '
     "example.com, or .example.com for its subdomains; each only once"),
    ("outbound.tls.sender_certificates", [{"sender_domains": ["a.example"], "cert_file": "a.pem", "key": "k"}],
     "outbound.tls.sender_certificates[0].key: unknown key; allowed keys: sender_domains, cert_file, "
     "key_file"),
    # [dns]
    ("dns.nameservers", "127.0.0.1", 'dns.nameservers = "127.0.0.1": allowed: a list of IP addresses '
     "(empty: /etc/resolv.conf)"),
    ("dns.nameservers", ["ns1.example.com"],
     'dns.nameservers[0] = "ns1.example.com": allowed: an IP address, optionally with a port: '
     "192.0.2.53, 127.0.0.1:5353, [2001:db8::53]:53"),
    ("dns.nameservers", ["127.0.0.1:0"],
     'dns.nameservers[0] = "127.0.0.1:0": allowed: an IP address, optionally with a port: '
     "192.0.2.53, 127.0.0.1:5353, [2001:db8::53]:53"),
    ("dns.nameservers", ["ns1.example.com:53"],
     'dns.nameservers[0] = "ns1.example.com:53": allowed: an IP address, optionally with a port: '
     "192.0.2.53, 127.0.0.1:5353, [2001:db8::53]:53"),
    ("dns.timeout", 0, f"dns.timeout = 0: allowed: {SEC}"),
    # [tlsrpt], [metrics], [log]
    ("tlsrpt.socket", False, 'tlsrpt.socket = false: allowed: a Unix socket path, or "" for off'),
    ("tlsrpt.skip_reused_handshakes", "no", 'tlsrpt.skip_reused_handshakes = "no": allowed: true or false'),
    ("metrics.listen", "9464", f'metrics.listen = "9464": allowed: {ADDR}; or "" for off'),
    ("metrics.listen", False, f'metrics.listen = false: allowed: {ADDR}; or "" for off'),
    ("log.format", "text", 'log.format = "text": allowed: json, console'),
    ("log.level", "warn", 'log.level = "warn": allowed: debug, info, warning, error'),
    ("log.level", "INFO", 'log.level = "INFO": allowed: debug, info, warning, error'),
    # whole sections of the wrong type
    ("inbound", 5, "inbound = 5: allowed: a table ([inbound])"),
    ("log", ["json"], 'log = ["json"]: allowed: a table ([log])'),
]


@pytest.mark.parametrize(("key", "value", "message"), ERRORS, ids=[f"{k}={v!r}"[:60] for k, v, _ in ERRORS])
def test_validation_error_names_key_value_and_allowed(key, value, message):
    data = section(key, value)
    if not key.startswith("inbound.certificates") and key != "inbound":
        data = with_cert(data)
    assert str(error(data)) == message


def test_error_attributes():
    exc = error(with_cert({"inbound": {"security_level": "mayy"}}))
    assert (exc.key, exc.value, exc.allowed) == ("inbound.security_level", "mayy", "none, may, encrypt")
    exc = error(with_cert({"inbound": {"tls": {"groups": ["X25519", "P-255"]}}}))
    assert (exc.key, exc.value) == ("inbound.tls.groups[1]", "P-255")
    assert exc.allowed.startswith("X25519, X448")


def test_long_values_are_cut_short_in_the_message():
    exc = error(with_cert({"log": {"level": "x" * 1000}}))
    assert len(str(exc)) < 300 and '..."' not in str(exc) and "..." in str(exc)
    assert exc.value == "x" * 1000


def test_control_characters_stay_on_one_line():
    exc = error(with_cert({"inbound": {"hostname": "mx\r\nRCPT TO:<x>"}}))
    assert str(exc).startswith('inbound.hostname = "mx\\r\\nRCPT TO:<x>": allowed:')


def test_duplicate_listener_address():
    exc = error(with_cert({"inbound": {"listen": ["0.0.0.0:25"], "implicit_tls_listen": ["0.0.0.0:25"]}}))
    assert str(exc) == ('inbound.implicit_tls_listen[0] = "0.0.0.0:25": allowed: an address not already '
                        "used by inbound.listen[0]")


# ------------------------------------------------------------------------------ unknown keys

INBOUND_KEYS = ("listen, implicit_tls_listen, backend, hostname, security_level, security_level_networks, "
                "client_identity, auth_only_after_tls, bare_newline, idle_timeout, handshake_timeout, "
                "backend_connect_timeout, backend_timeout, backend_data_done_timeout, drain_timeout, max_connections, "
                "max_connections_per_client, max_message_size, max_command_line, max_reply_line, "
                "max_text_line, max_errors, certificates, tls")


def test_unknown_key_message():
    exc = error(with_cert({"inbound": {"securitylevel": "may"}}))
    assert str(exc) == f"inbound.securitylevel: unknown key; allowed keys: {INBOUND_KEYS}"
    assert exc.key == "inbound.securitylevel" and exc.value == "may" and exc.allowed == INBOUND_KEYS


@pytest.mark.parametrize(("data", "key", "cls"), [
    ({"inbound": {"tls": {"min_protocols": "TLSv1.2"}}}, "inbound.tls.min_protocols", InboundTlsConfig),
    ({"inbound": {"certificates": [{**SELF_SIGNED, "chain_file": "x"}]}},
     "inbound.certificates[0].chain_file", CertificateConfig),
    ({"outbound": {"smarthost": "x"}}, "outbound.smarthost", OutboundConfig),
    ({"outbound": {"tls": {"ca_file": ""}}}, "outbound.tls.ca_file", OutboundTlsConfig),
    ({"dns": {"resolver": "x"}}, "dns.resolver", DnsConfig),
    ({"tlsrpt": {"enabled": False}}, "tlsrpt.enabled", TlsrptConfig),
    ({"metrics": {"port": 9464}}, "metrics.port", MetricsConfig),
    ({"log": {"file": "x"}}, "log.file", LogConfig),
    ({"logging": {"level": "info"}}, "logging", Config),
    ({"inbound": {"bad key": 1}}, 'inbound."bad key"', InboundConfig),
])
def test_unknown_keys_at_every_level(data, key, cls):
    data = with_cert(data) if "certificates" not in data.get("inbound", {}) else data
    allowed = ", ".join(f.name for f in dataclasses.fields(cls) if f.name != "source")
    assert str(error(data)) == f"{key}: unknown key; allowed keys: {allowed}"


def test_unknown_keys_are_reported_before_bad_values():
    exc = error(with_cert({"inbound": {"security_level": "mayy", "securitylevel": "may"}}))
    assert exc.key == "inbound.securitylevel"


# ------------------------------------------------------------------------------ certificates


def test_certificate_file_missing(tmp_path):
    exc = error({"inbound": {"certificates": [{"cert_file": "ecdsa.pem", "key_file": "ecdsa.key"}]}}, tmp_path)
    assert str(exc) == (f'inbound.certificates[0].cert_file = "{tmp_path}/ecdsa.pem": file does not exist; '
                        "allowed: an existing file (or self_signed_if_missing = true to generate one)")
    assert exc.key == "inbound.certificates[0].cert_file" and exc.value == f"{tmp_path}/ecdsa.pem"


def test_second_certificate_key_missing(tmp_path):
    touch(tmp_path / "a.pem"), touch(tmp_path / "a.key"), touch(tmp_path / "b.pem")
    exc = error({"inbound": {"certificates": [{"cert_file": "a.pem", "key_file": "a.key"},
                                              {"cert_file": "b.pem", "key_file": "b.key"}]}}, tmp_path)
    assert exc.key == "inbound.certificates[1].key_file"
    assert str(exc).startswith(f'inbound.certificates[1].key_file = "{tmp_path}/b.key": file does not exist')


def test_self_signed_only_when_both_files_are_missing(tmp_path):
    touch(tmp_path / "a.pem")
    exc = error({"inbound": {"certificates": [
        {"cert_file": "a.pem", "key_file": "a.key", "self_signed_if_missing": True}]}}, tmp_path)
    assert str(exc) == (f'inbound.certificates[0].key_file = "{tmp_path}/a.key": file does not exist; '
                        "allowed: an existing file; self_signed_if_missing generates a certificate only "
                        "when both cert_file and key_file are missing")


@pytest.mark.parametrize("key_name", ["both.key", "both.pem"], ids=["two-files", "one-file"])
def test_a_generated_certificate_loads_from_separate_or_combined_files(tmp_path, key_name):
    """key_file may name cert_file itself (one PEM with both): the generated key must not
    be overwritten by the certificate."""
    import ssl
    import stat

    from smtproxy.tls.certificates import ensure_certificate

    config = parse({"inbound": {"certificates": [
        {"cert_file": "certs/both.pem", "key_file": f"certs/{key_name}", "self_signed_if_missing": True}]}}, tmp_path)
    [chain] = config.inbound.certificates
    assert ensure_certificate(chain, "mx.example.test")
    assert stat.S_IMODE(chain.key_file.stat().st_mode) == 0o600
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(chain.cert_file, chain.key_file)
    assert not ensure_certificate(chain, "mx.example.test")  # only when missing


def test_a_certificate_that_cannot_be_written_is_a_one_line_startup_error(tmp_path):
    from smtproxy.app import StartupError, generate_missing_certificates

    (tmp_path / "afile").write_text("not a directory")
    config = parse({"inbound": {"certificates": [
        {"cert_file": "afile/c.pem", "key_file": "afile/c.key", "self_signed_if_missing": True}]}}, tmp_path)
    with pytest.raises(StartupError) as info:
        generate_missing_certificates(config)
    assert str(info.value).startswith(f"inbound.certificates[0]: cannot write a self-signed certificate "
                                      f"({tmp_path}/afile/c.pem, {tmp_path}/afile/c.key): "), info.value


def test_certificate_path_is_a_directory(tmp_path):
    (tmp_path / "dir.pem").mkdir()
    touch(tmp_path / "a.key")
    exc = error({"inbound": {"certificates": [{"cert_file": "dir.pem", "key_file": "a.key"}]}}, tmp_path)
    assert str(exc).startswith(f'inbound.certificates[0].cert_file = "{tmp_path}/dir.pem": not a regular file')


def test_existing_certificates_and_server_names(tmp_path):
    for name in ("ecdsa.pem", "ecdsa.key", "rsa.pem", "rsa.key"):
        touch(tmp_path / name)
    config = parse({"inbound": {"certificates": [
        {"cert_file": "ecdsa.pem", "key_file": "ecdsa.key", "server_names": ["MX.Example.COM", "*.Example.org"]},
        {"cert_file": str(tmp_path / "rsa.pem"), "key_file": "rsa.key", "server_names": ["mx.example.com"]},
    ]}}, tmp_path)
    first, second = config.inbound.certificates
    assert first.server_names == ("mx.example.com", "*.example.org")
    assert first.cert_file == tmp_path / "ecdsa.pem" and second.cert_file == tmp_path / "rsa.pem"
    assert second.server_names == ("mx.example.com",) and not second.self_signed_if_missing


def test_check_files_false_skips_file_checks():
    config = parse({"inbound": {"certificates": [{"cert_file": "/no/a.pem", "key_file": "/no/a.key"}],
                                "tls": {"client_ca_file": "/no/ca.pem"}},
                    "outbound": {"policy_file": "/no/policy"}}, check_files=False)
    assert config.inbound.tls.client_ca_file == Path("/no/ca.pem")
    assert config.outbound.policy_file == Path("/no/policy")


@pytest.mark.parametrize("data", [
    {"inbound": {"security_level": "none", "implicit_tls_listen": []}},
    {"inbound": {"security_level": "none", "implicit_tls_listen": [],
                 "security_level_networks": {"10.0.0.0/8": "none"}}},
    {"inbound": {"listen": [], "implicit_tls_listen": []}},
])
def test_certificates_not_needed_without_tls(data):
    config = parse(data)
    assert config.inbound.certificates == ()


@pytest.mark.parametrize(("data", "reason"), [
    ({}, 'inbound.security_level = "may"'),
    ({"inbound": {"security_level": "encrypt", "implicit_tls_listen": []}}, 'inbound.security_level = "encrypt"'),
    ({"inbound": {"security_level": "none"}}, "inbound.implicit_tls_listen is not empty"),
    ({"inbound": {"security_level": "may", "listen": []}}, "inbound.implicit_tls_listen is not empty"),
    ({"inbound": {"security_level": "none", "implicit_tls_listen": [],
                  "security_level_networks": {"10.0.0.0/8": "none", "192.0.2.0/24": "may"}}},
     'inbound.security_level_networks."192.0.2.0/24" = "may"'),
])
def test_certificates_needed(data, reason):
    exc = error(data)
    assert str(exc) == (f"inbound.certificates = []: allowed: at least one [[inbound.certificates]] table, "
                        f"because {reason}")
    assert exc.key == "inbound.certificates"


def test_per_key_errors_come_before_the_certificate_rule():
    # `smtproxy check` on a file with only a typo must name the typo, not the missing certificate
    exc = error({"inbound": {"security_level": "mandatory"}})
    assert exc.key == "inbound.security_level"


# ------------------------------------------------------------------------------ levels per network


def networks_config(networks: dict[str, str], default: str = "may") -> InboundConfig:
    return parse(with_cert({"inbound": {"security_level": default, "security_level_networks": networks}})).inbound


def test_level_for_most_specific_network_wins():
    inbound = networks_config({
        "10.0.0.0/8": "none",
        "10.1.0.0/16": "encrypt",
        "10.1.2.3": "may",
        "2001:db8::/32": "encrypt",
        "2001:db8:1::/48": "none",
    })
    assert inbound.level_for("10.9.9.9") == "none"
    assert inbound.level_for("10.1.9.9") == "encrypt"
    assert inbound.level_for("10.1.2.3") == "may"
    assert inbound.level_for("192.0.2.1") == "may"
    assert inbound.level_for("2001:db8:2::1") == "encrypt"
    assert inbound.level_for("2001:db8:1::25") == "none"
    assert inbound.level_for("2001:db9::1") == "may"


def test_level_for_ipv4_mapped_ipv6():
    inbound = networks_config({"192.0.2.0/24": "encrypt"}, default="none")
    assert inbound.level_for("::ffff:192.0.2.7") == "encrypt"
    assert inbound.level_for("::ffff:198.51.100.7") == "none"
    assert inbound.level_for(ipaddress.ip_address("192.0.2.8")) == "encrypt"


def test_mapped_network_is_stored_as_ipv4():
    inbound = networks_config({"::ffff:192.0.2.0/120": "encrypt", "192.0.2.128/25": "none"})
    assert inbound.security_level_networks == (
        (ipaddress.ip_network("192.0.2.128/25"), "none"), (ipaddress.ip_network("192.0.2.0/24"), "encrypt"))
    assert inbound.level_for("192.0.2.1") == "encrypt"
    assert inbound.level_for("::ffff:192.0.2.200") == "none"


def test_level_for_unparsable_address_gets_the_default():
    inbound = networks_config({"0.0.0.0/0": "encrypt"}, default="may")
    assert inbound.level_for("unknown") == "may"
    assert inbound.level_for("") == "may"
    assert inbound.level_for("fe80::1%eth0") == "may"  # no IPv6 network listed


def test_networks_are_sorted_most_specific_first():
    inbound = networks_config({"0.0.0.0/0": "none", "10.0.0.0/8": "may", "::/0": "none",
                               "10.0.0.0/24": "encrypt", "2001:db8::/64": "encrypt"})
    assert [str(n) for n, _ in inbound.security_level_networks] == [
        "2001:db8::/64", "10.0.0.0/24", "10.0.0.0/8", "0.0.0.0/0", "::/0"]


def test_level_for_without_networks():
    assert InboundConfig(security_level="encrypt").level_for("192.0.2.1") == "encrypt"


# ------------------------------------------------------------------------------ fingerprints

DIGEST = "3d9534512466" "33b9d24099c0c1170bd1cb69a89ef73bb8beeffae02a3b4bf3f0"
CANONICAL = ":".join(DIGEST[i:i + 2] for i in range(0, 64, 2)).upper()


@pytest.mark.parametrize("written", [
    DIGEST, DIGEST.upper(), CANONICAL, CANONICAL.lower(),
    ":".join(DIGEST[i:i + 2] for i in range(0, 64, 2)).swapcase(),
])
def test_fingerprints_are_normalised(written):
    config = parse(with_cert({"inbound": {"tls": {"client_certificate": "require",
                                                   "client_fingerprints": [written]}}}))
    assert config.inbound.tls.client_fingerprints == (CANONICAL,)


def test_require_with_ca_file(tmp_path):
    touch(tmp_path / "ca.pem")
    config = parse(with_cert({"inbound": {"tls": {"client_certificate": "require",
                                                   "client_ca_file": "ca.pem"}}}), tmp_path)
    assert config.inbound.tls.client_ca_file == tmp_path / "ca.pem"


# ------------------------------------------------------------------------------ addresses


@pytest.mark.parametrize(("text", "address", "shown"), [
    ("127.0.0.1:25", Address("127.0.0.1", 25), "127.0.0.1:25"),
    ("[::1]:25", Address("::1", 25), "[::1]:25"),
    ("[::]:465", Address("::", 465), "[::]:465"),
    ("0.0.0.0:65535", Address("0.0.0.0", 65535), "0.0.0.0:65535"),
    ("mx.example.com:2525", Address("mx.example.com", 2525), "mx.example.com:2525"),
    ("localhost:1", Address("localhost", 1), "localhost:1"),
])
def test_parse_address(text, address, shown):
    assert parse_address(text, "k") == address
    assert str(address) == shown


@pytest.mark.parametrize("text", [
    "", "127.0.0.1", ":25", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:-1",
    "127.0.0.1: 25", "127.0.0.1:25x", "::1:25", "[::1]", "[::1]25", "[127.0.0.1]:25", "[mx]:25",
    "[::1:25", "mx example:25", "mx_1.example:25", "256.1.1.1:25", "-mx.example:25", "127.0.0.1:٢٥",
    "127.0.0.1:025252",
])
def test_parse_address_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_address(text, "inbound.backend")
    assert info.value.key == "inbound.backend" and info.value.value == text
    assert str(info.value).startswith("inbound.backend = ")


def test_parse_address_rejects_non_strings():
    with pytest.raises(ConfigError, match=r"^metrics\.listen = 9464: allowed: host:port"):
        parse_address(9464, "metrics.listen")


def test_nameservers_accept_addresses_with_and_without_port():
    written = ["192.0.2.53", "2001:db8::53", "127.0.0.1:5353", "[2001:db8::53]:5353"]
    assert parse(with_cert({"dns": {"nameservers": written}})).dns.nameservers == tuple(written)


# ------------------------------------------------------------------------------ paths


def test_relative_paths_resolve_against_the_config_directory(tmp_path, monkeypatch):
    conf = tmp_path / "etc" / "smtproxy"
    for name in ("policy", "routes", "ca.pem", "dh.pem", "client.pem", "client.key", "tls/ecdsa.pem",
                 "tls/ecdsa.key"):
        touch(conf / name)
    path = touch(conf / "smtproxy.toml", """
[inbound]
[[inbound.certificates]]
cert_file = "tls/ecdsa.pem"
key_file = "tls/ecdsa.key"
[inbound.tls]
dh_param_file = "dh.pem"
client_ca_file = "ca.pem"
[outbound]
policy_file = "policy"
routes_file = "routes"
ca_file = "ca.pem"
[outbound.tls]
client_cert_file = "client.pem"
client_key_file = "client.key"
[tlsrpt]
socket = "run/collectd.sock"
""")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / "smtproxy" / "smtproxy.toml")
    assert config.source == path
    assert config.inbound.certificates[0].cert_file == conf / "tls/ecdsa.pem"
    assert config.inbound.certificates[0].key_file == conf / "tls/ecdsa.key"
    assert config.inbound.tls.dh_param_file == conf / "dh.pem"
    assert config.inbound.tls.client_ca_file == conf / "ca.pem"
    assert config.outbound.policy_file == conf / "policy"
    assert config.outbound.routes_file == conf / "routes"
    assert config.outbound.ca_file == conf / "ca.pem"
    assert config.outbound.tls.client_cert_file == conf / "client.pem"
    assert config.outbound.tls.client_key_file == conf / "client.key"
    assert config.tlsrpt.socket == str(conf / "run/collectd.sock")
    assert all(p.is_absolute() for p in (config.outbound.policy_file, config.inbound.tls.dh_param_file))


def test_absolute_paths_stay(tmp_path):
    touch(tmp_path / "policy")
    config = parse(with_cert({"outbound": {"policy_file": str(tmp_path / "policy")}}), Path("/somewhere/else"))
    assert config.outbound.policy_file == tmp_path / "policy"


@pytest.mark.parametrize(("key", "allowed"), [
    ("inbound.tls.dh_param_file", 'a path to an existing file'),
    ("outbound.policy_file", "an existing file (Postfix smtp_tls_policy_maps syntax)"),
    ("outbound.routes_file", "an existing file (Postfix transport syntax)"),
    ("outbound.ca_file", "an existing file (PEM CA certificates)"),
])
def test_named_files_must_exist(tmp_path, key, allowed):
    exc = error(with_cert(section(key, "missing")), tmp_path)
    assert exc.key == key and exc.value == str(tmp_path / "missing")
    assert str(exc).startswith(f'{key} = "{tmp_path}/missing": file does not exist; allowed: ')
    assert str(exc).endswith('or "" for none')


def test_empty_string_means_no_file():
    config = parse(with_cert({"inbound": {"tls": {"dh_param_file": "", "client_ca_file": ""}},
                              "outbound": {"policy_file": "", "routes_file": "", "ca_file": ""}}))
    assert config.inbound.tls.dh_param_file is None and config.outbound.ca_file is None


def test_sender_certificates(tmp_path):
    for name in ("a.pem", "a.key", "b.pem"):
        touch(tmp_path / name)
    config = parse(with_cert({"outbound": {"tls": {"sender_certificates": [
        {"sender_domains": ["A.Example", ".a.example"], "cert_file": "a.pem", "key_file": "a.key"},
        {"sender_domains": ["b.example"], "cert_file": str(tmp_path / "b.pem"), "key_file": ""},
    ]}}}), tmp_path)
    assert config.outbound.tls.sender_certificates == (
        SenderCertificateConfig(("a.example", ".a.example"), tmp_path / "a.pem", tmp_path / "a.key"),
        SenderCertificateConfig(("b.example",), tmp_path / "b.pem", None))


@pytest.mark.parametrize(("entries", "message"), [
    ([{"sender_domains": [], "cert_file": "a.pem"}],
     "outbound.tls.sender_certificates[0].sender_domains = []: allowed: a list of one or more sender "
     "domains (example.com, or .example.com for its subdomains)"),
    ([{"sender_domains": ["a.example"], "cert_file": "a.pem"},
      {"sender_domains": [".a.example", "A.Example"], "cert_file": "b.pem"}],
     'outbound.tls.sender_certificates[1].sender_domains[1] = "a.example": allowed: each sender domain once '
     "(already in outbound.tls.sender_certificates[0].sender_domains[0])"),
])
def test_sender_certificate_rules(entries, message):
    assert str(error(with_cert({"outbound": {"tls": {"sender_certificates": entries}}}), check_files=False)) == message


def test_sender_certificate_files_must_exist(tmp_path):
    exc = error(with_cert({"outbound": {"tls": {"sender_certificates": [
        {"sender_domains": ["a.example"], "cert_file": "a.pem"}]}}}), tmp_path)
    assert str(exc) == (f'outbound.tls.sender_certificates[0].cert_file = "{tmp_path}/a.pem": file does not exist; '
                        "allowed: an existing file (PEM certificate chain)")


def domaincerts(tmp_path: Path, text: str) -> Path:
    for name in ("a.pem", "a.key", "b.pem", "star.pem"):
        touch(tmp_path / name)
    return touch(tmp_path / "domaincerts", text.replace("DIR", str(tmp_path)))


def test_domaincerts_file_in_s_qmail_syntax(tmp_path):
    path = domaincerts(tmp_path, "# s/qmail control/domaincerts\n\n"
                                 "A.example:DIR/a.pem|DIR/a.key|secret|with|bars\n"
                                 ".b.example:DIR/b.pem\n"
                                 "  c.example:DIR/b.pem||  \n"
                                 "*:DIR/star.pem|\n")
    config = parse(with_cert({"outbound": {"tls": {"domaincerts_file": "domaincerts"}}}), tmp_path)
    assert config.outbound.tls.domaincerts_file == path
    lines = load_domaincerts(path)
    assert [(line.domain, line.cert_file, line.key_file, line.password, line.line) for line in lines] == [
        ("a.example", tmp_path / "a.pem", tmp_path / "a.key", "secret|with|bars", 3),
        (".b.example", tmp_path / "b.pem", None, None, 4),
        ("c.example", tmp_path / "b.pem", None, None, 5),
        ("*", tmp_path / "star.pem", None, None, 6)]
    assert "secret" not in repr(lines)


FORM = ("allowed: domain:certificate|keyfile|password per line, .domain for subdomains, * for other senders "
        "(s/qmail control/domaincerts)")


@pytest.mark.parametrize(("text", "problem"), [
    ("a.example DIR/a.pem\n", f"line 1 (a.example DIR/a.pem): no colon; {FORM}"),
    ("\n#\nuser@a.example:DIR/a.pem\n", "line 3 (user@a.example): not a sender domain; allowed: a sender domain "
                                          "like example.com, or .example.com for its subdomains, or *"),
    ("a.example:DIR/a.pem\nA.EXAMPLE:DIR/b.pem\n",
     "line 2 (A.EXAMPLE): already given on line 1; allowed: each sender domain once"),
    ("a.example:a.pem|DIR/a.key|secret\n", 'line 1 (a.example): certificate "a.pem" is not an absolute file name; '
     "allowed: absolute file names (s/qmail reads relative names from its home directory)"),
    ("a.example:\n", 'line 1 (a.example): certificate "" is not an absolute file name; '
     "allowed: absolute file names (s/qmail reads relative names from its home directory)"),
    ("a.example:DIR/a.pem|DIR/none.key|secret\n",
     'line 1 (a.example): keyfile "DIR/none.key" is not an existing file; allowed: existing files'),
])
def test_domaincerts_errors_name_the_line_never_the_password(tmp_path, text, problem):
    path = domaincerts(tmp_path, text)
    exc = error(with_cert({"outbound": {"tls": {"domaincerts_file": str(path)}}}), tmp_path)
    assert str(exc) == f'outbound.tls.domaincerts_file = "{path}": {problem.replace("DIR", str(tmp_path))}'
    assert exc.key == "outbound.tls.domaincerts_file" and "secret" not in str(exc)


@pytest.mark.parametrize(("tls", "problem"), [
    ({"client_cert_file": "a.pem", "client_key_file": "a.key"},
     "line 2 (*): * names a default certificate; allowed: no * line while outbound.tls.client_cert_file is set"),
    ({"sender_certificates": [{"sender_domains": ["x.example", ".b.example"], "cert_file": "b.pem"}]},
     "line 1 (.b.example): .b.example is already in outbound.tls.sender_certificates[0].sender_domains[1]; "
     "allowed: each sender domain once"),
])
def test_domaincerts_conflicts_with_the_toml_keys(tmp_path, tls, problem):
    path = domaincerts(tmp_path, ".b.example:DIR/b.pem\n*:DIR/star.pem\n")
    exc = error(with_cert({"outbound": {"tls": {"domaincerts_file": "domaincerts", **tls}}}), tmp_path)
    assert str(exc) == f'outbound.tls.domaincerts_file = "{path}": {problem}'


def test_domaincerts_file_is_read_only_when_files_are_checked(tmp_path):
    path = touch(tmp_path / "domaincerts", "no colon here\n")
    config = parse(with_cert({"outbound": {"tls": {"domaincerts_file": str(path)}}}), check_files=False)
    assert config.outbound.tls.domaincerts_file == path


def test_outbound_client_certificate_needs_its_key(tmp_path):
    touch(tmp_path / "client.pem")
    exc = error(with_cert({"outbound": {"tls": {"client_cert_file": "client.pem"}}}), tmp_path)
    assert str(exc) == ('outbound.tls.client_key_file = "": allowed: a file path, because '
                        "outbound.tls.client_cert_file is set")


# ------------------------------------------------------------------------------ files and TOML


def test_toml_syntax_error_is_one_line_with_the_file_name(tmp_path):
    path = touch(tmp_path / "bad.toml", '[inbound]\nsecurity_level = may\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert info.value.key == ""
    assert "\n" not in message
    assert message.startswith(f"{path}: TOML syntax error: ")
    assert "line 2" in message


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml")
    assert info.value.key == ""
    assert str(info.value) == f"{tmp_path}/nope.toml: cannot read: No such file or directory"


def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[log]\nlevel = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"not UTF-8 text"):
        load_config(path)


def test_toml_subtable_for_networks_works_too(tmp_path):
    path = touch(tmp_path / "c.toml", """
[inbound.security_level_networks]
"192.0.2.0/24" = "encrypt"
[[inbound.certificates]]
cert_file = "a.pem"
key_file = "a.key"
self_signed_if_missing = true
""")
    assert load_config(path).inbound.level_for("192.0.2.9") == "encrypt"


# ------------------------------------------------------------------------------ render_config


def round_trip(config: Config, tmp_path: Path) -> Config:
    text = render_config(config)
    tomllib.loads(text)  # valid TOML
    return load_config(touch(tmp_path / "rendered" / "smtproxy.toml", text))


def test_render_round_trip_of_defaults(tmp_path):
    config = parse(with_cert(), tmp_path)
    again = round_trip(config, tmp_path)
    assert dataclasses.replace(again, source=None) == config


def test_render_round_trip_of_every_key_changed(tmp_path):
    for name in ("a.pem", "a.key", "b.pem", "b.key", "ca.pem", "dh.pem", "policy", "routes", "c.pem", "c.key"):
        touch(tmp_path / name)
    touch(tmp_path / "domaincerts", f"d.example:{tmp_path}/c.pem|{tmp_path}/c.key\n")
    data = {
        "inbound": {
            "listen": ["127.0.0.1:2500", "[::1]:2500"], "implicit_tls_listen": [],
            "backend": "backend.example:25", "hostname": "mx.example.com", "security_level": "encrypt",
            "security_level_networks": {"10.0.0.0/8": "none", "2001:db8::/32": "may", "10.1.0.0/16": "may"},
            "client_identity": "proxy-v2", "auth_only_after_tls": False, "bare_newline": "normalize",
            "idle_timeout": 12.5, "handshake_timeout": 7, "backend_connect_timeout": 0.25,
            "backend_timeout": 99, "backend_data_done_timeout": 98, "drain_timeout": 1, "max_connections": 5, "max_connections_per_client": 0,
            "max_message_size": 123, "max_command_line": 600, "max_reply_line": 700, "max_text_line": 1000,
            "max_errors": 3,
            "certificates": [
                {"cert_file": "a.pem", "key_file": "a.key", "server_names": ["*.example.com", "MX.example.org"]},
                {"cert_file": "b.pem", "key_file": "b.key", "self_signed_if_missing": True},
                {"cert_file": "gen/x.pem", "key_file": "gen/x.key", "self_signed_if_missing": True},
            ],
            "tls": {"min_protocol": "TLSv1", "max_protocol": "TLSv1.2", "ciphers": "ECDHE+AESGCM:!aNULL",
                    "groups": ["X448", "ffdhe3072"], "dh_param_file": "dh.pem", "client_certificate": "ask",
                    "client_ca_file": "ca.pem", "client_fingerprints": [DIGEST], "session_cache_size": 0,
                    "session_timeout": 60, "session_tickets": False},
        },
        "outbound": {"listen": ["0.0.0.0:10025"], "mode": "transparent", "client_networks": ["10.1.0.0/16"],
                     "default_level": "dane-only",
                     "policy_file": "policy", "routes_file": "routes", "ca_file": "ca.pem", "port": 587, "mx_address_limit": 2, "plaintext_fallback_delay": 7,
                     "hostname": "out.example.com", "bare_newline": "reject", "idle_timeout": 60,
                     "connect_timeout": 5, "handshake_timeout": 7, "reply_timeout": 9, "data_done_timeout": 8, "drain_timeout": 3,
                     "max_connections": 7, "max_message_size": 1000, "max_errors": 4, "connection_cache_time_limit": 1,
                     "connection_reuse_time_limit": 10, "connection_reuse_count_limit": 3,
                     "connection_cache_size": 5, "connection_cache_destination_size": 2,
                     "tls": {"min_protocol": "TLSv1.3", "max_protocol": "TLSv1.3", "ciphers": "HIGH",
                             "client_cert_file": "c.pem", "client_key_file": "c.key",
                             "domaincerts_file": "domaincerts", "session_cache_timeout": 60,
                             "sender_certificates": [
                                 {"sender_domains": ["a.example", ".a.example"], "cert_file": "a.pem",
                                  "key_file": "a.key"},
                                 {"sender_domains": ["b.example"], "cert_file": "b.pem"}]}},
        "dns": {"nameservers": ["127.0.0.1:5353", "2001:db8::53"], "timeout": 1.5, "dnssec": True},
        "tlsrpt": {"socket": 'sock "quoted"\\dir', "skip_reused_handshakes": False},
        "metrics": {"listen": ""},
        "log": {"format": "console", "level": "debug"},
    }
    config = parse(data, tmp_path)
    again = round_trip(config, tmp_path)
    assert dataclasses.replace(again, source=None) == config
    # nothing is left at its default, so the round trip really covers every key
    defaults = parse(with_cert(), tmp_path)
    for name in ("inbound", "outbound", "dns", "tlsrpt", "metrics", "log"):
        ours, theirs = getattr(config, name), getattr(defaults, name)
        for field in dataclasses.fields(ours):
            assert getattr(ours, field.name) != getattr(theirs, field.name), f"{name}.{field.name}"


def test_render_lists_every_key(tmp_path):
    sender = {"sender_domains": ["a.example"], "cert_file": "a.pem"}
    text = render_config(parse(with_cert({"outbound": {"tls": {"sender_certificates": [sender]}}}), tmp_path,
                               check_files=False))
    parsed = tomllib.loads(text)

    def keys(cls: type, table: dict, prefix: str) -> None:
        for field in dataclasses.fields(cls):
            if field.name == "source":
                continue
            assert field.name in table, f"{prefix}{field.name} missing from render_config"

    keys(Config, parsed, "")
    keys(InboundConfig, parsed["inbound"], "inbound.")
    keys(CertificateConfig, parsed["inbound"]["certificates"][0], "inbound.certificates[0].")
    keys(InboundTlsConfig, parsed["inbound"]["tls"], "inbound.tls.")
    keys(OutboundConfig, parsed["outbound"], "outbound.")
    keys(OutboundTlsConfig, parsed["outbound"]["tls"], "outbound.tls.")
    keys(SenderCertificateConfig, parsed["outbound"]["tls"]["sender_certificates"][0],
         "outbound.tls.sender_certificates[0].")
    for name, cls in (("dns", DnsConfig), ("tlsrpt", TlsrptConfig), ("metrics", MetricsConfig), ("log", LogConfig)):
        keys(cls, parsed[name], f"{name}.")


def test_render_shows_source_and_readable_values(tmp_path):
    path = touch(tmp_path / "s.toml", '[inbound]\nsecurity_level = "none"\nimplicit_tls_listen = []\n'
                                      '[inbound.tls]\nclient_fingerprints = ["' + DIGEST + '"]\n')
    text = render_config(load_config(path))
    assert text.startswith(f"# smtproxy effective configuration (from {path})\n")
    assert "\nidle_timeout = 300\n" in text
    assert "\n# no [[inbound.certificates]]\n" in text
    assert f'\nclient_fingerprints = ["{CANONICAL}"]\n' in text
    assert '\nsecurity_level = "none"\n' in text and '\nbare_newline = "reject"\n' in text


# ------------------------------------------------------------------------------ the example and the docs


def test_example_loads():
    config = load_config(EXAMPLE)
    examples = EXAMPLE.parent
    assert config.source == EXAMPLE
    assert config.inbound.listen == (Address("0.0.0.0", 25),)
    assert config.inbound.implicit_tls_listen == (Address("0.0.0.0", 465),)
    assert config.inbound.backend == Address("127.0.0.1", 2525)
    (certificate,) = config.inbound.certificates
    assert certificate.cert_file == examples / "certs" / "ecdsa.pem"
    assert certificate.key_file == examples / "certs" / "ecdsa.key"
    assert certificate.self_signed_if_missing is True
    assert config.outbound.listen == (Address("127.0.0.1", 10025),)
    assert config.outbound.policy_file == examples / "tls_policy"
    assert config.outbound.routes_file == examples / "routes"
    assert config.metrics.listen == Address("127.0.0.1", 9464)
    assert config.log.format == "console"
    assert config.tlsrpt.socket == ""


def test_example_round_trips(tmp_path):
    config = load_config(EXAMPLE)
    assert dataclasses.replace(round_trip(config, tmp_path), source=EXAMPLE) == config


def test_example_tables_are_postfix_style_comments():
    for name in ("tls_policy", "routes"):
        lines = (EXAMPLE.parent / name).read_text().splitlines()
        assert lines, name
        assert all(not line.strip() or line.lstrip().startswith("#") for line in lines), name


def docs_tables() -> dict[str, dict[str, str]]:
    """docs/configuration.md: section heading -> {key: default cell}."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in DOCS.read_text().splitlines():
        heading = re.fullmatch(r"## `(\[\[?[a-z_.]+\]\]?)`", line)
        if heading:
            current = heading.group(1).strip("[]")
            tables[current] = {}
        elif line.startswith("## "):
            current = None
        elif current and line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split(" | ")]
            tables[current][cells[0].strip("`")] = cells[1]
    return tables


SECTIONS = {
    "inbound": InboundConfig, "inbound.certificates": CertificateConfig, "inbound.tls": InboundTlsConfig,
    "outbound": OutboundConfig, "outbound.tls": OutboundTlsConfig,
    "outbound.tls.sender_certificates": SenderCertificateConfig, "dns": DnsConfig, "mta_sts": MtaStsConfig,
    "tlsrpt": TlsrptConfig, "metrics": MetricsConfig, "log": LogConfig,
}


def test_docs_describe_every_key_with_its_default():
    tables = docs_tables()
    assert set(tables) == set(SECTIONS)
    rendered = tomllib.loads(render_config(parse(with_cert())))
    for name, cls in SECTIONS.items():
        documented = tables[name]
        assert list(documented) == [f.name for f in dataclasses.fields(cls)], name
        values = rendered
        for part in name.split("."):
            values = values.get(part, [])  # an array of tables with no table is not rendered
        if isinstance(values, list):
            continue  # certificates: no defaults to compare except the flags below
        for key, default in documented.items():
            code = re.fullmatch(r"`(.*)`", default)
            if code and key in values:
                expected = tomllib.loads(f"v = {code.group(1)}")["v"]
                assert values[key] == expected, f"docs: {name}.{key} default {default} != {values[key]!r}"
    assert tables["inbound.certificates"]["self_signed_if_missing"] == "`false`"
    assert tables["inbound.certificates"]["server_names"] == "`[]`"
    assert tables["outbound.tls.sender_certificates"]["key_file"] == '`""`'


def test_docs_complete_file_matches_render_config():
    text = DOCS.read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    data = tomllib.loads(block)
    config = parse(data, check_files=False)
    assert render_config(config).split("\n", 2)[2] == block


def test_outbound_client_networks_decide_who_may_relay():
    outbound = parse(with_cert({"outbound": {"client_networks": ["10.1.0.0/16", "2001:db8::/32"]}})).outbound
    assert outbound.client_allowed("10.1.2.3") and outbound.client_allowed("::ffff:10.1.2.3")
    assert outbound.client_allowed("2001:db8::7")
    assert not outbound.client_allowed("127.0.0.1") and not outbound.client_allowed("192.0.2.1")
    assert parse(with_cert({"outbound": {"client_networks": []}})).outbound.client_allowed("192.0.2.1")
    defaults = parse(with_cert()).outbound
    assert defaults.client_allowed("127.0.0.1") and defaults.client_allowed("10.244.1.7")
    assert not defaults.client_allowed("192.0.2.1") and not defaults.client_allowed("2001:db8::1")


def test_outbound_client_networks_error_names_the_item():
    with pytest.raises(ConfigError) as caught:
        parse(with_cert({"outbound": {"client_networks": ["10.0.0.1/8"]}}))
    assert str(caught.value).startswith('outbound.client_networks[0] = "10.0.0.1/8": allowed: a network in CIDR')
