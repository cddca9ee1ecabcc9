"""TLS for the NBD server: X.509 with Python's ssl module, plus TLS-PSK through ctypes.

Python 3.11's ssl module has no PSK API, but its _ssl extension links the system
libssl dynamically.  We load that very library (found through /proc/self/maps, so
it is the same copy, not merely the same version), take the SSL_CTX* out of the
ssl.SSLContext object and install SSL_CTX_set_psk_server_callback on it.  OpenSSL
uses that callback for TLS 1.3 external PSKs too (with TLS_AES_128_GCM_SHA256,
the hash GnuTLS uses for them), which is what qemu-nbd, qemu-img, nbdkit and
libnbd (all GnuTLS) speak.  The key file is the psktool/qemu/nbdkit format:
``username:hexkey`` per line.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import weakref
from dataclasses import dataclass
from typing import Any

_CB_TYPE = ctypes.CFUNCTYPE(
    ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_uint
)

# Ciphers for TLS 1.2 (TLS 1.3 suites are configured separately and all enabled):
# Python's defaults plus PSK suites, so a PSK-only server also works with TLS 1.2.
_CIPHERS = (
    "ECDH+AESGCM:ECDH+CHACHA20:ECDH+AES:DHE+AES:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM:"
    "ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:"
    "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256"
)


class PSKUnavailable(RuntimeError):
    pass


def read_psk_file(path: str) -> dict[bytes, bytes]:
    """Parse a psktool-format key file: ``username:hexkey`` lines."""
    keys: dict[bytes, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, hexkey = line.partition(":")
            if not sep or not user:
                raise ValueError(f"{path}:{lineno}: expected username:hexkey")
            try:
                key = bytes.fromhex(hexkey.strip())
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: bad hex key") from e
            if not key or len(key) > 256:
                raise ValueError(f"{path}:{lineno}: key must be 1..256 bytes")
            keys[user.encode()] = key
    if not keys:
        raise ValueError(f"{path}: no keys")
    return keys


class _LibSSL:
    """The libssl the running _ssl module uses, with the few functions we need."""

    _inst: _LibSSL | None = None

    def __init__(self) -> None:
        path = None
        with open("/proc/self/maps", encoding="utf-8") as f:
            for line in f:
                p = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(p).startswith("libssl.so"):
                    path = p
                    break
        if path is None:
            raise PSKUnavailable("the ssl module does not use a shared libssl")
        lib = ctypes.CDLL(path)
        self.lib = lib
        lib.SSL_CTX_set_psk_server_callback.argtypes = [ctypes.c_void_p, _CB_TYPE]
        lib.SSL_CTX_set_psk_server_callback.restype = None
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_get_ex_data.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.SSL_get_ex_data.restype = ctypes.c_void_p

    @classmethod
    def get(cls) -> _LibSSL:
        if cls._inst is None:
            cls._inst = cls()
        return cls._inst


def _ssl_ctx_pointer(lib: _LibSSL, context: ssl.SSLContext) -> int:
    """The SSL_CTX* of an ssl.SSLContext (PySSLContext: PyObject_HEAD; SSL_CTX *ctx)."""
    ptr = ctypes.c_void_p.from_address(id(context) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    if not ptr:
        raise PSKUnavailable("cannot locate SSL_CTX")
    # Sanity check that we really hold the SSL_CTX: compare the option bits.
    context.options |= ssl.OP_NO_COMPRESSION
    if lib.lib.SSL_CTX_get_options(ptr) != int(context.options):
        raise PSKUnavailable("SSL_CTX layout check failed")
    return ptr


# identity recorded by the PSK callback, keyed by the ssl.SSLObject of the connection
_psk_identities: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def install_psk(context: ssl.SSLContext, keys: dict[bytes, bytes]) -> None:
    lib = _LibSSL.get()
    ctx_ptr = _ssl_ctx_pointer(lib, context)

    def callback(ssl_ptr: int, identity: bytes | None, psk: Any, max_len: int) -> int:
        try:
            if identity is None:
                return 0
            key = keys.get(identity)
            if key is None:
                # said here: OpenSSL itself only reports a bad record MAC or signature
                logging.getLogger("virtua.nbd").warning(
                    "nbd: TLS-PSK client offered unknown PSK identity %r (not in the key file)",
                    identity.decode("utf-8", "replace"),
                )
                return 0
            if len(key) > max_len:
                return 0
            ctypes.memmove(psk, key, len(key))
            # Python's _ssl stores its _SSLSocket as the SSL's app data (ex_data 0);
            # its .owner is the ssl.SSLObject the transport exposes as 'ssl_object'.
            app = lib.lib.SSL_get_ex_data(ssl_ptr, 0)
            if app:
                sock = ctypes.cast(app, ctypes.py_object).value
                owner = getattr(sock, "owner", None)
                if owner is not None:
                    _psk_identities[owner] = identity.decode("utf-8", "replace")
            return len(key)
        except Exception:  # never let an exception escape into OpenSSL
            return 0

    cb = _CB_TYPE(callback)
    lib.lib.SSL_CTX_set_psk_server_callback(ctx_ptr, cb)
    # keep the callback alive as long as the context
    context._virtua_psk_cb = cb  # type: ignore[attr-defined]


def psk_identity(ssl_object: Any) -> str | None:
    if ssl_object is None:
        return None
    try:
        return _psk_identities.get(ssl_object)
    except TypeError:
        return None


@dataclass
class TLSConfig:
    """Server TLS credentials: X.509 (certfile+keyfile, optional cafile to require
    and verify client certificates) and/or a PSK key file."""

    certfile: str | None = None
    keyfile: str | None = None
    cafile: str | None = None
    psk_file: str | None = None
    crlfile: str | None = None  # revoked client certificates (rebuild the context to reload)

    def build_context(self) -> ssl.SSLContext:
        if not self.certfile and not self.psk_file:
            raise ValueError("TLS needs a certificate or a PSK file")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(_CIPHERS)
        if self.certfile:
            ctx.load_cert_chain(self.certfile, self.keyfile)
        if self.cafile:
            ctx.load_verify_locations(cafile=self.cafile)
            ctx.verify_mode = ssl.CERT_REQUIRED if not self.psk_file else ssl.CERT_OPTIONAL
            if self.crlfile:
                ctx.load_verify_locations(cafile=self.crlfile)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if self.psk_file:
            install_psk(ctx, read_psk_file(self.psk_file))
        return ctx


def peer_serial(transport: Any) -> int | None:
    """The serial number of a verified client certificate (None under PSK or without one):
    what a revocation names."""
    cert = transport.get_extra_info("peercert")
    try:
        return int(str(cert["serialNumber"]), 16) if cert else None
    except (KeyError, ValueError):
        return None


def peer_identity(transport: Any) -> str | None:
    """PSK username, or the CN of a verified client certificate."""
    sslobj = transport.get_extra_info("ssl_object")
    ident = psk_identity(sslobj)
    if ident is not None:
        return ident
    cert = transport.get_extra_info("peercert")
    if cert:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return str(value)
    return None
