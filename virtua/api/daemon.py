"""`virtua serve`: one process that holds the pools, serves every volume over NBD and
answers admin operations on a unix socket ($VIRTUA_HOME/virtua.sock).

Everything runs on one event loop thread: the storage engine is single-threaded by
design, so NBD requests and admin operations never race on a block map.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import inspect
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from virtua.api import ops
from virtua.edge import web
from virtua.edge.limits import ConnectionLimits
from virtua.errors import Busy, InvalidArgument, NoSpace, NotFound, VirtuaError
from virtua.storage.device import BlockDevice
from virtua.storage.names import check_name
from virtua.storage.service import Storage

log = logging.getLogger("virtua.serve")


@dataclass
class ServeConfig:
    home: Path
    listen: str | None = "127.0.0.1:10809"
    nbd_socket: Path | None = None
    tls: str = "off"
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
    # connection limits of every listener (NBD and API, TCP and unix): see virtua.edge.limits
    handshake_timeout: float = ConnectionLimits.handshake_timeout
    max_connections_per_source: int = ConnectionLimits.max_connections_per_source
    import_dir: Path | None = None  # default $VIRTUA_HOME/import

    @property
    def limits(self) -> ConnectionLimits:
        """The limits of every listener, NBD and API (InvalidArgument on a bad value)."""
        return ConnectionLimits(
            handshake_timeout=self.handshake_timeout,
            max_connections_per_source=self.max_connections_per_source,
            max_handshakes_per_source=min(ConnectionLimits.max_handshakes_per_source,
                                          self.max_connections_per_source),
        )

    @property
    def api_socket(self) -> Path:
        return self.home / "virtua.sock"

    @property
    def admin_nbd_socket(self) -> Path:
        return admin_nbd_socket(self.home)


def admin_nbd_socket(home: Path) -> Path:
    """The administrator's NBD socket (the CLI's import/export): in a 0700 directory."""
    return home / "private" / "nbd.sock"


class AdminExports:
    """The same exports (and devices) for the local administrator: only the owner of the
    private directory can reach this socket, so neither TLS nor the allow-list applies."""

    def __init__(self, exports: StorageExports) -> None:
        self.exports = exports

    def open_export(self, name: str) -> BlockDevice | None:
        return self.exports.open_export(name)

    def list_exports(self) -> list[tuple[str, str]]:
        return self.exports.list_exports()

    def allowed(self, name: str, identity: str | None) -> bool:
        return True


class StorageExports:
    """The pools' volumes and snapshots as NBD exports, with per-export allow-lists."""

    def __init__(self, storage: Storage, allow: dict[str, set[str]]) -> None:
        self.storage = storage
        self.allow = allow
        self._devices: dict[str, BlockDevice] = {}

    def open_export(self, name: str) -> BlockDevice | None:
        dev = self._devices.get(name)
        if dev is not None and _alive(dev) and _still_named(dev, name):
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
        if not rules:
            return True
        return identity is not None and any(identity in ids for ids in rules)


def _alive(dev: BlockDevice) -> bool:
    vol = getattr(dev, "vol", None)
    if vol is not None:
        return not vol.deleted
    snap = getattr(dev, "snap", None)
    pool = getattr(dev, "pool", None)
    return snap is None or pool is None or snap.id in pool.snapshots


def _still_named(dev: BlockDevice, name: str) -> bool:
    """A renamed (or trashed) volume or snapshot no longer answers to its old name."""
    pool = getattr(dev, "pool", None)
    vol = getattr(dev, "vol", None)
    snap = getattr(dev, "snap", None)
    if pool is None:
        return True
    if vol is not None:
        return bool(name == f"{pool.name}/{vol.name}")
    if snap is not None:
        return bool(name == pool.snapshot_ref(snap))
    return True


def parse_allow(rules: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in rules:
        pattern, sep, ids = rule.partition("=")
        if not sep or not pattern or not ids:
            raise InvalidArgument(f"bad --allow {rule!r}: expected EXPORT-GLOB=ID[,ID...]")
        out.setdefault(pattern, set()).update(i for i in ids.split(",") if i)
    return out


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise InvalidArgument(f"bad --listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


class Registration(BaseModel):
    """What an agent sends to /v1/hosts/register (Agent.registration)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: str
    address: str  # HOST:PORT of the agent's API
    cores: Annotated[int, Field(ge=1, le=1 << 16)]
    memory_mb: Annotated[int, Field(ge=1, le=1 << 40)]
    templates: list[str] | None = None
    accel: str = "unknown"
    networks: list[str] = Field(default_factory=list)


class VMReport(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: str
    state: str
    error: str | None = None
    pid: int | None = None


class Heartbeat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    vms: list[VMReport] = Field(default_factory=list)
    accel: str | None = None


# A saved VM state is the guest's memory and its devices' state: at most twice the
# memory plus this, whatever a client claims.
_STATE_SLACK = 64 << 20


def caller_is_admin(request: Request) -> bool:
    """Whether the caller is an administrator: for now whoever reaches the unix socket
    (uvicorn reports no port for it); authenticated identities over TCP come later."""
    server = request.scope.get("server")
    return server is not None and server[1] is None


def build_api(storage: Storage, manager: Any = None) -> Any:
    api = FastAPI(title="virtua", version="0.1")
    web.install(api, log)
    error = web.error_response

    @api.get("/v1/status")
    async def status() -> dict[str, Any]:
        return {"pid": os.getpid(), **storage.summary()}

    @api.post("/v1/ops/{name}")
    async def run_op(name: str, request: Request) -> Any:
        # async on purpose: runs on the loop thread, never beside an NBD request
        try:
            args = await web.json_object(request, name)
            result = ops.run(storage, name, args, manager, caller_is_admin=caller_is_admin(request))
            if inspect.isawaitable(result):
                result = await result
            return result
        except VirtuaError as e:
            return error(e)

    if manager is None:
        return api

    @api.post("/v1/hosts/register")
    async def register(request: Request) -> Any:
        try:
            reg = web.validated(Registration, await web.json_object(request, "registration"), "registration")
            host, sep, port = reg.address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise InvalidArgument(f"registration: bad address {reg.address[:80]!r}: expected HOST:PORT")
            return manager.register_host(reg.model_dump())
        except VirtuaError as e:
            return error(e)

    @api.post("/v1/hosts/{name}/heartbeat")
    async def heartbeat(name: str, request: Request) -> Any:
        try:
            check_name(name, "host name")
            beat = web.validated(Heartbeat, await web.json_object(request, "heartbeat"), "heartbeat")
            return manager.heartbeat(name, [vm.model_dump() for vm in beat.vms], beat.accel)
        except VirtuaError as e:
            return error(e)

    @api.get("/v1/templates/{name}/{which}")
    async def template_file(name: str, which: str) -> Any:
        try:
            if which not in ("kernel", "initrd"):
                raise NotFound(f"a template has a kernel and an initrd, not {which!r}")
            return FileResponse(manager.template_file(check_name(name, "template name"), which))
        except VirtuaError as e:
            return error(e)

    @api.put("/v1/vmstate/{vc}/{node}")
    async def put_state(vc: str, node: str, request: Request) -> Any:
        try:
            path = manager.save_state_upload(f"{check_name(vc, 'VC name')}/{check_name(node, 'node name')}")
            limit = 2 * (manager.vc(vc).memory_mb << 20) + _STATE_SLACK
            return await _store_upload(request, path, limit)
        except VirtuaError as e:
            return error(e)

    @api.get("/v1/vmstate/{vc}/{node}")
    async def get_state(vc: str, node: str) -> Any:
        try:
            return FileResponse(manager.state_file(f"{vc}/{node}"))
        except VirtuaError as e:
            return error(e)

    return api


async def _store_upload(request: Request, path: Path, limit: int) -> dict[str, Any]:
    """Stream a body into `path` (atomically: a .part file, fsync, rename), at most `limit` bytes."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise InvalidArgument(f"upload of {length[:40]} bytes to {path.name}: over the limit of {limit}")
    tmp = path.with_suffix(".part")
    size = 0
    try:
        with open(tmp, "wb") as f:
            async for block in request.stream():
                size += len(block)
                if size > limit:
                    raise InvalidArgument(f"upload to {path.name}: over the limit of {limit} bytes")
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        cls = NoSpace if e.errno == errno.ENOSPC else VirtuaError
        raise cls(f"cannot store {path.name}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"stored": str(path), "size": path.stat().st_size}


def _bind_tcp(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise _listen_error(listen, e) from e
    s.listen(128)
    s.setblocking(False)
    return s


def _listen_error(listen: str, e: OSError) -> VirtuaError:
    import errno

    if e.errno == errno.EADDRINUSE:
        return Busy(f"cannot listen on {listen}: address already in use (is another virtua serve running?)")
    return InvalidArgument(f"cannot listen on {listen}: {e.strerror}")


def _bind_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(128)
    s.setblocking(False)
    return s


def start_local_agent(cfg: ServeConfig, advertise: str, api_port: int) -> int | None:
    """Start `virtua agent` for this machine unless one already runs; it outlives us."""
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "--home", str(agent_home), "agent",
         "--listen", cfg.agent_listen, "--manager", f"http://{advertise}:{api_port}"],
        stdout=logf, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    log.info("started the local agent (pid %d) on %s", proc.pid, cfg.agent_listen)
    return proc.pid


def _raise_open_files_limit() -> None:
    """Every listener admits up to ConnectionLimits.max_connections connections: the usual
    soft limit of 1024 descriptors would fail accept() (EMFILE) for everyone first."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from virtua.nbd.server import NBDServer
    from virtua.nbd.tls import TLSConfig

    cfg.home.mkdir(parents=True, exist_ok=True)
    _raise_open_files_limit()
    storage = Storage(cfg.home)
    for name in storage.pool_paths():  # take every pool now: its lock says who holds it
        storage.pool(name)
    exports = StorageExports(storage, cfg.allow)
    tls = None
    if cfg.tls != "off":
        tls = TLSConfig(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_psk)
    lim = cfg.limits
    nbd = NBDServer(
        exports, tls=tls, tls_mode=cfg.tls, holders=storage.holders,  # type: ignore[arg-type]
        max_connections=lim.max_connections, max_connections_per_source=lim.max_connections_per_source,
        max_handshakes=lim.max_handshakes, max_handshakes_per_source=lim.max_handshakes_per_source,
        handshake_timeout=lim.handshake_timeout,
    )
    host, port = parse_listen(cfg.listen) if cfg.listen else (None, None)
    nbd_socket = cfg.nbd_socket or cfg.home / "nbd.sock"
    try:
        await nbd.start(host=host, port=port, unix_path=str(nbd_socket))
    except OSError as e:
        storage.close()
        raise _listen_error(cfg.listen or str(nbd_socket), e) from e
    admin_socket = cfg.admin_nbd_socket
    admin_socket.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(admin_socket.parent, 0o700)
    admin_nbd = NBDServer(AdminExports(exports), holders=storage.holders)  # type: ignore[arg-type]
    await admin_nbd.start(host=None, port=None, unix_path=str(admin_socket))

    from virtua.cluster.manager import Manager
    from virtua.cluster.store import SQLiteStore

    api_host, api_port = parse_listen(cfg.api_listen)
    advertise = cfg.advertise or (api_host if api_host not in ("0.0.0.0", "") else "127.0.0.1")
    store = SQLiteStore(cfg.home / "manager.db")
    manager = Manager(
        cfg.home, storage, store, advertise=advertise, nbd_port=nbd.port or 10809,
        api_port=api_port, host_networks=cfg.host_networks, import_dir=cfg.import_dir,
    )
    await manager.start()
    sockets = [_bind_unix(cfg.api_socket), _bind_tcp(cfg.api_listen)]
    from virtua.edge.guard import MAX_HEADER_BYTES, guarded_protocol
    from virtua.edge.limits import Admission

    # the API's listeners (unix socket and TCP) share one set of counts, apart from NBD's
    api_admission = Admission(lim, logging.getLogger("virtua.api"), "api")
    uv = uvicorn.Server(
        uvicorn.Config(
            build_api(storage, manager), log_level="warning", lifespan="off",
            http=guarded_protocol(api_admission), timeout_keep_alive=5,
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        )
    )
    uv.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    api_task = asyncio.create_task(uv.serve(sockets=sockets))
    if cfg.local_agent:
        start_local_agent(cfg, advertise, api_port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = f"{host}:{nbd.port}" if host else ""
    tls_mode = {"off": "off (plaintext)", "on": "on (offered)", "require": "required"}[cfg.tls]
    if cfg.tls != "off":
        tls_mode += " with " + " and ".join(k for k, v in (("X.509", cfg.tls_cert), ("PSK", cfg.tls_psk)) if v)
    log.info("virtua serve: NBD on %s %s, TLS %s, API on %s and %s (pid %d)", where, nbd_socket, tls_mode,
             cfg.api_socket, cfg.api_listen, os.getpid())
    print(f"VIRTUA_READY nbd={where or '-'} nbd_socket={nbd_socket} tls={cfg.tls} api={cfg.api_socket} "
          f"api_tcp={cfg.api_listen}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("virtua serve: stopping")
        await nbd.close()  # in-flight requests finish, devices flush
        await admin_nbd.close()
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(api_task, 5)
        await manager.close()
        store.close()
        storage.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.api_socket.unlink()
        log.info("virtua serve: stopped")
