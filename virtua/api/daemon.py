"""`virtua serve`: one process that holds the pools, serves every volume over NBD and
answers admin operations on a unix socket ($VIRTUA_HOME/virtua.sock).

Everything runs on one event loop thread: the storage engine is single-threaded by
design, so NBD requests and admin operations never race on a block map.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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


def build_api(storage: Storage) -> Any:
    api = FastAPI(title="virtua", version="0.1")

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
            return ops.run(storage, name, args)
        except VirtuaError as e:
            return JSONResponse(e.to_dict(), status_code=e.http_status)
        except TypeError as e:
            return JSONResponse(InvalidArgument(f"{name}: {e}").to_dict(), status_code=400)

    return api


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

    with contextlib.suppress(FileNotFoundError):
        cfg.api_socket.unlink()
    uv = uvicorn.Server(
        uvicorn.Config(build_api(storage), uds=str(cfg.api_socket), log_level="warning", lifespan="off")
    )
    uv.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    api_task = asyncio.create_task(uv.serve())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = f"{host}:{nbd.port}" if host else ""
    log.info("virtua serve: NBD on %s %s, API on %s (pid %d)", where, nbd_socket, cfg.api_socket, os.getpid())
    print(f"VIRTUA_READY nbd={where or '-'} nbd_socket={nbd_socket} api={cfg.api_socket}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("virtua serve: stopping")
        await nbd.close()  # in-flight requests finish, devices flush
        uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(api_task, 5)
        storage.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.api_socket.unlink()
        log.info("virtua serve: stopped")
