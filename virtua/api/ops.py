"""Admin operations as data: a name, JSON arguments, a JSON result.

The CLI runs them in-process when no daemon holds the pools, and through the daemon's
API when `virtua serve` runs; both paths call the same functions here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from virtua.errors import InvalidArgument
from virtua.storage.names import parse_ref
from virtua.storage.service import Storage
from virtua.units import parse_size

Op = Callable[..., Any]
OPS: dict[str, Op] = {}
CLUSTER_OPS: dict[str, Op] = {}  # these need the manager, i.e. `virtua serve`


def op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        OPS[name] = fn
        return fn

    return register


def cluster_op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        CLUSTER_OPS[name] = fn
        return fn

    return register


def run(storage: Storage, name: str, args: dict[str, Any], manager: Any = None) -> Any:
    """Run an operation; a cluster operation may return an awaitable (the daemon awaits it)."""
    fn = OPS.get(name)
    if fn is not None:
        return fn(storage, **args)
    cfn = CLUSTER_OPS.get(name)
    if cfn is None:
        raise InvalidArgument(f"unknown operation {name!r}")
    if manager is None:
        from virtua.errors import Unavailable

        raise Unavailable(
            f"`{name.replace('.', ' ')}` needs the manager: start `virtua serve` first"
        )
    return cfn(manager, **args)


def _size(v: str | int | None) -> int | None:
    return None if v is None else parse_size(v)


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
    from virtua.storage.pool import DEFAULT_CHUNK_SIZE, DEFAULT_OVERCOMMIT

    pool = st.create_pool(
        name,
        path,
        _size(capacity),
        _size(chunk_size) or DEFAULT_CHUNK_SIZE,
        DEFAULT_OVERCOMMIT if overcommit is None else overcommit,
    )
    return pool.info()


@op("pool.list")
def pool_list(st: Storage) -> list[dict[str, Any]]:
    return [st.pool(name).info() for name in st.pool_paths()]


@op("pool.info")
def pool_info(st: Storage, name: str) -> dict[str, Any]:
    return st.pool(name).info()


@op("pool.check")
def pool_check(st: Storage, name: str) -> dict[str, Any]:
    return st.pool(name).check()


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
            out.append(p.volume_info(v.name))
    return out


@op("volume.info")
def volume_info(st: Storage, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    return st.pool(r.pool).volume_info(r.volume)


@op("volume.resize")
def volume_resize(st: Storage, ref: str, size: str | int, force: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    pool.resize_volume(r.volume, parse_size(size), force)
    return pool.volume_info(r.volume)


@op("volume.rm")
def volume_rm(st: Storage, ref: str, recursive: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    return {"removed": st.pool(r.pool).delete_volume(r.volume, recursive)}


@op("volume.reset")
def volume_reset(st: Storage, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    pool.reset(r.volume)
    return pool.volume_info(r.volume)


@op("volume.rebase")
def volume_rebase(st: Storage, ref: str, target: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    t = parse_ref(target, snapshot=True)
    if t.pool != r.pool:
        raise InvalidArgument(f"{target} is in pool {t.pool}, {ref} in pool {r.pool}: same pool only")
    pool = st.pool(r.pool)
    assert t.snapshot is not None
    pool.rebase(r.volume, t.volume, t.snapshot)
    return pool.volume_info(r.volume)


@op("volume.flatten")
def volume_flatten(st: Storage, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=False)
    pool = st.pool(r.pool)
    copied = pool.flatten(r.volume)
    info = pool.volume_info(r.volume)
    info["copied"] = copied
    return info


@op("clone")
def clone(st: Storage, source: str, new: str, count: int = 1) -> dict[str, Any]:
    s = parse_ref(source)
    n = parse_ref(new, snapshot=False)
    if n.pool != s.pool:
        raise InvalidArgument(f"{new} is in pool {n.pool}, {source} in pool {s.pool}: same pool only")
    pool = st.pool(s.pool)
    made = pool.clone(s.volume, s.snapshot, n.volume, count)
    origin = pool.snapshot_ref(pool.snapshots[made[0].origin]) if made[0].origin else None
    return {"origin": origin, "clones": [f"{s.pool}/{v.name}" for v in made]}


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
def snapshot_rm(st: Storage, ref: str, recursive: bool = False) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    return {"removed": st.pool(r.pool).delete_snapshot(r.volume, r.snapshot, recursive)}


@op("snapshot.rollback")
def snapshot_rollback(st: Storage, ref: str) -> dict[str, Any]:
    r = parse_ref(ref, snapshot=True)
    assert r.snapshot is not None
    pool = st.pool(r.pool)
    pool.rollback(r.volume, r.snapshot)
    return pool.volume_info(r.volume)


# ---------------------------------------------------------------------- cluster (manager)

# Each cluster operation is a Manager method taking the same keyword arguments.
for _name, _method in {
    "host.list": "host_list", "host.add": "add_host", "host.remove": "remove_host",
    "host.drain": "drain_host", "host.undrain": "undrain_host", "template.build": "template_build",
    "template.import": "template_import", "template.list": "template_list",
    "template.info": "template_info", "template.rm": "template_rm", "vc.create": "vc_create",
    "vc.start": "vc_start", "vc.stop": "vc_stop", "vc.suspend": "vc_suspend",
    "vc.resume": "vc_resume", "vc.destroy": "vc_destroy", "vc.remap": "vc_remap",
    "vc.reset": "vc_reset", "vc.update": "vc_update", "vc.list": "vc_list", "vc.info": "vc_info",
    "vm.exec": "vm_exec", "net.list": "net_list", "host.join-token": "join_token",
}.items():
    CLUSTER_OPS[_name] = lambda m, _method=_method, **args: getattr(m, _method)(**args)


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
def vm_console(m: Any, ref: str, offset: int = 0) -> Any:
    return m.vm_console_text(ref, offset)
