"""Every endpoint of a real `virtua serve` (and of an agent's API) answers malformed
requests with a 4xx, the error tree's shape and a one-line message naming the problem,
never a 500, and changes nothing. The table covers every operation: generic malformed
bodies plus, built from each operation's own argument model, a wrong type for each
argument (true is not a size, "yes" is not a boolean)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.cli_support import free_port
from virtua.api import ops
from virtua.api.routes import PARAMS, ROUTES, TRANSPORT_ARGUMENTS, request_for
from virtua.cluster.manager import Manager
from virtua.edge import web
from virtua.edge.web import MAX_BODY, type_name
from virtua.errors import InvalidArgument
from virtua.storage.service import Storage


class Daemon:
    def __init__(self, home: Path) -> None:
        self.home = home
        env = dict(os.environ, VIRTUA_HOME=str(home))
        for args in (["pool", "create", "p", "--capacity", "64M"], ["volume", "create", "p/v", "--size", "1M"]):
            subprocess.run([sys.executable, "-m", "virtua.cli", *args], env=env, check=True, capture_output=True)
        self.log_path = home / "serve.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtua.cli", "serve", "--no-agent", "--listen", f"127.0.0.1:{free_port()}",
             "--api-listen", f"127.0.0.1:{free_port()}"],
            env=env, stdout=subprocess.PIPE, stderr=open(self.log_path, "w"), text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("VIRTUA_READY"), line + self.log_path.read_text()
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(home / "virtua.sock")),
                                 base_url="http://virtua", timeout=30)

    def send(self, name: str, args: dict[str, Any]) -> httpx.Response:
        """Operation `name` as the CLI sends it (virtua.api.routes.request_for)."""
        req = request_for(name, args)
        return self.http.request(req.method, req.path, params=req.query,
                                 content=None if req.body is None else json.dumps(req.body))

    def state(self) -> dict[str, Any]:
        """What a malformed request must not change."""
        out: dict[str, Any] = {}
        for name in ("pool.list", "volume.list", "host.list", "vc.list", "template.list", "net.list"):
            r = self.send(name, {})
            assert r.status_code == 200, r.text
            out[name] = r.json()
        for v in out["volume.list"]:
            v.pop("last_write", None)
        out["files"] = sorted(str(p.relative_to(self.home)) for p in self.home.rglob("*")
                              if not p.name.endswith(("-wal", "-shm", "-journal", ".log")))
        return out


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("api") / "home")
    yield d
    d.http.close()
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(20)
    log = d.log_path.read_text(errors="replace")
    assert d.proc.returncode == 0, log
    assert "Traceback" not in log and "internal error" not in log, log


def _deep(n: int) -> bytes:
    return b'{"a":' * n + b"1" + b"}" * n


# (what, body, a part of the expected message)
MALFORMED_BODIES: list[tuple[str, bytes, str]] = [
    ("not JSON", b"size=1G", "not JSON"),
    ("truncated JSON", b'{"ref": "p/v"', "not JSON"),
    ("an array", b'["p/v"]', "must be a JSON object, not an array"),
    ("a string", b'"p/v"', "must be a JSON object, not a string"),
    ("null", b"null", "must be a JSON object, not null"),
    ("a number", b"12", "must be a JSON object, not a number"),
    ("NaN", b'{"x": NaN}', "NaN is not a JSON number"),
    ("Infinity", b'{"x": -Infinity}', "is not a JSON number"),
    ("duplicate keys", b'{"x": 1, "x": 2}', "duplicate key 'x'"),
    ("not UTF-8", b'{"x": "\xff\xfe"}', "not JSON"),
    ("NUL in a string", b'{"x": "a\\u0000b"}', "contains NUL"),
    ("lone surrogate", b'{"x": "\\ud800"}', "lone surrogate"),
    ("nested too deeply", _deep(100_000), "nested too deeply"),
    ("a 5000-digit integer", b'{"x": ' + b"9" * 5000 + b"}", "not JSON"),
    ("unknown argument", b'{"no_such_argument": 1}', "unknown argument 'no_such_argument'"),
]


# a value for each path parameter and template field (virtua.api.routes.PARAMS)
SAMPLE = {"pool": "p", "volume": "v", "snapshot": "s", "image": "v", "vc": "x", "node": "x-1", "host": "h",
          "template": "t", "name": "n", "job": "20261201-000000-abcdef"}
assert set(SAMPLE) == set(PARAMS)


def wrong_value(annotation: Any) -> Any:
    """A JSON value of a type `annotation` does not take."""
    return "yes" if "true or false" in type_name(annotation) else True


def target(name: str) -> tuple[str, str, dict[str, str]]:
    """Method and path of operation `name` for sample names, and its body's template fields."""
    route = ROUTES[name]
    args = {arg: template.format(**SAMPLE) for arg, template in route.args.items()}
    req = request_for(name, args)
    return req.method, req.path, {f: SAMPLE[f] for f in route.fields}


# (operation, what, method, path, body or query, a part of the expected message)
Case = tuple[str, str, str, str, Any, str]


def operation_cases() -> list[Case]:
    cases: list[Case] = []
    for name in ops.operation_names():
        method, path, fields = target(name)
        model = ops.argument_model(name, Manager)
        if method == "GET":  # the arguments are in the query: optional strings
            cases.append((name, "unknown argument", method, path, [("no_such_argument", "1")],
                          "unknown argument 'no_such_argument'"))
            cases.append((name, "NUL", method, path, [("x", "a\0b")], "contains NUL"))
            for arg in model.model_fields:
                if arg not in ROUTES[name].args:
                    cases.append((name, f"{arg} twice", method, path, [(arg, "a"), (arg, "b")], "given twice"))
            continue
        for what, body, msg in MALFORMED_BODIES:
            if what == "unknown argument":
                body = json.dumps({**fields, "no_such_argument": 1}).encode()
            cases.append((name, what, method, path, body, msg))
        for arg, field in model.model_fields.items():
            if arg in ROUTES[name].args:  # from the path: refused in the body
                body = json.dumps({**fields, arg: "p/v"}).encode()
                cases.append((name, f"{arg} in the body", method, path, body, f"{arg!r} is not an argument here"))
                continue
            value = wrong_value(field.annotation)
            body = json.dumps({**fields, arg: value}).encode()
            # the transport supplies these (who is calling): a request naming one is refused by name
            msg = f"{arg} is not an argument" if arg in TRANSPORT_ARGUMENTS else f"argument '{arg}' should be"
            cases.append((name, f"{arg}={value!r}", method, path, body, msg))
        for f in fields:
            body = json.dumps({**fields, f: 7}).encode()
            cases.append((name, f"{f}=7", method, path, body, f"argument '{f}' should be a string, not a number"))
            body = json.dumps({k: v for k, v in fields.items() if k != f}).encode()
            cases.append((name, f"no {f}", method, path, body, f"missing argument '{f}'"))
    return cases


OP_CASES = operation_cases()


def check_error(r: httpx.Response, status: int, error: str, message: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["error"] == error and message in body["message"], body
    assert "\n" not in body["message"] and len(body["message"]) < 400, body


def test_every_operation_refuses_every_malformed_request(daemon: Daemon) -> None:
    assert len(OP_CASES) > 500 and {"volume.create", "vc.create", "vm.exec", "host.add"} <= set(ops.operation_names())
    assert any(n == "template.import" and w.startswith("caller_is_admin=") for n, w, *_ in OP_CASES)
    assert {n for n, *_ in OP_CASES} == set(ops.operation_names())
    before = daemon.state()
    for name, what, method, path, payload, msg in OP_CASES:
        if method == "GET":
            r = daemon.http.request(method, path, params=payload)
        else:
            r = daemon.http.request(method, path, content=payload)
        check_error(r, 400, "InvalidArgument", msg)
        assert name in r.json()["message"] or "NUL" in msg or "surrogate" in msg, (name, what, r.text)
    assert daemon.state() == before


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("volume.create", {"ref": "p/w", "size": True}, "argument 'size' should be a string or an integer, not true"),
        ("volume.create", {"ref": "p/w", "size": 1.5}, "argument 'size' should be"),
        ("volume.create", {"ref": "p/w", "size": -4096}, "must not be negative"),
        ("volume.create", {"ref": "p/w", "size": "1E"}, "bad size"),
        ("volume.create", {"ref": "p/w"}, "missing argument 'size'"),
        ("volume.resize", {"ref": "p/v", "size": 2**64}, "larger than the maximum"),
        ("pool.create", {"name": "q", "overcommit": "2"}, "argument 'overcommit' should be a number or null"),
        ("pool.create", {"name": "nl\n"}, "bad pool name"),
        ("clone", {"source": "p/v", "new": "p/c", "count": "3"}, "argument 'count' should be an integer"),
        ("volume.rm", {"ref": "p/v", "recursive": "false"}, "argument 'recursive' should be true or false"),
        ("vc.create", {"name": "x", "template": "t", "nodes": True}, "argument 'nodes' should be an integer"),
        ("vm.console", {"ref": "x/y", "offset": -1}, "argument 'offset': input should be greater than or equal to 0"),
    ],
)
def test_named_cases(daemon: Daemon, name: str, args: dict[str, Any], message: str) -> None:
    before = daemon.state()
    check_error(daemon.send(name, args), 400, "InvalidArgument", message)
    assert daemon.state() == before


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [  # names in the path reach the operation as they are, and it checks them
        ("POST", "/v1/pools/p/volumes", b'{"name": "w\\n", "size": "1M"}', "bad name"),
        ("POST", "/v1/pools/p/volumes", b'{"name": "a/b", "size": "1M"}', "bad name"),
        ("POST", "/v1/pools/p/volumes/v/snapshots", b'{"name": "s@t"}', "bad name"),
        ("GET", "/v1/pools/p/volumes/v%0A", b"", "bad name"),
        ("GET", "/v1/pools/p/volumes/v@s", b"", "names a snapshot; expected POOL/VOLUME"),
        ("GET", "/v1/pools/p%0A", b"", "bad pool name"),
        ("GET", "/v1/pools/p%00", b"", "contains NUL"),
        ("POST", "/v1/vms/..%20/x/console", b"{}", "bad VC name"),
        ("GET", "/v1/vcs/x%0A", b"", "bad VC name"),
    ],
)
def test_names_in_paths(daemon: Daemon, method: str, path: str, body: bytes, message: str) -> None:
    before = daemon.state()
    check_error(daemon.http.request(method, path, content=body), 400, "InvalidArgument", message)
    assert daemon.state() == before


def test_the_client_refuses_what_has_no_route() -> None:
    """request_for says what the operation would (the CLI's messages stay the same)."""
    for name, args, message in [
        ("no.such.op", {}, "unknown operation 'no.such.op'"),
        ("volume.info", {"ref": "p/v@s"}, "names a snapshot; expected POOL/VOLUME"),
        ("volume.info", {"ref": "p/../v"}, "bad name"),
        ("snapshot.create", {"ref": "p/v"}, "expected POOL/VOLUME@SNAPSHOT"),
        ("pool.info", {"name": "a/b"}, "bad pool name 'a/b'"),
        ("vc.info", {"name": "../x"}, "bad VC name '../x'"),
        ("vm.console", {"ref": "../../x"}, "bad VC name '..'"),
        ("vm.console", {"ref": "x"}, "bad VM 'x': expected VC/NODE"),
        ("volume.info", {}, "volume.info: missing argument 'ref'"),
        ("volume.info", {"ref": 7}, "volume.info: bad ref a number: expected POOL/VOLUME"),
        ("volume.list", {"pool": 7}, "argument 'pool' should be a string or null"),
    ]:
        with pytest.raises(InvalidArgument, match=re.escape(message)):
            request_for(name, args)


def test_oversized_bodies_are_refused_before_reading(daemon: Daemon) -> None:
    big = b'{"ref": "' + b"x" * MAX_BODY + b'"}'
    check_error(daemon.http.post("/v1/pools/p/volumes/v/resize", content=big), 400, "InvalidArgument",
                "over the limit")
    # a claimed length is enough: the server answers without waiting for the body
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.home / "virtua.sock"))
        s.sendall(b"POST /v1/pools HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{")
        reply = b""
        while b"}" not in reply:  # headers and body may come in separate reads
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"over the limit" in reply, reply
    # chunked, no length: cut off once past the limit
    chunks = (b"[" * 65536 for _ in range(32))
    r = daemon.http.post("/v1/pools", content=chunks)
    check_error(r, 400, "InvalidArgument", "over the limit")


def test_oversized_headers_are_refused(daemon: Daemon) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(daemon.home / "virtua.sock"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before the end
            s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 400"), reply


OTHER_ENDPOINTS: list[tuple[str, str, bytes, int, str, str]] = [
    ("POST", "/v1/hosts/register", b"not json", 400, "InvalidArgument", "not JSON"),
    ("POST", "/v1/hosts/register", b"[]", 400, "InvalidArgument", "must be a JSON object"),
    ("POST", "/v1/hosts/register", b"{}", 400, "InvalidArgument", "missing argument 'name'"),
    ("POST", "/v1/hosts/register",
     b'{"name": "h", "address": "127.0.0.1:1", "cores": true, "memory_mb": 512}', 400, "InvalidArgument",
     "argument 'cores' should be an integer, not true"),
    ("POST", "/v1/hosts/register",
     b'{"name": "h", "address": "127.0.0.1:1", "cores": 0, "memory_mb": 512}', 400, "InvalidArgument",
     "greater than or equal to 1"),
    ("POST", "/v1/hosts/register",
     b'{"name": "h", "address": "nowhere", "cores": 1, "memory_mb": 512}', 400, "InvalidArgument", "bad address"),
    ("POST", "/v1/hosts/register",
     b'{"name": "h\\n", "address": "127.0.0.1:1", "cores": 1, "memory_mb": 512}', 400, "InvalidArgument",
     "bad host name"),
    ("POST", "/v1/hosts/register",
     b'{"name": "h", "address": "127.0.0.1:1", "cores": 1, "memory_mb": 512, "admin": true}', 400,
     "InvalidArgument", "unknown argument 'admin'"),
    ("POST", "/v1/hosts/h/heartbeat", b"{", 400, "InvalidArgument", "not JSON"),
    ("POST", "/v1/hosts/h/heartbeat", b'{"vms": {}}', 400, "InvalidArgument", "argument 'vms' should be a list"),
    ("POST", "/v1/hosts/h/heartbeat", b'{"vms": [{"id": 7, "state": "running"}]}', 400, "InvalidArgument",
     "argument 'vms.0.id'"),
    ("POST", "/v1/hosts/h%0A/heartbeat", b"{}", 400, "InvalidArgument", "bad host name"),
    ("PUT", "/v1/vmstate/nope/nope-1", b"x", 404, "NotFound", "does not exist"),
    ("PUT", "/v1/vmstate/..%2F../x", b"x", 404, "NotFound", "no such endpoint"),
    ("PUT", "/v1/vmstate/a%0A/b", b"x", 400, "InvalidArgument", "bad VC name"),
    ("GET", "/v1/vmstate/nope/nope-1", b"", 404, "NotFound", "does not exist"),
    ("GET", "/v1/templates/mini/passwd", b"", 404, "NotFound", "a kernel and an initrd"),
    ("GET", "/v1/templates/..%2F/kernel", b"", 404, "NotFound", "no such endpoint"),
    ("GET", "/v1/templates/nope/kernel", b"", 404, "NotFound", "does not exist"),
    ("GET", "/v1/no/such/thing", b"", 404, "NotFound", "no such endpoint: GET /v1/no/such/thing"),
    ("POST", "/v1/ops/pool.list", b"{}", 404, "NotFound", "no such endpoint"),
    ("PUT", "/v1/pools", b"{}", 405, "InvalidArgument", "method not allowed"),
    ("GET", "/v1/pools/nope", b"", 404, "NotFound", "pool nope does not exist"),
    ("DELETE", "/v1/status", b"", 405, "InvalidArgument", "method not allowed"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "error", "message"), OTHER_ENDPOINTS,
                         ids=[f"{m} {p} {b[:30]!r}" for m, p, b, *_ in OTHER_ENDPOINTS])
def test_other_endpoints(daemon: Daemon, method: str, path: str, body: bytes, status: int, error: str,
                         message: str) -> None:
    before = daemon.state()
    check_error(daemon.http.request(method, path, content=body), status, error, message)
    assert daemon.state() == before


def test_in_process_operations_are_checked_too(tmp_path: Path) -> None:
    """The CLI without a daemon runs the same operations: the same checks apply."""
    st = Storage(tmp_path)
    try:
        ops.run(st, "pool.create", {"name": "p", "capacity": "64M"})
        with pytest.raises(InvalidArgument, match="argument 'size' should be a string or an integer, not true"):
            ops.run(st, "volume.create", {"ref": "p/v", "size": True})
        with pytest.raises(InvalidArgument, match="unknown argument 'sise'"):
            ops.run(st, "volume.create", {"ref": "p/v", "sise": "1M"})
        assert ops.run(st, "volume.list", {}) == []
    finally:
        st.close()


def test_operations_must_declare_checkable_arguments() -> None:
    with pytest.raises(TypeError, match="needs a concrete type annotation"):
        @ops.op("test.untyped")
        def untyped(st: Storage, ref) -> None:  # type: ignore[no-untyped-def]
            pass
    with pytest.raises(TypeError, match=r"\*args cannot be validated"):
        @ops.op("test.kwargs")
        def kwargs(st: Storage, **args: Any) -> None:
            pass
    assert "test.untyped" not in ops.OPS and "test.kwargs" not in ops.OPS


def test_unexpected_exception_is_logged_and_answered_in_the_tree_shape(caplog: pytest.LogCaptureFixture) -> None:
    api = FastAPI()
    web.install(api, logging.getLogger("virtua.test"))

    @api.get("/boom")
    async def boom() -> None:
        raise KeyError("a bug")

    with caplog.at_level(logging.ERROR, logger="virtua.test"):
        r = TestClient(api, raise_server_exceptions=False).get("/boom")
    assert r.status_code == 500
    assert r.json() == {"error": "VirtuaError",
                        "message": "internal error (KeyError) in GET /boom; the server's log has the details"}
    assert any("internal error in GET /boom" in rec.getMessage() and rec.exc_info for rec in caplog.records)


# what ssl.SSLObject.getpeercert() gives for the manager's certificate of the cluster CA
MANAGER_PEERCERT = {
    "subject": ((("organizationalUnitName", "manager"),), (("commonName", "virtua-manager"),)),
    "serialNumber": "0A",
}


class AsManager:
    """The request state virtua.pki.asgi.PeerAwareH11 sets after a TLS handshake with the
    manager's certificate, for an in-process TestClient (which has no TLS)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            scope = {**scope, "state": {**(scope.get("state") or {}), "virtua_local": False,
                                        "virtua_peercert": MANAGER_PEERCERT}}
        await self.app(scope, receive, send)


def test_agent_api_refuses_malformed_bodies(tmp_path: Path) -> None:
    from virtua.cluster.agent import Agent, AgentConfig, build_agent_api

    agent = Agent(AgentConfig(name="h", listen="127.0.0.1:1", manager="https://127.0.0.1:1", home=tmp_path,
                              memory_mb=512, network=False))
    app = build_agent_api(agent)
    # without a client certificate the agent answers nothing else
    bare = TestClient(app, raise_server_exceptions=False)
    check_error(bare.post("/v1/vm/stop", content=b"nope"), 401, "Unauthenticated", "a client certificate")
    client = TestClient(AsManager(app), raise_server_exceptions=False)
    cases = [
        ("/v1/vm/stop", b"nope", "not JSON"),
        ("/v1/vm/stop", b"[]", "must be a JSON object"),
        ("/v1/vm/stop", b"{}", "missing argument 'id'"),
        ("/v1/vm/stop", b'{"id": "a/b", "force": "yes"}', "argument 'force' should be true or false"),
        ("/v1/vm/console", b'{"id": "a/b", "offset": -5}', "greater than or equal to 0"),
        ("/v1/vm/exec", b'{"id": "a/b", "script": "true", "timeout": true}', "argument 'timeout' should be"),
        ("/v1/vm/exec", b'{"id": "a/b", "script": "true", "bogus": 1}', "unknown argument 'bogus'"),
        ("/v1/vm/start", b'{"launch": {"id": "a/b"}}', "argument 'launch.hostname'"),
        ("/v1/vm/start", b'{"launch": {"id": "a/b", "hostname": "h", "cpus": "1", "memory_mb": 64, '
                         b'"kernel_url": "u", "kernel_digest": "d", "cmdline": "", "disks": []}}',
         "argument 'launch.cpus'"),
        ("/v1/prepare", b'{"kernel_url": 5}', "argument 'kernel_url' should be a string"),
        ("/v1/prepare", b"[" * 70000, "nested too deeply"),
        ("/v1/vm/suspend", b'{"id": "a/b", "upload_url": "x" ' + b" " * MAX_BODY + b"}", "over the limit"),
    ]
    for path, body, message in cases:
        check_error(client.post(path, content=body), 400, "InvalidArgument", message)
    check_error(client.get("/v1/nothing"), 404, "NotFound", "no such endpoint")
    assert agent.vms == {}
