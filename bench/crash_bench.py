"""Crash safety under kill -9: ``python -m bench crash [--kill-points 200] [--seed N]``.

Runs tests/helpers/crash_workload.py's random workload (writes, zeroes, trims, flushes,
FUA writes, snapshots, clones, removals, flatten over up to 6 volumes of one pool) through
the real NBD server and operations, kills the server with SIGKILL at random moments,
restarts it and checks every byte of every volume and snapshot against the model.
Prints kill points tried, operations, bytes checked and violations by kind (goal: 0).

Then flush isolation (tests/helpers/crash_flush.py): fio reads 4 KiB at random, queue
depth 1, from one export while another client writes --dirty MiB to another export of
the same pool and flushes, over and over; printed: fio's p50/p99 latency idle and for the
reads that completed during a FLUSH, and the FLUSH's median duration (goal: p99 during
flushes within 2x of idle). The pools live in --dir (default: a new directory under /tmp,
which is the disk here: a tmpfs has nothing to fdatasync).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_kill_points(kill_points: int, seed: int, where: Path, serve: bool = False) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.helpers.crash_workload import CrashWorkload

    work = CrashWorkload(where / "home", seed=seed, serve=serve)
    t0 = time.monotonic()
    try:
        for i in range(kill_points):
            work.kill_point()
            if (i + 1) % 25 == 0:
                print(f"  {i + 1} kill points, {len(work.stats.violations)} violations", flush=True)
    finally:
        work.close()
    s = work.stats
    elapsed = time.monotonic() - t0
    print(f"kill points tried   {s.kill_points}")
    print(f"operations          {s.ops}")
    print(f"bytes checked       {s.bytes_checked} ({s.bytes_checked / 2**30:.2f} GiB)")
    print(f"violations          {sum(s.counts.values())} {s.counts or ''}")
    print(f"elapsed             {elapsed:.0f} s ({elapsed / max(s.kill_points, 1):.2f} s per kill point)")
    for v in s.violations[:20]:
        print(f"  {v}")
    return 1 if s.counts else 0


def run_flush_isolation(dirty_mib: list[int], seconds: float, where: Path, rounds: int = 2) -> None:
    """Both writeback settings in one run, alternating (the machine's noise moves between
    runs more than between neighbours): early writeback every 8 MiB (the default) and
    none (VIRTUA_WRITEBACK_MIB=0: the whole dirty set waits for the FLUSH)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.crash_flush import MIB, measure
    from tests.helpers.crash_server import CrashServer
    from virtua.storage.service import Storage

    print("flush isolation: fio randread 4k qd1 on f/r, another client writes DIRTY to f/w, then FLUSH")
    print(f"  {'writeback':>9} {'dirty':>8} {'idle p50':>9} {'idle p99':>9} {'flush p50':>9} {'flush p99':>9} "
          f"{'p99 ratio':>9} {'busy p99':>9} {'flushes':>7} {'FLUSH ms':>8} {'reads':>6}")
    for rnd in range(rounds):
        for mib in dirty_mib:
            for writeback in ("8", "0"):
                home = where / f"flush-{rnd}-{mib}-{writeback}"
                st = Storage(home)
                st.create_pool("f", capacity=8 << 30)
                st.pool("f").create_volume("r", 64 * MIB)
                st.pool("f").create_volume("w", 4 << 30)
                st.close()
                srv = CrashServer(home, env={"VIRTUA_WRITEBACK_MIB": writeback}).start()
                try:
                    r = measure(srv.port, "f/r", "f/w", home, dirty_bytes=mib * MIB, seconds=seconds)
                finally:
                    srv.kill()
                ratio = r.flush_p99_us / r.idle_p99_us if r.idle_p99_us else 0.0
                label = "8 MiB" if writeback == "8" else "off"
                print(f"  {label:>9} {mib:>5}MiB {r.idle_p50_us:>7.0f}us {r.idle_p99_us:>7.0f}us "
                      f"{r.flush_p50_us:>7.0f}us {r.flush_p99_us:>7.0f}us {ratio:>8.1f}x {r.busy_p99_us:>7.0f}us "
                      f"{r.flushes:>7} {r.flush_ms:>8.1f} {r.flush_reads:>6}", flush=True)
                shutil.rmtree(home, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench crash", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kill-points", type=int, default=200)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--dir", type=Path, default=None, help="where the pools live (default: a temp dir)")
    ap.add_argument("--dirty", default="64,512", help="MiB written before each FLUSH, comma-separated")
    ap.add_argument("--seconds", type=float, default=6.0, help="length of each fio run")
    ap.add_argument("--serve", action="store_true", help="kill the whole `virtua serve` (API, manager, CA) "
                    "instead of the lean crash server (same NBD server, storage and operations)")
    args = ap.parse_args(argv)
    dirty = [int(x) for x in args.dirty.split(",") if x]
    print(f"crash: {args.kill_points} kill points, seed {args.seed}", flush=True)

    def run(where: Path) -> int:
        rc = run_kill_points(args.kill_points, args.seed, where, args.serve) if args.kill_points else 0
        if dirty:
            run_flush_isolation(dirty, args.seconds, where)
        return rc

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return run(args.dir)
    with tempfile.TemporaryDirectory(prefix="virtua-crash-") as d:
        return run(Path(d))
