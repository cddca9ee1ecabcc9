"""The manager's admin operations on its two stores, in one run: `vc create` of 8 nodes
(no boot) and `vc destroy`, with the cluster state in SQLite (`manager.db`) and in a
3-member etcd cluster (`virtua lab up --hosts 3 --etcd`: one member per host namespace,
TLS), alternating store by store; then an etcd quorum loss as serve's loop sees it (two
members frozen 15 s: the longest answer of `GET /v1/status` on serve's socket, asked every
0.1 s, against before the freeze; then the time from the thaw until a write succeeds);
then etcd's leader failover as a client sees it (the etcd leader killed, time until a
write through `virtua` succeeds).

    python -m bench store [--rounds 3] [--nodes 8]

One lab, one VIRTUA_HOME (one set of pools and one cluster CA); serve is restarted with or
without `--etcd` for each store, its agents re-register. Each figure is the whole CLI
command, end to end (its start-up included), median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from virtua.net.lab import Lab


class Run:
    def __init__(self, home: Path, tag: str, prefix: str) -> None:
        self.home, self.tag, self.prefix = home, tag, prefix
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        self.serve: subprocess.Popen[str] | None = None
        self.up: dict[str, Any] = {}

    def cli(self, *args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args, "--json"], env=self.env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"virtua {' '.join(args)}: {r.stderr}")
        return json.loads(r.stdout) if r.stdout.strip() else None

    def timed(self, *args: str) -> float:
        t = time.perf_counter()
        self.cli(*args)
        return time.perf_counter() - t

    def start_serve(self, etcd: bool) -> None:
        cmd = self.up["serve"].split()[1:]
        if not etcd:
            cmd = cmd[: cmd.index("--etcd")]  # and its --etcd-max-txn-ops
        self.serve = subprocess.Popen([sys.executable, "-m", "virtua.cli", *cmd], env=self.env,
                                      stdout=subprocess.PIPE, stderr=open(self.home / "serve.log", "a"), text=True,
                                      start_new_session=True)
        assert self.serve.stdout is not None
        line = self.serve.stdout.readline()
        if not line.startswith("VIRTUA_READY"):
            raise RuntimeError(f"serve did not start: {line}")
        deadline = time.monotonic() + 90
        while not ((hosts := self.cli("host", "list")) and sum(h["alive"] for h in hosts) == 3):
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents did not register: {hosts}")
            time.sleep(0.3)

    def stop_serve(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            self.serve.wait(30)
        self.serve = None

    def status_latencies(self, seconds: float) -> list[float]:
        """How long serve's loop takes to answer GET /v1/status, asked every 0.1 s."""
        from virtua.cli.client import _UnixHTTPConnection

        out = []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            c = _UnixHTTPConnection(str(self.home / "virtua.sock"), timeout=60)
            t = time.perf_counter()
            c.request("GET", "/v1/status")
            c.getresponse().read()
            out.append(time.perf_counter() - t)
            c.close()
            time.sleep(0.1)
        return out

    def etcd_pid(self, host: str) -> int:
        return int((self.home / "lab" / host / "etcd" / "etcd.pid").read_text())

    def etcd_leader(self) -> tuple[str, int]:
        """(host, pid) of the etcd member that leads now."""
        import ssl

        creds = self.home / "pki" / "etcd" / "manager"
        ctx = ssl.create_default_context(cafile=str(self.home / "pki" / "etcd" / "ca-cert.pem"))
        ctx.load_cert_chain(creds / "client-cert.pem", creds / "client-key.pem")
        for entry in self.up["etcd"]:
            host, url = entry.split()
            req = urllib.request.Request(f"{url}/v3/maintenance/status", data=b"{}", method="POST")
            with urllib.request.urlopen(req, timeout=3, context=ctx) as r:
                s = json.loads(r.read())
            if s["leader"] == s["header"]["member_id"]:
                return host, int((self.home / "lab" / host / "etcd" / "etcd.pid").read_text())
        raise RuntimeError("no etcd leader")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench store")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=8)
    args = p.parse_args(argv)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="virtua-storebench-") as tmp:
        run = Run(Path(tmp) / "home", "vstore", "10.215.0")
        try:
            run.up = run.cli("lab", "up", "--hosts", "3", "--etcd", "--tag", run.tag, "--prefix", run.prefix,
                             "--cores", "4", "--memory", "8G")
            run.cli("pool", "create", "default", "--capacity", "8G")
            built: set[str] = set()
            for i in range(args.rounds):
                for store in (("sqlite", "etcd") if i % 2 == 0 else ("etcd", "sqlite")):
                    run.start_serve(etcd=store == "etcd")
                    if store not in built:  # each store has its own template record
                        run.cli("template", "build", f"t{store}")
                        built.add(store)
                    times.setdefault(f"create {store}", []).append(
                        run.timed("vc", "create", "b", "--template", f"t{store}", "--nodes", str(args.nodes),
                                  "--strategy", "cyclic", "--mode", "lazy", "--memory", "128M"))
                    times.setdefault(f"info {store}", []).append(run.timed("vc", "info", "b"))
                    times.setdefault(f"destroy {store}", []).append(run.timed("vc", "destroy", "b", "--force"))
                    run.stop_serve()
            run.start_serve(etcd=True)
            before = run.status_latencies(5)
            frozen = [run.etcd_pid(h) for h in ("h1", "h2")]
            for pid in frozen:
                os.killpg(pid, signal.SIGSTOP)
            try:
                during = run.status_latencies(15)
            finally:
                for pid in frozen:
                    os.killpg(pid, signal.SIGCONT)
            t = time.perf_counter()
            while True:
                try:
                    run.cli("host", "undrain", "h3")  # a write
                    break
                except RuntimeError:
                    time.sleep(0.1)
            thawed = time.perf_counter() - t
            time.sleep(3)  # a beat or two since the thaw: "alive" is the host's last beat on record
            alive = sum(h["alive"] for h in run.cli("host", "list"))
            host, pid = run.etcd_leader()
            t = time.perf_counter()
            os.killpg(pid, signal.SIGKILL)
            run.cli("host", "drain", "h1" if host != "h1" else "h2")  # a write, from the moment the leader died
            failover = time.perf_counter() - t
            t = time.perf_counter()
            run.cli("host", "list")
            plain = time.perf_counter() - t
            run.stop_serve()
        finally:
            run.stop_serve()
            subprocess.run([sys.executable, "-m", "virtua.cli", "lab", "down"], env=run.env, capture_output=True)
            Lab(tag=run.tag, prefix=run.prefix, hosts=3).destroy()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.nodes}-node VC, {args.rounds} rounds, seconds (median; whole CLI command)")
    print("| operation | SQLite | etcd (3 members, TLS) | etcd / SQLite | rounds SQLite | rounds etcd |")
    print("|---|---|---|---|---|---|")
    for op in ("create", "info", "destroy"):
        s, e = med[f"{op} sqlite"], med[f"{op} etcd"]
        rounds = [" ".join(f"{x:.2f}" for x in times[f"{op} {k}"]) for k in ("sqlite", "etcd")]
        print(f"| vc {op} | {s:.2f} | {e:.2f} | {e / s:.2f}x | {rounds[0]} | {rounds[1]} |")
    slow = [x for x in during if x > 0.1]
    print(f"\netcd quorum loss (h1, h2 frozen 15 s): GET /v1/status max {max(during) * 1e3:.0f} ms, median "
          f"{statistics.median(during) * 1e3:.1f} ms, {len(slow)} of {len(during)} over 100 ms "
          f"(before: max {max(before) * 1e3:.0f} ms, median {statistics.median(before) * 1e3:.1f} ms); "
          f"a write {thawed:.2f} s after the thaw; hosts alive afterwards: {alive} of 3")
    print(f"\netcd leader ({host}) killed -> `host drain` done: {failover:.2f} s "
          f"(a command without a failover right after: {plain:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
