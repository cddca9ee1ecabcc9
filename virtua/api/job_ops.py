"""Jobs as operations (`job list/show/cancel`), the client-driven import's three calls,
and the undo kinds of storage steps (what recovery runs after a crash)."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from pydantic import Field

from virtua.api.ops import op
from virtua.errors import Cancelled, DependencyError, InvalidArgument
from virtua.jobs import runner
from virtua.jobs.plan import Plan
from virtua.jobs.record import ENDED, Undo
from virtua.jobs.recovery import Context, undo_kind
from virtua.storage.names import parse_ref
from virtua.storage.service import Storage

log = logging.getLogger("virtua.jobs")

JobId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-z-]+$")]


# ---------------------------------------------------------------------- undo kinds


@undo_kind("volumes.rm")
def _undo_volumes(ctx: Context, refs: list[str]) -> None:
    """Remove the volumes that exist and that the step made (with their snapshots and
    clones): a volume of the same name made before the step or since is someone else's."""
    kept: list[str] = []
    for ref in refs:
        r = parse_ref(ref, snapshot=False)
        if r.pool not in ctx.storage.pool_paths():
            continue
        pool = ctx.storage.pool(r.pool)
        vol = pool.volumes_by_name.get(r.volume)
        if vol is None:
            continue
        if not ctx.made_by_step(vol.created):  # not the job's: the name was taken again after the crash
            log.warning("undo keeps %s: it was made at %s, not by the step being undone", ref,
                        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(vol.created)))
            continue
        since = [s for s in pool.snapshots_of(vol) if not ctx.made_by_step(s.created)]
        if ctx.until is not None and since:
            kept.append(f"{ref} (snapshot(s) {', '.join(s.name for s in since)} were made since)")
            continue
        pool.delete_volume(r.volume, recursive=True)
    if kept:
        raise DependencyError(f"kept {'; '.join(kept)}: remove it yourself if it is not needed")


@undo_kind("snapshot.rm")
def _undo_snapshot(ctx: Context, ref: str) -> None:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    if r.pool not in ctx.storage.pool_paths():
        return
    pool = ctx.storage.pool(r.pool)
    vol = pool.volumes_by_name.get(r.volume)
    snap = None if vol is None else next((s for s in pool.snapshots_of(vol) if s.name == r.snapshot), None)
    if snap is None or not ctx.made_by_step(snap.created):
        return
    clones = pool.clones_of(snap)  # the job's own are undone by its later steps, before this one
    if ctx.since is not None and clones:
        raise DependencyError(f"kept {ref}: clone(s) {', '.join(c.name for c in clones)} were made of it since")
    pool.delete_snapshot(r.volume, r.snapshot, recursive=True)


# ---------------------------------------------------------------------- jobs


@op("job.list")
def job_list(st: Storage, state: str | None = None) -> list[dict[str, Any]]:
    """Running jobs; state="all" the latest ended ones too, or only those in that state."""
    if state not in (None, "all", "running", *ENDED):
        raise InvalidArgument(f"bad job state {state!r}: use all, running, {', '.join(ENDED)}")
    jobs = st.jobs.recent(running_only=state in (None, "running"))
    return [j.public() for j in jobs if state in (None, "all") or j.state == state]


@op("job.show")
def job_show(st: Storage, id: JobId) -> dict[str, Any]:
    return st.jobs.get(id).public()


@op("job.cancel")
def job_cancel(st: Storage, id: JobId) -> dict[str, Any]:
    return runner.cancel(st.jobs, id).public()


# ---------------------------------------------------------------------- a client-driven import


@op("volume.import.begin")
def import_begin(
    st: Storage, ref: str, size: Annotated[int, Field(gt=0)], format: str = "raw", source: str = "an image",
) -> dict[str, Any]:
    """Start an import job: create the volume (recorded, so a crash removes it again);
    the client then copies the data over NBD, renews the job (job.renew) and ends it
    (volume.import.end)."""
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    if r.volume in pool.volumes_by_name:
        from virtua.errors import AlreadyExists

        raise AlreadyExists(f"volume {ref} already exists")
    plan = Plan(f"import {source[:200]} into {ref}")
    plan.add(f"create {ref}", lambda: None, record=Undo(kind="volumes.rm", args={"refs": [str(r)]}))
    plan.add(f"copy the data into {ref}", lambda: None)
    job = runner.start(st.jobs, "volume.import", {"ref": str(r), "size": size, "format": format}, plan,
                       client_driven=True, total=size, unit="bytes")
    try:
        job.begin_step(0)
        pool.create_volume(r.volume, size)
        job.end_step(0)
        job.begin_step(1)
    except BaseException as e:
        job.fail(0 if job.record.steps[1].state == "pending" else 1, e)
        raise
    return {"job": job.id, **pool.volume_info(r.volume)}


@op("job.renew")
def job_renew(st: Storage, id: JobId, done: Annotated[int, Field(ge=0)] = 0) -> dict[str, Any]:
    """A client-driven job's heartbeat and progress; says whether to stop."""
    job = runner.live(id)
    if job.record.lease_until is None:  # a lease on it would let the reaper undo it under its runner
        raise InvalidArgument(f"job {id} ({job.record.title}) is not driven by a client: nothing to renew")
    job.renew()
    try:
        job.progress(done)
    except Cancelled:
        return {"cancel": True}
    return {"cancel": False}


@op("volume.import.end")
def import_end(st: Storage, id: JobId, error: Annotated[str, Field(max_length=2000)] | None = None) -> dict[str, Any]:
    """The client's copy ended: keep the volume, or (error, or a cancel) remove it."""
    job = runner.live(id)
    if job.record.op != "volume.import":
        raise InvalidArgument(f"job {id} ({job.record.title}) is not an import")
    ref = str(job.record.args["ref"])
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    if error is None and not job.cancel_requested:
        job.end_step(1)
        return job.finish(pool.volume_info(r.volume))
    _undo_volumes(Context(st).for_step(job.record.steps[0]), [ref])
    job.undone_step(0)
    why: Exception = Cancelled(f"job {id} was cancelled; {ref} is removed") if error is None else InvalidArgument(error)
    job.fail(1, why)
    raise why
