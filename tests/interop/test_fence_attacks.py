"""Fencing attacked from the host's side: a second agent on one agent home (a careless
restart, a unit started twice) next to the first, both heartbeating as the host and both
writing the fence deadline the watchdog obeys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_support import Serve, V, free_port

pytestmark = pytest.mark.interop


def agent(home: Path, manager: str, port: int, token: Path | None, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "--home", str(home), "agent", "--name", "h1", "--no-network",
         "--listen", f"127.0.0.1:{port}", "--manager", manager, *(["--join-token-file", str(token)] if token else [])],
        stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=dict(os.environ),
    )


def test_a_second_agent_on_one_home_is_refused(tmp_path: Path) -> None:
    v = V(tmp_path / "home")
    serve = Serve(v.home)
    home = tmp_path / "agent"
    first = second = None
    try:
        api = next(a for a in serve.proc.args if str(a).startswith("127.0.0.1:") and a != f"127.0.0.1:{serve.port}")  # type: ignore[union-attr]
        manager = f"https://{api}"
        token = tmp_path / "token"
        v.run("host", "join-token", "--ttl", "10m", "--output", str(token))
        first = agent(home, manager, free_port(), token, tmp_path / "a1.log")
        deadline = time.monotonic() + 60
        while not any(h["name"] == "h1" and h.get("alive") for h in v.json("host", "list")):
            assert time.monotonic() < deadline and first.poll() is None, (tmp_path / "a1.log").read_text()
            time.sleep(0.3)
        second = agent(home, manager, free_port(), None, tmp_path / "a2.log")
        assert second.wait(timeout=30) == 8, (tmp_path / "a2.log").read_text()
        said = (tmp_path / "a2.log").read_text()
        assert "another virtua agent" in said and str(first.pid) in said and "Traceback" not in said, said
        assert json.loads((home / "fence.json").read_text())["agent"] == first.pid, "the deadline is the first's"
        assert first.poll() is None
    finally:
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(timeout=20)
        serve.stop()
