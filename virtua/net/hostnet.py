"""A host's side of the routed VC networks: one tap per VM, a /32 route to it.

Routed, not bridged (VirtuaLinux 4.1): the host answers on the VC's gateway address
(.1) on every tap and routes the VM's /32 through it; there is no master gateway.
Commands are iproute2's `ip`, run in whatever network namespace the agent lives in.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from virtua.errors import Unavailable

TAP_PREFIX = "vt"


def ip(*args: str, check: bool = True) -> str:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise Unavailable(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


class HostNetwork:
    def __init__(self, host: str) -> None:
        self.host = host
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1\n")

    def plug(self, nic: Any) -> None:
        """Create the VM's tap before QEMU attaches to it, with the gateway and the route."""
        self.unplug(nic)
        ip("tuntap", "add", "dev", nic.tap, "mode", "tap")
        ip("addr", "add", f"{nic.gateway}/32", "dev", nic.tap)
        ip("link", "set", nic.tap, "up")
        ip("route", "replace", f"{nic.address}/32", "dev", nic.tap, "src", nic.gateway)

    def unplug(self, nic: Any) -> None:
        ip("link", "del", nic.tap, check=False)  # its addresses and routes go with it

    def leftovers(self) -> dict[str, Any]:
        links = json.loads(ip("-j", "link", "show") or "[]")
        taps = [link["ifname"] for link in links if link["ifname"].startswith(TAP_PREFIX)]
        routes = json.loads(ip("-j", "route", "show") or "[]")
        ours = [r for r in routes if str(r.get("dev", "")).startswith(TAP_PREFIX)]
        return {"taps": taps, "routes": [r.get("dst") for r in ours], "rules": []}
