"""`virtua serve` stopped with SIGTERM stops the local agent it started (it used to leave
it running), and nothing started under its home is left behind; a stale pid file naming
some other process does not keep serve from starting its agent, nor make serve stop that
process. Runs in a network namespace of its own: the agent manages nftables there."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import alive, processes_under

ROOT = Path(__file__).resolve().parents[2]


class Serve:
    def __init__(self, tmp: Path, ns: str) -> None:
        self.tmp, self.ns = tmp, ns
        self.home = tmp / "home"
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "virtua.cli", "--home", str(self.home), "serve",
             "--listen", "127.0.0.1:10809", "--api-listen", "127.0.0.1:8780", "--agent-listen", "127.0.0.1:8781"],
            stdout=subprocess.PIPE, stderr=open(self.log, "ab"), env=env, start_new_session=True,
        )

    def text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_agent(self, not_pid: int = 0) -> int:
        """The pid of the agent serve started, once it has registered with serve."""
        pidfile = self.home / "agent" / "agent.pid"
        deadline = time.monotonic() + 60
        while not (pidfile.exists() and pidfile.read_text().strip() and int(pidfile.read_text()) != not_pid):
            assert time.monotonic() < deadline, self.text()
            assert self.proc is not None and self.proc.poll() is None, self.text()
            time.sleep(0.2)
        pid = int(pidfile.read_text())
        log = self.home / "agent" / "agent.log"
        while b"registered" not in (log.read_bytes() if log.exists() else b""):  # joined and working
            assert time.monotonic() < deadline, log.read_text() if log.exists() else "no agent log"
            assert alive(pid), log.read_text() if log.exists() else "no agent log"
            time.sleep(0.2)
        return pid

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0, self.text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    ns = f"vts{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    srv = Serve(tmp_path, ns)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        yield srv
    finally:
        srv.kill()
        for pid in processes_under(srv.home):  # a failed test must not leak its processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def wait_gone(pids: object, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = pids() if callable(pids) else pids
        if not left:
            return
        assert time.monotonic() < deadline, f"{what} outlived serve: {left}"
        time.sleep(0.1)


def test_sigterm_of_serve_stops_the_agent_it_started(serve: Serve) -> None:
    serve.start()
    agent_pid = serve.wait_agent()
    assert agent_pid in processes_under(serve.home / "agent")
    serve.terminate()
    wait_gone(lambda: processes_under(serve.home), "a process of serve's home")
    assert not alive(agent_pid)
    assert "stopped the local agent" in serve.text()


def test_a_stale_agent_pid_file_naming_another_process(serve: Serve, tmp_path: Path) -> None:
    """The pid in agent.pid now belongs to an unrelated process with "agent" in its command
    line (a pid is reused; ssh-agent, gpg-agent): serve starts its own agent, and leaves
    that process alone when it stops."""
    (serve.home / "agent").mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "some-agent"])
    try:
        (serve.home / "agent" / "agent.pid").write_text(str(other.pid))
        serve.start()
        agent_pid = serve.wait_agent(not_pid=other.pid)
        assert agent_pid != other.pid and "already running" not in serve.text(), serve.text()
        serve.terminate()
        wait_gone(lambda: processes_under(serve.home), "a process of serve's home")
        assert other.poll() is None, "serve stopped a process that was not its agent"
        assert not (serve.home / "agent" / "agent.pid").exists(), "the stopped agent's pid file is left"
    finally:
        other.kill()
        other.wait()


def test_a_second_agent_on_the_same_home_is_refused(serve: Serve) -> None:
    """Two agents on one host would both reattach, fence and start its VMs: the second
    one started with the running agent's home exits at once (Busy, exit 8), naming it."""
    serve.start()
    pid = serve.wait_agent()
    r = subprocess.run(
        ["ip", "netns", "exec", serve.ns, sys.executable, "-m", "virtua.cli", "--home", str(serve.home / "agent"),
         "agent", "--listen", "127.0.0.1:8791", "--manager", "https://127.0.0.1:8780"],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert r.returncode == 8, r.stderr
    assert f"another virtua agent (pid {pid}) runs on" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert alive(pid), "the running agent is untouched"
    serve.terminate()
