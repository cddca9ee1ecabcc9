"""Paths from requests, against a real `virtua serve`: `template import` reads only files
under the import directory and only for an administrator (the unix-socket caller, or the
admin certificate or token over TLS); names
that build paths refuse traversal; templates and snapshots are read-only to NBD clients
(libnbd and qemu-io), while a clone of them is writable."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli_support import free_port
from virtua.api.routes import request_for
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import MANAGER, Credentials
from virtua.pki.files import write_private

pytestmark = pytest.mark.interop

PATTERN = b"\x5a" * 65536



class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.import_dir = home / "import"
        self.nbd_port, self.api_port = free_port(), free_port()
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{self.nbd_port}",
             "--api-listen", f"127.0.0.1:{self.api_port}"],
            env=self.env, stdout=subprocess.PIPE, stderr=open(home / "serve.log", "a"), text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("VIRTUA_READY"), line + (home / "serve.log").read_text()

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True, text=True)

    def json(self, *args: str) -> object:
        r = self.cli(*args, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    @property
    def pki(self) -> Path:
        return self.home / "pki"

    def tls_context(self, creds: Credentials | None) -> ssl.SSLContext:
        """Verifies the manager against the cluster CA; presents creds' certificate if any."""
        return creds.client_context(MANAGER) if creds else ssl.create_default_context(cafile=str(self.pki / "ca-cert.pem"))

    def tcp_op(self, op: str, creds: Credentials | None = None, token: str | None = None,
               **args: object) -> httpx.Response:
        """The same operation from a TCP client (TLS; with creds' certificate, or the bearer token)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = request_for(op, args)  # the operation's route, as the CLI sends it
        return httpx.request(req.method, f"https://127.0.0.1:{self.api_port}{req.path}", params=req.query,
                             json=req.body, headers=headers, verify=self.tls_context(creds), timeout=30)

    def host_credentials(self, tmp: Path, name: str) -> Credentials:
        """A host (agent) identity of the cluster CA, as a joined agent holds one."""
        cert, key = ClusterCA.ensure(self.pki, manager_sans=[]).issue("host", name)
        c = Credentials(tmp)
        write_private(c.ca, (self.pki / "ca-cert.pem").read_bytes())
        write_private(c.cert, cert)
        write_private(c.key, key)
        return c

    def raw_http(self, request: str, over: str) -> str:
        """Bytes as written, so no client normalises the path first: over the unix socket
        ("unix") or over TLS with the admin certificate ("tls")."""
        if over == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(self.home / "virtua.sock"))
        else:
            raw = socket.create_connection(("127.0.0.1", self.api_port), timeout=10)
            s = self.tls_context(Credentials(self.pki / "admin")).wrap_socket(raw, server_hostname="127.0.0.1")
        with s:
            s.sendall(request.encode())
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("paths") / "home"
    home.mkdir()
    env = dict(os.environ, VIRTUA_HOME=str(home))
    subprocess.run([sys.executable, "-m", "virtua.cli", "pool", "create", "default", "--capacity", "1G"],
                   env=env, check=True, capture_output=True)
    d = Daemon(home)
    # an image with a known pattern at 1 MiB and a stand-in kernel, in the import directory
    image = bytearray(4 << 20)
    image[1 << 20 : (1 << 20) + len(PATTERN)] = PATTERN
    (d.import_dir / "root.raw").write_bytes(image)
    (d.import_dir / "vmlinuz").write_bytes(b"not really a kernel")
    yield d
    d.stop()


def refused(r: subprocess.CompletedProcess[str], code: int, match: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def nothing_imported(d: Daemon) -> None:
    assert d.json("template", "list") == []
    assert d.json("volume", "list") == []


def test_import_of_a_host_file_outside_the_import_dir_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    refused(d.cli("template", "import", "leak", "/etc/shadow", "--kernel", "vmlinuz"), 12,
            f"image '/etc/shadow' is not under the import directory {d.import_dir}")
    refused(d.cli("template", "import", "leak", "../../../../etc/shadow", "--kernel", "vmlinuz"), 12,
            "is not under the import directory")
    refused(d.cli("template", "import", "leak", "root.raw", "--kernel", "/etc/shadow"), 12,
            "kernel '/etc/shadow' is not under the import directory")
    refused(d.cli("template", "import", "leak", "root.raw", "--kernel", "vmlinuz", "--initrd", "../manager.db"), 12,
            "initrd '../manager.db' is not under the import directory")
    # a symlink inside the import directory that leads out of it
    link = d.import_dir / "innocent.raw"
    link.symlink_to("/etc/shadow")
    try:
        refused(d.cli("template", "import", "leak", "innocent.raw", "--kernel", "vmlinuz"), 12,
                "is not under the import directory")
    finally:
        link.unlink()
    refused(d.cli("template", "import", "leak", "missing.raw", "--kernel", "vmlinuz"), 3,
            "no such image in the import directory: missing.raw")
    # an image inside the directory whose backing file is outside it: serve's qemu-img
    # would read /etc/shadow into the template (its guests' disks)
    overlay = d.import_dir / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", "-u", str(overlay), "1M"],
                   check=True, capture_output=True)
    try:
        refused(d.cli("template", "import", "leak", "overlay.qcow2", "--kernel", "vmlinuz"), 2,
                "refers to other file(s) (/etc/shadow)")
    finally:
        overlay.unlink()
    nothing_imported(d)


def test_only_an_administrator_may_import(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    args = {"name": "leak", "image": "root.raw", "kernel": "vmlinuz"}
    # no certificate over TCP: not authenticated
    r = d.tcp_op("template.import", **args)
    assert r.status_code == 401, r.text
    assert r.json()["error"] == "Unauthenticated" and "client certificate" in r.json()["message"], r.text
    # a host (agent) identity of the cluster CA is authenticated but no administrator
    host = d.host_credentials(tmp_path / "h9", "h9")
    r = d.tcp_op("template.import", host, **args)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "Forbidden" and "admin operations need the admin certificate" in r.json()["message"]
    # the caller cannot claim to be one
    r = d.tcp_op("template.import", host, **args, caller_is_admin=True)
    assert r.status_code == 403, r.text
    r = d.tcp_op("template.import", Credentials(d.pki / "admin"), **args, caller_is_admin=True)
    assert r.status_code == 400 and "caller_is_admin is not an argument" in r.json()["message"], r.text
    nothing_imported(d)
    log = (d.home / "serve.log").read_text()
    assert "refused POST /v1/templates/import from 127.0.0.1:" in log
    assert "(no certificate)" in log and "(host h9, serial" in log
    # the positive controls: the admin certificate and the admin token over TLS import host files
    r = d.tcp_op("template.import", Credentials(d.pki / "admin"), name="by-cert", image="root.raw", kernel="vmlinuz")
    assert r.status_code == 200, r.text
    token = (d.pki / "admin-token").read_text().strip()
    r = d.tcp_op("template.import", token=token, name="by-token", image="root.raw", kernel="vmlinuz")
    assert r.status_code == 200, r.text
    assert sorted(t["name"] for t in d.json("template", "list")) == ["by-cert", "by-token"]  # type: ignore[union-attr]
    d.json("template", "rm", "by-cert")
    d.json("template", "rm", "by-token")
    nothing_imported(d)


@pytest.mark.parametrize(
    "request_line, message",
    [
        ("PUT /v1/vmstate/%2e%2e/x", "bad VC name '..'"),
        ("PUT /v1/vmstate/vc/%2e%2e", "bad node name '..'"),
        ("GET /v1/vmstate/%2e%2e/%2e%2e", "bad VC name '..'"),
        ("GET /v1/templates/%2e%2e/kernel", "bad template name '..'"),
        ("GET /v1/templates/.hidden/kernel", "bad template name '.hidden'"),
        # the operations' routes: the name reaches the operation, which refuses it
        ("GET /v1/vcs/%2e%2e", "bad VC name '..'"),
        ("POST /v1/vcs/%2e%2e/start", "bad VC name '..'"),
        ("DELETE /v1/vcs/%2e%2e", "bad VC name '..'"),
        ("GET /v1/templates/%2e%2e", "bad template name '..'"),
        ("POST /v1/vms/%2e%2e/x/console", "bad VC name '..'"),
        ("GET /v1/pools/%2e%2e", "bad pool name '..'"),
        ("GET /v1/pools/p/volumes/%2e%2e", "bad name 'p/..'"),
    ],
)
def test_names_that_build_paths_refuse_traversal(daemon: Daemon, request_line: str, message: str) -> None:
    # an administrator's request (the unix socket, the admin certificate over TLS): the
    # name itself is refused, not the caller
    for over in ("unix", "tls"):
        reply = daemon.raw_http(
            f"{request_line} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", over)
        assert reply.startswith("HTTP/1.1 400"), (over, reply)
        assert message in reply, (over, reply)
    assert not (daemon.home / "vmstate").exists(), "nothing written for a refused name"


def test_names_from_the_cli_refuse_traversal(daemon: Daemon) -> None:
    refused(daemon.cli("vc", "info", "../x"), 2, "bad VC name '../x'")
    refused(daemon.cli("template", "info", "../x"), 2, "bad template name '../x'")
    refused(daemon.cli("vm", "console", "../../x"), 2, "bad VC name '..'")


# libnbd with client-side checks off, so the server itself must refuse the write
WRITE_SCRIPT = textwrap.dedent(
    """
    import errno, sys
    import nbd
    h = nbd.NBD()
    h.set_strict_mode(0)
    h.connect_uri(sys.argv[1])
    print("readonly", h.is_read_only())
    try:
        h.pwrite(b"\\x77" * 4096, 1 << 20)
        print("written")
    except nbd.Error as e:
        print("refused", e.errnum)
    print("data", h.pread(4, 1 << 20).hex())
    """
)


def test_templates_and_snapshots_are_read_only_over_nbd(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    info = d.json("template", "import", "t1", "root.raw", "--kernel", "vmlinuz")
    assert info["volume"] == "default/template-t1"  # type: ignore[index]
    script = tmp_path / "write.py"
    script.write_text(WRITE_SCRIPT)
    for export in ("default/template-t1", "default/template-t1@base"):
        r = subprocess.run(["/usr/bin/python3", str(script), d.uri(export)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[:3] == ["readonly True", f"refused {errno.EPERM}", "data 5a5a5a5a"], r.stdout
        # qemu-io cannot even open it for writing; read-only it reads the template's data
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 4k", d.uri(export)],
                           capture_output=True, text=True)
        assert r.returncode != 0 or "wrote" not in r.stdout, r.stdout
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 1M 64k", d.uri(export)],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
    listed = json.loads(subprocess.run(["nbdinfo", "--list", "--json", d.uri("")], capture_output=True,
                                       text=True, check=True).stdout)["exports"]
    desc = {e["export-name"]: e.get("description", "") for e in listed}
    assert desc["default/template-t1"].startswith("template (read-only)"), desc
    # the positive control: a clone of the template (what a VM boots from) takes writes
    d.json("clone", "default/template-t1@base", "default/node")
    r = subprocess.run(["/usr/bin/python3", str(script), d.uri("default/node")], capture_output=True, text=True)
    assert r.stdout.split("\n")[:3] == ["readonly False", "written", "data 77777777"], r.stdout + r.stderr
    d.json("volume", "rm", "default/node")
    d.json("template", "rm", "t1")


def test_the_daemon_copies_no_host_file_for_a_tcp_caller(daemon: Daemon, tmp_path: Path) -> None:
    """`volume.import.file` opens a file of the daemon's machine by the caller's path, as
    root: only for the unix socket's caller (root here already). Over TLS, even the admin
    certificate may not name one (template import keeps it to the import directory): a
    user who holds it without being root, or a manager elsewhere, would have /etc/shadow
    or the CA's key read into a volume (stat(2) gives its device and inode to anyone)."""
    d = daemon
    secret = tmp_path / "secret.key"
    secret.write_bytes(b"NOT-YOURS".ljust(1 << 20, b"\0"))
    secret.chmod(0o600)
    st = os.stat(secret)
    admin = Credentials(d.pki / "admin")
    r = d.tcp_op("volume.import.begin", admin, ref="default/leak", size=1 << 20, format="raw")
    assert r.status_code == 200, r.text
    job = r.json()["job"]
    r = d.tcp_op("volume.import.file", admin, id=job, path=str(secret), device=st.st_dev, inode=st.st_ino)
    assert r.status_code == 200 and r.json()["copied"] is False, r.text
    assert "unix socket" in r.json()["why"], r.text
    r = d.tcp_op("volume.import.file", admin, id=job, path=str(secret), device=st.st_dev, inode=st.st_ino,
                 caller_is_local=True)
    assert r.status_code == 400 and "caller_is_local is not an argument" in r.json()["message"], r.text
    r = d.tcp_op("volume.import.end", admin, id=job, error="refused")
    assert r.status_code == 400, r.text
    nothing_imported(d)


def test_an_export_names_the_pools_data_file_only_to_the_unix_socket(daemon: Daemon) -> None:
    """A held export tells a local reader where the image lies in the pool's data file.
    A TCP caller may be on another machine, where that path is another file (its own
    pool's, at the same default path): qemu-img there would write its bytes into the
    exported image. Over TLS the answer names no file, and the CLI reads over NBD."""
    d = daemon
    admin = Credentials(d.pki / "admin")
    assert d.tcp_op("volume.create", admin, ref="default/e", size="1M").status_code == 200
    try:
        r = d.tcp_op("volume.export.begin", admin, ref="default/e")
        assert r.status_code == 200, r.text
        assert r.json()["data_file"] is None and r.json()["extents"] == [], r.text
        assert d.tcp_op("volume.export.end", admin, id=r.json()["job"]).status_code == 200
        r = d.tcp_op("volume.export.begin", admin, ref="default/e", caller_is_local=True)
        assert r.status_code == 400 and "caller_is_local is not an argument" in r.json()["message"], r.text
    finally:
        d.json("volume", "rm", "default/e", "--now")
