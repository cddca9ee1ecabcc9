"""`virtua serve` stopped with SIGTERM stops the local agent it started (it used to leave
it running). Runs in a network namespace of its own: the agent manages nftables there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return stat.split(b")")[-1].split()[0] != b"Z"


def test_sigterm_of_serve_stops_the_agent_it_started(tmp_path: Path) -> None:
    ns = f"vts{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    serve = None
    agent_pid = 0
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        home = tmp_path / "home"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        serve = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "virtua.cli", "--home", str(home), "serve",
             "--listen", "127.0.0.1:10809", "--api-listen", "127.0.0.1:8780", "--agent-listen", "127.0.0.1:8781"],
            stdout=subprocess.PIPE, stderr=open(tmp_path / "serve.log", "wb"), env=env, start_new_session=True,
        )
        pidfile = home / "agent" / "agent.pid"
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip()):
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        agent_pid = int(pidfile.read_text())
        log = home / "agent" / "agent.log"
        while b"registered" not in (log.read_bytes() if log.exists() else b""):  # joined and working
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no agent log"
            assert _alive(agent_pid)
            time.sleep(0.2)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0
        deadline = time.monotonic() + 10
        while _alive(agent_pid):
            assert time.monotonic() < deadline, "the agent outlived serve"
            time.sleep(0.1)
        assert "stopped the local agent" in (tmp_path / "serve.log").read_text()
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
        if agent_pid and _alive(agent_pid):
            os.killpg(agent_pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)
