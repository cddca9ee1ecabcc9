"""Fixtures for interoperability tests: a real virtua NBD server process and real clients.

A missing client binary FAILS the test (never skips): the suite is meant to prove
interoperability, so an incomplete environment must be noticed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd is only importable there


def need(binary: str) -> str:
    path = shutil.which(binary) or (binary if os.path.isabs(binary) and os.path.exists(binary) else None)
    assert path, f"required client binary {binary!r} is not installed"
    return path


def run(args: list[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    need(args[0])
    p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
        )
    return p


@dataclass
class NBDProcess:
    proc: subprocess.Popen
    port: int | None
    unix: str | None
    directory: Path
    stderr_path: Path
    extra: list[str] = field(default_factory=list)

    def uri(self, export: str = "disk.img", *, tls: bool = False, user: str | None = None, query: str = "") -> str:
        scheme = "nbds" if tls else "nbd"
        auth = f"{user}@" if user else ""
        q = f"?{query}" if query else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/{export}{q}"

    def unix_uri(self, export: str = "disk.img") -> str:
        return f"nbd+unix:///{export}?socket={self.unix}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    d = tmp_path / "exports"
    d.mkdir()
    with open(d / "disk.img", "wb") as f:
        f.truncate(64 * 1024 * 1024)
    with open(d / "disk@ro", "wb") as f:
        f.write(b"\xa5" * (1024 * 1024))
        f.truncate(16 * 1024 * 1024)
    return d


@pytest.fixture
def nbd_server(tmp_path: Path, export_dir: Path) -> Iterator[Callable[..., NBDProcess]]:
    started: list[NBDProcess] = []

    def start(*extra: str, directory: Path | None = None, unix: bool = True) -> NBDProcess:
        d = directory or export_dir
        sock = str(tmp_path / f"nbd{len(started)}.sock") if unix else None
        args = [sys.executable, "-m", "virtua.nbd", "--dir", str(d), "--port", "0", *extra]
        if sock:
            args += ["--unix", sock]
        errpath = tmp_path / f"server{len(started)}.log"
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=open(errpath, "w"), text=True, cwd=REPO
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("NBD_READY"):
            proc.kill()
            raise AssertionError(f"server did not start: {line!r}\n{errpath.read_text()}")
        port = int(line.split()[1].split("=")[1])
        p = NBDProcess(proc, port, sock, d, errpath, list(extra))
        started.append(p)
        return p

    yield start
    for p in started:
        rc = p.stop()
        assert rc == 0, f"server exited {rc}\n{p.log()}"
        assert "Traceback" not in p.log(), p.log()


@dataclass
class TLSFiles:
    dir: Path
    ca: Path
    server_cert: Path
    server_key: Path
    x509_client_dir: Path  # ca-cert.pem, client-cert.pem, client-key.pem (qemu/libnbd layout)
    x509_noclient_dir: Path  # only ca-cert.pem
    psk: Path  # alice's key (server file)
    psk_client_dir: Path  # keys.psk for qemu
    bad_psk: Path


def _openssl(*args: str) -> None:
    run(["openssl", *args])


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    d = tmp_path_factory.mktemp("tls")
    ca_key, ca = d / "ca-key.pem", d / "ca-cert.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "30", "-subj", "/CN=virtua test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )
    exts = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for who, ext in exts.items():
        key, csr, crt, extf = (d / f"{who}-key.pem", d / f"{who}.csr", d / f"{who}-cert.pem", d / f"{who}.ext")
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={who}-alice")
        extf.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" + ext
        )
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(crt), "-days", "30", "-extfile", str(extf))
    cli = d / "x509-client"
    cli.mkdir()
    noc = d / "x509-noclient"
    noc.mkdir()
    for src, dst in ((ca, "ca-cert.pem"), (d / "client-cert.pem", "client-cert.pem"),
                     (d / "client-key.pem", "client-key.pem")):
        shutil.copy(src, cli / dst)
    shutil.copy(ca, noc / "ca-cert.pem")
    psk = d / "keys.psk"
    psk.write_text("alice:" + os.urandom(32).hex() + "\n")
    pskdir = d / "psk-client"
    pskdir.mkdir()
    shutil.copy(psk, pskdir / "keys.psk")
    bad = d / "bad.psk"
    bad.write_text("alice:" + os.urandom(32).hex() + "\n")
    return TLSFiles(d, ca, d / "server-cert.pem", d / "server-key.pem", cli, noc, psk, pskdir, bad)


@pytest.fixture
def sh() -> Callable[..., subprocess.CompletedProcess]:
    """run(args, check=True, timeout=60): run a client binary (which must exist)."""
    return run
