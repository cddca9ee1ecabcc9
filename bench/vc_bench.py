"""Virtual clusters: time to create and boot to a shell a VC of 1, 4 and 8 nodes on a lab of
3 namespaced hosts, and the disk space of the 8-node VC against 8 full copies.

    python -m bench vc [--sizes 1,4,8] [--hosts 3] [--memory 128M]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from virtua.net.lab import Lab
from virtua.units import format_size

console = Console()


class Env:
    def __init__(self, home: Path, lab: Lab) -> None:
        self.home = home
        self.lab = lab
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        self.serve: subprocess.Popen[str] | None = None

    def cli(self, *args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args, "--json"], env=self.env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"virtua {' '.join(args)}: {r.stderr}")
        return json.loads(r.stdout)

    def up(self, cores: int, memory: str) -> None:
        self.lab.create()
        self.cli("pool", "create", "bench", "--capacity", "16G")
        g = self.lab.gateway
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"{g}:10809",
             "--api-listen", f"{g}:8780", "--host-network", self.lab.network],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.home / "serve.log", "a"), text=True,
        )
        assert self.serve.stdout is not None
        self.serve.stdout.readline()
        tokens = {}
        for h in self.lab.names():  # each host joins with its own one-time token
            (self.home / "lab" / h).mkdir(parents=True, exist_ok=True)
            tokens[h] = self.home / "lab" / h / "join-token"
            subprocess.run([sys.executable, "-m", "virtua.cli", "host", "join-token", "--output", str(tokens[h])],
                           env=self.env, check=True, capture_output=True)
        self.lab.start_agents(self.home / "lab", f"https://{g}:8780", cores, memory, tokens)
        deadline = time.monotonic() + 60
        while sum(h["alive"] for h in self.cli("host", "list")) < self.lab.hosts:
            if time.monotonic() > deadline:
                raise TimeoutError("agents did not register")
            time.sleep(0.3)

    def down(self) -> None:
        Lab.stop_agents(self.home / "lab")
        if self.serve is not None:
            self.serve.send_signal(signal.SIGTERM)
            self.serve.wait(30)
        self.lab.destroy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench vc")
    p.add_argument("--sizes", default="1,4,8")
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--memory", default="128M")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    console.print(f"[bold]virtual clusters[/] on {os.cpu_count()} cores, {platform.release()}, "
                  f"{args.hosts} namespaced hosts, guests under the accelerator `vc info` shows")
    with tempfile.TemporaryDirectory(prefix="virtua-vcbench-") as tmp:
        env = Env(Path(tmp), Lab(tag="vbench", prefix="10.214.0", hosts=args.hosts))
        try:
            env.up(cores=2, memory="4G")
            t0 = time.monotonic()
            env.cli("template", "build", "t")
            build = time.monotonic() - t0
            rows = []
            space: dict[str, int] = {}
            for n in sizes:
                used0 = env.cli("pool", "info", "bench")["used"]
                t0 = time.monotonic()
                info = env.cli("vc", "create", f"b{n}", "--template", "t", "--nodes", str(n), "--strategy",
                               "cyclic", "--mode", "lazy", "--memory", args.memory, "--start")
                elapsed = time.monotonic() - t0
                states = {nd["state"] for nd in info["nodes"]}
                accel = {nd["accel"] for nd in info["nodes"]}
                rows.append((n, elapsed, states, accel))
                if n == max(sizes):
                    used1 = env.cli("pool", "info", "bench")["used"]
                    tmpl = env.cli("volume", "info", "bench/template-t")
                    space = {"nodes": n, "vc_used": used1 - used0, "template": tmpl["allocated"],
                             "copies": n * tmpl["allocated"]}
                env.cli("vc", "destroy", f"b{n}", "--force")
        finally:
            env.down()
    table = Table(title="create + boot to a shell (vc create --start, wall time incl. CLI)")
    for c in ("nodes", "seconds", "per node", "states", "accel", "goal"):
        table.add_column(c)
    for n, s, states, accel in rows:
        goal = "< 30 s" if n == 8 else ""
        verdict = ("PASS" if s < 30 else "MISS") if n == 8 else ""
        table.add_row(str(n), f"{s:.1f}", f"{s / n:.1f}", ",".join(sorted(states)), ",".join(sorted(accel)),
                      f"{goal} {verdict}".strip())
    console.print(table)
    console.print(f"template build: {build:.1f} s")
    if space:
        t2 = Table(title=f"disk space of a {space['nodes']}-node VC after boot")
        for c in ("VC (clones+swap+seeds) used", "template allocated", f"{space['nodes']} full copies", "ratio"):
            t2.add_column(c)
        t2.add_row(format_size(space["vc_used"]), format_size(space["template"]), format_size(space["copies"]),
                   f"{space['vc_used'] / space['copies']:.3f}")
        console.print(t2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
