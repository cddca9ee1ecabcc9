"""`virtua serve`: one process that holds the pools, serves every volume over NBD and
answers admin operations on a unix socket ($VIRTUA_HOME/virtua.sock).

Everything runs on one event loop thread: the storage engine is single-threaded by
design, so NBD requests and admin operations never race on a block map. Only I/O with no
metadata in it runs in worker threads (flush jobs, a flatten's copies, a check's scan).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from virtua.api import ops
from virtua.api.auth import AuthMiddleware, may_act_as_host
from virtua.cluster import netplan
from virtua.edge import web
from virtua.edge.limits import ConnectionLimits
from virtua.errors import Busy, Forbidden, InvalidArgument, NoSpace, NotFound, VirtuaError
from virtua.nbd.volumes import AdminExports, StorageExports
from virtua.pki.asgi import PeerAwareH11, guarded, tls_gate
from virtua.pki.identity import canonical_address, certificate_addresses
from virtua.procs import lock_home, stop_process_group
from virtua.storage.home import admin_nbd_socket
from virtua.storage.names import check_name
from virtua.storage.service import Storage

if TYPE_CHECKING:
    from virtua.pki.ca import ClusterCA

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
    lease_ttl: float = 10.0  # a host's lease (virtua.cluster.fence)
    ha: bool = True  # restart a lost host's VMs elsewhere (and hosts fence themselves)
    # connection limits of every listener (NBD and API, TCP and unix): see virtua.edge.limits
    handshake_timeout: float = ConnectionLimits.handshake_timeout
    max_connections_per_source: int = ConnectionLimits.max_connections_per_source
    import_dir: Path | None = None  # default $VIRTUA_HOME/import
    ca_cert: Path | None = None  # an administrator-supplied cluster CA (first start only)
    ca_key: Path | None = None
    # cluster state (hosts, templates, VCs, VMs) in etcd at these URLs instead of manager.db
    etcd: str | None = None
    etcd_prefix: str = "/virtua/"
    etcd_tls: Path | None = None  # https:// etcd: the client credentials (default pki/etcd/manager)
    etcd_max_txn_ops: int = 128  # what the etcd cluster's --max-txn-ops allows

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
    def pki_dir(self) -> Path:
        return self.home / "pki"

    @property
    def admin_nbd_socket(self) -> Path:
        return admin_nbd_socket(self.home)


def parse_allow(rules: list[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in rules:
        pattern, sep, ids = rule.partition("=")
        if not sep or not pattern or not ids:
            raise InvalidArgument(f"bad --allow {rule!r}: expected EXPORT-GLOB=ID[,ID...]")
        out.setdefault(pattern, set()).update(i for i in ids.split(",") if i)
    return out


def _loopback(host: str) -> bool:

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


Accel = Literal["kvm", "tcg", "unknown"]
# what a host says about itself reaches every host's filter and the admin's terminal
Label = Annotated[str, Field(max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")]
Message = Annotated[str, Field(max_length=2000)]


def _host_network(text: str) -> str:
    try:
        net = IPv4Network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"bad network {text[:64]!r}: {e}") from None
    if net.prefixlen < MIN_HOST_PREFIX:
        raise ValueError(f"network {net} is wider than /{MIN_HOST_PREFIX}")
    if net.overlaps(netplan.DEFAULT_POOL):  # guests' own subnets: filtering it cuts VCs off
        raise ValueError(f"network {net} overlaps the VC subnets ({netplan.DEFAULT_POOL})")
    return str(net)


MIN_HOST_PREFIX = 16
HostNetwork = Annotated[str, AfterValidator(_host_network)]


class Registration(BaseModel):
    """What an agent sends to /v1/hosts/register (Agent.registration)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    name: str
    address: Annotated[str, Field(max_length=80)]  # HOST:PORT of the agent's API
    cores: Annotated[int, Field(ge=1, le=1 << 16)]
    memory_mb: Annotated[int, Field(ge=1, le=1 << 40)]
    templates: Annotated[list[Label], Field(max_length=1024)] | None = None
    accel: Accel = "unknown"
    networks: Annotated[list[HostNetwork], Field(max_length=16)] = Field(default_factory=list)


class VMReport(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    id: Annotated[str, Field(max_length=129, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}/[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")]
    state: Literal["starting", "running", "stopped", "failed", "suspended"]
    error: Message | None = None
    pid: int | None = None


class Heartbeat(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    vms: Annotated[list[VMReport], Field(max_length=1024)] = Field(default_factory=list)
    accel: Accel | None = None


# A saved VM state is the guest's memory and its devices' state: at most twice the
# memory plus this, whatever a client claims.
_STATE_SLACK = 64 << 20


def caller_is_local(request: Request) -> bool:
    """Whether the caller reached the unix socket (root on this machine: uvicorn reports no
    port for it), not TCP, whatever certificate or token it holds."""
    server = request.scope.get("server")
    return server is not None and server[1] is None


def caller_is_admin(request: Request) -> bool:
    """Whether the caller is an administrator: whoever reaches the unix socket, or a TCP
    caller the AuthMiddleware authenticated as one (the admin certificate or the admin
    token: virtua.api.auth.Caller.admin)."""
    if caller_is_local(request):
        return True
    caller = getattr(request.state, "virtua_caller", None)
    return caller is not None and caller.admin is True


def build_api(storage: Storage, manager: Any = None) -> Any:
    """The admin API; with a manager that has a cluster CA, every request passes the
    AuthMiddleware (see virtua.api.auth) first."""
    api = FastAPI(title="virtua", version="0.1")
    if manager is not None and getattr(manager, "authority", None) is not None:
        api.add_middleware(
            AuthMiddleware, revoked=manager.authority.is_revoked, owners_of=manager.owners_of,
            admin_token=manager.authority.is_admin_token,
        )
    web.install(api, log)
    error = web.error_response

    @api.get("/v1/status")
    async def status() -> dict[str, Any]:
        said: dict[str, Any] = {"pid": os.getpid(), **storage.summary()}
        if manager is not None:  # where a remote CLI sends its data (virtua.cli.data)
            said["nbd"] = getattr(manager, "nbd_service", None)
        return said

    from virtua.api.routes import add_routes

    def run(name: str, args: dict[str, Any], request: Request) -> Any:
        return ops.run(storage, name, args, manager, caller_is_admin=caller_is_admin(request),
                       caller_is_local=caller_is_local(request))

    if manager is not None:
        manager_type: type = type(manager)
    else:
        from virtua.cluster.manager import Manager as manager_type
    add_routes(api, run, manager_type)  # one typed endpoint per operation: virtua.api.routes

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
            reg = web.validated(Registration, await web.json_object(request, "registration"), "registration")
            try:  # one spelling: it becomes every other host's route (via) and filter entry
                reg = reg.model_copy(update={"address": canonical_address(reg.address)})
            except ValueError as e:
                raise InvalidArgument(f"registration: {e}") from None
            caller = getattr(request.state, "virtua_caller", None)
            if caller is not None:
                may_act_as_host(caller, reg.name)
                if not caller.admin:
                    _check_host_claims(reg, certificate_addresses(getattr(request.state, "virtua_peercert", None)))
                    for vc in manager.vcs():
                        if any(IPv4Network(n).overlaps(IPv4Network(vc.subnet)) for n in reg.networks):
                            raise Forbidden(f"host {reg.name} claims a network over VC {vc.name}'s subnet {vc.subnet}")
            return manager.register_host(reg.model_dump())
        except VirtuaError as e:
            return error(e)

    @api.post("/v1/hosts/{name}/heartbeat")
    async def heartbeat(name: str, request: Request) -> Any:
        try:
            check_name(name, "host name")
            beat = web.validated(
                Heartbeat, await web.json_object(request, "heartbeat", HOST_BODY_MAX), "heartbeat"
            )
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


JOIN_BODY_MAX = 64 << 10  # a CSR and a token: the unauthenticated endpoint reads no more
HOST_BODY_MAX = 4 << 20  # a heartbeat lists a host's VMs


async def _json_object(request: Request, limit: int, what: str) -> dict[str, Any]:
    """The body as a JSON object, read up to `limit` bytes (then refused, not buffered)."""
    return await web.json_object(request, what, limit)


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
        raise _listen_error(listen, e) from e
    s.listen(128)
    s.setblocking(False)
    return s


def _check_free(listen: str | None) -> None:
    """Refuse a TCP address already in use before anything is created (a CA, a pool lock)."""
    if not listen:
        return
    host, port = parse_listen(listen)
    if port == 0:
        return
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        probe.bind((host, port))
    except OSError as e:
        raise _listen_error(listen, e) from e
    finally:
        probe.close()


def _listen_error(listen: str, e: OSError) -> VirtuaError:
    import errno

    if e.errno == errno.EADDRINUSE:
        return Busy(f"cannot listen on {listen}: address already in use (is another virtua serve running?)")
    return InvalidArgument(f"cannot listen on {listen}: {e.strerror}")


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


def _check_host_claims(reg: Registration, cert_ips: list[str]) -> None:
    """A host stays at the address its certificate names, and its networks (which go into
    every host's guest filter) are networks that address is on."""
    host = reg.address.rpartition(":")[0].strip("[]")  # canonical already (register)
    if host not in cert_ips:
        raise Forbidden(
            f"host {reg.name} registers {reg.address!r}, but its certificate is for "
            f"{', '.join(cert_ips) or 'no address'}: join again to move it"
        )
    for net in reg.networks:
        if not any(IPv4Network(net).overlaps(IPv4Network(ip)) for ip in cert_ips if ":" not in ip):
            raise Forbidden(f"host {reg.name} claims network {net}, which its address {host} is not on")


def _is_agent_of(pid: int, agent_home: Path) -> bool:
    """Is pid a `virtua ... --home AGENT_HOME agent`? A pid file outlives its process, and
    its pid may be any process's since (another agent, ssh-agent): serve would then
    neither start its agent nor, rightly, stop that process."""
    args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    home = str(agent_home).encode()
    return any(a == b"--home" and b == home for a, b in zip(args, args[1:], strict=False)) and b"agent" in args


def stop_local_agent(pid: int, agent_home: Path) -> None:
    """Stop the agent serve started (its process group; its VMs, in sessions of their own,
    keep running) and remove its pid file if it still names it."""
    stop_process_group(pid, "the local agent", log)
    pidfile = agent_home / "agent.pid"
    with contextlib.suppress(OSError, ValueError):
        if int(pidfile.read_text()) == pid:
            pidfile.unlink()


JOB_REAP_EVERY = 2.0


REVOCATION_POLL = 2.0


async def _watch_revocations(authority: ClusterCA, stop: asyncio.Event) -> None:
    """Revocations written by another process into the shared pki directory (`virtua lab`,
    an operator's tool) reach the TLS contexts and open sessions within a poll."""
    while not stop.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), REVOCATION_POLL)
        try:
            authority.poll_revoked()
        except Exception as e:  # noqa: BLE001 - a revoked.json being rewritten, or malformed: the next poll
            log.warning("cannot read the revocation list: %s", e)


def _recover_jobs(storage: Storage, manager: Any) -> asyncio.Task[None]:
    """Undo what a crashed process left half done, now (before any client can see it) and
    then whenever a client-driven job's client goes quiet; on the loop thread, like every
    other change to the pools."""
    from virtua.jobs.recovery import Context, recover

    ctx = Context(storage, manager)
    for job in recover(storage.jobs, ctx):
        log.warning("recovered job %s (%s): %s", job.id, job.title, job.state)
    return asyncio.create_task(_reap_jobs(storage, ctx))


async def _reap_jobs(storage: Storage, ctx: Any) -> None:
    from virtua.jobs.recovery import recover

    while True:
        await asyncio.sleep(JOB_REAP_EVERY)
        try:
            recover(storage.jobs, ctx, expired_only=True)
        except Exception:  # noqa: BLE001 - keep reaping; say what broke
            log.exception("job recovery failed")


async def _keep_claim(store: Any, ttl: float, stop: asyncio.Event) -> None:
    """Renew this serve's claim on its etcd prefix; if another serve has taken it (etcd was
    away longer than the claim's lease), this one stops: never two managers of one cluster."""
    from virtua.errors import Unavailable

    while True:
        await asyncio.sleep(max(0.5, ttl / 4))
        try:
            store.keep_claim()
        except Unavailable:
            pass  # etcd is away: said by the calls that need it; the claim is renewed when it is back
        except Busy as e:
            log.error("stopping: %s", e.message)
            stop.set()
            return
        except Exception:  # noqa: BLE001 - keep renewing; say what broke
            log.exception("renewing the etcd claim failed")


def start_local_agent(cfg: ServeConfig, advertise: str, api_port: int, manager: Any) -> int | None:
    """Start `virtua agent` for this machine unless one already runs (then None); serve
    stops the one it started when it stops, and the VMs (own sessions) keep running.
    It joins like any other host, with a one-time token in a 0600 file."""
    import subprocess
    import sys

    agent_home = cfg.home / "agent"
    agent_home.mkdir(parents=True, exist_ok=True)
    pidfile = agent_home / "agent.pid"
    try:
        pid = int(pidfile.read_text())
        if _is_agent_of(pid, agent_home):
            log.info("local agent already running (pid %d); it is not ours to stop", pid)
            return None
    except (OSError, ValueError):
        pass
    logf = open(agent_home / "agent.log", "ab")
    token_file = agent_home / "join-token"
    from virtua.cluster.agent import default_name

    manager.write_join_token(token_file, ttl=600, name=default_name())
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtua.cli", "--home", str(agent_home), "agent",
         "--listen", cfg.agent_listen, "--manager", f"https://{advertise}:{api_port}",
         "--join-token-file", str(token_file)],
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


def _etcd_credentials(cfg: ServeConfig) -> Any:
    """The etcd client credentials for https:// endpoints (None for http://)."""
    from virtua.cluster.etcd_pki import client_credentials
    from virtua.pki.credentials import Credentials

    assert cfg.etcd is not None
    if not cfg.etcd.lstrip().startswith("https://"):
        return None
    return Credentials(cfg.etcd_tls) if cfg.etcd_tls else client_credentials(cfg.home)


async def serve(cfg: ServeConfig) -> None:
    import uvicorn

    from virtua.cluster.store import SQLiteStore, StateStore
    from virtua.cluster.store_etcd import EtcdStateStore
    from virtua.nbd.server import NBDServer
    from virtua.nbd.tls import TLSConfig
    from virtua.pki.ca import ClusterCA

    slow = os.environ.get("VIRTUA_SLOW_CALLBACK_MS")  # a diagnostic: log what holds the loop that long
    if slow:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = float(slow) / 1000

    # first: an etcd that does not answer stops serve before anything starts (Unavailable)
    store: StateStore | None = None
    if cfg.etcd:
        # serve calls its store on the loop its guests' disks and heartbeats share: a sick
        # etcd costs that loop one bounded call per outage, then a thread watches for it
        store = EtcdStateStore(cfg.etcd, prefix=cfg.etcd_prefix, max_txn_ops=cfg.etcd_max_txn_ops,
                               tls=_etcd_credentials(cfg), probe_in_background=True)
    _check_free(cfg.listen)
    _check_free(cfg.api_listen)
    cfg.home.mkdir(parents=True, exist_ok=True)
    home_lock = lock_home(cfg.home, "serve")  # one serve per home: its socket, manager.db and journal are one's
    _raise_open_files_limit()
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
    lim = cfg.limits
    nbd = NBDServer(
        exports, tls=tls, tls_mode=tls_mode, tls_on_unix=False, holders=storage.holders,  # type: ignore[arg-type]
        max_connections=lim.max_connections, max_connections_per_source=lim.max_connections_per_source,
        max_handshakes=lim.max_handshakes, max_handshakes_per_source=lim.max_handshakes_per_source,
        handshake_timeout=lim.handshake_timeout,
    )
    nbd_socket = cfg.nbd_socket or cfg.home / "nbd.sock"
    try:
        await nbd.start(host=host, port=port, unix_path=str(nbd_socket))
    except OSError as e:
        storage.close()
        raise _listen_error(cfg.listen or str(nbd_socket), e) from e
    os.chmod(nbd_socket, 0o600)  # plaintext, every export: root only
    if cfg.tls == "auto" and tls is not None:
        cluster_tls = tls

        def reload_crl() -> None:  # new handshakes see a revocation at once
            nbd.ssl_context = cluster_tls.build_context()

        authority.on_revoke.append(reload_crl)
    serve_loop = asyncio.get_running_loop()

    def cut_revoked() -> None:  # ... and sessions opened before it end now (from any thread)
        serve_loop.call_soon_threadsafe(lambda: nbd.drop_revoked(authority.is_revoked))

    authority.on_revoke.append(cut_revoked)
    admin_socket = cfg.admin_nbd_socket
    admin_socket.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(admin_socket.parent, 0o700)
    admin_nbd = NBDServer(AdminExports(exports), holders=storage.holders)  # type: ignore[arg-type]
    await admin_nbd.start(host=None, port=None, unix_path=str(admin_socket))

    from virtua.cluster.manager import Manager

    if store is None:
        store = SQLiteStore(cfg.home / "manager.db")
    elif (cfg.home / "manager.db").exists():
        log.warning("%s is not used: the cluster state is in etcd (--etcd); nothing is copied from it",
                    cfg.home / "manager.db")
    store_said = (f"etcd at {cfg.etcd} under {cfg.etcd_prefix}" if cfg.etcd else str(cfg.home / "manager.db"))
    if isinstance(store, EtcdStateStore):  # one manager per prefix: a second serve would restart VMs twice
        import socket as _socket
        import time as _time

        try:
            me = {"host": _socket.gethostname(), "pid": os.getpid(), "home": str(cfg.home), "started": _time.time()}
            # a claim of this home on this host is a killed predecessor's: this serve holds the home's lock
            store.claim(me, ttl=max(2, int(cfg.lease_ttl)),
                        stale=lambda who: who.get("host") == me["host"] and who.get("home") == me["home"])
        except BaseException:
            await nbd.close()
            await admin_nbd.close()
            store.close()
            storage.close()
            raise
    manager = Manager(
        cfg.home, storage, store, advertise=advertise, nbd_port=nbd.port or 10809,
        api_port=api_port, host_networks=cfg.host_networks, import_dir=cfg.import_dir,
        authority=authority, nbd_tls=tls_mode == "require", lease_ttl=cfg.lease_ttl, restart_dead=cfg.ha,
    )
    if cfg.tls == "auto":
        exports.host_access = manager.nbd_access
        manager.enforce_nbd_access = True
        manager.nbd_allowed = exports.allowed  # --allow rules first, as at open
    exports.holder_label = manager.disk_user
    if nbd.port is not None:
        manager.nbd_service = {"host": host, "port": nbd.port, "tls": tls_mode, "cluster_ca": cfg.tls == "auto"}
    await manager.start()
    reaper = _recover_jobs(storage, manager)
    stop = asyncio.Event()
    revocations = asyncio.create_task(_watch_revocations(authority, stop))
    claim_keeper = asyncio.create_task(_keep_claim(store, cfg.lease_ttl, stop)) if isinstance(store, EtcdStateStore) else None
    from virtua.edge.guard import MAX_HEADER_BYTES
    from virtua.edge.limits import Admission

    app = build_api(storage, manager)
    # Two servers, one app: the unix socket in plaintext, TCP with TLS (client
    # certificates verified when given; the middleware refuses requests without one).
    # Both listeners share one set of connection counts, apart from NBD's.
    api_admission = Admission(lim, logging.getLogger("virtua.api"), "api")
    uv_local = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", lifespan="off", http=guarded(PeerAwareH11, api_admission),
        timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        proxy_headers=False,  # the peer is the TCP peer: X-Forwarded-For would let anyone say where it is
    ))
    mcreds = authority.manager
    api_tls = [mcreds.server_context(client_cert="optional", crl=authority.crl_path)]
    authority.on_revoke.append(
        lambda: api_tls.__setitem__(0, mcreds.server_context(client_cert="optional", crl=authority.crl_path))
    )
    uv_tcp = uvicorn.Server(uvicorn.Config(
        app, log_level="warning", lifespan="off",
        http=guarded(tls_gate(lambda: api_tls[0], "manager API"), api_admission),
        timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        proxy_headers=False,  # the peer is the TCP peer: X-Forwarded-For would let anyone say where it is
    ))
    servers = [uv_local, uv_tcp]
    for uv in servers:
        uv.install_signal_handlers = lambda: None  # type: ignore[attr-defined]
    api_tasks = [
        asyncio.create_task(uv_local.serve(sockets=[_bind_unix(cfg.api_socket)])),
        asyncio.create_task(uv_tcp.serve(sockets=[_bind_tcp(cfg.api_listen)])),
    ]
    # the handlers first: a SIGTERM from now on still goes through the clean-up below
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent_pid: int | None = None
    try:
        if cfg.local_agent:
            agent_pid = start_local_agent(cfg, advertise, api_port, manager)
        where = f"{host}:{nbd.port}" if host else ""
        tls_said = {"off": "off (plaintext)", "on": "on (offered)", "require": "required"}[tls_mode]
        if cfg.tls == "auto":
            tls_said += " with the cluster CA"
        elif cfg.tls != "off":
            tls_said += " with " + " and ".join(k for k, v in (("X.509", cfg.tls_cert), ("PSK", cfg.tls_psk)) if v)
        log.info("virtua serve: NBD on %s %s, TLS %s, API on %s and %s, cluster state in %s (pid %d)", where,
                 nbd_socket, tls_said, cfg.api_socket, cfg.api_listen, store_said, os.getpid())
        print(f"VIRTUA_READY nbd={where or '-'} nbd_socket={nbd_socket} tls={cfg.tls} api={cfg.api_socket} "
              f"api_tcp={cfg.api_listen}", flush=True)
        await stop.wait()
    finally:
        log.info("virtua serve: stopping")
        if agent_pid is not None:  # the agent we started goes with us (its VMs keep running)
            stop_local_agent(agent_pid, cfg.home / "agent")
        await nbd.close()  # in-flight requests finish, devices flush
        await admin_nbd.close()
        for uv in servers:
            uv.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*api_tasks), 5)
        reaper.cancel()
        revocations.cancel()
        if claim_keeper is not None:
            claim_keeper.cancel()
        await manager.close()
        if isinstance(store, EtcdStateStore):
            store.release_claim()
        store.close()
        storage.close()
        with contextlib.suppress(FileNotFoundError):
            cfg.api_socket.unlink()
        os.close(home_lock)
        log.info("virtua serve: stopped")
