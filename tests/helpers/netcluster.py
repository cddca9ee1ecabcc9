"""Several physical hosts on one machine: a network namespace per host, veth pairs on a
bridge in the root namespace where `virtua serve` (the manager and NBD server) runs.

The plumbing is virtua.net.lab's; this adds process control for tests.
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from virtua.net.lab import Lab

ROOT = Path(__file__).resolve().parents[2]


def guest_instances(vc: str, node: str) -> list[int]:
    """The QEMU processes running guest VC/NODE, on any host: one per instance, the process
    its QEMU pid file names (`-pidfile`, written by the daemon itself). While QEMU starts,
    its -daemonize parent is alive beside the daemon with the same command line: that is
    one instance starting, not two; a pid file whose process is gone names none."""
    r = subprocess.run(["pgrep", "-f", f"qemu-system.*/vms/{vc}~{node}/"], capture_output=True, text=True)
    out = []
    for pid in (int(p) for p in r.stdout.split()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            pidfile = Path(cmd[cmd.index(b"-pidfile") + 1].decode())
            if int(pidfile.read_text().strip()) == pid:
                out.append(pid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or its pid file not written yet
    return out


class NetCluster:
    """A manager in the root namespace and N agents, each in its own namespace."""

    def __init__(self, tmp: Path, hosts: int = 3, cores: int = 2, memory: str = "2G", etcd: bool = False) -> None:
        """etcd: the cluster state in a real etcd cluster, one member in each host's
        namespace (virtua.cluster.lab_etcd, as `virtua lab up --etcd` makes it)."""
        self.tmp = tmp
        self.etcd = etcd
        self.etcd_urls = ""
        self.tag = f"{os.getpid() % 10000:04d}"
        self.octet = 100 + os.getpid() % 100
        self.net = f"10.213.{self.octet}"
        self.bridge = f"vtb{self.tag}"
        self.home = tmp / "manager"
        self.env = dict(os.environ, VIRTUA_HOME=str(self.home), COLUMNS="200", PYTHONPATH=str(ROOT))
        self.lab = Lab(tag=f"vt{self.tag}", prefix=self.net, hosts=hosts)
        self.hosts = self.lab.names()
        self.ns = {h: self.lab.ns(h) for h in self.hosts}
        self.addr = {h: self.lab.address(h) for h in self.hosts}
        self.manager_addr = self.lab.gateway
        self.procs: list[subprocess.Popen[str]] = []
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.cores = cores
        self.memory = memory
        self.serve: subprocess.Popen[str] | None = None

    # ------------------------------------------------------------------ network

    def setup_network(self) -> None:
        self.lab.create()

    def teardown_network(self) -> None:
        self.lab.destroy()

    # ------------------------------------------------------------------ processes

    def start(self) -> None:
        self.setup_network()
        if self.etcd:
            from virtua.cluster import lab_etcd

            self.etcd_urls = lab_etcd.urls(lab_etcd.start(self.lab, self.home / "lab", self.home))
        self.cli("pool", "create", "default", "--capacity", "8G")
        self.start_manager()
        for h in self.hosts:
            self.start_agent(h)
        self.wait_hosts(len(self.hosts))

    def start_manager(self, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent",
             "--listen", f"{self.manager_addr}:10809", "--api-listen", f"{self.manager_addr}:8780",
             "--host-network", f"{self.net}.0/24", *(["--etcd", self.etcd_urls, "--etcd-max-txn-ops", "2048"] if self.etcd else []), *(args or [])],
            env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=open(self.tmp / "serve.log", "a"),
            text=True, start_new_session=True,
        )
        assert self.serve.stdout is not None
        line = self.serve.stdout.readline()
        if not line.startswith("VIRTUA_READY"):
            raise RuntimeError("virtua serve did not start: " + (self.tmp / "serve.log").read_text()[-2000:])

    def stop_manager(self) -> None:
        if self.serve and self.serve.poll() is None:
            self.serve.send_signal(signal.SIGTERM)
            self.serve.wait(timeout=30)

    @property
    def manager_url(self) -> str:
        return f"https://{self.manager_addr}:8780"

    def join_token(self, path: Path, ttl: str = "10m") -> Path:
        """A one-time join token from the manager, in a 0600 file."""
        self.cli("host", "join-token", "--ttl", ttl, "--output", str(path))
        return path

    def start_agent(self, h: str) -> None:
        """Start h's agent; its first start joins with a fresh token (later ones reuse
        the certificate it holds)."""
        home = self.tmp / f"agent-{h}"
        home.mkdir(exist_ok=True)
        token = None if (home / "pki" / "client-cert.pem").exists() else self.join_token(home / "join-token")
        proc = subprocess.Popen(
            self.lab.agent_command(h, home, self.manager_url, self.cores, self.memory, token),
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
            r = self.cli("host", "list", "--json", check=False)
            if r.returncode == 10 and time.monotonic() < deadline:  # the store away for a moment (an etcd election)
                time.sleep(0.3)
                continue
            hosts = json.loads(r.stdout) if r.returncode == 0 else self.json("host", "list")
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

    def local_nbd(self, export: str) -> str:
        """The export through the manager's unix socket: plaintext for local (root) tools,
        while its lab address requires TLS and a certificate."""
        return f"nbd+unix:///{export}?socket={self.home / 'nbd.sock'}"

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
        if self.etcd:
            from virtua.cluster import lab_etcd

            lab_etcd.stop(self.home / "lab")
        self.teardown_network()


@contextlib.contextmanager
def running_cluster(tmp: Path, template: str = "tiny", etcd: bool = False) -> Iterator[NetCluster]:
    """Three namespaced hosts (2 cores, 2 GiB offered each) with the manager and agents
    running and `template` built; torn down on exit. etcd: the state in a 3-member etcd."""
    c = NetCluster(tmp, hosts=3, cores=2, memory="2G", etcd=etcd)
    try:
        c.start()
        c.cli("template", "build", template)
        yield c
    finally:
        c.close()
