"""Virtual clusters end to end: three namespaced hosts, real QEMU guests on virtua disks."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.netcluster import NetCluster, guest_instances, running_cluster
from virtua.cluster.netplan import tap_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    """The cluster state in a 3-member etcd, one member per host namespace (the other e2e
    modules run on the embedded SQLite store): every test here, HA and crashes included,
    runs against the distributed store."""
    with running_cluster(tmp_path_factory.mktemp("vc"), etcd=True) as c:
        yield c


def debugfs_cat(image: Path, path: str) -> str:
    # replay the journal first: a guest that was powered off holds recent writes there
    subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True)
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True)
    return r.stdout


def counter(c: NetCluster, ref: str) -> int:
    return int(c.exec(ref, "cat /tmp/counter").strip())


def test_vc_of_three_nodes_on_three_hosts(cluster: NetCluster, tmp_path: Path) -> None:
    c = cluster
    t0 = time.monotonic()
    info = c.json(
        "vc",
        "create",
        "lab",
        "--template",
        "tiny",
        "--nodes",
        "3",
        "--strategy",
        "cyclic",
        "--memory",
        "128M",
        "--start",
    )
    boot = time.monotonic() - t0
    nodes = info["nodes"]
    assert [n["state"] for n in nodes] == ["running"] * 3, nodes
    assert sorted(n["host"] for n in nodes) == ["h1", "h2", "h3"], (
        "cyclic spreads one node per host"
    )
    assert len({n["address"] for n in nodes}) == 3
    print(f"3-node VC created and booted in {boot:.1f} s")

    # every node came up with its own hostname and address, and writes them to its disk
    for n in nodes:
        ref = f"lab/{n['name']}"
        out = c.exec(ref, "hostname; ip -4 -o addr show eth0")
        assert out.split()[0] == n["name"]
        assert n["address"] in out
        c.exec(ref, f"echo node={n['name']} > /root/whoami; sync")

    console = c.cli("vm", "console", f"lab/{nodes[1]['name']}").stdout
    assert f"VIRTUA-READY hostname={nodes[1]['name']}" in console

    # a raw pattern written by a guest onto its virtio disk reads back on the host through
    # other NBD clients while the guest still runs: qemu-io on the local socket, nbdinfo
    # over the network with the admin's certificate (the lab address requires TLS)
    ref = f"lab/{nodes[0]['name']}"
    c.exec(ref, "swapoff /dev/vdb; dd if=/dev/zero bs=64k count=1 2>/dev/null | tr '\\000' U > /tmp/p; "
                "dd if=/tmp/p of=/dev/vdb bs=64k seek=32 conv=fsync 2>/dev/null; sync")
    uri = c.local_nbd(f"{nodes[0]['disk']}-swap")
    r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x55 2M 64k", uri], capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    tls_uri = (f"nbds://{c.manager_addr}:10809/{nodes[0]['disk']}-swap"
               f"?tls-certificates={c.home / 'pki' / 'admin'}")
    extents = json.loads(subprocess.run(["nbdinfo", "--map", "--json", tls_uri], capture_output=True, text=True,
                                        check=True).stdout)
    at = [e for e in extents if e["offset"] <= 2 << 20 < e["offset"] + e["length"]]
    assert at and at[0]["type"] & 1 == 0, f"the written range must map as data: {extents}"

    # suspend/resume keeps a counter running in the guest
    c.exec(
        "lab/lab-1",
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done) & sleep 1",
    )
    before = counter(c, "lab/lab-1")
    assert before > 0
    info = c.json("vc", "suspend", "lab")
    assert {n["state"] for n in info["nodes"]} == {"suspended"}
    assert not c.qemu_pids(), "suspended VMs hold no QEMU process"
    time.sleep(1)
    info = c.json("vc", "resume", "lab")
    assert {n["state"] for n in info["nodes"]} == {"running"}
    after = counter(c, "lab/lab-1")
    assert after >= before, f"counter restarted: {before} -> {after}"
    time.sleep(1)
    assert counter(c, "lab/lab-1") > after, "the counter keeps running after resume"
    done = {(j["op"], j["args"].get("name"), j["state"]) for j in c.json("job", "list", "--all")}
    assert {("vc.suspend", "lab", "done"), ("vc.resume", "lab", "done")} <= done, done

    # each clone holds its own hostname; the template is unchanged
    c.json("vc", "stop", "lab")
    for n in nodes:
        img = tmp_path / f"{n['name']}.raw"
        c.cli("volume", "export", n["disk"], str(img))
        assert debugfs_cat(img, "/root/whoami").strip() == f"node={n['name']}"
        assert debugfs_cat(img, "/etc/hostname").strip() == n["name"]
        info_vol = c.json("volume", "info", n["disk"])
        assert info_vol["origin"] == "default/template-tiny@base" and info_vol["shared"] > 0
    tmpl = tmp_path / "template.raw"
    c.cli("volume", "export", "default/template-tiny@base", str(tmpl))
    assert debugfs_cat(tmpl, "/root/whoami") == ""
    assert "lab" not in debugfs_cat(tmpl, "/etc/hostname")

    # vc reset: every node disk back to the template
    c.json("vc", "reset", "lab")
    img = tmp_path / "reset.raw"
    c.cli("volume", "export", nodes[0]["disk"], str(img))
    assert debugfs_cat(img, "/root/whoami") == ""

    # vc update: upgrade the template once, snapshot it, rebase every node disk onto it. A
    # template is read-only over NBD (no host or guest writes it): the upgrade is a clone.
    tmpl_uri = c.local_nbd("default/template-tiny")
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x7e 60M 64k", tmpl_uri], capture_output=True, text=True)
    assert r.returncode != 0 or "wrote" not in r.stdout, "a template took a write over NBD"
    c.json("clone", "default/template-tiny@base", "default/tiny-next")
    next_uri = c.local_nbd("default/tiny-next")
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x7e 60M 64k", next_uri], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    c.json("snapshot", "create", "default/tiny-next@v2")
    info = c.json("vc", "update", "lab", "--template", "default/tiny-next@v2")
    assert info["snapshot"] == "default/tiny-next@v2"
    for n in nodes:
        assert c.json("volume", "info", n["disk"])["origin"] == "default/tiny-next@v2"
        uri = c.local_nbd(n["disk"])
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x7e 60M 64k", uri], capture_output=True, text=True)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout
    r = c.cli("vc", "update", "lab", "--template", "tiny@nope", check=False)
    assert r.returncode == 3 and "does not exist" in r.stderr

    # destroy frees every volume, process and tap
    c.json("vc", "destroy", "lab")
    c.json("volume", "rm", "default/tiny-next", "--recursive")
    names = [v["name"] for v in c.json("volume", "list")]
    assert not [n for n in names if "vc-lab" in n], names
    assert not c.qemu_pids()
    for h in c.hosts:
        left = c.json("host", "info", h)["leftovers"]
        assert left["taps"] == [] and left["routes"] == [], left
    assert c.json("pool", "check", "default")["ok"]


def test_remap_moves_a_suspended_vc(cluster: NetCluster) -> None:
    c = cluster
    info = c.json(
        "vc",
        "create",
        "mv",
        "--template",
        "tiny",
        "--nodes",
        "2",
        "--strategy",
        "cyclic",
        "--mode",
        "lazy",
        "--memory",
        "128M",
        "--start",
    )
    assert sorted(n["host"] for n in info["nodes"]) == ["h1", "h2"]
    c.exec(
        "mv/mv-2",
        "(i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done) & sleep 1",
    )
    before = counter(c, "mv/mv-2")
    r = c.cli("vc", "remap", "mv", "--strategy", "block", check=False)
    assert r.returncode != 0 and "suspend" in r.stderr, "remap of a running VC is refused"
    c.json("vc", "suspend", "mv")
    info = c.json("vc", "remap", "mv", "--strategy", "block")
    assert [n["host"] for n in info["nodes"]] == ["h1", "h1"]
    info = c.json("vc", "resume", "mv")
    assert [(n["host"], n["state"]) for n in info["nodes"]] == [("h1", "running")] * 2
    assert counter(c, "mv/mv-2") >= before
    c.json("vc", "destroy", "mv", "--force")


def test_drain_moves_vms_off_a_host(cluster: NetCluster) -> None:
    c = cluster
    info = c.json("vc", "create", "dr", "--template", "tiny", "--nodes", "3", "--strategy", "cyclic",
                  "--mode", "lazy", "--memory", "128M", "--start")
    assert sorted(n["host"] for n in info["nodes"]) == ["h1", "h2", "h3"]
    result = c.json("host", "drain", "h2")
    assert result["state"] == "draining" and len(result["moved"]) == 1
    info = c.json("vc", "info", "dr")
    assert "h2" not in [n["host"] for n in info["nodes"]]
    assert [n["state"] for n in info["nodes"]] == ["running"] * 3
    assert c.json("host", "info", "h2")["vms"] == []
    r = c.cli("vc", "create", "dr2", "--template", "tiny", "--nodes", "3", "--strategy", "cyclic",
              "--mode", "lazy", "--memory", "128M", check=False)
    placed = {n["host"] for n in c.json("vc", "info", "dr2")["nodes"]} if r.returncode == 0 else set()
    assert "h2" not in placed, "nothing is placed on a draining host"
    for vc in ("dr", "dr2"):
        c.cli("vc", "destroy", vc, "--force", check=False)
    assert c.json("host", "undrain", "h2")["state"] == "online"
    c.wait_hosts(3)


def test_vms_of_a_dead_host_restart_elsewhere(cluster: NetCluster) -> None:
    c = cluster
    info = c.json("vc", "create", "ha", "--template", "tiny", "--nodes", "3", "--strategy", "cyclic",
                  "--mode", "lazy", "--memory", "128M", "--start")
    on_h3 = [n["name"] for n in info["nodes"] if n["host"] == "h3"]
    assert len(on_h3) == 1
    # the host dies: its agent and its QEMU processes are gone
    c.kill_agent("h3")
    for qpid in (c.tmp / "agent-h3" / "vms").glob("*/qemu.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(qpid.read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:
        nodes = {n["name"]: n for n in c.json("vc", "info", "ha")["nodes"]}
        moved = nodes[on_h3[0]]
        if moved["host"] != "h3" and moved["state"] == "running":
            break
        assert time.monotonic() < deadline, f"not restarted elsewhere: {moved}"
        time.sleep(1)
    assert c.exec(f"ha/{on_h3[0]}", "hostname").strip() == on_h3[0]
    assert [h["state"] for h in c.json("host", "list") if h["name"] == "h3"] == ["offline"]
    c.json("vc", "destroy", "ha", "--force")
    c.start_agent("h3")
    c.wait_hosts(3)


def test_an_agent_killed_alone_leaves_no_second_writer(cluster: NetCluster) -> None:
    """The adversarial run of issue 14: kill -9 of h3's agent only left its QEMU running;
    the manager restarted the VM on another host and both instances wrote one disk. Now
    h3's fence watchdog kills the old instance before h3's lease runs out, the manager
    restarts it elsewhere only after, and the old instance's disk is fenced at the NBD
    server too (its session closed, its reconnects refused) should it still run."""
    c = cluster
    info = c.json("vc", "create", "hb", "--template", "tiny", "--nodes", "3", "--strategy", "cyclic",
                  "--mode", "lazy", "--memory", "128M", "--start")
    (node,) = [n for n in info["nodes"] if n["host"] == "h3"]
    name, disk = node["name"], node["disk"]

    def instances() -> list[int]:
        return guest_instances("hb", name)

    def disk_holders() -> list[str | None]:
        return [h["tls_identity"] for h in c.json("volume", "status", disk)["connections"]]

    assert len(instances()) == 1 and disk_holders() == ["h3"], "control: one instance, on h3"
    c.kill_agent("h3")  # its QEMU goes on running, its watchdog too
    killed_at = time.monotonic()
    counts: list[int] = []
    fenced_at = None
    deadline = time.monotonic() + 90
    while True:
        counts.append(len(instances()))
        if counts[-1] == 0 and fenced_at is None:
            fenced_at = time.monotonic()
        moved = {n["name"]: n for n in c.json("vc", "info", "hb")["nodes"]}[name]
        if moved["host"] != "h3" and moved["state"] == "running":
            break
        assert time.monotonic() < deadline, f"not restarted elsewhere: {moved}"
        time.sleep(0.3)
    restarted_at = time.monotonic()
    assert max(counts) == 1, f"never two instances: {counts}"
    assert fenced_at is not None and fenced_at - killed_at < 10, "h3 fenced its guest before its lease ran out"
    assert restarted_at - killed_at < 30, "restarted elsewhere within 30 s"
    assert "FENCED" in (c.tmp / "agent-h3" / "agent.out").read_text(), "and says so in its log"
    new_host = moved["host"]
    assert len(instances()) == 1
    assert disk_holders() == [new_host], "only the new instance holds the disk"
    assert c.exec(f"hb/{name}", "hostname").strip() == name
    tap = tap_name("hb", node["index"])
    assert subprocess.run(["ip", "-n", c.ns["h3"], "link", "show", tap], capture_output=True).returncode == 0, \
        "control: the fenced instance's tap is still on h3"
    c.start_agent("h3")
    c.wait_hosts(3)
    deadline = time.monotonic() + 30
    while subprocess.run(["ip", "-n", c.ns["h3"], "link", "show", tap], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "h3 came back: the fenced instance's tap goes"
        time.sleep(0.5)
    assert len(instances()) == 1 and disk_holders() == [new_host]
    assert c.exec(f"hb/{name}", "hostname").strip() == name, "the one left is the new one"
    c.json("vc", "destroy", "hb", "--force")


def test_a_stopped_agent_fences_its_guests_and_they_run_once_elsewhere(cluster: NetCluster) -> None:
    """SIGSTOP of h2's agent only: its guests keep running until its watchdog kills them
    (the agent cannot renew its lease); the VM is restarted elsewhere only after, and when
    the agent continues it runs nothing twice."""
    c = cluster
    info = c.json("vc", "create", "st", "--template", "tiny", "--nodes", "2", "--strategy", "cyclic",
                  "--mode", "lazy", "--memory", "128M", "--start")
    (node,) = [n for n in info["nodes"] if n["host"] == "h2"]
    name = node["name"]

    def instances() -> int:
        return len(guest_instances("st", name))

    assert instances() == 1
    agent = c.agents["h2"]
    os.kill(agent.pid, signal.SIGSTOP)
    counts = []
    try:
        deadline = time.monotonic() + 90
        while True:
            counts.append(instances())
            moved = {n["name"]: n for n in c.json("vc", "info", "st")["nodes"]}[name]
            if moved["host"] != "h2" and moved["state"] == "running":
                break
            assert time.monotonic() < deadline, f"not restarted elsewhere: {moved}"
            time.sleep(0.3)
        assert max(counts) == 1 and 0 in counts, f"fenced, then restarted; never two: {counts}"
    finally:
        os.kill(agent.pid, signal.SIGCONT)
    c.wait_hosts(3)
    time.sleep(3)
    assert instances() == 1, "the agent came back: still one instance"
    assert c.exec(f"st/{name}", "hostname").strip() == name
    c.json("vc", "destroy", "st", "--force")


def test_a_partitioned_host_fences_its_guest_and_it_runs_once_elsewhere(cluster: NetCluster) -> None:
    """h3's link down for 30 s (its etcd member cut off with it; h1 and h2 keep a quorum):
    h3 cannot renew its lease and kills its guest, the manager restarts the VM elsewhere
    only after, and when the link is back h3 runs nothing twice and etcd has 3 members."""
    c = cluster
    info = c.json("vc", "create", "pt", "--template", "tiny", "--nodes", "3", "--strategy", "cyclic",
                  "--mode", "lazy", "--memory", "128M", "--start")
    (node,) = [n for n in info["nodes"] if n["host"] == "h3"]
    name = node["name"]

    def instances() -> int:
        return len(guest_instances("pt", name))

    assert instances() == 1
    subprocess.run(["ip", "-n", c.ns["h3"], "link", "set", "eth0", "down"], check=True)
    cut = time.monotonic()
    counts, moved_at = [], None
    try:
        while time.monotonic() - cut < 30:
            counts.append(instances())
            if moved_at is None:
                moved = {n["name"]: n for n in c.json("vc", "info", "pt")["nodes"]}[name]
                if moved["host"] != "h3" and moved["state"] == "running":
                    moved_at = time.monotonic() - cut
            time.sleep(0.3)
    finally:
        subprocess.run(["ip", "-n", c.ns["h3"], "link", "set", "eth0", "up"], check=True)
    assert moved_at is not None and moved_at < 30, f"restarted elsewhere within 30 s: {counts}"
    assert max(counts) == 1 and 0 in counts, f"fenced, then restarted; never two: {counts}"
    assert "FENCED" in (c.tmp / "agent-h3" / "agent.out").read_text()
    c.wait_hosts(3, timeout=90)
    for _ in range(10):  # back on the network: still one instance
        assert instances() == 1
        time.sleep(0.3)
    assert c.exec(f"pt/{name}", "hostname").strip() == name
    from virtua.cluster.etcd_pki import client_context, client_credentials
    from virtua.cluster.etcd_server import wait_healthy

    ctx = client_context(client_credentials(c.home))
    for url in c.etcd_urls.split(","):  # the cut-off member caught up with the others
        wait_healthy(url, timeout=30, context=ctx)
    c.json("vc", "destroy", "pt", "--force")


def test_an_etcd_quorum_loss_keeps_one_writer_and_serve(cluster: NetCluster) -> None:
    """Two of the three etcd members frozen for longer than a host's lease: admin commands
    fail at once with "no quorum" (exit 10), serve survives (its claim on the prefix, lapsed
    with its lease, is taken again: a 15 s outage used to stop serve, and every guest's disk
    with it), and the guest rides the outage out: the same QEMU all along. It did not, one
    run in two: serve's loop, which answers the heartbeats, waited on the frozen members
    for each store call, past the host's fence deadline (now the first call is bounded and
    the rest fail at once while a thread of the store waits for the quorum)."""
    c = cluster
    info = c.json("vc", "create", "qq", "--template", "tiny", "--nodes", "1", "--memory", "128M", "--start")
    try:
        _quorum_loss(c, info["nodes"][0])
    finally:  # a VC left behind would fail the tests after this one
        c.cli("vc", "destroy", "qq", "--force", check=False)


def _quorum_loss(c: NetCluster, node: dict) -> None:  # type: ignore[type-arg]
    before = guest_instances("qq", node["name"])
    assert len(before) == 1, before
    members = [int((c.home / "lab" / h / "etcd" / "etcd.pid").read_text()) for h in ("h1", "h2")]
    for pid in members:
        os.killpg(pid, signal.SIGSTOP)
    try:
        out = time.monotonic()
        r = c.cli("host", "drain", "h3", check=False)
        assert r.returncode == 10 and "no quorum" in r.stderr, (r.returncode, r.stderr)
        seen = []
        while time.monotonic() - out < 15:  # past TTL - 3 s, when a host that lost its lease fences
            seen.append(guest_instances("qq", node["name"]))
            time.sleep(0.5)
        assert all(now == before for now in seen), f"one and the same instance all along: {before} then {seen}"
    finally:
        for pid in members:
            os.killpg(pid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while True:
        r = c.cli("vc", "info", "qq", "--json", check=False)
        if r.returncode == 0 and json.loads(r.stdout)["nodes"][0]["state"] == "running":
            break
        assert "needs the manager" not in r.stderr, "serve stopped after the outage"
        assert time.monotonic() < deadline, r.stdout + r.stderr
        time.sleep(0.5)
    for _ in range(6):
        assert guest_instances("qq", node["name"]) == before, "the guest ran on through the outage"
        time.sleep(0.5)


def test_template_import(cluster: NetCluster, tmp_path: Path) -> None:
    c = cluster
    img = c.home / "import" / "root.raw"  # the daemon's import directory: the only place it reads
    c.cli("volume", "export", "default/template-tiny@base", str(img))
    info = c.json("template", "import", "copy", str(img))
    assert info["snapshot"] == "default/template-copy@base" and info["size"] == img.stat().st_size
    assert "copy" in [t["name"] for t in c.json("template", "list")]
    r = c.cli("template", "import", "copy", str(img), check=False)
    assert r.returncode == 4
    c.json("template", "rm", "copy")
    img.unlink()


def test_bad_input(cluster: NetCluster) -> None:
    c = cluster

    def fails(code: int, *args: str, match: str) -> None:
        r = c.cli(*args, check=False)
        assert r.returncode == code, (r.returncode, r.stderr)
        assert re.search(match, r.stderr), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr

    fails(
        3,
        "vc",
        "create",
        "x",
        "--template",
        "nope",
        "--nodes",
        "1",
        match="template nope does not exist",
    )
    # 3 hosts x 2 cores: 7 single-vCPU nodes cannot be placed strictly
    fails(
        9,
        "vc",
        "create",
        "big",
        "--template",
        "tiny",
        "--nodes",
        "7",
        "--memory",
        "128M",
        match=r"cannot place 7 VMs .* strict mode: host h1 has 0 free cores of 2",
    )
    fails(2, "vc", "create", "bad!", "--template", "tiny", "--nodes", "1", match="bad VC name")
    fails(
        2,
        "vc",
        "create",
        "sub",
        "--template",
        "tiny",
        "--nodes",
        "9",
        "--subnet",
        "10.200.9.0/29",
        match="too small",
    )
    assert [
        v for v in c.json("volume", "list") if "vc-big" in v["name"] or "vc-sub" in v["name"]
    ] == []
    c.json("vc", "create", "dup", "--template", "tiny", "--nodes", "1", "--memory", "128M")
    fails(4, "vc", "create", "dup", "--template", "tiny", "--nodes", "1", match="already exists")
    fails(3, "vc", "start", "nope", match="does not exist")  # refused before a job is recorded
    began = c.json("vc", "start", "dup", "--no-wait")  # a job: progress in nodes up
    deadline = time.monotonic() + 120
    while (job := c.json("job", "show", began["job"]))["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "done" and job["op"] == "vc.start", job
    assert job["progress"] == {"done": 1, "total": 1, "unit": "VMs"}, job["progress"]
    assert [n["state"] for n in c.json("vc", "info", "dup")["nodes"]] == ["running"]
    fails(5, "vc", "destroy", "dup", match="running.*--force")
    # stop, suspend and resume are jobs too; what refuses them does so before one is recorded
    fails(3, "vc", "stop", "nope", match="does not exist")
    fails(2, "vc", "resume", "dup", match="not suspended")
    began = c.json("vc", "stop", "dup", "--no-wait")
    while (job := c.json("job", "show", began["job"]))["state"] == "running":
        assert time.monotonic() < deadline, job
        time.sleep(0.5)
    assert job["state"] == "done" and job["op"] == "vc.stop", job
    assert job["progress"] == {"done": 1, "total": 1, "unit": "VMs"}, job["progress"]
    assert [n["state"] for n in c.json("vc", "info", "dup")["nodes"]] == ["stopped"]
    fails(2, "vc", "suspend", "dup", match="no running node")
    ops = [j["op"] for j in c.json("job", "list", "--all") if j["args"].get("name") == "dup"]
    assert "vc.stop" in ops and "vc.suspend" not in ops and "vc.resume" not in ops, ops
    c.json("vc", "destroy", "dup", "--force")
    assert c.json("vc", "list") == []


def test_host_vanishing_mid_create_rolls_back(cluster: NetCluster) -> None:
    c = cluster
    c.kill_agent("h3", signal.SIGKILL)  # still "online" for a few seconds: placement picks it
    try:
        r = c.cli(
            "vc",
            "create",
            "gone",
            "--template",
            "tiny",
            "--nodes",
            "3",
            "--strategy",
            "cyclic",
            "--memory",
            "128M",
            check=False,
        )
        assert r.returncode == 10 and "h3" in r.stderr, r.stderr
        assert c.json("vc", "list") == []
        assert not [v for v in c.json("volume", "list") if "vc-gone" in v["name"]]
        assert c.json("pool", "check", "default")["ok"]
    finally:
        c.start_agent("h3")
        c.wait_hosts(3)


def test_a_manager_killed_mid_create_is_undone_at_its_next_start(cluster: NetCluster) -> None:
    """serve is SIGKILLed when vc create has cloned the disks, made the swaps and written
    the seeds (the journal says step 3, prepare hosts, began): its next start removes them."""
    c = cluster
    c.stop_manager()
    c.start_manager(env={"VIRTUA_JOB_CRASH": "vc.create:3:begin"})
    try:
        r = c.cli("vc", "create", "cut", "--template", "tiny", "--nodes", "2", "--memory", "128M", check=False)
        assert r.returncode != 0
        assert c.serve is not None and c.serve.wait(timeout=30) == -signal.SIGKILL
    finally:
        c.start_manager()
    c.wait_hosts(3)
    assert c.json("vc", "list") == []
    assert not [v for v in c.json("volume", "list") if "vc-cut" in v["name"]], "disks, swaps and seeds undone"
    job = next(j for j in c.json("job", "list", "--all") if j["op"] == "vc.create" and j["args"]["name"] == "cut")
    assert job["state"] == "undone" and "interrupted" in job["error"], job
    assert [s["state"] for s in job["steps"]] == ["undone"] * 4 + ["pending"], job["steps"]
    assert c.json("pool", "check", "default")["ok"]
    info = c.json("vc", "create", "cut", "--template", "tiny", "--nodes", "2", "--memory", "128M")
    assert [n["name"] for n in info["nodes"]] == ["cut-1", "cut-2"], "control: the same create now works"
    c.json("vc", "destroy", "cut", "--force")


def test_manager_restart_keeps_vms_running(cluster: NetCluster) -> None:
    c = cluster
    c.json(
        "vc",
        "create",
        "keep",
        "--template",
        "tiny",
        "--nodes",
        "2",
        "--strategy",
        "cyclic",
        "--memory",
        "128M",
        "--start",
    )
    pids = c.qemu_pids()
    assert len(pids) == 2
    c.stop_manager()
    time.sleep(1)
    assert sorted(c.qemu_pids()) == sorted(pids), "VMs keep running without the manager"
    c.start_manager()
    info = c.json("vc", "info", "keep")
    assert [n["state"] for n in info["nodes"]] == ["running", "running"]
    # the guests' disks reconnect to the restarted NBD server
    out = c.exec("keep/keep-1", "echo after > /root/after; sync; cat /root/after", timeout=60)
    assert "after" in out
    c.json("vc", "destroy", "keep", "--force")


def test_a_manager_killed_while_a_created_vc_starts_keeps_it(cluster: NetCluster) -> None:
    """serve is SIGKILLed after `vc create --start` has made every step and started the VMs,
    before the job is ended (VIRTUA_JOB_CRASH=vc.create:finish). Its next start undid the
    whole job: the VC forgotten and its disks removed under the running guests. Now the VC,
    its disks and its guests are kept, and the job says it was interrupted."""
    c = cluster
    c.stop_manager()
    c.start_manager(env={"VIRTUA_JOB_CRASH": "vc.create:finish"})
    try:
        r = c.cli("vc", "create", "late", "--template", "tiny", "--nodes", "2", "--memory", "128M", "--start",
                  check=False)
        assert r.returncode != 0
        assert c.serve is not None and c.serve.wait(timeout=60) == -signal.SIGKILL
        pids = c.qemu_pids()
        assert len(pids) == 2, "control: both guests were started"
    finally:
        c.start_manager()
    c.wait_hosts(3)
    assert [vc["name"] for vc in c.json("vc", "list")] == ["late"]
    disks = {v["name"] for v in c.json("volume", "list") if "vc-late" in v["name"]}
    assert {"default/vc-late-1", "default/vc-late-2"} <= disks, disks
    assert sorted(c.qemu_pids()) == sorted(pids), "the guests run on, on their disks"
    job = next(j for j in c.json("job", "list", "--all") if j["op"] == "vc.create" and j["args"]["name"] == "late")
    assert job["state"] == "failed" and "what it made is kept" in job["error"], job
    c.json("vc", "destroy", "late", "--force")
