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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from virtua.api import ops
from virtua.errors import InvalidArgument, VirtuaError
from virtua.storage.device import BlockDevice
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
    import_dir: Path | None = None  # default $VIRTUA_HOME/import

    @property
    def api_socket(self) -> Path:
        return self.home / "virtua.sock"


class StorageExports:
    """The pools' volumes and snapshots as NBD exports, with per-export allow-lists."""

    def __init__(self, storage: Storage, allow: dict[str, set[str]]) -> None:
        self.storage = storage
        self.allow = allow
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


def caller_is_admin(request: Request) -> bool:
    """Whether the caller is an administrator: for now whoever reaches the unix socket
    (uvicorn reports no port for it); authenticated identities over TCP come later."""
    server = request.scope.get("server")
    return server is not None and server[1] is None


def build_api(storage: Storage, manager: Any = None) -> Any:
    api = FastAPI(title="virtua", version="0.1")

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
            result = ops.run(storage, name, args, manager, caller_is_admin=caller_is_admin(request))
            if inspect.isawaitable(result):
                result = await result
            return result
        except VirtuaError as e:
            return error(e)
        except TypeError as e:
            return error(InvalidArgument(f"{name}: {e}"))

    if manager is None:
        return api

    @api.post("/v1/hosts/register")
    async def register(request: Request) -> Any:
        try:
            return manager.register_host(await request.json())
        except VirtuaError as e:
            return error(e)
        except (ValueError, TypeError) as e:
            return error(InvalidArgument(f"bad registration: {e}"))

    @api.post("/v1/hosts/{name}/heartbeat")
    async def heartbeat(name: str, request: Request) -> Any:
        body = await request.json()
        return manager.heartbeat(name, body.get("vms", []), body.get("accel"))

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


async def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from virtua.nbd.server import NBDServer
    from virtua.nbd.tls import TLSConfig

    cfg.home.mkdir(parents=True, exist_ok=True)
    storage = Storage(cfg.home)
    for name in storage.pool_paths():  # take every pool now: its lock says who holds it
        storage.pool(name)
    exports = StorageExports(storage, cfg.allow)
    tls = None
    if cfg.tls != "off":
        tls = TLSConfig(cfg.tls_cert, cfg.tls_key, cfg.tls_ca, cfg.tls_psk)
    nbd = NBDServer(exports, tls=tls, tls_mode=cfg.tls)  # type: ignore[arg-type]
    host, port = parse_listen(cfg.listen) if cfg.listen else (None, None)
    nbd_socket = cfg.nbd_socket or cfg.home / "nbd.sock"
    await nbd.start(host=host, port=port, unix_path=str(nbd_socket))

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
    uv = uvicorn.Server(
        uvicorn.Config(build_api(storage, manager), log_level="warning", lifespan="off")
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
    log.info("virtua serve: NBD on %s %s, API on %s and %s (pid %d)", where, nbd_socket, cfg.api_socket, cfg.api_listen, os.getpid())
    print(f"VIRTUA_READY nbd={where or '-'} nbd_socket={nbd_socket} api={cfg.api_socket} api_tcp={cfg.api_listen}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("virtua serve: stopping")
        await nbd.close()  # in-flight requests finish, devices flush
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(api_task, 5)
        await manager.close()
        store.close()
        storage.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.api_socket.unlink()
        log.info("virtua serve: stopped")
