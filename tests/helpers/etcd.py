"""Real etcd members for tests: one alone, or a cluster of N (killed, data removed, after)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.cli_support import free_port
from virtua.cluster.etcd_server import Member, start_member, wait_healthy
from virtua.errors import Unavailable


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


def put_once_back(store: Any, key: str, value: dict[str, Any], within: float = 20, every: float = 0.3) -> None:
    """Put key until the store takes it (the quorum back), failing the test after within s."""
    deadline = time.monotonic() + within
    while True:
        try:
            store.put(key, value)
            return
        except Unavailable:
            assert time.monotonic() < deadline, f"no recovery within {within:g} s after the quorum came back"
            time.sleep(every)
