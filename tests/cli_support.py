"""The `virtua` command run as a user runs it (a subprocess), offline or beside a real `virtua serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

VIRTUA = [sys.executable, "-m", "virtua.cli"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host now (every test that starts a server uses this one)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class V:
    """The CLI with one $VIRTUA_HOME."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")

    def run(self, *args: str, input: bytes | None = None, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run([*VIRTUA, *args], capture_output=True, env=self.env, input=input, timeout=timeout)
        if ok:
            assert r.returncode == 0, r.stderr.decode()
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def fails(self, code: int, *args: str, match: str) -> str:
        r = self.run(*args, ok=False)
        err = r.stderr.decode()
        assert r.returncode == code, (r.returncode, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("virtua: error: "), err
        assert match in lines[0], err
        return lines[0]


class RemoteV(V):
    """The CLI as on another machine: its own empty $VIRTUA_HOME, and serve reached with
    --api and the admin certificate (data over NBD on TCP, TLS). `home` is serve's."""

    def __init__(self, serve: Serve, client_home: Path) -> None:
        super().__init__(serve.home)
        self.env = dict(os.environ, VIRTUA_HOME=str(client_home), COLUMNS="200")
        self.prefix = ["--api", f"https://127.0.0.1:{serve.api_port}", "--cert", str(serve.home / "pki" / "admin")]

    def run(self, *args: str, input: bytes | None = None, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
        return super().run(*self.prefix, *args, input=input, ok=ok, timeout=timeout)


class Serve:
    """A real `virtua serve` on loopback for one home; stop() sends SIGTERM."""

    def __init__(self, home: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = free_port()
        self.api_port = free_port()
        env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200", **(env or {}))
        self.proc = subprocess.Popen(
            [*VIRTUA, "serve", "--no-agent", "--listen", f"127.0.0.1:{self.port}",
             "--api-listen", f"127.0.0.1:{self.api_port}", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("VIRTUA_READY"):
            self.proc.kill()
            raise AssertionError(line + (self.proc.stderr.read() if self.proc.stderr else ""))

    def uri(self, export: str) -> str:
        return f"nbd://127.0.0.1:{self.port}/{export}"

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err
