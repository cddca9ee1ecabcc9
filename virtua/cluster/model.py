"""Records of the cluster state (stored as JSON under /hosts, /templates, /vcs, /vms)
and the messages between manager and agents."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

VMState = Literal["defined", "starting", "running", "stopped", "suspended", "failed"]
HostState = Literal["online", "offline", "draining"]
# What a VC's guests reach beyond their own VC (never the hosts'): nothing, other
# networks behind their host's address, or other networks with their own addresses.
Egress = Literal["none", "nat", "routed"]


class HostRecord(BaseModel):
    name: str
    address: str  # where the agent listens, host:port
    cores: int
    memory_mb: int
    reserved_memory_mb: int = 256
    templates: list[str] | None = None  # None: any template
    state: HostState = "online"
    draining: bool = False
    registered: float = 0.0
    last_seen: float = 0.0
    accel: str = "unknown"
    networks: list[str] = Field(default_factory=list)  # the hosts' networks (CIDR)

    @property
    def url(self) -> str:
        return f"http://{self.address}"


class TemplateRecord(BaseModel):
    name: str
    volume: str  # POOL/VOLUME
    snapshot: str  # POOL/VOLUME@SNAP: what VCs clone
    kernel: str | None = None  # path on the manager (served to agents)
    initrd: str | None = None
    kernel_digest: str | None = None
    initrd_digest: str | None = None
    cmdline: str = ""
    created: float = 0.0
    description: str = ""


class VCRecord(BaseModel):
    name: str
    template: str
    snapshot: str
    nodes: int
    cpus: int
    memory_mb: int
    disk: int
    swap: int
    strategy: str
    mode: str
    subnet: str
    pool: str
    egress: Egress = "none"  # records from before egress existed: the strictest mode
    state: str = "stopped"
    created: float = 0.0


class VMRecord(BaseModel):
    vc: str
    name: str  # node name, also the guest's hostname: VC-INDEX
    index: int
    host: str
    state: VMState = "defined"
    address: str
    mac: str
    tap: str
    disk: str  # POOL/VOL exports
    swap: str
    seed: str
    accel: str | None = None
    error: str | None = None
    suspended_state: str | None = None  # path on the manager of the saved memory state

    @property
    def key(self) -> str:
        return f"{self.vc}/{self.name}"


class NicLaunch(BaseModel):
    tap: str
    mac: str
    address: str  # the VM's address
    gateway: str  # the host side of the tap
    subnet: str
    vc: str
    egress: Egress = "none"


class VMLaunch(BaseModel):
    """What an agent needs to run one VM; everything it fetches comes from the manager."""

    id: str  # VC/NODE
    hostname: str
    cpus: int
    memory_mb: int
    kernel_url: str
    initrd_url: str | None = None
    kernel_digest: str
    initrd_digest: str | None = None
    cmdline: str
    disks: list[str]  # NBD URIs: root, swap, seed
    nic: NicLaunch | None = None
    state_url: str | None = None  # resume from this saved state
