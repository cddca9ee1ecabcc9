"""Attacks on the hosts from inside real guests (issue 11): from a busybox guest of VC `va`,
with `nc` and hand-written HTTP and NBD bytes, the manager's API, the NBD server, every
agent's API, ssh and etcd ports; each must fail at the network level. Positive controls
make each check able to fail: the same bytes from a host namespace get their answer, and
the same guest still reaches its VC peers. Egress: `none` reaches no other network, `nat`
reaches one behind its host's address, `routed` with its own, all without the hosts."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from tests.helpers.netcluster import NetCluster, running_cluster
from virtua.net.lab import sh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NBD_MAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
STAND_INS = (22, 2379, 2380)  # ssh and etcd: the lab runs neither, so a responder stands in

# A TCP responder that tells each client the address it sees it from; runs until stdin closes.
RESPONDER = """
import socket, sys, threading
def serve(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen()
    while True:
        c, peer = s.accept()
        c.sendall(("seen-from " + peer[0] + "\\n").encode())
        c.close()
for p in sys.argv[1:]:
    threading.Thread(target=serve, args=(int(p),), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def http(method: str, path: str, body: object | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode() + data


def nbd_opt(option: int, data: bytes = b"") -> bytes:
    """Client flags (fixed newstyle, no zeroes), then one option."""
    return (3).to_bytes(4, "big") + IHAVEOPT + option.to_bytes(4, "big") + len(data).to_bytes(4, "big") + data


@dataclass(frozen=True)
class Probe:
    name: str
    address: str
    port: int
    payload: bytes = b""
    control: bytes | None = None  # what a host sends instead, where the attack itself would do harm
    wait: int = 6  # seconds for the whole exchange (a server that keeps the line open is cut)

    @property
    def control_payload(self) -> bytes:
        return self.payload if self.control is None else self.control


@dataclass
class AttackLab:
    c: NetCluster
    outside_ns: str
    outside_addr: str
    responders: list[subprocess.Popen[str]]

    def vc_nodes(self, vc: str) -> list[dict]:  # type: ignore[type-arg]
        return self.c.json("vc", "info", vc)["nodes"]  # type: ignore[no-any-return]

    def node(self, vc: str, i: int = 0) -> dict:  # type: ignore[type-arg]
        return self.vc_nodes(vc)[i]

    def gateway(self, vc: str) -> str:
        return next(n["gateway"] for n in self.c.json("net", "list") if n["vc"] == vc)


def from_guest(c: NetCluster, ref: str, probes: list[Probe]) -> dict[str, bytes]:
    """Every probe at once from inside the guest: its bytes in, whatever comes back out."""
    parts = []
    for i, p in enumerate(probes):
        b64 = base64.b64encode(p.payload).decode()
        parts.append(f"(echo {b64} | base64 -d | timeout {p.wait} nc -w 3 {p.address} {p.port} 2>/dev/null"
                     f" | od -An -tx1 | tr -d ' \\n' > /tmp/probe{i}) &")
    script = " ".join(parts) + " wait; " + " ".join(f"echo probe{i}=$(cat /tmp/probe{i});" for i in range(len(probes)))
    out = c.exec(ref, script, timeout=40)
    got = dict(line.split("=", 1) for line in out.split() if line.startswith("probe"))
    return {p.name: bytes.fromhex(got.get(f"probe{i}", "")) for i, p in enumerate(probes)}


def from_host(c: NetCluster, host: str, p: Probe) -> bytes:
    """The probe's (control) bytes with the same busybox nc, from a host's namespace."""
    r = subprocess.run(["ip", "netns", "exec", c.ns[host], "busybox", "timeout", str(p.wait), "busybox", "nc", "-w",
                        "3", p.address, str(p.port)], input=p.control_payload, capture_output=True, timeout=60)
    return r.stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttackLab]:
    with running_cluster(tmp_path_factory.mktemp("attacks")) as c:
        for name, nodes, egress in (("va", 2, "none"), ("vb", 1, "none"), ("vn", 1, "nat"), ("vr", 1, "routed")):
            c.json("vc", "create", name, "--template", "tiny", "--nodes", str(nodes), "--strategy", "cyclic",
                   "--memory", "128M", "--egress", egress, "--start")
        responders = []
        for h in c.hosts:  # ssh and etcd stand-ins on every host, every address (taps too)
            p = subprocess.Popen(["ip", "netns", "exec", c.ns[h], sys.executable, "-c", RESPONDER,
                                  *map(str, STAND_INS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            responders.append(p)
        # "outside": a namespace on the lab's bridge with an address on another network,
        # on-link to the hosts (there is no real outside network here)
        outside_ns, octet = f"{c.lab.tag}-out", c.octet
        outside_addr = f"172.31.{octet}.2"
        veth_out, veth_in = f"{c.lab.tag}xo", f"{c.lab.tag}xi"
        sh("ip", "netns", "add", outside_ns)
        try:
            sh("ip", "link", "add", veth_out, "type", "veth", "peer", "name", veth_in)
            sh("ip", "link", "set", veth_out, "master", c.lab.bridge)
            sh("ip", "link", "set", veth_out, "up")
            sh("ip", "link", "set", veth_in, "netns", outside_ns)
            sh("ip", "link", "set", "lo", "up", ns=outside_ns)
            sh("ip", "addr", "add", f"{outside_addr}/24", "dev", veth_in, ns=outside_ns)
            sh("ip", "link", "set", veth_in, "up", ns=outside_ns)
            sh("ip", "route", "add", c.lab.network, "dev", veth_in, ns=outside_ns)
            for h in c.hosts:
                sh("ip", "route", "add", f"172.31.{octet}.0/24", "dev", "eth0", ns=c.ns[h])
            vr = c.json("vc", "info", "vr")["nodes"][0]  # a routed VC: the outside routes to it
            sh("ip", "route", "add", f"{vr['address']}/32", "via", c.addr[vr["host"]], ns=outside_ns)
            p = subprocess.Popen(["ip", "netns", "exec", outside_ns, sys.executable, "-c", RESPONDER, "8080"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            responders.append(p)
            yield AttackLab(c, outside_ns, outside_addr, responders)
        finally:
            for p in responders:
                p.kill()
                p.wait()
            sh("ip", "link", "del", veth_out, check=False)
            sh("ip", "netns", "del", outside_ns, check=False)


def attacks(lab: AttackLab, guest_vc: str) -> tuple[list[Probe], dict[str, str]]:
    """What a guest of guest_vc tries against the hosts, and from which host namespace each
    probe's positive control runs (a host other than the target's, when it has an address
    the others reach)."""
    c = lab.c
    m = c.manager_addr
    vb1 = lab.node("vb")
    gw = lab.gateway(guest_vc)
    own_host = lab.node(guest_vc)["host"]
    harmless = http("POST", "/v1/ops/vc.info", {"name": "vb"})
    probes = [
        Probe("api volume.list", m, 8780, http("POST", "/v1/ops/volume.list", {})),
        Probe("api volume.rm vb-1", m, 8780, http("POST", "/v1/ops/volume.rm", {"ref": vb1["disk"]}), harmless),
        Probe("api vc.destroy vb", m, 8780, http("POST", "/v1/ops/vc.destroy", {"name": "vb", "force": True}), harmless),
        Probe("nbd OPT_LIST", m, 10809, nbd_opt(3)),
        Probe("nbd open vb-1", m, 10809, nbd_opt(1, vb1["disk"].encode())),
    ]
    for h in c.hosts:
        exec_in_vb1 = {"id": "vb/vb-1", "script": "echo pwned > /tmp/pwned", "timeout": 5}
        probes.append(Probe(f"agent {h} vm exec vb-1", c.addr[h], 8781, http("POST", "/v1/vm/exec", exec_in_vb1),
                            http("POST", "/v1/vm/exec", {**exec_in_vb1, "script": "hostname"}), wait=30))
        probes += [Probe(f"port {port} on {h}", c.addr[h], port) for port in STAND_INS]
    probes += [Probe(f"port {port} on its gateway", gw, port) for port in STAND_INS]
    # a control from another host crosses the network as the attack would; the gateway's
    # address is only on its own host's taps
    control = {p.name: (own_host if p.address == gw else next(h for h in c.hosts if c.addr[h] != p.address))
               for p in probes}
    return probes, control


def test_guest_reaches_nothing_of_the_hosts(lab: AttackLab) -> None:
    c = lab.c
    va1, va2, vb1 = lab.node("va", 0), lab.node("va", 1), lab.node("vb")
    c.exec("vb/vb-1", "echo vb-secret > /root/secret; sync")
    # positive control: the guest reaches its VC peer (ping and TCP) on another host
    assert va1["host"] != va2["host"]
    c.exec("va/va-2", "nc -ll -p 7000 -e /bin/hostname </dev/null >/dev/null 2>&1 &")
    out = c.exec("va/va-1", f"ping -c 2 -W 2 {va2['address']} >/dev/null && echo ping=ok; "
                            f"nc -w 3 {va2['address']} 7000 </dev/null")
    assert "ping=ok" in out and "va-2" in out, out

    probes, control = attacks(lab, "va")
    got = from_guest(c, "va/va-1", probes)
    reached = {name: data[:60] for name, data in got.items() if data}
    assert reached == {}, f"a guest reached the hosts: {reached}"
    # nothing the guest sent did anything: vb, its disk and its guest are as they were
    assert [n["state"] for n in lab.vc_nodes("vb")] == ["running"]
    assert vb1["disk"] in [v["name"] for v in c.json("volume", "list")]
    assert c.exec("vb/vb-1", "cat /root/secret; test -e /tmp/pwned && echo pwned; true").split() == ["vb-secret"]

    # positive control: every port is open and answers from a host namespace
    with ThreadPoolExecutor(len(probes)) as pool:
        answers = dict(zip([p.name for p in probes], pool.map(lambda p: from_host(c, control[p.name], p), probes), strict=True))
    silent = [name for name, data in answers.items() if not data]
    assert silent == [], f"no answer from a host namespace either (the check would be vacuous): {silent}"
    assert b"HTTP/1.1 200" in answers["api volume.list"] and vb1["disk"].encode() in answers["api volume.list"]
    assert answers["nbd OPT_LIST"].startswith(NBD_MAGIC) and answers["nbd open vb-1"].startswith(NBD_MAGIC)
    assert b"vb-1" in answers[f"agent {vb1['host']} vm exec vb-1"]
    for p in probes:
        if p.port in STAND_INS:
            assert answers[p.name].startswith(b"seen-from "), (p.name, answers[p.name])


@pytest.mark.parametrize("vc, seen_as", [("va", None), ("vn", "host"), ("vr", "own")])
def test_egress_modes(lab: AttackLab, vc: str, seen_as: str | None) -> None:
    c = lab.c
    node = lab.node(vc)
    ref = f"{vc}/{node['name']}"
    outside = Probe("outside", lab.outside_addr, 8080)
    probes, control = attacks(lab, vc)
    got = from_guest(c, ref, [outside, *probes])
    seen = got.pop("outside").decode().strip()
    expected = {None: "", "host": f"seen-from {c.addr[node['host']]}", "own": f"seen-from {node['address']}"}
    assert seen == expected[seen_as], (vc, seen)
    # in every mode the hosts stay closed
    reached = {name: data[:60] for name, data in got.items() if data}
    assert reached == {}, f"{vc} ({seen_as or 'none'}) reached the hosts: {reached}"
    # the outside answers a host, so a silent `none` is the filter's doing
    assert from_host(c, c.hosts[0], outside).startswith(b"seen-from ")
    ping = c.exec(ref, f"ping -c 1 -W 2 {lab.outside_addr} >/dev/null 2>&1 && echo ping=ok || echo ping=fail")
    assert ping.strip() == ("ping=fail" if seen_as is None else "ping=ok"), (vc, ping)
