"""`virtua serve` end to end: volumes appear as NBD exports without a restart, CLI
commands go through the daemon, data written by one client is read by others, and
SIGTERM flushes before exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_support import free_port

pytestmark = pytest.mark.interop



class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{self.port}",
             "--api-listen", f"127.0.0.1:{free_port()}"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("VIRTUA_READY"), line + (self.proc.stderr.read() if self.proc.stderr else "")

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def cli(self, *args: str) -> object:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args, "--json"], env=self.env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        assert self.proc.returncode == 0, err
        return err


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    home = tmp_path / "home"
    env = dict(os.environ, VIRTUA_HOME=str(home))
    subprocess.run([sys.executable, "-m", "virtua.cli", "pool", "create", "p", "--capacity", "1G"], env=env, check=True, capture_output=True)
    d = Daemon(home)
    yield d
    if d.proc.poll() is None:
        d.proc.kill()
        d.proc.wait()


def run(*cmd: str) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return r.stdout


def test_exports_follow_volumes_and_data_crosses_clients(daemon: Daemon, tmp_path: Path) -> None:
    daemon.cli("volume", "create", "p/disk", "--size", "64M")
    exports = json.loads(run("nbdinfo", "--list", "--json", daemon.uri("")))["exports"]
    assert "p/disk" in [e["export-name"] for e in exports]
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 40M 64k", daemon.uri("p/disk"))
    daemon.cli("snapshot", "create", "p/disk@s1")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 64k", daemon.uri("p/disk"))
    # the snapshot export is read-only and holds the old data
    run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 1M 3M", daemon.uri("p/disk@s1"))
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", daemon.uri("p/disk@s1")], capture_output=True, text=True)
    assert r.returncode != 0 or "Permission denied" in r.stdout + r.stderr
    info = json.loads(run("nbdinfo", "--json", daemon.uri("p/disk@s1")))
    assert info["exports"][0]["is_read_only"] is True
    # map: data where written, holes elsewhere
    extents = json.loads(run("nbdinfo", "--map", "--json", daemon.uri("p/disk")))
    data = [(e["offset"], e["length"]) for e in extents if not e["type"] & 1]
    assert data == [(1 << 20, 3 << 20), (40 << 20, 64 << 10)], extents
    # clones appear as exports; nbdcopy reads one out
    daemon.cli("clone", "p/disk@s1", "p/node", "--count", "2")
    out = tmp_path / "node1.raw"
    run("nbdcopy", "--connections=2", daemon.uri("p/node-1"), str(out))
    blob = out.read_bytes()
    assert blob[1 << 20 : 4 << 20] == b"\x5a" * (3 << 20) and blob[40 << 20 : (40 << 20) + 65536] == b"\x11" * 65536
    # deleting a volume removes its export without a restart
    daemon.cli("volume", "rm", "p/node-2")
    r = subprocess.run(["nbdinfo", daemon.uri("p/node-2")], capture_output=True, text=True)
    assert r.returncode != 0
    assert daemon.cli("pool", "check", "p")["ok"]  # type: ignore[index]


def test_sigterm_flushes_and_pool_reopens(daemon: Daemon, tmp_path: Path) -> None:
    daemon.cli("volume", "create", "p/d", "--size", "16M")
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(16 << 20))
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), daemon.uri("p/d"))
    err = daemon.stop()
    assert "stopped" in err
    # the pool is free again: the CLI opens it in-process and sees every byte
    out = tmp_path / "out.raw"
    env = dict(os.environ, VIRTUA_HOME=str(daemon.home))
    subprocess.run([sys.executable, "-m", "virtua.cli", "volume", "export", "p/d", str(out)], env=env, check=True, capture_output=True)
    assert out.read_bytes() == src.read_bytes()
    r = subprocess.run([sys.executable, "-m", "virtua.cli", "pool", "check", "p"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_errors_through_daemon_are_the_same(daemon: Daemon) -> None:
    r = subprocess.run([sys.executable, "-m", "virtua.cli", "volume", "info", "p/none"], env=daemon.env, capture_output=True, text=True)
    assert r.returncode == 3 and r.stderr.strip() == "virtua: error: volume p/none does not exist"


def test_tls_psk_with_per_export_allow_list(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
    v = [sys.executable, "-m", "virtua.cli"]
    subprocess.run([*v, "pool", "create", "p", "--capacity", "1G"], env=env, check=True, capture_output=True)
    for name in ("secret", "shared"):
        subprocess.run([*v, "volume", "create", f"p/{name}", "--size", "8M"], env=env, check=True, capture_output=True)
    keys = tmp_path / "keys.psk"
    keys.write_text(f"alice:{os.urandom(32).hex()}\nbob:{os.urandom(32).hex()}\n")
    port = free_port()
    proc = subprocess.Popen(
        [*v, "serve", "--no-agent", "--listen", f"127.0.0.1:{port}", "--api-listen", f"127.0.0.1:{free_port()}",
         "--tls", "require", "--tls-psk", str(keys), "--allow", "p/secret*=alice"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("VIRTUA_READY")

        def info(user: str, export: str) -> subprocess.CompletedProcess[str]:
            uri = f"nbds://{user}@127.0.0.1:{port}/{export}?tls-psk-file={keys}"
            return subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True)

        assert info("alice", "p/secret").stdout.strip() == str(8 << 20)
        assert info("bob", "p/secret").returncode != 0, "bob is not on p/secret's allow-list"
        assert info("bob", "p/shared").stdout.strip() == str(8 << 20)
        plain = subprocess.run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/p/shared"], capture_output=True, text=True)
        assert plain.returncode != 0, "plaintext is refused when TLS is required"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


def test_many_volumes_written_concurrently(daemon: Daemon, tmp_path: Path) -> None:
    sources = []
    for i in range(4):
        daemon.cli("volume", "create", f"p/c{i}", "--size", "32M")
        src = tmp_path / f"src{i}"
        src.write_bytes(os.urandom(32 << 20))
        sources.append(src)
    procs = [
        subprocess.Popen(["nbdcopy", "--connections=2", str(src), daemon.uri(f"p/c{i}")])
        for i, src in enumerate(sources)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    for i, src in enumerate(sources):
        out = tmp_path / f"out{i}"
        run("nbdcopy", daemon.uri(f"p/c{i}"), str(out))
        assert out.read_bytes() == src.read_bytes(), f"volume c{i} differs"
    assert daemon.cli("pool", "check", "p")["ok"]  # type: ignore[index]


def test_large_read_past_the_end_of_the_data_file(daemon: Daemon) -> None:
    """The newest chunk of the pool's data file is written only in part, so the file ends
    inside it: a large read over it (the zero-copy path) must still reply in full, with
    zeros for the part never written, on simple and structured replies alike."""
    daemon.cli("volume", "create", "p/tail", "--size", "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 1M 4k", daemon.uri("p/tail"))
    expect = "b'\\x11' * 131072 + b'\\x22' * 4096 + bytes(61440)"
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))  # nbdsh needs the system python3
    for structured in (True, False):
        script = (f"h.set_request_structured_replies({structured}); h.connect_uri({daemon.uri('p/tail')!r}); "
                  f"assert h.pread(196608, 917504) == {expect}; print('READ-OK')")
        p = subprocess.run(["nbdsh", "-c", script], env=env, capture_output=True, text=True, timeout=30)
        assert "READ-OK" in p.stdout, f"structured={structured}: {p.stdout}{p.stderr}"
