"""ClientTls without sockets: trustme PKIs, plain-ssl servers, handshakes over memory BIOs."""

from __future__ import annotations

import gc
import ssl
from pathlib import Path

import pytest
import trustme

from smtproxy.config import OutboundTlsConfig
from smtproxy.policy.levels import Level, Policy
from smtproxy.tls.client_context import UNKNOWN_RESUMED_CHAIN, ChainVerdicts, ClientCertificate, ClientTls
from smtproxy.tls.engine import TlsEngine, TlsHandshakeError
from smtproxy.tls import openssl_ext
from smtproxy.tls.openssl_ext import VerifyVerdict

MX = "mx.example.com"
MAY = Policy(Level.MAY)
TLS12 = Policy(Level.MAY, max_protocol="TLSv1.2")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def client(ca_file: Path) -> ClientTls:
    return ClientTls(OutboundTlsConfig(), ca_file)


def server_context(cert: trustme.LeafCert, ciphers: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(context)
    if ciphers is not None:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.set_ciphers(ciphers)
    return context


def handshake(client: TlsEngine, context: ssl.SSLContext) -> TlsEngine:
    """Pump both engines to the end of the handshake; one server write then brings in
    the TLS 1.3 session tickets, as the server's first SMTP reply would."""
    server = TlsEngine(context, server_side=True)
    for _ in range(10):
        client.handshake()
        server.receive(client.outgoing())
        client.receive(server.outgoing())
        if client.handshake_done and server.handshake_done:
            break
    else:
        raise AssertionError("handshake did not finish")
    server.send(b"250 ok\r\n")
    assert client.receive(server.outgoing()) == b"250 ok\r\n"
    return server


def test_one_context_per_distinct_tls_settings(client: ClientTls) -> None:
    verify = Policy(Level.VERIFY, match=("hostname",))
    assert client.context_for(verify) is client.context_for(Policy(Level.SECURE, servername="nexthop"))
    assert client.context_for(MAY) is client.context_for(Policy(Level.MAY, connection_reuse=False))
    assert client.context_for(MAY) is not client.context_for(Policy(Level.ENCRYPT))  # null ciphers excluded
    assert client.context_for(MAY) is not client.context_for(verify)  # anonymous ciphers excluded
    assert client.context_for(MAY) is not client.context_for(TLS12)
    assert client.context_for(MAY) is not client.context_for(Policy(Level.MAY, exclude=("AES256",)))
    assert client.context_for(MAY) is not client.context_for(Policy(Level.MAY, ciphers="high"))


def test_contexts_record_instead_of_checking(client: ClientTls) -> None:
    context = client.context_for(Policy(Level.SECURE))
    assert context.check_hostname is False
    assert not context.options & ssl.OP_NO_TICKET


@pytest.mark.parametrize(
    ("config", "policy", "version"),
    [
        (OutboundTlsConfig(), MAY, "TLSv1.3"),
        (OutboundTlsConfig(), TLS12, "TLSv1.2"),
        (OutboundTlsConfig(max_protocol="TLSv1.2"), MAY, "TLSv1.2"),
        (OutboundTlsConfig(max_protocol="TLSv1.2"), Policy(Level.MAY, max_protocol="TLSv1.3"), "TLSv1.3"),
    ],
)
def test_protocol_range_from_policy_else_config(config, policy, version, ca, ca_file) -> None:
    engine = ClientTls(config, ca_file).new_engine(policy, MX)
    handshake(engine, server_context(ca.issue_cert(MX)))
    assert engine.ssl_object.version() == version


def test_minimum_protocol_refuses_older_servers(client: ClientTls, ca: trustme.CA) -> None:
    server = server_context(ca.issue_cert(MX))
    server.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(TlsHandshakeError):
        handshake(client.new_engine(Policy(Level.MAY, min_protocol="TLSv1.3"), MX), server)


# The server speaks only this HIGH cipher; the config's list lacks it.
AES256 = "ECDHE-ECDSA-AES256-GCM-SHA384"


@pytest.mark.parametrize(
    ("policy", "negotiated"),
    [
        (TLS12, None),
        (Policy(Level.MAY, max_protocol="TLSv1.2", ciphers="high"), AES256),
        (Policy(Level.MAY, max_protocol="TLSv1.2", ciphers="medium"), AES256),
        (Policy(Level.MAY, max_protocol="TLSv1.2", ciphers="high", exclude=("AES256",)), None),
        (Policy(Level.MAY, max_protocol="TLSv1.2", ciphers="high", exclude=("ECDHE+AESGCM",)), None),
    ],
)
def test_cipher_grade_replaces_the_configured_list_and_exclude_drops(policy, negotiated, ca, ca_file) -> None:
    config = OutboundTlsConfig(ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
    engine = ClientTls(config, ca_file).new_engine(policy, MX)
    server = server_context(ca.issue_cert(MX), ciphers=AES256)
    if negotiated is None:
        with pytest.raises(TlsHandshakeError):
            handshake(engine, server)
    else:
        handshake(engine, server)
        assert engine.ssl_object.cipher()[0] == negotiated


def test_exclude_applies_to_the_default_list(client: ClientTls) -> None:
    names = [c["name"] for c in client.context_for(Policy(Level.MAY, exclude=("AESGCM",))).get_ciphers()]
    assert names and not [name for name in names if "AES" in name and "GCM" in name and not name.startswith("TLS_")]


@pytest.mark.parametrize(
    ("level", "offered"),
    [
        (Level.MAY, {"aNULL", "eNULL"}),
        (Level.ENCRYPT, {"aNULL"}),
        (Level.FINGERPRINT, {"eNULL"}),
        (Level.VERIFY, {"eNULL"}),
        (Level.SECURE, {"eNULL"}),
        (Level.DANE_ONLY, {"eNULL"}),
    ],
)
def test_levels_rule_out_null_ciphers_like_postfix(level, offered, ca_file: Path) -> None:
    client = ClientTls(OutboundTlsConfig(ciphers="aNULL:eNULL:@SECLEVEL=0"), ca_file)
    ciphers = client.context_for(Policy(level)).get_ciphers()
    anonymous = {"aNULL" for cipher in ciphers if cipher["auth"] == "auth-null"}
    unencrypted = {"eNULL" for cipher in ciphers if cipher["symmetric"] is None}
    assert anonymous | unencrypted == offered


def test_unknown_cipher_grade_is_refused(client: ClientTls) -> None:
    with pytest.raises(ValueError, match="superb"):
        client.context_for(Policy(Level.MAY, ciphers="superb"))


def test_client_certificate_presented(ca: trustme.CA, ca_file: Path, tmp_path: Path) -> None:
    identity = ca.issue_cert("relay.example.org")
    identity.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    identity.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    config = OutboundTlsConfig(client_cert_file=tmp_path / "client.pem", client_key_file=tmp_path / "client.key")
    server = server_context(ca.issue_cert(MX))
    server.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(server)
    client = ClientTls(config, ca_file)
    default = client.certificate_for("")  # the null sender gets the global certificate
    assert default == ClientCertificate(tmp_path / "client.pem", tmp_path / "client.key")
    accepted = handshake(client.new_engine(MAY, MX, certificate=default), server)
    assert accepted.ssl_object.getpeercert()["subjectAltName"] == (("DNS", "relay.example.org"),)
    with pytest.raises(TlsHandshakeError):  # certificate=None: none, whatever the default
        handshake(client.new_engine(MAY, MX), server)


@pytest.mark.parametrize(
    ("server_hostname", "sent"),
    [
        (MX, MX),
        ("MX.Example.COM.", "mx.example.com"),
        ("192.0.2.25", None),
        ("2001:db8::25", None),
        ("[2001:db8::25]", None),
        (None, None),
    ],
)
def test_sni_names_only(server_hostname, sent, client: ClientTls, ca: trustme.CA) -> None:
    received = []
    server = server_context(ca.issue_cert(MX))
    server.sni_callback = lambda ssl_object, name, context: received.append(name)
    handshake(client.new_engine(MAY, server_hostname), server)
    assert received == [sent]


def test_session_from_a_previous_engine_resumes(client: ClientTls, ca: trustme.CA) -> None:
    server = server_context(ca.issue_cert(MX))
    first = client.new_engine(MAY, MX)
    handshake(first, server)
    second = client.new_engine(MAY, MX, session=first.ssl_object.session)
    handshake(second, server)
    assert not first.ssl_object.session_reused
    assert second.ssl_object.session_reused
    assert second.ssl_object.getpeercert(binary_form=True) == first.ssl_object.getpeercert(binary_form=True)


def test_a_session_never_crosses_tls_settings(client: ClientTls, ca: trustme.CA) -> None:
    first = client.new_engine(MAY, MX)
    handshake(first, server_context(ca.issue_cert(MX)))
    with pytest.raises(ValueError, match="different SSLContext"):
        client.new_engine(TLS12, MX, session=first.ssl_object.session)


def test_a_kept_session_resumes_after_its_connection_was_dropped_without_shutdown(
        client: ClientTls, ca: trustme.CA) -> None:
    """OpenSSL marks the session of an SSL freed without a TLS shutdown not resumable
    (ssl_clear_bad_session); the kept session is a copy, so that mark never reaches it,
    nor the one a dropped resumed connection leaves."""
    server = server_context(ca.issue_cert(MX))
    first = client.new_engine(MAY, MX)
    handshake(first, server)
    session = openssl_ext.session_of(first.ssl_object)
    del first  # dropped, as a connection the remote closes is
    gc.collect()
    for _ in range(2):
        again = client.new_engine(MAY, MX, session=session)
        handshake(again, server)
        assert again.ssl_object.session_reused
        del again
        gc.collect()


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # a failing __del__
def test_a_session_held_by_reference_resumes_even_after_it_is_dropped(client: ClientTls, ca: trustme.CA) -> None:
    """`session_of` keeps an in-memory copy of OpenSSL's session (no DER copy on CPython
    3.11); the connection it is offered to gets a copy of its own."""
    server = server_context(ca.issue_cert(MX))
    first = client.new_engine(MAY, MX)
    handshake(first, server)
    session = openssl_ext.session_of(first.ssl_object)
    assert isinstance(session, openssl_ext.HeldSession)
    assert session.has_ticket and session.timeout > 0
    second = client.new_engine(MAY, MX, session=session)
    del session
    gc.collect()
    handshake(second, server)
    assert second.ssl_object.session_reused


def test_a_held_session_never_crosses_tls_settings(client: ClientTls, ca: trustme.CA) -> None:
    first = client.new_engine(MAY, MX)
    handshake(first, server_context(ca.issue_cert(MX)))
    with pytest.raises(ValueError, match="different SSLContext"):
        client.new_engine(TLS12, MX, session=openssl_ext.session_of(first.ssl_object))


def test_where_the_layout_is_unknown_sessions_are_cpythons_copies(client: ClientTls, ca: trustme.CA,
                                                                   monkeypatch) -> None:
    """The path another Python build takes (no peer can stand in for an object layout):
    sessions are CPython's copies, and they still resume."""
    monkeypatch.setattr(openssl_ext, "_ssl_layout_known", False)
    server = server_context(ca.issue_cert(MX))
    first = client.new_engine(MAY, MX)
    handshake(first, server)
    session = openssl_ext.session_of(first.ssl_object)
    assert isinstance(session, ssl.SSLSession)
    second = client.new_engine(MAY, MX, session=session)
    handshake(second, server)
    assert second.ssl_object.session_reused


def test_chain_verdicts_forget_the_oldest_certificate() -> None:
    verdicts = ChainVerdicts(capacity=1)
    untrusted = VerifyVerdict(depth=0, code=18, message="self-signed certificate")
    verdicts.remember(b"first", [untrusted])
    assert verdicts.recall(b"first") == (untrusted,)
    verdicts.remember(b"second", [])
    assert verdicts.recall(b"second") == ()
    assert verdicts.recall(b"first") == (UNKNOWN_RESUMED_CHAIN,)


def test_a_resumed_tls13_session_names_an_rsa_server_key_rsa_pss_as_postfix_does(tmp_path: Path) -> None:
    """No signature is made on resumption, so the server key is named from its
    certificate; in TLS 1.3 an RSA key only ever signs with RSA-PSS, and Postfix's
    tls_misc.c words it that way (posttls-finger -r 1 shows it)."""
    from smtproxy.events import Direction, PeerTrust
    from smtproxy.tls.facts import build_facts

    rsa_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    rsa_ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client = ClientTls(OutboundTlsConfig(), tmp_path / "ca.pem")
    server = server_context(rsa_ca.issue_cert(MX, key_type=trustme.KeyType.RSA))
    first = client.new_engine(MAY, MX)
    handshake(first, server)
    second = client.new_engine(MAY, MX, session=openssl_ext.session_of(first.ssl_object))
    handshake(second, server)
    assert second.ssl_object.session_reused
    facts = [build_facts(engine, direction=Direction.OUTBOUND, peer_name=MX, peer_addr="192.0.2.1", peer_port=25,
                         duration=0.0, peer_trust=PeerTrust.VERIFIED, peer_certificate=None)
             for engine in (first, second)]
    assert [(f.server_signature, f.server_signature_detail) for f in facts] == [
        ("RSA-PSS", "2048 bits"), ("RSA-PSS", "2048 bits")], facts
