"""Break B1 of the adversarial pass, reproduced: every certificate of the cluster CA
verified, so a host holding one for the manager's address (or another host's) was taken
for the manager by the CLI, by agents and by QEMU, and for another host by the manager.

Here a real TLS server presents a host's certificate for 127.0.0.1 and records every
byte it is sent; each client must refuse it in the handshake, before the admin token,
a join token or a request body leaves, and each has its control with the right peer."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_support import VIRTUA, free_port
from virtua.cluster.model import HostRecord
from virtua.errors import Unavailable
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import Credentials
from virtua.pki.files import write_private

pytestmark = pytest.mark.interop


def creds_for(ca: ClusterCA, where: Path, role: str, name: str, sans: list[str]) -> Credentials:
    cert, key = ca.issue(role, name, sans)  # type: ignore[arg-type]
    c = Credentials(where)
    where.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private(c.ca, ca.ca_pem)
    write_private(c.cert, cert)
    write_private(c.key, key)
    return c


class Impostor:
    """An HTTPS server with someone's certificate. It answers GET /v1/join/ca (the CA
    certificate is public) and records the decrypted bytes of every connection."""

    def __init__(self, ca: ClusterCA, creds: Credentials) -> None:
        self.ca = ca
        self.ctx = creds.server_context(client_cert="optional")
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.handshakes = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as tls:
                self.handshakes += 1
                data = _read_request(tls)
                self.received += data
                if data.startswith(b"GET /v1/join/ca"):
                    body = json.dumps({"ca": self.ca.ca_pem.decode(), "sha256": self.ca.fingerprint}).encode()
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                                + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
                elif data:
                    tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
        except (OSError, ssl.SSLError):
            pass

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.sock.close()


def _read_request(tls: ssl.SSLSocket) -> bytes:
    """One whole HTTP request (headers and a content-length body), or what came."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


@pytest.fixture
def ca(tmp_path: Path) -> ClusterCA:
    return ClusterCA.ensure(tmp_path / "pki", manager_sans=["127.0.0.1", "localhost"])


@pytest.fixture
def host_impostor(ca: ClusterCA, tmp_path: Path) -> Iterator[Impostor]:
    """Host `evil`, with a certificate for 127.0.0.1: the manager's address here."""
    imp = Impostor(ca, creds_for(ca, tmp_path / "evil", "host", "evil", ["127.0.0.1"]))
    yield imp
    imp.close()


def test_the_cli_sends_the_admin_token_to_the_manager_only(ca: ClusterCA, host_impostor: Impostor) -> None:
    token = ca.admin_token_path.read_text().strip()
    r = subprocess.run(
        [*VIRTUA, "--api", host_impostor.url, "--ca", str(ca.dir / "ca-cert.pem"),
         "--token-file", str(ca.admin_token_path), "volume", "list"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode != 0 and "host evil" in r.stderr and "not of a manager" in r.stderr, r.stderr
    assert host_impostor.handshakes == 0 or host_impostor.received == b"", "nothing after the handshake"
    assert token.encode() not in host_impostor.received
    # and with the admin certificate instead of the token
    r = subprocess.run([*VIRTUA, "--api", host_impostor.url, "--cert", str(ca.admin.dir), "volume", "list"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "host evil" in r.stderr, r.stderr
    assert host_impostor.received == b""


def test_the_cli_control_the_manager_certificate_passes(ca: ClusterCA) -> None:
    imp = Impostor(ca, ca.manager)
    try:
        r = subprocess.run(
            [*VIRTUA, "--api", imp.url, "--ca", str(ca.dir / "ca-cert.pem"),
             "--token-file", str(ca.admin_token_path), "volume", "list", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        assert b"GET /v1/volumes HTTP/1.1" in imp.received, (r.stderr, imp.received)
    finally:
        imp.close()


def test_an_agent_sends_its_join_token_to_the_manager_only(
    ca: ClusterCA, host_impostor: Impostor, tmp_path: Path
) -> None:
    from virtua.pki.tokens import JoinTokens

    token, _ = JoinTokens(ca.dir / "tokens.json", ca.fingerprint).create(600)
    token_file = tmp_path / "token"
    write_private(token_file, f"{token}\n".encode())
    r = subprocess.run(
        [*VIRTUA, "--home", str(tmp_path / "agent"), "agent", "--name", "h1", "--listen",
         f"127.0.0.1:{free_port()}", "--manager", host_impostor.url, "--no-network",
         "--join-token-file", str(token_file)],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode != 0 and "host evil" in r.stderr, r.stderr
    assert b"GET /v1/join/ca" in host_impostor.received, "control: it did reach the impostor"
    assert token.secret.encode() not in host_impostor.received
    assert b"/v1/join " not in host_impostor.received and b"POST" not in host_impostor.received


def test_the_manager_calls_a_host_only_on_its_own_certificate(ca: ClusterCA, tmp_path: Path) -> None:
    """h2's agent (or anyone with h2's certificate) at h1's address gets no request meant for h1."""
    from virtua.cluster.manager import Manager
    from virtua.cluster.store import SQLiteStore
    from virtua.storage.service import Storage

    other = Impostor(ca, creds_for(ca, tmp_path / "h2", "host", "h2", ["127.0.0.1"]))
    m = Manager(tmp_path, Storage(tmp_path / "home"), SQLiteStore(tmp_path / "m.db"), authority=ca)
    h1 = HostRecord(name="h1", address=f"127.0.0.1:{other.port}", cores=1, memory_mb=512)

    async def call(h: HostRecord) -> object:
        try:
            return await m._agent(h, "POST", "/v1/vm/exec", json={"id": "vc/n1", "script": "secret-script"})
        finally:
            await m.close()

    try:
        with pytest.raises(Unavailable, match="host h2.*not of host h1"):
            asyncio.run(call(h1))
        assert b"secret-script" not in other.received and other.received == b""
        # control: the same server is h2 to a manager that calls h2
        m2 = Manager(tmp_path, Storage(tmp_path / "home"), SQLiteStore(tmp_path / "m.db"), authority=ca)
        m = m2
        asyncio.run(call(h1.model_copy(update={"name": "h2"})))
        assert b"secret-script" in other.received
    finally:
        other.close()


def _qemu_img_info(creds_dir: Path, port: int, hostname: str | None) -> subprocess.CompletedProcess[str]:
    opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=,tls-creds=tls0"
    if hostname:
        opts += f",tls-hostname={hostname}"
    return subprocess.run(
        ["qemu-img", "info", "--object", f"tls-creds-x509,id=tls0,dir={creds_dir},endpoint=client",
         "--image-opts", opts], capture_output=True, text=True, timeout=60,
    )


def _qemu_nbd(server_dir: Path, image: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={server_dir},verify-peer=no",
         "--tls-creds", "tls0", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "--persistent", str(image)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            import time

            time.sleep(0.05)
    raise AssertionError("qemu-nbd did not listen")


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="needs qemu-utils (installed by ./run)")
def test_qemu_checks_the_manager_name_not_the_address(ca: ClusterCA, tmp_path: Path) -> None:
    """VM disks are opened with tls-hostname=virtua-manager: a host's certificate for the
    manager's address no longer passes for the manager's NBD server."""
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\0" * (1 << 20))
    client = creds_for(ca, tmp_path / "client", "host", "h1", ["127.0.0.2"])

    def server_dir(c: Credentials, d: Path) -> Path:
        d.mkdir(mode=0o700)
        shutil.copy(c.ca, d / "ca-cert.pem")
        shutil.copy(c.cert, d / "server-cert.pem")
        shutil.copy(c.key, d / "server-key.pem")
        return d

    evil = creds_for(ca, tmp_path / "evil", "host", "evil", ["127.0.0.1"])
    for creds, d, passes in ((evil, tmp_path / "s-evil", False), (ca.manager, tmp_path / "s-mgr", True)):
        port = free_port()
        proc = _qemu_nbd(server_dir(creds, d), image, port)
        try:
            by_address = _qemu_img_info(client.dir, port, None)
            assert by_address.returncode == 0, "the old check (the address) passes either certificate"
            by_name = _qemu_img_info(client.dir, port, "virtua-manager")
            assert (by_name.returncode == 0) == passes, by_name.stderr
            if not passes:
                assert "hostname" in by_name.stderr.lower() or "certificate" in by_name.stderr.lower(), by_name.stderr
        finally:
            proc.terminate()
            proc.wait(10)


def test_an_agent_opens_vm_disks_by_the_manager_name(tmp_path: Path) -> None:
    from virtua.cluster.agent import Agent, AgentConfig
    from virtua.cluster.model import VMLaunch
    from virtua.vmm.qemu import build_cmdline

    agent = Agent(AgentConfig(name="h1", listen="127.0.0.1:1", manager="https://127.0.0.1:2", home=tmp_path))
    launch = VMLaunch(id="vc/n1", hostname="n1", cpus=1, memory_mb=128, kernel_url="k", kernel_digest="0",
                      cmdline="", disks=["nbds://10.0.0.1:10809/default/vc-n1"])
    argv = build_cmdline(agent._spec(launch, tmp_path / "kernel", None))
    (blockdev,) = [argv[i + 1] for i, a in enumerate(argv) if a == "-blockdev" and "driver=nbd" in argv[i + 1]]
    assert ",tls-creds=" in blockdev and ",tls-hostname=virtua-manager" in blockdev, blockdev
