"""A host's side of the routed VC networks (VirtuaLinux 4.1: routed, not bridged).

Each VM gets a tap; the host answers on the VC's gateway address (.1) on every tap and
proxies ARP, so a guest reaches its on-link peers through its own host; a /32 route
leads to each local VM, and a /32 route via the owning host's address to each remote
one. There is no master gateway: every host routes for the VMs it runs.

Isolation lives in one nftables table per host (`inet virtua`), rebuilt atomically from
the desired state whenever it changes:
- a packet from a VM's tap must carry that VM's address, and be IPv4 (no spoofing),
- a VM may reach its own VC's subnet, never another VC's subnet,
- a VM reaches nothing of the hosts': no address of this host (input hook; only a ping
  to its own gateway), no address of another host, of the manager or of the hosts'
  networks (forward hook); only replies to connections a host opened pass,
- beyond its VC, a VM reaches what its VC's egress mode allows: `none` nothing,
  `nat` other networks masqueraded behind this host's address, `routed` other networks
  with its own address (the outside routes the VC's subnet back to the hosts),
- a VM may be reached from its own VC and from the hosts, never from another VC; from
  other networks only in `routed` mode (and replies to its own connections in `nat`).
Everything virtua adds carries a marker (tap prefix `vt`, route protocol 187, the table
name), so leftovers can be listed and removed.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from virtua.errors import InvalidArgument, Unavailable, VirtuaError

TAP_PREFIX = "vt"
ROUTE_PROTO = "187"
TABLE = "virtua"



log = logging.getLogger("virtua.net")

def ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def nft(script: str, check: bool = True) -> str:
    r = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise Unavailable(f"nft: {r.stderr.strip()}\n{script}")
    return r.stdout


def host_side_mac(guest_mac: str) -> str:
    """The tap's own MAC: the guest's with the first byte 0x06 (local, unicast, distinct)."""
    return "06" + guest_mac[2:]


def sync_routes(current: dict[str, str], want: dict[str, str]) -> dict[str, str]:
    """Make virtua's /32 routes via other hosts match `want` (dst -> via); returns it."""
    for dst in set(current) - set(want):
        # only the route via the old host: the VM may have moved here and own a tap route
        ip("route", "del", dst, "via", current[dst], "proto", ROUTE_PROTO, check=False)
    done: dict[str, str] = {}
    for dst, via in want.items():
        if current.get(dst) != via:
            try:
                ip("route", "replace", dst, "via", via, "proto", ROUTE_PROTO)
            except VirtuaError as e:  # one bad route must not keep the others (or the filter) away
                log.error("route to %s via %s: %s", dst, via, e.message)
                continue
        done[dst] = via
    return done


EGRESS_MODES = ("none", "nat", "routed")
NOT_A_REPLY = "ct state != { established, related }"  # a packet that opens something


@dataclass(frozen=True)
class LocalVM:
    tap: str
    address: str
    subnet: str
    vc: str
    gateway: str
    egress: str = "none"


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


def render_ruleset(local: Iterable[LocalVM], vc_subnets: Iterable[str], host_networks: Iterable[str] = ()) -> str:
    """The whole `inet virtua` table for these local VMs (pure: tested without a kernel).

    ``host_networks`` are the networks and addresses of every host and of the manager
    (CIDR); a VM reaches none of them, in any egress mode.
    """
    local = sorted(local, key=lambda v: v.tap)
    subnets = sorted(set(vc_subnets) | {v.subnet for v in local})
    hosts = sorted(set(host_networks))
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}"]
    if not local:
        return "\n".join(lines) + "\n"
    for v in local:
        if v.egress not in EGRESS_MODES:
            raise InvalidArgument(f"bad egress {v.egress!r} for {v.tap}: use {', '.join(EGRESS_MODES)}")
    all_vcs = _set(subnets)
    lines.append(f"table inet {TABLE} {{")
    lines.append("  chain forward {")
    lines.append("    type filter hook forward priority 0; policy accept;")
    # Drops only, no accepts: the verdict cannot depend on the order of the VMs' rules.
    for v in local:
        lines.append(f'    iifname "{v.tap}" ip saddr != {v.address} counter drop comment "spoofed source"')
        lines.append(f'    iifname "{v.tap}" meta protocol != ip counter drop comment "IPv4 only"')
    for v in local:
        tap = f'iifname "{v.tap}"'
        lines.append(f'    {tap} ip daddr != {v.subnet} ip daddr {all_vcs} counter drop comment "to other VC"')
        lines.append(f'    oifname "{v.tap}" ip saddr != {v.subnet} ip saddr {all_vcs} counter drop comment "from other VC"')
        if hosts:
            lines.append(f'    {tap} ip daddr {_set(hosts)} {NOT_A_REPLY} counter drop comment "to the hosts"')
        if v.egress == "none":
            lines.append(f'    {tap} ip daddr != {v.subnet} {NOT_A_REPLY} counter drop comment "egress none"')
        if v.egress != "routed":
            # only its VC and the hosts open connections to it; other networks only answer
            sources = _set([v.subnet, *hosts])
            lines.append(f'    oifname "{v.tap}" ip saddr != {sources} {NOT_A_REPLY} counter drop comment "from other networks"')
    lines.append("  }")
    lines.append("  chain input {")
    lines.append("    type filter hook input priority 0; policy accept;")
    for v in local:
        tap = f'iifname "{v.tap}"'
        lines.append(f'    {tap} ip saddr != {v.address} counter drop comment "spoofed source"')
        lines.append(f'    {tap} meta protocol != ip counter drop comment "IPv4 only"')
        # this host's every address and port is closed to its guests; a ping to the
        # gateway is all they may start (ARP is not IP: the inet family never sees it)
        lines.append(f'    {tap} {NOT_A_REPLY} ip daddr != {v.gateway} counter drop comment "to this host"')
        lines.append(f'    {tap} {NOT_A_REPLY} meta l4proto != icmp counter drop comment "to this host"')
        lines.append(f'    {tap} {NOT_A_REPLY} icmp type != echo-request counter drop comment "to this host"')
    lines.append("  }")
    nat = [v.address for v in local if v.egress == "nat"]
    if nat:
        lines.append("  chain postrouting {")
        lines.append("    type nat hook postrouting priority srcnat; policy accept;")
        lines.append(f'    ip saddr {_set(nat)} ip daddr != {all_vcs} oifname != "{TAP_PREFIX}*" masquerade comment "egress nat"')
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def local_vm(nic: Any) -> LocalVM:
    """The filter's view of a VM's NIC (a virtua.cluster.model.NicLaunch)."""
    return LocalVM(nic.tap, nic.address, nic.subnet, nic.vc, nic.gateway, nic.egress)


class HostNetwork:
    def __init__(self, host: str, host_networks: Iterable[str] = ()) -> None:
        self.host = host
        self.local: dict[str, LocalVM] = {}
        self.vc_subnets: set[str] = set()
        # known before the first word from the manager, so guests adopted after an agent
        # restart never get a moment with the hosts' networks open
        self.own_host_networks = set(host_networks)
        self.host_networks = set(self.own_host_networks)
        self.remote_routes: dict[str, str] = {}  # VM /32 -> via host address
        self._applied_rules: str | None = None
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")

    # ------------------------------------------------------------------ taps

    def plug(self, nic: Any) -> None:
        """Create the VM's tap before QEMU attaches to it, with the gateway and the route."""
        ip("link", "del", nic.tap, check=False)
        ip("tuntap", "add", "dev", nic.tap, "mode", "tap")
        # The same host-side MAC on every host: a guest that moves keeps valid ARP entries
        # (every address it reaches resolves, by proxy ARP, to this MAC).
        ip("link", "set", "dev", nic.tap, "address", host_side_mac(nic.mac))
        ip("addr", "add", f"{nic.gateway}/32", "dev", nic.tap)
        with open(f"/proc/sys/net/ipv4/conf/{nic.tap}/proxy_arp", "w") as f:
            f.write("1\n")
        ip("link", "set", nic.tap, "up")
        ip("route", "replace", f"{nic.address}/32", "dev", nic.tap, "src", nic.gateway, "proto", ROUTE_PROTO)
        self.remote_routes.pop(f"{nic.address}/32", None)  # replaced by the tap route
        self.local[nic.tap] = local_vm(nic)
        self.apply_rules()

    def adopt(self, nic: Any) -> None:
        """Take over the tap of a VM that kept running while the agent restarted."""
        self.local[nic.tap] = local_vm(nic)
        self.apply_rules()

    def unplug(self, nic: Any) -> None:
        ip("link", "del", nic.tap, check=False)  # its addresses and routes go with it
        self.local.pop(nic.tap, None)
        self.apply_rules()

    # ------------------------------------------------------------------ desired state

    def apply_rules(self) -> None:
        script = render_ruleset(self.local.values(), self.vc_subnets, self.host_networks)
        if script != self._applied_rules:
            nft(script)
            self._applied_rules = script

    def sync(self, desired: dict[str, Any]) -> None:
        """Routes to remote VMs, the VC subnets and the hosts' networks, from the manager's
        heartbeat reply."""
        self.vc_subnets = set(desired.get("vc_subnets", []))
        self.host_networks = self.own_host_networks | set(desired.get("host_networks", []))
        want = {r["dst"]: r["via"] for r in desired.get("routes", []) if r["dst"] not in self._local_dsts()}
        self.remote_routes = sync_routes(self.remote_routes, want)
        self.apply_rules()

    def _local_dsts(self) -> set[str]:
        return {f"{v.address}/32" for v in self.local.values()}

    def clear(self) -> None:
        """Remove everything virtua added on this host."""
        for tap in list(self.local):
            ip("link", "del", tap, check=False)
        self.local.clear()
        for dst, via in self.remote_routes.items():
            ip("route", "del", dst, "via", via, "proto", ROUTE_PROTO, check=False)
        self.remote_routes = {}
        nft(render_ruleset([], []), check=False)
        self._applied_rules = None

    def leftovers(self) -> dict[str, Any]:
        links = json.loads(ip("-j", "link", "show") or "[]")
        taps = [link["ifname"] for link in links if link["ifname"].startswith(TAP_PREFIX)
                and link.get("link_type") == "ether" and "master" not in link
                and self._is_tap(link["ifname"])]
        routes = json.loads(ip("-j", "route", "show", "proto", ROUTE_PROTO) or "[]")
        r = subprocess.run(["nft", "-j", "list", "table", "inet", TABLE], capture_output=True, text=True)
        rules: list[str] = []
        if r.returncode == 0:
            for item in json.loads(r.stdout).get("nftables", []):
                if "rule" in item:
                    rules.append(item["rule"].get("comment", "") or json.dumps(item["rule"].get("expr", ""))[:80])
        return {"taps": taps, "routes": [x.get("dst") for x in routes], "rules": rules}

    @staticmethod
    def _is_tap(ifname: str) -> bool:
        try:
            with open(f"/sys/class/net/{ifname}/tun_flags"):
                return True
        except OSError:
            return False
