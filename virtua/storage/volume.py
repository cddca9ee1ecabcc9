"""The data path: volumes and snapshots as BlockDevices.

Written for speed: a request inside one chunk (the common 4 KiB case) costs two dict/
array lookups and one os.preadv/os.pwrite. Copy-on-write of a shared chunk copies only
the untouched parts, in the kernel (copy_file_range).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from virtua.errors import InvalidArgument, NoSpace, NotFound, ReadOnly
from virtua.storage.blockmap import HOLE_V, SEG_MASK, SEG_SHIFT, ZERO_V, BlockMap
from virtua.storage.device import HOLE, ZERO, Extent
from virtua.storage.inflight import CopyPlan, WritePlan
from virtua.storage.pool import WRITEBACK_AFTER, Pool, Snapshot, Volume, _copy


class _Reader:
    """Read side shared by volumes and snapshots: map lookups and preadv."""

    pool: Pool

    def _map(self) -> BlockMap:
        raise NotImplementedError

    @property
    def size(self) -> int:
        raise NotImplementedError

    @property
    def block_size(self) -> int:
        return self.pool.chunk_size

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise InvalidArgument(
                f"range {offset}+{length} is outside the device (size {self.size})"
            )

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(offset, memoryview(buf))
        return bytes(buf)

    def readinto(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        self._check_range(offset, n)
        if n == 0:
            return
        pool = self.pool
        sh = pool.chunk_shift
        m = self._map()
        first = offset >> sh
        if (offset + n - 1) >> sh == first:  # fast path: one chunk
            seg = m.segs.get(first >> SEG_SHIFT)
            v = 0 if seg is None else seg[first & SEG_MASK]
            if v > 0:
                got = os.preadv(pool.data_fd, [buf], (v << sh) + (offset & pool.chunk_mask))
                if got < n:
                    buf[got:] = pool.zeros[: n - got]
            else:
                buf[:] = pool.zeros[:n]
            return
        cs = pool.chunk_size
        fd = pool.data_fd
        pos = 0
        run_start = -1  # physical byte offset of a run of contiguous data chunks
        run_buf = 0  # where in buf that run starts
        run_len = 0
        c = first
        while pos < n:
            within = (offset + pos) & pool.chunk_mask
            piece = min(cs - within, n - pos)
            v = m.get(c)
            if v > 0:
                phys = (v << sh) + within
                if run_len and run_start + run_len == phys and run_buf + run_len == pos:
                    run_len += piece
                else:
                    if run_len:
                        _preadv_full(fd, buf[run_buf : run_buf + run_len], run_start, pool.zeros)
                    run_start, run_buf, run_len = phys, pos, piece
            else:
                buf[pos : pos + piece] = pool.zeros[:piece]
            pos += piece
            c += 1
        if run_len:
            _preadv_full(fd, buf[run_buf : run_buf + run_len], run_start, pool.zeros)

    def physical_run(self, offset: int, length: int) -> tuple[int, int] | None:
        """(fd, file offset) if [offset, offset+length) is one contiguous run of data chunks
        in the pool's data file -- what a server may hand to sendfile(2) -- else None."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            return None
        pool = self.pool
        sh = pool.chunk_shift
        m = self._map()
        first = offset >> sh
        start = m.get(first)
        if start <= 0:
            return None
        for i in range(1, ((offset + length - 1) >> sh) - first + 1):
            if m.get(first + i) != start + i:
                return None
        return pool.data_fd, (start << sh) + (offset & pool.chunk_mask)

    def physical_view(self, pos: int, length: int) -> memoryview | None:
        """A view of [pos, pos+length) of the pool's data file (a position from
        physical_run), for the kernel to copy into a socket; see FileMap."""
        return self.pool.data_map.view(pos, length)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_range(offset, length)
        if length == 0:
            return []
        pool = self.pool
        sh = pool.chunk_shift
        m = self._map()
        end = offset + length
        out: list[Extent] = []
        for start, count, v in m.runs(offset >> sh, ((end - 1) >> sh) + 1):
            a = max(start << sh, offset)
            b = min((start + count) << sh, end)
            flags = 0 if v > 0 else HOLE | ZERO
            if out and out[-1].flags == flags:
                last = out[-1]
                out[-1] = Extent(last.offset, b - last.offset, flags)
            else:
                out.append(Extent(a, b - a, flags))
        return out

    def flush(self) -> None:
        self.pool.flush()

    async def flush_async(self) -> None:
        """flush() with its durability work off the event loop (Pool.flush_async)."""
        await self.pool.flush_async()


class SnapshotDevice(_Reader):
    """A snapshot: read-only."""

    def __init__(self, pool: Pool, snap: Snapshot) -> None:
        self.pool = pool
        self.snap = snap

    def _map(self) -> BlockMap:
        if self.snap.id not in self.pool.snapshots:
            raise NotFound(f"snapshot {self.snap.name} was deleted")
        m = self.pool.frozen_map(self.snap.layer)
        assert m is not None
        return m

    @property
    def size(self) -> int:
        return self.snap.size

    @property
    def readonly(self) -> bool:
        return True

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        raise ReadOnly("snapshots are read-only")

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        raise ReadOnly("snapshots are read-only")

    def discard(self, offset: int, length: int) -> None:
        raise ReadOnly("snapshots are read-only")


class VolumeDevice(_Reader):
    """A writable volume."""

    def __init__(self, pool: Pool, vol: Volume) -> None:
        self.pool = pool
        self.vol = vol

    def _map(self) -> BlockMap:
        vol = self.vol
        m = vol.map
        if m is None:
            if vol.deleted:
                raise NotFound(f"volume {vol.name} was deleted")
            m = self.pool.volume_map(vol)
        return m

    @property
    def size(self) -> int:
        return self.vol.size

    @property
    def readonly(self) -> bool:
        return False

    def write(self, offset: int, data: bytes | bytearray | memoryview, fua: bool = False) -> None:
        mv = memoryview(data)
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        n = len(mv)
        self._check_range(offset, n)
        if n == 0:
            return
        pool = self.pool
        sh = pool.chunk_shift
        m = self._map()
        top = self.vol.layer
        owner = pool.owner
        fd = pool.data_fd
        first = offset >> sh
        last = (offset + n - 1) >> sh
        if first == last:  # fast path: overwrite of a chunk this volume owns
            seg = m.segs.get(first >> SEG_SHIFT)
            v = 0 if seg is None else seg[first & SEG_MASK]
            if v > 0 and owner[v] == top:
                pool.data_dirty = True
                try:
                    os.pwrite(fd, mv, (v << sh) + (offset & pool.chunk_mask))
                except OSError as e:  # a chunk written only in part needs file system space
                    if e.errno == errno.ENOSPC:
                        raise _no_space(pool) from e
                    raise
                pool.unsynced += n
                if pool.unsynced >= WRITEBACK_AFTER:
                    pool.start_writeback()
                if fua:
                    pool.flush()
                return
        plan, undo = self._plan_write(offset, mv)
        plan.execute()
        if plan.error is not None:
            # A failed write (EIO, the file system full) maps no new chunk: half-copied
            # or half-written chunks go back to be wiped, the old entries stay.
            undo()
            plan.ended = True
            err = plan.error
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise _no_space(pool) from err
            raise err
        plan.end()
        if fua:
            pool.flush()

    def start_write(self, offset: int, data: memoryview) -> WritePlan:
        """Plan a write on the loop thread (chunks allocated and copied on write, in the
        map at once) for a worker to execute(); end() it on the loop thread once done.
        Unlike write(), a failed one keeps its new chunks: a later write may already
        have gone into them, and they hold the old data (or zeros) but for the failed
        range, which NBD leaves undefined."""
        self._check_range(offset, len(data))
        return self.pool.inflight.add(self._plan_write(offset, data)[0])

    def start_copy(self, offset: int, src_fd: int, src_pos: int, length: int) -> WritePlan:
        """start_write() of `length` bytes that a worker copies from another file (at
        src_pos of src_fd) instead of from a buffer: an import from a local image file."""
        self._check_range(offset, length)
        plan, _ = self._plan_write(offset, None, length)
        return self.pool.inflight.add(CopyPlan(plan, src_fd, src_pos))

    def _plan_write(
        self, offset: int, mv: memoryview | None, n: int = 0,
    ) -> tuple[WritePlan, Callable[[], None]]:
        """The plan of a write that is not a plain overwrite, and how to undo its mapping
        (mv None: n bytes whose source the caller's plan knows)."""
        if mv is not None:
            n = len(mv)
        pool = self.pool
        sh = pool.chunk_shift
        m = self._map()
        top = self.vol.layer
        owner = pool.owner
        fd = pool.data_fd
        first = offset >> sh
        last = (offset + n - 1) >> sh if n else first - 1
        need = 0
        for c in range(first, last + 1):
            v = m.get(c)
            if not (v > 0 and owner[v] == top):
                need += 1
        if need:
            pool.reserve(need)
        cs = pool.chunk_size
        pos = 0
        run_start = -1
        run_buf = 0
        run_len = 0
        runs: list[tuple[int, int, int]] = []
        new_rows: list[tuple[int, int]] = []
        replaced: list[int] = []  # what each new chunk's entry was, to undo a failed write

        def undo() -> None:
            for (c, _), v in zip(new_rows, replaced, strict=True):
                m.set(c, v)
            pool.release(phys for _, phys in new_rows)

        pool.data_dirty = True
        try:
            for c in range(first, last + 1):
                a = (offset + pos) & pool.chunk_mask
                piece = min(cs - a, n - pos)
                v = m.get(c)
                if v > 0 and owner[v] == top:
                    phys = v
                else:
                    phys = pool.alloc(top)
                    m.set(c, phys)
                    new_rows.append((c, phys))
                    replaced.append(v)
                    if v > 0 and piece < cs:
                        # Copy-on-write of a shared chunk: one whole-chunk in-kernel copy,
                        # then the write over it, is cheaper than copying head and tail.
                        _copy(fd, v << sh, phys << sh, cs)
                at = (phys << sh) + a
                if run_len and run_start + run_len == at:
                    run_len += piece
                else:
                    if run_len:
                        runs.append((run_start, run_buf, run_len))
                    run_start, run_buf, run_len = at, pos, piece
                pos += piece
            if run_len:
                runs.append((run_start, run_buf, run_len))
        except BaseException:  # a failed copy-on-write: nothing is written yet
            undo()
            raise

        def finish(plan: WritePlan) -> None:
            # Rows only after the data is written: an automatic commit must never point
            # at a chunk whose data is still on its way.
            e = plan.error
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                plan.error = _no_space(pool)
            for c, phys in new_rows:
                pool.set_row(top, c, phys)
            pool.unsynced += n
            if pool.unsynced >= WRITEBACK_AFTER:
                pool.start_writeback()

        return WritePlan(fd, runs, mv if mv is not None else memoryview(b""), finish), undo

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True, fua: bool = False) -> None:
        self._check_range(offset, length)
        if length == 0:
            return
        pool = self.pool
        sh = pool.chunk_shift
        cs = pool.chunk_size
        m = self._map()
        top = self.vol.layer
        parent = self.vol.parent_map
        end = offset + length
        pos = offset
        while pos < end:
            c = pos >> sh
            a = pos & pool.chunk_mask
            piece = min(cs - a, end - pos)
            v = m.get(c)
            if piece == cs and may_trim:
                pv = parent.get(c) if parent is not None else HOLE_V
                new = ZERO_V if pv > 0 else pv
                if v != new:
                    if v > 0 and pool.owner[v] == top:
                        pool.release((v,))
                    m.set(c, new)
                    pool.set_row(top, c, ZERO_V if pv > 0 else None)
            elif v > 0:
                self.write(pos, pool.zeros[:piece])
            elif not may_trim:  # NO_HOLE: allocate; a fresh chunk already reads as zeros
                pool.reserve(1)
                phys = pool.alloc(top)
                m.set(c, phys)
                pool.set_row(top, c, phys)
            pos += piece
        if fua:
            pool.flush()

    def discard(self, offset: int, length: int) -> None:
        """TRIM frees whole chunks and zeroes partial ones: the range reads as zeros."""
        self.write_zeroes(offset, length, may_trim=True)


def _no_space(pool: Pool) -> NoSpace:
    return NoSpace(f"pool {pool.name} is full: the file system under {pool.path} has no space left")


def _preadv_full(fd: int, buf: memoryview, pos: int, zeros: bytes) -> None:
    got = os.preadv(fd, [buf], pos)
    while got < len(buf):
        more = os.preadv(fd, [buf[got:]], pos + got)
        if more <= 0:  # past the end of the data file: never written, reads as zeros
            buf[got:] = bytes(len(buf) - got)
            return
        got += more
