"""The few OpenSSL calls Python 3.11's `ssl` does not expose, via ctypes on the same libssl.

Reaching the `SSL_CTX *` of an `ssl.SSLContext` relies on CPython's object layout
(PyObject_HEAD, then the pointer).  Every pointer is validated before use: OpenSSL must
report the same option bits for it as Python does for the context, and the library
loaded here must be the very version Python's `_ssl` was built against.  The `SSL *` of
a memory-BIO `ssl.SSLObject` (PyObject_HEAD, a NULL socket weakref, then the pointer) is
read only on CPython 3.11 and must belong to the `SSL_CTX` of the object's context.

Verification verdicts: the verify callback installed here accepts every certificate (so a
server can take self-signed client certificates whose fingerprint is listed) but records
OpenSSL's own verdict for the handshake in progress.  Handshakes run synchronously inside
`do_handshake()` on the event-loop thread, so the engine marks itself as the current
handshake around that call (`recording`), and the callback attributes verdicts to it.

Client sessions for resumption are kept as in-memory copies (`HeldSession`) taken on that
same `SSL *`, instead of the DER copies CPython makes of every session read or offered.

Session tickets are sealed with keys of our own (`TicketKeys`, through OpenSSL's ticket-key
callback) so that worker processes share them and they can be rotated.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import ssl
import sys
from collections.abc import Callable, Iterator

_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_SET_SESS_CACHE_MODE = 44
_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_SET_DH_AUTO = 118
TICKET_KEY_LENGTH = 80  # key name 16, HMAC-SHA256 secret 32, AES-256 key 32 (OpenSSL's own layout)
_SSL_SESS_CACHE_OFF = 0

_VERIFY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)
# int cb(SSL *, unsigned char key_name[16], unsigned char *iv, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int enc)
_TICKET_KEY_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)


# int cb(SSL *, int *alert, void *arg)
_CLIENT_HELLO_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
_CLIENT_HELLO_SUCCESS = 1
_TLSEXT_TYPE_SERVER_NAME = 0

_P = ctypes.c_void_p
# name -> (return type, argument types) of each libssl/libcrypto function used here
_SIGNATURES = {
    "SSL_CTX_get_options": (ctypes.c_uint64, [_P]),
    "SSL_CTX_ctrl": (ctypes.c_long, [_P, ctypes.c_int, ctypes.c_long, _P]),
    "SSL_CTX_set_timeout": (ctypes.c_long, [_P, ctypes.c_long]),
    "SSL_CTX_set_verify": (None, [_P, ctypes.c_int, _VERIFY_CALLBACK]),
    "SSL_CTX_set_verify_depth": (None, [_P, ctypes.c_int]),
    "X509_STORE_CTX_get_error": (ctypes.c_int, [_P]),
    "X509_STORE_CTX_get_error_depth": (ctypes.c_int, [_P]),
    "X509_verify_cert_error_string": (ctypes.c_char_p, [ctypes.c_long]),
    "SSL_get_SSL_CTX": (_P, [_P]),
    "SSL_set_msg_callback": (None, [_P, _P]),
    "SSL_get_session": (_P, [_P]),
    "SSL_SESSION_dup": (_P, [_P]),
    "SSL_set_session": (ctypes.c_int, [_P, _P]),
    "SSL_get_verify_result": (ctypes.c_long, [_P]),
    "SSL_SESSION_free": (None, [_P]),
    "SSL_SESSION_get_timeout": (ctypes.c_long, [_P]),
    "SSL_SESSION_has_ticket": (ctypes.c_int, [_P]),
    "SSL_SESSION_get_id": (_P, [_P, ctypes.POINTER(ctypes.c_uint)]),
    "SSL_CTX_set_tlsext_ticket_key_evp_cb": (ctypes.c_int, [_P, _TICKET_KEY_CALLBACK]),
    "SSL_CTX_set_session_id_context": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_uint]),
    "EVP_CIPHER_fetch": (_P, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "EVP_EncryptInit_ex": (ctypes.c_int, [_P, _P, _P, _P, _P]),
    "EVP_DecryptInit_ex": (ctypes.c_int, [_P, _P, _P, _P, _P]),
    "EVP_MAC_CTX_set_params": (ctypes.c_int, [_P, _P]),
    "RAND_bytes": (ctypes.c_int, [_P, ctypes.c_int]),
    "SSL_load_client_CA_file": (_P, [ctypes.c_char_p]),
    "SSL_CTX_set_client_CA_list": (None, [_P, _P]),
    "ERR_clear_error": (None, []),
    "SSL_CTX_set_client_hello_cb": (None, [_P, _CLIENT_HELLO_CALLBACK, _P]),
    "SSL_client_hello_get0_ext": (ctypes.c_int, [_P, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p),
                                                 ctypes.POINTER(ctypes.c_size_t)]),
    "SSL_set_session_id_context": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_uint]),
    "SSL_get_peer_cert_chain": (_P, [_P]),
    "OPENSSL_sk_num": (ctypes.c_int, [_P]),
    "OPENSSL_sk_value": (_P, [_P, ctypes.c_int]),
    "i2d_X509": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_void_p)]),
}


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("ssl") or "libssl.so.3"
    lib = ctypes.CDLL(name)
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise RuntimeError(f"{name} is not the OpenSSL the ssl module uses ({ssl.OPENSSL_VERSION})")
    for function, (restype, argtypes) in _SIGNATURES.items():
        getattr(lib, function).restype = restype
        getattr(lib, function).argtypes = argtypes
    return lib


_lib = _load()


def _ctx_pointer(context: ssl.SSLContext) -> int:
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer or _lib.SSL_CTX_get_options(pointer) != context.options:
        raise RuntimeError("cannot locate the SSL_CTX of an ssl.SSLContext on this Python build")
    return pointer


def _ssl_pointer(ssl_object: ssl.SSLObject) -> int:
    """The `SSL *` of a memory-BIO SSLObject: its `Socket` member must be NULL and the
    pointer after it must belong to the object's `SSL_CTX` (checked before any use)."""
    socket_member, pointer = (ctypes.c_void_p * 2).from_address(id(ssl_object._sslobj) + object.__basicsize__)
    if socket_member is not None or not pointer or _lib.SSL_get_SSL_CTX(pointer) != _ctx_pointer(ssl_object.context):
        raise RuntimeError("cannot locate the SSL of an ssl.SSLObject on this Python build")
    return pointer


# PySSLSocket's layout (PyObject_HEAD, Socket, ssl) is the one read above in CPython 3.11;
# elsewhere the saving below is skipped rather than guessed.
_ssl_layout_known = sys.version_info[:2] == (3, 11)


def stop_message_callback(ssl_object: ssl.SSLObject) -> None:
    """No more `SSLContext._msg_callback` calls for this connection: after the handshake
    it would only copy every application-data record into a bytes object for nothing.
    On a Python build whose object layout does not match, this saving is skipped (the
    callback then keeps running, as it would without it)."""
    global _ssl_layout_known
    if not _ssl_layout_known:
        return
    try:
        pointer = _ssl_pointer(ssl_object)
    except RuntimeError:
        _ssl_layout_known = False
        return
    _lib.SSL_set_msg_callback(pointer, None)


class HeldSession:
    """A client `SSL_SESSION` of our own, with `ssl.SSLSession`'s `timeout`, `has_ticket`
    and `id`.

    CPython 3.11 copies a session through DER (i2d, then d2i, which parses the server's
    certificate and key again) each time `SSLObject.session` is read and each time a
    session is handed to `wrap_bio`: a fifth of the CPU of a new outbound connection
    (py-spy, OpenSSL 3).  `SSL_SESSION_dup` copies one in memory instead (the
    certificates are shared by reference count).  A copy is taken when the session is
    kept and another each time it is offered, never the connection's own object: OpenSSL
    marks the session of a connection freed without a TLS shutdown not resumable
    (`ssl_clear_bad_session`), and connections are dropped that way. The context a session
    came from is kept, so one is never offered to another (CPython's own check).
    """

    __slots__ = ("_pointer", "context", "timeout", "has_ticket", "id")
    _free = _lib.SSL_SESSION_free  # still there when the module is torn down at exit

    def __init__(self, pointer: int, context: ssl.SSLContext) -> None:
        self._pointer = pointer
        self.context = context
        self.timeout = _lib.SSL_SESSION_get_timeout(pointer)
        self.has_ticket = bool(_lib.SSL_SESSION_has_ticket(pointer))
        length = ctypes.c_uint()
        self.id = ctypes.string_at(_lib.SSL_SESSION_get_id(pointer, ctypes.byref(length)), length.value)

    def __del__(self) -> None:
        self._free(self._pointer)


Session = HeldSession | ssl.SSLSession


def session_of(ssl_object: ssl.SSLObject) -> Session | None:
    """The TLS session of a client connection, to offer again later: held by reference
    where this Python's object layout is known, else CPython's copy."""
    if _ssl_layout_known:
        try:
            pointer = _ssl_pointer(ssl_object)
        except RuntimeError:
            return ssl_object.session
        session = _lib.SSL_get_session(pointer)
        copy = _lib.SSL_SESSION_dup(session) if session else None
        return HeldSession(copy, ssl_object.context) if copy else None
    return ssl_object.session


def offer_session(ssl_object: ssl.SSLObject, session: Session) -> None:
    """Offer `session` for resumption on a client connection before its handshake."""
    if not isinstance(session, HeldSession):
        ssl_object.session = session
        return
    if session.context is not ssl_object.context:
        raise ValueError("Session refers to a different SSLContext.")
    pointer = _ssl_pointer(ssl_object)
    copy = _lib.SSL_SESSION_dup(session._pointer)
    if not copy:
        raise MemoryError("SSL_SESSION_dup")
    try:
        _check(_lib.SSL_set_session(pointer, copy), "SSL_set_session")
    finally:
        _lib.SSL_SESSION_free(copy)  # the connection holds its own reference now


X509_V_OK = 0


def verify_result(ssl_object: ssl.SSLObject) -> int | None:
    """OpenSSL's verify result of the connection (`SSL_get_verify_result`); a resumed
    handshake gets the one its session kept. None where this Python's layout hides it."""
    if not _ssl_layout_known:
        return None
    try:
        return _lib.SSL_get_verify_result(_ssl_pointer(ssl_object))
    except RuntimeError:
        return None


def peer_chain(ssl_object: ssl.SSLObject) -> list[bytes]:
    """The certificates the server presented, leaf first, as DER (`SSL_get_peer_cert_chain`,
    which Python 3.11 does not expose).  A resumed client session keeps the chain of the
    handshake that made it, as sessions are held by reference here (`HeldSession`).
    Empty where this Python's layout hides it."""
    if not _ssl_layout_known:
        return []
    try:
        stack = _lib.SSL_get_peer_cert_chain(_ssl_pointer(ssl_object))
    except RuntimeError:
        return []
    if not stack:
        return []
    return [_der(_lib.OPENSSL_sk_value(stack, index)) for index in range(_lib.OPENSSL_sk_num(stack))]


def _der(certificate: int) -> bytes:
    length = _lib.i2d_X509(certificate, None)
    if length <= 0:
        raise ValueError("i2d_X509 failed")
    buffer = ctypes.create_string_buffer(length)
    cursor = ctypes.c_void_p(ctypes.addressof(buffer))  # i2d_X509 writes here and advances it
    _lib.i2d_X509(certificate, ctypes.byref(cursor))
    return buffer.raw


def _check(result: int, what: str) -> None:
    if result != 1:
        raise ValueError(what)


def set_groups(context: ssl.SSLContext, names: tuple[str, ...] | list[str]) -> None:
    """Key-exchange groups in preference order (SSL_CTX_set1_groups_list)."""
    joined = ":".join(names).encode("ascii")
    _check(
        _lib.SSL_CTX_ctrl(_ctx_pointer(context), _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(joined)),
        f"OpenSSL rejected the group list {':'.join(names)}",
    )


def set_dh_auto(context: ssl.SSLContext) -> None:
    """Let OpenSSL pick its built-in RFC 7919 group matching the certificate's strength."""
    _check(_lib.SSL_CTX_ctrl(_ctx_pointer(context), _SSL_CTRL_SET_DH_AUTO, 1, None), "SSL_CTX_set_dh_auto failed")


class _OsslParam(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", _P),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_OSSL_PARAM_UTF8_STRING, _OSSL_PARAM_OCTET_STRING = 4, 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value
_SHA256 = ctypes.create_string_buffer(b"SHA256")
_AES_256_CBC = _lib.EVP_CIPHER_fetch(None, b"AES-256-CBC", None)  # fetched once, kept for the process
if not _AES_256_CBC:
    raise ImportError("OpenSSL has no AES-256-CBC for session tickets")
_IV_LENGTH = 16


class _TicketKey:
    """One key in OpenSSL's layout, with the HMAC parameters prepared for every ticket."""

    __slots__ = ("name", "_hmac", "aes", "mac_params")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != TICKET_KEY_LENGTH:
            raise ValueError(f"a session-ticket key is {TICKET_KEY_LENGTH} bytes, not {len(raw)}")
        self.name = raw[:16]
        self._hmac = ctypes.create_string_buffer(raw[16:48], 32)
        self.aes = ctypes.create_string_buffer(raw[48:80], 32)
        self.mac_params = (_OsslParam * 3)(
            _OsslParam(b"key", _OSSL_PARAM_OCTET_STRING, ctypes.addressof(self._hmac), 32, _OSSL_PARAM_UNMODIFIED),
            _OsslParam(b"digest", _OSSL_PARAM_UTF8_STRING, ctypes.addressof(_SHA256), 6, _OSSL_PARAM_UNMODIFIED),
            _OsslParam(None, 0, None, 0, 0),
        )


class TicketKeys:
    """The keys that seal session tickets (TLS 1.2 tickets and TLS 1.3 resumption): the
    newest seals, it and the one before it open.  Rotating them (`ticket_rotation`) bounds
    how long one key serves, and so which recorded tickets (they carry the session's
    secrets) a stolen key opens; processes given the same keys resume each other's
    sessions."""

    def __init__(self, current: bytes, previous: bytes | None = None) -> None:
        self._keys = [_TicketKey(current)] + ([_TicketKey(previous)] if previous is not None else [])
        self._callback = _TICKET_KEY_CALLBACK(self._on_ticket)

    def rotate(self, new: bytes) -> None:
        """`new` seals from now on; the current key still opens; the one before is dropped."""
        self._keys = [_TicketKey(new), self._keys[0]]

    def install(self, context: ssl.SSLContext) -> None:
        _check(_lib.SSL_CTX_set_tlsext_ticket_key_evp_cb(_ctx_pointer(context), self._callback),
               "SSL_CTX_set_tlsext_ticket_key_evp_cb failed")
        context.smtproxy_ticket_keys = self  # OpenSSL holds only a pointer to the callback

    def _on_ticket(self, _ssl: int, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int, seal: int) -> int:
        """OpenSSL's contract: sealing returns 1 (0: no ticket); opening returns 0 for an
        unknown key (a full handshake follows), 1 for the current key, 2 for an older one
        (the ticket is accepted and replaced by one under the current key).  An exception
        here (none is expected) costs a ticket or a resumption, never the handshake."""
        try:
            if seal:
                return self._seal(key_name, iv, cipher_ctx, mac_ctx)
            return self._open(key_name, iv, cipher_ctx, mac_ctx)
        except Exception:
            return 0

    def _seal(self, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int) -> int:
        key = self._keys[0]
        ctypes.memmove(key_name, key.name, 16)
        return int(_lib.RAND_bytes(iv, _IV_LENGTH) == 1
                   and _lib.EVP_EncryptInit_ex(cipher_ctx, _AES_256_CBC, None, key.aes, iv) == 1
                   and _lib.EVP_MAC_CTX_set_params(mac_ctx, key.mac_params) == 1)

    def _open(self, key_name: int, iv: int, cipher_ctx: int, mac_ctx: int) -> int:
        name = ctypes.string_at(key_name, 16)
        for age, key in enumerate(self._keys):
            if key.name == name:
                ready = (_lib.EVP_MAC_CTX_set_params(mac_ctx, key.mac_params) == 1
                         and _lib.EVP_DecryptInit_ex(cipher_ctx, _AES_256_CBC, None, key.aes, iv) == 1)
                return (2 if age else 1) if ready else 0
        return 0


def set_session_id_context(context: ssl.SSLContext, value: bytes) -> None:
    """OpenSSL resumes a session, cached or from a ticket, only under the session ID context
    it was made under (at most 32 bytes; SSL_CTX_set_session_id_context)."""
    _check(_lib.SSL_CTX_set_session_id_context(_ctx_pointer(context), value, len(value)),
           "SSL_CTX_set_session_id_context failed")


def name_client_cas(context: ssl.SSLContext, ca_file: str) -> None:
    """Name the CAs of `ca_file` in the server's certificate request, as Postfix does with
    smtpd_tls_CAfile: a client holding several certificates picks one of theirs (Python's
    `load_verify_locations` only trusts them).  A file without a certificate names none."""
    names = _lib.SSL_load_client_CA_file(ca_file.encode())
    if not names:
        _lib.ERR_clear_error()  # not to be read later as the error of another call
        return
    _lib.SSL_CTX_set_client_CA_list(_ctx_pointer(context), names)  # the context owns the list


def session_id_context_by_sni(context: ssl.SSLContext, choose: Callable[[str | None], bytes]) -> None:
    """Give each connection, as its ClientHello arrives, the session ID context `choose`
    names for the client's SNI (None: no SNI). OpenSSL then resumes a session (a TLS 1.2
    session ID or ticket, a TLS 1.3 PSK) only under the name group it was made for: RFC
    6066 section 3, a server must not resume a session under another server name, whose
    certificate the client never saw. Python's sni_callback comes too late for this:
    OpenSSL has judged the offered session by then."""

    def on_client_hello(ssl_pointer: int, _alert: int, _arg: int) -> int:
        data, length = ctypes.c_void_p(), ctypes.c_size_t()
        found = _lib.SSL_client_hello_get0_ext(ssl_pointer, _TLSEXT_TYPE_SERVER_NAME, ctypes.byref(data),
                                               ctypes.byref(length))
        value = choose(sni_host_name(ctypes.string_at(data, length.value)) if found == 1 else None)
        _lib.SSL_set_session_id_context(ssl_pointer, value, len(value))
        return _CLIENT_HELLO_SUCCESS

    callback = _CLIENT_HELLO_CALLBACK(on_client_hello)
    context.smtproxy_client_hello_callback = callback  # the context keeps what OpenSSL calls
    _lib.SSL_CTX_set_client_hello_cb(_ctx_pointer(context), callback, None)


def sni_host_name(extension: bytes) -> str | None:
    """The host name in a server_name extension's body (RFC 6066 section 3), lower-case."""
    end, position = 2 + int.from_bytes(extension[:2], "big"), 2
    while position + 3 <= min(end, len(extension)):
        kind, size = extension[position], int.from_bytes(extension[position + 1:position + 3], "big")
        name = extension[position + 3:position + 3 + size]
        if kind == 0:
            return name.decode("ascii", "replace").lower()
        position += 3 + size
    return None


def set_verify_depth(context: ssl.SSLContext, depth: int) -> None:
    """Most intermediate certificates allowed in a chain (SSL_CTX_set_verify_depth)."""
    _lib.SSL_CTX_set_verify_depth(_ctx_pointer(context), depth)


def set_session_cache(context: ssl.SSLContext, size: int, timeout: int) -> None:
    """Server session cache size (0 turns the cache off) and session lifetime in seconds."""
    pointer = _ctx_pointer(context)
    if size == 0:
        _lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_MODE, _SSL_SESS_CACHE_OFF, None)
    else:
        _lib.SSL_CTX_ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    _lib.SSL_CTX_set_timeout(pointer, timeout)


@dataclasses.dataclass(frozen=True, slots=True)
class VerifyVerdict:
    depth: int
    code: int
    message: str


class VerifyRecorder:
    """Where the verify callback puts OpenSSL's verdicts for the handshake in progress."""

    def __init__(self) -> None:
        self.verdicts: list[VerifyVerdict] = []

    @property
    def verified(self) -> bool:
        return not self.verdicts


_current: VerifyRecorder | None = None


@contextlib.contextmanager
def recording(recorder: VerifyRecorder) -> Iterator[None]:
    global _current
    previous, _current = _current, recorder
    try:
        yield
    finally:
        _current = previous


@_VERIFY_CALLBACK
def _accept_and_record(preverify_ok: int, store_ctx: int) -> int:
    if not preverify_ok and _current is not None:
        code = _lib.X509_STORE_CTX_get_error(store_ctx)
        message = (_lib.X509_verify_cert_error_string(code) or b"").decode("ascii", "replace")
        _current.verdicts.append(VerifyVerdict(_lib.X509_STORE_CTX_get_error_depth(store_ctx), code, message))
    return 1


def accept_and_record_verification(context: ssl.SSLContext) -> None:
    """Keep `context.verify_mode`, but accept every chain and record OpenSSL's verdict."""
    mode = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}[context.verify_mode]
    _lib.SSL_CTX_set_verify(_ctx_pointer(context), mode, _accept_and_record)
