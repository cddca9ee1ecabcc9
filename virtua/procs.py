"""Stopping the processes virtua starts (agents, servers): politely, then for sure."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path


def start_ticks(pid: int) -> int | None:
    """The process's start time, in clock ticks since boot (/proc/PID/stat field 22): with
    the pid, it names one process; a reused pid has another. None if it does not run,
    a zombie included (killed, not yet reaped by its parent: its entry keeps its start time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] in (b"Z", b"X"):
            return None
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def stop_process_group(pid: int, what: str, log: logging.Logger, timeout: float = 5.0) -> bool:
    """SIGTERM the process group led by pid, SIGKILL it after `timeout`; True if it is gone.
    A process that was never ours (no such group) counts as gone."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    except PermissionError:
        log.warning("cannot stop %s (pid %d): not ours", what, pid)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            log.info("stopped %s (pid %d)", what, pid)
            return True
        time.sleep(0.05)
    log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it", what, pid, timeout)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    for _ in range(100):
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return False


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b")")[-1].split()[0] != b"Z"
    except OSError:
        return False


def lock_home(home: Path, what: str) -> int:
    """An exclusive flock on HOME/WHAT.lock for this process's life (close-on-exec: no child
    inherits it); Busy, naming the holder's pid, if another process holds it. One `serve`
    per $VIRTUA_HOME, one `agent` per agent home: a second one ran beside the first."""
    import fcntl

    from virtua.errors import Busy

    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / f"{what}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise Busy(f"another virtua {what} (pid {holder or '?'}) runs on {home}: stop it first, or give this one "
                   "a home of its own") from None
    os.ftruncate(fd, 0)
    with contextlib.suppress(OSError):  # a full disk: the lock holds all the same
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
