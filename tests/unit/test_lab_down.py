"""`virtua lab down` leaves nothing of the lab behind: no agent (nor any other process
started under the lab's home), no namespace, no bridge. The demo's order: `lab up`, then
`serve --no-agent` on the lab's gateway, the agents join; serve is stopped (SIGTERM), then
`lab down`. A lab of its own (tag, /24) so that it never meets another one."""

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

from tests.helpers.procs import processes_under
from virtua.net.lab import Lab

ROOT = Path(__file__).resolve().parents[2]


class LabRun:
    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.tag = f"vd{uuid.uuid4().hex[:6]}"
        self.prefix = f"10.219.{os.getpid() % 250 + 1}"
        self.env = dict(os.environ, VIRTUA_HOME=str(self.home), PYTHONPATH=str(ROOT), COLUMNS="200")
        self.serve: subprocess.Popen[str] | None = None
        self.serve_log = tmp / "serve.log"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def namespaces(self) -> list[str]:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return [line.split()[0] for line in out.splitlines() if line.startswith(f"{self.tag}-")]

    def bridge_exists(self) -> bool:
        return subprocess.run(["ip", "link", "show", f"{self.tag}br"], capture_output=True).returncode == 0


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LabRun]:
    run = LabRun(tmp_path)
    try:
        yield run
    finally:  # whatever the test left: its processes, then its network
        if run.serve is not None and run.serve.poll() is None:
            os.killpg(run.serve.pid, signal.SIGKILL)
            run.serve.wait(10)
        for pid in processes_under(run.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        Lab(tag=run.tag, prefix=run.prefix, hosts=2).destroy()


def test_lab_down_leaves_no_agent_behind(lab: LabRun) -> None:
    lab.cli("lab", "up", "--hosts", "2", "--prefix", lab.prefix, "--tag", lab.tag, "--cores", "1", "--memory", "512M")
    assert sorted(lab.namespaces()) == [f"{lab.tag}-h1", f"{lab.tag}-h2"]
    gw = f"{lab.prefix}.1"
    lab.serve = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"{gw}:10809",
         "--api-listen", f"{gw}:8780", "--host-network", f"{lab.prefix}.0/24"],
        env=lab.env, stdout=subprocess.PIPE, stderr=open(lab.serve_log, "w"), text=True, start_new_session=True,
    )
    assert lab.serve.stdout is not None
    line = lab.serve.stdout.readline()
    assert line.startswith("VIRTUA_READY"), line + lab.serve_log.read_text()
    agent_logs = [lab.home / "lab" / h / "agent.log" for h in ("h1", "h2")]
    deadline = time.monotonic() + 90
    while not all(p.exists() and b"registered" in p.read_bytes() for p in agent_logs):  # joined and working
        assert time.monotonic() < deadline, "\n".join(p.read_text() for p in agent_logs if p.exists())
        time.sleep(0.3)
    agents = processes_under(lab.home / "lab")
    assert len([c for c in agents.values() if " agent " in c]) == 2, agents
    lab.serve.send_signal(signal.SIGTERM)
    assert lab.serve.wait(30) == 0, lab.serve_log.read_text()
    lab.cli("lab", "down")
    deadline = time.monotonic() + 10
    while left := processes_under(lab.home):
        assert time.monotonic() < deadline, f"left behind by lab down: {left}"
        time.sleep(0.1)
    assert lab.namespaces() == [] and not lab.bridge_exists()


def test_lab_up_again_with_another_tag_replaces_the_first_lab(lab: LabRun) -> None:
    first = lab.tag
    lab.cli("lab", "up", "--hosts", "1", "--prefix", lab.prefix, "--tag", first, "--cores", "1", "--memory", "512M")
    assert lab.namespaces() == [f"{first}-h1"]
    lab.tag = f"ve{first[2:]}"
    try:
        lab.cli("lab", "up", "--hosts", "1", "--prefix", lab.prefix, "--tag", lab.tag, "--cores", "1",
                "--memory", "512M")
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert f"{first}-h1" not in out and lab.namespaces() == [f"{lab.tag}-h1"], out
        lab.cli("lab", "down")
        deadline = time.monotonic() + 10
        while left := processes_under(lab.home):
            assert time.monotonic() < deadline, f"left behind by lab down: {left}"
            time.sleep(0.1)
        assert lab.namespaces() == [] and not lab.bridge_exists()
    finally:
        Lab(tag=first, prefix=lab.prefix, hosts=1).destroy()
