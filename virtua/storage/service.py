"""The storage service of one process: the pool catalog and the pools it has open.

The catalog ($VIRTUA_HOME/catalog.db, SQLite) maps pool names to directories. A pool is
opened once per process and held (it takes an exclusive lock); `virtua serve` holds every
pool, and CLI commands then reach them through its API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from virtua.errors import AlreadyExists, InvalidArgument, NotFound, ReadOnly
from virtua.jobs.record import JobStore
from virtua.storage.device import BlockDevice
from virtua.storage.holders import Holders
from virtua.storage.home import default_home
from virtua.storage.meta import Tx
from virtua.storage.names import check_name, parse_ref
from virtua.storage.pool import DEFAULT_CHUNK_SIZE, DEFAULT_OVERCOMMIT, Pool
from virtua.storage.volume import SnapshotDevice, VolumeDevice

# The volumes the cluster manager keeps its templates in: POOL/template-NAME.
TEMPLATE_VOLUME_PREFIX = "template-"


class ReadOnlyVolumeDevice(VolumeDevice):
    """A volume that its NBD clients may only read (the NBD server sees `readonly` and
    refuses writes with EPERM before they get here)."""

    @property
    def readonly(self) -> bool:
        return True

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise ReadOnly(f"{self.vol.name} is a template: read-only over NBD")

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        raise ReadOnly(f"{self.vol.name} is a template: read-only over NBD")

    def discard(self, offset: int, length: int) -> None:
        raise ReadOnly(f"{self.vol.name} is a template: read-only over NBD")


class Storage:
    def __init__(self, home: Path | None = None) -> None:
        import sqlite3

        self.home = Path(home) if home else default_home()
        self.home.mkdir(parents=True, exist_ok=True)
        self.catalog = sqlite3.connect(
            str(self.home / "catalog.db"), isolation_level=None, check_same_thread=False, timeout=30
        )
        self.catalog.execute("PRAGMA journal_mode=WAL")
        self.catalog.execute(
            "CREATE TABLE IF NOT EXISTS pools (name TEXT PRIMARY KEY, path TEXT NOT NULL)"
        )
        self.open_pools: dict[str, Pool] = {}
        self.holders = Holders()  # filled by the NBD server(s) serving these pools
        self.jobs = JobStore(self.home / "jobs.db")  # the admin operations' journal

    def close(self) -> None:
        for pool in self.open_pools.values():
            pool.close()
        self.open_pools.clear()
        self.catalog.close()
        self.jobs.close()

    def flush(self) -> None:
        for pool in self.open_pools.values():
            pool.flush()

    # ---------------------------------------------------------------- pools

    def pool_paths(self) -> dict[str, Path]:
        return {n: Path(p) for n, p in self.catalog.execute("SELECT name, path FROM pools ORDER BY name")}

    def pool(self, name: str) -> Pool:
        pool = self.open_pools.get(name)
        if pool is None:
            check_name(name, "pool name")
            row = self.catalog.execute("SELECT path FROM pools WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise NotFound(f"pool {name} does not exist")
            pool = Pool(Path(row[0]))
            self.open_pools[name] = pool
        return pool

    def create_pool(
        self,
        name: str,
        path: str | None = None,
        capacity: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        overcommit: float = DEFAULT_OVERCOMMIT,
    ) -> Pool:
        check_name(name, "pool name")
        if name in self.pool_paths():
            raise AlreadyExists(f"pool {name} already exists")
        where = Path(path).absolute() if path else self.home / "pools" / name
        if where.exists() and any(where.iterdir()) and not (where / "meta.db").exists():
            raise InvalidArgument(f"{where} is not empty; give an empty or new directory")
        pool = Pool.create(where, name, capacity, chunk_size, overcommit)
        with Tx(self.catalog) as db:
            db.execute("INSERT INTO pools (name, path) VALUES (?, ?)", (name, str(where)))
        self.open_pools[name] = pool
        return pool

    def delete_pool(self, name: str, force: bool = False) -> None:
        import shutil

        pool = self.pool(name)
        if pool.volumes and not force:
            from virtua.errors import DependencyError

            raise DependencyError(f"pool {name} has {len(pool.volumes)} volume(s); use --force")
        path = pool.path
        pool.close()
        del self.open_pools[name]
        with Tx(self.catalog) as db:
            db.execute("DELETE FROM pools WHERE name = ?", (name,))
        shutil.rmtree(path, ignore_errors=True)

    # ---------------------------------------------------------------- devices / exports

    def open_device(self, ref: str) -> VolumeDevice | SnapshotDevice:
        r = parse_ref(ref)
        pool = self.pool(r.pool)
        if r.snapshot is not None:
            return SnapshotDevice(pool, pool.snapshot(r.volume, r.snapshot))
        return VolumeDevice(pool, pool.volume(r.volume))

    def open_export(self, name: str) -> BlockDevice | None:
        """The device an NBD client gets: snapshots and template volumes read-only (no
        guest or host writes a template; the VMs' disks are clones of its snapshots)."""
        try:
            dev = self.open_device(name)
        except (NotFound, InvalidArgument):
            return None
        if isinstance(dev, VolumeDevice) and dev.vol.name.startswith(TEMPLATE_VOLUME_PREFIX):
            return ReadOnlyVolumeDevice(dev.pool, dev.vol)
        return dev

    def list_exports(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for pname in self.pool_paths():
            try:
                pool = self.pool(pname)
            except Exception:
                continue
            for v in sorted(pool.volumes.values(), key=lambda v: v.name):
                if v.name.startswith(pool.TRASH_PREFIX):  # trashed: no export
                    continue
                kind = "template (read-only)" if v.name.startswith(TEMPLATE_VOLUME_PREFIX) else "volume"
                out.append((f"{pname}/{v.name}", f"{kind}, {v.size} bytes"))
            for s in sorted(pool.snapshots.values(), key=lambda s: s.id):
                if not pool.volumes[s.volume].name.startswith(pool.TRASH_PREFIX):
                    out.append((pool.snapshot_ref(s), f"snapshot (read-only), {s.size} bytes"))
        return out

    def allowed(self, name: str, identity: str | None) -> bool:
        return True

    def summary(self) -> dict[str, Any]:
        return {"home": str(self.home), "pools": list(self.pool_paths())}
