"""In-use protection: while a real NBD client (libnbd) has a volume open, destructive
commands refuse with exit 8 naming the client; `volume status` lists the connection."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli_support import Serve, V
from tests.interop.conftest import SYSTEM_PYTHON, need

pytestmark = pytest.mark.interop

# Connects, writes 64 KiB, says OPEN, and holds the connection until stdin closes.
HOLD = """
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b"\\x5a" * 65536, 0)
print("OPEN", flush=True)
sys.stdin.read()
h.shutdown()
"""


class Held:
    def __init__(self, uri: str) -> None:
        need(SYSTEM_PYTHON)
        self.proc = subprocess.Popen([SYSTEM_PYTHON, "-c", HOLD, uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "OPEN", line + (self.proc.stderr.read() if self.proc.stderr else "")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[V, Serve]]:
    v = V(tmp_path / "home")
    v.run("pool", "create", "p", "--capacity", "256M")
    s = Serve(v.home)
    yield v, s
    s.stop()


def test_an_open_volume_refuses_destructive_commands(served: tuple[V, Serve]) -> None:
    v, s = served
    v.run("volume", "create", "p/t", "--size", "1M")
    v.run("snapshot", "create", "p/t@v1")
    v.run("snapshot", "create", "p/t@v2")
    v.run("clone", "p/t@v1", "p/c")
    assert v.json("volume", "status", "p/c")["connections"] == []
    held = Held(s.uri("p/c"))
    try:
        status = v.json("volume", "status", "p/c")["connections"]
        assert len(status) == 1, status
        conn = status[0]
        assert conn["export"] == "p/c" and conn["client"].startswith("127.0.0.1:")
        assert conn["bytes_written"] == 65536 and conn["tls_identity"] is None and conn["since"] > 0
        assert conn["client"] in v.run("volume", "status", "p/c").stdout.decode()
        who = conn["client"]
        for args in (
            ["volume", "rm", "p/c"],
            ["volume", "reset", "p/c"],
            ["volume", "rebase", "p/c", "p/t@v2"],
            ["volume", "flatten", "p/c"],
            ["volume", "resize", "p/c", "--size", "512K", "--shrink"],
        ):
            v.fails(8, *args, match=who)
        v.run("snapshot", "create", "p/c@mine")  # not destructive: allowed
        v.fails(8, "snapshot", "rollback", "p/c@mine", match=who)
        v.fails(8, "volume", "rm", "p/t", "--recursive", match=who)  # takes the clone with it
        assert v.json("volume", "info", "p/c")["origin"] == "p/t@v1"
    finally:
        held.close()
    assert v.json("volume", "status", "p/c")["connections"] == []
    v.run("snapshot", "rollback", "p/c@mine")  # idle again: as before
    # --force overrides, and the client is then cut off
    held = Held(s.uri("p/c"))
    try:
        assert "p/c" in v.json("volume", "rm", "p/c", "--recursive", "--now", "--force")["removed"]
    finally:
        held.proc.kill()
        held.proc.wait()
