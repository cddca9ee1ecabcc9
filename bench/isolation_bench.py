"""Does admin work stall the guests' disks? ``python -m bench isolation [--data 1G] [--seconds 8]``

One `virtua serve`; fio reads 4 KiB at random, queue depth 8, from export p/guest (a
guest's disk) while one admin operation runs against other volumes of the same pool, and
alone (idle) between them, alternating. Printed per operation: fio's IOPS and p99.9 and
maximum completion latency, against the idle run just before it (issue 13's goal: p99.9
within 2x of idle, IOPS within 20%).

Operations: `volume import` of DATA of random bytes (a raw file through the admin NBD
socket), `clone --count 200`, `volume flatten` of a clone of a DATA volume, `pool check`.
Each runs back to back, over and over, for the length of the fio run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.io_bench import VIRTUA, free_port


def fio(uri: str, seconds: float) -> dict[str, float]:
    p = subprocess.run(
        ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}", "--rw=randread", "--bs=4k", "--iodepth=8",
         "--size=64M", "--time_based", f"--runtime={seconds}", "--ramp_time=1", "--output-format=json",
         "--percentile_list=50:99:99.9"],
        capture_output=True, text=True, check=True,
    )
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]["read"]
    pct = job["clat_ns"]["percentile"]
    return {"iops": job["iops"], "p99": pct["99.000000"] / 1e3, "p999": pct["99.900000"] / 1e3,
            "max": job["clat_ns"]["max"] / 1e3}


def _repeat(once: Callable[[], None], stop: threading.Event, done: dict[str, int]) -> None:
    while not stop.is_set():
        once()
        done["n"] += 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench isolation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="1G")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--dir", default="/var/tmp/virtua-isolation-bench")
    ap.add_argument("--only", action="append", choices=["import", "clone", "flatten", "check", "cli"],
                    help="run only this operation (repeatable; default: all)")
    ap.add_argument("--rounds", type=int, default=1, help="idle/busy pairs per operation")
    args = ap.parse_args(argv)
    from virtua.units import format_size, parse_size

    data = parse_size(args.data)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    env = dict(os.environ, VIRTUA_HOME=str(work / "home"))

    def v(*a: str) -> None:
        subprocess.run([*VIRTUA, *a], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    image = work / "img.raw"
    with open(image, "wb") as f:
        for _ in range(data >> 24):
            f.write(os.urandom(16 << 20))
    v("pool", "create", "p", "--capacity", format_size(8 * data), "--overcommit", "400")  # 200 clones of DATA
    port = free_port()
    serve = subprocess.Popen([*VIRTUA, "serve", "--no-agent", "--listen", f"127.0.0.1:{port}",
                              "--api-listen", f"127.0.0.1:{free_port()}"], env=env,
                             stdout=subprocess.PIPE, text=True,
                             # VIRTUA_BENCH_SERVE_LOG=FILE keeps serve's log (e.g. with
                             # VIRTUA_SLOW_CALLBACK_MS=15: each callback that held the loop longer)
                             stderr=open(os.environ.get("VIRTUA_BENCH_SERVE_LOG", os.devnull), "w"))
    assert serve.stdout is not None and serve.stdout.readline().startswith("VIRTUA_READY")
    try:
        guest = work / "guest.raw"
        with open(image, "rb") as src, open(guest, "wb") as dst:
            dst.write(src.read(64 << 20))
        v("volume", "import", str(guest), "p/guest")
        v("volume", "import", str(image), "p/base")
        v("snapshot", "create", "p/base@s")
        uri = f"nbd://127.0.0.1:{port}/p/guest"
        n = {"i": 0}

        def import_once() -> None:
            n["i"] += 1
            v("volume", "import", str(image), f"p/imp{n['i']}")
            v("volume", "rm", f"p/imp{n['i']}", "--now")

        def clones_once() -> None:
            n["i"] += 1
            v("snapshot", "create", f"p/base@c{n['i']}")
            v("clone", f"p/base@c{n['i']}", f"p/c{n['i']}", "--count", "200")
            v("snapshot", "rm", f"p/base@c{n['i']}", "--recursive")

        def flatten_once() -> None:
            n["i"] += 1
            v("clone", "p/base@s", f"p/f{n['i']}")
            v("volume", "flatten", f"p/f{n['i']}")
            v("volume", "rm", f"p/f{n['i']}", "--now")

        def check_once() -> None:
            v("pool", "check", "p")

        def cli_once() -> None:  # the floor: a CLI process that asks for almost nothing
            v("pool", "info", "p")

        ops = {f"import {format_size(data)}": import_once, "clone --count 200": clones_once,
               f"flatten a {format_size(data)} clone": flatten_once, "pool check": check_once,
               "cli pool info (the CLI alone)": cli_once}
        if args.only:
            ops = {k: f for k, f in ops.items() if k.split()[0] in args.only}
        print(f"fio randread 4k QD8 on p/guest, {args.seconds:g} s per run; idle run before each operation")
        print("| operation | idle IOPS | IOPS during | ratio | idle p99.9 us | p99.9 during us | ratio | max during us | ops done |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, once in [(k, f) for k, f in ops.items() for _ in range(args.rounds)]:
            idle = fio(uri, args.seconds)
            stop = threading.Event()
            done = {"n": 0}

            t = threading.Thread(target=_repeat, args=(once, stop, done))
            t.start()
            time.sleep(0.3)
            busy = fio(uri, args.seconds)
            stop.set()
            t.join()
            print(f"| {name} | {idle['iops']:.0f} | {busy['iops']:.0f} | {busy['iops'] / idle['iops']:.2f}x | "
                  f"{idle['p999']:.0f} | {busy['p999']:.0f} | {busy['p999'] / idle['p999']:.1f}x | "
                  f"{busy['max']:.0f} | {done['n']} |", flush=True)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
