"""The fence watchdog, with real processes: past its deadline it SIGKILLs every guest of
its agent home (a stand-in process whose command line names its pidfile, as QEMU's does)
and says so; while the agent keeps moving the deadline nothing is killed; a reused pid
(a process that does not name the pidfile) is never killed; it exits once the agent is
gone and nothing is left to fence."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtua.cluster.fence import Fence, _read, fence_clock

SLEEPER = "import time, sys; time.sleep(120)"


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "vms").mkdir()
    yield tmp_path


def guest(home: Path, name: str, names_pidfile: bool = True) -> subprocess.Popen[bytes]:
    d = home / "vms" / name
    d.mkdir()
    pidfile = d / "qemu.pid"
    args = [sys.executable, "-c", SLEEPER] + ([f"-pidfile={pidfile}"] if names_pidfile else [])
    p = subprocess.Popen(args)
    pidfile.write_text(str(p.pid))
    return p


def watchdog(home: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "virtua.cluster.fence", str(home)],
                            stderr=open(log, "wb"), start_new_session=True)


def test_past_the_deadline_the_guests_are_killed_and_it_says_so(home: Path) -> None:
    g1, g2 = guest(home, "a~a-1"), guest(home, "a~a-2")
    other = guest(home, "reused", names_pidfile=False)  # its pid is in a pidfile, but it is not that QEMU
    fence = Fence(home)
    fence.arm(fence_clock() + 1.5)
    log = home / "fence.log"
    wd = watchdog(home, log)
    try:
        time.sleep(0.8)
        assert g1.poll() is None and g2.poll() is None, "control: before the deadline they run"
        assert g1.wait(timeout=5) == -9 and g2.wait(timeout=5) == -9
        text = log.read_text()
        assert "FENCED" in text and "killed 2 guest(s)" in text and "a~a-1" in text, text
        assert other.poll() is None, "a process that only reuses a pid is left alone"
    finally:
        other.kill()
        wd.kill()


def test_an_agent_that_keeps_renewing_keeps_its_guests(home: Path) -> None:
    g = guest(home, "b~b-1")
    fence = Fence(home)
    fence.arm(fence_clock() + 1.0)
    wd = watchdog(home, home / "fence.log")
    try:
        for _ in range(12):  # 3 s: three deadlines' worth, each moved on in time
            time.sleep(0.25)
            fence.arm(fence_clock() + 1.0)
        assert g.poll() is None
        fence.disarm("test")
        time.sleep(1.5)
        assert g.poll() is None, "disarmed: never fenced"
    finally:
        g.kill()
        wd.kill()


def test_it_exits_when_the_agent_is_gone_and_nothing_is_left(home: Path) -> None:
    agent = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; from pathlib import Path; from virtua.cluster.fence import Fence, fence_clock;"
                              f"Fence(Path({str(home)!r})).arm(fence_clock() + 1.0); time.sleep(0.2)"],
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert agent.wait(timeout=30) == 0
    g = guest(home, "c~c-1")
    wd = watchdog(home, home / "fence.log")
    assert g.wait(timeout=10) == -9, "the agent died: its guest is fenced at the deadline"
    assert wd.wait(timeout=5) == 0, "and then the watchdog has nothing left to do"
    assert _read(home)["agent"] == agent.pid


def test_one_watchdog_per_home(home: Path) -> None:
    fence = Fence(home)
    fence.arm(fence_clock() + 30)
    fence.ensure_watchdog()
    first = (home / "fence.pid").read_text()
    fence.ensure_watchdog()
    assert (home / "fence.pid").read_text() == first, "the running one is kept"
    second = watchdog(home, home / "second.log")
    assert second.wait(timeout=10) == 0, "a second one for the same home leaves at once"
    os.kill(int(first.split()[0]), 9)


def test_a_guest_started_after_the_fence_fired_is_killed_too(home: Path) -> None:
    """An agent stopped (SIGSTOP, a wedged loop) in the middle of starting a VM goes on
    once it is resumed, after its deadline: that QEMU appears after the watchdog fired,
    while the manager may already run the VM elsewhere. It was left running (the watchdog
    fired once per deadline); now every guest is killed for as long as the deadline is past."""
    g1 = guest(home, "c~c-1")
    fence = Fence(home)
    fence.arm(fence_clock() + 0.5)
    log = home / "fence.log"
    wd = watchdog(home, log)
    late = None
    try:
        assert g1.wait(timeout=5) == -9
        late = guest(home, "c~c-2")  # the resumed agent's QEMU, same (past) deadline
        assert late.wait(timeout=5) == -9, "a guest that comes back after the fence is fenced too"
        assert "c~c-2" in log.read_text()
    finally:
        if late is not None and late.poll() is None:
            late.kill()
        wd.kill()


def test_a_killed_watchdog_is_started_again_though_it_is_a_zombie(home: Path) -> None:
    """The watchdog is the agent's child: killed (SIGKILL, the OOM killer, a careless
    pkill), it stays a zombie until reaped, and a zombie's /proc entry keeps its start
    time, so the agent took it for alive and never started another: no fencing for the
    rest of the agent's life (found by kill -9 of a serve's local agent's watchdog)."""
    fence = Fence(home)
    fence.ensure_watchdog()
    pid = int((home / "fence.pid").read_text().split()[0])
    os.kill(pid, 9)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_bytes().split(b")")[-1].split()[0] != b"Z":
        assert time.monotonic() < deadline, "control: it is a zombie of this process"
        time.sleep(0.02)
    fence.ensure_watchdog()
    new = int((home / "fence.pid").read_text().split()[0])
    try:
        assert new != pid, "a new watchdog runs"
        assert Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")[2] == b"virtua.cluster.fence"
    finally:
        os.kill(new, 9)
