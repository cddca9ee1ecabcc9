"""`virtua serve --etcd`: a real etcd (etcd-server 3.4), a real `virtua serve --no-agent
--etcd URL` and a real agent (--no-network) on loopback. The host's record is read from
etcd directly (its JSON gateway, not through virtua); serve restarted against the same etcd
still knows the host; an etcd that does not answer at start stops serve at once (exit 10,
one line); etcd stopped under a running serve is a one-line Unavailable (exit 10) and
serve recovers when etcd is back, without calling its hosts offline."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_support import free_port
from virtua.cluster.etcd_server import Member, start_member, wait_healthy

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]


class Etcd:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.me = Member("solo", "127.0.0.1", free_port(), free_port())
        self.token = uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return self.me.client_url

    def start(self) -> None:
        self.proc = start_member(self.me, [self.me], self.dir, self.token)  # the same data dir each time
        wait_healthy(self.url)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def get(self, key: str) -> dict[str, Any] | None:
        """A key read through etcd's own gateway, not through virtua."""
        r = httpx.post(f"{self.url}/v3/kv/range", json={"key": base64.b64encode(key.encode()).decode()}, timeout=5)
        r.raise_for_status()
        kvs = r.json().get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None


class Serve:
    def __init__(self, tmp: Path, etcd_url: str) -> None:
        self.tmp = tmp
        self.home = tmp / "home"
        self.agent_home = tmp / "agent"
        self.env = dict(os.environ, VIRTUA_HOME=str(self.home), COLUMNS="200")
        self.etcd_url = etcd_url
        self.api_port, self.agent_port, self.nbd_port = free_port(), free_port(), free_port()
        self.log = tmp / "serve.log"
        self.proc: subprocess.Popen[str] | None = None
        self.agent: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{self.nbd_port}",
             "--api-listen", f"127.0.0.1:{self.api_port}", "--etcd", self.etcd_url],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().startswith("VIRTUA_READY"), self.log.read_text()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(timeout=30) == 0, self.log.read_text()

    def start_agent(self, name: str, token_file: Path | None) -> None:
        self.agent = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "--home", str(self.agent_home), "agent", "--name", name,
             "--listen", f"127.0.0.1:{self.agent_port}", "--manager", f"https://127.0.0.1:{self.api_port}",
             "--no-network", *(["--join-token-file", str(token_file)] if token_file else [])],
            env=self.env, stdout=open(self.tmp / f"agent-{name}.log", "a"), stderr=subprocess.STDOUT, text=True,
        )

    def stop_agent(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.send_signal(signal.SIGTERM)
            self.agent.wait(timeout=20)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=60)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h["name"]: h for h in json.loads(self.cli("host", "list", "--json").stdout)}


def wait_for(cond, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.fixture
def etcd() -> Iterator[Etcd]:
    d = Path(tempfile.mkdtemp(prefix="vt-serve-etcd-"))
    e = Etcd(d)
    try:
        yield e
    finally:
        e.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def plane(etcd: Etcd, tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path, etcd.url)
    try:
        s.start()
        yield s
    finally:
        s.stop_agent()
        if s.proc is not None and s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def test_serve_keeps_the_cluster_state_in_etcd(plane: Serve, etcd: Etcd) -> None:
    assert f"cluster state in etcd at {etcd.url} under /virtua/" in plane.log.read_text()
    token = plane.tmp / "a1.token"
    plane.cli("host", "join-token", "--ttl", "10m", "--output", str(token))
    plane.start_agent("a1", token)
    wait_for(lambda: plane.hosts().get("a1", {}).get("alive"), "agent a1 to join and register")
    plain = plane.cli("host", "list").stdout
    assert "a1" in plain and "127.0.0.1" in plain

    rec = etcd.get("/virtua/hosts/a1")  # the record itself, from etcd
    assert rec is not None and rec["name"] == "a1" and rec["address"] == f"127.0.0.1:{plane.agent_port}"
    assert not (plane.home / "manager.db").exists()  # no state of the cluster's on the serve host

    # serve restarted against the same etcd, the agent away: only etcd can tell it about a1
    plane.stop_agent()
    plane.stop()
    plane.start()
    assert "a1" in plane.hosts()
    plane.start_agent("a1", None)  # joined already: its certificate is in its home
    wait_for(lambda: plane.hosts().get("a1", {}).get("alive"), "a1 back with the restarted serve")

    # etcd stopped under a running serve: a clear Unavailable, not a traceback
    before = len(plane.log.read_text())  # (a1 was silent across the restart: offline then is right)
    etcd.stop()
    t = time.monotonic()
    r = plane.cli("host", "list", check=False)
    assert r.returncode == 10, (r.returncode, r.stderr)
    assert r.stderr.startswith("virtua: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"etcd at {etcd.url} unreachable" in r.stderr
    assert time.monotonic() - t < 15
    time.sleep(8)  # longer than the heartbeat timeout: no heartbeat is recorded meanwhile
    assert "Traceback" not in plane.log.read_text()
    etcd.start()
    wait_for(lambda: plane.cli("host", "list", check=False).returncode == 0, "serve to answer again")
    wait_for(lambda: plane.hosts()["a1"]["alive"], "a1's heartbeats recorded again")
    time.sleep(3)  # a few rounds of the host watch
    log = plane.log.read_text()[before:]
    assert "host a1 is offline" not in log, log  # an outage of the store is no host's silence
    assert "host watch: etcd at" in log and "Traceback" not in log
    assert plane.hosts()["a1"]["state"] == "online"


def test_serve_stops_at_once_when_etcd_does_not_answer(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    s = Serve(tmp_path, closed)
    t = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{s.nbd_port}",
         "--api-listen", f"127.0.0.1:{s.api_port}", "--etcd", closed],
        env=s.env, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 10, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""  # never ready
    assert r.stderr.startswith(f"virtua: error: etcd at {closed} unreachable: ") and r.stderr.count("\n") == 1, r.stderr
    assert time.monotonic() - t < 10
    assert not (s.home / "nbd.sock").exists() and not (s.home / "pki").exists()  # nothing started
