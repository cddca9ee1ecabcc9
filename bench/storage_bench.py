"""Storage engine benchmarks: ``python -m bench storage [--quick] [--dir DIR] [--only ...]``.

Five benchmarks, each printed as a table with its goal and PASS/MISS:

  clone     100 clones of a template with 1 GiB written; per-clone time for 1/10/100 GiB templates
  cow       first overwrite of a chunk shared with a template vs a write to a fresh volume
  depth     4 KiB random reads at snapshot depth 1 vs 32
  baseline  engine vs os.preadv/os.pwrite on a plain file (4 KiB random, 1 MiB sequential)
  memory    RSS / block-map bytes: 100 open clones, map bytes per GiB written, 1 TiB thin volume
            (each measurement in its own subprocess)

Timed comparisons alternate the two sides round by round and report the median, because
run-to-run noise on a shared VM is large. Everything runs in a fresh directory under --dir
(default: a temporary directory on disk, not tmpfs), removed at the end unless --keep.
Goals marked * were chosen here (no project goal was given); the others come from the brief.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from virtua.storage.pool import Pool
from virtua.storage.volume import VolumeDevice

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
CHUNK = 64 * KiB
ROOT = Path(__file__).resolve().parents[1]
BENCHES = ("clone", "cow", "depth", "baseline", "memory")


# ---------------------------------------------------------------------------- parameters


@dataclass
class Params:
    quick: bool
    clone_written: int = 1 * GiB
    clone_sizes: tuple[int, ...] = (1 * GiB, 10 * GiB, 100 * GiB)
    clones: int = 100
    clone_rounds: int = 7
    cow_template: int = 256 * MiB  # written part of the template the clones overwrite
    cow_n4k: int = 4096  # 4 KiB writes per side per round (each into a distinct chunk)
    cow_n1m: int = 128  # 1 MiB writes per side per round (sequential)
    cow_rounds: int = 7
    depth: int = 32
    depth_region: int = 256 * MiB
    depth_reads: int = 20000
    depth_rounds: int = 15
    base_size: int = 256 * MiB
    base_n4k: int = 20000
    base_rounds: int = 7
    mem_written: int = 1 * GiB
    mem_clones: int = 100

    @classmethod
    def make(cls, quick: bool) -> Params:
        if not quick:
            return cls(quick=False)
        return cls(
            quick=True,
            clone_written=64 * MiB,
            clone_rounds=3,
            cow_template=32 * MiB,
            cow_n4k=512,
            cow_n1m=16,
            cow_rounds=2,
            depth_region=32 * MiB,
            depth_reads=3000,
            depth_rounds=3,
            base_size=32 * MiB,
            base_n4k=3000,
            base_rounds=2,
            mem_written=64 * MiB,
        )


# ---------------------------------------------------------------------------- results


@dataclass
class Result:
    bench: str
    what: str
    value: str
    goal: str
    ok: bool | None  # None: information only

    @property
    def status(self) -> str:
        return {True: "[green]PASS[/]", False: "[bold red]MISS[/]", None: "[dim]info[/]"}[self.ok]


@dataclass
class Run:
    params: Params
    workdir: Path
    console: Console
    results: list[Result] = field(default_factory=list)
    pattern: bytes = b""
    keep: bool = False

    def result(
        self, bench: str, what: str, value: str, goal: str = "", ok: bool | None = None
    ) -> Result:
        r = Result(bench, what, value, goal, ok)
        self.results.append(r)
        return r

    def table(self, title: str, rows: list[Result], extra: str = "") -> None:
        t = Table(title=title, title_justify="left", caption=extra or None, caption_justify="left")
        t.add_column("measurement")
        t.add_column("result", justify="right")
        t.add_column("goal", justify="right")
        t.add_column("status", justify="center")
        for r in rows:
            t.add_row(r.what, r.value, r.goal, r.status)
        self.console.print(t)

    def data(self, n: int, k: int = 0) -> memoryview:
        """n bytes of random-ish data (a window of one os.urandom buffer, shifted by k)."""
        mv = memoryview(self.pattern)
        start = (k * 4099) % (len(self.pattern) - n + 1)
        return mv[start : start + n]


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


@contextmanager
def no_gc() -> Iterator[None]:
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Timing:
    wall: float  # seconds, perf_counter
    cpu: float  # seconds of this process's CPU (user + system), process_time

    @staticmethod
    def median(ts: list[Timing]) -> Timing:
        return Timing(statistics.median(t.wall for t in ts), statistics.median(t.cpu for t in ts))


def timed(fn: Callable[[], Any]) -> Timing:
    with no_gc():
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        return Timing(time.perf_counter() - t0, time.process_time() - c0)


def alternate(rounds: int, sides: dict[str, Callable[[int], Timing]]) -> dict[str, list[Timing]]:
    """Run each side once per round, flipping the order every round; timings per side."""
    names = list(sides)
    out: dict[str, list[Timing]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else reversed(names):
            out[n].append(sides[n](r))
    return out


def ratio(num: list[Timing], den: list[Timing], cpu: bool = False) -> float:
    """Median over rounds of num/den, each round's pair having run back to back: a burst of
    load from other processes then hits both sides of a pair, not one side of the medians."""
    if cpu:
        return statistics.median(a.cpu / b.cpu for a, b in zip(num, den, strict=True))
    return statistics.median(a.wall / b.wall for a, b in zip(num, den, strict=True))


def spread(ts: list[Timing]) -> str:
    w = [t.wall for t in ts]
    return f"{(max(w) - min(w)) / statistics.median(w):.0%}"


def new_pool(run: Run, name: str, capacity: int = 1 * TiB) -> Pool:
    return Pool.create(
        run.workdir / name, name, capacity=capacity, chunk_size=CHUNK, overcommit=1000
    )


def drop(run: Run, *names: str) -> None:
    """Delete finished pools/files: frees their page cache for the next benchmark (on this kind of
    VM, page cache on never-used guest memory costs several times more kernel time)."""
    if run.keep:
        return
    for name in names:
        path = run.workdir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def fill(
    run: Run, dev: VolumeDevice, written: int, span: int | None = None, block: int = MiB
) -> float:
    """Write `written` bytes in `block` writes spread evenly over `span`; returns seconds."""
    span = dev.size if span is None else span
    n = written // block
    stride = (span // n) // block * block
    w = dev.write
    t0 = time.perf_counter()
    for k in range(n):
        w(k * stride, run.data(block, k))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------- machine facts


def fs_of(path: Path) -> tuple[str, str, str]:
    """(fs type, device, mount point) of the file system holding path."""
    real = os.path.realpath(path)
    best = ("?", "?", "/")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[2]):
                best = (fstype, dev, mnt)
    return best


def default_dir() -> Path:
    tmp = Path(tempfile.gettempdir())
    if fs_of(tmp)[0] in ("tmpfs", "ramfs"):
        return Path("/var/tmp")
    return tmp


def machine_facts(run: Run) -> None:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
            )
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(ln for ln in f if ln.startswith("MemTotal")).split()[1])
            mem = fmt_bytes(kb * KiB)
    except (OSError, StopIteration):
        pass

    def sysctl(name: str) -> str:
        try:
            return Path("/proc/sys/vm", name).read_text().strip()
        except OSError:
            return "?"

    fstype, dev, mnt = fs_of(run.workdir)
    st = os.statvfs(run.workdir)
    t = Table(title="machine", title_justify="left", show_header=False)
    t.add_column("fact")
    t.add_column("value")
    t.add_row("cores", f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)  {cpu}")
    t.add_row("memory", mem)
    t.add_row("kernel", f"{platform.system()} {platform.release()}")
    t.add_row("python", f"{platform.python_implementation()} {platform.python_version()}")
    t.add_row("bench dir", str(run.workdir))
    t.add_row(
        "file system",
        f"{fstype} on {dev} (mounted at {mnt}), {fmt_bytes(st.f_bavail * st.f_frsize)} free",
    )
    t.add_row(
        "dirty ratio",
        f"vm.dirty_ratio={sysctl('dirty_ratio')} vm.dirty_background_ratio={sysctl('dirty_background_ratio')}",
    )
    t.add_row("mode", "quick (smoke run: small sizes, few rounds)" if run.params.quick else "full")
    run.console.print(t)


# ---------------------------------------------------------------------------- 1. clones


def bench_clone(run: Run) -> None:
    p = run.params
    rows: list[Result] = []
    buf = memoryview(bytearray(4096))
    # One pool per template size, so that no size runs in a pool that the others made bigger;
    # rounds rotate through the sizes.
    pools: dict[int, Pool] = {}
    times: dict[int, list[tuple[float, float, float, float]]] = {size: [] for size in p.clone_sizes}
    try:
        for size in p.clone_sizes:
            pool = pools[size] = new_pool(run, f"clone{size // GiB}g")
            dev = VolumeDevice(pool, pool.create_volume("tmpl", size))
            wt = fill(run, dev, p.clone_written)
            t0 = time.perf_counter()
            pool.flush()
            ft = time.perf_counter() - t0
            rows.append(
                run.result(
                    "clone",
                    f"{size // GiB} GiB template: write {fmt_bytes(p.clone_written)} (1 MiB writes spread "
                    "over it), then flush",
                    f"{mbps(p.clone_written, wt):.0f} MB/s, flush {fmt_s(ft)}",
                )
            )
        order = list(p.clone_sizes)
        for r in range(p.clone_rounds):
            for size in order[r % len(order) :] + order[: r % len(order)]:
                pool = pools[size]
                t0 = time.perf_counter()
                pool.create_snapshot("tmpl", f"s{r}")
                t1 = time.perf_counter()
                c1 = time.process_time()
                vols = pool.clone("tmpl", f"s{r}", f"r{r}", count=p.clones)
                c2 = time.process_time()
                t2 = time.perf_counter()
                for v in vols:
                    VolumeDevice(pool, v).readinto(0, buf)  # opens it: builds its map
                t3 = time.perf_counter()
                times[size].append((t1 - t0, t2 - t1, t3 - t2, c2 - c1))
        per_clone: dict[int, float] = {}
        per_clone_cpu: dict[int, float] = {}
        for size in p.clone_sizes:
            s, c, o, cc = (statistics.median(x[i] for x in times[size]) for i in range(4))
            per_clone[size] = c / p.clones
            per_clone_cpu[size] = cc / p.clones
            info = pools[size].volume_info("r0-1")
            assert info["allocated"] == p.clone_written - p.clone_written % CHUNK, info
            rows.append(
                run.result(
                    "clone",
                    f"{size // GiB} GiB template: time per clone (pool.clone count={p.clones})",
                    f"{c / p.clones * 1e6:.1f} µs (cpu {cc / p.clones * 1e6:.1f} µs)",
                    "flat",
                    None,
                )
            )
            total = s + c + o
            rows.append(
                run.result(
                    "clone",
                    f"{p.clones} clones of the {size // GiB} GiB template: snapshot + clone + open each",
                    f"{fmt_s(total)} ({fmt_s(s)} + {fmt_s(c)} + {fmt_s(o)})",
                    "< 1 s" if size == p.clone_sizes[0] else "< 1 s *",
                    total < 1.0,
                )
            )
        lo, hi = min(per_clone_cpu.values()), max(per_clone_cpu.values())
        wall = max(per_clone.values()) / min(per_clone.values())
        rows.append(
            run.result(
                "clone",
                f"per-clone CPU time, slowest / fastest template size (wall-time ratio {wall:.2f}x: "
                "the commit's fsync latency dominates it)",
                f"{hi / lo:.2f}x",
                "<= 1.5x *",
                hi / lo <= 1.5,
            )
        )
    finally:
        for pool in pools.values():
            pool.close()
        drop(run, *(f"clone{size // GiB}g" for size in p.clone_sizes))
    run.table(
        f"1. clones (median of {p.clone_rounds} rounds; each size in its own pool, rounds rotate over the sizes)",
        rows,
        "open = first 4 KiB read of each clone (builds its block map). The clone commit includes "
        "SQLite's fsync (synchronous=FULL).",
    )


# ---------------------------------------------------------------------------- 2. copy-on-write


def per_op(t: Timing, nops: int, nbytes: int) -> str:
    return f"{mbps(nbytes, t.wall):.0f} MB/s, {t.wall / nops * 1e6:.1f} µs/op (cpu {t.cpu / nops * 1e6:.1f})"


def bench_cow(run: Run) -> None:
    p = run.params
    pool = new_pool(run, "cow")
    rows: list[Result] = []
    size = 1 * GiB
    try:
        tmpl = pool.create_volume("tmpl", size)
        fill(run, VolumeDevice(pool, tmpl), p.cow_template)
        pool.create_snapshot("tmpl", "base")
        pool.flush()
        rng = random.Random(2)
        nchunks = p.cow_template // CHUNK
        off4k = [
            c * CHUNK + rng.randrange(CHUNK // 4096) * 4096
            for c in rng.sample(range(nchunks), p.cow_n4k)
        ]
        off1m = [k * MiB for k in range(p.cow_n1m)]
        assert p.cow_n1m * MiB <= p.cow_template
        blk4 = bytes(run.data(4096, 1))
        blk1m = bytes(run.data(MiB, 2))
        flush_t: dict[str, list[float]] = {}
        made: list[str] = []

        def side(kind: str, offs: list[int], blk: bytes) -> Callable[[int], Timing]:
            def go(r: int) -> Timing:
                name = f"{kind}-{len(blk)}-{r}"
                if kind == "clone":
                    vol = pool.clone("tmpl", "base", name)[0]
                else:
                    vol = pool.create_volume(name, size)
                made.append(name)
                dev = VolumeDevice(pool, vol)
                dev.readinto(0, memoryview(bytearray(512)))  # open: build the map
                w = dev.write

                def loop() -> None:
                    for off in offs:
                        w(off, blk)

                t = timed(loop)
                t0 = time.perf_counter()
                pool.flush()
                flush_t.setdefault(f"{kind}{len(blk)}", []).append(time.perf_counter() - t0)
                return t

            return go

        for label, offs, blk, pattern in (
            ("4 KiB", off4k, blk4, "random"),
            ("1 MiB", off1m, blk1m, "sequential"),
        ):
            res = alternate(
                p.cow_rounds,
                {
                    "clone": side("clone", offs, blk),
                    "fresh": side("fresh", offs, blk),
                },
            )
            # Delete this size's volumes: their chunks (and page cache) are reused by the next.
            for name in made:
                pool.delete_volume(name)
            made.clear()
            pool.flush()
            nbytes = len(offs) * len(blk)
            tc, tf = Timing.median(res["clone"]), Timing.median(res["fresh"])
            fc = statistics.median(flush_t[f"clone{len(blk)}"])
            ff = statistics.median(flush_t[f"fresh{len(blk)}"])
            rows.append(
                run.result(
                    "cow",
                    f"{label} {pattern} x{len(offs)}: first overwrite of shared chunks (spread {spread(res['clone'])})",
                    per_op(tc, len(offs), nbytes),
                )
            )
            rows.append(
                run.result(
                    "cow",
                    f"{label} {pattern} x{len(offs)}: write to a fresh volume (spread {spread(res['fresh'])})",
                    per_op(tf, len(offs), nbytes),
                )
            )
            q = ratio(res["fresh"], res["clone"])
            rows.append(
                run.result(
                    "cow",
                    f"{label}: shared / fresh throughput (cpu-time ratio "
                    f"{ratio(res['fresh'], res['clone'], cpu=True):.2f})",
                    f"{q:.2f}",
                    ">= 0.5",
                    q >= 0.5,
                )
            )
            rows.append(
                run.result(
                    "cow",
                    f"{label}: shared / fresh incl. the flush after (flush {fmt_s(fc)} vs {fmt_s(ff)})",
                    f"{(tf.wall + ff) / (tc.wall + fc):.2f}",
                )
            )
    finally:
        pool.close()
        drop(run, "cow")
    run.table(
        f"2. copy-on-write: first write to a clone's shared chunk vs a fresh volume "
        f"(median of {p.cow_rounds} alternating rounds; ratios: median of the per-round ratios, page cache, flush not timed)",
        rows,
        "4 KiB writes each hit a distinct 64 KiB chunk; the shared side copies the other 60 KiB "
        "(copy_file_range). cpu = process CPU time (user+sys), less sensitive to other load.",
    )


# ---------------------------------------------------------------------------- 3. snapshot depth


def bench_depth(run: Run) -> None:
    p = run.params
    path = run.workdir / "depth"
    pool = new_pool(run, "depth")
    rows: list[Result] = []
    D = p.depth
    nchunks = p.depth_region // CHUNK
    # The same chunk order for both volumes, so that their physical layouts match: the only
    # difference is that the deep one snapshots after every 1/D of the chunks.
    order = [c for i in range(D) for c in range(i, nchunks, D)]
    per_layer = len(order) // D
    for name, snaps in (("d1", 1), (f"d{D}", D)):
        vol = pool.create_volume(name, 1 * GiB)
        dev = VolumeDevice(pool, vol)
        for i, c in enumerate(order):
            dev.write(c * CHUNK, run.data(CHUNK, c))
            if snaps > 1 and (i + 1) % per_layer == 0:
                pool.create_snapshot(name, f"s{(i + 1) // per_layer}")
        if snaps == 1:
            pool.create_snapshot(name, "s1")
    pool.close()
    pool = Pool(path)  # reopen: maps are built from the metadata, as after a restart
    try:
        devs: dict[str, VolumeDevice] = {}
        for name in ("d1", f"d{D}"):
            vol = pool.volume(name)
            chain = 0
            lid: int | None = vol.layer
            while lid is not None:
                chain += 1
                lid = pool.layers[lid].parent
            dev = VolumeDevice(pool, vol)
            t0 = time.perf_counter()
            m = pool.volume_map(vol)
            bt = time.perf_counter() - t0
            devs[name] = dev
            snaps = len(pool.snapshots_of(vol))
            rows.append(
                run.result(
                    "depth",
                    f"{name}: {snaps} snapshot(s), {chain} layers; map build after reopen",
                    f"{fmt_s(bt)} ({len(m.segs)} segments)",
                )
            )
            # warm the page cache and check the content
            buf = bytearray(MiB)
            for off in range(0, p.depth_region, MiB):
                dev.readinto(off, memoryview(buf))
            c = order[-1]
            assert dev.read(c * CHUNK, 4096) == bytes(run.data(CHUNK, c)[:4096])
        rng = random.Random(3)
        offs = [rng.randrange(p.depth_region // 4096) * 4096 for _ in range(p.depth_reads)]
        buf4 = memoryview(bytearray(4096))

        def side(name: str) -> Callable[[int], Timing]:
            ri = devs[name].readinto

            def loop() -> None:
                for off in offs:
                    ri(off, buf4)

            return lambda r: timed(loop)

        res = alternate(p.depth_rounds, {n: side(n) for n in devs})
        t1, tD = Timing.median(res["d1"]), Timing.median(res[f"d{D}"])
        for name, t in (("d1", t1), (f"d{D}", tD)):
            rows.append(
                run.result(
                    "depth",
                    f"{name}: 4 KiB random readinto x{p.depth_reads} (spread {spread(res[name])})",
                    per_op(t, len(offs), len(offs) * 4096),
                )
            )
        q = ratio(res[f"d{D}"], res["d1"])
        rows.append(
            run.result(
                "depth",
                f"depth {D} / depth 1 read time (cpu-time ratio "
                f"{ratio(res[f'd{D}'], res['d1'], cpu=True):.3f})",
                f"{q:.3f}x",
                "<= 1.1x",
                q <= 1.1,
            )
        )
    finally:
        pool.close()
        drop(run, "depth")
    run.table(
        f"3. reads vs snapshot depth (median of {p.depth_rounds} alternating rounds; ratios: median of the per-round ratios, warm page cache, "
        f"{fmt_bytes(p.depth_region)} of data spread over the layers)",
        rows,
        "Both volumes have the same physical layout (same write order); the pool is reopened first.",
    )


# ---------------------------------------------------------------------------- 4. engine vs plain file


def bench_baseline(run: Run) -> None:
    p = run.params
    S = p.base_size
    pool = new_pool(run, "base")
    plain = run.workdir / "plain.img"
    fd = os.open(plain, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        dev = VolumeDevice(pool, pool.create_volume("v", S))
        fill(run, dev, S)
        pool.flush()
        for k in range(S // MiB):
            os.pwrite(fd, run.data(MiB, k), k * MiB)
        os.fdatasync(fd)
        big = memoryview(bytearray(MiB))
        for off in range(0, S, MiB):  # warm the page cache
            dev.readinto(off, big)
            os.preadv(fd, [big], off)
        rng = random.Random(4)
        off4k = [rng.randrange(S // 4096) * 4096 for _ in range(p.base_n4k)]
        off1m = list(range(0, S, MiB))
        buf4 = memoryview(bytearray(4096))
        blk4 = bytes(run.data(4096, 5))
        blk1m = bytes(run.data(MiB, 6))

        def engine_read(offs: list[int], buf: memoryview) -> Callable[[int], Timing]:
            ri = dev.readinto

            def loop() -> None:
                for off in offs:
                    ri(off, buf)

            return lambda r: timed(loop)

        def plain_read(offs: list[int], buf: memoryview) -> Callable[[int], Timing]:
            pv = os.preadv
            bufs = [buf]

            def loop() -> None:
                for off in offs:
                    pv(fd, bufs, off)

            return lambda r: timed(loop)

        def engine_write(offs: list[int], blk: bytes) -> Callable[[int], Timing]:
            w = dev.write

            def loop() -> None:
                for off in offs:
                    w(off, blk)

            def go(r: int) -> Timing:
                t = timed(loop)
                pool.flush()
                return t

            return go

        def plain_write(offs: list[int], blk: bytes) -> Callable[[int], Timing]:
            pw = os.pwrite

            def loop() -> None:
                for off in offs:
                    pw(fd, blk, off)

            def go(r: int) -> Timing:
                t = timed(loop)
                os.fdatasync(fd)
                return t

            return go

        cases = (
            (
                "4 KiB random read",
                off4k,
                4096,
                engine_read(off4k, buf4),
                plain_read(off4k, buf4),
                0.5,
            ),
            (
                "4 KiB random write",
                off4k,
                4096,
                engine_write(off4k, blk4),
                plain_write(off4k, blk4),
                0.5,
            ),
            (
                "1 MiB sequential read",
                off1m,
                MiB,
                engine_read(off1m, big),
                plain_read(off1m, big),
                0.8,
            ),
            (
                "1 MiB sequential write",
                off1m,
                MiB,
                engine_write(off1m, blk1m),
                plain_write(off1m, blk1m),
                0.8,
            ),
        )
        t = Table(
            title=f"4. engine vs plain file, same file system, {fmt_bytes(S)} "
            f"(median of {p.base_rounds} alternating rounds, ratios: median of the per-round ratios; warm page cache; writes overwrite "
            "allocated data, flush not timed)",
            title_justify="left",
            caption="plain file: os.preadv into the same buffer / os.pwrite of the same bytes. "
            "cpu = process CPU time per op. Goals * chosen here (no project goal given).",
            caption_justify="left",
        )
        for col in ("operation", "engine", "plain file", "engine / plain (cpu)", "goal", "status"):
            t.add_column(col, justify="left" if col == "operation" else "right")
        for label, offs, n, eng, pln, goal in cases:
            res = alternate(p.base_rounds, {"engine": eng, "plain": pln})
            te, tp = Timing.median(res["engine"]), Timing.median(res["plain"])
            nbytes = len(offs) * n
            q, qc = ratio(res["plain"], res["engine"]), ratio(res["plain"], res["engine"], cpu=True)
            r = run.result(
                "baseline",
                f"{label}: engine / plain throughput (cpu-time ratio {qc:.2f})",
                f"{q:.2f}",
                f">= {goal} *",
                q >= goal,
            )
            t.add_row(
                f"{label} x{len(offs)}",
                per_op(te, len(offs), nbytes),
                per_op(tp, len(offs), nbytes),
                f"{q:.2f} ({qc:.2f})",
                r.goal,
                r.status,
            )
        run.console.print(t)
    finally:
        os.close(fd)
        pool.close()
        drop(run, "base", "plain.img")


# ---------------------------------------------------------------------------- 5. memory


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * KiB
    return 0


def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh interpreter: open a pool, open volumes, report memory."""
    import tracemalloc

    tm = spec["tracemalloc"]
    out: dict[str, Any] = {}
    gc.collect()
    if tm:
        tracemalloc.start()

    def mark(key: str) -> None:
        gc.collect()
        out[f"rss_{key}"] = rss_bytes()
        if tm:
            out[f"tm_{key}"] = tracemalloc.get_traced_memory()[0]

    mark("start")
    pool = Pool(Path(spec["pool"]))
    mark("pool")
    buf = memoryview(bytearray(4096))
    if spec["kind"] == "clones":
        snap = pool.snapshot(spec["template"], spec["snapshot"])
        tmap = pool.frozen_map(snap.layer)
        assert tmap is not None
        mark("template")
        devs = []
        for name in spec["names"]:
            dev = VolumeDevice(pool, pool.volume(name))
            dev.readinto(0, buf)
            devs.append(dev)
        mark("opened")
        if spec.get("write"):
            for i, dev in enumerate(devs):  # one 4 KiB write each into a shared chunk
                dev.write((i * 7919 % 16) * CHUNK, bytes(4096))
            mark("written")
        out["template_map_bytes"] = tmap.memory_bytes()
        out["clone_map_bytes"] = [d.vol.map.memory_bytes() for d in devs if d.vol.map is not None]
    else:
        vol = pool.volume(spec["volume"])
        dev = VolumeDevice(pool, vol)
        t0 = time.perf_counter()
        dev.readinto(vol.size - 4096, buf)  # opens it: builds the map
        out["build_s"] = time.perf_counter() - t0
        mark("opened")
        m = vol.map
        assert m is not None
        out["map_bytes"] = m.memory_bytes()
        out["segments"] = len(m.segs)
        out["chunks"] = sum(1 for _, v in m.items() if v > 0)
    out["owner_array_bytes"] = pool.owner.buffer_info()[1] * pool.owner.itemsize
    pool.close()
    return out


def child(run: Run, spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.storage_bench", "--child", json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(run: Run) -> None:
    p = run.params
    rows: list[Result] = []
    W = p.mem_written
    # Pool A: a template with W written, snapshot, 100 clones.
    pa = run.workdir / "mem-clones"
    pool = new_pool(run, "mem-clones")
    fill(run, VolumeDevice(pool, pool.create_volume("tmpl", 1 * GiB)), W)
    pool.create_snapshot("tmpl", "base")
    names = [v.name for v in pool.clone("tmpl", "base", "vm", count=p.mem_clones)]
    # Children that write change the pool, so each of them gets its own set of clones.
    wnames = {
        k: [v.name for v in pool.clone("tmpl", "base", k, count=p.mem_clones)] for k in ("wa", "wb")
    }
    pool.close()
    # Pool B: one volume per write pattern.
    pb = run.workdir / "mem-maps"
    pool = new_pool(run, "mem-maps", capacity=4 * TiB)
    seq = VolumeDevice(pool, pool.create_volume("seq", max(W, 1 * GiB)))
    fill(run, seq, W)
    rng = random.Random(5)
    for name, vsize in (("rand100g", 100 * GiB), ("rand1t", 1 * TiB)):
        rnd = VolumeDevice(pool, pool.create_volume(name, vsize))
        for k, c in enumerate(rng.sample(range(vsize // CHUNK), W // CHUNK)):
            rnd.write(c * CHUNK, run.data(CHUNK, k))
    pool.create_volume("thin1t", 1 * TiB)
    pool.create_volume("thin1g", 1 * GiB)
    pool.close()

    def both(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        return child(run, dict(spec, tracemalloc=False)), child(run, dict(spec, tracemalloc=True))

    # 100 open clones
    spec = {
        "kind": "clones",
        "pool": str(pa),
        "template": "tmpl",
        "snapshot": "base",
        "names": names,
    }
    r_rss, r_tm = both(spec)
    n = len(names)
    rows.append(
        run.result(
            "memory",
            f"process RSS: start / pool open / template map / {n} clones open",
            " / ".join(
                fmt_bytes(r_rss[k]) for k in ("rss_start", "rss_pool", "rss_template", "rss_opened")
            ),
        )
    )
    tmpl_map = r_tm["tm_template"] - r_tm["tm_pool"]
    opened = r_tm["tm_opened"] - r_tm["tm_template"]
    rows.append(
        run.result("memory", f"template map ({fmt_bytes(W)} written; traced)", fmt_bytes(tmpl_map))
    )
    rows.append(
        run.result(
            "memory",
            f"{n} clones opened: RSS growth",
            fmt_bytes(r_rss["rss_opened"] - r_rss["rss_template"]),
        )
    )
    rows.append(
        run.result(
            "memory",
            f"{n} clones opened: traced bytes per clone (maps shared with the template)",
            fmt_bytes(opened / n),
            "<= 4 KiB *",
            opened / n <= 4 * KiB,
        )
    )
    w_rss = child(run, dict(spec, names=wnames["wa"], write=True, tracemalloc=False))
    w_tm = child(run, dict(spec, names=wnames["wb"], write=True, tracemalloc=True))
    wrote = w_tm["tm_written"] - w_tm["tm_opened"]
    rows.append(
        run.result(
            "memory",
            f"{n} clones each write 4 KiB into a shared chunk: traced bytes per clone (RSS +{fmt_bytes(w_rss['rss_written'] - w_rss['rss_opened'])} total)",
            fmt_bytes(wrote / n),
        )
    )

    # block map per GiB written
    per_gib = 0.0
    for vol, what in (
        ("seq", "sequential 1 MiB writes"),
        ("rand100g", "64 KiB writes at random chunks of a 100 GiB volume"),
        ("rand1t", "64 KiB writes at random chunks of a 1 TiB volume"),
    ):
        rs, rt = both({"kind": "map", "pool": str(pb), "volume": vol})
        traced = rt["tm_opened"] - rt["tm_pool"]
        gib = rt["chunks"] * CHUNK / GiB
        per_gib = traced / gib
        rows.append(
            run.result(
                "memory",
                f"block map, {what}: {rt['chunks']} chunks in {rt['segments']} segments, "
                f"traced bytes per GiB written (RSS +{fmt_bytes(rs['rss_opened'] - rs['rss_pool'])}, "
                f"build {fmt_s(rs['build_s'])})",
                fmt_bytes(per_gib),
                "<= 4 MiB",
                per_gib <= 4 * MiB,
            )
        )
    rows.append(
        run.result(
            "memory",
            "derived: 4 KiB writes at random chunks of a 1 TiB volume (each maps a whole chunk): "
            f"x{CHUNK // 4096} the line above per GiB written",
            fmt_bytes(per_gib * CHUNK / 4096),
        )
    )
    rows.append(
        run.result(
            "memory",
            "pool-wide chunk-owner array (4 B per chunk up to the high-water mark)",
            f"{fmt_bytes(rt['owner_array_bytes'])} for {fmt_bytes(rt['owner_array_bytes'] // 4 * CHUNK)} of chunks",
        )
    )
    thin: dict[str, int] = {}
    for vol in ("thin1g", "thin1t"):
        rs, rt = both({"kind": "map", "pool": str(pb), "volume": vol})
        thin[vol] = rt["tm_opened"] - rt["tm_pool"]
        rows.append(
            run.result(
                "memory",
                f"{vol}: {'1 TiB' if vol == 'thin1t' else '1 GiB'} thin volume, nothing written, opened: traced / RSS growth",
                f"{fmt_bytes(thin[vol])} / {fmt_bytes(rs['rss_opened'] - rs['rss_pool'])}",
            )
        )
    rows.append(
        run.result(
            "memory",
            "1 TiB thin volume costs the same as a 1 GiB one (map bytes, difference)",
            fmt_bytes(thin["thin1t"] - thin["thin1g"]),
            "< 1 KiB *",
            abs(thin["thin1t"] - thin["thin1g"]) < KiB,
        )
    )
    drop(run, "mem-clones", "mem-maps")
    run.table(
        "5. memory (each line measured in fresh subprocesses: one for RSS, one with tracemalloc)",
        rows,
        "traced = tracemalloc bytes still allocated after the step (maps + per-volume objects).",
    )


# ---------------------------------------------------------------------------- main


def summary(run: Run) -> None:
    t = Table(title="summary: goals", title_justify="left")
    for col in ("bench", "measurement", "result", "goal", "status"):
        t.add_column(col, justify="right" if col in ("result", "goal") else "left")
    for r in run.results:
        if r.ok is not None:
            t.add_row(r.bench, r.what, r.value, r.goal, r.status)
    run.console.print(t)
    missed = sum(1 for r in run.results if r.ok is False)
    run.console.print(
        f"{sum(1 for r in run.results if r.ok)} PASS, {missed} MISS"
        + (" (quick run: sizes are smaller than the goals assume)" if run.params.quick else "")
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child_main(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(
        prog="python -m bench storage",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help="short smoke run (small sizes, few rounds)"
    )
    ap.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to create the pools (default: a temp dir on disk; e.g. /dev/shm for tmpfs)",
    )
    ap.add_argument(
        "--only", default=",".join(BENCHES), help=f"comma-separated subset of {','.join(BENCHES)}"
    )
    ap.add_argument("--keep", action="store_true", help="keep the pools afterwards")
    args = ap.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    bad = [b for b in only if b not in BENCHES]
    if bad:
        ap.error(f"unknown benchmark(s) {', '.join(bad)}; choose from {', '.join(BENCHES)}")
    base = args.dir if args.dir is not None else default_dir()
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="virtua-bench-", dir=base))
    console = Console(width=None if sys.stdout.isatty() else 160)
    run = Run(Params.make(args.quick), workdir, console, keep=args.keep)
    run.pattern = os.urandom(2 * MiB)  # random-ish data: made once, windows of it reused
    t_all = time.perf_counter()
    try:
        machine_facts(run)
        for name in BENCHES:
            if name in only:
                t0 = time.perf_counter()
                globals()[f"bench_{name}"](run)
                console.print(f"[dim]{name}: {time.perf_counter() - t0:.1f} s[/]\n")
        summary(run)
        console.print(f"total {time.perf_counter() - t_all:.1f} s")
    finally:
        if args.keep:
            console.print(f"pools kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
