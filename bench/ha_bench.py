"""HA restart: time from a host's failure to its VM running elsewhere, and to the old
instance being gone (self-fencing), on a lab of 3 namespaced hosts with real guests.

    python -m bench ha [--scenarios kill,agent-kill,stop,partition] [--lease-ttl 10]

Scenarios, each on a fresh VC of 3 nodes placed cyclically (the node on h3 is watched):
  kill        kill -9 of h3's agent and its QEMU processes (the host dies)
  agent-kill  kill -9 of h3's agent only (its QEMU runs on until its watchdog fences it)
  stop        SIGSTOP of h3's agent only (SIGCONT once the VM runs elsewhere)
  partition   h3's link down (`ip link set eth0 down` in its namespace) for 30 s, then up
For each: the QEMU instances of the VM are counted every 0.2 s across all hosts (never
more than 1 is the invariant), the time until none runs (fenced), and until one runs on
another host and the manager records it running there.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.helpers.netcluster import NetCluster, guest_instances

console = Console()


def instances(vc: str, node: str) -> int:
    return len(guest_instances(vc, node))


def scenario(c: NetCluster, kind: str, n: int) -> dict[str, float | int | str]:
    vc = f"ha{n}"
    info = c.json("vc", "create", vc, "--template", "tiny", "--nodes", "3", "--strategy", "cyclic", "--mode", "lazy",
                  "--memory", "128M", "--start")
    (node,) = [x["name"] for x in info["nodes"] if x["host"] == "h3"]
    agent = c.agents["h3"]
    t0 = time.monotonic()
    if kind == "kill":
        c.kill_agent("h3")
        for qpid in (c.tmp / "agent-h3" / "vms").glob("*/qemu.pid"):
            try:
                os.kill(int(qpid.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
    elif kind == "agent-kill":
        c.kill_agent("h3")
    elif kind == "stop":
        os.kill(agent.pid, signal.SIGSTOP)
    elif kind == "partition":
        subprocess.run(["ip", "-n", c.ns["h3"], "link", "set", "eth0", "down"], check=True)
    most, gone, running = 0, None, None
    deadline = t0 + 120
    while time.monotonic() < deadline:
        count = instances(vc, node)
        most = max(most, count)
        now = time.monotonic()
        if count == 0 and gone is None:
            gone = now - t0
        if running is None:
            moved = {x["name"]: x for x in c.json("vc", "info", vc)["nodes"]}[node]
            if moved["host"] != "h3" and moved["state"] == "running" and count == 1:
                running = now - t0
        if running is not None and (kind != "partition" or now - t0 >= 30):
            break
        time.sleep(0.2)
    if kind == "stop":
        os.kill(agent.pid, signal.SIGCONT)
    elif kind == "partition":
        subprocess.run(["ip", "-n", c.ns["h3"], "link", "set", "eth0", "up"], check=True)
    elif kind in ("kill", "agent-kill"):
        c.start_agent("h3")
    c.wait_hosts(3, timeout=120)
    after = []
    for _ in range(15):  # the host is back: still exactly one instance
        after.append(instances(vc, node))
        most = max(most, after[-1])
        time.sleep(0.2)
    c.json("vc", "destroy", vc, "--force")
    return {"scenario": kind, "fenced_s": gone if gone is not None else float("nan"),
            "running_elsewhere_s": running if running is not None else float("nan"), "max_instances": most,
            "after_return": max(after)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench ha")
    ap.add_argument("--scenarios", default="kill,agent-kill,stop,partition")
    ap.add_argument("--lease-ttl", type=float, default=10.0)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="virtua-ha-") as tmp:
        c = NetCluster(Path(tmp), hosts=3, cores=2, memory="2G")
        try:
            c.setup_network()
            c.cli("pool", "create", "default", "--capacity", "8G")
            c.start_manager(args=["--lease-ttl", str(args.lease_ttl)])
            for h in c.hosts:
                c.start_agent(h)
            c.wait_hosts(3)
            c.cli("template", "build", "tiny")
            rows = [scenario(c, kind, i) for i, kind in enumerate(args.scenarios.split(","))]
        finally:
            c.close()
    t = Table(title=f"HA restart, lease TTL {args.lease_ttl:g} s ({platform.node()}, {os.cpu_count()} cores)")
    for col in ("scenario", "old instance gone s", "running elsewhere s", "max instances", "after return"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["scenario"]), f"{r['fenced_s']:.1f}", f"{r['running_elsewhere_s']:.1f}",
                  str(r["max_instances"]), str(r["after_return"]))
    console.print(t)
    return 0 if all(r["max_instances"] == 1 and r["after_return"] == 1 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
