"""Admin operations as data: a name, JSON arguments, a JSON result.

The CLI runs them in-process when no daemon holds the pools, and through the daemon's
API when `virtua serve` runs; both paths call the same functions here, and `run` checks
the arguments against the operation's signature first (virtua.api.args).

Declaring an operation: `@op("noun.verb")` (or `@cluster_op`) on a function whose first
parameter is the Storage (the Manager) and whose every other parameter has a concrete
type annotation -- str, int, bool, float, `str | int` for sizes (then parse_size), `X |
None = None` for optional ones, Annotated[int, Field(ge=0)] for a range. No Any, no
**kwargs: registration fails at import otherwise. A Manager method listed in
MANAGER_METHODS is checked against the method's own signature.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BaseModel, Field

from virtua.api.args import arguments_model, check_arguments
from virtua.errors import Busy, DependencyError, InvalidArgument
from virtua.jobs import runner
from virtua.jobs.plan import Plan
from virtua.jobs.record import Undo
from virtua.storage.names import parse_ref
from virtua.storage.service import Storage
from virtua.units import human_size, parse_size

Op = Callable[..., Any]
OPS: dict[str, Op] = {}
CLUSTER_OPS: dict[str, Op] = {}  # these need the manager, i.e. `virtua serve`
# every operation's argument model: built at registration, or on first use of a Manager method
_MODELS: dict[Any, type[BaseModel]] = {}
# These read host files that the caller names: they are told whether it is an administrator.
HOST_PATH_OPS = {"template.import"}
# These open a file of this machine by the caller's path, as the daemon (root), or name
# one for the caller to read: they are told whether the caller is on this machine as
# root (the unix socket, or the CLI itself).
LOCAL_FILE_OPS = {"volume.import.file", "volume.export.begin"}


def op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        _MODELS[fn] = arguments_model(fn, name)
        OPS[name] = fn
        return fn

    return register


def cluster_op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        _MODELS[fn] = arguments_model(fn, name)
        CLUSTER_OPS[name] = fn
        return fn

    return register


def operation_names() -> list[str]:
    return sorted([*OPS, *CLUSTER_OPS, *MANAGER_METHODS])


def argument_model(name: str, manager_type: type | None = None) -> type[BaseModel]:
    """The model an operation's arguments are checked against (a Manager method's is
    built from `manager_type`, the Manager class, on first use)."""
    fn = OPS.get(name) or CLUSTER_OPS.get(name)
    if fn is not None:
        return _MODELS[fn]
    method = MANAGER_METHODS.get(name)
    if method is None or manager_type is None:
        raise InvalidArgument(f"unknown operation {name!r}")
    key = (manager_type, method)
    model = _MODELS.get(key)
    if model is None:  # the unbound method: its first parameter is self
        model = _MODELS[key] = arguments_model(getattr(manager_type, method), name)
    return model


def run(
    storage: Storage, name: str, args: dict[str, Any], manager: Any = None, *, caller_is_admin: bool = False,
    caller_is_local: bool = False,
) -> Any:
    """Run an operation; a cluster operation, or a long one in serve (flatten), may return an
    awaitable (the daemon awaits it).
    ``caller_is_admin`` comes from the transport (see virtua.api.daemon.caller_is_admin),
    never from the request's arguments; so does ``caller_is_local`` (the unix socket, or
    the CLI running the operation in-process)."""
    for transport in ("caller_is_admin", "caller_is_local"):
        if transport in args:
            raise InvalidArgument(f"{name}: {transport} is not an argument")
    if name in HOST_PATH_OPS:
        args = {**args, "caller_is_admin": caller_is_admin}
    if name in LOCAL_FILE_OPS:
        args = {**args, "caller_is_local": caller_is_local}
    fn = OPS.get(name)
    if fn is not None:
        return fn(storage, **check_arguments(name, _MODELS[fn], args))
    cfn = CLUSTER_OPS.get(name)
    method = MANAGER_METHODS.get(name)
    if cfn is None and method is None:
        raise InvalidArgument(f"unknown operation {name!r}")
    if manager is None:
        from virtua.errors import Unavailable

        raise Unavailable(
            f"`{name.replace('.', ' ')}` needs the manager: start `virtua serve` first"
        )
    if cfn is not None:
        return cfn(manager, **check_arguments(name, _MODELS[cfn], args))
    model = argument_model(name, type(manager))
    return getattr(manager, method)(**check_arguments(name, model, args))  # type: ignore[arg-type]


DEFAULT_TRASH_KEEP = 7 * 86400.0
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(v: str | int | float) -> float:
    """30s, 15m, 12h, 7d, 2w, or plain seconds."""
    if isinstance(v, int | float):
        seconds = float(v)
    else:
        text = v.strip().lower()
        unit = _DURATION_UNITS.get(text[-1:], None) if text else None
        number = text[:-1] if unit else text
        try:
            seconds = float(number) * (unit or 1)
        except ValueError:
            raise InvalidArgument(f"bad duration {v!r}: expected e.g. 30s, 15m, 12h, 7d, 2w") from None
    if seconds < 0:
        raise InvalidArgument(f"bad duration {v!r}: must not be negative")
    return seconds


def _size(v: str | int | None) -> int | None:
    return None if v is None else parse_size(v)


def _refuse_if_open(st: Storage, exports: list[str], doing: str, force: bool) -> None:
    """Busy while an NBD client (a VM's disk, qemu-io, ...) has one of these exports open."""
    if force:
        return
    held = st.holders.of(exports)
    if held:
        who = "; ".join(h.describe() for h in held[:3])
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise Busy(f"refusing to {doing}: in use by {who}{more}; close it or use --force")


def _serving() -> bool:
    """Whether this runs on `virtua serve`'s event loop (then a long operation returns an
    awaitable that yields to the NBD clients between its slices; the daemon awaits it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _volume_exports(pool: Any, volume: str, snapshots: bool = False) -> list[str]:
    vol = pool.volume(volume)
    out = [f"{pool.name}/{vol.name}"]
    if snapshots:
        out += [pool.snapshot_ref(s) for s in pool.snapshots_of(vol)]
    return out


# ---------------------------------------------------------------------- pools


@op("pool.create")
def pool_create(
    st: Storage,
    name: str,
    path: str | None = None,
    capacity: str | int | None = None,
    chunk_size: str | int | None = None,
    overcommit: float | None = None,
) -> dict[str, Any]:
    import os

    from virtua.storage.pool import DEFAULT_CHUNK_SIZE, DEFAULT_OVERCOMMIT

    if path is not None and os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgument(f"--path {path} is not a directory; give an empty or new directory")
    pool = st.create_pool(
        name,
        path,
        _size(capacity),
        _size(chunk_size) or DEFAULT_CHUNK_SIZE,
        DEFAULT_OVERCOMMIT if overcommit is None else overcommit,
    )
    return _pool_info(pool)


def _pool_info(pool: Any) -> dict[str, Any]:
    """pool.info(), warning when the capacity is more than the filesystem under it can hold:
    accepted (thin), but writes then fail with ENOSPC before the pool looks full."""
    import os

    from virtua.units import human_size

    info: dict[str, Any] = pool.info()
    fs = os.statvfs(pool.path)
    fs_size = fs.f_blocks * fs.f_frsize
    info["filesystem_size"] = fs_size
    if pool.capacity > fs_size:
        warning = (
            f"pool {pool.name}: capacity {human_size(pool.capacity)} is more than its filesystem holds "
            f"({human_size(fs_size)}, {human_size(fs.f_bavail * fs.f_frsize)} free): accepted (thin), "
            "but writes fail with ENOSPC once the filesystem is full"
        )
        info["warning"] = f"{info['warning']}; {warning}" if info.get("warning") else warning
    return info


@op("pool.list")
def pool_list(st: Storage) -> list[dict[str, Any]]:
    return [_pool_info(st.pool(name)) for name in st.pool_paths()]


@op("pool.info")
def pool_info(st: Storage, name: str) -> dict[str, Any]:
    return _pool_info(st.pool(name))


@op("pool.check")
def pool_check(st: Storage, name: str, repair: bool = False) -> dict[str, Any]:
    pool = st.pool(name)
    if _serving():  # the scan in a thread, a repair on the loop
        return pool.check_async(repair=repair)  # type: ignore[return-value]
    return pool.check(repair=repair)


@op("pool.rm")
def pool_rm(st: Storage, name: str, force: bool = False) -> dict[str, Any]:
    st.delete_pool(name, force)
    return {"removed": [name]}


# ---------------------------------------------------------------------- volumes


@op("volume.create")
def volume_create(st: Storage, ref: str, size: str | int) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    pool.create_volume(r.volume, parse_size(size))
    return pool.volume_info(r.volume)


@op("volume.list")
def volume_list(st: Storage, pool: str | None = None) -> list[dict[str, Any]]:
    names = [pool] if pool else list(st.pool_paths())
    out = []
    for pname in names:
        p = st.pool(pname)
        for v in sorted(p.volumes.values(), key=lambda v: v.name):
            if not v.name.startswith(p.TRASH_PREFIX):
                out.append(p.volume_info(v.name))
    return out


@op("volume.info")
def volume_info(st: Storage, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    return st.pool(r.pool).volume_info(r.volume)


@op("volume.resize")
def volume_resize(
    st: Storage, ref: str, size: str | int, force: bool = False, shrink: bool = False
) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    new_size = parse_size(size)
    if new_size < pool.volume(r.volume).size and (shrink or force):
        _refuse_if_open(st, [ref], f"shrink {ref}", force)
    pool.resize_volume(r.volume, new_size, force or shrink)
    return pool.volume_info(r.volume)


@op("volume.rm")
def volume_rm(
    st: Storage, ref: str, recursive: bool = False, force: bool = False, now: bool = True,
    keep: str | int | float | None = None,
) -> dict[str, Any]:
    """Delete a volume, or (now=False) move it to the pool's trash for `keep` (default 7 days)."""
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    vol = pool.volume(r.volume)
    snaps = pool.snapshots_of(vol)
    exports = _volume_exports(pool, r.volume, snapshots=True)
    if recursive:
        exports += [f"{pool.name}/{c.name}" for s in snaps for c in pool.clones_of(s)]
    _refuse_if_open(st, exports, f"remove {ref}", force)
    protected = [pool.snapshot_ref(s) for s in snaps if pool.is_protected(s)]
    if protected:
        raise DependencyError(f"volume {ref} has protected snapshot(s) {', '.join(protected)}; unprotect them first")
    pool.purge_trash()
    if now:
        return {"removed": pool.delete_volume(r.volume, recursive)}
    if snaps and not recursive:
        pool.delete_volume(r.volume, recursive=False)  # raises the usual DependencyError
    held = sum(row["used"] for row in pool.du(r.volume))
    entry = pool.trash_volume(r.volume, parse_duration(keep) if keep is not None else DEFAULT_TRASH_KEEP)
    until = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry["expires"]))
    # like `rbd trash mv`: restorable, so nothing is freed yet; say so (on a full pool
    # a user removes a volume to get space back)
    return {"trashed": [ref], "expires": entry["expires"], "held": held,
            "warning": f"{ref} is in the trash until {until} (`virtua trash restore`): its "
                       f"{human_size(held)} stay allocated; `virtua trash purge {pool.name} --all` "
                       "or `volume rm --now` frees them"}


@op("volume.reset")
def volume_reset(st: Storage, ref: str, force: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    _refuse_if_open(st, _volume_exports(pool, r.volume), f"reset {ref}", force)
    pool.reset(r.volume)
    return pool.volume_info(r.volume)


@op("volume.rename")
def volume_rename(st: Storage, ref: str, new: str, force: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    n = _new_name(new, r.pool, ref)
    pool = st.pool(r.pool)
    _refuse_if_open(st, _volume_exports(pool, r.volume, snapshots=True), f"rename {ref}", force)
    pool.rename_volume(r.volume, n)
    return pool.volume_info(n)


def _new_name(new: str, pool: str, ref: str) -> str:
    """NEW or POOL/NEW (same pool) for renames and copies."""
    if "/" not in new:
        return new
    n = parse_ref(new, snapshot=False)
    if n.pool != pool:
        raise InvalidArgument(f"{new} is in pool {n.pool}, {ref} in pool {pool}: same pool only")
    return n.volume


@op("volume.copy")
def volume_copy(st: Storage, source: str, new: str) -> dict[str, Any]:
    s = parse_ref(source)
    n = _new_name(new, s.pool, source)
    pool = st.pool(s.pool)
    _, copied = pool.copy_volume(s.volume, s.snapshot, n)
    info = pool.volume_info(n)
    info["copied"] = copied
    return info


@op("volume.du")
def volume_du(st: Storage, ref: str) -> list[dict[str, Any]]:
    r = parse_ref(ref, snapshot=False)
    return st.pool(r.pool).du(r.volume)


@op("volume.diff")
def volume_diff(st: Storage, ref: str, since: str | None = None) -> dict[str, Any]:
    """What changed in POOL/VOLUME@SNAP (or the head) since snapshot `since`: runs of
    [offset, length, data?] for export-diff, which reads the data over NBD."""
    r = parse_ref(ref)
    pool = st.pool(r.pool)
    size, runs = pool.diff(r.volume, r.snapshot, since)
    return {"name": str(r), "size": size, "runs": [[o, n, d] for o, n, d in runs]}


@op("trash.list")
def trash_list(st: Storage, pool: str | None = None) -> list[dict[str, Any]]:
    out = []
    for pname in [pool] if pool else list(st.pool_paths()):
        p = st.pool(pname)
        p.purge_trash()
        out += [{**e, "name": f"{pname}/{e['name']}"} for e in p.trash()]
    return out


@op("trash.restore")
def trash_restore(st: Storage, ref: str, name: str | None = None) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    vol = pool.restore_volume(r.volume, _new_name(name, r.pool, ref) if name else None)
    return pool.volume_info(vol.name)


@op("trash.purge")
def trash_purge(st: Storage, pool: str, all: bool = False) -> dict[str, Any]:
    return {"removed": st.pool(pool).purge_trash(everything=all)}


@op("snapshot.rename")
def snapshot_rename(st: Storage, ref: str, new: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    pool = st.pool(r.pool)
    new_name = new.rpartition("@")[2]
    _refuse_if_open(st, [ref], f"rename {ref}", False)
    return pool.snapshot_info(pool.rename_snapshot(r.volume, r.snapshot, new_name))


@op("snapshot.protect")
def snapshot_protect(st: Storage, ref: str, on: bool = True) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    pool = st.pool(r.pool)
    return pool.snapshot_info(pool.protect(r.volume, r.snapshot, on))


@op("volume.status")
def volume_status(st: Storage, ref: str) -> dict[str, Any]:
    """The open connections of a volume and its snapshots (like rbd status)."""
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    pool.volume(r.volume)
    held = st.holders.of_volume(f"{pool.name}/{r.volume}")
    return {"name": f"{pool.name}/{r.volume}", "connections": [h.to_dict() for h in held]}


@op("volume.rebase")
def volume_rebase(st: Storage, ref: str, target: str, force: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    t = parse_ref(target, snapshot=True)
    if t.pool != r.pool:
        raise InvalidArgument(f"{target} is in pool {t.pool}, {ref} in pool {r.pool}: same pool only")
    pool = st.pool(r.pool)
    assert t.snapshot is not None
    _refuse_if_open(st, _volume_exports(pool, r.volume), f"rebase {ref}", force)
    pool.rebase(r.volume, t.volume, t.snapshot)
    return pool.volume_info(r.volume)


@op("volume.flatten")
def volume_flatten(st: Storage, ref: str, force: bool = False, wait: bool = True) -> dict[str, Any]:
    """A job of one step, its progress in bytes of the origin's data. Nothing to undo: at
    whatever point it stops (cancel, crash) the volume reads the same, partly detached.
    In serve, wait=False returns the job at once (`virtua job show`) and runs it there."""
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    _refuse_if_open(st, _volume_exports(pool, r.volume), f"flatten {ref}", force)
    pool.check_idle([pool.volume(r.volume)], f"flatten {ref}")
    serving = _serving()
    copied = [0]
    plan = Plan(f"flatten {ref}")

    def flatten() -> Any:
        def progress(done: int, total: int) -> None:
            job.progress(done, total)

        if not serving:
            copied[0] = pool.flatten(r.volume, progress)
            return None

        async def go() -> None:  # in slices, the copies in a thread: the guests' disks keep their loop
            copied[0] = await pool.flatten_async(r.volume, progress)

        return go()

    plan.add(f"copy what {ref} reads from its origin into it", flatten)
    job = runner.start(st.jobs, "volume.flatten", {"ref": str(r)}, plan, unit="bytes")

    def done() -> dict[str, Any]:
        info: dict[str, Any] = pool.volume_info(r.volume)
        info["copied"] = copied[0]
        info["job"] = job.id
        return job.finish(info)  # type: ignore[no-any-return]

    if not serving:
        plan.run_sync(job)
        return done()

    async def run() -> dict[str, Any]:
        await plan.run(job)
        return done()

    if wait:
        return run()  # type: ignore[return-value]
    _in_background(run())
    return {"job": job.id, "name": str(r), "state": "running"}


_BACKGROUND: set[asyncio.Task[Any]] = set()  # jobs that run on after their request (wait=False)


def _in_background(work: Any) -> None:
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_ended)


def _ended(task: asyncio.Task[Any]) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: its error is in its job record


@op("clone")
def clone(st: Storage, source: str, new: str, count: int = 1, dry_run: bool = False) -> Any:
    """A job: the implicit snapshot (when source names none), then the clones in one
    transaction; a crash between them undoes the snapshot (virtua.jobs.recovery)."""
    s = parse_ref(source)
    n = parse_ref(new, snapshot=False)
    if n.pool != s.pool:
        raise InvalidArgument(f"{new} is in pool {n.pool}, {source} in pool {s.pool}: same pool only")
    pool = st.pool(s.pool)
    names = pool.check_clone(s.volume, s.snapshot, n.volume, count)  # touches nothing
    snap_name = s.snapshot or f"clone-{n.volume}"
    snap_ref = f"{s.pool}/{s.volume}@{snap_name}"
    refs = [f"{s.pool}/{v}" for v in names]
    plan = Plan(f"clone {snap_ref} -> {new}" + (f" x{count}" if count > 1 else ""))
    if s.snapshot is None:
        plan.add(f"snapshot {snap_ref}", lambda: pool.create_snapshot(s.volume, snap_name),
                 lambda: pool.delete_snapshot(s.volume, snap_name), Undo(kind="snapshot.rm", args={"ref": snap_ref}))
    made: list[Any] = []
    plan.add(f"create {len(names)} clone(s) of {snap_ref}",
             lambda: made.extend(pool.clone(s.volume, snap_name, n.volume, count)),
             record=Undo(kind="volumes.rm", args={"refs": refs}))
    if dry_run:
        return {"plan": plan.describe(), "origin": snap_ref, "clones": refs}
    def start() -> runner.Job:
        return runner.start(st.jobs, "clone", {"source": source, "new": new, "count": count}, plan,
                            total=len(plan.steps))

    result = {"origin": snap_ref, "clones": refs}
    if not _serving():
        job = start()
        plan.run_sync(job)
        return job.finish({**result, "job": job.id})

    async def go() -> dict[str, Any]:  # the journal's fsyncs in a thread (see Plan.run)
        loop = asyncio.get_running_loop()
        job = await loop.run_in_executor(None, start)
        await plan.run(job)
        return await loop.run_in_executor(None, job.finish, {**result, "job": job.id})

    return go()


# ---------------------------------------------------------------------- snapshots


@op("snapshot.create")
def snapshot_create(st: Storage, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    pool = st.pool(r.pool)
    return pool.snapshot_info(pool.create_snapshot(r.volume, r.snapshot))


@op("snapshot.list")
def snapshot_list(st: Storage, ref: str) -> list[dict[str, Any]]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    return [pool.snapshot_info(s) for s in pool.snapshots_of(pool.volume(r.volume))]


@op("snapshot.rm")
def snapshot_rm(st: Storage, ref: str, recursive: bool = False, force: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    pool = st.pool(r.pool)
    snap = pool.snapshot(r.volume, r.snapshot)
    exports = [ref] + ([f"{pool.name}/{c.name}" for c in pool.clones_of(snap)] if recursive else [])
    _refuse_if_open(st, exports, f"remove {ref}", force)
    if pool.is_protected(snap):
        raise DependencyError(f"snapshot {ref} is protected; `virtua snapshot unprotect {ref}` first")
    clones = pool.clones_of(snap) if recursive else []
    if len(clones) > 1 and _serving():  # one clone at a time, the guests' requests in between

        async def go() -> dict[str, Any]:
            pool.check_idle([t for c in clones for t in pool.tree(c)], f"remove {ref}")
            removed: list[str] = []
            for c in clones:
                if not c.deleted:
                    removed += pool.delete_volume(c.name, recursive=True)
                await asyncio.sleep(0)
            # and the snapshot, with any clone made meanwhile
            removed += pool.delete_snapshot(pool.volumes[snap.volume].name, snap.name, recursive=True)
            return {"removed": removed}

        return go()  # type: ignore[return-value]
    return {"removed": pool.delete_snapshot(r.volume, r.snapshot, recursive)}


@op("snapshot.rollback")
def snapshot_rollback(st: Storage, ref: str, force: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    pool = st.pool(r.pool)
    _refuse_if_open(st, _volume_exports(pool, r.volume), f"roll {r.pool}/{r.volume} back", force)
    pool.rollback(r.volume, r.snapshot)
    return pool.volume_info(r.volume)


# ---------------------------------------------------------------------- cluster (manager)

# Each of these cluster operations is the Manager method of that name, same arguments.
MANAGER_METHODS: dict[str, str] = {
    "host.list": "host_list", "host.add": "add_host", "host.remove": "remove_host",
    "host.drain": "drain_host", "host.undrain": "undrain_host", "template.build": "template_build",
    "template.import": "template_import", "template.list": "template_list",
    "template.info": "template_info", "template.rm": "template_rm", "vc.create": "vc_create",
    "vc.start": "vc_start", "vc.stop": "vc_stop", "vc.suspend": "vc_suspend",
    "vc.resume": "vc_resume", "vc.destroy": "vc_destroy", "vc.remap": "vc_remap",
    "vc.reset": "vc_reset", "vc.update": "vc_update", "vc.list": "vc_list", "vc.info": "vc_info",
    "vm.exec": "vm_exec", "net.list": "net_list", "host.join-token": "join_token",
}


@cluster_op("host.info")
def host_info(m: Any, name: str) -> Any:
    async def go() -> Any:
        info = m.host_info(name)
        try:
            info["leftovers"] = await m.host_leftovers(name)
        except Exception as e:  # an offline host still has a record to show
            info["leftovers"] = {"error": str(e)}
        return info

    return go()


@cluster_op("vm.console")
def vm_console(m: Any, ref: str, offset: Annotated[int, Field(ge=0)] = 0) -> Any:
    return m.vm_console_text(ref, offset)


from virtua.api import job_ops as _job_ops  # noqa: E402,F401 - registers the job operations
