"""Several physical hosts on one machine: a network namespace per host, veth pairs on a
bridge in the root namespace where `virtua serve` (the manager and NBD server) runs.

Everything crosses a real network: agents reach the manager's API and QEMU reaches the
NBD exports over the veths, never through shared Python objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def sh(*cmd: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(full)}: {r.stderr.strip()}")
    return r


class NetCluster:
    """A manager in the root namespace and N agents, each in its own namespace."""

    def __init__(self, tmp: Path, hosts: int = 3, cores: int = 2, memory: str = "2G") -> None:
        self.tmp = tmp
        self.tag = f"{os.getpid() % 10000:04d}"
        self.octet = 100 + os.getpid() % 100
        self.net = f"10.213.{self.octet}"
        self.bridge = f"vtb{self.tag}"
        self.home = tmp / "manager"
        self.env = dict(os.environ, VIRTUA_HOME=str(self.home), COLUMNS="200", PYTHONPATH=str(ROOT))
        self.hosts = [f"h{i}" for i in range(1, hosts + 1)]
        self.ns = {h: f"vt{self.tag}{h}" for h in self.hosts}
        self.addr = {h: f"{self.net}.{10 + i}" for i, h in enumerate(self.hosts, 1)}
        self.manager_addr = f"{self.net}.1"
        self.procs: list[subprocess.Popen[str]] = []
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.cores = cores
        self.memory = memory
        self.serve: subprocess.Popen[str] | None = None

    # ------------------------------------------------------------------ network

    def setup_network(self) -> None:
        self.teardown_network()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.manager_addr}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, h in enumerate(self.hosts, 1):
            ns = self.ns[h]
            outside, inside = f"vte{self.tag}{i}", f"vti{self.tag}{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", outside, "master", self.bridge)
            sh("ip", "link", "set", outside, "up")
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "link", "set", inside, "name", "eth0", ns=ns)
            sh("ip", "addr", "add", f"{self.addr[h]}/24", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            sh("ip", "route", "add", "default", "via", self.manager_addr, ns=ns)

    def teardown_network(self) -> None:
        for h in self.hosts:
            sh("ip", "netns", "del", self.ns[h], check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    # ------------------------------------------------------------------ processes

    def start(self) -> None:
        self.setup_network()
        self.cli("pool", "create", "default", "--capacity", "8G")
        self.start_manager()
        for h in self.hosts:
            self.start_agent(h)
        self.wait_hosts(len(self.hosts))

    def start_manager(self) -> None:
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent",
             "--listen", f"{self.manager_addr}:10809", "--api-listen", f"{self.manager_addr}:8780",
             "--host-network", f"{self.net}.0/24"],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.tmp / "serve.log", "a"), text=True,
            start_new_session=True,
        )
        assert self.serve.stdout is not None
        line = self.serve.stdout.readline()
        if not line.startswith("VIRTUA_READY"):
            raise RuntimeError("virtua serve did not start: " + (self.tmp / "serve.log").read_text()[-2000:])

    def stop_manager(self) -> None:
        if self.serve and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            self.serve.wait(timeout=30)

    def start_agent(self, h: str) -> None:
        home = self.tmp / f"agent-{h}"
        home.mkdir(exist_ok=True)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[h], sys.executable, "-m", "virtua.cli", "--home", str(home), "agent",
             "--name", h, "--listen", f"{self.addr[h]}:8781", "--manager", f"http://{self.manager_addr}:8780",
             "--cores", str(self.cores), "--memory", self.memory, "--host-network", f"{self.net}.0/24"],
            env=self.env, stdout=open(home / "agent.out", "a"), stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )
        self.agents[h] = proc

    def kill_agent(self, h: str, sig: int = signal.SIGKILL) -> None:
        proc = self.agents[h]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=10)

    def wait_hosts(self, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            hosts = self.json("host", "list")
            alive = [h for h in hosts if h["alive"] and h["state"] == "online"]
            if len(alive) >= n:
                return hosts
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(alive)} of {n} hosts came up: {hosts}")
            time.sleep(0.3)

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"virtua {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def exec(self, ref: str, script: str, timeout: float = 30) -> str:
        r = self.cli("vm", "exec", ref, script, "--timeout", str(timeout), check=False)
        if r.returncode != 0:
            raise AssertionError(f"{ref}: {script!r} failed ({r.returncode}): {r.stdout} {r.stderr}")
        return r.stdout

    def qemu_pids(self) -> list[int]:
        r = subprocess.run(["pgrep", "-f", f"qemu-system.*{self.tmp}"], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()]

    def close(self) -> None:
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.agents.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.serve and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            try:
                self.serve.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.serve.kill()
        self.teardown_network()
