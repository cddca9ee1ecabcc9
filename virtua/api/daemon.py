"""`virtua serve`: one process that holds the pools, serves every volume over NBD and
answers admin operations on a unix socket ($VIRTUA_HOME/virtua.sock).

Everything runs on one event loop thread: the storage engine is single-threaded by
design, so NBD requests and admin operations never race on a block map.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import inspect
import json
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from virtua.api import ops
from virtua.api.auth import AuthMiddleware, may_act_as_host
from virtua.errors import InvalidArgument, VirtuaError
from virtua.pki.asgi import PeerAwareH11, tls_gate
from virtua.storage.device import BlockDevice
from virtua.storage.service import Storage

log = logging.getLogger("virtua.serve")


@dataclass
class ServeConfig:
    home: Path
    listen: str | None = "127.0.0.1:10809"
    nbd_socket: Path | None = None
    # auto: the cluster CA's credentials; TLS required on a non-loopback NBD address,
    # offered on loopback; each host's certificate opens only its own VMs' disks
    tls: str = "auto"
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_psk: str | None = None
    allow: dict[str, set[str]] = field(default_factory=dict)  # export glob -> identities
    api_listen: str = "127.0.0.1:8780"  # the manager's API for agents (TCP)
    advertise: str | None = None  # the address agents and VMs use to reach this host
    local_agent: bool = True
    agent_listen: str = "127.0.0.1:8781"
    host_networks: list[str] = field(default_factory=list)
    ca_cert: Path | None = None  # an administrator-supplied cluster CA (first start only)
    ca_key: Path | None = None

    @property
    def api_socket(self) -> Path:
        return self.home / "virtua.sock"

    @property
    def pki_dir(self) -> Path:
        return self.home / "pki"


class StorageExports:
    """The pools' volumes and snapshots as NBD exports, with per-export allow-lists."""

    def __init__(
        self, storage: Storage, allow: dict[str, set[str]],
        host_access: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.storage = storage
        self.allow = allow
        # (export, TLS identity) -> may it open it: the manager's per-host allow-list
        self.host_access = host_access
        self._devices: dict[str, BlockDevice] = {}

    def open_export(self, name: str) -> BlockDevice | None:
        dev = self._devices.get(name)
        if dev is not None and _alive(dev):
            return dev
        dev = self.storage.open_export(name)
        if dev is not None:
            self._devices[name] = dev  # one device per export: multi-conn shares it
        else:
            self._devices.pop(name, None)
        return dev

    def list_exports(self) -> list[tuple[str, str]]:
        return self.storage.list_exports()

    def allowed(self, name: str, identity: str | None) -> bool:
        rules = [ids for pattern, ids in self.allow.items() if fnmatch.fnmatchcase(name, pattern)]
        if rules:  # the administrator's explicit --allow rules come first
            return identity is not None and any(identity in ids for ids in rules)
        if identity is None or self.host_access is None:
            # plaintext got this far only where the listener allows it (unix socket,
            # loopback); without the cluster policy every identity may
            return True
        return self.host_access(name, identity)


def _alive(dev: BlockDevice) -> bool:
    vol = getattr(dev, "vol", None)
    if vol is not None:
        return not vol.deleted
    snap = getattr(dev, "snap", None)
    pool = getattr(dev, "pool", None)
    return snap is None or pool is None or snap.id in pool.snapshots


def parse_allow(rules: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in rules:
        pattern, sep, ids = rule.partition("=")
        if not sep or not pattern or not ids:
            raise InvalidArgument(f"bad --allow {rule!r}: expected EXPORT-GLOB=ID[,ID...]")
        out.setdefault(pattern, set()).update(i for i in ids.split(",") if i)
    return out


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"bad --listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_api(storage: Storage, manager: Any = None) -> Any:
    """The admin API; with a manager that has a cluster CA, every request passes the
    AuthMiddleware (see virtua.api.auth) first."""
    api = FastAPI(title="virtua", version="0.1")
    if manager is not None and getattr(manager, "authority", None) is not None:
        api.add_middleware(
            AuthMiddleware, revoked=manager.authority.revoked.__contains__, owners_of=manager.owners_of,
            admin_token=manager.authority.is_admin_token,
        )

    def error(e: VirtuaError) -> JSONResponse:
        return JSONResponse(e.to_dict(), status_code=e.http_status)

    @api.get("/v1/status")
    async def status() -> dict[str, Any]:
        return {"pid": os.getpid(), **storage.summary()}

    @api.post("/v1/ops/{name}")
    async def run_op(name: str, request: Request) -> Any:
        # async on purpose: runs on the loop thread, never beside an NBD request
        try:
            body = await request.body()
            args = json.loads(body) if body else {}
            if not isinstance(args, dict):
                raise InvalidArgument("arguments must be a JSON object")
            result = ops.run(storage, name, args, manager)
            if inspect.isawaitable(result):
                result = await result
            return result
        except VirtuaError as e:
            return error(e)
        except TypeError as e:
            return error(InvalidArgument(f"{name}: {e}"))

    if manager is None:
        return api

    @api.get("/v1/join/ca")
    async def join_ca() -> Any:
        return {"ca": manager.authority.ca_pem.decode(), "sha256": manager.authority.fingerprint}

    @api.post("/v1/join")
    async def join(request: Request) -> Any:
        peer = request.client.host if request.client else "?"
        body: Any = None
        try:
            body = await _json_object(request, JOIN_BODY_MAX, "join request")
            return manager.join(str(body.get("token", "")), str(body.get("name", "")),
                                str(body.get("csr", "")), str(body.get("address", "")), peer=peer)
        except VirtuaError as e:
            log.warning("refused join of %r from %s: %s", _field(body, "name"), peer, e.message)
            return error(e)
        except ValueError as e:
            return error(InvalidArgument(f"bad join request: {e}"))

    @api.post("/v1/hosts/register")
    async def register(request: Request) -> Any:
        try:
            body = await _json_object(request, HOST_BODY_MAX, "registration")
            caller = getattr(request.state, "virtua_caller", None)
            if caller is not None:
                may_act_as_host(caller, str(_field(body, "name")))
            return manager.register_host(body)
        except VirtuaError as e:
            return error(e)
        except (ValueError, TypeError) as e:
            return error(InvalidArgument(f"bad registration: {e}"))

    @api.post("/v1/hosts/{name}/heartbeat")
    async def heartbeat(name: str, request: Request) -> Any:
        try:
            body = await _json_object(request, HOST_BODY_MAX, "heartbeat")
            vms, accel = body.get("vms", []), body.get("accel")
            if not isinstance(vms, list) or not all(isinstance(v, dict) for v in vms):
                raise InvalidArgument("bad heartbeat: vms must be a list of objects")
            if accel is not None and not isinstance(accel, str):
                raise InvalidArgument("bad heartbeat: accel must be a string")
            return manager.heartbeat(name, vms, accel)
        except VirtuaError as e:
            return error(e)

    @api.get("/v1/templates/{name}/{which}")
    async def template_file(name: str, which: str) -> Any:
        try:
            return FileResponse(manager.template_file(name, which))
        except VirtuaError as e:
            return error(e)

    @api.put("/v1/vmstate/{vc}/{node}")
    async def put_state(vc: str, node: str, request: Request) -> Any:
        try:
            path = manager.save_state_upload(f"{vc}/{node}")
        except VirtuaError as e:
            return error(e)
        tmp = path.with_suffix(".part")
        with open(tmp, "wb") as f:
            async for block in request.stream():
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return {"stored": str(path), "size": path.stat().st_size}

    @api.get("/v1/vmstate/{vc}/{node}")
    async def get_state(vc: str, node: str) -> Any:
        try:
            return FileResponse(manager.state_file(f"{vc}/{node}"))
        except VirtuaError as e:
            return error(e)

    return api


JOIN_BODY_MAX = 64 << 10  # a CSR and a token: the unauthenticated endpoint reads no more
HOST_BODY_MAX = 4 << 20  # a heartbeat lists a host's VMs


async def _json_object(request: Request, limit: int, what: str) -> dict[str, Any]:
    """The body as a JSON object, read up to `limit` bytes (then refused, not buffered)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise InvalidArgument(f"{what} too large (more than {limit} bytes)")
    try:
        body = json.loads(data) if data else {}
    except ValueError as e:
        raise InvalidArgument(f"bad {what}: not JSON ({e})") from e
    if not isinstance(body, dict):
        raise InvalidArgument(f"bad {what}: expected a JSON object")
    return body


def _field(body: Any, key: str) -> Any:
    return body.get(key) if isinstance(body, dict) else None


def _bind_tcp(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise InvalidArgument(f"cannot listen on {listen}: {e.strerror}") from e
    s.listen(128)
    s.setblocking(False)
    return s


def _bind_unix(path: Path) -> socket.socket:
    """The admin socket: 0600 from the moment it exists (root, or whoever runs serve)."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(128)
    s.setblocking(False)
    return s


def start_local_agent(cfg: ServeConfig, advertise: str, api_port: int, manager: Any) -> int | None:
    """Start `virtua agent` for this machine unless one already runs; it outlives us.
    It joins like any other host, with a one-time token in a 0600 file."""
    import subprocess
    import sys

    agent_home = cfg.home / "agent"
    agent_home.mkdir(parents=True, exist_ok=True)
    pidfile = agent_home / "agent.pid"
    try:
        pid = int(pidfile.read_text())
        os.kill(pid, 0)
        if b"agent" in Path(f"/proc/{pid}/cmdline").read_bytes():
            log.info("local agent already running (pid %d)", pid)
            return pid
    except (OSError, ValueError):
        pass
    logf = open(agent_home / "agent.log", "ab")
    token_file = agent_home / "join-token"
    manager.write_join_token(token_file, ttl=600)
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "--home", str(agent_home), "agent",
         "--listen", cfg.agent_listen, "--manager", f"https://{advertise}:{api_port}",
         "--join-token-file", str(token_file)],
        stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    log.info("started the local agent (pid %d) on %s", proc.pid, cfg.agent_listen)
    return proc.pid


async def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from virtua.nbd.server import NBDServer
    from virtua.nbd.tls import TLSConfig
    from virtua.pki.ca import ClusterCA

    cfg.home.mkdir(parents=True, exist_ok=True)
    api_host, api_port = parse_listen(cfg.api_listen)
    advertise = cfg.advertise or (api_host if api_host not in ("0.0.0.0", "") else "127.0.0.1")
    sans = list(dict.fromkeys([advertise, "127.0.0.1", "localhost", *([api_host] if api_host not in ("0.0.0.0", "") else [])]))
    authority = ClusterCA.ensure(cfg.pki_dir, manager_sans=sans, supplied_cert=cfg.ca_cert, supplied_key=cfg.ca_key)
    storage = Storage(cfg.home)
    for name in storage.pool_paths():  # take every pool now: its lock says who holds it
        storage.pool(name)
    exports = StorageExports(storage, cfg.allow)
    host, port = parse_listen(cfg.listen) if cfg.listen else (None, None)
    tls = None
    tls_mode = cfg.tls
    if cfg.tls == "auto":
        creds = authority.manager
        tls = TLSConfig(str(creds.cert), str(creds.key), str(creds.ca), crlfile=str(authority.crl_path))
        tls_mode = "on" if host is None or _loopback(host) else "require"
    elif cfg.tls != "off":
        tls = TLSConfig(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_psk)
    elif host is not None and not _loopback(host):
        log.warning("NBD on %s without TLS (--tls off): anyone who reaches it opens every export", host)
    # the unix socket is local (root): plaintext there even when TCP requires TLS
    nbd = NBDServer(exports, tls=tls, tls_mode=tls_mode, tls_on_unix=False)  # type: ignore[arg-type]
    nbd_socket = cfg.nbd_socket or cfg.home / "nbd.sock"
    await nbd.start(host=host, port=port, unix_path=str(nbd_socket))
    os.chmod(nbd_socket, 0o600)  # plaintext, every export: root only
    if cfg.tls == "auto" and tls is not None:
        cluster_tls = tls

        def reload_crl() -> None:  # new handshakes see a revocation at once
            nbd.ssl_context = cluster_tls.build_context()

        authority.on_revoke.append(reload_crl)

    from virtua.cluster.manager import Manager
    from virtua.cluster.store import SQLiteStore

    store = SQLiteStore(cfg.home / "manager.db")
    manager = Manager(
        cfg.home, storage, store, advertise=advertise, nbd_port=nbd.port or 10809,
        api_port=api_port, host_networks=cfg.host_networks, authority=authority,
        nbd_tls=tls_mode == "require",
    )
    if cfg.tls == "auto":
        exports.host_access = manager.nbd_access
    await manager.start()
    app = build_api(storage, manager)
    # two servers, one app: the unix socket in plaintext, TCP with TLS (client
    # certificates verified when given; the middleware refuses requests without one)
    uv_local = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", http=PeerAwareH11))
    mcreds = authority.manager
    api_tls = [mcreds.server_context(client_cert="optional", crl=authority.crl_path)]
    authority.on_revoke.append(
        lambda: api_tls.__setitem__(0, mcreds.server_context(client_cert="optional", crl=authority.crl_path))
    )
    uv_tcp = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", lifespan="off", http=tls_gate(lambda: api_tls[0], "manager API"),
    ))
    servers = [uv_local, uv_tcp]
    for uv in servers:
        uv.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    api_tasks = [
        asyncio.create_task(uv_local.serve(sockets=[_bind_unix(cfg.api_socket)])),
        asyncio.create_task(uv_tcp.serve(sockets=[_bind_tcp(cfg.api_listen)])),
    ]
    if cfg.local_agent:
        start_local_agent(cfg, advertise, api_port, manager)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = f"{host}:{nbd.port}" if host else ""
    log.info("virtua serve: NBD on %s %s, API on %s and %s (pid %d)", where, nbd_socket, cfg.api_socket, cfg.api_listen, os.getpid())
    print(f"VIRTUA_READY nbd={where or '-'} nbd_socket={nbd_socket} api={cfg.api_socket} api_tcp={cfg.api_listen}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("virtua serve: stopping")
        await nbd.close()  # in-flight requests finish, devices flush
        for uv in servers:
            uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*api_tasks), 5)
        await manager.close()
        store.close()
        storage.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.api_socket.unlink()
        log.info("virtua serve: stopped")
