"""Fixtures for tests that boot real QEMU guests.

Missing tools FAIL the tests (never skip): a host without them cannot claim to work.
Guest artifacts are built once into the vmm cache (``$VIRTUA_CACHE_DIR`` or
``~/.cache/virtua``) and reused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.cli_support import free_port
from virtua.vmm import GuestArtifacts, VMProcess, ensure_artifacts

REQUIRED_TOOLS = [
    "qemu-system-x86_64",
    "qemu-nbd",
    "qemu-img",
    "qemu-io",
    "busybox",
    "mkfs.ext4",
    "debugfs",
    "e2fsck",
]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for d in ("/usr/sbin", "/sbin") if os.access(p := f"{d}/{tool}", os.X_OK)), None
    )


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    found = {t: _which(t) for t in REQUIRED_TOOLS}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        pytest.fail(f"required tools missing: {', '.join(missing)}")
    return {t: p for t, p in found.items() if p}


@pytest.fixture(scope="session")
def artifacts(tools: dict[str, str]) -> GuestArtifacts:
    return ensure_artifacts()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="vt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)



class NbdServer:
    """qemu-nbd serving one raw image (stand-in for virtua's own server)."""

    def __init__(self, image: Path, export: str, *, unix: Path | None = None) -> None:
        self.image, self.export, self.unix = image, export, unix
        self.port = None if unix else free_port()
        argv = [
            "qemu-nbd",
            "-f",
            "raw",
            "-x",
            export,
            "--persistent",
            "--shared=4",
            "--cache=writeback",
        ]
        argv += ["--socket", str(unix)] if unix else ["-b", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(
            argv + [str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd exited: {self.proc.stderr.read().decode()}")  # type: ignore[union-attr]
            with contextlib.suppress(OSError):
                if unix:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(unix))
                else:
                    socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            time.sleep(0.05)
        raise RuntimeError("qemu-nbd did not come up")

    @property
    def uri(self) -> str:
        from urllib.parse import quote

        exp = quote(self.export, safe="/@")
        if self.unix:
            return f"nbd+unix:///{exp}?socket={self.unix}"
        return f"nbd://127.0.0.1:{self.port}/{exp}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def nbd_server() -> Iterator[Callable[..., NbdServer]]:
    servers: list[NbdServer] = []

    def start(image: Path, export: str, *, unix: Path | None = None) -> NbdServer:
        s = NbdServer(image, export, unix=unix)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
async def vms() -> AsyncIterator[list[VMProcess]]:
    """Append every VMProcess here; whatever is still running is killed afterwards."""
    started: list[VMProcess] = []
    yield started
    for vm in started:
        with contextlib.suppress(Exception):
            fresh = VMProcess(vm.spec)
            if fresh.is_running():
                await fresh.kill()
