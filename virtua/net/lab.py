"""A lab of physical hosts on one machine: a network namespace per host, each joined by a
veth pair to a bridge in the root namespace (where `virtua serve` runs).

For demos, tests and benchmarks: every host is a real network peer with its own address,
so agents, QEMU and the NBD traffic all cross a real (virtual) network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from virtua.errors import InvalidArgument, Unavailable
from virtua.procs import stop_process_group

log = logging.getLogger("virtua.lab")


def sh(*cmd: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise Unavailable(f"{' '.join(full)}: {r.stderr.strip()}")
    return r


@dataclass
class Lab:
    """Hosts h1..hN at PREFIX.11.. on bridge PREFIX.1/24, namespaces named TAG-hI."""

    tag: str = "vlab"
    prefix: str = "10.213.0"
    hosts: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.hosts <= 50:
            raise InvalidArgument(f"bad host count {self.hosts}: 1..50")
        if len(self.tag) > 8 or not re.fullmatch(r"[a-z][a-z0-9]*", self.tag):
            raise InvalidArgument(f"bad lab tag {self.tag!r}: at most 8 lower-case letters and digits")

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.1"

    @property
    def network(self) -> str:
        return f"{self.prefix}.0/24"

    def names(self) -> list[str]:
        return [f"h{i}" for i in range(1, self.hosts + 1)]

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def address(self, host: str) -> str:
        return f"{self.prefix}.{10 + int(host[1:])}"

    def create(self) -> None:
        self.destroy()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, h in enumerate(self.names(), 1):
            ns = self.ns(h)
            outside, inside = f"{self.tag}o{i}", f"{self.tag}i{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
            sh("ip", "link", "set", outside, "master", self.bridge)
            sh("ip", "link", "set", outside, "up")
            sh("ip", "link", "set", inside, "netns", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
            sh("ip", "link", "set", inside, "name", "eth0", ns=ns)
            sh("ip", "addr", "add", f"{self.address(h)}/24", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
            sh("ip", "route", "add", "default", "via", self.gateway, ns=ns)

    def destroy(self) -> None:
        for h in self.names():  # nothing of the lab outlives it: agents, guests, etcd
            r = subprocess.run(["ip", "netns", "pids", self.ns(h)], capture_output=True, text=True)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        for i, h in enumerate(self.names(), 1):
            # the outside end explicitly: a namespace lingers while a process still runs in it
            sh("ip", "link", "del", f"{self.tag}o{i}", check=False)
            sh("ip", "netns", "del", self.ns(h), check=False)
        sh("ip", "link", "del", self.bridge, check=False)

    def agent_command(
        self, host: str, home: Path, manager: str, cores: int, memory: str, join_token_file: Path | None = None,
    ) -> list[str]:
        """The agent of one lab host; a first start joins with the token in join_token_file
        (a file: the process list shows the command line, never the token)."""
        token = ["--join-token-file", str(join_token_file)] if join_token_file else []
        return [
            "ip", "netns", "exec", self.ns(host), sys.executable, "-m", "virtua.cli", "--home", str(home),
            "agent", "--name", host, "--listen", f"{self.address(host)}:8781", "--manager", manager,
            "--cores", str(cores), "--memory", memory, "--host-network", self.network, *token,
        ]

    def start_agents(
        self, home: Path, manager: str, cores: int = 2, memory: str = "2G",
        join_tokens: dict[str, Path] | None = None,
    ) -> dict[str, int]:
        pids = {}
        for h in self.names():
            d = home / h
            d.mkdir(parents=True, exist_ok=True)
            token = (join_tokens or {}).get(h)
            proc = subprocess.Popen(
                self.agent_command(h, d, manager, cores, memory, token), stdout=open(d / "agent.log", "ab"),
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
            (d / "agent.pid").write_text(str(proc.pid))
            pids[h] = proc.pid
        (home / "lab.json").write_text(json.dumps({"tag": self.tag, "prefix": self.prefix, "hosts": self.hosts}))
        return pids

    @staticmethod
    def stop_agents(home: Path) -> None:
        for pidfile in home.glob("h*/agent.pid"):
            with contextlib.suppress(ValueError):
                stop_process_group(int(pidfile.read_text()), f"agent {pidfile.parent.name}", log)
            pidfile.unlink(missing_ok=True)
            # the lab's VMs go with it: they would lose their network anyway
            for qpid in (pidfile.parent / "vms").glob("*/qemu.pid"):
                with contextlib.suppress(ValueError, ProcessLookupError):
                    os.kill(int(qpid.read_text()), signal.SIGKILL)

    @classmethod
    def load(cls, home: Path) -> Lab:
        try:
            return cls(**json.loads((home / "lab.json").read_text()))
        except FileNotFoundError:
            return cls()
