"""The operations' typed routes on a real `virtua serve`, from a plain HTTP client with
the admin certificate over TLS: success, validation errors (400 InvalidArgument, the
project's), not found (404), conflicts (409), what the CLI then sees, and the OpenAPI
document the daemon serves."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cli_support import free_port
from virtua.api.routes import ROUTES, PoolInfo, SnapshotInfo, VolumeInfo
from virtua.pki.credentials import MANAGER, Credentials

pytestmark = pytest.mark.interop


class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = dict(os.environ, VIRTUA_HOME=str(home), COLUMNS="200")
        self.api_port = free_port()
        self.log = home.parent / "serve.log"
        home.mkdir(parents=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{free_port()}",
             "--api-listen", f"127.0.0.1:{self.api_port}"],
            env=self.env, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("VIRTUA_READY"), line + self.log.read_text()
        self.http = httpx.Client(base_url=f"https://127.0.0.1:{self.api_port}", timeout=30,
                                 verify=Credentials(home / "pki" / "admin").client_context(MANAGER))

    def cli_json(self, *args: str) -> Any:
        r = subprocess.run([sys.executable, "-m", "virtua.cli", *args, "--json"], env=self.env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def close(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("typed") / "home")
    try:
        yield d
    finally:
        d.close()
    log = d.log.read_text(errors="replace")
    assert d.proc.returncode == 0, log
    assert "Traceback" not in log and "internal error" not in log, log


def ok(r: httpx.Response, model: Any = None) -> Any:
    assert r.status_code == 200, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    if model is not None:
        model.model_validate(body, strict=True)
    return body


def refused(r: httpx.Response, status: int, error: str, message: str) -> None:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert body["error"] == error and message in body["message"], body


def test_storage_through_the_typed_routes(daemon: Daemon) -> None:
    c = daemon.http
    pool = ok(c.post("/v1/pools", json={"name": "p", "capacity": "256M"}), PoolInfo)
    assert pool["name"] == "p" and pool["capacity"] == 256 << 20
    refused(c.post("/v1/pools", json={"name": "p", "capacity": "256M"}), 409, "AlreadyExists", "p")
    refused(c.post("/v1/pools", json={"name": "q", "capacity": True}), 400, "InvalidArgument",
            "pool.create: argument 'capacity' should be")
    assert ok(c.get("/v1/pools/p"), PoolInfo)["name"] == "p"
    refused(c.get("/v1/pools/nope"), 404, "NotFound", "pool nope does not exist")
    assert [x["name"] for x in ok(c.get("/v1/pools"))] == ["p"]

    # volumes: the name in the body, the pool in the path
    vol = ok(c.post("/v1/pools/p/volumes", json={"name": "v", "size": "8M"}), VolumeInfo)
    assert vol["name"] == "p/v" and vol["size"] == 8 << 20
    refused(c.post("/v1/pools/p/volumes", json={"name": "v", "size": "8M"}), 409, "AlreadyExists", "p/v")
    refused(c.post("/v1/pools/nope/volumes", json={"name": "v", "size": "8M"}), 404, "NotFound", "nope")
    refused(c.post("/v1/pools/p/volumes", json={"name": "w", "size": True}), 400, "InvalidArgument",
            "argument 'size' should be a string or an integer, not true")
    refused(c.post("/v1/pools/p/volumes", json={"name": "w"}), 400, "InvalidArgument", "missing argument 'size'")
    refused(c.post("/v1/pools/p/volumes", json={"name": "w", "size": "1M", "bogus": 1}), 400, "InvalidArgument",
            "unknown argument 'bogus'")
    refused(c.post("/v1/pools/p/volumes", json={"name": "w/x", "size": "1M"}), 400, "InvalidArgument", "bad name")
    refused(c.post("/v1/pools/p/volumes", content=b'{"name": "w", "size": NaN}'), 400, "InvalidArgument",
            "NaN is not a JSON number")
    assert ok(c.get("/v1/pools/p/volumes/v"), VolumeInfo)["size"] == 8 << 20
    refused(c.get("/v1/pools/p/volumes/nope"), 404, "NotFound", "nope")
    assert ok(c.post("/v1/pools/p/volumes/v/resize", json={"size": "16M"}), VolumeInfo)["size"] == 16 << 20
    refused(c.post("/v1/pools/p/volumes/v/resize", json={"size": "1M"}), 400, "InvalidArgument", "shrink")

    # snapshots and clones
    snap = ok(c.post("/v1/pools/p/volumes/v/snapshots", json={"name": "s1"}), SnapshotInfo)
    assert snap["name"] == "p/v@s1" and snap["protected"] is False
    refused(c.post("/v1/pools/p/volumes/v/snapshots", json={"name": "s1"}), 409, "AlreadyExists", "s1")
    assert [s["name"] for s in ok(c.get("/v1/pools/p/volumes/v/snapshots"))] == ["p/v@s1"]
    clone = ok(c.post("/v1/pools/p/volumes/v@s1/clone", json={"new": "p/c"}))
    assert {k: v for k, v in clone.items() if k != "job"} == {"origin": "p/v@s1", "clones": ["p/c"]}
    assert ok(c.get(f"/v1/jobs/{clone['job']}"))["state"] == "done", "a clone is a recorded job"
    assert ok(c.get("/v1/pools/p/volumes/c"), VolumeInfo)["origin"] == "p/v@s1"
    refused(c.request("DELETE", "/v1/pools/p/volumes/v"), 409, "DependencyError", "p/v")
    refused(c.request("DELETE", "/v1/pools/p/volumes/v/snapshots/s1"), 409, "DependencyError", "clone")
    refused(c.request("DELETE", "/v1/pools/p/volumes/v/snapshots/s9"), 404, "NotFound", "s9")
    assert ok(c.get("/v1/pools/p/volumes/v/du"))
    assert ok(c.get("/v1/pools/p/volumes/v/status")) == {"name": "p/v", "connections": []}
    assert ok(c.get("/v1/pools/p/volumes/v@s1/diff"))["size"] == 16 << 20  # taken after the resize

    # query arguments of a GET: optional strings, checked like a body's
    assert sorted(v["name"] for v in ok(c.get("/v1/volumes", params={"pool": "p"}))) == ["p/c", "p/v"]
    refused(c.get("/v1/volumes", params={"pool": "nope"}), 404, "NotFound", "nope")
    refused(c.get("/v1/volumes", params={"size": "1"}), 400, "InvalidArgument", "unknown argument 'size'")
    refused(c.get("/v1/volumes?pool=p&pool=q"), 400, "InvalidArgument", "given twice")

    # the CLI through the same daemon sees the same state
    assert sorted(v["name"] for v in daemon.cli_json("volume", "list")) == ["p/c", "p/v"]
    assert daemon.cli_json("snapshot", "list", "p/v")[0]["clones"] == ["p/c"]

    # removal: a body on DELETE carries the flags
    assert ok(c.request("DELETE", "/v1/pools/p/volumes/c")) == {"removed": ["p/c"]}
    removed = ok(c.request("DELETE", "/v1/pools/p/volumes/v", json={"recursive": True}))["removed"]
    assert set(removed) == {"p/v", "p/v@s1"}
    refused(c.request("DELETE", "/v1/pools/p/volumes/v"), 404, "NotFound", "p/v")
    refused(c.request("DELETE", "/v1/pools/p", json={"force": "yes"}), 400, "InvalidArgument",
            "argument 'force' should be true or false")
    assert ok(c.request("DELETE", "/v1/pools/p")) == {"removed": ["p"]}
    assert daemon.cli_json("pool", "list") == []


def test_cluster_routes_and_the_edges(daemon: Daemon) -> None:
    c = daemon.http
    assert ok(c.get("/v1/vcs")) == [] and ok(c.get("/v1/hosts")) == [] and ok(c.get("/v1/templates")) == []
    refused(c.get("/v1/vcs/nope"), 404, "NotFound", "nope")
    refused(c.post("/v1/vcs/nope/start"), 404, "NotFound", "nope")
    refused(c.post("/v1/vcs", json={"name": "x", "template": "t", "nodes": "2"}), 400, "InvalidArgument",
            "argument 'nodes' should be an integer")
    refused(c.post("/v1/vms/x/x-1/console", json={"offset": -1}), 400, "InvalidArgument",
            "greater than or equal to 0")
    host = ok(c.post("/v1/hosts", json={"name": "register", "address": "127.0.0.1:1", "cores": 1}))
    assert host["name"] == "register"
    refused(c.post("/v1/hosts", json={"name": "register", "address": "127.0.0.1:1"}), 409, "AlreadyExists",
            "register")
    assert ok(c.get("/v1/hosts/register"))["name"] == "register"  # not the agents' endpoint
    assert ok(c.request("DELETE", "/v1/hosts/register"))
    refused(c.get("/v1/hosts/register"), 404, "NotFound", "register")
    # what is not a route
    refused(c.put("/v1/pools", json={}), 405, "InvalidArgument", "method not allowed")
    refused(c.post("/v1/ops/pool.list", json={}), 404, "NotFound", "no such endpoint")
    refused(c.post("/v1/pools", content=b"x" * (2 << 20)), 400, "InvalidArgument", "over the limit")
    # the document the daemon serves names every operation
    doc = ok(c.get("/openapi.json"))
    ids = {op["operationId"] for item in doc["paths"].values() for op in item.values() if "operationId" in op}
    assert set(ROUTES) <= ids
    create = doc["paths"]["/v1/pools/{pool}/volumes"]["post"]["requestBody"]["content"]["application/json"]
    assert create["schema"]["required"] == ["size", "name"]
    # and nobody without a certificate reads it
    ctx = ssl.create_default_context(cafile=str(daemon.home / "pki" / "ca-cert.pem"))
    with httpx.Client(base_url=f"https://127.0.0.1:{daemon.api_port}", verify=ctx, timeout=30) as anon:
        refused(anon.get("/v1/pools"), 401, "Unauthenticated", "client certificate")
        refused(anon.get("/openapi.json"), 401, "Unauthenticated", "client certificate")
