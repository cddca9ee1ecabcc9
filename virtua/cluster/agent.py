"""`virtua agent`: the daemon of one physical host.

It registers with the manager (name, address, cores, memory, templates), heartbeats,
and runs the VMs the manager assigns it as QEMU processes whose disks are the manager's
NBD exports. QEMU runs in its own session, so VMs outlive an agent restart; a restarted
agent reattaches to them through their pidfiles and QMP sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from virtua.cluster.fence import FENCED_ERROR, Fence, fence_clock, fenced
from virtua.cluster.model import VMLaunch
from virtua.edge import web
from virtua.errors import (
    Forbidden,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
    VirtuaError,
)
from virtua.pki.asgi import peer_address, peer_identity
from virtua.pki.credentials import MANAGER, Credentials
from virtua.pki.identity import MANAGER_NAME

log = logging.getLogger("virtua.agent")

HEARTBEAT_INTERVAL = 1.0
REFUSED_BACKOFF = 10.0  # a revoked host asks again this rarely
_HEX = re.compile(r"[0-9a-f]{1,40}")
JOIN_WAIT = 300.0  # seconds an agent waits for its manager to answer its join
BOOT_TIMEOUT = 180.0


@dataclass
class AgentConfig:
    name: str
    listen: str  # host:port the agent's API listens on (and what it advertises)
    manager: str  # http://host:port
    home: Path
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    memory_mb: int = 0
    templates: list[str] | None = None
    accel: str = "auto"
    network: bool = True
    host_networks: list[str] = field(default_factory=list)
    join_token_file: Path | None = None  # a file, never the command line: ps shows that

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.home / "pki")


@dataclass
class RunningVM:
    id: str
    proc: Any  # virtua.vmm.vm.VMProcess
    launch: VMLaunch
    state: str = "starting"
    error: str | None = None
    # QEMU is being spawned: it writes its pidfile only after opening its disks, so no
    # pid yet does not mean it exited (a "stopped" report would close its disks' access)
    spawning: bool = False


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024


def _safe(vm_id: str) -> str:
    return vm_id.replace("/", "~")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        if not cfg.memory_mb:
            cfg.memory_mb = _memory_mb()
        self.vms: dict[str, RunningVM] = {}
        self.run_dir = cfg.home / "vms"
        self.cache = cfg.home / "cache"
        self.http = httpx.AsyncClient(timeout=600)  # replaced by the mTLS client in start()
        self.accel = "unknown"
        # serials the manager revoked (its heartbeat replies say), kept across restarts: an
        # agent that cannot reach its manager still refuses what it last heard was revoked
        self.revoked: set[int] = set()
        self._revoked_file = cfg.home / "pki-revoked.json"
        with contextlib.suppress(OSError, ValueError, TypeError):
            self.revoked = {int(x) for x in json.loads(self._revoked_file.read_text())}
        self._tasks: list[asyncio.Task[Any]] = []
        self.net: Any = None
        self.fence = Fence(cfg.home)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        creds = await join_cluster(self.cfg)
        await self.http.aclose()
        self.http = httpx.AsyncClient(timeout=600, verify=creds.client_context(MANAGER))
        if self.cfg.network:
            from virtua.net.hostnet import HostNetwork

            self.net = HostNetwork(self.cfg.name, self.cfg.host_networks)
        await self._reattach()
        self.fence.ensure_watchdog()  # before the first beat can arm it
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        self._tasks.append(asyncio.create_task(self._keep_watchdog()))

    async def _keep_watchdog(self) -> None:
        """A killed watchdog is started again whatever the heartbeats do: a manager that
        does not answer (a partition, a stopped serve) is exactly when it must run."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            try:
                await asyncio.to_thread(self.fence.ensure_watchdog)
            except Exception as e:  # noqa: BLE001 - say it, try again
                log.error("cannot start the fence watchdog: %s", e)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.http.aclose()

    async def _reattach(self) -> None:
        from virtua.vmm.vm import VMProcess

        for d in sorted(self.run_dir.iterdir()):
            launch_file = d / "launch.json"
            if not launch_file.exists():
                continue
            try:
                proc = await VMProcess.attach(d)
            except (VirtuaError, OSError) as e:
                log.warning("cannot reattach %s: %s", d.name, e)
                continue
            launch = VMLaunch.model_validate_json(launch_file.read_text())
            state = "running" if proc.is_running() else "stopped"
            self.vms[launch.id] = RunningVM(launch.id, proc, launch, state)
            if launch.nic is not None and self.net is not None:
                if state == "running":
                    self.net.adopt(launch.nic)
                else:
                    self.net.unplug(launch.nic)
            log.info("reattached %s (%s)", launch.id, state)

    def registration(self) -> dict[str, Any]:
        return {
            "name": self.cfg.name, "address": self.cfg.listen, "cores": self.cfg.cores,
            "memory_mb": self.cfg.memory_mb, "templates": self.cfg.templates, "accel": self.accel,
            "networks": self.cfg.host_networks,
        }

    def _set_revoked(self, serials: set[int]) -> None:
        if serials - self.revoked:  # only ever grows: a revocation is for good
            self.revoked |= serials
            from virtua.pki.files import write_private

            write_private(self._revoked_file, json.dumps(sorted(self.revoked)).encode())

    async def _heartbeat_loop(self) -> None:
        registered = False
        while True:
            try:
                if not registered:
                    r = await self.http.post(f"{self.cfg.manager}/v1/hosts/register", json=self.registration())
                    r.raise_for_status()
                    registered = True
                    log.info("registered with %s", self.cfg.manager)
                sent = fence_clock()  # the lease runs from the manager's receipt, later than this
                r = await self.http.post(
                    f"{self.cfg.manager}/v1/hosts/{self.cfg.name}/heartbeat", json={"vms": self.report(), "accel": self.accel}
                )
                r.raise_for_status()
                reply = r.json()
                if reply.get("register"):
                    registered = False
                    continue
                after = reply.get("fence_after")
                if isinstance(after, int | float) and not isinstance(after, bool) and 0 < after <= 600:
                    self.fence.arm(sent + after)
                else:
                    self.fence.disarm("the manager restarts no VM elsewhere (--no-ha)")
                self.fence.ensure_watchdog()  # killed meanwhile? a new one (cheap: one file read)
                for vm_id in reply.get("stop") or []:  # placed elsewhere now: never two instances
                    if isinstance(vm_id, str) and vm_id in self.vms:
                        log.warning("the manager places %s elsewhere now: killing this instance", vm_id)
                        await self.vm_stop({"id": vm_id, "force": True})
                revoked = reply.get("revoked")
                if isinstance(revoked, list):
                    self._set_revoked({int(x, 16) for x in revoked if isinstance(x, str) and _HEX.fullmatch(x)})
                if self.net is not None and "network" in reply:
                    await asyncio.to_thread(self.net.sync, reply["network"])
            except VirtuaError as e:
                log.error("network sync failed: %s", e.message)
            except httpx.HTTPStatusError as e:
                registered = False
                if e.response.status_code in (401, 403):  # revoked: ask again rarely
                    log.error("the manager refuses this host: %s", e.response.text[:300])
                    await asyncio.sleep(REFUSED_BACKOFF)
            except (httpx.HTTPError, ValueError) as e:
                if registered:
                    log.warning("manager %s unreachable: %s", self.cfg.manager, e)
                registered = False
                if _tls_refused(e):  # e.g. our certificate is revoked: ask again rarely
                    log.error("the manager refuses this host's certificate: %s", e)
                    await asyncio.sleep(REFUSED_BACKOFF)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def report(self) -> list[dict[str, Any]]:
        out = []
        killed = None
        for vm in self.vms.values():
            if vm.state in ("running", "starting") and not vm.spawning and not vm.proc.is_running():
                vm.state = "stopped"
                if killed is None:
                    killed = fenced(self.cfg.home)
                if killed.get(_safe(vm.id)) == vm.proc.pid:  # this very instance
                    vm.error = FENCED_ERROR
                else:
                    vm.error = "QEMU exited"
            out.append({"id": vm.id, "state": vm.state, "error": vm.error[-1000:] if vm.error else None, "pid": vm.proc.pid})
        return out

    # ------------------------------------------------------------------ artifacts

    async def _fetch(self, url: str, digest: str | None, name: str) -> Path:
        key = digest or hashlib.sha256(url.encode()).hexdigest()
        path = self.cache / f"{name}-{key[:16]}"
        if path.exists():
            return path
        tmp = path.with_suffix(".part")
        h = hashlib.sha256()
        try:
            async with self.http.stream("GET", url) as r:
                if r.status_code != 200:
                    raise Unavailable(f"cannot fetch {url}: HTTP {r.status_code}")
                with open(tmp, "wb") as f:
                    async for block in r.aiter_bytes(1 << 20):
                        f.write(block)
                        h.update(block)
        except httpx.HTTPError as e:
            raise Unavailable(f"cannot fetch {url}: {e}") from e
        if digest and h.hexdigest() != digest:
            tmp.unlink(missing_ok=True)
            raise Unavailable(f"{url}: checksum mismatch")
        os.replace(tmp, path)
        return path

    async def prepare(self, body: dict[str, Any]) -> dict[str, Any]:
        kernel = await self._fetch(body["kernel_url"], body.get("kernel_digest"), "kernel")
        initrd = None
        if body.get("initrd_url"):
            initrd = await self._fetch(body["initrd_url"], body.get("initrd_digest"), "initrd")
        if self.accel == "unknown":
            await self._probe_accel(kernel, initrd)
        return {"kernel": str(kernel), "initrd": str(initrd) if initrd else None, "accel": self.accel}

    async def _probe_accel(self, kernel: Path, initrd: Path | None) -> None:
        from virtua.vmm.qemu import select_accel

        self.accel = await asyncio.to_thread(
            select_accel, self.cfg.accel, cache_dir=self.cache, kernel=kernel, initrd=initrd
        )

    # ------------------------------------------------------------------ VMs

    def _spec(self, launch: VMLaunch, kernel: Path, initrd: Path | None) -> Any:
        from virtua.vmm.qemu import DiskSpec, NicSpec, VMSpec

        d = self.run_dir / _safe(launch.id)
        d.mkdir(parents=True, exist_ok=True)
        nics = []
        if launch.nic is not None and self.net is not None:
            nics.append(NicSpec(kind="tap", ifname=launch.nic.tap, mac=launch.nic.mac))
        return VMSpec(
            name=launch.hostname, cpus=launch.cpus, memory_mib=launch.memory_mb, kernel=kernel,
            initrd=initrd, append=launch.cmdline,
            # reconnect: QEMU queues guest I/O while the NBD server restarts or moves
            # the disks are the manager's exports: its certificate's name, not the address
            disks=[DiskSpec(source=uri, reconnect_delay=60, tls_hostname=MANAGER_NAME) for uri in launch.disks],
            tls_creds_dir=self.cfg.credentials.dir,  # used by nbds:// disks (the key stays a file)
            nics=nics, accel="kvm" if self.accel == "kvm" else "tcg",
            serial_log=d / "serial.log", console_socket=d / "console.sock",
            agent_socket=d / "agent.sock", qmp_socket=d / "qmp.sock", pidfile=d / "qemu.pid",
        )

    async def _launch(self, launch: VMLaunch, incoming_state: Path | None) -> RunningVM:
        from virtua.vmm.vm import VMProcess

        cur = self.vms.get(launch.id)
        if cur is not None and cur.proc.is_running():
            raise InvalidArgument(f"VM {launch.id} is already running here")
        art = await self.prepare(launch.model_dump())
        spec = self._spec(launch, Path(art["kernel"]), Path(art["initrd"]) if art["initrd"] else None)
        d = self.run_dir / _safe(launch.id)
        (d / "launch.json").write_text(launch.model_dump_json())
        if launch.nic is not None and self.net is not None:
            await asyncio.to_thread(self.net.plug, launch.nic)
        proc = VMProcess(spec)
        vm = RunningVM(launch.id, proc, launch, "starting", spawning=True)
        self.vms[launch.id] = vm
        try:
            if incoming_state is not None:
                await proc.resume(incoming_state)
            else:
                await proc.start()
        except Exception as e:
            vm.state = "failed"
            vm.error = str(e)
            await self._unplug(vm)
            raise Unavailable(f"QEMU for {launch.id} failed to start: {e}") from e
        finally:
            vm.spawning = False
        return vm

    async def _unplug(self, vm: RunningVM) -> None:
        if vm.launch.nic is not None and self.net is not None:
            await asyncio.to_thread(self.net.unplug, vm.launch.nic)

    async def vm_start(self, body: dict[str, Any]) -> dict[str, Any]:
        launch = VMLaunch(**body["launch"])
        vm = await self._launch(launch, None)
        if body.get("wait", True):
            await self._wait_ready(vm)
        return self._status(vm)

    async def _wait_ready(self, vm: RunningVM) -> None:
        from virtua.vmm.image import READY_MARKER

        try:
            await vm.proc.wait_for_console(READY_MARKER, timeout=BOOT_TIMEOUT)
        except (TimeoutError, VirtuaError) as e:
            vm.state = "failed"
            vm.error = str(e)[-400:]
            raise Unavailable(f"VM {vm.id} did not boot: {vm.error}") from e
        vm.state = "running"

    def _status(self, vm: RunningVM) -> dict[str, Any]:
        return {"id": vm.id, "state": vm.state, "accel": vm.proc.spec.accel, "pid": vm.proc.pid,
                "error": vm.error}

    def _get(self, vm_id: str) -> RunningVM:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise NotFound(f"VM {vm_id} is not on host {self.cfg.name}")
        return vm

    async def vm_stop(self, body: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(body["id"])
        if vm is None:
            return {"id": body["id"], "state": "stopped"}
        if vm.proc.is_running():
            if body.get("force"):
                await vm.proc.kill()
            else:
                await vm.proc.stop(timeout=20)
        vm.state = "stopped"
        await self._unplug(vm)
        self._forget(vm)
        return {"id": vm.id, "state": "stopped"}

    def _forget(self, vm: RunningVM) -> None:
        self.vms.pop(vm.id, None)
        d = self.run_dir / _safe(vm.id)
        with contextlib.suppress(OSError):
            (d / "launch.json").unlink()

    async def vm_suspend(self, body: dict[str, Any]) -> dict[str, Any]:
        vm = self._get(body["id"])
        state_file = self.run_dir / _safe(vm.id) / "memory.state"
        await vm.proc.suspend(state_file)
        try:
            with open(state_file, "rb") as f:
                r = await self.http.put(body["upload_url"], content=_chunks(f))
            if r.status_code >= 300:
                raise Unavailable(f"uploading the state of {vm.id} failed: HTTP {r.status_code} {r.text[:200]}")
        finally:
            state_file.unlink(missing_ok=True)
        vm.state = "suspended"
        await self._unplug(vm)
        self._forget(vm)
        return {"id": vm.id, "state": "suspended"}

    async def vm_resume(self, body: dict[str, Any]) -> dict[str, Any]:
        launch = VMLaunch(**body["launch"])
        if not launch.state_url:
            raise InvalidArgument("resume needs the saved state's URL")
        d = self.run_dir / _safe(launch.id)
        d.mkdir(parents=True, exist_ok=True)
        state_file = d / "incoming.state"
        try:
            async with self.http.stream("GET", launch.state_url) as r:
                if r.status_code != 200:
                    raise Unavailable(f"cannot fetch the saved state of {launch.id}: HTTP {r.status_code}")
                with open(state_file, "wb") as f:
                    async for block in r.aiter_bytes(1 << 20):
                        f.write(block)
            vm = await self._launch(launch, state_file)
        finally:
            state_file.unlink(missing_ok=True)
        vm.state = "running"
        return self._status(vm)

    async def vm_console(self, body: dict[str, Any]) -> dict[str, Any]:
        vm = self.vms.get(body["id"])
        d = self.run_dir / _safe(body["id"])
        log_path = d / "serial.log"
        if vm is None and not log_path.exists():
            raise NotFound(f"VM {body['id']} has no console on host {self.cfg.name}")
        offset = int(body.get("offset", 0))
        try:
            with open(log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            text = ""
        return {"id": body["id"], "text": text, "offset": offset + len(text.encode())}

    async def vm_exec(self, body: dict[str, Any]) -> dict[str, Any]:
        vm = self._get(body["id"])
        res = await vm.proc.run(body["script"], timeout=float(body.get("timeout", 30)), check=False)
        return {"id": vm.id, "rc": res.rc, "output": res.output}

    def net_state(self) -> dict[str, Any]:
        if self.net is None:
            return {"host": self.cfg.name, "network": "off", "taps": [], "routes": [], "rules": []}
        return {"host": self.cfg.name, **self.net.leftovers()}


def _tls_refused(e: BaseException) -> bool:
    """Did the TLS handshake fail (as opposed to the manager being down)?"""
    cur: BaseException | None = e
    while cur is not None:
        if isinstance(cur, ssl.SSLError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


async def _chunks(f: Any) -> Any:
    while True:
        block = f.read(1 << 20)
        if not block:
            return
        yield block


# The request bodies of the agent's API, checked strictly before any handler runs.
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepareBody(_Body):
    kernel_url: str
    kernel_digest: str | None = None
    initrd_url: str | None = None
    initrd_digest: str | None = None


class StartBody(_Body):
    launch: VMLaunch
    wait: bool = True


class StopBody(_Body):
    id: str
    force: bool = False


class SuspendBody(_Body):
    id: str
    upload_url: str


class ResumeBody(_Body):
    launch: VMLaunch


class ConsoleBody(_Body):
    id: str
    offset: Annotated[int, Field(ge=0)] = 0


class ExecBody(_Body):
    id: str
    script: str
    timeout: Annotated[float, Field(gt=0, le=86400)] = 30.0


class ManagerOnly:
    """The agent's API answers the manager's certificate (and the admin's) only: a host's
    certificate, or none, gets 403/401 and a log line (peer, reason)."""

    def __init__(self, app: Any, agent: Agent) -> None:
        self.app = app
        self.agent = agent

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        peer = peer_address(scope)
        ident = peer_identity(scope)
        err: VirtuaError | None = None
        if ident is None:
            err = Unauthenticated(f"{peer}: a client certificate of the cluster CA is required")
        elif ident.role not in ("manager", "admin"):
            err = Forbidden(f"{peer} ({ident.role} {ident.name}): only the manager may call an agent")
        elif ident.serial in self.agent.revoked:
            err = Forbidden(f"{peer} ({ident.role} {ident.name}): this certificate is revoked")
        if err is None:
            return await self.app(scope, receive, send)
        log.warning("refused %s %s from %s", scope["method"], scope["path"], err.message)
        body = json.dumps(err.to_dict()).encode()
        await send({"type": "http.response.start", "status": err.http_status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
        return None


def build_agent_api(agent: Agent) -> FastAPI:
    api = FastAPI(title="virtua agent")
    api.add_middleware(ManagerOnly, agent=agent)
    web.install(api, log)

    def wrap(fn: Any, model: type[BaseModel]) -> Any:
        async def handler(request: Request) -> Any:
            what = request.url.path
            try:
                body = web.validated(model, await web.json_object(request, what), what)
                return await fn(body.model_dump())
            except VirtuaError as e:
                return web.error_response(e)

        return handler

    api.post("/v1/prepare")(wrap(agent.prepare, PrepareBody))
    api.post("/v1/vm/start")(wrap(agent.vm_start, StartBody))
    api.post("/v1/vm/stop")(wrap(agent.vm_stop, StopBody))
    api.post("/v1/vm/suspend")(wrap(agent.vm_suspend, SuspendBody))
    api.post("/v1/vm/resume")(wrap(agent.vm_resume, ResumeBody))
    api.post("/v1/vm/console")(wrap(agent.vm_console, ConsoleBody))
    api.post("/v1/vm/exec")(wrap(agent.vm_exec, ExecBody))

    @api.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"name": agent.cfg.name, "vms": agent.report(), "accel": agent.accel}

    @api.get("/v1/net")
    async def net() -> dict[str, Any]:
        return agent.net_state()

    return api


async def run_agent(cfg: AgentConfig) -> None:
    import signal

    import uvicorn

    from virtua.pki.asgi import tls_gate
    from virtua.procs import lock_home

    lock_home(cfg.home, "agent")  # one agent per home: two both heartbeat and both move the fence deadline
    agent = Agent(cfg)
    await agent.start()
    host, _, port = cfg.listen.rpartition(":")
    from virtua.edge.guard import MAX_HEADER_BYTES
    from virtua.edge.limits import Admission, ConnectionLimits
    from virtua.pki.asgi import guarded

    # the same limits as the manager's listeners: one source cannot hold every connection,
    # counted before the TLS handshake
    admission = Admission(ConnectionLimits(), log, "agent api")
    tls = cfg.credentials.server_context(client_cert="required")
    uv = uvicorn.Server(uvicorn.Config(
        build_agent_api(agent), host=host, port=int(port), log_level="warning", lifespan="off",
        http=guarded(tls_gate(lambda: tls, f"agent {cfg.name} API"), admission),
        timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        proxy_headers=False,  # the peer is the TCP peer: X-Forwarded-For would let anyone say where it is
    ))
    uv.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    task = asyncio.create_task(uv.serve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    for _ in range(200):  # ready means listening: wait (bounded) for uvicorn's socket
        if uv.started or task.done():
            break
        await asyncio.sleep(0.05)
    if not uv.started:
        raise Unavailable(f"the agent's API could not listen on {cfg.listen}")
    print(f"VIRTUA_AGENT_READY name={cfg.name} listen={cfg.listen} pid={os.getpid()}", flush=True)
    log.info("agent %s on %s, manager %s (VMs keep running when the agent stops)", cfg.name, cfg.listen, cfg.manager)
    await stop.wait()
    uv.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 5)
    await agent.close()


async def join_cluster(cfg: AgentConfig) -> Credentials:
    """This host's credentials: the ones it holds, or new ones for a join token.

    Joining: fetch the CA certificate, check it against the fingerprint in the token
    (before the secret goes anywhere), then send the token and a certificate request
    over TLS verified against that CA; the key never leaves this host."""
    from virtua.pki.ca import cert_pem, fingerprint, key_pem, make_csr, new_key
    from virtua.pki.credentials import peer_checked_context
    from virtua.pki.files import private_dir, write_private
    from virtua.pki.tokens import parse_token

    creds = cfg.credentials
    token_text = None
    if cfg.join_token_file is not None:
        try:
            token_text = cfg.join_token_file.read_text().strip()
        except OSError as e:
            raise InvalidArgument(f"cannot read the join token file {cfg.join_token_file}: {e.strerror}") from e
    token = parse_token(token_text) if token_text else None
    if creds.complete():
        from cryptography import x509

        held = fingerprint(x509.load_pem_x509_certificate(creds.ca.read_bytes()))
        if token is None or token.ca_fingerprint == held:
            return creds
        log.info("the join token names another CA (%s...): joining again", token.ca_fingerprint[:16])
    if token is None:
        raise InvalidArgument(
            f"no credentials in {creds.dir}: give --join-token-file (from `virtua host join-token` on the manager)"
        )
    from cryptography import x509

    url = cfg.manager
    deadline = time.monotonic() + JOIN_WAIT
    while True:  # the manager may start after its agents (virtua lab up, then serve)
        try:
            async with httpx.AsyncClient(timeout=30, verify=False) as bare:  # noqa: S501 - pinned below
                r = await bare.get(f"{url}/v1/join/ca")
                r.raise_for_status()
                ca_bytes = r.json()["ca"].encode()
            break
        except httpx.TransportError as e:
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot join: the manager at {url} is not answering: {e}") from e
            await asyncio.sleep(1.0)
        except (httpx.HTTPError, KeyError, ValueError) as e:
            raise Unavailable(f"cannot join the manager at {url}: {e}") from e
    try:
        ca = x509.load_pem_x509_certificate(ca_bytes)
        if fingerprint(ca) != token.ca_fingerprint:
            raise Forbidden(f"the manager at {url} shows a CA whose sha256 is not the one in the join token: refusing")
        key = new_key()
        # the token goes only to the manager: another host's certificate of this CA fails here
        ctx = peer_checked_context(MANAGER, cadata=cert_pem(ca).decode())
        async with httpx.AsyncClient(timeout=30, verify=ctx) as pinned:
            r = await pinned.post(f"{url}/v1/join", json={
                "token": token_text, "name": cfg.name, "address": cfg.listen,
                "csr": make_csr(key, cfg.name).decode(),
            })
    except (httpx.HTTPError, KeyError, ValueError) as e:
        raise Unavailable(f"cannot join the manager at {url}: {e}") from e
    if r.status_code != 200:
        from virtua.errors import from_dict

        raise from_dict(r.json())
    private_dir(creds.dir)
    write_private(creds.key, key_pem(key))
    write_private(creds.cert, r.json()["cert"].encode())
    write_private(creds.ca, cert_pem(ca))
    log.info("joined the cluster at %s as host %s", url, cfg.name)
    return creds


def default_name() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


__all__ = ["Agent", "AgentConfig", "run_agent", "default_name", "time"]
