"""Client-side TLS for outbound STARTTLS: one SSLContext per TLS-relevant policy.

Like Postfix's SMTP client, a context never refuses a server certificate: OpenSSL's
verdicts are recorded in `engine.verification` and `verify.evaluate_server` decides per
level (an untrusted certificate is fine under `may`/`encrypt`, and logged Untrusted).
Hostname checking stays off; the caller names the SNI per connection.

The cipher list of a context is `policy.ciphers.cipher_list` (Postfix's grades and level
exclusions); like Postfix's lists it governs TLS 1.2 and older only: TLS 1.3 suites are
OpenSSL's.

Resumed handshakes verify no chain, so `engine.verification` would be empty, which reads
as trusted.  Each context therefore remembers the verdicts of its last full handshake
with each server certificate, and a resumed handshake gets the verdicts of its
certificate (`ChainVerdicts`).  CPython refuses a session made from another SSLContext,
so the verdicts come from the same trust store and depth limit.  As in OpenSSL's own
session verify result, which Postfix relies on, a resumed session keeps that verdict.

The client certificate is chosen per envelope sender, as s/qmail's qmail-remote does with
`control/domaincerts` (`certificate_for`): the sender's domain, then each parent as
`.domain`, then the default (`client_cert_file`, or the file's `*` line; or none).  It is
part of the context key, so a context, and a session made from it, belongs to one
certificate; the connector and the pool key their caches on it too (DESIGN.md invariant 5).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

from smtproxy.config import ConfigError, OutboundTlsConfig, load_domaincerts
from smtproxy.policy.ciphers import cipher_list
from smtproxy.policy.levels import Policy
from smtproxy.policy.table import parent_chain
from smtproxy.tls import openssl_ext
from smtproxy.tls.certificates import chain_key_detail
from smtproxy.tls.engine import TlsEngine, trace_handshakes
from smtproxy.tls.openssl_ext import VerifyVerdict

# X509_V_ERR_UNSPECIFIED: the verdict of a resumed session whose full handshake is forgotten
UNKNOWN_RESUMED_CHAIN = VerifyVerdict(depth=0, code=1, message="resumed session of unknown trust")


@dataclasses.dataclass(frozen=True, slots=True)
class ClientCertificate:
    """A client certificate chain and its key, as presented to servers that ask for one."""

    cert_file: Path
    key_file: Path | None = None  # None: the key is in cert_file
    password: str | None = dataclasses.field(default=None, repr=False)  # s/qmail domaincerts only

    def __str__(self) -> str:
        return str(self.cert_file)


@dataclasses.dataclass(frozen=True, slots=True)
class _ContextSettings:
    min_protocol: str
    max_protocol: str
    ciphers: str
    ca_file: Path | None
    verify_depth: int | None
    certificate: ClientCertificate | None


class ChainVerdicts:
    """OpenSSL's verdicts on the last full handshake with each server certificate."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._by_certificate: collections.OrderedDict[bytes, tuple[VerifyVerdict, ...]] = collections.OrderedDict()

    def remember(self, der: bytes, verdicts: list[VerifyVerdict]) -> None:
        key = hashlib.sha256(der).digest()
        self._by_certificate[key] = tuple(verdicts)
        self._by_certificate.move_to_end(key)
        if len(self._by_certificate) > self._capacity:
            self._by_certificate.popitem(last=False)

    def recall(self, der: bytes) -> tuple[VerifyVerdict, ...]:
        """The remembered verdicts; a forgotten certificate counts as not verified."""
        return self._by_certificate.get(hashlib.sha256(der).digest(), (UNKNOWN_RESUMED_CHAIN,))


class _ClientEngine(TlsEngine):
    """A client engine whose `verification` also holds for resumed handshakes."""

    def __init__(
        self,
        context: ssl.SSLContext,
        chain_verdicts: ChainVerdicts,
        server_hostname: str | None,
        session: openssl_ext.Session | None,
    ) -> None:
        super().__init__(context, server_side=False, server_hostname=server_hostname, session=session)
        self._chain_verdicts = chain_verdicts

    def handshake(self) -> bool:
        if self.handshake_done:
            return True
        if not super().handshake():
            return False
        der = self.ssl_object.getpeercert(binary_form=True)
        if der and self.ssl_object.session_reused:
            self.verification.verdicts.extend(self._chain_verdicts.recall(der))
        elif der:
            self._chain_verdicts.remember(der, self.verification.verdicts)
        return True


def _sni(server_hostname: str | None) -> str | None:
    """The SNI name: none for IP literals (RFC 6066 section 3); lower case, no trailing dot."""
    if not server_hostname:
        return None
    try:
        ipaddress.ip_address(server_hostname.strip("[]"))
    except ValueError:
        return server_hostname.rstrip(".").lower()
    return None


def _load_certificate(context: ssl.SSLContext, certificate: ClientCertificate) -> None:
    # a callback, so that an encrypted key without a password fails instead of prompting
    try:
        context.load_cert_chain(certificate.cert_file, certificate.key_file,
                                password=lambda: certificate.password or "")
    except ssl.SSLError as exc:
        raise ValueError(f"client certificate {certificate.cert_file}: cannot load the chain and its key "
                         f"(key_file, password): {exc.reason or exc}") from None


def _sender_certificates(config: OutboundTlsConfig) -> tuple[ClientCertificate | None, dict[str, ClientCertificate]]:
    """(default, sender domain -> certificate) from [outbound.tls]; config validation refuses
    conflicts, and without it the TOML keys win over the domaincerts file."""
    default = ClientCertificate(config.client_cert_file, config.client_key_file) if config.client_cert_file else None
    by_domain: dict[str, ClientCertificate] = {}
    for entry in config.sender_certificates:
        for domain in entry.sender_domains:
            by_domain.setdefault(domain, ClientCertificate(entry.cert_file, entry.key_file))
    try:
        lines = load_domaincerts(config.domaincerts_file) if config.domaincerts_file else ()
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    for line in lines:
        certificate = ClientCertificate(line.cert_file, line.key_file, line.password)
        if line.domain == "*":
            default = default or certificate
        else:
            by_domain.setdefault(line.domain, certificate)
    return default, by_domain


class ClientTls:
    def __init__(self, tls_config: OutboundTlsConfig, ca_file: Path | None) -> None:
        self.config = tls_config
        self.ca_file = ca_file
        self._contexts: dict[_ContextSettings, tuple[ssl.SSLContext, ChainVerdicts]] = {}
        self.default_certificate, self._by_sender_domain = _sender_certificates(tls_config)
        self._key_details: dict[ClientCertificate, tuple[str, str | None]] = {}
        for certificate in {self.default_certificate, *self._by_sender_domain.values()} - {None}:
            _load_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), certificate)  # fail on start, not on mail
            self._key_details[certificate] = chain_key_detail(certificate.cert_file)

    def local_key_detail(self, certificate: ClientCertificate | None) -> Callable[[str], str | None] | None:
        """Key family -> detail ("EC" -> "P-256") of the client certificate presented, for
        the client-signature words of the handshake log line."""
        if certificate is None:
            return None
        family, detail = self._key_details[certificate]
        return {family: detail}.get

    def certificate_for(self, sender: str) -> ClientCertificate | None:
        """The client certificate for mail from envelope sender `sender` ("" for <>):
        s/qmail's tls_domaincerts() order, then the default."""
        _, at, domain = sender.rpartition("@")
        domain = domain.rstrip(".").lower()
        if at and domain and not domain.startswith("["):
            for candidate in parent_chain(domain):
                if candidate in self._by_sender_domain:
                    return self._by_sender_domain[candidate]
        return self.default_certificate

    def _settings(self, policy: Policy, certificate: ClientCertificate | None) -> _ContextSettings:
        return _ContextSettings(
            min_protocol=policy.min_protocol or self.config.min_protocol,
            max_protocol=policy.max_protocol or self.config.max_protocol,
            ciphers=cipher_list(policy, self.config.ciphers),
            ca_file=policy.ca_file or self.ca_file,
            verify_depth=policy.verify_depth,
            certificate=certificate,
        )

    def _profile(self, policy: Policy, certificate: ClientCertificate | None) -> tuple[ssl.SSLContext, ChainVerdicts]:
        settings = self._settings(policy, certificate)
        if settings not in self._contexts:
            self._contexts[settings] = self._new_context(settings), ChainVerdicts()
        return self._contexts[settings]

    def _new_context(self, settings: _ContextSettings) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # smtproxy matches names per level (verify.py)
        context.minimum_version = ssl.TLSVersion[settings.min_protocol.replace(".", "_")]
        context.maximum_version = ssl.TLSVersion[settings.max_protocol.replace(".", "_")]
        context.options |= ssl.OP_NO_RENEGOTIATION
        try:
            context.set_ciphers(settings.ciphers)
        except ssl.SSLError as exc:
            raise ValueError(f"the cipher list {settings.ciphers!r} selects no cipher") from exc
        if settings.ca_file is not None:
            context.load_verify_locations(cafile=str(settings.ca_file))
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if settings.verify_depth is not None:
            # Postfix counts the trust anchor (smtp_tls_scert_verifydepth: "1 is sufficient
            # if the issuing CA is listed in a local CA file"); OpenSSL counts intermediates.
            openssl_ext.set_verify_depth(context, max(settings.verify_depth - 1, 0))
        if settings.certificate is not None:
            _load_certificate(context, settings.certificate)
        openssl_ext.accept_and_record_verification(context)
        trace_handshakes(context)
        return context

    def context_for(self, policy: Policy, certificate: ClientCertificate | None = None) -> ssl.SSLContext:
        return self._profile(policy, certificate)[0]

    def new_engine(
        self, policy: Policy, server_hostname: str | None, session: openssl_ext.Session | None = None,
        certificate: ClientCertificate | None = None,
    ) -> TlsEngine:
        """A client engine; `server_hostname` is only the SNI (never checked by OpenSSL).
        `certificate` (from `certificate_for`; None: none) is presented when the server asks.

        `session` must come from an engine of an identical policy and certificate (DESIGN.md
        invariant 5).
        """
        context, chain_verdicts = self._profile(policy, certificate)
        return _ClientEngine(context, chain_verdicts, _sni(server_hostname), session)
