"""The TLS peer of an HTTP request, for the ASGI apps of the manager and the agents.

uvicorn passes neither the transport kind nor the client certificate on to the app;
PeerAwareH11 (uvicorn's h11 protocol, one hook added) puts both into every request's
scope["state"].
"""

from __future__ import annotations

import socket
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from virtua.pki.identity import Identity, identity_from_peercert


class PeerAwareH11(H11Protocol):
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        local = sock is not None and sock.family == socket.AF_UNIX
        cert = transport.get_extra_info("peercert") if transport.get_extra_info("ssl_object") else None
        self.app_state = {**self.app_state, "virtua_local": local, "virtua_peercert": cert}


def is_local(scope: dict[str, Any]) -> bool:
    return bool((scope.get("state") or {}).get("virtua_local"))


def peer_identity(scope: dict[str, Any]) -> Identity | None:
    return identity_from_peercert((scope.get("state") or {}).get("virtua_peercert"))


def peer_address(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unix"
