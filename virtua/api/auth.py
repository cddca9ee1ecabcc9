"""Who may call which endpoint of the manager's API.

Callers: the unix socket (root on this machine, an administrator), a client certificate
of the cluster CA (its role and name, virtua.pki.identity), or nobody (TCP without a
certificate: only the join endpoint answers). Each endpoint class has one small
authorization function; `AuthMiddleware` classifies the request, applies it, logs every
refusal (one line: peer, reason) and answers 401/403 before any handler runs.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtua.errors import Forbidden, Unauthenticated, VirtuaError
from virtua.pki.asgi import is_local, peer_address, peer_identity
from virtua.pki.identity import Identity

log = logging.getLogger("virtua.auth")


@dataclass(frozen=True)
class Caller:
    peer: str  # address:port, or "unix"
    local: bool = False  # the unix socket
    identity: Identity | None = None
    admin_token: bool = False  # presented the admin bearer token (over TLS)

    @property
    def admin(self) -> bool:
        return self.local or self.admin_token or (self.identity is not None and self.identity.role == "admin")

    def __str__(self) -> str:
        if self.local:
            return "unix socket"
        if self.admin_token:
            return f"{self.peer} (admin token)"
        if self.identity is None:
            return f"{self.peer} (no certificate)"
        return f"{self.peer} ({self.identity.role} {self.identity.name}, serial {self.identity.serial:x})"


def caller_of(scope: dict[str, Any], admin_token: Callable[[str], bool] | None = None) -> Caller:
    """Who sent this request. A bearer token (Authorization: Bearer ...) counts only when it
    is the admin token; a wrong one is an authentication failure, never anonymous access."""
    if is_local(scope):
        return Caller(peer="unix", local=True)
    peer = peer_address(scope)
    presented = [value for key, value in scope.get("headers", ()) if key == b"authorization"]
    if len(presented) > 1:  # which one counts would depend on who reads the headers
        raise Unauthenticated(f"{peer}: {len(presented)} Authorization headers: send one")
    if presented:
        scheme, _, token = presented[0].decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or admin_token is None or not admin_token(token.strip()):
            raise Unauthenticated(f"{peer}: the bearer token is not the admin token")
        return Caller(peer=peer, admin_token=True)
    return Caller(peer=peer, identity=peer_identity(scope))


# ---------------------------------------------------------------------- endpoint classes


def may_join(caller: Caller) -> None:
    """Anyone: the join token in the body is the credential."""


def may_administer(caller: Caller) -> None:
    """Admin operations (every operation's route, virtua.api.routes; /v1/status; anything
    unclassified)."""
    if caller.admin:
        return
    _need_identity(caller)
    raise Forbidden(f"{caller}: admin operations need the admin certificate or the unix socket")


def may_act_as_host(caller: Caller, host: str) -> None:
    """Register or heartbeat as `host`: that host's own certificate, or an admin."""
    if caller.admin:
        return
    ident = _need_identity(caller)
    if ident.role != "host" or ident.name != host:
        raise Forbidden(f"{caller}: may not act as host {host!r}")


def may_use_host_resource(caller: Caller, owners: set[str], what: str) -> None:
    """A VM's boot files or saved state: the hosts its VMs are placed on, or an admin."""
    if caller.admin:
        return
    ident = _need_identity(caller)
    if ident.role != "host" or ident.name not in owners:
        raise Forbidden(f"{caller}: {what} belongs to no VM of host {ident.name}")


def _need_identity(caller: Caller) -> Identity:
    if caller.identity is None:
        raise Unauthenticated(f"{caller}: a client certificate of the cluster CA is required")
    return caller.identity


# ---------------------------------------------------------------------- the middleware

_HOST_PATH = re.compile(r"/v1/hosts/([^/]+)/heartbeat")
_TEMPLATE_PATH = re.compile(r"/v1/templates/([^/]+)/([^/]+)")
_STATE_PATH = re.compile(r"/v1/vmstate/([^/]+)/([^/]+)")

OwnersOf = Callable[[str, str], set[str]]  # (kind "template"|"vmstate", key) -> host names


def authorize(method: str, path: str, caller: Caller, owners_of: OwnersOf) -> None:
    """Raise Unauthenticated/Forbidden unless caller may send this request.
    Registration is checked again in its handler, which knows the name in the body."""
    if path in ("/v1/join", "/v1/join/ca"):
        return may_join(caller)
    # method and path both: GET/DELETE /v1/hosts/{host} are admin operations on a host
    # that may well be called "register" (virtua.api.routes)
    if path == "/v1/hosts/register" and method == "POST":
        if caller.admin:
            return None
        _need_identity(caller)
        return None
    if (m := _HOST_PATH.fullmatch(path)) and method == "POST":
        return may_act_as_host(caller, m.group(1))
    if (m := _TEMPLATE_PATH.fullmatch(path)) and method == "GET":
        return may_use_host_resource(caller, owners_of("template", m.group(1)), f"template {m.group(1)}")
    if (m := _STATE_PATH.fullmatch(path)) and method in ("GET", "PUT"):
        key = f"{m.group(1)}/{m.group(2)}"
        return may_use_host_resource(caller, owners_of("vmstate", key), f"the saved state of {key}")
    return may_administer(caller)


class AuthMiddleware:
    def __init__(
        self, app: Any, *, revoked: Callable[[int], bool], owners_of: OwnersOf,
        admin_token: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.revoked = revoked
        self.owners_of = owners_of
        self.admin_token = admin_token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            caller = caller_of(scope, self.admin_token)
            if caller.identity is not None and self.revoked(caller.identity.serial):
                raise Forbidden(f"{caller}: this certificate is revoked")
            authorize(scope["method"], scope["path"], caller, self.owners_of)
        except VirtuaError as e:
            log.warning("refused %s %s from %s", scope["method"], scope["path"], e.message)
            body = json.dumps(e.to_dict()).encode()
            await send({"type": "http.response.start", "status": e.http_status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return None
        scope.setdefault("state", {})["virtua_caller"] = caller  # for the register handler
        return await self.app(scope, receive, send)
