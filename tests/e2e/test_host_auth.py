"""Per-host credentials in a real lab: QEMU opens its disks over TLS with its host's
certificate, each host opens exactly the disks of the VMs placed on it (and lists only
those), a remap moves that right, plaintext is refused on the lab's NBD address, a
removed host is revoked, and no key or token shows in the process list or the logs."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.netcluster import NetCluster, running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    with running_cluster(tmp_path_factory.mktemp("auth")) as c:
        yield c


def nbd(c: NetCluster, host: str | None, uri_tail: str, *args: str) -> subprocess.CompletedProcess[str]:
    """nbdinfo from host's namespace with its agent's credentials (None: the admin's,
    from the manager's namespace)."""
    creds = c.tmp / f"agent-{host}" / "pki" if host else c.home / "pki" / "admin"
    sep = "&" if "?" in uri_tail else "?"
    uri = f"nbds://{c.manager_addr}:10809/{uri_tail}{sep}tls-certificates={creds}"
    cmd = ["nbdinfo", *args, uri]
    if host:
        cmd = ["ip", "netns", "exec", c.ns[host], *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def can_open(c: NetCluster, host: str | None, export: str) -> bool:
    r = nbd(c, host, export, "--size")
    return r.returncode == 0 and r.stdout.strip().isdigit()


def listed(c: NetCluster, host: str) -> set[str]:
    r = nbd(c, host, "", "--list", "--json")
    assert r.returncode == 0, r.stderr
    return {e["export-name"] for e in json.loads(r.stdout)["exports"]}


def test_each_host_opens_exactly_its_own_vms_disks(cluster: NetCluster) -> None:
    c = cluster
    info = c.json("vc", "create", "own", "--template", "tiny", "--nodes", "2", "--strategy", "cyclic",
                  "--mode", "lazy", "--memory", "128M", "--start")
    assert [n["host"] for n in info["nodes"]] == ["h1", "h2"]
    assert all(n["state"] == "running" for n in info["nodes"])
    log = (c.tmp / "serve.log").read_text()
    assert "connected to export 'default/vc-own-1' (TLS h1" in log, "QEMU on h1 opened its disk over TLS as h1"
    assert "connected to export 'default/vc-own-2' (TLS h2" in log
    d1, d2 = "default/vc-own-1", "default/vc-own-2"
    assert can_open(c, "h2", d2), "control: h2 opens the disk of its own VM"
    assert not can_open(c, "h2", d1), "h2 may not open a disk of a VM on h1"
    assert not can_open(c, "h3", d1) and not can_open(c, "h3", d2), "h3 runs nothing"
    assert not can_open(c, "h2", "default/template-tiny"), "nor the template"
    assert can_open(c, None, d1), "the admin certificate opens anything"
    assert listed(c, "h2") == {d2, f"{d2}-swap", f"{d2}-seed"}, "OPT_LIST shows only what h2 may open"
    assert listed(c, "h3") == set()
    plain = subprocess.run(["ip", "netns", "exec", c.ns["h2"], "nbdinfo", "--size",
                            f"nbd://{c.manager_addr}:10809/{d2}"], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0, "plaintext is refused on the lab's NBD address"
    assert re.search(r"nbd \('10\.213\.\d+\.12', \d+\): refused option \d+: TLS required",
                     (c.tmp / "serve.log").read_text())
    assert "identity 'h2' may not open export 'default/vc-own-1'" in (c.tmp / "serve.log").read_text()

    # a remap moves the right with the VM
    c.json("vc", "suspend", "own")
    assert not can_open(c, "h2", d2), "a suspended VM's disk is open to nobody but the admin"
    info = c.json("vc", "remap", "own", "--strategy", "block")
    assert [n["host"] for n in info["nodes"]] == ["h1", "h1"]
    info = c.json("vc", "resume", "own")
    assert [(n["host"], n["state"]) for n in info["nodes"]] == [("h1", "running")] * 2
    assert can_open(c, "h1", d2), "after the remap h1 opens the moved VM's disk"
    assert not can_open(c, "h2", d2), "and h2 no longer can"
    assert c.exec("own/own-2", "hostname").strip() == "own-2", "the moved guest runs on its disk"
    c.json("vc", "stop", "own", "--force")
    assert not can_open(c, "h1", d1), "a stopped VM's disk is closed to its old host"
    c.json("vc", "destroy", "own", "--force")


def secrets_of(c: NetCluster) -> list[str]:
    """Every private key's base64 body lines and every join token's secret in the lab."""
    out: list[str] = []
    for key in [*c.tmp.rglob("*-key.pem")]:
        out += [ln for ln in key.read_text().splitlines() if ln and not ln.startswith("-----")]
    for token in c.tmp.rglob("join-token"):
        out.append(token.read_text().split(".")[2])
    return out


def test_no_key_or_token_in_the_process_list_logs_or_json(cluster: NetCluster) -> None:
    c = cluster
    c.json("vc", "create", "sec", "--template", "tiny", "--nodes", "1", "--memory", "128M", "--start")
    secrets = secrets_of(c)
    assert len(secrets) >= 3 * 2 + 3, "the lab holds keys and tokens to look for"
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout  # untruncated
    assert "tls-creds-x509" in ps and "qemu-system" in ps, "the scan covers a running QEMU"
    assert "--join-token-file" in ps, "the scan covers agents started with a token"
    texts = {"ps -eww -o args": ps}
    for f in [*c.tmp.rglob("*.log"), *c.tmp.rglob("*.out")]:
        texts[str(f)] = f.read_text(errors="replace")
    for args in (("host", "list"), ("vc", "info", "sec"), ("host", "info", "h1")):
        texts[" ".join(args)] = c.cli(*args, "--json").stdout
    def leaks(text: str) -> list[str]:
        return [s[:12] for s in secrets if s in text]

    assert leaks((c.home / "pki" / "ca-key.pem").read_text()), "control: the scan finds a key where it is"
    found = {where: leaks(text) for where, text in texts.items() if leaks(text)}
    assert found == {}, found
    c.json("vc", "destroy", "sec", "--force")


def test_a_removed_host_is_revoked_everywhere(cluster: NetCluster) -> None:
    """Last: it revokes h3."""
    c = cluster
    out = c.json("host", "rm", "h3")
    assert out["removed"] == ["h3"] and len(out["revoked"]) == 1
    log = c.tmp / "serve.log"
    deadline = time.monotonic() + 20
    while "refused TLS from" not in log.read_text() or "certificate revoked" not in log.read_text():
        assert time.monotonic() < deadline, "h3's next heartbeat is refused"
        time.sleep(0.3)
    time.sleep(2)
    names = [h["name"] for h in c.json("host", "list")]
    assert names == ["h1", "h2"], "h3 cannot register again"
    r = nbd(c, "h3", "default/template-tiny", "--size")
    assert r.returncode != 0 and not r.stdout.strip(), "h3 opens nothing"
    deadline = time.monotonic() + 10
    while "TLS handshake failed" not in log.read_text():
        nbd_lines = [ln for ln in log.read_text().splitlines() if " nbd " in ln or "virtua.nbd" in ln][-8:]
        assert time.monotonic() < deadline, ("NBD refuses the revoked certificate at the handshake", r.stderr,
                                             nbd_lines)
        time.sleep(0.3)
    assert all(h["alive"] for h in c.json("host", "list")), "control: h1 and h2 still heartbeat"


def test_token_files_are_root_only(cluster: NetCluster) -> None:
    for f in Path(cluster.tmp).rglob("join-token"):
        assert f.stat().st_mode & 0o777 == 0o600, f
