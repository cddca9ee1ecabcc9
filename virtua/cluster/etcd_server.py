"""Running real etcd members (Debian's etcd-server 3.4) for a lab or a test.

virtua never reimplements consensus: it starts etcd and talks to it. This module only
builds the command line of a member of a static cluster and waits until it answers.
With TLS (`MemberTLS`, certificates of virtua's etcd CA: virtua.cluster.etcd_pki) every
client and every peer must present a certificate of that CA: nobody else reaches the
cluster state, not even a host of the cluster.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from virtua.errors import Unavailable

# The operations one transaction may hold, for the members virtua starts: etcd's default of
# 128 is less than the puts of recording a VC of 128 nodes (one per VM and the VC's own);
# 2048 holds the largest VC (1000 nodes) with room. serve must be told the same number
# (--etcd-max-txn-ops) so that it refuses a larger transaction before it starts.
MAX_TXN_OPS = 2048


@dataclass(frozen=True)
class Member:
    name: str
    address: str  # the member's IP address
    client_port: int = 2379
    peer_port: int = 2380
    scheme: str = "http"  # https: the members run with MemberTLS

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"{self.scheme}://{self.address}:{self.peer_port}"


@dataclass(frozen=True)
class MemberTLS:
    """A member's certificate and key, and the CA its clients and peers must be signed by."""

    ca: Path
    cert: Path
    key: Path

    def flags(self) -> list[str]:
        return [
            "--cert-file", str(self.cert), "--key-file", str(self.key),
            "--client-cert-auth", "--trusted-ca-file", str(self.ca),
            "--peer-cert-file", str(self.cert), "--peer-key-file", str(self.key),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(self.ca),
        ]


def etcd_binary() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if path is None:
        raise Unavailable("etcd is not installed (Debian package etcd-server)")
    return path


def member_command(
    me: Member, cluster: list[Member], data_dir: Path, token: str, tls: MemberTLS | None = None,
    max_txn_ops: int = MAX_TXN_OPS,
) -> list[str]:
    initial = ",".join(f"{m.name}={m.peer_url}" for m in cluster)
    return [
        etcd_binary(),
        "--name", me.name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"{me.client_url},{me.scheme}://127.0.0.1:{me.client_port}"
        if me.address != "127.0.0.1" else me.client_url,
        "--advertise-client-urls", me.client_url,
        "--listen-peer-urls", me.peer_url,
        "--initial-advertise-peer-urls", me.peer_url,
        "--initial-cluster", initial,
        "--initial-cluster-token", token,
        "--initial-cluster-state", "new",
        # Short timeouts: the lab's members share one machine and a loopback-fast network.
        "--heartbeat-interval", "100",
        "--election-timeout", "1000",
        # a member cut off and back (a host's link down, then up) must not depose a leader
        # that kept its quorum: without pre-vote its raised term forced an election, and
        # every member stopped answering for seconds after the link came back
        "--pre-vote",
        "--max-txn-ops", str(max_txn_ops),
        "--logger", "zap",
        "--log-level", "warn",
        *(tls.flags() if tls else []),
    ]


def start_member(
    me: Member, cluster: list[Member], data_dir: Path, token: str, netns: str | None = None,
    tls: MemberTLS | None = None, max_txn_ops: int = MAX_TXN_OPS,
) -> subprocess.Popen[bytes]:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cmd = member_command(me, cluster, data_dir / "data", token, tls, max_txn_ops)
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    log = open(data_dir / "etcd.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_healthy(url: str, timeout: float = 20.0, netns: str | None = None,
                 context: ssl.SSLContext | None = None) -> None:
    """Until /health says true (a quorum exists and this member serves)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            if netns:
                r = subprocess.run(
                    ["ip", "netns", "exec", netns, "python3", "-c",
                     f"import urllib.request;print(urllib.request.urlopen('{url}/health',timeout=2).read().decode())"],
                    capture_output=True, text=True, timeout=5,
                )
                body = r.stdout
            else:
                with urllib.request.urlopen(f"{url}/health", timeout=2, context=context) as resp:
                    body = resp.read().decode()
            if '"health":"true"' in body.replace(" ", ""):
                return
            last = body.strip()
        except OSError as e:
            last = str(e)
        time.sleep(0.2)
    raise Unavailable(f"etcd at {url} is not healthy after {timeout:g} s: {last}")
