#!/usr/bin/env python3
"""Benchmark virtua's NBD server against qemu-nbd and nbdkit's file plugin with fio.

    .venv/bin/python bench/nbd_bench.py [--duration 10] [--size 1G] [--where tmpfs,disk]
        [--servers virtua-vol,virtua-clone,virtua,qemu-nbd,nbdkit] [--rounds 3]
        [--add-server 'mine=python -m virtua.nbd --provider mymod:make --port {port}@vol1']

Servers (all on the same backing filesystem, one per --where):

* virtua-vol: `virtua serve` (a temp VIRTUA_HOME in the backing dir) exporting a thin
  storage-engine volume p/vol, filled with the test data by `virtua volume import`.
* virtua-clone: the same `virtua serve` process exporting p/clone, a clone of the template
  p/tmpl@s (template filled with the test data).  Reads hit the template's chunks; the
  first write to each chunk is a copy-on-write, later rounds overwrite the clone's own.
* virtua: `python -m virtua.nbd --dir`, virtua's NBD server over the plain file.
* qemu-nbd and nbdkit (file plugin) over the plain file.
* nbdkit-memory: nbdkit's memory plugin (no file system, no page cache): with
  --ceiling, the upper bound of an NBD server on this machine, beside the loopback
  TCP throughput of one and two plain socket streams (what is left once the storage and
  the protocol cost nothing).
* virtua-vol-tls: the virtua-vol process and export over TLS (nbds://, the cluster CA's
  admin certificate as client certificate); nbdkit-tls: nbdkit --tls=require
  --tls-verify-peer with the same CA and the manager's certificate.  Both pairs show what
  TLS costs on the data path.

Every export holds the same random data, so reads never hit holes.  Each server gets a
2 s warm-up run before the first measured one.  Runs are interleaved
(workload by workload, server by server, rotating the order each round) because
run-to-run noise on this machine is large; with --rounds N each row is the median of N
runs.  Server CPU is measured from /proc/PID/stat (utime+stime) over each fio run, as %
of one core.  The fio job files' latencies are completion latencies (clat).

--add-server NAME=CMD@EXPORT adds a server (e.g. one exporting a storage-engine volume):
CMD is a shell command template with {port}, {dir} and {file}; EXPORT is the export name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

WORKLOADS = [  # name, rw, bs, iodepth
    ("seq-read 1M QD8", "read", "1M", 8),
    ("seq-write 1M QD8", "write", "1M", 8),
    ("rand-read 4K QD32", "randread", "4k", 32),
    ("rand-write 4K QD32", "randwrite", "4k", 32),
]
LOCATIONS = {"tmpfs": "/dev/shm/virtua-nbd-bench", "disk": "/var/tmp/virtua-nbd-bench"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    cmd: str  # template
    export: str
    proc: subprocess.Popen | None = None
    port: int = 0
    results: dict = field(default_factory=dict)
    share: str = ""  # name of another server whose process (and port) this one uses
    env: dict = field(default_factory=dict)
    log: str = ""
    restarts: int = 0
    tls_dir: str = ""  # client credentials: the run uses nbds:// with them (template: {home})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


def start(srv: Server, directory: str, file: str) -> None:
    srv.port = free_port()
    cmd = srv.cmd.format(
        port=srv.port, dir=directory, file=file, python=sys.executable, apiport=free_port(),
        size=os.path.getsize(file),
    )
    srv.log = os.path.join(directory, f"{srv.name}.log")
    with open(srv.log, "ab") as log:
        srv.proc = subprocess.Popen(
            # not the checkout as cwd: `python -m` puts the cwd first on sys.path, so a server meant to
            # run other code (PYTHONPATH=/tmp/old) would import this checkout instead
            ["/bin/sh", "-c", "exec " + cmd], cwd=directory, stdout=log, stderr=log,
            env={**os.environ, **srv.env},
        )
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=0.5).close()
            return
        except OSError:
            if srv.proc.poll() is not None:
                raise SystemExit(f"{srv.name} exited at startup: {cmd}") from None
            time.sleep(0.1)
    raise SystemExit(f"{srv.name} did not start: {cmd}")


def stop(srv: Server) -> None:
    if srv.share:
        srv.proc = None
        return
    if srv.proc is not None and srv.proc.poll() is None:
        srv.proc.terminate()
        try:
            srv.proc.wait(15)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()


def ensure_running(owner: Server, directory: str, file: str) -> None:
    """Restart a server that died (other users of this machine sometimes kill processes by
    name); say so on stderr, with the tail of its log."""
    if owner.proc is not None and owner.proc.poll() is None:
        return
    tail = ""
    if owner.log and os.path.exists(owner.log):
        with open(owner.log, errors="replace") as f:
            tail = "".join(f.readlines()[-5:])
    print(f"  !! {owner.name} exited (status {owner.proc.poll() if owner.proc else None}); restarting. "
          f"Log tail:\n{tail}", file=sys.stderr, flush=True)
    owner.restarts += 1
    start(owner, directory, file)


def run_fio(srv: Server, rw: str, bs: str, depth: int, conns: int, duration: int) -> dict:
    assert srv.proc is not None
    uri = f"nbd://127.0.0.1:{srv.port}/{srv.export}"
    wrap: list[str] = []
    if srv.tls_dir:
        # fio's nbd engine refuses ?tls-certificates= (a local file) and libnbd run by root
        # reads /etc/pki/libnbd: give fio that directory in a private mount namespace, on
        # an overlay of /etc (the machine's /etc is not touched)
        tls_dir = srv.tls_dir.format(home=srv.env.get("VIRTUA_HOME", ""))
        ov = Path(tls_dir).parent / "fio-etc"
        for d in ("upper", "work"):
            (ov / d).mkdir(parents=True, exist_ok=True)
        wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mount -t overlay overlay -o lowerdir=/etc,upperdir={ov}/upper,workdir={ov}/work /etc"
                f" && mkdir -p /etc/pki && ln -sfn {tls_dir} /etc/pki/libnbd && exec \"$@\"", "sh"]
        uri = f"nbds://127.0.0.1:{srv.port}/{srv.export}"
    args = [
        *wrap, "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={depth}", f"--numjobs={conns}", "--group_reporting", "--time_based",
        f"--runtime={duration}", "--ramp_time=1", "--output-format=json",
    ]
    t0, c0 = time.monotonic(), cpu_ticks(srv.proc.pid)
    u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(args, capture_output=True, text=True)
    u1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t1, c1 = time.monotonic(), cpu_ticks(srv.proc.pid)
    if p.returncode != 0 or "{" not in p.stdout:
        raise SystemExit(f"fio failed against {srv.name}:\n{p.stdout}\n{p.stderr}")
    job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "mbps": side["bw_bytes"] / 1e6,
        "iops": side["iops"],
        "p99_us": pct.get("99.000000", 0) / 1000,
        "cpu": 100.0 * (c1 - c0) / CLK_TCK / (t1 - t0),
        # fio's own CPU per GB moved: what the server's replies cost the client (on this
        # 2-core machine both share the cores, so a cheaper server can still lose)
        "client_ms_per_gb": 1e3 * (u1.ru_utime + u1.ru_stime - u0.ru_utime - u0.ru_stime)
        / max(side["bw_bytes"] * (t1 - t0) / 1e9, 1e-9),  # fio's ramp-up moves data too
    }


def loopback_mbps(streams: int, seconds: float) -> float:
    """MB/s of `streams` TCP connections over loopback, each a thread sending 1 MiB
    buffers and a thread receiving them (send and recv drop the GIL: what this measures
    is the kernel's two copies and TCP, the floor any NBD reply pays)."""
    import threading

    buf = bytes(1 << 20)
    total = [0] * streams
    stop_at = time.monotonic() + seconds
    threads: list[threading.Thread] = []
    socks: list[socket.socket] = []
    for i in range(streams):
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        tx = socket.create_connection(ls.getsockname())
        rx, _ = ls.accept()
        ls.close()
        socks += [tx, rx]

        def send(tx: socket.socket = tx) -> None:
            with contextlib.suppress(OSError):
                while time.monotonic() < stop_at:
                    tx.sendall(buf)
            tx.close()

        def recv(rx: socket.socket = rx, i: int = i) -> None:
            mv = memoryview(bytearray(1 << 20))
            while n := rx.recv_into(mv):
                total[i] += n

        threads += [threading.Thread(target=send), threading.Thread(target=recv)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    return sum(total) / elapsed / 1e6


def prepare(directory: str, size: int) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "disk.img")
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        chunk = os.urandom(1 << 20)
        with open(path, "wb") as f:
            for _ in range(size >> 20):
                f.write(chunk)
    return path


VIRTUA = os.path.join(os.path.dirname(sys.executable), "virtua")


def prepare_storage(directory: str, image: str, size: int) -> str:
    """A fresh VIRTUA_HOME in `directory`: pool p holding p/vol and p/clone (of p/tmpl@s),
    both with the contents of `image`.  Returns the home."""
    home = os.path.join(directory, "virtua-home")
    shutil.rmtree(home, ignore_errors=True)
    env = {**os.environ, "VIRTUA_HOME": home}
    cap = f"{(4 * size) >> 20}M"
    steps = [
        ["pool", "create", "p", "--capacity", cap],
        ["volume", "import", image, "p/vol"],
        ["volume", "import", image, "p/tmpl"],
        ["snapshot", "create", "p/tmpl@s"],
        ["clone", "p/tmpl@s", "p/clone"],
    ]
    for step in steps:
        p = subprocess.run([VIRTUA, *step], env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"virtua {' '.join(step)} failed:\n{p.stdout}\n{p.stderr}")
    # the cluster CA `virtua serve` would make, made now: nbdkit-tls serves with the
    # manager's certificate too, so both TLS rows do the same handshake and ciphers
    from virtua.pki.ca import ClusterCA

    ca = ClusterCA.ensure(Path(home) / "pki", manager_sans=["127.0.0.1", "localhost"])
    certs = Path(directory) / "nbdkit-certs"
    certs.mkdir(mode=0o700, exist_ok=True)
    for name, src in (("ca-cert.pem", ca.manager.ca), ("server-cert.pem", ca.manager.cert),
                      ("server-key.pem", ca.manager.key)):
        shutil.copyfile(src, certs / name)
        os.chmod(certs / name, 0o600)
    return home


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--where", default="tmpfs,disk", help="tmpfs,disk")
    ap.add_argument("--servers", default="virtua-vol,virtua-vol-tls,virtua-clone,virtua,qemu-nbd,nbdkit,nbdkit-tls")
    ap.add_argument("--conns", default="1,2")
    ap.add_argument("--workloads", default="all", help="comma list of indexes 0-3, or all")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--virtua-cmd", default="{python} -m virtua.nbd --dir {dir} --port {port}")
    ap.add_argument("--add-server", action="append", default=[], metavar="NAME=CMD@EXPORT")
    ap.add_argument("--json-out", help="also write raw results here")
    ap.add_argument("--ceiling", action="store_true",
                    help="also measure loopback TCP (1 and 2 streams) once per --where, after the runs")
    ap.add_argument("--scratch-suffix", default="",
                    help="append this to the data directories (another user's bench may use the default ones)")
    args = ap.parse_args()

    for b in ("fio", "qemu-nbd", "nbdkit"):
        if not shutil.which(b):
            raise SystemExit(f"{b} is required")
    serve = ("{python} -m virtua.cli serve --listen 127.0.0.1:{port} --no-agent "
             "--api-listen 127.0.0.1:{apiport}")
    known = {
        "virtua-vol": Server("virtua-vol", serve, "p/vol"),
        "virtua-clone": Server("virtua-clone", serve, "p/clone", share="virtua-vol"),
        "virtua": Server("virtua", args.virtua_cmd, "disk.img"),
        "qemu-nbd": Server("qemu-nbd", "qemu-nbd -f raw -x disk.img -p {port} -b 127.0.0.1 -t -e 16 "
                           "--cache=writeback --aio=threads {file}", "disk.img"),
        "nbdkit": Server("nbdkit", "nbdkit -f -i 127.0.0.1 -p {port} file file={file}", ""),
        "nbdkit-memory": Server("nbdkit-memory", "nbdkit -f -i 127.0.0.1 -p {port} memory size={size}", ""),
        # TLS 1.3 with client certificates from the cluster CA (the admin's), both sides
        "virtua-vol-tls": Server("virtua-vol-tls", serve, "p/vol", share="virtua-vol",
                                 tls_dir="{home}/pki/admin"),
        "nbdkit-tls": Server("nbdkit-tls", "nbdkit -f -i 127.0.0.1 -p {port} --tls=require "
                             "--tls-certificates={dir}/nbdkit-certs --tls-verify-peer file file={file}", "",
                             tls_dir="{home}/pki/admin"),
    }
    servers = [known[n] for n in args.servers.split(",") if n]
    if any(s.share == "virtua-vol" for s in servers) and known["virtua-vol"] not in servers:
        servers.insert(0, known["virtua-vol"])
    for spec in args.add_server:
        name, _, rest = spec.partition("=")
        cmd, _, export = rest.rpartition("@")
        servers.append(Server(name, cmd, export))
    size = parse_size(args.size)
    workloads = WORKLOADS if args.workloads == "all" else [WORKLOADS[int(i)] for i in args.workloads.split(",")]
    conns_list = [int(c) for c in args.conns.split(",")]
    rows = []
    ceilings: dict[tuple[str, int], float] = {}
    for where in args.where.split(","):
        directory = LOCATIONS[where] + args.scratch_suffix
        path = prepare(directory, size)
        if any(s.name.startswith("virtua-") or s.tls_dir for s in servers):
            home = prepare_storage(directory, path, size)
            for s in servers:
                s.env = {"VIRTUA_HOME": home}
        byname = {s.name: s for s in servers}
        for s in servers:
            if s.share:
                continue
            start(s, directory, path)
        for s in servers:
            if s.share:
                s.proc, s.port = byname[s.share].proc, byname[s.share].port
        # A warm-up run each: a fresh nbdkit serves 1 MiB reads at 2/3 of its later speed.
        for s in servers:
            run_fio(s, "read", "1M", 8, 1, 2)
        try:
            for wname, rw, bs, depth in workloads:
                for conns in conns_list:
                    acc: dict[str, list[dict]] = {s.name: [] for s in servers}
                    for rnd in range(args.rounds):
                        order = servers[rnd % len(servers):] + servers[: rnd % len(servers)]
                        for s in order:
                            owner = byname[s.share] if s.share else s
                            for attempt in (1, 2):
                                ensure_running(owner, directory, path)
                                for x in servers:
                                    if x.share:
                                        x.proc, x.port = byname[x.share].proc, byname[x.share].port
                                try:
                                    r = run_fio(s, rw, bs, depth, conns, args.duration)
                                    break
                                except SystemExit:
                                    if attempt == 2 or (owner.proc is not None and owner.proc.poll() is None):
                                        raise
                            acc[s.name].append(r)
                            print(f"  {where:5} {wname:18} c={conns} {s.name:9} {r['mbps']:8.0f} MB/s "
                                  f"{r['iops']:9.0f} IOPS p99 {r['p99_us']:8.0f} us cpu {r['cpu']:4.0f}% "
                                  f"fio {r['client_ms_per_gb']:4.0f} ms/GB",
                                  file=sys.stderr, flush=True)
                    for s in servers:
                        rs = acc[s.name]
                        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                        rows.append({"where": where, "workload": wname, "conns": conns, "server": s.name,
                                     "runs": [r["mbps"] for r in rs], **med})
        finally:
            for s in servers:
                stop(s)
        if args.ceiling:
            for conns in conns_list:
                ceilings[(where, conns)] = loopback_mbps(conns, max(args.duration, 2))
    ref = {(r["where"], r["workload"], r["conns"]): r["mbps"] for r in rows if r["server"] == "nbdkit"}
    print(f"Medians of {args.rounds} run(s) of {args.duration} s each.\n")
    for (where, conns), mbps in ceilings.items():
        print(f"Loopback TCP ceiling ({where} run, {conns} stream(s)): {mbps:.0f} MB/s")
    if ceilings:
        print()
    print("| where | workload | conns | server | MB/s | IOPS | p99 (us) | server CPU % | fio CPU ms/GB | vs nbdkit |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = ref.get((r["where"], r["workload"], r["conns"]))
        ratio = f"{r['mbps'] / base:.2f}x" if base else "-"
        print(f"| {r['where']} | {r['workload']} | {r['conns']} | {r['server']} | {r['mbps']:.0f} | "
              f"{r['iops']:.0f} | {r['p99_us']:.0f} | {r['cpu']:.0f} | {r.get('client_ms_per_gb', 0):.0f} | {ratio} |")
    # compact side-by-side view: MB/s per server, ratio to nbdkit
    names = [s.name for s in servers]
    print("\n| where | workload | conns | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---:|" * len(names))
    keys = list(dict.fromkeys((r["where"], r["workload"], r["conns"]) for r in rows))
    by = {(r["where"], r["workload"], r["conns"], r["server"]): r for r in rows}
    for k in keys:
        base = ref.get(k)
        cells = []
        for n in names:
            r = by[(*k, n)]
            cells.append(f"{r['mbps']:.0f} ({r['mbps'] / base:.2f}x)" if base and n != "nbdkit" else f"{r['mbps']:.0f}")
        print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    # Paired view: each round ran every server back to back, so the ratio within a round
    # is less exposed to the machine's slow drifts than the ratio of the medians.
    if any(s.name == "nbdkit" for s in servers) and args.rounds > 1:
        others = [n for n in names if n != "nbdkit"]
        print("\nMedian over rounds of (server / nbdkit in the same round), and the rounds' ratios:\n")
        print("| where | workload | conns | " + " | ".join(others) + " |")
        print("|---|---|---|" + "---:|" * len(others))
        for k in keys:
            nb = by[(*k, "nbdkit")]["runs"]
            cells = []
            for n in others:
                rr = [a / b for a, b in zip(by[(*k, n)]["runs"], nb, strict=True) if b]
                cells.append(f"{statistics.median(rr):.2f}x ({', '.join(f'{x:.2f}' for x in rr)})")
            print(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(cells) + " |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
