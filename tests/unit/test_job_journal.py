"""The job journal and runner: every step is on disk as running before its work starts,
a failure undoes the finished steps and keeps the error's category, a cancel from another
connection stops the job at its next step, and recovery undoes a dead owner's job from
its records only (its closures are gone)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtua.errors import Cancelled, NoSpace
from virtua.jobs import runner
from virtua.jobs.plan import Plan
from virtua.jobs.record import JobStore, Owner, Undo
from virtua.jobs.recovery import UNDO_KINDS, Context, recover


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "jobs.db")


def test_each_step_is_journalled_before_it_runs(store: JobStore) -> None:
    seen: list[list[str]] = []
    plan = Plan("three")
    job: runner.Job | None = None

    def look() -> None:
        assert job is not None
        seen.append([s.state for s in store.get(job.id).steps])

    for name in ("a", "b", "c"):
        plan.add(name, look)
    job = runner.start(store, "test", {}, plan)
    plan.run_sync(job)
    job.finish({"ok": True})
    assert seen == [["running", "pending", "pending"], ["done", "running", "pending"], ["done", "done", "running"]]
    rec = store.get(job.id)
    assert rec.state == "done" and rec.result == {"ok": True} and rec.ended is not None
    assert job.id not in runner.LIVE


def test_a_failed_step_undoes_the_finished_ones_and_keeps_the_category(store: JobStore) -> None:
    undone: list[str] = []

    def full() -> None:
        raise NoSpace("pool p is full")

    plan = Plan("fails")
    plan.add("a", lambda: None, lambda: undone.append("a"))
    plan.add("b", lambda: None, lambda: undone.append("b"))
    plan.add("c", full, lambda: undone.append("c"))
    job = runner.start(store, "test", {}, plan)
    with pytest.raises(NoSpace):
        plan.run_sync(job)
    assert undone == ["b", "a"], "newest first, and not the step that failed (it cleans up itself)"
    rec = store.get(job.id)
    assert rec.state == "failed" and rec.error == "pool p is full" and rec.error_kind == "NoSpace"
    assert [s.state for s in rec.steps] == ["undone", "undone", "undone"]


def test_a_cancel_from_another_connection_stops_at_the_next_step(store: JobStore, tmp_path: Path) -> None:
    other = JobStore(tmp_path / "jobs.db")  # e.g. `virtua job cancel` in another process
    undone: list[str] = []
    plan = Plan("cancelled")
    job: runner.Job | None = None

    def cancel_me() -> None:
        assert job is not None
        runner.LIVE.pop(job.id)  # as seen from the other process: not its live job
        runner.cancel(other, job.id)
        runner.LIVE[job.id] = job

    plan.add("a", cancel_me, lambda: undone.append("a"))
    plan.add("b", lambda: undone.append("b ran"))
    job = runner.start(store, "test", {}, plan)
    with pytest.raises(Cancelled):
        plan.run_sync(job)
    assert undone == ["a"], "b never ran; a was undone"
    rec = store.get(job.id)
    assert rec.state == "cancelled" and rec.error_kind == "Cancelled" and rec.cancel_requested


def dead_owner() -> Owner:
    p = subprocess.Popen(["sleep", "0"])
    owner = Owner.me(p.pid)
    p.wait()
    return owner


def test_recovery_undoes_a_dead_owners_job_from_its_records(store: JobStore) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    UNDO_KINDS["test.undo"] = lambda ctx, **args: calls.append(("undo", args))
    plan = Plan("crashed")
    plan.add("a", lambda: None, record=Undo(kind="test.undo", args={"what": "a"}))
    plan.add("b", lambda: None, record=Undo(kind="test.undo", args={"what": "b"}))
    plan.add("c", lambda: None, record=Undo(kind="test.undo", args={"what": "c"}))
    job = runner.start(store, "test", {}, plan)
    job.begin_step(0)
    job.end_step(0)
    job.begin_step(1)  # ...and the process dies here
    runner.LIVE.pop(job.id)
    job.record.owner = dead_owner()
    store.put(job.record)
    live = runner.start(store, "test", {}, Plan("alive", []))  # this process's own: left alone
    done = recover(store, Context(storage=None))
    assert [j.id for j in done] == [job.id]
    assert calls == [("undo", {"what": "b"}), ("undo", {"what": "a"})], "started steps, newest first; c never began"
    rec = store.get(job.id)
    assert rec.state == "undone" and "interrupted" in (rec.error or "")
    assert [s.state for s in rec.steps] == ["undone", "undone", "pending"]
    assert store.get(live.id).state == "running"
    assert recover(store, Context(storage=None)) == [], "recovered once"


def test_a_failing_undo_is_recorded_and_the_rest_still_runs(store: JobStore) -> None:
    calls: list[str] = []

    def broken(ctx: Context, **args: Any) -> None:
        raise OSError("disk gone")

    UNDO_KINDS["test.broken"] = broken
    UNDO_KINDS["test.ok"] = lambda ctx, **args: calls.append("ok")
    plan = Plan("half")
    plan.add("a", lambda: None, record=Undo(kind="test.ok"))
    plan.add("b", lambda: None, record=Undo(kind="test.broken"))
    job = runner.start(store, "test", {}, plan)
    job.begin_step(0)
    job.end_step(0)
    job.begin_step(1)  # (a job past its last step is kept, not undone)
    runner.LIVE.pop(job.id)
    job.record.owner = dead_owner()
    store.put(job.record)
    recover(store, Context(storage=None))
    rec = store.get(job.id)
    assert calls == ["ok"]
    assert rec.state == "failed" and "disk gone" in (rec.error or "")
    assert [s.state for s in rec.steps] == ["undone", "undo-failed"]


def test_an_owner_from_an_earlier_boot_or_a_reused_pid_is_dead() -> None:
    me = Owner.me()
    assert me.alive()
    assert not me.model_copy(update={"boot": "another-boot"}).alive()
    assert not me.model_copy(update={"started": me.started + 1}).alive(), "same pid, another process"


def test_two_recoverers_undo_a_dead_owners_job_once(store: JobStore, tmp_path: Path) -> None:
    """serve and a CLI (or two CLIs) starting at once both find the same orphaned job;
    each claims it before undoing, and only the first claim wins (found in adversarial
    review: both undid it, the second from a stale record)."""
    calls: list[str] = []
    UNDO_KINDS["test.count"] = lambda ctx, **args: calls.append("undo")
    plan = Plan("orphan")
    plan.add("a", lambda: None, record=Undo(kind="test.count"))
    job = runner.start(store, "test", {}, plan)
    job.begin_step(0)
    runner.LIVE.pop(job.id)
    gone = dead_owner()
    job.record.owner = gone
    store.put(job.record)
    other = JobStore(tmp_path / "jobs.db")  # the other process's connection
    stale = other.running()  # it has read the job as orphaned ...
    assert [j.id for j in stale] == [job.id]
    assert [j.id for j in recover(store, Context(storage=None))] == [job.id]  # ... this one undoes it first
    assert other.claim(job.id, gone) is None, "claimed (and ended) by the first recoverer"
    assert recover(other, Context(storage=None)) == []
    assert calls == ["undo"]
    mine = runner.start(store, "test", {}, Plan("alive", []))
    assert other.claim(mine.id, dead_owner()) is None, "a claim names the owner it takes over from"


def test_renew_and_import_end_take_only_a_client_driven_import(tmp_path: Path) -> None:
    """job.renew of a job that serve runs itself (a vc create waiting on its hosts) gave it
    a lease, and the reaper then undid it under its running plan once the lease ran out;
    volume.import.end of such a job was a KeyError (HTTP 500). Both are refused now."""
    from virtua.api import ops
    from virtua.errors import InvalidArgument
    from virtua.storage.service import Storage

    st = Storage(tmp_path / "home")
    try:
        plan = Plan("vc create web")
        plan.add("clone", lambda: None)
        job = runner.start(st.jobs, "vc.create", {"name": "web"}, plan)  # driven by this process
        job.begin_step(0)
        with pytest.raises(InvalidArgument, match="not driven by a client"):
            ops.run(st, "job.renew", {"id": job.id, "done": 5})
        with pytest.raises(InvalidArgument, match="not an import"):
            ops.run(st, "volume.import.end", {"id": job.id})
        rec = st.jobs.get(job.id)
        assert rec.lease_until is None and rec.state == "running" and rec.progress.done == 0
        assert recover(st.jobs, Context(st), expired_only=True) == []
    finally:
        runner.LIVE.clear()
        st.close()


def test_an_undo_that_cannot_reach_the_store_leaves_the_job_for_later(store: JobStore) -> None:
    """vc.forget during recovery while etcd is away: it was recorded undo-failed and the
    steps before it undone (the VC record left in etcd, its disks gone) and the job ended
    for good. Now nothing is undone out of order: the job waits, whole, for a later start."""
    from virtua.errors import Unavailable

    calls: list[str] = []

    def away(ctx: Context, **args: Any) -> None:
        raise Unavailable("etcd at http://127.0.0.1:2379 unreachable")

    UNDO_KINDS["test.away"] = away
    UNDO_KINDS["test.disks"] = lambda ctx, **args: calls.append("disks")
    plan = Plan("vc create web")
    plan.add("disks", lambda: None, record=Undo(kind="test.disks"))
    plan.add("record", lambda: None, record=Undo(kind="test.away"))
    job = runner.start(store, "test", {}, plan)
    job.begin_step(0)
    job.end_step(0)
    job.begin_step(1)
    runner.LIVE.pop(job.id)
    gone = dead_owner()
    job.record.owner = gone
    store.put(job.record)
    assert recover(store, Context(storage=None)) == []
    rec = store.get(job.id)
    assert calls == [], "the disks stay while the record that names them does"
    assert rec.state == "running" and [s.state for s in rec.steps] == ["done", "running"]
    assert rec.owner == gone, "the next recovery finds it"


def test_a_journal_that_fills_up_during_a_step_still_undoes_it(tmp_path: Path) -> None:
    """The disk of the journal fills while a step runs (here the step itself fills it):
    its work is done but `done` cannot be written. That error escaped the plan: nothing
    was undone, and the job stayed live and running. Now the step and the ones before it
    are undone, and the error is the disk's (NoSpace)."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        store = JobStore(mnt / "jobs.db")
        undone: list[str] = []

        def fill() -> None:
            fd = os.open(mnt / "fill", os.O_WRONLY | os.O_CREAT)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError:
                pass
            finally:
                os.close(fd)

        plan = Plan("fills")
        plan.add("a", lambda: None, lambda: undone.append("a"))
        plan.add("b", fill, lambda: undone.append("b"))
        plan.add("c", lambda: undone.append("c ran"))
        job = runner.start(store, "test", {}, plan)
        with pytest.raises(NoSpace):
            plan.run_sync(job)
        assert undone == ["b", "a"], "the filled step's work and the one before it are undone; c never ran"
        assert job.id not in runner.LIVE
        store.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
