"""The virtual-cluster manager: hosts, templates and virtual clusters.

It runs inside `virtua serve`, next to the storage engine and the NBD server. Agents
(one per physical host) register over HTTP and run the VMs the manager assigns them;
the VMs' disks are this process's NBD exports. State lives in a StateStore (SQLite by
default), so VMs keep running and `vc info` stays right across a manager restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from ipaddress import IPv4Network, ip_address
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from virtua.cluster import netplan
from virtua.cluster.fence import FENCED_ERROR, LEASE_TTL, fence_after
from virtua.cluster.model import HostRecord, NicLaunch, TemplateRecord, VCRecord, VMLaunch, VMRecord
from virtua.cluster.placement import HostCapacity, HostLoad, VMRequest, place, restart_plan
from virtua.cluster.store import StateStore
from virtua.errors import (
    AlreadyExists,
    Busy,
    DependencyError,
    Forbidden,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
    VirtuaError,
)
from virtua.jobs import runner
from virtua.jobs.plan import Plan
from virtua.jobs.record import Undo
from virtua.jobs.recovery import Context, NeedsManager, undo_kind
from virtua.pki.ca import ClusterCA
from virtua.pki.credentials import PeerRule
from virtua.pki.files import write_private
from virtua.pki.identity import RESERVED_NAMES, canonical_address, canonical_ip
from virtua.pki.tokens import JoinTokens, parse_token
from virtua.storage.names import check_name, parse_ref
from virtua.storage.service import TEMPLATE_VOLUME_PREFIX, Storage
from virtua.units import parse_size

log = logging.getLogger("virtua.manager")

MIN_BEAT_INTERVAL = 0.25  # a host sending faster gets Busy: each beat costs the loop record reads
AGENT_TIMEOUT = 180.0
DEFAULT_POOL = "default"


class Manager:
    def __init__(
        self,
        home: Path,
        storage: Storage,
        store: StateStore,
        *,
        advertise: str = "127.0.0.1",
        nbd_port: int = 10809,
        api_port: int = 8780,
        host_networks: list[str] | None = None,
        restart_dead: bool = True,
        lease_ttl: float = LEASE_TTL,
        import_dir: Path | None = None,
        authority: ClusterCA | None = None,
        nbd_tls: bool = False,
    ) -> None:
        self.home = home
        self.storage = storage
        self._artifacts_lock: asyncio.Lock | None = None  # template build: one cache build at a time
        self.store = store
        self.advertise = advertise
        self.nbd_port = nbd_port
        # what /v1/status says of NBD over TCP ({"port", "tls", "cluster_ca"}); None: not on TCP
        self.nbd_service: dict[str, Any] | None = None
        self.api_port = api_port
        self.host_networks = [IPv4Network(n) for n in host_networks or []]
        self.restart_dead = restart_dead
        # a host's lease: renewed by each answered heartbeat, for lease_ttl seconds of this
        # process's monotonic clock; its VMs are restarted elsewhere only once it ran out,
        # and the host kills them itself before that (virtua.cluster.fence)
        self.lease_ttl = lease_ttl
        self._renewed: dict[str, float] = {}  # host -> monotonic time its lease was last renewed
        # with a cluster CA: https to agents, presenting the manager's certificate
        self.authority = authority
        self.tokens = JoinTokens(authority.dir / "tokens.json", authority.fingerprint) if authority else None
        self.nbd_tls = nbd_tls  # QEMU opens the disks over TLS with its host's certificate
        self._grants: dict[str, VMRecord] | None = None  # _disk_owners' cache: export -> VM
        self._last_beat: dict[str, float] = {}  # host -> monotonic time of its last heartbeat
        self._told_to_stop: dict[str, set[str]] = {}  # host -> what its last heartbeat reply said to stop
        self._state_uploads: set[str] = set()  # VMs whose saved state may be uploaded once now
        self.enforce_nbd_access = False  # serve sets it when NBD follows placement (--tls auto)
        self.nbd_allowed: Callable[[str, str], bool] = self.nbd_access  # serve: its exports' whole check
        # one client per host: each checks in its TLS handshake that the agent it reached
        # holds that host's certificate (not another host's, not the admin's)
        self._agent_http: dict[str, httpx.AsyncClient] = {}
        self._scheme = "https" if authority else "http"
        self._template_grants: dict[str, set[str]] = {}  # host -> templates being prepared
        self.states_dir = home / "vmstate"
        self.templates_dir = home / "templates"
        self.import_dir = import_dir or home / "import"  # the only host files a request may name
        self.import_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._locks: dict[str, asyncio.Lock] = {}
        self._jobs: set[asyncio.Task[Any]] = set()  # jobs started with wait=False
        self._own_networks = [str(n) for n in self.host_networks]
        self._routes: dict[str, str] = {}
        self._watch: asyncio.Task[None] | None = None
        # monotonic: the store was last unreachable then (see _watch_hosts); and when this
        # manager started (a host it has not heard from yet has a lease from then)
        self._liveness_grace_from = float("-inf")
        self._began = time.monotonic()
        self._fenced_restarts: set[str] = set()  # VMs being started again after their host fenced them

    @property
    def api_url(self) -> str:
        return f"{self._scheme}://{self.advertise}:{self.api_port}"

    def nbd_uri(self, export: str) -> str:
        scheme = "nbds" if self.nbd_tls else "nbd"
        return f"{scheme}://{self.advertise}:{self.nbd_port}/{export}"

    def lock(self, key: str) -> asyncio.Lock:
        """One admin operation at a time per VC (concurrent commands queue, never interleave)."""
        return self._locks.setdefault(key, asyncio.Lock())

    async def start(self) -> None:
        self._canonical_addresses()
        self._watch = asyncio.create_task(self._watch_hosts())

    def _canonical_addresses(self) -> None:
        """Host records written before addresses had one spelling: rewrite the ones that
        parse once trimmed; an address that still does not is kept out of every route
        (network_for) and said once here."""
        for h in self.hosts():
            try:
                fixed = canonical_address(h.address)
            except ValueError:
                host, _, port = h.address.rpartition(":")
                try:
                    fixed = canonical_address(f"{host.strip()}:{port.strip()}")
                except ValueError:
                    log.error("host %s has an unusable address %r: it gets no routes until it registers again",
                              h.name, h.address)
                    continue
            if fixed != h.address:
                log.info("host %s: address %r rewritten as %s", h.name, h.address, fixed)
                h.address = fixed
                self._put_host(h)

    async def close(self) -> None:
        for task in list(self._jobs):  # a job cut short undoes what it did (the journal says so)
            task.cancel()
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        if self._watch:
            self._watch.cancel()
        if self._routes:
            from virtua.net.hostnet import sync_routes

            sync_routes(self._routes, {})
        for client in self._agent_http.values():
            await client.aclose()
        self._agent_http.clear()

    # ================================================================== hosts

    def hosts(self) -> list[HostRecord]:
        return [HostRecord(**v) for _, v in self.store.range("/hosts/")]

    def host(self, name: str) -> HostRecord:
        check_name(name, "host name")
        v = self.store.get(f"/hosts/{name}")
        if v is None:
            raise NotFound(f"host {name} is not registered (virtua host list shows the hosts)")
        return HostRecord(**v)

    def _put_host(self, h: HostRecord) -> None:
        self.store.put(f"/hosts/{h.name}", h.model_dump())

    def register_host(self, rec: dict[str, Any]) -> dict[str, Any]:
        h = HostRecord(**rec)
        check_name(h.name, "host name")
        old = self.store.get(f"/hosts/{h.name}")
        now = time.time()
        h.registered = old["registered"] if old else now
        h.draining = bool(old and old.get("draining"))
        h.state = "draining" if h.draining else "online"
        h.last_seen = now
        self._renewed[h.name] = time.monotonic()
        self._put_host(h)
        self._grants = None  # a new host may hold disks; its heartbeats (_put_host) change nothing there
        log.info("host %s registered at %s (%d cores, %d MiB, accel %s)", h.name, h.address, h.cores, h.memory_mb, h.accel)
        return {"ok": True, "manager": self.api_url, "nbd": f"{self.advertise}:{self.nbd_port}"}

    def heartbeat(self, name: str, vms: list[dict[str, Any]], accel: str | None = None) -> dict[str, Any]:
        now_m = time.monotonic()
        if now_m - self._last_beat.get(name, -1e9) < MIN_BEAT_INTERVAL:  # agents beat every 1 s
            raise Busy(f"host {name}: heartbeats come at most every {MIN_BEAT_INTERVAL:g} s")
        try:
            v = self.store.get(f"/hosts/{name}")
        except Unavailable:
            if name not in self._renewed:
                raise
            # the store is down: nothing can be restarted elsewhere meanwhile (that needs
            # the store), so a host this manager knows keeps its lease and its guests
            self._last_beat[name] = self._renewed[name] = now_m
            return {"ok": True, "stop": [], "lease_ttl": self.lease_ttl, "fence_after": self._fence_after()}
        if v is None:
            return {"register": True}  # and its next beat, right after registering, is welcome
        self._last_beat[name] = now_m
        self._renewed[name] = now_m
        h = HostRecord(**v)
        h.last_seen = time.time()
        if accel and accel != "unknown":
            h.accel = accel
        if h.state == "offline":
            h.state = "draining" if h.draining else "online"
            log.info("host %s is back", name)
        self._put_host(h)
        # what the agent reports is the truth about its VMs; one it runs that the records
        # place elsewhere (restarted there while this host was away) or no longer have
        # (destroyed meanwhile) is an instance too many: the reply tells it to kill that
        stop: list[str] = []
        for report in vms:
            rec = self._vm_or_none(report.get("id", ""))
            if rec is None or rec.host != name:
                # running: an instance too many; stopped (e.g. fenced): its tap, routes and rules go
                stop.append(str(report.get("id")))
                continue
            state = report.get("state")
            # only a running record: while the manager is starting a VM, a report of the
            # instance before it ("stopped") is stale, and the start's own answer decides
            if rec.state == "running" and state in ("stopped", "failed"):
                rec.state = state
                rec.error = report.get("error")
                self._put_vm(rec)
                if self.restart_dead and rec.error == FENCED_ERROR:
                    self._restart_fenced(rec, name)
        if set(stop) != self._told_to_stop.get(name, set()):  # one line per change, not per beat
            if stop:
                log.warning("host %s holds %d VM(s) the records place elsewhere or no longer have: telling it to "
                            "stop %s", name, len(stop), ", ".join(stop[:5]) + (" ..." if len(stop) > 5 else ""))
            self._told_to_stop[name] = set(stop)
        # the agents refuse these certificates too (they hold no CRL of their own)
        revoked = sorted(f"{s:x}" for s in self.authority.revoked) if self.authority else []
        return {"ok": True, "network": self.network_for(name), "revoked": revoked, "stop": stop,
                "lease_ttl": self.lease_ttl, "fence_after": self._fence_after()}

    def _restart_fenced(self, vm: VMRecord, host: str) -> None:
        """A guest its own host killed because its lease ran out while this manager was
        away (the host is back and nobody restarted the VM elsewhere): start it again on
        that host, unless the VM was stopped, moved or destroyed meanwhile."""
        key = vm.key
        if key in self._fenced_restarts:
            return
        self._fenced_restarts.add(key)

        async def restart() -> None:
            try:
                async with self.lock(f"vc/{vm.vc}"):
                    now = self._vm_or_none(key)
                    if now is None or now.host != host or now.state not in ("stopped", "failed") \
                            or now.error != FENCED_ERROR:
                        return  # stopped, moved or destroyed meanwhile: not ours to start
                    log.warning("restarting %s on %s: its host fenced it while the manager was away", key, host)
                    await self._start_vm(self.vc(vm.vc), now)
            except VirtuaError as e:
                log.warning("restart of fenced %s on %s failed: %s", key, host, e.message)
            finally:
                self._fenced_restarts.discard(key)

        try:
            task = asyncio.get_running_loop().create_task(restart())
        except RuntimeError:  # no loop (a heartbeat handled outside serve): nothing to run it on
            self._fenced_restarts.discard(key)
            restart().close()
            return
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _fence_after(self) -> float | None:
        return fence_after(self.lease_ttl) if self.restart_dead else None

    def _leased(self, h: HostRecord) -> bool:
        """Whether h's lease still runs, by this process's monotonic clock only. A host not
        heard from since this manager started has a lease from that start: its record's
        wall-clock time says nothing safe (a clock stepped forward would call live hosts
        dead and restart their VMs beside them), and waiting one lease is the safe side."""
        renewed = self._renewed.get(h.name, self._began)
        return time.monotonic() - renewed < self.lease_ttl

    def network_for(self, host: str) -> dict[str, Any]:
        """What a host must route and filter: every VC subnet, and a /32 route to each VM
        that runs elsewhere, via the address of the host that runs it."""
        addresses = {h.name: h.address.rpartition(":")[0].strip("[]") for h in self.hosts() if _usable(h.address)}
        routes = [
            {"dst": f"{vm.address}/32", "via": addresses[vm.host]}
            for vm in self.vms()
            if vm.host != host and vm.host in addresses and vm.state in ("running", "starting")
        ]
        return {
            "vc_subnets": sorted(vc.subnet for vc in self.vcs()), "routes": routes,
            "host_networks": self.host_filter_networks(),
        }

    def host_filter_networks(self) -> list[str]:
        """Every network and address of the hosts and the manager: closed to guests."""
        hosts = self.hosts()
        networks: list[IPv4Network | str] = [*self.host_networks, *(n for h in hosts for n in h.networks)]
        addresses = [self.advertise, *(h.address.rpartition(":")[0].strip("[]") for h in hosts)]
        return netplan.host_filter_networks(networks, addresses)

    def add_host(self, name: str, address: str, cores: int | None = None, memory: str | None = None) -> dict[str, Any]:
        """Register a host by hand (normally its agent registers itself)."""
        check_name(name, "host name")
        try:
            address = canonical_address(address)
        except ValueError as e:
            raise InvalidArgument(f"--address: {e}") from None
        if self.store.get(f"/hosts/{name}") is not None:
            raise AlreadyExists(f"host {name} is already registered")
        rec = {
            "name": name, "address": address, "cores": cores or 1,
            "memory_mb": (parse_size(memory) >> 20) if memory else 1024,
        }
        self.register_host(rec)
        h = self.host(name)
        h.last_seen = 0.0
        h.state = "offline"  # until its agent heartbeats
        self._put_host(h)
        return self.host_info(name)

    def remove_host(self, name: str, force: bool = False) -> dict[str, Any]:
        self.host(name)
        vms = [v for v in self.vms() if v.host == name and v.state in ("running", "starting", "suspended")]
        if vms and not force:
            raise DependencyError(
                f"host {name} runs {len(vms)} VM(s) ({', '.join(v.key for v in vms)}); "
                "drain it first or use --force"
            )
        self.store.delete(f"/hosts/{name}")
        self._grants = None
        client = self._agent_http.pop(name, None)
        if client is not None:  # its pooled connections would outlive the revocation
            with contextlib.suppress(RuntimeError):  # no loop: nothing was ever sent on it
                asyncio.get_running_loop().create_task(client.aclose())
        revoked = self.authority.revoke_name("host", name) if self.authority else []
        self.fence_nbd(host=name)
        return {"removed": [name], "revoked": [f"{s:x}" for s in revoked]}

    # ================================================================== credentials

    def _authority(self) -> ClusterCA:
        if self.authority is None or self.tokens is None:
            raise Unavailable("this manager has no cluster CA")
        return self.authority

    def join_token(self, ttl: str = "1h", name: str | None = None) -> dict[str, Any]:
        """A one-time token for `virtua agent --join-token-file` (stored hashed); with a
        name it joins that host only."""
        self._authority()
        assert self.tokens is not None
        if name is not None:
            self._check_joinable_name(name)
        token, expires = self.tokens.create(_parse_ttl(ttl), name)
        log.info("join token %s%s created, valid until %s", token.id, f" for host {name}" if name else "",
                 time.strftime("%H:%M:%S", time.localtime(expires)))
        return {"token": str(token), "id": token.id, "expires": expires, "host": name}

    def write_join_token(self, path: Path, ttl: float, name: str | None = None) -> None:
        self._authority()
        assert self.tokens is not None
        token, _ = self.tokens.create(ttl, name)
        write_private(path, f"{token}\n".encode())

    def _check_joinable_name(self, name: str) -> None:
        check_name(name, "host name")
        if name.lower() in RESERVED_NAMES:  # TLS name checks ignore case
            raise InvalidArgument(f"bad host name {name!r}: reserved")

    def join(self, token: str, name: str, csr: str, address: str, peer: str = "?") -> dict[str, Any]:
        """Spend a join token: sign the host's certificate request (CN = its name, one IP
        SAN = the address its agent listens on, which must be the address it joins from:
        nobody gets a certificate for another machine's address).

        Everything that can be checked without the token is checked first, so a bad
        request never burns it."""
        authority = self._authority()
        assert self.tokens is not None
        parse_token(token)
        self._check_joinable_name(name)
        ip = self._join_address(address, peer)
        csr_req = authority.check_csr(csr.encode(), name)
        if authority.active_serials("host", name):
            raise AlreadyExists(f"host {name} has joined already: `virtua host rm {name}` first to replace it")
        holders = [h for h in authority.holders_of_address(ip) if h != name]
        if holders and not ip_address(ip).is_loopback:
            raise AlreadyExists(f"address {ip} belongs to host {holders[0]}: `virtua host rm {holders[0]}` first")
        existing = self.store.get(f"/hosts/{name}") is not None
        token_id = self.tokens.consume(token, name, existing=existing)
        cert = authority.sign_csr(csr_req, "host", name, [ip])
        log.info("host %s joined from %s with token %s", name, peer, token_id)
        return {"cert": cert.decode(), "ca": authority.ca_pem.decode()}

    def _join_address(self, address: str, peer: str) -> str:
        """The IP address in a join request, checked against where the request came from:
        the same address, or a loopback one when the joiner is on this machine."""
        host, _, port = address.rpartition(":")
        if ":" in host and not host.startswith("["):  # agents send IPv6 listen addresses bare
            host = f"[{host}]"
        try:
            ip = canonical_ip(canonical_address(f"{host}:{port}").rpartition(":")[0].strip("[]"))
        except ValueError:
            raise InvalidArgument(f"bad agent address {address[:80]!r}: expected IP:PORT") from None
        if ip.is_unspecified or ip.is_multicast:
            raise InvalidArgument(f"bad agent address {address[:80]!r}: the agent must listen on one address")
        try:
            source = canonical_ip(peer)
        except ValueError:
            raise Forbidden(f"cannot tell where the join request for {address} came from ({peer!r})") from None
        local = source.is_loopback or str(source) == self.advertise
        if ip != source and not (local and ip.is_loopback):
            raise Forbidden(
                f"the agent joins from {source} but says it listens on {ip}: "
                "a host joins from the address its agent listens on"
            )
        return str(ip)

    def nbd_access(self, export: str, identity: str) -> bool:
        """May this TLS identity (a certificate's CN) open this export? The admin: any; a
        host: the disks of the VMs placed on it while they start or run; nobody else."""
        if identity == "admin":
            return True
        vm = self._disk_owners().get(export)
        return vm is not None and vm.host == identity

    def disk_user(self, export: str, identity: str | None) -> str | None:
        """Which VM a client of this export is, when the export is the disk of a starting or
        running VM: "VM web/web-1 on host h1" (the client's certificate names the host)."""
        vm = self._disk_owners().get(export)
        if vm is not None and identity in (None, vm.host):  # None: local plaintext
            return f"VM {vm.key} on host {vm.host}"
        return None

    def _disk_owners(self) -> dict[str, VMRecord]:
        """export -> the starting or running VM (on a known host) whose disk it is: one pass
        over the records, kept until a VM or host record changes (NBD asks for every export
        opened and every one listed)."""
        if self._grants is None:
            hosts = {h.name for h in self.hosts()}
            self._grants = {
                e: vm for vm in self.vms() if vm.host in hosts and vm.state in ("starting", "running")
                for e in _exports_of(vm)
            }
        return self._grants

    def fence_nbd(self, exports: Iterable[str] | None = None, host: str | None = None) -> list[str]:
        """Close the NBD sessions on these exports (or of this host) that the policy no
        longer allows: access is checked when an export is opened, so without this a
        removed host, or the old host of a VM that moved, stopped, failed or was destroyed,
        would keep writing its disk (two writers). The check is the one made at open
        (`nbd_allowed`: the administrator's --allow rules, then placement), on the few
        sessions concerned, so a batch of record changes stays linear. Returns what it closed."""
        if not self.enforce_nbd_access:
            return []
        holders = self.storage.holders
        concerned = holders.of(exports) if exports is not None else []
        if host is not None:
            concerned += [h for h in holders.all() if h.identity == host]
        closed = []
        for h in concerned:
            if h.identity is None or h.identity == "admin" or h.disconnect is None:
                continue  # local plaintext (root) and the administrator
            if not self.nbd_allowed(h.export, h.identity):
                closed.append(f"{h.identity}:{h.export}")
                h.disconnect(f"host {h.identity} no longer holds export {h.export} (moved, stopped or removed)")
        return closed

    def owners_of(self, kind: str, key: str) -> set[str]:
        """The hosts that may fetch a template's boot files or a VM's saved state."""
        if kind == "template":
            vcs = {vc.name for vc in self.vcs() if vc.template == key}
            hosts = {vm.host for vm in self.vms() if vm.vc in vcs}
            return hosts | {h for h, names in self._template_grants.items() if key in names}
        if kind == "vmstate":
            vm = self._vm_or_none(key)
            return {vm.host} if vm is not None else set()
        return set()

    async def drain_host(self, name: str) -> dict[str, Any]:
        """Stop placing VMs on a host and move its running VMs elsewhere (suspend, resume)."""
        h = self.host(name)
        h.draining = True
        h.state = "draining"
        self._put_host(h)
        moved: list[str] = []
        for vc in {v.vc for v in self.vms() if v.host == name}:
            async with self.lock(f"vc/{vc}"):
                rec = self.vc(vc)
                vms = self.vc_vms(vc)
                running = [v for v in vms if v.host == name and v.state == "running"]
                plan = self._place(rec, vms, current={v.name: v.host for v in vms})
                for v in vms:
                    new_host = plan.get(v.name, v.host)
                    if new_host == v.host:
                        continue
                    if v in running:
                        await self._suspend_vm(v)
                    v.host = new_host
                    self._put_vm(v)
                    if v.state == "suspended":
                        await self._resume_vm(rec, v)
                    moved.append(f"{v.key} -> {new_host}")
        return {"host": name, "state": "draining", "moved": moved}

    def undrain_host(self, name: str) -> dict[str, Any]:
        """Let the placement use a drained host again (kubectl uncordon)."""
        h = self.host(name)
        h.draining = False
        h.state = "online" if self._leased(h) else "offline"
        self._put_host(h)
        return self.host_info(name)

    def host_info(self, name: str) -> dict[str, Any]:
        h = self.host(name)
        vms = [v for v in self.vms() if v.host == name]
        running = [v for v in vms if v.state in ("running", "starting")]
        return {
            **h.model_dump(),
            "alive": self._leased(h),
            "vms": [v.key for v in vms],
            "cores_used": sum(self.vc(v.vc).cpus for v in running),
            "memory_used_mb": sum(self.vc(v.vc).memory_mb for v in running),
        }

    def host_list(self) -> list[dict[str, Any]]:
        return [self.host_info(h.name) for h in self.hosts()]

    async def host_leftovers(self, name: str) -> dict[str, Any]:
        """Ask the host's agent what network state it still holds (taps, routes, rules)."""
        h = self.host(name)
        return await self._agent(h, "GET", "/v1/net")

    # ================================================================== templates

    def templates(self) -> list[TemplateRecord]:
        return [TemplateRecord(**v) for _, v in self.store.range("/templates/")]

    def template(self, name: str) -> TemplateRecord:
        check_name(name, "template name")  # names from requests become store keys and paths
        v = self.store.get(f"/templates/{name}")
        if v is None:
            known = ", ".join(t.name for t in self.templates()) or "none"
            raise NotFound(f"template {name} does not exist (known: {known})")
        return TemplateRecord(**v)

    def _default_pool(self, pool: str | None) -> str:
        if pool:
            self.storage.pool(pool)
            return pool
        names = list(self.storage.pool_paths())
        if DEFAULT_POOL in names:
            return DEFAULT_POOL
        if names:
            return names[0]
        self.storage.create_pool(DEFAULT_POOL)
        return DEFAULT_POOL

    def _template_files(self, name: str, kernel: Path, initrd: Path | None) -> dict[str, Any]:
        d = self.templates_dir / name
        d.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        shutil.copyfile(kernel, d / "vmlinuz")
        out["kernel"] = str(d / "vmlinuz")
        out["kernel_digest"] = _digest(d / "vmlinuz")
        if initrd:
            shutil.copyfile(initrd, d / "initrd.img")
            out["initrd"] = str(d / "initrd.img")
            out["initrd_digest"] = _digest(d / "initrd.img")
        return out

    def template_build(
        self, name: str, pool: str | None = None, size: str | None = None, wait: bool = True,
    ) -> dict[str, Any]:
        """A small bootable Linux from Debian packages: cloud kernel, busybox root on ext4.
        A recorded job of three steps (the cached guest files; the root disk's import into
        a template volume; the record): a failure or a crash removes the half-made volume
        and record. In serve, wait=False returns {"job": ID} and the build runs on."""
        from virtua.vmm.image import GuestArtifacts, ensure_artifacts, kernel_cmdline

        check_name(name, "template name")
        if self.store.get(f"/templates/{name}") is not None:
            raise AlreadyExists(f"template {name} already exists")
        rootfs_size = parse_size(size) if size else 64 << 20
        cache = self.home / "cache" / "guest"
        pname = self._default_pool(pool)
        p = self.storage.pool(pname)
        vol = f"{TEMPLATE_VOLUME_PREFIX}{name}"  # exported read-only (Storage.open_export)
        ref = f"{pname}/{vol}"
        if vol in p.volumes_by_name:
            raise AlreadyExists(f"volume {ref} already exists (a template's volume): remove it first")
        serving = _serving()
        art: list[GuestArtifacts] = []
        info: dict[str, Any] = {}

        def artifacts() -> Any:
            if not serving:
                art.append(ensure_artifacts(cache, rootfs_size=rootfs_size))
                return None

            async def go() -> None:  # the build's subprocesses in a thread
                if self._artifacts_lock is None:
                    self._artifacts_lock = asyncio.Lock()
                async with self._artifacts_lock:  # one build of the cache at a time
                    art.append(await asyncio.get_running_loop().run_in_executor(
                        None, lambda: ensure_artifacts(cache, rootfs_size=rootfs_size)))

            return go()

        def import_root() -> Any:
            a = art[0]
            if serving:
                return self._template_volume_async(p, vol, str(a.rootfs))
            return self._template_volume(p, vol, str(a.rootfs))

        def record() -> None:
            a = art[0]
            info.update(self._template_record(name, pname, vol, a.kernel, a.initrd, kernel_cmdline("/dev/vda")))

        plan = Plan(f"template build {name}")
        plan.add("build the guest's kernel, initrd and root file system (cached)", artifacts)
        plan.add(f"import the root file system into {ref}", import_root,
                 lambda: self._rm_volumes(p, [ref]), Undo(kind="volumes.rm", args={"refs": [ref]}))
        plan.add(f"record template {name}", record,
                 lambda: self._forget_template(name), Undo(kind="template.forget", args={"name": name}))
        job = runner.start(self.storage.jobs, "template.build", {"name": name, "pool": pname, "size": rootfs_size},
                           plan, total=len(plan.steps))
        if not serving:
            plan.run_sync(job)
            return job.finish(info)  # type: ignore[no-any-return]

        async def run() -> dict[str, Any]:
            await plan.run(job)
            return job.finish(info)  # type: ignore[no-any-return]

        if wait:
            return run()  # type: ignore[return-value]
        task = asyncio.get_running_loop().create_task(run())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # recorded in the job
        return {"job": job.id, "name": name}

    def _forget_template(self, name: str) -> None:
        self.store.delete(f"/templates/{name}")
        shutil.rmtree(self.templates_dir / name, ignore_errors=True)

    def import_path(self, path: str, what: str, caller_is_admin: bool) -> Path:
        """The host file a request names, if it may name it: only an administrator, and only
        a regular file under the import directory once every symlink and `..` is resolved.
        A relative path is relative to the import directory."""
        if not caller_is_admin:
            log.warning("refused %s %r: the caller is not an administrator", what, path)
            raise PermissionDenied(f"{what} {path!r}: only an administrator may import host files")
        if not isinstance(path, str) or not path or "\0" in path:
            raise InvalidArgument(f"bad {what} {path!r}: expected a file under {self.import_dir}")
        root = Path(os.path.realpath(self.import_dir))
        real = Path(os.path.realpath(root / path))  # an absolute path replaces root
        if not real.is_relative_to(root) or real == root:
            log.warning("refused %s %r: outside the import directory %s", what, path, root)
            raise PermissionDenied(f"{what} {path!r} is not under the import directory {root}: copy it there first")
        if not real.is_file():
            raise NotFound(f"no such {what} in the import directory: {path}")
        return real

    def template_import(
        self, name: str, image: str, kernel: str | None = None, initrd: str | None = None,
        cmdline: str | None = None, pool: str | None = None, caller_is_admin: bool = False,
    ) -> dict[str, Any]:
        """An existing raw/qcow2 root disk; boots with the given (or the cloud) kernel.
        Every file it names must be under the import directory (see import_path)."""
        from virtua.vmm.image import ensure_artifacts, kernel_cmdline

        check_name(name, "template name")
        if self.store.get(f"/templates/{name}") is not None:
            raise AlreadyExists(f"template {name} already exists")
        ipath: Path | None
        image_path = self.import_path(image, "image", caller_is_admin)
        if kernel is None:
            if initrd is not None:
                raise InvalidArgument("--initrd needs --kernel")
            art = ensure_artifacts(self.home / "cache" / "guest")
            kpath, ipath = art.kernel, art.initrd
        else:
            kpath = self.import_path(kernel, "kernel", caller_is_admin)
            ipath = self.import_path(initrd, "initrd", caller_is_admin) if initrd else None
        return self._template_from(name, pool, str(image_path), kpath, ipath, cmdline or kernel_cmdline("/dev/vda"))

    def _template_from(
        self, name: str, pool: str | None, image: str, kernel: Path, initrd: Path | None, cmdline: str
    ) -> dict[str, Any]:

        pname = self._default_pool(pool)
        vol = f"{TEMPLATE_VOLUME_PREFIX}{name}"  # exported read-only (Storage.open_export)
        self._template_volume(self.storage.pool(pname), vol, image)
        return self._template_record(name, pname, vol, kernel, initrd, cmdline)

    def _template_volume(self, p: Any, vol: str, image: str) -> None:
        """A template's volume from an image, with its snapshot `base` (or no volume at all)."""
        from virtua.storage import imageio

        with imageio.raw_source(image) as raw:
            size = Path(raw).stat().st_size
            p.create_volume(vol, (size + 511) // 512 * 512)
            try:
                imageio.import_into(raw, self.storage.open_device(f"{p.name}/{vol}"))
                p.create_snapshot(vol, "base")
            except BaseException:
                p.delete_volume(vol, recursive=True)
                raise

    async def _template_volume_async(self, p: Any, vol: str, image: str) -> None:
        """_template_volume beside the guests: the import a block at a time, the flush's
        fdatasync and commit in the flush job."""
        from virtua.storage import imageio

        with imageio.raw_source(image) as raw:
            size = Path(raw).stat().st_size
            p.create_volume(vol, (size + 511) // 512 * 512)
            try:
                dev = self.storage.open_device(f"{p.name}/{vol}")
                for _ in imageio.import_steps(raw, dev):
                    await asyncio.sleep(0)
                await dev.flush_async()
                p.create_snapshot(vol, "base")
            except BaseException:
                p.delete_volume(vol, recursive=True)
                raise

    def _template_record(
        self, name: str, pname: str, vol: str, kernel: Path, initrd: Path | None, cmdline: str
    ) -> dict[str, Any]:
        files = self._template_files(name, kernel, initrd)
        rec = TemplateRecord(
            name=name, volume=f"{pname}/{vol}", snapshot=f"{pname}/{vol}@base",
            cmdline=cmdline, created=time.time(), **files,
        )
        self.store.put(f"/templates/{name}", rec.model_dump())
        return self.template_info(name)

    def template_info(self, name: str) -> dict[str, Any]:
        t = self.template(name)
        r = parse_ref(t.volume)
        info = self.storage.pool(r.pool).volume_info(r.volume)
        users = [vc.name for vc in self.vcs() if vc.template == name]
        return {**t.model_dump(), "size": info["size"], "allocated": info["allocated"],
                "snapshots": info["snapshots"], "vcs": users}

    def template_list(self) -> list[dict[str, Any]]:
        return [self.template_info(t.name) for t in self.templates()]

    def template_rm(self, name: str) -> dict[str, Any]:
        t = self.template(name)
        users = [vc.name for vc in self.vcs() if vc.template == name]
        if users:
            raise DependencyError(f"template {name} is used by VC(s) {', '.join(users)}; destroy them first")
        r = parse_ref(t.volume)
        removed = self.storage.pool(r.pool).delete_volume(r.volume, recursive=True)
        self._forget_template(name)
        return {"removed": [name, *removed]}

    def template_file(self, name: str, which: str) -> Path:
        t = self.template(name)
        path = t.kernel if which == "kernel" else t.initrd if which == "initrd" else None
        if not path:
            raise NotFound(f"template {name} has no {which}")
        return Path(path)

    # ================================================================== VC records

    def vcs(self) -> list[VCRecord]:
        return [VCRecord(**v) for _, v in self.store.range("/vcs/")]

    def vc(self, name: str) -> VCRecord:
        check_name(name, "VC name")
        v = self.store.get(f"/vcs/{name}")
        if v is None:
            raise NotFound(f"virtual cluster {name} does not exist")
        return VCRecord(**v)

    def vms(self) -> list[VMRecord]:
        return _records(VMRecord, self.store.range("/vms/"))

    def vc_vms(self, vc: str) -> list[VMRecord]:
        return sorted(_records(VMRecord, self.store.range(f"/vms/{vc}/")), key=lambda v: v.index)

    def _vm_or_none(self, key: str) -> VMRecord | None:
        v = self.store.get(f"/vms/{key}")
        return None if v is None else VMRecord(**v)

    def _put_vm(self, vm: VMRecord) -> None:
        self.store.put(f"/vms/{vm.key}", vm.model_dump())
        self._grants = None
        self.fence_nbd(_exports_of(vm))

    def _put_vc(self, vc: VCRecord) -> None:
        self.store.put(f"/vcs/{vc.name}", vc.model_dump())

    # ================================================================== placement

    def _capacities(self) -> list[HostCapacity]:
        return [
            HostCapacity(
                name=h.name, cores=h.cores, memory_mb=h.memory_mb, reserved_memory_mb=h.reserved_memory_mb,
                online=self._leased(h), draining=h.draining,
                templates=set(h.templates) if h.templates is not None else None,
            )
            for h in self.hosts()
        ]

    def _load(self, exclude_vc: str) -> dict[str, HostLoad]:
        load: dict[str, HostLoad] = {}
        for vm in self.vms():
            if vm.vc == exclude_vc or vm.state not in ("running", "starting", "suspended"):
                continue
            if vm.state == "suspended":
                continue  # a suspended VM holds no cores or memory
            vc = self.vc(vm.vc)
            cur = load.get(vm.host, HostLoad())
            load[vm.host] = HostLoad(
                cores_used=cur.cores_used + vc.cpus,
                memory_used_mb=cur.memory_used_mb + vc.memory_mb,
                vms=cur.vms + 1,
            )
        return load

    def _place(
        self, vc: VCRecord, vms: list[VMRecord] | None = None, current: dict[str, str] | None = None,
        strategy: str | None = None, mode: str | None = None, names: list[str] | None = None,
    ) -> dict[str, str]:
        hosts = self._capacities()
        if not hosts:
            raise Unavailable("no hosts are registered: start `virtua agent` on each host")
        node_names = names or [v.name for v in vms or []]
        requests = [VMRequest(name=n, cpus=vc.cpus, memory_mb=vc.memory_mb) for n in node_names]
        result = place(
            requests, hosts, load=self._load(vc.name), strategy=strategy or vc.strategy,
            mode=mode or vc.mode, template=vc.template, current=current,
        )
        return dict(result.mapping)

    # ================================================================== VC lifecycle

    async def vc_create(
        self, name: str, template: str, nodes: int, cpus: int = 1, memory: str = "256M",
        disk: str | None = None, swap: str = "64M", strategy: str = "block", mode: str = "strict",
        subnet: str | None = None, start: bool = False, pool: str | None = None, egress: str = "none",
        dry_run: bool = False, wait: bool = True,
    ) -> dict[str, Any]:
        """A recorded job; wait=False returns {"job": ID} once it is recorded (the CLI then
        follows it with `job show`), else its result."""
        check_name(name, "VC name")
        egress_mode = netplan.validate_egress(egress)
        if len(name) > 40:
            raise InvalidArgument(f"bad VC name {name!r}: at most 40 characters")
        if not 1 <= nodes <= 1000:
            raise InvalidArgument(f"bad node count {nodes}: must be 1..1000")
        self._check_txn_fits(nodes + 1, f"a VC of {nodes} nodes")
        if not 1 <= cpus <= 64:
            raise InvalidArgument(f"bad vCPU count {cpus}: must be 1..64")
        if strategy not in ("block", "cyclic"):
            raise InvalidArgument(f"bad strategy {strategy!r}: use block or cyclic")
        if mode not in ("strict", "lazy"):
            raise InvalidArgument(f"bad mode {mode!r}: use strict or lazy")
        lock = self.lock(f"vc/{name}")
        await lock.acquire()
        try:
            if self.store.get(f"/vcs/{name}") is not None:
                raise AlreadyExists(f"virtual cluster {name} already exists")
            t = self.template(template)
            snap = parse_ref(t.snapshot)
            pname = pool or snap.pool
            if pname != snap.pool:
                raise InvalidArgument(f"template {template} lives in pool {snap.pool}; clones stay in that pool")
            p = self.storage.pool(pname)
            tsize = p.snapshot(snap.volume, snap.snapshot or "").size
            disk_size = max(parse_size(disk), tsize) if disk else tsize
            mem_mb = parse_size(memory) >> 20
            if mem_mb < 64:
                raise InvalidArgument(f"bad memory {memory!r}: at least 64M")
            swap_size = parse_size(swap)
            existing = {vc.name: IPv4Network(vc.subnet) for vc in self.vcs()}
            host_nets = self.host_networks + [IPv4Network(n) for h in self.hosts() for n in h.networks]
            if subnet:
                net = netplan.validate_subnet(subnet, existing, nodes, host_nets)
            else:
                net = netplan.allocate_subnet(existing, prefix=netplan.prefix_for(nodes), host_networks=host_nets)
            rec = VCRecord(
                name=name, template=template, snapshot=t.snapshot, nodes=nodes, cpus=cpus,
                memory_mb=mem_mb, disk=disk_size, swap=swap_size, strategy=strategy, mode=mode,
                subnet=str(net), pool=pname, egress=egress_mode, state="stopped", created=time.time(),
            )
            node_names = [f"{name}-{i}" for i in range(1, nodes + 1)]
            mapping = self._place(rec, names=node_names)  # stage 1: refuse before touching anything
            vms = [
                VMRecord(
                    vc=name, name=n, index=i, host=mapping[n], state="stopped",
                    address=str(netplan.node_address(net, i - 1)), mac=netplan.mac_for(name, i),
                    tap=netplan.tap_name(name, i), disk=f"{pname}/vc-{n}", swap=f"{pname}/vc-{n}-swap",
                    seed=f"{pname}/vc-{n}-seed",
                )
                for i, n in enumerate(node_names, 1)
            ]
            def rm_undo(refs: list[str]) -> Undo:
                return Undo(kind="volumes.rm", args={"refs": refs})

            plan = Plan(f"vc create {name}")
            plan.add(
                f"clone {t.snapshot} x{nodes}",
                lambda: self._clone_disks(p, snap.volume, snap.snapshot or "", vms, disk_size),
                lambda: self._rm_volumes(p, [v.disk for v in vms]), rm_undo([v.disk for v in vms]),
            )
            plan.add(
                "create swap volumes",
                lambda: [p.create_volume(parse_ref(v.swap).volume, swap_size) for v in vms],
                lambda: self._rm_volumes(p, [v.swap for v in vms]), rm_undo([v.swap for v in vms]),
            )
            plan.add(
                "write per-node seeds",
                lambda: self._write_seeds(rec, vms, net),
                lambda: self._rm_volumes(p, [v.seed for v in vms]), rm_undo([v.seed for v in vms]),
            )
            plan.add("prepare hosts", lambda: self._prepare_hosts(t, vms))
            plan.add(
                "record the VC",
                lambda: self._record_vc(rec, vms),
                lambda: self._forget_vc(name), Undo(kind="vc.forget", args={"name": name}),
            )
            if dry_run:
                return {"name": name, "plan": plan.describe(), "subnet": str(net),
                        "placement": {v.name: v.host for v in vms}}
            job = runner.start(self.storage.jobs, "vc.create", {"name": name, "template": template, "nodes": nodes},
                               plan, total=len(plan.steps))
        except BaseException:
            lock.release()
            raise
        run = self._run_vc_create(job, plan, lock, name, start)  # releases the lock
        if wait:
            return await run
        task = asyncio.create_task(run)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # recorded in the job
        return {"job": job.id, "name": name}

    async def _run_vc_create(
        self, job: runner.Job, plan: Plan, lock: asyncio.Lock, name: str, start: bool,
    ) -> dict[str, Any]:
        try:
            await plan.run(job)
        finally:
            lock.release()
        try:
            if start:
                await self._start_vc(name)
            info = self.vc_info(name)
        except BaseException as e:  # created, but did not start: the job says so, the VC stays
            job.failed_after(e)
            raise
        job.finish({"name": name, "state": info.get("state")})
        return info

    def _clone_disks(self, p: Any, volume: str, snapshot: str, vms: list[VMRecord], size: int) -> None:
        made: list[str] = []
        try:
            for v in vms:
                made.append(parse_ref(v.disk).volume)
                p.clone(volume, snapshot, made[-1])
                if size > p.volume(made[-1]).size:
                    p.resize_volume(made[-1], size)
        except BaseException:
            self._rm_volumes(p, [f"{p.name}/{m}" for m in made])
            raise

    def _rm_volumes(self, p: Any, refs: list[str]) -> None:
        for ref in refs:
            vol = parse_ref(ref).volume
            if vol in p.volumes_by_name:
                p.delete_volume(vol, recursive=True)

    def _write_seeds(self, vc: VCRecord, vms: list[VMRecord], net: IPv4Network) -> None:
        from virtua.storage import imageio
        from virtua.vmm.image import build_seed

        p = self.storage.pool(vc.pool)
        made: list[str] = []
        try:
            with tempfile.TemporaryDirectory(prefix="virtua-seed-") as tmp:
                for v in vms:
                    path = Path(tmp) / f"{v.name}.seed"
                    build_seed(
                        path, hostname=v.name, ip=f"{v.address}/{net.prefixlen}",
                        gateway=str(netplan.gateway_address(net)), vc=vc.name, node_index=v.index,
                    )
                    vol = parse_ref(v.seed).volume
                    p.create_volume(vol, (path.stat().st_size + 511) // 512 * 512)
                    made.append(v.seed)
                    imageio.import_into(str(path), self.storage.open_device(v.seed))
        except BaseException:
            self._rm_volumes(p, made)
            raise

    async def _prepare_hosts(self, t: TemplateRecord, vms: list[VMRecord]) -> None:
        """Every chosen host must answer and hold the template's kernel before we commit."""
        for host in sorted({v.host for v in vms}):
            h = self.host(host)
            # before the VC is recorded, its hosts may fetch the template's boot files
            self._template_grants.setdefault(host, set()).add(t.name)
            try:
                await self._agent(h, "POST", "/v1/prepare", json=self._artifacts(t))
            finally:
                self._template_grants[host].discard(t.name)

    def _check_txn_fits(self, ops: int, what: str) -> None:
        """Refuse, before anything is made, an operation whose one store transaction would
        be past the store's limit (etcd's --max-txn-ops; SQLite has none)."""
        limit = getattr(self.store, "max_txn_ops", None)
        ops += getattr(self.store, "txn_overhead", 0)  # etcd: each transaction's marker (store_etcd)
        if isinstance(limit, int) and ops > limit:
            raise InvalidArgument(
                f"{what} is recorded in one etcd transaction of {ops} operations, and this etcd allows {limit} "
                f"(--max-txn-ops): start etcd with --max-txn-ops {ops} or more and serve with the same "
                "--etcd-max-txn-ops, or make a smaller VC")

    def _record_vc(self, rec: VCRecord, vms: list[VMRecord]) -> None:
        with self.store.txn():
            self._put_vc(rec)
            for v in vms:
                self._put_vm(v)

    def _forget_vc(self, name: str) -> None:
        gone = self.vc_vms(name)
        with self.store.txn():
            for key, _ in self.store.range(f"/vms/{name}/"):
                self.store.delete(key)
            self.store.delete(f"/vcs/{name}")
        self._grants = None
        self.fence_nbd([e for vm in gone for e in _exports_of(vm)])  # destroyed: no instance may write

    def _artifacts(self, t: TemplateRecord) -> dict[str, Any]:
        return {
            "kernel_url": f"{self.api_url}/v1/templates/{t.name}/kernel",
            "kernel_digest": t.kernel_digest,
            "initrd_url": f"{self.api_url}/v1/templates/{t.name}/initrd" if t.initrd else None,
            "initrd_digest": t.initrd_digest,
        }

    def _launch(self, vc: VCRecord, vm: VMRecord, resume: bool = False) -> VMLaunch:
        t = self.template(vc.template)
        net = IPv4Network(vc.subnet)
        art = self._artifacts(t)
        return VMLaunch(
            id=vm.key, hostname=vm.name, cpus=vc.cpus, memory_mb=vc.memory_mb,
            kernel_url=art["kernel_url"], kernel_digest=art["kernel_digest"] or "",
            initrd_url=art["initrd_url"], initrd_digest=art["initrd_digest"],
            cmdline=t.cmdline, disks=[self.nbd_uri(vm.disk), self.nbd_uri(vm.swap), self.nbd_uri(vm.seed)],
            nic=NicLaunch(
                tap=vm.tap, mac=vm.mac, address=vm.address, gateway=str(netplan.gateway_address(net)),
                subnet=vc.subnet, vc=vc.name, egress=vc.egress,
            ),
            state_url=f"{self.api_url}/v1/vmstate/{vm.key}" if resume else None,
        )

    async def _each(self, vms: list[VMRecord], fn: Callable[[VMRecord], Awaitable[None]]) -> list[str]:
        """Run fn on every VM concurrently; collect failures instead of stopping at the first."""
        errors: list[str] = []

        async def one(v: VMRecord) -> None:
            try:
                await fn(v)
            except VirtuaError as e:
                errors.append(f"{v.name} on {v.host}: {e.message}")

        await asyncio.gather(*(one(v) for v in vms))
        return errors

    async def _start_vm(self, vc: VCRecord, vm: VMRecord) -> None:
        vm.state = "starting"
        vm.error = None
        self._put_vm(vm)
        try:
            r = await self._agent(self.host(vm.host), "POST", "/v1/vm/start",
                                  json={"launch": self._launch(vc, vm).model_dump(), "wait": True})
        except VirtuaError as e:
            vm.state = "failed"
            vm.error = e.message
            self._put_vm(vm)
            raise
        vm.state, vm.accel = _started(r, vm, None)
        self._put_vm(vm)

    async def vc_start(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Boot every node. Nothing to undo: a node that did not start is recorded failed,
        the VC degraded."""
        self._check_startable(name)  # before a job: what would refuse it at once
        return await self._vc_job("vc.start", name, "start", lambda job: self._start_vc(name, job), wait)

    async def _vc_job(
        self, op: str, name: str, verb: str, work: Callable[[runner.Job], Awaitable[None]], wait: bool,
        args: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A VC-wide operation as a recorded job of one step, its progress the nodes done;
        wait=False returns {"job": ID} once it is recorded (the CLI follows it), else the
        VC's info. work(job) takes the VC's lock itself and checks again under it."""
        plan = Plan(f"vc {verb} {name}")
        plan.add(f"{verb} the nodes of {name}", lambda: work(job))
        job = runner.start(self.storage.jobs, op, {"name": name, **(args or {})}, plan, unit="VMs")

        async def run() -> dict[str, Any]:
            await plan.run(job)
            info = self.vc_info(name)
            job.finish({"name": name, "state": info.get("state")})
            return info

        if wait:
            return await run()
        task = asyncio.create_task(run())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # recorded in the job
        return {"job": job.id, "name": name}

    async def _each_counted(
        self, vms: list[VMRecord], fn: Callable[[VMRecord], Awaitable[None]], job: runner.Job | None,
    ) -> list[str]:
        """_each, with the job's progress the VMs done (a node done stays done: not cancellable)."""
        done = [0]

        async def one(v: VMRecord) -> None:
            await fn(v)
            done[0] += 1
            if job is not None:
                job.progress(done[0], len(vms), cancellable=False)

        if job is not None:
            job.progress(0, len(vms), cancellable=False)
        return await self._each(vms, one)

    def _check_startable(self, name: str) -> None:
        self.vc(name)
        if any(v.state == "suspended" for v in self.vc_vms(name)):
            raise InvalidArgument(f"VC {name} is suspended: use `virtua vc resume {name}`")

    async def _over_nodes(
        self, name: str, select: Callable[[], list[VMRecord]], fn: Callable[[VCRecord, VMRecord], Awaitable[None]],
        state: str, job: runner.Job | None, failed: str = "",
    ) -> None:
        """Under the VC's lock: select its nodes (checked again there), run fn on each at once,
        record the VC as state (degraded if a node failed), and raise naming the failures."""
        async with self.lock(f"vc/{name}"):
            vms = select()
            vc = self.vc(name)
            errors = await self._each_counted(vms, lambda v: fn(vc, v), job)
            vc.state = state if not errors else "degraded"
            self._put_vc(vc)
            if errors:
                raise Unavailable(f"VC {name}: " + (f"{len(errors)} node(s) {failed}: " if failed else "")
                                  + "; ".join(errors))

    def _startable_vms(self, name: str) -> list[VMRecord]:
        self._check_startable(name)
        return [v for v in self.vc_vms(name) if v.state in ("stopped", "defined", "failed")]

    async def _start_vc(self, name: str, job: runner.Job | None = None) -> None:
        await self._over_nodes(name, lambda: self._startable_vms(name), self._start_vm, "running", job,
                               "failed to start")

    async def _stop_vm(self, vm: VMRecord, force: bool = False) -> None:
        if vm.state in ("running", "starting", "failed"):
            try:
                await self._agent(self.host(vm.host), "POST", "/v1/vm/stop", json={"id": vm.key, "force": force})
            except Unavailable:
                if not force:
                    raise
        vm.state = "stopped"
        vm.error = None  # stopped on purpose: not a fenced VM to start again (_restart_fenced)
        self._put_vm(vm)

    def _check_stoppable(self, name: str, force: bool) -> list[VMRecord]:
        self.vc(name)
        vms = self.vc_vms(name)
        if any(v.state == "suspended" for v in vms) and not force:
            raise InvalidArgument(f"VC {name} is suspended: resume it first, or stop --force to drop the saved state")
        return vms

    async def vc_stop(self, name: str, force: bool = False, wait: bool = True) -> dict[str, Any]:
        """Power off (force: kill) every node, wherever it runs."""
        self._check_stoppable(name, force)
        return await self._vc_job("vc.stop", name, "stop", lambda job: self._stop_vc(name, force, job), wait,
                                  {"force": force})

    def _stoppable_vms(self, name: str, force: bool) -> list[VMRecord]:
        """Every node; a suspended one (force) loses its saved state and is stopped already."""
        vms = self._check_stoppable(name, force)
        for v in vms:
            if v.state == "suspended":
                self._drop_state(v)
                v.state = "stopped"
                self._put_vm(v)
        return vms

    async def _stop_vc(self, name: str, force: bool, job: runner.Job | None = None) -> None:
        await self._over_nodes(name, lambda: self._stoppable_vms(name, force),
                               lambda _vc, v: self._stop_vm(v, force), "stopped", job)

    def _state_path(self, vm: VMRecord) -> Path:
        return self.states_dir / vm.vc / f"{vm.name}.state"

    def _drop_state(self, vm: VMRecord) -> None:
        self._state_path(vm).unlink(missing_ok=True)
        vm.suspended_state = None

    async def _suspend_vm(self, vm: VMRecord) -> None:
        if vm.state != "running":
            return
        self._state_path(vm).parent.mkdir(parents=True, exist_ok=True)
        self._state_uploads.add(vm.key)
        try:
            await self._agent(self.host(vm.host), "POST", "/v1/vm/suspend",
                              json={"id": vm.key, "upload_url": f"{self.api_url}/v1/vmstate/{vm.key}"})
        finally:
            self._state_uploads.discard(vm.key)
        if not self._state_path(vm).exists():
            raise Unavailable(f"{vm.key}: the agent reported success but no saved state arrived")
        vm.state = "suspended"
        vm.suspended_state = str(self._state_path(vm))
        self._put_vm(vm)

    def _check_suspendable(self, name: str) -> list[VMRecord]:
        self.vc(name)
        vms = self.vc_vms(name)
        if not any(v.state == "running" for v in vms):
            raise InvalidArgument(f"VC {name} has no running node to suspend")
        return vms

    async def vc_suspend(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Save every running node's memory state and stop it."""
        self._check_suspendable(name)
        return await self._vc_job("vc.suspend", name, "suspend", lambda job: self._suspend_vc(name, job), wait)

    async def _suspend_vc(self, name: str, job: runner.Job | None = None) -> None:
        await self._over_nodes(name, lambda: self._check_suspendable(name), lambda _vc, v: self._suspend_vm(v),
                               "suspended", job)

    async def _resume_vm(self, vc: VCRecord, vm: VMRecord) -> None:
        if vm.state != "suspended":
            return
        vm.state = "starting"
        self._put_vm(vm)
        try:
            r = await self._agent(self.host(vm.host), "POST", "/v1/vm/resume",
                                  json={"launch": self._launch(vc, vm, resume=True).model_dump()})
        except VirtuaError as e:
            vm.state = "suspended"
            vm.error = e.message
            self._put_vm(vm)
            raise
        self._drop_state(vm)
        vm.state, vm.accel = _started(r, vm, vm.accel)
        self._put_vm(vm)

    def _check_resumable(self, name: str) -> list[VMRecord]:
        self.vc(name)
        vms = self.vc_vms(name)
        if not any(v.state == "suspended" for v in vms):
            raise InvalidArgument(f"VC {name} is not suspended")
        return vms

    async def vc_resume(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Resume every suspended node, on the host its mapping names now."""
        self._check_resumable(name)
        return await self._vc_job("vc.resume", name, "resume", lambda job: self._resume_vc(name, job), wait)

    async def _resume_vc(self, name: str, job: runner.Job | None = None) -> None:
        await self._over_nodes(name, lambda: self._check_resumable(name), self._resume_vm, "running", job)

    async def vc_remap(self, name: str, strategy: str | None = None, mode: str | None = None) -> dict[str, Any]:
        async with self.lock(f"vc/{name}"):
            vc = self.vc(name)
            vms = self.vc_vms(name)
            if any(v.state in ("running", "starting") for v in vms):
                raise InvalidArgument(f"VC {name} is running: suspend (or stop) it before remapping")
            if strategy is not None and strategy not in ("block", "cyclic"):
                raise InvalidArgument(f"bad strategy {strategy!r}: use block or cyclic")
            if mode is not None and mode not in ("strict", "lazy"):
                raise InvalidArgument(f"bad mode {mode!r}: use strict or lazy")
            self._check_txn_fits(len(vms) + 1, f"remapping VC {name}")
            new_vc = vc.model_copy(update={"strategy": strategy or vc.strategy, "mode": mode or vc.mode})
            mapping = self._place(new_vc, vms)  # a fresh mapping with the new strategy
            with self.store.txn():
                for v in vms:
                    v.host = mapping[v.name]
                    self._put_vm(v)
                self._put_vc(new_vc)
        return self.vc_info(name)

    async def vc_destroy(self, name: str, force: bool = False) -> dict[str, Any]:
        async with self.lock(f"vc/{name}"):
            vc = self.vc(name)
            vms = self.vc_vms(name)
            live = [v for v in vms if v.state in ("running", "starting")]
            if live and not force:
                raise DependencyError(
                    f"VC {name} is running ({len(live)} node(s)): stop it first or use --force"
                )
            await self._each(vms, lambda v: self._stop_vm(v, force=True))
            p = self.storage.pool(vc.pool)
            for v in vms:
                self._rm_volumes(p, [v.disk, v.swap, v.seed])
                self._drop_state(v)
            shutil.rmtree(self.states_dir / name, ignore_errors=True)
            self._forget_vc(name)
        return {"removed": [name, *(v.key for v in vms)]}

    async def vc_reset(self, name: str) -> dict[str, Any]:
        async with self.lock(f"vc/{name}"):
            vc = self.vc(name)
            self._require_stopped(vc)
            p = self.storage.pool(vc.pool)
            for v in self.vc_vms(name):
                p.reset(parse_ref(v.disk).volume)
        return self.vc_info(name)

    async def vc_update(self, name: str, template: str) -> dict[str, Any]:
        """Rebase every node disk onto TEMPLATE@SNAP (or POOL/VOL@SNAP)."""
        async with self.lock(f"vc/{name}"):
            vc = self.vc(name)
            self._require_stopped(vc)
            tname, _, snapname = template.partition("@")
            if not snapname:
                raise InvalidArgument(f"bad --template {template!r}: expected TEMPLATE@SNAPSHOT")
            if "/" in tname:
                target = parse_ref(template, snapshot=True)
            else:
                t = self.template(tname)
                target = parse_ref(f"{t.volume}@{snapname}", snapshot=True)
            p = self.storage.pool(vc.pool)
            p.snapshot(target.volume, target.snapshot or "")  # exists?
            for v in self.vc_vms(name):
                p.rebase(parse_ref(v.disk).volume, target.volume, target.snapshot or "")
            vc.snapshot = str(target)
            self._put_vc(vc)
        return self.vc_info(name)

    def _require_stopped(self, vc: VCRecord) -> None:
        busy = [v.name for v in self.vc_vms(vc.name) if v.state not in ("stopped", "defined", "failed")]
        if busy:
            raise InvalidArgument(f"VC {vc.name} has node(s) not stopped ({', '.join(busy)}): stop it first")

    def vc_list(self) -> list[dict[str, Any]]:
        out = []
        for vc in self.vcs():
            vms = self.vc_vms(vc.name)
            out.append({
                "name": vc.name, "template": vc.template, "nodes": vc.nodes, "state": _vc_state(vms),
                "running": sum(v.state == "running" for v in vms), "subnet": vc.subnet,
                "hosts": sorted({v.host for v in vms}), "strategy": vc.strategy, "mode": vc.mode,
                "egress": vc.egress,
            })
        return out

    def vc_info(self, name: str) -> dict[str, Any]:
        vc = self.vc(name)
        vms = self.vc_vms(name)
        p = self.storage.pool(vc.pool)
        nodes = []
        unique = shared = 0
        for v in vms:
            vol = parse_ref(v.disk).volume
            info = p.volume_info(vol) if vol in p.volumes_by_name else {"unique": 0, "shared": 0}
            unique += info["unique"]
            shared = max(shared, info["shared"])
            nodes.append({
                "name": v.name, "index": v.index, "host": v.host, "state": v.state, "address": v.address,
                "accel": v.accel, "disk": v.disk, "disk_unique": info["unique"], "disk_shared": info["shared"],
                "error": v.error,
            })
        tsnap = parse_ref(vc.snapshot)
        tsize = p.volume_info(tsnap.volume)["allocated"] if tsnap.volume in p.volumes_by_name else 0
        return {
            **vc.model_dump(), "state": _vc_state(vms), "nodes": nodes, "node_count": vc.nodes,
            "disk_unique_total": unique, "template_allocated": tsize,
            "full_copies_would_use": tsize * len(vms) + unique,
        }

    def net_list(self) -> list[dict[str, Any]]:
        out = []
        for vc in self.vcs():
            vms = self.vc_vms(vc.name)
            out.append({
                "vc": vc.name, "subnet": vc.subnet, "gateway": str(netplan.gateway_address(IPv4Network(vc.subnet))),
                "nodes": len(vms), "addresses": [v.address for v in vms], "hosts": sorted({v.host for v in vms}),
                "egress": vc.egress,
            })
        return out

    def vm_console(self, key: str) -> Any:
        return self.vm_record(key)

    async def vm_console_text(self, key: str, offset: int = 0) -> dict[str, Any]:
        vm = self.vm_console(key)
        return await self._agent(self.host(vm.host), "POST", "/v1/vm/console", json={"id": key, "offset": offset})

    async def vm_exec(self, ref: str, script: str, timeout: float = 30.0) -> dict[str, Any]:
        vm = self.vm_console(ref)
        if vm.state != "running":
            raise InvalidArgument(f"VM {ref} is {vm.state}, not running")
        return await self._agent(self.host(vm.host), "POST", "/v1/vm/exec",
                                 json={"id": ref, "script": script, "timeout": timeout})

    # ================================================================== agents

    def _http_for(self, host: str) -> httpx.AsyncClient:
        client = self._agent_http.get(host)
        if client is None:
            verify: Any = True
            if self.authority is not None:
                verify = self.authority.manager.client_context(PeerRule("host", host))
            client = self._agent_http[host] = httpx.AsyncClient(timeout=AGENT_TIMEOUT, verify=verify)
        return client

    async def _agent(self, h: HostRecord, method: str, path: str, json: Any = None) -> dict[str, Any]:
        try:
            r = await self._http_for(h.name).request(method, f"{self._scheme}://{h.address}{path}", json=json)
        except httpx.HTTPError as e:
            raise Unavailable(f"host {h.name} ({h.address}) is not answering: {type(e).__name__} {e}") from e
        try:
            body = r.json()
        except ValueError:
            body = {"error": "VirtuaError", "message": r.text[:500]}
        if r.status_code >= 400:
            from virtua.errors import from_dict

            err = from_dict(body if isinstance(body, dict) else {"message": str(body)})
            err.message = f"host {h.name}: {err.message}"
            raise err
        return body if isinstance(body, dict) else {"result": body}

    async def _watch_hosts(self) -> None:
        """Mark silent hosts offline and restart their VMs elsewhere."""
        said = ""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._check_hosts()
            except Unavailable as e:  # the store (etcd) is away: one line, and keep watching
                # heartbeats could not be recorded meanwhile: no host is silent for that
                self._liveness_grace_from = time.monotonic()
                if e.message != said:
                    log.warning("host watch: %s", e.message)
                said = e.message
                continue
            except Exception:  # keep watching
                log.exception("host watch failed")
            said = ""

    def _route_vms_here(self) -> None:
        """The manager's host is on the hosts' network too: route each VM via its host, so
        VMs reach this host and it reaches them (only with --host-network given)."""
        from virtua.net.hostnet import sync_routes

        routes = self.network_for("")["routes"]
        mine = {IPv4Network(n) for n in self._own_networks}
        want = {r["dst"]: r["via"] for r in routes if any(IPv4Network(r["via"] + "/32").subnet_of(n) for n in mine)}
        if want != self._routes:
            self._routes = sync_routes(self._routes, want)

    async def _check_hosts(self) -> None:
        if self._own_networks:
            try:
                await asyncio.to_thread(self._route_vms_here)
            except VirtuaError as e:
                log.warning("routes to VMs on this host: %s", e.message)
            except ValueError as e:  # a bad record must not stop the liveness check below
                log.error("routes to VMs on this host: %s", e)
        for h in self.hosts():
            # a lease that ran out while the store was down is not a dead host (its beats
            # could not be recorded): a lease's worth of grace after the store comes back
            if h.state == "offline" or self._leased(h) or time.monotonic() - self._liveness_grace_from < self.lease_ttl:
                continue
            h.state = "offline"
            self._put_host(h)
            lost = [v for v in self.vms() if v.host == h.name and v.state in ("running", "starting")]
            log.warning("host %s is offline: its lease (%g s) ran out, silent since %s; %d VM(s) lost", h.name,
                        self.lease_ttl, time.strftime("%H:%M:%S", time.localtime(h.last_seen)), len(lost))
            for vc_name in sorted({v.vc for v in lost}):
                await self._restart_elsewhere(vc_name, h.name)

    async def _restart_elsewhere(self, vc_name: str, dead: str) -> None:
        async with self.lock(f"vc/{vc_name}"):
            vc = self.vc(vc_name)
            vms = self.vc_vms(vc_name)
            lost = [v for v in vms if v.host == dead and v.state in ("running", "starting")]
            for v in lost:
                v.state = "failed"
                v.error = f"host {dead} went offline"
                self._put_vm(v)
            if not self.restart_dead:
                return
            try:
                requests = [VMRequest(name=v.name, cpus=vc.cpus, memory_mb=vc.memory_mb) for v in vms]
                plan = restart_plan(
                    dead, requests, self._capacities(), {v.name: v.host for v in vms},
                    load=self._load(vc_name), strategy=vc.strategy, mode=vc.mode, template=vc.template,
                )
            except VirtuaError as e:
                log.error("cannot restart VMs of %s lost with %s: %s", vc_name, dead, e.message)
                return
            for v in lost:
                v.host = plan.mapping[v.name]
                self._put_vm(v)
                log.info("restarting %s on %s", v.key, v.host)
                try:
                    await self._start_vm(vc, v)
                except VirtuaError as e:
                    log.error("restart of %s on %s failed: %s", v.key, v.host, e.message)

    def vm_record(self, key: str) -> VMRecord:
        """The VM named VC/NODE in a request; both names are checked before any lookup, as
        they name paths on the hosts (saved states, run directories)."""
        vc, sep, node = key.partition("/")
        if not sep:
            raise InvalidArgument(f"bad VM {key!r}: expected VC/NODE, e.g. web/web-1")
        check_name(vc, "VC name")
        check_name(node, "node name")
        vm = self._vm_or_none(key)
        if vm is None:
            raise NotFound(f"VM {key} does not exist (VC/NODE, e.g. web/web-1)")
        return vm

    def save_state_upload(self, key: str) -> Path:
        """Where the one upload the manager asked for goes: a saved state is a QEMU
        migration stream that another host will load, so a host may send one only while
        the manager is suspending that VM, and once."""
        vm = self.vm_record(key)
        if key not in self._state_uploads:
            raise PermissionDenied(f"no saved state of {key} was asked for: it is sent only while suspending it")
        self._state_uploads.discard(key)
        path = self._state_path(vm)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def state_file(self, key: str) -> Path:
        vm = self.vm_record(key)
        path = self._state_path(vm)
        if not path.exists():
            raise NotFound(f"VM {key} has no saved state")
        return path


_R = TypeVar("_R", bound=BaseModel)


def _records(model: type[_R], rows: Iterable[tuple[str, Any]]) -> list[_R]:
    """The records that parse; one that does not (written by an older version, or damaged)
    is logged and left out rather than failing every listing and every heartbeat."""
    out = []
    for key, value in rows:
        try:
            out.append(model(**value))
        except (ValidationError, TypeError) as e:
            log.error("record %s is not a valid %s, left out: %s", key, model.__name__, str(e).splitlines()[0])
    return out


def _started(reply: dict[str, Any], vm: VMRecord, accel: str | None) -> tuple[Any, str | None]:
    """The state and accelerator an agent's start or resume reply gives, checked: a host's
    answer goes into the records every node reads, so anything else is the host's error."""
    state = reply.get("state", "running")
    if state not in ("running", "starting"):
        raise Unavailable(f"{vm.key}: host {vm.host} answered the start with state {str(state)[:40]!r}")
    got = reply.get("accel", accel)
    return state, got if got in ("kvm", "tcg") else accel


def _usable(address: str) -> bool:
    try:
        return canonical_address(address) == address
    except ValueError:
        return False


def _exports_of(vm: VMRecord) -> list[str]:
    return [e for e in (vm.disk, vm.swap, vm.seed) if e]


def _vc_state(vms: list[VMRecord]) -> str:
    states = {v.state for v in vms}
    if len(states) == 1:
        return states.pop()
    if "failed" in states:
        return "degraded"
    if "starting" in states:
        return "starting"
    return "mixed"


def _parse_ttl(ttl: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = str(ttl).strip()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise InvalidArgument(f"bad --ttl {ttl!r}: e.g. 30m, 1h, 2d") from None


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["Manager", "Busy"]


@undo_kind("template.forget")
def _undo_template_record(ctx: Context, name: str) -> None:
    """A template whose build was interrupted after its record was written."""
    if ctx.manager is None:
        raise NeedsManager()
    ctx.manager._forget_template(name)


@undo_kind("vc.forget")
def _undo_vc_record(ctx: Context, name: str) -> None:
    """A VC whose creation was interrupted: its records go (its volumes are undone by
    the steps before)."""
    if ctx.manager is None:
        raise NeedsManager()
    doc = ctx.manager.store.get(f"/vcs/{name}")
    if doc is None:
        return
    created = doc.get("created")  # set before the job began: only the end of the step bounds it
    if ctx.until is not None and isinstance(created, int | float) and created > ctx.until:
        return  # a VC of the same name made since the crash: not the job's
    ctx.manager._forget_vc(name)


def _serving() -> bool:
    """Whether this runs on serve's event loop (a long operation then returns an awaitable)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
