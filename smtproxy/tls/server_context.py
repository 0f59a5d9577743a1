"""Server-side TLS: one SSLContext per set of server names, chosen by SNI.

Each context holds every chain for its names (RSA and ECDSA side by side: OpenSSL keeps
one certificate per key type and picks by what the client supports).
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable
from pathlib import Path

from smtproxy.config import InboundTlsConfig
from smtproxy.events import PeerCertificate, PeerTrust
from smtproxy.tls import openssl_ext
from smtproxy.tls.certificates import chain_key_detail, peer_certificate
from smtproxy.tls.engine import TlsEngine, trace_handshakes

_VERSIONS = {
    "TLSv1": ssl.TLSVersion.TLSv1,
    "TLSv1.1": ssl.TLSVersion.TLSv1_1,
    "TLSv1.2": ssl.TLSVersion.TLSv1_2,
    "TLSv1.3": ssl.TLSVersion.TLSv1_3,
}


class ServerTls:
    def __init__(self, tls_cfg, certificates, ticket_keys: openssl_ext.TicketKeys | None = None) -> None:
        """`ticket_keys`: the process's session-ticket keys, rotated by their owner and
        shared with the other worker processes (so a client resumes whichever worker its
        next connection lands on) and with the contexts of later reloads; None: OpenSSL's
        own, one per context."""
        self.config = tls_cfg
        self._ticket_keys = ticket_keys
        self._session_id_context = _session_id_context(tls_cfg)
        chains = list(certificates)
        # A name gets every chain that lists it (an ECDSA chain for [a, b] and an RSA chain
        # for [a] put both key types behind a); chains listing no name are the default.
        # With no such chain, the chains of the first listed name are the default.
        by_name: dict[str, list[int]] = {}
        for index, chain in enumerate(chains):
            for name in chain.server_names:
                by_name.setdefault(name, []).append(index)
        self._key_details: dict[int, dict[str, str | None]] = {}
        self._session_id_contexts: dict[int, bytes] = {}  # id(context) -> its session ID context
        contexts: dict[tuple[int, ...], ssl.SSLContext] = {}
        default = tuple(i for i, chain in enumerate(chains) if not chain.server_names)
        default = default or tuple(next(iter(by_name.values())))

        def context_for(indices: tuple[int, ...]) -> ssl.SSLContext:
            if indices not in contexts:
                # each set of chains resumes only its own sessions (see _context_for_name)
                session_id_context = self._session_id_context if indices == default else hashlib.sha256(
                    self._session_id_context + repr(indices).encode()).digest()
                contexts[indices] = self._context([chains[i] for i in indices], session_id_context)
            return contexts[indices]

        self.default_context = context_for(default)
        self._by_name: dict[str, ssl.SSLContext] = {
            name: context_for(tuple(indices)) for name, indices in by_name.items()
        }
        if self._by_name:
            self.default_context.sni_callback = self._select_by_sni
            openssl_ext.session_id_context_by_sni(
                self.default_context, lambda name: self._session_id_contexts[id(self._context_for_name(name))])

    @property
    def client_certificate_requested(self) -> bool:
        return self.config.client_certificate != "none"

    def _context(self, chains, session_id_context: bytes) -> ssl.SSLContext:
        cfg = self.config
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[cfg.min_protocol]
        context.maximum_version = _VERSIONS[cfg.max_protocol]
        context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
        if not cfg.session_tickets:
            context.options |= ssl.OP_NO_TICKET
        else:
            # One TLS 1.3 ticket per handshake, not OpenSSL's two (meant for browsers opening
            # parallel connections): an SMTP client resumes one session per server, and
            # each ticket costs the server an encryption and a random draw.
            context.num_tickets = 1
            if self._ticket_keys is not None:
                self._ticket_keys.install(context)
        if cfg.ciphers:
            context.set_ciphers(cfg.ciphers)
        details: dict[str, str | None] = {}
        for chain in chains:
            context.load_cert_chain(chain.cert_file, chain.key_file)
            family, detail = chain_key_detail(chain.cert_file)
            details[family] = detail
        self._key_details[id(context)] = details
        if cfg.groups:
            openssl_ext.set_groups(context, cfg.groups)
        if cfg.dh_param_file is not None:
            context.load_dh_params(str(cfg.dh_param_file))
        else:
            openssl_ext.set_dh_auto(context)
        openssl_ext.set_session_cache(context, cfg.session_cache_size, cfg.session_timeout)
        openssl_ext.set_session_id_context(context, session_id_context)
        self._session_id_contexts[id(context)] = session_id_context
        if cfg.client_certificate != "none":
            context.verify_mode = ssl.CERT_REQUIRED if cfg.client_certificate == "require" else ssl.CERT_OPTIONAL
            if cfg.client_ca_file is not None:
                context.load_verify_locations(cafile=str(cfg.client_ca_file))
                openssl_ext.name_client_cas(context, str(cfg.client_ca_file))
            openssl_ext.accept_and_record_verification(context)
        trace_handshakes(context)
        return context

    def _context_for_name(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose chains serve `server_name` (exact, then one wildcard label),
        else the default. A session resumes only under the same context's session ID
        context: one made for another name would skip the certificate the client never
        saw for this one (RFC 6066 section 3)."""
        if not server_name:
            return self.default_context
        name = server_name.lower()
        chosen = self._by_name.get(name)
        if chosen is None and "." in name:
            chosen = self._by_name.get("*." + name.split(".", 1)[1])
        return chosen or self.default_context

    def _select_by_sni(self, ssl_object, server_name: str | None, context: ssl.SSLContext) -> None:
        chosen = self._context_for_name(server_name)
        if chosen is not ssl_object.context:
            ssl_object.context = chosen

    def new_engine(self) -> TlsEngine:
        return TlsEngine(self.default_context, server_side=True)

    def local_key_detail(self, engine: TlsEngine) -> Callable[[str], str | None]:
        """Key family -> detail ("EC" -> "P-256") of the chains in the context SNI chose."""
        return self._key_details.get(id(engine.ssl_object.context), {}).get

    def evaluate_client(self, engine: TlsEngine) -> tuple[PeerTrust, PeerCertificate | None, str | None]:
        """(trust word, certificate facts, refusal reason or None) for the client."""
        der = engine.ssl_object.getpeercert(binary_form=True)
        required = self.config.client_certificate == "require"
        if not der:
            return PeerTrust.ANONYMOUS, None, "client certificate required" if required else None
        certificate = peer_certificate(der)
        ca_verified = self.config.client_ca_file is not None and _chain_verified(engine)
        if ca_verified or certificate.sha256_fingerprint in self.config.client_fingerprints:
            return PeerTrust.TRUSTED, certificate, None
        return PeerTrust.UNTRUSTED, certificate, "client certificate not trusted" if required else None


def _session_id_context(cfg: InboundTlsConfig) -> bytes:
    """A digest of what judged a client certificate: its mode, the CA file's contents and
    the fingerprints. A resumed session keeps the verdict of its full handshake, so a
    session made under other settings (before a reload that dropped a CA) must not resume:
    OpenSSL refuses it, and the client's certificate is judged again. Every worker computes
    the same digest, so sessions still cross workers."""
    digest = hashlib.sha256(cfg.client_certificate.encode())
    digest.update(b"\0" + (Path(cfg.client_ca_file).read_bytes() if cfg.client_ca_file is not None else b""))
    for fingerprint in sorted(cfg.client_fingerprints):
        digest.update(b"\0" + fingerprint.encode())
    return digest.digest()


def _chain_verified(engine: TlsEngine) -> bool:
    """OpenSSL found the client's chain valid. A resumed handshake verifies no chain: the
    verdict is the one its session kept from the full handshake (inside the ticket, so on
    any worker); where this Python hides it, the chain counts as not verified."""
    if engine.ssl_object.session_reused:
        return openssl_ext.verify_result(engine.ssl_object) == openssl_ext.X509_V_OK
    return engine.verification.verified
