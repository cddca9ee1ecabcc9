"""Admin operations as recorded jobs, against real kills: the CLI or `virtua serve`
killed with SIGKILL in the middle of an import, a clone batch or at any recorded step
boundary leaves a job that the next start undoes; afterwards the half-made volumes are
gone, `pool check` finds nothing leaked and `job list --all` says what happened. A
cancelled import stops and removes its volume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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


def slow_import(v: V, ref: str, size: int, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Iterator[None]]:
    """`volume import - REF --size N` fed slowly through a pipe: it stays in its copy
    step until the test has sent enough."""
    proc = subprocess.Popen([*VIRTUA, "volume", "import", "-", ref, "--size", str(size)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**v.env, **(env or {})})
    assert proc.stdin is not None
    stdin = proc.stdin

    def feed() -> Iterator[None]:
        chunk = os.urandom(MIB)
        while True:
            stdin.write(chunk)
            stdin.flush()
            yield

    return proc, feed()


def wait_for(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def jobs(v: V) -> list[dict]:  # type: ignore[type-arg]
    return v.json("job", "list", "--all")  # type: ignore[no-any-return]


def volumes(v: V) -> set[str]:
    return {x["name"] for x in v.json("volume", "list")}


def assert_clean(v: V) -> None:
    check = v.json("pool", "check", "p")
    assert check["ok"], check["problems"]


def importing(v: V, ref: str) -> bool:
    return any(j["op"] == "volume.import" and j["state"] == "running" and j["step"] == f"copy the data into {ref}"
               for j in jobs(v))


def test_an_offline_import_killed_midway_is_undone_by_the_next_command(v: V) -> None:
    proc, feed = slow_import(v, "p/half", 64 * MIB)
    for _ in range(8):
        next(feed)
    wait_for(lambda: importing(v, "p/half"), "the import job to reach its copy step")
    job = next(j for j in jobs(v) if j["op"] == "volume.import")
    assert [s["state"] for s in job["steps"]] == ["done", "running"], "control: the volume is made, the copy runs"
    proc.kill()
    proc.wait()
    # the next command (offline: it opens the pools itself) finds the job's owner gone
    assert "p/half" not in volumes(v), "the killed import's volume is removed"
    job = next(j for j in jobs(v) if j["op"] == "volume.import")
    assert job["state"] == "undone" and "interrupted" in job["error"], job
    assert [s["state"] for s in job["steps"]] == ["undone", "undone"]
    assert_clean(v)
    v.run("volume", "import", "-", "p/half", "--size", str(MIB), input=b"x" * MIB)  # the name is free again


def test_an_import_whose_client_dies_is_undone_by_serve(v: V) -> None:
    serve = Serve(v.home, env={"VIRTUA_JOB_LEASE": "3"})
    try:
        proc, feed = slow_import(v, "p/orphan", 64 * MIB, env={"VIRTUA_JOB_LEASE": "3"})
        for _ in range(8):
            next(feed)
        wait_for(lambda: importing(v, "p/orphan"), "the import job to reach its copy step")
        time.sleep(4)  # past the lease: the client's renewals keep it alive
        assert "p/orphan" in volumes(v), "control: a live client's import is not reaped"
        proc.kill()
        proc.wait()
        wait_for(lambda: "p/orphan" not in volumes(v), "serve to undo the import once its lease ran out", 20)
        job = next(j for j in jobs(v) if j["args"]["ref"] == "p/orphan")
        assert job["state"] == "undone" and "stopped renewing" in job["error"], job
        assert_clean(v)
    finally:
        serve.stop()


def test_an_import_survives_nothing_of_a_killed_serve(v: V) -> None:
    serve = Serve(v.home)
    proc, feed = slow_import(v, "p/cut", 64 * MIB)
    try:
        for _ in range(8):
            next(feed)
        wait_for(lambda: importing(v, "p/cut"), "the import job to reach its copy step")
        serve.proc.kill()
        serve.proc.wait()
        with pytest.raises(BrokenPipeError):
            for _ in range(64):
                next(feed)
        proc.wait(timeout=30)
        assert proc.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    serve = Serve(v.home)  # its start undoes the killed serve's job
    try:
        assert "p/cut" not in volumes(v)
        job = next(j for j in jobs(v) if j["args"].get("ref") == "p/cut")
        assert job["state"] == "undone" and "interrupted" in job["error"], job
        assert_clean(v)
    finally:
        serve.stop()


def test_a_cancelled_import_stops_and_removes_its_volume(v: V) -> None:
    serve = Serve(v.home)
    try:
        proc, feed = slow_import(v, "p/stopme", 64 * MIB)
        for _ in range(4):
            next(feed)
        wait_for(lambda: importing(v, "p/stopme"), "the import job to reach its copy step")
        job_id = next(j["id"] for j in jobs(v) if j["state"] == "running")
        v.run("job", "cancel", job_id)
        try:  # the copy stops at its next progress report
            for _ in range(60):
                next(feed)
        except BrokenPipeError:
            pass
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 13, err.decode()
        assert "cancelled" in err.decode()
        assert "p/stopme" not in volumes(v)
        assert v.json("job", "show", job_id)["state"] == "cancelled"
        v.fails(2, "job", "cancel", job_id, match="has ended")
        assert_clean(v)
    finally:
        serve.stop()


@pytest.mark.parametrize("where", ["clone:0:end", "clone:1:begin", "clone:1:end"])
def test_a_clone_batch_killed_at_each_step_boundary_is_undone(v: V, where: str) -> None:
    """serve is SIGKILLed at a recorded step boundary of `clone --count 50`."""
    serve = Serve(v.home, env={"VIRTUA_JOB_CRASH": where})
    r = v.run("clone", "p/base", "p/n", "--count", "50", ok=False)
    assert r.returncode != 0, "the daemon died under the command"
    assert serve.proc.wait(timeout=30) == -signal.SIGKILL
    serve = Serve(v.home)
    try:
        left = volumes(v)
        assert left == {"p/base"}, left
        snaps = [s["name"] for s in v.json("snapshot", "list", "p/base")]
        assert snaps == [], "the batch's implicit snapshot is undone too"
        job = next(j for j in jobs(v) if j["op"] == "clone")
        assert job["state"] == "undone", job
        assert_clean(v)
        out = v.json("clone", "p/base", "p/n", "--count", "50")  # control: the same batch now works
        assert len(out["clones"]) == 50 and v.json("job", "show", out["job"])["state"] == "done"
    finally:
        serve.stop()


def test_dry_run_prints_the_plan_and_changes_nothing(v: V) -> None:
    out = v.json("clone", "p/base", "p/d", "--count", "3", "--dry-run")
    assert out["plan"] == ["snapshot p/base@clone-d", "create 3 clone(s) of p/base@clone-d"]
    assert volumes(v) == {"p/base"} and jobs(v) == []
    v.fails(4, "clone", "p/base", "p/base", "--dry-run", match="already exists")


@pytest.mark.parametrize("where", ["template.build:1:end", "template.build:2:end"])
def test_a_template_build_killed_after_its_import_or_its_record_is_undone(v: V, where: str) -> None:
    """serve is SIGKILLed once the template's volume is imported (and snapshotted), or once
    its record is written too: the next serve removes both, and the build then works."""
    serve = Serve(v.home, env={"VIRTUA_JOB_CRASH": where})
    r = v.run("template", "build", "t", ok=False)
    assert r.returncode != 0, "the daemon died under the command"
    assert serve.proc.wait(timeout=60) == -signal.SIGKILL
    step = int(where.split(":")[1])
    db = sqlite3.connect(f"file:{v.home / 'jobs.db'}?mode=ro", uri=True)  # not the CLI: it would recover
    try:
        (row,) = db.execute("SELECT record FROM jobs WHERE state = 'running'").fetchall()
    finally:
        db.close()
    left = json.loads(row[0])
    assert [s["state"] for s in left["steps"]] == ["done"] * step + ["running"] + ["pending"] * (2 - step), left
    serve = Serve(v.home)
    try:
        assert "p/template-t" not in volumes(v)
        assert v.json("template", "list") == []
        assert not (v.home / "templates" / "t").exists(), "its boot files went with the record"
        job = next(j for j in jobs(v) if j["op"] == "template.build")
        assert job["state"] == "undone" and "interrupted" in job["error"], job
        assert_clean(v)
        out = v.json("template", "build", "t")  # control: the same build now works
        assert out["snapshot"] == "p/template-t@base"
        assert next(j for j in jobs(v) if j["op"] == "template.build" and j["state"] == "done")
    finally:
        serve.stop()
