"""Jobs as operations (`job list/show/cancel`), the client-driven import's three calls,
and the undo kinds of storage steps (what recovery runs after a crash)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from typing import Annotated, Any

from pydantic import Field

from virtua.api.ops import _serving, op
from virtua.errors import Busy, Cancelled, DependencyError, InvalidArgument, VirtuaError
from virtua.jobs import runner
from virtua.jobs.plan import Plan
from virtua.jobs.record import ENDED, Undo
from virtua.jobs.recovery import Context, undo_kind
from virtua.storage import filecopy
from virtua.storage.names import parse_ref
from virtua.storage.pool import Pin
from virtua.storage.service import Storage
from virtua.storage.volume import SnapshotDevice, VolumeDevice

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
) -> Any:  # its dict, or (in serve) a coroutine of it
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

    def journalled() -> runner.Job:  # the job, and its step 0 begun, on disk (two fsyncs)
        job = runner.start(st.jobs, "volume.import", {"ref": str(r), "size": size, "format": format}, plan,
                           client_driven=True, total=size, unit="bytes")
        try:
            job.begin_step(0)
        except BaseException as e:
            job.fail(0, e)
            raise
        return job

    def create(job: runner.Job) -> dict[str, Any]:
        try:
            pool.create_volume(r.volume, size)
            job.end_step(0)
            job.begin_step(1)
        except BaseException as e:
            job.fail(0 if job.record.steps[1].state == "pending" else 1, e)
            raise
        return {"job": job.id, **pool.volume_info(r.volume)}

    if not _serving():
        return create(journalled())

    async def go() -> dict[str, Any]:
        import asyncio

        # the journal's fsyncs in a thread: beside a big import's writeback each one took
        # 20-110 ms, and serve's loop (every guest's disk) waited for them
        job = await asyncio.get_running_loop().run_in_executor(None, journalled)
        return create(job)

    return go()


@op("job.renew")
def job_renew(st: Storage, id: JobId, done: Annotated[int, Field(ge=0)] | None = None) -> dict[str, Any]:
    """A client-driven job's heartbeat and progress (done: none while the daemon itself
    copies, volume.import.file); says whether to stop, and how far the job is."""
    job = runner.live(id)
    if job.record.lease_until is None:  # a lease on it would let the reaper undo it under its runner
        raise InvalidArgument(f"job {id} ({job.record.title}) is not driven by a client: nothing to renew")
    job.renew()
    try:
        if done is None:
            job.check_cancel()
        else:
            job.progress(done)
    except Cancelled:
        return {"cancel": True, "done": job.record.progress.done}
    return {"cancel": False, "done": job.record.progress.done}


def _client_job(id: str, op_name: str, what: str) -> runner.Job:
    job = runner.live(id)
    if job.record.op != op_name:
        raise InvalidArgument(f"job {id} ({job.record.title}) is not {what}")
    return job


IMPORTING = "being imported"  # the daemon's own copy into an import's volume (its pin)


@op("volume.import.file")
def import_file(st: Storage, id: JobId, path: Annotated[str, Field(min_length=1, max_length=4096)],
                device: int, inode: int, caller_is_local: bool = False) -> Any:
    """Copy a file on this machine into the import job's volume without NBD (see
    virtua.storage.filecopy); `device` and `inode` are what the client's own open of
    `path` found, so the daemon copies the file the client may read and no other.
    {"copied": false, "why": ...} when it cannot (then the client copies over NBD).
    Only for a caller on this machine as root (the unix socket; caller_is_local comes
    from the transport): the daemon opens the path as root, and stat(2) tells anyone a
    file's device and inode, so a TCP caller (even with the admin certificate) names none."""
    job = _client_job(id, "volume.import", "an import")
    if not caller_is_local:
        return {"copied": False, "why": "the daemon copies files only for a caller on its unix socket"}
    ref, fmt, size = str(job.record.args["ref"]), str(job.record.args["format"]), int(job.record.args["size"])
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    try:
        # A FIFO or a device is never opened (an open could block the loop, or act: a
        # watchdog arms). The name is resolved once, to an O_PATH descriptor (which opens
        # nothing); only the regular file the client opened is then opened, through it,
        # so a name swapped after the check cannot lead the open elsewhere.
        where = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        return {"copied": False, "why": f"the daemon cannot open {path}: {e.strerror}"}
    try:
        st_ = os.fstat(where)
        if not stat.S_ISREG(st_.st_mode) or (st_.st_dev, st_.st_ino) != (device, inode):
            return {"copied": False, "why": f"{path} is another file here than the client's"}
        fd = os.open(f"/proc/self/fd/{where}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        return {"copied": False, "why": f"the daemon cannot open {path}: {e.strerror}"}
    finally:
        os.close(where)
    try:
        dev = VolumeDevice(pool, pool.volume(r.volume))
        # pinned from the first look at the image: no removal of the volume, no end of
        # the job as a success (its volume half full) until the copy ends (Busy)
        pin = pool.pin(dev.vol, IMPORTING)
    except BaseException:
        os.close(fd)
        raise

    def progress(done: int) -> None:
        job.renew()  # the daemon is the one at work: its lease must not run out meanwhile
        job.progress(done)

    def copied(n: int) -> dict[str, Any]:
        return {"copied": True, "bytes": n}

    if not _serving():
        try:
            runs = filecopy.image_runs(fd, fmt, size)
            if isinstance(runs, str):
                return {"copied": False, "why": runs}
            return copied(filecopy.copy_in(dev, fd, runs, progress))
        finally:
            pool.unpin(dev.vol.id, pin)
            os.close(fd)

    async def go() -> dict[str, Any]:
        import asyncio

        try:
            runs = await asyncio.get_running_loop().run_in_executor(None, filecopy.image_runs, fd, fmt, size)
            if isinstance(runs, str):
                return {"copied": False, "why": runs}
            return copied(await filecopy.copy_in_async(dev, fd, runs, progress))
        finally:
            pool.unpin(dev.vol.id, pin)
            os.close(fd)

    return go()


# ---------------------------------------------------------------------- a local export


EXPORT_PINS: dict[str, tuple[str, int, Pin]] = {}  # job -> (pool, volume id, pin) in this process


@undo_kind("export.release")
def _undo_export(ctx: Context, job: str, snapshot: str | None = None) -> None:
    """Unpin what the export held, and remove the snapshot it took (if it made it)."""
    held = EXPORT_PINS.pop(job, None)
    if held is not None and held[0] in ctx.storage.pool_paths():
        ctx.storage.pool(held[0]).unpin(held[1], held[2])
    if snapshot is not None:
        _undo_snapshot(ctx, snapshot)


@op("volume.export.begin")
def export_begin(st: Storage, ref: str, caller_is_local: bool = False) -> dict[str, Any]:
    """Hold an image still while a local client reads it from the pool's data file: a
    volume through a snapshot taken now (its writers go on; the copy is of this moment),
    a snapshot as it is. Returns the job, the data file and where each run of the image
    is in it (see virtua.storage.filecopy); volume.export.end releases it. A TCP caller
    (caller_is_local false: it may be on another machine, where that path is another
    file) is told no file, data_file null: it reads the held image over NBD."""
    r = parse_ref(ref)
    pool = st.pool(r.pool)
    vol = pool.volume(r.volume)
    plan = Plan(f"export {ref}")
    plan.add(f"hold {ref}", lambda: None)
    plan.add("copy the data out", lambda: None)
    job = runner.start(st.jobs, "volume.export", {"ref": str(r)}, plan, client_driven=True, unit="bytes")
    snap_ref = None if r.snapshot is not None else f"{r}@export-{job.id}"
    job.record.steps[0].undo = Undo(kind="export.release", args={"job": job.id, "snapshot": snap_ref})
    try:
        job.begin_step(0)
        if r.snapshot is None:
            snap = pool.create_snapshot(r.volume, f"export-{job.id}")
        else:
            snap = pool.snapshot(r.volume, r.snapshot)
        pin = pool.pin(vol, f"being exported (job {job.id})")
        EXPORT_PINS[job.id] = (pool.name, vol.id, pin)
        job.end_step(0)
        job.begin_step(1)
        dev = SnapshotDevice(pool, snap)
        extents = filecopy.data_extents(dev, os.fstat(pool.data_fd).st_size)
    except BaseException as e:
        with contextlib.suppress(VirtuaError):
            _undo_export(Context(st).for_step(job.record.steps[0]), job.id, snap_ref)
        job.fail(0 if job.record.steps[1].state == "pending" else 1, e)
        raise
    job.progress(0, dev.size)
    if not caller_is_local:
        return {"job": job.id, "size": dev.size, "data_file": None, "extents": []}
    return {"job": job.id, "size": dev.size, "data_file": str(pool.path / "data"), "extents": extents}


@op("volume.export.end")
def export_end(st: Storage, id: JobId, error: Annotated[str, Field(max_length=2000)] | None = None) -> dict[str, Any]:
    """The client's copy ended: release what export.begin held."""
    job = _client_job(id, "volume.export", "an export")
    undo = job.record.steps[0].undo
    assert undo is not None
    _undo_export(Context(st).for_step(job.record.steps[0]), id, undo.args.get("snapshot"))
    if error is None and not job.cancel_requested:
        job.end_step(1)
        return job.finish({"name": job.record.args["ref"]})
    why: Exception = Cancelled(f"job {id} was cancelled") if error is None else InvalidArgument(error)
    job.fail(1, why)
    raise why


@op("volume.import.end")
def import_end(st: Storage, id: JobId, error: Annotated[str, Field(max_length=2000)] | None = None) -> dict[str, Any]:
    """The client's copy ended: keep the volume, or (error, or a cancel) remove it."""
    job = _client_job(id, "volume.import", "an import")
    ref = str(job.record.args["ref"])
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    if error is None and not job.cancel_requested:
        if getattr(pool.busy.get(pool.volume(r.volume).id), "doing", None) == IMPORTING:
            raise Busy(f"cannot end the import into {ref}: the daemon is still copying its image (volume.import.file)")
        job.end_step(1)
        return job.finish(pool.volume_info(r.volume))
    _undo_volumes(Context(st).for_step(job.record.steps[0]), [ref])
    job.undone_step(0)
    why: Exception = Cancelled(f"job {id} was cancelled; {ref} is removed") if error is None else InvalidArgument(error)
    job.fail(1, why)
    raise why
