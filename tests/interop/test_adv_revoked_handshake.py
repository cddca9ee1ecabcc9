"""Adversarial: a TLS handshake that began before a revocation (under the context without
the new CRL) must not yield a session drop_revoked would have cut."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from virtua.nbd.client import NBDClient, OptionError
from virtua.nbd.server import NBDServer
from virtua.nbd.tls import TLSConfig
from virtua.nbd.volumes import StorageExports
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import MANAGER, Credentials
from virtua.pki.files import write_private
from virtua.storage.service import Storage

pytestmark = pytest.mark.interop


def test_a_session_whose_handshake_raced_the_revocation_is_cut(tmp_path: Path) -> None:
    ca = ClusterCA.ensure(tmp_path / "pki", manager_sans=["127.0.0.1"])
    storage = Storage(tmp_path / "home")
    storage.create_pool("p", capacity=64 << 20)
    storage.pool("p").create_volume("v", 1 << 20)
    exports = StorageExports(storage, {"p/v": {"admin"}})
    m = ca.manager
    nbd = NBDServer(exports, tls=TLSConfig(str(m.cert), str(m.key), str(m.ca)), tls_mode="require",
                    holders=storage.holders)
    cert, key = ca.issue("admin", "admin")
    creds = Credentials(tmp_path / "c")
    creds.dir.mkdir(mode=0o700)
    write_private(creds.ca, ca.ca_pem)
    write_private(creds.cert, cert)
    write_private(creds.key, key)
    serial = x509.load_pem_x509_certificate(cert).serial_number

    def session() -> bytes:
        c = NBDClient.connect("127.0.0.1", nbd.port, timeout=10)
        c.open("p/v", structured=False, tls=creds.client_context(MANAGER), tls_hostname="127.0.0.1")
        try:
            return c.read(0, 4096)
        finally:
            c.close()

    async def go() -> None:
        await nbd.start(host="127.0.0.1", port=0)
        try:
            assert len(await asyncio.to_thread(session)) == 4096  # control
            ca.revoke_serials([serial], "test")
            # serve's cut_revoked ran; the context of a handshake already under way has no CRL
            # (reload_crl replaced nbd.ssl_context after that handshake took the old one)
            nbd.drop_revoked(ca.is_revoked)
            with pytest.raises((OSError, ConnectionError, ssl.SSLError, OptionError)):
                await asyncio.to_thread(session)
        finally:
            await nbd.close()

    asyncio.run(go())
    storage.close()
