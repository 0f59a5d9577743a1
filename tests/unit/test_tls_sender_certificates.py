"""Client certificates per envelope sender domain (s/qmail control/domaincerts): which
certificate a sender gets, and that contexts, TLS sessions and cached connections made
with one certificate are never used with another (DESIGN.md invariant 5)."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import types
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from smtproxy.config import OutboundTlsConfig, SenderCertificateConfig
from smtproxy.events import EventBus
from smtproxy.outbound.connector import ConnectSettings, RemoteSession, _session_key
from smtproxy.outbound.pool import ConnectionPool, PoolLimits
from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.routing.router import Destination, Target
from smtproxy.smtp import EhloReply, Reply
from smtproxy.tls.client_context import ClientCertificate, ClientTls
from smtproxy.tls.engine import TlsEngine
from tests.unit.test_tls_client import handshake

MX = "mx.example.com"
MAY = Policy(Level.MAY)
TARGET = Target(MX, "192.0.2.25", 25, 10)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@dataclasses.dataclass
class Identities:
    ca_file: Path
    global_: ClientCertificate
    alpha: ClientCertificate  # [[outbound.tls.sender_certificates]], key in its own file
    beta: ClientCertificate  # domaincerts, key in the certificate file
    gamma: ClientCertificate  # domaincerts, encrypted key with a password
    star: ClientCertificate  # domaincerts "*"


def issue(ca: trustme.CA, directory: Path, name: str, *, combined: bool = False,
          password: str | None = None) -> ClientCertificate:
    leaf = ca.issue_cert(f"{name}.client.test")
    cert_file = directory / f"{name}.pem"
    if combined:
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
        return ClientCertificate(cert_file)
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    key_file = directory / f"{name}.key"
    if password is None:
        leaf.private_key_pem.write_to_path(str(key_file))
    else:
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.BestAvailableEncryption(password.encode())))
    return ClientCertificate(cert_file, key_file, password)


@pytest.fixture
def ids(ca: trustme.CA, tmp_path: Path) -> Identities:
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Identities(ca_file, issue(ca, tmp_path, "global"), issue(ca, tmp_path, "alpha"),
                      issue(ca, tmp_path, "beta", combined=True), issue(ca, tmp_path, "gamma", password="s3cret|x"),
                      issue(ca, tmp_path, "star", combined=True))


def domaincerts(ids: Identities, tmp_path: Path, *, star: bool = False) -> Path:
    lines = [f".beta.test:{ids.beta.cert_file}",
             f"gamma.test:{ids.gamma.cert_file}|{ids.gamma.key_file}|{ids.gamma.password}"]
    if star:
        lines.append(f"*:{ids.star.cert_file}|")
    path = tmp_path / "domaincerts"
    path.write_text("# sender.domain:certificate|keyfile|password\n" + "\n".join(lines) + "\n")
    return path


def client_tls(ids: Identities, tmp_path: Path, *, with_global: bool = True) -> ClientTls:
    config = OutboundTlsConfig(
        client_cert_file=ids.global_.cert_file if with_global else None,
        client_key_file=ids.global_.key_file if with_global else None,
        domaincerts_file=domaincerts(ids, tmp_path, star=not with_global),
        sender_certificates=(SenderCertificateConfig(("alpha.test", ".alpha.test"), ids.alpha.cert_file,
                                                     ids.alpha.key_file),))
    return ClientTls(config, ids.ca_file)


# ------------------------------------------------------------------------------ which certificate


@pytest.mark.parametrize(("sender", "which"), [
    ("user@alpha.test", "alpha"),
    ("User@ALPHA.Test.", "alpha"),
    ("user@mail.alpha.test", "alpha"),  # .alpha.test
    ("user@beta.test", "global_"),  # only .beta.test is listed: not the domain itself
    ("user@a.b.beta.test", "beta"),
    ("user@gamma.test", "gamma"),
    ("user@sub.gamma.test", "global_"),  # gamma.test is that domain only
    ("", "global_"),  # the null sender <>
    ("postmaster", "global_"),
    ("user@[192.0.2.1]", "global_"),
    ('"odd@local"@alpha.test', "alpha"),
    ("user@other.test", "global_"),
])
def test_sender_domain_picks_the_certificate_as_qmail_remote_does(ids, tmp_path, sender, which):
    assert client_tls(ids, tmp_path).certificate_for(sender) == getattr(ids, which)


def test_star_line_is_the_default_without_client_cert_file(ids, tmp_path):
    client = client_tls(ids, tmp_path, with_global=False)
    assert client.certificate_for("") == ids.star
    assert client.certificate_for("user@other.test") == ids.star
    assert client.certificate_for("user@alpha.test") == ids.alpha


def test_no_certificates_configured():
    client = ClientTls(OutboundTlsConfig(), None)
    assert client.certificate_for("user@alpha.test") is None and client.certificate_for("") is None


def test_bad_key_or_password_fails_on_start_without_prompting(ids, tmp_path):
    path = tmp_path / "bad"
    path.write_text(f"gamma.test:{ids.gamma.cert_file}|{ids.gamma.key_file}|wrong\n")
    with pytest.raises(ValueError, match="client certificate .*gamma.pem: cannot load"):
        ClientTls(OutboundTlsConfig(domaincerts_file=path), None)
    path.write_text(f"gamma.test:{ids.gamma.cert_file}|{ids.gamma.key_file}\n")  # encrypted, no password
    with pytest.raises(ValueError, match="cannot load"):
        ClientTls(OutboundTlsConfig(domaincerts_file=path), None)
    path.write_text(f"alpha.test:{ids.alpha.cert_file}|{ids.beta.cert_file}\n")  # someone else's key
    with pytest.raises(ValueError, match="alpha.pem: cannot load"):
        ClientTls(OutboundTlsConfig(domaincerts_file=path), None)


def test_a_broken_domaincerts_file_is_a_one_line_value_error(ids, tmp_path):
    path = tmp_path / "bad"
    path.write_text("gamma.test\n")
    with pytest.raises(ValueError, match=r'^outbound.tls.domaincerts_file = ".*": line 1 \(gamma.test\): no colon'):
        ClientTls(OutboundTlsConfig(domaincerts_file=path), None)


# ------------------------------------------------------------------------------ contexts and sessions


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(MX).configure_cert(context)
    context.verify_mode = ssl.CERT_OPTIONAL
    ca.configure_trust(context)
    return context


def presented(server: TlsEngine) -> str | None:
    cert = server.ssl_object.getpeercert()
    return dict(cert["subjectAltName"])["DNS"] if cert else None


def test_one_context_per_policy_and_certificate(ids, tmp_path):
    client = client_tls(ids, tmp_path)
    alpha, beta = client.certificate_for("a@alpha.test"), client.certificate_for("a@x.beta.test")
    assert client.context_for(MAY, alpha) is client.context_for(MAY, dataclasses.replace(ids.alpha))
    assert client.context_for(MAY, alpha) is client.context_for(MAY, client.certificate_for("b@mail.alpha.test"))
    assert client.context_for(MAY, alpha) is not client.context_for(MAY, beta)
    assert client.context_for(MAY, alpha) is not client.context_for(MAY, None)
    assert client.context_for(MAY, alpha) is not client.context_for(Policy(Level.ENCRYPT), alpha)


@pytest.mark.parametrize("sender", ["a@alpha.test", "a@x.beta.test", "a@gamma.test", "", "a@other.test"])
def test_each_sender_presents_its_own_certificate(ids, ca, tmp_path, sender):
    client = client_tls(ids, tmp_path)
    certificate = client.certificate_for(sender)
    server = handshake(client.new_engine(MAY, MX, certificate=certificate), server_context(ca))
    assert presented(server) == f"{certificate.cert_file.stem}.client.test"


def test_a_session_never_crosses_client_certificates(ids, ca, tmp_path):
    client = client_tls(ids, tmp_path)
    first = client.new_engine(MAY, MX, certificate=ids.alpha)
    handshake(first, server_context(ca))
    session = first.ssl_object.session
    with pytest.raises(ValueError, match="different SSLContext"):
        client.new_engine(MAY, MX, session=session, certificate=ids.beta)
    with pytest.raises(ValueError, match="different SSLContext"):
        client.new_engine(MAY, MX, session=session, certificate=None)
    assert client.new_engine(MAY, MX, session=session, certificate=ids.alpha) is not None


def test_session_cache_key_includes_the_certificate(ids):
    keys = {_session_key(TARGET, MX, MAY, certificate) for certificate in (ids.alpha, ids.beta, None)}
    assert len(keys) == 3
    assert _session_key(TARGET, MX, MAY, ids.alpha) == _session_key(TARGET, MX, MAY, dataclasses.replace(ids.alpha))


def test_remember_session_stores_under_the_certificate_of_the_connection(ids, ca, tmp_path):
    from smtproxy.outbound.connector import Connector
    from smtproxy.tls.session_cache import SessionCache

    client, server = client_tls(ids, tmp_path), server_context(ca)
    engine = client.new_engine(MAY, MX, certificate=ids.alpha)
    handshake(engine, server)
    remote = RemoteSession(types.SimpleNamespace(engine=engine), TARGET, "example.com", MAY, EhloReply("x"),
                           types.SimpleNamespace(ok=True), client_certificate=ids.alpha)
    connector = Connector(ConnectSettings("out.example", 1, 1, 1), None, EventBus(), SessionCache(3600))  # type: ignore[arg-type]
    connector.remember_session(remote)
    session = connector.sessions.get(_session_key(TARGET, MX, MAY, ids.alpha))
    assert session is not None and session.has_ticket
    assert connector.sessions.get(_session_key(TARGET, MX, MAY, ids.beta)) is None
    assert connector.sessions.get(_session_key(TARGET, MX, MAY, None)) is None
    resumed = client.new_engine(MAY, MX, session=session, certificate=ids.alpha)
    handshake(resumed, server)
    assert resumed.ssl_object.session_reused


# ------------------------------------------------------------------------------ the connection cache


class FakeConnection:
    alive = True
    engine = None

    async def command(self, line: str, timeout: float) -> Reply:
        return Reply.of(250, "2.0.0", "Ok")

    async def quit(self, timeout: float) -> None:
        self.alive = False

    def abort(self) -> None:
        self.alive = False

    def park(self) -> bool:
        return self.alive

    def unpark(self) -> None:
        pass


class FakeConnector:
    def __init__(self) -> None:
        self.connects: list[ClientCertificate | None] = []

    async def connect(self, domain, destination, decision, certificate=None) -> RemoteSession:
        self.connects.append(certificate)
        return RemoteSession(FakeConnection(), TARGET, destination.nexthop, decision.policy, EhloReply("x"), None,
                             client_certificate=certificate)

    def remember_session(self, remote: RemoteSession) -> None:
        pass


async def test_a_cached_connection_serves_only_its_own_certificate(ids):
    connector = FakeConnector()
    pool = ConnectionPool(connector, PoolLimits(30, 300, 0, 10, 10, 5), EventBus())  # type: ignore[arg-type]
    destination = Destination("example.com", (TARGET,))
    decision = PolicyDecision(MAY, "default_level")

    async def send(certificate: ClientCertificate | None) -> RemoteSession:
        remote = await pool.acquire("example.com", destination, decision, certificate)
        pool.release(remote, True)
        await asyncio.gather(*pool._tasks)  # RSET done, parked
        return remote

    first = await send(ids.alpha)
    assert await send(ids.beta) is not first  # the alpha connection stays parked
    assert await send(None) is not first
    assert await send(dataclasses.replace(ids.alpha)) is first  # same certificate: reused
    assert connector.connects == [ids.alpha, ids.beta, None]
    assert pool.idle_connections == 3
    await pool.close_all()
