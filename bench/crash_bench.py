"""Crash safety under kill -9: ``python -m bench crash [--kill-points 200] [--seed N]``.

Runs tests/helpers/crash_workload.py's random workload (writes, zeroes, trims, flushes,
FUA writes, snapshots, clones, removals, flatten over up to 6 volumes of one pool) through
the real NBD server and operations, kills the server with SIGKILL at random moments,
restarts it and checks every byte of every volume and snapshot against the model.
Prints kill points tried, operations, bytes checked and violations by kind (goal: 0).
The pool lives in --dir (default: a new directory under /tmp).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_kill_points(kill_points: int, seed: int, where: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.helpers.crash_workload import CrashWorkload

    work = CrashWorkload(where / "home", seed=seed)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench crash", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kill-points", type=int, default=200)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--dir", type=Path, default=None, help="where the pool lives (default: a temp dir)")
    args = ap.parse_args(argv)
    print(f"crash: {args.kill_points} kill points, seed {args.seed}", flush=True)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return run_kill_points(args.kill_points, args.seed, args.dir)
    with tempfile.TemporaryDirectory(prefix="virtua-crash-") as d:
        return run_kill_points(args.kill_points, args.seed, Path(d))
