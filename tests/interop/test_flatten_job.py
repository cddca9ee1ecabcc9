"""`volume flatten` is a recorded job with progress in bytes: `--no-wait` returns its ID,
`job cancel` stops it, and `virtua serve` SIGKILLed in the middle of its copy leaves a job
the next start records as interrupted. Whatever point it stops at, the clone reads what it
read before (byte for byte, through an export), `pool check` finds nothing leaked, and a
second flatten finishes the work."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import sqlite3
import time
from pathlib import Path

import pytest

from tests.cli_support import Serve, V

pytestmark = pytest.mark.interop

MIB = 1 << 20


@pytest.fixture
def v(tmp_path: Path) -> V:
    """p/c: a clone of 384 MiB of random data (flatten copies all of it)."""
    cli = V(tmp_path / "home")
    cli.run("pool", "create", "p", "--capacity", "2G")
    img = tmp_path / "base.raw"
    with open(img, "wb") as f:
        for _ in range(384 // 16):
            f.write(os.urandom(16 * MIB))
    cli.run("volume", "import", str(img), "p/base")
    img.unlink()
    cli.run("clone", "p/base", "p/c")
    return cli


def digest(v: V, ref: str) -> str:
    return hashlib.sha256(v.run("volume", "export", ref, "-").stdout).hexdigest()


def journal(v: V, job_id: str) -> dict:  # type: ignore[type-arg]
    """The job's record as the journal holds it now (read straight from jobs.db: polling
    it costs no CLI start-up, so the test sees the job early in its copy)."""
    db = sqlite3.connect(f"file:{v.home / 'jobs.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    return json.loads(row[0])  # type: ignore[no-any-return]


def wait_for(cond, what: str, timeout: float = 60, every: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(every)


def api_post(home: Path, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
    """POST on serve's unix socket (the typed API's route), without a CLI's start-up."""

    class Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(home / "virtua.sock"))

    c = Unix("virtua", timeout=30)
    try:
        c.request("POST", path, body=b"{}", headers={"content-type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def assert_flatten_can_finish(v: V, before: str) -> None:
    assert v.json("pool", "check", "p")["ok"]
    assert digest(v, "p/c") == before, "the clone reads what it read before"
    out = v.json("volume", "flatten", "p/c")
    assert out["origin"] is None and v.json("job", "show", out["job"])["state"] == "done"
    assert digest(v, "p/c") == before
    assert v.json("pool", "check", "p")["ok"]


def test_flatten_runs_as_a_job_and_reports_its_bytes(v: V) -> None:
    serve = Serve(v.home)
    try:
        began = v.json("volume", "flatten", "p/c", "--no-wait")
        assert began["state"] == "running" and began["name"] == "p/c"
        wait_for(lambda: v.json("job", "show", began["job"])["state"] != "running", "the flatten to end")
        job = v.json("job", "show", began["job"])
        assert job["state"] == "done" and job["op"] == "volume.flatten", job
        assert job["progress"] == {"done": 384 * MIB, "total": 384 * MIB, "unit": "bytes"}, job["progress"]
        assert job["result"]["copied"] == 384 * MIB and job["result"]["origin"] is None
        v.fails(3, "volume", "flatten", "p/missing", "--no-wait", match="does not exist")  # checked before a job
    finally:
        serve.stop()


def test_a_cancelled_flatten_stops_and_the_clone_reads_the_same(v: V) -> None:
    before = digest(v, "p/c")
    serve = Serve(v.home)
    try:
        # a flatten of 384 MiB in page cache can end before a cancel lands: a fresh clone of
        # the same data each try, until one cancel lands in the middle of the copy
        for attempt in range(5):
            ref = "p/c" if attempt == 0 else f"p/c{attempt}"
            if attempt:
                v.run("clone", "p/base@clone-c", ref)
            job_id = v.json("volume", "flatten", ref, "--no-wait")["job"]
            wait_for(lambda j=job_id: journal(v, j)["progress"]["done"] > 0 or journal(v, j)["state"] != "running",
                     "the copy to start", every=0.002)
            status, body = api_post(v.home, f"/v1/jobs/{job_id}/cancel")
            wait_for(lambda j=job_id: journal(v, j)["state"] != "running", "the flatten to stop")
            job = v.json("job", "show", job_id)
            if job["state"] == "cancelled":
                break
            # a cancel is a request: one that lands after the copy's last look at it (status
            # 200) or after the job ended (409) leaves a finished flatten, and we try again
            assert job["state"] == "done" and job["progress"]["done"] == 384 * MIB, (status, body, job)
            assert status == 200 or "has ended (done)" in body["message"], (status, body, job)
        else:
            pytest.fail("no cancel landed in the middle of a flatten in 5 tries")
        assert job["state"] == "cancelled", job
        assert job["progress"]["done"] < 384 * MIB, job["progress"]
        info = v.json("volume", "info", ref)
        assert info["origin"] == "p/base@clone-c", "still a clone: partly detached"
        assert digest(v, ref) == before, "the cancelled clone reads what it read before"
        assert_flatten_can_finish(v, before)
    finally:
        serve.stop()


def test_serve_killed_in_the_middle_of_a_flatten_leaves_a_recorded_job(v: V) -> None:
    before = digest(v, "p/c")
    serve = Serve(v.home, env={"VIRTUA_JOB_CRASH": "volume.flatten:0:progress"})  # SIGKILL mid-copy
    r = v.run("volume", "flatten", "p/c", ok=False)
    assert r.returncode != 0, "the daemon died under the command"
    assert serve.proc.wait(timeout=30) == -9
    serve = Serve(v.home)  # its start records the killed serve's job
    try:
        job = next(j for j in v.json("job", "list", "--all") if j["op"] == "volume.flatten")
        assert job["state"] == "undone" and "interrupted" in job["error"], job
        assert job["progress"]["done"] < 384 * MIB, job["progress"]  # killed after a slice, before its report
        assert v.json("volume", "info", "p/c")["origin"] == "p/base@clone-c"
        assert_flatten_can_finish(v, before)
    finally:
        serve.stop()
