"""Attacks on the hosts from inside real guests (issue 11): from a busybox guest of VC `va`,
with `nc` and hand-written HTTP and NBD bytes, the manager's API, the NBD server, every
agent's API, ssh and etcd ports; each must fail at the network level. Positive controls
make each check able to fail: the same requests from a host namespace get their answer
(over TLS with the administrator's certificate where the port speaks only TLS: the API
ports), and the same guest still reaches its VC peers. Egress: `none` reaches no other network, `nat`
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


def op_http(name: str, args: dict[str, object]) -> bytes:
    """Operation `name` on its route (virtua.api.routes), as the CLI sends it."""
    from urllib.parse import urlencode

    from virtua.api.routes import request_for

    req = request_for(name, args)
    return http(req.method, req.path + (f"?{urlencode(req.query)}" if req.query else ""), req.body)


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
    tls: bool = False  # the port speaks only TLS: the host's control uses the admin's certificate

    @property
    def control_payload(self) -> bytes:
        return self.payload if self.control is None else self.control


@dataclass
class AttackLab:
    c: NetCluster
    outside_addr: str
    nodes: dict[str, list[dict]]  # type: ignore[type-arg]  # VC -> its nodes (vc info), as booted
    gateways: dict[str, str]  # VC -> its gateway address

    def node(self, vc: str, i: int = 0) -> dict:  # type: ignore[type-arg]
        return self.nodes[vc][i]


CONNECT_TIMEOUT = 3  # nc -w: a dropped SYN gives up after this, exit status 1, "timed out"


def from_guest(
    c: NetCluster, ref: str, probes: list[Probe], pings: tuple[str, ...] = (), settle: int = 8
) -> dict[str, tuple[str, bytes]]:
    """Every probe at once from inside the guest: its bytes in (stdin kept open, as a server
    may drop a half-closed request), and (nc's exit status, what came back) out. After
    `settle` seconds a probe still running has connected: its status reads "running".
    Each address in `pings` gets one ping meanwhile: ("ping", b"ok" or b"fail")."""
    parts = [f"(ping -c 1 -W 3 {a} >/dev/null 2>&1 && echo ping{i}=ok: || echo ping{i}=fail:) &"
             for i, a in enumerate(pings)]
    for i, p in enumerate(probes):
        b64 = base64.b64encode(p.payload).decode()
        parts.append(f"( {{ echo {b64} | base64 -d; sleep {p.wait}; }}"
                     f" | (timeout {p.wait} nc -w {CONNECT_TIMEOUT} {p.address} {p.port} 2>/dev/null; echo $? > /tmp/rc{i})"
                     f" | od -An -tx1 | tr -d ' \\n' > /tmp/probe{i} ) &")
    report = " ".join(f"echo probe{i}=$(cat /tmp/rc{i} 2>/dev/null || echo running):$(cat /tmp/probe{i});"
                      for i in range(len(probes)))
    out = c.exec(ref, "rm -f /tmp/rc* /tmp/probe*; " + " ".join(parts) + f" sleep {settle}; " + report,
                 timeout=settle + 30)
    got = dict(line.split("=", 1) for line in out.split() if line.startswith(("probe", "ping")))
    result = {}
    for i, p in enumerate(probes):
        status, _, data = got.get(f"probe{i}", "missing:").partition(":")
        result[p.name] = (status, bytes.fromhex(data))
    for i, a in enumerate(pings):
        result[f"ping {a}"] = ("ping", got.get(f"ping{i}", "missing:").rstrip(":").encode())
    return result


def reached(got: dict[str, tuple[str, bytes]]) -> dict[str, tuple[str, bytes]]:
    """The probes that did not fail at the network level (a connect that timed out)."""
    return {name: (status, data[:60]) for name, (status, data) in got.items() if status != "1" or data}


# The same bytes from a host's namespace; reads until the server closes or `wait` passes.
# With a credentials directory (argv[4]) over TLS: the server verified against the cluster
# CA (and its name), the client presenting that directory's certificate.
CLIENT = """
import socket, ssl, sys
addr, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
creds = sys.argv[4] if len(sys.argv) > 4 else None
out = b""
try:
    with socket.create_connection((addr, port), timeout=3) as s:
        if creds:
            ctx = ssl.create_default_context(cafile=creds + "/ca-cert.pem")
            ctx.load_cert_chain(creds + "/client-cert.pem", creds + "/client-key.pem")
            s = ctx.wrap_socket(s, server_hostname=addr)
        s.settimeout(wait)
        s.sendall(sys.stdin.buffer.read())
        while chunk := s.recv(65536):
            out += chunk
except OSError as e:
    print(repr(e), file=sys.stderr)
sys.stdout.buffer.write(out)
"""


def host_exchange(c: NetCluster, host: str, p: Probe) -> tuple[bytes, str]:
    """The probe's (control) bytes, from a host's namespace (over TLS with the admin's
    certificate for a TLS port): (what came back, the client's error if any)."""
    creds = [str(c.home / "pki" / "admin")] if p.tls else []
    r = subprocess.run(["ip", "netns", "exec", c.ns[host], sys.executable, "-c", CLIENT, p.address, str(p.port),
                        str(p.wait), *creds], input=p.control_payload, capture_output=True, timeout=60)
    return r.stdout, r.stderr.decode(errors="replace").strip()


def from_host(c: NetCluster, host: str, p: Probe) -> bytes:
    return host_exchange(c, host, p)[0]


def responder(ns: str, *ports: int) -> subprocess.Popen[str]:
    p = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", RESPONDER, *map(str, ports)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AttackLab]:
    """va (2 nodes, egress none) attacks; vb (1 node, nat) is the victim; vr (1, routed)."""
    with running_cluster(tmp_path_factory.mktemp("attacks")) as c:
        vcs = {"va": (2, "none"), "vb": (1, "nat"), "vr": (1, "routed")}
        for name, (nodes, egress) in vcs.items():
            c.json("vc", "create", name, "--template", "tiny", "--nodes", str(nodes), "--strategy", "cyclic",
                   "--memory", "128M", "--egress", egress)
        starts = [subprocess.Popen([sys.executable, "-m", "virtua.cli", "vc", "start", name], env=c.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for name in vcs]
        for proc in starts:  # the guests boot side by side
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        infos = {name: c.json("vc", "info", name) for name in vcs}
        assert {name: info["egress"] for name, info in infos.items()} == {n: e for n, (_, e) in vcs.items()}
        nodes = {name: info["nodes"] for name, info in infos.items()}
        gateways = {n["vc"]: n["gateway"] for n in c.json("net", "list")}
        assert nodes["va"][0]["host"] != nodes["va"][1]["host"]
        # ssh and etcd stand-ins on every host, on every address (its taps' too)
        responders = [responder(c.ns[h], *STAND_INS) for h in c.hosts]
        # "outside": a namespace on the lab's bridge with an address on another network,
        # on-link to the hosts (there is no real outside network here)
        outside_ns, outside_net = f"{c.lab.tag}-out", f"172.31.{c.octet}"
        veth_out, veth_in = f"{c.lab.tag}xo", f"{c.lab.tag}xi"
        sh("ip", "netns", "add", outside_ns)
        try:
            sh("ip", "link", "add", veth_out, "type", "veth", "peer", "name", veth_in)
            sh("ip", "link", "set", veth_out, "master", c.lab.bridge)
            sh("ip", "link", "set", veth_out, "up")
            sh("ip", "link", "set", veth_in, "netns", outside_ns)
            sh("ip", "link", "set", "lo", "up", ns=outside_ns)
            sh("ip", "addr", "add", f"{outside_net}.2/24", "dev", veth_in, ns=outside_ns)
            sh("ip", "link", "set", veth_in, "up", ns=outside_ns)
            sh("ip", "route", "add", c.lab.network, "dev", veth_in, ns=outside_ns)
            for h in c.hosts:
                sh("ip", "route", "add", f"{outside_net}.0/24", "dev", "eth0", ns=c.ns[h])
            vr = nodes["vr"][0]  # routed: the outside network routes to it via its host
            sh("ip", "route", "add", f"{vr['address']}/32", "via", c.addr[vr["host"]], ns=outside_ns)
            responders.append(responder(outside_ns, 8080))
            yield AttackLab(c, f"{outside_net}.2", nodes, gateways)
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
    gw = lab.gateways[guest_vc]
    own_host = lab.node(guest_vc)["host"]
    harmless = op_http("vc.info", {"name": "vb"})
    probes = [
        Probe("api volume.list", m, 8780, op_http("volume.list", {}), tls=True),
        Probe("api volume.rm vb-1", m, 8780, op_http("volume.rm", {"ref": vb1["disk"]}), harmless,
              tls=True),
        Probe("api vc.destroy vb", m, 8780, op_http("vc.destroy", {"name": "vb", "force": True}), harmless,
              tls=True),
        Probe("nbd OPT_LIST", m, 10809, nbd_opt(3)),
        Probe("nbd open vb-1", m, 10809, nbd_opt(1, vb1["disk"].encode())),
    ]
    for h in c.hosts:
        exec_in_vb1 = {"id": "vb/vb-1", "script": "echo pwned > /tmp/pwned", "timeout": 5}
        probes.append(Probe(f"agent {h} vm exec vb-1", c.addr[h], 8781, http("POST", "/v1/vm/exec", exec_in_vb1),
                            http("POST", "/v1/vm/exec", {**exec_in_vb1, "script": "hostname"}), wait=20, tls=True))
        probes += [Probe(f"port {port} on {h}", c.addr[h], port) for port in STAND_INS]
    probes += [Probe(f"port {port} on its gateway", gw, port) for port in STAND_INS]
    # a control from another host crosses the network as the attack would; the gateway's
    # address is only on its own host's taps
    control = {p.name: (own_host if p.address == gw else next(h for h in c.hosts if c.addr[h] != p.address))
               for p in probes}
    return probes, control


def test_guest_reaches_nothing_of_the_hosts(lab: AttackLab) -> None:
    c = lab.c
    va2, vb1 = lab.node("va", 1), lab.node("vb")
    c.exec("vb/vb-1", "echo vb-secret > /root/secret; sync")
    c.exec("va/va-2", "nc -ll -p 7000 -e /bin/hostname </dev/null >/dev/null 2>&1 &")
    probes, control = attacks(lab, "va")
    peer = Probe("peer", va2["address"], 7000)  # its VC peer, on another host
    got = from_guest(c, "va/va-1", [peer, *probes], pings=(va2["address"],))
    # positive control: the same guest, at the same time, reaches its VC peer (TCP and ping)
    assert got.pop("peer") == ("0", b"va-2\n") and got.pop(f"ping {va2['address']}") == ("ping", b"ok"), got
    assert reached(got) == {}, f"a guest reached the hosts: {reached(got)}"
    # nothing the guest sent did anything: vb, its disk and its guest are as they were
    assert [n["state"] for n in c.json("vc", "info", "vb")["nodes"]] == ["running"]
    assert vb1["disk"] in [v["name"] for v in c.json("volume", "list")]
    assert c.exec("vb/vb-1", "cat /root/secret; test -e /tmp/pwned && echo pwned; true").split() == ["vb-secret"]

    # positive control: every port is open and answers from a host namespace (the API
    # ports speak only TLS: there the administrator's certificate gets a real answer)
    with ThreadPoolExecutor(len(probes)) as pool:
        exchanges = dict(zip([p.name for p in probes],
                             pool.map(lambda p: host_exchange(c, control[p.name], p), probes), strict=True))
    answers = {name: data for name, (data, _) in exchanges.items()}
    silent = {name: error for name, (data, error) in exchanges.items() if not data}
    assert silent == {}, f"no answer from a host namespace either (the check would be vacuous): {silent}"
    for p in probes:
        if p.tls:  # the TLS handshake and the request went through, and the request was authorized
            status = answers[p.name].split(b"\r\n", 1)[0]
            assert status.startswith(b"HTTP/1.1 ") and status.split()[1] not in (b"401", b"403"), (p.name, status)
    assert answers["api volume.list"].startswith(b"HTTP/1.1 200") and vb1["disk"].encode() in answers["api volume.list"]
    assert answers["api volume.rm vb-1"].startswith(b"HTTP/1.1 200") and b'"vb"' in answers["api volume.rm vb-1"]
    assert answers["nbd OPT_LIST"].startswith(NBD_MAGIC) and answers["nbd open vb-1"].startswith(NBD_MAGIC)
    assert answers[f"agent {vb1['host']} vm exec vb-1"].startswith(b"HTTP/1.1 200")
    assert b"vb-1" in answers[f"agent {vb1['host']} vm exec vb-1"]
    for p in probes:
        if p.port in STAND_INS:
            assert answers[p.name].startswith(b"seen-from "), (p.name, answers[p.name])


@pytest.mark.parametrize("vc, seen_as", [("va", None), ("vb", "its host"), ("vr", "itself")])
def test_egress_modes(lab: AttackLab, vc: str, seen_as: str | None) -> None:
    """none: no other network; nat: seen as its host's address; routed: as its own; and
    the hosts closed in every mode (va's were tried above)."""
    c = lab.c
    node = lab.node(vc)
    outside = Probe("outside", lab.outside_addr, 8080)
    probes = attacks(lab, vc)[0] if vc != "va" else []
    got = from_guest(c, f"{vc}/{node['name']}", [outside, *probes], pings=(lab.outside_addr,))
    status, answer = got.pop("outside")
    expected = {None: ("1", ""), "its host": ("0", f"seen-from {c.addr[node['host']]}"),
                "itself": ("0", f"seen-from {node['address']}")}
    assert (status, answer.decode().strip()) == expected[seen_as], (vc, status, answer)
    assert got.pop(f"ping {lab.outside_addr}") == ("ping", b"fail" if seen_as is None else b"ok")
    assert reached(got) == {}, f"{vc} ({seen_as or 'none'}) reached the hosts: {reached(got)}"
    # the outside answers a host, so a silent `none` is the filter's doing
    assert from_host(c, c.hosts[0], outside).startswith(b"seen-from ")


def test_bad_egress_is_refused(lab: AttackLab) -> None:
    r = lab.c.cli("vc", "create", "bad", "--template", "tiny", "--nodes", "1", "--egress", "open", check=False)
    assert r.returncode == 2 and r.stderr.strip() == "virtua: error: bad egress 'open': use none, nat, routed", r.stderr
