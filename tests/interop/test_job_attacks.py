"""Jobs attacked: recovery that must not take back what the job did not make (a volume
re-created under the same name after a crash), two recoverers at once, a journal that is
not a database. Real `virtua serve`, real CLI subprocesses, real SIGKILLs."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_support import VIRTUA, Serve, V

pytestmark = pytest.mark.interop

MIB = 1 << 20


@pytest.fixture
def v(tmp_path: Path) -> V:
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "1G")
    cli.run("volume", "create", "p/base", "--size", "8M")
    return cli


def wait_for(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def api(v: V) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(v.home / "virtua.sock")), base_url="http://virtua",
                        timeout=30)


def job(v: V, job_id: str) -> dict[str, Any]:
    return v.json("job", "show", job_id)  # type: ignore[no-any-return]


def volumes(v: V) -> dict[str, dict[str, Any]]:
    return {x["name"]: x for x in v.json("volume", "list")}


def test_the_reaper_keeps_a_volume_re_created_after_its_import_went_quiet(v: V) -> None:
    """A client begins an import and goes quiet (killed); the operator removes the half
    volume and makes a new one of the same name before the job's lease runs out. The
    reaper then undoes the job: it must not remove the operator's volume."""
    serve = Serve(v.home, env={"VIRTUA_JOB_LEASE": "6"})
    try:
        with api(v) as http:
            r = http.post("/v1/pools/p/imports", json={"name": "again", "size": MIB})
            assert r.status_code == 200, r.text
            job_id = r.json()["job"]
        v.run("volume", "rm", "p/again")
        v.run("volume", "create", "p/again", "--size", "2M")
        assert job(v, job_id)["state"] == "running", "control: the lease has not run out yet"
        wait_for(lambda: job(v, job_id)["state"] != "running", "the reaper to undo the quiet import", 20)
        assert "p/again" in volumes(v), "the operator's new volume was removed by the old job's undo"
        assert volumes(v)["p/again"]["size"] == 2 * MIB
        assert v.json("pool", "check", "p")["ok"]
    finally:
        serve.stop()


def crash_offline_clone(v: V) -> str:
    """`clone --count 3` offline, SIGKILLed once its clones are made (the journal says the
    step still runs); returns the job's id."""
    r = subprocess.run([*VIRTUA, "clone", "p/base", "p/n", "--count", "3"], capture_output=True,
                       env={**v.env, "VIRTUA_JOB_CRASH": "clone:1:end"}, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    rows = sqlite3.connect(v.home / "jobs.db").execute("SELECT id FROM jobs WHERE state = 'running'").fetchall()
    assert len(rows) == 1, rows
    return str(rows[0][0])


def test_a_recovery_that_meets_a_held_pool_leaves_the_job_for_the_next_one(v: V) -> None:
    """The pool is held by another process (serve while it starts, before its socket
    answers; here flock(1)) when a CLI recovers a killed job: the undo cannot run now. The
    job must stay to be undone later, not be marked failed for good with its clones left."""
    job_id = crash_offline_clone(v)
    lock = v.home / "pools" / "p" / "lock"
    holder = subprocess.Popen(["flock", "-x", str(lock), "-c", "echo held; read _"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        r = v.run("job", "show", job_id, "--json", ok=False)  # its start recovers: the pool is not to be had
        assert r.returncode == 0, r.stderr.decode()
        assert json.loads(r.stdout)["state"] == "running", "the job waits for a process that can undo it"
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
    assert set(volumes(v)) == {"p/base"}, "the next command undoes the job"
    shown = job(v, job_id)
    assert shown["state"] == "undone", shown
    assert v.json("pool", "check", "p")["ok"]
