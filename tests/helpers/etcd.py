"""Real etcd members for tests: one alone, or a cluster of N (killed, data removed, after)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.cli_support import free_port
from virtua.cluster.etcd_server import Member, start_member, wait_healthy


def _kill(pid: int) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):  # a test may have frozen it
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)


@contextlib.contextmanager
def solo_etcd() -> Iterator[str]:
    """One member on 127.0.0.1; yields its client URL."""
    d = Path(tempfile.mkdtemp(prefix="vt-etcd-"))
    me = Member("solo", "127.0.0.1", free_port(), free_port())
    proc = start_member(me, [me], d, token=uuid.uuid4().hex)
    try:
        wait_healthy(me.client_url)
        yield me.client_url
    finally:
        _kill(proc.pid)
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def etcd_cluster(data: Path, hosts: list[str]) -> Iterator[tuple[list[Member], list[int]]]:
    """One member per host address; yields the members and their pids."""
    members = [Member(f"m{i}", h, free_port(h), free_port(h)) for i, h in enumerate(hosts, 1)]
    token = uuid.uuid4().hex
    procs = [start_member(m, members, data / m.name, token) for m in members]
    try:
        for m in members:
            wait_healthy(m.client_url)
        yield members, [p.pid for p in procs]
    finally:
        for p in procs:
            _kill(p.pid)
            p.wait()
