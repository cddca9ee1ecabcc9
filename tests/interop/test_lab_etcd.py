"""`virtua lab up --etcd`: a real 3-member etcd cluster, one member in each lab host's
namespace, with TLS from virtua's own etcd CA; `virtua serve --etcd ...` (the command the
lab prints) keeps the cluster state there. Only the etcd CA's client certificate gets in
(not even the cluster's admin certificate). Killing the etcd leader costs an election and
nothing else: reads and writes keep working. Killing a second member leaves no quorum:
commands fail with one line that says so. `lab down` leaves no etcd process behind."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import processes_under
from virtua.net.lab import Lab

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]


class EtcdLab:
    def __init__(self, tmp: Path) -> None:
        self.home = tmp / "home"
        self.tag = f"ve{uuid.uuid4().hex[:6]}"
        self.prefix = f"10.218.{os.getpid() % 250 + 1}"
        self.env = dict(os.environ, VIRTUA_HOME=str(self.home), PYTHONPATH=str(ROOT), COLUMNS="200")
        self.serve: subprocess.Popen[str] | None = None
        self.serve_log = tmp / "serve.log"

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=120)
        if ok:
            assert r.returncode == 0, r.stdout + r.stderr
        return r

    def json(self, *args: str) -> object:
        return json.loads(self.cli(*args, "--json").stdout)

    def context(self, creds: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.home / "pki" / "etcd" / "ca-cert.pem"))
        ctx.load_cert_chain(creds / "client-cert.pem", creds / "client-key.pem")
        return ctx

    def status(self, url: str) -> dict:  # type: ignore[type-arg]
        req = urllib.request.Request(f"{url}/v3/maintenance/status", data=b"{}", method="POST")
        with urllib.request.urlopen(req, timeout=3, context=self.context(self.home / "pki" / "etcd" / "manager")) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[EtcdLab]:
    run = EtcdLab(tmp_path)
    try:
        yield run
    finally:
        if run.serve is not None and run.serve.poll() is None:
            os.killpg(run.serve.pid, signal.SIGKILL)
            run.serve.wait(10)
        for pid in processes_under(run.home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        Lab(tag=run.tag, prefix=run.prefix, hosts=3).destroy()


def test_lab_up_etcd_serves_the_cluster_state_and_survives_one_member(lab: EtcdLab) -> None:
    up = lab.json("lab", "up", "--hosts", "3", "--etcd", "--prefix", lab.prefix, "--tag", lab.tag,
                  "--cores", "1", "--memory", "512M")
    assert isinstance(up, dict)
    urls = [e.split()[1] for e in up["etcd"]]
    assert urls == [f"https://{lab.prefix}.{11 + i}:2379" for i in range(3)], up
    serve_cmd = up["serve"].split()
    assert serve_cmd[:2] == ["virtua", "serve"] and serve_cmd[-4:] == ["--etcd", ",".join(urls),
                                                                       "--etcd-max-txn-ops", "2048"], up
    lab.serve = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", *serve_cmd[1:]], env=lab.env, stdout=subprocess.PIPE,
        stderr=open(lab.serve_log, "w"), text=True, start_new_session=True,
    )
    assert lab.serve.stdout is not None
    line = lab.serve.stdout.readline()
    assert line.startswith("VIRTUA_READY"), line + lab.serve_log.read_text()
    deadline = time.monotonic() + 90
    while not ((hosts := lab.json("host", "list")) and len(hosts) == 3  # type: ignore[arg-type]
               and all(h["alive"] for h in hosts)):  # type: ignore[union-attr]
        assert time.monotonic() < deadline, hosts
        time.sleep(0.5)

    # the cluster state is in etcd: the manager's keys are there, under /virtua/
    body = json.dumps({"key": base64.b64encode(b"/virtua/").decode(),
                       "range_end": base64.b64encode(b"/virtua0").decode(), "keys_only": True}).encode()
    req = urllib.request.Request(f"{urls[0]}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=3, context=lab.context(lab.home / "pki" / "etcd" / "manager")) as r:
        keys = {base64.b64decode(k["key"]).decode() for k in json.loads(r.read()).get("kvs", [])}
    assert {"/virtua/hosts/h1", "/virtua/hosts/h2", "/virtua/hosts/h3"} <= keys, keys

    # nobody else gets in: no certificate, or the cluster CA's admin certificate
    for creds in (None, lab.home / "pki" / "admin"):
        ctx = ssl.create_default_context(cafile=str(lab.home / "pki" / "etcd" / "ca-cert.pem"))
        if creds is not None:
            ctx.load_cert_chain(creds / "client-cert.pem", creds / "client-key.pem")
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            urllib.request.urlopen(f"{urls[0]}/health", timeout=3, context=ctx).read()

    # kill the leader: an election, and every command still works
    statuses = {u: lab.status(u) for u in urls}
    leader_id = next(iter(statuses.values()))["leader"]
    leader = next(u for u, s in statuses.items() if s["header"]["member_id"] == leader_id)
    host = f"h{urls.index(leader) + 1}"
    pid = int((lab.home / "lab" / host / "etcd" / "etcd.pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    lab.cli("host", "drain", "h2")  # a write, right after the leader died
    assert {h["name"]: h["state"] for h in lab.json("host", "list")}["h2"] in ("draining", "drained")  # type: ignore[union-attr]
    lab.cli("host", "undrain", "h2")

    # kill a second member: no quorum, and every command says so in one line
    other = next(f"h{i + 1}" for i, u in enumerate(urls) if u != leader)
    os.killpg(int((lab.home / "lab" / other / "etcd" / "etcd.pid").read_text()), signal.SIGKILL)
    for args in (("host", "list"), ("host", "drain", "h3")):
        r = lab.cli(*args, ok=False)
        assert r.returncode == 10, r.stderr  # Unavailable
        assert r.stderr.startswith("virtua: error: etcd has no quorum: 1 of 3 member(s) reachable, 2 needed"), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
    assert lab.serve.poll() is None, "serve keeps running without a quorum"

    lab.serve.send_signal(signal.SIGTERM)
    lab.serve.wait(30)
    lab.cli("lab", "down")
    deadline = time.monotonic() + 10
    while left := processes_under(lab.home):
        assert time.monotonic() < deadline, f"left behind by lab down: {left}"
        time.sleep(0.1)
