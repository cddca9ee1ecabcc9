"""One party's credentials: a directory holding the CA certificate, its own certificate
and key, in the layout QEMU's tls-creds-x509 (endpoint=client) reads.

The same files give the TLS contexts of every TCP endpoint: servers that require (or
accept) client certificates from the cluster CA, and clients that present theirs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from virtua.errors import InvalidArgument

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

    def client_context(self) -> ssl.SSLContext:
        """A client that verifies the server against the CA and presents its certificate."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        return ctx
