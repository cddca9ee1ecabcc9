"""The nftables rule set of a host, rendered from its VMs (pure), loaded into a real kernel
in scratch network namespaces, and proven there with real packets: a guest (a namespace
behind a veth named like a tap) reaches its gateway by ping and nothing else of the hosts',
and reaches an "outside" namespace as its VC's egress mode says."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from virtua.errors import InvalidArgument
from virtua.net.hostnet import EGRESS_MODES, LocalVM, render_ruleset

A1 = LocalVM("vtaaaa1", "10.200.0.2", "10.200.0.0/29", "a", "10.200.0.1")
B1 = LocalVM("vtbbbb1", "10.200.0.10", "10.200.0.8/29", "b", "10.200.0.9")
SUBNETS = ["10.200.0.0/29", "10.200.0.8/29"]
HOSTS = ["10.213.0.0/24"]


def vm(egress: str, base: LocalVM = A1) -> LocalVM:
    return LocalVM(base.tap, base.address, base.subnet, base.vc, base.gateway, egress)


def rules_of(script: str, tap: str) -> list[str]:
    return [line.strip() for line in script.splitlines() if f'"{tap}"' in line]


def test_no_vms_means_no_table() -> None:
    script = render_ruleset([], ["10.200.0.0/29"], HOSTS)
    assert script.strip().splitlines() == ["table inet virtua {}", "delete table inet virtua"]


def test_rules_isolate_and_block_spoofing() -> None:
    script = render_ruleset([A1, B1], SUBNETS, HOSTS)
    assert 'iifname "vtaaaa1" ip saddr != 10.200.0.2 counter drop' in script
    assert 'iifname "vtaaaa1" ip daddr != 10.200.0.0/29 ip daddr { 10.200.0.0/29, 10.200.0.8/29 } counter drop' in script
    assert 'oifname "vtbbbb1" ip saddr != 10.200.0.8/29 ip saddr { 10.200.0.0/29, 10.200.0.8/29 } counter drop' in script
    # no accept verdicts: one VM's rule can never let another VM's spoofed packet through
    assert "accept;" in script and " accept\n" not in script and "accept comment" not in script
    # every anti-spoofing rule comes before any other rule of the chain
    forward = script.split("chain forward")[1].split("chain input")[0]
    kinds = [line.split("comment")[-1].strip() for line in forward.splitlines() if "comment" in line]
    first_other = next(i for i, k in enumerate(kinds) if "spoofed" not in k and "IPv4" not in k)
    assert all("spoofed" in k or "IPv4" in k for k in kinds[:first_other])
    assert not any("spoofed" in k for k in kinds[first_other:])


@pytest.mark.parametrize("egress", EGRESS_MODES)
def test_the_hosts_are_closed_in_every_mode(egress: str) -> None:
    script = render_ruleset([vm(egress)], SUBNETS, ["10.213.0.0/24", "192.168.7.5/32"])
    mine = rules_of(script, "vtaaaa1")
    reply = "ct state != { established, related }"
    # forward: every host network and host address, whatever the mode
    assert f'iifname "vtaaaa1" ip daddr {{ 10.213.0.0/24, 192.168.7.5/32 }} {reply} counter drop comment "to the hosts"' in mine
    # input: this host's addresses and ports; a ping to the gateway is all a guest may start
    input_chain = script.split("chain input")[1]
    assert f'iifname "vtaaaa1" {reply} ip daddr != 10.200.0.1 counter drop' in input_chain
    assert f'iifname "vtaaaa1" {reply} meta l4proto != icmp counter drop' in input_chain
    assert f'iifname "vtaaaa1" {reply} icmp type != echo-request counter drop' in input_chain
    # IPv6 would reach the host's link-local addresses on the tap: IPv4 only, both hooks
    assert sum('iifname "vtaaaa1" meta protocol != ip counter drop' in r for r in mine) == 2


def test_egress_modes() -> None:
    none, nat, routed = (
        render_ruleset([vm(e)], SUBNETS, HOSTS) for e in ("none", "nat", "routed")
    )
    confined = 'iifname "vtaaaa1" ip daddr != 10.200.0.0/29 ct state != { established, related } counter drop comment "egress none"'
    inbound = 'oifname "vtaaaa1" ip saddr != { 10.200.0.0/29, 10.213.0.0/24 } ct state != { established, related } counter drop'
    assert confined in none and confined not in nat and confined not in routed
    # only its VC and the hosts open connections to a none/nat VM; a routed VM is open
    assert inbound in none and inbound in nat and inbound not in routed
    masq = 'ip saddr { 10.200.0.2 } ip daddr != { 10.200.0.0/29, 10.200.0.8/29 } oifname != "vt*" masquerade'
    assert masq in nat and "masquerade" not in none and "masquerade" not in routed
    assert "hook postrouting" in nat and "hook postrouting" not in none + routed


def test_nat_masquerades_only_its_own_vms() -> None:
    script = render_ruleset([vm("nat"), vm("none", B1)], SUBNETS, HOSTS)
    assert "ip saddr { 10.200.0.2 } " in script and "10.200.0.10 }" not in script


def test_bad_egress_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="bad egress 'open'"):
        render_ruleset([vm("open")], SUBNETS, HOSTS)


def test_ruleset_loads_into_the_kernel() -> None:
    ns = f"vtchk{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for hosts in (HOSTS, []):  # before the manager's first word: no host networks yet
            script = render_ruleset([vm("none"), vm("nat", B1)], SUBNETS, hosts)
            r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
        listed = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "virtua"],
                                capture_output=True, text=True, check=True).stdout
        assert "spoofed source" in listed and "masquerade" in listed
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=render_ruleset([], []),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "table", "inet", "virtua"],
                           capture_output=True, text=True)
        assert r.returncode != 0, "an empty rule set leaves no table behind"
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# ---------------------------------------------------------------------- real packets

# A TCP responder that tells each client the address it sees it from; runs until stdin closes.
RESPONDER = """
import socket, sys, threading
def serve(addr, port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port))
    s.listen()
    while True:
        c, peer = s.accept()
        c.sendall(peer[0].encode())
        c.close()
for spec in sys.argv[1:]:
    a, p = spec.rsplit(":", 1)
    threading.Thread(target=serve, args=(a, int(p)), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

# Connects to every ADDR:PORT at once; prints {target: seen-as address | "timeout" | "refused"}.
PROBE = """
import json, socket, sys, threading
out = {}
def probe(t):
    a, p = t.rsplit(":", 1)
    try:
        with socket.create_connection((a, int(p)), timeout=1.5) as s:
            s.settimeout(1.5)
            out[t] = s.recv(64).decode()
    except socket.timeout:
        out[t] = "timeout"
    except ConnectionRefusedError:
        out[t] = "refused"
    except OSError as e:
        out[t] = type(e).__name__
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
for th in threads: th.start()
for th in threads: th.join()
print(json.dumps(out))
"""


def sh(*cmd: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    full = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    r = subprocess.run(full, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(full)}: {r.stderr}")
    return r


@dataclass
class Bench:
    """guest G --tap-- host H --eth0-- N (the hosts' network: another host, the manager)
                           H --out0-- O (an outside network)"""

    tag: str
    guest = LocalVM("", "10.200.0.2", "10.200.0.0/29", "a", "10.200.0.1")
    host_net = "10.213.250.0/24"
    procs: list[subprocess.Popen[str]] | None = None

    def ns(self, role: str) -> str:
        return f"vt{self.tag}{role}"

    @property
    def tap(self) -> str:
        return f"vt{self.tag}t"

    def up(self) -> None:
        self.procs = []
        g, h, n, o = (self.ns(r) for r in "ghno")
        for x in (g, h, n, o):
            sh("ip", "netns", "add", x)
            sh("ip", "link", "set", "lo", "up", ns=x)
        # the guest's NIC and the host's tap, configured the way HostNetwork.plug does
        sh("ip", "link", "add", "eth0", "netns", g, "type", "veth", "peer", "name", self.tap, "netns", h)
        sh("ip", "addr", "add", "10.200.0.2/29", "dev", "eth0", ns=g)
        sh("ip", "link", "set", "eth0", "up", ns=g)
        sh("ip", "route", "add", "default", "via", "10.200.0.1", ns=g)
        sh("ip", "addr", "add", "10.200.0.1/32", "dev", self.tap, ns=h)
        sh("sysctl", "-qw", f"net.ipv4.conf.{self.tap}.proxy_arp=1", ns=h)
        sh("ip", "link", "set", self.tap, "up", ns=h)
        sh("ip", "route", "add", "10.200.0.2/32", "dev", self.tap, "src", "10.200.0.1", ns=h)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=h)
        for peer, ifname, mine, theirs in ((n, "eth0", "10.213.250.11", "10.213.250.1"),
                                          (o, "out0", "172.31.250.1", "172.31.250.2")):
            sh("ip", "link", "add", ifname, "netns", h, "type", "veth", "peer", "name", "eth0", "netns", peer)
            sh("ip", "addr", "add", f"{mine}/24", "dev", ifname, ns=h)
            sh("ip", "link", "set", ifname, "up", ns=h)
            sh("ip", "addr", "add", f"{theirs}/24", "dev", "eth0", ns=peer)
            sh("ip", "link", "set", "eth0", "up", ns=peer)
        sh("ip", "route", "add", "10.200.0.0/29", "via", "10.213.250.11", ns=n)  # hosts route to VMs
        self.serve(n, "10.213.250.1:8780", "10.213.250.1:10809", "10.213.250.1:2379")
        self.serve(h, "0.0.0.0:22", "0.0.0.0:8781")
        self.serve(o, "172.31.250.2:80")
        self.serve(g, "0.0.0.0:7000")

    def serve(self, ns: str, *specs: str) -> None:
        assert self.procs is not None
        p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RESPONDER, *specs],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

    def down(self) -> None:
        for p in self.procs or []:
            p.kill()
            p.wait()
        for r in "ghno":
            sh("ip", "netns", "del", self.ns(r), check=False)

    def load(self, egress: str) -> None:
        g = self.guest
        local = LocalVM(self.tap, g.address, g.subnet, g.vc, g.gateway, egress)
        r = subprocess.run(["ip", "netns", "exec", self.ns("h"), "nft", "-f", "-"],
                           input=render_ruleset([local], [g.subnet], [self.host_net]), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        # the outside routes the VC's subnet back to its host only when it is routed
        sh("ip", "route", "del", "10.200.0.0/29", ns=self.ns("o"), check=False)
        if egress == "routed":
            sh("ip", "route", "add", "10.200.0.0/29", "via", "172.31.250.1", ns=self.ns("o"))

    def probe(self, role: str, *targets: str) -> dict[str, str]:
        out = sh(sys.executable, "-c", PROBE, *targets, ns=self.ns(role)).stdout
        return json.loads(out)  # type: ignore[no-any-return]

    def ping(self, role: str, target: str) -> bool:
        return sh("busybox", "ping", "-c", "1", "-W", "1", target, ns=self.ns(role), check=False).returncode == 0


@pytest.fixture(scope="module")
def bench() -> Iterator[Bench]:
    b = Bench(uuid.uuid4().hex[:5])
    try:
        b.up()
        yield b
    finally:
        b.down()


CONTROL = ["10.213.250.1:8780", "10.213.250.1:10809", "10.213.250.1:2379",  # manager / other host
           "10.213.250.11:22", "10.213.250.11:8781", "172.31.250.1:22",  # its own host's addresses
           "10.200.0.1:22", "10.200.0.1:8781"]  # its gateway


def test_without_rules_the_guest_reaches_everything(bench: Bench) -> None:
    """The positive control: every port below is open and answers the guest."""
    r = subprocess.run(["ip", "netns", "exec", bench.ns("h"), "nft", "-f", "-"], input=render_ruleset([], []),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    sh("ip", "route", "replace", "10.200.0.0/29", "via", "172.31.250.1", ns=bench.ns("o"))
    got = bench.probe("g", *CONTROL, "172.31.250.2:80")
    assert got == dict.fromkeys([*CONTROL, "172.31.250.2:80"], "10.200.0.2"), got
    assert bench.ping("g", "10.213.250.1")


@pytest.mark.parametrize("egress", EGRESS_MODES)
def test_guest_reaches_nothing_of_the_hosts(bench: Bench, egress: str) -> None:
    bench.load(egress)
    got = bench.probe("g", *CONTROL, "172.31.250.2:80")
    outside = got.pop("172.31.250.2:80")
    assert got == dict.fromkeys(CONTROL, "timeout"), got
    assert {"none": "timeout", "nat": "172.31.250.1", "routed": "10.200.0.2"}[egress] == outside
    # a ping to its gateway is all it may start on its host; nothing on the hosts' network
    assert bench.ping("g", "10.200.0.1")
    assert not bench.ping("g", "10.213.250.11") and not bench.ping("g", "10.213.250.1")
    # the hosts still reach the guest (its replies pass), the outside only when routed
    assert bench.probe("n", "10.200.0.2:7000") == {"10.200.0.2:7000": "10.213.250.1"}
    assert bench.ping("n", "10.200.0.2")
    sh("ip", "route", "replace", "10.200.0.0/29", "via", "172.31.250.1", ns=bench.ns("o"))
    inbound = bench.probe("o", "10.200.0.2:7000")["10.200.0.2:7000"]
    assert inbound == ("172.31.250.2" if egress == "routed" else "timeout"), inbound
