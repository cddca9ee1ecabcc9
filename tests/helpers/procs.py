"""What a test leaves behind: the live processes whose command line names a directory."""

from __future__ import annotations

import os
from pathlib import Path


def alive(pid: int) -> bool:
    """A process that runs (not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.split(b")")[-1].split()[0] != b"Z"


def processes_under(path: Path) -> dict[int, str]:
    """pid -> command line of every live process whose command line names `path` (or a
    file under it), from /proc."""
    found = {}
    needle = str(path).encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and alive(int(d.name)):
            found[int(d.name)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found
