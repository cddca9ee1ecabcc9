"""Images in and out of a pool on the same machine without NBD in between.

`qemu-img convert` through an NBD socket moves about 1 GB/s here whatever the server
(nbdkit's file plugin too), half of what it does between two local files. When the
image file is on this machine, the bytes need not cross a socket:

- import: `qemu-img map` says where each run of the image's data lies in its file (raw,
  or qcow2 without compression, encryption, backing or external data file); the pool
  copies those runs straight into the new volume's chunks (copy_file_range in a worker
  thread; the block map and its rows on the pool's thread, as for any write), leaving
  chunks of zeros unwritten.
- export: the pool pins a snapshot (its chunks cannot be freed or reused meanwhile) and
  lists where its data lies in the pool's data file; `qemu-img convert` reads those runs
  as a concatenation of raw windows of that file (holes as zero devices), and writes the
  image itself.

Anything else (a compressed qcow2, too many runs, another machine) goes over NBD.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from virtua.errors import InvalidArgument

if TYPE_CHECKING:  # the CLI imports this module for concat_sources: keep it light
    from virtua.storage.volume import SnapshotDevice, VolumeDevice

SLICE = 16 << 20  # bytes per planned copy: the pool's thread maps one slice while a worker copies
MAX_SOURCES = 400  # windows one qemu-img convert opens (one file descriptor each)

Run = tuple[int, int, int]  # (offset in the volume, offset in the file, length)


def proc_path(fd: int) -> str:
    """A name for an open file that other processes (qemu-img) open as the same inode."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def _qemu_img(*args: str) -> dict[str, Any] | list[Any] | None:
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if r.returncode != 0:
        return None
    out: dict[str, Any] | list[Any] = json.loads(r.stdout)
    return out


def image_runs(fd: int, fmt: str, size: int) -> list[Run] | str:
    """Where the data of the image open on fd lies in its own file, as runs to copy
    into a volume of `size` bytes (zeros and holes left out); or why it cannot be
    copied that way (then it goes through qemu-img over NBD)."""
    if fmt not in ("raw", "qcow2"):
        return f"format {fmt}"
    path = proc_path(fd)
    file_size = os.fstat(fd).st_size
    if fmt == "qcow2":
        info = _qemu_img("info", "--output=json", "-f", fmt, path)
        if not isinstance(info, dict):
            return "qemu-img info failed"
        if info.get("backing-filename") or info.get("full-backing-filename"):
            return "it has a backing file"
        if info.get("encrypted"):
            return "it is encrypted"
        data = (info.get("format-specific") or {}).get("data") or {}
        if data.get("data-file"):
            return "its data is in an external file"
        check = _qemu_img("check", "--output=json", "-f", fmt, path)
        if not isinstance(check, dict):
            return "qemu-img check failed"
        if int(check.get("compressed-clusters", 0)):
            return "it has compressed clusters"  # qemu-img map gives their offsets as if raw
    extents = _qemu_img("map", "--output=json", "-f", fmt, path)
    if not isinstance(extents, list):
        return "qemu-img map failed"
    runs: list[Run] = []
    for e in extents:
        start, length = int(e["start"]), int(e["length"])
        if start < 0 or length < 0 or start + length > size:
            raise InvalidArgument(f"the image maps {start}+{length}, past its virtual size {size}")
        if not e.get("data") or e.get("zero"):
            continue  # the volume is new: it reads zeros there already
        if int(e.get("depth", 0)) != 0 or "offset" not in e:
            return "some of its data is not in the file itself"
        at = int(e["offset"])
        if at < 0 or at + length > file_size:
            raise InvalidArgument(f"the image maps {length} bytes at {at} of its file, which ends at {file_size}: "
                                  "it is truncated")
        if runs and runs[-1][0] + runs[-1][2] == start and runs[-1][1] + runs[-1][2] == at:
            v, f, n = runs[-1]
            runs[-1] = (v, f, n + length)
        else:
            runs.append((start, at, length))
    return runs


def slices(runs: list[Run]) -> Iterator[Run]:
    for v, f, n in runs:
        done = 0
        while done < n:
            k = min(SLICE, n - done)
            yield v + done, f + done, k
            done += k


def nonzero_parts(src_fd: int, piece: Run, chunk: int) -> list[tuple[int, int]]:
    """The runs of a slice, (offset in it, length), that are not all zeros, cut at the
    volume's chunk boundaries (any thread: reads drop the GIL). A zero chunk is left
    unwritten, as qemu-img convert and nbdcopy leave it, so the volume stays as thin as
    the image's data. A chunk whose first bytes are not zero (any real data, nearly
    always) costs one 16-byte read; only the others are read whole to be sure."""
    v, f, n = piece
    out: list[tuple[int, int]] = []
    a = 0
    while a < n:
        b = min(((v + a) // chunk + 1) * chunk - v, n)
        k = b - a
        head = os.pread(src_fd, 16, f + a)
        if head.count(0) != len(head) or os.pread(src_fd, k, f + a).count(0) != k:
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], out[-1][1] + k)
            else:
                out.append((a, k))
        elif len(head) < min(16, k):
            raise InvalidArgument(f"the image file ends at byte {f + a + len(head)}, before what it maps")
        a = b
    return out


def _execute(plans: list[Any]) -> None:
    for plan in plans:
        plan.execute()


def _end(plans: list[Any]) -> None:
    error = None
    for plan in plans:
        plan.end()
        error = error or plan.error
    if error is not None:
        raise error


def copy_in(dev: VolumeDevice, src_fd: int, runs: list[Run], progress: Callable[[int], None]) -> int:
    """Copy runs into dev on this thread (no server beside it), the next slice looked at
    by a helper thread meanwhile (a quarter of the time, offline, went to looking);
    progress(bytes) between slices. Returns the bytes looked at."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = dev.pool.chunk_size
    pieces = list(slices(runs))
    done = 0
    with ThreadPoolExecutor(1, thread_name_prefix="virtua-scan") as scanner:
        scanning = scanner.submit(nonzero_parts, src_fd, pieces[0], chunk) if pieces else None
        for i, piece in enumerate(pieces):
            progress(done)
            assert scanning is not None
            parts = scanning.result()
            scanning = scanner.submit(nonzero_parts, src_fd, pieces[i + 1], chunk) if i + 1 < len(pieces) else None
            plans = [dev.start_copy(piece[0] + off, src_fd, piece[1] + off, n) for off, n in parts]
            _execute(plans)
            _end(plans)
            done += piece[2]
    dev.pool.flush()
    return done


async def copy_in_async(dev: VolumeDevice, src_fd: int, runs: list[Run], progress: Callable[[int], None]) -> int:
    """copy_in() beside a server's clients: the reads and copies in worker threads (the
    next slice looked at while the one before is copied), the block map on the loop
    between them, which stays free for the guests' requests."""
    import asyncio

    loop = asyncio.get_running_loop()
    chunk = dev.pool.chunk_size
    pieces = list(slices(runs))
    done = 0
    copying: tuple[asyncio.Future[None], list[Any]] | None = None

    def scan(i: int) -> asyncio.Future[list[tuple[int, int]]]:
        return loop.run_in_executor(None, nonzero_parts, src_fd, pieces[i], chunk)

    try:
        scanning = scan(0) if pieces else None
        for i, piece in enumerate(pieces):
            progress(done)
            assert scanning is not None
            parts = await scanning
            scanning = scan(i + 1) if i + 1 < len(pieces) else None
            plans = [dev.start_copy(piece[0] + off, src_fd, piece[1] + off, n) for off, n in parts]
            if copying is not None:
                await asyncio.shield(copying[0])
                _end(copying[1])
                copying = None
            # shielded: a cancelled request still lets a copy end (the pool's flush ends its plans)
            copying = (loop.run_in_executor(None, _execute, plans), plans)
            done += piece[2]
        if copying is not None:
            await asyncio.shield(copying[0])
            _end(copying[1])
            copying = None
    finally:
        if copying is not None:  # stopped between: its plans end by the pool's flush
            with contextlib.suppress(BaseException):
                await asyncio.shield(copying[0])
    await dev.pool.flush_async()
    return done


def data_extents(dev: SnapshotDevice, data_size: int) -> list[list[int]]:
    """[offset, length, position in the data file or -1 for zeros] covering dev, adjacent
    runs merged; a chunk past the data file's end reads zeros there (as the pool does)."""
    pool = dev.pool
    sh = pool.chunk_shift
    size = dev.size
    m = dev._map()
    out: list[list[int]] = []

    def add(off: int, n: int, pos: int) -> None:
        if n <= 0:
            return
        if out:
            last = out[-1]
            if last[2] < 0 and pos < 0:
                last[1] += n
                return
            if last[2] >= 0 and pos >= 0 and last[0] + last[1] == off and last[2] + last[1] == pos:
                last[1] += n
                return
        out.append([off, n, pos])

    chunks = (size + (1 << sh) - 1) >> sh
    for start, count, v in m.linear_runs(0, chunks):  # a v > 0 run: chunks v, v+1, ...
        off = start << sh
        n = min(count << sh, size - off)
        if v <= 0:
            add(off, n, -1)
            continue
        pos = v << sh
        inside = max(0, min(n, data_size - pos))
        add(off, inside, pos)
        add(off + inside, n - inside, -1)
    return out


def concat_sources(data_file: str, extents: list[list[int]]) -> list[str]:
    """qemu-img image names that, concatenated, read what extents describe."""
    out = []
    for _off, n, pos in extents:
        if pos < 0:
            spec: dict[str, Any] = {"driver": "null-co", "size": n, "read-zeroes": True}
        else:
            spec = {"driver": "raw", "offset": pos, "size": n,
                    "file": {"driver": "file", "filename": data_file, "locking": "off"}}
        out.append("json:" + json.dumps(spec, separators=(",", ":")))
    return out
