"""Who is on the other end of a TLS connection: a role and a name from its certificate.

The cluster CA writes the role into the subject's OU and the name into its CN.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Any, Literal

Role = Literal["admin", "manager", "host"]
ROLES: tuple[Role, ...] = ("admin", "manager", "host")
ADMIN_NAME = "admin"
MANAGER_NAME = "virtua-manager"
RESERVED_NAMES = frozenset({ADMIN_NAME, MANAGER_NAME})


@dataclass(frozen=True)
class Identity:
    role: Role
    name: str
    serial: int


def identity_from_peercert(cert: dict[str, Any] | None) -> Identity | None:
    """The identity in a verified peer certificate (ssl.SSLObject.getpeercert()), or None
    when there is none or it carries no virtua role."""
    if not cert:
        return None
    fields: dict[str, str] = {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            fields[key] = str(value)
    role, name = fields.get("organizationalUnitName"), fields.get("commonName")
    if role not in ROLES or not name:
        return None
    try:
        serial = int(str(cert.get("serialNumber", "")), 16)
    except ValueError:
        return None
    return Identity(role, name, serial)  # type: ignore[arg-type]


def canonical_ip(text: str) -> IPv4Address | IPv6Address:
    """An IP address in one spelling: an IPv4-mapped IPv6 address is its IPv4 address
    (::ffff:10.0.0.5 is 10.0.0.5), so no comparison sees two addresses in one."""
    if "%" in text or text != text.strip():  # zone ids and padding are other spellings
        raise ValueError(f"{text!r} is not an IP address")
    ip = ip_address(text)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def canonical_address(text: str) -> str:
    """HOST:PORT with HOST an IP address, in its one spelling ("10.0.0.5:8781",
    "[fd00::5]:8781"); ValueError for anything else (names, padding, zones, bad ports)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536 or port != str(int(port)):
        raise ValueError(f"bad address {text[:80]!r}: expected IP:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"bad address {text[:80]!r}: an IPv6 address goes in brackets, [ADDR]:PORT")
    ip = canonical_ip(host)
    return f"[{ip}]:{int(port)}" if isinstance(ip, IPv6Address) else f"{ip}:{int(port)}"


def certificate_addresses(cert: dict[str, Any] | None) -> list[str]:
    """The IP addresses in a verified peer certificate's subjectAltName."""
    if not cert:
        return []
    out = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "IP Address":
            try:
                out.append(str(canonical_ip(str(value).strip())))  # ssl spells IPv6 long-hand
            except ValueError:
                continue
    return out
