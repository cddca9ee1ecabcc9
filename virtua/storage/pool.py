"""A storage pool: one data file of fixed-size chunks, metadata in SQLite.

Invariants (docs/storage.md explains them):
- Every physical chunk is owned by at most one layer (``owner[phys]``), or is free.
- A committed extent row never points at data that is not durable: flush() runs
  fdatasync on the data file before it commits the rows written since the last flush.
- A chunk freed since the last commit is not reused until that commit is durable, and a
  free chunk is hole-punched, so a newly allocated chunk always reads as zeros. On open,
  the data file is cut at the committed high-water mark and free chunks are wiped again:
  no write a crash left uncommitted can reach another volume.
- A frozen layer (one a snapshot refers to, or one with children) is never written.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import sqlite3
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtua.errors import (
    AlreadyExists,
    Busy,
    DependencyError,
    InvalidArgument,
    NoSpace,
    NotFound,
)
from virtua.storage.blockmap import HOLE_V, ZERO_V, BlockMap
from virtua.storage.device import FileMap
from virtua.storage.fallocate import punch_hole, start_writeback
from virtua.storage.inflight import InflightWrites
from virtua.storage.meta import SCHEMA_VERSION, MetaDB, Tx, connect
from virtua.storage.names import check_name
from virtua.storage.reserve import SpaceGuard, release_if_full, reserve_size
from virtua.units import SECTOR

DEFAULT_CHUNK_SIZE = 64 * 1024
Progress = Callable[[int, int], None]  # (done, total): bytes of a long operation
DEFAULT_OVERCOMMIT = 20.0
# Commit metadata by itself once this many chunk mappings are pending, so memory stays
# bounded for a writer that never flushes.
AUTO_COMMIT_ROWS = 65536
# Start the kernel's writeback every this many bytes written (RocksDB's bytes_per_sync,
# PostgreSQL's backend_flush_after): a FLUSH then finds little dirty data, and its
# fdatasync no longer competes with every client for the disk and the CPU at once.
# VIRTUA_WRITEBACK_MIB overrides it (0: never; benchmarks compare the two in one run).
WRITEBACK_AFTER = (int(os.environ.get("VIRTUA_WRITEBACK_MIB", "8")) << 20) or (1 << 62)
_DELETE = None  # pending-row marker: remove the row
# A flatten copies this much between two looks at the loop (FlattenJob.slices).
FLATTEN_SLICE = 4 << 20
# Beside a loop, wipe at least this many freed chunks in a thread (_wipe_unwiped).
WIPE_IN_THREAD = 256


@dataclass
class Layer:
    id: int
    parent: int | None
    volume: int


@dataclass
class Snapshot:
    id: int
    volume: int
    name: str
    layer: int
    size: int
    created: float


@dataclass
class Volume:
    id: int
    name: str
    size: int
    layer: int
    origin: int | None
    created: float
    # In-memory I/O state, built on first use.
    map: BlockMap | None = field(default=None, repr=False)
    parent_map: BlockMap | None = field(default=None, repr=False)
    deleted: bool = False


class Pool:
    """An open pool. One process at a time holds it (an exclusive flock)."""

    def __init__(self, path: Path, wait: float = 10.0) -> None:
        self.path = Path(path)
        if not (self.path / "meta.db").exists():
            raise NotFound(f"no pool at {self.path}")
        self._lock_fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
                    os.close(self._lock_fd)
                    raise Busy(
                        f"pool at {self.path} is in use by process {holder or '?'}; "
                        "run the command through `virtua serve` or stop that process"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(self._lock_fd, 0)
        with contextlib.suppress(OSError):  # who holds it, for the Busy message; a full disk may refuse
            os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        release_if_full(self.path)
        self.db = connect(self.path / "meta.db")
        settings = dict(self.db.execute("SELECT key, value FROM settings").fetchall())
        if int(settings.get("version", "0")) != SCHEMA_VERSION:
            raise InvalidArgument(f"pool at {self.path}: unsupported format {settings.get('version')}")
        self.name: str = settings["name"]
        self.chunk_size = int(settings["chunk_size"])
        self.chunk_shift = self.chunk_size.bit_length() - 1
        self.chunk_mask = self.chunk_size - 1
        self.capacity = int(settings["capacity"])
        self.capacity_chunks = self.capacity >> self.chunk_shift
        self.overcommit = float(settings["overcommit"])
        self.created = float(settings.get("created", "0"))
        self.space = SpaceGuard(self.path, reserve_size(self.capacity))
        self.db.guard = self.space
        self.db.label = f"pool {self.name}"
        self.db.before_write = self._before_metadata_write
        # flush_async: the commit in flight, the flush waiting for the next one, a second
        # connection the worker thread commits on (never both at once: _wait_flush_job)
        self._job: _FlushJob | None = None
        self._wipe_job: _WipeJob | None = None  # freed chunks being wiped in a thread
        self._next_flush: asyncio.Future[None] | None = None
        self._commit_db: MetaDB | None = None
        self._flush_tasks: set[asyncio.Task[None]] = set()
        # set by every data write: a flush with nothing to sync or commit returns at once
        self.data_dirty = False
        self.unsynced = 0  # bytes written since writeback was last started
        self.inflight = InflightWrites()  # writes a worker thread is putting in the data file
        self._writeback: asyncio.Future[None] | None = None
        self.data_fd = os.open(self.path / "data", os.O_RDWR | os.O_CREAT, 0o644)
        self.data_map = FileMap(self.data_fd)
        self.zeros = bytes(self.chunk_size)
        self.closed = False
        self._closing = False  # close(): no more work handed to threads
        # volume id -> the flatten at work on it (FlattenJob): its layers stay put meanwhile
        self.busy: dict[int, FlattenJob | Pin] = {}
        self._load()

    # ------------------------------------------------------------------ creation / open

    @classmethod
    def create(
        cls,
        path: Path,
        name: str,
        capacity: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        overcommit: float = DEFAULT_OVERCOMMIT,
    ) -> Pool:
        check_name(name, "pool name")
        if chunk_size < 4096 or chunk_size > 16 << 20 or chunk_size & (chunk_size - 1):
            raise InvalidArgument(
                f"bad chunk size {chunk_size}: must be a power of two from 4K to 16M"
            )
        if overcommit < 1.0:
            raise InvalidArgument(f"bad overcommit ratio {overcommit}: must be >= 1.0")
        path = Path(path)
        if (path / "meta.db").exists():
            raise AlreadyExists(f"a pool already exists at {path}")
        path.mkdir(parents=True, exist_ok=True)
        if capacity is None:
            st = os.statvfs(path)
            capacity = st.f_bavail * st.f_frsize
        capacity -= capacity % chunk_size
        if capacity < 2 * chunk_size:
            raise InvalidArgument(f"capacity too small: need at least {2 * chunk_size} bytes")
        db = connect(path / "meta.db")
        with Tx(db):
            db.executemany(
                "INSERT INTO settings (key, value) VALUES (?, ?)",
                [
                    ("version", str(SCHEMA_VERSION)),
                    ("name", name),
                    ("chunk_size", str(chunk_size)),
                    ("capacity", str(capacity)),
                    ("overcommit", str(overcommit)),
                    ("created", str(time.time())),
                ],
            )
        db.close()
        return cls(path)

    def _load(self) -> None:
        db = self.db
        self.layers: dict[int, Layer] = {
            r[0]: Layer(r[0], r[1], r[2]) for r in db.execute("SELECT id, parent, volume FROM layers")
        }
        self.volumes: dict[int, Volume] = {
            r[0]: Volume(*r)
            for r in db.execute("SELECT id, name, size, layer, origin, created FROM volumes")
        }
        self.volumes_by_name: dict[str, Volume] = {v.name: v for v in self.volumes.values()}
        self.snapshots: dict[int, Snapshot] = {
            r[0]: Snapshot(*r)
            for r in db.execute("SELECT id, volume, name, layer, size, created FROM snapshots")
        }
        # owner[phys] = layer id; 0 = free. Grows with the high-water mark, never with
        # the capacity, so a big empty pool costs nothing.
        self.owner = array("i")
        hwm = 1  # chunk 0 is never used
        rows = db.execute("SELECT phys, layer FROM extents WHERE phys > 0").fetchall()
        if rows:
            hwm = max(p for p, _ in rows) + 1
        self.owner = array("i", bytes(4 * hwm))
        for p, lid in rows:
            self.owner[p] = lid
        self.hwm = hwm
        self.free: list[int] = []
        # used = owned + freed-not-yet-committed + freed-not-yet-wiped chunks
        self.used = hwm - 1
        self._pending: dict[tuple[int, int], int | None] = {}
        self._pending_free: list[int] = []
        # freed and committed, but not yet wiped (a punch or zero-write failed): never reused
        self._unwiped: list[int] = []
        self.frozen: dict[int, BlockMap] = {}
        # Every chunk no committed row names may hold data nobody may read: writes whose
        # rows a crash lost (above the high-water mark: drop them, space included) and a
        # crash between a commit and its hole punch (free chunks below it: wipe them).
        if os.fstat(self.data_fd).st_size > hwm << self.chunk_shift:
            os.ftruncate(self.data_fd, hwm << self.chunk_shift)
        self._unwiped = [p for p in range(hwm - 1, 0, -1) if self.owner[p] == 0]
        self._wipe_unwiped()
        # A removal commits its rows, then frees its layers in further transactions; a
        # crash in between leaves layers nothing names. Finish the removal now.
        named = {v.layer for v in self.volumes.values()} | {s.layer for s in self.snapshots.values()}
        for lid in [lid for lid in self.layers if lid not in named]:
            self._collect(lid)

    def close(self) -> None:
        if self.closed:
            return
        self._closing = True
        for job in list(self.busy.values()):  # a flatten's copy in a thread: let it end
            job.stopped = True
            job.idle.wait()
        self._wait_wipe_job()
        self.flush()
        self.closed = True
        self.db.close()
        if self._commit_db is not None:
            self._commit_db.close()
        self.data_map.close()
        os.close(self.data_fd)
        os.close(self._lock_fd)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ chunk allocator

    @property
    def free_chunks(self) -> int:
        return self.capacity_chunks - self.used

    def reserve(self, n: int) -> None:
        """Raise NoSpace unless n chunks can be allocated now."""
        if self._wipe_job is not None and (
            n > self.capacity_chunks - self.used or not self.space.data_room(n << self.chunk_shift)
        ):
            self._wait_wipe_job()  # the chunks (and file space) a removal gives back
        if n > self.capacity_chunks - self.used:
            if self._pending_free and n <= self.capacity_chunks - self.used + len(self._pending_free):
                self.flush()  # freed chunks become reusable once their commit is durable
            if n > self.capacity_chunks - self.used:
                raise NoSpace(
                    f"pool {self.name} is full: need {n} chunk(s) of {self.chunk_size} bytes, "
                    f"{self.capacity_chunks - self.used} free"
                )
        if not self.space.data_room(n << self.chunk_shift):
            raise NoSpace(
                f"pool {self.name} is full: the file system under {self.path} has "
                f"{self.space.free_bytes()} bytes free, and keeps {self.space.size} for metadata"
            )

    def alloc(self, layer: int) -> int:
        """One zeroed chunk for layer; call reserve() first."""
        if self.free:
            p = self.free.pop()
        else:
            p = self.hwm
            self.hwm += 1
            self.owner.append(0)
        self.owner[p] = layer
        self.used += 1
        return p

    def release(self, phys: Iterable[int]) -> None:
        """Give chunks back; they become reusable after the next commit."""
        for p in phys:
            self.owner[p] = 0
            self._pending_free.append(p)

    def _wipe(self, chunks: list[int]) -> list[int]:
        """Make chunks read as zeros (punch, else write zeros); returns those it could not."""
        if not chunks:
            return []
        sh = self.chunk_shift
        failed: list[int] = []
        for start, count in _runs(sorted(chunks)):
            try:
                if not punch_hole(self.data_fd, start << sh, count << sh):
                    _pwrite_zeros(self.data_fd, start << sh, count << sh)
            except OSError:  # EIO, or ENOSPC writing zeros: retried at the next recycle
                failed.extend(range(start, start + count))
        return failed

    def _wipe_unwiped(self) -> None:
        """Wipe chunks waiting for it; the wiped ones join the free list. Many of them
        beside a server's loop: in a worker thread (a hole punched in a gigabyte takes
        a third of a second), one such job at a time; they are reused once it is done."""
        todo, self._unwiped = self._unwiped, []
        if len(todo) >= WIPE_IN_THREAD and self._wipe_job is None and not self._closing:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._start_wipe_job(loop, todo)
                return
        self._wiped(todo, self._wipe(todo))

    def _wiped(self, todo: list[int], failed: list[int]) -> None:
        self._unwiped.extend(failed)
        bad = set(failed)
        clean = [p for p in todo if p not in bad] if bad else todo
        self.free.extend(sorted(clean, reverse=True))
        self.used -= len(clean)

    def _start_wipe_job(self, loop: asyncio.AbstractEventLoop, todo: list[int]) -> None:
        job = _WipeJob(todo)
        self._wipe_job = job

        # submitted now, not from the task: a wait on this thread before the task first
        # runs (_wait_wipe_job from reserve or close) would otherwise wait forever
        work = loop.run_in_executor(None, self._run_wipe_job, job)

        async def drive() -> None:
            await work
            self._end_wipe_job(job)

        task = loop.create_task(drive())
        self._flush_tasks.add(task)
        task.add_done_callback(self._flush_tasks.discard)

    def _run_wipe_job(self, job: _WipeJob) -> None:
        """In a worker thread: punches holes in chunks nobody owns, nothing else."""
        try:
            job.failed = self._wipe(job.chunks)
        except BaseException:  # noqa: BLE001 - they wait for the next recycle
            job.failed = list(job.chunks)
        finally:
            job.done.set()

    def _end_wipe_job(self, job: _WipeJob) -> None:
        """On the pool's thread, once: the wiped chunks join the free list."""
        if job.ended:
            return
        job.ended = True
        if self._wipe_job is job:
            self._wipe_job = None
        self._wiped(job.chunks, job.failed)

    def _wait_wipe_job(self) -> None:
        job = self._wipe_job
        if job is not None:
            job.done.wait()
            self._end_wipe_job(job)

    @property
    def _wiping(self) -> list[int]:
        return self._wipe_job.chunks if self._wipe_job is not None else []

    def set_row(self, layer: int, chunk: int, phys: int | None) -> None:
        """Record a mapping change to commit at the next flush (None deletes the row)."""
        self._pending[(layer, chunk)] = phys
        if len(self._pending) >= AUTO_COMMIT_ROWS:
            self._auto_commit()

    def start_writeback(self) -> None:
        """Ask the kernel to write the data file back (in a thread: it may wait for the
        device queue), one request at a time; without a loop, nothing (the next flush)."""
        if self._writeback is not None and not self._writeback.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.unsynced = 0
        self._writeback = loop.run_in_executor(None, start_writeback, self.data_fd)

    def _auto_commit(self) -> None:
        """Many rows and no FLUSH yet: commit them. Beside a server's loop, in the flush
        thread like a FLUSH (an inline fdatasync of gigabytes would stall every client);
        only a backlog far past the mark, the disk not keeping up, waits inline."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # admin tools and tests: no one else to stall
            self.flush()
            return
        if self._job is None:
            self._start_flush_job(loop, loop.create_future())
        elif len(self._pending) >= 4 * AUTO_COMMIT_ROWS:
            self.flush()

    # ------------------------------------------------------------------ durability

    def flush(self) -> None:
        """Data first, then the metadata that points at it, then recycle freed chunks."""
        self.inflight.wait()  # their rows first; and no admin operation beside them
        if not (self.data_dirty or self._pending or self._pending_free or self._job):
            return  # nothing written since the last flush (a removal of 200 clones flushes 200 times)
        self._wait_flush_job()
        self.data_dirty = False
        try:
            os.fdatasync(self.data_fd)
        except BaseException:
            self.data_dirty = True
            raise
        if not self._pending and not self._pending_free:
            return
        pending, self._pending = self._pending, {}
        try:
            _commit_rows(self.db, pending)
        except BaseException:
            pending.update(self._pending)
            self._pending = pending
            raise
        self._recycle()

    async def flush_async(self) -> None:
        """flush(), with the fdatasync and the commit in a thread: the event loop keeps
        serving every other request meanwhile. Everything written before the call is
        durable, and its rows committed, when it returns. Flushes that arrive while a
        commit is in flight share the next one: one commit at a time, and the rows of
        the one in flight stay visible to readers (_apply_rows) until it is done."""
        loop = asyncio.get_running_loop()
        if self._job is None:
            if not (self.data_dirty or self._pending or self._pending_free):
                return  # nothing written since the last flush (guests flush often)
            fut: asyncio.Future[None] = loop.create_future()
            self._start_flush_job(loop, fut)
        else:  # that commit may miss what was written since it began
            if self._next_flush is None:
                self._next_flush = loop.create_future()
            fut = self._next_flush
        await asyncio.shield(fut)

    def _start_flush_job(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved by someone
        if self._commit_db is None:
            self._commit_db = connect(self.path / "meta.db")
            self._commit_db.guard = self.space
            self._commit_db.label = f"pool {self.name}"
        self.space.before_metadata_write()
        self.data_dirty = False  # a write from now on needs the next fdatasync
        job = _FlushJob(self._pending, self._pending_free)
        self._pending, self._pending_free = {}, []
        self._job = job
        # submitted now, not from the task: a synchronous flush on this thread before the
        # task first runs (a FUA write whose row started this commit) waits for it
        work = loop.run_in_executor(None, self._run_flush_job, job)
        task = loop.create_task(self._drive_flush(loop, job, fut, work))
        self._flush_tasks.add(task)
        task.add_done_callback(self._flush_tasks.discard)

    async def _drive_flush(self, loop: asyncio.AbstractEventLoop, job: _FlushJob, fut: asyncio.Future[None],
                           work: asyncio.Future[None]) -> None:
        await work
        self._end_flush_job(job)
        if not fut.done():
            if job.error is not None:
                fut.set_exception(job.error)
            else:
                fut.set_result(None)
        nxt = self._next_flush
        if nxt is not None and self._job is None:
            self._next_flush = None
            if self.closed:  # close() flushed everything
                nxt.set_result(None)
            else:
                self._start_flush_job(loop, nxt)

    def _run_flush_job(self, job: _FlushJob) -> None:
        """In a worker thread: touches only the data file's fd and the commit connection."""
        try:
            os.fdatasync(self.data_fd)
            if job.rows:
                assert self._commit_db is not None
                _commit_rows(self._commit_db, job.rows)
        except BaseException as e:  # noqa: BLE001 - handed to the loop thread
            job.error = e
        finally:
            job.done.set()

    def _end_flush_job(self, job: _FlushJob) -> None:
        """On the loop thread, once: recycle what the commit freed, or put its rows back."""
        if job.ended:
            return
        job.ended = True
        if self._job is job:
            self._job = None
        if job.error is not None:  # not committed: newer rows win, freed chunks wait
            self.data_dirty = True
            job.rows.update(self._pending)
            self._pending = job.rows
            self._pending_free = job.freed + self._pending_free
            return
        self._unwiped.extend(job.freed)
        if self._unwiped:
            self._wipe_unwiped()

    def _wait_flush_job(self) -> None:
        """Single writer: a synchronous commit waits for the one in flight (rare: admin work)."""
        job = self._job
        if job is not None:
            job.done.wait()
            self._end_flush_job(job)

    def _before_metadata_write(self) -> None:
        self._wait_flush_job()
        self.space.before_metadata_write()

    def _recycle(self) -> None:
        """Chunks freed by a durable commit: wipe them, then they may be allocated again."""
        freed, self._pending_free = self._pending_free, []
        self._unwiped.extend(freed)
        if self._unwiped:
            self._wipe_unwiped()

    # ------------------------------------------------------------------ block maps

    def frozen_map(self, layer_id: int | None) -> BlockMap | None:
        """The merged, read-only content of a frozen layer (cached; built from the DB)."""
        if layer_id is None:
            return None
        chain: list[int] = []
        lid: int | None = layer_id
        while lid is not None and lid not in self.frozen:
            chain.append(lid)
            lid = self.layers[lid].parent
        base = self.frozen.get(lid) if lid is not None else None
        for lid in reversed(chain):
            m = base.fork() if base is not None else BlockMap()
            self._apply_rows(m, lid)
            self.frozen[lid] = m
            base = m
        return self.frozen[layer_id]

    def _apply_rows(self, m: BlockMap, layer_id: int) -> None:
        for chunk, phys in self.db.execute(
            "SELECT chunk, phys FROM extents WHERE layer = ?", (layer_id,)
        ):
            m.set(chunk, phys)
        job = self._job
        for rows in (job.rows, self._pending) if job is not None else (self._pending,):
            for (lid, chunk), phys in rows.items():
                if lid == layer_id:
                    m.set(chunk, HOLE_V if phys is None else phys)

    def volume_map(self, vol: Volume) -> BlockMap:
        if vol.map is None:
            top = self.layers[vol.layer]
            vol.parent_map = self.frozen_map(top.parent)
            m = vol.parent_map.fork() if vol.parent_map is not None else BlockMap()
            self._apply_rows(m, vol.layer)
            vol.map = m
        return vol.map

    def _invalidate(self, root_layer: int) -> None:
        """Forget cached maps of root_layer and every layer above it."""
        below: dict[int, list[int]] = {}
        for layer in self.layers.values():
            if layer.parent is not None:
                below.setdefault(layer.parent, []).append(layer.id)
        todo = [root_layer]
        subtree = set()
        while todo:
            lid = todo.pop()
            subtree.add(lid)
            todo.extend(below.get(lid, []))
        for lid in subtree:
            self.frozen.pop(lid, None)
        for vol in self.volumes.values():
            if vol.layer in subtree:
                vol.map = None
                vol.parent_map = None

    # ------------------------------------------------------------------ lookups

    def volume(self, name: str) -> Volume:
        vol = self.volumes_by_name.get(name)
        if vol is None:
            raise NotFound(f"volume {self.name}/{name} does not exist")
        return vol

    def snapshot(self, volume: str, name: str) -> Snapshot:
        vol = self.volume(volume)
        for s in self.snapshots.values():
            if s.volume == vol.id and s.name == name:
                return s
        raise NotFound(f"snapshot {self.name}/{volume}@{name} does not exist")

    def snapshot_ref(self, s: Snapshot) -> str:
        return f"{self.name}/{self.volumes[s.volume].name}@{s.name}"

    def snapshots_of(self, vol: Volume) -> list[Snapshot]:
        return sorted((s for s in self.snapshots.values() if s.volume == vol.id), key=lambda s: s.id)

    def clones_of(self, snap: Snapshot) -> list[Volume]:
        return sorted((v for v in self.volumes.values() if v.origin == snap.id), key=lambda v: v.id)

    def provisioned(self) -> int:
        return sum(v.size for v in self.volumes.values())

    def _check_provision(self, extra: int) -> None:
        limit = int(self.capacity * self.overcommit)
        if self.provisioned() + extra > limit:
            from virtua.units import human_size

            raise NoSpace(
                f"pool {self.name}: provisioning {human_size(extra)} more would exceed the overcommit "
                f"limit ({self.overcommit:g} x capacity {human_size(self.capacity)} = {human_size(limit)}; "
                f"{human_size(self.provisioned())} provisioned)"
            )

    @staticmethod
    def _check_size(size: int) -> None:
        if size <= 0 or size % SECTOR:
            raise InvalidArgument(f"bad volume size {size}: must be a positive multiple of {SECTOR}")
        if size > 1 << 60:
            raise InvalidArgument(f"bad volume size {size}: larger than 1 EiB")

    # ------------------------------------------------------------------ volumes

    def create_volume(self, name: str, size: int) -> Volume:
        check_name(name, "volume name")
        self._check_size(size)
        if name in self.volumes_by_name:
            raise AlreadyExists(f"volume {self.name}/{name} already exists")
        self._check_provision(size)
        now = time.time()
        with Tx(self.db) as db:
            vid = _next_id(db, "volumes")
            lid = db.execute("INSERT INTO layers (parent, volume) VALUES (NULL, ?)", (vid,)).lastrowid
            assert lid is not None
            db.execute(
                "INSERT INTO volumes (id, name, size, layer, origin, created) VALUES (?, ?, ?, ?, NULL, ?)",
                (vid, name, size, lid, now),
            )
        self.layers[lid] = Layer(lid, None, vid)
        vol = Volume(vid, name, size, lid, None, now)
        self.volumes[vid] = vol
        self.volumes_by_name[name] = vol
        return vol

    def resize_volume(self, name: str, size: int, force: bool = False) -> Volume:
        vol = self.volume(name)
        self.check_idle([vol], f"resize {self.name}/{name}")
        self._check_size(size)
        if size < vol.size:
            if not force:
                raise InvalidArgument(
                    f"refusing to shrink {self.name}/{name} from {_human(vol.size)} to {_human(size)}: "
                    "data past the new end is lost; use --shrink"
                )
            # Zero the cut-off tail first so that growing again reads zeros there.
            from virtua.storage.volume import VolumeDevice

            VolumeDevice(self, vol).write_zeroes(size, vol.size - size)
        elif size > vol.size:
            self._check_provision(size - vol.size)
        self.flush()
        self.db.execute("UPDATE volumes SET size = ? WHERE id = ?", (size, vol.id))
        vol.size = size
        return vol

    def delete_volume(self, name: str, recursive: bool = False) -> list[str]:
        """Delete a volume; with recursive, its snapshots and their clones too."""
        vol = self.volume(name)
        self.check_idle(self.tree(vol) if recursive else [vol], f"remove {self.name}/{name}")
        snaps = self.snapshots_of(vol)
        if snaps and not recursive:
            deps = [f"{self.name}/{name}@{s.name}" for s in snaps]
            clones = [f"{self.name}/{c.name}" for s in snaps for c in self.clones_of(s)]
            what = f"snapshot(s) {', '.join(deps)}"
            if clones:
                what += f" and clone(s) {', '.join(clones)}"
            raise DependencyError(f"volume {self.name}/{name} has {what}; use --recursive")
        self.flush()
        removed: list[str] = []
        for snap in snaps:
            for c in self.clones_of(snap):
                removed += self.delete_volume(c.name, recursive=True)
        with Tx(self.db) as db:
            db.execute("DELETE FROM snapshots WHERE volume = ?", (vol.id,))
            db.execute("DELETE FROM volumes WHERE id = ?", (vol.id,))
        for snap in snaps:
            del self.snapshots[snap.id]
        del self.volumes[vol.id]
        del self.volumes_by_name[vol.name]
        vol.deleted = True
        vol.map = vol.parent_map = None
        removed.append(f"{self.name}/{name}")
        removed += [f"{self.name}/{name}@{snap.name}" for snap in snaps]
        # Newest first: each layer then has no children left and is freed outright.
        self._collect(vol.layer)
        for snap in reversed(snaps):
            self._collect(snap.layer)
        return removed

    # ------------------------------------------------------------------ snapshots

    def create_snapshot(self, volume: str, name: str) -> Snapshot:
        vol = self.volume(volume)
        self.check_idle([vol], f"snapshot {self.name}/{volume}")
        check_name(name, "snapshot name")
        if any(s.volume == vol.id and s.name == name for s in self.snapshots.values()):
            raise AlreadyExists(f"snapshot {self.name}/{volume}@{name} already exists")
        self.flush()
        now = time.time()
        frozen_layer = vol.layer
        with Tx(self.db) as db:
            sid = db.execute(
                "INSERT INTO snapshots (volume, name, layer, size, created) VALUES (?, ?, ?, ?, ?)",
                (vol.id, name, frozen_layer, vol.size, now),
            ).lastrowid
            assert sid is not None
            new_top = db.execute(
                "INSERT INTO layers (parent, volume) VALUES (?, ?)", (frozen_layer, vol.id)
            ).lastrowid
            assert new_top is not None
            db.execute("UPDATE volumes SET layer = ? WHERE id = ?", (new_top, vol.id))
        snap = Snapshot(sid, vol.id, name, frozen_layer, vol.size, now)
        self.snapshots[sid] = snap
        self.layers[new_top] = Layer(new_top, frozen_layer, vol.id)
        vol.layer = new_top
        if vol.map is not None:  # O(1): the live map becomes the frozen one
            self.frozen[frozen_layer] = vol.map
            vol.parent_map = vol.map
            vol.map = vol.map.fork()
        return snap

    def delete_snapshot(self, volume: str, name: str, recursive: bool = False) -> list[str]:
        snap = self.snapshot(volume, name)
        clones = self.clones_of(snap)
        self.check_idle([self.volumes[snap.volume], *(t for c in clones if recursive for t in self.tree(c))],
                         f"remove {self.snapshot_ref(snap)}")
        if clones and not recursive:
            raise DependencyError(
                f"snapshot {self.snapshot_ref(snap)} has clone(s) "
                f"{', '.join(self.name + '/' + c.name for c in clones)}; use --recursive"
            )
        self.flush()
        return self._delete_snapshot(snap, recursive)

    def _delete_snapshot(self, snap: Snapshot, recursive: bool) -> list[str]:
        removed: list[str] = []
        for c in self.clones_of(snap):
            removed += self.delete_volume(c.name, recursive=True)
        ref = self.snapshot_ref(snap)
        with Tx(self.db) as db:
            db.execute("DELETE FROM snapshots WHERE id = ?", (snap.id,))
        del self.snapshots[snap.id]
        removed.append(ref)
        self._collect(snap.layer)
        return removed

    def rollback(self, volume: str, name: str) -> Volume:
        snap = self.snapshot(volume, name)
        vol = self.volumes[snap.volume]
        return self._repoint(vol, snap, snap.size, vol.origin)

    def check_clone(self, volume: str, snapshot: str | None, new: str, count: int = 1) -> list[str]:
        """What clone() would make, or the error it would raise; touches nothing."""
        if count < 1 or count > 10000:
            raise InvalidArgument(f"bad clone count {count}: must be 1..10000")
        check_name(new, "volume name")
        names = [new] if count == 1 else [f"{new}-{i}" for i in range(1, count + 1)]
        for n in names:
            check_name(n, "volume name")
            if n in self.volumes_by_name:
                raise AlreadyExists(f"volume {self.name}/{n} already exists")
        src = self.volume(volume)
        if snapshot is None:
            snap_name = f"clone-{new}"
            if any(s.volume == src.id and s.name == snap_name for s in self.snapshots.values()):
                raise AlreadyExists(f"snapshot {self.name}/{volume}@{snap_name} already exists")
            self._check_provision(src.size * count)
        else:
            self._check_provision(self.snapshot(volume, snapshot).size * count)
        return names

    def clone(self, volume: str, snapshot: str | None, new: str, count: int = 1) -> list[Volume]:
        """Writable clones of volume@snapshot (an implicit snapshot when None): O(1) each."""
        names = self.check_clone(volume, snapshot, new, count)
        if snapshot is None:
            snap = self.create_snapshot(volume, f"clone-{new}")
        else:
            snap = self.snapshot(volume, snapshot)
        now = time.time()
        made: list[tuple[int, int, str]] = []
        with Tx(self.db) as db:
            vid = _next_id(db, "volumes")
            for n in names:
                lid = db.execute(
                    "INSERT INTO layers (parent, volume) VALUES (?, ?)", (snap.layer, vid)
                ).lastrowid
                assert lid is not None
                db.execute(
                    "INSERT INTO volumes (id, name, size, layer, origin, created) VALUES (?, ?, ?, ?, ?, ?)",
                    (vid, n, snap.size, lid, snap.id, now),
                )
                made.append((vid, lid, n))
                vid += 1
        out = []
        for vid, lid, n in made:
            self.layers[lid] = Layer(lid, snap.layer, vid)
            vol = Volume(vid, n, snap.size, lid, snap.id, now)
            self.volumes[vid] = vol
            self.volumes_by_name[n] = vol
            out.append(vol)
        return out

    def reset(self, volume: str) -> Volume:
        """Throw away a clone's changes: back to the snapshot it was cloned from."""
        vol = self.volume(volume)
        if vol.origin is None:
            raise InvalidArgument(f"volume {self.name}/{volume} is not a clone: nothing to reset to")
        snap = self.snapshots[vol.origin]
        return self._repoint(vol, snap, max(vol.size, snap.size), snap.id)

    def rebase(self, volume: str, target_volume: str, target_snapshot: str) -> Volume:
        """Point a clone at another snapshot; its private changes are discarded."""
        vol = self.volume(volume)
        snap = self.snapshot(target_volume, target_snapshot)
        if vol.origin is None:
            raise InvalidArgument(
                f"volume {self.name}/{volume} is not a clone: rebase would replace its data; "
                "clone the snapshot to a new volume instead"
            )
        own = self.snapshots_of(vol)
        if own:
            raise DependencyError(
                f"volume {self.name}/{volume} has snapshot(s) "
                f"{', '.join(self.snapshot_ref(s) for s in own)}: rebase would cut them off its history"
            )
        if snap.volume == vol.id:
            raise InvalidArgument(
                f"{self.snapshot_ref(snap)} is a snapshot of {self.name}/{volume} itself; "
                "use snapshot rollback"
            )
        if self._descends_from(snap.layer, vol):
            raise InvalidArgument(
                f"{self.snapshot_ref(snap)} is derived from {self.name}/{volume}: would be a cycle"
            )
        return self._repoint(vol, snap, max(vol.size, snap.size), snap.id)

    def _descends_from(self, layer_id: int, vol: Volume) -> bool:
        lid: int | None = layer_id
        while lid is not None:
            if self.layers[lid].volume == vol.id:
                return True
            lid = self.layers[lid].parent
        return False

    def _repoint(self, vol: Volume, snap: Snapshot, size: int, origin: int | None) -> Volume:
        """Replace vol's top layer by an empty one over snap's layer."""
        self.check_idle([vol], f"change {self.name}/{vol.name}'s origin")
        self.flush()
        old_top = vol.layer
        with Tx(self.db) as db:
            new_top = db.execute(
                "INSERT INTO layers (parent, volume) VALUES (?, ?)", (snap.layer, vol.id)
            ).lastrowid
            assert new_top is not None
            db.execute(
                "UPDATE volumes SET layer = ?, size = ?, origin = ? WHERE id = ?",
                (new_top, size, origin, vol.id),
            )
        self.layers[new_top] = Layer(new_top, snap.layer, vol.id)
        vol.layer = new_top
        vol.size = size
        vol.origin = origin
        vol.map = vol.parent_map = None
        self._collect(old_top)
        return vol

    def flatten(self, volume: str, progress: Progress | None = None) -> int:
        """Copy what vol reads from its origin into its own bottom layer. Returns bytes copied.

        The copy is a FlattenJob's slices, back to back here; `virtua serve` runs the same
        slices with flatten_async, its data copies in a thread between the guests' requests.
        progress(done, total) in bytes of the origin's data is called before each slice; an
        exception from it stops the flatten there (the volume reads the same either way)."""
        job = self.flatten_job(volume)
        try:
            for copy in job.slices():
                job.report(progress)
                copy()
            if job.copied:
                self.flush()
            return job.finish()
        finally:
            job.release()

    async def flatten_async(self, volume: str, progress: Progress | None = None) -> int:
        """flatten() beside a server's clients: each slice's data copy in a worker thread,
        the block map and its rows on the loop between them, durability by the flush job."""
        loop = asyncio.get_running_loop()
        job = self.flatten_job(volume)
        try:
            for copy in job.slices():
                job.report(progress)
                try:
                    work = loop.run_in_executor(None, copy)
                except BaseException:
                    job.idle.set()  # never ran
                    raise
                # shielded: a cancelled request still lets the copy end (release waits for it)
                await asyncio.shield(work)
            if job.copied:
                await self.flush_async()
            return job.finish()
        finally:
            job.release()

    def flatten_job(self, volume: str) -> FlattenJob:
        """Start flattening volume: it is busy (no other admin operation may change its
        layers) until the job's release()."""
        vol = self.volume(volume)
        self.check_idle([vol], f"flatten {self.name}/{volume}")
        bottom = self.layers[vol.layer]
        while bottom.parent is not None and self.layers[bottom.parent].volume == vol.id:
            bottom = self.layers[bottom.parent]
        job = FlattenJob(self, vol, bottom)
        self.busy[vol.id] = job
        return job

    def check_idle(self, vols: Iterable[Volume], doing: str) -> None:
        """Busy if an operation that runs in slices (a flatten) is at work on one of vols."""
        for vol in vols:
            if vol.id in self.busy:
                raise Busy(f"cannot {doing}: volume {self.name}/{vol.name} is {self.busy[vol.id].doing}; "
                           "try again when that is done")

    def pin(self, vol: Volume, doing: str) -> Pin:
        """Hold vol's layers as they are while a reader outside the pool (an export
        reading the data file itself) uses them: every operation that could free or
        move their chunks refuses (check_idle) until unpin()."""
        self.check_idle([vol], doing)
        pin = self.busy[vol.id] = Pin(doing)
        return pin

    def unpin(self, vol_id: int, pin: Pin) -> None:
        if self.busy.get(vol_id) is pin:
            del self.busy[vol_id]

    def tree(self, vol: Volume) -> list[Volume]:
        """vol and every clone of its snapshots, recursively (what a recursive removal takes)."""
        out = [vol]
        for snap in self.snapshots_of(vol):
            for c in self.clones_of(snap):
                out += self.tree(c)
        return out

    # ------------------------------------------------------------------ layer GC

    def _referenced(self, lid: int) -> bool:
        return any(v.layer == lid for v in self.volumes.values()) or any(
            s.layer == lid for s in self.snapshots.values()
        )

    def _collect(self, lid: int | None) -> None:
        """Drop layers nothing needs; merge a nameless layer into its only child."""
        while lid is not None:
            if lid not in self.layers or self._referenced(lid):
                return
            children = [layer for layer in self.layers.values() if layer.parent == lid]
            parent = self.layers[lid].parent
            if len(children) > 1:
                return
            if not children:
                with Tx(self.db) as db:
                    freed = [p for (p,) in db.execute(
                        "SELECT phys FROM extents WHERE layer = ? AND phys > 0", (lid,))]
                    db.execute("DELETE FROM extents WHERE layer = ?", (lid,))
                    db.execute("DELETE FROM layers WHERE id = ?", (lid,))
                del self.layers[lid]
                self.frozen.pop(lid, None)
                self.release(freed)
                self._recycle()
                lid = parent
                continue
            child = children[0]
            self._merge_into_child(lid, child)
            return

    def _merge_into_child(self, lid: int, child: Layer) -> None:
        head = next((v for v in self.volumes.values() if v.layer == child.id), None)
        # never under a flatten or an export's pin: those hold the volume's layer ids
        if (head is not None and head.id not in self.busy and self.layers[lid].volume == head.id
                and self._rows(child.id) < self._rows(lid)):
            self._merge_head_down(lid, head)
            return
        parent = self.layers[lid].parent
        shadowed = "SELECT chunk FROM extents WHERE layer = ?"
        with Tx(self.db) as db:
            freed = [p for (p,) in db.execute(
                f"SELECT phys FROM extents WHERE layer = ? AND phys > 0 AND chunk IN ({shadowed})",
                (lid, child.id))]
            moved = [p for (p,) in db.execute(
                f"SELECT phys FROM extents WHERE layer = ? AND phys > 0 AND chunk NOT IN ({shadowed})",
                (lid, child.id))]
            db.execute(f"DELETE FROM extents WHERE layer = ? AND chunk IN ({shadowed})", (lid, child.id))
            db.execute("UPDATE extents SET layer = ? WHERE layer = ?", (child.id, lid))
            db.execute("UPDATE layers SET parent = ? WHERE id = ?", (parent, child.id))
            db.execute("DELETE FROM layers WHERE id = ?", (lid,))
        for p in moved:
            self.owner[p] = child.id
        child.parent = parent
        del self.layers[lid]
        self.frozen.pop(lid, None)
        for vol in self.volumes.values():
            if vol.layer == child.id and vol.map is not None:
                vol.parent_map = self.frozen_map(parent)
        self.release(freed)
        self._recycle()

    def _rows(self, lid: int) -> int:
        return int(self.db.execute("SELECT count(*) FROM extents WHERE layer = ?", (lid,)).fetchone()[0])

    def _merge_head_down(self, lid: int, vol: Volume) -> None:
        """_merge_into_child the other way: the volume's few head rows go down into the
        nameless layer below, which becomes its head. The same content, in O(head) rows
        rather than O(layer): removing the snapshot an export held (an idle volume's
        whole data below an empty head) touches almost nothing. Safe only because every
        caller has flushed first, so no planned write still names the old head."""
        old = vol.layer
        shadowed = "SELECT chunk FROM extents WHERE layer = ?"
        with Tx(self.db) as db:
            freed = [p for (p,) in db.execute(
                f"SELECT phys FROM extents WHERE layer = ? AND phys > 0 AND chunk IN ({shadowed})", (lid, old))]
            moved = [p for (p,) in db.execute("SELECT phys FROM extents WHERE layer = ? AND phys > 0", (old,))]
            db.execute(f"DELETE FROM extents WHERE layer = ? AND chunk IN ({shadowed})", (lid, old))
            db.execute("UPDATE extents SET layer = ? WHERE layer = ?", (lid, old))
            db.execute("UPDATE volumes SET layer = ? WHERE id = ?", (lid, vol.id))
            db.execute("DELETE FROM layers WHERE id = ?", (old,))
        for p in moved:
            self.owner[p] = lid
        # the chunks left in lid were its own already: the head now overwrites them in place
        del self.layers[old]
        vol.layer = lid
        self.frozen.pop(lid, None)
        if vol.map is not None:
            vol.parent_map = self.frozen_map(self.layers[lid].parent)
        self.release(freed)
        self._recycle()

    # ------------------------------------------------------------------ reports

    def info(self) -> dict[str, Any]:
        used = self.used * self.chunk_size
        info: dict[str, Any] = {
            "name": self.name,
            "path": str(self.path),
            "chunk_size": self.chunk_size,
            "capacity": self.capacity,
            "used": used,
            "free": self.capacity - used,
            "used_percent": round(100.0 * used / self.capacity, 2),
            "provisioned": self.provisioned(),
            "overcommit": self.overcommit,
            "volumes": len(self.volumes),
            "snapshots": len(self.snapshots),
        }
        if used > 0.8 * self.capacity:
            info["warning"] = (
                f"pool {self.name} is {info['used_percent']:.0f}% full: writes will fail with "
                "ENOSPC when it is full; free space or grow the pool"
            )
        return info

    def volume_info(self, name: str) -> dict[str, Any]:
        vol = self.volume(name)
        m = self.volume_map(vol)
        own_layers = {lid for lid, layer in self.layers.items() if layer.volume == vol.id}
        allocated = unique = 0
        owner = self.owner
        limit = (vol.size + self.chunk_mask) >> self.chunk_shift
        for c, p in m.items():
            if p > 0 and c < limit:
                allocated += 1
                if owner[p] in own_layers:
                    unique += 1
        cs = self.chunk_size
        origin = self.snapshot_ref(self.snapshots[vol.origin]) if vol.origin is not None else None
        children = sorted(
            f"{self.name}/{c.name}" for s in self.snapshots_of(vol) for c in self.clones_of(s)
        )
        return {
            "name": f"{self.name}/{vol.name}",
            "size": vol.size,
            "allocated": allocated * cs,
            "unique": unique * cs,
            "shared": (allocated - unique) * cs,
            "origin": origin,
            "children": children,
            "snapshots": [s.name for s in self.snapshots_of(vol)],
            "created": vol.created,
        }

    def snapshot_info(self, s: Snapshot) -> dict[str, Any]:
        return {
            "name": self.snapshot_ref(s),
            "size": s.size,
            "created": s.created,
            "clones": [f"{self.name}/{c.name}" for c in self.clones_of(s)],
            "protected": self.is_protected(s),
        }

    def check(self, repair: bool = False) -> dict[str, Any]:
        """Verify reference counts and ownership against the metadata, and every allocated
        byte of the data file against the chunks the metadata names; report problems.
        With repair, wipe the data of chunks nobody owns (reported as repaired)."""
        self._wait_wipe_job()
        self.flush()
        if repair and self._unwiped:
            self._wipe_unwiped()
            self._wait_wipe_job()
        view = self._check_view(self.db)
        return self._check_settle(_check_scan(view), view, repair)

    async def check_async(self, repair: bool = False) -> dict[str, Any]:
        """check() beside a server's clients: the metadata queries and the scan of the data
        file in a worker thread, on a read transaction of its own connection begun together
        with a copy of the in-memory state; what it finds is looked at again on the loop
        (the guests went on writing), where a repair wipes it."""
        loop = asyncio.get_running_loop()
        for _ in range(10):  # no commit in flight: the read transaction sees what memory has, less _pending
            await self.flush_async()
            if self._job is None:
                break
        self._wait_flush_job()  # writers that never pause: wait here for the last one
        if repair and self._unwiped:
            self._wipe_unwiped()
        reader = sqlite3.connect(f"file:{self.path / 'meta.db'}?mode=ro", uri=True,
                                 isolation_level=None, check_same_thread=False)
        try:
            reader.execute("BEGIN")
            view = self._check_view(reader)
            found = await loop.run_in_executor(None, _check_scan, view)
        finally:
            with contextlib.suppress(sqlite3.Error):
                reader.execute("ROLLBACK")
            reader.close()
        if self.closed:
            raise Busy(f"pool {self.name} was closed during its check")
        return self._check_settle(found, view, repair)

    def _check_view(self, db: sqlite3.Connection) -> _CheckView:
        """What check compares the metadata and the data file with; on the pool's thread."""
        db.execute("SELECT 1 FROM settings LIMIT 1").fetchall()  # the read snapshot starts here
        job = self._job
        pending = dict(job.rows) if job is not None else {}
        pending.update(self._pending)
        return _CheckView(
            db=db, fd=self.data_fd, name=self.name, chunk_shift=self.chunk_shift,
            capacity_chunks=self.capacity_chunks, owner=array("i", self.owner), hwm=self.hwm,
            used=self.used, unwiped={*self._unwiped, *self._wiping}, pending=pending,
            pending_free=len(self._pending_free) + (len(job.freed) if job is not None else 0),
        )

    def _check_settle(self, found: dict[str, Any], view: _CheckView, repair: bool) -> dict[str, Any]:
        """On the pool's thread: the file's suspect chunks against the state now (a chunk
        written, freed or wiped since the view is no problem), then the repair."""
        sh = self.chunk_shift
        job = self._job
        in_transit = {*self._pending_free, *self._wiping, *(job.freed if job is not None else ())}
        unwiped = set(self._unwiped)
        bad: dict[str, dict[int, int]] = {"leaked": {}, "unreferenced": {}, "stale": {}}
        referenced = found["referenced_bytes"]
        for kind, chunks in found["bad"].items():
            for c, n in chunks.items():
                if c < self.hwm and self.owner[c] != 0:
                    referenced += n  # allocated since the view
                    continue
                if c in in_transit:
                    continue
                if not _has_data(self.data_fd, c << sh, 1 << sh):
                    continue  # wiped since the view
                now = "leaked" if c >= self.hwm else "stale" if c in unwiped else "unreferenced"
                bad[now][c] = n if now == kind else _data_bytes(self.data_fd, c << sh, 1 << sh)
        why = {
            "leaked": "past the high-water mark (written, never committed)",
            "unreferenced": "in free chunks (their wipe was lost)",
            "stale": "in freed chunks still waiting to be wiped",
        }
        problems: list[str] = list(found["problems"])
        repaired: list[str] = []
        space: dict[str, Any] = {"file_bytes": os.fstat(self.data_fd).st_blocks * 512,
                                 "referenced_bytes": referenced}
        repaired_bytes = 0
        for kind, chunks in bad.items():
            space[f"{kind}_bytes"] = total = sum(chunks.values())
            if not chunks:
                continue
            what = f"{total} bytes in {len(chunks)} chunk(s) {why[kind]}"
            failed = set(self._wipe(list(chunks))) if repair and kind != "stale" else set(chunks)
            done = sum(n for c, n in chunks.items() if c not in failed)
            repaired_bytes += done
            if done:
                repaired.append(f"wiped {done} bytes in {len(chunks) - len(failed)} chunk(s) {why[kind]}")
            if failed:
                problems.append(what if not done else f"{total - done} bytes of {what} (wipe failed)")
        space["repaired_bytes"] = repaired_bytes
        space["repaired"] = repaired
        return {
            "pool": self.name,
            "ok": not problems,
            "problems": problems,
            "layers": found["layers"],
            "chunks_allocated": found["chunks_allocated"],
            "volumes": len(self.volumes),
            "snapshots": len(self.snapshots),
            **space,
        }

    # ------------------------------------------------------------------ everyday verbs
    # (rename, copy, protect, du, diff, trash). Per-object flags live in `settings` rows
    # ("protected.<snapshot id>", "trash.<volume id>"): no schema change.

    def rename_volume(self, name: str, new: str) -> Volume:
        vol = self.volume(name)
        check_name(new, "volume name")
        if new in self.volumes_by_name:
            raise AlreadyExists(f"volume {self.name}/{new} already exists")
        with Tx(self.db) as db:
            db.execute("UPDATE volumes SET name = ? WHERE id = ?", (new, vol.id))
        del self.volumes_by_name[vol.name]
        vol.name = new
        self.volumes_by_name[new] = vol
        return vol

    def rename_snapshot(self, volume: str, name: str, new: str) -> Snapshot:
        snap = self.snapshot(volume, name)
        check_name(new, "snapshot name")
        if any(s.volume == snap.volume and s.name == new for s in self.snapshots.values()):
            raise AlreadyExists(f"snapshot {self.name}/{volume}@{new} already exists")
        with Tx(self.db) as db:
            db.execute("UPDATE snapshots SET name = ? WHERE id = ?", (new, snap.id))
        snap.name = new
        return snap

    def content(self, volume: str, snapshot: str | None) -> tuple[BlockMap, int]:
        """The block map and size of volume's head (snapshot None) or of volume@snapshot."""
        if snapshot is None:
            vol = self.volume(volume)
            return self.volume_map(vol), vol.size
        snap = self.snapshot(volume, snapshot)
        frozen = self.frozen_map(snap.layer)
        assert frozen is not None
        return frozen, snap.size

    def copy_volume(self, volume: str, snapshot: str | None, new: str) -> tuple[Volume, int]:
        """A deep, independent copy of volume (or volume@snapshot): only allocated chunks are
        copied (in the kernel where it can), holes and zeros stay unallocated."""
        m, size = self.content(volume, snapshot)
        limit = (size + self.chunk_mask) >> self.chunk_shift
        todo = [(c, p) for c, p in m.items() if p > 0 and c < limit]
        self.reserve(len(todo))
        vol = self.create_volume(new, size)
        sh = self.chunk_shift
        try:
            for c, p in todo:
                q = self.alloc(vol.layer)
                self.data_dirty = True
                _copy(self.data_fd, p << sh, q << sh, self.chunk_size)
                self.set_row(vol.layer, c, q)
            vol.map = None
            self.flush()
        except BaseException:
            self.delete_volume(new)
            raise
        return vol, len(todo) * self.chunk_size

    def _setting(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_setting(self, key: str, value: str | None) -> None:
        with Tx(self.db) as db:
            if value is None:
                db.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def is_protected(self, snap: Snapshot) -> bool:
        return self._setting(f"protected.{snap.id}") is not None

    def protect(self, volume: str, name: str, on: bool = True) -> Snapshot:
        snap = self.snapshot(volume, name)
        self._set_setting(f"protected.{snap.id}", "1" if on else None)
        return snap

    def du(self, volume: str) -> list[dict[str, Any]]:
        """Like rbd du: per snapshot (oldest first) and for the head, what it provisions and
        the chunks that it alone wrote (its own layer)."""
        vol = self.volume(volume)
        owned: dict[int, int] = {}
        for lid in self.owner:
            if lid:
                owned[lid] = owned.get(lid, 0) + 1
        snaps = self.snapshots_of(vol)
        snap_layers = {s.layer for s in snaps}
        rows = [
            {"name": self.snapshot_ref(s), "provisioned": s.size, "used": owned.get(s.layer, 0) * self.chunk_size}
            for s in snaps
        ]
        head = sum(n for lid, n in owned.items()
                   if lid in self.layers and self.layers[lid].volume == vol.id and lid not in snap_layers)
        rows.append({"name": f"{self.name}/{vol.name}", "provisioned": vol.size, "used": head * self.chunk_size})
        return rows

    def diff(self, volume: str, to: str | None, since: str | None) -> tuple[int, list[tuple[int, int, bool]]]:
        """(size, runs) of what changed from volume@since to volume@to (None: the head):
        (offset, length, is_data); not data means it reads as zeros. since=None: everything."""
        m2, size = self.content(volume, to)
        m1 = None
        if since is not None:
            m1 = self.frozen_map(self.snapshot(volume, since).layer)
        limit = (size + self.chunk_mask) >> self.chunk_shift
        changed: dict[int, bool] = {}
        for c, p in m2.items():
            if c < limit and (m1 is None or m1.get(c) != p):
                changed[c] = p > 0
        if m1 is not None:
            for c, p in m1.items():
                if c < limit and c not in changed and m2.get(c) != p:
                    changed[c] = False  # data then, a hole now: reads as zeros
        runs: list[tuple[int, int, bool]] = []
        cs = self.chunk_size
        for c in sorted(changed):
            kind = changed[c]
            off = c * cs
            if runs and runs[-1][0] + runs[-1][1] == off and runs[-1][2] == kind:
                runs[-1] = (runs[-1][0], runs[-1][1] + cs, kind)
            else:
                runs.append((off, cs, kind))
        if runs and runs[-1][0] + runs[-1][1] > size:
            last = runs[-1]
            runs[-1] = (last[0], size - last[0], last[2])
        return size, runs

    TRASH_PREFIX = ".trash-"

    def trash_volume(self, name: str, keep: float) -> dict[str, Any]:
        """Move a volume (and its snapshots) out of sight for keep seconds; restorable."""
        vol = self.volume(name)
        self.check_idle([vol], f"move {self.name}/{name} to the trash")
        clones = [c for s in self.snapshots_of(vol) for c in self.clones_of(s)]
        if clones:
            raise DependencyError(
                f"volume {self.name}/{name} has clone(s) {', '.join(self.name + '/' + c.name for c in clones)}: "
                "a volume with clones cannot go to the trash; remove them, or use --now --recursive"
            )
        entry = {"name": name, "deleted": time.time(), "expires": time.time() + keep, "id": vol.id}
        hidden = f"{self.TRASH_PREFIX}{vol.id}"
        with Tx(self.db) as db:
            db.execute("UPDATE volumes SET name = ? WHERE id = ?", (hidden, vol.id))
            db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)",
                       (f"trash.{vol.id}", json.dumps(entry)))
        del self.volumes_by_name[vol.name]
        vol.name = hidden
        self.volumes_by_name[hidden] = vol
        return entry

    def trash(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT value FROM settings WHERE key LIKE 'trash.%'").fetchall()
        entries = [json.loads(v) for (v,) in rows]
        for e in entries:
            vol = self.volumes.get(e["id"])
            e["size"] = vol.size if vol else 0
            e["snapshots"] = [s.name for s in self.snapshots_of(vol)] if vol else []
        return sorted(entries, key=lambda e: e["deleted"])

    def restore_volume(self, name: str, new: str | None = None) -> Volume:
        """Bring the most recently trashed volume called name back (as new, if given)."""
        matches = [e for e in self.trash() if e["name"] == name]
        if not matches:
            raise NotFound(f"no volume {self.name}/{name} in the trash")
        entry = matches[-1]
        target = new or name
        check_name(target, "volume name")
        if target in self.volumes_by_name:
            raise AlreadyExists(f"volume {self.name}/{target} already exists; restore it under another name (--name)")
        vol = self.volumes[entry["id"]]
        with Tx(self.db) as db:
            db.execute("UPDATE volumes SET name = ? WHERE id = ?", (target, vol.id))
            db.execute("DELETE FROM settings WHERE key = ?", (f"trash.{vol.id}",))
        del self.volumes_by_name[vol.name]
        vol.name = target
        self.volumes_by_name[target] = vol
        return vol

    def purge_trash(self, everything: bool = False, now: float | None = None) -> list[str]:
        """Delete trashed volumes whose time is up (or all of them)."""
        now = time.time() if now is None else now
        removed = []
        for e in self.trash():
            if everything or e["expires"] <= now:
                vol = self.volumes.get(e["id"])
                if vol is not None:
                    self.delete_volume(vol.name, recursive=True)
                self._set_setting(f"trash.{e['id']}", None)
                removed.append(f"{self.name}/{e['name']}")
        return removed


@dataclass
class _FlushJob:
    """One commit of flush_async: the rows and freed chunks it took, and how it went."""

    rows: dict[tuple[int, int], int | None]
    freed: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    ended: bool = False


class Pin:
    """What Pool.busy holds for a pinned volume (see Pool.pin): nothing runs in a thread."""

    def __init__(self, doing: str) -> None:
        self.doing = doing
        self.stopped = False
        self.idle = threading.Event()
        self.idle.set()


class FlattenJob:
    """One flatten, in slices of FLATTEN_SLICE bytes. Each slice allocates its chunks and
    yields a callable that copies their data (pure I/O on the data file: a worker thread
    may run it); when the generator resumes, on the pool's thread, it maps the copies
    into the bottom layer: the block map at once (a guest write then lands in the copy),
    the rows at the next flush. A chunk the guest wrote or zeroed meanwhile keeps the
    guest's version and the copy is freed. Whatever point it stops at, every mapped copy
    holds what it replaced: the volume reads the same, the rows are ordinary ones."""

    doing = "being flattened"

    def __init__(self, pool: Pool, vol: Volume, bottom: Layer) -> None:
        self.pool = pool
        self.vol = vol
        self.bottom = bottom
        self.parent_id = bottom.parent
        self.copied = 0
        self.total = 0  # bytes of the origin's data to look at (known once slices() starts)
        self.done = 0  # of them, looked at
        self.error: BaseException | None = None
        self.idle = threading.Event()  # no copy in flight (Pool.close waits for it)
        self.idle.set()
        self.stopped = False
        # allocated for the slice being copied, not mapped yet: freed if the job stops there
        self.in_flight: list[tuple[int, int, int]] = []

    def _bottom_map(self) -> BlockMap:
        pool, vol = self.pool, self.vol
        if vol.layer == self.bottom.id:
            return pool.volume_map(vol)
        m = pool.frozen_map(self.bottom.id)
        assert m is not None
        return m

    def slices(self) -> Iterator[Callable[[], None]]:
        pool, vol = self.pool, self.vol
        if self.parent_id is None:
            return
        parent = pool.frozen_map(self.parent_id)
        assert parent is not None
        limit = (vol.size + pool.chunk_mask) >> pool.chunk_shift
        m = self._bottom_map()
        todo = [(c, p) for c, p in parent.items() if p > 0 and c < limit and m.get(c) == p]
        pool.reserve(len(todo))
        step = max(1, FLATTEN_SLICE >> pool.chunk_shift)
        sh, cs, fd = pool.chunk_shift, pool.chunk_size, pool.data_fd
        self.total = len(todo) * cs
        for i in range(0, len(todo), step):
            if pool.closed or self.stopped:
                raise Busy(f"flatten of {pool.name}/{vol.name} stopped: the pool was closed")
            self.done = i * cs
            m = self._bottom_map()
            batch = [(c, p) for c, p in todo[i : i + step] if m.get(c) == p]
            if not batch:
                continue
            pool.reserve(len(batch))
            copies = [(c, p, pool.alloc(self.bottom.id)) for c, p in batch]

            def copy(copies: list[tuple[int, int, int]] = copies) -> None:
                try:
                    for _, p, q in copies:
                        _copy(fd, p << sh, q << sh, cs)
                except BaseException as e:  # noqa: BLE001 - raised on the pool's thread
                    self.error = e
                finally:
                    self.idle.set()

            self.idle.clear()
            self.in_flight = copies
            yield copy
            self.idle.wait()  # the driver ran it (inline, or in a thread it awaited)
            if pool.closed:
                raise Busy(f"flatten of {pool.name}/{vol.name} stopped: the pool was closed")
            if self.error is not None:
                raise self.error
            self.in_flight = []
            m = self._bottom_map()
            pool.data_dirty = True
            stale = []
            for c, p, q in copies:
                if m.get(c) != p:  # the guest wrote or zeroed it meanwhile: its version wins
                    stale.append(q)
                    continue
                if vol.layer == self.bottom.id:
                    m.set(c, q)
                pool.set_row(self.bottom.id, c, q)
                self.copied += cs
            if stale:
                pool.release(stale)

    def report(self, progress: Progress | None) -> None:
        """Before a slice's copy: progress(done, total); what it raises stops the job there."""
        if progress is None:
            return
        try:
            progress(self.done, self.total)
        except BaseException:
            self.idle.set()  # the slice's copy never runs (release() waits for idle)
            raise

    def finish(self) -> int:
        """Once the rows are durable (a flush): detach the bottom layer from its origin."""
        pool, vol, bottom = self.pool, self.vol, self.bottom
        if self.parent_id is None:
            if vol.origin is not None:
                vol.origin = None
                pool.db.execute("UPDATE volumes SET origin = NULL WHERE id = ?", (vol.id,))
            return 0
        with Tx(pool.db) as db:
            db.execute("UPDATE layers SET parent = NULL WHERE id = ?", (bottom.id,))
            db.execute("UPDATE volumes SET origin = NULL WHERE id = ?", (vol.id,))
        bottom.parent = None
        vol.origin = None
        pool._invalidate(bottom.id)
        pool._collect(self.parent_id)
        return self.copied

    def release(self) -> None:
        self.idle.wait()
        if self.in_flight and not self.pool.closed:  # copies of the origin's data: wiped
            self.pool.release(q for _, _, q in self.in_flight)
        self.in_flight = []
        if self.pool.busy.get(self.vol.id) is self:
            del self.pool.busy[self.vol.id]


@dataclass
class _WipeJob:
    chunks: list[int]
    failed: list[int] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    ended: bool = False


@dataclass
class _CheckView:
    """The pool as check saw it at one moment: a read transaction (db) and the in-memory
    state that goes with it (the rows not committed yet in `pending`)."""

    db: sqlite3.Connection
    fd: int
    name: str
    chunk_shift: int
    capacity_chunks: int
    owner: array[int]
    hwm: int
    used: int
    unwiped: set[int]
    pending: dict[tuple[int, int], int | None]
    pending_free: int


def _check_scan(view: _CheckView) -> dict[str, Any]:
    """The metadata's consistency and the data file's extents against `view`: touches only
    view.db and reads of view.fd, so it may run in a worker thread."""
    problems: list[str] = []
    db = view.db
    layer_ids = {r[0] for r in db.execute("SELECT id FROM layers")}
    for lid, parent in db.execute("SELECT id, parent FROM layers"):
        if parent is not None and parent not in layer_ids:
            problems.append(f"layer {lid}: parent {parent} is missing")
    refs: dict[int, int] = {}
    for lid in layer_ids:
        refs[lid] = 0
    for (lid,) in db.execute("SELECT layer FROM volumes"):
        refs[lid] = refs.get(lid, 0) + 1
    for (lid,) in db.execute("SELECT layer FROM snapshots"):
        refs[lid] = refs.get(lid, 0) + 1
    for (parent,) in db.execute("SELECT parent FROM layers WHERE parent IS NOT NULL"):
        refs[parent] = refs.get(parent, 0) + 1
    for lid, n in refs.items():
        if lid not in layer_ids:
            problems.append(f"layer {lid} is referenced but missing")
        elif n == 0:
            problems.append(f"layer {lid} is leaked: no volume, snapshot or child uses it")
    for (lid,) in db.execute("SELECT DISTINCT layer FROM extents"):
        if lid not in layer_ids:
            problems.append(f"extents of missing layer {lid} are leaked")
    if not view.pending:
        for phys, n in db.execute(
            "SELECT phys, COUNT(*) FROM extents WHERE phys > 0 GROUP BY phys HAVING COUNT(*) > 1"
        ):
            problems.append(f"chunk {phys} is owned {n} times")
        rows = db.execute("SELECT phys, layer FROM extents WHERE phys > 0").fetchall()
    else:  # the committed rows, then what is still to commit over them
        mapping = {(lid, c): p for lid, c, p in db.execute("SELECT layer, chunk, phys FROM extents")}
        for key, p in view.pending.items():
            if p is None:
                mapping.pop(key, None)
            else:
                mapping[key] = p
        counts: dict[int, int] = {}
        for p in mapping.values():
            if p > 0:
                counts[p] = counts.get(p, 0) + 1
        problems += [f"chunk {p} is owned {n} times" for p, n in sorted(counts.items()) if n > 1]
        rows = [(p, lid) for (lid, _), p in mapping.items() if p > 0]
    owner = view.owner
    for phys, lid in rows:
        if phys > view.capacity_chunks:
            problems.append(f"chunk {phys} lies beyond the capacity")
        if phys >= len(owner) or owner[phys] != lid:
            problems.append(f"chunk {phys}: owner in memory disagrees with the metadata")
    in_memory = sum(1 for p in range(1, view.hwm) if owner[p] != 0)
    if in_memory != len(rows):
        problems.append(f"{in_memory} chunks owned in memory but {len(rows)} in the metadata (leak)")
    if view.used != len(rows) + len(view.unwiped) + view.pending_free:
        problems.append(
            f"usage counter {view.used} != {len(rows)} allocated + "
            f"{len(view.unwiped)} waiting to be wiped"
            + (f" + {view.pending_free} freed since the last commit" if view.pending_free else "")
        )
    for vid, vname, lid in db.execute("SELECT id, name, layer FROM volumes"):
        if lid in layer_ids and db.execute(
            "SELECT volume FROM layers WHERE id = ?", (lid,)
        ).fetchone()[0] != vid:
            problems.append(f"volume {vname}: top layer {lid} belongs to another volume")
    # every data extent of the data file (SEEK_DATA/SEEK_HOLE) by the chunk it lies in:
    # owned (referenced), free below the high-water mark (unreferenced: a wipe was lost),
    # freed but not yet wiped (stale), past the high-water mark (leaked: writes no commit
    # names). Byte counts are of allocated file space.
    sh = view.chunk_shift
    referenced = 0
    bad: dict[str, dict[int, int]] = {"leaked": {}, "unreferenced": {}, "stale": {}}
    for start, end in _data_extents(view.fd):
        c = start >> sh
        while (c << sh) < end:
            n = min(end, (c + 1) << sh) - max(start, c << sh)
            if c >= view.hwm:
                kind = "leaked"
            elif owner[c] != 0:
                referenced += n
                c += 1
                continue
            else:
                kind = "stale" if c in view.unwiped else "unreferenced"
            bad[kind][c] = bad[kind].get(c, 0) + n
            c += 1
    return {"problems": problems, "layers": len(layer_ids), "chunks_allocated": len(rows),
            "referenced_bytes": referenced, "bad": bad}


def _data_bytes(fd: int, pos: int, length: int) -> int:
    """Allocated bytes of fd in [pos, pos+length)."""
    total = 0
    end = pos + length
    while pos < end:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        if start >= end:
            break
        stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
        total += stop - start
        pos = stop
    return total


def _has_data(fd: int, pos: int, length: int) -> bool:
    return _data_bytes(fd, pos, length) > 0


def _commit_rows(db: sqlite3.Connection, rows: dict[tuple[int, int], int | None]) -> None:
    upserts = [(lid, c, p) for (lid, c), p in rows.items() if p is not None]
    deletes = [(lid, c) for (lid, c), p in rows.items() if p is None]
    with Tx(db):
        if deletes:
            db.executemany("DELETE FROM extents WHERE layer = ? AND chunk = ?", deletes)
        if upserts:
            db.executemany(
                "INSERT OR REPLACE INTO extents (layer, chunk, phys) VALUES (?, ?, ?)", upserts
            )


def _human(n: int) -> str:
    from virtua.units import human_size

    return human_size(n)


def _next_id(db: sqlite3.Connection, table: str) -> int:
    row = db.execute(f"SELECT COALESCE(MAX(id), 0) + 1 FROM {table}").fetchone()
    return int(row[0])


def _data_extents(fd: int) -> Iterable[tuple[int, int]]:
    """(start, end) of every data extent of fd, by SEEK_DATA/SEEK_HOLE."""
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def _runs(sorted_chunks: list[int]) -> Iterable[tuple[int, int]]:
    start = prev = sorted_chunks[0]
    for p in sorted_chunks[1:]:
        if p != prev + 1:
            yield start, prev - start + 1
            start = p
        prev = p
    yield start, prev - start + 1


def _pwrite_zeros(fd: int, pos: int, length: int) -> None:
    zeros = bytes(min(length, 1 << 20))
    end = pos + length
    while pos < end:
        pos += os.pwrite(fd, zeros[: end - pos], pos)


def _copy(fd: int, src: int, dst: int, length: int) -> None:
    """Copy within the data file, in the kernel where it can (copy_file_range)."""
    while length > 0:
        try:
            n = os.copy_file_range(fd, fd, length, src, dst)
        except OSError:
            n = 0
        if n <= 0:
            data = os.pread(fd, length, src)
            data += bytes(length - len(data))
            os.pwrite(fd, data, dst)
            return
        src += n
        dst += n
        length -= n


ZERO_MARK = ZERO_V
