"""Routed private networks per VC: two VCs of three nodes spread over three namespaced
hosts; same-VC traffic flows, other-VC traffic and spoofed sources do not, every host
reaches every VM and no VM reaches a host, and nothing is left behind."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.helpers.netcluster import NetCluster, running_cluster
from virtua.net.lab import sh

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    with running_cluster(tmp_path_factory.mktemp("net")) as c:
        for vc in ("red", "blue"):
            c.json("vc", "create", vc, "--template", "tiny", "--nodes", "3", "--strategy", "cyclic",
                   "--memory", "128M", "--start")
        yield c


def nodes(c: NetCluster, vc: str) -> list[dict]:  # type: ignore[type-arg]
    return c.json("vc", "info", vc)["nodes"]  # type: ignore[no-any-return]


def ping_from_guest(c: NetCluster, ref: str, targets: list[str], count: int = 3) -> dict[str, bool]:
    script = " ".join(
        f"(ping -c {count} -i 0.3 -W 2 {t} >/dev/null 2>&1 && echo {t}=ok || echo {t}=fail) &" for t in targets
    ) + " wait"
    out = c.exec(ref, script, timeout=30)
    result = dict(line.split("=") for line in out.split() if "=" in line)
    return {t: result.get(t) == "ok" for t in targets}


def ping_from_host(c: NetCluster, host: str, target: str) -> bool:
    return sh("busybox", "ping", "-c", "2", "-i", "0.3", "-W", "2", target, ns=c.ns[host], check=False).returncode == 0


def in_echos(c: NetCluster, ref: str) -> int:
    lines = [line.split() for line in c.exec(ref, "grep '^Icmp:' /proc/net/snmp").splitlines()]
    header, values = lines[0], lines[1]
    return int(values[header.index("InEchos")])


def check_matrix(c: NetCluster, deadline_s: float = 20.0) -> None:
    red, blue = nodes(c, "red"), nodes(c, "blue")
    gateways = {n["vc"]: n["gateway"] for n in c.json("net", "list")}
    for group, other in ((red, blue), (blue, red)):
        vc = group[0]["name"].rsplit("-", 1)[0]
        for n in group:
            deadline = time.monotonic() + deadline_s
            same = [m["address"] for m in group if m is not n]
            while True:  # routes converge within a heartbeat or two after a move
                got = ping_from_guest(c, f"{vc}/{n['name']}", same)
                if all(got.values()) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            assert all(got.values()), f"{n['name']} on {n['host']} cannot reach its VC peers: {got}"
            got = ping_from_guest(c, f"{vc}/{n['name']}", [m["address"] for m in other], count=1)
            assert not any(got.values()), f"{n['name']} reaches another VC: {got}"
            # no host is reachable from a VM: neither its own, nor another, nor the manager's
            # (tests/e2e/test_guest_attacks.py tries their ports); its gateway answers a ping
            got = ping_from_guest(c, f"{vc}/{n['name']}", [*c.addr.values(), c.manager_addr], count=1)
            assert not any(got.values()), f"{n['name']} reaches the hosts: {got}"
            gateway = gateways[vc]
            assert ping_from_guest(c, f"{vc}/{n['name']}", [gateway], count=1)[gateway]
    for h in c.hosts:
        for n in red + blue:
            deadline = time.monotonic() + deadline_s
            ok = ping_from_host(c, h, n["address"])
            while not ok and time.monotonic() < deadline:
                time.sleep(1)
                ok = ping_from_host(c, h, n["address"])
            assert ok, f"host {h} cannot reach {n['name']} ({n['address']} on {n['host']})"


def test_same_vc_reaches_other_vc_does_not(cluster: NetCluster) -> None:
    red, blue = nodes(cluster, "red"), nodes(cluster, "blue")
    assert sorted(n["host"] for n in red) == ["h1", "h2", "h3"]
    assert sorted(n["host"] for n in blue) == ["h1", "h2", "h3"]
    subnets = {cluster.json("vc", "info", vc)["subnet"] for vc in ("red", "blue")}
    assert len(subnets) == 2
    check_matrix(cluster)


def test_tcp_within_a_vc_only(cluster: NetCluster) -> None:
    red, blue = nodes(cluster, "red"), nodes(cluster, "blue")
    server = red[1]
    cluster.exec(f"red/{server['name']}", "nc -ll -p 7000 -e /bin/hostname </dev/null >/dev/null 2>&1 &")
    out = cluster.exec(f"red/{red[0]['name']}", f"nc -w 2 {server['address']} 7000 </dev/null; true")
    assert server["name"] in out
    out = cluster.exec(f"blue/{blue[0]['name']}", f"nc -w 2 {server['address']} 7000 </dev/null; echo rc=$?")
    assert server["name"] not in out


def test_spoofed_source_does_not_get_through(cluster: NetCluster) -> None:
    red, blue = nodes(cluster, "red"), nodes(cluster, "blue")
    attacker, victim, posing_as = red[0], blue[0], blue[1]
    a, v = f"red/{attacker['name']}", f"blue/{victim['name']}"
    # control: a plain ping inside the VC does arrive (InEchos counts it)
    before = in_echos(cluster, f"red/{red[1]['name']}")
    assert ping_from_guest(cluster, a, [red[1]["address"]])[red[1]["address"]]
    assert in_echos(cluster, f"red/{red[1]['name']}") > before
    # the attacker takes a blue address and pings a blue node: nothing may arrive
    before = in_echos(cluster, v)
    cluster.exec(a, f"ip addr add {posing_as['address']}/32 dev eth0")
    cluster.exec(a, f"ping -c 3 -W 1 -I {posing_as['address']} {victim['address']} >/dev/null 2>&1; true")
    cluster.exec(a, f"ip addr del {posing_as['address']}/32 dev eth0")
    assert in_echos(cluster, v) == before, "a spoofed packet reached the other VC"
    rules = cluster.json("host", "info", attacker["host"])["leftovers"]["rules"]
    assert "spoofed source" in rules


def test_bad_subnets(cluster: NetCluster) -> None:
    red_subnet = cluster.json("vc", "info", "red")["subnet"]
    r = cluster.cli("vc", "create", "ovl", "--template", "tiny", "--nodes", "1", "--subnet", red_subnet, check=False)
    assert r.returncode == 2 and "overlaps" in r.stderr and "red" in r.stderr, r.stderr
    r = cluster.cli("vc", "create", "hostnet", "--template", "tiny", "--nodes", "1",
                    "--subnet", f"{cluster.net}.0/28", check=False)
    assert r.returncode == 2 and "overlaps" in r.stderr, r.stderr
    r = cluster.cli("vc", "create", "tiny3", "--template", "tiny", "--nodes", "3", "--subnet", "10.250.0.0/30",
                    check=False)
    assert r.returncode == 2 and "too small" in r.stderr, r.stderr
    assert [v["name"] for v in cluster.json("vc", "list")] == ["blue", "red"]


def test_connectivity_follows_remap_and_destroy_leaves_nothing(cluster: NetCluster) -> None:
    c = cluster
    before = {n["name"]: n["host"] for n in nodes(c, "red")}
    c.json("vc", "suspend", "red")
    c.json("vc", "remap", "red", "--strategy", "block", "--mode", "lazy")
    c.json("vc", "resume", "red")
    after = {n["name"]: n["host"] for n in nodes(c, "red")}
    assert after != before and set(after.values()) == {"h1"}, after
    check_matrix(c)
    for vc in ("red", "blue"):
        c.json("vc", "destroy", vc, "--force")
    deadline = time.monotonic() + 10
    while True:
        left = {h: c.json("host", "info", h)["leftovers"] for h in c.hosts}
        if all(not (x["taps"] or x["routes"] or x["rules"]) for x in left.values()):
            break
        assert time.monotonic() < deadline, f"leftovers after destroy: {left}"
        time.sleep(0.5)


def test_guests_fenced_during_a_manager_outage_start_again_on_their_hosts(cluster: NetCluster) -> None:
    """serve frozen (SIGSTOP) past the hosts' fence deadline (TTL - 3 s) but within their
    lease: every host kills its guests, as it must when it cannot renew its lease. When
    serve continues, the hosts report them fenced, and the manager starts each again on
    its own host (it used to leave them stopped for good); one instance each, never two."""
    import os
    import signal

    from tests.helpers.netcluster import guest_instances

    c = cluster
    info = c.json("vc", "create", "fz", "--template", "tiny", "--nodes", "2", "--strategy", "cyclic",
                  "--memory", "128M", "--start")
    placed = {n["name"]: n["host"] for n in info["nodes"]}
    assert c.serve is not None
    os.kill(c.serve.pid, signal.SIGSTOP)
    try:  # until every guest is fenced (TTL - 3 s), then on at once: the hosts' leases still run
        deadline = time.monotonic() + 9
        while time.monotonic() < deadline and any(guest_instances("fz", n) for n in placed):
            time.sleep(0.1)
        assert not any(guest_instances("fz", n) for n in placed), "every guest fenced while the manager is away"
    finally:
        os.kill(c.serve.pid, signal.SIGCONT)
    deadline = time.monotonic() + 90
    while True:
        now = {n["name"]: n for n in nodes(c, "fz")}
        counts = {n: len(guest_instances("fz", n)) for n in placed}
        assert max(counts.values()) <= 1, f"never two instances: {counts}"
        if all(v["state"] == "running" for v in now.values()) and all(counts.values()):
            break
        assert time.monotonic() < deadline, f"not started again: {now}"
        time.sleep(0.5)
    # on its own host (the host reported it fenced), or elsewhere if its host's lease ran
    # out before the manager heard from it again: either way running, and once
    log = (c.tmp / "serve.log").read_text()
    for name, host in placed.items():
        in_place = f"restarting fz/{name} on {host}: its host fenced it" in log
        assert in_place or now[name]["host"] != host, f"{name}: {now[name]}"
    for name in placed:
        assert c.exec(f"fz/{name}", "hostname").strip() == name
    assert any("FENCED" in (c.tmp / f"agent-{h}" / "agent.out").read_text() for h in set(placed.values()))
    c.json("vc", "destroy", "fz", "--force")
