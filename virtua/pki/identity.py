"""Who is on the other end of a TLS connection: a role and a name from its certificate.

The cluster CA writes the role into the subject's OU and the name into its CN.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
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


def certificate_addresses(cert: dict[str, Any] | None) -> list[str]:
    """The IP addresses in a verified peer certificate's subjectAltName."""
    if not cert:
        return []
    out = []
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "IP Address":
            try:
                out.append(str(ip_address(str(value).strip())))  # ssl spells IPv6 long-hand
            except ValueError:
                continue
    return out
