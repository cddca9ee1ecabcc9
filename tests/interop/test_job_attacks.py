"""Jobs attacked: recovery that must not take back what the job did not make (a volume
re-created under the same name after a crash), two recoverers at once, a journal that is
not a database. Real `virtua serve`, real CLI subprocesses, real SIGKILLs."""

from __future__ import annotations

import json
import os
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
    serve = Serve(v.home, env={"VIRTUA_JOB_LEASE": "8"})
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


def test_a_damaged_journal_is_said_in_one_line_not_a_traceback(v: V) -> None:
    """jobs.db overwritten (a bad disk, a careless copy): every command said a traceback.
    Now: what is damaged and what to do, exit 1; a single damaged row is skipped."""
    journal = v.home / "jobs.db"
    for name in ("jobs.db-wal", "jobs.db-shm"):
        (v.home / name).unlink(missing_ok=True)
    journal.write_bytes(b"SQLite format 3\0" + b"\xff" * 4080)
    line = v.fails(1, "volume", "list", match="the job journal")
    assert str(journal) in line and "damaged" in line and "mv " in line
    journal.unlink()
    v.run("volume", "list")  # a new journal
    with sqlite3.connect(journal) as db:
        db.execute("INSERT INTO jobs VALUES ('20260101-000000-abcdef', 'running', 0, '{not json', 0)")
    assert set(volumes(v)) == {"p/base"}, "a damaged row does not stop the command"
    assert v.json("job", "list", "--all") == []
    r = v.run("job", "show", "20260101-000000-abcdef", ok=False)
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("virtua: error: job 20260101-000000-abcdef: its record in"), err


@pytest.fixture
def small_home(tmp_path: Path) -> Any:
    """A $VIRTUA_HOME on its own 2 MiB tmpfs (the pool lives elsewhere), to fill."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_journal_is_no_space_not_an_internal_error(tmp_path: Path, small_home: Path) -> None:
    """The disk of $VIRTUA_HOME fills while serve runs: a job cannot be journalled, so it
    must not start, and the error keeps its category (NoSpace: exit 6, HTTP 507); it was
    'internal error (OperationalError)', exit 1."""
    v = V(small_home / "home")
    v.run("pool", "create", "p", "--capacity", "1G", "--path", str(tmp_path / "pool"))
    v.run("volume", "create", "p/base", "--size", "8M")
    serve = Serve(v.home)
    try:
        fd = os.open(small_home / "fill", os.O_WRONLY | os.O_CREAT)  # every free block of the home's disk
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        v.fails(6, "clone", "p/base", "p/n", "--count", "3", match="job journal")
        with api(v) as http:
            r = http.post("/v1/pools/p/volumes/base/clone", json={"new": "p/m"})
        assert r.status_code == 507 and r.json()["error"] == "NoSpace", r.text
        assert set(volumes(v)) == {"p/base"}, "nothing ran without its journal"
        (small_home / "fill").unlink()
        assert len(v.json("clone", "p/base", "p/n", "--count", "3")["clones"]) == 3, "room again: it works"
    finally:
        serve.stop()


def test_serve_killed_after_an_imports_volume_is_made_undoes_it_at_its_next_start(v: V) -> None:
    """SIGKILL at a point the crash tests did not cover: serve has made the import's volume
    but not yet journalled the step done, nor answered. The CLI says serve went away (exit
    10, one line); the next serve removes the volume, and the name is free again."""
    serve = Serve(v.home, env={"VIRTUA_JOB_CRASH": "volume.import:0:end"})
    r = v.run("volume", "import", "-", "p/cut", "--size", str(MIB), input=b"x" * MIB, ok=False)
    err = r.stderr.decode()
    assert r.returncode == 10 and "Traceback" not in err, (r.returncode, err)
    assert serve.proc.wait(timeout=30) == -signal.SIGKILL
    serve = Serve(v.home)
    try:
        assert set(volumes(v)) == {"p/base"}
        job = next(j for j in v.json("job", "list", "--all") if j["op"] == "volume.import")
        assert job["state"] == "undone" and [s["state"] for s in job["steps"]] == ["undone", "pending"], job
        assert v.json("pool", "check", "p")["ok"]
        v.run("volume", "import", "-", "p/cut", "--size", str(MIB), input=b"y" * MIB)
    finally:
        serve.stop()


def test_a_second_serve_on_one_home_is_refused(tmp_path: Path) -> None:
    """Two `virtua serve` on one $VIRTUA_HOME (other ports, no pool yet to lock): the
    second took over the admin socket (unlinked the first's), ran a second manager on the
    same manager.db and a second reaper on the same journal. Now it is refused at once."""
    v = V(tmp_path / "home")
    first = Serve(v.home)
    try:
        r = v.run("serve", "--no-agent", "--listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0", ok=False, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 8 and "another virtua serve" in err and str(first.proc.pid) in err, (r.returncode, err)
        assert v.json("pool", "list") == [], "the first serve still answers on its socket"
        with api(v) as http:
            assert http.get("/v1/status").json()["pid"] == first.proc.pid
    finally:
        first.stop()


def test_a_job_killed_after_its_last_step_keeps_what_it_made(v: V) -> None:
    """serve SIGKILLed when every step of a clone batch is journalled done but the job is
    not yet ended (VIRTUA_JOB_CRASH=clone:finish; for `vc create --start` that is while
    its VMs start). Recovery undid everything it had made (for a VC: the disks under its
    running guests); what is whole is kept now, and the job says it was interrupted."""
    serve = Serve(v.home, env={"VIRTUA_JOB_CRASH": "clone:finish"})
    r = v.run("clone", "p/base", "p/k", "--count", "3", ok=False)
    assert r.returncode != 0
    assert serve.proc.wait(timeout=30) == -signal.SIGKILL
    serve = Serve(v.home)
    try:
        assert set(volumes(v)) == {"p/base", "p/k-1", "p/k-2", "p/k-3"}, "the finished batch is kept"
        j = next(x for x in v.json("job", "list", "--all") if x["op"] == "clone")
        assert j["state"] == "failed" and "what it made is kept" in j["error"], j
        assert [s["state"] for s in j["steps"]] == ["done", "done"], j
        assert v.json("pool", "check", "p")["ok"]
    finally:
        serve.stop()
