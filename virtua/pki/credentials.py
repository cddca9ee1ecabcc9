"""One party's credentials: a directory holding the CA certificate, its own certificate
and key, in the layout QEMU's tls-creds-x509 (endpoint=client) reads.

The same files give the TLS contexts of every TCP endpoint: servers that require (or
accept) client certificates from the cluster CA, and clients that present theirs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtua.errors import InvalidArgument
from virtua.pki.identity import Role, identity_from_peercert

CA_FILE = "ca-cert.pem"
CERT_FILE = "client-cert.pem"
KEY_FILE = "client-key.pem"


@dataclass(frozen=True)
class Credentials:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / CA_FILE

    @property
    def cert(self) -> Path:
        return self.dir / CERT_FILE

    @property
    def key(self) -> Path:
        return self.dir / KEY_FILE

    def complete(self) -> bool:
        return self.ca.exists() and self.cert.exists() and self.key.exists()

    def check(self) -> Credentials:
        if not self.complete():
            raise InvalidArgument(
                f"no credentials in {self.dir}: it needs {CA_FILE}, {CERT_FILE} and {KEY_FILE}"
            )
        return self

    def server_context(self, *, client_cert: str = "required", crl: Path | None = None) -> ssl.SSLContext:
        """A server that verifies client certificates against the CA: 'required' fails the
        handshake without one; 'optional' lets a client without one through (the API then
        answers 401 except on the join endpoint), but still refuses a bad one."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cafile=self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
        if crl is not None:
            ctx.load_verify_locations(cafile=crl)
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        return ctx

    def client_context(self, peer: PeerRule) -> ssl.SSLContext:
        """A client that verifies the server against the CA, and its role (and name) in
        the handshake, before a byte of the request goes out; presents this certificate."""
        ctx = peer_checked_context(peer, cafile=str(self.ca))
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True)
class PeerRule:
    """Whom a client expects at the other end: every certificate of the cluster CA
    verifies, so a host's certificate would otherwise pass for the manager's."""

    role: Role
    name: str | None = None  # None: any name of that role

    def check(self, cert: Any, where: str) -> None:
        ident = identity_from_peercert(cert)
        if ident is None:
            raise ssl.SSLCertVerificationError(f"{where}: the peer's certificate carries no virtua role")
        want = f"{self.role} {self.name}" if self.name else f"a {self.role}"
        if ident.role != self.role or (self.name is not None and ident.name != self.name):
            raise ssl.SSLCertVerificationError(
                f"{where}: the peer presents the certificate of {ident.role} {ident.name}, not of {want}: refusing"
            )


MANAGER = PeerRule("manager")


def peer_checked_context(peer: PeerRule, *, cafile: str | None = None, cadata: str | None = None) -> ssl.SSLContext:
    """ssl has no verify callback: the context's socket and memory-BIO classes check the
    peer's identity right after the handshake (httpx's sync and async transports use one
    each), so a mismatch fails the connection like a bad certificate does."""

    class CheckedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            peer.check(self.getpeercert(), str(self.server_hostname))

    class CheckedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            peer.check(self.getpeercert(), str(self.server_hostname))

    ctx = ssl.create_default_context(cafile=cafile, cadata=cadata)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.hostname_checks_common_name = False
    ctx.sslsocket_class = CheckedSocket
    ctx.sslobject_class = CheckedObject
    return ctx
