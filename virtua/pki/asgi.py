"""The TLS peer of an HTTP request, for the ASGI apps of the manager and the agents.

uvicorn passes neither the transport kind nor the client certificate on to the app;
PeerAwareH11 (uvicorn's h11 protocol, one hook added) puts both into every request's
scope["state"].
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import socket
import ssl
from collections.abc import Callable
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


HANDSHAKE_TIMEOUT = 10
_REASONS = {  # OpenSSL's names for the common refusals, in words
    "HTTP_REQUEST": "plaintext HTTP on the TLS port",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate",
    "WRONG_VERSION_NUMBER": "not TLS",
}
tls_log = logging.getLogger("virtua.tls")


def tls_gate(context: Callable[[], ssl.SSLContext], name: str) -> type[PeerAwareH11]:
    """An HTTP protocol that does its own TLS handshake (uvicorn then runs without ssl):
    every refused handshake -- no certificate where one is required, a foreign CA, an
    expired or revoked certificate -- becomes one log line with the peer and the reason
    (asyncio drops those silently), and context() is asked afresh for every connection,
    so a new CRL applies at once."""

    class TLSGate(PeerAwareH11):
        _tls_up = False
        _early = b""  # request bytes decrypted before start_tls() returned

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            # The TLS layer must own the transport before this call returns: the event
            # loop starts reading right after it (loop.start_tls() would come too late
            # and the ClientHello would reach h11).
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            tls = asyncio.sslproto.SSLProtocol(
                loop, self, context(), waiter, server_side=True, call_connection_made=False,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
            transport.set_protocol(tls)
            tls.connection_made(transport)
            loop.create_task(self._handshake(transport, tls, waiter))

        async def _handshake(self, transport: Any, tls: Any, waiter: asyncio.Future[None]) -> None:
            peer = transport.get_extra_info("peername")
            where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
            try:
                await waiter
                if transport.is_closing():  # aborted under the handshake (the edge's limits)
                    raise ConnectionAbortedError("dropped before its TLS handshake finished")
            except (ssl.SSLError, OSError, TimeoutError) as e:
                reason = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
                reason = _REASONS.get(reason, reason)
                tls_log.warning("%s: refused TLS from %s: %s", name, where, reason)
                transport.abort()
                self.connection_lost(None)  # a guarded() subclass releases its admission here
                return
            self._tls_up = True
            super().connection_made(tls._get_app_transport())
            if self._early:
                early, self._early = self._early, b""
                super().data_received(early)

        def data_received(self, data: bytes) -> None:
            if self._tls_up:
                super().data_received(data)
            else:
                self._early += data

        def connection_lost(self, exc: Exception | None) -> None:
            if self._tls_up:
                super().connection_lost(exc)

    return TLSGate


def guarded(base: type[H11Protocol], admission: Any) -> type[H11Protocol]:
    """`base` (PeerAwareH11 or a tls_gate()) behind the edge's connection limits: the
    admission counts the TCP connection before any TLS handshake starts."""
    from virtua.edge.guard import GuardedH11Protocol

    return type(f"Guarded{base.__name__}", (GuardedH11Protocol, base), {"admission": admission})
