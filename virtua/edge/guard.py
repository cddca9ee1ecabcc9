"""The admin API's connection limits: uvicorn's HTTP/1.1 protocol behind an Admission.

uvicorn alone keeps a connection that never sends a request open forever (its keep-alive
timer starts only after a first response, and any byte received stops it), and has no
limit per source. This protocol counts every connection against the same kind of
limits as the NBD server (virtua.edge.limits): a connection is "in its handshake" until
its first request's headers are complete, and every wait for a request's headers -- the
first one and each one between keep-alive requests -- is bounded by the handshake
timeout, however slowly the bytes drip in.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from virtua.edge.limits import Admission, source_of

# uvicorn's default cap on a request's headers (h11 max_incomplete_event_size)
MAX_HEADER_BYTES = 16 * 1024


class GuardedH11Protocol(H11Protocol):
    admission: Admission  # set on the subclass that guarded_protocol() makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._admitted = False
        self._wait_timer: asyncio.TimerHandle | None = None
        self._raw: asyncio.BaseTransport | None = None  # the TCP transport, before any TLS is up

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if not self.admission.admit(self, source_of(transport)):
            self.transport = transport  # connection_lost() closes it
            transport.abort()
            return
        self._admitted = True
        self._raw = transport
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._admitted:
            self.admission.release(self)
            self._admitted = False
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers are complete
            self._disarm()
            if self._admitted:
                self.admission.handshake_done(self)

    def on_response_complete(self) -> None:
        self._arm()  # before the base class starts a pipelined request (which disarms)
        super().on_response_complete()

    def drop(self) -> None:
        """The admission drops this unfinished handshake to make room for a newer one."""
        self._disarm()
        self._abort()

    def _abort(self) -> None:
        """Abort the connection, also while a TLS handshake (tls_gate) has it and the
        HTTP transport does not exist yet."""
        transport = self.transport if self.transport is not None else self._raw
        if transport is not None and not transport.is_closing():
            transport.abort()  # type: ignore[attr-defined]

    def _arm(self) -> None:
        self._disarm()
        self._wait_timer = self.loop.call_later(self.admission.limits.handshake_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._wait_timer is not None:
            self._wait_timer.cancel()
            self._wait_timer = None

    def _timed_out(self) -> None:
        self._wait_timer = None
        self._abort()


def guarded_protocol(admission: Admission) -> type[GuardedH11Protocol]:
    """uvicorn's `http` protocol class for listeners that share `admission`."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"admission": admission})


__all__ = ["MAX_HEADER_BYTES", "GuardedH11Protocol", "guarded_protocol"]
