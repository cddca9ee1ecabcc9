"""Who may open a connection: limits per source address and on unfinished handshakes.

Without them, anyone who can reach a listening port can hold every connection slot with
sockets that never finish the handshake, and lock every other client out until the
handshake timeout. `Admission` keeps four counts -- all connections and connections still
in their handshake, per source and in total -- and refuses a connection that would pass
any of the limits, so a flood from one source costs other sources nothing:

- a source's handshakes are capped small (a real client finishes in milliseconds);
- the handshakes of all sources together have their own budget, well below the limit of
  connections, so established clients never compete with half-open ones (a full budget
  drops its oldest member for a new connection rather than refusing it);
- a source's connections (established ones too) are capped.

A source is the peer's IPv4 address (IPv6: its /64) on TCP and the peer's process on a
unix socket (its pid from SO_PEERCRED): every local QEMU is its own source, a flooding
process is one. When the handshake budget is full, the oldest unfinished handshake
makes room for the new one (see Admission), so a flood from many sources does not lock
new clients out either.
A refused source is logged once (then at most once a minute, with the count of
refusals since), never once per connection.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from virtua.errors import InvalidArgument

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1024
    max_connections_per_source: int = 128
    max_handshakes: int = 128  # connections of all sources still in their handshake
    max_handshakes_per_source: int = 16
    handshake_timeout: float = 10.0  # seconds from accept to the end of the handshake

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_source", "max_handshakes",
                     "max_handshakes_per_source"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgument(f"bad {name.replace('_', '-')} {value!r}: must be a whole number >= 1")
        t = self.handshake_timeout
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
            raise InvalidArgument(f"bad handshake-timeout {t!r}: must be more than 0 and at most 3600 seconds")


def source_of(transport: Any) -> str:
    """The source a connection counts against: its IP address, or its local process."""
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        host = str(peer[0])
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return host
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            # one host usually holds a whole /64: count it as one source
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return host
    sock = transport.get_extra_info("socket")
    try:
        pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (AttributeError, OSError, struct.error):
        return "unix"
    return f"unix pid {pid} uid {uid}"


# A refused source is reported at most once per this many seconds, with the count of
# refusals since its last report; records of sources without connections are dropped
# once there are this many.
_REPORT_INTERVAL = 60.0
_MAX_IDLE_SOURCES = 4096


class Admitted(Protocol):
    """A connection as Admission sees it."""

    def drop(self) -> None:
        """Close it now, to make room for a newer one (its release() comes later)."""


@dataclass
class _Source:
    connections: int = 0
    handshakes: int = 0
    unreported: int = 0  # refusals not yet in a log line
    reported_at: float | None = None


@dataclass
class Admission:
    """The counts behind ConnectionLimits; `what` names the listener in log lines.

    The per-source limits refuse. The budget of unfinished handshakes of all sources
    does not: when it is full, the oldest unfinished handshake is dropped for the new
    one, so that a flood from many sources shortens the life of half-open sockets (a real
    client's handshake takes milliseconds) instead of locking new clients out."""

    limits: ConnectionLimits
    log: logging.Logger
    what: str = "nbd"
    connections: int = 0
    handshakes: int = 0
    refused: int = 0
    evicted: int = 0
    _sources: dict[str, _Source] = field(default_factory=dict)
    _admitted: dict[Admitted, str] = field(default_factory=dict)  # connection -> source
    _pending: dict[Admitted, None] = field(default_factory=dict)  # in their handshake, oldest first
    _evictions_reported_at: float | None = None
    _evictions_unreported: int = 0

    def admit(self, conn: Admitted, source: str) -> bool:
        """Count a new connection (in its handshake) from `source`, or refuse it."""
        lim = self.limits
        s = self._sources.get(source)
        if s is None:
            s = self._sources[source] = _Source()
        why = None
        if self.connections >= lim.max_connections:
            why = f"{self.connections} connections in all (limit {lim.max_connections})"
        elif s.connections >= lim.max_connections_per_source:
            why = f"{s.connections} connections from it (limit {lim.max_connections_per_source})"
        elif s.handshakes >= lim.max_handshakes_per_source:
            why = f"{s.handshakes} unfinished handshakes from it (limit {lim.max_handshakes_per_source})"
        if why is not None:
            self._refuse(source, s, why)
            return False
        if self.handshakes >= lim.max_handshakes:
            self._evict_oldest()
        s.connections += 1
        s.handshakes += 1
        self.connections += 1
        self.handshakes += 1
        self._admitted[conn] = source
        self._pending[conn] = None
        return True

    def handshake_done(self, conn: Admitted) -> None:
        if conn in self._pending:
            del self._pending[conn]
            self._sources[self._admitted[conn]].handshakes -= 1
            self.handshakes -= 1

    def release(self, conn: Admitted) -> None:
        """An admitted connection has closed (nothing if it was dropped by eviction)."""
        self.handshake_done(conn)
        source = self._admitted.pop(conn, None)
        if source is None:
            return
        s = self._sources[source]
        s.connections -= 1
        self.connections -= 1
        if not s.connections and s.reported_at is None:
            del self._sources[source]

    def _evict_oldest(self) -> None:
        victim = next(iter(self._pending))
        self.release(victim)
        self.evicted += 1
        self._evictions_unreported += 1
        now = time.monotonic()
        last = self._evictions_reported_at
        if last is None or now - last >= _REPORT_INTERVAL:
            self.log.warning("%s: %d unfinished handshakes in all (limit %d): dropping the oldest for "
                             "each new connection (%d so far); not logged again for %.0f s", self.what,
                             self.handshakes + 1, self.limits.max_handshakes, self._evictions_unreported,
                             _REPORT_INTERVAL)
            self._evictions_reported_at = now
            self._evictions_unreported = 0
        victim.drop()

    def _refuse(self, source: str, s: _Source, why: str) -> None:
        self.refused += 1
        s.unreported += 1
        now = time.monotonic()
        if s.reported_at is None or now - s.reported_at >= _REPORT_INTERVAL:
            more = f" ({s.unreported - 1} more refused since the last report)" if s.reported_at else ""
            self.log.warning("%s: refusing new connections from %s: %s%s; further refusals from it "
                             "are not logged for %.0f s", self.what, source, why, more, _REPORT_INTERVAL)
            s.reported_at = now
            s.unreported = 0
        if not s.connections and len(self._sources) > _MAX_IDLE_SOURCES:
            self._drop_idle(now)

    def _drop_idle(self, now: float) -> None:
        for source, s in list(self._sources.items()):
            if not s.connections and (s.reported_at is None or now - s.reported_at >= _REPORT_INTERVAL):
                del self._sources[source]

    def counts(self, source: str) -> tuple[int, int]:
        """(connections, handshakes) of one source."""
        s = self._sources.get(source)
        return (s.connections, s.handshakes) if s is not None else (0, 0)


__all__ = ["Admission", "Admitted", "ConnectionLimits", "source_of"]
