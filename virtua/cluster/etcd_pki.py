"""virtua's etcd CA: certificates for etcd members and for the managers that use them.

A CA apart from the cluster CA (`$VIRTUA_HOME/pki/etcd`, same code): every host holds a
certificate of the cluster CA, and etcd would let any certificate of its trusted CA read
and write everything. With its own CA, only the members (each other's peers) and the
managers' client certificate (`pki/etcd/manager`) get in.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from virtua.cluster.etcd_server import MemberTLS
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import Credentials, PeerRule
from virtua.pki.files import private_dir, write_private

MEMBER = PeerRule("host")  # a member's certificate: role host, name etcd-NAME


def etcd_ca(home: Path) -> ClusterCA:
    return ClusterCA.ensure(home / "pki" / "etcd", manager_sans=[])


def client_credentials(home: Path) -> Credentials:
    """What `virtua serve --etcd https://...` presents (and verifies members against)."""
    return Credentials(home / "pki" / "etcd" / "manager")


def member_tls(ca: ClusterCA, name: str, addresses: list[str], where: Path) -> MemberTLS:
    """A member's certificate (its addresses as names) and key in where/, and the CA."""
    private_dir(where)
    cert, key = ca.issue("host", f"etcd-{name}", sans=[*addresses, "127.0.0.1"])
    tls = MemberTLS(ca=where / "ca-cert.pem", cert=where / "cert.pem", key=where / "key.pem")
    write_private(tls.cert, cert)
    write_private(tls.key, key)
    write_private(tls.ca, ca.ca_pem)
    return tls


def client_context(creds: Credentials) -> ssl.SSLContext:
    """Verifies that the member is one (a member certificate of the etcd CA, for the address
    dialled) and presents the manager's certificate."""
    return creds.check().client_context(MEMBER)
