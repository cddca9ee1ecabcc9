"""A full file system never wedges a pool: on a 64 MiB tmpfs, writes get ENOSPC (NBD) or
exit 6 "pool t is full" (CLI) while the metadata store still has room, and removing
volumes, trimming and `pool check --repair` keep working, with `virtua serve` running,
offline, and across a kill -9 and restart. Nothing needs `pool rm --force`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtua.nbd import proto as P
from virtua.nbd.client import NBDClient, NBDError

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "fs"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


class Virtua:
    """The CLI and `virtua serve` over one home."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        self.serve: subprocess.Popen[str] | None = None
        self.port = 0

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True, text=True, cwd=ROOT
        )

    def ok(self, *args: str) -> object:
        r = self(*args, "--json")
        assert r.returncode == 0, f"virtua {' '.join(args)}: exit {r.returncode}: {r.stderr}"
        return json.loads(r.stdout)

    def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{self.port}",
             "--api-listen", "127.0.0.1:0"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.serve.stdout is not None
        line = self.serve.stdout.readline()
        assert line.startswith("VIRTUA_READY"), line + (self.serve.stderr.read() if self.serve.stderr else "")

    def kill(self) -> None:
        assert self.serve is not None
        self.serve.send_signal(signal.SIGKILL)
        self.serve.communicate(timeout=30)
        self.serve = None


def fill(port: int, export: str) -> int:
    """Write 1 MiB blocks over NBD until the server answers ENOSPC; returns bytes written."""
    c = NBDClient.connect(port=port).open(export)
    block = b"f" * MIB
    for i in range(256):  # the volume is larger than the file system
        try:
            c.write(i * MIB, block)
        except NBDError as e:
            assert e.err == P.NBD_ENOSPC, e
            c.flush()  # what was acknowledged is durable even on a full file system
            c.disconnect()
            return i * MIB
    raise AssertionError("never got ENOSPC on a 64 MiB file system")


def test_a_full_file_system_never_wedges_a_pool(small_fs: Path, tmp_path: Path) -> None:
    v = Virtua(tmp_path / "home")
    v.ok("pool", "create", "t", "--path", str(small_fs / "pool"))
    v.ok("volume", "create", "t/a", "--size", "256M")
    v.start()
    try:
        written = fill(v.port, "t/a")
        assert written >= 32 * MIB
        check = v.ok("pool", "check", "t")
        assert check["ok"], check  # type: ignore[index]
        # trims work on a full file system, and free space for writes
        c = NBDClient.connect(port=v.port).open("t/a")
        c.trim(0, 8 * MIB)
        c.flush()
        c.write(0, b"g" * MIB)
        assert c.read(0, MIB) == b"g" * MIB
        c.disconnect()
        v.ok("volume", "rm", "t/a", "--now")
        v.ok("volume", "create", "t/b", "--size", "256M")
        assert fill(v.port, "t/b") >= 32 * MIB
        v.kill()  # full, and killed: offline now
        check = v.ok("pool", "check", "t", "--repair")
        assert check["ok"], check  # type: ignore[index]
        v.ok("volume", "rm", "t/b", "--now")
        # an offline import that does not fit: exit 6, one line, and its volume is gone
        src = tmp_path / "big.raw"
        with open(src, "wb") as f:
            for _ in range(96):
                f.write(b"i" * MIB)
        r = v("volume", "import", str(src), "t/imported")
        assert r.returncode == 6, r.stderr
        assert "pool t is full" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert v.ok("volume", "list", "t") == []
        v.start()  # and across a restart
        v.ok("volume", "create", "t/c", "--size", "16M")
        c = NBDClient.connect(port=v.port).open("t/c")
        c.write(0, b"c" * MIB)
        c.flush()
        c.disconnect()
        check = v.ok("pool", "check", "t")
        assert check["ok"], check  # type: ignore[index]
    finally:
        if v.serve is not None:
            v.kill()
