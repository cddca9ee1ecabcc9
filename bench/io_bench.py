"""Image import/export through the CLI against the tools themselves, in one run.

    .venv/bin/python -m bench io [--data 1G] [--rounds 3] [--dir /var/tmp/virtua-io-bench]

One image (DATA of random bytes followed by half as much hole), raw and qcow2. Each round
times, end to end (the CLI's start-up included), interleaved:

* `virtua volume import/export`, raw and qcow2, offline (the CLI holds the pool and serves
  it to the copy tool on a private in-process NBD socket), through `virtua serve`, and
  through the same serve reached with --api from another home (NBD on TCP, TLS, the admin
  certificate: as from another machine);
* the baselines: `qemu-img convert` qcow2 -> raw file and raw file -> qcow2 of the same
  image on the same filesystem, and nbdcopy between the raw file and serve's NBD export
  directly (with the same flags the CLI gives it: --destination-is-zero --flush on import;
  --flush on export, as durable as the CLI's fsync of the file it writes).

Rows are medians over the rounds; ratio = virtua / baseline (lower is better).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

VIRTUA = [sys.executable, "-m", "virtua.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench io")
    ap.add_argument("--data", default="1G", help="random data in the image (K/M/G); the image is 1.5x that")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/virtua-io-bench")
    ap.add_argument("--no-warm", dest="warm", action="store_false",
                    help="do not hand each command freshly freed memory first (see warm())")
    args = ap.parse_args(argv)
    from virtua.units import format_size, parse_size

    data = parse_size(args.data)
    work = Path(args.dir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw, qcow = work / "img.raw", work / "img.qcow2"
    with open(raw, "wb") as f:
        left = data
        while left:
            f.write(os.urandom(min(left, 16 << 20)))
            left -= min(left, 16 << 20)
        f.truncate(data + data // 2)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    homes = {"offline": work / "h-offline", "serve": work / "h-serve"}
    envs = {k: dict(os.environ, VIRTUA_HOME=str(h)) for k, h in homes.items()}
    for env in envs.values():
        subprocess.run([*VIRTUA, "pool", "create", "p", "--capacity", format_size(4 * data)], env=env, check=True,
                       stdout=subprocess.DEVNULL)
    nbd_port, api_port = free_port(), free_port()
    serve = subprocess.Popen([*VIRTUA, "serve", "--no-agent", "--listen", f"127.0.0.1:{nbd_port}",
                              "--api-listen", f"127.0.0.1:{api_port}"], env=envs["serve"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert serve.stdout is not None and serve.stdout.readline().startswith("VIRTUA_READY")
    # "remote": the same serve reached as from another machine (--api, its own empty home):
    # the data goes over NBD on TCP with TLS and the admin certificate
    admin = homes["serve"] / "pki" / "admin"
    envs["remote"] = dict(os.environ, VIRTUA_HOME=str(work / "h-remote"))
    prefix = {"offline": [], "serve": [], "remote": ["--api", f"https://127.0.0.1:{api_port}", "--cert", str(admin)]}
    sock = homes["serve"] / "private" / "nbd.sock"
    out = work / "out"
    times: dict[str, list[float]] = {}

    # in memory whatever --dir is: on a disk, 2 GiB of ballast was 2 GiB of writeback that
    # the next command (and its baseline, unevenly) then competed with
    ballast = Path("/dev/shm") / f"virtua-io-bench-ballast-{os.getpid()}"
    zeros = bytes(16 << 20)

    def warm() -> None:
        """Give the next command memory that was just freed. This VM returns pages free for
        a second or two to its host (virtio-balloon free page reporting), and taking them
        back costs ~2.5 s per GiB against ~0.7 s for pages freed a moment ago: whichever
        command ran right after a removal was 2-4x faster than the same one after a pause.
        First sync: what the last command left dirty is not written back under the next one."""
        os.sync()
        with open(ballast, "wb") as f:
            for _ in range(2 * data // len(zeros) + 1):
                f.write(zeros)
        ballast.unlink()

    def run(name: str, cmd: list[str], env: dict[str, str], after: list[list[str]] | None = None) -> None:
        if args.warm:
            warm()
        times.setdefault(name, []).append(timed(cmd, env))
        for c in after or []:
            subprocess.run(c, env=env, check=True, stdout=subprocess.DEVNULL)
        for p in (out, Path(f"{out}.qcow2")):
            p.unlink(missing_ok=True)

    try:
        for _ in range(args.rounds):
            for mode, env in envs.items():
                cli = [*VIRTUA, *prefix[mode]]
                for fmt, img in (("raw", raw), ("qcow2", qcow)):
                    run(f"import {fmt} {mode}", [*cli, "volume", "import", str(img), "p/v"], env)
                    dest = str(out) if fmt == "raw" else f"{out}.qcow2"
                    run(f"export {fmt} {mode}", [*cli, "volume", "export", "p/v", dest, "-O", fmt], env)
                    # like for like with qemu-img convert and nbdcopy without --flush: no fsync
                    run(f"export {fmt} {mode} --no-sync", [*cli, "volume", "export", "p/v", dest, "-O", fmt,
                                                          "--no-sync"], env,
                        after=[[*cli, "volume", "rm", "p/v", "--now"]])
            env = envs["serve"]
            uri = f"nbd+unix:///p/v?socket={sock}"
            tls_uri = f"nbds://127.0.0.1:{nbd_port}/p/v?tls-certificates={admin}"
            subprocess.run([*VIRTUA, "volume", "create", "p/v", "--size", str(raw.stat().st_size)], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            run("import raw: nbdcopy", ["nbdcopy", "--destination-is-zero", "--flush", str(raw), uri], env)
            # --flush: as durable as the CLI's export, which fsyncs the file before renaming it into place
            run("export raw: nbdcopy", ["nbdcopy", "--flush", uri, str(out)], env,
                after=[[*VIRTUA, "volume", "rm", "p/v", "--now"]])
            subprocess.run([*VIRTUA, "volume", "create", "p/v", "--size", str(raw.stat().st_size)], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            run("import raw: nbdcopy over TLS", ["nbdcopy", "--destination-is-zero", "--flush", str(raw), tls_uri], env)
            run("export raw: nbdcopy over TLS", ["nbdcopy", "--flush", tls_uri, str(out)], env,
                after=[[*VIRTUA, "volume", "rm", "p/v", "--now"]])
            run("import qcow2: qemu-img", ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow), str(out)], env)
            run("export qcow2: qemu-img", ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), f"{out}.qcow2"], env)
            # the same tool straight to and from serve's NBD socket: the CLI's own cost is the
            # difference; and the export baseline made as durable as the CLI's (fsync)
            subprocess.run([*VIRTUA, "volume", "create", "p/v", "--size", str(raw.stat().st_size)], env=env,
                           check=True, stdout=subprocess.DEVNULL)
            run("import qcow2: qemu-img to NBD",
                ["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(qcow), uri], env)
            run("export qcow2: qemu-img from NBD",
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri, f"{out}.qcow2"], env,
                after=[[*VIRTUA, "volume", "rm", "p/v", "--now"]])
            run("export qcow2: qemu-img + fsync",
                ["sh", "-c", f'qemu-img convert -f raw -O qcow2 "{raw}" "{out}.qcow2" && sync "{out}.qcow2"'], env)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"image: {format_size(data)} of random data + {format_size(data // 2)} hole; {args.rounds} rounds; "
          f"seconds (median), ratio to the baseline")
    def paired(name: str, base: str) -> float:
        """The median of the rounds' ratios: each round's command against its own baseline."""
        return statistics.median(a / b for a, b in zip(times[name], times[base], strict=True))

    print("| operation | offline s | via serve s | --api (TLS) s | baseline | baseline s | offline / base "
          "| serve / base | --api / base | serve / base, paired | --api / base, paired |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for op, base in (("import raw", "import raw: nbdcopy"), ("export raw", "export raw: nbdcopy"),
                     ("import qcow2", "import qcow2: qemu-img"), ("export qcow2", "export qcow2: qemu-img")):
        off, srv, rem, b = med[f"{op} offline"], med[f"{op} serve"], med[f"{op} remote"], med[base]
        print(f"| {op} | {off:.2f} | {srv:.2f} | {rem:.2f} | {base.split(': ')[1]} | {b:.2f} | {off / b:.2f}x "
              f"| {srv / b:.2f}x | {rem / b:.2f}x | {paired(f'{op} serve', base):.2f}x "
              f"| {paired(f'{op} remote', base):.2f}x |")
    print("rounds (serve / base):", {op: [round(a / b, 2) for a, b in zip(times[f"{op} serve"], times[base], strict=True)]
                                     for op, base in (("import qcow2", "import qcow2: qemu-img"),
                                                      ("export qcow2", "export qcow2: qemu-img"),
                                                      ("import raw", "import raw: nbdcopy"),
                                                      ("export raw", "export raw: nbdcopy"))})
    print()
    print("export --no-sync (the file left in the page cache, as qemu-img convert leaves it):")
    for fmt, base in (("raw", "export raw: nbdcopy"), ("qcow2", "export qcow2: qemu-img")):
        off, srv = med[f"export {fmt} offline --no-sync"], med[f"export {fmt} serve --no-sync"]
        print(f"| export {fmt} --no-sync | {off:.2f} | {srv:.2f} | {base.split(': ')[1]} | {med[base]:.2f} | "
              f"{off / med[base]:.2f}x | {srv / med[base]:.2f}x |")
    print()
    print("the same tool straight to/from serve's NBD socket, and a durable baseline:")
    for name in ("import qcow2: qemu-img to NBD", "export qcow2: qemu-img from NBD", "export qcow2: qemu-img + fsync"):
        op = name.split(":")[0]
        print(f"| {name} | {med[name]:.2f} s | virtua via serve / this: {med[f'{op} serve'] / med[name]:.2f}x |")
    for name in ("import raw: nbdcopy over TLS", "export raw: nbdcopy over TLS"):
        op = name.split(":")[0]
        print(f"| {name} | {med[name]:.2f} s | virtua --api / this: {med[f'{op} remote'] / med[name]:.2f}x |")
    shutil.rmtree(work, ignore_errors=True)
    return 0
