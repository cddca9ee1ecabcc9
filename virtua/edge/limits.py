"""Who may open a connection: limits per source address and on unfinished handshakes.

Without them, anyone who can reach a listening port can hold every connection slot with
sockets that never finish the handshake, and lock every other client out until the
handshake timeout. `Admission` keeps four counts -- all connections and connections still
in their handshake, per source and in total -- and refuses a connection that would pass
any of the limits, so a flood from one source costs other sources nothing:

- a source's handshakes are capped small (a real client finishes in milliseconds);
- the handshakes of all sources together have their own budget, well below the limit of
  connections, so established clients never compete with half-open ones;
- a source's connections (established ones too) are capped.

A source is the peer's IP address on TCP and the peer's process on a unix socket (its
pid from SO_PEERCRED): every local QEMU is its own source, a flooding process is one.
A refused source is logged once (then at most once a minute, with the count of
refusals since), never once per connection.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

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
        return host[7:] if host.startswith("::ffff:") else host  # IPv4-mapped: one source
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


@dataclass
class _Source:
    connections: int = 0
    handshakes: int = 0
    unreported: int = 0  # refusals not yet in a log line
    reported_at: float | None = None


@dataclass
class Admission:
    """The counts behind ConnectionLimits; `what` names the listener in log lines."""

    limits: ConnectionLimits
    log: logging.Logger
    what: str = "nbd"
    connections: int = 0
    handshakes: int = 0
    refused: int = 0
    _sources: dict[str, _Source] = field(default_factory=dict)

    def admit(self, source: str) -> bool:
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
        elif self.handshakes >= lim.max_handshakes:
            why = f"{self.handshakes} unfinished handshakes in all (limit {lim.max_handshakes})"
        if why is None:
            s.connections += 1
            s.handshakes += 1
            self.connections += 1
            self.handshakes += 1
            return True
        self.refused += 1
        s.unreported += 1
        now = time.monotonic()
        if s.reported_at is None or now - s.reported_at >= _REPORT_INTERVAL:
            more = f" ({s.unreported - 1} more refused since the last report)" if s.reported_at else ""
            self.log.warning("%s: refusing new connections from %s: %s%s; further refusals from it "
                             "are not logged for %.0f s", self.what, source, why, more, _REPORT_INTERVAL)
            s.reported_at = now
            s.unreported = 0
        if len(self._sources) > _MAX_IDLE_SOURCES:
            self._drop_idle(now)
        return False

    def handshake_done(self, source: str) -> None:
        s = self._sources[source]
        s.handshakes -= 1
        self.handshakes -= 1

    def release(self, source: str, in_handshake: bool) -> None:
        """A connection admitted from `source` has closed."""
        s = self._sources[source]
        s.connections -= 1
        self.connections -= 1
        if in_handshake:
            s.handshakes -= 1
            self.handshakes -= 1
        if not s.connections and s.reported_at is None:
            del self._sources[source]

    def _drop_idle(self, now: float) -> None:
        for source, s in list(self._sources.items()):
            if not s.connections and (s.reported_at is None or now - s.reported_at >= _REPORT_INTERVAL):
                del self._sources[source]

    def counts(self, source: str) -> tuple[int, int]:
        """(connections, handshakes) of one source."""
        s = self._sources.get(source)
        return (s.connections, s.handshakes) if s is not None else (0, 0)


__all__ = ["Admission", "ConnectionLimits", "source_of"]
