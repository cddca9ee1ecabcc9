"""A/B two NBD servers on one fio workload, taking turns (A, B, A, B, ...).

    .venv/bin/python -m bench nbd-ab --a 'CMD' --b 'CMD' [--export p/vol] [--rw write]
        [--bs 1M] [--depth 8] [--jobs 1] [--pairs 3] [--duration 5] [--where disk]

CMD is a shell command template as in `bench/nbd_bench.py` ({port}, {apiport}, {dir},
{file}, {python}).  Both servers start once, each gets a warm-up run, and then they take
turns: a long-lived server is what users run, and a fresh nbdkit is slower (1 MiB reads
on 2 connections: 2.3 GB/s on its first run, 3.4-3.6 GB/s on the next three).  Two
`virtua serve` over the same pool cannot run at once: give --restart, and each run
starts its server afresh (then compare virtua with virtua only).  The data directory is
the one nbd_bench prepared (`--where`), with its `virtua-home` as VIRTUA_HOME.  Noise on
this machine is up to 45% between runs but much less between two runs back to back, so
each pair's ratio is printed and their median is the answer.  With --restart the server
that runs first in a pair read 2-8% lower here: for small differences run both orders.
To measure older code, check it out (`git worktree add /tmp/old REV`) and give its
server `env PYTHONPATH=/tmp/old {python} -m virtua.cli serve ...`; the servers run in
the data directory, so `python -m` cannot pick up this checkout from the current
directory instead (until 2026-11-22 they ran in the checkout, and such A/B runs
compared the current code with itself).
Example, virtua's thin volume against nbdkit's file plugin:

    python -m bench nbd-ab --rw write --jobs 2 \\
        --a '{python} -m virtua.cli serve --listen 127.0.0.1:{port} --no-agent \\
             --api-listen 127.0.0.1:{apiport}' \\
        --b 'nbdkit -f -i 127.0.0.1 -p {port} file file={file}'
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from bench.nbd_bench import LOCATIONS, Server, run_fio, start, stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", required=True, help="server A command template")
    ap.add_argument("--b", required=True, help="server B command template")
    ap.add_argument("--export", default="p/vol")
    ap.add_argument("--rw", default="write")
    ap.add_argument("--bs", default="1M")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=1, help="fio jobs = NBD connections")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--where", default="disk", choices=sorted(LOCATIONS))
    ap.add_argument("--restart", action="store_true", help="start each server afresh for each run")
    ap.add_argument("--scratch-suffix", default="", help="as nbd_bench's: the data directory's suffix")
    args = ap.parse_args(argv)
    directory = LOCATIONS[args.where] + args.scratch_suffix
    image = os.path.join(directory, "disk.img")
    home = os.path.join(directory, "virtua-home")
    if not os.path.exists(image):
        raise SystemExit(f"{image} is missing: run `python -m bench nbd --where {args.where}` once")
    servers = {n: Server(n, cmd, args.export, env={"VIRTUA_HOME": home}) for n, cmd in (("A", args.a), ("B", args.b))}
    ratios = []
    try:
        if not args.restart:
            for srv in servers.values():
                start(srv, directory, image)
                run_fio(srv, args.rw, args.bs, args.depth, args.jobs, 2)  # warm-up
        for i in range(args.pairs):
            got = {}
            for name, srv in servers.items():
                if args.restart:
                    start(srv, directory, image)
                try:
                    r = run_fio(srv, args.rw, args.bs, args.depth, args.jobs, args.duration)
                finally:
                    if args.restart:
                        stop(srv)
                got[name] = r
                print(f"  pair {i + 1} {name}: {r['mbps']:8.0f} MB/s {r['iops']:9.0f} IOPS "
                      f"cpu {r['cpu']:4.0f}% fio {r['client_ms_per_gb']:4.0f} ms/GB", file=sys.stderr, flush=True)
            ratios.append(got["A"]["mbps"] / got["B"]["mbps"])
    finally:
        for srv in servers.values():
            stop(srv)
    print(f"{args.rw} {args.bs} QD{args.depth} x{args.jobs}: A/B per pair "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
