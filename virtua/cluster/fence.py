"""Self-fencing: a host that cannot renew its lease stops its guests before the lease runs
out, so the manager never restarts a VM that still runs (ARCHITECTURE.md, invariant 4).

The lease: every heartbeat the manager answers renews it for LEASE_TTL seconds from when
the manager received it; the manager restarts a silent host's VMs only after that. The
agent, after each answered heartbeat, moves its fence deadline to FENCE_AFTER seconds
after it *sent* that heartbeat (earlier than the manager's receipt, so the deadline is
always before the lease's end, whatever the network delay). Monotonic clocks on both
sides: a wall-clock jump moves nothing.

The watchdog that enforces the deadline is a process of its own (`python -m
virtua.cluster.fence AGENT_HOME`, in its own session), so an agent that is killed or
stopped (SIGKILL, SIGSTOP, a wedged loop) still fences: the watchdog reads the deadline
from AGENT_HOME/fence.json and, past it, kills every QEMU of that home with SIGKILL and
says so in the agent's log. It exits once the agent is gone and nothing is left to fence.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from virtua.procs import start_ticks

log = logging.getLogger("virtua.fence")

LEASE_TTL = 10.0  # seconds a host's lease lasts after its last answered heartbeat
FENCE_MARGIN = 3.0  # a host kills its guests this long before its lease can end
POLL = 0.2
STATE = "fence.json"


def fence_after(ttl: float) -> float:
    return max(ttl - FENCE_MARGIN, ttl / 2)


def _write(home: Path, state: dict[str, Any]) -> None:
    tmp = home / (STATE + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, home / STATE)


def _read(home: Path) -> dict[str, Any]:
    try:
        d = json.loads((home / STATE).read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: Any, ticks: Any) -> bool:
    return isinstance(pid, int) and pid > 0 and start_ticks(pid) == ticks


def fence_clock() -> float:
    """The clock of fence deadlines: CLOCK_BOOTTIME, which counts time the host spent
    suspended or frozen (CLOCK_MONOTONIC does not: after a resume the guests would run on
    while their lease, which the manager counts on its own clock, ran out long ago)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class Fence:
    """The agent's side: arm (move the deadline), disarm, and keep the watchdog running."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.deadline: float | None = None

    def arm(self, deadline: float) -> None:
        """Fence at fence_clock() time `deadline` unless armed again before."""
        if self.deadline is None:
            log.info("fencing armed: this host's guests are killed if its lease is not renewed for %.1f s",
                     deadline - fence_clock())
        self.deadline = deadline
        self._save()

    def disarm(self, why: str) -> None:
        if self.deadline is not None:
            log.info("fencing disarmed: %s", why)
        self.deadline = None
        self._save()

    def _save(self) -> None:
        me = os.getpid()
        _write(self.home, {"deadline": self.deadline, "agent": me, "agent_ticks": start_ticks(me)})

    def ensure_watchdog(self) -> None:
        """Start the watchdog unless the one of this home still runs."""
        if _watchdog_alive(self.home):
            return
        import subprocess

        proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cluster.fence", str(self.home)],
            stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(),
            start_new_session=True,  # not in the agent's process group: it outlives a kill of it
        )
        deadline = time.monotonic() + 10
        while not _watchdog_alive(self.home) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("fence watchdog started (pid %d)", proc.pid)


def _watchdog_alive(home: Path) -> bool:
    try:
        pid, ticks = (int(x) for x in (home / "fence.pid").read_text().split())
    except (OSError, ValueError):
        return False
    return _alive(pid, ticks)


def guests(home: Path) -> list[tuple[str, int]]:
    """(run dir, pid) of every QEMU of this agent home that runs."""
    out = []
    for pidfile in sorted((home / "vms").glob("*/qemu.pid")):
        try:
            pid = int(pidfile.read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if str(pidfile).encode() in cmd:  # that pid is still this QEMU, not a reused one
            out.append((pidfile.parent.name, pid))
    return out


FENCED_FILE = "fenced.json"  # run dir -> pid of each guest the watchdog killed
FENCED_ERROR = "fenced: its host's lease was not renewed in time"  # an agent's report of such a guest


def record_fenced(home: Path, killed: list[tuple[str, int]]) -> None:
    """Say which guests the fence killed (run dir, pid), for the agent's reports: the
    manager restarts those once it hears from the host again (it did not stop them)."""
    try:
        known = json.loads((home / FENCED_FILE).read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    known.update({name: pid for name, pid in killed})
    tmp = home / f"{FENCED_FILE}.tmp"
    tmp.write_text(json.dumps(known))
    os.replace(tmp, home / FENCED_FILE)


def fenced(home: Path) -> dict[str, int]:
    """run dir -> pid of the guests the fence killed (record_fenced)."""
    try:
        known = json.loads((home / FENCED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in known.items() if isinstance(v, int)} if isinstance(known, dict) else {}


def watch(home: Path) -> int:
    """The watchdog's loop (its own process)."""
    if _watchdog_alive(home):
        return 0  # one watchdog per home
    me = os.getpid()
    tmp = home / "fence.pid.tmp"
    tmp.write_text(f"{me} {start_ticks(me)}")
    os.replace(tmp, home / "fence.pid")
    while True:
        time.sleep(POLL)
        state = _read(home)
        deadline = state.get("deadline")
        agent_alive = _alive(state.get("agent"), state.get("agent_ticks"))
        running = guests(home)
        # every guest while the deadline is past, not once per deadline: a QEMU that an agent
        # resumed after a stop (SIGSTOP, a wedged loop) starts late must not run beside its
        # restart elsewhere
        if isinstance(deadline, int | float) and fence_clock() > deadline:
            if running:
                late = fence_clock() - deadline
                for _name, pid in running:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                record_fenced(home, running)
                log.error(
                    "FENCED: this host's lease was not renewed in time (the agent %s; %.1f s past the fence "
                    "deadline): killed %d guest(s) before the manager may restart them elsewhere: %s",
                    "runs but cannot reach its manager" if agent_alive else "is gone", late, len(running),
                    ", ".join(n for n, _ in running),
                )
                running = []
        if not agent_alive and (not running or not isinstance(deadline, int | float)):
            return 0  # nobody to fence for


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.exit(watch(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
